//! What reading a parked DiT's files ahead saves on its first load
//! (`weights::read_ahead`, used by the app for a DiT parked from the start).
//! Writes a file of `GB` gigabytes (default 2), evicts it from the page cache
//! (`posix_fadvise(DONTNEED)`), times a cold read; evicts it again, reads it
//! ahead, times the same read. Linux only (the eviction).
//!
//! `cargo run --release -p zimage-engine --example read_ahead [GB] [folder]`
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

fn evict(path: &Path) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path)?;
    file.sync_all()?;
    // SAFETY: posix_fadvise only reads its integer arguments; the fd is open for the call.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    anyhow::ensure!(rc == 0, "posix_fadvise failed: {rc}");
    Ok(())
}

fn timed_read(path: &Path) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut file = std::fs::File::open(path)?;
    let mut buffer = vec![0u8; 16 << 20];
    while file.read(&mut buffer)? > 0 {}
    Ok(start.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let gb: f64 = args.get(1).map(|a| a.parse()).transpose()?.unwrap_or(2.0);
    let folder = args.get(2).map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let path = folder.join("zimage-read-ahead-test.bin");
    {
        let mut file = std::fs::File::create(&path)?;
        // Not zeros: some filesystems store those sparsely.
        let chunk: Vec<u8> = (0..(32usize << 20)).map(|i| ((i * 2654435761usize) >> 13) as u8).collect();
        for _ in 0..((gb * 1e9) as usize).div_ceil(chunk.len()) {
            file.write_all(&chunk)?;
        }
    }
    let bytes = std::fs::metadata(&path)?.len();
    for trial in 1..=2 {
        evict(&path)?;
        let cold = timed_read(&path)?;
        evict(&path)?;
        let start = Instant::now();
        let read = zimage_engine::weights::read_ahead(std::slice::from_ref(&path));
        let ahead = start.elapsed().as_secs_f64();
        let warm = timed_read(&path)?;
        println!(
            "trial {trial}: {:.1} GB: cold read {cold:.2} s; read ahead {:.1} GB in {ahead:.2} s, then the load's read {warm:.2} s",
            bytes as f64 / 1e9,
            read as f64 / 1e9
        );
    }
    std::fs::remove_file(&path)?;
    Ok(())
}
