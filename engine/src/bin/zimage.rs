//! `zimage`: the command-line front end of the engine.
//!
//! Every failure ends as one line on stderr and a non-zero exit code; a
//! panic is caught and reported the same way (no backtrace for users).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use burn::tensor::DType;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use zimage_engine::bench;
use zimage_engine::device::{CpuBackend, DeviceKind};
use zimage_engine::loader::{self, LoadProgress, LoadStage, ModelFiles, ModelOverrides};
use zimage_engine::lora;
use zimage_engine::metadata::{self, GenerationMetadata};
use zimage_engine::pipeline::{GenerateRequest, ModelKind, ZImagePipeline};
use zimage_engine::preview::RgbImage;
use zimage_engine::pull;
use zimage_engine::text::MAX_TOKENS;

#[derive(Parser)]
#[command(
    name = "zimage",
    version,
    about = "Z-Image text-to-image on the command line (Turbo and Base)",
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an image and save it as a PNG with its parameters.
    Generate(GenerateArgs),
    /// Train the built-in demo model (tokenizer, text encoder, VAE, Base, Turbo) from scratch.
    TrainDemo {
        /// Output folder (diffusers layout: tokenizer/, text_encoder/, vae/, base/, turbo/).
        #[arg(long, default_value = "assets/demo")]
        out: PathBuf,
        /// Seed of everything (data, initialisation, noise).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Scales the number of training steps (1 = the documented recipe).
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Where to draw the loss curves (default: OUT/loss.png).
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Only (re)fit the step previews' latent → RGB map of OUT/vae (a
        /// step of the recipe; for models trained before it existed).
        #[arg(long)]
        preview_only: bool,
        /// Only redraw the loss curves of OUT/train_log.json into --plot (default OUT/loss.png).
        #[arg(long)]
        replot: bool,
        /// Only fine-tune the decoder of OUT/vae for N steps (encoder frozen),
        /// for experiments.
        #[arg(long, value_name = "N")]
        polish_only: Option<usize>,
        /// Stop after a phase (vae, base or turbo), for experiments: the VAE
        /// alone can be judged with `eval-demo --vae-round-trip`.
        #[arg(long, default_value = "turbo", value_parser = ["vae", "base", "turbo"])]
        stop_after: String,
        /// Take the VAE from this trained demo folder instead of training one, as it is (its scaling, and its full-size decoder phase if it had it).
        #[arg(long)]
        vae_from: Option<PathBuf>,
        /// Take text encoder, VAE and Base from this trained demo folder and run
        /// only the later phases (decoder at full size, Turbo).
        #[arg(long)]
        base_from: Option<PathBuf>,
        /// Take VAE, text encoder and Base from this trained demo folder, train
        /// Base for another warm-up + cosine cycle (peak lr 3e-4) from there,
        /// then run the later phases (an experiment, not the recipe).
        #[arg(long, conflicts_with_all = ["base_from", "vae_from"])]
        continue_base: Option<PathBuf>,
        /// Steps of the --continue-base cycle (times --scale).
        #[arg(long, default_value_t = 3000, requires = "continue_base",
              value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        continue_steps: usize,
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// Evaluate the demo model on held-out captions with the procedural judge (Base vs Turbo).
    EvalDemo {
        /// The trained demo folder.
        #[arg(long, default_value = "assets/demo")]
        model_dir: PathBuf,
        /// Number of held-out captions (0: only the VAE round trip).
        #[arg(long)]
        captions: Option<usize>,
        /// Picks the held-out captions and their noise (the recorded results use 1234);
        /// another seed judges the same models on another sample.
        #[arg(long, default_value_t = 1234)]
        seed: u64,
        /// Also write a sheet of sample images here.
        #[arg(long)]
        samples: Option<PathBuf>,
        /// Also judge N held-out scenes after a VAE encode/decode round trip
        /// (the ceiling any DiT can reach through this VAE).
        #[arg(long, value_name = "N")]
        vae_round_trip: Option<usize>,
        /// Sheet of originals and round trips for --vae-round-trip.
        #[arg(long)]
        vae_sheet: Option<PathBuf>,
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// Time each stage of a generation (text encode, every DiT step, VAE decode).
    Bench(BenchArgs),
    /// Time the VAE decoder alone (random weights): whole tensors or row bands.
    BenchVae {
        /// A named VAE: full (the published FLUX VAE), medium, tiny.
        #[arg(long, default_value = "full")]
        config: String,
        #[arg(long, short = 'W', default_value_t = 1024)]
        width: u32,
        #[arg(long, short = 'H', default_value_t = 1024)]
        height: u32,
        /// Largest tensor held in one piece, MiB; 0: whole tensors (the
        /// default is what generation uses).
        #[arg(long, default_value_t = (zimage_engine::vae::DECODE_TENSOR_LIMIT_BYTES >> 20) as u32)]
        tensor_mib: u32,
        /// Also decode the same latents in whole tensors and report the
        /// largest difference from the banded decode.
        #[arg(long)]
        check: bool,
        #[command(flatten)]
        run: BenchRun,
    },
    /// Time the DiT's and the VAE's heaviest ops one by one at the full
    /// model's shapes, and check the CUDA kernels against burn's defaults.
    BenchOps {
        /// cpu, cuda or wgpu.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// f32 or bf16 (default: f32 on CPU, bf16 on GPU).
        #[arg(long)]
        dtype: Option<String>,
        /// full (1024² image on the published model) or tiny.
        #[arg(long, default_value = "full")]
        shapes: String,
        /// Timed calls per op, after one untimed.
        #[arg(long, default_value_t = 10)]
        reps: usize,
        /// Also write the timings as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Only this section: matmul, attention, vae or block.
        #[arg(long)]
        only: Option<String>,
    },
    /// Show what each device (cpu, cuda, wgpu) is on this machine and in this
    /// build: the GPU, its free memory, whether it answers, and why not.
    Devices {
        /// Print JSON instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// List the Z-Image models found on this machine (Hugging Face cache,
    /// ComfyUI folders, and the given paths), with size, dtype and completeness.
    Models {
        /// More folders or files to check.
        paths: Vec<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Download Z-Image-Turbo (turbo) or Z-Image (base) from the Hugging Face hub into its
    /// cache, checking every checksum. Interrupted (Ctrl-C, network), it resumes when run again.
    Pull {
        /// turbo or base.
        model: String,
        /// Hub cache folder (default: $HF_HUB_CACHE, $HF_HOME/hub, ~/.cache/huggingface/hub).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Branch, tag or commit of the repository.
        #[arg(long, default_value = "main")]
        revision: String,
        /// No progress bars.
        #[arg(long, short = 'q')]
        quiet: bool,
    },
}

/// How `bench` and `bench-vae` run and report.
#[derive(Args)]
struct BenchRun {
    /// Warm runs after the cold one; the fastest is reported.
    #[arg(long, default_value_t = 2)]
    runs: usize,
    /// cpu, cuda or wgpu.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weight/compute dtype override: f32 or bf16 (default: f32 on CPU, bf16 on GPU).
    #[arg(long)]
    dtype: Option<String>,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
#[command(args_override_self = true)]
struct BenchArgs {
    /// A real model to load (diffusers folder, single file or built-in name).
    #[arg(long, conflicts_with = "config")]
    model: Option<String>,
    /// A named architecture with random weights: full (the published size), medium, tiny.
    #[arg(long)]
    config: Option<String>,
    /// Use random weights (implied by --config).
    #[arg(long)]
    random_weights: bool,
    /// turbo (8 steps, no CFG) or base (50 steps, CFG 4) defaults.
    #[arg(long, default_value = "turbo")]
    kind: String,
    #[arg(long, short = 'W', default_value_t = 1024)]
    width: u32,
    #[arg(long, short = 'H', default_value_t = 1024)]
    height: u32,
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long)]
    guidance: Option<f32>,
    /// Prompt length in tokens (template included).
    #[arg(long, default_value_t = 100)]
    tokens: usize,
    #[command(flatten)]
    run: BenchRun,
    /// Load the text encoder alone, encode the prompt, release it, and only
    /// then load the DiT and VAE (the app's lowest memory plan): the peak
    /// memory without the text encoder resident.
    #[arg(long)]
    release_text_encoder: bool,
}

#[derive(Args)]
struct ModelArgs {
    /// Model: a diffusers folder, a ComfyUI .safetensors DiT file, or a
    /// built-in name (demo-turbo, demo-base). Default: demo-turbo.
    #[arg(long, short = 'm')]
    model: Option<String>,
    /// Text encoder file or folder (for single-file models).
    #[arg(long)]
    text_encoder: Option<PathBuf>,
    /// VAE file or folder (for single-file models).
    #[arg(long)]
    vae: Option<PathBuf>,
    /// Qwen3 tokenizer.json or its folder (for single-file models).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// cpu, cuda or wgpu.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weight/compute dtype override: f32 or bf16 (default: f32 on CPU, bf16 on GPU).
    #[arg(long)]
    dtype: Option<String>,
}

#[derive(Args)]
#[command(args_override_self = true, allow_negative_numbers = true)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// What to draw.
    #[arg(long, short = 'p')]
    prompt: String,
    /// What to avoid (used when guidance > 0).
    #[arg(long, default_value = "")]
    negative: String,
    /// Seed of the initial noise; random (and printed) when omitted.
    #[arg(long)]
    seed: Option<u64>,
    /// Denoising steps (model default: Turbo 8, Base 50).
    #[arg(long)]
    steps: Option<usize>,
    /// Guidance g in u = u+ + g(u+ − u−); 0 turns CFG off (model default: Turbo 0, Base 4).
    #[arg(long)]
    guidance: Option<f32>,
    /// Cap the guided prediction's norm at this multiple of the conditional one (0 = off).
    #[arg(long, default_value_t = 0.0)]
    cfg_normalization: f32,
    /// Skip CFG on steps whose normalised time exceeds this (1 = never).
    #[arg(long, default_value_t = 1.0)]
    cfg_truncation: f32,
    /// Image width in pixels, a multiple of 16 (model default).
    #[arg(long, short = 'W')]
    width: Option<u32>,
    /// Image height in pixels, a multiple of 16 (model default).
    #[arg(long, short = 'H')]
    height: Option<u32>,
    /// Start from this image (img2img).
    #[arg(long)]
    init: Option<PathBuf>,
    /// img2img strength in (0, 1]: how much of the schedule to run (with --init; default 0.6).
    #[arg(long)]
    strength: Option<f32>,
    /// More different images across seeds: noise on the prompt's features for the first quarter
    /// of the steps, as a multiple of each token's spread (0 = off, at most 4).
    #[arg(long, default_value_t = 0.0)]
    variety: f32,
    /// Output PNG (default: zimage-<seed>.png in the current folder, never overwriting).
    #[arg(long, short = 'o')]
    out: Option<PathBuf>,
    /// No progress bars.
    #[arg(long, short = 'q')]
    quiet: bool,
    /// Apply a LoRA to the DiT: PATH or PATH:STRENGTH (default strength 1); repeat for several.
    #[arg(long = "lora", value_name = "PATH[:STRENGTH]")]
    loras: Vec<String>,
}

fn main() -> ExitCode {
    // Users get one line, never a backtrace; the hook replaces the default printer.
    std::panic::set_hook(Box::new(|info| {
        let msg = zimage_engine::error::panic_message(info.payload());
        eprintln!("error: internal error: {}", msg.lines().next().unwrap_or(""));
    }));
    zimage_engine::device::tune_allocator();
    zimage_engine::device::keep_compiled_kernels();
    let cli = Cli::parse();
    match std::panic::catch_unwind(|| run(cli)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
        Err(_) => ExitCode::from(70),
    }
}

/// `context: cause: cause` on one line.
fn one_line(e: &anyhow::Error) -> String {
    let parts: Vec<String> = e.chain().map(|c| c.to_string()).collect();
    let mut out: Vec<String> = Vec::new();
    for p in parts {
        if !out.iter().any(|o| o.contains(&p)) {
            out.push(p);
        }
    }
    out.join(": ").replace('\n', " ")
}

/// Runs `$f::<Backend>(args, device, dtype)` on the backend the user chose.
macro_rules! dispatch {
    ($kind:expr, $dtype:expr, $f:ident, $args:expr) => {{
        let kind: DeviceKind = $kind;
        kind.ensure_available()?;
        let dtype = $dtype;
        match kind {
            DeviceKind::Cpu => $f::<CpuBackend>($args, Default::default(), dtype),
            #[cfg(feature = "cuda")]
            DeviceKind::Cuda => $f::<zimage_engine::device::CudaBackend>($args, Default::default(), dtype),
            #[cfg(feature = "wgpu")]
            DeviceKind::Wgpu => $f::<zimage_engine::device::WgpuBackend>($args, Default::default(), dtype),
            #[allow(unreachable_patterns)]
            _ => unreachable!("ensure_available rejects devices not compiled in"),
        }
    }};
}

/// Whether `B` is the CPU backend, whose working memory is host memory.
fn on_cpu<B: Backend>() -> bool {
    std::any::TypeId::of::<B>() == std::any::TypeId::of::<CpuBackend>()
}

fn parse_dtype(kind: DeviceKind, arg: &Option<String>) -> Result<DType> {
    Ok(match arg.as_deref() {
        None => kind.weight_dtype(),
        Some("f32") => DType::F32,
        Some("bf16") => DType::BF16,
        Some(other) => bail!("unknown dtype {other:?}; use f32 or bf16"),
    })
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(args) => {
            let kind = DeviceKind::parse(&args.model.device)?;
            dispatch!(kind, parse_dtype(kind, &args.model.dtype)?, generate, args)
        }
        Command::TrainDemo { out, seed, scale, plot, preview_only: true, .. } => {
            let _ = (scale, plot);
            zimage_engine::demo::train::write_preview_projection(&out.join("vae"), seed.wrapping_add(9))?;
            println!("wrote the preview projection into {}", out.join("vae").join("config.json").display());
            Ok(())
        }
        Command::TrainDemo { out, plot, replot: true, .. } => {
            let plot = plot.unwrap_or_else(|| out.join("loss.png"));
            zimage_engine::demo::train::replot(&out, &plot)?;
            println!("wrote {}", plot.display());
            Ok(())
        }
        Command::TrainDemo { out, seed, polish_only: Some(steps), quiet, .. } => {
            let losses = zimage_engine::demo::train::polish_demo_decoder(&out, steps, seed, quiet)?;
            let tail = &losses[losses.len() - losses.len() / 10..];
            println!("decoder fine-tuned for {steps} steps; final loss {:.4}", tail.iter().sum::<f32>() / tail.len().max(1) as f32);
            Ok(())
        }
        Command::TrainDemo { out, seed, scale, plot, quiet, stop_after, vae_from, base_from, continue_base, continue_steps, .. } => {
            use zimage_engine::demo::Phase;
            let mut opts = zimage_engine::demo::TrainDemoOptions::new(out);
            opts.stop_after = match stop_after.as_str() {
                "vae" => Phase::Vae,
                "base" => Phase::Base,
                _ => Phase::Turbo,
            };
            opts.vae_from = vae_from;
            opts.base_from = base_from;
            opts.continue_base = continue_base;
            opts.continue_steps = continue_steps;
            opts.seed = seed;
            opts.scale = scale;
            opts.plot = Some(plot.unwrap_or_else(|| opts.out.join("loss.png")));
            opts.quiet = quiet;
            println!("{}", zimage_engine::demo::train_demo(&opts)?);
            Ok(())
        }
        Command::EvalDemo { model_dir, captions, seed, samples, vae_round_trip, vae_sheet, quiet } => {
            if let Some(n) = vae_round_trip {
                let score = zimage_engine::demo::eval::vae_round_trip(&model_dir, n, seed, vae_sheet.as_deref())?;
                println!(
                    "VAE round trip, {n} held-out scenes: {:.1}% of objects and {:.1}% of captions fully right\n\n{}\n",
                    score.object_accuracy() * 100.0,
                    score.caption_accuracy() * 100.0,
                    zimage_engine::demo::eval::kind_table(&[&score])
                );
            }
            if captions == Some(0) {
                return Ok(()); // only the VAE round trip was asked for
            }
            let mut opts = zimage_engine::demo::EvalDemoOptions::new(model_dir);
            if let Some(n) = captions {
                opts.captions = n;
            }
            opts.seed = seed;
            opts.samples_png = samples;
            opts.quiet = quiet;
            println!("{}", zimage_engine::demo::eval_demo(&opts)?);
            Ok(())
        }
        Command::Devices { json } => {
            let lines = zimage_engine::device::describe_devices();
            if json {
                println!("{}", serde_json::to_string_pretty(&lines)?);
            } else {
                for line in &lines {
                    println!("{:5} {}", line.device, line.status);
                }
            }
            Ok(())
        }
        Command::Models { paths, json } => {
            let found = zimage_engine::discovery::discover(&paths);
            if json {
                println!("{}", serde_json::to_string_pretty(&found)?);
            } else if found.is_empty() {
                println!("no Z-Image model found (looked in the Hugging Face cache and ComfyUI folders); the built-in demo-turbo and demo-base always work");
            } else {
                for m in &found {
                    let state = if m.complete() {
                        "complete".to_string()
                    } else {
                        format!("INCOMPLETE: {}", m.problems.join("; "))
                    };
                    println!(
                        "{:6} {:9} {:>9.2} GB {:5} {}  {}",
                        m.kind,
                        m.source,
                        m.bytes as f64 / 1e9,
                        m.dtype,
                        m.path.display(),
                        state
                    );
                }
            }
            Ok(())
        }
        Command::Bench(args) => {
            let kind = DeviceKind::parse(&args.run.device)?;
            dispatch!(kind, parse_dtype(kind, &args.run.dtype)?, bench, args)
        }
        Command::BenchVae { config, width, height, tensor_mib, check, run } => {
            let kind = DeviceKind::parse(&run.device)?;
            let limit = if tensor_mib == 0 { u64::MAX } else { u64::from(tensor_mib) << 20 };
            let dtype = parse_dtype(kind, &run.dtype)?;
            dispatch!(kind, dtype, bench_vae, (bench::preset(&config)?, (width, height), limit, check, run))
        }
        Command::BenchOps { device, dtype, shapes, reps, json, only } => {
            let kind = DeviceKind::parse(&device)?;
            let shapes = zimage_engine::kernel_bench::OpShapes::named(&shapes)?;
            dispatch!(kind, parse_dtype(kind, &dtype)?, bench_ops, (shapes, reps, json, only))
        }
        Command::Pull { model, cache_dir, revision, quiet } => pull_model(&model, cache_dir, revision, quiet),
    }
}

