//! Tests of the ICMP sweep: the loop's logic over a fake echoer (no privileges needed), and a
//! real sweep of a routed /24 in a lab of network namespaces that the test builds and removes.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use super::*;

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 5, last)
}

fn fast() -> IcmpConfig {
    IcmpConfig {
        rate_pps: 20_000,
        concurrency: 64,
        timeout: Duration::from_millis(60),
        retries: 1,
    }
}

const IDS: RequestIds = RequestIds {
    ident_base: 0x4000,
    seq_base: 0x0100,
};

// === the fake echoer ===

/// How a fake address behaves.
#[derive(Debug, Clone)]
enum Host {
    /// Echo reply from itself after `after`, once it has ignored `deaf_for` requests.
    Answers { after: Duration, deaf_for: u32 },
    /// An echo reply, but from another address (a spoofer, or a NAT gone wrong).
    AnswersFrom(Ipv4Addr),
    /// A router's host unreachable about the target.
    Unreachable(Ipv4Addr),
    /// The socket refuses to send to it.
    SendFails,
    /// The echo future never completes (a socket that blocks forever).
    Hangs,
    /// The socket layer panics.
    Panics,
}

fn answers() -> Host {
    Host::Answers {
        after: Duration::from_millis(2),
        deaf_for: 0,
    }
}

#[derive(Debug, Clone, Default)]
struct Fake {
    hosts: Arc<Mutex<HashMap<Ipv4Addr, Host>>>,
    /// Every request: (target, identifier, sequence).
    requests: Arc<Mutex<Vec<(Ipv4Addr, u16, u16)>>>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
}

impl Fake {
    fn new(hosts: impl IntoIterator<Item = (Ipv4Addr, Host)>) -> Self {
        Fake {
            hosts: Arc::new(Mutex::new(hosts.into_iter().collect())),
            ..Fake::default()
        }
    }

    fn requests(&self) -> Vec<(Ipv4Addr, u16, u16)> {
        self.requests.lock().expect("not poisoned").clone()
    }

    fn requests_to(&self, target: Ipv4Addr) -> Vec<(u16, u16)> {
        self.requests()
            .into_iter()
            .filter(|(t, _, _)| *t == target)
            .map(|(_, i, s)| (i, s))
            .collect()
    }
}

/// Decrements the in-flight count however the request ends (also when aborted).
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Echoer for Fake {
    fn echo(
        &self,
        target: Ipv4Addr,
        ident: u16,
        seq: u16,
        timeout: Duration,
    ) -> impl Future<Output = Answer> + Send + 'static {
        self.requests
            .lock()
            .expect("not poisoned")
            .push((target, ident, seq));
        let host = {
            let mut hosts = self.hosts.lock().expect("not poisoned");
            match hosts.get_mut(&target) {
                Some(Host::Answers { deaf_for, .. }) if *deaf_for > 0 => {
                    *deaf_for -= 1;
                    None
                }
                h => h.cloned(),
            }
        };
        let in_flight = self.in_flight.clone();
        let max = self.max_in_flight.clone();
        async move {
            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            max.fetch_max(now, Ordering::SeqCst);
            let _guard = InFlight(in_flight);
            let packet = |source, icmp_type| Answer::Packet {
                source,
                icmp_type,
                rtt: Duration::from_millis(2),
            };
            match host {
                Some(Host::Answers { after, .. }) if after < timeout => {
                    tokio::time::sleep(after).await;
                    Answer::Packet {
                        source: target,
                        icmp_type: ECHO_REPLY,
                        rtt: after,
                    }
                }
                Some(Host::AnswersFrom(other)) => packet(other, ECHO_REPLY),
                Some(Host::Unreachable(router)) => packet(router, 3),
                Some(Host::SendFails) => Answer::SendFailed(io::ErrorKind::NetworkUnreachable),
                Some(Host::Hangs) => std::future::pending::<Answer>().await,
                Some(Host::Panics) => panic!("a fake socket layer panics"),
                // Silent, deaf this time, or too slow for the timeout.
                _ => {
                    tokio::time::sleep(timeout).await;
                    Answer::Timeout
                }
            }
        }
    }
}

