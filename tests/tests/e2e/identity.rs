//! Device identity end to end: real agents sweep lab sites built to trip identity resolution
//! up, and the collector's `census counts --json` / `census devices --json` must give the exact
//! count and the right identities. A multi-homed host is one device; a host that moves is one
//! device, and a host that takes its old address over is another; two agents at one site see
//! one set of devices; two clients with identical subnets, addresses and even MACs never meet;
//! a VRRP virtual address and the addresses a proxy-ARP router answers for are not devices;
//! phones that rotate their random MAC stay one device each through their mDNS name; and a
//! collector killed in the middle of ingest loses no acknowledged batch. A Linux host with two
//! NICs and a bridge is a server, not network gear; an address is current only when answered
//! in the device's latest sighting at its site (a host that moved, a laptop that roamed).

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use census_tests::{
    lab::{
        HostSpec, Ipv4Net, Lab, MdnsService, MdnsSpec, Proc, RouterSpec, SiteSpec, SnmpdSpec,
        lab_skipped, mac_string, vrrp_mac,
    },
    support::{self, COLLECTOR_PORT, Collector, Device},
};

fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("test address")
}

/// A state directory with an agent enrolled into (client, site), for `--state-dir`.
fn enrolled(collector: &Collector<'_>, client: &str, site: &str) -> Result<PathBuf> {
    collector.enroll(client, site)
}

/// One `census-agent run --once` in `ns` against `collector`, which must succeed.
fn sweep(
    lab: &Lab,
    collector: &Collector<'_>,
    ns: &str,
    state: &Path,
    args: &[&str],
) -> Result<()> {
    let url = collector.url();
    let mut full = vec!["--collector", &url];
    // The enrolled state directory, unless the caller names it in `args`.
    if !args.contains(&"--state-dir") {
        full.extend(["--state-dir", state.to_str().context("utf-8 path")?]);
    }
    full.extend_from_slice(args);
    let out = support::agent_once(lab, ns, &full)?;
    ensure!(
        out.status.success(),
        "the agent in {ns} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The one device of `devices` that has `mac`.
fn with_mac(devices: &[Device], mac: [u8; 6]) -> Result<&Device> {
    let mac = mac_string(mac);
    let found: Vec<&Device> = devices.iter().filter(|d| d.macs.contains(&mac)).collect();
    match found.as_slice() {
        [one] => Ok(one),
        _ => bail!(
            "{} devices have MAC {mac}, not one: {devices:#?}",
            found.len()
        ),
    }
}

/// The devices of `devices` that list `addr` among their addresses.
fn at<'a>(devices: &'a [Device], addr: &str) -> Vec<&'a Device> {
    devices
        .iter()
        .filter(|d| d.address(addr).is_some())
        .collect()
}

fn macs(list: &[[u8; 6]]) -> Vec<String> {
    let mut out: Vec<String> = list.iter().map(|m| mac_string(*m)).collect();
    out.sort();
    out
}

fn strings(list: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = list.iter().map(|s| (*s).to_owned()).collect();
    out.sort();
    out
}

