//! Identity resolution: which observations are one device. I/O-free and deterministic: the
//! rules run over a [`Graph`] (the store's keys and devices, or a map in tests) and read no
//! clock, so replaying the same observations in any order gives the same devices.
//!
//! Every observation yields identifiers ([`identifiers`]):
//! - **strong** ones merge: a globally administered unicast MAC (ARP, a router's ARP cache, the
//!   device's own SNMP interface list: so a multi-homed device is one device), an SNMPv3 engine
//!   ID, a serial number;
//! - **weak** ones (a locally administered, i.e. randomized, MAC and the mDNS host name) link
//!   only observations that have no strong identifier: a phone back with a new random MAC and
//!   the same mDNS name is the same device;
//! - an observation with neither is named by its answered address, per site;
//! - virtual router MACs (VRRP, HSRP, CARP) are never identifiers: an address answered with
//!   one is attached to the router that lists that MAC among its SNMP interfaces, and is never a
//!   device of its own.
//!
//! Identifiers are keys; a device is a set of keys. Each observation's contribution (addresses,
//! names, evidence, times) is kept on its *primary* key: the MAC the device answered with (the
//! smallest, if several), else its smallest key. A device's record is the fold of its keys'
//! contributions: so a device can be split again exactly (what a NIC answered on stays with that
//! NIC's MAC, and a MAC is listed only on the device that holds its key), and the fold is
//! commutative, so arrival order does not matter. A device's id is derived from its smallest key
//! (MACs sort first), so it is stable as a device gains identifiers.
//!
//! Addresses move: an address belongs to the key that answered on it most recently (ties to the
//! smaller key). Listed ([`mark_current`]), an address is *current* when the device answered on
//! it in its latest sighting at that site (the latest observation of the key that answered, or
//! of any of the device's weak keys: a phone answers with one random MAC at a time); otherwise
//! it is *previous*, with its last-seen time, or *lost* when another device answered on it since.
//!
//! Merges happen when an observation links keys of two devices, or by an operator; splits only
//! by an operator, and a split holds: keys split apart are never joined again by observations.
//! Every merge and split is recorded in the client's history, and can be undone.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use census_proto::{convert::MacAddr, v1};
use serde::{Deserialize, Serialize};

use crate::model::{
    AddressRecord, CleanObservation, DeviceRecord, EvidenceRecord, MAX_EVIDENCE, MAX_NAMES, Scope,
};

/// Most keys one device holds; links beyond it are recorded on the keys but do not merge.
pub const MAX_DEVICE_KEYS: usize = 256;
/// Most keys one key may be cut from.
const MAX_CUTS: usize = 1024;

// === MACs ===

/// What a MAC address can say about identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MacClass {
    /// Globally administered unicast: a strong identifier.
    Strong,
    /// Locally administered (randomized phones, VMs): weak.
    Local,
    /// A virtual router MAC (VRRP, HSRP, CARP): owned by whichever router is active, never a
    /// device.
    Virtual,
    /// Zero, multicast or broadcast: not an identifier at all.
    Excluded,
}

/// Classifies a MAC.
pub fn mac_class(mac: MacAddr) -> MacClass {
    let m = mac.octets();
    let vrrp = m[..4] == [0x00, 0x00, 0x5e, 0x00] && (m[4] == 0x01 || m[4] == 0x02);
    let hsrp = m[..5] == [0x00, 0x00, 0x0c, 0x07, 0xac];
    let hsrp2 = m[..4] == [0x00, 0x00, 0x0c, 0x9f] && m[4] & 0xf0 == 0xf0;
    if !mac.is_unicast() {
        MacClass::Excluded
    } else if vrrp || hsrp || hsrp2 {
        MacClass::Virtual
    } else if mac.is_locally_administered() {
        MacClass::Local
    } else {
        MacClass::Strong
    }
}

// === identifiers ===

/// Key prefixes; the digit orders kinds, so a device's smallest key (its id) is a MAC when it
/// has one.
const MAC: &str = "1mac:";
const ENGINE: &str = "2engine:";
const SERIAL: &str = "3serial:";
const LOCAL_MAC: &str = "4lmac:";
const MDNS: &str = "5mdns:";
const IP: &str = "6ip:";

/// What one observation says about identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identifiers {
    /// Keys that name the device. The first is the primary: the key of the MAC the device
    /// answered with when that is a key, else the smallest; the rest are sorted. Empty for an
    /// observation that names no device (only virtual MACs).
    pub keys: Vec<String>,
    /// Virtual MACs the device reports among its own interfaces (it is their router).
    pub owns_virtual: Vec<MacAddr>,
    /// Virtual MACs this observation was answered with.
    pub answered_virtual: Vec<MacAddr>,
    /// Whether the device has no strong identifier (it counts under the randomized-MAC rule).
    pub weak_only: bool,
}

/// Serial numbers that name no one: factory placeholders.
fn useful_serial(s: &str) -> bool {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    t.len() >= 3
        && !t.chars().all(|c| c == t.chars().next().unwrap_or('0'))
        && ![
            "n/a",
            "na",
            "none",
            "unknown",
            "not specified",
            "not available",
            "default string",
            "to be filled by o.e.m.",
            "system serial number",
            "0123456789",
        ]
        .contains(&lower.as_str())
}