async fn run_fake(fake: &Fake, targets: &[Ipv4Addr], cfg: &IcmpConfig) -> IcmpSweepResult {
    validate(cfg).expect("a valid config");
    run(
        fake,
        Rounds::new(targets, cfg.retries),
        cfg,
        IDS,
        &CancellationToken::new(),
    )
    .await
}

fn answered(r: &IcmpSweepResult) -> Vec<Ipv4Addr> {
    r.replies.iter().map(|r| r.ip).collect()
}

// === the sweep loop ===

#[tokio::test]
async fn finds_who_answers_once_each_sorted() {
    let fake = Fake::new([(ip(9), answers()), (ip(3), answers()), (ip(7), answers())]);
    let targets = [ip(9), ip(1), ip(3), ip(9), ip(5), ip(3), ip(7)];
    let r = run_fake(&fake, &targets, &fast()).await;
    assert_eq!(answered(&r), vec![ip(3), ip(7), ip(9)]);
    assert_eq!(r.probed, 5, "duplicates are probed once");
    // Five in round 0, then the two silent ones again.
    assert_eq!(r.requests_sent, 7);
    assert!(!r.cancelled);
    assert_eq!(r.replies[0].rtt, Duration::from_millis(2));
}

#[tokio::test]
async fn retries_ask_only_the_silent_in_later_rounds() {
    let cfg = IcmpConfig {
        retries: 3,
        ..fast()
    };
    let fake = Fake::new([
        (ip(1), answers()),
        (
            ip(2),
            Host::Answers {
                after: Duration::from_millis(1),
                deaf_for: 2,
            },
        ),
    ]);
    let r = run_fake(&fake, &[ip(1), ip(2), ip(3)], &cfg).await;
    assert_eq!(answered(&r), vec![ip(1), ip(2)]);
    assert_eq!(fake.requests_to(ip(1)).len(), 1);
    assert_eq!(
        fake.requests_to(ip(2)).len(),
        3,
        "answered on the third try"
    );
    assert_eq!(fake.requests_to(ip(3)).len(), 4, "1 + 3 retries");
    assert_eq!(r.requests_sent, 8);

    // One identifier per target, one sequence number per round.
    let silent = fake.requests_to(ip(3));
    assert!(silent.iter().all(|(ident, _)| *ident == silent[0].0));
    let seqs: Vec<u16> = silent.iter().map(|(_, s)| *s).collect();
    assert_eq!(seqs, vec![0x0100, 0x0101, 0x0102, 0x0103]);
    assert_ne!(fake.requests_to(ip(1))[0].0, silent[0].0);

    // Every round after the first starts once the previous one is over: the rounds are in
    // order in the request log.
    let rounds: Vec<u16> = fake.requests().iter().map(|(_, _, s)| *s).collect();
    assert!(rounds.is_sorted(), "{rounds:?}");
}

#[tokio::test]
async fn a_reply_from_another_address_does_not_count() {
    let fake = Fake::new([
        (ip(1), Host::AnswersFrom(ip(200))),
        (ip(2), Host::AnswersFrom(ip(3))), // claims to be another target
        (ip(4), answers()),
    ]);
    let r = run_fake(&fake, &[ip(1), ip(2), ip(3), ip(4)], &fast()).await;
    assert_eq!(answered(&r), vec![ip(4)], "only the honest reply counts");
}

#[tokio::test]
async fn an_icmp_error_about_a_target_is_not_a_reply() {
    let router = ip(254);
    let fake = Fake::new([(ip(1), Host::Unreachable(router)), (ip(2), answers())]);
    let r = run_fake(&fake, &[ip(1), ip(2)], &fast()).await;
    assert_eq!(answered(&r), vec![ip(2)]);
    // Round 0 and its retry each drew an error.
    assert_eq!(r.errors_received, 2);
}

