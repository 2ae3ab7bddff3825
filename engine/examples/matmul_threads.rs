//! Matmul throughput at the shapes of a `medium` DiT step, the text encoder and
//! a VAE conv tile: flex's own matmul against `fused::matmul` (the one `Linear`
//! uses on the CPU); then 3×3 convolutions at the shapes of a `medium` VAE
//! decode (256²): flex's `conv2d` against `fused::conv3x3`. Run with
//! RAYON_NUM_THREADS=1 and =2 to see what the second core adds;
//! `bench/matmul_torch.py` times PyTorch's matmuls on the same shapes.
//!
//! cargo run --release -p zimage-engine --example matmul_threads
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Distribution, Tensor};
use zimage_engine::device::CpuBackend as B;

fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let t = std::time::Instant::now();
    for _ in 0..reps {
        f();
    }
    t.elapsed().as_secs_f64() / reps as f64
}

fn main() {
    zimage_engine::device::tune_allocator(); // as both binaries do
    let device = Default::default();
    println!("threads: {}", rayon::current_num_threads());
    for (m, k, n) in [(384usize, 768usize, 768usize), (384, 768, 2048), (384, 2048, 768), (100, 1024, 3072), (4096, 576, 64)] {
        let x = Tensor::<B, 2>::random([m, k], Distribution::Normal(0.0, 1.0), &device);
        // A stored [n, k] weight, transposed and laid out as rows at load, as `Linear` does.
        let w = zimage_engine::fused::contiguous(Tensor::<B, 2>::random([n, k], Distribution::Normal(0.0, 1.0), &device).transpose());
        let flex = time(20, || drop(x.clone().matmul(w.clone()).into_data()));
        let ours = time(20, || drop(zimage_engine::fused::matmul(x.clone(), w.clone(), None).into_data()));
        let gflops = |s: f64| 2.0 * (m * k * n) as f64 / s / 1e9;
        println!(
            "{m}x{k}x{n}: flex {:.2} ms ({:.0} GFLOP/s), fused {:.2} ms ({:.0} GFLOP/s)",
            flex * 1e3,
            gflops(flex),
            ours * 1e3,
            gflops(ours)
        );
    }
    for (c_in, c_out, side) in [(64usize, 64usize, 256usize), (128, 128, 128), (256, 256, 64), (256, 256, 32)] {
        let x = Tensor::<B, 4>::random([1, c_in, side, side], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<B, 4>::random([c_out, c_in, 3, 3], Distribution::Normal(0.0, 0.1), &device);
        let b = Tensor::<B, 1>::random([c_out], Distribution::Normal(0.0, 0.1), &device);
        let opts = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
        let flex = time(5, || drop(conv2d(x.clone(), w.clone(), Some(b.clone()), opts.clone()).into_data()));
        let ours = time(5, || drop(zimage_engine::fused::conv3x3(x.clone(), w.clone(), Some(b.clone())).into_data()));
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