/// The identifiers of one observation made at `site`.
pub fn identifiers(obs: &CleanObservation, site: &str) -> Identifiers {
    // Sorted and without repeats once all are in (see below), as sets would hold them.
    let mut strong = Vec::new();
    let mut weak = Vec::new();
    let mut out = Identifiers::default();
    for mac in obs.macs.iter().chain(&obs.interface_macs) {
        match mac_class(*mac) {
            MacClass::Strong => {
                strong.push(format!("{MAC}{mac}"));
            }
            MacClass::Local if obs.macs.contains(mac) => {
                weak.push(format!("{LOCAL_MAC}{mac}"));
            }
            MacClass::Virtual if obs.interface_macs.contains(mac) => out.owns_virtual.push(*mac),
            MacClass::Virtual => out.answered_virtual.push(*mac),
            MacClass::Local | MacClass::Excluded => {}
        }
    }
    if let Some(engine) = obs.engine_id.as_deref().filter(|e| e.len() >= 5) {
        strong.push(format!("{ENGINE}{}", hex::encode(engine)));
    }
    if let Some(serial) = obs.serial.as_deref().filter(|s| useful_serial(s)) {
        strong.push(format!("{SERIAL}{}", serial.trim()));
    }
    if let Some(host) = obs.mdns_host.as_deref().filter(|h| !h.is_empty()) {
        weak.push(format!(
            "{MDNS}{}",
            host.trim_end_matches('.').to_ascii_lowercase()
        ));
    }
    out.owns_virtual.sort();
    out.owns_virtual.dedup();
    out.answered_virtual.sort();
    out.answered_virtual.dedup();
    for keys in [&mut strong, &mut weak] {
        keys.sort_unstable();
        keys.dedup();
    }
    if !strong.is_empty() {
        out.keys = strong;
    } else if !weak.is_empty() {
        out.weak_only = true;
        out.keys = weak;
    } else if out.answered_virtual.is_empty() {
        out.weak_only = true;
        out.keys = obs
            .addresses
            .iter()
            .find(|(_, answered)| *answered)
            .map(|(ip, _)| vec![format!("{IP}{site}:{ip}")])
            .unwrap_or_default();
    }
    // The primary is the key the device answered with (the smallest MAC it was reached by), so
    // what it answered on stays with that MAC when an operator splits the MACs apart.
    if let Some(pos) = obs
        .macs
        .iter()
        .filter_map(|m| mac_key(*m))
        .find_map(|k| out.keys.iter().position(|x| *x == k))
    {
        let answering = out.keys.remove(pos);
        out.keys.insert(0, answering);
    }
    out
}

/// The identity key a MAC is, if it is one (strong or randomized).
pub fn mac_key(mac: MacAddr) -> Option<String> {
    match mac_class(mac) {
        MacClass::Strong => Some(format!("{MAC}{mac}")),
        MacClass::Local => Some(format!("{LOCAL_MAC}{mac}")),
        MacClass::Virtual | MacClass::Excluded => None,
    }
}

/// A device's id: derived from its client and smallest key.
pub fn device_id(client: &str, min_key: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(client.as_bytes())
        .chain_update([0])
        .chain_update(min_key.as_bytes())
        .finalize();
    hex::encode(&digest[..10])
}

/// Whether a key names a device by a strong identifier.
pub fn is_strong(key: &str) -> bool {
    key.starts_with(MAC) || key.starts_with(ENGINE) || key.starts_with(SERIAL)
}

/// The key's kind and value for people: ("mac", "00:16:3e:00:00:01").
pub fn describe_key(key: &str) -> (&'static str, &str) {
    for (prefix, kind) in [
        (MAC, "mac"),
        (ENGINE, "snmp-engine-id"),
        (SERIAL, "serial"),
        (LOCAL_MAC, "randomized-mac"),
        (MDNS, "mdns-name"),
        (IP, "address"),
    ] {
        if let Some(rest) = key.strip_prefix(prefix) {
            return (kind, rest);
        }
    }
    ("unknown", key)
}

// === records ===

/// What the collector keeps per key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// The device this key belongs to now.
    pub device: String,
    /// What observations whose primary key this is contributed.
    pub contribution: DeviceRecord,
    /// Keys this key must never be joined with (an operator split them apart).
    pub cut_from: BTreeSet<String>,
}

/// Who answers on an address of a site now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressOwner {
    pub key: String,
    pub last_seen_ms: u64,
}

/// Addresses answered with a virtual router MAC, and the router that owns it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtualMacRecord {
    /// The key of the device that lists this MAC among its interfaces.
    pub owner: Option<String>,
    pub addresses: Vec<AddressRecord>,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
}

/// What kind of change an [`Event`] records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// An observation linked keys of several devices.
    Merge,
    /// An operator merged devices.
    ManualMerge,
    /// An operator split a device.
    Split,
}

/// One merge or split, with the devices before and after (by id and keys), so it can be
/// undone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub at_ms: u64,
    pub kind: EventKind,
    pub reason: String,
    pub before: Vec<(String, Vec<String>)>,
    pub after: Vec<(String, Vec<String>)>,
    /// The event that undid this one, if any.
    pub undone_by: Option<u64>,
    /// The event this one undid, if it is an undo.
    pub undoes: Option<u64>,
}

// === the graph ===

