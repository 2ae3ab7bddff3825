//! The Qwen3 text encoder (transformers `Qwen3Model`), run only as far as
//! Z-Image needs: the output of decoder layer L−2 (`hidden_states[-2]`), so
//! the last layer and the final norm are never loaded (spec §3).

use burn::config::Config;
use burn::module::{Module, Param};
use crate::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};

use crate::error::{EngineError, Result};
use crate::fused::swap_dims_1_2;
use crate::nn::{join, linear, sdpa, RmsNorm, SwiGlu};
use crate::weights::{Init, RandomWeights, WeightSource};

/// Configuration of the Qwen3 encoder, as in `text_encoder/config.json`.
#[derive(Config, Debug)]
pub struct Qwen3Config {
    /// Vocabulary size of the embedding table.
    #[config(default = 151936)]
    pub vocab_size: usize,
    /// Hidden size.
    #[config(default = 2560)]
    pub hidden_size: usize,
    /// Decoder layers in the checkpoint (Z-Image uses all but the last).
    #[config(default = 36)]
    pub num_hidden_layers: usize,
    /// Query heads.
    #[config(default = 32)]
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention).
    #[config(default = 8)]
    pub num_key_value_heads: usize,
    /// Width of each head.
    #[config(default = 128)]
    pub head_dim: usize,
    /// SwiGLU hidden width.
    #[config(default = 9728)]
    pub intermediate_size: usize,
    /// Epsilon of every RMSNorm.
    #[config(default = 1e-6)]
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[config(default = 1_000_000.0)]
    pub rope_theta: f64,
}

impl Qwen3Config {
    /// Reads a transformers `config.json` (`rope_theta` top-level or under
    /// `rope_parameters`, as newer transformers write it).
    pub fn from_transformers_json(json: &serde_json::Value) -> std::result::Result<Self, String> {
        let int = |k: &str| {
            json.get(k).and_then(|v| v.as_u64()).map(|v| v as usize).ok_or(format!("missing integer \"{k}\""))
        };
        let hidden = int("hidden_size")?;
        let heads = int("num_attention_heads")?;
        let rope_theta = json
            .get("rope_theta")
            .and_then(|v| v.as_f64())
            .or_else(|| json.get("rope_parameters").and_then(|p| p.get("rope_theta")).and_then(|v| v.as_f64()))
            .unwrap_or(1_000_000.0);
        let cfg = Qwen3Config::new()
            .with_vocab_size(int("vocab_size")?)
            .with_hidden_size(hidden)
            .with_num_hidden_layers(int("num_hidden_layers")?)
            .with_num_attention_heads(heads)
            .with_num_key_value_heads(int("num_key_value_heads").unwrap_or(heads))
            .with_head_dim(json.get("head_dim").and_then(|v| v.as_u64()).map(|v| v as usize).unwrap_or(hidden / heads))
            .with_intermediate_size(int("intermediate_size")?)
            .with_rms_norm_eps(json.get("rms_norm_eps").and_then(|v| v.as_f64()).unwrap_or(1e-6))
            .with_rope_theta(rope_theta);
        if cfg.num_hidden_layers < 2 {
            return Err("num_hidden_layers must be at least 2 (Z-Image uses the second-to-last layer)".into());
        }
        if cfg.num_key_value_heads == 0 || !cfg.num_attention_heads.is_multiple_of(cfg.num_key_value_heads) {
            return Err("num_attention_heads must be a multiple of num_key_value_heads".into());
        }
        Ok(cfg)
    }

    /// Layers actually run: up to and including layer L−2.
    pub fn layers_used(&self) -> usize {
        self.num_hidden_layers - 1
    }

    /// A model with fresh random weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Qwen3Encoder<B> {
        Qwen3Encoder::build(self, &mut RandomWeights::new(device, DType::F32)).expect("random init cannot fail")
    }
}

