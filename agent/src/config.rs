//! The agent's configuration: a TOML file, then `CENSUS_AGENT_*` environment variables, then
//! flags, each overriding the one before (the binary does the layering). [`Config::validate`]
//! checks everything that does not need the network and says in one line what to fix.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::Ipv4Net;
use serde::Deserialize;

/// Scopes wider than this prefix are refused unless `allow_large_scope` is set.
pub const MAX_SCOPE_PREFIX: u8 = 16;

/// Everything `census-agent run` needs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The collector's gRPC URL, e.g. `https://collector.example:7400` (mutual TLS).
    /// `http://` is plaintext, which only a collector in development mode accepts.
    pub collector: Option<String>,
    /// The enrollment token, used once to get the agent's certificate (`census-agent enroll`,
    /// or `run` when the agent has none yet); not needed once enrolled. Prefer `token_file`: a
    /// token in a config file is a secret at rest.
    pub token: Option<String>,
    /// A file holding the enrollment token.
    pub token_file: Option<PathBuf>,
    /// The collector's CA certificate (PEM; the collector's `<data dir>/tls/ca.pem`), trusted
    /// when enrolling over `https://`. Unset: this machine's trust store. Once enrolled, the
    /// agent trusts the CA the collector sent with its certificate.
    pub ca_file: Option<PathBuf>,
    /// CIDRs to sweep, e.g. `["198.18.0.0/24"]`.
    #[serde(default)]
    pub scopes: Vec<Ipv4Net>,
    /// Also sweep every on-link IPv4 subnet of these interfaces, e.g. `["eth0"]`.
    #[serde(default)]
    pub scope_interfaces: Vec<String>,
    /// CIDRs never to probe, even inside a scope.
    #[serde(default)]
    pub exclude: Vec<Ipv4Net>,
    /// Sweep only through this interface (default: the interface each scope is on-link on).
    pub interface: Option<String>,
    /// Allow scopes larger than a /16.
    #[serde(default)]
    pub allow_large_scope: bool,
    /// Where the agent keeps its certificate (`identity/`), agent id, sequence numbers and
    /// delivery queue. `run` and `enroll` need it; `scan` does not.
    pub state_dir: Option<PathBuf>,
    /// Time between sweeps, e.g. "15m".
    #[serde(default = "default_interval", with = "humantime_serde_compat")]
    pub interval: Duration,
    /// Address and port of the agent's Prometheus metrics endpoint (`GET /metrics`, plain
    /// HTTP, no authentication), e.g. `127.0.0.1:7402`; `None`, the default, serves none.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// ARP tuning.
    #[serde(default)]
    pub arp: ArpSettings,
    /// ICMP echo for routed scopes.
    #[serde(default)]
    pub icmp: IcmpSettings,
    /// SNMP identity, interfaces, ARP caches, forwarding tables and LLDP.
    #[serde(default)]
    pub snmp: SnmpSettings,
    /// mDNS / DNS-SD browsing.
    #[serde(default)]
    pub mdns: MdnsSettings,
    /// The site's Active Directory, read over LDAP for users (off unless enabled).
    #[serde(default)]
    pub directory: DirectorySettings,
    /// The delivery queue: its cap and the longest wait between delivery attempts.
    #[serde(default)]
    pub queue: QueueSettings,
}

/// The delivery queue (`[queue]`): batches wait in it, on disk in the state directory, until
/// the collector acknowledges them (see `queue.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSettings {
    /// The most the queued batches may take, in MiB (their encoded size). Reaching it drops
    /// the oldest batches, with a warn line and a counter.
    #[serde(default = "default_queue_max_mb")]
    pub max_mb: u64,
    /// The longest wait between delivery attempts while the collector cannot be reached, e.g.
    /// "5m": waits start at 1 s and double up to this, each with jitter.
    #[serde(default = "default_queue_retry_max", with = "humantime_serde_compat")]
    pub retry_max: Duration,
}

impl Default for QueueSettings {
    fn default() -> Self {
        QueueSettings {
            max_mb: default_queue_max_mb(),
            retry_max: default_queue_retry_max(),
        }
    }
}

/// The range of `queue.max_mb`: at least room for two of the largest batches (a gRPC message
/// is at most 4 MiB), at most 1 TiB.
pub const QUEUE_MAX_MB: std::ops::RangeInclusive<u64> = 8..=1_048_576;
/// The range of `queue.retry_max`.
pub const QUEUE_RETRY_MAX: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(3600);

impl QueueSettings {
    /// The cap in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.max_mb.saturating_mul(1024 * 1024)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        check(
            "queue.max_mb",
            self.max_mb,
            QUEUE_MAX_MB,
            "between 8 and 1048576 (MiB)",
        )?;
        if !QUEUE_RETRY_MAX.contains(&self.retry_max) {
            return Err(ConfigError::OutOfRange {
                key: "queue.retry_max",
                range: "between 1s and 1h",
                value: humantime::format_duration(self.retry_max).to_string(),
            });
        }
        Ok(())
    }
}

fn default_queue_max_mb() -> u64 {
    256
}
fn default_queue_retry_max() -> Duration {
    Duration::from_secs(300)
}

