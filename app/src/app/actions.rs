//! Actions the panels ask for ([`Action`]), applied to the app: generate,
//! refine, variations, restore, marks, models, start images.

use super::*;

/// Things panels ask for; applied by [`StudioApp::apply`].
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// The prompt or a generation setting changed.
    Edited,
    /// Close the window although images are still being made (asked first).
    Quit,
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
    /// Asks to clean up the history: what would go, and its size, to confirm.
    PlanCleanup,
    /// Removes these history images and their files (a confirmed clean up,
    /// or "Delete" on one image).
    RemoveImages(Vec<String>),
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

impl StudioApp {
    pub fn apply(&mut self, ctx: &egui::Context, action: Action) {
        match action {
            Action::Quit => {
                self.quit_asked = None;
                self.quit_confirmed = true;
                ctx.send_viewport_cmd(egui::ViewportCommand::Close);
            }
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
                    self.info("type a prompt first");
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
                    self.info("nothing kept to refine: K keeps a variation or the image shown, S stars it");
                }
                // A cell refined (or queued) at these very settings, e.g. with
                // Ctrl+Enter before, would give the same image again.
                let (again, kept): (Vec<String>, Vec<String>) = kept.into_iter().partition(|id| self.refined_alike(id).is_some());
                let n = kept.len();
                for id in kept {
                    if let Err(e) = self.queue_refine(&id) {
                        self.error(e);
                        return;
                    }
                }
                let plural = |n: usize| if n == 1 { "" } else { "s" };
                match (n, again.len()) {
                    (_, 0) if n > 0 => self.info(format!("queued {n} Base refine{}", plural(n))),
                    (0, m) if m > 0 => self.info(format!(
                        "the {m} kept image{} already refined at these settings: change the strength or steps to refine again",
                        if m == 1 { " is" } else { "s are" }
                    )),
                    (n, m) if n > 0 => self.info(format!(
                        "queued {n} Base refine{}; {m} kept image{} refined at these settings already",
                        plural(n),
                        if m == 1 { " was" } else { "s were" }
                    )),
                    _ => {}
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
                self.adopt_as_live(&id);
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
            Action::PlanCleanup => {
                let shown: Vec<String> = [self.current.clone(), self.image_in_view()].into_iter().flatten().collect();
                let shown: Vec<&str> = shown.iter().map(String::as_str).collect();
                let ids = self.history.cleanup_candidates(&shown);
                let bytes = self.history.disk_bytes(&ids);
                self.cleanup = Some(Cleanup { ids, bytes });
            }
            Action::RemoveImages(ids) => {
                self.cleanup = None;
                let bytes = self.history.disk_bytes(&ids);
                let ids: HashSet<String> = ids.into_iter().collect();
                let result = self.history.remove(&ids);
                self.forget_images(&ids);
                match result {
                    Ok(()) => {
                        let n = ids.len();
                        self.info(format!("removed {n} image{} from the history ({})", if n == 1 { "" } else { "s" }, state::human_bytes(bytes)));
                    }
                    Err(e) => self.error(format!("could not save the history: {}", save::one_line_error(&e))),
                }
            }
            Action::ApplyModels { turbo, base, output } => {
                let opt = |s: String| Some(crate::settings::typed_path(&s)).filter(|s| !s.is_empty());
                self.settings.turbo_model = opt(turbo);
                self.settings.base_model = opt(base);
                self.settings.output_dir = opt(output).map(PathBuf::from);
                self.cli_override = false;
                self.model_rejected.clear();
                self.reload_models();
                // No "loading" note here: the top bar's model chips show each
                // load's stage live, and a note would outlast the load.
                self.info("settings saved");
            }
            Action::UseModel { slot, model } => self.use_model(slot, crate::settings::typed_path(&model)),
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
                    self.info("a download is already running");
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
                    Ok(img) => {
                        self.set_start_image(format!("#{id}"), img);
                        // Live renders from it at once, as from a dropped sketch.
                        self.apply(ctx, Action::Edited);
                    }
                    Err(e) => self.error(format!("cannot start from #{id}: {}", save::one_line_error(&e))),
                },
                None => self.info("no image selected to start from"),
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
            .or_else(|| self.history.entries().iter().rev().find(|e| e.slot == ModelSlot::Turbo).map(|e| e.id.clone()))
    }

