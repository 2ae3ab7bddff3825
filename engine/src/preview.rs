//! Cheap per-step previews: the clean-image estimate `x0 = x + σ·u` mapped
//! to RGB at latent resolution by a 16×3 linear projection (spec §6.1,
//! ComfyUI's current Flux latent→RGB factors, which fit Z-Image's latents).

/// Rows: latent channels; columns: R, G, B.
pub const LATENT_RGB_FACTORS: [[f32; 3]; 16] = [
    [-0.0346, 0.0244, 0.0681],
    [0.0034, 0.0210, 0.0687],
    [0.0275, -0.0668, -0.0433],
    [-0.0174, 0.0160, 0.0617],
    [0.0859, 0.0721, 0.0329],
    [0.0004, 0.0383, 0.0115],
    [0.0405, 0.0861, 0.0915],
    [-0.0236, -0.0185, -0.0259],
    [-0.0245, 0.0250, 0.1180],
    [0.1008, 0.0755, -0.0421],
    [-0.0515, 0.0201, 0.0011],
    [0.0428, -0.0012, -0.0036],
    [0.0817, 0.0765, 0.0749],
    [-0.1264, -0.0522, -0.1103],
    [-0.0280, -0.0881, -0.0499],
    [-0.1262, -0.0982, -0.0778],
];
pub const LATENT_RGB_BIAS: [f32; 3] = [-0.0329, -0.0718, -0.0851];

/// An 8-bit RGB image, rows top to bottom.
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

/// A VAE's linear latent → RGB map: Flux's (which fits Z-Image's VAE) unless
/// the VAE's `config.json` carries its own as `zimage_latent_rgb` (the demo
/// VAE does: its latent space is its own, fitted by least squares).
#[derive(Debug, Clone, PartialEq)]
pub struct LatentRgb {
    /// Rows: latent channels; columns: R, G, B.
    pub factors: [[f32; 3]; 16],
    pub bias: [f32; 3],
}

impl Default for LatentRgb {
    fn default() -> Self {
        Self { factors: LATENT_RGB_FACTORS, bias: LATENT_RGB_BIAS }
    }
}

impl LatentRgb {
    /// Reads `{"factors": [[r, g, b] × 16], "bias": [r, g, b]}`.
    pub fn from_json(v: &serde_json::Value) -> Option<Self> {
        let triple = |v: &serde_json::Value| -> Option<[f32; 3]> {
            let a = v.as_array().filter(|a| a.len() == 3)?;
            Some([a[0].as_f64()? as f32, a[1].as_f64()? as f32, a[2].as_f64()? as f32])
        };
        let rows = v.get("factors")?.as_array().filter(|r| r.len() == 16)?;
        let mut factors = [[0f32; 3]; 16];
        for (f, r) in factors.iter_mut().zip(rows) {
            *f = triple(r)?;
        }
        let out = Self { factors, bias: triple(v.get("bias")?)? };
        out.factors.iter().flatten().chain(&out.bias).all(|x| x.is_finite()).then_some(out)
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "factors": self.factors, "bias": self.bias })
    }

    /// Projects one model-space latent `[16, h, w]` (channel-major, f32) to
    /// RGB: `rgb = zᵀM + b`, then `round((clamp(rgb, −1, 1) + 1)·127.5)`.
    pub fn project(&self, latent: &[f32], h: usize, w: usize) -> RgbImage {
        let plane = h * w;
        let channels = latent.len() / plane.max(1);
        let mut pixels = vec![0u8; plane * 3];
        for p in 0..plane {
            let mut rgb = self.bias;
            for (c, factors) in self.factors.iter().enumerate().take(channels) {
                let z = latent[c * plane + p];
                for (v, f) in rgb.iter_mut().zip(factors) {
                    *v += z * f;
                }
            }
            for (px, v) in pixels[p * 3..p * 3 + 3].iter_mut().zip(rgb) {
                *px = ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8;
            }
        }
        RgbImage { width: w as u32, height: h as u32, pixels }
    }
}

/// [`LatentRgb::project`] with Flux's factors.
pub fn latent_to_rgb(latent: &[f32], h: usize, w: usize) -> RgbImage {
    LatentRgb::default().project(latent, h, w)
}