/// The storage the rules run over, scoped to one client. Implemented by the stores (inside a
/// transaction) and by [`MemGraph`].
pub trait Graph {
    type Error;
    fn key(&mut self, key: &str) -> Result<Option<KeyRecord>, Self::Error>;
    fn put_key(&mut self, key: &str, record: &KeyRecord) -> Result<(), Self::Error>;
    fn device(&mut self, id: &str) -> Result<Option<DeviceRecord>, Self::Error>;
    fn put_device(&mut self, device: &DeviceRecord) -> Result<(), Self::Error>;
    fn delete_device(&mut self, id: &str) -> Result<(), Self::Error>;
    fn address_owner(
        &mut self,
        site: &str,
        ip: IpAddr,
    ) -> Result<Option<AddressOwner>, Self::Error>;
    fn put_address_owner(
        &mut self,
        site: &str,
        ip: IpAddr,
        owner: &AddressOwner,
    ) -> Result<(), Self::Error>;
    fn virtual_mac(&mut self, mac: MacAddr) -> Result<Option<VirtualMacRecord>, Self::Error>;
    fn put_virtual_mac(
        &mut self,
        mac: MacAddr,
        record: &VirtualMacRecord,
    ) -> Result<(), Self::Error>;
    fn event(&mut self, seq: u64) -> Result<Option<Event>, Self::Error>;
    /// Stores an event; `seq` 0 asks the graph to assign the next sequence number.
    fn put_event(&mut self, event: &mut Event) -> Result<(), Self::Error>;

    /// Shows `f` a key's record (or `None`) and returns what it returns. The rules use it
    /// where they only look; a graph that holds records overrides it to lend one instead of
    /// copying it.
    fn with_key<R>(
        &mut self,
        key: &str,
        f: impl FnOnce(Option<&KeyRecord>) -> R,
    ) -> Result<R, Self::Error> {
        Ok(f(self.key(key)?.as_ref()))
    }
    /// Shows `f` a device's record (or `None`), as [`Graph::with_key`] does a key's.
    fn with_device<R>(
        &mut self,
        id: &str,
        f: impl FnOnce(Option<&DeviceRecord>) -> R,
    ) -> Result<R, Self::Error> {
        Ok(f(self.device(id)?.as_ref()))
    }
    /// A device's id and keys (or `None`), without the rest of its record: a graph that stores
    /// records encoded overrides it to decode only those.
    fn device_keys(&mut self, id: &str) -> Result<Option<(String, Vec<String>)>, Self::Error> {
        self.with_device(id, |d| d.map(|d| (d.id.clone(), d.keys.clone())))
    }
    /// A key's record (or `None`), handed over to be changed and put back with
    /// [`Graph::put_key_owned`] before the key is read again: a graph that keeps records
    /// overrides it to move the record out instead of copying it, so until it is put back the
    /// key may read as absent.
    fn take_key(&mut self, key: &str) -> Result<Option<KeyRecord>, Self::Error> {
        self.key(key)
    }
    /// Shows `f` who answers on an address (or `None`) to change; when `f` returns `true`, what
    /// it left is stored. A graph that keeps records overrides it to look the address up once
    /// and change its record in place.
    fn update_address_owner(
        &mut self,
        site: &str,
        ip: IpAddr,
        f: impl FnOnce(&mut Option<AddressOwner>) -> bool,
    ) -> Result<(), Self::Error> {
        let mut owner = self.address_owner(site, ip)?;
        if f(&mut owner)
            && let Some(owner) = &owner
        {
            self.put_address_owner(site, ip, owner)?;
        }
        Ok(())
    }
    /// Stores a key's record, handing it over: a graph that keeps records overrides it to keep
    /// this one instead of a copy.
    fn put_key_owned(&mut self, key: &str, record: KeyRecord) -> Result<(), Self::Error> {
        self.put_key(key, &record)
    }
    /// Stores a device's record, handing it over (see [`Graph::put_key_owned`]).
    fn put_device_owned(&mut self, device: DeviceRecord) -> Result<(), Self::Error> {
        self.put_device(&device)
    }
}

// === contributions ===

/// An empty record for `client`: the identity of the fold.
fn empty(client: &str) -> DeviceRecord {
    DeviceRecord {
        id: String::new(),
        keys: Vec::new(),
        category: String::new(),
        category_reason: String::new(),
        category_ms: 0,
        client: client.to_owned(),
        site: String::new(),
        sites: Vec::new(),
        macs: Vec::new(),
        addresses: Vec::new(),
        names: Vec::new(),
        first_seen_ms: u64::MAX,
        last_seen_ms: 0,
        evidence: Vec::new(),
        weak_only: false,
        anomalies: Vec::new(),
    }
}

