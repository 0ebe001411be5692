//! Tests of the ARP sweep: the loop's logic over a fake link (no privileges needed), and a
//! real sweep in a lab of network namespaces that the test builds and removes itself.

use std::net::Ipv4Addr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::packet::{self, ArpOp, ArpPacket};
use super::*;

const OUR_MAC: [u8; 6] = [0x02, 0xc3, 0x07, 0, 0, 0x01];
const OUR_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 1);

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 7, last)
}

fn mac(last: u8) -> [u8; 6] {
    [0x02, 0xc3, 0x07, 0, 0xaa, last]
}

fn iface() -> Interface {
    Interface {
        name: "fake0".into(),
        index: 7,
        mac: Some(OUR_MAC),
        ipv4: vec!["198.18.7.1/24".parse().expect("literal")],
        is_up: true,
        is_loopback: false,
    }
}

fn fast() -> ArpConfig {
    ArpConfig {
        rate_pps: 20_000,
        retries: 2,
        reply_window: Duration::from_millis(100),
        round_gap: Duration::from_millis(30),
    }
}

// === the fake link ===

/// A host on the fake segment: answers who-has for `ip` with `mac`, after ignoring the
/// first `deaf_for` requests.
#[derive(Clone, Debug)]
struct FakeHost {
    ip: Ipv4Addr,
    mac: [u8; 6],
    deaf_for: u32,
}

fn host(last: u8) -> FakeHost {
    FakeHost {
        ip: ip(last),
        mac: mac(last),
        deaf_for: 0,
    }
}

/// The segment as the sender sees it: each request is echoed back (an `AF_PACKET` socket
/// sees its own outgoing frames) and answered by the matching hosts.
struct FakeTx {
    wire: mpsc::Sender<Vec<u8>>,
    hosts: Vec<FakeHost>,
    fail_after: Option<u64>,
    sent: u64,
}

impl FrameTx for FakeTx {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        if self.fail_after.is_some_and(|n| self.sent >= n) {
            return Err(io::Error::from(io::ErrorKind::NotConnected));
        }
        self.sent += 1;
        let _ = self.wire.send(frame.to_vec());
        let req = packet::parse(frame).expect("the sweep sends well-formed ARP");
        assert_eq!(req.op, ArpOp::Request);
        for h in self.hosts.iter_mut().filter(|h| h.ip == req.target_ip) {
            if h.deaf_for > 0 {
                h.deaf_for -= 1;
                continue;
            }
            let reply = ArpPacket {
                eth_src: h.mac,
                op: ArpOp::Reply,
                sender_mac: h.mac,
                sender_ip: h.ip,
                target_mac: req.sender_mac,
                target_ip: req.sender_ip,
            };
            let _ = self
                .wire
                .send(packet::build(req.sender_mac, &reply).to_vec());
        }
        Ok(())
    }
}

struct FakeRx {
    wire: mpsc::Receiver<Vec<u8>>,
    frame: Vec<u8>,
}

impl FrameRx for FakeRx {
    fn recv(&mut self) -> io::Result<Option<&[u8]>> {
        match self.wire.recv_timeout(Duration::from_millis(10)) {
            Ok(f) => {
                self.frame = f;
                Ok(Some(&self.frame))
            }
            Err(_) => Ok(None),
        }
    }
}

struct Fake {
    hosts: Vec<FakeHost>,
    /// Frames already on the wire when the sweep starts.
    inject: Vec<Vec<u8>>,
    fail_after: Option<u64>,
}

impl Fake {
    fn new(hosts: Vec<FakeHost>) -> Self {
        Fake {
            hosts,
            inject: Vec::new(),
            fail_after: None,
        }
    }

    fn sweep(
        self,
        targets: &[Ipv4Addr],
        cfg: &ArpConfig,
        cancel: &CancellationToken,
    ) -> (Result<ArpSweepResult, ArpError>, Duration) {
        let (wire_tx, wire_rx) = mpsc::channel();
        for f in self.inject {
            wire_tx.send(f).expect("receiver alive");
        }
        let mut tx = FakeTx {
            wire: wire_tx,
            hosts: self.hosts,
            fail_after: self.fail_after,
            sent: 0,
        };
        let mut rx = FakeRx {
            wire: wire_rx,
            frame: Vec::new(),
        };
        let t = Instant::now();
        let r = Plan::new(&iface(), targets, cfg)
            .and_then(|plan| run(&mut tx, &mut rx, &plan, cfg, cancel));
        (r, t.elapsed())
    }
}

