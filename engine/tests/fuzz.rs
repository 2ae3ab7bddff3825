//! Property tests ("fuzzing" with proptest) of the two readers that take
//! files from anywhere: the safetensors header reader (`TensorStore`, and
//! `LoraFile` on top of it) and the PNG metadata reader. Whatever the bytes,
//! they must return `Ok` or an error whose message is one line — never panic.
//!
//! Inputs: the committed corpus in `engine/tests/corpus/` (replayed as is and
//! as seeds for byte mutations), plus generated headers and PNG chunks.
//! cargo-fuzz needs a nightly toolchain, which this project does not use.
//!
//! The corpus is written by `cargo test --release -p zimage-engine --test fuzz
//! -- --ignored write_corpus` (deterministic; rerun after changing it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use zimage_engine::lora::LoraFile;
use zimage_engine::metadata::{self, GenerationMetadata};
use zimage_engine::weights::TensorStore;

fn corpus_dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus").join(kind)
}

fn corpus(kind: &str) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir(kind))
        .unwrap_or_else(|e| panic!("corpus {kind}: {e}"))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect()
}

/// Opens `bytes` as a safetensors file (and as a LoRA) and touches everything
/// a loader would; returns the error message if it was refused.
fn check_safetensors(dir: &Path, bytes: &[u8]) -> Result<(), String> {
    let path = dir.join("input.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let lora = LoraFile::open(&path);
    if let Err(e) = &lora {
        assert_one_line(&e.to_string());
    }
    match TensorStore::open_files(&[path]) {
        Ok(store) => {
            let names: Vec<String> = store.names().map(String::from).collect();
            for name in &names {
                let info = store.get(name).unwrap().clone();
                let numel: usize = info.shape.iter().product();
                assert_eq!(store.read_f32(name, None).unwrap().len(), numel, "{name}");
                assert_eq!(store.read_bf16(name, None).unwrap().len(), numel, "{name}");
                if let Some(&rows) = info.shape.first().filter(|&&r| r > 0) {
                    store.read_f32(name, Some(rows - 1..rows)).unwrap();
                }
            }
            let _ = (store.memory_estimate(), store.main_dtype(), store.metadata().len(), store.data_bytes());
            Ok(())
        }
        Err(e) => {
            let msg = e.to_string();
            assert_one_line(&msg);
            Err(msg)
        }
    }
}

fn check_png(bytes: &[u8]) -> Result<(), String> {
    match metadata::read_png_metadata(bytes) {
        Ok(_) => Ok(()),
        Err(e) => {
            let msg = e.to_string();
            assert_one_line(&msg);
            Err(msg)
        }
    }
}

fn assert_one_line(msg: &str) {
    assert!(!msg.is_empty() && !msg.contains('\n') && !msg.contains('\r'), "error is not one line: {msg:?}");
}

/// `seed` with byte `edits` (position modulo length) and an optional cut.
fn mutate(seed: &[u8], edits: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    let mut out = seed.to_vec();
    if !out.is_empty() {
        for &(pos, byte) in edits {
            let i = pos % out.len();
            out[i] = byte;
        }
    }
    if let Some(c) = cut {
        out.truncate(c % (out.len() + 1));
    }
    out
}

// ---------------------------------------------------------------------------
// Replaying the corpus

#[test]
fn safetensors_corpus_replays_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let files = corpus("safetensors");
    assert!(files.len() >= 10, "corpus too small");
    let mut accepted = 0;
    for (name, bytes) in &files {
        let result = check_safetensors(tmp.path(), bytes);
        // The file name says what is expected: valid_* opens, everything else is refused.
        assert_eq!(result.is_ok(), name.starts_with("valid_"), "{name}: {result:?}");
        accepted += result.is_ok() as usize;
    }
    assert!(accepted >= 3);
}

#[test]
fn png_corpus_replays_cleanly() {
    let files = corpus("png");
    assert!(files.len() >= 8, "corpus too small");
    for (name, bytes) in &files {
        let result = check_png(bytes);
        assert_eq!(result.is_ok(), name.starts_with("valid_"), "{name}: {result:?}");
    }
}

// ---------------------------------------------------------------------------
// Generated inputs

