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

/// Projects one model-space latent `[16, h, w]` (channel-major, f32) to RGB:
/// `rgb = zᵀM + b`, then `round((clamp(rgb, −1, 1) + 1)·127.5)`.
pub fn latent_to_rgb(latent: &[f32], h: usize, w: usize) -> RgbImage {
    let plane = h * w;
    let channels = latent.len() / plane.max(1);
    let mut pixels = vec![0u8; plane * 3];
    for p in 0..plane {
        let mut rgb = LATENT_RGB_BIAS;
        for c in 0..channels.min(16) {
            let z = latent[c * plane + p];
            for k in 0..3 {
                rgb[k] += z * LATENT_RGB_FACTORS[c][k];
            }
        }
        for k in 0..3 {
            pixels[p * 3 + k] = ((rgb[k].clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8;
        }
    }
    RgbImage { width: w as u32, height: h as u32, pixels }
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
