//! Fused CPU kernels for the elementwise chains around the matmuls.
//!
//! Why: on burn's `flex` backend every tensor op is its own pass over memory
//! with its own freshly allocated output, and ops on tensors below flex's
//! parallel threshold (256 K elements) run on one core. An RMSNorm was seven
//! such passes, a RoPE eight plus strided copies; `perf` of a `medium` DiT
//! step put those passes, their allocations and page faults next to the
//! matmuls. Each function here does one pass, split over rayon's threads.
//!
//! They are used only where the backend *is* flex and the tensors are f32
//! (the CPU path): CUDA, wgpu and the autodiff backend used for training run
//! the composed burn ops unchanged. The arithmetic is the composed ops', in
//! the same order, so where no reduction is involved the results are equal
//! to the last bit (tested against the composed code in `nn.rs` / `dit.rs`).
//! `ZIMAGE_FUSED=0` turns them off (to measure what they bring).

pub mod grad;

use std::any::{Any, TypeId};
use std::sync::OnceLock;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;
use rayon::prelude::*;

/// Elements per rayon task: below this, splitting costs more than it saves.
const TASK_ELEMENTS: usize = 16 * 1024;

/// Whether the fused kernels replace the composed ops for tensors of this
/// backend and dtype.
pub fn enabled<B: Backend>(dtype: DType) -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    dtype == DType::F32
        && TypeId::of::<B::FloatTensorPrimitive>() == TypeId::of::<FlexTensor>()
        && *ON.get_or_init(|| std::env::var("ZIMAGE_FUSED").map(|v| v != "0").unwrap_or(true))
}

/// Whether tensors of `B` live on flex, directly or under autodiff (training).
///
/// Why it matters to the composed ops: flex's binary ops have SIMD paths for
/// same-shape operands and for a right-hand side broadcast over all leading
/// or all trailing dimensions, but a broadcast in a middle dimension (`[B, 1,
/// D]` against `[B, S, D]`) walks both operands element by element, ~10×
/// slower. On flex such operands are repeated to full size first
/// ([`expand_for_flex`]); other backends broadcast natively.
pub fn on_flex<B: Backend>() -> bool {
    TypeId::of::<B::Device>() == TypeId::of::<burn_flex::FlexDevice>()
}

/// `small` repeated along `dim` to `size` on flex (see [`on_flex`]), unchanged elsewhere.
pub fn expand_for_flex<B: Backend, const D: usize>(small: Tensor<B, D>, dim: usize, size: usize) -> Tensor<B, D> {
    if on_flex::<B>() && small.dims()[dim] == 1 && size > 1 {
        small.repeat_dim(dim, size)
    } else {
        small
    }
}

/// A flex tensor in contiguous layout (callers check [`enabled`]).
fn flex<B: Backend, const D: usize>(t: Tensor<B, D>) -> FlexTensor {
    flex_strided(t).to_contiguous()
}

/// Read-only f32 view of a contiguous flex tensor.
fn view(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().unwrap_or_else(|| unreachable!("fused kernels run only on contiguous f32 tensors"))
}

/// An owned copy of the values (the buffer an output is written into).
fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    view(&flex(t)).to_vec()
}

/// A tensor of backend `B` (flex, checked by [`enabled`]) from f32 values.
fn tensor<B: Backend, const D: usize>(values: Vec<f32>, shape: [usize; D]) -> Tensor<B, D> {
    let flex = FlexTensor::from_data(TensorData::new(values, shape));
    let boxed: Box<dyn Any> = Box::new(flex);
    match boxed.downcast::<B::FloatTensorPrimitive>() {
        Ok(p) => Tensor::from_primitive(TensorPrimitive::Float(*p)),
        Err(_) => unreachable!("fused kernels run only on flex tensors (checked by `enabled`)"),
    }
}

/// `t` with its values laid out contiguously in its logical order, on flex f32
/// (see [`enabled`]); unchanged elsewhere.
pub fn contiguous<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    if !enabled::<B>(t.dtype()) {
        return t;
    }
    let shape = t.dims();
    let x = flex_strided(t);
    // The common case, a Linear's transposed weight: a cache-blocked transpose
    // (flex's `to_contiguous` walks it element by element: +0.5 s on `medium`'s load).
    if D == 2 && x.layout().strides() == [1, shape[0] as isize] {
        let src = &x.storage::<f32>()[x.layout().start_offset()..][..shape[0] * shape[1]];
        return tensor(transposed(src, shape[1], shape[0]), shape);
    }
    // A slice of rows (a narrowed view, the VAE's row bands): copies of whole
    // rows, in parallel (flex's `to_contiguous` walks it element by element).
    let (strides, start) = (x.layout().strides().to_vec(), x.layout().start_offset());
    if D >= 2 && strides[D - 1] == 1 && strides.iter().all(|&s| s >= 0) && !x.layout().is_contiguous() {
        let row = shape[D - 1];
        let src = x.storage::<f32>();
        let mut out = vec![0f32; shape.iter().product()];
        if row > 0 {
            out.par_chunks_mut(row).enumerate().for_each(|(r, o)| {
                // Row `r`'s offset from its index along each leading dimension.
                let (mut rest, mut offset) = (r, start);
                for d in (0..D - 1).rev() {
                    offset += (rest % shape[d]) * strides[d] as usize;
                    rest /= shape[d];
                }
                o.copy_from_slice(&src[offset..offset + row]);
            });
        }
        return tensor(out, shape);
    }
    tensor(view(&x.to_contiguous()).to_vec(), shape)
}

/// The transpose of a row-major `[rows, cols]` matrix (`[cols, rows]`, row-major),
/// in 32×32 blocks so that reads and writes both stay in cache; bands of
/// output rows in parallel.
fn transposed(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const BLOCK: usize = 32;
    let mut out = vec![0f32; rows * cols];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(BLOCK * rows).enumerate().for_each(|(band, dst)| {
        let c0 = band * BLOCK;
        let band_cols = dst.len() / rows;
        for r0 in (0..rows).step_by(BLOCK) {
            for c in c0..c0 + band_cols {
                for r in r0..(r0 + BLOCK).min(rows) {
                    dst[(c - c0) * rows + r] = src[r * cols + c];
                }
            }
        }
    });
    out
}

/// A flex tensor as it is laid out (strides and offset kept; callers check [`enabled`]).
fn flex_strided<B: Backend, const D: usize>(t: Tensor<B, D>) -> FlexTensor {
    let primitive = match t.into_primitive() {
        TensorPrimitive::Float(p) => p,
        TensorPrimitive::QFloat(q) => B::dequantize(q, burn::tensor::FloatDType::F32),
    };
    let boxed: Box<dyn Any> = Box::new(primitive);
    match boxed.downcast::<FlexTensor>() {
        Ok(flex) => *flex,
        Err(_) => unreachable!("fused kernels run only on flex tensors (checked by `enabled`)"),
    }
}

/// An output buffer shared by a kernel's threads (each writes its own block).
struct SharedOut(*mut f32);

// SAFETY: used by `matmul` and the attention kernels of `grad`, whose tasks write disjoint blocks.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Pointer to element `offset` (a method, so closures capture the whole wrapper).
    fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// One single-threaded gemm, `[m, n, k]`, into a row-major destination
