//! Reading each configured client's Microsoft 365 / Entra ID users on a schedule (issue 5): the
//! HTTP side is [`crate::graph`], the records and decisions [`crate::users`]; this file runs
//! reads and stores what they found.
//!
//! Per client with `[clients.<name>.graph]` in the collector's config, one task reads the
//! tenant at start and then every `graph_interval` (with ±10% jitter, so many clients do not
//! hit Graph at once). A complete read replaces the client's `entra:<tenant>` accounts; a
//! failed read (unreachable, expired secret, throttled past every retry) is stored as a failure
//! that keeps every account and marks the source stale, and is logged in one line.
//!
//! **A read runs to its end, whoever waits for it.** Every read, scheduled or asked for by
//! `census users refresh` ([`EntraReader::start`]), runs on a task the reader owns (its
//! [`TaskTracker`], drained at shutdown), never inside a caller's request: a caller that gives
//! up (the CLI's `--timeout`) stops waiting, not reading, and the outcome is stored and logged
//! all the same. A read asked for while one of the same client runs joins it, so two reads of
//! one client never overlap and a throttled tenant is not asked twice.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use census_proto::convert::unix_millis;
use rand::Rng as _;
use tokio::sync::watch;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument as _, info, info_span, warn};

use crate::{
    graph::{GraphError, GraphHttp, GraphLimits, GraphSettings, read_tenant},
    metrics::Metrics,
    store::{Store, StoreError},
    users::{
        self, SourceKind,
        apply::{Outcome, Read, ReadData},
    },
};