/// One observation as a record of its own.
fn contribution(
    scope: &Scope,
    agent_id: &str,
    obs: &CleanObservation,
    ids: &Identifiers,
) -> DeviceRecord {
    let at = obs.observed_ms;
    let mut r = empty(&scope.client);
    r.sites = vec![scope.site.clone()];
    r.site.clone_from(&scope.site);
    r.macs = obs.macs.clone();
    r.addresses = obs
        .addresses
        .iter()
        .map(|(ip, answered)| AddressRecord {
            ip: *ip,
            site: scope.site.clone(),
            answered: *answered && !obs.proxy_arp,
            last_seen_ms: at,
            current: true,
            lost: false,
        })
        .collect();
    r.names = obs.names.clone();
    r.first_seen_ms = at;
    r.last_seen_ms = at;
    r.evidence = obs
        .methods
        .iter()
        .map(|m| EvidenceRecord {
            agent_id: agent_id.to_owned(),
            method: *m as i32,
            first_seen_ms: at,
            last_seen_ms: at,
            observations: 1,
        })
        .collect();
    if let Some((category, reason)) = &obs.category {
        // "unknown" is stored as no label, with the agent's reason for it.
        if !matches!(category, v1::Category::Unknown | v1::Category::Unspecified) {
            category.label().clone_into(&mut r.category);
        }
        r.category_reason.clone_from(reason);
        r.category_ms = at;
    }
    r.weak_only = ids.weak_only;
    if obs.proxy_arp {
        r.anomalies.push(format!(
            "answers ARP for {} addresses (proxy ARP)",
            obs.reported_addresses.max(obs.addresses.len())
        ));
    }
    r
}

/// Folds `b` into `a`. Commutative and associative up to the order of list fields, which are
/// kept sorted, so the result does not depend on arrival order.
pub fn fold(a: &mut DeviceRecord, b: &DeviceRecord) {
    a.first_seen_ms = a.first_seen_ms.min(b.first_seen_ms);
    a.last_seen_ms = a.last_seen_ms.max(b.last_seen_ms);
    for s in &b.sites {
        if !a.sites.contains(s) {
            a.sites.push(s.clone());
        }
    }
    a.sites.sort();
    a.site = a.sites.first().cloned().unwrap_or_default();
    for m in &b.macs {
        if !a.macs.contains(m) {
            a.macs.push(*m);
        }
    }
    a.macs.sort();
    for addr in &b.addresses {
        match a
            .addresses
            .iter_mut()
            .find(|x| x.ip == addr.ip && x.site == addr.site)
        {
            Some(x) => {
                x.answered |= addr.answered;
                x.last_seen_ms = x.last_seen_ms.max(addr.last_seen_ms);
            }
            None => a.addresses.push(addr.clone()),
        }
    }
    a.addresses
        .sort_by(|x, y| (&x.site, x.ip).cmp(&(&y.site, y.ip)));
    for n in &b.names {
        if !a.names.contains(n) {
            a.names.push(n.clone());
        }
    }
    a.names.sort();
    a.names.truncate(MAX_NAMES);
    for e in &b.evidence {
        match a
            .evidence
            .iter_mut()
            .find(|x| x.agent_id == e.agent_id && x.method == e.method)
        {
            Some(x) => {
                x.first_seen_ms = x.first_seen_ms.min(e.first_seen_ms);
                x.last_seen_ms = x.last_seen_ms.max(e.last_seen_ms);
                x.observations += e.observations;
            }
            None => a.evidence.push(e.clone()),
        }
    }
    a.evidence
        .sort_by(|x, y| (&x.agent_id, x.method).cmp(&(&y.agent_id, y.method)));
    a.evidence.truncate(MAX_EVIDENCE);
    // A decided category outranks "unknown" (an empty label with the agent's reason: a sweep
    // whose SNMP timed out does not undo what an earlier one learnt); then the latest wins;
    // ties go to the smaller label, then the smaller reason, so order cannot matter.
    fn rank(r: &DeviceRecord) -> (bool, u64, std::cmp::Reverse<&str>, std::cmp::Reverse<&str>) {
        (
            !r.category.is_empty(),
            r.category_ms,
            std::cmp::Reverse(r.category.as_str()),
            std::cmp::Reverse(r.category_reason.as_str()),
        )
    }
    if rank(b) > rank(a) {
        a.category.clone_from(&b.category);
        a.category_reason.clone_from(&b.category_reason);
        a.category_ms = b.category_ms;
    }
    for x in &b.anomalies {
        if !a.anomalies.contains(x) {
            a.anomalies.push(x.clone());
        }
    }
    a.anomalies.sort();
    a.anomalies.truncate(16);
}

/// A device's record, rebuilt from its keys' contributions.
fn rebuild<G: Graph>(
    g: &mut G,
    client: &str,
    mut keys: Vec<String>,
) -> Result<DeviceRecord, G::Error> {
    keys.sort();
    keys.dedup();
    let mut dev = empty(client);
    let mut weak_only = true;
    let mut cut_from: BTreeSet<String> = BTreeSet::new();
    for k in &keys {
        g.with_key(k, |rec| {
            if let Some(rec) = rec {
                fold(&mut dev, &rec.contribution);
                cut_from.extend(rec.cut_from.iter().cloned());
            }
        })?;
        weak_only &= !is_strong(k);
    }
    dev.weak_only = weak_only;
    // A MAC an operator split off is the other device's, even where a contribution of ours
    // lists it (one from before the split, when it answered with one of our MACs).
    dev.macs
        .retain(|m| mac_key(*m).is_none_or(|k| !cut_from.contains(&k)));
    dev.id = keys
        .first()
        .map(|k| device_id(client, k))
        .unwrap_or_default();
    dev.keys = keys;
    Ok(dev)
}

/// A device as [`settle`] left it: its id and keys.
struct Settled {
    id: String,
    keys: Vec<String>,
}

