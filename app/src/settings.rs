//! Persisted settings (JSON in the data folder) and where files go.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use zimage_engine::memory::MemoryPlan;

use crate::state::{AspectPreset, LiveDraft, RefineMode, SeedMode};

/// Everything the user chose that should survive a restart. `#[serde(default)]`
/// so that files written by older versions still load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Turbo model: a built-in name (`demo-turbo`) or a folder/file path.
    pub turbo_model: Option<String>,
    pub base_model: Option<String>,
    /// Default save folder; `None` = the user's Pictures folder (or a fallback).
    pub output_dir: Option<PathBuf>,
    pub live: bool,
    /// Live drafts at half size (or less) while typing (see `state::draft_size`).
    pub live_draft: LiveDraft,
    pub seed: u64,
    pub seed_mode: SeedMode,
    pub aspect: AspectPreset,
    pub width: u32,
    pub height: u32,
    /// Whether the user chose the size; until then it follows the Turbo
    /// model's natural size (128² for the demo, 1024² for the real models).
    pub size_chosen: bool,
    /// Whether the user chose the step counts; until then they follow the
    /// models' own defaults (8 / 50 for the real models, 4 / 30 for the demo).
    pub steps_chosen: bool,
    pub turbo_steps: usize,
    pub turbo_guidance: f32,
    /// Turbo's variety (noise on the prompt's features in the first steps,
    /// so that seeds differ more); 0 = off.
    pub turbo_variety: f32,
    pub base_steps: usize,
    pub base_guidance: f32,
    pub negative_prompt: String,
    pub refine_mode: RefineMode,
    pub refine_strength: f32,
    /// Turbo img2img strength over a start image (see `StudioApp::start_image`).
    pub start_strength: f32,
    pub variations: usize,
    /// Where the models run: `auto`, `cpu`, `cuda` or `wgpu`.
    pub device: String,
    /// Memory plan: what stays resident (`auto` picks from the device's
    /// memory). Replaces `one_dit_at_a_time` (true → `one_dit_at_a_time`).
    pub memory_plan: MemoryPlan,
    /// The first-run welcome was answered (a choice made or dismissed).
    pub welcome_done: bool,
    /// LoRAs per model, applied in order.
    pub turbo_loras: Vec<LoraSetting>,
    pub base_loras: Vec<LoraSetting>,
    /// The history panel is shown (Ctrl+H hides it: room for the image in
    /// a small window).
    pub show_history: bool,
    /// Live speed last measured per Turbo model and device (`model|device`),
    /// in seconds per megapixel-step: the first live image after a start
    /// already drafts where a full-size one would be slow (a real model on a
    /// CPU takes minutes), instead of waiting for one to be timed.
    pub live_speeds: std::collections::BTreeMap<String, f64>,
    /// The variations grid's smallest thumbnail side, in points (`+` / `-`
    /// in the grid): larger for a closer look, smaller for more at once.
    pub grid_thumbnail: f32,
    /// The text in the prompt box, rendered or not; `None` in files written
    /// before it was kept (the newest image's prompt is taken then).
    pub prompt: Option<String>,
    /// The variations grid's finished images (history ids, in grid order)
    /// and the one under its cursor: a restart keeps a triage where it was.
    pub grid: Vec<String>,
    pub grid_cursor: Option<String>,
}

/// One LoRA in a model's list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSetting {
    pub path: PathBuf,
    pub strength: f32,
    /// Unticked LoRAs stay in the list but are not applied.
    pub enabled: bool,
}

/// Why `path` cannot join a LoRA list, if it cannot: it must be a file that
/// exists and is not in the list yet (checked when it is added, so that a
/// typo is said at once, not as a failed load later).
pub fn lora_refusal(path: &Path, list: &[LoraSetting]) -> Option<String> {
    if path.is_dir() {
        Some(format!("{} is a folder; choose the LoRA's .safetensors file", path.display()))
    } else if !path.is_file() {
        Some(format!("{}: no such file", path.display()))
    } else if list.iter().any(|l| l.path == path) {
        Some(format!("{} is already in the list", path.display()))
    } else {
        // Its header only (a LoRA is megabytes): a file that is no LoRA is
        // refused here, in the field, rather than listed and then failing.
        zimage_engine::lora::LoraFile::open(path).err().map(|e| e.to_string())
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            turbo_model: None,
            base_model: None,
            output_dir: None,
            live: true,
            live_draft: LiveDraft::Auto,
            seed: 42,
            seed_mode: SeedMode::Fixed,
            aspect: AspectPreset::Square,
            width: 512,
            height: 512,
            size_chosen: false,
            steps_chosen: false,
            turbo_steps: 8,
            turbo_guidance: 0.0,
            turbo_variety: 0.0,
            base_steps: 50,
            base_guidance: 4.0,
            negative_prompt: String::new(),
            refine_mode: RefineMode::Img2Img,
            refine_strength: 0.6,
            start_strength: 0.7,
            variations: 8,
            device: "auto".into(),
            memory_plan: MemoryPlan::Auto,
            welcome_done: false,
            turbo_loras: Vec::new(),
            base_loras: Vec::new(),
            show_history: true,
            live_speeds: Default::default(),
            grid_thumbnail: crate::state::MIN_VARIATION_SIDE,
            prompt: None,
            grid: Vec::new(),
            grid_cursor: None,
        }
    }
}

