//! A small AppImage type-2 runtime in "extract-and-run" mode, for Z-Image Studio.
//!
//! An AppImage is this program (an ELF executable) with a SquashFS image appended to it.
//! The standard runtime mounts the image with FUSE; we extract it instead, once, into
//! `$XDG_CACHE_HOME/zimage-studio/appimage/<hash of the image>/`, and run `AppRun` from
//! there. That needs no FUSE (often missing in containers and minimal systems) and later
//! starts are as fast as a normal install. The hash names the version, so a new AppImage
//! never runs files of an older one. Each start marks its folder as used (`.last-used`);
//! after extracting a new version, versions unused for a week are removed, so updates do
//! not pile up copies in the cache (a week: an older version still running keeps its files).
//!
//! Why our own: the usual tools (appimagetool, linuxdeploy, the prebuilt runtimes) are
//! downloaded from GitHub at build time, which our build machines cannot reach.
//!
//! Layout (AppImage specification, type 2):
//!   * bytes 8..11 of the ELF header are the magic `AI\x02` (written by
//!     packaging/build-linux.sh after linking: the linker leaves that padding zero);
//!   * the SquashFS image starts where the ELF file ends, i.e. after the section header
//!     table: `e_shoff + e_shnum * e_shentsize`.
//!
//! Options (all others are passed on to the application):
//!   --appimage-extract [PATH]  extract everything (or PATH and what is under it) into ./squashfs-root
//!   --appimage-extract-and-run run (what we always do; accepted for compatibility)
//!   --appimage-offset          print where the image starts
//!   --appimage-version         print this runtime's version
//!   --appimage-help            print this text

use std::env;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, ExitCode};

use backhand::{FilesystemReader, InnerNode};

const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Under `$XDG_CACHE_HOME`: one folder per extracted image.
const CACHE_SUBDIR: &str = "zimage-studio/appimage";
/// Other versions' folders unused for this long are removed after a new extraction.
const KEEP_UNUSED: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);
/// Touched on every start: the folder's own mtime does not change when it is only read.
const LAST_USED: &str = ".last-used";

const HELP: &str = "AppImage options (extract-and-run runtime, no FUSE needed):
  --appimage-extract [PATH]   extract the contents (or PATH) into ./squashfs-root
  --appimage-extract-and-run  run the application (the default)
  --appimage-offset           print the byte offset of the embedded SquashFS image
  --appimage-version          print the runtime version
  --appimage-help             this text
Other arguments go to the application. The image is extracted once into
$XDG_CACHE_HOME/zimage-studio/appimage/<hash>/ (default ~/.cache).";

type Result<T> = std::result::Result<T, String>;

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("AppImage runtime: {e}");
            ExitCode::from(127)
        }
    }
}

fn run() -> Result<ExitCode> {
    let mut args: Vec<OsString> = env::args_os().collect();
    let argv0 = if args.is_empty() { OsString::new() } else { args.remove(0) };
    // The kernel gives us the real file even when started through a symlink.
    let image = fs::read_link("/proc/self/exe").map_err(|e| format!("cannot read /proc/self/exe: {e}"))?;
    let offset = squashfs_offset(&image)?;

    match args.first().and_then(|a| a.to_str()) {
        Some("--appimage-help") => {
            println!("{HELP}");
            return Ok(ExitCode::SUCCESS);
        }
        Some("--appimage-version") => {
            println!("zimage-appimage-runtime {VERSION} (AppImage type 2, extract-and-run)");
            return Ok(ExitCode::SUCCESS);
        }
        Some("--appimage-offset") => {
            println!("{offset}");
            return Ok(ExitCode::SUCCESS);
        }
        Some("--appimage-extract") => {
            let only = args.get(1).map(PathBuf::from);
            extract(&image, offset, Path::new("squashfs-root"), only.as_deref())?;
            return Ok(ExitCode::SUCCESS);
        }
        Some("--appimage-extract-and-run") => {
            args.remove(0);
        }
        Some(a) if a.starts_with("--appimage-") => {
            return Err(format!("unknown option {a}\n{HELP}"));
        }
        _ => {}
    }

    let appdir = cached_appdir(&image, offset)?;
    // The variables the AppImage specification gives the application.
    let owd = env::current_dir().unwrap_or_default();
    let err = Command::new(appdir.join("AppRun"))
        .args(&args)
        .env("APPIMAGE", &image)
        .env("APPDIR", &appdir)
        .env("ARGV0", &argv0)
        .env("OWD", owd)
        .exec(); // only returns on failure
    Err(format!("cannot start {}: {err}", appdir.join("AppRun").display()))
}

