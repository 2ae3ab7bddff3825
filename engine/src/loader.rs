//! Finding and loading a Z-Image model: a diffusers folder
//! (`model_index.json`, one folder per component) or ComfyUI single files
//! (a DiT file with `text_encoders/` and `vae/` beside its folder).
//!
//! Every component is checked completely (names and shapes against its
//! config) before its weights are read, and tensors go to the device one at
//! a time straight from the memory-mapped files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::DType;

use crate::dit::{ZImageDit, ZImageDitConfig};
use crate::error::{EngineError, Result};
use crate::pipeline::{ModelKind, ZImagePipeline};
use crate::qwen3::{Qwen3Config, Qwen3Encoder};
use crate::preview::LatentRgb;
use crate::text::{PromptTokenizer, TextEncoder};
use crate::vae::{Vae, VaeConfig};
use crate::weights::{check_plan, component_files, refuse_pickle, Checkpoint, KeyLayout, ShapePlan, TensorStore};

/// Where each component of a model lives on disk.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelFiles {
    /// Display name (folder or file name).
    pub name: String,
    pub dit: ComponentFiles,
    pub text_encoder: ComponentFiles,
    pub vae: ComponentFiles,
    pub tokenizer: PathBuf,
    /// Scheduler shift (3.0 when no scheduler config is found).
    pub shift: f32,
    /// Default image side: the VAE config's `sample_size` (1024 for the real models).
    pub default_size: u32,
    /// Steps the model was made for, when its `model_index.json` says
    /// (`zimage_default_steps`, which the demo models carry); else the kind's default.
    pub default_steps: Option<usize>,
}

/// One component: its safetensors files and, if present, its config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct ComponentFiles {
    pub files: Vec<PathBuf>,
    pub config: Option<PathBuf>,
}

/// Optional overrides for single-file setups.
#[derive(Debug, Clone, Default)]
pub struct ModelOverrides {
    pub text_encoder: Option<PathBuf>,
    pub vae: Option<PathBuf>,
    pub tokenizer: Option<PathBuf>,
}

fn not_found(path: &Path, what: &str) -> EngineError {
    EngineError::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, what.to_string()))
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| EngineError::BadConfig { path: path.to_path_buf(), reason: format!("not valid JSON ({e})") })
}

/// A diffusers component folder: its shards and its config.json.
fn component_in_dir(dir: &Path, stem: &str) -> Result<ComponentFiles> {
    let files = component_files(dir, stem)?;
    let config = Some(dir.join("config.json")).filter(|p| p.is_file());
    Ok(ComponentFiles { files, config })
}

