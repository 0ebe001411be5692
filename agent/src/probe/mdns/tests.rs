//! Tests of mDNS discovery: the pure [`Collector`] (grouping, scopes, caps, hostile sizes) and,
//! on Unix as root, a real browse of python3-zeroconf responders in a lab site.

use super::*;

fn net(s: &str) -> Ipv4Net {
    s.parse().expect("a valid test CIDR")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("a valid test address")
}

fn resolved(host: &str, instance: &str, ty: &str, addrs: &[&str]) -> Resolved {
    Resolved {
        fullname: format!("{instance}.{ty}"),
        service_type: ty.to_string(),
        host: host.to_string(),
        port: 631,
        addresses: addrs.iter().map(|a| ip(a)).collect(),
        txt: vec![("ty".to_string(), Some(b"Laser".to_vec()))],
    }
}

fn collector() -> Collector {
    Collector::new(vec![net("10.0.0.0/24")])
}

// === grouping ===

#[test]
fn groups_instances_by_host_case_insensitively() {
    let mut c = collector();
    c.add_resolved(resolved(
        "printer.local.",
        "P1",
        "_ipp._tcp.local.",
        &["10.0.0.5"],
    ));
    c.add_resolved(resolved(
        "PRINTER.local.",
        "P1",
        "_printer._tcp.local.",
        &["10.0.0.5", "10.0.0.6"],
    ));
    c.add_resolved(resolved(
        "nas.local.",
        "NAS",
        "_smb._tcp.local.",
        &["10.0.0.9"],
    ));
    let r = c.finish();
    assert_eq!(r.hosts.len(), 2);
    let nas = &r.hosts[0];
    assert_eq!(nas.identity.host_name, "nas.local.");
    let printer = &r.hosts[1];
    assert_eq!(
        printer.identity.host_name, "printer.local.",
        "first spelling kept"
    );
    assert_eq!(printer.addresses, vec![ip4("10.0.0.5"), ip4("10.0.0.6")]);
    let types: Vec<&str> = printer
        .identity
        .services
        .iter()
        .map(|s| s.service_type.as_str())
        .collect();
    assert_eq!(types, ["_ipp._tcp.local.", "_printer._tcp.local."]);
    assert_eq!(printer.identity.services[0].instance, "P1._ipp._tcp.local.");
    assert_eq!(printer.identity.services[0].port, 631);
    assert_eq!(
        printer.identity.services[0].txt,
        vec![v1::TxtRecord {
            key: "ty".into(),
            value: "Laser".into()
        }]
    );
}

fn ip4(s: &str) -> Ipv4Addr {
    s.parse().expect("a valid test address")
}

#[test]
fn repeats_replace_and_never_duplicate() {
    let mut c = collector();
    for i in 0..1000 {
        let mut r = resolved("tv.local.", "TV", "_airplay._tcp.local.", &["10.0.0.7"]);
        r.port = 7000 + (i % 3);
        r.txt = vec![("model".into(), Some(format!("v{i}").into_bytes()))];
        c.add_resolved(r);
    }
    // The same instance with different case is the same instance.
    let mut r = resolved("tv.local.", "tv", "_AIRPLAY._tcp.local.", &["10.0.0.7"]);
    r.fullname = "TV._airplay._tcp.local.".to_ascii_uppercase();
    r.port = 7001;
    c.add_resolved(r);
    let res = c.finish();
    assert_eq!(res.hosts.len(), 1);
    let services = &res.hosts[0].identity.services;
    assert_eq!(services.len(), 1, "{services:?}");
    assert_eq!(services[0].port, 7001, "the latest resolution wins");
}

#[test]
fn an_instance_that_moves_host_leaves_the_old_one() {
    let mut c = collector();
    c.add_resolved(resolved(
        "a.local.",
        "X",
        "_http._tcp.local.",
        &["10.0.0.1"],
    ));
    c.add_resolved(resolved(
        "b.local.",
        "X",
        "_http._tcp.local.",
        &["10.0.0.2"],
    ));
    let r = c.finish();
    assert_eq!(r.hosts.len(), 1, "a.local. has no service left: {r:?}");
    assert_eq!(r.hosts[0].identity.host_name, "b.local.");
    assert_eq!(r.hosts[0].addresses, vec![ip4("10.0.0.2")]);
}

