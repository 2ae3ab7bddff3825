//! Status bar (live state, time per image, messages, frame time) and the
//! model chips of the top bar.

use crate::app::{Action, StudioApp};
use crate::engine_bridge::{ModelSlot, ModelState};
use crate::state::{human_duration, LiveStatus};

pub fn draw(app: &mut StudioApp, ui: &mut egui::Ui, _actions: &mut Vec<Action>) {
    ui.horizontal(|ui| {
        // The right side first, so that a long message is cut short before
        // it instead of running under it.
        ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
            if let Some(d) = app.metrics.frame_times.back() {
                ui.weak(format!("frame {:.1} ms", d.as_secs_f64() * 1000.0));
            }
            if let Some(d) = &app.download {
                let frac =
                    d.progress.as_ref().filter(|p| p.total > 0).map(|p| p.done as f32 / p.total as f32).unwrap_or(0.0);
                ui.add(egui::ProgressBar::new(frac).desired_width(140.0).show_percentage())
                    .on_hover_text("Model download (Settings shows the details)");
                ui.weak(format!("downloading {}", d.model));
            }
            ui.with_layout(egui::Layout::left_to_right(egui::Align::Center), |ui| left_side(app, ui));
        });
    });
}

/// The live state, then the last message.
fn left_side(app: &mut StudioApp, ui: &mut egui::Ui) {
    let color = match app.live_status {
        LiveStatus::Stale => ui.visuals().warn_fg_color,
        LiveStatus::Error(_) => ui.visuals().error_fg_color,
        LiveStatus::Rendering { .. } => ui.visuals().selection.stroke.color,
        _ => ui.visuals().text_color(),
    };
    // A long state (an error naming a path) is cut short before the right
    // side instead of running under it; the whole on hover.
    one_line(ui, format!("Live: {}", app.live_status.text()), color);
    if let Some(stage) = app.live_stage() {
        ui.weak(format!("· {stage}"));
    }
    if let Some(waiting) = app.live_waiting() {
        one_line(ui, format!("· {waiting}"), ui.visuals().warn_fg_color);
    }
    if let Some(paused) = app.paused_job() {
        ui.weak(format!("· {paused}"));
    }
    if let Some(hint) = crate::state::first_gpu_image_hint(app.gpu_kernels_cold, &app.live_status) {
        ui.weak(format!("· {hint}"));
    }
    if let Some(d) = app.expected_live_time() {
        ui.weak(format!("· ~{} per image", human_duration(d)));
    }
    if let Some(msg) = app.message.clone() {
        ui.separator();
        if ui.small_button("x").on_hover_text("Dismiss").clicked() {
            app.message = None;
        }
        let color = if msg.error { ui.visuals().error_fg_color } else { ui.visuals().text_color() };
        one_line(ui, msg.text, color);
    }
}

/// `text` on one line, cut with "…" where the bar ends; the whole on hover.
fn one_line(ui: &mut egui::Ui, text: String, color: egui::Color32) {
    ui.add(egui::Label::new(egui::RichText::new(&text).color(color)).truncate()).on_hover_text(text);
}

pub fn model_chips(app: &StudioApp, ui: &mut egui::Ui) {
    if let Some(device) = &app.device_name {
        ui.weak(device).on_hover_text("Where the models run (Settings > Run the models on)");
    }
    for slot in [ModelSlot::Turbo, ModelSlot::Base] {
        let state = app.models.get(&slot);
        if let (Some(ModelState::Ready { name, .. }), Some(why)) = (state, state.and_then(|s| s.misplaced(slot))) {
            let text = format!("{}: {name} (not a {} model)", slot.label(), slot.label());
            ui.add(egui::Label::new(egui::RichText::new(&text).color(ui.visuals().warn_fg_color)).truncate()).on_hover_text(format!("{name} is {why}"));
            continue;
        }
        let (text, color) = match state {
            Some(ModelState::Ready { name, .. }) => (format!("{}: {name}", slot.label()), ui.visuals().text_color()),
            Some(ModelState::Loading { stage }) => {
                (format!("{}: loading {stage}…", slot.label()), ui.visuals().warn_fg_color)
            }
            Some(ModelState::Failed(_)) => {
                (format!("{}: error (see Settings)", slot.label()), ui.visuals().error_fg_color)
            }
            Some(ModelState::NotConfigured) => {
                (format!("{}: not configured", slot.label()), ui.visuals().warn_fg_color)
            }
            None => (format!("{}: starting…", slot.label()), ui.visuals().weak_text_color()),
        };
        // Cut short with "…" when the bar is too narrow; the whole on hover.
        one_line(ui, text, color);
    }
}
