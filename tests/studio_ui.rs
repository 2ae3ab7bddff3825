//! End-to-end GUI tests of Z-Image Studio: egui_kittest drives the real UI,
//! headless, through the real engine thread on the tiny fixture models
//! (random weights, so images look like noise; 64×64 so each takes ms).
//!
//! Run: `cargo test --release -p zimage-studio --test studio_ui`

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use egui::accesskit::Role;
use egui::{Key, Modifiers};
use egui_kittest::kittest::Queryable;
use egui_kittest::Harness;
use zimage_engine::memory::MemoryPlan;
use zimage_engine::metadata::{self, GenerationMetadata};
use zimage_studio::engine_bridge::{JobKind, ModelSlot, ModelState};
use zimage_studio::fonts::Fallback;
use zimage_studio::settings::{Paths, Settings};
use zimage_studio::state::{AspectPreset, CompareMode, LiveDraft, LiveStatus, Mark, View};
use zimage_studio::{StudioApp, StudioOptions};

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name).display().to_string()
}

/// Small, fast settings for the tiny models.
fn write_test_settings(dir: &Path, edit: impl FnOnce(&mut Settings)) {
    let mut s = Settings {
        width: 64,
        height: 64,
        size_chosen: true,
        base_steps: 10,
        steps_chosen: true,
        base_guidance: 0.0,
        variations: 3,
        welcome_done: true,
        ..Settings::default()
    };
    s.output_dir = Some(dir.join("saved"));
    edit(&mut s);
    s.save(&Paths::at(dir)).expect("write settings");
}

fn harness(dir: &Path) -> Harness<'static, StudioApp> {
    harness_with(dir, Some(fixture("tiny-turbo")), Some(fixture("tiny-base")))
}

fn harness_with(dir: &Path, turbo: Option<String>, base: Option<String>) -> Harness<'static, StudioApp> {
    harness_sized(dir, turbo, base, egui::vec2(1280.0, 800.0))
}

/// The test settings and [`harness_of_size`] in a new folder (kept while
/// the returned folder lives).
fn test_window(size: egui::Vec2) -> (tempfile::TempDir, Harness<'static, StudioApp>) {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |_| {});
    let h = harness_of_size(dir.path(), size);
    (dir, h)
}

/// [`harness`] in a window of `size` (small windows: what still fits).
fn harness_of_size(dir: &Path, size: egui::Vec2) -> Harness<'static, StudioApp> {
    harness_sized(dir, Some(fixture("tiny-turbo")), Some(fixture("tiny-base")), size)
}

fn harness_sized(dir: &Path, turbo: Option<String>, base: Option<String>, size: egui::Vec2) -> Harness<'static, StudioApp> {
    let options = StudioOptions { paths: Paths::at(dir), turbo, base, device: Some("cpu".into()), open: Vec::new() };
    Harness::builder()
        .with_size(size)
        .with_step_dt(0.02)
        .build_eframe(move |cc| StudioApp::new(&cc.egui_ctx, options))
}

/// Steps frames in real time until `pred` holds (the engine runs on its own
/// thread); fails with `what` after 120 s.
fn wait_until(h: &mut Harness<'static, StudioApp>, what: &str, pred: impl Fn(&StudioApp) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !pred(h.state()) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; status: {:?}, message: {:?}",
            h.state().live_status,
            h.state().message
        );
        h.step();
        std::thread::sleep(Duration::from_millis(2));
    }
    h.step();
}

fn models_ready(app: &StudioApp) -> bool {
    [ModelSlot::Turbo, ModelSlot::Base].iter().all(|s| matches!(app.models.get(s), Some(ModelState::Ready { .. })))
}

fn type_text(h: &mut Harness<'static, StudioApp>, text: &str) {
    h.event(egui::Event::Text(text.into()));
    h.step();
}

fn live_done(app: &StudioApp) -> bool {
    matches!(app.live_status, LiveStatus::Done { .. }) && app.current.is_some()
}

/// Starts the app, waits for the models and types `prompt` into the box that
/// has focus at start; returns once the live image is done.
fn start_and_type(dir: &Path, prompt: &str) -> Harness<'static, StudioApp> {
    let mut h = harness(dir);
    wait_until(&mut h, "models to load", models_ready);
    type_text(&mut h, prompt);
    wait_until(&mut h, "the live image", live_done);
    h
}

#[test]
fn typing_a_prompt_produces_previews_then_the_image() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |_| {});
    let mut h = harness(dir.path());
    wait_until(&mut h, "models to load", models_ready);
    // No click: the prompt box has keyboard focus at start.
    type_text(&mut h, "a red fox");
    assert_eq!(h.state().prompt, "a red fox");
    wait_until(&mut h, "a step preview", |a| a.metrics.first_preview.is_some());
    wait_until(&mut h, "the live image", live_done);
    let app = h.state();
    let entry = app.history.get(app.current.as_ref().unwrap()).unwrap();
    assert_eq!(entry.meta.prompt, "a red fox");
    assert_eq!((entry.meta.width, entry.meta.height), (64, 64));
    assert_eq!(entry.slot, ModelSlot::Turbo);
    assert!(app.images.texture(&entry.id).is_some(), "the image is on screen");
    // The history panel shows a thumbnail of it, not the image itself.
    let thumb = format!("thumb:{}", entry.id);
    h.step();
    let size = h.state().images.texture(&thumb).map(|t| t.size()).expect("a thumbnail in the history panel");
    assert_eq!(size, [64, 64], "64² is under the thumbnail size: kept as is");
    // The status line says so, with the time per image.
    h.get_by_label_contains("Live: done in");
}

/// The time per image and the quiet period before a live job follow the
/// size set now: one large image does not slow the typing after it.
#[test]
fn the_time_per_image_follows_the_size_at_once() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |_| {});
    let mut h = start_and_type(dir.path(), "a red fox");
    // As if the last live images had been large (seconds each), while the
    // live rate, which holds for any size, says 80 ms at the size set now.
    let (w, ht, steps) = {
        let s = &h.state().settings;
        (s.width, s.height, s.turbo_steps)
    };
    h.state_mut().live_ema = Some(Duration::from_secs(5));
    h.state_mut().live_rate = Some(0.08 / (w as f64 * ht as f64 / 1e6 * steps as f64));
    h.step();
    h.get_by_label_contains("~80 ms per image");
    // No quiet period at 80 ms: the keystroke starts its live image at once.
    type_text(&mut h, " in snow");
    assert!(h.state().live_job.is_some(), "the live image waited for a quiet period");
    wait_until(&mut h, "the live image", |a| live_done(a) && a.live_job.is_none());
    // Four times the pixels: four times the time, shown before any image at that size.
    h.state_mut().live_rate = Some(0.08 / (w as f64 * ht as f64 / 1e6 * steps as f64));
    h.state_mut().settings.width = w * 2;
    h.state_mut().settings.height = ht * 2;
    h.step();
    h.get_by_label_contains("~320 ms per image");
}

/// Under the prompt: its length in tokens, and a warning past the 512 the model reads.
#[test]
fn the_prompt_length_in_tokens_is_shown_and_a_cut_is_warned() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |_| {});
    let mut h = start_and_type(dir.path(), "a red fox");
    h.get_by_label_contains(" / 512 tokens");
    assert!(h.query_by_label_contains("the end of the prompt is cut").is_none());
    type_text(&mut h, &" in deep snow".repeat(200));
    wait_until(&mut h, "the long prompt's image", |a| live_done(a) && a.prompt_tokens.as_ref().is_some_and(|(p, _)| *p == a.prompt));
    let (_, tokens) = h.state().prompt_tokens.clone().unwrap();
    assert!(tokens > 512, "{tokens}");
    h.get_by_label_contains(&format!("{tokens} tokens: the model reads the first 512; the end of the prompt is cut"));
    // The line stays while an edit waits for its count, so that the controls
    // below do not jump with every keystroke ("≈": the count before the edit).
    h.state_mut().prompt_tokens = Some(("an earlier prompt".into(), tokens));
    h.step();
    h.get_by_label_contains(&format!("≈{tokens} tokens: the model reads the first 512"));
}

/// The count follows the text without an image: with Live off, as you type,
/// and for the prompt restored at start.
#[test]
fn the_token_count_follows_typing_with_live_off_and_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |_| {});
    let mut h = start_and_type(dir.path(), "a red fox");
    let counted = |a: &StudioApp| a.prompt_tokens.as_ref().is_some_and(|(p, _)| *p == a.prompt);
    let fox = h.state().prompt_tokens.clone().expect("counted with the image").1;
    h.state_mut().settings.live = false;
    let images = h.state().history.entries().len();
    type_text(&mut h, " in deep snow");
    wait_until(&mut h, "the count of the new text", counted);
    let snowy = h.state().prompt_tokens.as_ref().unwrap().1;
    assert!(snowy > fox, "{snowy} tokens, {fox} before three more words");
    h.step();
    h.get_by_label(&format!("{snowy} / 512 tokens"));
    assert_eq!(h.state().history.entries().len(), images, "counted without rendering");
    // The text typed is kept (a second after the last key), rendered or not.
    let settings = dir.path().join("settings.json");
    wait_until(&mut h, "the prompt kept", |_| {
        std::fs::read_to_string(&settings).is_ok_and(|t| t.contains("a red fox in deep snow"))
    });
    drop(h);
    // A restart brings the prompt box back as it was, and counts it.
    let mut h = harness(dir.path());
    assert_eq!(h.state().prompt, "a red fox in deep snow");
    wait_until(&mut h, "the restored prompt's count", counted);
    h.get_by_label(&format!("{snowy} / 512 tokens"));
    assert!(fox < snowy);
}

/// Typing a size into the Size fields picks the aspect preset it matches
/// (768×1024 reads "3:4"), and "custom" for one that matches none.
#[test]
fn typed_sizes_show_their_aspect_preset() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |s| s.live = false);
    let mut h = harness(dir.path());
    h.step();
    // Spin buttons in order: seed, width, height, …
    let type_size = |h: &mut Harness<'static, StudioApp>, field: usize, value: &str| {
        h.get_all_by_role(Role::SpinButton).nth(field).expect("the width and height fields").click();
        h.step();
        h.key_press_modifiers(Modifiers::COMMAND, Key::A);
        h.event(egui::Event::Text(value.into()));
        h.key_press(Key::Enter);
        h.step();
        h.step();
    };
    type_size(&mut h, 1, "768");
    type_size(&mut h, 2, "1024");
    assert_eq!((h.state().settings.width, h.state().settings.height), (768, 1024));
    assert_eq!(h.state().settings.aspect, AspectPreset::Portrait3x4);
    type_size(&mut h, 1, "800");
    assert_eq!(h.state().settings.aspect, AspectPreset::Custom);
}

/// In the Live view, outside the prompt box, ↑ / ↓ step through the history
/// (each image shown with its parameters restored) and K marks the image shown.
#[test]
fn arrow_keys_scrub_through_the_history_and_k_keeps_the_image_shown() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |_| {});
    let mut h = start_and_type(dir.path(), "a red fox");
    for more in [" in snow", " at night"] {
        type_text(&mut h, more);
        wait_until(&mut h, "the live image", |a| live_done(a) && a.history.entries().last().is_some_and(|e| e.meta.prompt.ends_with(more)));
    }
    let ids: Vec<String> = h.state().history.entries().iter().rev().map(|e| e.id.clone()).collect();
    assert!(ids.len() >= 3, "{ids:?}");
    h.key_press(Key::Escape);
    h.step();
    let prompt_of = |h: &Harness<'static, StudioApp>, id: &str| h.state().history.get(id).unwrap().meta.prompt.clone();
    h.key_press(Key::ArrowDown);
    h.step();
    assert_eq!(h.state().current.as_deref(), Some(ids[1].as_str()), "one older");
    assert_eq!(h.state().prompt, prompt_of(&h, &ids[1]), "its parameters restored");
    assert_eq!(h.state().live_job, None, "scrubbing renders nothing");
    // Two presses in one frame move two entries.
    h.key_press(Key::ArrowDown);
    h.key_press(Key::ArrowDown);
    h.step();
    assert_eq!(h.state().current.as_deref(), Some(ids[3.min(ids.len() - 1)].as_str()));
    for _ in 0..ids.len() {
        h.key_press(Key::ArrowUp);
    }
    h.step();
    assert_eq!(h.state().current.as_deref(), Some(ids[0].as_str()), "back to the newest, and no further");
    h.key_press(Key::ArrowDown);
    h.key_press(Key::K);
    h.step();
    assert_eq!(h.state().history.get(&ids[1]).unwrap().mark, Mark::Kept, "K keeps the image shown");
    // With the Kept filter, the arrows step through the kept images only.
    h.get_by_label("Kept").click();
    h.step();
    h.key_press(Key::ArrowUp);
    h.step();
    assert_eq!(h.state().current.as_deref(), Some(ids[1].as_str()));
    // Without a grid, "Refine kept" refines the kept images of the history.
    h.get_by_label("Refine 1 kept with Base").click();
    wait_until(&mut h, "the Base refine", |a| a.history.entries().iter().any(|e| e.parent.as_deref() == Some(ids[1].as_str())));
    h.step();
    assert!(h.query_by_label("Refine 1 kept with Base").is_none(), "refined: nothing left to refine");
}

/// Ctrl+C outside the prompt copies the image in view; "Copy parameters"
/// copies its A1111 text; inside the prompt Ctrl+C stays a text copy.
#[test]
fn the_image_and_its_parameters_go_to_the_clipboard() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |_| {});
    let mut h = start_and_type(dir.path(), "a red fox");
    let copied = |h: &Harness<'static, StudioApp>| -> Vec<egui::OutputCommand> { h.output().platform_output.commands.clone() };
    // In the prompt box: no image copy.
    h.event(egui::Event::Copy);
    h.step();
    assert!(!copied(&h).iter().any(|c| matches!(c, egui::OutputCommand::CopyImage(_))));
    h.key_press(Key::Escape);
    h.step();
    h.event(egui::Event::Copy);
    h.step();
    let image = copied(&h).into_iter().find_map(|c| if let egui::OutputCommand::CopyImage(i) = c { Some(i) } else { None });
    let image = image.expect("the image was copied");
    assert_eq!(image.size, [64, 64]);
    let id = h.state().current.clone().unwrap();
    let pixels = h.state().images.rgb(&id).unwrap().pixels.clone();
    assert_eq!(image.pixels[0].to_array()[..3], pixels[..3], "the image's own pixels");
    h.step();
    h.get_by_label_contains("copied #");
    h.get_by_label("Copy parameters").click();
    h.step();
    let text = copied(&h).into_iter().find_map(|c| if let egui::OutputCommand::CopyText(t) = c { Some(t) } else { None });
    let text = text.expect("the parameters were copied");
    assert!(text.starts_with("a red fox\n") && text.contains("Steps: ") && text.contains("Seed: "), "{text}");
    let meta = metadata::parse_a1111_parameters(&text).expect("other tools read it back");
    assert_eq!(meta.prompt, "a red fox");
}

/// A key starts its live job in the frame that handled it, not in the next
/// one: on a software renderer (Xvfb, no GPU) frames come ~0.3 s apart, and
/// waiting for the next one doubled the time from a key to its image
/// (docs/app-latency.md).
/// Scrolls `delta` points over `at` (a fraction of the rect) and lets the
/// smoothed scroll run out.
fn scroll_over(h: &mut Harness<'static, StudioApp>, rect: egui::Rect, at: egui::Vec2, delta: f32) {
    h.event(egui::Event::PointerMoved(rect.min + at * rect.size()));
    h.step();
    h.event(egui::Event::MouseWheel {
        unit: egui::MouseWheelUnit::Point,
        delta: egui::vec2(0.0, delta),
        phase: egui::TouchPhase::Move,
        source: egui::MouseWheelSource::Wheel,
        modifiers: Modifiers::NONE,
    });
    for _ in 0..60 {
        h.step();
    }
}

/// The image point under the pointer at `at` (a fraction of the drawn rect).
fn image_point(view: &zimage_studio::state::ZoomView, at: egui::Vec2) -> egui::Pos2 {
    view.uv().min + at * view.uv().size()
}

