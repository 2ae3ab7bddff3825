//! The application: state, engine events, actions. Drawing lives in `ui/`.
//! This file holds the state and the frame's logic; `events` (engine news),
//! `live` (typing), `actions` (what panels ask for) and `export` (save,
//! copy) hold the rest of [`StudioApp`]'s methods.

mod actions;
mod events;
mod export;
mod live;

pub use actions::{Action, Refined};

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use zimage_engine::discovery::FoundModel;
use zimage_engine::metadata::{self, GenerationMetadata, LoraRef};
use zimage_engine::pipeline::{GenerateRequest, ModelKind};
use zimage_engine::preview::RgbImage;
use zimage_engine::pull::PullOptions;

use crate::engine_bridge::{
    BackgroundIo, Download, DownloadEvent, EngineHandle, Event, IoResult, JobId, JobKind, JobSpec, LoraChoice,
    LiveWait, LoraState, ModelConfig, ModelSlot, ModelState, Task, Waker,
};
use crate::fonts::{Fallback, FoundFonts};
use crate::history::History;
use crate::images::Images;
use crate::prompts::{self, PromptHistory};
use crate::save;
use crate::settings::{default_output_dir, Paths, Settings};
use crate::state::{self, CompareState, LiveStatus, Mark, RefineMode, View, ZoomView};

pub const APP_NAME: &str = concat!("Z-Image Studio ", env!("CARGO_PKG_VERSION"));

/// How the app is started: data folder and one-run model overrides (CLI).
#[derive(Debug, Clone)]
pub struct StudioOptions {
    pub paths: Paths,
    pub turbo: Option<String>,
    pub base: Option<String>,
    /// Device for this run (`auto`, `cpu`, `cuda`, `wgpu`); `None` = the saved setting.
    pub device: Option<String>,
    /// PNGs to open: their stored parameters are restored.
    pub open: Vec<PathBuf>,
}

/// The live job `live` waits behind `behind` until `until` ([`Event::LiveWaits`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LiveWaitState {
    pub live: JobId,
    pub behind: JobId,
    pub until: LiveWait,
}

/// A job the UI is waiting for.
#[derive(Debug, Clone)]
pub struct PendingJob {
    pub kind: JobKind,
    pub slot: ModelSlot,
    pub request: GenerateRequest,
    pub parent: Option<String>,
    /// When the edit that caused a live job happened (latency metrics).
    pub edit_at: Option<Instant>,
    pub progress: (usize, usize),
    pub saw_preview: bool,
    /// When it was asked for: a refine that finishes after the user went on
    /// to something else does not take the view from them.
    pub submitted: Instant,
    /// Paused at a step boundary for a live image; resumes where it stopped.
    pub paused: bool,
    /// A live job rendered at draft size, to be finished at full size.
    pub draft: bool,
    /// The start image's name, when the job starts from one (for the PNG).
    pub start: Option<String>,
}

impl PendingJob {
    /// A job just submitted: nothing run yet, no lineage, no start image.
    pub fn new(kind: JobKind, slot: ModelSlot, request: GenerateRequest) -> Self {
        Self {
            kind,
            slot,
            request,
            parent: None,
            edit_at: None,
            progress: (0, 0),
            saw_preview: false,
            submitted: Instant::now(),
            paused: false,
            draft: false,
            start: None,
        }
    }

    /// What its steps left take at `rate` (seconds per megapixel per DiT
    /// pass, as [`StudioApp::pass_rate`] keeps it), at its size and guidance.
    pub fn time_left(&self, rate: f64) -> Duration {
        let r = &self.request;
        state::predicted_time(rate, r.width, r.height, state::steps_left(r, self.progress.0) * state::dit_passes(r.guidance))
    }
}

/// An image the Turbo jobs start from (img2img), e.g. a sketch dropped on
/// the window; kept for the session.
#[derive(Clone)]
pub struct StartImage {
    pub name: String,
    pub image: Arc<RgbImage>,
}

/// One cell of the variations grid.
#[derive(Debug, Clone)]
pub struct VariationCell {
    /// The job drawing it; `None` when the image existed already (the live
    /// image of the same request, taken as the grid's first cell).
    pub job: Option<JobId>,
    pub seed: u64,
    /// History id once finished.
    pub id: Option<String>,
    pub progress: (usize, usize),
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub text: String,
    pub error: bool,
    /// When it was said: a note goes after [`NOTE_SHOWN`]; an error stays
    /// until dismissed.
    pub since: Instant,
}

/// How often the history images a full disk refused are written again.
pub const WRITE_RETRY: Duration = Duration::from_secs(5);

/// How long a note (not an error) stays in the status bar.
pub const NOTE_SHOWN: Duration = Duration::from_secs(10);

/// Latency and frame-time measurements (docs/app-latency.md).
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    pub first_preview: Option<Duration>,
    pub final_image: Option<Duration>,
    pub frame_times: VecDeque<Duration>,
    /// CPU time the UI thread itself spent per frame (Linux); frame_times minus
    /// this is time the thread waited for a core (the engine uses them all).
    pub frame_cpu_times: VecDeque<Duration>,
    /// Live jobs replaced by a newer one before they finished.
    pub superseded: u64,
}

impl Metrics {
    pub fn record_frame(&mut self, wall: Duration, cpu: Option<Duration>) {
        if self.frame_times.len() >= 600 {
            self.frame_times.pop_front();
        }
        self.frame_times.push_back(wall);
        if let Some(cpu) = cpu {
            if self.frame_cpu_times.len() >= 600 {
                self.frame_cpu_times.pop_front();
            }
            self.frame_cpu_times.push_back(cpu);
        }
    }
}

