//! Diagnostic for the demo model (docs/demo-model.md, session 17): along
//! Base's trajectory on the evaluation's held-out captions, decode every
//! step's x0 estimate (`x + σ·u`) and judge the small squares and circles in
//! it, so one sees at which noise level their shapes are decided.
//!
//! `cargo run --release --example x0_trajectory -- [MODEL_DIR] [GUIDANCE] [CAPTIONS]`
//! (defaults: assets/demo, 4, 200). With `ONLY_FINAL=1` only the last step is
//! decoded: the evaluation's result for these kinds, split by caption length.
//! Fill ratios are averaged over the objects found, as `eval-demo` does.
use anyhow::Context;
use burn::tensor::{DType, Tensor, TensorData};
use zimage_engine::demo::eval::{demo_request, load_demo_pair};
use zimage_engine::demo::judge::analyse;
use zimage_engine::demo::world::{Shape, Size, Split, WorldSampler};
use zimage_engine::device::CpuBackend;
use zimage_engine::rng::TorchGenerator;
use zimage_engine::scheduler::Schedule;

/// The evaluation's world seed (`eval-demo`'s default).
const EVAL_SEED: u64 = 1234;

#[derive(Default, Clone, Copy)]
struct Tally {
    right: f64,
    seen: f64,
    /// Objects of the watched colour the judge found, and their fill ratios' sum.
    found: f64,
    fill: f64,
}

fn arg<T: std::str::FromStr>(i: usize, default: T) -> anyhow::Result<T> {
    match std::env::args().nth(i) {
        None => Ok(default),
        Some(s) => s.parse().ok().with_context(|| format!("argument {i}: cannot read {s:?}")),
    }
}

fn main() -> anyhow::Result<()> {
    let dir: String = arg(1, "assets/demo".to_string())?;
    let guidance: f32 = arg(2, 4.0)?;
    let captions: usize = arg(3, 200)?;
    let only_final = std::env::var_os("ONLY_FINAL").is_some();
    let device = Default::default();
    let (base, _) = load_demo_pair(std::path::Path::new(&dir), &device)?;
    let mut world = WorldSampler::new(EVAL_SEED);
    let scenes: Vec<_> = (0..captions).map(|_| world.scene(Split::HeldOut)).collect();
    let steps = zimage_engine::demo::BASE_STEPS;
    let schedule = Schedule::new(steps, base.shift);
    // [step][0: small square, 1: small circle]; the last step also by caption length.
    let mut along = vec![[Tally::default(); 2]; steps];
    let mut by_length = [[Tally::default(); 2]; 2];
    for (i, scene) in scenes.iter().enumerate() {
        let watched: Vec<_> =
            scene.objects.iter().filter(|o| o.size == Size::Small && o.shape != Shape::Triangle).collect();
        if watched.is_empty() {
            continue;
        }
        let mut req = demo_request(&scene.caption(), EVAL_SEED.wrapping_add(i as u64), true);
        req.guidance = guidance;
        let cond = base.encode(&req)?;
        // The pipeline's own sampler, step by step (`ZImagePipeline::sample`).
        let side = req.height as usize / base.vae_scale;
        let shape = [1, base.dit_config.in_channels, side, side];
        let noise = TorchGenerator::manual_seed(req.seed).randn(shape.iter().product());
        let mut x = Tensor::<CpuBackend, 4>::from_data(TensorData::new(noise, shape), (&device, DType::F32));
        for (step, at_step) in along.iter_mut().enumerate() {
            let t = Tensor::from_data(TensorData::new(vec![schedule.model_time(step)], [1]), (&device, DType::F32));
            let u = if guidance > 0.0 {
                let caps: Vec<_> = cond.positive.iter().chain(&cond.negative).cloned().collect();
                let both = Tensor::cat(vec![x.clone(), x.clone()], 0);
                let out = base.dit.forward(&base.dit_config, both, Tensor::cat(vec![t.clone(), t], 0), &caps)?;
                let pos = out.clone().narrow(0, 0, 1);
                pos.clone() + (pos - out.narrow(0, 1, 1)) * guidance
            } else {
                base.dit.forward(&base.dit_config, x.clone(), t, &cond.positive)?
            };
            let last = step + 1 == steps;
            if last || !only_final {
                let image = base.decode(x.clone() + u.clone() * schedule.sigmas[step])?.remove(0);
                let seen = analyse(&image);
                for o in &watched {
                    let kind = usize::from(o.shape == Shape::Circle);
                    let found = seen.objects.iter().find(|d| d.colour == o.colour);
                    let right =
                        found.is_some_and(|d| d.shape == o.shape && d.position == o.position && d.size == o.size);
                    let mut tallies = vec![&mut at_step[kind]];
                    if last {
                        tallies.push(&mut by_length[scene.objects.len() - 1][kind]);
                    }
                    for tally in tallies {
                        tally.seen += 1.0;
                        tally.right += f64::from(u8::from(right));
                        if let Some(d) = found {
                            tally.found += 1.0;
                            tally.fill += f64::from(d.fill);
                        }
                    }
                }
            }
            x = x - u * schedule.dt(step);
        }
        eprint!(".");
    }
    eprintln!();
    let show = |t: &Tally| {
        format!("{:5.1}% fill {:.3} (of {})", 100.0 * t.right / t.seen.max(1.0), t.fill / t.found.max(1.0), t.seen)
    };
    println!("step  sigma | small squares right        | small circles right");
    for (step, t) in along.iter().enumerate().filter(|(_, t)| t[0].seen > 0.0) {
        println!("{step:4} {:6.3} | {} | {}", schedule.sigmas[step], show(&t[0]), show(&t[1]));
    }
    for (n, t) in by_length.iter().enumerate() {
        println!("final, captions with {} object(s): squares {} | circles {}", n + 1, show(&t[0]), show(&t[1]));
    }
    Ok(())
}
