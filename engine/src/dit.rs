//! The Z-Image S3-DiT (`ZImageTransformer2DModel`): a single-stream diffusion
//! transformer over image patches and caption tokens (spec §2).
//!
//! Forward pass, as in the reference:
//! 1. `adaln = t_embedder(t · t_scale)`;
//! 2. image patches → `x_embedder` (+ `x_pad_token` up to a multiple of 32) →
//!    `noise_refiner` blocks (modulated);
//! 3. caption features → `cap_embedder` (+ `cap_pad_token`) → `context_refiner`
//!    blocks (unmodulated);
//! 4. `[image tokens, caption tokens]` → main `layers` (modulated);
//! 5. final layer on the image tokens → unpatchify.

use burn::config::Config;
use burn::module::{Module, Param};
use crate::nn::Linear;
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, DType, Tensor, TensorData};

use crate::error::{EngineError, Result};
use crate::fused::swap_dims_1_2;
use crate::nn::{join, layer_norm_plain, linear, sdpa_padded, KeyPadding, RmsNorm, SwiGlu};
use crate::weights::{Init, RandomWeights, WeightSource};

/// Image and caption sequences are each padded to a multiple of this.
pub const SEQ_MULTIPLE: usize = 32;
/// Width of the sinusoidal time features fed to the time MLP.
const TIME_FREQ_DIM: usize = 256;
/// Hidden width of the time MLP (hard-coded in the reference).
const TIME_MLP_DIM: usize = 1024;
/// Upper bound of the modulation width (`min(dim, 256)` in the reference).
const ADALN_MAX_DIM: usize = 256;

/// Configuration of the DiT, as in `transformer/config.json`.
#[derive(Config, Debug)]
pub struct ZImageDitConfig {
    /// Hidden size of every token.
    #[config(default = 3840)]
    pub dim: usize,
    /// Number of main joint (image + caption) blocks.
    #[config(default = 30)]
    pub n_layers: usize,
    /// Number of noise-refiner blocks, and of context-refiner blocks.
    #[config(default = 2)]
    pub n_refiner_layers: usize,
    /// Attention heads (head_dim = dim / n_heads).
    #[config(default = 30)]
    pub n_heads: usize,
    /// Epsilon of every RMSNorm in the model.
    #[config(default = 1e-5)]
    pub norm_eps: f64,
    /// Whether q and k are RMS-normalised per head before RoPE.
    #[config(default = true)]
    pub qk_norm: bool,
    /// Width of the text-encoder features (Qwen3 hidden size).
    #[config(default = 2560)]
    pub cap_feat_dim: usize,
    /// Latent channels in and out.
    #[config(default = 16)]
    pub in_channels: usize,
    /// Spatial patch size (the only one the checkpoints have: 2).
    #[config(default = 2)]
    pub patch_size: usize,
    /// RoPE base.
    #[config(default = 256.0)]
    pub rope_theta: f64,
    /// Multiplier applied to the time input.
    #[config(default = 1000.0)]
    pub t_scale: f64,
    /// RoPE dimensions of the (sequence, row, column) axes; they sum to head_dim.
    #[config(default = "[32, 48, 48]")]
    pub axes_dims: [usize; 3],
    /// Largest position + 1 per axis.
    #[config(default = "[1536, 512, 512]")]
    pub axes_lens: [usize; 3],
}

