//! What a device is: its MACs' vendors (the IEEE registry, built in) and its category, from
//! the evidence the sweep gathered. I/O-free and deterministic: the same evidence always gives
//! the same category and the same reason.
//!
//! Evidence is weighed from strongest to weakest: what the device says about itself (SNMP
//! sysDescr and sysObjectID, then its SNMP tables, then mDNS service types and TXT model), then
//! its MAC's vendor. The reason string names the evidence that decided, so an operator can check
//! it.
//!
//! Over SNMP, what a device says it *is* outranks what it looks like: a printer's or a network
//! vendor's sysDescr first, then the operating system (a Linux Docker host or hypervisor has
//! several interfaces with MACs, a bridge and an ARP cache, and is still a server), and only
//! then the shape heuristics (a bridge table, LLDP neighbours, several interfaces with an ARP
//! cache) that file an unnamed box as network gear.
//!
//! Computer or server: Windows says which in its sysObjectID (Microsoft's
//! `1.3.6.1.4.1.311.1.1.3.1.1` workstation, `.2` server, `.3` domain controller), or
//! "Windows Server" in its sysDescr; a Unix-like system (Linux, the BSDs, Solaris) that runs
//! an SNMP agent is a server (desktops seldom run one; servers, NAS and hypervisors do); macOS
//! is a computer.

use census_proto::v1::{self, Category};

/// The registered owner of a MAC's OUI (or of its MA-M / MA-S block), if any.
pub fn vendor(mac: [u8; 6]) -> Option<&'static str> {
    // Locally administered MACs have no registered owner; a lookup would only mislead.
    if mac[0] & 0x02 != 0 {
        return None;
    }
    let hex: String = mac.iter().map(|b| format!("{b:02X}")).collect();
    oui_data::lookup(&hex).map(oui_data::OuiData::organization)
}

const PRINTER_SERVICES: &[&str] = &[
    "_ipp._tcp",
    "_ipps._tcp",
    "_printer._tcp",
    "_pdl-datastream._tcp",
    "_uscan._tcp",
    "_scanner._tcp",
];
const MEDIA_SERVICES: &[&str] = &[
    "_airplay._tcp",
    "_raop._tcp",
    "_googlecast._tcp",
    "_spotify-connect._tcp",
    "_sonos._tcp",
    "_hap._tcp",
    "_hap._udp",
    "_matter._tcp",
    "_homekit._tcp",
    "_amzn-wplay._tcp",
    "_rtsp._tcp",
];
const PHONE_SERVICES: &[&str] = &["_apple-mobdev2._tcp", "_apple-pairable._tcp"];
const COMPUTER_SERVICES: &[&str] = &[
    "_workstation._tcp",
    "_smb._tcp",
    "_ssh._tcp",
    "_sftp-ssh._tcp",
    "_rfb._tcp",
    "_afpovertcp._tcp",
    "_adisk._tcp",
];

const NETWORK_DESCR: &[&str] = &[
    "cisco ios",
    "routeros",
    "mikrotik",
    "junos",
    "fortigate",
    "fortios",
    "pfsense",
    "opnsense",
    "edgeos",
    "edgeswitch",
    "procurve",
    "aruba",
    "arubaos",
    "unifi",
    "openwrt",
    "switch",
    "router",
    "firewall",
    "access point",
    "vyos",
    "cumulus",
    "arista networks",
    "sonic",
    "dd-wrt",
];
const PRINTER_DESCR: &[&str] = &[
    "printer",
    "laserjet",
    "officejet",
    "jetdirect",
    "lexmark",
    "brother nc",
    "kyocera",
    "ricoh",
    "xerox",
    "canon ir",
    "epson",
];
/// Operating systems a sysDescr names, as found (lower case) and as shown.
const OS_DESCR: &[(&str, &str)] = &[
    ("windows", "Windows"),
    ("darwin", "macOS"),
    ("macos", "macOS"),
    ("linux", "Linux"),
    ("freebsd", "FreeBSD"),
    ("openbsd", "OpenBSD"),
    ("netbsd", "NetBSD"),
    ("sunos", "SunOS"),
    ("solaris", "Solaris"),
];
/// Microsoft's sysObjectIDs for Windows: a workstation, a server, a domain controller.
const WINDOWS_WORKSTATION_OID: &str = "1.3.6.1.4.1.311.1.1.3.1.1";
const WINDOWS_SERVER_OIDS: &[(&str, &str)] = &[
    ("1.3.6.1.4.1.311.1.1.3.1.2", "Windows Server"),
    ("1.3.6.1.4.1.311.1.1.3.1.3", "a Windows domain controller"),
];
/// How much of a sysDescr a reason quotes.
const QUOTED_DESCR: usize = 64;
const NETWORK_VENDORS: &[&str] = &[
    "cisco",
    "juniper",
    "ubiquiti",
    "mikrotik",
    "routerboard",
    "aruba",
    "fortinet",
    "netgear",
    "tp-link",
    "zyxel",
    "meraki",
    "ruckus",
    "extreme networks",
    "palo alto",
];
const PRINTER_VENDORS: &[&str] = &[
    "lexmark",
    "brother industries",
    "kyocera",
    "ricoh",
    "xerox",
    "seiko epson",
    "canon",
];
const MEDIA_VENDORS: &[&str] = &[
    "sonos",
    "roku",
    "espressif",
    "amazon technologies",
    "google",
    "philips lighting",
    "signify",
];

