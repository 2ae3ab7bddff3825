//! 3×3 convolution throughput at the shapes of a `medium` VAE decode (256²):
//! flex's `conv2d` against `fused::conv3x3`, in GFLOP/s. Run with
//! RAYON_NUM_THREADS=1 and =2 to see what the second core adds.
//!
//! cargo run --release -p zimage-engine --example conv_threads
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Distribution, Tensor};
use zimage_engine::device::CpuBackend as B;

fn time(mut f: impl FnMut()) -> f64 {
    f();
    let reps = 5;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        f();
    }
    t.elapsed().as_secs_f64() / reps as f64
}

fn main() {
    let device = Default::default();
    println!("threads: {}", rayon::current_num_threads());
    for (c_in, c_out, side) in [(64usize, 64usize, 256usize), (128, 128, 128), (256, 256, 64), (256, 256, 32)] {
        let x = Tensor::<B, 4>::random([1, c_in, side, side], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<B, 4>::random([c_out, c_in, 3, 3], Distribution::Normal(0.0, 0.1), &device);
        let b = Tensor::<B, 1>::random([c_out], Distribution::Normal(0.0, 0.1), &device);
        let opts = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
        let flex = time(|| drop(conv2d(x.clone(), w.clone(), Some(b.clone()), opts.clone()).into_data()));
        let ours = time(|| drop(zimage_engine::fused::conv3x3(x.clone(), w.clone(), Some(b.clone())).into_data()));
        let gflops = |s: f64| 2.0 * (9 * c_in * c_out * side * side) as f64 / s / 1e9;
        println!(
            "{c_in}->{c_out} @ {side}²: flex {:.1} ms ({:.0} GFLOP/s), fused {:.1} ms ({:.0} GFLOP/s)",
            flex * 1e3,
            gflops(flex),
            ours * 1e3,
            gflops(ours)
        );
    }
}
