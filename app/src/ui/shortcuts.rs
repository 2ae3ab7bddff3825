//! Keyboard shortcuts, read before the widgets so that Ctrl+Enter and Ctrl+S
//! work even while the prompt box has focus. Single-letter keys only act when
//! no text field is being edited.

use egui::{Key, Modifiers};

use crate::app::{Action, StudioApp};
use crate::state::{self, Mark, View};

/// (keys, what) for the help overlay.
pub const SHORTCUTS: &[(&str, &str)] = &[
    ("type", "live Turbo preview (prompt box has focus at start)"),
    ("{a|b|c}", "in the prompt: one option per image, by its seed (the variations grid explores them)"),
    ("Alt+Up / Alt+Down", "earlier / later prompts (in the prompt box)"),
    ("F5", "generate now (applies the seed mode: fixed / random / +1)"),
    ("Ctrl+Enter", "refine the Turbo image in view with Base"),
    ("Ctrl+G", "generate N variations (seed, seed+1, …)"),
    ("Ctrl+Shift+Enter", "refine all kept variations (no grid: kept history images) with Base"),
    ("Ctrl+S", "save the image in view (the grid: all kept; All pairs: every Base)"),
    ("Ctrl+Shift+S", "save as…"),
    ("Ctrl+C", "copy the image in view (outside the prompt box)"),
    ("Ctrl+,", "settings (models, save folder)"),
    ("Ctrl+H", "show / hide the history panel"),
    ("Ctrl+1 / 2 / 3", "Live / Variations / Compare view (1 / 2 / 3 outside the prompt box)"),
    ("arrows", "move in the variations grid"),
    ("Up / Down", "Live view: the newer / older image of the history, with its parameters"),
    ("K / X / S", "keep / reject / star the variation (in Live: the image shown)"),
    ("Enter", "open the variation in the Live view, its seed restored"),
    ("C", "compare: swap sides"),
    ("Left / Right", "compare: previous / next refine pair"),
    ("M", "compare: next mode (side by side, wipe, flicker, difference, all pairs)"),
    ("Space", "compare: flip the flicker image"),
    ("scroll / drag", "zoom about the pointer / pan (Live: the image; compare: both images together)"),
    ("drag the line", "compare, wipe: move the split between Turbo and Base"),
    ("+ / - / 0", "zoom in / out / fit (Live and compare); larger / smaller / default thumbnails (variations grid)"),
    ("Esc", "leave the prompt box / close overlays"),
    ("F1 or ?", "this help"),
];

pub fn handle(app: &mut StudioApp, ctx: &egui::Context, actions: &mut Vec<Action>) {
    let overlay_before = app.show_help || app.show_settings;
    handle_keys(app, ctx, actions);
    let overlay_after = app.show_help || app.show_settings;
    if !overlay_before && overlay_after {
        // egui drops focus on Escape; remember to give the prompt its focus back.
        app.refocus_after_overlay = app.prompt_id.is_some_and(|id| ctx.memory(|m| m.has_focus(id)));
    } else if overlay_before && !overlay_after && std::mem::take(&mut app.refocus_after_overlay) {
        app.focus_prompt = true;
    }
}

fn handle_keys(app: &mut StudioApp, ctx: &egui::Context, actions: &mut Vec<Action>) {
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
        if i.consume_key(Modifiers::COMMAND, Key::H) {
            app.settings.show_history = !app.settings.show_history;
        }
        if i.consume_key(Modifiers::NONE, Key::F5) {
            actions.push(Action::Generate);
        }
        if i.consume_key(Modifiers::NONE, Key::F1) {
            app.show_help = !app.show_help;
        }
        // The prompt box has focus most of the time, where a plain digit is
        // text: Ctrl+1/2/3 change the view from anywhere.
        for (key, view) in [(Key::Num1, View::Live), (Key::Num2, View::Variations), (Key::Num3, View::Compare)] {
            if i.consume_key(Modifiers::COMMAND, key) {
                actions.push(Action::ShowView(view));
            }
        }
    });
    if app.show_help || app.show_settings {
        // Consumed, so that closing an overlay does not also unfocus the prompt.
        if ctx.input_mut(|i| i.consume_key(Modifiers::NONE, Key::Escape)) {
            app.show_help = false;
            app.show_settings = false;
        }
    } else if ctx.input(|i| i.key_pressed(Key::Escape)) {
        ctx.memory_mut(|m| {
            if let Some(id) = m.focused() {
                m.surrender_focus(id);
            }
        });
    }
    recall_prompt(app, ctx, actions);
    if ctx.egui_wants_keyboard_input() {
        return;
    }
    // Ctrl+C arrives as a Copy event; in a text field it copies the text.
    if ctx.input(|i| i.events.iter().any(|e| matches!(e, egui::Event::Copy))) {
        actions.push(Action::CopyImage);
    }
    // Walk the key presses in order: several can arrive in one frame (fast
    // typists, xdotool), and "K, Right, X" must mark two different cells.
    let presses: Vec<Key> = ctx.input(|i| {
        i.events
            .iter()
            .filter_map(|e| match e {
                egui::Event::Key { key, pressed: true, modifiers, .. } if !modifiers.command && !modifiers.alt => Some(*key),
                _ => None,
            })
            .collect()
    });
    let question = ctx.input(|i| i.events.iter().any(|e| matches!(e, egui::Event::Text(t) if t == "?")));
    if question {
        app.show_help = !app.show_help;
    }
    for key in presses {
        match key {
            Key::Num1 => actions.push(Action::ShowView(View::Live)),
            Key::Num2 => actions.push(Action::ShowView(View::Variations)),
            Key::Num3 => actions.push(Action::ShowView(View::Compare)),
            // + / - / 0 zoom the image in view about its centre, or fit it.
            Key::Plus | Key::Equals | Key::Minus | Key::Num0 if app.view != View::Variations => {
                let view = if app.view == View::Live { &mut app.live_view } else { &mut app.compare.view };
                match key {
                    Key::Num0 => view.fit(),
                    Key::Minus => view.zoom_about(1.0 / 1.25, egui::Vec2::splat(0.5)),
                    _ => view.zoom_about(1.25, egui::Vec2::splat(0.5)),
                }
            }
            _ => match app.view {
                View::Compare => compare_key(app, key),
                View::Variations => variations_key(app, key, actions),
                View::Live => live_key(app, key, actions),
            },
        }
    }
}

