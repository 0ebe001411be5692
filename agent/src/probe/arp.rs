//! The ARP sweep: asks every on-link target "who has this address?" from one interface and
//! records who answered with which MAC. First-hand evidence: a reply to our own request.
//!
//! Layout:
//! - [`packet`]: Ethernet+ARP encoding and parsing (no I/O).
//! - `pace`: the send pacer and the adaptive waits (no I/O, clock passed in).
//! - here: validation of a sweep (`Plan`), the reply table, and the blocking send/receive
//!   loop over a raw link. The link is a small trait so the loop's logic is tested without
//!   privileges; production uses a pnet `AF_PACKET` channel.
//!
//! The rate follows the network too: a sweep starts at [`START_RATE_PPS`] and, every
//! [`CHECK_EVERY`] requests, asks an address that has already answered once more (a check).
//! A check answered about as fast as the sweep's fastest answer speeds the sweep up by a
//! quarter, up to the configured rate; one answered late (a queue building up somewhere)
//! slows it by a quarter, and one not answered at all (a lost frame) halves it, never below
//! the start rate. A configured rate at or below the start rate is a fixed rate, without
//! checks.
//!
//! Timing follows the network, nmap-style: every answer to one of our requests is timed, and
//! both the wait before a silent address is asked again and the listening time after the last
//! request are `4 x` the highest latency seen so far, at least 50 ms, at most the configured
//! value (which is used as is until a first answer has been timed). Retries are not rounds
//! separated by pauses: once every address has had its first request, each silent one is
//! asked again as soon as its own wait has passed, so a sweep costs its packets at the
//! configured rate plus one short wait at the end.
//!
//! Unix only (`probe.rs` declares it behind `cfg(unix)`): pnet is a Unix dependency here.
//! A sweep is blocking and runs on its own OS thread (pnet's receive blocks); inside it, a
//! scoped sender thread paces requests while the calling thread receives.

mod pace;
pub mod packet;
#[cfg(test)]
mod tests;

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{debug, instrument, warn};

use self::pace::{Check, Latency, Pacer, RateControl};
use self::packet::{ArpOp, ArpPacket, BROADCAST};
use crate::iface::Interface;

/// Most targets one call may sweep (a /16). Larger scopes are split by the caller, so a
/// typo in a CIDR cannot turn into millions of broadcasts.
pub const MAX_TARGETS: usize = 65_536;
/// Most distinct MACs recorded for one IP. Two is an address conflict; more is noise or an
/// attack, and must not grow memory without bound.
pub const MAX_MACS_PER_IP: usize = 8;

/// How long one receive may block, so the loop notices the end of its (adaptive, often 50 ms)
/// listening time and cancellation without overshooting it by much.
const READ_TIMEOUT: Duration = Duration::from_millis(10);
/// How long one send may wait for socket buffer space before it counts as a failure.
const WRITE_TIMEOUT: Duration = Duration::from_millis(100);
/// How long the sender keeps retrying a packet the kernel will not take (ENOBUFS, ...).
const SEND_STALL_LIMIT: Duration = Duration::from_secs(2);
/// Granularity of interruptible sleeps.
const SLEEP_SLICE: Duration = Duration::from_millis(20);

/// Tuning for one sweep. The two durations are upper bounds: the sweep waits `4 x` the highest
/// reply latency it has measured, at least 50 ms, and only these maxima while it has timed no
/// answer yet (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArpConfig {
    /// The most requests per second, first requests, retries and checks together. Default
    /// 6000 ([`DEFAULT_RATE_PPS`]).
    pub rate_pps: u32,
    /// The rate a sweep starts at and never falls below; it rises toward `rate_pps` while the
    /// network keeps up (see the module docs). At or above `rate_pps`, the sweep runs at
    /// `rate_pps` throughout. Default 1200 ([`START_RATE_PPS`]).
    pub start_rate_pps: u32,
    /// How many more times a target that has not answered is asked. Default 1
    /// ([`DEFAULT_RETRIES`]).
    pub retries: u32,
    /// The most we keep listening after the last request. Default 1 s.
    pub reply_window: Duration,
    /// The most a target waits for an answer before it is asked again. (Retries start once
    /// every target has had its first request, each as soon as its own wait has passed; the
    /// name is from when rounds were separated by a fixed pause.) Default 200 ms.
    pub round_gap: Duration,
}

pub use super::ARP_START_RATE_PPS as START_RATE_PPS;

/// The default highest rate: 6000 ARP requests per second, 0.36 MB/s (2.9 Mbit/s) of
/// broadcast while a sweep runs at it: 0.3% of a gigabit link, 3% of 100 Mbit/s. Reached only
/// on a network that answers the sweep's checks as fast at that rate as at the start, so a
/// /24 takes about a fifth of a second to ask, a /20 about 1.5 s, a /16 (20 hosts) as long as
/// its few answers let it speed up. A switch port with broadcast storm control set below it
/// (or dynamic ARP inspection's rate limit) needs `arp.rate` set below that limit.
pub const DEFAULT_RATE_PPS: u32 = 6000;

/// A check (an address that already answered, asked again) goes out after this many other
/// requests: about 3% more requests for a rate that follows the network.
pub const CHECK_EVERY: u64 = 32;

/// The default number of retries: one, so a silent address is asked twice, as arp-scan and
/// nmap ask it. A retry is what catches a lost request or reply (a busy host, a Wi-Fi client
/// in power save, a full switch queue), and recall is the first goal; a second retry almost
/// never finds more (in the benchmark's lab every host answers the first request) but costs
/// as many packets as the first request to every silent address, and most of a sweep's
/// addresses are silent.
pub const DEFAULT_RETRIES: u32 = 1;