/// Grouped-query causal self-attention with q/k RMSNorm before rotate-half RoPE.
#[derive(Module, Debug)]
pub struct Qwen3Attention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    pub q_norm: RmsNorm<B>,
    pub k_norm: RmsNorm<B>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl<B: Backend> Qwen3Attention<B> {
    fn build<S: WeightSource<B>>(src: &mut S, p: &str, c: &Qwen3Config) -> Result<Self> {
        let (h, hd) = (c.hidden_size, c.head_dim);
        Ok(Self {
            q_proj: linear(src, &join(p, "q_proj"), h, c.num_attention_heads * hd, false)?,
            k_proj: linear(src, &join(p, "k_proj"), h, c.num_key_value_heads * hd, false)?,
            v_proj: linear(src, &join(p, "v_proj"), h, c.num_key_value_heads * hd, false)?,
            o_proj: linear(src, &join(p, "o_proj"), c.num_attention_heads * hd, h, false)?,
            q_norm: RmsNorm::build(src, &join(p, "q_norm"), hd, c.rms_norm_eps)?,
            k_norm: RmsNorm::build(src, &join(p, "k_norm"), hd, c.rms_norm_eps)?,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            head_dim: hd,
        })
    }

    /// `x`: `[B, L, hidden]` → `[B, L, hidden]`, causal.
    pub fn forward(&self, x: Tensor<B, 3>, rope: &RotateHalfRope<B>) -> Tensor<B, 3> {
        let [b, l, _] = x.dims();
        let hd = self.head_dim;
        let q = self.q_norm.forward(self.q_proj.forward(x.clone()).reshape([b, l, self.n_heads, hd]));
        let k = self.k_norm.forward(self.k_proj.forward(x.clone()).reshape([b, l, self.n_kv_heads, hd]));
        let v = self.v_proj.forward(x).reshape([b, l, self.n_kv_heads, hd]);
        let q = rope.apply(swap_dims_1_2(q));
        let k = repeat_kv(rope.apply(swap_dims_1_2(k)), self.n_heads / self.n_kv_heads);
        let v = repeat_kv(swap_dims_1_2(v), self.n_heads / self.n_kv_heads);
        let o = sdpa(q, k, v, None, true);
        self.o_proj.forward(swap_dims_1_2(o).reshape([b, l, self.n_heads * hd]))
    }
}

/// Repeats each kv head `n` times for consecutive query heads: `[B, Hkv, L, D]` → `[B, Hkv·n, L, D]`.
fn repeat_kv<B: Backend>(x: Tensor<B, 4>, n: usize) -> Tensor<B, 4> {
    if n == 1 {
        return x;
    }
    let [b, h, l, d] = x.dims();
    x.unsqueeze_dim::<5>(2).expand([b, h, n, l, d]).reshape([b, h * n, l, d])
}

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct Qwen3Layer<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: Qwen3Attention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub mlp: SwiGlu<B>,
}

