//! The journal's framing: what a reader takes from whole, torn, flipped and empty files.

use std::fs;
use std::path::Path;

use super::*;

fn head(base_seq: u64) -> Head {
    Head {
        generation: 7,
        base_seq,
        base_len: HEAD_FRAME_LEN,
        created: 1,
    }
}

/// Three changes of different shapes: inserts, a remove, an empty value, a binary key.
fn changes() -> Vec<Vec<Op>> {
    vec![
        vec![
            Op::insert(TreeId::Steps, b"k1".to_vec(), b"{\"a\":1}".to_vec()),
            Op::insert(TreeId::Producers, b"a/k1".to_vec(), Vec::new()),
        ],
        vec![Op::remove(TreeId::Steps, b"k1".to_vec())],
        vec![
            Op::insert(TreeId::Default, b"next_run_id".to_vec(), 3u64.to_be_bytes()),
            Op::insert(
                TreeId::RunProgress,
                vec![0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 1],
                vec![b'x'; 300],
            ),
        ],
    ]
}

/// A journal file of a head at `base_seq` and `changes` after it; the offset each frame
/// begins at, and the file's length last.
fn write_journal(path: &Path, base_seq: u64, changes: &[Vec<Op>]) -> Vec<u64> {
    let mut bytes = head(base_seq).frame();
    let mut offsets = vec![0];
    for (i, ops) in changes.iter().enumerate() {
        offsets.push(bytes.len() as u64);
        bytes.extend(change_frame(base_seq + 1 + i as u64, ops));
    }
    offsets.push(bytes.len() as u64);
    fs::write(path, bytes).unwrap();
    offsets
}

/// Every frame a reader takes from `path`, and the reader (to ask why it stopped).
fn read_all(path: &Path) -> (Vec<Frame>, Frames) {
    let mut frames = Frames::from_start(path).unwrap();
    let mut out = Vec::new();
    while let Some(f) = frames.next_frame().unwrap() {
        out.push(f);
    }
    (out, frames)
}

fn ops_of(frames: &[Frame]) -> Vec<Vec<Op>> {
    frames
        .iter()
        .filter_map(|f| match &f.body {
            Body::Change(ops) => Some(ops.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn frames_read_back_as_written() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("log");
    let offsets = write_journal(&path, 10, &changes());
    let (frames, reader) = read_all(&path);
    assert_eq!(frames[0].body, Body::Head(head(10)));
    assert_eq!(ops_of(&frames), changes());
    assert_eq!(
        frames.iter().map(|f| f.seq).collect::<Vec<_>>(),
        [10, 11, 12, 13]
    );
    assert_eq!(
        frames.iter().map(|f| f.offset).collect::<Vec<_>>(),
        offsets[..4]
    );
    assert_eq!(reader.end(), offsets[4]);
    assert_eq!(reader.last_seq(), 13);
    assert_eq!(reader.stop(), None);
    assert_eq!(head(0).frame().len() as u64, HEAD_FRAME_LEN);
}

#[test]
fn a_torn_tail_is_ignored_at_every_length() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("log");
    let offsets = write_journal(&path, 0, &changes());
    let whole = fs::read(&path).unwrap();
    let (last_start, end) = (offsets[3] as usize, offsets[4] as usize);
    // Every length a kill in the middle of the last append can leave, header included.
    for cut in last_start + 1..end {
        fs::write(&path, &whole[..cut]).unwrap();
        let (frames, reader) = read_all(&path);
        assert_eq!(ops_of(&frames), changes()[..2], "cut at {cut}");
        assert_eq!(reader.end(), last_start as u64, "cut at {cut}");
        let stop = reader.stop().expect("a stop");
        assert_eq!(stop.offset, last_start as u64);
        assert_eq!(stop.bytes, (cut - last_start) as u64);
        assert_eq!(reader.frames_after_stop().unwrap(), 0, "cut at {cut}");
    }
    // Cut exactly between frames: nothing is torn.
    fs::write(&path, &whole[..last_start]).unwrap();
    let (frames, reader) = read_all(&path);
    assert_eq!(ops_of(&frames).len(), 2);
    assert_eq!(reader.stop(), None);
}

#[test]
fn a_flipped_bit_stops_the_reading_at_its_frame_and_the_frames_after_are_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("log");
    let offsets = write_journal(&path, 0, &changes());
    let whole = fs::read(&path).unwrap();
    // Every byte of the middle change, each bit in turn.
    for i in offsets[2] as usize..offsets[3] as usize {
        for bit in 0..8 {
            let mut bytes = whole.clone();
            bytes[i] ^= 1 << bit;
            fs::write(&path, &bytes).unwrap();
            let (frames, reader) = read_all(&path);
            assert_eq!(ops_of(&frames), changes()[..1], "byte {i} bit {bit}");
            assert_eq!(reader.stop().unwrap().offset, offsets[2]);
            assert_eq!(reader.frames_after_stop().unwrap(), 1, "byte {i} bit {bit}");
        }
    }
    // A flip in the head: nothing can be read.
    let mut bytes = whole.clone();
    bytes[HEAD_FRAME_LEN as usize - 1] ^= 1;
    fs::write(&path, &bytes).unwrap();
    let (frames, reader) = read_all(&path);
    assert!(frames.is_empty());
    assert_eq!(reader.head(), None);
    assert_eq!(reader.frames_after_stop().unwrap(), 3);
}

#[test]
fn an_empty_file_or_a_head_alone_holds_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("log");
    fs::write(&path, b"").unwrap();
    let (frames, reader) = read_all(&path);
    assert!(frames.is_empty());
    assert_eq!(reader.head(), None);
    assert_eq!(reader.stop(), None, "nothing to stop at");

    write_journal(&path, 0, &[]);
    let (frames, reader) = read_all(&path);
    assert_eq!(frames.len(), 1);
    assert_eq!(reader.head(), Some(head(0)));
    assert_eq!(reader.end(), HEAD_FRAME_LEN);

    // Zeros where frames should be (a filesystem that lost a write's data, not its length).
    let mut bytes = fs::read(&path).unwrap();
    bytes.extend([0u8; 100]);
    fs::write(&path, &bytes).unwrap();
    let (frames, reader) = read_all(&path);
    assert_eq!(frames.len(), 1);
    assert_eq!(reader.stop().unwrap().reason, "no frame begins there");
    assert_eq!(reader.frames_after_stop().unwrap(), 0);
}

