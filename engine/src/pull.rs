//! Downloading Z-Image from the Hugging Face hub into the standard hub cache
//! (`models--Tongyi-MAI--Z-Image-Turbo/{blobs,snapshots/<commit>,refs/main}`),
//! so `huggingface_hub`, diffusers, ComfyUI helpers and we share the files.
//!
//! Safety rules:
//! - a file is written to `blobs/<name>.incomplete`, checked (size, and the
//!   hub's LFS sha256 for weights) and only then renamed to `blobs/<name>`
//!   and linked from the snapshot: a blob or snapshot entry is always whole
//!   and verified; `refs/<revision>` is written last;
//! - an interrupted download (dropped connection, cancel, crash) keeps its
//!   `.incomplete` file and continues from it with an HTTP `Range` request;
//! - a wrong checksum deletes the `.incomplete` file and is an error;
//! - a full disk is a one-line error naming the file (the partial file is
//!   kept so the download resumes once space is freed).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::error::{EngineError, Result};

/// Bytes read per chunk (progress and cancel granularity).
const CHUNK: usize = 1 << 20;
/// Attempts per file when the connection drops; each resumes where the last stopped.
const ATTEMPTS: usize = 4;
/// The components a Z-Image pipeline needs; other repository files (images,
/// README) are not downloaded.
const WANTED_PREFIXES: [&str; 5] = ["scheduler/", "text_encoder/", "tokenizer/", "transformer/", "vae/"];

/// Where and what to download.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Hub address (`HF_ENDPOINT`, default `https://huggingface.co`).
    pub endpoint: String,
    /// The hub cache folder (see [`crate::discovery::hf_cache_dir`]).
    pub cache_dir: PathBuf,
    /// Branch, tag or commit (default `main`).
    pub revision: String,
    /// Access token (`HF_TOKEN`), for gated or private repositories.
    pub token: Option<String>,
}

impl PullOptions {
    /// Defaults from the environment, as `huggingface_hub` reads it.
    pub fn from_env() -> Result<Self> {
        let cache_dir = crate::discovery::hf_cache_dir().ok_or_else(|| {
            EngineError::invalid("cannot tell where the Hugging Face cache is; set HF_HOME or HF_HUB_CACHE")
        })?;
        Ok(Self {
            endpoint: std::env::var("HF_ENDPOINT")
                .unwrap_or_else(|_| "https://huggingface.co".into())
                .trim_end_matches('/')
                .to_string(),
            cache_dir,
            revision: "main".into(),
            token: std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()),
        })
    }
}

/// The repository of `turbo` or `base`.
pub fn repo_for(model: &str) -> Result<&'static str> {
    match model {
        "turbo" => Ok("Tongyi-MAI/Z-Image-Turbo"),
        "base" => Ok("Tongyi-MAI/Z-Image"),
        other => Err(EngineError::invalid(format!("unknown model {other:?}; pull turbo or base"))),
    }
}

/// About how many bytes `pull` fetches for `turbo` or `base`, known before
/// asking the hub (so it can be shown before the user clicks): Turbo's DiT
/// is published in fp32 (24.6 GB), Base's in bf16 (12.3 GB); both come with
/// the Qwen3-4B text encoder (8.05 GB) and the VAE (0.17 GB).
pub fn approximate_download_bytes(model: &str) -> Option<u64> {
    const TEXT_ENCODER_AND_VAE: u64 = 8_050_000_000 + 168_000_000;
    match model {
        "turbo" => Some(24_620_000_000 + TEXT_ENCODER_AND_VAE),
        "base" => Some(12_310_000_000 + TEXT_ENCODER_AND_VAE),
        _ => None,
    }
}

/// One file of the repository, as the hub lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct RepoFile {
    pub path: String,
    pub size: Option<u64>,
    /// The LFS sha256 (weights); `None` for small git files.
    pub sha256: Option<String>,
    /// Git blob id, the cache's blob name for non-LFS files.
    pub blob_id: Option<String>,
}