// === scopes ===

#[test]
fn keeps_only_ipv4_addresses_inside_the_scopes() {
    let mut c = Collector::new(vec![net("10.0.0.0/24"), net("192.168.1.0/24")]);
    c.add_resolved(resolved(
        "mixed.local.",
        "M",
        "_ssh._tcp.local.",
        &[
            "10.0.0.3",
            "172.16.0.3",
            "fe80::1",
            "192.168.1.3",
            "10.0.0.3",
        ],
    ));
    c.add_resolved(resolved(
        "outside.local.",
        "O",
        "_ssh._tcp.local.",
        &["172.16.0.9"],
    ));
    c.add_resolved(resolved(
        "v6only.local.",
        "V",
        "_ssh._tcp.local.",
        &["2001:db8::1"],
    ));
    c.add_resolved(resolved("noaddr.local.", "N", "_ssh._tcp.local.", &[]));
    assert_eq!(c.dropped.out_of_scope, 3);
    let r = c.finish();
    assert_eq!(r.hosts.len(), 1, "{r:?}");
    assert_eq!(r.hosts[0].identity.host_name, "mixed.local.");
    assert_eq!(
        r.hosts[0].addresses,
        vec![ip4("10.0.0.3"), ip4("192.168.1.3")]
    );
}

#[test]
fn no_scope_keeps_nothing() {
    let mut c = Collector::new(Vec::new());
    c.add_resolved(resolved("a.local.", "A", "_ssh._tcp.local.", &["10.0.0.1"]));
    assert!(c.finish().hosts.is_empty());
}

#[test]
fn unnamed_instances_are_dropped() {
    let mut c = collector();
    c.add_resolved(resolved("", "A", "_ssh._tcp.local.", &["10.0.0.1"]));
    let mut r = resolved("a.local.", "A", "_ssh._tcp.local.", &["10.0.0.1"]);
    r.fullname.clear();
    c.add_resolved(r);
    assert_eq!(c.dropped.unnamed, 2);
    assert!(c.finish().hosts.is_empty());
}

// === service types ===

#[test]
fn service_types_are_validated_canonical_and_deduplicated() {
    let mut c = collector();
    assert_eq!(
        c.add_type("_ipp._tcp.local."),
        Some("_ipp._tcp.local.".to_string())
    );
    assert_eq!(
        c.add_type("_IPP._TCP.local."),
        None,
        "a repeat in other case"
    );
    assert_eq!(
        c.add_type("_Sleep-Proxy._UDP.Local."),
        Some("_sleep-proxy._udp.local.".to_string())
    );
    for bad in [
        "",
        "_ipp._tcp.local",
        "_ipp._tcp.example.",
        "ipp._tcp.local.",
        "_._tcp.local.",
        "_printer._sub._http._tcp.local.",
        META_QUERY,
        "_a b._tcp.local.",
        "_a\u{0}._tcp.local.",
        "_é._tcp.local.",
        &format!("_{}._tcp.local.", "x".repeat(64)),
        &format!("_{}._tcp.local.", "x".repeat(10_000)),
    ] {
        assert_eq!(c.add_type(bad), None, "{bad:?}");
    }
    assert_eq!(c.dropped.bad_types, 12);
    assert_eq!(
        c.finish().service_types,
        ["_ipp._tcp.local.", "_sleep-proxy._udp.local."]
    );
}

#[test]
fn service_types_are_capped() {
    let mut c = collector();
    let browsed = (0..10_000)
        .filter_map(|i| c.add_type(&format!("_t{i}._tcp.local.")))
        .count();
    assert_eq!(browsed, MAX_SERVICE_TYPES);
    assert_eq!(c.dropped.types_over_cap, 10_000 - MAX_SERVICE_TYPES);
    assert_eq!(c.finish().service_types.len(), MAX_SERVICE_TYPES);
}

// === hostile sizes ===

