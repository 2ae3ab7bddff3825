//! UI state and the small pure rules behind it (no drawing, no threads).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use zimage_engine::metadata::GenerationMetadata;
use zimage_engine::pipeline::GenerateRequest;
use zimage_engine::scheduler::Schedule;

/// How the seed changes when the user asks for a new image (Generate,
/// variations). Typing never changes it, so the live image only changes when
/// the words do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SeedMode {
    Fixed,
    Random,
    Increment,
}

impl SeedMode {
    pub const ALL: [SeedMode; 3] = [SeedMode::Fixed, SeedMode::Random, SeedMode::Increment];
    pub fn label(self) -> &'static str {
        match self {
            SeedMode::Fixed => "fixed",
            SeedMode::Random => "random",
            SeedMode::Increment => "+1",
        }
    }
    /// The seed for the next explicit generation.
    pub fn next(self, seed: u64) -> u64 {
        match self {
            SeedMode::Fixed => seed,
            SeedMode::Random => zimage_engine::rng::random_seed(),
            SeedMode::Increment => seed.wrapping_add(1),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AspectPreset {
    Square,
    Landscape4x3,
    Portrait3x4,
    Wide16x9,
    Tall9x16,
    Custom,
}

impl AspectPreset {
    pub const ALL: [AspectPreset; 6] = [
        AspectPreset::Square,
        AspectPreset::Landscape4x3,
        AspectPreset::Portrait3x4,
        AspectPreset::Wide16x9,
        AspectPreset::Tall9x16,
        AspectPreset::Custom,
    ];
    pub fn label(self) -> &'static str {
        match self {
            AspectPreset::Square => "1:1",
            AspectPreset::Landscape4x3 => "4:3",
            AspectPreset::Portrait3x4 => "3:4",
            AspectPreset::Wide16x9 => "16:9",
            AspectPreset::Tall9x16 => "9:16",
            AspectPreset::Custom => "custom",
        }
    }
    fn ratio(self) -> Option<(u32, u32)> {
        match self {
            AspectPreset::Square => Some((1, 1)),
            AspectPreset::Landscape4x3 => Some((4, 3)),
            AspectPreset::Portrait3x4 => Some((3, 4)),
            AspectPreset::Wide16x9 => Some((16, 9)),
            AspectPreset::Tall9x16 => Some((9, 16)),
            AspectPreset::Custom => None,
        }
    }
    /// Width and height with the preset's ratio and `long_side` as the longer
    /// side, both rounded to multiples of 16.
    pub fn size(self, long_side: u32) -> Option<(u32, u32)> {
        let (a, b) = self.ratio()?;
        fit_aspect(a, b, long_side)
    }

    /// The preset that gives exactly `width`×`height` at its longer side,
    /// else `Custom` (a restored 1024×1024 image reads "1:1", not "custom").
    pub fn of(width: u32, height: u32) -> AspectPreset {
        let long = width.max(height);
        Self::ALL.into_iter().find(|p| p.size(long) == Some((width, height))).unwrap_or(AspectPreset::Custom)
    }
}

/// A size with the aspect of a `width`×`height` image and `long_side` as
/// its longer side, both multiples of 16 (a start image's size); `None` for
/// an empty image.
pub fn fit_aspect(width: u32, height: u32, long_side: u32) -> Option<(u32, u32)> {
    if width == 0 || height == 0 {
        return None;
    }
    let long = snap16(long_side);
    let short = snap16((long as f64 * width.min(height) as f64 / width.max(height) as f64).round() as u32);
    Some(if width >= height { (long, short) } else { (short, long) })
}

/// Image sides are multiples of this for every Z-Image model: the VAE's ×8
/// times the DiT's 2×2 patches.
pub const SIDE_MULTIPLE: u32 = 16;

/// Nearest valid multiple of 16.
pub fn snap16(v: u32) -> u32 {
    zimage_engine::pipeline::nearest_multiple(v, SIDE_MULTIPLE)
}

/// One line saying what is wrong with a size, or None if it can be
/// generated: the engine's own check, so the two never disagree.
pub fn size_problem(width: u32, height: u32) -> Option<String> {
    zimage_engine::pipeline::validate_sides(width, height, SIDE_MULTIPLE).err().map(|e| e.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefineMode {
    /// img2img from the Turbo image at a strength on the step grid.
    Img2Img,
    /// Base from pure noise with the Turbo image's seed.
    SameSeed,
}

/// Strength snapped to the step grid: the engine runs `N - int(N - N·s)`
/// steps, so only multiples of 1/N are distinct. Returns (strength, steps run).
pub fn snap_strength(strength: f32, steps: usize) -> (f32, usize) {
    let n = steps.max(1);
    let k = ((strength.clamp(0.0, 1.0) * n as f32).round() as usize).clamp(1, n);
    let mut s = k as f32 / n as f32;
    // The reference computes int(N − N·s) on the strength as written (0.6 is
    // 0.6, but 1/3 is 0.33333334, which runs one step too many): step down
    // an ulp at a time until exactly k steps run.
    for _ in 0..16 {
        if n - Schedule::img2img_start(n, s) <= k {
            break;
        }
        s = f32::from_bits(s.to_bits() - 1);
    }
    (s, n - Schedule::img2img_start(n, s))
}

/// What a refine needs before its first step besides the steps themselves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BaseLoad {
    /// Base's DiT is in memory.
    Resident,
    /// Parked by the memory plan: reloaded first, in about the time its last
    /// reload took (`None` before the first).
    Parked(Option<Duration>),
}

/// Expected cost of a refine, shown before the click: its steps, and the
/// reload of Base when the memory plan parked it (the switch cost users ask
/// to see before they wait for it).
pub fn refine_estimate(steps_run: usize, per_step: Option<Duration>, load: BaseLoad) -> String {
    let steps = match per_step {
        Some(d) => format!("{steps_run} Base steps, about {}", human_duration(d * steps_run as u32)),
        None => format!("{steps_run} Base steps (time unknown until the first Base run)"),
    };
    match load {
        BaseLoad::Resident => steps,
        BaseLoad::Parked(Some(d)) => format!("{steps}, + about {} to load Base", human_duration(d)),
        BaseLoad::Parked(None) => format!("{steps}, + loading Base (parked)"),
    }
}

pub fn gigabytes(bytes: u64) -> String {
    format!("{:.1} GB", bytes as f64 / 1e9)
}

/// GB from 1 GB up, MB below (the demo model is a few MB).
pub fn human_bytes(bytes: u64) -> String {
    if bytes >= 1_000_000_000 {
        gigabytes(bytes)
    } else if bytes >= 100_000 {
        format!("{:.1} MB", bytes as f64 / 1e6)
    } else {
        // A few small images: "0.0 MB" read as nothing.
        format!("{:.0} kB", (bytes as f64 / 1e3).ceil())
    }
}

pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else if s < 120.0 {
        format!("{s:.1} s")
    } else {
        format!("{:.0} min {:.0} s", (s / 60.0).floor(), s % 60.0)
    }
}

/// Adaptive quiet period before a live job starts: none while generation is
/// fast (a superseded job costs at most one step), a short one when it is
/// slow so that a half-typed word does not start a long render.
pub fn quiet_period(recent_live: Option<Duration>) -> Duration {
    match recent_live {
        Some(d) if d > Duration::from_millis(500) => (d / 4).clamp(Duration::from_millis(150), Duration::from_millis(600)),
        _ => Duration::ZERO,
    }
}

/// Exponential moving average of durations (None = no sample yet).
pub fn ema(prev: Option<Duration>, sample: Duration) -> Duration {
    match prev {
        None => sample,
        Some(p) => p.mul_f64(0.7) + sample.mul_f64(0.3),
    }
}

/// What the live image shows, for the status line.
#[derive(Debug, Clone, PartialEq)]
pub enum LiveStatus {
    /// Nothing generated yet.
    Idle,
    /// The prompt or settings changed since the image was made.
    Stale,
    Rendering { done: usize, total: usize },
    Done { elapsed: Duration },
    Error(String),
}

impl LiveStatus {
    pub fn text(&self) -> String {
        match self {
            LiveStatus::Idle => "idle".into(),
            LiveStatus::Stale => "stale".into(),
            LiveStatus::Rendering { done, total } => format!("rendering {done}/{total}"),
            LiveStatus::Done { elapsed } => format!("done in {}", human_duration(*elapsed)),
            LiveStatus::Error(e) => format!("error: {e}"),
        }
    }
}

/// Main area views.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Live,
    Variations,
    Compare,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareMode {
    SideBySide,
    Wipe,
    Flicker,
    Difference,
    /// Every refine pair of a page at once, Turbo above Base (N-up), with
    /// one zoom and pan: reviewing a batch of refines together.
    AllPairs,
}

impl CompareMode {
    pub const ALL: [CompareMode; 5] =
        [CompareMode::SideBySide, CompareMode::Wipe, CompareMode::Flicker, CompareMode::Difference, CompareMode::AllPairs];
    pub fn label(self) -> &'static str {
        match self {
            CompareMode::SideBySide => "Side by side",
            CompareMode::Wipe => "Wipe",
            CompareMode::Flicker => "Flicker",
            CompareMode::Difference => "Difference",
            CompareMode::AllPairs => "All pairs",
        }
    }
    pub fn next(self) -> Self {
        let i = Self::ALL.iter().position(|m| *m == self).unwrap_or(0);
        Self::ALL[(i + 1) % Self::ALL.len()]
    }
}