    /// The time the pending refines still need, each at its size and
    /// guidance, from Base's measured speed; `None` before the first Base image.
    pub fn refines_left(&self) -> Option<Duration> {
        let rate = *self.pass_rate.get(&ModelSlot::Base)?;
        Some(self.jobs.values().filter(|j| j.kind == JobKind::Refine).map(|j| j.time_left(rate)).sum())
    }

    /// What the variations not finished yet will take, from Turbo's last
    /// measured speed; `None` before one was measured or when none is left.
    pub fn variations_left(&self) -> Option<Duration> {
        let rate = *self.pass_rate.get(&ModelSlot::Turbo)?;
        let left: Duration = self
            .variations
            .iter()
            .filter(|c| c.id.is_none() && c.error.is_none())
            .filter_map(|c| self.jobs.get(&c.job?))
            .map(|j| j.time_left(rate))
            .sum();
        (!left.is_zero()).then_some(left)
    }

    /// Base steps the refine will run and what it will cost.
    pub fn refine_cost(&self) -> (usize, String) {
        let steps = self.settings.base_steps;
        let run = match self.settings.refine_mode {
            RefineMode::Img2Img => state::snap_strength(self.settings.refine_strength, steps).1,
            RefineMode::SameSeed => steps,
        };
        // Before the first Base run, from Turbo's speed (the same DiT): this
        // session's, else the one remembered for the model.
        let rate = [ModelSlot::Base, ModelSlot::Turbo].iter().find_map(|s| self.pass_rate.get(s).copied()).or(self.live_rate);
        let passes = state::dit_passes(self.settings.base_guidance);
        let per_step = rate.map(|r| state::predicted_time(r, self.settings.width, self.settings.height, passes));
        let load = match &self.memory {
            Some(m) if m.dit_parked(ModelSlot::Base) => state::BaseLoad::Parked(
                m.reload_times.iter().find(|(s, _)| *s == ModelSlot::Base).map(|(_, d)| *d),
            ),
            _ => state::BaseLoad::Resident,
        };
        (run, state::refine_estimate(run, per_step, load))
    }

    /// Why no Base refine can run now (no Base model, or one that failed to
    /// load), in one line; `None` while it is ready or loading.
    pub fn base_unavailable(&self) -> Option<String> {
        match self.models.get(&ModelSlot::Base) {
            Some(ModelState::NotConfigured) => Some("no Base model is configured: choose or download Z-Image in Settings".into()),
            Some(ModelState::Failed(_)) => Some("the Base model could not be loaded: see Settings".into()),
            _ => None,
        }
    }

    pub(super) fn refine_selected(&mut self) {
        match self.refine_source() {
            // The same settings give the same image: the one made is shown instead.
            Some(src) => match self.refined_alike(&src) {
                Some(Refined::Done(base)) => {
                    self.info(format!(
                        "#{src} is refined at these settings already (#{base}, shown beside it); change the strength or steps to refine again"
                    ));
                    self.compare_pair = Some((src, base.clone()));
                    self.selected = Some(base);
                    self.view = View::Compare;
                }
                Some(Refined::Queued) => self.info(format!("a refine of #{src} at these settings is already queued")),
                None => {
                    if let Err(e) = self.queue_refine(&src) {
                        self.error(e);
                    }
                }
            },
            None if self.live_job.is_some() => self.info("nothing to refine yet: the first Turbo image is still rendering"),
            None => self.info("nothing to refine yet: type a prompt to make a Turbo image first"),
        }
    }

