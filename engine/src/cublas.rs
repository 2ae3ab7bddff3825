//! cuBLAS for the big matmuls on CUDA (`ZIMAGE_MATMUL=cublas`).
//!
//! Why: the fastest of cubek's matmul kernels runs the DiT's linear layers at
//! 256–293 TFLOP/s on an H200, a third of the card's measured 788, and those
//! layers are more than half of a 1024² DiT step (GPU runs 5 and 9). cuBLAS,
//! which PyTorch runs, is the library tuned for exactly these shapes.
//!
//! How: `libcublas` is loaded at run time by cudarc (the loader's usual
//! search, e.g. `LD_LIBRARY_PATH`; `ZIMAGE_CUBLAS_LIB` names the file when it
//! lies elsewhere, such as in a PyTorch install's `nvidia/cu13/lib`). Without
//! it, or for layouts cuBLAS cannot read, [`crate::cuda_kernels::matmul`]
//! returns `None` and the caller runs cubek's kernel or burn's op.
//!
//! Ordering: cubecl runs its kernels on a non-blocking stream of its own that
//! it does not expose, so a GEMM here first waits for that stream (a host
//! wait), runs on a stream of ours in the same (primary) context, and is waited
//! for before its result is handed back: two host waits per GEMM, tens of
//! microseconds each against the 0.5–1.3 ms of a 1024² linear layer.
//!
//! The layout planning ([`plan`]) is plain arithmetic, tested on the CPU
//! against a column-major GEMM written out in the tests; the calls into the
//! library exist only in `cuda` builds and are checked on a card by
//! `bench/gpu.sh` (the tiny image with `ZIMAGE_MATMUL=cublas`, and `zimage
//! bench-ops`, which times and checks every matmul kernel at full size).

/// The smallest product (multiply-adds, `M·N·K` times the batch) that goes
/// to cuBLAS: `ZIMAGE_CUBLAS_MIN_MACS`, default 2³⁴ ≈ 17 G, about 0.14 ms at
/// cubek's 250 TFLOP/s. Why: each cuBLAS GEMM drains cubecl's stream, and the
/// GPU then idles while the host queues the next kernels, about the cost of
/// one small op; a 1024² DiT linear layer (62–166 G) repays that many times
/// over, a 512² one (17–44 G) barely. Not yet measured on a card.
pub fn min_macs() -> usize {
    static MIN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    match MIN_OVERRIDE.load(std::sync::atomic::Ordering::Relaxed) {
        usize::MAX => *MIN.get_or_init(|| std::env::var("ZIMAGE_CUBLAS_MIN_MACS").ok().and_then(|v| v.parse().ok()).unwrap_or(1 << 34)),
        set => set,
    }
}

/// Set by [`set_min_macs`]; `usize::MAX`: as `ZIMAGE_CUBLAS_MIN_MACS` says.
static MIN_OVERRIDE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(usize::MAX);

/// Overrides [`min_macs`] for this process: `zimage bench-ops` times cuBLAS
/// itself at every size in its rows named `cublas`.
pub fn set_min_macs(macs: usize) {
    MIN_OVERRIDE.store(macs, std::sync::atomic::Ordering::Relaxed);
}

/// One operand as cuBLAS reads it: a column-major matrix in memory, used
/// transposed or not, `ld` elements between its columns and `batch_stride`
/// elements between the matrices of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Operand {
    /// cuBLAS's `op(X) = Xᵀ` (`CUBLAS_OP_T`) rather than `X`.
    pub transpose: bool,
    /// The leading dimension (`lda`/`ldb`).
    pub ld: usize,
    /// Elements from one item of the batch to the next (0: the same matrix for all).
    pub batch_stride: usize,
}

