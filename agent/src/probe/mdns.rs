//! mDNS / DNS-SD discovery (mdns-sd): browses `_services._dns-sd._udp.local.` on the configured
//! interfaces, then every service type that meta-query names (it yields type names only), and
//! reports the hosts inside the site's scopes with their services, addresses and TXT records.
//!
//! Layout:
//! - [`sweep`]: the I/O. One mdns-sd daemon per sweep (its own OS thread), restricted to the
//!   configured interfaces, read without blocking the runtime (flume's `recv_async`), for a
//!   bounded window, and always shut down, also when the sweep future is dropped.
//! - `Collector`: the pure part. It validates service type names, keeps only IPv4 addresses
//!   inside the scopes, groups instances by host name, and caps every string and table, so a
//!   hostile responder can neither panic the sweep nor grow it without bound.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use census_proto::v1;
use ipnet::Ipv4Net;
use mdns_sd::{
    DaemonEvent, DaemonStatus, IfKind, IfPredicate, ResolvedService, ServiceDaemon, ServiceEvent,
};
use tokio_stream::{StreamExt as _, StreamMap};
use tokio_util::sync::CancellationToken;
use tracing::{debug, instrument, warn};

/// The DNS-SD meta-query (RFC 6763 §9): its answers name the service types on the link.
const META_QUERY: &str = "_services._dns-sd._udp.local.";

/// Most hosts one sweep reports.
pub(crate) const MAX_HOSTS: usize = 4096;
/// Most service types one sweep browses.
pub(crate) const MAX_SERVICE_TYPES: usize = 256;
/// Most service instances one host may hold.
pub(crate) const MAX_SERVICES_PER_HOST: usize = 32;
/// Most service instances one sweep holds across all hosts. With the other caps this bounds
/// what a hostile link can make a sweep hold to a few MiB.
pub(crate) const MAX_SERVICES_TOTAL: usize = 4096;
/// Most TXT records kept per service.
pub(crate) const MAX_TXT_PER_SERVICE: usize = 32;
/// Most bytes of TXT keys and values kept per service.
pub(crate) const MAX_TXT_BYTES_PER_SERVICE: usize = 1024;
/// Most IPv4 addresses kept per service and per host.
pub(crate) const MAX_ADDRESSES: usize = 16;
/// Longest string kept (a DNS name's limit), in bytes.
pub(crate) const MAX_STRING_BYTES: usize = 255;
/// How long the daemon may take to confirm its shutdown after the window.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// How often a browse refused by a full daemon command queue is retried.
const RETRY_INTERVAL: Duration = Duration::from_millis(20);

/// Tuning for one mDNS browse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MdnsConfig {
    /// Interfaces to browse on (the on-link scopes' interfaces). Empty browses nothing: an
    /// unrestricted daemon would also query links outside the site (an agent's uplink).
    pub interfaces: Vec<String>,
    /// Only hosts with an address inside these are kept, and only those addresses.
    pub scopes: Vec<Ipv4Net>,
    /// How long to listen, from the first query to the end of the browse.
    pub window: Duration,
}

impl Default for MdnsConfig {
    fn default() -> Self {
        MdnsConfig {
            interfaces: Vec::new(),
            scopes: Vec::new(),
            window: Duration::from_secs(3),
        }
    }
}

/// One host that advertised services.
#[derive(Debug, Clone, PartialEq)]
pub struct MdnsHost {
    /// Its IPv4 addresses inside the scopes, sorted (never empty).
    pub addresses: Vec<Ipv4Addr>,
    /// `host_name` (the SRV target as sent, e.g. `printer-1.local.`) and `services`
    /// (full instance name, type, port, TXT), sorted by type then instance.
    pub identity: v1::MdnsIdentity,
}

/// What one browse found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MdnsSweepResult {
    /// Sorted by host name.
    pub hosts: Vec<MdnsHost>,
    /// Service types seen (from `_services._dns-sd._udp.local.`), lowercase, sorted.
    pub service_types: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum MdnsError {
    #[error("cannot start mDNS browsing: {0}")]
    Daemon(String),
}

