//! After an attempt: did the step write into its inputs? (See `core/src/store/guard.rs` for
//! how the store tells.) A step that did fails, whatever its exit status, with a reason naming
//! what it changed; the store is repaired before anything else reads those inputs.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use needle_core::digest::ArtifactDigest;
use needle_core::store::{
    AttemptResult, Store, ViewCheck, ViewDamage, ViewDamageKind, ViewRepair, now_millis,
};

use crate::executor::{AttemptSpec, InputArtifacts};

/// Entries looked at in place, on the runtime's thread; inputs larger than this are checked on
/// a blocking thread (a 20,000-file input takes tens of milliseconds to `lstat`).
const INLINE_BUDGET: usize = 256;

/// `result` as it stands, or [`AttemptResult::WroteOutside`] when the step changed its inputs.
/// `started`: when the attempt began (ms since the epoch), to tell the step's damage from
/// damage it found.
pub async fn after_attempt(
    store: &Arc<Store>,
    spec: &AttemptSpec,
    started: u64,
    result: AttemptResult,
) -> AttemptResult {
    // Both are looked at: a changed gather must not keep a damaged member from being repaired.
    let gather = changed_gather(store, spec, started);
    let result = after_views(store, spec, started, result).await;
    match (gather, result) {
        (None, result) => result,
        (Some(gather), AttemptResult::WroteOutside { what }) => AttemptResult::WroteOutside {
            what: format!("{what}; {gather}"),
        },
        (Some(gather), _) => AttemptResult::WroteOutside { what: gather },
    }
}

/// [`after_attempt`] for the input views alone.
async fn after_views(
    store: &Arc<Store>,
    spec: &AttemptSpec,
    started: u64,
    result: AttemptResult,
) -> AttemptResult {
    let labels = input_labels(spec);
    if labels.is_empty() {
        return result;
    }
    let artifacts: Vec<ArtifactDigest> = labels.keys().copied().collect();
    let checked = match store.check_views(&artifacts, INLINE_BUDGET) {
        Ok(ViewCheck::OverBudget) => {
            let store = store.clone();
            let t0 = std::time::Instant::now();
            let checked =
                tokio::task::spawn_blocking(move || store.check_views(&artifacts, usize::MAX))
                    .await
                    .expect("the input check does not panic");
            tracing::debug!(
                ms = t0.elapsed().as_secs_f64() * 1e3,
                step = spec.step_name,
                "input views checked"
            );
            checked
        }
        other => other,
    };
    let damage = match checked {
        Ok(ViewCheck::Damaged(damage)) => damage,
        Ok(_) => return result,
        Err(e) => {
            return AttemptResult::OutputError {
                error: format!("its inputs could not be checked after it ran: {e}"),
            };
        }
    };
    let store = store.clone();
    let to_repair = damage.clone();
    let repaired = tokio::task::spawn_blocking(move || store.repair_views(&to_repair))
        .await
        .expect("the repair does not panic");
    // ViewDamage written before the attempt began was not this step's doing (another writer of
    // the store); it still fails, having read those bytes, but the reason says so.
    let started = std::time::UNIX_EPOCH + std::time::Duration::from_millis(started);
    let before = damage.iter().all(|d| d.at.is_some_and(|at| at < started));
    let what = describe(&damage, &labels, repaired, !before);
    if before {
        return AttemptResult::OutputError {
            error: format!("its inputs were damaged before it started, not by it: {what}"),
        };
    }
    AttemptResult::WroteOutside { what }
}

/// What the step did to a gather directory it read (added, removed or renamed an entry, or
/// rewrote the index), having removed it so that it is made again; `None` if nothing.
///
/// A gather is shared by the steps reading the same members, and which of two steps reading it
/// at once changed it cannot be told: then each one's reason names the other. A gather that the
/// check of a step beside this one removed while this one ran (it may have been made again
/// since, intact) was changed under this step too.
fn changed_gather(store: &Store, spec: &AttemptSpec, started: u64) -> Option<String> {
    for (name, input) in &spec.inputs {
        let InputArtifacts::Gather(members) = input else {
            continue;
        };
        let dir = store.gather_path(members);
        let mut log = gathers();
        if let Some((_, _, by)) = log
            .removed
            .get(&dir)
            .filter(|(at, node, _)| *at >= started && *node != spec.node)
        {
            return Some(format!(
                "its input `{name}`, the directory of its gathered members, was found changed \
                 while it ran, by the check of `{by}`, which read it too: either may have \
                 changed it (inputs are read-only, though not to root); it was removed, and is \
                 made again when next needed"
            ));
        }
        if store.gather_intact(&dir) {
            continue;
        }
        let removed = match store.remove_gather(&dir) {
            Ok(()) => "it was removed, and is made again when next needed".to_string(),
            Err(e) => format!("removing it failed ({e}); remove `{}`", dir.display()),
        };
        log.removed.insert(
            dir.clone(),
            (now_millis(), spec.node, spec.step_name.clone()),
        );
        let beside: Vec<String> = log
            .readers
            .get(&dir)
            .into_iter()
            .flatten()
            .filter(|(node, _)| **node != spec.node)
            .map(|(_, step)| format!("`{step}`"))
            .collect();
        if beside.is_empty() {
            return Some(format!(
                "it changed its input `{name}`, the directory of its gathered members (inputs \
                 are read-only, though not to root); {removed}"
            ));
        }
        return Some(format!(
            "its input `{name}`, the directory of its gathered members, changed while it ran \
             and {} read it too: either may have changed it (inputs are read-only, though not \
             to root); {removed}",
            beside.join(", ")
        ));
    }
    None
}