/// CPU time consumed by the calling thread so far (Linux only).
pub fn thread_cpu_time() -> Option<Duration> {
    #[cfg(target_os = "linux")]
    {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: ts is a valid, writable timespec.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        if rc == 0 {
            return Some(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32));
        }
    }
    None
}

/// A clean up of the history waiting for its confirmation.
#[derive(Debug, Clone, PartialEq)]
pub struct Cleanup {
    /// The images it removes, oldest first.
    pub ids: Vec<String>,
    /// What they take on disk.
    pub bytes: u64,
}

pub struct StudioApp {
    pub settings: Settings,
    pub paths: Paths,
    pub history: History,
    /// The prompts settled on, for Alt+↑ / Alt+↓ (see `prompts`).
    pub prompt_history: PromptHistory,
    /// The prompt of the live image on screen and when it arrived: recorded
    /// once it stays unedited for `prompts::SETTLE`.
    live_shown: Option<(String, Instant)>,
    /// Live, Generate and the variations start from this image (img2img).
    pub start_image: Option<StartImage>,
    pub engine: EngineHandle,
    pub model_config: ModelConfig,
    /// Whether the CLI overrides the saved models for this run.
    pub cli_override: bool,
    pub models: HashMap<ModelSlot, ModelState>,
    /// Why the model last asked for a slot was refused (the working one kept),
    /// shown under its Settings field until the next change of models.
    pub model_rejected: HashMap<ModelSlot, String>,
    pub prompt: String,
    pub view: View,
    pub live_status: LiveStatus,
    /// Set when the prompt/settings changed; a live job starts after the quiet period.
    pub dirty_at: Option<Instant>,
    pub live_job: Option<JobId>,
    /// The full-size request of the last live job sent and the models then:
    /// an edit that ends where it started (a slider moved back, Live off and
    /// on) does not render the same image again. Cleared when that job fails
    /// or is stopped, so that it can be asked for again.
    live_sent: Option<(GenerateRequest, ModelConfig)>,
    /// The image `live_sent` drew, at full size from noise or the start image
    /// (not a draft, nor a draft's upgrade): a variations grid at the same
    /// settings takes it as its first cell instead of drawing it again.
    live_made: Option<String>,
    pub live_ema: Option<Duration>,
    /// Recent live time per megapixel-step, drafts and upgrades included:
    /// predicts a full-size live image's time (`LiveDraft::Auto`) at any size.
    pub live_rate: Option<f64>,
    /// Seconds per megapixel per DiT pass each model last took (a CFG step
    /// is two passes): the time of a refine at any size and guidance.
    pub pass_rate: HashMap<ModelSlot, f64>,
    pub jobs: HashMap<JobId, PendingJob>,
    /// Shown in the Live view: the latest finished image (history id).
    pub current: Option<String>,
    /// Selected image (history id): what Save and Refine act on.
    pub selected: Option<String>,
    /// Which entries the history panel lists.
    pub history_filter: state::HistoryFilter,
    /// Words the listed history images' prompts (or seeds) must hold.
    pub history_search: String,
    /// What [`Self::listed_history`] last found, for the history's revision,
    /// the filter and the search it was found for.
    listed: std::cell::RefCell<Option<ListedHistory>>,
    /// A prompt and its length in tokens, as the engine counted it.
    pub prompt_tokens: Option<(String, usize)>,
    /// The prompt last sent to the engine to count (see [`StudioApp::ask_token_count`]).
    count_asked: String,
    /// What the engine last said about a live job waiting behind another.
    pub live_wait: Option<LiveWaitState>,
    pub live_preview: bool,
    /// The Live view's zoom and pan, kept from image to image: zoomed on a
    /// detail, you watch it change as you type.
    pub live_view: ZoomView,
    pub refine_job: Option<JobId>,
    pub compare: CompareState,
    /// (Turbo id, Base id) shown in the Compare view.
    pub compare_pair: Option<(String, String)>,
    /// When a finished refine last opened its pair in the Compare view: the
    /// later refines of the same batch leave that pair on screen.
    pub compare_opened: Option<Instant>,
    /// The last key, click or scroll of the user (not of the app itself).
    pub last_input: Option<Instant>,
    /// The history clean up being confirmed.
    pub cleanup: Option<Cleanup>,
    pub variations: Vec<VariationCell>,
    pub var_cursor: usize,
    /// The variations grid's columns as last drawn (the arrow keys move by them).
    pub var_columns: usize,
    /// Scroll the grid to the cursor's cell in the next frame.
    pub var_reveal: bool,
    pub message: Option<Message>,
    pub show_help: bool,
    pub show_settings: bool,
    pub settings_form: [String; 3],
    /// First-run welcome screen.
    pub show_welcome: bool,
    /// The welcome's "point at a folder" field.
    pub welcome_folder: String,
    /// Models found on this computer (None until a scan finished).
    pub found_models: Option<Vec<FoundModel>>,
    scan: Option<Task<Vec<FoundModel>>>,
    pub download: Option<Download>,
    /// One line about the last download (done, failed, cancelled).
    pub download_note: Option<String>,
    /// Where downloads come from; `None` = the hub the environment names
    /// (`HF_ENDPOINT`, `HF_HOME`…). Tests point it at a local hub.
    pub pull_options: Option<PullOptions>,
    /// What the engine applied per model after the last LoRA change.
    pub lora_state: HashMap<ModelSlot, LoraState>,
    /// The "Add LoRA" path fields.
    pub lora_form: HashMap<ModelSlot, String>,
    /// Why the last path given to an "Add LoRA" field was not added.
    pub lora_form_error: HashMap<ModelSlot, String>,
    /// Reading the fallback fonts: symbols, CJK for the prompt box (see `fonts`).
    font_task: Option<Task<FoundFonts>>,
    /// PNGs from the command line, restored on the first frame.
    open_files: Vec<PathBuf>,
    /// What closing the window now would drop, while the question is on screen.
    pub quit_asked: Option<String>,
    /// Closing was confirmed (or nothing was running): the next close goes through.
    quit_confirmed: bool,
    /// Files another start of the app hands over (it found this one running).
    inbox: crate::engine_bridge::Inbox,
    /// The engine's last memory report.
    pub memory: Option<crate::engine_bridge::MemoryReport>,
    /// Where the engine runs ("CPU", "CUDA"…), once it said so.
    pub device_name: Option<String>,
    /// On a GPU, until its first image is finished: kernels still compile.
    pub gpu_kernels_cold: bool,
    /// The fallback fonts in use, once installed, in their order.
    pub fallback_fonts: Vec<(Fallback, PathBuf)>,
    pub waker: Waker,
    pub images: Images,
    /// History images being decoded on the disk thread.
    loading: HashSet<String>,
    /// The data folder could not be created at start (said then): nothing is kept.
    no_data_dir: bool,
    /// When the history images a full disk refused are written again.
    write_retry_at: Option<Instant>,
    /// How many refused images the status bar said were kept in memory.
    unwritten_said: usize,
    /// Images (or thumbnails) whose file could not be read, and why: not
    /// asked for again, and shown as such.
    pub unreadable: HashMap<String, String>,
    pub metrics: Metrics,
    pub focus_prompt: bool,
    /// The history panel scrolls to the selected entry (moved by the keyboard).
    pub reveal_selected: bool,
    /// The prompt box's widget id (known after the first frame).
    pub prompt_id: Option<egui::Id>,
    /// Give the prompt its focus back when the open overlay closes.
    pub refocus_after_overlay: bool,
    pub frame_start: Option<(Instant, Option<Duration>)>,
    /// Last settings written to disk, and when they started to differ.
    saved_settings: Settings,
    settings_changed_at: Option<Instant>,
    /// `$ZIMAGE_STUDIO_METRICS`: where to write [`Metrics`] as JSON (Xvfb runs).
    metrics_file: Option<(PathBuf, Instant)>,
}

