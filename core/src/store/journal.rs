//! The journal: every change to the store's metadata, appended to `journal/log` and made
//! durable before sled applies it, so that `meta/` can be rebuilt from it
//! (`needle verify --rebuild`, `rebuild.rs`) when sled's files are lost or damaged.
//!
//! ```text
//! journal/log   frame*            a head, the snapshot it starts from, then changes
//! frame         magic "NJ01" | len u32 LE | check [16] | payload [len]
//!               check: the first 16 bytes of BLAKE3(len LE ‖ payload)
//! payload       kind u8 | seq u64 LE | body
//!   head (1)    generation u64 LE | base_len u64 LE | created u64 LE (ms)
//!                                                        seq: the base seq
//!   snap (2)    op*   the records as they were then      seq: the base seq
//!   change (3)  op*   one metadata transaction           seq: previous + 1
//! op            tag u8 (0 remove, 1 insert) | tree len u8 | tree name | key len u32 LE | key
//!               [| value len u32 LE | value]     (the value for an insert only)
//! ```
//!
//! **Order.** A change is written at the journal's end and `fdatasync`ed before its sled
//! transaction, and that transaction also records the journal position it mirrors (key
//! [`POS_KEY`] of sled's default tree: generation, seq, end offset). So sled never holds a change
//! the journal lacks, and at most one change, the one in flight when the process died, is in
//! the journal and not in sled: the next open applies it ([`reconcile`]). Every write to the
//! metadata goes through [`super::Store::write`], which holds one lock across both, so the
//! journal's order is sled's order.
//!
//! **What is journaled.** Every insert and remove of every tree, the derived ones (indices,
//! run summaries) included: replaying the journal gives back sled's contents exactly, with no
//! recomputation to get wrong. The position key is not journaled (it is about the journal).
//!
//! **Torn tails.** A kill in the middle of an append leaves part of a frame: its length runs
//! past the end of the file or its check fails, and it is ignored, never taken as a change.
//! A failed append is cut off again at once ([`Journal::append`]), so a later frame always
//! follows a whole one; the next open cuts off a torn tail a killed process left.
//!
//! **Compaction.** `log` is replaced, atomically (a temporary file, fsynced, renamed), by a
//! new head and a snapshot of the live records ([`write_snapshot`]): after each gc, and when
//! the store opens to write and the journal has grown past [`COMPACT_FACTOR`] times its
//! snapshot (plus [`COMPACT_SLACK`]).
//!
//! **Healing.** Sled and the journal each can restore the other. When the journal is missing,
//! or behind sled (it lost a tail), or damaged in what the open reads (its head, the changes
//! after sled's position), the open writes a new one from sled. The open reads no more than
//! that, to stay cheap; damage further inside is found by `verify`, which replays the whole
//! journal against sled, and `verify --repair` writes a new one. A damaged journal is kept
//! aside (`log.damaged-<time>`), never deleted.
//!
//! ```text
//! open:  sled's position      the journal's file                  then
//!        (gen, seq, end)      same gen, len == end                 in step (the usual case)
//!                             same gen, len > end                  apply the changes after
//!                                                                  `end`; cut a torn tail
//!                             same gen, len < end; missing;        write a new journal
//!                             head unreadable                      from sled
//!                             another gen (a compaction sled       read it all; apply what
//!                             did not record)                      follows sled's seq
//!        none, sled empty     holds records                        refuse: `verify --rebuild`
//!        none, sled empty     a head alone, or missing             a new store: in step
//! ```

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::meta::Trees;
use super::sled_db::Sled;
use super::{StoreError, fsutil};

/// The journal's directory in the store, and its file there.
pub(super) const DIR: &str = "journal";
pub(super) const FILE: &str = "log";

/// Key of sled's default tree holding the journal position sled mirrors ([`Pos`]).
pub(super) const POS_KEY: &[u8] = b"journal";

const MAGIC: [u8; 4] = *b"NJ01";
/// magic, len, check.
const FRAME_HEAD: usize = 4 + 4 + 16;
/// kind, seq.
const PAYLOAD_HEAD: usize = 1 + 8;
const HEAD_BODY: usize = 3 * 8;
/// Bytes of a head frame (all heads are this long, so one can be rewritten in place).
pub(super) const HEAD_FRAME_LEN: u64 = (FRAME_HEAD + PAYLOAD_HEAD + HEAD_BODY) as u64;

const KIND_HEAD: u8 = 1;
const KIND_SNAP: u8 = 2;
const KIND_CHANGE: u8 = 3;

/// A snapshot is written in frames of about this many bytes, so a reader never holds more
/// than one of them.
const SNAP_CHUNK: usize = 1 << 20;