/// Zoom and pan over an image drawn fitted into its pane: the Compare view
/// shares one between its images; the Live view keeps its own while you type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ZoomView {
    /// Magnification over the fitted image (1 = fit; never below).
    pub zoom: f32,
    /// The visible region's centre, from the image's centre, in image fractions.
    pub pan: egui::Vec2,
    /// Screen pixels per image pixel of the fitted image (zoom 1), from the
    /// last frame drawn: what "1:1" and the zoom readout are measured against.
    pub fit_scale: Option<f32>,
    /// Where the (first) image was drawn in the last frame.
    pub drawn: Option<egui::Rect>,
}

impl Default for ZoomView {
    fn default() -> Self {
        Self { zoom: 1.0, pan: egui::Vec2::ZERO, fit_scale: None, drawn: None }
    }
}

impl ZoomView {
    /// The zoom at which one image pixel fills one screen pixel, when that
    /// is a magnification of the fitted image (a large image fitted into a
    /// smaller pane); `None` when the fitted image already shows it larger.
    pub fn actual_size_zoom(&self) -> Option<f32> {
        self.fit_scale.filter(|&s| s > 0.0 && s < 1.0).map(|s| (1.0 / s).min(MAX_ZOOM))
    }

    /// Screen pixels per image pixel now, in percent (100 = actual size).
    pub fn actual_size_percent(&self) -> Option<f32> {
        self.fit_scale.map(|s| s * self.zoom * 100.0)
    }

    /// Back to the whole image.
    pub fn fit(&mut self) {
        self.zoom = 1.0;
        self.pan = egui::Vec2::ZERO;
    }

    /// The visible part of the image in texture coordinates (0..1 each way).
    pub fn uv(&self) -> egui::Rect {
        let half = 0.5 / self.zoom;
        let c = egui::pos2(0.5, 0.5) + self.pan;
        egui::Rect::from_min_max(egui::pos2(c.x - half, c.y - half), egui::pos2(c.x + half, c.y + half))
    }

