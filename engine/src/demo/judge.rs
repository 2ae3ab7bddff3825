//! The procedural judge: reads a picture back into a scene by pixel analysis
//! (background colour, each object's colour, grid cell, size and shape from
//! its fill ratio) and scores it against the caption's scene.

use super::world::{Colour, Object, Position, Scene, Shape, Size, IMAGE_SIDE};
use crate::preview::RgbImage;

/// A pixel counts as a palette colour only within this RGB distance; blends
/// along edges (and muddy generated pixels) stay unassigned.
const MAX_COLOUR_DISTANCE: f32 = 60.0;
/// Components smaller than this many pixels are noise (a small triangle is
/// about 300 px).
const MIN_AREA: usize = 90;
/// Components filling less of their bounding box than this are edge halos.
const MIN_FILL: f32 = 0.3;
/// Bounding-box side separating small (≈26 px) from large (≈51 px).
const SIZE_THRESHOLD: f32 = 0.3 * IMAGE_SIDE as f32;

/// An object found in a picture.
#[derive(Debug, Clone, PartialEq)]
pub struct Detected {
    pub colour: Colour,
    pub position: Position,
    pub size: Size,
    pub shape: Shape,
    pub area: usize,
    /// Area over bounding-box area.
    pub fill: f32,
    /// Bounding box (x0, y0, x1, y1), inclusive pixel indices.
    pub bbox: (usize, usize, usize, usize),
}

/// What the judge sees in a picture.
#[derive(Debug, Clone, PartialEq)]
pub struct Analysis {
    pub background: Colour,
    /// At most one per colour (its largest component), largest first.
    pub objects: Vec<Detected>,
}

/// Nearest palette colour of a pixel, if close enough.
pub fn classify(rgb: [u8; 3]) -> Option<Colour> {
    let mut best = None;
    let mut best_d = f32::MAX;
    for c in Colour::ALL {
        let p = c.rgb();
        let d: f32 = (0..3).map(|i| (rgb[i] as f32 - p[i] as f32).powi(2)).sum::<f32>().sqrt();
        if d < best_d {
            best_d = d;
            best = Some(c);
        }
    }
    best.filter(|_| best_d <= MAX_COLOUR_DISTANCE)
}

/// Shape from the fill ratio: square 1.0, circle π/4 ≈ 0.79, triangle 0.5.
pub fn shape_from_fill(fill: f32) -> Shape {
    if fill >= 0.89 {
        Shape::Square
    } else if fill >= 0.64 {
        Shape::Circle
    } else {
        Shape::Triangle
    }
}

/// Reads a picture back into a background and objects.
pub fn analyse(img: &RgbImage) -> Analysis {
    let (w, h) = (img.width as usize, img.height as usize);
    let labels: Vec<Option<Colour>> =
        img.pixels.chunks_exact(3).map(|p| classify([p[0], p[1], p[2]])).collect();
    let mut counts = [0usize; 8];
    for l in labels.iter().flatten() {
        counts[*l as usize] += 1;
    }
    let bg_index = (0..8).max_by_key(|&i| (counts[i], usize::MAX - i)).unwrap_or(0);
    let background = Colour::ALL[bg_index];

    // 4-connected components of every non-background colour.
    let mut seen = vec![false; w * h];
    let mut best: Vec<Option<Detected>> = vec![None; 8];
    let mut stack = Vec::new();
    for start in 0..w * h {
        let Some(colour) = labels[start] else { continue };
        if colour == background || seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let (mut area, mut x0, mut y0, mut x1, mut y1) = (0usize, w, h, 0usize, 0usize);
        while let Some(p) = stack.pop() {
            area += 1;
            let (x, y) = (p % w, p / w);
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
            let mut push = |q: usize| {
                if !seen[q] && labels[q] == Some(colour) {
                    seen[q] = true;
                    stack.push(q);
                }
            };
            if x > 0 {
                push(p - 1);
            }
            if x + 1 < w {
                push(p + 1);
            }
            if y > 0 {
                push(p - w);
            }
            if y + 1 < h {
                push(p + w);
            }
        }
        let (bw, bh) = (x1 - x0 + 1, y1 - y0 + 1);
        let fill = area as f32 / (bw * bh) as f32;
        if area < MIN_AREA || fill < MIN_FILL {
            continue;
        }
        let side = bw.max(bh) as f32 * IMAGE_SIDE as f32 / w.max(1) as f32;
        let scale = IMAGE_SIDE as f32 / w.max(1) as f32;
        let det = Detected {
            colour,
            position: Position::of_point((x0 + x1 + 1) as f32 / 2.0 * scale, (y0 + y1 + 1) as f32 / 2.0 * scale),
            size: if side >= SIZE_THRESHOLD { Size::Large } else { Size::Small },
            shape: shape_from_fill(fill),
            area,
            fill,
            bbox: (x0, y0, x1, y1),
        };
        let slot = &mut best[colour as usize];
        if slot.as_ref().is_none_or(|d| d.area < det.area) {
            *slot = Some(det);
        }
    }
    let mut objects: Vec<Detected> = best.into_iter().flatten().collect();
    objects.sort_by_key(|o| std::cmp::Reverse(o.area));
    Analysis { background, objects }
}