#[test]
fn a_multihomed_host_is_one_device_with_both_macs_and_addresses() -> Result<()> {
    if lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let site = lab.add_site(SiteSpec::new(
        "dual",
        "198.18.50.0/24".parse()?,
        ip("198.18.50.2"),
    ))?;
    let (nic_a, nic_b) = (
        [0x00, 0x16, 0x3e, 0x50, 0x00, 0x0a],
        [0x00, 0x16, 0x3e, 0x50, 0x00, 0x0b],
    );
    let server = site.add_multihomed_host(
        HostSpec::new(ip("198.18.50.10")).with_mac(nic_a),
        HostSpec::new(ip("198.18.50.11")).with_mac(nic_b),
    )?;
    server.run_snmpd(&SnmpdSpec::v2c("census-mh", "dual-nic-server"))?;
    let plain = site.add_host(HostSpec::new(ip("198.18.50.20")))?;

    let collector = Collector::start(&lab, &lab.dir().join("collector"))?;
    let token = enrolled(&collector, "acme", "hq")?;
    sweep(
        &lab,
        &collector,
        site.agent().ns(),
        &token,
        &[
            "--scope",
            "198.18.50.0/24",
            "--snmp-community",
            "census-mh",
            "--disable",
            "mdns",
        ],
    )?;

    assert_eq!(
        collector.devices_of("acme")?,
        2,
        "the server and the plain host"
    );
    let devices = collector.devices("acme")?;
    let dev = with_mac(&devices, nic_a)?;
    assert_eq!(dev.macs, macs(&[nic_a, nic_b]), "{dev:#?}");
    assert_eq!(dev.identifiers_of("mac"), macs(&[nic_a, nic_b]), "{dev:#?}");
    assert_eq!(
        dev.address_list(),
        strings(&["198.18.50.10", "198.18.50.11"]),
        "{dev:#?}"
    );
    assert!(
        dev.addresses.iter().all(|a| a.answered && a.current),
        "{dev:#?}"
    );
    assert!(
        dev.names.contains(&"dual-nic-server".to_owned()),
        "{dev:#?}"
    );
    assert!(!dev.weak_only && dev.counted, "{dev:#?}");
    // Both addresses were seen by ARP and by SNMP, and both are this one device's.
    for addr in ["198.18.50.10", "198.18.50.11"] {
        assert_eq!(at(&devices, addr).len(), 1, "{addr}: {devices:#?}");
    }
    let methods: Vec<&str> = dev.evidence.iter().map(|e| e.method.as_str()).collect();
    assert_eq!(methods, ["arp", "snmp"], "{dev:#?}");
    let other = with_mac(&devices, plain.mac())?;
    assert_eq!(other.address_list(), ["198.18.50.20"]);

    // An operator splits the second NIC out: every listing follows the identifiers, also
    // after the next sweep (the split holds) and after the split is undone.
    let key_b = format!("1mac:{}", mac_string(nic_b));
    collector.census_ok(["split", "--client", "acme", &dev.id, "--keys", &key_b])?;
    let check_split = || -> Result<()> {
        let devices = collector.devices("acme")?;
        assert_eq!(devices.len(), 3, "{devices:#?}");
        for (nic, addr) in [(nic_a, "198.18.50.10"), (nic_b, "198.18.50.11")] {
            let d = with_mac(&devices, nic)?;
            assert_eq!(d.macs, macs(&[nic]), "{d:#?}");
            assert_eq!(d.address_list(), [addr], "{d:#?}");
            assert!(d.addresses[0].current, "{d:#?}");
            let shown = collector.census_ok(["device", "--client", "acme", &d.id])?;
            let other = if nic == nic_a { nic_b } else { nic_a };
            assert!(!shown.contains(&mac_string(other)), "{shown}");
        }
        Ok(())
    };
    check_split()?;
    sweep(
        &lab,
        &collector,
        site.agent().ns(),
        &token,
        &[
            "--scope",
            "198.18.50.0/24",
            "--snmp-community",
            "census-mh",
            "--disable",
            "mdns",
        ],
    )?;
    check_split()?;
    let history: serde_json::Value =
        serde_json::from_str(&collector.census_ok(["history", "--client", "acme", "--json"])?)?;
    let split_seq = history
        .as_array()
        .and_then(|events| events.iter().find(|e| e["kind"] == "split"))
        .and_then(|e| e["seq"].as_u64())
        .context("the split in the history")?;
    collector.census_ok(["undo", "--client", "acme", &split_seq.to_string()])?;
    let devices = collector.devices("acme")?;
    assert_eq!(devices.len(), 2, "{devices:#?}");
    let dev = with_mac(&devices, nic_a)?;
    assert_eq!(dev.macs, macs(&[nic_a, nic_b]), "{dev:#?}");
    assert!(dev.addresses.iter().all(|a| a.current), "{dev:#?}");
    Ok(())
}

/// A Debian host with two NICs and a bridge (a Docker host, a hypervisor) whose snmpd serves
/// its real interface table and ARP cache: the shape of network gear, but its sysDescr says
/// Linux, and what it says it runs decides. A policy counting computer and server counts it;
/// one counting network gear only does not. Its neighbours, which say nothing, are `unknown`
/// with the agent's reason.
#[test]
fn a_linux_host_with_two_nics_and_a_bridge_is_a_server_not_network_gear() -> Result<()> {
    if lab_skipped() {
        return Ok(());
    }
    const DEBIAN: &str =
        "Linux host 6.1.0-18-amd64 #1 SMP PREEMPT_DYNAMIC Debian 6.1.76-1 (2024-02-01) x86_64";
    let lab = Lab::new()?;
    let site = lab.add_site(SiteSpec::new(
        "srv",
        "198.18.64.0/24".parse()?,
        ip("198.18.64.2"),
    ))?;
    let (nic_a, nic_b) = (
        [0x00, 0x16, 0x3e, 0x64, 0x00, 0x0a],
        [0x00, 0x16, 0x3e, 0x64, 0x00, 0x0b],
    );
    let server = site.add_multihomed_host(
        HostSpec::new(ip("198.18.64.10")).with_mac(nic_a),
        HostSpec::new(ip("198.18.64.11")).with_mac(nic_b),
    )?;
    let peers = site.add_hosts([
        HostSpec::new(ip("198.18.64.20")),
        HostSpec::new(ip("198.18.64.21")),
    ])?;
    // A bridge, as Docker's docker0 or a hypervisor's br0, and an ARP cache of the LAN.
    lab.exec_ok(server.ns(), ["ip", "link", "add", "br0", "type", "bridge"])?;
    lab.exec_ok(server.ns(), ["ip", "link", "set", "br0", "up"])?;
    for p in &peers {
        lab.exec_ok(server.ns(), ["ping", "-c1", "-W1", &p.ip().to_string()])?;
    }
    let _snmpd = server.run_snmpd(&SnmpdSpec {
        sys_descr: DEBIAN.into(),
        ..SnmpdSpec::v2c("census-srv", "docker-host")
    })?;

    let collector = Collector::start(&lab, &lab.dir().join("collector"))?;
    let token = enrolled(&collector, "acme", "hq")?;
    sweep(
        &lab,
        &collector,
        site.agent().ns(),
        &token,
        &[
            "--scope",
            "198.18.64.0/24",
            "--snmp-community",
            "census-srv",
            "--disable",
            "mdns",
        ],
    )?;

    let devices = collector.devices("acme")?;
    assert_eq!(devices.len(), 3, "the server and two peers: {devices:#?}");
    let dev = with_mac(&devices, nic_a)?;
    assert_eq!(dev.macs, macs(&[nic_a, nic_b]), "{dev:#?}");
    assert_eq!(dev.category, "server", "{dev:#?}");
    assert!(
        dev.category_reason
            .starts_with("SNMP sysDescr says Linux (\"Linux host 6.1.0-18-amd64")
            && dev.category_reason.ends_with(": server"),
        "{}",
        dev.category_reason
    );
    for p in &peers {
        let d = with_mac(&devices, p.mac())?;
        assert_eq!(d.category, "unknown", "{d:#?}");
        assert_eq!(
            d.category_reason, "no identifying evidence (no SNMP, mDNS or telling vendor)",
            "{d:#?}"
        );
    }
    let shown = collector.census_ok(["device", "--client", "acme", &dev.id])?;
    assert!(
        shown.contains("category   server (SNMP sysDescr says Linux"),
        "{shown}"
    );

    collector.census_ok([
        "policy",
        "set",
        "--client",
        "acme",
        "--categories",
        "computer,server",
    ])?;
    assert_eq!(collector.devices_of("acme")?, 1, "the server counts");
    collector.census_ok([
        "policy",
        "set",
        "--client",
        "acme",
        "--categories",
        "network",
    ])?;
    assert_eq!(collector.devices_of("acme")?, 0, "it is not network gear");
    Ok(())
}