/// A path as typed or pasted into a field: trimmed, without the quotes a
/// copied path may carry, a `file://` URI (as file managers copy) read as
/// its path, and `~` at its start read as the home folder, as a shell would
/// (a GUI field gets no shell to do it).
pub fn typed_path(text: &str) -> String {
    let mut text = text.trim();
    for q in ['"', '\''] {
        if text.len() >= 2 && text.starts_with(q) && text.ends_with(q) {
            text = &text[1..text.len() - 1];
        }
    }
    if let Some(path) = text.strip_prefix("file://") {
        return percent_decoded(path);
    }
    let home = || directories::BaseDirs::new().map(|d| d.home_dir().display().to_string());
    match text.strip_prefix('~') {
        Some(rest) if rest.is_empty() || rest.starts_with('/') || rest.starts_with(std::path::MAIN_SEPARATOR) => {
            home().map_or_else(|| text.to_string(), |h| format!("{h}{rest}"))
        }
        _ => text.to_string(),
    }
}

/// `%XX` escapes (a URI's spaces and non-ASCII letters) decoded; a broken
/// escape is kept as it is.
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where the app keeps its files. Tests point `data_dir` at a temp folder.
#[derive(Debug, Clone)]
pub struct Paths {
    pub data_dir: PathBuf,
}

impl Paths {
    /// The platform data folder (`~/.local/share/zimage-studio` on Linux).
    pub fn standard() -> Result<Self> {
        let dirs = directories::ProjectDirs::from("io", "zimage", "zimage-studio")
            .context("cannot determine a data folder (no home directory?); pass --data-dir")?;
        Ok(Self { data_dir: dirs.data_dir().to_path_buf() })
    }

    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Self { data_dir: dir.into() }
    }

    pub fn settings_file(&self) -> PathBuf {
        self.data_dir.join("settings.json")
    }
    pub fn history_file(&self) -> PathBuf {
        self.data_dir.join("history.json")
    }
    pub fn images_dir(&self) -> PathBuf {
        self.data_dir.join("images")
    }
}

/// The default save folder: the configured one, else Pictures/Z-Image,
/// else `~/Pictures/Z-Image`, else `<data>/outputs` (Pictures may be unknown).
pub fn default_output_dir(settings: &Settings, paths: &Paths) -> PathBuf {
    settings.output_dir.clone().unwrap_or_else(|| fallback_output_dir(paths))
}

/// The save folder when none is configured (what an empty field means).
pub fn fallback_output_dir(paths: &Paths) -> PathBuf {
    if let Some(pics) = directories::UserDirs::new().and_then(|u| u.picture_dir().map(Path::to_path_buf)) {
        return pics.join("Z-Image");
    }
    if let Some(home) = directories::BaseDirs::new().map(|b| b.home_dir().to_path_buf()) {
        if home.join("Pictures").is_dir() {
            return home.join("Pictures").join("Z-Image");
        }
    }
    paths.data_dir.join("outputs")
}

impl Settings {
    /// The model (path or built-in name) saved for `slot`.
    pub fn model_mut(&mut self, slot: crate::engine_bridge::ModelSlot) -> &mut Option<String> {
        match slot {
            crate::engine_bridge::ModelSlot::Turbo => &mut self.turbo_model,
            crate::engine_bridge::ModelSlot::Base => &mut self.base_model,
        }
    }

