//! burn-cubecl kernels called with an explicit strategy on CUDA.
//!
//! Why: this build leaves burn's `autotune` feature off (GPU run 2 with it
//! ran past its time limit), and without it burn takes the most conservative
//! kernel for every op: attention materialises the `S × S` scores in several
//! separate kernels, and `conv2d` runs its direct kernel (GPU run 1: VAE
//! decode 78× slower than cuDNN, a DiT step 6×). The kernels autotune would
//! choose among are public in burn-cubecl and cubek; here the flash attention
//! (tensor-core tiles, f32 accumulation), the implicit-GEMM convolution and
//! the matmul strategy are picked by hand (measured with `zimage bench-ops`). Where a kernel refuses the shapes (or panics), the caller runs
//! burn's default op, so results never depend on these kernels applying.
//!
//! `ZIMAGE_CUDA_KERNELS=burn` keeps burn's defaults, for A/B benchmarks;
//! `ZIMAGE_KERNEL_NOTES=1` says on stderr which shapes a kernel refused.
//! Every function returns `None` off CUDA (and in builds without `cuda`,
//! where only the public functions below exist).

use burn::tensor::backend::Backend;
use burn::tensor::ops::ConvOptions;
use burn::tensor::Tensor;

/// Whether the hand-picked kernels are used (see the module doc).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("ZIMAGE_CUDA_KERNELS").map(|v| v != "burn").unwrap_or(true))
}

/// Planes (warps) per flash-attention cube: 2, 4 or 8, the candidates burn's
/// autotune times; `ZIMAGE_FLASH_PLANES` overrides the default.
pub fn flash_planes() -> u8 {
    static PLANES: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    *PLANES.get_or_init(|| {
        std::env::var("ZIMAGE_FLASH_PLANES").ok().and_then(|v| v.parse().ok()).filter(|p| [2, 4, 8].contains(p)).unwrap_or(4)
    })
}

/// Scaled dot-product attention (scale `1/√head_dim`, no mask) through the
/// flash kernel with `planes` planes per cube. `q`: `[B, H, S_q, D]`, `k`,
/// `v`: `[B, H, S_k, D]`; returns `[B, H, S_q, D]`, or `None` off CUDA or
/// where the kernel refuses. Never with a mask: cubek 0.2's attention with
/// one was wrong in GPU runs 4 and 5 (49 % and 82 % off f32 on a batch of
/// two, the mask as given and as a per-item broadcast over the heads); batch
/// padding goes through [`crate::nn::sdpa_padded`] instead.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn flash_attention<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    causal: bool,
    planes: u8,
) -> Option<Tensor<B, 4>> {
    if !enabled() {
        return None;
    }
    if composed_attention_on() && !causal {
        if let Some(kernel) = matmul_kernel() {
            if let Some(out) = composed_attention(q, k, v, kernel) {
                return Some(out);
            }
        }
    }
    #[cfg(feature = "cuda")]
    return imp::flash_attention(q, k, v, causal, planes);
    #[cfg(not(feature = "cuda"))]
    None
}

/// `conv2d` through the implicit-GEMM kernel (tensor cores) on CUDA, or as
/// GEMMs (on CUDA with `ZIMAGE_CONV=gemm`, on wgpu by default). `x`: `[B, C_in, H, W]`,
/// `weight`: `[C_out, C_in, kh, kw]`, `bias`: `[C_out]`; returns `[B, C_out,
/// H', W']`, or `None` on the CPU and where the kernels refuse.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn conv2d<B: Backend>(
    x: &Tensor<B, 4>,
    weight: &Tensor<B, 4>,
    bias: Option<&Tensor<B, 1>>,
    options: ConvOptions<2>,
) -> Option<Tensor<B, 4>> {
    if !enabled() {
        return None;
    }
    #[cfg(feature = "cuda")]
    if imp::on_cuda(x) {
        return imp::conv2d(x, weight, bias, options);
    }
    // Elsewhere (wgpu, where burn runs its direct convolution without
    // autotune) the GEMM form unless `ZIMAGE_CONV` names another; `None` on
    // the CPU, where the columns kernel does not run.
    if conv_setting().is_none_or(|v| v == "gemm") {
        return conv_as_gemm(x, weight, bias, &options);
    }
    None
}

