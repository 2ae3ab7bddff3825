//! Reading checkpoints: safetensors headers and memory-mapped tensor data,
//! sharded components (`*.index.json`), key layouts (diffusers, ComfyUI,
//! BFL), and the [`WeightSource`] every model is built from.
//!
//! Models are built once by a single `build` function per module that asks a
//! [`WeightSource`] for each parameter by its canonical (diffusers /
//! transformers) name. Three sources exist:
//! - [`RandomWeights`]: fresh initialisation (`init(&device)`, benchmarks);
//! - [`ShapePlan`]: records every requested name and shape without allocating,
//!   so a checkpoint can be checked completely *before* anything is loaded;
//! - [`Checkpoint`]: reads each tensor from the memory-mapped files, converts
//!   it to the compute dtype and moves it to the device one at a time, so peak
//!   host memory is one tensor, not the whole model.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor, TensorData};
use half::{bf16, f16};
use memmap2::Mmap;

use crate::error::{EngineError, Result};

/// Largest header we accept: real headers are well under 1 MB; a bigger value
/// means a corrupt or hostile file.
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Element types a safetensors header may declare. Float types are weights;
/// integer and bool tensors are accepted in a file (ComfyUI stores per-layer
/// quantisation configs as `U8`) but refused as weights by [`check_plan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDtype {
    F32,
    F16,
    BF16,
    F64,
    /// `torch.float8_e4m3fn` (ComfyUI fp8 checkpoints), optionally scaled.
    F8E4M3,
    /// `torch.float8_e5m2`.
    F8E5M2,
    Bool,
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
}

impl StoredDtype {
    /// The safetensors dtype string (`"F8_E4M3"`, …).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "F32" => Self::F32,
            "F16" => Self::F16,
            "BF16" => Self::BF16,
            "F64" => Self::F64,
            "F8_E4M3" => Self::F8E4M3,
            "F8_E5M2" => Self::F8E5M2,
            "BOOL" => Self::Bool,
            "U8" => Self::U8,
            "I8" => Self::I8,
            "U16" => Self::U16,
            "I16" => Self::I16,
            "U32" => Self::U32,
            "I32" => Self::I32,
            "U64" => Self::U64,
            "I64" => Self::I64,
            _ => return None,
        })
    }
    pub fn size(self) -> usize {
        match self {
            Self::F8E4M3 | Self::F8E5M2 | Self::Bool | Self::U8 | Self::I8 => 1,
            Self::F16 | Self::BF16 | Self::U16 | Self::I16 => 2,
            Self::F32 | Self::U32 | Self::I32 => 4,
            Self::F64 | Self::U64 | Self::I64 => 8,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
            Self::F64 => "f64",
            Self::F8E4M3 => "fp8_e4m3fn",
            Self::F8E5M2 => "fp8_e5m2",
            Self::Bool => "bool",
            Self::U8 => "u8",
            Self::I8 => "i8",
            Self::U16 => "u16",
            Self::I16 => "i16",
            Self::U32 => "u32",
            Self::I32 => "i32",
            Self::U64 => "u64",
            Self::I64 => "i64",
        }
    }
    /// Whether values of this type can be model weights.
    pub fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::F16 | Self::BF16 | Self::F64 | Self::F8E4M3 | Self::F8E5M2)
    }
    pub fn is_fp8(self) -> bool {
        matches!(self, Self::F8E4M3 | Self::F8E5M2)
    }
}

/// One tensor's entry in a safetensors header.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: StoredDtype,
    pub shape: Vec<usize>,
    file: usize,
    bytes: Range<usize>,
}

/// The tensors of one model component, possibly spread over several shards,
/// with their data memory-mapped (nothing is read until asked for).
pub struct TensorStore {
    files: Vec<(PathBuf, Mmap)>,
    tensors: BTreeMap<String, TensorInfo>,
    /// The string entries of every file's `__metadata__` (later files win).
    metadata: BTreeMap<String, String>,
}

/// Refuses pickle-based checkpoints by extension, before opening them.
pub fn refuse_pickle(path: &Path) -> Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if matches!(ext.as_str(), "ckpt" | "pt" | "pth" | "bin" | "pkl") {
        return Err(EngineError::PickleRefused { path: path.to_path_buf() });
    }
    Ok(())
}

