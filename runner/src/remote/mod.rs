//! The shared cache: a remote copy of step records, manifests and blobs on an S3-compatible
//! object store, which several machines' stores read from and write to.
//!
//! ```text
//! <prefix>/blobs/<blob digest>                 a file's bytes (plain BLAKE3 of them)
//! <prefix>/artifacts/<artifact digest>         the manifest (JSON) hashing to that digest
//! <prefix>/steps/<step key>/<output digest>    the step record (JSON) whose spec hashes to
//!                                              the key and whose output is that artifact
//! ```
//!
//! Every name is the digest of what it holds, so nothing on the remote is ever trusted: a
//! fetched blob, manifest or record is used only once it hashes to its name (`transfer.rs`).
//! Writes never overwrite: an object is created only if absent (S3's `If-None-Match: *`), and
//! a step's record is written only after every blob and the manifest it names, so a reader
//! that sees a record finds its bytes, whatever other writers do at the same time.
//!
//! The step's output is part of the record's name, so one listing of `steps/` tells a plan
//! every remote step's output, which is what the keys of the steps downstream are made of:
//! a plan of 10,000 steps costs ten listing pages, not 10,000 requests. Two machines that ran
//! the same step to different bytes (a nondeterministic GPU step) both keep their record; a
//! reader takes the one written first, as if the second writer's conditional write had lost.

mod check;
mod transfer;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};

use needle_core::digest::{ArtifactDigest, BlobDigest, StepKey};

use crate::cli::RemoteArgs;
use crate::config;
use crate::error::CliError;

pub use check::{check, gc};
pub use transfer::{Transfer, Uploader, pull_steps, push_steps};

/// `[remote]` in `needle.toml`.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteTable {
    /// `s3://bucket` or `s3://bucket/prefix`.
    pub url: Option<String>,
    /// An S3-compatible server (`http://127.0.0.1:8333`); absent: AWS.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Whether a run uploads what it makes (default: true). `needle push` uploads either way.
    pub upload: Option<bool>,
}

/// Why the remote could not do something.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("remote `{url}`: could not {what}")]
    Request {
        url: String,
        what: String,
        #[source]
        source: object_store::Error,
    },
    /// An object that is not what its name says: never committed.
    #[error("`{object}` is damaged: {problem}")]
    Damaged { object: String, problem: String },
    #[error("`{object}` is missing")]
    Missing { object: String },
    #[error(transparent)]
    Local(#[from] needle_core::store::StoreError),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<RemoteError> for CliError {
    fn from(e: RemoteError) -> Self {
        match e {
            RemoteError::Local(e) => CliError::Store(e),
            RemoteError::Io { context, source } => CliError::Io { context, source },
            other => CliError::Remote(Box::new(other)),
        }
    }
}

/// A remote cache, opened (no request made yet).
#[derive(Clone)]
pub struct Remote {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    url: String,
    /// Whether runs upload what they make.
    pub upload: bool,
}

/// The kinds of object, by their directory under the prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Blob,
    Artifact,
    Step,
}

impl Kind {
    fn dir(self) -> &'static str {
        match self {
            Kind::Blob => "blobs",
            Kind::Artifact => "artifacts",
            Kind::Step => "steps",
        }
    }
}

/// How long a request may try before the remote counts as down: a run falls back to local
/// work then, and should not wait minutes first.
const RETRY: RetryConfig = RetryConfig {
    backoff: BackoffConfig {
        init_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(2),
        base: 2.0,
    },
    max_retries: 3,
    retry_timeout: Duration::from_secs(20),
};

impl Remote {
    /// The remote a command uses: `--no-remote` none; else `--remote URL`, else
    /// `$NEEDLE_REMOTE`, else `[remote] url` of the config file; the endpoint and region from
    /// the file, else from the `AWS_*` variables.
    pub fn from_args(
        args: &RemoteArgs,
        config_file: Option<&std::path::Path>,
    ) -> Result<Option<Remote>, CliError> {
        if args.no_remote {
            return Ok(None);
        }
        let table = config::load(config_file)?.remote;
        let url = (args.remote.clone())
            .or_else(|| {
                std::env::var("NEEDLE_REMOTE")
                    .ok()
                    .filter(|u| !u.is_empty())
            })
            .or(table.url.clone());
        let Some(url) = url else {
            return Ok(None);
        };
        Remote::open(&url, &table).map(Some)
    }