#[test]
fn hosts_and_services_are_capped() {
    let mut c = Collector::new(vec![net("10.0.0.0/8")]);
    for i in 0..10_000_u32 {
        let addr = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        let mut r = resolved(
            &format!("h{i}.local."),
            &format!("S{i}"),
            "_ssh._tcp.local.",
            &[],
        );
        r.addresses = vec![addr];
        c.add_resolved(r);
    }
    assert_eq!(c.dropped.hosts_over_cap, 10_000 - MAX_HOSTS);
    let r = c.finish();
    assert_eq!(r.hosts.len(), MAX_HOSTS);

    let mut c = collector();
    for i in 0..1000 {
        c.add_resolved(resolved(
            "busy.local.",
            &format!("S{i}"),
            "_http._tcp.local.",
            &["10.0.0.1"],
        ));
    }
    assert_eq!(c.dropped.services_over_cap, 1000 - MAX_SERVICES_PER_HOST);
    let r = c.finish();
    assert_eq!(r.hosts[0].identity.services.len(), MAX_SERVICES_PER_HOST);

    // The total cap holds however the instances are spread.
    let mut c = Collector::new(vec![net("10.0.0.0/8")]);
    for i in 0..(MAX_SERVICES_TOTAL as u32 * 2) {
        let host = i / MAX_SERVICES_PER_HOST as u32;
        let mut r = resolved(
            &format!("h{host}.local."),
            &format!("S{i}"),
            "_a._tcp.local.",
            &[],
        );
        r.addresses = vec![IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + host))];
        c.add_resolved(r);
    }
    let total: usize = c
        .finish()
        .hosts
        .iter()
        .map(|h| h.identity.services.len())
        .sum();
    assert_eq!(total, MAX_SERVICES_TOTAL);
}

#[test]
fn addresses_per_host_are_capped() {
    let mut c = Collector::new(vec![net("10.0.0.0/8")]);
    for s in 0..4_u32 {
        let mut r = resolved("many.local.", &format!("S{s}"), "_a._tcp.local.", &[]);
        r.addresses = (0..1000)
            .map(|i| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + s * 1000 + i)))
            .collect();
        c.add_resolved(r);
    }
    let r = c.finish();
    assert_eq!(r.hosts[0].addresses.len(), MAX_ADDRESSES);
    assert!(r.hosts[0].addresses.is_sorted());
}

#[test]
fn txt_records_are_capped_by_count_and_bytes() {
    let mut c = collector();
    let mut r = resolved("t.local.", "T", "_a._tcp.local.", &["10.0.0.1"]);
    r.txt = (0..1000)
        .map(|i| (format!("k{i}"), Some(b"v".to_vec())))
        .collect();
    c.add_resolved(r);
    let mut r = resolved("t.local.", "U", "_b._tcp.local.", &["10.0.0.1"]);
    r.txt = (0..20)
        .map(|i| (format!("k{i}"), Some(vec![b'x'; 200])))
        .collect();
    c.add_resolved(r);
    let r = c.finish();
    let services = &r.hosts[0].identity.services;
    assert_eq!(services[0].txt.len(), MAX_TXT_PER_SERVICE);
    let bytes: usize = services[1]
        .txt
        .iter()
        .map(|t| t.key.len() + t.value.len())
        .sum();
    assert!(bytes <= MAX_TXT_BYTES_PER_SERVICE, "{bytes}");
    assert_eq!(
        services[1].txt.len(),
        5,
        "five 202-byte records fit in 1024"
    );
}

#[test]
fn long_and_odd_strings_are_cut_and_cleaned() {
    let mut c = collector();
    // Multi-byte characters straddle the 255-byte limit.
    let long = "é".repeat(10_000);
    let mut r = resolved(&long, &long, "_a._tcp.local.", &["10.0.0.1"]);
    r.fullname = format!("{long}\u{7}._a._tcp.local.");
    r.txt = vec![
        (long.clone(), Some(long.clone().into_bytes())),
        ("bin".into(), Some(vec![0xff, 0xfe, b'o', b'k', 0xc3])),
        ("flag".into(), None),
        (String::new(), Some(b"no key".to_vec())),
        ("nl".into(), Some(b"a\nb".to_vec())),
    ];
    c.add_resolved(r);
    let r = c.finish();
    let host = &r.hosts[0];
    assert!(host.identity.host_name.len() <= MAX_STRING_BYTES);
    assert_eq!(host.identity.host_name, "é".repeat(127));
    let svc = &host.identity.services[0];
    assert!(svc.instance.len() <= MAX_STRING_BYTES);
    let txt: Vec<(&str, &str)> = svc
        .txt
        .iter()
        .map(|t| (t.key.as_str(), t.value.as_str()))
        .collect();
    assert_eq!(txt[0].0.len(), 254);
    assert_eq!(txt[0].1.len(), 254);
    assert_eq!(txt[1], ("bin", "\u{fffd}\u{fffd}ok\u{fffd}"));
    assert_eq!(txt[2], ("flag", ""));
    assert_eq!(txt[3], ("nl", "a\u{fffd}b"), "empty keys are skipped");
    assert_eq!(txt.len(), 4);
}