impl StudioApp {
    pub fn new(ctx: &egui::Context, options: StudioOptions) -> Self {
        let ctx2 = ctx.clone();
        let waker: Waker = Arc::new(move || ctx2.request_repaint());
        let (settings, w1) = Settings::load(&options.paths);
        let inbox = crate::engine_bridge::Inbox::spawn(options.paths.data_dir.clone(), waker.clone());
        let device = crate::cli::parse_device(options.device.as_deref().unwrap_or(&settings.device)).unwrap_or(None);
        let engine = EngineHandle::spawn_on(device, waker.clone());
        let (mut history, w2) = History::load(&options.paths);
        let ctx3 = ctx.clone();
        history.set_io(BackgroundIo::spawn(Arc::new(move || ctx3.request_repaint())));
        let (prompt_history, w3) = PromptHistory::load(&prompts::prompts_file(&options.paths.data_dir));
        let crashed = crate::crash::last_crash(&options.paths.data_dir);
        // Without its data folder the app still runs, but keeps nothing: said first.
        let no_data_dir = std::fs::create_dir_all(&options.paths.data_dir).err().map(|e| {
            format!(
                "the data folder {} cannot be created ({}): the images, history and settings of this run will not be kept; start with --data-dir set to a folder you can write",
                options.paths.data_dir.display(),
                zimage_engine::error::plain_cause(&e)
            )
        });
        let cli_override = options.turbo.is_some() || options.base.is_some();
        let model_config = effective_models(&settings, &options);
        let settings_form = settings_form_of(&settings);
        let mut app = Self {
            prompt: String::new(),
            paths: options.paths,
            history,
            prompt_history,
            live_shown: None,
            start_image: None,
            engine,
            model_config: model_config.clone(),
            cli_override,
            models: HashMap::new(),
            model_rejected: HashMap::new(),
            view: View::Live,
            live_status: LiveStatus::Idle,
            dirty_at: None,
            live_job: None,
            live_made: None,
            live_sent: None,
            live_ema: None,
            live_rate: None,
            pass_rate: HashMap::new(),
            jobs: HashMap::new(),
            current: None,
            selected: None,
            history_filter: state::HistoryFilter::All,
            listed: Default::default(),
            history_search: String::new(),
            prompt_tokens: None,
            count_asked: String::new(),
            live_wait: None,
            live_preview: false,
            live_view: ZoomView::default(),
            refine_job: None,
            compare: CompareState::default(),
            compare_pair: None,
            compare_opened: None,
            last_input: None,
            cleanup: None,
            variations: Vec::new(),
            var_cursor: 0,
            var_columns: 1,
            var_reveal: false,
            message: no_data_dir.clone().or(crashed).or(w1).or(w2).or(w3).map(|text| Message { text, error: true, since: Instant::now() }),
            show_help: false,
            show_settings: false,
            settings_form,
            // Models named on the command line are a choice already made; the
            // welcome waits for a plain start (welcome_done stays as it is).
            show_welcome: !settings.welcome_done && !cli_override,
            welcome_folder: String::new(),
            found_models: None,
            scan: None,
            download: None,
            download_note: None,
            pull_options: None,
            lora_state: HashMap::new(),
            lora_form: HashMap::new(),
            lora_form_error: HashMap::new(),
            font_task: Some(Task::spawn("zimage-fonts", waker.clone(), crate::fonts::find_and_read)),
            fallback_fonts: Vec::new(),
            device_name: None,
            gpu_kernels_cold: false,
            memory: None,
            open_files: options.open.clone(),
            inbox,
            quit_asked: None,
            quit_confirmed: false,
            waker,
            images: Images::default(),
            loading: HashSet::new(),
            unreadable: HashMap::new(),
            no_data_dir: no_data_dir.is_some(),
            write_retry_at: None,
            unwritten_said: 0,
            metrics: Metrics::default(),
            focus_prompt: true,
            // The history list opens on the image shown, not on the scroll
            // offset egui kept from the last run (newer images came since).
            reveal_selected: true,
            prompt_id: None,
            refocus_after_overlay: false,
            frame_start: None,
            saved_settings: settings.clone(),
            settings_changed_at: None,
            metrics_file: std::env::var_os("ZIMAGE_STUDIO_METRICS").map(|p| (PathBuf::from(p), Instant::now())),
            settings,
        };
        // Start where the user left off: the prompt box's text and the
        // settings as they were (not the newest image's parameters: after a
        // grid those are its last cell's seed), the newest image shown.
        if let Some(last) = app.history.entries().last() {
            app.prompt = app.settings.prompt.clone().unwrap_or_else(|| last.meta.prompt.clone());
            // Shown and selected: Ctrl+S, Ctrl+C and refine act on it.
            app.selected = Some(last.id.clone());
            app.current = Some(last.id.clone());
        } else if let Some(prompt) = &app.settings.prompt {
            app.prompt = prompt.clone();
        }
        app.restore_grid();
        app.engine.load_models(model_config);
        app
    }