/// ARP sweep tuning.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArpSettings {
    /// Sweep on-link scopes with ARP.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The most requests per second, per interface, first requests, retries and checks
    /// together. A sweep starts at 1200 per second (or this, if lower) and speeds up toward it
    /// only while the addresses it asks again answer as fast as at the start; at 1200 or below,
    /// it is a fixed rate.
    #[serde(default = "default_arp_rate")]
    pub rate: u32,
    /// How many more times an address that stayed silent is asked.
    #[serde(default = "default_arp_retries")]
    pub retries: u32,
    /// The most the sweep keeps listening after its last request, in milliseconds: it listens
    /// 4x the highest reply latency it measured, at least 50 ms, and this long only while it
    /// has timed no reply (the wait before a silent address is asked again is likewise adaptive,
    /// at most 200 ms).
    #[serde(default = "default_arp_window_ms")]
    pub reply_window_ms: u64,
}

impl ArpSettings {
    /// The rate a sweep starts at: 1200 per second, or `rate` if lower (on Windows, the rate
    /// of resolutions throughout).
    pub fn start_rate(&self) -> u32 {
        self.rate.min(crate::probe::ARP_START_RATE_PPS)
    }
}

impl Default for ArpSettings {
    fn default() -> Self {
        ArpSettings {
            enabled: true,
            rate: default_arp_rate(),
            retries: default_arp_retries(),
            reply_window_ms: default_arp_window_ms(),
        }
    }
}

/// ICMP echo sweep tuning (routed scopes only: on-link addresses are ARP's job).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IcmpSettings {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Echo requests per second.
    #[serde(default = "default_icmp_rate")]
    pub rate: u32,
    /// Requests in flight at once.
    #[serde(default = "default_icmp_concurrency")]
    pub concurrency: usize,
    /// How long to wait for each reply, in milliseconds.
    #[serde(default = "default_icmp_timeout_ms")]
    pub timeout_ms: u64,
    /// Extra attempts for silent addresses.
    #[serde(default = "default_icmp_retries")]
    pub retries: u32,
}

impl Default for IcmpSettings {
    fn default() -> Self {
        IcmpSettings {
            enabled: true,
            rate: default_icmp_rate(),
            concurrency: default_icmp_concurrency(),
            timeout_ms: default_icmp_timeout_ms(),
            retries: default_icmp_retries(),
        }
    }
}

/// SNMP credentials and tuning. Communities are tried in order; then v3 users.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnmpSettings {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// v1/v2c communities, tried in order. Empty with no v3 users: SNMP is skipped.
    #[serde(default)]
    pub communities: Vec<String>,
    /// SNMPv3 users, tried after the communities.
    #[serde(default)]
    pub v3_users: Vec<SnmpV3User>,
    /// UDP port.
    #[serde(default = "default_snmp_port")]
    pub port: u16,
    /// How long to wait for each response, in milliseconds.
    #[serde(default = "default_snmp_timeout_ms")]
    pub timeout_ms: u64,
    /// Extra attempts after a timeout (each on a fresh session).
    #[serde(default = "default_snmp_retries")]
    pub retries: u32,
    /// Devices queried at once.
    #[serde(default = "default_snmp_concurrency")]
    pub concurrency: usize,
    /// GETBULK max-repetitions.
    #[serde(default = "default_snmp_max_repetitions")]
    pub max_repetitions: u32,
    /// Most rows read from one table of one device (ARP caches and FDBs can be huge).
    #[serde(default = "default_snmp_max_rows")]
    pub max_rows: usize,
}

impl Default for SnmpSettings {
    fn default() -> Self {
        SnmpSettings {
            enabled: true,
            communities: Vec::new(),
            v3_users: Vec::new(),
            port: default_snmp_port(),
            timeout_ms: default_snmp_timeout_ms(),
            retries: default_snmp_retries(),
            concurrency: default_snmp_concurrency(),
            max_repetitions: default_snmp_max_repetitions(),
            max_rows: default_snmp_max_rows(),
        }
    }
}

/// One SNMPv3 user (USM). Without `auth_protocol` it is noAuthNoPriv; with it and without
/// `priv_protocol`, authNoPriv; with both, authPriv.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnmpV3User {
    pub name: String,
    /// "md5", "sha" (SHA-1), "sha224", "sha256", "sha384" or "sha512".
    pub auth_protocol: Option<String>,
    pub auth_password: Option<String>,
    /// "des", "aes" (AES-128), "aes192" or "aes256".
    pub priv_protocol: Option<String>,
    pub priv_password: Option<String>,
}

impl std::fmt::Debug for SnmpV3User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnmpV3User")
            .field("name", &self.name)
            .field("auth_protocol", &self.auth_protocol)
            .field("priv_protocol", &self.priv_protocol)
            .finish_non_exhaustive()
    }
}

/// mDNS / DNS-SD browsing tuning.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MdnsSettings {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How long to listen for answers, in milliseconds.
    #[serde(default = "default_mdns_window_ms")]
    pub window_ms: u64,
}

impl Default for MdnsSettings {
    fn default() -> Self {
        MdnsSettings {
            enabled: true,
            window_ms: default_mdns_window_ms(),
        }
    }
}