impl TensorStore {
    /// Opens one or more safetensors files as one component.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut store = TensorStore { files: Vec::new(), tensors: BTreeMap::new(), metadata: BTreeMap::new() };
        for path in paths {
            store.add_file(path)?;
        }
        store.check_fp8_scales()?;
        Ok(store)
    }

    /// Opens a component folder (see [`component_files`]).
    pub fn open_dir(dir: &Path, stem: &str) -> Result<Self> {
        Self::open_files(&component_files(dir, stem)?)
    }

    fn add_file(&mut self, path: &Path) -> Result<()> {
        refuse_pickle(path)?;
        let file = File::open(path).map_err(|e| EngineError::io(path, e))?;
        // SAFETY: the map is read-only; a file changed underneath us can give
        // wrong values but not unsafety beyond what every mmap loader accepts.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| EngineError::io(path, e))?;
        let bad = |reason: String| EngineError::BadSafetensors { path: path.to_path_buf(), reason };
        if mmap.len() < 8 {
            return Err(bad(format!("file is {} bytes, too short for a header", mmap.len())));
        }
        let header_len = u64::from_le_bytes(mmap[..8].try_into().expect("8 bytes"));
        if header_len > MAX_HEADER_BYTES || header_len + 8 > mmap.len() as u64 {
            return Err(bad(format!(
                "header length {header_len} does not fit in a {}-byte file (truncated or not safetensors)",
                mmap.len()
            )));
        }
        let data_start = 8 + header_len as usize;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&mmap[8..data_start]).map_err(|e| bad(format!("header is not valid JSON ({e})")))?;
        let data_len = mmap.len() - data_start;
        let file_index = self.files.len();
        for (name, entry) in header {
            if name == "__metadata__" {
                // safetensors metadata is a string → string map; other values are ignored.
                if let Some(map) = entry.as_object() {
                    for (k, v) in map {
                        if let Some(v) = v.as_str() {
                            self.metadata.insert(k.clone(), v.to_string());
                        }
                    }
                }
                continue;
            }
            let dtype_str = entry.get("dtype").and_then(|v| v.as_str()).unwrap_or("?");
            let dtype = StoredDtype::parse(dtype_str).ok_or_else(|| {
                bad(format!(
                    "tensor {name} has dtype {dtype_str}, which is not supported (f32, f16, bf16, f64, fp8 e4m3/e5m2)"
                ))
            })?;
            let shape: Vec<usize> = entry
                .get("shape")
                .and_then(|v| v.as_array())
                .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
                .ok_or_else(|| bad(format!("tensor {name} has no valid shape")))?;
            let offsets: Vec<usize> = entry
                .get("data_offsets")
                .and_then(|v| v.as_array())
                .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
                .filter(|o: &Vec<usize>| o.len() == 2)
                .ok_or_else(|| bad(format!("tensor {name} has no valid data_offsets")))?;
            let (begin, end) = (offsets[0], offsets[1]);
            let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let expected = numel.and_then(|n| n.checked_mul(dtype.size()));
            if begin > end || Some(end - begin) != expected {
                return Err(bad(format!("tensor {name}: data size does not match its shape {shape:?}")));
            }
            if end > data_len {
                return Err(bad(format!(
                    "truncated: tensor {name} needs {} bytes of data but the file holds {data_len}",
                    end
                )));
            }
            if self.tensors.contains_key(&name) {
                return Err(bad(format!("tensor {name} appears in more than one file")));
            }
            self.tensors.insert(
                name,
                TensorInfo { dtype, shape, file: file_index, bytes: data_start + begin..data_start + end },
            );
        }
        self.files.push((path.to_path_buf(), mmap));
        Ok(())
    }

    /// Every fp8 weight with a scale must have exactly one (per-tensor)
    /// float scale value, ComfyUI's convention; anything else would be
    /// dequantised wrongly, so it is refused when the files are opened.
    fn check_fp8_scales(&self) -> Result<()> {
        for (name, info) in &self.tensors {
            if !info.dtype.is_fp8() {
                continue;
            }
            let Some(key) = self.scale_key(name) else { continue };
            let scale = &self.tensors[key];
            let numel: usize = scale.shape.iter().product();
            if numel != 1 || !scale.dtype.is_float() || scale.dtype.is_fp8() {
                return Err(EngineError::BadSafetensors {
                    path: self.files[scale.file].0.clone(),
                    reason: format!(
                        "fp8 scale {key} is {} with shape {:?}; only one f32/f16/bf16 value per tensor is supported",
                        scale.dtype.name(),
                        scale.shape
                    ),
                });
            }
        }
        Ok(())
    }

    /// The per-tensor scale tensor of an fp8 weight, if the files have one.
    fn scale_key(&self, weight_key: &str) -> Option<&str> {
        let keys = crate::fp8::scale_keys(weight_key)?;
        keys.into_iter().find_map(|k| self.tensors.get_key_value(&k).map(|(k, _)| k.as_str()))
    }

    /// The factor an fp8 weight is multiplied by when dequantised (1 without a scale tensor).
    pub fn fp8_scale(&self, weight_key: &str) -> f32 {
        match self.scale_key(weight_key) {
            Some(key) => {
                let info = &self.tensors[key];
                decode_f32(info.dtype, self.raw(info)).first().copied().unwrap_or(1.0)
            }
            None => 1.0,
        }
    }

    /// The files' `__metadata__` strings (LoRA training info, quantisation configs).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Memory the weights need kept in fp8, as bf16 and as f32 (scales,
    /// markers and other non-weight tensors excluded).
    pub fn memory_estimate(&self) -> crate::fp8::MemoryEstimate {
        let mut m = crate::fp8::MemoryEstimate::default();
        for (name, info) in &self.tensors {
            if !info.dtype.is_float() || crate::fp8::is_quant_aux(name) {
                continue;
            }
            let numel = info.shape.iter().product::<usize>() as u64;
            let has_scale = info.dtype.is_fp8() && self.scale_key(name).is_some();
            m.add_weight(numel, info.bytes.len() as u64, info.dtype.is_fp8(), has_scale);
        }
        m
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }
    pub fn len(&self) -> usize {
        self.tensors.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
    /// Path of the first file (for messages).
    pub fn path(&self) -> &Path {
        self.files.first().map(|(p, _)| p.as_path()).unwrap_or(Path::new("<empty>"))
    }
    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.values().map(|t| (t.bytes.end - t.bytes.start) as u64).sum()
    }
    /// The stored dtype most tensors use (for reports).
    pub fn main_dtype(&self) -> Option<StoredDtype> {
        let mut count: HashMap<&'static str, (usize, StoredDtype)> = HashMap::new();
        for t in self.tensors.values() {
            count.entry(t.dtype.name()).or_insert((0, t.dtype)).0 += t.bytes.len();
        }
        count.into_values().max_by_key(|(n, _)| *n).map(|(_, d)| d)
    }

    fn raw(&self, info: &TensorInfo) -> &[u8] {
        &self.files[info.file].1[info.bytes.clone()]
    }

    /// Reads a tensor (or rows `rows` of its first dimension) converted to
    /// f32. fp8 weights are dequantised: decoded exactly, then multiplied by
    /// their per-tensor scale when the files have one (ComfyUI `scaled_fp8`).
    pub fn read_f32(&self, name: &str, rows: Option<Range<usize>>) -> Option<Vec<f32>> {
        let info = self.tensors.get(name)?;
        let bytes = slice_rows(self.raw(info), info, rows);
        let mut values = decode_f32(info.dtype, bytes);
        if info.dtype.is_fp8() {
            let scale = self.fp8_scale(name);
            if scale != 1.0 {
                values.iter_mut().for_each(|v| *v *= scale);
            }
        }
        Some(values)
    }

    /// Reads a tensor converted to bf16 (no f32 copy when stored as bf16).
    pub fn read_bf16(&self, name: &str, rows: Option<Range<usize>>) -> Option<Vec<bf16>> {
        let info = self.tensors.get(name)?;
        if info.dtype == StoredDtype::BF16 {
            let bytes = slice_rows(self.raw(info), info, rows);
            return Some(bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]])).collect());
        }
        Some(self.read_f32(name, rows)?.into_iter().map(bf16::from_f32).collect())
    }
}