/// [`conv3x3_as_gemm`] or [`conv1x1_as_gemm`] for the convolutions they
/// take (stride 1, no dilation or groups; 3×3 with padding 1, 1×1 without),
/// where the GPU kernels run; `None` for any other.
fn conv_as_gemm<B: Backend>(x: &Tensor<B, 4>, weight: &Tensor<B, 4>, bias: Option<&Tensor<B, 1>>, options: &ConvOptions<2>) -> Option<Tensor<B, 4>> {
    if options.stride != [1, 1] || options.dilation != [1, 1] || options.groups != 1 {
        return None;
    }
    match (weight.dims(), options.padding) {
        ([_, _, 3, 3], [1, 1]) => conv3x3_as_gemm(x, weight, bias, IM2COL_CHUNK_BYTES),
        ([_, _, 1, 1], [0, 0]) if crate::cube_kernels::runs_on(x) => Some(conv1x1_as_gemm(x, weight, bias)),
        _ => None,
    }
}

/// Whether `conv2d` on CUDA runs as GEMMs ([`conv3x3_as_gemm`], 1×1 as one
/// matmul) through the matmul kernel instead of cubek's implicit-GEMM
/// convolution: `ZIMAGE_CONV=gemm` (opt-in until a card has checked it).
/// Why: the implicit-GEMM kernel runs the VAE's 3×3 convolutions at 64–72
/// TFLOP/s on an H200 (GPU run 9), the TMA matmul the same FLOPs at 250–290.
/// On wgpu the GEMM form is the default (`ZIMAGE_CONV=direct` keeps burn's
/// direct kernel): see [`conv2d`].
pub fn conv_as_gemm_on() -> bool {
    conv_setting() == Some("gemm")
}

/// `ZIMAGE_CONV`, read once: `gemm`, or another word for the device's own
/// kernel (`implicit`, `direct`); `None` when unset.
fn conv_setting() -> Option<&'static str> {
    static SETTING: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    SETTING.get_or_init(|| std::env::var("ZIMAGE_CONV").ok().filter(|v| !v.is_empty())).as_deref()
}

/// The largest piece of neighbourhood columns [`conv3x3_as_gemm`] makes at
/// once: the columns are 9 times the input rows they cover.
pub const IM2COL_CHUNK_BYTES: usize = 128 << 20;

/// A 3×3 convolution with stride 1 and padding 1 as GEMMs: the input's
/// neighbourhoods as columns ([`crate::cube_kernels::im2col3x3`], a band of
/// rows at a time, at most `chunk_bytes` of columns), each times the weight
/// flattened to `[C_out, C_in·9]` through [`matmul_kernel`] (burn's matmul
/// where that does not run), then the bias. `x` `[B, C_in, H, W]`, `weight`
/// `[C_out, C_in, 3, 3]`, `bias` `[C_out]` → `[B, C_out, H, W]`; `None` where
/// the columns kernel does not run (off CUDA and wgpu).
pub fn conv3x3_as_gemm<B: Backend>(
    x: &Tensor<B, 4>,
    weight: &Tensor<B, 4>,
    bias: Option<&Tensor<B, 1>>,
    chunk_bytes: usize,
) -> Option<Tensor<B, 4>> {
    let [b, c, h, w] = x.dims();
    let [c_out, c_in, kh, kw] = weight.dims();
    if c_in != c || kh != 3 || kw != 3 || b * c * h * w == 0 || weight.dtype() != x.dtype() {
        return None;
    }
    let weights = weight.clone().reshape([c_out, c * 9]);
    let rows_per_chunk = (chunk_bytes / (c * 9 * w * x.dtype().size()).max(1)).clamp(1, h);
    let mut items = Vec::with_capacity(b);
    for item in 0..b {
        let x_item = if b == 1 { x.clone() } else { x.clone().narrow(0, item, 1) };
        let mut parts = Vec::with_capacity(h.div_ceil(rows_per_chunk));
        for row0 in (0..h).step_by(rows_per_chunk) {
            let columns = crate::cube_kernels::im2col3x3(&x_item, row0, rows_per_chunk.min(h - row0))?;
            parts.push(gemm(&weights, columns));
        }
        let y = if parts.len() == 1 { parts.remove(0) } else { Tensor::cat(parts, 1) };
        items.push(y.reshape([1, c_out, h, w]));
    }
    let y = if b == 1 { items.remove(0) } else { Tensor::cat(items, 0) };
    Some(match bias {
        Some(bias) => y + bias.clone().reshape([1, c_out, 1, 1]),
        None => y,
    })
}

