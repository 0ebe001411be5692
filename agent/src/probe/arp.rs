//! The ARP sweep: asks every on-link target "who has this address?" from one interface and
//! records who answered with which MAC. First-hand evidence: a reply to our own request.
//!
//! Layout:
//! - [`packet`]: Ethernet+ARP encoding and parsing (no I/O).
//! - `pace`: the send pacer (no I/O, clock passed in).
//! - here: validation of a sweep (`Plan`), the reply table, and the blocking send/receive
//!   loop over a raw link. The link is a small trait so the loop's logic is tested without
//!   privileges; production uses a pnet `AF_PACKET` channel.
//!
//! Unix only (`probe.rs` declares it behind `cfg(unix)`): pnet is a Unix dependency here.
//! A sweep is blocking and runs on its own OS thread (pnet's receive blocks); inside it, a
//! scoped sender thread paces requests while the calling thread receives.

mod pace;
pub mod packet;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::io;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{debug, instrument, warn};

use self::pace::Pacer;
use self::packet::{ArpOp, ArpPacket, BROADCAST};
use crate::iface::Interface;

/// Most targets one call may sweep (a /16). Larger scopes are split by the caller, so a
/// typo in a CIDR cannot turn into millions of broadcasts.
pub const MAX_TARGETS: usize = 65_536;
/// Most distinct MACs recorded for one IP. Two is an address conflict; more is noise or an
/// attack, and must not grow memory without bound.
pub const MAX_MACS_PER_IP: usize = 8;

/// How long one receive may block, so the loop notices the deadline and cancellation.
const READ_TIMEOUT: Duration = Duration::from_millis(50);
/// How long one send may wait for socket buffer space before it counts as a failure.
const WRITE_TIMEOUT: Duration = Duration::from_millis(100);
/// How long the sender keeps retrying a packet the kernel will not take (ENOBUFS, ...).
const SEND_STALL_LIMIT: Duration = Duration::from_secs(2);
/// Granularity of interruptible sleeps.
const SLEEP_SLICE: Duration = Duration::from_millis(20);

/// Tuning for one sweep.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArpConfig {
    /// Requests per second, across all rounds. Default 2000.
    pub rate_pps: u32,
    /// Extra rounds for targets that have not answered yet. Default 2.
    pub retries: u32,
    /// How long to keep listening after the last request. Default 1 s.
    pub reply_window: Duration,
    /// Pause between the end of one round and the start of the next, so replies to the
    /// previous round arrive before we decide who is silent. Default 200 ms.
    pub round_gap: Duration,
}