/// Where the agent reads the site's Active Directory users (`[directory]`). The bind password
/// is deliberately not a setting: it comes from `password_file` or the
/// `CENSUS_AGENT_DIRECTORY_PASSWORD` environment variable, never from a flag (visible in `ps`) or
/// this file (which is often world-readable and copied around). What a read does with these is
/// in `directory.rs`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectorySettings {
    /// Read the directory at all.
    #[serde(default)]
    pub enabled: bool,
    /// `ldaps://dc1.corp.example:636`, or `ldap://dc1.corp.example:389` with `starttls`.
    pub url: Option<String>,
    /// Upgrade an `ldap://` connection with StartTLS before binding.
    #[serde(default)]
    pub starttls: bool,
    /// Allow `ldap://` without StartTLS. Off by default because a simple bind then sends the
    /// bind password across the network in clear, to anyone on the path.
    #[serde(default)]
    pub allow_plaintext: bool,
    /// The account to bind as: a DN (`CN=census,OU=Service,DC=corp,DC=example`) or a UPN
    /// (`census@corp.example`).
    pub bind_dn: Option<String>,
    /// A file holding the bind password (one line). Without it, the password comes from
    /// `CENSUS_AGENT_DIRECTORY_PASSWORD`.
    pub password_file: Option<PathBuf>,
    /// Where to search for users, e.g. `DC=corp,DC=example`; unset reads the directory's
    /// `defaultNamingContext` (the whole domain).
    pub base_dn: Option<String>,
    /// PEM file of the CA(s) that issued the directory's certificate; unset trusts the
    /// platform's store (on a domain-joined Windows machine, that holds the domain's CA).
    pub ca_file: Option<PathBuf>,
    /// DANGER, for labs only: accept any certificate, so anyone on the path can impersonate
    /// the directory and collect the bind password.
    #[serde(default)]
    pub insecure_skip_verify: bool,
    /// Entries per page of the paged search (Active Directory serves at most 1000).
    #[serde(default = "default_directory_page_size")]
    pub page_size: u32,
    /// The most any one step (connect and TLS, bind, one page) may take, in milliseconds.
    #[serde(default = "default_directory_timeout_ms")]
    pub timeout_ms: u64,
    /// A read finding more users than this fails rather than sending them all.
    #[serde(default = "default_directory_max_users")]
    pub max_users: usize,
    /// Time between reads by `census-agent run`, e.g. "1h": one at start, then one every
    /// interval (a failed read too waits the whole interval: retrying a refused bind sooner
    /// could lock the bind account out).
    #[serde(
        default = "default_directory_interval",
        with = "humantime_serde_compat"
    )]
    pub interval: Duration,
}

impl Default for DirectorySettings {
    fn default() -> Self {
        DirectorySettings {
            enabled: false,
            url: None,
            starttls: false,
            allow_plaintext: false,
            bind_dn: None,
            password_file: None,
            base_dn: None,
            ca_file: None,
            insecure_skip_verify: false,
            page_size: default_directory_page_size(),
            timeout_ms: default_directory_timeout_ms(),
            max_users: default_directory_max_users(),
            interval: default_directory_interval(),
        }
    }
}

/// Where the bind password comes from when `directory.password_file` is unset.
pub const DIRECTORY_PASSWORD_ENV: &str = "CENSUS_AGENT_DIRECTORY_PASSWORD";

/// The shortest `directory.interval`: a read of a large directory takes a while and loads the
/// domain controller, and users change on a scale of hours.
pub const MIN_DIRECTORY_INTERVAL: Duration = Duration::from_secs(60);
/// The longest `directory.interval`: the collector needs a fresh read to keep users current.
pub const MAX_DIRECTORY_INTERVAL: Duration = Duration::from_secs(7 * 24 * 3600);

impl DirectorySettings {
    /// Checks a `[directory]` that is enabled (a disabled one may be incomplete): the URL's
    /// scheme and TLS, the bind account, where the password comes from, the CA file, the
    /// ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        let bad = |message: String| Err(ConfigError::Directory(message));
        let Some(url) = self.url.as_deref().map(str::trim).filter(|u| !u.is_empty()) else {
            return bad("set directory.url (e.g. ldaps://dc1.corp.example:636)".into());
        };
        let lower = url.to_ascii_lowercase();
        if lower.starts_with("ldaps://") {
            if self.starttls {
                return bad(format!(
                    "directory.url {url} is already TLS (ldaps://): starttls is for ldap:// only"
                ));
            }
        } else if lower.starts_with("ldap://") {
            if !self.starttls && !self.allow_plaintext {
                return bad(format!(
                    "directory.url {url} is plaintext: the bind password would cross the network \
                     in clear; use ldaps://, or set starttls = true (or allow_plaintext = true if \
                     you really mean it)"
                ));
            }
        } else {
            return bad(format!(
                "directory.url {url:?} must start with ldaps:// (or ldap:// with starttls)"
            ));
        }
        if self.bind_dn.as_deref().is_none_or(|d| d.trim().is_empty()) {
            return bad(
                "set directory.bind_dn (a DN or user@domain): Active Directory lists users only \
                 to an authenticated account"
                    .into(),
            );
        }
        match &self.password_file {
            Some(path) if !path.is_file() => {
                return bad(format!(
                    "directory.password_file {} is not a readable file",
                    path.display()
                ));
            }
            Some(_) => {}
            None if std::env::var_os(DIRECTORY_PASSWORD_ENV).is_none() => {
                return bad(format!(
                    "no directory bind password: set directory.password_file, or \
                     {DIRECTORY_PASSWORD_ENV}"
                ));
            }
            None => {}
        }
        if let Some(ca) = &self.ca_file {
            if self.insecure_skip_verify {
                return bad(
                    "set either directory.ca_file or directory.insecure_skip_verify, not both"
                        .into(),
                );
            }
            if !ca.is_file() {
                return bad(format!(
                    "directory.ca_file {} is not a readable file",
                    ca.display()
                ));
            }
        }
        check(
            "directory.page_size",
            self.page_size,
            1..=1000,
            "between 1 and 1000 (Active Directory serves at most 1000 entries a page)",
        )?;
        check(
            "directory.timeout_ms",
            self.timeout_ms,
            100..=300_000,
            "between 100 and 300000",
        )?;
        check(
            "directory.max_users",
            self.max_users,
            1..=1_000_000,
            // A read is sent in batches of 100 users, and the collector takes reads of at most
            // 10,000 batches.
            "between 1 and 1000000",
        )?;
        if !(MIN_DIRECTORY_INTERVAL..=MAX_DIRECTORY_INTERVAL).contains(&self.interval) {
            return bad(format!(
                "directory.interval must be between 1m and 7days, got {}: set e.g. \
                 interval = \"1h\" under [directory]",
                humantime::format_duration(self.interval)
            ));
        }
        Ok(())
    }
}