/// A 1×1 convolution (stride 1, no padding) as one matmul per item:
/// `weight` `[C_out, C_in, 1, 1]` flattened times `x` `[B, C_in, H, W]` as `[C_in, H·W]`.
pub fn conv1x1_as_gemm<B: Backend>(x: &Tensor<B, 4>, weight: &Tensor<B, 4>, bias: Option<&Tensor<B, 1>>) -> Tensor<B, 4> {
    let [b, c, h, w] = x.dims();
    let c_out = weight.dims()[0];
    let weights = weight.clone().reshape([c_out, c]);
    let items: Vec<_> = (0..b).map(|i| gemm(&weights, x.clone().narrow(0, i, 1).reshape([c, h * w])).reshape([1, c_out, h, w])).collect();
    let y = Tensor::cat(items, 0);
    match bias {
        Some(bias) => y + bias.clone().reshape([1, c_out, 1, 1]),
        None => y,
    }
}

/// `lhs · rhs` through [`matmul_kernel`], or burn's matmul where it does not run.
fn gemm<B: Backend>(lhs: &Tensor<B, 2>, rhs: Tensor<B, 2>) -> Tensor<B, 2> {
    match matmul_kernel().and_then(|k| matmul(lhs, &rhs, k)) {
        Some(y) => y,
        None => lhs.clone().matmul(rhs),
    }
}

/// The matmul kernels [`matmul`] can run: cubek's tiled strategies as burn's
/// autotune lists them (`cmma`: CUDA's wmma tiles, `mma`: PTX mma;
/// `tma`: Hopper's bulk tensor copies), and `cublas`, NVIDIA's library where
/// it loads ([`crate::cublas`]).
pub const MATMUL_KERNELS: &[&str] = &[
    "cublas",
    "simple-cmma",
    "simple-mma",
    "simple-multirow-cmma",
    "simple-multirow-mma",
    "ordered-4-cmma",
    "ordered-8-cmma",
    "ordered-8-mma",
    "double-cmma",
    "double-mma",
    "double-specialized-cmma",
    "double-specialized-mma",
    "specialized-cmma",
    "specialized-mma",
    "simple-tma-cmma",
    "simple-tma-mma",
    "specialized-tma-cmma",
    "specialized-tma-mma",
];

/// The matmul kernel `Linear` runs on CUDA: `ZIMAGE_MATMUL` (one of
/// [`MATMUL_KERNELS`], or `burn` for burn's default `simple-cmma`), else
/// `specialized-tma-mma`, the fastest of all on an H200 in `zimage
/// bench-ops` (256–293 TFLOP/s vs 96–111 for burn's default). GPUs without
/// Hopper's bulk copies refuse it, and burn's default runs there.
pub fn matmul_kernel() -> Option<&'static str> {
    static KERNEL: std::sync::OnceLock<Option<&'static str>> = std::sync::OnceLock::new();
    *KERNEL.get_or_init(|| {
        let wanted = std::env::var("ZIMAGE_MATMUL").unwrap_or_else(|_| "specialized-tma-mma".into());
        MATMUL_KERNELS.iter().copied().find(|k| *k == wanted)
    })
}

