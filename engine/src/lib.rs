//! Z-Image inference in burn: the Qwen3 text encoder, the S3-DiT, the Flux
//! VAE, the flow-matching sampler and checkpoint loading, checked for parity
//! against the reference implementation (diffusers). No GUI dependency.
//!
//! Start at [`loader::ModelFiles::locate`] and [`loader::load_pipeline`], then
//! [`pipeline::ZImagePipeline::generate`].

pub mod bench;
pub mod cube_kernels;
pub mod cublas;
pub mod cuda_kernels;
pub mod demo;
pub mod device;
pub mod discovery;
pub mod dit;
pub mod error;
pub mod fp8;
pub mod fused;
pub mod kernel_bench;
pub mod loader;
pub mod lora;
pub mod memory;
pub mod metadata;
pub mod nn;
pub mod pipeline;
pub mod preview;
pub mod pull;
pub mod qwen3;
pub mod rng;
pub mod scheduler;
pub mod text;
pub mod vae;
pub mod variety;
pub mod weights;
pub mod wildcards;
pub mod xmp;

pub use error::{EngineError, Result};
pub use pipeline::{GenerateRequest, Generated, ModelKind, ZImagePipeline};
