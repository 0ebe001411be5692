//! The discovery engine against real responders: a site where every kind of device is present
//! is found completely, each device's identity is what the lab gave it, and broken or hostile
//! devices leave the sweep complete for everyone else.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use census_tests::{
    lab::{
        HostSpec, Lab, MdnsService, MdnsSpec, RouterSpec, SiteSpec, SnmpV3User, SnmpdSpec,
        lab_skipped, mac_string,
    },
    support::{self, Collector},
};
use serde_json::Value;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("test address")
}

fn svc(instance: &str, service_type: &str, port: u16, txt: &[(&str, &str)]) -> MdnsService {
    MdnsService {
        instance: instance.into(),
        service_type: service_type.into(),
        port,
        txt: txt
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
    }
}

/// The device whose answering address is `addr`.
fn at<'a>(devices: &'a [Value], addr: &str) -> Result<&'a Value> {
    devices
        .iter()
        .find(|d| {
            d["addresses"]
                .as_array()
                .is_some_and(|a| a.iter().any(|a| a["address"] == addr))
        })
        .with_context(|| {
            format!(
                "no device at {addr} in {}",
                serde_json::to_string_pretty(devices).unwrap_or_default()
            )
        })
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A UDP responder that answers every datagram on port 161 with garbage of random sizes.
const GARBAGE_SNMP: &str = r#"
import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 161))
while True:
    data, peer = s.recvfrom(65535)
    for n in (0, 1, 7, 300, 1400):
        s.sendto(b"\x30\x82\xff\xff" + os.urandom(n), peer)
"#;

