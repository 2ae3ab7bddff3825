//! `zimage bench-ops`: the DiT's and the VAE's heaviest ops one by one, at
//! the full model's shapes (1024² image), each timed alone and, where two
//! kernels compute the same thing (burn's default and the hand-picked CUDA
//! kernel of [`crate::cuda_kernels`]), checked against each other.
//!
//! Why: a whole-model time says how far from the floor we are, not which op
//! is to blame; on a lent GPU with minutes to spend, this says it in seconds.

use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::module::{attention, conv2d};
use burn::tensor::ops::{AttentionModuleOptions, ConvOptions};
use burn::tensor::{Bool, DType, Distribution, Tensor};
use serde::Serialize;

use crate::cuda_kernels;
use crate::error::{EngineError, Result};

/// The shapes to time.
#[derive(Debug, Clone, Copy)]
pub struct OpShapes {
    /// Tokens in the DiT's unified sequence (image + caption).
    pub tokens: usize,
    /// DiT model width.
    pub dim: usize,
    /// Attention heads (`dim / heads` per head).
    pub heads: usize,
    /// Feed-forward hidden width.
    pub ffn: usize,
    /// VAE convolutions: (channels, side) of the decoder's levels.
    pub convs: [(usize, usize); 2],
}

impl OpShapes {
    /// Z-Image at 1024²: 4096 image + 128 caption tokens, width 3840, 30
    /// heads, FFN 10240; the decoder's 128 channels at 1024² and 512 at 256².
    pub const FULL: Self = Self { tokens: 4224, dim: 3840, heads: 30, ffn: 10240, convs: [(128, 1024), (512, 256)] };
    /// Small enough for the CPU tests.
    pub const TINY: Self = Self { tokens: 48, dim: 64, heads: 4, ffn: 96, convs: [(8, 16), (16, 8)] };

    pub fn named(name: &str) -> Result<Self> {
        match name {
            "full" => Ok(Self::FULL),
            "tiny" => Ok(Self::TINY),
            other => Err(EngineError::InvalidRequest(format!("unknown op shapes {other:?}; use full or tiny"))),
        }
    }
}

/// One op's timing.
#[derive(Debug, Clone, Serialize)]
pub struct OpTiming {
    pub op: String,
    pub shape: String,
    /// Mean of the timed repetitions, after one untimed (compiling) call.
    pub ms: f64,
    /// Floating-point work per call, when the op is compute-bound.
    pub tflop_per_s: Option<f64>,
    /// Largest |difference| from the same op in f32 (burn's kernel on
    /// f32 copies of the inputs), relative to its largest |value|.
    pub rel_diff: Option<f64>,
}

/// What [`run`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct OpReport {
    pub ops: Vec<OpTiming>,
    /// The CUDA matmul kernel fastest over a DiT block's linear layers (its
    /// results within bf16 rounding of f32), when any ran.
    pub best_matmul: Option<String>,
    /// `composed` when attention as two matmuls around the fused softmax beat
    /// the flash kernel (both within bf16 rounding of f32), else `flash`;
    /// `None` off CUDA.
    pub best_attention: Option<String>,
    /// `gemm` when the VAE's 3×3 convolutions as GEMMs (`ZIMAGE_CONV=gemm`)
    /// beat the implicit-GEMM kernel at every shape timed (both within bf16
    /// rounding of f32), else `implicit-gemm`; `None` off CUDA.
    pub best_conv: Option<String>,
}

/// Sections of [`run`] that `only` can name.
pub const SECTIONS: &[&str] = &["matmul", "attention", "vae", "block"];

