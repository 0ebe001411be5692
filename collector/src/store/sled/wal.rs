//! The write-ahead log of the `graph` tree: every commit's writes (whole records, as stored),
//! appended to a segment file and made durable by `fdatasync` before anyone is told.
//!
//! Files live in `<data dir>/wal/`, one per segment, named by the segment's number (20 decimal
//! digits, `.wal`), so listing them in name order lists them in commit order. A segment starts
//! with [`MAGIC`]; then frames, one per commit:
//!
//! ```text
//! u32 LE payload length | u32 LE CRC-32 of the payload | payload
//! payload: records, each: u32 LE key length | key | u8 1 (set) or 0 (remove)
//!                         [| u32 LE value length | value]   (set only)
//! ```
//!
//! A frame is the unit of atomicity: a commit is in the log whole or not at all. Only the last
//! segment may end in a torn frame (a crash in the middle of a write that was never
//! acknowledged: an acknowledgement waits for the `fdatasync` after it); a bad frame anywhere
//! else is corruption, and reported as such.

use std::{
    fs::{self, File, OpenOptions},
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
};

use super::StoreError;

/// The first bytes of every segment.
pub(super) const MAGIC: &[u8; 8] = b"CZWAL\0\0\x01";
/// Frame header: payload length and CRC.
const HEADER: usize = 8;
/// The largest payload a frame may claim: bigger is a torn or corrupt length.
const MAX_FRAME: usize = 1 << 30;

/// One write of a record: key, and its new value (`None` removes it).
#[cfg(test)]
pub(super) type Record = (Vec<u8>, Option<Vec<u8>>);

/// Appends one frame holding `writes` to `out` (nothing when there are none).
#[cfg(test)]
pub(super) fn encode_frame(writes: &[Record], out: &mut Vec<u8>) -> Result<(), StoreError> {
    let mut frame = Frame::with_capacity(0);
    for (k, v) in writes {
        frame.put(k, v.as_deref())?;
    }
    frame.seal()?;
    out.extend_from_slice(frame.bytes());
    Ok(())
}

/// One commit's frame, built in place: each record is encoded straight into the bytes the log
/// stores, so a commit's writes are encoded once, with no allocation of their own, and copied
/// once (into the log's buffer); the write buffer takes them from here too
/// ([`Frame::for_each`]).
#[derive(Debug)]
pub(super) struct Frame {
    /// The header's room, then the payload.
    buf: Vec<u8>,
    records: usize,
}

impl Frame {
    /// An empty frame with room for about `bytes` of records.
    pub(super) fn with_capacity(bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(HEADER + bytes);
        buf.extend_from_slice(&[0; HEADER]);
        Frame { buf, records: 0 }
    }

    /// Appends a record set to a value: `key` and `value` append its key and its value to the
    /// vector they are given. A failed `value` leaves the frame as it was.
    pub(super) fn set(
        &mut self,
        key: impl FnOnce(&mut Vec<u8>),
        value: impl FnOnce(&mut Vec<u8>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let start = self.buf.len();
        let result = self.key(key).and_then(|()| {
            self.buf.push(1);
            let at = self.buf.len();
            self.buf.extend_from_slice(&[0; 4]);
            value(&mut self.buf)?;
            self.patch_len(at)
        });
        self.done(start, result)
    }

    /// Appends the removal of a record.
    pub(super) fn remove(&mut self, key: impl FnOnce(&mut Vec<u8>)) -> Result<(), StoreError> {
        let start = self.buf.len();
        let result = self.key(key).map(|()| self.buf.push(0));
        self.done(start, result)
    }

    /// Appends a record from its bytes (`None` removes it).
    pub(super) fn put(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), StoreError> {
        let key = |out: &mut Vec<u8>| out.extend_from_slice(key);
        match value {
            Some(v) => self.set(key, |out| {
                out.extend_from_slice(v);
                Ok(())
            }),
            None => self.remove(key),
        }
    }

    fn key(&mut self, key: impl FnOnce(&mut Vec<u8>)) -> Result<(), StoreError> {
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        key(&mut self.buf);
        self.patch_len(at)
    }

    /// Writes the length of what follows the 4 bytes at `at` into them.
    fn patch_len(&mut self, at: usize) -> Result<(), StoreError> {
        let len = u32::try_from(self.buf.len() - at - 4)
            .map_err(|_| StoreError::Engine("a record longer than 4 GiB".into()))?;
        self.buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
        Ok(())
    }

    fn done(&mut self, start: usize, result: Result<(), StoreError>) -> Result<(), StoreError> {
        match result {
            Ok(()) => self.records += 1,
            Err(_) => self.buf.truncate(start),
        }
        result
    }

    /// Writes the frame's length and CRC, once every record is in: [`Frame::bytes`] is then
    /// the frame as the log stores it.
    pub(super) fn seal(&mut self) -> Result<(), StoreError> {
        if self.records == 0 {
            return Ok(());
        }
        let payload = self.buf.len() - HEADER;
        if payload > MAX_FRAME {
            return Err(StoreError::Engine(format!(
                "one commit of {payload} bytes is larger than the log's frames may be"
            )));
        }
        let crc = crc32fast::hash(&self.buf[HEADER..]);
        self.buf[..4].copy_from_slice(&(payload as u32).to_le_bytes());
        self.buf[4..HEADER].copy_from_slice(&crc.to_le_bytes());
        Ok(())
    }

    /// The sealed frame's bytes: nothing when it holds no records (no frame is written for
    /// them).
    pub(super) fn bytes(&self) -> &[u8] {
        if self.records == 0 { &[] } else { &self.buf }
    }

    /// Hands each record to `apply`, in order, as [`read_segment`] would.
    pub(super) fn for_each(&self, mut apply: impl FnMut(&[u8], Option<&[u8]>)) {
        // Written by this frame's own methods: always well formed.
        let parsed = records(&self.buf[HEADER..], &mut apply);
        debug_assert!(parsed, "a frame built here does not parse");
    }
}

/// What reading a segment found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Replay {
    /// Frames read whole.
    pub frames: u64,
    /// Bytes after the last whole frame (a torn write), ignored.
    pub torn_bytes: u64,
}

