//! Right panel: every result, newest first, with lineage, or only the Base
//! images or the kept ones. Click restores the parameters; double-click a
//! Base image to compare it with its parent.

use egui::{Color32, Sense};

use crate::app::{Action, StudioApp};
use crate::state::{HistoryFilter, Mark};

const THUMB: f32 = 56.0;

pub fn draw(app: &mut StudioApp, ui: &mut egui::Ui, actions: &mut Vec<Action>) {
    let filter = app.history_filter;
    let ids = app.listed_history();
    ui.horizontal(|ui| {
        ui.strong("History");
        let total = app.history.entries().len();
        let everything = filter == HistoryFilter::All && app.history_search.trim().is_empty();
        ui.weak(if everything { format!("{total} images") } else { format!("{} of {total}", ids.len()) });
        let hint = "Remove the rejected images and the unmarked Turbo images nothing was made from (asks first)";
        if ui.small_button("Clean up…").on_hover_text(hint).clicked() {
            actions.push(Action::PlanCleanup);
        }
    });
    ui.horizontal(|ui| {
        for f in HistoryFilter::ALL {
            ui.selectable_value(&mut app.history_filter, f, f.label());
        }
    });
    ui.horizontal(|ui| {
        let l = ui.label("Search");
        let field = egui::TextEdit::singleline(&mut app.history_search).hint_text("words of the prompt, or a seed").desired_width(f32::INFINITY);
        ui.add(field).labelled_by(l.id);
    });
    ui.weak("click: restore · double-click Base: compare · right-click: keep, star");
    ui.separator();
    if filter == HistoryFilter::Kept {
        let n = app.kept_unrefined().len();
        if n > 0 && ui.button(format!("Refine {n} kept with Base")).on_hover_text("The kept Turbo images not refined yet (Ctrl+Shift+Enter)").clicked() {
            actions.push(Action::RefineKept);
        }
    }
    if ids.is_empty() && !app.history_search.trim().is_empty() {
        ui.weak("No image's prompt holds all of these words.");
    } else if ids.is_empty() && filter != HistoryFilter::All {
        ui.weak(match filter {
            HistoryFilter::Base => "No Base image yet: refine a Turbo image (Ctrl+Enter).",
            _ => "Nothing kept yet: K keeps a variation, S stars it.",
        });
    }
    let mut scroll = egui::ScrollArea::vertical().auto_shrink([false, false]);
    if std::mem::take(&mut app.reveal_selected) {
        // Rows are drawn only when visible: scroll by row, two rows above it.
        let at = app.selected.as_ref().and_then(|s| ids.iter().position(|i| i == s)).unwrap_or(0);
        let row = THUMB + 6.0 + ui.spacing().item_spacing.y;
        scroll = scroll.vertical_scroll_offset((at as f32 - 2.0).max(0.0) * row);
    }
    scroll.show_rows(ui, THUMB + 6.0, ids.len(), |ui, range| {
        for id in &ids[range] {
            let Some(e) = app.history.get(id).cloned() else { continue };
            let thumb = app.request_thumbnail(ui.ctx(), id);
            let selected = app.selected.as_deref() == Some(id.as_str());
            let r = ui
                .horizontal(|ui| {
                    let (rect, _) = ui.allocate_exact_size(egui::vec2(THUMB, THUMB), Sense::hover());
                    match app.images.texture(&thumb) {
                        Some(t) => {
                            ui.painter().image(t.id(), rect, egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)), Color32::WHITE);
                        }
                        None => {
                            ui.painter().rect_filled(rect, 2.0, ui.visuals().extreme_bg_color);
                            if let Some(why) = app.unreadable.get(&thumb) {
                                let word = if why.contains("is missing") { "missing" } else { "unreadable" };
                                let color = ui.visuals().error_fg_color;
                                ui.painter().text(rect.center(), egui::Align2::CENTER_CENTER, word, egui::FontId::proportional(12.0), color);
                            }
                        }
                    }
                    // The mark as the grid shows it, a frame in its colour, and in
                    // words at the start of the last line (the first keeps its seed in view).
                    let (mark, colour) = match e.mark {
                        Mark::Kept => ("[kept]", Some(Color32::from_rgb(80, 200, 120))),
                        Mark::Starred => ("[star]", Some(Color32::GOLD)),
                        Mark::Rejected => ("[rejected]", Some(Color32::from_rgb(200, 70, 70))),
                        Mark::None => ("", None),
                    };
                    if let Some(colour) = colour {
                        ui.painter().rect_stroke(rect, 2.0, egui::Stroke::new(2.0, colour), egui::StrokeKind::Inside);
                    }
                    ui.vertical(|ui| {
                        // One line each, cut with "…": every row is the thumbnail's
                        // height, as the list's row-by-row scrolling assumes.
                        ui.add(egui::Label::new(format!("#{} {} · {}", e.id, e.slot.label(), e.meta.seed)).truncate());
                        ui.add(egui::Label::new(egui::RichText::new(&e.meta.prompt).weak()).truncate());
                        let notes = [Some(mark.to_string()).filter(|m| !m.is_empty()), e.notes()].into_iter().flatten().collect::<Vec<_>>();
                        if !notes.is_empty() {
                            ui.add(egui::Label::new(egui::RichText::new(notes.join(" ")).weak()).truncate());
                        }
                    });
                })
                .response;
            let r = ui.interact(r.rect, ui.scope_id().with(("hist", id)), Sense::click());
            if selected {
                ui.painter().rect_stroke(r.rect, 2.0, egui::Stroke::new(1.5, ui.visuals().selection.stroke.color), egui::StrokeKind::Inside);
            }
            if r.double_clicked() && e.parent.is_some() {
                actions.push(Action::CompareWith(id.clone()));
            } else if r.clicked() {
                actions.push(Action::Restore(id.clone()));
            }
            // Any image can join the kept set (a live one, a Base final).
            r.context_menu(|ui| {
                for (mark, label) in [(Mark::Kept, "Keep"), (Mark::Starred, "Star"), (Mark::Rejected, "Reject")] {
                    let label = if e.mark == mark { format!("Un-{}", label.to_lowercase()) } else { label.to_string() };
                    if ui.button(label).clicked() {
                        actions.push(Action::Mark(id.clone(), mark));
                        ui.close();
                    }
                }
                ui.separator();
                if ui.button("Delete").on_hover_text("Remove it from the history and delete its file").clicked() {
                    actions.push(Action::RemoveImages(vec![id.clone()]));
                    ui.close();
                }
            });
        }
    });
}

