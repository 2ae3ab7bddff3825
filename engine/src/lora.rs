//! LoRA adapters for the Z-Image DiT: reading the common file formats,
//! applying several at once with a strength each, and removing them again.
//!
//! Formats (all safetensors):
//! - diffusers / PEFT: `transformer.layers.0.attention.to_q.lora_A.weight`
//!   (`[rank, in]`) and `.lora_B.weight` (`[out, rank]`); the prefix may also
//!   be `diffusion_model.`, `base_model.model.` or none (AI-Toolkit, Musubi);
//!   alpha per module (`….alpha`) or in diffusers' `lora_adapter_metadata`
//!   (`lora_alpha`, `alpha_pattern`); without one the scale is 1;
//! - kohya / ComfyUI: `lora_unet_layers_0_attention_to_q.lora_down.weight`,
//!   `.lora_up.weight`, `.alpha` (scale `alpha / rank`, 1 without alpha),
//!   also with dots (`.lora.down.weight`);
//! - module names in either the diffusers (`to_q`, `to_out.0`,
//!   `all_x_embedder.2-1`) or the ComfyUI layout (`attention.qkv` fused,
//!   `attention.out`, `x_embedder`, `final_layer`): an update of the fused
//!   `qkv` is split by rows onto `to_q`, `to_k` and `to_v`.
//!
//! Applying: every touched linear weight becomes
//! `W + Σ strength_i · scale_i · up_i · down_i` (what diffusers' `fuse_lora`
//! computes), always from the *original* `W`, which is kept for exactly the
//! touched tensors. So changing strengths or the set of LoRAs never
//! accumulates rounding error, and [`AppliedLoras::clear`] restores the base
//! weights bit for bit without reloading anything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::Param;
use crate::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};

use crate::dit::ZImageDit;
use crate::error::{EngineError, Result};
use crate::pipeline::ModelKind;
use crate::weights::TensorStore;

/// The key convention a LoRA file uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    /// `lora_A` / `lora_B` (diffusers, PEFT, AI-Toolkit).
    Diffusers,
    /// `lora_down` / `lora_up` (kohya sd-scripts, ComfyUI, Musubi).
    Kohya,
}

impl LoraFormat {
    pub fn name(self) -> &'static str {
        match self {
            LoraFormat::Diffusers => "diffusers",
            LoraFormat::Kohya => "kohya",
        }
    }
}

/// Which DiT weights one low-rank pair updates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoraTarget {
    /// A linear layer by its diffusers name, e.g. `layers.0.attention.to_q`.
    Linear(String),
    /// ComfyUI's fused `qkv` of a block (`layers.0`): rows split onto
    /// `to_q`, `to_k`, `to_v` in that order.
    FusedQkv(String),
}

/// One module's low-rank pair: tensor names in the file, rank and alpha.
#[derive(Debug, Clone)]
struct LoraModule {
    target: LoraTarget,
    down: String,
    up: String,
    rank: usize,
    d_in: usize,
    d_out: usize,
    alpha: Option<f32>,
}

/// What a LoRA's metadata says it was trained on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrainedOn {
    Turbo,
    Base,
    /// Another architecture, with the metadata value that says so.
    Other(String),
}

/// A LoRA file, parsed and checked for consistency (not yet against a model).
pub struct LoraFile {
    pub path: PathBuf,
    /// File stem, for messages and lists.
    pub name: String,
    pub format: LoraFormat,
    /// The safetensors `__metadata__` strings.
    pub metadata: BTreeMap<String, String>,
    /// Keys for components other than the DiT (text encoder), not applied.
    pub ignored_keys: Vec<String>,
    modules: Vec<LoraModule>,
    store: TensorStore,
}

/// Prefixes that wrap DiT module names in the various trainers' files.
const DIT_PREFIXES: [&str; 6] = [
    "transformer.",
    "model.diffusion_model.",
    "diffusion_model.",
    "base_model.model.",
    "lora_unet_",
    "lora_transformer_",
];
/// Prefixes of text-encoder LoRA keys (ignored: we adapt the DiT only).
const TEXT_ENCODER_PREFIXES: [&str; 4] = ["lora_te", "text_encoder.", "text_encoders.", "te."];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
}

