//! The sled store as the collector runs it: reopened in place when it cannot go on writing
//! without it, so a full disk never needs a restart.
//!
//! A failed write of the write-ahead log is handled by the log itself (see [`super::commit`]):
//! the refused commits are dropped, and the log takes writes again once the disk does. A failed
//! write of sled's own (a checkpoint, or one of the other trees) is not: sled then refuses every
//! write, for good, until it is opened again. [`Reopening`] checks every [`CHECK_EVERY`] whether
//! its store needs that; if so, and the data directory takes a probe write again, it closes the
//! store and opens it again, which reads back exactly what is durable (the log is replayed into
//! sled as on any start). Calls wait while that runs (the log since the last checkpoint is
//! replayed: seconds at most), and fail with [`StoreError::Unavailable`] if it failed, until the
//! next try.
//!
//! While the store cannot write, every write is refused at once with
//! [`StoreError::Unavailable`] (nothing is half-written; agents keep their batches and retry),
//! and reads answer from what it holds, which is what was durable.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard},
    thread::JoinHandle,
    time::Duration,
};

use super::{SledOptions, SledStore, probe_room};
use crate::{
    identity::{EditError, Event},
    model::{
        AgentRecord, CleanObservation, ClientRecord, DeviceRecord, Scope, SiteRecord, TokenRecord,
    },
    policy::{Policy, PolicyRules, Tally},
    snapshot::Snapshot,
    store::{BatchId, BatchOutcome, Edit, Store, StoreError},
    users::{
        Account, SourceStatus, UserPolicy, UserPolicyRules,
        apply::{Outcome as ReadOutcome, Read, ReadPart},
    },
};

/// How often the store is checked, and a reopen tried while it is needed.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// What a reopen writes and syncs first, in the data directory, to see whether the disk has
/// room again: replaying the log into sled and sled's own start write some.
const PROBE_BYTES: usize = 4 << 20;

/// The sled store, reopened in place when it must be (see the module docs).
#[derive(Debug)]
pub struct Reopening {
    inner: Arc<Inner>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    options: SledOptions,
    /// `None` while a reopen failed, until one succeeds.
    current: RwLock<Option<SledStore>>,
    /// Why the last reopen failed, while the store is closed.
    closed: Mutex<Option<String>>,
    stop: Mutex<bool>,
    wake: Condvar,
}

