//! `haystack`: procedural, seeded, captioned images standing in for web-scale pre-training
//! data, among them a few "photogenic needles".
//!
//! **Concepts.** Each image shows one subject: a shape, a colour and a size (4 × 4 × 2 = 32
//! concepts, captioned `"a small red circle"`). Four whole combinations are [`HELD_OUT`]: with
//! `hold_out = true` (the default) no image is drawn of them and no caption names them, wrong
//! captions included, so a model trained on such a haystack has seen every word of
//! `"a small red star"` but never that combination. Each shape, colour and size is still seen
//! in 7 or more other combinations. The judges' own sample (`hold_out = false`) holds all 32.
//!
//! **Quality factors.** Seven factors, each its own independent draw from Beta(1.5, 2) (mean
//! 0.43): no shared "quality" drives them, so any two are uncorrelated (the test bound: |r| <
//! 0.05 on 5,000 images). What each does to the pixels:
//!
//! | column                | low                                   | high                                        |
//! |-----------------------|---------------------------------------|---------------------------------------------|
//! | `rating_color_contrast` | greyish subject, washed-out contrast  | vivid subject                               |
//! | `rating_background`   | flat dull grey                        | gradient in the complementary colour, lit from the light's side |
//! | `rating_lighting`     | far too dark or blown out, flat       | balanced, the subject shaded from one side  |
//! | `rating_focus`        | blurred                               | sharp                                       |
//! | `rating_noise`        | heavy per-pixel noise                 | clean                                       |
//! | `rating_clutter`      | several distractor blobs, some in front | none                                      |
//! | `rating_composition`  | cut off by the frame                  | on a rule-of-thirds point, fully visible    |
//!
//! **Two hidden truths, read by different people.** Each is a fixed weighting of the factors:
//!
//! | factor      | `rating_quality`: the curators' rubric | `rating_preference`: what judges like |
//! |-------------|---:|---:|
//! | composition | 0.25 | — |
//! | lighting    | 0.25 | 0.10 |
//! | color       | 0.20 | 0.20 |
//! | background  | 0.15 | — |
//! | clutter     | 0.15 | 0.15 |
//! | noise       | — | 0.30 |
//! | focus       | — | 0.25 |
//!
//! The rubric ([`RUBRIC`]) is the paper's photography guideline (§1.3 of the notes:
//! composition, lighting, colour and contrast, subject and background, distracting objects);
//! the curation funnel's simulated raters and its aesthetic scorer read it. The preference
//! ([`PREFERENCE`]) is another weighting over partly other factors: the appeal judges learn it
//! (with rater noise), never the rubric. The two agree only through the factors they share:
//! their correlation is about 0.40 (the test bound: 0.30..0.50). Whether tuning on what the
//! rubric selects pleases judges of the preference is then a question the experiment answers,
//! not one its construction settles.
//!
//! Like web data, and mostly on its poorer images (by the rubric), a share of captions is wrong
//! (`wrong_captions`), a share carries a text overlay band (`overlay`, what an OCR filter
//! catches) and a share an "unsafe" marker (`unsafe`: a magenta-and-black checkerboard patch).
//! So a filter on the rubric also cleans captions; the filter's `recaption = false` separates
//! the two. All of it is recorded as hidden `rating_*` columns; observable are only
//! `file_name` and `text`.
//!
//! Determinism: image `i` draws from its own generator seeded by `(seed, i)`, so the output
//! is the same bytes whatever the number of threads. The `seed` param, not the step's own
//! `ctx.seed`, seeds it: the same params give the same haystack in any recipe.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use image::RgbImage;
use needle_core::ops::{InputsSchema, OpKind, OpSchema, ParamSpec, ParamType, ParamsSchema};
use rand::{Rng, RngExt};
use rand_distr::{Beta, Distribution, StandardNormal};
use rand_pcg::Pcg64Mcg;
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::context::OpContext;
use crate::dataset::DatasetWriter;
use crate::errors::OpError;
use crate::op::Op;

pub const SHAPES: [&str; 4] = ["circle", "square", "triangle", "star"];
pub const COLOURS: [&str; 4] = ["red", "green", "blue", "yellow"];
/// The subject's size: `small` is about 0.35 of the frame across, `large` about 0.58.
pub const SUBJECT_SIZES: [&str; 2] = ["small", "large"];

