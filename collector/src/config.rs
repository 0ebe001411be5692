//! The collector's configuration: a TOML file, then `CENSUS_COLLECTOR_*` environment
//! variables, then flags, each overriding the one before. [`Config::validate`] says in one line
//! what is wrong and how to fix it.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::graph::GraphSettings;

/// Default gRPC listen address: loopback only, so a fresh install exposes nothing.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7400";
/// Default largest gRPC message accepted from an agent.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Default largest number of observations in one batch.
pub const DEFAULT_MAX_BATCH_OBSERVATIONS: usize = 10_000;
/// Default bound of the store's page cache, in MiB. sled's memory is several times its cache
/// (page table, segment bookkeeping), so the default is small: ingest ran as fast with 64 MiB
/// as with 1 GiB on the collector benchmark, and counts are served from memory of their own.
/// The write buffer in front of sled (the write-ahead log's) holds up to twice this.
pub const DEFAULT_CACHE_MB: u64 = 64;
/// Default longest time an agent's stream may go without a whole batch.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Default time between two reads of a client's Entra ID users.
pub const DEFAULT_GRAPH_INTERVAL: Duration = Duration::from_secs(60 * 60);
/// Default longest time one read of a client's Entra ID users may take, throttling included.
pub const DEFAULT_GRAPH_READ_DEADLINE: Duration = Duration::from_secs(30 * 60);
/// Shortest and longest `graph_read_deadline` accepted.
pub const GRAPH_READ_DEADLINE_RANGE: (Duration, Duration) =
    (Duration::from_secs(60), Duration::from_secs(6 * 60 * 60));
/// Shortest and longest `graph_interval` accepted.
pub const GRAPH_INTERVAL_RANGE: (Duration, Duration) = (
    Duration::from_secs(60),
    Duration::from_secs(7 * 24 * 60 * 60),
);

/// Everything `census-collector serve` needs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address and port the gRPC server listens on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Directory holding the store and the operator token. Must exist.
    pub data_dir: Option<PathBuf>,
    /// Largest gRPC message accepted, in bytes.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Largest number of observations in one batch; larger batches are refused.
    #[serde(default = "default_max_batch_observations")]
    pub max_batch_observations: usize,
    /// The most memory the store's page cache may use, in MiB. It bounds the collector's
    /// memory however many devices it holds; what does not fit is read from disk.
    #[serde(default = "default_cache_mb")]
    pub cache_mb: u64,
    /// Time between two reads of each configured client's Entra ID users (the first read is
    /// at start), e.g. "1h".
    #[serde(
        default = "default_graph_interval",
        with = "crate::graph::humantime_serde_compat"
    )]
    pub graph_interval: Duration,
    /// The longest one read of a client's Entra ID users may take, waits for throttling
    /// included, e.g. "30m"; a read that runs out is stored as failed (the users are kept,
    /// marked stale) and tried again at the next interval.
    #[serde(
        default = "default_graph_read_deadline",
        with = "crate::graph::humantime_serde_compat"
    )]
    pub graph_read_deadline: Duration,
    /// Address and port of the Prometheus metrics endpoint (`GET /metrics`, plain HTTP, no
    /// authentication); `None`, the default, serves none. Keep it on loopback or a
    /// monitoring network.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// The longest an agent's Report stream may go without a whole batch arriving (a stalled
    /// or abandoned stream) before the collector closes it, e.g. "2m".
    #[serde(
        default = "default_stream_idle_timeout",
        with = "crate::graph::humantime_serde_compat"
    )]
    pub stream_idle_timeout: Duration,
    /// Mutual TLS: the server certificate's names and, optionally, the MSP's own CA.
    #[serde(default)]
    pub tls: crate::pki::TlsSettings,
    /// Serve plaintext gRPC, with callers' certificates taken on their word: for development
    /// only, never across a network. Off by default; the collector says so loudly when on.
    #[serde(default)]
    pub dev_plaintext: bool,
    /// Per-client settings, by client name: `[clients.acme.graph]` reads acme's Entra ID users.
    #[serde(default)]
    pub clients: BTreeMap<String, ClientSettings>,
}

/// What the collector does for one client on its own.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSettings {
    /// Read the client's Microsoft 365 / Entra ID users through Microsoft Graph (see
    /// [`GraphSettings`]; the licence allow-list belongs to the client's user policy).
    pub graph: Option<GraphSettings>,
}

