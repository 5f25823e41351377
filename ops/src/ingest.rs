//! `ingest`: import a folder of real images as a dataset, resized to `size`×`size`.
//!
//! Two source layouts, told apart by whether `metadata.jsonl` is there:
//! - an image-folder dataset: `metadata.jsonl` with `file_name` and `text`; other columns are
//!   carried over as they are (`rating_*` ones too: ingesting a haystack keeps its ratings);
//! - a tree of images (png, jpg, jpeg, webp, gif, bmp; hidden files and folders ignored), each
//!   captioned by a `.txt` of the same stem beside it.
//!
//! Real folders hold broken files: an image that cannot be read (truncated, empty, not an
//! image), one without a caption, a caption that is not UTF-8 (UTF-16, Latin-1) or is empty,
//! a malformed metadata line. Each is skipped and listed in `ingest.json` with its reason; the
//! step fails only when nothing at all could be imported.
//!
//! Each record gets a `source` column, the image's path in the source folder. Output images
//! are named by their position in the source listing (sorted by path, or the
//! metadata's order), so the same folder gives the same bytes however many threads run.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use image::imageops::{self, FilterType};
use image::{DynamicImage, ImageReader, RgbImage};
use needle_core::ops::{InputsSchema, OpKind, OpSchema, ParamSpec, ParamType, ParamsSchema};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::context::OpContext;
use crate::dataset::{DatasetWriter, METADATA, is_inside};
use crate::errors::OpError;
use crate::haystack::check_size;
use crate::op::Op;

/// File extensions read as images (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "webp", "gif", "bmp"];

pub struct Ingest;

/// How an image that is not square becomes `size`×`size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fit {
    /// Cut the centred square, then resize.
    Crop,
    /// Resize the long side to `size`, centre it on black.
    Pad,
    /// Resize each side to `size`, distorting.
    Stretch,
}

impl Fit {
    const NAMES: &'static [&'static str] = &["crop", "pad", "stretch"];

    fn parse(name: &str) -> Result<Fit, OpError> {
        match name {
            "crop" => Ok(Fit::Crop),
            "pad" => Ok(Fit::Pad),
            "stretch" => Ok(Fit::Stretch),
            other => Err(OpError::Param {
                name: "fit".into(),
                why: format!("`{other}` is not one of \"crop\", \"pad\", \"stretch\""),
            }),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// `metadata.jsonl` and the images it lists.
    ImageFolder,
    /// Images with `.txt` caption sidecars.
    Sidecar,
}

/// Why a source file was not imported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipKind {
    EmptyFile,
    UnreadableImage,
    MissingImage,
    NoCaption,
    CaptionNotUtf8,
    EmptyCaption,
    BadMetadataLine,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// The file's path relative to the source folder (`metadata.jsonl:N` for a bad line).
    pub file: String,
    pub kind: SkipKind,
    pub reason: String,
}

/// What `ingest.json` says.
#[derive(Debug, Clone, Serialize)]
pub struct IngestSummary {
    pub layout: Layout,
    /// Candidates found: images in a sidecar tree, lines of `metadata.jsonl`.
    pub found: usize,
    pub imported: usize,
    pub skipped: usize,
    pub skipped_by_kind: BTreeMap<SkipKind, usize>,
    pub skipped_files: Vec<Skipped>,
}

/// One image to import: where it is, and its caption and extra columns or why it has none.
struct Candidate {
    rel: String,
    image: PathBuf,
    caption: Result<(String, Map<String, Value>), Skipped>,
}