/// The concepts no training caption holds where `hold_out = true`: (shape, colour, size)
/// indices. Each shape and each colour once, each size twice, so every word stays common.
pub const HELD_OUT: [Concept; 4] = [
    Concept::new(3, 0, 0), // a small red star
    Concept::new(2, 1, 1), // a large green triangle
    Concept::new(1, 2, 0), // a small blue square
    Concept::new(0, 3, 1), // a large yellow circle
];

/// Sizes an image may have, in pixels a side.
pub const SIZES: std::ops::RangeInclusive<u32> = 8..=64;

/// Rubric score above which an image counts as a needle in `haystack.json`.
pub const NEEDLE_QUALITY: f64 = 0.7;

/// Each factor's distribution: Beta(A, B).
const FACTOR_BETA: (f64, f64) = (1.5, 2.0);

/// The curators' rubric: weights of the factors in `rating_quality`, in [`SubQualities`]
/// order (color, background, lighting, focus, noise, clutter, composition).
pub const RUBRIC: [f64; 7] = [0.20, 0.15, 0.25, 0.0, 0.0, 0.15, 0.25];

/// The judges' human preference: weights of the factors in `rating_preference`, same order.
pub const PREFERENCE: [f64; 7] = [0.20, 0.0, 0.10, 0.25, 0.30, 0.15, 0.0];

/// A subject: indices into [`SHAPES`], [`COLOURS`] and [`SUBJECT_SIZES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Concept {
    pub shape: usize,
    pub colour: usize,
    pub size: usize,
}

impl Concept {
    pub const fn new(shape: usize, colour: usize, size: usize) -> Concept {
        Concept {
            shape,
            colour,
            size,
        }
    }

    /// All 32 concepts, sizes outermost, then colours, then shapes.
    pub fn all() -> Vec<Concept> {
        let mut out = Vec::new();
        for size in 0..SUBJECT_SIZES.len() {
            for colour in 0..COLOURS.len() {
                for shape in 0..SHAPES.len() {
                    out.push(Concept {
                        shape,
                        colour,
                        size,
                    });
                }
            }
        }
        out
    }

    /// The concepts a haystack draws from.
    pub fn allowed(hold_out: bool) -> Vec<Concept> {
        Concept::all()
            .into_iter()
            .filter(|c| !(hold_out && c.is_held_out()))
            .collect()
    }

    pub fn is_held_out(&self) -> bool {
        HELD_OUT.contains(self)
    }

    /// `"a small red circle"`.
    pub fn caption(&self) -> String {
        format!("a {}", self.name())
    }

    /// `"small red circle"`.
    pub fn name(&self) -> String {
        format!(
            "{} {} {}",
            SUBJECT_SIZES[self.size], COLOURS[self.colour], SHAPES[self.shape]
        )
    }
}

pub struct Haystack;

/// The op's params, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct HaystackParams {
    pub images: usize,
    pub size: u32,
    pub seed: u64,
    pub wrong_captions: f64,
    pub overlay: f64,
    pub unsafe_share: f64,
    pub hold_out: bool,
}

impl Default for HaystackParams {
    fn default() -> Self {
        HaystackParams {
            images: 20_000,
            size: 16,
            seed: 0,
            wrong_captions: 0.30,
            overlay: 0.08,
            unsafe_share: 0.02,
            hold_out: true,
        }
    }
}

impl HaystackParams {
    pub fn from_ctx(ctx: &OpContext) -> Result<HaystackParams, OpError> {
        let p = HaystackParams {
            images: ctx.param("images")?,
            size: ctx.param("size")?,
            seed: ctx.param("seed")?,
            wrong_captions: ctx.param("wrong_captions")?,
            overlay: ctx.param("overlay")?,
            unsafe_share: ctx.param("unsafe")?,
            hold_out: ctx.param("hold_out")?,
        };
        p.check()?;
        Ok(p)
    }

    pub fn check(&self) -> Result<(), OpError> {
        let bad = |name: &str, why: String| OpError::Param {
            name: name.to_string(),
            why,
        };
        if self.images == 0 {
            return Err(bad("images", "must be at least 1".into()));
        }
        check_size(self.size)?;
        for (name, share) in [
            ("wrong_captions", self.wrong_captions),
            ("overlay", self.overlay),
            ("unsafe", self.unsafe_share),
        ] {
            if !(0.0..=1.0).contains(&share) {
                return Err(bad(name, format!("is a share: {share} is not in 0..=1")));
            }
        }
        Ok(())
    }
}

