//! The demo recipe, end to end on the CPU (burn autodiff on `flex`):
//!
//! 1. tokenizer: written, not learned (a word-level vocabulary of the grammar);
//! 2. VAE: the Flux-structured autoencoder on rendered scenes (L2
//!    reconstruction, a colour hint on three latent channels, small KL), then latent statistics → `shift_factor` /
//!    `scaling_factor` as the real VAE config carries them;
//! 3. Base: the tiny Qwen3 encoder and the DiT trained together by flow
//!    matching on the encoded training set (`x_σ = (1−σ)x0 + σε`, the DiT at
//!    `t = 1−σ` predicts `u = x0 − ε`), captions dropped to `""` 10% of the
//!    time so classifier-free guidance works;
//! 4. Turbo: initialised from the saved Base, trained on Base's own outputs
//!    (30 steps, CFG 4) to go straight from the noise to them (reflow
//!    distillation: targets `x0_base − ε` on the line between the pair), so
//!    4 steps without CFG land where Base's 30 guided steps do.
//!
//! Every random draw comes from the seed; the same seed gives the same files
//! on the same machine.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::Backend;
use burn::tensor::module::avg_pool2d;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::export::{named_tensors, write_bf16};
use super::optim::{blend, AdamW};
use super::parallel::{data_parallel_grads, split_ranges, trainable};
use super::plot::{write_loss_plot, Curve};
use super::world::{image_to_chw, Split, WorldSampler, IMAGE_SIDE};
use super::{dit_config, text_encoder_config, tokenizer, vae_config, BASE_GUIDANCE, BASE_SHIFT, BASE_STEPS, TURBO_SHIFT, TURBO_STEPS};
use crate::device::CpuBackend;
use crate::dit::{ZImageDit, ZImageDitConfig};
use crate::loader::{load_pipeline, ModelFiles, ModelOverrides};
use crate::pipeline::{GenerateRequest, ModelKind};
use crate::qwen3::{Qwen3Encoder, RotateHalfRope};
use crate::rng::TorchGenerator;
use crate::scheduler::Schedule;
use crate::text::PromptTokenizer;
use crate::vae::Vae;
use crate::weights::RandomWeights;

pub(crate) type Inner = CpuBackend;
pub(crate) type Ad = Autodiff<Inner>;

/// Options of [`train_demo`].
#[derive(Debug, Clone)]
pub struct TrainDemoOptions {
    /// Output folder (`assets/demo`).
    pub out: PathBuf,
    pub seed: u64,
    /// Multiplies every phase's step and sample counts: 1.0 is the recipe;
    /// small values make a quick smoke run (not a usable model).
    pub scale: f64,
    /// Where to write the loss curves (PNG); `None` skips the plot.
    pub plot: Option<PathBuf>,
    /// Hide the progress bars.
    pub quiet: bool,
    /// Stop after this phase (a partial folder, for experiments): the VAE
    /// alone can be judged with `eval-demo --vae-round-trip`.
    pub stop_after: Phase,
    /// Take the VAE from this demo folder instead of training one (for
    /// experiments on the later phases).
    pub vae_from: Option<PathBuf>,
    /// Take the tokenizer, text encoder, VAE and Base from this demo folder
    /// and run only the later phases (decoder at full size, Turbo).
    pub base_from: Option<PathBuf>,
    /// Take the VAE, text encoder and Base from this demo folder, train Base
    /// for another cycle of `continue_steps` (times `scale`) from there, then
    /// run the later phases (an experiment; not part of the recipe).
    pub continue_base: Option<PathBuf>,
    pub continue_steps: usize,
}

/// The recipe's phases, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Vae,
    Base,
    Turbo,
}

impl TrainDemoOptions {
    pub fn new(out: impl Into<PathBuf>) -> Self {
        Self { out: out.into(), seed: 0, scale: 1.0, plot: None, quiet: false, stop_after: Phase::Turbo, vae_from: None, base_from: None, continue_base: None, continue_steps: 3000 }
    }
}

/// Step counts and hyper-parameters of the recipe.
#[derive(Debug, Clone)]
struct Recipe {
    /// VAE stages: (image side, batch, steps). The narrow autoencoder first
    /// learns the flat colours cheaply on small renders, then edges at 64²
    /// and 128² (convolutions are local, so the stages share everything).
    vae_stages: [(usize, usize, usize); 3],
    vae_lr: f64,
    kl_weight: f32,
    /// Extra reconstruction weight of the pixels near an outline (1 + w·edge,
    /// normalised per image): outlines are ~2 % of the pixels, and a plain L2
    /// is met by flat colours with rounded, blurred shapes (run 7's round trip
    /// kept 62 % of the objects, most losses small triangles and squares).
    vae_edge_weight: f32,
    /// Training scenes encoded once for the DiT.
    data_size: usize,
    /// Placement jitter of the DiT's training scenes (see [`WorldSampler::with_jitter`]).
    dit_jitter: f32,
    base_steps: usize,
    base_batch: usize,
    base_lr: f64,
    /// Peak learning rate of a further cycle on a trained Base (`continue_base`).
    base_continue_lr: f64,
    /// Decay of the exponential moving average of Base's weights, which is
    /// what gets written: the last iterate of a small batch still carries
    /// step-to-step noise that shows as lumpy outlines.
    base_ema: f64,
    caption_dropout: f64,
    /// Training shift of σ (σ = s·u / (1 + (s−1)·u), u uniform).
    train_shift: f64,
    /// Extra loss weight of latent cells covered by objects (1 + w·coverage):
    /// objects cover ~10 % of an image, and an unweighted loss is met by
    /// painting the background alone.
    object_weight: f32,
    /// Decoder-only steps at 128² after Base (see [`polish_decoder`]).
    decoder_steps: usize,
    /// Base samples (30 steps, CFG 4) the Turbo learns from.
    teacher_pairs: usize,
    turbo_steps: usize,
    turbo_batch: usize,
    turbo_lr: f64,
    /// Fraction of Turbo's items taken on its own 4-step trajectory (see [`train_turbo`]).
    turbo_rollout: f64,
}

impl Recipe {
    fn scaled(s: f64) -> Self {
        let n = |v: usize| ((v as f64 * s).round() as usize).max(2);
        Recipe {
            vae_stages: [(32, 8, n(600)), (64, 8, n(800)), (128, 6, n(600))],
            vae_lr: 3e-3,
            kl_weight: 1e-4,
            vae_edge_weight: 8.0,
            data_size: n(6144),
            dit_jitter: 1.0,
            base_steps: n(10000),
            base_batch: 24,
            base_lr: 1e-3,
            base_continue_lr: 3e-4,
            base_ema: 0.998,
            caption_dropout: 0.1,
            // At 16×16 latents the shift the real models use at 1024² (3)
            // puts half the training at σ > 0.75, where only the background
            // colour is visible (run 1 learned nothing else); uniform σ (run 2)
            // learned colours and sizes but hardly positions, which are set
            // early, at high σ. 2 is between: median σ 0.67.
            train_shift: 2.0,
            object_weight: 4.0,
            decoder_steps: n(400),
            teacher_pairs: n(640),
            turbo_steps: n(600),
            turbo_batch: 24,
            turbo_lr: 2e-4,
            turbo_rollout: 0.5,
        }
    }
}

/// What [`train_demo`] did.
#[derive(Debug, Clone)]
pub struct TrainReport {
    /// (phase, seconds).
    pub phases: Vec<(String, f64)>,
    pub total_seconds: f64,
    /// Mean loss of the last 10% of steps per phase (VAE, Base, Turbo).
    pub final_losses: [f32; 3],
    /// Bytes of every file written under `out`.
    pub bytes_written: u64,
}

impl std::fmt::Display for TrainReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (name, s) in &self.phases {
            writeln!(f, "{name:<28} {:>7.1} s", s)?;
        }
        writeln!(f, "{:<28} {:>7.1} s", "total", self.total_seconds)?;
        writeln!(f, "final losses: VAE {:.4}, Base {:.4}, Turbo {:.4}", self.final_losses[0], self.final_losses[1], self.final_losses[2])?;
        write!(f, "written: {:.1} MB", self.bytes_written as f64 / 1e6)
    }
}

