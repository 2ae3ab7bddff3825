//! Flow-matching Euler schedule (diffusers `FlowMatchEulerDiscreteScheduler`
//! as `ZImagePipeline` drives it), in the reference's f32 operation order:
//!
//! ```text
//! s_i = linspace(1, 1/N, N)[i]                       (torch f32 linspace)
//! σ_i = shift·s_i / (1 + (shift − 1)·s_i)            (f32)
//! σ_N = 0
//! t_model_i = (1000 − 1000·σ_i) / 1000               (f32; 0 = pure noise)
//! x ← x + (σ_{i+1} − σ_i) · (−u)                     (Euler on v = −u)
//! ```

/// `num_train_timesteps` of every Z-Image scheduler config.
pub const TRAIN_TIMESTEPS: f32 = 1000.0;

/// A schedule of `steps` sigmas plus the terminal 0.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// `[σ_0, …, σ_{N−1}, 0]`.
    pub sigmas: Vec<f32>,
}

impl Schedule {
    /// The default Z-Image schedule for `steps` steps and a time `shift`.
    pub fn new(steps: usize, shift: f32) -> Self {
        let base = torch_linspace(1.0, 1.0 / steps as f64, steps);
        let mut sigmas: Vec<f32> = base.into_iter().map(|s| shift * s / (1.0 + (shift - 1.0) * s)).collect();
        sigmas.push(0.0);
        Self { sigmas }
    }

    pub fn steps(&self) -> usize {
        self.sigmas.len() - 1
    }

    /// The DiT's time input at step `i`: `(1000 − timestep_i)/1000` with
    /// `timestep_i = σ_i·1000`, exactly as the pipeline computes it.
    pub fn model_time(&self, i: usize) -> f32 {
        let timestep = self.sigmas[i] * TRAIN_TIMESTEPS;
        (TRAIN_TIMESTEPS - timestep) / TRAIN_TIMESTEPS
    }

    /// `σ_{i+1} − σ_i` (negative), the Euler step size on `v = −u`.
    pub fn dt(&self, i: usize) -> f32 {
        self.sigmas[i + 1] - self.sigmas[i]
    }

    /// img2img: the first step to run for `strength` in (0, 1], by the
    /// reference's rule `t_start = int(N − min(N·strength, N))` in Python floats.
    ///
    /// The strength is taken as written (f32's shortest decimal form, read as
    /// f64): `0.6f32` is 0.6000000238, which would make 10 steps at 0.6 run 7
    /// steps where diffusers, given the Python float 0.6, runs 6.
    pub fn img2img_start(steps: usize, strength: f32) -> usize {
        let strength: f64 = strength.to_string().parse().unwrap_or(strength as f64);
        let n = steps as f64;
        let init = (n * strength).min(n);
        (n - init).max(0.0) as usize
    }
}

/// `torch.linspace(start, end, n)` for f32: the first half counts up from
/// `start`, the second half down from `end`, with `step = (end − start)/(n − 1)`;
/// torch's CPU kernel computes each point with one fused multiply-add.
pub fn torch_linspace(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    match n {
        0 => vec![],
        1 => vec![start],
        _ => {
            let step = (end - start) / (n - 1) as f32;
            let half = n / 2;
            (0..n)
                .map(
                    |i| if i < half { step.mul_add(i as f32, start) } else { (-step).mul_add((n - 1 - i) as f32, end) },
                )
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turbo_schedule_matches_the_published_table() {
        let s = Schedule::new(8, 3.0);
        let expect = [1.0, 0.9545454, 0.9, 0.8333333, 0.75, 0.6428571, 0.5, 0.3, 0.0];
        for (a, b) in s.sigmas.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert_eq!(s.model_time(0), 0.0);
        assert!(s.dt(7) < 0.0);
    }

    #[test]
    fn base_schedule_tail() {
        let s = Schedule::new(50, 6.0);
        let tail = &s.sigmas[45..50];
        for (a, b) in tail.iter().zip([0.4, 0.342857, 0.276923, 0.2, 0.109091]) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn img2img_start_rule() {
        assert_eq!(Schedule::img2img_start(8, 0.6), 3);
        assert_eq!(Schedule::img2img_start(8, 1.0), 0);
        assert_eq!(Schedule::img2img_start(10, 0.5), 5);
        assert_eq!(Schedule::img2img_start(8, 0.01), 7);
        // As diffusers with Python floats: 10 steps at 0.6 run 6 (not 7), 0.7 runs 7.
        assert_eq!(Schedule::img2img_start(10, 0.6), 4);
        assert_eq!(Schedule::img2img_start(10, 0.7), 3);
        assert_eq!(Schedule::img2img_start(50, 0.3), 35);
    }
}
