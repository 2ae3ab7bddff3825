//! Training kernels: the DiT's elementwise chains and attention as single
//! autodiff ops with hand-written backward passes, for burn's autodiff over
//! flex (the demo model's training on the CPU).
//!
//! Why: under autodiff every composed op records its own backward step, and
//! on flex each is its own pass over memory. `perf` of a demo Base training
//! step (session 9, batch 24, dim 128) put 19 % of it in the backward of
//! elementwise multiplies (most of it flex's element-by-element strided path:
//! the gradients behind the head split arrive as strided views), 4 % in
//! SiLU's sigmoid, 4 % in the composed attention's softmax and 5 % in the
//! SwiGLU and RMSNorm forwards, against 27 % in the GEMMs. Here an RMSNorm,
//! a SwiGLU gate, a RoPE and an attention are one op each, forward through
//! the inference kernels of [`super`], backward in one or two passes, and the
//! attention works on the `[B, S, H, D]` head split directly, so no strided
//! view and no transposed gradient appears at all.
//!
//! Every function returns `None` unless the backend is `Autodiff<Flex>` and
//! the tensors are f32 (callers then run the composed ops); each is tested
//! against the composed ops' values and gradients. `ZIMAGE_FUSED_GRAD=0`
//! turns them off (to measure what they bring).

use std::any::{Any, TypeId};
use std::sync::OnceLock;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::{exp_approx, gemm_into_rows, inv_rms, operand, sigmoid, view, SharedOut, TASK_ELEMENTS};

type F = burn_flex::Flex;
type AdTensor = <burn::backend::Autodiff<F> as burn::tensor::backend::BackendTypes>::FloatTensorPrimitive;

/// Whether `B` is autodiff over flex, every dtype is f32 and the kernels are on.
fn applies<B: Backend>(dtypes: &[DType]) -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    TypeId::of::<B::FloatTensorPrimitive>() == TypeId::of::<AdTensor>()
        && dtypes.iter().all(|d| *d == DType::F32)
        && *ON.get_or_init(|| std::env::var("ZIMAGE_FUSED_GRAD").map(|v| v != "0").unwrap_or(true))
}

/// The autodiff tensor behind `t` (callers check [`applies`]).
fn unwrap<B: Backend, const D: usize>(t: &Tensor<B, D>) -> AdTensor {
    let TensorPrimitive::Float(p) = t.clone().into_primitive() else { unreachable!("float tensors") };
    *(Box::new(p) as Box<dyn Any>).downcast::<AdTensor>().unwrap_or_else(|_| unreachable!("checked by `applies`"))
}

fn wrap<B: Backend, const D: usize>(t: AdTensor) -> Tensor<B, D> {
    let p = (Box::new(t) as Box<dyn Any>).downcast::<B::FloatTensorPrimitive>();
    Tensor::from_primitive(TensorPrimitive::Float(*p.unwrap_or_else(|_| unreachable!("checked by `applies`"))))
}

/// A contiguous f32 flex tensor of `shape` from its values.
fn flex_from(values: Vec<f32>, shape: &[usize]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.to_vec()))
}

fn dims(t: &FlexTensor) -> Vec<usize> {
    t.layout().shape().to_vec()
}

/// The values of `t` in logical order (a copy only when it is a view).
fn contiguous(t: &FlexTensor) -> FlexTensor {
    t.to_contiguous()
}

/// Records `out` as the result of `op` on `parents` (with `state` for its
/// backward when any parent is tracked) and hands it back as a `B` tensor.
fn record<B: Backend, Op: Backward<F, N>, const N: usize, const D: usize>(
    op: Op,
    parents: [&AdTensor; N],
    state: Op::State,
    out: FlexTensor,
) -> Tensor<B, D> {
    let result = match op.prepare::<NoCheckpointing>(parents.map(|p| p.node.clone())).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(state, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    wrap(result)
}

fn flex_of<const D: usize>(t: Tensor<F, D>) -> FlexTensor {
    match t.into_primitive() {
        TensorPrimitive::Float(p) => p,
        TensorPrimitive::QFloat(_) => unreachable!("float tensors"),
    }
}

fn tensor_of<const D: usize>(t: &FlexTensor) -> Tensor<F, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t.clone()))
}

