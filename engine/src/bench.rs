//! `zimage bench`: per-stage timings of a generation, on a real model or on
//! a named configuration with random weights (speed does not depend on the
//! weight values, so the full-size architecture with random weights gives
//! true speed and memory numbers without the 20 GB download).

use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, ElementConversion};
use serde::Serialize;

use crate::dit::{ZImageDit, ZImageDitConfig};
use crate::error::{EngineError, Result};
use crate::pipeline::{Conditioning, GenerateRequest, ModelKind, ZImagePipeline};
use crate::qwen3::{Qwen3Config, Qwen3Encoder};
use crate::text::{PromptTokenizer, TextEncoder};
use crate::vae::{Vae, VaeConfig};
use crate::weights::RandomWeights;

/// A model architecture to benchmark with random weights.
#[derive(Debug)]
pub struct BenchModel {
    pub name: &'static str,
    pub dit: ZImageDitConfig,
    pub text: Qwen3Config,
    pub vae: VaeConfig,
}

/// Named architectures: `full` is the published Z-Image (6.15 B DiT, Qwen3-4B,
/// FLUX VAE); `medium` and `tiny` are scaled-down copies of the same structure.
pub fn preset(name: &str) -> Result<BenchModel> {
    let model = match name {
        "full" => {
            BenchModel { name: "full", dit: ZImageDitConfig::new(), text: Qwen3Config::new(), vae: VaeConfig::new() }
        }
        "medium" => BenchModel {
            name: "medium",
            dit: ZImageDitConfig::new().with_dim(768).with_n_layers(6).with_n_heads(6).with_cap_feat_dim(1024),
            text: Qwen3Config::new()
                .with_hidden_size(1024)
                .with_num_hidden_layers(8)
                .with_num_attention_heads(8)
                .with_num_key_value_heads(4)
                .with_intermediate_size(3072),
            vae: VaeConfig::new().with_block_out_channels(vec![64, 128, 256, 256]),
        },
        "tiny" => BenchModel {
            name: "tiny",
            dit: ZImageDitConfig::new()
                .with_dim(32)
                .with_n_layers(2)
                .with_n_heads(2)
                .with_cap_feat_dim(32)
                .with_axes_dims([4, 6, 6]),
            text: Qwen3Config::new()
                .with_vocab_size(4096)
                .with_hidden_size(32)
                .with_num_hidden_layers(3)
                .with_num_attention_heads(4)
                .with_num_key_value_heads(2)
                .with_head_dim(16)
                .with_intermediate_size(64),
            vae: VaeConfig::new()
                .with_block_out_channels(vec![8, 16, 32, 32])
                .with_layers_per_block(1)
                .with_norm_num_groups(4),
        },
        other => return Err(EngineError::invalid(format!("unknown bench config {other:?}; use full, medium or tiny"))),
    };
    Ok(model)
}

/// A word-level tokenizer with Qwen3's special tokens: benchmarks with random
/// weights need token ids, not a real vocabulary.
fn bench_tokenizer() -> Result<PromptTokenizer> {
    let words = ["user", "assistant", "a", "photo", "of", "cat", "on", "the", "roof", "at", "night", "[UNK]"];
    let mut vocab = serde_json::Map::new();
    for (i, w) in words.iter().enumerate() {
        vocab.insert(w.to_string(), (i as u64).into());
    }
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| serde_json::json!({"id": words.len() + i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), ((words.len() + i) as u64).into());
    }
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    PromptTokenizer::from_bytes(json.to_string().as_bytes())
}

/// A prompt of `tokens` tokens for the bench tokenizer, whose template costs 5
/// (about the 8 of Qwen3's real tokenizer, which also counts the newlines).
fn bench_prompt(tokens: usize) -> String {
    let words = ["a", "photo", "of", "cat", "on", "the", "roof", "at", "night"];
    (0..tokens.saturating_sub(5).max(1)).map(|i| words[i % words.len()]).collect::<Vec<_>>().join(" ")
}

/// Builds a pipeline with random weights in `dtype`.
pub fn random_pipeline<B: Backend>(
    model: &BenchModel,
    kind: ModelKind,
    device: &B::Device,
    dtype: DType,
) -> Result<ZImagePipeline<B>> {
    let text = random_text_encoder(model, device, dtype)?;
    let mut pipe = random_pipeline_without_text(model, kind, device, dtype)?;
    pipe.text = Some(text);
    Ok(pipe)
}

