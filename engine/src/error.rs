//! The engine's error type: one enum, one plain-words line per failure.

use std::path::PathBuf;

/// Everything that can go wrong inside the engine. Each message is one line a
/// user can act on; callers at the edges (CLI, app) print it as is.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{}: not a valid safetensors file: {reason}", path.display())]
    BadSafetensors { path: PathBuf, reason: String },

    #[error(
        "{}: pickle checkpoints (.ckpt, .pt, .pth, .bin) can run arbitrary code when loaded and are refused; use the .safetensors version of this model",
        path.display()
    )]
    PickleRefused { path: PathBuf },

    #[error("{}: {reason}", path.display())]
    BadConfig { path: PathBuf, reason: String },

    #[error("{}: unrecognised model layout: {reason}", path.display())]
    UnknownLayout { path: PathBuf, reason: String },

    /// All name/shape problems of one component, reported together.
    #[error("{component} weights do not match its config ({} problem{}): {}", problems.len(), if problems.len() == 1 { "" } else { "s" }, problems.join("; "))]
    WeightMismatch { component: String, problems: Vec<String> },

    #[error("{}: not a usable LoRA: {reason}", path.display())]
    BadLora { path: PathBuf, reason: String },

    /// LoRA modules that do not fit the loaded DiT (first few listed).
    #[error("the LoRAs do not fit this model ({count} problem{}): {}", if *count == 1 { "" } else { "s" }, problems.join("; "))]
    LoraMismatch { count: usize, problems: Vec<String> },

    /// A download from the model hub failed (network, checksum, disk).
    #[error("download: {0}")]
    Download(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("{0}")]
    InvalidRequest(String),

    #[error("{0}")]
    Device(String),

    /// A request whose working memory would not fit: refused before any
    /// allocation, because an allocation failure aborts the whole process.
    #[error("{what} needs about {:.1} GB of working memory but only {:.1} GB is free; choose a smaller size or fewer images, or close other programs", *need as f64 / 1e9, *available as f64 / 1e9)]
    InsufficientMemory { what: String, need: u64, available: u64 },

    /// A model whose weights cannot fit in the memory there is, even one
    /// large part at a time: refused before loading, because running out of
    /// host memory gets the process killed.
    #[error("{model} needs about {} for its weights ({how}) but {} is {where_}; use a GPU with more memory{}", crate::memory::gigabytes(*need), crate::memory::gigabytes(*available), if crate::loader::BUILTIN_MODELS.contains(&model.as_str()) { " or close other programs" } else { ", close other programs, or the built-in demo model" })]
    WeightsTooLarge { model: String, how: String, need: u64, available: u64, where_: String },

    #[error("cancelled")]
    Cancelled,
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

impl EngineError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io { path: path.into(), source }
    }
    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        EngineError::InvalidRequest(msg.into())
    }
}
