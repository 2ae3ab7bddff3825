//! Text-to-image and img2img sampling, step for step as `ZImagePipeline` and
//! `ZImageImg2ImgPipeline` (spec §1, §7):
//!
//! ```text
//! cap     = text_encoder(prompt)            (and negative, when CFG is on)
//! x       = randn(B, 16, H/8, W/8)          (torch-compatible, from the seed)
//! img2img: z0 = scale(mean + std·randn)     then x = σ_s·x + (1 − σ_s)·z0
//! for i in start..N:
//!     u = DiT(x, 1 − σ_i, cap)              (CFG: u = u⁺ + g(u⁺ − u⁻), renorm)
//!     x = x + (σ_{i+1} − σ_i)·(−u)
//! image = round(clamp(VAE(x/0.3611 + 0.1159)/2 + 0.5, 0, 1)·255)
//! ```
//!
//! The loop can pause at a step boundary and resume later with the same
//! result ([`PausedRun`]): the app pauses a Base refine to render a live image.
//!
//! With a `variety` above 0 (not in the reference), the first quarter of the
//! steps see `cap` with seeded noise added ([`crate::variety`]).

use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};

use crate::dit::{ZImageDit, ZImageDitConfig};
use crate::error::{EngineError, Result};
use crate::preview::{LatentRgb, RgbImage};
use crate::rng::TorchGenerator;
use crate::scheduler::Schedule;
use crate::text::TextEncoder;
use crate::vae::Vae;
use crate::variety;

/// Largest image side we accept: far above what the models were trained
/// for, and still inside the DiT's position table.
pub const MAX_SIDE: u32 = 4096;

/// Which of the two published models a checkpoint is (sets defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// Distilled: 8 steps, no CFG.
    Turbo,
    /// Non-distilled: 50 steps, CFG 4, negative prompt.
    Base,
}

impl ModelKind {
    /// Guessed from the scheduler shift (Turbo ships 3.0, Base 6.0).
    pub fn from_shift(shift: f32) -> Self {
        if shift >= 4.5 {
            ModelKind::Base
        } else {
            ModelKind::Turbo
        }
    }
    /// The scheduler shift of the published checkpoints (Turbo 3.0, Base 6.0).
    pub fn default_shift(self) -> f32 {
        match self {
            ModelKind::Turbo => 3.0,
            ModelKind::Base => 6.0,
        }
    }
    pub fn default_steps(self) -> usize {
        match self {
            ModelKind::Turbo => 8,
            ModelKind::Base => 50,
        }
    }
    pub fn default_guidance(self) -> f32 {
        match self {
            ModelKind::Turbo => 0.0,
            ModelKind::Base => 4.0,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Turbo => "turbo",
            ModelKind::Base => "base",
        }
    }
}

/// Everything that decides an image.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// One image per prompt (a batch).
    pub prompts: Vec<String>,
    /// Used when CFG is on; `""` is the reference's default.
    pub negative_prompt: String,
    pub seed: u64,
    pub steps: usize,
    /// `g` in `u = u⁺ + g(u⁺ − u⁻)`; CFG is on when `g > 0`.
    pub guidance: f32,
    /// Cap `‖u‖` at this multiple of `‖u⁺‖`; 0 = off.
    pub cfg_normalization: f32,
    /// Steps with `1 − σ > cfg_truncation` skip CFG; 1 = never.
    pub cfg_truncation: f32,
    pub width: u32,
    pub height: u32,
    /// img2img source (resized to width×height if needed) and strength in (0, 1].
    pub init: Option<RgbImage>,
    pub strength: f32,
    /// Noise on the prompt's features for the first quarter of the steps, as
    /// a multiple of each token's spread; 0 = off (see [`crate::variety`]).
    pub variety: f32,
}

