//! Closing the window while images are still being made asks first: queued
//! Base refines and variations are not kept across a restart.

use crate::app::{Action, StudioApp};

pub fn draw(app: &mut StudioApp, ctx: &egui::Context, actions: &mut Vec<Action>) {
    let Some(what) = app.quit_asked.clone() else { return };
    let modal = egui::Modal::new(egui::Id::unique("zimage-quit")).show(ctx, |ui| {
        ui.set_width(380.0);
        ui.heading("Quit Z-Image Studio?");
        ui.label(what);
        ui.horizontal(|ui| {
            if ui.button("Quit").clicked() {
                actions.push(Action::Quit);
            }
            if ui.button("Keep working").clicked() {
                app.quit_asked = None;
            }
        });
    });
    if modal.should_close() {
        app.quit_asked = None;
    }
}
