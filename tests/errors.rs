//! Every way loading a model can go wrong ends in one clear error naming
//! the problem, never a panic: truncated files, wrong shapes, missing shards
//! or keys, foreign layouts, pickle checkpoints, bad configs.

#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::DType;
use support::*;
use zimage_engine::loader::{load_pipeline, ModelFiles, ModelOverrides};
use zimage_engine::EngineError;

/// Copies the tiny Turbo model (following symlinks) into a temp folder.
fn copy_model() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("model");
    copy_dir(&fixtures().join("tiny-turbo"), &dst);
    (tmp, dst)
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let target = dst.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

fn try_load(dir: &Path) -> Result<(), String> {
    let files = ModelFiles::locate(dir, &ModelOverrides::default()).map_err(|e| e.to_string())?;
    load_pipeline::<B>(&files, &device(), DType::F32, &mut |_, _, _| {}).map(|_| ()).map_err(|e| e.to_string())
}

fn expect_err(dir: &Path, needles: &[&str]) -> String {
    let msg = try_load(dir).expect_err("loading must fail");
    assert!(!msg.contains('\n'), "one line: {msg}");
    for n in needles {
        assert!(msg.contains(n), "{msg:?} should mention {n:?}");
    }
    msg
}

/// Rewrites a safetensors file through `edit` on its (name → (shape, f32 data)) map.
fn rewrite(path: &Path, edit: impl FnOnce(&mut HashMap<String, (Vec<usize>, Vec<f32>)>)) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut map: HashMap<String, (Vec<usize>, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let data: Vec<f32> = match view.dtype() {
                safetensors::Dtype::BF16 => {
                    view.data().chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
                }
                safetensors::Dtype::F32 => {
                    view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
                }
                other => panic!("unexpected dtype {other:?}"),
            };
            (name, (view.shape().to_vec(), data))
        })
        .collect();
    edit(&mut map);
    let owned: Vec<(String, Vec<usize>, Vec<u8>)> = map
        .into_iter()
        .map(|(n, (shape, data))| (n, shape, data.iter().flat_map(|v| v.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(n, shape, data)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data).unwrap())
        })
        .collect();
    let out = safetensors::serialize(views, None).unwrap();
    std::fs::write(path, out).unwrap();
}

const SHARD1: &str = "transformer/diffusion_pytorch_model-00001-of-00002.safetensors";
const SHARD2: &str = "transformer/diffusion_pytorch_model-00002-of-00002.safetensors";

#[test]
fn the_untouched_copy_loads() {
    let (_t, dir) = copy_model();
    try_load(&dir).unwrap();
}

#[test]
fn f32_stored_weights_load_like_bf16_ones() {
    // The real Turbo DiT is stored in f32: rewriting the shards as f32 must
    // change nothing (the fixture values are exactly representable in bf16).
    let (_t, dir) = copy_model();
    rewrite(&dir.join(SHARD1), |_| {});
    rewrite(&dir.join(SHARD2), |_| {});
    try_load(&dir).unwrap();
}

#[test]
fn truncated_shard_is_reported() {
    let (_t, dir) = copy_model();
    let path = dir.join(SHARD1);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    expect_err(&dir, &["truncated", "00001-of-00002"]);
}

#[test]
fn garbage_file_is_reported() {
    let (_t, dir) = copy_model();
    std::fs::write(dir.join(SHARD2), b"this is not a safetensors file at all").unwrap();
    expect_err(&dir, &["not a valid safetensors file"]);
    std::fs::write(dir.join(SHARD2), b"").unwrap();
    expect_err(&dir, &["too short"]);
}

#[test]
fn missing_shard_is_reported() {
    let (_t, dir) = copy_model();
    std::fs::remove_file(dir.join(SHARD2)).unwrap();
    expect_err(&dir, &["shard 2 of 2", "missing"]);
}

#[test]
fn missing_and_misshapen_tensors_are_all_listed_at_once() {
    let (_t, dir) = copy_model();
    for shard in [SHARD1, SHARD2] {
        rewrite(&dir.join(shard), |m| {
            m.remove("x_pad_token");
            m.remove("layers.0.attention.to_q.weight");
            if let Some((shape, data)) = m.get_mut("cap_embedder.1.weight") {
                shape[0] -= 1;
                data.truncate(shape[0] * shape[1]);
            }
        });
    }
    let msg = expect_err(
        &dir,
        &[
            "DiT",
            "missing tensor x_pad_token",
            "missing tensor layers.0.attention.to_q.weight",
            "cap_embedder.1.weight: expected shape [32, 32], found [31, 32]",
            "3 problems",
        ],
    );
    assert!(msg.len() < 2000, "compact: {msg}");
}

