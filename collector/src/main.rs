//! `census-collector`: parse the command line, start tracing, load and validate the config,
//! then serve until SIGINT/SIGTERM. A bad configuration exits 64 (EX_USAGE) with one line.

use std::{io::Write as _, net::SocketAddr, path::PathBuf, process::ExitCode};

use census_collector::{
    config::Config,
    metrics,
    server::{self, RunError},
    signal, telemetry,
};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing::info;

const EX_USAGE: u8 = 64;

/// mimalloc instead of the system allocator: the store copies and frees many large buffers
/// from every core (sled rewrites a page on each update), and glibc's malloc spent close to
/// half of the collector's CPU time on that under ingest (see tests/README.md, Benchmarks).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "census-collector",
    version,
    about = "The Census collector: stores agents' observations and answers count queries."
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CENSUS_COLLECTOR_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the collector.
    Serve(Settings),
    /// Check a configuration (file, environment and flags together) and exit.
    Validate(Settings),
}

/// Settings: a config file, overridden by `CENSUS_COLLECTOR_*` variables, overridden by flags.
#[derive(Debug, Args)]
struct Settings {
    /// TOML config file.
    #[arg(long, short = 'c', env = "CENSUS_COLLECTOR_CONFIG")]
    config: Option<PathBuf>,
    /// Directory for the store and the operator token (must exist).
    #[arg(long, env = "CENSUS_COLLECTOR_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address to listen on for gRPC [default: 127.0.0.1:7400].
    #[arg(long, env = "CENSUS_COLLECTOR_LISTEN")]
    listen: Option<SocketAddr>,
    /// Largest gRPC message accepted from an agent, in bytes [default: 4194304].
    #[arg(long, env = "CENSUS_COLLECTOR_MAX_MESSAGE_BYTES")]
    max_message_bytes: Option<usize>,
    /// Largest number of observations in one batch [default: 10000].
    #[arg(long, env = "CENSUS_COLLECTOR_MAX_BATCH_OBSERVATIONS")]
    max_batch_observations: Option<usize>,
    /// Most memory for the store's page cache, in MiB [default: 64].
    #[arg(long, env = "CENSUS_COLLECTOR_CACHE_MB")]
    cache_mb: Option<u64>,
    /// Time between two reads of each configured client's Entra ID users, e.g. 30m [default: 1h].
    #[arg(long, env = "CENSUS_COLLECTOR_GRAPH_INTERVAL", value_parser = humantime::parse_duration)]
    graph_interval: Option<std::time::Duration>,
    /// Longest one read of a client's Entra ID users may take, throttling included, e.g. 1h
    /// [default: 30m].
    #[arg(long, env = "CENSUS_COLLECTOR_GRAPH_READ_DEADLINE", value_parser = humantime::parse_duration)]
    graph_read_deadline: Option<std::time::Duration>,
    /// Serve Prometheus metrics (GET /metrics, plain HTTP) on this address, e.g.
    /// 127.0.0.1:7401 [default: none, no metrics served].
    #[arg(long, env = "CENSUS_COLLECTOR_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// A name or address agents and operators reach the collector by, for its server
    /// certificate (repeat for several; added to [tls] server_names).
    #[arg(long = "server-name", value_name = "NAME")]
    server_names: Vec<String>,
    /// Close an agent's stream when no whole batch arrives for this long, e.g. 2m [default: 2m].
    #[arg(long, env = "CENSUS_COLLECTOR_STREAM_IDLE_TIMEOUT", value_parser = humantime::parse_duration)]
    stream_idle_timeout: Option<std::time::Duration>,
    /// DEVELOPMENT ONLY: serve plaintext gRPC and take callers' certificates on their word.
    #[arg(long)]
    dev_plaintext: bool,
}

