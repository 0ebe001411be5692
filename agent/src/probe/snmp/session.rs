//! The I/O half of the SNMP probe: one [`Client`] per device and credential, wrapping snmp2's
//! `AsyncSession` with what snmp2 leaves out: a timeout on every request, retries, a fresh
//! session (new socket, new request ids) after every timeout, GETBULK/GETNEXT walks that always
//! end, and v3 engine discovery over a plain socket ([`discover_engine`]).
//!
//! snmp2's sharp edges, and what this file does about them:
//! - No timeout: a request to a silent device waits forever. Every request here runs under
//!   `tokio::time::timeout`.
//! - Request ids: after an abandoned request its late reply is still queued on the socket and
//!   the next request fails with `RequestIdMismatch`. The session is dropped after a timeout
//!   (or a mismatch) and the retry runs on a new socket.
//! - `Value` borrows the session's receive buffer: responses are copied into owned
//!   [`Val`]s (capped) before the next request.
//! - SNMPv3 time sync: the first authenticated request after discovery may come back as a
//!   notInTimeWindow report, which snmp2 turns into `AuthUpdated` (or `EngineTimeMismatch`)
//!   after updating its clock: the same request is repeated on the same session, a bounded
//!   number of times.
//! - ICMP port unreachable surfaces as `Error::Receive` on the connected socket: no agent
//!   there, so the device is given up on at once instead of waiting out the retries.
//! - The session holds two 64 KiB buffers inline; it is boxed so futures stay small.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use snmp2::{AsyncSession, Oid, Value, Version, snmp, v3::Security};
use tokio::{net::UdpSocket, time::Instant};

use super::{
    tables::{self, MAX_VALUE_BYTES, Row, Val},
    usm::{self, Engine},
};

/// How many times one request is repeated on the same session to follow a v3 clock update.
const MAX_RESYNCS: u32 = 3;
/// Receive buffer for discovery reports (a report is about 100-200 bytes).
const DISCOVERY_BUF: usize = 4096;

/// Why a request or walk failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum QueryError {
    #[error("no response after {0} attempts")]
    Timeout(u32),
    #[error("unreachable (no agent on the port, or no route)")]
    Unreachable,
    #[error("opening a socket: {0}")]
    Socket(String),
    #[error("{0}")]
    Snmp(String),
    #[error("unreadable replies: {0}")]
    Unreadable(String),
    #[error("error-status {status} at varbind {index}")]
    Status { status: u32, index: u32 },
    #[error("OID did not increase ({0}): the device loops")]
    NotIncreasing(String),
    #[error("walk deadline reached")]
    Deadline,
    #[error("skipped: the device stopped answering")]
    Abandoned,
}

/// Which version and credential a client speaks.
#[derive(Clone)]
pub(crate) enum Credential {
    Community {
        version: Version,
        community: Vec<u8>,
    },
    /// A v3 user with keys localized for the device's engine.
    V3(Box<Security>),
}

impl std::fmt::Debug for Credential {
    // Never the community or the keys.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Community { version, .. } => write!(f, "Community({version})"),
            Credential::V3(_) => write!(f, "V3"),
        }
    }
}

/// Timing of every request and walk.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub timeout: Duration,
    pub retries: u32,
}

/// A response, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Response {
    pub error_status: u32,
    pub error_index: u32,
    pub varbinds: Vec<(Vec<u32>, Val)>,
}

/// One request.
#[derive(Debug, Clone, Copy)]
enum Op<'a> {
    Get(&'a [&'a [u32]]),
    GetNext(&'a [u32]),
    GetBulk(&'a [u32], u32),
}

/// What a walk read, and why it stopped early (if it did).
#[derive(Debug, Default)]
pub(crate) struct Walk {
    pub rows: Vec<Row>,
    /// The walk stopped at `max_rows` with the table not finished.
    pub truncated: bool,
    pub error: Option<QueryError>,
}

/// A device and a credential; opens a new snmp2 session whenever the last one timed out.
pub(crate) struct Client {
    addr: SocketAddr,
    credential: Credential,
    timing: Timing,
    session: Option<Box<AsyncSession>>,
    /// Set once the device stopped answering; later walks return at once.
    silent: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.addr)
            .field("credential", &self.credential)
            .finish_non_exhaustive()
    }
}

impl Client {
    pub(crate) fn new(addr: SocketAddr, credential: Credential, timing: Timing) -> Self {
        Self {
            addr,
            credential,
            timing,
            session: None,
            silent: false,
        }
    }

    pub(crate) fn version(&self) -> Version {
        match &self.credential {
            Credential::Community { version, .. } => *version,
            Credential::V3(_) => Version::V3,
        }
    }

    pub(crate) async fn get(&mut self, oids: &[&[u32]]) -> Result<Response, QueryError> {
        self.request(Op::Get(oids)).await
    }