/// Scrolling over the Live image zooms about the pointer; the zoom stays
/// while the prompt changes (a detail watched as you type); Fit resets it.
#[test]
fn the_live_image_zooms_about_the_pointer_and_keeps_its_zoom_while_typing() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |_| {});
    let mut h = start_and_type(dir.path(), "a red fox");
    let rect = h.state().live_view.drawn.expect("the live image was drawn");
    assert_eq!(h.state().live_view.zoom, 1.0);
    assert!(h.query_by_label("Fit").is_none(), "no zoom bar at fit");
    let at = egui::vec2(0.25, 0.7);
    scroll_over(&mut h, rect, at, 400.0);
    let view = h.state().live_view;
    assert!(view.zoom > 1.5, "zoomed in: {view:?}");
    assert!((image_point(&view, at) - egui::pos2(0.25, 0.7)).length() < 0.01, "the point under the pointer stays: {view:?}");
    h.get_by_label_contains("zoom ");

    type_text(&mut h, " at dusk");
    wait_until(&mut h, "the new live image", |a| live_done(a) && a.history.get(a.current.as_ref().unwrap()).is_some_and(|e| e.meta.prompt.ends_with("dusk")));
    assert_eq!(h.state().live_view.zoom, view.zoom, "the zoom outlives the image");
    assert_eq!(h.state().live_view.pan, view.pan);
    h.get_by_label("Fit").click();
    h.step();
    assert_eq!((h.state().live_view.zoom, h.state().live_view.pan), (1.0, egui::Vec2::ZERO));
    // The keyboard, outside the prompt box: + zooms, - zooms out, 0 fits.
    h.key_press(Key::Escape);
    h.step();
    h.key_press(Key::Plus);
    h.step();
    h.key_press(Key::Plus);
    h.step();
    assert!((h.state().live_view.zoom - 1.5625).abs() < 1e-4, "{:?}", h.state().live_view);
    h.key_press(Key::Minus);
    h.step();
    assert!((h.state().live_view.zoom - 1.25).abs() < 1e-4);
    h.key_press(Key::Num0);
    h.step();
    assert_eq!(h.state().live_view.zoom, 1.0);
    assert!(h.state().prompt.ends_with("at dusk"), "nothing typed into the prompt: {:?}", h.state().prompt);
}

#[test]
fn an_edit_submits_its_live_job_in_the_same_frame() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |_| {});
    let mut h = harness(dir.path());
    wait_until(&mut h, "models to load", models_ready);
    type_text(&mut h, "a red fox");
    assert!(h.state().live_job.is_some(), "no live job after the frame that took the key");
    wait_until(&mut h, "the live image", live_done);
}

#[test]
fn typing_again_supersedes_the_running_job() {
    let dir = tempfile::tempdir().unwrap();
    // Long enough that the first job is still running when the next key comes.
    write_test_settings(dir.path(), |s| {
        s.turbo_steps = 50;
        s.width = 512;
        s.height = 512;
    });
    let mut h = harness(dir.path());
    wait_until(&mut h, "models to load", models_ready);
    type_text(&mut h, "a");
    wait_until(
        &mut h,
        "the first job to render",
        |a| matches!(a.live_status, LiveStatus::Rendering { done, .. } if done >= 1),
    );
    let seed = h.state().settings.seed;
    type_text(&mut h, " cat");
    assert_eq!(h.state().live_status, LiveStatus::Stale);
    wait_until(&mut h, "the second job to finish", live_done);
    let app = h.state();
    assert!(app.metrics.superseded >= 1, "the first live job must be superseded");
    assert_eq!(app.history.entries().len(), 1, "only the newest text produced an image");
    let meta = &app.history.entries()[0].meta;
    assert_eq!(meta.prompt, "a cat");
    assert_eq!(meta.seed, seed, "the seed stays fixed while typing");
}

/// A long Base refine, and the one queued behind it, stop on Cancel: no
/// Base image appears and the app is ready for the next refine.
/// Starts two slow same-seed Base refines of "a slow harbour" and waits
/// until the first runs; `plan` is the memory plan.
fn start_two_slow_refines(dir: &Path, plan: MemoryPlan, turbo_steps: usize) -> Harness<'static, StudioApp> {
    write_test_settings(dir, |s| {
        // Seconds per refine on the tiny models, so that every stage can be seen.
        (s.width, s.height) = (256, 256);
        s.base_steps = 100;
        s.turbo_steps = turbo_steps;
        s.refine_mode = zimage_studio::state::RefineMode::SameSeed;
        s.memory_plan = plan;
        // One live job per edit (no half-size draft first).
        s.live_draft = LiveDraft::Off;
    });
    let mut h = start_and_type(dir, "a slow harbour");
    h.key_press_modifiers(Modifiers::COMMAND, Key::Enter);
    h.step();
    // Other settings: the same ones would make the same image, and are not queued twice.
    h.state_mut().settings.base_steps = 99;
    h.key_press_modifiers(Modifiers::COMMAND, Key::Enter);
    wait_until(&mut h, "two refines", |a| a.jobs.values().filter(|j| j.kind == JobKind::Refine).count() == 2);
    // The first one running (a live job sent before it starts would go first).
    wait_until(&mut h, "a refine to run", |a| a.jobs.values().any(|j| j.kind == JobKind::Refine && j.progress.0 > 0));
    // Back in the prompt box, which refining left.
    h.state_mut().focus_prompt = true;
    h.step();
    h
}

/// A refine that finishes while the user is busy elsewhere (typing the next
/// prompt, looking at another pair) does not take the view from them: it is
/// announced, and Ctrl+3 shows it. Left alone, the view opens on it.
#[test]
fn a_refine_finishing_while_the_user_types_does_not_take_the_view() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = typed_without_live(dir.path(), "a slow harbour", |s| {
        (s.width, s.height) = (256, 256);
        s.base_steps = 300;
        s.refine_mode = zimage_studio::state::RefineMode::SameSeed;
    });
    h.key_press(Key::F5);
    wait_until(&mut h, "the image", live_done);
    let turbo = h.state().current.clone().unwrap();
    h.key_press_modifiers(Modifiers::COMMAND, Key::Enter);
    wait_until(&mut h, "the refine to run", |a| a.jobs.values().any(|j| j.kind == JobKind::Refine && j.progress.0 > 0));
    // The next prompt, typed while Base works.
    h.state_mut().focus_prompt = true;
    h.step();
    type_text(&mut h, " at night");
    wait_until(&mut h, "the refine", |a| a.history.entries().iter().any(|e| e.slot == ModelSlot::Base));
    h.step();
    assert_eq!(h.state().view, View::Live, "the view stays where the user is");
    let base = h.state().history.entries().iter().find(|e| e.slot == ModelSlot::Base).unwrap().id.clone();
    assert_eq!(h.state().compare_pair, Some((turbo.clone(), base.clone())), "Ctrl+3 shows it");
    h.get_by_label_contains(&format!("Base refine of #{turbo} done"));
    assert!(h.state().prompt.ends_with("at night"), "nothing lost from the prompt");
}

/// Cancel stops the running refine and drops the queued one; nothing of
/// them reaches the history.
fn cancel_both_refines(h: &mut Harness<'static, StudioApp>) {
    h.get_by_label("Cancel 2").click();
    wait_until(h, "the refines to stop", |a| a.refine_job.is_none() && !a.jobs.values().any(|j| j.kind == JobKind::Refine));
    let app = h.state();
    assert!(app.history.entries().iter().all(|e| e.slot == ModelSlot::Turbo), "no Base image after the cancel");
    h.get_by_label_contains("cancelled 2 Base refines");
    assert!(h.query_by_label("Cancel").is_none(), "nothing left to cancel");
}

/// Typing while a Base refine runs pauses it at its next step: the live
/// image renders, then the refine goes on; Cancel stops both refines.
#[test]
fn base_refines_pause_for_the_live_image_and_can_be_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    // A slow live image too, so that the pause lasts long enough to be seen.
    let mut h = start_two_slow_refines(dir.path(), MemoryPlan::Auto, 300);
    type_text(&mut h, "!");
    wait_until(&mut h, "the refine to pause", |a| a.paused_job().is_some());
    h.get_by_label_contains("Base refine paused at");
    let paused_at = h.state().jobs.values().find(|j| j.paused).map(|j| j.progress.0).unwrap();
    assert!(h.state().live_waiting().is_none(), "the live image does not wait");
    wait_until(&mut h, "the live image", |a| a.history.entries().iter().any(|e| e.meta.prompt == "a slow harbour!"));
    wait_until(&mut h, "the refine to go on", |a| {
        a.jobs.values().any(|j| j.kind == JobKind::Refine && !j.paused && j.progress.0 > paused_at)
    });
    assert!(h.state().paused_job().is_none());
    cancel_both_refines(&mut h);
}

/// Each queued refine can be dropped alone from the refine queue; the others go on.
#[test]
fn one_refine_of_several_can_be_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = start_two_slow_refines(dir.path(), MemoryPlan::Auto, 8);
    let ids: Vec<_> = {
        let mut v: Vec<_> = h.state().jobs.iter().filter(|(_, j)| j.kind == JobKind::Refine).map(|(id, _)| *id).collect();
        v.sort();
        v
    };
    h.get_by_label_contains("Refine queue (2)").click();
    h.step();
    h.get_by_label_contains("· queued");
    // Drop the queued one (the second line); the running one goes on.
    h.get_all_by_label("drop").nth(1).expect("a drop button per refine").click();
    wait_until(&mut h, "the drop", |a| !a.jobs.contains_key(&ids[1]));
    assert!(h.state().jobs.contains_key(&ids[0]), "the running refine is untouched");
    assert!(h.query_by_label_contains("Refine queue").is_none(), "one refine left: no queue list");
    wait_until(&mut h, "the first refine's image", |a| !a.jobs.values().any(|j| j.kind == JobKind::Refine));
    let bases = h.state().history.entries().iter().filter(|e| e.slot == ModelSlot::Base).count();
    assert_eq!(bases, 1, "the dropped refine made no image");
}

/// Under the lowest memory plan a Base refine is not paused (the live
/// prompt needs the text encoder, which would push out the models): the
/// status says why the live image waits.
#[test]
fn under_the_lowest_plan_the_live_image_waits_for_the_refine() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = start_two_slow_refines(dir.path(), MemoryPlan::Lowest, 8);
    type_text(&mut h, "!");
    wait_until(&mut h, "the engine to say the live job waits", |a| {
        a.live_waiting().is_some_and(|w| w.starts_with("live waits for the running Base refine"))
    });
    h.step();
    h.get_by_label_contains("live waits for the running Base refine");
    assert!(h.state().paused_job().is_none());
    cancel_both_refines(&mut h);
}

/// With one DiT at a time, Base is parked while Turbo draws: the refine's
/// cost says Base must be loaded first, and once a reload was measured, how long it takes.
#[test]
fn the_refine_cost_includes_loading_a_parked_base() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |s| s.memory_plan = MemoryPlan::OneDitAtATime);
    let mut h = start_and_type(dir.path(), "a lighthouse");
    let base_parked = |a: &StudioApp| a.memory.as_ref().is_some_and(|m| m.dit_parked(ModelSlot::Base));
    wait_until(&mut h, "Base parked", base_parked);
    h.get_by_label_contains("6 Base steps, about");
    h.get_by_label_contains(", + loading Base (parked)");
    // A refine reloads Base (measured) and parks Turbo; the next live image parks Base again.
    h.key_press_modifiers(Modifiers::COMMAND, Key::Enter);
    wait_until(&mut h, "the Base refine", |a| a.compare_pair.is_some());
    // Back in the prompt box, which refining left.
    h.state_mut().view = View::Live;
    h.state_mut().focus_prompt = true;
    h.step();
    type_text(&mut h, "!");
    wait_until(&mut h, "the next live image", |a| {
        a.history.entries().iter().any(|e| e.meta.prompt == "a lighthouse!") && base_parked(a)
    });
    h.step();
    h.get_by_label_contains(" to load Base");
    let m = h.state().memory.clone().unwrap();
    assert!(m.reload_times.iter().any(|(s, _)| *s == ModelSlot::Base), "{:?}", m.reload_times);
}

/// Refine, save and copy act on the image on screen. After a refine the
/// selection moves to the Base result while the Live view still shows the
/// Turbo image (Ctrl+S there once saved the Base image); and refining a
/// compared pair again once started from the newest Turbo image instead of
/// the pair's.
#[test]
fn refine_save_and_copy_act_on_the_image_on_screen() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |_| {});
    let mut h = start_and_type(dir.path(), "a lighthouse");
    let first = h.state().current.clone().unwrap();
    h.key_press_modifiers(Modifiers::COMMAND, Key::Enter);
    wait_until(&mut h, "the refine", |a| a.view == View::Compare && a.compare_pair.is_some());
    let base = h.state().compare_pair.clone().unwrap().1;
    assert_eq!(h.state().compare_pair, Some((first.clone(), base.clone())));
    assert_eq!(h.state().save_targets(), vec![base.clone()], "Compare: the Base image");
    assert_eq!(h.state().refine_source(), Some(first.clone()), "Compare: the pair's Turbo image");

    // The Live view shows its own image, not the refine's result.
    h.key_press_modifiers(Modifiers::COMMAND, Key::Num1);
    h.step();
    assert_eq!(h.state().view, View::Live);
    assert_eq!(h.state().current.as_ref(), Some(&first));
    assert_eq!(h.state().save_targets(), vec![first.clone()], "Live: the image shown");
    assert_eq!(h.state().image_in_view(), Some(first.clone()));
    // K keeps the image shown (it once marked the selected Base image).
    h.key_press(Key::Escape);
    h.step();
    h.key_press(Key::K);
    h.step();
    let mark = |h: &Harness<'static, StudioApp>, id: &str| h.state().history.get(id).unwrap().mark;
    assert_eq!((mark(&h, &first), mark(&h, &base)), (Mark::Kept, Mark::None));

    // A newer Turbo image; back in Compare, the pair's Turbo image is still
    // the one a refine starts from.
    h.state_mut().focus_prompt = true;
    h.step();
    type_text(&mut h, " at dusk");
    wait_until(&mut h, "the newer live image", |a| live_done(a) && a.current.as_ref() != Some(&first));
    let newer = h.state().current.clone().unwrap();
    assert_eq!(h.state().refine_source(), Some(newer), "Live: the image shown");
    h.key_press_modifiers(Modifiers::COMMAND, Key::Num3);
    h.step();
    assert_eq!(h.state().view, View::Compare);
    assert_eq!(h.state().refine_source(), Some(first.clone()));
    h.get_by_label_contains(&format!("from #{first}: "));
}