/// Progress of a pull, reported after every chunk.
#[derive(Debug, Clone)]
pub struct PullProgress {
    /// Repository path of the current file.
    pub file: String,
    pub file_done: u64,
    pub file_total: u64,
    /// Bytes of all files done (already present ones included) and in total.
    pub done: u64,
    pub total: u64,
}

/// Lists the files of `repo` at `revision`: (commit, files needed).
pub fn list_files(agent: &ureq::Agent, opts: &PullOptions, repo: &str) -> Result<(String, Vec<RepoFile>)> {
    let url = format!("{}/api/models/{repo}/revision/{}?blobs=true", opts.endpoint, opts.revision);
    let body = get(agent, opts, &url, None)
        .map_err(|e| e.into_engine(&url))?
        .into_string()
        .map_err(|e| network(&url, &e.to_string()))?;
    let json: serde_json::Value = serde_json::from_str(&body)
        .map_err(|e| EngineError::Download(format!("{url}: the hub's answer is not JSON ({e})")))?;
    let commit = json
        .get("sha")
        .and_then(|v| v.as_str())
        .filter(|s| is_safe_name(s))
        .ok_or_else(|| EngineError::Download(format!("{url}: no commit id in the hub's answer")))?
        .to_string();
    let siblings = json
        .get("siblings")
        .and_then(|v| v.as_array())
        .ok_or_else(|| EngineError::Download(format!("{url}: no file list in the hub's answer")))?;
    let mut files = Vec::new();
    for s in siblings {
        let Some(path) = s.get("rfilename").and_then(|v| v.as_str()) else { continue };
        if !(path == "model_index.json" || WANTED_PREFIXES.iter().any(|p| path.starts_with(p))) {
            continue;
        }
        if !is_safe_path(path) {
            return Err(EngineError::Download(format!("the hub lists a file with an unsafe path: {path:?}")));
        }
        let lfs = s.get("lfs");
        let sha256 = lfs.and_then(|l| l.get("sha256")).and_then(|v| v.as_str()).map(|h| h.to_ascii_lowercase());
        if let Some(h) = &sha256 {
            if h.len() != 64 || !h.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(EngineError::Download(format!("{path}: the hub's sha256 {h:?} is not a sha256")));
            }
        }
        let size =
            s.get("size").and_then(|v| v.as_u64()).or_else(|| lfs.and_then(|l| l.get("size")).and_then(|v| v.as_u64()));
        let blob_id = s.get("blobId").and_then(|v| v.as_str()).filter(|b| is_safe_name(b)).map(String::from);
        files.push(RepoFile { path: path.to_string(), size, sha256, blob_id });
    }
    if !files.iter().any(|f| f.path == "model_index.json") {
        return Err(EngineError::Download(format!(
            "{repo} at {} has no model_index.json; is it a Z-Image repository?",
            opts.revision
        )));
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((commit, files))
}

/// Downloads every file the pipeline needs into the hub cache and returns
/// the snapshot folder (what `--model` takes). Files already in the cache
/// are not downloaded again. `cancel` is checked after every chunk.
pub fn pull(
    repo: &str,
    opts: &PullOptions,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&PullProgress),
) -> Result<PathBuf> {
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(30))
        .timeout_read(Duration::from_secs(60))
        .build();
    let (commit, files) = list_files(&agent, opts, repo)?;
    let root = opts.cache_dir.join(format!("models--{}", repo.replace('/', "--")));
    let blobs = root.join("blobs");
    let snapshot = root.join("snapshots").join(&commit);
    fs::create_dir_all(&blobs).map_err(|e| EngineError::io(&blobs, e))?;
    fs::create_dir_all(&snapshot).map_err(|e| EngineError::io(&snapshot, e))?;

    let total: u64 = files.iter().filter_map(|f| f.size).sum();
    let mut done = 0u64;
    for file in &files {
        let link = snapshot.join(&file.path);
        if link.exists() {
            done += file.size.unwrap_or(0);
            continue;
        }
        let url = format!("{}/{repo}/resolve/{commit}/{}", opts.endpoint, file.path);
        let blob_name = file.sha256.clone().or_else(|| file.blob_id.clone());
        let blob = download_blob(&agent, opts, &url, file, &blobs, blob_name, cancel, &mut |file_done, file_total| {
            progress(&PullProgress {
                file: file.path.clone(),
                file_done,
                file_total,
                done: done + file_done,
                total: total.max(done + file_done),
            })
        })?;
        link_into_snapshot(&blob, &link)?;
        done += file.size.unwrap_or(0);
    }
    let refs = root.join("refs");
    fs::create_dir_all(&refs).map_err(|e| EngineError::io(&refs, e))?;
    if is_safe_path(&opts.revision) && opts.revision != commit {
        crate::metadata::write_file_atomic(&refs.join(&opts.revision), commit.as_bytes())
            .map_err(|e| EngineError::Download(e.to_string()))?;
    }
    Ok(snapshot)
}