/// Checks an image size: each side at least `pixel_multiple`, at most
/// [`MAX_SIDE`] and a multiple of `pixel_multiple`; one line saying what is
/// wrong (the app shows the same line under its Size fields).
pub fn validate_sides(width: u32, height: u32, pixel_multiple: u32) -> Result<()> {
    let bad = |m: String| Err(EngineError::invalid(m));
    let pm = pixel_multiple.max(1);
    for (name, v) in [("width", width), ("height", height)] {
        if v < pm {
            return bad(format!("{name} must be at least {pm}"));
        }
        // The bound first: an absurd size is told so, not offered a rounding.
        if v > MAX_SIDE {
            return bad(format!("{name} {v} is larger than the maximum of {MAX_SIDE}"));
        }
        if v % pm != 0 {
            return bad(format!("{name} {v} is not a multiple of {pm} (try {})", nearest_multiple(v, pm)));
        }
    }
    Ok(())
}

/// The multiple of `pm` nearest to `v` that is a valid side (at least `pm`,
/// at most [`MAX_SIDE`]).
pub fn nearest_multiple(v: u32, pm: u32) -> u32 {
    let pm = pm.max(1);
    let nearest = ((v as f64 / pm as f64).round() as u32).max(1) * pm;
    nearest.min(MAX_SIDE / pm * pm)
}

impl GenerateRequest {
    /// A request with the defaults of `kind`.
    pub fn new(prompt: impl Into<String>, kind: ModelKind) -> Self {
        Self {
            prompts: vec![prompt.into()],
            negative_prompt: String::new(),
            seed: 0,
            steps: kind.default_steps(),
            guidance: kind.default_guidance(),
            cfg_normalization: 0.0,
            cfg_truncation: 1.0,
            width: 1024,
            height: 1024,
            init: None,
            strength: 0.6,
            variety: 0.0,
        }
    }

    /// Checks the request; one line saying what is wrong.
    pub fn validate(&self, pixel_multiple: u32) -> Result<()> {
        let bad = |m: String| Err(EngineError::invalid(m));
        if self.prompts.is_empty() {
            return bad("no prompt given".into());
        }
        validate_sides(self.width, self.height, pixel_multiple)?;
        if self.steps == 0 || self.steps > 1000 {
            return bad(format!("steps must be between 1 and 1000, not {}", self.steps));
        }
        if !self.guidance.is_finite() || !(0.0..=100.0).contains(&self.guidance) {
            return bad(format!("guidance must be between 0 and 100, not {}", self.guidance));
        }
        if !self.cfg_normalization.is_finite() || self.cfg_normalization < 0.0 {
            return bad("cfg normalization must be 0 (off) or positive".into());
        }
        if !self.cfg_truncation.is_finite() || self.cfg_truncation < 0.0 {
            return bad("cfg truncation must be between 0 and 1".into());
        }
        if !self.variety.is_finite() || !(0.0..=variety::MAX_VARIETY).contains(&self.variety) {
            return bad(format!("variety must be between 0 and {}, not {}", variety::MAX_VARIETY, self.variety));
        }
        if self.init.is_some() {
            if !(self.strength > 0.0 && self.strength <= 1.0) {
                return bad(format!("strength must be in (0, 1], not {}", self.strength));
            }
            if Schedule::img2img_start(self.steps, self.strength) >= self.steps {
                return bad(format!(
                    "strength {} with {} steps leaves no step to run; raise the strength or the steps",
                    self.strength, self.steps
                ));
            }
        }
        Ok(())
    }

    /// Whether step `i` of `schedule` runs with CFG.
    pub fn cfg_at(&self, schedule: &Schedule, i: usize) -> bool {
        if self.guidance <= 0.0 {
            return false;
        }
        !(self.cfg_truncation <= 1.0 && schedule.model_time(i) > self.cfg_truncation)
    }
}

/// Reported after every step; return `false` from the callback to cancel
/// (or, with [`ZImagePipeline::sample_from`], a [`StepControl`]).
#[derive(Debug, Clone)]
pub struct StepProgress {
    /// Steps done so far (1-based) and the number that will run.
    pub done: usize,
    pub total: usize,
    /// x0 estimates as RGB at latent resolution, one per image, when asked for.
    pub previews: Vec<RgbImage>,
}

