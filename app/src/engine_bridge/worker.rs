//! The engine thread: it owns the device and the models, runs one job at a
//! time from its queue and reports through [`Event`]s (see the module above
//! for the scheduling rules).

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use zimage_engine::device::{CpuBackend, DeviceKind};
use zimage_engine::loader::{self, LoadStage, ModelFiles, ModelOverrides, ModelPlan, SharedComponents};
use zimage_engine::lora::{self, AppliedLoras, LoraFile};
use zimage_engine::memory::{self, MemoryPlan, PlanSizes, ResolvedPlan};
use zimage_engine::metadata::LoraRef;
use zimage_engine::pipeline::{
    Conditioning, GenerateRequest, Generation, ModelKind, PausedRun, StepControl, StepProgress, ZImagePipeline,
};
use zimage_engine::scheduler::Schedule;
use zimage_engine::text::{PromptTokenizer, TextEncoder};
use zimage_engine::EngineError;

use super::*;

pub(super) fn start_thread(waker: Waker, device: Option<DeviceKind>) -> (Sender<Command>, Receiver<Event>, JoinHandle<()>) {
    let (cmd_tx, cmd_rx) = mpsc::channel();
    let (ev_tx, ev_rx) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("zimage-engine".into())
        .spawn(move || {
            lower_priority();
            let out = Emitter { tx: ev_tx, waker };
            // Probing a GPU initialises its driver: done here, off the UI thread.
            let (kind, problem) = pick_device(device);
            let name = match kind {
                DeviceKind::Cpu => "CPU",
                DeviceKind::Cuda => "CUDA",
                DeviceKind::Wgpu => "wgpu",
            };
            out.emit(Event::Device { name: name.into(), problem });
            match kind {
                #[cfg(feature = "cuda")]
                DeviceKind::Cuda => Worker::<zimage_engine::device::CudaBackend>::new(cmd_rx, out, kind).run(),
                #[cfg(feature = "wgpu")]
                DeviceKind::Wgpu => Worker::<zimage_engine::device::WgpuBackend>::new(cmd_rx, out, kind).run(),
                _ => Worker::<CpuBackend>::new(cmd_rx, out, DeviceKind::Cpu).run(),
            }
        })
        .expect("spawning the engine thread");
    (cmd_tx, ev_rx, thread)
}

/// The device to run on, and why it is not the requested one. Auto prefers
/// CUDA; wgpu only when asked for (on machines without a GPU driver it runs
/// on a software Vulkan, slower than the CPU backend).
fn pick_device(requested: Option<DeviceKind>) -> (DeviceKind, Option<String>) {
    match requested {
        Some(kind) => match kind.ensure_available() {
            Ok(()) => (kind, None),
            Err(e) => (DeviceKind::Cpu, Some(format!("{}; running on the CPU", one_line(&e.to_string())))),
        },
        None if DeviceKind::Cuda.compiled_in() && DeviceKind::Cuda.ensure_available().is_ok() => (DeviceKind::Cuda, None),
        None => (DeviceKind::Cpu, None),
    }
}

/// The engine saturates every core; a higher nice value keeps the UI thread
/// (and the rest of the desktop) responsive. On Linux the nice value is per
/// thread and inherited by threads created later, so the tensor library's
/// worker threads, first started from here, get it too.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority only reads its integer arguments; who = 0 is the calling thread.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 10);
    }
}

struct Emitter {
    tx: Sender<Event>,
    waker: Waker,
}

impl Emitter {
    fn emit(&self, ev: Event) {
        let _ = self.tx.send(ev);
        (self.waker)();
    }
}

/// Prompt encodings keyed by (text-encoder files, exact prompt text): Turbo
/// and Base loaded from the same files share one key, and the key survives
/// the text encoder being released and reloaded. Least recently used first out.
struct PromptCache<B: Backend> {
    map: HashMap<(String, String), Tensor<B, 2>>,
    order: VecDeque<(String, String)>,
}

impl<B: Backend> Default for PromptCache<B> {
    fn default() -> Self {
        Self { map: HashMap::new(), order: VecDeque::new() }
    }
}

impl<B: Backend> PromptCache<B> {
    const CAPACITY: usize = 64;

    fn get(&mut self, encoder: &str, prompt: &str) -> Option<Tensor<B, 2>> {
        let key = (encoder.to_string(), prompt.to_string());
        let t = self.map.get(&key)?.clone();
        if let Some(pos) = self.order.iter().position(|k| *k == key) {
            let k = self.order.remove(pos).expect("position is in range");
            self.order.push_back(k);
        }
        Some(t)
    }

    fn insert(&mut self, encoder: &str, prompt: &str, t: Tensor<B, 2>) {
        let key = (encoder.to_string(), prompt.to_string());
        if self.map.insert(key.clone(), t).is_none() {
            if self.order.len() >= Self::CAPACITY {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
            self.order.push_back(key);
        }
    }
}

/// A text encoder (one per distinct set of tokenizer + text-encoder files,
/// so Turbo and Base share one when their files are the same).
struct Encoder<B: Backend> {
    files: ModelFiles,
    /// The files' identity: the prompt cache's key.
    key: String,
    /// `None` while released (the lowest memory plan).
    text: Option<Arc<TextEncoder<B>>>,
    /// The encoder's tokenizer, kept when the encoder is released: it counts
    /// every prompt's tokens (the model reads the first 512).
    tokenizer: Option<PromptTokenizer>,
    params: u64,
}

struct Models<B: Backend> {
    turbo: Option<ZImagePipeline<B>>,
    base: Option<ZImagePipeline<B>>,
}

impl<B: Backend> Default for Models<B> {
    fn default() -> Self {
        Self { turbo: None, base: None }
    }
}

impl<B: Backend> Models<B> {
    fn get(&self, slot: ModelSlot) -> Option<&ZImagePipeline<B>> {
        match slot {
            ModelSlot::Turbo => self.turbo.as_ref(),
            ModelSlot::Base => self.base.as_ref(),
        }
    }
    fn get_mut(&mut self, slot: ModelSlot) -> Option<&mut ZImagePipeline<B>> {
        self.slot_mut(slot).as_mut()
    }
    fn slot_mut(&mut self, slot: ModelSlot) -> &mut Option<ZImagePipeline<B>> {
        match slot {
            ModelSlot::Turbo => &mut self.turbo,
            ModelSlot::Base => &mut self.base,
        }
    }
}

#[derive(Default)]
struct Queue {
    live: Option<(JobId, JobSpec)>,
    jobs: VecDeque<(JobId, JobSpec)>,
    /// The job paused for a live one (its state is the worker's `paused`).
    paused: Option<JobId>,
    cancel_running: bool,
    superseded: bool,
    shutdown: bool,
    inject_panic: bool,
    inject_load_panic: bool,
    load: Option<ModelConfig>,
    /// A prompt to count the tokens of (the latest asked).
    count: Option<String>,
}

struct Worker<B: Backend> {
    rx: Receiver<Command>,
    out: Emitter,
    queue: Queue,
    /// The loaded pipelines; their `text` is always `None`: the text
    /// encoders live in `encoders`.
    models: Models<B>,
    model_state: HashMap<ModelSlot, ModelState>,
    cache: PromptCache<B>,
    config: ModelConfig,
    /// Per model: the LoRAs applied to its DiT (with the original weights they replaced).
    loras: HashMap<ModelSlot, (AppliedLoras<B>, Vec<LoraRef>)>,
    /// Parked models: their files and the (still resident, shared) VAE,
    /// enough to reload the DiT.
    parked: HashMap<ModelSlot, (ModelFiles, SharedComponents<B>)>,
    /// The files each loaded model came from.
    files: HashMap<ModelSlot, ModelFiles>,
    /// Each model's checked files: sizes, configs (known before loading).
    plans: HashMap<ModelSlot, ModelPlan>,
    encoders: Vec<Encoder<B>>,
    /// The refine or variation paused for a live job, resumed before the queue.
    paused: Option<(JobId, JobSpec, JobRun<B>)>,
    /// Parked-from-the-start DiTs whose files were read ahead (see `load`).
    read_ahead: Vec<ModelSlot>,
    /// How long reloading each parked DiT took, last time (what pausing a
    /// job for another model's live image costs, twice, under one DiT at a time).
    unpark_time: HashMap<ModelSlot, Duration>,
    /// Which of `encoders` each model uses.
    encoder_of: HashMap<ModelSlot, usize>,
    /// The plan in force and why.
    plan: ResolvedPlan,
    sizes: PlanSizes,
    /// Memory the plan may use, measured when the engine started (before it
    /// held any weight), and its name in the plan's reason.
    budget: (Option<u64>, String),
    /// How many times a plan's peak counts against `budget` (GPU memory pools).
    pool_overhead: f64,
    text_encoder_loads: u64,
    prompts_encoded: u64,
    device: burn::tensor::Device<B>,
    /// Weight and compute dtype: f32 on the CPU, bf16 on GPUs.
    dtype: DType,
    /// Host memory is the working memory (the preflight check applies).
    on_host: bool,
}

impl<B: Backend> Worker<B> {
    fn new(rx: Receiver<Command>, out: Emitter, kind: DeviceKind) -> Self {
        Self {
            rx,
            out,
            queue: Queue::default(),
            models: Models::default(),
            model_state: HashMap::new(),
            cache: PromptCache::default(),
            config: ModelConfig::default(),
            loras: HashMap::new(),
            parked: HashMap::new(),
            files: HashMap::new(),
            plans: HashMap::new(),
            encoders: Vec::new(),
            paused: None,
            unpark_time: HashMap::new(),
            read_ahead: Vec::new(),
            encoder_of: HashMap::new(),
            plan: ResolvedPlan { plan: MemoryPlan::KeepAll, reason: String::new() },
            sizes: PlanSizes::default(),
            budget: zimage_engine::device::memory_budget(kind),
            pool_overhead: if kind == DeviceKind::Cpu { 1.0 } else { memory::GPU_POOL_OVERHEAD },
            text_encoder_loads: 0,
            prompts_encoded: 0,
            device: Default::default(),
            dtype: kind.weight_dtype(),
            on_host: kind == DeviceKind::Cpu,
        }
    }