/// Times every op of `shapes` in `dtype` on `device`, `reps` times each;
/// with `only`, the ops of that section of [`SECTIONS`] alone.
pub fn run<B: Backend>(device: &B::Device, dtype: DType, shapes: OpShapes, reps: usize, only: Option<&str>) -> Result<OpReport> {
    if let Some(section) = only.filter(|o| !SECTIONS.contains(o)) {
        return Err(EngineError::InvalidRequest(format!("unknown section {section:?}; use one of {SECTIONS:?}")));
    }
    let want = |section: &str| only.is_none_or(|o| o == section);
    // Rows named cublas are cuBLAS's at every size (the runs send it only large
    // products), and only where it loads (else the matmul runs cubek's kernel).
    crate::cublas::set_min_macs(0);
    let cublas = cuda_kernels::cublas_loaded::<B>(device);
    let mut out = Vec::new();
    let OpShapes { tokens: s, dim: d, heads: h, ffn: f, .. } = shapes;
    let head_dim = d / h;
    let normal = |dims: Vec<usize>, scale: f64| -> Tensor<B, 1> {
        let n = dims.iter().product::<usize>();
        (Tensor::<B, 1>::random([n], Distribution::Normal(0.0, 1.0), device) * scale).cast(dtype)
    };

    // Linear layers, weight as Linear keeps it on GPUs (a transposed view of
    // the stored [d_out, d_in]): burn's default kernel, then each of the CUDA
    // kernels; calls per DiT block weigh the choice of the best.
    let mut per_kernel: Vec<(String, f64, usize)> = Vec::new();
    let matmuls = if want("matmul") {
        vec![("linear q/k/v/out", s, d, d, 4.0), ("linear ffn up", s, d, f, 2.0), ("linear ffn down", s, f, d, 1.0)]
    } else {
        Vec::new()
    };
    for (name, rows, d_in, d_out, per_block) in matmuls {
        let x = normal(vec![rows, d_in], 1.0).reshape([rows, d_in]);
        let weight = normal(vec![d_out, d_in], 1.0 / (d_in as f64).sqrt()).reshape([d_out, d_in]).transpose();
        let flop = 2.0 * (rows * d_in * d_out) as f64;
        let shape = format!("[{rows}, {d_in}] × [{d_in}, {d_out}]");
        let reference = x.clone().cast(DType::F32).matmul(weight.clone().cast(DType::F32));
        let default = x.clone().matmul(weight.clone());
        out.push(timed::<B, _, 2>(device, reps, &format!("{name}, burn default"), &shape, Some(flop), Some(rel_diff(&default, &reference)), || {
            x.clone().matmul(weight.clone())
        })?);
        for kernel in cuda_kernels::MATMUL_KERNELS.iter().filter(|k| **k != "cublas" || cublas) {
            let Some(got) = cuda_kernels::matmul(&x, &weight, kernel) else { continue };
            let diff = rel_diff(&got, &reference);
            let row = timed::<B, _, 2>(device, reps, &format!("{name}, {kernel}"), &shape, Some(flop), Some(diff), || {
                cuda_kernels::matmul(&x, &weight, kernel).unwrap_or_else(|| x.clone())
            })?;
            // bf16 output rounding alone gives ~4e-3.
            if diff < 2e-2 {
                match per_kernel.iter_mut().find(|(k, _, _)| k == kernel) {
                    Some(entry) => {
                        entry.1 += per_block * row.ms;
                        entry.2 += 1;
                    }
                    None => per_kernel.push((kernel.to_string(), per_block * row.ms, 1)),
                }
            }
            out.push(row);
        }
        // The same product with the weight stored row-major `[d_in, d_out]`
        // (what a transpose at load time would give), for the TMA kernels:
        // does the transposed view cost them anything?
        let weight_rows = normal(vec![d_in, d_out], 1.0 / (d_in as f64).sqrt()).reshape([d_in, d_out]);
        let reference_rows = x.clone().cast(DType::F32).matmul(weight_rows.clone().cast(DType::F32));
        for kernel in cuda_kernels::MATMUL_KERNELS.iter().filter(|k| k.contains("tma")) {
            let Some(got) = cuda_kernels::matmul(&x, &weight_rows, kernel) else { continue };
            let diff = rel_diff(&got, &reference_rows);
            out.push(timed::<B, _, 2>(device, reps, &format!("{name}, {kernel}, weight row-major"), &shape, Some(flop), Some(diff), || {
                cuda_kernels::matmul(&x, &weight_rows, kernel).unwrap_or_else(|| x.clone())
            })?);
        }
    }
    let best_matmul = per_kernel
        .into_iter()
        .filter(|(_, _, shapes)| *shapes == 3)
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(kernel, _, _)| kernel);

    let best_attention = if want("attention") {
        // Attention over [1, heads, S, head_dim].
        let qkv = || normal(vec![1, h, s, head_dim], 1.0).reshape([1, h, s, head_dim]);
        let (q, k, v) = (qkv(), qkv(), qkv());
        let flop = 4.0 * (h * s * s * head_dim) as f64;
        let shape = format!("[1, {h}, {s}, {head_dim}]");
        let options = AttentionModuleOptions { scale: None, softcap: None, is_causal: false };
        let f32_attention = |q: &Tensor<B, 4>, k: &Tensor<B, 4>, v: &Tensor<B, 4>, mask: Option<Tensor<B, 4, Bool>>| {
            let c = |t: &Tensor<B, 4>| t.clone().cast(DType::F32);
            attention(c(q), c(k), c(v), mask, None, options)
        };
        let reference = f32_attention(&q, &k, &v, None);
        let default = attention(q.clone(), k.clone(), v.clone(), None, None, options);
        out.push(timed::<B, _, 4>(device, reps, "attention, burn default", &shape, Some(flop), Some(rel_diff(&default, &reference)), || {
            attention(q.clone(), k.clone(), v.clone(), None, None, options)
        })?);
        for planes in [2u8, 4, 8] {
            if let Some(got) = cuda_kernels::flash_attention(&q, &k, &v, false, planes) {
                let diff = rel_diff(&got, &reference);
                out.push(timed::<B, _, 4>(device, reps, &format!("attention, flash {planes} planes"), &shape, Some(flop), Some(diff), || {
                    cuda_kernels::flash_attention(&q, &k, &v, false, planes).unwrap_or_else(|| q.clone())
                })?);
            }
        }
        // What the DiT passes: v as a [B, S, H, D] → [B, H, S, D] view, and a
        // batch of two (CFG) whose second item hides its last keys.
        let planes = cuda_kernels::flash_planes();
        let v_view = v.clone().swap_dims(1, 2).reshape([1, s, h, head_dim]).swap_dims(1, 2);
        if let Some(got) = cuda_kernels::flash_attention(&q, &k, &v_view, false, planes) {
            let diff = rel_diff(&got, &f32_attention(&q, &k, &v_view, None));
            out.push(OpTiming { op: "attention, flash, strided v (check only)".into(), shape: shape.clone(), ms: 0.0, tflop_per_s: None, rel_diff: Some(diff) });
        }
        // With the TMA matmul and with cuBLAS: the runs use the form whose
        // matmul kernel is also the best one for the linear layers.
        for kernel in cuda_kernels::MATMUL_KERNELS.iter().filter(|k| **k == "specialized-tma-mma" || (**k == "cublas" && cublas)) {
            if let Some(got) = cuda_kernels::composed_attention(&q, &k, &v, kernel) {
                let diff = rel_diff(&got, &reference);
                let op = format!("attention, composed ({kernel} matmuls, fused softmax)");
                out.push(timed::<B, _, 4>(device, reps, &op, &shape, Some(flop), Some(diff), || {
                    cuda_kernels::composed_attention(&q, &k, &v, kernel).unwrap_or_else(|| q.clone())
                })?);
                // Its pieces one by one against f32, on one head.
                let (q1, k1, v1) = (q.clone().narrow(1, 0, 1).reshape([1, s, head_dim]), k.clone().narrow(1, 0, 1).reshape([1, s, head_dim]), v.clone().narrow(1, 0, 1).reshape([1, s, head_dim]));
                let c3 = |t: &Tensor<B, 3>| t.clone().cast(DType::F32);
                let scores32 = c3(&q1).matmul(c3(&k1).swap_dims(1, 2));
                let weights32 = burn::tensor::activation::softmax(scores32.clone() / (head_dim as f64).sqrt(), 2);
                let mut check = |op: &str, got: Option<Tensor<B, 3>>, reference: &Tensor<B, 3>| {
                    if let Some(got) = got {
                        out.push(OpTiming { op: format!("{op} (check only)"), shape: format!("[1, {s}, {head_dim}]"), ms: 0.0, tflop_per_s: None, rel_diff: Some(rel_diff(&got, reference)) });
                    }
                };
                check(&format!("composed piece ({kernel}): q·kᵀ, f32 out"), cuda_kernels::matmul_to(&q1, &k1.clone().swap_dims(1, 2), kernel, DType::F32), &scores32);
                check(&format!("composed piece ({kernel}): q·kᵀ, bf16 out"), cuda_kernels::matmul_to(&q1, &k1.clone().swap_dims(1, 2), kernel, dtype), &scores32);
                if *kernel != "cublas" {
                    // The softmax is the same whichever matmul runs around it.
                    let scale = 1.0 / (head_dim as f64).sqrt();
                    check("composed piece: softmax bf16 → f32", crate::cube_kernels::softmax(&scores32.clone().cast(dtype), scale, DType::F32), &weights32);
                    check("composed piece: softmax f32 → f32", crate::cube_kernels::softmax(&scores32, scale, DType::F32), &weights32);
                    check("composed piece: softmax f32 → bf16", crate::cube_kernels::softmax(&scores32, scale, dtype), &weights32);
                    check("composed piece: softmax bf16 → bf16", crate::cube_kernels::softmax(&scores32.clone().cast(dtype), scale, dtype), &weights32);
                }
                let w16 = weights32.clone().cast(dtype);
                check(&format!("composed piece ({kernel}): weights·v"), cuda_kernels::matmul_to(&w16, &v1, kernel, dtype), &weights32.clone().matmul(c3(&v1)));
            }
        }
        let timing = |prefix: &str| out.iter().find(|r| r.op.starts_with(prefix) && r.rel_diff.is_some_and(|d| d < 2e-2)).map(|r| r.ms);
        // The kernel the runs will use: ZIMAGE_MATMUL's when set, else this bench's best.
        let runtime_matmul = std::env::var_os("ZIMAGE_MATMUL").and(cuda_kernels::matmul_kernel().map(String::from)).or(best_matmul.clone());
        let composed = format!("attention, composed ({} matmuls", runtime_matmul.as_deref().unwrap_or("specialized-tma-mma"));
        let best_attention = match (timing(&format!("attention, flash {planes} planes")), timing(&composed)) {
            (Some(flash), Some(composed)) if composed < flash => Some("composed".to_string()),
            (Some(_), _) => Some("flash".to_string()),
            (None, Some(_)) => Some("composed".to_string()),
            (None, None) => None,
        };
        // A CFG batch whose second item is padded, as the DiT runs it
        // (`nn::sdpa_padded`), against the masked attention in f32.
        let q2 = Tensor::cat(vec![q.clone(), q.clone()], 0);
        let k2 = Tensor::cat(vec![k.clone(), k.clone()], 0);
        let v2 = Tensor::cat(vec![v.clone(), v.clone()], 0);
        let lens = vec![s, s - s / 8];
        let mask = padding_mask::<B>(s, lens[1], device);
        let padding = crate::nn::KeyPadding { lens, mask: mask.clone() };
        let got = crate::nn::sdpa_padded(q2.clone(), k2.clone(), v2.clone(), Some(&padding));
        let diff = rel_diff(&got, &f32_attention(&q2, &k2, &v2, Some(mask)));
        out.push(OpTiming { op: "attention, batch of 2 padded, as the DiT (check only)".into(), shape: format!("[2, {h}, {s}, {head_dim}]"), ms: 0.0, tflop_per_s: None, rel_diff: Some(diff) });
        best_attention
    } else {
        None
    };

    let mut best_conv = None;
    if want("vae") {
        let on_cuda = cuda_kernels::describe::<B>(device).is_some();
        // The VAE decoder's 3×3 convolutions (padding 1).
        for (c, side) in shapes.convs {
            let x = normal(vec![1, c, side, side], 1.0).reshape([1, c, side, side]);
            let w = normal(vec![c, c, 3, 3], 1.0 / ((9 * c) as f64).sqrt()).reshape([c, c, 3, 3]);
            let b = normal(vec![c], 0.1);
            let opts = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
            let flop = 2.0 * (9 * c * c * side * side) as f64;
            let shape = format!("[1, {c}, {side}, {side}], 3×3 → {c}");
            let c = |t: &Tensor<B, 4>| t.clone().cast(DType::F32);
            let reference = conv2d(c(&x), c(&w), Some(b.clone().cast(DType::F32)), opts.clone());
            let default = conv2d(x.clone(), w.clone(), Some(b.clone()), opts.clone());
            out.push(timed::<B, _, 4>(device, reps, "conv 3×3, burn default", &shape, Some(flop), Some(rel_diff(&default, &reference)), || {
                conv2d(x.clone(), w.clone(), Some(b.clone()), opts.clone())
            })?);
            if on_cuda && !cuda_kernels::conv_as_gemm_on() {
                if let Some(got) = cuda_kernels::conv2d(&x, &w, Some(&b), opts.clone()) {
                    let diff = rel_diff(&got, &reference);
                    out.push(timed::<B, _, 4>(device, reps, "conv 3×3, implicit GEMM", &shape, Some(flop), Some(diff), || {
                        cuda_kernels::conv2d(&x, &w, Some(&b), opts.clone()).unwrap_or_else(|| x.clone())
                    })?);
                }
            }
            // As GEMMs: the neighbourhood columns, then the matmul kernel the
            // runs use (on CUDA in half precision only, as the runs would; on
            // wgpu burn's matmul, the default there).
            let runs_here = !on_cuda || matches!(dtype, DType::BF16 | DType::F16);
            let gemm = || cuda_kernels::conv3x3_as_gemm(&x, &w, Some(&b), cuda_kernels::IM2COL_CHUNK_BYTES);
            if let (true, Some(got)) = (runs_here, gemm()) {
                let diff = rel_diff(&got, &reference);
                let matmul = if on_cuda { cuda_kernels::matmul_kernel().unwrap_or("burn's matmul") } else { "burn's matmul" };
                let op = format!("conv 3×3, as GEMMs ({matmul})");
                out.push(timed::<B, _, 4>(device, reps, &op, &shape, Some(flop), Some(diff), || gemm().unwrap_or_else(|| x.clone()))?);
            }
        }
        // Only CUDA has the choice (wgpu runs the GEMM form).
        if on_cuda {
            let timing = |prefix: &str| out.iter().filter(|r| r.op.starts_with(prefix) && r.rel_diff.is_some_and(|d| d < 2e-2)).map(|r| r.ms).collect::<Vec<_>>();
            let (implicit, as_gemm) = (timing("conv 3×3, implicit GEMM"), timing("conv 3×3, as GEMMs"));
            let n = shapes.convs.len();
            if as_gemm.len() == n && (implicit.len() < n || as_gemm.iter().sum::<f64>() < implicit.iter().sum::<f64>()) {
                best_conv = Some("gemm".into());
            } else if implicit.len() == n {
                best_conv = Some("implicit-gemm".into());
            }
        }

        // The rest of the VAE decoder at its largest level: GroupNorm + SiLU (the
        // statistics as the decoder takes them, and with burn's one-step mean),
        // nearest ×2 upsampling, and the mid-block's one-head attention.
        let (c, side) = shapes.convs[0];
        let x = normal(vec![1, c, side, side], 1.0).reshape([1, c, side, side]);
        let norm = crate::vae::GroupNorm::<B> {
            weight: burn::module::Param::from_tensor(normal(vec![c], 1.0)),
            bias: burn::module::Param::from_tensor(normal(vec![c], 1.0)),
            groups: 32.min(c),
        };
        let shape = format!("[1, {c}, {side}, {side}]");
        // As the decoder runs it (the GroupNorm kernels where they run), then
        // burn's ops alone; the first checked against the second.
        let composed = || burn::tensor::activation::silu(norm.forward_composed(x.clone()));
        let diff = rel_diff(&norm.forward_silu(x.clone()), &composed());
        out.push(timed::<B, _, 4>(device, reps, "group norm + SiLU (VAE)", &shape, None, Some(diff), || norm.forward_silu(x.clone()))?);
        out.push(timed::<B, _, 4>(device, reps, "group norm + SiLU (VAE), burn's ops", &shape, None, None, composed)?);
        let one_step = |x: Tensor<B, 4>| {
            let [b, c, h, w] = x.dims();
            let g = x.cast(DType::F32).reshape([b, norm.groups, c / norm.groups * h * w]);
            let centered = g.clone() - g.mean_dim(2);
            let var = centered.clone().square().mean_dim(2);
            (centered / (var + 1e-6).sqrt()).reshape([b, c, h, w]).cast(dtype)
        };
        out.push(timed::<B, _, 4>(device, reps, "group norm statistics, one-step mean", &shape, None, None, || one_step(x.clone()))?);
        let half_side = normal(vec![1, c, side / 2, side / 2], 1.0).reshape([1, c, side / 2, side / 2]);
        out.push(timed::<B, _, 4>(device, reps, "upsample nearest ×2", &format!("[1, {c}, {}, {}]", side / 2, side / 2), None, None, || {
            crate::vae::upsample_nearest_2x(half_side.clone())
        })?);
        let (c_mid, side_mid) = shapes.convs[1];
        let tokens = (side_mid / 2) * (side_mid / 2);
        let qkv = || normal(vec![1, 1, tokens, c_mid], 1.0).reshape([1, 1, tokens, c_mid]);
        let (q, k, v) = (qkv(), qkv(), qkv());
        let flop = 4.0 * (tokens * tokens * c_mid) as f64;
        out.push(timed::<B, _, 4>(device, reps, "VAE mid attention (sdpa as the decoder calls it)", &format!("[1, 1, {tokens}, {c_mid}]"), Some(flop), None, || {
            crate::nn::sdpa(q.clone(), k.clone(), v.clone(), None, false)
        })?);
    }

    if want("block") {
        // One whole modulated DiT block as the model runs it, and its parts: what
        // the ops above leave out (norms, RoPE, gates, casts) is the difference.
        let cfg = crate::dit::ZImageDitConfig::new().with_dim(d).with_n_heads(h).with_axes_dims(if head_dim == 128 {
            [32, 48, 48]
        } else {
            [head_dim / 4, head_dim * 3 / 8, head_dim - head_dim / 4 - head_dim * 3 / 8]
        });
        let block = crate::dit::DitBlock::<B>::build(&mut crate::weights::RandomWeights::new(device, dtype), "", &cfg, true)?;
        let side = (s as f64).sqrt() as usize;
        let ids: Vec<[usize; 3]> = (0..s).map(|i| [1, (i / side.max(1)) % 512, i % side.max(1)]).collect();
        let rope = crate::dit::Rope::<B>::new(&[ids], &cfg, device);
        let x = normal(vec![1, s, d], 1.0).reshape([1, s, d]);
        let adaln = normal(vec![1, cfg.adaln_dim()], 1.0).reshape([1, cfg.adaln_dim()]);
        let shape = format!("[1, {s}, {d}]");
        out.push(timed::<B, _, 3>(device, reps, "DiT block, whole (modulated)", &shape, None, None, || {
            block.forward(x.clone(), &rope, None, &adaln)
        })?);
        out.push(timed::<B, _, 3>(device, reps, "DiT block: attention module (q/k/v/out, q/k norms, RoPE, attention)", &shape, None, None, || {
            block.attention.forward(x.clone(), &rope, None)
        })?);
        out.push(timed::<B, _, 3>(device, reps, "DiT block: SwiGLU feed-forward (w1, w3, SiLU·, w2)", &shape, None, None, || {
            block.feed_forward.forward(x.clone())
        })?);
        let scale = normal(vec![1, d], 1.0).reshape([1, d]);
        out.push(timed::<B, _, 3>(device, reps, "DiT block: one RMSNorm × (1 + scale)", &shape, None, None, || {
            block.attention_norm1.forward_scaled(x.clone(), scale.clone())
        })?);
        out.push(timed::<B, _, 3>(device, reps, "DiT block: one gated residual (RMSNorm, tanh gate, add)", &shape, None, None, || {
            block.attention_norm2.residual(x.clone(), x.clone(), Some(scale.clone().tanh()))
        })?);

        // The same block with the fused GPU kernels (crate::cube_kernels) off:
        // what they save, and how far apart the two results are (where they
        // run at all: probed with the RMSNorm, which runs on every GPU backend).
        let norm = &block.attention_norm1;
        if crate::cube_kernels::rms_norm(&x, &norm.weight.val(), norm.eps, None).is_some() {
            let fused = block.forward(x.clone(), &rope, None, &adaln);
            crate::cube_kernels::set_enabled(false);
            let composed = block.forward(x.clone(), &rope, None, &adaln);
            let row = timed::<B, _, 3>(device, reps, "DiT block, whole, fused GPU kernels off", &shape, None, Some(rel_diff(&fused, &composed)), || {
                block.forward(x.clone(), &rope, None, &adaln)
            });
            crate::cube_kernels::set_enabled(true);
            out.push(row?);
            // Each kernel against the composed formula in f32.
            let c = |t: &Tensor<B, 3>| t.clone().cast(DType::F32);
            let (w, eps) = (norm.weight.val(), norm.eps);
            let norm32 = |t: Tensor<B, 3>| t.clone() * (t.square().mean_dim(2) + eps).sqrt().recip();
            let reference = norm32(c(&x)) * w.clone().cast(DType::F32).reshape([1, 1, d]) * c(&scale.clone().unsqueeze_dim::<3>(1));
            if let Some(got) = crate::cube_kernels::rms_norm(&x, &w, eps, Some(&scale)) {
                out.push(OpTiming { op: "fused RMSNorm × scale (check only)".into(), shape: shape.clone(), ms: 0.0, tflop_per_s: None, rel_diff: Some(rel_diff(&got, &reference)) });
            }
            let up = normal(vec![1, s, d], 1.0).reshape([1, s, d]);
            let reference = burn::tensor::activation::silu(c(&x)) * c(&up);
            if let Some(got) = crate::cube_kernels::silu_mul(&x, &up) {
                out.push(OpTiming { op: "fused SiLU gate (check only)".into(), shape: shape.clone(), ms: 0.0, tflop_per_s: None, rel_diff: Some(rel_diff(&got, &reference)) });
            }
            let q4 = x.clone().reshape([1, s, h, head_dim]);
            if let Some(got) = crate::cube_kernels::rope_interleaved(&q4, rope.angles().0, rope.angles().1) {
                crate::cube_kernels::set_enabled(false);
                let reference = rope.apply(q4.clone().cast(DType::F32));
                crate::cube_kernels::set_enabled(true);
                out.push(OpTiming { op: "fused RoPE (check only)".into(), shape: format!("[1, {s}, {h}, {head_dim}]"), ms: 0.0, tflop_per_s: None, rel_diff: Some(rel_diff(&got, &reference)) });
            }
            let scores = normal(vec![h, s, s], 4.0).reshape([h, s, s]);
            let reference = burn::tensor::activation::softmax(c(&scores) * 0.5, 2);
            if let Some(got) = crate::cube_kernels::softmax(&scores, 0.5, DType::F32) {
                out.push(OpTiming { op: "fused softmax (check only)".into(), shape: format!("[{h}, {s}, {s}]"), ms: 0.0, tflop_per_s: None, rel_diff: Some(rel_diff(&got, &reference)) });
            }
        }

        // One elementwise op over the DiT's activations: launch and bandwidth cost.
        let a = normal(vec![s, d], 1.0).reshape([s, d]);
        let b = normal(vec![s, d], 1.0).reshape([s, d]);
        out.push(timed::<B, _, 2>(device, reps, "elementwise add", &format!("[{s}, {d}]"), None, None, || a.clone() + b.clone())?);
    }
    Ok(OpReport { ops: out, best_matmul, best_attention, best_conv })
}

