//! Parity with the reference implementation (diffusers 0.42.1 /
//! transformers 5.24.0) on the tiny fixture models, stage by stage and for
//! whole pipelines started from the seed. Fixtures: `tests/fixtures/generate.py`.

#[path = "support/mod.rs"]
mod support;

use std::sync::OnceLock;

use burn::tensor::{DType, Tensor};
use support::*;
use zimage_engine::dit::ZImageDit;
use zimage_engine::loader::{load_pipeline, ModelFiles, ModelOverrides};
use zimage_engine::pipeline::{GenerateRequest, Generation, StepControl, StepProgress, ZImagePipeline};
use zimage_engine::preview::RgbImage;
use zimage_engine::rng::TorchGenerator;
use zimage_engine::scheduler::Schedule;
use zimage_engine::text::PromptTokenizer;

fn reference() -> &'static Reference {
    static R: OnceLock<Reference> = OnceLock::new();
    R.get_or_init(Reference::load)
}

fn load(model: &str) -> ZImagePipeline<B> {
    let files = ModelFiles::locate(&fixtures().join(model), &ModelOverrides::default()).expect("locate");
    load_pipeline::<B>(&files, &device(), DType::F32, &mut |_, _, _| {}).expect("load")
}

#[test]
fn tokenizer_ids_are_exact() {
    let tok = PromptTokenizer::from_file(&fixtures().join("tiny-turbo/tokenizer/tokenizer.json")).unwrap();
    let cases = reference().json["tokenizer"].as_array().unwrap();
    assert!(cases.len() >= 6);
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let ids: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(zimage_engine::text::chat_template(prompt), case["text"].as_str().unwrap());
        assert_eq!(tok.encode(prompt).unwrap(), ids, "prompt {prompt:?}");
    }
}

#[test]
fn scheduler_sigmas_and_times_are_exact() {
    let r = reference();
    for case in r.json["scheduler"].as_array().unwrap() {
        let steps = case["steps"].as_u64().unwrap() as usize;
        let shift = case["shift"].as_f64().unwrap() as f32;
        let s = Schedule::new(steps, shift);
        let (sigmas, _) = r.f32(case["sigmas"].as_str().unwrap());
        assert_eq!(s.sigmas, sigmas, "sigmas for {steps} steps, shift {shift}");
        let (t_model, _) = r.f32(case["t_model"].as_str().unwrap());
        let ours: Vec<f32> = (0..steps).map(|i| s.model_time(i)).collect();
        assert_eq!(ours, t_model, "model times for {steps} steps, shift {shift}");
    }
}

#[test]
fn noise_from_a_seed_is_bit_exact() {
    let r = reference();
    for case in r.json["noise"].as_array().unwrap() {
        let seed = case["seed"].as_u64().unwrap();
        let mut g = TorchGenerator::manual_seed(seed);
        let mut ours = Vec::new();
        for call in case["calls"].as_array().unwrap() {
            let n: usize = call.as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).product();
            ours.extend(g.randn(n));
        }
        let (expected, _) = r.f32(case["name"].as_str().unwrap());
        let ours_bits: Vec<u32> = ours.iter().map(|v| v.to_bits()).collect();
        let exp_bits: Vec<u32> = expected.iter().map(|v| v.to_bits()).collect();
        assert_eq!(ours_bits, exp_bits, "noise {}", case["name"]);
    }
}

#[test]
fn text_encoder_hidden_states_match() {
    let r = reference();
    let pipe = load("tiny-turbo");
    for case in r.json["tokenizer"].as_array().unwrap() {
        let i = case["index"].as_u64().unwrap();
        let name = format!("te.{i}");
        if !r.has(&name) {
            continue;
        }
        let ours = pipe.text_encoder().unwrap().encode(case["prompt"].as_str().unwrap()).unwrap();
        let (expected, shape) = r.f32(&name);
        assert_eq!(ours.dims().to_vec(), shape, "{name} shape");
        assert_close(&name, &to_vec(ours), &expected, 1e-5);
    }
}