/// Downloads one file to `blobs/<name>` (resuming `<name>.incomplete`), checks it, returns the blob path.
#[allow(clippy::too_many_arguments)]
fn download_blob(
    agent: &ureq::Agent,
    opts: &PullOptions,
    url: &str,
    file: &RepoFile,
    blobs: &Path,
    blob_name: Option<String>,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<PathBuf> {
    // Without a hub-given name, the blob is named by its content's sha256.
    let partial = blobs.join(format!(
        "{}.incomplete",
        blob_name.clone().unwrap_or_else(|| format!("tmp-{}", file.path.replace('/', "--")))
    ));
    if let Some(name) = &blob_name {
        let blob = blobs.join(name);
        if blob.is_file() {
            return Ok(blob);
        }
    }
    let mut out =
        OpenOptions::new().create(true).read(true).append(true).open(&partial).map_err(|e| write_error(&partial, e))?;
    let mut hasher = Sha256::new();
    // Hash what an earlier attempt left, to verify the whole file at the end.
    let mut have = hash_prefix(&mut out, &mut hasher).map_err(|e| EngineError::io(&partial, e))?;
    let mut attempt = 0;
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(EngineError::Cancelled);
        }
        if let Some(size) = file.size {
            if have > size {
                // Not the file we want: start again.
                drop(out);
                fs::remove_file(&partial).map_err(|e| EngineError::io(&partial, e))?;
                return download_blob(agent, opts, url, file, blobs, blob_name, cancel, progress);
            }
            if have == size {
                break;
            }
        }
        attempt += 1;
        match fetch_from(agent, opts, url, file, have, &mut out, &mut hasher, &partial, cancel, progress) {
            Ok(Fetched::Complete(n)) => {
                have = n;
                break;
            }
            Ok(Fetched::Restart) => {
                // The server ignored our Range: start the file over.
                out.set_len(0).map_err(|e| write_error(&partial, e))?;
                hasher = Sha256::new();
                have = 0;
                attempt -= 1;
            }
            Err(Interrupted::Network(msg, n)) => {
                have = n;
                if attempt >= ATTEMPTS {
                    return Err(EngineError::Download(format!(
                        "{}: {msg} (gave up after {ATTEMPTS} attempts; {have} bytes kept, run the pull again to resume)",
                        file.path
                    )));
                }
                std::thread::sleep(Duration::from_millis(200 * attempt as u64));
            }
            Err(Interrupted::Fatal(e)) => return Err(e),
        }
    }
    out.sync_all().map_err(|e| write_error(&partial, e))?;
    drop(out);
    if let Some(size) = file.size {
        if have != size {
            return Err(EngineError::Download(format!("{}: got {have} bytes, the hub says {size}", file.path)));
        }
    }
    let digest = hex(&hasher.finalize());
    if let Some(expected) = &file.sha256 {
        if &digest != expected {
            let _ = fs::remove_file(&partial);
            return Err(EngineError::Download(format!(
                "{}: checksum mismatch (sha256 {digest}, the hub says {expected}); the download was deleted, run the pull again",
                file.path
            )));
        }
    }
    let blob = blobs.join(blob_name.unwrap_or(digest));
    fs::rename(&partial, &blob).map_err(|e| EngineError::io(&blob, e))?;
    Ok(blob)
}

