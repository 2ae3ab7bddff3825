//! The built-in demo model (issue 4): the shipped `assets/demo` pair loads
//! through the regular loader and draws what a fixed prompt asks for, and the
//! whole training recipe runs end to end at a tiny scale.

use burn::tensor::DType;
use zimage_engine::demo::eval::{demo_request, generate_one};
use zimage_engine::demo::judge::judge;
use zimage_engine::demo::world::Scene;
use zimage_engine::demo::{train_demo, Phase, TrainDemoOptions, TrainReport};
use zimage_engine::device::CpuBackend;
use zimage_engine::loader::{load_pipeline, locate_model, resolve_model, ModelFiles, ModelOverrides};
use zimage_engine::ModelKind;

/// Prompt and seed each shipped model is checked with.
const PROMPT: (&str, u64) = ("a large red circle in the center on a blue background", 1);

fn shipped(name: &str) -> zimage_engine::ZImagePipeline<CpuBackend> {
    let files = locate_model(name, &ModelOverrides::default()).unwrap_or_else(|e| panic!("{name} must be shipped in assets/demo: {e}"));
    load_pipeline::<CpuBackend>(&files, &Default::default(), DType::F32, &mut |_, _, _| {}).expect("load")
}

/// `train_demo` at a tiny scale into `<dir>/<out>`, quietly, with the
/// options `set` changes; returns its report.
fn tiny_run(dir: &std::path::Path, out: &str, set: impl FnOnce(&mut TrainDemoOptions)) -> TrainReport {
    let mut opts = TrainDemoOptions::new(dir.join(out));
    opts.scale = 1e-4;
    opts.quiet = true;
    set(&mut opts);
    train_demo(&opts).expect("train")
}

fn phase_names(report: &TrainReport) -> Vec<String> {
    report.phases.iter().map(|(name, _)| name.clone()).collect()
}

/// A built-in model is named by its built-in name (shown in the app, written
/// into saved images), not by its folder (`assets/demo/turbo`); a model given
/// by path keeps its folder's name.
#[test]
fn built_in_models_keep_their_names() {
    for name in ["demo-turbo", "demo-base"] {
        let files = locate_model(name, &ModelOverrides::default()).expect("shipped");
        assert_eq!(files.name, name);
        assert_eq!(shipped(name).name, name);
        let by_path = ModelFiles::locate(&resolve_model(name).expect("shipped"), &ModelOverrides::default()).expect("locate");
        assert_eq!(by_path.name, name.trim_start_matches("demo-"));
    }
}

/// Issue 4's acceptance test: the shipped pair loads through the regular
/// loader as the right kinds, and a fixed prompt gives, for both models, an
/// image the judge accepts whole (background, object colour, place, size and
/// shape, nothing else). One large object is the easy case: over 100
/// held-out captions 17 % are fully right (docs/demo-model.md).
#[test]
fn shipped_demo_models_draw_a_fixed_prompt() {
    for (name, kind) in [("demo-turbo", ModelKind::Turbo), ("demo-base", ModelKind::Base)] {
        let pipe = shipped(name);
        assert_eq!(pipe.kind, kind, "{name}: scheduler shift {} gives the wrong kind", pipe.shift);
        let (prompt, seed) = PROMPT;
        let scene = Scene::parse(prompt).expect("prompt follows the grammar");
        let (img, _) = generate_one(&pipe, &demo_request(prompt, seed, kind == ModelKind::Base)).expect("generate");
        assert_eq!((img.width, img.height), (128, 128));
        let verdict = judge(&img, &scene);
        assert!(verdict.whole_caption(), "{name}, {prompt:?}, seed {seed}: {verdict:?}");
    }
}

/// Variety changes the picture, the same way for the same seed, and at a
/// moderate setting the fixed prompt is still drawn right.
#[test]
fn variety_changes_the_image_reproducibly_and_keeps_the_prompt() {
    let pipe = shipped("demo-turbo");
    let (prompt, seed) = PROMPT;
    let scene = Scene::parse(prompt).expect("prompt follows the grammar");
    let plain = demo_request(prompt, seed, false);
    let varied = zimage_engine::GenerateRequest { variety: 1.0, ..plain.clone() };
    let (a, _) = generate_one(&pipe, &plain).expect("generate");
    let (b, _) = generate_one(&pipe, &varied).expect("generate");
    let (c, _) = generate_one(&pipe, &varied).expect("generate");
    assert_ne!(a.pixels, b.pixels, "variety 1 left the image unchanged");
    assert_eq!(b.pixels, c.pixels, "the same seed and variety must give the same image");
    let verdict = judge(&b, &scene);
    assert!(verdict.whole_caption(), "variety 1, {prompt:?}, seed {seed}: {verdict:?}");
    let absurd = zimage_engine::GenerateRequest { variety: f32::NAN, ..plain };
    let Err(err) = pipe.generate(&absurd, false, &mut |_| true) else { panic!("NaN variety must be refused") };
    let err = err.to_string();
    assert!(err.contains("variety must be between 0 and 4"), "{err}");
}