/// `lhs · rhs` (`[.., M, K] × [.., K, N]` → `[.., M, N]`, the same leading
/// batch dimensions; either side may be a transposed view) through the named
/// kernel of [`MATMUL_KERNELS`], or `None` off CUDA or where it refuses.
pub fn matmul<B: Backend, const D: usize>(lhs: &Tensor<B, D>, rhs: &Tensor<B, D>, kernel: &str) -> Option<Tensor<B, D>> {
    matmul_to(lhs, rhs, kernel, lhs.dtype())
}

/// [`matmul`] written in `out` (f32 from half-precision inputs: the
/// attention scores, before their softmax).
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn matmul_to<B: Backend, const D: usize>(
    lhs: &Tensor<B, D>,
    rhs: &Tensor<B, D>,
    kernel: &str,
    out: burn::tensor::DType,
) -> Option<Tensor<B, D>> {
    if !enabled() {
        return None;
    }
    #[cfg(feature = "cuda")]
    return imp::matmul(lhs, rhs, kernel, out);
    #[cfg(not(feature = "cuda"))]
    None
}

/// Which of these kernels the runs on `device` use, in one line (for `zimage
/// bench`'s report: a benchmark's numbers mean little without it), or `None`
/// off CUDA. Says whether cuBLAS loaded when it is the matmul kernel.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn describe<B: Backend>(device: &B::Device) -> Option<String> {
    #[cfg(feature = "cuda")]
    return imp::describe::<B>(device);
    #[cfg(not(feature = "cuda"))]
    None
}

/// Whether cuBLAS loads and opens for `device` (a CUDA device); `false`
/// elsewhere. `zimage bench-ops` times it only then.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn cublas_loaded<B: Backend>(device: &B::Device) -> bool {
    #[cfg(feature = "cuda")]
    return imp::cublas_loaded::<B>(device);
    #[cfg(not(feature = "cuda"))]
    false
}

/// Whether attention runs as [`composed_attention`] instead of the flash
/// kernel on CUDA: `ZIMAGE_ATTENTION=composed` (off by default until a card
/// has checked the form below in a whole image).
pub fn composed_attention_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("ZIMAGE_ATTENTION").is_ok_and(|v| v == "composed"))
}

/// Attention as two batched matmuls through `kernel` around a softmax: the
/// scores in f32 (the matmul accumulates in f32 and writes it), the softmax
/// ([`crate::cube_kernels::softmax`]) from them to weights in the inputs'
/// dtype, the second matmul; burn's softmax where that kernel does not run.
/// A group of heads at a time (f32 scores of at most 1 GiB: the 1024² DiT's
/// 30 heads at once would be 2.1 GB). Why: cubek's flash kernel reaches
/// 36 TFLOP/s on Hopper, the TMA matmul 250–300.
///
/// GPU run 9 (H200) timed the form with bf16 scores at 3.6 ms against
/// flash's 7.6 at `[1, 30, 4224, 128]` (a 1024² DiT step 323 against 442 ms),
/// but 1.2·10⁻² off f32 against flash's 2.6·10⁻³: rounding the scores to
/// bf16 before the exponential. Its pieces, checked on that card: q·kᵀ
/// written in f32 3.0·10⁻⁷ off, the softmax from f32 scores to bf16 weights
/// 2.9·10⁻³, weights·v 3.6·10⁻³; run 8 (H100) timed f32 scores at 3.8 ms.
/// So the scores are f32 now; this form is still to be checked whole on a
/// card (`bench/gpu.sh` does, with the tiny image too). Shapes as
/// [`flash_attention`]; `None` off CUDA or where a matmul refuses.
pub fn composed_attention<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    kernel: &str,
) -> Option<Tensor<B, 4>> {
    use burn::tensor::DType;
    let [b, h, s_q, d] = q.dims();
    let ([_, _, s_k, _], d_v) = (k.dims(), v.dims()[3]);
    let (items, dtype, scale) = (b * h, q.dtype(), 1.0 / (d as f64).sqrt());
    let q3 = q.clone().reshape([items, s_q, d]);
    let k_t = k.clone().reshape([items, s_k, d]).swap_dims(1, 2);
    let v3 = v.clone().reshape([items, s_k, d_v]);
    let group = ((1usize << 30) / (s_q * s_k * 4).max(1)).clamp(1, items.max(1));
    let mut outs = Vec::with_capacity(items.div_ceil(group));
    for start in (0..items).step_by(group) {
        let len = group.min(items - start);
        let part = |t: &Tensor<B, 3>| if len == items { t.clone() } else { t.clone().narrow(0, start, len) };
        let scores = matmul_to(&part(&q3), &part(&k_t), kernel, DType::F32)?;
        let weights = crate::cube_kernels::softmax(&scores, scale, dtype)
            .unwrap_or_else(|| burn::tensor::activation::softmax(scores.clone() * scale, 2).cast(dtype));
        outs.push(matmul(&weights, &part(&v3), kernel)?);
    }
    Some(Tensor::cat(outs, 0).reshape([b, h, s_q, d_v]))
}