impl ModelFiles {
    /// Resolves a model path: a diffusers folder, or a ComfyUI DiT file.
    pub fn locate(path: &Path, overrides: &ModelOverrides) -> Result<Self> {
        if !path.exists() {
            return Err(not_found(path, "no such file or folder"));
        }
        refuse_pickle(path)?;
        let name =
            path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string());
        if path.is_dir() {
            Self::diffusers(path, name, overrides)
        } else {
            Self::single_file(path, name, overrides)
        }
    }

    fn diffusers(dir: &Path, name: String, o: &ModelOverrides) -> Result<Self> {
        let index = dir.join("model_index.json");
        if !index.is_file() {
            return Err(EngineError::UnknownLayout {
                path: dir.to_path_buf(),
                reason: "no model_index.json: expected a diffusers model folder (with transformer/, text_encoder/, vae/, tokenizer/, scheduler/) or a .safetensors file".into(),
            });
        }
        let model_index = read_json(&index)?;
        if let Some(class) = model_index.get("_class_name").and_then(|v| v.as_str()) {
            if !class.starts_with("ZImage") {
                return Err(EngineError::UnknownLayout {
                    path: dir.to_path_buf(),
                    reason: format!("model_index.json says {class}, not a Z-Image pipeline"),
                });
            }
        }
        let shift = scheduler_shift(&dir.join("scheduler").join("scheduler_config.json"))?;
        let text_encoder = match &o.text_encoder {
            Some(p) => single_component(p)?,
            None => component_in_dir(&shared_dir(dir, "text_encoder"), "model")?,
        };
        let vae = match &o.vae {
            Some(p) => single_component(p)?,
            None => component_in_dir(&shared_dir(dir, "vae"), "diffusion_pytorch_model")?,
        };
        let tokenizer = o.tokenizer.clone().unwrap_or_else(|| shared_dir(dir, "tokenizer").join("tokenizer.json"));
        let default_size = default_size(&vae)?;
        let default_steps = model_index.get("zimage_default_steps").and_then(|v| v.as_u64()).map(|v| v as usize).filter(|&v| v >= 1);
        Ok(Self {
            name,
            default_steps,
            dit: component_in_dir(&dir.join("transformer"), "diffusion_pytorch_model")?,
            text_encoder,
            vae,
            tokenizer: tokenizer_file(&tokenizer)?,
            shift,
            default_size,
        })
    }

    /// A ComfyUI-style DiT file; the text encoder and VAE come from the
    /// overrides or from `../text_encoders/` and `../vae/` beside its folder.
    fn single_file(file: &Path, name: String, o: &ModelOverrides) -> Result<Self> {
        // The file itself first: a picture or a pickle given by mistake is said
        // to be that, not sent looking for a text encoder beside it.
        let dit = single_component(file)?;
        TensorStore::open_files(&dit.files)?;
        let models_root = file.parent().and_then(|p| p.parent()).map(Path::to_path_buf);
        let find = |sub: &str, wanted: &[&str]| -> Option<PathBuf> {
            let dir = models_root.as_ref()?.join(sub);
            let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
                .ok()?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let n = p.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
                    n.ends_with(".safetensors") && wanted.iter().any(|w| n.contains(w))
                })
                .collect();
            found.sort();
            found.into_iter().next()
        };
        // Where to put a missing part, in words for the app and the command line alike.
        let beside = |sub: &str| match &models_root {
            Some(root) => root.join(sub).display().to_string(),
            None => format!("a {sub}/ folder beside the DiT's folder"),
        };
        let text_encoder_path = o.text_encoder.clone().or_else(|| find("text_encoders", &["qwen_3", "qwen3"]));
        let text_encoder = match &text_encoder_path {
            Some(p) => single_component(p)?,
            None => {
                let why = format!(
                    "single-file model: no Qwen3 text encoder (qwen_3_4b.safetensors) in {}; put it there (command line: --text-encoder)",
                    beside("text_encoders")
                );
                return Err(not_found(file, &why));
            }
        };
        let vae = match o.vae.clone().or_else(|| find("vae", &["ae", "flux", "vae"])) {
            Some(p) => single_component(&p)?,
            None => {
                let why = format!("single-file model: no VAE (ae.safetensors) in {}; put it there (command line: --vae)", beside("vae"));
                return Err(not_found(file, &why));
            }
        };
        let tokenizer = match &o.tokenizer {
            Some(t) => tokenizer_file(t)?,
            None => match single_file_tokenizer(file, text_encoder_path.as_deref(), crate::discovery::hf_cache_dir().as_deref()) {
                Some(t) => t,
                None => {
                    let why = "single-file model: no Qwen3 tokenizer.json found; put the one from the tokenizer/ folder of \
                               Tongyi-MAI/Z-Image-Turbo beside this file (command line: --tokenizer)";
                    return Err(not_found(file, why));
                }
            },
        };
        let lower = name.to_lowercase();
        let shift = if lower.contains("turbo") {
            3.0
        } else if lower.contains("z_image") || lower.contains("z-image") {
            6.0
        } else {
            3.0
        };
        let default_size = default_size(&vae)?;
        Ok(Self { name, dit, text_encoder, vae, tokenizer, shift, default_size, default_steps: None })
    }
}

/// The VAE config's `sample_size`, rounded to a multiple of 16 (1024 without one).
fn default_size(vae: &ComponentFiles) -> Result<u32> {
    let size = match &vae.config {
        Some(cfg) => read_json(cfg)?.get("sample_size").and_then(|v| v.as_u64()).unwrap_or(1024),
        None => 1024,
    };
    Ok(((size.clamp(16, 4096) / 16) * 16) as u32)
}

/// `dir/name`, or `dir/../name` when only the parent has it: Turbo and Base
/// share the text encoder, tokenizer and VAE, so a pair can be stored once
/// (`pair/{text_encoder,tokenizer,vae}` beside `pair/turbo/` and `pair/base/`).
fn shared_dir(dir: &Path, name: &str) -> PathBuf {
    let own = dir.join(name);
    match dir.parent() {
        Some(parent) if !own.exists() && parent.join(name).is_dir() => parent.join(name),
        _ => own,
    }
}