    /// Reads every row under `root`: GETBULK (v2c, v3) or GETNEXT (v1), until the subtree
    /// ends, the agent says endOfMibView (or noSuchName in v1), an OID fails to increase,
    /// `max_rows` rows are read, or `deadline` passes. Rows read before a failure are kept.
    pub(crate) async fn walk(
        &mut self,
        root: &[u32],
        max_repetitions: u32,
        max_rows: usize,
        deadline: Instant,
    ) -> Walk {
        let mut walk = Walk::default();
        if self.silent {
            walk.error = Some(QueryError::Abandoned);
            return walk;
        }
        let bulk = self.version() != Version::V1;
        let mut repetitions = max_repetitions.max(1);
        let mut cursor = root.to_vec();
        loop {
            if walk.rows.len() >= max_rows {
                walk.truncated = true;
                break;
            }
            if Instant::now() >= deadline {
                walk.error = Some(QueryError::Deadline);
                break;
            }
            let op = if bulk {
                // Never ask for more rows than are still wanted.
                let left = u32::try_from(max_rows - walk.rows.len()).unwrap_or(u32::MAX);
                Op::GetBulk(&cursor, repetitions.min(left))
            } else {
                Op::GetNext(&cursor)
            };
            let response = match self.request(op).await {
                Ok(r) => r,
                Err(e) => {
                    walk.error = Some(e);
                    break;
                }
            };
            match response.error_status {
                snmp::ERRSTATUS_NOERROR => {}
                // v1 ends a walk with noSuchName.
                snmp::ERRSTATUS_NOSUCHNAME if !bulk => break,
                // The response would not fit the agent's buffer: ask for fewer rows.
                snmp::ERRSTATUS_TOOBIG if bulk && repetitions > 1 => {
                    repetitions /= 2;
                    continue;
                }
                status => {
                    walk.error = Some(QueryError::Status {
                        status,
                        index: response.error_index,
                    });
                    break;
                }
            }
            if step(&mut walk, root, &mut cursor, response.varbinds, max_rows) {
                break;
            }
        }
        walk
    }

    /// One request with a timeout and retries. A timeout (or a stale reply) drops the session so
    /// the retry runs on a new socket; a v3 clock update repeats the request on the same one.
    async fn request(&mut self, op: Op<'_>) -> Result<Response, QueryError> {
        if self.silent {
            return Err(QueryError::Abandoned);
        }
        let mut attempts = 0;
        let mut resyncs = 0;
        loop {
            if self.session.is_none() {
                self.session = Some(self.open().await?);
            }
            let Some(session) = self.session.as_mut() else {
                continue;
            };
            let result = tokio::time::timeout(self.timing.timeout, exchange(session, op)).await;
            match result {
                Ok(Ok(response)) => return Ok(response),
                Ok(Err(
                    snmp2::Error::AuthUpdated
                    | snmp2::Error::AuthFailure(snmp2::v3::AuthErrorKind::EngineTimeMismatch),
                )) if resyncs < MAX_RESYNCS => resyncs += 1,
                Ok(Err(snmp2::Error::Send | snmp2::Error::Receive)) => {
                    self.silent = true;
                    return Err(QueryError::Unreachable);
                }
                Ok(Err(snmp2::Error::RequestIdMismatch)) | Err(_) => {
                    self.session = None;
                    attempts += 1;
                    if attempts > self.timing.retries {
                        self.silent = true;
                        return Err(QueryError::Timeout(attempts));
                    }
                }
                // A datagram that is not a reply to this request (garbage, truncated, another
                // community or version): snmp2 reads only the first datagram, so the attempt
                // is lost; try again on a fresh session.
                Ok(Err(e)) if is_unreadable(&e) => {
                    self.session = None;
                    attempts += 1;
                    if attempts > self.timing.retries {
                        return Err(QueryError::Unreadable(e.to_string()));
                    }
                }
                Ok(Err(e)) => return Err(QueryError::Snmp(e.to_string())),
            }
        }
    }

    async fn open(&self) -> Result<Box<AsyncSession>, QueryError> {
        let req_id = start_id();
        let opened = match &self.credential {
            Credential::Community { version, community } => match version {
                Version::V1 => AsyncSession::new_v1(self.addr, community, req_id).await,
                _ => AsyncSession::new_v2c(self.addr, community, req_id).await,
            },
            // The security already knows the engine (discovered by `discover_engine`), so
            // `init()` is not called: it would rediscover, and its result cannot be read.
            Credential::V3(security) => {
                AsyncSession::new_v3(self.addr, req_id, (**security).clone()).await
            }
        };
        opened
            .map(Box::new)
            .map_err(|e| QueryError::Socket(e.to_string()))
    }
}

