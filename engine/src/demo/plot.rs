//! Loss curves as a PNG, drawn here (no plotting dependency): one panel per
//! training phase, log-scale loss against steps, raw values in a light tone
//! and a moving average on top, labelled with a built-in 5×7 pixel font.

use std::path::Path;

/// One panel: a title and the loss of every step.
pub struct Curve {
    pub title: String,
    pub losses: Vec<f32>,
}

const PANEL_W: usize = 440;
const PANEL_H: usize = 320;
const LEFT: usize = 64;
const RIGHT: usize = 16;
const TOP: usize = 40;
const BOTTOM: usize = 44;
const SCALE: usize = 2;

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Self { w, h, px: vec![255; w * h * 3] }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn line(&mut self, (x0, y0): (f32, f32), (x1, y1): (f32, f32), c: [u8; 3]) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=n {
            let t = i as f32 / n as f32;
            self.set((x0 + (x1 - x0) * t).round() as i64, (y0 + (y1 - y0) * t).round() as i64, c);
        }
    }

    fn text(&mut self, x: usize, y: usize, s: &str, c: [u8; 3]) {
        for (k, ch) in s.chars().enumerate() {
            let rows = glyph(ch);
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0b10000 >> col) != 0 {
                        for dy in 0..SCALE {
                            for dx in 0..SCALE {
                                let px = x + k * 6 * SCALE + col * SCALE + dx;
                                self.set(px as i64, (y + r * SCALE + dy) as i64, c);
                            }
                        }
                    }
                }
            }
        }
    }

    fn text_width(s: &str) -> usize {
        s.chars().count() * 6 * SCALE
    }
}

/// 5×7 glyphs (upper case; lower case is drawn as upper case).
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        'A' => [14, 17, 17, 31, 17, 17, 17],
        'B' => [30, 17, 17, 30, 17, 17, 30],
        'C' => [14, 17, 16, 16, 16, 17, 14],
        'D' => [30, 17, 17, 17, 17, 17, 30],
        'E' => [31, 16, 16, 30, 16, 16, 31],
        'F' => [31, 16, 16, 30, 16, 16, 16],
        'G' => [14, 17, 16, 23, 17, 17, 15],
        'H' => [17, 17, 17, 31, 17, 17, 17],
        'I' => [14, 4, 4, 4, 4, 4, 14],
        'J' => [7, 2, 2, 2, 2, 18, 12],
        'K' => [17, 18, 20, 24, 20, 18, 17],
        'L' => [16, 16, 16, 16, 16, 16, 31],
        'M' => [17, 27, 21, 21, 17, 17, 17],
        'N' => [17, 17, 25, 21, 19, 17, 17],
        'O' => [14, 17, 17, 17, 17, 17, 14],
        'P' => [30, 17, 17, 30, 16, 16, 16],
        'Q' => [14, 17, 17, 17, 21, 18, 13],
        'R' => [30, 17, 17, 30, 20, 18, 17],
        'S' => [15, 16, 16, 14, 1, 1, 30],
        'T' => [31, 4, 4, 4, 4, 4, 4],
        'U' => [17, 17, 17, 17, 17, 17, 14],
        'V' => [17, 17, 17, 17, 17, 10, 4],
        'W' => [17, 17, 17, 21, 21, 21, 10],
        'X' => [17, 17, 10, 4, 10, 17, 17],
        'Y' => [17, 17, 10, 4, 4, 4, 4],
        'Z' => [31, 1, 2, 4, 8, 16, 31],
        '0' => [14, 17, 19, 21, 25, 17, 14],
        '1' => [4, 12, 4, 4, 4, 4, 14],
        '2' => [14, 17, 1, 2, 4, 8, 31],
        '3' => [31, 2, 4, 2, 1, 17, 14],
        '4' => [2, 6, 10, 18, 31, 2, 2],
        '5' => [31, 16, 30, 1, 1, 17, 14],
        '6' => [6, 8, 16, 30, 17, 17, 14],
        '7' => [31, 1, 2, 4, 8, 8, 8],
        '8' => [14, 17, 17, 14, 17, 17, 14],
        '9' => [14, 17, 17, 15, 1, 2, 12],
        '.' => [0, 0, 0, 0, 0, 12, 12],
        '-' => [0, 0, 0, 31, 0, 0, 0],
        '(' => [2, 4, 8, 8, 8, 4, 2],
        ')' => [8, 4, 2, 2, 2, 4, 8],
        ':' => [0, 12, 12, 0, 12, 12, 0],
        '/' => [1, 2, 2, 4, 8, 8, 16],
        '+' => [0, 4, 4, 31, 4, 4, 0],
        '=' => [0, 0, 31, 0, 31, 0, 0],
        ',' => [0, 0, 0, 0, 12, 4, 8],
        _ => [0; 7],
    }
}