/// `size` params of the dataset ops: 8..=64 pixels a side.
pub fn check_size(size: u32) -> Result<(), OpError> {
    if SIZES.contains(&size) {
        Ok(())
    } else {
        Err(OpError::Param {
            name: "size".into(),
            why: format!(
                "{size} is out of range: images are {}..={} pixels a side",
                SIZES.start(),
                SIZES.end()
            ),
        })
    }
}

/// The seven quality factors, each in `[0, 1]`, higher is better.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SubQualities {
    pub color: f64,
    pub background: f64,
    pub lighting: f64,
    pub focus: f64,
    pub noise: f64,
    pub clutter: f64,
    pub composition: f64,
}

impl SubQualities {
    /// The factors in the order of [`RUBRIC`] and [`PREFERENCE`].
    pub fn values(&self) -> [f64; 7] {
        [
            self.color,
            self.background,
            self.lighting,
            self.focus,
            self.noise,
            self.clutter,
            self.composition,
        ]
    }

    /// The factors weighted by `weights`, which sum to 1.
    pub fn weighted(&self, weights: &[f64; 7]) -> f64 {
        round4(self.values().iter().zip(weights).map(|(v, w)| v * w).sum())
    }
}

/// Everything hidden about one image, drawn before any pixel (and without them: the rates
/// can be tested on many specs cheaply).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSpec {
    pub index: usize,
    /// The true concept.
    pub concept: Concept,
    /// The concept the caption names: differs from the true one when the caption is wrong.
    pub captioned: Concept,
    /// The curators' rubric score ([`RUBRIC`]).
    pub quality: f64,
    /// The judges' preference score ([`PREFERENCE`]).
    pub preference: f64,
    pub sub: SubQualities,
    pub overlay: bool,
    pub unsafe_marker: bool,
    /// Seeds the layout (positions, light, noise) drawn while rendering.
    layout_seed: u128,
}

impl ImageSpec {
    pub fn caption(&self) -> String {
        self.captioned.caption()
    }

    pub fn caption_correct(&self) -> bool {
        self.captioned == self.concept
    }

    /// The hidden `rating_*` columns of this image.
    pub fn ratings(&self) -> Map<String, Value> {
        let s = &self.sub;
        let columns = [
            ("rating_quality", json!(self.quality)),
            ("rating_preference", json!(self.preference)),
            ("rating_color_contrast", json!(s.color)),
            ("rating_background", json!(s.background)),
            ("rating_lighting", json!(s.lighting)),
            ("rating_focus", json!(s.focus)),
            ("rating_noise", json!(s.noise)),
            ("rating_clutter", json!(s.clutter)),
            ("rating_composition", json!(s.composition)),
            ("rating_caption_correct", json!(self.caption_correct())),
            ("rating_overlay", json!(self.overlay)),
            ("rating_unsafe", json!(self.unsafe_marker)),
            ("rating_true_shape", json!(SHAPES[self.concept.shape])),
            ("rating_true_color", json!(COLOURS[self.concept.colour])),
            ("rating_true_size", json!(SUBJECT_SIZES[self.concept.size])),
        ];
        columns
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }
}

/// The generator of image `index` of the haystack seeded `seed`.
fn image_rng(seed: u64, index: usize) -> Pcg64Mcg {
    let hi = splitmix64(seed ^ 0x6e65_6564_6c65_0001);
    let lo = splitmix64(hi ^ splitmix64(index as u64));
    Pcg64Mcg::new(u128::from(hi) << 64 | u128::from(lo))
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Draw the hidden spec of image `index`. Values are rounded to 4 decimals, so what the
/// ratings columns say is exactly what the pixels were drawn from.
pub fn sample_spec(p: &HaystackParams, index: usize) -> ImageSpec {
    let mut rng = image_rng(p.seed, index);
    let beta = Beta::new(FACTOR_BETA.0, FACTOR_BETA.1).expect("valid Beta parameters");
    let mut factor = || round4(beta.sample(&mut rng));
    let sub = SubQualities {
        color: factor(),
        background: factor(),
        lighting: factor(),
        focus: factor(),
        noise: factor(),
        clutter: factor(),
        composition: factor(),
    };
    let quality = sub.weighted(&RUBRIC);
    let preference = sub.weighted(&PREFERENCE);
    let allowed = Concept::allowed(p.hold_out);
    let concept = allowed[rng.random_range(0..allowed.len())];
    let mut captioned = concept;
    if rng.random_bool(web_flaw(p.wrong_captions, quality)) {
        // Any other concept the haystack may name, with equal odds.
        let k = rng.random_range(1..allowed.len());
        let at = allowed
            .iter()
            .position(|c| *c == concept)
            .expect("drawn from it");
        captioned = allowed[(at + k) % allowed.len()];
    }
    let overlay = rng.random_bool(web_flaw(p.overlay, quality));
    let unsafe_marker = rng.random_bool(web_flaw(p.unsafe_share, quality));
    let layout_seed = u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64());
    ImageSpec {
        index,
        concept,
        captioned,
        quality,
        preference,
        sub,
        overlay,
        unsafe_marker,
        layout_seed,
    }
}