#[test]
fn refine_produces_a_base_image_shown_beside_the_turbo_one_and_compare_modes_switch() {
    let dir = tempfile::tempdir().unwrap();
    // 512² so that a 1280-point window shows it below its actual size (1:1 below).
    write_test_settings(dir.path(), |s| (s.width, s.height) = (512, 512));
    let mut h = start_and_type(dir.path(), "a lighthouse");
    let turbo = h.state().current.clone().unwrap();
    // The cost is shown before the click: strength 0.6 of 10 steps = 6 steps.
    h.get_by_label_contains("6 Base steps");
    h.key_press_modifiers(Modifiers::COMMAND, Key::Enter);
    wait_until(&mut h, "the Base refine", |a| a.compare_pair.is_some());
    let app = h.state();
    let (t, b) = app.compare_pair.clone().unwrap();
    assert_eq!(t, turbo);
    assert_eq!(app.view, View::Compare);
    let base = app.history.get(&b).unwrap();
    assert_eq!(base.slot, ModelSlot::Base);
    assert_eq!(base.parent.as_deref(), Some(turbo.as_str()), "lineage");
    assert!((base.meta.strength.unwrap() - 0.6).abs() < 1e-6, "{:?}", base.meta.strength);
    assert_eq!(base.meta.parent.as_deref(), Some(turbo.as_str()));
    assert!(app.images.texture(&t).is_some() && app.images.texture(&b).is_some(), "both shown");
    let thumb = app.images.texture(&format!("thumb:{b}")).map(|t| t.size());
    assert_eq!(thumb, Some([112, 112]), "the history panel shows a 512² image as a 112² thumbnail");
    h.get_by_label_contains("Left: Turbo #");
    // Which knobs differ between the two, under the pair.
    h.get_by_label_contains("img2img strength none -> 0.6");

    // The zoom readout counts actual pixels; 1:1 shows one image pixel per
    // screen pixel when the fitted image is smaller than that, else is inert.
    // A very wide window shows the fitted image above 1:1, the usual one below.
    for width in [3200.0, 1280.0] {
        h.set_size(egui::vec2(width, 800.0));
        h.step();
        h.step();
        let fit = h.state().compare.view.fit_scale.expect("the compare view measured its fitted image");
        h.get_by_label(&format!("zoom {:.0}%", fit * 100.0));
        h.get_by_label("1:1").click();
        h.step();
        let zoom = h.state().compare.view.zoom;
        if fit < 1.0 {
            assert!((zoom * fit - 1.0).abs() < 1e-3, "1:1 gave zoom {zoom} at fit scale {fit}");
            h.step();
            h.get_by_label("zoom 100%");
        } else {
            assert_eq!(zoom, 1.0, "1:1 cannot shrink below the fitted size (fit scale {fit})");
        }
        assert_eq!(fit < 1.0, width < 2000.0, "fit scale {fit} in a {width}-point window");
        h.get_by_label("Fit").click();
        h.step();
        assert_eq!(h.state().compare.view.zoom, 1.0);
    }
    h.set_size(egui::vec2(1280.0, 800.0));
    h.step();
    // Scrolling over the right image zooms both about the image point under
    // the pointer (it once zoomed about the centre, so the detail pointed at
    // slid away).
    let left = h.state().compare.view.drawn.expect("the left image was drawn");
    let right = left.translate(egui::vec2(left.width() + 8.0, 0.0));
    let at = egui::vec2(0.8, 0.2);
    scroll_over(&mut h, right, at, 300.0);
    let view = h.state().compare.view;
    assert!(view.zoom > 1.5, "{view:?}");
    assert!((image_point(&view, at) - egui::pos2(0.8, 0.2)).length() < 0.01, "{view:?}");
    h.get_by_label("Fit").click();
    h.step();

    // Compare modes: m cycles, c swaps, the buttons pick one.
    assert_eq!(h.state().compare.mode, CompareMode::SideBySide);
    h.key_press(Key::M);
    h.step();
    assert_eq!(h.state().compare.mode, CompareMode::Wipe);
    h.get_by_role_and_label(Role::Slider, "Split");
    // The wipe line itself drags (a drag elsewhere pans and leaves it).
    h.step();
    let rect = h.state().compare.view.drawn.expect("the wipe image was drawn");
    assert_eq!(h.state().compare.split, 0.5);
    drag(&mut h, egui::pos2(rect.left() + 0.2 * rect.width(), rect.center().y), egui::vec2(40.0, 0.0));
    assert_eq!(h.state().compare.split, 0.5, "a drag away from the line does not move it");
    drag(&mut h, egui::pos2(rect.center().x + 3.0, rect.center().y - 50.0), egui::vec2(-0.3 * rect.width(), 20.0));
    let split = h.state().compare.split;
    assert!((split - 0.2).abs() < 0.02, "the line followed the pointer to a fifth of the image: {split}");
    h.key_press(Key::M);
    h.step();
    assert_eq!(h.state().compare.mode, CompareMode::Flicker);
    h.key_press(Key::C);
    h.step();
    assert!(h.state().compare.swapped);
    h.get_by_label("Difference").click();
    h.step();
    h.step();
    assert_eq!(h.state().compare.mode, CompareMode::Difference);
    let key = format!("diff:{t}:{b}");
    assert!(h.state().images.texture(&key).is_some(), "difference heat-map drawn");
}

#[test]
fn save_writes_a_png_whose_metadata_round_trips_and_failures_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |_| {});
    let mut h = start_and_type(dir.path(), "ein Fuchs über Schnee, ½ Mond");
    h.key_press_modifiers(Modifiers::COMMAND, Key::S);
    h.step();
    let saved: Vec<_> = std::fs::read_dir(dir.path().join("saved")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(saved.len(), 1, "{saved:?}");
    let meta = metadata::read_png_metadata_file(&saved[0]).unwrap();
    let app = h.state();
    let entry = app.history.get(app.selected.as_ref().unwrap()).unwrap();
    assert_eq!(meta, entry.meta);
    let name = saved[0].file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(name, format!("zimage-turbo-{}-ein-fuchs-über-schnee-½-mond.png", meta.seed), "named by the prompt's words");
    assert_eq!(meta.prompt, "ein Fuchs über Schnee, ½ Mond");
    let chunks = metadata::png_text_chunks(&std::fs::read(&saved[0]).unwrap()).unwrap();
    assert!(chunks.iter().any(|(k, v)| k == "parameters" && v.contains("Steps: 8")), "A1111 parameters chunk");
    let img = image::open(&saved[0]).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64));

    // The history list says which images were saved.
    h.step();
    h.get_by_label("saved");
    // Saved again: said, not a second file; once the file is gone, written again.
    h.key_press_modifiers(Modifiers::COMMAND, Key::S);
    h.step();
    assert_eq!(std::fs::read_dir(dir.path().join("saved")).unwrap().count(), 1, "no copy of the same image");
    let msg = h.state().message.clone().unwrap();
    assert_eq!(msg.text, format!("already saved as {} (Save as… writes a copy)", saved[0].display()));
    std::fs::remove_file(&saved[0]).unwrap();
    h.key_press_modifiers(Modifiers::COMMAND, Key::S);
    h.step();
    assert!(saved[0].is_file(), "written again once gone");
    let index = dir.path().join("history.json");
    wait_until(&mut h, "the history to keep where it was saved", |_| {
        std::fs::read_to_string(&index).is_ok_and(|t| t.contains("\"saved\""))
    });

    // Unwritable folder: a clear one-line message, and the image stays in the history.
    let blocker = dir.path().join("blocker");
    std::fs::write(&blocker, "not a folder").unwrap();
    h.state_mut().settings.output_dir = Some(blocker.join("out"));
    h.key_press_modifiers(Modifiers::COMMAND, Key::S);
    h.step();
    let msg = h.state().message.clone().unwrap();
    assert!(msg.error && msg.text.starts_with("save failed: cannot create the folder"), "{msg:?}");
    assert!(!msg.text.contains('\n'));
    h.get_by_label_contains("save failed");
    assert_eq!(h.state().history.entries().len(), 1);
}

/// With drafts on, typing renders at half size; once typing stops the draft
/// is finished at full size by img2img from it (same seed, lineage kept),
/// which becomes the live image. F5 renders at full size directly.
#[test]
fn live_drafts_render_at_half_size_and_finish_at_full_size() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |s| {
        s.width = 128;
        s.height = 128;
        s.live_draft = LiveDraft::Always;
    });
    let mut h = harness(dir.path());
    wait_until(&mut h, "models to load", models_ready);
    type_text(&mut h, "a red fox");
    let full_size_shown =
        |a: &StudioApp| live_done(a) && a.current.as_ref().and_then(|c| a.history.get(c)).is_some_and(|e| e.meta.width == 128);
    wait_until(&mut h, "the full-size image", full_size_shown);
    let app = h.state();
    let full = app.history.get(app.current.as_ref().unwrap()).unwrap();
    let draft = app.history.get(full.parent.as_ref().expect("the full-size image names its draft")).unwrap();
    assert_eq!((draft.meta.width, draft.meta.height, draft.meta.strength), (64, 64, None));
    assert_eq!((full.meta.prompt.as_str(), full.meta.seed), ("a red fox", draft.meta.seed));
    let expected = zimage_studio::state::snap_strength(zimage_studio::state::UPGRADE_STRENGTH, full.meta.steps as usize).0;
    assert_eq!(full.meta.strength, Some(expected));
    assert_eq!(full.meta.init_image.as_deref(), Some(draft.file.as_str()), "the PNG names its source");
    assert_eq!(app.live_stage(), None);

    let before = app.history.entries().len();
    h.key_press(Key::F5);
    wait_until(&mut h, "the F5 image", |a| a.history.entries().len() == before + 1 && live_done(a));
    let newest = h.state().history.entries().last().unwrap().meta.clone();
    assert_eq!((newest.width, newest.strength), (128, None), "F5 renders at full size from noise");
}

/// The live speed is kept per model and device: after a start, the first
/// live image already drafts where a full-size one was slow before (a real
/// model on a CPU once rendered its first image at full size, for minutes).
#[test]
fn the_first_live_image_after_a_start_drafts_where_the_model_was_slow() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |s| (s.width, s.height) = (128, 128));
    let key = format!("{}|CPU", fixture("tiny-turbo"));
    let mut h = start_and_type(dir.path(), "a red fox");
    let measured = h.state().settings.live_speeds.get(&key).copied().expect("the speed is kept");
    assert!(measured > 0.0 && Some(measured) == h.state().live_rate, "{measured}");
    h.state_mut().persist_settings();
    drop(h);

    // The same model recorded as slow (as on a slower machine): 100 s per
    // megapixel-step puts a 128² image at seconds, so typing drafts at once.
    let paths = Paths::at(dir.path());
    let (mut saved, _) = Settings::load(&paths);
    saved.live_speeds.insert(key.clone(), 100.0);
    saved.save(&paths).unwrap();
    let mut h = harness(dir.path());
    wait_until(&mut h, "models to load", models_ready);
    assert_eq!(h.state().live_rate, Some(100.0), "remembered");
    // The refine's cost is estimated from it too, before any image of this session.
    let (_, cost) = h.state().refine_cost();
    assert!(!cost.contains("unknown"), "{cost}");
    type_text(&mut h, "a red kite");
    wait_until(&mut h, "the live job", |a| a.live_job.is_some());
    let job = h.state().jobs.get(&h.state().live_job.unwrap()).unwrap().clone();
    assert!(job.draft && job.request.width < 128, "the first image is a draft: {}×{}", job.request.width, job.request.height);
}

/// The history's search field lists the images whose prompt holds every
/// word typed (or whose seed is one of them); typing there renders nothing.
#[test]
fn the_history_search_finds_images_by_prompt_words() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = typed_without_live(dir.path(), "a red fox", |_| {});
    h.key_press(Key::F5);
    wait_until(&mut h, "the fox", live_done);
    h.state_mut().prompt = "a blue whale".into();
    h.key_press(Key::F5);
    wait_until(&mut h, "the whale", |a| a.history.entries().len() == 2 && live_done(a));
    let jobs_before = h.state().history.entries().len();
    h.get_by_role_and_label(Role::TextInput, "Search").focus();
    h.step();
    type_text(&mut h, "WHALE blue");
    h.step();
    let listed = h.state().listed_history();
    assert_eq!(listed.len(), 1);
    h.get_by_label("1 of 2");
    assert_eq!(h.state().history.get(&listed[0]).unwrap().meta.prompt, "a blue whale");
    type_text(&mut h, " zebra");
    h.step();
    h.get_by_label("No image's prompt holds all of these words.");
    assert_eq!(h.state().prompt, "a blue whale", "the prompt box is untouched");
    assert_eq!(h.state().history.entries().len(), jobs_before, "nothing rendered");
}

/// A refine's cost follows its size and guidance: Base's speed is kept per
/// megapixel and DiT pass (a CFG step is two), not as the time of the last
/// refine's steps (a 512² refine once set the estimate of a 1024² one).
#[test]
fn the_refine_cost_follows_the_size_and_the_guidance() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |s| {
        s.base_steps = 10;
        s.refine_mode = zimage_studio::state::RefineMode::SameSeed;
    });
    let mut h = harness(dir.path());
    h.step();
    // One second per megapixel per pass.
    h.state_mut().pass_rate.insert(ModelSlot::Base, 1.0);
    let cost = |h: &mut Harness<'static, StudioApp>, side: u32, guidance: f32| {
        let s = &mut h.state_mut().settings;
        (s.width, s.height, s.base_guidance) = (side, side, guidance);
        h.state().refine_cost().1
    };
    assert_eq!(cost(&mut h, 1024, 0.0), "10 Base steps, about 10.5 s");
    assert_eq!(cost(&mut h, 1024, 4.0), "10 Base steps, about 21.0 s");
    assert_eq!(cost(&mut h, 512, 4.0), "10 Base steps, about 5.2 s");
}

/// The first image on a GPU compiles its kernels (half a minute): its time
/// is not taken as the model's speed, neither now nor for the next start.
#[test]
fn the_first_gpu_image_is_not_taken_as_the_speed() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |_| {});
    let mut h = harness(dir.path());
    wait_until(&mut h, "models to load", models_ready);
    h.state_mut().gpu_kernels_cold = true;
    type_text(&mut h, "a red fox");
    wait_until(&mut h, "the first image", live_done);
    assert_eq!((h.state().live_rate, h.state().live_ema), (None, None));
    assert!(h.state().settings.live_speeds.is_empty() && h.state().pass_rate.is_empty());
    type_text(&mut h, " at dusk");
    wait_until(&mut h, "the second image", |a| live_done(a) && a.live_rate.is_some());
    assert_eq!(h.state().settings.live_speeds.len(), 1);
}

/// Alt+↑ / Alt+↓ in the prompt box walk the prompts the user settled on
/// (acted on with F5, or left unedited under a finished live image), and
/// they survive a restart.
#[test]
fn alt_arrows_recall_settled_prompts_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |_| {});
    let press = |h: &mut Harness<'static, StudioApp>, modifiers: Modifiers, key: Key| {
        h.key_press_modifiers(modifiers, key);
        h.step();
    };
    let replace_prompt = |h: &mut Harness<'static, StudioApp>, text: &str| {
        press(h, Modifiers::COMMAND, Key::A);
        type_text(h, text);
        assert_eq!(h.state().prompt, text);
    };
    {
        let mut h = start_and_type(dir.path(), "a red fox");
        press(&mut h, Modifiers::NONE, Key::F5);
        replace_prompt(&mut h, "a blue heron");
        press(&mut h, Modifiers::NONE, Key::F5);
        // Typed through, never settled: not kept.
        replace_prompt(&mut h, "a green ki");
        replace_prompt(&mut h, "a green kite");
        wait_until(&mut h, "the live image", |a| live_done(a) && a.prompt_history.prompts().len() == 3);
        assert_eq!(h.state().prompt_history.prompts(), ["a red fox", "a blue heron", "a green kite"]);

        press(&mut h, Modifiers::ALT, Key::ArrowUp);
        assert_eq!(h.state().prompt, "a blue heron", "the newest equals the box, so it is skipped");
        press(&mut h, Modifiers::ALT, Key::ArrowUp);
        assert_eq!(h.state().prompt, "a red fox");
        assert!(matches!(h.state().live_status, LiveStatus::Stale | LiveStatus::Rendering { .. }), "a recalled prompt renders live");
        press(&mut h, Modifiers::ALT, Key::ArrowDown);
        press(&mut h, Modifiers::ALT, Key::ArrowDown);
        assert_eq!(h.state().prompt, "a green kite", "back to the text the walk began with");
        let file = dir.path().join("prompts.json");
        wait_until(&mut h, "the prompt history on disk", |_| {
            std::fs::read_to_string(&file).is_ok_and(|t| t.contains("a green kite"))
        });
    }
    let mut h = harness(dir.path());
    wait_until(&mut h, "models to load", models_ready);
    assert_eq!(h.state().prompt_history.prompts(), ["a red fox", "a blue heron", "a green kite"]);
    assert_eq!(h.state().prompt, "a green kite", "the newest image's prompt is restored");
    press(&mut h, Modifiers::ALT, Key::ArrowUp);
    assert_eq!(h.state().prompt, "a blue heron");
}