/// Built-in model names and where their folders are looked for.
pub const BUILTIN_MODELS: [&str; 2] = ["demo-turbo", "demo-base"];

/// Resolves a model argument: a built-in name (`demo-turbo`, `demo-base`)
/// or a path. Built-in models live in `assets/demo/{turbo,base}`, searched in
/// `$ZIMAGE_ASSETS`, beside the executable (`assets/`, `../share/zimage-studio/assets/`,
/// and the source tree for `cargo run`).
pub fn resolve_model(arg: &str) -> Result<PathBuf> {
    let Some(variant) = arg.strip_prefix("demo-") else {
        return Ok(PathBuf::from(arg));
    };
    if !BUILTIN_MODELS.contains(&arg) {
        return Err(EngineError::invalid(format!(
            "unknown built-in model {arg:?}; the built-in models are {}",
            BUILTIN_MODELS.join(", ")
        )));
    }
    let candidates = asset_dirs();
    for root in &candidates {
        let dir = root.join("demo").join(variant);
        if dir.join("model_index.json").is_file() {
            return Ok(dir);
        }
    }
    Err(EngineError::invalid(format!(
        "the built-in {arg} model is not installed (looked in {}); train it with `zimage train-demo --out assets/demo`",
        candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )))
}

/// [`resolve_model`], then [`ModelFiles::locate`]. A built-in model keeps its
/// built-in name (`demo-turbo`), which the app shows and saved images record,
/// rather than its folder's (`turbo`, which says nothing of where it came from).
pub fn locate_model(arg: &str, overrides: &ModelOverrides) -> Result<ModelFiles> {
    let mut files = ModelFiles::locate(&resolve_model(arg)?, overrides)?;
    if BUILTIN_MODELS.contains(&arg) {
        files.name = arg.to_string();
    }
    Ok(files)
}

/// Folders that may hold the application's `assets/`.
pub fn asset_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(p) = std::env::var_os("ZIMAGE_ASSETS") {
        dirs.push(PathBuf::from(p));
    }
    if let Some(exe_dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        dirs.push(exe_dir.join("assets"));
        dirs.push(exe_dir.join("../share/zimage-studio/assets"));
        dirs.push(exe_dir.join("../lib/zimage-studio/assets"));
        // macOS app bundle: Contents/MacOS/<exe> and Contents/Resources/assets.
        dirs.push(exe_dir.join("../Resources/assets"));
    }
    dirs.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets"));
    dirs
}