/// Compact when the journal holds more than this many times its snapshot's bytes…
pub(super) const COMPACT_FACTOR: u64 = 4;
/// …plus this much (a small store is not compacted at every open).
pub(super) const COMPACT_SLACK: u64 = 8 << 20;

/// A sled tree, as the journal names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum TreeId {
    /// sled's default tree (the run counter).
    Default,
    Steps,
    Artifacts,
    Producers,
    Consumers,
    Runs,
    RunIndex,
    Pins,
    Dropped,
    GpuUsage,
    RunProgress,
}

impl TreeId {
    pub(super) const ALL: [TreeId; 11] = [
        TreeId::Default,
        TreeId::Steps,
        TreeId::Artifacts,
        TreeId::Producers,
        TreeId::Consumers,
        TreeId::Runs,
        TreeId::RunIndex,
        TreeId::Pins,
        TreeId::Dropped,
        TreeId::GpuUsage,
        TreeId::RunProgress,
    ];

    /// The sled tree's name (the default tree, which sled names itself, is `default`).
    pub(super) fn name(self) -> &'static str {
        match self {
            TreeId::Default => "default",
            TreeId::Steps => "steps",
            TreeId::Artifacts => "artifacts",
            TreeId::Producers => "producers",
            TreeId::Consumers => "consumers",
            TreeId::Runs => "runs",
            TreeId::RunIndex => "run_index",
            TreeId::Pins => "pins",
            TreeId::Dropped => "dropped",
            TreeId::GpuUsage => super::usage::TREE,
            TreeId::RunProgress => super::progress::TREE,
        }
    }

    fn from_name(name: &[u8]) -> Option<TreeId> {
        TreeId::ALL
            .into_iter()
            .find(|t| t.name().as_bytes() == name)
    }
}

/// One write to one tree: an insert (`value` set) or a remove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Op {
    pub tree: TreeId,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

impl Op {
    pub(super) fn insert(tree: TreeId, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Op {
        Op {
            tree,
            key: key.into(),
            value: Some(value.into()),
        }
    }

    pub(super) fn remove(tree: TreeId, key: impl Into<Vec<u8>>) -> Op {
        Op {
            tree,
            key: key.into(),
            value: None,
        }
    }

    fn encoded_len(&self) -> usize {
        1 + 1
            + self.tree.name().len()
            + 4
            + self.key.len()
            + self.value.as_ref().map_or(0, |v| 4 + v.len())
    }
}

/// Where in the journal sled stands: the journal's generation (a new one per snapshot), the
/// last change applied, and the offset just after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Pos {
    pub generation: u64,
    pub seq: u64,
    pub end: u64,
}

impl Pos {
    pub(super) fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&self.generation.to_be_bytes());
        b[8..16].copy_from_slice(&self.seq.to_be_bytes());
        b[16..].copy_from_slice(&self.end.to_be_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Pos> {
        let b: &[u8; 24] = b.try_into().ok()?;
        let word = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Some(Pos {
            generation: word(0),
            seq: word(8),
            end: word(16),
        })
    }
}

/// The position sled holds; `None` in a sled the journal never reached (new, or a format-1
/// store's).
pub(super) fn read_pos(trees: &Trees) -> Result<Option<Pos>, StoreError> {
    match trees.get(TreeId::Default).get(POS_KEY)? {
        None => Ok(None),
        Some(v) => Pos::decode(&v)
            .map(Some)
            .ok_or_else(|| StoreError::corrupt("the journal position (key `journal`)")),
    }
}

fn write_pos(trees: &Trees, pos: Pos) -> Result<(), StoreError> {
    trees
        .get(TreeId::Default)
        .insert(POS_KEY, &pos.encode()[..])?;
    Ok(())
}

/// A journal's first frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Head {
    /// Tells one journal file from the one it replaced.
    pub generation: u64,
    /// The seq of the snapshot that follows; changes go on from `base_seq + 1`.
    pub base_seq: u64,
    /// Bytes of the head and snapshot (what compaction compares the journal's length with).
    pub base_len: u64,
    pub created: u64,
}

impl Head {
    fn frame(&self) -> Vec<u8> {
        let mut f = FrameBuf::new(KIND_HEAD, self.base_seq);
        f.0.extend_from_slice(&self.generation.to_le_bytes());
        f.0.extend_from_slice(&self.base_len.to_le_bytes());
        f.0.extend_from_slice(&self.created.to_le_bytes());
        f.finish()
    }
}

/// A frame being encoded: header space, kind and seq, then the body.
struct FrameBuf(Vec<u8>);

impl FrameBuf {
    fn new(kind: u8, seq: u64) -> FrameBuf {
        let mut v = Vec::with_capacity(256);
        v.extend_from_slice(&[0; FRAME_HEAD]);
        v.push(kind);
        v.extend_from_slice(&seq.to_le_bytes());
        FrameBuf(v)
    }

