//! First-run welcome: what the two models are, and four ways to start. No
//! network access happens unless the user clicks "Download".

use crate::app::{Action, StudioApp};
use crate::engine_bridge::ModelSlot;
use crate::ui::models;

pub fn draw(app: &mut StudioApp, ctx: &egui::Context, actions: &mut Vec<Action>) {
    if !app.show_welcome {
        return;
    }
    egui::Window::new("Welcome to Z-Image Studio")
        .collapsible(false)
        .resizable(false)
        .default_width(620.0)
        .anchor(egui::Align2::CENTER_CENTER, [0.0, 0.0])
        .show(ctx, |ui| {
            ui.label("Z-Image Studio works with two models from Alibaba's Z-Image family:");
            ui.label("• Z-Image-Turbo draws a new image in 8 steps, fast enough to follow your prompt live as you type.");
            ui.label("• Z-Image (Base) takes 28–50 steps with a negative prompt; use it to refine the Turbo images you keep.");
            ui.weak("The real models need an NVIDIA GPU with 16 GB or more to be quick; on a CPU an image takes minutes.");
            ui.add_space(8.0);

            ui.heading("Start now");
            let demo = zimage_engine::loader::resolve_model("demo-turbo").is_ok();
            ui.add_enabled_ui(demo, |ui| {
                if ui.button("Use the built-in demo model").on_hover_text("A miniature pair trained by this project on coloured shapes: tiny, instant, no download").clicked() {
                    actions.push(Action::UseModel { slot: ModelSlot::Turbo, model: "demo-turbo".into() });
                    actions.push(Action::UseModel { slot: ModelSlot::Base, model: "demo-base".into() });
                    actions.push(Action::CloseWelcome);
                }
            });
            if !demo {
                ui.weak("(the built-in demo model is not installed)");
            }
            ui.add_space(8.0);

            ui.heading("Use models you already have");
            models::found_models(app, ui, actions);
            ui.horizontal(|ui| {
                let l = ui.label("Model folder or file");
                ui.add(egui::TextEdit::singleline(&mut app.welcome_folder).desired_width(300.0).hint_text("/path/to/Z-Image-Turbo")).labelled_by(l.id);
                let current = app.welcome_folder.clone();
                if let Some(p) = super::browse_model(app, ui, &current) {
                    app.welcome_folder = p;
                }
                let path = app.welcome_folder.trim().to_string();
                if ui.add_enabled(!path.is_empty(), egui::Button::new("Use as Turbo")).clicked() {
                    actions.push(Action::UseModel { slot: ModelSlot::Turbo, model: path });
                    actions.push(Action::CloseWelcome);
                }
            });
            ui.add_space(8.0);

            ui.heading("Download");
            models::downloads(app, ui, actions, &["turbo"]);
            ui.weak("Nothing is downloaded until you click. Files go to the Hugging Face cache, shared with diffusers and ComfyUI tools.");
            ui.add_space(8.0);
            ui.separator();
            ui.horizontal(|ui| {
                if ui.button("Close").on_hover_text("Models can be set up later in Settings (Ctrl+,)").clicked() {
                    actions.push(Action::CloseWelcome);
                }
                ui.weak("Settings (Ctrl+,) has all of this later, plus LoRAs.");
            });
        });
}
