//! One app per data folder: two would each rewrite `history.json` from their
//! own memory (dropping the other's images from it) and number their images
//! from the same counter (overwriting each other's files).

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Held for the life of the app: the data folder's lock.
#[derive(Debug)]
pub struct InstanceLock {
    _file: Option<File>,
}

/// Another app holds the data folder.
#[derive(Debug)]
pub struct AlreadyRunning(pub PathBuf);

impl std::fmt::Display for AlreadyRunning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Z-Image Studio is already running with the data folder {} (its window may be minimised or on another \
             desktop). Use that window, or start this one with --data-dir for a separate history.",
            self.0.display()
        )
    }
}

impl std::error::Error for AlreadyRunning {}

/// Takes the data folder for this app, or says that another app has it. A
/// folder that cannot be created or a file system without locks (some network
/// shares) is used without a lock: the app says what it cannot write, as before.
pub fn lock_data_dir(data_dir: &Path) -> Result<InstanceLock, AlreadyRunning> {
    let open = || {
        std::fs::create_dir_all(data_dir)?;
        OpenOptions::new().create(true).truncate(false).write(true).open(data_dir.join("lock"))
    };
    let Ok(file) = open() else { return Ok(InstanceLock { _file: None }) };
    match file.try_lock() {
        Ok(()) => Ok(InstanceLock { _file: Some(file) }),
        Err(TryLockError::WouldBlock) => Err(AlreadyRunning(data_dir.to_path_buf())),
        Err(TryLockError::Error(_)) => Ok(InstanceLock { _file: None }),
    }
}

/// Where another start leaves the files it was asked to open, for the app
/// that holds the folder (the desktop's "Open with" while the app runs).
pub fn inbox(data_dir: &Path) -> PathBuf {
    data_dir.join("inbox")
}

/// Hands `files` to the app running on `data_dir`: one `.list` file in its
/// inbox, one absolute path per line, written whole before it appears.
pub fn hand_over(data_dir: &Path, files: &[PathBuf]) -> anyhow::Result<()> {
    let dir = inbox(data_dir);
    std::fs::create_dir_all(&dir)?;
    let lines: Vec<String> = files.iter().map(|f| std::path::absolute(f).unwrap_or_else(|_| f.clone()).display().to_string()).collect();
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let list = dir.join(format!("{stamp}-{}.list", std::process::id()));
    // Its temporary name does not end in .list: the watcher never sees it half written.
    zimage_engine::metadata::write_file_atomic(&list, lines.join("\n").as_bytes())?;
    Ok(())
}

/// A hand-over older than this is not opened (left by a start long ago).
const HAND_OVER_KEPT: Duration = Duration::from_secs(60);

/// The files handed over since the last call, oldest first; their lists are removed.
pub fn take_handed_over(data_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(inbox(data_dir)) else { return Vec::new() };
    let mut lists: Vec<PathBuf> =
        entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "list")).collect();
    lists.sort();
    let mut files = Vec::new();
    for list in lists {
        let fresh = std::fs::metadata(&list).and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().unwrap_or_default() < HAND_OVER_KEPT);
        if fresh {
            if let Ok(text) = std::fs::read_to_string(&list) {
                files.extend(text.lines().filter(|l| !l.is_empty()).map(PathBuf::from));
            }
        }
        let _ = std::fs::remove_file(&list);
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_app_on_the_same_data_folder_is_refused_until_the_first_ends() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = lock_data_dir(&data).expect("the first app takes it");
        let second = lock_data_dir(&data).unwrap_err();
        assert_eq!(second.0, data);
        assert!(second.to_string().contains(&data.display().to_string()) && !second.to_string().contains('\n'));
        let other = dir.path().join("other");
        lock_data_dir(&other).expect("another data folder is free");
        drop(first);
        lock_data_dir(&data).expect("free again once the first app ends");
    }

    #[test]
    fn files_handed_over_are_taken_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        assert!(take_handed_over(dir.path()).is_empty(), "no inbox yet");
        hand_over(dir.path(), &[PathBuf::from("/a/one.png"), PathBuf::from("/b/two.png")]).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        hand_over(dir.path(), &[PathBuf::from("/c/three.png")]).unwrap();
        let names: Vec<PathBuf> = ["/a/one.png", "/b/two.png", "/c/three.png"].iter().map(PathBuf::from).collect();
        assert_eq!(take_handed_over(dir.path()), names);
        assert!(take_handed_over(dir.path()).is_empty(), "taken once");
        // A relative path is handed over as an absolute one.
        hand_over(dir.path(), &[PathBuf::from("rel.png")]).unwrap();
        assert_eq!(take_handed_over(dir.path()), vec![std::env::current_dir().unwrap().join("rel.png")]);
    }
}
