//! Variations grid: N Turbo images (seed, seed+1, …) streaming in, with
//! keyboard triage (K keep, X reject, S star).

use egui::{Color32, Rect, Sense, Stroke, StrokeKind};

use crate::app::{Action, StudioApp};
use crate::state::{variation_grid, Mark, VARIATION_SIDES};

pub fn draw(app: &mut StudioApp, ui: &mut egui::Ui, actions: &mut Vec<Action>) {
    if app.variations.is_empty() {
        ui.vertical_centered(|ui| {
            ui.add_space(ui.available_height() / 3.0);
            ui.label(format!("No variations yet: {} Turbo images of the prompt at seed, seed+1, …, to triage.", app.settings.variations));
            if ui.button("Generate grid (Ctrl+G)").clicked() {
                actions.push(Action::Variations);
            }
        });
        return;
    }
    let kept = app.variations.iter().filter(|c| c.id.as_ref().and_then(|id| app.history.get(id)).is_some_and(|e| e.mark.is_kept())).count();
    let running: Vec<_> = app.variations.iter().filter(|c| c.id.is_none() && c.error.is_none()).filter_map(|c| c.job).collect();
    // Wraps in a narrow window: a wider row would widen the view under the history panel.
    ui.horizontal_wrapped(|ui| {
        let done = app.variations.len() - running.len();
        // The time left once it is worth saying (a grid of the real model takes minutes).
        let eta = app
            .variations_left()
            .filter(|d| *d >= std::time::Duration::from_secs(2))
            .map_or(String::new(), |d| format!(", about {} left", crate::state::human_duration(d)));
        let progress = if running.is_empty() { String::new() } else { format!(" · {done} done{eta}") };
        ui.label(format!("{} variations{progress} · {kept} kept · arrows move, K keep, X reject, S star, Enter open, +/- size", app.variations.len()));
        if !running.is_empty()
            && ui.button(format!("Stop ({} left)", running.len())).on_hover_text("Cancel the variations not finished yet; the finished ones stay").clicked()
        {
            actions.extend(running.iter().map(|job| Action::Cancel(*job)));
        }
        if ui.add_enabled(kept > 0, egui::Button::new(format!("Refine {kept} kept with Base"))).clicked() {
            actions.push(Action::RefineKept);
        }
    });
    let n = app.variations.len();
    let (w, h) = (app.settings.width as f32, app.settings.height as f32);
    let pane = ui.available_rect_before_wrap();
    let side = app.settings.grid_thumbnail.clamp(*VARIATION_SIDES.start(), *VARIATION_SIDES.end());
    let (cols, cell) = variation_grid(n, pane.width(), pane.height(), w / h.max(1.0), side);
    // The arrow keys move by the columns shown.
    app.var_columns = cols;
    egui::ScrollArea::vertical().auto_shrink(false).show(ui, |ui| {
        let (grid, _) = ui.allocate_exact_size(egui::vec2(pane.width(), n.div_ceil(cols) as f32 * cell.y), Sense::hover());
        draw_cells(app, ui, actions, grid, cols, cell);
    });
}

/// The cells of the grid laid out in `grid`: `cols` columns of `cell`.
fn draw_cells(app: &mut StudioApp, ui: &mut egui::Ui, actions: &mut Vec<Action>, grid: Rect, cols: usize, cell: egui::Vec2) {
    let (w, h) = (app.settings.width as f32, app.settings.height as f32);
    for (i, c) in app.variations.clone().iter().enumerate() {
        let min = grid.min + egui::vec2((i % cols) as f32 * cell.x, (i / cols) as f32 * cell.y);
        let slot = Rect::from_min_size(min, cell).shrink(4.0);
        if i == app.var_cursor && app.var_reveal {
            ui.scroll_to_rect(slot, None);
            app.var_reveal = false;
        }
        let response = ui.interact(slot, ui.scope_id().with(("var", i)), Sense::click());
        let key = c.id.clone().unwrap_or_else(|| format!("var:{}", c.job.unwrap_or_default()));
        match &c.id {
            Some(id) => app.request_image(ui.ctx(), id),
            None => app.images.touch(&key),
        }
        let rect = super::fit_rect(slot.shrink(2.0), egui::vec2(w, h));
        let painter = ui.painter_at(slot);
        match app.images.texture(&key) {
            Some(t) => {
                painter.image(t.id(), rect, Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)), Color32::WHITE);
            }
            None => {
                painter.rect_filled(rect, 2.0, ui.visuals().extreme_bg_color);
            }
        }
        let mark = c.id.as_ref().and_then(|id| app.history.get(id)).map(|e| e.mark).unwrap_or_default();
        if mark == Mark::Rejected {
            painter.rect_filled(rect, 0.0, Color32::from_black_alpha(170));
        }
        let (stroke_color, badge) = match mark {
            Mark::Kept => (Color32::from_rgb(80, 200, 120), "kept"),
            Mark::Starred => (Color32::GOLD, "* starred"),
            Mark::Rejected => (Color32::from_rgb(200, 70, 70), "rejected"),
            Mark::None => (Color32::TRANSPARENT, ""),
        };
        if stroke_color != Color32::TRANSPARENT {
            painter.rect_stroke(rect, 2.0, Stroke::new(3.0, stroke_color), StrokeKind::Inside);
        }
        if i == app.var_cursor {
            // Inside: the painter clips to `slot`, and an outside frame would be clipped away.
            painter.rect_stroke(slot, 2.0, Stroke::new(2.0, ui.visuals().selection.stroke.color), StrokeKind::Inside);
        }
        let status = match (&c.id, &c.error) {
            (_, Some(e)) => format!("seed {} · {e}", c.seed),
            (Some(_), _) => format!("seed {} {badge}", c.seed),
            (None, _) => {
                let paused = if c.job.and_then(|j| app.jobs.get(&j)).is_some_and(|j| j.paused) { " paused" } else { "" };
                format!("seed {} · {}/{}{paused}", c.seed, c.progress.0, c.progress.1)
            }
        };
        super::caption_on_image(&painter, status, rect.left_bottom() + egui::vec2(5.0, -5.0), egui::Align2::LEFT_BOTTOM, 12.0, rect.width() - 10.0);
        if response.clicked() {
            app.move_grid_cursor(i);
        }
        if response.double_clicked() {
            if let Some(id) = &c.id {
                actions.push(Action::Restore(id.clone()));
            }
        }
    }
}