    pub(super) fn queue_refine(&mut self, src: &str) -> Result<(), String> {
        if let Some(why) = self.base_unavailable() {
            return Err(why);
        }
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
            PendingJob { parent: Some(src.to_string()), ..PendingJob::new(JobKind::Refine, ModelSlot::Base, r) },
        );
        self.refine_job = Some(id);
        Ok(())
    }

    /// Whether `src` has a Base refine, finished or queued, that the refine
    /// settings as they are now would make again (the pipeline is
    /// deterministic: the same image): the same Base model and LoRAs, steps,
    /// guidance, negative prompt (with CFG) and strength (or same-seed mode).
    pub fn refined_alike(&self, src: &str) -> Option<Refined> {
        let s = &self.settings;
        let strength = (s.refine_mode == RefineMode::Img2Img).then(|| state::snap_strength(s.refine_strength, s.base_steps).0);
        let negative = if s.base_guidance > 0.0 { s.negative_prompt.as_str() } else { "" };
        let same = |steps: usize, guidance: f32, neg: &str, st: Option<f32>| {
            steps == s.base_steps && guidance == s.base_guidance && (guidance <= 0.0 || neg == negative) && st == strength
        };
        if self.jobs.values().any(|j| {
            let r = &j.request;
            j.kind == JobKind::Refine
                && j.parent.as_deref() == Some(src)
                && same(r.steps, r.guidance, &r.negative_prompt, r.init.as_ref().map(|_| r.strength))
        }) {
            return Some(Refined::Queued);
        }
        let base_name = match self.models.get(&ModelSlot::Base) {
            Some(ModelState::Ready { name, .. }) => Some(name.as_str()),
            _ => None,
        };
        let loras = self.lora_state.get(&ModelSlot::Base).map(|l| l.applied.as_slice()).unwrap_or_default();
        let done = self.history.entries().iter().rev().find(|e| {
            let m = &e.meta;
            e.slot == ModelSlot::Base
                && e.parent.as_deref() == Some(src)
                && Some(m.model.as_str()) == base_name
                && m.loras == loras
                && same(m.steps as usize, m.guidance, &m.negative_prompt, m.strength)
        });
        done.map(|e| Refined::Done(e.id.clone()))
    }

    pub(super) fn start_variations(&mut self) {
        if self.prompt.trim().is_empty() {
            self.info("type a prompt first");
            return;
        }
        let base = match self.request_for(ModelSlot::Turbo) {
            Ok(r) => r,
            Err(e) => return self.error(e),
        };
        for cell in std::mem::take(&mut self.variations) {
            if let (None, Some(job)) = (&cell.id, cell.job) {
                self.engine.cancel(job);
            }
        }
        let n = self.settings.variations.clamp(1, 64);
        for i in 0..n {
            let mut r = base.clone();
            r.seed = base.seed.wrapping_add(i as u64);
            // Each cell reads the prompt's wildcards for its own seed.
            r.prompts = vec![zimage_engine::wildcards::resolve(&self.prompt, r.seed)];
            if let Some(id) = self.drawn_already(&r) {
                self.variations.push(VariationCell { job: None, seed: r.seed, id: Some(id), progress: (r.steps, r.steps), error: None });
                continue;
            }
            let job =
                self.engine.submit(JobSpec { kind: JobKind::Variation, slot: ModelSlot::Turbo, request: r.clone() });
            self.jobs.insert(
                job,
                PendingJob {
                    start: r.init.as_ref().and(self.start_image.as_ref()).map(|st| st.name.clone()),
                    ..PendingJob::new(JobKind::Variation, ModelSlot::Turbo, r.clone())
                },
            );
            self.variations.push(VariationCell { job: Some(job), seed: r.seed, id: None, progress: (0, r.steps), error: None });
        }
        self.var_cursor = 0;
        self.view = View::Variations;
    }

    /// Puts an image's parameters back into the controls.
    pub fn restore(&mut self, id: &str) {
        // Chosen again: read its file again (it may have been put back).
        self.unreadable.remove(id);
        self.unreadable.remove(&format!("thumb:{id}"));
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

    pub(super) fn handle_dropped_files(&mut self, ctx: &egui::Context) {
        let dropped = ctx.input(|i| i.raw.dropped_files.clone());
        for f in dropped {
            let path = f.path().to_path_buf();
            let name =
                path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "dropped file".into());
            if let Some(problem) = not_an_image_to_read(&path) {
                self.error(format!("{name}: {problem}"));
                continue;
            }
            let bytes = if path.as_os_str().is_empty() {
                f.bytes().map_err(|e| e.to_string())
            } else {
                std::fs::read(&path).map_err(|e| zimage_engine::error::plain_cause(&e))
            };
            self.restore_png(ctx, &name, bytes);
        }
        // PNGs given on the command line (the desktop file's "Open with").
        for path in std::mem::take(&mut self.open_files) {
            let name = path.display().to_string();
            match not_an_image_to_read(&path) {
                Some(problem) => self.error(format!("{name}: {problem}")),
                None => self.restore_png(ctx, &name, std::fs::read(&path).map_err(|e| zimage_engine::error::plain_cause(&e))),
            }
        }
    }

    /// Restores the parameters stored in a PNG, or in the XMP of a JPEG an
    /// editor exported from one (dropped or opened).
    /// An image without generation metadata (a sketch, a photo) becomes the
    /// start image instead.
    pub(super) fn restore_png(&mut self, ctx: &egui::Context, name: &str, bytes: Result<Vec<u8>, String>) {
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
        // Snapped here, or the strength slider snaps it when it first shows,
        // which reads as an edit.
        self.settings.start_strength = strength;
        self.info(format!("Turbo starts from {name} (img2img at strength {strength:.2}; Remove in the controls undoes it)"));
        self.start_image = Some(StartImage { name, image });
    }

    /// History ids of the variations marked kept or starred, in grid order.
    pub(super) fn kept_variations(&self) -> Vec<String> {
        self.variations
            .iter()
            .filter_map(|c| c.id.clone())
            .filter(|id| self.history.get(id).is_some_and(|e| e.mark.is_kept()))
            .collect()
    }

    /// Turbo images of the history marked kept or starred that have no Base
    /// refine yet, oldest first: what "Refine kept" refines without a grid.
    pub fn kept_unrefined(&self) -> Vec<String> {
        let refined: HashSet<&str> = self.history.entries().iter().filter_map(|e| e.parent.as_deref()).collect();
        self.history
            .entries()
            .iter()
            .filter(|e| e.slot == ModelSlot::Turbo && e.mark.is_kept() && !refined.contains(e.id.as_str()))
            .map(|e| e.id.clone())
            .collect()
    }

    /// Nothing on screen or in a grid points at removed images any more.
    fn forget_images(&mut self, ids: &HashSet<String>) {
        // The live image may be among them: the same prompt renders again.
        self.forget_live_sent();
        let gone = |id: &Option<String>| id.as_ref().is_some_and(|i| ids.contains(i));
        // The image on screen went: show the selected one, else the newest left
        // (an empty canvas asked for a prompt that was there).
        if gone(&self.selected) {
            self.selected = None;
        }
        if gone(&self.current) {
            self.current = self.selected.clone().or_else(|| self.history.entries().last().map(|e| e.id.clone()));
            self.selected = self.selected.clone().or_else(|| self.current.clone());
        }
        if self.compare_pair.as_ref().is_some_and(|(t, b)| ids.contains(t) || ids.contains(b)) {
            self.compare_pair = None;
        }
        self.variations.retain(|c| !gone(&c.id));
        self.var_cursor = self.var_cursor.min(self.variations.len().saturating_sub(1));
        for id in ids {
            self.images.remove(id);
            self.images.remove(&format!("thumb:{id}"));
        }
    }
}