/// Splits a key into (module, part, format): the part suffixes of every
/// supported convention, PEFT's `.default` adapter name included.
fn split_key(key: &str) -> Option<(&str, Part, LoraFormat)> {
    const SUFFIXES: [(&str, Part, LoraFormat); 9] = [
        (".lora_A.weight", Part::Down, LoraFormat::Diffusers),
        (".lora_B.weight", Part::Up, LoraFormat::Diffusers),
        (".lora_A.default.weight", Part::Down, LoraFormat::Diffusers),
        (".lora_B.default.weight", Part::Up, LoraFormat::Diffusers),
        (".lora_down.weight", Part::Down, LoraFormat::Kohya),
        (".lora_up.weight", Part::Up, LoraFormat::Kohya),
        (".lora.down.weight", Part::Down, LoraFormat::Kohya),
        (".lora.up.weight", Part::Up, LoraFormat::Kohya),
        (".alpha", Part::Alpha, LoraFormat::Kohya),
    ];
    SUFFIXES.iter().find_map(|(suffix, part, format)| key.strip_suffix(suffix).map(|m| (m, *part, *format)))
}

/// Maps a module name (dots or kohya underscores, diffusers or ComfyUI
/// naming, prefix already removed) to the DiT weights it updates.
pub fn parse_module(module: &str) -> Option<LoraTarget> {
    // One spelling for both conventions: kohya replaced every '.' by '_'.
    let flat = module.replace('.', "_");
    const GLOBALS: [(&str, &str); 10] = [
        ("all_x_embedder_2-1", "all_x_embedder.2-1"),
        ("x_embedder", "all_x_embedder.2-1"),
        ("cap_embedder_1", "cap_embedder.1"),
        ("t_embedder_mlp_0", "t_embedder.mlp.0"),
        ("t_embedder_mlp_2", "t_embedder.mlp.2"),
        ("all_final_layer_2-1_linear", "all_final_layer.2-1.linear"),
        ("final_layer_linear", "all_final_layer.2-1.linear"),
        ("all_final_layer_2-1_adaLN_modulation_1", "all_final_layer.2-1.adaLN_modulation.1"),
        ("final_layer_adaLN_modulation_1", "all_final_layer.2-1.adaLN_modulation.1"),
        ("cap_embedder_1_linear", "cap_embedder.1"),
    ];
    if let Some((_, name)) = GLOBALS.iter().find(|(f, _)| *f == flat) {
        return Some(LoraTarget::Linear(name.to_string()));
    }
    const BLOCK_MODULES: [(&str, &str); 10] = [
        ("attention_to_q", "attention.to_q"),
        ("attention_to_k", "attention.to_k"),
        ("attention_to_v", "attention.to_v"),
        ("attention_to_out_0", "attention.to_out.0"),
        ("attention_to_out", "attention.to_out.0"),
        ("attention_out", "attention.to_out.0"),
        ("feed_forward_w1", "feed_forward.w1"),
        ("feed_forward_w2", "feed_forward.w2"),
        ("feed_forward_w3", "feed_forward.w3"),
        ("adaLN_modulation_0", "adaLN_modulation.0"),
    ];
    for group in ["layers", "noise_refiner", "context_refiner"] {
        let Some(rest) = flat.strip_prefix(group).and_then(|r| r.strip_prefix('_')) else { continue };
        let (index, tail) = rest.split_once('_')?;
        let index: usize = index.parse().ok()?;
        let block = format!("{group}.{index}");
        if tail == "attention_qkv" {
            return Some(LoraTarget::FusedQkv(block));
        }
        return BLOCK_MODULES
            .iter()
            .find(|(f, _)| *f == tail)
            .map(|(_, name)| LoraTarget::Linear(format!("{block}.{name}")));
    }
    None
}