fn bar(quiet: bool, len: usize, prefix: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("{prefix:<14} [{bar:32}] {pos}/{len} {msg} ({elapsed} / ~{duration})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_prefix(prefix.to_string());
    pb
}

/// Warmup then cosine decay to 10% of the peak.
fn lr_at(step: usize, total: usize, peak: f64) -> f64 {
    let warm = (total / 20).clamp(1, 100);
    if step < warm {
        return peak * (step + 1) as f64 / warm as f64;
    }
    let p = (step - warm) as f64 / (total - warm).max(1) as f64;
    peak * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
}

pub(crate) fn scalar<B: Backend>(t: Tensor<B, 1>) -> f32 {
    t.into_data().convert::<f32>().into_vec::<f32>().map(|v| v[0]).unwrap_or(f32::NAN)
}

fn tail_mean(v: &[f32]) -> f32 {
    if v.is_empty() {
        return f32::NAN;
    }
    let k = (v.len() / 10).max(1);
    let t = &v[v.len().saturating_sub(k)..];
    t.iter().sum::<f32>() / t.len().max(1) as f32
}

fn tensor4<B: Backend>(data: Vec<f32>, shape: [usize; 4], device: &B::Device) -> Tensor<B, 4> {
    Tensor::from_data(TensorData::new(data, shape), (device, DType::F32))
}

/// σ from a uniform draw with a time shift (more weight on high noise).
fn shifted_sigma(u: f64, shift: f64) -> f32 {
    (shift * u / (1.0 + (shift - 1.0) * u)) as f32
}

/// The Qwen3 encoder on a batch of token sequences of different lengths:
/// right-padded (attention is causal, so padding never reaches real tokens)
/// and cut back per item. Same result as [`Qwen3Encoder::forward`] per item.
pub fn encode_batch<B: Backend>(enc: &Qwen3Encoder<B>, ids: &[Vec<u32>]) -> Vec<Tensor<B, 2>> {
    let b = ids.len();
    let l = ids.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let hidden = enc.embed_tokens.dims()[1];
    let device = enc.embed_tokens.device();
    let flat: Vec<i64> = ids.iter().flat_map(|s| s.iter().map(|&i| i as i64).chain(std::iter::repeat_n(0, l - s.len()))).collect();
    let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(flat, [b * l]), &device);
    let mut x = enc.embed_tokens.val().select(0, idx).reshape([b, l, hidden]);
    let rope = RotateHalfRope::new(l, enc.head_dim, enc.rope_theta, &device);
    for layer in &enc.layers {
        x = layer.forward(x, &rope);
    }
    ids.iter().enumerate().map(|(i, s)| x.clone().narrow(0, i, 1).narrow(1, 0, s.len()).reshape([s.len(), hidden])).collect()
}

/// Text encoder and DiT trained together for Base.
#[derive(Module, Debug)]
pub struct Denoiser<B: Backend> {
    pub text: Qwen3Encoder<B>,
    pub dit: ZImageDit<B>,
}

/// Trains the demo pair and writes it under `opts.out` (see the module docs).
pub fn train_demo(opts: &TrainDemoOptions) -> anyhow::Result<TrainReport> {
    anyhow::ensure!(opts.scale > 0.0 && opts.scale.is_finite(), "scale must be positive");
    // The folders taken from, checked before any phase spends time.
    let sources = [(&opts.vae_from, &["vae"][..]), (&opts.base_from, &["text_encoder", "vae", "base"]), (&opts.continue_base, &["text_encoder", "vae", "base"])];
    for (dir, parts) in sources.iter().filter_map(|(d, p)| d.as_ref().map(|d| (d, p))) {
        for part in parts.iter() {
            anyhow::ensure!(dir.join(part).is_dir(), "{}: no {part}/ folder (not a trained demo folder)", dir.display());
        }
    }
    let recipe = Recipe::scaled(opts.scale);
    let device: Device<Inner> = Default::default();
    let start = Instant::now();
    let mut phases = Vec::new();
    let out = opts.out.clone();
    std::fs::create_dir_all(&out)?;
    let seed = opts.seed;

    // 1. Tokenizer.
    let tok_dir = out.join("tokenizer");
    std::fs::create_dir_all(&tok_dir)?;
    let tok_json = serde_json::to_vec_pretty(&tokenizer::tokenizer_json())?;
    std::fs::write(tok_dir.join("tokenizer.json"), &tok_json)?;
    std::fs::write(tok_dir.join("tokenizer_config.json"), serde_json::to_vec_pretty(&tokenizer::tokenizer_config_json())?)?;
    let tok = PromptTokenizer::from_bytes(&tok_json)?;

    let mut curves = Vec::new();
    if let Some(src) = &opts.base_from {
        // The later phases alone, on a trained Base (for experiments and for
        // re-running them on a shipped pair).
        let t0 = Instant::now();
        for part in ["text_encoder", "vae", "base"] {
            copy_dir(&src.join(part), &out.join(part))?;
        }
        phases.push(("copy trained Base".to_string(), t0.elapsed().as_secs_f64()));
    } else {
        // 2. VAE.
        let t0 = Instant::now();
        let (vae_cfg, vae, vae_losses) = match opts.continue_base.as_ref().or(opts.vae_from.as_ref()) {
            Some(dir) => {
                let (cfg, vae) = super::eval::load_vae_dir(&dir.join("vae"), &device)?;
                (cfg, vae, Vec::new())
            }
            None => {
                let (vae, losses) = train_vae(&recipe, seed, &device, opts.quiet)?;
                (vae_config(), vae, losses)
            }
        };
        phases.push(("VAE".to_string(), t0.elapsed().as_secs_f64()));

        // Encode the DiT's training set; the latent statistics of a new VAE set
        // its scaling.
        let t0 = Instant::now();
        let taken = opts.continue_base.as_ref().or(opts.vae_from.as_ref());
        let (vae, data) = encode_dataset(vae, vae_cfg.scale(), taken.is_none(), &recipe, seed, &tok, &device, opts.quiet)?;
        match taken {
            // As it is: the DiT trains on its own scaling, and its decoder may
            // have had its phase already (which therefore does not run again).
            Some(src) => copy_dir(&src.join("vae"), &out.join("vae"))?,
            None => {
                write_vae(&out.join("vae"), &vae_cfg, &vae, &device)?;
                write_preview_projection(&out.join("vae"), seed.wrapping_add(9))?;
            }
        }
        phases.push(("encode training set".to_string(), t0.elapsed().as_secs_f64()));
        curves.push(Curve { title: "VAE: edge L2 + hint".into(), losses: vae_losses });
        if opts.stop_after == Phase::Vae {
            return finish(opts, &recipe, phases, curves, start);
        }

        // 3. Base: text encoder + DiT.
        let t0 = Instant::now();
        let (denoiser, base_losses) = match &opts.continue_base {
            Some(src) => {
                let steps = ((opts.continue_steps as f64 * opts.scale).round() as usize).max(2);
                let cycle = BaseCycle { steps, lr: recipe.base_continue_lr, seed: seed.wrapping_add(14), label: "Base, again" };
                train_base(&recipe, &cycle, Some(load_denoiser(src, &device)?), &data, &tok, &device, opts.quiet)?
            }
            None => {
                let cycle = BaseCycle { steps: recipe.base_steps, lr: recipe.base_lr, seed: seed.wrapping_add(4), label: "Base" };
                train_base(&recipe, &cycle, None, &data, &tok, &device, opts.quiet)?
            }
        };
        write_text_encoder(&out.join("text_encoder"), &denoiser.text, &device)?;
        write_dit(&out.join("base"), &denoiser.dit, &dit_config(), &device, BASE_SHIFT, BASE_STEPS)?;
        drop(denoiser);
        drop(data);
        phases.push(("Base (text encoder + DiT)".to_string(), t0.elapsed().as_secs_f64()));
        curves.push(Curve { title: "Base: flow matching".into(), losses: base_losses });
        if opts.stop_after == Phase::Base {
            return finish(opts, &recipe, phases, curves, start);
        }
    }

    // 4. The decoder at full size (encoder frozen), unless a VAE taken from a
    // trained folder has had it already.
    let vae_json: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("vae").join("config.json"))?)?;
    if vae_json.get(DECODER_STEPS_KEY).is_none() {
        let t0 = Instant::now();
        let decoder_losses = polish_demo_decoder(&out, recipe.decoder_steps, seed.wrapping_add(11), opts.quiet)?;
        phases.push(("VAE decoder at 128²".to_string(), t0.elapsed().as_secs_f64()));
        curves.push(Curve { title: "VAE decoder at 128 px".into(), losses: decoder_losses });
    }

    // 5. Turbo from the saved Base.
    let t0 = Instant::now();
    let pairs = teacher_pairs(&recipe, seed, &out, &device, opts.quiet)?;
    phases.push(("Base samples for Turbo".to_string(), t0.elapsed().as_secs_f64()));
    let t0 = Instant::now();
    // Turbo has Base's architecture, whatever the recipe's (a `--base-from`
    // folder may hold an older one).
    let base = load_pipeline::<Inner>(&ModelFiles::locate(&out.join("base"), &ModelOverrides::default())?, &device, DType::F32, &mut |_, _, _| {})?;
    let (turbo, turbo_losses) = train_turbo(&recipe, seed, base.dit, &base.dit_config, &pairs, &device, opts.quiet)?;
    write_dit(&out.join("turbo"), &turbo, &base.dit_config, &device, TURBO_SHIFT, TURBO_STEPS)?;
    phases.push(("Turbo distillation".to_string(), t0.elapsed().as_secs_f64()));
    curves.push(Curve { title: "Turbo: distillation".into(), losses: turbo_losses });
    finish(opts, &recipe, phases, curves, start)
}