#[tokio::test]
async fn duplicate_replies_count_once() {
    // Record the same reply twice, as a misbehaving socket layer could deliver it.
    let mut tally = Tally {
        plan: Rounds::new(&[ip(1)], 0),
        replies: BTreeMap::new(),
        probed: 1,
        spawned: 1,
        send_failures: 0,
        errors_received: 0,
        foreign: 0,
        duplicates: 0,
        failures: 0,
    };
    let outcome = |rtt_ms| Outcome {
        target: ip(1),
        answer: Answer::Packet {
            source: ip(1),
            icmp_type: ECHO_REPLY,
            rtt: Duration::from_millis(rtt_ms),
        },
        at: SystemTime::now(),
    };
    tally.record(Ok(outcome(3)));
    tally.record(Ok(outcome(9)));
    // And one for an address that is not a target at all.
    tally.record(Ok(Outcome {
        target: ip(8),
        ..outcome(1)
    }));
    assert_eq!(tally.replies.len(), 1);
    assert_eq!(
        tally.replies[&ip(1)].rtt,
        Duration::from_millis(3),
        "first wins"
    );
    assert_eq!(tally.duplicates, 1);
    assert_eq!(tally.foreign, 1);
}

#[tokio::test]
async fn send_failures_and_socket_panics_leave_the_sweep_complete() {
    let fake = Fake::new([
        (ip(1), Host::SendFails),
        (ip(2), Host::Panics),
        (ip(3), answers()),
    ]);
    let r = run_fake(&fake, &[ip(1), ip(2), ip(3)], &fast()).await;
    assert_eq!(answered(&r), vec![ip(3)]);
    assert_eq!(r.send_failures, 2, "round 0 and the retry");
    assert_eq!(r.requests_sent, 5 - 2);
    assert!(!r.cancelled);
}

#[tokio::test]
async fn a_request_that_never_returns_is_bounded_in_time() {
    let cfg = IcmpConfig {
        timeout: Duration::from_millis(20),
        retries: 0,
        ..fast()
    };
    let fake = Fake::new([(ip(1), Host::Hangs), (ip(2), answers())]);
    let t = Instant::now();
    let r = run_fake(&fake, &[ip(1), ip(2)], &cfg).await;
    let took = t.elapsed();
    assert_eq!(answered(&r), vec![ip(2)]);
    assert!(
        took < cfg.timeout + SEND_GRACE + Duration::from_millis(500),
        "{took:?}"
    );
}

#[tokio::test]
async fn concurrency_is_bounded() {
    let cfg = IcmpConfig {
        concurrency: 5,
        timeout: Duration::from_millis(20),
        retries: 0,
        ..fast()
    };
    let fake = Fake::default();
    let targets: Vec<Ipv4Addr> = (1..=40).map(ip).collect();
    let r = run_fake(&fake, &targets, &cfg).await;
    assert_eq!(r.requests_sent, 40);
    assert_eq!(fake.max_in_flight.load(Ordering::SeqCst), 5);
    assert_eq!(fake.in_flight.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn requests_are_paced_at_the_rate() {
    let cfg = IcmpConfig {
        rate_pps: 200, // 5 ms apart, burst 2
        timeout: Duration::from_millis(5),
        retries: 0,
        ..fast()
    };
    let fake = Fake::new((1..=40).map(|n| (ip(n), answers())));
    let targets: Vec<Ipv4Addr> = (1..=40).map(ip).collect();
    let t = Instant::now();
    let r = run_fake(&fake, &targets, &cfg).await;
    let took = t.elapsed();
    assert_eq!(r.replies.len(), 40);
    // 40 requests at 200 pps, the first two at once: at least 38 intervals of 5 ms.
    assert!(took >= Duration::from_millis(190), "{took:?}");
    assert!(took < Duration::from_millis(1000), "{took:?}");
}

#[tokio::test]
async fn cancellation_ends_the_sweep_promptly_with_what_it_has() {
    let cfg = IcmpConfig {
        rate_pps: 1000,
        concurrency: 4,
        timeout: Duration::from_secs(30),
        retries: 10,
    };
    let fake = Fake::new([(ip(1), answers())]);
    let targets: Vec<Ipv4Addr> = (1..=200).map(ip).collect();
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        trigger.cancel();
    });
    let t = Instant::now();
    let r = run(
        &fake,
        Rounds::new(&targets, cfg.retries),
        &cfg,
        IDS,
        &cancel,
    )
    .await;
    let took = t.elapsed();
    assert!(r.cancelled);
    assert!(took < Duration::from_millis(600), "{took:?}");
    assert_eq!(
        answered(&r),
        vec![ip(1)],
        "the reply before the cancel counts"
    );
    assert_eq!(r.probed, 5, "four silent in flight, then no slot");
    // What was in flight was dropped.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(fake.in_flight.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_already_cancelled_sweep_sends_nothing() {
    let fake = Fake::new([(ip(1), answers())]);
    let cancel = CancellationToken::new();
    cancel.cancel();
    let r = run(&fake, Rounds::new(&[ip(1)], 1), &fast(), IDS, &cancel).await;
    assert!(r.cancelled);
    assert!(fake.requests().is_empty());
    assert_eq!(r.requests_sent, 0);
}