#[cfg(feature = "cuda")]
mod imp {
    use std::any::Any;
    use std::collections::BTreeSet;
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    use burn::tensor::backend::BackendTypes;
    use burn::tensor::{DType, TensorPrimitive};
    use burn::tensor::ops::AttentionModuleOptions;
    use burn_cubecl::kernel::attention::{AttentionStrategy, attention};
    use burn_cubecl::kernel::conv::{ConvStrategy, conv_forward};
    use burn::tensor::Shape;
    use burn_cubecl::ops::numeric::empty_device_dtype;
    use cubek::attention::routines::blackbox_accelerated::BlackboxAcceleratedStrategy;
    use cubek::matmul::components::tile::TileMatmulKind::{Cmma, Mma};
    use cubek::matmul::definition::{MatmulElems, MatmulGlobalElems};
    use cubek::matmul::launch::{Strategy, launch_ref};
    use cubek::matmul::routines::double_buffering::DoubleBufferingArgs;
    use cubek::matmul::routines::ordered_double_buffering::OrderedSelectionArgs;
    use cubek::matmul::routines::simple::SimpleArgs;
    use cubek::matmul::routines::BlueprintStrategy;
    use cubek::std::InputBinding;

    use super::*;

    type CudaFloat = <burn::backend::Cuda as BackendTypes>::FloatTensorPrimitive;

    /// The CUDA primitive behind `t`, or `None` when `B` is another backend.
    fn float<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Option<CudaFloat> {
        let TensorPrimitive::Float(p) = t.clone().into_primitive() else {
            return None;
        };
        let boxed: Box<dyn Any> = Box::new(p);
        boxed.downcast::<CudaFloat>().ok().map(|p| *p)
    }

    fn back<B: Backend, const D: usize>(p: CudaFloat) -> Tensor<B, D> {
        let boxed: Box<dyn Any> = Box::new(p);
        match boxed.downcast::<B::FloatTensorPrimitive>() {
            Ok(p) => Tensor::from_primitive(TensorPrimitive::Float(*p)),
            Err(_) => unreachable!("only called with a primitive taken from a tensor of B"),
        }
    }

    /// Runs `launch` unless it was refused before for the same `key` (shapes
    /// and settings). A refusal is remembered (and said on stderr with
    /// `ZIMAGE_KERNEL_NOTES`); a panic turns the kernel off for the rest of the
    /// process. Either way the caller then runs burn's op.
    fn guarded<E: std::fmt::Debug>(
        name: &str,
        state: &Refusals,
        key: String,
        launch: impl FnOnce() -> Result<CudaFloat, E>,
    ) -> Option<CudaFloat> {
        if state.off.load(Ordering::Relaxed) || state.keys.lock().is_ok_and(|k| k.contains(&key)) {
            return None;
        }
        let why = match catch_unwind(AssertUnwindSafe(launch)) {
            Ok(Ok(out)) => return Some(out),
            Ok(Err(e)) => format!("{e:?}"),
            Err(_) => {
                state.off.store(true, Ordering::Relaxed);
                "it panicked; off from now on".to_string()
            }
        };
        // Refusals are expected for some shapes (the text encoder's odd lengths):
        // said only on request, e.g. by bench/gpu.sh.
        if std::env::var_os("ZIMAGE_KERNEL_NOTES").is_some() {
            eprintln!("note: CUDA {name} kernel not used for {key} ({why}); burn's default runs instead");
        }
        if let Ok(mut keys) = state.keys.lock() {
            keys.insert(key);
        }
        None
    }