/// Plot, `train_log.json` and the report of the phases that ran.
fn finish(opts: &TrainDemoOptions, recipe: &Recipe, phases: Vec<(String, f64)>, curves: Vec<Curve>, start: Instant) -> anyhow::Result<TrainReport> {
    let total_seconds = start.elapsed().as_secs_f64();
    if let Some(plot) = &opts.plot {
        write_loss_plot(plot, &curves)?;
    }
    // Curves by the phase their title starts with (phases may be skipped).
    let find = |phase: &str| curves.iter().find(|c| c.title.starts_with(phase));
    let loss = |phase: &str| find(phase).map(|c| tail_mean(&c.losses)).unwrap_or(f32::NAN);
    let report = TrainReport {
        phases: phases.clone(),
        total_seconds,
        final_losses: [loss("VAE:"), loss("Base"), loss("Turbo")],
        bytes_written: dir_bytes(&opts.out)?,
    };
    let curve = |phase: &str| find(phase).map(|c| c.losses.clone()).unwrap_or_default();
    let log = json!({
        "seed": opts.seed,
        "scale": opts.scale,
        "recipe": format!("{recipe:?}"),
        "phases_seconds": phases.iter().map(|(n, s)| json!([n, s])).collect::<Vec<_>>(),
        "total_seconds": total_seconds,
        "final_losses": {"vae": report.final_losses[0], "base": report.final_losses[1], "turbo": report.final_losses[2]},
        "decoder_final_loss": loss("VAE decoder"),
        "loss_curves": {"vae": curve("VAE:"), "decoder": curve("VAE decoder"), "base": curve("Base"), "turbo": curve("Turbo")},
    });
    std::fs::write(opts.out.join("train_log.json"), serde_json::to_vec(&log)?)?;
    Ok(report)
}

/// Copies the files of `from` into `to` (one level; the demo folders are flat
/// but for `transformer/` and `scheduler/`, copied recursively). Nothing to do
/// when both are the same folder.
fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(from.is_dir(), "{} is not a trained demo folder part", from.display());
    std::fs::create_dir_all(to)?;
    if std::fs::canonicalize(from)? == std::fs::canonicalize(to)? {
        return Ok(());
    }
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), &target)?;
        }
    }
    Ok(())
}

fn dir_bytes(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let m = e.metadata()?;
        total += if m.is_dir() { dir_bytes(&e.path())? } else { m.len() };
    }
    Ok(total)
}

fn train_vae(r: &Recipe, seed: u64, device: &Device<Inner>, quiet: bool) -> anyhow::Result<(Vae<Inner>, Vec<f32>)> {
    Inner::seed(device, seed);
    let cfg = vae_config();
    let mut vae = Vae::<Ad>::build(&cfg, &mut RandomWeights::new(device, DType::F32), true)?;
    let mut opt = AdamW::new(0.0, Some(1.0));
    let mut world = WorldSampler::new(seed.wrapping_add(1));
    let mut noise = TorchGenerator::manual_seed(seed.wrapping_add(2));
    let total: usize = r.vae_stages.iter().map(|s| s.2).sum();
    let pb = bar(quiet, total, "VAE");
    let mut losses = Vec::with_capacity(total);
    let stages: Vec<(usize, usize)> = r.vae_stages.iter().flat_map(|&(side, batch, steps)| std::iter::repeat_n((side, batch), steps)).collect();
    let scale = cfg.scale();
    for (step, &(n, batch)) in stages.iter().enumerate() {
        let lat = n / scale;
        let imgs: Vec<f32> = (0..batch).flat_map(|_| image_to_chw(&world.sample_at(Split::Train, n).1)).collect();
        let weights: Vec<f32> = imgs.chunks(3 * n * n).flat_map(|img| edge_weights(img, n, r.vae_edge_weight)).collect();
        // Deterministic (posterior mean) on the small renders; at 128² every
        // fourth step samples the posterior with the KL term, which trains the
        // log-variance img2img uses without blurring the decoder much.
        let sampled = n == IMAGE_SIDE && step % 4 == 3;
        let per_latent = cfg.latent_channels * lat * lat;
        let eps = if sampled { noise.randn(batch * per_latent) } else { Vec::new() };
        type Part = (Vec<f32>, Vec<f32>, Vec<f32>);
        let parts: Vec<(Part, usize)> = split_ranges(batch, threads())
            .into_iter()
            .map(|k| {
                let pixels = k.start * 3 * n * n..k.end * 3 * n * n;
                let e = if sampled { eps[k.start * per_latent..k.end * per_latent].to_vec() } else { Vec::new() };
                ((imgs[pixels.clone()].to_vec(), weights[pixels].to_vec(), e), k.len())
            })
            .collect();
        let (grads, value) = data_parallel_grads(&vae, &parts, |vae: &Vae<Ad>, (x, w, eps): &Part| {
            let b = x.len() / (3 * n * n);
            let x = tensor4::<Ad>(x.clone(), [b, 3, n, n], device);
            let w = tensor4::<Ad>(w.clone(), [b, 3, n, n], device);
            let (mean, logvar) = vae.encode(x.clone()).ok_or_else(|| anyhow::anyhow!("VAE built without its encoder"))?;
            // The first latent channels learn the average colour of their 8×8
            // patch: without this hint the narrow autoencoder spends hundreds of
            // steps before its latents carry the (normalised-away) flat colours.
            let pooled = avg_pool2d(x.clone(), [scale, scale], [scale, scale], [0, 0], true, false);
            let hint = (mean.clone().narrow(1, 0, 3) - pooled).square().mean();
            let (z, kl) = if eps.is_empty() {
                (mean, None)
            } else {
                let eps = tensor4::<Ad>(eps.clone(), mean.dims(), device);
                let z = mean.clone() + (logvar.clone() * 0.5).exp() * eps;
                (z, Some((mean.square() + logvar.clone().exp() - logvar - 1.0).mean() * 0.5))
            };
            let rec = ((vae.decode(z) - x).square() * w).mean();
            let mut loss = rec + hint;
            if let Some(kl) = kl {
                loss = loss + kl * r.kl_weight;
            }
            Ok(loss)
        })?;
        anyhow::ensure!(value.is_finite(), "VAE training diverged at step {step}");
        losses.push(value);
        vae = opt.step(lr_at(step, total, r.vae_lr), vae, grads);
        pb.inc(1);
        pb.set_message(format!("loss {value:.4}"));
    }
    pb.finish();
    Ok((vae.valid(), losses))
}

/// One decoder-only fine-tuning run of [`polish_decoder`].
#[derive(Debug, Clone, Copy)]
pub struct DecoderPolish {
    pub steps: usize,
    /// Renders per step.
    pub batch: usize,
    /// Peak learning rate (warm-up, then cosine).
    pub lr: f64,
    /// Extra weight of the pixels along outlines (see `edge_weights`).
    pub edge_weight: f32,
    /// Seeds the renders (and the backend's random draws).
    pub seed: u64,
}

