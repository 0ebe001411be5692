//! Commits of the `graph` tree: a write-ahead log in front of sled.
//!
//! A commit (one batch's or edit's writes, see [`super::overlay`]) is appended to the log
//! ([`super::wal`]) and put in the write buffer ([`super::memtable`]) in one step, under one
//! lock: from then on every reader sees it. Its writer is answered once the log is durable up
//! to it: whichever waiting writer finds the log idle writes everything appended so far and
//! `fdatasync`s it for all of them (group commit).
//!
//! sled is written only by checkpoints, on a thread of their own: the buffer is frozen (a new
//! one takes the commits, and a new log segment with it), written to sled, sled is flushed,
//! and the checkpoint's last segment is recorded in `meta` ([`CHECKPOINT`]) before the
//! segments it covers are removed. A record rewritten many times between two checkpoints is
//! written to sled once, in large batches, off every writer's path, and no commit waits for
//! sled's flush (which stops all of sled's readers and writers while it runs).
//!
//! On open, the segments after the recorded checkpoint are read back (a torn frame at the end
//! of the last one, a write that was never acknowledged, is dropped), written to sled and
//! flushed: every acknowledged commit is in sled again, once. Writes are whole records, so
//! writing a segment twice (a crash after a checkpoint's flush and before its segments were
//! removed) changes nothing.
//!
//! **A write that fails** (a full disk, an I/O error) leaves no trace: the commits that were
//! not yet durable (the one being written, and every one appended after it, which may have
//! been worked out over it) are dropped from the buffer, which is read back from the log's
//! durable part, and their writers are told [`StoreError::Unavailable`]. Until the log takes
//! writes again, commits are refused at once; a retry at most every [`RETRY_AFTER`] (by a
//! commit, or by the checkpoint thread when none comes) first writes and syncs a probe file,
//! then cuts the torn end off the segment and goes on. Nothing needs a restart.
//!
//! **sled is not written on a full disk**: once one of its writes fails, sled fails for good
//! (every later write, and reads that reorganise its tree, until it is reopened), so readers
//! would lose what is durable. No checkpoint starts while the log cannot be written, and each
//! first writes and syncs a probe in proportion to the buffer (bounded); without room it is
//! postponed (and retried), leaving the buffer where readers find it. sled's background
//! flusher is off; this thread flushes sled's own writes (see [`Pipeline::note_sled_write`])
//! after a probe too. A disk that fills between the probe and sled's write can still fail sled:
//! then [`super::Reopening`] reopens it.
//!
//! A checkpoint starts when the buffer holds [`Limits::buffer_bytes`], the log
//! [`Limits::log_bytes`], or the buffer is not empty and nothing was committed for
//! [`Limits::idle`] or nothing written to sled for [`Limits::max_age`]; and when the store is
//! closed. While one runs, commits go on into a new buffer; once that one is full too, they
//! wait for the checkpoint (so the buffers hold at most about twice the limit).

use std::{
    collections::BTreeMap,
    fs::File,
    io::{Seek as _, SeekFrom, Write as _},
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard, RwLock},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use sled::IVec;

use super::{StoreError, engine, memtable::Memtable, wal};

/// One writer's commit: `graph` keys and their new values (removals too), encoded as the
/// log's frame.
pub(super) type Writes = wal::Frame;

/// In `meta`: the number of the last log segment written to sled (u64 BE).
pub(super) const CHECKPOINT: &[u8] = b"wal-checkpoint";

/// Records per sled batch in a checkpoint: each batch holds sled's write lock, which stops
/// sled's readers, so a checkpoint is many short stops rather than one long one.
const CHUNK: usize = 1024;

/// A frozen buffer and the last log segment it covers.
type Frozen = (Arc<Memtable>, u64);

/// How long after a failed log write the next try waits. Meanwhile commits are refused at
/// once, so a full disk costs neither a rebuilt buffer per incoming batch nor a log line each.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// What a retry writes and syncs first, in `<log dir>/.write-probe`, to learn whether the disk
/// takes writes again before the log is touched.
const PROBE_BYTES: usize = 1 << 20;

/// Bounds of what a checkpoint writes and syncs first (in proportion to the buffer it is about
/// to write to sled) to learn whether the disk has room for it: sled fails for good once one
/// of its writes fails (see [`Shared::room_for`]).
const CHECKPOINT_PROBE_MIN: usize = PROBE_BYTES;
const CHECKPOINT_PROBE_MAX: usize = 16 << 20;

/// How often the checkpoint thread flushes sled's own writes (the trees other than `graph`),
/// in place of sled's background flusher, which is off: that one would write on a full disk.
const FLUSH_EVERY: Duration = Duration::from_millis(500);

/// A committed write's place in the log: durable once the log is durable up to it. Counted
/// while it exists: the log's positions start over after a failed write only once no ticket
/// of the lost ones is left to be confused with new ones.
#[derive(Debug)]
#[must_use = "a commit is not acknowledged until its ticket is waited for"]
pub(super) struct Ticket {
    pos: u64,
    shared: Arc<Shared>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut s = self.shared.lock();
        s.waiters = s.waiters.saturating_sub(1);
    }
}

/// Why the log cannot be written, until a retry succeeds.
#[derive(Debug, Clone)]
struct Failure {
    reason: String,
    /// When to try again.
    retry_at: Instant,
    /// The buffer could not be brought back to the log's durable part: only reopening the
    /// store (which reads the log back) clears this.
    fatal: bool,
}

/// When checkpoints start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Limits {
    /// The write buffer's size (keys, values and bookkeeping).
    pub buffer_bytes: usize,
    /// The log's size since the last checkpoint: bounds the work after a crash.
    pub log_bytes: u64,
    /// Nothing committed for this long: write the buffer to sled (and give its memory back).
    pub idle: Duration,
    /// The oldest commit not yet in sled.
    pub max_age: Duration,
}

impl Limits {
    /// The limits for a store whose sled page cache is `cache_bytes`: a buffer of twice that
    /// (128 MiB by default; the collector benchmark's 128,000 devices take 98 MiB of it).
    pub(super) fn for_cache(cache_bytes: u64) -> Self {
        Limits {
            buffer_bytes: usize::try_from(cache_bytes.saturating_mul(2))
                .unwrap_or(usize::MAX)
                .max(16 << 20),
            log_bytes: 1 << 30,
            idle: Duration::from_secs(2),
            max_age: Duration::from_secs(60),
        }
    }
}