/// Errors that say the datagram was not a usable reply, as opposed to the agent refusing us.
fn is_unreadable(e: &snmp2::Error) -> bool {
    use snmp2::Error as E;
    matches!(
        e,
        E::AsnParse
            | E::AsnInvalidLen
            | E::AsnWrongType
            | E::AsnUnsupportedType
            | E::AsnEof
            | E::AsnIntOverflow
            | E::UnsupportedVersion
            | E::CommunityMismatch
            | E::ValueOutOfRange
            | E::BufferOverflow
    )
}

/// Takes one response's varbinds into a walk; true when the walk is over.
pub(crate) fn step(
    walk: &mut Walk,
    root: &[u32],
    cursor: &mut Vec<u32>,
    varbinds: Vec<(Vec<u32>, Val)>,
    max_rows: usize,
) -> bool {
    if varbinds.is_empty() {
        return true;
    }
    for (oid, value) in varbinds {
        if value == Val::EndOfMibView || !oid.starts_with(root) || oid.len() == root.len() {
            return true;
        }
        if oid <= *cursor {
            walk.error = Some(QueryError::NotIncreasing(tables::oid_string(&oid)));
            return true;
        }
        walk.rows.push(Row::new(&oid[root.len()..], value));
        *cursor = oid;
        if walk.rows.len() >= max_rows {
            walk.truncated = true;
            return true;
        }
    }
    false
}

/// Sends one request on `session` and copies the response out of its buffer.
async fn exchange(session: &mut AsyncSession, op: Op<'_>) -> Result<Response, snmp2::Error> {
    let pdu = match op {
        Op::Get(oids) => {
            let oids = oids
                .iter()
                .map(|o| to_oid(o))
                .collect::<Result<Vec<_>, _>>()?;
            let refs: Vec<&Oid<'_>> = oids.iter().collect();
            session.get_many(&refs).await?
        }
        Op::GetNext(oid) => session.getnext(&to_oid(oid)?).await?,
        Op::GetBulk(oid, repetitions) => session.getbulk(&[&to_oid(oid)?], 0, repetitions).await?,
    };
    Ok(owned_response(pdu))
}

/// Copies a response out of the buffer it borrows.
pub(crate) fn owned_response(pdu: snmp2::Pdu<'_>) -> Response {
    let varbinds = pdu
        .varbinds
        .map(|(oid, value)| {
            let arcs = tables::decode_oid(oid.as_bytes()).unwrap_or_default();
            (arcs, own(&value))
        })
        .collect();
    Response {
        error_status: pdu.error_status,
        error_index: pdu.error_index,
        varbinds,
    }
}

fn to_oid(arcs: &[u32]) -> Result<Oid<'static>, snmp2::Error> {
    let arcs: Vec<u64> = arcs.iter().map(|a| u64::from(*a)).collect();
    Oid::from(&arcs).map_err(|_| snmp2::Error::ValueOutOfRange)
}

/// Copies a borrowed snmp2 value, capping octet strings at [`MAX_VALUE_BYTES`].
fn own(value: &Value<'_>) -> Val {
    match value {
        Value::Integer(n) => Val::Int(*n),
        Value::OctetString(b) | Value::Opaque(b) => {
            Val::Bytes(b[..b.len().min(MAX_VALUE_BYTES)].to_vec())
        }
        Value::ObjectIdentifier(oid) => {
            tables::decode_oid(oid.as_bytes()).map_or(Val::Other, Val::Oid)
        }
        Value::IpAddress(a) => Val::Ip(*a),
        Value::Counter32(n) | Value::Unsigned32(n) | Value::Timeticks(n) => {
            Val::Unsigned(u64::from(*n))
        }
        Value::Counter64(n) => Val::Unsigned(*n),
        Value::Null => Val::Null,
        Value::NoSuchObject => Val::NoSuchObject,
        Value::NoSuchInstance => Val::NoSuchInstance,
        Value::EndOfMibView => Val::EndOfMibView,
        _ => Val::Other,
    }
}

/// A random first request id, so a new session never reuses the ids of the one before.
pub(crate) fn start_id() -> i32 {
    rand::random::<i32>() & 0x3fff_ffff
}