impl LoraFile {
    /// Reads a LoRA's header and checks that every module has a matching
    /// down/up pair of consistent rank; no weights are read yet.
    pub fn open(path: &Path) -> Result<Self> {
        let store = TensorStore::open_files(&[path.to_path_buf()])?;
        let bad = |reason: String| EngineError::BadLora { path: path.to_path_buf(), reason };
        let mut parts: BTreeMap<String, [Option<String>; 3]> = BTreeMap::new();
        let mut ignored_keys = Vec::new();
        let mut unknown = Vec::new();
        let mut formats = (0usize, 0usize);
        for key in store.names() {
            if key.contains("dora_scale") {
                return Err(bad("DoRA adapters (dora_scale) are not supported".into()));
            }
            if key.contains(".lokr_") || key.contains(".hada_") {
                return Err(bad("LoKr / LoHa adapters are not supported, only LoRA".into()));
            }
            if TEXT_ENCODER_PREFIXES.iter().any(|p| key.starts_with(p)) {
                ignored_keys.push(key.to_string());
                continue;
            }
            let Some((module, part, format)) = split_key(key) else {
                unknown.push(key.to_string());
                continue;
            };
            match (format, part) {
                (_, Part::Alpha) => {}
                (LoraFormat::Diffusers, _) => formats.0 += 1,
                (LoraFormat::Kohya, _) => formats.1 += 1,
            }
            let module = DIT_PREFIXES.iter().find_map(|p| module.strip_prefix(p)).unwrap_or(module);
            let slot = match part {
                Part::Down => 0,
                Part::Up => 1,
                Part::Alpha => 2,
            };
            parts.entry(module.to_string()).or_default()[slot] = Some(key.to_string());
        }
        if !unknown.is_empty() {
            return Err(bad(format!(
                "{} keys are not LoRA weights, e.g. {}",
                unknown.len(),
                unknown.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        let adapter_alpha = AdapterAlpha::from_metadata(store.metadata());
        let mut modules = Vec::new();
        let mut foreign = Vec::new();
        for (module, [down, up, alpha]) in parts {
            let Some(target) = parse_module(&module) else {
                foreign.push(module);
                continue;
            };
            let (down, up) = match (down, up) {
                (Some(d), Some(u)) => (d, u),
                (None, _) => return Err(bad(format!("module {module} has an up matrix but no down (lora_A) matrix"))),
                (_, None) => return Err(bad(format!("module {module} has a down matrix but no up (lora_B) matrix"))),
            };
            let shape2 = |key: &str| -> Result<[usize; 2]> {
                let info = store.get(key).ok_or_else(|| bad(format!("{key} is missing")))?;
                if !info.dtype.is_float() {
                    return Err(bad(format!("{key} is stored as {}, not floats", info.dtype.name())));
                }
                // 1×1 conv shapes ([r, in, 1, 1]) are accepted as matrices.
                match info.shape.as_slice() {
                    [a, b] => Ok([*a, *b]),
                    [a, b, rest @ ..] if rest.iter().all(|&d| d == 1) => Ok([*a, *b]),
                    s => Err(bad(format!("{key} has shape {s:?}, not a matrix"))),
                }
            };
            let [rank, d_in] = shape2(&down)?;
            let [d_out, up_rank] = shape2(&up)?;
            if rank != up_rank || rank == 0 {
                return Err(bad(format!("module {module}: down has rank {rank} but up has rank {up_rank}")));
            }
            let alpha = match alpha {
                Some(key) => {
                    let values = store.read_f32(&key, None).unwrap_or_default();
                    match values.as_slice() {
                        [a] if a.is_finite() => Some(*a),
                        _ => return Err(bad(format!("{key} must be one finite number"))),
                    }
                }
                None => adapter_alpha.for_module(&module),
            };
            modules.push(LoraModule { target, down, up, rank, d_in, d_out, alpha });
        }
        if !foreign.is_empty() {
            return Err(bad(format!(
                "{} modules are not in the Z-Image DiT (is this a LoRA for another model?), e.g. {}",
                foreign.len(),
                foreign.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        if modules.is_empty() {
            return Err(bad("no LoRA weights for the DiT found".into()));
        }
        let format = if formats.0 >= formats.1 { LoraFormat::Diffusers } else { LoraFormat::Kohya };
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let metadata = store.metadata().clone();
        Ok(Self { path: path.to_path_buf(), name, format, metadata, ignored_keys, modules, store })
    }

    /// Number of modules (low-rank pairs) the file holds.
    pub fn module_count(&self) -> usize {
        self.modules.len()
    }

    /// The targets of every module, in file order.
    pub fn targets(&self) -> impl Iterator<Item = &LoraTarget> {
        self.modules.iter().map(|m| &m.target)
    }

    /// What the metadata says the LoRA was trained on, if it says.
    pub fn trained_on(&self) -> Option<TrainedOn> {
        trained_on(&self.metadata)
    }
}

/// diffusers' `lora_adapter_metadata` (PEFT `LoraConfig` fields, keys
/// optionally prefixed `transformer.`): the alpha of modules without an
/// `.alpha` tensor.
#[derive(Debug, Default)]
struct AdapterAlpha {
    alpha: Option<f32>,
    pattern: Vec<(String, f32)>,
}

impl AdapterAlpha {
    fn from_metadata(metadata: &BTreeMap<String, String>) -> Self {
        let Some(json) =
            metadata.get("lora_adapter_metadata").and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
        else {
            return Self::default();
        };
        let field = |name: &str| json.get(format!("transformer.{name}")).or_else(|| json.get(name));
        let alpha = field("lora_alpha").and_then(|v| v.as_f64()).map(|a| a as f32);
        let pattern = field("alpha_pattern")
            .and_then(|v| v.as_object())
            .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_f64()? as f32))).collect())
            .unwrap_or_default();
        Self { alpha, pattern }
    }

    /// PEFT matches a pattern key against the end of the module's name.
    fn for_module(&self, module: &str) -> Option<f32> {
        self.pattern
            .iter()
            .find(|(k, _)| module == k || module.ends_with(&format!(".{k}")))
            .map(|(_, a)| *a)
            .or(self.alpha)
    }
}

/// Reads the training base from kohya / modelspec / trainer metadata.
pub fn trained_on(metadata: &BTreeMap<String, String>) -> Option<TrainedOn> {
    const KEYS: [&str; 7] = [
        "ss_base_model_version",
        "modelspec.architecture",
        "ss_sd_model_name",
        "ss_base_model",
        "base_model",
        "base_model_name_or_path",
        "modelspec.base_model",
    ];
    let values: Vec<(&str, String)> = KEYS
        .iter()
        .filter_map(|k| metadata.get(*k).map(|v| (*k, v.to_lowercase())))
        .filter(|(_, v)| !v.is_empty())
        .collect();
    let is_zimage = |v: &str| v.contains("z-image") || v.contains("z_image") || v.contains("zimage");
    if values.iter().any(|(_, v)| is_zimage(v) && v.contains("turbo")) {
        return Some(TrainedOn::Turbo);
    }
    if values.iter().any(|(_, v)| is_zimage(v)) {
        return Some(TrainedOn::Base);
    }
    const FOREIGN: [&str; 12] = [
        "flux",
        "sdxl",
        "sd_xl",
        "stable-diffusion",
        "sd1",
        "sd2",
        "sd3",
        "qwen-image",
        "hunyuan",
        "wan",
        "lumina",
        "chroma",
    ];
    values
        .iter()
        .find(|(k, v)| *k != "ss_sd_model_name" && FOREIGN.iter().any(|f| v.contains(f)))
        .map(|(k, v)| TrainedOn::Other(format!("{k}={v}")))
}

/// Plain-words warnings about using `lora` on a model of kind `kind`, from
/// its metadata (empty when nothing is known or it matches).
pub fn compatibility_warnings(lora: &LoraFile, kind: ModelKind) -> Vec<String> {
    let mut out = Vec::new();
    match (lora.trained_on(), kind) {
        (Some(TrainedOn::Base), ModelKind::Turbo) => out.push(format!(
            "LoRA {} was trained on Z-Image (Base); on Turbo its effect may be weak or distorted (use it with Base, or lower its strength)",
            lora.name
        )),
        (Some(TrainedOn::Turbo), ModelKind::Base) => out.push(format!("LoRA {} was trained on Z-Image-Turbo; on Base its effect may differ", lora.name)),
        (Some(TrainedOn::Other(what)), _) => {
            out.push(format!("LoRA {}'s metadata says it was made for another model ({what}); its names match Z-Image, so it is applied", lora.name))
        }
        _ => {}
    }
    if !lora.ignored_keys.is_empty() {
        out.push(format!(
            "LoRA {}: {} text-encoder weights are ignored (only the DiT is adapted)",
            lora.name,
            lora.ignored_keys.len()
        ));
    }
    out
}

/// A1111's short LoRA hash, which Civitai matches in `Lora hashes`: the
/// first 12 hex digits of the sha256 of the file after its safetensors
/// header (so editing the metadata does not change it).
pub fn short_hash(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::{Read, Seek, SeekFrom};
    let io = |e: std::io::Error| EngineError::io(path, e);
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(io)?;
    file.seek(SeekFrom::Start(8u64.saturating_add(u64::from_le_bytes(len)))).map_err(io)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(io)?;
    Ok(hasher.finalize().iter().take(6).map(|b| format!("{b:02x}")).collect())
}

/// Parses `PATH[:STRENGTH]` (strength 1 when absent). A suffix that is not a
/// number stays part of the path (`C:\loras\x.safetensors`).
pub fn parse_lora_arg(arg: &str) -> Result<(PathBuf, f32)> {
    if let Some((path, strength)) = arg.rsplit_once(':') {
        if let Ok(s) = strength.trim().parse::<f32>() {
            if !s.is_finite() {
                return Err(EngineError::invalid(format!("LoRA strength {strength:?} is not a finite number")));
            }
            if path.is_empty() {
                return Err(EngineError::invalid(format!("--lora {arg:?}: no file before the strength")));
            }
            return Ok((PathBuf::from(path), s));
        }
    }
    if arg.is_empty() {
        return Err(EngineError::invalid("--lora needs a file (PATH or PATH:STRENGTH)"));
    }
    Ok((PathBuf::from(arg), 1.0))
}

/// Opens the LoRA of a `--lora PATH[:STRENGTH]` argument.
pub fn open_arg(arg: &str) -> Result<(LoraFile, f32)> {
    let (path, strength) = parse_lora_arg(arg)?;
    if !path.exists() {
        // `x.safetensors:abc` is a file with a mistyped strength, not a missing file.
        if let Some((file, suffix)) = arg.rsplit_once(':') {
            if Path::new(file).is_file() {
                return Err(EngineError::invalid(format!("--lora {arg:?}: strength {suffix:?} is not a number")));
            }
        }
    }
    Ok((LoraFile::open(&path)?, strength))
}

/// The linear layer of the DiT with diffusers name `name` (no `.weight`).
fn linear_mut<'a, B: Backend>(dit: &'a mut ZImageDit<B>, name: &str) -> Option<&'a mut Linear<B>> {
    match name {
        "cap_embedder.1" => return Some(&mut dit.cap_linear),
        "t_embedder.mlp.0" => return Some(&mut dit.t_embedder.linear_1),
        "t_embedder.mlp.2" => return Some(&mut dit.t_embedder.linear_2),
        _ => {}
    }
    if name.starts_with("all_x_embedder.") {
        return Some(&mut dit.x_embedder);
    }
    if let Some(rest) = name.strip_prefix("all_final_layer.") {
        let (_, tail) = rest.split_once('.')?;
        return match tail {
            "linear" => Some(&mut dit.final_layer.linear),
            "adaLN_modulation.1" => Some(&mut dit.final_layer.modulation),
            _ => None,
        };
    }
    let (group, rest) = name.split_once('.')?;
    let (index, tail) = rest.split_once('.')?;
    let index: usize = index.parse().ok()?;
    let block = match group {
        "layers" => dit.layers.get_mut(index)?,
        "noise_refiner" => dit.noise_refiner.get_mut(index)?,
        "context_refiner" => dit.context_refiner.get_mut(index)?,
        _ => return None,
    };
    match tail {
        "attention.to_q" => Some(&mut block.attention.to_q),
        "attention.to_k" => Some(&mut block.attention.to_k),
        "attention.to_v" => Some(&mut block.attention.to_v),
        "attention.to_out.0" => Some(&mut block.attention.to_out),
        "feed_forward.w1" => Some(&mut block.feed_forward.gate),
        "feed_forward.w3" => Some(&mut block.feed_forward.up),
        "feed_forward.w2" => Some(&mut block.feed_forward.down),
        "adaLN_modulation.0" => block.modulation.as_mut(),
        _ => None,
    }
}

/// `[d_out, d_in]` of a linear layer (its weight is held transposed, `[d_in, d_out]`).
fn linear_dims<B: Backend>(linear: &Linear<B>) -> [usize; 2] {
    let [d_in, d_out] = linear.weight.dims();
    [d_out, d_in]
}

/// One contribution to one linear weight: rows `rows` of the module's up
/// matrix times its down matrix, times `scale`.
struct Contribution<'a> {
    lora: &'a LoraFile,
    module: &'a LoraModule,
    rows: Option<std::ops::Range<usize>>,
    scale: f32,
}

/// The LoRAs currently applied to one DiT, with the original weights of
/// every tensor they touch.
pub struct AppliedLoras<B: Backend> {
    originals: BTreeMap<String, Tensor<B, 2>>,
    active: Vec<(String, f32)>,
}

impl<B: Backend> Default for AppliedLoras<B> {
    fn default() -> Self {
        Self { originals: BTreeMap::new(), active: Vec::new() }
    }
}

impl<B: Backend> AppliedLoras<B> {
    pub fn new() -> Self {
        Self::default()
    }

