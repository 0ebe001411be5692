//! The collector's records and the I/O-free rules that turn observations into devices.
//!
//! Nothing here touches disk, the network or the clock: every function takes the time it needs
//! as an argument, so ingest and counting are deterministic to test. The stores persist these
//! records; the services translate them to and from `census.v1`.
//!
//! Identity, first cut: a device is named by (client, site, MAC). An observation without a MAC
//! (a routed host seen by ICMP) is named by its answered IP address instead. The full identity
//! resolution (strong and weak identifiers, merges, splits) replaces [`device_key`] later; every
//! key is already scoped by client and site, so two clients' overlapping subnets never meet.

use std::{collections::BTreeMap, net::IpAddr};

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

/// Version of the counting rules in [`counts_device`].
pub const DEVICE_POLICY_VERSION: &str = "device-v1";
/// Devices seen within this window count.
pub const DEFAULT_WINDOW_MS: u64 = 30 * 24 * 60 * 60 * 1000;
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
    pub answered: bool,
    pub last_seen_ms: u64,
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
    /// Stable identifier: the hex of the device's key within its client.
    pub id: String,
    /// The latest category an agent decided on with evidence ("unknown" until then), and why.
    pub category: String,
    pub category_reason: String,
    pub client: String,
    pub site: String,
    pub macs: Vec<MacAddr>,
    pub addresses: Vec<AddressRecord>,
    pub names: Vec<String>,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    pub evidence: Vec<EvidenceRecord>,
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
    pub macs: Vec<MacAddr>,
    /// (address, answered)
    pub addresses: Vec<(IpAddr, bool)>,
    pub names: Vec<String>,
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
    let category = v1::Category::try_from(obs.category)
        .ok()
        .filter(|c| !matches!(c, v1::Category::Unspecified | v1::Category::Unknown))
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
        addresses,
        names,
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
fn clean_text(s: &str, max: usize) -> String {
    let mut out = String::new();
    for c in s.chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out.trim().to_owned()
}

/// The key naming an observation's device within its site: its lowest MAC, or, without one,
/// its first answered address.
pub fn device_key(obs: &CleanObservation) -> Option<String> {
    if let Some(mac) = obs.macs.first() {
        return Some(format!("mac:{mac}"));
    }
    obs.addresses
        .iter()
        .find(|(_, answered)| *answered)
        .map(|(ip, _)| format!("ip:{ip}"))
}

/// A stable device identifier: the client-scoped key, hashed so it is short and opaque.
pub fn device_id(scope: &Scope, key: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(scope.client.as_bytes())
        .chain_update([0])
        .chain_update(scope.site.as_bytes())
        .chain_update([0])
        .chain_update(key.as_bytes())
        .finalize();
    hex::encode(&digest[..10])
}

/// Folds one observation into a device (a new one when `existing` is `None`).
pub fn apply_observation(
    existing: Option<DeviceRecord>,
    scope: &Scope,
    key: &str,
    agent_id: &str,
    obs: &CleanObservation,
) -> DeviceRecord {
    let at = obs.observed_ms;
    let mut dev = existing.unwrap_or_else(|| DeviceRecord {
        id: device_id(scope, key),
        category: "unknown".into(),
        category_reason: String::new(),
        client: scope.client.clone(),
        site: scope.site.clone(),
        macs: Vec::new(),
        addresses: Vec::new(),
        names: Vec::new(),
        first_seen_ms: at,
        last_seen_ms: at,
        evidence: Vec::new(),
    });
    dev.first_seen_ms = dev.first_seen_ms.min(at);
    dev.last_seen_ms = dev.last_seen_ms.max(at);
    for mac in &obs.macs {
        if !dev.macs.contains(mac) && dev.macs.len() < MAX_MACS {
            dev.macs.push(*mac);
        }
    }
    dev.macs.sort();
    for (ip, answered) in &obs.addresses {
        match dev.addresses.iter_mut().find(|a| a.ip == *ip) {
            Some(a) => {
                a.answered |= *answered;
                a.last_seen_ms = a.last_seen_ms.max(at);
            }
            None => dev.addresses.push(AddressRecord {
                ip: *ip,
                answered: *answered,
                last_seen_ms: at,
            }),
        }
    }
    dev.addresses
        .sort_by(|a, b| b.last_seen_ms.cmp(&a.last_seen_ms).then(a.ip.cmp(&b.ip)));
    dev.addresses.truncate(MAX_DEVICE_ADDRESSES);
    for name in &obs.names {
        if !dev.names.contains(name) {
            dev.names.push(name.clone());
        }
    }
    dev.names.sort();
    dev.names.truncate(MAX_NAMES);
    if let Some((category, reason)) = &obs.category {
        dev.category = category.label().to_owned();
        dev.category_reason.clone_from(reason);
    }
    for method in &obs.methods {
        let method = *method as i32;
        match dev
            .evidence
            .iter_mut()
            .find(|e| e.agent_id == agent_id && e.method == method)
        {
            Some(e) => {
                e.first_seen_ms = e.first_seen_ms.min(at);
                e.last_seen_ms = e.last_seen_ms.max(at);
                e.observations += 1;
            }
            None => dev.evidence.push(EvidenceRecord {
                agent_id: agent_id.to_owned(),
                method,
                first_seen_ms: at,
                last_seen_ms: at,
                observations: 1,
            }),
        }
    }
    if dev.evidence.len() > MAX_EVIDENCE {
        dev.evidence
            .sort_by_key(|e| std::cmp::Reverse(e.last_seen_ms));
        dev.evidence.truncate(MAX_EVIDENCE);
    }
    dev.evidence
        .sort_by(|a, b| (&a.agent_id, a.method).cmp(&(&b.agent_id, b.method)));
    dev
}