// === sweep ===

/// Browses `_services._dns-sd._udp.local.`, then each type found, for `cfg.window`, and
/// returns the hosts inside `cfg.scopes` with their services. Ends early (with what it has) on
/// `cancel`; returns at most `SHUTDOWN_GRACE` (1 s) after the window in any case.
#[instrument(skip_all, fields(interfaces = ?cfg.interfaces, window = ?cfg.window))]
pub async fn sweep(
    cfg: &MdnsConfig,
    cancel: &CancellationToken,
) -> Result<MdnsSweepResult, MdnsError> {
    if cfg.interfaces.is_empty() || cfg.scopes.is_empty() {
        debug!("no interface or no scope: nothing to browse");
        return Ok(MdnsSweepResult::default());
    }
    let now = tokio::time::Instant::now();
    // A window too large to add (a config typo) must not panic: a day is forever enough.
    let deadline = now
        .checked_add(cfg.window)
        .unwrap_or(now + Duration::from_secs(24 * 60 * 60));
    let daemon = Daemon::start(&cfg.interfaces)?;
    let result = browse(&daemon, cfg, deadline, cancel).await;
    daemon.shutdown().await;
    let collector = result?;
    let dropped = collector.dropped;
    let result = collector.finish();
    debug!(
        hosts = result.hosts.len(),
        service_types = result.service_types.len(),
        ?dropped,
        "mDNS browse done"
    );
    if dropped.over_cap() {
        warn!(
            ?dropped,
            "mDNS answers exceeded the sweep's limits; the excess was dropped"
        );
    }
    Ok(result)
}