/// Reads the frames of a segment in order, handing each frame's records to `apply`. A bad
/// frame ends the segment: allowed (and counted in [`Replay::torn_bytes`]) only when `last`.
pub(super) fn read_segment(
    path: &Path,
    last: bool,
    apply: impl FnMut(&[u8], Option<&[u8]>),
) -> Result<Replay, StoreError> {
    read_segment_upto(path, last, u64::MAX, apply)
}

/// Reads a segment as [`read_segment`] does, only its first `limit` bytes: what is known to be
/// durable of a segment whose last write failed (the bytes after may hold whole frames of a
/// write that was never acknowledged).
pub(super) fn read_segment_upto(
    path: &Path,
    last: bool,
    limit: u64,
    mut apply: impl FnMut(&[u8], Option<&[u8]>),
) -> Result<Replay, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        key: path.display().to_string(),
        reason,
    };
    let io = |e: std::io::Error| StoreError::Engine(format!("reading {}: {e}", path.display()));
    let file = File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len().min(limit);
    let mut r = std::io::BufReader::with_capacity(1 << 20, file);
    let mut replay = Replay::default();
    let mut magic = Vec::with_capacity(MAGIC.len());
    (&mut r)
        .take(MAGIC.len() as u64)
        .read_to_end(&mut magic)
        .map_err(io)?;
    if magic != MAGIC {
        // A segment is created with its magic and synced before any frame is written to it:
        // a shorter file is a crash while it was being created.
        if last && MAGIC.starts_with(&magic) {
            replay.torn_bytes = magic.len() as u64;
            return Ok(replay);
        }
        return Err(corrupt("not a census write-ahead log segment".into()));
    }
    let mut at = MAGIC.len() as u64;
    let mut payload = Vec::new();
    while at < size {
        if !read_frame(&mut r, size - at, &mut payload).map_err(io)? {
            if last {
                replay.torn_bytes = size - at;
                break;
            }
            return Err(corrupt(format!(
                "bad frame at byte {at} of a segment that later segments follow"
            )));
        }
        if !records(&payload, &mut apply) {
            return Err(corrupt(format!(
                "frame at byte {at} holds malformed records"
            )));
        }
        replay.frames += 1;
        at += (HEADER + payload.len()) as u64;
    }
    Ok(replay)
}