#[test]
fn a_flux_checkpoint_is_named_as_such() {
    let (_t, dir) = copy_model();
    rewrite(&dir.join(SHARD1), |m| {
        let keys: Vec<String> = m.keys().cloned().collect();
        for k in keys {
            let v = m.remove(&k).unwrap();
            m.insert(format!("double_blocks.{k}"), v);
        }
    });
    rewrite(&dir.join(SHARD2), |m| m.clear());
    expect_err(&dir, &["unrecognised model layout", "Flux"]);
}

#[test]
fn pickle_checkpoints_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("model.ckpt");
    std::fs::write(&p, b"PK\x03\x04").unwrap();
    let err = ModelFiles::locate(&p, &ModelOverrides::default()).unwrap_err();
    assert!(matches!(err, EngineError::PickleRefused { .. }));
    assert!(err.to_string().contains("arbitrary code"), "{err}");

    let (_t, dir) = copy_model();
    std::fs::remove_file(dir.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::write(dir.join("vae/diffusion_pytorch_model.bin"), b"pickle").unwrap();
    expect_err(&dir, &["pickle", "diffusion_pytorch_model.bin"]);
}

#[test]
fn not_a_model_folder() {
    let tmp = tempfile::tempdir().unwrap();
    expect_err(tmp.path(), &["no model_index.json"]);
    expect_err(&tmp.path().join("nope"), &["no such file or folder"]);
}

#[test]
fn broken_configs_are_reported() {
    let (_t, dir) = copy_model();
    std::fs::write(dir.join("transformer/config.json"), b"{ not json").unwrap();
    expect_err(&dir, &["transformer/config.json", "not valid JSON"]);

    let (_t2, dir) = copy_model();
    std::fs::write(dir.join("transformer/config.json"), br#"{"dim": 32, "n_heads": 3}"#).unwrap();
    expect_err(&dir, &["not divisible by n_heads"]);

    let (_t3, dir) = copy_model();
    std::fs::write(dir.join("scheduler/scheduler_config.json"), br#"{"shift": 3.0, "use_dynamic_shifting": true}"#)
        .unwrap();
    expect_err(&dir, &["use_dynamic_shifting"]);

    let (_t4, dir) = copy_model();
    std::fs::write(dir.join("model_index.json"), br#"{"_class_name": "FluxPipeline"}"#).unwrap();
    expect_err(&dir, &["FluxPipeline", "not a Z-Image pipeline"]);
}

#[test]
fn missing_tokenizer_and_foreign_tokenizer() {
    let (_t, dir) = copy_model();
    std::fs::remove_file(dir.join("tokenizer/tokenizer.json")).unwrap();
    expect_err(&dir, &["tokenizer.json"]);

    let (_t2, dir) = copy_model();
    std::fs::write(
        dir.join("tokenizer/tokenizer.json"),
        br#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":null,"post_processor":null,"decoder":null,"model":{"type":"WordLevel","vocab":{"a":0,"[UNK]":1},"unk_token":"[UNK]"}}"#,
    )
    .unwrap();
    expect_err(&dir, &["not a Qwen3 tokenizer"]);
}

#[test]
fn component_swapped_for_another_kind_is_reported() {
    // A VAE file where the text encoder should be.
    let (_t, dir) = copy_model();
    std::fs::remove_file(dir.join("text_encoder/model.safetensors.index.json")).unwrap();
    for f in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] {
        std::fs::remove_file(dir.join("text_encoder").join(f)).unwrap();
    }
    std::fs::copy(dir.join("vae/diffusion_pytorch_model.safetensors"), dir.join("text_encoder/model.safetensors"))
        .unwrap();
    expect_err(&dir, &["expected a Qwen3 text encoder", "autoencoder"]);
}

/// A size that cannot fit in memory is refused with one line before any
/// allocation (running out of memory would abort the whole process).
#[test]
fn requests_too_big_for_memory_are_refused_up_front() {
    use zimage_engine::pipeline::{GenerateRequest, ModelKind};
    let files = ModelFiles::locate(&fixtures().join("tiny-turbo"), &ModelOverrides::default()).unwrap();
    let pipe = load_pipeline::<B>(&files, &device(), DType::F32, &mut |_, _, _| {}).unwrap();
    let mut req = GenerateRequest::new("a cat", ModelKind::Turbo);
    req.width = 512;
    req.height = 512;
    let small = pipe.working_memory_bytes(&req);
    req.width = 1024;
    req.height = 1024;
    let big = pipe.working_memory_bytes(&req);
    assert!(big > 3 * small && big < 20 * small, "2× the side costs ~4× to ~16× (attention): {small} → {big}");
    req.prompts = vec!["a".into(), "b".into()];
    assert!(pipe.working_memory_bytes(&req) >= 2 * big - small, "a batch of two needs about twice as much");
    let err = pipe.check_memory(&req, big / 4).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, EngineError::InsufficientMemory { .. }));
    assert!(msg.contains("2 images of 1024x1024") && msg.contains("GB") && !msg.contains('\n'), "{msg}");
    pipe.check_memory(&req, u64::MAX).unwrap();
}