#[test]
fn a_site_with_every_kind_of_device_is_found_completely() -> Result<()> {
    if lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let site = lab.add_site(SiteSpec::new(
        "full",
        "198.18.0.0/24".parse()?,
        ip("198.18.0.2"),
    ))?;

    // Two hosts that answer only ARP.
    let quiet = site.add_hosts([
        HostSpec::new(ip("198.18.0.10")).silent(),
        HostSpec::new(ip("198.18.0.11")).silent(),
    ])?;
    // snmpd on two different communities, and one that speaks only v3 authPriv.
    let alpha = site.add_host(HostSpec::new(ip("198.18.0.20")))?;
    alpha.run_snmpd(&SnmpdSpec {
        serial: Some("LAB-ALPHA-0001".into()),
        model: Some("Census Lab Switch 24".into()),
        ..SnmpdSpec::v2c("census-a", "alpha")
    })?;
    let bravo = site.add_host(HostSpec::new(ip("198.18.0.21")))?;
    bravo.run_snmpd(&SnmpdSpec::v2c("census-b", "bravo"))?;
    let charlie = site.add_host(HostSpec::new(ip("198.18.0.22")))?;
    let engine_id = vec![
        0x80, 0x00, 0x1f, 0x88, 0x04, 0x63, 0x65, 0x6e, 0x73, 0x75, 0x73,
    ];
    charlie.run_snmpd(&SnmpdSpec {
        communities: vec![],
        engine_id: Some(engine_id.clone()),
        v3_user: Some(SnmpV3User::new(
            "censusv3",
            "auth-secret-1",
            "priv-secret-1",
        )),
        ..SnmpdSpec::v2c("unused", "charlie")
    })?;
    // mDNS responders with several service types.
    let printer = site.add_host(HostSpec::new(ip("198.18.0.30")))?;
    printer.run_mdns(&MdnsSpec {
        host_name: "office-printer".into(),
        services: vec![
            svc(
                "Office Printer",
                "_ipp._tcp",
                631,
                &[("ty", "Lab LaserJet 400"), ("note", "2nd floor")],
            ),
            svc("Office Printer", "_printer._tcp", 515, &[]),
        ],
    })?;
    let speaker = site.add_host(HostSpec::new(ip("198.18.0.31")))?;
    speaker.run_mdns(&MdnsSpec {
        host_name: "lobby-speaker".into(),
        services: vec![
            svc(
                "Lobby",
                "_airplay._tcp",
                7000,
                &[("model", "AudioAccessory5,1")],
            ),
            svc("Lobby", "_raop._tcp", 7001, &[]),
        ],
    })?;
    // A device that answers SNMP with garbage.
    let garbage = site.add_host(HostSpec::new(ip("198.18.0.40")))?;
    lab.spawn(
        garbage.ns(),
        ["/usr/bin/python3", "-c", GARBAGE_SNMP, "198.18.0.40"],
    )?;
    // A router with its own snmpd and a routed subnet behind it.
    let router = site.add_router(RouterSpec {
        lan_ip: ip("198.18.0.1"),
        routed_subnet: "198.18.1.0/24".parse()?,
        routed_ip: ip("198.18.1.1"),
        lan_mac: None,
    })?;
    router.run_snmpd(&SnmpdSpec::v2c("census-a", "gateway"))?;
    let behind = router.add_hosts([
        HostSpec::new(ip("198.18.1.10")),
        HostSpec::new(ip("198.18.1.11")),
    ])?;

    let config = lab.dir().join("agent.toml");
    std::fs::write(
        &config,
        r#"
scopes = ["198.18.0.0/24", "198.18.1.0/24"]
[snmp]
communities = ["wrong-first", "census-a", "census-b"]
timeout_ms = 300
retries = 1
[[snmp.v3_users]]
name = "wrong-user"
auth_protocol = "sha"
auth_password = "not-the-secret"
priv_protocol = "aes"
priv_password = "not-the-secret"
[[snmp.v3_users]]
name = "censusv3"
auth_protocol = "sha"
auth_password = "auth-secret-1"
priv_protocol = "aes"
priv_password = "priv-secret-1"
[mdns]
window_ms = 3000
"#,
    )?;
    let devices = support::scan(
        &lab,
        site.agent().ns(),
        ["--config", config.to_str().context("utf-8 path")?],
    )?;

    // Complete: every host the lab built, the router on both sides, nothing else.
    let mut found: Vec<String> = devices
        .iter()
        .flat_map(|d| d["addresses"].as_array().into_iter().flatten())
        .filter_map(|a| a["address"].as_str().map(str::to_owned))
        .collect();
    found.sort();
    let mut want: Vec<String> = [
        "198.18.0.1",
        "198.18.0.10",
        "198.18.0.11",
        "198.18.0.20",
        "198.18.0.21",
        "198.18.0.22",
        "198.18.0.30",
        "198.18.0.31",
        "198.18.0.40",
        "198.18.1.1",
        "198.18.1.10",
        "198.18.1.11",
    ]
    .map(String::from)
    .to_vec();
    want.sort();
    assert_eq!(found, want, "every address, once");

    // ARP-only hosts: found by ARP with their MACs, though they drop ICMP.
    for h in &quiet {
        let d = at(&devices, &h.ip().to_string())?;
        assert_eq!(d["macs"][0]["mac"], mac_string(h.mac()));
        assert_eq!(d["macs"][0]["first_hand"], true);
        assert_eq!(strs(&d["methods"]), ["arp"]);
    }
    // SNMP identities, with the credential that answered (never the secret).
    for (host, name, credential, version) in [
        (&alpha, "alpha", "community #2", "2c"),
        (&bravo, "bravo", "community #3", "2c"),
        (&charlie, "charlie", "censusv3", "3"),
    ] {
        let d = at(&devices, &host.ip().to_string())?;
        assert_eq!(d["snmp"]["sys_name"], name, "{d}");
        assert_eq!(d["snmp"]["credential"], credential, "{d}");
        assert_eq!(d["snmp"]["version"], version, "{d}");
        assert!(strs(&d["names"]).contains(&name.to_owned()));
        let if_macs: Vec<&str> = d["snmp"]["interfaces"]
            .as_array()
            .context("interfaces")?
            .iter()
            .filter_map(|i| i["mac"].as_str())
            .collect();
        assert!(
            if_macs.contains(&mac_string(host.mac()).as_str()),
            "{name}: {if_macs:?}"
        );
        assert_eq!(strs(&d["methods"]), ["arp", "snmp"]);
    }
    let alpha_dev = at(&devices, "198.18.0.20")?;
    assert_eq!(
        alpha_dev["snmp"]["serial_number"], "LAB-ALPHA-0001",
        "{alpha_dev}"
    );
    assert_eq!(
        alpha_dev["snmp"]["model"], "Census Lab Switch 24",
        "{alpha_dev}"
    );
    let charlie_dev = at(&devices, "198.18.0.22")?;
    assert_eq!(
        charlie_dev["snmp"]["engine_id"],
        engine_id
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    // mDNS: host names, every service, TXT, and the category they decide.
    let p = at(&devices, "198.18.0.30")?;
    assert_eq!(p["mdns"]["host_name"], "office-printer.local.");
    let types: Vec<&str> = p["mdns"]["services"]
        .as_array()
        .context("services")?
        .iter()
        .filter_map(|s| s["service_type"].as_str())
        .collect();
    assert!(
        types.contains(&"_ipp._tcp.local.") && types.contains(&"_printer._tcp.local."),
        "{types:?}"
    );
    let ipp = p["mdns"]["services"]
        .as_array()
        .context("services")?
        .iter()
        .find(|s| s["service_type"] == "_ipp._tcp.local.")
        .context("ipp")?;
    assert_eq!(ipp["port"], 631);
    assert_eq!(ipp["txt"]["ty"], "Lab LaserJet 400");
    assert_eq!(ipp["instance"], "Office Printer._ipp._tcp.local.");
    assert_eq!(p["category"], "printer", "{}", p["category_reason"]);
    let s = at(&devices, "198.18.0.31")?;
    assert_eq!(s["category"], "media-iot", "{}", s["category_reason"]);
    assert_eq!(s["mdns"]["services"].as_array().map(Vec::len), Some(2));
    // The garbage responder is still a device (it answered ARP), with no SNMP identity.
    assert!(at(&devices, "198.18.0.40")?["snmp"].is_null());
    // The router: its own SNMP, and the routed hosts found by ICMP with MACs from its ARP cache.
    let gw = at(&devices, "198.18.0.1")?;
    assert_eq!(gw["snmp"]["sys_name"], "gateway");
    for h in &behind {
        let d = at(&devices, &h.ip().to_string())?;
        assert_eq!(strs(&d["methods"]), ["icmp", "snmp"], "{d}");
        assert_eq!(d["macs"][0]["mac"], mac_string(h.mac()), "{d}");
        assert_eq!(d["macs"][0]["first_hand"], false);
        assert_eq!(d["macs"][0]["via"], "arp cache of 198.18.0.1");
    }

    // The same sweep delivered: the collector counts every device, by category.
    let collector = Collector::start(&lab, &lab.dir().join("collector"))?;
    let state = collector.enroll("acme", "hq")?;
    let out = support::agent_once(
        &lab,
        site.agent().ns(),
        [
            "--config",
            config.to_str().context("utf-8")?,
            "--collector",
            &collector.url(),
            "--state-dir",
            state.to_str().context("utf-8")?,
        ],
    )?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The router's routed-side address (198.18.1.1) has no MAC of its own in any table, so it
    // is a device of its own until identity resolution can tie it to the router.
    assert_eq!(collector.devices_of("acme")?, 12);
    let listed = collector.devices("acme")?;
    assert!(listed.iter().any(|d| d.category == "printer"), "{listed:?}");
    Ok(())
}

#[test]
fn an_interface_can_name_the_scope() -> Result<()> {
    if lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let site = lab.add_site(SiteSpec::new(
        "by-interface",
        "198.18.4.0/24".parse()?,
        ip("198.18.4.2"),
    ))?;
    let hosts = site.add_hosts(HostSpec::range(ip("198.18.4.50"), 3))?;
    let devices = support::scan(
        &lab,
        site.agent().ns(),
        ["--scope-interface", "eth0", "--disable", "snmp,mdns"],
    )?;
    let mut got: Vec<String> = devices
        .iter()
        .filter_map(|d| d["addresses"][0]["address"].as_str().map(str::to_owned))
        .collect();
    got.sort();
    let want: Vec<String> = hosts.iter().map(|h| h.ip().to_string()).collect();
    assert_eq!(got, want, "exactly eth0's subnet, not the uplink's");
    Ok(())
}
