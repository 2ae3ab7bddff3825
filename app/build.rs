//! Embeds the app icon (packaging/icons/zimage-studio.ico) into the Windows
//! `.exe`, so that Explorer, the taskbar and Alt-Tab show it; does nothing for
//! other targets. Without a resource compiler (the Windows SDK's `rc.exe`, or
//! MinGW's `windres`) the build goes on with a warning and an icon-less `.exe`
//! (the installer and its shortcuts carry the icon anyway).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../packaging/icons/zimage-studio.ico");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("windows") {
        return;
    }
    let (Ok(manifest), Ok(out)) = (std::env::var("CARGO_MANIFEST_DIR"), std::env::var("OUT_DIR")) else {
        return;
    };
    let ico = Path::new(&manifest).join("../packaging/icons/zimage-studio.ico");
    let out = PathBuf::from(out);
    let rc = out.join("zimage-studio.rc");
    // Resource scripts take C string escapes: forward slashes avoid them.
    let script = format!("1 ICON \"{}\"\n", ico.display().to_string().replace('\\', "/"));
    if let Err(e) = std::fs::write(&rc, script) {
        println!("cargo:warning=cannot write {}: {e}; the .exe gets no icon", rc.display());
        return;
    }
    let msvc = std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("msvc");
    let compiled = if msvc { compile_msvc(&rc, &out) } else { compile_gnu(&rc, &out) };
    match compiled {
        Ok(object) => println!("cargo:rustc-link-arg-bins={}", object.display()),
        Err(why) => println!("cargo:warning=the .exe gets no icon: {why}"),
    }
}

/// `rc.exe` from PATH, else from the newest Windows 10/11 SDK.
fn compile_msvc(rc: &Path, out: &Path) -> Result<PathBuf, String> {
    let res = out.join("zimage-studio.res");
    let compiled = std::iter::once(PathBuf::from("rc.exe"))
        .chain(sdk_rc_exe())
        .any(|tool| run(Command::new(tool).args(["/nologo", "/fo"]).arg(&res).arg(rc)).is_ok());
    if compiled { Ok(res) } else { Err("no rc.exe on PATH or in the Windows SDK (install the Windows SDK)".into()) }
}

/// `rc.exe` of the newest installed Windows SDK for this host's architecture.
fn sdk_rc_exe() -> Option<PathBuf> {
    let arch = if cfg!(target_arch = "aarch64") { "arm64" } else { "x64" };
    let base = PathBuf::from(std::env::var("ProgramFiles(x86)").unwrap_or_else(|_| r"C:\Program Files (x86)".into()))
        .join(r"Windows Kits\10\bin");
    let mut versions: Vec<PathBuf> = std::fs::read_dir(&base).ok()?.flatten().map(|e| e.path()).collect();
    versions.sort();
    versions.into_iter().rev().map(|v| v.join(arch).join("rc.exe")).find(|p| p.is_file())
}

/// MinGW's `windres` (the target-prefixed one when cross-compiling).
fn compile_gnu(rc: &Path, out: &Path) -> Result<PathBuf, String> {
    let object = out.join("zimage-studio-icon.o");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let compiled = [format!("{arch}-w64-mingw32-windres"), "windres".to_string()]
        .iter()
        .any(|tool| run(Command::new(tool).arg(rc).args(["-O", "coff", "-o"]).arg(&object)).is_ok());
    if compiled { Ok(object) } else { Err("no windres found (install MinGW-w64's binutils)".into()) }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    match cmd.status() {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(format!("{cmd:?} failed: {status}")),
        Err(e) => Err(format!("{cmd:?}: {e}")),
    }
}