    fn run(&mut self) {
        loop {
            let idle = self.queue.live.is_none()
                && self.paused.is_none()
                && self.queue.jobs.is_empty()
                && self.queue.load.is_none()
                && self.queue.count.is_none();
            if idle {
                match self.rx.recv_timeout(Duration::from_secs(3600)) {
                    Ok(cmd) => handle(&mut self.queue, &self.out, cmd, None),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            if drain(&self.rx, &mut self.queue, &self.out, None) {
                return;
            }
            if self.queue.shutdown {
                return;
            }
            if let Some(config) = self.queue.load.take() {
                let panic_now = std::mem::take(&mut self.queue.inject_load_panic);
                let loaded = catch_unwind(AssertUnwindSafe(|| {
                    if panic_now {
                        panic!("injected loading fault");
                    }
                    self.load(config.clone())
                }));
                if let Err(payload) = loaded {
                    self.load_crashed(&config, &panic_text(payload.as_ref()));
                }
                continue;
            }
            if let Some(prompt) = self.queue.count.take() {
                // Turbo's tokenizer counts what the live image reads; Base's when only it is set.
                let tokens = self.prompt_tokens(ModelSlot::Turbo, &prompt).or_else(|| self.prompt_tokens(ModelSlot::Base, &prompt));
                if let Some(tokens) = tokens {
                    self.out.emit(Event::PromptCount { prompt, tokens });
                }
            }
            // A paused job cancelled while it waited is gone from the queue.
            if self.paused.as_ref().is_some_and(|(id, ..)| self.queue.paused != Some(*id)) {
                self.paused = None;
            }
            let next = match self.queue.live.take() {
                Some((id, spec)) => Some((id, spec, None)),
                None => match self.paused.take() {
                    Some((id, spec, run)) => {
                        self.queue.paused = None;
                        Some((id, spec, Some(run)))
                    }
                    None => self.queue.jobs.pop_front().map(|(id, spec)| (id, spec, None)),
                },
            };
            if let Some((id, spec, run)) = next {
                self.run_job(id, spec, run);
            }
            if self.queue.shutdown {
                return;
            }
        }
    }

    /// Runs a job from its start, or from where it paused (`run`).
    fn run_job(&mut self, id: JobId, spec: JobSpec, run: Option<JobRun<B>>) {
        self.queue.cancel_running = false;
        self.queue.superseded = false;
        if self.models.get(spec.slot).is_none() && !self.parked.contains_key(&spec.slot) {
            let why = match self.model_state.get(&spec.slot) {
                Some(ModelState::Loading { .. }) => format!("the {} model is still loading", spec.slot.label()),
                Some(ModelState::Failed(m)) => format!("the {} model could not be loaded: {m}", spec.slot.label()),
                _ => format!("no {} model is configured; choose one in Settings", spec.slot.label()),
            };
            self.out.emit(Event::Failed { id, message: why });
            return;
        }
        self.out.emit(Event::Started { id });
        let panic_now = std::mem::take(&mut self.queue.inject_panic);
        let result = catch_unwind(AssertUnwindSafe(|| {
            if panic_now {
                panic!("injected engine fault");
            }
            self.job(id, &spec, run)
        }));
        match result {
            Ok(Ok(())) => self.report_memory(),
            Ok(Err(JobEnd::Cancelled)) => {
                let superseded = self.queue.superseded;
                self.out.emit(Event::Cancelled { id, superseded });
            }
            Ok(Err(JobEnd::Error(message))) => self.out.emit(Event::Failed { id, message }),
            Err(payload) => {
                let what = panic_text(payload.as_ref());
                self.out.emit(Event::Failed { id, message: format!("the engine crashed ({what}); it was restarted") });
                self.out.emit(Event::EngineRestarted { reason: what });
                // The models may be in any state after a panic: drop and reload them.
                self.drop_models();
                self.queue.load = Some(self.config.clone());
            }
        }
    }

    /// One job: check it, encode its prompts (through the cache), make its
    /// DiT resident, sample; or, for a paused job, make its DiT resident and
    /// go on sampling.
    fn job(&mut self, id: JobId, spec: &JobSpec, run: Option<JobRun<B>>) -> Result<(), JobEnd> {
        let start = Instant::now();
        let req = &spec.request;
        let run = match run {
            Some(run) => run,
            None => {
                let plan =
                    self.plans.get(&spec.slot).ok_or_else(|| JobEnd::Error("the model's files are unknown".into()))?;
                let pixel_multiple = (plan.vae_config.scale() * plan.dit_config.patch_size) as u32;
                req.validate(pixel_multiple).map_err(engine_err)?;
                // Running out of host memory aborts the process (no error to catch):
                // refuse sizes that cannot fit before allocating anything.
                if let Some(available) = zimage_engine::device::host_available_memory().filter(|_| self.on_host) {
                    let need = plan.working_memory_bytes(req);
                    zimage_engine::pipeline::check_working_memory(req, need, available).map_err(engine_err)?;
                }
                let (cond, cached) = self.conditioning(spec.slot, req)?;
                if let Some(tokens) = req.prompts.first().and_then(|p| self.prompt_tokens(spec.slot, p)) {
                    self.out.emit(Event::PromptTokens { id, tokens });
                }
                JobRun { cond, cached, paused: None, elapsed: Duration::ZERO, sampling: Duration::ZERO }
            }
        };
        let running = (id, spec.kind);
        // Commands that arrived while encoding may already supersede this job.
        if drain(&self.rx, &mut self.queue, &self.out, Some(running)) || self.queue.cancel_running || self.queue.shutdown {
            return Err(JobEnd::Cancelled);
        }
        if self.models.get(spec.slot).is_none() {
            // Parked: park the other model first when one DiT at a time, so
            // both are never resident at once.
            if self.plan.plan.one_dit() {
                for other in [ModelSlot::Turbo, ModelSlot::Base] {
                    if other != spec.slot {
                        self.park(other);
                    }
                }
            }
            self.unpark(spec.slot);
            self.report_memory();
        }
        let pipe = self
            .models
            .get(spec.slot)
            .ok_or_else(|| JobEnd::Error(format!("the {} model could not be reloaded", spec.slot.label())))?;
        let loras = self.loras.get(&spec.slot).map(|(_, refs)| refs.clone()).unwrap_or_default();
        // A live job that arrives while this one runs pauses it when the live
        // job can run at once: its DiT and text encoder resident, so pausing
        // costs no model load. Under one DiT at a time, the live job's DiT
        // parked, pausing swaps the two DiTs and back: worth it only when the
        // rest of this job takes longer (`swap_for`, from measured reloads).
        let encoder_ready = |s: &ModelSlot| self.encoder_of.get(s).is_some_and(|&i| self.encoders[i].text.is_some());
        let mut pausable_for = Vec::new();
        let mut swap_for = Vec::new();
        if spec.kind != JobKind::Live {
            for s in [ModelSlot::Turbo, ModelSlot::Base] {
                if self.models.get(s).is_some() && encoder_ready(&s) {
                    pausable_for.push(s);
                } else if self.parked.contains_key(&s) && encoder_ready(&s) && !self.plan.plan.releases_text_encoder() {
                    // An unmeasured reload is taken to cost what the other one did.
                    let known = |x: ModelSlot| self.unpark_time.get(&x).copied();
                    let (theirs, ours) = (known(s).or(known(spec.slot)), known(spec.slot).or(known(s)));
                    if let (Some(theirs), Some(ours)) = (theirs, ours) {
                        swap_for.push((s, theirs + ours));
                    }
                }
            }
        }
        // Prompts typed meanwhile are counted at the job's steps (Live off,
        // nothing pauses it) with the tokenizer at hand.
        let counter = [ModelSlot::Turbo, ModelSlot::Base].iter().find_map(|s| {
            let encoder = &self.encoders[*self.encoder_of.get(s)?];
            encoder.tokenizer.as_ref().or(encoder.text.as_ref().map(|t| &t.tokenizer))
        });
        let ctx = JobContext { id, spec, start, loras, pausable_for, swap_for };
        if let Some(run) = run_pipeline(pipe, run, ctx, counter, &mut self.queue, &self.out, &self.rx)? {
            self.paused = Some((id, spec.clone(), run));
            self.queue.paused = Some(id);
            self.out.emit(Event::Paused { id });
        }
        Ok(())
    }

    /// The caption features of a request from the cache, encoding what is
    /// missing: the text encoder is loaded for that if it is released (with
    /// the DiTs parked first under the lowest plan) and released again
    /// afterwards. Also whether everything came from the cache.
    fn conditioning(&mut self, slot: ModelSlot, req: &GenerateRequest) -> Result<(Conditioning<B>, bool), JobEnd> {
        let index = *self.encoder_of.get(&slot).ok_or_else(|| JobEnd::Error("no text encoder for this model".into()))?;
        let key = self.encoders[index].key.clone();
        let shift = self.files.get(&slot).map_or(3.0, |f| f.shift);
        let schedule = Schedule::new(req.steps, shift);
        let needs_negative = (0..req.steps).any(|i| req.cfg_at(&schedule, i));
        let mut texts: Vec<&str> = req.prompts.iter().map(String::as_str).collect();
        if needs_negative {
            texts.push(&req.negative_prompt);
        }
        let mut loaded_here = false;
        let mut all_cached = true;
        let mut features = Vec::with_capacity(texts.len());
        for text in &texts {
            if let Some(t) = self.cache.get(&key, text) {
                features.push(t);
                continue;
            }
            all_cached = false;
            if self.encoders[index].text.is_none() {
                self.load_encoder(index, slot).map_err(engine_err)?;
                loaded_here = true;
            }
            let encoder = self.encoders[index].text.as_ref().expect("loaded above");
            let t = encoder.encode(text).map_err(engine_err)?;
            self.prompts_encoded += 1;
            self.cache.insert(&key, text, t.clone());
            features.push(t);
        }
        if loaded_here && self.plan.plan.releases_text_encoder() {
            self.encoders[index].text = None;
            B::memory_cleanup(&self.device);
            self.report_memory();
        }
        let negative = if needs_negative {
            let neg = features.pop().expect("the negative prompt was pushed last");
            vec![neg; req.prompts.len()]
        } else {
            Vec::new()
        };
        Ok((Conditioning { positive: features, negative }, all_cached))
    }

    /// The tokens `prompt` costs with the chat template (before the 512-token
    /// cut), from the tokenizer of `slot`'s text encoder (read from its file
    /// while the encoder is released).
    fn prompt_tokens(&mut self, slot: ModelSlot, prompt: &str) -> Option<usize> {
        let encoder = &mut self.encoders[*self.encoder_of.get(&slot)?];
        if encoder.tokenizer.is_none() {
            encoder.tokenizer = match &encoder.text {
                Some(text) => Some(text.tokenizer.clone()),
                None => PromptTokenizer::from_file(&encoder.files.tokenizer).ok(),
            };
        }
        encoder.tokenizer.as_ref()?.count(prompt).ok()
    }

    /// Loads a released text encoder; under the lowest plan every DiT is
    /// parked first, so the two are never resident together.
    fn load_encoder(&mut self, index: usize, slot: ModelSlot) -> zimage_engine::Result<()> {
        if self.plan.plan.releases_text_encoder() {
            for s in [ModelSlot::Turbo, ModelSlot::Base] {
                self.park(s);
            }
        }
        self.out.emit(Event::Model { slot, state: ModelState::Loading { stage: "text encoder".into() } });
        let loaded = loader::load_text_encoder::<B>(&self.encoders[index].files, &self.device, self.dtype, &mut |_, _, _| {});
        // Back to what the model was (Ready), whether or not this worked.
        if let Some(state) = self.model_state.get(&slot).cloned() {
            self.out.emit(Event::Model { slot, state });
        }
        self.encoders[index].text = Some(loaded?);
        self.text_encoder_loads += 1;
        self.report_memory();
        Ok(())
    }

    /// Reports the plan and the resident weights: each text encoder and VAE
    /// once (Turbo and Base share them when their files are the same), each
    /// DiT, in the compute dtype.
    fn report_memory(&self) {
        let bytes = if self.dtype == DType::F32 { 4 } else { 2 };
        let mut resident: Vec<(String, u64)> = Vec::new();
        let mut released = Vec::new();
        let mut seen_encoders = Vec::new();
        let mut seen_vaes = Vec::new();
        let name = |resident: &[(String, u64)], slot: ModelSlot, what: &str| {
            if resident.iter().any(|(n, _)| n.ends_with(what)) {
                format!("{} {what}", slot.label())
            } else {
                what.to_string()
            }
        };
        for slot in [ModelSlot::Turbo, ModelSlot::Base] {
            if let Some(&i) = self.encoder_of.get(&slot) {
                if !seen_encoders.contains(&i) {
                    seen_encoders.push(i);
                    let n = name(&resident, slot, "text encoder");
                    match self.encoders.get(i) {
                        Some(e) if e.text.is_some() => resident.push((n, e.params * bytes)),
                        Some(_) => released.push(n),
                        None => {}
                    }
                }
            }
            let vae = self.models.get(slot).map(|p| &p.vae).or_else(|| self.parked.get(&slot).map(|(_, c)| &c.vae));
            if let Some(vae) = vae {
                let id = Arc::as_ptr(vae) as usize;
                if !seen_vaes.contains(&id) {
                    seen_vaes.push(id);
                    use burn::module::Module;
                    resident.push((name(&resident, slot, "VAE"), vae.num_params() as u64 * bytes));
                }
            }
            if let Some(pipe) = self.models.get(slot) {
                resident.push((format!("{} DiT", slot.label()), pipe.weight_bytes(bytes)[1].1));
            }
        }
        let parked = [ModelSlot::Turbo, ModelSlot::Base]
            .into_iter()
            .filter(|s| self.parked.contains_key(s))
            .map(MemoryReport::dit_name)
            .collect();
        self.out.emit(Event::Memory(MemoryReport {
            resident,
            parked,
            released,
            reload_times: [ModelSlot::Turbo, ModelSlot::Base]
                .into_iter()
                .filter_map(|s| self.unpark_time.get(&s).map(|d| (s, *d)))
                .collect(),
            read_ahead: self.read_ahead.iter().copied().map(MemoryReport::dit_name).collect(),
            process_bytes: zimage_engine::device::process_resident_memory(),
            device_memory: zimage_engine::device::device_memory::<B>(&self.device),
            plan: self.plan.plan,
            plan_reason: self.plan.reason.clone(),
            estimated_peak: self.sizes.peak(self.plan.plan),
            text_encoder_loads: self.text_encoder_loads,
            prompts_encoded: self.prompts_encoded,
        }));
    }

    fn set_state(&mut self, slot: ModelSlot, state: ModelState) {
        self.model_state.insert(slot, state.clone());
        self.out.emit(Event::Model { slot, state });
    }

    /// What each plan needs for the configured models (each text encoder and
    /// VAE counted once), with the working memory of the default request:
    /// the live one, Turbo's defaults at its natural size (Base's when only
    /// Base is configured).
    fn plan_sizes(&self) -> PlanSizes {
        let bytes = if self.dtype == DType::F32 { 4 } else { 2 };
        let mut sizes = PlanSizes::default();
        let mut seen_encoders = Vec::new();
        let mut seen_vaes: Vec<&ModelFiles> = Vec::new();
        for slot in [ModelSlot::Turbo, ModelSlot::Base] {
            let (Some(plan), Some(files)) = (self.plans.get(&slot), self.files.get(&slot)) else { continue };
            let dit = plan.dit_params * bytes;
            match slot {
                ModelSlot::Turbo => sizes.turbo_dit = dit,
                ModelSlot::Base => sizes.base_dit = dit,
            }
            if let Some(&i) = self.encoder_of.get(&slot) {
                if !seen_encoders.contains(&i) {
                    seen_encoders.push(i);
                    sizes.text_encoder += plan.text_encoder_params * bytes;
                }
            }
            if !seen_vaes.iter().any(|f| same_shared_files(f, files)) {
                seen_vaes.push(files);
                sizes.vae += plan.vae_params * bytes;
            }
            if sizes.working == 0 {
                let mut req = GenerateRequest::new("", slot.kind());
                (req.width, req.height) = (files.default_size, files.default_size);
                // The estimate counts f32 activations; bf16 devices hold half.
                sizes.working = plan.working_memory_bytes(&req) * bytes / 4;
            }
        }
        sizes
    }

    /// Applies the plan in force to what is loaded: parks the idle DiT (one
    /// at a time) or brings it back, releases or loads the text encoders.
    fn apply_plan(&mut self) {
        let plan = self.plan.plan;
        if plan.one_dit() {
            let resident: Vec<ModelSlot> =
                [ModelSlot::Turbo, ModelSlot::Base].into_iter().filter(|s| self.models.get(*s).is_some()).collect();
            // Keep Turbo (the live model) when both are resident.
            if resident.len() == 2 {
                self.park(ModelSlot::Base);
            }
        } else {
            for slot in [ModelSlot::Turbo, ModelSlot::Base] {
                self.unpark(slot);
            }
        }
        for index in 0..self.encoders.len() {
            if plan.releases_text_encoder() {
                self.encoders[index].text = None;
                B::memory_cleanup(&self.device);
            } else if self.encoders[index].text.is_none() {
                let slot = [ModelSlot::Turbo, ModelSlot::Base]
                    .into_iter()
                    .find(|s| self.encoder_of.get(s) == Some(&index))
                    .unwrap_or(ModelSlot::Turbo);
                if let Err(e) = self.load_encoder(index, slot) {
                    self.set_state(slot, ModelState::Failed(one_line(&e.to_string())));
                }
            }
        }
    }

    /// Forgets every model and what was derived from them (files, plans,
    /// encoders, LoRAs, cached prompts), before a reload.
    fn drop_models(&mut self) {
        self.models = Models::default();
        self.parked.clear();
        self.loras.clear();
        self.files.clear();
        self.plans.clear();
        self.encoders.clear();
        self.encoder_of.clear();
        self.cache = PromptCache::default();
    }

    /// A crash while loading (a device out of memory, a driver fault) leaves
    /// no model usable and is not retried by itself, which would crash again
    /// in a loop: each configured model says why, and the next change in
    /// Settings loads again.
    fn load_crashed(&mut self, config: &ModelConfig, what: &str) {
        self.drop_models();
        B::memory_cleanup(&self.device);
        self.config = config.clone();
        for slot in [ModelSlot::Turbo, ModelSlot::Base] {
            if config.model(slot).is_some() {
                let why = format!("loading crashed ({what}); try a lower memory plan or another device in Settings");
                self.set_state(slot, ModelState::Failed(why));
            }
        }
        self.report_memory();
    }

    fn load(&mut self, mut config: ModelConfig) {
        // A paused job would go on with other weights (a LoRA, a model):
        // it starts again from its first step.
        if let Some((id, spec, _)) = self.paused.take() {
            self.queue.paused = None;
            self.queue.jobs.push_front((id, spec));
        }
        // A new model whose files fail their check does not replace a working
        // one: a mistyped path or a broken download would otherwise leave the
        // user with no model at all. The check reads headers only.
        for slot in [ModelSlot::Turbo, ModelSlot::Base] {
            let (new, old) = (config.model(slot).clone(), self.config.model(slot).clone());
            let working = matches!(self.model_state.get(&slot), Some(ModelState::Ready { .. }));
            if !working || new == old {
                continue;
            }
            let Some(arg) = new else { continue };
            let checked = loader::locate_model(&arg, &ModelOverrides::default())
                .and_then(|files| loader::plan_model::<B>(&files, &self.device).map(drop));
            if let Err(e) = checked {
                self.out.emit(Event::ModelRejected { slot, model: arg, message: one_line(&e.to_string()), kept: old.clone() });
                *config.model_mut(slot) = old;
            }
        }
        // Same models, everything they name already loaded: at most the LoRAs
        // or the memory plan change.
        let present = |slot: ModelSlot| self.models.get(slot).is_some() || self.parked.contains_key(&slot);
        let loaded = present(ModelSlot::Turbo) == config.turbo.is_some() && present(ModelSlot::Base) == config.base.is_some();
        if config.turbo == self.config.turbo
            && config.base == self.config.base
            && loaded
            && !self.model_state.is_empty()
        {
            let previous = std::mem::replace(&mut self.config, config.clone());
            for slot in [ModelSlot::Turbo, ModelSlot::Base] {
                if config.loras(slot) != previous.loras(slot) {
                    self.apply_loras(slot);
                }
            }
            self.plan = memory::resolve(config.memory_plan, self.budget.0, &self.budget.1, self.pool_overhead, &self.sizes);
            self.apply_plan();
            self.report_memory();
            return;
        }
        self.config = config.clone();
        self.drop_models();
        // 1. Find and check every model's files (nothing loaded yet), so the
        //    plan is known before anything is loaded.
        let mut usable = Vec::new();
        for slot in [ModelSlot::Turbo, ModelSlot::Base] {
            let Some(arg) = config.model(slot) else {
                self.set_state(slot, ModelState::NotConfigured);
                continue;
            };
            self.set_state(slot, ModelState::Loading { stage: "checking files".into() });
            match self.check_one(slot, arg) {
                Ok(()) => usable.push(slot),
                Err(e) => self.set_state(slot, ModelState::Failed(one_line(&e.to_string()))),
            }
        }
        self.sizes = self.plan_sizes();
        self.plan = memory::resolve(config.memory_plan, self.budget.0, &self.budget.1, self.pool_overhead, &self.sizes);
        // A model that cannot fit even one large part at a time would get the
        // process killed (host) or fail mid-load (GPU): refused in one line.
        let dtype = zimage_engine::device::dtype_name(self.dtype);
        usable.retain(|&slot| {
            let dit = if slot == ModelSlot::Turbo { self.sizes.turbo_dit } else { self.sizes.base_dit };
            let need = self.sizes.least_weights(dit);
            let model = format!("the {} model", slot.label());
            let how = format!("{dtype}, one large part at a time");
            match memory::check_weights_fit(&model, &how, need, self.budget.0, &self.budget.1) {
                Ok(()) => true,
                Err(e) => {
                    self.set_state(slot, ModelState::Failed(one_line(&e.to_string())));
                    false
                }
            }
        });
        // 2. Load what the plan keeps resident.
        let mut shared: Option<(ModelFiles, SharedComponents<B>)> = None;
        for slot in usable {
            match self.load_one(slot, &mut shared) {
                Ok(Some(pipe)) => {
                    let (name, default_size, default_steps, kind) = (pipe.name.clone(), pipe.default_size, pipe.default_steps, pipe.kind);
                    *self.models.slot_mut(slot) = Some(pipe);
                    self.set_state(slot, ModelState::Ready { name, default_size, default_steps, kind });
                    if !config.loras(slot).is_empty() {
                        self.apply_loras(slot);
                    }
                }
                // Parked from the start: checked, reloaded when a job needs it.
                Ok(None) => {
                    let files = &self.files[&slot];
                    let state = ModelState::Ready {
                        name: files.name.clone(),
                        default_size: files.default_size,
                        default_steps: files.default_steps.unwrap_or_else(|| ModelKind::from_shift(files.shift).default_steps()),
                        kind: ModelKind::from_shift(files.shift),
                    };
                    self.set_state(slot, state);
                }
                Err(e) => self.set_state(slot, ModelState::Failed(one_line(&e.to_string()))),
            }
        }
        self.read_ahead_parked();
        self.report_memory();
    }

    /// A DiT parked from the start has never been read: its first load (the
    /// first refine, 12 GB for the real Base) would come from the disk. Its
    /// files are read ahead into the page cache, in the background, when the
    /// host has the memory to keep them (page cache is given back under
    /// pressure, so this only spends disk time the user is not waiting for).
    fn read_ahead_parked(&mut self) {
        self.read_ahead.clear();
        for slot in [ModelSlot::Turbo, ModelSlot::Base] {
            let Some((files, _)) = self.parked.get(&slot) else { continue };
            let paths = files.dit.files.clone();
            let bytes: u64 = paths.iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum();
            if zimage_engine::device::host_available_memory().is_some_and(|free| free > bytes * 2) {
                // Seconds of reading for the real models: off the engine thread.
                let spawned = std::thread::Builder::new().name("zimage-read-ahead".into()).spawn(move || {
                    zimage_engine::weights::read_ahead(&paths);
                });
                if spawned.is_ok() {
                    self.read_ahead.push(slot);
                }
            }
        }
    }

    /// Locates and checks `slot`'s files and finds (or adds) its text encoder.
    fn check_one(&mut self, slot: ModelSlot, arg: &str) -> zimage_engine::Result<()> {
        let files = loader::locate_model(arg, &ModelOverrides::default())?;
        let plan = loader::plan_model::<B>(&files, &self.device)?;
        let index = match self.encoders.iter().position(|e| same_text_files(&e.files, &files)) {
            Some(i) => i,
            None => {
                self.encoders.push(Encoder {
                    key: text_files_key(&files),
                    files: files.clone(),
                    text: None,
                    tokenizer: None,
                    params: plan.text_encoder_params,
                });
                self.encoders.len() - 1
            }
        };
        self.encoder_of.insert(slot, index);
        self.files.insert(slot, files);
        self.plans.insert(slot, plan);
        Ok(())
    }

    /// Drops `slot`'s DiT, keeping what reloads it (a no-op when it is not resident).
    fn park(&mut self, slot: ModelSlot) {
        // Unknown files: it could not be reloaded, so it stays.
        let Some(files) = self.files.get(&slot).cloned() else { return };
        let Some(pipe) = self.models.slot_mut(slot).take() else { return };
        let comps = components_of(&pipe);
        self.loras.remove(&slot);
        drop(pipe);
        // GPU backends pool freed memory; hand it back so the next model fits.
        B::memory_cleanup(&self.device);
        self.parked.insert(slot, (files, comps));
    }

    /// Reloads a parked DiT from its files (memory-mapped: from the page
    /// cache when recently used) and re-applies its LoRAs.
    fn unpark(&mut self, slot: ModelSlot) {
        let Some((files, comps)) = self.parked.remove(&slot) else { return };
        // Loaded now: what was read ahead has served.
        self.read_ahead.retain(|s| *s != slot);
        self.out.emit(Event::Model { slot, state: ModelState::Loading { stage: "diffusion transformer (parked)".into() } });
        let start = Instant::now();
        match loader::load_pipeline_with::<B>(&files, &comps, &self.device, self.dtype, &mut |_, _, _| {}) {
            Ok(pipe) => {
                self.unpark_time.insert(slot, start.elapsed());
                let state = ModelState::Ready {
                    name: pipe.name.clone(),
                    default_size: pipe.default_size,
                    default_steps: pipe.default_steps,
                    kind: pipe.kind,
                };
                *self.models.slot_mut(slot) = Some(pipe);
                self.set_state(slot, state);
                if !self.config.loras(slot).is_empty() {
                    self.apply_loras(slot);
                }
            }
            Err(e) => self.set_state(slot, ModelState::Failed(one_line(&e.to_string()))),
        }
    }

    /// Makes the configured LoRAs of `slot` the applied set: unusable files
    /// are reported and left out, the rest applied; a set that does not fit
    /// the model leaves it without LoRAs. Reports what is applied.
    fn apply_loras(&mut self, slot: ModelSlot) {
        let Some(pipe) = self.models.get_mut(slot) else { return };
        let mut state = LoraState::default();
        let mut problems = Vec::new();
        let mut files = Vec::new();
        for choice in self.config.loras(slot) {
            match LoraFile::open(&choice.path) {
                Ok(file) => {
                    state.warnings.extend(lora::compatibility_warnings(&file, pipe.kind));
                    files.push((file, choice.strength));
                }
                Err(e) => problems.push(one_line(&e.to_string())),
            }
        }
        let (applied, refs) = self.loras.entry(slot).or_insert_with(|| (AppliedLoras::new(), Vec::new()));
        let pairs: Vec<(&LoraFile, f32)> = files.iter().map(|(f, s)| (f, *s)).collect();
        match applied.apply(&mut pipe.dit, &pairs) {
            Ok(()) => {
                state.applied = files
                    .iter()
                    .map(|(f, s)| LoraRef { name: f.name.clone(), strength: *s, hash: lora::short_hash(&f.path).ok() })
                    .collect();
            }
            Err(e) => {
                applied.clear(&mut pipe.dit);
                problems.push(one_line(&e.to_string()));
            }
        }
        *refs = state.applied.clone();
        if !problems.is_empty() {
            state.error = Some(problems.join("; "));
        }
        self.out.emit(Event::Loras { slot, state });
    }

    /// Loads `slot` as the plan says: its shared components unless an
    /// earlier model has the same files, the text encoder unless the plan
    /// releases it, and its DiT, or (one DiT at a time, another resident)
    /// nothing: `None`, parked.
    fn load_one(
        &mut self,
        slot: ModelSlot,
        shared: &mut Option<(ModelFiles, SharedComponents<B>)>,
    ) -> zimage_engine::Result<Option<ZImagePipeline<B>>> {
        let files = self.files[&slot].clone();
        let index = self.encoder_of[&slot];
        let reuse = matches!(shared, Some((f, _)) if same_shared_files(f, &files));
        let out = &self.out;
        // Each stage's bytes in the compute dtype, as the loader counts them.
        let plan = self.plans.get(&slot);
        let dtype_bytes = self.dtype.size() as u64;
        let total = |stage: LoadStage| {
            plan.map_or(0, |p| match stage {
                LoadStage::TextEncoder => p.text_encoder_params,
                LoadStage::Dit => p.dit_params,
                LoadStage::Vae => p.vae_params,
            }) * dtype_bytes
        };
        let mut last = None;
        let mut progress = |stage: LoadStage, _n: usize, bytes: u64| {
            let (text, step) = loading_stage(stage, bytes, total(stage));
            if last != Some((stage, step)) {
                last = Some((stage, step));
                out.emit(Event::Model { slot, state: ModelState::Loading { stage: text } });
            }
        };
        let with_text = !self.plan.plan.releases_text_encoder() && self.encoders[index].text.is_none();
        if !reuse {
            // VAE encoder included: the Base refine is img2img.
            let mut comps =
                loader::load_shared_with::<B>(&files, &self.device, self.dtype, true, with_text, &mut progress)?;
            if let Some(text) = comps.text.take() {
                self.encoders[index].text = Some(text);
                self.text_encoder_loads += 1;
            }
            *shared = Some((files.clone(), comps));
        }
        let comps = &shared.as_ref().expect("shared components were just loaded").1;
        let other_resident = [ModelSlot::Turbo, ModelSlot::Base].into_iter().any(|s| s != slot && self.models.get(s).is_some());
        if self.plan.plan.one_dit() && other_resident {
            self.parked.insert(slot, (files, bare(comps)));
            return Ok(None);
        }
        loader::load_pipeline_with::<B>(&files, comps, &self.device, self.dtype, &mut progress).map(Some)
    }
}

/// A panic's message in one line.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    one_line(&zimage_engine::error::panic_message(payload))
}

/// A pipeline's shared components without the text encoder (the worker keeps those).
fn components_of<B: Backend>(pipe: &ZImagePipeline<B>) -> SharedComponents<B> {
    SharedComponents {
        text: None,
        text_dim: pipe.dit_config.cap_feat_dim,
        vae: pipe.vae.clone(),
        vae_scale: pipe.vae_scale,
        preview: pipe.preview.clone(),
    }
}

fn bare<B: Backend>(c: &SharedComponents<B>) -> SharedComponents<B> {
    SharedComponents { text: None, text_dim: c.text_dim, vae: c.vae.clone(), vae_scale: c.vae_scale, preview: c.preview.clone() }
}

fn canon(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
}

fn canon_all(v: &[PathBuf]) -> Vec<PathBuf> {
    v.iter().map(|p| canon(p)).collect()
}

/// Components smaller than this load too fast for a percentage to help.
const LOAD_PERCENT_FROM_BYTES: u64 = 64 << 20;

/// What a model's loading stage says, and which 5 % step it is at (a new
/// step is worth an event; the bytes of every tensor are not): "diffusion
/// transformer 45%" while a large component streams in, its name alone for a
/// small one or an unknown size.
fn loading_stage(stage: LoadStage, bytes: u64, total: u64) -> (String, u64) {
    let name = match stage {
        LoadStage::TextEncoder => "text encoder",
        LoadStage::Dit => "diffusion transformer",
        LoadStage::Vae => "VAE",
    };
    if total < LOAD_PERCENT_FROM_BYTES {
        return (name.into(), 0);
    }
    let percent = (bytes.saturating_mul(100) / total).min(100);
    let step = percent / 5;
    (format!("{name} {}%", step * 5), step)
}

/// Whether two models use the same tokenizer and text-encoder files: the
/// prompt cache's identity, so sharing an encoder and sharing cached prompts
/// cannot disagree.
fn same_text_files(a: &ModelFiles, b: &ModelFiles) -> bool {
    text_files_key(a) == text_files_key(b)
}

/// Whether two models use the same tokenizer, text encoder and VAE files.
fn same_shared_files(a: &ModelFiles, b: &ModelFiles) -> bool {
    same_text_files(a, b) && canon_all(&a.vae.files) == canon_all(&b.vae.files)
}

/// The identity of a model's tokenizer + text-encoder files (the prompt cache's key).
fn text_files_key(files: &ModelFiles) -> String {
    std::iter::once(canon(&files.tokenizer))
        .chain(canon_all(&files.text_encoder.files))
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

enum JobEnd {
    Cancelled,
    Error(String),
}

fn engine_err(e: EngineError) -> JobEnd {
    match e {
        EngineError::Cancelled => JobEnd::Cancelled,
        other => JobEnd::Error(one_line(&other.to_string())),
    }
}

/// A job's conditioning and how far it got: a new job has no paused run and
/// no time spent yet.
struct JobRun<B: Backend> {
    cond: Conditioning<B>,
    /// Every prompt came from the cache.
    cached: bool,
    paused: Option<PausedRun<B>>,
    /// Time spent on the job before this stretch (without the pauses), and
    /// in its sampler.
    elapsed: Duration,
    sampling: Duration,
}

/// What [`run_pipeline`] needs to know about the job besides its state.
struct JobContext<'a> {
    id: JobId,
    spec: &'a JobSpec,
    /// When this stretch of the job started.
    start: Instant,
    loras: Vec<LoraRef>,
    /// The models whose live jobs pause this one.
    pausable_for: Vec<ModelSlot>,
    /// The models whose live jobs pause this one when the rest of it takes
    /// longer than [`swap_is_worth_it`] allows and this stretch has run as long
    /// as the swap costs, with the cost of the swap.
    swap_for: Vec<(ModelSlot, Duration)>,
}

/// Pausing a job for a live image of the parked model reloads that model and
/// later this job's: worth it when the job still needs over twice that long
/// (the live image then waits at most a third of what it would otherwise).
fn swap_is_worth_it(remaining: Duration, swap: Duration) -> bool {
    remaining > swap * 2
}

/// Samples (from the start or on from a pause) and reports the image; a
/// job paused for a live one comes back to be resumed later.
fn run_pipeline<B: Backend>(
    pipe: &ZImagePipeline<B>,
    mut run: JobRun<B>,
    ctx: JobContext,
    counter: Option<&PromptTokenizer>,
    queue: &mut Queue,
    out: &Emitter,
    rx: &Receiver<Command>,
) -> Result<Option<JobRun<B>>, JobEnd> {
    let JobContext { id, spec, start, loras, pausable_for, swap_for } = ctx;
    let req = &spec.request;
    let running = (id, spec.kind);
    let sample_start = Instant::now();
    let mut steps = 0usize;
    // Steps done before this stretch (a resumed job reports from where it paused).
    let mut done_before: Option<usize> = None;
    let mut told_live: Option<(JobId, LiveWait)> = None;
    let mut on_step = |p: &StepProgress| -> StepControl {
        steps = p.done;
        let before = *done_before.get_or_insert(p.done.saturating_sub(1));
        out.emit(Event::Progress { id, done: p.done, total: p.total, preview: p.previews.first().cloned() });
        let disconnected = drain(rx, queue, out, Some(running));
        if disconnected || queue.cancel_running || queue.shutdown {
            return StepControl::Cancel;
        }
        if let Some(tokenizer) = counter {
            if let Some(prompt) = queue.count.take() {
                if let Ok(tokens) = tokenizer.count(&prompt) {
                    out.emit(Event::PromptCount { prompt, tokens });
                }
            }
        }
        let Some((live_id, live)) = queue.live.as_ref().map(|(l, live)| (*l, live.slot)).filter(|_| p.done < p.total)
        else {
            return StepControl::Continue;
        };
        // The time per step of this stretch, for the time the job still needs.
        let per_step = sample_start.elapsed() / (p.done - before).max(1) as u32;
        let remaining = per_step * (p.total - p.done) as u32;
        let swap = swap_for.iter().find(|(s, _)| *s == live).map(|(_, cost)| *cost);
        // And only once this stretch has run as long as a swap costs: typing
        // in bursts would otherwise spend its pauses reloading models.
        let ran = sample_start.elapsed();
        let worth_swapping = swap.is_some_and(|cost| ran >= cost && swap_is_worth_it(remaining, cost));
        if pausable_for.contains(&live) || worth_swapping {
            return StepControl::Pause;
        }
        // Said once per live job and reason, so the app need not guess the rule.
        let until = if swap.is_some() { LiveWait::Swap } else { LiveWait::JobEnd };
        if told_live != Some((live_id, until)) {
            told_live = Some((live_id, until));
            out.emit(Event::LiveWaits { id: live_id, behind: id, until });
        }
        StepControl::Continue
    };
    let generated = match pipe.generate_from(req, &run.cond, run.paused.take(), true, &mut on_step).map_err(engine_err)? {
        Generation::Finished(generated) => generated,
        Generation::Paused(paused) => {
            run.paused = Some(paused);
            run.elapsed += start.elapsed();
            run.sampling += sample_start.elapsed();
            return Ok(Some(run));
        }
    };
    let per_step = (run.sampling + sample_start.elapsed()) / steps.max(1) as u32;
    let image =
        generated.images.into_iter().next().ok_or_else(|| JobEnd::Error("the engine returned no image".into()))?;
    out.emit(Event::Finished {
        id,
        image,
        elapsed: run.elapsed + start.elapsed(),
        per_step,
        conditioning_cached: run.cached,
        model: pipe.name.clone(),
        shift: pipe.shift,
        loras,
    });
    Ok(None)
}

/// Takes all waiting commands. Returns true when the UI side is gone.
fn drain(rx: &Receiver<Command>, queue: &mut Queue, out: &Emitter, running: Option<(JobId, JobKind)>) -> bool {
    loop {
        match rx.try_recv() {
            Ok(cmd) => handle(queue, out, cmd, running),
            Err(TryRecvError::Empty) => return false,
            Err(TryRecvError::Disconnected) => {
                queue.shutdown = true;
                return true;
            }
        }
    }
}

fn handle(queue: &mut Queue, out: &Emitter, cmd: Command, running: Option<(JobId, JobKind)>) {
    match cmd {
        Command::Submit { id, spec } => {
            if spec.kind == JobKind::Live {
                if let Some((old, _)) = queue.live.take() {
                    out.emit(Event::Cancelled { id: old, superseded: true });
                }
                if matches!(running, Some((_, JobKind::Live))) {
                    queue.cancel_running = true;
                    queue.superseded = true;
                }
                queue.live = Some((id, spec));
            } else {
                queue.jobs.push_back((id, spec));
            }
        }
        Command::Cancel(id) => {
            if matches!(running, Some((r, _)) if r == id) {
                queue.cancel_running = true;
            } else if matches!(&queue.live, Some((l, _)) if *l == id) {
                queue.live = None;
                out.emit(Event::Cancelled { id, superseded: false });
            } else if queue.paused == Some(id) {
                queue.paused = None;
                out.emit(Event::Cancelled { id, superseded: false });
            } else if let Some(pos) = queue.jobs.iter().position(|(j, _)| *j == id) {
                queue.jobs.remove(pos);
                out.emit(Event::Cancelled { id, superseded: false });
            }
        }
        Command::LoadModels(config) => queue.load = Some(config),
        Command::CountTokens(prompt) => queue.count = Some(prompt),
        Command::InjectPanic => queue.inject_panic = true,
        Command::InjectLoadPanic => queue.inject_load_panic = true,
        Command::Shutdown => {
            queue.shutdown = true;
            queue.cancel_running = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn fixture(name: &str) -> String {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name).display().to_string()
    }

    fn engine() -> (EngineHandle, Arc<AtomicUsize>) {
        let wakes = Arc::new(AtomicUsize::new(0));
        let w = wakes.clone();
        let mut h = EngineHandle::spawn(Arc::new(move || {
            w.fetch_add(1, Ordering::Relaxed);
        }));
        h.load_models(ModelConfig {
            turbo: Some(fixture("tiny-turbo")),
            base: Some(fixture("tiny-base")),
            ..Default::default()
        });
        (h, wakes)
    }

    fn request(prompt: &str, kind: ModelKind) -> GenerateRequest {
        let mut r = GenerateRequest::new(prompt, kind);
        r.width = 64;
        r.height = 64;
        r.seed = 7;
        r
    }

    /// Polls until `done` says stop; panics after 60 s.
    fn collect(h: &mut EngineHandle, mut done: impl FnMut(&[Event]) -> bool) -> Vec<Event> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut all = Vec::new();
        while !done(&all) {
            assert!(Instant::now() < deadline, "timed out; events so far: {all:?}");
            all.extend(h.poll());
            std::thread::sleep(Duration::from_millis(2));
        }
        all
    }

    /// Events until job `id` ends and, when it finished, the memory report
    /// that follows its Finished event (possibly in a later poll).
    fn collect_job_and_report(h: &mut EngineHandle, id: JobId) -> Vec<Event> {
        collect(h, |e| {
            let done = e.iter().position(|e| matches!(e, Event::Finished { id: i, .. } if *i == id));
            done.is_some_and(|d| e[d..].iter().any(|e| matches!(e, Event::Memory(_))))
                || e.iter().any(|e| matches!(e, Event::Failed { id: i, .. } | Event::Cancelled { id: i, .. } if *i == id))
        })
    }

    fn finished(evs: &[Event], id: JobId) -> bool {
        evs.iter().any(|e| matches!(e, Event::Finished { id: i, .. } | Event::Failed { id: i, .. } | Event::Cancelled { id: i, .. } if *i == id))
    }

    #[test]
    fn live_job_produces_previews_and_an_image_and_wakes_the_ui() {
        let (mut h, wakes) = engine();
        let id = h.submit(JobSpec {
            kind: JobKind::Live,
            slot: ModelSlot::Turbo,
            request: request("a red fox", ModelKind::Turbo),
        });
        let evs = collect(&mut h, |e| finished(e, id));
        let previews =
            evs.iter().filter(|e| matches!(e, Event::Progress { id: i, preview: Some(_), .. } if *i == id)).count();
        assert_eq!(previews, 8, "one x0 preview per Turbo step");
        let img = evs.iter().find_map(|e| match e {
            Event::Finished { image, .. } => Some(image.clone()),
            _ => None,
        });
        let img = img.unwrap_or_else(|| panic!("no image: {evs:?}"));
        assert_eq!((img.width, img.height), (64, 64));
        assert!(wakes.load(Ordering::Relaxed) >= 10);
        assert!(evs
            .iter()
            .any(|e| matches!(e, Event::Model { slot: ModelSlot::Base, state: ModelState::Ready { .. } })));
    }

    #[test]
    fn a_prompt_is_counted_without_a_job_as_a_job_counts_it() {
        let (mut h, _) = engine();
        let id = h.submit(JobSpec { kind: JobKind::Live, slot: ModelSlot::Turbo, request: request("a red fox", ModelKind::Turbo) });
        let evs = collect(&mut h, |e| finished(e, id));
        let by_job = evs.iter().find_map(|e| if let Event::PromptTokens { tokens, .. } = e { Some(*tokens) } else { None });
        // Two asks in a row: the newer replaces the one not yet answered, or both are answered in order.
        h.count_tokens("a red".into());
        h.count_tokens("a red fox".into());
        let evs = collect(&mut h, |e| e.iter().any(|e| matches!(e, Event::PromptCount { prompt, .. } if prompt == "a red fox")));
        let counts: Vec<(String, usize)> =
            evs.iter().filter_map(|e| if let Event::PromptCount { prompt, tokens } = e { Some((prompt.clone(), *tokens)) } else { None }).collect();
        assert_eq!(counts.last(), Some(&("a red fox".to_string(), by_job.expect("the job counted its prompt"))));
        assert!(counts.iter().all(|(p, _)| p == "a red" || p == "a red fox"), "{counts:?}");
    }

    /// A bigger image and many steps: a job still running when the next command arrives.
    fn slow_request(prompt: &str, kind: ModelKind) -> GenerateRequest {
        let mut slow = request(prompt, kind);
        slow.steps = 400;
        slow.width = 256;
        slow.height = 256;
        slow
    }

    #[test]
    fn a_prompt_typed_during_a_long_job_is_counted_at_its_next_step() {
        // The lowest plan too, where the text encoder is released and the
        // first count comes during the first job (its tokenizer is read then).
        for plan in [MemoryPlan::KeepAll, MemoryPlan::Lowest] {
            let (mut h, _) = engine_with(plan);
            let r =
                h.submit(JobSpec { kind: JobKind::Refine, slot: ModelSlot::Base, request: slow_request("refine me", ModelKind::Base) });
            collect(&mut h, |e| e.iter().any(|e| matches!(e, Event::Progress { id, .. } if *id == r)));
            h.count_tokens("the next prompt".into());
            let evs = collect(&mut h, |e| e.iter().any(|e| matches!(e, Event::PromptCount { .. })));
            assert!(!finished(&evs, r), "{plan:?}: counted while the job runs, not after it");
            h.cancel(r);
            collect(&mut h, |e| e.iter().any(|e| matches!(e, Event::Cancelled { id, .. } if *id == r)));
        }
    }

    #[test]
    fn new_live_job_supersedes_running_one_but_refines_are_never_dropped() {
        let (mut h, _) = engine();
        let a = h.submit(JobSpec { kind: JobKind::Live, slot: ModelSlot::Turbo, request: slow_request("first", ModelKind::Turbo) });
        collect(&mut h, |e| e.iter().any(|e| matches!(e, Event::Progress { id, .. } if *id == a)));
        let mut refine = request("refine me", ModelKind::Base);
        refine.steps = 4;
        let r = h.submit(JobSpec { kind: JobKind::Refine, slot: ModelSlot::Base, request: refine });
        let b = h.submit(JobSpec {
            kind: JobKind::Live,
            slot: ModelSlot::Turbo,
            request: request("second", ModelKind::Turbo),
        });
        let c = h.submit(JobSpec {
            kind: JobKind::Live,
            slot: ModelSlot::Turbo,
            request: request("third", ModelKind::Turbo),
        });
        let evs = collect(&mut h, |e| finished(e, a) && finished(e, b) && finished(e, c) && finished(e, r));
        assert!(evs.iter().any(|e| matches!(e, Event::Cancelled { id, superseded: true } if *id == a)), "{evs:?}");
        assert!(
            evs.iter().any(|e| matches!(e, Event::Cancelled { id, superseded: true } if *id == b)),
            "pending live job replaced: {evs:?}"
        );
        assert!(evs.iter().any(|e| matches!(e, Event::Finished { id, .. } if *id == c)));
        assert!(evs.iter().any(|e| matches!(e, Event::Finished { id, .. } if *id == r)), "refine must run: {evs:?}");
        // The running live job stopped at a step boundary, long before its 400 steps.
        let a_steps = evs.iter().filter(|e| matches!(e, Event::Progress { id, .. } if *id == a)).count();
        assert!(a_steps < 400, "{a_steps}");
        // Live before queued work: the newest live job finished before the refine started.
        let pos = |pred: &dyn Fn(&Event) -> bool| evs.iter().position(pred).unwrap_or(usize::MAX);
        assert!(
            pos(&|e| matches!(e, Event::Finished { id, .. } if *id == c))
                < pos(&|e| matches!(e, Event::Started { id } if *id == r))
        );
    }

    #[test]
    fn refine_reuses_the_turbo_prompt_encoding() {
        let (mut h, _) = engine();
        let t = h.submit(JobSpec {
            kind: JobKind::Live,
            slot: ModelSlot::Turbo,
            request: request("a lighthouse", ModelKind::Turbo),
        });
        let evs = collect(&mut h, |e| finished(e, t));
        let turbo_image = evs
            .iter()
            .find_map(|e| match e {
                Event::Finished { image, conditioning_cached, .. } => {
                    assert!(!conditioning_cached, "first encoding cannot be cached");
                    Some(image.clone())
                }
                _ => None,
            })
            .expect("turbo image");
        let mut r = request("a lighthouse", ModelKind::Base);
        r.steps = 10;
        r.guidance = 0.0; // only the positive prompt, which Turbo encoded
        r.init = Some(turbo_image);
        // Snapped: a raw 0.6f32 is 0.6000000238 in f64 and would run 7 steps.
        r.strength = crate::state::snap_strength(0.6, 10).0;
        let id = h.submit(JobSpec { kind: JobKind::Refine, slot: ModelSlot::Base, request: r });
        let evs = collect(&mut h, |e| finished(e, id));
        let progress = evs.iter().filter(|e| matches!(e, Event::Progress { id: i, .. } if *i == id)).count();
        assert_eq!(progress, 6, "strength 0.6 of 10 steps runs 6");
        assert!(
            evs.iter().any(|e| matches!(e, Event::Finished { conditioning_cached: true, .. })),
            "the Base refine should reuse the Turbo encoding: {evs:?}"
        );
    }

    #[test]
    fn engine_panic_becomes_an_error_and_the_next_job_works() {
        let (mut h, _) = engine();
        h.inject_panic();
        let bad = h.submit(JobSpec {
            kind: JobKind::Variation,
            slot: ModelSlot::Turbo,
            request: request("x", ModelKind::Turbo),
        });
        let good = h.submit(JobSpec {
            kind: JobKind::Variation,
            slot: ModelSlot::Turbo,
            request: request("y", ModelKind::Turbo),
        });
        let evs = collect(&mut h, |e| finished(e, bad) && finished(e, good));
        assert!(
            evs.iter().any(|e| matches!(e, Event::Failed { id, message } if *id == bad && message.contains("crashed"))),
            "{evs:?}"
        );
        assert!(evs.iter().any(|e| matches!(e, Event::EngineRestarted { .. })));
        assert!(evs.iter().any(|e| matches!(e, Event::Finished { id, .. } if *id == good)), "{evs:?}");
        assert_eq!(h.queued(), 0);
    }

    #[test]
    fn missing_model_is_a_clear_error_not_a_crash() {
        let mut h = EngineHandle::spawn(Arc::new(|| {}));
        h.load_models(ModelConfig { turbo: Some("/nonexistent/model".into()), ..Default::default() });
        let id =
            h.submit(JobSpec { kind: JobKind::Live, slot: ModelSlot::Turbo, request: request("x", ModelKind::Turbo) });
        let evs = collect(&mut h, |e| finished(e, id));
        assert!(evs.iter().any(|e| matches!(e, Event::Model { slot: ModelSlot::Turbo, state: ModelState::Failed(m) } if m.contains("/nonexistent/model"))), "{evs:?}");
        assert!(
            evs.iter().any(|e| matches!(e, Event::Failed { id: i, message } if *i == id && message.contains("Turbo"))),
            "{evs:?}"
        );
    }

    /// A crash while loading (out of device memory, a driver fault) leaves the
    /// engine running: each model says why, nothing reloads in a loop, and the
    /// next load works.
    #[test]
    fn a_crash_while_loading_is_said_and_not_retried_in_a_loop() {
        let (mut h, _) = engine();
        let ready = |e: &[Event], slot| e.iter().any(|e| matches!(e, Event::Model { slot: s, state: ModelState::Ready { .. } } if *s == slot));
        collect(&mut h, |e| ready(e, ModelSlot::Turbo) && ready(e, ModelSlot::Base));
        h.inject_load_panic();
        let swapped = ModelConfig { turbo: Some(fixture("tiny-base")), base: Some(fixture("tiny-turbo")), ..Default::default() };
        h.load_models(swapped);
        let failed = |e: &[Event], slot| {
            e.iter().any(|e| matches!(e, Event::Model { slot: s, state: ModelState::Failed(m) } if *s == slot && m.contains("loading crashed (injected loading fault)")))
        };
        let evs = collect(&mut h, |e| failed(e, ModelSlot::Turbo) && failed(e, ModelSlot::Base));
        assert!(!evs.iter().any(|e| matches!(e, Event::EngineRestarted { .. })), "the thread lives on: {evs:?}");
        let id = h.submit(JobSpec { kind: JobKind::Variation, slot: ModelSlot::Turbo, request: request("x", ModelKind::Turbo) });
        let evs = collect(&mut h, |e| finished(e, id));
        assert!(evs.iter().any(|e| matches!(e, Event::Failed { id: i, message } if *i == id && message.contains("could not be loaded"))), "{evs:?}");
        assert!(!evs.iter().any(|e| matches!(e, Event::Model { state: ModelState::Loading { .. }, .. })), "no reload by itself: {evs:?}");
        h.load_models(ModelConfig { turbo: Some(fixture("tiny-turbo")), base: Some(fixture("tiny-base")), ..Default::default() });
        collect(&mut h, |e| ready(e, ModelSlot::Turbo) && ready(e, ModelSlot::Base));
        let id = h.submit(JobSpec { kind: JobKind::Variation, slot: ModelSlot::Turbo, request: request("x", ModelKind::Turbo) });
        let evs = collect(&mut h, |e| finished(e, id));
        assert!(evs.iter().any(|e| matches!(e, Event::Finished { id: i, .. } if *i == id)), "{evs:?}");
    }

    /// A copy of the tiny Base whose DiT file is cut in half (its other parts linked).
    fn truncated_base(dir: &std::path::Path) -> String {
        let base = PathBuf::from(fixture("tiny-base")).canonicalize().expect("fixture");
        let copy = dir.join("broken-base");
        std::fs::create_dir_all(copy.join("transformer")).expect("dir");
        for part in ["text_encoder", "vae", "tokenizer", "scheduler", "model_index.json"] {
            std::os::unix::fs::symlink(base.join(part).canonicalize().expect("part"), copy.join(part)).expect("link");
        }
        let dit = base.join("transformer");
        std::fs::copy(dit.join("config.json"), copy.join("transformer/config.json")).expect("config");
        let bytes = std::fs::read(dit.join("diffusion_pytorch_model.safetensors")).expect("weights");
        std::fs::write(copy.join("transformer/diffusion_pytorch_model.safetensors"), &bytes[..bytes.len() / 2]).expect("cut");
        copy.display().to_string()
    }

    #[test]
    fn a_broken_model_does_not_replace_a_working_one() {
        let (mut h, _) = engine();
        let ready = |e: &[Event], slot| e.iter().any(|e| matches!(e, Event::Model { slot: s, state: ModelState::Ready { .. } } if *s == slot));
        collect(&mut h, |e| ready(e, ModelSlot::Turbo) && ready(e, ModelSlot::Base));
        let dir = tempfile::tempdir().expect("tempdir");
        let broken = truncated_base(dir.path());
        h.load_models(ModelConfig { turbo: Some("/nonexistent/model".into()), base: Some(broken.clone()), ..Default::default() });
        let rejected = |e: &[Event], slot| e.iter().any(|e| matches!(e, Event::ModelRejected { slot: s, .. } if *s == slot));
        let evs = collect(&mut h, |e| rejected(e, ModelSlot::Turbo) && rejected(e, ModelSlot::Base));
        for e in &evs {
            match e {
                Event::ModelRejected { slot: ModelSlot::Turbo, model, message, kept } => {
                    assert_eq!(model, "/nonexistent/model");
                    assert!(message.contains("/nonexistent/model") && !message.contains('\n'), "{message}");
                    assert_eq!(kept.as_deref(), Some(fixture("tiny-turbo").as_str()));
                }
                Event::ModelRejected { slot: ModelSlot::Base, model, message, .. } => {
                    assert_eq!(model, &broken);
                    assert!(message.contains("truncated"), "{message}");
                }
                Event::Model { .. } => panic!("the working models must stay as they are: {evs:?}"),
                _ => {}
            }
        }
        // Both still draw.
        for (slot, kind) in [(ModelSlot::Turbo, ModelKind::Turbo), (ModelSlot::Base, ModelKind::Base)] {
            let id = h.submit(JobSpec { kind: JobKind::Variation, slot, request: request("a red fox", kind) });
            let evs = collect(&mut h, |e| finished(e, id));
            assert!(evs.iter().any(|e| matches!(e, Event::Finished { id: i, .. } if *i == id)), "{evs:?}");
        }
    }

    #[test]
    fn loras_apply_change_and_come_off_without_reloading_the_model() {
        let (mut h, _) = engine();
        let lora = PathBuf::from(fixture("lora")).join("tiny_turbo_lora.safetensors");
        let run = |h: &mut EngineHandle| {
            let id = h.submit(JobSpec {
                kind: JobKind::Variation,
                slot: ModelSlot::Turbo,
                request: request("a red fox", ModelKind::Turbo),
            });
            let evs = collect(h, |e| finished(e, id));
            evs.into_iter()
                .find_map(|e| match e {
                    Event::Finished { image, loras, .. } => Some((image.pixels, loras)),
                    _ => None,
                })
                .expect("an image")
        };
        let (plain, none) = run(&mut h);
        assert!(none.is_empty());
        let with = |strength: f32, extra: Option<&str>| {
            let mut loras = vec![LoraChoice { path: lora.clone(), strength }];
            if let Some(p) = extra {
                loras.push(LoraChoice { path: p.into(), strength: 1.0 });
            }
            ModelConfig {
                turbo: Some(fixture("tiny-turbo")),
                base: Some(fixture("tiny-base")),
                turbo_loras: loras,
                ..Default::default()
            }
        };
        h.load_models(with(0.8, Some("/nonexistent/style.safetensors")));
        let evs = collect(&mut h, |e| e.iter().any(|e| matches!(e, Event::Loras { .. })));
        assert!(
            !evs.iter().any(|e| matches!(e, Event::Model { .. })),
            "a LoRA change must not reload the model: {evs:?}"
        );
        let state = evs.iter().find_map(|e| match e {
            Event::Loras { slot: ModelSlot::Turbo, state } => Some(state.clone()),
            _ => None,
        });
        let state = state.expect("LoRA state");
        assert_eq!(state.applied.len(), 1, "the good file is applied: {state:?}");
        assert_eq!(state.applied[0].name, "tiny_turbo_lora");
        assert_eq!(state.applied[0].hash.as_ref().map(String::len), Some(12));
        assert!(
            state.error.as_deref().is_some_and(|e| e.contains("/nonexistent/style.safetensors") && !e.contains('\n')),
            "{state:?}"
        );
        let (styled, refs) = run(&mut h);
        assert_ne!(styled, plain, "the LoRA changes the image");
        assert_eq!(refs, state.applied, "the image records the LoRAs it was made with");
        // Removing them restores the model exactly.
        h.load_models(ModelConfig {
            turbo: Some(fixture("tiny-turbo")),
            base: Some(fixture("tiny-base")),
            ..Default::default()
        });
        collect(&mut h, |e| e.iter().any(|e| matches!(e, Event::Loras { state, .. } if state.applied.is_empty())));
        assert_eq!(run(&mut h).0, plain);
    }

    #[test]
    fn a_missing_device_is_reported_and_the_engine_runs_on_the_cpu() {
        let wanted = if cfg!(feature = "cuda") { DeviceKind::Wgpu } else { DeviceKind::Cuda };
        if wanted.compiled_in() {
            return; // a GPU build: the missing-device path is not reachable this way
        }
        let mut h = EngineHandle::spawn_on(Some(wanted), Arc::new(|| {}));
        h.load_models(ModelConfig { turbo: Some(fixture("tiny-turbo")), ..Default::default() });
        let id = h.submit(JobSpec { kind: JobKind::Live, slot: ModelSlot::Turbo, request: request("x", ModelKind::Turbo) });
        let evs = collect(&mut h, |e| finished(e, id));
        let device = evs.iter().find_map(|e| match e {
            Event::Device { name, problem } => Some((name.clone(), problem.clone())),
            _ => None,
        });
        let (name, problem) = device.expect("a Device event");
        assert_eq!(name, "CPU");
        let problem = problem.expect("says why");
        assert!(problem.contains("no") && problem.contains("support") && problem.ends_with("running on the CPU"), "{problem}");
        assert!(evs.iter().any(|e| matches!(e, Event::Finished { id: i, .. } if *i == id)), "{evs:?}");
        // Auto on a CPU-only build: the CPU, no complaint.
        let mut h = EngineHandle::spawn_on(None, Arc::new(|| {}));
        let evs = collect(&mut h, |e| e.iter().any(|e| matches!(e, Event::Device { .. })));
        assert!(evs.iter().any(|e| matches!(e, Event::Device { problem: None, .. })), "{evs:?}");
    }

    #[test]
    fn one_dit_at_a_time_parks_the_idle_model_and_images_are_unchanged() {
        let run = |h: &mut EngineHandle, slot: ModelSlot| {
            let kind = if slot == ModelSlot::Base { ModelKind::Base } else { ModelKind::Turbo };
            let mut r = request("a lighthouse", kind);
            r.steps = 3;
            let id = h.submit(JobSpec { kind: JobKind::Variation, slot, request: r });
            let evs = collect_job_and_report(h, id);
            let image = evs.iter().find_map(|e| match e {
                Event::Finished { image, .. } => Some(image.pixels.clone()),
                _ => None,
            });
            let memory = evs.iter().rev().find_map(|e| match e {
                Event::Memory(m) => Some(m.clone()),
                _ => None,
            });
            (image.unwrap_or_else(|| panic!("{evs:?}")), memory.expect("a memory report after the job"))
        };
        let (mut both, _) = engine();
        let (turbo_ref, _) = run(&mut both, ModelSlot::Turbo);
        let (base_ref, m) = run(&mut both, ModelSlot::Base);
        assert!(m.parked.is_empty());

        let config = ModelConfig { turbo: Some(fixture("tiny-turbo")), base: Some(fixture("tiny-base")), memory_plan: MemoryPlan::OneDitAtATime, ..Default::default() };
        let mut h = EngineHandle::spawn(Arc::new(|| {}));
        h.load_models(config.clone());
        let evs = collect(&mut h, |e| e.iter().any(|e| matches!(e, Event::Memory(_))));
        let loaded = evs.iter().find_map(|e| if let Event::Memory(m) = e { Some(m.clone()) } else { None }).expect("memory report");
        assert_eq!(loaded.parked, ["Base DiT"], "{loaded:?}");
        assert!(!loaded.resident.iter().any(|(n, _)| n == "Base DiT"));
        let (base, m) = run(&mut h, ModelSlot::Base);
        assert_eq!(base, base_ref, "a reloaded Base draws the same image");
        assert_eq!(m.parked, ["Turbo DiT"], "{m:?}");
        let (turbo, m) = run(&mut h, ModelSlot::Turbo);
        assert_eq!(turbo, turbo_ref);
        assert_eq!(m.parked, ["Base DiT"]);
        // Switching the plan off brings the parked model back without a full reload.
        h.load_models(ModelConfig { memory_plan: MemoryPlan::KeepAll, ..config });
        let evs = collect(&mut h, |e| e.iter().any(|e| matches!(e, Event::Memory(m) if m.parked.is_empty())));
        assert!(!evs.iter().any(|e| matches!(e, Event::Model { slot: ModelSlot::Turbo, .. })), "Turbo was not reloaded: {evs:?}");
    }

    #[test]
    fn memory_report_counts_shared_weights_once() {
        let (mut h, _) = engine();
        let evs = collect(&mut h, |e| e.iter().any(|e| matches!(e, Event::Memory(_))));
        let report = evs
            .iter()
            .find_map(|e| match e {
                Event::Memory(m) => Some(m.clone()),
                _ => None,
            })
            .expect("a memory report after loading");
        let names: Vec<&str> = report.resident.iter().map(|(n, _)| n.as_str()).collect();
        // tiny-base shares tiny-turbo's text encoder and VAE (same files): counted once.
        assert_eq!(names, ["text encoder", "VAE", "Turbo DiT", "Base DiT"], "{report:?}");
        assert!(report.resident.iter().all(|(_, b)| *b > 0 && b % 4 == 0), "f32 weights on the CPU");
        assert_eq!(report.weights_total(), report.resident.iter().map(|(_, b)| b).sum::<u64>());
        #[cfg(target_os = "linux")]
        assert!(report.process_bytes.is_some_and(|p| p > report.weights_total()));
        // No GPU allocator to ask on the CPU.
        assert_eq!(report.device_memory, None);
        // Auto on the CPU: the tiny models fit in host memory.
        assert_eq!(report.plan, MemoryPlan::KeepAll);
        assert!(report.plan_reason.starts_with("Auto (") && report.plan_reason.ends_with("host memory available): keep everything"), "{}", report.plan_reason);
        assert!(report.estimated_peak > report.weights_total());
        assert!(report.released.is_empty() && report.parked.is_empty());
        assert_eq!(report.text_encoder_loads, 1, "one shared text encoder, loaded once");
    }

    /// Runs one 3-step job; its image, whether its conditioning came from the
    /// cache, and the memory report after it.
    fn run_job(h: &mut EngineHandle, slot: ModelSlot, prompt: &str, seed: u64) -> (Vec<u8>, bool, MemoryReport) {
        let mut r = request(prompt, slot.kind());
        r.steps = 3;
        r.seed = seed;
        let id = h.submit(JobSpec { kind: JobKind::Variation, slot, request: r });
        let evs = collect_job_and_report(h, id);
        let (image, cached) = evs
            .iter()
            .find_map(|e| match e {
                Event::Finished { image, conditioning_cached, .. } => Some((image.pixels.clone(), *conditioning_cached)),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{evs:?}"));
        let memory = evs.iter().rev().find_map(|e| if let Event::Memory(m) = e { Some(m.clone()) } else { None });
        (image, cached, memory.expect("a memory report after the job"))
    }

    fn engine_with(plan: MemoryPlan) -> (EngineHandle, MemoryReport) {
        let mut h = EngineHandle::spawn(Arc::new(|| {}));
        h.load_models(ModelConfig {
            turbo: Some(fixture("tiny-turbo")),
            base: Some(fixture("tiny-base")),
            memory_plan: plan,
            ..Default::default()
        });
        let evs = collect(&mut h, |e| e.iter().any(|e| matches!(e, Event::Memory(_))));
        let m = evs.iter().find_map(|e| if let Event::Memory(m) = e { Some(m.clone()) } else { None });
        (h, m.expect("memory report"))
    }

    #[test]
    fn loading_says_how_far_a_large_component_is() {
        let gb = 1u64 << 30;
        assert_eq!(loading_stage(LoadStage::Dit, 0, 12 * gb), ("diffusion transformer 0%".to_string(), 0));
        assert_eq!(loading_stage(LoadStage::Dit, 5_500 * (gb / 1000), 12 * gb).0, "diffusion transformer 45%");
        assert_eq!(loading_stage(LoadStage::TextEncoder, 8 * gb, 8 * gb), ("text encoder 100%".to_string(), 20));
        // Never past 100 %; small or unknown components by name only.
        assert_eq!(loading_stage(LoadStage::Dit, 20 * gb, 12 * gb).0, "diffusion transformer 100%");
        assert_eq!(loading_stage(LoadStage::Vae, 1 << 20, 2 << 20), ("VAE".to_string(), 0));
        assert_eq!(loading_stage(LoadStage::Dit, 1 << 30, 0), ("diffusion transformer".to_string(), 0));
        // One event per 5 % step: 21 for a whole component, however many tensors.
        let steps: std::collections::BTreeSet<u64> = (0..=1000u64).map(|i| loading_stage(LoadStage::Dit, i * gb / 100, 10 * gb).1).collect();
        assert_eq!(steps.len(), 21);
    }

    #[test]
    fn every_job_reports_its_prompt_length_in_tokens_in_every_plan() {
        for plan in [MemoryPlan::KeepAll, MemoryPlan::Lowest] {
            let (mut h, _) = engine_with(plan);
            let short = h.submit(JobSpec { kind: JobKind::Live, slot: ModelSlot::Turbo, request: request("a cat", ModelKind::Turbo) });
            let long = h.submit(JobSpec {
                kind: JobKind::Refine,
                slot: ModelSlot::Base,
                request: request(&"a cat on a mat ".repeat(100), ModelKind::Base),
            });
            let evs = collect(&mut h, |e| finished(e, short) && finished(e, long));
            let tokens = |id: JobId| {
                evs.iter().find_map(|e| match e {
                    Event::PromptTokens { id: i, tokens } if *i == id => Some(*tokens),
                    _ => None,
                })
            };
            let (short, long) = (tokens(short).expect("counted"), tokens(long).expect("counted"));
            assert!(short > 2 && short < 40, "{plan:?}: {short}");
            assert!(long > 512, "{plan:?}: {long} (past the 512 the model reads)");
        }
    }

    #[test]
    fn lowest_plan_releases_the_text_encoder_after_encoding_and_images_are_unchanged() {
        let (mut all, m) = engine_with(MemoryPlan::KeepAll);
        assert_eq!((m.plan, m.plan_reason.as_str()), (MemoryPlan::KeepAll, "Keep everything (chosen in Settings)"));
        let turbo_ref = run_job(&mut all, ModelSlot::Turbo, "a lighthouse", 7).0;
        let base_ref = run_job(&mut all, ModelSlot::Base, "a lighthouse", 7).0;
        let fox_ref = run_job(&mut all, ModelSlot::Turbo, "a red fox", 7).0;

        let (mut h, m) = engine_with(MemoryPlan::Lowest);
        assert_eq!(m.plan, MemoryPlan::Lowest);
        assert_eq!(m.released, ["text encoder"], "checked, never loaded: {m:?}");
        assert_eq!(m.parked, ["Base DiT"]);
        assert!(!m.resident.iter().any(|(n, _)| n.contains("text encoder")), "{m:?}");
        assert_eq!(m.text_encoder_loads, 0);

        let (image, cached, m) = run_job(&mut h, ModelSlot::Turbo, "a lighthouse", 7);
        assert_eq!(image, turbo_ref, "same image as with everything resident");
        assert!(!cached);
        assert_eq!((m.text_encoder_loads, m.prompts_encoded), (1, 1));
        assert_eq!(m.released, ["text encoder"], "dropped after encoding: {m:?}");
        assert!(m.resident.iter().any(|(n, _)| n == "Turbo DiT"), "the DiT is back: {m:?}");

        // Same prompt, another seed: from the cache, no encoder.
        let (_, cached, m) = run_job(&mut h, ModelSlot::Turbo, "a lighthouse", 8);
        assert!(cached);
        assert_eq!((m.text_encoder_loads, m.prompts_encoded), (1, 1));

        // Base shares the text encoder: its positive prompt is cached, only
        // the negative prompt (CFG) is new.
        let (image, cached, m) = run_job(&mut h, ModelSlot::Base, "a lighthouse", 7);
        assert_eq!(image, base_ref);
        assert!(!cached);
        assert_eq!((m.text_encoder_loads, m.prompts_encoded), (2, 2));
        assert_eq!(m.parked, ["Turbo DiT"]);

        // A new prompt reloads it, and the image is still the same.
        let (image, _, m) = run_job(&mut h, ModelSlot::Turbo, "a red fox", 7);
        assert_eq!(image, fox_ref);
        assert_eq!((m.text_encoder_loads, m.prompts_encoded), (3, 3));
        assert_eq!(m.released, ["text encoder"]);

        // Switching to keep everything loads it back (and the parked DiT).
        h.load_models(ModelConfig {
            turbo: Some(fixture("tiny-turbo")),
            base: Some(fixture("tiny-base")),
            memory_plan: MemoryPlan::KeepAll,
            ..Default::default()
        });
        let evs = collect(&mut h, |e| e.iter().any(|e| matches!(e, Event::Memory(m) if m.plan == MemoryPlan::KeepAll)));
        let m = evs.iter().rev().find_map(|e| if let Event::Memory(m) = e { Some(m.clone()) } else { None }).unwrap();
        assert!(m.released.is_empty() && m.parked.is_empty(), "{m:?}");
        assert_eq!(m.text_encoder_loads, 4);
    }

    #[test]
    fn repeated_prompts_never_rerun_the_text_encoder() {
        let (mut h, m) = engine_with(MemoryPlan::KeepAll);
        assert_eq!((m.text_encoder_loads, m.prompts_encoded), (1, 0));
        let (first, cached, m) = run_job(&mut h, ModelSlot::Turbo, "a lighthouse", 7);
        assert!(!cached);
        assert_eq!(m.prompts_encoded, 1);
        // Re-render, other seeds, a variation batch: no encoder run.
        for seed in [7, 8, 9] {
            let (image, cached, m) = run_job(&mut h, ModelSlot::Turbo, "a lighthouse", seed);
            assert!(cached, "seed {seed}");
            assert_eq!((m.text_encoder_loads, m.prompts_encoded), (1, 1));
            if seed == 7 {
                assert_eq!(image, first, "a cached encoding draws the same image");
            }
        }
        // The exact text is the key: one more character is a new prompt.
        let (_, cached, m) = run_job(&mut h, ModelSlot::Turbo, "a lighthouse!", 7);
        assert!(!cached);
        assert_eq!(m.prompts_encoded, 2);
    }

    #[test]
    fn the_prompt_cache_drops_the_least_recently_used_entry() {
        let device = Default::default();
        let t = |v: f32| Tensor::<CpuBackend, 2>::full([1, 1], v, &device);
        let mut cache = PromptCache::<CpuBackend>::default();
        for i in 0..PromptCache::<CpuBackend>::CAPACITY {
            cache.insert("enc", &format!("p{i}"), t(i as f32));
        }
        assert!(cache.get("enc", "p0").is_some(), "p0 becomes the most recent");
        assert!(cache.get("other encoder", "p0").is_none(), "the key includes the text encoder's files");
        cache.insert("enc", "new", t(-1.0));
        assert!(cache.get("enc", "p1").is_none(), "p1 was the least recently used");
        assert!(cache.get("enc", "p0").is_some() && cache.get("enc", "new").is_some());
        assert_eq!(cache.map.len(), PromptCache::<CpuBackend>::CAPACITY);
        assert_eq!(cache.order.len(), cache.map.len());
    }

    #[test]
    fn invalid_size_is_reported_as_a_one_line_error() {
        let (mut h, _) = engine();
        let mut r = request("x", ModelKind::Turbo);
        r.width = 70;
        let id = h.submit(JobSpec { kind: JobKind::Live, slot: ModelSlot::Turbo, request: r });
        let evs = collect(&mut h, |e| finished(e, id));
        assert!(
            evs.iter().any(|e| matches!(e, Event::Failed { message, .. } if message.contains("multiple of 16"))),
            "{evs:?}"
        );
    }

    /// The image of a finished job, or a panic naming the events.
    fn image_of(evs: &[Event], id: JobId) -> Vec<u8> {
        evs.iter()
            .find_map(|e| match e {
                Event::Finished { id: i, image, .. } if *i == id => Some(image.pixels.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("job {id} did not finish: {evs:?}"))
    }

    /// The steps job `id` reported, in order.
    fn steps_of(evs: &[Event], id: JobId) -> Vec<usize> {
        evs.iter().filter_map(|e| if let Event::Progress { id: i, done, .. } = e { (*i == id).then_some(*done) } else { None }).collect()
    }

    fn position(evs: &[Event], what: &str, pred: impl Fn(&Event) -> bool) -> usize {
        evs.iter().position(pred).unwrap_or_else(|| panic!("no {what}: {evs:?}"))
    }

    /// A slow Base refine: still running when the test sends a live job.
    fn slow_refine() -> JobSpec {
        let mut r = request("a lighthouse", ModelKind::Base);
        r.steps = 300;
        (r.width, r.height) = (128, 128);
        JobSpec { kind: JobKind::Refine, slot: ModelSlot::Base, request: r }
    }

    /// Submits `spec`, waits until it has run a step, sends a live job and
    /// returns the events so far with both ids.
    fn refine_then_live(h: &mut EngineHandle, spec: JobSpec, live_steps: usize) -> (Vec<Event>, JobId, JobId) {
        let r = h.submit(spec);
        let evs = collect(h, |e| e.iter().any(|e| matches!(e, Event::Progress { id, .. } if *id == r)));
        let mut live = request("a cat", ModelKind::Turbo);
        live.steps = live_steps;
        let l = h.submit(JobSpec { kind: JobKind::Live, slot: ModelSlot::Turbo, request: live });
        (evs, r, l)
    }

    #[test]
    fn a_running_refine_pauses_for_a_live_job_and_resumes_to_the_same_image() {
        let (mut h, _) = engine();
        let alone = h.submit(slow_refine());
        let evs = collect(&mut h, |e| finished(e, alone));
        let reference = image_of(&evs, alone);
        assert!(!evs.iter().any(|e| matches!(e, Event::Paused { .. })), "nothing to pause for");

        let (mut evs, r, l) = refine_then_live(&mut h, slow_refine(), 8);
        evs.extend(collect(&mut h, |e| finished(e, r)));
        let paused = position(&evs, "pause", |e| matches!(e, Event::Paused { id } if *id == r));
        let live_started = position(&evs, "live start", |e| matches!(e, Event::Started { id } if *id == l));
        let live_done = position(&evs, "live image", |e| matches!(e, Event::Finished { id, .. } if *id == l));
        let starts: Vec<usize> = (0..evs.len()).filter(|&i| matches!(evs[i], Event::Started { id } if id == r)).collect();
        assert_eq!(starts.len(), 2, "started, then resumed once: {evs:?}");
        assert!(!evs.iter().any(|e| matches!(e, Event::LiveWaits { .. })), "paused at once: no wait to tell");
        assert!(paused < live_started && live_done < starts[1], "the live image ran inside the pause: {evs:?}");
        assert_eq!(steps_of(&evs, r), (1..=300).collect::<Vec<_>>(), "every step once, none run again");
        assert_eq!(image_of(&evs, r), reference, "the paused refine gives the image it gives without pausing");

        // A model change while paused (here the same models: a LoRA change
        // looks the same to the engine) starts the refine again from its first
        // step, and the image is still right.
        // (A long live job: the change arrives while the refine is paused.)
        let (mut evs, r, _) = refine_then_live(&mut h, slow_refine(), 300);
        evs.extend(collect(&mut h, |e| e.iter().any(|e| matches!(e, Event::Paused { id } if *id == r))));
        h.load_models(h.config.clone());
        evs.extend(collect(&mut h, |e| finished(e, r)));
        let steps = steps_of(&evs, r);
        let restart = steps.windows(2).position(|w| w[1] <= w[0]).expect("the refine started again") + 1;
        assert_eq!(steps[restart..], (1..=300).collect::<Vec<_>>(), "{steps:?}");
        assert_eq!(image_of(&evs, r), reference);
    }

    #[test]
    fn a_paused_refine_can_be_cancelled() {
        let (mut h, _) = engine();
        // A long live job, so that the refine is still paused when it is cancelled.
        let (mut evs, r, l) = refine_then_live(&mut h, slow_refine(), 300);
        evs.extend(collect(&mut h, |e| e.iter().any(|e| matches!(e, Event::Paused { id } if *id == r))));
        h.cancel(r);
        evs.extend(collect(&mut h, |e| finished(e, r) && finished(e, l)));
        let paused = position(&evs, "pause", |e| matches!(e, Event::Paused { id } if *id == r));
        assert!(evs.iter().any(|e| matches!(e, Event::Cancelled { id, superseded: false } if *id == r)), "{evs:?}");
        assert!(!evs[paused..].iter().any(|e| matches!(e, Event::Started { id } if *id == r)), "not resumed: {evs:?}");
        assert_eq!(h.queued(), 0);
        assert!(evs.iter().any(|e| matches!(e, Event::Finished { id, .. } if *id == l)));
    }

    #[test]
    fn one_dit_at_a_time_swaps_the_models_to_pause_a_long_refine_and_its_image_is_unchanged() {
        let (mut both, _) = engine();
        let alone = both.submit(slow_refine());
        let reference = image_of(&collect(&mut both, |e| finished(e, alone)), alone);

        let (mut h, _) = engine_with(MemoryPlan::OneDitAtATime);
        let (mut evs, r, l) = refine_then_live(&mut h, slow_refine(), 8);
        evs.extend(collect(&mut h, |e| finished(e, r) && finished(e, l)));
        // The swap (ms on the tiny models) is far cheaper than the rest of the refine.
        let paused = position(&evs, "pause", |e| matches!(e, Event::Paused { id } if *id == r));
        let live_done = position(&evs, "live image", |e| matches!(e, Event::Finished { id, .. } if *id == l));
        assert!(paused < live_done, "{evs:?}");
        let reloads = |slot| evs.iter().filter(|e| matches!(e, Event::Model { slot: s, state: ModelState::Loading { .. } } if *s == slot)).count();
        // Base for the refine, Turbo for the live image, Base again to resume.
        assert_eq!((reloads(ModelSlot::Turbo), reloads(ModelSlot::Base)), (1, 2));
        assert_eq!(steps_of(&evs, r), (1..=300).collect::<Vec<_>>(), "every step once");
        assert_eq!(image_of(&evs, r), reference, "parked, reloaded and resumed: the same image");
    }

    /// A model that cannot fit in the memory there is, even one large part
    /// at a time, fails to load in one line instead of getting the process
    /// killed (here a worker whose budget is 1 MB, below the tiny models' f32 weights).
    #[test]
    fn a_model_too_large_for_the_memory_fails_to_load_in_one_line() {
        let (_cmd_tx, cmd_rx) = mpsc::channel();
        let (ev_tx, ev_rx) = mpsc::channel();
        let mut worker = Worker::<CpuBackend>::new(cmd_rx, Emitter { tx: ev_tx, waker: Arc::new(|| {}) }, DeviceKind::Cpu);
        worker.budget = (Some(1_000_000), "host memory available".into());
        worker.load(ModelConfig { turbo: Some(fixture("tiny-turbo")), base: Some(fixture("tiny-base")), ..Default::default() });
        let failed: Vec<_> = ev_rx
            .try_iter()
            .filter_map(|e| match e {
                Event::Model { slot, state: ModelState::Failed(m) } => Some((slot, m)),
                _ => None,
            })
            .collect();
        assert_eq!(failed.len(), 2, "{failed:?}");
        for (slot, message) in &failed {
            assert!(message.starts_with(&format!("the {} model needs about", slot.label())), "{message}");
            assert!(message.contains("(f32, one large part at a time) but 1.0 MB is host memory available"), "{message}");
            assert!(!message.contains('\n'));
        }
        assert!(worker.models.get(ModelSlot::Turbo).is_none() && worker.models.get(ModelSlot::Base).is_none());
    }

    /// A DiT parked from the start has its files read ahead; a resident one needs none.
    #[test]
    fn a_dit_parked_from_the_start_is_read_ahead() {
        let (_, one) = engine_with(MemoryPlan::OneDitAtATime);
        assert_eq!(one.parked, ["Base DiT"]);
        assert_eq!(one.read_ahead, ["Base DiT"]);
        let (_, all) = engine_with(MemoryPlan::KeepAll);
        assert!(all.parked.is_empty() && all.read_ahead.is_empty(), "{all:?}");
    }

    #[test]
    fn the_lowest_plan_never_pauses_a_refine() {
        let (mut h, _) = engine_with(MemoryPlan::Lowest);
        let (mut evs, r, l) = refine_then_live(&mut h, slow_refine(), 8);
        evs.extend(collect(&mut h, |e| finished(e, r) && finished(e, l)));
        assert!(!evs.iter().any(|e| matches!(e, Event::Paused { .. })), "the live prompt needs the text encoder: {evs:?}");
        let refine_done = position(&evs, "refine image", |e| matches!(e, Event::Finished { id, .. } if *id == r));
        let live_started = position(&evs, "live start", |e| matches!(e, Event::Started { id } if *id == l));
        assert!(refine_done < live_started, "{evs:?}");
        // The engine says so once, so that the app can tell the user why.
        let told: Vec<_> = evs
            .iter()
            .filter_map(|e| match e {
                Event::LiveWaits { id, behind, until } => Some((*id, *behind, *until)),
                _ => None,
            })
            .collect();
        assert_eq!(told, [(l, r, LiveWait::JobEnd)], "{evs:?}");
    }

    #[test]
    fn a_swap_is_worth_it_when_the_job_still_needs_over_twice_its_time() {
        let ms = Duration::from_millis;
        assert!(swap_is_worth_it(ms(40_000), ms(3_000)));
        assert!(!swap_is_worth_it(ms(5_000), ms(3_000)));
        assert!(!swap_is_worth_it(ms(6_000), ms(3_000)), "exactly twice: not worth it");
    }
}
