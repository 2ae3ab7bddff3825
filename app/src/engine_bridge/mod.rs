//! The engine bridge: one thread owns the models; the UI talks to it only
//! through [`Command`]s in and [`Event`]s out. This is the only module that
//! knows about threads and channels.
//!
//! Scheduling rules (issue 3):
//! * a new live job supersedes the pending live job at once and the running
//!   live job at its next step boundary;
//! * variation and refine jobs are queued in order and never dropped (they
//!   even survive an engine restart: the handle re-submits them);
//! * live jobs run before queued jobs, because the user is waiting on them;
//!   a running refine or variation pauses at its next step boundary for a
//!   live job that can run without loading or parking a model, and resumes
//!   afterwards where it stopped, to the same image;
//! * prompt encodings are cached per text encoder (its files) and prompt,
//!   64 at most, so re-renders, seeds, variations and the Base refine of a
//!   prompt never re-run the encoder, and Turbo and Base share one encoder
//!   (and its cache entries) when their files are the same;
//! * the memory plan decides what stays resident: both DiTs, or only the one
//!   in use (the idle one parked), and the text encoder kept or loaded only
//!   to encode a new prompt;
//! * a panic inside a job becomes [`Event::Failed`] + [`Event::EngineRestarted`],
//!   the models are reloaded and the next job runs normally;
//! * LoRAs are applied to a loaded DiT in place and can be changed or removed
//!   without reloading it.
//!
//! Two other kinds of background work live here too: [`Task`] (a one-off
//! job such as finding models on disk) and [`Download`] (a model download
//! with progress and cancel).
//!
//! Files: this one holds the protocol and the handle the UI owns;
//! `worker.rs` the engine thread (its queue, models, prompt cache and memory
//! plan); `tasks.rs` the other background work.

mod tasks;
mod worker;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use zimage_engine::device::DeviceKind;
use zimage_engine::memory::MemoryPlan;
use zimage_engine::metadata::LoraRef;
use zimage_engine::pipeline::{
    GenerateRequest, ModelKind,
};
use zimage_engine::preview::RgbImage;

pub use tasks::{BackgroundIo, Download, DownloadEvent, Inbox, IoResult, IoTask, Task};
use worker::start_thread;


pub type JobId = u64;

/// Why a job exists; decides scheduling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum JobKind {
    Live,
    Variation,
    Refine,
}

/// Which loaded model runs a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ModelSlot {
    Turbo,
    Base,
}

impl ModelSlot {
    pub fn label(self) -> &'static str {
        match self {
            ModelSlot::Turbo => "Turbo",
            ModelSlot::Base => "Base",
        }
    }
    pub fn kind(self) -> ModelKind {
        match self {
            ModelSlot::Turbo => ModelKind::Turbo,
            ModelSlot::Base => ModelKind::Base,
        }
    }
}

/// One unit of work.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub kind: JobKind,
    pub slot: ModelSlot,
    pub request: GenerateRequest,
}

/// Where the two models come from (a built-in name such as `demo-turbo`, or
/// a path) and the LoRAs applied to each, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelConfig {
    pub turbo: Option<String>,
    pub base: Option<String>,
    pub turbo_loras: Vec<LoraChoice>,
    pub base_loras: Vec<LoraChoice>,
    /// Memory plan: what stays resident between jobs (`Auto` is resolved
    /// from the device's memory when the models load; see
    /// `zimage_engine::memory`). Parked DiTs and a released text encoder are
    /// reloaded from the memory-mapped files when a job needs them.
    pub memory_plan: MemoryPlan,
}

impl ModelConfig {
    /// The model (path or built-in name) configured for `slot`.
    pub fn model(&self, slot: ModelSlot) -> &Option<String> {
        match slot {
            ModelSlot::Turbo => &self.turbo,
            ModelSlot::Base => &self.base,
        }
    }

    fn model_mut(&mut self, slot: ModelSlot) -> &mut Option<String> {
        match slot {
            ModelSlot::Turbo => &mut self.turbo,
            ModelSlot::Base => &mut self.base,
        }
    }

