//! Drawing: one module per panel. Panels read the app state, edit plain
//! fields directly and push [`Action`]s for anything that does more.

pub mod canvas;
pub mod compare;
pub mod controls;
pub mod help;
pub mod history;
pub mod models;
pub mod settings;
pub mod shortcuts;
pub mod status;
pub mod variations;
pub mod welcome;

use egui::{Rect, Vec2};

use crate::app::{Action, StudioApp};
use crate::state::View;

pub fn draw(app: &mut StudioApp, ui: &mut egui::Ui) {
    let ctx = ui.ctx().clone();
    let mut actions = Vec::new();
    shortcuts::handle(app, &ctx, &mut actions);
    egui::Panel::top("top_bar").show(ui, |ui| top_bar(app, ui, &mut actions));
    egui::Panel::bottom("status_bar").show(ui, |ui| status::draw(app, ui, &mut actions));
    egui::Panel::left("controls").resizable(true).default_size(330.0).min_size(260.0).show(ui, |ui| {
        egui::ScrollArea::vertical().show(ui, |ui| controls::draw(app, ui, &mut actions));
    });
    egui::Panel::right("history")
        .resizable(true)
        .default_size(230.0)
        .min_size(160.0)
        .show(ui, |ui| history::draw(app, ui, &mut actions));
    egui::CentralPanel::default().show(ui, |ui| match app.view {
        View::Live => canvas::draw(app, ui, &mut actions),
        View::Variations => variations::draw(app, ui, &mut actions),
        View::Compare => compare::draw(app, ui, &mut actions),
    });
    settings::draw(app, &ctx, &mut actions);
    welcome::draw(app, &ctx, &mut actions);
    help::draw(app, &ctx);
    for a in actions {
        app.apply(&ctx, a);
    }
}

fn top_bar(app: &mut StudioApp, ui: &mut egui::Ui, actions: &mut Vec<Action>) {
    ui.horizontal(|ui| {
        ui.heading("Z-Image Studio");
        ui.separator();
        for (view, label) in
            [(View::Live, "Live (1)"), (View::Variations, "Variations (2)"), (View::Compare, "Compare (3)")]
        {
            if ui.selectable_label(app.view == view, label).clicked() {
                actions.push(Action::ShowView(view));
            }
        }
        ui.separator();
        status::model_chips(app, ui);
        ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
            if ui.button("Help (F1)").clicked() {
                app.show_help = !app.show_help;
            }
            if ui.button("Settings").clicked() {
                app.show_settings = !app.show_settings;
            }
        });
    });
}

/// The largest rect with the aspect of `size` that fits in `avail`, centred.
pub fn fit_rect(avail: Rect, size: Vec2) -> Rect {
    if size.x <= 0.0 || size.y <= 0.0 {
        return avail;
    }
    let scale = (avail.width() / size.x).min(avail.height() / size.y);
    Rect::from_center_size(avail.center(), size * scale)
}
