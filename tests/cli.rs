//! The `zimage` command end to end: it writes a PNG whose metadata
//! round-trips, reproduces the library's image for a seed, and every bad
//! input ends with exit code ≠ 0 and one line on stderr (no panic, no backtrace).

#[path = "support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::*;
use zimage_engine::metadata::read_png_metadata_file;

fn zimage(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zimage")).args(args).current_dir(cwd).output().expect("run zimage")
}

fn model() -> String {
    fixtures().join("tiny-turbo").display().to_string()
}

/// Runs with `args` appended to a valid base command and expects one error
/// line, which it returns.
fn expect_failure(extra: &[&str], needle: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let m = model();
    let mut args = vec!["generate", "--model", &m, "-p", "a photo of a cat", "-W", "64", "-H", "64", "--seed", "1"];
    args.extend_from_slice(extra);
    let out = zimage(&args, tmp.path());
    let stderr: String = String::from_utf8_lossy(&out.stderr).chars().take(2000).collect();
    let extra: Vec<String> = extra.iter().map(|a| a.chars().take(60).collect()).collect();
    assert!(!out.status.success(), "{extra:?} should fail");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line on stderr for {extra:?}, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(lines[0].contains(needle), "{extra:?}: {stderr:?} should mention {needle:?}");
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"), "{stderr}");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "nothing written on failure");
    lines[0].to_string()
}

#[test]
fn generates_a_png_with_round_tripping_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let out_path = tmp.path().join("cat.png");
    let prompt = "一只猫 on a roof, \"quoted\", 50% grey";
    let out = zimage(
        &[
            "generate",
            "--model",
            &model(),
            "-p",
            prompt,
            "--negative",
            "blurry",
            "--seed",
            "42",
            "-W",
            "64",
            "-H",
            "48",
            "--variety",
            "0.5",
            "-o",
            out_path.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), out_path.display().to_string());
    let meta = read_png_metadata_file(&out_path).unwrap();
    assert_eq!(meta.prompt, prompt);
    assert_eq!(meta.negative_prompt, "blurry");
    assert_eq!((meta.seed, meta.steps, meta.width, meta.height), (42, 8, 64, 48));
    assert_eq!(meta.model_kind, "turbo");
    assert_eq!(meta.variety, 0.5);
    let img = image::open(&out_path).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (64, 48));

    // Same seed through the library gives the same pixels.
    let files = zimage_engine::loader::ModelFiles::locate(&fixtures().join("tiny-turbo"), &Default::default()).unwrap();
    let pipe =
        zimage_engine::loader::load_pipeline::<B>(&files, &device(), burn::tensor::DType::F32, &mut |_, _, _| {})
            .unwrap();
    let mut req = zimage_engine::GenerateRequest::new(prompt, pipe.kind);
    req.negative_prompt = "blurry".into();
    req.seed = 42;
    req.width = 64;
    req.height = 48;
    req.variety = 0.5;
    let lib = pipe.generate(&req, false, &mut |_| true).unwrap();
    assert_eq!(lib.images[0].pixels, img.into_raw());
}

#[test]
fn random_seed_is_printed_and_files_are_never_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let args = ["generate", "--model", &model(), "-p", "a cat", "-W", "32", "-H", "32", "--seed", "7"];
    let a = zimage(&args, tmp.path());
    let b = zimage(&args, tmp.path());
    assert!(a.status.success() && b.status.success());
    assert_eq!(String::from_utf8_lossy(&a.stdout).trim(), "zimage-7.png");
    assert_eq!(String::from_utf8_lossy(&b.stdout).trim(), "zimage-7-1.png");

    let c = zimage(&["generate", "--model", &model(), "-p", "a cat", "-W", "32", "-H", "32"], tmp.path());
    assert!(c.status.success());
    let stderr = String::from_utf8_lossy(&c.stderr);
    let seed: u64 =
        stderr.lines().find_map(|l| l.strip_prefix("seed: ")).expect("seed printed").trim().parse().unwrap();
    assert_eq!(read_png_metadata_file(&tmp.path().join(format!("zimage-{seed}.png"))).unwrap().seed, seed);
}

#[test]
fn img2img_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let init = fixtures().join("init.png");
    let out = zimage(
        &[
            "generate",
            "--model",
            &model(),
            "-p",
            "a cat",
            "-W",
            "64",
            "-H",
            "64",
            "--seed",
            "5",
            "--init",
            init.to_str().unwrap(),
            "--strength",
            "0.6",
            "-o",
            "x.png",
        ],
        tmp.path(),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta = read_png_metadata_file(&tmp.path().join("x.png")).unwrap();
    assert_eq!(meta.strength, Some(0.6));
}

