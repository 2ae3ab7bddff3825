//! Decoded images and their GPU textures, keyed by history id, by a history
//! thumbnail ("thumb:<id>") or by a preview slot name ("live", "refine",
//! "var:<job>", "diff:<a>:<b>"). Bounded by count and by bytes: at 1024² an
//! image is 3 MiB decoded plus 4 MiB of texture.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use egui::{ColorImage, TextureHandle, TextureOptions};
use zimage_engine::preview::RgbImage;

pub struct Images {
    rgb: HashMap<String, Arc<RgbImage>>,
    textures: HashMap<String, TextureHandle>,
    /// Least recently inserted first: evicted first (they reload from disk).
    order: VecDeque<String>,
    /// Bytes held: decoded RGB plus RGBA textures.
    bytes: usize,
    /// Evict beyond this many bytes.
    budget: usize,
    /// Keys shown in this frame and the one before: never evicted, or a view
    /// showing more than the budget would reload its images every frame.
    in_use: HashSet<String>,
    was_in_use: HashSet<String>,
}

/// Keep at most this many images (thumbnails included).
const CAPACITY: usize = 1024;

/// Keep at most this many bytes of images and textures (about 70 images at
/// 1024², any number of thumbnails).
pub const BYTE_BUDGET: usize = 512 << 20;

/// The history panel's thumbnails: this many pixels on their longer side.
pub const THUMB_SIDE: u32 = 112;

impl Default for Images {
    fn default() -> Self {
        Self::with_budget(BYTE_BUDGET)
    }
}

fn bytes_of(img: &RgbImage) -> usize {
    img.width as usize * img.height as usize * (3 + 4)
}

/// `img` scaled down to at most `side` pixels on its longer side (a box
/// filter: no aliasing on the flat colours and hard edges of these images).
pub fn thumbnail(img: &RgbImage, side: u32) -> RgbImage {
    let scale = side as f64 / img.width.max(img.height).max(1) as f64;
    if scale >= 1.0 {
        return img.clone();
    }
    let (w, h) = (((img.width as f64 * scale).round() as u32).max(1), ((img.height as f64 * scale).round() as u32).max(1));
    let Some(buf) = image::RgbImage::from_raw(img.width, img.height, img.pixels.clone()) else { return img.clone() };
    let small = image::imageops::thumbnail(&buf, w, h);
    RgbImage { width: w, height: h, pixels: small.into_raw() }
}

pub fn color_image(img: &RgbImage) -> ColorImage {
    ColorImage::from_rgb([img.width as usize, img.height as usize], &img.pixels)
}

impl Images {
    pub fn with_budget(budget: usize) -> Self {
        Self {
            rgb: HashMap::new(),
            textures: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            budget,
            in_use: HashSet::new(),
            was_in_use: HashSet::new(),
        }
    }

    /// Starts a frame: what the last frame showed stays protected for this one.
    pub fn begin_frame(&mut self) {
        self.was_in_use = std::mem::take(&mut self.in_use);
    }

    /// `key` is shown in this frame (kept, not evicted).
    pub fn touch(&mut self, key: &str) {
        if !self.in_use.contains(key) {
            self.in_use.insert(key.to_string());
        }
    }

    /// Bytes held now (decoded images and their textures).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Stores `img` under `key` and updates (or creates) its texture in place.
    pub fn put(&mut self, ctx: &egui::Context, key: &str, img: Arc<RgbImage>) {
        let color = color_image(&img);
        // Linear filtering: previews arrive at 1/8 resolution and are shown enlarged.
        let options = TextureOptions::LINEAR;
        match self.textures.get_mut(key) {
            Some(t) => t.set(color, options),
            None => {
                self.textures.insert(key.to_string(), ctx.load_texture(key, color, options));
            }
        }
        self.bytes += bytes_of(&img);
        if let Some(previous) = self.rgb.insert(key.to_string(), img) {
            self.bytes -= bytes_of(&previous);
            // Used again: evicted last.
            self.order.retain(|k| k != key);
        }
        self.order.push_back(key.to_string());
        while self.order.len() > CAPACITY || self.bytes > self.budget {
            let protected = |k: &String| k == key || self.in_use.contains(k) || self.was_in_use.contains(k);
            let Some(at) = self.order.iter().position(|k| !protected(k)) else { break };
            let Some(old) = self.order.remove(at) else { break };
            if let Some(gone) = self.rgb.remove(&old) {
                self.bytes -= bytes_of(&gone);
            }
            self.textures.remove(&old);
        }
    }

    pub fn texture(&self, key: &str) -> Option<&TextureHandle> {
        self.textures.get(key)
    }

    pub fn rgb(&self, key: &str) -> Option<Arc<RgbImage>> {
        self.rgb.get(key).cloned()
    }

    pub fn contains(&self, key: &str) -> bool {
        self.textures.contains_key(key)
    }

    pub fn remove(&mut self, key: &str) {
        self.textures.remove(key);
        if let Some(gone) = self.rgb.remove(key) {
            self.bytes -= bytes_of(&gone);
        }
        self.order.retain(|k| k != key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(side: u32) -> Arc<RgbImage> {
        Arc::new(RgbImage { width: side, height: side, pixels: vec![7; (side * side * 3) as usize] })
    }

    #[test]
    fn the_byte_budget_evicts_the_oldest_images_not_shown() {
        let ctx = egui::Context::default();
        // Room for three 64² images (7 bytes a pixel: RGB + RGBA texture).
        let mut images = Images::with_budget(3 * 64 * 64 * 7);
        images.begin_frame();
        images.put(&ctx, "shown", image(64));
        images.touch("shown");
        for k in ["a", "b", "c", "d"] {
            images.put(&ctx, k, image(64));
        }
        assert!(images.contains("shown"), "shown in this frame: kept");
        assert!(!images.contains("a") && !images.contains("b"), "the oldest others went");
        assert!(images.contains("c") && images.contains("d"));
        assert_eq!(images.bytes(), 3 * 64 * 64 * 7);
        // Still protected in the next frame (it was shown in the last one), then not.
        images.begin_frame();
        images.put(&ctx, "e", image(64));
        assert!(images.contains("shown"));
        images.begin_frame();
        images.put(&ctx, "f", image(64));
        assert!(!images.contains("shown"), "not shown for two frames: evictable");
        // Replacing a key counts its new size only.
        images.put(&ctx, "f", image(32));
        assert_eq!(images.bytes(), (2 * 64 * 64 + 32 * 32) * 7);
        images.remove("f");
        assert_eq!(images.bytes(), 2 * 64 * 64 * 7);
    }

    #[test]
    fn thumbnails_keep_the_aspect_and_the_colours() {
        let wide = RgbImage { width: 1024, height: 512, pixels: [200u8, 10, 30].repeat(1024 * 512) };
        let t = thumbnail(&wide, THUMB_SIDE);
        assert_eq!((t.width, t.height), (112, 56));
        assert!(t.pixels.chunks(3).all(|p| p == [200, 10, 30]), "a flat colour stays exactly itself");
        let small = RgbImage { width: 64, height: 64, pixels: vec![1; 64 * 64 * 3] };
        assert_eq!(thumbnail(&small, THUMB_SIDE), small, "never enlarged");
    }
}