/// A safetensors header entry built from parts, including nonsense.
fn header_entry() -> impl Strategy<Value = serde_json::Value> {
    let dtype = prop::sample::select(vec![
        "F32", "F16", "BF16", "F64", "F8_E4M3", "F8_E5M2", "U8", "I64", "BOOL", "F4", "", "f32",
    ]);
    let dim = prop_oneof![0u64..5, Just(u32::MAX as u64), Just(u64::MAX), any::<u64>()];
    let shape = prop::collection::vec(dim, 0..4);
    let offset = prop_oneof![0u64..64, Just(u64::MAX), any::<u64>()];
    (dtype, shape, offset.clone(), offset, any::<bool>()).prop_map(|(dtype, shape, a, b, as_string)| {
        if as_string {
            serde_json::json!({"dtype": dtype, "shape": "not a list", "data_offsets": [a.to_string(), b]})
        } else {
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [a, b]})
        }
    })
}

fn generated_safetensors() -> impl Strategy<Value = Vec<u8>> {
    let names = prop::sample::select(vec![
        "a.weight",
        "a.scale_weight",
        "a.weight_scale",
        "scaled_fp8",
        "__metadata__",
        "lora_unet_layers_0_attention_to_q.lora_down.weight",
        "lora_unet_layers_0_attention_to_q.lora_up.weight",
        "lora_unet_layers_0_attention_to_q.alpha",
        "transformer.layers.0.attention.qkv.lora_A.weight",
        "",
    ]);
    let entries = prop::collection::vec((names, header_entry()), 0..6);
    let data = prop::collection::vec(any::<u8>(), 0..96);
    let declared = prop_oneof![Just(None), any::<u64>().prop_map(Some)];
    (entries, data, declared).prop_map(|(entries, data, declared)| {
        let header: serde_json::Map<String, serde_json::Value> =
            entries.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let text = serde_json::to_vec(&header).unwrap();
        let len = declared.unwrap_or(text.len() as u64);
        let mut out = len.to_le_bytes().to_vec();
        out.extend(text);
        out.extend(data);
        out
    })
}