/// Import `source` into a dataset in `out`, images `size`×`size`, on `threads` threads.
pub fn ingest(
    source: &Path,
    size: u32,
    fit: Fit,
    out: &Path,
    threads: usize,
) -> Result<IngestSummary, OpError> {
    check_size(size)?;
    if !source.is_dir() {
        return Err(OpError::Param {
            name: "path".into(),
            why: format!("`{}` is not a directory", source.display()),
        });
    }
    let (layout, candidates, mut skipped) = if source.join(METADATA).is_file() {
        let (c, s) = image_folder(source)?;
        (Layout::ImageFolder, c, s)
    } else {
        (Layout::Sidecar, sidecar(source)?, Vec::new())
    };
    let found = candidates.len() + skipped.len();

    let writer = DatasetWriter::create(out)?;
    let digits = candidates.len().saturating_sub(1).to_string().len().max(6);
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                scope.spawn(|| -> Result<(), OpError> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(c) = candidates.get(i) else {
                            return Ok(());
                        };
                        let skip = |kind, reason: String| Skipped {
                            file: c.rel.clone(),
                            kind,
                            reason,
                        };
                        let imported = match &c.caption {
                            Err(s) => Err(s.clone()),
                            Ok((text, extra)) => load(&c.image, size, fit)
                                .map_err(|(kind, why)| skip(kind, why))
                                .map(|img| (img, text, extra)),
                        };
                        match imported {
                            Ok((img, text, extra)) => {
                                let mut extra = extra.clone();
                                extra.insert("source".into(), Value::String(c.rel.clone()));
                                let stem = format!("{i:0digits$}");
                                writer.add_png(&stem, &img, text, extra)?;
                            }
                            Err(s) => failures.lock().expect("skip list poisoned").push((i, s)),
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("an ingest thread panicked"))
    })?;
    let mut failures = failures.into_inner().expect("skip list poisoned");
    failures.sort_by_key(|(i, _)| *i);
    skipped.extend(failures.into_iter().map(|(_, s)| s));

    let imported = found - skipped.len();
    if imported == 0 {
        return Err(OpError::Failed(format!(
            "ingest: nothing under `{}` could be imported ({})",
            source.display(),
            if found == 0 {
                "no images found".to_string()
            } else {
                describe(&skipped)
            }
        )));
    }
    writer.finish()?;
    let mut skipped_by_kind = BTreeMap::new();
    for s in &skipped {
        *skipped_by_kind.entry(s.kind).or_insert(0) += 1;
    }
    Ok(IngestSummary {
        layout,
        found,
        imported,
        skipped: skipped.len(),
        skipped_by_kind,
        skipped_files: skipped,
    })
}

/// `"3 unreadable_image, 1 no_caption; first: a.png: …"`.
fn describe(skipped: &[Skipped]) -> String {
    let mut by_kind: BTreeMap<SkipKind, usize> = BTreeMap::new();
    for s in skipped {
        *by_kind.entry(s.kind).or_insert(0) += 1;
    }
    let counts: Vec<String> = by_kind
        .iter()
        .map(|(k, n)| format!("{n} {}", json!(k).as_str().unwrap_or("?")))
        .collect();
    let first = &skipped[0];
    format!(
        "{}; first: `{}`: {}",
        counts.join(", "),
        first.file,
        first.reason
    )
}

/// The candidates of an image-folder source, and its malformed lines.
fn image_folder(source: &Path) -> Result<(Vec<Candidate>, Vec<Skipped>), OpError> {
    let path = source.join(METADATA);
    let bytes = fs::read(&path).map_err(OpError::io("read", &path))?;
    let mut candidates = Vec::new();
    let mut bad = Vec::new();
    // Line by line, so one line in a foreign encoding spoils only itself.
    for (n, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let at = format!("{METADATA}:{}", n + 1);
        let bad_line = |why: String| Skipped {
            file: at.clone(),
            kind: SkipKind::BadMetadataLine,
            reason: why,
        };
        let Ok(line) = std::str::from_utf8(line) else {
            bad.push(bad_line("not valid UTF-8".into()));
            continue;
        };
        if line.trim().is_empty() {
            continue;
        }
        let mut columns = match serde_json::from_str::<Map<String, Value>>(line) {
            Ok(columns) => columns,
            Err(e) => {
                bad.push(bad_line(e.to_string()));
                continue;
            }
        };
        let rel = match columns.remove("file_name") {
            Some(Value::String(f)) if is_inside(&f) => f,
            Some(other) => {
                bad.push(bad_line(format!(
                    "`file_name` {other} is not a relative path inside the folder"
                )));
                continue;
            }
            None => {
                bad.push(bad_line("no `file_name`".into()));
                continue;
            }
        };
        let caption = match columns.remove("text") {
            Some(Value::String(t)) => clean_caption(&t)
                .map(|t| (t, columns))
                .ok_or(SkipKind::EmptyCaption),
            _ => Err(SkipKind::NoCaption),
        }
        .map_err(|kind| Skipped {
            file: rel.clone(),
            kind,
            reason: match kind {
                SkipKind::EmptyCaption => "its `text` is empty".into(),
                _ => format!("no `text` string on {at}"),
            },
        });
        candidates.push(Candidate {
            image: source.join(&rel),
            rel,
            caption,
        });
    }
    Ok((candidates, bad))
}