/// Fine-tunes the decoder of a trained VAE at 128² with its encoder frozen,
/// by the edge-weighted L2 of [`train_vae`] on fresh renders (posterior
/// mean). The VAE phase spends most of its steps on smaller renders, where
/// they are cheap; its round trip kept improving with every decoder step at
/// the full size (83.8 % of objects after run 8's 250 steps, 89.1 % after
/// 300 more, 91.0 % after 600). The encoder, the latent space and its
/// statistics stay as they are, so DiTs trained on them stay valid.
pub fn polish_decoder(vae: Vae<Inner>, run: &DecoderPolish, device: &Device<Inner>, quiet: bool) -> anyhow::Result<(Vae<Inner>, Vec<f32>)> {
    let DecoderPolish { steps, batch, lr, edge_weight, seed } = *run;
    Inner::seed(device, seed);
    let mut opt = AdamW::new(0.0, Some(1.0));
    let mut vae_ad = Vae::<Ad>::from_inner(vae);
    let mut world = WorldSampler::new(seed.wrapping_add(1));
    let n = IMAGE_SIDE;
    let pb = bar(quiet, steps, "decoder");
    let mut losses = Vec::with_capacity(steps);
    for step in 0..steps {
        let imgs: Vec<f32> = (0..batch).flat_map(|_| image_to_chw(&world.sample_at(Split::Train, n).1)).collect();
        let weights: Vec<f32> = imgs.chunks(3 * n * n).flat_map(|img| edge_weights(img, n, edge_weight)).collect();
        // The frozen encoder runs outside the autodiff graph.
        let (mean, _) = vae_ad
            .valid()
            .encode(tensor4::<Inner>(imgs.clone(), [batch, 3, n, n], device))
            .ok_or_else(|| anyhow::anyhow!("the VAE has no encoder"))?;
        let dims = mean.dims();
        let per = dims[1] * dims[2] * dims[3];
        let z = mean.into_data().convert::<f32>().into_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        type Part = (Vec<f32>, Vec<f32>, Vec<f32>);
        let parts: Vec<(Part, usize)> = split_ranges(batch, threads())
            .into_iter()
            .map(|k| {
                let px = k.start * 3 * n * n..k.end * 3 * n * n;
                ((z[k.start * per..k.end * per].to_vec(), imgs[px.clone()].to_vec(), weights[px].to_vec()), k.len())
            })
            .collect();
        let (grads, value) = data_parallel_grads(&vae_ad, &parts, |vae: &Vae<Ad>, (z, x, w): &Part| {
            let b = x.len() / (3 * n * n);
            let z = tensor4::<Ad>(z.clone(), [b, dims[1], dims[2], dims[3]], device);
            let x = tensor4::<Ad>(x.clone(), [b, 3, n, n], device);
            let w = tensor4::<Ad>(w.clone(), [b, 3, n, n], device);
            Ok(((vae.decode(z) - x).square() * w).mean())
        })?;
        anyhow::ensure!(value.is_finite(), "decoder fine-tuning diverged at step {step}");
        losses.push(value);
        vae_ad = opt.step(lr_at(step, steps, lr), vae_ad, grads);
        pb.inc(1);
        pb.set_message(format!("loss {value:.4}"));
    }
    pb.finish();
    Ok((vae_ad.valid(), losses))
}

/// Redraws `<dir>/train_log.json`'s loss curves (VAE, decoder, Base, Turbo;
/// those present) into `plot`.
pub fn replot(dir: &Path, plot: &Path) -> anyhow::Result<()> {
    let path = dir.join("train_log.json");
    let bytes = std::fs::read(&path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let log: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("{} is not a training log: {e}", path.display()))?;
    let mut curves = Vec::new();
    for (key, title) in [("vae", "VAE: edge L2 + hint"), ("base", "Base: flow matching"), ("decoder", "VAE decoder at 128 px"), ("turbo", "Turbo: distillation")] {
        let losses: Vec<f32> = log["loss_curves"][key].as_array().map(|a| a.iter().filter_map(|v| v.as_f64()).map(|v| v as f32).collect()).unwrap_or_default();
        if !losses.is_empty() {
            curves.push(Curve { title: title.into(), losses });
        }
    }
    anyhow::ensure!(!curves.is_empty(), "{} has no loss curves", path.display());
    write_loss_plot(plot, &curves)
}

/// Key of `vae/config.json` counting the decoder-only steps it has had.
const DECODER_STEPS_KEY: &str = "zimage_decoder_steps";

/// [`polish_decoder`] on `<dir>/vae`, rewritten in place (scaling, shift and
/// the preview map kept: the encoder does not change).
pub fn polish_demo_decoder(dir: &Path, steps: usize, seed: u64, quiet: bool) -> anyhow::Result<Vec<f32>> {
    let device: Device<Inner> = Default::default();
    let vae_dir = dir.join("vae");
    let (cfg, vae) = super::eval::load_vae_dir(&vae_dir, &device)?;
    let old: serde_json::Value = serde_json::from_slice(&std::fs::read(vae_dir.join("config.json"))?)?;
    let (vae, losses) = polish_decoder(vae, &DecoderPolish { steps, batch: 6, lr: 1e-3, edge_weight: 8.0, seed }, &device, quiet)?;
    write_vae(&vae_dir, &cfg, &vae, &device)?;
    let path = vae_dir.join("config.json");
    let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    if let Some(map) = old.get("zimage_latent_rgb") {
        json["zimage_latent_rgb"] = map.clone();
    }
    // Recorded so that `--base-from` on a finished pair does not run it twice.
    let before = old.get(DECODER_STEPS_KEY).and_then(|v| v.as_u64()).unwrap_or(0);
    json[DECODER_STEPS_KEY] = json!(before + steps as u64);
    write_json(&path, &json)?;
    Ok(losses)
}

/// The DiT's training set: model-space latents and caption token ids.
struct LatentSet {
    /// `[N, 16, 16, 16]` flattened.
    latents: Vec<f32>,
    per_item: usize,
    shape: [usize; 3],
    ids: Vec<Vec<u32>>,
    /// `[N, 16, 16]`: the fraction of each latent cell's 8×8 pixels that
    /// belong to an object (not the background colour).
    coverage: Vec<f32>,
}

/// Per-pixel reconstruction weights of one CHW image in [-1, 1], repeated over
/// its three channels: `1 + extra` where a pixel's 3×3 neighbourhood holds a
/// different colour (a band of about 3 px along every outline), normalised to
/// mean 1 so the loss keeps its scale.
fn edge_weights(chw: &[f32], side: usize, extra: f32) -> Vec<f32> {
    let plane = side * side;
    let differs = |p: usize, q: usize| (0..3).any(|c| (chw[c * plane + p] - chw[c * plane + q]).abs() > 0.02);
    let mut w = vec![1f32; plane];
    for y in 0..side {
        for x in 0..side {
            let p = y * side + x;
            let near = (y.saturating_sub(1)..(y + 2).min(side))
                .any(|yy| (x.saturating_sub(1)..(x + 2).min(side)).any(|xx| differs(p, yy * side + xx)));
            if near {
                w[p] += extra;
            }
        }
    }
    let mean = w.iter().sum::<f32>() / plane as f32;
    w.iter_mut().for_each(|v| *v /= mean);
    w.repeat(3)
}

/// Per latent cell (`scale`×`scale` pixels), the fraction of pixels whose
/// colour is away from the background's.
fn object_coverage(img: &crate::preview::RgbImage, background: [u8; 3], scale: usize) -> Vec<f32> {
    let (w, h) = (img.width as usize, img.height as usize);
    let (cw, ch) = (w / scale, h / scale);
    let mut out = vec![0f32; cw * ch];
    for y in 0..h {
        for x in 0..w {
            let p = &img.pixels[(y * w + x) * 3..][..3];
            let d: i32 = p.iter().zip(background).map(|(a, b)| (*a as i32 - b as i32).abs()).sum();
            if d > 45 {
                out[(y / scale) * cw + x / scale] += 1.0 / (scale * scale) as f32;
            }
        }
    }
    out
}