/// `silu(a) ⊙ b` (SwiGLU's gate), `a`, `b` of one shape. Backward, with
/// `s = σ(a)`: `∂a = g·b·s·(1 + a·(1 − s))`, `∂b = g·a·s`.
pub fn silu_mul<B: Backend, const D: usize>(a: &Tensor<B, D>, b: &Tensor<B, D>) -> Option<Tensor<B, D>> {
    if !applies::<B>(&[a.dtype(), b.dtype()]) || a.dims() != b.dims() {
        return None;
    }
    let (a, b) = (unwrap(a), unwrap(b));
    let (a_in, b_in) = (contiguous(&a.primitive), contiguous(&b.primitive));
    let out = flex_of(super::silu_mul::<F, D>(tensor_of::<D>(&a_in), tensor_of::<D>(&b_in)));

    #[derive(Debug)]
    struct SiluMulBackward;
    impl Backward<F, 2> for SiluMulBackward {
        /// The forward's inputs, contiguous.
        type State = (FlexTensor, FlexTensor);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node_a, node_b] = ops.parents;
            let g = contiguous(&grads.consume::<F>(&ops.node));
            let (a, b) = ops.state;
            let shape = dims(&a);
            let (g, av, bv) = (view(&g), view(&a), view(&b));
            let mut ga = vec![0f32; av.len()];
            let mut gb = vec![0f32; av.len()];
            ga.par_chunks_mut(TASK_ELEMENTS)
                .zip(gb.par_chunks_mut(TASK_ELEMENTS))
                .enumerate()
                .for_each(|(task, (ga, gb))| {
                    let at = task * TASK_ELEMENTS;
                    let n = ga.len();
                    let inputs = av[at..at + n].iter().zip(&bv[at..at + n]).zip(&g[at..at + n]);
                    for ((da, db), ((&x, &m), &gi)) in ga.iter_mut().zip(gb.iter_mut()).zip(inputs) {
                        let s = sigmoid(x);
                        *da = gi * m * s * (1.0 + x * (1.0 - s));
                        *db = gi * x * s;
                    }
                });
            if let Some(node) = node_a {
                grads.register::<F>(node.id, flex_from(ga, &shape));
            }
            if let Some(node) = node_b {
                grads.register::<F>(node.id, flex_from(gb, &shape));
            }
        }
    }
    let state = (a_in, b_in);
    Some(record(SiluMulBackward, [&a, &b], state, out))
}