/// The safetensors files of a component folder: the shards listed by
/// `{stem}.safetensors.index.json`, or `{stem}.safetensors`, or the only
/// `*.safetensors` file present. Pickle files are refused by name.
pub fn component_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(EngineError::io(dir, std::io::Error::new(std::io::ErrorKind::NotFound, "folder not found")));
    }
    let index = dir.join(format!("{stem}.safetensors.index.json"));
    if index.is_file() {
        return shards_from_index(&index);
    }
    let single = dir.join(format!("{stem}.safetensors"));
    if single.is_file() {
        return Ok(vec![single]);
    }
    let entries: Vec<PathBuf> =
        std::fs::read_dir(dir).map_err(|e| EngineError::io(dir, e))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    let mut found: Vec<PathBuf> =
        entries.iter().filter(|p| p.extension().is_some_and(|x| x == "safetensors")).cloned().collect();
    found.sort();
    if found.len() == 1 {
        return Ok(found);
    }
    if let Some(p) = entries.iter().find(|p| refuse_pickle(p).is_err()) {
        return Err(EngineError::PickleRefused { path: p.clone() });
    }
    Err(EngineError::io(
        dir,
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            if found.is_empty() {
                format!("no {stem}.safetensors (or its .index.json) in this folder")
            } else {
                format!("{} .safetensors files but no {stem}.safetensors.index.json saying how they fit", found.len())
            },
        ),
    ))
}