/// How a sweep's rate reads in a log or progress line.
pub fn rate_text(cfg: &ArpConfig) -> String {
    if cfg.start_rate_pps < cfg.rate_pps {
        format!(
            "{} to {} requests/s (faster while the network keeps up)",
            cfg.start_rate_pps, cfg.rate_pps
        )
    } else {
        format!("{} requests/s", cfg.rate_pps)
    }
}

impl Default for ArpConfig {
    fn default() -> Self {
        ArpConfig {
            rate_pps: DEFAULT_RATE_PPS,
            start_rate_pps: START_RATE_PPS,
            retries: DEFAULT_RETRIES,
            reply_window: Duration::from_secs(1),
            round_gap: Duration::from_millis(200),
        }
    }
}

/// One (IP, MAC) pair seen during a sweep.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArpReply {
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    /// The interface it was seen on.
    pub interface: String,
    /// When the first frame claiming this pair arrived.
    pub first_seen: SystemTime,
    /// True if at least one of those frames was a reply addressed to us (to our request);
    /// false if we only saw the host announce itself (gratuitous ARP, its own requests).
    pub solicited: bool,
}

/// What one sweep of one interface found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArpSweepResult {
    pub interface: String,
    /// Distinct targets swept.
    pub probed: usize,
    /// One entry per (IP, MAC) pair, sorted by IP then first sighting; an IP with several
    /// MACs (an address conflict, a failover pair) has several entries, at most
    /// [`MAX_MACS_PER_IP`].
    pub replies: Vec<ArpReply>,
    /// Every request that went out: first requests, retries and checks.
    pub requests_sent: u64,
    /// Of those, checks (an address that had answered, asked again to time the network).
    pub checks_sent: u64,
    /// The highest rate the sweep reached, in requests per second.
    pub peak_rate_pps: u32,
    /// The sweep was cancelled before it finished: `replies` is what it had by then.
    pub cancelled: bool,
}

/// Why a sweep could not run (or could not finish).
#[derive(Debug, thiserror::Error)]
pub enum ArpError {
    #[error("invalid ARP sweep configuration: {0}")]
    InvalidConfig(&'static str),
    #[error(
        "refusing to ARP sweep {count} targets on {interface} in one call (the limit is {max})"
    )]
    TooManyTargets {
        interface: String,
        count: usize,
        max: usize,
    },
    #[error("cannot ARP sweep {interface}: it has no MAC address")]
    NoMac { interface: String },
    #[error("cannot ARP sweep {interface}: it has no IPv4 address")]
    NoIpv4 { interface: String },
    #[error("cannot ARP sweep {interface}: the interface is down")]
    InterfaceDown { interface: String },
    #[error(
        "cannot ARP sweep {target} on {interface}: no IPv4 subnet of the interface contains it"
    )]
    NotOnLink { interface: String, target: Ipv4Addr },
    #[error("cannot ARP sweep {interface}: the interface no longer exists")]
    InterfaceGone { interface: String },
    #[error(
        "ARP needs raw socket access (CAP_NET_RAW) on {interface}: run as root or grant CAP_NET_RAW"
    )]
    PermissionDenied {
        interface: String,
        #[source]
        source: io::Error,
    },
    #[error("opening a raw Ethernet channel on {interface}: {source}")]
    Open {
        interface: String,
        #[source]
        source: io::Error,
    },
    #[error("sending ARP requests on {interface}: {source}")]
    Send {
        interface: String,
        #[source]
        source: io::Error,
    },
    #[error("receiving ARP replies on {interface}: {source}")]
    Receive {
        interface: String,
        #[source]
        source: io::Error,
    },
}

/// Sweeps `targets` with ARP from `interface` and returns every on-target answer.
///
/// Blocking: run it on its own thread (`spawn_blocking` or `std::thread`). Sends each
/// target a who-has at `cfg.rate_pps`, asks a silent one again up to `cfg.retries` times once
/// it has waited the adaptive wait (at most `cfg.round_gap`) for an answer, then listens for
/// the adaptive window (at most `cfg.reply_window`) after the last request. Answers that
/// arrive at any time during the sweep count. Bounded: at most `targets x (retries + 1)`
/// requests, and about `requests / rate + retries x round_gap + reply_window` at the worst.
/// Cancelling `cancel` ends it within about 20 ms with what it has so far (`cancelled` set).
/// Every target must be on-link (inside one of the interface's IPv4 subnets); the request's
/// source address is the interface's address in that subnet.
#[instrument(level = "debug", skip_all, fields(interface = %interface.name, targets = targets.len()))]
pub fn sweep(
    interface: &Interface,
    targets: &[Ipv4Addr],
    cfg: &ArpConfig,
    cancel: &CancellationToken,
) -> Result<ArpSweepResult, ArpError> {
    let plan = Plan::new(interface, targets, cfg)?;
    if plan.targets.is_empty() {
        return Ok(plan.empty_result());
    }
    let (mut tx, mut rx) = open_channel(interface)?;
    let result = run(&mut tx, &mut rx, &plan, cfg, cancel);
    // Closing an AF_PACKET socket waits for an RCU grace period (5 to 10 ms on the benchmark's
    // machine) that the caller has no use for: it is closed on a thread of its own, or here
    // if that thread cannot start.
    let _ = std::thread::Builder::new()
        .name("arp-close".into())
        .spawn(move || drop((tx, rx)));
    result
}

// === impl Plan ===

/// A validated sweep: who to ask, and from which address.
#[derive(Debug)]
struct Plan {
    interface: String,
    mac: [u8; 6],
    /// Distinct targets in the caller's order.
    targets: Vec<Target>,
    index: HashMap<Ipv4Addr, usize>,
}

#[derive(Clone, Copy, Debug)]
struct Target {
    ip: Ipv4Addr,
    /// Our address on the target's subnet.
    src: Ipv4Addr,
}