/// What the step callback of [`ZImagePipeline::sample_from`] wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepControl {
    Continue,
    /// Stop now with [`EngineError::Cancelled`].
    Cancel,
    /// Stop at this step boundary and hand back a [`PausedRun`] to resume.
    Pause,
}

/// A sampling run stopped at a step boundary. The noise, the init image's
/// encoding and the generator are used only before the first step, so the
/// latents and the next step's index are all the loop needs: resuming gives
/// bit for bit the latents of a run that never paused.
pub struct PausedRun<B: Backend> {
    /// Latents after the steps run so far `[B, 16, h, w]` (f32).
    latents: Tensor<B, 4>,
    /// Index into the schedule of the next step to run.
    next_step: usize,
    /// The request it belongs to, checked on resume.
    seed: u64,
    steps: usize,
}

/// How [`ZImagePipeline::sample_from`] ended.
pub enum Sampled<B: Backend> {
    /// Final latents `[B, 16, h, w]` (f32).
    Finished(Tensor<B, 4>),
    Paused(PausedRun<B>),
}

/// How [`ZImagePipeline::generate_from`] ended.
pub enum Generation<B: Backend> {
    Finished(Generated),
    Paused(PausedRun<B>),
}

/// Result of a run.
#[derive(Debug, Clone)]
pub struct Generated {
    /// Final model-space latents `[B, 16, h, w]`, row-major.
    pub latents: Vec<f32>,
    pub latent_shape: [usize; 4],
    pub images: Vec<RgbImage>,
}

/// Caption features for a batch (positive, and negative when CFG is on).
pub struct Conditioning<B: Backend> {
    pub positive: Vec<Tensor<B, 2>>,
    pub negative: Vec<Tensor<B, 2>>,
}

/// One Z-Image model ready to sample: its DiT with the shared text encoder and VAE.
pub struct ZImagePipeline<B: Backend> {
    pub name: String,
    pub kind: ModelKind,
    /// `None` while the text encoder is not resident: such a pipeline samples
    /// from given [`Conditioning`] and cannot [`encode`](Self::encode).
    pub text: Option<Arc<TextEncoder<B>>>,
    pub dit: ZImageDit<B>,
    pub dit_config: ZImageDitConfig,
    pub vae: Arc<Vae<B>>,
    /// Pixels per latent cell (8).
    pub vae_scale: usize,
    /// Latent → RGB map of the step previews (the VAE's own, or Flux's).
    pub preview: LatentRgb,
    /// Scheduler time shift from `scheduler_config.json`.
    pub shift: f32,
    /// The image side the model was made for (VAE config `sample_size`):
    /// 1024 for the real models, 128 for the built-in demo.
    pub default_size: u32,
    /// Sampling steps the model was made for (8 for Turbo, 50 for Base; the
    /// demo models say 4 and 30).
    pub default_steps: usize,
    pub device: B::Device,
}

/// Refuses `req` when the working memory it `need`s exceeds `available`
/// bytes, naming the request in the error.
pub fn check_working_memory(req: &GenerateRequest, need: u64, available: u64) -> Result<()> {
    if need > available {
        let n = req.prompts.len();
        let what = if n > 1 { format!("{n} images of {}x{}", req.width, req.height) } else { format!("a {}x{} image", req.width, req.height) };
        return Err(EngineError::InsufficientMemory { what, need, available });
    }
    Ok(())
}

/// The request's prompts through `text`, and its negative prompt when the
/// schedule (`steps`, `shift`) runs CFG on some step. Also used without a
/// pipeline, when the text encoder is resident alone (lowest memory plan).
pub fn encode_prompts<B: Backend>(text: &TextEncoder<B>, req: &GenerateRequest, shift: f32) -> Result<Conditioning<B>> {
    let positive = req.prompts.iter().map(|p| text.encode(p)).collect::<Result<Vec<_>>>()?;
    let schedule = Schedule::new(req.steps, shift);
    let needs_negative = (0..req.steps).any(|i| req.cfg_at(&schedule, i));
    let negative = if needs_negative {
        let neg = text.encode(&req.negative_prompt)?;
        vec![neg; req.prompts.len()]
    } else {
        Vec::new()
    };
    Ok(Conditioning { positive, negative })
}