#[test]
fn a_frame_out_of_sequence_is_not_taken() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("log");
    let c = changes();
    // A change repeated (seq 1 twice), then a head in the middle.
    let mut bytes = head(0).frame();
    bytes.extend(change_frame(1, &c[0]));
    let second = bytes.len() as u64;
    bytes.extend(change_frame(1, &c[1]));
    fs::write(&path, &bytes).unwrap();
    let (frames, reader) = read_all(&path);
    assert_eq!(ops_of(&frames), c[..1]);
    assert_eq!(reader.stop().unwrap().offset, second);
    assert_eq!(reader.stop().unwrap().reason, "a frame is out of sequence");

    let mut bytes = head(0).frame();
    bytes.extend(change_frame(1, &c[0]));
    bytes.extend(head(1).frame());
    fs::write(&path, &bytes).unwrap();
    let (frames, _) = read_all(&path);
    assert_eq!(ops_of(&frames), c[..1]);
}

#[test]
fn reading_from_a_position_takes_only_the_changes_after_it() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("log");
    let offsets = write_journal(&path, 4, &changes());
    let pos = Pos {
        generation: 7,
        seq: 5,
        end: offsets[2],
    };
    let mut frames = Frames::after(&path, pos).unwrap();
    let mut seqs = Vec::new();
    while let Some(f) = frames.next_frame().unwrap() {
        seqs.push(f.seq);
    }
    assert_eq!(seqs, [6, 7]);
    assert_eq!(Pos::decode(&pos.encode()), Some(pos));
}

#[test]
fn the_journal_is_compacted_once_it_outgrows_its_snapshot() {
    assert!(!outgrown(HEAD_FRAME_LEN, HEAD_FRAME_LEN));
    assert!(!outgrown(COMPACT_SLACK, 0));
    assert!(outgrown(COMPACT_SLACK + 1, 0));
    let base = 100 << 20;
    assert!(!outgrown(COMPACT_FACTOR * base + COMPACT_SLACK, base));
    assert!(outgrown(COMPACT_FACTOR * base + COMPACT_SLACK + 1, base));
}