/// Reads the next frame's payload into `payload`; `false` when it is incomplete (fewer than
/// `left` bytes hold it) or does not check out.
fn read_frame(
    r: &mut impl std::io::Read,
    left: u64,
    payload: &mut Vec<u8>,
) -> std::io::Result<bool> {
    if left < HEADER as u64 {
        return Ok(false);
    }
    let mut header = [0u8; HEADER];
    r.read_exact(&mut header)?;
    let [l0, l1, l2, l3, c0, c1, c2, c3] = header;
    let len = u32::from_le_bytes([l0, l1, l2, l3]) as usize;
    let crc = u32::from_le_bytes([c0, c1, c2, c3]);
    // Never written empty: zeros (a file extended by a crash) are not frames.
    if len == 0 || len > MAX_FRAME || (HEADER + len) as u64 > left {
        return Ok(false);
    }
    payload.clear();
    payload.resize(len, 0);
    r.read_exact(payload)?;
    Ok(crc32fast::hash(payload) == crc)
}

/// Hands the records of a frame's payload to `apply`; `false` if they do not parse (a frame
/// whose CRC checks out was written so: only corruption that kept the CRC gets here).
fn records(mut p: &[u8], apply: &mut impl FnMut(&[u8], Option<&[u8]>)) -> bool {
    while !p.is_empty() {
        let Some((k, rest)) = take(p) else {
            return false;
        };
        let Some((&tag, rest)) = rest.split_first() else {
            return false;
        };
        p = match tag {
            1 => {
                let Some((v, rest)) = take(rest) else {
                    return false;
                };
                apply(k, Some(v));
                rest
            }
            0 => {
                apply(k, None);
                rest
            }
            _ => return false,
        };
    }
    true
}

/// A length-prefixed slice and what follows it.
fn take(p: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u32::from_le_bytes(p.get(..4)?.try_into().ok()?) as usize;
    let v = p.get(4..4 + len)?;
    Some((v, &p[4 + len..]))
}

/// The file of segment `n` in `dir`.
pub(super) fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:020}.wal"))
}

/// The segments in `dir`, by number. Files of other names are left alone.
pub(super) fn segments(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let io = |e: std::io::Error| StoreError::Engine(format!("listing {}: {e}", dir.display()));
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io)? {
        let name = entry.map_err(io)?.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".wal"))
            .filter(|n| n.len() == 20 && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        out.push(n);
    }
    out.sort_unstable();
    Ok(out)
}

/// Creates segment `n` (its magic written and durable, the directory entry too) for appending.
pub(super) fn create_segment(dir: &Path, n: u64) -> Result<File, StoreError> {
    let path = segment_path(dir, n);
    let io = |e: std::io::Error| StoreError::Engine(format!("creating {}: {e}", path.display()));
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .map_err(io)?;
    f.write_all(MAGIC).map_err(io)?;
    f.sync_all().map_err(io)?;
    sync_dir(dir)?;
    Ok(f)
}