/// RMSNorm over the last dimension, `x · r · weight` with `r = 1/√(mean(x²) + eps)`,
/// times `post_scale[b]` when given (`[B, dim]`, the DiT's `1 + scale` or
/// its `tanh(gate)`). `x`: `[B, ..., dim]`, `weight`: `[dim]`.
///
/// Backward, with `c = weight ⊙ post_scale[b]` and `n = dim`, per row:
/// `∂x = r·(g ⊙ c) − x·r³·Σ(g ⊙ c ⊙ x)/n`; `∂weight = Σ_rows g ⊙ x·r ⊙ post_scale[b]`;
/// `∂post_scale[b] = weight ⊙ Σ_rows of b (g ⊙ x·r)`.
pub fn rms_norm<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    weight: &Tensor<B, 1>,
    eps: f64,
    post_scale: Option<&Tensor<B, 2>>,
) -> Option<Tensor<B, D>> {
    let shape = x.dims();
    let mut dtypes = vec![x.dtype(), weight.dtype()];
    dtypes.extend(post_scale.map(|s| s.dtype()));
    if !applies::<B>(&dtypes)
        || shape.contains(&0)
        || weight.dims() != [shape[D - 1]]
        || post_scale.is_some_and(|s| s.dims() != [shape[0], shape[D - 1]])
    {
        return None;
    }
    let (x, w) = (unwrap(x), unwrap(weight));
    let s = post_scale.map(unwrap);
    let x_in = contiguous(&x.primitive);
    let s_in = s.as_ref().map(|s| contiguous(&s.primitive));
    let out = flex_of(super::rms_norm::<F, D>(
        tensor_of::<D>(&x_in),
        tensor_of::<1>(&w.primitive),
        eps,
        s_in.as_ref().map(tensor_of::<2>),
    ));

    #[derive(Debug)]
    struct RmsNormBackward {
        eps: f32,
    }
    impl Backward<F, 3> for RmsNormBackward {
        /// The input, the weight and the post-scale (ones when none), contiguous.
        type State = (FlexTensor, FlexTensor, Option<FlexTensor>);

        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node_x, node_w, node_s] = ops.parents;
            let g = contiguous(&grads.consume::<F>(&ops.node));
            let (x, w, s) = ops.state;
            let shape = dims(&x);
            let w = contiguous(&w);
            let (g, xv, wv) = (view(&g), view(&x), view(&w));
            let sv = s.as_ref().map(view);
            let n = wv.len();
            let per_item = xv.len() / shape[0];
            let mut gx = vec![0f32; xv.len()];
            // Per batch item: Σ_rows g ⊙ x·r, from which both parameter gradients follow.
            let sums: Vec<Vec<f32>> = gx
                .par_chunks_mut(per_item)
                .enumerate()
                .map(|(item, gx_item)| {
                    let c: Vec<f32> = match sv {
                        Some(s) => wv.iter().zip(&s[item * n..(item + 1) * n]).map(|(w, s)| w * s).collect(),
                        None => wv.to_vec(),
                    };
                    let mut gxr = vec![0f32; n];
                    let base = item * per_item;
                    for (row, gx_row) in gx_item.chunks_mut(n).enumerate() {
                        let at = base + row * n;
                        let (xr, gr) = (&xv[at..at + n], &g[at..at + n]);
                        let r = inv_rms(xr, self.eps);
                        let k = r * r * r * lane_dot3(gr, &c, xr) / n as f32;
                        for ((((o, acc), &gj), &xj), &cj) in gx_row.iter_mut().zip(&mut gxr).zip(gr).zip(xr).zip(&c) {
                            *o = r * gj * cj - xj * k;
                            *acc += gj * xj * r;
                        }
                    }
                    gxr
                })
                .collect();
            if let Some(node) = node_x {
                grads.register::<F>(node.id, flex_from(gx, &shape));
            }
            if let Some(node) = node_w {
                let mut gw = vec![0f32; n];
                for (item, gxr) in sums.iter().enumerate() {
                    for j in 0..n {
                        gw[j] += gxr[j] * sv.map_or(1.0, |s| s[item * n + j]);
                    }
                }
                grads.register::<F>(node.id, flex_from(gw, &[n]));
            }
            if let Some(node) = node_s {
                let gs: Vec<f32> = sums.iter().flat_map(|gxr| gxr.iter().zip(wv).map(|(a, w)| a * w)).collect();
                grads.register::<F>(node.id, flex_from(gs, &[shape[0], n]));
            }
        }
    }
    let state = (x_in, w.primitive.clone(), s_in);
    let op = RmsNormBackward { eps: eps as f32 };
    Some(match &s {
        Some(s) => record(op, [&x, &w, s], state, out),
        // No post-scale: a third parent that is never tracked.
        None => record(op, [&x, &w, &untracked_scalar()], state, out),
    })
}

/// An untracked placeholder parent (for ops whose optional input is absent).
fn untracked_scalar() -> AdTensor {
    let t = Tensor::<burn::backend::Autodiff<F>, 1>::from_data(TensorData::new(vec![0f32], [1]), &Default::default());
    unwrap(&t)
}

/// RoPE on interleaved pairs of `x` `[B, S, H, D]` by the token's angles
/// (`cos`, `sin` `[B, S, 1, D/2]`, constants): `(x0·c − x1·s, x0·s + x1·c)`.
/// Backward: the rotation by the opposite angle, `(g0·c + g1·s, −g0·s + g1·c)`.
pub fn rope_interleaved<B: Backend>(x: &Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Option<Tensor<B, 4>> {
    let [b, s, _, d] = x.dims();
    if !applies::<B>(&[x.dtype(), cos.dtype(), sin.dtype()])
        || d % 2 != 0
        || cos.dims() != [b, s, 1, d / 2]
        || sin.dims() != [b, s, 1, d / 2]
        || x.dims().contains(&0)
    {
        return None;
    }
    let x = unwrap(x);
    let (c, sn) = (contiguous(&unwrap(cos).primitive), contiguous(&unwrap(sin).primitive));
    let out = flex_of(super::rope_interleaved::<F>(tensor_of(&x.primitive), tensor_of(&c), tensor_of(&sn)));

    #[derive(Debug)]
    struct RopeBackward;
    impl Backward<F, 1> for RopeBackward {
        /// cos and sin, contiguous.
        type State = (FlexTensor, FlexTensor);

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node_x] = ops.parents;
            let g = grads.consume::<F>(&ops.node);
            let Some(node) = node_x else { return };
            let (c, s) = ops.state;
            // The same kernel by the opposite angle: cos unchanged, sin negated.
            let minus_s = flex_of(tensor_of::<4>(&s).neg());
            let gx = super::rope_interleaved::<F>(tensor_of(&g), tensor_of(&c), tensor_of(&minus_s));
            grads.register::<F>(node.id, flex_of(gx));
        }
    }
    Some(record(RopeBackward, [&x], (c, sn), out))
}