fn service_type_of(s: &v1::MdnsService) -> &str {
    s.service_type
        .trim_end_matches('.')
        .trim_end_matches(".local")
}

fn contains_any<'a>(haystack: &str, needles: &[&'a str]) -> Option<&'a str> {
    let h = haystack.to_ascii_lowercase();
    needles.iter().copied().find(|n| h.contains(n))
}

fn txt<'a>(mdns: &'a v1::MdnsIdentity, key: &str) -> Option<&'a str> {
    mdns.services
        .iter()
        .flat_map(|s| &s.txt)
        .find(|t| t.key.eq_ignore_ascii_case(key))
        .map(|t| t.value.as_str())
}

/// A sysDescr for a reason: its first [`QUOTED_DESCR`] characters, on one line.
fn quoted(descr: &str) -> String {
    let one_line: String = descr.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > QUOTED_DESCR {
        let cut: String = one_line.chars().take(QUOTED_DESCR).collect();
        format!("{cut}...")
    } else {
        one_line
    }
}

/// The operating system an SNMP agent names, as a category and the reason for it.
fn operating_system(snmp: &v1::SnmpIdentity) -> Option<(Category, String)> {
    let oid = snmp.sys_object_id.trim().trim_start_matches('.');
    if let Some((_, what)) = WINDOWS_SERVER_OIDS.iter().find(|(o, _)| *o == oid) {
        return Some((
            Category::Server,
            format!("SNMP sysObjectID {oid} is {what}: server"),
        ));
    }
    if oid == WINDOWS_WORKSTATION_OID {
        return Some((
            Category::Computer,
            format!("SNMP sysObjectID {oid} is a Windows workstation: computer"),
        ));
    }
    let lower = snmp.sys_descr.to_ascii_lowercase();
    let (_, os) = OS_DESCR.iter().find(|(word, _)| lower.contains(word))?;
    let descr = quoted(&snmp.sys_descr);
    let category = match *os {
        "Windows" if lower.contains("windows server") => Category::Server,
        "Windows" | "macOS" => Category::Computer,
        _ => Category::Server,
    };
    Some((
        category,
        format!("SNMP sysDescr says {os} ({descr:?}): {}", category.label()),
    ))
}