    /// The remote of a command that needs one (`push`, `pull`, `--remote` of `verify` and
    /// `gc`): an error naming how to give one when there is none.
    pub fn required(url: Option<&str>) -> Result<Remote, CliError> {
        let args = RemoteArgs {
            remote: url.map(str::to_string),
            no_remote: false,
        };
        Remote::from_args(&args, None)?.ok_or_else(|| {
            CliError::usage(
                "no remote: give one with --remote s3://bucket/prefix, as $NEEDLE_REMOTE, or as \
                 `url` in the [remote] table of needle.toml",
            )
        })
    }

    /// Open `url` (`s3://bucket[/prefix]`) with the rest of `table`.
    pub fn open(url: &str, table: &RemoteTable) -> Result<Remote, CliError> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| {
            CliError::usage(format!(
                "remote `{url}`: not an S3 URL (expected `s3://bucket` or `s3://bucket/prefix`)"
            ))
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(CliError::usage(format!(
                "remote `{url}`: no bucket (expected `s3://bucket` or `s3://bucket/prefix`)"
            )));
        }
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_retry(RETRY)
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout_disabled(),
            );
        if let Some(endpoint) = &table.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        } else if std::env::var("AWS_ENDPOINT_URL")
            .or_else(|_| std::env::var("AWS_ENDPOINT"))
            .is_ok_and(|e| e.starts_with("http://"))
        {
            builder = builder.with_allow_http(true);
        }
        if let Some(region) = &table.region {
            builder = builder.with_region(region);
        }
        let store = builder
            .build()
            .map_err(|e| CliError::usage(format!("remote `{url}`: {e}")))?;
        Ok(Remote {
            store: Arc::new(store),
            prefix: ObjectPath::from(prefix.trim_matches('/')),
            url: url.trim_end_matches('/').to_string(),
            upload: table.upload.unwrap_or(true),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn dir(&self, kind: Kind) -> ObjectPath {
        self.prefix.clone().join(kind.dir())
    }

    /// `name` (which may hold `/`) under the kind's directory.
    fn under(&self, kind: Kind, name: &str) -> ObjectPath {
        let dir = self.dir(kind);
        ObjectPath::from_iter(dir.parts().chain(name.split('/').map(Into::into)))
    }

    fn blob_path(&self, blob: &BlobDigest) -> ObjectPath {
        self.dir(Kind::Blob).join(blob.hex())
    }

    fn artifact_path(&self, artifact: &ArtifactDigest) -> ObjectPath {
        self.dir(Kind::Artifact).join(artifact.hex())
    }

    fn step_path(&self, key: &StepKey, output: &ArtifactDigest) -> ObjectPath {
        self.dir(Kind::Step).join(key.hex()).join(output.hex())
    }

    /// A name as the user reads it in a message.
    fn show(&self, path: &ObjectPath) -> String {
        format!("{}/{}", self.url, relative(&self.prefix, path))
    }

    fn request_error(
        &self,
        what: impl Into<String>,
    ) -> impl FnOnce(object_store::Error) -> RemoteError {
        let url = self.url.clone();
        let what = what.into();
        move |source| RemoteError::Request { url, what, source }
    }

    /// Every object of `kind`: its name under the kind's directory, size and age.
    async fn list(&self, kind: Kind) -> Result<Vec<Listed>, RemoteError> {
        let dir = self.dir(kind);
        let metas: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(self.request_error(format!("list `{}`", self.show(&dir))))?;
        Ok(metas
            .into_iter()
            .map(|m| Listed {
                name: relative(&dir, &m.location),
                size: m.size,
                modified: m.last_modified.timestamp_millis(),
            })
            .collect())
    }

    /// What the remote holds: every step key and the output it is recorded with, from one
    /// listing. Names that are not a key and a digest are not needle's and are ignored.
    pub async fn index(&self) -> Result<RemoteIndex, RemoteError> {
        Ok(RemoteIndex::of(&self.list(Kind::Step).await?))
    }
}

/// One listed object.
#[derive(Debug, Clone)]
struct Listed {
    /// Relative to its kind's directory.
    name: String,
    size: u64,
    /// Milliseconds since the Unix epoch.
    modified: i64,
}

/// `<key>/<output>` → both digests.
fn parse_step_name(name: &str) -> Option<(StepKey, ArtifactDigest)> {
    let (key, output) = name.split_once('/')?;
    Some((key.parse().ok()?, output.parse().ok()?))
}

/// `path` without its leading `dir/`.
fn relative(dir: &ObjectPath, path: &ObjectPath) -> String {
    let dir = dir.as_ref();
    let path = path.as_ref();
    if dir.is_empty() {
        return path.to_string();
    }
    path.strip_prefix(dir)
        .map(|p| p.trim_start_matches('/'))
        .unwrap_or(path)
        .to_string()
}

/// The steps a remote holds, by key: the output each is recorded with.
#[derive(Debug, Default, Clone)]
pub struct RemoteIndex {
    pub steps: HashMap<StepKey, ArtifactDigest>,
}

impl RemoteIndex {
    /// The index of a listing of `steps/`: for a key listed with several outputs (two
    /// machines ran a nondeterministic step), the record written first, and of two written in
    /// the same second the smaller output digest, so that every reader chooses alike.
    fn of(listed: &[Listed]) -> RemoteIndex {
        let mut chosen: HashMap<StepKey, (ArtifactDigest, i64)> = HashMap::new();
        for l in listed {
            let Some((key, output)) = parse_step_name(&l.name) else {
                continue;
            };
            let first = chosen
                .get(&key)
                .is_none_or(|&(o, t)| (l.modified, output.hex()) < (t, o.hex()));
            if first {
                chosen.insert(key, (output, l.modified));
            }
        }
        RemoteIndex {
            steps: chosen.into_iter().map(|(k, (o, _))| (k, o)).collect(),
        }
    }

    pub fn output(&self, key: &StepKey) -> Option<ArtifactDigest> {
        self.steps.get(key).copied()
    }
}

/// Run `fut` to its end on a runtime of its own (the commands are synchronous).
pub fn block_on<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("starting an async runtime")
        .block_on(fut)
}