/// Qwen3's `tokenizer.json` for a single-file model, which ComfyUI folders do
/// not hold (ComfyUI ships its own): beside the DiT file, beside the text
/// encoder file, or in a Z-Image snapshot of the Hugging Face cache.
fn single_file_tokenizer(dit: &Path, text_encoder: Option<&Path>, hf_cache: Option<&Path>) -> Option<PathBuf> {
    let mut candidates = vec![dit.with_file_name("tokenizer.json")];
    candidates.extend(text_encoder.map(|t| t.with_file_name("tokenizer.json")));
    for (repo, _) in crate::discovery::HF_REPOS {
        for snapshot in hf_cache.map(|c| crate::discovery::hf_snapshots(c, repo)).unwrap_or_default() {
            candidates.push(snapshot.join("tokenizer").join("tokenizer.json"));
        }
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// A single `.safetensors` file, with an optional `<stem>.json` config beside it.
fn single_component(path: &Path) -> Result<ComponentFiles> {
    refuse_pickle(path)?;
    if path.is_dir() {
        let stem = if path.join("diffusion_pytorch_model.safetensors").exists()
            || path.join("diffusion_pytorch_model.safetensors.index.json").exists()
        {
            "diffusion_pytorch_model"
        } else {
            "model"
        };
        return component_in_dir(path, stem);
    }
    if !path.is_file() {
        return Err(not_found(path, "no such file"));
    }
    let sidecar = path.with_extension("json");
    Ok(ComponentFiles { files: vec![path.to_path_buf()], config: Some(sidecar).filter(|p| p.is_file()) })
}

fn tokenizer_file(path: &Path) -> Result<PathBuf> {
    let file = if path.is_dir() { path.join("tokenizer.json") } else { path.to_path_buf() };
    if !file.is_file() {
        return Err(not_found(&file, "tokenizer.json not found"));
    }
    Ok(file)
}

/// `shift` from `scheduler_config.json`; refuses dynamic shifting, which no
/// Z-Image model uses.
fn scheduler_shift(path: &Path) -> Result<f32> {
    if !path.is_file() {
        return Ok(3.0);
    }
    let json = read_json(path)?;
    if json.get("use_dynamic_shifting").and_then(|v| v.as_bool()) == Some(true) {
        return Err(EngineError::BadConfig {
            path: path.to_path_buf(),
            reason: "use_dynamic_shifting=true is not supported by Z-Image".into(),
        });
    }
    let shift = json.get("shift").and_then(|v| v.as_f64()).unwrap_or(1.0);
    if !(shift.is_finite() && shift > 0.0) {
        return Err(EngineError::BadConfig { path: path.to_path_buf(), reason: format!("invalid shift {shift}") });
    }
    Ok(shift as f32)
}

/// Stage names reported while loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadStage {
    TextEncoder,
    Dit,
    Vae,
}

/// Progress while loading: stage, tensors loaded, bytes loaded.
pub type LoadProgress<'a> = &'a mut dyn FnMut(LoadStage, usize, u64);

/// Plans a module and checks the plan against the store (nothing is read);
/// evaluates to the number of parameters the module will hold.
macro_rules! plan_checked {
    ($component:expr, $store:expr, $layout:expr, $device:expr, |$src:ident| $build:expr) => {{
        let mut plan = ShapePlan::<B>::new($device);
        {
            let $src = &mut plan;
            let _ = $build?;
        }
        check_plan($component, &plan.requested, $store, &$layout)?;
        plan.requested.iter().map(|(_, shape)| shape.iter().product::<usize>() as u64).sum::<u64>()
    }};
}

/// Plans a module, checks the plan against the store, then loads it.
macro_rules! load_checked {
    ($component:expr, $store:expr, $layout:expr, $device:expr, $dtype:expr, $progress:expr, $stage:expr, |$src:ident| $build:expr) => {{
        let mut plan = ShapePlan::<B>::new($device);
        {
            let $src = &mut plan;
            let _ = $build?;
        }
        check_plan($component, &plan.requested, $store, &$layout)?;
        let mut ckpt = Checkpoint::new($store, $layout, $device, $dtype);
        let progress = &mut *$progress;
        ckpt.on_progress = Some(Box::new(move |n, bytes| progress($stage, n, bytes)));
        let $src = &mut ckpt;
        $build?
    }};
}

fn dit_config(files: &ComponentFiles, store: &TensorStore, layout: &KeyLayout) -> Result<ZImageDitConfig> {
    if let Some(cfg) = &files.config {
        return ZImageDitConfig::from_diffusers_json(&read_json(cfg)?)
            .map_err(|reason| EngineError::BadConfig { path: cfg.clone(), reason });
    }
    // Single files carry no config: read the sizes off the tensors.
    let shape = |name: &str| store.get(&layout.locate(name).key).map(|t| t.shape.clone());
    let bad = |reason: &str| EngineError::UnknownLayout { path: store.path().to_path_buf(), reason: reason.into() };
    let x = shape("all_x_embedder.2-1.weight").ok_or_else(|| bad("no x_embedder weight"))?;
    let cap = shape("cap_embedder.0.weight").ok_or_else(|| bad("no cap_embedder weight"))?;
    let head_dim = shape("layers.0.attention.norm_q.weight").map(|s| s[0]).unwrap_or(128);
    let count =
        |prefix: &str| (0..).take_while(|i| shape(&format!("{prefix}.{i}.attention_norm1.weight")).is_some()).count();
    let dim = x[0];
    let cfg = ZImageDitConfig::new()
        .with_dim(dim)
        .with_in_channels(x[1] / 4)
        .with_cap_feat_dim(cap[0])
        .with_n_heads(dim / head_dim.max(1))
        .with_n_layers(count("layers"))
        .with_n_refiner_layers(count("noise_refiner"))
        .with_axes_dims([head_dim / 4, head_dim * 3 / 8, head_dim * 3 / 8]);
    cfg.validate().map_err(|r| bad(&r))?;
    Ok(cfg)
}

fn qwen_config(files: &ComponentFiles, store: &TensorStore, layout: &KeyLayout) -> Result<Qwen3Config> {
    if let Some(cfg) = &files.config {
        return Qwen3Config::from_transformers_json(&read_json(cfg)?)
            .map_err(|reason| EngineError::BadConfig { path: cfg.clone(), reason });
    }
    let shape = |name: &str| store.get(&layout.locate(name).key).map(|t| t.shape.clone());
    let bad = |reason: &str| EngineError::UnknownLayout { path: store.path().to_path_buf(), reason: reason.into() };
    let embed = shape("embed_tokens.weight").ok_or_else(|| bad("no embed_tokens weight"))?;
    let head_dim = shape("layers.0.self_attn.q_norm.weight").ok_or_else(|| bad("no q_norm weight"))?[0];
    let q = shape("layers.0.self_attn.q_proj.weight").ok_or_else(|| bad("no q_proj weight"))?[0];
    let k = shape("layers.0.self_attn.k_proj.weight").ok_or_else(|| bad("no k_proj weight"))?[0];
    let ffn = shape("layers.0.mlp.gate_proj.weight").ok_or_else(|| bad("no gate_proj weight"))?[0];
    let layers = (0..).take_while(|i| shape(&format!("layers.{i}.input_layernorm.weight")).is_some()).count();
    let json = serde_json::json!({
        "vocab_size": embed[0], "hidden_size": embed[1], "num_hidden_layers": layers,
        "num_attention_heads": q / head_dim, "num_key_value_heads": k / head_dim, "head_dim": head_dim,
        "intermediate_size": ffn,
    });
    Qwen3Config::from_transformers_json(&json).map_err(|r| bad(&r))
}

fn vae_config(files: &ComponentFiles) -> Result<VaeConfig> {
    match &files.config {
        Some(cfg) => VaeConfig::from_diffusers_json(&read_json(cfg)?)
            .map_err(|reason| EngineError::BadConfig { path: cfg.clone(), reason }),
        // BFL ae.safetensors has no config: it is always the FLUX.1 autoencoder.
        None => Ok(VaeConfig::new()),
    }
}

/// The shared parts (tokenizer + text encoder, VAE) of a model.
pub struct SharedComponents<B: Backend> {
    /// `None` when the text encoder is not resident (checked, not loaded:
    /// the app's lowest memory plan loads it only to encode a prompt).
    pub text: Option<Arc<TextEncoder<B>>>,
    /// Width of the text encoder's features (what the DiT's caption embedder takes).
    pub text_dim: usize,
    pub vae: Arc<Vae<B>>,
    pub vae_scale: usize,
    /// The step previews' latent → RGB map for this VAE.
    pub preview: LatentRgb,
}

/// The VAE config's own latent → RGB map (`zimage_latent_rgb`), else Flux's.
fn vae_preview(files: &ComponentFiles) -> LatentRgb {
    files
        .config
        .as_ref()
        .and_then(|c| read_json(c).ok())
        .and_then(|j| j.get("zimage_latent_rgb").and_then(LatentRgb::from_json))
        .unwrap_or_default()
}

/// The tokenizer, the text encoder's store, layout and config, checked
/// against each other.
fn open_text_encoder(files: &ModelFiles) -> Result<(PromptTokenizer, TensorStore, KeyLayout, Qwen3Config)> {
    let tokenizer = PromptTokenizer::from_file(&files.tokenizer)?;
    let store = TensorStore::open_files(&files.text_encoder.files)?;
    let layout = KeyLayout::detect_text_encoder(&store)?;
    let qcfg = qwen_config(&files.text_encoder, &store, &layout)?;
    if tokenizer.vocab_size() > qcfg.vocab_size {
        return Err(EngineError::Tokenizer(format!(
            "the tokenizer has {} tokens but the text encoder only {}; they are from different models",
            tokenizer.vocab_size(),
            qcfg.vocab_size
        )));
    }
    Ok((tokenizer, store, layout, qcfg))
}

/// Loads the text encoder (with its tokenizer) alone.
pub fn load_text_encoder<B: Backend>(
    files: &ModelFiles,
    device: &B::Device,
    dtype: DType,
    progress: LoadProgress<'_>,
) -> Result<Arc<TextEncoder<B>>> {
    let (tokenizer, store, layout, qcfg) = open_text_encoder(files)?;
    let qwen: Qwen3Encoder<B> =
        load_checked!("text encoder", &store, layout, device, dtype, progress, LoadStage::TextEncoder, |src| {
            Qwen3Encoder::<B>::build(&qcfg, src)
        });
    Ok(Arc::new(TextEncoder { tokenizer, model: qwen }))
}

/// Loads the text encoder (with tokenizer) and the VAE.
pub fn load_shared<B: Backend>(
    files: &ModelFiles,
    device: &B::Device,
    dtype: DType,
    with_encoder: bool,
    progress: LoadProgress<'_>,
) -> Result<SharedComponents<B>> {
    load_shared_with(files, device, dtype, with_encoder, true, progress)
}

/// [`load_shared`], with the text encoder only checked (not loaded) when
/// `with_text` is false.
pub fn load_shared_with<B: Backend>(
    files: &ModelFiles,
    device: &B::Device,
    dtype: DType,
    with_encoder: bool,
    with_text: bool,
    progress: LoadProgress<'_>,
) -> Result<SharedComponents<B>> {
    let (text, text_dim) = if with_text {
        let text = load_text_encoder(files, device, dtype, &mut *progress)?;
        let dim = text.model.embed_tokens.dims()[1];
        (Some(text), dim)
    } else {
        let (_, store, layout, qcfg) = open_text_encoder(files)?;
        plan_checked!("text encoder", &store, layout, device, |src| Qwen3Encoder::<B>::build(&qcfg, src));
        (None, qcfg.hidden_size)
    };

    let vcfg = vae_config(&files.vae)?;
    let store = TensorStore::open_files(&files.vae.files)?;
    let layout = KeyLayout::detect_vae(&store, vcfg.block_out_channels.len())?;
    let has_encoder = store.names().any(|n| n.contains("encoder.conv_in"));
    let with_encoder = with_encoder && has_encoder;
    let vae: Vae<B> =
        load_checked!("VAE", &store, layout, device, dtype, progress, LoadStage::Vae, |src| Vae::<B>::build(
            &vcfg,
            src,
            with_encoder
        ));
    Ok(SharedComponents {
        text,
        text_dim,
        vae: Arc::new(vae),
        vae_scale: vcfg.scale(),
        preview: vae_preview(&files.vae),
    })
}

/// What a model needs in memory, from its files alone: every component is
/// checked (names and shapes) and counted, nothing is loaded.
#[derive(Debug, Clone)]
pub struct ModelPlan {
    pub text_encoder_params: u64,
    pub dit_params: u64,
    /// Decoder and encoder (the refine is img2img).
    pub vae_params: u64,
    pub dit_config: ZImageDitConfig,
    pub vae_config: VaeConfig,
}

impl ModelPlan {
    /// Working memory of `req` on this model (see `ZImagePipeline::working_memory_bytes`).
    pub fn working_memory_bytes(&self, req: &crate::pipeline::GenerateRequest) -> u64 {
        let scale = self.vae_config.scale();
        crate::pipeline::working_memory_bytes(&self.dit_config, scale, req, |h, w| {
            self.vae_config.decode_working_bytes(h, w)
        })
    }
}

/// Checks a model's files completely and counts its parameters without
/// loading any weight (a model can be checked, and its size known, before
/// deciding what to keep in memory).
pub fn plan_model<B: Backend>(files: &ModelFiles, device: &B::Device) -> Result<ModelPlan> {
    let (_, store, layout, qcfg) = open_text_encoder(files)?;
    let text_encoder_params =
        plan_checked!("text encoder", &store, layout, device, |src| Qwen3Encoder::<B>::build(&qcfg, src));
    drop(store);
    let vcfg = vae_config(&files.vae)?;
    let store = TensorStore::open_files(&files.vae.files)?;
    let layout = KeyLayout::detect_vae(&store, vcfg.block_out_channels.len())?;
    let has_encoder = store.names().any(|n| n.contains("encoder.conv_in"));
    let vae_params = plan_checked!("VAE", &store, layout, device, |src| Vae::<B>::build(&vcfg, src, has_encoder));
    drop(store);
    let store = TensorStore::open_files(&files.dit.files)?;
    let layout = KeyLayout::detect_dit(&store)?;
    let cfg = dit_config(&files.dit, &store, &layout)?;
    check_text_width(files, &cfg, qcfg.hidden_size)?;
    let dit_params = plan_checked!("DiT", &store, layout, device, |src| ZImageDit::<B>::build(&cfg, src));
    Ok(ModelPlan { text_encoder_params, dit_params, vae_params, dit_config: cfg, vae_config: vcfg })
}

fn check_text_width(files: &ModelFiles, cfg: &ZImageDitConfig, text_dim: usize) -> Result<()> {
    if cfg.cap_feat_dim != text_dim {
        return Err(EngineError::BadConfig {
            path: files.dit.files[0].clone(),
            reason: format!(
                "the DiT expects {}-wide text features but the text encoder gives {text_dim}",
                cfg.cap_feat_dim
            ),
        });
    }
    Ok(())
}

/// Loads a DiT and joins it with shared components into a pipeline.
pub fn load_pipeline_with<B: Backend>(
    files: &ModelFiles,
    shared: &SharedComponents<B>,
    device: &B::Device,
    dtype: DType,
    progress: LoadProgress<'_>,
) -> Result<ZImagePipeline<B>> {
    let store = TensorStore::open_files(&files.dit.files)?;
    let layout = KeyLayout::detect_dit(&store)?;
    let cfg = dit_config(&files.dit, &store, &layout)?;
    check_text_width(files, &cfg, shared.text_dim)?;
    let dit: ZImageDit<B> =
        load_checked!("DiT", &store, layout, device, dtype, progress, LoadStage::Dit, |src| ZImageDit::<B>::build(
            &cfg, src
        ));
    Ok(ZImagePipeline {
        name: files.name.clone(),
        kind: ModelKind::from_shift(files.shift),
        text: shared.text.clone(),
        dit,
        dit_config: cfg,
        vae: shared.vae.clone(),
        vae_scale: shared.vae_scale,
        preview: shared.preview.clone(),
        shift: files.shift,
        default_size: files.default_size,
        default_steps: files.default_steps.unwrap_or_else(|| ModelKind::from_shift(files.shift).default_steps()),
        device: device.clone(),
    })
}

/// Loads a whole model from disk.
pub fn load_pipeline<B: Backend>(
    files: &ModelFiles,
    device: &B::Device,
    dtype: DType,
    progress: LoadProgress<'_>,
) -> Result<ZImagePipeline<B>> {
    let shared = load_shared(files, device, dtype, true, progress)?;
    load_pipeline_with(files, &shared, device, dtype, progress)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::CpuBackend;
    use crate::pipeline::GenerateRequest;
    use burn::module::Module;

    #[test]
    fn plan_model_counts_what_loading_loads_and_estimates_the_same_working_memory() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-turbo");
        let files = ModelFiles::locate(&dir, &ModelOverrides::default()).unwrap();
        let device = Default::default();
        let plan = plan_model::<CpuBackend>(&files, &device).unwrap();
        let pipe = load_pipeline::<CpuBackend>(&files, &device, DType::F32, &mut |_, _, _| {}).unwrap();
        let text = pipe.text.as_ref().unwrap();
        assert_eq!(plan.text_encoder_params, text.model.num_params() as u64);
        assert_eq!(plan.dit_params, pipe.dit.num_params() as u64);
        assert_eq!(plan.vae_params, pipe.vae.num_params() as u64);
        let mut req = GenerateRequest::new("x", ModelKind::Base);
        for side in [64, 256, 1024] {
            (req.width, req.height) = (side, side);
            assert_eq!(plan.working_memory_bytes(&req), pipe.working_memory_bytes(&req), "{side}");
        }
        // Without the text encoder: checked, not loaded; same feature width.
        let shared = load_shared_with::<CpuBackend>(&files, &device, DType::F32, true, false, &mut |_, _, _| {}).unwrap();
        assert!(shared.text.is_none());
        assert_eq!(shared.text_dim, text.model.embed_tokens.dims()[1]);
        let bare = load_pipeline_with(&files, &shared, &device, DType::F32, &mut |_, _, _| {}).unwrap();
        assert!(bare.encode(&req).err().is_some_and(|e| e.to_string().contains("text encoder is not loaded")));
        assert_eq!(bare.weight_bytes(4)[0].1, 0);
    }

    /// A ComfyUI setup (DiT, `text_encoders/`, `vae/`) copied to `root`, with the tiny VAE's sidecar config.
    fn comfy_setup(root: &Path) -> PathBuf {
        let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        for (sub, file) in [("diffusion_models", "z_image_turbo_tiny.safetensors"), ("text_encoders", "qwen_3_tiny.safetensors"), ("vae", "ae.safetensors")] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
            std::fs::copy(fixtures.join("tiny-comfy").join(sub).join(file), root.join(sub).join(file)).unwrap();
        }
        std::fs::copy(fixtures.join("tiny-turbo/vae/config.json"), root.join("vae/ae.json")).unwrap();
        root.join("diffusion_models/z_image_turbo_tiny.safetensors")
    }

    /// Without `--tokenizer`, a single-file model finds Qwen3's tokenizer.json
    /// beside its DiT, beside its text encoder, or in a Z-Image snapshot of the
    /// Hugging Face cache; when none is there, the error says where to put it.
    #[test]
    fn a_single_file_model_finds_its_tokenizer_or_says_where_to_put_it() {
        let tokenizer = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-turbo/tokenizer/tokenizer.json");
        let tmp = tempfile::tempdir().unwrap();
        let dit = comfy_setup(tmp.path());
        let text_encoder = tmp.path().join("text_encoders/qwen_3_tiny.safetensors");
        let cache = tmp.path().join("hub");
        assert_eq!(single_file_tokenizer(&dit, Some(&text_encoder), Some(&cache)), None);
        if crate::discovery::hf_cache_dir().is_none_or(|c| single_file_tokenizer(&dit, None, Some(&c)).is_none()) {
            let err = ModelFiles::locate(&dit, &ModelOverrides::default()).unwrap_err().to_string();
            assert!(err.contains("no Qwen3 tokenizer.json found") && err.contains("beside this file") && !err.contains('\n'), "{err}");
        }

        let snapshot = cache.join("models--Tongyi-MAI--Z-Image-Turbo/snapshots/abc/tokenizer");
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::copy(&tokenizer, snapshot.join("tokenizer.json")).unwrap();
        assert_eq!(single_file_tokenizer(&dit, Some(&text_encoder), Some(&cache)), Some(snapshot.join("tokenizer.json")));

        std::fs::copy(&tokenizer, tmp.path().join("text_encoders/tokenizer.json")).unwrap();
        assert_eq!(single_file_tokenizer(&dit, Some(&text_encoder), Some(&cache)), Some(tmp.path().join("text_encoders/tokenizer.json")));

        std::fs::copy(&tokenizer, tmp.path().join("diffusion_models/tokenizer.json")).unwrap();
        let files = ModelFiles::locate(&dit, &ModelOverrides::default()).unwrap();
        assert_eq!(files.tokenizer, tmp.path().join("diffusion_models/tokenizer.json"), "beside the DiT comes first");
        plan_model::<CpuBackend>(&files, &Default::default()).expect("the whole setup checks out");
    }

    /// A picture given as the model is said to be no safetensors file, before
    /// anything is looked for beside it.
    #[test]
    fn a_picture_given_as_a_model_is_named_for_what_it_is() {
        let tmp = tempfile::tempdir().unwrap();
        let png = tmp.path().join("cat.png");
        std::fs::write(&png, b"\x89PNG\r\n\x1a\n not a model at all").unwrap();
        let err = ModelFiles::locate(&png, &ModelOverrides::default()).unwrap_err().to_string();
        assert!(err.contains("not a valid safetensors file") && !err.contains("text encoder"), "{err}");
    }

    /// A ComfyUI setup missing its text encoder or VAE names the folder to put it in.
    #[test]
    fn a_single_file_model_names_the_folder_of_a_missing_part() {
        let tmp = tempfile::tempdir().unwrap();
        let dit = comfy_setup(tmp.path());
        std::fs::remove_file(tmp.path().join("text_encoders/qwen_3_tiny.safetensors")).unwrap();
        let err = ModelFiles::locate(&dit, &ModelOverrides::default()).unwrap_err().to_string();
        let folder = tmp.path().join("text_encoders").display().to_string();
        assert!(err.contains("no Qwen3 text encoder") && err.contains(&format!("in {folder}; put it there")), "{err}");
        std::fs::remove_file(tmp.path().join("vae/ae.safetensors")).unwrap();
        let text_encoder = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-comfy/text_encoders/qwen_3_tiny.safetensors");
        let o = ModelOverrides { text_encoder: Some(text_encoder), ..Default::default() };
        let err = ModelFiles::locate(&dit, &o).unwrap_err().to_string();
        assert!(err.contains(&format!("no VAE (ae.safetensors) in {}", tmp.path().join("vae").display())), "{err}");
    }
}
