//! What the variety knob (`zimage_engine::variety`) buys and costs, measured
//! on the built-in demo Turbo (docs/variety.md): for held-out captions, four
//! seeds each, at several varieties, how different the four images are
//! (mean absolute pixel difference over the six pairs, 0–255) and how many
//! objects the judge still finds fully right.
//!
//! `cargo run --release --example variety -- [MODEL_DIR] [CAPTIONS] [VARIETIES]`
//! (defaults: assets/demo, 60, 0,0.1,0.25,0.5,1).
use anyhow::Context;
use zimage_engine::demo::eval::{demo_request, load_demo_pair};
use zimage_engine::demo::judge::judge;
use zimage_engine::demo::world::{Split, WorldSampler};

/// The evaluation's world seed (`eval-demo`'s default).
const EVAL_SEED: u64 = 1234;
const SEEDS: u64 = 4;

fn arg(i: usize, default: &str) -> String {
    std::env::args().nth(i).unwrap_or_else(|| default.to_string())
}

fn main() -> anyhow::Result<()> {
    let dir = arg(1, "assets/demo");
    let captions: usize = arg(2, "60").parse().context("CAPTIONS must be a count")?;
    let varieties: Vec<f32> = arg(3, "0,0.1,0.25,0.5,1")
        .split(',')
        .map(|v| v.trim().parse().with_context(|| format!("variety {v:?} is not a number")))
        .collect::<anyhow::Result<_>>()?;
    let device = Default::default();
    let (_, turbo) = load_demo_pair(std::path::Path::new(&dir), &device)?;
    let mut world = WorldSampler::new(EVAL_SEED);
    let scenes: Vec<_> = (0..captions).map(|_| world.scene(Split::HeldOut)).collect();

    println!("variety | pixel difference between seeds | objects fully right | whole caption right");
    for &variety in &varieties {
        let (mut difference, mut pairs) = (0.0f64, 0usize);
        let (mut right, mut objects, mut captions_right, mut images) = (0usize, 0usize, 0usize, 0usize);
        for (i, scene) in scenes.iter().enumerate() {
            let mut pictures = Vec::new();
            for s in 0..SEEDS {
                let mut req = demo_request(&scene.caption(), EVAL_SEED.wrapping_add(1000 * i as u64 + s), false);
                req.variety = variety;
                let image = turbo.generate(&req, false, &mut |_| true)?.images.remove(0);
                let verdict = judge(&image, scene);
                right += verdict.objects.iter().filter(|o| o.all()).count();
                objects += verdict.objects.len();
                captions_right += usize::from(verdict.whole_caption());
                images += 1;
                pictures.push(image);
            }
            for a in 0..pictures.len() {
                for b in a + 1..pictures.len() {
                    let (p, q) = (&pictures[a].pixels, &pictures[b].pixels);
                    let sum: u64 = p.iter().zip(q).map(|(x, y)| u64::from(x.abs_diff(*y))).sum();
                    difference += sum as f64 / p.len() as f64;
                    pairs += 1;
                }
            }
        }
        println!(
            "{variety:7} | {:30.2} | {:18.1}% | {:18.1}%",
            difference / pairs.max(1) as f64,
            100.0 * right as f64 / objects.max(1) as f64,
            100.0 * captions_right as f64 / images.max(1) as f64
        );
    }
    Ok(())
}