impl Plan {
    fn new(iface: &Interface, targets: &[Ipv4Addr], cfg: &ArpConfig) -> Result<Plan, ArpError> {
        let interface = iface.name.clone();
        if cfg.rate_pps == 0 {
            return Err(ArpError::InvalidConfig("rate_pps must be at least 1"));
        }
        if targets.len() > MAX_TARGETS {
            return Err(ArpError::TooManyTargets {
                interface,
                count: targets.len(),
                max: MAX_TARGETS,
            });
        }
        let Some(mac) = iface.mac else {
            return Err(ArpError::NoMac { interface });
        };
        if iface.ipv4.is_empty() {
            return Err(ArpError::NoIpv4 { interface });
        }
        if !iface.is_up {
            return Err(ArpError::InterfaceDown { interface });
        }
        let mut plan = Plan {
            interface,
            mac,
            targets: Vec::with_capacity(targets.len()),
            index: HashMap::with_capacity(targets.len()),
        };
        for &ip in targets {
            let Some(net) = iface.ipv4_on_link(ip) else {
                return Err(ArpError::NotOnLink {
                    interface: plan.interface,
                    target: ip,
                });
            };
            if let Entry::Vacant(slot) = plan.index.entry(ip) {
                slot.insert(plan.targets.len());
                plan.targets.push(Target {
                    ip,
                    src: net.addr(),
                });
            }
        }
        Ok(plan)
    }

    fn empty_result(&self) -> ArpSweepResult {
        ArpSweepResult {
            interface: self.interface.clone(),
            probed: 0,
            replies: Vec::new(),
            requests_sent: 0,
            checks_sent: 0,
            peak_rate_pps: 0,
            cancelled: false,
        }
    }
}

// === impl ReplyTable ===

/// The answers collected so far, bounded by `targets × MAX_MACS_PER_IP`.
#[derive(Debug)]
struct ReplyTable<'p> {
    plan: &'p Plan,
    replies: Vec<ArpReply>,
    by_pair: HashMap<(Ipv4Addr, [u8; 6]), usize>,
    macs_per_target: Vec<u8>,
    /// Pairs not recorded because their IP already had `MAX_MACS_PER_IP` MACs.
    overflow: u64,
}

impl<'p> ReplyTable<'p> {
    fn new(plan: &'p Plan) -> Self {
        ReplyTable {
            plan,
            replies: Vec::new(),
            by_pair: HashMap::new(),
            macs_per_target: vec![0; plan.targets.len()],
            overflow: 0,
        }
    }

    /// Records `p` if it tells us a target's MAC; returns the target's index if so, and
    /// whether `p` answered one of our requests.
    ///
    /// Kept: ARP requests and replies whose sender is one of our targets. Solicited means a
    /// reply addressed to our MAC and to our address on that subnet. Ignored: our own
    /// frames (the raw socket also sees what we send), senders outside the target set, and
    /// sender MACs that cannot be a host (all-zero, broadcast).
    fn observe(&mut self, p: &ArpPacket, at: SystemTime) -> Option<(usize, bool)> {
        let ours = self.plan.mac;
        if p.eth_src == ours || p.sender_mac == ours {
            return None;
        }
        if !matches!(p.op, ArpOp::Request | ArpOp::Reply)
            || p.sender_mac == [0; 6]
            || p.sender_mac == BROADCAST
            || p.sender_ip.is_unspecified()
        {
            return None;
        }
        let idx = *self.plan.index.get(&p.sender_ip)?;
        let target = self.plan.targets.get(idx)?;
        let solicited = p.op == ArpOp::Reply && p.target_mac == ours && p.target_ip == target.src;
        match self.by_pair.entry((p.sender_ip, p.sender_mac)) {
            Entry::Occupied(e) => {
                if let Some(r) = self.replies.get_mut(*e.get()) {
                    r.solicited |= solicited;
                }
            }
            Entry::Vacant(e) => {
                let count = self.macs_per_target.get_mut(idx)?;
                if usize::from(*count) >= MAX_MACS_PER_IP {
                    self.overflow += 1;
                    return Some((idx, solicited));
                }
                *count += 1;
                e.insert(self.replies.len());
                self.replies.push(ArpReply {
                    ip: p.sender_ip,
                    mac: p.sender_mac,
                    interface: self.plan.interface.clone(),
                    first_seen: at,
                    solicited,
                });
            }
        }
        Some((idx, solicited))
    }

    fn into_replies(self) -> Vec<ArpReply> {
        let mut replies = self.replies;
        replies.sort_by_key(|a| (a.ip, a.first_seen));
        replies
    }
}

// === the link ===

/// Sends raw Ethernet frames.
trait FrameTx: Send {
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
}

/// Receives raw Ethernet frames; `Ok(None)` when nothing arrived within the read timeout.
trait FrameRx {
    fn recv(&mut self) -> io::Result<Option<&[u8]>>;
}

struct PnetTx(Box<dyn pnet::datalink::DataLinkSender>);

impl FrameTx for PnetTx {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        // pnet answers `None` when the frame exceeds its write buffer (4096 bytes).
        self.0
            .send_to(frame, None)
            .unwrap_or_else(|| Err(io::Error::other("frame larger than pnet's write buffer")))
    }
}

struct PnetRx(Box<dyn pnet::datalink::DataLinkReceiver>);