/// A row-major `C[M, N] = A[M, K] · B[K, N]` (each side a strided view) as
/// cuBLAS's column-major `Cᵀ = Bᵀ · Aᵀ`: `gemm(b_side.op, a_side.op, m = N,
/// n = M, k = K, rhs, lhs, C with ldc = N)`, `batch` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmPlan {
    /// cuBLAS's `m`: the columns of the row-major product (N).
    pub m: usize,
    /// cuBLAS's `n`: the rows of the row-major product (M).
    pub n: usize,
    /// The shared dimension (K).
    pub k: usize,
    /// cuBLAS's `A`: the right-hand side `[K, N]`, read as `Bᵀ` (N × K).
    pub rhs: Operand,
    /// cuBLAS's `B`: the left-hand side `[M, K]`, read as `Aᵀ` (K × M).
    pub lhs: Operand,
    /// Matrices in the batch (the leading dimensions folded into one).
    pub batch: usize,
}

/// How cuBLAS reads a row-major `[rows, cols]` matrix with element strides
/// `(row_stride, col_stride)` as the column-major `cols × rows` matrix (its
/// transpose): untransposed when its rows are contiguous, transposed when its
/// columns are. `None` when neither is (a broadcast or a gather-like view).
fn as_transposed(rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> Option<(bool, usize)> {
    // A dimension of size 1 takes any stride: the smallest legal `ld` then.
    if cols == 1 || col_stride == 1 {
        let ld = if rows == 1 { cols.max(1) } else { row_stride };
        if ld >= cols.max(1) {
            return Some((false, ld));
        }
    }
    if rows == 1 || row_stride == 1 {
        let ld = if cols == 1 { rows.max(1) } else { col_stride };
        if ld >= rows.max(1) {
            return Some((true, ld));
        }
    }
    None
}

/// The one stride that steps through the folded leading dimensions
/// (`shape[..D-2]`, row-major), or `None` when they do not fold into one.
fn batch_stride(shape: &[usize], strides: &[usize]) -> Option<usize> {
    let mut dims = shape.iter().zip(strides).filter(|(size, _)| **size > 1).rev();
    let Some((&inner_size, &inner_stride)) = dims.next() else {
        return Some(0);
    };
    let mut expected = inner_stride * inner_size;
    for (&size, &stride) in dims {
        if stride != expected {
            return None;
        }
        expected = stride * size;
    }
    Some(inner_stride)
}

/// The cuBLAS call for `lhs · rhs`, `lhs` `[.., M, K]` and `rhs` `[.., K,
/// N]` with the same leading dimensions, each given by its shape and element
/// strides; the output is a new contiguous `[.., M, N]`. `None` for layouts
/// cuBLAS cannot read (then another kernel runs) and for sizes past its
/// 32-bit arguments.
pub fn plan(lhs_shape: &[usize], lhs_strides: &[usize], rhs_shape: &[usize], rhs_strides: &[usize]) -> Option<GemmPlan> {
    let d = lhs_shape.len();
    if d < 2 || rhs_shape.len() != d || lhs_strides.len() != d || rhs_strides.len() != d {
        return None;
    }
    let (lead, [m, k]) = (&lhs_shape[..d - 2], [lhs_shape[d - 2], lhs_shape[d - 1]]);
    let n = rhs_shape[d - 1];
    if rhs_shape[..d - 2] != *lead || rhs_shape[d - 2] != k || m == 0 || n == 0 || k == 0 {
        return None;
    }
    let batch = lead.iter().product::<usize>();
    // rhs [K, N] read as its transpose (N × K): cuBLAS's A.
    let (rhs_t, rhs_ld) = as_transposed(k, n, rhs_strides[d - 2], rhs_strides[d - 1])?;
    // lhs [M, K] read as its transpose (K × M): cuBLAS's B.
    let (lhs_t, lhs_ld) = as_transposed(m, k, lhs_strides[d - 2], lhs_strides[d - 1])?;
    let plan = GemmPlan {
        m: n,
        n: m,
        k,
        rhs: Operand { transpose: rhs_t, ld: rhs_ld, batch_stride: batch_stride(lead, &rhs_strides[..d - 2])? },
        lhs: Operand { transpose: lhs_t, ld: lhs_ld, batch_stride: batch_stride(lead, &lhs_strides[..d - 2])? },
        batch,
    };
    let fits = |v: usize| v <= i32::MAX as usize;
    [plan.m, plan.n, plan.k, plan.rhs.ld, plan.lhs.ld, plan.batch].into_iter().all(fits).then_some(plan)
}

#[cfg(feature = "cuda")]
pub use imp::{available, gemm};

#[cfg(feature = "cuda")]
mod imp {
    use std::ffi::c_void;
    use std::sync::{Arc, Mutex, OnceLock};

    use burn::tensor::DType;
    use cudarc::cublas::{result, sys, CudaBlas};
    use cudarc::driver::{CudaContext, CudaStream};

    use super::{plan, GemmPlan};

    /// The library's handle on a stream of ours, for one device.
    struct Blas {
        ordinal: usize,
        stream: Arc<CudaStream>,
        blas: CudaBlas,
    }

    static BLAS: OnceLock<Result<Mutex<Blas>, String>> = OnceLock::new();

    /// `ZIMAGE_CUBLAS_LIB`: a library file loaded first, so that cudarc's
    /// search by name finds it already loaded (the dynamic loader matches by
    /// its soname).
    fn preload() -> Result<(), String> {
        let Some(path) = std::env::var_os("ZIMAGE_CUBLAS_LIB") else { return Ok(()) };
        let c_path = std::ffi::CString::new(path.as_encoded_bytes()).map_err(|_| "ZIMAGE_CUBLAS_LIB holds a NUL byte".to_string())?;
        // SAFETY: dlopen with a valid C string; the handle is kept for the process's life.
        let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if handle.is_null() {
            return Err(format!("ZIMAGE_CUBLAS_LIB={}: the library could not be loaded", path.to_string_lossy()));
        }
        Ok(())
    }

    fn open(ordinal: usize) -> Result<Mutex<Blas>, String> {
        preload()?;
        // SAFETY: only tries to load the library; nothing is called through it.
        if !unsafe { sys::is_culib_present() } {
            return Err("libcublas was not found (set LD_LIBRARY_PATH or ZIMAGE_CUBLAS_LIB)".into());
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| format!("CUDA device {ordinal}: {e:?}"))?;
        let stream = ctx.new_stream().map_err(|e| format!("a CUDA stream: {e:?}"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| format!("a cuBLAS handle: {e:?}"))?;
        Ok(Mutex::new(Blas { ordinal, stream, blas }))
    }

    fn blas(ordinal: usize) -> Result<&'static Mutex<Blas>, String> {
        let blas = BLAS.get_or_init(|| open(ordinal)).as_ref().map_err(Clone::clone)?;
        let held = blas.lock().map_err(|_| "cuBLAS was poisoned by an earlier panic".to_string())?.ordinal;
        if held != ordinal {
            return Err(format!("cuBLAS is set up for CUDA device {held}, not {ordinal}"));
        }
        Ok(blas)
    }

    /// Whether cuBLAS loads and opens on CUDA device `ordinal`, or why not.
    pub fn available(ordinal: usize) -> Result<(), String> {
        blas(ordinal).map(|_| ())
    }

    fn data_type(dtype: DType) -> Option<sys::cudaDataType> {
        Some(match dtype {
            DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
            DType::F16 => sys::cudaDataType::CUDA_R_16F,
            DType::F32 => sys::cudaDataType::CUDA_R_32F,
            _ => return None,
        })
    }

    type CudaFloat = <burn::backend::Cuda as burn::tensor::backend::BackendTypes>::FloatTensorPrimitive;

    /// `lhs · rhs` into a new contiguous tensor of `out_dtype` (f32
    /// accumulation; inputs bf16 or f16, both the same). Shapes as [`plan`].
    pub fn gemm(lhs: &CudaFloat, rhs: &CudaFloat, out_dtype: DType) -> Result<CudaFloat, String> {
        let (ls, rs) = (lhs.meta.shape(), rhs.meta.shape());
        let GemmPlan { m, n, k, rhs: a, lhs: b, batch } =
            plan(ls, lhs.meta.strides(), rs, rhs.meta.strides()).ok_or("a layout cuBLAS cannot read")?;
        if lhs.dtype != rhs.dtype || !matches!(lhs.dtype, DType::BF16 | DType::F16) {
            return Err(format!("inputs {:?} × {:?}", lhs.dtype, rhs.dtype));
        }
        let (in_type, out_type) = (data_type(lhs.dtype).ok_or("input dtype")?, data_type(out_dtype).ok_or("output dtype")?);
        let blas = blas(lhs.device.index)?;
        let mut out_dims = ls.to_vec();
        let last = out_dims.len() - 1;
        out_dims[last] = rs[last];
        let client = lhs.client.clone();
        // Compact rows, as `ldc = N` writes them: `empty_device_dtype` would
        // give CUDA's optimized layout, whose rows are padded to up to 512
        // bytes (see `cube_kernels`' `output`).
        let shape = burn::tensor::Shape::from(out_dims);
        let out = burn_cubecl::ops::numeric::empty_device_contiguous_dtype(client.clone(), lhs.device.clone(), shape, out_dtype);
        let resource = |t: &CudaFloat| client.get_resource(t.handle.clone()).map_err(|e| format!("a device pointer: {e:?}"));
        let (l, r, o) = (resource(lhs)?, resource(rhs)?, resource(&out)?);
        // Everything cubecl queued before has run: the inputs' kernels, and
        // (queued by taking the pointers above) the waits on other threads'
        // streams for buffers written there, such as uploaded weights.
        cubecl::future::block_on(client.sync()).map_err(|e| format!("waiting for the CUDA stream: {e:?}"))?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let guard = blas.lock().map_err(|_| "cuBLAS was poisoned by an earlier panic".to_string())?;
        // The handle belongs to the device's primary context, which cubecl
        // also runs in; this thread may not have made it current yet.
        guard.stream.context().bind_to_thread().map_err(|e| format!("the CUDA context: {e:?}"))?;
        let op = |t: bool| if t { sys::cublasOperation_t::CUBLAS_OP_T } else { sys::cublasOperation_t::CUBLAS_OP_N };
        let int = |v: usize| v as i32; // plan() keeps them within i32
        // SAFETY: the pointers are live device buffers of the shapes `plan`
        // read (held by `l`, `r`, `o` until the stream is waited for below);
        // alpha and beta are host f32, as CUBLAS_COMPUTE_32F takes them.
        unsafe {
            result::gemm_strided_batched_ex(
                *guard.blas.handle(),
                op(a.transpose),
                op(b.transpose),
                int(m),
                int(n),
                int(k),
                (&alpha as *const f32).cast::<c_void>(),
                r.resource().ptr as *const c_void,
                in_type,
                int(a.ld),
                a.batch_stride as i64,
                l.resource().ptr as *const c_void,
                in_type,
                int(b.ld),
                b.batch_stride as i64,
                (&beta as *const f32).cast::<c_void>(),
                o.resource().ptr as *mut c_void,
                out_type,
                int(m),
                (m * n) as i64,
                int(batch),
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| format!("cublasGemmStridedBatchedEx: {e:?}"))?;
        guard.stream.synchronize().map_err(|e| format!("waiting for cuBLAS: {e:?}"))?;
        drop((l, r, o));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// cuBLAS's column-major `C = op(A)·op(B)` over a batch, written out:
    /// what the library computes from the plan, element by element.
    fn column_major_gemm(p: &GemmPlan, a: &[f64], a_offset: usize, b: &[f64], b_offset: usize) -> Vec<f64> {
        let at = |x: &[f64], off: usize, o: &Operand, item: usize, row: usize, col: usize| {
            // op(X)[row, col]: X[row, col] or X[col, row], column-major with ld.
            let (r, c) = if o.transpose { (col, row) } else { (row, col) };
            x[off + item * o.batch_stride + r + c * o.ld]
        };
        let mut out = vec![0.0; p.batch * p.m * p.n];
        for item in 0..p.batch {
            for row in 0..p.m {
                for col in 0..p.n {
                    let sum = (0..p.k).map(|i| at(a, a_offset, &p.rhs, item, row, i) * at(b, b_offset, &p.lhs, item, i, col)).sum();
                    out[item * p.m * p.n + row + col * p.m] = sum;
                }
            }
        }
        out
    }

    /// A strided view into `storage` of the given shape: element at `offset + Σ index·stride`.
    fn element(storage: &[f64], offset: usize, strides: &[usize], index: &[usize]) -> f64 {
        storage[offset + index.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>()]
    }

    fn storage(len: usize, seed: u64) -> Vec<f64> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 33) % 17) as f64 - 8.0
            })
            .collect()
    }

    /// Row-major strides of a shape, with its dims in `order` (outermost first) in memory.
    fn strides_in_order(shape: &[usize], order: &[usize]) -> Vec<usize> {
        let mut strides = vec![0; shape.len()];
        let mut step = 1;
        for &dim in order.iter().rev() {
            strides[dim] = step;
            step *= shape[dim];
        }
        strides
    }

    /// Runs the planned GEMM on views of random storage and compares it with
    /// the row-major product computed index by index.
    fn check(lhs_shape: &[usize], lhs_strides: &[usize], rhs_shape: &[usize], rhs_strides: &[usize], offsets: (usize, usize)) {
        let plan = plan(lhs_shape, lhs_strides, rhs_shape, rhs_strides).expect("a layout cuBLAS reads");
        let span = |shape: &[usize], strides: &[usize], off: usize| off + shape.iter().zip(strides).map(|(d, s)| (d - 1) * s).sum::<usize>() + 1;
        let lhs = storage(span(lhs_shape, lhs_strides, offsets.0), 1);
        let rhs = storage(span(rhs_shape, rhs_strides, offsets.1), 2);
        let got = column_major_gemm(&plan, &rhs, offsets.1, &lhs, offsets.0);
        let d = lhs_shape.len();
        let (m, k, n) = (lhs_shape[d - 2], lhs_shape[d - 1], rhs_shape[d - 1]);
        let lead = &lhs_shape[..d - 2];
        let mut index = vec![0; d - 2];
        for item in 0..plan.batch {
            // The item's multi-index in the leading dims, row-major.
            let mut rest = item;
            for (i, size) in lead.iter().enumerate().rev() {
                index[i] = rest % size;
                rest /= size;
            }
            for row in 0..m {
                for col in 0..n {
                    let want: f64 = (0..k)
                        .map(|i| {
                            let li: Vec<usize> = index.iter().copied().chain([row, i]).collect();
                            let ri: Vec<usize> = index.iter().copied().chain([i, col]).collect();
                            element(&lhs, offsets.0, lhs_strides, &li) * element(&rhs, offsets.1, rhs_strides, &ri)
                        })
                        .sum();
                    // The output is row-major [.., M, N] = column-major N × M with ld N.
                    assert_eq!(got[item * m * n + row * n + col], want, "item {item}, [{row}, {col}] of {lhs_shape:?} × {rhs_shape:?}");
                }
            }
        }
    }

    #[test]
    fn contiguous_and_transposed_operands_give_the_row_major_product() {
        let (m, k, n) = (5, 7, 3);
        for lhs_order in [[0, 1], [1, 0]] {
            for rhs_order in [[0, 1], [1, 0]] {
                let (ls, rs) = ([m, k], [k, n]);
                check(&ls, &strides_in_order(&ls, &lhs_order), &rs, &strides_in_order(&rs, &rhs_order), (0, 0));
            }
        }
    }

    #[test]
    fn a_linear_layers_transposed_weight_view_is_read_transposed() {
        // x [rows, d_in] · Wᵀ, W stored [d_out, d_in]: the view [d_in, d_out] has strides (1, d_in).
        let (rows, d_in, d_out) = (4, 6, 9);
        let plan = plan(&[rows, d_in], &[d_in, 1], &[d_in, d_out], &[1, d_in]).unwrap();
        assert_eq!(plan.rhs, Operand { transpose: true, ld: d_in, batch_stride: 0 });
        assert_eq!(plan.lhs, Operand { transpose: false, ld: d_in, batch_stride: 0 });
        assert_eq!((plan.m, plan.n, plan.k, plan.batch), (d_out, rows, d_in, 1));
        check(&[rows, d_in], &[d_in, 1], &[d_in, d_out], &[1, d_in], (0, 0));
    }

    #[test]
    fn batched_views_as_attention_passes_them_fold_into_one_stride() {
        // q·kᵀ over [heads, S, D]: kᵀ a swapped view [heads, D, S] of k [heads, S, D].
        let (h, s, d) = (3, 5, 4);
        check(&[h, s, d], &[s * d, d, 1], &[h, d, s], &[s * d, 1, d], (0, 0));
        // A group of heads narrowed out of a larger batch: offsets, same strides.
        check(&[2, s, d], &[s * d, d, 1], &[2, d, s], &[s * d, 1, d], (s * d, s * d));
        // Two leading dims [B, H] that fold, and a second item whose heads sit further on.
        check(&[2, h, s, d], &[h * s * d, s * d, d, 1], &[2, h, d, s], &[h * s * d, s * d, 1, d], (0, 0));
        // v as the DiT's [B, S, H, D] → [B, H, S, D] view: rows strided by H·D.
        check(&[1, h, s, s], &[h * s * s, s * s, s, 1], &[1, h, s, d], &[s * h * d, d, h * d, 1], (0, 0));
    }

    #[test]
    fn size_one_dimensions_take_any_stride() {
        check(&[1, 6], &[999, 1], &[6, 4], &[4, 1], (0, 0));
        check(&[3, 6], &[6, 1], &[6, 1], &[1, 777], (0, 0));
        check(&[2, 1, 1, 5], &[5, 33, 5, 1], &[2, 1, 5, 2], &[10, 44, 2, 1], (0, 0));
    }

    #[test]
    fn layouts_cublas_cannot_read_are_refused() {
        // Leading dims that do not fold into one stride (a permuted batch).
        assert_eq!(plan(&[2, 3, 4, 5], &[20, 40, 5, 1], &[2, 3, 5, 6], &[90, 30, 6, 1]), None);
        // Neither rows nor columns contiguous.
        assert_eq!(plan(&[4, 5], &[10, 2], &[5, 6], &[6, 1]), None);
        // A broadcast row (stride 0) that overlaps itself.
        assert_eq!(plan(&[4, 5], &[0, 1], &[5, 6], &[6, 1]), None);
        // Mismatched shapes.
        assert_eq!(plan(&[4, 5], &[5, 1], &[6, 6], &[6, 1]), None);
        assert_eq!(plan(&[2, 4, 5], &[20, 5, 1], &[3, 5, 6], &[30, 6, 1]), None);
    }

    #[test]
    fn a_batch_shared_through_stride_zero_is_kept() {
        // The same rhs for every item (a broadcast batch): batch stride 0.
        let plan = plan(&[3, 4, 5], &[20, 5, 1], &[3, 5, 2], &[0, 2, 1]).unwrap();
        assert_eq!(plan.rhs.batch_stride, 0);
        check(&[3, 4, 5], &[20, 5, 1], &[3, 5, 2], &[0, 2, 1], (0, 0));
    }
}
