//! ICMP echo sweep of routed addresses (on-link addresses are ARP's job): owns the sweep
//! loop (rounds with retries for silent targets, pacing, bounded concurrency, cancellation),
//! the check that an answer really is an echo reply from the target, and the surge-ping
//! socket behind the [`Echoer`] seam.
//!
//! Layout:
//! - `icmp.rs` (this file): the public API, validation, the sweep loop, the surge-ping echoer.
//! - `icmp/rounds.rs`: which target is asked in which round; request identifiers.
//! - `icmp/pace.rs`: the send pacer.
//! - `icmp/windows.rs`: the echoer on Windows (`IcmpSendEcho2`; no raw socket, no driver).
//!
//! surge-ping's sharp edges, and what this module does about them:
//! - `Pinger::ping` returns `Ok` for any ICMP packet matched to the request, including an
//!   ICMP error (host unreachable, time exceeded) sent by a router *about* the target: a
//!   reply counts only if it is an echo reply and its source is the target.
//! - One `Client` is one socket with one receive task; every `Pinger` shares it and replies
//!   are routed by `(address, identifier, sequence)`. A second request with the same triple
//!   fails, so every target gets its own identifier and every round its own sequence number
//!   (see `rounds.rs`), from random bases so other pingers on the host never collide.
//! - `Client::new` tries an unprivileged Linux ping socket (DGRAM) first and falls back to a
//!   raw socket; on a DGRAM socket the kernel picks the identifier, on a raw one we do.
//! - Its receive task unwraps `local_addr()` on every packet, which fails on an unbound
//!   Windows socket: the socket is bound to 0.0.0.0 explicitly.
//! - Its permission error is several lines long: it is replaced by one line saying how to fix.

mod pace;
mod rounds;
#[cfg(windows)]
mod windows;

use std::{
    collections::BTreeMap,
    future::Future,
    io,
    net::Ipv4Addr,
    time::{Duration, Instant, SystemTime},
};

use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, instrument, warn};

use self::{
    pace::Pacer,
    rounds::{Mark, RequestIds, Rounds},
};

/// The most unique targets one sweep accepts (a /16); duplicates are dropped first.
pub const MAX_TARGETS: usize = 65_536;
/// The most extra attempts per silent target.
pub const MAX_RETRIES: u32 = 10;
/// The longest per-request timeout.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// ICMP type of an echo reply.
const ECHO_REPLY: u8 = 0;
/// The echo payload: small, and recognisable in a capture.
const PAYLOAD: [u8; 16] = *b"census-agent-v1\0";
/// Time a request may take beyond its reply timeout (to get the request onto the wire)
/// before the sweep gives up on it: bounds every request in time.
const SEND_GRACE: Duration = Duration::from_secs(1);

/// Tuning for one ICMP sweep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IcmpConfig {
    /// Echo requests per second, across all targets.
    pub rate_pps: u32,
    /// Requests in flight at once. With every target silent, each request holds its slot
    /// for `timeout`, so the rate cannot exceed `concurrency / timeout`.
    pub concurrency: usize,
    /// How long to wait for each reply.
    pub timeout: Duration,
    /// Extra attempts for targets that stayed silent.
    pub retries: u32,
}

impl Default for IcmpConfig {
    fn default() -> Self {
        IcmpConfig {
            rate_pps: 1000,
            concurrency: 1024,
            timeout: Duration::from_secs(1),
            retries: 1,
        }
    }
}

/// One address that answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IcmpReply {
    pub ip: Ipv4Addr,
    pub rtt: Duration,
    pub at: SystemTime,
}

