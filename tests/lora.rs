//! LoRA parity with diffusers (`load_lora_weights` + `fuse_lora`) on the tiny
//! Turbo model, in the diffusers and the kohya/ComfyUI key formats, and exact
//! removal. Fixtures: `tests/fixtures/generate_lora.py`.

#[path = "support/st.rs"]
mod st;
#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use burn::tensor::DType;
use st::{write_safetensors, Raw};
use support::*;
use zimage_engine::loader::{load_pipeline, ModelFiles, ModelOverrides};
use zimage_engine::lora::{compatibility_warnings, AppliedLoras, LoraFile, LoraFormat, LoraTarget, TrainedOn};
use zimage_engine::pipeline::{GenerateRequest, Generated, ModelKind, ZImagePipeline};

fn lora_dir() -> PathBuf {
    fixtures().join("lora")
}

struct LoraReference {
    json: serde_json::Value,
    bytes: Vec<u8>,
}

impl LoraReference {
    fn get() -> &'static Self {
        static R: OnceLock<LoraReference> = OnceLock::new();
        R.get_or_init(|| LoraReference {
            json: serde_json::from_str(
                &std::fs::read_to_string(lora_dir().join("reference.json")).expect("reference.json"),
            )
            .unwrap(),
            bytes: std::fs::read(lora_dir().join("reference.safetensors"))
                .expect("run tests/fixtures/generate_lora.py"),
        })
    }
    fn tensor(&self, name: &str) -> Vec<u8> {
        let st = safetensors::SafeTensors::deserialize(&self.bytes).unwrap();
        st.tensor(name).unwrap().data().to_vec()
    }
    fn f32(&self, name: &str) -> Vec<f32> {
        self.tensor(name).chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }
    fn strength(&self) -> f32 {
        self.json["strength"].as_f64().unwrap() as f32
    }
}

fn load(model: &str) -> ZImagePipeline<B> {
    let files = ModelFiles::locate(&fixtures().join(model), &ModelOverrides::default()).expect("locate");
    load_pipeline::<B>(&files, &device(), DType::F32, &mut |_, _, _| {}).expect("load")
}

fn request(kind: ModelKind) -> GenerateRequest {
    let j = &LoraReference::get().json;
    let mut req = GenerateRequest::new(j["prompt"].as_str().unwrap(), kind);
    req.seed = j["seed"].as_u64().unwrap();
    req.steps = j["steps"].as_u64().unwrap() as usize;
    req.guidance = j["guidance"].as_f64().unwrap() as f32;
    req.width = j["width"].as_u64().unwrap() as u32;
    req.height = j["height"].as_u64().unwrap() as u32;
    req
}

fn generate(pipe: &ZImagePipeline<B>) -> Generated {
    pipe.generate(&request(pipe.kind), false, &mut |_| true).unwrap()
}

/// Latents within 1e-4 (relative to their scale) and pixels within ±1 of the reference.
fn assert_matches(what: &str, out: &Generated, latents: &str, image: &str) {
    let r = LoraReference::get();
    assert_close(&format!("{what} latents"), &out.latents, &r.f32(latents), 1e-4);
    let expected = r.tensor(image);
    let ours = &out.images[0].pixels;
    assert_eq!(ours.len(), expected.len());
    let worst = ours.iter().zip(&expected).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
    eprintln!("{what}: max pixel difference {worst}");
    assert!(worst <= 1, "{what}: pixels differ by up to {worst}");
}

fn open(name: &str) -> LoraFile {
    LoraFile::open(&lora_dir().join(name)).unwrap()
}

#[test]
fn both_formats_match_diffusers_fuse_lora_and_removal_is_exact() {
    let r = LoraReference::get();
    let mut pipe = load("tiny-turbo");
    let before = generate(&pipe);
    assert_matches("no LoRA", &before, "base_latents", "base_image");

    let diffusers = open("tiny_turbo_lora.safetensors");
    let kohya = open("tiny_turbo_lora_kohya.safetensors");
    assert_eq!(diffusers.format, LoraFormat::Diffusers);
    assert_eq!(kohya.format, LoraFormat::Kohya);
    let modules = r.json["modules"].as_u64().unwrap() as usize;
    assert_eq!(diffusers.module_count(), modules);
    // The kohya copy fuses q, k, v of the two main layers: 2 × (3 − 1) fewer modules.
    assert_eq!(kohya.module_count(), modules - 4);
    assert_eq!(kohya.targets().filter(|t| matches!(t, LoraTarget::FusedQkv(_))).count(), 2);

    let mut applied = AppliedLoras::new();
    for lora in [&diffusers, &kohya] {
        applied.apply(&mut pipe.dit, &[(lora, r.strength())]).unwrap();
        assert_eq!(applied.active(), &[(lora.name.clone(), r.strength())]);
        assert_matches(&format!("{} LoRA", lora.format.name()), &generate(&pipe), "latents", "image");
    }
    // Switching from one LoRA to the other went through the originals:
    // clearing now gives back the exact original output.
    applied.clear(&mut pipe.dit);
    assert_eq!(applied.touched(), 0);
    let after = generate(&pipe);
    assert_eq!(after.latents, before.latents, "removing the LoRA restores the exact latents");
    assert_eq!(after.images, before.images);
}

