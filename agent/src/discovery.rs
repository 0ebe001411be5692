//! One sweep with every enabled method, and the gathering of what each method saw of each
//! device into one observation per device.
//!
//! Order: mDNS listens for its whole window while ARP (on-link, one OS thread per interface)
//! and ICMP (routed) run; SNMP then queries every address that answered. [`merge`] is
//! I/O-free: it groups the answers by device (a first-hand MAC, else the answering address),
//! records where every field came from, and notes anomalies (address conflicts, proxy ARP).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::{Duration, Instant, SystemTime},
};

use census_proto::{
    convert::{self, MacAddr},
    v1::{self, Method},
};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{info, instrument, warn};

use crate::{
    classify,
    config::Config,
    probe::{
        icmp::{self, IcmpConfig, IcmpReply},
        mdns::{self, MdnsConfig, MdnsHost},
        snmp::{self, SnmpConfig, SnmpCredentials, SnmpDevice},
    },
    run::AgentError,
    scope::SweepPlan,
};

/// A MAC answering ARP for more addresses than this is flagged as a proxy-ARP responder.
pub const PROXY_ARP_THRESHOLD: usize = 4;
/// Most names kept per device.
const MAX_NAMES: usize = 16;

/// What ARP found on one interface, independent of the platform's backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArpFound {
    pub interface: String,
    pub probed: usize,
    pub requests_sent: u64,
    /// Of those, checks (addresses that had answered, asked again to time the network).
    pub checks_sent: u64,
    /// The highest rate of requests per second the sweep reached.
    pub peak_rate_pps: u32,
    /// (address, MAC, first seen)
    pub replies: Vec<(Ipv4Addr, [u8; 6], SystemTime)>,
}

/// What one sweep did, for the log and `--once`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepSummary {
    pub probed: usize,
    pub arp_replies: usize,
    pub icmp_replies: usize,
    pub snmp_devices: usize,
    pub mdns_hosts: usize,
    pub observations: usize,
    pub duration: Duration,
}

/// Everything the methods found, ready to merge.
#[derive(Debug, Default, Clone)]
pub struct Findings {
    pub arp: Vec<ArpFound>,
    pub icmp: Vec<IcmpReply>,
    /// Interface routed replies came through, for the observation.
    pub icmp_interface: String,
    pub snmp: Vec<SnmpDevice>,
    pub mdns: Vec<MdnsHost>,
}

/// Progress lines for a person watching a terminal; silent otherwise.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub enabled: bool,
}

impl Progress {
    fn say(&self, line: impl std::fmt::Display) {
        if self.enabled {
            eprintln!("{line}");
        }
    }
}

