//! Model widgets shared by the welcome screen and the settings window: the
//! models found on this computer, the download buttons with progress, and
//! each model's LoRA list.

use std::path::PathBuf;

use zimage_engine::pull::approximate_download_bytes;

use crate::app::{Action, StudioApp};
use crate::engine_bridge::ModelSlot;
use crate::settings::LoraSetting;
use crate::state::{gigabytes, human_bytes};

/// The models found in the Hugging Face cache, ComfyUI folders and the
/// configured paths, each with a button to use it.
pub fn found_models(app: &mut StudioApp, ui: &mut egui::Ui, actions: &mut Vec<Action>) {
    ui.horizontal(|ui| {
        let scanning = app.found_models.is_none() && app.scanning();
        if ui
            .add_enabled(
                !scanning,
                egui::Button::new(if app.found_models.is_some() {
                    "Search again"
                } else {
                    "Find models on this computer"
                }),
            )
            .clicked()
        {
            actions.push(Action::ScanModels);
        }
        if app.scanning() {
            ui.spinner();
            ui.weak("looking in the Hugging Face cache and ComfyUI folders…");
        }
    });
    let Some(found) = &app.found_models else { return };
    if found.is_empty() {
        ui.weak("No Z-Image model found (looked in the Hugging Face cache and the usual ComfyUI folders).");
        return;
    }
    egui::Grid::new("found_models").num_columns(4).striped(true).show(ui, |ui| {
        for m in found.clone() {
            let slot = if m.kind == "base" { ModelSlot::Base } else { ModelSlot::Turbo };
            ui.strong(if m.kind == "base" { "Base" } else { "Turbo" });
            ui.label(m.path.display().to_string()).on_hover_text(format!("found in {}", m.source));
            if m.complete() {
                ui.label(format!("{} · {}", human_bytes(m.bytes), m.dtype));
                let label = format!("Use as {}", slot.label());
                if ui.button(label).clicked() {
                    actions.push(Action::UseModel { slot, model: m.path.display().to_string() });
                }
            } else {
                ui.colored_label(ui.visuals().error_fg_color, "incomplete").on_hover_text(m.problems.join("\n"));
                ui.label("");
            }
            ui.end_row();
        }
    });
}

/// "Download Turbo (about 33 GB)" buttons, or the running download's progress.
pub fn downloads(app: &mut StudioApp, ui: &mut egui::Ui, actions: &mut Vec<Action>, models: &[&str]) {
    if let Some(d) = &app.download {
        let (frac, text) = match &d.progress {
            Some(p) if p.total > 0 => {
                let secs = d.started.elapsed().as_secs_f64().max(0.1);
                (
                    p.done as f32 / p.total as f32,
                    format!(
                        "{} of {} · {} · {:.0} MB/s",
                        gigabytes(p.done),
                        gigabytes(p.total),
                        p.file,
                        p.done as f64 / secs / 1e6
                    ),
                )
            }
            _ => (0.0, "asking the Hugging Face hub for the file list…".into()),
        };
        ui.label(format!("Downloading Z-Image {} into the Hugging Face cache", d.model));
        ui.add(egui::ProgressBar::new(frac).text(text).show_percentage());
        if ui.button("Cancel download").clicked() {
            actions.push(Action::CancelDownload);
        }
        return;
    }
    ui.horizontal(|ui| {
        for model in models {
            let size = approximate_download_bytes(model).map(gigabytes).unwrap_or_default();
            let name = if *model == "base" { "Z-Image (Base)" } else { "Z-Image-Turbo" };
            if ui.button(format!("Download {name} (about {size})")).on_hover_text("From huggingface.co into the shared Hugging Face cache; resumable, checked against the hub's checksums").clicked() {
                actions.push(Action::StartDownload(model.to_string()));
            }
        }
    });
    if let Some(note) = &app.download_note {
        ui.weak(note);
    }
}

/// The LoRA list of one model: on/off, strength, remove; add a file.
pub fn loras(app: &mut StudioApp, ui: &mut egui::Ui, actions: &mut Vec<Action>, slot: ModelSlot) {
    let list = match slot {
        ModelSlot::Turbo => &mut app.settings.turbo_loras,
        ModelSlot::Base => &mut app.settings.base_loras,
    };
    let mut changed = false;
    let mut remove = None;
    for (i, l) in list.iter_mut().enumerate() {
        ui.horizontal(|ui| {
            let name = l.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            changed |= ui.checkbox(&mut l.enabled, name).on_hover_text(l.path.display().to_string()).changed();
            let strength =
                ui.add(egui::DragValue::new(&mut l.strength).range(-2.0..=2.0).speed(0.01).prefix("strength "));
            // Apply when the drag ends, not on every pixel of it.
            changed |= strength.drag_stopped() || (strength.changed() && !strength.dragged());
            if ui.small_button("Remove").clicked() {
                remove = Some(i);
            }
        });
    }
    if let Some(i) = remove {
        list.remove(i);
        changed = true;
    }
    let mut form = app.lora_form.remove(&slot).unwrap_or_default();
    let mut picked = None;
    ui.horizontal(|ui| {
        let l = ui.label(format!("Add {} LoRA", slot.label()));
        let field = ui
            .add(egui::TextEdit::singleline(&mut form).desired_width(260.0).hint_text("/path/to/lora.safetensors"))
            .labelled_by(l.id);
        if field.changed() {
            app.lora_form_error.remove(&slot);
        }
        let entered = field.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
        if (ui.button("Add").clicked() || entered) && !form.trim().is_empty() {
            picked = Some((PathBuf::from(crate::settings::typed_path(&form)), true));
        }
        if ui.button("Browse…").clicked() {
            if let Some(path) = super::file_dialog(app).and_then(|d| d.add_filter("LoRA", &["safetensors"]).pick_file()) {
                picked = Some((path, false));
            }
        }
    });
    if let Some((path, typed)) = picked {
        // A refused path stays in the field to be corrected.
        match crate::settings::lora_refusal(&path, list_mut(app, slot)) {
            Some(why) => {
                app.lora_form_error.insert(slot, why);
            }
            None => {
                if typed {
                    form.clear();
                }
                app.lora_form_error.remove(&slot);
                list_mut(app, slot).push(LoraSetting { path, strength: 1.0, enabled: true });
                changed = true;
            }
        }
    }
    app.lora_form.insert(slot, form);
    if let Some(why) = app.lora_form_error.get(&slot) {
        ui.colored_label(ui.visuals().error_fg_color, why);
    }
    if let Some(state) = app.lora_state.get(&slot) {
        for w in &state.warnings {
            ui.colored_label(ui.visuals().warn_fg_color, w);
        }
        if let Some(e) = &state.error {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }
    }
    if changed {
        actions.push(Action::LorasChanged);
    }
}

fn list_mut(app: &mut StudioApp, slot: ModelSlot) -> &mut Vec<LoraSetting> {
    match slot {
        ModelSlot::Turbo => &mut app.settings.turbo_loras,
        ModelSlot::Base => &mut app.settings.base_loras,
    }
}
