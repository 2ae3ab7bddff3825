//! Writing trained modules as bf16 safetensors with the checkpoint names and
//! PyTorch layouts the loader reads.
//!
//! Modules are built by `build(cfg, &mut impl WeightSource)`, which names
//! every parameter but may store it differently (`nn::linear` keeps a
//! transposed view of the `[out, in]` weight). Rather than mirror each model's
//! structure here, the exporter builds the same module once more from a
//! [`TagSource`] that fills the k-th requested tensor with the tag `4k`
//! (element [0][1] with `4k+1`, element [1][0] with `4k+2`). Visiting that
//! module's parameters in order then says, for each position, which named
//! tensor it is and whether it was transposed; the trained module (same
//! config, hence same visiting order) is exported through that map.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use half::bf16;

use crate::error::Result;
use crate::weights::{Init, WeightSource};

/// Tags each requested tensor with its request index (see the module docs).
pub struct TagSource<B: Backend> {
    device: B::Device,
    pub requested: Vec<(String, Vec<usize>)>,
}

impl<B: Backend> TagSource<B> {
    pub fn new(device: &B::Device) -> Self {
        Self { device: device.clone(), requested: Vec::new() }
    }
}

impl<B: Backend> WeightSource<B> for TagSource<B> {
    fn device(&self) -> &B::Device {
        &self.device
    }
    fn tensor<const D: usize>(&mut self, name: &str, shape: [usize; D], _init: Init) -> Result<Tensor<B, D>> {
        let k = self.requested.len() as f32;
        self.requested.push((name.to_string(), shape.to_vec()));
        let numel: usize = shape.iter().product();
        let mut data = vec![4.0 * k; numel];
        if D == 2 && shape[0] > 1 && shape[1] > 1 {
            data[1] = 4.0 * k + 1.0;
            data[shape[1]] = 4.0 * k + 2.0;
        }
        Ok(Tensor::from_data(TensorData::new(data, shape), (&self.device, DType::F32)))
    }
}

/// Collects every float parameter (dims, values as f32) in visiting order.
struct Collect<B: Backend> {
    out: Vec<(Vec<usize>, Vec<f32>)>,
    _b: PhantomData<B>,
}

impl<B: Backend> ModuleVisitor<B> for Collect<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let t = param.val();
        let dims = t.dims().to_vec();
        let t = if t.dtype() == DType::F32 { t } else { t.cast(DType::F32) };
        let values = t.into_data().convert::<f32>().into_vec::<f32>().expect("f32 tensor data");
        self.out.push((dims, values));
    }
}

fn collect<B: Backend, M: Module<B>>(module: &M) -> Vec<(Vec<usize>, Vec<f32>)> {
    let mut c = Collect { out: Vec::new(), _b: PhantomData };
    module.visit(&mut c);
    c.out
}

/// Named tensors in PyTorch layout (f32 values), ready to write.
pub type NamedTensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// Maps a trained module's parameters to their checkpoint names and PyTorch
/// layouts. `build` must build the same structure as `module` was built with.
pub fn named_tensors<B: Backend, M: Module<B>>(
    module: &M,
    device: &B::Device,
    build: impl FnOnce(&mut TagSource<B>) -> Result<M>,
) -> anyhow::Result<NamedTensors> {
    let mut tags = TagSource::<B>::new(device);
    let tagged = build(&mut tags)?;
    let tag_params = collect(&tagged);
    let params = collect(module);
    anyhow::ensure!(
        tag_params.len() == params.len(),
        "export: module has {} parameters but its build requests {}",
        params.len(),
        tag_params.len()
    );
    let mut out: NamedTensors = Vec::with_capacity(params.len());
    let mut used = vec![false; tags.requested.len()];
    for ((tag_dims, tag_values), (dims, values)) in tag_params.into_iter().zip(params) {
        anyhow::ensure!(tag_dims == dims, "export: parameter shapes differ between builds ({tag_dims:?} vs {dims:?})");
        let k = (tag_values[0] / 4.0) as usize;
        let (name, shape) = tags.requested.get(k).cloned().ok_or_else(|| anyhow::anyhow!("export: bad tag {k}"))?;
        anyhow::ensure!(!used[k], "export: {name} appears twice");
        used[k] = true;
        // Element [0][1] of a 2-D tensor tells its orientation apart (square
        // weights have the same dims either way).
        let transposed = if dims.len() == 2 && dims[0] > 1 && dims[1] > 1 {
            tag_values[1] == 4.0 * k as f32 + 2.0
        } else {
            dims.len() == 2 && dims != shape
        };
        let expected: Vec<usize> = if transposed { shape.iter().rev().copied().collect() } else { shape.clone() };
        anyhow::ensure!(dims == expected, "export: {name} has shape {dims:?}, requested {shape:?}");
        let values = if transposed {
            let (r, c) = (dims[0], dims[1]);
            let mut t = vec![0f32; values.len()];
            for i in 0..r {
                for j in 0..c {
                    t[j * r + i] = values[i * c + j];
                }
            }
            t
        } else {
            values
        };
        out.push((name, shape, values));
    }
    if let Some(k) = used.iter().position(|u| !u) {
        anyhow::bail!("export: {} was requested but is not a parameter", tags.requested[k].0);
    }
    Ok(out)
}

/// Writes named tensors as one bf16 safetensors file, names prefixed.
pub fn write_bf16(path: &Path, tensors: &NamedTensors, prefix: &str) -> anyhow::Result<u64> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, shape, values)| {
            let b: Vec<u8> = values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect();
            (format!("{prefix}{name}"), shape.clone(), b)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), b)?)))
        .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    safetensors::tensor::serialize_to_file(views, Some(meta), path)?;
    Ok(std::fs::metadata(path)?.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::CpuBackend as B;
    use crate::dit::{ZImageDit, ZImageDitConfig};
    use crate::weights::RandomWeights;

    #[test]
    fn exported_names_and_layouts_match_the_build() {
        let device = Default::default();
        let cfg = ZImageDitConfig::new()
            .with_dim(32)
            .with_n_heads(2)
            .with_n_layers(1)
            .with_n_refiner_layers(1)
            .with_cap_feat_dim(16)
            .with_axes_dims([4, 6, 6]);
        let dit = ZImageDit::<B>::build(&cfg, &mut RandomWeights::new(&device, DType::F32)).unwrap();
        let named = named_tensors(&dit, &device, |s| ZImageDit::build(&cfg, s)).unwrap();
        let mut plan = crate::weights::ShapePlan::<B>::new(&device);
        ZImageDit::<B>::build(&cfg, &mut plan).unwrap();
        let mut want = plan.requested.clone();
        want.sort();
        let mut got: Vec<_> = named.iter().map(|(n, s, _)| (n.clone(), s.clone())).collect();
        got.sort();
        assert_eq!(got, want);
        // A square linear weight comes out as stored [out, in]: W[0][1] of the
        // PyTorch layout is the transposed view's [1][0].
        let (_, _, q) = named.iter().find(|(n, _, _)| n == "layers.0.attention.to_q.weight").unwrap();
        let view = dit.layers[0].attention.to_q.weight.val().into_data().convert::<f32>().into_vec::<f32>().unwrap();
        assert_eq!(q[1], view[32]);
        assert_eq!(q[32], view[1]);
    }
}