impl<B: Backend> ZImagePipeline<B> {
    /// Width and height must be multiples of this (16).
    pub fn pixel_multiple(&self) -> u32 {
        (self.vae_scale * self.dit_config.patch_size) as u32
    }

    /// Bytes of the weights held in memory, per component (text encoder,
    /// DiT, VAE), at `dtype_bytes` per parameter. The text encoder and VAE
    /// may be shared with another pipeline (same `Arc`); a text encoder that
    /// is not resident counts 0.
    pub fn weight_bytes(&self, dtype_bytes: u64) -> [(&'static str, u64); 3] {
        use burn::module::Module;
        let text = self.text.as_ref().map_or(0, |t| t.model.num_params() as u64);
        [
            ("text encoder", text * dtype_bytes),
            ("DiT", self.dit.num_params() as u64 * dtype_bytes),
            ("VAE", self.vae.num_params() as u64 * dtype_bytes),
        ]
    }

    /// Working memory (bytes, beyond the weights) a request needs at its peak:
    /// the larger of the DiT step (activations of one block for every image,
    /// twice with CFG, attention scores counted as materialised; captions at
    /// their 512-token maximum) and the VAE decode of the batch.
    pub fn working_memory_bytes(&self, req: &GenerateRequest) -> u64 {
        working_memory_bytes(&self.dit_config, self.vae_scale, req, |h, w| self.vae.decode_working_bytes(h, w))
    }

    /// The text encoder, or an error saying it is not resident.
    pub fn text_encoder(&self) -> Result<&Arc<TextEncoder<B>>> {
        self.text.as_ref().ok_or_else(|| EngineError::invalid("the text encoder is not loaded; encode the prompt first"))
    }

    /// Refuses a request whose working memory exceeds `available` bytes
    /// (host memory on the CPU backend): running out aborts the process,
    /// which no error handling can catch.
    pub fn check_memory(&self, req: &GenerateRequest, available: u64) -> Result<()> {
        check_working_memory(req, self.working_memory_bytes(req), available)
    }

    /// Encodes the prompts (and the negative prompt for each, if CFG is on at any step).
    pub fn encode(&self, req: &GenerateRequest) -> Result<Conditioning<B>> {
        encode_prompts(self.text_encoder()?, req, self.shift)
    }

    /// Runs the whole pipeline.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        want_previews: bool,
        on_step: &mut dyn FnMut(&StepProgress) -> bool,
    ) -> Result<Generated> {
        req.validate(self.pixel_multiple())?;
        let cond = self.encode(req)?;
        self.generate_with(req, &cond, want_previews, on_step)
    }

    /// Runs the sampler from already-encoded conditioning.
    pub fn generate_with(
        &self,
        req: &GenerateRequest,
        cond: &Conditioning<B>,
        want_previews: bool,
        on_step: &mut dyn FnMut(&StepProgress) -> bool,
    ) -> Result<Generated> {
        match self.generate_from(req, cond, None, want_previews, &mut cancel_only(on_step))? {
            Generation::Finished(generated) => Ok(generated),
            // The callback above never pauses.
            Generation::Paused(_) => Err(EngineError::Cancelled),
        }
    }

    /// [`generate_with`](Self::generate_with) that can pause at a step
    /// boundary and resume from a [`PausedRun`] of the same request.
    pub fn generate_from(
        &self,
        req: &GenerateRequest,
        cond: &Conditioning<B>,
        resume: Option<PausedRun<B>>,
        want_previews: bool,
        on_step: &mut dyn FnMut(&StepProgress) -> StepControl,
    ) -> Result<Generation<B>> {
        req.validate(self.pixel_multiple())?;
        let latents = match self.sample_from(req, cond, resume, want_previews, on_step)? {
            Sampled::Finished(latents) => latents,
            Sampled::Paused(run) => return Ok(Generation::Paused(run)),
        };
        let images = self.decode(latents.clone())?;
        let latent_shape = latents.dims();
        let latents = tensor_to_vec(latents);
        Ok(Generation::Finished(Generated { latents, latent_shape, images }))
    }