#[test]
fn several_loras_add_up_with_their_strengths() {
    let r = LoraReference::get();
    let mut pipe = load("tiny-turbo");
    let diffusers = open("tiny_turbo_lora.safetensors");
    let kohya = open("tiny_turbo_lora_kohya.safetensors");
    let s = r.strength();
    let mut applied = AppliedLoras::new();
    // Two copies of the same update at s/3 and 2s/3 equal one at s.
    applied.apply(&mut pipe.dit, &[(&diffusers, s / 3.0), (&kohya, 2.0 * s / 3.0)]).unwrap();
    assert_eq!(applied.active().len(), 2);
    assert_matches("two LoRAs", &generate(&pipe), "latents", "image");
    // A LoRA and its negation cancel.
    applied.apply(&mut pipe.dit, &[(&diffusers, s), (&kohya, -s)]).unwrap();
    assert_matches("LoRA minus itself", &generate(&pipe), "base_latents", "base_image");
}

#[test]
fn loras_apply_to_base_and_come_off_exactly() {
    let mut pipe = load("tiny-base");
    assert_eq!(pipe.kind, ModelKind::Base);
    let mut req = request(pipe.kind);
    req.steps = 4;
    let before = pipe.generate(&req, false, &mut |_| true).unwrap();
    let original_q = pipe.dit.layers[0].attention.to_q.weight.val().into_data();
    let lora = open("tiny_turbo_lora_kohya.safetensors");
    let mut applied = AppliedLoras::new();
    applied.apply(&mut pipe.dit, &[(&lora, 1.0)]).unwrap();
    let with = pipe.generate(&req, false, &mut |_| true).unwrap();
    assert_ne!(with.latents, before.latents, "the LoRA changes Base's output");
    applied.clear(&mut pipe.dit);
    assert_eq!(
        pipe.dit.layers[0].attention.to_q.weight.val().into_data(),
        original_q,
        "bit-identical weights after removal"
    );
    assert_eq!(pipe.generate(&req, false, &mut |_| true).unwrap().latents, before.latents);
}

/// A copy of the kohya fixture with other metadata.
fn kohya_with_metadata(dir: &std::path::Path, name: &str, metadata: &[(&str, &str)]) -> PathBuf {
    let tensors: BTreeMap<String, Raw> = st::read_all_f32(&lora_dir().join("tiny_turbo_lora_kohya.safetensors"))
        .into_iter()
        .map(|(k, (shape, v))| (k, Raw::f32(shape, &v)))
        .collect();
    let path = dir.join(name);
    write_safetensors(&path, &tensors, metadata);
    path
}

#[test]
fn metadata_warnings_for_base_loras_on_turbo() {
    let tmp = tempfile::tempdir().unwrap();
    let turbo = open("tiny_turbo_lora_kohya.safetensors");
    assert_eq!(turbo.trained_on(), Some(TrainedOn::Turbo));
    assert!(compatibility_warnings(&turbo, ModelKind::Turbo).is_empty());
    assert_eq!(compatibility_warnings(&turbo, ModelKind::Base).len(), 1);

    let base = LoraFile::open(&kohya_with_metadata(
        tmp.path(),
        "base.safetensors",
        &[("modelspec.architecture", "Z-Image/lora")],
    ))
    .unwrap();
    assert_eq!(base.trained_on(), Some(TrainedOn::Base));
    let w = compatibility_warnings(&base, ModelKind::Turbo);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("Base") && w[0].contains("Turbo"), "{w:?}");
    assert!(compatibility_warnings(&base, ModelKind::Base).is_empty());

    let unknown = LoraFile::open(&kohya_with_metadata(tmp.path(), "plain.safetensors", &[])).unwrap();
    assert_eq!(unknown.trained_on(), None);
    assert!(compatibility_warnings(&unknown, ModelKind::Turbo).is_empty());
}