/// (`dst`, its row stride, whether to add to what it holds or overwrite it):
/// `dst (+)= lhs · rhs`, each operand given as (pointer, row stride, column stride).
///
/// # Safety
/// The pointers and strides must describe valid `[m, k]` and `[k, n]` views and a
/// writable `[m, n]` one that no other thread touches during the call.
unsafe fn gemm_into_rows(
    [m, n, k]: [usize; 3],
    (dst, dst_rs, accumulate): (*mut f32, usize, bool),
    (lhs, lhs_rs, lhs_cs): (*const f32, isize, isize),
    (rhs, rhs_rs, rhs_cs): (*const f32, isize, isize),
) {
    // SAFETY: forwarded from the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs,
            lhs_cs,
            lhs_rs,
            rhs,
            rhs_cs,
            rhs_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Below this many multiply-adds one single-threaded gemm call is fastest.
const SPLIT_MATMUL_WORK: usize = 1 << 21;

/// `x · w (+ bias)` for 2-D f32 tensors of any strides (`w` is usually a
/// `Linear`'s weight, laid out as `[d_in, d_out]` rows at load). `x`:
/// `[m, k]`, `w`: `[k, n]`, `bias`: `[n]` → `[m, n]`.
///
/// Why not flex's matmul: for the DiT's shapes (a few hundred rows) gemm's
/// own threading gained 1.1× from the second core (measured: 384×768·768
/// took 5.5 ms on one thread, 4.9 ms on two; PyTorch 2.9 ms). Here the rows
/// output is split evenly over rayon's threads and each share is one
/// single-threaded gemm; the bias is the gemm's initial output, not another pass.
pub fn matmul<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Tensor<B, 2> {
    let [m, k] = x.dims();
    let [k_w, n] = w.dims();
    assert_eq!(k, k_w, "inner dimensions agree");
    let with_bias = bias.is_some();
    let mut out = match bias {
        Some(b) => {
            assert_eq!(b.dims(), [n], "one bias per output");
            let b = flex(b);
            view(&b).repeat(m)
        }
        None if m == 0 || n == 0 || k == 0 => vec![0f32; m * n],
        // Written whole by the gemms below (no zeroing pass: a memset of every
        // output was ~1.5 % of a DiT step); its length is set once they have.
        None => Vec::with_capacity(m * n),
    };
    if m == 0 || n == 0 || k == 0 {
        return tensor(out, [m, n]);
    }
    let (x, w) = (flex_strided(x), flex_strided(w));
    let (xs, ws) = (x.storage::<f32>(), w.storage::<f32>());
    let (x_rs, x_cs) = (x.layout().strides()[0], x.layout().strides()[1]);
    let (w_rs, w_cs) = (w.layout().strides()[0], w.layout().strides()[1]);
    let (x0, w0) = (x.layout().start_offset(), w.layout().start_offset());
    let threads = if m * n * k < SPLIT_MATMUL_WORK { 1 } else { rayon::current_num_threads().max(1) };
    // Split the wider side of the output: each share packs only its part of
    // the other operand (a text encoder's 100 rows split in two would make
    // both threads pack the whole 1024×3072 weight). Column shares are
    // multiples of 64, the f32 micro-kernel's height once gemm transposes a
    // row-major product.
    let by_columns = n >= m;
    let (len, align) = if by_columns { (n, 64) } else { (m, 1) };
    let share = len.div_ceil(threads).div_ceil(align) * align;
    let parts = len.div_ceil(share);
    let dst = SharedOut(out.as_mut_ptr());
    (0..parts).into_par_iter().for_each(|i| {
        let (start, count) = (i * share, share.min(len - i * share));
        let (rows, cols, row0, col0) = if by_columns { (m, count, 0, start) } else { (count, n, start, 0) };
        // SAFETY: the layouts of `x` and `w` describe valid [m, k] / [k, n]
        // views of their buffers; share i writes only rows row0..row0+rows,
        // columns col0..col0+cols of the row-major [m, n] `out` (allocated for
        // m·n values), disjoint from every other share's, and `out` outlives
        // the parallel loop. Without a bias the destination is not read.
        unsafe {
            gemm_into_rows(
                [rows, cols, k],
                (dst.at(row0 * n + col0), n, with_bias),
                (xs.as_ptr().offset(x0 as isize + row0 as isize * x_rs), x_rs, x_cs),
                (ws.as_ptr().offset(w0 as isize + col0 as isize * w_cs), w_rs, w_cs),
            );
        }
    });
    if !with_bias {
        // SAFETY: the shares above wrote all m·n values (they tile [m, n]).
        unsafe { out.set_len(m * n) };
    }
    tensor(out, [m, n])
}

/// Output positions per conv tile times output channels: the tile's
/// accumulator (256 kB) and the input rows it reads stay in a core's 1 MB L2
/// across its nine gemms (`examples/matmul_threads`: 64 channels at 256², 116 →
/// ~160 GFLOP/s from 1 MB tiles; 32 kB tiles are slower again).
const CONV_TILE_ELEMENTS: usize = 64 * 1024;

/// 3×3 convolution, stride 1, padding 1 (the VAE's convolutions), without
/// im2col. `x`: `[B, C_in, H, W]`, `weight`: `[C_out, C_in, 3, 3]`, `bias`:
/// `[C_out]` → `[B, C_out, H, W]`.
///
/// The input is copied once into a zero-padded `(H+2)×(W+2)` plane per channel.
/// Output positions are counted on that padded width, so for each of the nine
/// kernel offsets `(dy, dx)` the inputs an output block needs are one
/// contiguous run of every padded plane, shifted by `dy·(W+2) + dx`: nine
/// gemms (`C_out × C_in` weights times `C_in ×` positions) accumulate into
/// the block, and its two wrapped columns per row are dropped. Blocks of whole
/// rows are spread over rayon's threads, one single-threaded gemm at a time.
pub fn conv3x3<B: Backend>(x: Tensor<B, 4>, weight: Tensor<B, 4>, bias: Option<Tensor<B, 1>>) -> Tensor<B, 4> {
    let [b, c_in, h, w] = x.dims();
    let [c_out, c_in_w, kh, kw] = weight.dims();
    assert!(c_in == c_in_w && kh == 3 && kw == 3, "a 3×3 kernel over the input's channels");
    let shape = [b, c_out, h, w];
    if shape.contains(&0) {
        return tensor(Vec::new(), shape);
    }
    let (pw, ph) = (w + 2, h + 2);
    let plane = ph * pw;
    // Zero-padded copy; the slack after the last plane keeps the wrapped
    // columns' reads (dropped later) inside the buffer.
    let slack = 2 * pw + 2;
    let x = flex(x);
    let xv = view(&x);
    let mut padded = vec![0f32; b * c_in * plane + slack];
    padded[..b * c_in * plane].par_chunks_mut(plane).zip(xv.par_chunks(h * w)).for_each(|(dst, src)| {
        for (y, row) in src.chunks(w).enumerate() {
            dst[(y + 1) * pw + 1..(y + 1) * pw + 1 + w].copy_from_slice(row);
        }
    });
    // Weights regrouped per kernel offset as contiguous [C_out, C_in] blocks:
    // read in place (stride 9) gemm would gather them one float at a time
    // into its packed buffer for every tile and offset (perf: the scalar
    // packing loop was ~15 % of a medium VAE decode).
    let weight = flex(weight);
    let mut per_offset = vec![0f32; 9 * c_out * c_in];
    for (i, w) in view(&weight).iter().enumerate() {
        let (co_ci, offset) = (i / 9, i % 9);
        per_offset[offset * c_out * c_in + co_ci] = *w;
    }
    let bias = bias.map(flex);
    let bias = bias.as_ref().map(view);
    // Tiles of equal height, as many as the cache budget asks and at least a
    // multiple of the thread count: a 32-row plane cut into 30 + 2 rows kept
    // one core busy for 94 % of the work (256 channels at 32²: 92 vs 127 GFLOP/s).
    let threads = rayon::current_num_threads().max(1);
    let by_cache = h.div_ceil((CONV_TILE_ELEMENTS / (c_out * pw)).clamp(1, h));
    let tiles = (by_cache.div_ceil(threads) * threads).min(h);
    let rows_per_tile = h.div_ceil(tiles);
    let tiles_per_item = h.div_ceil(rows_per_tile);
    let mut out = vec![0f32; b * c_out * h * w];
    let out_ptr = SharedOut(out.as_mut_ptr());
    (0..b * tiles_per_item).into_par_iter().for_each(|task| {
        let (item, tile) = (task / tiles_per_item, task % tiles_per_item);
        let y0 = tile * rows_per_tile;
        let rows = rows_per_tile.min(h - y0);
        let n = rows * pw;
        let mut acc = vec![0f32; c_out * n];
        if let Some(bias) = bias {
            for (co, block) in acc.chunks_mut(n).enumerate() {
                block.fill(bias[co]);
            }
        }
        let input = &padded[item * c_in * plane..];
        for dy in 0..3 {
            for dx in 0..3 {
                // SAFETY: weights [9, c_out, c_in] read at offset dy·3 + dx with
                // strides (c_in, 1); inputs [c_in, n] start at y0·pw + dy·pw + dx of
                // this item's padded planes (channel stride `plane`), whose last read,
                // ≤ (c_in−1)·plane + (h+1)·pw + w + 1 + pw, stays inside `padded` thanks
                // to the slack; `acc` is this task's own [c_out, n] block.
                unsafe {
                    gemm_into_rows(
                        [c_out, n, c_in],
                        (acc.as_mut_ptr(), n, true),
                        (per_offset.as_ptr().add((dy * 3 + dx) * c_out * c_in), c_in as isize, 1),
                        (input.as_ptr().add((y0 + dy) * pw + dx), plane as isize, 1),
                    );
                }
            }
        }
        // Drop the two wrapped columns of every row into the [B, C_out, H, W] output.
        for (co, block) in acc.chunks(n).enumerate() {
            let dst = out_ptr.at(((item * c_out + co) * h + y0) * w);
            for (r, row) in block.chunks(pw).enumerate() {
                // SAFETY: rows y0..y0+rows of channel co of this item belong to this task alone.
                unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), dst.add(r * w), w) };
            }
        }
    });
    tensor(out, shape)
}

