//! The delivery queue: every batch is written here before it is sent, and leaves only once the
//! collector has acknowledged it (stored durably, or recognised as a replay).
//!
//! With a state directory the queue is a sled database in `<state dir>/queue/` beside
//! `agent.json` ([`AgentState`]: the agent id, its sequence epoch and next sequence number),
//! and it survives a restart, a crash or SIGKILL: the next start delivers what it holds, oldest
//! first. Without a
//! state directory (each run is a new agent anyway) it is held in memory and lost when the
//! agent stops; `run` says so in a warn line at start.
//!
//! Entries are keyed by a queue position (a big-endian `u64`, so sled iterates them in the
//! order they were queued), not by sequence: a rotation (below) renumbers sequences under a
//! new agent id, and the order must not change with it. A value is a format byte and the
//! batch's protobuf encoding, exactly as it will be sent (only `sent_at` is set at sending; the
//! collector's digest does not cover it), so a resend is the same batch to the collector.
//!
//! The queue also owns the [`AgentState`], so that reserving sequences, queueing the batches
//! that carry them and renumbering them all happen under one lock.
//!
//! ## Crash windows
//!
//! Queueing is: (1) reserve sequences in `agent.json` (written to a temporary file, fsynced,
//! renamed, directory fsynced), (2) insert the batches (and remove what the cap drops) in one
//! atomic sled batch, (3) flush sled (fsync). A crash
//! - before (1) completes: nothing happened; the old `agent.json` stands;
//! - between (1) and (3): the sequences are reserved but their batches may be missing (sled
//!   recovers a batch entirely or not at all). The sweep is lost as if the agent had died
//!   during it, and the collector sees a gap in the sequences, which it ignores. A sequence is
//!   never handed out twice, because `agent.json` was durable before any batch carried it;
//! - after (3): the batches are queued and will be delivered.
//!
//! Delivery: a batch is sent, acknowledged (the collector acknowledges only once it is durably
//! stored), then removed, without a flush of its own (sled writes its log every 500 ms). A crash
//! before the removal is durable resends the batch on the next start, and the collector answers
//! DUPLICATE: nothing is counted twice.
//!
//! Rotation (the collector reports FAILED_PRECONDITION: it holds other content under one of
//! our sequence numbers, because `agent.json` was restored from a backup or an agent image was
//! cloned): (1) a new sequence epoch is written to `agent.json` with sequences reserved for
//! every queued batch, (2) every queued batch is rewritten in the new epoch under its reserved
//! sequence in one atomic sled batch, flushed. The agent id stays: it is the one the agent's
//! certificate names, the only one the collector takes from it. A crash between them leaves
//! batches in the old epoch in the queue; they are sent as they are, conflict again if they did
//! before, and are rotated again: nothing is dropped, at worst one more epoch is used. Batches
//! of another epoch (or id) than the current one are sent in windows of their own (a window
//! holds one agent id and epoch), and opening the queue moves the next sequence past any
//! queued batch of the current id and epoch, so even an `agent.json` restored behind the queue
//! never reuses a sequence. A new `agent.json` (a state directory wiped and used again with
//! the same certificate) starts in a random epoch of its own, and so collides with nothing.
//!
//! [`Queue::adopt`] takes the id the certificate names (at start, and after the agent was
//! enrolled again): queued batches under another id (a state from before the certificate, or
//! one that predates ids taken from certificates) are renumbered under it the same way.
//!
//! ## The cap
//!
//! The encoded size of the queued batches is capped (`queue.max_mb`). A batch that would take
//! the queue over it first drops the oldest batches, in the same atomic write, with a warn line
//! (batches, observations, users, the sequences dropped) and the `batches_dropped` and
//! `observations_dropped` counters ([`crate::metrics`]). The newest batch is always kept. sled's
//! files take more room on disk than the batches (its log is compacted as it goes), so leave
//! the state directory's file system about twice the cap.
//!
//! An entry that cannot be read back (a damaged value, which sled's own checksums should make
//! impossible) is removed with a warn line and counted in `batches_corrupt`, never a panic.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
};

use census_proto::v1;
use prost::Message as _;
use tokio::sync::{Notify, futures::Notified};
use tracing::warn;

use crate::{metrics::Metrics, report::AgentState};

/// The first byte of every value: how the rest is encoded (protobuf `ObservationBatch`).
const FORMAT_V1: u8 = 1;
/// sled's page cache for the queue: the queue is written once and read once, in order.
const CACHE_BYTES: u64 = 8 * 1024 * 1024;