#[test]
fn bad_sizes() {
    expect_failure(&["-W", "60"], "not a multiple of 16");
    expect_failure(&["-H", "0"], "height must be at least 16");
    expect_failure(&["-W", "8"], "width must be at least 16");
    expect_failure(&["-W", "100000"], "larger than the maximum");
    expect_failure(&["-W", "99999"], "larger than the maximum");
}

#[test]
fn bad_prompts() {
    expect_failure(&["-p", "   "], "prompt is empty");
    let long = "cat ".repeat(6000);
    expect_failure(&["-p", &long], "the limit is");
}

#[test]
fn bad_numbers() {
    expect_failure(&["--steps", "0"], "steps must be between");
    expect_failure(&["--guidance", "-1"], "guidance must be between");
    expect_failure(&["--guidance", "nan"], "guidance");
    expect_failure(&["--variety", "5"], "variety must be between 0 and 4");
    expect_failure(&["--variety=-0.5"], "variety must be between 0 and 4");
    // Said once, in plain words (it read "…: No such file or directory (os error 2)").
    assert_eq!(expect_failure(&["--init", "missing.png"], "missing.png"), "error: missing.png: not found");
    let not_a_picture = fixtures().join("tiny-turbo").join("model_index.json");
    expect_failure(&["--init", not_a_picture.to_str().unwrap()], "model_index.json: not a picture this program can read");
    let lora = expect_failure(&["--lora", "/no/such/style.safetensors"], "style");
    assert_eq!(lora, "error: /no/such/style.safetensors: not found");
    let init = fixtures().join("init.png");
    expect_failure(&["--init", init.to_str().unwrap(), "--strength", "0"], "strength");
    expect_failure(&["--init", init.to_str().unwrap(), "--strength", "1.5"], "strength");
    // Said, not ignored: a strength means img2img.
    expect_failure(&["--strength", "0.5"], "--strength is for img2img: give the start image with --init");
}

/// The built-in demo names the words it cannot read (it draws noise for them).
#[test]
fn the_demo_model_names_the_words_it_cannot_read() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |prompt: &str, out: &str| zimage(&["generate", "--model", "demo-turbo", "-p", prompt, "--seed", "1", "-q", "-o", out], tmp.path());
    let out = run("a cat on a sofa", "a.png");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("warning: the demo model knows only coloured shapes; it cannot read: cat, sofa"), "{stderr}");
    let out = run("a large red circle in the center on a blue background", "b.png");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

/// Wildcards read one option per seed, as in the app; the PNG records the
/// prompt as read, and the line on stderr says it.
#[test]
fn wildcards_read_one_option_per_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let template = "a large {red|blue|green} circle in the center on a {black|white} background";
    let mut read = std::collections::HashSet::new();
    for seed in ["1", "2", "3", "4"] {
        let out_name = format!("{seed}.png");
        let out = zimage(&["generate", "--model", "demo-turbo", "-p", template, "--seed", seed, "-o", &out_name], tmp.path());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let meta = zimage_engine::metadata::read_png_metadata_file(&tmp.path().join(&out_name)).unwrap();
        assert_eq!(meta.prompt, zimage_engine::wildcards::resolve(template, seed.parse().unwrap()));
        assert!(stderr.contains(&format!("prompt: {}", meta.prompt)), "{stderr}");
        assert!(!stderr.contains("cannot read"), "the braces are not read as words: {stderr}");
        read.insert(meta.prompt);
    }
    assert!(read.len() > 1, "the seeds read other options: {read:?}");
}