/// Per-attribute verdict for one captioned object.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ObjectVerdict {
    /// An object of the right colour is present.
    pub colour: bool,
    pub position: bool,
    pub size: bool,
    pub shape: bool,
    /// Fill ratio of the object of the right colour, if present: how far a
    /// shape is from the judge's thresholds (square ≥ 0.89 > circle ≥ 0.64).
    pub fill: Option<f32>,
}

impl ObjectVerdict {
    pub fn all(&self) -> bool {
        self.colour && self.position && self.size && self.shape
    }
}

/// The judge's verdict on a picture for a scene.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub background: bool,
    pub objects: Vec<ObjectVerdict>,
    /// Detected objects whose colour is not in the caption.
    pub extra_objects: usize,
}

impl Verdict {
    /// Background, every object fully right, and nothing else in the picture.
    pub fn whole_caption(&self) -> bool {
        self.background && self.extra_objects == 0 && self.objects.iter().all(ObjectVerdict::all)
    }
}

fn verdict_for(o: &Object, found: Option<&Detected>) -> ObjectVerdict {
    match found {
        None => ObjectVerdict::default(),
        Some(d) => ObjectVerdict {
            colour: true,
            position: d.position == o.position,
            size: d.size == o.size,
            shape: d.shape == o.shape,
            fill: Some(d.fill),
        },
    }
}

/// Scores a picture against the scene it should show.
pub fn judge(img: &RgbImage, expected: &Scene) -> Verdict {
    let a = analyse(img);
    let objects =
        expected.objects.iter().map(|o| verdict_for(o, a.objects.iter().find(|d| d.colour == o.colour))).collect();
    let extra_objects = a.objects.iter().filter(|d| !expected.objects.iter().any(|o| o.colour == d.colour)).count();
    Verdict { background: a.background == expected.background, objects, extra_objects }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::world::{render, Split, WorldSampler};

    #[test]
    fn judge_accepts_every_rendered_scene() {
        let mut w = WorldSampler::new(11);
        let mut fills = [(f32::MAX, f32::MIN); 3];
        for i in 0..1500 {
            let (scene, img) = w.sample(Split::Any);
            let v = judge(&img, &scene);
            assert!(v.whole_caption(), "scene {i}: {}: {v:?}\n{:?}", scene.caption(), analyse(&img));
            for d in analyse(&img).objects {
                let f = &mut fills[d.shape as usize];
                *f = (f.0.min(d.fill), f.1.max(d.fill));
            }
        }
        // Fill ratios stay well inside their class bands.
        assert!(fills[Shape::Square as usize].0 > 0.9, "{fills:?}");
        assert!(fills[Shape::Circle as usize].0 > 0.68 && fills[Shape::Circle as usize].1 < 0.86, "{fills:?}");
        assert!(fills[Shape::Triangle as usize].1 < 0.6, "{fills:?}");
    }

    #[test]
    fn judge_rejects_wrong_pictures() {
        let scene = Scene::parse("a large red circle in the center on a blue background").unwrap();
        let wrong = [
            "a large red square in the center on a blue background",
            "a small red circle in the center on a blue background",
            "a large red circle on the left on a blue background",
            "a large green circle in the center on a blue background",
            "a large red circle in the center on a white background",
            "a large red circle in the center and a small yellow square at the top left on a blue background",
        ];
        for caption in wrong {
            let other = Scene::parse(caption).unwrap();
            let placements: Vec<_> = other.objects.iter().map(crate::demo::world::nominal_placement).collect();
            let img = render(&other, &placements);
            assert!(!judge(&img, &scene).whole_caption(), "{caption}");
            assert!(judge(&img, &other).whole_caption(), "{caption}");
        }
    }
}