    /// What one kernel was refused for.
    struct Refusals {
        off: AtomicBool,
        keys: Mutex<BTreeSet<String>>,
    }

    impl Refusals {
        const fn new() -> Self {
            Self { off: AtomicBool::new(false), keys: Mutex::new(BTreeSet::new()) }
        }
    }

    /// Whether `t` is a CUDA tensor.
    pub fn on_cuda<B: Backend, const D: usize>(t: &Tensor<B, D>) -> bool {
        float(t).is_some()
    }

    /// cubek's kernel for what cuBLAS does not take (small products, refused
    /// layouts, no library): the engine's default.
    const CUBLAS_FALLBACK: &str = "specialized-tma-mma";

    pub fn cublas_loaded<B: Backend>(device: &B::Device) -> bool {
        float(&Tensor::<B, 1>::zeros([1], device)).is_some_and(|probe| crate::cublas::available(probe.device.index).is_ok())
    }

    pub fn describe<B: Backend>(device: &B::Device) -> Option<String> {
        let probe = float(&Tensor::<B, 1>::zeros([1], device))?;
        if !enabled() {
            return Some("burn's default kernels (ZIMAGE_CUDA_KERNELS=burn)".into());
        }
        let matmul = match matmul_kernel() {
            Some("cublas") => match crate::cublas::available(probe.device.index) {
                Ok(()) => "cublas (loaded)".to_string(),
                Err(why) => format!("{CUBLAS_FALLBACK} (cublas not usable: {why})"),
            },
            Some(kernel) => kernel.to_string(),
            None => "burn's default".to_string(),
        };
        let attention = if composed_attention_on() { "composed".to_string() } else { format!("flash, {} planes", flash_planes()) };
        let conv = match (conv_as_gemm_on(), std::env::var_os("ZIMAGE_GPU_FUSED_CUDA_ALL").is_some()) {
            (true, true) => "as GEMMs",
            // Its columns kernel is not yet verified on CUDA (cube_kernels' Op::verified_on_cuda).
            (true, false) => "implicit GEMM (ZIMAGE_CONV=gemm also needs ZIMAGE_GPU_FUSED_CUDA_ALL=1 until a card checks it)",
            _ => "implicit GEMM",
        };
        Some(format!("matmul {matmul}; attention {attention}; conv {conv} (half precision only; f32 runs burn's ops)"))
    }

    /// Only half-precision tensors: in f32 the tensor-core kernels would
    /// compute in tf32, and f32 on CUDA is the precision of parity checks.
    fn half<B: Backend, const D: usize>(t: &Tensor<B, D>) -> bool {
        matches!(t.dtype(), DType::BF16 | DType::F16)
    }