/// A PNG built from chunks with correct CRCs (so the reader gets past them)
/// but arbitrary contents.
fn generated_png() -> impl Strategy<Value = Vec<u8>> {
    let kind = prop::sample::select(vec![*b"tEXt", *b"zTXt", *b"iTXt", *b"IHDR", *b"IDAT", *b"IEND", *b"xxXx"]);
    let chunk = (kind, prop::collection::vec(any::<u8>(), 0..64));
    let text = prop::sample::select(vec![
        "parameters\0a cat\nSteps: 8, Seed: 1, Size: 64x64, CFG scale: 0",
        "parameters\0\nSteps: 99999999999999999999999, Size: 0x0, Seed: -5",
        "zimage\0{\"prompt\": 3}",
        "zimage\0{",
        "parameters\0Negative prompt: \nSteps: x",
    ]);
    (prop::collection::vec(chunk, 0..5), text, any::<bool>()).prop_map(|(chunks, text, with_text)| {
        let mut body: Vec<([u8; 4], Vec<u8>)> = vec![(*b"IHDR", vec![0, 0, 0, 1, 0, 0, 0, 1, 8, 2, 0, 0, 0])];
        if with_text {
            body.push((*b"tEXt", text.as_bytes().to_vec()));
        }
        body.extend(chunks);
        png_from_chunks(&body)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn safetensors_reader_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let tmp = tempfile::tempdir().unwrap();
        let _ = check_safetensors(tmp.path(), &bytes);
    }

    #[test]
    fn safetensors_reader_never_panics_on_generated_headers(bytes in generated_safetensors()) {
        let tmp = tempfile::tempdir().unwrap();
        let _ = check_safetensors(tmp.path(), &bytes);
    }

    #[test]
    fn safetensors_reader_never_panics_on_mutated_corpus(
        seed in any::<prop::sample::Index>(),
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        cut in prop::option::of(any::<usize>()),
    ) {
        let files = corpus("safetensors");
        let (_, seed) = &files[seed.index(files.len())];
        let tmp = tempfile::tempdir().unwrap();
        let _ = check_safetensors(tmp.path(), &mutate(seed, &edits, cut));
    }

    #[test]
    fn png_reader_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = check_png(&bytes);
        let mut with_signature = PNG_SIGNATURE.to_vec();
        with_signature.extend(&bytes);
        let _ = check_png(&with_signature);
    }

    #[test]
    fn png_reader_never_panics_on_generated_chunks(bytes in generated_png()) {
        let _ = check_png(&bytes);
    }

    #[test]
    fn png_reader_never_panics_on_mutated_corpus(
        seed in any::<prop::sample::Index>(),
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        cut in prop::option::of(any::<usize>()),
    ) {
        let files = corpus("png");
        let (_, seed) = &files[seed.index(files.len())];
        let _ = check_png(&mutate(seed, &edits, cut));
    }

    #[test]
    fn a1111_parameter_parser_never_panics(text in ".{0,200}", steps in any::<i64>(), size in "[0-9x]{0,12}") {
        for t in [text.clone(), format!("{text}\nSteps: {steps}, Size: {size}, Seed: {steps}, CFG scale: {text}")] {
            if let Err(e) = metadata::parse_a1111_parameters(&t) {
                assert_one_line(&e.to_string());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Building inputs

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn png_from_chunks(chunks: &[([u8; 4], Vec<u8>)]) -> Vec<u8> {
    let mut out = PNG_SIGNATURE.to_vec();
    for (kind, data) in chunks {
        out.extend((data.len() as u32).to_be_bytes());
        let mut crc_input = kind.to_vec();
        crc_input.extend(data);
        out.extend(&crc_input);
        out.extend(crc32(&crc_input).to_be_bytes());
    }
    out
}

fn safetensors(header: serde_json::Value, data: &[u8]) -> Vec<u8> {
    let text = serde_json::to_vec(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(data);
    out
}

fn meta() -> GenerationMetadata {
    GenerationMetadata {
        prompt: "a photo of a cat".into(),
        seed: 42,
        steps: 8,
        cfg_truncation: 1.0,
        width: 2,
        height: 2,
        model: "tiny".into(),
        model_kind: "turbo".into(),
        scheduler_shift: 3.0,
        app: "zimage corpus".into(),
        created: "2026-01-01T00:00:00Z".into(),
        ..Default::default()
    }
}

/// A PNG with the given text chunks added by the png encoder.
fn png_with_text(text: &[(&str, &str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, 2, 2);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (kind, key, value) in text {
            match *kind {
                "tEXt" => enc.add_text_chunk(key.to_string(), value.to_string()).unwrap(),
                "zTXt" => enc.add_ztxt_chunk(key.to_string(), value.to_string()).unwrap(),
                _ => enc.add_itxt_chunk(key.to_string(), value.to_string()).unwrap(),
            }
        }
        let mut w = enc.write_header().unwrap();
        w.write_image_data(&[7u8; 12]).unwrap();
        w.finish().unwrap();
    }
    out
}

/// Writes the corpus (deterministic). Files named `valid_*` must be accepted.
#[test]
#[ignore = "writes engine/tests/corpus; run on purpose"]
fn write_corpus() {
    let mut st: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    st.insert(
        "valid_f32.safetensors",
        safetensors(serde_json::json!({"a.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [], "data_offsets": [16, 20]}}), &f32s(&[1.0, 2.0, 3.0, 4.0, 5.0])),
    );
    st.insert(
        "valid_bf16_metadata.safetensors",
        safetensors(serde_json::json!({"__metadata__": {"format": "pt", "ss_base_model_version": "z_image", "nested": {"x": 1}}, "x": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}), &[0x80, 0x3f, 0, 0x40, 0x40, 0x40]),
    );
    let mut fp8 = vec![0x38u8, 0x7e, 0x7f, 0x01];
    fp8.extend(f32s(&[0.5]));
    fp8.extend(b"{\"format\": \"float8_e4m3fn\"}");
    st.insert(
        "valid_fp8_scaled.safetensors",
        safetensors(
            serde_json::json!({
                "l.weight": {"dtype": "F8_E4M3", "shape": [2, 2], "data_offsets": [0, 4]},
                "l.scale_weight": {"dtype": "F32", "shape": [], "data_offsets": [4, 8]},
                "l.comfy_quant": {"dtype": "U8", "shape": [27], "data_offsets": [8, 35]},
                "scaled_fp8": {"dtype": "F8_E4M3", "shape": [0], "data_offsets": [35, 35]}
            }),
            &fp8,
        ),
    );
    let mut lora = f32s(&[0.1; 8]);
    lora.extend(f32s(&[0.2; 8]));
    lora.extend(f32s(&[4.0]));
    st.insert(
        "valid_kohya_lora.safetensors",
        safetensors(
            serde_json::json!({
                "lora_unet_layers_0_attention_to_q.lora_down.weight": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
                "lora_unet_layers_0_attention_to_q.lora_up.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": [32, 64]},
                "lora_unet_layers_0_attention_to_q.alpha": {"dtype": "F32", "shape": [], "data_offsets": [64, 68]}
            }),
            &lora,
        ),
    );
    st.insert("empty.safetensors", vec![]);
    st.insert("seven_bytes.safetensors", vec![1, 0, 0, 0, 0, 0, 0]);
    st.insert("header_len_max.safetensors", [u64::MAX.to_le_bytes().to_vec(), b"{}".to_vec()].concat());
    st.insert("header_len_past_end.safetensors", [100u64.to_le_bytes().to_vec(), b"{}".to_vec()].concat());
    st.insert("header_not_object.safetensors", safetensors(serde_json::json!([1, 2]), &[]));
    st.insert("header_not_utf8.safetensors", [4u64.to_le_bytes().to_vec(), vec![0xff, 0xfe, b'{', b'}']].concat());
    st.insert(
        "truncated_data.safetensors",
        safetensors(serde_json::json!({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}), &[0; 8]),
    );
    st.insert(
        "offsets_reversed.safetensors",
        safetensors(serde_json::json!({"a": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}), &[0; 8]),
    );
    st.insert(
        "shape_overflow.safetensors",
        safetensors(serde_json::json!({"a": {"dtype": "F32", "shape": [4294967296u64, 4294967296u64, 16], "data_offsets": [0, 0]}}), &[]),
    );
    st.insert(
        "size_mismatch.safetensors",
        safetensors(serde_json::json!({"a": {"dtype": "F16", "shape": [3], "data_offsets": [0, 4]}}), &[0; 4]),
    );
    st.insert(
        "unknown_dtype.safetensors",
        safetensors(serde_json::json!({"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}), &[0]),
    );
    st.insert(
        "no_dtype.safetensors",
        safetensors(serde_json::json!({"a": {"shape": [1], "data_offsets": [0, 4]}}), &[0; 4]),
    );
    st.insert(
        "negative_offset.safetensors",
        safetensors(serde_json::json!({"a": {"dtype": "U8", "shape": [1], "data_offsets": [-1, 0]}}), &[0]),
    );
    st.insert(
        "fp8_scale_two_values.safetensors",
        safetensors(
            serde_json::json!({"l.weight": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}, "l.weight_scale": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]}}),
            &[0x38, 0, 0, 0, 0, 0, 0, 0, 0],
        ),
    );
    st.insert("pickle.safetensors", b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01u.".to_vec());

    let mut png: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
    let good = metadata::encode_png(&[9u8; 12], 2, 2, &meta()).unwrap();
    png.insert("valid_zimage.png", good.clone());
    png.insert(
        "valid_a1111_text.png",
        png_with_text(&[(
            "tEXt",
            "parameters",
            "a cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler, CFG scale: 4, Seed: 7, Size: 64x48, Model: z",
        )]),
    );
    png.insert(
        "valid_a1111_ztxt.png",
        png_with_text(&[("zTXt", "parameters", "a cat\nSteps: 8, Seed: 1, Size: 64x64, CFG scale: 0")]),
    );
    png.insert("no_metadata.png", png_with_text(&[]));
    png.insert("zimage_bad_json.png", png_with_text(&[("iTXt", "zimage", "{\"prompt\": 1")]));
    png.insert(
        "valid_a1111_lenient_numbers.png",
        png_with_text(&[("tEXt", "parameters", "x\nSteps: 99999999999999999999, Size: axb, Seed: -1")]),
    );
    let mut bad_crc = good.clone();
    let last = bad_crc.len() - 20;
    bad_crc[last] ^= 0xff;
    png.insert("bad_crc.png", bad_crc);
    png.insert("truncated.png", good[..good.len() / 2].to_vec());
    png.insert("signature_only.png", PNG_SIGNATURE.to_vec());
    png.insert(
        "huge_chunk_length.png",
        [PNG_SIGNATURE.to_vec(), vec![0x7f, 0xff, 0xff, 0xff], b"IHDR".to_vec(), vec![0; 16]].concat(),
    );
    png.insert(
        "huge_dimensions.png",
        png_from_chunks(&[
            (*b"IHDR", vec![0x7f, 0xff, 0xff, 0xff, 0x7f, 0xff, 0xff, 0xff, 8, 2, 0, 0, 0]),
            (*b"IEND", vec![]),
        ]),
    );
    png.insert("not_png.png", b"GIF89a this is not a png".to_vec());

    for (kind, files) in [("safetensors", st), ("png", png)] {
        let dir = corpus_dir(kind);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in files {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
}
