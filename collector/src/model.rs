//! The collector's records and the I/O-free validation of what agents send.
//!
//! Nothing here touches disk, the network or the clock: every function takes the time it needs
//! as an argument, so ingest and counting are deterministic to test. The stores persist these
//! records; the services translate them to and from `census.v1`.
//!
//! Which observations are one device is [`crate::identity`]'s job, and which devices count is
//! [`crate::policy`]'s; every record is scoped by client, so two clients' overlapping subnets
//! never meet.

use std::net::IpAddr;

use census_proto::{
    convert::{self, MacAddr},
    v1,
};
use serde::{Deserialize, Serialize};

/// Caps on what one observation may carry; anything beyond is dropped, never stored.
pub const MAX_MACS: usize = 32;
pub const MAX_ADDRESSES: usize = 64;
pub const MAX_NAMES: usize = 16;
pub const MAX_NAME_LEN: usize = 255;
pub const MAX_AGENT_ID_LEN: usize = 128;
/// How many (agent, method) evidence lines a device keeps; the oldest-seen go first.
pub const MAX_EVIDENCE: usize = 64;
/// How many addresses and names a device keeps; the least recently seen go first.
pub const MAX_DEVICE_ADDRESSES: usize = 64;

/// Observations stamped further than this in the future are clamped to the receive time.
const MAX_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;

// === names ===

/// Why a client, site or agent name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{kind} name must not be empty")]
    Empty { kind: &'static str },
    #[error("{kind} name {name:?} is too long (at most 64 characters)")]
    TooLong { kind: &'static str, name: String },
    #[error(
        "{kind} name {name:?} may only contain letters, digits, '.', '_' and '-' and must start with a letter or digit"
    )]
    Invalid { kind: &'static str, name: String },
}

/// Checks a client or site name: 1 to 64 of `[A-Za-z0-9._-]`, starting alphanumeric. Names are
/// parts of storage keys, so they never contain a separator.
pub fn validate_name(kind: &'static str, name: &str) -> Result<(), NameError> {
    let shown = || name.chars().take(80).collect::<String>();
    if name.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if name.len() > 64 {
        return Err(NameError::TooLong {
            kind,
            name: shown(),
        });
    }
    let ok_first = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let ok_rest = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !(ok_first && ok_rest) {
        return Err(NameError::Invalid {
            kind,
            name: shown(),
        });
    }
    Ok(())
}

// === records ===

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRecord {
    pub name: String,
    pub created_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteRecord {
    pub client: String,
    pub name: String,
    pub created_ms: u64,
}

/// An enrollment token: the collector keeps only the SHA-256 of its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub secret_sha256: [u8; 32],
    pub client: String,
    pub site: String,
    pub created_ms: u64,
    pub revoked: bool,
    /// After this, the token enrolls nothing.
    #[serde(default)]
    pub expires_ms: u64,
    /// The agent it enrolled, and when: a token enrolls one agent.
    #[serde(default)]
    pub used_by: Option<String>,
    #[serde(default)]
    pub used_ms: Option<u64>,
}

/// An enrolled agent: the certificate the collector signed for it, and the client and site
/// that certificate binds it to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub id: String,
    pub client: String,
    pub site: String,
    pub hostname: String,
    pub version: String,
    pub token_id: String,
    pub enrolled_ms: u64,
    /// The SHA-256 of its certificate's DER: how its calls are recognised.
    pub cert_sha256: [u8; 32],
    pub cert_not_after_ms: u64,
    pub revoked: bool,
    /// Its last batch (0: none yet), and its queue's length then.
    #[serde(default)]
    pub last_seen_ms: u64,
    #[serde(default)]
    pub backlog: u64,
}

