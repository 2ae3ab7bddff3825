//! Generation metadata stored in PNG files, and safe PNG writing.
//!
//! Every image Z-Image Studio writes is an RGB8 PNG with two uncompressed
//! UTF-8 `iTXt` chunks placed before the image data:
//!
//! * `parameters`: the Automatic1111/Forge "infotext" ([`a1111_parameters`]),
//!   which A1111, Forge, ComfyUI-Manager, Civitai, InvokeAI's importer and most
//!   image browsers show and parse;
//! * `zimage`: the JSON of [`GenerationMetadata`], the exact record this app
//!   reads back ([`read_png_metadata`]).
//!
//! Files are written atomically ([`write_file_atomic`], [`save_png`]): a
//! temporary file in the target directory, `fsync`, then a rename over the
//! target, so a failure never leaves a partial image at the target path.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// `iTXt` keyword of the A1111-style text.
pub const PARAMETERS_KEYWORD: &str = "parameters";
/// `iTXt` keyword of the JSON [`GenerationMetadata`].
pub const ZIMAGE_KEYWORD: &str = "zimage";

/// Everything needed to reproduce (or refine) an image. Plain data; unknown
/// JSON fields are ignored and missing ones take their defaults, so files
/// written by older or newer versions still read.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(default)]
pub struct GenerationMetadata {
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub steps: u32,
    /// Z-Image guidance `g` in `u = u_pos + g (u_pos - u_neg)`; 0 = no CFG.
    pub guidance: f32,
    /// CFG renormalisation strength; 0 = off.
    pub cfg_normalization: f32,
    pub cfg_truncation: f32,
    pub width: u32,
    pub height: u32,
    /// Model name or path.
    pub model: String,
    /// "turbo", "base", or another variant name.
    pub model_kind: String,
    pub scheduler_shift: f32,
    /// Source image of an img2img run.
    pub init_image: Option<String>,
    /// img2img denoising strength.
    pub strength: Option<f32>,
    /// Id of the image this one was refined from.
    pub parent: Option<String>,
    /// Application and version, e.g. "Z-Image Studio 0.1.0".
    pub app: String,
    /// Creation time (e.g. [`utc_timestamp_now`]); may be empty.
    pub created: String,
    /// LoRAs applied to the DiT, in order.
    pub loras: Vec<LoraRef>,
    /// Noise on the prompt's features in the first steps (`variety`); 0 = off.
    pub variety: f32,
}

/// A LoRA used for an image: A1111 writes it as `<lora:name:strength>` in
/// the prompt and `name: hash` under `Lora hashes`, which Civitai matches.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(default)]
pub struct LoraRef {
    /// File name without directory or extension.
    pub name: String,
    pub strength: f32,
    /// A1111's short LoRA hash (first 12 hex digits of the sha256 of the
    /// safetensors data after the header); see `lora::short_hash`.
    pub hash: Option<String>,
}

/// Errors of this module; every message is one line of plain words.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("image size {width}x{height} is not valid (each side must be 1 to 2147483647 pixels)")]
    InvalidSize { width: u32, height: u32 },
    #[error("image data has {actual} bytes but a {width}x{height} RGB image needs {expected}")]
    BufferSize { width: u32, height: u32, expected: usize, actual: usize },
    #[error("could not encode the PNG: {0}")]
    Encode(String),
    #[error("not a PNG file")]
    NotPng,
    #[error("not a PNG or JPEG file")]
    NotAnImage,
    #[error("the JPEG has no generation metadata (no XMP packet with Z-Image Studio's or A1111's parameters)")]
    NoJpegMetadata,
    #[error("the PNG file is truncated")]
    Truncated,
    #[error("the PNG file is damaged: {0}")]
    Corrupt(String),
    #[error("the PNG has no generation metadata (no 'zimage' or 'parameters' text, no XMP)")]
    NoMetadata,
    #[error("the generation metadata is not valid: {0}")]
    InvalidMetadata(String),
    #[error("cannot write {}: {cause}", path.display())]
    Write { path: PathBuf, cause: String },
    #[error("cannot read {}: {cause}", path.display())]
    Read { path: PathBuf, cause: String },
}

// ---------------------------------------------------------------------------
// A1111 "parameters" text
// ---------------------------------------------------------------------------

/// The A1111/Forge infotext for `meta`:
///
/// ```text
/// <prompt>
/// Negative prompt: <negative prompt>          (omitted when empty)
/// Steps: 8, Sampler: Euler, Schedule type: Simple, CFG scale: 1, Seed: 42, Size: 1024x1024, Model: z_image_turbo, Denoising strength: 0.6, Shift: 3, Version: Z-Image Studio 0.1.0
/// ```
///
/// **CFG scale.** Z-Image's guidance `g` is applied as
/// `u = u_pos + g (u_pos - u_neg)`, while A1111, Forge and ComfyUI define
/// their CFG scale `s` as `u = u_neg + s (u_pos - u_neg)`. The two agree when
/// `s = g + 1`, so `CFG scale` holds `g + 1`: typing that value into those
/// tools (e.g. CFG 1 for Turbo's `g = 0`, which they also treat as "no
/// CFG") gives the same update rule. [`parse_a1111_parameters`] subtracts
/// the 1 again. No extra `Guidance` key is written, to avoid two
/// conflicting numbers; the exact `g` is in the `zimage` JSON chunk.
///
/// Other choices:
/// * `Sampler: Euler, Schedule type: Simple` + `Shift` describe the
///   flow-matching Euler scheduler with time shift (ComfyUI: `euler`,
///   `simple`, ModelSamplingAuraFlow `shift`).
/// * `Model` is the file or repository name without directories or
///   extension (as A1111 does), so no local paths leak into shared images.
/// * `Denoising strength` only for img2img; `CFG normalization` and
///   `Variety` only when non-zero and `CFG truncation` only when not 1 (their
///   "off" values). Tools that do not know `Variety` skip it, as A1111 skips
///   unknown keys.
/// * Values containing `,`, `:` or a line break are JSON-quoted, as A1111 does.
pub fn a1111_parameters(meta: &GenerationMetadata) -> String {
    let mut fields: Vec<(&str, String)> = vec![
        ("Steps", meta.steps.to_string()),
        ("Sampler", "Euler".into()),
        ("Schedule type", "Simple".into()),
        ("CFG scale", fmt_num(meta.guidance as f64 + 1.0)),
        ("Seed", meta.seed.to_string()),
        ("Size", format!("{}x{}", meta.width, meta.height)),
    ];
    let model = model_display_name(&meta.model);
    if !model.is_empty() {
        fields.push(("Model", model));
    }
    if let Some(s) = meta.strength {
        fields.push(("Denoising strength", fmt_num(s as f64)));
    }
    if meta.cfg_normalization != 0.0 {
        fields.push(("CFG normalization", fmt_num(meta.cfg_normalization as f64)));
    }
    if meta.cfg_truncation != 1.0 {
        fields.push(("CFG truncation", fmt_num(meta.cfg_truncation as f64)));
    }
    if meta.variety != 0.0 {
        fields.push(("Variety", fmt_num(meta.variety as f64)));
    }
    fields.push(("Shift", fmt_num(meta.scheduler_shift as f64)));
    let hashes: Vec<String> =
        meta.loras.iter().filter_map(|l| l.hash.as_ref().map(|h| format!("{}: {h}", l.name))).collect();
    if !hashes.is_empty() {
        fields.push(("Lora hashes", hashes.join(", ")));
    }
    if !meta.app.is_empty() {
        fields.push(("Version", meta.app.clone()));
    }

    let mut out = String::new();
    let tags: String =
        meta.loras.iter().map(|l| format!(" <lora:{}:{}>", l.name, fmt_num(l.strength as f64))).collect();
    let prompt = if meta.prompt.is_empty() { tags.trim_start().to_string() } else { format!("{}{tags}", meta.prompt) };
    if !prompt.is_empty() {
        out.push_str(&prompt);
        out.push('\n');
    }
    if !meta.negative_prompt.is_empty() {
        out.push_str("Negative prompt: ");
        out.push_str(&meta.negative_prompt);
        out.push('\n');
    }
    let params: Vec<String> = fields.into_iter().map(|(k, v)| format!("{k}: {}", quote_value(&v))).collect();
    out.push_str(&params.join(", "));
    out
}

