//! Entry points for the cargo-fuzz targets in `agent/fuzz/` and for the test that replays their
//! regression corpus (`agent/tests/fuzz_corpus.rs`). Not an API: hidden from the docs, and free
//! to change with the fuzz targets.
//!
//! Each function takes what a device on a client network controls, runs it through the same
//! code the probes run it through, and panics only when a property the probes rely on breaks:
//! - [`arp_frame`]: a received Ethernet frame; whatever parses re-encodes and re-parses to the
//!   same packet (Unix only, like the ARP probe).
//! - [`snmp_response`]: a UDP datagram from an SNMP agent, read as a v1/v2c reply, as a v3
//!   engine-discovery report, and as a v3 reply under a noAuthNoPriv and an authPriv user; each
//!   response copied out and walked, and every table decoder run over it; strings and tables
//!   within their caps.
//! - [`snmp_oid`]: the content octets of an OBJECT IDENTIFIER; whatever decodes re-encodes to
//!   the same bytes.
//! - [`mdns_records`]: a sequence of mDNS answers (as mdns-sd hands them over) fed to the
//!   mDNS collector; every cap holds.
//!
//! Everything here is bounded in time by the size of its input (the mDNS floods by
//! [`MAX_FLOOD_TOTAL`]), so the corpus replays quickly in every `cargo test`.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr},
    sync::OnceLock,
};

use census_proto::v1;
use ipnet::Ipv4Net;
use snmp2::{Pdu, v3::Security};

use crate::{
    config::SnmpV3User,
    probe::{
        mdns::{self, MdnsSweepResult},
        snmp::{
            ber,
            session::{self, Response, Walk},
            tables::{self, Row},
            usm::{self, Engine},
        },
    },
};

// === ARP ===

/// Parses `frame` as the ARP receiver does; a packet that parses is encoded again (to the
/// frame's own destination) and must parse back to itself. True when it parsed.
#[cfg(unix)]
pub fn arp_frame(frame: &[u8]) -> bool {
    use crate::probe::arp::packet;

    let Some(parsed) = packet::parse(frame) else {
        return false;
    };
    let eth_dst = frame
        .get(..6)
        .and_then(|d| <[u8; 6]>::try_from(d).ok())
        .unwrap_or(packet::BROADCAST);
    let rebuilt = packet::build(eth_dst, &parsed);
    assert_eq!(
        packet::parse(&rebuilt),
        Some(parsed),
        "a parsed ARP packet re-encodes to itself"
    );
    true
}

// === SNMP ===

/// Most rows any decoder here may report; small, so the fuzzer reaches the caps.
const MAX_ROWS: usize = 64;

/// The engine of the v3 users below (an enterprise-format ID, RFC 3411).
const ENGINE_ID: &[u8] = &[
    0x80, 0x00, 0x1f, 0x88, 0x04, b'c', b'e', b'n', b's', b'u', b's',
];

/// Reads `datagram` every way the SNMP probe reads a reply:
/// - as a v1/v2c response (`credential.rs`, and snmp2's sessions for walks);
/// - as an SNMPv3 engine-discovery report (`usm::read_discovery_report`);
/// - as a v3 response to a noAuthNoPriv user and to an authPriv (SHA-1/AES-128) user of a known
///   engine, as an snmp2 session with localized keys reads it. Without the keys a datagram
///   cannot pass the authPriv user's HMAC check, so that path is fuzzed up to the check (which is
///   what a host without the credentials can reach).
///
/// Each response that parses is copied out (`owned_response`), fed to a walk of every table the
/// probe reads (`session::step`), and its varbinds to every table decoder. Returns how many of
/// the readings gave a response (a discovery report counts).
pub fn snmp_response(datagram: &[u8]) -> usize {
    let mut read = 0;
    if let Ok(pdu) = Pdu::from_bytes(datagram) {
        check_response(&session::owned_response(pdu));
        read += 1;
    }
    if let Some(engine) = usm::read_discovery_report(datagram) {
        assert!(
            !engine.id.is_empty() && engine.id.len() <= tables::MAX_ENGINE_ID_BYTES,
            "a discovered engine ID is within its cap"
        );
        read += 1;
    }
    for user in v3_users() {
        let mut security = user.clone();
        // snmp2 zeroes the authentication parameters in the buffer it is given while it checks
        // them, as a session does in its own receive buffer; so it gets a copy.
        let buffer = datagram.to_vec();
        if let Ok(pdu) = Pdu::from_bytes_with_security(&buffer, Some(&mut security)) {
            check_response(&session::owned_response(pdu));
            read += 1;
        }
    }
    read
}