/// Why a read could not be stored (a failed read itself is stored, not an error).
#[derive(Debug, thiserror::Error)]
pub enum EntraError {
    #[error(
        "no Entra ID tenant is configured for client {0:?}: add [clients.{0}.graph] to the collector's config"
    )]
    NotConfigured(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the read was cancelled")]
    Cancelled,
    #[error("{0}")]
    Graph(#[from] GraphError),
}

/// How a read ended, as every caller waiting for it sees it: what the store did (a failed
/// Graph read is stored too: [`Outcome::Failed`], its error in the source's status), or why
/// nothing could be stored.
pub type Finished = Result<Outcome, Arc<EntraError>>;

/// A read in progress (or just ended): `None` until it ends.
pub type ReadWatch = watch::Receiver<Option<Finished>>;

/// Whether the read behind `read` has not ended yet.
fn still_running(read: &ReadWatch) -> bool {
    read.borrow().is_none()
}

/// The collector's Entra ID reader: one HTTPS client, the tenants by client.
#[derive(Debug)]
pub struct EntraReader {
    http: GraphHttp,
    tenants: BTreeMap<String, GraphSettings>,
    interval: Duration,
    /// Per client, the latest read started: joined while it runs.
    running: BTreeMap<String, Mutex<Option<ReadWatch>>>,
    /// Owns every read's task (and the schedules), so none is dropped with a caller.
    tasks: TaskTracker,
    /// Counts reads by result (`census_collector_entra_reads_total`), when given.
    metrics: Option<Arc<Metrics>>,
}

impl EntraReader {
    /// A reader of `tenants` (client -> checked settings, see
    /// [`crate::config::Config::graph_tenants`]) every `interval`.
    pub fn new(
        tenants: BTreeMap<String, GraphSettings>,
        interval: Duration,
        limits: GraphLimits,
    ) -> Result<Self, EntraError> {
        let running = tenants
            .keys()
            .map(|c| (c.clone(), Mutex::new(None)))
            .collect();
        Ok(EntraReader {
            http: GraphHttp::with_limits(limits)?,
            tenants,
            interval,
            running,
            tasks: TaskTracker::new(),
            metrics: None,
        })
    }

    /// Counts every read's result in `metrics`.
    #[must_use]
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Starts a read of the client's tenant on a task of the reader's own, or joins the read of
    /// that client already running. The read runs to its end (or to `shutdown`) whether or not
    /// anyone waits on the returned watch; its outcome is stored and logged by the task.
    pub fn start(
        self: &Arc<Self>,
        store: &Arc<dyn Store>,
        client: &str,
        shutdown: &CancellationToken,
    ) -> Result<ReadWatch, EntraError> {
        let slot = self
            .running
            .get(client)
            .ok_or_else(|| EntraError::NotConfigured(client.to_owned()))?;
        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(running) = slot.as_ref().filter(|r| still_running(r)) {
            info!(
                client,
                "an Entra ID read of this client is running: joining it"
            );
            return Ok(running.clone());
        }
        let (tx, rx) = watch::channel(None);
        *slot = Some(rx.clone());
        let (this, store, client, shutdown) = (
            Arc::clone(self),
            Arc::clone(store),
            client.to_owned(),
            shutdown.clone(),
        );
        let span = info_span!("entra_read", client = %client);
        self.tasks.spawn(
            async move {
                let finished = this.read_now(&store, &client, &shutdown).await;
                match &finished {
                    Ok(_) => {}
                    Err(EntraError::Cancelled) => info!("Entra ID read cancelled: shutting down"),
                    Err(e) => warn!(error = %e, "cannot store the Entra ID read"),
                }
                tx.send_replace(Some(finished.map_err(Arc::new)));
            }
            .instrument(span),
        );
        Ok(rx)
    }

    /// The client's Entra ID source (`entra:<tenant>`) while a read of it runs.
    pub fn reading(&self, client: &str) -> Option<String> {
        let slot = self.running.get(client)?;
        let slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        let running = slot.as_ref().is_some_and(still_running);
        let tenant = &self.tenants.get(client)?.tenant_id;
        running.then(|| users::entra_source(tenant).ok()).flatten()
    }

    /// Waits for a read [`Self::start`] gave, until it ends.
    pub async fn outcome(mut read: ReadWatch) -> Finished {
        match read.wait_for(Option::is_some).await {
            Ok(done) => done.clone().unwrap_or_else(|| {
                Err(Arc::new(EntraError::Store(StoreError::Engine(
                    "the read ended without an outcome".into(),
                ))))
            }),
            // The task ended without sending: it panicked (the panic is in the log).
            Err(_) => Err(Arc::new(EntraError::Store(StoreError::Engine(
                "the read's task ended without an outcome".into(),
            )))),
        }
    }

    /// Waits until every read's task and every schedule has ended, for shutdown (the caller
    /// bounds the wait: reads and schedules end at the shutdown token, a read within one
    /// request).
    pub async fn drain(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Reads the client's tenant now and stores the result: the accounts of a complete read,
    /// or the failure (which keeps the accounts and marks the source stale). Returns what the
    /// store did; the read's own error is in the source's status and in the log. Runs only on
    /// the reader's tasks ([`Self::start`]).
    async fn read_now(
        &self,
        store: &Arc<dyn Store>,
        client: &str,
        shutdown: &CancellationToken,
    ) -> Result<Outcome, EntraError> {
        let Some(settings) = self.tenants.get(client) else {
            return Err(EntraError::NotConfigured(client.to_owned()));
        };
        let source = users::entra_source(&settings.tenant_id)
            .map_err(|e| EntraError::Store(StoreError::Engine(e)))?;
        // The licence allow-list lives in the client's (versioned) user policy; the read needs
        // it to know whether the tenant's SKUs must be listed.
        let (store2, c) = (Arc::clone(store), client.to_owned());
        let policy = blocking(move || {
            store2.ensure_client(&c, unix_millis(SystemTime::now()))?;
            store2.user_policy(&c)
        })
        .await?;
        let mut settings = settings.clone();
        settings.licence_allow_list = policy.rules.licence_allow_list;

        let read_at = unix_millis(SystemTime::now());
        let result = tokio::select! {
            r = read_tenant(&settings, &self.http) => r,
            () = shutdown.cancelled() => return Err(EntraError::Cancelled),
        };
        if let Some(m) = &self.metrics {
            let result = if result.is_ok() { "ok" } else { "failed" };
            m.entra_reads.with_label_values(&[result]).inc();
        }
        let outcome = match result {
            Ok(tenant) => Ok(ReadData {
                accounts: tenant
                    .users
                    .iter()
                    .map(|u| users::entra_account(&source, u, read_at))
                    .collect(),
                skus: tenant.skus,
            }),
            Err(e) => {
                warn!(client, tenant = %settings.tenant_id, error = %e, "Entra ID read failed; keeping the users of the last complete read, marked stale");
                Err(e.to_string())
            }
        };
        let read = Read {
            source,
            kind: SourceKind::EntraId,
            read_id: format!("graph-{read_at}"),
            read_at_ms: read_at,
            outcome,
        };
        let (store2, c) = (Arc::clone(store), client.to_owned());
        let stored = blocking(move || store2.apply_user_read(&c, &read)).await?;
        if let Outcome::Applied {
            present,
            added,
            removed,
        } = stored
        {
            info!(client, tenant = %settings.tenant_id, users = present, added, removed, "Entra ID users stored");
        }
        Ok(stored)
    }

    /// Starts one schedule per configured client that reads at once and then every interval,
    /// until `shutdown`. A scheduled read joins one asked for by `census users refresh`.
    pub fn spawn(self: &Arc<Self>, store: Arc<dyn Store>, shutdown: CancellationToken) {
        for client in self.tenants.keys() {
            let (this, store, shutdown, client) = (
                Arc::clone(self),
                Arc::clone(&store),
                shutdown.clone(),
                client.clone(),
            );
            let span = info_span!("entra", client = %client);
            self.tasks.spawn(
                async move {
                    loop {
                        // The read's own task logs how it ended.
                        if let Ok(read) = this.start(&store, &client, &shutdown) {
                            tokio::select! {
                                () = shutdown.cancelled() => break,
                                _ = Self::outcome(read) => {}
                            }
                        }
                        let wait = this.interval.mul_f64(rand::rng().random_range(0.9..1.1));
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(wait) => {}
                        }
                    }
                }
                .instrument(span),
            );
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, EntraError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| EntraError::Store(StoreError::Engine(format!("task failed: {e}"))))?
        .map_err(EntraError::Store)
}
