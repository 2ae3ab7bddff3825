//! One app per data folder: two would each rewrite `history.json` from their
//! own memory (dropping the other's images from it) and number their images
//! from the same counter (overwriting each other's files).

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

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
}