/// The clean up's confirmation: what goes, how much, what stays.
pub fn cleanup_dialog(app: &mut StudioApp, ctx: &egui::Context, actions: &mut Vec<Action>) {
    let Some(plan) = app.cleanup.clone() else { return };
    let modal = egui::Modal::new(egui::Id::unique("zimage-history-cleanup")).show(ctx, |ui| {
        ui.set_width(380.0);
        ui.heading("Clean up the history");
        if plan.ids.is_empty() {
            ui.label("Nothing to remove: no rejected images, and every unmarked Turbo image was refined from or is on screen.");
            if ui.button("Close").clicked() {
                app.cleanup = None;
            }
            return;
        }
        let n = plan.ids.len();
        ui.label(format!(
            "Remove {n} image{} ({}): the rejected ones and the unmarked Turbo images nothing was made from. Their files are deleted.",
            if n == 1 { "" } else { "s" },
            crate::state::human_bytes(plan.bytes)
        ));
        ui.weak("Kept and starred images, the other Base images, the Turbo images they were refined from and the image on screen stay. Images you saved elsewhere are not touched.");
        ui.horizontal(|ui| {
            if ui.button(format!("Remove {n}")).clicked() {
                actions.push(Action::RemoveImages(plan.ids.clone()));
            }
            if ui.button("Cancel").clicked() {
                app.cleanup = None;
            }
        });
    });
    if modal.should_close() {
        app.cleanup = None;
    }
}