/// `softmax(q·kᵀ/√D)·v` over the head split `[B, S, H, D]` as the DiT makes
/// it (`q`, `k`, `v` `[B, S, H, D]`, any strides; no mask) → `[B, S, H, D]`,
/// contiguous. The probabilities `P` are kept for the backward (`[B, H, S, S]`
/// f32: 3.5 MB per block at the demo's batch), which per head is
/// `∂v = Pᵀ·g`, `∂P = g·vᵀ`, `∂S = P ⊙ (∂P − rowsum(P ⊙ ∂P))`,
/// `∂q = ∂S·k/√D`, `∂k = ∂Sᵀ·q/√D`, every product one GEMM.
pub fn attention_bshd<B: Backend>(q: &Tensor<B, 4>, k: &Tensor<B, 4>, v: &Tensor<B, 4>) -> Option<Tensor<B, 4>> {
    let shape = q.dims();
    if !applies::<B>(&[q.dtype(), k.dtype(), v.dtype()]) || k.dims() != shape || v.dims() != shape || shape.contains(&0) {
        return None;
    }
    let (q, k, v) = (unwrap(q), unwrap(k), unwrap(v));
    let (qf, kf, vf) = (q.primitive.clone(), k.primitive.clone(), v.primitive.clone());
    let [b, s, h, d] = shape;
    let scale = 1.0 / (d as f32).sqrt();
    let (qp, qs) = operand(&qf);
    let (kp, ks) = operand(&kf);
    let (vp, vs) = operand(&vf);
    let mut probs = vec![0f32; b * h * s * s];
    let mut out = vec![0f32; b * s * h * d];
    let dst = SharedOut(out.as_mut_ptr());
    probs.par_chunks_mut(s * s).enumerate().for_each(|(bh, p)| {
        let (bi, hi) = ((bh / h) as isize, (bh % h) as isize);
        let (q0, k0, v0) = (qs[0] * bi + qs[2] * hi, ks[0] * bi + ks[2] * hi, vs[0] * bi + vs[2] * hi);
        // SAFETY: the views lie inside their tensors (shape checked, strides from
        // flex); `p` is this task's own and so are this head's output elements.
        unsafe {
            gemm_into_rows([s, s, d], (p.as_mut_ptr(), s, false), (qp.at(q0), qs[1], qs[3]), (kp.at(k0), ks[3], ks[1]));
        }
        for row in p.chunks_mut(s) {
            let max = lane_max(row);
            row.iter_mut().for_each(|x| *x = exp_approx((*x - max) * scale));
            let inv = 1.0 / lane_dot3(row, &[], &[]);
            row.iter_mut().for_each(|x| *x *= inv);
        }
        let o0 = (bh / h) * s * h * d + (bh % h) * d;
        // SAFETY: as above; the output rows of this (item, head) are written by this task only.
        unsafe {
            gemm_into_rows([s, d, s], (dst.at(o0), h * d, false), (p.as_ptr(), s as isize, 1), (vp.at(v0), vs[1], vs[3]));
        }
    });
    let out = flex_from(out, &shape);

    #[derive(Debug)]
    struct AttentionBackward;
    impl Backward<F, 3> for AttentionBackward {
        /// q, k, v as the forward saw them, and the probabilities `[B·H, S, S]`.
        type State = (FlexTensor, FlexTensor, FlexTensor, Vec<f32>);

        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node_q, node_k, node_v] = ops.parents;
            let g = grads.consume::<F>(&ops.node);
            let (q, k, v, probs) = ops.state;
            let [b, s, h, d]: [usize; 4] = dims(&q).try_into().unwrap_or_else(|_| unreachable!("4-D"));
            let scale = 1.0 / (d as f32).sqrt();
            let (qp, qs) = operand(&q);
            let (kp, ks) = operand(&k);
            let (vp, vs) = operand(&v);
            let (gp, gs) = operand(&g);
            let n = b * s * h * d;
            let (mut gq, mut gk, mut gv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
            let (dq, dk, dv) = (SharedOut(gq.as_mut_ptr()), SharedOut(gk.as_mut_ptr()), SharedOut(gv.as_mut_ptr()));
            probs.par_chunks(s * s).enumerate().for_each(|(bh, p)| {
                let (bi, hi) = ((bh / h) as isize, (bh % h) as isize);
                let at = |st: [isize; 4]| st[0] * bi + st[2] * hi;
                let o0 = (bh / h) * s * h * d + (bh % h) * d;
                let mut dp = vec![0f32; s * s];
                // SAFETY: views inside their tensors; the gradient rows of this
                // (item, head) are written by this task only; `dp` is its own.
                unsafe {
                    // ∂v = Pᵀ·g
                    gemm_into_rows([s, d, s], (dv.at(o0), h * d, false), (p.as_ptr(), 1, s as isize), (gp.at(at(gs)), gs[1], gs[3]));
                    // ∂P = g·vᵀ
                    gemm_into_rows([s, s, d], (dp.as_mut_ptr(), s, false), (gp.at(at(gs)), gs[1], gs[3]), (vp.at(at(vs)), vs[3], vs[1]));
                }
                for (dp_row, p_row) in dp.chunks_mut(s).zip(p.chunks(s)) {
                    let dot = lane_dot3(dp_row, p_row, &[]);
                    for (x, &pi) in dp_row.iter_mut().zip(p_row) {
                        *x = pi * (*x - dot) * scale;
                    }
                }
                // SAFETY: as above (∂S now in `dp`).
                unsafe {
                    // ∂q = ∂S·k, ∂k = ∂Sᵀ·q
                    gemm_into_rows([s, d, s], (dq.at(o0), h * d, false), (dp.as_ptr(), s as isize, 1), (kp.at(at(ks)), ks[1], ks[3]));
                    gemm_into_rows([s, d, s], (dk.at(o0), h * d, false), (dp.as_ptr(), 1, s as isize), (qp.at(at(qs)), qs[1], qs[3]));
                }
            });
            for (node, values) in [(node_q, gq), (node_k, gk), (node_v, gv)] {
                if let Some(node) = node {
                    grads.register::<F>(node.id, flex_from(values, &[b, s, h, d]));
                }
            }
        }
    }
    Some(record(AttentionBackward, [&q, &k, &v], (qf, kf, vf, probs), out))
}