/// Moves `keys` to one device (a new record under the id of their smallest key), writing the
/// keys and the device, and deleting the devices in `old_ids` that are not the new one.
fn settle<G: Graph>(
    g: &mut G,
    client: &str,
    keys: Vec<String>,
    old_ids: &[String],
) -> Result<Settled, G::Error> {
    let dev = rebuild(g, client, keys)?;
    for k in &dev.keys {
        if g.with_key(k, |rec| rec.is_some_and(|r| r.device != dev.id))?
            && let Some(mut rec) = g.take_key(k)?
        {
            rec.device.clone_from(&dev.id);
            g.put_key_owned(k, rec)?;
        }
    }
    for id in old_ids {
        if *id != dev.id {
            g.delete_device(id)?;
        }
    }
    let settled = Settled {
        id: dev.id.clone(),
        keys: dev.keys.clone(),
    };
    g.put_device_owned(dev)?;
    Ok(settled)
}

// === applying observations ===

/// Folds one observation, made at `scope` by `agent_id`, into the client's devices.
pub fn apply<G: Graph>(
    g: &mut G,
    scope: &Scope,
    agent_id: &str,
    obs: &CleanObservation,
) -> Result<(), G::Error> {
    let ids = identifiers(obs, &scope.site);
    let at = obs.observed_ms;
    if ids.keys.is_empty() {
        // Answered only with a virtual router MAC: evidence for the router that owns it.
        for mac in &ids.answered_virtual {
            let mut v = g.virtual_mac(*mac)?.unwrap_or(VirtualMacRecord {
                first_seen_ms: at,
                last_seen_ms: at,
                ..VirtualMacRecord::default()
            });
            v.first_seen_ms = v.first_seen_ms.min(at);
            v.last_seen_ms = v.last_seen_ms.max(at);
            for (ip, _) in &obs.addresses {
                match v
                    .addresses
                    .iter_mut()
                    .find(|a| a.ip == *ip && a.site == scope.site)
                {
                    Some(a) => a.last_seen_ms = a.last_seen_ms.max(at),
                    None => v.addresses.push(AddressRecord {
                        ip: *ip,
                        site: scope.site.clone(),
                        answered: false,
                        last_seen_ms: at,
                        current: true,
                        lost: false,
                    }),
                }
            }
            v.addresses
                .sort_by(|a, b| (&a.site, a.ip).cmp(&(&b.site, b.ip)));
            v.addresses.truncate(64);
            g.put_virtual_mac(*mac, &v)?;
        }
        return Ok(());
    }
    let primary = &ids.keys[0];
    // Taken, not copied: it is put back below, changed, before the primary key is read again
    // (the other keys are distinct from it).
    let mut primary_rec = g.take_key(primary)?;
    let no_cuts = BTreeSet::new();
    let cut_from = primary_rec.as_ref().map_or(&no_cuts, |r| &r.cut_from);

    // The keys this observation may join: not cut from the primary (an operator's split holds).
    let mut joined: Vec<String> = vec![primary.clone()];
    let mut devices: BTreeSet<String> = primary_rec.iter().map(|r| r.device.clone()).collect();
    for k in ids.keys.iter().skip(1) {
        if cut_from.contains(k) {
            continue;
        }
        let (cut, device) = g.with_key(k, |rec| {
            (
                rec.is_some_and(|r| r.cut_from.contains(primary)),
                rec.map(|r| r.device.clone()),
            )
        })?;
        if cut {
            continue;
        }
        if let Some(device) = device {
            devices.insert(device);
        }
        joined.push(k.clone());
    }

    // Every key of every device involved, unless that device holds a key cut from the primary.
    let mut before: Vec<(String, Vec<String>)> = Vec::new();
    for id in &devices {
        let Some((dev_id, dev_keys)) = g.device_keys(id)? else {
            continue;
        };
        if !dev_keys.contains(primary) && dev_keys.iter().any(|k| cut_from.contains(k)) {
            // Keep apart what an operator split.
            joined.retain(|k| !dev_keys.contains(k));
            continue;
        }
        before.push((dev_id, dev_keys));
    }
    let merged_ids: Vec<String> = before.iter().map(|(id, _)| id.clone()).collect();
    // Sorted and without repeats, as a set would hold them.
    let mut all_keys: Vec<String> = joined
        .iter()
        .chain(before.iter().flat_map(|(_, keys)| keys))
        .cloned()
        .collect();
    all_keys.sort_unstable();
    all_keys.dedup();
    all_keys.truncate(MAX_DEVICE_KEYS);

    // The observation's contribution lives on the primary key.
    let contrib = contribution(scope, agent_id, obs, &ids);
    let mut rec = primary_rec.take().unwrap_or_else(|| KeyRecord {
        device: String::new(),
        contribution: empty(&scope.client),
        cut_from: BTreeSet::new(),
    });
    fold(&mut rec.contribution, &contrib);
    g.put_key_owned(primary, rec)?;
    for k in &all_keys {
        if !g.with_key(k, |rec| rec.is_some())? {
            g.put_key_owned(
                k,
                KeyRecord {
                    device: String::new(),
                    contribution: empty(&scope.client),
                    cut_from: BTreeSet::new(),
                },
            )?;
        }
    }
    let dev = settle(g, &scope.client, all_keys, &merged_ids)?;
    if before.len() > 1 {
        let mut event = Event {
            seq: 0,
            at_ms: at,
            kind: EventKind::Merge,
            reason: format!(
                "an observation linked {}",
                joined
                    .iter()
                    .map(|k| {
                        let (kind, v) = describe_key(k);
                        format!("{kind} {v}")
                    })
                    .collect::<Vec<_>>()
                    .join(" and ")
            ),
            before,
            after: vec![(dev.id.clone(), dev.keys.clone())],
            undone_by: None,
            undoes: None,
        };
        g.put_event(&mut event)?;
    }

    // The addresses it answered on are now this key's.
    for (ip, answered) in &obs.addresses {
        if !answered || obs.proxy_arp {
            continue;
        }
        g.update_address_owner(&scope.site, *ip, |owner| {
            let newer = match owner {
                None => true,
                Some(o) => {
                    (at, std::cmp::Reverse(primary.as_str()))
                        > (o.last_seen_ms, std::cmp::Reverse(o.key.as_str()))
                }
            };
            if newer {
                match owner {
                    // Seen again: only the time changes.
                    Some(o) if o.key == *primary => o.last_seen_ms = at,
                    _ => {
                        *owner = Some(AddressOwner {
                            key: primary.clone(),
                            last_seen_ms: at,
                        });
                    }
                }
            }
            newer
        })?;
    }
    // Virtual MACs it owns: it is their router.
    for mac in &ids.owns_virtual {
        let mut v = g.virtual_mac(*mac)?.unwrap_or(VirtualMacRecord {
            first_seen_ms: at,
            last_seen_ms: at,
            ..VirtualMacRecord::default()
        });
        v.first_seen_ms = v.first_seen_ms.min(at);
        v.last_seen_ms = v.last_seen_ms.max(at);
        if v.owner.as_deref().is_none_or(|o| primary.as_str() < o) {
            v.owner = Some(primary.clone());
        }
        g.put_virtual_mac(*mac, &v)?;
    }
    Ok(())
}

