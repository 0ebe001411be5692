//! From sweep results to acknowledged batches: building observations, numbering batches, and
//! delivering them over the collector's ingest stream until every one is acknowledged.
//!
//! A batch is named by (agent id, epoch, sequence). The agent keeps them in its state directory
//! so a restarted agent never reuses a sequence number (the collector would take the new batch for
//! a replay of the old one and drop it). Batches wait in the queue (`queue.rs`, which owns the
//! [`AgentState`]) until [`deliver`] has them acknowledged.

use std::{
    collections::BTreeSet,
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use census_proto::{
    convert,
    transport::{self, Authenticate, Credentials, error_chain},
    v1::{self, ingest_service_client::IngestServiceClient},
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt as _, wrappers::ReceiverStream};
use tonic::{Code, Request, transport::Channel};
use tracing::debug;

/// Observations per batch: well under the collector's default limit of 10,000 and its 4 MiB
/// message cap even when every observation carries SNMP and mDNS identity.
pub const BATCH_SIZE: usize = 500;

/// Builds the observation for one ARP answer.
pub fn arp_observation(
    ip: std::net::Ipv4Addr,
    mac: [u8; 6],
    interface: &str,
    at: SystemTime,
) -> v1::Observation {
    v1::Observation {
        observed_at: Some(convert::timestamp(at)),
        method: v1::Method::Arp as i32,
        addresses: vec![v1::IpAddress {
            address: ip.to_string(),
            answered: true,
            method: v1::Method::Arp as i32,
        }],
        macs: vec![mac.to_vec()],
        interface: interface.to_owned(),
        ..Default::default()
    }
}

// === impl AgentState ===

/// A new sequence epoch: random (so two copies of one state, or a state made again, almost
/// surely never pick the same one), never 0 (the epoch of states older than epochs) nor
/// `old`.
fn new_epoch(old: u64) -> u64 {
    let e = rand::random::<u64>().max(1);
    if e == old { e % (u64::MAX - 1) + 1 } else { e }
}

/// The agent's identity and next batch sequence number, kept in `<state dir>/agent.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentState {
    /// The id batches carry: the one the agent's certificate names, once enrolled (see
    /// [`AgentState::adopt`]; the collector refuses batches naming another agent).
    pub agent_id: String,
    /// The sequence epoch: a new one starts the sequences again under the same id, when the
    /// collector already holds other batches under ours (see [`AgentState::rotate`]). A new
    /// state starts in an epoch of its own, so a state directory wiped and used again with the
    /// same certificate does not collide with what it sent before. Absent in states written
    /// before epochs: epoch 0.
    #[serde(default)]
    pub epoch: u64,
    pub next_sequence: u64,
    /// The directory (AD domain) the last complete directory read named: the collector keeps a
    /// directory's users under this name, so a failed read, which may not get far enough to
    /// learn it, reports under it too, also after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<String>,
    #[serde(skip)]
    path: Option<PathBuf>,
}

