//! The DiT's elementwise chains as single GPU kernels, written once in CubeCL
//! (they run on CUDA and on wgpu).
//!
//! Why: on a GPU burn runs every tensor op as its own kernel (this build has
//! no `fusion`), so an RMSNorm in bf16 with f32 statistics was ~10 kernels
//! over the whole activation (cast, square, mean, add, sqrt, recip, multiply,
//! cast, weight, modulation), RoPE ~10 more, and together with SwiGLU's gate
//! they were an estimated 120 ms of a 543-ms 1024² DiT step on the H200 (GPU
//! run 5). Each kernel here reads its inputs once and writes once, computes
//! in f32 and rounds once to the tensor's dtype. The attention softmax is
//! here too, for attention as two matmuls around it ([`crate::cuda_kernels`]),
//! and the VAE's GroupNorm as two (its statistics, band by band, and the
//! per-channel affine with SiLU) instead of burn's dozen passes in f32.
//!
//! Measured on an H100 (GPU run 6): a 512² DiT step 174 → 125 ms, a 1024²
//! block 17.6 → 13.7 ms. On CUDA only the kernels whose results were
//! checked right on a card run (`Op::verified_on_cuda`): since GPU run 9
//! (H200, session 22) that is all of them; the SiLU gate and the softmax
//! writing bf16 had been wrong on CUDA (runs 6–8) because their outputs had
//! CUDA's padded rows (fixed in session 13, see `imp::output`).
//!
//! Every function returns `None` off CUDA/wgpu (and for shapes it does not
//! take), and the caller runs the composed ops; `ZIMAGE_GPU_FUSED=0` turns
//! them off for A/B runs.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

/// Set by [`set_enabled`]: 0 = as `ZIMAGE_GPU_FUSED` says, 1 = on, 2 = off.
static OVERRIDE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Whether the kernels are used (see the module doc).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    match OVERRIDE.load(std::sync::atomic::Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => *ON.get_or_init(|| std::env::var("ZIMAGE_GPU_FUSED").map(|v| v != "0").unwrap_or(true)),
    }
}

/// Whether the kernel `name` (`rms_norm`, `rope`, `silu_mul`, `softmax`,
/// `group_norm` for both of the VAE's, `im2col`) is
/// used: [`enabled`], and not listed in `ZIMAGE_GPU_FUSED_OFF` (comma-separated,
/// to find which one a wrong result comes from).
fn kernel_on(name: &str) -> bool {
    static OFF: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    enabled()
        && !OFF
            .get_or_init(|| std::env::var("ZIMAGE_GPU_FUSED_OFF").map(|v| v.split(',').map(|s| s.trim().to_string()).collect()).unwrap_or_default())
            .iter()
            .any(|off| off == name)
}

/// Turns the kernels on or off for this process (`zimage bench-ops` times
/// a DiT block both ways).
pub fn set_enabled(on: bool) {
    OVERRIDE.store(if on { 1 } else { 2 }, std::sync::atomic::Ordering::Relaxed);
}

/// RMSNorm over the last dimension times `weight` (`[N]`), and with `scale`
/// (`[B, N]`, `x` `[B, S, N]`) times the item's scale: `x · rsqrt(mean(x²) +
/// eps) · weight (· scale)`, statistics in f32.
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(unused_variables))]
pub fn rms_norm<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    weight: &Tensor<B, 1>,
    eps: f64,
    scale: Option<&Tensor<B, 2>>,
) -> Option<Tensor<B, D>> {
    let n = x.dims()[D - 1];
    if !kernel_on("rms_norm") || weight.dims() != [n] || weight.dtype() != x.dtype() {
        return None;
    }
    if let Some(scale) = scale {
        if D != 3 || scale.dims() != [x.dims()[0], n] || scale.dtype() != x.dtype() {
            return None;
        }
    }
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        let rows_per_item = if D == 3 { x.dims()[1] } else { 1 };
        let mut inputs = vec![imp::prim(x), imp::prim(weight)];
        inputs.extend(scale.map(imp::prim));
        return imp::dispatch::<B, D>(inputs, imp::Op::RmsNorm { n, rows_per_item, eps, scaled: scale.is_some(), residual: false });
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    None
}

/// `x + rms_norm(y) · weight (· gate)`: the DiT's sandwich norm closing a
/// branch, `gate` `[B, N]` per item (`x`, `y` `[B, S, N]`).
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(unused_variables))]
pub fn residual_rms_norm<B: Backend>(
    x: &Tensor<B, 3>,
    y: &Tensor<B, 3>,
    weight: &Tensor<B, 1>,
    eps: f64,
    gate: Option<&Tensor<B, 2>>,
) -> Option<Tensor<B, 3>> {
    let [b, s, n] = y.dims();
    if !kernel_on("rms_norm") || x.dims() != y.dims() || weight.dims() != [n] || x.dtype() != y.dtype() || weight.dtype() != y.dtype() {
        return None;
    }
    if gate.is_some_and(|g| g.dims() != [b, n] || g.dtype() != y.dtype()) {
        return None;
    }
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        // Input order: the normalised tensor, weight, (gate), residual.
        let mut inputs = vec![imp::prim(y), imp::prim(weight)];
        inputs.extend(gate.map(imp::prim));
        inputs.push(imp::prim(x));
        return imp::dispatch::<B, 3>(inputs, imp::Op::RmsNorm { n, rows_per_item: s, eps, scaled: gate.is_some(), residual: true });
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    None
}