/// The browse loop: the meta-query, then one browse per type, until the deadline.
async fn browse(
    daemon: &Daemon,
    cfg: &MdnsConfig,
    deadline: tokio::time::Instant,
    cancel: &CancellationToken,
) -> Result<Collector, MdnsError> {
    let mut collector = Collector::new(cfg.scopes.clone());
    let mut streams = StreamMap::new();
    let meta = daemon.browse(META_QUERY)?.ok_or_else(|| {
        MdnsError::Daemon("the mDNS daemon's command queue is full at start".to_string())
    })?;
    streams.insert(META_QUERY.to_string(), meta.into_stream());
    // Diagnostics only (a socket that cannot bind shows here, not as an error from `new`).
    let monitor = daemon.monitor();
    let mut monitor_open = monitor.is_some();
    let mut daemon_errors = 0_usize;
    // Types whose browse the daemon refused for a full command queue; retried on a tick.
    let mut pending: Vec<String> = Vec::new();
    let mut retry = tokio::time::interval(RETRY_INTERVAL);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => {
                debug!("cancelled");
                break;
            }
            () = tokio::time::sleep_until(deadline) => break,
            event = monitor_recv(monitor.as_ref()), if monitor_open => match event {
                Some(DaemonEvent::Error(e)) => {
                    daemon_errors += 1;
                    if daemon_errors == 1 {
                        warn!(error = %e, "mDNS daemon error");
                    } else {
                        debug!(error = %e, "mDNS daemon error");
                    }
                }
                Some(_) => {}
                None => monitor_open = false,
            },
            _ = retry.tick(), if !pending.is_empty() => {
                let mut still = Vec::new();
                for ty in pending.drain(..) {
                    match daemon.browse(&ty)? {
                        Some(rx) => {
                            streams.insert(ty, rx.into_stream());
                        }
                        None => still.push(ty),
                    }
                }
                pending = still;
            }
            next = streams.next() => {
                let Some((ty, event)) = next else {
                    // Every subscription ended: the daemon is gone (or dropped us).
                    warn!("the mDNS daemon ended every browse before the window closed");
                    break;
                };
                match event {
                    ServiceEvent::ServiceFound(_, name) if ty == META_QUERY => {
                        if let Some(found) = collector.add_type(&name) {
                            debug!(service_type = %found, "browsing");
                            match daemon.browse(&found)? {
                                Some(rx) => {
                                    streams.insert(found, rx.into_stream());
                                }
                                None => pending.push(found),
                            }
                        }
                    }
                    ServiceEvent::ServiceResolved(service) if ty != META_QUERY => {
                        collector.add_resolved(Resolved::from_service(&service));
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(collector)
}

/// The next daemon event; `None` once the monitor channel is closed (or was never opened).
async fn monitor_recv(monitor: Option<&mdns_sd::Receiver<DaemonEvent>>) -> Option<DaemonEvent> {
    monitor?.recv_async().await.ok()
}

// === impl Daemon ===

/// An mdns-sd daemon (an OS thread) that is always told to exit: by [`Daemon::shutdown`], or
/// when dropped (a cancelled sweep future). mdns-sd's thread holds a sender to its own command
/// channel, so without an explicit shutdown it would run, and hold port 5353, forever.
struct Daemon {
    inner: ServiceDaemon,
    down: bool,
}

impl Daemon {
    /// Starts a daemon that uses only the IPv4 addresses of `interfaces`.
    fn start(interfaces: &[String]) -> Result<Daemon, MdnsError> {
        let inner = ServiceDaemon::new().map_err(|e| MdnsError::Daemon(e.to_string()))?;
        // From here on a failure drops `daemon`, which shuts the thread down.
        let daemon = Daemon { inner, down: false };
        // Commands run in order on the daemon thread, so no query leaves before these apply.
        // `All` also covers loopback, which mdns-sd enables by default.
        let names = interfaces.to_vec();
        daemon
            .inner
            .disable_interface(IfKind::All)
            .and_then(|()| {
                daemon
                    .inner
                    .enable_interface(IfKind::Predicate(IfPredicate::new(move |intf| {
                        intf.ip().is_ipv4() && names.contains(&intf.name)
                    })))
            })
            .map_err(|e| MdnsError::Daemon(format!("restricting interfaces: {e}")))?;
        Ok(daemon)
    }

    /// Starts browsing `ty`; `None` when the daemon's command queue is full (retry later).
    fn browse(&self, ty: &str) -> Result<Option<mdns_sd::Receiver<ServiceEvent>>, MdnsError> {
        match self.inner.browse(ty) {
            Ok(rx) => Ok(Some(rx)),
            Err(mdns_sd::Error::Again) => Ok(None),
            Err(e) => Err(MdnsError::Daemon(format!("browsing {ty}: {e}"))),
        }
    }

    /// The daemon's event monitor, if it accepted the request.
    fn monitor(&self) -> Option<mdns_sd::Receiver<DaemonEvent>> {
        self.inner.monitor().ok()
    }

    /// Tells the daemon to exit and waits up to [`SHUTDOWN_GRACE`] for it to confirm.
    async fn shutdown(mut self) {
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        let status = loop {
            match self.inner.shutdown() {
                Ok(status) => break status,
                Err(mdns_sd::Error::Again) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(RETRY_INTERVAL).await;
                }
                Err(mdns_sd::Error::DaemonShutdown) => {
                    self.down = true;
                    return;
                }
                Err(e) => {
                    // `drop` tries once more, from a thread of its own.
                    warn!(error = %e, "cannot stop the mDNS daemon");
                    return;
                }
            }
        };
        // The command is queued: the thread exits once it reads it, whatever happens here.
        self.down = true;
        match tokio::time::timeout_at(deadline, status.recv_async()).await {
            Ok(Ok(DaemonStatus::Shutdown)) => {}
            Ok(other) => debug!(?other, "unexpected mDNS daemon status at shutdown"),
            Err(_) => warn!(
                grace = ?SHUTDOWN_GRACE,
                "the mDNS daemon did not confirm its shutdown in time"
            ),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.down {
            return;
        }
        match self.inner.shutdown() {
            Ok(_) | Err(mdns_sd::Error::DaemonShutdown) => {}
            Err(_) => {
                // The command queue is full. Retry briefly from a thread of our own: a drop
                // must not block the runtime.
                let inner = self.inner.clone();
                let spawned = std::thread::Builder::new()
                    .name("mdns-shutdown".to_string())
                    .spawn(move || {
                        for _ in 0..100 {
                            match inner.shutdown() {
                                Err(mdns_sd::Error::Again) => std::thread::sleep(RETRY_INTERVAL),
                                _ => return,
                            }
                        }
                    });
                if spawned.is_err() {
                    warn!("cannot stop the mDNS daemon");
                }
            }
        }
    }
}

// === impl Collector ===

/// One resolved instance as mdns-sd reports it, before any checks: the seam between the
/// daemon and [`Collector`], so the grouping logic is tested without a network.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Resolved {
    /// Full instance name, `Office Printer._ipp._tcp.local.`.
    pub(crate) fullname: String,
    /// `_ipp._tcp.local.`.
    pub(crate) service_type: String,
    /// The SRV target, `printer-1.local.`.
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) addresses: Vec<IpAddr>,
    /// Keys with their raw values (`None`: a boolean key); values need not be UTF-8.
    pub(crate) txt: Vec<(String, Option<Vec<u8>>)>,
}

impl Resolved {
    /// Copies what the collector can use: strings cut to their caps (the collector cleans
    /// again, which changes nothing), tables cut near theirs, IPv6 addresses left out.
    pub(crate) fn from_service(service: &ResolvedService) -> Resolved {
        Resolved {
            fullname: clean(&service.fullname),
            service_type: clean(&service.ty_domain),
            host: clean(&service.host),
            port: service.port,
            // Every address may be out of scope, so look at more than we keep.
            addresses: service
                .addresses
                .iter()
                .map(|a| a.to_ip_addr())
                .filter(IpAddr::is_ipv4)
                .take(MAX_ADDRESSES * 4)
                .collect(),
            txt: service
                .txt_properties
                .iter()
                .take(MAX_TXT_PER_SERVICE)
                .map(|p| (clean(p.key()), p.val().map(clean_bytes_prefix)))
                .collect(),
        }
    }
}

/// What the collector refused, by reason; logged after the sweep.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Dropped {
    /// Instances with no IPv4 address inside the scopes (normal on a shared link).
    out_of_scope: usize,
    /// Instances with an empty host, instance or type name.
    unnamed: usize,
    /// Meta-query answers that are not a browsable service type.
    bad_types: usize,
    /// Service types past [`MAX_SERVICE_TYPES`].
    types_over_cap: usize,
    /// Hosts past [`MAX_HOSTS`].
    hosts_over_cap: usize,
    /// Instances past [`MAX_SERVICES_PER_HOST`] or [`MAX_SERVICES_TOTAL`].
    services_over_cap: usize,
    /// TXT records past [`MAX_TXT_PER_SERVICE`] or [`MAX_TXT_BYTES_PER_SERVICE`].
    txt_over_cap: usize,
}

