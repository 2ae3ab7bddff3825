//! Compare view: Turbo and Base side by side, wipe, flicker or difference,
//! or every refine pair of a page at once (Turbo above Base), with one
//! zoom/pan shared by all the images.

use std::sync::Arc;
use std::time::Duration;

use egui::{Color32, Rect, Sense, Slider, Stroke};
use zimage_engine::preview::RgbImage;

use crate::app::{Action, StudioApp};
use crate::state::{difference_heatmap, pair_grid_columns, CompareMode};

/// Half the width, in points, of the strip along the wipe line that drags it.
const WIPE_GRIP: f32 = 10.0;

pub fn draw(app: &mut StudioApp, ui: &mut egui::Ui, _actions: &mut Vec<Action>) {
    let Some((turbo, base)) = app.compare_pair.clone() else {
        ui.centered_and_justified(|ui| {
            ui.label("Nothing to compare yet: refine a Turbo image with Base (Ctrl+Enter).");
        });
        return;
    };
    app.request_image(ui.ctx(), &turbo);
    app.request_image(ui.ctx(), &base);
    let (left, right) = if app.compare.swapped { (base.clone(), turbo.clone()) } else { (turbo.clone(), base.clone()) };
    let label = |id: &str| {
        app.history.get(id).map(|e| format!("{} #{} (seed {}, {} steps)", e.slot.label(), e.id, e.meta.seed, e.meta.steps)).unwrap_or_else(|| format!("#{id}"))
    };
    let (left_label, right_label) = (label(&left), label(&right));

    // Wraps in a narrow window: a row wider than the panel would widen the
    // whole view under the side panels.
    ui.horizontal_wrapped(|ui| {
        for m in CompareMode::ALL {
            ui.selectable_value(&mut app.compare.mode, m, m.label());
        }
        ui.separator();
        if ui.button("Swap (C)").clicked() {
            app.compare.swapped = !app.compare.swapped;
        }
        super::zoom_buttons(ui, &mut app.compare.view);
    });
    let pairs = app.refine_pairs();
    let at = pairs.iter().position(|p| *p == (turbo.clone(), base.clone()));
    if let (Some(at), true) = (at, pairs.len() > 1) {
        ui.horizontal(|ui| {
            if ui.add_enabled(at > 0, egui::Button::new("Previous")).on_hover_text("The refine before this one (Left arrow key)").clicked() {
                app.step_compare_pair(-1);
            }
            ui.label(format!("pair {} of {}", at + 1, pairs.len()));
            if ui.add_enabled(at + 1 < pairs.len(), egui::Button::new("Next")).on_hover_text("The refine after this one (Right arrow key)").clicked() {
                app.step_compare_pair(1);
            }
        });
    }
    let all_pairs = app.compare.mode == CompareMode::AllPairs;
    let (shown, first, total) = if all_pairs { app.shown_pairs() } else { (Vec::new(), 0, 0) };
    if all_pairs {
        for (t, b) in &shown {
            app.request_image(ui.ctx(), t);
            app.request_image(ui.ctx(), b);
        }
        let (above, below) = if app.compare.swapped { ("Base", "Turbo") } else { ("Turbo", "Base") };
        ui.label(format!(
            "Pairs {}–{} of {total}: {above} above {below}; click a pair to pick it, double-click to open it; Ctrl+S saves the {below} images",
            first + 1,
            first + shown.len()
        ));
    } else {
        ui.label(format!("Left: {left_label} · Right: {right_label}"));
    }
    if let (Some(l), Some(r)) = (app.history.get(&left), app.history.get(&right)) {
        let diffs = crate::state::parameter_differences(&l.meta, &r.meta);
        ui.weak(if diffs.is_empty() { "Same parameters".to_string() } else { format!("Differs: {}", diffs.join(" · ")) });
    }
    match app.compare.mode {
        CompareMode::Wipe => {
            let l = ui.label("Split");
            ui.add(Slider::new(&mut app.compare.split, 0.0..=1.0).show_value(false)).labelled_by(l.id);
        }
        CompareMode::Flicker => {
            ui.checkbox(&mut app.compare.flicker_auto, "Auto flicker (Space flips by hand)");
        }
        _ => {}
    }

    let avail = ui.available_rect_before_wrap();
    let response = ui.allocate_rect(avail, Sense::click_and_drag());
    let size = app.images.texture(&left).map(|t| t.size_vec2()).unwrap_or(egui::vec2(1.0, 1.0));
    // All pairs: a grid of cells, each a pair one image above the other.
    let cells: Vec<Rect> = if all_pairs {
        let cols = pair_grid_columns(shown.len(), avail.width(), avail.height(), size.x / size.y.max(1.0));
        let rows = shown.len().div_ceil(cols).max(1);
        let cell = egui::vec2(avail.width() / cols as f32, avail.height() / rows as f32);
        (0..shown.len())
            .map(|k| Rect::from_min_size(avail.min + egui::vec2((k % cols) as f32 * cell.x, (k / cols) as f32 * cell.y), cell))
            .collect()
    } else {
        Vec::new()
    };
    app.compare.pair_cells = cells.clone();
    // Where each image is drawn: side by side two halves, all pairs two per
    // cell (touching, centred), else one rect that both share.
    let pair_in = |cell: &Rect| super::fit_rect(cell.shrink(4.0), egui::vec2(size.x, 2.0 * size.y)).split_top_bottom_at_fraction(0.5);
    let drawn: Vec<Rect> = match app.compare.mode {
        CompareMode::SideBySide => {
            let (l, r) = avail.split_left_right_at_fraction(0.5);
            vec![super::fit_rect(l.shrink(4.0), size), super::fit_rect(r.shrink(4.0), size)]
        }
        CompareMode::AllPairs => cells.iter().flat_map(|c| <[Rect; 2]>::from(pair_in(c))).collect(),
        _ => vec![super::fit_rect(avail.shrink(4.0), size)],
    };
    // Wipe: the split line itself can be dragged (as in imgsli), not only the
    // slider above. Registered after the image's own response, so a drag that
    // starts on the line moves it; one anywhere else pans.
    if app.compare.mode == CompareMode::Wipe {
        let rect = drawn[0];
        let x = rect.left() + rect.width() * app.compare.split;
        let grip = Rect::from_x_y_ranges(x - WIPE_GRIP..=x + WIPE_GRIP, rect.y_range()).intersect(avail);
        let handle =
            ui.interact(grip, ui.scope_id().with("wipe split"), Sense::drag()).on_hover_cursor(egui::CursorIcon::ResizeHorizontal);
        if let Some(p) = handle.interact_pointer_pos().filter(|_| handle.dragged()) {
            app.compare.split = ((p.x - rect.left()) / rect.width().max(1.0)).clamp(0.0, 1.0);
        }
    }
    // Shared zoom/pan: scrolling over any image zooms them all about the
    // same image point, dragging pans them all.
    super::zoom_input(ui, &response, &mut app.compare.view, &drawn, size);
    let uv = app.compare.view.uv();

    let painter = ui.painter_at(avail);
    let tex = |id: &str| app.images.texture(id).map(|t| t.id());
    let caption = |rect: Rect, text: &str| {
        super::caption_on_image(&painter, text.to_string(), rect.left_top() + egui::vec2(6.0, 6.0), egui::Align2::LEFT_TOP, 13.0, rect.width() - 12.0);
    };
    match app.compare.mode {
        CompareMode::SideBySide => {
            for (rect, id, text) in [(drawn[0], &left, &left_label), (drawn[1], &right, &right_label)] {
                if let Some(t) = tex(id) {
                    painter.image(t, rect, uv, Color32::WHITE);
                }
                caption(rect, text);
            }
        }
        CompareMode::Wipe => {
            let rect = drawn[0];
            let x = rect.left() + rect.width() * app.compare.split;
            if let Some(t) = tex(&left) {
                painter.image(t, rect, uv, Color32::WHITE);
            }
            if let Some(t) = tex(&right) {
                let clip = Rect::from_min_max(egui::pos2(x, rect.top()), rect.max);
                painter.with_clip_rect(clip.intersect(avail)).image(t, rect, uv, Color32::WHITE);
            }
            painter.line_segment([egui::pos2(x, rect.top()), egui::pos2(x, rect.bottom())], Stroke::new(2.0, Color32::WHITE));
            // A grip in the middle says the line can be dragged.
            let mid = egui::pos2(x, rect.center().y.clamp(avail.top() + 12.0, avail.bottom() - 12.0));
            painter.circle(mid, 12.0, Color32::from_black_alpha(160), Stroke::new(2.0, Color32::WHITE));
            for dir in [-1.0, 1.0] {
                let tip = mid + egui::vec2(dir * 8.0, 0.0);
                let back = mid + egui::vec2(dir * 3.0, 0.0);
                let arrow = vec![tip, back + egui::vec2(0.0, -4.0), back + egui::vec2(0.0, 4.0)];
                painter.add(egui::Shape::convex_polygon(arrow, Color32::WHITE, Stroke::NONE));
            }
            caption(rect, &format!("{left_label}  |  {right_label}"));
        }
        CompareMode::Flicker => {
            if app.compare.flicker_auto {
                let t = ui.input(|i| i.time);
                app.compare.flicker_second = (t / 0.6) as u64 % 2 == 1;
                ui.ctx().request_repaint_after(Duration::from_millis(100));
            }
            let rect = drawn[0];
            let (id, text) = if app.compare.flicker_second { (&right, &right_label) } else { (&left, &left_label) };
            if let Some(t) = tex(id) {
                painter.image(t, rect, uv, Color32::WHITE);
            }
            caption(rect, text);
        }
        CompareMode::Difference => {
            let key = format!("diff:{turbo}:{base}");
            app.images.touch(&key);
            if !app.images.contains(&key) {
                if let (Some(a), Some(b)) = (app.images.rgb(&turbo), app.images.rgb(&base)) {
                    if (a.width, a.height) == (b.width, b.height) {
                        let pixels = difference_heatmap(&a.pixels, &b.pixels);
                        app.images.put(ui.ctx(), &key, Arc::new(RgbImage { width: a.width, height: a.height, pixels }));
                    }
                }
            }
            let rect = drawn[0];
            match app.images.texture(&key).map(|t| t.id()) {
                Some(t) => {
                    painter.image(t, rect, uv, Color32::WHITE);
                    caption(rect, "difference ×4 (black = same, red, yellow, white = more different)");
                }
                None => caption(rect, "the two images differ in size; no difference map"),
            }
        }
        CompareMode::AllPairs => {
            let current = app.compare_pair.clone();
            for (cell, pair) in cells.iter().zip(&shown) {
                let (top, bottom) = pair_in(cell);
                let (above, below) = if app.compare.swapped { (&pair.1, &pair.0) } else { (&pair.0, &pair.1) };
                for (rect, id) in [(top, above), (bottom, below)] {
                    if let Some(t) = tex(id) {
                        painter.image(t, rect, uv, Color32::WHITE);
                    }
                    caption(rect, &format!("#{id}"));
                }
                if current.as_ref() == Some(pair) {
                    let stroke = Stroke::new(2.0, ui.visuals().selection.stroke.color);
                    painter.rect_stroke(top.union(bottom).expand(2.0), 2.0, stroke, egui::StrokeKind::Outside);
                }
            }
            // Click picks a pair (its parameters in the line above); a
            // double click opens it side by side.
            let hit = response.interact_pointer_pos().and_then(|p| cells.iter().position(|c| c.contains(p)));
            if let (Some(k), true) = (hit, response.clicked() || response.double_clicked()) {
                app.show_pair(shown[k].clone());
                if response.double_clicked() {
                    app.compare.mode = CompareMode::SideBySide;
                }
            }
        }
    }
}