/// The images of a sidecar tree, in path order, with their captions read.
fn sidecar(source: &Path) -> Result<Vec<Candidate>, OpError> {
    let mut images = Vec::new();
    walk(source, &mut images)?;
    images.sort();
    Ok(images
        .into_iter()
        .map(|image| {
            let rel = relative(source, &image);
            let txt = image.with_extension("txt");
            let skip = |kind, reason: String| Skipped {
                file: rel.clone(),
                kind,
                reason,
            };
            let caption = match fs::read(&txt) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(skip(
                    SkipKind::NoCaption,
                    format!("no `{}` beside it", relative(source, &txt)),
                )),
                Err(e) => Err(skip(
                    SkipKind::NoCaption,
                    format!("cannot read caption: {e}"),
                )),
                Ok(bytes) => match String::from_utf8(bytes) {
                    Err(_) => Err(skip(
                        SkipKind::CaptionNotUtf8,
                        format!(
                            "`{}` is not valid UTF-8 (UTF-16? Latin-1?)",
                            relative(source, &txt)
                        ),
                    )),
                    Ok(text) => clean_caption(&text)
                        .map(|t| (t, Map::new()))
                        .ok_or_else(|| {
                            skip(
                                SkipKind::EmptyCaption,
                                format!("`{}` is empty", relative(source, &txt)),
                            )
                        }),
                },
            };
            Candidate {
                rel,
                image,
                caption,
            }
        })
        .collect())
}

/// Every image file under `dir`, not following links to folders, skipping hidden entries.
fn walk(dir: &Path, found: &mut Vec<PathBuf>) -> Result<(), OpError> {
    for entry in fs::read_dir(dir).map_err(OpError::io("list", dir))? {
        let entry = entry.map_err(OpError::io("list", dir))?;
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let ty = entry.file_type().map_err(OpError::io("inspect", &path))?;
        if ty.is_dir() {
            walk(&path, found)?;
        } else if is_image_name(&path) {
            found.push(path);
        }
    }
    Ok(())
}

fn is_image_name(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// A caption as stored: a UTF-8 byte-order mark dropped, whitespace trimmed, inner newlines
/// made spaces; `None` when nothing is left.
fn clean_caption(text: &str) -> Option<String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let words: Vec<&str> = text.split_whitespace().collect();
    (!words.is_empty()).then(|| words.join(" "))
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .replace('\\', "/")
}

/// Read, decode and fit one image, or say why it cannot be.
fn load(path: &Path, size: u32, fit: Fit) -> Result<RgbImage, (SkipKind, String)> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err((SkipKind::MissingImage, "the image file is missing".into()));
        }
        Err(e) => return Err((SkipKind::UnreadableImage, format!("cannot read: {e}"))),
    };
    if bytes.is_empty() {
        return Err((SkipKind::EmptyFile, "zero bytes".into()));
    }
    let img = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| (SkipKind::UnreadableImage, e.to_string()))?
        .decode()
        .map_err(|e| (SkipKind::UnreadableImage, e.to_string()))?;
    if img.width() == 0 || img.height() == 0 {
        return Err((SkipKind::UnreadableImage, "no pixels".into()));
    }
    Ok(fit_to(&flatten(img), size, fit))
}

/// RGB, with any transparency composited over white.
fn flatten(img: DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.into_rgb8();
    }
    let rgba = img.into_rgba8();
    let (w, h) = rgba.dimensions();
    let data = rgba
        .pixels()
        .flat_map(|p| {
            let a = u16::from(p[3]);
            [0, 1, 2].map(|c| ((u16::from(p[c]) * a + 255 * (255 - a) + 127) / 255) as u8)
        })
        .collect();
    RgbImage::from_raw(w, h, data).expect("buffer of the right size")
}

