//! The gRPC services of `census.v1`: ingest (agents), query and admin (operators).
//!
//! Handlers authenticate, validate, and hand the work to the [`Store`] on a blocking thread;
//! they never trust a client, site or agent id named by an agent: an agent's identity and
//! scope come from the certificate it presents (see [`crate::auth`] and [`agents`]), and a
//! batch naming another agent is refused.
//! Every count and every device's `counted`/`reason` follows the client's counting policy
//! ([`crate::policy`]); billing snapshots ([`crate::snapshot`]) freeze them per period.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use census_proto::{
    convert::{self, unix_millis},
    v1::{
        self, admin_service_server::AdminService, ingest_service_server::IngestService,
        query_service_server::QueryService,
    },
};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt as _, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument as _, debug, info, info_span, warn};

mod agents;
mod users;

pub use agents::operator_check;

use crate::{
    auth::{self, AuthError, Registry},
    entra::EntraReader,
    identity::{self, EditError, Event, EventKind},
    metrics::{Metrics, RefusedReason},
    model::{self, DeviceRecord, Scope},
    pki::Pki,
    policy::{self, Policy, PolicyRules, RandomizedRule},
    snapshot::{self, Period, Snapshot},
    store::{BatchId, BatchOutcome, Edit, Store, StoreError},
};

/// Limits applied to what agents send.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_batch_observations: usize,
    /// The longest an agent's stream may go without a whole batch arriving before the
    /// collector closes it.
    pub stream_idle: Duration,
}

/// Who may call: the CA that issues certificates, the enrolled agents, and whether plaintext
/// (development mode) is served.
#[derive(Debug)]
pub struct Security {
    pub pki: Arc<Pki>,
    pub agents: Registry,
    pub dev_plaintext: bool,
    /// Held while a token is spent: two enrollments with one token never both succeed.
    enrolling: tokio::sync::Mutex<()>,
    /// Held while an agent record is written, which writes the registry's current record:
    /// a last-seen write never lands after, and undoes, a revocation.
    agent_writes: std::sync::Mutex<()>,
}

impl Security {
    pub fn new(pki: Arc<Pki>, agents: Registry, dev_plaintext: bool) -> Self {
        Security {
            pki,
            agents,
            dev_plaintext,
            enrolling: tokio::sync::Mutex::new(()),
            agent_writes: std::sync::Mutex::new(()),
        }
    }
}

/// The state every service shares.
#[derive(Debug, Clone)]
pub struct Collector {
    store: Arc<dyn Store>,
    security: Arc<Security>,
    limits: Limits,
    shutdown: CancellationToken,
    /// Batches being stored at once: two per core keep every core busy and the group commit
    /// fed; more only add threads waiting on the store, each with buffers of its own (on the
    /// collector benchmark on 2 cores, 8 at once took 40% more memory per device and
    /// unlimited twice as much, and neither ingested faster). The other batches wait here,
    /// and the blocking pool stays free for queries.
    storing: Arc<tokio::sync::Semaphore>,
    /// Reads clients' Entra ID users, when any is configured.
    entra: Option<Arc<EntraReader>>,
    /// What ingest and the streams count (served when `metrics_listen` is set).
    metrics: Arc<Metrics>,
}

fn now_ms() -> u64 {
    unix_millis(SystemTime::now())
}

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::NoSuchClient(name) => Status::not_found(format!("no client named {name:?}")),
        // Retryable: the store takes writes again once its disk has room. (Logged, rate-limited,
        // where the store found it.)
        StoreError::Unavailable(reason) => Status::unavailable(format!(
            "the collector cannot store anything now, try again later: {reason}"
        )),
        other => {
            warn!(error = %other, "store error");
            Status::internal(format!("collector storage error: {other}"))
        }
    }
}

fn auth_status(e: AuthError) -> Status {
    Status::unauthenticated(e.to_string())
}

fn name_status(e: model::NameError) -> Status {
    Status::invalid_argument(e.to_string())
}

impl Collector {
    pub fn new(
        store: Arc<dyn Store>,
        security: Arc<Security>,
        limits: Limits,
        shutdown: CancellationToken,
    ) -> Self {
        Collector {
            store,
            security,
            limits,
            shutdown,
            storing: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(4, |n| n.get() * 2),
            )),
            entra: None,
            metrics: Metrics::new(None),
        }
    }

    /// Counts into `metrics` (the server's, which it serves) instead of a set of its own.
    #[must_use]
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Serves `RefreshUsers` with `reader` (its schedule is started by the server).
    #[must_use]
    pub fn with_entra(mut self, reader: Arc<EntraReader>) -> Self {
        self.entra = Some(reader);
        self
    }

    /// Runs a store call on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, Status> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|e| Status::internal(format!("collector task failed: {e}")))?
            .map_err(store_status)
    }

    async fn require_client(&self, name: &str) -> Result<(), Status> {
        let n = name.to_owned();
        match self.blocking(move |s| s.client(&n)).await? {
            Some(_) => Ok(()),
            None => Err(Status::not_found(format!("no client named {name:?}"))),
        }
    }
}

// === impl IngestService ===