// === operators ===

/// Why an operator's merge, split or undo was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    #[error(
        "no device {id:?} in client {client:?}: `census devices --client {client}` lists its devices"
    )]
    NoDevice { id: String, client: String },
    #[error("a device cannot be merged with itself")]
    SameDevice,
    #[error(
        "split needs some of the device's identifiers, not none and not all: the device has {0}"
    )]
    BadSplit(String),
    #[error("no history event {0}")]
    NoEvent(u64),
    #[error("event {0} was already undone")]
    AlreadyUndone(u64),
}

fn no_device(id: &str, client: &str) -> EditError {
    EditError::NoDevice {
        id: id.to_owned(),
        client: client.to_owned(),
    }
}

/// An operator edit's outcome, or why it was refused.
pub type EditResult<E> = Result<Result<Event, EditError>, E>;

fn keys_of<G: Graph>(g: &mut G, id: &str) -> Result<Option<Vec<String>>, G::Error> {
    Ok(g.device_keys(id)?.map(|(_, keys)| keys))
}

/// Removes any cut between the two key sets.
fn uncut<G: Graph>(g: &mut G, a: &[String], b: &[String]) -> Result<(), G::Error> {
    for (side, other) in [(a, b), (b, a)] {
        for k in side {
            if let Some(mut rec) = g.key(k)? {
                let before = rec.cut_from.len();
                rec.cut_from.retain(|c| !other.contains(c));
                if rec.cut_from.len() != before {
                    g.put_key(k, &rec)?;
                }
            }
        }
    }
    Ok(())
}

/// Cuts the two key sets apart, for good (until undone).
fn cut<G: Graph>(g: &mut G, a: &[String], b: &[String]) -> Result<(), G::Error> {
    for (side, other) in [(a, b), (b, a)] {
        for k in side {
            if let Some(mut rec) = g.key(k)? {
                for o in other {
                    if rec.cut_from.len() < MAX_CUTS {
                        rec.cut_from.insert(o.clone());
                    }
                }
                g.put_key(k, &rec)?;
            }
        }
    }
    Ok(())
}

/// Merges device `b` into device `a` by hand.
pub fn merge<G: Graph>(
    g: &mut G,
    client: &str,
    a: &str,
    b: &str,
    reason: &str,
    at_ms: u64,
) -> EditResult<G::Error> {
    if a == b {
        return Ok(Err(EditError::SameDevice));
    }
    let Some(ka) = keys_of(g, a)? else {
        return Ok(Err(no_device(a, client)));
    };
    let Some(kb) = keys_of(g, b)? else {
        return Ok(Err(no_device(b, client)));
    };
    uncut(g, &ka, &kb)?;
    let all: Vec<String> = ka.iter().chain(&kb).cloned().collect();
    let dev = settle(g, client, all, &[a.to_owned(), b.to_owned()])?;
    let mut event = Event {
        seq: 0,
        at_ms,
        kind: EventKind::ManualMerge,
        reason: reason.to_owned(),
        before: vec![(a.to_owned(), ka), (b.to_owned(), kb)],
        after: vec![(dev.id.clone(), dev.keys.clone())],
        undone_by: None,
        undoes: None,
    };
    g.put_event(&mut event)?;
    Ok(Ok(event))
}

