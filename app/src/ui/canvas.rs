//! The Live view: the step previews while Turbo renders, then the image.

use egui::{Color32, Rect, Sense};

use crate::app::{Action, StudioApp};
use crate::engine_bridge::ModelSlot;

pub fn draw(app: &mut StudioApp, ui: &mut egui::Ui, actions: &mut Vec<Action>) {
    let avail = ui.available_rect_before_wrap();
    let (w, h) = (app.settings.width as f32, app.settings.height as f32);
    // While rendering show the x0 preview (latent resolution, drawn enlarged).
    // A running Base refine shows its previews here unless live typing is rendering.
    let refining = app.refine_job.and_then(|id| app.jobs.get(&id)).filter(|j| j.saw_preview && !app.live_preview).map(|j| j.progress);
    let key = if app.live_preview && app.images.contains("live") {
        Some("live".to_string())
    } else if refining.is_some() {
        Some("refine".to_string())
    } else {
        app.current.clone()
    };
    match key.as_deref() {
        // A history image: reloaded from disk if it left memory.
        Some(k) if app.history.get(k).is_some() => app.request_image(ui.ctx(), k),
        Some(k) => app.images.touch(k),
        None => {}
    }
    let tex = key.as_deref().and_then(|k| app.images.texture(k)).map(|t| (t.id(), t.size_vec2()));
    let previewing = app.live_preview || refining.is_some();
    let size = tex.map(|(_, s)| s).filter(|_| !previewing).unwrap_or(egui::vec2(w, h));
    let rect = super::fit_rect(avail.shrink(8.0), size);
    let response = ui.allocate_rect(avail, Sense::click_and_drag());
    let painter = ui.painter_at(avail);
    match tex {
        Some((id, _)) => {
            // Zoom and pan in image fractions: the same detail stays in view
            // through previews (latent size), drafts (half size) and the image.
            // Measured against the image's own pixels (a preview stands for the image it becomes).
            super::zoom_input(ui, &response, &mut app.live_view, &[rect], size);
            painter.image(id, rect, app.live_view.uv(), Color32::WHITE);
        }
        None => {
            painter.rect_filled(rect, 4.0, ui.visuals().extreme_bg_color);
            let unreadable = key.as_deref().and_then(|k| app.unreadable.get(k)).filter(|_| !previewing);
            let text = match unreadable {
                Some(why) => format!("This image cannot be shown: {why}"),
                None => app.model_problem().unwrap_or_else(|| "Type a prompt on the left; the image renders as you type.".into()),
            };
            // Wrapped: the message may be long (what to do when no model is set up) and the pane narrow.
            let galley = painter.layout(text, egui::FontId::proportional(15.0), ui.visuals().weak_text_color(), (rect.width() - 24.0).max(80.0));
            painter.galley(rect.center() - galley.size() / 2.0, galley, ui.visuals().weak_text_color());
        }
    }
    // Caption: what is shown.
    let caption = if app.live_preview {
        format!("preview · {}", app.live_status.text())
    } else if let Some((done, total)) = refining {
        format!("Base refine preview · step {done}/{total}")
    } else if let Some(e) = app.current.as_ref().and_then(|id| app.history.get(id)) {
        let parent = e.notes().map(|l| format!(" · {l}")).unwrap_or_default();
        format!("#{} · {} · seed {} · {}×{}{parent}", e.id, e.slot.label(), e.meta.seed, e.meta.width, e.meta.height)
    } else {
        String::new()
    };
    if !caption.is_empty() {
        let pos = egui::pos2(rect.left() + 6.0, rect.bottom() - 6.0);
        super::caption_on_image(&painter, caption, pos, egui::Align2::LEFT_BOTTOM, 13.0, rect.width() - 12.0);
    }
    // Zoomed in: the zoom and a way back, over the image's top right corner.
    if tex.is_some() && app.live_view.zoom > 1.0 {
        let bar = Rect::from_min_max(egui::pos2(rect.left() + 6.0, rect.top() + 6.0), egui::pos2(rect.right() - 6.0, rect.top() + 30.0));
        ui.scope_builder(egui::UiBuilder::new().max_rect(bar).layout(egui::Layout::right_to_left(egui::Align::Center)), |ui| {
            egui::Frame::new().fill(Color32::from_black_alpha(160)).corner_radius(3.0).inner_margin(3.0).show(ui, |ui| {
                ui.horizontal(|ui| super::zoom_buttons(ui, &mut app.live_view));
            });
        });
    }
    // A refined image: double-click opens it beside its Turbo parent.
    if response.double_clicked() {
        if let Some(e) = app.current.as_ref().and_then(|id| app.history.get(id)) {
            if e.slot == ModelSlot::Base && e.parent.is_some() {
                actions.push(Action::CompareWith(e.id.clone()));
            }
        }
    }
}