/// Rotates the interleaved pairs `(x[2m], x[2m+1])` of `x` `[B, S, H, D]` by
/// the angles whose `cos`, `sin` are `[B, S, 1, D/2]` (f32), in f32.
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(unused_variables))]
pub fn rope_interleaved<B: Backend>(x: &Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Option<Tensor<B, 4>> {
    let [b, s, h, d] = x.dims();
    if !kernel_on("rope") || d % 2 != 0 || cos.dims() != [b, s, 1, d / 2] || sin.dims() != cos.dims() {
        return None;
    }
    if cos.dtype() != DType::F32 || sin.dtype() != DType::F32 {
        return None;
    }
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    return imp::dispatch::<B, 4>(vec![imp::prim(x), imp::prim(cos), imp::prim(sin)], imp::Op::Rope { heads: h, half: d / 2 });
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    None
}

/// SwiGLU's gate `silu(gate) ⊙ up` (same shapes), in f32.
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(unused_variables))]
pub fn silu_mul<B: Backend, const D: usize>(gate: &Tensor<B, D>, up: &Tensor<B, D>) -> Option<Tensor<B, D>> {
    if !kernel_on("silu_mul") || gate.dims() != up.dims() || gate.dtype() != up.dtype() {
        return None;
    }
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    return imp::dispatch::<B, D>(vec![imp::prim(gate), imp::prim(up)], imp::Op::SiluMul);
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    None
}

/// Softmax over the last dimension of `scores · scale`, written in `dtype`
/// (statistics in f32; `scores` in any float dtype).
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(unused_variables))]
pub fn softmax<B: Backend, const D: usize>(scores: &Tensor<B, D>, scale: f64, dtype: DType) -> Option<Tensor<B, D>> {
    if !kernel_on("softmax") {
        return None;
    }
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    return imp::dispatch::<B, D>(
        vec![imp::prim(scores)],
        imp::Op::Softmax { n: scores.dims()[D - 1], scale, dtype },
    );
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    None
}

/// Per (item, group) sums of `x − centre` (with `squared`, of its square)
/// over `x` `[B, C, H, W]`, whose groups are `C / groups` consecutive
/// channels: `[B·groups]` in f32 (`centres` `[B·groups]`, f32). The VAE's
/// GroupNorm statistics, band by band: two passes (the mean, then the squared
/// deviations from it) as the composed ops, each one read of the band.
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(unused_variables))]
pub fn group_sums<B: Backend>(x: &Tensor<B, 4>, groups: usize, centres: &Tensor<B, 1>, squared: bool) -> Option<Tensor<B, 1>> {
    let [b, c, h, w] = x.dims();
    let sets = b * groups;
    if !kernel_on("group_norm") || groups == 0 || c % groups != 0 || b * c * h * w == 0 {
        return None;
    }
    if centres.dims() != [sets] || centres.dtype() != DType::F32 {
        return None;
    }
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        // One partial sum per chunk of a group (a group at 1024² is millions
        // of values: one cube each would leave most of a GPU idle).
        let partial = imp::dispatch::<B, 1>(vec![imp::prim(x), imp::prim(centres)], imp::Op::GroupSums { groups, squared })?;
        let chunks = partial.dims()[0] / sets;
        return Some(partial.reshape([sets, chunks]).sum_dim(1).reshape([sets]));
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    None
}

/// `x · scale + shift` on each (item, channel) plane of `x` `[B, C, H, W]`,
/// then SiLU when `silu` (`scale`, `shift` `[B·C, 1]` in f32, as
/// `vae::GroupNorm::band_affine` gives them), in f32, written in `x`'s dtype.
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(unused_variables))]
pub fn plane_affine<B: Backend>(x: &Tensor<B, 4>, scale: &Tensor<B, 2>, shift: &Tensor<B, 2>, silu: bool) -> Option<Tensor<B, 4>> {
    let [b, c, h, w] = x.dims();
    if !kernel_on("group_norm") || scale.dims() != [b * c, 1] || shift.dims() != [b * c, 1] || h * w == 0 {
        return None;
    }
    if scale.dtype() != DType::F32 || shift.dtype() != DType::F32 {
        return None;
    }
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    return imp::dispatch::<B, 4>(vec![imp::prim(x), imp::prim(scale), imp::prim(shift)], imp::Op::PlaneAffine { plane: h * w, silu });
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    None
}

/// Whether `x` lives where these kernels run (a CUDA or wgpu tensor) and
/// they are on: what the GEMM convolution's 1×1 case asks before it runs.
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(unused_variables))]
pub fn runs_on<B: Backend, const D: usize>(x: &Tensor<B, D>) -> bool {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    return kernel_on("im2col") && imp::on_gpu(&imp::prim(x));
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    false
}

/// The 3×3 neighbourhoods (padding 1) of output rows `row0 .. row0 + rows`
/// of `x` `[1, C, H, W]`, one column per pixel: `[C·9, rows·W]`, row `c·9 +
/// ky·3 + kx` holding `x[c, y + ky − 1, x + kx − 1]` (0 outside), the order of
/// a `[C_out, C, 3, 3]` weight flattened to `[C_out, C·9]`. The first half of
/// a convolution as one GEMM ([`crate::cuda_kernels::conv3x3_as_gemm`]).
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(unused_variables))]
pub fn im2col3x3<B: Backend>(x: &Tensor<B, 4>, row0: usize, rows: usize) -> Option<Tensor<B, 2>> {
    let [b, c, h, w] = x.dims();
    if !kernel_on("im2col") || b != 1 || rows == 0 || row0 + rows > h || c * 9 * rows * w > u32::MAX as usize {
        return None;
    }
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    return imp::dispatch::<B, 2>(vec![imp::prim(x)], imp::Op::Im2col3x3 { row0, rows });
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    None
}

/// The distance between consecutive rows (last-dimension runs) of a
/// tensor whose rows are each contiguous and follow one another at a
/// fixed pitch (≥ the row length), as a compact tensor's or a padded
/// allocation's; `None` for any other layout.
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
fn row_pitch(shape: &[usize], strides: &[usize]) -> Option<usize> {
    let d = shape.len();
    let n = *shape.last()?;
    if n > 1 && strides[d - 1] != 1 {
        return None;
    }
    // Leading dimensions of size 1 may have any stride; the others must step
    // over whole rows, the innermost of them by the pitch.
    let lead: Vec<(usize, usize)> = shape[..d - 1].iter().zip(&strides[..d - 1]).filter(|(size, _)| **size > 1).map(|(&a, &b)| (a, b)).collect();
    let Some(&(_, pitch)) = lead.last() else { return Some(n) };
    if pitch < n {
        return None;
    }
    let mut expected = pitch;
    for &(size, stride) in lead.iter().rev() {
        if stride != expected {
            return None;
        }
        expected *= size;
    }
    Some(pitch)
}