    /// (name, strength) of the applied LoRAs, in order.
    pub fn active(&self) -> &[(String, f32)] {
        &self.active
    }

    /// How many weight tensors are currently changed (and kept as originals).
    pub fn touched(&self) -> usize {
        self.originals.len()
    }

    /// Makes `loras` (each with its strength) the applied set, replacing
    /// what was applied before. Everything is checked first: on error the
    /// model is unchanged.
    pub fn apply(&mut self, dit: &mut ZImageDit<B>, loras: &[(&LoraFile, f32)]) -> Result<()> {
        // 1. Resolve every module onto linear layers and check shapes.
        let mut plan: BTreeMap<String, Vec<Contribution<'_>>> = BTreeMap::new();
        let mut problems = Vec::new();
        for &(lora, strength) in loras {
            for module in &lora.modules {
                let scale = strength * module.alpha.map(|a| a / module.rank as f32).unwrap_or(1.0);
                let parts: Vec<(String, Option<std::ops::Range<usize>>)> = match &module.target {
                    LoraTarget::Linear(name) => vec![(name.clone(), None)],
                    LoraTarget::FusedQkv(block) => {
                        if module.d_out % 3 != 0 {
                            problems.push(format!(
                                "{}: fused qkv update has {} rows, not a multiple of 3",
                                lora.name, module.d_out
                            ));
                            continue;
                        }
                        let r = module.d_out / 3;
                        ["to_q", "to_k", "to_v"]
                            .iter()
                            .enumerate()
                            .map(|(i, q)| (format!("{block}.attention.{q}"), Some(i * r..(i + 1) * r)))
                            .collect()
                    }
                };
                for (name, rows) in parts {
                    let Some(linear) = linear_mut(dit, &name) else {
                        problems.push(format!("{}: the model has no layer {name}", lora.name));
                        continue;
                    };
                    let [d_out, d_in] = linear_dims(linear);
                    let rows_out = rows.as_ref().map(|r| r.len()).unwrap_or(module.d_out);
                    if d_in != module.d_in || d_out != rows_out {
                        problems.push(format!(
                            "{}: {name} is {d_out}×{d_in} in the model but {rows_out}×{} in the LoRA",
                            lora.name, module.d_in
                        ));
                        continue;
                    }
                    plan.entry(name).or_default().push(Contribution { lora, module, rows, scale });
                }
            }
        }
        if !problems.is_empty() {
            let n = problems.len();
            problems.truncate(5);
            return Err(EngineError::LoraMismatch { count: n, problems });
        }

        // 2. Restore tensors no longer touched.
        let stale: Vec<String> = self.originals.keys().filter(|k| !plan.contains_key(*k)).cloned().collect();
        for name in stale {
            if let (Some(original), Some(linear)) = (self.originals.remove(&name), linear_mut(dit, &name)) {
                linear.weight = Param::from_tensor(original);
            }
        }

        // 3. Recompute each touched weight from its original.
        for (name, contributions) in &plan {
            let linear = linear_mut(dit, name).expect("resolved above");
            let original = self.originals.entry(name.clone()).or_insert_with(|| linear.weight.val()).clone();
            let device = original.device();
            let dtype = original.dtype();
            // Held as [d_in, d_out] (a transposed view); work in the stored [d_out, d_in].
            let mut weight = original.transpose().cast(DType::F32);
            for c in contributions {
                let read = |key: &str, rows: Option<std::ops::Range<usize>>| {
                    c.lora.store.read_f32(key, rows).ok_or_else(|| EngineError::BadLora {
                        path: c.lora.path.clone(),
                        reason: format!("{key} is missing"),
                    })
                };
                let m = c.module;
                let down = Tensor::<B, 2>::from_data(
                    TensorData::new(read(&m.down, None)?, [m.rank, m.d_in]),
                    (&device, DType::F32),
                );
                let up_rows = c.rows.clone().map(|r| r.len()).unwrap_or(m.d_out);
                let up = Tensor::<B, 2>::from_data(
                    TensorData::new(read(&m.up, c.rows.clone())?, [up_rows, m.rank]),
                    (&device, DType::F32),
                );
                weight = weight + up.matmul(down) * c.scale;
            }
            linear.weight = Linear::weight_from_stored(weight.cast(dtype));
        }
        self.active = loras.iter().map(|(l, s)| (l.name.clone(), *s)).collect();
        Ok(())
    }