#[test]
fn clean_is_idempotent_and_never_splits_characters() {
    for s in [
        "plain",
        "",
        &"a".repeat(300),
        &"€".repeat(300),
        &"😀".repeat(300),
        &format!("a{}", "😀".repeat(300)),
        "tab\there",
    ] {
        let once = clean(s);
        assert!(once.len() <= MAX_STRING_BYTES);
        assert_eq!(clean(&once), once);
        assert!(!once.chars().any(char::is_control));
    }
    // A cut inside a multi-byte sequence of raw bytes never leaves a partial character.
    let raw: Vec<u8> = "€".repeat(200).into_bytes();
    for len in 250..270 {
        let s = clean_bytes(&raw[..len]);
        assert!(s.len() <= MAX_STRING_BYTES);
        assert!(s.chars().all(|c| c == '€' || c == '\u{fffd}'), "{len}: {s}");
    }
    assert_eq!(clean_bytes_prefix(&[0; 10_000]).len(), MAX_STRING_BYTES + 3);
}

#[test]
fn config_default_window_is_three_seconds() {
    assert_eq!(MdnsConfig::default().window, Duration::from_secs(3));
}

#[tokio::test]
async fn nothing_to_browse_returns_at_once() {
    let cancel = CancellationToken::new();
    let cfg = MdnsConfig {
        scopes: vec![net("10.0.0.0/24")],
        window: Duration::from_secs(60),
        ..MdnsConfig::default()
    };
    let started = std::time::Instant::now();
    let r = sweep(&cfg, &cancel).await.expect("an empty sweep");
    assert_eq!(r, MdnsSweepResult::default());
    assert!(started.elapsed() < Duration::from_secs(1));
}

// === lab ===

#[cfg(unix)]
mod lab {
    use std::time::Instant;

    use census_tests::lab::{HostSpec, MdnsService, MdnsSpec, SiteSpec};
    use serde_json::{Value, json};

    use super::*;
    use crate::testing::{Lab, child_input, child_output, run_child, skip_lab};

    const CHILD: &str = "probe::mdns::tests::lab::child";

    /// A service type nobody on the site LAN advertises: a responder on the core network (the
    /// agent's uplink) announces it, so seeing it means the browse left `eth0`.
    const DECOY_TYPE: &str = "_censusdecoy._tcp.local.";

