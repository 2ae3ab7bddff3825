//! `zimage pull` against a local hub: a loopback HTTP server in this test
//! serves the tiny Turbo fixture in the Hugging Face hub's URL layout
//! (`/api/models/{repo}/revision/{rev}`, `/{repo}/resolve/{commit}/{path}`),
//! with dropped connections and a wrong checksum on demand. No other network.

#[path = "support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use zimage_engine::discovery;
use zimage_engine::pull::{pull, PullProgress};
use zimage_engine::EngineError;

#[path = "support/hub.rs"]
mod hub;
use hub::*;

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

/// A hub that cannot be reached is named in plain words, once: a name that
/// does not resolve, a port where nothing listens.
#[test]
fn an_unreachable_hub_is_said_in_plain_words() {
    let cache = tempfile::tempdir().unwrap();
    let at = |endpoint: &str| zimage_engine::pull::PullOptions {
        endpoint: endpoint.into(),
        cache_dir: cache.path().to_path_buf(),
        revision: "main".into(),
        token: None,
    };
    // `.invalid` never resolves (RFC 2606), with a network or without.
    let err = pull(REPO, &at("http://hub.invalid"), &AtomicBool::new(false), &mut |_| {}).unwrap_err().to_string();
    assert_eq!(err, "download: cannot find hub.invalid (no network connection, or no name server)");
    // Port 9 on the loopback: nothing listens there in a test machine.
    let err = pull(REPO, &at("http://127.0.0.1:9"), &AtomicBool::new(false), &mut |_| {}).unwrap_err().to_string();
    assert!(err.starts_with("download: cannot connect to 127.0.0.1 (no network connection"), "{err}");
    assert!(!err.contains("/api/models") && !err.contains('\n'), "{err}");
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