fn default_directory_page_size() -> u32 {
    500
}
fn default_directory_timeout_ms() -> u64 {
    10_000
}
fn default_directory_max_users() -> usize {
    200_000
}
fn default_directory_interval() -> Duration {
    Duration::from_secs(3600)
}

fn yes() -> bool {
    true
}
fn default_icmp_rate() -> u32 {
    1000
}
/// Silent targets hold their slot for the whole timeout, so the rate can reach at most
/// concurrency / timeout: 1024 in flight sustains the default 1000 pps at a 1 s timeout.
fn default_icmp_concurrency() -> usize {
    1024
}
fn default_icmp_timeout_ms() -> u64 {
    1000
}
fn default_icmp_retries() -> u32 {
    1
}
fn default_snmp_port() -> u16 {
    161
}
fn default_snmp_timeout_ms() -> u64 {
    1000
}
fn default_snmp_retries() -> u32 {
    1
}
fn default_snmp_concurrency() -> usize {
    32
}
fn default_snmp_max_repetitions() -> u32 {
    25
}
fn default_snmp_max_rows() -> usize {
    10_000
}
fn default_mdns_window_ms() -> u64 {
    3000
}

fn default_interval() -> Duration {
    Duration::from_secs(15 * 60)
}
/// The same as `probe::arp::DEFAULT_RATE_PPS` (see there why, and how a sweep gets there).
fn default_arp_rate() -> u32 {
    6000
}
/// The same as `probe::arp::DEFAULT_RETRIES`: a silent address is asked twice, as arp-scan and
/// nmap ask it.
fn default_arp_retries() -> u32 {
    1
}
fn default_arp_window_ms() -> u64 {
    1000
}

/// `interval = "15m"` in TOML, through humantime.
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// Parses a duration such as "90s", "15m" or "1h 30m".
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration ({e}; use e.g. 90s, 15m, 1h)"))
}

impl Default for Config {
    fn default() -> Self {
        Config {
            collector: None,
            token: None,
            token_file: None,
            ca_file: None,
            scopes: Vec::new(),
            scope_interfaces: Vec::new(),
            exclude: Vec::new(),
            interface: None,
            allow_large_scope: false,
            state_dir: None,
            interval: default_interval(),
            metrics_listen: None,
            arp: ArpSettings::default(),
            icmp: IcmpSettings::default(),
            snmp: SnmpSettings::default(),
            mdns: MdnsSettings::default(),
            directory: DirectorySettings::default(),
            queue: QueueSettings::default(),
        }
    }
}

/// What is wrong with a configuration, phrased as what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "no collector: pass --collector URL, set CENSUS_AGENT_COLLECTOR, or set collector in the config file"
    )]
    NoCollector,
    #[error(
        "collector URL {0:?} must start with https:// (or http:// for a collector in development mode)"
    )]
    BadCollector(String),
    #[error(
        "no enrollment token: pass --token-file FILE (or --token), set CENSUS_AGENT_TOKEN, or set token_file in the config file"
    )]
    NoToken,
    #[error(
        "no state directory: the agent's certificate, id and queue live there; pass --state-dir DIR, set CENSUS_AGENT_STATE_DIR, or set state_dir in the config file"
    )]
    NoStateDir,
    #[error(
        "this agent is not enrolled (no certificate in {}) and has no enrollment token: run `census-agent enroll --collector URL --token-file FILE --state-dir DIR`, or set token_file so that `run` enrolls first",
        .0.display()
    )]
    NotEnrolled(PathBuf),
    #[error(
        "ca_file {} is not a readable file (the collector's CA certificate, its <data dir>/tls/ca.pem)",
        .0.display()
    )]
    CaFile(PathBuf),
    #[error("cannot read token file {path}: {source}")]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "nothing to sweep: pass --scope CIDR[,CIDR...] or --scope-interface IF, or set scopes in the config file"
    )]
    NoScope,
    #[error("{0:?} is not a CIDR (expected e.g. 198.18.0.0/24)")]
    BadCidr(String),
    #[error(
        "scope {scope} is larger than a /{MAX_SCOPE_PREFIX} ({hosts} addresses): narrow it, or pass --allow-large-scope if you mean it"
    )]
    ScopeTooLarge { scope: Ipv4Net, hosts: u64 },
    #[error("interval must be at least 10s, got {0:?}")]
    Interval(Duration),
    #[error("arp.rate must be between 1 and 100000 packets per second, got {0}")]
    ArpRate(u32),
    #[error("arp.retries must be at most 10, got {0}")]
    ArpRetries(u32),
    #[error("arp.reply_window_ms must be between 10 and 60000, got {0}")]
    ArpWindow(u64),
    #[error(
        "state directory {0} does not exist: create it or point --state-dir at an existing directory"
    )]
    StateDir(PathBuf),
    #[error("{key} must be {range}, got {value}")]
    OutOfRange {
        key: &'static str,
        range: &'static str,
        value: String,
    },
    #[error(
        "every discovery method is disabled: enable at least one of arp, icmp, snmp, mdns, or enable [directory] for an agent that only reads the directory"
    )]
    NoMethod,
    #[error("SNMPv3 user {user:?}: {message}")]
    SnmpUser { user: String, message: String },
    #[error("{0}")]
    Directory(String),
}