#[test]
fn a_host_that_moves_stays_one_device_and_a_host_taking_its_address_is_new() -> Result<()> {
    if lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let site = lab.add_site(SiteSpec::new(
        "churn",
        "198.18.52.0/24".parse()?,
        ip("198.18.52.2"),
    ))?;
    let mut mover = site.add_host(HostSpec::new(ip("198.18.52.10")))?;
    let steady = site.add_host(HostSpec::new(ip("198.18.52.30")))?;
    let collector = Collector::start(&lab, &lab.dir().join("collector"))?;
    let token = enrolled(&collector, "acme", "hq")?;
    let ns = site.agent().ns().to_owned();
    // One agent identity across the sweeps, as an installed agent keeps.
    let state = token.clone();
    let args = [
        "--scope",
        "198.18.52.0/24",
        "--disable",
        "snmp,mdns",
        "--state-dir",
        state.to_str().context("utf-8 path")?,
    ];

    sweep(&lab, &collector, &ns, &token, &args)?;
    assert_eq!(collector.devices_of("acme")?, 2);

    // A new lease: the same MAC at a new address is the same device. Nobody else answered on
    // the old address, so it is not lost, but it is previous: the mover did not answer on it
    // in its latest sighting.
    mover.set_ip(ip("198.18.52.11"))?;
    sweep(&lab, &collector, &ns, &token, &args)?;
    assert_eq!(
        collector.devices_of("acme")?,
        2,
        "a move is not a new device"
    );
    let devices = collector.devices("acme")?;
    let moved = with_mac(&devices, mover.mac())?;
    let moved_id = moved.id.clone();
    assert_eq!(
        moved.address_list(),
        strings(&["198.18.52.10", "198.18.52.11"]),
        "{moved:#?}"
    );
    let old = moved.address("198.18.52.10").context("old address")?;
    assert!(
        !old.current && !old.lost && !old.last_seen.is_empty(),
        "198.18.52.10 is previous, with its last-seen time: {moved:#?}"
    );
    let new = moved.address("198.18.52.11").context("new address")?;
    assert!(new.current && !new.lost, "{moved:#?}");
    assert_eq!(
        moved.evidence.first().map(|e| e.observations),
        Some(2),
        "{moved:#?}"
    );

    // A new device takes the old address over: it is a device of its own, and the mover
    // keeps 198.18.52.10 only in its history.
    let newcomer = site.add_host(HostSpec::new(ip("198.18.52.10")))?;
    sweep(&lab, &collector, &ns, &token, &args)?;
    assert_eq!(collector.devices_of("acme")?, 3);
    let devices = collector.devices("acme")?;
    let moved = with_mac(&devices, mover.mac())?;
    assert_eq!(moved.id, moved_id, "the mover kept its id");
    let old = moved.address("198.18.52.10").context("old address")?;
    assert!(
        !old.current && old.lost,
        "the mover's old address is lost to the newcomer: {moved:#?}"
    );
    let new = moved.address("198.18.52.11").context("new address")?;
    assert!(new.current, "{moved:#?}");
    let taker = with_mac(&devices, newcomer.mac())?;
    assert_ne!(taker.id, moved_id);
    assert_eq!(taker.address_list(), ["198.18.52.10"]);
    assert!(taker.addresses[0].current, "{taker:#?}");
    let holders: Vec<&Device> = at(&devices, "198.18.52.10")
        .into_iter()
        .filter(|d| d.address("198.18.52.10").is_some_and(|a| a.current))
        .collect();
    assert_eq!(holders.len(), 1, "one current holder of 198.18.52.10");
    assert_eq!(
        with_mac(&devices, steady.mac())?.address_list(),
        ["198.18.52.30"]
    );
    Ok(())
}

