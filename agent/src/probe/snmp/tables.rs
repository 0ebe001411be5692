//! The pure half of the SNMP probe: OIDs, owned values, and turning walked rows into
//! [`v1::SnmpIdentity`] fields. No I/O and no clock, so every decoder here is unit-tested with
//! hostile input: odd value types, short or long MACs, malformed indexes, oversized strings,
//! control characters. Nothing here panics on what a device sends; a row it cannot read is
//! skipped.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use census_proto::v1;

/// Longest string kept from a device, in bytes (an SNMP `DisplayString` is at most 255).
pub(crate) const MAX_STRING_BYTES: usize = 255;
/// Most bytes of one value kept from a response: enough for every string, MAC and engine ID
/// this probe reads; a hostile 60 KiB string is cut here before anything else sees it.
pub(crate) const MAX_VALUE_BYTES: usize = 256;
/// An OID has at most 128 sub-identifiers (RFC 2578 §3.5).
pub(crate) const MAX_OID_ARCS: usize = 128;
/// Longest engine ID kept (RFC 3411 allows 5 to 32 octets; a little slack for odd agents).
pub(crate) const MAX_ENGINE_ID_BYTES: usize = 64;

// === OIDs ===

/// SNMPv2-MIB system group scalars (instance `.0` appended where they are fetched).
pub(crate) const SYS_DESCR: &[u32] = &[1, 3, 6, 1, 2, 1, 1, 1, 0];
pub(crate) const SYS_OBJECT_ID: &[u32] = &[1, 3, 6, 1, 2, 1, 1, 2, 0];
pub(crate) const SYS_UPTIME: &[u32] = &[1, 3, 6, 1, 2, 1, 1, 3, 0];
pub(crate) const SYS_NAME: &[u32] = &[1, 3, 6, 1, 2, 1, 1, 5, 0];
/// SNMP-FRAMEWORK-MIB snmpEngineID.0: the engine ID as a v1/v2c agent tells it.
pub(crate) const SNMP_ENGINE_ID: &[u32] = &[1, 3, 6, 1, 6, 3, 10, 2, 1, 1, 0];
/// The scalars of the first request to a device (which also proves a credential).
pub(crate) const SYSTEM_SCALARS: [&[u32]; 5] = [
    SYS_DESCR,
    SYS_OBJECT_ID,
    SYS_UPTIME,
    SYS_NAME,
    SNMP_ENGINE_ID,
];

/// IF-MIB ifDescr, ifPhysAddress (ifTable) and ifName (ifXTable); index = ifIndex.
pub(crate) const IF_DESCR: &[u32] = &[1, 3, 6, 1, 2, 1, 2, 2, 1, 2];
pub(crate) const IF_PHYS_ADDRESS: &[u32] = &[1, 3, 6, 1, 2, 1, 2, 2, 1, 6];
pub(crate) const IF_NAME: &[u32] = &[1, 3, 6, 1, 2, 1, 31, 1, 1, 1, 1];

/// ENTITY-MIB entPhysicalClass, entPhysicalSerialNum, entPhysicalModelName.
pub(crate) const ENT_PHYSICAL_CLASS: &[u32] = &[1, 3, 6, 1, 2, 1, 47, 1, 1, 1, 1, 5];
pub(crate) const ENT_PHYSICAL_SERIAL: &[u32] = &[1, 3, 6, 1, 2, 1, 47, 1, 1, 1, 1, 11];
pub(crate) const ENT_PHYSICAL_MODEL: &[u32] = &[1, 3, 6, 1, 2, 1, 47, 1, 1, 1, 1, 13];
/// entPhysicalClass chassis(3).
const ENT_CLASS_CHASSIS: i64 = 3;

/// IP-MIB ipNetToMediaPhysAddress; index = ifIndex.a.b.c.d.
pub(crate) const IP_NET_TO_MEDIA_PHYS: &[u32] = &[1, 3, 6, 1, 2, 1, 4, 22, 1, 2];
/// IP-MIB ipNetToPhysicalPhysAddress; index = ifIndex.addrType.len.addr...
pub(crate) const IP_NET_TO_PHYSICAL_PHYS: &[u32] = &[1, 3, 6, 1, 2, 1, 4, 35, 1, 4];
/// InetAddressType ipv4(1).
const INET_ADDRESS_IPV4: u32 = 1;

/// BRIDGE-MIB dot1dBasePortIfIndex; index = bridge port, value = ifIndex.
pub(crate) const DOT1D_BASE_PORT_IF_INDEX: &[u32] = &[1, 3, 6, 1, 2, 1, 17, 1, 4, 1, 2];
/// BRIDGE-MIB dot1dTpFdbPort; index = MAC (6 arcs), value = bridge port. The MAC column
/// (dot1dTpFdbAddress, `.1`) repeats the index, so only the port column is walked.
pub(crate) const DOT1D_TP_FDB_PORT: &[u32] = &[1, 3, 6, 1, 2, 1, 17, 4, 3, 1, 2];
/// Q-BRIDGE-MIB dot1qTpFdbPort; index = FDB id . MAC (6 arcs), value = bridge port.
pub(crate) const DOT1Q_TP_FDB_PORT: &[u32] = &[1, 3, 6, 1, 2, 1, 17, 7, 1, 2, 2, 1, 2];