// === the public entry point, without a socket ===

#[tokio::test]
async fn what_cannot_be_swept_is_refused_before_opening_a_socket() {
    let cancel = CancellationToken::new();
    let bad = |cfg: IcmpConfig| async move {
        sweep(&[ip(1)], &cfg, &CancellationToken::new())
            .await
            .expect_err("must be refused")
    };
    for cfg in [
        IcmpConfig {
            rate_pps: 0,
            ..IcmpConfig::default()
        },
        IcmpConfig {
            concurrency: 0,
            ..IcmpConfig::default()
        },
        IcmpConfig {
            timeout: Duration::ZERO,
            ..IcmpConfig::default()
        },
        IcmpConfig {
            timeout: Duration::from_secs(61),
            ..IcmpConfig::default()
        },
        IcmpConfig {
            retries: MAX_RETRIES + 1,
            ..IcmpConfig::default()
        },
    ] {
        assert!(matches!(bad(cfg).await, IcmpError::InvalidConfig(_)));
    }

    let many: Vec<Ipv4Addr> = (0..=MAX_TARGETS as u32)
        .map(|n| Ipv4Addr::from(0xc612_0000 + n))
        .collect();
    let e = sweep(&many, &IcmpConfig::default(), &cancel)
        .await
        .expect_err("too many");
    assert!(
        matches!(e, IcmpError::TooManyTargets { count, max } if count == MAX_TARGETS + 1 && max == MAX_TARGETS)
    );
    assert!(e.to_string().starts_with("refusing"), "{e}");

    // Nothing to sweep needs no socket.
    let r = sweep(&[], &IcmpConfig::default(), &cancel)
        .await
        .expect("an empty sweep");
    assert_eq!(r, IcmpSweepResult::default());
}

#[test]
fn the_permission_error_is_one_line_that_says_how_to_fix_it() {
    // surge-ping's own message for this spans several lines.
    let surge = io::Error::new(
        io::ErrorKind::PermissionDenied,
        "Permission denied creating ICMP socket. On Linux, you may need to:\n1. ...\n2. ...",
    );
    let e = open_error(surge);
    assert!(matches!(e, IcmpError::PermissionDenied(_)));
    let line = e.to_string();
    assert!(!line.contains('\n'), "{line}");
    assert!(
        line.contains("CAP_NET_RAW") && line.contains("root"),
        "{line}"
    );
    let source = std::error::Error::source(&e).expect("a source").to_string();
    assert!(!source.contains('\n'), "{source}");

    let os = open_error(io::Error::from_raw_os_error(1)); // EPERM on Linux and friends
    #[cfg(unix)]
    assert!(matches!(os, IcmpError::PermissionDenied(_)), "{os:?}");
    let _ = os;

    let other = open_error(io::Error::from(io::ErrorKind::AddrNotAvailable));
    assert!(matches!(other, IcmpError::Socket(_)));
}