#[test]
fn restarting_restores_the_history() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |_| {});
    let (id, meta) = {
        let mut h = start_and_type(dir.path(), "a castle");
        h.key_press_modifiers(Modifiers::COMMAND, Key::Enter);
        wait_until(&mut h, "the Base refine", |a| a.compare_pair.is_some());
        let app = h.state();
        let id = app.current.clone().unwrap();
        (id.clone(), app.history.get(&id).unwrap().meta.clone())
    }; // dropping the harness stops the app and its engine thread
    let mut h = harness(dir.path());
    h.step();
    let app = h.state();
    assert_eq!(app.history.entries().len(), 2);
    assert_eq!(app.history.get(&id).unwrap().meta, meta);
    let base = app.history.entries().iter().find(|e| e.slot == ModelSlot::Base).unwrap();
    assert_eq!(base.parent.as_deref(), Some(id.as_str()), "lineage survives the restart");
    let base_id = base.id.clone();
    assert_eq!(app.prompt, "a castle", "parameters of the newest image are restored");
    assert_eq!((app.settings.width, app.settings.height), (meta.width, meta.height));
    assert_eq!(app.settings.aspect, AspectPreset::Square, "a square size reads 1:1, not custom");
    assert_eq!(app.selected, app.history.entries().last().map(|e| e.id.clone()), "and it is selected");
    h.get_by_label_contains("#000002 Base");
    // The compare view opens on the latest refine pair.
    assert!(h.state().compare_pair.is_none());
    h.get_by_label("Compare (3)").click();
    h.step();
    assert_eq!(h.state().compare_pair, Some((id.clone(), base_id)));
    h.step();
    h.get_by_label_contains("Left: Turbo #000001");
    h.get_by_label("Live (1)").click();
    h.step();
    // Clicking an entry restores its parameters.
    h.state_mut().prompt.clear();
    h.get_by_label_contains("#000001 Turbo").click();
    h.step();
    assert_eq!(h.state().prompt, "a castle");
    assert_eq!(h.state().selected.as_deref(), Some(id.as_str()));
}

#[test]
fn an_engine_failure_shows_an_error_and_the_next_job_works() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |_| {});
    let mut h = harness(dir.path());
    wait_until(&mut h, "models to load", models_ready);
    h.state_mut().engine.inject_panic();
    type_text(&mut h, "doomed");
    wait_until(&mut h, "the error", |a| matches!(a.live_status, LiveStatus::Error(_)));
    assert!(h.get_all_by_label_contains("crashed").count() >= 1);
    wait_until(&mut h, "the restarted engine", models_ready);
    type_text(&mut h, " but fine");
    wait_until(&mut h, "the next image", live_done);
    let app = h.state();
    assert_eq!(app.history.get(app.current.as_ref().unwrap()).unwrap().meta.prompt, "doomed but fine");
}

#[derive(Debug)]
struct TestDrop(PathBuf);

impl egui::DroppedFile for TestDrop {
    fn path(&self) -> &Path {
        &self.0
    }
    fn bytes(&self) -> Result<Vec<u8>, String> {
        std::fs::read(&self.0).map_err(|e| e.to_string())
    }
}

/// A dropped folder, model or LoRA file is not read as an image (a 12 GB
/// checkpoint was read whole on the UI thread): one line says where it goes.
#[test]
fn dropping_a_model_file_or_a_folder_says_where_they_go() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |_| {});
    let mut h = harness(dir.path());
    h.step();
    let lora = PathBuf::from(fixture("lora")).join("tiny_turbo_lora.safetensors");
    h.input_mut().dropped_files.push(Arc::new(TestDrop(lora)));
    h.step();
    let msg = h.state().message.clone().expect("a message");
    assert!(msg.error && msg.text.contains("a model or LoRA file, not an image"), "{}", msg.text);
    assert!(h.state().start_image.is_none());
    h.input_mut().dropped_files.push(Arc::new(TestDrop(PathBuf::from(fixture("tiny-turbo")))));
    h.step();
    let msg = h.state().message.clone().unwrap();
    assert!(msg.text.starts_with("tiny-turbo: a folder, not an image"), "{}", msg.text);
    // A file that is not there (a command line's typo) is said in words.
    h.input_mut().dropped_files.push(Arc::new(TestDrop(dir.path().join("sketch.png"))));
    h.step();
    assert_eq!(h.state().message.clone().unwrap().text, "sketch.png: not found");
}

#[test]
fn dropping_a_png_restores_its_parameters() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |_| {});
    let png = dir.path().join("from-elsewhere.png");
    let meta = GenerationMetadata {
        prompt: "a blue heron".into(),
        seed: 1234,
        steps: 6,
        width: 96,
        height: 64,
        model_kind: "turbo".into(),
        variety: 0.4,
        ..Default::default()
    };
    metadata::save_png(&png, &vec![128u8; 96 * 64 * 3], 96, 64, &meta).unwrap();
    let junk = dir.path().join("junk.png");
    std::fs::write(&junk, b"not a png").unwrap();

    let mut h = harness(dir.path());
    wait_until(&mut h, "models to load", models_ready);
    h.input_mut().dropped_files.push(Arc::new(TestDrop(png)));
    h.step();
    let app = h.state();
    assert_eq!(app.prompt, "a blue heron");
    assert_eq!(
        (app.settings.seed, app.settings.width, app.settings.height, app.settings.turbo_steps),
        (1234, 96, 64, 6)
    );
    assert_eq!(app.settings.turbo_variety, 0.4);
    h.get_by_label_contains("restored the parameters of from-elsewhere.png");
    // The restored parameters render live, variety included, and the new
    // image records them.
    wait_until(&mut h, "the restored image", live_done);
    let app = h.state();
    let live = &app.history.get(app.current.as_ref().unwrap()).unwrap().meta;
    assert_eq!((live.prompt.as_str(), live.seed, live.variety), ("a blue heron", 1234, 0.4));

    h.input_mut().dropped_files.push(Arc::new(TestDrop(junk)));
    h.step();
    h.get_by_label_contains("junk.png: not a PNG or JPEG file");

    // A JPEG an editor exported from one of our PNGs keeps its XMP packet.
    let edited = GenerationMetadata { prompt: "a grey wagtail".into(), seed: 99, ..meta };
    let packet = zimage_engine::xmp::packet(&metadata::a1111_parameters(&edited), "", "", "");
    let mut jpeg = vec![0xFF, 0xD8];
    jpeg.extend(zimage_engine::xmp::jpeg_app1_segment(&packet).unwrap());
    jpeg.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x02, 0xFF, 0xD9]);
    let jpg = dir.path().join("edited.jpg");
    std::fs::write(&jpg, jpeg).unwrap();
    h.input_mut().dropped_files.push(Arc::new(TestDrop(jpg)));
    h.step();
    h.get_by_label_contains("restored the parameters of edited.jpg");
    assert_eq!((h.state().prompt.as_str(), h.state().settings.seed), ("a grey wagtail", 99));
}

/// An image without generation metadata (a sketch) becomes the start image:
/// the size takes its aspect, Turbo renders img2img from it and the PNG names
/// it; Remove goes back to noise.
#[test]
fn dropping_a_sketch_makes_it_the_start_image() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |_| {});
    let sketch = dir.path().join("sketch.png");
    image::RgbImage::from_fn(96, 48, |x, y| image::Rgb([(x * 2) as u8, (y * 5) as u8, 90])).save(&sketch).unwrap();
    let mut h = harness(dir.path());
    wait_until(&mut h, "models to load", models_ready);
    type_text(&mut h, "a red fox");
    wait_until(&mut h, "the live image", live_done);
    h.input_mut().dropped_files.push(Arc::new(TestDrop(sketch)));
    h.step();
    assert_eq!(h.state().start_image.as_ref().map(|s| s.name.as_str()), Some("sketch.png"));
    assert_eq!((h.state().settings.width, h.state().settings.height), (64, 32), "the sketch's aspect");
    h.get_by_label_contains("Turbo starts from sketch.png");
    let from_sketch = |a: &StudioApp| {
        live_done(a) && a.current.as_ref().and_then(|c| a.history.get(c)).is_some_and(|e| e.meta.init_image.as_deref() == Some("sketch.png"))
    };
    wait_until(&mut h, "an image from the sketch", from_sketch);
    let meta = h.state().history.get(h.state().current.as_ref().unwrap()).unwrap().meta.clone();
    let expected = zimage_studio::state::snap_strength(0.7, meta.steps as usize).0;
    assert_eq!((meta.width, meta.height, meta.strength), (64, 32, Some(expected)));

    h.get_by_label("Remove").click();
    h.step();
    assert!(h.state().start_image.is_none());
    let n = h.state().history.entries().len();
    wait_until(&mut h, "an image from noise", |a| a.history.entries().len() > n && live_done(a));
    let meta = h.state().history.entries().last().unwrap().meta.clone();
    assert_eq!((meta.strength, meta.init_image), (None, None));
    // A result can be the next start.
    let selected = h.state().selected.clone().unwrap();
    let before = h.state().history.entries().len();
    h.get_by_label("start from the selected image").click();
    h.step();
    assert_eq!(h.state().start_image.as_ref().map(|s| s.name.clone()), Some(format!("#{selected}")));
    // Live renders from it at once, as from a dropped sketch.
    let name = format!("#{selected}");
    wait_until(&mut h, "an image from the selected one", |a| {
        live_done(a) && a.current.as_ref().and_then(|c| a.history.get(c)).is_some_and(|e| e.meta.init_image.as_deref() == Some(name.as_str()))
    });
    // Once: the strength slider, first shown, used to snap 0.7 to the step
    // grid, which read as an edit and rendered the same image a second time.
    for _ in 0..20 {
        h.step();
    }
    assert_eq!(h.state().history.entries().len(), before + 1, "one image from the selected one");
    // A picture larger than anything generated is kept at the largest side.
    let wide = dir.path().join("panorama.png");
    image::RgbImage::from_pixel(5000, 100, image::Rgb([10, 20, 30])).save(&wide).unwrap();
    h.input_mut().dropped_files.push(Arc::new(TestDrop(wide)));
    h.step();
    let start = h.state().start_image.clone().unwrap();
    assert_eq!((start.name.as_str(), start.image.width, start.image.height), ("panorama.png", 4096, 82));
}

/// `zimage-studio IMAGE.png` (the desktop file's "Open with") restores the
/// PNG's parameters like a drop.
#[test]
fn opening_a_png_from_the_command_line_restores_its_parameters() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |_| {});
    let png = dir.path().join("opened.png");
    let meta = GenerationMetadata { prompt: "a red kite".into(), seed: 77, steps: 5, width: 64, height: 64, model_kind: "turbo".into(), ..Default::default() };
    metadata::save_png(&png, &vec![9u8; 64 * 64 * 3], 64, 64, &meta).unwrap();
    let options = StudioOptions {
        paths: Paths::at(dir.path()),
        turbo: Some(fixture("tiny-turbo")),
        base: Some(fixture("tiny-base")),
        device: Some("cpu".into()),
        open: vec![png],
    };
    let mut h = Harness::builder().with_size(egui::vec2(1280.0, 800.0)).build_eframe(move |cc| StudioApp::new(&cc.egui_ctx, options));
    h.step();
    assert_eq!((h.state().prompt.as_str(), h.state().settings.seed, h.state().settings.turbo_steps), ("a red kite", 77, 5));
    h.get_by_label_contains("restored the parameters of");
}

/// Starts the app with live previews off, waits for the models and types
/// `prompt` into the prompt box (which keeps its focus).
fn typed_without_live(dir: &Path, prompt: &str, edit: impl FnOnce(&mut Settings)) -> Harness<'static, StudioApp> {
    write_test_settings(dir, |s| {
        s.live = false;
        edit(s);
    });
    let mut h = harness(dir);
    wait_until(&mut h, "models to load", models_ready);
    type_text(&mut h, prompt);
    h
}

/// Starts the app with live rendering off (the test settings, then `edit`),
/// types `prompt` and asks for a variations grid (Ctrl+G).
fn start_grid(dir: &Path, prompt: &str, edit: impl FnOnce(&mut Settings)) -> Harness<'static, StudioApp> {
    let mut h = typed_without_live(dir, prompt, edit);
    h.key_press_modifiers(Modifiers::COMMAND, Key::G);
    h.step();
    h
}

/// A finished grid of "a teapot" (3 cells), the prompt box left so that
/// single keys triage.
fn triage_grid(dir: &Path) -> Harness<'static, StudioApp> {
    let mut h = start_grid(dir, "a teapot", |_| {});
    wait_until(&mut h, "3 variations", grid_done);
    h.key_press(Key::Escape);
    h.step();
    h
}

/// Every cell of the grid (3 with the test settings) has its image.
fn grid_done(app: &StudioApp) -> bool {
    app.variations.len() == app.settings.variations && app.variations.iter().all(|c| c.id.is_some())
}

/// Deleting the image on screen shows the newest image left, not an empty
/// canvas asking for a prompt that is there.
#[test]
fn deleting_the_image_on_screen_shows_the_next_one() {
    let (_dir, mut h) = test_window(egui::vec2(1280.0, 800.0));
    wait_until(&mut h, "models to load", models_ready);
    type_text(&mut h, "a red fox");
    wait_until(&mut h, "the first image", live_done);
    let first = h.state().current.clone().unwrap();
    type_text(&mut h, " on snow");
    wait_until(&mut h, "the second image", |a| live_done(a) && a.current.as_ref() != Some(&first));
    let second = h.state().current.clone().unwrap();
    h.get_by_label_contains(&format!("#{second} Turbo")).click_secondary();
    for _ in 0..3 {
        h.step();
    }
    h.get_by_label("Delete").click();
    h.step();
    assert!(h.state().history.get(&second).is_none(), "deleted");
    assert_eq!(h.state().current.as_deref(), Some(first.as_str()), "the newest image left is shown");
    assert_eq!(h.state().selected.as_deref(), Some(first.as_str()));
    wait_until(&mut h, "its pixels", |a| a.images.contains(&first));
}

/// Closing the window while variations are still being made asks first
/// (they are not kept across a restart); "Keep working" keeps the window,
/// "Quit" closes it; with nothing running, it closes without a question.
#[test]
fn closing_while_images_are_made_asks_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = start_grid(dir.path(), "a teapot", |s| s.variations = 12);
    let close = |h: &mut Harness<'static, StudioApp>| {
        h.input_mut().viewports.entry(egui::ViewportId::ROOT).or_default().events.push(egui::ViewportEvent::Close);
        h.step();
    };
    let sent = |h: &Harness<'static, StudioApp>, command: egui::ViewportCommand| {
        h.output().viewport_output.get(&egui::ViewportId::ROOT).is_some_and(|v| v.commands.contains(&command))
    };
    assert!(h.state().engine.queued() > 0, "the grid is under way");
    close(&mut h);
    assert!(sent(&h, egui::ViewportCommand::CancelClose), "the close is held back");
    let asked = h.state().quit_asked.clone().expect("the question");
    assert!(asked.contains("image") && asked.contains("will not be made"), "{asked}");
    h.step();
    h.get_by_label("Quit Z-Image Studio?");
    h.get_by_label("Keep working").click();
    h.step();
    assert!(h.state().quit_asked.is_none());
    close(&mut h);
    h.step();
    h.get_by_label("Quit").click();
    h.step();
    assert!(sent(&h, egui::ViewportCommand::Close), "Quit closes the window");

    // Nothing running: no question.
    let mut h = harness(dir.path());
    wait_until(&mut h, "models to load", models_ready);
    wait_until(&mut h, "nothing queued", |a| a.engine.queued() == 0);
    close(&mut h);
    assert!(h.state().quit_asked.is_none() && !sent(&h, egui::ViewportCommand::CancelClose));
}

