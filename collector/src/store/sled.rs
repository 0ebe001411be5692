//! The default store: sled, embedded in the collector, one directory, nothing to install.
//!
//! Trees and keys (`\0` separates parts; names never contain it):
//! - `clients`: `client` -> [`ClientRecord`]
//! - `sites`: `client\0site` -> [`SiteRecord`]
//! - `tokens`: `token id` -> [`TokenRecord`] (JSON)
//! - `agents`: `agent id` -> [`AgentRecord`] (JSON)
//! - `graph`: every client's identity graph and applied batches, in one tree so that a batch
//!   commits with one atomic [`sled::Tree::apply_batch`]; the first byte says what a key is:
//!   - `d` `client\0device id` -> [`DeviceRecord`], with its counting summary in front
//!   - `k` `client\0identity key` -> [`KeyRecord`] (see [`crate::identity`])
//!   - `o` `client\0site\0address` -> [`AddressOwner`]
//!   - `v` `client\0virtual MAC` -> [`VirtualMacRecord`]
//!   - `e` `client\0sequence (u64 BE)` -> [`Event`] (merges and splits)
//!   - `b` `client\0site\0agent id\0sequence (u64 BE)` -> applied-at millis (u64 BE) and the
//!     SHA-256 of the batch's content
//! - `policies`: `client\0n (u64 BE)` -> [`Policy`] version `<client>-<n>`, never rewritten
//! - `snapshots`: `client\0period` -> [`Snapshot`], written once, never overwritten
//! - `meta`: facts about the store itself (the layout version)
//! - `users`, `user_policies`: a client's accounts, user sources, staged directory reads and
//!   billable-user policies (see [`users`])
//!
//! Values are one format byte followed by postcard, or (policies and snapshots) by JSON: those
//! are kept for years and read rarely, so they are stored in a self-describing form that later
//! fields (`#[serde(default)]`) can be added to without rewriting them. A device record has a
//! format of its own (`3`): its counting summary (last seen as u64 BE, a flags byte, the
//! category label's length as u16 BE and the label), then postcard, so counting reads a few
//! bytes of each record and decodes none.
//!
//! **Applying a batch.** The identity rules run outside any sled transaction, over an
//! [`overlay::Overlay`] that reads the client's records once and keeps its writes in memory,
//! under a lock of the client's own (so batches of different clients are worked out on
//! different cores, and two batches of one client never interleave). The writes then go to the
//! commit pipeline ([`commit::Pipeline`]): appended whole to a write-ahead log of the store's
//! own (`<data dir>/wal/`, see [`wal`]) and put in a write buffer ([`memtable`]) that every
//! reader of `graph` looks at before sled, in one step. The batch is acknowledged once the log
//! is `fdatasync`ed up to it, one sync for every writer waiting (group commit). sled is written
//! behind, by checkpoints: the buffer, each record once however often it changed, in large
//! batches on a thread of its own; then the log segments it covers are removed. On open, what
//! the log holds beyond the last checkpoint is written to sled first. Operators' edits take the
//! same lock and path.
//!
//! **Durability.** Every write that is acknowledged to anyone is durable first: a `graph`
//! write in the log, any other write by a sled flush. The one write that is not (an agent's
//! last-seen time) is flushed by the checkpoint thread within half a second, when the disk has
//! room: sled's own background flusher is off, as it would write on a full disk (see
//! [`commit`]).
//!
//! **Counting.** `GetCounts` counts from [`counts::CountIndex`], the summaries of a client's
//! devices in memory, read from the store on the client's first count and kept in step by
//! every commit.
//!
//! **Memory.** sled's page cache is bounded by [`SledOptions::cache_bytes`] (the collector's
//! `cache_mb`); beyond it, the collector's memory grows with the devices only by the count
//! index (about 50 bytes a device).

mod commit;
mod counts;
mod memtable;
mod overlay;
mod reopen;
mod users;
mod wal;

pub use reopen::Reopening;

use std::{
    collections::BTreeMap,
    hash::{Hash as _, Hasher as _},
    net::IpAddr,
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
};

use census_proto::convert::MacAddr;

use serde::{Serialize, de::DeserializeOwned};
use sled::transaction::TransactionError;

use super::{BatchId, BatchOutcome, Edit, Store, StoreError, present, run_edit};
use crate::{
    identity::{self, AddressOwner, EditError, Event, VirtualMacRecord},
    model::{
        AgentRecord, CleanObservation, ClientRecord, DeviceRecord, Scope, SiteRecord, TokenRecord,
    },
    policy::{DeviceSummary, Policy, PolicyRules, Tally},
    snapshot::Snapshot,
    users::{
        Account, SourceStatus, UserPolicy, UserPolicyRules,
        apply::{self as users_apply, Read, ReadPart},
    },
};
use overlay::Overlay;

/// Format byte in front of every stored value: postcard.
const FORMAT_V1: u8 = 1;
/// Format byte for values stored as JSON.
const FORMAT_JSON: u8 = 2;
/// Format byte of a device record with its counting summary in front.
const FORMAT_DEVICE: u8 = 3;