/// Encodes the DiT's training scenes into model-space latents. With
/// `fit_scaling`, the VAE's shift and scaling are first set from these
/// latents' statistics (a new VAE); otherwise its own stay (a trained one,
/// whose config other DiTs already rely on).
#[allow(clippy::too_many_arguments)]
fn encode_dataset(
    mut vae: Vae<Inner>,
    vae_scale: usize,
    fit_scaling: bool,
    r: &Recipe,
    seed: u64,
    tok: &PromptTokenizer,
    device: &Device<Inner>,
    quiet: bool,
) -> anyhow::Result<(Vae<Inner>, LatentSet)> {
    let mut world = WorldSampler::new(seed.wrapping_add(3)).with_jitter(r.dit_jitter);
    let n = IMAGE_SIDE;
    let chunk = 32;
    let pb = bar(quiet, r.data_size, "encode");
    let mut raw = Vec::new();
    let mut coverage = Vec::new();
    let mut ids = Vec::with_capacity(r.data_size);
    let mut shape = [0; 3];
    while ids.len() < r.data_size {
        let b = chunk.min(r.data_size - ids.len());
        let mut imgs = Vec::with_capacity(b * 3 * n * n);
        for _ in 0..b {
            let (scene, img) = world.sample(Split::Train);
            imgs.extend(image_to_chw(&img));
            coverage.extend(object_coverage(&img, scene.background.rgb(), vae_scale));
            ids.push(tok.encode(&scene.caption())?);
        }
        let (mean, _) = vae.encode(tensor4::<Inner>(imgs, [b, 3, n, n], device)).ok_or_else(|| anyhow::anyhow!("no encoder"))?;
        let [_, c, h, w] = mean.dims();
        shape = [c, h, w];
        raw.extend(mean.into_data().convert::<f32>().into_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?);
        pb.inc(b as u64);
    }
    pb.finish();
    // Model-space latents (z − shift)·scale with unit variance, as Flux's.
    if fit_scaling {
        let count = raw.len() as f64;
        let mean = raw.iter().map(|&v| v as f64).sum::<f64>() / count;
        let var = raw.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / count;
        let scale = 1.0 / var.sqrt().max(1e-6);
        // Stored as the config stores them; the loader reads them back rounded the same way.
        vae.shift_factor = (mean * 1e4).round() / 1e4;
        vae.scaling_factor = (scale * 1e4).round() / 1e4;
    }
    let latents: Vec<f32> = raw.iter().map(|&v| ((v as f64 - vae.shift_factor) * vae.scaling_factor) as f32).collect();
    let per_item = shape.iter().product();
    anyhow::ensure!(coverage.len() == ids.len() * shape[1] * shape[2], "object coverage does not match the latent grid");
    Ok((vae, LatentSet { latents, per_item, shape, ids, coverage }))
}

/// One warm-up + cosine cycle of Base training.
struct BaseCycle {
    steps: usize,
    /// Peak learning rate.
    lr: f64,
    /// Seeds the random initialisation (first cycle) and every draw of the cycle.
    seed: u64,
    /// The progress bar's label.
    label: &'static str,
}

/// The text encoder and Base DiT of a trained demo folder, in f32.
fn load_denoiser(dir: &Path, device: &Device<Inner>) -> anyhow::Result<Denoiser<Inner>> {
    let pipe = load_pipeline::<Inner>(&ModelFiles::locate(&dir.join("base"), &ModelOverrides::default())?, device, DType::F32, &mut |_, _, _| {})?;
    let text = pipe.text.as_ref().ok_or_else(|| anyhow::anyhow!("{}: no text encoder", dir.display()))?;
    Ok(Denoiser { text: text.model.clone(), dit: pipe.dit })
}

/// Trains text encoder and DiT together for one cycle, from `start` or from
/// a random initialisation; returns the cycle's average and its losses.
fn train_base(
    r: &Recipe,
    cycle: &BaseCycle,
    start: Option<Denoiser<Inner>>,
    data: &LatentSet,
    tok: &PromptTokenizer,
    device: &Device<Inner>,
    quiet: bool,
) -> anyhow::Result<(Denoiser<Inner>, Vec<f32>)> {
    Inner::seed(device, cycle.seed);
    let cfg = dit_config();
    let mut model: Denoiser<Ad> = match start {
        Some(inner) => trainable(inner),
        None => Denoiser::<Ad> {
            text: Qwen3Encoder::build(&text_encoder_config(), &mut RandomWeights::new(device, DType::F32))?,
            dit: ZImageDit::build(&cfg, &mut RandomWeights::new(device, DType::F32))?,
        },
    };
    let mut opt = AdamW::new(0.01, Some(1.0));
    let empty = tok.encode("")?;
    let mut rng = TorchGenerator::manual_seed(cycle.seed.wrapping_add(1));
    let pb = bar(quiet, cycle.steps, cycle.label);
    let mut losses = Vec::with_capacity(cycle.steps);
    let mut average: Option<Denoiser<Inner>> = None;
    let (b, per) = (r.base_batch, data.per_item);
    let n_items = data.ids.len();
    for step in 0..cycle.steps {
        let mut x = vec![0f32; b * per];
        let mut target = vec![0f32; b * per];
        let eps = rng.randn(b * per);
        let mut t = Vec::with_capacity(b);
        let mut ids = Vec::with_capacity(b);
        let cells = data.shape[1] * data.shape[2];
        let mut weight = Vec::with_capacity(b * cells);
        for i in 0..b {
            let k = ((rng.uniform_f64() * n_items as f64) as usize).min(n_items - 1);
            weight.extend(data.coverage[k * cells..(k + 1) * cells].iter().map(|c| 1.0 + r.object_weight * c));
            let sigma = shifted_sigma(rng.uniform_f64(), r.train_shift);
            t.push(1.0 - sigma);
            ids.push(if rng.uniform_f64() < r.caption_dropout { empty.clone() } else { data.ids[k].clone() });
            let x0 = &data.latents[k * per..(k + 1) * per];
            for j in 0..per {
                let e = eps[i * per + j];
                x[i * per + j] = (1.0 - sigma) * x0[j] + sigma * e;
                target[i * per + j] = x0[j] - e;
            }
        }
        let batch = DenoiseBatch { x, target, t, weight, shape: data.shape };
        let parts: Vec<Share<Vec<Vec<u32>>>> = split_ranges(b, threads())
            .into_iter()
            .map(|k| ((batch.part(k.clone()), ids[k.clone()].to_vec()), k.len()))
            .collect();
        let norm = batch.mean_weight();
        let (grads, value) = data_parallel_grads(&model, &parts, |model: &Denoiser<Ad>, (p, ids): &(DenoiseBatch, Vec<Vec<u32>>)| {
            p.loss(&model.dit, &cfg, &encode_batch(&model.text, ids), norm, device)
        })?;
        anyhow::ensure!(value.is_finite(), "Base training diverged at step {step}");
        losses.push(value);
        model = opt.step(lr_at(step, cycle.steps, cycle.lr), model, grads);
        // Warm-up of the average (the usual min(decay, (1+n)/(10+n))) so the
        // random initialisation is forgotten within the first few hundred steps.
        let decay = r.base_ema.min((1.0 + step as f64) / (10.0 + step as f64));
        average = Some(match average {
            None => model.valid(),
            Some(avg) => blend(avg, &model.valid(), decay as f32),
        });
        pb.inc(1);
        pb.set_message(format!("loss {value:.4}"));
    }
    pb.finish();
    Ok((average.unwrap_or_else(|| model.valid()), losses))
}

/// One core's share of a batch: its items, their captions (token ids or
/// encoded), and how many items it holds.
type Share<C> = ((DenoiseBatch, C), usize);

/// A Base or Turbo training batch (or one core's share of it): DiT inputs at
/// times `t`, velocity targets, and per-latent-cell loss weights.
struct DenoiseBatch {
    /// `[n, c, h, w]` flattened, as `target`.
    x: Vec<f32>,
    target: Vec<f32>,
    t: Vec<f32>,
    /// `[n, h, w]`: `1 + object_weight · coverage` (and whatever else weighs a cell).
    weight: Vec<f32>,
    /// `[c, h, w]` of one item.
    shape: [usize; 3],
}