    /// The denoising loop; returns final model-space latents `[B, 16, h, w]` (f32).
    pub fn sample(
        &self,
        req: &GenerateRequest,
        cond: &Conditioning<B>,
        want_previews: bool,
        on_step: &mut dyn FnMut(&StepProgress) -> bool,
    ) -> Result<Tensor<B, 4>> {
        match self.sample_from(req, cond, None, want_previews, &mut cancel_only(on_step))? {
            Sampled::Finished(latents) => Ok(latents),
            Sampled::Paused(_) => Err(EngineError::Cancelled),
        }
    }

    /// The denoising loop from the start (`resume: None`) or from where a
    /// paused run of the same request stopped; the callback may cancel or
    /// pause after any step.
    pub fn sample_from(
        &self,
        req: &GenerateRequest,
        cond: &Conditioning<B>,
        resume: Option<PausedRun<B>>,
        want_previews: bool,
        on_step: &mut dyn FnMut(&StepProgress) -> StepControl,
    ) -> Result<Sampled<B>> {
        let b = req.prompts.len();
        if cond.positive.len() != b {
            return Err(EngineError::invalid("conditioning does not match the prompts"));
        }
        let (h, w) = (req.height as usize / self.vae_scale, req.width as usize / self.vae_scale);
        let channels = self.dit_config.in_channels;
        let shape = [b, channels, h, w];
        let schedule = Schedule::new(req.steps, self.shift);
        let start = match req.init {
            None => 0,
            Some(_) => Schedule::img2img_start(req.steps, req.strength),
        };

        let (first, mut x) = match resume {
            Some(run) => {
                let fits = run.seed == req.seed
                    && run.steps == req.steps
                    && run.latents.dims() == shape
                    && (start..=req.steps).contains(&run.next_step);
                if !fits {
                    return Err(EngineError::invalid("the paused run belongs to another request"));
                }
                (run.next_step, run.latents)
            }
            // Starting point: pure noise, or the init image noised to σ_start.
            None => {
                let mut generator = TorchGenerator::manual_seed(req.seed);
                let x = match &req.init {
                    None => self.randn(&mut generator, shape),
                    Some(init) => {
                        let z0 = self.encode_image(init, req.width, req.height, &mut generator)?;
                        let z0 = if b > 1 { z0.repeat_dim(0, b) } else { z0 };
                        let noise = self.randn(&mut generator, shape);
                        let sigma = schedule.sigmas[start];
                        noise * sigma + z0 * (1.0 - sigma)
                    }
                };
                (start, x)
            }
        };

        let total = req.steps - start;
        // Variety: the first steps, where the composition is decided, see
        // perturbed prompt features; the rest the clean ones.
        let varied = variety::vary(&cond.positive, req.variety, req.seed);
        let varied_until = start + variety::varied_steps(total);
        for i in first..req.steps {
            let positive = match &varied {
                Some(v) if i < varied_until => v,
                _ => &cond.positive,
            };
            let t = Tensor::<B, 1>::from_data(
                TensorData::new(vec![schedule.model_time(i); b], [b]),
                (&self.device, DType::F32),
            );
            let cfg = req.cfg_at(&schedule, i);
            let u = if cfg {
                if cond.negative.len() != b {
                    return Err(EngineError::invalid("CFG needs negative conditioning"));
                }
                let captions: Vec<Tensor<B, 2>> = positive.iter().chain(&cond.negative).cloned().collect();
                let out = self.dit.forward(
                    &self.dit_config,
                    Tensor::cat(vec![x.clone(), x.clone()], 0),
                    Tensor::cat(vec![t.clone(), t], 0),
                    &captions,
                )?;
                let out = out.cast(DType::F32);
                let pos = out.clone().narrow(0, 0, b);
                let neg = out.narrow(0, b, b);
                let pred = pos.clone() + (pos.clone() - neg) * req.guidance;
                if req.cfg_normalization > 0.0 {
                    // ‖pred‖ ≤ c·‖pos‖ per image, norms over the whole latent.
                    let norm = |t: Tensor<B, 4>| t.reshape([b as i32, -1]).square().sum_dim(1).sqrt();
                    let max_norm = norm(pos) * req.cfg_normalization;
                    let factor = (max_norm / norm(pred.clone())).clamp_max(1.0);
                    pred * factor.reshape([b, 1, 1, 1])
                } else {
                    pred
                }
            } else {
                self.dit.forward(&self.dit_config, x.clone(), t, positive)?.cast(DType::F32)
            };

            let previews = if want_previews {
                let x0 = x.clone() + u.clone() * schedule.sigmas[i];
                let data = tensor_to_vec(x0);
                data.chunks(channels * h * w).map(|item| self.preview.project(item, h, w)).collect()
            } else {
                Vec::new()
            };
            x = x + u.neg() * schedule.dt(i);
            match on_step(&StepProgress { done: i - start + 1, total, previews }) {
                StepControl::Continue => {}
                StepControl::Cancel => return Err(EngineError::Cancelled),
                StepControl::Pause => {
                    let (seed, steps) = (req.seed, req.steps);
                    return Ok(Sampled::Paused(PausedRun { latents: x, next_step: i + 1, seed, steps }));
                }
            }
        }
        Ok(Sampled::Finished(x))
    }