impl ZImageDitConfig {
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }
    /// SwiGLU width: `int(dim / 3 * 8)` as the reference computes it.
    pub fn ffn_dim(&self) -> usize {
        (self.dim as f64 / 3.0 * 8.0) as usize
    }
    pub fn adaln_dim(&self) -> usize {
        self.dim.min(ADALN_MAX_DIM)
    }
    fn patch_features(&self) -> usize {
        self.patch_size * self.patch_size * self.in_channels
    }

    /// Reads a diffusers `transformer/config.json`.
    pub fn from_diffusers_json(json: &serde_json::Value) -> std::result::Result<Self, String> {
        let int = |k: &str, d: usize| json.get(k).and_then(|v| v.as_u64()).map(|v| v as usize).unwrap_or(d);
        let float = |k: &str, d: f64| json.get(k).and_then(|v| v.as_f64()).unwrap_or(d);
        let arr3 = |k: &str, d: [usize; 3]| -> std::result::Result<[usize; 3], String> {
            match json.get(k) {
                None => Ok(d),
                Some(v) => {
                    let a: Vec<usize> = v
                        .as_array()
                        .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
                        .ok_or(format!("\"{k}\" must be a list of integers"))?;
                    a.try_into().map_err(|_| format!("\"{k}\" must have 3 entries"))
                }
            }
        };
        let patch = json.get("all_patch_size").and_then(|v| v.as_array()).cloned().unwrap_or_default();
        let patch_size = patch.first().and_then(|v| v.as_u64()).unwrap_or(2) as usize;
        let f_patch = json
            .get("all_f_patch_size")
            .and_then(|v| v.as_array())
            .and_then(|a| a.first().and_then(|v| v.as_u64()))
            .unwrap_or(1);
        if f_patch != 1 {
            return Err(format!("all_f_patch_size {f_patch} is not supported (only 1)"));
        }
        let cfg = ZImageDitConfig::new()
            .with_dim(int("dim", 3840))
            .with_n_layers(int("n_layers", 30))
            .with_n_refiner_layers(int("n_refiner_layers", 2))
            .with_n_heads(int("n_heads", 30))
            .with_norm_eps(float("norm_eps", 1e-5))
            .with_qk_norm(json.get("qk_norm").and_then(|v| v.as_bool()).unwrap_or(true))
            .with_cap_feat_dim(int("cap_feat_dim", 2560))
            .with_in_channels(int("in_channels", 16))
            .with_patch_size(patch_size)
            .with_rope_theta(float("rope_theta", 256.0))
            .with_t_scale(float("t_scale", 1000.0))
            .with_axes_dims(arr3("axes_dims", [32, 48, 48])?)
            .with_axes_lens(arr3("axes_lens", [1536, 512, 512])?);
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.n_heads == 0 || !self.dim.is_multiple_of(self.n_heads) {
            return Err(format!("dim {} is not divisible by n_heads {}", self.dim, self.n_heads));
        }
        if self.axes_dims.iter().sum::<usize>() != self.head_dim() {
            return Err(format!("axes_dims {:?} must sum to head_dim {}", self.axes_dims, self.head_dim()));
        }
        if self.axes_dims.iter().any(|d| d % 2 != 0) {
            return Err(format!("axes_dims {:?} must be even", self.axes_dims));
        }
        Ok(())
    }

    /// A model with fresh random weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> ZImageDit<B> {
        ZImageDit::build(self, &mut RandomWeights::new(device, DType::F32)).expect("random init cannot fail")
    }
}

/// Sinusoidal time features followed by a 2-layer MLP.
#[derive(Module, Debug)]
pub struct TimestepEmbedder<B: Backend> {
    pub linear_1: Linear<B>,
    pub linear_2: Linear<B>,
}

impl<B: Backend> TimestepEmbedder<B> {
    fn build<S: WeightSource<B>>(src: &mut S, out_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: linear(src, "t_embedder.mlp.0", TIME_FREQ_DIM, TIME_MLP_DIM, true)?,
            linear_2: linear(src, "t_embedder.mlp.2", TIME_MLP_DIM, out_dim, true)?,
        })
    }

    /// `t`: `[B]` (already multiplied by t_scale), f32 → `[B, adaln_dim]`.
    pub fn forward(&self, t: Tensor<B, 1>, dtype: DType) -> Tensor<B, 2> {
        let features = timestep_features(t);
        let features = if dtype == DType::F32 { features } else { features.cast(dtype) };
        self.linear_2.forward(silu(self.linear_1.forward(features)))
    }
}

/// `[cos(t·f), sin(t·f)]` with `f_i = exp(-ln(10000)·i/128)`, cos first,
/// in the reference's f32 operation order. `[B]` → `[B, 256]`.
pub fn timestep_features<B: Backend>(t: Tensor<B, 1>) -> Tensor<B, 2> {
    let half = TIME_FREQ_DIM / 2;
    let neg_log = -(10000f64.ln()) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| ((neg_log * i as f32) / half as f32).exp()).collect();
    let device = t.device();
    let freqs = Tensor::<B, 1>::from_data(TensorData::new(freqs, [half]), (&device, DType::F32));
    let args = t.unsqueeze_dim::<2>(1) * freqs.unsqueeze_dim::<2>(0);
    Tensor::cat(vec![args.clone().cos(), args.sin()], 1)
}

