//! Engine events into app state: progress and previews, finished images
//! into the history (with their metadata), errors, model and memory news.

use super::*;

impl StudioApp {
    pub(super) fn on_event(&mut self, ctx: &egui::Context, ev: Event) {
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
                // Only a job of the prompt box's text counts it: a refine of an
                // older image, or a grid cell reading other wildcard options,
                // left the count marked "≈" (another text) until the next edit.
                let prompt = self.jobs.get(&id).and_then(|j| j.request.prompts.first());
                if let Some(prompt) = prompt.filter(|p| **p == self.prompt_for_seed()) {
                    self.prompt_tokens = Some((prompt.clone(), tokens));
                }
            }
            Event::PromptCount { prompt, tokens } => self.prompt_tokens = Some((prompt, tokens)),
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
                        self.variations.retain(|c| c.job != Some(id));
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
                    self.forget_live_sent();
                }
            }
            Event::Failed { id, message } => {
                let job = self.jobs.remove(&id);
                if self.live_job == Some(id) {
                    self.live_status = LiveStatus::Error(message.clone());
                    self.live_job = None;
                    self.live_preview = false;
                    self.forget_live_sent();
                }
                if self.refine_job == Some(id) {
                    self.refine_job = None;
                }
                if let Some(cell) = self.variations.iter_mut().find(|c| c.job == Some(id)) {
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
                    // Another model (or device) runs at its own speed.
                    self.live_rate = self.remembered_live_rate();
                    if !self.settings.size_chosen {
                        if let Some((w, h)) = self.settings.aspect.size(*default_size) {
                            (self.settings.width, self.settings.height) = (w, h);
                        }
                    }
                }
                self.models.insert(slot, state);
            }
            Event::ModelRejected { slot, model: _, message, kept } => {
                // The engine kept the working model: so do the settings (the
                // typed path stays in the form, to be mended).
                *self.settings.model_mut(slot) = kept.clone();
                self.reload_models();
                let kept = kept.as_deref().unwrap_or("the loaded one");
                let why = format!("{message}; still using {kept}");
                self.error(format!("{} model not changed: {why}", slot.label()));
                self.model_rejected.insert(slot, why);
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
                self.live_rate = self.remembered_live_rate();
            }
            Event::EngineRestarted { reason } => {
                self.error(format!("the engine crashed ({reason}) and was restarted; your history is safe"));
            }
        }
    }

    pub(super) fn on_progress(&mut self, ctx: &egui::Context, id: JobId, done: usize, total: usize, preview: Option<RgbImage>) {
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
                if let Some(cell) = self.variations.iter_mut().find(|c| c.job == Some(id)) {
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
    pub(super) fn on_finished(
        &mut self,
        ctx: &egui::Context,
        id: JobId,
        image: RgbImage,
        elapsed: Duration,
        per_step: Duration,
        made_by: (String, f32, Vec<LoraRef>),
    ) {
        let Some(job) = self.jobs.remove(&id) else { return };
        // The first image on a GPU compiles its kernels (half a minute): its
        // time says nothing about the speed of the next ones.
        let compiled_kernels = std::mem::replace(&mut self.gpu_kernels_cold, false);
        if !compiled_kernels {
            let r = &job.request;
            let rate = state::live_rate(per_step, r.width, r.height, state::dit_passes(r.guidance));
            let prev = self.pass_rate.get(&job.slot).copied();
            self.pass_rate.insert(job.slot, prev.map_or(rate, |p| 0.7 * p + 0.3 * rate));
        }
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
                if !compiled_kernels {
                    self.live_ema = Some(state::ema(self.live_ema, elapsed));
                    let r = &job.request;
                    let steps_run = state::steps_left(r, 0);
                    let rate = state::live_rate(elapsed, r.width, r.height, steps_run);
                    self.live_rate = Some(self.live_rate.map_or(rate, |prev| 0.7 * prev + 0.3 * rate));
                    self.remember_live_rate();
                }
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
                    // The image of the request last sent, unless a draft or its upgrade.
                    if !job.draft && job.parent.is_none() {
                        self.live_made = Some(hid.clone());
                    }
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
                // The refined image opens beside its Turbo parent, unless the
                // user went on to something else while it ran (typing, the
                // previous pair of a batch) or an earlier refine of the same
                // batch is on screen: then it is only announced.
                let busy = self.last_input.is_some_and(|t| t > job.submitted)
                    || (self.view == View::Compare && self.compare_opened.is_some_and(|t| t > job.submitted));
                match job.parent {
                    Some(parent) if !busy => {
                        self.compare_pair = Some((parent, hid.clone()));
                        self.compare_opened = Some(Instant::now());
                        self.view = View::Compare;
                        self.selected = Some(hid);
                        self.info(format!("Base refine done in {}", state::human_duration(elapsed)));
                    }
                    Some(parent) => {
                        // Out of sight, the Compare view can wait on it; in
                        // sight, the pair being looked at stays.
                        let how = if self.view == View::Compare {
                            // Where it is among the pairs ← / → step through.
                            let pairs = self.refine_pairs();
                            match pairs.iter().position(|p| p.0 == parent && p.1 == hid) {
                                Some(k) => format!("pair {} of {}, ← / → step to it", k + 1, pairs.len()),
                                None => "← / → step to it".to_string(),
                            }
                        } else {
                            self.compare_pair = Some((parent.clone(), hid.clone()));
                            "Ctrl+3 compares it".to_string()
                        };
                        self.info(format!("Base refine of #{parent} done in {}: {how}", state::human_duration(elapsed)));
                    }
                    None => self.info(format!("Base refine done in {}", state::human_duration(elapsed))),
                }
            }
            JobKind::Variation => {
                if let Some(at) = self.variations.iter().position(|c| c.job == Some(id)) {
                    self.variations[at].id = Some(hid);
                    // The cell under the cursor is the grid's selected image.
                    if at == self.var_cursor && self.view == View::Variations {
                        self.move_grid_cursor(at);
                    }
                }
                self.images.remove(&format!("var:{id}"));
            }
        }
    }

    pub(super) fn metadata_for(&self, job: &PendingJob, (model, shift, loras): (String, f32, Vec<LoraRef>)) -> GenerationMetadata {
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

    /// Which model on which device a live speed belongs to.
    fn live_speed_key(&self) -> Option<String> {
        Some(format!("{}|{}", self.model_config.turbo.as_ref()?, self.device_name.as_ref()?))
    }

    /// The live speed measured in an earlier session for this model and device.
    fn remembered_live_rate(&self) -> Option<f64> {
        self.settings.live_speeds.get(&self.live_speed_key()?).copied()
    }

    /// Keeps the live speed for the next start; rewritten only when it moved
    /// by a tenth (the settings file is not rewritten for every image).
    fn remember_live_rate(&mut self) {
        let (Some(key), Some(rate)) = (self.live_speed_key(), self.live_rate) else { return };
        let stored = self.settings.live_speeds.get(&key).copied();
        if stored.is_none_or(|s| (rate / s - 1.0).abs() > 0.1) {
            self.settings.live_speeds.insert(key, rate);
        }
    }
}