/// `zimage pull`: per-file and total progress bars; prints the snapshot folder.
fn pull_model(model: &str, cache_dir: Option<PathBuf>, revision: String, quiet: bool) -> Result<()> {
    let repo = pull::repo_for(model)?;
    let mut opts = pull::PullOptions::from_env()?;
    opts.revision = revision;
    if let Some(dir) = cache_dir {
        opts.cache_dir = dir;
    }
    let bars = indicatif::MultiProgress::new();
    let file_bar = bars.add(bar(quiet, 0, "{msg:50!} [{bar:25}] {bytes}/{total_bytes}"));
    let total_bar = bars.add(bar(quiet, 0, "total {bytes}/{total_bytes} [{bar:40}] {bytes_per_sec} eta {eta}"));
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let snapshot = pull::pull(repo, &opts, &cancel, &mut |p| {
        file_bar.set_message(p.file.clone());
        file_bar.set_length(p.file_total);
        file_bar.set_position(p.file_done);
        total_bar.set_length(p.total);
        total_bar.set_position(p.done);
    })
    .with_context(|| format!("cannot pull {repo}"))?;
    file_bar.finish_and_clear();
    total_bar.finish_and_clear();
    println!("{}", snapshot.display());
    Ok(())
}

fn bench<B: Backend>(args: BenchArgs, device: B::Device, dtype: DType) -> Result<()> {
    let kind = match args.kind.as_str() {
        "turbo" => ModelKind::Turbo,
        "base" => ModelKind::Base,
        other => bail!("unknown kind {other:?}; use turbo or base"),
    };
    let started = Instant::now();
    let files = match (&args.model, &args.config) {
        (Some(model), _) if !args.random_weights => {
            Some(loader::locate_model(model, &ModelOverrides::default())?)
        }
        (_, Some(_)) => None,
        _ => bail!("give --model PATH or --config full|medium|tiny"),
    };
    let preset = match (&files, &args.config) {
        (None, Some(config)) => Some(bench::preset(config)?),
        _ => None,
    };
    let kind = files.as_ref().map(|f| ModelKind::from_shift(f.shift)).unwrap_or(kind);
    if on_cpu::<B>() {
        // What is held at once: the text encoder, then the DiT and VAE when
        // it is released first; all three otherwise.
        let (name, (text, dit, vae)) = match (&files, &preset) {
            (Some(files), _) => {
                let plan = loader::plan_model::<B>(files, &device)?;
                (files.name.clone(), (plan.text_encoder_params, plan.dit_params, plan.vae_params))
            }
            (None, Some(preset)) => {
                (format!("the {} preset", preset.name), bench::preset_params::<B>(preset, &device)?)
            }
            _ => unreachable!("a model or a preset was chosen above"),
        };
        let (params, parts) = if args.release_text_encoder {
            (text.max(dit + vae), "one large part at a time")
        } else {
            (text + dit + vae, "all parts at once")
        };
        check_weights_fit_on_cpu::<B>(&name, params, dtype, parts)?;
    }
    let mut req = bench::request(kind, args.width, args.height, args.steps, args.guidance, args.tokens);
    let none: LoadProgress<'_> = &mut |_, _, _| {};
    // The lowest memory plan: the text encoder is loaded, used and released
    // before the DiT is loaded, so the two are never resident together.
    let encoded = if args.release_text_encoder {
        let text = match (&files, &preset) {
            (Some(files), _) => loader::load_text_encoder::<B>(files, &device, dtype, none)?,
            (None, Some(preset)) => bench::random_text_encoder::<B>(preset, &device, dtype)?,
            _ => unreachable!("a model or a preset was chosen above"),
        };
        if files.is_some() {
            req.prompts = vec![bench::fit_prompt(&text.tokenizer, args.tokens)?];
        }
        let shift = files.as_ref().map(|f| f.shift).unwrap_or(kind.default_shift());
        let cond = zimage_engine::pipeline::encode_prompts(&text, &req, shift)?;
        B::sync(&device).map_err(|e| anyhow::anyhow!("device error: {e:?}"))?;
        drop(text);
        // burn's GPU backends pool freed memory: hand it back to the driver.
        B::memory_cleanup(&device);
        Some(cond)
    } else {
        None
    };
    let pipe = match (&files, &preset) {
        (Some(files), _) if args.release_text_encoder => {
            let shared = loader::load_shared_with::<B>(files, &device, dtype, false, false, none)?;
            loader::load_pipeline_with::<B>(files, &shared, &device, dtype, none)?
        }
        (Some(files), _) => loader::load_pipeline::<B>(files, &device, dtype, none)?,
        (None, Some(preset)) if args.release_text_encoder => bench::random_pipeline_without_text::<B>(preset, kind, &device, dtype)?,
        (None, Some(preset)) => bench::random_pipeline::<B>(preset, kind, &device, dtype)?,
        _ => unreachable!("a model or a preset was chosen above"),
    };
    let load = started.elapsed();
    if files.is_some() && !args.release_text_encoder {
        req.prompts = vec![bench::fit_prompt(&pipe.text_encoder()?.tokenizer, args.tokens)?];
    }
    req.validate(pipe.pixel_multiple())?;
    if on_cpu::<B>() {
        if let Some(available) = zimage_engine::device::host_available_memory() {
            pipe.check_memory(&req, available)?;
        }
    }
    let device_name = format!("{} ({:?})", args.run.device, dtype);
    let report = bench::run(&pipe, &req, encoded.as_ref(), load, args.run.runs, &device_name)?;
    print!("{}", bench::table(&report));
    if let Some(path) = &args.run.json {
        let json = serde_json::to_string_pretty(&report)?;
        metadata::write_file_atomic(path, json.as_bytes())?;
    }
    Ok(())
}