/// A laptop roams hq -> branch -> hq (a new lease on its return): one device, and at each site
/// the address it answered on in its latest sighting there is current, the older one previous.
#[test]
fn a_laptop_roaming_between_sites_has_one_current_address_per_site() -> Result<()> {
    if lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let hq = lab.add_site(SiteSpec::new(
        "roam-hq",
        "198.18.62.0/24".parse()?,
        ip("198.18.62.2"),
    ))?;
    let branch = lab.add_site(SiteSpec::new(
        "roam-br",
        "198.18.63.0/24".parse()?,
        ip("198.18.63.2"),
    ))?;
    // The laptop's one NIC, plugged in at one site at a time.
    let nic = [0x00, 0x16, 0x3e, 0x62, 0x00, 0x10];
    let mut at_hq = hq.add_host(HostSpec::new(ip("198.18.62.10")).with_mac(nic))?;
    let at_branch = branch.add_host(HostSpec::new(ip("198.18.63.10")).with_mac(nic))?;
    let link = |host_ns: &str, state: &str| {
        lab.exec_ok(host_ns, ["ip", "link", "set", "eth0", state])
            .map(drop)
    };
    link(at_branch.ns(), "down")?;

    let collector = Collector::start(&lab, &lab.dir().join("collector"))?;
    let hq_state = enrolled(&collector, "acme", "hq")?;
    let branch_state = enrolled(&collector, "acme", "branch")?;
    let args = |scope: &'static str, state: &Path| -> Result<Vec<String>> {
        Ok([
            "--scope",
            scope,
            "--disable",
            "snmp,mdns",
            "--state-dir",
            state.to_str().context("utf-8 path")?,
        ]
        .map(str::to_owned)
        .to_vec())
    };
    let hq_args = args("198.18.62.0/24", &hq_state)?;
    let branch_args = args("198.18.63.0/24", &branch_state)?;
    let run = |ns: &str, state: &Path, args: &[String]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        sweep(&lab, &collector, ns, state, &args)
    };
    let state_of = |d: &Device, addr: &str| {
        d.address(addr).map(|a| match (a.current, a.lost) {
            (true, _) => "current",
            (false, true) => "lost",
            (false, false) => "previous",
        })
    };

    run(hq.agent().ns(), &hq_state, &hq_args)?;
    link(at_hq.ns(), "down")?;
    link(at_branch.ns(), "up")?;
    run(branch.agent().ns(), &branch_state, &branch_args)?;
    link(at_branch.ns(), "down")?;
    link(at_hq.ns(), "up")?;
    at_hq.set_ip(ip("198.18.62.11"))?;
    run(hq.agent().ns(), &hq_state, &hq_args)?;

    let devices = collector.devices("acme")?;
    let laptop = with_mac(&devices, nic)?;
    assert_eq!(devices.len(), 1, "one laptop: {devices:#?}");
    assert_eq!(laptop.sites, strings(&["branch", "hq"]), "{laptop:#?}");
    assert_eq!(
        state_of(laptop, "198.18.62.10"),
        Some("previous"),
        "{laptop:#?}"
    );
    assert_eq!(
        state_of(laptop, "198.18.62.11"),
        Some("current"),
        "{laptop:#?}"
    );
    // Its latest sighting at the branch: that address space's current one.
    assert_eq!(
        state_of(laptop, "198.18.63.10"),
        Some("current"),
        "{laptop:#?}"
    );
    // The table shows the current ones first (branch sorts before hq), and cuts the list.
    let table = collector.census_ok(["devices", "--client", "acme"])?;
    assert!(table.contains(" 198.18.63.10,198.18.62.11 +1 "), "{table}");
    Ok(())
}

#[test]
fn two_agents_at_one_site_report_one_device_per_host() -> Result<()> {
    if lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let site = lab.add_site(SiteSpec::new(
        "shared",
        "198.18.54.0/24".parse()?,
        ip("198.18.54.2"),
    ))?;
    let second = site.add_agent(ip("198.18.54.3"))?;
    let hosts = site.add_hosts([
        HostSpec::new(ip("198.18.54.10")),
        HostSpec::new(ip("198.18.54.11")).silent(),
        HostSpec::new(ip("198.18.54.12")),
    ])?;
    let collector = Collector::start(&lab, &lab.dir().join("collector"))?;
    let args_for = |state: &Path| -> Result<Vec<String>> {
        Ok([
            "--scope",
            "198.18.54.0/24",
            "--disable",
            "snmp,mdns",
            "--state-dir",
            state.to_str().context("utf-8 path")?,
        ]
        .map(str::to_owned)
        .to_vec())
    };
    let mut ids = Vec::new();
    for ns in [site.agent().ns(), second.ns()] {
        // Two enrollments for the same client and site.
        let token = enrolled(&collector, "acme", "hq")?;
        let state = token.clone();
        let args = args_for(&state)?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        sweep(&lab, &collector, ns, &token, &args)?;
        ids.push(support::agent_id(&state)?);
    }
    let (first_id, second_id) = (ids[0].clone(), ids[1].clone());
    assert_ne!(first_id, second_id);

    // The three hosts, and each agent's own NIC, which the other agent sees.
    assert_eq!(collector.devices_of("acme")?, 5);
    let devices = collector.devices("acme")?;
    let both = strings(&[&first_id, &second_id]);
    for host in &hosts {
        let d = with_mac(&devices, host.mac())?;
        assert_eq!(d.agents(), both, "{d:#?}");
        assert_eq!(d.address_list(), [host.ip().to_string()]);
        assert_eq!(d.sites, ["hq"]);
    }
    assert_eq!(
        with_mac(&devices, site.agent().mac())?.agents(),
        [second_id]
    );
    assert_eq!(with_mac(&devices, second.mac())?.agents(), [first_id]);
    Ok(())
}