enum Fetched {
    Complete(u64),
    Restart,
}

enum Interrupted {
    /// Worth retrying from the bytes kept so far.
    Network(String, u64),
    Fatal(EngineError),
}

/// One HTTP request for the rest of the file, appended to `out`.
#[allow(clippy::too_many_arguments)]
fn fetch_from(
    agent: &ureq::Agent,
    opts: &PullOptions,
    url: &str,
    file: &RepoFile,
    mut have: u64,
    out: &mut File,
    hasher: &mut Sha256,
    partial: &Path,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(u64, u64),
) -> std::result::Result<Fetched, Interrupted> {
    let response = match get(agent, opts, url, (have > 0).then_some(have)) {
        Ok(r) => r,
        // Range not satisfiable: what we kept does not fit this file.
        Err(GetError::Status(416, _)) => return Ok(Fetched::Restart),
        // Other client errors (missing file, no access) will not go away by retrying.
        Err(e @ GetError::Status(400..=499, _)) => return Err(Interrupted::Fatal(e.into_engine(url))),
        Err(e) => return Err(Interrupted::Network(e.into_engine(url).to_string(), have)),
    };
    if have > 0 && response.status() != 206 {
        return Ok(Fetched::Restart);
    }
    let total = file
        .size
        .or_else(|| response.header("Content-Length").and_then(|l| l.parse::<u64>().ok()).map(|l| l + have))
        .unwrap_or(0);
    let mut reader = response.into_reader();
    let mut buf = vec![0u8; CHUNK];
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(Interrupted::Fatal(EngineError::Cancelled));
        }
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Interrupted::Network(format!("connection lost ({e})"), have)),
        };
        out.write_all(&buf[..n]).map_err(|e| Interrupted::Fatal(write_error(partial, e)))?;
        hasher.update(&buf[..n]);
        have += n as u64;
        progress(have, total.max(have));
    }
    match file.size {
        Some(size) if have < size => {
            Err(Interrupted::Network(format!("connection closed at {have} of {size} bytes"), have))
        }
        _ => Ok(Fetched::Complete(have)),
    }
}

/// Why a request got no usable response.
enum GetError {
    Status(u16, String),
    Transport(String),
}

impl GetError {
    fn into_engine(self, url: &str) -> EngineError {
        match self {
            GetError::Status(401 | 403, _) => EngineError::Download(format!(
                "{url}: access denied (HTTP 401/403); accept the model's terms on the hub and set HF_TOKEN"
            )),
            GetError::Status(code, text) => EngineError::Download(format!("{url}: HTTP {code} {text}")),
            // Names its host already: the URL would say it again.
            GetError::Transport(msg) => EngineError::Download(msg),
        }
    }
}

fn get(
    agent: &ureq::Agent,
    opts: &PullOptions,
    url: &str,
    from: Option<u64>,
) -> std::result::Result<ureq::Response, GetError> {
    let mut request = agent.get(url).set("User-Agent", concat!("zimage-studio/", env!("CARGO_PKG_VERSION")));
    if let Some(token) = &opts.token {
        request = request.set("Authorization", &format!("Bearer {token}"));
    }
    if let Some(from) = from {
        request = request.set("Range", &format!("bytes={from}-"));
    }
    match request.call() {
        Ok(r) => Ok(r),
        Err(ureq::Error::Status(code, r)) => Err(GetError::Status(code, r.status_text().to_string())),
        Err(ureq::Error::Transport(t)) => Err(GetError::Transport(transport_words(&t))),
    }
}

/// A request that reached no server, in plain words: which host and why,
/// the likely causes named (ureq's own text repeats the whole URL and
/// reads "Dns Failed: resolve dns name 'huggingface.co:443'").
fn transport_words(t: &ureq::Transport) -> String {
    let host = t.url().and_then(|u| u.host_str()).unwrap_or("the server").to_string();
    let detail = t.message().map(|m| format!(": {}", m.replace('\n', " "))).unwrap_or_default();
    match t.kind() {
        ureq::ErrorKind::Dns => format!("cannot find {host} (no network connection, or no name server)"),
        ureq::ErrorKind::ConnectionFailed => {
            format!("cannot connect to {host} (no network connection, a firewall, or the server is down){detail}")
        }
        ureq::ErrorKind::Io => format!("the connection to {host} broke{detail}"),
        _ => t.to_string().replace('\n', " "),
    }
}

