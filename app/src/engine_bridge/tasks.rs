//! Background work other than generation: one-off tasks (finding models on
//! disk), model downloads with progress and cancel, file I/O off the UI
//! thread, and the inbox of files another start hands over.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use zimage_engine::preview::RgbImage;
use zimage_engine::pull::{PullOptions, PullProgress};
use zimage_engine::EngineError;

use super::{one_line, Waker};

pub struct Task<T> {
    rx: Receiver<T>,
}

impl<T: Send + 'static> Task<T> {
    pub fn spawn(name: &str, waker: Waker, work: impl FnOnce() -> T + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel();
        let spawned = std::thread::Builder::new().name(name.into()).spawn(move || {
            let _ = tx.send(work());
            waker();
        });
        if let Err(e) = spawned {
            // No thread: the result never comes; say so instead of waiting forever.
            eprintln!("zimage-studio: cannot start a background task: {e}");
        }
        Self { rx }
    }

    /// The result, once (None while running, and after it was taken).
    pub fn poll(&self) -> Option<T> {
        self.rx.try_recv().ok()
    }
}

/// What a [`Download`] reports.
#[derive(Debug, Clone)]
pub enum DownloadEvent {
    Progress(PullProgress),
    /// The snapshot folder, complete and verified.
    Done(PathBuf),
    Failed(String),
    Cancelled,
}

/// A model download from the Hugging Face hub on its own thread, into the
/// shared hub cache (resumable; see `zimage_engine::pull`).
pub struct Download {
    /// `turbo` or `base`.
    pub model: String,
    pub started: Instant,
    /// The latest progress report.
    pub progress: Option<PullProgress>,
    cancel: Arc<AtomicBool>,
    rx: Receiver<DownloadEvent>,
}

impl Download {
    pub fn start(model: &str, options: PullOptions, waker: Waker) -> Result<Self, String> {
        let repo = zimage_engine::pull::repo_for(model).map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let stop = cancel.clone();
        std::thread::Builder::new()
            .name("zimage-download".into())
            .spawn(move || {
                let mut last_report: Option<Instant> = None;
                let mut last_file = String::new();
                let result = catch_unwind(AssertUnwindSafe(|| {
                    zimage_engine::pull::pull(repo, &options, &stop, &mut |p: &PullProgress| {
                        // Chunks are 1 MB: report at most ~10 times a second, and every new file.
                        if last_report.is_none_or(|t| t.elapsed() >= Duration::from_millis(100))
                            || p.file != last_file
                            || p.file_done == p.file_total
                        {
                            last_report = Some(Instant::now());
                            last_file.clone_from(&p.file);
                            let _ = tx.send(DownloadEvent::Progress(p.clone()));
                            waker();
                        }
                    })
                }));
                let event = match result {
                    Ok(Ok(path)) => DownloadEvent::Done(path),
                    Ok(Err(EngineError::Cancelled)) => DownloadEvent::Cancelled,
                    // "download failed: …" says it is a download already.
                    Ok(Err(EngineError::Download(why))) => DownloadEvent::Failed(one_line(&why)),
                    Ok(Err(e)) => DownloadEvent::Failed(one_line(&e.to_string())),
                    Err(_) => DownloadEvent::Failed("the download crashed; start it again to resume".into()),
                };
                let _ = tx.send(event);
                waker();
            })
            .map_err(|e| format!("cannot start the download: {e}"))?;
        Ok(Self { model: model.into(), started: Instant::now(), progress: None, cancel, rx })
    }

    /// Asks the download to stop after the current chunk (kept for resuming).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// New events; progress also updates [`Download::progress`].
    pub fn poll(&mut self) -> Vec<DownloadEvent> {
        let events: Vec<DownloadEvent> = self.rx.try_iter().collect();
        for e in &events {
            if let DownloadEvent::Progress(p) = e {
                self.progress = Some(p.clone());
            }
        }
        events
    }
}

/// Disk work off the UI thread: PNG encoding + fsync of history images and
/// the history index, and decoding thumbnails. One thread, FIFO, so writes
/// land in the order they were asked for; dropping it finishes pending work.
pub struct BackgroundIo {
    tx: Option<Sender<IoTask>>,
    rx: Receiver<IoResult>,
    thread: Option<JoinHandle<()>>,
}

pub type IoTask = Box<dyn FnOnce() -> IoResult + Send>;

#[derive(Debug)]
pub enum IoResult {
    Done,
    Error(String),
    Loaded { key: String, image: RgbImage },
    /// The image for `key` could not be read (its file moved, deleted or damaged).
    Unreadable { key: String, message: String },
}

impl BackgroundIo {
    pub fn spawn(waker: Waker) -> Self {
        let (tx, task_rx) = mpsc::channel::<IoTask>();
        let (res_tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("zimage-io".into())
            .spawn(move || {
                for task in task_rx {
                    let result = catch_unwind(AssertUnwindSafe(task))
                        .unwrap_or_else(|_| IoResult::Error("a disk task crashed".into()));
                    if !matches!(result, IoResult::Done) {
                        let _ = res_tx.send(result);
                        waker();
                    }
                }
            })
            .expect("spawning the disk thread");
        Self { tx: Some(tx), rx, thread: Some(thread) }
    }

    /// Queues `task`; runs it here and now if the thread is gone.
    pub fn run(&self, task: IoTask) {
        if let Some(tx) = &self.tx {
            if let Err(mpsc::SendError(task)) = tx.send(task) {
                let _ = task();
            }
        }
    }

    pub fn poll(&self) -> Vec<IoResult> {
        self.rx.try_iter().collect()
    }
}

impl Drop for BackgroundIo {
    fn drop(&mut self) {
        self.tx = None; // ends the thread's loop after the queued tasks
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Watches the data folder's inbox (`instance::hand_over`) and wakes the UI
/// when another start has handed files over ("Open with" while the app runs).
pub struct Inbox {
    rx: Receiver<Vec<PathBuf>>,
    /// Dropped to stop the thread at once (it waits on this between looks).
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Inbox {
    pub fn spawn(data_dir: PathBuf, waker: Waker) -> Self {
        let (tx, rx) = mpsc::channel();
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("zimage-inbox".into())
            .spawn(move || loop {
                let files = crate::instance::take_handed_over(&data_dir);
                if !files.is_empty() {
                    if tx.send(files).is_err() {
                        return;
                    }
                    waker();
                }
                // A directory listing a few times a second: nothing to notice.
                match stopped.recv_timeout(Duration::from_millis(250)) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
            })
            .ok();
        Self { rx, stop: Some(stop), thread }
    }

    /// The files handed over since the last call.
    pub fn poll(&self) -> Vec<PathBuf> {
        self.rx.try_iter().flatten().collect()
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.stop = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