/// `x · w (+ bias)`, a `Linear` (`x` `[m, k]`, `w` `[k, n]`, `bias` `[n]`, any
/// strides) → `[m, n]`, forward through [`super::matmul`]. Backward:
/// `∂x = g·wᵀ`, `∂w = xᵀ·g` (GEMMs on transposed views, no copies),
/// `∂bias = Σ_rows g`.
///
/// Why: burn's matmul on flex allocates each product through
/// `FlexTensor::empty`, which zeroes a byte buffer and then copies it into an
/// aligned one: a memset and a memcpy per forward and backward product,
/// ~12 % of a demo Base training step by `perf` (session 14). The GEMMs here
/// write straight into their outputs, and the bias is the forward GEMM's
/// initial value instead of one more op with its own backward.
pub fn linear<B: Backend>(x: &Tensor<B, 2>, w: &Tensor<B, 2>, bias: Option<&Tensor<B, 1>>) -> Option<Tensor<B, 2>> {
    let ([m, k], [k_w, n]) = (x.dims(), w.dims());
    let mut dtypes = vec![x.dtype(), w.dtype()];
    dtypes.extend(bias.map(|b| b.dtype()));
    if !applies::<B>(&dtypes) || k != k_w || bias.is_some_and(|b| b.dims() != [n]) || m * n * k == 0 {
        return None;
    }
    let (x, w) = (unwrap(x), unwrap(w));
    let b = bias.map(unwrap);
    let (xf, wf) = (x.primitive.clone(), w.primitive.clone());
    let out = flex_of(super::matmul::<F>(tensor_of(&xf), tensor_of(&wf), b.as_ref().map(|b| tensor_of(&b.primitive))));

    #[derive(Debug)]
    struct LinearBackward;
    impl Backward<F, 3> for LinearBackward {
        /// The input and the weight as the forward saw them (the GEMMs read any strides).
        type State = (FlexTensor, FlexTensor);

        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node_x, node_w, node_b] = ops.parents;
            // Contiguous (a no-op when it already is): a broadcast gradient's zero strides stay out of gemm.
            let g = contiguous(&grads.consume::<F>(&ops.node));
            let (x, w) = ops.state;
            if let Some(node) = node_x {
                let gx = super::matmul::<F>(tensor_of(&g), tensor_of::<2>(&w).transpose(), None);
                grads.register::<F>(node.id, flex_of(gx));
            }
            if let Some(node) = node_w {
                let gw = super::matmul::<F>(tensor_of::<2>(&x).transpose(), tensor_of(&g), None);
                grads.register::<F>(node.id, flex_of(gw));
            }
            if let Some(node) = node_b {
                let n = dims(&g)[1];
                grads.register::<F>(node.id, flex_from(column_sums(view(&g), n), &[n]));
            }
        }
    }
    Some(match &b {
        Some(b) => record(LinearBackward, [&x, &w, b], (xf, wf), out),
        None => record(LinearBackward, [&x, &w, &untracked_scalar()], (xf, wf), out),
    })
}