#[test]
fn default_config() {
    assert_eq!(
        IcmpConfig::default(),
        IcmpConfig {
            rate_pps: 1000,
            concurrency: 1024,
            timeout: Duration::from_secs(1),
            retries: 1,
        }
    );
    validate(&IcmpConfig::default()).expect("the default is valid");
}

// === the lab ===

#[cfg(unix)]
mod lab {
    use std::time::{Duration, Instant};

    use anyhow::{Context as _, Result, ensure};
    use serde::{Deserialize, Serialize};

    use super::super::*;
    use crate::testing::{
        self, Lab,
        lab::{HostSpec, RouterSpec, SiteSpec},
    };

    /// What the parent asks the child to sweep.
    #[derive(Debug, Serialize, Deserialize)]
    struct Input {
        targets: Vec<Ipv4Addr>,
        rate_pps: u32,
        concurrency: usize,
        timeout_ms: u64,
        retries: u32,
    }

    /// What the child saw.
    #[derive(Debug, Serialize, Deserialize)]
    struct Output {
        answered: Vec<Ipv4Addr>,
        probed: usize,
        requests_sent: u64,
        errors_received: u64,
        send_failures: u64,
        elapsed_ms: u64,
        /// The socket type the sweep gets in this namespace.
        socket: String,
    }