fn check_dit_case(dit: &ZImageDit<B>, pipe: &ZImagePipeline<B>, case: &str) {
    let r = reference();
    let x: Tensor<B, 4> = r.tensor(&format!("dit.{case}.x"));
    let [c, _, h, w] = x.dims();
    let x = x.reshape([1, c, h, w]);
    let t: Tensor<B, 1> = r.tensor(&format!("dit.{case}.t"));
    let cap: Tensor<B, 2> = r.tensor(&format!("dit.{case}.cap"));
    let mut seen = Vec::new();
    let out = dit
        .forward_traced(&pipe.dit_config, x, t, &[cap], &mut |name, hidden| {
            let key = format!("dit.{case}.{name}");
            if r.has(&key) {
                let (expected, _) = r.f32(&key);
                assert_close(&key, &to_vec(hidden.clone()), &expected, 1e-5);
                seen.push(key);
            }
        })
        .unwrap();
    assert!(
        seen.len() >= 3 + 2 * pipe.dit_config.n_refiner_layers + pipe.dit_config.n_layers,
        "intermediates compared: {seen:?}"
    );
    let (expected, _) = r.f32(&format!("dit.{case}.out"));
    assert_close(&format!("dit.{case}.out"), &to_vec(out), &expected, 1e-5);
}

#[test]
fn dit_output_and_every_block_match() {
    let pipe = load("tiny-turbo");
    check_dit_case(&pipe.dit, &pipe, "A");
    check_dit_case(&pipe.dit, &pipe, "B");
}

#[test]
fn dit_batch_with_captions_of_different_lengths_matches() {
    let r = reference();
    let pipe = load("tiny-turbo");
    let x0: Tensor<B, 4> = r.tensor("dit.batch.x0");
    let x1: Tensor<B, 4> = r.tensor("dit.batch.x1");
    let [c, _, h, w] = x0.dims();
    let x = Tensor::cat(vec![x0.reshape([1, c, h, w]), x1.reshape([1, c, h, w])], 0);
    let t: Tensor<B, 1> = r.tensor("dit.batch.t");
    let caps: Vec<Tensor<B, 2>> =
        r.json["dit"]["batch"]["captions"].as_array().unwrap().iter().map(|n| r.tensor(n.as_str().unwrap())).collect();
    assert_ne!(caps[0].dims()[0].div_ceil(32), caps[1].dims()[0].div_ceil(32), "fixture must exercise the mask");
    let out = pipe.dit.forward(&pipe.dit_config, x, t, &caps).unwrap();
    for i in 0..2 {
        let (expected, _) = r.f32(&format!("dit.batch.out{i}"));
        assert_close(&format!("dit.batch.out{i}"), &to_vec(out.clone().narrow(0, i, 1)), &expected, 1e-5);
    }
}

#[test]
fn vae_decode_and_encode_match() {
    let r = reference();
    let pipe = load("tiny-turbo");
    let z: Tensor<B, 4> = r.tensor("vae.decode.z");
    let (expected, _) = r.f32("vae.decode.out");
    assert_close("vae.decode", &to_vec(pipe.vae.decode(z)), &expected, 1e-5);

    let img: Tensor<B, 4> = r.tensor("vae.encode.img");
    let (mean, logvar) = pipe.vae.encode(img).expect("encoder loaded");
    let (em, _) = r.f32("vae.encode.mean");
    let (el, _) = r.f32("vae.encode.logvar");
    assert_close("vae.encode.mean", &to_vec(mean), &em, 1e-5);
    assert_close("vae.encode.logvar", &to_vec(logvar), &el, 1e-5);
}

fn init_image(name: &str) -> RgbImage {
    let img = image::open(fixtures().join(name)).expect("init image").to_rgb8();
    RgbImage { width: img.width(), height: img.height(), pixels: img.into_raw() }
}

fn request(case: &serde_json::Value) -> GenerateRequest {
    let prompts: Vec<String> = match &case["prompt"] {
        serde_json::Value::Array(a) => a.iter().map(|p| p.as_str().unwrap().to_string()).collect(),
        p => vec![p.as_str().unwrap().to_string()],
    };
    let cfg_norm = match &case["cfg_normalization"] {
        serde_json::Value::Bool(b) => {
            if *b {
                1.0
            } else {
                0.0
            }
        }
        v => v.as_f64().unwrap() as f32,
    };
    GenerateRequest {
        prompts,
        negative_prompt: case["negative_prompt"].as_str().unwrap_or("").to_string(),
        seed: case["seed"].as_u64().unwrap(),
        steps: case["steps"].as_u64().unwrap() as usize,
        guidance: case["guidance"].as_f64().unwrap() as f32,
        cfg_normalization: cfg_norm,
        cfg_truncation: case["cfg_truncation"].as_f64().unwrap() as f32,
        width: case["width"].as_u64().unwrap() as u32,
        height: case["height"].as_u64().unwrap() as u32,
        init: case["init_image"].as_str().map(init_image),
        strength: case["strength"].as_f64().unwrap_or(0.6) as f32,
        variety: 0.0,
    }
}

