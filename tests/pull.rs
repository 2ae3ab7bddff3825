//! `zimage pull` against a local hub: a loopback HTTP server in this test
//! serves the tiny Turbo fixture in the Hugging Face hub's URL layout
//! (`/api/models/{repo}/revision/{rev}`, `/{repo}/resolve/{commit}/{path}`),
//! with dropped connections and a wrong checksum on demand. No other network.

#[path = "support/mod.rs"]
mod support;

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use support::fixtures;
use zimage_engine::discovery;
use zimage_engine::pull::{pull, PullOptions, PullProgress};
use zimage_engine::EngineError;

const REPO: &str = "Tongyi-MAI/Z-Image-Turbo";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// (path, Range header) of every request, in order.
type RequestLog = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// How the hub misbehaves, per repository path.
#[derive(Default)]
struct Faults {
    /// Close the connection halfway through the body, this many times.
    drop_midway: BTreeMap<String, usize>,
    /// Serve this file with one byte changed (its listed sha256 stays right).
    corrupt: HashSet<String>,
}

struct Hub {
    endpoint: String,
    requests: RequestLog,
    faults: Arc<Mutex<Faults>>,
    stop: Arc<AtomicBool>,
    files: BTreeMap<String, Vec<u8>>,
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn fixture_files() -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(
                    p.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/"),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    let root = fixtures().join("tiny-turbo");
    let mut out = BTreeMap::new();
    walk(&root, &root, &mut out);
    // A file the pipeline does not need: not downloaded.
    out.insert("assets/showcase.jpg".into(), vec![0xff; 100]);
    out
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn listing(files: &BTreeMap<String, Vec<u8>>) -> String {
    let siblings: Vec<serde_json::Value> = files
        .iter()
        .map(|(path, bytes)| {
            if path.ends_with(".safetensors") {
                serde_json::json!({"rfilename": path, "size": bytes.len(), "blobId": "b10b", "lfs": {"sha256": sha256_hex(bytes), "size": bytes.len(), "pointerSize": 134}})
            } else {
                // Git blob ids are sha1s; any unique safe name serves the test.
                serde_json::json!({"rfilename": path, "size": bytes.len(), "blobId": &sha256_hex(bytes)[..40]})
            }
        })
        .collect();
    serde_json::json!({"id": REPO, "sha": COMMIT, "siblings": siblings}).to_string()
}

impl Hub {
    fn start(faults: Faults) -> Hub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let files = fixture_files();
        let hub = Hub {
            endpoint,
            requests: Arc::default(),
            faults: Arc::new(Mutex::new(faults)),
            stop: Arc::default(),
            files: files.clone(),
        };
        let (requests, faults, stop) = (hub.requests.clone(), hub.faults.clone(), hub.stop.clone());
        std::thread::spawn(move || {
            // Bounded: stops when the Hub is dropped, or after 2 minutes whatever happens.
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => serve(stream, &files, &requests, &faults),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        hub
    }

    fn options(&self, cache: &Path) -> PullOptions {
        PullOptions {
            endpoint: self.endpoint.clone(),
            cache_dir: cache.to_path_buf(),
            revision: "main".into(),
            token: None,
        }
    }

    fn file_requests(&self, path: &str) -> Vec<Option<String>> {
        let suffix = format!("/resolve/{COMMIT}/{path}");
        self.requests.lock().unwrap().iter().filter(|(p, _)| p.ends_with(&suffix)).map(|(_, r)| r.clone()).collect()
    }
}

fn serve(
    mut stream: TcpStream,
    files: &BTreeMap<String, Vec<u8>>,
    requests: &Mutex<Vec<(String, Option<String>)>>,
    faults: &Mutex<Faults>,
) {
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
        }
    }
    requests.lock().unwrap().push((target.clone(), range.clone()));
    let respond = |stream: &mut TcpStream, status: &str, headers: &str, body: &[u8]| {
        let _ =
            write!(stream, "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n", body.len());
        let _ = stream.write_all(body);
    };
    if target == format!("/api/models/{REPO}/revision/main?blobs=true") {
        respond(&mut stream, "200 OK", "Content-Type: application/json\r\n", listing(files).as_bytes());
        return;
    }
    let Some(path) = target.strip_prefix(&format!("/{REPO}/resolve/{COMMIT}/")) else {
        respond(&mut stream, "404 Not Found", "", b"not found");
        return;
    };
    let Some(full) = files.get(path) else {
        respond(&mut stream, "404 Not Found", "", b"not found");
        return;
    };
    let mut body = full.clone();
    let mut faults = faults.lock().unwrap();
    if faults.corrupt.contains(path) {
        let mid = body.len() / 2;
        body[mid] ^= 0x55;
    }
    let from = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok())
        .unwrap_or(0);
    if from > body.len() {
        respond(&mut stream, "416 Range Not Satisfiable", "", b"");
        return;
    }
    let (status, extra) = if range.is_some() {
        (
            "206 Partial Content",
            format!("Content-Range: bytes {from}-{}/{}\r\n", body.len().saturating_sub(1), body.len()),
        )
    } else {
        ("200 OK", String::new())
    };
    let rest = &body[from..];
    if let Some(left) = faults.drop_midway.get_mut(path).filter(|n| **n > 0) {
        *left -= 1;
        // Promise the whole rest, send half, hang up.
        let _ =
            write!(stream, "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n", rest.len());
        let _ = stream.write_all(&rest[..rest.len() / 2]);
        let _ = stream.flush();
        let _ = stream.shutdown(std::net::Shutdown::Both);
        return;
    }
    respond(&mut stream, status, &extra, rest);
}