/// The log, the buffer and the checkpoint thread. Dropping it runs a last checkpoint and
/// stops the thread.
#[derive(Debug)]
pub(super) struct Pipeline {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    db: sled::Db,
    graph: sled::Tree,
    meta: sled::Tree,
    state: Mutex<State>,
    /// Log turns, checkpoints and the buffer's room changed.
    changed: Condvar,
    /// Wakes the checkpoint thread.
    wake: Condvar,
    /// The segment being appended to; used by whoever holds the log turn.
    file: Mutex<Option<File>>,
    /// Held (write) while a checkpoint changes sled, (read) while a scan merges sled with the
    /// buffers: a scan sees sled and the buffers as of one moment.
    gate: RwLock<()>,
    /// One checkpoint at a time.
    checkpointing: Mutex<()>,
    /// Called, under the state lock, once a failed write's commits are dropped: whatever
    /// caches what readers see (the count index) forgets them too.
    on_rollback: Option<RollbackHook>,
    /// sled holds writes of its own trees not yet flushed (see [`Pipeline::note_sled_write`]).
    sled_dirty: std::sync::atomic::AtomicBool,
    /// Tests: log writes (and probes) fail with ENOSPC while set.
    #[cfg(test)]
    inject: std::sync::atomic::AtomicBool,
    /// Tests: a checkpoint's probe for room fails while set.
    #[cfg(test)]
    inject_no_room: std::sync::atomic::AtomicBool,
}

/// See [`Shared::on_rollback`].
pub(super) struct RollbackHook(pub Box<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for RollbackHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RollbackHook")
    }
}

/// The client a `graph` key belongs to: after its kind byte, up to the first `\0`.
fn client_of(key: &[u8]) -> &[u8] {
    let rest = key.get(1..).unwrap_or_default();
    let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    &rest[..end]
}

#[derive(Debug)]
struct State {
    /// Commits since the last freeze.
    active: Memtable,
    /// The buffer being written to sled, and the last log segment it covers.
    frozen: Option<Frozen>,
    /// Frames appended and not yet handed to the file; `spare` is the other buffer.
    pending: Vec<u8>,
    spare: Vec<u8>,
    /// Log positions (bytes ever appended, across segments): appended, and durable.
    appended: u64,
    durable: u64,
    /// Someone is writing the log (or rotating it).
    busy: bool,
    /// The segment being appended to, and the bytes appended to it.
    segment: u64,
    segment_bytes: u64,
    /// The segment the open file is, and its bytes known durable (magic included): where a
    /// failed write's torn end is cut off. `file_segment` lags `segment` when a new segment
    /// could not be created.
    file_segment: u64,
    file_len: u64,
    /// The log could not be written: commits are refused until a retry succeeds (see the
    /// module docs).
    failed: Option<Failure>,
    /// Failed log writes since the store was opened.
    failures: u64,
    /// Tickets not yet dropped (see [`Ticket`]).
    waiters: usize,
    /// Why the last checkpoint failed, until one succeeds: commits waiting for room fail
    /// with it instead of waiting on.
    checkpoint_failed: Option<String>,
    limits: Limits,
    /// When the last commit came, and the first one in `active`.
    last_commit: Instant,
    oldest: Instant,
    stop: bool,
    /// Checkpoints completed.
    checkpoints: u64,
}

fn io_error(what: &str, e: std::io::Error) -> StoreError {
    StoreError::Engine(format!("write-ahead log: {what}: {e}"))
}

/// A write of the log that failed and may work later (a full disk): refused, to be retried.
fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("write-ahead log: {what}: {e}"))
}