/// Multi-head self-attention with per-head RMS-normalised q and k and RoPE.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub to_q: Linear<B>,
    pub to_k: Linear<B>,
    pub to_v: Linear<B>,
    pub to_out: Linear<B>,
    pub norm_q: Option<RmsNorm<B>>,
    pub norm_k: Option<RmsNorm<B>>,
    pub n_heads: usize,
}

impl<B: Backend> Attention<B> {
    fn build<S: WeightSource<B>>(src: &mut S, p: &str, cfg: &ZImageDitConfig) -> Result<Self> {
        let (d, hd) = (cfg.dim, cfg.head_dim());
        let norm = |src: &mut S, n: &str| -> Result<Option<RmsNorm<B>>> {
            if cfg.qk_norm {
                Ok(Some(RmsNorm::build(src, &join(p, n), hd, 1e-5)?))
            } else {
                Ok(None)
            }
        };
        Ok(Self {
            to_q: linear(src, &join(p, "to_q"), d, d, false)?,
            to_k: linear(src, &join(p, "to_k"), d, d, false)?,
            to_v: linear(src, &join(p, "to_v"), d, d, false)?,
            to_out: linear(src, &join(p, "to_out.0"), d, d, false)?,
            norm_q: norm(src, "norm_q")?,
            norm_k: norm(src, "norm_k")?,
            n_heads: cfg.n_heads,
        })
    }

    /// `x`: `[B, S, dim]`, `rope`: per-token rotations, `padding`: the batch
    /// padding keys to hide → `[B, S, dim]`.
    pub fn forward(&self, x: Tensor<B, 3>, rope: &Rope<B>, padding: Option<&KeyPadding<B>>) -> Tensor<B, 3> {
        let [b, s, d] = x.dims();
        let heads = |t: Tensor<B, 3>| t.reshape([b, s, self.n_heads, d / self.n_heads]);
        let mut q = heads(self.to_q.forward(x.clone()));
        let mut k = heads(self.to_k.forward(x.clone()));
        let v = heads(self.to_v.forward(x));
        if let (Some(nq), Some(nk)) = (&self.norm_q, &self.norm_k) {
            q = nq.forward(q);
            k = nk.forward(k);
        }
        let (q, k) = (rope.apply(q), rope.apply(k));
        // Training on the CPU: one op on the head split itself (no swapped views).
        if padding.is_none() {
            if let Some(o) = crate::fused::grad::attention_bshd(&q, &k, &v) {
                return self.to_out.forward(o.reshape([b, s, d]));
            }
        }
        let (q, k) = (swap_dims_1_2(q), swap_dims_1_2(k));
        let o = sdpa_padded(q, k, swap_dims_1_2(v), padding);
        self.to_out.forward(swap_dims_1_2(o).reshape([b, s, d]))
    }
}

/// Transformer block with sandwich norms; modulated blocks scale the inputs
/// by `1 + scale` and gate the branches by `tanh(gate)` (no shift anywhere).
#[derive(Module, Debug)]
pub struct DitBlock<B: Backend> {
    pub attention: Attention<B>,
    pub feed_forward: SwiGlu<B>,
    pub attention_norm1: RmsNorm<B>,
    pub attention_norm2: RmsNorm<B>,
    pub ffn_norm1: RmsNorm<B>,
    pub ffn_norm2: RmsNorm<B>,
    /// `Linear(adaln_dim → 4·dim)`; absent in the context refiner.
    pub modulation: Option<Linear<B>>,
}

impl<B: Backend> DitBlock<B> {
    pub(crate) fn build<S: WeightSource<B>>(src: &mut S, p: &str, cfg: &ZImageDitConfig, modulated: bool) -> Result<Self> {
        let (d, eps) = (cfg.dim, cfg.norm_eps);
        Ok(Self {
            attention: Attention::build(src, &join(p, "attention"), cfg)?,
            feed_forward: SwiGlu::build(src, &join(p, "feed_forward"), ["w1", "w3", "w2"], d, cfg.ffn_dim())?,
            attention_norm1: RmsNorm::build(src, &join(p, "attention_norm1"), d, eps)?,
            attention_norm2: RmsNorm::build(src, &join(p, "attention_norm2"), d, eps)?,
            ffn_norm1: RmsNorm::build(src, &join(p, "ffn_norm1"), d, eps)?,
            ffn_norm2: RmsNorm::build(src, &join(p, "ffn_norm2"), d, eps)?,
            modulation: if modulated {
                Some(linear(src, &join(p, "adaLN_modulation.0"), cfg.adaln_dim(), 4 * d, true)?)
            } else {
                None
            },
        })
    }