    fn randn(&self, generator: &mut TorchGenerator, shape: [usize; 4]) -> Tensor<B, 4> {
        let data = generator.randn(shape.iter().product());
        Tensor::from_data(TensorData::new(data, shape), (&self.device, DType::F32))
    }

    /// img2img: init image → model-space latents sampled from the posterior
    /// (`mean + std·ε`, ε drawn first from the generator).
    fn encode_image(
        &self,
        init: &RgbImage,
        width: u32,
        height: u32,
        generator: &mut TorchGenerator,
    ) -> Result<Tensor<B, 4>> {
        let resized;
        let img = if init.width == width && init.height == height {
            init
        } else {
            resized = resize_rgb(init, width, height)?;
            &resized
        };
        let (hh, ww) = (height as usize, width as usize);
        let mut chw = vec![0f32; 3 * hh * ww];
        for p in 0..hh * ww {
            for c in 0..3 {
                chw[c * hh * ww + p] = (img.pixels[p * 3 + c] as f32 / 255.0) * 2.0 - 1.0;
            }
        }
        let image = Tensor::<B, 4>::from_data(TensorData::new(chw, [1, 3, hh, ww]), (&self.device, DType::F32));
        let vae_dtype = self.vae.decoder.conv_in.weight.val().dtype();
        let (mean, logvar) = self.vae.encode(image.cast(vae_dtype)).ok_or_else(|| {
            EngineError::invalid("this model was loaded without the VAE encoder, which img2img needs")
        })?;
        let (mean, logvar) = (mean.cast(DType::F32), logvar.cast(DType::F32));
        let eps = self.randn(generator, mean.dims());
        let z = mean + (logvar * 0.5).exp() * eps;
        Ok(self.vae.scale(z))
    }

    /// Model-space latents → 8-bit RGB images, postprocessed as the reference.
    pub fn decode(&self, latents: Tensor<B, 4>) -> Result<Vec<RgbImage>> {
        let vae_dtype = self.vae.decoder.conv_in.weight.val().dtype();
        let z = self.vae.unscale(latents.cast(vae_dtype));
        let image = self.vae.decode(z).cast(DType::F32);
        let [b, _, h, w] = image.dims();
        let data = tensor_to_vec(image);
        Ok((0..b).map(|i| to_rgb8(&data[i * 3 * h * w..(i + 1) * 3 * h * w], h, w)).collect())
    }
}