/// What one ICMP sweep found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IcmpSweepResult {
    /// Unique targets sent at least one request (all of them unless cancelled).
    pub probed: usize,
    /// Echo requests handed to the socket, retries included.
    pub requests_sent: u64,
    /// One per answering address, sorted by address.
    pub replies: Vec<IcmpReply>,
    pub cancelled: bool,
    /// ICMP errors (host unreachable, time exceeded...) received about targets: the target
    /// counts as silent.
    pub errors_received: u64,
    /// Requests the socket refused to send (e.g. no route); the target counts as silent.
    pub send_failures: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum IcmpError {
    #[error(
        "ICMP echo needs a raw or ping socket: run as root (Administrator on Windows), grant \
         CAP_NET_RAW (setcap cap_net_raw+ep census-agent, or AmbientCapabilities=CAP_NET_RAW \
         in the systemd unit), or allow ping sockets (sysctl net.ipv4.ping_group_range)"
    )]
    PermissionDenied(#[source] std::io::Error),
    #[error("cannot open an ICMP socket: {0}")]
    Socket(std::io::Error),
    #[error("invalid ICMP sweep configuration: {0}")]
    InvalidConfig(&'static str),
    #[error("refusing to ICMP sweep {count} targets in one call (the limit is {max})")]
    TooManyTargets { count: usize, max: usize },
}

/// Pings every target (at most `cfg.concurrency` in flight, paced at `cfg.rate_pps`), retrying
/// silent ones, and returns who answered. Ends promptly on `cancel`, with what it had.
#[instrument(
    name = "icmp_sweep",
    skip_all,
    fields(
        targets = targets.len(),
        rate_pps = cfg.rate_pps,
        concurrency = cfg.concurrency,
        timeout_ms = cfg.timeout.as_millis() as u64,
        retries = cfg.retries,
    )
)]
pub async fn sweep(
    targets: &[Ipv4Addr],
    cfg: &IcmpConfig,
    cancel: &CancellationToken,
) -> Result<IcmpSweepResult, IcmpError> {
    validate(cfg)?;
    let plan = Rounds::new(targets, cfg.retries);
    if plan.len() > MAX_TARGETS {
        return Err(IcmpError::TooManyTargets {
            count: plan.len(),
            max: MAX_TARGETS,
        });
    }
    if plan.len() == 0 || cancel.is_cancelled() {
        // Nothing to ask: no socket, so no privileges needed.
        return Ok(IcmpSweepResult {
            cancelled: cancel.is_cancelled(),
            ..IcmpSweepResult::default()
        });
    }
    #[cfg(not(windows))]
    let echoer = SurgeEchoer::open()?;
    // Each request holds a blocking thread on Windows: fewer in flight.
    #[cfg(windows)]
    let (echoer, cfg) = (windows::IcmpApiEchoer, &windows::bounded(cfg));
    Ok(run(&echoer, plan, cfg, RequestIds::random(), cancel).await)
}

fn validate(cfg: &IcmpConfig) -> Result<(), IcmpError> {
    if cfg.rate_pps == 0 {
        return Err(IcmpError::InvalidConfig("rate_pps must be at least 1"));
    }
    if cfg.concurrency == 0 {
        return Err(IcmpError::InvalidConfig("concurrency must be at least 1"));
    }
    if cfg.timeout.is_zero() || cfg.timeout > MAX_TIMEOUT {
        return Err(IcmpError::InvalidConfig(
            "timeout must be more than 0 and at most 60 s",
        ));
    }
    if cfg.retries > MAX_RETRIES {
        return Err(IcmpError::InvalidConfig("retries must be at most 10"));
    }
    Ok(())
}

// === the echo seam ===

/// What came back for one echo request.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// An ICMP packet the socket layer matched to the request: not yet trusted.
    Packet {
        source: Ipv4Addr,
        icmp_type: u8,
        rtt: Duration,
    },
    /// Nothing within the timeout.
    Timeout,
    /// The request could not be sent.
    SendFailed(io::ErrorKind),
    /// Anything else the socket layer reported.
    Failed(String),
}

/// Sends one echo request and waits for what comes back: the socket behind a trait, so the
/// sweep loop is tested without privileges.
trait Echoer {
    fn echo(
        &self,
        target: Ipv4Addr,
        ident: u16,
        seq: u16,
        timeout: Duration,
    ) -> impl Future<Output = Answer> + Send + 'static;
}

/// The real echoer on Unix: one surge-ping `Client` (one socket) shared by every request.
#[cfg(not(windows))]
struct SurgeEchoer {
    client: surge_ping::Client,
}