/// Little-endian bytes of `dtype` → f32 (fp8 decoded exactly, integers by value).
fn decode_f32(dtype: StoredDtype, bytes: &[u8]) -> Vec<f32> {
    fn le<const N: usize>(b: &[u8]) -> [u8; N] {
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        out
    }
    match dtype {
        StoredDtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes(le(b))).collect(),
        StoredDtype::BF16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes(le(b)).to_f32()).collect(),
        StoredDtype::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes(le(b)).to_f32()).collect(),
        StoredDtype::F64 => bytes.chunks_exact(8).map(|b| f64::from_le_bytes(le(b)) as f32).collect(),
        StoredDtype::F8E4M3 => bytes.iter().map(|&b| crate::fp8::e4m3fn_to_f32(b)).collect(),
        StoredDtype::F8E5M2 => bytes.iter().map(|&b| crate::fp8::e5m2_to_f32(b)).collect(),
        StoredDtype::Bool | StoredDtype::U8 => bytes.iter().map(|&b| b as f32).collect(),
        StoredDtype::I8 => bytes.iter().map(|&b| b as i8 as f32).collect(),
        StoredDtype::U16 => bytes.chunks_exact(2).map(|b| u16::from_le_bytes(le(b)) as f32).collect(),
        StoredDtype::I16 => bytes.chunks_exact(2).map(|b| i16::from_le_bytes(le(b)) as f32).collect(),
        StoredDtype::U32 => bytes.chunks_exact(4).map(|b| u32::from_le_bytes(le(b)) as f32).collect(),
        StoredDtype::I32 => bytes.chunks_exact(4).map(|b| i32::from_le_bytes(le(b)) as f32).collect(),
        StoredDtype::U64 => bytes.chunks_exact(8).map(|b| u64::from_le_bytes(le(b)) as f32).collect(),
        StoredDtype::I64 => bytes.chunks_exact(8).map(|b| i64::from_le_bytes(le(b)) as f32).collect(),
    }
}

fn slice_rows<'a>(bytes: &'a [u8], info: &TensorInfo, rows: Option<Range<usize>>) -> &'a [u8] {
    match rows {
        None => bytes,
        Some(r) => {
            let row_bytes = bytes.len() / info.shape.first().copied().unwrap_or(1).max(1);
            &bytes[r.start * row_bytes..r.end * row_bytes]
        }
    }
}

/// Lists the shard files of a `*.safetensors.index.json`, checking each exists.
pub fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| EngineError::io(index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| EngineError::BadConfig { path: index.to_path_buf(), reason: format!("not valid JSON ({e})") })?;
    let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| EngineError::BadConfig {
        path: index.to_path_buf(),
        reason: "no \"weight_map\" object".into(),
    })?;
    let mut shards: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
    shards.sort();
    shards.dedup();
    let dir = index.parent().unwrap_or(Path::new("."));
    let n = shards.len();
    let mut missing = Vec::new();
    for (i, s) in shards.iter().enumerate() {
        if s.contains("..") || s.contains('/') || s.contains('\\') {
            return Err(EngineError::BadConfig {
                path: index.to_path_buf(),
                reason: format!("shard name {s:?} points outside the folder"),
            });
        }
        if !dir.join(s).is_file() {
            missing.push(format!("shard {} of {n} ({s}) is missing", i + 1));
        }
    }
    if !missing.is_empty() {
        return Err(EngineError::io(index, std::io::Error::new(std::io::ErrorKind::NotFound, missing.join("; "))));
    }
    Ok(shards.into_iter().map(|s| dir.join(s)).collect())
}

// ---------------------------------------------------------------------------
// Key layouts

/// Where a canonical parameter lives in a particular checkpoint layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Located {
    pub key: String,
    /// `Some((i, n))`: the parameter is chunk `i` of `n` equal chunks along
    /// dimension 0 of the stored tensor (ComfyUI's fused qkv).
    pub chunk: Option<(usize, usize)>,
}

/// Maps canonical (diffusers / transformers) names to a checkpoint's own.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyLayout {
    /// Names as stored, after an optional prefix (`model.` on text encoders).
    Prefixed(String),
    /// ComfyUI / original single-file DiT (fused qkv, `x_embedder`, …).
    ComfyDit { prefix: String },
    /// Black Forest Labs `ae.safetensors` autoencoder layout.
    BflVae { prefix: String, up_blocks: usize },
}