fn check<T: PartialOrd + std::fmt::Display>(
    key: &'static str,
    value: T,
    range: std::ops::RangeInclusive<T>,
    text: &'static str,
) -> Result<(), ConfigError> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::OutOfRange {
            key,
            range: text,
            value: value.to_string(),
        })
    }
}

impl SnmpV3User {
    /// Checks protocol names and passwords (USM needs at least 8 characters): the SNMP probe's
    /// own parser decides, so what validates is exactly what the probe can use.
    pub fn validate(&self) -> Result<(), ConfigError> {
        crate::probe::snmp::validate_v3_user(self).map_err(|message| ConfigError::SnmpUser {
            user: self.name.clone(),
            message,
        })
    }
}

/// Parses a comma-separated list of CIDRs; a bare address is a /32.
pub fn parse_cidrs(text: &str) -> Result<Vec<Ipv4Net>, ConfigError> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<Ipv4Net>()
                .or_else(|_| s.parse::<std::net::Ipv4Addr>().map(Ipv4Net::from))
                .map(|n| n.trunc())
                .map_err(|_| ConfigError::BadCidr(s.chars().take(64).collect()))
        })
        .collect()
}

impl Config {
    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.message().to_owned(),
        })?;
        for net in config.scopes.iter_mut().chain(config.exclude.iter_mut()) {
            *net = net.trunc();
        }
        Ok(config)
    }

    /// Checks everything that can be checked without the network. Whether the agent has a
    /// certificate or a token to get one is `enroll::plan`'s question, not this one's.
    ///
    /// An agent sweeps when a discovery method is enabled, and then needs a scope; with every
    /// method disabled it is valid only with `[directory]` enabled, and reads only the
    /// directory (an agent on a domain controller's site there for the directory alone).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_collector()?;
        if self.sweeps() {
            self.validate_sweep()?;
        } else if self.directory.enabled {
            self.validate_settings()?;
        } else {
            return Err(ConfigError::NoMethod);
        }
        self.queue.validate()?;
        self.directory.validate()
    }

    /// Whether any discovery method is enabled: whether `run` sweeps at all.
    pub fn sweeps(&self) -> bool {
        self.arp.enabled || self.icmp.enabled || self.snmp.enabled || self.mdns.enabled
    }

    /// Checks what reaching the collector needs: its URL (`https://`, or `http://` for a
    /// development-mode collector) and, when set, the CA file. Enough for `census-agent enroll`.
    pub fn validate_collector(&self) -> Result<(), ConfigError> {
        let url = self.collector.as_deref().ok_or(ConfigError::NoCollector)?;
        let lower = url.to_ascii_lowercase();
        let rest = lower
            .strip_prefix("https://")
            .or_else(|| lower.strip_prefix("http://"));
        if rest.is_none_or(|r| r.trim_end_matches('/').is_empty()) {
            return Err(ConfigError::BadCollector(url.to_owned()));
        }
        if let Some(ca) = &self.ca_file
            && !ca.is_file()
        {
            return Err(ConfigError::CaFile(ca.clone()));
        }
        Ok(())
    }

    /// The one warning line a plaintext collector URL deserves, if it is one.
    pub fn collector_warning(&self) -> Option<String> {
        let url = self.collector.as_deref()?;
        url.to_ascii_lowercase().starts_with("http://").then(|| {
            format!(
                "collector URL {url} is plaintext (http://): only a collector in development \
                 mode (--dev-plaintext) accepts it; use https:// in production"
            )
        })
    }

    /// Checks what a sweep needs (scopes, methods, state), not what delivery needs: enough for
    /// `census-agent scan`.
    pub fn validate_sweep(&self) -> Result<(), ConfigError> {
        if self.scopes.is_empty() && self.scope_interfaces.is_empty() && self.sweeps() {
            return Err(ConfigError::NoScope);
        }
        if !self.sweeps() {
            return Err(ConfigError::NoMethod);
        }
        self.validate_settings()
    }

    /// Checks the settings themselves (scope sizes, the interval, each method's tuning, the
    /// state directory), whether or not a sweep uses them.
    fn validate_settings(&self) -> Result<(), ConfigError> {
        self.check_scope_sizes(&self.scopes)?;
        if self.interval < Duration::from_secs(10) {
            return Err(ConfigError::Interval(self.interval));
        }
        if !(1..=100_000).contains(&self.arp.rate) {
            return Err(ConfigError::ArpRate(self.arp.rate));
        }
        if self.arp.retries > 10 {
            return Err(ConfigError::ArpRetries(self.arp.retries));
        }
        if !(10..=60_000).contains(&self.arp.reply_window_ms) {
            return Err(ConfigError::ArpWindow(self.arp.reply_window_ms));
        }
        if let Some(dir) = &self.state_dir
            && !dir.is_dir()
        {
            return Err(ConfigError::StateDir(dir.clone()));
        }
        check(
            "icmp.rate",
            self.icmp.rate,
            1..=100_000,
            "between 1 and 100000",
        )?;
        check(
            "icmp.concurrency",
            self.icmp.concurrency,
            1..=4096,
            "between 1 and 4096",
        )?;
        check(
            "icmp.timeout_ms",
            self.icmp.timeout_ms,
            10..=60_000,
            "between 10 and 60000",
        )?;
        check("icmp.retries", self.icmp.retries, 0..=10, "at most 10")?;
        check(
            "snmp.port",
            self.snmp.port,
            1..=u16::MAX,
            "between 1 and 65535",
        )?;
        check(
            "snmp.timeout_ms",
            self.snmp.timeout_ms,
            10..=60_000,
            "between 10 and 60000",
        )?;
        check("snmp.retries", self.snmp.retries, 0..=5, "at most 5")?;
        check(
            "snmp.concurrency",
            self.snmp.concurrency,
            1..=1024,
            "between 1 and 1024",
        )?;
        check(
            "snmp.max_repetitions",
            self.snmp.max_repetitions,
            1..=100,
            "between 1 and 100",
        )?;
        check(
            "snmp.max_rows",
            self.snmp.max_rows,
            1..=1_000_000,
            "between 1 and 1000000",
        )?;
        check(
            "mdns.window_ms",
            self.mdns.window_ms,
            100..=60_000,
            "between 100 and 60000",
        )?;
        if let Some(c) = self
            .snmp
            .communities
            .iter()
            .find(|c| c.is_empty() || c.len() > 255)
        {
            return Err(ConfigError::OutOfRange {
                key: "snmp.communities",
                range: "1 to 255 characters each",
                value: format!("{} characters", c.len()),
            });
        }
        for user in &self.snmp.v3_users {
            user.validate()?;
        }
        Ok(())
    }

    /// Refuses scopes wider than a /16 unless `allow_large_scope` says otherwise.
    pub fn check_scope_sizes(&self, scopes: &[Ipv4Net]) -> Result<(), ConfigError> {
        for scope in scopes {
            if scope.prefix_len() < MAX_SCOPE_PREFIX && !self.allow_large_scope {
                return Err(ConfigError::ScopeTooLarge {
                    scope: *scope,
                    hosts: 1u64 << (32 - u32::from(scope.prefix_len())),
                });
            }
        }
        Ok(())
    }

    /// The enrollment token, from `token` or `token_file`.
    pub fn token(&self) -> Result<String, ConfigError> {
        if let Some(t) = self
            .token
            .as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            return Ok(t.to_owned());
        }
        let path = self.token_file.as_ref().ok_or(ConfigError::NoToken)?;
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::TokenFile {
            path: path.clone(),
            source,
        })?;
        let t = text.trim();
        if t.is_empty() {
            return Err(ConfigError::NoToken);
        }
        Ok(t.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Config {
        Config {
            collector: Some("http://198.19.255.1:7400".into()),
            token: Some("cen1_x".into()),
            scopes: parse_cidrs("198.18.0.0/24").expect("cidr"),
            ..Config::default()
        }
    }

    #[test]
    fn cidrs_parse_and_truncate() {
        let nets = parse_cidrs("198.18.0.7/24, 198.18.1.1").expect("cidrs");
        assert_eq!(nets[0].to_string(), "198.18.0.0/24");
        assert_eq!(nets[1].to_string(), "198.18.1.1/32");
        assert!(matches!(
            parse_cidrs("198.18.0.0/33"),
            Err(ConfigError::BadCidr(_))
        ));
        assert!(matches!(
            parse_cidrs("banana"),
            Err(ConfigError::BadCidr(_))
        ));
    }

    #[test]
    fn large_scopes_need_consent() {
        let mut c = valid();
        c.scopes = parse_cidrs("198.18.0.0/15").expect("cidr");
        let err = c.validate().expect_err("too large").to_string();
        assert!(err.contains("--allow-large-scope"), "{err}");
        c.allow_large_scope = true;
        c.validate().expect("allowed");
    }

    #[test]
    fn missing_pieces_are_named() {
        assert!(matches!(
            Config::default().validate(),
            Err(ConfigError::NoCollector)
        ));
        let mut c = valid();
        c.token = None;
        c.validate()
            .expect("a token is for enrollment: run's identity check is enroll::plan");
        let mut c = valid();
        c.scopes.clear();
        assert!(matches!(c.validate(), Err(ConfigError::NoScope)));
        let mut c = valid();
        c.collector = Some("198.19.255.1:7400".into());
        assert!(matches!(c.validate(), Err(ConfigError::BadCollector(_))));
    }

    #[test]
    fn the_collector_url_and_ca_file_are_checked() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut c = valid();
        assert!(
            c.collector_warning()
                .expect("plaintext warns")
                .contains("development mode")
        );
        c.collector = Some("https://collector.example:7400".into());
        c.validate().expect("https");
        assert_eq!(c.collector_warning(), None);
        for bad in ["ftp://x:1", "https://", "collector:7400", ""] {
            c.collector = Some(bad.into());
            let err = c.validate().expect_err(bad).to_string();
            assert!(err.contains("must start with https://"), "{bad}: {err}");
        }
        c.collector = Some("HTTPS://Collector.Example".into());
        c.validate().expect("schemes are case-insensitive");
        c.ca_file = Some(tmp.path().join("missing.pem"));
        let err = c.validate_collector().expect_err("missing").to_string();
        assert!(
            err.contains("missing.pem") && err.contains("tls/ca.pem"),
            "{err}"
        );
        std::fs::write(tmp.path().join("ca.pem"), "x").expect("write");
        c.ca_file = Some(tmp.path().join("ca.pem"));
        c.validate().expect("a readable CA file");
        let parsed: Config =
            toml::from_str("ca_file = \"/etc/census/agent-ca.pem\"\n").expect("parses");
        assert_eq!(
            parsed.ca_file.as_deref(),
            Some(Path::new("/etc/census/agent-ca.pem"))
        );
    }

    #[test]
    fn file_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "collector = \"http://198.19.255.1:7400\"\ntoken = \"t\"\nscopes = [\"198.18.0.9/24\"]\ninterval = \"5m\"\n[arp]\nrate = 500\n",
        )
        .expect("write");
        let c = Config::from_file(&path).expect("parses");
        assert_eq!(c.scopes[0].to_string(), "198.18.0.0/24");
        assert_eq!(c.interval, Duration::from_secs(300));
        assert_eq!(c.arp.rate, 500);
        assert_eq!(c.arp.retries, 1);
        std::fs::write(&path, "colector = \"x\"\n").expect("write");
        let err = Config::from_file(&path).expect_err("unknown").to_string();
        assert!(err.contains("colector"), "{err}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn the_example_config_parses() {
        let c: Config = toml::from_str(include_str!("../../deploy/config/agent.toml"))
            .expect("deploy/config/agent.toml parses");
        assert_eq!(c.scopes.len(), 1);
        assert_eq!(c.interval, Duration::from_secs(900));
        assert!(!c.directory.enabled);
        assert_eq!(c.directory.interval, Duration::from_secs(3600));
        assert_eq!(
            c.metrics_listen,
            Some(SocketAddr::from(([127, 0, 0, 1], 7402)))
        );
        assert_eq!(Config::default().metrics_listen, None);
        assert_eq!(c.queue, QueueSettings::default());
        assert_eq!(
            c.arp,
            ArpSettings::default(),
            "the example shows the defaults"
        );
    }

    #[test]
    fn queue_settings_are_parsed_and_checked() {
        let c: Config =
            toml::from_str("[queue]\nmax_mb = 64\nretry_max = \"30s\"\n").expect("parses");
        assert_eq!(c.queue.max_bytes(), 64 * 1024 * 1024);
        assert_eq!(c.queue.retry_max, Duration::from_secs(30));
        let d = Config::default().queue;
        assert_eq!((d.max_mb, d.retry_max), (256, Duration::from_secs(300)));
        let mut c = valid();
        c.validate().expect("defaults are valid");
        c.queue.max_mb = 4;
        assert_eq!(
            c.validate().expect_err("too small").to_string(),
            "queue.max_mb must be between 8 and 1048576 (MiB), got 4"
        );
        c.queue.max_mb = 8;
        c.queue.retry_max = Duration::from_secs(7200);
        assert_eq!(
            c.validate().expect_err("too long").to_string(),
            "queue.retry_max must be between 1s and 1h, got 2h"
        );
        let bad = toml::from_str::<Config>("[queue]\nmax_bytes = 1\n")
            .expect_err("unknown key")
            .to_string();
        assert!(bad.contains("max_bytes"), "{bad}");
    }

    #[test]
    fn method_settings_are_checked() {
        let mut c = valid();
        c.icmp.rate = 0;
        assert!(
            c.validate()
                .expect_err("rate 0")
                .to_string()
                .contains("icmp.rate")
        );
        let mut c = valid();
        c.arp.enabled = false;
        c.icmp.enabled = false;
        c.snmp.enabled = false;
        c.mdns.enabled = false;
        assert!(matches!(c.validate(), Err(ConfigError::NoMethod)));
        let user = |auth: Option<&str>, pass: &str, privacy: Option<&str>| SnmpV3User {
            name: "census".into(),
            auth_protocol: auth.map(Into::into),
            auth_password: auth.map(|_| pass.into()),
            priv_protocol: privacy.map(Into::into),
            priv_password: privacy.map(|_| pass.into()),
        };
        assert!(
            user(Some("sha256"), "longenough", Some("aes"))
                .validate()
                .is_ok()
        );
        assert!(user(None, "x", None).validate().is_ok(), "noAuthNoPriv");
        let mut stray = user(None, "x", None);
        stray.auth_password = Some("a password without a protocol".into());
        assert!(stray.validate().is_err());
        assert!(user(Some("sha"), "short", None).validate().is_err());
        assert!(user(Some("sha3"), "longenough", None).validate().is_err());
        assert!(user(None, "longenough", Some("aes")).validate().is_err());
        assert!(
            user(Some("md5"), "longenough", Some("blowfish"))
                .validate()
                .is_err()
        );
        assert!(!format!("{:?}", user(Some("md5"), "secretpass", None)).contains("secretpass"));
    }
}