/// A step callback that only continues or cancels, as one that may also pause.
fn cancel_only<'a>(
    on_step: &'a mut dyn FnMut(&StepProgress) -> bool,
) -> impl FnMut(&StepProgress) -> StepControl + 'a {
    |p| if on_step(p) { StepControl::Continue } else { StepControl::Cancel }
}

/// [`ZImagePipeline::working_memory_bytes`] from the DiT config, the VAE's
/// pixels per latent cell and its decode working memory for `h×w` latents.
pub fn working_memory_bytes(
    c: &ZImageDitConfig,
    vae_scale: usize,
    req: &GenerateRequest,
    vae_decode_bytes: impl Fn(usize, usize) -> u64,
) -> u64 {
    let cell = (vae_scale * c.patch_size) as u64;
    let tokens = (req.width as u64 / cell) * (req.height as u64 / cell) + crate::text::MAX_TOKENS as u64;
    let batch = req.prompts.len().max(1) as u64 * if req.guidance > 0.0 { 2 } else { 1 };
    let per_token = (8 * c.dim + 3 * c.ffn_dim()) as u64;
    let dit = batch * 4 * (tokens * per_token + c.n_heads as u64 * tokens * tokens);
    let (h, w) = (req.height as usize / vae_scale, req.width as usize / vae_scale);
    let vae = req.prompts.len().max(1) as u64 * vae_decode_bytes(h, w);
    dit.max(vae)
}

/// `[3, H, W]` in about [−1, 1] → RGB8: `round_half_even(clamp(x/2 + 0.5, 0, 1)·255)`.
pub fn to_rgb8(chw: &[f32], h: usize, w: usize) -> RgbImage {
    let plane = h * w;
    let mut pixels = vec![0u8; plane * 3];
    for p in 0..plane {
        for c in 0..3 {
            let v = (chw[c * plane + p] * 0.5 + 0.5).clamp(0.0, 1.0);
            pixels[p * 3 + c] = (v * 255.0).round_ties_even() as u8;
        }
    }
    RgbImage { width: w as u32, height: h as u32, pixels }
}

/// Resizes with a Lanczos3 filter (the reference uses PIL's; results differ slightly).
fn resize_rgb(img: &RgbImage, width: u32, height: u32) -> Result<RgbImage> {
    let buf = image::RgbImage::from_raw(img.width, img.height, img.pixels.clone())
        .ok_or_else(|| EngineError::invalid("init image buffer does not match its size"))?;
    let out = image::imageops::resize(&buf, width, height, image::imageops::FilterType::Lanczos3);
    Ok(RgbImage { width, height, pixels: out.into_raw() })
}

/// Host copy of a tensor as f32.
pub fn tensor_to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    let t = if t.dtype() == DType::F32 { t } else { t.cast(DType::F32) };
    t.into_data().convert::<f32>().into_vec::<f32>().expect("f32 data")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(w: u32, h: u32) -> String {
        validate_sides(w, h, 16).err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn sides_are_checked_bound_first_with_the_nearest_valid_size_offered() {
        assert_eq!(problem(1024, 768), "");
        assert_eq!(problem(0, 64), "width must be at least 16");
        assert_eq!(problem(64, 15), "height must be at least 16");
        assert_eq!(problem(99_999, 64), "width 99999 is larger than the maximum of 4096");
        assert_eq!(problem(100, 64), "width 100 is not a multiple of 16 (try 96)");
        assert_eq!(problem(1000, 64), "width 1000 is not a multiple of 16 (try 1008)");
        assert_eq!(problem(16, 4095), "height 4095 is not a multiple of 16 (try 4096)");
        assert_eq!(nearest_multiple(20, 16), 16);
        assert_eq!(nearest_multiple(24, 16), 32);
        assert_eq!(nearest_multiple(1, 16), 16);
        assert_eq!(nearest_multiple(5000, 16), 4096, "never past the maximum");
    }
}