/// The client and site an authenticated agent writes for. Taken from its token, never from
/// anything the agent sends.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope {
    pub client: String,
    pub site: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressRecord {
    pub ip: IpAddr,
    /// The site whose address space the address is in.
    pub site: String,
    pub answered: bool,
    pub last_seen_ms: u64,
    /// Whether the device answered on it (or claimed it) in its latest sighting at the site
    /// and still holds it: worked out when listed ([`crate::identity::mark_current`]).
    pub current: bool,
    /// Whether another device answered on it since: worked out when listed, never stored (so
    /// stored records keep their format).
    #[serde(skip)]
    pub lost: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvidenceRecord {
    pub agent_id: String,
    /// `census.v1.Method` as its wire number.
    pub method: i32,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    pub observations: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Stable identifier, derived from the client and the device's smallest key.
    pub id: String,
    /// The identifiers that make this device (see [`crate::identity`]).
    pub keys: Vec<String>,
    /// The latest category an agent decided on with evidence ("" until then), why, and when.
    pub category: String,
    pub category_reason: String,
    pub category_ms: u64,
    pub client: String,
    /// The first of `sites`, for display.
    pub site: String,
    /// Every site it was seen at (a laptop moves between a client's sites).
    pub sites: Vec<String>,
    pub macs: Vec<MacAddr>,
    pub addresses: Vec<AddressRecord>,
    pub names: Vec<String>,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    pub evidence: Vec<EvidenceRecord>,
    /// No strong identifier: only randomized MACs, names or an address.
    pub weak_only: bool,
    /// Oddities noticed (proxy ARP, ...).
    pub anomalies: Vec<String>,
}

// === observations ===

/// An observation that passed validation: every field parsed and capped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CleanObservation {
    pub observed_ms: u64,
    /// Every method that contributed, at least one.
    pub methods: Vec<v1::Method>,
    /// The agent's category and its reason, when it decided one.
    pub category: Option<(v1::Category, String)>,
    /// MACs the device was reached by (ARP reply, a router's ARP cache).
    pub macs: Vec<MacAddr>,
    /// MACs the device lists among its own interfaces over SNMP.
    pub interface_macs: Vec<MacAddr>,
    pub engine_id: Option<Vec<u8>>,
    pub serial: Option<String>,
    pub mdns_host: Option<String>,
    /// (address, answered)
    pub addresses: Vec<(IpAddr, bool)>,
    pub names: Vec<String>,
    /// The agent saw this MAC answer ARP for many addresses.
    pub proxy_arp: bool,
    /// How many addresses the agent reported, before the cap on what is kept.
    pub reported_addresses: usize,
}

/// Validates one observation from an agent. `None` when it names no device: no unicast MAC and
/// no address the device answered on. Oversized fields are truncated to the caps above.
///
/// `clock_offset_ms` is how far the collector's clock is ahead of the agent's (receive time
/// minus the batch's `sent_at`): an agent whose clock is wrong (an appliance that booted in
/// 1970) still has its observations dated right.
pub fn clean_observation(
    obs: &v1::Observation,
    received_ms: u64,
    clock_offset_ms: i64,
) -> Option<CleanObservation> {
    let valid = |m: &i32| {
        v1::Method::try_from(*m)
            .ok()
            .filter(|m| *m != v1::Method::Unspecified)
    };
    let mut methods: Vec<v1::Method> = obs.methods.iter().take(8).filter_map(valid).collect();
    if methods.is_empty() {
        methods.extend(valid(&obs.method));
    }
    methods.sort_by_key(|m| *m as i32);
    methods.dedup();
    if methods.is_empty() {
        return None;
    }
    // "unknown" is kept with its reason (why nothing decided); an unset category is not.
    let category = v1::Category::try_from(obs.category)
        .ok()
        .filter(|c| *c != v1::Category::Unspecified)
        .map(|c| (c, clean_text(&obs.category_reason, MAX_NAME_LEN)));
    let mut macs: Vec<MacAddr> = obs
        .macs
        .iter()
        .take(MAX_MACS)
        .filter_map(|b| MacAddr::try_from(b.as_slice()).ok())
        .filter(MacAddr::is_unicast)
        .collect();
    macs.sort();
    macs.dedup();
    let mut addresses: Vec<(IpAddr, bool)> = Vec::new();
    for a in obs.addresses.iter().take(MAX_ADDRESSES) {
        let Some(ip) = convert::parse_ip(&a.address) else {
            continue;
        };
        if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
            continue;
        }
        match addresses.iter_mut().find(|(known, _)| *known == ip) {
            Some((_, answered)) => *answered |= a.answered,
            None => addresses.push((ip, a.answered)),
        }
    }
    let mut names: Vec<String> = obs
        .names
        .iter()
        .take(MAX_NAMES)
        .map(|n| clean_text(&n.value, MAX_NAME_LEN))
        .filter(|n| !n.is_empty())
        .collect();
    names.sort();
    names.dedup();
    if macs.is_empty() && !addresses.iter().any(|(_, answered)| *answered) {
        return None;
    }
    let snmp = obs.snmp.as_ref();
    let mut interface_macs: Vec<MacAddr> = snmp
        .map(|s| {
            s.interfaces
                .iter()
                .take(MAX_MACS * 4)
                .filter_map(|i| MacAddr::try_from(i.mac.as_slice()).ok())
                .filter(MacAddr::is_unicast)
                .collect()
        })
        .unwrap_or_default();
    interface_macs.sort();
    interface_macs.dedup();
    interface_macs.truncate(MAX_MACS * 4);
    let engine_id = snmp
        .map(|s| s.engine_id.clone())
        .filter(|e| (5..=32).contains(&e.len()));
    let serial = snmp
        .map(|s| clean_text(&s.serial_number, 64))
        .filter(|s| !s.is_empty());
    let mdns_host = obs
        .mdns
        .as_ref()
        .map(|m| clean_text(&m.host_name, MAX_NAME_LEN))
        .filter(|h| !h.is_empty());
    let proxy_arp = obs
        .anomalies
        .iter()
        .any(|a| a.kind == v1::AnomalyKind::ProxyArp as i32);
    let observed_ms = obs
        .observed_at
        .as_ref()
        .and_then(convert::system_time)
        .map(convert::unix_millis)
        .map(|ms| ms.saturating_add_signed(clock_offset_ms))
        .filter(|ms| *ms <= received_ms.saturating_add(MAX_CLOCK_SKEW_MS))
        .unwrap_or(received_ms);
    Some(CleanObservation {
        observed_ms,
        methods,
        category,
        macs,
        interface_macs,
        engine_id,
        serial,
        mdns_host,
        addresses,
        names,
        proxy_arp,
        reported_addresses: obs.addresses.len(),
    })
}