impl KeyLayout {
    pub fn locate(&self, name: &str) -> Located {
        let plain = |key: String| Located { key, chunk: None };
        match self {
            KeyLayout::Prefixed(p) => plain(format!("{p}{name}")),
            KeyLayout::ComfyDit { prefix } => {
                let name = name.replacen("all_x_embedder.2-1.", "x_embedder.", 1).replacen(
                    "all_final_layer.2-1.",
                    "final_layer.",
                    1,
                );
                for (i, q) in ["to_q", "to_k", "to_v"].iter().enumerate() {
                    if let Some(head) = name.strip_suffix(&format!("attention.{q}.weight")) {
                        return Located { key: format!("{prefix}{head}attention.qkv.weight"), chunk: Some((i, 3)) };
                    }
                }
                let name = name
                    .replace("attention.to_out.0.", "attention.out.")
                    .replace("attention.norm_q.", "attention.q_norm.")
                    .replace("attention.norm_k.", "attention.k_norm.");
                plain(format!("{prefix}{name}"))
            }
            KeyLayout::BflVae { prefix, up_blocks } => plain(format!("{prefix}{}", bfl_vae_key(name, *up_blocks))),
        }
    }

    /// Guesses the layout of a DiT checkpoint from its keys.
    pub fn detect_dit(store: &TensorStore) -> Result<Self> {
        let has = |k: &str| store.get(k).is_some();
        // Diffusers names the patch embedder by its patch sizes
        // (`all_x_embedder.{p}-{f}`): 2-1 in the real checkpoints, 4-1 in the
        // built-in demo.
        let diffusers_embedder = |prefix: &str| {
            store.names().any(|n| {
                n.strip_prefix(prefix).is_some_and(|rest| rest.starts_with("all_x_embedder.") && rest.ends_with(".weight"))
            })
        };
        for prefix in ["", "model.diffusion_model.", "diffusion_model.", "model."] {
            if diffusers_embedder(prefix) {
                return Ok(KeyLayout::Prefixed(prefix.into()));
            }
            if has(&format!("{prefix}x_embedder.weight")) && has(&format!("{prefix}cap_embedder.0.weight")) {
                return Ok(KeyLayout::ComfyDit { prefix: prefix.into() });
            }
        }
        Err(EngineError::UnknownLayout {
            path: store.path().to_path_buf(),
            reason: describe_foreign(store, "a Z-Image DiT"),
        })
    }

    /// Guesses the layout of a VAE checkpoint from its keys.
    pub fn detect_vae(store: &TensorStore, up_blocks: usize) -> Result<Self> {
        for prefix in ["", "vae.", "first_stage_model."] {
            if store.get(&format!("{prefix}decoder.conv_in.weight")).is_some() {
                if store.get(&format!("{prefix}decoder.mid_block.resnets.0.conv1.weight")).is_some() {
                    return Ok(KeyLayout::Prefixed(prefix.into()));
                }
                if store.get(&format!("{prefix}decoder.mid.block_1.conv1.weight")).is_some() {
                    return Ok(KeyLayout::BflVae { prefix: prefix.into(), up_blocks });
                }
            }
        }
        Err(EngineError::UnknownLayout {
            path: store.path().to_path_buf(),
            reason: describe_foreign(store, "an autoencoder (VAE)"),
        })
    }

    /// Guesses the layout of a Qwen3 text-encoder checkpoint from its keys.
    pub fn detect_text_encoder(store: &TensorStore) -> Result<Self> {
        for prefix in ["", "model.", "text_encoders.qwen3_4b.transformer.model."] {
            if store.get(&format!("{prefix}embed_tokens.weight")).is_some() {
                return Ok(KeyLayout::Prefixed(prefix.into()));
            }
        }
        Err(EngineError::UnknownLayout {
            path: store.path().to_path_buf(),
            reason: describe_foreign(store, "a Qwen3 text encoder"),
        })
    }
}

/// Says what a checkpoint looks like when it is not what we expected.
fn describe_foreign(store: &TensorStore, wanted: &str) -> String {
    let any = |pat: &str| store.names().any(|n| n.contains(pat));
    let guess = if any("double_blocks.") || any("single_blocks.") {
        "this looks like a Flux checkpoint, not Z-Image"
    } else if any("input_blocks.") || any("down_blocks.0.attentions") {
        "this looks like a Stable Diffusion UNet, not Z-Image"
    } else if any("joint_blocks.") {
        "this looks like a Stable Diffusion 3 checkpoint, not Z-Image"
    } else if any("embed_tokens") {
        "this looks like a text encoder"
    } else if any("decoder.conv_in") {
        "this looks like an autoencoder (VAE)"
    } else if any("cap_embedder") {
        "this looks like a Z-Image DiT"
    } else {
        "no known key pattern found"
    };
    format!("expected {wanted}; {guess} ({} tensors)", store.len())
}

