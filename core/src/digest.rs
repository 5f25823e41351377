//! Typed BLAKE3 digests.
//!
//! A step key, a step id, an artifact digest and a blob digest are all 32-byte BLAKE3 hashes,
//! but they name different things: swapping one for another would look up the wrong record
//! and silently reuse the wrong work. The phantom kind makes such a swap a compile error.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a digest names. Implemented by the uninhabited marker types below.
pub trait DigestKind: 'static {
    /// Domain-separation prefix mixed into hashes computed with [`Digest::of_parts`], so that
    /// equal bytes of two kinds never yield the same digest.
    const DOMAIN: &'static str;
    /// Human name used in error messages.
    const NAME: &'static str;
}

/// The content of one file.
pub enum BlobKind {}
/// A directory tree of blobs: the manifest of an artifact.
pub enum ArtifactKind {}
/// A step's cache key: op, version, params and the *content* digests of its inputs.
pub enum StepKeyKind {}
/// A step's structural identity in a plan: op, version, params and the *ids* of its inputs.
/// Known before anything runs; used to count and share steps across sweep arms.
pub enum StepIdKind {}

impl DigestKind for BlobKind {
    const DOMAIN: &'static str = "needle blob v1";
    const NAME: &'static str = "blob";
}
impl DigestKind for ArtifactKind {
    const DOMAIN: &'static str = "needle artifact v1";
    const NAME: &'static str = "artifact";
}
impl DigestKind for StepKeyKind {
    const DOMAIN: &'static str = "needle step key v1";
    const NAME: &'static str = "step key";
}
impl DigestKind for StepIdKind {
    const DOMAIN: &'static str = "needle step id v1";
    const NAME: &'static str = "step id";
}

pub type BlobDigest = Digest<BlobKind>;
pub type ArtifactDigest = Digest<ArtifactKind>;
pub type StepKey = Digest<StepKeyKind>;
pub type StepId = Digest<StepIdKind>;

/// Hex length of a full digest.
pub const HEX_LEN: usize = 64;
/// Hex length shown to users by default.
pub const SHORT_LEN: usize = 12;

pub struct Digest<K> {
    bytes: [u8; 32],
    _kind: PhantomData<fn() -> K>,
}

impl<K: DigestKind> Digest<K> {
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self {
            bytes,
            _kind: PhantomData,
        }
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.bytes
    }

    /// Hash of `parts`, each length-prefixed, under this kind's domain.
    pub fn of_parts(parts: &[&[u8]]) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(K::DOMAIN.as_bytes());
        h.update(&[0]);
        for part in parts {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part);
        }
        Self::from_bytes(*h.finalize().as_bytes())
    }

    pub fn from_hasher(h: &blake3::Hasher) -> Self {
        Self::from_bytes(*h.finalize().as_bytes())
    }

    /// Full lowercase hex.
    pub fn hex(&self) -> String {
        let mut s = String::with_capacity(HEX_LEN);
        for b in self.bytes {
            s.push(char::from(HEX[(b >> 4) as usize]));
            s.push(char::from(HEX[(b & 15) as usize]));
        }
        s
    }

    /// The first [`SHORT_LEN`] hex digits, as shown in tables.
    pub fn short(&self) -> String {
        let mut h = self.hex();
        h.truncate(SHORT_LEN);
        h
    }

    /// Derive a 31-bit seed, usable by every random library (numpy wants < 2^32).
    pub fn seed(&self) -> u32 {
        u32::from_le_bytes([self.bytes[0], self.bytes[1], self.bytes[2], self.bytes[3]]) >> 1
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not a {kind} digest (expected {HEX_LEN} hex digits)")]
pub struct DigestParseError {
    pub text: String,
    pub kind: &'static str,
}

impl<K: DigestKind> FromStr for Digest<K> {
    type Err = DigestParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || DigestParseError {
            text: s.to_string(),
            kind: K::NAME,
        };
        if s.len() != HEX_LEN {
            return Err(err());
        }
        let mut bytes = [0u8; 32];
        for (i, pair) in s.as_bytes().chunks(2).enumerate() {
            let hi = hex_val(pair[0]).ok_or_else(err)?;
            let lo = hex_val(pair[1]).ok_or_else(err)?;
            bytes[i] = (hi << 4) | lo;
        }
        Ok(Self::from_bytes(bytes))
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// True when `s` is a plausible (lowercase hex) digest prefix.
pub fn is_hex_prefix(s: &str) -> bool {
    !s.is_empty() && s.len() <= HEX_LEN && s.bytes().all(|c| hex_val(c).is_some())
}

// The derives would require `K: Clone` etc.; the kind is a marker, so implement by hand.
impl<K> Clone for Digest<K> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<K> Copy for Digest<K> {}
impl<K> PartialEq for Digest<K> {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}
impl<K> Eq for Digest<K> {}
impl<K> PartialOrd for Digest<K> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<K> Ord for Digest<K> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.bytes.cmp(&other.bytes)
    }
}
impl<K> Hash for Digest<K> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.bytes.hash(state)
    }
}
impl<K: DigestKind> fmt::Display for Digest<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}
impl<K: DigestKind> fmt::Debug for Digest<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", K::NAME, self.short())
    }
}
impl<K: DigestKind> Serialize for Digest<K> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.hex())
    }
}
impl<'de, K: DigestKind> Deserialize<'de> for Digest<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let d = BlobDigest::of_parts(&[b"hello"]);
        let back: BlobDigest = d.hex().parse().unwrap();
        assert_eq!(d, back);
        assert_eq!(d.short().len(), SHORT_LEN);
    }

    #[test]
    fn kinds_are_domain_separated() {
        let a = BlobDigest::of_parts(&[b"x"]);
        let b = StepKey::of_parts(&[b"x"]);
        assert_ne!(a.as_bytes(), b.as_bytes());
    }

    #[test]
    fn parts_are_length_prefixed() {
        let a = StepKey::of_parts(&[b"ab", b"c"]);
        let b = StepKey::of_parts(&[b"a", b"bc"]);
        assert_ne!(a, b);
    }

    #[test]
    fn rejects_bad_hex() {
        assert!("xyz".parse::<BlobDigest>().is_err());
        assert!("A".repeat(64).parse::<BlobDigest>().is_err());
    }
}
