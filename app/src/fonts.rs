//! Chinese, Japanese and Korean text in the UI. egui's built-in fonts have
//! no CJK glyphs, and Z-Image is often prompted in Chinese, so the first CJK
//! font found on the system is added as the last fallback of every family
//! (Latin text keeps egui's fonts). Fonts are 5–20 MB: read off the UI thread.

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
    std::fs::read(path).map_err(|e| format!("cannot read the CJK font {}: {e}", path.display()))
}

/// Adds the font as the last fallback of the proportional and monospace families.
pub fn install(ctx: &egui::Context, path: &Path, bytes: Vec<u8>) {
    use egui::epaint::text::{FontInsert, FontPriority, InsertFontFamily};
    let families = [egui::FontFamily::Proportional, egui::FontFamily::Monospace]
        .into_iter()
        .map(|family| InsertFontFamily { family, priority: FontPriority::Lowest })
        .collect();
    let name = format!("cjk:{}", path.display());
    ctx.add_font(FontInsert::new(&name, egui::FontData::from_owned(bytes), families));
}