/// diffusers AutoencoderKL key → BFL `ae.safetensors` key.
fn bfl_vae_key(name: &str, up_blocks: usize) -> String {
    let mut s = name.to_string();
    // up_blocks are numbered in reverse in the BFL layout.
    if let Some(rest) = s.strip_prefix("decoder.up_blocks.") {
        if let Some((idx, tail)) = rest.split_once('.') {
            if let Ok(i) = idx.parse::<usize>() {
                s = format!("decoder.up.{}.{tail}", up_blocks.saturating_sub(1 + i));
            }
        }
    }
    s = s.replace(".down_blocks.", ".down.").replace(".resnets.", ".block.");
    s = s.replace(".downsamplers.0.", ".downsample.").replace(".upsamplers.0.", ".upsample.");
    s = s.replace(".conv_shortcut.", ".nin_shortcut.");
    s = s.replace(".mid_block.attentions.0.group_norm.", ".mid.attn_1.norm.");
    s = s.replace(".mid_block.attentions.0.to_q.", ".mid.attn_1.q.");
    s = s.replace(".mid_block.attentions.0.to_k.", ".mid.attn_1.k.");
    s = s.replace(".mid_block.attentions.0.to_v.", ".mid.attn_1.v.");
    s = s.replace(".mid_block.attentions.0.to_out.0.", ".mid.attn_1.proj_out.");
    s = s.replace(".mid_block.block.0.", ".mid.block_1.").replace(".mid_block.block.1.", ".mid.block_2.");
    s = s.replace(".conv_norm_out.", ".norm_out.");
    s
}

// ---------------------------------------------------------------------------
// Weight sources

/// How a freshly initialised parameter is drawn (ignored when loading).
#[derive(Debug, Clone, Copy)]
pub enum Init {
    /// Uniform in ±1/√fan_in (PyTorch's Linear/Conv default scale).
    FanIn(usize),
    Ones,
    Zeros,
    Normal(f64),
}

