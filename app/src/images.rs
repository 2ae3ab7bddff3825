//! Decoded images and their GPU textures, keyed by history id or by a
//! preview slot name ("live", "refine", "var:<job>", "diff:<a>:<b>").

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use egui::{ColorImage, TextureHandle, TextureOptions};
use zimage_engine::preview::RgbImage;

#[derive(Default)]
pub struct Images {
    rgb: HashMap<String, Arc<RgbImage>>,
    textures: HashMap<String, TextureHandle>,
    /// Least recently inserted first; only history images are evicted.
    order: VecDeque<String>,
}

/// Keep at most this many decoded history images (thumbnails reload from disk).
const CAPACITY: usize = 256;

pub fn color_image(img: &RgbImage) -> ColorImage {
    ColorImage::from_rgb([img.width as usize, img.height as usize], &img.pixels)
}

impl Images {
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
        if self.rgb.insert(key.to_string(), img).is_none() {
            self.order.push_back(key.to_string());
        }
        while self.order.len() > CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.rgb.remove(&old);
                self.textures.remove(&old);
            }
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
        self.rgb.remove(key);
        self.order.retain(|k| k != key);
    }
}
