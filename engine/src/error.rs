//! The engine's error type: one enum, one plain-words line per failure.

use std::path::PathBuf;

/// Everything that can go wrong inside the engine. Each message is one line a
/// user can act on; callers at the edges (CLI, app) print it as is.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Not `source`: the message already says the cause in plain words, and
    /// a chained source would repeat it in the system's (CLI: "x: not found:
    /// No such file or directory (os error 2)").
    #[error("{}: {}", path.display(), plain_cause(cause))]
    Io { path: PathBuf, cause: std::io::Error },

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

/// What a panic said (its `&str` or `String` payload), for the one line a
/// caught panic or a crash report shows.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown cause".into())
}

/// An I/O error in plain words: the system's own errors by their kind
/// ("not found" rather than "No such file or directory (os error 2)"); an
/// error made with a message of its own keeps it. The one mapping of the
/// engine's and the app's file errors, reading and writing.
pub fn plain_cause(e: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    if e.get_ref().is_some() {
        return e.to_string();
    }
    match e.kind() {
        K::NotFound => "not found".into(),
        K::PermissionDenied => "permission denied".into(),
        K::IsADirectory => "is a folder, not a file".into(),
        K::NotADirectory => "a part of the path is not a folder".into(),
        K::StorageFull => "no space left on the disk".into(),
        K::ReadOnlyFilesystem => "read-only file system".into(),
        K::QuotaExceeded => "disk quota exceeded".into(),
        K::FileTooLarge => "file too large".into(),
        _ => {
            let text = e.to_string();
            // "… (os error 5)": the number says nothing to a user.
            match text.rfind(" (os error ") {
                Some(i) if text.ends_with(')') => text[..i].to_string(),
                _ => text,
            }
        }
    }
}

impl EngineError {
    pub(crate) fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        EngineError::Io { path: path.into(), cause }
    }
    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        EngineError::InvalidRequest(msg.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Error, ErrorKind};

    #[test]
    fn io_errors_read_in_plain_words() {
        let missing = std::fs::File::open("/nonexistent/lora.safetensors").unwrap_err();
        assert_eq!(EngineError::io("/nonexistent/lora.safetensors", missing).to_string(), "/nonexistent/lora.safetensors: not found");
        let folder = std::fs::read(std::env::temp_dir()).unwrap_err();
        assert_eq!(EngineError::io("/tmp", folder).to_string(), "/tmp: is a folder, not a file");
        // The engine's own messages stay as written.
        let own = Error::new(ErrorKind::NotFound, "folder not found");
        assert_eq!(EngineError::io("/m", own).to_string(), "/m: folder not found");
        // An error of a kind alone (no message, no number) reads as its kind.
        let full = Error::from(ErrorKind::StorageFull);
        assert_eq!(EngineError::io("/out.png", full).to_string(), "/out.png: no space left on the disk");
        assert_eq!(plain_cause(&Error::from(ErrorKind::ReadOnlyFilesystem)), "read-only file system");
        // Any other system error loses only its number.
        let other = Error::from_raw_os_error(5);
        assert_eq!(EngineError::io("/d", other).to_string(), "/d: Input/output error");
    }
}