impl DenoiseBatch {
    /// Items `k` of the batch.
    fn part(&self, k: std::ops::Range<usize>) -> Self {
        let [c, h, w] = self.shape;
        let (per, cells) = (c * h * w, h * w);
        DenoiseBatch {
            x: self.x[k.start * per..k.end * per].to_vec(),
            target: self.target[k.start * per..k.end * per].to_vec(),
            t: self.t[k.clone()].to_vec(),
            weight: self.weight[k.start * cells..k.end * cells].to_vec(),
            shape: self.shape,
        }
    }

    /// The mean cell weight of the whole batch: the loss is divided by it so
    /// that it stays comparable across batches.
    fn mean_weight(&self) -> f32 {
        self.weight.iter().sum::<f32>() / self.weight.len().max(1) as f32
    }

    /// The object-weighted MSE of the DiT's velocity for these items, summed
    /// over cells and divided by `norm`.
    fn loss(&self, dit: &ZImageDit<Ad>, cfg: &ZImageDitConfig, caps: &[Tensor<Ad, 2>], norm: f32, device: &Device<Inner>) -> anyhow::Result<Tensor<Ad, 1>> {
        let [c, h, w] = self.shape;
        let n = self.t.len();
        let t = Tensor::<Ad, 1>::from_data(TensorData::new(self.t.clone(), [n]), (device, DType::F32));
        let pred = dit.forward(cfg, tensor4::<Ad>(self.x.clone(), [n, c, h, w], device), t, caps)?;
        // Repeated over the channels on flex (its broadcast over a middle dimension is slow).
        let weight = crate::fused::expand_for_flex(tensor4::<Ad>(self.weight.clone(), [n, 1, h, w], device), 1, c);
        Ok(((pred - tensor4::<Ad>(self.target.clone(), [n, c, h, w], device)).square() * weight).mean() / norm)
    }
}

/// Training threads: one per core (see [`super::parallel`]).
fn threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Base's 30-step CFG-4 outputs with the noise they started from.
struct TeacherPairs {
    noise: Vec<f32>,
    x0: Vec<f32>,
    per_item: usize,
    shape: [usize; 3],
    /// Caption features from the shared (frozen) text encoder.
    captions: Vec<Tensor<Inner, 2>>,
    /// `[N, h, w]`: object coverage of each latent cell in the caption's
    /// nominal render (Base draws its objects there, give or take a few pixels).
    coverage: Vec<f32>,
}

fn teacher_pairs(r: &Recipe, seed: u64, out: &Path, device: &Device<Inner>, quiet: bool) -> anyhow::Result<TeacherPairs> {
    let files = ModelFiles::locate(&out.join("base"), &ModelOverrides::default())?;
    let pipe = load_pipeline::<Inner>(&files, device, DType::F32, &mut |_, _, _| {})?;
    let mut world = WorldSampler::new(seed.wrapping_add(6));
    let chunk = 32;
    let pb = bar(quiet, r.teacher_pairs, "Base samples");
    let (mut noise, mut x0, mut captions, mut coverage) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut shape = [0; 3];
    let mut batch_seed = seed.wrapping_mul(1000).wrapping_add(7);
    while captions.len() < r.teacher_pairs {
        let b = chunk.min(r.teacher_pairs - captions.len());
        let scenes: Vec<super::world::Scene> = (0..b).map(|_| world.scene(Split::Train)).collect();
        let prompts: Vec<String> = scenes.iter().map(|s| s.caption()).collect();
        for s in &scenes {
            let img = super::world::render(s, &s.objects.iter().map(super::world::nominal_placement).collect::<Vec<_>>());
            coverage.extend(object_coverage(&img, s.background.rgb(), pipe.vae_scale));
        }
        let mut req = GenerateRequest::new(prompts[0].clone(), ModelKind::Base);
        req.prompts = prompts;
        req.seed = batch_seed;
        req.steps = BASE_STEPS;
        req.guidance = BASE_GUIDANCE;
        req.width = IMAGE_SIDE as u32;
        req.height = IMAGE_SIDE as u32;
        let cond = pipe.encode(&req)?;
        let latents = pipe.sample(&req, &cond, false, &mut |_| true)?;
        let [_, c, h, w] = latents.dims();
        shape = [c, h, w];
        // The sampler's starting noise: the first draw of the request's generator.
        noise.extend(TorchGenerator::manual_seed(batch_seed).randn(b * c * h * w));
        x0.extend(latents.into_data().convert::<f32>().into_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?);
        captions.extend(cond.positive);
        batch_seed = batch_seed.wrapping_add(1);
        pb.inc(b as u64);
    }
    pb.finish();
    Ok(TeacherPairs { noise, x0, per_item: shape.iter().product(), shape, captions, coverage })
}

/// Where a Turbo training item sits.
#[derive(Clone, Copy)]
enum TurboState {
    /// On the straight line from the noise to Base's result, at this σ.
    Line(f32),
    /// Where Turbo's own 4-step sampler is after this many steps from the noise.
    Rollout(usize),
}