fn pairs(r: &ArpSweepResult) -> Vec<(Ipv4Addr, [u8; 6], bool)> {
    r.replies
        .iter()
        .map(|a| (a.ip, a.mac, a.solicited))
        .collect()
}

// === plan validation ===

#[test]
fn plan_rejects_what_cannot_be_swept() {
    let cfg = ArpConfig::default();
    let err = |i: &Interface, t: &[Ipv4Addr], c: &ArpConfig| {
        Plan::new(i, t, c).expect_err("must be refused")
    };
    let zero_rate = ArpConfig {
        rate_pps: 0,
        ..cfg.clone()
    };
    assert!(matches!(
        err(&iface(), &[ip(2)], &zero_rate),
        ArpError::InvalidConfig(_)
    ));

    let many: Vec<Ipv4Addr> = (0..=MAX_TARGETS as u32)
        .map(|n| Ipv4Addr::from(0xc612_0000 + n))
        .collect();
    let e = err(&iface(), &many, &cfg);
    assert!(matches!(e, ArpError::TooManyTargets { count, .. } if count == MAX_TARGETS + 1));
    assert!(e.to_string().contains("refusing"), "{e}");

    let no_mac = Interface {
        mac: None,
        ..iface()
    };
    assert_eq!(
        err(&no_mac, &[ip(2)], &cfg).to_string(),
        "cannot ARP sweep fake0: it has no MAC address"
    );
    let no_ip = Interface {
        ipv4: vec![],
        ..iface()
    };
    assert!(matches!(
        err(&no_ip, &[ip(2)], &cfg),
        ArpError::NoIpv4 { .. }
    ));
    let down = Interface {
        is_up: false,
        ..iface()
    };
    assert!(matches!(
        err(&down, &[ip(2)], &cfg),
        ArpError::InterfaceDown { .. }
    ));
    let off_link = Ipv4Addr::new(198, 19, 0, 1);
    assert!(matches!(
        err(&iface(), &[ip(2), off_link], &cfg),
        ArpError::NotOnLink { target, .. } if target == off_link
    ));
}

#[test]
fn plan_dedups_targets_and_picks_the_on_link_source() {
    let two_nets = Interface {
        ipv4: vec![
            "198.18.7.1/24".parse().expect("literal"),
            "198.18.9.1/24".parse().expect("literal"),
        ],
        ..iface()
    };
    let other = Ipv4Addr::new(198, 18, 9, 20);
    let plan =
        Plan::new(&two_nets, &[ip(5), other, ip(5)], &ArpConfig::default()).expect("valid plan");
    let got: Vec<_> = plan.targets.iter().map(|t| (t.ip, t.src)).collect();
    assert_eq!(
        got,
        [(ip(5), OUR_IP), (other, Ipv4Addr::new(198, 18, 9, 1))]
    );
}

#[test]
fn permission_error_says_what_to_do() {
    let e = ArpError::PermissionDenied {
        interface: "eth0".into(),
        source: io::Error::from(io::ErrorKind::PermissionDenied),
    };
    assert_eq!(
        e.to_string(),
        "ARP needs raw socket access (CAP_NET_RAW) on eth0: run as root or grant CAP_NET_RAW"
    );
}

// === the loop over a fake link ===

#[test]
fn records_answering_targets_and_retries_silent_ones() {
    let targets = [ip(11), ip(12), ip(13), ip(50), ip(51)];
    let fake = Fake::new(vec![host(11), host(12), host(13)]);
    let (r, _) = fake.sweep(&targets, &fast(), &CancellationToken::new());
    let r = r.expect("sweep runs");
    assert_eq!(
        pairs(&r),
        [
            (ip(11), mac(11), true),
            (ip(12), mac(12), true),
            (ip(13), mac(13), true)
        ]
    );
    assert_eq!(r.probed, 5);
    assert_eq!(
        r.requests_sent,
        5 + 2 + 2,
        "only the two silent targets are re-asked"
    );
    assert!(!r.cancelled);
    assert!(r.replies.iter().all(|a| a.interface == "fake0"));
}

