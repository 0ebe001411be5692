//! The structured input of the `mdns_records` target, and its mapping onto
//! `census_agent::fuzzing::mdns_records`. Shared by path with the corpus replay
//! (`agent/tests/fuzz_corpus.rs`), so a corpus file means the same input in both.
//!
//! The shapes help the fuzzer where raw bytes would not: names that are browsable service types,
//! strings far over the caps from a few bytes of input, addresses inside the site's scopes, and
//! floods of answers that reach the collector's table caps.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use arbitrary::Arbitrary;
use census_agent::{
    fuzzing::{MdnsAnswer, MdnsEvent, mdns_records},
    probe::mdns::MdnsSweepResult,
};
use ipnet::Ipv4Net;

/// Most scopes taken from an input.
const MAX_SCOPES: usize = 4;
/// Longest [`Text::Long`] or [`Value::Long`], in bytes: far over every cap of the collector,
/// small enough that a flood of copies stays fast.
const MAX_LONG: usize = 4096;

/// One browse: the site's scopes and what the link sent.
#[derive(Debug, Arbitrary)]
pub struct MdnsInput {
    /// (network, prefix length); none means `10.0.0.0/8`.
    scopes: Vec<(u32, u8)>,
    events: Vec<Event>,
}

#[derive(Debug, Arbitrary)]
enum Event {
    ServiceType(Text),
    Resolved(Answer),
    Service {
        service_type: Text,
        instance: Text,
        host: Text,
        port: u16,
        addresses: Vec<Addr>,
        txt_rdata: Vec<u8>,
    },
    Flood {
        template: Answer,
        count: u16,
        new_hosts: bool,
    },
}

#[derive(Debug, Arbitrary)]
struct Answer {
    fullname: Text,
    service_type: Text,
    host: Text,
    port: u16,
    addresses: Vec<Addr>,
    txt: Vec<(Text, Option<Value>)>,
}

/// A name or other string a responder sends.
#[derive(Debug, Arbitrary)]
enum Text {
    Raw(String),
    /// `_label._tcp.local.` or `_label._udp.local.`.
    ServiceType {
        label: String,
        udp: bool,
    },
    /// `unit` repeated `repeat` times (at most [`MAX_LONG`] bytes).
    Long {
        unit: String,
        repeat: u16,
    },
}

/// A TXT value: bytes, not necessarily UTF-8.
#[derive(Debug, Arbitrary)]
enum Value {
    Raw(Vec<u8>),
    Long { byte: u8, len: u16 },
}

#[derive(Debug, Arbitrary)]
enum Addr {
    /// Inside one of the scopes (index and host number reduced to fit).
    Scoped {
        scope: u8,
        host: u32,
    },
    V4(u32),
    V6(u128),
}

impl MdnsInput {
    /// Feeds the input to the collector (which checks its caps) and returns what it reported.
    pub fn run(self) -> MdnsSweepResult {
        let mut scopes: Vec<Ipv4Net> = self
            .scopes
            .iter()
            .filter_map(|&(net, len)| Ipv4Net::new(Ipv4Addr::from(net), len % 33).ok())
            .map(|n| n.trunc())
            .take(MAX_SCOPES)
            .collect();
        if scopes.is_empty() {
            scopes.push(Ipv4Net::new(Ipv4Addr::new(10, 0, 0, 0), 8).unwrap_or_default());
        }
        let events = self
            .events
            .into_iter()
            .map(|event| event.into_event(&scopes))
            .collect();
        mdns_records(scopes, events)
    }
}

impl Event {
    fn into_event(self, scopes: &[Ipv4Net]) -> MdnsEvent {
        match self {
            Event::ServiceType(name) => MdnsEvent::ServiceType(name.into_string()),
            Event::Resolved(answer) => MdnsEvent::Resolved(answer.into_answer(scopes)),
            Event::Service {
                service_type,
                instance,
                host,
                port,
                addresses,
                txt_rdata,
            } => MdnsEvent::Service {
                service_type: service_type.into_string(),
                instance: instance.into_string(),
                host: host.into_string(),
                port,
                addresses: addresses.iter().map(|a| a.ip(scopes)).collect(),
                txt_rdata,
            },
            Event::Flood {
                template,
                count,
                new_hosts,
            } => MdnsEvent::Flood {
                template: template.into_answer(scopes),
                count,
                new_hosts,
            },
        }
    }
}

impl Answer {
    fn into_answer(self, scopes: &[Ipv4Net]) -> MdnsAnswer {
        MdnsAnswer {
            fullname: self.fullname.into_string(),
            service_type: self.service_type.into_string(),
            host: self.host.into_string(),
            port: self.port,
            addresses: self.addresses.iter().map(|a| a.ip(scopes)).collect(),
            txt: self
                .txt
                .into_iter()
                .map(|(key, value)| (key.into_string(), value.map(Value::into_bytes)))
                .collect(),
        }
    }
}

impl Text {
    fn into_string(self) -> String {
        match self {
            Text::Raw(s) => s,
            Text::ServiceType { label, udp } => {
                format!("_{label}._{}.local.", if udp { "udp" } else { "tcp" })
            }
            Text::Long { unit, repeat } => {
                let fits = MAX_LONG / unit.len().max(1);
                unit.repeat(usize::from(repeat).min(fits))
            }
        }
    }
}

impl Value {
    fn into_bytes(self) -> Vec<u8> {
        match self {
            Value::Raw(bytes) => bytes,
            Value::Long { byte, len } => vec![byte; usize::from(len).min(MAX_LONG)],
        }
    }
}

impl Addr {
    fn ip(&self, scopes: &[Ipv4Net]) -> IpAddr {
        match *self {
            Addr::Scoped { scope, host } => {
                let Some(net) = scopes.get(usize::from(scope) % scopes.len().max(1)) else {
                    return IpAddr::V4(Ipv4Addr::UNSPECIFIED);
                };
                let size = 1u64 << (32 - u32::from(net.prefix_len()));
                let offset = u64::from(host) % size;
                let addr = u64::from(u32::from(net.network())) + offset;
                IpAddr::V4(Ipv4Addr::from(u32::try_from(addr).unwrap_or(u32::MAX)))
            }
            Addr::V4(a) => IpAddr::V4(Ipv4Addr::from(a)),
            Addr::V6(a) => IpAddr::V6(Ipv6Addr::from(a)),
        }
    }
}