#[test]
fn training_recipe_runs_end_to_end_at_tiny_scale() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = tiny_run(dir.path(), "demo", |o| o.plot = Some(dir.path().join("loss.png")));
    assert!(report.final_losses.iter().all(|l| l.is_finite()));
    assert!(dir.path().join("loss.png").is_file());
    // Both models load back through the regular loader and sample.
    let device = Default::default();
    for (sub, base) in [("base", true), ("turbo", false)] {
        let files = ModelFiles::locate(&dir.path().join("demo").join(sub), &ModelOverrides::default()).expect("locate");
        let pipe = load_pipeline::<CpuBackend>(&files, &device, DType::F32, &mut |_, _, _| {}).expect("load");
        assert_eq!(pipe.kind == ModelKind::Base, base);
        let (img, _) = generate_one(&pipe, &demo_request("a small red circle on the left on a white background", 0, base)).expect("generate");
        assert_eq!((img.width, img.height), (128, 128));
    }
}

/// `--base-from`: the later phases alone on a trained Base. The decoder phase
/// runs once (it marks the VAE's config) and is skipped on a folder that has
/// had it, so the latent space Base was trained on never moves twice.
#[test]
fn base_from_runs_the_decoder_phase_only_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |out: &str, base_from: Option<&str>, stop_after| {
        phase_names(&tiny_run(dir.path(), out, |o| {
            o.stop_after = stop_after;
            o.base_from = base_from.map(|b| dir.path().join(b));
        }))
    };
    let decoder_steps = |out: &str| {
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(out).join("vae").join("config.json")).expect("vae config")).expect("json");
        json.get("zimage_decoder_steps").and_then(|v| v.as_u64())
    };
    let phases = run("a", None, Phase::Base);
    assert!(!phases.iter().any(|p| p.contains("decoder")) && !phases.iter().any(|p| p.contains("Turbo")), "{phases:?}");
    assert_eq!(decoder_steps("a"), None);
    let phases = run("b", Some("a"), Phase::Turbo);
    assert!(phases.iter().any(|p| p.contains("decoder")) && phases.iter().any(|p| p.contains("Turbo")), "{phases:?}");
    assert!(decoder_steps("b").is_some());
    let phases = run("c", Some("b"), Phase::Turbo);
    assert!(!phases.iter().any(|p| p.contains("decoder")) && phases.iter().any(|p| p.contains("Turbo")), "{phases:?}");
    assert_eq!(decoder_steps("c"), decoder_steps("b"));
    // The copied VAE is the polished one, byte for byte.
    let vae = |out: &str| std::fs::read(dir.path().join(out).join("vae").join("diffusion_pytorch_model.safetensors")).expect("vae");
    assert_eq!(vae("c"), vae("b"));
    assert!(ModelFiles::locate(&dir.path().join("c").join("turbo"), &ModelOverrides::default()).is_ok());
}

/// `--vae-from`: the VAE of a trained folder is used as it is: its scaling
/// (whatever the seed), its weights and config byte for byte, and the decoder
/// phase runs only if that VAE has not had it.
#[test]
fn vae_from_takes_the_folder_vae_as_it_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |out: &str, vae_from: Option<&str>, seed: u64| {
        phase_names(&tiny_run(dir.path(), out, |o| {
            o.seed = seed;
            o.vae_from = vae_from.map(|b| dir.path().join(b));
        }))
    };
    let read = |out: &str, file: &str| std::fs::read(dir.path().join(out).join(file)).expect(file);
    let phases = run("a", None, 0);
    assert!(phases.iter().any(|p| p.contains("decoder")), "{phases:?}");
    // Another seed draws other training scenes, whose statistics would give
    // another scaling: the taken VAE's must stay.
    let phases = run("b", Some("a"), 1);
    assert!(!phases.iter().any(|p| p.contains("decoder")) && phases.iter().any(|p| p.contains("Turbo")), "{phases:?}");
    for file in ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"] {
        assert_eq!(read("b", file), read("a", file), "{file}");
    }
    assert!(ModelFiles::locate(&dir.path().join("b").join("turbo"), &ModelOverrides::default()).is_ok());
}