/// Why the queue cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(
        "cannot open the delivery queue at {path}: {source} (is another census-agent using this state directory? If the queue is damaged, move it aside: the batches in it are then lost)"
    )]
    Open { path: PathBuf, source: sled::Error },
    #[error("cannot write the delivery queue: {0}")]
    Write(#[from] sled::Error),
    #[error("cannot save the agent state: {0}")]
    State(#[from] std::io::Error),
}

/// One queued batch, as [`Queue::peek`] returns it.
#[derive(Debug, Clone)]
pub struct Queued {
    /// Its place in the queue (what [`Queue::remove`] takes).
    pub key: u64,
    pub batch: v1::ObservationBatch,
}

/// The queue. Its methods are short and synchronous (a sled write and, when queueing, a
/// flush), so async code calls them directly.
#[derive(Debug)]
pub struct Queue {
    inner: Mutex<Inner>,
    /// Woken on every change (batches queued, removed, renumbered) and by [`Queue::poke`].
    changed: Notify,
    metrics: &'static Metrics,
    durable: bool,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    state: AgentState,
    /// The key the next queued batch gets.
    next_key: u64,
    len: u64,
    bytes: u64,
    max_bytes: u64,
}

#[derive(Debug)]
enum Store {
    Disk { db: sled::Db, tree: sled::Tree },
    Memory(BTreeMap<u64, Vec<u8>>),
}

// === impl Store ===

impl Store {
    /// Every entry from the first, until `f` says stop. Keys that are not queue positions are
    /// passed as `None`, with their raw bytes.
    fn scan(
        &self,
        mut f: impl FnMut(Result<u64, &[u8]>, &[u8]) -> bool,
    ) -> Result<(), sled::Error> {
        match self {
            Store::Disk { tree, .. } => {
                for entry in tree.iter() {
                    let (k, v) = entry?;
                    let key = <[u8; 8]>::try_from(k.as_ref())
                        .map(u64::from_be_bytes)
                        .map_err(|_| k.as_ref());
                    if !f(key, &v) {
                        break;
                    }
                }
            }
            Store::Memory(map) => {
                for (k, v) in map {
                    if !f(Ok(*k), v) {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Removes `remove` and inserts `insert` at once; with `flush`, durably before returning.
    fn apply(
        &mut self,
        remove: &[Vec<u8>],
        insert: Vec<(u64, Vec<u8>)>,
        flush: bool,
    ) -> Result<(), sled::Error> {
        match self {
            Store::Disk { db, tree } => {
                let mut batch = sled::Batch::default();
                for k in remove {
                    batch.remove(k.as_slice());
                }
                for (k, v) in insert {
                    batch.insert(&k.to_be_bytes(), v);
                }
                tree.apply_batch(batch)?;
                if flush {
                    db.flush()?;
                }
            }
            Store::Memory(map) => {
                for k in remove {
                    if let Ok(k) = <[u8; 8]>::try_from(k.as_slice()) {
                        map.remove(&u64::from_be_bytes(k));
                    }
                }
                map.extend(insert);
            }
        }
        Ok(())
    }

    /// Removes one entry; returns its size if it was there.
    fn remove(&mut self, key: u64) -> Result<Option<usize>, sled::Error> {
        match self {
            Store::Disk { tree, .. } => Ok(tree.remove(key.to_be_bytes())?.map(|v| v.len())),
            Store::Memory(map) => Ok(map.remove(&key).map(|v| v.len())),
        }
    }
}

fn encode(batch: &v1::ObservationBatch) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + batch.encoded_len());
    out.push(FORMAT_V1);
    // Encoding into a Vec cannot fail: it grows as needed.
    let _ = batch.encode(&mut out);
    out
}

fn decode(value: &[u8]) -> Result<v1::ObservationBatch, String> {
    match value.split_first() {
        Some((&FORMAT_V1, rest)) => v1::ObservationBatch::decode(rest).map_err(|e| e.to_string()),
        Some((format, _)) => Err(format!("unknown format {format}")),
        None => Err("empty entry".into()),
    }
}

fn key_text(key: Result<u64, &[u8]>) -> String {
    match key {
        Ok(k) => k.to_string(),
        Err(raw) => format!("0x{}", hex_bytes(raw)),
    }
}

fn hex_bytes(raw: &[u8]) -> String {
    raw.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

fn raw_key(key: Result<u64, &[u8]>) -> Vec<u8> {
    match key {
        Ok(k) => k.to_be_bytes().to_vec(),
        Err(raw) => raw.to_vec(),
    }
}

// === impl Queue ===

/// Opens sled, waiting up to two seconds for its lock: a queue closed a moment ago (a restart
/// in the same process, or a test reopening its queue) can hold the lock a few milliseconds
/// longer, until sled's flusher thread lets go of its files. A lock held longer than that is
/// another agent's, and the error says so.
fn open_sled(config: &sled::Config) -> sled::Result<sled::Db> {
    let started = std::time::Instant::now();
    loop {
        match config.open() {
            Err(sled::Error::Io(io))
                if (io.kind() == std::io::ErrorKind::WouldBlock
                    || io.to_string().contains("could not acquire lock"))
                    && started.elapsed() < std::time::Duration::from_secs(2) =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

impl Queue {
    /// Opens the queue and the agent's state in `state_dir` (creating both if new), or, without
    /// one, an in-memory queue under a new agent identity. `max_bytes` caps the encoded size of
    /// what is queued. Damaged entries are removed and reported here.
    pub fn open(
        state_dir: Option<&Path>,
        max_bytes: u64,
        metrics: &'static Metrics,
    ) -> Result<Queue, QueueError> {
        let state = AgentState::load_or_create(state_dir)?;
        let store = match state_dir {
            Some(dir) => {
                let path = dir.join("queue");
                let open = |path: &Path| -> Result<Store, sled::Error> {
                    let db =
                        open_sled(&sled::Config::new().path(path).cache_capacity(CACHE_BYTES))?;
                    let tree = db.open_tree("batches")?;
                    Ok(Store::Disk { db, tree })
                };
                open(&path).map_err(|source| QueueError::Open { path, source })?
            }
            None => Store::Memory(BTreeMap::new()),
        };
        let queue = Queue {
            inner: Mutex::new(Inner {
                store,
                state,
                next_key: 0,
                len: 0,
                bytes: 0,
                max_bytes,
            }),
            changed: Notify::new(),
            metrics,
            durable: state_dir.is_some(),
        };
        queue.load()?;
        Ok(queue)
    }

    /// Reads every entry once: counts them, finds the next key, removes what cannot be read,
    /// and moves the next sequence past any queued batch of the current agent id.
    fn load(&self) -> Result<(), QueueError> {
        let mut inner = self.lock();
        let agent_id = inner.state.agent_id.clone();
        let epoch = inner.state.epoch;
        let (mut len, mut bytes, mut next_key, mut max_sequence) = (0u64, 0u64, 0u64, 0u64);
        let mut corrupt = Vec::new();
        inner.store.scan(|key, value| {
            match (key, decode(value)) {
                (Ok(k), Ok(batch)) => {
                    len += 1;
                    bytes += value.len() as u64;
                    next_key = next_key.max(k.saturating_add(1));
                    if batch.agent_id == agent_id && batch.epoch == epoch {
                        max_sequence = max_sequence.max(batch.sequence);
                    }
                }
                (key, decoded) => {
                    let why = decoded
                        .err()
                        .unwrap_or_else(|| "not a queue position".into());
                    corrupt.push((raw_key(key), key_text(key), why));
                }
            }
            true
        })?;
        if !corrupt.is_empty() {
            let keys: Vec<Vec<u8>> = corrupt.iter().map(|(k, _, _)| k.clone()).collect();
            inner.store.apply(&keys, Vec::new(), true)?;
            self.metrics.corrupt(corrupt.len() as u64);
            for (_, key, why) in &corrupt {
                warn!(key = %key, error = %why, "a queued batch cannot be read: removed from the queue");
            }
        }
        if max_sequence >= inner.state.next_sequence {
            // agent.json is behind the queue (restored from a backup?): never reuse a sequence.
            let behind = max_sequence + 1 - inner.state.next_sequence;
            inner.state.reserve(behind)?;
            warn!(
                agent_id = %agent_id,
                next_sequence = inner.state.next_sequence,
                "agent.json was behind the queue: moved the next sequence past the queued batches"
            );
        }
        inner.len = len;
        inner.bytes = bytes;
        inner.next_key = next_key;
        self.metrics.queue_size(len, bytes);
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while the lock was held leaves the counters possibly off by one batch, never
        // the store inconsistent (each change is one atomic write): carry on.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the queue survives the agent (it has a state directory).
    pub fn is_durable(&self) -> bool {
        self.durable
    }

    /// Batches queued.
    pub fn len(&self) -> usize {
        usize::try_from(self.lock().len).unwrap_or(usize::MAX)
    }

    pub fn is_empty(&self) -> bool {
        self.lock().len == 0
    }

    /// The encoded size of what is queued.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// The agent id new batches are queued under.
    pub fn agent_id(&self) -> String {
        self.lock().state.agent_id.clone()
    }

    /// The sequence epoch new batches are queued in.
    pub fn epoch(&self) -> u64 {
        self.lock().state.epoch
    }

    /// The next sequence number [`Queue::push`] would reserve.
    pub fn next_sequence(&self) -> u64 {
        self.lock().state.next_sequence
    }

    /// The directory the last complete read named (kept in `agent.json`).
    pub fn directory(&self) -> Option<String> {
        self.lock().state.directory.clone()
    }

    /// Remembers the directory a complete read named.
    pub fn set_directory(&self, directory: &str) -> Result<(), QueueError> {
        Ok(self.lock().state.set_directory(directory)?)
    }

    /// A future that completes at the next change of the queue (or [`Queue::poke`]). Made
    /// before checking a condition, it cannot miss a change that happens after the check.
    pub fn changed(&self) -> Notified<'_> {
        self.changed.notified()
    }

    /// Wakes everyone waiting on [`Queue::changed`] (the delivery task does, when it starts
    /// waiting out a back-off, so the run loop stops waiting for it).
    pub fn poke(&self) {
        self.changed.notify_waiters();
    }

    /// Reserves `count` sequence numbers, has `build` make that many batches numbered from the
    /// first under the current agent id, and queues them durably (dropping the oldest batches
    /// if the cap says so). Returns the sequences queued. See the module doc for the order of
    /// the writes and what a crash between them leaves.
    pub fn push(
        &self,
        count: u64,
        build: impl FnOnce(&str, u64) -> Vec<v1::ObservationBatch>,
    ) -> Result<Vec<u64>, QueueError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let mut inner = self.lock();
        let first = inner.state.reserve(count)?;
        let mut batches = build(&inner.state.agent_id, first);
        for b in &mut batches {
            b.epoch = inner.state.epoch;
        }
        debug_assert_eq!(
            batches.len() as u64,
            count,
            "build made the batches reserved"
        );
        let sequences: Vec<u64> = batches.iter().map(|b| b.sequence).collect();
        let observations: u64 = batches.iter().map(|b| b.observations.len() as u64).sum();
        let mut new: Vec<(u64, Vec<u8>, &v1::ObservationBatch)> = Vec::new();
        for b in &batches {
            let key = inner.next_key;
            inner.next_key += 1;
            new.push((key, encode(b), b));
        }
        let new_bytes: u64 = new.iter().map(|(_, v, _)| v.len() as u64).sum();

        // Over the cap: the oldest go first, those queued before, then (only if one sweep is
        // larger than the whole cap) the oldest of these, keeping the newest.
        let mut excess = (inner.bytes + new_bytes).saturating_sub(inner.max_bytes);
        let mut dropped = Dropped::default();
        let mut remove = Vec::new();
        let mut removed_bytes = 0u64;
        if excess > 0 {
            let mut corrupt = 0u64;
            inner.store.scan(|key, value| {
                if excess == 0 {
                    return false;
                }
                remove.push(raw_key(key));
                removed_bytes += value.len() as u64;
                excess = excess.saturating_sub(value.len() as u64);
                match decode(value) {
                    Ok(b) => dropped.add(&b),
                    Err(_) => corrupt += 1,
                }
                true
            })?;
            if corrupt > 0 {
                self.metrics.corrupt(corrupt);
                warn!(
                    batches = corrupt,
                    "queued batches that cannot be read were among those dropped for the cap"
                );
            }
        }
        let mut skip_new = 0;
        while excess > 0 && skip_new + 1 < new.len() {
            let (_, v, b) = &new[skip_new];
            excess = excess.saturating_sub(v.len() as u64);
            dropped.add(b);
            skip_new += 1;
        }
        let dropped_count = remove.len() as u64;
        let insert: Vec<(u64, Vec<u8>)> = new
            .into_iter()
            .skip(skip_new)
            .map(|(k, v, _)| (k, v))
            .collect();
        let kept_new = insert.len() as u64;
        let kept_bytes: u64 = insert.iter().map(|(_, v)| v.len() as u64).sum();
        inner.store.apply(&remove, insert, true)?;
        // Saturating: an entry written behind our back (see `load`) may be among those dropped.
        inner.len = inner.len.saturating_sub(dropped_count) + kept_new;
        inner.bytes = inner.bytes.saturating_sub(removed_bytes) + kept_bytes;
        self.metrics.queued(count, observations);
        if dropped.batches > 0 {
            self.metrics.dropped(dropped.batches, dropped.observations);
            warn!(
                cap_bytes = inner.max_bytes,
                dropped_batches = dropped.batches,
                dropped_observations = dropped.observations,
                dropped_users = dropped.users,
                from = %dropped.from,
                to = %dropped.to,
                queued = inner.len,
                "DELIVERY QUEUE FULL: dropped the oldest batches, never delivered (raise \
                 queue.max_mb or bring the collector back)"
            );
        }
        self.metrics.queue_size(inner.len, inner.bytes);
        drop(inner);
        self.changed.notify_waiters();
        Ok(sequences)
    }

    /// The oldest batches, at most `max_batches` and (past the first) `max_bytes`, all under
    /// one agent id (see the module doc). Entries that cannot be read are removed and reported.
    pub fn peek(&self, max_batches: usize, max_bytes: u64) -> Result<Vec<Queued>, QueueError> {
        let mut inner = self.lock();
        let mut out: Vec<Queued> = Vec::new();
        let mut corrupt = Vec::new();
        let mut bytes = 0u64;
        inner.store.scan(|key, value| {
            if out.len() >= max_batches
                || (!out.is_empty() && bytes + value.len() as u64 > max_bytes)
            {
                return false;
            }
            match (key, decode(value)) {
                (Ok(key), Ok(batch)) => {
                    if out.first().is_some_and(|q| {
                        (&q.batch.agent_id, q.batch.epoch) != (&batch.agent_id, batch.epoch)
                    }) {
                        return false;
                    }
                    bytes += value.len() as u64;
                    out.push(Queued { key, batch });
                }
                (key, decoded) => {
                    let why = decoded
                        .err()
                        .unwrap_or_else(|| "not a queue position".into());
                    corrupt.push((raw_key(key), key_text(key), why, value.len() as u64));
                }
            }
            true
        })?;
        if !corrupt.is_empty() {
            let keys: Vec<Vec<u8>> = corrupt.iter().map(|(k, ..)| k.clone()).collect();
            inner.store.apply(&keys, Vec::new(), true)?;
            for (_, key, why, size) in &corrupt {
                warn!(key = %key, error = %why, "a queued batch cannot be read: removed from the queue");
                inner.len = inner.len.saturating_sub(1);
                inner.bytes = inner.bytes.saturating_sub(*size);
            }
            self.metrics.corrupt(corrupt.len() as u64);
            self.metrics.queue_size(inner.len, inner.bytes);
        }
        Ok(out)
    }

    /// Removes acknowledged batches (those already dropped for the cap are skipped). Not
    /// flushed: a removal lost to a crash only resends a batch the collector then calls a
    /// duplicate.
    pub fn remove(&self, keys: &[u64]) -> Result<(), QueueError> {
        let mut inner = self.lock();
        for &key in keys {
            if let Some(size) = inner.store.remove(key)? {
                inner.len = inner.len.saturating_sub(1);
                inner.bytes = inner.bytes.saturating_sub(size as u64);
            }
        }
        self.metrics.queue_size(inner.len, inner.bytes);
        drop(inner);
        self.changed.notify_waiters();
        Ok(())
    }

    /// Continues in a new sequence epoch under the same agent id: the new epoch saved with
    /// sequences reserved for every queued batch, then every queued batch renumbered in it in
    /// one atomic write. Returns the old and the new epoch.
    pub fn rotate(&self) -> Result<(u64, u64), QueueError> {
        let mut inner = self.lock();
        let old = inner.state.epoch;
        Self::renumber(
            &mut inner,
            self.metrics,
            |_| true,
            |state, batches| state.rotate(batches),
        )?;
        let new = inner.state.epoch;
        drop(inner);
        self.changed.notify_waiters();
        Ok((old, new))
    }

    /// Takes `agent_id` (the one the agent's certificate names) as the id batches carry, and
    /// renumbers the queued batches that name another id under it (the collector refuses a
    /// batch naming another agent than the certificate's): batches of a state made before the
    /// certificate, or queued before the agent was enrolled again under a new id. Returns how
    /// many were renumbered.
    pub fn adopt(&self, agent_id: &str) -> Result<usize, QueueError> {
        let mut inner = self.lock();
        let changed = inner.state.agent_id != agent_id;
        let mut renumbered = 0;
        Self::renumber(
            &mut inner,
            self.metrics,
            |b| b.agent_id != agent_id,
            |state, batches| {
                if changed {
                    state.adopt(agent_id)?;
                }
                renumbered = batches.len();
                if batches.is_empty() {
                    return Ok(batches);
                }
                state.renumber(batches)
            },
        )?;
        drop(inner);
        if changed || renumbered > 0 {
            self.changed.notify_waiters();
        }
        Ok(renumbered)
    }

    /// Rewrites the queued batches `select` picks as `change` renumbers them (it saves the
    /// state, with their sequences reserved, first), in one atomic write, flushed; removes
    /// entries that cannot be read.
    fn renumber(
        inner: &mut Inner,
        metrics: &Metrics,
        select: impl Fn(&v1::ObservationBatch) -> bool,
        change: impl FnOnce(
            &mut AgentState,
            Vec<v1::ObservationBatch>,
        ) -> std::io::Result<Vec<v1::ObservationBatch>>,
    ) -> Result<(), QueueError> {
        let mut entries = Vec::new();
        let mut corrupt = Vec::new();
        let (mut len, mut bytes) = (0u64, 0u64);
        inner.store.scan(|key, value| {
            match (key, decode(value)) {
                (Ok(k), Ok(b)) if select(&b) => entries.push((k, b)),
                (Ok(_), Ok(_)) => {
                    len += 1;
                    bytes += value.len() as u64;
                }
                (key, _) => corrupt.push(raw_key(key)),
            }
            true
        })?;
        let keys: Vec<u64> = entries.iter().map(|(k, _)| *k).collect();
        let renumbered = change(
            &mut inner.state,
            entries.into_iter().map(|(_, b)| b).collect(),
        )?;
        let insert: Vec<(u64, Vec<u8>)> = keys
            .into_iter()
            .zip(&renumbered)
            .map(|(k, b)| (k, encode(b)))
            .collect();
        inner.len = len + insert.len() as u64;
        inner.bytes = bytes + insert.iter().map(|(_, v)| v.len() as u64).sum::<u64>();
        if !corrupt.is_empty() {
            metrics.corrupt(corrupt.len() as u64);
            warn!(
                batches = corrupt.len(),
                "queued batches that cannot be read: removed from the queue"
            );
        }
        inner.store.apply(&corrupt, insert, true)?;
        metrics.queue_size(inner.len, inner.bytes);
        Ok(())
    }
}

/// What the cap dropped, for the warn line.
#[derive(Debug, Default)]
struct Dropped {
    batches: u64,
    observations: u64,
    users: u64,
    /// `agent-id#epoch.sequence` of the first and last batch dropped.
    from: String,
    to: String,
}

impl Dropped {
    fn add(&mut self, b: &v1::ObservationBatch) {
        let name = format!("{}#{}.{}", b.agent_id, b.epoch, b.sequence);
        if self.batches == 0 {
            self.from.clone_from(&name);
        }
        self.to = name;
        self.batches += 1;
        self.observations += b.observations.len() as u64;
        self.users += b.users.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::report;

    fn metrics() -> &'static Metrics {
        Box::leak(Box::new(Metrics::new()))
    }

    /// `n` observations, each a distinct host.
    fn observations(n: u32) -> Vec<v1::Observation> {
        (0..n)
            .map(|i| {
                report::arp_observation(
                    std::net::Ipv4Addr::from(0xc612_0000 + i),
                    [0, 0x16, 0x3e, 0, (i >> 8) as u8, i as u8],
                    "eth0",
                    SystemTime::now(),
                )
            })
            .collect()
    }

    /// Queues one sweep of `n` observations; returns its sequences.
    fn sweep(q: &Queue, n: u32) -> Vec<u64> {
        let obs = observations(n);
        q.push(report::batch_count(obs.len()), |id, first| {
            report::into_batches(id, first, obs)
        })
        .expect("push")
    }

    fn sequences(q: &Queue) -> Vec<u64> {
        q.peek(usize::MAX, u64::MAX)
            .expect("peek")
            .iter()
            .map(|e| e.batch.sequence)
            .collect()
    }

    /// Copies a sled directory as it is on disk now: what a SIGKILL would leave behind.
    fn crash_image(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for entry in std::fs::read_dir(from).expect("read_dir") {
            let entry = entry.expect("entry");
            let target = to.join(entry.file_name());
            if entry.file_type().expect("type").is_dir() {
                crash_image(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).expect("copy");
            }
        }
    }

    #[test]
    fn batches_come_out_in_order_and_leave_when_acknowledged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = metrics();
        let q = Queue::open(Some(dir.path()), 1 << 30, m).expect("open");
        assert!(q.is_durable() && q.is_empty());
        assert_eq!(sweep(&q, 1200), [1, 2, 3]);
        assert_eq!(sweep(&q, 10), [4]);
        assert_eq!(sequences(&q), [1, 2, 3, 4]);
        let window = q.peek(2, u64::MAX).expect("peek");
        assert_eq!(window.len(), 2);
        assert_eq!(window[0].batch.observations.len(), 500);
        q.remove(&[window[0].key]).expect("remove");
        assert_eq!(sequences(&q), [2, 3, 4]);
        // Removing twice (an ack for a batch the cap dropped meanwhile) changes nothing.
        q.remove(&[window[0].key]).expect("remove again");
        assert_eq!(q.len(), 3);
        let s = m.snapshot();
        assert_eq!((s.batches_queued, s.observations_queued), (4, 1210));
        assert_eq!(s.queue_batches, 3);
        assert_eq!(s.queue_bytes, q.bytes());

        // A restart resumes where it was, with later sequences still after the queued ones.
        drop(q);
        let q = Queue::open(Some(dir.path()), 1 << 30, metrics()).expect("reopen");
        assert_eq!(sequences(&q), [2, 3, 4]);
        assert_eq!(sweep(&q, 1), [5]);
        assert_eq!(sequences(&q), [2, 3, 4, 5]);
    }

    #[test]
    fn the_cap_drops_the_oldest_loudly_and_counts_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = metrics();
        let q = Queue::open(Some(dir.path()), 1 << 30, m).expect("open");
        sweep(&q, 500);
        let one = q.bytes();
        drop(q);
        // Room for three full batches and a bit.
        let cap = one * 3 + one / 2;
        let q = Queue::open(Some(dir.path()), cap, m).expect("open");
        sweep(&q, 1000); // 2, 3
        assert_eq!(sequences(&q), [1, 2, 3]);
        assert_eq!(m.snapshot().batches_dropped, 0);
        sweep(&q, 1000); // 4, 5: 1 and 2 go
        assert_eq!(sequences(&q), [3, 4, 5]);
        let s = m.snapshot();
        assert_eq!((s.batches_dropped, s.observations_dropped), (2, 1000));
        assert!(q.bytes() <= cap, "{} > {cap}", q.bytes());
        // One sweep larger than the whole cap keeps its newest batches only.
        sweep(&q, 2500); // 6..=10
        assert_eq!(sequences(&q), [8, 9, 10]);
        let s = m.snapshot();
        assert_eq!((s.batches_dropped, s.observations_dropped), (7, 3500));
        assert_eq!(s.queue_batches, 3);

        // Dropped without a clean shutdown (sled's files as a SIGKILL leaves them): everything
        // that was queued after the drop is there, and nothing that was dropped.
        let image = tempfile::tempdir().expect("tempdir");
        crash_image(dir.path(), image.path());
        let q2 = Queue::open(Some(image.path()), cap, metrics()).expect("open the image");
        assert_eq!(sequences(&q2), [8, 9, 10]);
        assert_eq!(q2.next_sequence(), 11);
        assert_eq!(q2.bytes(), q.bytes());
        let all: usize = q2
            .peek(usize::MAX, u64::MAX)
            .expect("peek")
            .iter()
            .map(|e| e.batch.observations.len())
            .sum();
        assert_eq!(all, 1500);
    }

    #[test]
    fn corrupt_entries_are_reported_and_removed_not_panicked_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let q = Queue::open(Some(dir.path()), 1 << 30, metrics()).expect("open");
            sweep(&q, 3);
            sweep(&q, 3);
        }
        {
            // Damage the queue behind its back: a value that is not a batch, one of an unknown
            // format, and a key that is not a queue position.
            let db = open_sled(&sled::Config::new().path(dir.path().join("queue"))).expect("sled");
            let tree = db.open_tree("batches").expect("tree");
            tree.insert(10u64.to_be_bytes(), vec![FORMAT_V1, 0xff, 0xff, 0xff])
                .expect("insert");
            tree.insert(11u64.to_be_bytes(), vec![9, 1, 2])
                .expect("insert");
            tree.insert(b"junk", vec![FORMAT_V1]).expect("insert");
            db.flush().expect("flush");
        }
        let m = metrics();
        let q = Queue::open(Some(dir.path()), 1 << 30, m).expect("open despite damage");
        assert_eq!(m.snapshot().batches_corrupt, 3);
        assert_eq!(sequences(&q), [1, 2]);
        assert_eq!(q.len(), 2);

        // Damage found later, while reading a window, is handled the same way.
        if let Store::Disk { tree, .. } = &q.lock().store {
            tree.insert(1u64.to_be_bytes(), vec![]).expect("insert");
        }
        let window = q.peek(10, u64::MAX).expect("peek");
        assert_eq!(window.len(), 1, "the damaged entry is skipped");
        assert_eq!(m.snapshot().batches_corrupt, 4);
    }

    #[test]
    fn rotation_renumbers_every_queued_batch_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = Queue::open(Some(dir.path()), 1 << 30, metrics()).expect("open");
        sweep(&q, 700); // 1, 2
        sweep(&q, 1); // 3
        let first = q.peek(1, u64::MAX).expect("peek");
        q.remove(&[first[0].key]).expect("acked");
        let id = q.agent_id();
        let (old, new) = q.rotate().expect("rotate");
        assert_ne!(old, new);
        let window = q.peek(10, u64::MAX).expect("peek");
        assert_eq!(
            window
                .iter()
                .map(|e| (
                    e.batch.agent_id.as_str(),
                    e.batch.epoch,
                    e.batch.sequence,
                    e.batch.observations.len()
                ))
                .collect::<Vec<_>>(),
            [(id.as_str(), new, 1, 200), (id.as_str(), new, 2, 1)],
            "the same agent id, in the new epoch"
        );
        assert_eq!(sweep(&q, 1), [3]);
        drop(q);
        let q = Queue::open(Some(dir.path()), 1 << 30, metrics()).expect("reopen");
        assert_eq!((q.agent_id(), q.epoch()), (id, new));
        assert_eq!(sequences(&q), [1, 2, 3]);
    }

    #[test]
    fn a_window_holds_one_epoch_and_an_old_state_never_reuses_a_sequence() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = Queue::open(Some(dir.path()), 1 << 30, metrics()).expect("open");
        sweep(&q, 1);
        let saved = std::fs::read(dir.path().join("agent.json")).expect("agent.json");
        sweep(&q, 1);
        sweep(&q, 1);
        // agent.json restored from before the last two batches: the queue moves it on.
        drop(q);
        std::fs::write(dir.path().join("agent.json"), saved).expect("restore");
        let q = Queue::open(Some(dir.path()), 1 << 30, metrics()).expect("reopen");
        assert_eq!(q.next_sequence(), 4);
        assert_eq!(sweep(&q, 1), [4]);

        // A queue whose head is in an older epoch (a rotation cut short by a crash).
        let (old, current) = q.rotate().expect("rotate");
        if let Store::Disk { tree, .. } = &q.lock().store {
            let mut b = decode(&tree.get(0u64.to_be_bytes()).expect("get").expect("key 0"))
                .expect("decode");
            b.epoch = old;
            tree.insert(0u64.to_be_bytes(), encode(&b)).expect("insert");
        }
        let window = q.peek(10, u64::MAX).expect("peek");
        assert_eq!(window.len(), 1);
        assert_eq!(window[0].batch.epoch, old);
        q.remove(&[window[0].key]).expect("remove");
        let window = q.peek(10, u64::MAX).expect("peek");
        assert!(window.iter().all(|e| e.batch.epoch == current));
        assert_eq!(window.len(), 3);
    }

    #[test]
    fn a_new_state_starts_in_an_epoch_of_its_own() {
        let (a, b) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        let qa = Queue::open(Some(a.path()), 1 << 30, metrics()).expect("open");
        let qb = Queue::open(Some(b.path()), 1 << 30, metrics()).expect("open");
        assert_ne!(qa.epoch(), 0, "0 is the epoch of states older than epochs");
        assert_ne!(qa.epoch(), qb.epoch());
        sweep(&qa, 1);
        assert_eq!(
            qa.peek(1, u64::MAX).expect("peek")[0].batch.epoch,
            qa.epoch()
        );
        // A state written before epochs reads as epoch 0, and keeps it.
        drop(qa);
        std::fs::write(
            a.path().join("agent.json"),
            r#"{"agent_id":"old","next_sequence":5}"#,
        )
        .expect("write");
        let qa = Queue::open(Some(a.path()), 1 << 30, metrics()).expect("reopen");
        assert_eq!(
            (qa.agent_id(), qa.epoch(), qa.next_sequence()),
            ("old".into(), 0, 5)
        );
    }

    #[test]
    fn adopting_the_certificates_id_renumbers_batches_under_another_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = Queue::open(Some(dir.path()), 1 << 30, metrics()).expect("open");
        let epoch = q.epoch();
        sweep(&q, 700); // 1, 2 under the state's own id
        assert_eq!(q.adopt(&q.agent_id()).expect("adopt"), 0, "already");
        assert_eq!(q.adopt("cert-id").expect("adopt"), 2);
        assert_eq!(q.agent_id(), "cert-id");
        sweep(&q, 1); // 5
        let window = q.peek(10, u64::MAX).expect("peek");
        assert_eq!(
            window
                .iter()
                .map(|e| (e.batch.agent_id.as_str(), e.batch.epoch, e.batch.sequence))
                .collect::<Vec<_>>(),
            [
                ("cert-id", epoch, 3),
                ("cert-id", epoch, 4),
                ("cert-id", epoch, 5)
            ],
            "in order, never reusing a sequence"
        );
        // Batches still under another id (queued before the agent was enrolled again, when
        // agent.json already names the new id) are renumbered too.
        if let Store::Disk { tree, .. } = &q.lock().store {
            let mut b = decode(&tree.get(0u64.to_be_bytes()).expect("get").expect("key 0"))
                .expect("decode");
            b.agent_id = "revoked-id".into();
            tree.insert(0u64.to_be_bytes(), encode(&b)).expect("insert");
        }
        assert_eq!(q.adopt("cert-id").expect("adopt"), 1);
        assert_eq!(
            sequences(&q),
            [6, 4, 5],
            "a new sequence, its place in the queue kept"
        );
        drop(q);
        let q = Queue::open(Some(dir.path()), 1 << 30, metrics()).expect("reopen");
        assert_eq!((q.agent_id(), q.len()), ("cert-id".into(), 3));
    }

    #[test]
    fn without_a_state_directory_the_queue_is_in_memory() {
        let m = metrics();
        let q = Queue::open(None, 1 << 30, m).expect("open");
        assert!(!q.is_durable());
        assert_eq!(sweep(&q, 501), [1, 2]);
        let w = q.peek(10, u64::MAX).expect("peek");
        q.remove(&[w[0].key]).expect("remove");
        assert_eq!(sequences(&q), [2]);
        let (_, new) = q.rotate().expect("rotate");
        assert_eq!(q.peek(10, u64::MAX).expect("peek")[0].batch.epoch, new);
        // A window never passes its byte budget, except to hold one batch.
        sweep(&q, 1000);
        assert_eq!(q.peek(10, 1).expect("peek").len(), 1);
    }
}