// === counting ===

/// Whether a device counts at `now_ms` under policy `device-v1`, and the rule that decided.
pub fn counts_device(dev: &DeviceRecord, now_ms: u64) -> (bool, String) {
    let age_ms = now_ms.saturating_sub(dev.last_seen_ms);
    let days = DEFAULT_WINDOW_MS / (24 * 60 * 60 * 1000);
    if age_ms <= DEFAULT_WINDOW_MS {
        (true, format!("seen within the last {days} days"))
    } else {
        (false, format!("not seen for more than {days} days"))
    }
}

/// Category of a device: the agent's latest decision, "unknown" without one.
pub fn category(dev: &DeviceRecord) -> &str {
    if dev.category.is_empty() {
        "unknown"
    } else {
        &dev.category
    }
}

/// Per-client totals under the default policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    pub devices: u64,
    pub by_category: BTreeMap<String, u64>,
}

impl Tally {
    pub fn add(&mut self, dev: &DeviceRecord, now_ms: u64) {
        if counts_device(dev, now_ms).0 {
            self.devices += 1;
            *self
                .by_category
                .entry(category(dev).to_owned())
                .or_default() += 1;
        }
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
    fn same_mac_is_one_device_and_evidence_accumulates() {
        let s = scope("acme");
        let mac = [0, 0x16, 0x3e, 0, 0, 1];
        let a = clean_observation(&arp("198.18.0.10", mac, 1_000), 5_000, 0).expect("valid");
        let b = clean_observation(&arp("198.18.0.11", mac, 2_000), 5_000, 0).expect("valid");
        assert_eq!(device_key(&a), device_key(&b));
        let key = device_key(&a).expect("key");
        let dev = apply_observation(None, &s, &key, "agent-1", &a);
        let dev = apply_observation(Some(dev), &s, &key, "agent-1", &b);
        assert_eq!(dev.first_seen_ms, 1_000);
        assert_eq!(dev.last_seen_ms, 2_000);
        assert_eq!(dev.addresses.len(), 2);
        assert_eq!(dev.evidence.len(), 1);
        assert_eq!(dev.evidence[0].observations, 2);
    }

    #[test]
    fn device_ids_are_scoped_by_client() {
        let key = "mac:00:16:3e:00:00:01";
        assert_ne!(device_id(&scope("a"), key), device_id(&scope("b"), key));
        assert_eq!(device_id(&scope("a"), key), device_id(&scope("a"), key));
    }

    #[test]
    fn stale_devices_stop_counting() {
        let s = scope("acme");
        let obs = clean_observation(
            &arp("198.18.0.10", [0, 0x16, 0x3e, 0, 0, 1], 1_000),
            1_000,
            0,
        )
        .expect("valid");
        let dev = apply_observation(None, &s, "k", "agent", &obs);
        assert!(counts_device(&dev, 1_000 + DEFAULT_WINDOW_MS).0);
        assert!(!counts_device(&dev, 1_001 + DEFAULT_WINDOW_MS).0);
    }

    #[test]
    fn every_method_of_an_observation_is_evidence_and_the_category_is_kept() {
        let s = scope("acme");
        let mut wire = arp("198.18.0.1", [0, 0x16, 0x3e, 0, 0, 1], 1_000);
        wire.methods = vec![
            v1::Method::Arp as i32,
            v1::Method::Snmp as i32,
            v1::Method::Arp as i32,
            99,
        ];
        wire.category = v1::Category::Network as i32;
        wire.category_reason = "SNMP sysDescr mentions \"routeros\"".into();
        let obs = clean_observation(&wire, 5_000, 0).expect("valid");
        assert_eq!(obs.methods, [v1::Method::Arp, v1::Method::Snmp]);
        let key = device_key(&obs).expect("key");
        let dev = apply_observation(None, &s, &key, "agent", &obs);
        assert_eq!(dev.evidence.len(), 2);
        assert_eq!(category(&dev), "network");
        assert!(dev.category_reason.contains("routeros"));
        // A later observation without a category keeps the decided one.
        let plain = clean_observation(
            &arp("198.18.0.1", [0, 0x16, 0x3e, 0, 0, 1], 2_000),
            5_000,
            0,
        )
        .expect("valid");
        let dev = apply_observation(Some(dev), &s, &key, "agent", &plain);
        assert_eq!(category(&dev), "network");
        assert_eq!(
            dev.evidence
                .iter()
                .find(|e| e.method == v1::Method::Arp as i32)
                .map(|e| e.observations),
            Some(2)
        );
    }
}