/// The sums of the columns of a row-major `[rows, n]` matrix: bands of rows
/// summed in parallel (each row added as one vectorised slice), then the bands.
fn column_sums(values: &[f32], n: usize) -> Vec<f32> {
    let band = (TASK_ELEMENTS / n.max(1)).max(1) * n;
    values
        .par_chunks(band)
        .map(|rows| {
            let mut acc = vec![0f32; n];
            for row in rows.chunks_exact(n) {
                acc.iter_mut().zip(row).for_each(|(a, x)| *a += x);
            }
            acc
        })
        .reduce(|| vec![0f32; n], |mut a, b| {
            a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
            a
        })
}

/// `Σ a ⊙ b ⊙ c` in 16 f32 lanes (vectorised); an empty `b` or `c` counts as ones.
fn lane_dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    const L: usize = 16;
    let at = |v: &[f32], i: usize| if v.is_empty() { 1.0 } else { v[i] };
    let mut acc = [0f32; L];
    let full = a.len() / L * L;
    match (b.is_empty(), c.is_empty()) {
        (false, false) => {
            for ((x, y), z) in a[..full].chunks_exact(L).zip(b.chunks_exact(L)).zip(c.chunks_exact(L)) {
                for i in 0..L {
                    acc[i] += x[i] * y[i] * z[i];
                }
            }
        }
        (false, true) => {
            for (x, y) in a[..full].chunks_exact(L).zip(b.chunks_exact(L)) {
                for i in 0..L {
                    acc[i] += x[i] * y[i];
                }
            }
        }
        _ => {
            for x in a[..full].chunks_exact(L) {
                for i in 0..L {
                    acc[i] += x[i];
                }
            }
        }
    }
    let tail: f32 = (full..a.len()).map(|i| a[i] * at(b, i) * at(c, i)).sum();
    acc.iter().sum::<f32>() + tail
}