impl AgentState {
    /// Loads the state from `dir`, or makes a new identity (saved there when `dir` is given).
    pub fn load_or_create(dir: Option<&Path>) -> io::Result<Self> {
        let Some(dir) = dir else {
            return Ok(AgentState {
                agent_id: uuid::Uuid::new_v4().to_string(),
                epoch: new_epoch(0),
                next_sequence: 1,
                directory: None,
                path: None,
            });
        };
        let path = dir.join("agent.json");
        match fs::read_to_string(&path) {
            Ok(text) => {
                let mut state: AgentState = serde_json::from_str(&text).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{} is corrupt ({e}); move it aside to start as a new agent",
                            path.display()
                        ),
                    )
                })?;
                state.next_sequence = state.next_sequence.max(1);
                state.path = Some(path);
                Ok(state)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let state = AgentState {
                    agent_id: uuid::Uuid::new_v4().to_string(),
                    epoch: new_epoch(0),
                    next_sequence: 1,
                    directory: None,
                    path: Some(path),
                };
                state.save()?;
                Ok(state)
            }
            Err(e) => Err(e),
        }
    }

    /// Starts a new sequence epoch (sequences from 1, the same agent id) and renumbers
    /// `batches` in it, for when the collector says our sequence numbers were already used
    /// (our state was restored from a backup, or copied).
    pub fn rotate(
        &mut self,
        batches: Vec<v1::ObservationBatch>,
    ) -> io::Result<Vec<v1::ObservationBatch>> {
        self.epoch = new_epoch(self.epoch);
        self.next_sequence = 1;
        self.renumber(batches)
    }

    /// Reserves sequences for `batches` (saved first) and gives them this state's id, epoch
    /// and those sequences, in order.
    pub fn renumber(
        &mut self,
        batches: Vec<v1::ObservationBatch>,
    ) -> io::Result<Vec<v1::ObservationBatch>> {
        let first = self.reserve(batches.len() as u64)?;
        Ok(batches
            .into_iter()
            .zip(first..)
            .map(|(mut b, sequence)| {
                b.agent_id.clone_from(&self.agent_id);
                b.epoch = self.epoch;
                b.sequence = sequence;
                b
            })
            .collect())
    }

    /// Takes `agent_id` as this agent's id, keeping the epoch and the sequence counter (so no
    /// sequence is handed out twice): for enrollment, when the collector bound the certificate
    /// to another id than the one proposed, and at start, from the certificate.
    pub fn adopt(&mut self, agent_id: &str) -> io::Result<()> {
        self.agent_id = agent_id.to_owned();
        self.save()
    }

    /// Remembers the directory a complete read named (saved when it changed).
    pub fn set_directory(&mut self, directory: &str) -> io::Result<()> {
        if self.directory.as_deref() == Some(directory) {
            return Ok(());
        }
        self.directory = Some(directory.to_owned());
        self.save()
    }

    /// Reserves `n` sequence numbers, saved before any is used.
    pub fn reserve(&mut self, n: u64) -> io::Result<u64> {
        let first = self.next_sequence;
        self.next_sequence = first.saturating_add(n);
        self.save()?;
        Ok(first)
    }

    fn save(&self) -> io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let tmp = path.with_extension("json.tmp");
        {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(
                serde_json::to_string_pretty(self)
                    .map_err(io::Error::other)?
                    .as_bytes(),
            )?;
            f.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        // The rename is durable only once the directory is.
        #[cfg(unix)]
        if let Some(dir) = path.parent() {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// Splits observations into numbered batches starting at `first_sequence`.
pub fn into_batches(
    agent_id: &str,
    first_sequence: u64,
    observations: Vec<v1::Observation>,
) -> Vec<v1::ObservationBatch> {
    let now = Some(convert::timestamp(SystemTime::now()));
    let mut out = Vec::new();
    let mut iter = observations.into_iter().peekable();
    let mut seq = first_sequence;
    while iter.peek().is_some() {
        out.push(v1::ObservationBatch {
            agent_id: agent_id.to_owned(),
            sequence: seq,
            observations: iter.by_ref().take(BATCH_SIZE).collect(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            sent_at: now,
            ..Default::default()
        });
        seq += 1;
    }
    out
}

/// How many batches [`into_batches`] makes of `n` observations.
pub fn batch_count(n: usize) -> u64 {
    n.div_ceil(BATCH_SIZE) as u64
}

/// One batch per part of a directory read (see `directory::to_batches_parts`), numbered from
/// `first_sequence`: no observations, the part's users and its `DirectoryRead`. A failed read
/// is one part with `error` set and no users, and so one batch.
pub fn directory_batches(
    agent_id: &str,
    first_sequence: u64,
    parts: Vec<(v1::DirectoryRead, Vec<v1::DirectoryUser>)>,
) -> Vec<v1::ObservationBatch> {
    let now = Some(convert::timestamp(SystemTime::now()));
    parts
        .into_iter()
        .zip(first_sequence..)
        .map(|((read, users), sequence)| v1::ObservationBatch {
            agent_id: agent_id.to_owned(),
            sequence,
            observations: Vec::new(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            sent_at: now,
            users,
            directory_read: Some(read),
            backlog: 0,
            // Set by the queue, which owns the epoch.
            epoch: 0,
        })
        .collect()
}

// === delivery ===

/// Why batches were not all acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("cannot reach the collector at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error(
        "the collector refused this agent's certificate: {0} (the agent may have been revoked \
         with `census agents revoke`, or its certificate expired: enroll it again with a new \
         token: census-agent enroll --force --token-file FILE)"
    )]
    Refused(String),
    #[error("the collector rejected a batch: {0}")]
    Rejected(String),
    #[error("delivery interrupted: {0}")]
    Interrupted(String),
    #[error("the collector already holds other batches under this agent's sequence numbers: {0}")]
    Conflict(String),
}

impl DeliveryError {
    /// Whether trying again later can help.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            DeliveryError::Unreachable { .. } | DeliveryError::Interrupted(_)
        )
    }
}