    /// Runs before drawing each frame: engine events, live scheduling, drops.
    pub fn logic(&mut self, ctx: &egui::Context) {
        self.frame_start = Some((Instant::now(), thread_cpu_time()));
        let acted = ctx.input(|i| {
            i.events.iter().any(|e| {
                matches!(
                    e,
                    egui::Event::Key { pressed: true, .. }
                        | egui::Event::Text(_)
                        | egui::Event::PointerButton { pressed: true, .. }
                        | egui::Event::MouseWheel { .. }
                )
            })
        });
        if acted {
            self.last_input = Some(Instant::now());
        }
        self.images.begin_frame();
        for ev in self.engine.poll() {
            self.on_event(ctx, ev);
        }
        let io = self.history.io().map(|io| io.poll()).unwrap_or_default();
        for r in io {
            match r {
                IoResult::Loaded { key, image } => {
                    self.loading.remove(&key);
                    self.images.put(ctx, &key, Arc::new(image));
                }
                IoResult::Unreadable { key, message } => {
                    self.loading.remove(&key);
                    // Said once, for the image itself (its thumbnail shows a mark).
                    if !key.starts_with("thumb:") {
                        self.error(format!("#{key}: {message}"));
                    }
                    self.unreadable.insert(key, message);
                }
                IoResult::Error(e) => {
                    let waiting = self.history.failed_writes();
                    let kept = match waiting {
                        0 => String::new(),
                        n => format!(
                            "; {n} image{} kept in memory until there is room",
                            if n == 1 { " is" } else { "s are" },
                        ),
                    };
                    self.unwritten_said = self.unwritten_said.max(waiting);
                    self.error(format!("history folder: {e}{kept}"));
                }
                IoResult::Done => {}
            }
        }
        self.retry_history_writes(ctx);
        // Closing with images still being made asks first (they are not kept).
        if ctx.input(|i| i.viewport().close_requested()) && !self.quit_confirmed {
            if let Some(what) = self.unfinished_work() {
                ctx.send_viewport_cmd(egui::ViewportCommand::CancelClose);
                self.quit_asked = Some(what);
            }
        }
        let handed = self.inbox.poll();
        if !handed.is_empty() {
            // Opened as if given on the command line, in this window, brought to the front.
            self.open_files.extend(handed);
            ctx.send_viewport_cmd(egui::ViewportCommand::Focus);
        }
        self.poll_background(ctx);
        self.schedule_live(ctx);
        self.settle_prompt(ctx);
        self.handle_dropped_files(ctx);
        self.autosave_settings(ctx);
        self.expire_note(ctx);
        self.write_metrics();
    }

    /// A note leaves the status bar by itself; an error waits to be read.
    fn expire_note(&mut self, ctx: &egui::Context) {
        let Some(msg) = self.message.as_ref().filter(|m| !m.error) else { return };
        match NOTE_SHOWN.checked_sub(msg.since.elapsed()) {
            Some(left) if !left.is_zero() => ctx.request_repaint_after(left),
            _ => self.message = None,
        }
    }