/// What a `graph` key is: its first byte.
const DEVICE: u8 = b'd';
const KEY: u8 = b'k';
const OWNER: u8 = b'o';
const VMAC: u8 = b'v';
const EVENT: u8 = b'e';
const BATCH: u8 = b'b';

/// Trees of earlier layouts, moved into `graph` when found (see [`SledStore::migrate`]).
const OLD_TREES: [(&str, u8); 6] = [
    ("devices", DEVICE),
    ("keys", KEY),
    ("owners", OWNER),
    ("vmacs", VMAC),
    ("events", EVENT),
    ("batches", BATCH),
];

/// In `meta`: the layout described above is complete (trees moved, device summaries written).
const LAYOUT: &[u8] = b"layout";
const LAYOUT_VERSION: &[u8] = b"graph-v1";

/// The default bound of sled's page cache.
pub const DEFAULT_CACHE_BYTES: u64 = crate::config::DEFAULT_CACHE_MB * 1024 * 1024;

/// How many locks the clients share (a client always maps to the same one).
const CLIENT_LOCKS: usize = 64;

/// How the store is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SledOptions {
    /// The most memory sled's page cache may use. It bounds the collector's memory however
    /// many devices it holds; what does not fit is read from disk (and the OS page cache).
    pub cache_bytes: u64,
}

impl Default for SledOptions {
    fn default() -> Self {
        SledOptions {
            cache_bytes: DEFAULT_CACHE_BYTES,
        }
    }
}

