//! Building blocks shared by the three models, with the reference's numerics:
//! norms keep their statistics in f32 whatever the compute dtype.

use burn::module::{Module, Param};
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Tensor};

use crate::error::Result;
use crate::weights::{Init, WeightSource};

/// `a.b`, or `b` when the prefix is empty.
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// `y = x·Wᵀ + b` over the last dimension, as PyTorch's `Linear`.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `[d_in, d_out]`: the stored `[d_out, d_in]` weight transposed (see [`Linear::weight_from_stored`]).
    pub weight: Param<Tensor<B, 2>>,
    /// `[d_out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> Linear<B> {
    /// The `weight` parameter for a stored (PyTorch) `[d_out, d_in]` weight: a
    /// transposed view, laid out once as `[d_in, d_out]` rows on the CPU kernels
    /// (`fused`). Read in place, gemm gathers the transposed view one float at a
    /// time into its packed panels on every call (perf: ~12 % of a `medium`
    /// generation); rows of output features pack with vector copies. GPU
    /// backends keep the stored layout.
    pub fn weight_from_stored(stored: Tensor<B, 2>) -> Param<Tensor<B, 2>> {
        Param::from_tensor(crate::fused::contiguous(stored.transpose()))
    }

    /// `[..., d_in]` → `[..., d_out]`. The leading dimensions are folded into
    /// one and the matmul is 2-D, straight on the transposed view: burn's own
    /// `linear` first reshapes the weight to the input's rank, which for a
    /// transposed view copies the whole weight on every call (measured on
    /// flex: 11 % of a DiT step).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let mut dims = x.dims();
        let weight = self.weight.val();
        let [d_in, d_out] = weight.dims();
        let rows = dims[..D - 1].iter().product::<usize>();
        let x = x.reshape([rows, d_in]);
        let bias = self.bias.as_ref().map(|b| b.val());
        let y = if crate::fused::enabled::<B>(x.dtype()) && weight.dtype() == DType::F32 {
            crate::fused::matmul(x, weight, bias)
        } else if let Some(y) = crate::fused::grad::linear(&x, &weight, bias.as_ref()) {
            y
        } else {
            let kernel = crate::cuda_kernels::matmul_kernel();
            let y = match kernel.and_then(|k| crate::cuda_kernels::matmul(&x, &weight, k)) {
                Some(y) => y,
                None => x.matmul(weight),
            };
            match bias {
                Some(bias) => y + bias.unsqueeze::<2>(),
                None => y,
            }
        };
        dims[D - 1] = d_out;
        y.reshape(dims)
    }
}

/// A PyTorch `Linear(d_in → d_out)` under `name` (`.weight` stored [d_out, d_in],
/// optional `.bias`), its weight kept by [`Linear::weight_from_stored`].
pub fn linear<B: Backend, S: WeightSource<B>>(
    src: &mut S,
    name: &str,
    d_in: usize,
    d_out: usize,
    bias: bool,
) -> Result<Linear<B>> {
    let weight = src.tensor(&join(name, "weight"), [d_out, d_in], Init::FanIn(d_in))?;
    let bias = if bias { Some(src.param(&join(name, "bias"), [d_out], Init::FanIn(d_in))?) } else { None };
    Ok(Linear { weight: Linear::weight_from_stored(weight), bias })
}

/// Casts to f32 for statistics when computing in a half type.
fn to_f32<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    if x.dtype() == DType::F32 {
        x
    } else {
        x.cast(DType::F32)
    }
}