/// A disk with no room for the history's images loses none while the app
/// runs: they are shown from memory, the status bar says so, they are
/// written once there is room, and closing before that asks first.
#[test]
fn images_a_full_disk_refused_are_kept_and_written_once_there_is_room() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |_| {});
    let images = Paths::at(dir.path()).images_dir();
    std::fs::write(&images, "a file where the images folder goes: no image can be written").unwrap();
    let mut h = harness(dir.path());
    wait_until(&mut h, "models to load", models_ready);
    type_text(&mut h, "a teapot");
    let said = |a: &StudioApp| a.message.as_ref().is_some_and(|m| m.text.contains("kept in memory"));
    wait_until(&mut h, "the refused write said", said);
    let text = h.state().message.clone().unwrap().text;
    assert!(text.starts_with("history folder: ") && text.contains("1 image is kept in memory"), "{text}");
    let id = h.state().current.clone().expect("the image is shown");
    assert_eq!(h.state().history.failed_writes(), 1);
    // Closing now would lose it: asked first.
    h.input_mut().viewports.entry(egui::ViewportId::ROOT).or_default().events.push(egui::ViewportEvent::Close);
    h.step();
    let asked = h.state().quit_asked.clone().expect("the question");
    assert!(asked.contains("1 image is lost"), "{asked}");
    h.step();
    h.get_by_label("Keep working").click();
    h.step();
    // Room again: written at the next retry, and said.
    std::fs::remove_file(&images).unwrap();
    let written = |a: &StudioApp| a.message.as_ref().is_some_and(|m| m.text.contains("written to the history folder now"));
    wait_until(&mut h, "the retried write", written);
    let entry = h.state().history.get(&id).unwrap().clone();
    assert!(h.state().history.image_path(&entry).is_file());
    assert_eq!(h.state().history.unwritten(), 0);
}

/// A restart keeps the variations grid: its images in order, the cursor on
/// the cell it was on, and the triage goes on from there.
#[test]
fn a_restart_keeps_the_variations_grid_and_its_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = triage_grid(dir.path());
    h.key_press(Key::ArrowRight);
    h.step();
    h.key_press(Key::K);
    h.step();
    let ids: Vec<String> = h.state().variations.iter().map(|c| c.id.clone().unwrap()).collect();
    let settings = dir.path().join("settings.json");
    let kept = |_: &StudioApp| {
        std::fs::read_to_string(&settings).is_ok_and(|t| t.contains(&ids[2]) && t.contains("grid_cursor"))
    };
    wait_until(&mut h, "the grid kept", kept);
    drop(h);
    let mut h = harness(dir.path());
    wait_until(&mut h, "models to load", models_ready);
    let app = h.state();
    assert_eq!(app.variations.iter().map(|c| c.id.clone().unwrap()).collect::<Vec<_>>(), ids);
    assert_eq!(app.var_cursor, 1, "the cursor on the cell it was on");
    h.key_press(Key::Escape);
    h.step();
    h.key_press_modifiers(Modifiers::COMMAND, Key::Num2);
    h.step();
    h.key_press(Key::ArrowRight);
    h.step();
    h.key_press(Key::S);
    h.step();
    let marks: Vec<Mark> = ids.iter().map(|id| h.state().history.get(id).unwrap().mark).collect();
    assert_eq!(marks, vec![Mark::None, Mark::Kept, Mark::Starred]);
    h.get_by_label("Refine 2 kept with Base");
}

/// A history image whose file was deleted by hand says so, in the canvas,
/// in the status bar (once) and on its thumbnail, instead of an empty
/// canvas asking for a prompt; the other images still show.
#[test]
fn a_history_image_whose_file_is_gone_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let h = triage_grid(dir.path());
    let ids: Vec<String> = h.state().variations.iter().map(|c| c.id.clone().unwrap()).collect();
    drop(h);
    let gone = Paths::at(dir.path()).images_dir().join(&zimage_studio::history::History::load(&Paths::at(dir.path())).0.get(&ids[0]).unwrap().file);
    std::fs::remove_file(&gone).unwrap();
    let mut h = harness(dir.path());
    wait_until(&mut h, "models to load", models_ready);
    h.key_press(Key::Escape);
    h.step();
    h.key_press_modifiers(Modifiers::COMMAND, Key::Num1);
    h.step();
    while h.state().current.as_deref() != Some(ids[0].as_str()) {
        let before = h.state().current.clone();
        h.key_press(Key::ArrowDown);
        h.step();
        assert_ne!(h.state().current, before, "Down moves to an older image");
    }
    let thumb = format!("thumb:{}", ids[0]);
    wait_until(&mut h, "the failed read", |a| a.unreadable.contains_key(&ids[0]) && a.unreadable.contains_key(&thumb));
    h.step();
    let why = format!("{} is missing (moved or deleted?)", gone.display());
    h.get_by_label(&format!("#{}: {why}", ids[0]));
    assert_eq!(h.state().unreadable[&ids[0]], why);
    assert!(h.state().images.contains(&format!("thumb:{}", ids[1])), "the other images still show");
    h.key_press(Key::ArrowUp);
    h.step();
    wait_until(&mut h, "the newer image", |a| a.current.as_ref().is_some_and(|c| a.images.contains(c)));
    // Put back and chosen again, it shows.
    let source = Paths::at(dir.path()).images_dir().join(&h.state().history.get(&ids[1]).unwrap().file);
    std::fs::copy(source, &gone).unwrap();
    h.key_press(Key::ArrowDown);
    h.step();
    assert_eq!(h.state().current.as_deref(), Some(ids[0].as_str()));
    wait_until(&mut h, "the image put back", |a| a.images.contains(&ids[0]) && !a.unreadable.contains_key(&ids[0]));
}

/// A restart keeps the settings as they were: after a grid, the seed set,
/// not the seed of the grid's last cell (the newest image, shown).
#[test]
fn a_restart_after_a_grid_keeps_the_seed_set() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = start_grid(dir.path(), "a teapot", |_| {});
    wait_until(&mut h, "3 variations", grid_done);
    let seed = h.state().settings.seed;
    let newest = h.state().history.entries().last().map(|e| (e.id.clone(), e.meta.seed)).unwrap();
    assert_eq!(newest.1, seed + 2, "the newest image is the last cell");
    drop(h);
    let h = harness(dir.path());
    let app = h.state();
    assert_eq!(app.settings.seed, seed, "the seed set before the restart");
    assert_eq!(app.prompt, "a teapot");
    assert_eq!(app.current.as_ref(), Some(&newest.0), "the newest image is shown");
}

/// An edit that ends where it started (here Live switched off and on again)
/// does not render the same image again; the status says done, not stale.
#[test]
fn an_edit_undone_renders_nothing_new() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |s| s.live_draft = LiveDraft::Off);
    let mut h = start_and_type(dir.path(), "a teapot");
    let before = h.state().history.entries().len();
    h.get_by_label("Live").click();
    h.step();
    h.get_by_label("Live").click();
    h.step();
    assert!(h.state().settings.live);
    for _ in 0..20 {
        h.step();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(h.state().history.entries().len(), before, "the same image is not drawn again");
    assert!(h.state().live_job.is_none());
    assert!(matches!(h.state().live_status, LiveStatus::Done { .. }), "{:?}", h.state().live_status);
    // An edit that changes the request renders as before.
    h.state_mut().focus_prompt = true;
    h.step();
    type_text(&mut h, "s");
    wait_until(&mut h, "the new image", |a| a.history.entries().len() == before + 1 && live_done(a));
    // F5 renders on request, the same settings or not.
    h.key_press(Key::F5);
    wait_until(&mut h, "the F5 image", |a| a.history.entries().len() == before + 2 && live_done(a));
}

/// Wildcards: `{a|b|c}` reads one option per image, by its seed; the grid
/// explores them, and every image records the prompt it was drawn from.
#[test]
fn wildcards_pick_an_option_per_seed_and_images_record_what_they_read() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |s| s.variations = 6);
    let template = "a {red|blue|green} teapot";
    let mut h = start_and_type(dir.path(), template);
    let seed = h.state().settings.seed;
    let reads = zimage_engine::wildcards::resolve(template, seed);
    assert!(!reads.contains('{'), "{reads}");
    let live = h.state().history.get(h.state().current.as_ref().unwrap()).unwrap().meta.prompt.clone();
    assert_eq!(live, reads, "the live image records the prompt it read");
    h.get_by_label(&format!("1 wildcard group, 3 prompts; seed {seed} reads: {reads}"));
    h.key_press_modifiers(Modifiers::COMMAND, Key::G);
    h.step();
    wait_until(&mut h, "6 variations", grid_done);
    let app = h.state();
    let prompts: Vec<String> =
        app.variations.iter().map(|c| app.history.get(c.id.as_ref().unwrap()).unwrap().meta.prompt.clone()).collect();
    for (c, p) in app.variations.iter().zip(&prompts) {
        assert_eq!(*p, zimage_engine::wildcards::resolve(template, c.seed));
    }
    let distinct: std::collections::HashSet<&String> = prompts.iter().collect();
    assert!(distinct.len() > 1, "the grid explores the options: {prompts:?}");
    assert_eq!(app.prompt, template, "the box keeps the wildcards");
    // The count under the box stays the count of what the box reads, not of
    // the last cell's prompt (it was marked "≈" until the next edit).
    h.step();
    assert!(h.query_by_label_contains("≈").is_none(), "the count is of the box's text");
    h.get_by_label_contains(" / 512 tokens");
}

/// A grid asked for under the live image starts at the live image's seed:
/// its first cell is that image, not the same image drawn again (it was a
/// second history entry, and on a GPU a second or more of the grid's time).
#[test]
fn a_grid_under_the_live_image_takes_it_as_its_first_cell() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |_| {});
    let mut h = start_and_type(dir.path(), "a teapot");
    let live = h.state().current.clone().unwrap();
    let before = h.state().history.entries().len();
    h.key_press_modifiers(Modifiers::COMMAND, Key::G);
    h.step();
    assert_eq!(h.state().variations[0].id.as_ref(), Some(&live), "the first cell is the live image");
    assert_eq!(h.state().variations[0].job, None);
    wait_until(&mut h, "3 variations", grid_done);
    let seeds: Vec<u64> = h.state().variations.iter().map(|c| c.seed).collect();
    let (s0, n) = (h.state().settings.seed, seeds.len());
    assert_eq!(seeds, (s0..s0 + n as u64).collect::<Vec<_>>());
    assert_eq!(h.state().history.entries().len(), before + n - 1, "the live image is not drawn again");
    // Other settings than the live image's: the first cell is drawn anew.
    h.state_mut().settings.turbo_steps += 1;
    h.key_press_modifiers(Modifiers::COMMAND, Key::G);
    h.step();
    assert!(h.state().variations[0].job.is_some(), "steps changed: drawn again");
    wait_until(&mut h, "3 variations", grid_done);
    assert_ne!(h.state().variations[0].id.as_ref(), Some(&live));
}

/// Ctrl+Enter on an image refined (or being refined) at the same settings
/// does not make the same Base image again: it shows the one made, or says
/// it is queued. Other settings (here another strength) refine again.
#[test]
fn refining_twice_at_the_same_settings_shows_the_refine_made() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |_| {});
    let mut h = start_and_type(dir.path(), "a teapot");
    let base_count = |a: &StudioApp| a.history.entries().iter().filter(|e| e.slot == ModelSlot::Base).count();
    h.key_press_modifiers(Modifiers::COMMAND, Key::Enter);
    h.step();
    h.key_press_modifiers(Modifiers::COMMAND, Key::Enter);
    h.step();
    let said = h.state().message.as_ref().map(|m| m.text.clone()).unwrap_or_default();
    assert!(said.starts_with("a refine of #") && said.ends_with("at these settings is already queued"), "{said}");
    wait_until(&mut h, "the refine", |a| base_count(a) == 1 && a.jobs.is_empty());
    let (turbo, base) = h.state().compare_pair.clone().expect("the pair opened");
    h.key_press_modifiers(Modifiers::COMMAND, Key::Num1);
    h.step();
    h.step();
    h.get_by_label(&format!("from #{turbo}: made already at these settings (#{base}); Ctrl+Enter shows it"));
    h.key_press_modifiers(Modifiers::COMMAND, Key::Enter);
    h.step();
    assert!(h.state().jobs.is_empty(), "not refined again");
    assert_eq!(h.state().view, View::Compare);
    assert_eq!(h.state().compare_pair, Some((turbo.clone(), base.clone())), "the refine made, beside its Turbo image");
    let said = h.state().message.as_ref().map(|m| m.text.clone()).unwrap_or_default();
    assert!(said.starts_with(&format!("#{turbo} is refined at these settings already (#{base}")), "{said}");
    h.state_mut().settings.refine_strength = 0.3;
    h.key_press_modifiers(Modifiers::COMMAND, Key::Enter);
    h.step();
    wait_until(&mut h, "a refine at the new strength", |a| base_count(a) == 2);
}

/// "Refine kept" skips a kept cell already refined at the same settings
/// (here with Ctrl+Enter first): it queued the same Base image again.
/// Changed settings refine every kept cell again.
#[test]
fn refine_kept_skips_what_is_refined_at_these_settings_already() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = triage_grid(dir.path());
    let base_count = |a: &StudioApp| a.history.entries().iter().filter(|e| e.slot == ModelSlot::Base).count();
    h.key_press(Key::K);
    h.step();
    h.key_press(Key::ArrowRight);
    h.step();
    h.key_press(Key::K);
    h.step();
    h.key_press_modifiers(Modifiers::COMMAND, Key::Enter);
    h.step();
    wait_until(&mut h, "the first refine", |a| base_count(a) == 1);
    h.key_press_modifiers(Modifiers::COMMAND, Key::Num2);
    h.step();
    h.get_by_label("Refine 2 kept with Base").click();
    h.step();
    let said = h.state().message.as_ref().map(|m| m.text.clone()).unwrap_or_default();
    assert_eq!(said, "queued 1 Base refine; 1 kept image was refined at these settings already");
    wait_until(&mut h, "the second refine", |a| base_count(a) == 2 && a.jobs.is_empty());
    h.key_press_modifiers(Modifiers::COMMAND, Key::Num2);
    h.step();
    h.get_by_label("Refine 2 kept with Base").click();
    h.step();
    assert!(h.state().jobs.is_empty(), "nothing queued again");
    let said = h.state().message.as_ref().map(|m| m.text.clone()).unwrap_or_default();
    assert!(said.starts_with("the 2 kept images are already refined at these settings"), "{said}");
    // Another strength: both are refined again.
    h.state_mut().settings.refine_strength = 0.3;
    h.get_by_label("Refine 2 kept with Base").click();
    h.step();
    wait_until(&mut h, "two more refines", |a| base_count(a) == 4);
}