    /// Zooms by `factor` about a point of the drawn image (`at`: its fraction
    /// of the drawn rect, 0..1 each way), which stays under the pointer, as
    /// image viewers zoom; then keeps the view inside the image.
    pub fn zoom_about(&mut self, factor: f32, at: egui::Vec2) {
        let before = self.uv();
        let point = before.min + at * before.size();
        self.zoom = (self.zoom * factor).clamp(1.0, MAX_ZOOM);
        let half = 0.5 / self.zoom;
        let centre = point + egui::vec2(half, half) - at * (2.0 * half);
        self.pan = centre - egui::pos2(0.5, 0.5);
        self.keep_inside();
    }

    /// Pans by a drag of `delta` screen points over a drawn image `drawn`
    /// points large: the image follows the pointer.
    pub fn drag(&mut self, delta: egui::Vec2, drawn: egui::Vec2) {
        if drawn.x > 0.0 && drawn.y > 0.0 {
            self.pan -= egui::vec2(delta.x / drawn.x, delta.y / drawn.y) / self.zoom;
        }
        self.keep_inside();
    }

    /// No region outside the image is ever shown.
    pub fn keep_inside(&mut self) {
        let room = 0.5 - 0.5 / self.zoom;
        self.pan.x = self.pan.x.clamp(-room, room);
        self.pan.y = self.pan.y.clamp(-room, room);
    }
}

/// The largest zoom over the fitted image.
pub const MAX_ZOOM: f32 = 16.0;

/// Compare view state; zoom and pan are shared by both images.
#[derive(Debug, Clone, PartialEq)]
pub struct CompareState {
    pub mode: CompareMode,
    /// Swapped: Base on the left / first.
    pub swapped: bool,
    /// Wipe split position, 0..1 from the left.
    pub split: f32,
    /// One zoom and pan for every image shown.
    pub view: ZoomView,
    /// Flicker: which image shows; toggled by time or the space key.
    pub flicker_second: bool,
    pub flicker_auto: bool,
    /// "All pairs": each shown pair's cell on screen, from the last frame drawn.
    pub pair_cells: Vec<egui::Rect>,
}

impl Default for CompareState {
    fn default() -> Self {
        Self {
            mode: CompareMode::SideBySide,
            swapped: false,
            split: 0.5,
            view: ZoomView::default(),
            flicker_second: false,
            flicker_auto: true,
            pair_cells: Vec::new(),
        }
    }
}

/// Refine pairs per page of "All pairs": the five kept images of a typical
/// batch, refined, fit on one page.
pub const PAIRS_PER_PAGE: usize = 8;

/// The page of at most `per_page` consecutive pairs (of `n`) that holds pair
/// `at`: pages start at multiples of `per_page`, so stepping through the
/// pairs turns whole pages.
pub fn pair_page(n: usize, at: usize, per_page: usize) -> std::ops::Range<usize> {
    let per_page = per_page.max(1);
    if n == 0 {
        return 0..0;
    }
    let start = at.min(n - 1) / per_page * per_page;
    start..(start + per_page).min(n)
}

/// Columns for `n` pairs, each a cell with one image above the other, in a
/// `width`×`height` area, images of `aspect` (width / height): the count
/// that shows the images largest (the fewest columns on a tie).
pub fn pair_grid_columns(n: usize, width: f32, height: f32, aspect: f32) -> usize {
    let image_width = |cols: usize| {
        let rows = n.div_ceil(cols);
        let (cell_w, image_h) = (width / cols as f32, height / (2 * rows) as f32);
        cell_w.min(image_h * aspect)
    };
    let mut best = 1;
    for cols in 2..=n.max(1) {
        if image_width(cols) > image_width(best) {
            best = cols;
        }
    }
    best
}

/// The shortest image side (points) the variations grid shrinks its cells
/// to before it scrolls instead, by default: a thumbnail that can still be
/// judged. `+` / `-` in the grid change it within [`VARIATION_SIDES`].
pub const MIN_VARIATION_SIDE: f32 = 120.0;

/// The range of the grid's smallest thumbnail side the user can pick.
pub const VARIATION_SIDES: std::ops::RangeInclusive<f32> = 80.0..=640.0;

/// The variations grid for `n` images of `aspect` (width / height) in a
/// `width`×`height` pane: its columns and cell size. When every image can
/// be at least `min_side` on its shorter side, all cells fit, as large as
/// they can be; beyond that (50 variations in a small window) the cells
/// keep that size and the grid scrolls.
pub fn variation_grid(n: usize, width: f32, height: f32, aspect: f32, min_side: f32) -> (usize, egui::Vec2) {
    let n = n.max(1);
    let aspect = aspect.clamp(0.1, 10.0);
    let image_width = |cols: usize| (width / cols as f32).min(height / n.div_ceil(cols) as f32 * aspect);
    let best = (1..=n).fold(1, |best, cols| if image_width(cols) > image_width(best) { cols } else { best });
    let shorter_side = |image_w: f32| image_w.min(image_w / aspect);
    if shorter_side(image_width(best)) >= min_side {
        return (best, egui::vec2(width / best as f32, height / n.div_ceil(best) as f32));
    }
    let min_image_width = min_side * aspect.max(1.0);
    let cols = ((width / (min_image_width + 8.0)).floor() as usize).clamp(1, n);
    let cell_width = width / cols as f32;
    (cols, egui::vec2(cell_width, cell_width / aspect))
}

