//! Diagnostic for the demo model (docs/demo-model.md, session 31): where a
//! small square loses its corners. For every small square of the
//! evaluation's held-out scenes, the fill of each corner's box (a quarter of
//! the object's side, inside its bounding box) in the clean render, after the
//! VAE's round trip, and in Base's and Turbo's images of the caption.
//!
//! `cargo run --release --example corner_bias -- [MODEL_DIR] [CAPTIONS]`
//! (defaults: assets/demo, 200).
use anyhow::Context;
use burn::tensor::{DType, Tensor, TensorData};
use zimage_engine::demo::eval::{demo_request, generate_one, load_demo_pair, load_vae_dir};
use zimage_engine::demo::judge::classify;
use zimage_engine::demo::world::{image_to_chw, Colour, Shape, Size, Split, WorldSampler};
use zimage_engine::preview::RgbImage;

const EVAL_SEED: u64 = 1234;

/// The fills of the top-left, top-right, bottom-left and bottom-right corner
/// boxes of the largest 4-connected region of `colour`, and its whole fill.
fn corners(img: &RgbImage, colour: Colour) -> Option<([f64; 5], [usize; 4])> {
    let (w, h) = (img.width as usize, img.height as usize);
    let mask: Vec<bool> = img.pixels.chunks(3).map(|p| classify([p[0], p[1], p[2]]) == Some(colour)).collect();
    let mut seen = vec![false; w * h];
    let mut best: Vec<usize> = Vec::new();
    for start in 0..w * h {
        if !mask[start] || seen[start] {
            continue;
        }
        let (mut stack, mut region) = (vec![start], Vec::new());
        seen[start] = true;
        while let Some(i) = stack.pop() {
            region.push(i);
            let (x, y) = (i % w, i / w);
            let near = [(x > 0).then(|| i - 1), (x + 1 < w).then(|| i + 1), (y > 0).then(|| i - w), (y + 1 < h).then(|| i + w)];
            for j in near.into_iter().flatten() {
                if mask[j] && !seen[j] {
                    seen[j] = true;
                    stack.push(j);
                }
            }
        }
        if region.len() > best.len() {
            best = region;
        }
    }
    if best.len() < 30 {
        return None;
    }
    let inside: std::collections::HashSet<usize> = best.iter().copied().collect();
    let (xs, ys): (Vec<usize>, Vec<usize>) = best.iter().map(|i| (i % w, i / w)).unzip();
    let (x0, x1, y0, y1) = (*xs.iter().min()?, *xs.iter().max()?, *ys.iter().min()?, *ys.iter().max()?);
    let k = ((x1 - x0 + 1).min(y1 - y0 + 1) / 4).max(2);
    let fill = |xa: usize, ya: usize| {
        let n = (ya..ya + k).flat_map(|y| (xa..xa + k).map(move |x| (x, y))).filter(|(x, y)| inside.contains(&(y * w + x))).count();
        n as f64 / (k * k) as f64
    };
    let area = ((x1 - x0 + 1) * (y1 - y0 + 1)) as f64;
    let fills = [fill(x0, y0), fill(x1 + 1 - k, y0), fill(x0, y1 + 1 - k), fill(x1 + 1 - k, y1 + 1 - k), best.len() as f64 / area];
    Some((fills, [x0, x1, y0, y1]))
}