#[test]
fn a_host_deaf_to_the_first_requests_is_found_by_a_retry() {
    let deaf = FakeHost {
        deaf_for: 2,
        ..host(20)
    };
    let (r, _) = Fake::new(vec![deaf.clone()]).sweep(&[ip(20)], &fast(), &CancellationToken::new());
    let r = r.expect("sweep runs");
    assert_eq!(pairs(&r), [(ip(20), mac(20), true)]);
    assert_eq!(r.requests_sent, 3);

    let no_retries = ArpConfig {
        retries: 1,
        ..fast()
    };
    let (r, _) = Fake::new(vec![deaf]).sweep(&[ip(20)], &no_retries, &CancellationToken::new());
    assert_eq!(r.expect("sweep runs").replies, []);
}

#[test]
fn keeps_every_mac_of_a_conflicting_ip_up_to_the_cap() {
    let hosts: Vec<FakeHost> = (0..12)
        .map(|n| FakeHost {
            mac: mac(100 + n),
            ..host(30)
        })
        .collect();
    let (r, _) = Fake::new(hosts).sweep(&[ip(30), ip(31)], &fast(), &CancellationToken::new());
    let r = r.expect("sweep runs");
    assert_eq!(r.replies.len(), MAX_MACS_PER_IP);
    assert!(r.replies.iter().all(|a| a.ip == ip(30) && a.solicited));
    let first_two: Vec<_> = r.replies.iter().take(2).map(|a| a.mac).collect();
    assert_eq!(first_two, [mac(100), mac(101)], "sorted by first sighting");
}

#[test]
fn unsolicited_announcements_count_only_for_targets_and_never_our_own() {
    let announce = |sender: Ipv4Addr, m: [u8; 6], op: ArpOp| {
        packet::build(
            packet::BROADCAST,
            &ArpPacket {
                eth_src: m,
                op,
                sender_mac: m,
                sender_ip: sender,
                target_mac: [0; 6],
                target_ip: sender,
            },
        )
        .to_vec()
    };
    let mut fake = Fake::new(vec![host(11)]);
    fake.inject = vec![
        announce(ip(40), mac(40), ArpOp::Request), // gratuitous ARP from a target
        announce(ip(41), mac(41), ArpOp::Reply),   // gratuitous reply from a target
        announce(ip(99), mac(99), ArpOp::Request), // not a target
        announce(ip(42), OUR_MAC, ArpOp::Request), // our own MAC claiming a target
        announce(ip(43), [0; 6], ArpOp::Request),  // no usable MAC
        announce(ip(44), mac(44), ArpOp::Other(3)),
        vec![0xff; 13], // not even an Ethernet header
    ];
    let targets = [ip(11), ip(40), ip(41), ip(42), ip(43), ip(44)];
    let (r, _) = fake.sweep(&targets, &fast(), &CancellationToken::new());
    let r = r.expect("sweep runs");
    assert_eq!(
        pairs(&r),
        [
            (ip(11), mac(11), true),
            (ip(40), mac(40), false),
            (ip(41), mac(41), false)
        ]
    );
}

#[test]
fn a_reply_to_someone_else_is_not_solicited() {
    let stray = packet::build(
        mac(7),
        &ArpPacket {
            eth_src: mac(12),
            op: ArpOp::Reply,
            sender_mac: mac(12),
            sender_ip: ip(12),
            target_mac: mac(7),
            target_ip: ip(7),
        },
    );
    let mut fake = Fake::new(vec![]);
    fake.inject = vec![stray.to_vec()];
    let (r, _) = fake.sweep(&[ip(12)], &fast(), &CancellationToken::new());
    let r = r.expect("sweep runs");
    assert_eq!(pairs(&r), [(ip(12), mac(12), false)]);
    // Depending on which thread wins the race, the request goes out once or not at all;
    // never again after the stray reply told us the MAC.
    assert!(r.requests_sent <= 1, "sent {}", r.requests_sent);
}