fn default_listen() -> SocketAddr {
    DEFAULT_LISTEN
        .parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 7400)))
}
fn default_max_message_bytes() -> usize {
    DEFAULT_MAX_MESSAGE_BYTES
}
fn default_max_batch_observations() -> usize {
    DEFAULT_MAX_BATCH_OBSERVATIONS
}
fn default_cache_mb() -> u64 {
    DEFAULT_CACHE_MB
}
fn default_graph_interval() -> Duration {
    DEFAULT_GRAPH_INTERVAL
}
fn default_graph_read_deadline() -> Duration {
    DEFAULT_GRAPH_READ_DEADLINE
}
fn default_stream_idle_timeout() -> Duration {
    DEFAULT_STREAM_IDLE_TIMEOUT
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: default_listen(),
            data_dir: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_batch_observations: DEFAULT_MAX_BATCH_OBSERVATIONS,
            cache_mb: DEFAULT_CACHE_MB,
            graph_interval: DEFAULT_GRAPH_INTERVAL,
            graph_read_deadline: DEFAULT_GRAPH_READ_DEADLINE,
            metrics_listen: None,
            stream_idle_timeout: DEFAULT_STREAM_IDLE_TIMEOUT,
            tls: crate::pki::TlsSettings::default(),
            dev_plaintext: false,
            clients: BTreeMap::new(),
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
        "no data directory: pass --data-dir DIR, set CENSUS_COLLECTOR_DATA_DIR, or set data_dir in the config file"
    )]
    NoDataDir,
    #[error(
        "data directory {0} does not exist: create it (mkdir -p {0}) or point --data-dir at an existing directory"
    )]
    DataDirMissing(PathBuf),
    #[error("data directory {0} is not a directory")]
    DataDirNotDir(PathBuf),
    #[error("max_message_bytes must be between 64 KiB and 64 MiB, got {0}")]
    MessageSize(usize),
    #[error(
        "max_batch_observations must be between 1000 and 100000 (agents send up to 500 per batch), got {0}"
    )]
    BatchSize(usize),
    #[error("cache_mb must be between 16 and 1048576 (MiB), got {0}")]
    CacheSize(u64),
    #[error("graph_interval must be between 1m and 7days, got {0}")]
    GraphInterval(String),
    #[error("graph_read_deadline must be between 1m and 6h, got {0}")]
    GraphReadDeadline(String),
    #[error(
        "metrics_listen {metrics} is the gRPC listen address too: give the metrics endpoint a port of its own"
    )]
    MetricsListen { metrics: SocketAddr },
    #[error("stream_idle_timeout must be between 1s and 1h, got {0}")]
    StreamIdle(String),
    #[error("clients.{client}: {message}")]
    Client { client: String, message: String },
}