/// Parameters of `model` as the bench loads it: (text encoder, DiT, VAE
/// decoder), counted from the shapes its modules ask for, without allocating them.
pub fn preset_params<B: Backend>(model: &BenchModel, device: &B::Device) -> Result<(u64, u64, u64)> {
    let count = |plan: crate::weights::ShapePlan<B>| -> u64 {
        plan.requested.iter().map(|(_, shape)| shape.iter().product::<usize>() as u64).sum()
    };
    let mut text = crate::weights::ShapePlan::<B>::new(device);
    Qwen3Encoder::build(&model.text, &mut text)?;
    let mut dit = crate::weights::ShapePlan::<B>::new(device);
    ZImageDit::build(&model.dit, &mut dit)?;
    let mut vae = crate::weights::ShapePlan::<B>::new(device);
    Vae::build(&model.vae, &mut vae, false)?;
    Ok((count(text), count(dit), count(vae)))
}

/// The bench text encoder with random weights.
pub fn random_text_encoder<B: Backend>(model: &BenchModel, device: &B::Device, dtype: DType) -> Result<Arc<TextEncoder<B>>> {
    let mut src = RandomWeights::<B>::new(device, dtype);
    let model = Qwen3Encoder::build(&model.text, &mut src)?;
    // The f32 draws' pages: a checkpoint's weights have none.
    B::memory_cleanup(device);
    Ok(Arc::new(TextEncoder { tokenizer: bench_tokenizer()?, model }))
}

/// DiT and VAE with random weights, no text encoder (it samples from given
/// conditioning, as the app's lowest memory plan does).
pub fn random_pipeline_without_text<B: Backend>(
    model: &BenchModel,
    kind: ModelKind,
    device: &B::Device,
    dtype: DType,
) -> Result<ZImagePipeline<B>> {
    let mut src = RandomWeights::<B>::new(device, dtype);
    let vae = Vae::build(&model.vae, &mut src, false)?;
    let dit = ZImageDit::build(&model.dit, &mut src)?;
    B::memory_cleanup(device);
    Ok(ZImagePipeline {
        name: format!("{} (random weights)", model.name),
        kind,
        text: None,
        dit,
        dit_config: model.dit.clone(),
        vae: Arc::new(vae),
        vae_scale: model.vae.scale(),
        preview: Default::default(),
        shift: kind.default_shift(),
        default_size: 1024,
        default_steps: kind.default_steps(),
        device: device.clone(),
    })
}

/// What a benchmark run measured (all times in milliseconds).
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub device: String,
    pub width: u32,
    pub height: u32,
    pub steps: usize,
    pub guidance: f32,
    pub prompt_tokens: usize,
    pub load_ms: f64,
    /// First (cold) end-to-end run: includes kernel compilation on GPUs.
    pub first_run_ms: f64,
    pub text_encode_ms: f64,
    pub dit_step_ms: Vec<f64>,
    pub dit_step_mean_ms: f64,
    pub vae_decode_ms: f64,
    pub end_to_end_ms: f64,
    /// Peak resident memory of this process (host), MiB; the driver's view
    /// of device memory is polled outside (nvidia-smi) by bench/gpu.sh.
    pub peak_host_mib: f64,
    /// GPU memory after each stage of the cold run and after the last run
    /// (empty on the CPU): what the tensors hold against what the memory
    /// pools keep, which nvidia-smi cannot tell apart.
    pub device_memory: Vec<StageMemory>,
    pub runs: usize,
    /// The hand-picked CUDA kernels the run used (`cuda_kernels::describe`); `None` off CUDA.
    pub kernels: Option<String>,
}

/// GPU memory after one stage, MiB.
#[derive(Debug, Clone, Serialize)]
pub struct StageMemory {
    pub after: String,
    pub in_use_mib: f64,
    pub reserved_mib: f64,
}