/// Splits the keys `part` out of device `id` into a device of their own, by hand. The split
/// holds: observations never join the two parts again.
pub fn split<G: Graph>(
    g: &mut G,
    client: &str,
    id: &str,
    part: &[String],
    reason: &str,
    at_ms: u64,
) -> EditResult<G::Error> {
    let Some(keys) = keys_of(g, id)? else {
        return Ok(Err(no_device(id, client)));
    };
    let part: Vec<String> = keys.iter().filter(|k| part.contains(k)).cloned().collect();
    let rest: Vec<String> = keys.iter().filter(|k| !part.contains(k)).cloned().collect();
    if part.is_empty() || rest.is_empty() {
        return Ok(Err(EditError::BadSplit(keys.join(", "))));
    }
    cut(g, &part, &rest)?;
    g.delete_device(id)?;
    let a = settle(g, client, part, &[])?;
    let b = settle(g, client, rest, &[])?;
    let mut event = Event {
        seq: 0,
        at_ms,
        kind: EventKind::Split,
        reason: reason.to_owned(),
        before: vec![(id.to_owned(), keys)],
        after: vec![
            (a.id.clone(), a.keys.clone()),
            (b.id.clone(), b.keys.clone()),
        ],
        undone_by: None,
        undoes: None,
    };
    g.put_event(&mut event)?;
    Ok(Ok(event))
}

/// Undoes a merge (splitting the devices back as they were) or a split (merging them back).
pub fn undo<G: Graph>(g: &mut G, client: &str, seq: u64, at_ms: u64) -> EditResult<G::Error> {
    let Some(mut original) = g.event(seq)? else {
        return Ok(Err(EditError::NoEvent(seq)));
    };
    if original.undone_by.is_some() {
        return Ok(Err(EditError::AlreadyUndone(seq)));
    }
    // Where the keys are now: the devices holding the "after" keys.
    let after_keys: Vec<String> = original
        .after
        .iter()
        .flat_map(|(_, k)| k.iter().cloned())
        .collect();
    let mut now_ids = BTreeSet::new();
    for k in &after_keys {
        if let Some(r) = g.key(k)? {
            now_ids.insert(r.device);
        }
    }
    let mut current: Vec<String> = Vec::new();
    for id in &now_ids {
        if let Some(keys) = keys_of(g, id)? {
            current.extend(keys);
        }
    }
    for id in &now_ids {
        g.delete_device(id)?;
    }
    let before_keys: Vec<String> = original
        .before
        .iter()
        .flat_map(|(_, k)| k.iter().cloned())
        .collect();
    // Keys that joined since the event stay with the first part.
    let extra: Vec<String> = current
        .iter()
        .filter(|k| !before_keys.contains(k))
        .cloned()
        .collect();
    let mut parts: Vec<Vec<String>> = original.before.iter().map(|(_, k)| k.clone()).collect();
    if let Some(first) = parts.first_mut() {
        first.extend(extra);
    }
    match original.kind {
        EventKind::Merge | EventKind::ManualMerge => {
            for (i, a) in parts.iter().enumerate() {
                for b in parts.iter().skip(i + 1) {
                    cut(g, a, b)?;
                }
            }
        }
        EventKind::Split => {
            for (i, a) in parts.iter().enumerate() {
                for b in original.after.iter().skip(i + 1) {
                    uncut(g, a, &b.1)?;
                }
            }
            let after: Vec<Vec<String>> = original.after.iter().map(|(_, k)| k.clone()).collect();
            for (i, a) in after.iter().enumerate() {
                for b in after.iter().skip(i + 1) {
                    uncut(g, a, b)?;
                }
            }
        }
    }
    let mut after = Vec::new();
    for p in &parts {
        let d = settle(g, client, p.clone(), &[])?;
        after.push((d.id.clone(), d.keys.clone()));
    }
    let mut event = Event {
        seq: 0,
        at_ms,
        kind: match original.kind {
            EventKind::Split => EventKind::ManualMerge,
            EventKind::Merge | EventKind::ManualMerge => EventKind::Split,
        },
        reason: format!("undo of event {seq}"),
        before: now_ids.iter().map(|id| (id.clone(), Vec::new())).collect(),
        after,
        undone_by: None,
        undoes: Some(seq),
    };
    g.put_event(&mut event)?;
    original.undone_by = Some(event.seq);
    g.put_event(&mut original)?;
    Ok(Ok(event))
}

// === presentation ===

/// When each key last answered on an address of each site, from who answers on what: the
/// time of that key's latest sighting there. Built once for all of a client's devices.
#[derive(Debug, Default)]
pub struct Sightings<'a> {
    latest: BTreeMap<(&'a str, &'a str), u64>,
}

impl<'a> Sightings<'a> {
    pub fn new(owners: &'a BTreeMap<(String, IpAddr), AddressOwner>) -> Self {
        let mut latest: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for ((site, _), o) in owners {
            let t = latest.entry((site.as_str(), o.key.as_str())).or_default();
            *t = (*t).max(o.last_seen_ms);
        }
        Sightings { latest }
    }

    fn of(&self, site: &str, key: &str) -> u64 {
        self.latest.get(&(site, key)).copied().unwrap_or(0)
    }
}