/// A Base refine of an image that the refine settings would make again.
pub enum Refined {
    /// Queued or running.
    Queued,
    /// Made: its history id.
    Done(String),
}

/// The largest file read as a dropped image: a 4096² PNG is under 50 MB.
const MAX_DROPPED_IMAGE_BYTES: u64 = 256 << 20;

/// Why a dropped (or opened) path is not read as an image, before reading
/// it on the UI thread: a folder, a model or LoRA file (gigabytes, which
/// read whole would freeze the window), anything too large for a picture.
fn not_an_image_to_read(path: &std::path::Path) -> Option<String> {
    if path.as_os_str().is_empty() {
        return None; // dropped as bytes (no file on disk): small by nature
    }
    let settings_hint = "choose it in Settings (Ctrl+,) as the Turbo or Base model";
    if path.is_dir() {
        return Some(format!("a folder, not an image; to use a model folder, {settings_hint}"));
    }
    let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    if ["safetensors", "gguf", "ckpt", "pt", "pth", "bin"].contains(&ext.as_str()) {
        return Some(format!("a model or LoRA file, not an image: {settings_hint}, or add it there as a LoRA"));
    }
    match std::fs::metadata(path) {
        Ok(m) if m.len() > MAX_DROPPED_IMAGE_BYTES => {
            Some(format!("{} is too large for an image to start from", crate::state::human_bytes(m.len())))
        }
        // A command line's mistyped name: said in words, not as an os error number.
        Err(e) => Some(zimage_engine::error::plain_cause(&e)),
        _ => None,
    }
}
