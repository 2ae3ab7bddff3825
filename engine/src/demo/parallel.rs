//! Data-parallel gradients on the CPU: one replica of the model per thread,
//! each with its share of the batch, gradients summed.
//!
//! Why: at the demo's sizes (batches of 24 short sequences, 32² to 128²
//! convolutions) most of flex's kernels stay below their own parallel
//! thresholds, so one training step keeps about one core busy (measured:
//! ~100 % CPU on the 2-core machines). Splitting the batch over threads uses
//! the other core. Each replica is built from the model's inner (non-autodiff)
//! copy, so it has its own autodiff graph (graphs that share no node never
//! lock each other) and the same parameter ids, so the summed gradients apply
//! to the original model unchanged.

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;

use super::train::{Ad, Inner};

/// The gradients of `Σ_k w_k · loss(model, part_k)` with `w_k = len_k / Σ len`
/// (the batch mean when each part's loss is its own mean), and that loss's
/// value. `parts[0]` runs on the calling thread, the others on their own.
pub fn data_parallel_grads<M, T>(
    model: &M,
    parts: &[(T, usize)],
    loss: impl Fn(&M, &T) -> anyhow::Result<Tensor<Ad, 1>> + Sync,
) -> anyhow::Result<(GradientsParams, f32)>
where
    M: AutodiffModule<Ad> + Send,
    M::InnerModule: Module<Inner> + Clone,
    T: Sync,
{
    anyhow::ensure!(!parts.is_empty(), "no data");
    let total: usize = parts.iter().map(|p| p.1).sum();
    let inner = model.valid();
    let one = |replica: M, part: &T, len: usize| -> anyhow::Result<(GradientsParams, f32)> {
        let l = loss(&replica, part)? * (len as f32 / total.max(1) as f32);
        let value = super::train::scalar(l.clone());
        Ok((GradientsParams::from_grads(l.backward(), &replica), value))
    };
    let pools = replica_pools(parts.len())?;
    let results: Vec<anyhow::Result<(GradientsParams, f32)>> = std::thread::scope(|s| {
        let handles: Vec<_> = parts[1..]
            .iter()
            .zip(&pools[1..])
            .map(|((part, len), pool)| {
                let replica = trainable::<M>(inner.clone());
                let one = &one;
                s.spawn(move || pool.install(|| one(replica, part, *len)))
            })
            .collect();
        let first = trainable::<M>(inner.clone());
        let mut out = vec![pools[0].install(|| one(first, &parts[0].0, parts[0].1))];
        for h in handles {
            out.push(h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a training thread panicked"))));
        }
        out
    });
    let mut sum: Option<GradientsParams> = None;
    let mut value = 0.0;
    for r in results {
        let (grads, v) = r?;
        value += v;
        sum = Some(match sum {
            None => grads,
            Some(mut acc) => {
                inner.visit(&mut AddGrads { sum: &mut acc, add: grads });
                acc
            }
        });
    }
    Ok((sum.unwrap_or_default(), value))
}

/// One single-threaded rayon pool per replica (built once, reused): each
/// replica's kernels, flex's and ours, run on its own core and split no work
/// with the other replica's. With rayon's shared pool every product was cut in
/// two and both halves queued behind the other replica's work.
fn replica_pools(n: usize) -> anyhow::Result<Vec<std::sync::Arc<rayon::ThreadPool>>> {
    static POOLS: std::sync::Mutex<Vec<std::sync::Arc<rayon::ThreadPool>>> = std::sync::Mutex::new(Vec::new());
    let mut pools = POOLS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    while pools.len() < n {
        let k = pools.len();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(move |_| format!("replica-{k}"))
            .build()
            .map_err(|e| anyhow::anyhow!("cannot start a training thread: {e}"))?;
        pools.push(std::sync::Arc::new(pool));
    }
    Ok(pools[..n].to_vec())
}

/// An autodiff copy of `inner` with fresh leaves for every parameter (same
/// ids), all taking gradients: `from_inner` alone keeps the `require_grad`
/// flag the inner copy carries, which is not set for parameters loaded from
/// disk or built lazily. Each replica is one.
pub fn trainable<M: AutodiffModule<Ad>>(inner: M::InnerModule) -> M {
    M::from_inner(inner).map(&mut RequireGrad)
}

struct RequireGrad;

impl ModuleMapper<Ad> for RequireGrad {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<Ad, D>>) -> Param<Tensor<Ad, D>> {
        let (id, tensor, mapper) = param.consume();
        Param::from_mapped_value(id, tensor.require_grad(), mapper)
    }
}

/// Adds `add`'s gradients into `sum`, parameter by parameter.
struct AddGrads<'a> {
    sum: &'a mut GradientsParams,
    add: GradientsParams,
}

impl ModuleVisitor<Inner> for AddGrads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Inner, D>>) {
        let Some(b) = self.add.remove::<Inner, D>(param.id) else { return };
        let merged = match self.sum.remove::<Inner, D>(param.id) {
            Some(a) => a + b,
            None => b,
        };
        self.sum.register(param.id, merged);
    }
}

/// Splits `n` items into `parts` contiguous ranges of nearly equal length.
pub fn split_ranges(n: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.clamp(1, n.max(1));
    (0..parts).map(|k| (k * n / parts)..((k + 1) * n / parts)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::backend::Backend;
    use burn::tensor::{Distribution, TensorData};

    #[derive(Module, Debug)]
    struct Net<B: Backend> {
        a: Linear<B>,
        b: Linear<B>,
    }

    #[test]
    fn split_gradients_equal_the_whole_batch_gradients() {
        let device = Default::default();
        let net = Net { a: LinearConfig::new(6, 5).init(&device), b: LinearConfig::new(5, 3).init(&device) };
        let x = Tensor::<Ad, 2>::random([10, 6], Distribution::Normal(0.0, 1.0), &device);
        let loss = |m: &Net<Ad>, x: &Tensor<Ad, 2>| Ok(m.b.forward(m.a.forward(x.clone()).tanh()).square().mean());
        let whole = loss(&net, &x).unwrap();
        let reference = GradientsParams::from_grads(whole.backward(), &net);
        let parts: Vec<(Tensor<Ad, 2>, usize)> = split_ranges(10, 2).into_iter().map(|r| (x.clone().slice([r.clone(), 0..6]), r.len())).collect();
        let (grads, value) = data_parallel_grads(&net, &parts, |m, x| loss(m, x)).unwrap();
        let w = |g: &GradientsParams, id| g.get::<Inner, 2>(id).unwrap().into_data();
        let diff = |a: TensorData, b: TensorData| {
            a.to_vec::<f32>().unwrap().iter().zip(b.to_vec::<f32>().unwrap()).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max)
        };
        for id in [net.a.weight.id, net.b.weight.id] {
            assert!(diff(w(&grads, id), w(&reference, id)) < 1e-5);
        }
        assert!((value - super::super::train::scalar(loss(&net, &x).unwrap())).abs() < 1e-5);
        assert_eq!(split_ranges(5, 2), vec![0..2, 2..5]);
        assert_eq!(split_ranges(1, 2), vec![0..1]);
    }
}
