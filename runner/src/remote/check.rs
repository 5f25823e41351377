//! `needle verify --remote` and `needle gc --remote`: what the remote holds, checked against
//! the names it holds it under, and what no record needs.
//!
//! Every record is read and its spec hashed; every manifest a record names is read and
//! hashed; every blob a manifest names must be listed at its size, and with `hash` is
//! downloaded and hashed too. A record with any problem is broken: a pull refuses it anyway,
//! and `gc --remote` deletes it (and damaged blobs). Blobs and manifests that no whole record
//! needs are orphans, left by a push cut short or by a broken record; gc deletes those older
//! than a grace period, so a push under way, whose record is not written yet, keeps its blobs.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use object_store::path::Path as ObjectPath;

use needle_core::digest::{ArtifactDigest, BlobDigest, StepKey};
use needle_core::store::{Manifest, StepRecord};

use super::transfer::blobs_of;
use super::{Kind, Listed, Remote, RemoteError, parse_step_name};

const READS_AT_ONCE: usize = 16;

/// What is wrong with one object the remote holds: a line of `verify --remote`, and a reason
/// for `gc --remote` to delete it.
#[derive(Debug, thiserror::Error)]
enum Problem {
    #[error("not a step key and output digest")]
    NotAStepName,
    /// It could not be downloaded (the store's own words).
    #[error(transparent)]
    Read(object_store::Error),
    #[error("unreadable manifest")]
    BadManifest(#[source] serde_json::Error),
    #[error("unreadable record")]
    BadRecord(#[source] serde_json::Error),
    #[error("its manifest hashes to {}", .0.short())]
    ManifestHash(ArtifactDigest),
    /// A blob whose bytes hash to another name (the hash's first characters).
    #[error("its bytes hash to {0}")]
    BlobHash(String),
    #[error("it records step {} (spec hashing to {}) with output {}", key.short(), spec_key.short(), output.short())]
    Mismatch {
        key: StepKey,
        spec_key: StepKey,
        output: ArtifactDigest,
    },
    #[error("its output's manifest {} is missing", .0.short())]
    NoManifest(ArtifactDigest),
    /// The record's output manifest is broken; its problem is shared by every record naming it.
    #[error("output {}", output.short())]
    Output {
        output: ArtifactDigest,
        #[source]
        problem: Arc<Problem>,
    },
    #[error("blob {} of its output is missing", .0.short())]
    BlobMissing(BlobDigest),
    #[error("blob {} of its output holds {held} bytes, not {size}", blob.short())]
    BlobSize {
        blob: BlobDigest,
        held: u64,
        size: u64,
    },
    #[error("blob {} of its output is damaged", .0.short())]
    BlobDamaged(BlobDigest),
}

/// What [`check`] found.
#[derive(Debug, Default, serde::Serialize)]
pub struct RemoteReport {
    pub url: String,
    pub steps: usize,
    pub artifacts: usize,
    pub blobs: usize,
    pub bytes: u64,
    /// Whether every blob was downloaded and hashed.
    pub hashed: bool,
    /// One line per problem: the object, and what is wrong with it.
    pub problems: Vec<String>,
    /// Objects `gc --remote` deletes: broken records, damaged blobs, old orphans.
    #[serde(skip)]
    pub doomed: Vec<ObjectPath>,
    /// How many of `doomed` are orphans, and their bytes.
    pub orphans: usize,
    pub orphan_bytes: u64,
}

/// What `gc --remote` did or, dry, would do.
#[derive(Debug, serde::Serialize)]
pub struct RemoteGc {
    pub url: String,
    pub dry_run: bool,
    pub broken: usize,
    pub orphans: usize,
    pub orphan_bytes: u64,
    pub deleted: Vec<String>,
}

/// Check everything the remote holds; orphans older than `grace` are marked for deletion.
pub async fn check(
    remote: &Remote,
    hash: bool,
    grace: Duration,
) -> Result<RemoteReport, RemoteError> {
    let (steps, artifacts, blobs) = futures::try_join!(
        remote.list(Kind::Step),
        remote.list(Kind::Artifact),
        remote.list(Kind::Blob)
    )?;
    let blob_sizes: HashMap<&str, u64> = blobs.iter().map(|l| (l.name.as_str(), l.size)).collect();
    let listed_artifacts: HashSet<&str> = artifacts.iter().map(|l| l.name.as_str()).collect();
    let mut report = RemoteReport {
        url: remote.url.clone(),
        steps: steps.len(),
        artifacts: artifacts.len(),
        blobs: blobs.len(),
        bytes: blobs.iter().map(|l| l.size).sum(),
        hashed: hash,
        ..RemoteReport::default()
    };

    // Each distinct manifest once, however many records name it.
    let outputs: HashSet<ArtifactDigest> = steps
        .iter()
        .filter_map(|l| parse_step_name(&l.name).map(|(_, o)| o))
        .filter(|o| listed_artifacts.contains(o.hex().as_str()))
        .collect();
    let manifests: HashMap<ArtifactDigest, Result<Manifest, Arc<Problem>>> =
        futures::stream::iter(outputs)
            .map(|a| async move { (a, read_manifest(remote, &a).await.map_err(Arc::new)) })
            .buffer_unordered(READS_AT_ONCE)
            .collect()
            .await;
    let damaged_blobs: HashMap<BlobDigest, Problem> = if hash {
        let named: HashSet<(BlobDigest, u64)> = manifests
            .values()
            .filter_map(|m| m.as_ref().ok())
            .flat_map(blobs_of)
            .filter(|(b, size)| blob_sizes.get(b.hex().as_str()) == Some(size))
            .collect();
        futures::stream::iter(named)
            .map(|(b, _)| async move { (b, hash_blob(remote, &b).await) })
            .buffer_unordered(READS_AT_ONCE)
            .filter_map(|(b, r)| async move { r.err().map(|e| (b, e)) })
            .collect()
            .await
    } else {
        HashMap::new()
    };
    for (b, problem) in &damaged_blobs {
        let path = remote.blob_path(b);
        report.problems.push(problem_line(remote, &path, problem));
        report.doomed.push(path);
    }

    let (m, sizes, damaged) = (&manifests, &blob_sizes, &damaged_blobs);
    let records: Vec<(Listed, Result<Vec<BlobDigest>, Problem>)> = futures::stream::iter(steps)
        .map(|l| async move {
            let r = check_record(remote, &l, m, sizes, damaged).await;
            (l, r)
        })
        .buffer_unordered(READS_AT_ONCE)
        .collect()
        .await;
    let mut needed_artifacts: HashSet<String> = HashSet::new();
    let mut needed_blobs: HashSet<String> = HashSet::new();
    for (l, result) in records {
        let path = remote.under(Kind::Step, &l.name);
        match result {
            Ok(code) => {
                needed_blobs.extend(code.iter().map(BlobDigest::hex));
                let (_, output) = parse_step_name(&l.name).expect("checked");
                if let Some(Ok(m)) = manifests.get(&output) {
                    needed_blobs.extend(blobs_of(m).into_iter().map(|(b, _)| b.hex()));
                }
                needed_artifacts.insert(output.hex());
            }
            Err(problem) => {
                report.problems.push(problem_line(remote, &path, &problem));
                report.doomed.push(path);
            }
        }
    }

    let grace = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
    let cutoff = (needle_core::store::now_millis() as i64).saturating_sub(grace);
    let orphans = (artifacts
        .iter()
        .map(|l| (Kind::Artifact, l, &needed_artifacts)))
    .chain(blobs.iter().map(|l| (Kind::Blob, l, &needed_blobs)))
    .filter(|(_, l, needed)| !needed.contains(&l.name) && l.modified <= cutoff);
    for (kind, l, _) in orphans {
        let path = remote.under(kind, &l.name);
        if report.doomed.contains(&path) {
            continue;
        }
        report.orphans += 1;
        report.orphan_bytes += l.size;
        report.doomed.push(path);
    }
    Ok(report)
}

/// Delete what [`check`] marked (unless `dry_run`).
pub async fn gc(
    remote: &Remote,
    report: &RemoteReport,
    dry_run: bool,
) -> Result<RemoteGc, RemoteError> {
    let shown: Vec<String> = report.doomed.iter().map(|p| remote.show(p)).collect();
    if !dry_run {
        futures::stream::iter(report.doomed.iter())
            .map(|p| async move {
                match remote.store.delete(p).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(remote.request_error(format!("delete `{}`", remote.show(p)))(e)),
                }
            })
            .buffer_unordered(READS_AT_ONCE)
            .try_collect::<Vec<()>>()
            .await?;
    }
    Ok(RemoteGc {
        url: remote.url.clone(),
        dry_run,
        broken: report.doomed.len() - report.orphans,
        orphans: report.orphans,
        orphan_bytes: report.orphan_bytes,
        deleted: shown,
    })
}

/// `object: what is wrong with it`, the cause on the same line.
fn problem_line(remote: &Remote, path: &ObjectPath, problem: &Problem) -> String {
    format!("{}: {}", remote.show(path), super::error_chain(problem))
}

async fn read_manifest(remote: &Remote, artifact: &ArtifactDigest) -> Result<Manifest, Problem> {
    let bytes = read(remote, &remote.artifact_path(artifact)).await?;
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(Problem::BadManifest)?;
    let digest = manifest.digest();
    if digest != *artifact {
        return Err(Problem::ManifestHash(digest));
    }
    Ok(manifest)
}

/// One record: readable, its spec hashing to its key, its output and every blob whole; the
/// blobs of its code files (needed too, but not checked: a pull executes nothing of them).
async fn check_record(
    remote: &Remote,
    l: &Listed,
    manifests: &HashMap<ArtifactDigest, Result<Manifest, Arc<Problem>>>,
    blob_sizes: &HashMap<&str, u64>,
    damaged: &HashMap<BlobDigest, Problem>,
) -> Result<Vec<BlobDigest>, Problem> {
    let (key, output) = parse_step_name(&l.name).ok_or(Problem::NotAStepName)?;
    let bytes = read(remote, &remote.step_path(&key, &output)).await?;
    let record: StepRecord = serde_json::from_slice(&bytes).map_err(Problem::BadRecord)?;
    let spec_key = record.spec.key();
    if record.key != key || spec_key != key || record.output != output {
        return Err(Problem::Mismatch {
            key: record.key,
            spec_key,
            output: record.output,
        });
    }
    let manifest = match manifests.get(&output) {
        None => return Err(Problem::NoManifest(output)),
        Some(Err(problem)) => {
            return Err(Problem::Output {
                output,
                problem: problem.clone(),
            });
        }
        Some(Ok(m)) => m,
    };
    for (b, size) in blobs_of(manifest) {
        match blob_sizes.get(b.hex().as_str()) {
            None => return Err(Problem::BlobMissing(b)),
            Some(&held) if held != size => {
                return Err(Problem::BlobSize {
                    blob: b,
                    held,
                    size,
                });
            }
            Some(_) => {}
        }
        if damaged.contains_key(&b) {
            return Err(Problem::BlobDamaged(b));
        }
    }
    Ok(record.spec.code.values().copied().collect())
}

async fn read(remote: &Remote, path: &ObjectPath) -> Result<bytes::Bytes, Problem> {
    let got = remote.store.get(path).await.map_err(Problem::Read)?;
    got.bytes().await.map_err(Problem::Read)
}

/// Download a blob, hashing as it comes: the problem if it does not hash to its name.
async fn hash_blob(remote: &Remote, blob: &BlobDigest) -> Result<(), Problem> {
    let got = (remote.store.get(&remote.blob_path(blob)).await).map_err(Problem::Read)?;
    let mut stream = got.into_stream();
    let mut hasher = blake3::Hasher::new();
    while let Some(chunk) = stream.try_next().await.map_err(Problem::Read)? {
        hasher.update(&chunk);
    }
    let got = hasher.finalize();
    if got.as_bytes() != blob.as_bytes() {
        let mut short = got.to_hex().to_string();
        short.truncate(needle_core::digest::SHORT_LEN);
        return Err(Problem::BlobHash(short));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_whose_manifest_is_broken_says_both_on_one_line() {
        let output = ArtifactDigest::from_bytes([7; 32]);
        let other = ArtifactDigest::from_bytes([9; 32]);
        let shared = Arc::new(Problem::ManifestHash(other));
        let problem = Problem::Output {
            output,
            problem: shared.clone(),
        };
        assert_eq!(
            super::super::error_chain(&problem),
            format!(
                "output {}: its manifest hashes to {}",
                output.short(),
                other.short()
            )
        );
        let unreadable = serde_json::from_slice::<Manifest>(b"{").unwrap_err();
        let said = unreadable.to_string();
        assert_eq!(
            super::super::error_chain(&Problem::BadManifest(unreadable)),
            format!("unreadable manifest: {said}")
        );
    }
}