impl Default for ArpConfig {
    fn default() -> Self {
        ArpConfig {
            rate_pps: 2000,
            retries: 2,
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
    pub requests_sent: u64,
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
/// target a who-has at `cfg.rate_pps`, re-asks the silent ones up to `cfg.retries` times,
/// then listens for `cfg.reply_window`. Cancelling `cancel` ends it within about 50 ms with
/// what it has so far (`cancelled` set). Every target must be on-link (inside one of the
/// interface's IPv4 subnets); the request's source address is the interface's address in
/// that subnet.
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
    run(&mut tx, &mut rx, &plan, cfg, cancel)
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

    /// Records `p` if it tells us a target's MAC; returns the target's index if so.
    ///
    /// Kept: ARP requests and replies whose sender is one of our targets. Solicited means a
    /// reply addressed to our MAC and to our address on that subnet. Ignored: our own
    /// frames (the raw socket also sees what we send), senders outside the target set, and
    /// sender MACs that cannot be a host (all-zero, broadcast).
    fn observe(&mut self, p: &ArpPacket, at: SystemTime) -> Option<usize> {
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
                    return Some(idx);
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
        Some(idx)
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

/// State shared by the sender thread and the receiving thread.
#[derive(Debug)]
struct Shared {
    /// Per target: an answer has been recorded (so later rounds skip it).
    answered: Vec<AtomicBool>,
    /// Stops the sender (and the receiver): the caller's cancel, or a fatal error.
    stop: CancellationToken,
    /// When the sender finished, in ns since `t0`; `u64::MAX` while it is still running.
    sender_done_ns: AtomicU64,
    t0: Instant,
}

/// Marks the sender as finished however it exits (including a panic), so the receiver's
/// deadline always starts.
struct SenderDone<'a>(&'a Shared);

impl Drop for SenderDone<'_> {
    fn drop(&mut self) {
        let ns = u64::try_from(self.0.t0.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        self.0.sender_done_ns.store(ns, Ordering::Release);
    }
}

fn run(
    tx: &mut dyn FrameTx,
    rx: &mut dyn FrameRx,
    plan: &Plan,
    cfg: &ArpConfig,
    cancel: &CancellationToken,
) -> Result<ArpSweepResult, ArpError> {
    let shared = Shared {
        answered: plan
            .targets
            .iter()
            .map(|_| AtomicBool::new(false))
            .collect(),
        stop: cancel.child_token(),
        sender_done_ns: AtomicU64::new(u64::MAX),
        t0: Instant::now(),
    };
    debug!(
        interface = %plan.interface,
        targets = plan.targets.len(),
        first = %plan.targets.first().map_or(Ipv4Addr::UNSPECIFIED, |t| t.ip),
        last = %plan.targets.last().map_or(Ipv4Addr::UNSPECIFIED, |t| t.ip),
        rate_pps = cfg.rate_pps,
        "ARP sweep starting"
    );
    let mut table = ReplyTable::new(plan);
    let (sent, received) = std::thread::scope(|s| {
        let sender = std::thread::Builder::new()
            .name(format!("arp-tx-{}", plan.interface))
            .spawn_scoped(s, || {
                let _done = SenderDone(&shared);
                let r = send_rounds(tx, plan, cfg, &shared);
                if r.1.is_some() {
                    shared.stop.cancel();
                }
                r
            });
        let sender = match sender {
            Ok(h) => h,
            Err(e) => {
                return ((0, Some(e)), Ok(()));
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
    let (requests_sent, send_error) = sent;
    let elapsed = shared.t0.elapsed();
    if let Err(source) = received {
        return Err(ArpError::Receive {
            interface: plan.interface.clone(),
            source,
        });
    }
    if let Some(source) = send_error {
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
        requests_sent,
        answered = shared.answered.iter().filter(|a| a.load(Ordering::Relaxed)).count(),
        pairs = replies.len(),
        elapsed_ms = elapsed.as_millis() as u64,
        cancelled,
        "ARP sweep finished"
    );
    Ok(ArpSweepResult {
        interface: plan.interface.clone(),
        probed: plan.targets.len(),
        replies,
        requests_sent,
        cancelled,
    })
}

/// Sends the rounds; returns how many requests went out and the error that stopped it, if
/// any. Stops early when `shared.stop` is cancelled or every target has answered.
fn send_rounds(
    tx: &mut dyn FrameTx,
    plan: &Plan,
    cfg: &ArpConfig,
    shared: &Shared,
) -> (u64, Option<io::Error>) {
    let mut pacer = Pacer::new(cfg.rate_pps);
    let mut sent = 0u64;
    let answered = |i: usize| {
        shared
            .answered
            .get(i)
            .is_none_or(|a| a.load(Ordering::Relaxed))
    };
    for round in 0..=cfg.retries {
        if round > 0 {
            let pending = || (0..plan.targets.len()).filter(|&i| !answered(i)).count();
            // Checked before the gap too, so a sweep where everyone answered at once does
            // not wait for nothing.
            if pending() == 0 {
                break;
            }
            if !sleep_unless_stopped(cfg.round_gap, &shared.stop) {
                return (sent, None);
            }
            let pending = pending();
            if pending == 0 {
                break;
            }
            debug!(interface = %plan.interface, round, pending, "ARP retry round");
        }
        for (i, target) in plan.targets.iter().enumerate() {
            // Checked at send time, so a target that answers mid-round is not re-asked.
            if answered(i) {
                continue;
            }
            loop {
                if shared.stop.is_cancelled() {
                    return (sent, None);
                }
                match pacer.try_take(Instant::now()) {
                    Ok(()) => break,
                    Err(wait) => std::thread::sleep(wait.min(SLEEP_SLICE)),
                }
            }
            let frame = packet::build_request(plan.mac, target.src, target.ip);
            match send_one(tx, &frame, &shared.stop) {
                Ok(true) => sent += 1,
                Ok(false) => return (sent, None),
                Err(e) => return (sent, Some(e)),
            }
        }
    }
    (sent, None)
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

/// Receives until `reply_window` after the sender finished, or until stopped.
fn receive(
    rx: &mut dyn FrameRx,
    table: &mut ReplyTable<'_>,
    cfg: &ArpConfig,
    shared: &Shared,
) -> io::Result<()> {
    let window_ns = u64::try_from(cfg.reply_window.as_nanos()).unwrap_or(u64::MAX);
    loop {
        if shared.stop.is_cancelled() {
            return Ok(());
        }
        let done_ns = shared.sender_done_ns.load(Ordering::Acquire);
        if done_ns != u64::MAX {
            let now_ns = u64::try_from(shared.t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
            if now_ns >= done_ns.saturating_add(window_ns) {
                return Ok(());
            }
        }
        let Some(frame) = rx.recv()? else { continue };
        let Some(p) = packet::parse(frame) else {
            continue;
        };
        if let Some(idx) = table.observe(&p, SystemTime::now())
            && let Some(flag) = shared.answered.get(idx)
        {
            flag.store(true, Ordering::Relaxed);
        }
    }
}

/// Sleeps for `d` in slices; false if `stop` was cancelled meanwhile.
fn sleep_unless_stopped(d: Duration, stop: &CancellationToken) -> bool {
    let until = Instant::now() + d;
    loop {
        if stop.is_cancelled() {
            return false;
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        std::thread::sleep(left.min(SLEEP_SLICE));
    }
}
