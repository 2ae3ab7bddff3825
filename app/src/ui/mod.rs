//! Drawing: one module per panel. Panels read the app state, edit plain
//! fields directly and push [`Action`]s for anything that does more.

pub mod canvas;
pub mod compare;
pub mod controls;
pub mod help;
pub mod history;
pub mod models;
pub mod quit;
pub mod settings;
pub mod shortcuts;
pub mod status;
pub mod variations;
pub mod welcome;

use egui::{Rect, Vec2};

use crate::app::{Action, StudioApp};
use crate::state::{View, ZoomView};

pub fn draw(app: &mut StudioApp, ui: &mut egui::Ui) {
    let ctx = ui.ctx().clone();
    let mut actions = Vec::new();
    shortcuts::handle(app, &ctx, &mut actions);
    egui::Panel::top("top_bar").show(ui, |ui| top_bar(app, ui, &mut actions));
    egui::Panel::bottom("status_bar").show(ui, |ui| status::draw(app, ui, &mut actions));
    egui::Panel::left("controls").resizable(true).default_size(330.0).min_size(260.0).show(ui, |ui| {
        egui::ScrollArea::vertical().show(ui, |ui| controls::draw(app, ui, &mut actions));
    });
    if app.settings.show_history {
        egui::Panel::right("history")
            .resizable(true)
            .default_size(230.0)
            .min_size(160.0)
            .show(ui, |ui| history::draw(app, ui, &mut actions));
    }
    egui::CentralPanel::default().show(ui, |ui| match app.view {
        View::Live => canvas::draw(app, ui, &mut actions),
        View::Variations => variations::draw(app, ui, &mut actions),
        View::Compare => compare::draw(app, ui, &mut actions),
    });
    history::cleanup_dialog(app, &ctx, &mut actions);
    settings::draw(app, &ctx, &mut actions);
    welcome::draw(app, &ctx, &mut actions);
    help::draw(app, &ctx);
    quit::draw(app, &ctx, &mut actions);
    for a in actions {
        app.apply(&ctx, a);
    }
}

