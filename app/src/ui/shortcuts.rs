//! Keyboard shortcuts, read before the widgets so that Ctrl+Enter and Ctrl+S
//! work even while the prompt box has focus. Single-letter keys only act when
//! no text field is being edited.

use egui::{Key, Modifiers};

use crate::app::{Action, StudioApp};
use crate::state::{Mark, View};

/// (keys, what) for the help overlay.
pub const SHORTCUTS: &[(&str, &str)] = &[
    ("type", "live Turbo preview (prompt box has focus at start)"),
    ("F5", "generate now (applies the seed mode: fixed / random / +1)"),
    ("Ctrl+Enter", "refine the selected Turbo image with Base"),
    ("Ctrl+G", "generate N variations (seed, seed+1, …)"),
    ("Ctrl+Shift+Enter", "refine all kept variations with Base"),
    ("Ctrl+S", "save the selected image (all kept ones in the grid)"),
    ("Ctrl+Shift+S", "save as…"),
    ("Ctrl+,", "settings (models, save folder)"),
    ("1 / 2 / 3", "Live / Variations / Compare view"),
    ("arrows", "move in the variations grid"),
    ("K / X / S", "keep / reject / star the variation"),
    ("Enter", "open the variation in the Live view"),
    ("C", "compare: swap sides"),
    ("M", "compare: next mode (side by side, wipe, flicker, difference)"),
    ("Space", "compare: flip the flicker image"),
    ("scroll / drag", "compare: zoom / pan both images together"),
    ("Esc", "leave the prompt box / close overlays"),
    ("F1 or ?", "this help"),
];

pub fn handle(app: &mut StudioApp, ctx: &egui::Context, actions: &mut Vec<Action>) {
    let cmd_shift = Modifiers::COMMAND | Modifiers::SHIFT;
    ctx.input_mut(|i| {
        if i.consume_key(cmd_shift, Key::Enter) {
            actions.push(Action::RefineKept);
        }
        if i.consume_key(Modifiers::COMMAND, Key::Enter) {
            actions.push(Action::Refine);
        }
        if i.consume_key(cmd_shift, Key::S) {
            actions.push(Action::SaveAs);
        }
        if i.consume_key(Modifiers::COMMAND, Key::S) {
            actions.push(Action::Save);
        }
        if i.consume_key(Modifiers::COMMAND, Key::G) {
            actions.push(Action::Variations);
        }
        if i.consume_key(Modifiers::COMMAND, Key::Comma) {
            app.show_settings = !app.show_settings;
        }
        if i.consume_key(Modifiers::NONE, Key::F5) {
            actions.push(Action::Generate);
        }
        if i.consume_key(Modifiers::NONE, Key::F1) {
            app.show_help = !app.show_help;
        }
    });
    if ctx.input(|i| i.key_pressed(Key::Escape)) {
        if app.show_help || app.show_settings {
            app.show_help = false;
            app.show_settings = false;
        } else {
            ctx.memory_mut(|m| {
                if let Some(id) = m.focused() {
                    m.surrender_focus(id);
                }
            });
        }
    }
    if ctx.egui_wants_keyboard_input() {
        return;
    }
    let typed = |c: &str| ctx.input(|i| i.events.iter().any(|e| matches!(e, egui::Event::Text(t) if t == c)));
    let key = |k: Key| ctx.input(|i| i.key_pressed(k) && !i.modifiers.command);
    if typed("?") {
        app.show_help = !app.show_help;
    }
    for (k, v) in [(Key::Num1, View::Live), (Key::Num2, View::Variations), (Key::Num3, View::Compare)] {
        if key(k) {
            actions.push(Action::ShowView(v));
        }
    }
    match app.view {
        View::Compare => {
            if key(Key::C) {
                app.compare.swapped = !app.compare.swapped;
            }
            if key(Key::M) {
                app.compare.mode = app.compare.mode.next();
            }
            if key(Key::Space) {
                app.compare.flicker_auto = false;
                app.compare.flicker_second = !app.compare.flicker_second;
            }
        }
        View::Variations => {
            let n = app.variations.len();
            if n == 0 {
                return;
            }
            let cols = crate::ui::variations::columns(n);
            let c = &mut app.var_cursor;
            if key(Key::ArrowRight) {
                *c = (*c + 1).min(n - 1);
            }
            if key(Key::ArrowLeft) {
                *c = c.saturating_sub(1);
            }
            if key(Key::ArrowDown) && *c + cols < n {
                *c += cols;
            }
            if key(Key::ArrowUp) && *c >= cols {
                *c -= cols;
            }
            let id = app.variations.get(app.var_cursor).and_then(|c| c.id.clone());
            if let Some(id) = id {
                for (k, m) in [(Key::K, Mark::Kept), (Key::X, Mark::Rejected), (Key::S, Mark::Starred)] {
                    if key(k) {
                        actions.push(Action::Mark(id.clone(), m));
                    }
                }
                if key(Key::Enter) {
                    actions.push(Action::Select(id));
                }
            }
        }
        View::Live => {}
    }
}