#[test]
fn variations_stream_into_a_grid_with_keyboard_triage_and_kept_ones_refine() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = start_grid(dir.path(), "a teapot", |_| {});
    assert_eq!(h.state().view, View::Variations);
    wait_until(&mut h, "3 variations", grid_done);
    let seeds: Vec<u64> = h.state().variations.iter().map(|c| c.seed).collect();
    let s0 = h.state().settings.seed;
    assert_eq!(seeds, vec![s0, s0 + 1, s0 + 2]);
    // Leave the prompt box so single keys triage.
    h.key_press(Key::Escape);
    h.step();
    h.key_press(Key::K);
    h.step();
    // Keys that arrive within one frame still apply in order.
    for k in [Key::ArrowRight, Key::X, Key::ArrowRight, Key::S] {
        h.key_press(k);
    }
    h.step();
    let marks: Vec<Mark> =
        h.state().variations.iter().map(|c| h.state().history.get(c.id.as_ref().unwrap()).unwrap().mark).collect();
    assert_eq!(marks, vec![Mark::Kept, Mark::Rejected, Mark::Starred]);
    // The history's selection follows the grid's cursor, so "start from the
    // selected image" starts from the cell shown with the cursor.
    assert_eq!(h.state().selected, h.state().variations[2].id, "the history follows the grid's cursor");
    h.key_press(Key::ArrowLeft);
    h.step();
    assert_eq!(h.state().selected, h.state().variations[1].id);
    h.get_by_label("Refine 2 kept with Base").click();
    h.step();
    wait_until(&mut h, "2 Base refines", |a| {
        a.history.entries().iter().filter(|e| e.slot == ModelSlot::Base).count() == 2
    });
    let app = h.state();
    let parents: Vec<_> = app
        .history
        .entries()
        .iter()
        .filter(|e| e.slot == ModelSlot::Base)
        .map(|e| app.history.get(e.parent.as_ref().unwrap()).unwrap().meta.seed)
        .collect();
    assert_eq!(parents, vec![s0, s0 + 2], "the kept and the starred one, in order");

    // The compare view steps through the refined pairs.
    wait_until(&mut h, "the compare view", |a| a.view == View::Compare);
    // The history lists only the Base images, or only the kept ones, on demand.
    h.get_by_label("Base").click();
    h.step();
    h.step();
    assert_eq!(h.query_all_by_label_contains(" Base · ").count(), 2);
    assert_eq!(h.query_all_by_label_contains(" Turbo · ").count(), 0, "Turbo entries hidden");
    h.get_by_label("2 of 5");
    h.get_by_label("Kept").click();
    h.step();
    h.step();
    assert_eq!(h.query_all_by_label_contains(" Turbo · ").count(), 2, "the kept and the starred variation");
    assert_eq!(h.query_all_by_label_contains("[kept]").count() + h.query_all_by_label_contains("[star]").count(), 2);
    // Any entry joins the kept set from its context menu: here a Base final.
    h.get_by_label("All").click();
    h.step();
    h.step();
    h.query_all_by_label_contains(" Base · ").next().expect("a Base entry").click_secondary();
    h.step();
    h.step();
    h.step();
    h.get_by_label("Star").click();
    h.step();
    h.get_by_label("Kept").click();
    h.step();
    h.step();
    assert_eq!(h.query_all_by_label_contains(" Base · ").count(), 1, "the starred Base image is in the kept set");
    assert_eq!(h.query_all_by_label_contains("[star]").count(), 2);
    h.get_by_label("All").click();
    h.step();
    let pairs = h.state().refine_pairs();
    assert_eq!(pairs.len(), 2);
    assert_eq!(h.state().compare_pair.as_ref(), Some(&pairs[0]), "the batch's first pair stays on screen as the second finishes");
    h.get_by_label("pair 1 of 2");
    h.get_by_label_contains("pair 2 of 2, ← / → step to it");
    h.key_press(Key::ArrowRight);
    h.step();
    h.step();
    assert_eq!(h.state().compare_pair.as_ref(), Some(&pairs[1]));
    assert_eq!(h.state().selected.as_ref(), Some(&pairs[1].1), "the history follows the pair shown");
    h.get_by_label("pair 2 of 2");
    h.get_by_label("Previous").click();
    h.step();
    assert_eq!(h.state().compare_pair.as_ref(), Some(&pairs[0]));
    h.get_by_label("Next").click();
    h.step();
    assert_eq!(h.state().compare_pair.as_ref(), Some(&pairs[1]));

    // All pairs at once (N-up), one zoom: a click picks a pair, Ctrl+S saves
    // every Base image shown, a double click opens a pair side by side.
    h.get_by_label("All pairs").click();
    h.step();
    h.step();
    h.get_by_label_contains("Pairs 1–2 of 2: Turbo above Base");
    let cells = h.state().compare.pair_cells.clone();
    assert_eq!(cells.len(), 2, "{cells:?}");
    assert!(cells[0].width() > 100.0 && cells[0].height() > 200.0, "{cells:?}");
    click_at(&mut h, cells[0].center(), false);
    assert_eq!(h.state().compare_pair.as_ref(), Some(&pairs[0]), "the clicked pair is picked");
    assert_eq!(h.state().selected.as_ref(), Some(&pairs[0].1));
    assert_eq!(h.state().compare.mode, CompareMode::AllPairs);
    h.key_press_modifiers(Modifiers::COMMAND, Key::S);
    h.step();
    let saved = std::fs::read_dir(dir.path().join("saved")).unwrap().count();
    assert_eq!(saved, 2, "both Base images saved");
    h.get_by_label_contains("saved 2 images");
    click_at(&mut h, cells[1].center(), true);
    assert_eq!(h.state().compare_pair.as_ref(), Some(&pairs[1]));
    assert_eq!(h.state().compare.mode, CompareMode::SideBySide, "a double click opens the pair");
}

/// A primary-button drag from `from` by `by`, in a few pointer moves.
fn drag(h: &mut Harness<'static, StudioApp>, from: egui::Pos2, by: egui::Vec2) {
    let button = egui::PointerButton::Primary;
    h.event(egui::Event::PointerMoved(from));
    h.step();
    h.event(egui::Event::PointerButton { pos: from, button, pressed: true, modifiers: Modifiers::NONE });
    h.step();
    for k in 1..=4 {
        h.event(egui::Event::PointerMoved(from + by * (k as f32 / 4.0)));
        h.step();
    }
    h.event(egui::Event::PointerButton { pos: from + by, button, pressed: false, modifiers: Modifiers::NONE });
    h.step();
}

/// A primary click (or double click) at `pos`, as the pointer would make it.
fn click_at(h: &mut Harness<'static, StudioApp>, pos: egui::Pos2, double: bool) {
    h.event(egui::Event::PointerMoved(pos));
    h.step();
    // The clock stands still meanwhile: the harness's frames (1/4 s) are
    // further apart than a double click's clicks may be. It starts a second
    // after the last frame, so that an earlier click does not make this one
    // part of a triple click.
    let now = h.ctx.input(|i| i.time) + 1.0;
    h.input_mut().time = Some(now);
    let button = egui::PointerButton::Primary;
    for _ in 0..if double { 2 } else { 1 } {
        for pressed in [true, false] {
            h.event(egui::Event::PointerButton { pos, button, pressed, modifiers: Modifiers::NONE });
            h.step();
        }
    }
    h.input_mut().time = None;
    h.step();
}

/// The grid's keyboard cursor is drawn (it once was, but clipped away to its
/// four corner pixels): moving it right paints a frame in the selection colour
/// around the next cell (rendered with wgpu, as the window draws it); Enter
/// opens that cell with its parameters.
#[test]
fn the_variations_cursor_is_framed_and_enter_opens_its_cell() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = triage_grid(dir.path());
    h.step();
    let frame = h.ctx.global_style().visuals.selection.stroke.color;
    let is_frame = |p: &[u8]| p.iter().zip(frame.to_array()).take(3).all(|(a, b)| a.abs_diff(b) <= 8);
    let before = h.render().expect("the harness renders with wgpu");
    h.key_press(Key::ArrowRight);
    h.step();
    h.step();
    assert_eq!(h.state().var_cursor, 1);
    let after = h.render().expect("the harness renders with wgpu");
    let framed = after.chunks(4).zip(before.chunks(4)).filter(|(a, b)| is_frame(a) && !is_frame(b)).count();
    // A 2-px frame around a cell of a 3-wide grid is well over 1,000 pixels.
    assert!(framed > 400, "only {framed} pixels took the cursor's colour");
    // Enter opens the cell in the Live view with its seed, so that editing
    // the prompt goes on from the picked variation.
    let picked = h.state().variations[1].clone();
    h.key_press(Key::Enter);
    h.step();
    assert_eq!(h.state().view, View::Live);
    assert_eq!(h.state().current, picked.id);
    assert_eq!(h.state().settings.seed, picked.seed);
    // The opened cell is the live image of these settings: a new grid starts
    // from it instead of drawing it again.
    let before = h.state().history.entries().len();
    h.key_press_modifiers(Modifiers::COMMAND, Key::G);
    h.step();
    assert_eq!((h.state().variations[0].id.clone(), h.state().variations[0].job), (picked.id.clone(), None));
    wait_until(&mut h, "3 variations", grid_done);
    assert_eq!(h.state().history.entries().len(), before + 2);
}

/// Many variations in a small pane keep judgeable thumbnails and scroll;
/// the arrow keys move by the columns shown and scroll to the cursor (50
/// variations once shrank to 44-point thumbnails, half hidden by their labels).
#[test]
fn a_large_grid_scrolls_and_the_cursor_stays_in_view() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |s| s.variations = 12);
    let mut h = harness_of_size(dir.path(), egui::vec2(900.0, 600.0));
    wait_until(&mut h, "models to load", models_ready);
    h.state_mut().settings.live = false;
    type_text(&mut h, "a teapot");
    h.key_press_modifiers(Modifiers::COMMAND, Key::G);
    wait_until(&mut h, "12 variations", grid_done);
    let cols = h.state().var_columns;
    assert!((1..4).contains(&cols), "{cols} columns in a 340-point pane");
    h.key_press(Key::Escape);
    h.step();
    let frame = h.ctx.global_style().visuals.selection.stroke.color;
    let framed = |h: &mut Harness<'static, StudioApp>| {
        let image = h.render().expect("the harness renders with wgpu");
        image.chunks(4).filter(|p| p.iter().zip(frame.to_array()).take(3).all(|(a, b)| a.abs_diff(b) <= 8)).count()
    };
    assert!(framed(&mut h) > 400, "the first cell is framed");
    for _ in 0..20 {
        h.key_press(Key::ArrowDown);
        h.step();
    }
    assert_eq!(h.state().var_cursor, (11 / cols) * cols, "down the first column to the last row");
    for _ in 0..30 {
        h.step();
    }
    let seen = framed(&mut h);
    assert!(seen > 400, "the cursor's cell was scrolled into view: {seen} framed pixels");
    // - and + make the thumbnails smaller (more columns) or larger (fewer).
    for _ in 0..3 {
        h.key_press(Key::Minus);
        h.step();
    }
    h.step();
    assert!(h.state().var_columns > cols, "{} columns", h.state().var_columns);
    for _ in 0..6 {
        h.key_press(Key::Plus);
        h.step();
    }
    h.step();
    assert_eq!(h.state().var_columns, 1);
    assert!(h.state().settings.grid_thumbnail > 200.0);
    h.key_press(Key::Num0);
    h.step();
    h.step();
    assert_eq!(h.state().var_columns, cols, "0: the default size");
}

/// "Clean up…" asks first, then removes the rejected images and the
/// unmarked Turbo images nothing was made from, files included (50-image
/// grids every day once grew the history without end); "Delete" removes one.
#[test]
fn the_history_is_cleaned_up_after_a_confirmation() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = triage_grid(dir.path());
    for k in [Key::K, Key::ArrowRight, Key::X] {
        h.key_press(k);
        h.step();
    }
    let cells: Vec<String> = h.state().variations.iter().map(|c| c.id.clone().unwrap()).collect();
    let files = |dir: &Path| std::fs::read_dir(dir.join("images")).map(|d| d.count()).unwrap_or(0);
    wait_until(&mut h, "the files", |_| files(dir.path()) == 3);
    h.get_by_label("Clean up…").click();
    // The click's frame, then the dialog's sizing frame.
    for _ in 0..3 {
        h.step();
    }
    // The rejected cell (on screen, under the cursor) and the unmarked one.
    h.get_by_label_contains("Remove 2 images");
    assert_eq!(h.state().history.entries().len(), 3, "nothing removed before the confirmation");
    h.get_by_label("Remove 2").click();
    h.step();
    h.step();
    assert!(h.state().cleanup.is_none());
    let left: Vec<String> = h.state().history.entries().iter().map(|e| e.id.clone()).collect();
    assert_eq!(left, [cells[0].clone()], "the kept one stays");
    assert_eq!(h.state().variations.len(), 1, "the grid lets the removed cells go");
    h.get_by_label_contains("removed 2 images from the history");
    wait_until(&mut h, "the files deleted", |_| files(dir.path()) == 1);
    // Cancel removes nothing; "Delete" on one image removes it.
    h.get_by_label("Clean up…").click();
    for _ in 0..3 {
        h.step();
    }
    h.get_by_label_contains("Nothing to remove");
    h.get_by_label("Close").click();
    h.step();
    assert!(h.state().cleanup.is_none());
    let ctx = h.ctx.clone();
    h.state_mut().apply(&ctx, zimage_studio::app::Action::RemoveImages(vec![cells[0].clone()]));
    h.step();
    assert!(h.state().history.entries().is_empty());
    wait_until(&mut h, "the last file deleted", |_| files(dir.path()) == 0);
    // The index on disk agrees.
    drop(h);
    let (back, _) = zimage_studio::history::History::load(&Paths::at(dir.path()));
    assert!(back.entries().is_empty());
}

/// The prompt box has focus while one types, where a digit is text: Ctrl+1 /
/// 2 / 3 change the view from there, and the prompt keeps its text and focus
/// (a plain 3 pressed to compare used to re-render a prompt ending in "3").
#[test]
fn ctrl_digits_change_the_view_from_the_prompt_box() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = typed_without_live(dir.path(), "a teapot", |_| {});
    let prompt_focused = |h: &Harness<'static, StudioApp>| {
        let id = h.state().prompt_id.expect("the prompt box was drawn");
        h.ctx.memory(|m| m.has_focus(id))
    };
    assert!(prompt_focused(&h));
    for (key, view) in [(Key::Num3, View::Compare), (Key::Num2, View::Variations), (Key::Num1, View::Live)] {
        h.key_press_modifiers(Modifiers::COMMAND, key);
        h.step();
        assert_eq!(h.state().view, view, "{key:?}");
    }
    assert_eq!(h.state().prompt, "a teapot");
    assert!(prompt_focused(&h));
}

/// The empty Variations view says what a grid is and has its own button, so
/// that the grid can be started from where it is shown.
#[test]
fn the_empty_variations_view_starts_a_grid() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = typed_without_live(dir.path(), "a teapot", |_| {});
    h.state_mut().view = View::Variations;
    h.step();
    h.get_by_label_contains("No variations yet: 3 Turbo images");
    let buttons: Vec<_> = h.query_all_by_label("Generate grid (Ctrl+G)").collect();
    assert_eq!(buttons.len(), 2, "the controls' button and the empty view's");
    buttons[1].click();
    wait_until(&mut h, "3 variations", grid_done);
    assert!(h.query_by_label_contains("No variations yet").is_none());
}

/// A long grid stops on "Stop": the unfinished cells are cancelled and
/// leave the grid, the finished ones stay.
#[test]
fn a_running_variations_grid_can_be_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = start_grid(dir.path(), "a slow teapot", |s| {
        s.turbo_steps = 1000;
        s.variations = 4;
    });
    // No Turbo speed measured yet: no time said; once there is one, the time left.
    assert!(h.query_by_label_contains(" left · ").is_none() && h.query_by_label_contains("s left").is_none());
    h.state_mut().pass_rate.insert(ModelSlot::Turbo, 100.0);
    h.step();
    // 4 images of 64², 50 steps each (the Turbo steps slider clamps the 1000), at 100 s per megapixel-step: 82 s.
    let left = h.state().variations_left().expect("a speed is known");
    assert!(left > Duration::from_secs(60) && left <= Duration::from_millis(82_000), "{left:?}");
    assert!(h.query_by_label_contains("4 variations · 0 done, about ").is_some(), "the time left");
    assert!(h.query_by_label_contains(" s left · 0 kept").is_some());
    h.get_by_label("Stop (4 left)").click();
    wait_until(&mut h, "the grid to stop", |a| a.variations.iter().all(|c| c.id.is_some()) && a.engine.queued() == 0);
    let app = h.state();
    assert!(app.variations.len() < 4, "{} cells left", app.variations.len());
    assert!(h.query_by_label_contains("left)").is_none(), "nothing left to stop");
}

#[test]
fn help_overlay_and_model_status() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |_| {});
    let mut h = harness_with(dir.path(), Some("/no/such/model".into()), Some(fixture("tiny-base")));
    wait_until(&mut h, "the model status", |a| matches!(a.models.get(&ModelSlot::Turbo), Some(ModelState::Failed(_))));
    // A clear status instead of an image, and no crash when typing.
    h.get_by_label_contains("Turbo: error (see Settings)");
    h.key_press(Key::F1);
    h.step();
    h.get_by_label("Keyboard shortcuts");
    h.get_by_label_contains("refine the Turbo image in view with Base");
    h.key_press(Key::Escape);
    h.step();
    assert!(!h.state().show_help);
    type_text(&mut h, "x");
    wait_until(
        &mut h,
        "the live error",
        |a| matches!(&a.live_status, LiveStatus::Error(m) if m.contains("/no/such/model")),
    );
}

