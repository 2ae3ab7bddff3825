//! The demo training's optimizer and weight average, one pass per parameter.
//!
//! [`AdamW`] computes what burn's `AdamW` with norm gradient clipping
//! computes (decoupled weight decay, bias-corrected moments, each
//! parameter's gradient clipped to norm ≤ `clip_norm` on its own, burn's
//! defaults β₁ 0.9, β₂ 0.999, ε 10⁻⁵), and [`blend`] the average's
//! `decay·avg + (1 − decay)·current`. Why: burn's versions are a dozen tensor
//! ops per parameter, each a pass over memory with its own allocation, on
//! one thread between the replicas' parallel steps: 25 ms (optimizer) and
//! 7 ms (average) of a ≈ 330 ms Base step on the 2-core machines (session 14).
//! Tested against burn's over several steps.

use std::collections::HashMap;

use burn::module::{AutodiffModule, ModuleMapper, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

use super::train::{Ad, Inner};

/// Elements per parallel task of the update passes.
const CHUNK: usize = 16 * 1024;

/// AdamW with per-parameter gradient clipping, as burn's (see the module docs).
pub struct AdamW {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
    /// Each parameter's gradient is scaled down to this L2 norm when above it.
    clip_norm: Option<f32>,
    moments: HashMap<ParamId, Moments>,
}

/// One parameter's optimizer state.
struct Moments {
    m: Vec<f32>,
    v: Vec<f32>,
    /// Steps taken (for the bias correction).
    time: i32,
}

impl AdamW {
    pub fn new(weight_decay: f32, clip_norm: Option<f32>) -> Self {
        Self { beta_1: 0.9, beta_2: 0.999, epsilon: 1e-5, weight_decay, clip_norm, moments: HashMap::new() }
    }

    /// One step at learning rate `lr` on every parameter of `model` that has a
    /// gradient in `grads` (the others are left as they are).
    pub fn step<M: AutodiffModule<Ad>>(&mut self, lr: f64, model: M, grads: GradientsParams) -> M {
        model.map(&mut Step { opt: self, lr, grads })
    }
}

struct Step<'a> {
    opt: &'a mut AdamW,
    lr: f64,
    grads: GradientsParams,
}

impl ModuleMapper<Ad> for Step<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<Ad, D>>) -> Param<Tensor<Ad, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<Inner, D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let require_grad = tensor.is_require_grad();
        let (shape, device) = (tensor.shape(), tensor.device());
        let mut p = values(tensor.inner());
        let g = values(grad);
        let (b1, b2, eps, decay, clip_norm) =
            (self.opt.beta_1, self.opt.beta_2, self.opt.epsilon, self.opt.weight_decay, self.opt.clip_norm);
        let state = self.opt.moments.entry(id).or_insert_with(|| Moments { m: vec![0.0; p.len()], v: vec![0.0; p.len()], time: 0 });
        state.time += 1;
        let clip = match clip_norm {
            Some(max) => {
                let norm = g.par_chunks(CHUNK).map(|c| c.iter().map(|&x| x as f64 * x as f64).sum::<f64>()).sum::<f64>().sqrt() as f32;
                (max / (norm + f32::MIN_POSITIVE)).min(1.0)
            }
            None => 1.0,
        };
        let (c1, c2) = (1.0 - b1.powi(state.time), 1.0 - b2.powi(state.time));
        let keep = (1.0 - self.lr * decay as f64) as f32;
        let lr = self.lr as f32;
        p.par_chunks_mut(CHUNK)
            .zip(state.m.par_chunks_mut(CHUNK))
            .zip(state.v.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((p, m), v), g)| {
                for (((p, m), v), &g) in p.iter_mut().zip(m).zip(v).zip(g) {
                    let g = g * clip;
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    *p = *p * keep - lr * ((*m / c1) / ((*v / c2).sqrt() + eps));
                }
            });
        let mut updated = Tensor::<Ad, D>::from_inner(Tensor::from_data(TensorData::new(p, shape), &device));
        if require_grad {
            updated = updated.require_grad();
        }
        Param::from_mapped_value(id, updated, mapper)
    }
}

/// `decay·avg + (1 − decay)·current` for every parameter of `avg`, matched by id
/// (parameters `current` lacks are kept).
pub fn blend<M: burn::module::Module<Inner>>(avg: M, current: &M, decay: f32) -> M {
    avg.map(&mut Blend { current: param_values(current), decay })
}

/// Every float parameter's values, by id.
pub(crate) fn param_values<M: burn::module::Module<Inner>>(m: &M) -> HashMap<ParamId, Vec<f32>> {
    let mut collect = Collect(HashMap::new());
    m.visit(&mut collect);
    collect.0
}

struct Collect(HashMap<ParamId, Vec<f32>>);

impl burn::module::ModuleVisitor<Inner> for Collect {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Inner, D>>) {
        self.0.insert(param.id, values(param.val()));
    }
}

struct Blend {
    current: HashMap<ParamId, Vec<f32>>,
    decay: f32,
}