/// LLDP-MIB lldpRemEntry; index = timeMark.localPortNum.remIndex.
pub(crate) const LLDP_REM_ENTRY: &[u32] = &[1, 0, 8802, 1, 1, 2, 1, 4, 1, 1];
pub(crate) const LLDP_REM_CHASSIS_ID_SUBTYPE: u32 = 4;
pub(crate) const LLDP_REM_CHASSIS_ID: u32 = 5;
pub(crate) const LLDP_REM_PORT_ID_SUBTYPE: u32 = 6;
pub(crate) const LLDP_REM_PORT_ID: u32 = 7;
pub(crate) const LLDP_REM_PORT_DESC: u32 = 8;
pub(crate) const LLDP_REM_SYS_NAME: u32 = 9;
pub(crate) const LLDP_REM_SYS_DESC: u32 = 10;
/// The lldpRemTable columns read, in walk order.
pub(crate) const LLDP_COLUMNS: [u32; 7] = [
    LLDP_REM_CHASSIS_ID_SUBTYPE,
    LLDP_REM_CHASSIS_ID,
    LLDP_REM_PORT_ID_SUBTYPE,
    LLDP_REM_PORT_ID,
    LLDP_REM_PORT_DESC,
    LLDP_REM_SYS_NAME,
    LLDP_REM_SYS_DESC,
];
/// LldpChassisIdSubtype / LldpPortIdSubtype values that change how the id is read.
const LLDP_CHASSIS_MAC: u32 = 4;
const LLDP_CHASSIS_NETWORK_ADDRESS: u32 = 5;
const LLDP_PORT_MAC: u32 = 3;
const LLDP_PORT_NETWORK_ADDRESS: u32 = 4;

/// `1.3.6.1` as text, for messages.
pub(crate) fn oid_string(oid: &[u32]) -> String {
    let mut s = String::with_capacity(oid.len() * 4);
    for (i, arc) in oid.iter().enumerate() {
        if i > 0 {
            s.push('.');
        }
        s.push_str(&arc.to_string());
    }
    s
}

/// Decodes the content octets of a BER OBJECT IDENTIFIER into its arcs. `None` for anything
/// malformed: empty, a sub-identifier over 32 bits (SNMP's limit), a truncated last
/// sub-identifier, a non-minimal encoding, or more than [`MAX_OID_ARCS`] arcs.
///
/// Done here rather than with `asn1_rs::Oid::iter`, which yields u64 arcs and decodes the first
/// byte of a `2.x` OID with x >= 40 wrongly; walks compare arcs, so they must be exact.
pub(crate) fn decode_oid(bytes: &[u8]) -> Option<Vec<u32>> {
    let mut arcs = Vec::with_capacity(bytes.len() + 1);
    let mut value: u64 = 0;
    let mut in_arc = false;
    for &b in bytes {
        if !in_arc && b == 0x80 {
            return None; // a leading 0x80 is a non-minimal encoding (X.690 8.19.2)
        }
        value = (value << 7) | u64::from(b & 0x7f);
        if value > u64::from(u32::MAX) + 80 {
            return None;
        }
        if b & 0x80 != 0 {
            in_arc = true;
            continue;
        }
        in_arc = false;
        if arcs.is_empty() {
            // The first sub-identifier packs the first two arcs: 40 * X + Y, X in 0..=2.
            let (first, second) = match value {
                0..=39 => (0, value),
                40..=79 => (1, value - 40),
                _ => (2, value - 80),
            };
            arcs.push(u32::try_from(first).ok()?);
            arcs.push(u32::try_from(second).ok()?);
        } else {
            arcs.push(u32::try_from(value).ok()?);
        }
        if arcs.len() > MAX_OID_ARCS {
            return None;
        }
        value = 0;
    }
    if in_arc || arcs.is_empty() {
        return None;
    }
    Some(arcs)
}

// === Values ===

/// An owned copy of an SNMP value. snmp2's `Value` borrows from the session's receive buffer,
/// which the next request overwrites, so every value is copied (and capped) as it arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Val {
    Int(i64),
    /// Counter32, Gauge32/Unsigned32, TimeTicks and Counter64.
    Unsigned(u64),
    /// OCTET STRING or Opaque, at most [`MAX_VALUE_BYTES`].
    Bytes(Vec<u8>),
    Oid(Vec<u32>),
    Ip([u8; 4]),
    Null,
    NoSuchObject,
    NoSuchInstance,
    EndOfMibView,
    /// Any other type (a constructed value, a malformed OID): never read.
    Other,
}