/// Rows per rayon task for rows of `width` elements.
fn rows_per_task(width: usize) -> usize {
    (TASK_ELEMENTS / width.max(1)).max(1)
}

/// `1 / sqrt(mean(x²) + eps)` of one row, summed in f32 as flex's `mean_dim`.
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            acc[i] += c[i] * c[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for v in chunks.remainder() {
        sum += v * v;
    }
    let mean = sum / row.len() as f32;
    1.0 / (mean + eps).sqrt()
}

/// Calls `f(out_row, in_row, 1/rms(in_row), batch item)` for every row of
/// `dim` elements (`per_item` elements per batch item), rows split over rayon's threads.
fn rms_rows(
    out: &mut [f32],
    input: &[f32],
    dim: usize,
    per_item: usize,
    eps: f32,
    f: impl Fn(&mut [f32], &[f32], f32, usize) + Sync,
) {
    let rows = rows_per_task(dim);
    out.par_chunks_mut(rows * dim).zip(input.par_chunks(rows * dim)).enumerate().for_each(|(task, (o, xi))| {
        for (r, (orow, xrow)) in o.chunks_mut(dim).zip(xi.chunks(dim)).enumerate() {
            let item = ((task * rows + r) * dim) / per_item;
            f(orow, xrow, inv_rms(xrow, eps), item);
        }
    });
}

/// RMSNorm over the last dimension, `(x · r) · weight`, then times
/// `post_scale[b]` when given (`[B, dim]`, one row per batch item: the DiT's
/// `1 + scale` modulation). `x`: `[B, ..., dim]`.
pub fn rms_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    eps: f64,
    post_scale: Option<Tensor<B, 2>>,
) -> Tensor<B, D> {
    let shape = x.dims();
    if shape.contains(&0) {
        return tensor(Vec::new(), shape);
    }
    let dim = shape[D - 1];
    let per_item = shape[1..].iter().product::<usize>().max(1);
    if let Some(s) = &post_scale {
        assert_eq!(s.dims(), [shape[0], dim], "one row of scales per batch item");
    }
    let (x, w) = (flex(x), flex(weight));
    let (x, w) = (view(&x), view(&w));
    let s = post_scale.map(flex);
    let s = s.as_ref().map(view);
    let eps = eps as f32;
    let mut out = vec![0f32; x.len()];
    rms_rows(&mut out, x, dim, per_item, eps, |orow, xrow, inv, item| match s {
        Some(s) => {
            let srow = &s[item * dim..(item + 1) * dim];
            for j in 0..dim {
                orow[j] = ((xrow[j] * inv) * w[j]) * srow[j];
            }
        }
        None => {
            for j in 0..dim {
                orow[j] = (xrow[j] * inv) * w[j];
            }
        }
    });
    tensor(out, shape)
}

/// `x + gate[b] ⊙ rms_norm(y)` (the DiT's sandwich-normed residual); `gate`
/// `[B, dim]` is already `tanh`-ed, `None` is a gate of ones. `x`, `y`: `[B, S, dim]`.
pub fn residual_rms_norm<B: Backend>(
    x: Tensor<B, 3>,
    y: Tensor<B, 3>,
    weight: Tensor<B, 1>,
    eps: f64,
    gate: Option<Tensor<B, 2>>,
) -> Tensor<B, 3> {
    let shape = x.dims();
    if shape.contains(&0) {
        return tensor(Vec::new(), shape);
    }
    let dim = shape[2];
    let per_item = shape[1] * dim;
    assert_eq!(y.dims(), shape, "x and y have the same shape");
    if let Some(g) = &gate {
        assert_eq!(g.dims(), [shape[0], dim], "one row of gates per batch item");
    }
    let mut out = values(x);
    let (y, w) = (flex(y), flex(weight));
    let (y, w) = (view(&y), view(&w));
    let g = gate.map(flex);
    let g = g.as_ref().map(view);
    let eps = eps as f32;
    rms_rows(&mut out, y, dim, per_item, eps, |orow, yrow, inv, item| match g {
        Some(g) => {
            let grow = &g[item * dim..(item + 1) * dim];
            for j in 0..dim {
                orow[j] += grow[j] * ((yrow[j] * inv) * w[j]);
            }
        }
        None => {
            for j in 0..dim {
                orow[j] += (yrow[j] * inv) * w[j];
            }
        }
    });
    tensor(out, shape)
}

/// Nearest-neighbour ×2 upsampling, `[B, C, H, W]` → `[B, C, 2H, 2W]`, one
/// pass (as an expanded view flex materialises it element by element).
pub fn upsample_nearest_2x<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, c, h, w] = x.dims();
    let shape = [b, c, 2 * h, 2 * w];
    if shape.contains(&0) {
        return tensor(Vec::new(), shape);
    }
    let x = flex(x);
    let xv = view(&x);
    let mut out = vec![0f32; b * c * 4 * h * w];
    // One task per output row pair: row 2y and 2y+1 both repeat input row y.
    out.par_chunks_mut(2 * 2 * w).zip(xv.par_chunks(w)).for_each(|(rows, src)| {
        let (even, odd) = rows.split_at_mut(2 * w);
        for (pair, v) in even.chunks_exact_mut(2).zip(src) {
            pair[0] = *v;
            pair[1] = *v;
        }
        odd.copy_from_slice(even);
    });
    tensor(out, shape)
}