/// The remote's index for a plan or a run; a remote that does not answer is warned about
/// and taken as empty: the work is done here instead.
pub fn index_or_warn(remote: &Remote) -> Option<RemoteIndex> {
    match block_on(remote.index()) {
        Ok(index) => Some(index),
        Err(e) => {
            warn_unreachable(&e);
            None
        }
    }
}

/// `warning: …` with the error's causes, on stderr.
pub fn warn_unreachable(e: &RemoteError) {
    eprintln!("warning: {}; going on without the remote", error_chain(e));
}

/// Steps a transfer could not move, for `--json`: each key and why.
pub fn failures_json(failed: &[(StepKey, RemoteError)]) -> serde_json::Value {
    (failed.iter())
        .map(|(key, e)| serde_json::json!({ "key": key, "error": error_chain(e) }))
        .collect()
}

/// An error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    needle_core::error_chain::joined(e, ": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        let t = RemoteTable::default();
        assert!(Remote::open("http://x/y", &t).is_err());
        assert!(Remote::open("s3:///y", &t).is_err());
        let r = Remote::open("s3://bucket/team/cache/", &t).unwrap();
        assert_eq!(r.url(), "s3://bucket/team/cache");
        let key = StepKey::of_parts(&[b"k"]);
        let out = ArtifactDigest::of_parts(&[b"o"]);
        let p = r.step_path(&key, &out);
        assert_eq!(
            p.as_ref(),
            format!("team/cache/steps/{}/{}", key.hex(), out.hex())
        );
        assert_eq!(
            relative(&r.dir(Kind::Step), &p),
            format!("{}/{}", key.hex(), out.hex())
        );
        assert_eq!(
            parse_step_name(&relative(&r.dir(Kind::Step), &p)),
            Some((key, out))
        );
        assert_eq!(parse_step_name("notakey/x"), None);
    }

    #[test]
    fn the_first_record_written_of_a_key_wins_alike_for_every_reader() {
        let key = StepKey::of_parts(&[b"k"]);
        let (a, b) = (
            ArtifactDigest::of_parts(&[b"a"]),
            ArtifactDigest::of_parts(&[b"b"]),
        );
        let (small, large) = if a.hex() < b.hex() { (a, b) } else { (b, a) };
        let listed = |o: ArtifactDigest, modified| Listed {
            name: format!("{}/{}", key.hex(), o.hex()),
            size: 1,
            modified,
        };
        let junk = Listed {
            name: "README".into(),
            size: 1,
            modified: 0,
        };
        let earlier_large = [listed(small, 2000), junk, listed(large, 1000)];
        assert_eq!(RemoteIndex::of(&earlier_large).output(&key), Some(large));
        let same_second = [listed(large, 1000), listed(small, 1000)];
        assert_eq!(RemoteIndex::of(&same_second).output(&key), Some(small));
        assert_eq!(RemoteIndex::of(&same_second).steps.len(), 1);
    }
}