/// Decides the category of a device from what one observation holds.
pub fn categorize(obs: &v1::Observation) -> (Category, String) {
    if let Some(snmp) = &obs.snmp {
        if let Some(word) = contains_any(&snmp.sys_descr, PRINTER_DESCR) {
            return (
                Category::Printer,
                format!("SNMP sysDescr mentions {word:?}"),
            );
        }
        if let Some(word) = contains_any(&snmp.sys_descr, NETWORK_DESCR) {
            return (
                Category::Network,
                format!("SNMP sysDescr mentions {word:?}"),
            );
        }
        // What the device says it runs outranks what it looks like.
        if let Some(decided) = operating_system(snmp) {
            return decided;
        }
        if !snmp.forwarding.is_empty() {
            return (
                Category::Network,
                format!(
                    "SNMP: forwards frames ({} MACs in its bridge table)",
                    snmp.forwarding.len()
                ),
            );
        }
        if !snmp.lldp_neighbors.is_empty() && !snmp.arp_cache.is_empty() {
            return (
                Category::Network,
                "SNMP: has LLDP neighbours and an ARP cache".into(),
            );
        }
        if snmp.arp_cache.len() > 1
            && snmp.interfaces.iter().filter(|i| i.mac.len() == 6).count() > 1
        {
            return (
                Category::Network,
                format!(
                    "SNMP: {} interfaces and an ARP cache of {} entries",
                    snmp.interfaces.len(),
                    snmp.arp_cache.len()
                ),
            );
        }
    }
    if let Some(mdns) = &obs.mdns {
        let types: Vec<&str> = mdns.services.iter().map(service_type_of).collect();
        let has = |list: &[&str]| types.iter().copied().find(|t| list.contains(t));
        if let Some(model) =
            txt(mdns, "model").filter(|m| m.starts_with("iPhone") || m.starts_with("iPad"))
        {
            return (Category::PhoneTablet, format!("mDNS TXT model={model}"));
        }
        if let Some(t) = has(PRINTER_SERVICES) {
            return (Category::Printer, format!("mDNS advertises {t}"));
        }
        if let Some(t) = has(PHONE_SERVICES) {
            return (Category::PhoneTablet, format!("mDNS advertises {t}"));
        }
        if let Some(t) = has(MEDIA_SERVICES) {
            return (Category::MediaIot, format!("mDNS advertises {t}"));
        }
        if let Some(t) = has(COMPUTER_SERVICES) {
            return (Category::Computer, format!("mDNS advertises {t}"));
        }
    }
    for ev in &obs.mac_evidence {
        if !ev.first_hand || ev.vendor.is_empty() {
            continue;
        }
        for (list, category) in [
            (NETWORK_VENDORS, Category::Network),
            (PRINTER_VENDORS, Category::Printer),
            (MEDIA_VENDORS, Category::MediaIot),
        ] {
            if contains_any(&ev.vendor, list).is_some() {
                return (category, format!("MAC vendor {}", ev.vendor));
            }
        }
    }
    (
        Category::Unknown,
        "no identifying evidence (no SNMP, mDNS or telling vendor)".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mdns(types: &[&str], txt: &[(&str, &str)]) -> v1::Observation {
        v1::Observation {
            mdns: Some(v1::MdnsIdentity {
                host_name: "h.local.".into(),
                services: types
                    .iter()
                    .map(|t| v1::MdnsService {
                        instance: format!("x.{t}"),
                        service_type: (*t).into(),
                        port: 1,
                        txt: txt
                            .iter()
                            .map(|(k, v)| v1::TxtRecord {
                                key: (*k).into(),
                                value: (*v).into(),
                            })
                            .collect(),
                    })
                    .collect(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn vendors_come_from_the_registry() {
        assert_eq!(
            vendor([0x00, 0x00, 0x0c, 0x01, 0x02, 0x03]),
            Some("Cisco Systems, Inc")
        );
        assert_eq!(
            vendor([0x02, 0x00, 0x0c, 0x01, 0x02, 0x03]),
            None,
            "locally administered"
        );
    }

    #[test]
    fn mdns_services_decide() {
        assert_eq!(
            categorize(&mdns(&["_ipp._tcp.local."], &[])).0,
            Category::Printer
        );
        assert_eq!(
            categorize(&mdns(&["_airplay._tcp.local.", "_raop._tcp.local."], &[])).0,
            Category::MediaIot
        );
        assert_eq!(
            categorize(&mdns(
                &["_companion-link._tcp.local."],
                &[("model", "iPhone14,2")]
            ))
            .0,
            Category::PhoneTablet
        );
        let (c, why) = categorize(&mdns(
            &["_ssh._tcp.local.", "_workstation._tcp.local."],
            &[],
        ));
        assert_eq!(c, Category::Computer);
        assert!(
            why.contains("_ssh._tcp") || why.contains("_workstation._tcp"),
            "{why}"
        );
    }

    #[test]
    fn snmp_decides_before_mdns() {
        let mut obs = mdns(&["_ssh._tcp.local."], &[]);
        obs.snmp = Some(v1::SnmpIdentity {
            sys_descr: "RouterOS RB4011".into(),
            ..Default::default()
        });
        assert_eq!(categorize(&obs).0, Category::Network);
        obs.snmp = Some(v1::SnmpIdentity {
            sys_descr: "HP ETHERNET MULTI-ENVIRONMENT,ROM none,JETDIRECT".into(),
            ..Default::default()
        });
        assert_eq!(categorize(&obs).0, Category::Printer);
        obs.snmp = Some(v1::SnmpIdentity {
            sys_descr: "Linux fileserver 6.1.0".into(),
            ..Default::default()
        });
        assert_eq!(
            categorize(&obs).0,
            Category::Server,
            "a Linux host running an SNMP agent is a server, whatever mDNS advertises"
        );
    }

    /// The SNMP identity of a Debian host with two NICs and a bridge (a Docker host or a
    /// hypervisor): several interfaces with MACs, an ARP cache, LLDP neighbours, a bridge table.
    fn multi_nic(sys_descr: &str, sys_object_id: &str) -> v1::Observation {
        let iface = |i: u32, name: &str, mac: Option<u8>| v1::SnmpInterface {
            if_index: i,
            name: name.into(),
            mac: mac
                .map(|m| vec![0x00, 0x16, 0x3e, 0x64, 0x00, m])
                .unwrap_or_default(),
        };
        let neighbour = |i: u8| v1::NeighborEntry {
            address: format!("198.18.64.{i}"),
            mac: vec![0x00, 0x16, 0x3e, 0x64, 0x01, i],
            if_index: 2,
        };
        v1::Observation {
            snmp: Some(v1::SnmpIdentity {
                sys_descr: sys_descr.into(),
                sys_object_id: sys_object_id.into(),
                interfaces: vec![
                    iface(1, "lo", None),
                    iface(2, "eth0", Some(1)),
                    iface(3, "eth1", Some(2)),
                    iface(4, "br0", Some(3)),
                ],
                arp_cache: (1..5).map(neighbour).collect(),
                forwarding: vec![v1::ForwardingEntry {
                    mac: vec![0x00, 0x16, 0x3e, 0x64, 0x01, 1],
                    ..Default::default()
                }],
                lldp_neighbors: vec![v1::LldpNeighbor::default()],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    const DEBIAN: &str =
        "Linux host 6.1.0-18-amd64 #1 SMP PREEMPT_DYNAMIC Debian 6.1.76-1 (2024-02-01) x86_64";
    const NET_SNMP_LINUX: &str = "1.3.6.1.4.1.8072.3.2.10";

    #[test]
    fn operating_system_evidence_outranks_the_shape_of_a_multi_nic_host() {
        let (c, why) = categorize(&multi_nic(DEBIAN, NET_SNMP_LINUX));
        assert_eq!(c, Category::Server, "{why}");
        assert!(
            why.starts_with("SNMP sysDescr says Linux (\"Linux host 6.1.0-18-amd64")
                && why.ends_with(": server"),
            "{why}"
        );
        // The same shape with nothing said about the system: network gear, by its bridge.
        let (c, why) = categorize(&multi_nic("Census lab device", ""));
        assert_eq!(c, Category::Network, "{why}");
        // A network OS on Linux names itself: network.
        let (c, why) = categorize(&multi_nic("Linux OpenWrt 5.15.137 #0 SMP", ""));
        assert_eq!(
            (c, why.as_str()),
            (Category::Network, "SNMP sysDescr mentions \"openwrt\"")
        );
    }

    #[test]
    fn windows_says_server_or_workstation_in_its_sys_object_id() {
        let descr = "Hardware: Intel64 Family 6 Model 85 Stepping 7 AT/AT COMPATIBLE - Software: Windows Version 6.3 (Build 17763 Multiprocessor Free)";
        let (c, why) = categorize(&multi_nic(descr, "1.3.6.1.4.1.311.1.1.3.1.2"));
        assert_eq!(c, Category::Server, "{why}");
        assert!(why.contains("Windows Server"), "{why}");
        let (c, _) = categorize(&multi_nic(descr, ".1.3.6.1.4.1.311.1.1.3.1.3"));
        assert_eq!(c, Category::Server, "a domain controller");
        let (c, why) = categorize(&multi_nic(descr, "1.3.6.1.4.1.311.1.1.3.1.1"));
        assert_eq!(c, Category::Computer, "{why}");
        // Without a Microsoft sysObjectID, the sysDescr decides.
        let (c, why) = categorize(&multi_nic(descr, ""));
        assert_eq!(
            (c, why.starts_with("SNMP sysDescr says Windows")),
            (Category::Computer, true),
            "{why}"
        );
        let (c, _) = categorize(&multi_nic("Microsoft Windows Server 2022 Datacenter", ""));
        assert_eq!(c, Category::Server);
        let (c, _) = categorize(&multi_nic(
            "Darwin mac-mini 23.4.0 Darwin Kernel Version 23.4.0",
            "",
        ));
        assert_eq!(c, Category::Computer);
    }

    #[test]
    fn nothing_known_is_unknown_with_a_reason() {
        let (c, why) = categorize(&v1::Observation::default());
        assert_eq!(c, Category::Unknown);
        assert!(!why.is_empty());
    }
}