    /// `x`: `[B, S, dim]`, `adaln`: `[B, adaln_dim]` → `[B, S, dim]`.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        padding: Option<&KeyPadding<B>>,
        adaln: &Tensor<B, 2>,
    ) -> Tensor<B, 3> {
        match &self.modulation {
            Some(modulation) => {
                let m = modulation.forward(adaln.clone());
                let [scale_msa, gate_msa, scale_mlp, gate_mlp]: [Tensor<B, 2>; 4] =
                    m.chunk(4, 1).try_into().expect("4 chunks");
                let attn =
                    self.attention.forward(self.attention_norm1.forward_scaled(x.clone(), scale_msa + 1.0), rope, padding);
                let x = self.attention_norm2.residual(x, attn, Some(gate_msa.tanh()));
                let ffn = self.feed_forward.forward(self.ffn_norm1.forward_scaled(x.clone(), scale_mlp + 1.0));
                self.ffn_norm2.residual(x, ffn, Some(gate_mlp.tanh()))
            }
            None => {
                let attn = self.attention.forward(self.attention_norm1.forward(x.clone()), rope, padding);
                let x = self.attention_norm2.residual(x, attn, None);
                let ffn = self.feed_forward.forward(self.ffn_norm1.forward(x.clone()));
                self.ffn_norm2.residual(x, ffn, None)
            }
        }
    }
}

/// `LayerNorm(no affine) · (1 + Linear(SiLU(adaln)))` then `Linear(dim → 64)`.
#[derive(Module, Debug)]
pub struct FinalLayer<B: Backend> {
    pub modulation: Linear<B>,
    pub linear: Linear<B>,
}

impl<B: Backend> FinalLayer<B> {
    /// `x`: `[B, S, dim]`, `adaln`: `[B, adaln_dim]` → `[B, S, patch_features]`.
    pub fn forward(&self, x: Tensor<B, 3>, adaln: &Tensor<B, 2>) -> Tensor<B, 3> {
        let scale = self.modulation.forward(silu(adaln.clone())).unsqueeze_dim::<3>(1) + 1.0;
        self.linear.forward(layer_norm_plain(x, 1e-6) * scale)
    }
}

/// Per-token RoPE rotations for interleaved pairs: `cos`, `sin` `[B, S, 1, head_dim/2]`.
#[derive(Debug, Clone)]
pub struct Rope<B: Backend> {
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
    /// Only under autodiff (training): the same rotation without strided views.
    pairs: Option<PairRotation<B>>,
}

/// `y = x ⊙ cos + (x · swap) ⊙ sin`, with `cos` `[B, S, 1, D]` repeated per pair,
/// `sin` signed (−s, +s) and `swap` the `[D, D]` permutation that exchanges each
/// pair. Equal to the pairwise formula bit for bit (`a − b = a + (−b)`, and the
/// permutation's products are exact), but with every operand contiguous and
/// full-size on flex: the split/stack formulation multiplies strided halves
/// by angles broadcast over the heads, which flex walks element by element
/// (measured: RoPE was 18 % of a demo Base training step, now ~0).
#[derive(Debug, Clone)]
struct PairRotation<B: Backend> {
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
    swap: Tensor<B, 2>,
}