impl Reopening {
    /// Opens the store in `dir` (see [`SledStore::open_with`]) and starts watching it.
    pub fn open(dir: &Path, options: &SledOptions) -> Result<Self, StoreError> {
        let store = SledStore::open_with(dir, options)?;
        let inner = Arc::new(Inner {
            dir: dir.to_owned(),
            options: *options,
            current: RwLock::new(Some(store)),
            closed: Mutex::new(None),
            stop: Mutex::new(false),
            wake: Condvar::new(),
        });
        let thread = {
            let inner = Arc::clone(&inner);
            std::thread::Builder::new()
                .name("census-store-watch".into())
                .spawn(move || inner.watch())
                .map_err(|e| StoreError::Engine(format!("starting the store's watch: {e}")))?
        };
        Ok(Reopening {
            inner,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Runs a read on the store.
    fn read<T>(
        &self,
        f: impl FnOnce(&SledStore) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match self.inner.read().as_ref() {
            Some(store) => f(store),
            None => Err(self.inner.closed_error()),
        }
    }

    /// Runs a write on the store, refused at once while it cannot write.
    fn write<T>(
        &self,
        f: impl FnOnce(&SledStore) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.read(|store| match store.write_failure() {
            Some(reason) => Err(StoreError::Unavailable(reason)),
            None => f(store),
        })
    }
}

impl Drop for Reopening {
    fn drop(&mut self) {
        *self.inner.stop.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.inner.wake.notify_all();
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Inner {
    fn read(&self) -> RwLockReadGuard<'_, Option<SledStore>> {
        // A call that panicked changed nothing the lock guards (the store is replaced whole).
        self.current.read().unwrap_or_else(|p| p.into_inner())
    }

    fn closed_error(&self) -> StoreError {
        let reason = self
            .closed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "it is being reopened".into());
        StoreError::Unavailable(format!("the store is closed: {reason}"))
    }

    /// Until stopped: every [`CHECK_EVERY`], reopens the store if it needs it and the disk has
    /// room.
    fn watch(&self) {
        // Logged once per outage, not at every try.
        let mut reported = false;
        loop {
            {
                let stop = self.stop.lock().unwrap_or_else(|p| p.into_inner());
                let (stop, _) = self
                    .wake
                    .wait_timeout(stop, CHECK_EVERY)
                    .unwrap_or_else(|p| p.into_inner());
                if *stop {
                    return;
                }
            }
            let needed = self.read().as_ref().is_none_or(SledStore::needs_reopen);
            if !needed {
                reported = false;
                continue;
            }
            if !reported {
                tracing::error!(
                    dir = %self.dir.display(),
                    "the store failed to write (disk full?) and stopped writing; it is reopened by itself once the data directory takes writes again"
                );
                reported = true;
            }
            if let Err(e) = probe_room(&self.dir, PROBE_BYTES) {
                tracing::debug!(error = %e, "the data directory still takes no writes");
                continue;
            }
            self.reopen();
        }
    }

    /// Closes the store and opens it again: what it holds afterwards is what was durable.
    fn reopen(&self) {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        // Closed first: sled's lock on its files goes with the last handle.
        drop(current.take());
        match SledStore::open_with(&self.dir, &self.options) {
            Ok(store) => {
                *current = Some(store);
                *self.closed.lock().unwrap_or_else(|p| p.into_inner()) = None;
                tracing::warn!(dir = %self.dir.display(), "the store was reopened and takes writes again");
            }
            Err(e) => {
                tracing::warn!(error = %e, "reopening the store failed; trying again");
                *self.closed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            }
        }
    }
}

// === impl Store ===

impl Store for Reopening {
    fn write_failure(&self) -> Option<String> {
        match self.inner.read().as_ref() {
            Some(store) => store.write_failure(),
            None => Some(self.inner.closed_error().to_string()),
        }
    }

    fn ensure_client(&self, name: &str, now_ms: u64) -> Result<(ClientRecord, bool), StoreError> {
        // Read first: a client that exists needs no write, whatever the disk.
        if let Some(c) = self.read(|s| s.client(name))? {
            return Ok((c, false));
        }
        self.write(|s| s.ensure_client(name, now_ms))
    }
    fn ensure_site(&self, client: &str, site: &str, now_ms: u64) -> Result<bool, StoreError> {
        self.write(|s| s.ensure_site(client, site, now_ms))
    }
    fn client(&self, name: &str) -> Result<Option<ClientRecord>, StoreError> {
        self.read(|s| s.client(name))
    }
    fn clients(&self) -> Result<Vec<ClientRecord>, StoreError> {
        self.read(SledStore::clients)
    }
    fn sites(&self, client: &str) -> Result<Vec<SiteRecord>, StoreError> {
        self.read(|s| s.sites(client))
    }
    fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        self.write(|s| s.put_token(token))
    }
    fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.read(|s| s.token(id))
    }
    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.read(SledStore::tokens)
    }
    fn enroll(&self, token: &TokenRecord, agent: &AgentRecord) -> Result<(), StoreError> {
        self.write(|s| s.enroll(token, agent))
    }
    fn put_agent(&self, agent: &AgentRecord, durable: bool) -> Result<(), StoreError> {
        self.write(|s| s.put_agent(agent, durable))
    }
    fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.read(SledStore::agents)
    }
    fn apply_batch(
        &self,
        scope: &Scope,
        batch: &BatchId,
        observations: &[CleanObservation],
    ) -> Result<BatchOutcome, StoreError> {
        self.write(|s| s.apply_batch(scope, batch, observations))
    }
    fn devices(&self, client: &str, site: Option<&str>) -> Result<Vec<DeviceRecord>, StoreError> {
        self.read(|s| s.devices(client, site))
    }
    fn tally(&self, client: &str, policy: &Policy, now_ms: u64) -> Result<Tally, StoreError> {
        self.read(|s| s.tally(client, policy, now_ms))
    }
    fn device(&self, client: &str, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        self.read(|s| s.device(client, id))
    }
    fn edit(
        &self,
        client: &str,
        edit: &Edit,
        at_ms: u64,
    ) -> Result<Result<Event, EditError>, StoreError> {
        self.write(|s| s.edit(client, edit, at_ms))
    }
    fn history(&self, client: &str) -> Result<Vec<Event>, StoreError> {
        self.read(|s| s.history(client))
    }
    fn put_policy(
        &self,
        client: &str,
        rules: &PolicyRules,
        at_ms: u64,
    ) -> Result<Policy, StoreError> {
        self.write(|s| s.put_policy(client, rules, at_ms))
    }
    fn policies(&self, client: &str) -> Result<Vec<Policy>, StoreError> {
        self.read(|s| s.policies(client))
    }
    fn policy(&self, client: &str) -> Result<Policy, StoreError> {
        self.read(|s| s.policy(client))
    }
    fn create_snapshot(&self, snapshot: &Snapshot) -> Result<bool, StoreError> {
        self.write(|s| s.create_snapshot(snapshot))
    }
    fn snapshot(&self, client: &str, period: &str) -> Result<Option<Snapshot>, StoreError> {
        self.read(|s| s.snapshot(client, period))
    }
    fn snapshots(&self, client: &str) -> Result<Vec<Snapshot>, StoreError> {
        self.read(|s| s.snapshots(client))
    }
    fn apply_directory_part(
        &self,
        scope: &Scope,
        batch: &BatchId,
        part: &ReadPart,
    ) -> Result<(BatchOutcome, Option<ReadOutcome>), StoreError> {
        self.write(|s| s.apply_directory_part(scope, batch, part))
    }
    fn apply_user_read(&self, client: &str, read: &Read) -> Result<ReadOutcome, StoreError> {
        self.write(|s| s.apply_user_read(client, read))
    }
    fn user_accounts(&self, client: &str) -> Result<(Vec<Account>, Vec<SourceStatus>), StoreError> {
        self.read(|s| s.user_accounts(client))
    }
    fn put_user_policy(
        &self,
        client: &str,
        rules: &UserPolicyRules,
        at_ms: u64,
    ) -> Result<UserPolicy, StoreError> {
        self.write(|s| s.put_user_policy(client, rules, at_ms))
    }
    fn user_policies(&self, client: &str) -> Result<Vec<UserPolicy>, StoreError> {
        self.read(|s| s.user_policies(client))
    }
    fn user_policy(&self, client: &str) -> Result<UserPolicy, StoreError> {
        self.read(|s| s.user_policy(client))
    }
}