/// Sampler steps a job still has to run after `done`: an img2img job runs
/// only the steps after its strength's start.
pub fn steps_left(request: &GenerateRequest, done: usize) -> usize {
    let start = request.init.as_ref().map_or(0, |_| Schedule::img2img_start(request.steps, request.strength));
    (request.steps - start.min(request.steps)).saturating_sub(done)
}

/// Which history entries the history panel lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HistoryFilter {
    #[default]
    All,
    /// The Base images: the refined finals.
    Base,
    /// Kept or starred (the picked set of a triage).
    Kept,
}

impl HistoryFilter {
    pub const ALL: [HistoryFilter; 3] = [HistoryFilter::All, HistoryFilter::Base, HistoryFilter::Kept];
    pub fn label(self) -> &'static str {
        match self {
            HistoryFilter::All => "All",
            HistoryFilter::Base => "Base",
            HistoryFilter::Kept => "Kept",
        }
    }
    pub fn shows(self, base: bool, mark: Mark) -> bool {
        match self {
            HistoryFilter::All => true,
            HistoryFilter::Base => base,
            HistoryFilter::Kept => mark.is_kept(),
        }
    }
}

/// Triage mark of a variation / history item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Mark {
    #[default]
    None,
    Kept,
    Starred,
    Rejected,
}

impl Mark {
    pub fn is_kept(self) -> bool {
        matches!(self, Mark::Kept | Mark::Starred)
    }
}

/// Difference heat-map: per-pixel mean absolute RGB difference, amplified
/// ×4 and coloured black → red → yellow → white.
pub fn difference_heatmap(a: &[u8], b: &[u8]) -> Vec<u8> {
    a.chunks_exact(3)
        .zip(b.chunks_exact(3))
        .flat_map(|(p, q)| {
            let d: u32 = p.iter().zip(q).map(|(x, y)| x.abs_diff(*y) as u32).sum::<u32>() / 3;
            let v = (d * 4).min(765);
            let r = v.min(255) as u8;
            let g = v.saturating_sub(255).min(255) as u8;
            let bl = v.saturating_sub(510).min(255) as u8;
            [r, g, bl]
        })
        .collect()
}

/// What differs between the parameters of two images (left → right), one
/// short phrase each, for the line under the compare view: when two images
/// differ, which knob did it.
pub fn parameter_differences(a: &GenerationMetadata, b: &GenerationMetadata) -> Vec<String> {
    fn num(x: f32) -> String {
        let s = format!("{x:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
    let mut out = Vec::new();
    let mut changed = |name: &str, x: String, y: String| {
        if x != y {
            out.push(format!("{name} {x} -> {y}"));
        }
    };
    changed("model", a.model.clone(), b.model.clone());
    changed("seed", a.seed.to_string(), b.seed.to_string());
    changed("steps", a.steps.to_string(), b.steps.to_string());
    changed("guidance", num(a.guidance), num(b.guidance));
    changed("size", format!("{}×{}", a.width, a.height), format!("{}×{}", b.width, b.height));
    let strength = |m: &GenerationMetadata| m.strength.map_or("none".to_string(), num);
    changed("img2img strength", strength(a), strength(b));
    changed("variety", num(a.variety), num(b.variety));
    changed("shift", num(a.scheduler_shift), num(b.scheduler_shift));
    let loras = |m: &GenerationMetadata| {
        if m.loras.is_empty() {
            "none".to_string()
        } else {
            m.loras.iter().map(|l| format!("{}:{}", l.name, num(l.strength))).collect::<Vec<_>>().join(", ")
        }
    };
    changed("LoRAs", loras(a), loras(b));
    if a.prompt != b.prompt {
        out.push("prompt".into());
    }
    // The negative prompt only acts with guidance.
    if a.negative_prompt != b.negative_prompt && (a.guidance > 0.0 || b.guidance > 0.0) {
        out.push("negative prompt".into());
    }
    out
}

/// Live drafts: while the user types, render at half the side (less when
/// even that is slow) when a full-size live image is slow, and finish at full
/// size once typing stops (img2img from the draft, so the composition the
/// user stopped on stays).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LiveDraft {
    /// Draft when a full-size live image would take longer than [`DRAFT_WHEN_SLOWER_THAN`].
    Auto,
    Always,
    Off,
}

impl LiveDraft {
    pub const ALL: [LiveDraft; 3] = [LiveDraft::Auto, LiveDraft::Always, LiveDraft::Off];
    pub fn label(self) -> &'static str {
        match self {
            LiveDraft::Auto => "auto",
            LiveDraft::Always => "always",
            LiveDraft::Off => "off",
        }
    }
}

/// Auto drafts once a full-size live image takes longer than this: below it,
/// typing already feels live (docs/app-latency.md).
pub const DRAFT_WHEN_SLOWER_THAN: Duration = Duration::from_secs(1);

/// Strength of the full-size pass over an upscaled draft: enough steps to
/// draw the detail the draft's resolution lacks, few enough to keep its
/// composition (the "hires fix" of A1111 and ComfyUI, which uses 0.5–0.7).
pub const UPGRADE_STRENGTH: f32 = 0.6;

/// Seconds per megapixel-step of a live image that took `elapsed` (the
/// DiT's cost grows with both; fixed costs such as the prompt's encoding are
/// spread in, which is close enough for a one-second threshold).
pub fn live_rate(elapsed: Duration, width: u32, height: u32, steps_run: usize) -> f64 {
    elapsed.as_secs_f64() / (width as f64 * height as f64 / 1e6 * steps_run.max(1) as f64)
}

/// Whether a history image is found by the search `words` (lower-cased):
/// each is in its prompt, whatever the case, or is its seed.
pub fn prompt_matches(prompt: &str, seed: u64, words: &[String]) -> bool {
    let prompt = prompt.to_lowercase();
    words.iter().all(|w| prompt.contains(w.as_str()) || w.parse::<u64>().is_ok_and(|s| s == seed))
}