    /// Removes every applied LoRA: the original tensors go back unchanged.
    pub fn clear(&mut self, dit: &mut ZImageDit<B>) {
        for (name, original) in std::mem::take(&mut self.originals) {
            if let Some(linear) = linear_mut(dit, &name) {
                linear.weight = Param::from_tensor(original);
            }
        }
        self.active.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_hash_covers_the_data_after_the_header() {
        use sha2::{Digest, Sha256};
        let dir = tempfile::tempdir().unwrap();
        let header = br#"{"__metadata__":{"a":"b"}}"#;
        let data = [1u8, 2, 3, 4, 5, 6, 7, 8];
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header);
        file.extend_from_slice(&data);
        let path = dir.path().join("x.safetensors");
        std::fs::write(&path, &file).unwrap();
        let expected: String = Sha256::digest(data).iter().take(6).map(|b| format!("{b:02x}")).collect();
        assert_eq!(short_hash(&path).unwrap(), expected);
        assert!(short_hash(&dir.path().join("missing.safetensors")).is_err());
    }

    #[test]
    fn module_names_of_every_convention_map_to_the_dit() {
        let lin = |s: &str| Some(LoraTarget::Linear(s.to_string()));
        assert_eq!(parse_module("layers.0.attention.to_q"), lin("layers.0.attention.to_q"));
        assert_eq!(parse_module("layers_12_attention_to_out_0"), lin("layers.12.attention.to_out.0"));
        assert_eq!(parse_module("layers.3.attention.out"), lin("layers.3.attention.to_out.0"));
        assert_eq!(parse_module("noise_refiner_1_feed_forward_w2"), lin("noise_refiner.1.feed_forward.w2"));
        assert_eq!(
            parse_module("context_refiner.0.attention.qkv"),
            Some(LoraTarget::FusedQkv("context_refiner.0".into()))
        );
        assert_eq!(parse_module("layers_5_attention_qkv"), Some(LoraTarget::FusedQkv("layers.5".into())));
        assert_eq!(parse_module("layers_5_adaLN_modulation_0"), lin("layers.5.adaLN_modulation.0"));
        assert_eq!(parse_module("all_x_embedder.2-1"), lin("all_x_embedder.2-1"));
        assert_eq!(parse_module("x_embedder"), lin("all_x_embedder.2-1"));
        assert_eq!(parse_module("final_layer_adaLN_modulation_1"), lin("all_final_layer.2-1.adaLN_modulation.1"));
        assert_eq!(parse_module("double_blocks_0_img_attn_qkv"), None);
        assert_eq!(parse_module("layers_x_attention_to_q"), None);
        assert_eq!(parse_module("layers.0.attention.norm_q"), None);
    }