impl Config {
    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            // toml's messages span several lines with a caret; one line is enough here.
            message: e.message().to_owned()
                + &e.span()
                    .map(|s| format!(" (at byte {})", s.start))
                    .unwrap_or_default(),
        })
    }

    /// Checks everything that can be checked before opening anything.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let dir = self.data_dir.as_ref().ok_or(ConfigError::NoDataDir)?;
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(ConfigError::DataDirNotDir(dir.clone())),
            Err(_) => return Err(ConfigError::DataDirMissing(dir.clone())),
        }
        if !(64 * 1024..=64 * 1024 * 1024).contains(&self.max_message_bytes) {
            return Err(ConfigError::MessageSize(self.max_message_bytes));
        }
        if !(1000..=100_000).contains(&self.max_batch_observations) {
            return Err(ConfigError::BatchSize(self.max_batch_observations));
        }
        if !(16..=1024 * 1024).contains(&self.cache_mb) {
            return Err(ConfigError::CacheSize(self.cache_mb));
        }
        let (lo, hi) = GRAPH_INTERVAL_RANGE;
        if !(lo..=hi).contains(&self.graph_interval) {
            return Err(ConfigError::GraphInterval(
                humantime::format_duration(self.graph_interval).to_string(),
            ));
        }
        let (lo, hi) = GRAPH_READ_DEADLINE_RANGE;
        if !(lo..=hi).contains(&self.graph_read_deadline) {
            return Err(ConfigError::GraphReadDeadline(
                humantime::format_duration(self.graph_read_deadline).to_string(),
            ));
        }
        if let Some(m) = self.metrics_listen
            && m == self.listen
            && m.port() != 0
        {
            return Err(ConfigError::MetricsListen { metrics: m });
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&self.stream_idle_timeout)
        {
            return Err(ConfigError::StreamIdle(
                humantime::format_duration(self.stream_idle_timeout).to_string(),
            ));
        }
        self.graph_tenants()?;
        Ok(())
    }

    /// The clients whose Entra ID users the collector reads, with their settings checked and
    /// in canonical form.
    pub fn graph_tenants(&self) -> Result<BTreeMap<String, GraphSettings>, ConfigError> {
        let mut out = BTreeMap::new();
        for (client, settings) in &self.clients {
            let bad = |message: String| ConfigError::Client {
                client: client.clone(),
                message,
            };
            crate::model::validate_name("client", client).map_err(|e| bad(e.to_string()))?;
            let Some(graph) = &settings.graph else {
                continue;
            };
            if !graph.licence_allow_list.is_empty() {
                return Err(bad(format!(
                    "graph.licence_allow_list belongs to the client's user policy, where it is versioned: remove it here and run `census users policy set --client {client} --licences {}`",
                    graph.licence_allow_list.join(",")
                )));
            }
            let checked = graph.clone().validated().map_err(|e| {
                let lines: Vec<String> = e.0.iter().map(ToString::to_string).collect();
                bad(format!("graph: {}", lines.join("; ")))
            })?;
            out.insert(client.clone(), checked);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_values_and_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            format!("data_dir = {:?}\nlisten = \"0.0.0.0:9000\"\n", dir.path()),
        )
        .expect("write");
        let c = Config::from_file(&path).expect("parses");
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.max_batch_observations, DEFAULT_MAX_BATCH_OBSERVATIONS);
        assert_eq!(c.cache_mb, DEFAULT_CACHE_MB);
        c.validate().expect("valid");
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "listn = \"0.0.0.0:9000\"\n").expect("write");
        let err = Config::from_file(&path)
            .expect_err("unknown field")
            .to_string();
        assert!(err.contains("listn") && !err.contains('\n'), "{err}");
        let missing = Config {
            data_dir: Some(dir.path().join("nope")),
            ..Config::default()
        };
        assert!(matches!(
            missing.validate(),
            Err(ConfigError::DataDirMissing(_))
        ));
        assert!(matches!(
            Config::default().validate(),
            Err(ConfigError::NoDataDir)
        ));
        let tiny_cache = Config {
            data_dir: Some(dir.path().to_owned()),
            cache_mb: 1,
            ..Config::default()
        };
        assert!(matches!(
            tiny_cache.validate(),
            Err(ConfigError::CacheSize(1))
        ));
    }

    #[test]
    fn tls_settings_and_stream_idle_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            format!(
                "data_dir = {:?}\nstream_idle_timeout = \"30s\"\n[tls]\nserver_names = [\"census.msp.example\"]\n",
                dir.path()
            ),
        )
        .expect("write");
        let c = Config::from_file(&path).expect("parses");
        assert_eq!(c.tls.server_names, ["census.msp.example"]);
        assert_eq!(c.stream_idle_timeout, Duration::from_secs(30));
        assert!(!c.dev_plaintext, "plaintext is never the default");
        c.validate().expect("valid");
        let zero = Config {
            stream_idle_timeout: Duration::ZERO,
            ..c
        };
        assert!(matches!(zero.validate(), Err(ConfigError::StreamIdle(_))));
        std::fs::write(&path, "[tls]\nserver_name = \"x\"\n").expect("write");
        let err = Config::from_file(&path)
            .expect_err("unknown key")
            .to_string();
        assert!(err.contains("server_name"), "{err}");
    }

    #[test]
    fn the_example_config_parses() {
        let c: Config = toml::from_str(include_str!("../../deploy/config/collector.toml"))
            .expect("deploy/config/collector.toml parses");
        assert_eq!(c.listen.port(), 7400);
        assert_eq!(
            c.metrics_listen,
            Some(SocketAddr::from(([127, 0, 0, 1], 7401)))
        );
        assert_eq!(c.graph_read_deadline, DEFAULT_GRAPH_READ_DEADLINE);
    }

    #[test]
    fn the_graph_read_deadline_is_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let with = |deadline: Duration| Config {
            data_dir: Some(dir.path().to_owned()),
            graph_read_deadline: deadline,
            ..Config::default()
        };
        assert!(with(Duration::from_secs(3600)).validate().is_ok());
        for bad in [Duration::from_secs(59), Duration::from_secs(7 * 3600)] {
            let err = with(bad).validate().expect_err("out of range").to_string();
            assert!(
                err.starts_with("graph_read_deadline must be between 1m and 6h"),
                "{err}"
            );
        }
    }

    #[test]
    fn metrics_are_off_by_default_and_need_a_port_of_their_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, format!("data_dir = {:?}\n", dir.path())).expect("write");
        let c = Config::from_file(&path).expect("parses");
        assert_eq!(c.metrics_listen, None);
        let same = Config {
            metrics_listen: Some(c.listen),
            ..c.clone()
        };
        assert!(matches!(
            same.validate(),
            Err(ConfigError::MetricsListen { .. })
        ));
        let own = Config {
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 7401))),
            ..c
        };
        own.validate().expect("valid");
    }
}