/// DiT evaluations per sampler step: two with classifier-free guidance.
pub fn dit_passes(guidance: f32) -> usize {
    if guidance > 0.0 {
        2
    } else {
        1
    }
}

/// A live image's expected time at `rate` (see [`live_rate`]).
pub fn predicted_time(rate: f64, width: u32, height: u32, steps: usize) -> Duration {
    Duration::from_secs_f64((rate * width as f64 * height as f64 / 1e6 * steps as f64).clamp(0.0, 1e6))
}

/// The smallest draft scale (of each side): a quarter side is 1/16 of the
/// pixels, where the upgrade's img2img still finds the composition.
pub const SMALLEST_DRAFT_SCALE: f64 = 0.25;

/// The size to render while typing, or `None` for the full size, when `mode`
/// asks for a draft. `full_live` is the predicted time of a full-size live
/// image (unknown until the first image). The draft is half of each side, or
/// less (down to a quarter) when half would still take over
/// [`DRAFT_WHEN_SLOWER_THAN`] (the time goes with the pixels: e.g. real
/// models on a CPU or a small GPU at 1024²); sides are multiples of 16 and
/// at least 64, else no draft.
pub fn draft_size(mode: LiveDraft, width: u32, height: u32, full_live: Option<Duration>) -> Option<(u32, u32)> {
    let wanted = match mode {
        LiveDraft::Off => false,
        LiveDraft::Always => true,
        LiveDraft::Auto => full_live.is_some_and(|d| d > DRAFT_WHEN_SLOWER_THAN),
    };
    let (half_w, half_h) = (width / 2 / 16 * 16, height / 2 / 16 * 16);
    if !wanted || half_w < 64 || half_h < 64 {
        return None;
    }
    // The scale whose predicted time is the threshold, within [¼, ½].
    let target = DRAFT_WHEN_SLOWER_THAN.as_secs_f64();
    let scale = full_live.map_or(0.5, |d| (target / d.as_secs_f64().max(1e-9)).sqrt()).clamp(SMALLEST_DRAFT_SCALE, 0.5);
    let side = |full: u32, half: u32| ((full as f64 * scale) as u32 / 16 * 16).clamp(64, half);
    Some((side(width, half_w), side(height, half_h)))
}