/// `eval-demo` judges the shipped pair on held-out captions; `--seed` picks
/// another sample of them (another sheet of samples), the default the recorded one.
#[test]
fn eval_demo_judges_the_shipped_pair_on_captions_the_seed_picks() {
    let tmp = tempfile::tempdir().unwrap();
    let assets = fixtures().join("../../assets/demo").display().to_string();
    let run = |extra: &[&str]| {
        let mut args = vec!["eval-demo", "--model-dir", &assets, "--captions", "2", "-q"];
        args.extend_from_slice(extra);
        let out = zimage(&args, tmp.path());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let report = run(&["--samples", "a.png"]);
    assert!(report.contains("2 held-out captions"), "{report}");
    assert!(report.contains("**objects fully right**"), "{report}");
    run(&["--seed", "1234", "--samples", "b.png"]);
    run(&["--seed", "7", "--samples", "c.png"]);
    let sheet = |name: &str| std::fs::read(tmp.path().join(name)).unwrap();
    assert_eq!(sheet("a.png"), sheet("b.png"), "1234 is the default");
    assert_ne!(sheet("a.png"), sheet("c.png"), "another seed, other captions");
}

/// A negative prompt that the guidance leaves unused (Turbo's default of 0)
/// is warned about, and the image is still made.
#[test]
fn an_unused_negative_prompt_is_warned_about() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model();
    let base = ["generate", "--model", &m, "-p", "a cat", "-W", "64", "-H", "64", "--seed", "1", "--negative", "blurry", "-q"];
    let out = zimage(&[&base[..], &["-o", "a.png"]].concat(), tmp.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("warning: the negative prompt is used only with guidance above 0"), "{stderr}");
    let out = zimage(&[&base[..], &["--guidance", "2", "-o", "b.png"]].concat(), tmp.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !stderr.contains("negative prompt is used only"), "{stderr}");
}

/// An output that cannot be written fails before the model is even opened,
/// so a long generation is never thrown away at its end.
#[cfg(target_os = "linux")]
#[test]
fn an_unwritable_output_fails_before_anything_runs() {
    let tmp = tempfile::tempdir().unwrap();
    // /proc takes no new files, whoever runs the test (root included).
    let out = zimage(&["generate", "--model", "/no/such/model", "-p", "a cat", "-o", "/proc/zimage-test.png"], tmp.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.trim(), "error: cannot write /proc/zimage-test.png: files cannot be created in /proc", "{stderr}");
}

#[test]
fn bad_paths_and_devices() {
    expect_failure(&["--model", "/no/such/model"], "no such file or folder");
    expect_failure(&["--model", "demo-nonsense"], "unknown built-in model");
    expect_failure(&["-o", "/no/such/dir/x.png"], "does not exist");
    expect_failure(&["-o", "x.jpg"], "must end in .png");
    expect_failure(&["--device", "tpu"], "unknown device");
    if !cfg!(feature = "cuda") {
        expect_failure(&["--device", "cuda"], "no cuda support");
    }
    let tmp = tempfile::tempdir().unwrap();
    let corrupt = tmp.path().join("broken.safetensors");
    std::fs::write(&corrupt, b"\xff\xff\xff\xff\xff\xff\xff\xffgarbage").unwrap();
    expect_failure(
        &[
            "--model",
            corrupt.to_str().unwrap(),
            "--text-encoder",
            corrupt.to_str().unwrap(),
            "--vae",
            corrupt.to_str().unwrap(),
            "--tokenizer",
            fixtures().join("tiny-turbo/tokenizer").to_str().unwrap(),
        ],
        "not a valid safetensors file",
    );
}

/// A model whose weights cannot fit in the host memory there is (here a
/// limit of 1 MB for the tiny model's 2.8 MB in f32) is refused before
/// loading, in one line: on a real machine running out gets the process killed.
#[test]
fn a_model_too_large_for_the_memory_is_refused_before_loading() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model();
    let run = |limit: &str| {
        Command::new(env!("CARGO_BIN_EXE_zimage"))
            .args(["generate", "--model", &m, "-p", "a cat", "-W", "64", "-H", "64", "--seed", "1", "-q"])
            .env("ZIMAGE_MEMORY_LIMIT_GB", limit)
            .current_dir(tmp.path())
            .output()
            .expect("run zimage")
    };
    let out = run("0.001");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("needs about 2.8 MB for its weights (f32 on the CPU, all parts at once)"), "{stderr}");
    assert!(stderr.contains("but 1.0 MB is host memory available"), "{stderr}");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "nothing written");
    // Under a limit it fits, it runs.
    assert!(run("1").status.success());
    // The bench's full-size preset on the CPU (40.5 GB in f32), counted without allocating it.
    let out = Command::new(env!("CARGO_BIN_EXE_zimage"))
        .args(["bench", "--config", "full", "--device", "cpu", "-W", "64", "-H", "64", "--steps", "1"])
        .env("ZIMAGE_MEMORY_LIMIT_GB", "1")
        .current_dir(tmp.path())
        .output()
        .expect("run zimage");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("the full preset needs about 40.5 GB for its weights (f32 on the CPU, all parts at once)"),
        "{stderr}"
    );
}