#[test]
fn pacing_holds_the_configured_rate() {
    let targets: Vec<Ipv4Addr> = (0..2000u32)
        .map(|n| Ipv4Addr::from(0xc612_0000 + n))
        .collect();
    let wide = Interface {
        ipv4: vec!["198.18.0.1/16".parse().expect("literal")],
        ..iface()
    };
    let cfg = ArpConfig {
        rate_pps: 20_000,
        retries: 0,
        reply_window: Duration::ZERO,
        round_gap: Duration::ZERO,
    };
    let plan = Plan::new(&wide, &targets, &cfg).expect("valid plan");
    let (wire_tx, wire_rx) = mpsc::channel();
    let mut tx = FakeTx {
        wire: wire_tx,
        hosts: vec![],
        fail_after: None,
        sent: 0,
    };
    let mut rx = FakeRx {
        wire: wire_rx,
        frame: Vec::new(),
    };
    let t = Instant::now();
    let r = run(&mut tx, &mut rx, &plan, &cfg, &CancellationToken::new()).expect("sweep runs");
    let took = t.elapsed();
    assert_eq!(r.requests_sent, 2000);
    // 2000 at 20k pps is 100 ms; the first burst (100 packets) may go at once.
    assert!(took >= Duration::from_millis(90), "too fast: {took:?}");
    assert!(took < Duration::from_millis(400), "too slow: {took:?}");
    eprintln!("2000 requests at 20000 pps took {took:?}");
}

#[test]
fn cancellation_ends_the_sweep_promptly_with_what_it_has() {
    let targets: Vec<Ipv4Addr> = (2..=254).map(ip).collect();
    let slow = ArpConfig {
        rate_pps: 50,
        ..ArpConfig::default()
    }; // would take ~15 s
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        c.cancel();
    });
    let (r, took) = Fake::new(vec![host(2), host(200)]).sweep(&targets, &slow, &cancel);
    canceller.join().expect("canceller thread");
    let r = r.expect("a cancelled sweep is not an error");
    assert!(r.cancelled);
    assert!(took < Duration::from_millis(600), "took {took:?}");
    assert_eq!(pairs(&r), [(ip(2), mac(2), true)]);
    assert!(r.requests_sent < 20, "sent {}", r.requests_sent);
}

#[test]
fn the_whole_sweep_is_bounded_by_its_schedule() {
    // Nothing answers: 3 rounds of 100 at 20k pps (15 ms) + 2 gaps (60 ms) + window (100 ms).
    let targets: Vec<Ipv4Addr> = (100..200).map(ip).collect();
    let (r, took) = Fake::new(vec![]).sweep(&targets, &fast(), &CancellationToken::new());
    let r = r.expect("sweep runs");
    assert_eq!(r.requests_sent, 300);
    assert!(r.replies.is_empty());
    assert!(took >= Duration::from_millis(160), "took {took:?}");
    assert!(took < Duration::from_millis(800), "took {took:?}");
}

#[test]
fn a_failing_link_is_an_error_not_a_hang() {
    let mut fake = Fake::new(vec![host(11)]);
    fake.fail_after = Some(3);
    let targets: Vec<Ipv4Addr> = (10..20).map(ip).collect();
    let (r, took) = fake.sweep(&targets, &fast(), &CancellationToken::new());
    let e = r.expect_err("send failure surfaces");
    assert!(matches!(e, ArpError::Send { .. }), "{e}");
    assert!(
        e.to_string().starts_with("sending ARP requests on fake0"),
        "{e}"
    );
    assert!(took < Duration::from_millis(500), "took {took:?}");
}

// === the real thing, in network namespaces ===

/// Environment for the child: the interface to sweep, and the comma-separated targets.
const CHILD_IFACE: &str = "CENSUS_ARP_CHILD_IFACE";
const CHILD_TARGETS: &str = "CENSUS_ARP_CHILD_TARGETS";
/// The parent's own network namespace (`net:[inode]`), which the child must not be in.
const CHILD_PARENT_NS: &str = "CENSUS_ARP_CHILD_PARENT_NS";