    /// Model scan results and download progress.
    fn poll_background(&mut self, ctx: &egui::Context) {
        if let Some((found, missing)) = self.font_task.as_ref().and_then(Task::poll) {
            self.font_task = None;
            for (kind, path, bytes) in found {
                match bytes {
                    Ok(bytes) => {
                        crate::fonts::install(ctx, &path, bytes);
                        self.fallback_fonts.push((kind, path));
                    }
                    Err(e) => eprintln!("zimage-studio: {e}; {}", kind.without()),
                }
            }
            for kind in missing {
                eprintln!("zimage-studio: no font found: {}", kind.without());
            }
        }
        if let Some(found) = self.scan.as_ref().and_then(Task::poll) {
            self.found_models = Some(found);
            self.scan = None;
        }
        let events = self.download.as_mut().map(Download::poll).unwrap_or_default();
        for ev in events {
            let model = self.download.as_ref().map(|d| d.model.clone()).unwrap_or_default();
            match ev {
                DownloadEvent::Progress(_) => {}
                DownloadEvent::Done(path) => {
                    self.download = None;
                    self.download_note = Some(format!("Z-Image {model} downloaded to {}", path.display()));
                    let slot = if model == "base" { ModelSlot::Base } else { ModelSlot::Turbo };
                    self.use_model(slot, path.display().to_string());
                    self.info(format!("download complete; loading {}", slot.label()));
                }
                DownloadEvent::Failed(e) => {
                    self.download = None;
                    self.download_note = Some(format!("download failed: {e} (start it again to resume)"));
                    self.error(format!("download failed: {e}"));
                }
                DownloadEvent::Cancelled => {
                    self.download = None;
                    self.download_note =
                        Some("download cancelled; what was downloaded is kept and the next start resumes".into());
                }
            }
        }
    }

    /// Whether a model scan is running.
    pub fn scanning(&self) -> bool {
        self.scan.is_some()
    }

    /// Makes `model` the model of `slot`, saved in the settings, and loads it.
    /// Whether the settings window's path fields differ from the saved
    /// settings (typed or browsed but not applied yet).
    pub fn settings_form_edited(&self) -> bool {
        let saved = settings_form_of(&self.settings);
        self.settings_form.iter().zip(&saved).any(|(form, saved)| crate::settings::typed_path(form) != *saved)
    }

    fn use_model(&mut self, slot: ModelSlot, model: String) {
        self.model_rejected.remove(&slot);
        *self.settings.model_mut(slot) = Some(model.clone());
        self.settings_form[if slot == ModelSlot::Turbo { 0 } else { 1 }] = model;
        self.cli_override = false;
        self.reload_models();
    }

    /// Applies the saved model and LoRA settings and persists them.
    fn reload_models(&mut self) {
        self.model_config =
            effective_models(&self.settings, &StudioOptions { paths: self.paths.clone(), turbo: None, base: None, device: None, open: Vec::new() });
        self.engine.load_models(self.model_config.clone());
        // Another model may have another tokenizer: count again.
        self.count_asked.clear();
        self.persist_settings();
    }

    /// Asks the engine for the prompt's length in tokens whenever the text
    /// changes, so the count under the prompt box follows typing, with Live
    /// off too, and is there for a prompt restored at start.
    fn ask_token_count(&mut self) {
        // What the model reads: the wildcards as the seed resolves them.
        let prompt = self.prompt_for_seed();
        if prompt.trim().is_empty() || prompt == self.count_asked || self.prompt_tokens.as_ref().is_some_and(|(p, _)| *p == prompt) {
            return;
        }
        self.count_asked = prompt.clone();
        self.engine.count_tokens(prompt);
    }

    fn write_metrics(&mut self) {
        let Some((path, last)) = &mut self.metrics_file else { return };
        if last.elapsed() < Duration::from_millis(500) {
            return;
        }
        *last = Instant::now();
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
        let mut frames: Vec<f64> = self.metrics.frame_times.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        frames.sort_by(f64::total_cmp);
        let pct = |p: f64| frames.get(((frames.len() as f64 - 1.0) * p).round() as usize).copied();
        let mut cpu: Vec<f64> = self.metrics.frame_cpu_times.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        cpu.sort_by(f64::total_cmp);
        let mut live: Vec<u64> = self.history.entries().iter().filter(|e| e.job == JobKind::Live).map(|e| e.elapsed_ms).collect();
        live.sort_unstable();
        let json = serde_json::json!({
            "frame_cpu_ms_max": cpu.last(),
            "first_preview_ms": ms(self.metrics.first_preview),
            "final_image_ms": ms(self.metrics.final_image),
            "frames": frames.len(),
            "frame_ms_p50": pct(0.5),
            "frame_ms_p95": pct(0.95),
            "frame_ms_max": frames.last(),
            "history": self.history.entries().len(),
            // How live the preview was: images finished (not overtaken by the
            // next key) and their median engine time.
            "live_images": live.len(),
            "live_ms_median": live.get(live.len() / 2),
            "live_status": self.live_status.text(),
        });
        let _ = metadata::write_file_atomic(path, json.to_string().as_bytes());
    }

    /// Settings are written one second after the last change (not on every
    /// slider tick, and not only on exit: a killed app would lose them).
    fn autosave_settings(&mut self, ctx: &egui::Context) {
        self.keep_session();
        if self.settings == self.saved_settings {
            self.settings_changed_at = None;
            return;
        }
        let since = *self.settings_changed_at.get_or_insert_with(Instant::now);
        if since.elapsed() >= Duration::from_secs(1) {
            self.persist_settings();
        } else {
            ctx.request_repaint_after(Duration::from_secs(1));
        }
    }

    /// Every (Turbo, Base) pair in the history, oldest first: a Base refine
    /// and the image it was refined from (both still in the history).
    pub fn refine_pairs(&self) -> Vec<(String, String)> {
        self.history
            .entries()
            .iter()
            .filter(|e| e.slot == ModelSlot::Base)
            .filter_map(|e| e.parent.as_ref().filter(|p| self.history.get(p).is_some()).map(|p| (p.clone(), e.id.clone())))
            .collect()
    }