/// `x.swap_dims(1, 2)` laid out contiguously: `[A, B, C, D]` → `[A, C, B, D]`,
/// moving whole rows of `D`. Attention's head split and merge (`[B, S, H, hd]`
/// ↔ `[B, H, S, hd]`); as a strided view, flex's attention and reshape copy
/// it element by element through its strided iterator (perf: ~6 % of a
/// `medium` DiT step). Composed backends get the plain view.
pub fn swap_dims_1_2<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    if !enabled::<B>(x.dtype()) {
        return x.swap_dims(1, 2);
    }
    let [a, b, c, d] = x.dims();
    let shape = [a, c, b, d];
    if shape.contains(&0) {
        return tensor(Vec::new(), shape);
    }
    let x = flex(x);
    let xv = view(&x);
    let mut out = vec![0f32; a * b * c * d];
    // One task per output [B, D] block (fixed i, l): rows j come from x[i, j, l].
    out.par_chunks_mut(b * d).enumerate().for_each(|(il, block)| {
        let (i, l) = (il / c, il % c);
        for (j, row) in block.chunks_mut(d).enumerate() {
            row.copy_from_slice(&xv[((i * b + j) * c + l) * d..][..d]);
        }
    });
    tensor(out, shape)
}

/// Query rows per attention task: the block's scores (`ATTENTION_ROWS ×
/// S_k` f32) stay in L2 for sequences up to a few thousand keys.
const ATTENTION_ROWS: usize = 64;

/// `softmax(q·kᵀ/√D (+ causal mask))·v` for f32 flex tensors of any strides
/// (the DiT's are head-split views): `q` `[B, H, S_q, D]`, `k` `[B, H, S_k,
/// D]`, `v` `[B, H, S_k, D_v]` → `[B, H, S_q, D_v]`. Causal: query `i` sees
/// keys up to `i + S_k − S_q`.
///
/// Why not flex's attention: it runs the heads one after another with
/// single-threaded gemms, so one core of two idles. Here every block of
/// [`ATTENTION_ROWS`] query rows of every head is a task: scores by one
/// gemm, the row softmax in place, the output rows by a second gemm.
pub fn attention<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, causal: bool) -> Tensor<B, 4> {
    let [b, h, s_q, d] = q.dims();
    let [_, _, s_k, d_v] = v.dims();
    let shape = [b, h, s_q, d_v];
    if shape.contains(&0) || s_k == 0 {
        return tensor(vec![0.0; b * h * s_q * d_v], shape);
    }
    let (q, k, v) = (flex_strided(q), flex_strided(k), flex_strided(v));
    let ((qp, qs), (kp, ks), (vp, vs)) = (operand(&q), operand(&k), operand(&v));
    let scale = 1.0 / (d as f32).sqrt();
    let offset = s_k as isize - s_q as isize;
    let mut out = vec![0f32; b * h * s_q * d_v];
    out.par_chunks_mut(s_q * d_v).enumerate().for_each(|(bh, head_out)| {
        let (bi, hi) = ((bh / h) as isize, (bh % h) as isize);
        let (q0, k0, v0) = (qs[0] * bi + qs[1] * hi, ks[0] * bi + ks[1] * hi, vs[0] * bi + vs[1] * hi);
        head_out.par_chunks_mut(ATTENTION_ROWS * d_v).enumerate().for_each(|(blk, rows_out)| {
            let row0 = blk * ATTENTION_ROWS;
            let m = rows_out.len() / d_v;
            // Keys a causal block can see at all: the rest are skipped.
            let keys = if causal { ((row0 + m) as isize + offset).clamp(0, s_k as isize) as usize } else { s_k };
            if keys == 0 {
                return; // every score hidden: the output rows stay 0, as burn's
            }
            let mut scores = vec![0f32; m * keys];
            // SAFETY: the views lie inside their tensors (shapes checked by the
            // caller's dims, strides from flex); `scores` and `rows_out` are this
            // task's own.
            unsafe {
                gemm_into_rows(
                    [m, keys, d],
                    (scores.as_mut_ptr(), keys, false),
                    (qp.at(q0 + qs[2] * row0 as isize), qs[2], qs[3]),
                    (kp.at(k0), ks[3], ks[2]),
                );
            }
            for (i, row) in scores.chunks_mut(keys).enumerate() {
                let visible = if causal { ((row0 + i) as isize + offset + 1).clamp(0, keys as isize) as usize } else { keys };
                let (seen, hidden) = row.split_at_mut(visible);
                hidden.fill(0.0);
                if seen.is_empty() {
                    continue;
                }
                let max = seen.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
                let mut sum = 0.0;
                for x in seen.iter_mut() {
                    *x = exp_approx((*x - max) * scale);
                    sum += *x;
                }
                let inv = 1.0 / sum;
                seen.iter_mut().for_each(|x| *x *= inv);
            }
            // SAFETY: as above.
            unsafe {
                gemm_into_rows(
                    [m, d_v, keys],
                    (rows_out.as_mut_ptr(), d_v, false),
                    (scores.as_ptr(), keys as isize, 1),
                    (vp.at(v0), vs[2], vs[3]),
                );
            }
        });
    });
    tensor(out, shape)
}

/// (base pointer, strides) of a 4-D f32 flex view, for [`gemm_into_rows`].
fn operand(t: &FlexTensor) -> (SharedIn, [isize; 4]) {
    let base = t.storage::<f32>()[t.layout().start_offset()..].as_ptr();
    let st = t.layout().strides();
    (SharedIn(base), [st[0], st[1], st[2], st[3]])
}

/// A read-only base pointer shared by the attention's tasks.
#[derive(Clone, Copy)]
struct SharedIn(*const f32);

// SAFETY: the tasks only read through it, while the tensor it points into lives.
unsafe impl Sync for SharedIn {}
unsafe impl Send for SharedIn {}

impl SharedIn {
    /// Pointer to element `offset` (a method, so closures capture the whole wrapper).
    fn at(&self, offset: isize) -> *const f32 {
        self.0.wrapping_offset(offset)
    }
}

/// RoPE on interleaved pairs: `(x[2m], x[2m+1])` rotated by the token's
/// angle `m`. `x`: `[B, S, H, D]`; `cos`, `sin`: `[B, S, 1, D/2]`.
pub fn rope_interleaved<B: Backend>(x: Tensor<B, 4>, cos: Tensor<B, 4>, sin: Tensor<B, 4>) -> Tensor<B, 4> {
    let shape = x.dims();
    if shape.contains(&0) {
        return tensor(Vec::new(), shape);
    }
    let [batch, seq, h, d] = shape;
    let half = d / 2;
    assert_eq!(cos.dims(), [batch, seq, 1, half], "one row of angles per token");
    assert_eq!(sin.dims(), [batch, seq, 1, half], "one row of angles per token");
    let (x, c, s) = (flex(x), flex(cos), flex(sin));
    let (x, c, s) = (view(&x), view(&c), view(&s));
    let mut out = vec![0f32; x.len()];
    let token = h * d;
    let tokens = rows_per_task(token);
    out.par_chunks_mut(tokens * token).zip(x.par_chunks(tokens * token)).enumerate().for_each(|(task, (o, xi))| {
        for (t, (ot, xt)) in o.chunks_mut(token).zip(xi.chunks(token)).enumerate() {
            let angle = (task * tokens + t) * half;
            let (ct, st) = (&c[angle..angle + half], &s[angle..angle + half]);
            for (oh, xh) in ot.chunks_mut(d).zip(xt.chunks(d)) {
                for m in 0..half {
                    let (x0, x1) = (xh[2 * m], xh[2 * m + 1]);
                    oh[2 * m] = x0 * ct[m] - x1 * st[m];
                    oh[2 * m + 1] = x0 * st[m] + x1 * ct[m];
                }
            }
        }
    });
    tensor(out, shape)
}

