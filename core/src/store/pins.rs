//! Pins: artifacts `needle gc` keeps, with their lineage, whatever `--keep-last` says.

use super::journal::{Op, TreeId};
use super::meta::{decode, parse_key, to_json};
use super::{PinRecord, Store, StoreError};
use crate::digest::ArtifactDigest;

impl Store {
    /// Pin `artifact`, which must be recorded. Pinning it again keeps the first pin's record.
    /// True when it was not pinned before.
    pub fn pin(&self, artifact: &ArtifactDigest, pin: &PinRecord) -> Result<bool, StoreError> {
        if self.manifest(artifact)?.is_none() {
            return Err(StoreError::UnknownArtifact {
                artifact: artifact.hex(),
            });
        }
        let key = artifact.hex().into_bytes();
        self.write(|| {
            if self.trees.pins.contains_key(&key)? {
                return Ok((Vec::new(), false));
            }
            Ok((vec![Op::insert(TreeId::Pins, key, to_json(pin))], true))
        })
    }

    /// Unpin `artifact`; false when it was not pinned.
    pub fn unpin(&self, artifact: &ArtifactDigest) -> Result<bool, StoreError> {
        let key = artifact.hex().into_bytes();
        self.write(|| {
            if !self.trees.pins.contains_key(&key)? {
                return Ok((Vec::new(), false));
            }
            Ok((vec![Op::remove(TreeId::Pins, key)], true))
        })
    }

    /// Every pin, by artifact digest.
    pub fn pins(&self) -> Result<Vec<(ArtifactDigest, PinRecord)>, StoreError> {
        self.trees
            .pins
            .iter()
            .map(|item| {
                let (key, value) = item?;
                Ok((parse_key(&key, "pins")?, decode("pins", &key, &value)?))
            })
            .collect()
    }

    /// Why `artifact` was dropped as damaged, if it was, a run or pin still names it, and it
    /// has not been made again since.
    pub fn dropped(
        &self,
        artifact: &ArtifactDigest,
    ) -> Result<Option<super::DroppedRecord>, StoreError> {
        let key = artifact.hex();
        if self.trees.artifacts.contains_key(key.as_bytes())? {
            return Ok(None);
        }
        super::meta::get_json(&self.trees.dropped, "dropped", key.as_bytes())
    }
}