    fn loras(&self, slot: ModelSlot) -> &[LoraChoice] {
        match slot {
            ModelSlot::Turbo => &self.turbo_loras,
            ModelSlot::Base => &self.base_loras,
        }
    }
}

/// A LoRA file and its strength.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraChoice {
    pub path: PathBuf,
    pub strength: f32,
}

/// What is applied to one model's DiT after a LoRA change.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoraState {
    /// Applied LoRAs (name, strength, A1111 hash), as the images record them.
    pub applied: Vec<LoraRef>,
    /// E.g. a LoRA made for Base used on Turbo.
    pub warnings: Vec<String>,
    /// Files that could not be used, one line; the others are applied.
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ModelState {
    /// Nothing configured for this slot.
    NotConfigured,
    Loading {
        stage: String,
    },
    /// `default_size`, `default_steps`: what the model was made for; `kind`:
    /// what it is (from its scheduler), which need not be its slot's.
    Ready {
        name: String,
        default_size: u32,
        default_steps: usize,
        kind: ModelKind,
    },
    /// Configured but unusable; one line saying why.
    Failed(String),
}

impl ModelState {
    /// Why a ready model does not suit `slot` (a Base model as the live
    /// Turbo, a Turbo model as Base), in a few words; `None` when it does.
    pub fn misplaced(&self, slot: ModelSlot) -> Option<&'static str> {
        match (self, slot) {
            (ModelState::Ready { kind: ModelKind::Base, .. }, ModelSlot::Turbo) => {
                Some("a Base model (many steps, CFG): live previews will be slow; Z-Image-Turbo is made for this slot")
            }
            (ModelState::Ready { kind: ModelKind::Turbo, .. }, ModelSlot::Base) => {
                Some("a Turbo model (distilled, no CFG): refines with CFG will overcook; Z-Image (Base) is made for this slot")
            }
            _ => None,
        }
    }
}

pub enum Command {
    Submit {
        id: JobId,
        spec: JobSpec,
    },
    Cancel(JobId),
    LoadModels(ModelConfig),
    /// Counts a prompt's tokens (answered by [`Event::PromptCount`] between
    /// jobs or at the running job's next step; a newer request replaces an
    /// unanswered one).
    CountTokens(String),
    /// Makes the next job panic inside the engine (fault-injection for tests
    /// and for checking the restart path by hand).
    InjectPanic,
    /// Makes the next model load panic (the same, for the loading path).
    InjectLoadPanic,
    Shutdown,
}

#[derive(Debug, Clone)]
pub enum Event {
    /// The job started, or resumed after [`Event::Paused`].
    Started {
        id: JobId,
    },
    /// A refine or variation stopped at a step boundary so that a live image
    /// can render; it resumes where it stopped (with `Started`).
    Paused {
        id: JobId,
    },
    /// The live job `id` waits behind the running job `behind`, which does
    /// not pause for it at this step; sent once per reason at the step
    /// where the engine decided.
    LiveWaits {
        id: JobId,
        behind: JobId,
        until: LiveWait,
    },
    /// How many tokens the job's prompt is, chat template included (the
    /// model reads the first 512), sent before its first step.
    PromptTokens {
        id: JobId,
        tokens: usize,
    },
    /// How many tokens `prompt` is, chat template included, for
    /// [`Command::CountTokens`]: the count while typing, with no job to wait for.
    PromptCount {
        prompt: String,
        tokens: usize,
    },
    /// After each sampler step; `preview` is the x0 estimate at latent resolution.
    Progress {
        id: JobId,
        done: usize,
        total: usize,
        preview: Option<RgbImage>,
    },
    Finished {
        id: JobId,
        image: RgbImage,
        elapsed: Duration,
        per_step: Duration,
        conditioning_cached: bool,
        model: String,
        shift: f32,
        loras: Vec<LoraRef>,
    },
    /// `superseded`: replaced by a newer live job (not a user cancel).
    Cancelled {
        id: JobId,
        superseded: bool,
    },
    Failed {
        id: JobId,
        message: String,
    },
    Model {
        slot: ModelSlot,
        state: ModelState,
    },
    /// `model` was asked for `slot` but its files failed their check, so the
    /// working model `kept` stays loaded (its state is unchanged).
    ModelRejected {
        slot: ModelSlot,
        model: String,
        message: String,
        kept: Option<String>,
    },
    /// The LoRAs now applied to a model (after loading it or a LoRA change).
    Loras {
        slot: ModelSlot,
        state: LoraState,
    },
    /// The engine crashed and was restarted; `reason` is one line.
    EngineRestarted {
        reason: String,
    },
    /// What is in memory: sent after models load and after each job.
    Memory(MemoryReport),
    /// Where the models run ("CPU", "CUDA", "wgpu"), sent when the engine
    /// starts; `problem` says why the requested device is not the one used.
    Device {
        name: String,
        problem: Option<String>,
    },
}