/// Best-effort reading of A1111/Forge infotext (as written by
/// [`a1111_parameters`] or by other tools): prompt, negative prompt, steps,
/// CFG scale (stored as `guidance = CFG - 1`), seed, size, model, denoising
/// strength, shift, CFG normalization/truncation, variety and version (into `app`).
/// Unknown keys and unreadable values are skipped; fields not present keep
/// their defaults (`cfg_truncation` defaults to 1). Fails only for empty text.
pub fn parse_a1111_parameters(text: &str) -> Result<GenerationMetadata, MetadataError> {
    let text = text.trim_end_matches(['\n', '\r', ' ', '\t']);
    if text.trim().is_empty() {
        return Err(MetadataError::InvalidMetadata("the parameters text is empty".into()));
    }
    let mut lines: Vec<&str> = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)).collect();
    let mut params = Vec::new();
    if let Some(last) = lines.last() {
        let parsed = parse_param_line(last);
        if parsed.len() >= 3 {
            params = parsed;
            lines.pop();
        }
    }

    let mut prompt: Vec<&str> = Vec::new();
    let mut negative: Vec<&str> = Vec::new();
    let mut in_negative = false;
    for line in lines {
        if !in_negative {
            if let Some(rest) = line.trim_start().strip_prefix("Negative prompt:") {
                in_negative = true;
                negative.push(rest.strip_prefix(' ').unwrap_or(rest));
                continue;
            }
            prompt.push(line);
        } else {
            negative.push(line);
        }
    }

    let (prompt, loras) = take_lora_tags(&prompt.join("\n"));
    let mut meta = GenerationMetadata {
        prompt,
        loras,
        negative_prompt: negative.join("\n"),
        cfg_truncation: 1.0,
        ..Default::default()
    };
    for (key, value) in params {
        let v = value.trim();
        match key.as_str() {
            "Steps" => {
                if let Ok(n) = v.parse() {
                    meta.steps = n;
                }
            }
            "CFG scale" => {
                if let Ok(s) = v.parse::<f64>() {
                    meta.guidance = (s - 1.0) as f32;
                }
            }
            "Seed" => {
                if let Ok(s) = v.parse::<u64>() {
                    meta.seed = s;
                } else if let Ok(s) = v.parse::<i64>() {
                    meta.seed = s as u64;
                }
            }
            "Size" => {
                if let Some((w, h)) = v.split_once('x') {
                    if let (Ok(w), Ok(h)) = (w.trim().parse(), h.trim().parse()) {
                        meta.width = w;
                        meta.height = h;
                    }
                }
            }
            "Model" => meta.model = v.to_string(),
            "Denoising strength" => meta.strength = v.parse().ok(),
            "Shift" => {
                if let Ok(s) = v.parse() {
                    meta.scheduler_shift = s;
                }
            }
            "CFG normalization" => {
                if let Ok(s) = v.parse() {
                    meta.cfg_normalization = s;
                }
            }
            "CFG truncation" => {
                if let Ok(s) = v.parse() {
                    meta.cfg_truncation = s;
                }
            }
            "Variety" => {
                if let Ok(s) = v.parse() {
                    meta.variety = s;
                }
            }
            "Version" => meta.app = v.to_string(),
            "Lora hashes" => {
                for pair in v.split(',') {
                    if let Some((name, hash)) = pair.rsplit_once(':') {
                        if let Some(l) = meta.loras.iter_mut().find(|l| l.name == name.trim()) {
                            l.hash = Some(hash.trim().to_string());
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(meta)
}

/// Removes A1111's `<lora:name:strength>` tags (and the space before each)
/// from a prompt; returns the bare prompt and the LoRAs they name.
fn take_lora_tags(prompt: &str) -> (String, Vec<LoraRef>) {
    let mut bare = String::new();
    let mut loras = Vec::new();
    let mut rest = prompt;
    while let Some(start) = rest.find("<lora:") {
        let Some(len) = rest[start..].find('>') else { break };
        let inner = &rest[start + "<lora:".len()..start + len];
        let (name, strength) = match inner.rsplit_once(':') {
            Some((n, s)) => match s.trim().parse::<f32>() {
                Ok(v) => (n, v),
                Err(_) => (inner, 1.0),
            },
            None => (inner, 1.0),
        };
        bare.push_str(rest[..start].strip_suffix(' ').unwrap_or(&rest[..start]));
        loras.push(LoraRef { name: name.trim().to_string(), strength, hash: None });
        rest = &rest[start + len + 1..];
    }
    bare.push_str(rest);
    (bare, loras)
}

/// `Key: value, Key: "quoted, value", ...` → pairs (quoted values unquoted).
/// Stops at the first piece that is not `key: value`.
fn parse_param_line(line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = line;
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        let Some(colon) = rest.find(':') else { break };
        let key = rest[..colon].trim();
        let key_ok = !key.is_empty()
            && key.chars().next().is_some_and(|c| c.is_alphanumeric() || c == '_')
            && key.chars().all(|c| c.is_alphanumeric() || c == '_' || c == ' ' || c == '-' || c == '/');
        if !key_ok {
            break;
        }
        let after = rest[colon + 1..].trim_start();
        let (value, remainder) = if after.starts_with('"') {
            match json_string_prefix(after) {
                Some((v, used)) => (v, &after[used..]),
                None => break,
            }
        } else {
            match after.find(',') {
                Some(i) => (after[..i].trim_end().to_string(), &after[i..]),
                None => (after.trim_end().to_string(), ""),
            }
        };
        out.push((key.to_string(), value));
        match remainder.trim_start().strip_prefix(',') {
            Some(r) => rest = r,
            None => break,
        }
    }
    out
}

/// Parses a JSON string literal at the start of `s`; returns it and the
/// number of bytes it used.
fn json_string_prefix(s: &str) -> Option<(String, usize)> {
    let bytes = s.as_bytes();
    let mut i = 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => {
                let lit = &s[..=i];
                return serde_json::from_str::<String>(lit).ok().map(|v| (v, i + 1));
            }
            _ => i += 1,
        }
    }
    None
}

fn quote_value(v: &str) -> String {
    if v.contains([',', ':', '\n', '\r']) || v.starts_with('"') {
        serde_json::to_string(v).unwrap_or_else(|_| v.to_string())
    } else {
        v.to_string()
    }
}

/// Up to 6 decimals, trailing zeros removed: 5 → "5", 0.6f32 → "0.6".
fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return x.to_string();
    }
    let s = format!("{x:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" || s.is_empty() {
        "0".into()
    } else {
        s.to_string()
    }
}

/// Last path component without a `.safetensors`/`.gguf`/... extension.
fn model_display_name(model: &str) -> String {
    let trimmed = model.trim_end_matches(['/', '\\']);
    let base = trimmed.rsplit(['/', '\\']).next().unwrap_or(trimmed);
    for ext in [".safetensors", ".gguf", ".ckpt", ".pt", ".pth", ".bin"] {
        if let Some(stem) = base.strip_suffix(ext) {
            if !stem.is_empty() {
                return stem.to_string();
            }
        }
    }
    base.to_string()
}

// ---------------------------------------------------------------------------
// PNG encode / decode
// ---------------------------------------------------------------------------

/// Encodes an RGB8 image (`rgb` is row-major, `width * height * 3` bytes) as
/// PNG with the `parameters` and `zimage` iTXt chunks (uncompressed UTF-8),
/// and both again in an XMP packet, which image editors keep ([`crate::xmp`]).
pub fn encode_png(rgb: &[u8], width: u32, height: u32, meta: &GenerationMetadata) -> Result<Vec<u8>, MetadataError> {
    const MAX_SIDE: u32 = i32::MAX as u32;
    if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
        return Err(MetadataError::InvalidSize { width, height });
    }
    let expected = (width as usize)
        .checked_mul(height as usize)
        .and_then(|n| n.checked_mul(3))
        .ok_or(MetadataError::InvalidSize { width, height })?;
    if rgb.len() != expected {
        return Err(MetadataError::BufferSize { width, height, expected, actual: rgb.len() });
    }
    let json = serde_json::to_string(meta).map_err(|e| MetadataError::Encode(format!("metadata to JSON: {e}")))?;
    let params = a1111_parameters(meta);
    let xmp = crate::xmp::packet(&params, &json, &meta.app, &meta.created);

    let mut out = Vec::with_capacity(expected / 2 + params.len() + json.len() + 256);
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.add_itxt_chunk(PARAMETERS_KEYWORD.to_string(), params).map_err(|e| MetadataError::Encode(e.to_string()))?;
        enc.add_itxt_chunk(ZIMAGE_KEYWORD.to_string(), json).map_err(|e| MetadataError::Encode(e.to_string()))?;
        enc.add_itxt_chunk(crate::xmp::PNG_KEYWORD.to_string(), xmp).map_err(|e| MetadataError::Encode(e.to_string()))?;
        let mut writer = enc.write_header().map_err(|e| MetadataError::Encode(e.to_string()))?;
        writer.write_image_data(rgb).map_err(|e| MetadataError::Encode(e.to_string()))?;
        writer.finish().map_err(|e| MetadataError::Encode(e.to_string()))?;
    }
    Ok(out)
}