/// Runs one sweep of `plan` with every enabled method.
#[instrument(skip_all, fields(targets = plan.target_count()))]
pub async fn sweep(
    plan: &SweepPlan,
    config: &Config,
    progress: Progress,
    cancel: &CancellationToken,
) -> Result<(Vec<v1::Observation>, SweepSummary), AgentError> {
    let started = Instant::now();
    // One sweep is one sighting: every observation of it carries this time, so the collector
    // sees what a device answered on in one sweep (two NICs, two routed addresses) as one.
    let sighted = SystemTime::now();
    let mdns_config = MdnsConfig {
        interfaces: plan
            .on_link
            .iter()
            .map(|p| p.interface.name.clone())
            .collect(),
        scopes: plan
            .on_link
            .iter()
            .flat_map(|p| p.scopes.iter().copied())
            .collect(),
        window: Duration::from_millis(config.mdns.window_ms),
    };
    let mdns_wanted = config.mdns.enabled && !mdns_config.interfaces.is_empty();
    let mdns_fut = async {
        if !mdns_wanted {
            return Vec::new();
        }
        progress.say(format_args!(
            "mDNS: listening for {:?} on {}",
            mdns_config.window,
            mdns_config.interfaces.join(",")
        ));
        match mdns::sweep(&mdns_config, cancel).await {
            Ok(r) => r.hosts,
            Err(e) => {
                warn!(error = %e, "mDNS browsing failed; continuing without it");
                Vec::new()
            }
        }
    };
    let probes_fut = async {
        let (arp, icmp) = tokio::join!(
            sweep_arp(plan, config, progress, cancel),
            sweep_icmp(plan, config, progress, cancel)
        );
        let (arp, icmp) = (arp?, icmp?);
        let mut responding: BTreeSet<Ipv4Addr> = arp
            .iter()
            .flat_map(|a| a.replies.iter().map(|r| r.0))
            .collect();
        responding.extend(icmp.iter().map(|r| r.ip));
        let credentials = SnmpCredentials {
            communities: config.snmp.communities.clone(),
            v3_users: config.snmp.v3_users.clone(),
        };
        let snmp_wanted = config.snmp.enabled
            && (!credentials.communities.is_empty() || !credentials.v3_users.is_empty());
        let snmp = if snmp_wanted && !responding.is_empty() && !cancel.is_cancelled() {
            let targets: Vec<Ipv4Addr> = responding.iter().copied().collect();
            progress.say(format_args!(
                "SNMP: querying {} responding addresses",
                targets.len()
            ));
            let cfg = SnmpConfig {
                port: config.snmp.port,
                timeout: Duration::from_millis(config.snmp.timeout_ms),
                retries: config.snmp.retries,
                concurrency: config.snmp.concurrency,
                max_repetitions: config.snmp.max_repetitions,
                max_rows: config.snmp.max_rows,
            };
            let r = snmp::sweep(&targets, &credentials, &cfg, cancel).await;
            info!(
                probed = r.probed,
                answered = r.devices.len(),
                silent = r.silent,
                "SNMP sweep"
            );
            progress.say(format_args!(
                "SNMP: {} devices answered, {} silent",
                r.devices.len(),
                r.silent
            ));
            r.devices
        } else {
            Vec::new()
        };
        Ok::<_, AgentError>((arp, icmp, snmp))
    };
    let (mdns, probes) = tokio::join!(mdns_fut, probes_fut);
    let (arp, icmp, snmp) = probes?;
    if mdns_wanted {
        progress.say(format_args!(
            "mDNS: {} hosts advertised services",
            mdns.len()
        ));
    }
    let findings = Findings {
        icmp_interface: plan
            .routed
            .first()
            .map(|r| r.route.interface.clone())
            .unwrap_or_default(),
        arp,
        icmp,
        snmp,
        mdns,
    };
    let observations = merge(&findings, sighted);
    let summary = SweepSummary {
        probed: plan.target_count(),
        arp_replies: findings.arp.iter().map(|a| a.replies.len()).sum(),
        icmp_replies: findings.icmp.len(),
        snmp_devices: findings.snmp.len(),
        mdns_hosts: findings.mdns.len(),
        observations: observations.len(),
        duration: started.elapsed(),
    };
    info!(
        probed = summary.probed,
        arp = summary.arp_replies,
        icmp = summary.icmp_replies,
        snmp = summary.snmp_devices,
        mdns = summary.mdns_hosts,
        devices = summary.observations,
        duration = ?summary.duration,
        "sweep finished"
    );
    Ok((observations, summary))
}

