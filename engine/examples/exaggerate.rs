//! Diagnostic for the demo model (docs/demo-model.md, session 17): would a
//! "caricature" training target `x0 + k·(x0 − x0')` (x0' the same scene with
//! every shape swapped: square ↔ circle, triangle → circle) decode as sharper
//! shapes? Encodes 150 training scenes and their swapped twins with the
//! shipped VAE, decodes the pushed latents for several k and judges them.
//!
//! `cargo run --release --example exaggerate` (from the repository root).
use burn::tensor::{DType, Tensor, TensorData};
use zimage_engine::demo::eval::load_vae_dir;
use zimage_engine::demo::judge::judge;
use zimage_engine::demo::world::{image_to_chw, render, Scene, Shape, Size, Split, WorldSampler, IMAGE_SIDE};
use zimage_engine::device::CpuBackend as B;
use zimage_engine::pipeline::{tensor_to_vec, to_rgb8};

fn main() -> anyhow::Result<()> {
    let device = Default::default();
    // The shipped VAE alone (encoder and decoder): nothing else is needed.
    let (_, vae) = load_vae_dir(std::path::Path::new("assets/demo/vae"), &device)?;
    let n = IMAGE_SIDE;
    // Any fixed seed: the scenes are only a sample of the training world.
    let mut world = WorldSampler::new(77);
    let ks = [0.0f32, 0.1, 0.2, 0.3, 0.5];
    // [k][kind: small then large, each in Shape::ALL order][fully right, seen]
    let mut stats = vec![[[0usize; 2]; 6]; ks.len()];
    for _ in 0..150 {
        let scene = world.scene(Split::Train);
        let pl = world.placements(&scene);
        let alt = Scene {
            background: scene.background,
            objects: scene
                .objects
                .iter()
                .map(|o| {
                    let mut o = *o;
                    o.shape = match o.shape {
                        Shape::Square => Shape::Circle,
                        Shape::Circle => Shape::Square,
                        Shape::Triangle => Shape::Circle,
                    };
                    o
                })
                .collect(),
        };
        let enc = |s: &Scene| -> anyhow::Result<Tensor<B, 4>> {
            let img = render(s, &pl);
            let t = Tensor::<B, 4>::from_data(TensorData::new(image_to_chw(&img), [1, 3, n, n]), (&device, DType::F32));
            let (mean, _) = vae.encode(t).ok_or_else(|| anyhow::anyhow!("no encoder"))?;
            Ok(vae.scale(mean))
        };
        let z = enc(&scene)?;
        let za = enc(&alt)?;
        for (ki, &k) in ks.iter().enumerate() {
            let zk = z.clone() + (z.clone() - za.clone()) * k;
            let img = to_rgb8(&tensor_to_vec(vae.decode(vae.unscale(zk))), n, n);
            let v = judge(&img, &scene);
            for (o, ov) in scene.objects.iter().zip(&v.objects) {
                let shape = Shape::ALL.iter().position(|&s| s == o.shape).unwrap_or(0);
                let kind = usize::from(o.size == Size::Large) * Shape::ALL.len() + shape;
                stats[ki][kind][1] += 1;
                stats[ki][kind][0] += ov.all() as usize;
            }
        }
    }
    println!("k    | objects fully right: small {0:?}, then large {0:?}", Shape::ALL);
    for (ki, k) in ks.iter().enumerate() {
        let row: Vec<String> = stats[ki].iter().map(|s| format!("{}/{}", s[0], s[1])).collect();
        println!("{k:.1}  | {}", row.join("  "));
    }
    Ok(())
}