/// What to say while the first image on a GPU shows no step yet: burn's
/// GPU backends compile every kernel at its first use (21–36 s on an H200 in
/// docs/performance.md); CUDA keeps them on disk, so a later launch loads
/// them in seconds (3.3 s for a Turbo 1024² image in GPU run 9).
pub fn first_gpu_image_hint(gpu_kernels_cold: bool, live: &LiveStatus) -> Option<&'static str> {
    match live {
        LiveStatus::Rendering { done: 0, .. } if gpu_kernels_cold => Some(
            "the first image on the GPU compiles its kernels: about half a minute the first time, seconds once kept on disk",
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_in_their_unit() {
        assert_eq!(human_bytes(20_293), "21 kB", "a small image is not 0.0 MB");
        assert_eq!(human_bytes(0), "0 kB");
        assert_eq!(human_bytes(1_500_000), "1.5 MB");
        assert_eq!(human_bytes(2_400_000_000), "2.4 GB");
    }

    #[test]
    fn the_refine_estimate_adds_the_reload_of_a_parked_base() {
        let step = Some(Duration::from_millis(300));
        assert_eq!(refine_estimate(6, step, BaseLoad::Resident), "6 Base steps, about 1.8 s");
        assert_eq!(
            refine_estimate(6, step, BaseLoad::Parked(Some(Duration::from_millis(3100)))),
            "6 Base steps, about 1.8 s, + about 3.1 s to load Base"
        );
        assert_eq!(refine_estimate(6, step, BaseLoad::Parked(None)), "6 Base steps, about 1.8 s, + loading Base (parked)");
        assert_eq!(
            refine_estimate(6, None, BaseLoad::Resident),
            "6 Base steps (time unknown until the first Base run)"
        );
    }

    #[test]
    fn start_images_set_a_size_of_their_aspect() {
        assert_eq!(fit_aspect(1600, 1200, 1024), Some((1024, 768)));
        assert_eq!(fit_aspect(600, 1000, 1024), Some((608, 1024)));
        assert_eq!(fit_aspect(40, 40, 128), Some((128, 128)));
        assert_eq!(fit_aspect(4000, 10, 512), Some((512, 16)), "never below 16");
        assert_eq!(fit_aspect(0, 10, 512), None);
    }

    #[test]
    fn parameter_differences_name_each_knob_that_changed() {
        let turbo = GenerationMetadata {
            prompt: "a lighthouse".into(),
            seed: 42,
            steps: 8,
            guidance: 0.0,
            width: 1024,
            height: 1024,
            model: "Z-Image-Turbo".into(),
            scheduler_shift: 3.0,
            negative_prompt: "blurry".into(),
            ..Default::default()
        };
        assert!(parameter_differences(&turbo, &turbo).is_empty());
        let base = GenerationMetadata {
            steps: 50,
            guidance: 4.0,
            model: "Z-Image".into(),
            scheduler_shift: 6.0,
            strength: Some(0.6),
            ..turbo.clone()
        };
        assert_eq!(
            parameter_differences(&turbo, &base),
            [
                "model Z-Image-Turbo -> Z-Image",
                "steps 8 -> 50",
                "guidance 0 -> 4",
                "img2img strength none -> 0.6",
                "shift 3 -> 6"
            ]
        );
        let other = GenerationMetadata {
            seed: 43,
            variety: 0.25,
            prompt: "a lighthouse at night".into(),
            negative_prompt: String::new(),
            loras: vec![zimage_engine::metadata::LoraRef { name: "ink".into(), strength: 0.8, hash: None }],
            ..turbo.clone()
        };
        assert_eq!(
            parameter_differences(&turbo, &other),
            ["seed 42 -> 43", "variety 0 -> 0.25", "LoRAs none -> ink:0.8", "prompt"],
            "the negative prompt does not count without guidance"
        );
    }

    #[test]
    fn drafts_are_half_size_only_when_asked_for_or_slow() {
        let slow = Some(Duration::from_millis(1500));
        let fast = Some(Duration::from_millis(300));
        assert_eq!(draft_size(LiveDraft::Auto, 1024, 1024, slow), Some((512, 512)));
        assert_eq!(draft_size(LiveDraft::Auto, 1024, 1024, fast), None);
        assert_eq!(draft_size(LiveDraft::Auto, 1024, 1024, None), None, "the first image shows the full-size cost");
        assert_eq!(draft_size(LiveDraft::Off, 1024, 1024, slow), None);
        assert_eq!(draft_size(LiveDraft::Always, 1344, 768, None), Some((672, 384)));
        assert_eq!(draft_size(LiveDraft::Always, 1360, 752, None), Some((672, 368)), "multiples of 16");
        assert_eq!(draft_size(LiveDraft::Always, 128, 128, None), Some((64, 64)));
        assert_eq!(draft_size(LiveDraft::Always, 1024, 112, None), None, "a 56-pixel side is too small to draft");
        // A draft's time predicts the full size's: 4x the pixels.
        let rate = live_rate(Duration::from_millis(400), 512, 512, 8);
        let full = predicted_time(rate, 1024, 1024, 8);
        assert!((full.as_secs_f64() - 1.6).abs() < 1e-9, "{full:?}");
        assert_eq!(draft_size(LiveDraft::Auto, 1024, 1024, Some(full)), Some((512, 512)));
        assert_eq!(draft_size(LiveDraft::Auto, 512, 512, Some(predicted_time(rate, 512, 512, 8))), None);
    }

    #[test]
    fn drafts_are_smaller_when_half_size_would_still_be_slow() {
        let secs = |s: f64| Some(Duration::from_secs_f64(s));
        // Half the side is a quarter of the time: half is enough up to 4 s.
        assert_eq!(draft_size(LiveDraft::Auto, 1024, 1024, secs(4.0)), Some((512, 512)));
        // 9 s: a third of the side (341 -> 336) is about 1 s.
        assert_eq!(draft_size(LiveDraft::Auto, 1024, 1024, secs(9.0)), Some((336, 336)));
        // 16 s and above: a quarter, the smallest.
        assert_eq!(draft_size(LiveDraft::Auto, 1024, 1024, secs(16.0)), Some((256, 256)));
        assert_eq!(draft_size(LiveDraft::Auto, 1024, 1024, secs(600.0)), Some((256, 256)));
        // The aspect is kept, and no side goes under 64.
        assert_eq!(draft_size(LiveDraft::Auto, 1344, 768, secs(16.0)), Some((336, 192)));
        assert_eq!(draft_size(LiveDraft::Auto, 1024, 160, secs(100.0)), Some((256, 64)));
        // "Always" at a fast size drafts at half, as before.
        assert_eq!(draft_size(LiveDraft::Always, 1024, 1024, secs(0.2)), Some((512, 512)));
        // The predicted draft time is about the threshold or less.
        let rate = live_rate(Duration::from_secs(9), 1024, 1024, 8);
        let (w, h) = draft_size(LiveDraft::Auto, 1024, 1024, secs(9.0)).unwrap();
        assert!(predicted_time(rate, w, h, 8) <= DRAFT_WHEN_SLOWER_THAN, "{:?}", predicted_time(rate, w, h, 8));
    }

    #[test]
    fn history_search_finds_every_word_in_the_prompt_or_the_seed() {
        let words = |q: &str| q.split_whitespace().map(str::to_lowercase).collect::<Vec<_>>();
        let fox = "A red Fox in the snow";
        assert!(prompt_matches(fox, 7, &words("")));
        assert!(prompt_matches(fox, 7, &words("fox SNOW")));
        assert!(!prompt_matches(fox, 7, &words("fox rain")));
        assert!(prompt_matches(fox, 42, &words("fox 42")), "a seed");
        assert!(!prompt_matches(fox, 43, &words("42")));
        assert!(prompt_matches("一只猫在屋顶上", 1, &words("猫")));
    }

    #[test]
    fn the_variations_grid_fits_what_it_can_and_scrolls_the_rest() {
        let rows = |n: usize, cols: usize| n.div_ceil(cols) as f32;
        // 8 square images in a 450×530 pane: 3 columns, all in view.
        let (cols, cell) = variation_grid(8, 450.0, 530.0, 1.0, MIN_VARIATION_SIDE);
        assert_eq!(cols, 3);
        assert!(rows(8, cols) * cell.y <= 530.0 + 1e-3 && cell.x.min(cell.y) >= MIN_VARIATION_SIDE, "{cell:?}");
        // 50 of them would be 56-point thumbnails there: 3 columns of
        // 150-point cells instead, 17 rows to scroll through.
        let (cols, cell) = variation_grid(50, 450.0, 530.0, 1.0, MIN_VARIATION_SIDE);
        assert_eq!((cols, cell), (3, egui::vec2(150.0, 150.0)));
        assert!(rows(50, cols) * cell.y > 530.0);
        // A wide window gives more columns; the cells keep the images' aspect.
        let (cols, cell) = variation_grid(50, 1200.0, 700.0, 16.0 / 9.0, MIN_VARIATION_SIDE);
        assert!(cols >= 4 && (cell.x / cell.y - 16.0 / 9.0).abs() < 1e-3, "{cols} {cell:?}");
        assert!(cell.y >= MIN_VARIATION_SIDE);
        // One image takes the pane; a pane narrower than one cell still has a column.
        assert_eq!(variation_grid(1, 400.0, 300.0, 1.0, MIN_VARIATION_SIDE), (1, egui::vec2(400.0, 300.0)));
        assert_eq!(variation_grid(20, 60.0, 60.0, 1.0, MIN_VARIATION_SIDE).0, 1);
        assert_eq!(variation_grid(0, 400.0, 300.0, 1.0, MIN_VARIATION_SIDE).0, 1);
        // Larger thumbnails asked for: fewer columns of larger cells.
        let (cols, cell) = variation_grid(50, 1200.0, 700.0, 1.0, 300.0);
        assert!(cols == 3 && cell.x >= 300.0, "{cols} {cell:?}");
    }

    #[test]
    fn zoom_is_read_and_set_in_actual_pixels() {
        let mut c = ZoomView::default();
        assert_eq!((c.actual_size_percent(), c.actual_size_zoom()), (None, None), "nothing drawn yet");
        // A 1024² image fitted into a 512-pixel pane: half size; 1:1 is zoom 2.
        c.fit_scale = Some(0.5);
        assert_eq!(c.actual_size_percent(), Some(50.0));
        assert_eq!(c.actual_size_zoom(), Some(2.0));
        c.zoom = 3.0;
        assert_eq!(c.actual_size_percent(), Some(150.0));
        // A 128² image fitted into a 344-pixel pane is already above 1:1.
        c.fit_scale = Some(2.6875);
        assert_eq!(c.actual_size_zoom(), None);
        // A huge image in a tiny pane: 1:1 stays within the zoom limit.
        c.fit_scale = Some(0.01);
        assert_eq!(c.actual_size_zoom(), Some(MAX_ZOOM));
    }

    /// Zooming keeps the image point under the pointer where it is, never
    /// shows anything outside the image, and a drag moves the image with the
    /// pointer.
    #[test]
    fn zoom_follows_the_pointer_and_stays_inside_the_image() {
        let point_at = |v: &ZoomView, at: egui::Vec2| v.uv().min + at * v.uv().size();
        let mut v = ZoomView::default();
        assert_eq!(v.uv(), egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)));
        // Zoom 2 about the top-left quarter point: that point stays put.
        let at = egui::vec2(0.25, 0.25);
        v.zoom_about(2.0, at);
        assert_eq!(v.zoom, 2.0);
        assert!((point_at(&v, at) - egui::pos2(0.25, 0.25)).length() < 1e-6, "{:?}", v.uv());
        // Again, about another point of the new view.
        let at = egui::vec2(0.8, 0.4);
        let before = point_at(&v, at);
        v.zoom_about(1.5, at);
        assert!((point_at(&v, at) - before).length() < 1e-6, "{:?}", v.uv());
        // About a corner: the view is held inside the image (0..1).
        let mut corner = ZoomView::default();
        corner.zoom_about(4.0, egui::vec2(0.0, 0.0));
        assert_eq!(corner.uv().min, egui::pos2(0.0, 0.0));
        corner.zoom_about(0.1, egui::vec2(1.0, 1.0));
        assert_eq!((corner.zoom, corner.pan), (1.0, egui::Vec2::ZERO), "never below fit");
        // Past the limit: clamped.
        corner.zoom_about(1000.0, egui::vec2(0.5, 0.5));
        assert_eq!(corner.zoom, MAX_ZOOM);
        // A drag of half the drawn width at zoom 2 moves the view a quarter
        // of the image, the other way.
        let mut d = ZoomView { zoom: 2.0, ..ZoomView::default() };
        d.drag(egui::vec2(100.0, 0.0), egui::vec2(200.0, 200.0));
        assert!((d.pan.x + 0.25).abs() < 1e-6 && d.pan.y == 0.0, "{:?}", d.pan);
        d.drag(egui::vec2(1000.0, -1000.0), egui::vec2(200.0, 200.0));
        assert_eq!(d.uv().min.x, 0.0);
        assert_eq!(d.uv().max.y, 1.0);
        d.fit();
        assert_eq!(d, ZoomView::default());
    }

    #[test]
    fn the_first_gpu_image_says_why_it_is_slow_until_its_first_step() {
        let waiting = LiveStatus::Rendering { done: 0, total: 8 };
        assert!(first_gpu_image_hint(true, &waiting).is_some_and(|h| h.contains("compiles")));
        assert_eq!(first_gpu_image_hint(false, &waiting), None);
        assert_eq!(first_gpu_image_hint(true, &LiveStatus::Rendering { done: 1, total: 8 }), None);
        assert_eq!(first_gpu_image_hint(true, &LiveStatus::Idle), None);
    }

    #[test]
    fn strength_snaps_to_the_step_grid() {
        assert_eq!(snap_strength(0.6, 10).1, 6);
        assert!((snap_strength(0.6, 10).0 - 0.6).abs() < 1e-6);
        let (s, run) = snap_strength(0.6, 8);
        assert_eq!(run, 5);
        assert!((s - 0.625).abs() < 1e-6);
        assert_eq!(snap_strength(0.0, 50).1, 1, "at least one step runs");
        assert_eq!(snap_strength(1.0, 50).1, 50);
        // Every snapped strength runs exactly strength·N steps.
        for n in [1usize, 7, 30, 50] {
            for k in 1..=n {
                let (s, run) = snap_strength(k as f32 / n as f32 + 0.1 / n as f32, n);
                assert_eq!(run, k, "n={n} k={k} s={s}");
            }
        }
    }

    #[test]
    fn quiet_period_is_zero_when_fast_and_short_when_slow() {
        assert_eq!(quiet_period(None), Duration::ZERO);
        assert_eq!(quiet_period(Some(Duration::from_millis(80))), Duration::ZERO);
        assert_eq!(quiet_period(Some(Duration::from_secs(1))), Duration::from_millis(250));
        assert_eq!(quiet_period(Some(Duration::from_secs(60))), Duration::from_millis(600));
    }

    #[test]
    fn presets_give_multiples_of_16() {
        assert_eq!(AspectPreset::Square.size(1024), Some((1024, 1024)));
        assert_eq!(AspectPreset::Wide16x9.size(1024), Some((1024, 576)));
        assert_eq!(AspectPreset::Portrait3x4.size(1024), Some((768, 1024)));
        assert_eq!(AspectPreset::Custom.size(1024), None);
        for p in AspectPreset::ALL.into_iter().filter(|p| *p != AspectPreset::Custom) {
            for long in [128, 512, 1024, 1360] {
                let (w, h) = p.size(long).unwrap();
                assert_eq!(AspectPreset::of(w, h), p, "{w}x{h}");
            }
        }
        assert_eq!(AspectPreset::of(1024, 1008), AspectPreset::Custom);
        assert_eq!(AspectPreset::of(0, 0), AspectPreset::Custom);
        for p in AspectPreset::ALL {
            if let Some((w, h)) = p.size(1000) {
                assert!(size_problem(w, h).is_none(), "{p:?} {w}x{h}");
            }
        }
        assert!(size_problem(100, 64).unwrap().contains("try 96"));
        assert!(size_problem(8, 64).is_some());
        assert!(size_problem(64, 99_999).unwrap().contains("larger than"), "no rounding offered for an absurd size");
    }

    #[test]
    fn seed_modes() {
        assert_eq!(SeedMode::Fixed.next(5), 5);
        assert_eq!(SeedMode::Increment.next(5), 6);
        assert_eq!(SeedMode::Increment.next(u64::MAX), 0);
    }

    #[test]
    fn heatmap_is_black_where_equal_and_bright_where_different() {
        let a = [10u8, 20, 30, 0, 0, 0];
        let b = [10u8, 20, 30, 255, 255, 255];
        let h = difference_heatmap(&a, &b);
        assert_eq!(&h[..3], &[0, 0, 0]);
        assert_eq!(&h[3..], &[255, 255, 255]);
    }

    #[test]
    fn compare_modes_cycle_through_all() {
        let mut m = CompareMode::SideBySide;
        let mut seen = vec![m];
        for _ in 0..CompareMode::ALL.len() {
            m = m.next();
            seen.push(m);
        }
        assert_eq!(m, CompareMode::SideBySide);
        assert!(CompareMode::ALL.iter().all(|x| seen.contains(x)));
    }

    #[test]
    fn steps_left_count_only_what_the_sampler_runs() {
        let mut r = GenerateRequest::new("x", zimage_engine::pipeline::ModelKind::Base);
        r.steps = 50;
        assert_eq!(steps_left(&r, 0), 50);
        assert_eq!(steps_left(&r, 20), 30);
        assert_eq!(steps_left(&r, 99), 0);
        r.init = Some(zimage_engine::preview::RgbImage { width: 16, height: 16, pixels: vec![0; 16 * 16 * 3] });
        r.strength = 0.6;
        assert_eq!(steps_left(&r, 0), 30, "strength 0.6 of 50 steps runs 30");
        assert_eq!(steps_left(&r, 10), 20);
    }

    #[test]
    fn history_filters_pick_the_base_images_or_the_kept_ones() {
        assert!(HistoryFilter::All.shows(false, Mark::Rejected));
        assert!(HistoryFilter::Base.shows(true, Mark::None));
        assert!(!HistoryFilter::Base.shows(false, Mark::Starred));
        assert!(HistoryFilter::Kept.shows(false, Mark::Kept) && HistoryFilter::Kept.shows(true, Mark::Starred));
        assert!(!HistoryFilter::Kept.shows(false, Mark::None) && !HistoryFilter::Kept.shows(true, Mark::Rejected));
    }

    #[test]
    fn pair_pages_hold_the_current_pair_and_turn_whole() {
        assert_eq!(pair_page(0, 0, 8), 0..0);
        assert_eq!(pair_page(5, 3, 8), 0..5, "a batch of five on one page");
        assert_eq!(pair_page(20, 7, 8), 0..8);
        assert_eq!(pair_page(20, 8, 8), 8..16);
        assert_eq!(pair_page(20, 19, 8), 16..20, "the last page is short");
        assert_eq!(pair_page(20, 99, 8), 16..20, "past the end: the last page");
        assert_eq!(pair_page(3, 2, 0), 2..3, "at least one per page");
    }

    #[test]
    fn pair_grid_uses_the_columns_that_show_the_images_largest() {
        // Square images, wide area: five pairs side by side (each cell tall and thin enough).
        assert_eq!(pair_grid_columns(5, 1500.0, 600.0, 1.0), 5);
        assert_eq!(pair_grid_columns(1, 300.0, 900.0, 1.0), 1);
        // Eight square pairs in 1000×800: 4 columns × 2 rows give 200-wide images (8 columns: 125; 2: 100).
        assert_eq!(pair_grid_columns(8, 1000.0, 800.0, 1.0), 4);
        // Wide images (2:1) favour fewer columns than square ones in the same area.
        assert!(pair_grid_columns(8, 1000.0, 800.0, 2.0) <= pair_grid_columns(8, 1000.0, 800.0, 1.0));
        assert_eq!(pair_grid_columns(0, 100.0, 100.0, 1.0), 1);
    }
}
