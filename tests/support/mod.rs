//! Shared helpers for the end-to-end tests: the committed fixtures and the
//! reference tensors written by `tests/fixtures/generate.py`.
#![allow(dead_code)]

use std::path::PathBuf;

use burn::tensor::{DType, Tensor, TensorData};
use zimage_engine::device::CpuBackend;

pub type B = CpuBackend;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

pub fn device() -> burn::tensor::Device<B> {
    Default::default()
}

/// `reference.safetensors` + `reference.json`.
pub struct Reference {
    bytes: Vec<u8>,
    pub json: serde_json::Value,
}

impl Reference {
    pub fn load() -> Self {
        let dir = fixtures();
        let bytes = std::fs::read(dir.join("reference.safetensors"))
            .expect("reference.safetensors (run tests/fixtures/generate.py)");
        let json = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).expect("reference.json"))
            .expect("json");
        Self { bytes, json }
    }

    fn view(&self, name: &str) -> safetensors::tensor::TensorView<'_> {
        let st = safetensors::SafeTensors::deserialize(&self.bytes).expect("valid reference file");
        st.tensor(name).unwrap_or_else(|_| panic!("reference tensor {name} missing"))
    }

    /// f32 tensor data and shape.
    pub fn f32(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let v = self.view(name);
        assert_eq!(v.dtype(), safetensors::Dtype::F32, "{name} is not f32");
        (v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(), v.shape().to_vec())
    }

    pub fn u8(&self, name: &str) -> (Vec<u8>, Vec<usize>) {
        let v = self.view(name);
        assert_eq!(v.dtype(), safetensors::Dtype::U8, "{name} is not u8");
        (v.data().to_vec(), v.shape().to_vec())
    }

    pub fn tensor<const D: usize>(&self, name: &str) -> Tensor<B, D> {
        let (data, shape) = self.f32(name);
        assert_eq!(shape.len(), D, "{name}: rank {} not {D}", shape.len());
        Tensor::from_data(TensorData::new(data, shape), (&device(), DType::F32))
    }

    pub fn has(&self, name: &str) -> bool {
        safetensors::SafeTensors::deserialize(&self.bytes).map(|st| st.tensor(name).is_ok()).unwrap_or(false)
    }
}

/// Max |a − e| relative to max |e| (a scale-aware relative error).
pub fn rel_err(actual: &[f32], expected: &[f32]) -> f32 {
    assert_eq!(actual.len(), expected.len(), "length mismatch");
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    let diff = actual.iter().zip(expected).fold(0f32, |m, (a, e)| m.max((a - e).abs()));
    diff / scale
}

pub fn assert_close(what: &str, actual: &[f32], expected: &[f32], tol: f32) {
    assert!(actual.iter().all(|v| v.is_finite()), "{what}: non-finite values");
    let err = rel_err(actual, expected);
    eprintln!("parity {what}: relative error {err:.2e}");
    assert!(err <= tol, "{what}: relative error {err:e} > {tol:e}");
}

pub fn to_vec<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}