/// The gather directories that running attempts read (by node, with the step's name), and
/// those a check removed: what [`changed_gather`] needs to know of the attempts beside one.
#[derive(Default)]
struct Gathers {
    readers: HashMap<PathBuf, BTreeMap<usize, String>>,
    /// When, and after which step's attempt (node, name).
    removed: HashMap<PathBuf, (u64, usize, String)>,
}

fn gathers() -> MutexGuard<'static, Gathers> {
    static GATHERS: OnceLock<Mutex<Gathers>> = OnceLock::new();
    GATHERS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// The attempt `spec` is about to read the gather directory `dir`.
pub fn reading_gather(spec: &AttemptSpec, dir: &Path) {
    gathers()
        .readers
        .entry(dir.to_path_buf())
        .or_default()
        .insert(spec.node, spec.step_name.clone());
}

/// The attempt `spec` has ended and been checked: it reads its gathers no more.
pub fn done_reading_gathers(spec: &AttemptSpec) {
    let mut log = gathers();
    log.readers.retain(|_, readers| {
        readers.remove(&spec.node);
        !readers.is_empty()
    });
}

/// Each input artifact and how the step knows it: `data`, or `runs[arch=a]` for a gather member.
fn input_labels(spec: &AttemptSpec) -> BTreeMap<ArtifactDigest, String> {
    let mut labels = BTreeMap::new();
    for (name, input) in &spec.inputs {
        match input {
            InputArtifacts::One(a) => {
                labels.entry(*a).or_insert_with(|| name.clone());
            }
            InputArtifacts::Gather(members) => {
                for (label, a) in members {
                    labels
                        .entry(*a)
                        .or_insert_with(|| format!("{name}[{label}]"));
                }
            }
        }
    }
    labels
}

/// What the step did and what became of the store, in a sentence or two: "it changed `v` and
/// added `new` in its input `up` (…); …".
fn describe(
    damage: &[ViewDamage],
    labels: &BTreeMap<ArtifactDigest, String>,
    repaired: Result<ViewRepair, needle_core::store::StoreError>,
    by_step: bool,
) -> String {
    const SHOWN: usize = 4;
    // Per input, each path once, changed files first: they are the news.
    let mut per_input: BTreeMap<&str, Vec<(u8, &'static str, &str)>> = BTreeMap::new();
    for d in damage {
        let input = labels.get(&d.artifact).map(String::as_str).unwrap_or("?");
        let (rank, verb) = match d.kind {
            ViewDamageKind::Changed { .. } => (0, "changed"),
            ViewDamageKind::Replaced => (1, "replaced"),
            ViewDamageKind::Removed => (2, "removed"),
            ViewDamageKind::Added => (3, "added"),
        };
        let items = per_input.entry(input).or_default();
        if !items.iter().any(|(_, _, p)| *p == d.path) {
            items.push((rank, verb, &d.path));
        }
    }
    let mut parts = Vec::new();
    let mut hidden = 0;
    for (input, mut items) in per_input {
        items.sort();
        hidden += items.len().saturating_sub(SHOWN);
        items.truncate(SHOWN);
        let mut said: Vec<String> = Vec::new();
        let mut last_verb = "";
        for (_, verb, path) in items {
            if verb == last_verb {
                said.push(format!("`{path}`"));
            } else {
                said.push(format!("{verb} `{path}`"));
                last_verb = verb;
            }
        }
        let said = match said.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
            None => continue,
        };
        parts.push(format!("{said} in its input `{input}`"));
    }
    let mut what = parts.join("; ");
    if hidden > 0 {
        what.push_str(&format!(" (and {hidden} more)"));
    }
    what = if by_step {
        format!(
            "it {what} (inputs are read-only, though not to root: copy a file before changing it)"
        )
    } else {
        format!("something had {what}")
    };
    match repaired {
        Ok(r) if !r.blobs.is_empty() => {
            let artifacts = match r.artifacts.len() {
                1 => "the artifact holding it".to_string(),
                n => format!("the {n} artifacts holding it"),
            };
            let steps = match r.steps.len() {
                0 => String::new(),
                _ => {
                    let names: Vec<String> = r.steps.iter().map(|s| format!("`{s}`")).collect();
                    format!(
                        " and the record of {}, which the next run runs again",
                        names.join(", ")
                    )
                }
            };
            what.push_str(&format!(
                "; that changed the store's only copy of those bytes, so the blob was dropped, \
                 with {artifacts}{steps}"
            ));
        }
        Ok(_) => what.push_str(
            "; the store's bytes are intact: the input's view was removed, and is rebuilt when \
             next needed",
        ),
        Err(e) => what.push_str(&format!(
            "; repairing the store failed ({e}): run `needle verify --hash`"
        )),
    }
    what
}