impl ModuleMapper<Inner> for Blend {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<Inner, D>>) -> Param<Tensor<Inner, D>> {
        let (id, avg, mapper) = param.consume();
        let Some(cur) = self.current.remove(&id) else {
            return Param::from_mapped_value(id, avg, mapper);
        };
        let (shape, device) = (avg.shape(), avg.device());
        let mut a = values(avg);
        let d = self.decay;
        a.par_chunks_mut(CHUNK).zip(cur.par_chunks(CHUNK)).for_each(|(a, c)| {
            a.iter_mut().zip(c).for_each(|(a, &c)| *a = d * *a + (1.0 - d) * c);
        });
        Param::from_mapped_value(id, Tensor::from_data(TensorData::new(a, shape), &device), mapper)
    }
}

/// The values of an f32 tensor in logical order (no copy when it owns them alone).
fn values<const D: usize>(t: Tensor<Inner, D>) -> Vec<f32> {
    t.into_data().into_vec::<f32>().unwrap_or_else(|e| unreachable!("training tensors are f32: {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Module;
    use burn::optim::grad_clipping::GradientClippingConfig;
    use burn::optim::{AdamWConfig, Optimizer};
    use burn::tensor::Distribution;

    #[derive(Module, Debug)]
    struct Two<B: burn::tensor::backend::Backend> {
        a: Param<Tensor<B, 2>>,
        b: Param<Tensor<B, 1>>,
        /// Never given a gradient: must stay as it is.
        frozen: Param<Tensor<B, 1>>,
    }

    fn model() -> Two<Ad> {
        let device = Default::default();
        let t = |shape: Vec<usize>| Tensor::<Inner, 2>::random([shape[0], shape[1]], Distribution::Normal(0.0, 1.0), &device);
        // More elements than one parallel task, so the chunked passes are covered.
        let a = t(vec![150, 130]);
        let b = t(vec![1, 7]).reshape([7]);
        let frozen = t(vec![1, 3]).reshape([3]);
        crate::demo::parallel::trainable(Two { a: Param::from_tensor(a), b: Param::from_tensor(b), frozen: Param::from_tensor(frozen) })
    }

    /// Gradients of a loss whose gradient norms straddle the clipping threshold
    /// (large for `a`, small for `b`), `frozen` left out.
    fn grads(m: &Two<Ad>, step: usize) -> GradientsParams {
        let a = m.a.val();
        let loss = (a.clone() * a.clone()).sum() * (0.5 + step as f32) + (m.b.val() * 1e-3).sum() + a.sin().sum() * 1e-2;
        let g = loss.backward();
        let mut params = GradientsParams::new();
        params.register(m.a.id, m.a.val().grad(&g).unwrap());
        params.register(m.b.id, m.b.val().grad(&g).unwrap());
        params
    }

    #[test]
    fn adamw_computes_what_burns_adamw_with_norm_clipping_computes() {
        let start = model();
        let mut ours = AdamW::new(0.01, Some(1.0));
        let mut burns = AdamWConfig::new()
            .with_weight_decay(0.01)
            .with_grad_clipping(Some(GradientClippingConfig::Norm(1.0)))
            .init::<Ad, Two<Ad>>();
        let (mut m1, mut m2) = (trainable_copy(&start), trainable_copy(&start));
        for step in 0..5 {
            let lr = 1e-2 * (step + 1) as f64;
            let (g1, g2) = (grads(&m1, step), grads(&m2, step));
            m1 = ours.step(lr, m1, g1);
            m2 = burns.step(lr, m2, g2);
        }
        for (x, y, name) in [(m1.a.val().into_data(), m2.a.val().into_data(), "a"), (m1.b.val().into_data(), m2.b.val().into_data(), "b")] {
            let (x, y) = (x.to_vec::<f32>().unwrap(), y.to_vec::<f32>().unwrap());
            let worst = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0.0, f32::max);
            assert!(worst < 1e-5, "{name}: max difference {worst}");
        }
        assert_eq!(m1.frozen.val().into_data(), start.frozen.val().into_data(), "no gradient, no change");
        assert!(m1.a.val().is_require_grad(), "parameters still take gradients");
        let moved = (m1.a.val() - start.a.val()).abs().max().into_scalar();
        assert!(moved > 1e-3, "the optimizer moved the weights ({moved})");
    }

    fn trainable_copy(m: &Two<Ad>) -> Two<Ad> {
        crate::demo::parallel::trainable(m.valid())
    }

    /// The same parameters (ids) with other values.
    struct Moved;

    impl ModuleMapper<Inner> for Moved {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<Inner, D>>) -> Param<Tensor<Inner, D>> {
            let (id, t, mapper) = param.consume();
            Param::from_mapped_value(id, t * 2.0 + 1.0, mapper)
        }
    }

    #[test]
    fn blend_is_the_weighted_average_parameter_by_parameter() {
        let avg = model().valid();
        let cur = avg.clone().map(&mut Moved);
        let out = blend(avg.clone(), &cur, 0.75);
        let expected = avg.a.val() * 0.75 + cur.a.val() * 0.25;
        let worst = (out.a.val() - expected).abs().max().into_scalar();
        assert!(worst < 1e-6, "{worst}");
        let expected_b = avg.b.val() * 0.75 + cur.b.val() * 0.25;
        assert!((out.b.val() - expected_b).abs().max().into_scalar() < 1e-6);
    }
}
