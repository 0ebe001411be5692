//! Tests of the ARP sweep: the loop's logic over a fake link (no privileges needed), and a
//! real sweep in the shared lab (`census_tests::lab`), run from the site's agent namespace by
//! re-running this test binary there (`crate::testing`).

use std::net::Ipv4Addr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::packet::{self, ArpOp, ArpPacket};
use super::*;
use crate::testing::{
    self, Lab,
    lab::{HostSpec, SiteSpec, mac_string},
};

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
        start_rate_pps: 20_000,
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
        start_rate_pps: 20_000,
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

// === the real thing, in the lab ===

/// What the parent asks the child to sweep.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct LabInput {
    interface: String,
    targets: Vec<Ipv4Addr>,
}

/// What the child saw.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct LabOutput {
    /// `ip mac solicited|unsolicited`, sorted.
    replies: Vec<String>,
    probed: usize,
    requests_sent: u64,
    checks_sent: u64,
    elapsed_ms: u64,
}

/// Not a test on its own: the lab test re-runs this test binary inside the agent's namespace
/// with this test selected, and it sweeps from there.
#[test]
fn child_sweep() {
    let Some(input) = testing::child_input::<LabInput>() else {
        return;
    };
    // Belt and braces for the network safety rule (the lab checks its own addresses).
    let bench: ipnet::Ipv4Net = "198.18.0.0/15".parse().expect("literal");
    assert!(
        input.targets.iter().all(|t| bench.contains(t)),
        "targets outside 198.18.0.0/15"
    );
    let iface = crate::iface::list()
        .expect("interfaces")
        .into_iter()
        .find(|i| i.name == input.interface)
        .expect("the lab interface exists in this namespace");
    let t = Instant::now();
    let r = sweep(
        &iface,
        &input.targets,
        &ArpConfig::default(),
        &CancellationToken::new(),
    )
    .expect("sweep in the lab");
    let elapsed_ms = u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX);
    let mut replies: Vec<String> = r
        .replies
        .iter()
        .map(|a| {
            let how = if a.solicited {
                "solicited"
            } else {
                "unsolicited"
            };
            format!("{} {} {how}", a.ip, mac_string(a.mac))
        })
        .collect();
    replies.sort();
    testing::child_output(&LabOutput {
        replies,
        probed: r.probed,
        requests_sent: r.requests_sent,
        checks_sent: r.checks_sent,
        elapsed_ms,
    });
}

fn sweep_in(lab: &Lab, ns: &str, input: &LabInput) -> anyhow::Result<LabOutput> {
    let mut out: Vec<LabOutput> = testing::run_child(
        lab,
        ns,
        "probe::arp::tests::child_sweep",
        input,
        Duration::from_secs(60),
    )?;
    anyhow::ensure!(out.len() == 1, "expected one result, got {out:?}");
    out.pop().ok_or_else(|| anyhow::anyhow!("no result"))
}

/// Waits until `eth0` of every namespace in `namespaces` reports operstate UP, so the first
/// round of requests is not lost to a link still coming up.
fn wait_up(lab: &Lab, namespaces: &[&str]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    for ns in namespaces {
        while !lab
            .exec_ok(ns, ["ip", "-o", "link", "show", "dev", "eth0"])?
            .contains("state UP")
        {
            anyhow::ensure!(Instant::now() < deadline, "eth0 in {ns} never came up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// A site of three hosts on the lab's LAN, swept from the agent's namespace with a real raw
/// socket; the hosts' kernels answer. Two silent targets, then the whole /24.
#[test]
fn lab_sweep_finds_exactly_the_live_hosts() -> anyhow::Result<()> {
    if testing::skip_lab() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let prefix = lab.prefix().to_owned();
    let site = lab.add_site(SiteSpec {
        agent_mac: Some(OUR_MAC),
        ..SiteSpec::new("arp", "198.18.7.0/24".parse()?, OUR_IP)
    })?;
    let live = [11u8, 12, 13];
    let hosts = site.add_hosts(live.map(|last| HostSpec::new(ip(last)).with_mac(mac(last))))?;
    let agent = site.agent().ns().to_owned();
    let mut namespaces = vec![agent.as_str()];
    namespaces.extend(hosts.iter().map(|h| h.ns()));
    wait_up(&lab, &namespaces)?;

    let expected: Vec<String> = live
        .iter()
        .map(|l| format!("{} {} solicited", ip(*l), mac_string(mac(*l))))
        .collect();

    // Three live hosts and two silent addresses.
    let few = LabInput {
        interface: "eth0".into(),
        targets: vec![ip(11), ip(12), ip(13), ip(50), ip(51)],
    };
    let out = sweep_in(&lab, &agent, &few)?;
    assert_eq!(out.replies, expected, "{out:?}");
    // Too few requests for a check (one goes out after every 32).
    assert_eq!(
        (out.probed, out.requests_sent, out.checks_sent),
        (5, 7, 0),
        "{out:?}"
    );

    // The whole /24 but our own address.
    let all = LabInput {
        interface: "eth0".into(),
        targets: (2..=254).map(ip).collect(),
    };
    let out = sweep_in(&lab, &agent, &all)?;
    assert_eq!(out.replies, expected, "{out:?}");
    // 253 first requests and 250 retries, plus the checks between them.
    assert_eq!(
        (out.probed, out.requests_sent - out.checks_sent),
        (253, 503),
        "{out:?}"
    );
    assert!(
        (1..=503 / CHECK_EVERY).contains(&out.checks_sent),
        "{out:?}"
    );
    eprintln!(
        "ARP lab /24 sweep (3 live, default config): {} ms",
        out.elapsed_ms
    );

    drop((hosts, site));
    drop(lab);
    let left = census_tests::lab::namespaces_with_prefix(&prefix);
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    Ok(())
}