#[test]
fn clients_with_identical_subnets_addresses_and_macs_never_meet() -> Result<()> {
    if lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let subnet = "198.18.0.0/24".parse()?;
    let acme = lab.add_site(SiteSpec::new("acme-hq", subnet, ip("198.18.0.2")))?;
    let globex = lab.add_site(SiteSpec::new("globex-hq", subnet, ip("198.18.0.2")))?;
    // One host pair shares address and MAC across the clients (a cloned VM image).
    let shared = [0x00, 0x16, 0x3e, 0x0c, 0x10, 0x4e];
    let acme_hosts = acme.add_hosts([
        HostSpec::new(ip("198.18.0.10")).with_mac(shared),
        HostSpec::new(ip("198.18.0.11")),
    ])?;
    let globex_hosts = globex.add_hosts([
        HostSpec::new(ip("198.18.0.10")).with_mac(shared),
        HostSpec::new(ip("198.18.0.11")),
        HostSpec::new(ip("198.18.0.12")),
    ])?;
    // And each client has a phone with a random MAC and the same mDNS name.
    let phone = MdnsSpec {
        host_name: "reception-phone".into(),
        services: vec![MdnsService {
            instance: "Reception".into(),
            service_type: "_companion-link._tcp".into(),
            port: 49152,
            txt: Vec::new(),
        }],
    };
    let acme_phone =
        acme.add_host(HostSpec::new(ip("198.18.0.20")).with_mac(lab.randomized_mac()?))?;
    let globex_phone =
        globex.add_host(HostSpec::new(ip("198.18.0.20")).with_mac(lab.randomized_mac()?))?;
    acme_phone.run_mdns(&phone)?;
    globex_phone.run_mdns(&phone)?;

    let collector = Collector::start(&lab, &lab.dir().join("collector"))?;
    let mut agent_ids = Vec::new();
    for (client, site) in [("acme", &acme), ("globex", &globex)] {
        let token = enrolled(&collector, client, "hq")?;
        let state = token.clone();
        sweep(
            &lab,
            &collector,
            site.agent().ns(),
            &token,
            &[
                "--scope",
                "198.18.0.0/24",
                "--disable",
                "snmp",
                "--state-dir",
                state.to_str().context("utf-8 path")?,
            ],
        )?;
        agent_ids.push(support::agent_id(&state)?);
    }

    assert_eq!(collector.devices_of("acme")?, 3);
    assert_eq!(collector.devices_of("globex")?, 4);
    let mut ids_seen = Vec::new();
    for ((client, hosts, phone), agent) in [
        ("acme", &acme_hosts, &acme_phone),
        ("globex", &globex_hosts, &globex_phone),
    ]
    .into_iter()
    .zip(&agent_ids)
    {
        let devices = collector.devices(client)?;
        let mut want: Vec<[u8; 6]> = hosts.iter().map(|h| h.mac()).collect();
        want.push(phone.mac());
        let mut got: Vec<String> = devices.iter().flat_map(|d| d.macs.clone()).collect();
        got.sort();
        assert_eq!(got, macs(&want), "{client}: exactly its own MACs");
        for d in &devices {
            assert_eq!(d.client, client);
            assert_eq!(&d.agents(), std::slice::from_ref(agent), "{client}: {d:#?}");
            ids_seen.push(d.id.clone());
        }
        let p = with_mac(&devices, phone.mac())?;
        assert!(p.weak_only, "{p:#?}");
        assert_eq!(
            p.identifiers_of("mdns-name"),
            ["reception-phone.local"],
            "{p:#?}"
        );
        assert_eq!(with_mac(&devices, shared)?.address_list(), ["198.18.0.10"]);
    }
    // The same MAC at the same address is a different device in each client.
    let total = ids_seen.len();
    ids_seen.sort();
    ids_seen.dedup();
    assert_eq!(ids_seen.len(), total, "a device id shared across clients");
    Ok(())
}

#[test]
fn a_vrrp_virtual_address_is_evidence_on_its_router_not_a_device() -> Result<()> {
    if lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let site = lab.add_site(SiteSpec::new(
        "vrrp",
        "198.18.56.0/24".parse()?,
        ip("198.18.56.2"),
    ))?;
    let router = site.add_router(RouterSpec {
        lan_ip: ip("198.18.56.1"),
        routed_subnet: "198.18.57.0/24".parse()?,
        routed_ip: ip("198.18.57.1"),
        lan_mac: None,
    })?;
    let vmac = router.add_virtual_address(ip("198.18.56.254"), 9)?;
    router.run_snmpd(&SnmpdSpec::v2c("census-gw", "core-gw-1"))?;
    let host = site.add_host(HostSpec::new(ip("198.18.56.10")))?;

    let collector = Collector::start(&lab, &lab.dir().join("collector"))?;
    let token = enrolled(&collector, "acme", "hq")?;
    sweep(
        &lab,
        &collector,
        site.agent().ns(),
        &token,
        &[
            "--scope",
            "198.18.56.0/24",
            "--snmp-community",
            "census-gw",
            "--disable",
            "mdns",
        ],
    )?;

    // The router and the host; the virtual address is neither.
    assert_eq!(collector.devices_of("acme")?, 2);
    let devices = collector.devices("acme")?;
    let vmac_text = mac_string(vmac);
    assert_eq!(vmac, vrrp_mac(9));
    for d in &devices {
        assert!(
            !d.macs.contains(&vmac_text) && !d.identifiers.iter().any(|i| i.value == vmac_text),
            "the VRRP MAC became an identifier: {d:#?}"
        );
    }
    let gw = with_mac(&devices, router.lan_mac())?;
    let want = format!("holds virtual router address 198.18.56.254 ({vmac_text}) at hq");
    assert!(gw.anomalies.contains(&want), "{gw:#?}");
    let vip = gw
        .address("198.18.56.254")
        .context("the VIP on the router")?;
    assert!(
        !vip.answered,
        "the router never answered for the VIP itself"
    );
    assert!(gw.names.contains(&"core-gw-1".to_owned()), "{gw:#?}");
    assert_eq!(at(&devices, "198.18.56.254").len(), 1, "{devices:#?}");
    assert_eq!(
        with_mac(&devices, host.mac())?.address_list(),
        ["198.18.56.10"]
    );
    Ok(())
}