impl<B: Backend> Rope<B> {
    /// Rotations for 3-axis positions `ids[b][s] = (seq, row, col)`.
    ///
    /// Angles are `pos · θ^(-2j/d)` in f64, rounded to f32 (as the reference's
    /// table), then cos/sin; the axes are concatenated (seq, row, col).
    pub fn new(ids: &[Vec<[usize; 3]>], cfg: &ZImageDitConfig, device: &B::Device) -> Self {
        let half: usize = cfg.axes_dims.iter().sum::<usize>() / 2;
        let freqs: Vec<Vec<f64>> = cfg
            .axes_dims
            .iter()
            .map(|&d| (0..d / 2).map(|j| 1.0 / cfg.rope_theta.powf((2 * j) as f64 / d as f64)).collect())
            .collect();
        let (b, s) = (ids.len(), ids.iter().map(|v| v.len()).max().unwrap_or(0));
        let mut cos = vec![0f32; b * s * half];
        let mut sin = vec![0f32; b * s * half];
        for (bi, seq) in ids.iter().enumerate() {
            for (si, pos) in seq.iter().enumerate() {
                let row = (bi * s + si) * half;
                let mut m = 0;
                for (axis, f) in freqs.iter().enumerate() {
                    for &w in f {
                        let angle = (pos[axis] as f64 * w) as f32;
                        cos[row + m] = angle.cos();
                        sin[row + m] = angle.sin();
                        m += 1;
                    }
                }
            }
        }
        let pairs = B::ad_enabled(device).then(|| {
            let d = 2 * half;
            let cos_full: Vec<f32> = cos.iter().flat_map(|&c| [c, c]).collect();
            let sin_signed: Vec<f32> = sin.iter().flat_map(|&s| [-s, s]).collect();
            let mut swap = vec![0f32; d * d];
            for m in 0..half {
                swap[(2 * m) * d + 2 * m + 1] = 1.0;
                swap[(2 * m + 1) * d + 2 * m] = 1.0;
            }
            let t = |v: Vec<f32>| Tensor::<B, 4>::from_data(TensorData::new(v, [b, s, 1, d]), (device, DType::F32));
            PairRotation {
                cos: t(cos_full),
                sin: t(sin_signed),
                swap: Tensor::from_data(TensorData::new(swap, [d, d]), (device, DType::F32)),
            }
        });
        let t = |v: Vec<f32>| Tensor::<B, 4>::from_data(TensorData::new(v, [b, s, 1, half]), (device, DType::F32));
        Self { cos: t(cos), sin: t(sin), pairs }
    }

    /// Rotates interleaved pairs `(x[2m], x[2m+1])` of `[B, S, H, D]`, in f32.
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, s, h, d] = x.dims();
        let dtype = x.dtype();
        // The kernel reads one row of angles per token (no broadcasting).
        if crate::fused::enabled::<B>(dtype) && self.cos.dims() == [b, s, 1, d / 2] {
            return crate::fused::rope_interleaved(x, self.cos.clone(), self.sin.clone());
        }
        if let Some(y) = crate::fused::grad::rope_interleaved(&x, &self.cos, &self.sin) {
            return y;
        }
        if let Some(y) = crate::cube_kernels::rope_interleaved(&x, &self.cos, &self.sin) {
            return y;
        }
        let x = if dtype == DType::F32 { x } else { x.cast(DType::F32) };
        if let Some(p) = &self.pairs {
            let swapped = x.clone().reshape([b * s * h, d]).matmul(p.swap.clone()).reshape([b, s, h, d]);
            // Repeated over the heads on flex (a middle-dimension broadcast is its slow path).
            let cos = crate::fused::expand_for_flex(p.cos.clone(), 2, h);
            let sin = crate::fused::expand_for_flex(p.sin.clone(), 2, h);
            let y = x * cos + swapped * sin;
            return if dtype == DType::F32 { y } else { y.cast(dtype) };
        }
        let pairs = x.reshape([b, s, h, d / 2, 2]);
        let x0 = pairs.clone().narrow(4, 0, 1).squeeze_dim::<4>(4);
        let x1 = pairs.narrow(4, 1, 1).squeeze_dim::<4>(4);
        let y0 = x0.clone() * self.cos.clone() - x1.clone() * self.sin.clone();
        let y1 = x0 * self.sin.clone() + x1 * self.cos.clone();
        let y = Tensor::stack::<5>(vec![y0, y1], 4).reshape([b, s, h, d]);
        if dtype == DType::F32 {
            y
        } else {
            y.cast(dtype)
        }
    }

    /// The angles' `cos` and `sin`, `[B, S, 1, head_dim/2]` (f32).
    pub fn angles(&self) -> (&Tensor<B, 4>, &Tensor<B, 4>) {
        (&self.cos, &self.sin)
    }

    /// Concatenates along the sequence (per batch item widths must match).
    fn cat(parts: Vec<Self>) -> Self {
        let pairs: Option<Vec<PairRotation<B>>> = parts.iter().map(|r| r.pairs.clone()).collect();
        let pairs = pairs.and_then(|p| {
            let swap = p.first()?.swap.clone();
            Some(PairRotation {
                cos: Tensor::cat(p.iter().map(|r| r.cos.clone()).collect(), 1),
                sin: Tensor::cat(p.into_iter().map(|r| r.sin).collect(), 1),
                swap,
            })
        });
        Self {
            cos: Tensor::cat(parts.iter().map(|r| r.cos.clone()).collect(), 1),
            sin: Tensor::cat(parts.into_iter().map(|r| r.sin).collect(), 1),
            pairs,
        }
    }
}

