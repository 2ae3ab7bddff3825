//! Fallback fonts for what egui's built-in fonts lack. Chinese, Japanese and
//! Korean: Z-Image is often prompted in Chinese, so the first CJK font found
//! on the system is added as a fallback of every family. Symbols and other
//! scripts (arrows, maths, Greek beyond the basics, Hebrew, Arabic, ...): a
//! wide-coverage font (DejaVu Sans, Noto Sans, Segoe UI Symbol) before it.
//! Latin text keeps egui's fonts. Fonts are 1–20 MB: read off the UI thread.

use std::path::{Path, PathBuf};

/// Where the common CJK fonts live on Linux, macOS and Windows, best first.
const CANDIDATES: [&str; 16] = [
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJKsc-Regular.otf",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/wqy-microhei/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/usr/share/fonts/truetype/arphic/uming.ttc",
    "/System/Library/Fonts/PingFang.ttc",
    "/System/Library/Fonts/Hiragino Sans GB.ttc",
    "/System/Library/Fonts/STHeiti Light.ttc",
    "/Library/Fonts/Arial Unicode.ttf",
    "C:\\Windows\\Fonts\\msyh.ttc",
    "C:\\Windows\\Fonts\\simsun.ttc",
    "C:\\Windows\\Fonts\\malgun.ttf",
];

/// Wide-coverage fonts with arrows and symbols on Linux, macOS and Windows, best first.
const SYMBOL_CANDIDATES: [&str; 9] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial Unicode.ttf",
    "/System/Library/Fonts/Apple Symbols.ttf",
    "C:\\Windows\\Fonts\\seguisym.ttf",
];

/// A fallback font to add, and which kind it is (for the messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    Symbols,
    Cjk,
}

impl Fallback {
    /// What text shows as boxes without it.
    pub fn without(self) -> &'static str {
        match self {
            Fallback::Symbols => "arrows and symbols show as boxes (e.g. install fonts-dejavu-core)",
            Fallback::Cjk => "Chinese text shows as boxes (e.g. install fonts-noto-cjk)",
        }
    }
}

/// The fallback fonts found, in the order to add them, with their bytes
/// (or why they could not be read), and the kinds not found.
pub type FoundFonts = (Vec<(Fallback, PathBuf, Result<Vec<u8>, String>)>, Vec<Fallback>);

/// Finds and reads the fallback fonts (slow: call off the UI thread).
pub fn find_and_read() -> FoundFonts {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for (kind, path) in [(Fallback::Symbols, find_symbol_font()), (Fallback::Cjk, find_cjk_font())] {
        match path {
            Some(p) => {
                let bytes = read(&p);
                found.push((kind, p, bytes));
            }
            None => missing.push(kind),
        }
    }
    (found, missing)
}

/// The first wide-coverage font present, or what fontconfig names for the
/// arrow → (U+2192), a character egui's fonts lack.
pub fn find_symbol_font() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ZIMAGE_SYMBOL_FONT").map(PathBuf::from) {
        return Some(p).filter(|p| p.is_file());
    }
    SYMBOL_CANDIDATES.iter().map(PathBuf::from).find(|p| p.is_file()).or_else(|| {
        // fontconfig sorts by coverage of the asked character set.
        let out = std::process::Command::new("fc-match").args(["-f", "%{file}", ":charset=2192"]).output().ok()?;
        Some(PathBuf::from(String::from_utf8(out.stdout).ok()?.trim())).filter(|p| p.is_file())
    })
}

/// The first CJK font file present, or what fontconfig names for Chinese.
pub fn find_cjk_font() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ZIMAGE_CJK_FONT").map(PathBuf::from) {
        return Some(p).filter(|p| p.is_file());
    }
    CANDIDATES.iter().map(PathBuf::from).find(|p| p.is_file()).or_else(fontconfig_cjk)
}

/// `fc-match :lang=zh` where fontconfig exists (other distributions' paths).
fn fontconfig_cjk() -> Option<PathBuf> {
    let out = std::process::Command::new("fc-match").args(["-f", "%{file}", ":lang=zh"]).output().ok()?;
    let path = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    // fontconfig answers with its default font when nothing matches; only
    // accept files whose names say CJK.
    let name = path.file_name()?.to_string_lossy().to_lowercase();
    let cjk = ["cjk", "wqy", "droidsansfallback", "uming", "ukai", "han", "hei", "song", "ming", "gothic"];
    (path.is_file() && cjk.iter().any(|k| name.contains(k))).then_some(path)
}

/// Reads the font file (its first face).
pub fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the font {}: {e}", path.display()))
}

/// Adds the font as the last fallback of the proportional and monospace
/// families (after those added before it).
pub fn install(ctx: &egui::Context, path: &Path, bytes: Vec<u8>) {
    use egui::epaint::text::{FontInsert, FontPriority, InsertFontFamily};
    let families = [egui::FontFamily::Proportional, egui::FontFamily::Monospace]
        .into_iter()
        .map(|family| InsertFontFamily { family, priority: FontPriority::Lowest })
        .collect();
    let name = format!("fallback:{}", path.display());
    ctx.add_font(FontInsert::new(&name, egui::FontData::from_owned(bytes), families));
}