    #[test]
    fn key_suffixes_and_formats() {
        assert_eq!(
            split_key("transformer.layers.0.attention.to_q.lora_A.weight"),
            Some(("transformer.layers.0.attention.to_q", Part::Down, LoraFormat::Diffusers))
        );
        assert_eq!(
            split_key("lora_unet_layers_0_attention_to_q.lora_up.weight"),
            Some(("lora_unet_layers_0_attention_to_q", Part::Up, LoraFormat::Kohya))
        );
        assert_eq!(split_key("lora_unet_layers_0_attention_to_q.alpha").map(|k| k.1), Some(Part::Alpha));
        assert_eq!(split_key("layers.0.attention.to_q.weight"), None);
    }

    #[test]
    fn lora_arguments_parse_with_and_without_strength() {
        assert_eq!(parse_lora_arg("a/b.safetensors").unwrap(), (PathBuf::from("a/b.safetensors"), 1.0));
        assert_eq!(parse_lora_arg("a/b.safetensors:0.5").unwrap(), (PathBuf::from("a/b.safetensors"), 0.5));
        assert_eq!(parse_lora_arg("b.safetensors:-1").unwrap(), (PathBuf::from("b.safetensors"), -1.0));
        assert_eq!(parse_lora_arg(r"C:\l\b.safetensors").unwrap().0, PathBuf::from(r"C:\l\b.safetensors"));
        assert!(parse_lora_arg(":0.5").is_err());
        assert!(parse_lora_arg("x:inf").is_err());
        assert!(parse_lora_arg("").is_err());
        // An existing file with a strength that is not a number says so.
        let file = std::env::temp_dir().join(format!("zimage-lora-arg-{}.safetensors", std::process::id()));
        std::fs::write(&file, b"x").unwrap();
        let err = open_arg(&format!("{}:abc", file.display())).err().map(|e| e.to_string()).unwrap_or_default();
        let _ = std::fs::remove_file(&file);
        assert!(err.ends_with("strength \"abc\" is not a number"), "{err}");
    }

