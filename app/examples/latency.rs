//! Latency and frame-time benchmark of the real UI on the real engine,
//! headless (egui_kittest), written up in docs/app-latency.md.
//!
//!   cargo run --release -p zimage-studio --example latency -- [MODEL_DIR_TURBO MODEL_DIR_BASE] [SIZE...]
//!
//! Defaults: the tiny fixture models at 64, 256 and 512 px. For each size:
//! keystroke → first step preview on screen and → final image on screen
//! (median of 7 keystrokes, measured by the app itself from the frame that
//! received the key to the frame that shows the result), and the UI thread's
//! frame time (logic + layout + drawing, what `App::logic` + `App::ui` cost)
//! while the engine renders 4 variations; plus the whole harness frame with
//! wgpu rendering on this machine's GPU/CPU rasteriser, for reference.
//! `ZIMAGE_BENCH_HISTORY=N` starts each size with a history of N earlier
//! images (months of use), to show what a long history costs each frame.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use egui_kittest::Harness;
use zimage_studio::engine_bridge::{ModelSlot, ModelState};
use zimage_studio::settings::{Paths, Settings};
use zimage_studio::state::{quiet_period, LiveStatus};
use zimage_studio::{StudioApp, StudioOptions};

fn wait(h: &mut Harness<'static, StudioApp>, pred: impl Fn(&StudioApp) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !pred(h.state()) {
        assert!(Instant::now() < deadline, "timed out; status {:?} {:?}", h.state().live_status, h.state().message);
        h.step();
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Writes a history of `n` variations (one shared small image) into `paths`.
fn prefill_history(paths: &Paths, n: usize) {
    use zimage_engine::metadata::{self, GenerationMetadata};
    use zimage_studio::engine_bridge::JobKind;
    use zimage_studio::history::HistoryEntry;
    std::fs::create_dir_all(paths.images_dir()).expect("images dir");
    let meta = GenerationMetadata { prompt: "a lighthouse on a cliff at dusk, oil painting".into(), ..Default::default() };
    metadata::save_png(&paths.images_dir().join("old.png"), &[90; 64 * 64 * 3], 64, 64, &meta).expect("image");
    let entries: Vec<HistoryEntry> = (0..n)
        .map(|i| HistoryEntry {
            id: format!("{:06}", i + 1),
            slot: ModelSlot::Turbo,
            job: JobKind::Variation,
            meta: GenerationMetadata { seed: i as u64, prompt: format!("{} {i}", meta.prompt), ..meta.clone() },
            parent: None,
            mark: Default::default(),
            elapsed_ms: 30,
            file: "old.png".into(),
            saved: None,
        })
        .collect();
    let json = serde_json::json!({ "version": 1, "next_id": n + 1, "entries": entries });
    std::fs::write(paths.history_file(), json.to_string()).expect("history");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let (turbo, base, rest) = match args.first() {
        Some(a) if a.parse::<u32>().is_err() => (a.clone(), args.get(1).cloned().unwrap_or_else(|| a.clone()), &args[2.min(args.len())..]),
        _ => (fixtures.join("tiny-turbo").display().to_string(), fixtures.join("tiny-base").display().to_string(), &args[..]),
    };
    let sizes: Vec<u32> = if rest.is_empty() { vec![64, 256, 512] } else { rest.iter().filter_map(|s| s.parse().ok()).collect() };
    let history: usize = std::env::var("ZIMAGE_BENCH_HISTORY").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    println!("model: {turbo}; history at start: {history} images");
    println!("| size | steps | adaptive quiet period (median, included) | keystroke → first preview (median) | keystroke → final image (median) | UI frame wall p50 / p95 / max while busy | UI thread CPU per frame p95 / max | harness frame incl. wgpu render p50 / p95 |");
    println!("|---|---|---|---|---|---|---|---|");
    for size in sizes {
        let dir = tempfile::tempdir().expect("temp dir");
        let settings = Settings { width: size, height: size, size_chosen: true, variations: 4, ..Settings::default() };
        settings.save(&Paths::at(dir.path())).expect("settings");
        if history > 0 {
            prefill_history(&Paths::at(dir.path()), history);
        }
        let options = StudioOptions { paths: Paths::at(dir.path()), turbo: Some(turbo.clone()), base: Some(base.clone()), device: Some("cpu".into()), open: Vec::new() };
        let mut h = Harness::builder().with_size(egui::vec2(1280.0, 800.0)).wgpu().build_eframe(move |cc| StudioApp::new(&cc.egui_ctx, options));
        wait(&mut h, |a| matches!(a.models.get(&ModelSlot::Turbo), Some(ModelState::Ready { .. })));

        // Warm-up (first allocation of buffers, text encoder caches).
        h.event(egui::Event::Text("warm".into()));
        h.step();
        wait(&mut h, |a| matches!(a.live_status, LiveStatus::Done { .. }));

        let (mut first, mut fin, mut quiet) = (Vec::new(), Vec::new(), Vec::new());
        for word in [" a", " red", " fox", " in", " deep", " fresh", " snow"] {
            // Let the previous job finish so each keystroke is measured alone.
            quiet.push(ms(quiet_period(h.state().expected_live_time())));
            h.event(egui::Event::Text(word.into()));
            h.step();
            wait(&mut h, |a| matches!(a.live_status, LiveStatus::Done { .. }) && a.live_job.is_none());
            first.push(ms(h.state().metrics.first_preview.expect("first preview")));
            fin.push(ms(h.state().metrics.final_image.expect("final image")));
        }

        // Frame time while the engine is busy: 4 variations + live typing.
        h.state_mut().metrics.frame_times.clear();
        h.state_mut().metrics.frame_cpu_times.clear();
        h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::G);
        h.step();
        h.set_render_every_step(true);
        let mut harness_frames = Vec::new();
        let start = Instant::now();
        while h.state().variations.iter().any(|c| c.id.is_none()) && start.elapsed() < Duration::from_secs(120) {
            let t = Instant::now();
            h.step();
            harness_frames.push(ms(t.elapsed()));
            std::thread::sleep(Duration::from_millis(4));
        }
        h.set_render_every_step(false);
        let mut ui: Vec<f64> = h.state().metrics.frame_times.iter().map(|d| ms(*d)).collect();
        let mut cpu: Vec<f64> = h.state().metrics.frame_cpu_times.iter().map(|d| ms(*d)).collect();
        cpu.push(0.0); // never empty (non-Linux)
        let steps = h.state().settings.turbo_steps;
        println!(
            "| {size}×{size} | {steps} | {:.0} ms | {:.0} ms | {:.0} ms | {:.2} / {:.2} / {:.2} ms ({} frames) | {:.2} / {:.2} ms | {:.1} / {:.1} ms |",
            pct(&mut quiet, 0.5),
            pct(&mut first, 0.5),
            pct(&mut fin, 0.5),
            pct(&mut ui, 0.5),
            pct(&mut ui, 0.95),
            pct(&mut ui, 1.0),
            ui.len(),
            pct(&mut cpu, 0.95),
            pct(&mut cpu, 1.0),
            pct(&mut harness_frames, 0.5),
            pct(&mut harness_frames, 0.95),
        );
    }
}
