//! Image datasets on disk, in the image-folder convention other tools read too (HuggingFace
//! `datasets`' `imagefolder`, a plain `jq`):
//!
//! ```text
//! <dir>/metadata.jsonl     one JSON object a line: `file_name`, `text`, further columns
//! <dir>/images/000042.png  the images, RGB PNG, paths relative to <dir>
//! ```
//!
//! Every dataset op reads and writes this one format: the haystack, an ingested folder, a
//! filtered subset (whose images are hard links to its source's, so a subset adds no image
//! bytes to the store), the samples a model draws.
//!
//! **Hidden ratings.** Columns whose names start with `rating_` hold the ground truth of a
//! simulation (an image's latent quality, whether its caption is right). Only the simulated
//! humans — the curators of the filter op and the judges of the evaluation — may read them,
//! through [`Dataset::ratings`]. Everything standing in for a machine (automatic filters,
//! models) sees pixels, `text` and the [`Dataset::columns`] that are observable.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use image::RgbImage;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::errors::OpError;

/// The metadata file of a dataset.
pub const METADATA: &str = "metadata.jsonl";
/// Where [`DatasetWriter::add_png`] puts images, relative to the dataset's root.
pub const IMAGES_DIR: &str = "images";
/// Columns starting with this are hidden ratings: see the module docs.
pub const RATING_PREFIX: &str = "rating_";

/// One line of `metadata.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The image's path relative to the dataset's root, `/`-separated, never leaving the root.
    pub file_name: String,
    /// The caption.
    pub text: String,
    /// Every further column, hidden `rating_*` ones included.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A dataset opened for reading. Its records are checked once, at [`Dataset::open`]: each
/// `file_name` is a relative path inside the root, and no two records share one.
#[derive(Debug, Clone)]
pub struct Dataset {
    root: PathBuf,
    records: Vec<Record>,
}

/// Every image of a dataset decoded into one buffer: `n × height × width × 3` bytes, RGB,
/// rows top to bottom, in the records' order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pixels {
    pub n: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<u8>,
}

impl Pixels {
    /// The bytes of image `i` (`height × width × 3`).
    pub fn image(&self, i: usize) -> &[u8] {
        let len = self.height * self.width * 3;
        &self.data[i * len..(i + 1) * len]
    }
}