    pub fn flash_attention<B: Backend>(
        q: &Tensor<B, 4>,
        k: &Tensor<B, 4>,
        v: &Tensor<B, 4>,
        causal: bool,
        planes: u8,
    ) -> Option<Tensor<B, 4>> {
        static REFUSED: Refusals = Refusals::new();
        float(q)?;
        if !half(q) {
            return None;
        }
        let batch = q.dims()[0];
        if batch > 1 {
            // cubek's global layout flattens (batch, head) into one index
            // times the head stride: right within one item whatever the
            // strides, wrong across the items of a view. One call per item.
            let item = |t: &Tensor<B, 4>, i: usize| t.clone().narrow(0, i, 1);
            let outs = (0..batch)
                .map(|i| flash_attention(&item(q, i), &item(k, i), &item(v, i), causal, planes))
                .collect::<Option<Vec<_>>>()?;
            return Some(Tensor::cat(outs, 0));
        }
        let key = format!("q {:?} k {:?} causal {causal} planes {planes}", q.dims(), k.dims());
        // cubek's accelerated attention computes its tiles in f16 and reads
        // the query without a cast, so it takes f16 only. The attention
        // inputs are safe in f16 (q, k RMS-normalised, v from a normalised
        // input), unlike the FFN activations (spec §2.7); softmax and the
        // output accumulate in f32.
        // The casts run inside the launch: shapes refused before cost nothing.
        let dtype = q.dtype();
        let f16 = |t: &Tensor<B, 4>| float(&t.clone().cast(DType::F16)).ok_or("not a CUDA tensor");
        let options = AttentionModuleOptions { scale: None, softcap: None, is_causal: causal };
        let strategy =
            AttentionStrategy::FlashBlackboxAccelerated(BlackboxAcceleratedStrategy { num_planes: planes, seq_q: 1, seq_kv: 1 });
        let launch = || {
            let (qc, kc, vc) = (f16(q)?, f16(k)?, f16(v)?);
            attention(qc, kc, vc, None, None, options, strategy).map_err(|e| format!("{e:?}"))
        };
        guarded("flash attention", &REFUSED, key, launch).map(|out| back::<B, 4>(out).cast(dtype))
    }

    pub fn conv2d<B: Backend>(
        x: &Tensor<B, 4>,
        weight: &Tensor<B, 4>,
        bias: Option<&Tensor<B, 1>>,
        options: ConvOptions<2>,
    ) -> Option<Tensor<B, 4>> {
        static REFUSED: Refusals = Refusals::new();
        let (xc, weight_c) = (float(x)?, float(weight)?);
        if !half(x) {
            return None;
        }
        let key = format!("x {:?} weight {:?} {options:?}", x.dims(), weight.dims());
        if conv_as_gemm_on() {
            if let Some(y) = super::conv_as_gemm(x, weight, bias, &options) {
                return Some(y);
            }
        }
        let bias = match bias {
            Some(b) => Some(float(b)?),
            None => None,
        };
        guarded("implicit-GEMM conv", &REFUSED, key, || conv_forward::<_, 2>(xc, weight_c, bias, options, ConvStrategy::ImplicitGemm))
            .map(back)
    }

    /// The cubek strategy behind a name of [`MATMUL_KERNELS`].
    fn strategy(name: &str) -> Option<Strategy> {
        let simple = |multi_rows, tile_matmul| BlueprintStrategy::Inferred(SimpleArgs { multi_rows, tile_matmul });
        let ordered = |row_count, tile_matmul| {
            BlueprintStrategy::Inferred(OrderedSelectionArgs {
                partition_k: Some(2),
                row_count: Some(row_count),
                rows_per_plane: Some(2),
                tile_matmul,
            })
        };
        let double = |specialized, tile_matmul| BlueprintStrategy::Inferred(DoubleBufferingArgs { specialized, tile_matmul });
        Some(match name {
            "simple-cmma" => Strategy::SimpleCyclicCmma(simple(false, Cmma)),
            "simple-mma" => Strategy::SimpleCyclicMma(simple(false, Mma)),
            "simple-multirow-cmma" => Strategy::SimpleCyclicCmma(simple(true, Cmma)),
            "simple-multirow-mma" => Strategy::SimpleCyclicMma(simple(true, Mma)),
            "ordered-4-cmma" => Strategy::OrderedDoubleCmma(ordered(4, Cmma)),
            "ordered-8-cmma" => Strategy::OrderedDoubleCmma(ordered(8, Cmma)),
            "ordered-8-mma" => Strategy::OrderedDoubleMma(ordered(8, Mma)),
            "double-cmma" => Strategy::DoubleCyclicCmma(double(false, Cmma)),
            "double-mma" => Strategy::DoubleCyclicMma(double(false, Mma)),
            "double-specialized-cmma" => Strategy::DoubleCyclicCmma(double(true, Cmma)),
            "double-specialized-mma" => Strategy::DoubleCyclicMma(double(true, Mma)),
            "specialized-cmma" => Strategy::SpecializedCyclicCmma(BlueprintStrategy::Inferred(().into())),
            "specialized-mma" => Strategy::SpecializedCyclicMma(BlueprintStrategy::Inferred(().into())),
            "simple-tma-cmma" => {
                Strategy::SimpleTmaCmma(BlueprintStrategy::Inferred(SimpleArgs { multi_rows: false, tile_matmul: Cmma }))
            }
            "simple-tma-mma" => {
                Strategy::SimpleTmaMma(BlueprintStrategy::Inferred(SimpleArgs { multi_rows: false, tile_matmul: Mma }))
            }
            "specialized-tma-cmma" => Strategy::SpecializedTmaCmma(BlueprintStrategy::Inferred(().into())),
            "specialized-tma-mma" => Strategy::SpecializedTmaMma(BlueprintStrategy::Inferred(().into())),
            _ => return None,
        })
    }