/// Least-squares fit of a [`LatentRgb`]: `latents` are model-space latent
/// cells (16 values each), `rgb` the matching average colours in [−1, 1].
pub fn fit_latent_rgb(latents: &[[f32; 16]], rgb: &[[f32; 3]]) -> Option<LatentRgb> {
    // Normal equations (XᵀX + λI) w = Xᵀy with X = [z, 1]: 17 unknowns per colour.
    const N: usize = 17;
    let mut xtx = [[0f64; N]; N];
    let mut xty = [[0f64; 3]; N];
    for (z, y) in latents.iter().zip(rgb) {
        let x: Vec<f64> = z.iter().map(|&v| v as f64).chain(std::iter::once(1.0)).collect();
        for i in 0..N {
            for j in 0..N {
                xtx[i][j] += x[i] * x[j];
            }
            for k in 0..3 {
                xty[i][k] += x[i] * y[k] as f64;
            }
        }
    }
    for (i, row) in xtx.iter_mut().enumerate() {
        row[i] += 1e-6 * latents.len() as f64; // a little ridge: no singular systems
    }
    // Gauss-Jordan with partial pivoting, three right-hand sides at once.
    let mut a: Vec<Vec<f64>> = (0..N).map(|i| xtx[i].iter().chain(&xty[i]).copied().collect()).collect();
    for col in 0..N {
        let pivot = (col..N).max_by(|&p, &q| a[p][col].abs().total_cmp(&a[q][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        let div = a[col][col];
        a[col].iter_mut().for_each(|v| *v /= div);
        for r in 0..N {
            if r != col {
                let f = a[r][col];
                if f != 0.0 {
                    let pivot_row = a[col].clone();
                    for (v, p) in a[r].iter_mut().zip(&pivot_row) {
                        *v -= f * p;
                    }
                }
            }
        }
    }
    let mut out = LatentRgb { factors: [[0.0; 3]; 16], bias: [0.0; 3] };
    for (c, factors) in out.factors.iter_mut().enumerate() {
        for (k, f) in factors.iter_mut().enumerate() {
            *f = a[c][N + k] as f32;
        }
    }
    for (k, b) in out.bias.iter_mut().enumerate() {
        *b = a[16][N + k] as f32;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_latent_gives_the_bias_colour() {
        let img = latent_to_rgb(&[0.0; 16 * 4], 2, 2);
        let expect: Vec<u8> = LATENT_RGB_BIAS.iter().map(|b| ((b + 1.0) * 127.5).round() as u8).collect();
        assert_eq!(&img.pixels[..3], &expect[..]);
        assert_eq!(img.pixels.len(), 12);
    }

    #[test]
    fn fit_recovers_a_known_projection_and_round_trips_through_json() {
        let truth = LatentRgb::default();
        let mut state = 12345u64;
        let mut rnd = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        let latents: Vec<[f32; 16]> = (0..500).map(|_| std::array::from_fn(|_| rnd() * 3.0)).collect();
        let rgb: Vec<[f32; 3]> = latents
            .iter()
            .map(|z| std::array::from_fn(|k| truth.bias[k] + (0..16).map(|c| z[c] * truth.factors[c][k]).sum::<f32>()))
            .collect();
        let fit = fit_latent_rgb(&latents, &rgb).expect("solvable");
        for (a, b) in fit.factors.iter().flatten().chain(&fit.bias).zip(truth.factors.iter().flatten().chain(&truth.bias)) {
            assert!((a - b).abs() < 1e-3, "{a} vs {b}");
        }
        assert_eq!(LatentRgb::from_json(&fit.to_json()), Some(fit));
        assert_eq!(LatentRgb::from_json(&serde_json::json!({"factors": [[1, 2, 3]], "bias": [0, 0, 0]})), None);
    }

    #[test]
    fn projection_is_channel_major_and_clamped() {
        // Channel 4 only, huge value: clamps to 255 where its factor is positive.
        let mut z = vec![0.0f32; 16];
        z[4] = 1000.0;
        let img = latent_to_rgb(&z, 1, 1);
        assert_eq!(img.pixels, vec![255, 255, 255]);
        z[4] = -1000.0;
        assert_eq!(latent_to_rgb(&z, 1, 1).pixels, vec![0, 0, 0]);
    }
}