    /// The pairs "All pairs" shows: the page of refine pairs that holds the
    /// compared pair, with the index of its first pair and the number of
    /// pairs; just the compared pair when it is not a refine pair.
    pub fn shown_pairs(&self) -> (Vec<(String, String)>, usize, usize) {
        let Some(current) = self.compare_pair.clone() else { return (Vec::new(), 0, 0) };
        let pairs = self.refine_pairs();
        match pairs.iter().position(|p| *p == current) {
            Some(at) => {
                let page = state::pair_page(pairs.len(), at, state::PAIRS_PER_PAGE);
                (pairs[page.clone()].to_vec(), page.start, pairs.len())
            }
            None => (vec![current], 0, 1),
        }
    }

    /// Shows the refine pair `delta` places before (−) or after (+) the one
    /// compared now, stopping at the ends: reviewing a batch of refines.
    pub fn step_compare_pair(&mut self, delta: isize) {
        let pairs = self.refine_pairs();
        let Some(at) = self.compare_pair.as_ref().and_then(|p| pairs.iter().position(|q| q == p)) else { return };
        let to = (at as isize + delta).clamp(0, pairs.len() as isize - 1) as usize;
        self.show_pair(pairs[to].clone());
    }

    /// Compares `pair` (Turbo id, Base id), its Base image selected and
    /// scrolled to in the history, as when a refine opens its pair.
    pub fn show_pair(&mut self, pair: (String, String)) {
        if self.compare_pair.as_ref() != Some(&pair) {
            self.selected = Some(pair.1.clone());
            self.reveal_selected = true;
        }
        self.compare_pair = Some(pair);
    }

    /// Puts the grid's cursor on cell `i`; its image, once made, is selected
    /// and scrolled to in the history, as stepping through compared pairs does,
    /// so "start from the selected image" and the history agree with the grid.
    pub fn move_grid_cursor(&mut self, i: usize) {
        self.var_cursor = i;
        if let Some(id) = self.variations.get(i).and_then(|c| c.id.clone()) {
            if self.selected.as_ref() != Some(&id) {
                self.selected = Some(id);
                self.reveal_selected = true;
            }
        }
    }

    /// Shows history image `id` in this frame: kept in [`Images`], or decoded
    /// on the disk thread and shown from the next frames on.
    pub fn request_image(&mut self, ctx: &egui::Context, id: &str) {
        self.request(ctx, id, id.to_string(), None);
    }

    /// The key of history image `id`'s thumbnail, shown in this frame: made
    /// from the image when it is in memory, else loaded and scaled down on
    /// the disk thread. The history panel shows these, not the images.
    pub fn request_thumbnail(&mut self, ctx: &egui::Context, id: &str) -> String {
        let key = format!("thumb:{id}");
        self.request(ctx, id, key.clone(), Some(crate::images::THUMB_SIDE));
        key
    }

    /// Keeps `key` (history image `id`, or its thumbnail of `thumb_side`
    /// pixels) in memory for this frame, loading it when it is not there.
    fn request(&mut self, ctx: &egui::Context, id: &str, key: String, thumb_side: Option<u32>) {
        self.images.touch(&key);
        if self.images.contains(&key) || self.loading.contains(&key) || self.unreadable.contains_key(&key) {
            return;
        }
        let shrink = |img: &RgbImage| thumb_side.map(|side| crate::images::thumbnail(img, side));
        if let Some(small) = self.images.rgb(id).and_then(|full| shrink(&full)) {
            self.images.put(ctx, &key, Arc::new(small));
            return;
        }
        let Some(entry) = self.history.get(id).cloned() else { return };
        if self.history.load_in_background(&entry, key.clone(), thumb_side) {
            self.loading.insert(key);
        } else {
            match self.history.load_image(&entry) {
                Ok(img) => {
                    let img = shrink(&img).unwrap_or(img);
                    self.images.put(ctx, &key, Arc::new(img));
                }
                Err(e) => {
                    self.unreadable.insert(key, e.to_string());
                }
            }
        }
    }

    /// A note that leaves by itself (`NOTE_SHOWN`): what happened, or why a
    /// key or button could do nothing now ("nothing to save yet"), which is
    /// no failure to dismiss.
    pub fn info(&mut self, text: impl Into<String>) {
        self.message = Some(Message { text: text.into(), error: false, since: Instant::now() });
    }

    /// A failure: it stays until dismissed.
    pub fn error(&mut self, text: impl Into<String>) {
        self.message = Some(Message { text: text.into(), error: true, since: Instant::now() });
    }

    /// What closing the window now would lose or stop, in a sentence; `None`
    /// when nothing is running but the live preview (which is not lost).
    /// Writes again, every [`WRITE_RETRY`], the history images a full (or
    /// unwritable) disk refused, and says when they are all on disk.
    fn retry_history_writes(&mut self, ctx: &egui::Context) {
        let failed = self.history.failed_writes();
        if failed == 0 {
            if self.unwritten_said > 0 && self.history.unwritten() > 0 {
                // Written on the disk thread, which wakes the UI only for errors.
                ctx.request_repaint_after(Duration::from_millis(100));
            } else if self.unwritten_said > 0 {
                let n = std::mem::take(&mut self.unwritten_said);
                self.info(format!(
                    "the image{} kept in memory {} written to the history folder now",
                    if n == 1 { "" } else { "s" },
                    if n == 1 { "is" } else { "are" }
                ));
            }
            return;
        }
        let due = self.write_retry_at.get_or_insert_with(|| Instant::now() + WRITE_RETRY);
        if Instant::now() >= *due {
            self.write_retry_at = None;
            self.history.retry_writes();
            ctx.request_repaint_after(Duration::from_millis(100));
        } else {
            ctx.request_repaint_after(*due - Instant::now());
        }
    }