/// The settings window's "Use built-in demo models" loads the demo pair at
/// once (it once only filled the fields, and a broken Turbo stayed broken
/// until Apply); Enter in a path field applies it; an edit not applied yet
/// is said.
#[test]
fn settings_use_the_demo_models_at_once_and_enter_applies_a_path() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |s| s.turbo_model = Some("/no/such/model".into()));
    let mut h = harness_sized(dir.path(), None, Some(fixture("tiny-base")), egui::vec2(1280.0, 1600.0));
    wait_until(&mut h, "the model status", |a| matches!(a.models.get(&ModelSlot::Turbo), Some(ModelState::Failed(_))));
    h.key_press_modifiers(Modifiers::COMMAND, Key::Comma);
    h.step();
    h.get_by_label("Use built-in demo models").click();
    h.step();
    wait_until(&mut h, "the demo pair", |a| {
        [(ModelSlot::Turbo, "demo-turbo"), (ModelSlot::Base, "demo-base")]
            .iter()
            .all(|(s, n)| matches!(a.models.get(s), Some(ModelState::Ready { name, .. }) if name == n))
    });
    let (saved, _) = Settings::load(&Paths::at(dir.path()));
    assert_eq!((saved.turbo_model.as_deref(), saved.base_model.as_deref()), (Some("demo-turbo"), Some("demo-base")));
    assert!(h.query_by_label_contains("edited: Enter or Apply").is_none(), "nothing left unapplied");

    // A typed path: said to be unapplied, then applied by Enter.
    h.get_by_role_and_label(Role::TextInput, "Turbo model").focus();
    h.step();
    h.key_press_modifiers(Modifiers::COMMAND, Key::A);
    type_text(&mut h, &fixture("tiny-turbo"));
    h.get_by_label_contains("edited: Enter or Apply");
    assert_eq!(Settings::load(&Paths::at(dir.path())).0.turbo_model.as_deref(), Some("demo-turbo"), "not applied while typing");
    h.key_press(Key::Enter);
    h.step();
    wait_until(&mut h, "the typed Turbo", |a| a.settings.turbo_model.as_deref() == Some(fixture("tiny-turbo").as_str()) && models_ready(a));
    assert_eq!(Settings::load(&Paths::at(dir.path())).0.turbo_model, Some(fixture("tiny-turbo")));
    assert!(h.query_by_label_contains("edited: Enter or Apply").is_none());
}

/// A long prompt scrolls inside its box: the box stops growing at about a
/// third of the window, and the controls under it stay on screen.
#[test]
fn a_long_prompt_scrolls_inside_its_box() {
    let (_dir, mut h) = test_window(egui::vec2(1280.0, 800.0));
    wait_until(&mut h, "models to load", models_ready);
    let long = ["a lighthouse on a cliff at dusk with gulls over a stormy sea, oil painting"; 40].join(", ");
    type_text(&mut h, &long);
    for _ in 0..3 {
        h.step();
    }
    // (The text field's own rect is its whole content; what matters is where the rest starts.)
    let generate = h.get_by_label("Generate (F5)").rect();
    assert!(generate.bottom() < 0.3 * 800.0 + 160.0, "Generate stays near the top, under the box: {generate:?}");
    assert_eq!(h.state().prompt, long, "all of it is in the box");
}

/// A second app started on a data folder in use stops at once with a
/// plain line (and, with a display, a small window saying it), instead of
/// overwriting the first one's history.
#[test]
fn a_second_app_on_the_same_data_folder_stops_with_a_plain_line() {
    let dir = tempfile::tempdir().unwrap();
    let _first = zimage_studio::instance::lock_data_dir(dir.path()).expect("the first app's lock");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_zimage-studio"))
        .arg("--data-dir")
        .arg(dir.path())
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY")
        .output()
        .expect("the app runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let line = format!("zimage-studio: Z-Image Studio is already running with the data folder {}", dir.path().display());
    assert!(stderr.lines().any(|l| l.starts_with(&line)), "{stderr}");
    assert!(!dir.path().join("history.json").exists() && !dir.path().join("settings.json").exists(), "nothing of the first app's touched");
}

/// A ComfyUI folder (DiT, `text_encoders/`, `vae/`) is a Turbo model for the
/// app once Qwen3's tokenizer.json sits beside the DiT: the app has no
/// `--tokenizer`, and without the file the error says where to put it.
#[test]
fn a_comfyui_model_with_its_tokenizer_beside_it_draws_in_the_app() {
    let comfy = tempfile::tempdir().unwrap();
    let fixtures = PathBuf::from(fixture("tiny-comfy"));
    for (sub, file) in [("diffusion_models", "z_image_turbo_tiny.safetensors"), ("text_encoders", "qwen_3_tiny.safetensors"), ("vae", "ae.safetensors")] {
        std::fs::create_dir_all(comfy.path().join(sub)).unwrap();
        std::fs::copy(fixtures.join(sub).join(file), comfy.path().join(sub).join(file)).unwrap();
    }
    std::fs::copy(PathBuf::from(fixture("tiny-turbo")).join("vae/config.json"), comfy.path().join("vae/ae.json")).unwrap();
    let dit = comfy.path().join("diffusion_models/z_image_turbo_tiny.safetensors");
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |s| s.turbo_model = Some(dit.display().to_string()));
    let mut h = harness_sized(dir.path(), None, Some(fixture("tiny-base")), egui::vec2(1280.0, 800.0));
    wait_until(&mut h, "the Turbo model's state", |a| matches!(a.models.get(&ModelSlot::Turbo), Some(ModelState::Failed(_) | ModelState::Ready { .. })));
    let tokenizer_known = zimage_engine::discovery::hf_cache_dir().is_some_and(|c| {
        zimage_engine::discovery::HF_REPOS.iter().any(|(r, _)| !zimage_engine::discovery::hf_snapshots(&c, r).is_empty())
    });
    if !tokenizer_known {
        assert!(
            matches!(h.state().models.get(&ModelSlot::Turbo), Some(ModelState::Failed(m)) if m.contains("tokenizer.json") && m.contains("beside this file")),
            "{:?}",
            h.state().models
        );
    }
    drop(h);
    std::fs::copy(PathBuf::from(fixture("tiny-turbo")).join("tokenizer/tokenizer.json"), comfy.path().join("diffusion_models/tokenizer.json")).unwrap();
    let mut h = harness_sized(dir.path(), None, Some(fixture("tiny-base")), egui::vec2(1280.0, 800.0));
    wait_until(&mut h, "models to load", models_ready);
    type_text(&mut h, "a red fox");
    wait_until(&mut h, "the live image", live_done);
    assert_eq!(h.state().history.entries().last().unwrap().meta.model, "z_image_turbo_tiny.safetensors");
}

/// "Open with" on a saved image while the app runs: the second start hands
/// the file over and ends at once; the running window restores its
/// parameters, as a drop does.
#[test]
fn an_image_opened_while_the_app_runs_goes_to_the_running_window() {
    let (dir, mut h) = test_window(egui::vec2(1280.0, 800.0));
    wait_until(&mut h, "models to load", models_ready);
    let pics = tempfile::tempdir().unwrap();
    let png = pics.path().join("teapot.png");
    let meta = GenerationMetadata { prompt: "a handed over teapot".into(), seed: 77, width: 64, height: 64, ..Default::default() };
    metadata::save_png(&png, &[120; 64 * 64 * 3], 64, 64, &meta).unwrap();
    let _lock = zimage_studio::instance::lock_data_dir(dir.path()).expect("free: the harness takes no lock");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_zimage-studio"))
        .arg("--data-dir")
        .arg(dir.path())
        .arg(&png)
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY")
        .output()
        .expect("the app runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("already running"));
    wait_until(&mut h, "the handed-over image", |a| a.prompt == "a handed over teapot");
    assert_eq!(h.state().settings.seed, 77);
}

/// The two models swapped (a Base checkpoint as the live Turbo, a Turbo
/// one as Base) still run, but the top bar and Settings say each is not
/// the kind its slot is made for; the right pair says nothing.
#[test]
fn swapped_models_are_said_to_be_in_the_wrong_slots() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |_| {});
    let mut h = harness_sized(dir.path(), Some(fixture("tiny-base")), Some(fixture("tiny-turbo")), egui::vec2(1280.0, 1600.0));
    wait_until(&mut h, "models to load", models_ready);
    h.get_by_label("Turbo: tiny-base (not a Turbo model)");
    h.get_by_label("Base: tiny-turbo (not a Base model)");
    h.key_press_modifiers(Modifiers::COMMAND, Key::Comma);
    h.step();
    h.step();
    h.get_by_label_contains("This is a Base model (many steps, CFG): live previews will be slow");
    h.get_by_label_contains("This is a Turbo model (distilled, no CFG)");
    drop(h);
    let (_dir, mut h) = test_window(egui::vec2(1280.0, 1600.0));
    wait_until(&mut h, "models to load", models_ready);
    h.get_by_label("Turbo: tiny-turbo");
    assert!(h.query_by_label_contains("not a Turbo model").is_none() && h.query_by_label_contains("not a Base model").is_none());
}

/// A mistyped model path applied in Settings leaves the working model
/// loaded and saved: the error is said under the field and in the status
/// bar, the typed text stays to be mended, and the live image still renders.
#[test]
fn a_mistyped_model_path_keeps_the_working_model() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |s| {
        s.turbo_model = Some(fixture("tiny-turbo"));
        s.base_model = Some(fixture("tiny-base"));
    });
    let mut h = harness_sized(dir.path(), None, None, egui::vec2(1280.0, 1600.0));
    wait_until(&mut h, "models to load", models_ready);
    let before = Some(fixture("tiny-turbo"));
    h.key_press_modifiers(Modifiers::COMMAND, Key::Comma);
    h.step();
    h.get_by_role_and_label(Role::TextInput, "Turbo model").focus();
    h.step();
    h.key_press_modifiers(Modifiers::COMMAND, Key::A);
    type_text(&mut h, "/no/such/turbo");
    h.key_press(Key::Enter);
    h.step();
    wait_until(&mut h, "the refusal", |a| a.model_rejected.contains_key(&ModelSlot::Turbo));
    for _ in 0..3 {
        h.step();
    }
    let why = format!("/no/such/turbo: no such file or folder; still using {}", fixture("tiny-turbo"));
    h.get_by_label(&why);
    assert_eq!(h.state().message.as_ref().map(|m| m.text.as_str()), Some(format!("Turbo model not changed: {why}").as_str()));
    assert!(matches!(h.state().models.get(&ModelSlot::Turbo), Some(ModelState::Ready { .. })), "{:?}", h.state().models);
    assert_eq!(h.state().settings.turbo_model, before);
    assert_eq!(Settings::load(&Paths::at(dir.path())).0.turbo_model, before, "the saved model is the working one");
    assert_eq!(h.state().settings_form[0], "/no/such/turbo", "the typed text stays to be mended");
    h.get_by_label_contains("edited: Enter or Apply");
    h.key_press(Key::Escape);
    h.step();
    type_text(&mut h, "a red fox");
    wait_until(&mut h, "the live image", live_done);
}

/// Ctrl+H (or the top bar's History toggle) hides the history panel, which
/// gives the image the room in a small window; the choice is kept.
#[test]
fn ctrl_h_hides_the_history_panel_and_the_choice_is_kept() {
    let (dir, mut h) = test_window(egui::vec2(900.0, 800.0));
    wait_until(&mut h, "models to load", models_ready);
    type_text(&mut h, "a red fox");
    wait_until(&mut h, "the live image", live_done);
    let with_panel = h.state().live_view.drawn.expect("the live image").width();
    h.get_by_label_contains("click: restore");
    h.key_press_modifiers(Modifiers::COMMAND, Key::H);
    h.step();
    h.step();
    assert!(h.query_by_label_contains("click: restore").is_none(), "the panel is gone");
    let without = h.state().live_view.drawn.unwrap().width();
    assert!(without > with_panel + 100.0, "the image has the room: {with_panel} -> {without}");
    assert_eq!(h.state().prompt, "a red fox", "Ctrl+H typed nothing into the prompt box");
    h.state_mut().persist_settings();
    assert!(!Settings::load(&Paths::at(dir.path())).0.show_history);
    h.get_by_label("History").click();
    h.step();
    h.get_by_label_contains("click: restore");
}

/// In a window too short for the whole list of shortcuts, the help
/// scrolls to its last line instead of cutting it off below the window.
#[test]
fn the_help_scrolls_in_a_short_window() {
    let (_dir, mut h) = test_window(egui::vec2(900.0, 400.0));
    h.step();
    h.key_press(Key::F1);
    for _ in 0..4 {
        h.step();
    }
    let last = h.get_by_label("this help");
    assert!(last.rect().top() > 400.0, "the last line starts below the window");
    for _ in 0..30 {
        h.get_by_label("this help").scroll_down();
        h.step();
    }
    let rect = h.get_by_label("this help").rect();
    assert!(rect.bottom() <= 400.0, "the last line scrolled into the window: {rect:?}");
}

/// Settings opened in a short window and again after the window grew use
/// the room: the height it had in the short window is not kept.
#[test]
fn settings_grow_with_the_window() {
    let (_dir, mut h) = test_window(egui::vec2(900.0, 450.0));
    let open_settings = |h: &mut Harness<'static, StudioApp>| {
        h.key_press_modifiers(Modifiers::COMMAND, Key::Comma);
        for _ in 0..10 {
            h.step();
        }
        // The window's own area (its title is the button's label too).
        let id = egui::Id::unique(zimage_studio::ui::settings::SETTINGS_WINDOW);
        h.ctx.memory(|m| m.area_rect(id)).expect("the Settings window")
    };
    let short = open_settings(&mut h);
    assert!(short.height() <= 450.0, "{short:?}");
    h.key_press(Key::Escape);
    h.step();
    h.set_size(egui::vec2(1280.0, 1000.0));
    h.step();
    let tall = open_settings(&mut h);
    // Its last row shows without scrolling, as it does when first opened tall.
    let last = h.get_by_label("Add Base LoRA").rect();
    assert!(last.bottom() <= tall.bottom(), "Settings kept the short window's height: {tall:?}, last row at {last:?}");
}

/// A long live error (one naming a path) is cut short before the frame
/// time on the right of the status bar, not drawn under it.
#[test]
fn a_long_live_error_is_cut_before_the_right_of_the_status_bar() {
    let (_dir, mut h) = test_window(egui::vec2(700.0, 500.0));
    wait_until(&mut h, "models to load", models_ready);
    let long = format!("cannot read {}", "/a/very/long/folder/name".repeat(10));
    h.state_mut().live_status = LiveStatus::Error(long.clone());
    h.step();
    h.step();
    let status = h.get_by_label_contains(&long).rect();
    let frame = h.get_by_label_contains("frame ").rect();
    assert!(status.right() <= frame.left(), "the live state {status:?} runs under the frame time {frame:?}");
}

/// A note ("saved …") leaves the status bar by itself; an error stays until
/// dismissed; a long message is cut short, its whole text on hover.
#[test]
fn notes_fade_and_errors_stay_in_the_status_bar() {
    let (_dir, mut h) = test_window(egui::vec2(700.0, 500.0));
    h.step();
    let long = format!("saved {}", "/a/very/long/folder/name".repeat(20));
    h.state_mut().info(long.clone());
    h.step();
    assert!(h.query_by_label(&long).is_some(), "shown (cut short on screen, whole for screen readers)");
    let ago = zimage_studio::app::NOTE_SHOWN + Duration::from_secs(1);
    h.state_mut().message.as_mut().unwrap().since = Instant::now() - ago;
    h.step();
    assert!(h.state().message.is_none(), "the note went");
    h.state_mut().error("cannot write /x: disk full");
    h.state_mut().message.as_mut().unwrap().since = Instant::now() - ago;
    h.step();
    h.step();
    h.get_by_label("cannot write /x: disk full");
    h.get_by_label("x").click();
    h.step();
    assert!(h.state().message.is_none(), "dismissed");
    // A key that can do nothing yet says why in a note, not in an error to
    // dismiss: Ctrl+S and Ctrl+C before any image, Ctrl+Enter with no prompt.
    for (modifiers, key, said) in [
        (Modifiers::COMMAND, Key::S, "nothing to save yet"),
        (Modifiers::COMMAND, Key::Enter, "nothing to refine yet: type a prompt to make a Turbo image first"),
    ] {
        h.key_press_modifiers(modifiers, key);
        h.step();
        h.step();
        let msg = h.state().message.clone().expect("a message");
        assert_eq!((msg.text.as_str(), msg.error), (said, false));
    }
}