fn network(url: &str, msg: &str) -> EngineError {
    EngineError::Download(format!("{url}: {}", msg.replace('\n', " ")))
}

/// A write error in plain words; a full disk says so.
fn write_error(path: &Path, e: io::Error) -> EngineError {
    if e.kind() == io::ErrorKind::StorageFull || e.raw_os_error() == Some(28) {
        return EngineError::Download(format!(
            "{}: the disk is full; free some space and run the pull again (the partial download is kept and resumes)",
            path.display()
        ));
    }
    EngineError::io(path, e)
}

/// Feeds the bytes already in `file` to `hasher`; returns how many there were.
fn hash_prefix(file: &mut File, hasher: &mut Sha256) -> io::Result<u64> {
    file.seek(SeekFrom::Start(0))?;
    let mut buf = vec![0u8; CHUNK];
    let mut n = 0u64;
    loop {
        let read = file.read(&mut buf)?;
        if read == 0 {
            break;
        }
        hasher.update(&buf[..read]);
        n += read as u64;
    }
    file.seek(SeekFrom::End(0))?;
    Ok(n)
}

/// Points `snapshots/<commit>/<path>` at its blob: a relative symlink, as
/// huggingface_hub makes; a copy where symlinks are not allowed.
fn link_into_snapshot(blob: &Path, link: &Path) -> Result<()> {
    let dir = link.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
    let _ = fs::remove_file(link);
    #[cfg(unix)]
    {
        // From snapshots/<commit>/<a>/<b>/file up to the repo folder.
        let depth = link
            .strip_prefix(blob.parent().and_then(Path::parent).unwrap_or(Path::new("/")))
            .map(|p| p.components().count() - 1)
            .unwrap_or(0);
        let mut target = PathBuf::new();
        for _ in 0..depth {
            target.push("..");
        }
        target.push("blobs");
        target.push(blob.file_name().unwrap_or_default());
        if std::os::unix::fs::symlink(&target, link).is_ok() {
            return Ok(());
        }
    }
    fs::copy(blob, link).map_err(|e| write_error(link, e))?;
    Ok(())
}

/// A relative path inside the repository: no `..`, no absolute parts.
fn is_safe_path(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && !path.contains('\\')
        && Path::new(path).components().all(|c| matches!(c, std::path::Component::Normal(_)))
}

fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && name != "."
        && name != ".."
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_from_the_hub_stay_inside_the_cache() {
        assert!(is_safe_path("transformer/diffusion_pytorch_model-00001-of-00003.safetensors"));
        assert!(!is_safe_path("../etc/passwd"));
        assert!(!is_safe_path("/abs"));
        assert!(!is_safe_path("a/../../b"));
        assert!(!is_safe_path("a\\b"));
        assert!(is_safe_name("0123abcdef"));
        assert!(!is_safe_name("../x"));
        assert!(!is_safe_name(".."));
    }

    #[test]
    fn a_full_disk_is_named() {
        let e = write_error(Path::new("/c/blobs/x.incomplete"), io::Error::from_raw_os_error(28)).to_string();
        assert!(e.contains("disk is full") && e.contains("x.incomplete") && !e.contains('\n'), "{e}");
        let other = write_error(Path::new("/c/x"), io::Error::from(io::ErrorKind::PermissionDenied)).to_string();
        assert!(!other.contains("disk is full"), "{other}");
    }

    #[test]
    fn models_name_their_repositories() {
        assert_eq!(repo_for("turbo").unwrap(), "Tongyi-MAI/Z-Image-Turbo");
        assert_eq!(repo_for("base").unwrap(), "Tongyi-MAI/Z-Image");
        assert!(repo_for("flux").is_err());
    }
}
