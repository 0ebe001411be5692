//! What a device is: its MACs' vendors (the IEEE registry, built in) and its category, from
//! the evidence the sweep gathered. I/O-free and deterministic: the same evidence always gives
//! the same category and the same reason.
//!
//! Evidence is weighed from strongest to weakest: what the device says about itself (SNMP
//! sysDescr and tables, mDNS service types and TXT model), then its MAC's vendor. The reason
//! string names the evidence that decided, so an operator can check it.

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
const COMPUTER_DESCR: &[&str] = &["linux", "windows", "darwin", "freebsd", "macos"];
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

/// Decides the category of a device from what one observation holds.
pub fn categorize(obs: &v1::Observation) -> (Category, String) {
    if let Some(snmp) = &obs.snmp {
        if let Some(word) = contains_any(&snmp.sys_descr, PRINTER_DESCR) {
            return (
                Category::Printer,
                format!("SNMP sysDescr mentions {word:?}"),
            );
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
        if let Some(word) = contains_any(&snmp.sys_descr, NETWORK_DESCR) {
            return (
                Category::Network,
                format!("SNMP sysDescr mentions {word:?}"),
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
    if let Some(snmp) = &obs.snmp
        && let Some(word) = contains_any(&snmp.sys_descr, COMPUTER_DESCR)
    {
        return (
            Category::Computer,
            format!("SNMP sysDescr mentions {word:?}"),
        );
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
            Category::Computer,
            "mDNS _ssh says computer, so does sysDescr"
        );
    }

    #[test]
    fn nothing_known_is_unknown_with_a_reason() {
        let (c, why) = categorize(&v1::Observation::default());
        assert_eq!(c, Category::Unknown);
        assert!(!why.is_empty());
    }
}