/// Not a test on its own: the lab test re-executes this test binary inside the agent's
/// namespace (`ip netns exec`) to run just this function, because entering a namespace
/// from inside the process (setns) would need unsafe code. Without its environment it
/// returns at once.
#[test]
fn child_sweep() {
    let (Ok(name), Ok(list)) = (std::env::var(CHILD_IFACE), std::env::var(CHILD_TARGETS)) else {
        return;
    };
    // Belt and braces for the network safety rule: never in the namespace the parent test
    // runs in (the host's), and only 198.18.0.0/15.
    let own = std::fs::read_link("/proc/self/ns/net").expect("own netns");
    let parent = std::env::var(CHILD_PARENT_NS).expect("the parent names its namespace");
    assert_ne!(
        own.to_string_lossy(),
        parent,
        "refusing to sweep from the parent's network namespace"
    );
    let bench: ipnet::Ipv4Net = "198.18.0.0/15".parse().expect("literal");
    let targets: Vec<Ipv4Addr> = list
        .split(',')
        .map(|s| s.parse().expect("target list holds IPv4 addresses"))
        .collect();
    assert!(
        targets.iter().all(|t| bench.contains(t)),
        "targets outside 198.18.0.0/15"
    );

    let iface = crate::iface::list()
        .expect("interfaces")
        .into_iter()
        .find(|i| i.name == name)
        .expect("the lab interface exists in this namespace");
    let t = Instant::now();
    let r = sweep(
        &iface,
        &targets,
        &ArpConfig::default(),
        &CancellationToken::new(),
    )
    .expect("sweep in the lab");
    let took = t.elapsed();
    for a in &r.replies {
        let m = a.mac.map(|b| format!("{b:02x}")).join(":");
        println!(
            "REPLY {} {m} {}",
            a.ip,
            if a.solicited {
                "solicited"
            } else {
                "unsolicited"
            }
        );
    }
    println!(
        "SWEEP probed={} sent={} ms={}",
        r.probed,
        r.requests_sent,
        took.as_millis()
    );
}

/// Namespaces created for one lab, deleted on drop (also when an assertion fails).
struct Lab {
    namespaces: Vec<String>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .status();
        }
    }
}

impl Lab {
    fn add_namespace(&mut self, name: String) -> String {
        run_ip(&["netns", "add", &name]);
        self.namespaces.push(name.clone());
        name
    }
}

fn run_ip(args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("run ip(8)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn lab_skip_reason() -> Option<String> {
    if std::env::var("CENSUS_SKIP_LAB").is_ok_and(|v| v == "1") {
        return Some("CENSUS_SKIP_LAB=1".into());
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned));
    if euid.as_deref() != Some("0") {
        return Some("not root (network namespaces and raw sockets need it)".into());
    }
    None
}