/// Reads `paths` once, from start to end, so that their pages are in the
/// page cache and a later load (memory-mapped) reads memory instead of the
/// disk: a parked DiT's first load after a cold start reads 12 GB. Blocking:
/// call it from a background thread. On Linux the thread's disk priority is
/// set to idle first, so these reads yield to any other. (The kernel's own
/// hint, `posix_fadvise(WILLNEED)`, filled no page cache on this project's
/// machines, and a read right after it was slower than a cold one.) Returns
/// the bytes read; a file that cannot be read is skipped.
pub fn read_ahead(paths: &[PathBuf]) -> u64 {
    use std::io::Read;
    #[cfg(target_os = "linux")]
    // SAFETY: ioprio_set only reads its integer arguments; who = 0 is the calling thread.
    unsafe {
        const IOPRIO_WHO_PROCESS: libc::c_long = 1;
        const IOPRIO_CLASS_IDLE: libc::c_long = 3;
        libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0 as libc::c_long, IOPRIO_CLASS_IDLE << 13);
    }
    let mut buffer = vec![0u8; 8 << 20];
    let mut total = 0;
    for path in paths {
        let Ok(mut file) = File::open(path) else { continue };
        while let Ok(n) = file.read(&mut buffer) {
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    total
}

/// Makes a weight on the device in cubecl's pool for long-lived tensors,
/// where each gets a buffer of its exact size; the dynamic pools round it up
/// into pages shared with activations, which stay reserved. GPU run 9
/// (H200): 14.7 GB reserved after loading 12.0 GB of DiT and VAE weights.
/// Backends without pools (flex) just run `make`.
fn persistent<B: Backend, const D: usize, T: Send>(
    device: &B::Device,
    input: T,
    make: impl Fn(T) -> Tensor<B, D> + Send,
) -> Tensor<B, D> {
    B::memory_persistent_allocations(device, input, make)
}

/// Supplies parameters by canonical name; see the module docs.
pub trait WeightSource<B: Backend> {
    fn device(&self) -> &B::Device;
    /// A parameter of PyTorch shape `shape`.
    fn tensor<const D: usize>(&mut self, name: &str, shape: [usize; D], init: Init) -> Result<Tensor<B, D>>;

    fn param<const D: usize>(&mut self, name: &str, shape: [usize; D], init: Init) -> Result<Param<Tensor<B, D>>> {
        Ok(Param::from_tensor(self.tensor(name, shape, init)?))
    }
}

/// Random initialisation in the chosen float dtype.
pub struct RandomWeights<B: Backend> {
    device: B::Device,
    dtype: DType,
}

impl<B: Backend> RandomWeights<B> {
    pub fn new(device: &B::Device, dtype: DType) -> Self {
        Self { device: device.clone(), dtype }
    }
}

impl<B: Backend> WeightSource<B> for RandomWeights<B> {
    fn device(&self) -> &B::Device {
        &self.device
    }
    fn tensor<const D: usize>(&mut self, _name: &str, shape: [usize; D], init: Init) -> Result<Tensor<B, D>> {
        let (device, dtype) = (&self.device, self.dtype);
        // The f32 draw is made in the persistent pool too when the dtype is
        // not f32; `crate::bench` cleans up after loading.
        Ok(persistent(device, init, |init| {
            let t: Tensor<B, D> = match init {
                Init::Ones => Tensor::ones(shape, device),
                Init::Zeros => Tensor::zeros(shape, device),
                Init::FanIn(fan) => {
                    let k = 1.0 / (fan.max(1) as f64).sqrt();
                    Tensor::random(shape, Distribution::Uniform(-k, k), device)
                }
                Init::Normal(std) => Tensor::random(shape, Distribution::Normal(0.0, std), device),
            };
            t.cast(dtype)
        }))
    }
}

/// Records every requested parameter; hands out 1-element placeholders.
pub struct ShapePlan<B: Backend> {
    device: B::Device,
    pub requested: Vec<(String, Vec<usize>)>,
}

impl<B: Backend> ShapePlan<B> {
    pub fn new(device: &B::Device) -> Self {
        Self { device: device.clone(), requested: Vec::new() }
    }
}

impl<B: Backend> WeightSource<B> for ShapePlan<B> {
    fn device(&self) -> &B::Device {
        &self.device
    }
    fn tensor<const D: usize>(&mut self, name: &str, shape: [usize; D], _init: Init) -> Result<Tensor<B, D>> {
        self.requested.push((name.to_string(), shape.to_vec()));
        Ok(Tensor::zeros([1; D], &self.device))
    }
}

/// Whether a stored shape serves a requested one: equal, or equal up to
/// trailing size-1 dimensions (1×1 conv weights used as linear layers).
fn shape_serves(stored: &[usize], requested: &[usize]) -> bool {
    stored == requested
        || (stored.len() > requested.len()
            && stored[..requested.len()] == *requested
            && stored[requested.len()..].iter().all(|&d| d == 1))
}

/// Checks every planned parameter against a store; all problems in one error.
pub fn check_plan(
    component: &str,
    plan: &[(String, Vec<usize>)],
    store: &TensorStore,
    layout: &KeyLayout,
) -> Result<()> {
    let mut problems = Vec::new();
    for (name, shape) in plan {
        let loc = layout.locate(name);
        match store.get(&loc.key) {
            None => problems.push(format!("missing tensor {}", loc.key)),
            Some(info) if !info.dtype.is_float() => problems.push(format!(
                "{} is stored as {}, not as floating-point weights (unsupported quantisation)",
                loc.key,
                info.dtype.name()
            )),
            Some(info) => {
                let mut stored = info.shape.clone();
                if let Some((_, n)) = loc.chunk {
                    if stored.first().is_some_and(|d| d % n == 0) {
                        stored[0] /= n;
                    } else {
                        problems.push(format!("{}: shape {:?} cannot be split in {n}", loc.key, info.shape));
                        continue;
                    }
                }
                if !shape_serves(&stored, shape) {
                    problems.push(format!("{}: expected shape {shape:?}, found {:?}", loc.key, stored));
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(EngineError::WeightMismatch { component: component.to_string(), problems })
    }
}

/// Loads parameters from a checked [`TensorStore`], one at a time.
pub struct Checkpoint<'a, B: Backend> {
    device: B::Device,
    dtype: DType,
    store: &'a TensorStore,
    layout: KeyLayout,
    /// Called after each tensor with (tensors loaded, bytes loaded).
    pub on_progress: Option<Box<dyn FnMut(usize, u64) + 'a>>,
    loaded: usize,
    loaded_bytes: u64,
}

impl<'a, B: Backend> Checkpoint<'a, B> {
    pub fn new(store: &'a TensorStore, layout: KeyLayout, device: &B::Device, dtype: DType) -> Self {
        Self { device: device.clone(), dtype, store, layout, on_progress: None, loaded: 0, loaded_bytes: 0 }
    }
}

impl<B: Backend> WeightSource<B> for Checkpoint<'_, B> {
    fn device(&self) -> &B::Device {
        &self.device
    }
    fn tensor<const D: usize>(&mut self, name: &str, shape: [usize; D], _init: Init) -> Result<Tensor<B, D>> {
        let loc = self.layout.locate(name);
        let info = self.store.get(&loc.key).ok_or_else(|| EngineError::WeightMismatch {
            component: self.store.path().display().to_string(),
            problems: vec![format!("missing tensor {}", loc.key)],
        })?;
        let rows = loc.chunk.map(|(i, n)| {
            let r = info.shape[0] / n;
            i * r..(i + 1) * r
        });
        let data = if self.dtype == DType::BF16 {
            TensorData::new(self.store.read_bf16(&loc.key, rows).expect("checked"), shape)
        } else {
            TensorData::new(self.store.read_f32(&loc.key, rows).expect("checked"), shape)
        };
        self.loaded += 1;
        self.loaded_bytes += (data.num_elements() * self.dtype.size()) as u64;
        if let Some(cb) = self.on_progress.as_mut() {
            cb(self.loaded, self.loaded_bytes);
        }
        let (device, dtype) = (&self.device, self.dtype);
        Ok(persistent(device, data, |data| Tensor::from_data(data, (device, dtype))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_ahead_reads_every_readable_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.safetensors");
        std::fs::write(&a, vec![0u8; 10_000_000]).unwrap();
        let missing = dir.path().join("missing.safetensors");
        assert_eq!(read_ahead(&[a.clone(), missing, a]), 20_000_000);
        assert_eq!(read_ahead(&[]), 0);
    }

    #[test]
    fn comfy_layout_maps_fused_qkv_and_renames() {
        let l = KeyLayout::ComfyDit { prefix: "model.diffusion_model.".into() };
        assert_eq!(
            l.locate("layers.3.attention.to_k.weight"),
            Located { key: "model.diffusion_model.layers.3.attention.qkv.weight".into(), chunk: Some((1, 3)) }
        );
        assert_eq!(
            l.locate("layers.0.attention.to_out.0.weight").key,
            "model.diffusion_model.layers.0.attention.out.weight"
        );
        assert_eq!(
            l.locate("noise_refiner.1.attention.norm_q.weight").key,
            "model.diffusion_model.noise_refiner.1.attention.q_norm.weight"
        );
        assert_eq!(l.locate("all_x_embedder.2-1.bias").key, "model.diffusion_model.x_embedder.bias");
        assert_eq!(
            l.locate("all_final_layer.2-1.linear.weight").key,
            "model.diffusion_model.final_layer.linear.weight"
        );
        assert_eq!(l.locate("cap_pad_token").key, "model.diffusion_model.cap_pad_token");
    }

    #[test]
    fn bfl_vae_layout_reverses_up_blocks_and_renames_attention() {
        let l = KeyLayout::BflVae { prefix: String::new(), up_blocks: 4 };
        assert_eq!(l.locate("decoder.up_blocks.0.resnets.2.conv1.weight").key, "decoder.up.3.block.2.conv1.weight");
        assert_eq!(
            l.locate("decoder.up_blocks.3.resnets.0.conv_shortcut.bias").key,
            "decoder.up.0.block.0.nin_shortcut.bias"
        );
        assert_eq!(l.locate("decoder.up_blocks.1.upsamplers.0.conv.weight").key, "decoder.up.2.upsample.conv.weight");
        assert_eq!(
            l.locate("encoder.down_blocks.2.downsamplers.0.conv.weight").key,
            "encoder.down.2.downsample.conv.weight"
        );
        assert_eq!(
            l.locate("decoder.mid_block.attentions.0.to_out.0.weight").key,
            "decoder.mid.attn_1.proj_out.weight"
        );
        assert_eq!(l.locate("decoder.mid_block.resnets.1.norm2.weight").key, "decoder.mid.block_2.norm2.weight");
        assert_eq!(l.locate("encoder.conv_norm_out.bias").key, "encoder.norm_out.bias");
    }

    #[test]
    fn stored_shapes_serve_requests_up_to_trailing_ones() {
        assert!(shape_serves(&[4, 4], &[4, 4]));
        assert!(shape_serves(&[4, 4, 1, 1], &[4, 4]));
        assert!(!shape_serves(&[4, 4, 3, 3], &[4, 4]));
        assert!(!shape_serves(&[4], &[4, 1]));
    }

    /// Weights get buffers of their own size on a cubecl backend, so the
    /// pools reserve no more than the weights hold (lavapipe here:
    /// `cargo test --release -p zimage-engine --features wgpu --lib weights`).
    #[cfg(feature = "wgpu")]
    #[test]
    fn weights_take_no_more_device_memory_than_they_hold_on_wgpu() {
        use burn::tensor::backend::Backend;
        type B = crate::device::WgpuBackend;
        let device = Default::default();
        let mut src = RandomWeights::<B>::new(&device, DType::F32);
        // Odd sizes, as a model's are: a dynamic pool would round each up
        // into a shared page of tens of MiB.
        let weights: Vec<Tensor<B, 2>> =
            (0..8).map(|i| src.tensor("w", [300 + i, 701], Init::Normal(0.02)).unwrap()).collect();
        B::memory_cleanup(&device);
        let memory = crate::device::device_memory::<B>(&device).expect("a wgpu device reports its memory");
        let bytes: u64 = weights.iter().map(|w| w.shape().num_elements() as u64 * 4).sum();
        assert!(memory.in_use >= bytes, "{memory:?}, weights {bytes}");
        assert!(memory.reserved <= bytes + bytes / 20, "{memory:?}, weights {bytes}");
    }
}