/// The text chunks of a PNG, in file order: (keyword, text). Reads `tEXt`,
/// `zTXt` and `iTXt` (compressed ones are inflated) anywhere in the file and
/// checks the whole file (CRCs, image data stream, end chunk).
pub fn png_text_chunks(bytes: &[u8]) -> Result<Vec<(String, String)>, MetadataError> {
    const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    if bytes.len() < 8 {
        return Err(if SIGNATURE.starts_with(bytes) && !bytes.is_empty() {
            MetadataError::Truncated
        } else {
            MetadataError::NotPng
        });
    }
    if bytes[..8] != SIGNATURE {
        return Err(MetadataError::NotPng);
    }
    let decoder = png::Decoder::new(Cursor::new(bytes));
    let mut reader = decoder.read_info().map_err(decode_error)?;
    // Reads (and checks) the rest, collecting text chunks after the image data.
    reader.finish().map_err(decode_error)?;
    let info = reader.info();
    let mut out = Vec::new();
    for c in &info.uncompressed_latin1_text {
        out.push((c.keyword.clone(), c.text.clone()));
    }
    for c in &info.compressed_latin1_text {
        if let Ok(t) = c.get_text() {
            out.push((c.keyword.clone(), t));
        }
    }
    for c in &info.utf8_text {
        if let Ok(t) = c.get_text() {
            out.push((c.keyword.clone(), t));
        }
    }
    Ok(out)
}