/// With a Turbo model and no Base, the refine section says there is no
/// Base model and where to get one, its button is off, and Ctrl+Enter says
/// the same instead of queueing a job that fails.
#[test]
fn without_a_base_model_refining_says_where_to_get_one() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |s| s.turbo_model = Some(fixture("tiny-turbo")));
    let mut h = harness_sized(dir.path(), None, None, egui::vec2(1280.0, 800.0));
    wait_until(&mut h, "the Turbo model", |a| matches!(a.models.get(&ModelSlot::Turbo), Some(ModelState::Ready { .. })));
    assert!(matches!(h.state().models.get(&ModelSlot::Base), Some(ModelState::NotConfigured)), "{:?}", h.state().models);
    type_text(&mut h, "a red fox");
    wait_until(&mut h, "the live image", live_done);
    let why = "no Base model is configured: choose or download Z-Image in Settings";
    h.get_by_label(why);
    {
        use egui_kittest::kittest::NodeT;
        assert!(h.get_by_label("Refine (Ctrl+Enter)").accesskit_node().is_disabled(), "the button is off");
    }
    h.key_press_modifiers(Modifiers::COMMAND, Key::Enter);
    h.step();
    assert_eq!(h.state().message.as_ref().map(|m| m.text.as_str()), Some(why));
    assert_eq!(h.state().engine.queued(), 0, "no job that could only fail");
}

/// Ctrl+Enter while the first Turbo image is still rendering says so,
/// instead of asking for a prompt that is already typed.
#[test]
fn refine_before_the_first_image_is_done_says_it_is_rendering() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |s| {
        (s.width, s.height, s.size_chosen) = (1024, 1024, true);
    });
    let mut h = harness(dir.path());
    wait_until(&mut h, "models to load", models_ready);
    type_text(&mut h, "a red fox");
    wait_until(&mut h, "the live job", |a| a.live_job.is_some());
    h.key_press_modifiers(Modifiers::COMMAND, Key::Enter);
    h.step();
    assert!(h.state().current.is_none(), "no image yet");
    let msg = h.state().message.clone().expect("a note");
    assert_eq!((msg.text.as_str(), msg.error), ("nothing to refine yet: the first Turbo image is still rendering", false));
}

/// With the built-in demo (whose prompt hint is a caption it understands),
/// words it never learnt are named (a "cat" came out as coloured noise,
/// which looked like a broken app); a real model gets neither.
#[test]
fn the_demo_model_says_which_words_it_cannot_read() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |_| {});
    let mut h = harness_with(dir.path(), Some("demo-turbo".into()), Some("demo-base".into()));
    h.step();
    type_text(&mut h, "a large red cat on a sofa");
    h.get_by_label("The demo model knows only coloured shapes; it cannot read: cat, sofa");
    h.state_mut().prompt = "a large red circle in the center on a blue background".into();
    h.step();
    assert!(h.query_by_label_contains("it cannot read").is_none());
    // A word still being typed is not named while it can become a known one
    // (the warning came and went with every keystroke, moving the controls).
    h.state_mut().prompt = "a large red circle in the center and a small gr".into();
    h.step();
    assert!(h.query_by_label_contains("it cannot read").is_none());
    h.state_mut().prompt = "a large red circle in the center and a small grx".into();
    h.step();
    h.get_by_label("The demo model knows only coloured shapes; it cannot read: grx");

    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |_| {});
    let mut h = harness(dir.path());
    type_text(&mut h, "a cat on a sofa");
    assert!(h.query_by_label_contains("it cannot read").is_none(), "not for a real model");
}

/// Until the user picks a size, the size follows the Turbo model's natural
/// size (the VAE config's `sample_size`: 1024 in the tiny fixtures' config,
/// 128 for the built-in demo); a chosen size is kept.
#[test]
fn size_follows_the_model_until_the_user_chooses_one() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |s| s.size_chosen = false);
    let mut h = harness(dir.path());
    wait_until(&mut h, "models to load", models_ready);
    assert_eq!((h.state().settings.width, h.state().settings.height), (1024, 1024));

    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |_| {});
    let mut h = harness(dir.path());
    wait_until(&mut h, "models to load", models_ready);
    assert_eq!((h.state().settings.width, h.state().settings.height), (64, 64));
}

#[path = "support/hub.rs"]
mod hub;

/// First run: the welcome explains the two models and offers the demo,
/// finding models, downloading Turbo (its size shown) and a folder; nothing
/// is fetched without a click; the choice is remembered.
#[test]
fn first_run_welcome_starts_the_demo_and_is_remembered() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = harness_with(dir.path(), None, None);
    h.step();
    assert!(h.state().show_welcome, "no settings yet: first run");
    h.get_by_label("Welcome to Z-Image Studio");
    h.get_by_label_contains("Z-Image-Turbo draws a new image in 8 steps");
    h.get_by_label_contains("Download Z-Image-Turbo (about 32.8 GB)");
    h.get_by_label("Find models on this computer");
    h.get_by_label("Model folder or file");
    assert!(h.state().download.is_none(), "no network access before a click");
    h.get_by_label("Use the built-in demo model").click();
    h.step();
    assert!(!h.state().show_welcome);
    wait_until(&mut h, "the demo models", models_ready);
    h.step();
    assert!(h.query_by_label_contains("loading").is_none(), "nothing says a loaded model is loading");
    assert_eq!(h.state().settings.turbo_model.as_deref(), Some("demo-turbo"));
    assert_eq!(h.state().settings.base_model.as_deref(), Some("demo-base"));
    assert_eq!((h.state().settings.turbo_steps, h.state().settings.base_steps), (4, 30), "the demo models' own step counts");
    drop(h);
    let (saved, _) = Settings::load(&Paths::at(dir.path()));
    assert!(saved.welcome_done && saved.turbo_model.as_deref() == Some("demo-turbo"), "{saved:?}");
    let mut h = harness_with(dir.path(), None, None);
    h.step();
    assert!(!h.state().show_welcome, "shown once");
}

/// Models named on the command line need no welcome; a later plain first
/// start still shows it.
#[test]
fn models_on_the_command_line_skip_the_welcome() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = harness_with(dir.path(), Some("demo-turbo".into()), None);
    h.step();
    assert!(!h.state().show_welcome);
    assert!(h.query_by_label("Welcome to Z-Image Studio").is_none());
    drop(h);
    let mut h = harness_with(dir.path(), None, None);
    h.step();
    assert!(h.state().show_welcome, "no choice was saved: the plain start welcomes");
}

/// "Download Z-Image-Turbo" fetches the model from the hub (a local one
/// here, serving the tiny fixture in the hub's layout) with progress into
/// the HF cache, then uses it.
#[test]
fn welcome_download_fetches_turbo_and_uses_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = hub::Hub::start(hub::Faults::default());
    let mut h = harness_with(dir.path(), None, None);
    h.state_mut().pull_options = Some(server.options(&dir.path().join("hf-cache")));
    h.step();
    h.get_by_label_contains("Download Z-Image-Turbo").click();
    h.step();
    assert!(h.state().download.is_some() || h.state().download_note.is_some());
    wait_until(&mut h, "the download", |a| a.download.is_none() && a.settings.turbo_model.is_some());
    let model = h.state().settings.turbo_model.clone().unwrap();
    assert!(model.contains("models--Tongyi-MAI--Z-Image-Turbo") && model.contains(hub::COMMIT), "{model}");
    assert!(h.state().download_note.as_deref().is_some_and(|n| n.contains("downloaded")));
    wait_until(&mut h, "the downloaded Turbo", |a| {
        matches!(a.models.get(&ModelSlot::Turbo), Some(ModelState::Ready { .. }))
    });
}

/// Settings: the configured models are found with their size, and LoRAs
/// can be added, are applied (and recorded in the image), and switched off.
#[test]
fn settings_find_models_and_manage_loras() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |s| s.turbo_model = Some(fixture("tiny-turbo")));
    // Tall enough for the whole settings window (it scrolls on small screens).
    let mut h = harness_sized(dir.path(), None, Some(fixture("tiny-base")), egui::vec2(1280.0, 1600.0));
    wait_until(&mut h, "models to load", models_ready);
    h.key_press_modifiers(Modifiers::COMMAND, Key::Comma);
    h.step();
    h.get_by_label("Find models on this computer").click();
    wait_until(&mut h, "the model scan", |a| a.found_models.is_some());
    let found = h.state().found_models.clone().unwrap();
    let tiny = found.iter().find(|m| m.path.ends_with("tiny-turbo")).unwrap_or_else(|| panic!("{found:?}"));
    assert!(tiny.complete() && tiny.kind == "turbo" && tiny.bytes > 0, "{tiny:?}");
    h.get_by_label_contains("Search again");

    let lora = PathBuf::from(fixture("lora")).join("tiny_turbo_lora.safetensors");
    h.get_by_role_and_label(Role::TextInput, "Add Turbo LoRA").focus();
    h.step();
    type_text(&mut h, &lora.display().to_string());
    assert_eq!(h.state().lora_form.get(&ModelSlot::Turbo).map(String::as_str), Some(lora.to_str().unwrap()));
    h.get_all_by_role_and_label(Role::Button, "Add").next().expect("Add button").click_accesskit();
    h.step();
    wait_until(&mut h, "the LoRA", |a| a.lora_state.get(&ModelSlot::Turbo).is_some_and(|s| s.applied.len() == 1));
    assert_eq!(h.state().settings.turbo_loras.len(), 1);
    h.get_by_label("tiny_turbo_lora");
    // A misspelt path (Enter adds too) or the same file again is refused in
    // one line, and the typed text stays to be corrected.
    h.get_by_role_and_label(Role::TextInput, "Add Turbo LoRA").focus();
    h.step();
    let misspelt = format!("{}x", lora.display());
    type_text(&mut h, &misspelt);
    h.key_press(Key::Enter);
    h.step();
    h.step();
    h.get_by_label(&format!("{misspelt}: no such file"));
    assert_eq!(h.state().lora_form.get(&ModelSlot::Turbo), Some(&misspelt));
    h.state_mut().lora_form.insert(ModelSlot::Turbo, lora.display().to_string());
    h.get_all_by_role_and_label(Role::Button, "Add").next().expect("Add button").click_accesskit();
    h.step();
    h.step();
    h.get_by_label(&format!("{} is already in the list", lora.display()));
    assert_eq!(h.state().settings.turbo_loras.len(), 1);
    // An image made now records the LoRA (A1111 tag + hash).
    h.state_mut().show_settings = false;
    h.state_mut().prompt = "a red fox".into();
    let ctx = h.ctx.clone();
    h.state_mut().apply(&ctx, zimage_studio::app::Action::Generate);
    wait_until(&mut h, "the live image", live_done);
    let entry = h.state().history.get(h.state().current.as_ref().unwrap()).unwrap().meta.clone();
    assert_eq!(entry.loras.len(), 1);
    assert_eq!(entry.loras[0].name, "tiny_turbo_lora");
    assert!(metadata::a1111_parameters(&entry).contains("<lora:tiny_turbo_lora:1>"));
    // Switched off: removed from the model without a reload.
    h.state_mut().show_settings = true;
    h.step();
    h.get_by_role_and_label(Role::CheckBox, "tiny_turbo_lora").click_accesskit();
    h.step();
    wait_until(&mut h, "the LoRA off", |a| a.lora_state.get(&ModelSlot::Turbo).is_some_and(|s| s.applied.is_empty()));
    assert!(!h.state().settings.turbo_loras[0].enabled, "kept in the list, unticked");
}

/// Chinese prompts are drawn with a system CJK font, and arrows and other
/// symbols with a wide-coverage one (egui's own fonts have neither);
/// `scripts/setup.sh` installs both, so on a set-up machine this checks real
/// glyphs.
#[test]
fn chinese_prompts_and_symbols_have_glyphs_when_fallback_fonts_are_installed() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |_| {});
    let mut h = harness(dir.path());
    let id = egui::FontId::proportional(14.0);
    let expected: Vec<_> = [
        (Fallback::Symbols, zimage_studio::fonts::find_symbol_font(), "→ ← ↑ ↓ ≈ ∞ αβγ שלום"),
        (Fallback::Cjk, zimage_studio::fonts::find_cjk_font(), "一只猫在屋顶上"),
    ]
    .into_iter()
    .filter_map(|(kind, path, text)| match path {
        Some(path) => Some((kind, path, text)),
        None => {
            eprintln!("no {kind:?} font on this machine (scripts/setup.sh installs one); not checked");
            None
        }
    })
    .collect();
    if expected.is_empty() {
        return;
    }
    wait_until(&mut h, "the fallback fonts", |a| a.fallback_fonts.len() == expected.len());
    h.step();
    for (kind, path, text) in &expected {
        assert!(h.state().fallback_fonts.contains(&(*kind, path.clone())), "{kind:?}: {}", path.display());
        assert!(h.ctx.fonts_mut(|f| f.has_glyphs(&id, text)), "{kind:?} glyphs for {text:?} after installing {}", path.display());
    }
    assert!(h.ctx.fonts_mut(|f| f.has_glyphs(&id, "a cat")), "Latin text keeps its fonts");
}

#[test]
fn settings_show_the_memory_plan_in_force_and_change_it() {
    let (dir, mut h) = test_window(egui::vec2(1280.0, 1600.0));
    wait_until(&mut h, "models to load", models_ready);
    wait_until(&mut h, "a memory report", |a| a.memory.is_some());
    h.key_press_modifiers(Modifiers::COMMAND, Key::Comma);
    h.step();
    // Auto by default, resolved from this machine's memory, with the reason.
    assert_eq!(h.state().settings.memory_plan, MemoryPlan::Auto);
    h.get_by_label_contains("In force: Auto (");
    h.get_by_label_contains("host memory available): keep everything");
    h.get_by_label(MemoryPlan::Auto.explanation());
    // Choosing the lowest plan applies it without reloading and persists it.
    h.get_by_role_and_label(Role::ComboBox, "Memory plan").click();
    h.step();
    h.step();
    h.get_by_label("Lowest memory").click();
    h.step();
    wait_until(&mut h, "the lowest plan", |a| a.memory.as_ref().is_some_and(|m| m.plan == MemoryPlan::Lowest));
    assert_eq!(h.state().settings.memory_plan, MemoryPlan::Lowest);
    assert_eq!(Settings::load(&Paths::at(dir.path())).0.memory_plan, MemoryPlan::Lowest);
    h.get_by_label_contains("In force: Lowest memory (chosen in Settings)");
    h.get_by_label_contains("Released (loaded to encode a new prompt): text encoder");
    h.get_by_label_contains("Parked (reloaded when a job needs it): Base DiT");
}



/// A crash of the window in the last run is said at the next start, once.
#[test]
fn the_start_after_a_crash_says_so_once() {
    let dir = tempfile::tempdir().unwrap();
    write_test_settings(dir.path(), |_| {});
    std::fs::write(zimage_studio::crash::report_path(dir.path()), "Z-Image Studio 0.1.0 stopped: a test\nat x.rs:1\n").unwrap();
    let h = harness(dir.path());
    let said = h.state().message.clone().expect("said");
    assert!(said.error && said.text.starts_with("Z-Image Studio 0.1.0 stopped: a test; the images made before it are in the history"), "{said:?}");
    drop(h);
    let h = harness(dir.path());
    assert!(h.state().message.is_none(), "once");
}

/// A data folder that cannot be created is said at start, before anything is
/// lost quietly: the app runs, but keeps nothing.
#[test]
fn a_data_folder_that_cannot_be_made_is_said_at_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("file"), "not a folder").unwrap();
    let data = dir.path().join("file").join("data");
    let mut h = harness(&data);
    // The settings written on the way (they cannot be) do not hide it.
    h.state_mut().persist_settings();
    for _ in 0..5 {
        h.step();
    }
    let said = h.state().message.clone().expect("said");
    assert!(said.error, "{said:?}");
    assert!(said.text.starts_with(&format!("the data folder {} cannot be created (", data.display())), "{said:?}");
    assert!(said.text.ends_with("will not be kept; start with --data-dir set to a folder you can write"), "{said:?}");
    assert!(!said.text.contains("os error"), "in words: {said:?}");
}