/// How long a live job waits behind a running refine or variation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveWait {
    /// Until that job ends: pausing it would need the text encoder that the
    /// lowest memory plan keeps out with the DiTs.
    JobEnd,
    /// Its DiT is parked (one DiT at a time): the job pauses at a later step
    /// once swapping the two DiTs is quicker than the rest of it, else ends first.
    Swap,
}

/// The engine's memory plan and use: the plan in force and why, which
/// weights are resident (shared components counted once), what is parked or
/// released, and how much memory the process holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MemoryReport {
    /// (component, bytes) of every resident weight set, e.g. ("Turbo DiT", …).
    pub resident: Vec<(String, u64)>,
    /// Models whose DiT is parked (not in memory; reloaded when needed).
    pub parked: Vec<String>,
    /// Text encoders not in memory (loaded only to encode a new prompt).
    pub released: Vec<String>,
    /// How long reloading each parked model's DiT took, the last time it was
    /// reloaded (what a refine adds when Base is parked).
    pub reload_times: Vec<(ModelSlot, Duration)>,
    /// Parked DiTs whose files were read ahead into the page cache at start,
    /// so that their first load reads memory, not the disk.
    pub read_ahead: Vec<String>,
    /// Resident memory of the whole process (host RAM), where known.
    pub process_bytes: Option<u64>,
    /// On a GPU, its memory as the allocator sees it: bytes in tensors and
    /// bytes its pools hold (what the driver reports as used); `None` on the CPU.
    pub device_memory: Option<zimage_engine::device::DeviceMemory>,
    /// The plan in force (never `Auto`: what `Auto` resolved to).
    pub plan: MemoryPlan,
    /// Why, e.g. "Auto (80.0 GB free on CUDA): keep everything".
    pub plan_reason: String,
    /// The plan's estimated peak: weights resident at once plus the working
    /// memory of the default request.
    pub estimated_peak: u64,
    /// Times a text encoder was loaded (at start and after each release).
    pub text_encoder_loads: u64,
    /// Prompts run through a text encoder (cache misses).
    pub prompts_encoded: u64,
}

impl MemoryReport {
    pub fn weights_total(&self) -> u64 {
        self.resident.iter().map(|(_, b)| b).sum()
    }

    /// The name [`MemoryReport::parked`] and `read_ahead` give `slot`'s DiT.
    pub fn dit_name(slot: ModelSlot) -> String {
        format!("{} DiT", slot.label())
    }

    /// Whether `slot`'s DiT is parked.
    pub fn dit_parked(&self, slot: ModelSlot) -> bool {
        self.parked.contains(&Self::dit_name(slot))
    }
}

/// What the UI holds: send commands, poll events. Never blocks.
pub struct EngineHandle {
    cmd_tx: Sender<Command>,
    ev_rx: Receiver<Event>,
    thread: Option<JoinHandle<()>>,
    next_id: JobId,
    waker: Waker,
    config: ModelConfig,
    /// The device asked for; `None` picks the best one available.
    device: Option<DeviceKind>,
    /// Queued (non-live) jobs not yet finished, re-submitted if the thread dies.
    outstanding: BTreeMap<JobId, JobSpec>,
}