    #[test]
    fn metadata_tells_base_from_turbo() {
        let meta = |pairs: &[(&str, &str)]| {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()
        };
        assert_eq!(trained_on(&meta(&[("ss_base_model_version", "z_image_turbo")])), Some(TrainedOn::Turbo));
        assert_eq!(trained_on(&meta(&[("modelspec.architecture", "Z-Image/lora")])), Some(TrainedOn::Base));
        assert_eq!(trained_on(&meta(&[("ss_sd_model_name", "z_image_bf16.safetensors")])), Some(TrainedOn::Base));
        assert_eq!(trained_on(&meta(&[("base_model", "Tongyi-MAI/Z-Image-Turbo")])), Some(TrainedOn::Turbo));
        assert!(matches!(
            trained_on(&meta(&[("modelspec.architecture", "flux-1-dev/lora")])),
            Some(TrainedOn::Other(_))
        ));
        assert_eq!(trained_on(&meta(&[("format", "pt")])), None);
    }

    #[test]
    fn adapter_metadata_gives_alpha_and_patterns() {
        let mut m = BTreeMap::new();
        m.insert(
            "lora_adapter_metadata".to_string(),
            r#"{"transformer.lora_alpha": 8, "transformer.r": 4, "transformer.alpha_pattern": {"layers.1.attention.to_q": 2}}"#.to_string(),
        );
        let a = AdapterAlpha::from_metadata(&m);
        assert_eq!(a.for_module("layers.0.attention.to_q"), Some(8.0));
        assert_eq!(a.for_module("layers.1.attention.to_q"), Some(2.0));
        assert_eq!(a.for_module("layers.11.attention.to_q"), Some(8.0));
        assert_eq!(AdapterAlpha::from_metadata(&BTreeMap::new()).for_module("x"), None);
    }
}