    /// Not a test on its own: the lab test re-runs this test binary inside the agent's
    /// namespace with this test selected, and it sweeps from there.
    #[test]
    fn child() {
        let Some(input) = testing::child_input::<Input>() else {
            return;
        };
        let _ = tracing_subscriber::fmt()
            .with_env_filter("census_agent=debug")
            .with_writer(std::io::stderr)
            .try_init();
        let cfg = IcmpConfig {
            rate_pps: input.rate_pps,
            concurrency: input.concurrency,
            timeout: Duration::from_millis(input.timeout_ms),
            retries: input.retries,
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let socket = rt
            .block_on(async { SurgeEchoer::open().map(|e| e.socket_type()) })
            .expect("an ICMP socket (as root)");
        let started = Instant::now();
        let r = rt
            .block_on(sweep(&input.targets, &cfg, &CancellationToken::new()))
            .expect("the sweep runs in the lab (as root)");
        testing::child_output(&Output {
            answered: r.replies.iter().map(|r| r.ip).collect(),
            probed: r.probed,
            requests_sent: r.requests_sent,
            errors_received: r.errors_received,
            send_failures: r.send_failures,
            elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            socket,
        });
    }

    fn run_child(lab: &Lab, ns: &str, input: &Input) -> Result<Output> {
        let mut out: Vec<Output> = testing::run_child(
            lab,
            ns,
            "probe::icmp::tests::lab::child",
            input,
            Duration::from_secs(90),
        )?;
        ensure!(out.len() == 1, "expected one result, got {out:?}");
        out.pop().context("one result")
    }

    /// A site LAN with a router to 198.18.1.0/24, where .10 and .11 answer ping and .12
    /// ignores it. Absent addresses draw the router's host unreachable, which must not count
    /// as a reply; a sweep of the whole routed /24 from the agent finds exactly the router's
    /// routed leg and the two live hosts.
    #[test]
    fn lab_sweep_of_a_routed_subnet_finds_exactly_the_live_hosts() -> Result<()> {
        if testing::skip_lab() {
            return Ok(());
        }
        let a = |s: &str| s.parse::<Ipv4Addr>().expect("literal address");
        let lab = Lab::new()?;
        let prefix = lab.prefix().to_owned();
        let site = lab.add_site(SiteSpec::new(
            "icmp",
            "198.18.0.0/24".parse()?,
            a("198.18.0.2"),
        ))?;
        let routed: testing::lab::Ipv4Net = "198.18.1.0/24".parse()?;
        let router = site.add_router(RouterSpec {
            lan_ip: a("198.18.0.1"),
            routed_subnet: routed,
            routed_ip: a("198.18.1.1"),
            lan_mac: None,
        })?;
        router.add_hosts([
            HostSpec::new(a("198.18.1.10")),
            HostSpec::new(a("198.18.1.11")),
            HostSpec::new(a("198.18.1.12")).silent(),
        ])?;
        let agent_ns = site.agent().ns().to_owned();

        // Absent hosts: the router gives up resolving them after ~3 s and says "host
        // unreachable", which surge-ping hands back as the answer to the request. First,
        // while the router's per-destination ICMP rate limit still has its burst: after the
        // /24 sweep it has spent it on that sweep's absent addresses.
        let absent = Input {
            targets: (20..24).map(|n| Ipv4Addr::new(198, 18, 1, n)).collect(),
            rate_pps: 1000,
            concurrency: 16,
            timeout_ms: 6_000,
            retries: 0,
        };
        let out = run_child(&lab, &agent_ns, &absent)?;
        eprintln!("ICMP lab sweep of absent hosts: {out:?}");
        assert!(out.answered.is_empty(), "{out:?}");
        assert!(
            out.errors_received > 0,
            "the router's host unreachable was expected: {out:?}"
        );

        // The whole routed /24, network and broadcast addresses included, at the defaults.
        let d = IcmpConfig::default();
        let whole = Input {
            targets: (u32::from(routed.network())..=u32::from(routed.broadcast()))
                .map(Ipv4Addr::from)
                .collect(),
            rate_pps: d.rate_pps,
            concurrency: d.concurrency,
            timeout_ms: u64::try_from(d.timeout.as_millis())?,
            retries: d.retries,
        };
        ensure!(whole.targets.len() == 256);
        let t = Instant::now();
        let out = run_child(&lab, &agent_ns, &whole)?;
        eprintln!(
            "ICMP lab sweep of {routed} (default config): {} answered in {} ms \
             ({} requests; child run {} ms)",
            out.answered.len(),
            out.elapsed_ms,
            out.requests_sent,
            t.elapsed().as_millis()
        );
        assert_eq!(
            out.answered,
            vec![a("198.18.1.1"), a("198.18.1.10"), a("198.18.1.11")]
        );
        assert_eq!(out.probed, 256);
        // Round 0 asks all 256, the retry the 253 silent ones.
        assert_eq!(out.requests_sent + out.send_failures, 256 + 253);
        // Two rounds of one timeout each, plus pacing: well under the limit.
        assert!(out.elapsed_ms < 5_000, "{out:?}");
        // A new namespace allows no ping sockets (ping_group_range "1 0"): root gets raw.
        assert_eq!(out.socket, "SOCK_RAW");

        // Allowed unprivileged ping sockets, the sweep uses one: the kernel then owns the
        // identifier and surge-ping routes by address and sequence number alone.
        lab.exec_ok(
            &agent_ns,
            ["sysctl", "-w", "net.ipv4.ping_group_range=0 2147483647"],
        )?;
        let few = Input {
            targets: [1, 10, 11, 12, 13, 255]
                .map(|n| Ipv4Addr::new(198, 18, 1, n))
                .to_vec(),
            ..whole
        };
        let out = run_child(&lab, &agent_ns, &few)?;
        eprintln!("ICMP lab sweep over a ping socket: {out:?}");
        assert_eq!(out.socket, "SOCK_DGRAM");
        assert_eq!(
            out.answered,
            vec![a("198.18.1.1"), a("198.18.1.10"), a("198.18.1.11")]
        );

        drop(router);
        drop(site);
        drop(lab);
        let left = census_tests::lab::namespaces_with_prefix(&prefix);
        assert!(left.is_empty(), "namespaces left behind: {left:?}");
        Ok(())
    }
}
