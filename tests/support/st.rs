//! Writing safetensors files byte by byte in tests (any dtype string, any
//! metadata), for fixtures made on the fly: fp8 checkpoints, odd LoRAs.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

/// A tensor to write: safetensors dtype string, shape, raw little-endian bytes.
pub struct Raw {
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl Raw {
    pub fn f32(shape: Vec<usize>, values: &[f32]) -> Self {
        Raw { dtype: "F32", shape, bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
    }
}

/// The bytes of a safetensors file holding `tensors` (in name order) and `metadata`.
pub fn safetensors_bytes(tensors: &BTreeMap<String, Raw>, metadata: &[(&str, &str)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let m: serde_json::Map<String, serde_json::Value> =
            metadata.iter().map(|(k, v)| (k.to_string(), (*v).into())).collect();
        header.insert("__metadata__".into(), m.into());
    }
    let mut data = Vec::new();
    for (name, t) in tensors {
        let begin = data.len();
        data.extend_from_slice(&t.bytes);
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [begin, data.len()]}),
        );
    }
    let mut text = serde_json::to_vec(&serde_json::Value::Object(header)).expect("json");
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(data);
    out
}

pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, Raw>, metadata: &[(&str, &str)]) {
    std::fs::write(path, safetensors_bytes(tensors, metadata)).expect("write safetensors");
}

/// Every tensor of a safetensors file, converted to f32, with its shape.
pub fn read_all_f32(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let d = view.data();
            let values: Vec<f32> = match view.dtype() {
                safetensors::Dtype::F32 => {
                    d.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
                }
                safetensors::Dtype::BF16 => {
                    d.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
                }
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}