impl Dataset {
    /// Open the dataset in `dir`: read and check `metadata.jsonl`. Images are not touched
    /// until [`Dataset::load_pixels`]. A malformed line fails with its line number
    /// (`metadata.jsonl:12: missing field `text``); blank lines are allowed.
    pub fn open(dir: impl AsRef<Path>) -> Result<Dataset, OpError> {
        let root = dir.as_ref().to_path_buf();
        let path = root.join(METADATA);
        let text = fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                dataset_error(&root, format!("no `{METADATA}`: is this a dataset?"))
            } else {
                OpError::io("read", &path)(e)
            }
        })?;
        let mut records = Vec::new();
        let mut seen = HashSet::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = |why: String| dataset_error(&root, format!("{METADATA}:{}: {why}", i + 1));
            let record: Record = serde_json::from_str(line).map_err(|e| at(e.to_string()))?;
            check_file_name(&record.file_name).map_err(at)?;
            if !seen.insert(record.file_name.clone()) {
                return Err(at(format!("`{}` is listed twice", record.file_name)));
            }
            records.push(record);
        }
        Ok(Dataset { root, records })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// The records at `indices`, in that order, over the same images: a view, nothing is copied
    /// (a scorer's training sample, a judge's).
    pub fn select(&self, indices: &[usize]) -> Dataset {
        Dataset {
            root: self.root.clone(),
            records: indices.iter().map(|&i| self.records[i].clone()).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Where `rec`'s image is on disk.
    pub fn image_path(&self, rec: &Record) -> PathBuf {
        self.root.join(&rec.file_name)
    }

    /// The observable columns: `file_name`, `text`, then every other column some record has,
    /// sorted, without the hidden `rating_*` ones.
    pub fn columns(&self) -> Vec<String> {
        let extra: BTreeSet<&String> = self
            .records
            .iter()
            .flat_map(|r| r.extra.keys())
            .filter(|k| !k.starts_with(RATING_PREFIX))
            .collect();
        ["file_name", "text"]
            .into_iter()
            .map(String::from)
            .chain(extra.into_iter().cloned())
            .collect()
    }

    /// The hidden column `rating_<name>`, one value per record in the records' order; a bool
    /// reads as 0 or 1.
    ///
    /// **Who may call this:** only the simulated humans — the filter op's human-curation
    /// stages and the evaluation's judges. An automatic filter or a model that read a rating
    /// would see the answer the pipeline is meant to find from pixels and captions, and every
    /// result downstream of it would be meaningless.
    pub fn ratings(&self, name: &str) -> Result<Vec<f64>, OpError> {
        let column = format!("{RATING_PREFIX}{name}");
        self.records
            .iter()
            .map(|r| match r.extra.get(&column) {
                Some(Value::Bool(b)) => Ok(f64::from(u8::from(*b))),
                Some(Value::Number(n)) => Ok(n.as_f64().unwrap_or(f64::NAN)),
                Some(other) => Err(dataset_error(
                    &self.root,
                    format!(
                        "`{column}` of `{}` is {other}, not a number or a bool",
                        r.file_name
                    ),
                )),
                None => Err(dataset_error(
                    &self.root,
                    format!("`{}` has no `{column}`", r.file_name),
                )),
            })
            .collect()
    }

    /// Decode every image into one buffer, on `threads` threads (at least one). All images
    /// must be the same size; the error names the first one (in the records' order) that is
    /// not the size of the first, or the first that cannot be read.
    pub fn load_pixels(&self, threads: usize) -> Result<Pixels, OpError> {
        let Some(first) = self.records.first() else {
            return Ok(Pixels {
                n: 0,
                height: 0,
                width: 0,
                data: Vec::new(),
            });
        };
        let first = self.decode(first)?;
        let (width, height) = (first.width() as usize, first.height() as usize);
        let len = width * height * 3;
        let n = self.records.len();
        let mut data = vec![0u8; n * len];
        let per_thread = n.div_ceil(threads.max(1));
        // Each thread fills its own slice; a failure reports its index so the first one in
        // the records' order wins, whichever thread found it first.
        let failures: Vec<(usize, OpError)> = std::thread::scope(|s| {
            let handles: Vec<_> = data
                .chunks_mut(per_thread * len)
                .zip(self.records.chunks(per_thread))
                .enumerate()
                .map(|(t, (out, recs))| {
                    s.spawn(move || -> Result<(), (usize, OpError)> {
                        for (j, (rec, dst)) in recs.iter().zip(out.chunks_mut(len)).enumerate() {
                            let index = t * per_thread + j;
                            let img = self.decode(rec).map_err(|e| (index, e))?;
                            if (img.width() as usize, img.height() as usize) != (width, height) {
                                let why = format!(
                                    "`{}` is {}×{}, but `{}` (the first image) is {width}×{height}; \
                                     every image of a dataset must be the same size",
                                    rec.file_name,
                                    img.width(),
                                    img.height(),
                                    self.records[0].file_name,
                                );
                                return Err((index, dataset_error(&self.root, why)));
                            }
                            dst.copy_from_slice(img.as_raw());
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .filter_map(|h| h.join().expect("a decoding thread panicked").err())
                .collect()
        });
        if let Some((_, err)) = failures.into_iter().min_by_key(|(i, _)| *i) {
            return Err(err);
        }
        Ok(Pixels {
            n,
            height,
            width,
            data,
        })
    }

    fn decode(&self, rec: &Record) -> Result<RgbImage, OpError> {
        let path = self.image_path(rec);
        let bytes = fs::read(&path).map_err(OpError::io("read", &path))?;
        let img = image::load_from_memory(&bytes).map_err(|e| {
            dataset_error(
                &self.root,
                format!("cannot decode `{}`: {e}", rec.file_name),
            )
        })?;
        Ok(img.into_rgb8())
    }
}

/// Writes a dataset into a directory. Images are written as they are added; `metadata.jsonl`
/// only by [`DatasetWriter::finish`], atomically, so a writer that fails or is dropped midway
/// leaves no dataset, only loose images.
///
/// The writer may be shared between threads (`&self` methods). Its output depends only on
/// what was added, never on the order or the thread: `metadata.jsonl` lists records sorted by
/// `file_name`, each line with `file_name`, `text`, then the other columns sorted by name;
/// PNGs are encoded with fixed settings. Same inputs, identical bytes.
pub struct DatasetWriter {
    root: PathBuf,
    state: Mutex<WriterState>,
}

#[derive(Default)]
struct WriterState {
    records: BTreeMap<String, Record>,
    dirs: HashSet<PathBuf>,
}

impl DatasetWriter {
    /// Start a dataset in `out_dir` (created if missing). Fails if it already holds one.
    pub fn create(out_dir: impl AsRef<Path>) -> Result<DatasetWriter, OpError> {
        let root = out_dir.as_ref().to_path_buf();
        let images = root.join(IMAGES_DIR);
        fs::create_dir_all(&images).map_err(OpError::io("create", &images))?;
        if root.join(METADATA).exists() {
            return Err(dataset_error(&root, "already holds a dataset".into()));
        }
        let mut state = WriterState::default();
        state.dirs.insert(images);
        Ok(DatasetWriter {
            root,
            state: Mutex::new(state),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Encode `img` as `images/<stem>.png` and add its record. `stem` is a plain file name
    /// (no separators, not `.`/`..`, not hidden); a `file_name` already added is refused.
    /// `extra` may not hold `file_name` or `text`.
    pub fn add_png(
        &self,
        stem: &str,
        img: &RgbImage,
        text: &str,
        extra: Map<String, Value>,
    ) -> Result<(), OpError> {
        if stem.is_empty() || stem.starts_with('.') || stem.contains(['/', '\\', '\0']) {
            return Err(dataset_error(
                &self.root,
                format!("`{stem}` is not a plain file stem (no path separators, not hidden)"),
            ));
        }
        let file_name = format!("{IMAGES_DIR}/{stem}.png");
        let record = new_record(&self.root, file_name, text.to_string(), extra)?;
        self.reserve(&record.file_name)?;
        let path = self.root.join(&record.file_name);
        let write = encode_png(img).and_then(|png| fs::write(&path, png));
        if let Err(e) = write {
            self.release(&record.file_name);
            return Err(OpError::io("write", &path)(e));
        }
        self.commit(record);
        Ok(())
    }

    /// Add `rec` of `from` to this dataset under the same `file_name`, its image hard-linked
    /// (copied where a link cannot be made, e.g. across filesystems), so a subset adds no
    /// image bytes. The new record has `rec`'s columns with `extra_overrides` laid over them;
    /// an override of `text` replaces the caption, `file_name` cannot be overridden.
    pub fn add_linked(
        &self,
        from: &Dataset,
        rec: &Record,
        extra_overrides: Map<String, Value>,
    ) -> Result<(), OpError> {
        let mut text = rec.text.clone();
        let mut extra = rec.extra.clone();
        for (k, v) in extra_overrides {
            if k == "text" {
                text = match v {
                    Value::String(s) => s,
                    other => {
                        return Err(dataset_error(
                            &self.root,
                            format!("`text` override `{other}` is not a string"),
                        ));
                    }
                };
            } else {
                extra.insert(k, v);
            }
        }
        let record = new_record(&self.root, rec.file_name.clone(), text, extra)?;
        check_file_name(&record.file_name).map_err(|why| dataset_error(&self.root, why))?;
        self.reserve(&record.file_name)?;
        let src = from.image_path(rec);
        let dst = self.root.join(&record.file_name);
        if let Err(e) = self
            .ensure_parent(&dst)
            .and_then(|()| link_or_copy(&src, &dst))
        {
            self.release(&record.file_name);
            return Err(OpError::io("link or copy", &src)(e));
        }
        self.commit(record);
        Ok(())
    }

    /// Write `metadata.jsonl` (to a temporary file, synced, then renamed into place) and
    /// return the number of records.
    pub fn finish(self) -> Result<usize, OpError> {
        let state = self.state.into_inner().expect("dataset writer poisoned");
        let mut out = String::new();
        for record in state.records.values() {
            out.push_str(&record_line(record));
            out.push('\n');
        }
        let tmp = self.root.join(format!(".{METADATA}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(out.as_bytes())?;
            f.sync_all()
        };
        write().map_err(OpError::io("write", &tmp))?;
        let path = self.root.join(METADATA);
        fs::rename(&tmp, &path).map_err(OpError::io("rename into", &path))?;
        Ok(state.records.len())
    }

    /// Claim `file_name`, with a placeholder that keeps another thread from taking it while
    /// the image is written; `commit` replaces it with the real record, `release` drops it.
    fn reserve(&self, file_name: &str) -> Result<(), OpError> {
        let mut state = self.state.lock().expect("dataset writer poisoned");
        match state.records.entry(file_name.to_string()) {
            std::collections::btree_map::Entry::Occupied(_) => Err(dataset_error(
                &self.root,
                format!("`{file_name}` was already added"),
            )),
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(Record {
                    file_name: file_name.to_string(),
                    text: String::new(),
                    extra: Map::new(),
                });
                Ok(())
            }
        }
    }

    fn release(&self, file_name: &str) {
        self.state
            .lock()
            .expect("dataset writer poisoned")
            .records
            .remove(file_name);
    }

    fn commit(&self, record: Record) {
        self.state
            .lock()
            .expect("dataset writer poisoned")
            .records
            .insert(record.file_name.clone(), record);
    }

    fn ensure_parent(&self, path: &Path) -> std::io::Result<()> {
        let parent = path.parent().expect("a file under the root has a parent");
        let mut state = self.state.lock().expect("dataset writer poisoned");
        if !state.dirs.contains(parent) {
            fs::create_dir_all(parent)?;
            state.dirs.insert(parent.to_path_buf());
        }
        Ok(())
    }
}

/// Encode `img` as PNG with the settings every dataset uses (fixed, so equal pixels give
/// equal bytes). `Fast` (fdeflate) rather than zlib's default level: at 16×16 it is ~6× faster
/// (8 µs against 50 µs an image) for files ~12 % larger, and encoding is what dominates writing a
/// haystack.
pub fn encode_png(img: &RgbImage) -> std::io::Result<Vec<u8>> {
    use image::ImageEncoder;
    let mut png = Vec::with_capacity(img.as_raw().len() / 2 + 128);
    PngEncoder::new_with_quality(&mut png, CompressionType::Fast, FilterType::Adaptive)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgb8,
        )
        .map_err(std::io::Error::other)?;
    Ok(png)
}

/// One `metadata.jsonl` line: `file_name`, `text`, then the other columns sorted by name
/// (independent of whether serde_json's maps keep insertion order in this build).
fn record_line(record: &Record) -> String {
    let json = |v: &Value| serde_json::to_string(v).expect("JSON values serialise");
    let mut line = format!(
        "{{\"file_name\":{},\"text\":{}",
        json(&Value::String(record.file_name.clone())),
        json(&Value::String(record.text.clone()))
    );
    let mut keys: Vec<&String> = record.extra.keys().collect();
    keys.sort();
    for k in keys {
        line.push_str(&format!(
            ",{}:{}",
            json(&Value::String(k.clone())),
            json(&record.extra[k])
        ));
    }
    line.push('}');
    line
}

fn new_record(
    root: &Path,
    file_name: String,
    text: String,
    extra: Map<String, Value>,
) -> Result<Record, OpError> {
    if let Some(k) = ["file_name", "text"]
        .iter()
        .find(|k| extra.contains_key(**k))
    {
        return Err(dataset_error(
            root,
            format!("`{k}` is not an extra column: it is set by the writer"),
        ));
    }
    Ok(Record {
        file_name,
        text,
        extra,
    })
}

/// Whether `name` can be a `file_name`: a relative, `/`-separated path that stays inside the
/// dataset (no `..`, no root, no backslashes).
pub(crate) fn is_inside(name: &str) -> bool {
    !name.is_empty()
        && !name.contains('\\')
        && Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

fn check_file_name(name: &str) -> Result<(), String> {
    if is_inside(name) {
        Ok(())
    } else {
        Err(format!(
            "`file_name` `{name}` is not a relative path inside the dataset"
        ))
    }
}

fn link_or_copy(src: &Path, dst: &Path) -> std::io::Result<()> {
    match fs::hard_link(src, dst) {
        Ok(()) => Ok(()),
        // Across filesystems, or where links are not allowed: a copy is the same dataset.
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => fs::copy(src, dst).map(|_| ()),
        Err(e) => Err(e),
    }
}

fn dataset_error(root: &Path, why: String) -> OpError {
    OpError::Dataset {
        path: root.to_path_buf(),
        why,
    }
}