/// Short tick label: 0.02, 0.5, 3, 1e-3.
fn tick_label(v: f64) -> String {
    if v >= 1.0 {
        format!("{v:.0}")
    } else if v >= 0.001 {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').to_string()
    } else {
        format!("{v:.0e}")
    }
}

fn draw_panel(c: &mut Canvas, x0: usize, curve: &Curve) {
    let (pw, ph) = (PANEL_W - LEFT - RIGHT, PANEL_H - TOP - BOTTOM);
    let (ox, oy) = (x0 + LEFT, TOP);
    let axis = [60, 60, 60];
    let grid = [225, 225, 225];
    c.text(x0 + LEFT, 10, &curve.title, [0, 0, 0]);
    let vals: Vec<f64> = curve.losses.iter().map(|&v| (v.max(1e-8)) as f64).collect();
    if vals.is_empty() {
        return;
    }
    let lo = vals.iter().cloned().fold(f64::MAX, f64::min).log10();
    let hi = vals.iter().cloned().fold(f64::MIN, f64::max).log10();
    let (lo, hi) = (lo.floor().min(hi - 0.3), hi.ceil().max(lo + 0.3));
    let ymap = |v: f64| oy as f32 + ph as f32 * (1.0 - ((v.log10() - lo) / (hi - lo)) as f32);
    let n = vals.len().max(2);
    let xmap = |i: usize| ox as f32 + pw as f32 * i as f32 / (n - 1) as f32;
    // Grid and y ticks at 1, 2, 5 × 10^k.
    for e in (lo as i32)..=(hi as i32) {
        for m in [1.0, 2.0, 5.0] {
            let v = m * 10f64.powi(e);
            if v.log10() < lo - 1e-9 || v.log10() > hi + 1e-9 {
                continue;
            }
            let y = ymap(v);
            c.line((ox as f32, y), ((ox + pw) as f32, y), grid);
            let label = tick_label(v);
            let lx = ox.saturating_sub(Canvas::text_width(&label) + 6);
            c.text(lx, (y as usize).saturating_sub(7), &label, axis);
        }
    }
    // x ticks at 0, 1/4, ..., end.
    for q in 0..=4 {
        let i = (n - 1) * q / 4;
        let x = xmap(i);
        c.line((x, oy as f32), (x, (oy + ph) as f32), grid);
        let label = format!("{i}");
        c.text((x as usize).saturating_sub(Canvas::text_width(&label) / 2), oy + ph + 8, &label, axis);
    }
    c.text(ox + pw / 2 - Canvas::text_width("STEP") / 2, oy + ph + 26, "step", axis);
    // Raw values, then a centred moving average.
    for i in 1..vals.len() {
        c.line((xmap(i - 1), ymap(vals[i - 1])), (xmap(i), ymap(vals[i])), [170, 200, 235]);
    }
    let win = (vals.len() / 40).max(1);
    let smooth: Vec<f64> = (0..vals.len())
        .map(|i| {
            let a = i.saturating_sub(win);
            let b = (i + win + 1).min(vals.len());
            (vals[a..b].iter().map(|v| v.ln()).sum::<f64>() / (b - a) as f64).exp()
        })
        .collect();
    for i in 1..smooth.len() {
        let (p, q) = ((xmap(i - 1), ymap(smooth[i - 1])), (xmap(i), ymap(smooth[i])));
        c.line(p, q, [20, 60, 160]);
        c.line((p.0, p.1 + 1.0), (q.0, q.1 + 1.0), [20, 60, 160]);
    }
    c.line((ox as f32, oy as f32), (ox as f32, (oy + ph) as f32), axis);
    c.line((ox as f32, (oy + ph) as f32), ((ox + pw) as f32, (oy + ph) as f32), axis);
}

/// Renders the panels side by side and writes a PNG.
pub fn write_loss_plot(path: &Path, curves: &[Curve]) -> anyhow::Result<()> {
    let mut c = Canvas::new(PANEL_W * curves.len().max(1), PANEL_H);
    for (i, curve) in curves.iter().enumerate() {
        draw_panel(&mut c, i * PANEL_W, curve);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let img = image::RgbImage::from_raw(c.w as u32, c.h as u32, c.px).ok_or_else(|| anyhow::anyhow!("plot buffer size"))?;
    img.save(path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        let losses: Vec<f32> = (0..300).map(|i| 1.0 / (1.0 + i as f32 * 0.1)).collect();
        write_loss_plot(&path, &[Curve { title: "VAE (L1+L2+KL)".into(), losses: losses.clone() }, Curve { title: "Base".into(), losses }]).unwrap();
        let img = image::open(&path).unwrap();
        assert_eq!(img.width() as usize, 2 * PANEL_W);
    }
}
