//! The application: state, engine events, actions. Drawing lives in `ui/`.

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
    /// Paused at a step boundary for a live image; resumes where it stopped.
    pub paused: bool,
    /// A live job rendered at draft size, to be finished at full size.
    pub draft: bool,
    /// The start image's name, when the job starts from one (for the PNG).
    pub start: Option<String>,
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
    pub job: JobId,
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
}

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

/// Things panels ask for; applied by [`StudioApp::apply`].
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// The prompt or a generation setting changed.
    Edited,
    Generate,
    Refine,
    Variations,
    RefineKept,
    Save,
    SaveAs,
    /// The image in view (selected, the grid's cursor, compare's second) to
    /// the clipboard, and its parameters as A1111 text.
    CopyImage,
    CopyParameters,
    /// The save folder in the system's file manager.
    OpenOutputFolder,
    /// Shows a history image in the Live view with its parameters restored.
    Restore(String),
    Mark(String, Mark),
    ApplyModels {
        turbo: String,
        base: String,
        output: String,
    },
    /// Use this model (a path or built-in name) in `slot`, saved in the settings.
    UseModel {
        slot: ModelSlot,
        model: String,
    },
    /// Look for models on this computer (HF cache, ComfyUI folders).
    ScanModels,
    /// Download `turbo` or `base` from the Hugging Face hub.
    StartDownload(String),
    CancelDownload,
    /// The LoRA lists or the memory plan in the settings changed: apply them (no reload).
    LorasChanged,
    /// The first-run welcome was answered.
    CloseWelcome,
    /// Run the models on another device (`auto`, `cpu`, `cuda`, `wgpu`).
    SetDevice(String),
    ShowView(View),
    CompareWith(String),
    Cancel(JobId),
    /// Stops the running Base refine and drops the queued ones.
    CancelRefines,
    /// Start the Turbo jobs from the selected image.
    StartFromSelected,
    ClearStartImage,
    NewSeed,
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
    pub prompt: String,
    pub view: View,
    pub live_status: LiveStatus,
    /// Set when the prompt/settings changed; a live job starts after the quiet period.
    pub dirty_at: Option<Instant>,
    pub live_job: Option<JobId>,
    pub live_ema: Option<Duration>,
    /// Recent live time per megapixel-step, drafts and upgrades included:
    /// predicts a full-size live image's time (`LiveDraft::Auto`) at any size.
    pub live_rate: Option<f64>,
    pub per_step: HashMap<ModelSlot, Duration>,
    pub jobs: HashMap<JobId, PendingJob>,
    /// Shown in the Live view: the latest finished image (history id).
    pub current: Option<String>,
    /// Selected image (history id): what Save and Refine act on.
    pub selected: Option<String>,
    /// Which entries the history panel lists.
    pub history_filter: state::HistoryFilter,
    /// A prompt and its length in tokens, as the engine counted it.
    pub prompt_tokens: Option<(String, usize)>,
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
    /// Reading the fallback fonts: symbols, CJK for the prompt box (see `fonts`).
    font_task: Option<Task<FoundFonts>>,
    /// PNGs from the command line, restored on the first frame.
    open_files: Vec<PathBuf>,
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
        let device = crate::cli::parse_device(options.device.as_deref().unwrap_or(&settings.device)).unwrap_or(None);
        let engine = EngineHandle::spawn_on(device, waker.clone());
        let (mut history, w2) = History::load(&options.paths);
        let ctx3 = ctx.clone();
        history.set_io(BackgroundIo::spawn(Arc::new(move || ctx3.request_repaint())));
        let (prompt_history, w3) = PromptHistory::load(&prompts::prompts_file(&options.paths.data_dir));
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
            view: View::Live,
            live_status: LiveStatus::Idle,
            dirty_at: None,
            live_job: None,
            live_ema: None,
            live_rate: None,
            per_step: HashMap::new(),
            jobs: HashMap::new(),
            current: None,
            selected: None,
            history_filter: state::HistoryFilter::All,
            prompt_tokens: None,
            live_wait: None,
            live_preview: false,
            live_view: ZoomView::default(),
            refine_job: None,
            compare: CompareState::default(),
            compare_pair: None,
            variations: Vec::new(),
            var_cursor: 0,
            var_columns: 1,
            var_reveal: false,
            message: w1.or(w2).or(w3).map(|text| Message { text, error: true }),
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
            font_task: Some(Task::spawn("zimage-fonts", waker.clone(), crate::fonts::find_and_read)),
            fallback_fonts: Vec::new(),
            device_name: None,
            gpu_kernels_cold: false,
            memory: None,
            open_files: options.open.clone(),
            waker,
            images: Images::default(),
            loading: HashSet::new(),
            metrics: Metrics::default(),
            focus_prompt: true,
            reveal_selected: false,
            prompt_id: None,
            refocus_after_overlay: false,
            frame_start: None,
            saved_settings: settings.clone(),
            settings_changed_at: None,
            metrics_file: std::env::var_os("ZIMAGE_STUDIO_METRICS").map(|p| (PathBuf::from(p), Instant::now())),
            settings,
        };
        // Start where the user left off: the newest history item and its prompt.
        if let Some(last) = app.history.entries.last().map(|e| e.id.clone()) {
            app.restore(&last);
            // Shown and selected: Ctrl+S, Ctrl+C and refine act on it.
            app.selected = Some(last.clone());
            app.current = Some(last);
        }
        app.engine.load_models(model_config);
        app
    }

    /// Runs before drawing each frame: engine events, live scheduling, drops.
    pub fn logic(&mut self, ctx: &egui::Context) {
        self.frame_start = Some((Instant::now(), thread_cpu_time()));
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
                IoResult::Error(e) => self.error(format!("history folder: {e}")),
                IoResult::Done => {}
            }
        }
        self.poll_background(ctx);
        self.schedule_live(ctx);
        self.settle_prompt(ctx);
        self.handle_dropped_files(ctx);
        self.autosave_settings(ctx);
        self.write_metrics();
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
        self.settings_form.iter().zip(&saved).any(|(form, saved)| form.trim() != saved)
    }

    fn use_model(&mut self, slot: ModelSlot, model: String) {
        match slot {
            ModelSlot::Turbo => {
                self.settings.turbo_model = Some(model.clone());
                self.settings_form[0] = model;
            }
            ModelSlot::Base => {
                self.settings.base_model = Some(model.clone());
                self.settings_form[1] = model;
            }
        }
        self.cli_override = false;
        self.reload_models();
    }

    /// Applies the saved model and LoRA settings and persists them.
    fn reload_models(&mut self) {
        self.model_config =
            effective_models(&self.settings, &StudioOptions { paths: self.paths.clone(), turbo: None, base: None, device: None, open: Vec::new() });
        self.engine.load_models(self.model_config.clone());
        self.persist_settings();
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
        let mut live: Vec<u64> = self.history.entries.iter().filter(|e| e.job == JobKind::Live).map(|e| e.elapsed_ms).collect();
        live.sort_unstable();
        let json = serde_json::json!({
            "frame_cpu_ms_max": cpu.last(),
            "first_preview_ms": ms(self.metrics.first_preview),
            "final_image_ms": ms(self.metrics.final_image),
            "frames": frames.len(),
            "frame_ms_p50": pct(0.5),
            "frame_ms_p95": pct(0.95),
            "frame_ms_max": frames.last(),
            "history": self.history.entries.len(),
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

    /// Records the live image's prompt once it has stayed unedited for
    /// `prompts::SETTLE` (the prompts typed through on the way are not kept).
    fn settle_prompt(&mut self, ctx: &egui::Context) {
        let Some((prompt, at)) = &self.live_shown else { return };
        if *prompt != self.prompt {
            self.live_shown = None;
        } else if at.elapsed() >= prompts::SETTLE {
            self.live_shown = None;
            self.record_prompt();
        } else {
            ctx.request_repaint_after(prompts::SETTLE - at.elapsed());
        }
    }

    /// Adds the prompt box's text to the prompt history, written on the disk thread.
    pub fn record_prompt(&mut self) {
        if !self.prompt_history.record(&self.prompt) {
            return;
        }
        let dir = self.paths.data_dir.clone();
        let path = prompts::prompts_file(&dir);
        let bytes = self.prompt_history.to_json();
        let write = move || {
            let written = std::fs::create_dir_all(&dir)
                .map_err(|e| e.to_string())
                .and_then(|()| metadata::write_file_atomic(&path, &bytes).map_err(|e| e.to_string()));
            match written {
                Ok(()) => IoResult::Done,
                Err(e) => IoResult::Error(format!("could not save the prompt history: {e}")),
            }
        };
        match self.history.io() {
            Some(io) => io.run(Box::new(write)),
            None => {
                let _ = write();
            }
        }
    }

    fn schedule_live(&mut self, ctx: &egui::Context) {
        let Some(at) = self.dirty_at else { return };
        if !self.settings.live {
            return;
        }
        let due = at + state::quiet_period(self.live_ema);
        let now = Instant::now();
        if now < due {
            ctx.request_repaint_after(due - now);
            return;
        }
        self.dirty_at = None;
        if self.prompt.trim().is_empty() {
            return;
        }
        self.submit_live(Some(at), true);
    }

    /// Starts a live Turbo job from the controls; at draft size when
    /// `may_draft` (typing, not an explicit Generate) and the settings and
    /// the recent full-size time ask for it.
    fn submit_live(&mut self, edit_at: Option<Instant>, may_draft: bool) {
        let mut request = match self.request_for(ModelSlot::Turbo) {
            Ok(r) => r,
            Err(e) => {
                self.live_status = LiveStatus::Error(e);
                return;
            }
        };
        let draft = may_draft
            .then(|| {
                let full = self.live_rate.map(|r| state::predicted_time(r, request.width, request.height, request.steps));
                state::draft_size(self.settings.live_draft, request.width, request.height, full)
            })
            .flatten();
        if let Some((w, h)) = draft {
            (request.width, request.height) = (w, h);
        }
        self.submit_live_request(request, None, edit_at, draft.is_some());
    }

    /// Finishes the draft `draft_id` at full size: Turbo img2img from it
    /// (upscaled by the engine) at [`state::UPGRADE_STRENGTH`], same seed.
    fn submit_upgrade(&mut self, draft_id: String) {
        let Ok(mut request) = self.request_for(ModelSlot::Turbo) else { return };
        let Some(draft) = self.images.rgb(&draft_id) else { return };
        request.init = Some((*draft).clone());
        request.strength = state::snap_strength(state::UPGRADE_STRENGTH, request.steps).0;
        self.submit_live_request(request, Some(draft_id), None, false);
    }

    /// Every (Turbo, Base) pair in the history, oldest first: a Base refine
    /// and the image it was refined from (both still in the history).
    pub fn refine_pairs(&self) -> Vec<(String, String)> {
        self.history
            .entries
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
        self.compare_pair = Some(pairs[to].clone());
    }

    /// What the running live job is, when it is part of a draft: shown
    /// beside the live status.
    pub fn live_stage(&self) -> Option<String> {
        let job = self.jobs.get(&self.live_job?)?;
        if job.draft {
            Some(format!("{}×{} draft while you type", job.request.width, job.request.height))
        } else if job.request.init.is_some() {
            Some("full size, from the draft".into())
        } else {
            None
        }
    }

    /// Why the live image has not started, when a Base refine or a variation
    /// is running: the engine runs one job at a time. A running job pauses
    /// for a live one at its next step unless that would load models; the
    /// engine then says how long the live image waits ([`Event::LiveWaits`]).
    pub fn live_waiting(&self) -> Option<String> {
        let live_id = self.live_job?;
        let live = self.jobs.get(&live_id)?;
        if live.progress.0 > 0 || matches!(self.live_status, LiveStatus::Rendering { .. }) {
            return None;
        }
        let (running_id, running) = self
            .jobs
            .iter()
            .find(|(_, j)| j.kind != JobKind::Live && !j.paused && j.progress.0 > 0 && j.progress.0 < j.progress.1)?;
        let what = background_job_name(running.kind);
        let (done, total) = running.progress;
        let told = self.live_wait.filter(|w| w.live == live_id && w.behind == *running_id).map(|w| w.until);
        Some(match told {
            None => format!("live waits for this {what} step ({done}/{total})"),
            Some(LiveWait::Swap) => format!(
                "live waits for the {what} ({done}/{total}), or for a swap of the models once that is quicker; Cancel stops it"
            ),
            Some(LiveWait::JobEnd) => format!("live waits for the running {what} ({done}/{total}; Cancel stops it)"),
        })
    }

    /// The refine or variation paused while a live image renders, said in
    /// the status bar so that a stopped progress bar does not look stuck.
    pub fn paused_job(&self) -> Option<String> {
        let job = self.jobs.values().find(|j| j.paused)?;
        let what = background_job_name(job.kind);
        Some(format!("{what} paused at {}/{} for the live image; it goes on next", job.progress.0, job.progress.1))
    }

    /// Whether `id` is a live draft whose full-size image is being rendered.
    pub fn upgrading(&self, id: &str) -> bool {
        self.live_job
            .and_then(|j| self.jobs.get(&j))
            .is_some_and(|job| job.request.init.is_some() && job.parent.as_deref() == Some(id))
    }

    fn submit_live_request(
        &mut self,
        request: GenerateRequest,
        parent: Option<String>,
        edit_at: Option<Instant>,
        draft: bool,
    ) {
        // An upgrade starts from its draft (the parent), others from the start image if any.
        let start = request.init.as_ref().filter(|_| parent.is_none()).and(self.start_image.as_ref()).map(|s| s.name.clone());
        let id = self.engine.submit(JobSpec { kind: JobKind::Live, slot: ModelSlot::Turbo, request: request.clone() });
        self.jobs.insert(
            id,
            PendingJob {
                kind: JobKind::Live,
                slot: ModelSlot::Turbo,
                request,
                parent,
                edit_at,
                progress: (0, 0),
                saw_preview: false,
                paused: false,
                draft,
                start,
            },
        );
        self.live_job = Some(id);
    }

    /// The request for `slot` from the prompt box and the controls.
    pub fn request_for(&self, slot: ModelSlot) -> Result<GenerateRequest, String> {
        if let Some(problem) = state::size_problem(self.settings.width, self.settings.height) {
            return Err(problem);
        }
        let s = &self.settings;
        let mut r = GenerateRequest::new(self.prompt.clone(), slot.kind());
        r.seed = s.seed;
        r.width = s.width;
        r.height = s.height;
        match slot {
            ModelSlot::Turbo => {
                r.steps = s.turbo_steps;
                r.guidance = s.turbo_guidance;
                r.variety = s.turbo_variety;
                if let Some(start) = &self.start_image {
                    r.init = Some((*start.image).clone());
                    r.strength = state::snap_strength(s.start_strength, r.steps).0;
                }
            }
            ModelSlot::Base => {
                r.steps = s.base_steps;
                r.guidance = s.base_guidance;
                r.negative_prompt = s.negative_prompt.clone();
            }
        }
        Ok(r)
    }

    fn on_event(&mut self, ctx: &egui::Context, ev: Event) {
        match ev {
            Event::Started { id } => {
                if let Some(job) = self.jobs.get_mut(&id) {
                    job.paused = false;
                    if job.kind == JobKind::Live && self.live_job == Some(id) {
                        self.live_status = LiveStatus::Rendering { done: 0, total: job.request.steps };
                    }
                }
            }
            Event::PromptTokens { id, tokens } => {
                if let Some(prompt) = self.jobs.get(&id).and_then(|j| j.request.prompts.first()) {
                    self.prompt_tokens = Some((prompt.clone(), tokens));
                }
            }
            Event::LiveWaits { id, behind, until } => self.live_wait = Some(LiveWaitState { live: id, behind, until }),
            Event::Paused { id } => {
                if let Some(job) = self.jobs.get_mut(&id) {
                    job.paused = true;
                }
            }
            Event::Progress { id, done, total, preview } => self.on_progress(ctx, id, done, total, preview),
            Event::Finished { id, image, elapsed, per_step, model, shift, loras, .. } => {
                self.on_finished(ctx, id, image, elapsed, per_step, (model, shift, loras))
            }
            Event::Cancelled { id, superseded } => {
                self.metrics.superseded += superseded as u64;
                if let Some(job) = self.jobs.remove(&id) {
                    if job.kind == JobKind::Variation {
                        self.variations.retain(|c| c.job != id);
                    }
                }
                if self.refine_job == Some(id) {
                    self.refine_job = None;
                }
                // Stopped by the user (a superseded job's successor is already live_job).
                if self.live_job == Some(id) {
                    self.live_job = None;
                    self.live_preview = false;
                    self.live_status = if self.current.is_some() { LiveStatus::Stale } else { LiveStatus::Idle };
                }
            }
            Event::Failed { id, message } => {
                let job = self.jobs.remove(&id);
                if self.live_job == Some(id) {
                    self.live_status = LiveStatus::Error(message.clone());
                    self.live_job = None;
                    self.live_preview = false;
                }
                if self.refine_job == Some(id) {
                    self.refine_job = None;
                }
                if let Some(cell) = self.variations.iter_mut().find(|c| c.job == id) {
                    cell.error = Some(message.clone());
                }
                let what = job.map(|j| format!("{:?} job", j.kind).to_lowercase()).unwrap_or_else(|| "job".into());
                self.error(format!("{what} failed: {message}"));
            }
            Event::Model { slot, state } => {
                if let ModelState::Ready { default_steps, .. } = &state {
                    if !self.settings.steps_chosen {
                        match slot {
                            ModelSlot::Turbo => self.settings.turbo_steps = *default_steps,
                            ModelSlot::Base => self.settings.base_steps = *default_steps,
                        }
                    }
                }
                if let (ModelSlot::Turbo, ModelState::Ready { default_size, .. }) = (slot, &state) {
                    if !self.settings.size_chosen {
                        if let Some((w, h)) = self.settings.aspect.size(*default_size) {
                            (self.settings.width, self.settings.height) = (w, h);
                        }
                    }
                }
                self.models.insert(slot, state);
            }
            Event::Loras { slot, state } => {
                if let Some(e) = &state.error {
                    self.error(format!("{} LoRAs: {e}", slot.label()));
                } else if let Some(w) = state.warnings.first() {
                    self.info(w.clone());
                }
                self.lora_state.insert(slot, state);
            }
            Event::Memory(report) => self.memory = Some(report),
            Event::Device { name, problem } => {
                if let Some(p) = problem {
                    self.error(p);
                }
                self.gpu_kernels_cold = name != "CPU";
                self.device_name = Some(name);
            }
            Event::EngineRestarted { reason } => {
                self.error(format!("the engine crashed ({reason}) and was restarted; your history is safe"));
            }
        }
    }

    fn on_progress(&mut self, ctx: &egui::Context, id: JobId, done: usize, total: usize, preview: Option<RgbImage>) {
        let Some(job) = self.jobs.get_mut(&id) else { return };
        job.progress = (done, total);
        let first = !job.saw_preview && preview.is_some();
        job.saw_preview |= preview.is_some();
        let (kind, edit_at) = (job.kind, job.edit_at);
        let key = match kind {
            JobKind::Live if self.live_job == Some(id) => {
                self.live_status = LiveStatus::Rendering { done, total };
                self.live_preview = true;
                if first {
                    if let Some(at) = edit_at {
                        self.metrics.first_preview = Some(at.elapsed());
                    }
                }
                Some("live".to_string())
            }
            JobKind::Live => None,
            JobKind::Refine => Some("refine".to_string()),
            JobKind::Variation => {
                if let Some(cell) = self.variations.iter_mut().find(|c| c.job == id) {
                    cell.progress = (done, total);
                }
                Some(format!("var:{id}"))
            }
        };
        if let (Some(key), Some(p)) = (key, preview) {
            self.images.put(ctx, &key, Arc::new(p));
        }
    }

    /// `made_by`: the model name, its scheduler shift and the LoRAs applied.
    fn on_finished(
        &mut self,
        ctx: &egui::Context,
        id: JobId,
        image: RgbImage,
        elapsed: Duration,
        per_step: Duration,
        made_by: (String, f32, Vec<LoraRef>),
    ) {
        let Some(job) = self.jobs.remove(&id) else { return };
        self.gpu_kernels_cold = false;
        let prev = self.per_step.get(&job.slot).copied();
        self.per_step.insert(job.slot, state::ema(prev, per_step));
        let meta = self.metadata_for(&job, made_by);
        let image = Arc::new(image);
        let (hid, written) =
            self.history.add(job.slot, job.kind, meta, job.parent.clone(), elapsed.as_millis() as u64, image.clone());
        if let Err(e) = written {
            self.error(format!("could not store the image in the history folder: {}", save::one_line_error(&e)));
        }
        self.images.put(ctx, &hid, image);
        match job.kind {
            JobKind::Live => {
                self.live_ema = Some(state::ema(self.live_ema, elapsed));
                let r = &job.request;
                let steps_run = state::steps_left(r, 0);
                let rate = state::live_rate(elapsed, r.width, r.height, steps_run);
                self.live_rate = Some(self.live_rate.map_or(rate, |prev| 0.7 * prev + 0.3 * rate));
                let mut upgrade = false;
                if self.live_job == Some(id) {
                    self.live_job = None;
                    self.live_preview = false;
                    if self.dirty_at.is_none() {
                        self.live_status = LiveStatus::Done { elapsed };
                    }
                    if let Some(at) = job.edit_at {
                        self.metrics.final_image = Some(at.elapsed());
                    }
                    self.live_shown = job.request.prompts.first().map(|p| (p.clone(), Instant::now()));
                    // Typing stopped on a draft: finish it at full size.
                    upgrade = job.draft && self.dirty_at.is_none();
                }
                self.current = Some(hid.clone());
                self.selected = Some(hid.clone());
                if upgrade {
                    self.submit_upgrade(hid);
                }
            }
            JobKind::Refine => {
                if self.refine_job == Some(id) {
                    self.refine_job = None;
                }
                // The refined image opens beside its Turbo parent.
                if let Some(parent) = job.parent {
                    self.compare_pair = Some((parent, hid.clone()));
                    self.view = View::Compare;
                }
                self.selected = Some(hid);
                self.info(format!("Base refine done in {}", state::human_duration(elapsed)));
            }
            JobKind::Variation => {
                if let Some(cell) = self.variations.iter_mut().find(|c| c.job == id) {
                    cell.id = Some(hid);
                }
                self.images.remove(&format!("var:{id}"));
            }
        }
    }

    fn metadata_for(&self, job: &PendingJob, (model, shift, loras): (String, f32, Vec<LoraRef>)) -> GenerationMetadata {
        let r = &job.request;
        let cfg = r.guidance > 0.0;
        GenerationMetadata {
            prompt: r.prompts.first().cloned().unwrap_or_default(),
            negative_prompt: if cfg { r.negative_prompt.clone() } else { String::new() },
            seed: r.seed,
            steps: r.steps as u32,
            guidance: r.guidance,
            cfg_normalization: r.cfg_normalization,
            cfg_truncation: r.cfg_truncation,
            width: r.width,
            height: r.height,
            model,
            model_kind: job.slot.kind().name().to_string(),
            scheduler_shift: shift,
            init_image: job
                .parent
                .as_ref()
                .filter(|_| r.init.is_some())
                .and_then(|p| self.history.get(p))
                .map(|e| e.file.clone())
                .or_else(|| job.start.clone()),
            strength: r.init.as_ref().map(|_| r.strength),
            parent: job.parent.clone(),
            app: APP_NAME.into(),
            created: metadata::utc_timestamp_now(),
            loras,
            variety: r.variety,
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
        if self.images.contains(&key) || self.loading.contains(&key) {
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
        } else if let Ok(img) = self.history.load_image(&entry) {
            let img = shrink(&img).unwrap_or(img);
            self.images.put(ctx, &key, Arc::new(img));
        }
    }

    pub fn info(&mut self, text: impl Into<String>) {
        self.message = Some(Message { text: text.into(), error: false });
    }

    pub fn error(&mut self, text: impl Into<String>) {
        self.message = Some(Message { text: text.into(), error: true });
    }

    /// The image Refine starts from: the Turbo image in view (the grid's
    /// cursor cell, the compared pair's, the Live view's), else the newest.
    pub fn refine_source(&self) -> Option<String> {
        // A Base image stands for the Turbo image it was refined from, so
        // refining the pair in view again (another strength, say) starts
        // from the same Turbo image, not from the newest one.
        let turbo_of = |id: String| {
            let e = self.history.get(&id)?;
            match e.slot {
                ModelSlot::Turbo => Some(id),
                ModelSlot::Base => e.parent.clone().filter(|p| self.history.get(p).is_some_and(|p| p.slot == ModelSlot::Turbo)),
            }
        };
        self.image_in_view()
            .and_then(turbo_of)
            .or_else(|| self.history.entries.iter().rev().find(|e| e.slot == ModelSlot::Turbo).map(|e| e.id.clone()))
    }

    /// Base steps the refine will run and what it will cost.
    /// The time the pending refines still need, from the measured time per
    /// Base step; `None` before the first Base image.
    pub fn refines_left(&self) -> Option<Duration> {
        let per_step = *self.per_step.get(&ModelSlot::Base)?;
        let steps: usize = self
            .jobs
            .values()
            .filter(|j| j.kind == JobKind::Refine)
            .map(|j| state::steps_left(&j.request, j.progress.0))
            .sum();
        Some(per_step * steps as u32)
    }

    pub fn refine_cost(&self) -> (usize, String) {
        let steps = self.settings.base_steps;
        let run = match self.settings.refine_mode {
            RefineMode::Img2Img => state::snap_strength(self.settings.refine_strength, steps).1,
            RefineMode::SameSeed => steps,
        };
        let cfg_factor = if self.settings.base_guidance > 0.0 { 2 } else { 1 };
        // Before the first Base run, estimate from Turbo (same DiT; CFG doubles the work).
        let per_step = self
            .per_step
            .get(&ModelSlot::Base)
            .copied()
            .or_else(|| self.per_step.get(&ModelSlot::Turbo).map(|d| *d * cfg_factor));
        let load = match &self.memory {
            Some(m) if m.dit_parked(ModelSlot::Base) => state::BaseLoad::Parked(
                m.reload_times.iter().find(|(s, _)| *s == ModelSlot::Base).map(|(_, d)| *d),
            ),
            _ => state::BaseLoad::Resident,
        };
        (run, state::refine_estimate(run, per_step, load))
    }

    pub fn apply(&mut self, ctx: &egui::Context, action: Action) {
        match action {
            Action::Edited => {
                self.dirty_at = Some(Instant::now());
                if self.current.is_some() || self.live_job.is_some() {
                    self.live_status = LiveStatus::Stale;
                }
            }
            Action::Generate => {
                self.record_prompt();
                self.settings.seed = self.settings.seed_mode.next(self.settings.seed);
                self.dirty_at = None;
                if self.prompt.trim().is_empty() {
                    self.error("type a prompt first");
                } else {
                    self.submit_live(Some(Instant::now()), false);
                }
            }
            Action::NewSeed => {
                self.settings.seed = zimage_engine::rng::random_seed();
                self.apply(ctx, Action::Edited);
            }
            Action::Refine => {
                self.record_prompt();
                // Refining ends typing: frees the single-letter keys (c, m, k…) for the views.
                leave_text_field(ctx);
                self.refine_selected();
            }
            Action::RefineKept => {
                // The grid's kept cells, else the kept Turbo images of the history.
                let mut kept = self.kept_variations();
                if kept.is_empty() {
                    kept = self.kept_unrefined();
                }
                if kept.is_empty() {
                    self.error("nothing kept to refine: K keeps a variation or the image shown, S stars it");
                }
                let n = kept.len();
                for id in kept {
                    if let Err(e) = self.queue_refine(&id) {
                        self.error(e);
                        return;
                    }
                }
                if n > 0 {
                    self.info(format!("queued {n} Base refine{}", if n == 1 { "" } else { "s" }));
                }
            }
            Action::Variations => {
                self.record_prompt();
                leave_text_field(ctx);
                self.start_variations();
            }
            Action::Save => {
                self.record_prompt();
                self.save_selected();
            }
            Action::SaveAs => {
                self.record_prompt();
                self.save_as();
            }
            Action::CopyImage => self.copy_image(ctx),
            Action::CopyParameters => self.copy_parameters(ctx),
            Action::OpenOutputFolder => {
                let dir = self.output_dir();
                if let Err(e) = save::open_folder(&dir) {
                    self.error(format!("cannot open the save folder: {}", save::one_line_error(&e)));
                }
            }
            Action::Restore(id) => {
                self.restore(&id);
                if let Some(e) = self.history.get(&id) {
                    // The image shown is exactly what these parameters make.
                    self.live_status = LiveStatus::Done { elapsed: Duration::from_millis(e.elapsed_ms) };
                }
                self.selected = Some(id.clone());
                self.current = Some(id);
                self.view = View::Live;
            }
            Action::Mark(id, mark) => {
                if let Some(e) = self.history.get_mut(&id) {
                    e.mark = if e.mark == mark { Mark::None } else { mark };
                }
                if let Err(e) = self.history.save() {
                    self.error(format!("could not save the history: {}", save::one_line_error(&e)));
                }
            }
            Action::ApplyModels { turbo, base, output } => {
                let opt = |s: String| Some(s.trim().to_string()).filter(|s| !s.is_empty());
                self.settings.turbo_model = opt(turbo);
                self.settings.base_model = opt(base);
                self.settings.output_dir = opt(output).map(PathBuf::from);
                self.cli_override = false;
                self.reload_models();
                // No "loading" note here: the top bar's model chips show each
                // load's stage live, and a note would outlast the load.
                self.info("settings saved");
            }
            Action::UseModel { slot, model } => self.use_model(slot, model),
            Action::ScanModels => {
                if self.scan.is_none() {
                    let extra: Vec<PathBuf> = [&self.settings.turbo_model, &self.settings.base_model]
                        .into_iter()
                        .flatten()
                        .filter(|m| !m.starts_with("demo-"))
                        .map(PathBuf::from)
                        .collect();
                    self.scan = Some(Task::spawn("zimage-scan", self.waker.clone(), move || {
                        zimage_engine::discovery::discover(&extra)
                    }));
                }
            }
            Action::StartDownload(model) => {
                if self.download.is_some() {
                    self.error("a download is already running");
                } else {
                    let options = match self.pull_options.clone().map(Ok).unwrap_or_else(PullOptions::from_env) {
                        Ok(o) => o,
                        Err(e) => return self.error(format!("cannot download: {e}")),
                    };
                    match Download::start(&model, options, self.waker.clone()) {
                        Ok(d) => {
                            self.download = Some(d);
                            self.download_note = None;
                        }
                        Err(e) => self.error(e),
                    }
                }
            }
            Action::CancelDownload => {
                if let Some(d) = &self.download {
                    d.cancel();
                }
            }
            Action::LorasChanged => {
                // Same models (the command line's, if it named them), new LoRAs / memory plan.
                let saved = effective_models(
                    &self.settings,
                    &StudioOptions { paths: self.paths.clone(), turbo: None, base: None, device: None, open: Vec::new() },
                );
                self.model_config.turbo_loras = saved.turbo_loras;
                self.model_config.base_loras = saved.base_loras;
                self.model_config.memory_plan = saved.memory_plan;
                self.engine.load_models(self.model_config.clone());
                self.persist_settings();
            }
            Action::SetDevice(device) => match crate::cli::parse_device(&device) {
                Ok(kind) => {
                    self.settings.device = device;
                    self.device_name = None;
                    self.engine.set_device(kind);
                    self.persist_settings();
                    self.info("moving the models to the new device…");
                }
                Err(e) => self.error(e),
            },
            Action::CloseWelcome => {
                self.show_welcome = false;
                self.settings.welcome_done = true;
                self.persist_settings();
                self.focus_prompt = true;
            }
            Action::ShowView(v) => {
                if v == View::Compare && self.compare_pair.is_none() {
                    // After a restart: the latest refine in the history.
                    self.compare_pair = self.refine_pairs().pop();
                }
                self.view = v;
            }
            Action::CompareWith(id) => {
                if let Some(e) = self.history.get(&id) {
                    if let Some(parent) = e.parent.clone() {
                        self.compare_pair = Some((parent, id));
                        self.view = View::Compare;
                    }
                }
            }
            Action::Cancel(id) => self.engine.cancel(id),
            Action::StartFromSelected => match self.selected.clone() {
                Some(id) => match self.image_of(&id) {
                    Ok(img) => self.set_start_image(format!("#{id}"), img),
                    Err(e) => self.error(format!("cannot start from #{id}: {}", save::one_line_error(&e))),
                },
                None => self.error("no image selected to start from"),
            },
            Action::ClearStartImage => {
                if self.start_image.take().is_some() {
                    self.info("Turbo starts from noise again");
                    self.apply(ctx, Action::Edited);
                }
            }
            Action::CancelRefines => {
                let refines: Vec<JobId> =
                    self.jobs.iter().filter(|(_, j)| j.kind == JobKind::Refine).map(|(id, _)| *id).collect();
                for id in &refines {
                    self.engine.cancel(*id);
                }
                if !refines.is_empty() {
                    let n = refines.len();
                    self.info(format!("cancelled {n} Base refine{}", if n == 1 { "" } else { "s" }));
                }
            }
        }
    }

    fn refine_selected(&mut self) {
        match self.refine_source() {
            Some(src) => {
                if let Err(e) = self.queue_refine(&src) {
                    self.error(e);
                }
            }
            None => self.error("nothing to refine yet: type a prompt to make a Turbo image first"),
        }
    }

    fn queue_refine(&mut self, src: &str) -> Result<(), String> {
        if self.upgrading(src) {
            return Err("this is the draft; its full-size image is rendering: refine that one when it is done".into());
        }
        let entry = self.history.get(src).ok_or("that image is no longer in the history")?.clone();
        let m = &entry.meta;
        let mut r = GenerateRequest::new(m.prompt.clone(), ModelKind::Base);
        r.seed = m.seed;
        r.width = m.width;
        r.height = m.height;
        r.steps = self.settings.base_steps;
        r.guidance = self.settings.base_guidance;
        r.negative_prompt = self.settings.negative_prompt.clone();
        if self.settings.refine_mode == RefineMode::Img2Img {
            let img = match self.images.rgb(src) {
                Some(i) => i,
                None => Arc::new(self.history.load_image(&entry).map_err(|e| save::one_line_error(&e))?),
            };
            r.init = Some((*img).clone());
            r.strength = state::snap_strength(self.settings.refine_strength, r.steps).0;
        } else {
            // Same seed, same conditioning: the Turbo image's variety too.
            r.variety = m.variety;
        }
        let id = self.engine.submit(JobSpec { kind: JobKind::Refine, slot: ModelSlot::Base, request: r.clone() });
        self.jobs.insert(
            id,
            PendingJob {
                kind: JobKind::Refine,
                slot: ModelSlot::Base,
                request: r,
                parent: Some(src.to_string()),
                edit_at: None,
                progress: (0, 0),
                saw_preview: false,
                paused: false,
                draft: false,
                start: None,
            },
        );
        self.refine_job = Some(id);
        Ok(())
    }

    fn start_variations(&mut self) {
        if self.prompt.trim().is_empty() {
            self.error("type a prompt first");
            return;
        }
        let base = match self.request_for(ModelSlot::Turbo) {
            Ok(r) => r,
            Err(e) => return self.error(e),
        };
        for cell in std::mem::take(&mut self.variations) {
            if cell.id.is_none() {
                self.engine.cancel(cell.job);
            }
        }
        let n = self.settings.variations.clamp(1, 64);
        for i in 0..n {
            let mut r = base.clone();
            r.seed = base.seed.wrapping_add(i as u64);
            let job =
                self.engine.submit(JobSpec { kind: JobKind::Variation, slot: ModelSlot::Turbo, request: r.clone() });
            self.jobs.insert(
                job,
                PendingJob {
                    kind: JobKind::Variation,
                    slot: ModelSlot::Turbo,
                    request: r.clone(),
                    parent: None,
                    edit_at: None,
                    progress: (0, 0),
                    saw_preview: false,
                    paused: false,
                    draft: false,
                    start: r.init.as_ref().and(self.start_image.as_ref()).map(|st| st.name.clone()),
                },
            );
            self.variations.push(VariationCell { job, seed: r.seed, id: None, progress: (0, r.steps), error: None });
        }
        self.var_cursor = 0;
        self.view = View::Variations;
    }

    /// Puts an image's parameters back into the controls.
    pub fn restore(&mut self, id: &str) {
        let Some(e) = self.history.get(id) else { return };
        let meta = e.meta.clone();
        let slot = e.slot;
        self.restore_meta(&meta, Some(slot));
    }

    pub fn restore_meta(&mut self, m: &GenerationMetadata, slot: Option<ModelSlot>) {
        self.prompt = m.prompt.clone();
        let s = &mut self.settings;
        s.seed = m.seed;
        if state::size_problem(m.width, m.height).is_none() {
            s.width = m.width;
            s.height = m.height;
            s.aspect = state::AspectPreset::of(m.width, m.height);
            s.size_chosen = true;
        }
        let slot = slot.unwrap_or(if m.model_kind == "base" { ModelSlot::Base } else { ModelSlot::Turbo });
        if m.steps > 0 {
            s.steps_chosen = true;
            match slot {
                ModelSlot::Turbo => {
                    s.turbo_steps = m.steps as usize;
                    s.turbo_guidance = m.guidance;
                    s.turbo_variety = m.variety;
                }
                ModelSlot::Base => {
                    s.base_steps = m.steps as usize;
                    s.base_guidance = m.guidance;
                    s.negative_prompt = m.negative_prompt.clone();
                    if let Some(st) = m.strength {
                        s.refine_strength = st;
                    }
                }
            }
        }
        self.live_status = if self.current.is_some() { LiveStatus::Stale } else { LiveStatus::Idle };
        let active = &self.lora_state.get(&slot).map(|s| s.applied.clone()).unwrap_or_default();
        let missing: Vec<String> = m
            .loras
            .iter()
            .filter(|l| !active.iter().any(|a| a.name == l.name))
            .map(|l| format!("{} ({})", l.name, l.strength))
            .collect();
        if !missing.is_empty() {
            self.info(format!(
                "this image was made with LoRAs {} that are not applied now (Settings > LoRAs)",
                missing.join(", ")
            ));
        }
    }

    fn handle_dropped_files(&mut self, ctx: &egui::Context) {
        let dropped = ctx.input(|i| i.raw.dropped_files.clone());
        for f in dropped {
            let path = f.path().to_path_buf();
            let name =
                path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "dropped file".into());
            let bytes = if path.as_os_str().is_empty() {
                f.bytes().map_err(|e| e.to_string())
            } else {
                std::fs::read(&path).map_err(|e| e.to_string())
            };
            self.restore_png(ctx, &name, bytes);
        }
        // PNGs given on the command line (the desktop file's "Open with").
        for path in std::mem::take(&mut self.open_files) {
            let name = path.display().to_string();
            self.restore_png(ctx, &name, std::fs::read(&path).map_err(|e| e.to_string()));
        }
    }

    /// Restores the parameters stored in a PNG, or in the XMP of a JPEG an
    /// editor exported from one (dropped or opened).
    /// An image without generation metadata (a sketch, a photo) becomes the
    /// start image instead.
    fn restore_png(&mut self, ctx: &egui::Context, name: &str, bytes: Result<Vec<u8>, String>) {
        let bytes = match bytes {
            Ok(b) => b,
            Err(e) => return self.error(format!("{name}: {e}")),
        };
        match metadata::read_image_metadata(&bytes) {
            Ok(meta) => {
                self.restore_meta(&meta, None);
                self.info(format!("restored the parameters of {name}"));
                self.apply(ctx, Action::Edited);
            }
            Err(e) => match image::load_from_memory(&bytes) {
                Ok(img) => {
                    // A photo may be far larger than any image we generate: keep
                    // a copy no larger than the largest side, not every job a
                    // full-size copy of it.
                    let max = zimage_engine::pipeline::MAX_SIDE;
                    let img = if img.width().max(img.height()) > max {
                        img.resize(max, max, image::imageops::FilterType::Triangle)
                    } else {
                        img
                    };
                    let rgb = img.to_rgb8();
                    let (width, height) = rgb.dimensions();
                    // The file's name, not the whole path a command line gives.
                    let short = std::path::Path::new(name).file_name().map(|n| n.to_string_lossy().into_owned());
                    let image = Arc::new(RgbImage { width, height, pixels: rgb.into_raw() });
                    self.set_start_image(short.unwrap_or_else(|| name.to_string()), image);
                    self.apply(ctx, Action::Edited);
                }
                Err(decode) => match e {
                    // A readable file without metadata that is no usable picture either.
                    metadata::MetadataError::NoMetadata | metadata::MetadataError::NoJpegMetadata => {
                        self.error(format!("{name}: cannot start from it: {}", decode.to_string().replace('\n', " ")))
                    }
                    e => self.error(format!("{name}: {e}")),
                },
            },
        }
    }

    /// Makes `image` the start of the Turbo jobs, with the size set to its
    /// aspect (the current long side, multiples of 16).
    pub fn set_start_image(&mut self, name: String, image: Arc<RgbImage>) {
        let long = self.settings.width.max(self.settings.height);
        if let Some((w, h)) = state::fit_aspect(image.width, image.height, long) {
            (self.settings.width, self.settings.height) = (w, h);
            self.settings.aspect = state::AspectPreset::of(w, h);
            self.settings.size_chosen = true;
        }
        let strength = state::snap_strength(self.settings.start_strength, self.settings.turbo_steps).0;
        self.info(format!("Turbo starts from {name} (img2img at strength {strength:.2}; Remove in the controls undoes it)"));
        self.start_image = Some(StartImage { name, image });
    }

    /// History ids of the variations marked kept or starred, in grid order.
    fn kept_variations(&self) -> Vec<String> {
        self.variations
            .iter()
            .filter_map(|c| c.id.clone())
            .filter(|id| self.history.get(id).is_some_and(|e| e.mark.is_kept()))
            .collect()
    }

    /// Turbo images of the history marked kept or starred that have no Base
    /// refine yet, oldest first: what "Refine kept" refines without a grid.
    pub fn kept_unrefined(&self) -> Vec<String> {
        let refined: HashSet<&str> = self.history.entries.iter().filter_map(|e| e.parent.as_deref()).collect();
        self.history
            .entries
            .iter()
            .filter(|e| e.slot == ModelSlot::Turbo && e.mark.is_kept() && !refined.contains(e.id.as_str()))
            .map(|e| e.id.clone())
            .collect()
    }

    /// The history entries the history panel lists, newest first (its filter applied).
    pub fn listed_history(&self) -> Vec<String> {
        let filter = self.history_filter;
        let shown = |e: &&crate::history::HistoryEntry| filter.shows(e.slot == ModelSlot::Base, e.mark);
        self.history.entries.iter().rev().filter(shown).map(|e| e.id.clone()).collect()
    }

    /// The one image in view: the grid's cursor cell, the compared pair's
    /// second image (Base unless swapped), the Live view's image, else the
    /// selected one. Save, copy and refine act on it: what you see.
    pub fn image_in_view(&self) -> Option<String> {
        let in_view = match self.view {
            View::Compare => {
                self.compare_pair.as_ref().map(|(a, b)| if self.compare.swapped { a.clone() } else { b.clone() })
            }
            View::Variations => self.variations.get(self.var_cursor).and_then(|c| c.id.clone()),
            // The selection moves on to a refine's result, while the Live
            // view goes on showing its own image.
            View::Live => self.current.clone(),
        };
        in_view.or_else(|| self.selected.clone())
    }

    fn copy_image(&mut self, ctx: &egui::Context) {
        let Some(id) = self.image_in_view() else { return self.error("nothing to copy yet") };
        match self.image_of(&id) {
            Ok(img) => {
                let size = [img.width as usize, img.height as usize];
                ctx.copy_image(egui::ColorImage::from_rgb(size, &img.pixels));
                self.info(format!("copied #{id} ({}×{}) to the clipboard", img.width, img.height));
            }
            Err(e) => self.error(format!("cannot copy #{id}: {}", save::one_line_error(&e))),
        }
    }

    fn copy_parameters(&mut self, ctx: &egui::Context) {
        let Some(e) = self.image_in_view().and_then(|id| self.history.get(&id).cloned()) else {
            return self.error("nothing to copy yet");
        };
        ctx.copy_text(zimage_engine::metadata::a1111_parameters(&e.meta));
        self.info(format!("copied the parameters of #{} to the clipboard (A1111 text, as in the PNG)", e.id));
    }

    /// What Ctrl+S saves: all kept variations when the grid is shown and has
    /// any, every Base image of "All pairs", else the image in view.
    pub fn save_targets(&self) -> Vec<String> {
        if self.view == View::Variations {
            let kept = self.kept_variations();
            if !kept.is_empty() {
                return kept;
            }
        }
        if self.view == View::Compare && self.compare.mode == state::CompareMode::AllPairs {
            // The second image of every pair shown (Base, unless swapped).
            let (pairs, ..) = self.shown_pairs();
            return pairs.into_iter().map(|(t, b)| if self.compare.swapped { t } else { b }).collect();
        }
        self.image_in_view().into_iter().collect()
    }

    fn image_of(&self, id: &str) -> anyhow::Result<Arc<RgbImage>> {
        if let Some(i) = self.images.rgb(id) {
            return Ok(i);
        }
        let e = self.history.get(id).ok_or_else(|| anyhow::anyhow!("image {id} is not in the history"))?;
        Ok(Arc::new(self.history.load_image(e)?))
    }

    pub fn output_dir(&self) -> PathBuf {
        default_output_dir(&self.settings, &self.paths)
    }

    fn save_selected(&mut self) {
        let targets = self.save_targets();
        if targets.is_empty() {
            return self.error("nothing to save yet");
        }
        let dir = self.output_dir();
        let mut saved = Vec::new();
        for id in &targets {
            let result = self.image_of(id).and_then(|img| {
                let meta = self.history.get(id).map(|e| e.meta.clone()).unwrap_or_default();
                save::save_into(&dir, &img, &meta)
            });
            match result {
                Ok(p) => saved.push(p),
                Err(e) => return self.error(format!("save failed: {}", save::one_line_error(&e))),
            }
        }
        match saved.as_slice() {
            [one] => self.info(format!("saved {}", one.display())),
            many => self.info(format!("saved {} images to {}", many.len(), dir.display())),
        }
    }

    fn save_as(&mut self) {
        let Some(id) = self.save_targets().into_iter().next() else {
            return self.error("nothing to save yet");
        };
        if !file_dialog_available() {
            return self.error(format!(
                "no file dialog on this system (needs xdg-desktop-portal or zenity); Ctrl+S saves to {} instead",
                self.output_dir().display()
            ));
        }
        let meta = self.history.get(&id).map(|e| e.meta.clone()).unwrap_or_default();
        let suggested = save::unique_name(&self.output_dir(), &meta.model_kind, meta.seed, &meta.prompt);
        let name = suggested.file_name().map_or_else(|| "zimage.png".into(), |n| n.to_string_lossy().into_owned());
        let picked = rfd::FileDialog::new()
            .set_title("Save image as")
            .add_filter("PNG image", &["png"])
            .set_directory(self.output_dir())
            .set_file_name(name)
            .save_file();
        let Some(mut path) = picked else {
            return self.info("save cancelled (or the file dialog could not open)");
        };
        if path.extension().is_none() {
            path.set_extension("png");
        }
        match self.image_of(&id).and_then(|img| save::save_to(&path, &img, &meta)) {
            Ok(()) => self.info(format!("saved {}", path.display())),
            Err(e) => self.error(format!("save failed: {}", save::one_line_error(&e))),
        }
    }

    pub fn persist_settings(&mut self) {
        self.saved_settings = self.settings.clone();
        self.settings_changed_at = None;
        if let Err(e) = self.settings.save(&self.paths) {
            self.error(format!("could not save the settings: {}", save::one_line_error(&e)));
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
    let pick = |cli: &Option<String>, saved: &Option<String>, demo: &str| {
        cli.clone()
            .or_else(|| saved.clone())
            .or_else(|| zimage_engine::loader::resolve_model(demo).ok().map(|_| demo.to_string()))
    };
    let loras = |list: &[crate::settings::LoraSetting]| {
        list.iter().filter(|l| l.enabled).map(|l| LoraChoice { path: l.path.clone(), strength: l.strength }).collect()
    };
    ModelConfig {
        turbo: pick(&options.turbo, &settings.turbo_model, "demo-turbo"),
        base: pick(&options.base, &settings.base_model, "demo-base"),
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
        if let Some((start, cpu0)) = self.frame_start.take() {
            let cpu = cpu0.zip(thread_cpu_time()).map(|(a, b)| b.saturating_sub(a));
            self.metrics.record_frame(start.elapsed(), cpu);
        }
    }

    fn on_exit(&mut self) {
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
}