fn fit_to(img: &RgbImage, size: u32, fit: Fit) -> RgbImage {
    let (w, h) = img.dimensions();
    match fit {
        Fit::Stretch => resize(img, size, size),
        Fit::Crop => {
            let side = w.min(h);
            let square = imageops::crop_imm(img, (w - side) / 2, (h - side) / 2, side, side);
            resize(&square.to_image(), size, size)
        }
        Fit::Pad => {
            let (nw, nh) = if w >= h {
                (size, ((h as u64 * size as u64) / w as u64).max(1) as u32)
            } else {
                (((w as u64 * size as u64) / h as u64).max(1) as u32, size)
            };
            let inner = resize(img, nw, nh);
            let mut canvas = RgbImage::new(size, size);
            imageops::replace(
                &mut canvas,
                &inner,
                i64::from((size - nw) / 2),
                i64::from((size - nh) / 2),
            );
            canvas
        }
    }
}

/// Resize: box-averaging where the image shrinks by 2× or more (fast and alias-free for
/// photos far larger than the target), Catmull-Rom otherwise.
fn resize(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    if img.dimensions() == (w, h) {
        img.clone()
    } else if img.width() >= 2 * w && img.height() >= 2 * h {
        imageops::thumbnail(img, w, h)
    } else {
        imageops::resize(img, w, h, FilterType::CatmullRom)
    }
}

impl Op for Ingest {
    fn schema(&self) -> OpSchema {
        OpSchema {
            name: "ingest",
            version: 2,
            summary: "import a folder of real images (an image-folder dataset, or images with \
                      .txt captions) as a dataset",
            kind: OpKind::Builtin,
            params: ParamsSchema::Fixed(vec![
                ParamSpec {
                    name: "path",
                    // Its files' fingerprints enter the key: new or changed images re-ingest.
                    ty: ParamType::Path,
                    default: None,
                    doc: "the folder to import, relative to the recipe's directory or absolute",
                },
                ParamSpec {
                    name: "size",
                    ty: ParamType::Int,
                    default: Some(json!(16)),
                    doc: "pixels a side, 8..=64",
                },
                ParamSpec {
                    name: "fit",
                    ty: ParamType::Choice(Fit::NAMES),
                    default: Some(json!("crop")),
                    doc: "how a non-square image becomes square: centre crop, pad, or stretch",
                },
            ]),
            inputs: InputsSchema::Fixed(vec![]),
        }
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError> {
        let source = ctx.path_param("path")?;
        let size: u32 = ctx.param("size")?;
        let fit = Fit::parse(&ctx.param::<String>("fit")?)?;
        let summary = ingest(&source, size, fit, &ctx.out, ctx.cpus.max(1) as usize)?;
        let path = ctx.out.join("ingest.json");
        let mut text = serde_json::to_string_pretty(&summary).expect("summary serialises");
        text.push('\n');
        fs::write(&path, text).map_err(OpError::io("write", &path))?;
        let path = ctx.out.join(crate::SUMMARY);
        fs::write(&path, summary.markdown()).map_err(OpError::io("write", &path))?;
        Ok(())
    }
}

impl IngestSummary {
    /// What `needle show` prints: the counts, and the first skipped files with their reasons.
    pub fn markdown(&self) -> String {
        let mut md = format!(
            "Imported {} of {} images ({:?} layout); skipped {}.\n",
            self.imported, self.found, self.layout, self.skipped
        );
        for (kind, n) in &self.skipped_by_kind {
            md.push_str(&format!("- {kind:?}: {n}\n"));
        }
        for s in self.skipped_files.iter().take(10) {
            md.push_str(&format!("  - `{}`: {}\n", s.file, s.reason));
        }
        if self.skipped_files.len() > 10 {
            md.push_str(&format!(
                "  - … {} more in ingest.json\n",
                self.skipped_files.len() - 10
            ));
        }
        md
    }
}
