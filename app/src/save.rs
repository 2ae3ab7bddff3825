//! Saving finals: PNG with the A1111 `parameters` and `zimage` JSON chunks,
//! written atomically by the engine's metadata module.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use zimage_engine::metadata::{self, GenerationMetadata};
use zimage_engine::preview::RgbImage;

/// A file name that does not exist yet in `dir`:
/// `zimage-<kind>-<seed>[-<prompt words>][-n].png`. The prompt's first words
/// tell five finals of one seed apart in a file manager.
pub fn unique_name(dir: &Path, kind: &str, seed: u64, prompt: &str) -> PathBuf {
    let words = prompt_slug(prompt);
    let base = if words.is_empty() { format!("zimage-{kind}-{seed}") } else { format!("zimage-{kind}-{seed}-{words}") };
    let mut path = dir.join(format!("{base}.png"));
    let mut n = 2;
    while path.exists() {
        path = dir.join(format!("{base}-{n}.png"));
        n += 1;
    }
    path
}

/// Longest prompt part of a file name, in characters: long enough for a
/// subject, short enough to stay far below every file system's name limit
/// (255 bytes; a CJK character takes 3).
const SLUG_CHARS: usize = 48;

/// The prompt's first words, lower-case, joined by `-`: letters and digits of
/// any script are kept, everything else (punctuation, path separators,
/// characters Windows forbids) separates words. Cut at a word boundary.
pub fn prompt_slug(prompt: &str) -> String {
    let mut slug = String::new();
    let mut chars = 0;
    for word in prompt.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
        let word = word.to_lowercase();
        let len = word.chars().count();
        let sep = usize::from(!slug.is_empty());
        if chars + sep + len > SLUG_CHARS {
            if slug.is_empty() {
                // One very long word: its start is still better than nothing.
                slug = word.chars().take(SLUG_CHARS).collect();
            }
            break;
        }
        if sep == 1 {
            slug.push('-');
        }
        slug.push_str(&word);
        chars += sep + len;
    }
    slug
}

/// Saves into `dir` (created if missing) under a fresh name; returns the path.
pub fn save_into(dir: &Path, image: &RgbImage, meta: &GenerationMetadata) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("cannot create the folder {}: {}", dir.display(), zimage_engine::error::plain_cause(&e)))?;
    let path = unique_name(dir, &meta.model_kind, meta.seed, &meta.prompt);
    save_to(&path, image, meta)?;
    Ok(path)
}

/// Saves to exactly `path` (replacing it atomically if it exists).
pub fn save_to(path: &Path, image: &RgbImage, meta: &GenerationMetadata) -> Result<()> {
    metadata::save_png(path, &image.pixels, image.width, image.height, meta).with_context(|| "nothing was lost: the image is still in the history".to_string())?;
    Ok(())
}

/// Opens `dir` (created if missing) in the system's file manager:
/// `$ZIMAGE_OPEN_FOLDER` when set (a program given the folder), else
/// `xdg-open` on Linux, `open` on macOS, `explorer` on Windows. Returns at
/// once: on Linux the opener runs in the background of a shell that exits.
pub fn open_folder(dir: &Path) -> Result<()> {
    open_folder_with(dir, std::env::var_os("ZIMAGE_OPEN_FOLDER").map(PathBuf::from))
}

/// [`open_folder`] with the opener given (`None`: the platform's).
pub fn open_folder_with(dir: &Path, opener: Option<PathBuf>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("cannot create the folder {}: {}", dir.display(), zimage_engine::error::plain_cause(&e)))?;
    let mut command = match (&opener, cfg!(target_os = "linux")) {
        (Some(program), _) => {
            let mut c = std::process::Command::new(program);
            c.arg(dir);
            c
        }
        (None, true) => {
            let mut c = std::process::Command::new("sh");
            c.args(["-c", "command -v xdg-open >/dev/null || exit 127; xdg-open \"$1\" >/dev/null 2>&1 &", "sh"]).arg(dir);
            c
        }
        (None, false) => {
            let mut c = std::process::Command::new(if cfg!(target_os = "macos") { "open" } else { "explorer" });
            c.arg(dir);
            c
        }
    };
    let name = opener.as_deref().map_or_else(|| "xdg-open".to_string(), |p| p.display().to_string());
    let status = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(|e| anyhow::anyhow!("could not run {name}: {}", zimage_engine::error::plain_cause(&e)))?;
    match status.code() {
        Some(0) => Ok(()),
        // explorer.exe exits with 1 even when it opened the folder.
        Some(1) if cfg!(windows) => Ok(()),
        Some(127) => Err(anyhow::anyhow!("{name} is not installed; the folder is {}", dir.display())),
        _ => Err(anyhow::anyhow!("{name} could not open {} ({status})", dir.display())),
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
        assert_eq!(a.file_name().unwrap(), "zimage-turbo-5-ein-fuchs.png");
        assert_eq!(b.file_name().unwrap(), "zimage-turbo-5-ein-fuchs-2.png");
        assert_eq!(metadata::read_png_metadata_file(&a).unwrap(), meta);
    }

    #[test]
    fn file_names_carry_the_prompts_first_words() {
        assert_eq!(prompt_slug("A fox, in the snow: 35mm/f1.4!"), "a-fox-in-the-snow-35mm-f1-4");
        assert_eq!(prompt_slug("雪の中の狐"), "雪の中の狐");
        assert_eq!(prompt_slug("  ...  "), "");
        assert_eq!(prompt_slug("../../etc\\passwd"), "etc-passwd");
        let long = prompt_slug("a very detailed concept painting of an ancient overgrown temple at dawn");
        assert_eq!(long, "a-very-detailed-concept-painting-of-an-ancient");
        assert!(long.chars().count() <= SLUG_CHARS);
        let one_word = prompt_slug(&"x".repeat(300));
        assert_eq!(one_word.len(), SLUG_CHARS);
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(unique_name(dir.path(), "base", 7, "").file_name().unwrap(), "zimage-base-7.png");
        let cjk = unique_name(dir.path(), "base", 7, &"狐".repeat(200));
        assert!(cjk.file_name().unwrap().len() < 255, "{}", cjk.display());
    }

    #[cfg(unix)]
    #[test]
    fn open_folder_runs_the_opener_on_the_folder_and_says_when_it_cannot() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("new").join("outputs");
        // `ls DIR` succeeds only for an existing folder: it was created and passed.
        open_folder_with(&target, Some("ls".into())).unwrap();
        assert!(target.is_dir(), "created first");
        let err = open_folder_with(&target, Some("/no/such/opener".into())).unwrap_err();
        let line = one_line_error(&err);
        assert!(line.starts_with("could not run /no/such/opener:") && !line.contains('\n'), "{line}");
        let line = one_line_error(&open_folder_with(&target, Some("false".into())).unwrap_err());
        assert!(line.starts_with("false could not open") && line.contains("outputs"), "{line}");
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