/// Turbo from Base by distillation on Base's own samples, object-weighted as
/// Base's loss. Half the items sit on the straight line between a noise and
/// Base's result for it (reflow: target `x0_base − ε`), mostly at the σs the
/// 4- and 8-step schedules visit; the other half where Turbo's own 4-step
/// sampler, run with the current weights, actually is after 0–3 steps, with
/// the velocity that would land on Base's result from there
/// (`(x0_base − x_i) / σ_i`). Why the second half: trained on the line only,
/// Turbo's own trajectory drifted off it and small shapes came out as blobs
/// (small triangles 18 % vs Base's 76 % on run 9's Base; with it 69 %).
fn train_turbo(
    r: &Recipe,
    seed: u64,
    base: ZImageDit<Inner>,
    cfg: &ZImageDitConfig,
    pairs: &TeacherPairs,
    device: &Device<Inner>,
    quiet: bool,
) -> anyhow::Result<(ZImageDit<Inner>, Vec<f32>)> {
    let mut dit = ZImageDit::<Ad>::from_inner(base);
    let mut opt = AdamW::new(0.0, Some(1.0));
    let schedule = Schedule::new(TURBO_STEPS, TURBO_SHIFT);
    let mut visited: Vec<f32> = schedule.sigmas[..TURBO_STEPS].to_vec();
    visited.extend_from_slice(&Schedule::new(2 * TURBO_STEPS, TURBO_SHIFT).sigmas[..2 * TURBO_STEPS]);
    let mut rng = TorchGenerator::manual_seed(seed.wrapping_add(8));
    let pb = bar(quiet, r.turbo_steps, "Turbo");
    let mut losses = Vec::with_capacity(r.turbo_steps);
    let (b, per) = (r.turbo_batch, pairs.per_item);
    let [c, h, w] = pairs.shape;
    let cells = h * w;
    let n_items = pairs.captions.len();
    for step in 0..r.turbo_steps {
        let mut items = Vec::with_capacity(b);
        for _ in 0..b {
            let k = ((rng.uniform_f64() * n_items as f64) as usize).min(n_items - 1);
            let (kind, u) = (rng.uniform_f64(), rng.uniform_f64());
            let state = if kind < r.turbo_rollout {
                TurboState::Rollout(((u * TURBO_STEPS as f64) as usize).min(TURBO_STEPS - 1))
            } else if kind < r.turbo_rollout + (1.0 - r.turbo_rollout) * 0.75 {
                TurboState::Line(visited[((u * visited.len() as f64) as usize).min(visited.len() - 1)])
            } else {
                TurboState::Line(shifted_sigma(u, TURBO_SHIFT as f64))
            };
            items.push((k, state));
        }
        // Turbo's own trajectories (no gradient) for the rollout items.
        let rollout: Vec<(usize, usize)> =
            items.iter().enumerate().filter_map(|(i, (_, s))| if let TurboState::Rollout(j) = s { Some((i, *j)) } else { None }).collect();
        let mut states: Vec<Vec<f32>> = vec![Vec::new(); b];
        if let Some(deepest) = rollout.iter().map(|r| r.1).max() {
            let inner = dit.valid();
            let n = rollout.len();
            let mut x: Vec<f32> = rollout.iter().flat_map(|&(i, _)| pairs.noise[items[i].0 * per..][..per].iter().copied()).collect();
            let caps: Vec<Tensor<Inner, 2>> = rollout.iter().map(|&(i, _)| pairs.captions[items[i].0].clone()).collect();
            for j in 0..=deepest {
                for (slot, &(i, want)) in rollout.iter().enumerate() {
                    if want == j {
                        states[i] = x[slot * per..(slot + 1) * per].to_vec();
                    }
                }
                if j == deepest {
                    break;
                }
                let t = Tensor::<Inner, 1>::from_data(TensorData::new(vec![schedule.model_time(j); n], [n]), (device, DType::F32));
                let u = inner.forward(cfg, tensor4::<Inner>(x.clone(), [n, c, h, w], device), t, &caps)?;
                let u = u.into_data().convert::<f32>().into_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
                let dt = schedule.dt(j);
                x.iter_mut().zip(&u).for_each(|(xv, uv)| *xv -= uv * dt);
            }
        }
        let mut x = vec![0f32; b * per];
        let mut target = vec![0f32; b * per];
        let mut t = Vec::with_capacity(b);
        let mut weight = Vec::with_capacity(b * cells);
        for (i, &(k, state)) in items.iter().enumerate() {
            let (e, x0) = (&pairs.noise[k * per..(k + 1) * per], &pairs.x0[k * per..(k + 1) * per]);
            weight.extend(pairs.coverage[k * cells..(k + 1) * cells].iter().map(|cv| 1.0 + r.object_weight * cv));
            match state {
                TurboState::Line(sigma) => {
                    t.push(1.0 - sigma);
                    for j in 0..per {
                        x[i * per + j] = (1.0 - sigma) * x0[j] + sigma * e[j];
                        target[i * per + j] = x0[j] - e[j];
                    }
                }
                TurboState::Rollout(step_index) => {
                    let sigma = schedule.sigmas[step_index];
                    t.push(schedule.model_time(step_index));
                    for j in 0..per {
                        let xs = states[i][j];
                        x[i * per + j] = xs;
                        target[i * per + j] = (x0[j] - xs) / sigma;
                    }
                }
            }
        }
        let batch = DenoiseBatch { x, target, t, weight, shape: pairs.shape };
        let parts: Vec<Share<Vec<Tensor<Inner, 2>>>> = split_ranges(b, threads())
            .into_iter()
            .map(|k| {
                let caps = items[k.clone()].iter().map(|(i, _)| pairs.captions[*i].clone()).collect();
                ((batch.part(k.clone()), caps), k.len())
            })
            .collect();
        let norm = batch.mean_weight();
        let (grads, value) = data_parallel_grads(&dit, &parts, |dit: &ZImageDit<Ad>, (p, caps): &(DenoiseBatch, Vec<Tensor<Inner, 2>>)| {
            let caps: Vec<Tensor<Ad, 2>> = caps.iter().map(|c| Tensor::<Ad, 2>::from_inner(c.clone())).collect();
            p.loss(dit, cfg, &caps, norm, device)
        })?;
        anyhow::ensure!(value.is_finite(), "Turbo training diverged at step {step}");
        losses.push(value);
        dit = opt.step(lr_at(step, r.turbo_steps, r.turbo_lr), dit, grads);
        pb.inc(1);
        pb.set_message(format!("loss {value:.4}"));
    }
    pb.finish();
    Ok((dit.valid(), losses))
}


// ---------------------------------------------------------------------------
// Writing the diffusers folders.

fn write_json(path: &Path, value: &serde_json::Value) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_vec_pretty(value)?)?;
    Ok(())
}

fn write_text_encoder(dir: &Path, enc: &Qwen3Encoder<Inner>, device: &Device<Inner>) -> anyhow::Result<()> {
    let c = text_encoder_config();
    let named = named_tensors(enc, device, |s| Qwen3Encoder::build(&c, s))?;
    write_bf16(&dir.join("model.safetensors"), &named, "model.")?;
    write_json(
        &dir.join("config.json"),
        &json!({
            "architectures": ["Qwen3Model"],
            "model_type": "qwen3",
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "intermediate_size": c.intermediate_size,
            "hidden_act": "silu",
            "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_theta,
            "max_position_embeddings": 512,
            "attention_bias": false,
            "tie_word_embeddings": true,
            "torch_dtype": "bfloat16",
            "_note": "Z-Image demo: only layers 0..num_hidden_layers-2 are stored; the pipeline reads hidden_states[-2], which the last layer and the final norm never reach."
        }),
    )
}

fn write_vae(dir: &Path, c: &crate::vae::VaeConfig, vae: &Vae<Inner>, device: &Device<Inner>) -> anyhow::Result<()> {
    let named = named_tensors(vae, device, |s| Vae::build(c, s, true))?;
    write_bf16(&dir.join("diffusion_pytorch_model.safetensors"), &named, "")?;
    let levels = c.block_out_channels.len();
    write_json(
        &dir.join("config.json"),
        &json!({
            "_class_name": "AutoencoderKL",
            "_diffusers_version": "0.36.0",
            "act_fn": "silu",
            "block_out_channels": c.block_out_channels,
            "down_block_types": vec!["DownEncoderBlock2D"; levels],
            "up_block_types": vec!["UpDecoderBlock2D"; levels],
            "in_channels": c.in_channels,
            "out_channels": c.in_channels,
            "latent_channels": c.latent_channels,
            "layers_per_block": c.layers_per_block,
            "norm_num_groups": c.norm_num_groups,
            "sample_size": IMAGE_SIDE,
            "scaling_factor": vae.scaling_factor,
            "shift_factor": vae.shift_factor,
            "use_quant_conv": false,
            "use_post_quant_conv": false,
            "mid_block_add_attention": true,
            "force_upcast": true
        }),
    )
}

/// Fits the step previews' latent → RGB map of the VAE in `vae_dir` (its
/// latent space is its own, not Flux's) on 256 training scenes, by least
/// squares from each latent cell to its patch's mean colour, and writes
/// it into the VAE's `config.json` as `zimage_latent_rgb`.
pub fn write_preview_projection(vae_dir: &Path, seed: u64) -> anyhow::Result<crate::preview::LatentRgb> {
    let device: Device<Inner> = Default::default();
    let (cfg, vae) = super::eval::load_vae_dir(vae_dir, &device)?;
    let config_path = vae_dir.join("config.json");
    let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(&config_path)?)?;
    let (scale, n) = (cfg.scale(), IMAGE_SIDE);
    let mut world = WorldSampler::new(seed);
    let (mut cells, mut colours) = (Vec::new(), Vec::new());
    for _ in 0..8 {
        let b = 32;
        let imgs: Vec<f32> = (0..b).flat_map(|_| image_to_chw(&world.sample(Split::Train).1)).collect();
        let x = tensor4::<Inner>(imgs, [b, 3, n, n], &device);
        let pooled = avg_pool2d(x.clone(), [scale, scale], [scale, scale], [0, 0], true, false);
        let (mean, _) = vae.encode(x).ok_or_else(|| anyhow::anyhow!("the VAE has no encoder"))?;
        let z = vae.scale(mean);
        let [_, c, h, w] = z.dims();
        let z: Vec<f32> = z.into_data().convert::<f32>().into_vec().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let rgb: Vec<f32> = pooled.into_data().convert::<f32>().into_vec().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        for i in 0..b {
            for p in 0..h * w {
                cells.push(std::array::from_fn(|ch| if ch < c { z[(i * c + ch) * h * w + p] } else { 0.0 }));
                colours.push(std::array::from_fn(|k| rgb[(i * 3 + k) * h * w + p]));
            }
        }
    }
    let fit = crate::preview::fit_latent_rgb(&cells, &colours).ok_or_else(|| anyhow::anyhow!("the preview fit is singular"))?;
    json["zimage_latent_rgb"] = fit.to_json();
    write_json(&config_path, &json)?;
    Ok(fit)
}

