//! A local Hugging Face hub for tests: a loopback HTTP server serving the
//! tiny Turbo fixture in the hub's URL layout (`/api/models/{repo}/revision/{rev}`,
//! `/{repo}/resolve/{commit}/{path}`), with dropped connections and a wrong
//! checksum on demand. Used by `tests/pull.rs` and the app's download test.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use zimage_engine::pull::PullOptions;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

pub const REPO: &str = "Tongyi-MAI/Z-Image-Turbo";
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// (path, Range header) of every request, in order.
pub type RequestLog = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// How the hub misbehaves, per repository path.
#[derive(Default)]
pub struct Faults {
    /// Close the connection halfway through the body, this many times.
    pub drop_midway: BTreeMap<String, usize>,
    /// Serve this file with one byte changed (its listed sha256 stays right).
    pub corrupt: HashSet<String>,
}

pub struct Hub {
    pub endpoint: String,
    pub requests: RequestLog,
    pub faults: Arc<Mutex<Faults>>,
    stop: Arc<AtomicBool>,
    pub files: BTreeMap<String, Vec<u8>>,
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

pub fn fixture_files() -> BTreeMap<String, Vec<u8>> {
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

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

pub fn listing(files: &BTreeMap<String, Vec<u8>>) -> String {
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
    pub fn start(faults: Faults) -> Hub {
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

    pub fn options(&self, cache: &Path) -> PullOptions {
        PullOptions {
            endpoint: self.endpoint.clone(),
            cache_dir: cache.to_path_buf(),
            revision: "main".into(),
            token: None,
        }
    }

    pub fn file_requests(&self, path: &str) -> Vec<Option<String>> {
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