impl Pipeline {
    /// Opens the log in `dir` (created if missing), writes what it holds beyond the last
    /// checkpoint to sled, and starts the checkpoint thread.
    pub(super) fn open(
        dir: &Path,
        db: &sled::Db,
        limits: Limits,
        on_rollback: Option<RollbackHook>,
    ) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| io_error(&dir.display().to_string(), e))?;
        let graph = db.open_tree("graph").map_err(engine)?;
        let meta = db.open_tree("meta").map_err(engine)?;
        let done = match meta.get(CHECKPOINT).map_err(engine)? {
            None => 0,
            Some(v) => <[u8; 8]>::try_from(v.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt {
                    key: "meta/wal-checkpoint".into(),
                    reason: "not a segment number".into(),
                })?,
        };
        let segments = wal::segments(dir)?;
        let last = segments.last().copied().unwrap_or(0).max(done);
        let replay: Vec<u64> = segments.iter().copied().filter(|n| *n > done).collect();
        if !replay.is_empty() {
            // The last write of each record, in a buffer like the one the commits went to
            // (one client for all: only scans need them apart).
            let mut records = Memtable::default();
            for (i, n) in replay.iter().enumerate() {
                let path = wal::segment_path(dir, *n);
                let read = wal::read_segment(&path, i + 1 == replay.len(), |k, v| {
                    records.insert(b"", k, v);
                })?;
                if read.torn_bytes > 0 {
                    tracing::warn!(
                        segment = %path.display(),
                        bytes = read.torn_bytes,
                        "dropped the unacknowledged end of the write-ahead log (a write cut by a crash)"
                    );
                }
            }
            tracing::info!(
                segments = replay.len(),
                records = records.records(),
                "writing the write-ahead log's commits to the store"
            );
            let mut batch = sled::Batch::default();
            for (i, (k, v)) in records.iter().enumerate() {
                match v {
                    Some(v) => batch.insert(k, v),
                    None => batch.remove(k),
                }
                if (i + 1).is_multiple_of(CHUNK) {
                    graph
                        .apply_batch(std::mem::take(&mut batch))
                        .map_err(engine)?;
                }
            }
            graph.apply_batch(batch).map_err(engine)?;
        }
        if last != done {
            meta.insert(CHECKPOINT, &last.to_be_bytes())
                .map_err(engine)?;
            db.flush().map_err(engine)?;
        }
        wal::remove_segments(dir, last)?;
        let file = wal::create_segment(dir, last + 1)?;
        let now = Instant::now();
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            db: db.clone(),
            graph,
            meta,
            state: Mutex::new(State {
                active: Memtable::default(),
                frozen: None,
                pending: Vec::new(),
                spare: Vec::new(),
                appended: 0,
                durable: 0,
                busy: false,
                segment: last + 1,
                segment_bytes: 0,
                file_segment: last + 1,
                file_len: wal::MAGIC.len() as u64,
                failed: None,
                failures: 0,
                waiters: 0,
                checkpoint_failed: None,
                limits,
                last_commit: now,
                oldest: now,
                stop: false,
                checkpoints: 0,
            }),
            changed: Condvar::new(),
            wake: Condvar::new(),
            file: Mutex::new(Some(file)),
            gate: RwLock::new(()),
            checkpointing: Mutex::new(()),
            on_rollback,
            sled_dirty: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            inject: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            inject_no_room: std::sync::atomic::AtomicBool::new(false),
        });
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("census-checkpoint".into())
                .spawn(move || {
                    let run = std::panic::AssertUnwindSafe(|| shared.run());
                    if std::panic::catch_unwind(run).is_err() {
                        // Commits go on into the buffer and the log; once it is full they fail
                        // instead of waiting for a checkpoint that will not come.
                        shared.lock().checkpoint_failed =
                            Some("the checkpoint thread stopped; restart the collector".into());
                        shared.changed.notify_all();
                    }
                })
                .map_err(|e| io_error("starting the checkpoint thread", e))?
        };
        Ok(Pipeline {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Appends a commit to the log and puts it in the buffer: readers see it from now on; it is
    /// durable once [`Pipeline::wait_durable`] returns for its ticket. `client` owns every key.
    pub(super) fn commit(&self, client: &[u8], mut writes: Writes) -> Result<Ticket, StoreError> {
        writes.seal()?;
        let frame = writes.bytes();
        let sh = &self.shared;
        let mut s = sh.lock();
        loop {
            if s.failed.is_some() {
                let recovered;
                (s, recovered) = sh.try_recover(s);
                if !recovered {
                    return Err(sh.unavailable(&s));
                }
            }
            // The buffer is full while the last one is still being written (or no checkpoint
            // can run): wait.
            if s.active.bytes() >= s.limits.buffer_bytes
                && (s.frozen.is_some() || s.checkpoint_failed.is_some())
            {
                if let Some(e) = &s.checkpoint_failed {
                    return Err(StoreError::Unavailable(format!(
                        "the write buffer is full and the store cannot be written: {e}"
                    )));
                }
                s = sh.wait(s);
                continue;
            }
            break;
        }
        s.pending.extend_from_slice(frame);
        s.appended += frame.len() as u64;
        s.segment_bytes += frame.len() as u64;
        let now = Instant::now();
        if s.active.is_empty() {
            s.oldest = now;
        }
        s.last_commit = now;
        writes.for_each(|k, v| s.active.insert(client, k, v));
        if s.active.bytes() >= s.limits.buffer_bytes || s.segment_bytes >= s.limits.log_bytes {
            sh.wake.notify_one();
        }
        Ok(sh.ticket(s))
    }

    /// Returns once the log is durable up to the ticket, writing it when no one else is; an
    /// error when the write failed (the commit was then dropped from what readers see).
    pub(super) fn wait_durable(&self, t: Ticket) -> Result<(), StoreError> {
        self.shared.wait_durable(t.pos)
    }

    /// Returns once every commit made so far is durable.
    pub(super) fn sync(&self) -> Result<(), StoreError> {
        let t = self.shared.ticket(self.shared.lock());
        self.wait_durable(t)
    }

    /// Why the log cannot be written now, if it cannot.
    pub(super) fn failure(&self) -> Option<String> {
        self.shared.lock().failed.as_ref().map(|f| f.reason.clone())
    }

    /// Whether only reopening the store can clear the log's failure.
    pub(super) fn is_fatal(&self) -> bool {
        self.shared.lock().failed.as_ref().is_some_and(|f| f.fatal)
    }

    /// Makes every write made so far durable: the log's, and sled's own (its other trees).
    pub(super) fn flush_all(&self, db: &sled::Db) -> Result<(), StoreError> {
        self.sync()?;
        db.flush().map_err(engine)?;
        Ok(())
    }

    /// Whether the disk has room for a write of sled's own (a probe written, synced and
    /// removed): an error if not, before sled is touched (see [`Shared::room_for`]).
    pub(super) fn room(&self) -> Result<(), StoreError> {
        self.shared.room_for(0)
    }

    /// sled was written outside the log and not flushed: the checkpoint thread flushes it
    /// within [`FLUSH_EVERY`], when the disk has room (sled's own flusher is off).
    pub(super) fn note_sled_write(&self) {
        self.shared
            .sled_dirty
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// A `graph` record of `client`, committed or in sled.
    pub(super) fn get(&self, client: &[u8], key: &[u8]) -> Result<Option<IVec>, StoreError> {
        {
            let s = self.shared.lock();
            if let Some(v) = s.active.get(client, key) {
                return Ok(v.map(IVec::from));
            }
            if let Some(v) = s.frozen.as_ref().and_then(|(f, _)| f.get(client, key)) {
                return Ok(v.map(IVec::from));
            }
        }
        // Not in a buffer, so sled has its latest value: a record leaves the buffers only
        // after a checkpoint wrote it to sled, and only `client`'s writer writes it.
        self.shared.graph.get(key).map_err(engine)
    }

    /// Shows `f` a `graph` record of `client` (as [`Pipeline::get`] finds it), copied into
    /// `scratch` when it is in a buffer: no allocation once `scratch` has grown.
    pub(super) fn read<R>(
        &self,
        client: &[u8],
        key: &[u8],
        scratch: &mut Vec<u8>,
        f: impl FnOnce(Option<&[u8]>) -> R,
    ) -> Result<R, StoreError> {
        let buffered = {
            let s = self.shared.lock();
            let hit = s
                .active
                .get(client, key)
                .or_else(|| s.frozen.as_ref().and_then(|(f, _)| f.get(client, key)));
            hit.map(|v| {
                scratch.clear();
                v.map(|v| scratch.extend_from_slice(v)).is_some()
            })
        };
        match buffered {
            Some(present) => Ok(f(present.then_some(scratch.as_slice()))),
            None => Ok(f(self.shared.graph.get(key).map_err(engine)?.as_deref())),
        }
    }

    /// Every `graph` record of `client` under `prefix`, in key order, as of one moment.
    pub(super) fn scan(
        &self,
        client: &[u8],
        prefix: &[u8],
    ) -> Result<Vec<(IVec, IVec)>, StoreError> {
        let sh = &self.shared;
        let _gate = sh.gate.read().unwrap_or_else(|p| p.into_inner());
        let mut buffered = BTreeMap::new();
        {
            let s = sh.lock();
            if let Some((f, _)) = &s.frozen {
                f.scan_into(client, prefix, &mut buffered);
            }
            s.active.scan_into(client, prefix, &mut buffered);
        }
        // Two sorted sequences; where both hold a key, the buffered record is the newer.
        let mut out = Vec::new();
        let mut buffered = buffered.into_iter().peekable();
        let keep = |out: &mut Vec<(IVec, IVec)>, (k, v): (Vec<u8>, Option<Vec<u8>>)| {
            if let Some(v) = v {
                out.push((IVec::from(k), IVec::from(v)));
            }
        };
        for kv in sh.graph.scan_prefix(prefix) {
            let (k, v) = kv.map_err(engine)?;
            while let Some(b) = buffered.next_if(|(bk, _)| bk.as_slice() < k.as_ref()) {
                keep(&mut out, b);
            }
            match buffered.next_if(|(bk, _)| bk.as_slice() == k.as_ref()) {
                Some(b) => keep(&mut out, b),
                None => out.push((k, v)),
            }
        }
        for rest in buffered {
            keep(&mut out, rest);
        }
        Ok(out)
    }

    /// Runs a checkpoint now, on this thread (tests and tools).
    #[cfg(test)]
    pub(super) fn checkpoint_now(&self) -> Result<(), StoreError> {
        self.shared.checkpoint()
    }

    /// Changes when checkpoints start (tests).
    #[cfg(test)]
    pub(super) fn set_limits(&self, limits: Limits) {
        self.shared.lock().limits = limits;
        self.shared.wake.notify_one();
    }

    /// Makes log writes, the probe before a retry and a checkpoint's probe for room fail with
    /// ENOSPC, or not (tests): a full disk.
    #[cfg(test)]
    pub(super) fn fail_writes(&self, fail: bool) {
        self.shared
            .inject_no_room
            .store(fail, std::sync::atomic::Ordering::SeqCst);
        self.fail_log_writes(fail);
    }

    /// Makes log writes (and the probe before a retry) fail with ENOSPC, or not (tests).
    #[cfg(test)]
    pub(super) fn fail_log_writes(&self, fail: bool) {
        self.shared
            .inject
            .store(fail, std::sync::atomic::Ordering::SeqCst);
        // Retries need not wait.
        if let Some(f) = &mut self.shared.lock().failed {
            f.retry_at = Instant::now();
        }
    }

    /// Checkpoints completed since the store was opened (tests).
    #[cfg(test)]
    pub(super) fn checkpoints(&self) -> u64 {
        self.shared.lock().checkpoints
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread
            && t.thread().id() != std::thread::current().id()
        {
            // The thread runs a last checkpoint, then ends; a panic in it was already reported.
            let _ = t.join();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update of the state is made whole under the lock; a panic elsewhere cannot
        // leave it half-made.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, s: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(s).unwrap_or_else(|p| p.into_inner())
    }

    /// A ticket for everything appended so far.
    fn ticket(self: &Arc<Self>, mut s: MutexGuard<'_, State>) -> Ticket {
        s.waiters += 1;
        Ticket {
            pos: s.appended,
            shared: Arc::clone(self),
        }
    }

    fn unavailable(&self, s: &State) -> StoreError {
        StoreError::Unavailable(s.failed.as_ref().map_or_else(
            || "write-ahead log: not writable".into(),
            |f| f.reason.clone(),
        ))
    }

    fn wait_durable(&self, upto: u64) -> Result<(), StoreError> {
        let mut s = self.lock();
        loop {
            if s.durable >= upto {
                return Ok(());
            }
            // A write under way, or the rollback after a failed one: its outcome decides.
            if s.busy {
                s = self.wait(s);
                continue;
            }
            // Not durable, and the log failed since: the commit was dropped.
            if s.failed.is_some() {
                return Err(self.unavailable(&s));
            }
            s = self.write_turn(s, false)?.0;
        }
    }

    /// Takes the log back into use after a failure, if a retry is due and no ticket of the
    /// lost commits is left: a probe written and synced, then the segment's torn end cut off
    /// (or the segment that could not be created, created). Returns whether the log takes
    /// writes.
    fn try_recover<'a>(&'a self, mut s: MutexGuard<'a, State>) -> (MutexGuard<'a, State>, bool) {
        let Some(failure) = &s.failed else {
            return (s, true);
        };
        if failure.fatal || s.busy || s.waiters > 0 || Instant::now() < failure.retry_at {
            return (s, false);
        }
        s.busy = true;
        let (segment, file_segment, file_len) = (s.segment, s.file_segment, s.file_len);
        drop(s);
        let result = self.repair(segment, file_segment, file_len);
        let mut s = self.lock();
        s.busy = false;
        let recovered = match result {
            Ok(len) => {
                tracing::warn!(
                    failed_writes = s.failures,
                    "the write-ahead log takes writes again; storing resumes"
                );
                s.failed = None;
                // No ticket is left: positions start over from what is durable.
                s.appended = s.durable;
                s.file_segment = segment;
                s.file_len = len;
                s.segment_bytes = len - wal::MAGIC.len() as u64;
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "the write-ahead log still cannot be written");
                s.failed = Some(Failure {
                    reason: e.to_string(),
                    retry_at: Instant::now() + RETRY_AFTER,
                    fatal: false,
                });
                false
            }
        };
        self.changed.notify_all();
        (s, recovered)
    }

    /// The I/O of [`Shared::try_recover`], holding the log's turn; returns the open segment's
    /// durable length.
    fn repair(&self, segment: u64, file_segment: u64, file_len: u64) -> Result<u64, StoreError> {
        self.probe()
            .map_err(|e| unavailable("no room to write in the log's directory", e))?;
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        match file.as_mut() {
            Some(f) if file_segment == segment => {
                f.set_len(file_len)
                    .and_then(|()| f.seek(SeekFrom::Start(file_len)).map(drop))
                    .and_then(|()| f.sync_all())
                    .map_err(|e| unavailable("cutting off a failed write", e))?;
                Ok(file_len)
            }
            _ => {
                *file = Some(
                    wal::create_segment(&self.dir, segment)
                        .map_err(|e| unavailable("a new segment", e))?,
                );
                Ok(wal::MAGIC.len() as u64)
            }
        }
    }

    /// Writes, syncs and removes [`PROBE_BYTES`] in the log's directory.
    fn probe(&self) -> std::io::Result<()> {
        #[cfg(test)]
        if self.inject.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(28));
        }
        super::probe_room(&self.dir, PROBE_BYTES)
    }

    /// Writes and syncs everything appended so far, holding the log's turn. With `rotate`, the
    /// buffer is frozen in the same step and the log moves on to a new segment: the frozen
    /// buffer's commits are exactly those of the segments before it.
    fn write_turn<'a>(
        &'a self,
        mut s: MutexGuard<'a, State>,
        rotate: bool,
    ) -> Result<(MutexGuard<'a, State>, Option<Frozen>), StoreError> {
        s.busy = true;
        let spare = std::mem::take(&mut s.spare);
        let mut buf = std::mem::replace(&mut s.pending, spare);
        let end = s.appended;
        let frozen = rotate.then(|| {
            let frozen = Arc::new(std::mem::take(&mut s.active));
            let segment = s.segment;
            s.frozen = Some((Arc::clone(&frozen), segment));
            s.segment += 1;
            s.segment_bytes = 0;
            (frozen, segment)
        });
        let next = s.segment;
        drop(s);
        // Whether `buf` is durable: after a failure, whether only the next segment is missing.
        let mut wrote = false;
        let result: Result<(), StoreError> = {
            let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
            match file.as_mut() {
                None => Err(StoreError::Unavailable(
                    "write-ahead log: no open segment".into(),
                )),
                Some(f) => self
                    .write_all(f, &buf)
                    .map_err(|e| unavailable("writing", e))
                    .and_then(|()| f.sync_data().map_err(|e| unavailable("syncing", e)))
                    .and_then(|()| {
                        wrote = true;
                        if frozen.is_some() {
                            *file = Some(
                                wal::create_segment(&self.dir, next)
                                    .map_err(|e| unavailable("a new segment", e))?,
                            );
                        }
                        Ok(())
                    }),
            }
        };
        let written = buf.len() as u64;
        buf.clear();
        let mut s = self.lock();
        if buf.capacity() <= 64 << 20 {
            s.spare = buf;
        }
        match &result {
            Ok(()) => {
                s.durable = s.durable.max(end);
                if frozen.is_some() {
                    s.file_segment = next;
                    s.file_len = wal::MAGIC.len() as u64;
                } else {
                    s.file_len += written;
                }
            }
            Err(e) => {
                if wrote {
                    s.durable = s.durable.max(end);
                }
                s = self.roll_back(s, e, frozen.is_some(), wrote);
            }
        }
        s.busy = false;
        self.changed.notify_all();
        result?;
        Ok((s, frozen))
    }

    /// Writes `buf` to the log file (a failure injected by the tests writes half of it first,
    /// as a disk that fills up mid-write does).
    fn write_all(&self, f: &mut File, buf: &[u8]) -> std::io::Result<()> {
        #[cfg(test)]
        if self.inject.load(std::sync::atomic::Ordering::SeqCst) {
            f.write_all(&buf[..buf.len() / 2])?;
            return Err(std::io::Error::from_raw_os_error(28));
        }
        f.write_all(buf)
    }

    /// After a failed log write: drops every commit that is not durable from what readers see
    /// and refuses commits until a retry (see the module docs). `rotated`: the write froze the
    /// buffer; `wrote`: its frames are durable, only the next segment could not be created.
    fn roll_back<'a>(
        &'a self,
        mut s: MutexGuard<'a, State>,
        e: &StoreError,
        rotated: bool,
        wrote: bool,
    ) -> MutexGuard<'a, State> {
        s.failures += 1;
        // One line per outage, not one per refused batch: the next one comes after a recovery.
        tracing::error!(
            error = %e,
            "cannot write the write-ahead log (disk full?): batches and edits are refused (agents keep them and retry) until it can; what is stored still answers"
        );
        s.pending.clear();
        s.spare.clear();
        let mut fatal = false;
        if rotated && wrote {
            // The frozen buffer is durable and goes on to sled; the commits after it had no
            // segment to go to.
            s.active = Memtable::default();
        } else {
            if rotated {
                // Undo the freeze: the frozen buffer's last frames were not written.
                if let Some((frozen, _)) = s.frozen.take() {
                    drop(frozen);
                }
                s.segment -= 1;
            }
            let path = wal::segment_path(&self.dir, s.file_segment);
            let mut active = Memtable::default();
            let read = wal::read_segment_upto(&path, true, s.file_len, |k, v| {
                active.insert(client_of(k), k, v);
            });
            match read {
                Ok(_) => s.active = active,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read back the write-ahead log after a failed write; the store must be reopened");
                    fatal = true;
                }
            }
        }
        s.segment_bytes = s.file_len.saturating_sub(wal::MAGIC.len() as u64);
        s.oldest = Instant::now();
        s.failed = Some(Failure {
            reason: e.to_string(),
            retry_at: Instant::now() + RETRY_AFTER,
            fatal,
        });
        if let Some(hook) = &self.on_rollback {
            (hook.0)();
        }
        s
    }

    /// The checkpoint thread: waits for a reason, checkpoints, until told to stop; then a last
    /// checkpoint.
    fn run(&self) {
        let mut flushed = Instant::now();
        loop {
            let stop = {
                let mut s = self.lock();
                loop {
                    // No commit may come to retry a failed log (agents back off, and a load
                    // balancer may keep them away while ingest is reported not serving).
                    if s.failed.is_some() && !s.stop {
                        s = self.try_recover(s).0;
                    }
                    if s.stop || self.due(&s) {
                        break s.stop;
                    }
                    if s.failed.is_none() && flushed.elapsed() >= FLUSH_EVERY {
                        drop(s);
                        self.flush_sled();
                        flushed = Instant::now();
                        s = self.lock();
                        continue;
                    }
                    s = self
                        .wake
                        .wait_timeout(s, Duration::from_millis(250))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            };
            if stop {
                // sled's own writes are durable on a clean close (a checkpoint flushes them
                // too; this is for a close with nothing to checkpoint).
                self.flush_sled();
            }
            if let Err(e) = self.checkpoint() {
                let mut s = self.lock();
                // Once per outage: retried every second.
                if s.checkpoint_failed.is_none() {
                    tracing::warn!(error = %e, "checkpoint failed; the write-ahead log keeps every commit, retrying");
                } else {
                    tracing::debug!(error = %e, "checkpoint failed again");
                }
                s.checkpoint_failed = Some(e.to_string());
                drop(s);
                self.changed.notify_all();
                if stop {
                    return;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            if stop {
                return;
            }
        }
    }

    fn due(&self, s: &State) -> bool {
        // The disk is full (or failing): sled is not written until the log takes writes
        // again, so that it never fails (it would then fail for good, reads too); the log
        // keeps every commit meanwhile. A new buffer also needs a new segment.
        if s.failed.is_some() {
            return false;
        }
        s.frozen.is_some()
            || (s.active.bytes() >= s.limits.buffer_bytes
                || s.segment_bytes >= s.limits.log_bytes
                || (!s.active.is_empty()
                    && (s.last_commit.elapsed() >= s.limits.idle
                        || s.oldest.elapsed() >= s.limits.max_age)))
    }

    /// Flushes sled's own writes if there are any and the disk has room for them; otherwise
    /// they wait (still in sled's memory, where readers see them) for a later try.
    fn flush_sled(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        if !self.sled_dirty.swap(false, SeqCst) {
            return;
        }
        let result = self
            .room_for(0)
            .and_then(|()| self.db.flush().map(drop).map_err(engine));
        if let Err(e) = result {
            tracing::debug!(error = %e, "sled's own writes wait for room on the disk");
            self.sled_dirty.store(true, SeqCst);
        }
    }

    /// Whether the disk has room for a checkpoint of `bytes`: a probe in proportion to them
    /// (bounded) is written, synced and removed. sled fails for good (every later write, and
    /// reads that reorganise its tree) once one of its writes fails, so it is written only
    /// when this passes; the log's own writes fail cleanly and need no probe.
    fn room_for(&self, bytes: usize) -> Result<(), StoreError> {
        #[cfg(test)]
        if self
            .inject_no_room
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(StoreError::Unavailable(
                "no room on the disk to write the store: 28".into(),
            ));
        }
        let probe = bytes.clamp(CHECKPOINT_PROBE_MIN, CHECKPOINT_PROBE_MAX);
        super::probe_room(&self.dir, probe).map_err(|e| {
            StoreError::Unavailable(format!("no room on the disk to write the store: {e}"))
        })
    }

    /// Writes the buffer (or the one a failed checkpoint left frozen) to sled and drops the
    /// log segments it covers. Postponed (an error, retried) while the log cannot be written
    /// or the disk has no room for it: sled is never written on a full disk.
    fn checkpoint(&self) -> Result<(), StoreError> {
        let _one = self.checkpointing.lock().unwrap_or_else(|p| p.into_inner());
        {
            let s = self.lock();
            if s.failed.is_some() {
                return Err(self.unavailable(&s));
            }
            let bytes = match &s.frozen {
                Some((f, _)) => f.bytes(),
                None if s.active.is_empty() => return Ok(()),
                None => s.active.bytes(),
            };
            drop(s);
            self.room_for(bytes)?;
        }
        let (frozen, segment) = {
            let mut s = self.lock();
            match s.frozen.clone() {
                Some(f) => f,
                None => {
                    if s.active.is_empty() {
                        return Ok(());
                    }
                    while s.busy {
                        s = self.wait(s);
                    }
                    if s.failed.is_some() {
                        return Err(self.unavailable(&s));
                    }
                    match self.write_turn(s, true)?.1 {
                        Some(f) => f,
                        None => return Ok(()),
                    }
                }
            }
        };
        let started = Instant::now();
        let mut batch = sled::Batch::default();
        let mut n = 0usize;
        let apply = |batch: sled::Batch| {
            let _gate = self.gate.write().unwrap_or_else(|p| p.into_inner());
            self.graph.apply_batch(batch).map_err(engine)
        };
        for (k, v) in frozen.iter() {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
            n += 1;
            if n.is_multiple_of(CHUNK) {
                apply(std::mem::take(&mut batch))?;
            }
        }
        apply(batch)?;
        self.meta
            .insert(CHECKPOINT, &segment.to_be_bytes())
            .map_err(engine)?;
        // This flush takes sled's own writes along.
        let dirty = self
            .sled_dirty
            .swap(false, std::sync::atomic::Ordering::SeqCst);
        if let Err(e) = self.db.flush() {
            self.sled_dirty
                .fetch_or(dirty, std::sync::atomic::Ordering::SeqCst);
            return Err(engine(e));
        }
        wal::remove_segments(&self.dir, segment)?;
        tracing::debug!(
            records = frozen.records(),
            bytes = frozen.bytes(),
            took_ms = started.elapsed().as_millis() as u64,
            "checkpoint"
        );
        let mut s = self.lock();
        s.frozen = None;
        s.checkpoint_failed = None;
        s.checkpoints += 1;
        self.changed.notify_all();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Crash safety of the store as a whole: a copy of the data directory taken while the store
    //! is open is what a crash (SIGKILL, power cut) at that moment leaves behind.

    use std::path::Path;

    use census_proto::{convert, v1};

    use super::*;
    use crate::{
        model::{CleanObservation, Scope},
        policy::Policy,
        store::{BatchId, BatchOutcome, Store, sled::SledStore},
    };

    /// Copies a directory tree: what was on disk at this moment.
    fn crash_image(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for entry in std::fs::read_dir(from).expect("read dir") {
            let entry = entry.expect("entry");
            let target = to.join(entry.file_name());
            if entry.file_type().expect("type").is_dir() {
                crash_image(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).expect("copy");
            }
        }
    }

    /// Device `i` of a client as batch `seq` sees it: over ARP; from the second sweep on, every
    /// fifth device (but the first) also lists the MAC of device `i - 1` among its interfaces
    /// over SNMP, which merges the two devices (an event in the history).
    fn obs(i: u16, seq: u64) -> CleanObservation {
        let [hi, lo] = i.to_be_bytes();
        let mut wire = v1::Observation {
            observed_at: Some(convert::timestamp_from_millis(1_000 + seq)),
            method: v1::Method::Arp as i32,
            addresses: vec![v1::IpAddress {
                address: format!("198.18.{hi}.{lo}"),
                answered: true,
                ..Default::default()
            }],
            macs: vec![vec![0, 0x16, 0x3e, 0, hi, lo]],
            ..Default::default()
        };
        if i.is_multiple_of(5) && i > 0 && seq > 3 {
            let [hi2, lo2] = (i - 1).to_be_bytes();
            wire.snmp = Some(v1::SnmpIdentity {
                interfaces: vec![v1::SnmpInterface {
                    if_index: 2,
                    mac: vec![0, 0x16, 0x3e, 0, hi2, lo2],
                    ..Default::default()
                }],
                ..Default::default()
            });
        }
        crate::model::clean_observation(&wire, 1_000 + seq, 0).expect("valid")
    }

    fn id(seq: u64) -> BatchId {
        BatchId {
            agent_id: "agent".into(),
            epoch: 0,
            sequence: seq,
            digest: [seq as u8; 32],
        }
    }

    /// Batch `seq` of `client`: 20 devices, round and round 60.
    fn batch(seq: u64) -> Vec<CleanObservation> {
        (0..20)
            .map(|j| obs(((seq * 20 + j) % 60) as u16, seq))
            .collect()
    }

    fn scope(c: usize) -> Scope {
        Scope {
            client: format!("client-{c}"),
            site: "hq".into(),
        }
    }

    /// What a client holds, for comparing stores.
    fn state(store: &SledStore, c: usize) -> String {
        let client = scope(c).client;
        let devices = store.devices(&client, None).expect("devices");
        let tally = store
            .tally(&client, &Policy::default(), 10_000)
            .expect("tally");
        let history = store.history(&client).expect("history");
        format!("{devices:?}\n{tally:?}\n{history:?}")
    }

    /// Limits under which no checkpoint starts by itself.
    fn never() -> Limits {
        Limits {
            buffer_bytes: usize::MAX,
            log_bytes: u64::MAX,
            idle: Duration::from_secs(3600),
            max_age: Duration::from_secs(3600),
        }
    }

    fn apply(store: &SledStore, seqs: std::ops::RangeInclusive<u64>) {
        for seq in seqs {
            for c in 0..3 {
                assert_eq!(
                    store
                        .apply_batch(&scope(c), &id(seq), &batch(seq))
                        .expect("apply"),
                    BatchOutcome::Stored
                );
            }
        }
    }

    /// Every acknowledged batch is in `copy` exactly once, and it holds what `want` said.
    fn check(copy: &Path, want: &[String], last: u64) {
        let store = SledStore::open(copy).expect("open the crash image");
        for (c, want) in want.iter().enumerate() {
            assert_eq!(&state(&store, c), want, "client-{c} after the crash");
            // Every observation counted once.
            let devices = store.devices(&scope(c).client, None).expect("devices");
            let seen: u64 = devices
                .iter()
                .flat_map(|d| &d.evidence)
                .map(|e| e.observations)
                .sum();
            assert_eq!(seen, 20 * last);
            for seq in 1..=last {
                assert_eq!(
                    store
                        .apply_batch(&scope(c), &id(seq), &batch(seq))
                        .expect("replay"),
                    BatchOutcome::Duplicate
                );
            }
            let mut other = id(last);
            other.digest = [0xee; 32];
            assert_eq!(
                store
                    .apply_batch(&scope(c), &other, &batch(1))
                    .expect("conflict"),
                BatchOutcome::Conflict
            );
        }
        assert_eq!(&state(&store, 0), &want[0], "replays changed nothing");
    }

    #[test]
    fn acknowledged_batches_survive_a_crash_from_the_log_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        store.pipeline.set_limits(never());
        apply(&store, 1..=12);
        let want: Vec<String> = (0..3).map(|c| state(&store, c)).collect();
        // Merges happened, and were recorded.
        assert!(!store.history("client-0").expect("history").is_empty());
        let copy = tempfile::tempdir().expect("tempdir");
        crash_image(dir.path(), copy.path());
        assert_eq!(store.pipeline.checkpoints(), 0, "nothing reached sled");
        check(copy.path(), &want, 12);
        // And once more: the first recovery left a store that opens as it is.
        check(copy.path(), &want, 12);
    }

    #[test]
    fn a_crash_after_a_checkpoint_keeps_what_was_written_before_and_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        store.pipeline.set_limits(never());
        apply(&store, 1..=6);
        store.pipeline.checkpoint_now().expect("checkpoint");
        assert_eq!(store.pipeline.checkpoints(), 1);
        // The checkpoint's segments are gone: sled has their writes.
        let dir_wal = dir.path().join("wal");
        assert_eq!(wal::segments(&dir_wal).expect("list").len(), 1);
        apply(&store, 7..=12);
        let want: Vec<String> = (0..3).map(|c| state(&store, c)).collect();
        let copy = tempfile::tempdir().expect("tempdir");
        crash_image(dir.path(), copy.path());
        check(copy.path(), &want, 12);
    }

    #[test]
    fn a_torn_write_at_the_end_of_the_log_loses_nothing_acknowledged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        store.pipeline.set_limits(never());
        apply(&store, 1..=5);
        let want: Vec<String> = (0..3).map(|c| state(&store, c)).collect();
        let copy = tempfile::tempdir().expect("tempdir");
        crash_image(dir.path(), copy.path());
        // Half of a frame that was being written when the power went.
        let wal_dir = copy.path().join("wal");
        let last = *wal::segments(&wal_dir)
            .expect("list")
            .last()
            .expect("a segment");
        let mut frame = Vec::new();
        wal::encode_frame(
            &[(b"dclient-0\0x".to_vec(), Some(vec![1; 300]))],
            &mut frame,
        )
        .expect("frame");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(wal::segment_path(&wal_dir, last))
            .expect("open segment");
        f.write_all(&frame[..frame.len() / 2]).expect("write");
        drop(f);
        check(copy.path(), &want, 5);
    }

    #[test]
    fn checkpoints_running_beside_writers_lose_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = std::sync::Arc::new(SledStore::open(dir.path()).expect("open"));
        // A buffer this small is full after every batch or two: checkpoints run all the time,
        // and writers wait for room.
        store.pipeline.set_limits(Limits {
            buffer_bytes: 16 << 10,
            log_bytes: 64 << 10,
            idle: Duration::from_millis(1),
            max_age: Duration::from_millis(1),
        });
        let writers: Vec<_> = (0..3)
            .map(|c| {
                let store = std::sync::Arc::clone(&store);
                std::thread::spawn(move || {
                    for seq in 1..=15 {
                        assert_eq!(
                            store
                                .apply_batch(&scope(c), &id(seq), &batch(seq))
                                .expect("apply"),
                            BatchOutcome::Stored
                        );
                        // Readers see every commit, wherever it is.
                        let seen: u64 = store
                            .devices(&scope(c).client, None)
                            .expect("devices")
                            .iter()
                            .flat_map(|d| &d.evidence)
                            .map(|e| e.observations)
                            .sum();
                        assert_eq!(seen, 20 * seq);
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().expect("writer");
        }
        assert!(store.pipeline.checkpoints() > 0, "no checkpoint ran");
        let want: Vec<String> = (0..3).map(|c| state(&store, c)).collect();
        let copy = tempfile::tempdir().expect("tempdir");
        crash_image(dir.path(), copy.path());
        check(copy.path(), &want, 15);
        // A clean close writes everything to sled and leaves an empty log.
        drop(store);
        let store = SledStore::open(dir.path()).expect("reopen");
        for (c, want) in want.iter().enumerate() {
            assert_eq!(&state(&store, c), want);
        }
    }

    /// The tally of client `c`: what `census counts` says.
    fn devices_counted(store: &SledStore, c: usize) -> u64 {
        store
            .tally(&scope(c).client, &Policy::default(), 10_000)
            .expect("tally")
            .devices
    }

    #[test]
    fn a_failed_log_write_leaves_no_trace_and_writing_resumes_by_itself() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        store.pipeline.set_limits(never());
        apply(&store, 1..=3);
        let want: Vec<String> = (0..3).map(|c| state(&store, c)).collect();
        let counted = devices_counted(&store, 0);

        // The disk fills up in the middle of batch 4's write (half of it reaches the file).
        store.pipeline.fail_writes(true);
        let refused = store.apply_batch(&scope(0), &id(4), &batch(4));
        assert!(
            matches!(refused, Err(StoreError::Unavailable(_))),
            "{refused:?}"
        );
        assert!(store.pipeline.failure().is_some());
        assert!(store.write_failure().is_some());
        // Nothing of it shows: not in the devices, not in the count (whose index was read
        // before), not in the history.
        for (c, want) in want.iter().enumerate() {
            assert_eq!(&state(&store, c), want, "client-{c} after the refusal");
        }
        assert_eq!(devices_counted(&store, 0), counted);
        // Other writers are refused at once while the disk takes nothing.
        assert!(matches!(
            store.apply_batch(&scope(1), &id(4), &batch(4)),
            Err(StoreError::Unavailable(_))
        ));
        // A crash now leaves a store that opens, with exactly what was acknowledged.
        let copy = tempfile::tempdir().expect("tempdir");
        crash_image(dir.path(), copy.path());
        check(copy.path(), &want, 3);

        // Room again: the same batch is stored, once, without reopening anything.
        store.pipeline.fail_writes(false);
        apply(&store, 4..=6);
        assert!(store.pipeline.failure().is_none());
        let want: Vec<String> = (0..3).map(|c| state(&store, c)).collect();
        let copy = tempfile::tempdir().expect("tempdir");
        crash_image(dir.path(), copy.path());
        check(copy.path(), &want, 6);
        drop(store);
        check(dir.path(), &want, 6);
    }

    #[test]
    fn a_checkpoint_whose_log_write_fails_keeps_every_acknowledged_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        store.pipeline.set_limits(never());
        apply(&store, 1..=4);
        let want: Vec<String> = (0..3).map(|c| state(&store, c)).collect();

        // The checkpoint's own log write (before it moves on to a new segment) fails, though
        // its probe for room passed (the disk filled up in between): the buffer it froze goes
        // back as it was.
        store.pipeline.fail_log_writes(true);
        assert!(matches!(
            store.pipeline.checkpoint_now(),
            Err(StoreError::Unavailable(_))
        ));
        for (c, want) in want.iter().enumerate() {
            assert_eq!(&state(&store, c), want, "client-{c}");
        }
        assert_eq!(store.pipeline.checkpoints(), 0);

        store.pipeline.fail_log_writes(false);
        apply(&store, 5..=6);
        store.pipeline.checkpoint_now().expect("checkpoint");
        assert_eq!(store.pipeline.checkpoints(), 1);
        apply(&store, 7..=8);
        let want: Vec<String> = (0..3).map(|c| state(&store, c)).collect();
        let copy = tempfile::tempdir().expect("tempdir");
        crash_image(dir.path(), copy.path());
        check(copy.path(), &want, 8);
    }

    #[test]
    fn a_checkpoint_on_a_full_disk_is_postponed_and_sled_is_not_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        store.pipeline.set_limits(never());
        apply(&store, 1..=3);
        let want: Vec<String> = (0..3).map(|c| state(&store, c)).collect();
        assert!(store.graph.is_empty(), "no checkpoint yet");

        // The disk fills up while the buffer waits for its checkpoint: the checkpoint does not
        // start (no log rotation, nothing written to sled), so nothing fails, sled least of all.
        store.pipeline.fail_writes(true);
        assert!(matches!(
            store.pipeline.checkpoint_now(),
            Err(StoreError::Unavailable(_))
        ));
        assert_eq!(store.pipeline.checkpoints(), 0);
        assert!(store.graph.is_empty(), "sled was written on a full disk");
        assert_eq!(store.write_failure(), None);
        assert!(!store.needs_reopen());
        // Readers see everything that was acknowledged, from the buffer.
        for (c, want) in want.iter().enumerate() {
            assert_eq!(&state(&store, c), want, "client-{c} on a full disk");
        }
        let copy = tempfile::tempdir().expect("tempdir");
        crash_image(dir.path(), copy.path());
        check(copy.path(), &want, 3);

        // Room again: the postponed checkpoint goes through.
        store.pipeline.fail_writes(false);
        store.pipeline.checkpoint_now().expect("checkpoint");
        assert_eq!(store.pipeline.checkpoints(), 1);
        assert!(!store.graph.is_empty());
        for (c, want) in want.iter().enumerate() {
            assert_eq!(&state(&store, c), want, "client-{c} after the checkpoint");
        }
        drop(store);
        check(dir.path(), &want, 3);
    }

    #[test]
    fn writes_of_sleds_own_trees_are_refused_before_sled_on_a_full_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let rules = crate::policy::PolicyRules::default();
        store.ensure_client("acme", 1).expect("client");
        store.put_policy("acme", &rules, 1).expect("policy");

        store.pipeline.fail_writes(true);
        assert!(matches!(
            store.put_policy("acme", &rules, 2),
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            store.ensure_client("other", 2),
            Err(StoreError::Unavailable(_))
        ));
        // No write needed, none refused.
        assert!(!store.ensure_client("acme", 2).expect("client").1);
        // sled was not touched: it has not failed, and answers.
        assert_eq!(store.write_failure(), None);
        assert!(!store.needs_reopen());
        assert_eq!(store.policies("acme").expect("policies").len(), 1);
        assert_eq!(store.clients().expect("clients").len(), 1);

        store.pipeline.fail_writes(false);
        store.put_policy("acme", &rules, 3).expect("policy");
        assert_eq!(store.policies("acme").expect("policies").len(), 2);
    }

    #[test]
    fn no_checkpoint_is_due_while_the_log_cannot_be_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        store.pipeline.set_limits(never());
        apply(&store, 1..=2);
        store.pipeline.fail_writes(true);
        assert!(store.apply_batch(&scope(0), &id(3), &batch(3)).is_err());
        let sh = &store.pipeline.shared;
        let mut s = sh.lock();
        // Even a buffer left frozen (by a checkpoint that failed in sled) waits: sled is not
        // written while the disk is full.
        s.frozen = Some((Arc::new(Memtable::default()), s.segment));
        assert!(!sh.due(&s));
        s.frozen = None;
    }

    #[test]
    fn sleds_own_writes_are_durable_after_a_clean_close() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let agent = crate::model::AgentRecord {
            id: "agent-1".into(),
            client: "client-0".into(),
            site: "hq".into(),
            hostname: "h".into(),
            version: "1".into(),
            token_id: "t".into(),
            enrolled_ms: 1,
            cert_sha256: [7; 32],
            cert_not_after_ms: 2,
            revoked: false,
            last_seen_ms: 3,
            backlog: 0,
        };
        store.put_agent(&agent, false).expect("put");
        drop(store);
        let store = SledStore::open(dir.path()).expect("reopen");
        assert_eq!(store.agents().expect("agents"), vec![agent]);
    }

    #[test]
    fn a_corrupt_checkpoint_mark_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(SledStore::open(dir.path()).expect("open"));
        {
            let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("store")))
                .expect("sled");
            let meta = db.open_tree("meta").expect("meta");
            meta.insert(CHECKPOINT, &b"xyz"[..]).expect("insert");
            db.flush().expect("flush");
        }
        assert!(matches!(
            SledStore::open(dir.path()),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
