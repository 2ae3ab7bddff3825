//! Images out of the app: save, save as, copy image and parameters, all
//! acting on the image in view.

use super::*;

impl StudioApp {
    /// The one image in view: the grid's cursor cell, the compared pair's
    /// second image (Base unless swapped), the Live view's image, else the
    /// selected one. Save, copy and refine act on it: what you see.
    pub fn image_in_view(&self) -> Option<String> {
        let in_view = match self.view {
            View::Compare => {
                self.compare_pair.as_ref().map(|(a, b)| if self.compare.swapped { a.clone() } else { b.clone() })
            }
            View::Variations => self.variations.get(self.var_cursor).and_then(|c| c.id.clone()),
            // The selection moves on to a refine's result, while the Live
            // view goes on showing its own image.
            View::Live => self.current.clone(),
        };
        in_view.or_else(|| self.selected.clone())
    }

    pub(super) fn copy_image(&mut self, ctx: &egui::Context) {
        let Some(id) = self.image_in_view() else { return self.info("nothing to copy yet") };
        match self.image_of(&id) {
            Ok(img) => {
                let size = [img.width as usize, img.height as usize];
                ctx.copy_image(egui::ColorImage::from_rgb(size, &img.pixels));
                self.info(format!("copied #{id} ({}×{}) to the clipboard", img.width, img.height));
            }
            Err(e) => self.error(format!("cannot copy #{id}: {}", save::one_line_error(&e))),
        }
    }

    pub(super) fn copy_parameters(&mut self, ctx: &egui::Context) {
        let Some(e) = self.image_in_view().and_then(|id| self.history.get(&id).cloned()) else {
            return self.info("nothing to copy yet");
        };
        ctx.copy_text(zimage_engine::metadata::a1111_parameters(&e.meta));
        self.info(format!("copied the parameters of #{} to the clipboard (A1111 text, as in the PNG)", e.id));
    }

    /// What Ctrl+S saves: all kept variations when the grid is shown and has
    /// any, every Base image of "All pairs", else the image in view.
    pub fn save_targets(&self) -> Vec<String> {
        if self.view == View::Variations {
            let kept = self.kept_variations();
            if !kept.is_empty() {
                return kept;
            }
        }
        if self.view == View::Compare && self.compare.mode == state::CompareMode::AllPairs {
            // The second image of every pair shown (Base, unless swapped).
            let (pairs, ..) = self.shown_pairs();
            return pairs.into_iter().map(|(t, b)| if self.compare.swapped { t } else { b }).collect();
        }
        self.image_in_view().into_iter().collect()
    }

    pub(super) fn image_of(&self, id: &str) -> anyhow::Result<Arc<RgbImage>> {
        if let Some(i) = self.images.rgb(id) {
            return Ok(i);
        }
        let e = self.history.get(id).ok_or_else(|| anyhow::anyhow!("image {id} is not in the history"))?;
        Ok(Arc::new(self.history.load_image(e)?))
    }

    pub fn output_dir(&self) -> PathBuf {
        default_output_dir(&self.settings, &self.paths)
    }

    pub(super) fn save_selected(&mut self) {
        let targets = self.save_targets();
        if targets.is_empty() {
            return self.info("nothing to save yet");
        }
        let dir = self.output_dir();
        let mut saved = Vec::new();
        let mut before = Vec::new();
        for id in &targets {
            // Saved into this folder already and still there: a second file
            // of the same image would only clutter the folder.
            let earlier = self.history.get(id).and_then(|e| e.saved.clone());
            if let Some(path) = earlier.filter(|p| p.parent() == Some(dir.as_path()) && p.is_file()) {
                before.push(path);
                continue;
            }
            let result = self.image_of(id).and_then(|img| {
                let meta = self.history.get(id).map(|e| e.meta.clone()).unwrap_or_default();
                save::save_into(&dir, &img, &meta)
            });
            match result {
                Ok(p) => {
                    if let Some(e) = self.history.get_mut(id) {
                        e.saved = Some(p.clone());
                    }
                    saved.push(p);
                }
                Err(e) => return self.error(format!("save failed: {}", save::one_line_error(&e))),
            }
        }
        if !saved.is_empty() {
            if let Err(e) = self.history.save() {
                self.error(format!("could not save the history: {}", save::one_line_error(&e)));
            }
        }
        let earlier = match before.len() {
            0 => String::new(),
            1 if saved.is_empty() => format!("already saved as {} (Save as… writes a copy)", before[0].display()),
            n if saved.is_empty() => format!("the {n} images are already saved in {}", dir.display()),
            n => format!("; {n} saved before"),
        };
        match saved.as_slice() {
            [] => self.info(earlier),
            [one] => self.info(format!("saved {}{earlier}", one.display())),
            many => self.info(format!("saved {} images to {}{earlier}", many.len(), dir.display())),
        }
    }

    pub(super) fn save_as(&mut self) {
        let Some(id) = self.save_targets().into_iter().next() else {
            return self.info("nothing to save yet");
        };
        if !file_dialog_available() {
            return self.error(format!(
                "no file dialog on this system (needs xdg-desktop-portal or zenity); Ctrl+S saves to {} instead",
                self.output_dir().display()
            ));
        }
        let meta = self.history.get(&id).map(|e| e.meta.clone()).unwrap_or_default();
        let suggested = save::unique_name(&self.output_dir(), &meta.model_kind, meta.seed, &meta.prompt);
        let name = suggested.file_name().map_or_else(|| "zimage.png".into(), |n| n.to_string_lossy().into_owned());
        let picked = rfd::FileDialog::new()
            .set_title("Save image as")
            .add_filter("PNG image", &["png"])
            .set_directory(self.output_dir())
            .set_file_name(name)
            .save_file();
        let Some(mut path) = picked else {
            return self.info("save cancelled (or the file dialog could not open)");
        };
        if path.extension().is_none() {
            path.set_extension("png");
        }
        match self.image_of(&id).and_then(|img| save::save_to(&path, &img, &meta)) {
            Ok(()) => self.info(format!("saved {}", path.display())),
            Err(e) => self.error(format!("save failed: {}", save::one_line_error(&e))),
        }
    }
}