fn top_bar(app: &mut StudioApp, ui: &mut egui::Ui, actions: &mut Vec<Action>) {
    ui.horizontal(|ui| {
        // The buttons on the right first, so that in a narrow window the
        // model names are cut short instead of running under them.
        ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
            if ui.button("Help (F1)").clicked() {
                app.show_help = !app.show_help;
            }
            if ui.button("Settings").clicked() {
                app.show_settings = !app.show_settings;
            }
            ui.toggle_value(&mut app.settings.show_history, "History").on_hover_text("Show or hide the history panel (Ctrl+H)");
            ui.with_layout(egui::Layout::left_to_right(egui::Align::Center), |ui| {
                ui.heading("Z-Image Studio");
                ui.separator();
                for (view, name, key) in [(View::Live, "Live", 1), (View::Variations, "Variations", 2), (View::Compare, "Compare", 3)] {
                    let hint = format!("Ctrl+{key} (or {key} outside the prompt box)");
                    if ui.selectable_label(app.view == view, format!("{name} ({key})")).on_hover_text(hint).clicked() {
                        actions.push(Action::ShowView(view));
                    }
                }
                ui.separator();
                status::model_chips(app, ui);
            });
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

/// A file dialog to open, or `None` with the reason said once in the status
/// bar (`rfd` finds no dialog without a portal or zenity): type the path.
pub fn file_dialog(app: &mut StudioApp) -> Option<rfd::FileDialog> {
    if crate::app::file_dialog_available() {
        Some(rfd::FileDialog::new())
    } else {
        app.error("no file dialog on this system (needs xdg-desktop-portal or zenity): type the path instead");
        None
    }
}

/// "Browse…" for a model: a diffusers folder or a single .safetensors file
/// (ComfyUI's layout), starting where `current` points; the path picked.
pub fn browse_model(app: &mut StudioApp, ui: &mut egui::Ui, current: &str) -> Option<String> {
    let mut picked = None;
    ui.menu_button("Browse…", |ui| {
        let folder = ui.button("Folder (diffusers layout)…").clicked();
        let file = ui.button("File (.safetensors, ComfyUI)…").clicked();
        if !(folder || file) {
            return;
        }
        ui.close();
        let Some(mut dialog) = file_dialog(app) else { return };
        let current = std::path::Path::new(current.trim());
        if let Some(dir) = [Some(current), current.parent()].into_iter().flatten().find(|d| d.is_dir()) {
            dialog = dialog.set_directory(dir);
        }
        let path = if folder { dialog.pick_folder() } else { dialog.add_filter("safetensors", &["safetensors"]).pick_file() };
        picked = path.map(|p| p.display().to_string());
    });
    picked
}

/// Fit, 1:1 and the zoom readout of a zoomable image.
pub fn zoom_buttons(ui: &mut egui::Ui, view: &mut ZoomView) {
    if ui.button("Fit").on_hover_text("Show the whole image (zoom out, centre)").clicked() {
        view.fit();
    }
    let actual = view.actual_size_zoom();
    let one_to_one = ui.add_enabled(actual.is_some(), egui::Button::new("1:1"));
    let one_to_one = one_to_one
        .on_hover_text("One image pixel per screen pixel")
        .on_disabled_hover_text("The fitted image is already shown at or above its actual size");
    if let (true, Some(z)) = (one_to_one.clicked(), actual) {
        view.zoom = z;
        view.keep_inside();
    }
    // As image viewers count it: 100% is one image pixel per screen pixel.
    match view.actual_size_percent() {
        Some(p) => ui.weak(format!("zoom {p:.0}%")),
        None => ui.weak("zoom: fit"),
    };
}

/// Scrolling (or a pinch) over one of the `drawn` image rects zooms about
/// the image point under the pointer; dragging pans. Every drawn rect shows
/// the same part of its image (`pixels` wide and high), so one view serves
/// them all; the first one measures the fitted scale that 1:1 and the
/// readout count from.
pub fn zoom_input(ui: &egui::Ui, response: &egui::Response, view: &mut ZoomView, drawn: &[Rect], pixels: Vec2) {
    view.drawn = drawn.first().copied();
    if let Some(first) = drawn.first() {
        view.fit_scale = Some(first.width() / pixels.x.max(1.0) * ui.ctx().pixels_per_point());
    }
    if response.hovered() {
        let (scroll, pinch) = ui.input(|i| (i.smooth_scroll_delta.y, i.zoom_delta()));
        let factor = (1.0 + scroll * 0.002) * pinch;
        if factor != 1.0 {
            let pointer = response.hover_pos();
            let under = pointer.and_then(|p| drawn.iter().find(|r| r.contains(p)).map(|r| (p - r.min) / r.size()));
            view.zoom_about(factor, under.unwrap_or(Vec2::splat(0.5)));
        }
    }
    if response.dragged() {
        if let Some(first) = drawn.first() {
            view.drag(response.drag_delta(), first.size());
        }
    }
}

/// White text on a dark plate, so a caption over an image stays readable on
/// any image (a white background included); `anchor` places the plate's text
/// relative to `pos` as `Align2` does. One line, cut with "…" at `max_width`
/// (the image's width: a caption must not run off a small image).
pub fn caption_on_image(painter: &egui::Painter, text: String, pos: egui::Pos2, anchor: egui::Align2, size: f32, max_width: f32) {
    let mut job = egui::text::LayoutJob::single_section(text, egui::TextFormat::simple(egui::FontId::proportional(size), egui::Color32::WHITE));
    job.wrap = egui::text::TextWrapping::truncate_at_width(max_width.max(size));
    let galley = painter.layout_job(job);
    let at = anchor.anchor_size(pos, galley.size()).min;
    painter.rect_filled(Rect::from_min_size(at, galley.size()).expand(3.0), 3.0, egui::Color32::from_black_alpha(160));
    painter.galley(at, galley, egui::Color32::WHITE);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The caption's text lies on its dark plate, wherever it is anchored
    /// (the variations grid's seed labels were once white on white images).
    #[test]
    fn captions_sit_on_a_dark_plate() {
        let ctx = egui::Context::default();
        for anchor in [egui::Align2::LEFT_BOTTOM, egui::Align2::LEFT_TOP] {
            let pos = egui::pos2(100.0, 100.0);
            let out = ctx.run_ui(Default::default(), |ui| {
                caption_on_image(ui.painter(), "seed 42 kept".into(), pos, anchor, 12.0, 200.0);
            });
            let shapes: Vec<_> = out.shapes.iter().map(|s| &s.shape).collect();
            let plate = shapes.iter().find_map(|s| match s {
                egui::Shape::Rect(r) if r.fill == egui::Color32::from_black_alpha(160) => Some(r.rect),
                _ => None,
            });
            let text = shapes.iter().find_map(|s| match s {
                egui::Shape::Text(t) => Some(t.visual_bounding_rect()),
                _ => None,
            });
            let (plate, text) = (plate.expect("a plate"), text.expect("the text"));
            assert!(plate.expand(0.5).contains_rect(text), "{anchor:?}: text {text:?} outside the plate {plate:?}");
            let plate_index = shapes.iter().position(|s| matches!(s, egui::Shape::Rect(_))).unwrap();
            let text_index = shapes.iter().position(|s| matches!(s, egui::Shape::Text(_))).unwrap();
            assert!(plate_index < text_index, "the plate is painted first");
            // Anchored at `pos`: the text's corner on that side is there.
            let corner = if anchor == egui::Align2::LEFT_BOTTOM { text.left_bottom() } else { text.left_top() };
            assert!(corner.distance(pos) < 4.0, "{anchor:?}: {corner:?} far from {pos:?}");
        }
    }

    /// A caption longer than its image is cut to the image's width.
    #[test]
    fn a_long_caption_is_cut_to_the_width_it_is_given() {
        let ctx = egui::Context::default();
        let long = "#000032 · Turbo · seed 42 · 1024×1024 · full size of draft #000031".to_string();
        let out = ctx.run_ui(Default::default(), |ui| {
            caption_on_image(ui.painter(), long.clone(), egui::pos2(10.0, 100.0), egui::Align2::LEFT_BOTTOM, 13.0, 120.0);
        });
        let text = out.shapes.iter().find_map(|s| match &s.shape {
            egui::Shape::Text(t) => Some(t.galley.clone()),
            _ => None,
        });
        let galley = text.expect("the text");
        assert!(galley.size().x <= 120.5, "{}", galley.size().x);
        assert_eq!(galley.rows.len(), 1);
        let shown: String = galley.rows[0].glyphs.iter().map(|g| g.chr).collect();
        assert!(shown.ends_with('…') && shown.len() < long.len(), "{shown:?}");
    }
}