    fn unfinished_work(&self) -> Option<String> {
        let jobs = self.engine.queued();
        let mut parts = Vec::new();
        let unwritten = self.history.failed_writes();
        if unwritten > 0 {
            let s = if unwritten == 1 { " is" } else { "s are" };
            parts.push(format!("{unwritten} image{s} lost: the history folder had no room for them (free some disk space first)"));
        }
        if jobs > 0 {
            let s = if jobs == 1 { "" } else { "s" };
            parts.push(format!("{jobs} image{s} (Base refines or variations) still being made or queued will not be made"));
        }
        if self.download.is_some() {
            parts.push("the download stops (it resumes when started again)".to_string());
        }
        (!parts.is_empty()).then(|| format!("If you quit now, {}.", parts.join(", and ")))
    }

    /// The history entries the history panel lists, newest first (its filter applied).
    pub fn listed_history(&self) -> Arc<Vec<String>> {
        // Kept until the history, the filter or the search changes: the panel
        // asks every frame, and a long history made that a frame's largest cost.
        let key = (self.history.revision(), self.history_filter, self.history_search.as_str());
        if let Some((rev, filter, search, ids)) = &*self.listed.borrow() {
            if (*rev, *filter, search.as_str()) == key {
                return ids.clone();
            }
        }
        let ids = Arc::new(self.find_listed());
        *self.listed.borrow_mut() = Some((key.0, key.1, key.2.to_string(), ids.clone()));
        ids
    }

    fn find_listed(&self) -> Vec<String> {
        let filter = self.history_filter;
        let words: Vec<String> = self.history_search.split_whitespace().map(str::to_lowercase).collect();
        let shown = |e: &&Arc<crate::history::HistoryEntry>| {
            filter.shows(e.slot == ModelSlot::Base, e.mark) && state::prompt_matches(&e.meta.prompt, e.meta.seed, &words)
        };
        self.history.entries().iter().rev().filter(shown).map(|e| e.id.clone()).collect()
    }

    /// The prompt box's text and the variations grid into the settings, so
    /// that a restart (or a crash) loses neither what was typed and not
    /// rendered nor a triage half done.
    fn keep_session(&mut self) {
        if self.settings.prompt.as_deref() != Some(self.prompt.as_str()) {
            self.settings.prompt = Some(self.prompt.clone());
        }
        let finished = self.variations.iter().filter_map(|c| c.id.as_ref());
        if !finished.clone().eq(self.settings.grid.iter()) {
            self.settings.grid = finished.cloned().collect();
        }
        let cursor = self.variations.get(self.var_cursor).and_then(|c| c.id.as_ref());
        if cursor != self.settings.grid_cursor.as_ref() {
            self.settings.grid_cursor = cursor.cloned();
        }
    }

    /// The grid kept by [`Self::keep_session`], its images still in the
    /// history (finished cells, no job).
    fn restore_grid(&mut self) {
        let cells = self.settings.grid.iter().filter_map(|id| self.history.get(id));
        self.variations = cells
            .map(|e| {
                let steps = e.meta.steps as usize;
                VariationCell { job: None, seed: e.meta.seed, id: Some(e.id.clone()), progress: (steps, steps), error: None }
            })
            .collect();
        let cursor = self.settings.grid_cursor.as_ref();
        self.var_cursor = self.variations.iter().position(|c| c.id.as_ref() == cursor).unwrap_or(0);
    }

    pub fn persist_settings(&mut self) {
        self.saved_settings = self.settings.clone();
        self.settings_changed_at = None;
        if let Err(e) = self.settings.save(&self.paths) {
            // Without a data folder this was said at start, and would hide it.
            if !self.no_data_dir {
                self.error(format!("could not save the settings: {}", save::one_line_error(&e)));
            }
        }
    }

    /// A one-line summary of why nothing can be generated, if so.
    pub fn model_problem(&self) -> Option<String> {
        match self.models.get(&ModelSlot::Turbo) {
            None => Some("starting the engine…".into()),
            Some(ModelState::NotConfigured) => Some("no Turbo model configured and the built-in demo model is not installed: open Settings (Ctrl+,) and choose a model folder".into()),
            Some(ModelState::Failed(m)) => Some(format!("Turbo model unusable: {m}")),
            Some(ModelState::Loading { stage }) => Some(format!("loading the Turbo model ({stage})…")),
            Some(ModelState::Ready { .. }) => None,
        }
    }
}

/// Takes keyboard focus away from the prompt (or any text field).
/// The settings window's path fields (Turbo, Base, save folder) as saved.
fn settings_form_of(settings: &Settings) -> [String; 3] {
    [
        settings.turbo_model.clone().unwrap_or_default(),
        settings.base_model.clone().unwrap_or_default(),
        settings.output_dir.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
    ]
}

fn leave_text_field(ctx: &egui::Context) {
    ctx.memory_mut(|m| {
        if let Some(id) = m.focused() {
            m.surrender_focus(id);
        }
    });
}