/// The largest value of a row, in 16 lanes (vectorised).
fn lane_max(v: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [f32::NEG_INFINITY; L];
    let mut chunks = v.chunks_exact(L);
    for c in &mut chunks {
        for i in 0..L {
            acc[i] = acc[i].max(c[i]);
        }
    }
    chunks.remainder().iter().chain(&acc).fold(f32::NEG_INFINITY, |a, &x| a.max(x))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::activation::{silu, softmax};
    use burn::tensor::Distribution;

    type Ad = burn::backend::Autodiff<F>;

    fn randn<const D: usize>(shape: [usize; D]) -> Tensor<F, D> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
    }

    fn leaf<const D: usize>(t: &Tensor<F, D>) -> Tensor<Ad, D> {
        Tensor::from_data(t.to_data(), &Default::default()).require_grad()
    }

    fn close<const D: usize>(a: Tensor<Ad, D>, b: Tensor<Ad, D>, tol: f32) {
        let a = a.into_data().to_vec::<f32>().unwrap();
        let b = b.into_data().to_vec::<f32>().unwrap();
        assert_eq!(a.len(), b.len());
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs() / (1.0 + y.abs())).fold(0.0, f32::max);
        assert!(worst < tol, "max relative difference {worst}");
    }

    /// Runs `f` on fresh leaves of `inputs` (ours or the composed ops), backward
    /// through `Σ y ⊙ up`; the output and every input's gradient.
    fn run<const D: usize, const N: usize, const DI: usize>(
        inputs: &[Tensor<F, DI>; N],
        up: &Tensor<F, D>,
        f: impl Fn(&[Tensor<Ad, DI>]) -> Tensor<Ad, D>,
    ) -> (Tensor<Ad, D>, Vec<Tensor<Ad, DI>>) {
        let leaves: Vec<Tensor<Ad, DI>> = inputs.iter().map(leaf).collect();
        let y = f(&leaves);
        let grads = (y.clone() * leaf(up).detach()).sum().backward();
        let gs = leaves.iter().map(|l| Tensor::from_inner(l.grad(&grads).expect("a gradient"))).collect();
        (y, gs)
    }

    #[test]
    fn silu_mul_matches_the_composed_ops_and_their_gradients() {
        let inputs = [randn([3, 5, 7]), randn([3, 5, 7])];
        let up = randn([3, 5, 7]);
        let (y1, g1) = run(&inputs, &up, |t| silu_mul(&t[0], &t[1]).expect("Autodiff<Flex> f32"));
        let (y2, g2) = run(&inputs, &up, |t| silu(t[0].clone()) * t[1].clone());
        close(y1, y2, 1e-6);
        for (a, b) in g1.into_iter().zip(g2) {
            close(a, b, 1e-5);
        }
        assert!(silu_mul(&inputs[0], &inputs[1]).is_none(), "not autodiff: not ours");
    }

    fn composed_rms(x: Tensor<Ad, 4>, w: Tensor<Ad, 1>, s: Option<Tensor<Ad, 2>>) -> Tensor<Ad, 4> {
        let [b, _, _, d] = x.dims();
        let r = (x.clone().square().mean_dim(3) + 1e-5).sqrt().recip();
        let y = x * r * w.reshape([1, 1, 1, d]);
        match s {
            Some(s) => y * s.reshape([b, 1, 1, d]),
            None => y,
        }
    }

    #[test]
    fn rms_norm_matches_the_composed_ops_and_their_gradients_with_and_without_a_post_scale() {
        // 40 wide: two full 16-lane blocks and a tail.
        let x = randn([3, 4, 2, 40]);
        let (w, s) = (randn::<1>([40]), randn::<2>([3, 40]));
        let up = randn([3, 4, 2, 40]);
        // x as a transposed view: the kernel reads it in logical order.
        let x_view = x.clone().swap_dims(1, 2);
        let (y1, g1) = run(std::array::from_ref(&x_view), &up.clone().swap_dims(1, 2), |t| {
            rms_norm(&t[0], &leaf(&w), 1e-5, None).expect("ours")
        });
        let (y2, g2) = run(&[x_view], &up.clone().swap_dims(1, 2), |t| composed_rms(t[0].clone(), leaf(&w), None));
        close(y1, y2, 1e-5);
        close(g1[0].clone(), g2[0].clone(), 1e-4);

        // All three gradients, with the post-scale.
        let grads = |ours: bool| {
            let (xl, wl, sl) = (leaf(&x), leaf(&w), leaf(&s));
            let y = if ours {
                rms_norm(&xl, &wl, 1e-5, Some(&sl)).expect("ours")
            } else {
                composed_rms(xl.clone(), wl.clone(), Some(sl.clone()))
            };
            let g = (y.clone() * leaf(&up).detach()).sum().backward();
            (y, xl.grad(&g).unwrap(), wl.grad(&g).unwrap(), sl.grad(&g).unwrap())
        };
        let (y1, gx1, gw1, gs1) = grads(true);
        let (y2, gx2, gw2, gs2) = grads(false);
        close(y1, y2, 1e-5);
        let inner = |t| Tensor::<Ad, 4>::from_inner(t);
        close(inner(gx1), inner(gx2), 1e-4);
        close(Tensor::<Ad, 1>::from_inner(gw1), Tensor::from_inner(gw2), 1e-4);
        close(Tensor::<Ad, 2>::from_inner(gs1), Tensor::from_inner(gs2), 1e-4);
    }

    #[test]
    fn rope_matches_the_pairwise_formula_and_its_gradient() {
        let x = randn([2, 3, 2, 8]);
        let angles = randn::<4>([2, 3, 1, 4]);
        let (c, s) = (leaf(&angles.clone().cos()).detach(), leaf(&angles.sin()).detach());
        let up = randn([2, 3, 2, 8]);
        let (y1, g1) = run(std::array::from_ref(&x), &up, |t| rope_interleaved(&t[0], &c, &s).expect("ours"));
        let (y2, g2) = run(&[x], &up, |t| {
            let pairs = t[0].clone().reshape([2, 3, 2, 4, 2]);
            let x0 = pairs.clone().narrow(4, 0, 1).squeeze_dim::<4>(4);
            let x1 = pairs.narrow(4, 1, 1).squeeze_dim::<4>(4);
            let y0 = x0.clone() * c.clone() - x1.clone() * s.clone();
            let y1 = x0 * s.clone() + x1 * c.clone();
            Tensor::stack::<5>(vec![y0, y1], 4).reshape([2, 3, 2, 8])
        });
        close(y1, y2, 1e-6);
        close(g1[0].clone(), g2[0].clone(), 1e-5);
    }

    #[test]
    fn linear_matches_the_composed_matmul_and_its_gradients_with_and_without_a_bias() {
        // 37 rows, 19 inputs, 70 outputs: column shares of 64 and a tail, and
        // a weight given as a transposed view (as `Linear::weight_from_stored` leaves it off flex).
        let (x, w_stored, bias) = (randn([37, 19]), randn([70, 19]), randn::<1>([70]));
        let up = randn([37, 70]);
        let grads = |ours: bool, with_bias: bool| {
            let (xl, wl, bl) = (leaf(&x), leaf(&w_stored), leaf(&bias));
            let w = wl.clone().transpose();
            let y = if ours {
                linear(&xl, &w, with_bias.then_some(&bl)).expect("Autodiff<Flex> f32")
            } else {
                let y = xl.clone().matmul(w);
                if with_bias { y + bl.clone().unsqueeze::<2>() } else { y }
            };
            let g = (y.clone() * leaf(&up).detach()).sum().backward();
            (y, xl.grad(&g).unwrap(), wl.grad(&g).unwrap(), bl.grad(&g))
        };
        for with_bias in [true, false] {
            let (y1, gx1, gw1, gb1) = grads(true, with_bias);
            let (y2, gx2, gw2, gb2) = grads(false, with_bias);
            close(y1, y2, 1e-5);
            close(Tensor::<Ad, 2>::from_inner(gx1), Tensor::from_inner(gx2), 1e-5);
            close(Tensor::<Ad, 2>::from_inner(gw1), Tensor::from_inner(gw2), 1e-5);
            assert_eq!(gb1.is_some(), with_bias, "a bias gradient exactly when there is a bias");
            if let (Some(a), Some(b)) = (gb1, gb2) {
                close(Tensor::<Ad, 1>::from_inner(a), Tensor::from_inner(b), 1e-5);
            }
        }
        assert!(linear(&x, &w_stored.transpose(), None).is_none(), "not autodiff: not ours");
    }

    #[test]
    fn column_sums_add_every_row_across_bands() {
        // More rows than one band holds (TASK_ELEMENTS / 3), so several bands are summed.
        let rows = TASK_ELEMENTS / 3 * 2 + 5;
        let values: Vec<f32> = (0..rows * 3).map(|i| (i % 3) as f32 + 1.0).collect();
        assert_eq!(column_sums(&values, 3), vec![rows as f32, 2.0 * rows as f32, 3.0 * rows as f32]);
    }

    #[test]
    fn attention_matches_the_composed_softmax_attention_and_its_gradients() {
        // 37 keys: two full 16-lane blocks and a tail in the row sums.
        let (b, s, h, d) = (2, 37, 3, 4);
        let inputs = [randn([b, s, h, d]), randn([b, s, h, d]), randn([b, s, h, d])];
        let up = randn([b, s, h, d]);
        let (y1, g1) = run(&inputs, &up, |t| {
            // k as a strided view (a transposed copy transposed back).
            let k = t[1].clone().swap_dims(1, 2).swap_dims(1, 2);
            attention_bshd(&t[0], &k, &t[2]).expect("ours")
        });
        let (y2, g2) = run(&inputs, &up, |t| {
            let [q, k, v] = [0, 1, 2].map(|i| t[i].clone().swap_dims(1, 2));
            let p = softmax(q.matmul(k.transpose()) / (d as f64).sqrt(), 3);
            p.matmul(v).swap_dims(1, 2)
        });
        close(y1, y2, 1e-5);
        for (a, b) in g1.into_iter().zip(g2) {
            close(a, b, 1e-4);
        }
    }
}