/// Validates a batch's envelope; the observations inside are checked one by one.
fn check_batch(batch: &v1::ObservationBatch, limits: Limits) -> Result<(), Status> {
    if batch.agent_id.is_empty() || batch.agent_id.len() > model::MAX_AGENT_ID_LEN {
        return Err(Status::invalid_argument(format!(
            "batch agent_id must be 1 to {} characters",
            model::MAX_AGENT_ID_LEN
        )));
    }
    if batch.agent_id.chars().any(|c| c.is_control()) {
        return Err(Status::invalid_argument(
            "batch agent_id must not contain control characters",
        ));
    }
    if batch.sequence == 0 {
        return Err(Status::invalid_argument(
            "batch sequence numbers start at 1",
        ));
    }
    if batch.observations.len() > limits.max_batch_observations {
        return Err(Status::invalid_argument(format!(
            "batch {} holds {} observations, more than the collector's limit of {}: send smaller batches",
            batch.sequence,
            batch.observations.len(),
            limits.max_batch_observations
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl IngestService for Collector {
    type ReportStream = ReceiverStream<Result<v1::BatchAck, Status>>;

    async fn report(
        &self,
        request: Request<Streaming<v1::ObservationBatch>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        let cert = agents::presented_certificate(&self.security, &request).map_err(auth_status)?;
        let agent = self.security.agents.identify(&cert).map_err(auth_status)?;
        let scope = Scope {
            client: agent.client,
            site: agent.site,
        };
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(32);
        let this = self.clone();
        let span =
            info_span!("report", client = %scope.client, site = %scope.site, agent = %agent.id);
        let idle = self.limits.stream_idle;
        tokio::spawn(
            async move {
                let _open = this.metrics.stream_opened();
                debug!("agent stream opened");
                loop {
                    let next = tokio::select! {
                        () = this.shutdown.cancelled() => {
                            let _ = tx.send(Err(Status::unavailable("collector is shutting down; resend unacknowledged batches"))).await;
                            break;
                        }
                        next = tokio::time::timeout(idle, inbound.next()) => match next {
                            Ok(next) => next,
                            Err(_) => {
                                // A stream that stops sending (or sends half a message and
                                // stalls) holds a task and a connection slot: close it.
                                this.metrics.streams_idle_closed.inc();
                                warn!(idle = %humantime::format_duration(idle), "agent stream idle too long; closing it");
                                let _ = tx.send(Err(Status::deadline_exceeded(format!(
                                    "no batch arrived for {}: stream closed; open a new one to send more",
                                    humantime::format_duration(idle)
                                )))).await;
                                break;
                            }
                        },
                    };
                    let batch = match next {
                        None => break,
                        Some(Ok(batch)) => batch,
                        Some(Err(status)) => {
                            // A message over the size limit or one that does not decode ends
                            // this stream only; tell the agent why. (An agent that went away
                            // is no refused batch.)
                            if matches!(
                                status.code(),
                                tonic::Code::OutOfRange
                                    | tonic::Code::ResourceExhausted
                                    | tonic::Code::Internal
                                    | tonic::Code::InvalidArgument
                            ) {
                                this.metrics.batches_received.inc();
                                this.metrics.refused(RefusedReason::Malformed);
                            }
                            warn!(%status, "agent stream failed");
                            let _ = tx.send(Err(status)).await;
                            break;
                        }
                    };
                    this.metrics.batches_received.inc();
                    // The certificate is checked again for every batch, so a revocation also
                    // ends streams that are already open.
                    let reply = match this.security.agents.identify(&cert) {
                        Ok(now) if now.client == scope.client && now.site == scope.site => {
                            this.note_seen(&cert, &batch);
                            this.ingest(&scope, &now.id, batch).await
                        }
                        Ok(_) => Err(Status::unauthenticated("this agent now belongs to another client or site: reconnect")),
                        Err(e) => Err(auth_status(e)),
                    };
                    let failed = reply.is_err();
                    if let Err(status) = &reply {
                        this.metrics.refused(RefusedReason::of(status));
                        // A store that cannot write says so once, where it fails; not once
                        // per refused batch of every agent.
                        if status.code() == tonic::Code::Unavailable {
                            debug!(%status, "batch refused");
                        } else {
                            warn!(%status, "batch refused");
                        }
                    }
                    if tx.send(reply).await.is_err() || failed {
                        break;
                    }
                }
                debug!("agent stream closed");
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

impl Collector {
    /// Validates, stores and acknowledges one batch.
    /// `agent_id` is the agent the certificate names: the batch's evidence is credited to it,
    /// and its sequences are its own; a batch naming another agent is refused.
    async fn ingest(
        &self,
        scope: &Scope,
        agent_id: &str,
        batch: v1::ObservationBatch,
    ) -> Result<v1::BatchAck, Status> {
        check_batch(&batch, self.limits)?;
        if batch.agent_id != agent_id {
            return Err(Status::permission_denied(format!(
                "batch {} names agent {:?}, but this connection's certificate is agent {agent_id}'s: an agent reports only as the agent its certificate names",
                batch.sequence, batch.agent_id
            )));
        }
        let received = now_ms();
        let offset = model::clock_offset(batch.sent_at.as_ref(), received);
        let directory = users::directory_part(&batch, received, offset)?;
        let clean: Vec<_> = batch
            .observations
            .iter()
            .filter_map(|o| model::clean_observation(o, received, offset))
            .collect();
        let rejected = batch.observations.len() - clean.len();
        let stored = u32::try_from(clean.len()).unwrap_or(u32::MAX);
        let id = BatchId {
            agent_id: agent_id.to_owned(),
            epoch: batch.epoch,
            sequence: batch.sequence,
            digest: batch_digest(&batch),
        };
        let scope2 = scope.clone();
        let timer = self.metrics.batch_store_seconds.start_timer();
        // Fails only once closed, which it never is.
        let _slot = self
            .storing
            .acquire()
            .await
            .map_err(|_| Status::unavailable("collector is shutting down"))?;
        let (outcome, part) = self
            .blocking(move |s| {
                // A batch carries observations, a part of a directory read, or both; each is
                // stored at most once under the batch's id.
                let devices = (!clean.is_empty() || directory.is_none())
                    .then(|| s.apply_batch(&scope2, &id, &clean))
                    .transpose()?;
                // A newly stored directory part, for the metrics: (failed read, users).
                let mut new_part = None;
                let users = match directory {
                    Some((part, skipped)) => {
                        let (outcome, applied) = s.apply_directory_part(&scope2, &id, &part)?;
                        debug!(source = %part.source, read = %part.read_id, part = part.part, parts = part.parts, users = part.accounts.len(), skipped, ?applied, "directory read part");
                        if let Some(crate::users::apply::Outcome::Applied { present, added, removed }) = applied {
                            info!(source = %part.source, users = present, added, removed, "directory users stored");
                        }
                        if outcome == BatchOutcome::Stored {
                            new_part = Some((part.error.is_some(), part.accounts.len()));
                        }
                        Some(outcome)
                    }
                    None => None,
                };
                let outcome = match (devices, users) {
                    (Some(BatchOutcome::Conflict), _) | (_, Some(BatchOutcome::Conflict)) => {
                        BatchOutcome::Conflict
                    }
                    (Some(BatchOutcome::Stored), _) | (_, Some(BatchOutcome::Stored)) => {
                        BatchOutcome::Stored
                    }
                    _ => BatchOutcome::Duplicate,
                };
                Ok((outcome, new_part))
            })
            .await?;
        timer.observe_duration();
        match outcome {
            BatchOutcome::Stored => {
                self.metrics.batches_stored.inc();
                self.metrics.observations_stored.inc_by(u64::from(stored));
                self.metrics.observations_rejected.inc_by(rejected as u64);
                if let Some((failed, users)) = part {
                    let result = if failed { "failed" } else { "ok" };
                    self.metrics
                        .directory_parts
                        .with_label_values(&[result])
                        .inc();
                    self.metrics.directory_users.inc_by(users as u64);
                }
            }
            BatchOutcome::Duplicate => self.metrics.batches_duplicate.inc(),
            // Counted as refused where the stream answers it.
            BatchOutcome::Conflict => {}
        }
        let status = match outcome {
            BatchOutcome::Stored => v1::AckStatus::Stored,
            BatchOutcome::Duplicate => v1::AckStatus::Duplicate,
            BatchOutcome::Conflict => {
                return Err(Status::failed_precondition(format!(
                    "batch {} (epoch {}) of agent {} was already stored with different content: this agent's state was restored or copied; it must continue in a new sequence epoch",
                    batch.sequence, batch.epoch, batch.agent_id
                )));
            }
        };
        debug!(agent = %batch.agent_id, epoch = batch.epoch, sequence = batch.sequence, stored, rejected, ?outcome, "batch");
        Ok(v1::BatchAck {
            agent_id: batch.agent_id,
            sequence: batch.sequence,
            status: status as i32,
            observations: stored,
            rejected: u32::try_from(rejected).unwrap_or(u32::MAX),
        })
    }
}

/// The SHA-256 of a batch's observations (and directory users, when it has any): a replay has
/// the same digest, a reused sequence number almost surely not. prost encodes a given message
/// the same way every time. A batch of observations alone hashes as it always did.
fn batch_digest(batch: &v1::ObservationBatch) -> [u8; 32] {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    // One buffer for every message: the same bytes as an encoding of each into a vector of its
    // own, without an allocation per observation.
    let mut buf = Vec::with_capacity(1024);
    for o in &batch.observations {
        hash_message(&mut h, &mut buf, o);
    }
    if let Some(read) = &batch.directory_read {
        h.update(b"directory");
        hash_message(&mut h, &mut buf, read);
        for u in &batch.users {
            hash_message(&mut h, &mut buf, u);
        }
    }
    h.finalize().into()
}

/// Adds a message's length-delimited encoding to `h`, encoded in `buf`.
fn hash_message<M: prost::Message>(h: &mut sha2::Sha256, buf: &mut Vec<u8>, m: &M) {
    use sha2::Digest as _;
    buf.clear();
    // A vector grows as needed: encoding into one cannot run out of room.
    let _ = m.encode_length_delimited(buf);
    h.update(buf.as_slice());
}

// === impl QueryService ===

fn device_to_wire(dev: &DeviceRecord, policy: &Policy, now: u64) -> v1::Device {
    let policy::Decision {
        counted,
        rule: reason,
    } = policy::evaluate(policy, dev, now);
    v1::Device {
        id: dev.id.clone(),
        client: dev.client.clone(),
        site: dev.site.clone(),
        macs: dev.macs.iter().map(|m| m.octets().to_vec()).collect(),
        addresses: dev
            .addresses
            .iter()
            .map(|a| v1::DeviceAddress {
                address: a.ip.to_string(),
                answered: a.answered,
                last_seen: Some(convert::timestamp_from_millis(a.last_seen_ms)),
                site: a.site.clone(),
                current: a.current,
                lost: a.lost,
            })
            .collect(),
        identifiers: dev
            .keys
            .iter()
            .map(|k| {
                let (kind, value) = identity::describe_key(k);
                v1::Identifier {
                    kind: kind.to_owned(),
                    value: value.to_owned(),
                    strong: identity::is_strong(k),
                    key: k.clone(),
                }
            })
            .collect(),
        sites: dev.sites.clone(),
        anomalies: dev.anomalies.clone(),
        weak_only: dev.weak_only,
        names: dev.names.clone(),
        category: model::category(dev).to_owned(),
        category_reason: model::category_reason(dev).to_owned(),
        first_seen: Some(convert::timestamp_from_millis(dev.first_seen_ms)),
        last_seen: Some(convert::timestamp_from_millis(dev.last_seen_ms)),
        counted,
        reason,
        evidence: dev
            .evidence
            .iter()
            .map(|e| v1::Evidence {
                agent_id: e.agent_id.clone(),
                method: e.method,
                first_seen: Some(convert::timestamp_from_millis(e.first_seen_ms)),
                last_seen: Some(convert::timestamp_from_millis(e.last_seen_ms)),
                observations: e.observations,
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl QueryService for Collector {
    async fn list_clients(
        &self,
        _request: Request<v1::ListClientsRequest>,
    ) -> Result<Response<v1::ListClientsResponse>, Status> {
        let clients = self
            .blocking(|s| {
                s.clients()?
                    .into_iter()
                    .map(|c| {
                        let sites = s
                            .sites(&c.name)?
                            .into_iter()
                            .map(|site| site.name)
                            .collect();
                        Ok(v1::Client {
                            created_at: Some(convert::timestamp_from_millis(c.created_ms)),
                            name: c.name,
                            sites,
                        })
                    })
                    .collect::<Result<Vec<_>, StoreError>>()
            })
            .await?;
        Ok(Response::new(v1::ListClientsResponse { clients }))
    }

    async fn get_counts(
        &self,
        request: Request<v1::GetCountsRequest>,
    ) -> Result<Response<v1::GetCountsResponse>, Status> {
        let wanted = request.into_inner().client;
        let now = now_ms();
        // One trip to the blocking pool for the whole answer: the client check, its policy and
        // the count from the store's summaries (no device record is read).
        let counts = self
            .blocking(move |s| {
                let names: Vec<String> = if wanted.is_empty() {
                    s.clients()?.into_iter().map(|c| c.name).collect()
                } else if s.client(&wanted)?.is_none() {
                    return Err(StoreError::NoSuchClient(wanted));
                } else {
                    vec![wanted]
                };
                names
                    .into_iter()
                    .map(|client| {
                        let policy = s.policy(&client)?;
                        let tally = s.tally(&client, &policy, now)?;
                        let (user_tally, user_policy, user_sources) =
                            users::user_counts(s, &client, now)?;
                        Ok(v1::ClientCounts {
                            client,
                            devices: tally.devices,
                            users: user_tally.count,
                            devices_by_category: category_counts(tally.by_category),
                            as_of: Some(convert::timestamp_from_millis(now)),
                            policy_version: policy.version,
                            users_policy_version: user_policy.version,
                            users_stale: user_tally.stale,
                            user_sources,
                        })
                    })
                    .collect::<Result<Vec<_>, StoreError>>()
            })
            .await?;
        Ok(Response::new(v1::GetCountsResponse { counts }))
    }

    async fn list_devices(
        &self,
        request: Request<v1::ListDevicesRequest>,
    ) -> Result<Response<v1::ListDevicesResponse>, Status> {
        let req = request.into_inner();
        model::validate_name("client", &req.client).map_err(name_status)?;
        if !req.site.is_empty() {
            model::validate_name("site", &req.site).map_err(name_status)?;
        }
        self.require_client(&req.client).await?;
        let now = now_ms();
        let counted = v1::CountedFilter::try_from(req.counted).unwrap_or_default();
        let devices = self
            .blocking(move |s| {
                let site = (!req.site.is_empty()).then_some(req.site.as_str());
                let policy = s.policy(&req.client)?;
                Ok(s.devices(&req.client, site)?
                    .iter()
                    .map(|d| device_to_wire(d, &policy, now))
                    .filter(|d| req.category.is_empty() || d.category == req.category)
                    .filter(|d| match counted {
                        v1::CountedFilter::Any => true,
                        v1::CountedFilter::Counted => d.counted,
                        v1::CountedFilter::NotCounted => !d.counted,
                    })
                    .collect())
            })
            .await?;
        Ok(Response::new(v1::ListDevicesResponse { devices }))
    }

    async fn get_device(
        &self,
        request: Request<v1::GetDeviceRequest>,
    ) -> Result<Response<v1::Device>, Status> {
        let req = request.into_inner();
        model::validate_name("client", &req.client).map_err(name_status)?;
        self.require_client(&req.client).await?;
        let now = now_ms();
        let (client, id) = (req.client.clone(), req.id.clone());
        let (device, policy) = self
            .blocking(move |s| Ok((s.device(&client, &id)?, s.policy(&client)?)))
            .await?;
        device
            .map(|d| Response::new(device_to_wire(&d, &policy, now)))
            .ok_or_else(|| {
                Status::not_found(format!("no device {:?} in client {:?}", req.id, req.client))
            })
    }

    async fn list_history(
        &self,
        request: Request<v1::ListHistoryRequest>,
    ) -> Result<Response<v1::ListHistoryResponse>, Status> {
        let client = request.into_inner().client;
        model::validate_name("client", &client).map_err(name_status)?;
        self.require_client(&client).await?;
        let events = self.blocking(move |s| s.history(&client)).await?;
        Ok(Response::new(v1::ListHistoryResponse {
            events: events.iter().map(event_to_wire).collect(),
        }))
    }

    async fn get_policy(
        &self,
        request: Request<v1::GetPolicyRequest>,
    ) -> Result<Response<v1::CountingPolicy>, Status> {
        let req = request.into_inner();
        model::validate_name("client", &req.client).map_err(name_status)?;
        self.require_client(&req.client).await?;
        let (client, version) = (req.client.clone(), req.version.clone());
        let found = self
            .blocking(move |s| {
                Ok(if version.is_empty() {
                    Some(s.policy(&client)?)
                } else if version == policy::DEFAULT_VERSION {
                    Some(Policy::default())
                } else {
                    s.policies(&client)?
                        .into_iter()
                        .find(|p| p.version == version)
                })
            })
            .await?;
        found
            .map(|p| Response::new(policy_to_wire(&p)))
            .ok_or_else(|| {
                Status::not_found(format!(
                    "client {:?} has no policy version {:?}",
                    req.client, req.version
                ))
            })
    }

    async fn list_snapshots(
        &self,
        request: Request<v1::ListSnapshotsRequest>,
    ) -> Result<Response<v1::ListSnapshotsResponse>, Status> {
        let client = request.into_inner().client;
        model::validate_name("client", &client).map_err(name_status)?;
        self.require_client(&client).await?;
        let snapshots = self.blocking(move |s| s.snapshots(&client)).await?;
        Ok(Response::new(v1::ListSnapshotsResponse {
            snapshots: snapshots.iter().map(snapshot_summary).collect(),
        }))
    }

    async fn get_snapshot(
        &self,
        request: Request<v1::GetSnapshotRequest>,
    ) -> Result<Response<v1::Snapshot>, Status> {
        let req = request.into_inner();
        let snap = self.stored_snapshot(&req.client, &req.period).await?;
        Ok(Response::new(snapshot_to_wire(&snap)))
    }

    async fn diff_snapshot(
        &self,
        request: Request<v1::DiffSnapshotRequest>,
    ) -> Result<Response<v1::SnapshotDiff>, Status> {
        let req = request.into_inner();
        let current = self.stored_snapshot(&req.client, &req.period).await?;
        let previous = if req.against.is_empty() {
            let client = req.client.clone();
            let period = current.period.clone();
            // The latest earlier period that has a snapshot ("YYYY-MM" sorts by time).
            self.blocking(move |s| {
                Ok(s.snapshots(&client)?
                    .into_iter()
                    .rfind(|p| p.period < period))
            })
            .await?
        } else {
            Some(self.stored_snapshot(&req.client, &req.against).await?)
        };
        let d = snapshot::diff(previous.as_ref(), &current);
        Ok(Response::new(diff_to_wire(&current.client, &d)))
    }

    type ExportSnapshotStream =
        tokio_stream::Iter<std::vec::IntoIter<Result<v1::ExportChunk, Status>>>;

    async fn export_snapshot(
        &self,
        request: Request<v1::ExportSnapshotRequest>,
    ) -> Result<Response<Self::ExportSnapshotStream>, Status> {
        let req = request.into_inner();
        let format = v1::ExportFormat::try_from(req.format).unwrap_or_default();
        let (ext, content_type) = match format {
            v1::ExportFormat::Csv => ("csv", "text/csv"),
            v1::ExportFormat::Json => ("json", "application/json"),
            v1::ExportFormat::UsersCsv => ("users.csv", "text/csv"),
            v1::ExportFormat::Unspecified => {
                return Err(Status::invalid_argument(
                    "export format must be CSV, JSON or USERS_CSV",
                ));
            }
        };
        let snap = self.stored_snapshot(&req.client, &req.period).await?;
        let content = match format {
            v1::ExportFormat::Json => {
                let mut text = serde_json::to_string_pretty(&snapshot::to_json(&snap))
                    .map_err(|e| Status::internal(format!("cannot render the snapshot: {e}")))?;
                text.push('\n');
                text
            }
            v1::ExportFormat::UsersCsv => snapshot::to_users_csv(&snap),
            _ => snapshot::to_csv(&snap),
        };
        // Chunks well under gRPC's default 4 MiB message limit, so any client can read them.
        let mut chunks: Vec<Result<v1::ExportChunk, Status>> = content
            .as_bytes()
            .chunks(EXPORT_CHUNK_BYTES)
            .map(|c| {
                Ok(v1::ExportChunk {
                    data: c.to_vec(),
                    ..Default::default()
                })
            })
            .collect();
        if chunks.is_empty() {
            chunks.push(Ok(v1::ExportChunk::default()));
        }
        if let Some(Ok(first)) = chunks.first_mut() {
            first.content_type = content_type.to_owned();
            first.file_name = format!("census-{}-{}.{ext}", snap.client, snap.period);
        }
        Ok(Response::new(tokio_stream::iter(chunks)))
    }

    async fn list_users(
        &self,
        request: Request<v1::ListUsersRequest>,
    ) -> Result<Response<v1::ListUsersResponse>, Status> {
        self.list_users_impl(request).await
    }

    async fn get_user_policy(
        &self,
        request: Request<v1::GetUserPolicyRequest>,
    ) -> Result<Response<v1::UserPolicy>, Status> {
        self.get_user_policy_impl(request).await
    }
}

/// The size of one exported chunk.
const EXPORT_CHUNK_BYTES: usize = 1024 * 1024;

impl Collector {
    /// The snapshot of a client and period, or the status that says why there is none.
    async fn stored_snapshot(&self, client: &str, period: &str) -> Result<Snapshot, Status> {
        model::validate_name("client", client).map_err(name_status)?;
        let period = Period::parse(period)
            .map_err(|e| Status::invalid_argument(e.to_string()))?
            .to_string();
        self.require_client(client).await?;
        let (c, p) = (client.to_owned(), period.clone());
        self.blocking(move |s| s.snapshot(&c, &p))
            .await?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no snapshot of client {client} for {period}: see `census snapshot list --client {client}`"
                ))
            })
    }
}

// === policy and snapshot messages ===

fn randomized_to_wire(r: RandomizedRule) -> v1::RandomizedRule {
    match r {
        RandomizedRule::Count => v1::RandomizedRule::Count,
        RandomizedRule::Exclude => v1::RandomizedRule::Exclude,
        RandomizedRule::CountIfNamed => v1::RandomizedRule::CountIfNamed,
    }
}

fn policy_to_wire(p: &Policy) -> v1::CountingPolicy {
    v1::CountingPolicy {
        version: p.version.clone(),
        client: p.client.clone(),
        window_days: p.rules.window_days,
        categories: p.rules.categories.clone(),
        randomized: randomized_to_wire(p.rules.randomized) as i32,
        saved_at: (p.saved_ms != 0).then(|| convert::timestamp_from_millis(p.saved_ms)),
        is_default: p.is_default(),
    }
}

/// The rules of a policy an operator sent, checked.
fn policy_from_wire(p: &v1::CountingPolicy) -> Result<PolicyRules, Status> {
    let randomized = match v1::RandomizedRule::try_from(p.randomized) {
        Ok(v1::RandomizedRule::Count) => RandomizedRule::Count,
        Ok(v1::RandomizedRule::Exclude) => RandomizedRule::Exclude,
        Ok(v1::RandomizedRule::CountIfNamed) => RandomizedRule::CountIfNamed,
        _ => {
            return Err(Status::invalid_argument(
                policy::PolicyError::Randomized.to_string(),
            ));
        }
    };
    PolicyRules {
        window_days: p.window_days,
        categories: p.categories.clone(),
        randomized,
    }
    .validated()
    .map_err(|e| Status::invalid_argument(e.to_string()))
}

fn snapshot_summary(s: &Snapshot) -> v1::SnapshotSummary {
    v1::SnapshotSummary {
        client: s.client.clone(),
        period: s.period.clone(),
        as_of: Some(convert::timestamp_from_millis(s.as_of_ms)),
        policy_version: s.policy.version.clone(),
        devices: s.device_count(),
        devices_by_category: category_counts(s.by_category.clone()),
        users: s.users.count,
        users_policy_version: s.users.policy_version.clone(),
        users_stale: s.users.stale,
    }
}

fn snapshot_device_to_wire(d: &snapshot::SnapshotDevice) -> v1::SnapshotDevice {
    v1::SnapshotDevice {
        id: d.id.clone(),
        category: d.category.clone(),
        category_reason: d.category_reason.clone(),
        identifiers: d
            .identifiers
            .iter()
            .map(|i| v1::Identifier {
                kind: i.kind.clone(),
                value: i.value.clone(),
                strong: i.strong,
                key: i.key.clone(),
            })
            .collect(),
        names: d.names.clone(),
        addresses: d.addresses.clone(),
        sites: d.sites.clone(),
        first_seen: Some(convert::timestamp_from_millis(d.first_seen_ms)),
        last_seen: Some(convert::timestamp_from_millis(d.last_seen_ms)),
        counted_by: d.counted_by.clone(),
        evidence: d
            .evidence
            .iter()
            .map(|e| v1::Evidence {
                agent_id: e.agent_id.clone(),
                method: [
                    v1::Method::Arp,
                    v1::Method::Icmp,
                    v1::Method::Snmp,
                    v1::Method::Mdns,
                ]
                .into_iter()
                .find(|m| m.label() == e.method)
                .unwrap_or(v1::Method::Unspecified) as i32,
                first_seen: Some(convert::timestamp_from_millis(e.first_seen_ms)),
                last_seen: Some(convert::timestamp_from_millis(e.last_seen_ms)),
                observations: e.observations,
            })
            .collect(),
    }
}

fn snapshot_to_wire(s: &Snapshot) -> v1::Snapshot {
    v1::Snapshot {
        summary: Some(snapshot_summary(s)),
        policy: Some(policy_to_wire(&s.policy)),
        devices: s.devices.iter().map(snapshot_device_to_wire).collect(),
        users: s
            .users
            .users
            .iter()
            .map(users::snapshot_user_to_wire)
            .collect(),
        users_policy: s.users.policy.as_ref().map(users::user_policy_to_wire),
        user_sources: s.users.sources.iter().map(users::source_to_wire).collect(),
    }
}

fn count_change(c: &snapshot::CountDelta) -> v1::CountChange {
    v1::CountChange {
        category: c.category.clone(),
        before: c.before,
        after: c.after,
        delta: c.delta(),
    }
}

fn diff_to_wire(client: &str, d: &snapshot::Diff) -> v1::SnapshotDiff {
    v1::SnapshotDiff {
        client: client.to_owned(),
        period: d.period.clone(),
        previous_period: d.previous_period.clone().unwrap_or_default(),
        added: d.added.iter().map(snapshot_device_to_wire).collect(),
        removed: d.removed.iter().map(snapshot_device_to_wire).collect(),
        category_changed: d
            .category_changed
            .iter()
            .map(|c| v1::CategoryChange {
                id: c.id.clone(),
                from: c.from.clone(),
                to: c.to.clone(),
            })
            .collect(),
        reidentified: d
            .reidentified
            .iter()
            .map(|r| v1::ReidentifiedDevice {
                previous_id: r.previous_id.clone(),
                id: r.id.clone(),
                shared_key: r.shared_key.clone(),
            })
            .collect(),
        devices: Some(count_change(&d.devices)),
        devices_by_category: d.by_category.iter().map(count_change).collect(),
        users: Some(count_change(&d.users)),
        users_added: d
            .users_added
            .iter()
            .map(users::snapshot_user_to_wire)
            .collect(),
        users_removed: d
            .users_removed
            .iter()
            .map(users::snapshot_user_to_wire)
            .collect(),
    }
}

fn event_to_wire(e: &Event) -> v1::HistoryEvent {
    let ids = |list: &[(String, Vec<String>)]| {
        list.iter()
            .map(|(id, keys)| v1::DeviceIdentity {
                id: id.clone(),
                keys: keys.clone(),
            })
            .collect()
    };
    v1::HistoryEvent {
        seq: e.seq,
        at: Some(convert::timestamp_from_millis(e.at_ms)),
        kind: match e.kind {
            EventKind::Merge => v1::HistoryKind::Merge,
            EventKind::ManualMerge => v1::HistoryKind::ManualMerge,
            EventKind::Split => v1::HistoryKind::Split,
        } as i32,
        reason: e.reason.clone(),
        before: ids(&e.before),
        after: ids(&e.after),
        undone_by: e.undone_by.unwrap_or(0),
        undoes: e.undoes.unwrap_or(0),
    }
}

fn edit_status(e: EditError) -> Status {
    match e {
        EditError::NoDevice { .. } | EditError::NoEvent(_) => Status::not_found(e.to_string()),
        EditError::SameDevice | EditError::BadSplit(_) => Status::invalid_argument(e.to_string()),
        EditError::AlreadyUndone(_) => Status::failed_precondition(e.to_string()),
    }
}

impl Collector {
    async fn edit(&self, client: String, edit: Edit) -> Result<Response<v1::HistoryEvent>, Status> {
        model::validate_name("client", &client).map_err(name_status)?;
        self.require_client(&client).await?;
        let now = now_ms();
        let event = self
            .blocking(move |s| s.edit(&client, &edit, now))
            .await?
            .map_err(edit_status)?;
        info!(seq = event.seq, kind = ?event.kind, reason = %event.reason, "device identity edited");
        Ok(Response::new(event_to_wire(&event)))
    }
}

fn category_counts(by: BTreeMap<String, u64>) -> Vec<v1::CategoryCount> {
    by.into_iter()
        .map(|(category, count)| v1::CategoryCount { category, count })
        .collect()
}

// === impl AdminService ===

#[tonic::async_trait]
impl AdminService for Collector {
    async fn create_token(
        &self,
        request: Request<v1::CreateTokenRequest>,
    ) -> Result<Response<v1::CreateTokenResponse>, Status> {
        let req = request.into_inner();
        model::validate_name("client", &req.client).map_err(name_status)?;
        model::validate_name("site", &req.site).map_err(name_status)?;
        let ttl = agents::token_ttl(req.expires_in_seconds)?;
        let scope = Scope {
            client: req.client,
            site: req.site,
        };
        let now = now_ms();
        let token = auth::new_token(&scope, now, ttl);
        let record = token.record.clone();
        let scope2 = scope.clone();
        let (client_created, site_created) = self
            .blocking(move |s| {
                let client_created = s.client(&scope2.client)?.is_none();
                let site_created = s.ensure_site(&scope2.client, &scope2.site, now)?;
                s.put_token(&record)?;
                Ok((client_created, site_created))
            })
            .await?;
        info!(client = %scope.client, site = %scope.site, token_id = %token.record.id, expires_ms = token.record.expires_ms, "enrollment token created");
        Ok(Response::new(v1::CreateTokenResponse {
            token: token.text,
            token_id: token.record.id,
            client: scope.client,
            site: scope.site,
            client_created,
            site_created,
            expires_at: Some(convert::timestamp_from_millis(token.record.expires_ms)),
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<v1::ListTokensRequest>,
    ) -> Result<Response<v1::ListTokensResponse>, Status> {
        let client = request.into_inner().client;
        let tokens = self
            .blocking(move |s| {
                Ok(s.tokens()?
                    .into_iter()
                    .filter(|t| client.is_empty() || t.client == client)
                    .map(|t| v1::EnrollmentToken {
                        token_id: t.id,
                        client: t.client,
                        site: t.site,
                        created_at: Some(convert::timestamp_from_millis(t.created_ms)),
                        revoked: t.revoked,
                        expires_at: Some(convert::timestamp_from_millis(t.expires_ms)),
                        used_by_agent: t.used_by.unwrap_or_default(),
                        used_at: t.used_ms.map(convert::timestamp_from_millis),
                    })
                    .collect())
            })
            .await?;
        Ok(Response::new(v1::ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        request: Request<v1::RevokeTokenRequest>,
    ) -> Result<Response<v1::RevokeTokenResponse>, Status> {
        let id = request.into_inner().token_id;
        let id2 = id.clone();
        let found = self
            .blocking(move |s| match s.token(&id2)? {
                Some(mut t) => {
                    t.revoked = true;
                    s.put_token(&t)?;
                    Ok(true)
                }
                None => Ok(false),
            })
            .await?;
        if !found {
            return Err(Status::not_found(format!(
                "no enrollment token with id {id:?}: see `census token list`"
            )));
        }
        info!(token_id = %id, "enrollment token revoked");
        Ok(Response::new(v1::RevokeTokenResponse {}))
    }

    async fn list_agents(
        &self,
        request: Request<v1::ListAgentsRequest>,
    ) -> Result<Response<v1::ListAgentsResponse>, Status> {
        let client = request.into_inner().client;
        Ok(Response::new(v1::ListAgentsResponse {
            agents: self
                .security
                .agents
                .list()
                .into_iter()
                .filter(|a| client.is_empty() || a.client == client)
                .map(agents::agent_to_wire)
                .collect(),
        }))
    }

    async fn revoke_agent(
        &self,
        request: Request<v1::RevokeAgentRequest>,
    ) -> Result<Response<v1::RevokeAgentResponse>, Status> {
        self.revoke(request.into_inner().agent_id).await
    }

    async fn create_client(
        &self,
        request: Request<v1::CreateClientRequest>,
    ) -> Result<Response<v1::CreateClientResponse>, Status> {
        let name = request.into_inner().name;
        model::validate_name("client", &name).map_err(name_status)?;
        let now = now_ms();
        let (client, created) = self.blocking(move |s| s.ensure_client(&name, now)).await?;
        Ok(Response::new(v1::CreateClientResponse {
            client: Some(v1::Client {
                name: client.name,
                created_at: Some(convert::timestamp_from_millis(client.created_ms)),
                sites: Vec::new(),
            }),
            created,
        }))
    }

    async fn create_site(
        &self,
        request: Request<v1::CreateSiteRequest>,
    ) -> Result<Response<v1::CreateSiteResponse>, Status> {
        let req = request.into_inner();
        model::validate_name("client", &req.client).map_err(name_status)?;
        model::validate_name("site", &req.site).map_err(name_status)?;
        let now = now_ms();
        let created = self
            .blocking(move |s| s.ensure_site(&req.client, &req.site, now))
            .await?;
        Ok(Response::new(v1::CreateSiteResponse { created }))
    }

    async fn merge_devices(
        &self,
        request: Request<v1::MergeDevicesRequest>,
    ) -> Result<Response<v1::HistoryEvent>, Status> {
        let r = request.into_inner();
        let reason = if r.reason.trim().is_empty() {
            "merged by an operator".to_owned()
        } else {
            r.reason
        };
        self.edit(
            r.client,
            Edit::Merge {
                a: r.a,
                b: r.b,
                reason,
            },
        )
        .await
    }

    async fn split_device(
        &self,
        request: Request<v1::SplitDeviceRequest>,
    ) -> Result<Response<v1::HistoryEvent>, Status> {
        let r = request.into_inner();
        let reason = if r.reason.trim().is_empty() {
            "split by an operator".to_owned()
        } else {
            r.reason
        };
        self.edit(
            r.client,
            Edit::Split {
                id: r.id,
                keys: r.keys,
                reason,
            },
        )
        .await
    }

    async fn undo_event(
        &self,
        request: Request<v1::UndoEventRequest>,
    ) -> Result<Response<v1::HistoryEvent>, Status> {
        let r = request.into_inner();
        self.edit(r.client, Edit::Undo { seq: r.seq }).await
    }

    async fn set_policy(
        &self,
        request: Request<v1::SetPolicyRequest>,
    ) -> Result<Response<v1::CountingPolicy>, Status> {
        let req = request.into_inner();
        model::validate_name("client", &req.client).map_err(name_status)?;
        let wire = req
            .policy
            .ok_or_else(|| Status::invalid_argument("SetPolicy needs a policy"))?;
        let rules = policy_from_wire(&wire)?;
        self.require_client(&req.client).await?;
        let now = now_ms();
        let client = req.client.clone();
        let saved = self
            .blocking(move |s| s.put_policy(&client, &rules, now))
            .await?;
        info!(client = %req.client, version = %saved.version, rules = %saved.summary(), "counting policy saved");
        Ok(Response::new(policy_to_wire(&saved)))
    }

    async fn create_snapshot(
        &self,
        request: Request<v1::CreateSnapshotRequest>,
    ) -> Result<Response<v1::SnapshotSummary>, Status> {
        let req = request.into_inner();
        model::validate_name("client", &req.client).map_err(name_status)?;
        let period =
            Period::parse(&req.period).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let now = now_ms();
        if period.start_ms() > now {
            return Err(Status::invalid_argument(format!(
                "period {period} has not started yet: a snapshot freezes a period that has begun"
            )));
        }
        self.require_client(&req.client).await?;
        let client = req.client.clone();
        let created = self
            .blocking(move |s| {
                if s.snapshot(&client, &period.to_string())?.is_some() {
                    return Ok(None);
                }
                let policy = s.policy(&client)?;
                let devices = s.devices(&client, None)?;
                let mut snap = snapshot::build(&client, period, &policy, &devices, now);
                let (people, user_policy, sources) = users::client_people(s, &client, now)?;
                snap.users = snapshot::users_part(&user_policy, &people, &sources);
                Ok(s.create_snapshot(&snap)?.then_some(snap))
            })
            .await?;
        let Some(snap) = created else {
            return Err(Status::failed_precondition(format!(
                "snapshot {} {period} exists; snapshots are immutable",
                req.client
            )));
        };
        info!(client = %snap.client, period = %snap.period, devices = snap.device_count(), users = snap.users.count, policy = %snap.policy.version, users_policy = %snap.users.policy_version, "billing snapshot created");
        Ok(Response::new(snapshot_summary(&snap)))
    }

    async fn set_user_policy(
        &self,
        request: Request<v1::SetUserPolicyRequest>,
    ) -> Result<Response<v1::UserPolicy>, Status> {
        self.set_user_policy_impl(request).await
    }

    async fn refresh_users(
        &self,
        request: Request<v1::RefreshUsersRequest>,
    ) -> Result<Response<v1::RefreshUsersResponse>, Status> {
        self.refresh_users_impl(request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_digest_is_the_hash_of_each_message_encoded_on_its_own() {
        use prost::Message as _;
        use sha2::{Digest as _, Sha256};
        let obs = |ip: &str| v1::Observation {
            method: v1::Method::Arp as i32,
            addresses: vec![v1::IpAddress {
                address: ip.into(),
                answered: true,
                ..Default::default()
            }],
            macs: vec![vec![0, 0x16, 0x3e, 0, 0, 1]],
            ..Default::default()
        };
        let mut batch = v1::ObservationBatch {
            agent_id: "a".into(),
            sequence: 1,
            observations: vec![obs("198.18.0.1"), obs("198.18.0.2")],
            ..Default::default()
        };
        // As digests were computed before (and are stored so): replays must still match.
        let separately = |b: &v1::ObservationBatch| -> [u8; 32] {
            let mut h = Sha256::new();
            for o in &b.observations {
                h.update(o.encode_length_delimited_to_vec());
            }
            if let Some(read) = &b.directory_read {
                h.update(b"directory");
                h.update(read.encode_length_delimited_to_vec());
                for u in &b.users {
                    h.update(u.encode_length_delimited_to_vec());
                }
            }
            h.finalize().into()
        };
        assert_eq!(batch_digest(&batch), separately(&batch));
        batch.directory_read = Some(v1::DirectoryRead {
            directory: "corp.example".into(),
            ..Default::default()
        });
        batch.users = vec![v1::DirectoryUser {
            sam_account_name: "alice".into(),
            ..Default::default()
        }];
        assert_eq!(batch_digest(&batch), separately(&batch));
    }
}