/// The whole DiT.
#[derive(Module, Debug)]
pub struct ZImageDit<B: Backend> {
    pub t_embedder: TimestepEmbedder<B>,
    pub x_embedder: Linear<B>,
    pub cap_norm: RmsNorm<B>,
    pub cap_linear: Linear<B>,
    pub x_pad_token: Param<Tensor<B, 2>>,
    pub cap_pad_token: Param<Tensor<B, 2>>,
    pub noise_refiner: Vec<DitBlock<B>>,
    pub context_refiner: Vec<DitBlock<B>>,
    pub layers: Vec<DitBlock<B>>,
    pub final_layer: FinalLayer<B>,
}

/// Called with (name, `[B, S, dim]` hidden states) after each stage; tests
/// compare these with the reference's.
pub type Trace<'a, B> = &'a mut dyn FnMut(&str, &Tensor<B, 3>);

impl<B: Backend> ZImageDit<B> {
    /// Builds the model from a [`WeightSource`] with the diffusers names.
    pub fn build<S: WeightSource<B>>(cfg: &ZImageDitConfig, src: &mut S) -> Result<Self> {
        let d = cfg.dim;
        let key = format!("{}-1", cfg.patch_size);
        let blocks = |src: &mut S, p: &str, n: usize, modulated: bool| -> Result<Vec<DitBlock<B>>> {
            (0..n).map(|i| DitBlock::build(src, &format!("{p}.{i}"), cfg, modulated)).collect()
        };
        Ok(Self {
            t_embedder: TimestepEmbedder::build(src, cfg.adaln_dim())?,
            x_embedder: linear(src, &format!("all_x_embedder.{key}"), cfg.patch_features(), d, true)?,
            cap_norm: RmsNorm::build(src, "cap_embedder.0", cfg.cap_feat_dim, cfg.norm_eps)?,
            cap_linear: linear(src, "cap_embedder.1", cfg.cap_feat_dim, d, true)?,
            x_pad_token: src.param("x_pad_token", [1, d], Init::Normal(0.02))?,
            cap_pad_token: src.param("cap_pad_token", [1, d], Init::Normal(0.02))?,
            noise_refiner: blocks(src, "noise_refiner", cfg.n_refiner_layers, true)?,
            context_refiner: blocks(src, "context_refiner", cfg.n_refiner_layers, false)?,
            layers: blocks(src, "layers", cfg.n_layers, true)?,
            final_layer: FinalLayer {
                modulation: linear(
                    src,
                    &format!("all_final_layer.{key}.adaLN_modulation.1"),
                    cfg.adaln_dim(),
                    d,
                    true,
                )?,
                linear: linear(src, &format!("all_final_layer.{key}.linear"), d, cfg.patch_features(), true)?,
            },
        })
    }

    /// Predicts the flow `u ≈ x0 − ε` for a batch.
    ///
    /// - `x`: latents `[B, C, H, W]` (H, W multiples of the patch size);
    /// - `t`: model time `[B]` in [0, 1] (0 = pure noise), f32;
    /// - `captions`: per item `[L_i, cap_feat_dim]` text features (lengths may differ).
    ///
    /// Returns `[B, C, H, W]` in the compute dtype.
    pub fn forward(
        &self,
        cfg: &ZImageDitConfig,
        x: Tensor<B, 4>,
        t: Tensor<B, 1>,
        captions: &[Tensor<B, 2>],
    ) -> Result<Tensor<B, 4>> {
        self.forward_traced(cfg, x, t, captions, &mut |_, _| {})
    }