#[cfg(unix)]
async fn sweep_arp(
    plan: &SweepPlan,
    config: &Config,
    progress: Progress,
    cancel: &CancellationToken,
) -> Result<Vec<ArpFound>, AgentError> {
    use crate::probe::arp::{self, ArpConfig, ArpError};

    if !config.arp.enabled {
        return Ok(Vec::new());
    }
    let arp_config = ArpConfig {
        rate_pps: config.arp.rate,
        retries: config.arp.retries,
        reply_window: Duration::from_millis(config.arp.reply_window_ms),
        ..ArpConfig::default()
    };
    let mut waiting = Vec::new();
    for p in &plan.on_link {
        progress.say(format_args!(
            "ARP: sweeping {} addresses on {} at {}",
            p.targets.len(),
            p.interface.name,
            arp::rate_text(&arp_config)
        ));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (iface, targets, cfg, cancel) = (
            p.interface.clone(),
            p.targets.clone(),
            arp_config.clone(),
            cancel.clone(),
        );
        // pnet's receive blocks: each interface gets its own OS thread. One call sweeps at most
        // arp::MAX_TARGETS addresses, so a larger (explicitly allowed) scope goes in chunks.
        std::thread::Builder::new()
            .name(format!("arp-{}", p.interface.name))
            .spawn(move || {
                let mut all = ArpFound {
                    interface: iface.name.clone(),
                    ..ArpFound::default()
                };
                for chunk in targets.chunks(arp::MAX_TARGETS) {
                    match arp::sweep(&iface, chunk, &cfg, &cancel) {
                        Ok(r) => {
                            all.probed += r.probed;
                            all.requests_sent += r.requests_sent;
                            all.checks_sent += r.checks_sent;
                            all.peak_rate_pps = all.peak_rate_pps.max(r.peak_rate_pps);
                            // Only answers to our own requests are first-hand evidence: a
                            // gratuitous ARP can claim any address with any MAC, and must not
                            // create devices.
                            all.replies.extend(
                                r.replies
                                    .into_iter()
                                    .filter(|a| a.solicited)
                                    .map(|a| (a.ip, a.mac, a.first_seen)),
                            );
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                    if cancel.is_cancelled() {
                        break;
                    }
                }
                let _ = tx.send(Ok(all));
            })
            .map_err(|e| AgentError::Sweep(format!("cannot start the ARP thread: {e}")))?;
        waiting.push(rx);
    }
    let mut out = Vec::new();
    for rx in waiting {
        match rx.await {
            Ok(Ok(found)) => {
                info!(interface = %found.interface, probed = found.probed, replies = found.replies.len(), requests = found.requests_sent, checks = found.checks_sent, peak_rate_pps = found.peak_rate_pps, "ARP sweep");
                progress.say(format_args!(
                    "ARP: {} answered on {}",
                    found.replies.len(),
                    found.interface
                ));
                out.push(found);
            }
            Ok(Err(e @ ArpError::PermissionDenied { .. })) => {
                return Err(AgentError::Permission(e.to_string()));
            }
            Ok(Err(e)) => return Err(AgentError::Sweep(e.to_string())),
            Err(_) => {
                return Err(AgentError::Sweep(
                    "the ARP thread ended without a result".into(),
                ));
            }
        }
    }
    Ok(out)
}

/// Windows: neighbour resolution through the IP Helper API (no capture driver), one
/// interface after another, each a paced, bounded pool of blocking calls
/// (`probe/iphelper.rs`). Only answers to our own resolutions are reported: first-hand.
#[cfg(windows)]
async fn sweep_arp(
    plan: &SweepPlan,
    config: &Config,
    progress: Progress,
    cancel: &CancellationToken,
) -> Result<Vec<ArpFound>, AgentError> {
    use crate::probe::iphelper::{self, WinArpError};

    if !config.arp.enabled {
        return Ok(Vec::new());
    }
    let rate = config.arp.start_rate();
    let mut out = Vec::new();
    for p in &plan.on_link {
        progress.say(format_args!(
            "ARP: resolving {} addresses on {} at {rate} per second",
            p.targets.len(),
            p.interface.name,
        ));
        let found = iphelper::arp_sweep(&p.interface, &p.targets, rate, config.arp.retries, cancel)
            .await
            .map_err(|e| match e {
                WinArpError::PermissionDenied => AgentError::Permission(e.to_string()),
                WinArpError::Failed { .. } => AgentError::Sweep(e.to_string()),
            })?;
        info!(interface = %found.interface, probed = found.probed, replies = found.replies.len(), requests = found.requests_sent, "ARP sweep");
        progress.say(format_args!(
            "ARP: {} answered on {}",
            found.replies.len(),
            found.interface
        ));
        out.push(found);
        if cancel.is_cancelled() {
            break;
        }
    }
    Ok(out)
}

#[cfg(not(any(unix, windows)))]
async fn sweep_arp(
    plan: &SweepPlan,
    config: &Config,
    _progress: Progress,
    _cancel: &CancellationToken,
) -> Result<Vec<ArpFound>, AgentError> {
    if !config.arp.enabled || plan.on_link.is_empty() {
        return Ok(Vec::new());
    }
    Err(AgentError::Sweep(
        "ARP sweeps are supported on Linux and Windows only".into(),
    ))
}

async fn sweep_icmp(
    plan: &SweepPlan,
    config: &Config,
    progress: Progress,
    cancel: &CancellationToken,
) -> Result<Vec<IcmpReply>, AgentError> {
    let targets: Vec<Ipv4Addr> = plan
        .routed
        .iter()
        .flat_map(|r| r.targets.iter().copied())
        .collect();
    if !config.icmp.enabled || targets.is_empty() {
        return Ok(Vec::new());
    }
    progress.say(format_args!(
        "ICMP: pinging {} routed addresses at {} pps",
        targets.len(),
        config.icmp.rate
    ));
    let cfg = IcmpConfig {
        rate_pps: config.icmp.rate,
        concurrency: config.icmp.concurrency,
        timeout: Duration::from_millis(config.icmp.timeout_ms),
        retries: config.icmp.retries,
    };
    match icmp::sweep(&targets, &cfg, cancel).await {
        Ok(r) => {
            info!(
                probed = r.probed,
                replies = r.replies.len(),
                requests = r.requests_sent,
                "ICMP sweep"
            );
            progress.say(format_args!("ICMP: {} answered", r.replies.len()));
            Ok(r.replies)
        }
        Err(e @ icmp::IcmpError::PermissionDenied(_)) => Err(AgentError::Permission(e.to_string())),
        Err(e) => Err(AgentError::Sweep(e.to_string())),
    }
}

// === merge ===

/// One device being assembled from several methods.
#[derive(Debug, Default)]
struct Draft {
    interface: String,
    methods: BTreeSet<i32>,
    /// address -> (answered, method)
    addresses: BTreeMap<Ipv4Addr, (bool, Method)>,
    macs: BTreeMap<[u8; 6], v1::MacEvidence>,
    names: Vec<v1::Name>,
    snmp: Option<v1::SnmpIdentity>,
    mdns: Option<v1::MdnsIdentity>,
    anomalies: Vec<v1::Anomaly>,
}

impl Draft {
    fn name(&mut self, value: &str, source: v1::NameSource) {
        let value = value.trim().trim_end_matches('.');
        if value.is_empty()
            || self.names.len() >= MAX_NAMES
            || self.names.iter().any(|n| n.value == value)
        {
            return;
        }
        self.names.push(v1::Name {
            value: value.to_owned(),
            source: source as i32,
        });
    }

    fn mac(&mut self, mac: [u8; 6], method: Method, first_hand: bool, via: String) {
        self.macs.entry(mac).or_insert_with(|| v1::MacEvidence {
            mac: mac.to_vec(),
            method: method as i32,
            first_hand,
            via,
            vendor: classify::vendor(mac).unwrap_or_default().to_owned(),
            locally_administered: mac[0] & 0x02 != 0,
        });
    }
}

/// Gathers every method's findings into one observation per device, each dated `sighted`:
/// the time of the sweep, one sighting of every device in it.
pub fn merge(f: &Findings, sighted: SystemTime) -> Vec<v1::Observation> {
    let mut drafts: Vec<Draft> = Vec::new();
    let mut by_ip: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();

    // ARP: a device per answering MAC, with every address it answered for.
    let mut by_mac: BTreeMap<[u8; 6], usize> = BTreeMap::new();
    let mut macs_of_ip: BTreeMap<Ipv4Addr, Vec<[u8; 6]>> = BTreeMap::new();
    for found in &f.arp {
        for &(ip, mac, _) in &found.replies {
            let idx = *by_mac.entry(mac).or_insert_with(|| {
                drafts.push(Draft {
                    interface: found.interface.clone(),
                    ..Draft::default()
                });
                drafts.len() - 1
            });
            let d = &mut drafts[idx];
            d.methods.insert(Method::Arp as i32);
            d.addresses.insert(ip, (true, Method::Arp));
            d.mac(mac, Method::Arp, true, String::new());
            by_ip.entry(ip).or_insert(idx);
            let list = macs_of_ip.entry(ip).or_default();
            if !list.contains(&mac) {
                list.push(mac);
            }
        }
    }
    for (ip, macs) in &macs_of_ip {
        if macs.len() < 2 {
            continue;
        }
        let all = macs
            .iter()
            .map(|m| MacAddr(*m).to_string())
            .collect::<Vec<_>>()
            .join(", ");
        for mac in macs {
            if let Some(&idx) = by_mac.get(mac) {
                drafts[idx].anomalies.push(v1::Anomaly {
                    kind: v1::AnomalyKind::AddressConflict as i32,
                    detail: format!("{ip} was answered by {} MACs: {all}", macs.len()),
                });
            }
        }
    }
    for (mac, &idx) in &by_mac {
        let n = drafts[idx].addresses.len();
        if n > PROXY_ARP_THRESHOLD {
            drafts[idx].anomalies.push(v1::Anomaly {
                kind: v1::AnomalyKind::ProxyArp as i32,
                detail: format!("{} answered ARP for {n} addresses", MacAddr(*mac)),
            });
        }
    }

    // ICMP: routed addresses that answered.
    for r in &f.icmp {
        let idx = *by_ip.entry(r.ip).or_insert_with(|| {
            drafts.push(Draft {
                interface: f.icmp_interface.clone(),
                ..Draft::default()
            });
            drafts.len() - 1
        });
        let d = &mut drafts[idx];
        d.methods.insert(Method::Icmp as i32);
        d.addresses.entry(r.ip).or_insert((true, Method::Icmp));
    }

    // SNMP: the identity of the device at the address that answered, and what routers know.
    let mut neighbours: BTreeMap<Ipv4Addr, ([u8; 6], Ipv4Addr)> = BTreeMap::new();
    for dev in &f.snmp {
        let Some(&idx) = by_ip.get(&dev.ip) else {
            continue;
        };
        let d = &mut drafts[idx];
        d.methods.insert(Method::Snmp as i32);
        d.name(&dev.identity.sys_name, v1::NameSource::SnmpSysName);
        d.snmp = Some(dev.identity.clone());
        for entry in &dev.identity.arp_cache {
            if let (Some(ip), Ok(mac)) = (
                convert::parse_ip(&entry.address),
                <[u8; 6]>::try_from(entry.mac.as_slice()),
            ) && let std::net::IpAddr::V4(ip) = ip
                && MacAddr(mac).is_unicast()
            {
                neighbours.entry(ip).or_insert((mac, dev.ip));
            }
        }
    }
    // Second-hand MACs only enrich devices that answered a probe of ours and have no MAC of
    // their own (hosts behind a router); they never create a device.
    for d in &mut drafts {
        if !d.macs.is_empty() {
            continue;
        }
        let found: Vec<([u8; 6], Ipv4Addr)> = d
            .addresses
            .keys()
            .filter_map(|ip| neighbours.get(ip).copied())
            .collect();
        for (mac, router) in found {
            d.mac(mac, Method::Snmp, false, format!("arp cache of {router}"));
            d.methods.insert(Method::Snmp as i32);
        }
    }

    // mDNS: attach each host to the device at one of its addresses.
    for host in &f.mdns {
        let Some(idx) = host.addresses.iter().find_map(|ip| by_ip.get(ip).copied()) else {
            continue;
        };
        let d = &mut drafts[idx];
        d.methods.insert(Method::Mdns as i32);
        d.name(&host.identity.host_name, v1::NameSource::MdnsHost);
        for s in &host.identity.services {
            let label = s
                .instance
                .strip_suffix(&format!(".{}", s.service_type))
                .unwrap_or(&s.instance);
            d.name(label, v1::NameSource::MdnsInstance);
        }
        match &mut d.mdns {
            Some(m) => m.services.extend(host.identity.services.iter().cloned()),
            None => d.mdns = Some(host.identity.clone()),
        }
    }

    drafts
        .into_iter()
        .map(|d| {
            let methods: Vec<i32> = d.methods.iter().copied().collect();
            let mut obs = v1::Observation {
                observed_at: Some(convert::timestamp(sighted)),
                method: methods.first().copied().unwrap_or_default(),
                addresses: d
                    .addresses
                    .iter()
                    .map(|(ip, (answered, method))| v1::IpAddress {
                        address: ip.to_string(),
                        answered: *answered,
                        method: *method as i32,
                    })
                    .collect(),
                macs: d.macs.keys().map(|m| m.to_vec()).collect(),
                names: d.names,
                snmp: d.snmp,
                mdns: d.mdns,
                interface: d.interface,
                methods,
                mac_evidence: d.macs.into_values().collect(),
                category: 0,
                category_reason: String::new(),
                anomalies: d.anomalies,
            };
            let (category, reason) = classify::categorize(&obs);
            obs.category = category as i32;
            obs.category_reason = reason;
            obs
        })
        .collect()
}

/// An observation as JSON, for `census-agent scan --json` and the tests.
pub fn to_json(o: &v1::Observation) -> serde_json::Value {
    let method = |m: i32| Method::try_from(m).map(Method::label).unwrap_or("unknown");
    let mac = |b: &[u8]| {
        MacAddr::try_from(b)
            .map(|m| m.to_string())
            .unwrap_or_default()
    };
    json!({
        "addresses": o.addresses.iter().map(|a| json!({"address": a.address, "answered": a.answered, "method": method(a.method)})).collect::<Vec<_>>(),
        "macs": o.mac_evidence.iter().map(|m| json!({
            "mac": mac(&m.mac), "method": method(m.method), "first_hand": m.first_hand, "via": m.via,
            "vendor": m.vendor, "locally_administered": m.locally_administered,
        })).collect::<Vec<_>>(),
        "methods": o.methods.iter().map(|m| method(*m)).collect::<Vec<_>>(),
        "names": o.names.iter().map(|n| n.value.clone()).collect::<Vec<_>>(),
        "interface": o.interface,
        "category": v1::Category::try_from(o.category).unwrap_or_default().label(),
        "category_reason": o.category_reason,
        "anomalies": o.anomalies.iter().map(|a| a.detail.clone()).collect::<Vec<_>>(),
        "snmp": o.snmp.as_ref().map(|s| json!({
            "sys_name": s.sys_name, "sys_descr": s.sys_descr, "sys_object_id": s.sys_object_id,
            "sys_uptime_centis": s.sys_uptime_centis, "engine_id": hex(&s.engine_id),
            "serial_number": s.serial_number, "model": s.model, "version": s.version, "credential": s.credential,
            "interfaces": s.interfaces.iter().map(|i| json!({"if_index": i.if_index, "name": i.name, "mac": mac(&i.mac)})).collect::<Vec<_>>(),
            "arp_cache": s.arp_cache.iter().map(|e| json!({"address": e.address, "mac": mac(&e.mac), "if_index": e.if_index})).collect::<Vec<_>>(),
            "forwarding": s.forwarding.iter().map(|e| json!({"mac": mac(&e.mac), "bridge_port": e.bridge_port, "if_index": e.if_index, "vlan": e.vlan})).collect::<Vec<_>>(),
            "lldp_neighbors": s.lldp_neighbors.iter().map(|n| json!({
                "local_port": n.local_port, "chassis_id": n.chassis_id, "port_id": n.port_id,
                "port_description": n.port_description, "sys_name": n.sys_name,
            })).collect::<Vec<_>>(),
        })),
        "mdns": o.mdns.as_ref().map(|m| json!({
            "host_name": m.host_name,
            "services": m.services.iter().map(|s| json!({
                "instance": s.instance, "service_type": s.service_type, "port": s.port,
                "txt": s.txt.iter().map(|t| (t.key.clone(), serde_json::Value::from(t.value.clone()))).collect::<serde_json::Map<_, _>>(),
            })).collect::<Vec<_>>(),
        })),
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("test address")
    }

    const T: SystemTime = SystemTime::UNIX_EPOCH;

    fn arp(replies: &[(&str, [u8; 6])]) -> ArpFound {
        ArpFound {
            interface: "eth0".into(),
            probed: 254,
            requests_sent: 254,
            checks_sent: 0,
            peak_rate_pps: 1200,
            replies: replies.iter().map(|(a, m)| (ip(a), *m, T)).collect(),
        }
    }

    const M1: [u8; 6] = [0x00, 0x00, 0x0c, 0, 0, 1];
    const M2: [u8; 6] = [0x00, 0x16, 0x3e, 0, 0, 2];
    const M3: [u8; 6] = [0x00, 0x16, 0x3e, 0, 0, 3];

    #[test]
    fn one_observation_per_device_with_every_method() {
        let f = Findings {
            arp: vec![arp(&[("198.18.0.1", M1), ("198.18.0.10", M2)])],
            icmp: vec![
                IcmpReply {
                    ip: ip("198.18.1.10"),
                    rtt: Duration::from_millis(1),
                    at: T,
                },
                IcmpReply {
                    ip: ip("198.18.1.11"),
                    rtt: Duration::from_millis(1),
                    at: T,
                },
            ],
            icmp_interface: "eth0".into(),
            snmp: vec![SnmpDevice {
                ip: ip("198.18.0.1"),
                identity: v1::SnmpIdentity {
                    sys_name: "gw".into(),
                    sys_descr: "Cisco IOS Software".into(),
                    arp_cache: vec![v1::NeighborEntry {
                        address: "198.18.1.10".into(),
                        mac: M3.to_vec(),
                        if_index: 2,
                    }],
                    ..Default::default()
                },
                errors: vec![],
            }],
            mdns: vec![MdnsHost {
                addresses: vec![ip("198.18.0.10")],
                identity: v1::MdnsIdentity {
                    host_name: "printer.local.".into(),
                    services: vec![v1::MdnsService {
                        instance: "Office._ipp._tcp.local.".into(),
                        service_type: "_ipp._tcp.local.".into(),
                        port: 631,
                        txt: vec![],
                    }],
                },
            }],
        };
        let sweep_started = T + std::time::Duration::from_secs(1_764_000_000);
        let obs = merge(&f, sweep_started);
        assert_eq!(obs.len(), 4);
        assert!(
            obs.iter()
                .all(|o| o.observed_at == Some(convert::timestamp(sweep_started))),
            "one sweep is one sighting: every observation carries its time"
        );
        let router = &obs[0];
        assert_eq!(router.methods, [Method::Arp as i32, Method::Snmp as i32]);
        assert_eq!(router.names[0].value, "gw");
        assert_eq!(router.category, v1::Category::Network as i32);
        assert_eq!(router.mac_evidence[0].vendor, "Cisco Systems, Inc");
        let printer = &obs[1];
        assert_eq!(
            printer.category,
            v1::Category::Printer as i32,
            "{}",
            printer.category_reason
        );
        assert!(printer.names.iter().any(|n| n.value == "printer.local"));
        assert!(printer.names.iter().any(|n| n.value == "Office"));
        // The routed host got its MAC second-hand from the router's ARP cache.
        let routed = &obs[2];
        assert_eq!(routed.macs, [M3.to_vec()]);
        assert!(!routed.mac_evidence[0].first_hand);
        assert_eq!(routed.mac_evidence[0].via, "arp cache of 198.18.0.1");
        assert_eq!(routed.methods, [Method::Icmp as i32, Method::Snmp as i32]);
        // The other routed host has no MAC: the cache did not know it.
        assert!(obs[3].macs.is_empty());
        assert!(obs[3].addresses[0].answered);
    }

    #[test]
    fn conflicts_and_proxy_arp_are_flagged() {
        let mut replies = vec![("198.18.0.5", M1), ("198.18.0.5", M2)];
        let proxied: Vec<String> = (20..30).map(|i| format!("198.18.0.{i}")).collect();
        replies.extend(proxied.iter().map(|a| (a.as_str(), M3)));
        let obs = merge(
            &Findings {
                arp: vec![arp(&replies)],
                ..Default::default()
            },
            T,
        );
        assert_eq!(obs.len(), 3, "one device per MAC");
        let kinds = |o: &v1::Observation| o.anomalies.iter().map(|a| a.kind).collect::<Vec<_>>();
        assert_eq!(kinds(&obs[0]), [v1::AnomalyKind::AddressConflict as i32]);
        assert_eq!(kinds(&obs[1]), [v1::AnomalyKind::AddressConflict as i32]);
        assert_eq!(kinds(&obs[2]), [v1::AnomalyKind::ProxyArp as i32]);
        assert_eq!(obs[2].addresses.len(), 10);
    }

    #[test]
    fn second_hand_macs_never_create_devices() {
        let f = Findings {
            arp: vec![arp(&[("198.18.0.1", M1)])],
            snmp: vec![SnmpDevice {
                ip: ip("198.18.0.1"),
                identity: v1::SnmpIdentity {
                    arp_cache: vec![v1::NeighborEntry {
                        address: "198.18.1.99".into(),
                        mac: M3.to_vec(),
                        if_index: 2,
                    }],
                    ..Default::default()
                },
                errors: vec![],
            }],
            ..Default::default()
        };
        assert_eq!(merge(&f, T).len(), 1);
    }

    #[test]
    fn json_has_every_section() {
        let obs = merge(
            &Findings {
                arp: vec![arp(&[("198.18.0.1", M1)])],
                ..Default::default()
            },
            T,
        );
        let j = to_json(&obs[0]);
        assert_eq!(j["addresses"][0]["address"], "198.18.0.1");
        assert_eq!(j["macs"][0]["mac"], "00:00:0c:00:00:01");
        assert_eq!(j["methods"][0], "arp");
        assert_eq!(j["category"], "network");
    }
}
