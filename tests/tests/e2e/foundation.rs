//! The foundation end to end: two clients whose sites use the same /24, real agents sweeping
//! real namespaces, exact counts per client, counts kept across a collector restart, and the
//! one-line errors people get for bad input.

use std::net::Ipv4Addr;

use anyhow::Result;
use census_tests::{
    lab::{HostSpec, Lab, SiteSpec, lab_skipped, mac_string},
    support::{self, Collector},
};

fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("test address")
}

/// Builds a site on 198.18.0.0/24 with `count` hosts from .10 whose MACs carry `tag`.
fn hosts(count: u32, tag: u8) -> Vec<HostSpec> {
    (0..count)
        .map(|i| {
            let spec = HostSpec::new(Ipv4Addr::from(u32::from(ip("198.18.0.10")) + i)).with_mac([
                0x00,
                0x16,
                0x3e,
                tag,
                0x00,
                u8::try_from(i).expect("few hosts"),
            ]);
            // Every third host drops ICMP: ARP must find it all the same.
            if i % 3 == 2 { spec.silent() } else { spec }
        })
        .collect()
}

#[test]
fn two_clients_with_the_same_subnet_are_counted_exactly_and_survive_a_restart() -> Result<()> {
    if lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let subnet = "198.18.0.0/24".parse()?;
    let acme = lab.add_site(SiteSpec::new("acme-hq", subnet, ip("198.18.0.2")))?;
    let globex = lab.add_site(SiteSpec::new("globex-hq", subnet, ip("198.18.0.2")))?;
    let acme_hosts = acme.add_hosts(hosts(5, 0xa1))?;
    let globex_hosts = globex.add_hosts(hosts(8, 0xb2))?;

    let data = lab.dir().join("collector");
    let collector = Collector::start(&lab, &data)?;
    for (client, site) in [("acme", &acme), ("globex", &globex)] {
        let state = collector.enroll(client, "hq")?;
        let out = support::agent_once(
            &lab,
            site.agent().ns(),
            [
                "--collector",
                &collector.url(),
                "--state-dir",
                state.to_str().expect("utf-8 path"),
                "--scope",
                "198.18.0.0/24",
            ],
        )?;
        assert!(
            out.status.success(),
            "agent for {client} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let counts = collector.counts()?;
    assert_eq!(counts.len(), 2, "{counts:?}");
    for c in &counts {
        assert_eq!(c.users, 0);
        assert!(!c.as_of.is_empty() && !c.policy_version.is_empty(), "{c:?}");
    }
    assert_eq!(collector.devices_of("acme")?, 5);
    assert_eq!(collector.devices_of("globex")?, 8);

    // Each client holds exactly its own site's MACs, at the shared addresses.
    for (client, built) in [("acme", &acme_hosts), ("globex", &globex_hosts)] {
        let mut want: Vec<(String, String)> = built
            .iter()
            .map(|h| (mac_string(h.mac()), h.ip().to_string()))
            .collect();
        want.sort();
        let mut got: Vec<(String, String)> = collector
            .devices(client)?
            .into_iter()
            .map(|d| {
                assert!(d.counted && d.client == client && d.site == "hq", "{d:?}");
                assert_eq!(d.evidence.len(), 1, "{d:?}");
                assert_eq!(d.evidence[0].method, "arp");
                assert!(!d.first_seen.is_empty() && !d.last_seen.is_empty());
                assert!(d.addresses.iter().all(|a| a.answered));
                (d.macs.join(","), d.addresses[0].address.clone())
            })
            .collect();
        got.sort();
        assert_eq!(got, want, "devices of {client}");
    }

    // A restart on the same data directory answers the same counts.
    let collector = collector.restart()?;
    assert_eq!(collector.devices_of("acme")?, 5);
    assert_eq!(collector.devices_of("globex")?, 8);
    Ok(())
}

#[test]
fn bad_input_gets_one_clear_line_and_writes_nothing() -> Result<()> {
    if lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let site = lab.add_site(SiteSpec::new(
        "site",
        "198.18.0.0/24".parse()?,
        ip("198.18.0.2"),
    ))?;
    site.add_host(HostSpec::new(ip("198.18.0.10")))?;
    let collector = Collector::start(&lab, &lab.dir().join("collector"))?;
    let state = collector.enroll("acme", "hq")?;
    let state_arg = state.to_str().expect("utf-8 path");
    let ns = site.agent().ns();
    let url = collector.url();

    let cases: [(&str, Vec<&str>, i32, &str); 4] = [
        (
            "unreachable collector",
            vec![
                "--collector",
                "https://198.19.255.1:9",
                "--scope",
                "198.18.0.0/24",
            ],
            69,
            "cannot reach the collector",
        ),
        (
            "malformed scope",
            vec!["--collector", &url, "--scope", "198.18.0.0/33"],
            64,
            "is not a CIDR",
        ),
        (
            "scope outside every interface",
            vec!["--collector", &url, "--scope", "198.18.99.0/24"],
            64,
            "not on-link",
        ),
        (
            "scope too large",
            vec!["--collector", &url, "--scope", "198.18.0.0/15"],
            64,
            "--allow-large-scope",
        ),
    ];
    for (what, args, code, needle) in cases {
        let mut full = args.clone();
        full.extend(["--state-dir", state_arg]);
        let out = support::agent_once(&lab, ns, &full)?;
        let errors = support::error_lines(&out);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            errors.len(),
            1,
            "{what}: expected one error line, got {errors:?}"
        );
        assert!(
            errors[0].contains(needle),
            "{what}: {:?} lacks {needle:?}",
            errors[0]
        );
        assert!(!errors[0].contains("\n"));
    }
    // None of those runs delivered anything.
    assert_eq!(collector.devices_of("acme")?, 0);

    // A wrong enrollment token is refused, clearly (a fresh agent enrolls on its first run).
    let wrong = support::token_file(
        &lab,
        "cen1_0000000000000000_0000000000000000000000000000000000000000000000000000000000000000",
    )?;
    let fresh = lab.dir().join("fresh-agent");
    std::fs::create_dir(&fresh)?;
    let ca = collector.ca_file();
    let out = support::agent_once(
        &lab,
        ns,
        [
            "--collector",
            &collector.url(),
            "--scope",
            "198.18.0.0/24",
            "--token-file",
            wrong.to_str().expect("utf-8"),
            "--ca-file",
            ca.to_str().expect("utf-8"),
            "--state-dir",
            fresh.to_str().expect("utf-8"),
        ],
    )?;
    assert_eq!(
        out.status.code(),
        Some(77),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let errors = support::error_lines(&out);
    assert!(
        errors.len() == 1 && errors[0].contains("unknown or wrong enrollment token"),
        "{errors:?}"
    );
    assert_eq!(collector.devices_of("acme")?, 0);

    // An agent's credentials are not the operator's: refused, clearly.
    let bin = support::bin("census")?;
    let out = lab.exec(
        lab.core_ns(),
        [
            bin.to_str().expect("utf-8"),
            "--collector",
            &collector.url(),
            "--credentials",
            state.join("identity").to_str().expect("utf-8"),
            "counts",
        ],
    )?;
    assert_eq!(out.status.code(), Some(77));
    let errors = support::error_lines(&out);
    assert!(
        errors.len() == 1 && errors[0].contains("refused the operator's credentials"),
        "{errors:?}"
    );
    // So is plaintext: the collector speaks only mutual TLS.
    let plain = collector.url().replace("https://", "http://");
    let out = lab.exec(
        lab.core_ns(),
        [
            bin.to_str().expect("utf-8"),
            "--collector",
            &plain,
            "--credentials",
            collector.credentials().to_str().expect("utf-8"),
            "counts",
        ],
    )?;
    assert_ne!(out.status.code(), Some(0), "plaintext must not be served");
    assert_eq!(support::error_lines(&out).len(), 1, "{out:?}");

    // A missing data directory: one line, exit 64, and the directory is not created.
    let missing = lab.dir().join("no-such-dir");
    let bin = support::bin("census-collector")?;
    let out = std::process::Command::new(&bin)
        .args(["validate", "--data-dir"])
        .arg(&missing)
        .output()?;
    assert_eq!(out.status.code(), Some(64));
    let errors = support::error_lines(&out);
    assert!(
        errors.len() == 1 && errors[0].contains("does not exist"),
        "{errors:?}"
    );
    let out = lab.exec(
        lab.core_ns(),
        [
            bin.to_str().expect("utf-8"),
            "serve",
            "--listen",
            "198.19.255.1:0",
            "--data-dir",
            missing.to_str().expect("utf-8"),
        ],
    )?;
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(support::error_lines(&out).len(), 1);
    assert!(
        !missing.exists(),
        "a failed start must not create the data directory"
    );
    Ok(())
}