/// What a delivery achieved.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delivered {
    pub stored: u64,
    pub duplicates: u64,
    pub observations: u64,
    pub rejected_observations: u64,
}

/// Connects to the collector with the agent's certificate (mutual TLS for `https://`; the
/// development-mode metadata for `http://`, see [`transport::Authenticate`]), failing within
/// `timeout`.
pub async fn connect(
    url: &str,
    creds: &Credentials,
    timeout: Duration,
) -> Result<Channel, DeliveryError> {
    let unreachable = |reason: String| DeliveryError::Unreachable {
        url: url.to_owned(),
        reason,
    };
    let endpoint = transport::endpoint(url, None, Some(creds), timeout)
        .map_err(|e| unreachable(error_chain(&e)))?;
    endpoint
        .connect()
        .await
        .map_err(|e| unreachable(error_chain(&e)))
}

/// Sends `batches` on one ingest stream and waits until each is acknowledged, or until the
/// stream fails. `backlog` is the batches queued when the window was sent, the window (the
/// queue's front) included; each batch carries how many of them wait behind it. Returns
/// the sequences acknowledged in either case, so a caller resends only the rest.
pub async fn deliver(
    channel: Channel,
    url: &str,
    auth: &Authenticate,
    batches: &[v1::ObservationBatch],
    backlog: u64,
    ack_timeout: Duration,
) -> (BTreeSet<u64>, Delivered, Result<(), DeliveryError>) {
    let mut acked = BTreeSet::new();
    let mut report = Delivered::default();
    if batches.is_empty() {
        return (acked, report, Ok(()));
    }
    let result = deliver_inner(
        channel,
        url,
        auth,
        batches,
        backlog,
        ack_timeout,
        &mut acked,
        &mut report,
    )
    .await;
    (acked, report, result)
}