    fn op(&mut self, op: &Op) {
        let v = &mut self.0;
        v.reserve(op.encoded_len());
        v.push(u8::from(op.value.is_some()));
        let name = op.tree.name().as_bytes();
        v.push(name.len() as u8);
        v.extend_from_slice(name);
        v.extend_from_slice(&(op.key.len() as u32).to_le_bytes());
        v.extend_from_slice(&op.key);
        if let Some(value) = &op.value {
            v.extend_from_slice(&(value.len() as u32).to_le_bytes());
            v.extend_from_slice(value);
        }
    }

    fn body_len(&self) -> usize {
        self.0.len() - FRAME_HEAD - PAYLOAD_HEAD
    }

    /// Fill in magic, length and check.
    fn finish(mut self) -> Vec<u8> {
        let len = (self.0.len() - FRAME_HEAD) as u32;
        let check = check_of(len, &self.0[FRAME_HEAD..]);
        self.0[..4].copy_from_slice(&MAGIC);
        self.0[4..8].copy_from_slice(&len.to_le_bytes());
        self.0[8..FRAME_HEAD].copy_from_slice(&check);
        self.0
    }
}

fn check_of(len: u32, payload: &[u8]) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    h.update(&len.to_le_bytes());
    h.update(payload);
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

/// The frame of one change.
pub(super) fn change_frame(seq: u64, ops: &[Op]) -> Vec<u8> {
    let mut f = FrameBuf::new(KIND_CHANGE, seq);
    for op in ops {
        f.op(op);
    }
    f.finish()
}

/// What a frame holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Body {
    Head(Head),
    Snap(Vec<Op>),
    Change(Vec<Op>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Frame {
    pub offset: u64,
    pub seq: u64,
    pub body: Body,
}

/// Decode a payload (checked already).
fn decode_payload(payload: &[u8], offset: u64) -> Result<Frame, &'static str> {
    if payload.len() < PAYLOAD_HEAD {
        return Err("its payload is too short");
    }
    let kind = payload[0];
    let seq = u64::from_le_bytes(payload[1..9].try_into().expect("8 bytes"));
    let body = &payload[PAYLOAD_HEAD..];
    let body = match kind {
        KIND_HEAD => {
            if body.len() != HEAD_BODY {
                return Err("its head has the wrong length");
            }
            let word = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().expect("8 bytes"));
            Body::Head(Head {
                generation: word(0),
                base_seq: seq,
                base_len: word(8),
                created: word(16),
            })
        }
        KIND_SNAP => Body::Snap(decode_ops(body)?),
        KIND_CHANGE => Body::Change(decode_ops(body)?),
        _ => return Err("it is of an unknown kind"),
    };
    Ok(Frame { offset, seq, body })
}

fn decode_ops(mut b: &[u8]) -> Result<Vec<Op>, &'static str> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], &'static str> {
        if b.len() < n {
            return Err("an operation runs past its frame");
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(head)
    }
    fn len32(b: &mut &[u8]) -> Result<usize, &'static str> {
        Ok(u32::from_le_bytes(take(b, 4)?.try_into().expect("4 bytes")) as usize)
    }
    let mut ops = Vec::new();
    while !b.is_empty() {
        let tag = take(&mut b, 1)?[0];
        let name_len = take(&mut b, 1)?[0] as usize;
        let tree = TreeId::from_name(take(&mut b, name_len)?).ok_or("it names an unknown tree")?;
        let key_len = len32(&mut b)?;
        let key = take(&mut b, key_len)?.to_vec();
        let value = match tag {
            0 => None,
            1 => {
                let value_len = len32(&mut b)?;
                Some(take(&mut b, value_len)?.to_vec())
            }
            _ => return Err("an operation is neither insert nor remove"),
        };
        ops.push(Op { tree, key, value });
    }
    Ok(ops)
}

/// Why reading stopped before the end of the file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Stop {
    /// Where the first frame that could not be used begins.
    pub offset: u64,
    /// Bytes from there to the end of the file.
    pub bytes: u64,
    pub reason: String,
}

/// What is expected next, to tell frames in their place from frames out of it.
#[derive(Debug, Clone, Copy)]
enum Expect {
    Head,
    /// A snapshot frame of this base, or the first change after it.
    SnapOrChange {
        base: u64,
    },
    /// The change with this seq.
    Change {
        seq: u64,
    },
}

/// Reads frames one by one from an offset, checking each and its place in the sequence; the
/// first that does not fit ends the reading ([`Frames::stop`]).
pub(super) struct Frames {
    reader: io::BufReader<File>,
    path: PathBuf,
    offset: u64,
    len: u64,
    expect: Expect,
    last_seq: u64,
    head: Option<Head>,
    stop: Option<Stop>,
}

