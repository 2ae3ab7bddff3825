//! Command line: `zimage-studio [--turbo PATH|NAME] [--base PATH|NAME] [--data-dir DIR]`.

use std::path::PathBuf;

pub const USAGE: &str = "usage: zimage-studio [--turbo PATH|demo-turbo] [--base PATH|demo-base] [--device auto|cpu|cuda|wgpu] [--data-dir DIR] [IMAGE.png ...]

  IMAGE.png     restore the parameters stored in a PNG (as dropping it on the window does),
                or in a JPEG an image editor exported from one (its XMP); an image without
                them (a sketch, a photo) becomes the start image Turbo draws from
  --turbo M     Turbo model for this run (folder, .safetensors file or built-in name)
  --base M      Base model for this run; neither changes the saved settings
  --device D    where the models run for this run (default: the saved setting, else auto:
                CUDA when this build has it and a GPU answers, else the CPU)
  --data-dir D  where settings and history are kept (default: the platform data folder)
  -h, --help    this text";

#[derive(Debug, Default, PartialEq)]
pub struct Args {
    pub turbo: Option<String>,
    pub base: Option<String>,
    pub data_dir: Option<PathBuf>,
    /// `auto`, `cpu`, `cuda` or `wgpu` (checked).
    pub device: Option<String>,
    /// PNG (or JPEG) files whose parameters to restore.
    pub open: Vec<PathBuf>,
    pub help: bool,
}

pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let mut out = Args::default();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let mut value = |name: &str| inline.clone().or_else(|| it.next()).filter(|v| !v.is_empty()).ok_or_else(|| format!("{name} needs a value\n\n{USAGE}"));
        match flag.as_str() {
            "--turbo" => out.turbo = Some(value("--turbo")?),
            "--base" => out.base = Some(value("--base")?),
            "--data-dir" => out.data_dir = Some(PathBuf::from(value("--data-dir")?)),
            "--device" => {
                let d = value("--device")?;
                parse_device(&d)?;
                out.device = Some(d);
            }
            "-h" | "--help" => out.help = true,
            other if !other.starts_with('-') && is_image_name(other) => out.open.push(PathBuf::from(&a)),
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
        }
    }
    Ok(out)
}

/// Whether a file name looks like an image the app can restore parameters from.
fn is_image_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    [".png", ".jpg", ".jpeg"].iter().any(|ext| lower.ends_with(ext))
}

/// `auto` → None, else the device kind; a one-line error for anything else.
pub fn parse_device(s: &str) -> Result<Option<zimage_engine::device::DeviceKind>, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(None);
    }
    zimage_engine::device::DeviceKind::parse(s).map(Some).map_err(|e| format!("--device: {e} (or auto)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: &[&str]) -> Result<Args, String> {
        parse(v.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parses_models_and_data_dir() {
        let a = p(&["--turbo", "demo-turbo", "--base=/m/base", "--data-dir", "/tmp/d"]).unwrap();
        assert_eq!(a.turbo.as_deref(), Some("demo-turbo"));
        assert_eq!(a.base.as_deref(), Some("/m/base"));
        assert_eq!(a.data_dir, Some(PathBuf::from("/tmp/d")));
        assert_eq!(p(&[]).unwrap(), Args::default());
        assert!(p(&["--help"]).unwrap().help);
        assert_eq!(p(&["--device", "cuda"]).unwrap().device.as_deref(), Some("cuda"));
        assert_eq!(parse_device("auto"), Ok(None));
        assert_eq!(p(&["/x/final.PNG"]).unwrap().open, vec![PathBuf::from("/x/final.PNG")]);
        assert_eq!(p(&["edited.jpg", "b.JPEG"]).unwrap().open, vec![PathBuf::from("edited.jpg"), PathBuf::from("b.JPEG")]);
        assert!(p(&["notes.txt"]).unwrap_err().contains("unknown argument"));
    }

    #[test]
    fn rejects_bad_arguments_with_usage() {
        assert!(p(&["--turbo"]).unwrap_err().contains("needs a value"));
        assert!(p(&["--frobnicate"]).unwrap_err().contains("usage:"));
        assert!(p(&["--device", "tpu"]).unwrap_err().contains("unknown device"));
    }
}