fn decode_error(e: png::DecodingError) -> MetadataError {
    match e {
        png::DecodingError::IoError(io) if io.kind() == io::ErrorKind::UnexpectedEof => MetadataError::Truncated,
        png::DecodingError::IoError(io) => MetadataError::Corrupt(one_line(&io.to_string())),
        png::DecodingError::Format(f) => {
            let msg = f.to_string();
            if msg.contains("EOF") || msg.to_ascii_lowercase().contains("unexpected end") {
                MetadataError::Truncated
            } else {
                MetadataError::Corrupt(one_line(&msg))
            }
        }
        other => MetadataError::Corrupt(one_line(&other.to_string())),
    }
}

/// Generation metadata of a PNG given as bytes: the `zimage` JSON chunk if
/// present and valid, otherwise the `parameters` text (iTXt, tEXt or zTXt,
/// as A1111, Forge and others write it) via [`parse_a1111_parameters`],
/// otherwise the same two in the XMP packet (all an editor may have kept).
pub fn read_png_metadata(bytes: &[u8]) -> Result<GenerationMetadata, MetadataError> {
    let chunks = png_text_chunks(bytes)?;
    let mut json_error = None;
    if let Some((_, json)) = chunks.iter().find(|(k, _)| k == ZIMAGE_KEYWORD) {
        match serde_json::from_str::<GenerationMetadata>(json) {
            Ok(meta) => return Ok(meta),
            Err(e) => json_error = Some(e),
        }
    }
    if let Some((_, text)) = chunks.iter().find(|(k, _)| k == PARAMETERS_KEYWORD) {
        return parse_a1111_parameters(text);
    }
    if let Some(meta) = chunks.iter().find(|(k, _)| k == crate::xmp::PNG_KEYWORD).and_then(|(_, x)| from_xmp(x)) {
        return Ok(meta);
    }
    match json_error {
        Some(e) => Err(MetadataError::InvalidMetadata(one_line(&format!("'zimage' JSON: {e}")))),
        None => Err(MetadataError::NoMetadata),
    }
}

/// Generation metadata from an XMP packet: our JSON, else a description
/// that is an A1111 infotext (one with a parameter line, not any caption).
fn from_xmp(xmp: &str) -> Option<GenerationMetadata> {
    let texts = crate::xmp::read_packet(xmp);
    if let Some(meta) = texts.json.and_then(|j| serde_json::from_str(&j).ok()) {
        return Some(meta);
    }
    texts.description.filter(|d| d.contains("Steps: ")).and_then(|d| parse_a1111_parameters(&d).ok())
}

/// Generation metadata of a PNG ([`read_png_metadata`]) or of a JPEG, whose
/// XMP packet an editor may have carried over from our PNG.
pub fn read_image_metadata(bytes: &[u8]) -> Result<GenerationMetadata, MetadataError> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        let xmp = crate::xmp::jpeg_packet(bytes).ok_or(MetadataError::NoJpegMetadata)?;
        return from_xmp(&xmp).ok_or(MetadataError::NoJpegMetadata);
    }
    read_png_metadata(bytes).map_err(|e| match e {
        MetadataError::NotPng => MetadataError::NotAnImage,
        e => e,
    })
}

/// [`read_png_metadata`] of the file at `path`.
pub fn read_png_metadata_file(path: &Path) -> Result<GenerationMetadata, MetadataError> {
    let bytes = fs::read(path)
        .map_err(|e| MetadataError::Read { path: path.to_path_buf(), cause: io_cause(&e, path, false) })?;
    read_png_metadata(&bytes)
}

// ---------------------------------------------------------------------------
// Atomic file writing
// ---------------------------------------------------------------------------

/// Encodes with [`encode_png`] and writes with [`write_file_atomic`].
pub fn save_png(
    path: &Path,
    rgb: &[u8],
    width: u32,
    height: u32,
    meta: &GenerationMetadata,
) -> Result<(), MetadataError> {
    let bytes = encode_png(rgb, width, height, meta)?;
    write_file_atomic(path, &bytes)
}