/// Asks `ip` for its SNMPv3 engine (RFC 3414 §4 discovery): no credential needed. Retries like
/// any request, each attempt on a new socket; ignores datagrams that are not a report naming an
/// engine. `Err(Unreachable)` when the port is closed (ICMP port unreachable).
pub(crate) async fn discover_engine(
    ip: Ipv4Addr,
    port: u16,
    timing: Timing,
) -> Result<Engine, QueryError> {
    let addr = SocketAddr::from((ip, port));
    let mut buf = vec![0u8; DISCOVERY_BUF];
    for _ in 0..=timing.retries {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
            .await
            .map_err(|e| QueryError::Socket(e.to_string()))?;
        socket
            .connect(addr)
            .await
            .map_err(|e| QueryError::Socket(e.to_string()))?;
        if socket
            .send(&usm::discovery_request(start_id()))
            .await
            .is_err()
        {
            return Err(QueryError::Unreachable);
        }
        let deadline = Instant::now() + timing.timeout;
        loop {
            match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
                Err(_) => break,
                Ok(Err(_)) => return Err(QueryError::Unreachable),
                Ok(Ok(n)) => {
                    if let Some(engine) = buf.get(..n).and_then(usm::read_discovery_report) {
                        return Ok(engine);
                    }
                }
            }
        }
    }
    Err(QueryError::Timeout(timing.retries + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walk_of(root: &[u32], batches: Vec<Vec<(Vec<u32>, Val)>>, max_rows: usize) -> Walk {
        let mut walk = Walk::default();
        let mut cursor = root.to_vec();
        for batch in batches {
            if step(&mut walk, root, &mut cursor, batch, max_rows) {
                break;
            }
        }
        walk
    }

    fn oid(tail: &[u32]) -> Vec<u32> {
        [&[1, 3, 6, 1, 2, 1, 2, 2, 1, 6][..], tail].concat()
    }

    #[test]
    fn walks_stop_at_the_end_of_the_subtree() {
        let root = oid(&[]);
        let w = walk_of(
            &root,
            vec![vec![
                (oid(&[1]), Val::Int(1)),
                (oid(&[2]), Val::Int(2)),
                (vec![1, 3, 6, 1, 2, 1, 2, 2, 1, 7, 1], Val::Int(3)),
                (oid(&[3]), Val::Int(4)),
            ]],
            100,
        );
        assert_eq!(w.rows.len(), 2);
        assert_eq!(w.rows[1].index, vec![2]);
        assert!(w.error.is_none() && !w.truncated);
    }

    #[test]
    fn walks_stop_at_end_of_mib_view_and_on_loops() {
        let root = oid(&[]);
        let w = walk_of(
            &root,
            vec![vec![
                (oid(&[1]), Val::Int(1)),
                (oid(&[2]), Val::EndOfMibView),
            ]],
            100,
        );
        assert_eq!(w.rows.len(), 1);
        assert!(w.error.is_none());

        // An agent that answers the same OID again (or an earlier one) is a loop.
        let w = walk_of(
            &root,
            vec![
                vec![(oid(&[5]), Val::Int(1))],
                vec![(oid(&[5]), Val::Int(1))],
                vec![(oid(&[6]), Val::Int(1))],
            ],
            100,
        );
        assert_eq!(w.rows.len(), 1);
        assert!(matches!(w.error, Some(QueryError::NotIncreasing(_))));
        let w = walk_of(
            &root,
            vec![vec![(oid(&[5, 1]), Val::Int(1)), (oid(&[5]), Val::Int(1))]],
            100,
        );
        assert!(matches!(w.error, Some(QueryError::NotIncreasing(_))));

        // The root itself, a malformed (empty) OID, and an empty response all end the walk.
        for batch in [
            vec![(root.clone(), Val::Int(1))],
            vec![(vec![], Val::Int(1))],
            vec![],
        ] {
            let w = walk_of(&root, vec![batch, vec![(oid(&[9]), Val::Int(1))]], 100);
            assert!(w.rows.is_empty());
        }
    }

    #[test]
    fn walks_stop_at_max_rows() {
        let root = oid(&[]);
        let batch: Vec<_> = (1..=10).map(|i| (oid(&[i]), Val::Int(1))).collect();
        let w = walk_of(&root, vec![batch], 4);
        assert_eq!(w.rows.len(), 4);
        assert!(w.truncated);
    }

    #[test]
    fn values_are_copied_and_capped() {
        let big = vec![b'a'; 5000];
        assert_eq!(
            own(&Value::OctetString(&big)),
            Val::Bytes(vec![b'a'; MAX_VALUE_BYTES])
        );
        assert_eq!(own(&Value::Timeticks(5)), Val::Unsigned(5));
        assert_eq!(own(&Value::Counter64(u64::MAX)), Val::Unsigned(u64::MAX));
        assert_eq!(own(&Value::Boolean(true)), Val::Other);
        let o = Oid::from(&[1, 3, 6, 1]).expect("valid");
        assert_eq!(own(&Value::ObjectIdentifier(o)), Val::Oid(vec![1, 3, 6, 1]));
        assert_eq!(
            to_oid(&[1, 0, 8802, 1]).map(|o| o.as_bytes().to_vec()),
            Ok(vec![0x28, 0xc4, 0x62, 1])
        );
        assert!(to_oid(&[9, 1]).is_err());
    }

    #[test]
    fn errors_say_what_happened_without_secrets() {
        let c = Credential::Community {
            version: Version::V2C,
            community: b"s3cret".to_vec(),
        };
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
