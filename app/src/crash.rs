//! A crash of the window's thread leaves a report in the data folder, and
//! the next start says so: started from a launcher, a panic message on
//! stderr is seen by nobody and the window just vanishes. The engine and
//! disk threads catch their own panics (the app goes on), so only the thread
//! that installed the hook is reported.

use std::path::{Path, PathBuf};

/// The report of the last crash, in the data folder.
pub fn report_path(data_dir: &Path) -> PathBuf {
    data_dir.join("crash.log")
}

/// Reports a panic of the calling thread in [`report_path`], then lets the
/// default hook print it as before.
pub fn install(data_dir: &Path) {
    let path = report_path(data_dir);
    let thread = std::thread::current().id();
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().id() == thread {
            let message = zimage_engine::error::panic_message(info.payload());
            let place = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
            let _ = std::fs::write(&path, report(&message, &place, &std::backtrace::Backtrace::force_capture().to_string()));
        }
        default(info);
    }));
}

/// The report's text: what a bug report needs, first line first.
fn report(message: &str, place: &str, backtrace: &str) -> String {
    format!(
        "Z-Image Studio {} stopped: {message}\nat {place}\nwhen: {}\n\n{backtrace}\n",
        env!("CARGO_PKG_VERSION"),
        zimage_engine::metadata::utc_timestamp_now()
    )
}

/// At start: the line to show when the last run crashed, the report moved to
/// `crash.log.old` so that it is said once.
pub fn last_crash(data_dir: &Path) -> Option<String> {
    let path = report_path(data_dir);
    let text = std::fs::read_to_string(&path).ok()?;
    let old = path.with_extension("log.old");
    let kept = std::fs::rename(&path, &old).is_ok();
    let first = text.lines().next().unwrap_or("Z-Image Studio stopped").trim().to_string();
    let shown = if kept { old } else { path };
    Some(format!("{first}; the images made before it are in the history; details for a bug report in {}", shown.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run in a child process (a panic hook is global): the child installs
    /// the hook and panics; the parent reads the report and the next start's line.
    #[test]
    fn a_crash_leaves_a_report_said_once_at_the_next_start() {
        if let Some(dir) = std::env::var_os("ZIMAGE_CRASH_TEST_DIR") {
            install(Path::new(&dir));
            // Another thread's panic (caught there, as the engine's are) is not reported.
            let _ = std::thread::spawn(|| panic!("a caught engine panic")).join();
            assert!(!report_path(Path::new(&dir)).exists(), "only this thread's panics");
            panic!("the window's thread broke");
        }
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["crash::tests::a_crash_leaves_a_report_said_once_at_the_next_start", "--exact", "--nocapture"])
            .env("ZIMAGE_CRASH_TEST_DIR", dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "the child panicked");
        let report = std::fs::read_to_string(report_path(dir.path())).expect("a report");
        assert!(report.starts_with("Z-Image Studio ") && report.contains("stopped: the window's thread broke"), "{report}");
        assert!(report.contains("crash.rs:"), "where: {report}");
        let line = last_crash(dir.path()).expect("said at the next start");
        assert!(line.starts_with("Z-Image Studio ") && line.contains("stopped: the window's thread broke; the images"), "{line}");
        assert!(line.ends_with("crash.log.old") && !line.contains('\n'), "{line}");
        assert_eq!(last_crash(dir.path()), None, "said once");
    }
}