#[cfg(not(windows))]
impl SurgeEchoer {
    fn open() -> Result<Self, IcmpError> {
        use std::net::SocketAddr;

        // A Linux ping socket (DGRAM) where `net.ipv4.ping_group_range` allows one, else raw.
        let config = surge_ping::Config::builder()
            .kind(surge_ping::ICMP::V4)
            .bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
            .build();
        let client = surge_ping::Client::new(&config).map_err(open_error)?;
        let echoer = SurgeEchoer { client };
        debug!(socket = %echoer.socket_type(), "ICMP socket open");
        Ok(echoer)
    }

    /// `SOCK_DGRAM` (a Linux ping socket) or `SOCK_RAW`.
    fn socket_type(&self) -> String {
        format!("{:?}", self.client.get_socket().get_type())
    }
}

/// Maps a socket error to ours, keeping the permission error to one line.
#[cfg(not(windows))]
fn open_error(e: io::Error) -> IcmpError {
    if e.kind() == io::ErrorKind::PermissionDenied {
        let source = e.raw_os_error().map_or_else(
            || io::Error::from(io::ErrorKind::PermissionDenied),
            io::Error::from_raw_os_error,
        );
        IcmpError::PermissionDenied(source)
    } else {
        IcmpError::Socket(e)
    }
}

#[cfg(not(windows))]
impl Echoer for SurgeEchoer {
    fn echo(
        &self,
        target: Ipv4Addr,
        ident: u16,
        seq: u16,
        timeout: Duration,
    ) -> impl Future<Output = Answer> + Send + 'static {
        let client = self.client.clone();
        async move {
            let mut pinger = client
                .pinger(
                    std::net::IpAddr::V4(target),
                    surge_ping::PingIdentifier(ident),
                )
                .await;
            pinger.timeout(timeout);
            match pinger.ping(surge_ping::PingSequence(seq), &PAYLOAD).await {
                Ok((surge_ping::IcmpPacket::V4(p), rtt)) => Answer::Packet {
                    source: p.get_source(),
                    icmp_type: p.get_icmp_type().0,
                    rtt,
                },
                Ok((surge_ping::IcmpPacket::V6(_), _)) => {
                    Answer::Failed("an ICMPv6 packet on an ICMPv4 socket".into())
                }
                Err(surge_ping::SurgeError::Timeout { .. }) => Answer::Timeout,
                Err(surge_ping::SurgeError::IOError(e)) => Answer::SendFailed(e.kind()),
                Err(e) => Answer::Failed(e.to_string()),
            }
        }
    }
}

// === the sweep loop ===

/// One finished request.
#[derive(Debug)]
struct Outcome {
    target: Ipv4Addr,
    answer: Answer,
    at: SystemTime,
}

/// What the sweep has learned so far.
#[derive(Debug)]
struct Tally {
    plan: Rounds,
    replies: BTreeMap<Ipv4Addr, IcmpReply>,
    probed: usize,
    spawned: u64,
    send_failures: u64,
    errors_received: u64,
    /// Echo replies matched to a request but sent by another address.
    foreign: u64,
    duplicates: u64,
    failures: u64,
}

impl Tally {
    fn record(&mut self, joined: Result<Outcome, JoinError>) {
        let Outcome { target, answer, at } = match joined {
            Ok(o) => o,
            // Aborted on cancellation: nothing learned.
            Err(e) if e.is_cancelled() => return,
            Err(e) => {
                // Only surge-ping runs in the task; a panic there must not end the sweep.
                warn!(error = %e, "an ICMP request task failed");
                self.failures += 1;
                return;
            }
        };
        match answer {
            Answer::Packet {
                source,
                icmp_type: ECHO_REPLY,
                rtt,
            } if source == target => match self.plan.mark_answered(target) {
                Mark::New => {
                    self.replies.insert(
                        target,
                        IcmpReply {
                            ip: target,
                            rtt,
                            at,
                        },
                    );
                }
                Mark::Duplicate => self.duplicates += 1,
                Mark::NotATarget => self.foreign += 1,
            },
            Answer::Packet {
                source,
                icmp_type: ECHO_REPLY,
                ..
            } => {
                debug!(%target, %source, "ignoring an echo reply from another address");
                self.foreign += 1;
            }
            Answer::Packet {
                source, icmp_type, ..
            } => {
                debug!(%target, %source, icmp_type, "ICMP error about a target");
                self.errors_received += 1;
            }
            Answer::Timeout => {}
            Answer::SendFailed(kind) => {
                debug!(%target, error = %kind, "could not send an echo request");
                self.send_failures += 1;
            }
            Answer::Failed(e) => {
                debug!(%target, error = %e, "echo request failed");
                self.failures += 1;
            }
        }
    }
}

