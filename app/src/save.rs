//! Saving finals: PNG with the A1111 `parameters` and `zimage` JSON chunks,
//! written atomically by the engine's metadata module.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use zimage_engine::metadata::{self, GenerationMetadata};
use zimage_engine::preview::RgbImage;

/// A file name that does not exist yet in `dir`: `zimage-<kind>-<seed>[-n].png`.
pub fn unique_name(dir: &Path, kind: &str, seed: u64) -> PathBuf {
    let base = format!("zimage-{kind}-{seed}");
    let mut path = dir.join(format!("{base}.png"));
    let mut n = 2;
    while path.exists() {
        path = dir.join(format!("{base}-{n}.png"));
        n += 1;
    }
    path
}

/// Saves into `dir` (created if missing) under a fresh name; returns the path.
pub fn save_into(dir: &Path, image: &RgbImage, meta: &GenerationMetadata) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("cannot create the folder {}: {}", dir.display(), plain_io(&e)))?;
    let path = unique_name(dir, &meta.model_kind, meta.seed);
    save_to(&path, image, meta)?;
    Ok(path)
}

/// Saves to exactly `path` (replacing it atomically if it exists).
pub fn save_to(path: &Path, image: &RgbImage, meta: &GenerationMetadata) -> Result<()> {
    metadata::save_png(path, &image.pixels, image.width, image.height, meta).with_context(|| "nothing was lost: the image is still in the history".to_string())?;
    Ok(())
}

fn plain_io(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        std::io::ErrorKind::StorageFull => "no space left on device".into(),
        std::io::ErrorKind::ReadOnlyFilesystem => "read-only file system".into(),
        _ => e.to_string(),
    }
}

/// One line for the status bar: the outer context first, then the cause.
pub fn one_line_error(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = e.chain().map(|c| c.to_string()).collect();
    // anyhow's chain is outermost first; show the cause, then the reassurance.
    if parts.len() > 1 {
        let outer = parts.remove(0);
        parts.push(outer);
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img() -> RgbImage {
        RgbImage { width: 2, height: 2, pixels: vec![9; 12] }
    }

    #[test]
    fn saves_unique_files_with_round_tripping_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let meta = GenerationMetadata { prompt: "ein Fuchs 🦊".into(), seed: 5, model_kind: "turbo".into(), steps: 8, width: 2, height: 2, ..Default::default() };
        let a = save_into(&dir.path().join("out"), &img(), &meta).unwrap();
        let b = save_into(&dir.path().join("out"), &img(), &meta).unwrap();
        assert_ne!(a, b);
        assert!(b.file_name().unwrap().to_string_lossy().ends_with("-2.png"));
        assert_eq!(metadata::read_png_metadata_file(&a).unwrap(), meta);
    }

    #[test]
    fn unwritable_folder_gives_one_clear_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-folder");
        std::fs::write(&file, "x").unwrap();
        let err = save_into(&file.join("sub"), &img(), &GenerationMetadata::default()).unwrap_err();
        let line = one_line_error(&err);
        assert!(line.contains("cannot create the folder"), "{line}");
        assert!(!line.contains('\n'));
        // Saving onto a path whose parent is a file fails and leaves nothing behind.
        let err = save_to(&file.join("x.png"), &img(), &GenerationMetadata::default()).unwrap_err();
        let line = one_line_error(&err);
        assert!(line.contains("nothing was lost"), "{line}");
    }
}
