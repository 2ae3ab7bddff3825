//! Live typing: when a live job starts, its request (draft or full size),
//! what the live view says while it waits, and the prompts settled on.

use super::*;

impl StudioApp {
    /// Records the live image's prompt once it has stayed unedited for
    /// `prompts::SETTLE` (the prompts typed through on the way are not kept).
    pub(super) fn settle_prompt(&mut self, ctx: &egui::Context) {
        let Some((prompt, at)) = &self.live_shown else { return };
        if *prompt != self.prompt_for_seed() {
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

    pub(super) fn schedule_live(&mut self, ctx: &egui::Context) {
        let Some(at) = self.dirty_at else { return };
        if !self.settings.live {
            return;
        }
        let due = at + state::quiet_period(self.expected_live_time());
        let now = Instant::now();
        if now < due {
            ctx.request_repaint_after(due - now);
            return;
        }
        self.dirty_at = None;
        if self.prompt.trim().is_empty() {
            return;
        }
        if self.unchanged_since_sent() {
            self.live_status = match self.live_job.and_then(|id| self.jobs.get(&id)) {
                Some(job) => LiveStatus::Rendering { done: job.progress.0, total: job.progress.1 },
                None => match self.current.as_ref().and_then(|id| self.history.get(id)) {
                    Some(e) => LiveStatus::Done { elapsed: Duration::from_millis(e.elapsed_ms) },
                    None => LiveStatus::Idle,
                },
            };
            return;
        }
        self.submit_live(Some(at), true);
    }

    /// Whether the controls ask for exactly the live image last sent (still
    /// rendering, or done), with the same models.
    fn unchanged_since_sent(&self) -> bool {
        let Some((sent, models)) = &self.live_sent else { return false };
        *models == self.model_config && self.request_for(ModelSlot::Turbo).is_ok_and(|r| r == *sent)
    }

    /// Forgets the live request last sent (its job failed or was stopped).
    pub(super) fn forget_live_sent(&mut self) {
        self.live_sent = None;
        self.live_made = None;
    }

    /// Takes the restored image `id` as the live image of the controls' request,
    /// when it is what Turbo makes of it now: a full-size Turbo image from
    /// noise, by the Turbo model and LoRAs loaded, no start image set. An edit
    /// that comes back to these settings then does not draw it again, and a
    /// variations grid takes it as its first cell.
    pub(super) fn adopt_as_live(&mut self, id: &str) {
        self.forget_live_sent();
        let Some(e) = self.history.get(id) else { return };
        let turbo = match self.models.get(&ModelSlot::Turbo) {
            Some(ModelState::Ready { name, .. }) => name.as_str(),
            _ => return,
        };
        let loras = self.lora_state.get(&ModelSlot::Turbo).map(|l| l.applied.as_slice()).unwrap_or_default();
        let m = &e.meta;
        let made_here = e.slot == ModelSlot::Turbo
            && m.init_image.is_none()
            && m.model == turbo
            && m.loras == loras
            && self.start_image.is_none();
        let Ok(request) = self.request_for(ModelSlot::Turbo) else { return };
        // The parameters restored are the image's own (size, steps, guidance, variety).
        let same = made_here
            && request.prompts.first() == Some(&m.prompt)
            && (request.seed, request.width, request.height, request.steps) == (m.seed, m.width, m.height, m.steps as usize)
            && (request.guidance, request.variety) == (m.guidance, m.variety);
        if same {
            self.live_sent = Some((request, self.model_config.clone()));
            self.live_made = Some(id.to_string());
        }
    }

    /// The live image on screen, when `request` (a Turbo request from the
    /// controls) would draw it again with the models loaded, and its file is
    /// still readable.
    pub(super) fn drawn_already(&self, request: &GenerateRequest) -> Option<String> {
        let (id, (sent, models)) = (self.live_made.as_ref()?, self.live_sent.as_ref()?);
        let same = sent == request
            && *models == self.model_config
            && self.current.as_ref() == Some(id)
            && self.history.get(id).is_some()
            && !self.unreadable.contains_key(id);
        same.then(|| id.clone())
    }

    /// Starts a live Turbo job from the controls; at draft size when
    /// `may_draft` (typing, not an explicit Generate) and the settings and
    /// the recent full-size time ask for it.
    pub(super) fn submit_live(&mut self, edit_at: Option<Instant>, may_draft: bool) {
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
        self.live_sent = Some((request.clone(), self.model_config.clone()));
        self.live_made = None;
        if let Some((w, h)) = draft {
            (request.width, request.height) = (w, h);
        }
        self.submit_live_request(request, None, edit_at, draft.is_some());
    }

    /// What the next live image should take at the current settings (a
    /// draft's time when typing drafts), from the live rate, which holds for
    /// any size; the recent live times while there is no rate. The status bar
    /// shows it and the quiet period before a live job follows it, so both
    /// change with the size at once: a blend of recent times stayed at a big
    /// image's seconds for several small images after it.
    pub fn expected_live_time(&self) -> Option<Duration> {
        let Some(rate) = self.live_rate else { return self.live_ema };
        let s = &self.settings;
        let steps = match self.start_image {
            Some(_) => state::snap_strength(s.start_strength, s.turbo_steps).1,
            None => s.turbo_steps,
        };
        let full = state::predicted_time(rate, s.width, s.height, steps);
        let (w, h) = state::draft_size(s.live_draft, s.width, s.height, Some(full)).unwrap_or((s.width, s.height));
        Some(state::predicted_time(rate, w, h, steps))
    }

    /// Finishes the draft `draft_id` at full size: Turbo img2img from it
    /// (upscaled by the engine) at [`state::UPGRADE_STRENGTH`], same seed.
    pub(super) fn submit_upgrade(&mut self, draft_id: String) {
        let Ok(mut request) = self.request_for(ModelSlot::Turbo) else { return };
        let Some(draft) = self.images.rgb(&draft_id) else { return };
        request.init = Some((*draft).clone());
        request.strength = state::snap_strength(state::UPGRADE_STRENGTH, request.steps).0;
        self.submit_live_request(request, Some(draft_id), None, false);
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

    pub(super) fn submit_live_request(
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
            PendingJob { parent, edit_at, draft, start, ..PendingJob::new(JobKind::Live, ModelSlot::Turbo, request) },
        );
        self.live_job = Some(id);
    }

    /// The prompt box's text as the seed set now reads it (its wildcards
    /// resolved, see [`zimage_engine::wildcards`]).
    pub fn prompt_for_seed(&self) -> String {
        zimage_engine::wildcards::resolve(&self.prompt, self.settings.seed)
    }

    /// The request for `slot` from the prompt box and the controls.
    pub fn request_for(&self, slot: ModelSlot) -> Result<GenerateRequest, String> {
        if let Some(problem) = state::size_problem(self.settings.width, self.settings.height) {
            return Err(problem);
        }
        let s = &self.settings;
        let mut r = GenerateRequest::new(self.prompt_for_seed(), slot.kind());
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
}