/// Runs the rounds of `plan` through `echoer`. Every loop is bounded: by the number of
/// targets times rounds, and each request by its timeout plus [`SEND_GRACE`].
async fn run<E: Echoer>(
    echoer: &E,
    plan: Rounds,
    cfg: &IcmpConfig,
    ids: RequestIds,
    cancel: &CancellationToken,
) -> IcmpSweepResult {
    let started = Instant::now();
    let concurrency = cfg.concurrency.max(1);
    let deadline = cfg.timeout.saturating_add(SEND_GRACE);
    let mut pacer = Pacer::new(cfg.rate_pps);
    let mut tasks: JoinSet<Outcome> = JoinSet::new();
    let mut tally = Tally {
        plan,
        replies: BTreeMap::new(),
        probed: 0,
        spawned: 0,
        send_failures: 0,
        errors_received: 0,
        foreign: 0,
        duplicates: 0,
        failures: 0,
    };
    let mut cancelled = cancel.is_cancelled();
    debug!(
        unique_targets = tally.plan.len(),
        burst = pacer.burst(),
        "ICMP sweep starting"
    );

    'rounds: while !cancelled {
        let Some(round) = tally.plan.next_round() else {
            break;
        };
        debug!(
            round = round.number,
            targets = round.targets.len(),
            "ICMP round"
        );
        for &(index, target) in &round.targets {
            // A free slot, collecting finished requests meanwhile.
            while tasks.len() >= concurrency {
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => {
                        cancelled = true;
                        break 'rounds;
                    }
                    Some(joined) = tasks.join_next() => tally.record(joined),
                }
            }
            // The next slot of the schedule.
            while let Err(wait) = pacer.try_take(Instant::now()) {
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => {
                        cancelled = true;
                        break 'rounds;
                    }
                    () = tokio::time::sleep(wait) => {}
                }
            }
            let (ident, seq) = ids.request(index, round.number);
            let echo = echoer.echo(target, ident, seq, cfg.timeout);
            tasks.spawn(async move {
                let answer = tokio::time::timeout(deadline, echo)
                    .await
                    .unwrap_or(Answer::Timeout);
                Outcome {
                    target,
                    answer,
                    at: SystemTime::now(),
                }
            });
            tally.spawned += 1;
            if round.number == 0 {
                tally.probed += 1;
            }
        }
        // The next round asks only who is still silent: wait for this one to finish.
        while !tasks.is_empty() {
            tokio::select! {
                biased;
                () = cancel.cancelled() => {
                    cancelled = true;
                    break 'rounds;
                }
                Some(joined) = tasks.join_next() => tally.record(joined),
            }
        }
    }
    // On cancellation: replies that are already in do count; what is still in flight is
    // dropped (surge-ping unregisters each waiter when its future is dropped).
    while let Some(joined) = tasks.try_join_next() {
        tally.record(joined);
    }
    tasks.abort_all();

    let result = IcmpSweepResult {
        probed: tally.probed,
        requests_sent: tally.spawned.saturating_sub(tally.send_failures),
        replies: tally.replies.into_values().collect(),
        cancelled,
        errors_received: tally.errors_received,
        send_failures: tally.send_failures,
    };
    debug!(
        probed = result.probed,
        unique_targets = tally.plan.len(),
        requests_sent = result.requests_sent,
        replies = tally.plan.answered(),
        rounds = tally.plan.rounds_started(),
        errors_received = result.errors_received,
        send_failures = result.send_failures,
        foreign_replies = tally.foreign,
        duplicate_replies = tally.duplicates,
        failures = tally.failures,
        cancelled,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "ICMP sweep done"
    );
    result
}

#[cfg(test)]
mod tests;
