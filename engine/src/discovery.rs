//! Finding Z-Image models where users already keep them: the Hugging Face
//! cache (`HF_HUB_CACHE`, `HF_HOME/hub`, `~/.cache/huggingface/hub`), ComfyUI
//! model folders, and paths the user gives. Only headers are read.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::loader::{ModelFiles, ModelOverrides};
use crate::pipeline::ModelKind;
use crate::weights::{KeyLayout, TensorStore};

/// The Hugging Face repositories of the two published models.
pub const HF_REPOS: [(&str, ModelKind); 2] =
    [("Tongyi-MAI/Z-Image-Turbo", ModelKind::Turbo), ("Tongyi-MAI/Z-Image", ModelKind::Base)];

/// One model found on disk.
#[derive(Debug, Clone, Serialize)]
pub struct FoundModel {
    /// What to pass to `--model`.
    pub path: PathBuf,
    /// Where it was found: "hf-cache", "comfyui", "path".
    pub source: String,
    /// "turbo" or "base".
    pub kind: String,
    /// Total size of its weight files in bytes.
    pub bytes: u64,
    /// dtype most of the DiT is stored in.
    pub dtype: String,
    /// Memory the DiT's weights need kept in fp8, as bf16 and as f32
    /// (`None` when its files could not be read).
    pub dit_memory: Option<crate::fp8::MemoryEstimate>,
    /// Empty when the model is complete and its headers check out.
    pub problems: Vec<String>,
}

impl FoundModel {
    pub fn complete(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The Hugging Face hub cache folder, as huggingface_hub resolves it.
pub fn hf_cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    directories::BaseDirs::new().map(|b| b.home_dir().join(".cache").join("huggingface").join("hub"))
}

/// Snapshot folders of `repo` in the cache, the one `refs/main` names first.
pub fn hf_snapshots(cache: &Path, repo: &str) -> Vec<PathBuf> {
    let dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let main = std::fs::read_to_string(dir.join("refs").join("main")).ok().map(|s| s.trim().to_string());
    let mut snaps: Vec<PathBuf> = std::fs::read_dir(dir.join("snapshots"))
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_dir()).collect())
        .unwrap_or_default();
    snaps.sort();
    if let Some(i) = main.and_then(|m| snaps.iter().position(|p| p.file_name().is_some_and(|n| *n == *m))) {
        let current = snaps.remove(i);
        snaps.insert(0, current);
    }
    snaps
}

/// Usual ComfyUI installation roots, plus `$COMFYUI_PATH`.
pub fn comfyui_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Some(p) = std::env::var_os("COMFYUI_PATH") {
        roots.push(PathBuf::from(p));
    }
    if let Some(home) = directories::BaseDirs::new().map(|b| b.home_dir().to_path_buf()) {
        for sub in ["ComfyUI", "comfyui", "Documents/ComfyUI", "AI/ComfyUI", "stable-diffusion/ComfyUI"] {
            roots.push(home.join(sub));
        }
    }
    roots
}

/// Checks a model path completely (files, headers, names and shapes) without
/// loading weights.
pub fn inspect(path: &Path, source: &str) -> FoundModel {
    let mut found = FoundModel {
        path: path.to_path_buf(),
        source: source.into(),
        kind: "?".into(),
        bytes: 0,
        dtype: "?".into(),
        dit_memory: None,
        problems: Vec::new(),
    };
    let files = match ModelFiles::locate(path, &ModelOverrides::default()) {
        Ok(f) => f,
        Err(e) => {
            found.problems.push(e.to_string());
            return found;
        }
    };
    found.kind = ModelKind::from_shift(files.shift).name().into();
    for component in [&files.dit, &files.text_encoder, &files.vae] {
        found.bytes += component.files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum::<u64>();
    }
    match TensorStore::open_files(&files.dit.files) {
        Ok(store) => {
            found.dtype = store.main_dtype().map(|d| d.name().to_string()).unwrap_or_default();
            found.dit_memory = Some(store.memory_estimate());
            if let Err(e) = KeyLayout::detect_dit(&store) {
                found.problems.push(e.to_string());
            }
        }
        Err(e) => found.problems.push(e.to_string()),
    }
    for (name, component) in [("text encoder", &files.text_encoder), ("VAE", &files.vae)] {
        if let Err(e) = TensorStore::open_files(&component.files) {
            found.problems.push(format!("{name}: {e}"));
        }
    }
    found
}

/// Every Z-Image model in the HF cache, ComfyUI folders and `extra` paths.
pub fn discover(extra: &[PathBuf]) -> Vec<FoundModel> {
    let mut out = Vec::new();
    if let Some(cache) = hf_cache_dir() {
        for (repo, _) in HF_REPOS {
            if let Some(snap) = hf_snapshots(&cache, repo).into_iter().next() {
                out.push(inspect(&snap, "hf-cache"));
            }
        }
    }
    for root in comfyui_roots() {
        let dir = root.join("models").join("diffusion_models");
        let Ok(rd) = std::fs::read_dir(&dir) else { continue };
        let mut files: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        for f in files {
            let name = f.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
            if name.ends_with(".safetensors")
                && (name.contains("z_image") || name.contains("z-image") || name.contains("zimage"))
            {
                out.push(inspect(&f, "comfyui"));
            }
        }
    }
    for p in extra {
        out.push(inspect(p, "path"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_model_in_a_hub_cache_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("models--Tongyi-MAI--Z-Image-Turbo");
        let snap = repo.join("snapshots").join("abc123");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123").unwrap();
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-turbo");
        copy(&fixtures, &snap);
        assert_eq!(hf_snapshots(tmp.path(), "Tongyi-MAI/Z-Image-Turbo"), vec![snap.clone()]);
        let found = inspect(&snap, "hf-cache");
        assert!(found.complete(), "{:?}", found.problems);
        assert_eq!(found.kind, "turbo");
        assert_eq!(found.dtype, "bf16");
        assert!(found.bytes > 1_000_000);
        let memory = found.dit_memory.expect("DiT memory estimate");
        assert_eq!(memory.bf16_bytes, memory.stored_bytes, "the fixture DiT is stored in bf16");
        assert_eq!(memory.f32_bytes, 2 * memory.bf16_bytes);

        std::fs::remove_file(snap.join("transformer/diffusion_pytorch_model-00002-of-00002.safetensors")).unwrap();
        let broken = inspect(&snap, "hf-cache");
        assert!(broken.problems.iter().any(|p| p.contains("shard 2 of 2")), "{:?}", broken.problems);
    }

    fn copy(src: &Path, dst: &Path) {
        std::fs::create_dir_all(dst).unwrap();
        for e in std::fs::read_dir(src).unwrap() {
            let p = e.unwrap().path();
            let t = dst.join(p.file_name().unwrap());
            if p.is_dir() {
                copy(&p, &t)
            } else {
                std::fs::copy(&p, &t).unwrap();
            }
        }
    }
}
