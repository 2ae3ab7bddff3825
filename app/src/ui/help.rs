//! Help overlay (F1 or ?).

use crate::app::StudioApp;
use crate::ui::shortcuts::SHORTCUTS;

pub fn draw(app: &mut StudioApp, ctx: &egui::Context) {
    if !app.show_help {
        return;
    }
    egui::Window::new("Keyboard shortcuts")
        .open(&mut app.show_help)
        .collapsible(false)
        .resizable(false)
        .anchor(egui::Align2::CENTER_CENTER, [0.0, 0.0])
        .max_height(ctx.content_rect().height() - 60.0)
        .show(ctx, |ui| {
            // Scrolls in a window too short for the whole list.
            egui::ScrollArea::vertical().show(ui, |ui| {
                egui::Grid::new("shortcuts").num_columns(2).striped(true).show(ui, |ui| {
                    for (keys, what) in SHORTCUTS {
                        ui.strong(*keys);
                        ui.label(*what);
                        ui.end_row();
                    }
                });
            });
        });
}