impl Frames {
    /// From the start of `path`: a head first.
    pub(super) fn from_start(path: &Path) -> Result<Frames, StoreError> {
        Frames::open(path, 0, Expect::Head, 0)
    }

    /// From `pos.end`, where the change after `pos.seq` should begin.
    fn after(path: &Path, pos: Pos) -> Result<Frames, StoreError> {
        Frames::open(path, pos.end, Expect::Change { seq: pos.seq + 1 }, pos.seq)
    }

    fn open(path: &Path, offset: u64, expect: Expect, last_seq: u64) -> Result<Frames, StoreError> {
        use std::io::Seek;
        let mut file = File::open(path).map_err(StoreError::io("open", path))?;
        let len = file
            .metadata()
            .map_err(StoreError::io("inspect", path))?
            .len();
        file.seek(io::SeekFrom::Start(offset))
            .map_err(StoreError::io("read", path))?;
        Ok(Frames {
            reader: io::BufReader::with_capacity(64 << 10, file),
            path: path.to_path_buf(),
            offset,
            len,
            expect,
            last_seq,
            head: None,
            stop: None,
        })
    }

    /// The next frame in its place; `None` at the end of the file or at the first frame that
    /// is torn, damaged or out of place (then [`Frames::stop`] says which and why).
    pub(super) fn next_frame(&mut self) -> Result<Option<Frame>, StoreError> {
        if self.stop.is_some() || self.offset == self.len {
            return Ok(None);
        }
        match self.read_one()? {
            Ok(frame) => Ok(Some(frame)),
            Err(reason) => {
                self.stop = Some(Stop {
                    offset: self.offset,
                    bytes: self.len - self.offset,
                    reason: reason.to_string(),
                });
                Ok(None)
            }
        }
    }

    fn read_one(&mut self) -> Result<Result<Frame, &'static str>, StoreError> {
        let left = self.len - self.offset;
        if left < FRAME_HEAD as u64 {
            return Ok(Err(
                "a frame's header runs past the end of the file (a torn write)",
            ));
        }
        let mut head = [0u8; FRAME_HEAD];
        self.read_exact(&mut head)?;
        if head[..4] != MAGIC {
            return Ok(Err("no frame begins there"));
        }
        let len = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
        if len as u64 > left - FRAME_HEAD as u64 {
            return Ok(Err("a frame runs past the end of the file (a torn write)"));
        }
        let mut payload = vec![0u8; len as usize];
        self.read_exact(&mut payload)?;
        if check_of(len, &payload) != head[8..] {
            return Ok(Err("a frame's checksum does not match its bytes"));
        }
        let frame = match decode_payload(&payload, self.offset) {
            Ok(f) => f,
            Err(reason) => return Ok(Err(reason)),
        };
        let fits = match (&frame.body, self.expect) {
            (Body::Head(_), Expect::Head) => true,
            (Body::Snap(_), Expect::SnapOrChange { base }) => frame.seq == base,
            (Body::Change(_), Expect::SnapOrChange { base }) => frame.seq == base + 1,
            (Body::Change(_), Expect::Change { seq }) => frame.seq == seq,
            _ => false,
        };
        if !fits {
            return Ok(Err("a frame is out of sequence"));
        }
        self.expect = match &frame.body {
            Body::Head(h) => {
                self.head = Some(*h);
                Expect::SnapOrChange { base: h.base_seq }
            }
            Body::Snap(_) => self.expect,
            Body::Change(_) => Expect::Change { seq: frame.seq + 1 },
        };
        self.last_seq = frame.seq;
        self.offset += FRAME_HEAD as u64 + len as u64;
        Ok(Ok(frame))
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), StoreError> {
        self.reader
            .read_exact(buf)
            .map_err(StoreError::io("read", &self.path))
    }

    /// The head read, if reading began at the start and got that far.
    pub(super) fn head(&self) -> Option<Head> {
        self.head
    }

    /// The seq of the last frame read (the base for a snapshot's frames).
    pub(super) fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The offset just after the last frame read.
    pub(super) fn end(&self) -> u64 {
        self.offset
    }

    /// Why reading stopped before the end of the file, once it has.
    pub(super) fn stop(&self) -> Option<&Stop> {
        self.stop.as_ref()
    }

    /// How many whole frames lie after the frame reading stopped at: none for a torn tail (a
    /// kill mid-append), some when bytes were damaged in the middle of the journal.
    pub(super) fn frames_after_stop(&self) -> Result<usize, StoreError> {
        let Some(stop) = &self.stop else {
            return Ok(0);
        };
        let mut rest = Vec::new();
        let mut file = File::open(&self.path).map_err(StoreError::io("open", &self.path))?;
        use std::io::Seek;
        file.seek(io::SeekFrom::Start(stop.offset + 1))
            .map_err(StoreError::io("read", &self.path))?;
        file.read_to_end(&mut rest)
            .map_err(StoreError::io("read", &self.path))?;
        Ok(count_frames(&rest))
    }
}