/// `[2, 1, S, S]`: nothing hidden for the first item, keys from `len` on for the second.
fn padding_mask<B: Backend>(s: usize, len: usize, device: &B::Device) -> Tensor<B, 4, Bool> {
    let keys = Tensor::<B, 1, burn::tensor::Int>::arange(0..s as i64, device).reshape([1, 1, 1, s]);
    let limits = Tensor::<B, 1, burn::tensor::Int>::from_ints([s as i32, len as i32], device).reshape([2, 1, 1, 1]);
    keys.greater_equal(limits).expand([2, 1, s, s])
}

/// max |a − b| / max |b|, in f32.
fn rel_diff<B: Backend, const D: usize>(a: &Tensor<B, D>, b: &Tensor<B, D>) -> f64 {
    let (a, b) = (a.clone().cast(DType::F32), b.clone().cast(DType::F32));
    let diff: f32 = (a - b.clone()).abs().max().into_scalar().elem();
    let scale: f32 = b.abs().max().into_scalar().elem();
    diff as f64 / (scale as f64).max(1e-12)
}

use burn::tensor::ElementConversion;

fn timed<B: Backend, F: FnMut() -> Tensor<B, D>, const D: usize>(
    device: &B::Device,
    reps: usize,
    op: &str,
    shape: &str,
    flop: Option<f64>,
    rel_diff: Option<f64>,
    mut call: F,
) -> Result<OpTiming> {
    let sync = || B::sync(device).map_err(|e| EngineError::Device(format!("device error: {e:?}")));
    drop(call());
    sync()?;
    let started = Instant::now();
    for _ in 0..reps {
        drop(call());
    }
    sync()?;
    let ms = started.elapsed().as_secs_f64() * 1e3 / reps.max(1) as f64;
    Ok(OpTiming {
        op: op.into(),
        shape: shape.into(),
        ms,
        tflop_per_s: flop.map(|f| f / (ms * 1e-3) / 1e12),
        rel_diff,
    })
}