impl Dropped {
    /// True when a limit (not merely the scope) cut something.
    fn over_cap(&self) -> bool {
        self.types_over_cap + self.hosts_over_cap + self.services_over_cap + self.txt_over_cap > 0
    }
}

/// A host while the browse runs: its services keyed by lowercase instance name.
#[derive(Debug)]
struct HostEntry {
    /// The host name as first seen.
    name: String,
    services: Vec<ServiceEntry>,
}

#[derive(Debug)]
struct ServiceEntry {
    /// Lowercase full instance name (DNS names compare case-insensitively).
    key: String,
    service: v1::MdnsService,
    addresses: Vec<Ipv4Addr>,
}

/// Gathers one browse's answers into hosts, bounded whatever the link sends. No I/O.
#[derive(Debug)]
pub(crate) struct Collector {
    scopes: Vec<Ipv4Net>,
    /// Lowercase service types seen on the meta-query.
    types: BTreeSet<String>,
    /// By lowercase host name.
    hosts: BTreeMap<String, HostEntry>,
    /// Lowercase instance name -> lowercase host name it is filed under.
    instances: HashMap<String, String>,
    dropped: Dropped,
}

impl Collector {
    pub(crate) fn new(scopes: Vec<Ipv4Net>) -> Collector {
        Collector {
            scopes,
            types: BTreeSet::new(),
            hosts: BTreeMap::new(),
            instances: HashMap::new(),
            dropped: Dropped::default(),
        }
    }