#[test]
fn a_proxy_arp_router_is_one_device_and_its_proxied_addresses_are_none() -> Result<()> {
    if lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    // The agent's LAN is 198.18.58.0/23, so it takes all of 198.18.59.0/24 for on-link and
    // ARPs for it; the router routes 198.18.59.0/24 out of its other leg and, with proxy ARP
    // on, answers every one of those ARPs with its own LAN MAC. What the agent sees: one MAC
    // answering for some 255 addresses, two real hosts behind the router included.
    let site = lab.add_site(SiteSpec::new(
        "proxy",
        "198.18.58.0/23".parse()?,
        ip("198.18.58.2"),
    ))?;
    let router = site.add_router(RouterSpec {
        lan_ip: ip("198.18.58.1"),
        routed_subnet: "198.18.59.0/24".parse()?,
        routed_ip: ip("198.18.59.1"),
        lan_mac: None,
    })?;
    router.enable_proxy_arp()?;
    router.add_hosts([
        HostSpec::new(ip("198.18.59.10")),
        HostSpec::new(ip("198.18.59.11")),
    ])?;
    let lan_hosts = site.add_hosts([
        HostSpec::new(ip("198.18.58.10")),
        HostSpec::new(ip("198.18.58.11")),
    ])?;

    let collector = Collector::start(&lab, &lab.dir().join("collector"))?;
    let token = enrolled(&collector, "acme", "hq")?;
    sweep(
        &lab,
        &collector,
        site.agent().ns(),
        &token,
        &["--scope", "198.18.58.0/23", "--disable", "snmp,mdns"],
    )?;

    // The router and the two LAN hosts; nothing for the proxied addresses.
    assert_eq!(collector.devices_of("acme")?, 3);
    let devices = collector.devices("acme")?;
    let gw = with_mac(&devices, router.lan_mac())?;
    assert!(
        gw.anomalies.iter().any(|a| a.contains("proxy ARP")),
        "{gw:#?}"
    );
    assert_eq!(gw.identifiers_of("mac"), [mac_string(router.lan_mac())]);
    // The collector keeps a bounded number of a device's addresses (64 per observation), so
    // the router lists some of the proxied ones, all as claims rather than answers.
    assert!(
        gw.addresses.len() > 4 && gw.addresses.iter().all(|a| !a.answered),
        "a proxy's addresses are claims, not answers: {:#?}",
        gw.addresses
    );
    for addr in ["198.18.58.1", "198.18.59.10", "198.18.59.11"] {
        let holders = at(&devices, addr);
        assert!(
            holders.len() == 1 && holders[0].id == gw.id,
            "{addr} belongs to the router only: {holders:#?}"
        );
    }
    let routed: Ipv4Net = "198.18.59.0/24".parse()?;
    for d in devices.iter().filter(|d| d.id != gw.id) {
        assert!(
            d.addresses.iter().all(|a| a
                .address
                .parse::<Ipv4Addr>()
                .is_ok_and(|ip| !routed.contains(&ip))),
            "a proxied address on another device: {d:#?}"
        );
    }
    for h in &lan_hosts {
        let d = with_mac(&devices, h.mac())?;
        assert_eq!(d.address_list(), [h.ip().to_string()]);
        assert!(d.anomalies.is_empty(), "{d:#?}");
    }
    // The table cuts the router's long list (`... +N`), so no row is padded to its width;
    // `--json` above had it whole.
    let table = collector.census_ok(["devices", "--client", "acme"])?;
    let gw_row = table
        .lines()
        .find(|l| l.starts_with(&gw.id))
        .context("the router's row")?;
    // Two or three addresses fit in a cell, the rest are counted.
    let more: Vec<usize> = gw_row
        .split_whitespace()
        .filter_map(|w| w.strip_prefix('+')?.parse().ok())
        .collect();
    let all = gw.addresses.len();
    assert!(
        matches!(more.as_slice(), [n] if (all - 3..=all - 2).contains(n)),
        "{all} addresses, {more:?} counted in {gw_row}"
    );
    let widest = table.lines().map(|l| l.chars().count()).max().unwrap_or(0);
    assert!(widest <= 200, "{widest} columns:\n{table}");
    Ok(())
}