/// Models for this run: CLI overrides, else saved settings, else the built-in
/// demo models when they are installed.
pub fn effective_models(settings: &Settings, options: &StudioOptions) -> ModelConfig {
    let turbo = options.turbo.clone().or_else(|| settings.turbo_model.clone());
    let base = options.base.clone().or_else(|| settings.base_model.clone());
    // The demo model stands in for a slot left empty only beside the other
    // demo model (or nothing): next to a real Z-Image-Turbo, a miniature
    // trained on coloured shapes would "refine" real images into shapes.
    let demo_or_none = |m: &Option<String>| m.as_deref().is_none_or(|m| zimage_engine::loader::BUILTIN_MODELS.contains(&m));
    let pair = demo_or_none(&turbo) && demo_or_none(&base);
    let fill = |m: Option<String>, demo: &str| {
        m.or_else(|| pair.then(|| demo.to_string()).filter(|d| zimage_engine::loader::resolve_model(d).is_ok()))
    };
    let loras = |list: &[crate::settings::LoraSetting]| {
        list.iter().filter(|l| l.enabled).map(|l| LoraChoice { path: l.path.clone(), strength: l.strength }).collect()
    };
    ModelConfig {
        turbo: fill(turbo, "demo-turbo"),
        base: fill(base, "demo-base"),
        turbo_loras: loras(&settings.turbo_loras),
        base_loras: loras(&settings.base_loras),
        memory_plan: settings.memory_plan,
    }
}

/// rfd returns None both on cancel and when no dialog can be shown; tell the
/// two apart up front (a portal needs a session bus; zenity is the fallback).
/// What the status bar calls a refine or variation job.
fn background_job_name(kind: JobKind) -> &'static str {
    if kind == JobKind::Refine {
        "Base refine"
    } else {
        "variation"
    }
}

pub fn file_dialog_available() -> bool {
    if cfg!(not(target_os = "linux")) {
        return true;
    }
    let bus = std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_some_and(|v| !v.is_empty());
    let zenity =
        std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("zenity").is_file()));
    bus || zenity
}

/// The history panel's list as found: for the history's revision, the filter
/// and the search, the ids shown, newest first.
type ListedHistory = (u64, state::HistoryFilter, String, Arc<Vec<String>>);

impl eframe::App for StudioApp {
    fn logic(&mut self, ctx: &egui::Context, _frame: &mut eframe::Frame) {
        StudioApp::logic(self, ctx);
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        crate::ui::draw(self, ui);
        // An edit made in this frame starts its live job now, not in the next
        // frame's `logic`: on a software renderer the next frame can be a
        // third of a second away (docs/app-latency.md).
        self.schedule_live(ui.ctx());
        self.ask_token_count();
        if let Some((start, cpu0)) = self.frame_start.take() {
            let cpu = cpu0.zip(thread_cpu_time()).map(|(a, b)| b.saturating_sub(a));
            self.metrics.record_frame(start.elapsed(), cpu);
        }
    }

    fn on_exit(&mut self) {
        self.keep_session();
        self.persist_settings();
        let _ = self.history.save();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_models_override_saved_ones_for_this_run_only() {
        let saved = Settings {
            turbo_model: Some("/saved/turbo".into()),
            base_model: Some("/saved/base".into()),
            ..Settings::default()
        };
        let paths = Paths::at("/tmp/unused");
        let cli = StudioOptions { paths: paths.clone(), turbo: Some("/cli/turbo".into()), base: None, device: None, open: Vec::new() };
        let m = effective_models(&saved, &cli);
        assert_eq!(m.turbo.as_deref(), Some("/cli/turbo"));
        assert_eq!(m.base.as_deref(), Some("/saved/base"));
        assert_eq!(saved.turbo_model.as_deref(), Some("/saved/turbo"), "settings untouched");
        let none = StudioOptions { paths, turbo: None, base: None, device: None, open: Vec::new() };
        assert_eq!(effective_models(&saved, &none).turbo.as_deref(), Some("/saved/turbo"));
        // Nothing configured: the built-in demo model if installed, else nothing.
        let demo = effective_models(&Settings::default(), &none).turbo;
        assert_eq!(demo.is_some(), zimage_engine::loader::resolve_model("demo-turbo").is_ok());
    }

    /// An empty slot gets the demo model only beside the other demo model:
    /// next to a real Turbo, Base stays empty (and says so) instead of a
    /// miniature that draws coloured shapes.
    #[test]
    fn the_demo_fills_an_empty_slot_only_beside_the_demo() {
        if zimage_engine::loader::resolve_model("demo-base").is_err() {
            return; // the demo is not installed: nothing to fill with
        }
        let none = StudioOptions { paths: Paths::at("/tmp/unused"), turbo: None, base: None, device: None, open: Vec::new() };
        let with = |turbo: Option<&str>, base: Option<&str>| {
            let s = Settings { turbo_model: turbo.map(Into::into), base_model: base.map(Into::into), ..Settings::default() };
            let m = effective_models(&s, &none);
            (m.turbo, m.base)
        };
        let some = |s: &str| Some(s.to_string());
        assert_eq!(with(Some("/models/Z-Image-Turbo"), None), (some("/models/Z-Image-Turbo"), None));
        assert_eq!(with(None, Some("/models/Z-Image")), (None, some("/models/Z-Image")));
        assert_eq!(with(Some("demo-turbo"), None), (some("demo-turbo"), some("demo-base")));
        assert_eq!(with(None, None), (some("demo-turbo"), some("demo-base")));
    }
}
