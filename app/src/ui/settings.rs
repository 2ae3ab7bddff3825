//! Settings window: Turbo and Base model (folder, file or built-in name) and
//! the save folder, applied and persisted with "Apply"; the models found on
//! this computer, downloads, and each model's LoRAs (applied at once).

use crate::app::{Action, StudioApp};
use crate::engine_bridge::{ModelSlot, ModelState};
use crate::state::human_bytes;
use crate::ui::models;
use zimage_engine::memory::MemoryPlan;

/// The Settings window's id (its area and size in egui's memory).
pub const SETTINGS_WINDOW: &str = "settings_window";

pub fn draw(app: &mut StudioApp, ctx: &egui::Context, actions: &mut Vec<Action>) {
    if !app.show_settings {
        return;
    }
    let mut open = true;
    egui::Window::new("Settings").id(egui::Id::unique(SETTINGS_WINDOW)).open(&mut open).collapsible(false).default_width(600.0)
        .min_width(600.0).max_height(ctx.content_rect().height() - 80.0)
        // As tall as the window allows: its sections scroll, and a short
        // default hid most of them below the first screen. The minimum of
        // three quarters of the room makes a height egui remembers from a
        // smaller window give way once the window has grown (a shorter
        // content still sets the height).
        .default_height(ctx.content_rect().height() - 80.0)
        .min_height(0.75 * (ctx.content_rect().height() - 80.0)).show(ctx, |ui| {
      egui::ScrollArea::vertical().auto_shrink([false, true]).show(ui, |ui| {
        ui.label("Models: a diffusers folder, a single .safetensors file, or a built-in name (demo-turbo, demo-base).");
        if app.cli_override {
            ui.colored_label(ui.visuals().warn_fg_color, "This run uses the models given on the command line; Apply switches to these saved ones.");
        }
        let rows: [(&str, Option<ModelSlot>); 3] = [("Turbo model", Some(ModelSlot::Turbo)), ("Base model", Some(ModelSlot::Base)), ("Save folder", None)];
        // The folder an empty field means here (Pictures may be unknown on this system).
        let default_folder = format!("default: {}", crate::settings::fallback_output_dir(&app.paths).display());
        // Rows of label, path field, Browse (not a Grid: inside the scroll
        // area a Grid kept its first, narrow column widths).
        for (i, (name, slot)) in rows.iter().enumerate() {
            ui.horizontal(|ui| {
                let l = ui.add_sized([90.0, 20.0], egui::Label::new(*name));
                let width = (ui.available_width() - 80.0).max(120.0);
                let field = ui.add(egui::TextEdit::singleline(&mut app.settings_form[i]).desired_width(width).hint_text(match slot {
                    Some(ModelSlot::Turbo) => "demo-turbo or /path/to/Z-Image-Turbo",
                    Some(ModelSlot::Base) => "demo-base or /path/to/Z-Image",
                    None => default_folder.as_str(),
                }))
                .labelled_by(l.id);
                // Enter in a path field applies, as in any form.
                if field.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter)) {
                    apply_form(app, actions);
                }
                if slot.is_some() {
                    let current = app.settings_form[i].clone();
                    if let Some(p) = super::browse_model(app, ui, &current) {
                        app.settings_form[i] = p;
                    }
                } else if ui.button("Browse…").clicked() {
                    if let Some(p) = super::file_dialog(app).and_then(|d| d.pick_folder()) {
                        app.settings_form[i] = p.display().to_string();
                    }
                }
            });
            if let Some(slot) = slot {
                let (text, color) = match app.models.get(slot) {
                    Some(ModelState::Ready { name, .. }) => (format!("loaded: {name}"), ui.visuals().text_color()),
                    Some(ModelState::Loading { stage }) => (format!("loading {stage}…"), ui.visuals().warn_fg_color),
                    Some(ModelState::Failed(m)) => (m.clone(), ui.visuals().error_fg_color),
                    Some(ModelState::NotConfigured) | None => ("not configured".into(), ui.visuals().warn_fg_color),
                };
                // Under the field, wrapped: a failure can name a long path, and the window keeps its width.
                let under_field = |ui: &mut egui::Ui, text: String, color: egui::Color32| {
                    ui.horizontal(|ui| {
                        ui.add_space(98.0);
                        ui.add(egui::Label::new(egui::RichText::new(text).color(color)).wrap());
                    });
                };
                under_field(ui, text, color);
                if let Some(why) = app.models.get(slot).and_then(|s| s.misplaced(*slot)) {
                    under_field(ui, format!("This is {why}."), ui.visuals().warn_fg_color);
                }
                if let Some(why) = app.model_rejected.get(slot) {
                    under_field(ui, why.clone(), ui.visuals().error_fg_color);
                }
            }
        }
        ui.weak(format!("Images are saved to {}", app.output_dir().display()));
        ui.horizontal(|ui| {
            if ui.button("Apply").clicked() {
                apply_form(app, actions);
            }
            // A button named "Use" acts at once, like "Use as Turbo" below.
            if ui.button("Use built-in demo models").on_hover_text("Load the built-in demo pair now").clicked() {
                app.settings_form[0] = "demo-turbo".into();
                app.settings_form[1] = "demo-base".into();
                apply_form(app, actions);
            }
            if app.settings_form_edited() {
                ui.colored_label(ui.visuals().warn_fg_color, "edited: Enter or Apply uses it");
            }
        });
        ui.separator();
        ui.horizontal(|ui| {
            let l = ui.label("Run the models on");
            let current = app.settings.device.clone();
            egui::ComboBox::from_id_salt("device").selected_text(&current).show_ui(ui, |ui| {
                for (value, what) in [
                    ("auto", "CUDA if available, else the CPU"),
                    ("cpu", "the CPU (f32)"),
                    ("cuda", "an NVIDIA GPU (bf16)"),
                    ("wgpu", "a Vulkan/Metal GPU (f32)"),
                ] {
                    let kind = crate::cli::parse_device(value).ok().flatten();
                    let built = kind.is_none_or(|k| k.compiled_in());
                    let text = if built { format!("{value}: {what}") } else { format!("{value}: not in this build") };
                    if ui.add_enabled(built, egui::Button::selectable(current == value, text)).clicked() && current != value {
                        actions.push(Action::SetDevice(value.to_string()));
                    }
                }
            })
            .response
            .labelled_by(l.id);
            if let Some(name) = &app.device_name {
                ui.weak(format!("now: {name}"));
            }
        });
        ui.horizontal(|ui| {
            let l = ui.label("Memory plan");
            let current = app.settings.memory_plan;
            egui::ComboBox::from_id_salt("memory_plan").selected_text(current.label()).show_ui(ui, |ui| {
                // Names only: the explanations are longer than a window is wide
                // (each on hover; the chosen one's is shown, wrapped, below).
                for plan in MemoryPlan::ALL {
                    let item = ui.add(egui::Button::selectable(current == plan, plan.label())).on_hover_text(plan.explanation());
                    if item.clicked() && current != plan {
                        app.settings.memory_plan = plan;
                        actions.push(Action::LorasChanged);
                    }
                }
            })
            .response
            .labelled_by(l.id);
        });
        ui.weak(app.settings.memory_plan.explanation());
        if let Some(m) = &app.memory {
            if !m.plan_reason.is_empty() {
                ui.label(format!("In force: {} (estimated peak {})", m.plan_reason, human_bytes(m.estimated_peak)));
            }
            let parts: Vec<String> = m.resident.iter().map(|(n, b)| format!("{n} {}", human_bytes(*b))).collect();
            let device = app.device_name.as_deref().unwrap_or("the device");
            if parts.is_empty() {
                ui.label(format!("Resident weights on {device}: none"));
            } else {
                ui.label(format!("Resident weights on {device}: {} ({})", human_bytes(m.weights_total()), parts.join(", ")));
            }
            if !m.parked.is_empty() {
                ui.weak(format!("Parked (reloaded when a job needs it): {}", m.parked.join(", ")));
                if !m.read_ahead.is_empty() {
                    ui.weak(format!("Read ahead into memory at start, for a quick first load: {}", m.read_ahead.join(", ")));
                }
            }
            if !m.released.is_empty() {
                ui.weak(format!("Released (loaded to encode a new prompt): {}", m.released.join(", ")));
            }
            if let Some(p) = m.process_bytes {
                ui.weak(format!("This process holds {} of RAM.", human_bytes(p)));
            }
            if let Some(d) = m.device_memory {
                // The pools keep freed pages for reuse, so the driver's "used" can be far above the tensors'.
                ui.weak(format!(
                    "On {device}: {} in tensors, {} held by the memory pools.",
                    human_bytes(d.in_use),
                    human_bytes(d.reserved)
                ));
            }
        }
        ui.separator();
        ui.strong("Models on this computer");
        models::found_models(app, ui, actions);
        ui.separator();
        ui.strong("Download from Hugging Face");
        models::downloads(app, ui, actions, &["turbo", "base"]);
        for slot in [ModelSlot::Turbo, ModelSlot::Base] {
            ui.separator();
            ui.strong(format!("{} LoRAs", slot.label()));
            models::loras(app, ui, actions, slot);
        }
      });
    });
    if !open {
        app.show_settings = false;
    }
}

/// Applies the model and save-folder fields as they are typed.
fn apply_form(app: &StudioApp, actions: &mut Vec<Action>) {
    let [turbo, base, output] = app.settings_form.clone();
    actions.push(Action::ApplyModels { turbo, base, output });
}