#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod imp {
    use std::any::Any;
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::sync::atomic::{AtomicBool, Ordering};

    use burn::tensor::backend::Backend;
    use burn::tensor::{DType, Tensor as BurnTensor, TensorPrimitive};
    use burn_cubecl::CubeRuntime;
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
    use burn_cubecl::tensor::CubeTensor;

    use super::row_pitch;
    use cubecl::prelude::*;
    use cubecl::{CubeCount, CubeDim, calculate_cube_count_elemwise};

    /// What to launch, with its sizes.
    #[derive(Debug, Clone, Copy)]
    pub enum Op {
        /// Inputs: x, weight, (scale or gate when `scaled`), (residual when `residual`).
        RmsNorm { n: usize, rows_per_item: usize, eps: f64, scaled: bool, residual: bool },
        /// Inputs: x, cos, sin.
        Rope { heads: usize, half: usize },
        /// Inputs: gate, up.
        SiluMul,
        /// Inputs: scores (in `input`), written in `dtype`.
        Softmax { n: usize, scale: f64, dtype: DType },
        /// Inputs: x `[B, C, H, W]`, centres `[B·groups]` (f32).
        GroupSums { groups: usize, squared: bool },
        /// Inputs: x `[B, C, H, W]`, scale and shift `[B·C, 1]` (f32); `plane` = H·W.
        PlaneAffine { plane: usize, silu: bool },
        /// Inputs: x `[1, C, H, W]`; output rows `row0 .. row0 + rows`.
        Im2col3x3 { row0: usize, rows: usize },
    }

    impl Op {
        /// Whether the kernel's results were right on a CUDA card. GPU runs
        /// 6–8 (H100): RMSNorm and RoPE were (the tiny fixture's image within
        /// 1 level of the CPU's in f32 with them on); the SiLU gate and the
        /// softmax writing bf16 were not, though right on wgpu. Session 13
        /// found why from cubecl's source: their outputs were allocated in
        /// CUDA's padded-row layout (see [`output`]); they are compact now.
        /// GPU run 9 (H200) confirmed the fix and the VAE's GroupNorm kernels:
        /// the tiny image with every kernel on is within 1 level of the CPU's
        /// in f32, and `bench-ops` finds each within 10⁻² of f32 at the
        /// full-size shapes. A kernel added later starts as `false` here
        /// until a card has checked it (`ZIMAGE_GPU_FUSED_CUDA_ALL=1`, used by
        /// `bench/gpu_check.sh` and `bench/gpu.sh`, turns it on).
        #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
        pub fn verified_on_cuda(&self) -> bool {
            match self {
                Op::RmsNorm { .. }
                | Op::Rope { .. }
                | Op::Softmax { .. }
                | Op::SiluMul
                | Op::GroupSums { .. }
                | Op::PlaneAffine { .. } => true,
                // Session 23, checked on wgpu only so far.
                Op::Im2col3x3 { .. } => false,
            }
        }
    }

    /// Whether `p` is a CUDA or wgpu tensor.
    pub fn on_gpu<P: Clone + 'static>(p: &P) -> bool {
        let any: &dyn Any = p;
        #[cfg(feature = "cuda")]
        if any.is::<CubeTensor<cubecl::cuda::CudaRuntime>>() {
            return true;
        }
        #[cfg(feature = "wgpu")]
        if any.is::<CubeTensor<cubecl::wgpu::WgpuRuntime>>() {
            return true;
        }
        let _ = any;
        false
    }

    pub fn prim<B: Backend, const D: usize>(t: &BurnTensor<B, D>) -> B::FloatTensorPrimitive {
        t.clone().into_primitive().tensor()
    }

    /// Runs `op` on the runtime behind `B` (CUDA or wgpu), or `None` for
    /// other backends.
    pub fn dispatch<B: Backend, const D: usize>(inputs: Vec<B::FloatTensorPrimitive>, op: Op) -> Option<BurnTensor<B, D>> {
        #[cfg(feature = "cuda")]
        if op.verified_on_cuda() || std::env::var_os("ZIMAGE_GPU_FUSED_CUDA_ALL").is_some() {
            if let Some(out) = on_runtime::<B, cubecl::cuda::CudaRuntime, D>(&inputs, op) {
                return Some(out);
            }
        }
        #[cfg(feature = "wgpu")]
        if let Some(out) = on_runtime::<B, cubecl::wgpu::WgpuRuntime, D>(&inputs, op) {
            return Some(out);
        }
        None
    }

    fn on_runtime<B: Backend, R: CubeRuntime, const D: usize>(inputs: &[B::FloatTensorPrimitive], op: Op) -> Option<BurnTensor<B, D>> {
        let cubes = inputs
            .iter()
            .enumerate()
            .map(|(k, p)| {
                let boxed: Box<dyn Any> = Box::new(p.clone());
                let t = *boxed.downcast::<CubeTensor<R>>().ok()?;
                // The softmax reads its scores at a row pitch (a matmul's
                // output, padded rows on CUDA: copying them would be another
                // pass over the largest tensor of the attention); every other
                // input is read as compact rows.
                let pitched_ok = matches!(op, Op::Softmax { .. }) && k == 0;
                Some(if pitched_ok && row_pitch(t.meta.shape(), t.meta.strides()).is_some() { t } else { into_contiguous(t) })
            })
            .collect::<Option<Vec<_>>>()?;
        // A launch that panics on this thread (cubecl checking the arguments)
        // turns the kernels off for the rest of the process and the composed
        // ops run. A kernel that fails to *compile* panics on the device's
        // server thread instead (seen on wgpu while writing these), which
        // this cannot catch: its output is then garbage, which is why every
        // kernel is checked on a backend before it is allowed there
        // (`Op::verified_on_cuda`, the wgpu tests).
        static BROKEN: AtomicBool = AtomicBool::new(false);
        if BROKEN.load(Ordering::Relaxed) {
            return None;
        }
        let out = match catch_unwind(AssertUnwindSafe(|| launch(cubes, op))) {
            Ok(out) => out?,
            Err(_) => {
                BROKEN.store(true, Ordering::Relaxed);
                eprintln!("note: a fused GPU kernel ({op:?}) failed; the composed ops run from now on");
                return None;
            }
        };
        let boxed: Box<dyn Any> = Box::new(out);
        let out = boxed.downcast::<B::FloatTensorPrimitive>().ok()?;
        Some(BurnTensor::from_primitive(TensorPrimitive::Float(*out)))
    }

    /// A kernel's output, always compact rows. Not `empty_device_dtype`:
    /// that asks the runtime for its *optimized* layout, and CUDA's
    /// (cubecl's `PitchedMemoryLayoutPolicy`) pads every row to a multiple
    /// of min(next power of two of its bytes, 512) bytes, so that a
    /// `[.., 85]` f32 or `[.., 4224]` bf16 tensor has its rows 512 or 8,704
    /// bytes apart, while these kernels write row `r` at `r · n`. wgpu
    /// allocates compactly, which is why the SiLU gate (the tiny DiT's
    /// hidden width 85) and the softmax writing bf16 (4,224 keys) were
    /// right on wgpu and wrong on the H100 (GPU runs 7–8), and why RMSNorm
    /// and RoPE (widths of 32 and 16 f32, 3,840 and 128 bf16: multiples of
    /// their alignment) were right on both.
    fn output<R: CubeRuntime>(like: &CubeTensor<R>, shape: burn::tensor::Shape, dtype: DType) -> CubeTensor<R> {
        empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), shape, dtype)
    }

    /// Threads per cube for a row of `n`: a power of two (the block
    /// reductions halve it), at most 256.
    fn row_block(n: usize) -> u32 {
        (n.next_power_of_two() as u32).clamp(32, 256)
    }

    /// One cube per row of `n` (`block` units, see [`row_block`]) over `rows` rows.
    fn per_row<R: CubeRuntime>(client: &cubecl::client::ComputeClient<R>, rows: usize, n: usize) -> (CubeCount, CubeDim, u32) {
        let block = row_block(n);
        (cubecl::server::CubeCountSelection::new(client, rows as u32).cube_count(), CubeDim::new_1d(block), block)
    }

    /// One unit per element of `units`.
    fn per_unit<R: CubeRuntime>(client: &cubecl::client::ComputeClient<R>, units: usize) -> (CubeCount, CubeDim) {
        let dim = CubeDim::new(client, units);
        (calculate_cube_count_elemwise(client, units, dim), dim)
    }

    fn launch<R: CubeRuntime>(mut t: Vec<CubeTensor<R>>, op: Op) -> Option<CubeTensor<R>> {
        let x = t.first()?.clone();
        let client = x.client.clone();
        let shape = x.meta.shape().clone();
        let numel = shape.num_elements();
        let dtype = x.dtype;
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return None;
        }
        match op {
            Op::RmsNorm { n, rows_per_item, eps, scaled, residual } => {
                let rows = numel / n;
                let out = output(&x, shape, dtype);
                let weight = t.get(1)?.clone();
                // Unused inputs are bound to `x` (never read: comptime flags).
                let scale = if scaled { t.get(2)?.clone() } else { x.clone() };
                let res = if residual { t.pop()? } else { x.clone() };
                let (count, dim, block) = per_row(&client, rows, n);
                rms_norm_kernel::launch::<R>(
                    &client,
                    count,
                    dim,
                    x.into_tensor_arg(),
                    weight.into_tensor_arg(),
                    scale.into_tensor_arg(),
                    res.into_tensor_arg(),
                    out.clone().into_tensor_arg(),
                    rows as u32,
                    n as u32,
                    rows_per_item.max(1) as u32,
                    eps as f32,
                    block,
                    scaled,
                    residual,
                    dtype.into(),
                );
                Some(out)
            }
            Op::Rope { heads, half } => {
                let (cos, sin) = (t.get(1)?.clone(), t.get(2)?.clone());
                let out = output(&x, shape, dtype);
                let pairs = numel / 2;
                let (count, dim) = per_unit(&client, pairs);
                rope_kernel::launch::<R>(
                    &client,
                    count,
                    dim,
                    x.into_tensor_arg(),
                    cos.into_tensor_arg(),
                    sin.into_tensor_arg(),
                    out.clone().into_tensor_arg(),
                    pairs as u32,
                    heads as u32,
                    half as u32,
                    dtype.into(),
                );
                Some(out)
            }
            Op::SiluMul => {
                let up = t.get(1)?.clone();
                let out = output(&x, shape, dtype);
                let (count, dim) = per_unit(&client, numel);
                silu_mul_kernel::launch::<R>(
                    &client,
                    count,
                    dim,
                    x.into_tensor_arg(),
                    up.into_tensor_arg(),
                    out.clone().into_tensor_arg(),
                    numel as u32,
                    dtype.into(),
                );
                Some(out)
            }
            Op::GroupSums { groups, squared } => {
                let centres = t.get(1)?.clone();
                let sets = shape[0] * groups;
                let len = numel / sets;
                let chunks = len.div_ceil(GROUP_CHUNK);
                let total = sets * chunks;
                let out = output(&x, burn::tensor::Shape::new([total]), DType::F32);
                let (count, dim, block) = per_row(&client, total, GROUP_CHUNK.min(len));
                group_sums_kernel::launch::<R>(
                    &client,
                    count,
                    dim,
                    x.into_tensor_arg(),
                    centres.into_tensor_arg(),
                    out.clone().into_tensor_arg(),
                    total as u32,
                    len as u32,
                    chunks as u32,
                    block,
                    squared,
                    dtype.into(),
                );
                Some(out)
            }
            Op::PlaneAffine { plane, silu } => {
                let (scale, shift) = (t.get(1)?.clone(), t.get(2)?.clone());
                let out = output(&x, shape, dtype);
                let (count, dim) = per_unit(&client, numel);
                plane_affine_kernel::launch::<R>(
                    &client,
                    count,
                    dim,
                    x.into_tensor_arg(),
                    scale.into_tensor_arg(),
                    shift.into_tensor_arg(),
                    out.clone().into_tensor_arg(),
                    numel as u32,
                    plane as u32,
                    silu,
                    dtype.into(),
                );
                Some(out)
            }
            Op::Im2col3x3 { row0, rows } => {
                let (c, h, w) = (shape[1], shape[2], shape[3]);
                let total = c * 9 * rows * w;
                let out = output(&x, burn::tensor::Shape::new([c * 9, rows * w]), dtype);
                let (count, dim) = per_unit(&client, total);
                im2col3x3_kernel::launch::<R>(
                    &client,
                    count,
                    dim,
                    x.into_tensor_arg(),
                    out.clone().into_tensor_arg(),
                    total as u32,
                    h as u32,
                    w as u32,
                    row0 as u32,
                    rows as u32,
                    dtype.into(),
                );
                Some(out)
            }
            Op::Softmax { n, scale, dtype: out_dtype, .. } => {
                if !matches!(out_dtype, DType::F32 | DType::F16 | DType::BF16) {
                    return None;
                }
                let rows = numel / n;
                let pitch = row_pitch(x.meta.shape(), x.meta.strides())?;
                let out = output(&x, shape, out_dtype);
                let (count, dim, block) = per_row(&client, rows, n);
                softmax_kernel::launch::<R>(
                    &client,
                    count,
                    dim,
                    x.into_tensor_arg(),
                    out.clone().into_tensor_arg(),
                    rows as u32,
                    n as u32,
                    pitch as u32,
                    scale as f32,
                    block,
                    [dtype.into(), out_dtype.into()],
                );
                Some(out)
            }
        }
    }

    /// The sum (or with `max`, the maximum) of every unit's `value` over the
    /// cube (`block` units, a power of two), returned to all units.
    #[cube]
    fn cube_reduce(value: f32, #[comptime] block: u32, #[comptime] max: bool) -> f32 {
        let mut shared = SharedMemory::<f32>::new(block as usize);
        let unit = UNIT_POS_X as usize;
        shared[unit] = value;
        sync_cube();
        // A runtime variable (the comptime `block` cannot be halved in a loop).
        let mut stride = CUBE_DIM_X as usize / 2;
        while stride > 0 {
            if unit < stride {
                if max {
                    shared[unit] = f32::max(shared[unit], shared[unit + stride]);
                } else {
                    shared[unit] = shared[unit] + shared[unit + stride];
                }
            }
            sync_cube();
            stride /= 2;
        }
        let total = shared[0];
        sync_cube();
        total
    }

    /// One cube per row of `n`: `out = x · rsqrt(mean(x²) + eps) · weight`,
    /// times `scale[item]` when `scaled`, plus `residual` when `residual`.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_kernel<E: Float>(
        x: &Tensor<E>,
        weight: &Tensor<E>,
        scale: &Tensor<E>,
        residual_in: &Tensor<E>,
        out: &mut Tensor<E>,
        rows: u32,
        n: u32,
        rows_per_item: u32,
        eps: f32,
        #[comptime] block: u32,
        #[comptime] scaled: bool,
        #[comptime] residual: bool,
        #[define(E)] _dtype: StorageType,
    ) {
        let row = CUBE_POS;
        if row >= rows as usize {
            terminate!();
        }
        let n = n as usize;
        let base = row * n;
        let step = block as usize;
        let mut sum = f32::new(0.0);
        let mut i = UNIT_POS_X as usize;
        while i < n {
            let v = f32::cast_from(x[base + i]);
            sum += v * v;
            i += step;
        }
        let total = cube_reduce(sum, block, false);
        let inv = f32::recip(f32::sqrt(total / f32::cast_from(n as u32) + eps));
        let item_base = (row / rows_per_item as usize) * n;
        let mut i = UNIT_POS_X as usize;
        while i < n {
            let mut y = f32::cast_from(x[base + i]) * inv * f32::cast_from(weight[i]);
            if scaled {
                y *= f32::cast_from(scale[item_base + i]);
            }
            if residual {
                y += f32::cast_from(residual_in[base + i]);
            }
            out[base + i] = E::cast_from(y);
            i += step;
        }
    }

    /// One unit per pair `p` of `x` `[B·S·H, D]`: token `p / (H·D/2)`, angle
    /// `p % (D/2)` of that token's row of `cos`, `sin`.
    #[cube(launch)]
    fn rope_kernel<E: Float>(
        x: &Tensor<E>,
        cos: &Tensor<f32>,
        sin: &Tensor<f32>,
        out: &mut Tensor<E>,
        pairs: u32,
        heads: u32,
        half: u32,
        #[define(E)] _dtype: StorageType,
    ) {
        let p = ABSOLUTE_POS;
        if p >= pairs as usize {
            terminate!();
        }
        let half = half as usize;
        let angle = (p / (half * heads as usize)) * half + p % half;
        let c = cos[angle];
        let s = sin[angle];
        let x0 = f32::cast_from(x[2 * p]);
        let x1 = f32::cast_from(x[2 * p + 1]);
        out[2 * p] = E::cast_from(x0 * c - x1 * s);
        out[2 * p + 1] = E::cast_from(x0 * s + x1 * c);
    }

    /// `silu(g) = g · σ(g)` with `σ` from `exp(−|g|)` (never overflows).
    #[cube]
    fn silu_stable(g: f32) -> f32 {
        let e = f32::exp(f32::new(0.0) - f32::abs(g));
        let r = f32::recip(f32::new(1.0) + e);
        let sigma = select(g >= f32::new(0.0), r, e * r);
        g * sigma
    }

    #[cube(launch)]
    fn silu_mul_kernel<E: Float>(gate: &Tensor<E>, up: &Tensor<E>, out: &mut Tensor<E>, len: u32, #[define(E)] _dtype: StorageType) {
        let i = ABSOLUTE_POS;
        if i >= len as usize {
            terminate!();
        }
        out[i] = E::cast_from(silu_stable(f32::cast_from(gate[i])) * f32::cast_from(up[i]));
    }

    /// Values of a group one cube sums (256 units, 64 values each).
    const GROUP_CHUNK: usize = 16384;

    /// One cube per chunk of [`GROUP_CHUNK`] values of a group (`len` values
    /// from `group · len`): the sum of `x − centre` (or its square).
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    fn group_sums_kernel<E: Float>(
        x: &Tensor<E>,
        centres: &Tensor<f32>,
        out: &mut Tensor<f32>,
        total: u32,
        len: u32,
        chunks: u32,
        #[comptime] block: u32,
        #[comptime] squared: bool,
        #[define(E)] _dtype: StorageType,
    ) {
        let id = CUBE_POS;
        if id >= total as usize {
            terminate!();
        }
        let (len, chunks) = (len as usize, chunks as usize);
        let group = id / chunks;
        let start = group * len + (id % chunks) * GROUP_CHUNK;
        let end = usize::min(start + GROUP_CHUNK, (group + 1) * len);
        let centre = centres[group];
        let mut acc = f32::new(0.0);
        let mut i = start + UNIT_POS_X as usize;
        while i < end {
            let v = f32::cast_from(x[i]) - centre;
            if squared {
                acc += v * v;
            } else {
                acc += v;
            }
            i += block as usize;
        }
        let sum = cube_reduce(acc, block, false);
        if UNIT_POS_X == 0 {
            out[id] = sum;
        }
    }

    /// One unit per element: `x · scale[plane] + shift[plane]`, then SiLU.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    fn plane_affine_kernel<E: Float>(
        x: &Tensor<E>,
        scale: &Tensor<f32>,
        shift: &Tensor<f32>,
        out: &mut Tensor<E>,
        len: u32,
        plane: u32,
        #[comptime] silu: bool,
        #[define(E)] _dtype: StorageType,
    ) {
        let i = ABSOLUTE_POS;
        if i >= len as usize {
            terminate!();
        }
        let p = i / plane as usize;
        let mut y = f32::cast_from(x[i]) * scale[p] + shift[p];
        if silu {
            y = silu_stable(y);
        }
        out[i] = E::cast_from(y);
    }

    /// One unit per element of `out` `[C·9, rows·W]` (see [`super::im2col3x3`]),
    /// consecutive units along a row of pixels, so that reads and writes coalesce.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    fn im2col3x3_kernel<E: Float>(
        x: &Tensor<E>,
        out: &mut Tensor<E>,
        total: u32,
        h: u32,
        w: u32,
        row0: u32,
        rows: u32,
        #[define(E)] _dtype: StorageType,
    ) {
        let i = ABSOLUTE_POS;
        if i >= total as usize {
            terminate!();
        }
        let (h, w) = (h as usize, w as usize);
        let pixels = rows as usize * w;
        let (pixel, k) = (i % pixels, i / pixels);
        let (c, ky, kx) = (k / 9, (k % 9) / 3, k % 3);
        // One past the source row and column (padding 1): unsigned all the way.
        let y1 = row0 as usize + pixel / w + ky;
        let x1 = pixel % w + kx;
        let mut v = E::cast_from(0.0f32);
        if y1 >= 1 && y1 <= h && x1 >= 1 && x1 <= w {
            v = x[(c * h + y1 - 1) * w + x1 - 1];
        }
        out[i] = v;
    }

    /// One cube per row of `n`: `out = softmax(scores · scale)`, the rows of
    /// `scores` `pitch` apart (see [`row_pitch`]), those of `out` compact.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    fn softmax_kernel<E: Float, O: Float>(
        scores: &Tensor<E>,
        out: &mut Tensor<O>,
        rows: u32,
        n: u32,
        pitch: u32,
        scale: f32,
        #[comptime] block: u32,
        #[define(E, O)] _dtypes: [StorageType; 2],
    ) {
        let row = CUBE_POS;
        if row >= rows as usize {
            terminate!();
        }
        let n = n as usize;
        let (base, read) = (row * n, row * pitch as usize);
        let step = block as usize;
        let mut largest = f32::new(-3.0e38);
        let mut i = UNIT_POS_X as usize;
        while i < n {
            largest = f32::max(largest, f32::cast_from(scores[read + i]));
            i += step;
        }
        let largest = cube_reduce(largest, block, true);
        let mut sum = f32::new(0.0);
        let mut i = UNIT_POS_X as usize;
        while i < n {
            sum += f32::exp((f32::cast_from(scores[read + i]) - largest) * scale);
            i += step;
        }
        let inv = f32::recip(cube_reduce(sum, block, false));
        let mut i = UNIT_POS_X as usize;
        while i < n {
            out[base + i] = O::cast_from(f32::exp((f32::cast_from(scores[read + i]) - largest) * scale) * inv);
            i += step;
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Distribution, Tensor};

    use super::*;

    fn random<B: Backend, const D: usize>(dims: [usize; D], device: &B::Device) -> Tensor<B, D> {
        Tensor::random(dims, Distribution::Normal(0.0, 1.0), device)
    }

    #[test]
    fn row_pitch_reads_compact_and_padded_rows_and_nothing_else() {
        // Compact, and CUDA's padded allocation of a [2, 3, 85] f32 tensor (rows of 128).
        assert_eq!(row_pitch(&[2, 3, 85], &[255, 85, 1]), Some(85));
        assert_eq!(row_pitch(&[2, 3, 85], &[384, 128, 1]), Some(128));
        // A narrowed last dimension is a pitch too; size-1 dimensions may have any stride.
        assert_eq!(row_pitch(&[4, 600], &[640, 1]), Some(640));
        assert_eq!(row_pitch(&[1, 4, 600], &[7, 640, 1]), Some(640));
        assert_eq!(row_pitch(&[5], &[1]), Some(5));
        // Transposed, strided columns, or leading dimensions not compact over the rows.
        assert_eq!(row_pitch(&[3, 4], &[1, 3]), None);
        assert_eq!(row_pitch(&[3, 4], &[8, 2]), None);
        assert_eq!(row_pitch(&[2, 3, 4], &[16, 4, 1]), None);
        assert_eq!(row_pitch(&[3, 4], &[2, 1]), None);
        // Overlapping rows behind a size-1 dimension: items 3 apart, rows of 5.
        assert_eq!(row_pitch(&[2, 1, 5], &[3, 3, 1]), None);
    }

    /// The kernels run on CUDA and wgpu only: on the CPU every caller gets
    /// `None` and runs its own ops.
    #[test]
    fn declined_on_the_cpu() {
        type B = crate::device::CpuBackend;
        let device = Default::default();
        let x = random::<B, 3>([2, 5, 8], &device);
        let w = random::<B, 1>([8], &device);
        let s = random::<B, 2>([2, 8], &device);
        assert!(rms_norm(&x, &w, 1e-6, Some(&s)).is_none());
        assert!(residual_rms_norm(&x, &x, &w, 1e-6, None).is_none());
        assert!(silu_mul(&x, &x).is_none());
        assert!(softmax(&x, 1.0, DType::F32).is_none());
        let image = random::<B, 4>([1, 2, 4, 4], &device);
        assert!(im2col3x3(&image, 0, 4).is_none());
        assert!(crate::cuda_kernels::conv3x3_as_gemm(&image, &random::<B, 4>([3, 2, 3, 3], &device), None, 1 << 20).is_none());
    }

    /// `a` equals `b` within f32 rounding of kernels that sum in another order.
    #[cfg(feature = "wgpu")]
    fn assert_close<const D: usize>(a: Tensor<crate::device::WgpuBackend, D>, b: Tensor<crate::device::WgpuBackend, D>, what: &str) {
        assert_eq!(a.dims(), b.dims(), "{what}");
        let diff: f32 = (a - b.clone()).abs().max().into_scalar();
        let scale: f32 = b.abs().max().into_scalar();
        assert!(diff <= 1e-5 * scale.max(1.0), "{what}: max diff {diff} (scale {scale})");
    }

    /// The convolution as GEMMs (the neighbourhood columns, then a matmul)
    /// against burn's conv2d on wgpu (f32): odd sizes, channels that change,
    /// pieces of one row, of several rows (the last partial) and whole, a
    /// batch of two, and a strided input; 1×1 as one matmul.
    #[cfg(feature = "wgpu")]
    #[test]
    fn convolutions_as_gemms_match_burns_conv_on_wgpu() {
        use burn::tensor::module::conv2d;
        use burn::tensor::ops::ConvOptions;
        type B = crate::device::WgpuBackend;
        let device = Default::default();
        let close = assert_close::<4>;
        for ([b, c, h, w], c_out) in [([1, 3, 5, 7], 4), ([2, 8, 9, 33], 5), ([1, 1, 1, 1], 2)] {
            let x = random::<B, 4>([b, c, h, w], &device);
            let weight = random::<B, 4>([c_out, c, 3, 3], &device);
            let bias = random::<B, 1>([c_out], &device);
            let expected = conv2d(x.clone(), weight.clone(), Some(bias.clone()), ConvOptions::new([1, 1], [1, 1], [1, 1], 1));
            let row_bytes = c * 9 * w * 4;
            for chunk in [1, row_bytes, 2 * row_bytes, usize::MAX / 2] {
                let got = crate::cuda_kernels::conv3x3_as_gemm(&x, &weight, Some(&bias), chunk).expect("runs on wgpu");
                close(got, expected.clone(), &format!("3×3 {:?}, chunks of {chunk} bytes", [b, c, h, w]));
            }
            let no_bias = conv2d(x.clone(), weight.clone(), None, ConvOptions::new([1, 1], [1, 1], [1, 1], 1));
            close(crate::cuda_kernels::conv3x3_as_gemm(&x, &weight, None, 1 << 20).unwrap(), no_bias, "no bias");
            let weight1 = random::<B, 4>([c_out, c, 1, 1], &device);
            let expected1 = conv2d(x.clone(), weight1.clone(), Some(bias.clone()), ConvOptions::new([1, 1], [0, 0], [1, 1], 1));
            close(crate::cuda_kernels::conv1x1_as_gemm(&x, &weight1, Some(&bias)), expected1, "1×1");
        }
        // A strided input (channels and rows swapped in memory) is read as its values.
        let x = random::<B, 4>([1, 6, 4, 5], &device).swap_dims(1, 2);
        let weight = random::<B, 4>([3, 4, 3, 3], &device);
        let expected = conv2d(x.clone(), weight.clone(), None, ConvOptions::new([1, 1], [1, 1], [1, 1], 1));
        close(crate::cuda_kernels::conv3x3_as_gemm(&x, &weight, None, 1 << 20).unwrap(), expected, "strided input");
        // Declined where it cannot apply: a weight that is not 3×3, channels that differ.
        assert!(crate::cuda_kernels::conv3x3_as_gemm(&x, &random::<B, 4>([3, 4, 1, 1], &device), None, 1 << 20).is_none());
        assert!(crate::cuda_kernels::conv3x3_as_gemm(&x, &random::<B, 4>([3, 5, 3, 3], &device), None, 1 << 20).is_none());
    }

    /// Each kernel against the composed formula on the wgpu backend (f32;
    /// on this project's machines Mesa's software Vulkan): the same code the
    /// CUDA build runs in bf16. Sizes cover rows longer and shorter than a
    /// cube (256 units) and counts that are not a multiple of it.
    #[cfg(feature = "wgpu")]
    #[test]
    fn kernels_match_the_composed_ops_on_wgpu() {
        use burn::tensor::activation::{silu, softmax as softmax_composed};
        type B = crate::device::WgpuBackend;
        let device = Default::default();
        let close = assert_close::<3>;
        for (b, s, n) in [(2, 7, 600), (1, 33, 96), (2, 3, 5)] {
            let x = random::<B, 3>([b, s, n], &device);
            let y = random::<B, 3>([b, s, n], &device);
            let w = random::<B, 1>([n], &device);
            let scale = random::<B, 2>([b, n], &device);
            let eps = 1e-6;
            let norm = |t: Tensor<B, 3>| t.clone() * (t.square().mean_dim(2) + eps).sqrt().recip() * w.clone().reshape([1, 1, n]);
            close(rms_norm(&x, &w, eps, None).unwrap(), norm(x.clone()), "rms_norm");
            close(rms_norm(&x, &w, eps, Some(&scale)).unwrap(), norm(x.clone()) * scale.clone().unsqueeze_dim(1), "scaled");
            close(residual_rms_norm(&x, &y, &w, eps, None).unwrap(), x.clone() + norm(y.clone()), "residual");
            close(
                residual_rms_norm(&x, &y, &w, eps, Some(&scale)).unwrap(),
                x.clone() + norm(y.clone()) * scale.clone().unsqueeze_dim(1),
                "gated residual",
            );
            close(silu_mul(&x, &y).unwrap(), silu(x.clone()) * y.clone(), "silu_mul");
            close(softmax(&(x.clone() * 5.0), 0.3, DType::F32).unwrap(), softmax_composed(x.clone() * 1.5, 2), "softmax");
        }
        // RoPE: pairs (x0, x1) of [B, S, H, D] rotated by the token's angles.
        let (b, s, h, d) = (2, 9, 3, 8);
        let x = random::<B, 4>([b, s, h, d], &device);
        let angles = random::<B, 4>([b, s, 1, d / 2], &device);
        let (cos, sin) = (angles.clone().cos(), angles.sin());
        let pairs = x.clone().reshape([b, s, h, d / 2, 2]);
        let x0 = pairs.clone().narrow(4, 0, 1).squeeze_dim::<4>(4);
        let x1 = pairs.narrow(4, 1, 1).squeeze_dim::<4>(4);
        let y0 = x0.clone() * cos.clone() - x1.clone() * sin.clone();
        let y1 = x0 * sin.clone() + x1 * cos.clone();
        let expected = Tensor::stack::<5>(vec![y0, y1], 4).reshape([b * s, h, d]);
        close(rope_interleaved(&x, &cos, &sin).unwrap().reshape([b * s, h, d]), expected, "rope");
        // A strided input (a transposed view) is made contiguous first.
        let n = 40;
        let xt = random::<B, 3>([2, n, 7], &device).swap_dims(1, 2);
        let w = random::<B, 1>([n], &device);
        let expected = xt.clone() * (xt.clone().square().mean_dim(2) + 1e-6).sqrt().recip() * w.clone().reshape([1, 1, n]);
        close(rms_norm(&xt, &w, 1e-6, None).unwrap(), expected, "strided rms_norm");
        // GroupNorm's pieces, groups of one chunk and of several (the last partial).
        for (dims, groups) in [([2, 8, 9, 33], 4), ([1, 4, 128, 160], 2)] {
            let [b, c, h, w] = dims;
            let len = (c / groups) * h * w;
            let x = random::<B, 4>(dims, &device) * 2.0 + 0.5;
            let centres = random::<B, 1>([b * groups], &device);
            let deviations = x.clone().reshape([b, groups, len]) - centres.clone().reshape([b, groups, 1]);
            let sums = |t: Tensor<B, 3>| t.sum_dim(2).reshape([1, 1, b * groups]);
            let as3 = |t: Tensor<B, 1>| t.reshape([1, 1, b * groups]);
            close(as3(group_sums(&x, groups, &centres, false).unwrap()), sums(deviations.clone()), "group sums");
            close(as3(group_sums(&x, groups, &centres, true).unwrap()), sums(deviations.square()), "group sums of squares");
            let (scale, shift) = (random::<B, 2>([b * c, 1], &device), random::<B, 2>([b * c, 1], &device));
            let affine = (x.clone().reshape([b * c, h * w]) * scale.clone() + shift.clone()).reshape([b, c * h, w]);
            let as3 = |t: Tensor<B, 4>| t.reshape([b, c * h, w]);
            close(as3(plane_affine(&x, &scale, &shift, false).unwrap()), affine.clone(), "plane affine");
            close(as3(plane_affine(&x, &scale, &shift, true).unwrap()), silu(affine), "plane affine + silu");
        }
        // Rows at a pitch (a narrowed last dimension, as CUDA's padded rows):
        // the softmax reads them in place, the other kernels after a compact copy.
        let wide = random::<B, 3>([2, 7, 640], &device);
        let w = random::<B, 1>([600], &device);
        for start in [0, 40] {
            let x = wide.clone().narrow(2, start, 600);
            let view = x.clone().into_primitive().tensor();
            assert_eq!(row_pitch(view.meta.shape(), view.meta.strides()), Some(640), "a view, not a copy");
            let s = softmax_composed(x.clone() * 0.3, 2);
            close(softmax(&x, 0.3, DType::F32).unwrap(), s, "softmax of pitched rows");
            close(silu_mul(&x, &x).unwrap(), silu(x.clone()) * x.clone(), "silu_mul of pitched rows");
            let expected = x.clone() * (x.clone().square().mean_dim(2) + 1e-6).sqrt().recip() * w.clone().reshape([1, 1, 600]);
            close(rms_norm(&x, &w, 1e-6, None).unwrap(), expected, "rms_norm of pitched rows");
        }
    }
}