/// The GPU's own accounting now (`None` on the CPU).
fn stage_memory<B: Backend>(device: &B::Device, after: &str) -> Option<StageMemory> {
    let m = crate::device::device_memory::<B>(device)?;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    Some(StageMemory { after: after.into(), in_use_mib: mib(m.in_use), reserved_mib: mib(m.reserved) })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn sync<B: Backend>(device: &B::Device) -> Result<()> {
    B::sync(device).map_err(|e| EngineError::Device(format!("device error: {e:?}")))
}

/// Peak resident set size of this process in MiB (Linux; 0 elsewhere).
pub fn peak_host_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Times one generation stage by stage, `runs` times after one cold run;
/// reports the fastest warm run's stages. With `encoded` (the text encoder
/// already released) the prompt is not encoded again and its time is 0.
pub fn run<B: Backend>(
    pipe: &ZImagePipeline<B>,
    req: &GenerateRequest,
    encoded: Option<&Conditioning<B>>,
    load: Duration,
    runs: usize,
    device_name: &str,
) -> Result<BenchReport> {
    let device = pipe.device.clone();
    let prompt_tokens = match encoded {
        Some(c) => c.positive.first().map(|t| t.dims()[0]).unwrap_or(0),
        None => pipe.text_encoder()?.tokenizer.encode(&req.prompts[0])?.len(),
    };

    let mut memory = Vec::new();
    let probe = |after: &str, memory: &mut Vec<StageMemory>| memory.extend(stage_memory::<B>(&device, after));
    probe("load", &mut memory);
    let one = |record: bool, memory: &mut Vec<StageMemory>| -> Result<(f64, f64, Vec<f64>, f64)> {
        let start = Instant::now();
        let owned;
        let cond: &Conditioning<B> = match encoded {
            Some(c) => c,
            None => {
                owned = pipe.encode(req)?;
                &owned
            }
        };
        sync::<B>(&device)?;
        let text_ms = if encoded.is_some() { 0.0 } else { ms(start.elapsed()) };
        if !record {
            probe("text encode", memory);
        }
        let mut steps = Vec::new();
        let mut last = Instant::now();
        let latents = pipe.sample(req, cond, false, &mut |_| {
            if record {
                let _ = B::sync(&device);
                steps.push(ms(last.elapsed()));
                last = Instant::now();
            }
            true
        })?;
        sync::<B>(&device)?;
        if !record {
            probe("DiT steps", memory);
        }
        let t = Instant::now();
        pipe.decode(latents)?;
        let vae_ms = ms(t.elapsed());
        if !record {
            // The decoder's buffers are freed by now; `reserved` keeps its high water.
            probe("VAE decode", memory);
        }
        Ok((ms(start.elapsed()), text_ms, steps, vae_ms))
    };

    let (first_run_ms, ..) = one(false, &mut memory)?;
    let mut best: Option<(f64, f64, Vec<f64>, f64)> = None;
    for _ in 0..runs.max(1) {
        let r = one(true, &mut memory)?;
        if best.as_ref().is_none_or(|b| r.0 < b.0) {
            best = Some(r);
        }
    }
    probe("all runs", &mut memory);
    let (end_to_end_ms, text_encode_ms, dit_step_ms, vae_decode_ms) = best.expect("at least one run");
    let dit_step_mean_ms = dit_step_ms.iter().sum::<f64>() / dit_step_ms.len().max(1) as f64;
    Ok(BenchReport {
        model: pipe.name.clone(),
        device: device_name.into(),
        width: req.width,
        height: req.height,
        steps: req.steps,
        guidance: req.guidance,
        prompt_tokens,
        load_ms: ms(load),
        first_run_ms,
        text_encode_ms,
        dit_step_ms,
        dit_step_mean_ms,
        vae_decode_ms,
        end_to_end_ms,
        peak_host_mib: peak_host_mib(),
        device_memory: memory,
        runs: runs.max(1),
        kernels: crate::cuda_kernels::describe::<B>(&device),
    })
}

/// `zimage bench-vae`: the decoder alone, with random weights.
#[derive(Debug, Clone, Serialize)]
pub struct VaeBenchReport {
    pub config: String,
    pub device: String,
    pub width: u32,
    pub height: u32,
    /// The largest tensor the decode holds in one piece, MiB (`None`: whole
    /// tensors throughout; see [`crate::vae::DECODE_TENSOR_LIMIT_BYTES`]).
    pub tensor_limit_mib: Option<f64>,
    pub load_ms: f64,
    /// The first decode (kernel compilation, caches).
    pub first_decode_ms: f64,
    /// The fastest of the warm decodes.
    pub decode_ms: f64,
    pub runs: usize,
    /// Process high-water mark (VmHWM): the decode's own peak on the CPU.
    pub peak_host_mib: f64,
    /// The GPU's accounting after the first decode and after all (empty on the CPU).
    pub device_memory: Vec<StageMemory>,
    /// With `check`: largest |banded − whole| over the whole decode's largest
    /// magnitude, the same latents decoded both ways after the timed runs.
    pub max_rel_diff_vs_whole: Option<f64>,
}

/// Refuses a decode size off the VAE's grid or over generation's maximum side.
pub fn check_vae_size(model: &BenchModel, width: u32, height: u32) -> Result<()> {
    crate::pipeline::validate_sides(width, height, model.vae.scale() as u32)
}

/// Times a `width`×`height` decode of random latents, `runs` times after a
/// cold one, holding no tensor over `limit` bytes in one piece.
pub fn run_vae<B: Backend>(
    model: &BenchModel,
    device: &B::Device,
    dtype: DType,
    (width, height): (u32, u32),
    limit: u64,
    (runs, check): (usize, bool),
    device_name: &str,
) -> Result<VaeBenchReport> {
    check_vae_size(model, width, height)?;
    let scale = model.vae.scale() as u32;
    let start = Instant::now();
    let vae = Vae::build(&model.vae, &mut RandomWeights::<B>::new(device, dtype), false)?;
    sync::<B>(device)?;
    let load_ms = ms(start.elapsed());
    let shape = [1, model.vae.latent_channels, (height / scale) as usize, (width / scale) as usize];
    let z = burn::tensor::Tensor::<B, 4>::random(shape, burn::tensor::Distribution::Normal(0.0, 1.0), device).cast(dtype);
    let decode = || -> Result<f64> {
        let t = Instant::now();
        let image = vae.decode_within(z.clone(), limit);
        sync::<B>(device)?;
        drop(image);
        Ok(ms(t.elapsed()))
    };
    let mut device_memory = Vec::new();
    let first_decode_ms = decode()?;
    device_memory.extend(stage_memory::<B>(device, "first decode"));
    let mut best = f64::INFINITY;
    for _ in 0..runs.max(1) {
        best = best.min(decode()?);
    }
    device_memory.extend(stage_memory::<B>(device, "all decodes"));
    let max_rel_diff_vs_whole = check.then(|| {
        let whole = vae.decode_within(z.clone(), u64::MAX).cast(DType::F32);
        let banded = vae.decode_within(z.clone(), limit).cast(DType::F32);
        let scale = whole.clone().abs().max().into_scalar().elem::<f64>();
        let diff = (banded - whole).abs().max().into_scalar().elem::<f64>();
        diff / scale.max(1e-12)
    });
    Ok(VaeBenchReport {
        config: model.name.into(),
        device: device_name.into(),
        width,
        height,
        tensor_limit_mib: (limit != u64::MAX).then(|| limit as f64 / (1024.0 * 1024.0)),
        load_ms,
        first_decode_ms,
        decode_ms: best,
        runs: runs.max(1),
        peak_host_mib: peak_host_mib(),
        device_memory,
        max_rel_diff_vs_whole,
    })
}

/// The VAE report as a small table.
pub fn vae_table(r: &VaeBenchReport) -> String {
    let mut s = String::new();
    s += &format!("VAE          {} (random weights) on {}\n", r.config, r.device);
    let limit = match r.tensor_limit_mib {
        Some(mib) => format!("row bands of at most {mib:.0} MiB"),
        None => "whole tensors".into(),
    };
    s += &format!("image        {}×{}, {limit}\n", r.width, r.height);
    s += &format!("load         {:10.1} ms\n", r.load_ms);
    s += &format!("first decode {:10.1} ms (cold: kernel compilation, caches)\n", r.first_decode_ms);
    s += &format!("decode       {:10.1} ms (best of {})\n", r.decode_ms, r.runs);
    s += &format!("peak host    {:10.1} MiB\n", r.peak_host_mib);
    for m in &r.device_memory {
        s += &format!("GPU memory   {:10.1} MiB in tensors, {:10.1} MiB reserved by the pools, after {}\n", m.in_use_mib, m.reserved_mib, m.after);
    }
    if let Some(d) = r.max_rel_diff_vs_whole {
        s += &format!("bands vs whole {d:.2e} (largest difference over the largest value)\n");
    }
    s
}

/// The report as a small table.
pub fn table(r: &BenchReport) -> String {
    let mut s = String::new();
    s += &format!("model        {}\n", r.model);
    s += &format!("device       {}\n", r.device);
    if let Some(kernels) = &r.kernels {
        s += &format!("kernels      {kernels}\n");
    }
    s += &format!(
        "image        {}×{}, {} steps, guidance {}, {} prompt tokens\n",
        r.width, r.height, r.steps, r.guidance, r.prompt_tokens
    );
    s += &format!("load         {:10.1} ms\n", r.load_ms);
    s += &format!("first run    {:10.1} ms (cold: kernel compilation, caches)\n", r.first_run_ms);
    s += &format!("text encode  {:10.1} ms\n", r.text_encode_ms);
    s += &format!(
        "DiT step     {:10.1} ms mean ({} steps: {})\n",
        r.dit_step_mean_ms,
        r.dit_step_ms.len(),
        r.dit_step_ms.iter().map(|v| format!("{v:.1}")).collect::<Vec<_>>().join(", ")
    );
    s += &format!("VAE decode   {:10.1} ms\n", r.vae_decode_ms);
    s += &format!("end to end   {:10.1} ms (best of {})\n", r.end_to_end_ms, r.runs);
    s += &format!("peak host    {:10.1} MiB\n", r.peak_host_mib);
    for m in &r.device_memory {
        s += &format!("GPU memory   {:10.1} MiB in tensors, {:10.1} MiB reserved by the pools, after {}\n", m.in_use_mib, m.reserved_mib, m.after);
    }
    s
}

/// Default request for a benchmark.
pub fn request(
    kind: ModelKind,
    width: u32,
    height: u32,
    steps: Option<usize>,
    guidance: Option<f32>,
    tokens: usize,
) -> GenerateRequest {
    let mut req = GenerateRequest::new(bench_prompt(tokens), kind);
    req.width = width;
    req.height = height;
    req.steps = steps.unwrap_or(req.steps);
    req.guidance = guidance.unwrap_or(req.guidance);
    req.seed = 0;
    req
}

/// A plain-English prompt that the model's own tokenizer turns into `tokens`
/// tokens (template included) or just under, so real and random-weight runs
/// encode the same length.
pub fn fit_prompt(tokenizer: &PromptTokenizer, tokens: usize) -> Result<String> {
    let words = ["a", "photo", "of", "cat", "on", "the", "roof", "at", "night"];
    let mut prompt = String::from("a");
    for i in 0.. {
        let longer = format!("{prompt} {}", words[i % words.len()]);
        if tokenizer.count(&longer)? > tokens || longer.len() > 4 * tokens + 16 {
            break;
        }
        prompt = longer;
    }
    Ok(prompt)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The full preset is the real architecture: 6.15 B DiT and 4.0 B text
    /// encoder parameters (spec §8.10), counted without allocating them.
    #[test]
    fn preset_params_count_without_allocating() {
        let device = Default::default();
        let (text, dit, vae) = preset_params::<crate::device::CpuBackend>(&preset("full").unwrap(), &device).unwrap();
        assert!((6.1e9..6.2e9).contains(&(dit as f64)), "{dit}");
        assert!((3.9e9..4.1e9).contains(&(text as f64)), "{text}");
        assert!((4.9e7..5.0e7).contains(&(vae as f64)), "the decoder alone: {vae}");
    }
    use crate::device::CpuBackend;

    #[test]
    fn tiny_random_bench_runs_and_reports_every_stage() {
        let device = Default::default();
        let model = preset("tiny").unwrap();
        let pipe = random_pipeline::<CpuBackend>(&model, ModelKind::Turbo, &device, DType::F32).unwrap();
        let req = request(ModelKind::Turbo, 64, 64, Some(3), None, 40);
        let r = run(&pipe, &req, None, Duration::ZERO, 1, "cpu").unwrap();
        assert_eq!(r.dit_step_ms.len(), 3);
        assert!(r.prompt_tokens >= 30 && r.prompt_tokens <= 50, "{}", r.prompt_tokens);
        assert!(r.end_to_end_ms >= r.vae_decode_ms && r.end_to_end_ms > 0.0);
        assert!(table(&r).contains("DiT step"));
        assert!(preset("huge").is_err());
    }

    #[test]
    fn tiny_vae_bench_decodes_whole_and_in_bands() {
        let device = Default::default();
        let model = preset("tiny").unwrap();
        for limit in [u64::MAX, 4096] {
            let r = run_vae::<CpuBackend>(&model, &device, DType::F32, (64, 48), limit, (1, true), "cpu").unwrap();
            assert!(r.decode_ms > 0.0 && r.first_decode_ms > 0.0 && r.peak_host_mib > 0.0);
            assert_eq!(r.tensor_limit_mib.is_some(), limit != u64::MAX);
            assert!(r.device_memory.is_empty(), "the CPU has no device accounting");
            assert!(r.max_rel_diff_vs_whole.is_some_and(|d| d < 1e-5), "{:?}", r.max_rel_diff_vs_whole);
            assert!(vae_table(&r).contains("bands vs whole"));
        }
        let odd = run_vae::<CpuBackend>(&model, &device, DType::F32, (60, 48), u64::MAX, (1, false), "cpu");
        assert!(odd.unwrap_err().to_string().contains("not a multiple of 8"));
    }
}