/// Writes `bytes` to `path` atomically: a temporary file
/// `.{name}.tmp-{pid}-{n}` in the same directory is written, `fsync`ed and
/// renamed over `path`. On any failure the temporary file is removed, an
/// existing file at `path` is left as it was, and the error names `path`
/// and the cause in plain words (permission denied, no space left on the disk,
/// folder does not exist, ...).
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<(), MetadataError> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn write_atomic_with(path: &Path, fill: impl FnOnce(&mut File) -> io::Result<()>) -> Result<(), MetadataError> {
    let fail = |cause: String| MetadataError::Write { path: path.to_path_buf(), cause };
    let (dir, tmp_path, mut file) = create_temp_beside(path)?;
    let result = (|| {
        fill(&mut file)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp_path, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp_path);
        return Err(fail(io_cause(&e, &dir, true)));
    }
    // Make the rename itself durable (best effort; not possible on Windows).
    #[cfg(unix)]
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Whether a file could be written at `path` (a temporary file is created
/// beside it and removed again), checked before a long job whose result
/// would otherwise be lost at the end; the error is the one a write gives.
pub fn check_writable(path: &Path) -> Result<(), MetadataError> {
    let (_, tmp_path, file) = create_temp_beside(path)?;
    drop(file);
    let _ = fs::remove_file(&tmp_path);
    Ok(())
}

/// A fresh `.{name}.tmp-{pid}-{n}` file next to `path`, with its directory.
fn create_temp_beside(path: &Path) -> Result<(PathBuf, PathBuf, File), MetadataError> {
    let fail = |cause: String| MetadataError::Write { path: path.to_path_buf(), cause };
    let name = path.file_name().ok_or_else(|| fail("the path does not name a file".into()))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if path.is_dir() {
        return Err(fail("a folder with that name exists".into()));
    }
    let mut attempt = 0;
    loop {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp-{}-{n}", std::process::id()));
        let tmp_path = dir.join(tmp_name);
        match OpenOptions::new().write(true).create_new(true).open(&tmp_path) {
            Ok(f) => return Ok((dir, tmp_path, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 100 => attempt += 1,
            Err(e) => return Err(fail(io_cause(&e, &dir, true))),
        }
    }
}

/// Plain-words cause of an I/O error; `dir` is the directory involved: a
/// write that finds nothing says which folder is missing.
fn io_cause(e: &io::Error, dir: &Path, writing: bool) -> String {
    match e.kind() {
        io::ErrorKind::NotFound if writing && !dir.is_dir() => format!("folder {} does not exist", dir.display()),
        // An existing folder that refuses new files this way (e.g. /proc).
        io::ErrorKind::NotFound if writing => format!("files cannot be created in {}", dir.display()),
        _ => one_line(&crate::error::plain_cause(e)),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Current UTC time as `YYYY-MM-DDTHH:MM:SSZ` (for [`GenerationMetadata::created`]).
pub fn utc_timestamp_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    utc_timestamp(secs)
}

fn utc_timestamp(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let sod = unix_secs % 86_400;
    // Civil-from-days (proleptic Gregorian), Howard Hinnant's algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", sod / 3600, (sod / 60) % 60, sod % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> GenerationMetadata {
        GenerationMetadata {
            prompt: "一只戴着帽子的猫, 水彩风格 🐱\nsecond line: \"quoted\"".into(),
            negative_prompt: "模糊, low quality".into(),
            seed: 18_446_744_073_709_551_615,
            steps: 8,
            guidance: 0.0,
            cfg_normalization: 0.0,
            cfg_truncation: 1.0,
            width: 4,
            height: 3,
            model: "/models/z_image_turbo_bf16.safetensors".into(),
            model_kind: "turbo".into(),
            scheduler_shift: 3.0,
            init_image: Some("in/子.png".into()),
            strength: Some(0.6),
            parent: Some("20250101-abc".into()),
            app: "Z-Image Studio 0.1.0".into(),
            created: "2025-11-26T02:11:00Z".into(),
            loras: vec![LoraRef { name: "水彩".into(), strength: -0.25, hash: Some("0123456789ab".into()) }],
            variety: 0.35,
        }
    }

    fn rgb(w: u32, h: u32) -> Vec<u8> {
        (0..w * h * 3).map(|i| (i * 37 % 251) as u8).collect()
    }

    /// (type, data) of every chunk.
    fn chunks(png: &[u8]) -> Vec<([u8; 4], Vec<u8>)> {
        let mut out = Vec::new();
        let mut i = 8;
        while i + 8 <= png.len() {
            let len = u32::from_be_bytes(png[i..i + 4].try_into().unwrap()) as usize;
            let ty: [u8; 4] = png[i + 4..i + 8].try_into().unwrap();
            out.push((ty, png[i + 8..i + 8 + len].to_vec()));
            i += 12 + len;
        }
        out
    }

    /// A unique empty directory under the system temp dir, removed on drop.
    struct TestDir(PathBuf);
    impl TestDir {
        fn new(tag: &str) -> Self {
            static N: AtomicU64 = AtomicU64::new(0);
            let p = std::env::temp_dir().join(format!(
                "zimage-meta-test-{}-{tag}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            TestDir(p)
        }
        fn names(&self) -> Vec<String> {
            let mut v: Vec<String> =
                fs::read_dir(&self.0).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
            v.sort();
            v
        }
    }
    impl Drop for TestDir {
        fn drop(&mut self) {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let _ = fs::set_permissions(&self.0, fs::Permissions::from_mode(0o755));
            }
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn png_round_trip_keeps_every_field_and_pixel() {
        let meta = sample();
        let pixels = rgb(4, 3);
        let png = encode_png(&pixels, 4, 3, &meta).unwrap();
        assert_eq!(read_png_metadata(&png).unwrap(), meta);

        let mut reader = png::Decoder::new(Cursor::new(&png[..])).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (4, 3));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        assert_eq!(&buf[..info.buffer_size()], &pixels[..]);
    }

    #[test]
    fn text_is_in_uncompressed_itxt_chunks_before_image_data() {
        let meta = sample();
        let png = encode_png(&rgb(4, 3), 4, 3, &meta).unwrap();
        let all = chunks(&png);
        let types: Vec<&[u8]> = all.iter().map(|(t, _)| &t[..]).collect();
        assert_eq!(types, [&b"IHDR"[..], b"iTXt", b"iTXt", b"iTXt", b"IDAT", b"IEND"]);
        let mut seen = Vec::new();
        for (ty, data) in &all {
            if ty != b"iTXt" {
                continue;
            }
            // keyword \0 compression-flag compression-method language \0 translated \0 text
            let k = data.iter().position(|&b| b == 0).unwrap();
            let keyword = std::str::from_utf8(&data[..k]).unwrap().to_string();
            assert_eq!(data[k + 1], 0, "{keyword} must be uncompressed");
            assert_eq!(data[k + 2], 0);
            assert_eq!(&data[k + 3..k + 5], &[0, 0], "empty language and translated keyword");
            let text = std::str::from_utf8(&data[k + 5..]).unwrap().to_string();
            seen.push((keyword, text));
        }
        assert_eq!(seen[0].0, "parameters");
        assert_eq!(seen[0].1, a1111_parameters(&meta));
        assert!(seen[0].1.starts_with("一只戴着帽子的猫, 水彩风格 🐱\n"));
        assert_eq!(seen[1].0, "zimage");
        let back: GenerationMetadata = serde_json::from_str(&seen[1].1).unwrap();
        assert_eq!(back, meta);
        assert!(seen[1].1.contains("一只戴着帽子的猫"), "JSON keeps UTF-8 unescaped");
        assert_eq!(seen[2].0, "XML:com.adobe.xmp");
        let xmp = crate::xmp::read_packet(&seen[2].1);
        assert_eq!((xmp.description.as_deref(), xmp.json.as_deref()), (Some(seen[0].1.as_str()), Some(seen[1].1.as_str())));
    }

    /// The PNG without the chunks whose keyword `drop` refuses, as an
    /// editor that keeps only XMP writes it (the other chunks byte for byte).
    fn without_text_chunks(png: &[u8], drop: impl Fn(&str) -> bool) -> Vec<u8> {
        let mut out = png[..8].to_vec();
        let mut at = 8;
        while at < png.len() {
            let len = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
            let chunk = &png[at..at + 12 + len];
            let data = &chunk[8..8 + len];
            let keyword = data.iter().position(|&b| b == 0).map(|k| String::from_utf8_lossy(&data[..k]).into_owned());
            if !(&chunk[4..8] == b"iTXt" && keyword.as_deref().is_some_and(&drop)) {
                out.extend_from_slice(chunk);
            }
            at += 12 + len;
        }
        out
    }

    #[test]
    fn metadata_survives_an_editor_that_keeps_only_the_xmp() {
        let meta = sample();
        let png = encode_png(&rgb(4, 3), 4, 3, &meta).unwrap();
        let only_xmp = without_text_chunks(&png, |k| k != "XML:com.adobe.xmp");
        assert!(only_xmp.len() < png.len());
        assert_eq!(png_text_chunks(&only_xmp).unwrap().len(), 1);
        assert_eq!(read_png_metadata(&only_xmp).unwrap(), meta);
        assert_eq!(read_image_metadata(&only_xmp).unwrap(), meta);
        // An XMP description that is not an infotext is not taken for one.
        let none = without_text_chunks(&png, |_| true);
        assert!(matches!(read_png_metadata(&none), Err(MetadataError::NoMetadata)));

        // A JPEG exported by the editor carries the packet in APP1.
        let packet = png_text_chunks(&png).unwrap().into_iter().find(|(k, _)| k == "XML:com.adobe.xmp").unwrap().1;
        let jpeg_with = |packet: &str| [&[0xFF, 0xD8][..], &crate::xmp::jpeg_app1_segment(packet).unwrap()].concat();
        assert_eq!(read_image_metadata(&jpeg_with(&packet)).unwrap(), meta);
        // Only the infotext kept (another tool's packet): read as A1111 text.
        let infotext = crate::xmp::packet(&a1111_parameters(&meta), "not json", "", "");
        let back = read_image_metadata(&jpeg_with(&infotext)).unwrap();
        assert_eq!((back.prompt, back.seed, back.steps), (meta.prompt.clone(), meta.seed, meta.steps));

        let err = |b: &[u8]| read_image_metadata(b).unwrap_err().to_string();
        assert_eq!(err(&[0xFF, 0xD8, 0xFF, 0xDA, 0, 2]), "the JPEG has no generation metadata (no XMP packet with Z-Image Studio's or A1111's parameters)");
        assert_eq!(err(b"GIF89a......"), "not a PNG or JPEG file");
        assert_eq!(err(&png[..20]), "the PNG file is truncated");
    }

    #[test]
    fn a1111_text_exact_format() {
        let meta = GenerationMetadata {
            prompt: "a cat in a hat".into(),
            negative_prompt: "blurry".into(),
            seed: 42,
            steps: 8,
            guidance: 0.0,
            cfg_truncation: 1.0,
            width: 1024,
            height: 768,
            model: "/home/me/models/z_image_turbo_bf16.safetensors".into(),
            model_kind: "turbo".into(),
            scheduler_shift: 3.0,
            app: "Z-Image Studio 0.1.0".into(),
            ..Default::default()
        };
        assert_eq!(
            a1111_parameters(&meta),
            "a cat in a hat\nNegative prompt: blurry\nSteps: 8, Sampler: Euler, Schedule type: Simple, \
             CFG scale: 1, Seed: 42, Size: 1024x768, Model: z_image_turbo_bf16, Shift: 3, \
             Version: Z-Image Studio 0.1.0"
        );

        let img2img = GenerationMetadata {
            negative_prompt: String::new(),
            guidance: 4.0,
            cfg_normalization: 0.5,
            cfg_truncation: 0.9,
            steps: 28,
            model: "Tongyi-MAI/Z-Image".into(),
            strength: Some(0.6),
            scheduler_shift: 6.0,
            app: "Z-Image Studio 0.1.0, dev: build".into(),
            variety: 0.3,
            ..meta
        };
        assert_eq!(
            a1111_parameters(&img2img),
            "a cat in a hat\nSteps: 28, Sampler: Euler, Schedule type: Simple, CFG scale: 5, \
             Seed: 42, Size: 1024x768, Model: Z-Image, Denoising strength: 0.6, \
             CFG normalization: 0.5, CFG truncation: 0.9, Variety: 0.3, Shift: 6, \
             Version: \"Z-Image Studio 0.1.0, dev: build\""
        );
    }

    #[test]
    fn loras_are_written_as_a1111_tags_and_hashes_and_read_back() {
        let meta = GenerationMetadata {
            prompt: "a harbour at dusk".into(),
            steps: 8,
            seed: 1,
            width: 512,
            height: 512,
            cfg_truncation: 1.0,
            scheduler_shift: 3.0,
            loras: vec![
                LoraRef { name: "ink_wash".into(), strength: 0.6, hash: Some("9ab12cd34ef5".into()) },
                LoraRef { name: "grain".into(), strength: 1.0, hash: None },
            ],
            ..Default::default()
        };
        let text = a1111_parameters(&meta);
        assert!(text.starts_with("a harbour at dusk <lora:ink_wash:0.6> <lora:grain:1>\n"), "{text}");
        assert!(text.contains(", Lora hashes: \"ink_wash: 9ab12cd34ef5\""), "{text}");
        let back = parse_a1111_parameters(&text).unwrap();
        assert_eq!(back.prompt, "a harbour at dusk");
        assert_eq!(back.loras, meta.loras);
        // Tags typed anywhere in another tool's prompt are found too.
        let (bare, loras) = take_lora_tags("<lora:a:0.5>cat, <lora:b> dog <lora:broken");
        assert_eq!(bare, "cat, dog <lora:broken");
        assert_eq!(loras.iter().map(|l| (l.name.as_str(), l.strength)).collect::<Vec<_>>(), [("a", 0.5), ("b", 1.0)]);
        // And the JSON chunk keeps them exactly.
        let png = encode_png(&rgb(2, 2), 2, 2, &meta).unwrap();
        assert_eq!(read_png_metadata(&png).unwrap().loras, meta.loras);
    }

    #[test]
    fn a1111_text_parses_back() {
        let meta = GenerationMetadata {
            model: "z_image_turbo_bf16".into(),
            init_image: None,
            parent: None,
            model_kind: String::new(),
            created: String::new(),
            guidance: 0.3,
            cfg_normalization: 0.25,
            cfg_truncation: 0.75,
            ..sample()
        };
        let parsed = parse_a1111_parameters(&a1111_parameters(&meta)).unwrap();
        assert_eq!(parsed, meta);

        // Empty prompt and negative: the text is just the parameter line.
        let bare = GenerationMetadata {
            prompt: String::new(),
            negative_prompt: String::new(),
            loras: Vec::new(),
            ..meta.clone()
        };
        let text = a1111_parameters(&bare);
        assert!(text.starts_with("Steps: 8,"));
        assert_eq!(parse_a1111_parameters(&text).unwrap(), bare);

        // Multi-line negative prompt.
        let multi = GenerationMetadata { negative_prompt: "bad\nworse".into(), ..meta };
        assert_eq!(parse_a1111_parameters(&a1111_parameters(&multi)).unwrap(), multi);
    }

    #[test]
    fn parses_typical_infotext_from_other_tools() {
        let text = "masterpiece, best quality, 1girl, (smile:1.2), <lora:detail:0.8>\n\
            BREAK city at night\n\
            Negative prompt: lowres, bad anatomy, (worst quality:1.4)\n\
            Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 3821351489, \
            Size: 832x1216, Model hash: 4ce73ad9a0, Model: animagine-xl-3.1, VAE hash: 63aeecb90f, \
            VAE: sdxl_vae.safetensors, Denoising strength: 0.4, Hires upscale: 1.5, \
            Lora hashes: \"detail: 1f2e3d4c5b6a, style: 0a1b2c3d\", \
            TI hashes: \"easynegative: c74b4e810b03\", Version: v1.10.1";
        let m = parse_a1111_parameters(text).unwrap();
        assert_eq!(m.prompt, "masterpiece, best quality, 1girl, (smile:1.2),\nBREAK city at night");
        assert_eq!(m.loras, [LoraRef { name: "detail".into(), strength: 0.8, hash: Some("1f2e3d4c5b6a".into()) }]);
        assert_eq!(m.negative_prompt, "lowres, bad anatomy, (worst quality:1.4)");
        assert_eq!(m.steps, 28);
        assert_eq!(m.guidance, 6.5);
        assert_eq!(m.seed, 3_821_351_489);
        assert_eq!((m.width, m.height), (832, 1216));
        assert_eq!(m.model, "animagine-xl-3.1");
        assert_eq!(m.strength, Some(0.4));
        assert_eq!(m.app, "v1.10.1");
        assert_eq!(m.cfg_truncation, 1.0);

        // CRLF line ends, no negative prompt, Forge-style extra keys.
        let forge = "a photo of a dog\r\nSteps: 20, Sampler: Euler, Schedule type: Simple, CFG scale: 1, \
            Distilled CFG Scale: 3.5, Seed: 12, Size: 896x1152, Model: flux1-dev, Version: f2.0.1v1.10.1\r\n";
        let m = parse_a1111_parameters(forge).unwrap();
        assert_eq!(m.prompt, "a photo of a dog");
        assert_eq!(m.negative_prompt, "");
        assert_eq!(m.guidance, 0.0);
        assert_eq!(m.seed, 12);
        assert_eq!((m.width, m.height), (896, 1152));

        // Only a prompt: no parameter line.
        let m = parse_a1111_parameters("just a prompt: with a colon").unwrap();
        assert_eq!(m.prompt, "just a prompt: with a colon");
        assert_eq!(m.steps, 0);

        assert!(parse_a1111_parameters(" \n ").is_err());
    }

    #[test]
    fn falls_back_to_text_parameters_chunk() {
        // A1111/ComfyUI-style file: tEXt "parameters", no zimage chunk.
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, 2, 2);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            enc.add_text_chunk(
                "parameters".into(),
                "red fox\nSteps: 30, Sampler: Euler a, CFG scale: 6, Seed: 7, Size: 2x2".into(),
            )
            .unwrap();
            let mut w = enc.write_header().unwrap();
            w.write_image_data(&[0; 12]).unwrap();
            w.finish().unwrap();
        }
        let m = read_png_metadata(&out).unwrap();
        assert_eq!(m.prompt, "red fox");
        assert_eq!((m.steps, m.seed, m.guidance), (30, 7, 5.0));

        // Bad JSON in `zimage` with a good `parameters`: use the parameters.
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, 1, 1);
            enc.set_color(png::ColorType::Rgb);
            enc.add_itxt_chunk("zimage".into(), "{not json".into()).unwrap();
            enc.add_itxt_chunk("parameters".into(), "x\nSteps: 1, CFG scale: 1, Seed: 2".into()).unwrap();
            let mut w = enc.write_header().unwrap();
            w.write_image_data(&[0; 3]).unwrap();
            w.finish().unwrap();
        }
        assert_eq!(read_png_metadata(&out).unwrap().seed, 2);
    }

    #[test]
    fn older_or_newer_json_reads() {
        let m: GenerationMetadata = serde_json::from_str(r#"{"prompt":"p","seed":5,"future_field":[1,2]}"#).unwrap();
        assert_eq!(m.prompt, "p");
        assert_eq!(m.seed, 5);
        assert_eq!(m.strength, None);
        assert_eq!(m.steps, 0);
    }

    #[test]
    fn errors_for_bad_input_never_panic() {
        let good = encode_png(&rgb(16, 16), 16, 16, &sample()).unwrap();
        assert!(matches!(read_png_metadata(b""), Err(MetadataError::NotPng)));
        assert!(matches!(read_png_metadata(b"GIF89a....."), Err(MetadataError::NotPng)));
        assert!(matches!(read_png_metadata(&good[..5]), Err(MetadataError::Truncated)));
        // Every truncation point gives an error (never a panic, never Ok).
        for cut in 8..good.len() {
            let r = read_png_metadata(&good[..cut]);
            assert!(r.is_err(), "cut at {cut} read fine");
        }
        let r = read_png_metadata(&good[..good.len() - 20]);
        assert!(matches!(r, Err(MetadataError::Truncated)), "{r:?}");
        // Flipped bytes: error or (if only pixel data changed) not a panic.
        for pos in (8..good.len()).step_by(7) {
            let mut bad = good.clone();
            bad[pos] ^= 0x5a;
            let _ = read_png_metadata(&bad);
        }
        // Garbage after a valid signature.
        let mut garbage = good[..8].to_vec();
        garbage.extend((0..500u32).map(|i| (i * 73 % 256) as u8));
        assert!(read_png_metadata(&garbage).is_err());
        // A valid PNG without text chunks.
        let mut plain = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut plain, 1, 1);
            enc.set_color(png::ColorType::Rgb);
            let mut w = enc.write_header().unwrap();
            w.write_image_data(&[1, 2, 3]).unwrap();
            w.finish().unwrap();
        }
        assert!(matches!(read_png_metadata(&plain), Err(MetadataError::NoMetadata)));
        for e in [read_png_metadata(&good[..good.len() - 20]).unwrap_err(), read_png_metadata(&plain).unwrap_err()] {
            assert!(!e.to_string().contains('\n'));
        }
    }

    #[test]
    fn encode_checks_buffer_size() {
        let e = encode_png(&[0; 10], 2, 2, &sample()).unwrap_err();
        assert_eq!(e.to_string(), "image data has 10 bytes but a 2x2 RGB image needs 12");
        assert!(matches!(encode_png(&[], 0, 5, &sample()), Err(MetadataError::InvalidSize { .. })));
    }

    #[test]
    fn save_png_writes_atomically_and_replaces() {
        let dir = TestDir::new("save");
        let path = dir.0.join("out.png");
        fs::write(&path, b"old contents").unwrap();
        let meta = sample();
        save_png(&path, &rgb(4, 3), 4, 3, &meta).unwrap();
        assert_eq!(read_png_metadata_file(&path).unwrap(), meta);
        assert_eq!(dir.names(), ["out.png"]);
    }

    #[test]
    fn failed_write_leaves_no_partial_file() {
        let dir = TestDir::new("fail");
        let path = dir.0.join("keep.png");
        fs::write(&path, b"previous image").unwrap();
        // Simulate the disk filling up halfway through the write.
        let err = write_atomic_with(&path, |f| {
            f.write_all(b"partial")?;
            Err(io::Error::from(io::ErrorKind::StorageFull))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), format!("cannot write {}: no space left on the disk", path.display()));
        assert_eq!(fs::read(&path).unwrap(), b"previous image");
        assert_eq!(dir.names(), ["keep.png"]);

        // Missing directory.
        let missing = dir.0.join("no/such/dir/x.png");
        let err = save_png(&missing, &rgb(1, 1), 1, 1, &sample()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with(&format!("cannot write {}: folder ", missing.display())), "{msg}");
        assert!(msg.ends_with("does not exist"), "{msg}");

        // A folder that exists but where creating a file reports "not found".
        let cause = io_cause(&io::Error::from(io::ErrorKind::NotFound), &dir.0, true);
        assert_eq!(cause, format!("files cannot be created in {}", dir.0.display()));

        // Target is a directory.
        let err = save_png(&dir.0, &rgb(1, 1), 1, 1, &sample()).unwrap_err();
        assert!(err.to_string().contains("a folder with that name exists"), "{err}");
        assert_eq!(dir.names(), ["keep.png"]);

        // The check made before a long job: the same errors, and no file left.
        check_writable(&dir.0.join("new.png")).unwrap();
        check_writable(&path).unwrap();
        assert_eq!(dir.names(), ["keep.png"]);
        assert_eq!(fs::read(&path).unwrap(), b"previous image", "an existing file is not touched");
        assert_eq!(check_writable(&missing).unwrap_err().to_string(), save_png(&missing, &rgb(1, 1), 1, 1, &sample()).unwrap_err().to_string());
        assert!(check_writable(&dir.0).unwrap_err().to_string().contains("a folder with that name exists"));
    }

    /// Read-only directory. Root ignores permission bits, so when the chmod'ed
    /// directory is still writable the test uses /sys (not writable even by
    /// root on Linux) instead, or is skipped.
    #[cfg(unix)]
    #[test]
    fn write_into_read_only_dir_fails_cleanly() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TestDir::new("ro");
        fs::set_permissions(&dir.0, fs::Permissions::from_mode(0o555)).unwrap();
        let probe = dir.0.join("probe");
        let target_dir = if fs::write(&probe, b"x").is_err() {
            dir.0.clone()
        } else {
            let _ = fs::remove_file(&probe);
            let sys = PathBuf::from("/sys");
            if sys.is_dir() && fs::write(sys.join("zimage-probe"), b"x").is_err() {
                sys
            } else {
                eprintln!("skipped: running with permission to write anywhere");
                return;
            }
        };
        let path = target_dir.join("out.png");
        let err = save_png(&path, &rgb(2, 2), 2, 2, &sample()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg == format!("cannot write {}: permission denied", path.display())
                || msg == format!("cannot write {}: read-only file system", path.display()),
            "{msg}"
        );
        assert!(!path.exists());
        let leftovers: Vec<_> = fs::read_dir(&target_dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("out.png"))
            .collect();
        assert!(leftovers.is_empty());
    }

    /// Real "disk full": set ZIMAGE_TEST_FULL_DIR to a directory on a tiny
    /// file system (e.g. `mount -t tmpfs -o size=64k tmpfs /mnt/tiny`).
    #[test]
    fn write_to_full_disk_fails_cleanly_if_configured() {
        let Some(dir) = std::env::var_os("ZIMAGE_TEST_FULL_DIR") else {
            eprintln!("skipped: ZIMAGE_TEST_FULL_DIR not set");
            return;
        };
        let dir = PathBuf::from(dir);
        let path = dir.join("big.png");
        // Incompressible pixels, ~3 MB.
        let mut x = 0x2545_f491u32;
        let pixels: Vec<u8> = (0..1024 * 1024 * 3)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let err = save_png(&path, &pixels, 1024, 1024, &sample()).unwrap_err();
        assert_eq!(err.to_string(), format!("cannot write {}: no space left on the disk", path.display()));
        assert!(!path.exists());
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("big.png"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn number_and_name_formatting() {
        assert_eq!(fmt_num(5.0), "5");
        assert_eq!(fmt_num(0.6f32 as f64), "0.6");
        assert_eq!(fmt_num(1.0 + 0.3f32 as f64), "1.3");
        assert_eq!(fmt_num(-0.0), "0");
        assert_eq!(model_display_name(r"C:\models\z.safetensors"), "z");
        assert_eq!(model_display_name("Tongyi-MAI/Z-Image-Turbo/"), "Z-Image-Turbo");
        assert_eq!(model_display_name(""), "");
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_timestamp(1_764_123_060), "2025-11-26T02:11:00Z");
        assert_eq!(utc_timestamp(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_timestamp_now().len(), 20);
    }
}
