//! Runs the demo recipe or its evaluation (until the CLI wires `zimage
//! train-demo` / `zimage eval-demo`):
//! `cargo run --release --example demo -- train <out> [seed] [scale]`
//! `cargo run --release --example demo -- eval <model-dir> [captions] [samples.png]`

use zimage_engine::demo::{eval_demo, train_demo, EvalDemoOptions, TrainDemoOptions};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("train") => {
            let mut opts = TrainDemoOptions::new(args.get(1).map(String::as_str).unwrap_or("assets/demo"));
            if let Some(s) = args.get(2) {
                opts.seed = s.parse()?;
            }
            if let Some(s) = args.get(3) {
                opts.scale = s.parse()?;
            }
            opts.plot = Some(opts.out.join("loss.png"));
            let report = train_demo(&opts)?;
            println!("{report}");
        }
        Some("eval") => {
            let mut opts = EvalDemoOptions::new(args.get(1).map(String::as_str).unwrap_or("assets/demo"));
            if let Some(n) = args.get(2) {
                opts.captions = n.parse()?;
            }
            opts.samples_png = args.get(3).map(Into::into);
            let report = eval_demo(&opts)?;
            println!("{report}");
        }
        _ => anyhow::bail!("usage: demo train <out> [seed] [scale] | demo eval <model-dir> [captions] [samples.png]"),
    }
    Ok(())
}