#[test]
fn foreign_and_mismatched_loras_are_clean_errors_and_leave_the_model_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = |module: &str, rank: usize, d_in: usize, d_out: usize| {
        vec![
            (format!("{module}.lora_down.weight"), Raw::f32(vec![rank, d_in], &vec![0.1; rank * d_in])),
            (format!("{module}.lora_up.weight"), Raw::f32(vec![d_out, rank], &vec![0.1; d_out * rank])),
        ]
    };
    let write = |name: &str, entries: Vec<(String, Raw)>| {
        let path = tmp.path().join(name);
        write_safetensors(&path, &entries.into_iter().collect(), &[]);
        path
    };
    // A Flux LoRA: its modules do not exist in Z-Image.
    let flux = write("flux.safetensors", pair("lora_unet_double_blocks_0_img_attn_qkv", 4, 32, 96));
    let err = LoraFile::open(&flux).err().expect("refused").to_string();
    assert!(err.contains("not in the Z-Image DiT") && err.contains("double_blocks") && !err.contains('\n'), "{err}");
    // A down matrix without its up matrix.
    let half =
        write("half.safetensors", pair("lora_unet_layers_0_attention_to_q", 4, 32, 32).into_iter().take(1).collect());
    assert!(LoraFile::open(&half).err().expect("refused").to_string().contains("no up"));

    // Names that exist but sizes or blocks that do not: refused by `apply`,
    // which changes nothing.
    let mut pipe = load("tiny-turbo");
    let before = generate(&pipe);
    let mut entries = pair("lora_unet_layers_0_attention_to_q", 4, 32, 32);
    entries.extend(pair("lora_unet_layers_1_attention_to_k", 4, 48, 32));
    entries.extend(pair("lora_unet_layers_7_attention_to_v", 4, 32, 32));
    let wrong = LoraFile::open(&write("wrong.safetensors", entries)).unwrap();
    let mut applied = AppliedLoras::new();
    let err = applied.apply(&mut pipe.dit, &[(&wrong, 1.0)]).unwrap_err().to_string();
    assert!(err.contains("2 problems") && err.contains("layers.7.attention.to_v") && err.contains("32×48"), "{err}");
    assert_eq!(applied.touched(), 0);
    assert_eq!(generate(&pipe).latents, before.latents, "a refused LoRA leaves the model as it was");
}

/// `zimage generate --lora PATH[:STRENGTH]`, repeated: both LoRAs apply (their
/// strengths add up to the reference's), Base-made LoRAs warn on Turbo, and a
/// bad LoRA is one error line before anything is loaded or written.
#[test]
fn cli_lora_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let r = LoraReference::get();
    let j = &r.json;
    let model = fixtures().join("tiny-turbo").display().to_string();
    let seed = j["seed"].to_string();
    let steps = j["steps"].to_string();
    let run = |extra: &[String]| {
        let mut args: Vec<String> = [
            "generate",
            "--model",
            &model,
            "-p",
            j["prompt"].as_str().unwrap(),
            "-W",
            "64",
            "-H",
            "64",
            "--seed",
            &seed,
            "--steps",
            &steps,
            "-q",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend_from_slice(extra);
        std::process::Command::new(env!("CARGO_BIN_EXE_zimage"))
            .args(&args)
            .current_dir(tmp.path())
            .output()
            .expect("run zimage")
    };
    let s = r.strength();
    let d = lora_dir().join("tiny_turbo_lora.safetensors").display().to_string();
    let k = lora_dir().join("tiny_turbo_lora_kohya.safetensors").display().to_string();
    let out_png = tmp.path().join("out.png").display().to_string();
    let out = run(&[
        format!("--lora={d}:{}", s / 3.0),
        "--lora".into(),
        format!("{k}:{}", 2.0 * s / 3.0),
        "-o".into(),
        out_png.clone(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stderr.is_empty(), "no warnings for a Turbo LoRA on Turbo: {}", String::from_utf8_lossy(&out.stderr));
    let pixels = image::open(&out_png).unwrap().to_rgb8().into_raw();
    let expected = r.tensor("image");
    let worst = pixels.iter().zip(&expected).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
    assert!(worst <= 1, "CLI image with two --lora differs from diffusers' by {worst}");
    // The LoRAs are in the image's metadata, as A1111 writes them.
    let meta = zimage_engine::metadata::read_png_metadata_file(std::path::Path::new(&out_png)).unwrap();
    let names: Vec<&str> = meta.loras.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["tiny_turbo_lora", "tiny_turbo_lora_kohya"]);
    assert!((meta.loras[0].strength - s / 3.0).abs() < 1e-6);
    assert_eq!(meta.loras[1].hash.as_deref().map(str::len), Some(12));
    let params = zimage_engine::metadata::a1111_parameters(&meta);
    assert!(params.contains("<lora:tiny_turbo_lora_kohya:") && params.contains("Lora hashes: \""), "{params}");

    let base = kohya_with_metadata(tmp.path(), "made_for_base.safetensors", &[("ss_base_model_version", "z_image")]);
    let out = run(&[
        "--lora".into(),
        format!("{}:0.5", base.display()),
        "-o".into(),
        tmp.path().join("b.png").display().to_string(),
    ]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("warning: ") && stderr.contains("trained on Z-Image (Base)"), "{stderr}");

    for (arg, needle) in
        [("missing.safetensors", "missing.safetensors"), ("x.safetensors:", "x.safetensors:"), (":2", "no file")]
    {
        let out = run(&["--lora".into(), arg.into(), "-o".into(), tmp.path().join("never.png").display().to_string()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{arg}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("error: ") && stderr.contains(needle), "{arg}: {stderr}");
        assert!(!tmp.path().join("never.png").exists());
    }
}