/// The v3 users replies are read as, keys localized once (the costly part).
fn v3_users() -> &'static [Security] {
    static USERS: OnceLock<Vec<Security>> = OnceLock::new();
    USERS.get_or_init(|| {
        let engine = Engine {
            id: ENGINE_ID.to_vec(),
            boots: 1,
            time: 1,
        };
        let no_auth = SnmpV3User {
            name: "census-noauth".into(),
            auth_protocol: None,
            auth_password: None,
            priv_protocol: None,
            priv_password: None,
        };
        let auth_priv = SnmpV3User {
            name: "census-priv".into(),
            auth_protocol: Some("sha".into()),
            auth_password: Some("fuzzing-auth".into()),
            priv_protocol: Some("aes".into()),
            priv_password: Some("fuzzing-priv".into()),
        };
        [no_auth, auth_priv]
            .iter()
            .filter_map(|user| {
                let level = usm::parse_user(user).ok()?;
                usm::security(user, &level, None, &engine).ok()
            })
            .collect()
    })
}

/// The tables the probe walks, by root, as `device.rs` walks them.
const WALKED: [&[u32]; 11] = [
    tables::IF_DESCR,
    tables::IF_PHYS_ADDRESS,
    tables::IF_NAME,
    tables::ENT_PHYSICAL_CLASS,
    tables::ENT_PHYSICAL_SERIAL,
    tables::ENT_PHYSICAL_MODEL,
    tables::IP_NET_TO_MEDIA_PHYS,
    tables::IP_NET_TO_PHYSICAL_PHYS,
    tables::DOT1D_TP_FDB_PORT,
    tables::DOT1Q_TP_FDB_PORT,
    tables::DOT1D_BASE_PORT_IF_INDEX,
];

/// Runs one owned response through everything that reads responses, checking the caps.
fn check_response(response: &Response) {
    for (oid, value) in &response.varbinds {
        assert!(oid.len() <= tables::MAX_OID_ARCS, "OIDs are capped");
        if let tables::Val::Bytes(b) = value {
            assert!(b.len() <= tables::MAX_VALUE_BYTES, "values are capped");
        }
    }

    // The system group, as read from the first GET.
    let mut identity = v1::SnmpIdentity::default();
    tables::apply_system(&response.varbinds, &mut identity);
    for s in [
        &identity.sys_name,
        &identity.sys_descr,
        &identity.sys_object_id,
    ] {
        assert_capped(s);
    }
    assert!(identity.engine_id.len() <= tables::MAX_ENGINE_ID_BYTES);

    // This response as the answer to a walk of each table.
    let lldp_roots: Vec<Vec<u32>> = tables::LLDP_COLUMNS
        .iter()
        .map(|column| [tables::LLDP_REM_ENTRY, &[*column]].concat())
        .collect();
    let roots = WALKED
        .iter()
        .copied()
        .chain(lldp_roots.iter().map(Vec::as_slice));
    for root in roots {
        let mut walk = Walk::default();
        let mut cursor = root.to_vec();
        session::step(
            &mut walk,
            root,
            &mut cursor,
            response.varbinds.clone(),
            MAX_ROWS,
        );
        assert!(walk.rows.len() <= MAX_ROWS, "walks stop at max_rows");
        for pair in walk.rows.windows(2) {
            assert!(pair[0].index < pair[1].index, "walked rows increase");
        }
        assert!(walk.rows.iter().all(|r| !r.index.is_empty()));
    }

    // Its varbinds as the rows of every table, whatever their order, for the decoders.
    let rows = |root: &[u32]| -> Vec<Row> {
        response
            .varbinds
            .iter()
            .filter(|(oid, _)| oid.len() > root.len() && oid.starts_with(root))
            .map(|(oid, value)| Row::new(&oid[root.len()..], value.clone()))
            .collect()
    };

    let interfaces = tables::interfaces(
        &rows(tables::IF_DESCR),
        &rows(tables::IF_NAME),
        &rows(tables::IF_PHYS_ADDRESS),
        MAX_ROWS,
    );
    assert!(interfaces.len() <= MAX_ROWS);
    for i in &interfaces {
        assert_capped(&i.name);
        assert_mac(&i.mac, true);
    }

    let (serial, model) = tables::chassis(
        &rows(tables::ENT_PHYSICAL_CLASS),
        &rows(tables::ENT_PHYSICAL_SERIAL),
        &rows(tables::ENT_PHYSICAL_MODEL),
    );
    assert_capped(&serial);
    assert_capped(&model);

    let arp = tables::arp_cache(
        &rows(tables::IP_NET_TO_MEDIA_PHYS),
        &rows(tables::IP_NET_TO_PHYSICAL_PHYS),
        MAX_ROWS,
    );
    assert!(arp.len() <= MAX_ROWS);
    for entry in &arp {
        assert!(entry.address.parse::<Ipv4Addr>().is_ok());
        assert_mac(&entry.mac, false);
    }

    let forwarding = tables::forwarding(
        &rows(tables::DOT1D_TP_FDB_PORT),
        &rows(tables::DOT1Q_TP_FDB_PORT),
        &rows(tables::DOT1D_BASE_PORT_IF_INDEX),
        MAX_ROWS,
    );
    assert!(forwarding.len() <= MAX_ROWS);
    for entry in &forwarding {
        assert_mac(&entry.mac, false);
    }

    let lldp: Vec<(u32, Vec<Row>)> = tables::LLDP_COLUMNS
        .iter()
        .zip(&lldp_roots)
        .map(|(column, root)| (*column, rows(root)))
        .collect();
    let neighbors = tables::lldp_neighbors(&lldp, MAX_ROWS);
    assert!(neighbors.len() <= MAX_ROWS);
    for n in &neighbors {
        for s in [
            &n.chassis_id,
            &n.port_id,
            &n.port_description,
            &n.sys_name,
            &n.sys_description,
        ] {
            assert_capped(s);
        }
        assert_mac(&n.chassis_mac, true);
    }
}

