//! `zimage-studio`: the desktop app. Everything but start-up is in the library.

use std::process::ExitCode;

use zimage_studio::settings::Paths;
use zimage_studio::{cli, StudioApp, StudioOptions};

fn main() -> ExitCode {
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
    let options = StudioOptions { paths, turbo: args.turbo, base: args.base, device: args.device, open: args.open };
    let native = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default().with_title("Z-Image Studio").with_app_id("zimage-studio").with_inner_size([1280.0, 800.0]).with_min_inner_size([800.0, 500.0]).with_drag_and_drop(true)
            .with_icon(window_icon()),
        renderer: eframe::Renderer::Wgpu,
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

/// The app's own icon (packaging/icons), for the window and taskbar.
fn window_icon() -> egui::IconData {
    eframe::icon_data::from_png_bytes(include_bytes!("../../packaging/icons/256x256.png")).unwrap_or_default()
}