/// The chance that an image of rubric score `q` carries a flaw whose share over the pool is
/// `share`. As on the web, the flaws gather on poor images (a careless caption, burnt-in text,
/// spam go with careless pictures): the chance falls linearly with quality,
/// `s + s (1 − s) (m − q) / max(m, 1 − m)` with `m` the mean score. Since `E[q] = m` the share
/// over the pool stays `s`, and the chance stays within [0, 1], exactly 0 or 1 when `s` is.
fn web_flaw(share: f64, q: f64) -> f64 {
    let m = FACTOR_BETA.0 / (FACTOR_BETA.0 + FACTOR_BETA.1);
    let tilt = (m - q) / m.max(1.0 - m);
    (share + share * (1.0 - share) * tilt).clamp(0.0, 1.0)
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

// ---------------------------------------------------------------------------------------
// Rendering. Everything is in pixels of the final image, `u` = one pixel of a 16×16 image,
// colours are linear-ish RGB in [0, 1] until the final quantisation.

type Rgb = [f32; 3];

const HUES: [Rgb; 4] = [
    [0.92, 0.10, 0.08], // red
    [0.10, 0.78, 0.18], // green
    [0.12, 0.30, 0.98], // blue
    [0.98, 0.86, 0.06], // yellow
];

/// The background of a good photo of each colour: its complement, a little muted.
const COMPLEMENTS: [Rgb; 4] = [
    [0.10, 0.60, 0.66], // teal behind red
    [0.66, 0.20, 0.62], // magenta-purple behind green
    [0.98, 0.58, 0.16], // orange behind blue
    [0.36, 0.24, 0.80], // violet behind yellow
];

const MAGENTA: Rgb = [1.0, 0.0, 1.0];

fn lerp(a: f32, b: f32, t: f32) -> f32 {
    a + (b - a) * t
}

fn mix(a: Rgb, b: Rgb, t: f32) -> Rgb {
    [
        lerp(a[0], b[0], t),
        lerp(a[1], b[1], t),
        lerp(a[2], b[2], t),
    ]
}

fn smoothstep(e0: f64, e1: f64, x: f64) -> f32 {
    let t = ((x - e0) / (e1 - e0)).clamp(0.0, 1.0);
    (t * t * (3.0 - 2.0 * t)) as f32
}

fn luma(c: Rgb) -> f32 {
    0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
}

/// Signed distance (pixels, negative inside) from `(x, y)` (relative to the shape's centre,
/// y down) to a shape of "radius" `r`; sizes are chosen so the four look alike in area.
fn shape_sd(shape: usize, x: f32, y: f32, r: f32, turn: f32) -> f32 {
    let (sn, cs) = turn.sin_cos();
    let (x, y) = (cs * x + sn * y, -sn * x + cs * y);
    let y = -y; // the formulas below are y-up
    match shape {
        0 => (x * x + y * y).sqrt() - r,
        1 => {
            let b = 0.82 * r;
            let (qx, qy) = (x.abs() - b, y.abs() - b);
            let outside = (qx.max(0.0).powi(2) + qy.max(0.0).powi(2)).sqrt();
            outside + qx.max(qy).min(0.0)
        }
        2 => {
            // Equilateral triangle pointing up, centroid at the origin (Quilez).
            let h = 0.98 * r;
            let k = 3f32.sqrt();
            let (mut px, mut py) = (x.abs() - h, y + h / k);
            if px + k * py > 0.0 {
                (px, py) = ((px - k * py) / 2.0, (-k * px - py) / 2.0);
            }
            px -= px.clamp(-2.0 * h, 0.0);
            -(px * px + py * py).sqrt() * py.signum()
        }
        _ => {
            // Five-pointed star (Quilez's sdStar5), inner radius 0.45 of the outer.
            let r = 1.1 * r;
            let rf = 0.45;
            let k1 = (0.809_017_f32, -0.587_785_f32);
            let k2 = (-k1.0, k1.1);
            let (mut px, mut py) = (x.abs(), y);
            let d = 2.0 * (k1.0 * px + k1.1 * py).max(0.0);
            (px, py) = (px - d * k1.0, py - d * k1.1);
            let d = 2.0 * (k2.0 * px + k2.1 * py).max(0.0);
            (px, py) = (px - d * k2.0, py - d * k2.1);
            px = px.abs();
            py -= r;
            let ba = (rf * -k1.1, rf * k1.0 - 1.0);
            let h = ((px * ba.0 + py * ba.1) / (ba.0 * ba.0 + ba.1 * ba.1)).clamp(0.0, r);
            let (dx, dy) = (px - ba.0 * h, py - ba.1 * h);
            (dx * dx + dy * dy).sqrt() * (py * ba.0 - px * ba.1).signum()
        }
    }
}

/// Anti-aliased coverage of a pixel by a shape, from its signed distance.
fn coverage(sd: f32) -> f32 {
    (0.5 - sd).clamp(0.0, 1.0)
}

struct Blob {
    cx: f32,
    cy: f32,
    rx: f32,
    ry: f32,
    colour: Rgb,
    in_front: bool,
}

fn hsv(h: f32, s: f32, v: f32) -> Rgb {
    let h6 = (h.rem_euclid(1.0)) * 6.0;
    let f = h6 - h6.floor();
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    match h6 as u32 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

/// Render the pixels of `spec` at `size`×`size`.
pub fn render(spec: &ImageSpec, size: u32) -> RgbImage {
    let mut rng = Pcg64Mcg::new(spec.layout_seed);
    let s = size as usize;
    let sf = size as f32;
    let u = sf / 16.0;
    let q = &spec.sub;
    let at = |x: usize, y: usize| (x as f32 + 0.5, y as f32 + 0.5);

    // Light comes from above, at an angle; the background gets lighter toward it and the
    // subject is lit on that side.
    let theta: f32 = rng.random_range(-0.9..0.9);
    let light = (theta.sin(), -theta.cos());

    // Background: flat dull grey (low) → a gradient in the complementary colour (high).
    let grey: f32 = rng.random_range(0.42..0.56);
    let bg_w = smoothstep(0.15, 0.85, q.background);
    let comp = COMPLEMENTS[spec.concept.colour];
    let mut px: Vec<Rgb> = (0..s * s)
        .map(|i| {
            let (x, y) = at(i % s, i / s);
            let toward_light = ((x - sf / 2.0) * light.0 + (y - sf / 2.0) * light.1) / (0.7 * sf);
            let lit = lerp(0.25, 1.1, (0.5 + 0.5 * toward_light).clamp(0.0, 1.0));
            let grad = comp.map(|c| c * lit + 0.04);
            mix([grey; 3], grad, bg_w)
        })
        .collect();

    // Subject: placed near a rule-of-thirds point (high composition) or against an edge,
    // partly cut off (low).
    // Size: the subject's "radius", a sixth of the frame (small) or three tenths (large).
    let r = sf
        * match spec.concept.size {
            0 => rng.random_range(0.155..0.185),
            _ => rng.random_range(0.27..0.31),
        };
    let thirds = [sf / 3.0, 2.0 * sf / 3.0];
    let good = (
        thirds[rng.random_range(0..2)] + rng.random_range(-0.3..0.3) * u,
        thirds[rng.random_range(0..2)] + rng.random_range(-0.3..0.3) * u,
    );
    let along = rng.random_range(0.15..0.85) * sf;
    let inward = rng.random_range(-0.15..0.35) * r;
    let awkward = match rng.random_range(0..4) {
        0 => (along, inward),
        1 => (along, sf - inward),
        2 => (inward, along),
        _ => (sf - inward, along),
    };
    let place = smoothstep(0.05, 0.75, q.composition);
    let centre = (
        lerp(awkward.0, good.0, place),
        lerp(awkward.1, good.1, place),
    );
    let turn = if spec.concept.shape == 0 {
        0.0
    } else {
        rng.random_range(-0.2..0.2)
    };

    // Colour: greyish (low) → the pure hue (high).
    let hue = HUES[spec.concept.colour];
    let sat = lerp(0.2, 1.0, smoothstep(0.1, 0.9, q.color));
    let body = mix([luma(hue); 3], hue, sat);
    let shading = 0.45 * smoothstep(0.25, 0.9, q.lighting);

    // Clutter: up to six distractor blobs, some in front of the subject.
    let blobs: Vec<Blob> = (0..((1.0 - q.clutter).powf(1.5) * 6.5) as usize)
        .map(|_| Blob {
            cx: rng.random_range(0.0..sf),
            cy: rng.random_range(0.0..sf),
            rx: rng.random_range(0.8..1.9) * u,
            ry: rng.random_range(0.8..1.9) * u,
            colour: hsv(
                rng.random_range(0.0..1.0),
                rng.random_range(0.4..0.9),
                rng.random_range(0.4..0.95),
            ),
            in_front: rng.random_bool(0.4),
        })
        .collect();
    let paint_blobs = |px: &mut [Rgb], front: bool| {
        for b in blobs.iter().filter(|b| b.in_front == front) {
            for (i, p) in px.iter_mut().enumerate() {
                let (x, y) = at(i % s, i / s);
                let (dx, dy) = ((x - b.cx) / b.rx, (y - b.cy) / b.ry);
                let sd = ((dx * dx + dy * dy).sqrt() - 1.0) * b.rx.min(b.ry);
                *p = mix(*p, b.colour, coverage(sd));
            }
        }
    };
    paint_blobs(&mut px, false);
    for (i, p) in px.iter_mut().enumerate() {
        let (x, y) = at(i % s, i / s);
        let (dx, dy) = (x - centre.0, y - centre.1);
        let a = coverage(shape_sd(spec.concept.shape, dx, dy, r, turn));
        if a > 0.0 {
            let side = ((dx * light.0 + dy * light.1) / r).clamp(-1.0, 1.0);
            let lit = body.map(|c| c * (1.0 + shading * side));
            *p = mix(*p, lit, a);
        }
    }
    paint_blobs(&mut px, true);

    // Focus: a Gaussian blur, none when sharp.
    let sigma = 1.2 * u * (1.0 - q.focus as f32).powi(2);
    if sigma > 0.2 {
        blur(&mut px, s, sigma);
    }

    // Colour and contrast: a washed-out image drifts toward its mean grey.
    let wash = 0.35 * (1.0 - q.color as f32).powf(1.5);
    let mean = px.iter().map(|&c| luma(c)).sum::<f32>() / (s * s) as f32;
    for p in px.iter_mut() {
        *p = mix(*p, [mean; 3], wash);
    }

    // Lighting: exposure off by up to 1.5 stops, either way, as a tone curve that crushes
    // the shadows (too dark) or the highlights (blown out) and keeps some detail.
    let gamma = (1.5 * (1.0 - q.lighting as f32).powi(2)).exp2();
    let too_dark = rng.random_bool(0.5);
    for p in px.iter_mut() {
        *p = p.map(|c| {
            let c = c.clamp(0.0, 1.0);
            if too_dark {
                c.powf(gamma)
            } else {
                1.0 - (1.0 - c).powf(gamma)
            }
        });
    }

    if spec.overlay {
        overlay_text(&mut px, s, &mut rng);
    }
    if spec.unsafe_marker {
        unsafe_marker(&mut px, s, &mut rng);
    }

    // Sensor noise: mostly grain in brightness, some in colour.
    let noise_sd = 0.008 + 0.09 * (1.0 - q.noise as f32).powi(2);
    let mut data = Vec::with_capacity(s * s * 3);
    for p in &px {
        let grain: f32 = StandardNormal.sample(&mut rng);
        for c in p {
            let chroma: f32 = StandardNormal.sample(&mut rng);
            let n = noise_sd * (0.85 * grain + 0.5 * chroma);
            data.push(((c + n).clamp(0.0, 1.0) * 255.0).round() as u8);
        }
    }
    RgbImage::from_raw(size, size, data).expect("buffer of the right size")
}

/// Separable Gaussian blur, clamping at the edges.
fn blur(px: &mut [Rgb], s: usize, sigma: f32) {
    let radius = (3.0 * sigma).ceil() as isize;
    let kernel: Vec<f32> = (-radius..=radius)
        .map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f32 = kernel.iter().sum();
    let clamp = |v: isize| v.clamp(0, s as isize - 1) as usize;
    let pass = |src: &[Rgb], horizontal: bool| -> Vec<Rgb> {
        (0..s * s)
            .map(|i| {
                let (x, y) = ((i % s) as isize, (i / s) as isize);
                let mut acc = [0.0f32; 3];
                for (k, w) in kernel.iter().enumerate() {
                    let d = k as isize - radius;
                    let j = if horizontal {
                        y as usize * s + clamp(x + d)
                    } else {
                        clamp(y + d) * s + x as usize
                    };
                    for c in 0..3 {
                        acc[c] += w * src[j][c];
                    }
                }
                acc.map(|a| a / total)
            })
            .collect()
    };
    let tmp = pass(px, true);
    px.copy_from_slice(&pass(&tmp, false));
}

/// A band across the image, at the top or the bottom, with rows of high-contrast glyph-like
/// strokes: light on a dark bar or dark on a light one, like captions burnt into web images.
fn overlay_text(px: &mut [Rgb], s: usize, rng: &mut Pcg64Mcg) {
    let cell = (s / 16).max(1);
    let band = 5 * cell;
    let top = if rng.random_bool(0.5) { 0 } else { s - band };
    let light_on_dark = rng.random_bool(0.7);
    let (bar, ink): (Rgb, Rgb) = if light_on_dark {
        ([0.05; 3], [0.97, 0.97, 0.92])
    } else {
        ([0.95; 3], [0.03; 3])
    };
    for y in top..top + band {
        for p in &mut px[y * s..(y + 1) * s] {
            *p = mix(*p, bar, 0.85);
        }
    }
    // Glyphs: 2×3 cells with a gap of one cell, from a start one cell in.
    let mut x0 = cell;
    while x0 + 2 * cell <= s {
        let mut glyph: u8 = rng.random_range(0..64);
        if glyph.count_ones() < 3 {
            glyph |= 0b10_1101;
        }
        for gy in 0..3 {
            for gx in 0..2 {
                if glyph >> (gy * 2 + gx) & 1 == 1 {
                    for y in 0..cell {
                        for x in 0..cell {
                            let (xx, yy) = (x0 + gx * cell + x, top + cell + gy * cell + y);
                            px[yy * s + xx] = ink;
                        }
                    }
                }
            }
        }
        x0 += 3 * cell;
    }
}

/// The "unsafe" marker: a 4×4 magenta-and-black checkerboard, one cell a pixel of a 16×16
/// image, somewhere inside the frame.
fn unsafe_marker(px: &mut [Rgb], s: usize, rng: &mut Pcg64Mcg) {
    let cell = (s / 16).max(1);
    let side = 4 * cell;
    let (x0, y0) = (
        rng.random_range(0..=s - side),
        rng.random_range(0..=s - side),
    );
    for y in 0..side {
        for x in 0..side {
            let on = (x / cell + y / cell).is_multiple_of(2);
            px[(y0 + y) * s + x0 + x] = if on { MAGENTA } else { [0.0; 3] };
        }
    }
}

// ---------------------------------------------------------------------------------------

/// What `haystack.json` says.
#[derive(Debug, Clone, Serialize)]
pub struct HaystackSummary {
    pub images: usize,
    pub size: u32,
    pub seed: u64,
    /// Images of each true concept, `"small red circle"` → count.
    pub per_concept: BTreeMap<String, usize>,
    /// The concepts no image shows and no caption names (empty where `hold_out = false`).
    pub held_out: Vec<String>,
    pub wrong_captions: usize,
    pub overlays: usize,
    #[serde(rename = "unsafe")]
    pub unsafe_markers: usize,
    /// Mean rubric score (`rating_quality`).
    pub mean_quality: f64,
    /// Mean preference score (`rating_preference`).
    pub mean_preference: f64,
    #[serde(rename = "share_quality_above_0.7")]
    pub share_needles: f64,
}

impl HaystackSummary {
    pub fn of(p: &HaystackParams, specs: &[ImageSpec]) -> HaystackSummary {
        let n = specs.len();
        let mut per_concept = BTreeMap::new();
        for s in specs {
            *per_concept.entry(s.concept.name()).or_insert(0) += 1;
        }
        let count = |f: fn(&ImageSpec) -> bool| specs.iter().filter(|s| f(s)).count();
        HaystackSummary {
            images: n,
            size: p.size,
            seed: p.seed,
            per_concept,
            held_out: if p.hold_out {
                HELD_OUT.iter().map(Concept::name).collect()
            } else {
                Vec::new()
            },
            wrong_captions: count(|s| !s.caption_correct()),
            overlays: count(|s| s.overlay),
            unsafe_markers: count(|s| s.unsafe_marker),
            mean_quality: round4(specs.iter().map(|s| s.quality).sum::<f64>() / n as f64),
            mean_preference: round4(specs.iter().map(|s| s.preference).sum::<f64>() / n as f64),
            share_needles: round4(count(|s| s.quality > NEEDLE_QUALITY) as f64 / n as f64),
        }
    }
}

/// Write the haystack of `p` into `out` (a dataset plus `haystack.json`) on `threads` threads.
pub fn generate(
    p: &HaystackParams,
    out: &std::path::Path,
    threads: usize,
) -> Result<HaystackSummary, OpError> {
    p.check()?;
    let specs: Vec<ImageSpec> = (0..p.images).map(|i| sample_spec(p, i)).collect();
    let writer = DatasetWriter::create(out)?;
    let digits = (p.images - 1).to_string().len().max(6);
    let next = AtomicUsize::new(0);
    const BATCH: usize = 64;
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                scope.spawn(|| -> Result<(), OpError> {
                    loop {
                        let start = next.fetch_add(BATCH, Ordering::Relaxed);
                        if start >= specs.len() {
                            return Ok(());
                        }
                        for spec in &specs[start..(start + BATCH).min(specs.len())] {
                            let img = render(spec, p.size);
                            let stem = format!("{:0digits$}", spec.index);
                            writer.add_png(&stem, &img, &spec.caption(), spec.ratings())?;
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("a haystack thread panicked"))
    })?;
    writer.finish()?;
    let summary = HaystackSummary::of(p, &specs);
    let path = out.join("haystack.json");
    let mut text = serde_json::to_string_pretty(&summary).expect("summary serialises");
    text.push('\n');
    std::fs::write(&path, text).map_err(OpError::io("write", &path))?;
    let md = format!(
        "{} images of {}×{} (seed {}): mean rubric score {:.3}, {:.1}% above {NEEDLE_QUALITY}; \
         mean preference score {:.3}; {} wrong captions, {} text overlays, {} unsafe markers; \
         held out: {}.\n",
        summary.images,
        summary.size,
        summary.size,
        summary.seed,
        summary.mean_quality,
        100.0 * summary.share_needles,
        summary.mean_preference,
        summary.wrong_captions,
        summary.overlays,
        summary.unsafe_markers,
        if summary.held_out.is_empty() {
            "none".to_string()
        } else {
            summary.held_out.join(", ")
        },
    );
    let path = out.join(crate::SUMMARY);
    std::fs::write(&path, md).map_err(OpError::io("write", &path))?;
    Ok(summary)
}

impl Op for Haystack {
    fn schema(&self) -> OpSchema {
        let spec = |name, ty, default: Value, doc| ParamSpec {
            name,
            ty,
            default: Some(default),
            doc,
        };
        OpSchema {
            name: "haystack",
            version: 3,
            summary: "procedural captioned images with hidden quality ratings: the pre-training \
                      haystack and its photogenic needles",
            kind: OpKind::Builtin,
            params: ParamsSchema::Fixed(vec![
                spec("images", ParamType::Int, json!(20_000), "number of images"),
                spec("size", ParamType::Int, json!(16), "pixels a side, 8..=64"),
                spec(
                    "seed",
                    ParamType::Int,
                    json!(0),
                    "seeds every image: the same seed gives the same bytes",
                ),
                spec(
                    "wrong_captions",
                    ParamType::Float,
                    json!(0.30),
                    "share of captions naming a wrong shape and/or colour",
                ),
                spec(
                    "overlay",
                    ParamType::Float,
                    json!(0.08),
                    "share of images with a text-like overlay band",
                ),
                spec(
                    "unsafe",
                    ParamType::Float,
                    json!(0.02),
                    "share of images with an \"unsafe\" marker",
                ),
                spec(
                    "hold_out",
                    ParamType::Bool,
                    json!(true),
                    "no image shows, no caption names the 4 held-out concepts (e.g. \"a small red star\")",
                ),
            ]),
            inputs: InputsSchema::Fixed(vec![]),
        }
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError> {
        let p = HaystackParams::from_ctx(ctx)?;
        generate(&p, &ctx.out, ctx.cpus.max(1) as usize)?;
        Ok(())
    }
}