    /// Loads the settings; a missing file gives the defaults. A value this
    /// version cannot read keeps its default, the others are kept, and a
    /// one-line warning names it; a file that is not JSON at all gives the
    /// defaults and is kept aside (never overwritten by the next save).
    pub fn load(paths: &Paths) -> (Self, Option<String>) {
        let file = paths.settings_file();
        match std::fs::read_to_string(&file) {
            Ok(text) => match Self::from_json(&text) {
                Ok((s, skipped)) if skipped.is_empty() => (s, None),
                Ok((s, skipped)) => (
                    s,
                    Some(format!("settings: could not read {} in {}; using the default", skipped.join(", "), file.display())),
                ),
                Err(e) => {
                    let aside = file.with_extension("json.damaged");
                    let kept = std::fs::rename(&file, &aside).is_ok();
                    let note = if kept { format!("; kept it as {}", aside.display()) } else { String::new() };
                    (Self::default(), Some(format!("settings file {} is damaged ({e}); using defaults{note}", file.display())))
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Self::default(), None),
            Err(e) => (Self::default(), Some(format!("cannot read {}: {e}; using defaults", file.display()))),
        }
    }

    /// Parses a settings file, migrating older fields: the boolean
    /// `one_dit_at_a_time` became `memory_plan` (true → one DiT at a time).
    /// Fields whose value cannot be read (a newer version's choice, a hand
    /// edit) keep their defaults and are returned by name.
    fn from_json(text: &str) -> serde_json::Result<(Self, Vec<String>)> {
        let mut value: serde_json::Value = serde_json::from_str(text)?;
        if let Some(map) = value.as_object_mut() {
            if let Some(old) = map.remove("one_dit_at_a_time") {
                if old.as_bool() == Some(true) && !map.contains_key("memory_plan") {
                    map.insert("memory_plan".into(), serde_json::to_value(MemoryPlan::OneDitAtATime)?);
                }
            }
        }
        if let Ok(s) = serde_json::from_value(value.clone()) {
            return Ok((s, Vec::new()));
        }
        let serde_json::Value::Object(fields) = value else {
            return serde_json::from_value(value).map(|s| (s, Vec::new()));
        };
        // Field by field over the defaults: each value is kept if the
        // settings still read with it.
        let mut merged = serde_json::to_value(Settings::default())?;
        let mut skipped = Vec::new();
        for (key, v) in fields {
            let mut candidate = merged.clone();
            if let Some(map) = candidate.as_object_mut() {
                map.insert(key.clone(), v);
            }
            if serde_json::from_value::<Settings>(candidate.clone()).is_ok() {
                merged = candidate;
            } else {
                skipped.push(key);
            }
        }
        serde_json::from_value(merged).map(|s| (s, skipped))
    }

    pub fn save(&self, paths: &Paths) -> Result<()> {
        std::fs::create_dir_all(&paths.data_dir)
            .with_context(|| format!("cannot create {}", paths.data_dir.display()))?;
        let json = serde_json::to_vec_pretty(self)?;
        zimage_engine::metadata::write_file_atomic(&paths.settings_file(), &json)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {

    /// A LoRA path is refused at once when it is missing, a folder, a
    /// second copy of one in the list, or no LoRA at all (a picture chosen
    /// by mistake was listed, then failed to apply).
    #[test]
    fn a_lora_must_be_an_existing_lora_file_not_yet_listed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("style.safetensors");
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/lora/tiny_turbo_lora.safetensors");
        std::fs::copy(fixture, &file).unwrap();
        let listed = super::LoraSetting { path: file.clone(), strength: 1.0, enabled: true };
        assert_eq!(super::lora_refusal(&file, &[]), None);
        let picture = dir.path().join("grid.png");
        std::fs::write(&picture, b"\x89PNG\r\n\x1a\n not a LoRA at all").unwrap();
        let not_lora = super::lora_refusal(&picture, &[]).unwrap();
        assert!(not_lora.contains("grid.png") && not_lora.contains("not a valid safetensors file"), "{not_lora}");
        assert!(!not_lora.contains('\n'));
        let again = super::lora_refusal(&file, std::slice::from_ref(&listed)).unwrap();
        assert!(again.ends_with("is already in the list"), "{again}");
        let missing = super::lora_refusal(&dir.path().join("styel.safetensors"), &[]).unwrap();
        assert!(missing.ends_with("styel.safetensors: no such file"), "{missing}");
        let folder = super::lora_refusal(dir.path(), &[]).unwrap();
        assert!(folder.ends_with("is a folder; choose the LoRA's .safetensors file"), "{folder}");
    }

    /// `~` in a typed path is the home folder; anything else is kept.
    #[test]
    fn a_typed_tilde_is_the_home_folder() {
        let home = directories::BaseDirs::new().unwrap().home_dir().display().to_string();
        assert_eq!(typed_path("  ~/models/Z-Image-Turbo "), format!("{home}/models/Z-Image-Turbo"));
        assert_eq!(typed_path("~"), home);
        assert_eq!(typed_path("~other/x"), "~other/x", "another user's home is left to the loader's error");
        assert_eq!(typed_path("/abs/path"), "/abs/path");
        assert_eq!(typed_path("demo-turbo"), "demo-turbo");
        assert_eq!(typed_path("  "), "");
        // Pasted: quoted, or a file manager's URI.
        assert_eq!(typed_path("'/my models/Z-Image'"), "/my models/Z-Image");
        assert_eq!(typed_path("\"~/m\""), format!("{home}/m"));
        assert_eq!(typed_path("file:///my%20models/Z-Image%C3%A9"), "/my models/Z-Imageé");
        assert_eq!(typed_path("file:///odd%zz"), "/odd%zz");
    }

    use super::*;

    #[test]
    fn settings_round_trip_and_tolerate_damage() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::at(dir.path().join("nested"));
        assert_eq!(Settings::load(&paths).0, Settings::default());
        let s = Settings { turbo_model: Some("/models/turbo".into()), width: 768, live: false, ..Settings::default() };
        s.save(&paths).unwrap();
        let (back, warn) = Settings::load(&paths);
        assert_eq!(back, s);
        assert!(warn.is_none());
        std::fs::write(paths.settings_file(), "{ not json").unwrap();
        let (back, warn) = Settings::load(&paths);
        assert_eq!(back, Settings::default());
        assert!(warn.unwrap().contains("damaged"));
        assert!(!paths.settings_file().exists(), "the damaged file is kept aside, not overwritten by the next save");
        assert_eq!(std::fs::read_to_string(paths.settings_file().with_extension("json.damaged")).unwrap(), "{ not json");
        // One value this version cannot read costs that value only.
        std::fs::write(paths.settings_file(), r#"{"width": 640, "live_draft": "sometimes", "seed": "x", "live": false}"#)
            .unwrap();
        let (back, warn) = Settings::load(&paths);
        assert_eq!((back.width, back.live, back.live_draft, back.seed), (640, false, Settings::default().live_draft, 42));
        let warn = warn.unwrap();
        assert!(warn.contains("live_draft") && warn.contains("seed") && !warn.contains("width"), "{warn}");
        // Older files with fewer fields still load.
        std::fs::write(paths.settings_file(), r#"{"width": 320}"#).unwrap();
        assert_eq!(Settings::load(&paths).0.width, 320);
    }

    #[test]
    fn the_old_one_dit_boolean_becomes_a_memory_plan() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::at(dir.path());
        let load = |json: &str| {
            std::fs::write(paths.settings_file(), json).unwrap();
            let (s, warn) = Settings::load(&paths);
            assert!(warn.is_none(), "{warn:?}");
            s
        };
        assert_eq!(load(r#"{"one_dit_at_a_time": true, "width": 320}"#).memory_plan, MemoryPlan::OneDitAtATime);
        assert_eq!(load(r#"{"one_dit_at_a_time": true, "width": 320}"#).width, 320);
        assert_eq!(load(r#"{"one_dit_at_a_time": false}"#).memory_plan, MemoryPlan::Auto);
        assert_eq!(load(r#"{}"#).memory_plan, MemoryPlan::Auto);
        // A newer file's plan wins over a leftover boolean.
        assert_eq!(load(r#"{"one_dit_at_a_time": true, "memory_plan": "lowest"}"#).memory_plan, MemoryPlan::Lowest);
        // Saved as the plan only.
        let s = Settings { memory_plan: MemoryPlan::KeepAll, ..Settings::default() };
        s.save(&paths).unwrap();
        let text = std::fs::read_to_string(paths.settings_file()).unwrap();
        assert!(text.contains(r#""memory_plan": "keep_all""#) && !text.contains("one_dit"), "{text}");
        assert_eq!(Settings::load(&paths).0, s);
    }

    #[test]
    fn output_dir_prefers_the_configured_folder() {
        let paths = Paths::at("/tmp/data");
        let s = Settings { output_dir: Some("/srv/out".into()), ..Settings::default() };
        assert_eq!(default_output_dir(&s, &paths), PathBuf::from("/srv/out"));
        // Unconfigured: always some folder, even without a Pictures folder.
        assert!(!default_output_dir(&Settings::default(), &paths).as_os_str().is_empty());
    }
}