#[cfg(test)]
mod directory_tests {
    use super::*;

    fn enabled(dir: &Path) -> DirectorySettings {
        let password = dir.join("password");
        std::fs::write(&password, "secret\n").expect("write");
        DirectorySettings {
            enabled: true,
            url: Some("ldaps://198.18.0.10:636".into()),
            bind_dn: Some("census@lab.census.test".into()),
            password_file: Some(password),
            ..DirectorySettings::default()
        }
    }

    fn err(d: &DirectorySettings) -> String {
        d.validate().expect_err("invalid").to_string()
    }

    #[test]
    fn an_agent_with_no_discovery_method_is_valid_only_to_read_the_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut c = Config {
            collector: Some("https://198.19.255.1:7400".into()),
            directory: enabled(tmp.path()),
            ..Config::default()
        };
        c.arp.enabled = false;
        c.icmp.enabled = false;
        c.snmp.enabled = false;
        c.mdns.enabled = false;
        assert!(!c.sweeps());
        c.validate()
            .expect("directory only: no scope, no method, still valid");
        // Its settings are still checked, and a sweep (`scan`) still needs a method.
        c.arp.rate = 0;
        assert!(
            c.validate()
                .expect_err("arp.rate")
                .to_string()
                .contains("rate")
        );
        c.arp.rate = 1000;
        assert!(matches!(c.validate_sweep(), Err(ConfigError::NoMethod)));
        // With the directory off as well, there is nothing to do: one line says both ways out.
        c.directory.enabled = false;
        let e = c.validate().expect_err("nothing to do").to_string();
        assert!(
            e.contains("arp, icmp, snmp, mdns") && e.contains("[directory]"),
            "{e}"
        );
        // A method enabled needs a scope again.
        c.directory.enabled = true;
        c.mdns.enabled = true;
        assert!(matches!(c.validate(), Err(ConfigError::NoScope)));
    }

    #[test]
    fn a_disabled_directory_needs_nothing() {
        let d = DirectorySettings::default();
        assert!(!d.enabled);
        assert_eq!(d.page_size, 500);
        d.validate().expect("disabled is valid");
    }

    #[test]
    fn plaintext_needs_starttls_or_consent() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut d = enabled(tmp.path());
        d.validate().expect("ldaps is valid");
        d.url = Some("ldap://198.18.0.10".into());
        assert!(err(&d).contains("in clear"), "{}", err(&d));
        d.starttls = true;
        d.validate().expect("StartTLS is valid");
        d.starttls = false;
        d.allow_plaintext = true;
        d.validate().expect("plaintext by consent");
        d.url = Some("ldaps://198.18.0.10".into());
        d.starttls = true;
        assert!(err(&d).contains("starttls"), "{}", err(&d));
        d.starttls = false;
        d.url = Some("http://198.18.0.10".into());
        assert!(err(&d).contains("ldaps://"), "{}", err(&d));
        d.url = None;
        assert!(err(&d).contains("directory.url"), "{}", err(&d));
    }

    #[test]
    fn the_bind_account_password_and_ranges_are_checked() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut d = enabled(tmp.path());
        d.bind_dn = Some(" ".into());
        assert!(err(&d).contains("bind_dn"));
        let mut d = enabled(tmp.path());
        d.password_file = Some(tmp.path().join("missing"));
        assert!(err(&d).contains("password_file"));
        let mut d = enabled(tmp.path());
        d.page_size = 1001;
        assert!(err(&d).contains("directory.page_size"));
        d.page_size = 0;
        assert!(err(&d).contains("directory.page_size"));
        let mut d = enabled(tmp.path());
        d.timeout_ms = 10;
        assert!(err(&d).contains("directory.timeout_ms"));
        let mut d = enabled(tmp.path());
        d.max_users = 1_000_001;
        assert!(err(&d).contains("directory.max_users"), "{}", err(&d));
        let mut d = enabled(tmp.path());
        assert_eq!(d.interval, Duration::from_secs(3600), "hourly by default");
        d.interval = Duration::from_secs(59);
        let e = err(&d);
        assert!(
            e.starts_with("directory.interval must be between 1m and 7days, got 59s")
                && e.contains("interval = \"1h\""),
            "{e}"
        );
        d.interval = Duration::from_secs(7 * 24 * 3600 + 1);
        assert!(err(&d).contains("directory.interval"), "{}", err(&d));
        d.interval = MIN_DIRECTORY_INTERVAL;
        d.validate().expect("a minute is enough");
        d.interval = MAX_DIRECTORY_INTERVAL;
        d.validate().expect("a week is not too long");
        // Not checked while the directory is off.
        d.interval = Duration::ZERO;
        d.enabled = false;
        d.validate().expect("disabled");
        // Config::validate checks the directory too (as `census-agent validate` does).
        let tmp2 = tempfile::tempdir().expect("tempdir");
        let mut c = Config {
            collector: Some("http://198.19.255.1:7400".into()),
            token: Some("cen1_x".into()),
            scopes: parse_cidrs("198.18.0.0/24").expect("cidr"),
            directory: enabled(tmp2.path()),
            ..Config::default()
        };
        c.validate().expect("valid");
        c.directory.interval = Duration::from_secs(10);
        assert!(
            c.validate()
                .expect_err("too often")
                .to_string()
                .contains("directory.interval")
        );
        let mut d = enabled(tmp.path());
        d.ca_file = Some(tmp.path().join("password"));
        d.validate()
            .expect("any readable file is a CA file to validate");
        d.insecure_skip_verify = true;
        assert!(err(&d).contains("not both"));
        d.ca_file = Some(tmp.path().join("missing.pem"));
        d.insecure_skip_verify = false;
        assert!(err(&d).contains("ca_file"));
    }

    #[test]
    fn the_section_parses_and_refuses_a_password() {
        let c: Config = toml::from_str(
            "[directory]\nenabled = true\nurl = \"ldaps://198.18.0.10\"\nbind_dn = \"a@b\"\n\
             password_file = \"/run/pw\"\npage_size = 100\n",
        )
        .expect("parses");
        assert!(c.directory.enabled);
        assert_eq!(c.directory.page_size, 100);
        assert_eq!(c.directory.timeout_ms, 10_000);
        assert_eq!(c.directory.max_users, 200_000);
        assert_eq!(c.directory.interval, Duration::from_secs(3600));
        let c: Config = toml::from_str("[directory]\ninterval = \"30m\"\n").expect("parses");
        assert_eq!(c.directory.interval, Duration::from_secs(1800));
        let bad = toml::from_str::<Config>("[directory]\ninterval = \"often\"\n")
            .expect_err("not a duration")
            .to_string();
        assert!(bad.contains("is not a duration"), "{bad}");
        let refused = toml::from_str::<Config>("[directory]\npassword = \"hunter2\"\n")
            .expect_err("no password in the file")
            .to_string();
        assert!(refused.contains("password_file"), "{refused}");
    }
}