/// How far the collector's clock (`received_ms`) is ahead of the agent's, from the batch's
/// `sent_at`; 0 when the batch does not say.
pub fn clock_offset(sent_at: Option<&prost_types::Timestamp>, received_ms: u64) -> i64 {
    sent_at
        .and_then(convert::system_time)
        .map(convert::unix_millis)
        .map_or(0, |sent| {
            i64::try_from(i128::from(received_ms) - i128::from(sent)).unwrap_or(0)
        })
}

/// Drops control characters and truncates to `max` bytes on a character boundary.
pub fn clean_text(s: &str, max: usize) -> String {
    let mut out = String::new();
    for c in s.chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out.trim().to_owned()
}

// === categories ===

/// Category of a device: the agents' latest decision, "unknown" without one.
pub fn category(dev: &DeviceRecord) -> &str {
    if dev.category.is_empty() {
        "unknown"
    } else {
        &dev.category
    }
}

/// Why a device has its category: the agent's reason, also for "unknown". Devices stored
/// before agents' reasons for "unknown" were kept have none; they say so.
pub fn category_reason(dev: &DeviceRecord) -> &str {
    if dev.category_reason.is_empty() {
        "no agent has reported evidence of what it is yet"
    } else {
        &dev.category_reason
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(client: &str) -> Scope {
        Scope {
            client: client.into(),
            site: "hq".into(),
        }
    }

    fn arp(ip: &str, mac: [u8; 6], at_ms: u64) -> v1::Observation {
        v1::Observation {
            observed_at: Some(convert::timestamp_from_millis(at_ms)),
            method: v1::Method::Arp as i32,
            addresses: vec![v1::IpAddress {
                address: ip.into(),
                answered: true,
                ..Default::default()
            }],
            macs: vec![mac.to_vec()],
            ..Default::default()
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("client", "acme-corp.1").is_ok());
        assert!(validate_name("client", "").is_err());
        assert!(validate_name("client", "-x").is_err());
        assert!(validate_name("client", "a/b").is_err());
        assert!(validate_name("client", "a\0b").is_err());
        assert!(validate_name("client", &"a".repeat(65)).is_err());
    }

    #[test]
    fn observation_without_identity_is_refused() {
        let mut obs = arp("198.18.0.1", [0; 6], 1);
        obs.addresses[0].answered = false;
        assert_eq!(clean_observation(&obs, 10, 0), None);
        let garbage = v1::Observation {
            method: v1::Method::Arp as i32,
            macs: vec![vec![1, 2, 3]],
            addresses: vec![v1::IpAddress {
                address: "not an ip".into(),
                answered: true,
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(clean_observation(&garbage, 10, 0), None);
        let unspecified = v1::Observation {
            method: 0,
            ..arp("198.18.0.1", [0, 0x16, 0x3e, 0, 0, 1], 1)
        };
        assert_eq!(clean_observation(&unspecified, 10, 0), None);
    }

    #[test]
    fn hostile_sizes_are_capped() {
        let obs = v1::Observation {
            method: v1::Method::Mdns as i32,
            macs: (0..1000u32)
                .map(|i| vec![0, 0x16, 0x3e, 0, (i >> 8) as u8, i as u8])
                .collect(),
            names: (0..1000)
                .map(|i| v1::Name {
                    value: format!("{i}{}", "x\u{7}".repeat(10_000)),
                    source: 0,
                })
                .collect(),
            ..Default::default()
        };
        let clean = clean_observation(&obs, 10, 0).expect("has macs");
        assert_eq!(clean.macs.len(), MAX_MACS);
        assert!(clean.names.len() <= MAX_NAMES);
        assert!(
            clean
                .names
                .iter()
                .all(|n| n.len() <= MAX_NAME_LEN && !n.contains('\u{7}'))
        );
    }

    #[test]
    fn an_agent_clock_in_the_past_is_corrected_by_sent_at() {
        // The agent thinks it is 1970 + 10 s; the collector knows it is much later.
        let received = 1_764_000_000_000;
        let obs = arp("198.18.0.1", [0, 0x16, 0x3e, 0, 0, 1], 9_000);
        let offset = clock_offset(Some(&convert::timestamp_from_millis(10_000)), received);
        let clean = clean_observation(&obs, received, offset).expect("valid");
        assert_eq!(
            clean.observed_ms,
            received - 1_000,
            "observed one second before it was sent"
        );
        assert_eq!(clock_offset(None, received), 0);
    }

    #[test]
    fn future_timestamps_are_clamped() {
        let obs = arp("198.18.0.1", [0, 0x16, 0x3e, 0, 0, 1], u64::MAX / 2_000_000);
        let clean = clean_observation(&obs, 1_000, 0).expect("valid");
        assert_eq!(clean.observed_ms, 1_000);
    }

    #[test]
    fn stale_devices_stop_counting() {
        let obs = clean_observation(
            &arp("198.18.0.10", [0, 0x16, 0x3e, 0, 0, 1], 1_000),
            1_000,
            0,
        )
        .expect("valid");
        let mut g = crate::identity::MemGraph::default();
        crate::identity::apply(&mut g, &scope("acme"), "agent", &obs).expect("infallible");
        let dev = g.devices.values().next().expect("a device");
        let policy = crate::policy::Policy::default();
        let window_ms = 30 * 24 * 60 * 60 * 1000;
        assert!(crate::policy::evaluate(&policy, dev, 1_000 + window_ms).counted);
        let stale = crate::policy::evaluate(&policy, dev, 1_001 + window_ms);
        assert!(!stale.counted, "{stale:?}");
        // Out of the window, but still there: history is kept.
        assert_eq!(g.devices.len(), 1);
    }

    #[test]
    fn identity_fields_are_read_from_snmp_mdns_and_anomalies() {
        let mut wire = arp("198.18.0.1", [0, 0x16, 0x3e, 0, 0, 1], 1_000);
        wire.methods = vec![
            v1::Method::Arp as i32,
            v1::Method::Snmp as i32,
            v1::Method::Arp as i32,
            99,
        ];
        wire.category = v1::Category::Network as i32;
        wire.category_reason = "SNMP sysDescr mentions \"routeros\"".into();
        wire.snmp = Some(v1::SnmpIdentity {
            engine_id: vec![0x80, 0, 0x1f, 0x88, 4, 1],
            serial_number: "SN\u{7}123".into(),
            interfaces: vec![
                v1::SnmpInterface {
                    if_index: 1,
                    name: "eth0".into(),
                    mac: vec![0, 0x16, 0x3e, 0, 0, 1],
                },
                v1::SnmpInterface {
                    if_index: 2,
                    name: "lo".into(),
                    mac: vec![],
                },
                v1::SnmpInterface {
                    if_index: 3,
                    name: "junk".into(),
                    mac: vec![1, 2, 3],
                },
            ],
            ..Default::default()
        });
        wire.mdns = Some(v1::MdnsIdentity {
            host_name: "gw.local.".into(),
            services: vec![],
        });
        wire.anomalies = vec![v1::Anomaly {
            kind: v1::AnomalyKind::ProxyArp as i32,
            detail: "x".into(),
        }];
        let obs = clean_observation(&wire, 5_000, 0).expect("valid");
        assert_eq!(obs.methods, [v1::Method::Arp, v1::Method::Snmp]);
        assert_eq!(obs.interface_macs.len(), 1);
        assert_eq!(
            obs.engine_id.as_deref(),
            Some(&[0x80, 0, 0x1f, 0x88, 4, 1][..])
        );
        assert_eq!(obs.serial.as_deref(), Some("SN123"));
        assert_eq!(obs.mdns_host.as_deref(), Some("gw.local."));
        assert!(obs.proxy_arp);
        assert_eq!(
            obs.category.as_ref().map(|c| c.0),
            Some(v1::Category::Network)
        );
    }
}
