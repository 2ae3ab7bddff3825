//! Z-Image Studio: live Turbo previews as you type, refine with Base,
//! compare, save. The engine runs on its own thread (`engine_bridge`); the
//! UI (`ui/`) only draws state (`app`, `state`) and sends commands.

pub mod app;
pub mod cli;
pub mod crash;
pub mod engine_bridge;
pub mod fonts;
pub mod history;
pub mod images;
pub mod instance;
pub mod prompts;
pub mod save;
pub mod settings;
pub mod state;
pub mod ui;

pub use app::{StudioApp, StudioOptions};