/// Device text as stored: within the cap, without control characters.
fn assert_capped(s: &str) {
    assert!(s.len() <= tables::MAX_STRING_BYTES, "string over the cap");
    assert!(!s.chars().any(char::is_control), "control character kept");
}

/// A MAC as stored: 6 non-zero bytes (or nothing, where a MAC is optional).
fn assert_mac(mac: &[u8], optional: bool) {
    if optional && mac.is_empty() {
        return;
    }
    assert!(
        mac.len() == 6 && mac != [0; 6],
        "not a usable MAC: {mac:02x?}"
    );
}

/// Decodes `content` as the octets of an OBJECT IDENTIFIER, as every OID in a response is
/// decoded; whatever decodes is within the arc cap and encodes back to the same octets (the
/// decoder accepts only minimal encodings, and walks compare decoded OIDs). Returns the arcs.
pub fn snmp_oid(content: &[u8]) -> Option<Vec<u32>> {
    let arcs = tables::decode_oid(content)?;
    assert!(arcs.len() >= 2 && arcs.len() <= tables::MAX_OID_ARCS);
    assert!(arcs[0] <= 2, "the first arc is 0, 1 or 2");
    assert_eq!(
        ber::oid(&arcs),
        ber::tlv(0x06, content),
        "a decoded OID re-encodes to the same octets"
    );
    let text = tables::oid_string(&arcs);
    let reparsed: Option<Vec<u32>> = text.split('.').map(|a| a.parse().ok()).collect();
    assert_eq!(reparsed.as_ref(), Some(&arcs), "the dotted form is exact");
    Some(arcs)
}

// === mDNS ===

/// Most answers all [`MdnsEvent::Flood`]s of one call add together: more than every cap of the
/// collector, few enough to keep one call in the milliseconds.
pub const MAX_FLOOD_TOTAL: usize = 10_000;

/// One resolved service instance, as mdns-sd reports it (the collector's input, unchecked).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MdnsAnswer {
    pub fullname: String,
    pub service_type: String,
    pub host: String,
    pub port: u16,
    pub addresses: Vec<IpAddr>,
    pub txt: Vec<(String, Option<Vec<u8>>)>,
}

/// What a link can make the mDNS browse see.
#[derive(Debug, Clone, PartialEq)]
pub enum MdnsEvent {
    /// An answer to the `_services._dns-sd._udp.local.` meta-query.
    ServiceType(String),
    /// A resolved instance, straight to the collector.
    Resolved(MdnsAnswer),
    /// A resolved instance built by mdns-sd itself (its TXT decoder reading `txt_rdata`, its
    /// name handling), then copied the way the browse copies it. Skipped when mdns-sd refuses
    /// the parts.
    Service {
        service_type: String,
        instance: String,
        host: String,
        port: u16,
        addresses: Vec<IpAddr>,
        txt_rdata: Vec<u8>,
    },
    /// `count` variants of one answer (instance names numbered, and host names too when
    /// `new_hosts`): a link that floods the browse.
    Flood {
        template: MdnsAnswer,
        count: u16,
        new_hosts: bool,
    },
}