/// RMSNorm over the last dimension: `x · rsqrt(mean(x²) + eps)` computed in f32,
/// rounded to the compute dtype, then times `weight` (diffusers and Qwen3 agree).
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn build<S: WeightSource<B>>(src: &mut S, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: src.param(&join(name, "weight"), [dim], Init::Ones)?, eps })
    }

    /// `[..., dim]` → `[..., dim]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        if crate::fused::enabled::<B>(x.dtype()) {
            return crate::fused::rms_norm(x, self.weight.val(), self.eps, None);
        }
        if let Some(y) = crate::fused::grad::rms_norm(&x, &self.weight.val(), self.eps, None) {
            return y;
        }
        if let Some(y) = crate::cube_kernels::rms_norm(&x, &self.weight.val(), self.eps, None) {
            return y;
        }
        self.forward_composed(x)
    }

    /// `norm(x) · scale[b]`: `x` `[B, S, dim]`, `scale` `[B, dim]` (the DiT's `1 + scale`).
    pub fn forward_scaled(&self, x: Tensor<B, 3>, scale: Tensor<B, 2>) -> Tensor<B, 3> {
        if crate::fused::enabled::<B>(x.dtype()) && scale.dims() == [x.dims()[0], x.dims()[2]] {
            return crate::fused::rms_norm(x, self.weight.val(), self.eps, Some(scale));
        }
        if let Some(y) = crate::fused::grad::rms_norm(&x, &self.weight.val(), self.eps, Some(&scale)) {
            return y;
        }
        if let Some(y) = crate::cube_kernels::rms_norm(&x, &self.weight.val(), self.eps, Some(&scale)) {
            return y;
        }
        let s = x.dims()[1];
        self.forward_composed(x) * crate::fused::expand_for_flex(scale.unsqueeze_dim::<3>(1), 1, s)
    }

    /// `x + gate[b] · norm(y)`: `x`, `y` `[B, S, dim]`, `gate` `[B, dim]` (ones when `None`).
    pub fn residual(&self, x: Tensor<B, 3>, y: Tensor<B, 3>, gate: Option<Tensor<B, 2>>) -> Tensor<B, 3> {
        let [b, _, dim] = x.dims();
        if crate::fused::enabled::<B>(x.dtype()) && y.dims() == x.dims() && gate.as_ref().is_none_or(|g| g.dims() == [b, dim]) {
            return crate::fused::residual_rms_norm(x, y, self.weight.val(), self.eps, gate);
        }
        if let Some(normed) = crate::fused::grad::rms_norm(&y, &self.weight.val(), self.eps, gate.as_ref()) {
            return x + normed;
        }
        if let Some(out) = crate::cube_kernels::residual_rms_norm(&x, &y, &self.weight.val(), self.eps, gate.as_ref()) {
            return out;
        }
        match gate {
            Some(gate) => {
                let s = y.dims()[1];
                x + self.forward_composed(y) * crate::fused::expand_for_flex(gate.unsqueeze_dim::<3>(1), 1, s)
            }
            None => x + self.forward_composed(y),
        }
    }

    /// The same with burn's tensor ops (every backend but CPU f32).
    pub fn forward_composed<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let x32 = to_f32(x);
        let var = x32.clone().square().mean_dim(D - 1);
        let normed = x32 * (var + self.eps).sqrt().recip();
        let normed = if dtype == DType::F32 { normed } else { normed.cast(dtype) };
        let mut shape = [1usize; D];
        shape[D - 1] = self.weight.dims()[0];
        normed * self.weight.val().reshape(shape)
    }
}

/// LayerNorm without affine parameters over the last dimension, f32 statistics.
pub fn layer_norm_plain<B: Backend, const D: usize>(x: Tensor<B, D>, eps: f64) -> Tensor<B, D> {
    let dtype = x.dtype();
    let x32 = to_f32(x);
    let mean = x32.clone().mean_dim(D - 1);
    let centered = x32 - mean;
    let var = centered.clone().square().mean_dim(D - 1);
    let y = centered / (var + eps).sqrt();
    if dtype == DType::F32 {
        y
    } else {
        y.cast(dtype)
    }
}

/// SwiGLU feed-forward `down(silu(gate(x)) ⊙ up(x))`, no biases.
#[derive(Module, Debug)]
pub struct SwiGlu<B: Backend> {
    pub gate: Linear<B>,
    pub up: Linear<B>,
    pub down: Linear<B>,
}

impl<B: Backend> SwiGlu<B> {
    /// `names` are the checkpoint's (gate, up, down) names under `prefix`.
    pub fn build<S: WeightSource<B>>(
        src: &mut S,
        prefix: &str,
        names: [&str; 3],
        dim: usize,
        hidden: usize,
    ) -> Result<Self> {
        Ok(Self {
            gate: linear(src, &join(prefix, names[0]), dim, hidden, false)?,
            up: linear(src, &join(prefix, names[1]), dim, hidden, false)?,
            down: linear(src, &join(prefix, names[2]), hidden, dim, false)?,
        })
    }

    /// `[..., dim]` → `[..., dim]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let (gate, up) = (self.gate.forward(x.clone()), self.up.forward(x));
        let hidden = if crate::fused::enabled::<B>(gate.dtype()) {
            crate::fused::silu_mul(gate, up)
        } else if let Some(hidden) = crate::fused::grad::silu_mul(&gate, &up) {
            hidden
        } else if let Some(hidden) = crate::cube_kernels::silu_mul(&gate, &up) {
            hidden
        } else {
            silu(gate) * up
        };
        self.down.forward(hidden)
    }
}

/// Scaled dot-product attention over `[B, heads, S, head_dim]` tensors:
/// without a mask the project's own kernels where they apply (see
/// [`unmasked_kernel`]), burn's attention otherwise. `mask`: `[B, 1, S_q,
/// S_k]`, true = hidden key.
pub fn sdpa<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
    causal: bool,
) -> Tensor<B, 4> {
    if mask.is_none() {
        if let Some(out) = unmasked_kernel(&q, &k, &v, causal) {
            return out;
        }
    }
    let options = AttentionModuleOptions { scale: None, softcap: None, is_causal: causal };
    attention(q, k, v, mask, None, options)
}