/// The sled-backed store. Cheap to clone handles are inside; share it behind an `Arc`.
#[derive(Debug, Clone)]
pub struct SledStore {
    db: sled::Db,
    clients: sled::Tree,
    sites: sled::Tree,
    tokens: sled::Tree,
    agents: sled::Tree,
    graph: sled::Tree,
    policies: sled::Tree,
    snapshots: sled::Tree,
    meta: sled::Tree,
    /// Users, their sources and staged directory reads (see [`users`]).
    users: sled::Tree,
    user_policies: sled::Tree,
    /// Held while a user read is applied (rare, and never for long).
    users_writer: Arc<Mutex<()>>,
    writers: Arc<ClientLocks>,
    pipeline: Arc<commit::Pipeline>,
    counts: Arc<counts::CountIndex>,
    /// sled's configuration, which shares the error sled keeps once one of its own writes
    /// failed (see [`SledStore::needs_reopen`]).
    config: sled::Config,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`, which must exist, with the default options.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, &SledOptions::default())
    }

    /// Opens (or creates) the store in `dir`, which must exist.
    pub fn open_with(dir: &Path, options: &SledOptions) -> Result<Self, StoreError> {
        let path = dir.join("store");
        // No background flusher: it would write on a full disk, and sled fails for good once
        // one of its writes fails. The checkpoint thread flushes instead, when there is room
        // (see [`commit::Pipeline::note_sled_write`]); every durable write flushes itself.
        let config = sled::Config::new()
            .path(&path)
            .cache_capacity(options.cache_bytes)
            .flush_every_ms(None);
        let db = open_sled(&config).map_err(|e| match e {
            sled::Error::Io(io)
                if io.kind() == std::io::ErrorKind::WouldBlock
                    || io.to_string().contains("lock") =>
            {
                StoreError::Locked {
                    path: path.display().to_string(),
                    reason: io.to_string(),
                }
            }
            sled::Error::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
                StoreError::Locked {
                    path: path.display().to_string(),
                    reason: io.to_string(),
                }
            }
            other => StoreError::Engine(other.to_string()),
        })?;
        let tree = |name: &str| db.open_tree(name).map_err(engine);
        let counts = Arc::new(counts::CountIndex::default());
        let forget = {
            let counts = Arc::clone(&counts);
            commit::RollbackHook(Box::new(move || counts.clear()))
        };
        let store = SledStore {
            clients: tree("clients")?,
            sites: tree("sites")?,
            tokens: tree("tokens")?,
            agents: tree("agents")?,
            graph: tree("graph")?,
            policies: tree("policies")?,
            snapshots: tree("snapshots")?,
            meta: tree("meta")?,
            users: tree("users")?,
            user_policies: tree("user_policies")?,
            users_writer: Arc::new(Mutex::new(())),
            writers: Arc::new(ClientLocks::default()),
            pipeline: Arc::new(commit::Pipeline::open(
                &dir.join("wal"),
                &db,
                commit::Limits::for_cache(options.cache_bytes),
                Some(forget),
            )?),
            counts,
            db,
            config,
        };
        store.migrate()?;
        Ok(store)
    }

    /// Brings a store written by an earlier version to this layout: the identity trees move
    /// into `graph` (copied in one atomic batch, then dropped, so a crash in between only
    /// means copying again) and every device record gets its counting summary.
    fn migrate(&self) -> Result<(), StoreError> {
        if self.meta.get(LAYOUT).map_err(engine)?.as_deref() == Some(LAYOUT_VERSION) {
            return Ok(());
        }
        let names = self.db.tree_names();
        let mut moved = Vec::new();
        for (name, kind) in OLD_TREES {
            if !names.iter().any(|n| n.as_ref() == name.as_bytes()) {
                continue;
            }
            let old = self.db.open_tree(name).map_err(engine)?;
            let mut batch = sled::Batch::default();
            for kv in old.iter() {
                let (k, v) = kv.map_err(engine)?;
                batch.insert(tagged(kind, &k), v);
            }
            self.graph.apply_batch(batch).map_err(engine)?;
            moved.push(name);
        }
        let mut batch = sled::Batch::default();
        for kv in self.graph.scan_prefix([DEVICE]) {
            let (k, v) = kv.map_err(engine)?;
            if v.first() != Some(&FORMAT_DEVICE) {
                let device: DeviceRecord = decode(&k, &v)?;
                batch.insert(k, encode_device(&device)?);
            }
        }
        self.graph.apply_batch(batch).map_err(engine)?;
        self.flush()?;
        for name in moved {
            self.db.drop_tree(name).map_err(engine)?;
        }
        self.meta.insert(LAYOUT, LAYOUT_VERSION).map_err(engine)?;
        self.flush()
    }

    /// Refuses a write of sled's own (the trees other than `graph`) when the disk has no room
    /// for it, before sled is touched: a failed write would stop sled for good, reads too.
    fn room(&self) -> Result<(), StoreError> {
        self.pipeline.room()
    }

    /// Makes every write made so far durable.
    fn flush(&self) -> Result<(), StoreError> {
        self.pipeline.flush_all(&self.db)
    }

    /// Why the store cannot take writes now, if it cannot: its log cannot be written, or sled
    /// failed to write (see [`SledStore::needs_reopen`]).
    pub fn write_failure(&self) -> Option<String> {
        if let Err(e) = self.config.global_error() {
            return Some(format!("the database failed to write: {e}"));
        }
        self.pipeline.failure()
    }

    /// Whether only reopening the store (reading its durable state back, as a restart does)
    /// lets it write again. sled stops for good after one of its writes failed (every later
    /// write, and some reads, fail with that error), and a log whose buffer could not be read
    /// back after a failed write cannot vouch for what readers see.
    pub fn needs_reopen(&self) -> bool {
        self.config.global_error().is_err() || self.pipeline.is_fatal()
    }

    /// The client's count index, read from the store on first use.
    fn count_index(
        &self,
        client: &str,
    ) -> Result<Arc<std::sync::RwLock<counts::ClientIndex>>, StoreError> {
        if let Some(index) = self.counts.get(client) {
            return Ok(index);
        }
        // Under the writer lock: no commit of this client lands between the read and the
        // publication (commits update only published indexes).
        let _writer = self.writers.lock(client);
        loop {
            if let Some(index) = self.counts.get(client) {
                return Ok(index);
            }
            // A failed write dropped while this is read (its commits were visible when the
            // read began) clears the indexes: read again then.
            let generation = self.counts.generation();
            let mut index = counts::ClientIndex::default();
            let p = graph_prefix(DEVICE, &[client.as_bytes()]);
            for (k, v) in self.pipeline.scan(client.as_bytes(), &p)? {
                let id = std::str::from_utf8(&k[p.len()..]).map_err(|_| StoreError::Corrupt {
                    key: String::from_utf8_lossy(&k).replace('\0', "/"),
                    reason: "device id is not UTF-8".into(),
                })?;
                index.put_summary(id, &device_summary(&k, &v)?.0);
            }
            if let Some(index) = self.counts.insert(client, index, generation) {
                return Ok(index);
            }
        }
    }
}

// === impl ClientLocks ===

/// One lock per client (shared by the clients that hash alike), held while a batch or an edit
/// works out and commits the client's writes: the identity rules read, then write, so two
/// writers of one client must take turns. Writers of different clients do not wait for each
/// other (unless they share a lock).
#[derive(Debug)]
struct ClientLocks([Mutex<()>; CLIENT_LOCKS]);

impl Default for ClientLocks {
    fn default() -> Self {
        ClientLocks(std::array::from_fn(|_| Mutex::new(())))
    }
}

impl ClientLocks {
    fn lock(&self, client: &str) -> MutexGuard<'_, ()> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        client.hash(&mut h);
        let i = (h.finish() % CLIENT_LOCKS as u64) as usize;
        // The lock guards no data of its own: a writer that panicked left nothing half-written
        // in the store (its overlay was never committed), so a poisoned lock is still usable.
        self.0[i].lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Opens sled, waiting up to two seconds for its lock: a store closed a moment ago (a restart,
/// or a test reopening its store) can hold it a few milliseconds longer, until sled's I/O
/// threads let go of its files. A lock held longer than that is another collector's.
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

/// Whether `dir`'s disk takes writes: `bytes` written to `<dir>/.write-probe`, synced, and removed
/// (whatever happened).
fn probe_room(dir: &Path, bytes: usize) -> std::io::Result<()> {
    use std::io::Write as _;
    let path = dir.join(".write-probe");
    let result = std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(&vec![0; bytes]).and_then(|()| f.sync_all()));
    let _ = std::fs::remove_file(&path);
    result
}

fn engine(e: sled::Error) -> StoreError {
    match e {
        // A failed write of sled's own (a full disk): retryable once the store is reopened.
        sled::Error::Io(io) => StoreError::Unavailable(format!("the database: {io}")),
        other => StoreError::Engine(other.to_string()),
    }
}

fn key(parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p);
    }
    k
}

fn prefix(parts: &[&[u8]]) -> Vec<u8> {
    let mut k = key(parts);
    k.push(0);
    k
}

/// A `graph` key: its kind byte, then the parts.
fn tagged(kind: u8, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(rest.len() + 1);
    k.push(kind);
    k.extend_from_slice(rest);
    k
}

/// A `graph` key of `kind` from parts.
fn graph_key(kind: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + parts.iter().map(|p| p.len() + 1).sum::<usize>());
    push_graph_key(&mut k, kind, parts);
    k
}

/// Appends a `graph` key of `kind` from parts to `out`.
fn push_graph_key(out: &mut Vec<u8>, kind: u8, parts: &[&[u8]]) {
    out.push(kind);
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            out.push(0);
        }
        out.extend_from_slice(p);
    }
}

/// The prefix of every `graph` key of `kind` under `parts`.
fn graph_prefix(kind: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = graph_key(kind, parts);
    k.push(0);
    k
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_extend(value, vec![FORMAT_V1]).map_err(|e| StoreError::Engine(e.to_string()))
}

/// A device record as stored: its counting summary, then the record (see the module docs).
fn encode_device(device: &DeviceRecord) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(192);
    encode_device_into(device, &mut out)?;
    Ok(out)
}

/// Appends a device record as stored (see [`encode_device`]) to `out`.
fn encode_device_into(device: &DeviceRecord, out: &mut Vec<u8>) -> Result<(), StoreError> {
    let s = DeviceSummary::of(device);
    let category = s.category.as_bytes();
    let len = u16::try_from(category.len())
        .map_err(|_| StoreError::Engine("category label longer than 64 KiB".into()))?;
    out.push(FORMAT_DEVICE);
    out.extend_from_slice(&s.last_seen_ms.to_be_bytes());
    out.push(u8::from(s.weak_only) | (u8::from(s.named) << 1));
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(category);
    postcard_into(device, out)
}

/// Appends the postcard encoding of `value` to `out`.
fn postcard_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), StoreError> {
    postcard::serialize_with_flavor(value, Append(out))
        .map_err(|e| StoreError::Engine(e.to_string()))
}

/// postcard's output onto the end of a vector that already holds other bytes.
struct Append<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for Append<'_> {
    type Output = ();

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// The counting summary in front of a stored device record, and where the record starts.
fn device_summary<'a>(k: &[u8], v: &'a [u8]) -> Result<(DeviceSummary<'a>, usize), StoreError> {
    let corrupt = |reason: &str| StoreError::Corrupt {
        key: String::from_utf8_lossy(k).replace('\0', "/"),
        reason: reason.to_owned(),
    };
    if v.first() != Some(&FORMAT_DEVICE) {
        return Err(corrupt("not a device record"));
    }
    let short = || corrupt("device record too short");
    let seen = v.get(1..9).ok_or_else(short)?;
    let flags = *v.get(9).ok_or_else(short)?;
    let len = v.get(10..12).ok_or_else(short)?;
    let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    let category = v.get(12..12 + len).ok_or_else(short)?;
    let mut last_seen = [0u8; 8];
    last_seen.copy_from_slice(seen);
    Ok((
        DeviceSummary {
            last_seen_ms: u64::from_be_bytes(last_seen),
            category: std::str::from_utf8(category)
                .map_err(|_| corrupt("category label is not UTF-8"))?,
            weak_only: flags & 1 != 0,
            named: flags & 2 != 0,
        },
        12 + len,
    ))
}

fn encode_json<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![FORMAT_JSON];
    serde_json::to_writer(&mut out, value).map_err(|e| StoreError::Engine(e.to_string()))?;
    Ok(out)
}

fn decode<T: DeserializeOwned>(k: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        key: String::from_utf8_lossy(k).replace('\0', "/"),
        reason,
    };
    match bytes.split_first() {
        Some((&FORMAT_V1, rest)) => postcard::from_bytes(rest).map_err(|e| corrupt(e.to_string())),
        Some((&FORMAT_DEVICE, _)) => {
            let (_, start) = device_summary(k, bytes)?;
            postcard::from_bytes(&bytes[start..]).map_err(|e| corrupt(e.to_string()))
        }
        Some((&FORMAT_JSON, rest)) => {
            serde_json::from_slice(rest).map_err(|e| corrupt(e.to_string()))
        }
        Some((v, _)) => Err(corrupt(format!("unknown format {v}"))),
        None => Err(corrupt("empty value".into())),
    }
}

impl SledStore {
    /// The client's `graph` records under `prefix`, decoded: committed ones included (see
    /// [`commit::Pipeline::scan`]).
    fn scan_graph<T: DeserializeOwned>(
        &self,
        client: &[u8],
        prefix: &[u8],
    ) -> Result<Vec<T>, StoreError> {
        self.pipeline
            .scan(client, prefix)?
            .into_iter()
            .map(|(k, v)| decode(&k, &v))
            .collect()
    }
}

fn scan<T: DeserializeOwned>(tree: &sled::Tree, prefix: &[u8]) -> Result<Vec<T>, StoreError> {
    tree.scan_prefix(prefix)
        .map(|kv| {
            let (k, v) = kv.map_err(engine)?;
            decode(&k, &v)
        })
        .collect()
}

/// Stores `make(n)` under `client\0n`, `n` the number after the client's last, and returns it.
/// Compare-and-swap into an empty key, so two operators saving at once get two versions, never
/// one overwritten. Not flushed.
fn put_versioned<T: Serialize>(
    tree: &sled::Tree,
    client: &str,
    make: impl Fn(u64) -> T,
) -> Result<T, StoreError> {
    let p = prefix(&[client.as_bytes()]);
    loop {
        let last = match tree.scan_prefix(&p).next_back() {
            Some(kv) => {
                let (k, _) = kv.map_err(engine)?;
                k.get(p.len()..)
                    .and_then(|n| <[u8; 8]>::try_from(n).ok())
                    .map(u64::from_be_bytes)
                    .ok_or_else(|| StoreError::Corrupt {
                        key: String::from_utf8_lossy(&k).replace('\0', "/"),
                        reason: "policy key has no version number".into(),
                    })?
            }
            None => 0,
        };
        let n = last + 1;
        let value = make(n);
        let swapped = tree
            .compare_and_swap(
                key(&[client.as_bytes(), &n.to_be_bytes()]),
                None as Option<&[u8]>,
                Some(encode_json(&value)?),
            )
            .map_err(engine)?;
        if swapped.is_ok() {
            return Ok(value);
        }
    }
}

impl Store for SledStore {
    fn write_failure(&self) -> Option<String> {
        SledStore::write_failure(self)
    }

    fn ensure_client(&self, name: &str, now_ms: u64) -> Result<(ClientRecord, bool), StoreError> {
        let record = ClientRecord {
            name: name.to_owned(),
            created_ms: now_ms,
        };
        if self.client(name)?.is_none() {
            self.room()?;
        }
        let prev = self
            .clients
            .compare_and_swap(
                name.as_bytes(),
                None as Option<&[u8]>,
                Some(encode(&record)?),
            )
            .map_err(engine)?;
        match prev {
            Ok(()) => {
                self.flush()?;
                Ok((record, true))
            }
            Err(cas) => {
                let current = cas
                    .current
                    .ok_or_else(|| StoreError::Engine("client vanished".into()))?;
                Ok((decode(name.as_bytes(), &current)?, false))
            }
        }
    }

    fn ensure_site(&self, client: &str, site: &str, now_ms: u64) -> Result<bool, StoreError> {
        self.ensure_client(client, now_ms)?;
        let record = SiteRecord {
            client: client.to_owned(),
            name: site.to_owned(),
            created_ms: now_ms,
        };
        if self
            .sites
            .get(key(&[client.as_bytes(), site.as_bytes()]))
            .map_err(engine)?
            .is_none()
        {
            self.room()?;
        }
        let created = self
            .sites
            .compare_and_swap(
                key(&[client.as_bytes(), site.as_bytes()]),
                None as Option<&[u8]>,
                Some(encode(&record)?),
            )
            .map_err(engine)?
            .is_ok();
        if created {
            self.flush()?;
        }
        Ok(created)
    }

    fn client(&self, name: &str) -> Result<Option<ClientRecord>, StoreError> {
        self.clients
            .get(name.as_bytes())
            .map_err(engine)?
            .map(|v| decode(name.as_bytes(), &v))
            .transpose()
    }

    fn clients(&self) -> Result<Vec<ClientRecord>, StoreError> {
        scan(&self.clients, b"")
    }

    fn sites(&self, client: &str) -> Result<Vec<SiteRecord>, StoreError> {
        scan(&self.sites, &prefix(&[client.as_bytes()]))
    }

    fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        self.room()?;
        self.tokens
            .insert(token.id.as_bytes(), encode_json(token)?)
            .map_err(engine)?;
        self.flush()
    }

    fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.tokens
            .get(id.as_bytes())
            .map_err(engine)?
            .map(|v| decode(id.as_bytes(), &v))
            .transpose()
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        scan(&self.tokens, b"")
    }

    fn enroll(&self, token: &TokenRecord, agent: &AgentRecord) -> Result<(), StoreError> {
        use sled::Transactional as _;
        let (t, a) = (encode_json(token)?, encode_json(agent)?);
        self.room()?;
        (&self.tokens, &self.agents)
            .transaction(|(tokens, agents)| {
                tokens.insert(token.id.as_bytes(), t.as_slice())?;
                agents.insert(agent.id.as_bytes(), a.as_slice())?;
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| StoreError::Engine(format!("{e:?}")))?;
        self.flush()
    }

    fn put_agent(&self, agent: &AgentRecord, durable: bool) -> Result<(), StoreError> {
        // Not durable: only in sled's memory, flushed later when there is room.
        if durable {
            self.room()?;
        }
        self.agents
            .insert(agent.id.as_bytes(), encode_json(agent)?)
            .map_err(engine)?;
        if durable {
            self.flush()
        } else {
            self.pipeline.note_sled_write();
            Ok(())
        }
    }

    fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        scan(&self.agents, b"")
    }

    fn apply_batch(
        &self,
        scope: &Scope,
        batch: &BatchId,
        observations: &[CleanObservation],
    ) -> Result<BatchOutcome, StoreError> {
        let client = scope.client.as_bytes();
        let batch_key = graph_key(
            BATCH,
            &[
                client,
                scope.site.as_bytes(),
                batch.stream().as_bytes(),
                &batch.sequence.to_be_bytes(),
            ],
        );
        let (outcome, ticket) = {
            let _writer = self.writers.lock(&scope.client);
            match self.pipeline.get(client, &batch_key)? {
                Some(stored) if stored.get(8..) == Some(&batch.digest[..]) => {
                    (BatchOutcome::Duplicate, None)
                }
                Some(_) => (BatchOutcome::Conflict, None),
                None => {
                    let mut g = Overlay::with_capacity(
                        &self.pipeline,
                        &self.db,
                        client,
                        observations.len(),
                    );
                    for obs in observations {
                        identity::apply(&mut g, scope, &batch.agent_id, obs)?;
                    }
                    let (mut writes, changes) = g.into_writes()?;
                    // The batch record: when it was applied, and the digest of its content.
                    let applied_ms = observations
                        .iter()
                        .map(|o| o.observed_ms)
                        .max()
                        .unwrap_or(0);
                    let mut record = [0u8; 40];
                    record[..8].copy_from_slice(&applied_ms.to_be_bytes());
                    record[8..].copy_from_slice(&batch.digest);
                    writes.put(&batch_key, Some(&record))?;
                    let ticket = self.pipeline.commit(client, writes)?;
                    self.counts.update(&scope.client, changes);
                    (BatchOutcome::Stored, Some(ticket))
                }
            }
        };
        // The acknowledgement promises the batch is on disk: also for a duplicate, whose first
        // copy may still be on its way there (a resend racing the first log sync). Outside the
        // client's lock, so its next batch is worked out meanwhile.
        match ticket {
            Some(t) => self.pipeline.wait_durable(t)?,
            None => self.pipeline.sync()?,
        }
        Ok(outcome)
    }

    fn devices(&self, client: &str, site: Option<&str>) -> Result<Vec<DeviceRecord>, StoreError> {
        let c = client.as_bytes();
        let devices: Vec<DeviceRecord> = self
            .scan_graph(c, &graph_prefix(DEVICE, &[c]))?
            .into_iter()
            .filter(|d: &DeviceRecord| site.is_none_or(|s| d.sites.iter().any(|x| x == s)))
            .collect();
        let mut owners = BTreeMap::new();
        let owner_prefix = graph_prefix(OWNER, &[c]);
        for (k, v) in self.pipeline.scan(c, &owner_prefix)? {
            let rest = &k[owner_prefix.len()..];
            let mut parts = rest.splitn(2, |b| *b == 0);
            let (Some(site), Some(ip)) = (parts.next(), parts.next()) else {
                continue;
            };
            let Some(ip) = std::str::from_utf8(ip)
                .ok()
                .and_then(|t| t.parse::<IpAddr>().ok())
            else {
                continue;
            };
            owners.insert(
                (String::from_utf8_lossy(site).into_owned(), ip),
                decode::<AddressOwner>(&k, &v)?,
            );
        }
        let mut virtual_macs = Vec::new();
        let vmac_prefix = graph_prefix(VMAC, &[c]);
        for (k, v) in self.pipeline.scan(c, &vmac_prefix)? {
            let Some(mac) = std::str::from_utf8(&k[vmac_prefix.len()..])
                .ok()
                .and_then(|t| t.parse::<MacAddr>().ok())
            else {
                continue;
            };
            virtual_macs.push((mac, decode::<VirtualMacRecord>(&k, &v)?));
        }
        Ok(present(devices, &owners, &virtual_macs))
    }

    fn tally(&self, client: &str, policy: &Policy, now_ms: u64) -> Result<Tally, StoreError> {
        let index = self.count_index(client)?;
        let index = index.read().unwrap_or_else(|p| p.into_inner());
        Ok(index.tally(policy, now_ms))
    }

    fn device(&self, client: &str, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        let k = graph_key(DEVICE, &[client.as_bytes(), id.as_bytes()]);
        if self.pipeline.get(client.as_bytes(), &k)?.is_none() {
            return Ok(None);
        }
        Ok(self.devices(client, None)?.into_iter().find(|d| d.id == id))
    }

    fn edit(
        &self,
        client: &str,
        edit: &Edit,
        at_ms: u64,
    ) -> Result<Result<Event, EditError>, StoreError> {
        let (outcome, ticket) = {
            let _writer = self.writers.lock(client);
            let mut g = Overlay::new(&self.pipeline, &self.db, client.as_bytes());
            match run_edit(&mut g, client, edit, at_ms)? {
                // Refused: the overlay is dropped and nothing was written.
                Err(refusal) => return Ok(Err(refusal)),
                Ok(event) => {
                    let (writes, changes) = g.into_writes()?;
                    let ticket = self.pipeline.commit(client.as_bytes(), writes)?;
                    self.counts.update(client, changes);
                    (event, ticket)
                }
            }
        };
        self.pipeline.wait_durable(ticket)?;
        Ok(Ok(outcome))
    }

    fn history(&self, client: &str) -> Result<Vec<Event>, StoreError> {
        self.scan_graph(
            client.as_bytes(),
            &graph_prefix(EVENT, &[client.as_bytes()]),
        )
    }

    fn put_policy(
        &self,
        client: &str,
        rules: &PolicyRules,
        at_ms: u64,
    ) -> Result<Policy, StoreError> {
        self.room()?;
        let policy = put_versioned(&self.policies, client, |n| Policy {
            version: Policy::version_for(client, n),
            client: client.to_owned(),
            saved_ms: at_ms,
            rules: rules.clone(),
        })?;
        self.flush()?;
        Ok(policy)
    }

    fn policies(&self, client: &str) -> Result<Vec<Policy>, StoreError> {
        scan(&self.policies, &prefix(&[client.as_bytes()]))
    }

    fn policy(&self, client: &str) -> Result<Policy, StoreError> {
        match self
            .policies
            .scan_prefix(prefix(&[client.as_bytes()]))
            .next_back()
        {
            Some(kv) => {
                let (k, v) = kv.map_err(engine)?;
                decode(&k, &v)
            }
            None => Ok(Policy::default()),
        }
    }

    fn create_snapshot(&self, snapshot: &Snapshot) -> Result<bool, StoreError> {
        let k = key(&[snapshot.client.as_bytes(), snapshot.period.as_bytes()]);
        let value = encode_json(snapshot)?;
        // What the snapshot was built from is durable before it bills anything: a commit
        // that a failed write dropped meanwhile fails this instead.
        self.pipeline.sync()?;
        self.room()?;
        // One transaction that refuses to overwrite: a snapshot is written once, whole.
        let created = self
            .snapshots
            .transaction(|t| {
                if t.get(&k)?.is_some() {
                    return Ok(false);
                }
                t.insert(k.as_slice(), value.as_slice())?;
                Ok(true)
            })
            .map_err(|e: TransactionError<()>| match e {
                TransactionError::Storage(e) => engine(e),
                TransactionError::Abort(()) => StoreError::Engine("snapshot write aborted".into()),
            })?;
        if created && let Err(e) = self.flush() {
            // Not durable: taken back, so no one reads a snapshot a restart would not have.
            // (If sled itself failed it refuses this too; reopening the store then drops it.)
            let _ = self.snapshots.remove(&k);
            return Err(e);
        }
        Ok(created)
    }

    fn snapshot(&self, client: &str, period: &str) -> Result<Option<Snapshot>, StoreError> {
        let k = key(&[client.as_bytes(), period.as_bytes()]);
        self.snapshots
            .get(&k)
            .map_err(engine)?
            .map(|v| decode(&k, &v))
            .transpose()
    }

    fn snapshots(&self, client: &str) -> Result<Vec<Snapshot>, StoreError> {
        scan(&self.snapshots, &prefix(&[client.as_bytes()]))
    }

    fn apply_directory_part(
        &self,
        scope: &Scope,
        batch: &BatchId,
        part: &ReadPart,
    ) -> Result<(BatchOutcome, Option<users_apply::Outcome>), StoreError> {
        self.users_apply_part(scope, batch, part)
    }

    fn apply_user_read(
        &self,
        client: &str,
        read: &Read,
    ) -> Result<users_apply::Outcome, StoreError> {
        self.users_apply_read(client, read)
    }

    fn user_accounts(&self, client: &str) -> Result<(Vec<Account>, Vec<SourceStatus>), StoreError> {
        self.users_accounts(client)
    }

    fn put_user_policy(
        &self,
        client: &str,
        rules: &UserPolicyRules,
        at_ms: u64,
    ) -> Result<UserPolicy, StoreError> {
        self.users_put_policy(client, rules, at_ms)
    }

    fn user_policies(&self, client: &str) -> Result<Vec<UserPolicy>, StoreError> {
        self.users_policies(client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sled_store_keeps_the_contract() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        super::super::contract::run(&store);
    }

    #[test]
    fn a_store_of_the_earlier_layout_is_moved_into_the_graph() {
        use census_proto::{convert, v1};

        let dir = tempfile::tempdir().expect("tempdir");
        let wire = v1::Observation {
            observed_at: Some(convert::timestamp_from_millis(100)),
            method: v1::Method::Arp as i32,
            addresses: vec![v1::IpAddress {
                address: "198.18.0.10".into(),
                answered: true,
                ..Default::default()
            }],
            macs: vec![vec![0, 0x16, 0x3e, 0, 0, 1]],
            ..Default::default()
        };
        let obs = crate::model::clean_observation(&wire, 100, 0).expect("valid");
        let scope = Scope {
            client: "acme".into(),
            site: "hq".into(),
        };
        let batch = BatchId {
            agent_id: "ag".into(),
            epoch: 0,
            sequence: 1,
            digest: [1; 32],
        };
        let before = {
            let store = SledStore::open(dir.path()).expect("open");
            store.apply_batch(&scope, &batch, &[obs]).expect("apply");
            // Everything into sled, where the earlier layout kept it.
            store.pipeline.checkpoint_now().expect("checkpoint");
            let devices = store.devices("acme", None).expect("devices");
            // Back to the earlier layout: a tree per kind, no kind byte, no summaries.
            for (name, kind) in OLD_TREES {
                let old = store.db.open_tree(name).expect("tree");
                for kv in store.graph.scan_prefix([kind]) {
                    let (k, v) = kv.expect("kv");
                    let v = if kind == DEVICE {
                        let d: DeviceRecord = decode(&k, &v).expect("decode");
                        encode(&d).expect("encode").into()
                    } else {
                        v
                    };
                    old.insert(&k[1..], v).expect("insert");
                    store.graph.remove(k).expect("remove");
                }
            }
            store.graph.clear().expect("clear");
            store.meta.clear().expect("clear");
            store.db.flush().expect("flush");
            devices
        };
        for _ in 0..2 {
            let store = SledStore::open(dir.path()).expect("reopen");
            assert_eq!(store.devices("acme", None).expect("devices"), before);
            assert_eq!(
                store
                    .tally("acme", &Policy::default(), 200)
                    .expect("tally")
                    .devices,
                1
            );
            assert_eq!(
                store.apply_batch(&scope, &batch, &[]).expect("apply"),
                BatchOutcome::Duplicate
            );
            assert!(store.db.tree_names().iter().all(|n| {
                OLD_TREES
                    .iter()
                    .all(|(old, _)| n.as_ref() != old.as_bytes())
            }));
        }
    }

    #[test]
    fn concurrent_batches_of_many_clients_are_all_kept() {
        use census_proto::{convert, v1};

        let dir = tempfile::tempdir().expect("tempdir");
        let store = std::sync::Arc::new(SledStore::open(dir.path()).expect("open"));
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let store = std::sync::Arc::clone(&store);
                std::thread::spawn(move || {
                    // Two threads per client, each its own site and agent.
                    let scope = Scope {
                        client: format!("client-{}", t / 2),
                        site: format!("site-{}", t % 2),
                    };
                    for seq in 1..=20u8 {
                        let batch: Vec<_> = (0..10u8)
                            .map(|i| {
                                let wire = v1::Observation {
                                    observed_at: Some(convert::timestamp_from_millis(100)),
                                    method: v1::Method::Arp as i32,
                                    addresses: vec![v1::IpAddress {
                                        address: format!("198.18.{seq}.{i}"),
                                        answered: true,
                                        ..Default::default()
                                    }],
                                    macs: vec![vec![0, 0x16, 0x3e, t, seq, i]],
                                    ..Default::default()
                                };
                                crate::model::clean_observation(&wire, 100, 0).expect("valid")
                            })
                            .collect();
                        let id = BatchId {
                            agent_id: format!("agent-{t}"),
                            epoch: 0,
                            sequence: u64::from(seq),
                            digest: [seq; 32],
                        };
                        assert_eq!(
                            store.apply_batch(&scope, &id, &batch).expect("apply"),
                            BatchOutcome::Stored
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        drop(store);
        let store = SledStore::open(dir.path()).expect("reopen");
        for c in 0..4 {
            let client = format!("client-{c}");
            assert_eq!(store.devices(&client, None).expect("devices").len(), 400);
            assert_eq!(
                store
                    .tally(&client, &Policy::default(), 200)
                    .expect("tally")
                    .devices,
                400
            );
        }
    }

    #[test]
    fn sled_store_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = SledStore::open(dir.path()).expect("open");
            store.ensure_site("acme", "hq", 1).expect("site");
        }
        let store = SledStore::open(dir.path()).expect("reopen");
        assert_eq!(store.sites("acme").expect("sites").len(), 1);
    }

    #[test]
    fn policies_and_snapshots_survive_reopen() {
        use crate::{
            policy::{PolicyRules, RandomizedRule},
            snapshot::{self, Period},
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let rules = PolicyRules {
            randomized: RandomizedRule::CountIfNamed,
            ..PolicyRules::default()
        };
        let period = Period::parse("2026-11").expect("period");
        let snap = {
            let store = SledStore::open(dir.path()).expect("open");
            let policy = store.put_policy("acme", &rules, 5).expect("put");
            let snap = snapshot::build("acme", period, &policy, &[], 6);
            assert!(store.create_snapshot(&snap).expect("create"));
            snap
        };
        let store = SledStore::open(dir.path()).expect("reopen");
        assert_eq!(store.policy("acme").expect("policy").version, "acme-1");
        assert_eq!(store.policy("acme").expect("policy").rules, rules);
        assert_eq!(store.snapshot("acme", "2026-11").expect("get"), Some(snap));
        assert!(
            !store
                .create_snapshot(&snapshot::build(
                    "acme",
                    period,
                    &Default::default(),
                    &[],
                    7
                ))
                .expect("create")
        );
        assert_eq!(
            store.put_policy("acme", &rules, 8).expect("put").version,
            "acme-2"
        );
    }

    #[test]
    fn corrupt_values_are_reported_not_panicked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        store
            .clients
            .insert("acme", &[FORMAT_V1, 0xff, 0xff][..])
            .expect("insert");
        store.clients.insert("zed", &[][..]).expect("insert");
        assert!(matches!(
            store.client("acme"),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            store.client("zed"),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