#[test]
fn phones_back_with_a_new_random_mac_and_the_same_mdns_name_stay_one_device_each() -> Result<()> {
    if lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let site = lab.add_site(SiteSpec::new(
        "phones",
        "198.18.60.0/24".parse()?,
        ip("198.18.60.2"),
    ))?;
    let desk = site.add_host(HostSpec::new(ip("198.18.60.10")))?;
    let spec = |name: &str| MdnsSpec {
        host_name: name.into(),
        services: vec![MdnsService {
            instance: name.into(),
            service_type: "_companion-link._tcp".into(),
            port: 49152,
            txt: Vec::new(),
        }],
    };
    let mut ann =
        site.add_host(HostSpec::new(ip("198.18.60.20")).with_mac(lab.randomized_mac()?))?;
    let mut bob =
        site.add_host(HostSpec::new(ip("198.18.60.21")).with_mac(lab.randomized_mac()?))?;
    let mut responders: Vec<Proc> = vec![
        ann.run_mdns(&spec("phone-ann"))?,
        bob.run_mdns(&spec("phone-bob"))?,
    ];
    let first_macs = [ann.mac(), bob.mac()];

    let collector = Collector::start(&lab, &lab.dir().join("collector"))?;
    let token = enrolled(&collector, "acme", "hq")?;
    let ns = site.agent().ns().to_owned();
    let state = token.clone();
    let args = [
        "--scope",
        "198.18.60.0/24",
        "--disable",
        "snmp",
        "--state-dir",
        state.to_str().context("utf-8 path")?,
    ];
    sweep(&lab, &collector, &ns, &token, &args)?;
    assert_eq!(collector.devices_of("acme")?, 3);

    // Both phones leave and come back with a new random MAC; Bob also gets a new address.
    for r in responders.drain(..) {
        r.kill()?;
    }
    ann.set_mac(lab.randomized_mac()?)?;
    bob.set_mac(lab.randomized_mac()?)?;
    bob.set_ip(ip("198.18.60.22"))?;
    responders.push(ann.run_mdns(&spec("phone-ann"))?);
    responders.push(bob.run_mdns(&spec("phone-bob"))?);
    sweep(&lab, &collector, &ns, &token, &args)?;

    assert_eq!(
        collector.devices_of("acme")?,
        3,
        "still the desk and two phones"
    );
    let devices = collector.devices("acme")?;
    for ((phone, name), first) in [(&ann, "phone-ann"), (&bob, "phone-bob")]
        .into_iter()
        .zip(first_macs)
    {
        let d = with_mac(&devices, phone.mac())?;
        assert!(d.weak_only && d.counted, "{d:#?}");
        assert_eq!(d.macs, macs(&[first, phone.mac()]), "{d:#?}");
        assert_eq!(
            d.identifiers_of("randomized-mac"),
            macs(&[first, phone.mac()]),
            "{d:#?}"
        );
        assert_eq!(d.identifiers_of("mdns-name"), [format!("{name}.local")]);
        assert!(d.identifiers.iter().all(|i| !i.strong), "{d:#?}");
        let arp = d.evidence.iter().find(|e| e.method == "arp");
        assert_eq!(
            arp.map(|e| e.observations),
            Some(2),
            "seen in both sweeps: {d:#?}"
        );
    }
    let b = with_mac(&devices, bob.mac())?;
    assert_eq!(b.address_list(), strings(&["198.18.60.21", "198.18.60.22"]));
    // Bob answered on .22 with his new MAC in his latest sighting: .21 is previous.
    let (old, new) = (
        b.address("198.18.60.21").context(".21")?,
        b.address("198.18.60.22").context(".22")?,
    );
    assert!(!old.current && !old.lost && new.current, "{b:#?}");
    let d = with_mac(&devices, desk.mac())?;
    assert!(!d.weak_only, "{d:#?}");
    Ok(())
}

// === crash safety ===

/// Hosts per site in the crash test: enough that three agents' batches reach the collector
/// together, few enough to build in seconds.
const CRASH_HOSTS: u32 = 40;

/// Evidence observations each agent has in the collector: every observation of this test is
/// one ARP answer, so this is the number of observations stored from each agent.
fn stored_by_agent(devices: &[Device], agent: &str) -> u64 {
    devices
        .iter()
        .flat_map(|d| &d.evidence)
        .filter(|e| e.agent_id == agent)
        .map(|e| e.observations)
        .sum()
}

/// Lines of `proc`'s log that are JSON, from line `from` on.
fn log_lines_from(proc: &Proc, from: usize) -> Vec<support::AgentLogLine> {
    support::agent_log(&proc.log())
        .into_iter()
        .skip(from)
        .collect()
}