impl<B: Backend> Qwen3Layer<B> {
    /// `[B, L, hidden]` → `[B, L, hidden]`.
    pub fn forward(&self, x: Tensor<B, 3>, rope: &RotateHalfRope<B>) -> Tensor<B, 3> {
        let h = x.clone() + self.self_attn.forward(self.input_layernorm.forward(x), rope);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}

/// Qwen3 up to layer L−2.
#[derive(Module, Debug)]
pub struct Qwen3Encoder<B: Backend> {
    pub embed_tokens: Param<Tensor<B, 2>>,
    pub layers: Vec<Qwen3Layer<B>>,
    pub rope_theta: f64,
    pub head_dim: usize,
}

impl<B: Backend> Qwen3Encoder<B> {
    /// Builds layers 0..L−2 from a [`WeightSource`] (transformers names, no `model.`).
    pub fn build<S: WeightSource<B>>(c: &Qwen3Config, src: &mut S) -> Result<Self> {
        let embed_tokens = src.param("embed_tokens.weight", [c.vocab_size, c.hidden_size], Init::Normal(0.02))?;
        let layers = (0..c.layers_used())
            .map(|i| {
                let p = format!("layers.{i}");
                Ok(Qwen3Layer {
                    input_layernorm: RmsNorm::build(src, &join(&p, "input_layernorm"), c.hidden_size, c.rms_norm_eps)?,
                    self_attn: Qwen3Attention::build(src, &join(&p, "self_attn"), c)?,
                    post_attention_layernorm: RmsNorm::build(
                        src,
                        &join(&p, "post_attention_layernorm"),
                        c.hidden_size,
                        c.rms_norm_eps,
                    )?,
                    mlp: SwiGlu::build(
                        src,
                        &join(&p, "mlp"),
                        ["gate_proj", "up_proj", "down_proj"],
                        c.hidden_size,
                        c.intermediate_size,
                    )?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { embed_tokens, layers, rope_theta: c.rope_theta, head_dim: c.head_dim })
    }

    /// Token ids `[L]` → `hidden_states[-2]` `[L, hidden]` (raw output of layer L−2).
    pub fn forward(&self, ids: &[u32]) -> Result<Tensor<B, 2>> {
        let vocab = self.embed_tokens.dims()[0];
        if ids.is_empty() {
            return Err(EngineError::invalid("no tokens to encode"));
        }
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(EngineError::Tokenizer(format!(
                "token id {bad} is outside the text encoder's vocabulary of {vocab}"
            )));
        }
        let device = self.embed_tokens.device();
        let idx = Tensor::<B, 1, Int>::from_data(
            TensorData::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), [ids.len()]),
            &device,
        );
        let mut x = self.embed_tokens.val().select(0, idx).unsqueeze_dim::<3>(0);
        let rope = RotateHalfRope::new(ids.len(), self.head_dim, self.rope_theta, &device);
        for layer in &self.layers {
            x = layer.forward(x, &rope);
        }
        Ok(x.squeeze_dim::<2>(0))
    }
}

/// Rotate-half RoPE for positions 0..L−1: `x·cos + rotate_half(x)·sin`.
pub struct RotateHalfRope<B: Backend> {
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
}

impl<B: Backend> RotateHalfRope<B> {
    /// `inv_freq_i = 1/θ^(2i/d)` and angles `pos·inv_freq` in f32, as transformers.
    pub fn new(len: usize, head_dim: usize, theta: f64, device: &B::Device) -> Self {
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..half).map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32)).collect();
        let mut cos = Vec::with_capacity(len * head_dim);
        let mut sin = Vec::with_capacity(len * head_dim);
        for pos in 0..len {
            for j in 0..head_dim {
                let a = pos as f32 * inv[j % half];
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let t =
            |v: Vec<f32>| Tensor::<B, 4>::from_data(TensorData::new(v, [1, 1, len, head_dim]), (device, DType::F32));
        Self { cos: t(cos), sin: t(sin) }
    }

    /// `[B, H, L, D]` → `[B, H, L, D]`.
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let dtype = x.dtype();
        let d = x.dims()[3];
        let (cos, sin) = if dtype == DType::F32 {
            (self.cos.clone(), self.sin.clone())
        } else {
            (self.cos.clone().cast(dtype), self.sin.clone().cast(dtype))
        };
        let x1 = x.clone().narrow(3, 0, d / 2);
        let x2 = x.clone().narrow(3, d / 2, d / 2);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * cos + rotated * sin
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_theta_is_read_top_level_or_under_rope_parameters() {
        let base = serde_json::json!({"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128});
        let mut top = base.clone();
        top["rope_theta"] = 5000.0.into();
        assert_eq!(Qwen3Config::from_transformers_json(&top).unwrap().rope_theta, 5000.0);
        let mut nested = base.clone();
        nested["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 7000.0});
        let cfg = Qwen3Config::from_transformers_json(&nested).unwrap();
        assert_eq!(cfg.rope_theta, 7000.0);
        assert_eq!(cfg.head_dim, 16, "head_dim defaults to hidden/heads");
        assert_eq!(cfg.layers_used(), 3);
        let mut bad = base;
        bad["num_key_value_heads"] = 3.into();
        assert!(Qwen3Config::from_transformers_json(&bad).is_err());
    }
}