impl Val {
    /// The value as a non-negative integer that fits 32 bits (ifIndex, port numbers, subtypes).
    pub(crate) fn as_u32(&self) -> Option<u32> {
        match self {
            Val::Int(n) => u32::try_from(*n).ok(),
            Val::Unsigned(n) => u32::try_from(*n).ok(),
            _ => None,
        }
    }

    pub(crate) fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Val::Bytes(b) => Some(b),
            _ => None,
        }
    }

    /// The value as text (see [`text`]); empty for non-strings.
    pub(crate) fn as_text(&self) -> String {
        self.as_bytes().map(text).unwrap_or_default()
    }
}

/// One row of a walked column: the index (the OID's arcs after the column) and the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Row {
    pub index: Vec<u32>,
    pub value: Val,
}

impl Row {
    pub(crate) fn new(index: &[u32], value: Val) -> Self {
        Self {
            index: index.to_vec(),
            value,
        }
    }
}

// === Strings and MACs ===

/// Device text made safe to store and print: lossy UTF-8, control characters dropped (NULs
/// padding fixed-size fields included), surrounding whitespace trimmed, at most
/// [`MAX_STRING_BYTES`] bytes, cut on a character boundary.
pub(crate) fn text(bytes: &[u8]) -> String {
    let bytes = &bytes[..bytes.len().min(MAX_VALUE_BYTES)];
    let lossy = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(lossy.len().min(MAX_STRING_BYTES));
    for c in lossy.trim().chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > MAX_STRING_BYTES {
            break;
        }
        out.push(c);
    }
    out.trim_end().to_string()
}