/// Whole, checked frames found anywhere in `bytes` (looking for each magic).
fn count_frames(bytes: &[u8]) -> usize {
    let mut n = 0;
    let mut i = 0;
    while i + FRAME_HEAD <= bytes.len() {
        if bytes[i..i + 4] != MAGIC {
            i += 1;
            continue;
        }
        let len = u32::from_le_bytes(bytes[i + 4..i + 8].try_into().expect("4 bytes"));
        let start = i + FRAME_HEAD;
        match start.checked_add(len as usize) {
            Some(end)
                if end <= bytes.len()
                    && check_of(len, &bytes[start..end]) == bytes[i + 8..start] =>
            {
                n += 1;
                i = end;
            }
            _ => i += 1,
        }
    }
    n
}

/// The journal being appended to.
pub(super) struct Journal {
    file: File,
    path: PathBuf,
    pub(super) generation: u64,
    /// The last change written (and, unless `poisoned`, applied to sled).
    pub(super) seq: u64,
    /// The offset after it: where the next change goes.
    pub(super) end: u64,
    base_len: u64,
    /// A change reached the journal but not sled, or a failed append could not be cut off:
    /// further writes in this process would make the two disagree. The next open repairs it.
    poisoned: bool,
}

impl Journal {
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn pos(&self) -> Pos {
        Pos {
            generation: self.generation,
            seq: self.seq,
            end: self.end,
        }
    }