/// How the worker wakes the UI (egui's `request_repaint` in the app).
pub type Waker = Arc<dyn Fn() + Send + Sync>;

impl EngineHandle {
    /// An engine on the CPU.
    pub fn spawn(waker: Waker) -> Self {
        Self::spawn_on(Some(DeviceKind::Cpu), waker)
    }

    /// An engine on `device` (`None`: CUDA when this build has it and a GPU
    /// answers, else the CPU). A device that is missing falls back to the
    /// CPU with [`Event::Device`] saying why.
    pub fn spawn_on(device: Option<DeviceKind>, waker: Waker) -> Self {
        let (cmd_tx, ev_rx, thread) = start_thread(waker.clone(), device);
        Self {
            cmd_tx,
            ev_rx,
            thread: Some(thread),
            next_id: 1,
            waker,
            config: ModelConfig::default(),
            device,
            outstanding: BTreeMap::new(),
        }
    }

    /// Moves the engine to another device: a new engine thread loads the
    /// models there and takes the queued jobs; the old one stops at its next
    /// step boundary (not waited for: the UI never blocks).
    pub fn set_device(&mut self, device: Option<DeviceKind>) {
        if device == self.device {
            return;
        }
        self.device = device;
        let _ = self.cmd_tx.send(Command::Shutdown);
        drop(self.thread.take());
        self.restart();
    }

    pub fn submit(&mut self, spec: JobSpec) -> JobId {
        let id = self.next_id;
        self.next_id += 1;
        if spec.kind != JobKind::Live {
            self.outstanding.insert(id, spec.clone());
        }
        self.send(Command::Submit { id, spec });
        id
    }

    pub fn cancel(&mut self, id: JobId) {
        self.send(Command::Cancel(id));
    }

    pub fn load_models(&mut self, config: ModelConfig) {
        self.config = config.clone();
        self.send(Command::LoadModels(config));
    }

    /// Asks for `prompt`'s length in tokens ([`Event::PromptCount`]).
    pub fn count_tokens(&mut self, prompt: String) {
        self.send(Command::CountTokens(prompt));
    }

    pub fn inject_panic(&mut self) {
        self.send(Command::InjectPanic);
    }

    pub fn inject_load_panic(&mut self) {
        self.send(Command::InjectLoadPanic);
    }

    /// Number of queued or running non-live jobs.
    pub fn queued(&self) -> usize {
        self.outstanding.len()
    }

    /// Drains the events that have arrived. Restarts the thread if it died.
    pub fn poll(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        loop {
            match self.ev_rx.try_recv() {
                Ok(ev) => {
                    if let Event::Finished { id, .. } | Event::Failed { id, .. } | Event::Cancelled { id, .. } = &ev {
                        self.outstanding.remove(id);
                    }
                    events.push(ev);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    events.push(Event::EngineRestarted { reason: "the engine thread stopped unexpectedly".into() });
                    self.restart();
                    break;
                }
            }
        }
        events
    }

    fn send(&mut self, cmd: Command) {
        if let Err(mpsc::SendError(cmd)) = self.cmd_tx.send(cmd) {
            // The thread is gone: restart it and deliver the command to the new one.
            self.restart();
            let _ = self.cmd_tx.send(cmd);
        }
    }

    fn restart(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let (cmd_tx, ev_rx, thread) = start_thread(self.waker.clone(), self.device);
        self.cmd_tx = cmd_tx;
        self.ev_rx = ev_rx;
        self.thread = Some(thread);
        let _ = self.cmd_tx.send(Command::LoadModels(self.config.clone()));
        for (id, spec) in &self.outstanding {
            let _ = self.cmd_tx.send(Command::Submit { id: *id, spec: spec.clone() });
        }
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        let _ = self.cmd_tx.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