fn fmt_mac(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

/// Waits until every `(namespace, interface)` reports operstate UP.
fn wait_up(links: &[(&str, &str)]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for (ns, dev) in links {
        while !run_ip(&["-n", ns, "-o", "link", "show", "dev", dev]).contains("state UP") {
            assert!(Instant::now() < deadline, "{dev} in {ns} never came up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The rest of `line` after `marker`. Markers are searched for, not expected at the start:
/// libtest prints `test name ... ` on the same line just before the test's own output.
fn after_marker<'l>(line: &'l str, marker: &str) -> Option<&'l str> {
    line.find(marker).map(|at| &line[at + marker.len()..])
}

/// Runs `child_sweep` inside `ns` and returns its REPLY lines and SWEEP summary.
fn sweep_in(ns: &str, dev: &str, targets: &[Ipv4Addr]) -> (Vec<String>, String) {
    let exe = std::env::current_exe().expect("test binary path");
    let list: Vec<String> = targets.iter().map(ToString::to_string).collect();
    let parent_ns = std::fs::read_link("/proc/self/ns/net").expect("own netns");
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(exe)
        .args([
            "--exact",
            "probe::arp::tests::child_sweep",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_IFACE, dev)
        .env(CHILD_TARGETS, list.join(","))
        .env(CHILD_PARENT_NS, parent_ns.to_string_lossy().as_ref())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the child sweep");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("child status").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the child sweep did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("child output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child sweep failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut replies: Vec<String> = stdout
        .lines()
        .filter_map(|l| after_marker(l, "REPLY "))
        .map(str::to_owned)
        .collect();
    replies.sort();
    let summary = stdout
        .lines()
        .find_map(|l| after_marker(l, "SWEEP "))
        .expect("the child printed its summary")
        .to_owned();
    (replies, summary)
}

/// A site of three hosts on a bridge, swept from a fourth namespace with a real raw socket;
/// the hosts' kernels answer. Two silent targets, then the whole /24.
#[test]
fn lab_sweep_finds_exactly_the_live_hosts() {
    if let Some(why) = lab_skip_reason() {
        eprintln!("skipping the ARP lab test: {why}");
        return;
    }
    static LABS: AtomicU64 = AtomicU64::new(0);
    let prefix = format!(
        "czarp{}n{}",
        std::process::id(),
        LABS.fetch_add(1, Ordering::Relaxed)
    );
    let mut lab = Lab { namespaces: vec![] };
    let agent = lab.add_namespace(format!("{prefix}a"));
    let switch = lab.add_namespace(format!("{prefix}s"));
    run_ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
    run_ip(&["-n", &switch, "link", "set", "br0", "up"]);
    // Veths are created inside the namespaces and their peers moved straight into the
    // switch: nothing ever exists in, or sends from, the root namespace.
    run_ip(&[
        "-n",
        &agent,
        "link",
        "add",
        "eth0",
        "address",
        &fmt_mac(OUR_MAC),
        "type",
        "veth",
        "peer",
        "name",
        "p0",
        "netns",
        &switch,
    ]);
    run_ip(&["-n", &agent, "addr", "add", "198.18.7.1/24", "dev", "eth0"]);
    run_ip(&["-n", &agent, "link", "set", "eth0", "up"]);
    run_ip(&["-n", &switch, "link", "set", "p0", "master", "br0", "up"]);
    let mut links = vec![
        (agent.clone(), "eth0".to_owned()),
        (switch.clone(), "p0".to_owned()),
    ];
    let live = [11u8, 12, 13];
    for (n, last) in live.iter().enumerate() {
        let h = lab.add_namespace(format!("{prefix}h{n}"));
        let port = format!("p{}", n + 1);
        run_ip(&[
            "-n",
            &h,
            "link",
            "add",
            "eth0",
            "address",
            &fmt_mac(mac(*last)),
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            &switch,
        ]);
        run_ip(&[
            "-n",
            &h,
            "addr",
            "add",
            &format!("{}/24", ip(*last)),
            "dev",
            "eth0",
        ]);
        run_ip(&["-n", &h, "link", "set", "eth0", "up"]);
        run_ip(&["-n", &switch, "link", "set", &port, "master", "br0", "up"]);
        links.push((h, "eth0".to_owned()));
        links.push((switch.clone(), port));
    }
    let link_refs: Vec<(&str, &str)> = links
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    wait_up(&link_refs);

    let expected: Vec<String> = live
        .iter()
        .map(|l| format!("{} {} solicited", ip(*l), fmt_mac(mac(*l))))
        .collect();

    // Three live hosts and two silent addresses.
    let few = [ip(11), ip(12), ip(13), ip(50), ip(51)];
    let (replies, summary) = sweep_in(&agent, "eth0", &few);
    assert_eq!(replies, expected, "summary: {summary}");
    assert!(summary.starts_with("probed=5 sent=9 "), "{summary}");

    // The whole /24 but our own address.
    let all: Vec<Ipv4Addr> = (2..=254).map(ip).collect();
    let (replies, summary) = sweep_in(&agent, "eth0", &all);
    assert_eq!(replies, expected, "summary: {summary}");
    assert!(summary.starts_with("probed=253 sent=753 "), "{summary}");
    eprintln!("ARP lab /24 sweep (3 live, default config): {summary}");
}