    /// [`Self::forward`], reporting intermediate states to `trace`.
    pub fn forward_traced(
        &self,
        cfg: &ZImageDitConfig,
        x: Tensor<B, 4>,
        t: Tensor<B, 1>,
        captions: &[Tensor<B, 2>],
        trace: Trace<'_, B>,
    ) -> Result<Tensor<B, 4>> {
        let [b, c, h, w] = x.dims();
        let p = cfg.patch_size;
        if captions.len() != b {
            return Err(EngineError::invalid(format!("{b} latents but {} captions", captions.len())));
        }
        if h % p != 0 || w % p != 0 || c != cfg.in_channels {
            return Err(EngineError::invalid(format!("latent shape [{c}, {h}, {w}] does not fit the DiT")));
        }
        let (hp, wp) = (h / p, w / p);
        if hp >= cfg.axes_lens[1] || wp >= cfg.axes_lens[2] {
            return Err(EngineError::invalid(format!("image too large for the position table ({hp}×{wp} patches)")));
        }
        let device = x.device();
        let dtype = self.x_embedder.weight.val().dtype();

        // 1. Time conditioning.
        let adaln = self.t_embedder.forward(t * cfg.t_scale, dtype);
        trace("t_emb", &adaln.clone().unsqueeze_dim(1));

        // Sequence lengths: captions and image each padded to a multiple of 32.
        let cap_lens: Vec<usize> = captions.iter().map(|c| c.dims()[0]).collect();
        if let Some(i) = cap_lens.iter().position(|&l| l == 0) {
            return Err(EngineError::invalid(format!("caption {i} is empty")));
        }
        let cap_padded: Vec<usize> = cap_lens.iter().map(|&l| round_up(l, SEQ_MULTIPLE)).collect();
        if cap_padded.iter().any(|&l| l + 1 >= cfg.axes_lens[0]) {
            return Err(EngineError::invalid("caption too long for the position table"));
        }
        let n_img = hp * wp;
        let n_img_padded = round_up(n_img, SEQ_MULTIPLE);

        // 2. Image tokens: patchify, embed, pad, noise refiner.
        let x = patchify(x.cast(dtype), p);
        let mut x = self.x_embedder.forward(x);
        if n_img_padded > n_img {
            let pad = self.x_pad_token.val().unsqueeze_dim::<3>(0).expand([b, n_img_padded - n_img, cfg.dim]);
            x = Tensor::cat(vec![x, pad], 1);
        }
        trace("x_embed", &x);
        let img_ids: Vec<Vec<[usize; 3]>> = cap_padded
            .iter()
            .map(|&lc| {
                let mut ids: Vec<[usize; 3]> = (0..hp).flat_map(|r| (0..wp).map(move |col| [lc + 1, r, col])).collect();
                ids.resize(n_img_padded, [0, 0, 0]);
                ids
            })
            .collect();
        let img_rope = Rope::new(&img_ids, cfg, &device);
        for (i, block) in self.noise_refiner.iter().enumerate() {
            x = block.forward(x, &img_rope, None, &adaln);
            trace(&format!("noise_refiner.{i}"), &x);
        }

        // 3. Caption tokens: embed, pad, batch-pad, context refiner.
        let cap_max = *cap_padded.iter().max().expect("batch is not empty");
        let mut caps = Vec::with_capacity(b);
        for (cap, &lc) in captions.iter().zip(&cap_padded) {
            let l = cap.dims()[0];
            let mut e = self.cap_linear.forward(self.cap_norm.forward(cap.clone().cast(dtype)));
            if lc > l {
                e = Tensor::cat(vec![e, self.cap_pad_token.val().expand([lc - l, cfg.dim])], 0);
            }
            if cap_max > lc {
                e = Tensor::cat(vec![e, Tensor::zeros([cap_max - lc, cfg.dim], (&device, dtype))], 0);
            }
            caps.push(e);
        }
        let mut cap = Tensor::stack::<3>(caps, 0);
        trace("cap_embed", &cap);
        let cap_ids: Vec<Vec<[usize; 3]>> = cap_padded
            .iter()
            .map(|&lc| (0..cap_max).map(|j| if j < lc { [1 + j, 0, 0] } else { [0, 0, 0] }).collect())
            .collect();
        let cap_rope = Rope::new(&cap_ids, cfg, &device);
        let cap_padding = key_padding::<B>(&cap_padded, cap_max, &device);
        for (i, block) in self.context_refiner.iter().enumerate() {
            cap = block.forward(cap, &cap_rope, cap_padding.as_ref(), &adaln);
            trace(&format!("context_refiner.{i}"), &cap);
        }

        // 4. Joint sequence [image, caption] through the main blocks. Caption
        // batch padding sits at the end of each row already, so concatenation
        // keeps every item's real tokens contiguous from position 0.
        let unified_lens: Vec<usize> = cap_padded.iter().map(|&lc| n_img_padded + lc).collect();
        let unified_max = n_img_padded + cap_max;
        let mut unified = Tensor::cat(vec![x, cap], 1);
        let rope = Rope::cat(vec![img_rope, cap_rope]);
        let padding = key_padding::<B>(&unified_lens, unified_max, &device);
        for (i, block) in self.layers.iter().enumerate() {
            unified = block.forward(unified, &rope, padding.as_ref(), &adaln);
            trace(&format!("layers.{i}"), &unified);
        }

        // 5. Final layer on the image tokens, unpatchify.
        let out = self.final_layer.forward(unified.narrow(1, 0, n_img), &adaln);
        Ok(unpatchify(out, c, hp, wp, p))
    }
}