/// Live view, outside the prompt box: ↑ / ↓ step to the newer / older image
/// of the history as listed (scrubbing back through the live images, each
/// shown with its parameters restored); K / X / S keep, reject or star the
/// image shown.
fn live_key(app: &mut StudioApp, key: Key, actions: &mut Vec<Action>) {
    match key {
        Key::ArrowUp | Key::ArrowDown => {
            let listed = app.listed_history();
            let at = app.image_in_view().and_then(|s| listed.iter().position(|i| *i == s));
            let to = match (at, key) {
                (None, _) => 0,
                (Some(i), Key::ArrowUp) => i.saturating_sub(1),
                (Some(i), _) => (i + 1).min(listed.len().saturating_sub(1)),
            };
            if let Some(id) = listed.get(to) {
                // Set now too: several presses can arrive in one frame.
                app.selected = Some(id.clone());
                app.current = Some(id.clone());
                app.reveal_selected = true;
                actions.push(Action::Restore(id.clone()));
            }
        }
        Key::K | Key::X | Key::S => {
            if let Some(id) = app.image_in_view() {
                let mark = match key {
                    Key::K => Mark::Kept,
                    Key::X => Mark::Rejected,
                    _ => Mark::Starred,
                };
                actions.push(Action::Mark(id, mark));
            }
        }
        _ => {}
    }
}

/// Alt+↑ / Alt+↓ in the prompt box: earlier / later prompts (`prompts`),
/// handled before the box is drawn so that it does not move its cursor too.
fn recall_prompt(app: &mut StudioApp, ctx: &egui::Context, actions: &mut Vec<Action>) {
    let Some(id) = app.prompt_id.filter(|id| ctx.memory(|m| m.has_focus(*id))) else { return };
    let (older, newer) =
        ctx.input_mut(|i| (i.consume_key(Modifiers::ALT, Key::ArrowUp), i.consume_key(Modifiers::ALT, Key::ArrowDown)));
    let recalled = if older {
        app.prompt_history.older(&app.prompt)
    } else if newer {
        app.prompt_history.newer()
    } else {
        None
    };
    let Some(prompt) = recalled else { return };
    app.prompt = prompt;
    // Typing goes on at the end of the recalled prompt.
    if let Some(mut state) = egui::text_edit::TextEditState::load(ctx, id) {
        let end = egui::text::CCursor::new(app.prompt.chars().count());
        state.cursor.set_char_range(Some(egui::text::CCursorRange::one(end)));
        state.store(ctx, id);
    }
    actions.push(Action::Edited);
}

fn compare_key(app: &mut StudioApp, key: Key) {
    match key {
        Key::C => app.compare.swapped = !app.compare.swapped,
        Key::ArrowLeft => app.step_compare_pair(-1),
        Key::ArrowRight => app.step_compare_pair(1),
        Key::M => app.compare.mode = app.compare.mode.next(),
        Key::Space => {
            app.compare.flicker_auto = false;
            app.compare.flicker_second = !app.compare.flicker_second;
        }
        _ => {}
    }
}

fn variations_key(app: &mut StudioApp, key: Key, actions: &mut Vec<Action>) {
    // + / - / 0: larger, smaller or the default thumbnails.
    let side = &mut app.settings.grid_thumbnail;
    match key {
        Key::Plus | Key::Equals => *side = (*side * 1.25).min(*state::VARIATION_SIDES.end()),
        Key::Minus => *side = (*side / 1.25).max(*state::VARIATION_SIDES.start()),
        Key::Num0 => *side = state::MIN_VARIATION_SIDE,
        _ => {}
    }
    let n = app.variations.len();
    if n == 0 {
        return;
    }
    let cols = app.var_columns.max(1);
    let c = app.var_cursor;
    let to = match key {
        Key::ArrowRight => (c + 1).min(n - 1),
        Key::ArrowLeft => c.saturating_sub(1),
        Key::ArrowDown if c + cols < n => c + cols,
        Key::ArrowUp if c >= cols => c - cols,
        _ => c,
    };
    if to != c {
        app.move_grid_cursor(to);
        // A cursor moved off screen scrolls the grid to it.
        app.var_reveal = true;
    }
    let Some(id) = app.variations.get(app.var_cursor).and_then(|c| c.id.clone()) else { return };
    match key {
        Key::K => actions.push(Action::Mark(id, Mark::Kept)),
        Key::X => actions.push(Action::Mark(id, Mark::Rejected)),
        Key::S => actions.push(Action::Mark(id, Mark::Starred)),
        Key::Enter => actions.push(Action::Restore(id)),
        _ => {}
    }
}