/// `aa:bb:cc:...` for bytes that are not text, capped like any string.
pub(crate) fn hex_string(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (i, b) in bytes.iter().enumerate() {
        if out.len() + 3 > MAX_STRING_BYTES {
            break;
        }
        if i > 0 {
            out.push(':');
        }
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Printable text stays text; anything else (binary ids) is shown as hex.
fn text_or_hex(bytes: &[u8]) -> String {
    let printable = std::str::from_utf8(bytes)
        .is_ok_and(|s| !s.trim_end_matches('\0').chars().any(char::is_control));
    if printable {
        text(bytes)
    } else {
        hex_string(bytes)
    }
}

/// A usable Ethernet MAC: exactly 6 bytes and not all zero (incomplete ARP entries, interfaces
/// without an address). Anything else is skipped, never guessed at.
pub(crate) fn mac6(bytes: &[u8]) -> Option<[u8; 6]> {
    let mac: [u8; 6] = bytes.try_into().ok()?;
    (mac != [0; 6]).then_some(mac)
}

/// A MAC encoded in 6 index arcs (FDB tables), each of which must be a byte.
fn mac_from_arcs(arcs: &[u32]) -> Option<[u8; 6]> {
    if arcs.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (slot, arc) in mac.iter_mut().zip(arcs) {
        *slot = u8::try_from(*arc).ok()?;
    }
    mac6(&mac)
}

/// An IPv4 address encoded in 4 index arcs.
fn ipv4_from_arcs(arcs: &[u32]) -> Option<Ipv4Addr> {
    if arcs.len() != 4 {
        return None;
    }
    let mut octets = [0u8; 4];
    for (slot, arc) in octets.iter_mut().zip(arcs) {
        *slot = u8::try_from(*arc).ok()?;
    }
    Some(Ipv4Addr::from(octets))
}

/// Column rows keyed by a single-arc index (ifIndex, bridge port, entPhysicalIndex); rows with
/// any other index shape are skipped. Later duplicates do not replace earlier rows.
fn by_single_index(rows: &[Row]) -> BTreeMap<u32, &Val> {
    let mut map = BTreeMap::new();
    for row in rows {
        if let [index] = row.index[..] {
            map.entry(index).or_insert(&row.value);
        }
    }
    map
}

// === System group ===

/// Fills the system group and snmpEngineID from a GET's varbinds (full OIDs). Exceptions
/// (noSuchObject, ...) and wrong types leave the field empty.
pub(crate) fn apply_system(varbinds: &[(Vec<u32>, Val)], identity: &mut v1::SnmpIdentity) {
    for (oid, value) in varbinds {
        match (oid.as_slice(), value) {
            (SYS_DESCR, Val::Bytes(b)) => identity.sys_descr = text(b),
            (SYS_NAME, Val::Bytes(b)) => identity.sys_name = text(b),
            (SYS_OBJECT_ID, Val::Oid(arcs)) => identity.sys_object_id = oid_string(arcs),
            (SYS_UPTIME, Val::Unsigned(t)) => identity.sys_uptime_centis = *t,
            (SNMP_ENGINE_ID, Val::Bytes(b)) if identity.engine_id.is_empty() => {
                identity.engine_id = engine_id(b).unwrap_or_default();
            }
            _ => {}
        }
    }
}

/// An engine ID worth keeping: non-empty, not absurdly long.
pub(crate) fn engine_id(bytes: &[u8]) -> Option<Vec<u8>> {
    (!bytes.is_empty() && bytes.len() <= MAX_ENGINE_ID_BYTES).then(|| bytes.to_vec())
}

// === IF-MIB ===

/// One interface per ifIndex seen in any column: ifName when the device has it, else ifDescr;
/// the MAC only when ifPhysAddress is a usable 6-byte MAC (empty otherwise). Sorted by ifIndex,
/// at most `max` entries.
pub(crate) fn interfaces(
    descr: &[Row],
    name: &[Row],
    phys: &[Row],
    max: usize,
) -> Vec<v1::SnmpInterface> {
    let descr = by_single_index(descr);
    let name = by_single_index(name);
    let phys = by_single_index(phys);
    let indexes: BTreeSet<u32> = descr
        .keys()
        .chain(name.keys())
        .chain(phys.keys())
        .copied()
        .collect();
    indexes
        .into_iter()
        .take(max)
        .map(|if_index| {
            let name = name
                .get(&if_index)
                .map(|v| v.as_text())
                .filter(|s| !s.is_empty())
                .or_else(|| descr.get(&if_index).map(|v| v.as_text()))
                .unwrap_or_default();
            let mac = phys
                .get(&if_index)
                .and_then(|v| v.as_bytes())
                .and_then(mac6)
                .map(|m| m.to_vec())
                .unwrap_or_default();
            v1::SnmpInterface {
                if_index,
                name,
                mac,
            }
        })
        .collect()
}

// === ENTITY-MIB ===

/// The chassis's serial number and model name: those of the entry whose entPhysicalClass is
/// chassis(3) (the first such one with either), else the first non-empty of each.
pub(crate) fn chassis(class: &[Row], serial: &[Row], model: &[Row]) -> (String, String) {
    let class = by_single_index(class);
    let serial: BTreeMap<u32, String> = by_single_index(serial)
        .into_iter()
        .map(|(i, v)| (i, v.as_text()))
        .filter(|(_, s)| !s.is_empty())
        .collect();
    let model: BTreeMap<u32, String> = by_single_index(model)
        .into_iter()
        .map(|(i, v)| (i, v.as_text()))
        .filter(|(_, s)| !s.is_empty())
        .collect();
    let chassis = class
        .iter()
        .filter(|(_, v)| matches!(v, Val::Int(ENT_CLASS_CHASSIS)))
        .map(|(i, _)| *i)
        .find(|i| serial.contains_key(i) || model.contains_key(i));
    if let Some(i) = chassis {
        return (
            serial.get(&i).cloned().unwrap_or_default(),
            model.get(&i).cloned().unwrap_or_default(),
        );
    }
    (
        serial.values().next().cloned().unwrap_or_default(),
        model.values().next().cloned().unwrap_or_default(),
    )
}

// === ARP caches ===

/// ipNetToMediaPhysAddress rows (index ifIndex.a.b.c.d) and ipNetToPhysicalPhysAddress rows
/// (index ifIndex.ipv4(1).4.a.b.c.d; other address types skipped), merged without duplicates,
/// at most `max` entries. Rows without a usable MAC (incomplete entries) are skipped.
pub(crate) fn arp_cache(media: &[Row], physical: &[Row], max: usize) -> Vec<v1::NeighborEntry> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let from_media = media.iter().filter_map(|row| {
        let (&if_index, addr) = row.index.split_first()?;
        Some((if_index, ipv4_from_arcs(addr)?, &row.value))
    });
    let from_physical = physical.iter().filter_map(|row| match row.index[..] {
        [if_index, INET_ADDRESS_IPV4, 4, ref addr @ ..] => {
            Some((if_index, ipv4_from_arcs(addr)?, &row.value))
        }
        _ => None,
    });
    for (if_index, address, value) in from_media.chain(from_physical) {
        let Some(mac) = value.as_bytes().and_then(mac6) else {
            continue;
        };
        if out.len() >= max {
            break;
        }
        if seen.insert((address, mac, if_index)) {
            out.push(v1::NeighborEntry {
                address: address.to_string(),
                mac: mac.to_vec(),
                if_index,
            });
        }
    }
    out
}

// === Forwarding databases ===

/// dot1dTpFdbPort rows (index = MAC) and dot1qTpFdbPort rows (index = FDB id . MAC), with
/// dot1dBasePortIfIndex to map bridge ports to ifIndexes. The FDB id is reported as the VLAN:
/// on the devices that expose it they are equal unless VLANs share a learning database
/// (dot1qVlanFdbId says which; not read). At most `max` entries.
pub(crate) fn forwarding(
    dot1d: &[Row],
    dot1q: &[Row],
    base_port_if_index: &[Row],
    max: usize,
) -> Vec<v1::ForwardingEntry> {
    let port_if: BTreeMap<u32, u32> = by_single_index(base_port_if_index)
        .into_iter()
        .filter_map(|(port, v)| Some((port, v.as_u32()?)))
        .collect();
    let from_dot1d = dot1d
        .iter()
        .filter_map(|row| Some((0, mac_from_arcs(&row.index)?, row.value.as_u32()?)));
    let from_dot1q = dot1q.iter().filter_map(|row| {
        let (&fdb_id, mac) = row.index.split_first()?;
        Some((fdb_id, mac_from_arcs(mac)?, row.value.as_u32()?))
    });
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (vlan, mac, bridge_port) in from_dot1d.chain(from_dot1q) {
        if out.len() >= max {
            break;
        }
        if seen.insert((mac, bridge_port, vlan)) {
            out.push(v1::ForwardingEntry {
                mac: mac.to_vec(),
                bridge_port,
                if_index: port_if.get(&bridge_port).copied().unwrap_or(0),
                vlan,
            });
        }
    }
    out
}

// === LLDP ===

/// lldpRemTable rows, one column at a time (column number, rows), joined on the full index
/// (timeMark.localPortNum.remIndex). Rows whose index is not 3 arcs are skipped. At most `max`
/// neighbours, in index order.
pub(crate) fn lldp_neighbors(columns: &[(u32, Vec<Row>)], max: usize) -> Vec<v1::LldpNeighbor> {
    let mut neighbors: BTreeMap<[u32; 3], BTreeMap<u32, &Val>> = BTreeMap::new();
    for (column, rows) in columns {
        for row in rows {
            let Ok(index) = <[u32; 3]>::try_from(row.index.as_slice()) else {
                continue;
            };
            if !neighbors.contains_key(&index) && neighbors.len() >= max {
                continue;
            }
            neighbors
                .entry(index)
                .or_default()
                .entry(*column)
                .or_insert(&row.value);
        }
    }
    neighbors
        .into_iter()
        .map(|([_time_mark, local_port, _rem_index], cells)| {
            let int = |c| cells.get(&c).and_then(|v| v.as_u32()).unwrap_or(0);
            let bytes = |c| cells.get(&c).and_then(|v| v.as_bytes()).unwrap_or(&[]);
            let chassis_id_subtype = int(LLDP_REM_CHASSIS_ID_SUBTYPE);
            let port_id_subtype = int(LLDP_REM_PORT_ID_SUBTYPE);
            let chassis_raw = bytes(LLDP_REM_CHASSIS_ID);
            let chassis_mac = if chassis_id_subtype == LLDP_CHASSIS_MAC {
                mac6(chassis_raw)
            } else {
                None
            };
            v1::LldpNeighbor {
                local_port,
                chassis_id_subtype,
                chassis_id: lldp_id(
                    chassis_raw,
                    chassis_mac.is_some(),
                    chassis_id_subtype == LLDP_CHASSIS_NETWORK_ADDRESS,
                ),
                chassis_mac: chassis_mac.map(|m| m.to_vec()).unwrap_or_default(),
                port_id_subtype,
                port_id: {
                    let raw = bytes(LLDP_REM_PORT_ID);
                    let is_mac = port_id_subtype == LLDP_PORT_MAC && raw.len() == 6;
                    lldp_id(raw, is_mac, port_id_subtype == LLDP_PORT_NETWORK_ADDRESS)
                },
                port_description: text(bytes(LLDP_REM_PORT_DESC)),
                sys_name: text(bytes(LLDP_REM_SYS_NAME)),
                sys_description: text(bytes(LLDP_REM_SYS_DESC)),
            }
        })
        .collect()
}

/// An LLDP chassis or port id as text: a MAC as `aa:bb:...`, a network address (IANA family
/// byte, 1 = IPv4) as dotted quad, printable text as text, anything else as hex.
fn lldp_id(raw: &[u8], is_mac: bool, is_network_address: bool) -> String {
    if is_mac {
        return hex_string(raw);
    }
    if is_network_address && let [1, a, b, c, d] = *raw {
        return Ipv4Addr::new(a, b, c, d).to_string();
    }
    text_or_hex(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(index: &[u32], value: Val) -> Row {
        Row::new(index, value)
    }

    fn bytes(b: &[u8]) -> Val {
        Val::Bytes(b.to_vec())
    }

    const MAC_A: [u8; 6] = [0x02, 0x00, 0x5e, 0x10, 0x00, 0x01];
    const MAC_B: [u8; 6] = [0x00, 0x1b, 0x21, 0xaa, 0xbb, 0xcc];

    #[test]
    fn oids_decode_exactly_and_reject_malformed_input() {
        // 1.3.6.1.2.1.1.5.0
        assert_eq!(
            decode_oid(&[0x2b, 6, 1, 2, 1, 1, 5, 0]),
            Some(vec![1, 3, 6, 1, 2, 1, 1, 5, 0])
        );
        // 1.0.8802.1 (8802 = 68 * 128 + 98: 0xC4 0x62)
        assert_eq!(
            decode_oid(&[0x28, 0xc4, 0x62, 1]),
            Some(vec![1, 0, 8802, 1])
        );
        // 2.999.3: the first sub-identifier is 80 + 999 = 1079 = 0x88 0x37.
        assert_eq!(decode_oid(&[0x88, 0x37, 3]), Some(vec![2, 999, 3]));
        // The largest arc SNMP allows, then one over it.
        assert_eq!(
            decode_oid(&[0x2b, 0x8f, 0xff, 0xff, 0xff, 0x7f]),
            Some(vec![1, 3, u32::MAX])
        );
        assert_eq!(decode_oid(&[0x2b, 0x90, 0x80, 0x80, 0x80, 0x00]), None);
        assert_eq!(decode_oid(&[]), None, "empty");
        assert_eq!(decode_oid(&[0x2b, 0x86]), None, "truncated sub-identifier");
        assert_eq!(decode_oid(&[0x2b, 0x80, 0x01]), None, "non-minimal");
        assert_eq!(decode_oid(&[0xff; 40]), None, "endless sub-identifier");
        let long = vec![1u8; MAX_OID_ARCS + 5];
        assert_eq!(decode_oid(&long), None, "too many arcs");
        assert_eq!(oid_string(&[1, 3, 6, 1]), "1.3.6.1");
        assert_eq!(oid_string(&[]), "");
    }

    #[test]
    fn text_is_capped_and_cleaned() {
        assert_eq!(text(b"  core-sw-1\0\0 "), "core-sw-1");
        assert_eq!(text(b"line1\r\nline2\x1b[31m"), "line1line2[31m");
        assert_eq!(text(&[0xff, b'a', 0xfe]), "\u{fffd}a\u{fffd}");
        let long = "é".repeat(400);
        let t = text(long.as_bytes());
        assert!(t.len() <= MAX_STRING_BYTES && t.len() >= MAX_STRING_BYTES - 1);
        assert!(t.chars().all(|c| c == 'é'));
        assert!(text(&vec![b'x'; 70_000]).len() == MAX_STRING_BYTES);
        assert_eq!(hex_string(&MAC_B), "00:1b:21:aa:bb:cc");
        assert!(hex_string(&[0xab; 500]).len() <= MAX_STRING_BYTES);
    }

    #[test]
    fn macs_must_be_six_nonzero_bytes() {
        assert_eq!(mac6(&MAC_A), Some(MAC_A));
        assert_eq!(mac6(&[0; 6]), None);
        assert_eq!(mac6(&MAC_A[..5]), None);
        assert_eq!(mac6(&[1, 2, 3, 4, 5, 6, 7, 8]), None);
        assert_eq!(mac6(&[]), None);
        assert_eq!(mac_from_arcs(&[2, 0, 0x5e, 0x10, 0, 1]), Some(MAC_A));
        assert_eq!(mac_from_arcs(&[2, 0, 0x5e, 0x10, 0, 256]), None);
        assert_eq!(mac_from_arcs(&[2, 0, 0x5e, 0x10, 0]), None);
    }

    #[test]
    fn system_group_reads_the_expected_types_only() {
        let mut id = v1::SnmpIdentity::default();
        apply_system(
            &[
                (SYS_DESCR.to_vec(), bytes(b"Linux box 6.1\n")),
                (
                    SYS_OBJECT_ID.to_vec(),
                    Val::Oid(vec![1, 3, 6, 1, 4, 1, 8072, 3, 2, 10]),
                ),
                (SYS_UPTIME.to_vec(), Val::Unsigned(12_345)),
                (SYS_NAME.to_vec(), Val::Int(7)), // wrong type: ignored
                (SNMP_ENGINE_ID.to_vec(), bytes(&[0x80, 0, 0x1f, 0x88, 4])),
                (vec![1, 3, 6, 1, 2, 1, 1, 9, 0], bytes(b"unrelated")),
            ],
            &mut id,
        );
        assert_eq!(id.sys_descr, "Linux box 6.1");
        assert_eq!(id.sys_object_id, "1.3.6.1.4.1.8072.3.2.10");
        assert_eq!(id.sys_uptime_centis, 12_345);
        assert_eq!(id.sys_name, "");
        assert_eq!(id.engine_id, vec![0x80, 0, 0x1f, 0x88, 4]);

        let mut id = v1::SnmpIdentity::default();
        apply_system(
            &[
                (SYS_NAME.to_vec(), Val::NoSuchObject),
                (SNMP_ENGINE_ID.to_vec(), bytes(&[])),
            ],
            &mut id,
        );
        assert_eq!(id, v1::SnmpIdentity::default());
        assert_eq!(engine_id(&[1; 65]), None);
    }

    #[test]
    fn interfaces_join_columns_by_if_index() {
        let descr = [
            row(&[1], bytes(b"lo")),
            row(&[2], bytes(b"eth0 descr")),
            row(&[3], bytes(b"eth1")),
        ];
        let name = [row(&[2], bytes(b"eth0")), row(&[3], bytes(b""))];
        let phys = [
            row(&[1], bytes(&[])),
            row(&[2], bytes(&MAC_A)),
            row(&[3], bytes(&[1, 2, 3])), // not a MAC: the interface stays, without one
            row(&[4, 4], bytes(&MAC_B)),  // malformed index: skipped
            row(&[5], Val::Int(3)),       // odd type: interface without a MAC
        ];
        let ifs = interfaces(&descr, &name, &phys, 100);
        let summary: Vec<(u32, &str, usize)> = ifs
            .iter()
            .map(|i| (i.if_index, i.name.as_str(), i.mac.len()))
            .collect();
        assert_eq!(
            summary,
            [(1, "lo", 0), (2, "eth0", 6), (3, "eth1", 0), (5, "", 0)]
        );
        assert_eq!(ifs[1].mac, MAC_A.to_vec());
        assert_eq!(interfaces(&descr, &name, &phys, 2).len(), 2);
    }

    #[test]
    fn chassis_prefers_the_chassis_entry() {
        let class = [
            row(&[1], Val::Int(10)), // port
            row(&[2], Val::Int(ENT_CLASS_CHASSIS)),
        ];
        let serial = [row(&[1], bytes(b"PORTSER")), row(&[2], bytes(b"FOC1234X"))];
        let model = [row(&[1], bytes(b"SFP")), row(&[2], bytes(b"WS-C2960"))];
        assert_eq!(
            chassis(&class, &serial, &model),
            ("FOC1234X".into(), "WS-C2960".into())
        );
        // No chassis entry: the first non-empty of each.
        let serial = [row(&[1], bytes(b"")), row(&[7], bytes(b"SER7"))];
        let model = [row(&[3], bytes(b"M3"))];
        assert_eq!(chassis(&[], &serial, &model), ("SER7".into(), "M3".into()));
        // A chassis entry with nothing in it does not hide the others.
        let class = [row(&[2], Val::Int(ENT_CLASS_CHASSIS))];
        assert_eq!(
            chassis(&class, &serial, &model),
            ("SER7".into(), "M3".into())
        );
        assert_eq!(chassis(&[], &[], &[]), (String::new(), String::new()));
    }

    #[test]
    fn arp_cache_decodes_both_tables_and_skips_junk() {
        let media = [
            row(&[2, 198, 18, 1, 10], bytes(&MAC_A)),
            row(&[2, 198, 18, 1, 11], bytes(&[0; 6])), // incomplete
            row(&[2, 198, 18, 1], bytes(&MAC_B)),      // short index
            row(&[2, 198, 18, 1, 300], bytes(&MAC_B)), // arc over 255
            row(&[3, 198, 18, 1, 12], bytes(&MAC_B[..4])), // short MAC
            row(&[3, 198, 18, 1, 13], Val::Int(1)),    // odd type
        ];
        let physical = [
            row(&[2, 1, 4, 198, 18, 1, 10], bytes(&MAC_A)), // duplicate of the first
            row(&[3, 1, 4, 198, 18, 2, 20], bytes(&MAC_B)),
            row(
                &[
                    3, 2, 16, 0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
                ],
                bytes(&MAC_B),
            ), // IPv6
            row(&[3, 1, 5, 198, 18, 2, 21, 0], bytes(&MAC_B)), // bad length
        ];
        let arp = arp_cache(&media, &physical, 100);
        let got: Vec<(&str, u32)> = arp
            .iter()
            .map(|e| (e.address.as_str(), e.if_index))
            .collect();
        assert_eq!(got, [("198.18.1.10", 2), ("198.18.2.20", 3)]);
        assert_eq!(arp[0].mac, MAC_A.to_vec());
        assert_eq!(arp_cache(&media, &physical, 1).len(), 1);
    }

    #[test]
    fn forwarding_maps_ports_and_vlans() {
        let base = [row(&[1], Val::Int(10)), row(&[2], Val::Int(11))];
        let dot1d = [
            row(&[0x02, 0, 0x5e, 0x10, 0, 1], Val::Int(1)),
            row(&[0, 0x1b, 0x21, 0xaa, 0xbb, 0xcc], Val::Int(9)), // port without ifIndex
            row(&[1, 2, 3], Val::Int(1)),                         // short MAC index
            row(&[0, 0, 0, 0, 0, 0], Val::Int(1)),                // zero MAC
            row(&[0, 0x1b, 0x21, 0xaa, 0xbb, 0xcd], bytes(b"x")), // odd port type
        ];
        let dot1q = [
            row(&[100, 0x02, 0, 0x5e, 0x10, 0, 1], Val::Int(2)),
            row(&[100], Val::Int(2)),
        ];
        let fdb = forwarding(&dot1d, &dot1q, &base, 100);
        let got: Vec<(u32, u32, u32)> = fdb
            .iter()
            .map(|e| (e.bridge_port, e.if_index, e.vlan))
            .collect();
        assert_eq!(got, [(1, 10, 0), (9, 0, 0), (2, 11, 100)]);
        assert_eq!(fdb[2].mac, MAC_A.to_vec());
        assert_eq!(forwarding(&dot1d, &dot1q, &base, 2).len(), 2);
    }

    #[test]
    fn lldp_rows_join_on_their_index() {
        let columns = vec![
            (
                LLDP_REM_CHASSIS_ID_SUBTYPE,
                vec![
                    row(&[0, 3, 1], Val::Int(4)),
                    row(&[0, 5, 2], Val::Int(7)),
                    row(&[0, 6, 3], Val::Int(5)),
                ],
            ),
            (
                LLDP_REM_CHASSIS_ID,
                vec![
                    row(&[0, 3, 1], bytes(&MAC_B)),
                    row(&[0, 5, 2], bytes(b"sw-core\0")),
                    row(&[0, 6, 3], bytes(&[1, 198, 18, 0, 9])),
                    row(&[0, 9], bytes(b"bad index")),
                ],
            ),
            (
                LLDP_REM_PORT_ID_SUBTYPE,
                vec![row(&[0, 3, 1], Val::Int(3)), row(&[0, 5, 2], Val::Int(5))],
            ),
            (
                LLDP_REM_PORT_ID,
                vec![
                    row(&[0, 3, 1], bytes(&MAC_A)),
                    row(&[0, 5, 2], bytes(b"Gi1/0/24")),
                ],
            ),
            (LLDP_REM_PORT_DESC, vec![row(&[0, 5, 2], bytes(b"uplink"))]),
            (LLDP_REM_SYS_NAME, vec![row(&[0, 3, 1], bytes(b"ap-1\r\n"))]),
            (
                LLDP_REM_SYS_DESC,
                vec![row(&[0, 3, 1], bytes(&[0xff, 0xfe, 0xfd]))],
            ),
        ];
        let n = lldp_neighbors(&columns, 100);
        assert_eq!(n.len(), 3);
        assert_eq!(n[0].local_port, 3);
        assert_eq!(n[0].chassis_id_subtype, 4);
        assert_eq!(n[0].chassis_id, "00:1b:21:aa:bb:cc");
        assert_eq!(n[0].chassis_mac, MAC_B.to_vec());
        assert_eq!(n[0].port_id_subtype, 3);
        assert_eq!(n[0].port_id, "02:00:5e:10:00:01");
        assert_eq!(n[0].sys_name, "ap-1");
        assert_eq!(n[0].sys_description, "\u{fffd}\u{fffd}\u{fffd}");
        assert_eq!(n[1].local_port, 5);
        assert_eq!(n[1].chassis_id, "sw-core");
        assert!(n[1].chassis_mac.is_empty());
        assert_eq!(n[1].port_id, "Gi1/0/24");
        assert_eq!(n[1].port_description, "uplink");
        assert_eq!(n[2].chassis_id, "198.18.0.9");
        assert_eq!(lldp_neighbors(&columns, 1).len(), 1);
        // A chassis "MAC" of the wrong length stays out of chassis_mac.
        let columns = vec![
            (
                LLDP_REM_CHASSIS_ID_SUBTYPE,
                vec![row(&[0, 1, 1], Val::Int(4))],
            ),
            (
                LLDP_REM_CHASSIS_ID,
                vec![row(&[0, 1, 1], bytes(&[1, 2, 3]))],
            ),
        ];
        let n = lldp_neighbors(&columns, 10);
        assert!(n[0].chassis_mac.is_empty());
        assert_eq!(n[0].chassis_id, "01:02:03");
    }

    #[test]
    fn values_convert_without_surprises() {
        assert_eq!(Val::Int(-1).as_u32(), None);
        assert_eq!(Val::Int(i64::MAX).as_u32(), None);
        assert_eq!(Val::Unsigned(7).as_u32(), Some(7));
        assert_eq!(bytes(b"x").as_u32(), None);
        assert_eq!(Val::Int(1).as_text(), "");
    }
}