    /// Records a type named by the meta-query. Returns its canonical form when it is a new,
    /// browsable type within the cap (the caller browses it), `None` otherwise.
    pub(crate) fn add_type(&mut self, name: &str) -> Option<String> {
        let Some(ty) = service_type_name(name) else {
            self.dropped.bad_types += 1;
            return None;
        };
        if self.types.contains(&ty) {
            return None;
        }
        if self.types.len() >= MAX_SERVICE_TYPES {
            self.dropped.types_over_cap += 1;
            return None;
        }
        self.types.insert(ty.clone());
        Some(ty)
    }

    /// Files one resolved instance under its host. A later resolution of the same instance
    /// replaces the earlier one (a changed TXT, port or host), so repeats never grow the
    /// result.
    pub(crate) fn add_resolved(&mut self, resolved: Resolved) {
        let mut addresses: Vec<Ipv4Addr> = resolved
            .addresses
            .iter()
            .filter_map(|a| match a {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .filter(|a| self.scopes.iter().any(|s| s.contains(a)))
            .collect();
        addresses.sort_unstable();
        addresses.dedup();
        addresses.truncate(MAX_ADDRESSES);
        if addresses.is_empty() {
            self.dropped.out_of_scope += 1;
            return;
        }
        let host = clean(&resolved.host);
        let instance = clean(&resolved.fullname);
        let service_type = clean(&resolved.service_type);
        if host.is_empty() || instance.is_empty() || service_type.is_empty() {
            self.dropped.unnamed += 1;
            return;
        }
        let host_key = host.to_lowercase();
        let key = instance.to_lowercase();
        let txt = self.txt_records(&resolved.txt);
        let entry = ServiceEntry {
            key: key.clone(),
            service: v1::MdnsService {
                instance,
                service_type,
                port: u32::from(resolved.port),
                txt,
            },
            addresses,
        };

        // A repeat under the same host: replace in place.
        if let Some(old_host) = self.instances.get(&key).cloned() {
            if old_host == host_key {
                if let Some(slot) = self
                    .hosts
                    .get_mut(&host_key)
                    .and_then(|h| h.services.iter_mut().find(|s| s.key == key))
                {
                    *slot = entry;
                }
                return;
            }
            // The instance moved to another host: take it off the old one.
            self.remove_instance(&old_host, &key);
        }

        if !self.hosts.contains_key(&host_key) && self.hosts.len() >= MAX_HOSTS {
            self.dropped.hosts_over_cap += 1;
            return;
        }
        if self.instances.len() >= MAX_SERVICES_TOTAL {
            self.dropped.services_over_cap += 1;
            return;
        }
        let entry_host = self
            .hosts
            .entry(host_key.clone())
            .or_insert_with(|| HostEntry {
                name: host,
                services: Vec::new(),
            });
        if entry_host.services.len() >= MAX_SERVICES_PER_HOST {
            self.dropped.services_over_cap += 1;
            return;
        }
        entry_host.services.push(entry);
        self.instances.insert(key, host_key);
    }

    fn remove_instance(&mut self, host_key: &str, key: &str) {
        self.instances.remove(key);
        if let Some(host) = self.hosts.get_mut(host_key) {
            host.services.retain(|s| s.key != key);
            if host.services.is_empty() {
                self.hosts.remove(host_key);
            }
        }
    }

    /// TXT records within the per-service caps; values as UTF-8 (invalid bytes replaced),
    /// boolean keys with an empty value.
    fn txt_records(&mut self, txt: &[(String, Option<Vec<u8>>)]) -> Vec<v1::TxtRecord> {
        let mut records = Vec::new();
        let mut bytes = 0_usize;
        for (key, value) in txt {
            let key = clean(key);
            if key.is_empty() {
                continue;
            }
            let value = value.as_deref().map(clean_bytes).unwrap_or_default();
            if records.len() >= MAX_TXT_PER_SERVICE
                || bytes + key.len() + value.len() > MAX_TXT_BYTES_PER_SERVICE
            {
                self.dropped.txt_over_cap += 1;
                break;
            }
            bytes += key.len() + value.len();
            records.push(v1::TxtRecord { key, value });
        }
        records
    }

    /// The result: hosts by name, each with its services by type then instance, and the
    /// union of their addresses.
    pub(crate) fn finish(self) -> MdnsSweepResult {
        let hosts = self
            .hosts
            .into_values()
            .map(|host| {
                let mut addresses: Vec<Ipv4Addr> = host
                    .services
                    .iter()
                    .flat_map(|s| s.addresses.iter().copied())
                    .collect();
                addresses.sort_unstable();
                addresses.dedup();
                addresses.truncate(MAX_ADDRESSES);
                let mut services: Vec<v1::MdnsService> =
                    host.services.into_iter().map(|s| s.service).collect();
                services.sort_by(|a, b| {
                    (&a.service_type, &a.instance).cmp(&(&b.service_type, &b.instance))
                });
                MdnsHost {
                    addresses,
                    identity: v1::MdnsIdentity {
                        host_name: host.name,
                        services,
                    },
                }
            })
            .collect();
        MdnsSweepResult {
            hosts,
            service_types: self.types.into_iter().collect(),
        }
    }
}

/// `name` in canonical form (lowercase, `_name._tcp.local.` or `_name._udp.local.`) when it
/// is a service type mdns-sd can browse; `None` for anything else (subtypes, the meta-query
/// itself, other domains, odd characters).
fn service_type_name(name: &str) -> Option<String> {
    if name.len() > MAX_STRING_BYTES {
        return None;
    }
    let name = name.to_ascii_lowercase();
    let rest = name
        .strip_suffix("._tcp.local.")
        .or_else(|| name.strip_suffix("._udp.local."))?;
    // RFC 6335 service names are at most 15 characters; allow up to a full label.
    let label = rest.strip_prefix('_')?;
    let ok = !label.is_empty()
        && label.len() < 64
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    ok.then_some(name)
}

/// `s` cut to at most [`MAX_STRING_BYTES`] bytes at a character boundary, with control
/// characters replaced (they have no business in names and would garble logs).
fn clean(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_STRING_BYTES));
    for c in s.chars() {
        let c = if c.is_control() {
            char::REPLACEMENT_CHARACTER
        } else {
            c
        };
        if out.len() + c.len_utf8() > MAX_STRING_BYTES {
            break;
        }
        out.push(c);
    }
    out
}

/// Raw bytes (a TXT value) as a [`clean`] string, invalid UTF-8 replaced.
fn clean_bytes(bytes: &[u8]) -> String {
    clean(&String::from_utf8_lossy(
        &bytes[..bytes.len().min(MAX_STRING_BYTES + 3)],
    ))
}

/// The prefix of `bytes` that [`clean_bytes`] can still use; copying only that bounds what
/// one TXT value costs.
fn clean_bytes_prefix(bytes: &[u8]) -> Vec<u8> {
    bytes[..bytes.len().min(MAX_STRING_BYTES + 3)].to_vec()
}

#[cfg(test)]
mod tests;