/// The timings as a table.
pub fn table(report: &OpReport) -> String {
    let mut s = String::from("| op | shape | ms | TFLOP/s | rel. diff from f32 |\n|---|---|---|---|---|\n");
    for r in &report.ops {
        let ms = if r.ms > 0.0 { format!("{:.3}", r.ms) } else { "—".into() };
        let tf = r.tflop_per_s.map(|t| format!("{t:.1}")).unwrap_or_else(|| "—".into());
        let diff = r.rel_diff.map(|d| format!("{d:.1e}")).unwrap_or_else(|| "—".into());
        s += &format!("| {} | {} | {ms} | {tf} | {diff} |\n", r.op, r.shape);
    }
    if let Some(best) = &report.best_matmul {
        s += &format!("best matmul kernel: {best}\n");
    }
    if let Some(best) = &report.best_attention {
        s += &format!("best attention: {best}\n");
    }
    if let Some(best) = &report.best_conv {
        s += &format!("best conv: {best}\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::CpuBackend;

    #[test]
    fn tiny_op_bench_times_every_op() {
        let report = run::<CpuBackend>(&Default::default(), DType::F32, OpShapes::TINY, 2, None).unwrap();
        let rows = &report.ops;
        let ops: Vec<&str> = rows.iter().map(|r| r.op.as_str()).collect();
        for op in [
            "linear ffn up, burn default",
            "attention, burn default",
            "conv 3×3, burn default",
            "group norm + SiLU (VAE), burn's ops",
            "DiT block, whole (modulated)",
            "elementwise add",
        ] {
            assert!(ops.contains(&op), "{op} missing from {ops:?}");
        }
        // Off CUDA only burn's kernels run, here in f32: the same as the reference.
        assert_eq!(report.best_matmul, None);
        assert_eq!(report.best_attention, None);
        assert_eq!(report.best_conv, None);
        assert!(rows.iter().filter_map(|r| r.rel_diff).all(|d| d < 1e-5), "{rows:?}");
        let timed = rows.iter().filter(|r| !r.op.ends_with("(check only)"));
        assert!(timed.clone().count() >= 10);
        assert!(timed.into_iter().all(|r| r.ms > 0.0 && r.tflop_per_s.is_none_or(|t| t > 0.0)));
        // The padded-batch check runs everywhere (here: the CPU kernel per item).
        assert!(ops.contains(&"attention, batch of 2 padded, as the DiT (check only)"));
        assert!(table(&report).contains("| conv 3×3, burn default | [1, 8, 16, 16], 3×3 → 8 |"));
        assert!(OpShapes::named("huge").is_err());
        let attention_only = run::<CpuBackend>(&Default::default(), DType::F32, OpShapes::TINY, 1, Some("attention")).unwrap();
        assert!(attention_only.ops.iter().all(|r| r.op.starts_with("attention")), "{:?}", attention_only.ops);
        assert!(run::<CpuBackend>(&Default::default(), DType::F32, OpShapes::TINY, 1, Some("convs")).is_err());
    }
}