fn repo_dir(cache: &Path) -> PathBuf {
    cache.join("models--Tongyi-MAI--Z-Image-Turbo")
}

fn incomplete_files(cache: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(repo_dir(cache).join("blobs"))
        .map(|rd| rd.map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "incomplete")).collect())
        .unwrap_or_default()
}

const SHARD: &str = "transformer/diffusion_pytorch_model-00001-of-00002.safetensors";

/// Everything the pipeline needs is there, byte for byte, in the hub cache layout.
fn assert_complete_snapshot(hub: &Hub, cache: &Path, snapshot: &Path) {
    assert_eq!(snapshot, repo_dir(cache).join("snapshots").join(COMMIT));
    assert_eq!(std::fs::read_to_string(repo_dir(cache).join("refs/main")).unwrap(), COMMIT);
    for (path, bytes) in &hub.files {
        let file = snapshot.join(path);
        if path.starts_with("assets/") {
            assert!(!file.exists(), "{path} is not needed and not downloaded");
            continue;
        }
        assert_eq!(&std::fs::read(&file).unwrap(), bytes, "{path}");
        let target = std::fs::read_link(&file).expect("snapshot entries are symlinks to blobs");
        assert!(
            target.starts_with("../") && target.to_string_lossy().contains("blobs/"),
            "{path} → {}",
            target.display()
        );
        if path.ends_with(".safetensors") {
            assert_eq!(
                target.file_name().unwrap().to_string_lossy(),
                sha256_hex(bytes),
                "LFS blobs are named by sha256"
            );
        }
    }
    assert!(incomplete_files(cache).is_empty(), "no .incomplete left: {:?}", incomplete_files(cache));
    let found = discovery::inspect(snapshot, "hf-cache");
    assert!(found.complete(), "{:?}", found.problems);
    assert_eq!(discovery::hf_snapshots(cache, REPO), vec![snapshot.to_path_buf()]);
}

#[test]
fn pull_resumes_a_dropped_connection_and_verifies_everything() {
    let mut faults = Faults::default();
    faults.drop_midway.insert(SHARD.into(), 1);
    let hub = Hub::start(faults);
    let cache = tempfile::tempdir().unwrap();
    let mut last: Option<PullProgress> = None;
    let mut files_seen = HashSet::new();
    let snapshot = pull(REPO, &hub.options(cache.path()), &AtomicBool::new(false), &mut |p| {
        assert!(p.file_done <= p.file_total && p.done <= p.total, "{p:?}");
        files_seen.insert(p.file.clone());
        last = Some(p.clone());
    })
    .unwrap();
    assert_complete_snapshot(&hub, cache.path(), &snapshot);
    let last = last.unwrap();
    let needed: u64 = hub.files.iter().filter(|(p, _)| !p.starts_with("assets/")).map(|(_, b)| b.len() as u64).sum();
    assert_eq!((last.done, last.total), (needed, needed), "total progress ends at the total size");
    assert!(files_seen.contains(SHARD));
    // The dropped shard was asked for twice: whole, then from where it broke.
    let half = hub.files[SHARD].len() / 2;
    assert_eq!(hub.file_requests(SHARD), vec![None, Some(format!("bytes={half}-"))]);

    // A second pull finds everything in place and downloads nothing.
    let before = hub.requests.lock().unwrap().len();
    pull(REPO, &hub.options(cache.path()), &AtomicBool::new(false), &mut |_| panic!("nothing to download")).unwrap();
    assert_eq!(hub.requests.lock().unwrap().len(), before + 1, "only the file list is fetched again");
}

