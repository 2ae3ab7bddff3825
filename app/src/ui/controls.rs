//! Left panel: prompt, generation controls, refine, variations, save.

use egui::{DragValue, Slider, TextEdit};

use crate::app::{Action, StudioApp};
use crate::engine_bridge::{JobId, JobKind};
use crate::state::{self, AspectPreset, LiveDraft, RefineMode, SeedMode};
use zimage_engine::demo::tokenizer::{unknown_words_while_typing, EXAMPLE_PROMPT};

pub const PROMPT_ID: &str = "prompt";

const DRAFT_HELP: &str = "While you type, render at half the size (3–4x faster; down to a quarter when even half \
    would take over a second) and finish at full size when you stop, from the draft, so the picture you stopped on \
    stays. auto: only when a full-size live image takes over a second. F5 always renders at full size.";

const VARIETY_HELP: &str = "Turbo draws nearly the same picture for every seed. Variety adds noise to the prompt's \
    features in the first steps, so that seeds (and the variations grid) differ more; 0 = off. \
    Higher values follow the prompt less. Saved in the PNG.";

pub fn draw(app: &mut StudioApp, ui: &mut egui::Ui, actions: &mut Vec<Action>) {
    let mut edited = false;

    let label = ui.label("Prompt");
    // The built-in demo reads only its little grammar: its hint is an example.
    let demo = app.model_config.turbo.as_deref() == Some("demo-turbo");
    let hint = if demo { format!("e.g. {EXAMPLE_PROMPT}") } else { "Describe the image… it renders as you type".into() };
    // A long prompt scrolls inside its box (which follows the cursor) instead
    // of growing past the window and pushing every control out of reach.
    let max_height = (0.3 * ui.ctx().content_rect().height()).max(90.0);
    let prompt = egui::ScrollArea::vertical().id_salt("prompt_scroll").max_height(max_height).show(ui, |ui| {
        ui.add(
            TextEdit::multiline(&mut app.prompt)
                .id_salt(PROMPT_ID)
                .desired_rows(4)
                .desired_width(f32::INFINITY)
                .hint_text(hint),
        )
    });
    let prompt = prompt.inner.labelled_by(label.id);
    app.prompt_id = Some(prompt.id);
    if app.focus_prompt {
        prompt.request_focus();
        app.focus_prompt = false;
    }
    if prompt.changed() {
        app.prompt_history.edited();
        edited = true;
    }
    // The prompt's length in tokens as the engine last counted it. The line is
    // always there, so that the controls below do not jump up and down with
    // every keystroke while the new text waits for its count ("≈": the count
    // of the text before the last edit).
    let max = zimage_engine::text::MAX_TOKENS;
    let reads = app.prompt_for_seed();
    match app.prompt_tokens.as_ref().map(|(p, n)| (*n, if *p == reads { "" } else { "≈" })) {
        Some((tokens, about)) if tokens > max => {
            ui.colored_label(
                ui.visuals().warn_fg_color,
                format!("{about}{tokens} tokens: the model reads the first {max}; the end of the prompt is cut"),
            );
        }
        Some((tokens, about)) => {
            ui.weak(format!("{about}{tokens} / {max} tokens")).on_hover_text("With the chat template; the model reads at most 512");
        }
        None => {
            ui.weak(format!("– / {max} tokens")).on_hover_text("Counted when the prompt is first rendered");
        }
    }
    // Wildcards: what this seed reads, and how many prompts the grid can explore.
    let (groups, prompts) = zimage_engine::wildcards::count(&app.prompt);
    if groups > 0 {
        let s = if groups == 1 { "" } else { "s" };
        ui.weak(format!("{groups} wildcard group{s}, {prompts} prompts; seed {} reads: {reads}", app.settings.seed))
            .on_hover_text("{a|b|c} picks one option per image, by its seed: a variations grid (Ctrl+G) draws several");
    }
    // Words the demo never learnt come out as noise: say so, not a "broken" image.
    if demo {
        let unknown = unknown_words_while_typing(&app.prompt);
        if !unknown.is_empty() {
            ui.colored_label(
                ui.visuals().warn_fg_color,
                format!("The demo model knows only coloured shapes; it cannot read: {}", unknown.join(", ")),
            )
            .on_hover_text(format!(
                "It was trained on captions such as \"{EXAMPLE_PROMPT}\": small or large; red, green, blue, yellow, purple, \
                 orange, white or black; circle, square or triangle; at the top left … at the bottom right. \
                 Configure the real Z-Image models in Settings for any prompt."
            ));
        }
    }

    ui.horizontal_wrapped(|ui| {
        if ui.checkbox(&mut app.settings.live, "Live").on_hover_text("Regenerate with Turbo as you type").changed() {
            edited = true;
        }
        let draft = ui.label("Draft").on_hover_text(DRAFT_HELP);
        egui::ComboBox::from_id_salt("live_draft")
            .width(64.0)
            .selected_text(app.settings.live_draft.label())
            .show_ui(ui, |ui| {
                for d in LiveDraft::ALL {
                    ui.selectable_value(&mut app.settings.live_draft, d, d.label());
                }
            })
            .response
            .labelled_by(draft.id)
            .on_hover_text(DRAFT_HELP);
        if ui.button("Generate (F5)").clicked() {
            actions.push(Action::Generate);
        }
        if let Some(id) = app.live_job {
            if ui.button("Stop").clicked() {
                actions.push(Action::Cancel(id));
            }
        }
    });
    match app.start_image.as_ref().map(|s| s.name.clone()) {
        Some(name) => {
            ui.horizontal_wrapped(|ui| {
                ui.label(format!("Start: {name}")).on_hover_text("Turbo (live, Generate, variations) starts from this image by img2img");
                let l = ui.label("strength");
                let steps = app.settings.turbo_steps.max(1);
                let r = ui.add(Slider::new(&mut app.settings.start_strength, 0.0..=1.0).step_by(1.0 / steps as f64).fixed_decimals(2)).labelled_by(l.id);
                if r.changed() {
                    app.settings.start_strength = state::snap_strength(app.settings.start_strength, steps).0;
                    edited = true;
                }
                if ui.small_button("Remove").on_hover_text("Start from noise again").clicked() {
                    actions.push(Action::ClearStartImage);
                }
            });
        }
        None => {
            ui.horizontal_wrapped(|ui| {
                ui.weak("Drop a sketch or photo to start from it, or");
                if ui.add_enabled(app.selected.is_some(), egui::Button::new("start from the selected image").small()).clicked() {
                    actions.push(Action::StartFromSelected);
                }
            });
        }
    }

    ui.separator();
    egui::Grid::new("gen_controls").num_columns(2).spacing([8.0, 6.0]).show(ui, |ui| {
        let seed_label = ui.label("Seed");
        ui.horizontal(|ui| {
            edited |= ui.add(DragValue::new(&mut app.settings.seed).speed(1.0)).labelled_by(seed_label.id).changed();
            if ui.small_button("Random").on_hover_text("New random seed").clicked() {
                actions.push(Action::NewSeed);
            }
            if ui.small_button("+1").on_hover_text("Next seed").clicked() {
                app.settings.seed = app.settings.seed.wrapping_add(1);
                edited = true;
            }
        });
        ui.end_row();

        ui.label("On Generate");
        ui.horizontal(|ui| {
            for m in SeedMode::ALL {
                ui.selectable_value(&mut app.settings.seed_mode, m, m.label()).on_hover_text("How the seed changes on Generate / F5; typing always keeps it fixed");
            }
        });
        ui.end_row();

        let aspect_label = ui.label("Aspect");
        let before = app.settings.aspect;
        egui::ComboBox::from_id_salt("aspect")
            .selected_text(app.settings.aspect.label())
            .show_ui(ui, |ui| {
                for p in AspectPreset::ALL {
                    ui.selectable_value(&mut app.settings.aspect, p, p.label());
                }
            })
            .response
            .labelled_by(aspect_label.id);
        if app.settings.aspect != before {
            let long = app.settings.width.max(app.settings.height);
            if let Some((w, h)) = app.settings.aspect.size(long) {
                app.settings.width = w;
                app.settings.height = h;
            }
            app.settings.size_chosen = true;
            edited = true;
        }
        ui.end_row();

        let size_label = ui.label("Size");
        ui.horizontal(|ui| {
            let w = ui.add(DragValue::new(&mut app.settings.width).range(16..=4096).speed(16.0).suffix(" w")).labelled_by(size_label.id);
            let h = ui.add(DragValue::new(&mut app.settings.height).range(16..=4096).speed(16.0).suffix(" h")).labelled_by(size_label.id);
            // Snap when the user lets go, so typing "10" on the way to "1024" works.
            let snap = (w.lost_focus() || w.drag_stopped() || h.lost_focus() || h.drag_stopped())
                && state::size_problem(app.settings.width, app.settings.height).is_some();
            if snap {
                app.settings.width = state::snap16(app.settings.width);
                app.settings.height = state::snap16(app.settings.height);
            }
            if w.changed() || h.changed() || snap {
                app.settings.aspect = AspectPreset::of(app.settings.width, app.settings.height);
                app.settings.size_chosen = true;
                edited = true;
            }
        });
        ui.end_row();
        if let Some(problem) = state::size_problem(app.settings.width, app.settings.height) {
            ui.label("");
            ui.colored_label(ui.visuals().error_fg_color, problem);
            ui.end_row();
        }

        let l = ui.label("Turbo steps");
        let r = ui.add(Slider::new(&mut app.settings.turbo_steps, 1..=50)).labelled_by(l.id);
        app.settings.steps_chosen |= r.changed();
        edited |= r.changed();
        ui.end_row();
        let l = ui.label("Turbo guidance");
        edited |= ui.add(Slider::new(&mut app.settings.turbo_guidance, 0.0..=10.0).step_by(0.5)).labelled_by(l.id).changed();
        ui.end_row();
        let l = ui.label("Variety").on_hover_text(VARIETY_HELP);
        edited |= ui.add(Slider::new(&mut app.settings.turbo_variety, 0.0..=2.0).step_by(0.05)).labelled_by(l.id).on_hover_text(VARIETY_HELP).changed();
        ui.end_row();
        let l = ui.label("Base steps");
        app.settings.steps_chosen |= ui.add(Slider::new(&mut app.settings.base_steps, 1..=100)).labelled_by(l.id).changed();
        ui.end_row();
        let l = ui.label("Base guidance");
        ui.add(Slider::new(&mut app.settings.base_guidance, 0.0..=10.0).step_by(0.5)).labelled_by(l.id);
        ui.end_row();
    });
    if ui.small_button("Model defaults").on_hover_text("The loaded models' own steps (Turbo 8, Base 50 for the real models), guidance 0 / 4").clicked() {
        let d = crate::settings::Settings::default();
        let steps = |slot| match app.models.get(&slot) {
            Some(crate::engine_bridge::ModelState::Ready { default_steps, .. }) => Some(*default_steps),
            _ => None,
        };
        app.settings.turbo_steps = steps(crate::engine_bridge::ModelSlot::Turbo).unwrap_or(d.turbo_steps);
        app.settings.base_steps = steps(crate::engine_bridge::ModelSlot::Base).unwrap_or(d.base_steps);
        app.settings.turbo_guidance = d.turbo_guidance;
        app.settings.base_guidance = d.base_guidance;
        app.settings.steps_chosen = false;
        edited = true;
    }
    let neg = ui.label("Negative prompt (Base)");
    egui::ScrollArea::vertical().id_salt("negative_scroll").max_height(0.15 * ui.ctx().content_rect().height()).show(ui, |ui| {
        ui.add(TextEdit::multiline(&mut app.settings.negative_prompt).desired_rows(2).desired_width(f32::INFINITY).hint_text("used by Base when guidance > 0"))
            .labelled_by(neg.id);
    });

    ui.separator();
    ui.strong("Refine with Base");
    ui.horizontal(|ui| {
        ui.selectable_value(&mut app.settings.refine_mode, RefineMode::Img2Img, "img2img").on_hover_text("Start from the Turbo image");
        ui.selectable_value(&mut app.settings.refine_mode, RefineMode::SameSeed, "same seed").on_hover_text("Re-render from noise with the Turbo image's seed");
    });
    if app.settings.refine_mode == RefineMode::Img2Img {
        let steps = app.settings.base_steps;
        let l = ui.label("Strength");
        let r = ui.add(Slider::new(&mut app.settings.refine_strength, 0.0..=1.0).step_by(1.0 / steps.max(1) as f64).fixed_decimals(2)).labelled_by(l.id);
        if r.changed() {
            app.settings.refine_strength = state::snap_strength(app.settings.refine_strength, steps).0;
        }
    }
    let (_, cost) = app.refine_cost();
    let source = app.refine_source();
    let no_base = app.base_unavailable();
    match &no_base {
        Some(why) => {
            ui.colored_label(ui.visuals().warn_fg_color, why);
        }
        None => {
            ui.weak(match &source {
                Some(id) => match app.refined_alike(id) {
                    Some(crate::app::Refined::Done(base)) => format!("from #{id}: made already at these settings (#{base}); Ctrl+Enter shows it"),
                    Some(crate::app::Refined::Queued) => format!("from #{id}: queued at these settings"),
                    None => format!("from #{id}: {cost}"),
                },
                None => format!("needs a Turbo image first · {cost}"),
            });
        }
    }
    ui.horizontal(|ui| {
        if ui.add_enabled(source.is_some() && no_base.is_none(), egui::Button::new("Refine (Ctrl+Enter)")).clicked() {
            actions.push(Action::Refine);
        }
        if let Some(id) = app.refine_job {
            // The refine that has started (the earliest), else the newest one, queued.
            let started = app.jobs.iter().filter(|(_, j)| j.kind == JobKind::Refine && j.progress.1 > 0).min_by_key(|(job_id, _)| **job_id);
            if let Some(job) = started.map(|(_, j)| j).or_else(|| app.jobs.get(&id)) {
                let (done, total) = job.progress;
                let text = match total {
                    0 => "Base queued".to_string(),
                    _ if job.paused => format!("{done}/{total} paused"),
                    _ => format!("Base {done}/{total}"),
                };
                let bar = ui.add(egui::ProgressBar::new(if total > 0 { done as f32 / total as f32 } else { 0.0 }).text(text).desired_width(110.0));
                if job.paused {
                    bar.on_hover_text("Paused while the live image renders; it goes on from this step, to the same image");
                }
            }
            let refines = app.jobs.values().filter(|j| j.kind == JobKind::Refine).count();
            let label = if refines > 1 { format!("Cancel {refines}") } else { "Cancel".to_string() };
            if ui.button(label).on_hover_text("Stop the Base refine at its next step, and drop the queued ones").clicked() {
                actions.push(Action::CancelRefines);
            }
        }
    });
    // Several refines (e.g. "Refine kept with Base"): each can be dropped alone.
    let mut refines: Vec<(JobId, String)> = app
        .jobs
        .iter()
        .filter(|(_, j)| j.kind == JobKind::Refine)
        .map(|(id, j)| {
            let from = j.parent.as_deref().map_or(String::new(), |p| format!(" of #{p}"));
            let at = match j.progress {
                _ if j.paused => format!("paused at {}/{}", j.progress.0, j.progress.1),
                (0, _) => "queued".to_string(),
                (done, total) => format!("{done}/{total}"),
            };
            (*id, format!("Base{from} · {at}"))
        })
        .collect();
    refines.sort();
    if refines.len() > 1 {
        let left = app.refines_left().map_or(String::new(), |d| format!(" · about {} left", state::human_duration(d)));
        let header = egui::CollapsingHeader::new(format!("Refine queue ({}){left}", refines.len()));
        // The id stays while the label counts down, so the list stays open.
        header.id_salt("refine queue").show(ui, |ui| {
            for (id, line) in refines {
                ui.horizontal(|ui| {
                    ui.label(line);
                    if ui.small_button("drop").on_hover_text("Cancel this refine only").clicked() {
                        actions.push(Action::Cancel(id));
                    }
                });
            }
        });
    }
    let queued = app.engine.queued();
    if queued > 1 {
        ui.weak(format!("{queued} jobs queued"));
    }

    ui.separator();
    ui.strong("Variations");
    ui.horizontal(|ui| {
        let l = ui.label("N");
        ui.add(DragValue::new(&mut app.settings.variations).range(1..=64)).labelled_by(l.id);
        if ui.button("Generate grid (Ctrl+G)").clicked() {
            actions.push(Action::Variations);
        }
    });
    if ui.button("Refine kept with Base").clicked() {
        actions.push(Action::RefineKept);
    }

    ui.separator();
    ui.horizontal_wrapped(|ui| {
        if ui.button("Save (Ctrl+S)").clicked() {
            actions.push(Action::Save);
        }
        if ui.button("Save as…").clicked() {
            actions.push(Action::SaveAs);
        }
        if ui.button("Copy image").on_hover_text("The image in view to the clipboard (Ctrl+C outside the prompt)").clicked() {
            actions.push(Action::CopyImage);
        }
        if ui.button("Copy parameters").on_hover_text("Its prompt and settings as A1111 text, as stored in the PNG").clicked() {
            actions.push(Action::CopyParameters);
        }
    });
    ui.horizontal_wrapped(|ui| {
        ui.weak(format!("to {}", app.output_dir().display()));
        if ui.small_button("Open folder").on_hover_text("Show the save folder in the file manager").clicked() {
            actions.push(Action::OpenOutputFolder);
        }
    });

    if edited {
        actions.push(Action::Edited);
    }
}