    pub fn matmul<B: Backend, const D: usize>(
        lhs: &Tensor<B, D>,
        rhs: &Tensor<B, D>,
        kernel: &str,
        out_dtype: DType,
    ) -> Option<Tensor<B, D>> {
        // A panic in the f32-output variant must not turn off the Linear layers' kernel.
        static REFUSED: Refusals = Refusals::new();
        static REFUSED_WIDENING: Refusals = Refusals::new();
        let (l, r) = (float(lhs)?, float(rhs)?);
        let (ld, rd) = (lhs.dims(), rhs.dims());
        if !half(lhs) || lhs.dtype() != rhs.dtype() || ld[..D - 2] != rd[..D - 2] || ld[D - 1] != rd[D - 2] {
            return None;
        }
        if !matches!(out_dtype, DType::F32 | DType::BF16 | DType::F16) {
            return None;
        }
        let kernel = if kernel == "cublas" {
            // Small products stay on cubek's kernel: a cuBLAS GEMM costs two
            // host waits, which only large ones repay (see crate::cublas); so
            // do those cuBLAS refuses, or all when it does not load.
            let macs = ld[..D - 1].iter().product::<usize>() * ld[D - 1] * rd[D - 1];
            if macs >= crate::cublas::min_macs() {
                static REFUSED_CUBLAS: Refusals = Refusals::new();
                let key = format!("cublas {ld:?} × {rd:?} → {out_dtype:?}");
                if let Some(out) = guarded("cuBLAS matmul", &REFUSED_CUBLAS, key, || crate::cublas::gemm(&l, &r, out_dtype)) {
                    return Some(back(out));
                }
            }
            CUBLAS_FALLBACK
        } else {
            kernel
        };
        let strategy = strategy(kernel)?;
        let mut out_dims = ld;
        out_dims[D - 1] = rd[D - 1];
        let key = format!("{kernel} {ld:?} × {rd:?} → {out_dtype:?}");
        let state = if out_dtype == lhs.dtype() { &REFUSED } else { &REFUSED_WIDENING };
        guarded("matmul", state, key, || {
            let dtype = l.dtype;
            let client = l.client.clone();
            let out = empty_device_dtype(client.clone(), l.device.clone(), Shape::new(out_dims), out_dtype);
            let mut dtypes =
                MatmulElems::from_globals(&MatmulGlobalElems { lhs: dtype.into(), rhs: dtype.into(), out: out_dtype.into() });
            let (l, r) = (InputBinding::new(l.binding(), dtype.into()), InputBinding::new(r.binding(), dtype.into()));
            launch_ref(&strategy, &client, l, r, out.clone().binding(), &mut dtypes).map(|()| out)
        })
        .map(back)
    }
}