#[test]
fn a_wrong_checksum_leaves_nothing_half_valid() {
    let mut faults = Faults::default();
    faults.corrupt.insert(SHARD.into());
    let hub = Hub::start(faults);
    let cache = tempfile::tempdir().unwrap();
    let err = pull(REPO, &hub.options(cache.path()), &AtomicBool::new(false), &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("checksum mismatch") && err.contains(SHARD) && !err.contains('\n'), "{err}");
    let snapshot = repo_dir(cache.path()).join("snapshots").join(COMMIT);
    assert!(!snapshot.join(SHARD).exists(), "no snapshot entry for the bad file");
    assert!(!repo_dir(cache.path()).join("blobs").join(sha256_hex(&hub.files[SHARD])).exists(), "no blob");
    assert!(incomplete_files(cache.path()).is_empty(), "the bad download is deleted");
    assert!(!repo_dir(cache.path()).join("refs/main").exists(), "refs/main only once everything is there");
    assert!(discovery::hf_snapshots(cache.path(), REPO).iter().all(|s| !discovery::inspect(s, "hf-cache").complete()));

    // Once the hub serves the right bytes, the pull completes.
    hub.faults.lock().unwrap().corrupt.clear();
    let snapshot = pull(REPO, &hub.options(cache.path()), &AtomicBool::new(false), &mut |_| {}).unwrap();
    assert_complete_snapshot(&hub, cache.path(), &snapshot);
}

#[test]
fn cancel_and_repeated_drops_keep_the_partial_file_for_the_next_pull() {
    let hub = Hub::start(Faults::default());
    let cache = tempfile::tempdir().unwrap();
    let cancel = AtomicBool::new(false);
    let calls = AtomicUsize::new(0);
    let err = pull(REPO, &hub.options(cache.path()), &cancel, &mut |p| {
        if p.file == SHARD {
            calls.fetch_add(1, Ordering::Relaxed);
            cancel.store(true, Ordering::Relaxed);
        }
    })
    .unwrap_err();
    assert!(matches!(err, EngineError::Cancelled), "{err}");
    assert!(calls.load(Ordering::Relaxed) >= 1);
    assert_eq!(incomplete_files(cache.path()).len(), 1, "the cancelled file is kept as .incomplete");
    assert!(!repo_dir(cache.path()).join("snapshots").join(COMMIT).join(SHARD).exists());

    // The connection drops on every attempt: a clean error, the partial file kept.
    let other = "transformer/diffusion_pytorch_model-00002-of-00002.safetensors";
    hub.faults.lock().unwrap().drop_midway.insert(other.into(), 100);
    let err = pull(REPO, &hub.options(cache.path()), &AtomicBool::new(false), &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains(other) && err.contains("run the pull again to resume") && !err.contains('\n'), "{err}");
    assert!(!incomplete_files(cache.path()).is_empty());
    let tries = hub.file_requests(other);
    assert!(tries.len() >= 2 && tries[1..].iter().all(|r| r.is_some()), "retries resume with Range: {tries:?}");

    hub.faults.lock().unwrap().drop_midway.clear();
    let snapshot = pull(REPO, &hub.options(cache.path()), &AtomicBool::new(false), &mut |_| {}).unwrap();
    assert_complete_snapshot(&hub, cache.path(), &snapshot);
}

/// `zimage pull turbo` with `HF_ENDPOINT` on the loopback hub; `zimage models`
/// then finds the download complete, with its memory needs.
#[test]
fn cli_pull_then_models() {
    let hub = Hub::start(Faults::default());
    let cache = tempfile::tempdir().unwrap();
    let zimage = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_zimage"))
            .args(args)
            .env("HF_ENDPOINT", &hub.endpoint)
            .env("HF_HUB_CACHE", cache.path())
            .env_remove("HF_TOKEN")
            .output()
            .expect("run zimage")
    };
    let out = zimage(&["pull", "turbo", "-q"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let snapshot = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    assert_complete_snapshot(&hub, cache.path(), &snapshot);

    let out = zimage(&["models", "--json"]);
    assert!(out.status.success());
    let found: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ours = found
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["path"] == snapshot.display().to_string())
        .expect("pulled model listed");
    assert_eq!(ours["kind"], "turbo");
    assert!(ours["problems"].as_array().unwrap().is_empty(), "{ours}");
    let memory = &ours["dit_memory"];
    assert!(memory["f32_bytes"].as_u64().unwrap() == 2 * memory["bf16_bytes"].as_u64().unwrap(), "{memory}");

    let out = zimage(&["pull", "flux"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.lines().count() == 1 && stderr.contains("turbo or base"), "{stderr}");
}