    fn service(instance: &str, ty: &str, port: u16, txt: &[(&str, &str)]) -> MdnsService {
        MdnsService {
            instance: instance.to_string(),
            service_type: ty.to_string(),
            port,
            txt: txt
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// Names of this process's threads that belong to an mdns-sd daemon.
    fn daemon_threads() -> Vec<String> {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return Vec::new();
        };
        tasks
            .filter_map(|t| t.ok())
            .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
            .map(|c| c.trim().to_string())
            .filter(|c| c.starts_with("mDNS"))
            .collect()
    }

    /// Waits (briefly) for every daemon thread to exit; the daemon confirms its shutdown just
    /// before its thread returns.
    fn assert_no_daemon_thread(when: &str) {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let left = daemon_threads();
            if left.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{when}: mdns-sd threads left: {left:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The parent: a site with three responders and a decoy on the core network; the child
    /// browses from the agent's namespace.
    #[test]
    fn finds_lab_responders() {
        if skip_lab() {
            return;
        }
        let started = Instant::now();
        let lab = Lab::new().expect("creating the lab");
        let subnet = net("198.18.0.0/24");
        let site = lab
            .add_site(SiteSpec::new("mdns", subnet, Ipv4Addr::new(198, 18, 0, 2)))
            .expect("adding the site");
        let hosts = [
            (
                Ipv4Addr::new(198, 18, 0, 10),
                MdnsSpec {
                    host_name: "printer".into(),
                    services: vec![
                        service(
                            "Office Printer",
                            "_ipp._tcp",
                            631,
                            &[("ty", "Office LaserJet")],
                        ),
                        service(
                            "Office Printer",
                            "_printer._tcp",
                            515,
                            &[("ty", "Office LaserJet")],
                        ),
                    ],
                },
            ),
            (
                Ipv4Addr::new(198, 18, 0, 11),
                MdnsSpec {
                    host_name: "speaker".into(),
                    services: vec![
                        service(
                            "Living Room",
                            "_airplay._tcp",
                            7000,
                            &[("model", "AudioAccessory5,1")],
                        ),
                        service(
                            "00163E00000B@Living Room",
                            "_raop._tcp",
                            7000,
                            &[("model", "AudioAccessory5,1")],
                        ),
                    ],
                },
            ),
            (
                Ipv4Addr::new(198, 18, 0, 12),
                MdnsSpec {
                    host_name: "ws-1".into(),
                    services: vec![
                        service("ws-1", "_ssh._tcp", 22, &[]),
                        service("ws-1 [00:16:3e:00:00:0c]", "_workstation._tcp", 9, &[]),
                    ],
                },
            ),
        ];
        for (addr, spec) in &hosts {
            let host = site.add_host(HostSpec::new(*addr)).expect("adding a host");
            host.run_mdns(spec).expect("starting an mDNS responder");
        }
        start_decoy(&lab);
        let built = started.elapsed();

        let input = json!({
            "interface": "eth0",
            "scope": subnet.to_string(),
            "window_ms": 3000,
        });
        let out: Vec<Value> = run_child(
            &lab,
            site.agent().ns(),
            CHILD,
            &input,
            Duration::from_secs(90),
        )
        .expect("the child browse");
        assert_eq!(out.len(), 1, "{out:?}");
        let out = &out[0];
        eprintln!(
            "lab built in {built:?}; browse took {} ms; cancel {} ms; drop {} ms",
            out["elapsed_ms"], out["cancel_ms"], out["drop_ms"]
        );

        let types: Vec<&str> = out["service_types"]
            .as_array()
            .expect("service_types")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            !types.contains(&DECOY_TYPE),
            "the browse left eth0 (saw the core network's decoy): {types:?}"
        );
        for ty in [
            "_ipp._tcp.local.",
            "_printer._tcp.local.",
            "_airplay._tcp.local.",
            "_raop._tcp.local.",
            "_ssh._tcp.local.",
            "_workstation._tcp.local.",
        ] {
            assert!(types.contains(&ty), "{ty} missing from {types:?}");
        }

        let got = out["hosts"].as_array().expect("hosts");
        assert_eq!(got.len(), hosts.len(), "{got:#?}");
        for (addr, spec) in &hosts {
            let name = format!("{}.local.", spec.host_name);
            let host = got
                .iter()
                .find(|h| h["host_name"] == name.as_str())
                .unwrap_or_else(|| panic!("{name} not found in {got:#?}"));
            assert_eq!(host["addresses"], json!([addr.to_string()]), "{name}");
            let services = host["services"].as_array().expect("services");
            assert_eq!(services.len(), spec.services.len(), "{name}: {services:#?}");
            for want in &spec.services {
                let ty = format!("{}.local.", want.service_type);
                let instance = format!("{}.{ty}", want.instance);
                let svc = services
                    .iter()
                    .find(|s| s["service_type"] == ty.as_str())
                    .unwrap_or_else(|| panic!("{name}: {ty} missing: {services:#?}"));
                assert_eq!(svc["instance"], instance.as_str(), "{name}");
                assert_eq!(svc["port"], want.port, "{name} {ty}");
                let txt: Vec<(String, String)> =
                    serde_json::from_value(svc["txt"].clone()).expect("txt pairs");
                let mut want_txt = want.txt.clone();
                want_txt.sort();
                assert_eq!(txt, want_txt, "{name} {ty}");
            }
        }
        drop(lab);
    }

    /// A python3-zeroconf responder in the core namespace (the collector's address) that
    /// announces [`DECOY_TYPE`]; returns once it is registered.
    fn start_decoy(lab: &Lab) {
        let dir = lab.dir().join("mdns-decoy");
        std::fs::create_dir_all(&dir).expect("creating the decoy's dir");
        let script = dir.join("mdns_responder.py");
        std::fs::write(
            &script,
            include_str!("../../../../tests/src/lab/mdns_responder.py"),
        )
        .expect("writing the responder script");
        let spec = dir.join("spec.json");
        let json = json!({
            "ip": lab.collector_ip().to_string(),
            "host_name": "decoy",
            "services": [{
                "instance": "Decoy",
                "type": DECOY_TYPE,
                "port": 9,
                "txt": {},
            }],
        });
        std::fs::write(&spec, json.to_string()).expect("writing the decoy's spec");
        let ready = dir.join("ready");
        let proc = lab
            .spawn(
                lab.core_ns(),
                [
                    std::ffi::OsStr::new("/usr/bin/python3"),
                    std::ffi::OsStr::new("-I"),
                    script.as_os_str(),
                    spec.as_os_str(),
                    ready.as_os_str(),
                ],
            )
            .expect("starting the decoy responder");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready.exists() {
            assert!(proc.is_running(), "the decoy exited:\n{}", proc.log());
            assert!(Instant::now() < deadline, "the decoy was not ready in time");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The child, in the agent's namespace: one full browse, then a cancelled one and a
    /// dropped one, checking that each returns on time and leaves no daemon thread.
    #[tokio::test]
    async fn child() {
        let Some(input) = child_input::<Value>() else {
            return;
        };
        let cfg = MdnsConfig {
            interfaces: vec![input["interface"].as_str().expect("interface").to_string()],
            scopes: vec![net(input["scope"].as_str().expect("scope"))],
            window: Duration::from_millis(input["window_ms"].as_u64().expect("window_ms")),
        };
        let started = Instant::now();
        let result = sweep(&cfg, &CancellationToken::new())
            .await
            .expect("the browse");
        let elapsed = started.elapsed();
        assert!(
            elapsed < cfg.window + SHUTDOWN_GRACE,
            "the browse took {elapsed:?}"
        );
        assert_no_daemon_thread("after a browse");

        // Cancelled early: returns promptly.
        let cancel = CancellationToken::new();
        let long = MdnsConfig {
            window: Duration::from_secs(30),
            ..cfg.clone()
        };
        let trigger = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            trigger.cancel();
        });
        let t = Instant::now();
        sweep(&long, &cancel).await.expect("a cancelled browse");
        let cancel_ms = t.elapsed().as_millis();
        assert!(t.elapsed() < Duration::from_millis(300) + SHUTDOWN_GRACE);
        assert_no_daemon_thread("after a cancelled browse");

        // Dropped mid-browse (a caller's timeout): the daemon still goes.
        let t = Instant::now();
        let never = CancellationToken::new();
        let timed_out =
            tokio::time::timeout(Duration::from_millis(300), sweep(&long, &never)).await;
        assert!(timed_out.is_err());
        let drop_ms = t.elapsed().as_millis();
        assert_no_daemon_thread("after a dropped browse");

        let hosts: Vec<Value> = result
            .hosts
            .iter()
            .map(|h| {
                json!({
                    "host_name": h.identity.host_name,
                    "addresses": h.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "services": h.identity.services.iter().map(|s| {
                        let mut txt: Vec<(String, String)> = s
                            .txt
                            .iter()
                            .map(|t| (t.key.clone(), t.value.clone()))
                            .collect();
                        txt.sort();
                        json!({
                            "instance": s.instance,
                            "service_type": s.service_type,
                            "port": s.port,
                            "txt": txt,
                        })
                    }).collect::<Vec<_>>(),
                })
            })
            .collect();
        child_output(&json!({
            "elapsed_ms": elapsed.as_millis() as u64,
            "cancel_ms": cancel_ms as u64,
            "drop_ms": drop_ms as u64,
            "service_types": result.service_types,
            "hosts": hosts,
        }));
    }
}