fn bench_vae<B: Backend>(
    (model, size, limit, check, run): (bench::BenchModel, (u32, u32), u64, bool, BenchRun),
    device: B::Device,
    dtype: DType,
) -> Result<()> {
    let (w, h) = size;
    let scale = model.vae.scale() as u32;
    bench::check_vae_size(&model, w, h)?;
    if on_cpu::<B>() {
        if let Some(available) = zimage_engine::device::host_available_memory() {
            let need = model.vae.decode_working_bytes((h / scale) as usize, (w / scale) as usize);
            if need > available {
                let what = format!("a {w}x{h} decode");
                return Err(zimage_engine::error::EngineError::InsufficientMemory { what, need, available }.into());
            }
        }
    }
    let device_name = format!("{} ({dtype:?})", run.device);
    let report = bench::run_vae::<B>(&model, &device, dtype, size, limit, (run.runs, check), &device_name)?;
    print!("{}", bench::vae_table(&report));
    if let Some(path) = run.json {
        metadata::write_file_atomic(&path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    Ok(())
}

fn bench_ops<B: Backend>(
    (shapes, reps, json, only): (zimage_engine::kernel_bench::OpShapes, usize, Option<PathBuf>, Option<String>),
    device: B::Device,
    dtype: DType,
) -> Result<()> {
    let report = zimage_engine::kernel_bench::run::<B>(&device, dtype, shapes, reps, only.as_deref())?;
    print!("{}", zimage_engine::kernel_bench::table(&report));
    if let Some(path) = json {
        metadata::write_file_atomic(&path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    Ok(())
}

impl ModelArgs {
    fn files(&self) -> Result<ModelFiles> {
        let arg = self.model.clone().unwrap_or_else(|| "demo-turbo".into());
        let overrides = ModelOverrides {
            text_encoder: self.text_encoder.clone(),
            vae: self.vae.clone(),
            tokenizer: self.tokenizer.clone(),
        };
        Ok(loader::locate_model(&arg, &overrides)?)
    }
}

fn bar(quiet: bool, len: u64, template: &str) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()));
    pb
}

/// Loads a model with a progress bar over its bytes.
/// Running out of host memory gets the process killed: on the CPU, refuse
/// `params` weights that cannot fit before loading any. `parts`: what is
/// held at once, for the message.
fn check_weights_fit_on_cpu<B: Backend>(model: &str, params: u64, dtype: DType, parts: &str) -> Result<()> {
    if on_cpu::<B>() {
        let need = params * dtype.size() as u64;
        let how = format!("{} on the CPU, {parts}", zimage_engine::device::dtype_name(dtype));
        let available = zimage_engine::device::host_available_memory();
        zimage_engine::memory::check_weights_fit(model, &how, need, available, "host memory available")?;
    }
    Ok(())
}

fn load<B: Backend>(files: &ModelFiles, device: &B::Device, dtype: DType, quiet: bool) -> Result<ZImagePipeline<B>> {
    // The files' headers say, without reading a weight.
    let plan = loader::plan_model::<B>(files, device)?;
    let params = plan.dit_params + plan.text_encoder_params + plan.vae_params;
    check_weights_fit_on_cpu::<B>(&files.name, params, dtype, "all parts at once")?;
    // In the compute dtype, as the loader counts its bytes (not the files'
    // sizes: bf16 files loaded as f32 on the CPU filled the bar half way in).
    let total = params * dtype.size() as u64;
    let pb = bar(quiet, total, "loading {msg:12} [{bar:30}] {bytes}/{total_bytes}");
    let mut done_before = 0u64;
    let mut stage_bytes = 0u64;
    let mut current = None;
    let pipe = loader::load_pipeline::<B>(files, device, dtype, &mut |stage, _, bytes| {
        if current != Some(stage) {
            done_before += stage_bytes;
            current = Some(stage);
            pb.set_message(match stage {
                LoadStage::TextEncoder => "text encoder",
                LoadStage::Dit => "DiT",
                LoadStage::Vae => "VAE",
            });
        }
        stage_bytes = bytes;
        pb.set_position((done_before + bytes).min(total));
    })
    .with_context(|| format!("cannot load {}", files.name))?;
    pb.finish_and_clear();
    Ok(pipe)
}

fn read_init(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|cause| zimage_engine::EngineError::Io { path: path.into(), cause })?;
    let img = image::load_from_memory(&bytes)
        .with_context(|| format!("init image {}: not a picture this program can read", path.display()))?
        .to_rgb8();
    Ok(RgbImage { width: img.width(), height: img.height(), pixels: img.into_raw() })
}

