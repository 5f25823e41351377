//! After an attempt: did the step write into its inputs? (See `core/src/store/guard.rs` for
//! how the store tells.) A step that did fails, whatever its exit status, with a reason naming
//! what it changed; the store is repaired before anything else reads those inputs.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use needle_core::digest::ArtifactDigest;
use needle_core::store::{
    AttemptResult, InputDigests, Store, ViewCheck, ViewDamage, ViewDamageKind, ViewRepair,
    now_millis,
};

use crate::attempt::AttemptSpec;

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
///
/// A view is shared by the steps reading that artifact: when the check of one of them found it
/// changed (and removed it) while another ran, which of them changed it cannot be told, and
/// the other read a view that went away under it. Each one's reason then names the other.
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
    // Removed under this attempt by the check of another: not looked at again (gone, or made
    // again since), but said.
    let mut under = Vec::new();
    let mut artifacts = Vec::with_capacity(labels.len());
    {
        let log = shared();
        for (artifact, label) in &labels {
            match log.views.removed_under(artifact, spec, started) {
                Some(by) => under.push(found_by(&format!("its input `{label}`"), by)),
                None => artifacts.push(*artifact),
            }
        }
    }
    let beside_them = |result: AttemptResult| {
        if under.is_empty() {
            return result;
        }
        let said = format!(
            "{}; the view was removed, and is rebuilt when next needed",
            under.join("; ")
        );
        match result {
            AttemptResult::WroteOutside { what } => AttemptResult::WroteOutside {
                what: format!("{what}; {said}"),
            },
            _ => AttemptResult::WroteOutside { what: said },
        }
    };
    if artifacts.is_empty() {
        return beside_them(result);
    }
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
        Ok(_) => return beside_them(result),
        Err(e) => {
            return AttemptResult::OutputError {
                error: format!("its inputs could not be checked after it ran: {e}"),
            };
        }
    };
    let beside: Vec<String> = {
        let mut log = shared();
        let mut beside = std::collections::BTreeSet::new();
        for d in &damage {
            beside.extend(log.views.remove(d.artifact, spec));
        }
        beside.into_iter().collect()
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
    let mut what = describe(&damage, &labels, repaired, !before);
    if before {
        return AttemptResult::OutputError {
            error: format!("its inputs were damaged before it started, not by it: {what}"),
        };
    }
    if !beside.is_empty() {
        what.push_str(&format!(
            "; {} read it too, and either may have changed it",
            beside.join(", ")
        ));
    }
    beside_them(AttemptResult::WroteOutside { what })
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
        let InputDigests::Gather(members) = input else {
            continue;
        };
        let dir = store.gather_path(members);
        let what = format!("its input `{name}`, the directory of its gathered members,");
        if let Some(by) = shared().gathers.removed_under(&dir, spec, started) {
            return Some(format!(
                "{}; it was removed, and is made again when next needed",
                found_by(&what, by)
            ));
        }
        if store.gather_intact(&dir) {
            continue;
        }
        let removed = match store.remove_gather(&dir) {
            Ok(()) => "it was removed, and is made again when next needed".to_string(),
            Err(e) => format!("removing it failed ({e}); remove `{}`", dir.display()),
        };
        let beside = shared().gathers.remove(dir, spec);
        if beside.is_empty() {
            return Some(format!(
                "it changed its input `{name}`, the directory of its gathered members (inputs \
                 are read-only, though not to root); {removed}"
            ));
        }
        return Some(format!(
            "{what} changed while it ran and {} read it too: either may have changed it (inputs \
             are read-only, though not to root); {removed}",
            beside.join(", ")
        ));
    }
    None
}

/// What [`changed_gather`] and [`after_views`] need to know of the attempts beside one: which
/// running attempts read each gather directory and each view, and which of those a check
/// removed.
#[derive(Default)]
struct Shared {
    gathers: Sharing<PathBuf>,
    views: Sharing<ArtifactDigest>,
}

/// Who reads one kind of input now (attempts by node, with their step's name), and which of
/// those inputs a check removed: when, and after whose attempt.
struct Sharing<K> {
    readers: HashMap<K, BTreeMap<usize, String>>,
    removed: HashMap<K, Removal>,
}

impl<K> Default for Sharing<K> {
    fn default() -> Self {
        Sharing {
            readers: HashMap::new(),
            removed: HashMap::new(),
        }
    }
}

struct Removal {
    at: u64,
    node: usize,
    step: String,
}

impl<K: std::hash::Hash + Eq> Sharing<K> {
    fn read(&mut self, key: K, spec: &AttemptSpec) {
        self.readers
            .entry(key)
            .or_default()
            .insert(spec.node, spec.step_name.clone());
    }

    fn done(&mut self, node: usize) {
        self.readers.retain(|_, readers| {
            readers.remove(&node);
            !readers.is_empty()
        });
    }

    /// The step whose check removed `key` after the attempt of `spec` began at `started`.
    fn removed_under(&self, key: &K, spec: &AttemptSpec, started: u64) -> Option<&str> {
        self.removed
            .get(key)
            .filter(|r| r.at >= started && r.node != spec.node)
            .map(|r| r.step.as_str())
    }

    /// The check of `spec` removes `key`: the other steps reading it now, each as `` `name` ``.
    fn remove(&mut self, key: K, spec: &AttemptSpec) -> Vec<String> {
        let others = self
            .readers
            .get(&key)
            .into_iter()
            .flatten()
            .filter(|(node, _)| **node != spec.node)
            .map(|(_, step)| format!("`{step}`"))
            .collect();
        let removal = Removal {
            at: now_millis(),
            node: spec.node,
            step: spec.step_name.clone(),
        };
        self.removed.insert(key, removal);
        others
    }
}

fn shared() -> MutexGuard<'static, Shared> {
    static SHARED: OnceLock<Mutex<Shared>> = OnceLock::new();
    SHARED
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Why a step whose input another step's check removed fails: `what` (its input, named) was
/// changed under it, by that step or by itself.
fn found_by(what: &str, by: &str) -> String {
    format!(
        "{what} was found changed while it ran, by the check of `{by}`, which read it too: \
         either may have changed it (inputs are read-only, though not to root)"
    )
}

/// The attempt `spec` is about to read its inputs, `gathers` being the directories of its
/// gather inputs.
pub fn reading_inputs(spec: &AttemptSpec, gathers: &[PathBuf]) {
    let mut log = shared();
    for dir in gathers {
        log.gathers.read(dir.clone(), spec);
    }
    for input in spec.inputs.values() {
        match input {
            InputDigests::One(a) => log.views.read(*a, spec),
            InputDigests::Gather(members) => {
                for m in members {
                    log.views.read(m.artifact, spec);
                }
            }
        }
    }
}

/// The attempt `spec` has ended and been checked: it reads its inputs no more.
pub fn done_reading_inputs(spec: &AttemptSpec) {
    let mut log = shared();
    log.gathers.done(spec.node);
    log.views.done(spec.node);
}

/// Each input artifact and how the step knows it: `data`, or `runs[arch=a]` for a gather member.
fn input_labels(spec: &AttemptSpec) -> BTreeMap<ArtifactDigest, String> {
    let mut labels = BTreeMap::new();
    for (name, input) in &spec.inputs {
        match input {
            InputDigests::One(a) => {
                labels.entry(*a).or_insert_with(|| name.clone());
            }
            InputDigests::Gather(members) => {
                for m in members {
                    labels
                        .entry(m.artifact)
                        .or_insert_with(|| format!("{name}[{}]", m.label));
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
