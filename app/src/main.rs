//! `zimage-studio`: the desktop app. Everything but start-up is in the library.

use std::process::ExitCode;

use zimage_studio::settings::Paths;
use zimage_studio::{cli, StudioApp, StudioOptions};

fn main() -> ExitCode {
    // Before any thread starts (the window's renderer reads it when it loads).
    if let Some(threads) = software_renderer_threads(std::env::var_os("LP_NUM_THREADS")) {
        std::env::set_var("LP_NUM_THREADS", threads);
    }
    zimage_engine::device::tune_allocator();
    zimage_engine::device::keep_compiled_kernels();
    let args = match cli::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("zimage-studio: {e}");
            return ExitCode::from(2);
        }
    };
    if args.help {
        println!("{}", cli::USAGE);
        return ExitCode::SUCCESS;
    }
    let paths = match args.data_dir {
        Some(d) => Paths::at(d),
        None => match Paths::standard() {
            Ok(p) => p,
            Err(e) => {
                eprintln!("zimage-studio: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    // One app per data folder (two would overwrite each other's history).
    let _lock = match zimage_studio::instance::lock_data_dir(&paths.data_dir) {
        Ok(lock) => lock,
        Err(running) => {
            // "Open with" while the app runs: the running window opens the files.
            if !args.open.is_empty() && zimage_studio::instance::hand_over(&paths.data_dir, &args.open).is_ok() {
                let names: Vec<String> = args.open.iter().map(|p| p.display().to_string()).collect();
                println!("zimage-studio: opened {} in the Z-Image Studio already running", names.join(", "));
                return ExitCode::SUCCESS;
            }
            eprintln!("zimage-studio: {running}");
            show_notice(running.to_string());
            return ExitCode::FAILURE;
        }
    };
    // A crash of the window leaves a report, said at the next start.
    zimage_studio::crash::install(&paths.data_dir);
    // The window's size and place are kept with the rest of the app's data,
    // so a `--data-dir` run (tests, a second profile) has its own.
    let window_state = paths.data_dir.join("app.ron");
    let options = StudioOptions { paths, turbo: args.turbo, base: args.base, device: args.device, open: args.open };
    let native = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default().with_title("Z-Image Studio").with_app_id("zimage-studio").with_inner_size([1280.0, 800.0]).with_min_inner_size([800.0, 500.0]).with_drag_and_drop(true)
            .with_icon(window_icon()),
        renderer: eframe::Renderer::Wgpu,
        persistence_path: Some(window_state),
        ..Default::default()
    };
    let result = eframe::run_native("Z-Image Studio", native, Box::new(move |cc| Ok(Box::new(StudioApp::new(&cc.egui_ctx, options)))));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zimage-studio: cannot open the window: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A small window saying `message`, for a start that cannot go on (started
/// from a launcher, the terminal's line is seen by nobody). Without a display
/// the line on stderr is all there is.
fn show_notice(message: String) {
    struct Notice(String);
    impl eframe::App for Notice {
        fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
            egui::CentralPanel::default().show(ui, |ui| {
                ui.add_space(8.0);
                ui.label(&self.0);
                ui.add_space(8.0);
                if ui.button("Close").clicked() {
                    ui.ctx().send_viewport_cmd(egui::ViewportCommand::Close);
                }
            });
        }
    }
    let native = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default().with_title("Z-Image Studio").with_app_id("zimage-studio").with_inner_size([520.0, 150.0]).with_icon(window_icon()),
        renderer: eframe::Renderer::Wgpu,
        ..Default::default()
    };
    let _ = eframe::run_native("Z-Image Studio notice", native, Box::new(move |_| Ok(Box::new(Notice(message)))));
}

/// Threads for Mesa's software rasterisers (llvmpipe, lavapipe), unless the
/// user chose: one. They draw the window on machines without a GPU, in VMs
/// and under Xvfb, and start one thread per core by default, which then
/// compete with the engine for the same cores: under Xvfb on 2 cores a 4-step
/// 128² demo image took 0.4–1.4 s instead of ≈ 0.09 s, so most live previews
/// were overtaken by the next key (docs/app-latency.md). The price is a lower
/// frame rate where the engine is not involved. Hardware drivers ignore it.
fn software_renderer_threads(user: Option<std::ffi::OsString>) -> Option<&'static str> {
    match user {
        Some(_) => None,
        None => Some("1"),
    }
}

/// The app's own icon (packaging/icons), for the window and taskbar.
fn window_icon() -> egui::IconData {
    eframe::icon_data::from_png_bytes(include_bytes!("../../packaging/icons/256x256.png")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn software_rendering_gets_one_thread_unless_the_user_chose() {
        assert_eq!(super::software_renderer_threads(None), Some("1"));
        assert_eq!(super::software_renderer_threads(Some("4".into())), None);
    }
}