fn main() -> anyhow::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "assets/demo".into());
    let captions: usize = std::env::args().nth(2).map(|s| s.parse().context("captions")).transpose()?.unwrap_or(200);
    let device = Default::default();
    let (base, turbo) = load_demo_pair(std::path::Path::new(&dir), &device)?;
    // With its encoder (the pipelines load the decoder only).
    let (_, vae) = load_vae_dir(&std::path::Path::new(&dir).join("vae"), &device)?;
    let mut world = WorldSampler::new(EVAL_SEED);
    let names = ["render", "VAE round trip", "Base", "Turbo"];
    let mut sums = [[0.0f64; 5]; 4];
    let mut counts = [0usize; 4];
    // Base's, by the square's grid cell (row, column).
    let mut by_cell = [[([0.0f64; 5], 0usize); 3]; 3];
    // Base's corner fills by how far the rendered corner reaches into its
    // 16-px token (the DiT's patch of 2×2 latent cells), along the shorter way.
    let mut by_reach = [(0.0f64, 0usize); 4];
    for i in 0..captions {
        let (scene, render) = world.sample(Split::HeldOut);
        let squares: Vec<(Colour, usize, usize)> = scene
            .objects
            .iter()
            .filter(|o| o.size == Size::Small && o.shape == Shape::Square)
            .map(|o| (o.colour, o.position.row as usize, o.position.col as usize))
            .collect();
        if squares.is_empty() {
            continue;
        }
        let n = render.width as usize;
        let x = Tensor::from_data(TensorData::new(image_to_chw(&render), [1, 3, n, n]), (&device, DType::F32));
        let (mean, _) = vae.encode(x).context("the demo VAE has an encoder")?;
        // The raw VAE (as `eval-demo --vae-round-trip`): no latent scaling either way.
        let out = vae.decode(mean).into_data().convert::<f32>().into_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let round_trip = zimage_engine::pipeline::to_rgb8(&out, n, n);
        let seed = EVAL_SEED.wrapping_add(i as u64);
        let (from_base, _) = generate_one(&base, &demo_request(&scene.caption(), seed, true))?;
        let (from_turbo, _) = generate_one(&turbo, &demo_request(&scene.caption(), seed, false))?;
        for (k, img) in [&render, &round_trip, &from_base, &from_turbo].into_iter().enumerate() {
            for &(c, row, col) in &squares {
                if let Some((f, _)) = corners(img, c) {
                    counts[k] += 1;
                    for (s, v) in sums[k].iter_mut().zip(f) {
                        *s += v;
                    }
                    if k == 2 {
                        if let Some((_, [x0, x1, y0, y1])) = corners(&render, c) {
                            // Pixels of the corner inside its token: from the token's near edge.
                            let into_start = |a: usize| 16 - a % 16;
                            let into_end = |b: usize| b % 16 + 1;
                            let reach = [
                                into_start(x0).min(into_start(y0)),
                                into_end(x1).min(into_start(y0)),
                                into_start(x0).min(into_end(y1)),
                                into_end(x1).min(into_end(y1)),
                            ];
                            for (corner, r) in reach.into_iter().enumerate() {
                                let bucket = &mut by_reach[((r - 1) / 4).min(3)];
                                bucket.0 += f[corner];
                                bucket.1 += 1;
                            }
                        }
                        let cell = &mut by_cell[row][col];
                        cell.1 += 1;
                        for (s, v) in cell.0.iter_mut().zip(f) {
                            *s += v;
                        }
                    }
                }
            }
        }
    }
    println!("| small squares | found | top left | top right | bottom left | bottom right | fill |");
    println!("|---|---|---|---|---|---|---|");
    for k in 0..4 {
        let m = |j: usize| sums[k][j] / counts[k].max(1) as f64;
        println!("| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.3} |", names[k], counts[k], m(0), m(1), m(2), m(3), m(4));
    }
    println!();
    println!("| Base, by cell (row, column) | found | top left | top right | bottom left | bottom right | fill |");
    println!("|---|---|---|---|---|---|---|");
    for (row, cells) in by_cell.iter().enumerate() {
        for (col, (sum, n)) in cells.iter().enumerate() {
            let m = |j: usize| sum[j] / (*n).max(1) as f64;
            println!("| {row}, {col} | {n} | {:.2} | {:.2} | {:.2} | {:.2} | {:.3} |", m(0), m(1), m(2), m(3), m(4));
        }
    }
    println!();
    println!("| Base: corner's reach into its token | corners | fill of the corner box |");
    println!("|---|---|---|");
    for (i, (sum, n)) in by_reach.iter().enumerate() {
        println!("| {}–{} px | {n} | {:.2} |", 4 * i + 1, 4 * i + 4, sum / (*n).max(1) as f64);
    }
    Ok(())
}