fn check_pipeline(name: &str) {
    let r = reference();
    let case = r.json["pipelines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name}"));
    let pipe = load(case["model"].as_str().unwrap());
    let req = request(case);
    let mut steps = 0;
    let out = pipe
        .generate(&req, true, &mut |p| {
            steps = p.done;
            assert_eq!(p.previews.len(), req.prompts.len());
            true
        })
        .unwrap();
    assert_eq!(steps as u64, case["num_steps_run"].as_u64().unwrap(), "{name}: steps run");
    let (latents, shape) = r.f32(case["latents"].as_str().unwrap());
    assert_eq!(out.latent_shape.to_vec(), shape, "{name}: latent shape");
    assert_close(&format!("{name} latents"), &out.latents, &latents, 1e-4);
    let (pixels, ishape) = r.u8(case["image"].as_str().unwrap());
    let ours: Vec<u8> = out.images.iter().flat_map(|i| i.pixels.clone()).collect();
    assert_eq!(ours.len(), pixels.len(), "{name}: image size {ishape:?}");
    let worst = ours.iter().zip(&pixels).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
    let off = ours.iter().zip(&pixels).filter(|(a, b)| a != b).count();
    eprintln!("parity {name} image: max pixel difference {worst}, {off} of {} values differ", pixels.len());
    assert!(worst <= 1, "{name}: pixels differ by up to {worst}");
}

#[test]
fn pipeline_turbo() {
    check_pipeline("turbo");
}

#[test]
fn pipeline_turbo_non_square_48x80() {
    check_pipeline("turbo_nonsquare");
}

#[test]
fn pipeline_base_cfg() {
    check_pipeline("base_cfg");
}

#[test]
fn pipeline_base_cfg_normalization_and_truncation() {
    check_pipeline("base_cfg_norm_trunc");
}

#[test]
fn pipeline_base_cfg_with_batch_mask() {
    check_pipeline("base_cfg_mask");
}

#[test]
fn pipeline_batch_of_captions_of_different_lengths() {
    check_pipeline("batch");
}

#[test]
fn pipeline_img2img() {
    check_pipeline("img2img");
}

#[test]
fn pipeline_base_img2img() {
    check_pipeline("base_img2img");
}

/// The same tiny Turbo model stored as ComfyUI single files (fused qkv, BFL
/// VAE layout) gives the same DiT output and the same image.
#[test]
fn comfyui_single_files_load_and_match() {
    let dir = fixtures().join("tiny-comfy");
    let diffusers = fixtures().join("tiny-turbo");
    let overrides =
        ModelOverrides { text_encoder: None, vae: None, tokenizer: Some(diffusers.join("tokenizer/tokenizer.json")) };
    // Single files carry no config: the DiT's and text encoder's sizes are read
    // off their tensors; the VAE's group count cannot be, so the tiny VAE gets a
    // sidecar `<stem>.json` (the real BFL file is always the FLUX.1 config).
    let tmp = tempfile::tempdir().unwrap();
    for (sub, file, cfg) in [
        ("diffusion_models", "z_image_turbo_tiny.safetensors", "transformer/config.json"),
        ("text_encoders", "qwen_3_tiny.safetensors", "text_encoder/config.json"),
        ("vae", "ae.safetensors", "vae/config.json"),
    ] {
        std::fs::create_dir_all(tmp.path().join(sub)).unwrap();
        std::fs::copy(dir.join(sub).join(file), tmp.path().join(sub).join(file)).unwrap();
        if sub == "vae" {
            let stem = file.trim_end_matches(".safetensors");
            std::fs::copy(diffusers.join(cfg), tmp.path().join(sub).join(format!("{stem}.json"))).unwrap();
        }
    }
    let files =
        ModelFiles::locate(&tmp.path().join("diffusion_models/z_image_turbo_tiny.safetensors"), &overrides).unwrap();
    let comfy = load_pipeline::<B>(&files, &device(), DType::F32, &mut |_, _, _| {}).unwrap();
    let reference_pipe = load("tiny-turbo");
    let mut req = GenerateRequest::new("a photo of a cat", comfy.kind);
    req.width = 64;
    req.height = 64;
    req.seed = 9;
    let a = comfy.generate(&req, false, &mut |_| true).unwrap();
    let b = reference_pipe.generate(&req, false, &mut |_| true).unwrap();
    assert_eq!(a.latents, b.latents, "single-file and diffusers layouts give identical latents");
    assert_eq!(a.images, b.images);
}