#[test]
fn a_collector_killed_mid_ingest_loses_no_acknowledged_batch() -> Result<()> {
    if lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let mut sites = Vec::new();
    for (i, third) in [64u8, 65, 66].into_iter().enumerate() {
        let site = lab.add_site(SiteSpec::new(
            format!("branch-{i}"),
            format!("198.18.{third}.0/24").parse()?,
            Ipv4Addr::new(198, 18, third, 2),
        ))?;
        site.add_hosts(HostSpec::range(
            Ipv4Addr::new(198, 18, third, 10),
            CRASH_HOSTS,
        ))?;
        sites.push((site, format!("198.18.{third}.0/24")));
    }
    let truth = u64::from(CRASH_HOSTS) * 3;

    // A fixed address, so agents that keep running find the restarted collector again.
    let mut collector = Collector::start_at(&lab, &lab.dir().join("collector"), COLLECTOR_PORT)?;
    let url = collector.url();
    let mut agents = Vec::new();
    for (i, (site, scope)) in sites.iter().enumerate() {
        let state = enrolled(&collector, "crash", &format!("branch-{i}"))?;
        let proc = support::spawn_agent(
            &lab,
            site.agent().ns(),
            [
                "--collector",
                &url,
                "--scope",
                scope,
                "--state-dir",
                state.to_str().context("utf-8 path")?,
                "--interval",
                "10s",
                "--disable",
                "snmp,mdns",
            ],
        )?;
        agents.push((proc, state));
    }

    // Kill the collector with SIGKILL the moment the first agent's batch is acknowledged, while
    // the others' batches are on the wire or being stored. If no agent was cut off (all were
    // through already), try again in the next round of sweeps.
    let mut rounds = 0;
    let acked_at_kill: Vec<u64> = loop {
        rounds += 1;
        ensure!(
            rounds <= 3,
            "three rounds without a kill in the middle of ingest"
        );
        let before: Vec<usize> = agents
            .iter()
            .map(|(p, _)| support::deliveries(&p.log()).len())
            .collect();
        let lines_before: Vec<usize> = agents
            .iter()
            .map(|(p, _)| support::agent_log(&p.log()).len())
            .collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let delivered = agents
                .iter()
                .zip(&before)
                .any(|((p, _), n)| support::deliveries(&p.log()).len() > *n);
            if delivered {
                break;
            }
            for (p, _) in &agents {
                ensure!(p.is_running(), "an agent stopped:\n{}", p.log());
            }
            ensure!(
                Instant::now() < deadline,
                "no agent delivered within 60 s:\n{}",
                agents[0].0.log()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        collector.kill()?;
        // Acks already on their way are still read (the agent's socket holds them), and the
        // agents whose streams broke say so: give them a moment.
        std::thread::sleep(Duration::from_millis(500));
        let acked: Vec<u64> = agents
            .iter()
            .map(|(p, _)| {
                support::deliveries(&p.log())
                    .iter()
                    .map(|d| d.observations)
                    .sum()
            })
            .collect();
        let cut_off = agents
            .iter()
            .zip(&lines_before)
            .filter(|((p, _), n)| {
                log_lines_from(p, **n)
                    .iter()
                    .any(|l| l.message().starts_with("delivery failed"))
            })
            .count();
        collector = collector.restart()?;
        if cut_off > 0 {
            eprintln!(
                "killed the collector in round {rounds}: {cut_off} of {} agents cut off",
                agents.len()
            );
            break acked;
        }
    };
    let restarted_lines: Vec<usize> = agents
        .iter()
        .map(|(p, _)| support::agent_log(&p.log()).len())
        .collect();
    let ids: Vec<String> = agents
        .iter()
        .map(|(_, state)| support::agent_id(state))
        .collect::<Result<_>>()?;

    // Right after the restart: everything acknowledged before the kill is there.
    let devices = collector.devices("crash")?;
    for (id, acked) in ids.iter().zip(&acked_at_kill) {
        let stored = stored_by_agent(&devices, id);
        ensure!(
            stored >= *acked,
            "agent {id}: {acked} observations acknowledged before the kill, {stored} stored"
        );
    }

    // The agents resend what was not acknowledged. Once an agent has finished a sweep with
    // nothing pending it sleeps for about 10 s: stop it there, so every batch it sent was
    // acknowledged (none is half-delivered when the books are compared).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut caught_up = vec![false; agents.len()];
    while caught_up.iter().any(|c| !c) {
        for (i, (proc, _)) in agents.iter().enumerate() {
            if caught_up[i] {
                continue;
            }
            let done = log_lines_from(proc, restarted_lines[i])
                .iter()
                .any(|l| l.message() == "sweep done" && l.number("pending") == Some(0));
            if done {
                proc.kill()?;
                caught_up[i] = true;
            } else {
                ensure!(proc.is_running(), "an agent stopped:\n{}", proc.log());
            }
        }
        ensure!(
            Instant::now() < deadline,
            "agents did not deliver everything within 60 s of the restart:\n{}",
            agents
                .iter()
                .map(|(p, _)| p.log())
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    // The books balance: every batch an agent had acknowledged (stored then or, after a lost
    // ack, recognised as a replay) is stored exactly once, and the count is the truth.
    assert_eq!(collector.devices_of("crash")?, truth);
    let devices = collector.devices("crash")?;
    assert_eq!(devices.len() as u64, truth);
    for ((proc, _), id) in agents.iter().zip(&ids) {
        let acked: u64 = support::deliveries(&proc.log())
            .iter()
            .map(|d| d.observations)
            .sum();
        assert_eq!(
            stored_by_agent(&devices, id),
            acked,
            "agent {id}: acknowledged vs stored\n{}",
            proc.log()
        );
        assert!(
            acked >= 2 * u64::from(CRASH_HOSTS),
            "at least two sweeps each"
        );
        let (stored, replays) = support::deliveries(&proc.log())
            .iter()
            .fold((0, 0), |(s, r), d| (s + d.stored, r + d.duplicates));
        eprintln!(
            "agent {id}: {acked} observations acknowledged in {stored} batches stored and \
             {replays} recognised as replays; {acked} stored"
        );
    }
    Ok(())
}