#[allow(clippy::too_many_arguments)]
async fn deliver_inner(
    channel: Channel,
    url: &str,
    auth: &Authenticate,
    batches: &[v1::ObservationBatch],
    backlog: u64,
    ack_timeout: Duration,
    acked: &mut BTreeSet<u64>,
    report: &mut Delivered,
) -> Result<(), DeliveryError> {
    let mut client = IngestServiceClient::new(channel).max_encoding_message_size(4 * 1024 * 1024);
    let (tx, rx) = mpsc::channel::<v1::ObservationBatch>(8);
    let mut request = Request::new(ReceiverStream::new(rx));
    auth.apply(&mut request);
    // `sent_at` is the moment of sending, so the collector can correct a wrong agent clock;
    // Each batch's `backlog` is what waits in the queue behind it, for `census agents`: 0 on
    // the last one of an agent that is caught up.
    let sent_at = Some(convert::timestamp(SystemTime::now()));
    let to_send: Vec<v1::ObservationBatch> = batches
        .iter()
        .zip(1u64..)
        .map(|(b, n)| v1::ObservationBatch {
            sent_at,
            backlog: backlog.saturating_sub(n),
            ..b.clone()
        })
        .collect();
    let sender = tokio::spawn(async move {
        for b in to_send {
            if tx.send(b).await.is_err() {
                break;
            }
        }
        // Keep the request stream open until the acks are in: dropping `tx` here would end
        // the stream, which is fine for the collector, so just return.
    });
    let status_error = |s: tonic::Status| match s.code() {
        Code::Unauthenticated | Code::PermissionDenied => {
            DeliveryError::Refused(s.message().to_owned())
        }
        Code::InvalidArgument | Code::ResourceExhausted | Code::OutOfRange => {
            DeliveryError::Rejected(s.message().to_owned())
        }
        // The collector's answer to a sequence number it holds with other content.
        Code::FailedPrecondition => DeliveryError::Conflict(s.message().to_owned()),
        Code::Unavailable => DeliveryError::Unreachable {
            url: url.to_owned(),
            reason: format!(
                "{}{}",
                s.message(),
                std::error::Error::source(&s)
                    .map(|e| format!(": {}", error_chain(e)))
                    .unwrap_or_default()
            ),
        },
        _ => DeliveryError::Interrupted(format!("{:?}: {}", s.code(), s.message())),
    };
    let mut acks = client
        .report(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let wanted: BTreeSet<u64> = batches.iter().map(|b| b.sequence).collect();
    while acked.len() < wanted.len() {
        let next = tokio::time::timeout(ack_timeout, acks.next())
            .await
            .map_err(|_| {
                DeliveryError::Interrupted(format!("no acknowledgement within {ack_timeout:?}"))
            })?;
        match next {
            None => {
                return Err(DeliveryError::Interrupted(
                    "the collector closed the stream".into(),
                ));
            }
            Some(Err(s)) => return Err(status_error(s)),
            Some(Ok(ack)) => {
                if !wanted.contains(&ack.sequence) || !acked.insert(ack.sequence) {
                    continue;
                }
                match v1::AckStatus::try_from(ack.status) {
                    Ok(v1::AckStatus::Duplicate) => report.duplicates += 1,
                    _ => report.stored += 1,
                }
                report.observations += u64::from(ack.observations);
                report.rejected_observations += u64::from(ack.rejected);
                debug!(
                    sequence = ack.sequence,
                    status = ack.status,
                    "batch acknowledged"
                );
            }
        }
    }
    sender.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_numbered_and_sized() {
        let obs: Vec<_> = (0..1201u32)
            .map(|i| {
                arp_observation(
                    std::net::Ipv4Addr::from(0xc612_0000 + i),
                    [0, 0x16, 0x3e, 0, 0, 1],
                    "eth0",
                    SystemTime::now(),
                )
            })
            .collect();
        let batches = into_batches("a", 7, obs);
        assert_eq!(batches.len() as u64, batch_count(1201));
        assert_eq!(
            batches.iter().map(|b| b.sequence).collect::<Vec<_>>(),
            [7, 8, 9]
        );
        assert_eq!(batches[2].observations.len(), 201);
    }

    /// A read of [`crate::directory::DEFAULT_USERS_PER_BATCH`] users with every field at the
    /// reader's caps (255-byte strings, `MAX_MEMBER_OF` memberOf DNs) is split so that every
    /// batch stays well inside the 4 MiB a gRPC message may have (the collector's
    /// `max_message_bytes` default and our encoder's limit).
    #[test]
    fn a_batch_of_the_largest_users_fits_a_message() {
        use prost::Message as _;
        let text = "x".repeat(crate::directory::convert::MAX_TEXT_BYTES);
        let ts = Some(convert::timestamp(SystemTime::now()));
        let user = v1::DirectoryUser {
            object_guid: vec![0xff; 16],
            object_sid: format!("S-1-5-21-{}", "4294967295-".repeat(14)),
            sam_account_name: text.clone(),
            user_principal_name: text.clone(),
            display_name: text.clone(),
            distinguished_name: text.clone(),
            sam_account_type: u32::MAX,
            user_account_control: u32::MAX,
            account_expires: ts,
            last_logon: ts,
            critical_system_object: true,
            has_service_principal_name: true,
            member_of: vec![text.clone(); crate::directory::entry::MAX_MEMBER_OF],
            is_computer: true,
            when_created: ts,
        };
        let read = v1::DirectoryRead {
            directory: text.clone(),
            read_id: uuid::Uuid::new_v4().to_string(),
            part: u32::MAX,
            parts: u32::MAX,
            read_at: ts,
            error: text,
        };
        let users = vec![user; crate::directory::DEFAULT_USERS_PER_BATCH];
        let parts = crate::directory::to_batches_parts(
            &read,
            users,
            crate::directory::DEFAULT_USERS_PER_BATCH,
            crate::directory::MAX_BATCH_USER_BYTES,
        );
        assert!(parts.len() > 1, "{} parts", parts.len());
        let batches = directory_batches(&"a".repeat(128), 0, parts);
        for batch in &batches {
            let len = batch.encoded_len();
            assert!(len < 2 * 1024 * 1024, "{len} bytes");
        }
    }

    #[test]
    fn rotation_renumbers_in_a_new_epoch_under_the_same_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = AgentState::load_or_create(Some(dir.path())).expect("create");
        s.reserve(10).expect("reserve");
        let (id, old) = (s.agent_id.clone(), s.epoch);
        let obs = vec![arp_observation(
            std::net::Ipv4Addr::new(198, 18, 0, 1),
            [0, 0x16, 0x3e, 0, 0, 1],
            "eth0",
            SystemTime::now(),
        )];
        let batches = into_batches(&id, 9, obs);
        let moved = s.rotate(batches).expect("rotate");
        assert_eq!(s.agent_id, id, "the id is the certificate's: it stays");
        assert_ne!(s.epoch, old);
        assert_eq!(
            (
                moved[0].agent_id.as_str(),
                moved[0].epoch,
                moved[0].sequence
            ),
            (id.as_str(), s.epoch, 1)
        );
        let reloaded = AgentState::load_or_create(Some(dir.path())).expect("load");
        assert_eq!(
            (reloaded.agent_id, reloaded.epoch, reloaded.next_sequence),
            (id, s.epoch, 2)
        );
    }

    #[test]
    fn state_survives_restart_and_never_reuses_a_sequence() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = AgentState::load_or_create(Some(dir.path())).expect("create");
        assert_eq!(a.reserve(3).expect("reserve"), 1);
        let mut b = AgentState::load_or_create(Some(dir.path())).expect("load");
        assert_eq!(a.agent_id, b.agent_id);
        assert_eq!(b.reserve(1).expect("reserve"), 4);
        assert_eq!(b.directory, None);
        b.set_directory("lab.census.test").expect("save");
        let c = AgentState::load_or_create(Some(dir.path())).expect("load");
        assert_eq!(c.directory.as_deref(), Some("lab.census.test"));
        assert_eq!(c.next_sequence, 5, "{c:?}");
        // A state written before the directory was remembered still loads.
        fs::write(
            dir.path().join("agent.json"),
            r#"{"agent_id": "a", "next_sequence": 9}"#,
        )
        .expect("write");
        let old = AgentState::load_or_create(Some(dir.path())).expect("an older state");
        assert_eq!((old.directory, old.next_sequence), (None, 9));
        fs::write(dir.path().join("agent.json"), "{").expect("write");
        let err = AgentState::load_or_create(Some(dir.path())).expect_err("corrupt");
        assert!(err.to_string().contains("move it aside"), "{err}");
    }
}
