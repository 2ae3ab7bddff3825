//! Variety: more different images from one prompt across seeds.
//!
//! Z-Image-Turbo draws nearly the same composition whatever the seed (its
//! users' most frequent complaint, Tongyi-MAI/Z-Image#16 and #27), which
//! defeats a grid of variations. Peer tools answer with a perturbation of the
//! prompt's features during the first steps, where the composition is
//! decided, and give the clean features back for the remaining steps, so
//! that the image still follows the prompt. This module does the same with
//! one knob:
//!
//! - on half of the feature values, chosen by the seed, add Gaussian noise of
//!   standard deviation `variety × the token's spread` ([`token_scale`]);
//! - for the first quarter of the steps that run ([`varied_steps`]; the
//!   ComfyUI node most used for this switches back after 20 %).
//!
//! Relative to each token, because the DiT's caption embedder starts with an
//! RMSNorm: it reads every token at its own scale, whatever the text encoder.
//! The spread is a robust one (from the median), because a few of Qwen3's
//! values are hundreds of times larger than the rest (massive activations)
//! and would otherwise set the noise for all the others.
//! The noise comes from its own generator (the image seed mixed with
//! [`SALT`]), so the latent noise, and with variety 0 the whole image, are
//! exactly those of a run without it.

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};

use crate::pipeline::tensor_to_vec;
use crate::rng::TorchGenerator;

/// Largest accepted variety (noise of four times a token's spread already
/// drowns the prompt).
pub const MAX_VARIETY: f32 = 4.0;

/// Mixed into the image seed so that the features' noise never repeats the
/// latent noise of the same seed.
pub const SALT: u64 = 0x7661_7269_6574_7921;

/// Share of the feature values that receive noise.
pub const VARIED_SHARE: f32 = 0.5;

/// How many of the `total` steps that run see the varied features: the first
/// quarter, rounded up (Turbo's 8 steps: 2; the demo Turbo's 4: 1).
pub fn varied_steps(total: usize) -> usize {
    total.div_ceil(4)
}

/// A token's spread: `1.4826 × median |v|`, the standard deviation for
/// normally distributed values, unmoved by a few huge ones.
pub fn token_scale(token: &[f32]) -> f32 {
    let mut magnitudes: Vec<f32> = token.iter().map(|v| v.abs()).collect();
    if magnitudes.is_empty() {
        return 0.0;
    }
    let mid = magnitudes.len() / 2;
    let (_, median, _) = magnitudes.select_nth_unstable_by(mid, f32::total_cmp);
    1.4826 * *median
}

/// Adds the variety noise to one prompt's features `[tokens, dim]`
/// (row-major), drawing from `generator`: per value one uniform draw decides
/// whether it is varied, then one normal draw, both drawn for every value so
/// that the draws do not depend on the features.
pub fn vary_features(features: &mut [f32], dim: usize, variety: f32, generator: &mut TorchGenerator) {
    if dim == 0 {
        return;
    }
    let noise = generator.randn(features.len());
    for (token, token_noise) in features.chunks_mut(dim).zip(noise.chunks(dim)) {
        let scale = variety * token_scale(token);
        for (v, n) in token.iter_mut().zip(token_noise) {
            if generator.uniform_f32() < VARIED_SHARE {
                *v += scale * n;
            }
        }
    }
}

/// The prompts' features `[tokens, dim]` with variety noise, one generator
/// seeded from `seed` for the whole batch (prompts in order); `None` when
/// `variety` is 0. The features are read back once per generation, not per
/// step.
pub fn vary<B: Backend>(captions: &[Tensor<B, 2>], variety: f32, seed: u64) -> Option<Vec<Tensor<B, 2>>> {
    if variety <= 0.0 {
        return None;
    }
    let mut generator = TorchGenerator::manual_seed(seed ^ SALT);
    let varied = captions
        .iter()
        .map(|caption| {
            let [tokens, dim] = caption.dims();
            let (dtype, device) = (caption.dtype(), caption.device());
            let mut features = tensor_to_vec(caption.clone());
            vary_features(&mut features, dim, variety, &mut generator);
            let t = Tensor::<B, 2>::from_data(TensorData::new(features, [tokens, dim]), (&device, DType::F32));
            if dtype == DType::F32 { t } else { t.cast(dtype) }
        })
        .collect();
    Some(varied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(tokens: usize, dim: usize) -> Vec<f32> {
        (0..tokens * dim).map(|i| ((i * 7919) % 23) as f32 - 11.0 + (i / dim) as f32 * 3.0).collect()
    }

    #[test]
    fn noise_is_proportional_to_variety_and_token_spread_on_about_half_the_values() {
        let (tokens, dim) = (6, 400);
        let clean = features(tokens, dim);
        for variety in [0.25f32, 1.0] {
            let mut varied = clean.clone();
            vary_features(&mut varied, dim, variety, &mut TorchGenerator::manual_seed(5));
            for t in 0..tokens {
                let row = &clean[t * dim..(t + 1) * dim];
                let spread = token_scale(row);
                let diffs: Vec<f32> = row.iter().zip(&varied[t * dim..(t + 1) * dim]).map(|(a, b)| b - a).collect();
                let changed: Vec<f32> = diffs.iter().copied().filter(|d| *d != 0.0).collect();
                let share = changed.len() as f32 / dim as f32;
                assert!((0.4..0.6).contains(&share), "token {t}: {share} of the values varied");
                let std = (changed.iter().map(|d| d * d).sum::<f32>() / changed.len() as f32).sqrt();
                let expected = variety * spread;
                assert!((std / expected - 1.0).abs() < 0.15, "token {t}: noise std {std}, expected {expected}");
            }
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_noise_and_another_seed_other_noise() {
        let clean = features(4, 64);
        let run = |seed| {
            let mut f = clean.clone();
            vary_features(&mut f, 64, 0.5, &mut TorchGenerator::manual_seed(seed));
            f
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn zero_variety_changes_nothing_and_steps_are_the_first_half() {
        type B = crate::device::CpuBackend;
        let device = Default::default();
        let caption = Tensor::<B, 2>::from_data(TensorData::new(features(3, 8), [3, 8]), &device);
        assert!(vary(std::slice::from_ref(&caption), 0.0, 7).is_none());
        let varied = vary(&[caption.clone(), caption.clone()], 0.5, 7).expect("varied");
        assert_eq!(varied.len(), 2);
        assert_eq!(varied[0].dims(), [3, 8]);
        // One generator for the batch: the second prompt gets other noise.
        assert_ne!(tensor_to_vec(varied[0].clone()), tensor_to_vec(varied[1].clone()));
        assert_ne!(tensor_to_vec(varied[0].clone()), tensor_to_vec(caption));
        assert_eq!([1, 2, 4, 5, 8, 9, 30, 50].map(varied_steps), [1, 1, 1, 2, 2, 3, 8, 13]);
    }

    #[test]
    fn spread_is_the_normal_standard_deviation_and_ignores_a_few_huge_values() {
        let mut g = TorchGenerator::manual_seed(3);
        let mut values: Vec<f32> = g.randn(20_000).iter().map(|v| 3.0 * v).collect();
        assert!((token_scale(&values) / 3.0 - 1.0).abs() < 0.03, "{}", token_scale(&values));
        let before = token_scale(&values);
        values[..20].iter_mut().for_each(|v| *v = 5000.0);
        assert!((token_scale(&values) / before - 1.0).abs() < 0.01);
        assert_eq!(token_scale(&[]), 0.0);
    }
}