impl FrameRx for PnetRx {
    fn recv(&mut self) -> io::Result<Option<&[u8]>> {
        match self.0.next() {
            Ok(frame) => Ok(Some(frame)),
            Err(e) if is_transient(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Opens an `AF_PACKET` (Linux) / BPF channel bound to `iface`.
fn open_channel(iface: &Interface) -> Result<(PnetTx, PnetRx), ArpError> {
    use pnet::datalink::{self, Channel};

    let interface = iface.name.clone();
    // Look the interface up again rather than trusting our copy's index: it may have been
    // re-created since it was listed, and binding by a stale index would sweep another one.
    let Some(ni) = datalink::interfaces()
        .into_iter()
        .find(|ni| ni.name == iface.name)
    else {
        return Err(ArpError::InterfaceGone { interface });
    };
    let config = datalink::Config {
        read_timeout: Some(READ_TIMEOUT),
        write_timeout: Some(WRITE_TIMEOUT),
        // pnet defaults to promiscuous mode; replies to us are unicast to our MAC or
        // broadcast, so we do not need it, and it would be visible on the client's host.
        promiscuous: false,
        ..datalink::Config::default()
    };
    match datalink::channel(&ni, config) {
        Ok(Channel::Ethernet(tx, rx)) => Ok((PnetTx(tx), PnetRx(rx))),
        Ok(_) => Err(ArpError::Open {
            interface,
            source: io::Error::other("pnet returned a non-Ethernet channel"),
        }),
        Err(source) if source.kind() == io::ErrorKind::PermissionDenied => {
            Err(ArpError::PermissionDenied { interface, source })
        }
        Err(source) => Err(ArpError::Open { interface, source }),
    }
}

/// Errors that mean "try again shortly": timeouts, interrupted calls, and a full device
/// queue (ENOBUFS, which `io::ErrorKind` does not name).
fn is_transient(e: &io::Error) -> bool {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    const ENOBUFS: i32 = 105;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    const ENOBUFS: i32 = 55; // the BSDs and macOS
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    ) || e.raw_os_error() == Some(ENOBUFS)
}

// === the sweep loop ===

/// "Not yet" in the `AtomicU64` times below (ns since `Shared::t0`).
const NOT_YET: u64 = u64::MAX;

/// State shared by the sender thread and the receiving thread.
#[derive(Debug)]
struct Shared {
    /// Per target: an answer has been recorded (so it is not asked again).
    answered: Vec<AtomicBool>,
    /// Per target: when its latest request went out; `NOT_YET` before the first.
    last_sent_ns: Vec<AtomicU64>,
    /// When the sweep's latest request went out; `NOT_YET` before the first.
    last_send_ns: AtomicU64,
    /// The highest reply latency measured, from which the waits follow.
    latency: Latency,
    /// Stops the sender (and the receiver): the caller's cancel, or a fatal error.
    stop: CancellationToken,
    /// When the sender finished; `NOT_YET` while it is still running.
    sender_done_ns: AtomicU64,
    /// The latest target to answer one of our requests, plus one; 0 before any has.
    last_answered: AtomicUsize,
    /// The check in flight: its target (`NO_CHECK` when none), when it went out, and when
    /// its target answered after that (`NOT_YET` until then).
    check_target: AtomicUsize,
    check_sent_ns: AtomicU64,
    check_answered_ns: AtomicU64,
    t0: Instant,
}

/// `Shared::check_target` when no check is in flight.
const NO_CHECK: usize = usize::MAX;

impl Shared {
    fn new(targets: usize, cancel: &CancellationToken) -> Self {
        Shared {
            answered: (0..targets).map(|_| AtomicBool::new(false)).collect(),
            last_sent_ns: (0..targets).map(|_| AtomicU64::new(NOT_YET)).collect(),
            last_send_ns: AtomicU64::new(NOT_YET),
            latency: Latency::default(),
            stop: cancel.child_token(),
            sender_done_ns: AtomicU64::new(NOT_YET),
            last_answered: AtomicUsize::new(0),
            check_target: AtomicUsize::new(NO_CHECK),
            check_sent_ns: AtomicU64::new(NOT_YET),
            check_answered_ns: AtomicU64::new(NOT_YET),
            t0: Instant::now(),
        }
    }

    /// Now, in ns since `t0` (never `NOT_YET`).
    fn now_ns(&self) -> u64 {
        nanos(self.t0.elapsed()).min(NOT_YET - 1)
    }

    /// True if target `i` has answered (or does not exist, so nobody asks it).
    fn answered(&self, i: usize) -> bool {
        self.answered
            .get(i)
            .is_none_or(|a| a.load(Ordering::Relaxed))
    }

    fn last_sent_ns(&self, i: usize) -> u64 {
        self.last_sent_ns
            .get(i)
            .map_or(NOT_YET, |t| t.load(Ordering::Acquire))
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Marks the sender as finished however it exits (including a panic), so the receiver's
/// deadline always starts.
struct SenderDone<'a>(&'a Shared);

impl Drop for SenderDone<'_> {
    fn drop(&mut self) {
        self.0
            .sender_done_ns
            .store(self.0.now_ns(), Ordering::Release);
    }
}

fn run(
    tx: &mut dyn FrameTx,
    rx: &mut dyn FrameRx,
    plan: &Plan,
    cfg: &ArpConfig,
    cancel: &CancellationToken,
) -> Result<ArpSweepResult, ArpError> {
    let shared = Shared::new(plan.targets.len(), cancel);
    debug!(
        interface = %plan.interface,
        targets = plan.targets.len(),
        first = %plan.targets.first().map_or(Ipv4Addr::UNSPECIFIED, |t| t.ip),
        last = %plan.targets.last().map_or(Ipv4Addr::UNSPECIFIED, |t| t.ip),
        rate_pps = cfg.rate_pps,
        start_rate_pps = cfg.start_rate_pps,
        retries = cfg.retries,
        "ARP sweep starting"
    );
    let mut table = ReplyTable::new(plan);
    let (sent, received) = std::thread::scope(|s| {
        let sender = std::thread::Builder::new()
            .name(format!("arp-tx-{}", plan.interface))
            .spawn_scoped(s, || {
                let _done = SenderDone(&shared);
                let r = send_requests(tx, plan, cfg, &shared);
                if r.error.is_some() {
                    shared.stop.cancel();
                }
                r
            });
        let sender = match sender {
            Ok(h) => h,
            Err(e) => {
                return (
                    Sent {
                        error: Some(e),
                        ..Sent::default()
                    },
                    Ok(()),
                );
            }
        };
        let received = receive(rx, &mut table, cfg, &shared);
        if received.is_err() {
            shared.stop.cancel();
        }
        let sent = match sender.join() {
            Ok(sent) => sent,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        (sent, received)
    });
    let elapsed = shared.t0.elapsed();
    if let Err(source) = received {
        return Err(ArpError::Receive {
            interface: plan.interface.clone(),
            source,
        });
    }
    if let Some(source) = sent.error {
        return Err(ArpError::Send {
            interface: plan.interface.clone(),
            source,
        });
    }
    if table.overflow > 0 {
        warn!(
            interface = %plan.interface,
            dropped = table.overflow,
            "ARP sweep: more than {MAX_MACS_PER_IP} MACs claimed one IP; extra ones dropped"
        );
    }
    let replies = table.into_replies();
    let cancelled = cancel.is_cancelled();
    debug!(
        interface = %plan.interface,
        probed = plan.targets.len(),
        requests_sent = sent.requests,
        retries_sent = sent.retries,
        checks_sent = sent.checks,
        peak_rate_pps = sent.peak_rate,
        answered = shared.answered.iter().filter(|a| a.load(Ordering::Relaxed)).count(),
        pairs = replies.len(),
        highest_latency_us = shared.latency.highest().map(|d| d.as_micros() as u64),
        retry_wait_ms = shared.latency.wait(cfg.round_gap).as_millis() as u64,
        reply_window_ms = shared.latency.wait(cfg.reply_window).as_millis() as u64,
        elapsed_ms = elapsed.as_millis() as u64,
        cancelled,
        "ARP sweep finished"
    );
    Ok(ArpSweepResult {
        interface: plan.interface.clone(),
        probed: plan.targets.len(),
        replies,
        requests_sent: sent.requests,
        checks_sent: sent.checks,
        peak_rate_pps: sent.peak_rate,
        cancelled,
    })
}

/// What the sender did.
#[derive(Debug, Default)]
struct Sent {
    /// Requests that went out, first ones and retries.
    requests: u64,
    /// Of those, retries.
    retries: u64,
    /// Of those, checks.
    checks: u64,
    /// The highest rate reached.
    peak_rate: u32,
    /// The error that stopped it, if any.
    error: Option<io::Error>,
}

/// What the sender does next.
enum Next {
    /// Ask target `.0`, for the `.1`-th time counting from 0.
    Ask(usize, u32),
    /// Nothing is due before this many ns have passed.
    Wait(u64),
    Done,
}

/// Sends every target its first request in the plan's order, then asks each silent one again
/// once it has waited the adaptive wait since its latest request, up to `cfg.retries` times,
/// at the rate [`RateControl`] sets from the checks (sent between them, see the module docs).
/// Stops early when `shared.stop` is cancelled; a target that has answered is never asked
/// again, except as a check.
fn send_requests(tx: &mut dyn FrameTx, plan: &Plan, cfg: &ArpConfig, shared: &Shared) -> Sent {
    let mut control = RateControl::new(cfg.start_rate_pps, cfg.rate_pps);
    let mut pacer = Pacer::new(control.rate());
    let mut sent = Sent {
        peak_rate: control.rate(),
        ..Sent::default()
    };
    let mut fresh = 0..plan.targets.len();
    // Targets to ask again, with how many times they have been asked, in the order of their
    // latest request: with one wait for all, the front is always the first one due. At most
    // one entry per target, so bounded by the plan.
    let mut again: VecDeque<(usize, u32)> = VecDeque::new();
    // When the check in flight went out, and how many requests went out since the last check.
    let mut check_sent: Option<u64> = None;
    let mut since_check = 0u64;
    loop {
        if shared.stop.is_cancelled() {
            return sent;
        }
        if control.adaptive() {
            if let Some(check) = resolve_check(&mut check_sent, cfg, shared) {
                let fastest = shared.latency.lowest().unwrap_or_default();
                if control.on_check(check, fastest) {
                    pacer.set_rate(control.rate());
                    sent.peak_rate = sent.peak_rate.max(control.rate());
                }
            }
            // Only while requests remain: a check after the last one would time nothing.
            let work_left = !fresh.is_empty() || !again.is_empty();
            let due = work_left && check_sent.is_none() && since_check >= CHECK_EVERY;
            if let Some(i) = due
                .then(|| shared.last_answered.load(Ordering::Acquire).checked_sub(1))
                .flatten()
            {
                if !pace(&mut pacer, shared) {
                    return sent;
                }
                let now = shared.now_ns();
                shared.check_target.store(NO_CHECK, Ordering::SeqCst);
                shared.check_answered_ns.store(NOT_YET, Ordering::SeqCst);
                shared.check_sent_ns.store(now, Ordering::SeqCst);
                shared.check_target.store(i, Ordering::SeqCst);
                match ask(tx, plan, i, now, shared) {
                    Ok(true) => {
                        sent.requests += 1;
                        sent.checks += 1;
                        check_sent = Some(now);
                        since_check = 0;
                    }
                    Ok(false) => return sent,
                    Err(e) => {
                        sent.error = Some(e);
                        return sent;
                    }
                }
                continue;
            }
        }
        let next = next_request(&mut again, &mut fresh, cfg, shared);
        let (i, asked) = match next {
            Next::Ask(i, asked) => (i, asked),
            Next::Wait(ns) => {
                std::thread::sleep(Duration::from_nanos(ns).min(SLEEP_SLICE));
                continue;
            }
            Next::Done => return sent,
        };
        if !pace(&mut pacer, shared) {
            return sent;
        }
        // Checked again at send time: it may have answered while we waited for the pacer.
        if shared.answered(i) {
            continue;
        }
        match ask(tx, plan, i, shared.now_ns(), shared) {
            Ok(true) => {
                sent.requests += 1;
                since_check += 1;
                if asked > 0 {
                    sent.retries += 1;
                }
            }
            Ok(false) => return sent,
            Err(e) => {
                sent.error = Some(e);
                return sent;
            }
        }
        if asked < cfg.retries {
            again.push_back((i, asked + 1));
        }
    }
}

/// Waits until the pacer allows the next request; false if stopped meanwhile.
fn pace(pacer: &mut Pacer, shared: &Shared) -> bool {
    loop {
        if shared.stop.is_cancelled() {
            return false;
        }
        match pacer.try_take(Instant::now()) {
            Ok(()) => return true,
            Err(wait) => std::thread::sleep(wait.min(SLEEP_SLICE)),
        }
    }
}

/// Sends target `i` a request, stamped `now` (before the frame goes out, so the answer is
/// never timed against an older request, which would make the latency, and every wait after
/// it, too long). `Ok(false)` if stopped before it went out.
fn ask(tx: &mut dyn FrameTx, plan: &Plan, i: usize, now: u64, shared: &Shared) -> io::Result<bool> {
    let Some(target) = plan.targets.get(i) else {
        return Ok(true);
    };
    if let Some(t) = shared.last_sent_ns.get(i) {
        t.store(now, Ordering::Release);
    }
    shared.last_send_ns.store(now, Ordering::Release);
    let frame = packet::build_request(plan.mac, target.src, target.ip);
    send_one(tx, &frame, &shared.stop)
}

/// What the check in flight (sent at `check_sent`) came to, once it is known: answered, or
/// lost once the adaptive wait has passed without an answer. Clears it then.
fn resolve_check(check_sent: &mut Option<u64>, cfg: &ArpConfig, shared: &Shared) -> Option<Check> {
    let sent_at = (*check_sent)?;
    let answered = shared.check_answered_ns.load(Ordering::SeqCst);
    let check = if answered != NOT_YET {
        Check::Answered(Duration::from_nanos(answered.saturating_sub(sent_at)))
    } else if shared.now_ns().saturating_sub(sent_at) > nanos(shared.latency.wait(cfg.round_gap)) {
        Check::Lost
    } else {
        return None;
    };
    *check_sent = None;
    shared.check_target.store(NO_CHECK, Ordering::SeqCst);
    Some(check)
}

/// Picks the sender's next request: the next first request, else the front retry if its
/// wait has passed, else how long until it will have; `Done` when nothing is left to ask.
///
/// First requests go before retries: the retries then follow as one burst at the full rate
/// (no idle gaps while single retries come due), and every silent address has had as long as
/// possible to answer before it is asked again, which saves the packet if it was just slow.
fn next_request(
    again: &mut VecDeque<(usize, u32)>,
    fresh: &mut std::ops::Range<usize>,
    cfg: &ArpConfig,
    shared: &Shared,
) -> Next {
    if let Some(i) = fresh.find(|&i| !shared.answered(i)) {
        return Next::Ask(i, 0);
    }
    while again.front().is_some_and(|&(i, _)| shared.answered(i)) {
        again.pop_front();
    }
    let Some(&(i, asked)) = again.front() else {
        return Next::Done;
    };
    let wait_ns = nanos(shared.latency.wait(cfg.round_gap));
    let due_in = shared
        .last_sent_ns(i)
        .saturating_add(wait_ns)
        .saturating_sub(shared.now_ns());
    if due_in == 0 {
        again.pop_front();
        Next::Ask(i, asked)
    } else {
        Next::Wait(due_in)
    }
}

/// Sends one frame, riding out a full queue for up to `SEND_STALL_LIMIT`. `Ok(false)` if
/// stopped before it went out.
fn send_one(tx: &mut dyn FrameTx, frame: &[u8], stop: &CancellationToken) -> io::Result<bool> {
    let started = Instant::now();
    loop {
        match tx.send(frame) {
            Ok(()) => return Ok(true),
            Err(e) if is_transient(&e) && started.elapsed() < SEND_STALL_LIMIT => {
                if stop.is_cancelled() {
                    return Ok(false);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Receives until the sender has finished and the adaptive reply window (at most
/// `cfg.reply_window`) has passed since the last request, or until stopped. Times every
/// answer to one of our requests against that target's latest request.
fn receive(
    rx: &mut dyn FrameRx,
    table: &mut ReplyTable<'_>,
    cfg: &ArpConfig,
    shared: &Shared,
) -> io::Result<()> {
    loop {
        if shared.stop.is_cancelled() {
            return Ok(());
        }
        let done_ns = shared.sender_done_ns.load(Ordering::Acquire);
        if done_ns != NOT_YET {
            let last = shared.last_send_ns.load(Ordering::Acquire);
            let end = if last == NOT_YET {
                done_ns // nothing was sent: nothing to wait for
            } else {
                last.saturating_add(nanos(shared.latency.wait(cfg.reply_window)))
            };
            if shared.now_ns() >= end {
                return Ok(());
            }
        }
        let Some(frame) = rx.recv()? else { continue };
        let Some(p) = packet::parse(frame) else {
            continue;
        };
        let Some((idx, solicited)) = table.observe(&p, SystemTime::now()) else {
            continue;
        };
        if let Some(flag) = shared.answered.get(idx) {
            flag.store(true, Ordering::Relaxed);
        }
        // Timed against the latest request: if a retry crossed a slow answer to the first
        // one, this under-estimates, which only the highest sample matters for; timing it
        // against the first request instead would count the retry wait as latency and let
        // one lost packet stretch every later wait to the maximum.
        let sent_at = shared.last_sent_ns(idx);
        if solicited && sent_at != NOT_YET {
            let now = shared.now_ns();
            shared
                .latency
                .observe(Duration::from_nanos(now.saturating_sub(sent_at)));
            shared.last_answered.store(idx + 1, Ordering::Release);
            if shared.check_target.load(Ordering::SeqCst) == idx {
                let check_sent = shared.check_sent_ns.load(Ordering::SeqCst);
                if check_sent != NOT_YET && now >= check_sent {
                    let _ = shared.check_answered_ns.compare_exchange(
                        NOT_YET,
                        now,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    );
                }
            }
        }
    }
}

/// The adaptive timing, end to end over a fake link whose hosts answer after a delay (the
/// loop's other behaviour is tested in `arp/tests.rs`).
#[cfg(test)]
mod timing_tests {
    use std::sync::mpsc;

    use super::pace::MIN_WAIT;
    use super::packet::{ArpOp, ArpPacket};
    use super::*;

    const OUR_MAC: [u8; 6] = [0x02, 0xc3, 0x08, 0, 0, 0x01];

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 8, last)
    }

    fn iface() -> Interface {
        Interface {
            name: "slow0".into(),
            index: 8,
            mac: Some(OUR_MAC),
            ipv4: vec!["198.18.8.1/24".parse().expect("literal")],
            is_up: true,
            is_loopback: false,
        }
    }

    type Wire = (Instant, Vec<u8>);

    /// Hosts that answer every request for their address after their own delay (only the
    /// first one, with `once`).
    struct SlowTx {
        wire: mpsc::Sender<Wire>,
        hosts: Vec<(Ipv4Addr, Duration)>,
        once: bool,
        answered: Vec<Ipv4Addr>,
    }

    impl FrameTx for SlowTx {
        fn send(&mut self, frame: &[u8]) -> io::Result<()> {
            let req = packet::parse(frame).expect("the sweep sends well-formed ARP");
            if self.once && self.answered.contains(&req.target_ip) {
                return Ok(());
            }
            for &(ip, delay) in self.hosts.iter().filter(|h| h.0 == req.target_ip) {
                self.answered.push(ip);
                let mac = [0x02, 0xc3, 0x08, 0, 0xaa, ip.octets()[3]];
                let reply = ArpPacket {
                    eth_src: mac,
                    op: ArpOp::Reply,
                    sender_mac: mac,
                    sender_ip: ip,
                    target_mac: req.sender_mac,
                    target_ip: req.sender_ip,
                };
                let frame = packet::build(req.sender_mac, &reply).to_vec();
                let _ = self.wire.send((Instant::now() + delay, frame));
            }
            Ok(())
        }
    }

    /// Delivers each frame no earlier than its time.
    struct SlowRx {
        wire: mpsc::Receiver<Wire>,
        queue: Vec<Wire>,
        frame: Vec<u8>,
    }

    impl FrameRx for SlowRx {
        fn recv(&mut self) -> io::Result<Option<&[u8]>> {
            while let Ok(w) = self.wire.try_recv() {
                self.queue.push(w);
            }
            let earliest = (0..self.queue.len()).min_by_key(|&k| self.queue[k].0);
            let Some(k) = earliest else {
                if let Ok(w) = self.wire.recv_timeout(Duration::from_millis(5)) {
                    self.queue.push(w);
                }
                return Ok(None);
            };
            let now = Instant::now();
            if self.queue[k].0 > now {
                std::thread::sleep((self.queue[k].0 - now).min(Duration::from_millis(5)));
                return Ok(None);
            }
            self.frame = self.queue.swap_remove(k).1;
            Ok(Some(&self.frame))
        }
    }

    /// Sweeps `.first..=.last` with hosts at `(last octet, delay)`; returns the result and
    /// the time it took.
    fn sweep(
        hosts: &[(u8, Duration)],
        first: u8,
        last: u8,
        cfg: &ArpConfig,
        cancel: &CancellationToken,
    ) -> (ArpSweepResult, Duration) {
        sweep_with(hosts, false, first, last, cfg, cancel)
    }

    /// [`sweep`], with hosts that answer only their first request if `once`.
    fn sweep_with(
        hosts: &[(u8, Duration)],
        once: bool,
        first: u8,
        last: u8,
        cfg: &ArpConfig,
        cancel: &CancellationToken,
    ) -> (ArpSweepResult, Duration) {
        let (wire_tx, wire_rx) = mpsc::channel();
        let mut tx = SlowTx {
            wire: wire_tx,
            hosts: hosts.iter().map(|&(l, d)| (ip(l), d)).collect(),
            once,
            answered: Vec::new(),
        };
        let mut rx = SlowRx {
            wire: wire_rx,
            queue: Vec::new(),
            frame: Vec::new(),
        };
        let targets: Vec<Ipv4Addr> = (first..=last).map(ip).collect();
        let t = Instant::now();
        let plan = Plan::new(&iface(), &targets, cfg).expect("valid plan");
        let r = run(&mut tx, &mut rx, &plan, cfg, cancel).expect("sweep runs");
        (r, t.elapsed())
    }

    fn found(r: &ArpSweepResult) -> Vec<Ipv4Addr> {
        r.replies.iter().map(|a| a.ip).collect()
    }

    fn cfg(round_gap_ms: u64, reply_window_ms: u64) -> ArpConfig {
        ArpConfig {
            rate_pps: 20_000,
            start_rate_pps: 20_000,
            retries: 1,
            reply_window: Duration::from_millis(reply_window_ms),
            round_gap: Duration::from_millis(round_gap_ms),
        }
    }

    #[test]
    fn fast_answers_shrink_both_waits_to_the_floor() {
        let now = Duration::ZERO;
        let (r, took) = sweep(
            &[(10, now), (11, now)],
            10,
            19,
            &cfg(400, 1000),
            &CancellationToken::new(),
        );
        assert_eq!(found(&r), [ip(10), ip(11)]);
        assert_eq!(
            r.requests_sent,
            10 + 8,
            "each silent address is asked twice"
        );
        // One floor before the retries, one after them; neither maximum (400 ms, 1 s).
        assert!(took >= 2 * MIN_WAIT, "took {took:?}");
        assert!(took < Duration::from_millis(380), "took {took:?}");
    }

    #[test]
    fn silence_waits_the_configured_maxima() {
        let (r, took) = sweep(&[], 10, 19, &cfg(150, 250), &CancellationToken::new());
        assert!(r.replies.is_empty());
        assert_eq!(r.requests_sent, 20);
        assert!(took >= Duration::from_millis(400), "took {took:?}");
        assert!(took < Duration::from_millis(900), "took {took:?}");
    }

    #[test]
    fn slow_answers_stretch_the_waits_and_the_last_slow_host_is_found() {
        let slow = Duration::from_millis(60);
        let (r, took) = sweep(
            &[(10, slow), (19, slow)],
            10,
            19,
            &cfg(1000, 2000),
            &CancellationToken::new(),
        );
        assert_eq!(found(&r), [ip(10), ip(19)]);
        // Both answered before their retry was due (4 x 60 ms after their request).
        assert_eq!(r.requests_sent, 10 + 8);
        // Retry wait and reply window of at least 4 x 60 ms each, far below the maxima.
        assert!(took >= Duration::from_millis(480), "took {took:?}");
        assert!(took < Duration::from_millis(1500), "took {took:?}");
    }

    #[test]
    fn an_answer_after_the_retry_still_counts() {
        // The retry goes at the 50 ms maximum; the answer to the first request comes at 120 ms.
        let (r, _) = sweep(
            &[(10, Duration::from_millis(120))],
            10,
            10,
            &cfg(50, 300),
            &CancellationToken::new(),
        );
        assert_eq!(found(&r), [ip(10)]);
        assert_eq!(r.requests_sent, 2);

        // No retry at all: before anything answered, the window is its maximum (300 ms).
        let once = ArpConfig {
            retries: 0,
            ..cfg(50, 300)
        };
        let (r, took) = sweep(
            &[(10, Duration::from_millis(120))],
            10,
            10,
            &once,
            &CancellationToken::new(),
        );
        assert_eq!(found(&r), [ip(10)]);
        assert_eq!(r.requests_sent, 1);
        assert!(took < Duration::from_millis(600), "took {took:?}");
    }

    /// Every fourth address of 2..=253 answers at once.
    fn every_fourth() -> Vec<(u8, Duration)> {
        (2..=253).step_by(4).map(|l| (l, Duration::ZERO)).collect()
    }

    fn adaptive(start: u32, cap: u32) -> ArpConfig {
        ArpConfig {
            rate_pps: cap,
            start_rate_pps: start,
            ..cfg(200, 1000)
        }
    }

    #[test]
    fn checks_answered_in_time_speed_the_sweep_up_to_the_cap() {
        let hosts = every_fourth();
        let twice = ArpConfig {
            retries: 2,
            ..adaptive(1000, 4000)
        };
        let (r, _) = sweep(&hosts, 2, 253, &twice, &CancellationToken::new());
        assert_eq!(r.replies.len(), hosts.len(), "every host found");
        // About 630 requests: 19 checks, of which 7 in time take 1000/s past 4000/s (a check
        // that a stalled test machine times late costs about one and a half of them).
        assert!(r.checks_sent >= 18, "{r:?}");
        assert_eq!(
            r.requests_sent - r.checks_sent,
            252 + 2 * (252 - 63),
            "first requests and two retries per silent address"
        );
        assert_eq!(r.peak_rate_pps, 4000, "{r:?}");
    }

    #[test]
    fn lost_checks_keep_the_sweep_at_its_start_rate() {
        // Each host answers its first request only: every check is lost.
        let hosts = every_fourth();
        let (r, took) = sweep_with(
            &hosts,
            true,
            2,
            253,
            &adaptive(2000, 20_000),
            &CancellationToken::new(),
        );
        assert_eq!(r.replies.len(), hosts.len(), "every host found");
        assert!(r.checks_sent >= 1, "{r:?}");
        assert_eq!(r.peak_rate_pps, 2000, "{r:?}");
        // At least the requests at 2000/s (over 0.2 s), never 20000/s.
        assert!(took >= Duration::from_millis(200), "took {took:?}");
    }

    #[test]
    fn a_rate_at_or_below_the_start_sends_no_checks() {
        let hosts = every_fourth();
        let (r, _) = sweep(
            &hosts,
            2,
            253,
            &adaptive(20_000, 20_000),
            &CancellationToken::new(),
        );
        assert_eq!(r.replies.len(), hosts.len());
        assert_eq!((r.checks_sent, r.peak_rate_pps), (0, 20_000));
        assert_eq!(r.requests_sent, 252 + (252 - 63));
    }

    #[test]
    fn cancellation_cuts_a_long_wait_short() {
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        let canceller = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            c.cancel();
        });
        let (r, took) = sweep(&[], 10, 19, &cfg(5000, 5000), &cancel);
        canceller.join().expect("canceller thread");
        assert!(r.cancelled);
        assert_eq!(r.requests_sent, 10, "cancelled while waiting to retry");
        assert!(took < Duration::from_millis(300), "took {took:?}");
    }
}