    /// Append one change and make it durable; the position sled is to record with it.
    /// On failure nothing of it stays in the file (it is cut off again), or, if even that
    /// fails, the journal refuses every later write of this process.
    pub(super) fn append(&mut self, ops: &[Op]) -> Result<Pos, StoreError> {
        self.usable()?;
        let seq = self.seq + 1;
        let frame = change_frame(seq, ops);
        let written = self
            .file
            .write_all_at(&frame, self.end)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // A later frame must follow a whole one, or a rebuild would stop before it.
            let cut = self
                .file
                .set_len(self.end)
                .and_then(|()| self.file.sync_data());
            if cut.is_err() {
                self.poisoned = true;
            }
            return Err(StoreError::io("append to", &self.path)(e));
        }
        self.seq = seq;
        self.end += frame.len() as u64;
        Ok(self.pos())
    }

    /// Refuse every later write of this process (see `poisoned`).
    pub(super) fn poison(&mut self) {
        self.poisoned = true;
    }

    pub(super) fn usable(&self) -> Result<(), StoreError> {
        if self.poisoned {
            return Err(StoreError::JournalPoisoned {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    /// Whether the journal has outgrown its snapshot enough to compact it.
    pub(super) fn outgrown(&self) -> bool {
        outgrown(self.end, self.base_len)
    }
}

pub(super) fn outgrown(len: u64, base_len: u64) -> bool {
    len > base_len
        .saturating_mul(COMPACT_FACTOR)
        .saturating_add(COMPACT_SLACK)
}

/// A generation unlike the previous one's: the time and the process.
fn new_generation() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let h = blake3::hash(format!("{nanos}-{}", std::process::id()).as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// Write a new journal holding a snapshot of every record in `trees` at `base_seq`, and put
/// it in place of `journal/log` atomically (a temporary file, fsynced, renamed, the directory
/// fsynced). Sled's position is not changed: the caller records the returned journal's.
pub(super) fn write_snapshot(
    root: &Path,
    trees: &Trees,
    base_seq: u64,
) -> Result<Journal, StoreError> {
    let dir = root.join(DIR);
    fsutil::ensure_dir(&dir)?;
    let tmp = dir.join(format!("{FILE}.tmp-{}", std::process::id()));
    let path = dir.join(FILE);
    let written = snapshot_into(&tmp, trees, base_seq);
    let (file, head) = match written {
        Ok(w) => w,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    fs::rename(&tmp, &path).map_err(StoreError::io("move into place", &tmp))?;
    fsutil::fsync_dir(&dir)?;
    Ok(Journal {
        file,
        path,
        generation: head.generation,
        seq: base_seq,
        end: head.base_len,
        base_len: head.base_len,
        poisoned: false,
    })
}

fn snapshot_into(tmp: &Path, trees: &Trees, base_seq: u64) -> Result<(File, Head), StoreError> {
    use std::io::Write;
    let io = StoreError::io("write", tmp);
    let file = File::create(tmp).map_err(StoreError::io("create", tmp))?;
    let mut head = Head {
        generation: new_generation(),
        base_seq,
        base_len: 0,
        created: super::now_millis(),
    };
    let mut out = io::BufWriter::with_capacity(SNAP_CHUNK, &file);
    let mut frame = FrameBuf::new(KIND_SNAP, base_seq);
    let write = |out: &mut io::BufWriter<&File>, bytes: &[u8]| {
        out.write_all(bytes)
            .map_err(|e| StoreError::io("write", tmp)(e))
    };
    write(&mut out, &head.frame())?;
    for tree in TreeId::ALL {
        for item in trees.get(tree).iter() {
            let (key, value) = item?;
            if tree == TreeId::Default && &*key == POS_KEY {
                continue;
            }
            frame.op(&Op::insert(tree, key.to_vec(), value.to_vec()));
            if frame.body_len() >= SNAP_CHUNK {
                let full = std::mem::replace(&mut frame, FrameBuf::new(KIND_SNAP, base_seq));
                write(&mut out, &full.finish())?;
            }
        }
    }
    if frame.body_len() > 0 {
        write(&mut out, &frame.finish())?;
    }
    out.flush().map_err(StoreError::io("write", tmp))?;
    drop(out);
    head.base_len = file
        .metadata()
        .map_err(StoreError::io("inspect", tmp))?
        .len();
    // The head's length is fixed: it is rewritten in place with the snapshot's length.
    file.write_all_at(&head.frame(), 0)
        .and_then(|()| file.sync_all())
        .map_err(io)?;
    Ok((file, head))
}

/// Whether the store at `root` has a journal holding any record or change: what a lost
/// `meta/` could be rebuilt from.
pub(super) fn holds_records(root: &Path) -> Result<bool, StoreError> {
    let path = root.join(DIR).join(FILE);
    match fs::metadata(&path) {
        Ok(m) => Ok(m.len() > HEAD_FRAME_LEN),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(StoreError::io("inspect", &path)(e)),
    }
}

/// What the open of a store does with its journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    /// It holds the store's lock: it may redo, cut off, heal and upgrade.
    Write,
    /// A copy of a read-only store's metadata: changes sled lacks are applied to the copy;
    /// the journal itself is left as it is.
    ReadOnly,
}

/// Bring sled and the journal into step as the store opens, and return the journal to append
/// to (`None` for a read-only store). `version` is the store's format: a format-1 store has
/// no journal yet and gets one, from sled.
///
/// Sled's position (generation, seq, end) against the journal's file:
/// - the same generation and the file ends where sled's position does: in step (the usual
///   case: only the head and the file's length are read);
/// - the file is longer: changes after sled's (the one in flight at a kill) are applied to
///   sled, and a torn tail is cut off;
/// - the file is shorter, missing, or of a generation that does not reach sled's seq: the
///   journal lost what sled holds, and a new one is written from sled;
/// - sled holds no position but the journal holds records: `meta/` was lost or emptied, and
///   only `needle verify --rebuild` restores it ([`StoreError::MetaLost`]).
pub(super) fn reconcile(
    root: &Path,
    trees: &Trees,
    db: &Sled,
    version: u32,
    access: Access,
) -> Result<Option<Journal>, StoreError> {
    let writable = access == Access::Write;
    let path = root.join(DIR).join(FILE);
    if version == 1 {
        if !writable {
            return Ok(None);
        }
        return upgrade(root, trees, db).map(Some);
    }
    let pos = read_pos(trees)?;
    let has_file = fsutil::exists(&path)?;
    if !has_file {
        if !writable {
            return Ok(None);
        }
        if pos.is_some() || has_records(trees)? {
            tracing::warn!(
                "the store's journal `{}` is missing: writing a new one from its metadata",
                path.display()
            );
        }
        return snapshot_and_record(root, trees, db, pos.map_or(0, |p| p.seq)).map(Some);
    }
    if writable {
        remove_temporaries(&root.join(DIR))?;
    }
    let file_len = fs::metadata(&path)
        .map_err(StoreError::io("inspect", &path))?
        .len();
    let mut from_start = Frames::from_start(&path)?;
    let head = match from_start.next_frame()? {
        Some(Frame {
            body: Body::Head(h),
            ..
        }) => h,
        _ => {
            // No readable head: the journal cannot be used. Sled can write a new one, unless
            // it has nothing (then there is nothing left to restore from either).
            if pos.is_none() && !has_records(trees)? {
                return Err(StoreError::JournalDamaged {
                    path,
                    reason: from_start
                        .stop()
                        .map_or("it is empty".into(), |s| s.reason.clone()),
                });
            }
            if !writable {
                return Ok(None);
            }
            return heal(root, trees, db, pos, "its head is unreadable").map(|(j, _)| Some(j));
        }
    };
    let Some(pos) = pos else {
        if file_len == HEAD_FRAME_LEN {
            // A journal of nothing: a store created, and no record written yet.
            if has_records(trees)? {
                if !writable {
                    return Ok(None);
                }
                return heal(
                    root,
                    trees,
                    db,
                    None,
                    "it lacks the records the metadata holds",
                )
                .map(|(j, _)| Some(j));
            }
            let journal = Journal::resume(&path, head, head.base_seq, file_len, writable)?;
            if let Some(j) = &journal {
                write_pos(trees, j.pos())?;
                db.flush()?;
            }
            return Ok(journal);
        }
        return Err(if has_records(trees)? {
            StoreError::MetaUnmatched {
                root: root.to_path_buf(),
            }
        } else {
            StoreError::MetaLost {
                root: root.to_path_buf(),
            }
        });
    };
    let mut frames = if pos.generation == head.generation {
        if file_len < pos.end {
            if !writable {
                return Ok(None);
            }
            return heal(
                root,
                trees,
                db,
                Some(pos),
                "it is shorter than the metadata it mirrors",
            )
            .map(|(j, _)| Some(j));
        }
        Frames::after(&path, pos)?
    } else {
        // Another generation: a compaction whose position sled never recorded (a kill just
        // after it), or a journal put back by hand. Read it all to find sled's seq in it.
        if pos.seq < head.base_seq {
            // Sled is older than the journal's snapshot: the changes between are not there.
            return Err(StoreError::MetaStale {
                root: root.to_path_buf(),
            });
        }
        from_start
    };
    // Changes the journal has and sled lacks: apply them, each as its transaction was.
    let mut redone = 0u64;
    while let Some(frame) = frames.next_frame()? {
        if let Body::Change(ops) = frame.body
            && frame.seq > pos.seq
        {
            let at = Pos {
                generation: head.generation,
                seq: frame.seq,
                end: frames.end(),
            };
            apply_tx(trees, &ops, Some(at))?;
            redone += 1;
        }
    }
    if redone > 0 {
        db.flush()?;
        tracing::info!("applied {redone} change(s) from the journal that the metadata lacked");
    }
    if frames.last_seq() < pos.seq {
        if !writable {
            return Ok(None);
        }
        return heal(
            root,
            trees,
            db,
            Some(pos),
            "it ends before the metadata it mirrors",
        )
        .map(|(j, _)| Some(j));
    }
    let (seq, end) = (frames.last_seq(), frames.end());
    if let Some(stop) = frames.stop().cloned() {
        if !writable {
            return Ok(None);
        }
        if frames.frames_after_stop()? > 0 {
            // Not a torn tail: damage inside the journal. Sled holds what the journal can no
            // longer give: write a new journal from sled.
            return heal(root, trees, db, read_pos(trees)?, &stop.reason).map(|(j, _)| Some(j));
        }
        cut_torn_tail(&path, end)?;
    }
    let journal = Journal::resume(&path, head, seq, end, writable)?;
    if let Some(j) = &journal
        && read_pos(trees)? != Some(j.pos())
    {
        write_pos(trees, j.pos())?;
        db.flush()?;
    }
    Ok(journal)
}

impl Journal {
    /// The journal at `path` to append to after `seq`, at `end` (`None` when read-only).
    fn resume(
        path: &Path,
        head: Head,
        seq: u64,
        end: u64,
        writable: bool,
    ) -> Result<Option<Journal>, StoreError> {
        if !writable {
            return Ok(None);
        }
        let file = fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(StoreError::io("open", path))?;
        Ok(Some(Journal {
            file,
            path: path.to_path_buf(),
            generation: head.generation,
            seq,
            end,
            base_len: head.base_len,
            poisoned: false,
        }))
    }
}

/// Cut the journal at `end`, after its last whole frame: what follows is the torn frame of a
/// killed append, and the next append must follow a whole one.
fn cut_torn_tail(path: &Path, end: u64) -> Result<(), StoreError> {
    tracing::info!(
        "cutting a torn write off the end of the store's journal `{}`",
        path.display()
    );
    let file = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(StoreError::io("open", path))?;
    file.set_len(end)
        .and_then(|()| file.sync_all())
        .map_err(StoreError::io("truncate", path))
}

/// Temporary files of snapshots a killed process did not finish.
fn remove_temporaries(dir: &Path) -> Result<(), StoreError> {
    for entry in fs::read_dir(dir).map_err(StoreError::io("list", dir))? {
        let entry = entry.map_err(StoreError::io("list", dir))?;
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(&format!("{FILE}.tmp-"))
        {
            let path = entry.path();
            fs::remove_file(&path).map_err(StoreError::io("remove", &path))?;
        }
    }
    Ok(())
}

/// Whether any tree holds a record (the journal position aside).
fn has_records(trees: &Trees) -> Result<bool, StoreError> {
    for tree in TreeId::ALL {
        for item in trees.get(tree).iter().keys() {
            let key = item?;
            if !(tree == TreeId::Default && &*key == POS_KEY) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// A new journal from sled's records, and sled's position in it.
pub(super) fn snapshot_and_record(
    root: &Path,
    trees: &Trees,
    db: &Sled,
    base_seq: u64,
) -> Result<Journal, StoreError> {
    let journal = write_snapshot(root, trees, base_seq)?;
    write_pos(trees, journal.pos())?;
    db.flush()?;
    Ok(journal)
}

/// The journal cannot be used as it is, but sled reads whole: keep the journal aside and
/// write a new one from sled.
pub(super) fn heal(
    root: &Path,
    trees: &Trees,
    db: &Sled,
    pos: Option<Pos>,
    why: &str,
) -> Result<(Journal, PathBuf), StoreError> {
    let path = root.join(DIR).join(FILE);
    let aside = root
        .join(DIR)
        .join(format!("{FILE}.damaged-{}", super::now_millis()));
    tracing::warn!(
        "the store's journal `{}` cannot be used ({why}): keeping it as `{}` and writing a \
         new one from the store's metadata",
        path.display(),
        aside.display()
    );
    fs::rename(&path, &aside).map_err(StoreError::io("move aside", &path))?;
    let journal = snapshot_and_record(root, trees, db, pos.map_or(0, |p| p.seq))?;
    Ok((journal, aside))
}

/// The records the whole journal at `path` replays to, and where it could not be read on.
pub(super) struct Replay {
    pub records: std::collections::BTreeMap<(TreeId, Vec<u8>), Vec<u8>>,
    pub stop: Option<Stop>,
    /// Whole frames after `stop`.
    pub frames_after: usize,
}

pub(super) fn replay(path: &Path) -> Result<Replay, StoreError> {
    let mut records = std::collections::BTreeMap::new();
    let mut frames = Frames::from_start(path)?;
    while let Some(frame) = frames.next_frame()? {
        if let Body::Snap(ops) | Body::Change(ops) = frame.body {
            for op in ops {
                match op.value {
                    Some(v) => records.insert((op.tree, op.key), v),
                    None => records.remove(&(op.tree, op.key)),
                };
            }
        }
    }
    let stop = match (frames.stop(), frames.head()) {
        (Some(s), _) => Some(s.clone()),
        (None, None) => Some(Stop {
            offset: 0,
            bytes: 0,
            reason: "it is empty".into(),
        }),
        (None, Some(_)) => None,
    };
    Ok(Replay {
        records,
        frames_after: frames.frames_after_stop()?,
        stop,
    })
}

/// A format-1 store (no journal): write one from sled, then say format 2.
fn upgrade(root: &Path, trees: &Trees, db: &Sled) -> Result<Journal, StoreError> {
    tracing::info!(
        "upgrading the store `{}` to {}: writing its journal",
        root.display(),
        super::FORMAT
    );
    let journal = snapshot_and_record(root, trees, db, 0)?;
    super::write_format(root)?;
    Ok(journal)
}

/// Apply one change to sled in one transaction, recording `pos` with it.
pub(super) fn apply_tx(trees: &Trees, ops: &[Op], pos: Option<Pos>) -> Result<(), StoreError> {
    use sled::transaction::{ConflictableTransactionError, Transactional};
    let mut ids: Vec<TreeId> = ops.iter().map(|o| o.tree).collect();
    if pos.is_some() {
        ids.push(TreeId::Default);
    }
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        return Ok(());
    }
    let handles: Vec<&sled::Tree> = ids.iter().map(|t| trees.get(*t)).collect();
    let slot = |t: TreeId| {
        ids.binary_search(&t)
            .expect("every op's tree is in the transaction")
    };
    let pos = pos.map(|p| p.encode());
    handles[..]
        .transaction(|tx| {
            for op in ops {
                let tree = &tx[slot(op.tree)];
                match &op.value {
                    Some(v) => {
                        tree.insert(op.key.as_slice(), v.as_slice())?;
                    }
                    None => {
                        tree.remove(op.key.as_slice())?;
                    }
                }
            }
            if let Some(p) = &pos {
                tx[slot(TreeId::Default)].insert(POS_KEY, &p[..])?;
            }
            Ok::<(), ConflictableTransactionError<()>>(())
        })
        .map_err(super::meta::tx_error)
}

#[cfg(test)]
mod tests;
