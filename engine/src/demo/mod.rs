//! The built-in demo model (issue 4): a miniature Z-Image Base + Turbo pair
//! trained by this crate on a procedural world of coloured shapes, stored as
//! diffusers-layout folders with bf16 safetensors that the regular loader reads.
//!
//! - [`world`]: the scene generator, captions and renderer;
//! - [`judge`]: reads pictures back into scenes (pixel analysis);
//! - [`tokenizer`]: the word-level `tokenizer.json` with Qwen3's special tokens;
//! - [`export`]: trained modules → bf16 safetensors with checkpoint names;
//! - [`train`]: [`train_demo`], the whole recipe (VAE, text encoder + Base DiT,
//!   Turbo distillation) on the CPU with burn's autodiff;
//! - [`eval`]: [`eval_demo`], Base vs Turbo on held-out captions.
//!
//! Layout written by [`train_demo`]:
//! ```text
//! <out>/tokenizer/tokenizer.json      shared
//! <out>/text_encoder/                 shared (config.json, model.safetensors)
//! <out>/vae/                          shared (config.json, diffusion_pytorch_model.safetensors)
//! <out>/{base,turbo}/model_index.json
//! <out>/{base,turbo}/scheduler/scheduler_config.json
//! <out>/{base,turbo}/transformer/     (config.json, diffusion_pytorch_model.safetensors)
//! ```

pub mod eval;
pub mod export;
pub mod judge;
pub mod optim;
pub mod parallel;
pub mod plot;
pub mod tokenizer;
pub mod train;
pub mod world;

pub use eval::{eval_demo, EvalDemoOptions, EvalReport};
pub use train::{train_demo, Phase, TrainDemoOptions, TrainReport};

use crate::dit::ZImageDitConfig;
use crate::qwen3::Qwen3Config;
use crate::vae::VaeConfig;

/// Scheduler shift of the demo Turbo (as the real Turbo).
pub const TURBO_SHIFT: f32 = 3.0;
/// Scheduler shift of the demo Base (≥ 4.5 marks a Base model; the real Base uses 6.0).
pub const BASE_SHIFT: f32 = 6.0;
/// Sampling settings compared by the evaluation (issue 4).
pub const TURBO_STEPS: usize = 4;
pub const BASE_STEPS: usize = 30;
pub const BASE_GUIDANCE: f32 = 4.0;

/// The tiny Qwen3 text encoder: 2 of its 3 layers are used
/// (`hidden_states[-2]`), as Z-Image uses the real one.
pub fn text_encoder_config() -> Qwen3Config {
    Qwen3Config::new()
        .with_vocab_size(64)
        .with_hidden_size(64)
        .with_num_hidden_layers(3)
        .with_num_attention_heads(4)
        .with_num_key_value_heads(2)
        .with_head_dim(16)
        .with_intermediate_size(192)
        .with_rms_norm_eps(1e-6)
        .with_rope_theta(10_000.0)
}

/// The Flux-structured autoencoder, narrower: 4 levels (×8 down), 16 latent
/// channels, one ResNet per encoder level.
pub fn vae_config() -> VaeConfig {
    VaeConfig::new()
        .with_latent_channels(16)
        .with_block_out_channels(vec![8, 8, 16, 32])
        .with_layers_per_block(1)
        .with_norm_num_groups(2)
}

/// The S3-DiT, miniature: 1 refiner block per stream, 3 joint blocks, dim 192
/// (6 heads of 32; run 9 and earlier: dim 128, see docs/demo-model.md).
pub fn dit_config() -> ZImageDitConfig {
    ZImageDitConfig::new()
        .with_dim(192)
        .with_n_heads(6)
        .with_n_layers(3)
        .with_n_refiner_layers(1)
        .with_cap_feat_dim(64)
        .with_in_channels(16)
        .with_axes_dims([8, 12, 12])
}