#[test]
fn unwritable_output_folder() {
    let tmp = tempfile::tempdir().unwrap();
    // A path whose parent is a file cannot be written whatever the user's rights.
    let file = tmp.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let target = file.join("out.png");
    let m = model();
    let out = zimage(
        &[
            "generate",
            "--model",
            &m,
            "-p",
            "cat",
            "-W",
            "32",
            "-H",
            "32",
            "--seed",
            "1",
            "-o",
            target.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

/// `zimage bench` writes its JSON report; with `--release-text-encoder` the
/// prompt is encoded before the DiT loads and not timed again (as the app's
/// lowest memory plan does), for a real folder and for a random preset.
#[test]
fn bench_reports_stages_with_and_without_the_text_encoder_resident() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model();
    for (name, source, release) in [
        ("kept", ["--model", m.as_str()], false),
        ("released", ["--model", m.as_str()], true),
        ("preset", ["--config", "tiny"], true),
    ] {
        let json = tmp.path().join(format!("{name}.json"));
        let mut args = vec!["bench", source[0], source[1], "-W", "64", "-H", "64", "--runs", "1", "--json", json.to_str().unwrap()];
        if release {
            args.push("--release-text-encoder");
        }
        let out = zimage(&args, tmp.path());
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        let text_ms = r["text_encode_ms"].as_f64().unwrap();
        assert_eq!(text_ms == 0.0, release, "{name}: text encode {text_ms} ms");
        assert!(r["end_to_end_ms"].as_f64().unwrap() > 0.0 && r["vae_decode_ms"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["dit_step_ms"].as_array().unwrap().len(), 8, "{r}");
        assert!(r["prompt_tokens"].as_u64().unwrap() > 5, "{r}");
        // GPU memory by stage is a GPU's to report: on the CPU the list is there, empty.
        assert_eq!(r["device_memory"].as_array().map(Vec::len), Some(0), "{r}");
        // So are the CUDA kernels it ran: the field is there, null.
        assert!(r.get("kernels").is_some_and(|k| k.is_null()), "{r}");
    }
}

/// `zimage bench-vae` times the decoder alone, in whole tensors (`--tensor-mib 0`)
/// or in row bands, and writes its JSON report; a bad size is one line.
#[test]
fn bench_vae_reports_whole_and_banded_decodes() {
    let tmp = tempfile::tempdir().unwrap();
    for (mib, banded) in [("0", false), ("1", true)] {
        let json = tmp.path().join(format!("vae{mib}.json"));
        let args = ["bench-vae", "--config", "tiny", "-W", "64", "-H", "64", "--runs", "1", "--tensor-mib", mib];
        let out = zimage(&[&args[..], &["--json", json.to_str().unwrap()]].concat(), tmp.path());
        assert!(out.status.success(), "{mib}: {}", String::from_utf8_lossy(&out.stderr));
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        assert_eq!(r["tensor_limit_mib"].is_number(), banded, "{r}");
        assert!(r["decode_ms"].as_f64().unwrap() > 0.0, "{r}");
    }
    // Sizes off the VAE's grid and over the maximum side: one line each.
    for (size, says) in [("100", "not a multiple of 8"), ("40000000", "maximum")] {
        let out = zimage(&["bench-vae", "--config", "tiny", "-W", size, "-H", "64"], tmp.path());
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{size}: {stderr}");
        assert!(stderr.contains(says), "{size}: {stderr}");
    }
}

/// `zimage devices` says what each device is here: the CPU always usable,
/// and (in this default build) CUDA and wgpu not built in, with the feature
/// to rebuild with; `--json` gives the same as data.
#[test]
fn devices_lists_each_device_and_why_it_cannot_be_used() {
    let tmp = tempfile::tempdir().unwrap();
    let out = zimage(&["devices"], tmp.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("cpu") && lines[0].contains("threads") && lines[0].contains("available"), "{text}");
    if !cfg!(feature = "cuda") {
        assert!(lines[1].starts_with("cuda") && lines[1].contains("--features cuda"), "{text}");
    }
    let out = zimage(&["devices", "--json"], tmp.path());
    let devices: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = devices.as_array().unwrap().iter().map(|d| d["device"].as_str().unwrap()).collect();
    assert_eq!(names, ["cpu", "cuda", "wgpu"]);
    assert_eq!(devices[0]["usable"], true);
    if !cfg!(feature = "wgpu") {
        assert_eq!(devices[2]["usable"], false);
    }
}