/// Feeds `events` to the mDNS collector for a site of `scopes`, and checks every cap on what it
/// reports (hosts, service types, services per host and in all, TXT records and bytes, address
/// counts and scopes, string lengths, instance names filed once). Returns the result.
pub fn mdns_records(scopes: Vec<Ipv4Net>, events: Vec<MdnsEvent>) -> MdnsSweepResult {
    let mut collector = mdns::Collector::new(scopes.clone());
    let mut flood_budget = MAX_FLOOD_TOTAL;
    for event in events {
        match event {
            MdnsEvent::ServiceType(name) => {
                if let Some(ty) = collector.add_type(&name) {
                    assert!(ty.len() <= mdns::MAX_STRING_BYTES);
                }
            }
            MdnsEvent::Resolved(answer) => collector.add_resolved(resolved(answer)),
            MdnsEvent::Service {
                service_type,
                instance,
                host,
                port,
                addresses,
                txt_rdata,
            } => {
                let txt: Vec<mdns_sd::TxtProperty> = mdns_sd::TxtProperties::from(&txt_rdata[..])
                    .iter()
                    .cloned()
                    .collect();
                let info = mdns_sd::ServiceInfo::new(
                    &service_type,
                    &instance,
                    &host,
                    &addresses[..],
                    port,
                    txt,
                );
                if let Ok(info) = info {
                    let service = info.as_resolved_service();
                    collector.add_resolved(mdns::Resolved::from_service(&service));
                }
            }
            MdnsEvent::Flood {
                template,
                count,
                new_hosts,
            } => {
                let count = usize::from(count).min(flood_budget);
                flood_budget -= count;
                for i in 0..count {
                    let mut answer = template.clone();
                    answer.fullname = format!("{i}.{}", answer.fullname);
                    if new_hosts {
                        answer.host = format!("h{i}.{}", answer.host);
                    }
                    collector.add_resolved(resolved(answer));
                }
            }
        }
    }
    let result = collector.finish();
    check_mdns(&result, &scopes);
    result
}

fn resolved(answer: MdnsAnswer) -> mdns::Resolved {
    mdns::Resolved {
        fullname: answer.fullname,
        service_type: answer.service_type,
        host: answer.host,
        port: answer.port,
        addresses: answer.addresses,
        txt: answer.txt,
    }
}

fn check_mdns(result: &MdnsSweepResult, scopes: &[Ipv4Net]) {
    assert!(result.hosts.len() <= mdns::MAX_HOSTS, "hosts over the cap");
    assert!(result.service_types.len() <= mdns::MAX_SERVICE_TYPES);
    for ty in &result.service_types {
        assert!(ty.len() <= mdns::MAX_STRING_BYTES && *ty == ty.to_ascii_lowercase());
    }
    let mut instances = HashSet::new();
    for host in &result.hosts {
        let id = &host.identity;
        assert!(!id.host_name.is_empty() && id.host_name.len() <= mdns::MAX_STRING_BYTES);
        assert!(!host.addresses.is_empty() && host.addresses.len() <= mdns::MAX_ADDRESSES);
        assert!(
            host.addresses
                .iter()
                .all(|a| scopes.iter().any(|s| s.contains(a))),
            "an address outside the scopes"
        );
        assert!(id.services.len() <= mdns::MAX_SERVICES_PER_HOST);
        for service in &id.services {
            assert!(!service.instance.is_empty() && !service.service_type.is_empty());
            assert!(service.instance.len() <= mdns::MAX_STRING_BYTES);
            assert!(service.service_type.len() <= mdns::MAX_STRING_BYTES);
            assert!(
                instances.insert(service.instance.to_lowercase()),
                "an instance filed twice"
            );
            assert!(service.txt.len() <= mdns::MAX_TXT_PER_SERVICE);
            let bytes: usize = service
                .txt
                .iter()
                .map(|t| t.key.len() + t.value.len())
                .sum();
            assert!(
                bytes <= mdns::MAX_TXT_BYTES_PER_SERVICE,
                "TXT bytes over the cap"
            );
            for t in &service.txt {
                assert!(!t.key.is_empty());
                assert!(t.key.len() <= mdns::MAX_STRING_BYTES);
                assert!(t.value.len() <= mdns::MAX_STRING_BYTES);
            }
        }
        for s in std::iter::once(&id.host_name)
            .chain(id.services.iter().map(|s| &s.instance))
            .chain(
                id.services
                    .iter()
                    .flat_map(|s| s.txt.iter().map(|t| &t.value)),
            )
        {
            assert!(!s.chars().any(char::is_control), "control character kept");
        }
    }
    assert!(
        instances.len() <= mdns::MAX_SERVICES_TOTAL,
        "services over the cap"
    );
}