/// Where the SquashFS image starts: the end of the ELF file, which is the end of its
/// section header table (the AppImage specification's rule). Little-endian ELF only
/// (x86_64, aarch64); both ELF classes.
fn squashfs_offset(image: &Path) -> Result<u64> {
    let mut h = [0u8; 64];
    File::open(image)
        .and_then(|mut f| f.read_exact(&mut h))
        .map_err(|e| format!("cannot read the ELF header of {}: {e}", image.display()))?;
    if &h[..4] != b"\x7fELF" || h[5] != 1 {
        return Err(format!("{} is not a little-endian ELF file", image.display()));
    }
    let u16_at = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]) as u64;
    let (shoff, shentsize, shnum) = match h[4] {
        1 => (u32::from_le_bytes(h[0x20..0x24].try_into().unwrap()) as u64, u16_at(0x2E), u16_at(0x30)),
        2 => (u64::from_le_bytes(h[0x28..0x30].try_into().unwrap()), u16_at(0x3A), u16_at(0x3C)),
        c => return Err(format!("unknown ELF class {c}")),
    };
    Ok(shoff + shentsize * shnum)
}

/// The extracted AppDir for this image, extracting it first if this version was never run.
fn cached_appdir(image: &Path, offset: u64) -> Result<PathBuf> {
    let cache = match env::var_os("XDG_CACHE_HOME").map(PathBuf::from) {
        Some(p) if p.is_absolute() => p,
        _ => match env::var_os("HOME") {
            Some(h) if !h.is_empty() => PathBuf::from(h).join(".cache"),
            _ => env::temp_dir(),
        },
    };
    let parent = cache.join(CACHE_SUBDIR);
    let hash = format!("{:016x}", hash_image(image, offset)?);
    let appdir = parent.join(&hash);
    if appdir.join("AppRun").exists() {
        mark_used(&appdir);
        return Ok(appdir);
    }

    // Extract into a temporary folder beside the final one, then rename: a rename is
    // atomic, so a crash or a second instance starting at the same time can never leave
    // (or run) a half-extracted folder under the final name.
    fs::create_dir_all(&parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    remove_stale_temps(&parent, &hash);
    let tmp = parent.join(format!(".{hash}.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    extract(image, offset, &tmp, None)?;
    if let Err(e) = fs::rename(&tmp, &appdir) {
        let _ = fs::remove_dir_all(&tmp);
        // Another instance won the race: use its copy.
        if !appdir.join("AppRun").exists() {
            return Err(format!("cannot move the extracted image to {}: {e}", appdir.display()));
        }
    }
    mark_used(&appdir);
    remove_unused_versions(&parent, &hash, KEEP_UNUSED);
    Ok(appdir)
}

/// Records that this version was started now (best effort: a read-only cache only
/// means the folder may be removed a week after the next update).
fn mark_used(appdir: &Path) {
    let _ = File::create(appdir.join(LAST_USED));
}

/// Removes the extracted folders of other versions (16 hex digits) not started for
/// `keep` (their `.last-used`, else the folder's own modification time).
fn remove_unused_versions(parent: &Path, current: &str, keep: std::time::Duration) {
    let Ok(entries) = fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name == current || name.len() != 16 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let path = entry.path();
        let used = fs::metadata(path.join(LAST_USED)).or_else(|_| fs::metadata(&path)).and_then(|m| m.modified());
        let unused_for = used.ok().and_then(|t| t.elapsed().ok());
        if unused_for.is_some_and(|d| d > keep) {
            let _ = fs::remove_dir_all(&path);
        }
    }
}

/// Temporary folders left by extractions that were killed (their process is gone).
fn remove_stale_temps(parent: &Path, hash: &str) {
    let prefix = format!(".{hash}.tmp-");
    let Ok(entries) = fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else { continue };
        if !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// A 64-bit hash of the whole embedded image (not cryptographic: it only tells versions
/// apart). Reads 8 bytes at a time with a multiply-rotate mix; ~1 GB/s, so tens of ms
/// for our image, and the file is in the page cache after the first start anyway.
fn hash_image(image: &Path, offset: u64) -> Result<u64> {
    let io_err = |e: io::Error| format!("cannot read {}: {e}", image.display());
    let mut f = File::open(image).map_err(io_err)?;
    f.seek(SeekFrom::Start(offset)).map_err(io_err)?;
    let mut h: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut len: u64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = read_full(&mut f, &mut buf).map_err(io_err)?;
        if n == 0 {
            break;
        }
        len += n as u64;
        // A short final read is zero-padded to whole words; the length is mixed in below.
        buf[n..n.next_multiple_of(8)].fill(0);
        for w in buf[..n.next_multiple_of(8)].chunks_exact(8) {
            h = (h ^ u64::from_le_bytes(w.try_into().unwrap())).wrapping_mul(0x0000_0100_0000_01B3).rotate_left(29);
        }
    }
    Ok((h ^ len).wrapping_mul(0xFF51_AFD7_ED55_8CCD))
}

/// Fills `buf` as far as the file allows; 0 at the end.
fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Extracts the image (or only `only` and what is under it) into `dest`, keeping
/// permission bits and symlinks. Ownership is not restored: files belong to the user.
fn extract(image: &Path, offset: u64, dest: &Path, only: Option<&Path>) -> Result<()> {
    let file = File::open(image).map_err(|e| format!("cannot open {}: {e}", image.display()))?;
    let fs_reader = FilesystemReader::from_reader_with_offset(BufReader::new(file), offset)
        .map_err(|e| format!("cannot read the SquashFS image at offset {offset}: {e}"))?;
    fs::create_dir_all(dest).map_err(|e| format!("cannot create {}: {e}", dest.display()))?;

    let mut dirs = Vec::new(); // permissions of folders are set last, so read-only ones can be filled
    for node in fs_reader.files() {
        let rel = node.fullpath.strip_prefix("/").unwrap_or(&node.fullpath);
        // Never write outside `dest`, whatever the image says.
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            continue;
        }
        if let Some(only) = only {
            if !rel.starts_with(only) && !only.starts_with(rel) {
                continue;
            }
        }
        let path = dest.join(rel);
        let mode = u32::from(node.header.permissions) & 0o7777;
        let err = |e: io::Error| format!("cannot extract {}: {e}", path.display());
        match &node.inner {
            InnerNode::Dir(_) => {
                fs::create_dir_all(&path).map_err(err)?;
                dirs.push((path.clone(), mode));
            }
            InnerNode::File(f) => {
                if only.is_some_and(|o| !rel.starts_with(o)) {
                    continue; // a file above the requested path
                }
                if let Some(p) = path.parent() {
                    fs::create_dir_all(p).map_err(err)?;
                }
                let mut out = File::create(&path).map_err(err)?;
                io::copy(&mut fs_reader.file(f).reader(), &mut out).map_err(err)?;
                out.flush().map_err(err)?;
                fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(err)?;
            }
            InnerNode::Symlink(s) => {
                if let Some(p) = path.parent() {
                    fs::create_dir_all(p).map_err(err)?;
                }
                let _ = fs::remove_file(&path);
                symlink(&s.link, &path).map_err(err)?;
            }
            // Device nodes, pipes and sockets have no place in an AppImage.
            _ => {}
        }
    }
    for (path, mode) in dirs.into_iter().rev() {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .map_err(|e| format!("cannot set the mode of {}: {e}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A linked executable ends with its section header table: the ELF end computed
    /// from the header is the file size (build-linux.sh checks the same on the runtime).
    #[test]
    fn elf_end_is_the_file_size() {
        let exe = env::current_exe().unwrap();
        assert_eq!(squashfs_offset(&exe).unwrap(), fs::metadata(&exe).unwrap().len());
    }

    #[test]
    fn only_other_versions_unused_for_long_are_removed() {
        let parent = env::temp_dir().join(format!("appimage-runtime-versions-{}", std::process::id()));
        let _ = fs::remove_dir_all(&parent);
        let week = std::time::Duration::from_secs(7 * 24 * 3600);
        let old = std::time::SystemTime::now() - 2 * week;
        let version = |name: &str, used: Option<std::time::SystemTime>| {
            let dir = parent.join(name);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("AppRun"), b"#!/bin/sh\n").unwrap();
            if let Some(t) = used {
                File::create(dir.join(LAST_USED)).unwrap().set_modified(t).unwrap();
            }
            dir
        };
        let current = version("00000000000000aa", Some(old));
        let stale = version("00000000000000bb", Some(old));
        let recent = version("00000000000000cc", None);
        mark_used(&recent);
        let other = version("not-a-version", Some(old));
        remove_unused_versions(&parent, "00000000000000aa", week);
        assert!(current.exists(), "the running version stays");
        assert!(!stale.exists(), "a version unused for two weeks goes");
        assert!(recent.exists(), "a version started now stays");
        assert!(other.exists(), "folders that are not versions are not ours to remove");
        fs::remove_dir_all(&parent).unwrap();
    }

    #[test]
    fn hash_depends_on_content_and_offset() {
        let dir = env::temp_dir().join(format!("appimage-runtime-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        fs::write(&a, b"0123456789abcdefXYZ").unwrap();
        fs::write(&b, b"0123456789abcdefXYz").unwrap();
        assert_eq!(hash_image(&a, 3).unwrap(), hash_image(&a, 3).unwrap());
        assert_ne!(hash_image(&a, 3).unwrap(), hash_image(&b, 3).unwrap());
        assert_ne!(hash_image(&a, 3).unwrap(), hash_image(&a, 4).unwrap());
        fs::remove_dir_all(&dir).unwrap();
    }
}