/// Returning `false` from the step callback stops the run at that step
/// boundary with `Cancelled`; previews are the x0 estimate at latent size.
#[test]
fn cancel_stops_at_the_step_boundary_and_previews_have_latent_size() {
    let pipe = load("tiny-turbo");
    let mut req = GenerateRequest::new("a photo of a cat", pipe.kind);
    (req.width, req.height) = (64, 48);
    let mut seen = 0;
    let result = pipe.generate(&req, true, &mut |p| {
        seen = p.done;
        assert_eq!((p.previews[0].width, p.previews[0].height), (8, 6));
        assert_eq!(p.previews[0].pixels.len(), 8 * 6 * 3);
        p.done < 3
    });
    assert!(matches!(result, Err(zimage_engine::EngineError::Cancelled)), "{:?}", result.err());
    assert_eq!(seen, 3, "no step runs after the cancel");
}

/// Runs `req` pausing after each step in `pause_after` (steps done) and
/// resuming the paused run; returns the latents and the images.
fn generate_pausing(pipe: &ZImagePipeline<B>, req: &GenerateRequest, pause_after: &[usize]) -> (Vec<f32>, Vec<RgbImage>) {
    let cond = pipe.encode(req).unwrap();
    let mut resume = None;
    let mut pauses = 0;
    loop {
        let mut on_step = |p: &StepProgress| {
            if pause_after.contains(&p.done) && p.done > pauses_done(pauses, pause_after) {
                StepControl::Pause
            } else {
                StepControl::Continue
            }
        };
        match pipe.generate_from(req, &cond, resume.take(), false, &mut on_step).unwrap() {
            Generation::Finished(g) => {
                assert_eq!(pauses, pause_after.len(), "paused at every requested step");
                return (g.latents, g.images);
            }
            Generation::Paused(run) => {
                pauses += 1;
                resume = Some(run);
            }
        }
    }
}

/// The step of the last pause taken (0 before any): a resumed run does not
/// pause again at the step it paused at.
fn pauses_done(pauses: usize, pause_after: &[usize]) -> usize {
    if pauses == 0 {
        0
    } else {
        pause_after[pauses - 1]
    }
}

/// A run paused at step boundaries and resumed gives bit for bit the latents
/// and image of one that never paused: txt2img, CFG with img2img, variety.
#[test]
fn a_paused_run_resumes_to_the_same_image() {
    let r = reference();
    for (name, variety, pause_after) in
        [("turbo", 0.0, vec![1]), ("base_img2img", 0.0, vec![1, 2]), ("turbo", 2.0, vec![1, 3])]
    {
        let case = r.json["pipelines"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap();
        let pipe = load(case["model"].as_str().unwrap());
        let mut req = request(case);
        req.variety = variety;
        let whole = pipe.generate(&req, false, &mut |_| true).unwrap();
        let (latents, images) = generate_pausing(&pipe, &req, &pause_after);
        assert_eq!(latents, whole.latents, "{name} (variety {variety}): latents after pausing at {pause_after:?}");
        assert_eq!(images, whole.images, "{name}");
    }
}

/// A paused run is refused for another request (seed, steps or size).
#[test]
fn a_paused_run_is_refused_for_another_request() {
    let pipe = load("tiny-turbo");
    let mut req = GenerateRequest::new("a photo of a cat", pipe.kind);
    (req.width, req.height) = (64, 48);
    let cond = pipe.encode(&req).unwrap();
    let mut pause = |_: &StepProgress| StepControl::Pause;
    let changes: [fn(&mut GenerateRequest); 3] = [|r| r.seed += 1, |r| r.steps += 1, |r| r.width = 48];
    for change in changes {
        let Generation::Paused(run) = pipe.generate_from(&req, &cond, None, false, &mut pause).unwrap() else {
            panic!("the run should pause");
        };
        let mut other = req.clone();
        change(&mut other);
        let result = pipe.generate_from(&other, &cond, Some(run), false, &mut |_| StepControl::Continue);
        let err = result.err().expect("refused").to_string();
        assert!(err.contains("paused run belongs to another request"), "{err}");
    }
}