/// Removes the segments numbered up to `upto`, and makes the removal durable.
pub(super) fn remove_segments(dir: &Path, upto: u64) -> Result<(), StoreError> {
    let mut removed = false;
    for n in segments(dir)?.into_iter().filter(|n| *n <= upto) {
        let path = segment_path(dir, n);
        fs::remove_file(&path)
            .map_err(|e| StoreError::Engine(format!("removing {}: {e}", path.display())))?;
        removed = true;
    }
    if removed {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Makes the directory's entries (files created or removed) durable.
pub(super) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::Engine(format!("syncing {}: {e}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records() -> Vec<Record> {
        vec![
            (b"da\0x".to_vec(), Some(vec![3, 1, 2])),
            (b"ka\0y".to_vec(), None),
            (Vec::new(), Some(Vec::new())),
        ]
    }

    fn read(path: &Path, last: bool) -> Result<(Vec<Record>, Replay), StoreError> {
        let mut got = Vec::new();
        let replay = read_segment(path, last, |k, v| {
            got.push((k.to_vec(), v.map(<[u8]>::to_vec)))
        })?;
        Ok((got, replay))
    }

    #[test]
    fn frames_read_back_and_a_torn_tail_is_ignored_only_at_the_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut f = create_segment(dir.path(), 7).expect("create");
        let mut buf = Vec::new();
        encode_frame(&records(), &mut buf).expect("encode");
        encode_frame(&records()[..1], &mut buf).expect("encode");
        f.write_all(&buf).expect("write");
        let path = segment_path(dir.path(), 7);
        let (got, replay) = read(&path, true).expect("read");
        assert_eq!(got.len(), 4);
        assert_eq!(got[..3], records()[..]);
        assert_eq!(
            replay,
            Replay {
                frames: 2,
                torn_bytes: 0
            }
        );
        assert_eq!(segments(dir.path()).expect("list"), [7]);

        // Half a frame more: a crash mid-write.
        let mut more = Vec::new();
        encode_frame(&records(), &mut more).expect("encode");
        f.write_all(&more[..more.len() / 2]).expect("write");
        let (got, replay) = read(&path, true).expect("read");
        assert_eq!((got.len(), replay.frames), (4, 2));
        assert_eq!(replay.torn_bytes, (more.len() / 2) as u64);
        // Not the last segment: the same bytes are corruption.
        assert!(matches!(
            read(&path, false),
            Err(StoreError::Corrupt { .. })
        ));

        // A flipped bit in a whole frame fails its CRC.
        let mut bytes = fs::read(&path).expect("read");
        bytes[MAGIC.len() + HEADER + 2] ^= 1;
        fs::write(&path, &bytes).expect("write");
        let (got, replay) = read(&path, true).expect("read");
        assert_eq!((got.len(), replay.frames), (0, 0));

        remove_segments(dir.path(), 7).expect("remove");
        assert!(segments(dir.path()).expect("list").is_empty());
    }

    #[test]
    fn a_frame_hands_back_its_records_and_a_failed_one_leaves_no_trace() {
        let mut frame = Frame::with_capacity(16);
        frame.put(b"da\0x", Some(&[3, 1, 2])).expect("put");
        let before = frame.buf.clone();
        let failed = frame.set(
            |out| out.extend_from_slice(b"half"),
            |out| {
                out.push(9);
                Err(StoreError::Engine("encoding failed".into()))
            },
        );
        assert!(failed.is_err());
        assert_eq!(frame.buf, before);
        frame
            .remove(|out| out.extend_from_slice(b"ka\0y"))
            .expect("remove");
        frame.put(b"", Some(&[])).expect("put");
        frame.seal().expect("seal");
        let mut got = Vec::new();
        frame.for_each(|k, v| got.push((k.to_vec(), v.map(<[u8]>::to_vec))));
        assert_eq!(got, records());
        // The same bytes as the log reads back.
        let mut encoded = Vec::new();
        encode_frame(&records(), &mut encoded).expect("encode");
        assert_eq!(frame.bytes(), &encoded[..]);
        // No records, no frame.
        let mut empty = Frame::with_capacity(0);
        empty.seal().expect("seal");
        assert!(empty.bytes().is_empty());
    }

    /// The bytes of a frame, spelled out from the format in the module docs, so a change to
    /// the encoder cannot silently change what logs already on disk hold.
    #[test]
    fn a_frame_has_the_documented_bytes() {
        let mut frame = Frame::with_capacity(0);
        frame.put(b"ab", Some(&[7, 8, 9])).expect("put");
        frame
            .remove(|out| out.extend_from_slice(b"c"))
            .expect("remove");
        frame.put(b"", Some(&[])).expect("put");
        frame.seal().expect("seal");
        let payload: Vec<u8> = [
            // "ab" set to [7, 8, 9]
            &[2, 0, 0, 0][..],
            b"ab",
            &[1],
            &[3, 0, 0, 0],
            &[7, 8, 9],
            // "c" removed
            &[1, 0, 0, 0],
            b"c",
            &[0],
            // "" set to nothing
            &[0, 0, 0, 0],
            &[1],
            &[0, 0, 0, 0],
        ]
        .concat();
        let mut expected = (payload.len() as u32).to_le_bytes().to_vec();
        expected.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        expected.extend_from_slice(&payload);
        assert_eq!(frame.bytes(), &expected[..]);
        // The header: 29 bytes of payload, and its CRC-32 (IEEE, as zlib.crc32 computes it).
        assert_eq!(&expected[..8], &[29, 0, 0, 0, 84, 244, 1, 87]);
    }

    #[test]
    fn garbage_is_reported_not_panicked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = segment_path(dir.path(), 1);
        fs::write(&path, b"not a log at all").expect("write");
        assert!(matches!(read(&path, true), Err(StoreError::Corrupt { .. })));
        // A segment cut short while being created.
        fs::write(&path, &MAGIC[..3]).expect("write");
        assert_eq!(read(&path, true).expect("read").1.torn_bytes, 3);
        // Frames whose lengths point anywhere.
        for junk in [
            vec![0xff; 64],
            vec![0; 64],
            [&u32::MAX.to_le_bytes()[..], &[0; 8]].concat(),
        ] {
            fs::write(&path, [&MAGIC[..], &junk].concat()).expect("write");
            let (got, replay) = read(&path, true).expect("read");
            assert!(got.is_empty() && replay.frames == 0, "{junk:?}");
        }
    }
}