/// The project's own attention without a mask, where one applies: the CPU
/// kernel of [`crate::fused::attention`] (f32 on flex; flex's own runs the
/// heads on one core) or CUDA's flash kernel ([`crate::cuda_kernels`]).
fn unmasked_kernel<B: Backend>(q: &Tensor<B, 4>, k: &Tensor<B, 4>, v: &Tensor<B, 4>, causal: bool) -> Option<Tensor<B, 4>> {
    if crate::fused::enabled::<B>(q.dtype()) {
        return Some(crate::fused::attention(q.clone(), k.clone(), v.clone(), causal));
    }
    crate::cuda_kernels::flash_attention(q, k, v, causal, crate::cuda_kernels::flash_planes())
}

/// Batch padding of a sequence: item `i` has `lens[i]` real tokens, then
/// padding up to the batch's longest. `mask` hides the padding keys
/// (`[B, 1, S, S]`, true = hidden).
#[derive(Debug, Clone)]
pub struct KeyPadding<B: Backend> {
    pub lens: Vec<usize>,
    pub mask: Tensor<B, 4, Bool>,
}

/// [`sdpa`] where the keys of each item are its first `lens[i]` tokens
/// (`None`: all keys of every item).
///
/// Why not the mask alone: where the project's own kernels run (CPU f32,
/// CUDA's flash kernel), each item runs with its keys cut to their real
/// length and no mask at all, the same result; cubek's kernel with a mask
/// was wrong in GPU run 5 (82 % off on a batch of two). Elsewhere the mask
/// goes to burn's attention.
pub fn sdpa_padded<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    padding: Option<&KeyPadding<B>>,
) -> Tensor<B, 4> {
    let Some(padding) = padding else {
        return sdpa(q, k, v, None, false);
    };
    let unmasked = |q: &Tensor<B, 4>, k: &Tensor<B, 4>, v: &Tensor<B, 4>| unmasked_kernel(q, k, v, false);
    if let Some(out) = attention_by_item(&q, &k, &v, &padding.lens, unmasked) {
        return out;
    }
    sdpa(q, k, v, Some(padding.mask.clone()), false)
}

/// `attend` on each batch item with its keys and values cut to `lens[i]`,
/// the items' outputs concatenated again; `None` as soon as `attend` is.
fn attention_by_item<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    lens: &[usize],
    attend: impl Fn(&Tensor<B, 4>, &Tensor<B, 4>, &Tensor<B, 4>) -> Option<Tensor<B, 4>>,
) -> Option<Tensor<B, 4>> {
    let outs = lens
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let item = |t: &Tensor<B, 4>| t.clone().narrow(0, i, 1);
            attend(&item(q), &item(k).narrow(2, 0, len), &item(v).narrow(2, 0, len))
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Tensor::cat(outs, 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::CpuBackend;
    use burn::tensor::{Distribution, TensorData};

    #[test]
    fn attention_on_items_cut_to_their_length_is_the_masked_attention() {
        let device = Default::default();
        let randn = |shape: [usize; 4]| Tensor::<CpuBackend, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let (q, k, v) = (randn([2, 3, 10, 8]), randn([2, 3, 10, 8]), randn([2, 3, 10, 8]));
        let lens = vec![10, 6];
        let hidden: Vec<bool> = lens.iter().flat_map(|&len| (0..10).map(move |j| j >= len)).collect();
        let mask = Tensor::<CpuBackend, 4, Bool>::from_data(TensorData::new(hidden, [2, 1, 1, 10]), &device)
            .expand([2, 1, 10, 10]);
        let masked = sdpa(q.clone(), k.clone(), v.clone(), Some(mask.clone()), false);
        let plain = |q: &Tensor<CpuBackend, 4>, k: &Tensor<CpuBackend, 4>, v: &Tensor<CpuBackend, 4>| {
            Some(sdpa(q.clone(), k.clone(), v.clone(), None, false))
        };
        let by_item = attention_by_item(&q, &k, &v, &lens, plain).unwrap();
        let diff: f32 = (by_item - masked.clone()).abs().max().into_scalar();
        assert!(diff < 1e-5, "{diff}");
        // The padded attention (CPU kernel, items cut) is the masked one.
        let padded = sdpa_padded(q, k, v, Some(&KeyPadding { lens, mask }));
        let diff: f32 = (padded - masked).abs().max().into_scalar();
        assert!(diff < 1e-5, "{diff}");
        // And a refusal of one item falls back as a whole.
        let (q, k, v) = (randn([2, 1, 4, 8]), randn([2, 1, 4, 8]), randn([2, 1, 4, 8]));
        assert!(attention_by_item(&q, &k, &v, &[4, 2], |_, k, _| (k.dims()[2] == 4).then(|| k.clone())).is_none());
    }
}