/// A file name in the current folder that does not exist yet.
fn fresh_output_path(seed: u64) -> PathBuf {
    let first = PathBuf::from(format!("zimage-{seed}.png"));
    if !first.exists() {
        return first;
    }
    (1..).map(|i| PathBuf::from(format!("zimage-{seed}-{i}.png"))).find(|p| !p.exists()).expect("some name is free")
}

fn generate<B: Backend>(args: GenerateArgs, device: B::Device, dtype: DType) -> Result<()> {
    if args.prompt.trim().is_empty() {
        bail!("the prompt is empty; say what to draw with --prompt");
    }
    // Fail on bad arguments before spending time on loading.
    if let Some(out) = &args.out {
        if out.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()) != Some("png".into()) {
            bail!("output {} must end in .png", out.display());
        }
    }
    // A missing or unwritable folder fails now, not after the image was made.
    metadata::check_writable(&args.out.clone().unwrap_or_else(|| PathBuf::from("zimage.png")))?;
    // Said rather than ignored: without a start image there is nothing to be strong on.
    if args.strength.is_some() && args.init.is_none() {
        bail!("--strength is for img2img: give the start image with --init IMAGE too");
    }
    let init = args.init.as_deref().map(read_init).transpose()?;
    let files = args.model.files()?;
    let loras = args.loras.iter().map(|a| lora::open_arg(a)).collect::<Result<Vec<_>, _>>()?;

    let started = Instant::now();
    let mut pipe = load::<B>(&files, &device, dtype, args.quiet)?;
    for (file, _) in &loras {
        lora::compatibility_warnings(file, pipe.kind).iter().for_each(|w| eprintln!("warning: {w}"));
    }
    let with_strengths: Vec<_> = loras.iter().map(|(file, strength)| (file, *strength)).collect();
    lora::AppliedLoras::new().apply(&mut pipe.dit, &with_strengths)?;
    let load_time = started.elapsed();

    let seed = args.seed.unwrap_or_else(|| zimage_engine::rng::random_seed() & 0xFFFF_FFFF);
    // `{a|b|c}` reads one option per seed, as in the app (a loop over seeds explores them).
    let prompt = zimage_engine::wildcards::resolve(&args.prompt, seed);
    if prompt != args.prompt && !args.quiet {
        eprintln!("prompt: {prompt}");
    }
    let mut req = GenerateRequest::new(prompt.clone(), pipe.kind);
    req.negative_prompt = args.negative.clone();
    req.seed = seed;
    req.steps = args.steps.unwrap_or(pipe.default_steps);
    req.guidance = args.guidance.unwrap_or(req.guidance);
    req.cfg_normalization = args.cfg_normalization;
    req.cfg_truncation = args.cfg_truncation;
    req.width = args.width.unwrap_or(files.default_size);
    req.height = args.height.unwrap_or(files.default_size);
    if let Some(strength) = args.strength {
        req.strength = strength;
    }
    req.variety = args.variety;
    req.init = init;
    req.validate(pipe.pixel_multiple())?;
    // On the CPU the working memory is host memory, and running out of it
    // aborts the process: refuse what cannot fit, before allocating.
    if on_cpu::<B>() {
        if let Some(available) = zimage_engine::device::host_available_memory() {
            pipe.check_memory(&req, available)?;
        }
    }

    if loader::BUILTIN_MODELS.contains(&files.name.as_str()) {
        let unknown = zimage_engine::demo::tokenizer::unknown_words(&prompt);
        if !unknown.is_empty() {
            eprintln!("warning: the demo model knows only coloured shapes; it cannot read: {}", unknown.join(", "));
        }
    }
    if req.guidance == 0.0 && !args.negative.trim().is_empty() {
        eprintln!("warning: the negative prompt is used only with guidance above 0 (this model's default is 0); --guidance sets it");
    }
    let tokens = pipe.text_encoder()?.tokenizer.count(&prompt)?;
    if tokens > MAX_TOKENS {
        eprintln!("warning: the prompt is {tokens} tokens; only the first {MAX_TOKENS} (template included) are used");
    }
    if args.seed.is_none() {
        eprintln!("seed: {seed}");
    }

    let pb = bar(args.quiet, 0, "{msg} [{bar:30}] {pos}/{len} steps {elapsed}");
    pb.set_message(format!("{} {}×{}", pipe.kind.name(), req.width, req.height));
    let t0 = Instant::now();
    let out = pipe.generate(&req, false, &mut |p| {
        pb.set_length(p.total as u64);
        pb.set_position(p.done as u64);
        true
    })?;
    pb.finish_and_clear();
    let gen_time = t0.elapsed();

    let image = &out.images[0];
    let meta = GenerationMetadata {
        prompt: req.prompts[0].clone(),
        negative_prompt: req.negative_prompt.clone(),
        seed,
        steps: req.steps as u32,
        guidance: req.guidance,
        cfg_normalization: req.cfg_normalization,
        cfg_truncation: req.cfg_truncation,
        width: req.width,
        height: req.height,
        model: files.name.clone(),
        model_kind: pipe.kind.name().into(),
        scheduler_shift: pipe.shift,
        init_image: args.init.as_ref().map(|p| p.display().to_string()),
        strength: req.init.as_ref().map(|_| req.strength),
        parent: None,
        app: format!("zimage {}", env!("CARGO_PKG_VERSION")),
        created: metadata::utc_timestamp_now(),
        loras: loras
            .iter()
            .map(|(file, strength)| metadata::LoraRef {
                name: file.name.clone(),
                strength: *strength,
                hash: lora::short_hash(&file.path).ok(),
            })
            .collect(),
        variety: req.variety,
    };
    let path = args.out.clone().unwrap_or_else(|| fresh_output_path(seed));
    metadata::save_png(&path, &image.pixels, image.width, image.height, &meta)?;
    println!("{}", path.display());
    if !args.quiet {
        eprintln!(
            "{} {}×{}, {} steps, seed {seed}: {:.2} s (model load {:.2} s)",
            pipe.kind.name(),
            req.width,
            req.height,
            req.steps,
            gen_time.as_secs_f64(),
            load_time.as_secs_f64()
        );
    }
    Ok(())
}