/// Marks which of a device's addresses are current, previous or lost (see the module's
/// documentation). An address it answered on is current when its key answered on it in that
/// key's latest sighting at the site (for weak keys: the latest of any of the device's weak
/// keys), lost when another device answered on it since; one it only claimed (proxy ARP, a
/// router's tables) is current when it was seen in the device's latest sighting at the site.
pub fn mark_current(
    dev: &mut DeviceRecord,
    owners: &BTreeMap<(String, IpAddr), AddressOwner>,
    sightings: &Sightings<'_>,
) {
    // The device's latest sighting at each site: every address of one observation carries its
    // time, and the fold keeps each address's latest.
    let mut latest_at: BTreeMap<String, u64> = BTreeMap::new();
    for a in &dev.addresses {
        match latest_at.get_mut(&a.site) {
            Some(t) => *t = (*t).max(a.last_seen_ms),
            None => {
                latest_at.insert(a.site.clone(), a.last_seen_ms);
            }
        }
    }
    let keys = &dev.keys;
    let weak_latest = |site: &str| {
        keys.iter()
            .filter(|k| !is_strong(k))
            .map(|k| sightings.of(site, k))
            .max()
            .unwrap_or(0)
    };
    for a in &mut dev.addresses {
        let device_latest = latest_at.get(&a.site).copied().unwrap_or(0);
        let owner = a
            .answered
            .then(|| owners.get(&(a.site.clone(), a.ip)))
            .flatten();
        (a.current, a.lost) = match owner {
            Some(o) if !keys.contains(&o.key) => (false, true),
            Some(o) => {
                let latest = if is_strong(&o.key) {
                    sightings.of(&a.site, &o.key)
                } else {
                    weak_latest(&a.site)
                };
                (o.last_seen_ms >= latest, false)
            }
            None => (a.last_seen_ms >= device_latest, false),
        };
    }
}

// === impl MemGraph ===

/// The graph in memory: the in-memory store's, and the tests'.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemGraph {
    pub keys: BTreeMap<String, KeyRecord>,
    pub devices: BTreeMap<String, DeviceRecord>,
    pub owners: BTreeMap<(String, IpAddr), AddressOwner>,
    pub virtual_macs: BTreeMap<MacAddr, VirtualMacRecord>,
    pub events: BTreeMap<u64, Event>,
}

impl Graph for MemGraph {
    type Error = std::convert::Infallible;

    fn key(&mut self, key: &str) -> Result<Option<KeyRecord>, Self::Error> {
        Ok(self.keys.get(key).cloned())
    }
    fn put_key(&mut self, key: &str, record: &KeyRecord) -> Result<(), Self::Error> {
        self.keys.insert(key.to_owned(), record.clone());
        Ok(())
    }
    fn device(&mut self, id: &str) -> Result<Option<DeviceRecord>, Self::Error> {
        Ok(self.devices.get(id).cloned())
    }
    fn put_device(&mut self, device: &DeviceRecord) -> Result<(), Self::Error> {
        self.devices.insert(device.id.clone(), device.clone());
        Ok(())
    }
    fn delete_device(&mut self, id: &str) -> Result<(), Self::Error> {
        self.devices.remove(id);
        Ok(())
    }
    fn address_owner(
        &mut self,
        site: &str,
        ip: IpAddr,
    ) -> Result<Option<AddressOwner>, Self::Error> {
        Ok(self.owners.get(&(site.to_owned(), ip)).cloned())
    }
    fn put_address_owner(
        &mut self,
        site: &str,
        ip: IpAddr,
        owner: &AddressOwner,
    ) -> Result<(), Self::Error> {
        self.owners.insert((site.to_owned(), ip), owner.clone());
        Ok(())
    }
    fn virtual_mac(&mut self, mac: MacAddr) -> Result<Option<VirtualMacRecord>, Self::Error> {
        Ok(self.virtual_macs.get(&mac).cloned())
    }
    fn put_virtual_mac(
        &mut self,
        mac: MacAddr,
        record: &VirtualMacRecord,
    ) -> Result<(), Self::Error> {
        self.virtual_macs.insert(mac, record.clone());
        Ok(())
    }
    fn event(&mut self, seq: u64) -> Result<Option<Event>, Self::Error> {
        Ok(self.events.get(&seq).cloned())
    }
    fn put_event(&mut self, event: &mut Event) -> Result<(), Self::Error> {
        if event.seq == 0 {
            event.seq = self.events.keys().next_back().copied().unwrap_or(0) + 1;
        }
        self.events.insert(event.seq, event.clone());
        Ok(())
    }
    fn with_key<R>(
        &mut self,
        key: &str,
        f: impl FnOnce(Option<&KeyRecord>) -> R,
    ) -> Result<R, Self::Error> {
        Ok(f(self.keys.get(key)))
    }
    fn with_device<R>(
        &mut self,
        id: &str,
        f: impl FnOnce(Option<&DeviceRecord>) -> R,
    ) -> Result<R, Self::Error> {
        Ok(f(self.devices.get(id)))
    }
    fn put_key_owned(&mut self, key: &str, record: KeyRecord) -> Result<(), Self::Error> {
        self.keys.insert(key.to_owned(), record);
        Ok(())
    }
    fn put_device_owned(&mut self, device: DeviceRecord) -> Result<(), Self::Error> {
        self.devices.insert(device.id.clone(), device);
        Ok(())
    }
}

/// Used by the tests of this module and of the stores.
#[cfg(test)]
pub(crate) mod tests;