fn round_up(n: usize, m: usize) -> usize {
    n.div_ceil(m) * m
}

/// The batch padding of items of `lens` tokens (its mask `[B, 1, S, S]`,
/// true = hidden key); `None` when every item has the full length, as the
/// reference (no mask at all).
fn key_padding<B: Backend>(lens: &[usize], max: usize, device: &B::Device) -> Option<KeyPadding<B>> {
    if lens.iter().all(|&l| l == max) {
        return None;
    }
    let mut m = vec![false; lens.len() * max];
    for (i, &l) in lens.iter().enumerate() {
        m[i * max + l..(i + 1) * max].iter_mut().for_each(|v| *v = true);
    }
    let row = Tensor::<B, 4, Bool>::from_data(TensorData::new(m, [lens.len(), 1, 1, max]), device);
    Some(KeyPadding { lens: lens.to_vec(), mask: row.expand([lens.len(), 1, max, max]) })
}

/// `[B, C, H, W]` → `[B, (H/p)(W/p), p·p·C]`: tokens row-major, features
/// ordered (ph, pw, c) with the channel fastest.
pub fn patchify<B: Backend>(x: Tensor<B, 4>, p: usize) -> Tensor<B, 3> {
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h / p, p, w / p, p]).permute([0, 2, 4, 3, 5, 1]).reshape([b, (h / p) * (w / p), p * p * c])
}

/// Inverse of [`patchify`]: `[B, hp·wp, p·p·C]` → `[B, C, hp·p, wp·p]`.
pub fn unpatchify<B: Backend>(x: Tensor<B, 3>, c: usize, hp: usize, wp: usize, p: usize) -> Tensor<B, 4> {
    let b = x.dims()[0];
    x.reshape([b, hp, wp, p, p, c]).permute([0, 5, 1, 3, 2, 4]).reshape([b, c, hp * p, wp * p])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::CpuBackend;
    use burn::backend::Autodiff;
    use burn::tensor::Distribution;

    #[test]
    fn rope_under_autodiff_equals_the_inference_rope_and_rotates_gradients() {
        type Ad = Autodiff<CpuBackend>;
        let cfg = ZImageDitConfig::new().with_dim(64).with_n_heads(2).with_axes_dims([8, 12, 12]);
        let ids: Vec<Vec<[usize; 3]>> = (0..2).map(|b| (0..7).map(|i| [b + 1, i / 3, i % 3 + 2]).collect()).collect();
        let device = Default::default();
        let x = Tensor::<CpuBackend, 4>::random([2, 7, 2, 32], Distribution::Normal(0.0, 1.0), &device);
        let plain = Rope::<CpuBackend>::new(&ids, &cfg, &device).apply(x.clone());
        let rope = Rope::<Ad>::new(&ids, &cfg, &device);
        assert!(rope.pairs.is_some() && Rope::<CpuBackend>::new(&ids, &cfg, &device).pairs.is_none());
        let xa = Tensor::<Ad, 4>::from_inner(x).require_grad();
        let y = rope.apply(xa.clone());
        assert_eq!(y.clone().inner().into_data().to_vec::<f32>().unwrap(), plain.into_data().to_vec::<f32>().unwrap());
        // A rotation keeps lengths: the gradient of Σ y·g is the inverse rotation of g.
        let g = Tensor::<CpuBackend, 4>::random([2, 7, 2, 32], Distribution::Normal(0.0, 1.0), &device);
        let grads = (y * Tensor::<Ad, 4>::from_inner(g.clone())).sum().backward();
        let gx = xa.grad(&grads).unwrap();
        let norm = |t: Tensor<CpuBackend, 4>| t.square().sum().into_scalar().sqrt();
        assert!((norm(gx) - norm(g)).abs() < 1e-3);
    }
}
