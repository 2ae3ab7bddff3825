//! How long a live image waits while a Base refine runs, in each memory
//! plan: paused for it (both models resident), paused by swapping the models
//! (one DiT at a time), or not (the lowest plan, and every plan before the
//! pause existed); written up in docs/app-latency.md.
//!
//!   cargo run --release -p zimage-studio --example refine_pause -- [TURBO BASE] [SIZE] [BASE_STEPS]
//!
//! Defaults: the built-in demo pair at 512² with 100 Base steps (a refine of
//! tens of seconds on a 2-core CPU, as a 50-step 1024² one is on a GPU). The
//! real UI (egui_kittest, headless) on the real engine: a same-seed refine is
//! started, a key is typed two steps into it, and the app's own metric gives
//! the time from that key to the live image on screen.

use std::time::{Duration, Instant};

use egui_kittest::Harness;
use zimage_engine::memory::MemoryPlan;
use zimage_studio::engine_bridge::{JobKind, ModelSlot, ModelState};
use zimage_studio::settings::{Paths, Settings};
use zimage_studio::state::{LiveDraft, LiveStatus, RefineMode};
use zimage_studio::{StudioApp, StudioOptions};

fn wait(h: &mut Harness<'static, StudioApp>, what: &str, pred: impl Fn(&StudioApp) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(900);
    while !pred(h.state()) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}; message {:?}", h.state().message);
        h.step();
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn refine_progress(a: &StudioApp) -> Option<(usize, usize)> {
    a.jobs.values().find(|j| j.kind == JobKind::Refine).map(|j| j.progress)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (turbo, base, rest) = match args.first() {
        Some(a) if a.parse::<u32>().is_err() => {
            (a.clone(), args.get(1).cloned().unwrap_or_else(|| a.clone()), &args[2.min(args.len())..])
        }
        _ => ("demo-turbo".to_string(), "demo-base".to_string(), &args[..]),
    };
    let size: u32 = rest.first().and_then(|s| s.parse().ok()).unwrap_or(512);
    let base_steps: usize = rest.get(1).and_then(|s| s.parse().ok()).unwrap_or(100);
    println!("models: {turbo}, {base}; {size}×{size}, same-seed Base refine of {base_steps} steps");
    println!("| memory plan | refine steps done at the key | key → live image on screen | refine, start to image (wall) |");
    println!("|---|---|---|---|");
    for plan in [MemoryPlan::KeepAll, MemoryPlan::OneDitAtATime, MemoryPlan::Lowest] {
        let dir = tempfile::tempdir().expect("temp dir");
        let settings = Settings {
            width: size,
            height: size,
            size_chosen: true,
            steps_chosen: true,
            base_steps,
            refine_mode: RefineMode::SameSeed,
            memory_plan: plan,
            live_draft: LiveDraft::Off,
            welcome_done: true,
            ..Settings::default()
        };
        settings.save(&Paths::at(dir.path())).expect("settings");
        let options = StudioOptions {
            paths: Paths::at(dir.path()),
            turbo: Some(turbo.clone()),
            base: Some(base.clone()),
            device: Some("cpu".into()),
            open: Vec::new(),
        };
        let mut h = Harness::builder()
            .with_size(egui::vec2(1280.0, 800.0))
            .build_eframe(move |cc| StudioApp::new(&cc.egui_ctx, options));
        wait(&mut h, "the models", |a| matches!(a.models.get(&ModelSlot::Turbo), Some(ModelState::Ready { .. })));
        h.event(egui::Event::Text("a large red circle in the center on a blue background".into()));
        h.step();
        wait(&mut h, "the first live image", |a| matches!(a.live_status, LiveStatus::Done { .. }) && a.live_job.is_none());

        let refine_start = Instant::now();
        h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::Enter);
        h.step();
        wait(&mut h, "two refine steps", |a| refine_progress(a).is_some_and(|p| p.0 >= 2));
        let at_key = refine_progress(h.state()).expect("the refine runs");
        h.state_mut().focus_prompt = true;
        h.step();
        h.event(egui::Event::Text(" x".into()));
        h.step();
        wait(&mut h, "the live image", |a| {
            matches!(a.live_status, LiveStatus::Done { .. }) && a.live_job.is_none() && a.dirty_at.is_none()
        });
        let key_to_image = h.state().metrics.final_image.expect("the app timed the live image");
        wait(&mut h, "the refine", |a| a.refine_job.is_none() && refine_progress(a).is_none());
        let refine_wall = refine_start.elapsed();
        println!(
            "| {} | {}/{} | {:.2} s | {:.1} s |",
            plan.label(),
            at_key.0,
            at_key.1,
            key_to_image.as_secs_f64(),
            refine_wall.as_secs_f64()
        );
    }
}