/// `--continue-base`: one more Base cycle on a trained folder. It starts from
/// that folder's Base, keeps the folder's VAE byte for byte (its decoder
/// phase included, which therefore does not run again), runs its own number
/// of steps and writes a new Base and Turbo.
#[test]
fn continue_base_trains_the_second_cycle_from_a_trained_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |out: &str, continue_base: Option<&str>| {
        tiny_run(dir.path(), out, |o| {
            o.continue_base = continue_base.map(|b| dir.path().join(b));
            o.continue_steps = 30_000; // 3 steps at this scale
        })
    };
    let read = |out: &str, file: &str| std::fs::read(dir.path().join(out).join(file)).expect(file);
    let first = run("a", None);
    let again = run("b", Some("a"));
    let names = phase_names(&again);
    assert!(!names.iter().any(|p| p.contains("decoder")) && names.iter().any(|p| p.contains("Turbo")), "{names:?}");
    let vae = "vae/diffusion_pytorch_model.safetensors";
    assert_eq!(read("b", vae), read("a", vae), "the VAE is the trained folder's");
    assert_eq!(read("b", "vae/config.json"), read("a", "vae/config.json"));
    let base = "base/transformer/diffusion_pytorch_model.safetensors";
    assert_ne!(read("b", base), read("a", base), "Base trained further");
    assert!(again.final_losses[1].is_finite() && first.final_losses[1].is_finite());
    let log: serde_json::Value = serde_json::from_slice(&read("b", "train_log.json")).expect("log");
    let base_curve = log["loss_curves"]["base"].as_array().expect("base curve");
    let first_log: serde_json::Value = serde_json::from_slice(&read("a", "train_log.json")).expect("log");
    let first_curve = first_log["loss_curves"]["base"].as_array().expect("base curve");
    assert_eq!((base_curve.len(), first_curve.len()), (3, 2), "the further cycle's steps only");
    assert!(ModelFiles::locate(&dir.path().join("b").join("turbo"), &ModelOverrides::default()).is_ok());
    // A folder without a trained Base: one line naming it, before any phase runs.
    std::fs::create_dir_all(dir.path().join("vae_only")).expect("mkdir");
    std::fs::rename(dir.path().join("a").join("vae"), dir.path().join("vae_only").join("vae")).expect("move");
    let mut opts = TrainDemoOptions::new(dir.path().join("c"));
    opts.continue_base = Some(dir.path().join("vae_only"));
    let err = train_demo(&opts).expect_err("no Base to continue").to_string();
    assert!(err.contains("vae_only") && err.contains("text_encoder") && !err.contains('\n'), "{err}");
    assert!(!dir.path().join("c").join("tokenizer").exists(), "nothing written");
}

/// The step previews of the demo models look like the image they lead to:
/// the last step's x0 preview (through the VAE's own fitted latent → RGB
/// map) matches the decoded image averaged over the pixels of each latent
/// cell (4×4 for the demo VAE). With Flux's
/// map, which does not fit the demo VAE, they were off by ~67 levels.
#[test]
fn demo_step_previews_match_the_decoded_image() {
    for name in ["demo-turbo", "demo-base"] {
        let pipe = shipped(name);
        let req = demo_request("a large yellow square on the left on a purple background", 3, name == "demo-base");
        let mut last = None;
        let out = pipe
            .generate(&req, true, &mut |p| {
                last = p.previews.first().cloned();
                true
            })
            .expect("generate");
        let (preview, image) = (last.expect("a preview per step"), &out.images[0]);
        let (w, h) = (preview.width as usize, preview.height as usize);
        // Pixels per latent cell (the preview has one pixel per cell).
        let s = image.width as usize / w;
        assert_eq!(s * h, image.height as usize);
        let mut diff = 0f64;
        for y in 0..h {
            for x in 0..w {
                for k in 0..3 {
                    let mut sum = 0f64;
                    for dy in 0..s {
                        for dx in 0..s {
                            sum += image.pixels[((y * s + dy) * image.width as usize + x * s + dx) * 3 + k] as f64;
                        }
                    }
                    diff += (sum / (s * s) as f64 - preview.pixels[(y * w + x) * 3 + k] as f64).abs();
                }
            }
        }
        let mean = diff / (w * h * 3) as f64;
        assert!(mean < 20.0, "{name}: preview differs from the image by {mean:.1} levels on average");
    }
}