/// `steps`: what the model was made for, written as `zimage_default_steps`
/// in `model_index.json` (the app and CLI use it as the default).
fn write_dit(dir: &Path, dit: &ZImageDit<Inner>, c: &ZImageDitConfig, device: &Device<Inner>, shift: f32, steps: usize) -> anyhow::Result<()> {
    let named = named_tensors(dit, device, |s| ZImageDit::build(c, s))?;
    write_bf16(&dir.join("transformer").join("diffusion_pytorch_model.safetensors"), &named, "")?;
    write_json(
        &dir.join("transformer").join("config.json"),
        &json!({
            "_class_name": "ZImageTransformer2DModel",
            "_diffusers_version": "0.36.0",
            "all_f_patch_size": [1],
            "all_patch_size": [c.patch_size],
            "axes_dims": c.axes_dims,
            "axes_lens": c.axes_lens,
            "cap_feat_dim": c.cap_feat_dim,
            "dim": c.dim,
            "in_channels": c.in_channels,
            "n_heads": c.n_heads,
            "n_kv_heads": c.n_heads,
            "n_layers": c.n_layers,
            "n_refiner_layers": c.n_refiner_layers,
            "norm_eps": c.norm_eps,
            "qk_norm": c.qk_norm,
            "rope_theta": c.rope_theta,
            "t_scale": c.t_scale
        }),
    )?;
    write_json(
        &dir.join("scheduler").join("scheduler_config.json"),
        &json!({
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "_diffusers_version": "0.36.0",
            "num_train_timesteps": 1000,
            "shift": shift,
            "use_dynamic_shifting": false
        }),
    )?;
    write_json(
        &dir.join("model_index.json"),
        &json!({
            "_class_name": "ZImagePipeline",
            "_diffusers_version": "0.36.0",
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen3Model"],
            "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
            "transformer": ["diffusers", "ZImageTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "zimage_default_steps": steps
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_coverage_counts_non_background_pixels_per_latent_cell() {
        // 16×16 image, blue background, a red 4×4 square in the top-left 8×8 cell.
        let mut img = crate::preview::RgbImage { width: 16, height: 16, pixels: [40u8, 80, 220].repeat(256) };
        for y in 2..6 {
            for x in 2..6 {
                img.pixels[(y * 16 + x) * 3..][..3].copy_from_slice(&[220, 40, 40]);
            }
        }
        let c = object_coverage(&img, [40, 80, 220], 8);
        assert_eq!(c.len(), 4);
        assert!((c[0] - 16.0 / 64.0).abs() < 1e-6, "{c:?}");
        assert_eq!(&c[1..], &[0.0, 0.0, 0.0]);
    }

    #[test]
    fn edge_weights_mark_a_band_along_outlines_and_keep_mean_one() {
        // 8×8 black image, a white 2×2 square at (3..5, 3..5): the band is the
        // 4×4 block around it (pixels 2..6), 16 of 64 pixels.
        let side = 8;
        let mut img = vec![-1f32; 3 * side * side];
        for c in 0..3 {
            for y in 3..5 {
                for x in 3..5 {
                    img[c * side * side + y * side + x] = 1.0;
                }
            }
        }
        let w = edge_weights(&img, side, 3.0);
        assert_eq!(w.len(), 3 * side * side);
        let (band, flat) = (4.0 / (1.0 + 3.0 * 16.0 / 64.0), 1.0 / (1.0 + 3.0 * 16.0 / 64.0));
        for y in 0..side {
            for x in 0..side {
                let want = if (2..6).contains(&y) && (2..6).contains(&x) { band } else { flat };
                assert!((w[y * side + x] - want).abs() < 1e-6, "({y}, {x}): {} vs {want}", w[y * side + x]);
                assert_eq!(w[2 * side * side + y * side + x], w[y * side + x]);
            }
        }
        // A flat image is weighted 1 everywhere.
        assert!(edge_weights(&[0.3f32; 3 * 16], 4, 8.0).iter().all(|v| (*v - 1.0).abs() < 1e-6));
    }

    #[test]
    fn blend_averages_every_parameter_by_id_lazy_linears_included() {
        use burn::nn::{Linear, LinearConfig};
        let device = Default::default();
        // Mapped once so its (lazily initialised) values are fixed before cloning.
        let a = LinearConfig::new(3, 2).init::<Inner>(&device).map(&mut ScaleBy(1.0, 0.0));
        // Same ids, other values: the model after an optimiser step.
        let b = a.clone().map(&mut ScaleBy(3.0, 1.0));
        let avg = blend(a.clone(), &b, 0.75);
        let (wa, wb, wavg) = (a.weight.val().into_data(), b.weight.val().into_data(), avg.weight.val().into_data());
        for ((x, y), m) in wa.to_vec::<f32>().unwrap().iter().zip(wb.to_vec::<f32>().unwrap()).zip(wavg.to_vec::<f32>().unwrap()) {
            assert!((m - (0.75 * x + 0.25 * y)).abs() < 1e-6);
        }
        let bias = |l: &Linear<Inner>| l.bias.as_ref().unwrap().val().into_data().to_vec::<f32>().unwrap();
        for ((x, y), m) in bias(&a).iter().zip(bias(&b)).zip(bias(&avg)) {
            assert!((m - (0.75 * x + 0.25 * y)).abs() < 1e-6);
        }
    }

    #[test]
    fn polish_decoder_trains_the_decoder_and_leaves_the_encoder() {
        let device: Device<Inner> = Default::default();
        let vae = Vae::<Inner>::build(&vae_config(), &mut RandomWeights::new(&device, DType::F32), true).unwrap();
        let params = |v: &Vae<Inner>| crate::demo::optim::param_values(v);
        let encoder_ids: std::collections::HashSet<burn::module::ParamId> = match &vae.encoder {
            Some(e) => crate::demo::optim::param_values(e).into_keys().collect(),
            None => panic!("built with its encoder"),
        };
        let before = params(&vae);
        let run = DecoderPolish { steps: 2, batch: 2, lr: 1e-2, edge_weight: 8.0, seed: 3 };
        let (after, losses) = polish_decoder(vae, &run, &device, true).unwrap();
        assert_eq!(losses.len(), 2);
        assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0), "{losses:?}");
        let after = params(&after);
        let (mut encoder_same, mut decoder_changed) = (0, 0);
        for (id, old) in &before {
            let new = &after[id];
            if encoder_ids.contains(id) {
                assert_eq!(old, new, "an encoder parameter changed");
                encoder_same += 1;
            } else if old != new {
                decoder_changed += 1;
            }
        }
        assert!(encoder_same > 10 && decoder_changed > 10, "{encoder_same} encoder / {decoder_changed} decoder parameters");
    }

    #[test]
    fn replot_draws_the_curves_of_a_train_log_and_refuses_an_empty_one() {
        let dir = tempfile::tempdir().unwrap();
        let log = json!({"loss_curves": {"vae": [1.0, 0.5, 0.25], "base": [], "turbo": [0.2, 0.1]}});
        std::fs::write(dir.path().join("train_log.json"), serde_json::to_vec(&log).unwrap()).unwrap();
        let plot = dir.path().join("loss.png");
        replot(dir.path(), &plot).unwrap();
        let img = image::open(&plot).unwrap();
        // Two panels (VAE, Turbo): the empty Base curve is left out.
        let one = image::open({
            std::fs::write(dir.path().join("train_log.json"), serde_json::to_vec(&json!({"loss_curves": {"vae": [1.0, 0.5]}})).unwrap()).unwrap();
            replot(dir.path(), &dir.path().join("one.png")).unwrap();
            dir.path().join("one.png")
        })
        .unwrap();
        assert_eq!(img.width(), 2 * one.width());
        std::fs::write(dir.path().join("train_log.json"), b"{}").unwrap();
        assert!(replot(dir.path(), &plot).is_err());
        // A missing log is one line naming the file.
        let missing = replot(&dir.path().join("nowhere"), &plot).unwrap_err().to_string();
        assert!(missing.contains("nowhere") && missing.contains("train_log.json") && !missing.contains('\n'), "{missing}");
    }

    struct ScaleBy(f32, f32);

    impl burn::module::ModuleMapper<Inner> for ScaleBy {
        fn map_float<const D: usize>(&mut self, param: burn::module::Param<Tensor<Inner, D>>) -> burn::module::Param<Tensor<Inner, D>> {
            let (id, t, mapper) = param.consume();
            burn::module::Param::from_mapped_value(id, t * self.0 + self.1, mapper)
        }
    }
}