/// `silu(a) ⊙ b` (SwiGLU's gate).
pub fn silu_mul<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> Tensor<B, D> {
    let shape = a.dims();
    if shape.contains(&0) {
        return tensor(Vec::new(), shape);
    }
    let mut out = values(a);
    let b = flex(b);
    let b = view(&b);
    out.par_chunks_mut(TASK_ELEMENTS).zip(b.par_chunks(TASK_ELEMENTS)).for_each(|(o, bi)| {
        for (v, &m) in o.iter_mut().zip(bi) {
            let x = *v;
            *v = (x * sigmoid(x)) * m;
        }
    });
    tensor(out, shape)
}

/// GroupNorm with affine weight and bias over `[B, C, H, W]`, optionally
/// followed by SiLU (the VAE always applies one after the other). Group
/// statistics are summed per plane in f32 lanes and across planes in f64,
/// then used as the composed ops
/// use them: `((x − mean) / sqrt(var + eps)) · w + b`.
pub fn group_norm<B: Backend>(
    x: Tensor<B, 4>,
    groups: usize,
    weight: Tensor<B, 1>,
    bias: Tensor<B, 1>,
    eps: f64,
    then_silu: bool,
) -> Tensor<B, 4> {
    let shape = x.dims();
    if shape.contains(&0) {
        return tensor(Vec::new(), shape);
    }
    let [b, c, h, w] = shape;
    assert!(groups > 0 && c % groups == 0, "channels divide into groups");
    let plane = (h * w).max(1);
    let per_group = c / groups;
    let (x, wt, bs) = (flex(x), flex(weight), flex(bias));
    let (x, wt, bs) = (view(&x), view(&wt), view(&bs));
    // Pass 1: mean per group (from per-plane sums, planes in parallel).
    let count = (per_group * plane) as f64;
    let means: Vec<f32> = slice_group_sums(x, plane, per_group, None).iter().map(|s| (s / count) as f32).collect();
    // Pass 2: variance of the centred values, as the composed ops centre them.
    let denoms: Vec<f32> = slice_group_sums(x, plane, per_group, Some(&means))
        .iter()
        .map(|s| (((s / count) as f32) + eps as f32).sqrt())
        .collect();
    debug_assert_eq!(means.len(), b * groups);
    // Pass 3: normalise, scale, shift (and SiLU) per plane.
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(plane).zip(x.par_chunks(plane)).enumerate().for_each(|(i, (o, p))| {
        let (item_group, channel) = (i / per_group, i % c);
        let (m, d, wc, bc) = (means[item_group], denoms[item_group], wt[channel], bs[channel]);
        for (ov, &v) in o.iter_mut().zip(p) {
            *ov = ((v - m) / d) * wc + bc;
        }
        if then_silu {
            for ov in o.iter_mut() {
                *ov *= sigmoid(*ov);
            }
        }
    });
    tensor(out, shape)
}

/// GroupNorm's two statistics passes over `[B, C, H, W]`, one f64 sum per
/// (item, group): `Σ v`, or with `centres` (one per item and group) `Σ (v −
/// centre)²`. For statistics gathered over several tensors (the VAE
/// decoder's row bands, `vae::RowBands`).
pub fn group_sums<B: Backend>(x: Tensor<B, 4>, groups: usize, centres: Option<&[f32]>) -> Vec<f64> {
    let [b, c, h, w] = x.dims();
    assert!(groups > 0 && c % groups == 0, "channels divide into groups");
    assert!(centres.is_none_or(|m| m.len() == b * groups), "one centre per item and group");
    let x = flex(x);
    slice_group_sums(view(&x), (h * w).max(1), c / groups, centres)
}

/// [`group_sums`] on the values: per-plane sums (planes in parallel, 16 f32
/// lanes each), then each group's planes summed in f64.
fn slice_group_sums(x: &[f32], plane: usize, per_group: usize, centres: Option<&[f32]>) -> Vec<f64> {
    let plane_sums: Vec<f64> = x
        .par_chunks(plane)
        .enumerate()
        .map(|(i, p)| match centres {
            None => lane_sum(p, |v| v),
            Some(m) => {
                let m = m[i / per_group];
                lane_sum(p, |v| (v - m) * (v - m))
            }
        })
        .collect();
    plane_sums.chunks(per_group).map(|g| g.iter().sum::<f64>()).collect()
}

/// `silu(x · scale + shift)` over `[B, C, H, W]` with one `(scale, shift)`
/// pair per plane (`[B·C, 1]` each): GroupNorm's last pass and the SiLU, for
/// statistics taken elsewhere (the VAE decoder's row bands, `vae::RowBands`).
pub fn plane_affine_silu<B: Backend>(x: Tensor<B, 4>, scale: Tensor<B, 2>, shift: Tensor<B, 2>) -> Tensor<B, 4> {
    let shape = x.dims();
    if shape.contains(&0) {
        return tensor(Vec::new(), shape);
    }
    let [b, c, h, w] = shape;
    let (scale, shift) = (values(scale), values(shift));
    assert!(scale.len() == b * c && shift.len() == b * c, "one (scale, shift) pair per plane");
    let mut out = values(x);
    out.par_chunks_mut(h * w).zip(scale.par_iter().zip(&shift)).for_each(|(o, (&s, &t))| {
        for v in o.iter_mut() {
            let y = *v * s + t;
            *v = y * sigmoid(y);
        }
    });
    tensor(out, shape)
}

/// `Σ f(v)` over a plane: 16 f32 lanes (vectorised), each lane's total in f64.
fn lane_sum(p: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut acc = [0f32; 16];
    let mut chunks = p.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] += f(c[i]);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v) as f64).sum();
    acc.iter().map(|&a| a as f64).sum::<f64>() + tail
}

/// `1 / (1 + e^-x)` with [`exp_approx`]: branch-free, so the loops that use
/// it vectorise (flex's sigmoid calls libm's scalar `expf` per element).
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_approx(-x))
}

/// `e^x` within 2 ulp on [−87, 88] (clamped outside): `x = n·ln2 + r`,
/// `e^r` by its degree-7 Taylor polynomial (|r| ≤ ln2/2, remainder < 1.1e-8
/// relative), `2^n` built in the exponent bits. Branch-free for vectorisation.
#[inline(always)]
fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to an integer
    // Not `clamp`: max/min send a NaN to −87 (exp ≈ 0), where clamp keeps it.
    #[allow(clippy::manual_clamp)]
    let x = x.max(-87.0).min(88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // `t`'s low mantissa bits hold n (its bits are ROUND's plus n): 2^n's
    // exponent field without a float-to-int conversion.
    p * f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23)
}