impl Settings {
    fn resolve(&self) -> Result<Config, RunError> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(v) = &self.data_dir {
            config.data_dir = Some(v.clone());
        }
        if let Some(v) = self.listen {
            config.listen = v;
        }
        if let Some(v) = self.max_message_bytes {
            config.max_message_bytes = v;
        }
        if let Some(v) = self.max_batch_observations {
            config.max_batch_observations = v;
        }
        if let Some(v) = self.cache_mb {
            config.cache_mb = v;
        }
        if let Some(v) = self.graph_interval {
            config.graph_interval = v;
        }
        if let Some(v) = self.graph_read_deadline {
            config.graph_read_deadline = v;
        }
        if let Some(v) = self.metrics_listen {
            config.metrics_listen = Some(v);
        }
        config
            .tls
            .server_names
            .extend(self.server_names.iter().cloned());
        if let Some(v) = self.stream_idle_timeout {
            config.stream_idle_timeout = v;
        }
        if self.dev_plaintext {
            config.dev_plaintext = true;
        }
        config.validate()?;
        Ok(config)
    }
}

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("census-collector: error: {message}");
    ExitCode::from(code)
}

fn main() -> ExitCode {
    let cli: Cli = match census_collector::cli::parse_args("census-collector") {
        Ok(c) => c,
        Err(code) => return code,
    };
    telemetry::init(matches!(cli.log_format, LogFormat::Json));
    match cli.command {
        Command::Validate(settings) => match settings.resolve() {
            Ok(config) => {
                println!(
                    "configuration is valid: listen {}, data dir {}",
                    config.listen,
                    config
                        .data_dir
                        .as_deref()
                        .map(|d| d.display().to_string())
                        .unwrap_or_default()
                );
                if let Some(m) = config.metrics_listen {
                    println!("metrics served on http://{m}/metrics");
                }
                for (client, graph) in config.graph_tenants().unwrap_or_default() {
                    println!(
                        "client {client}: Entra ID tenant {} every {}, secret from {}",
                        graph.tenant_id,
                        humantime::format_duration(config.graph_interval),
                        graph.client_secret
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(EX_USAGE, e),
        },
        Command::Serve(settings) => {
            let config = match settings.resolve() {
                Ok(c) => c,
                Err(e) => return fail(EX_USAGE, e),
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return fail(1, format!("cannot start the async runtime: {e}")),
            };
            runtime.block_on(serve(config))
        }
    }
}

async fn serve(config: Config) -> ExitCode {
    // Ready first, then bind: the store open (its log replayed) and the CA and the operator's
    // credentials written before the port accepts anything, so a load balancer's TCP check
    // and a first `census` both find a collector that can answer. Opening the store is what
    // refuses a second collector on the same directory.
    let prepared = match server::prepare(&config) {
        Ok(p) => p,
        Err(e @ RunError::Config(_)) => return fail(EX_USAGE, e),
        Err(e) => return fail(1, e),
    };
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            return fail(
                1,
                format!(
                    "cannot listen on {}: {e} (choose another address with --listen)",
                    config.listen
                ),
            );
        }
    };
    let metrics_listener = match config.metrics_listen {
        Some(addr) => match metrics::http::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                return fail(
                    1,
                    format!(
                        "cannot serve metrics on {addr}: {e} (choose another address with --metrics-listen)"
                    ),
                );
            }
        },
        None => None,
    };
    let (operator_dir, created) = prepared.pki.operator_dir();
    if created {
        info!(dir = %operator_dir.display(), "operator credentials made; `census` uses them (--credentials)");
    }
    let shutdown = CancellationToken::new();
    // Printed on stdout so scripts (and tests, with --listen HOST:0) learn the bound
    // addresses; the metrics line first, so whoever waits for "listening on" has both.
    if let Some(listener) = metrics_listener {
        if let Ok(addr) = listener.local_addr() {
            println!("metrics on http://{addr}/metrics");
        }
        let m = std::sync::Arc::clone(&prepared.metrics);
        metrics::http::serve(
            listener,
            std::sync::Arc::new(move || m.render()),
            shutdown.clone(),
        );
    }
    if let Ok(addr) = listener.local_addr() {
        println!("listening on {addr}");
    }
    let _ = std::io::stdout().flush();
    signal::spawn_shutdown_on_signal(shutdown.clone());
    match server::run(&config, prepared, listener, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(1, e),
    }
}