/// Training (burn's autodiff over flex): a 3×3, stride-1, padding-1
/// convolution whose forward is [`conv3x3`] and whose backward is written
/// here. Why: burn's default weight gradient is a convolution whose kernel
/// is the whole output gradient (128×128 at the demo VAE's size), which
/// flex runs element by element; perf put it at ~57 % of a VAE training
/// step. Here it is nine GEMMs per image ([`conv3x3_weight_grad`]) and the
/// input gradient is [`conv3x3`] with the flipped, transposed kernel.
/// `None` when `B` is not `Autodiff<Flex>` or the tensors are not f32.
pub fn conv3x3_autodiff<B: Backend>(x: &Tensor<B, 4>, weight: &Tensor<B, 4>, bias: &Tensor<B, 1>) -> Option<Tensor<B, 4>> {
    use burn::backend::autodiff::ops::{Backward, OpsKind};
    type Ad = burn::backend::Autodiff<burn_flex::Flex>;
    type AdTensor = <Ad as burn::tensor::backend::BackendTypes>::FloatTensorPrimitive;
    if TypeId::of::<B::FloatTensorPrimitive>() != TypeId::of::<AdTensor>()
        || [x.dtype(), weight.dtype(), bias.dtype()].iter().any(|d| *d != DType::F32)
        || weight.dims()[2..] != [3, 3]
    {
        return None;
    }
    fn unwrap<B: Backend, const D: usize>(t: Tensor<B, D>) -> AdTensor {
        let TensorPrimitive::Float(p) = t.into_primitive() else { unreachable!("float tensors") };
        *(Box::new(p) as Box<dyn Any>).downcast::<AdTensor>().unwrap_or_else(|_| unreachable!("checked by the caller"))
    }
    let (x, w, b) = (unwrap(x.clone()), unwrap(weight.clone()), unwrap(bias.clone()));

    #[derive(Debug)]
    struct Conv3x3Backward;

    impl Backward<burn_flex::Flex, 3> for Conv3x3Backward {
        /// The forward's input and weight.
        type State = (FlexTensor, FlexTensor);

        fn backward(
            self,
            ops: burn::backend::autodiff::ops::Ops<Self::State, 3>,
            grads: &mut burn::backend::autodiff::grads::Gradients,
            _checkpointer: &mut burn::backend::autodiff::checkpoint::base::Checkpointer,
        ) {
            type F = burn_flex::Flex;
            let [node_x, node_w, node_b] = ops.parents;
            let grad = grads.consume::<F>(&ops.node);
            let (x, w) = ops.state;
            let t = |p: FlexTensor| Tensor::<F, 4>::from_primitive(TensorPrimitive::Float(p));
            let [b, c_in, h, wd] = t(x.clone()).dims();
            let c_out = t(w.clone()).dims()[0];
            let g = t(grad);
            if let Some(node) = node_x {
                // ∂x = the same convolution of ∂y with w[o, c, 2−ky, 2−kx] as a [c, o] kernel.
                let flipped = t(w).swap_dims(0, 1).flip([2, 3]);
                let gx = conv3x3::<F>(g.clone(), flipped, None);
                grads.register::<F>(node.id, flex(gx));
            }
            if let Some(node) = node_w {
                let gx_in = flex(t(x));
                let gy = flex(g.clone());
                let gw = conv3x3_weight_grad(view(&gx_in), view(&gy), [b, c_in, c_out, h, wd]);
                grads.register::<F>(node.id, flex(tensor::<F, 4>(gw, [c_out, c_in, 3, 3])));
            }
            if let Some(node) = node_b {
                let gb = g.sum_dim(0).sum_dim(2).sum_dim(3).reshape([c_out]);
                grads.register::<F>(node.id, flex(gb));
            }
        }
    }

    let out = {
        let t = |p: &FlexTensor| Tensor::<burn_flex::Flex, 4>::from_primitive(TensorPrimitive::Float(p.clone()));
        let bias = Tensor::<burn_flex::Flex, 1>::from_primitive(TensorPrimitive::Float(b.primitive.clone()));
        flex(conv3x3::<burn_flex::Flex>(t(&x.primitive), t(&w.primitive), Some(bias)))
    };
    let result: AdTensor = match Conv3x3Backward
        .prepare::<burn::backend::autodiff::checkpoint::strategy::NoCheckpointing>([
            x.node.clone(),
            w.node.clone(),
            b.node.clone(),
        ])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((x.primitive.clone(), w.primitive.clone()), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    let boxed: Box<dyn Any> = Box::new(result);
    let p = boxed.downcast::<B::FloatTensorPrimitive>().unwrap_or_else(|_| unreachable!("checked above"));
    Some(Tensor::from_primitive(TensorPrimitive::Float(*p)))
}

/// `∂L/∂w [C_out, C_in, 3, 3]` of a 3×3, stride-1, padding-1 convolution
/// from its input `x [B, C_in, H, W]` and output gradient `g [B, C_out, H, W]`
/// (both contiguous): per image and kernel offset `(dy, dx)` one GEMM
/// `g [C_out, H·(W+2)] · shifted(x)ᵀ [H·(W+2), C_in]` over the zero-padded
/// planes, with `g` widened by two zero columns per row so that every shift
/// of `x` is one contiguous run (as in [`conv3x3`]). Images in parallel.
fn conv3x3_weight_grad(x: &[f32], g: &[f32], [b, c_in, c_out, h, w]: [usize; 5]) -> Vec<f32> {
    let pw = w + 2;
    let plane = (h + 2) * pw;
    let n = h * pw;
    let per_item: Vec<Vec<f32>> = (0..b)
        .into_par_iter()
        .map(|item| {
            let mut padded = vec![0f32; c_in * plane + 2 * pw + 2];
            for ci in 0..c_in {
                for y in 0..h {
                    let src = &x[((item * c_in + ci) * h + y) * w..][..w];
                    padded[ci * plane + (y + 1) * pw + 1..][..w].copy_from_slice(src);
                }
            }
            let mut wide = vec![0f32; c_out * n];
            for co in 0..c_out {
                for y in 0..h {
                    wide[co * n + y * pw..][..w].copy_from_slice(&g[((item * c_out + co) * h + y) * w..][..w]);
                }
            }
            let mut acc = vec![0f32; 9 * c_out * c_in];
            for offset in 0..9 {
                let (dy, dx) = (offset / 3, offset % 3);
                // SAFETY: lhs `wide` [c_out, n] (row stride n); rhs [n, c_in] read at
                // dy·pw + dx + p + ci·plane ≤ (c_in − 1)·plane + 2·pw + 2 + n − 1 < padded.len();
                // dst: this offset's own [c_out, c_in] block of `acc`.
                unsafe {
                    gemm_into_rows(
                        [c_out, c_in, n],
                        (acc.as_mut_ptr().add(offset * c_out * c_in), c_in, false),
                        (wide.as_ptr(), n as isize, 1),
                        (padded.as_ptr().add(dy * pw + dx), 1, plane as isize),
                    );
                }
            }
            acc
        })
        .collect();
    let mut out = vec![0f32; c_out * c_in * 9];
    for acc in per_item {
        for (offset, block) in acc.chunks(c_out * c_in).enumerate() {
            for (co_ci, v) in block.iter().enumerate() {
                out[co_ci * 9 + offset] += v;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::CpuBackend as B;
    use burn::tensor::Distribution;

    fn max_rel_diff<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
        let a = a.into_data().to_vec::<f32>().unwrap();
        let b = b.into_data().to_vec::<f32>().unwrap();
        assert_eq!(a.len(), b.len());
        a.iter().zip(&b).map(|(x, y)| (x - y).abs() / (1.0 + y.abs())).fold(0.0, f32::max)
    }

    fn randn<const D: usize>(shape: [usize; D]) -> Tensor<B, D> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
    }

    /// RMSNorm with burn's composed ops (as `nn::RmsNorm::forward_composed`), for `[.., .., dim]`.
    fn composed_rms_norm(x: Tensor<B, 3>, w: Tensor<B, 1>, eps: f64) -> Tensor<B, 3> {
        let dim = w.dims()[0];
        let var = x.clone().square().mean_dim(2);
        (x * (var + eps).sqrt().recip()) * w.reshape([1, 1, dim])
    }

    #[test]
    fn contiguous_keeps_the_values_of_a_transposed_view() {
        for [r, c] in [[70, 45], [1, 33], [32, 32], [5, 1]] {
            let w = randn([r, c]);
            let t = w.clone().transpose();
            let want = t.clone().into_data().to_vec::<f32>().unwrap();
            let got = contiguous(t);
            assert_eq!(got.dims(), [c, r]);
            assert_eq!(got.into_data().to_vec::<f32>().unwrap(), want, "{r}×{c}");
        }
        // Any other layout goes through the generic copy.
        let x = randn([3, 4, 5]).swap_dims(0, 2);
        assert_eq!(contiguous(x.clone()).into_data().to_vec::<f32>().unwrap(), x.into_data().to_vec::<f32>().unwrap());
    }

    #[test]
    fn contiguous_copies_a_band_of_rows_row_by_row() {
        let x = randn([2, 3, 9, 7]);
        for (start, len) in [(0, 4), (3, 5), (8, 1)] {
            let band = x.clone().narrow(2, start, len);
            let want = band.clone().into_data().to_vec::<f32>().unwrap();
            let got = contiguous(band);
            assert_eq!(got.dims(), [2, 3, len, 7]);
            assert_eq!(got.into_data().to_vec::<f32>().unwrap(), want, "rows {start}+{len}");
        }
    }

    #[test]
    fn upsample_nearest_2x_repeats_every_pixel_into_a_2x2_block() {
        let x = randn([2, 3, 4, 5]);
        let got = upsample_nearest_2x(x.clone());
        assert_eq!(got.dims(), [2, 3, 8, 10]);
        let want = x.reshape([2, 3, 4, 1, 5, 1]).expand([2, 3, 4, 2, 5, 2]).reshape([2, 3, 8, 10]);
        assert_eq!(got.into_data().to_vec::<f32>().unwrap(), want.into_data().to_vec::<f32>().unwrap());
    }

    #[test]
    fn swap_dims_1_2_matches_the_view() {
        let x = randn([2, 5, 3, 4]);
        let got = swap_dims_1_2(x.clone());
        assert_eq!(got.dims(), [2, 3, 5, 4]);
        assert_eq!(got.into_data().to_vec::<f32>().unwrap(), x.clone().swap_dims(1, 2).into_data().to_vec::<f32>().unwrap());
        // From a strided input too (the view of a view).
        let t = x.clone().swap_dims(1, 2);
        assert_eq!(swap_dims_1_2(t).into_data().to_vec::<f32>().unwrap(), x.into_data().to_vec::<f32>().unwrap());
    }

    #[test]
    fn fused_kernels_run_on_flex_f32_only() {
        assert!(enabled::<B>(DType::F32) || std::env::var("ZIMAGE_FUSED").as_deref() == Ok("0"));
        assert!(!enabled::<B>(DType::BF16));
        assert!(!enabled::<burn::backend::Autodiff<B>>(DType::F32));
    }

    #[test]
    fn rms_norm_matches_the_composed_ops() {
        // Large enough to split over tasks, with a per-item post scale.
        let (x, w, s) = (randn([3, 70, 96]), randn([96]), randn([3, 96]));
        let composed = composed_rms_norm(x.clone(), w.clone(), 1e-6) * s.clone().unsqueeze_dim::<3>(1);
        assert!(max_rel_diff(rms_norm(x.clone(), w.clone(), 1e-6, Some(s)), composed) < 1e-5);
        let plain = composed_rms_norm(x.clone(), w.clone(), 1e-6);
        assert!(max_rel_diff(rms_norm(x, w, 1e-6, None), plain) < 1e-5);
    }

    #[test]
    fn residual_rms_norm_matches_the_composed_ops() {
        let (x, y, w, g) = (randn([2, 300, 64]), randn([2, 300, 64]), randn([64]), randn([2, 64]).tanh());
        let norm = composed_rms_norm(y.clone(), w.clone(), 1e-5);
        let composed = x.clone() + g.clone().unsqueeze_dim::<3>(1) * norm.clone();
        assert!(max_rel_diff(residual_rms_norm(x.clone(), y.clone(), w.clone(), 1e-5, Some(g)), composed) < 1e-5);
        assert!(max_rel_diff(residual_rms_norm(x.clone(), y, w, 1e-5, None), x + norm) < 1e-5);
    }

    #[test]
    fn rope_matches_the_composed_ops_bit_for_bit() {
        let (x, cos, sin) = (randn([2, 50, 3, 16]), randn([2, 50, 1, 8]), randn([2, 50, 1, 8]));
        let pairs = x.clone().reshape([2, 50, 3, 8, 2]);
        let x0 = pairs.clone().narrow(4, 0, 1).squeeze_dim::<4>(4);
        let x1 = pairs.narrow(4, 1, 1).squeeze_dim::<4>(4);
        let y0 = x0.clone() * cos.clone() - x1.clone() * sin.clone();
        let y1 = x0 * sin.clone() + x1 * cos.clone();
        let composed = Tensor::stack::<5>(vec![y0, y1], 4).reshape([2, 50, 3, 16]);
        assert_eq!(max_rel_diff(rope_interleaved(x, cos, sin), composed), 0.0);
    }

    #[test]
    fn silu_mul_matches_the_composed_ops() {
        let (a, b) = (randn([5, 7000]) * 6.0, randn([5, 7000]));
        let composed = burn::tensor::activation::silu(a.clone()) * b.clone();
        assert!(max_rel_diff(silu_mul(a, b), composed) < 1e-6);
    }

    #[test]
    fn exp_approx_is_within_two_ulp_of_libm() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let (got, want) = (exp_approx(x), x.exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 2.4e-7, "worst relative error {worst}");
        assert_eq!(exp_approx(0.0), 1.0);
        assert!(exp_approx(-1000.0) > 0.0 && exp_approx(1000.0).is_finite());
        assert!((sigmoid(-200.0)).abs() < 1e-30 && (sigmoid(200.0) - 1.0).abs() < 1e-7);
    }

    #[test]
    fn empty_tensors_give_empty_results() {
        let x = Tensor::<B, 3>::zeros([2, 0, 4], &Default::default());
        assert_eq!(rms_norm(x.clone(), randn([4]), 1e-6, None).dims(), [2, 0, 4]);
        assert_eq!(silu_mul(x.clone(), x).dims(), [2, 0, 4]);
        let img = Tensor::<B, 4>::zeros([1, 0, 3, 3], &Default::default());
        assert_eq!(group_norm(img, 1, randn([0]), randn([0]), 1e-6, true).dims(), [1, 0, 3, 3]);
    }

    #[test]
    fn non_contiguous_inputs_are_read_in_logical_order() {
        let x = randn([4, 6, 8]);
        let w = randn([4]);
        let t = x.clone().swap_dims(0, 2); // [8, 6, 4], a strided view
        let composed = composed_rms_norm(t.clone(), w.clone(), 1e-6);
        assert!(max_rel_diff(rms_norm(t, w, 1e-6, None), composed) < 1e-5);
    }

    #[test]
    fn attention_matches_burns() {
        use burn::tensor::module::attention as burn_attention;
        use burn::tensor::ops::AttentionModuleOptions;
        // Rows not a multiple of the task block, keys longer than queries
        // (causal offset), and the DiT's head-split views as inputs.
        for (s_q, s_k, causal) in [(70, 70, false), (70, 70, true), (5, 150, true), (130, 40, false)] {
            let (q, k, v) = (randn([2, s_q, 3, 16]), randn([2, s_k, 3, 16]), randn([2, s_k, 3, 8]));
            let (q, k, v) = (q.swap_dims(1, 2), k.swap_dims(1, 2), v.swap_dims(1, 2));
            let options = AttentionModuleOptions { scale: None, softcap: None, is_causal: causal };
            let reference = burn_attention(q.clone(), k.clone(), v.clone(), None, None, options);
            let ours = attention(q, k, v, causal);
            assert_eq!(ours.dims(), [2, 3, s_q, 8]);
            assert!(max_rel_diff(ours, reference) < 1e-5, "{s_q}×{s_k} causal {causal}");
        }
    }

    #[test]
    fn group_norm_matches_the_composed_ops() {
        let (x, w, b) = (randn([2, 8, 12, 10]) * 3.0 + 1.5, randn([8]), randn([8]));
        let composed = {
            let g = x.clone().reshape([2, 4, 2 * 12 * 10]);
            let mean = g.clone().mean_dim(2);
            let centered = g - mean;
            let var = centered.clone().square().mean_dim(2);
            (centered / (var + 1e-6).sqrt()).reshape([2, 8, 12, 10]) * w.clone().reshape([1, 8, 1, 1])
                + b.clone().reshape([1, 8, 1, 1])
        };
        assert!(max_rel_diff(group_norm(x.clone(), 4, w.clone(), b.clone(), 1e-6, false), composed.clone()) < 1e-5);
        let silu = burn::tensor::activation::silu(composed);
        assert!(max_rel_diff(group_norm(x, 4, w, b, 1e-6, true), silu) < 1e-5);
    }

    #[test]
    fn matmul_matches_flex_on_strided_views_with_and_without_bias() {
        // Large enough to be split over threads (by rows: 300 > 90); `w` is a
        // transposed view as in `Linear`.
        let (x, w_stored, b) = (randn([300, 70]), randn([90, 70]), randn([90]));
        let w = w_stored.transpose();
        let reference = x.clone().matmul(w.clone());
        assert!(max_rel_diff(matmul(x.clone(), w.clone(), None), reference.clone()) < 1e-5);
        let with_bias = reference + b.clone().unsqueeze::<2>();
        assert!(max_rel_diff(matmul(x.clone(), w.clone(), Some(b)), with_bias) < 1e-5);
        // A strided left side (a narrowed view) and a tiny, unsplit product.
        let xn = x.clone().narrow(1, 5, 40);
        let wn = randn([40, 3]);
        assert!(max_rel_diff(matmul(xn.clone(), wn.clone(), None), xn.matmul(wn)) < 1e-5);
        assert_eq!(matmul(randn([0, 4]), randn([4, 3]), None).dims(), [0, 3]);
        // Split by columns (n ≥ m), with a last share narrower than the others.
        let (xc, wc, bc) = (randn([40, 300]), randn([300, 200]), randn([200]));
        let reference = xc.clone().matmul(wc.clone()) + bc.clone().unsqueeze::<2>();
        assert!(max_rel_diff(matmul(xc, wc, Some(bc)), reference) < 1e-5);
    }

    #[test]
    fn conv3x3_matches_flex_conv2d() {
        use burn::tensor::module::conv2d;
        use burn::tensor::ops::ConvOptions;
        // Several tiles per item (c_out·(w+2) large against the tile), two items, odd sizes.
        for (b, c_in, c_out, h, w) in [(2, 5, 7, 9, 11), (1, 16, 300, 40, 33), (1, 3, 2, 1, 1)] {
            let (x, wt, bias) = (randn([b, c_in, h, w]), randn([c_out, c_in, 3, 3]), randn([c_out]));
            let reference = conv2d(x.clone(), wt.clone(), Some(bias.clone()), ConvOptions::new([1, 1], [1, 1], [1, 1], 1));
            assert!(max_rel_diff(conv3x3(x.clone(), wt.clone(), Some(bias)), reference) < 1e-4);
            let no_bias = conv2d(x.clone(), wt.clone(), None, ConvOptions::new([1, 1], [1, 1], [1, 1], 1));
            assert!(max_rel_diff(conv3x3(x, wt, None), no_bias) < 1e-4);
        }
    }

    #[test]
    fn flex_is_recognised_with_and_without_autodiff() {
        assert!(on_flex::<B>() && on_flex::<burn::backend::Autodiff<B>>());
        let t = randn([2, 1, 3]);
        assert_eq!(expand_for_flex(t.clone(), 1, 5).dims(), [2, 5, 3]);
        assert_eq!(expand_for_flex(t, 1, 1).dims(), [2, 1, 3]);
    }

    #[test]
    fn conv3x3_autodiff_matches_burns_conv_and_its_gradients() {
        use burn::tensor::module as conv;
        use burn::tensor::ops::ConvOptions;
        type Ad = burn::backend::Autodiff<B>;
        let device = Default::default();
        // Odd sizes and channel counts, a non-contiguous input (a transposed view).
        let x0 = randn([2, 3, 7, 5]);
        let w0 = randn([4, 3, 3, 3]);
        let b0 = randn([4]);
        let up = randn([2, 4, 5, 7]);
        let run = |ours: bool| {
            let x = Tensor::<Ad, 4>::from_data(x0.to_data(), &device).require_grad();
            let w = Tensor::<Ad, 4>::from_data(w0.to_data(), &device).require_grad();
            let b = Tensor::<Ad, 1>::from_data(b0.to_data(), &device).require_grad();
            let xt = x.clone().swap_dims(2, 3);
            let y = if ours {
                conv3x3_autodiff(&xt, &w, &b).expect("Autodiff<Flex> f32")
            } else {
                conv::conv2d(xt, w.clone(), Some(b.clone()), ConvOptions::new([1, 1], [1, 1], [1, 1], 1))
            };
            let loss = (y.clone() * Tensor::<Ad, 4>::from_data(up.to_data(), &device)).sum();
            let g = loss.backward();
            let grad = |t: &Tensor<Ad, 4>| Tensor::<B, 4>::from_data(t.grad(&g).unwrap().to_data(), &device);
            (Tensor::<B, 4>::from_data(y.into_data(), &device), grad(&x), grad(&w), b.grad(&g).unwrap())
        };
        let (y1, gx1, gw1, gb1) = run(true);
        let (y2, gx2, gw2, gb2) = run(false);
        assert!(max_rel_diff(y1, y2) < 1e-5);
        assert!(max_rel_diff(gx1, gx2) < 1e-5);
        assert!(max_rel_diff(gw1, gw2) < 1e-4);
        assert!(max_rel_diff(gb1, gb2) < 1e-4);
        // Not autodiff: not ours.
        assert!(conv3x3_autodiff(&x0, &w0, &b0).is_none());
    }
}
