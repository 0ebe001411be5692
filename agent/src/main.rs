//! `census-agent`: parse the command line, start tracing, load and validate the config, then
//! run until SIGINT/SIGTERM (or, with `--once`, until one sweep is delivered).
//!
//! Exit codes: 0 done; 64 bad flags or config; 69 collector unreachable; 77 a credential was
//! refused or raw sockets are not allowed; 1 anything else.

use std::{path::PathBuf, process::ExitCode};

use census_agent::{
    config::{self, Config, ConfigError},
    report::DeliveryError,
    run::{self, AgentError, RunOptions},
    signal, telemetry,
};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

const EX_USAGE: u8 = 64;
const EX_UNAVAILABLE: u8 = 69;
const EX_NOPERM: u8 = 77;

#[derive(Debug, Parser)]
#[command(
    name = "census-agent",
    version,
    about = "The Census site agent: discovers devices and reports them to the collector."
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CENSUS_AGENT_LOG_FORMAT")]
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
    /// Sweep the configured scopes and report to the collector.
    Run {
        #[command(flatten)]
        settings: Settings,
        /// Sweep once, wait until every batch is acknowledged, and exit.
        #[arg(long)]
        once: bool,
    },
    /// Check a configuration (file, environment and flags together) and exit.
    Validate {
        #[command(flatten)]
        settings: Settings,
    },
}

/// Settings: a config file, overridden by `CENSUS_AGENT_*` variables, overridden by flags.
#[derive(Debug, Args)]
struct Settings {
    /// TOML config file.
    #[arg(long, short = 'c', env = "CENSUS_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// The collector's gRPC URL, e.g. http://collector.example:7400.
    #[arg(long, env = "CENSUS_AGENT_COLLECTOR")]
    collector: Option<String>,
    /// Enrollment token (prefer --token-file: flags show up in process lists).
    #[arg(long, env = "CENSUS_AGENT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the enrollment token.
    #[arg(long, env = "CENSUS_AGENT_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// CIDRs to sweep, comma-separated (repeatable).
    #[arg(long, env = "CENSUS_AGENT_SCOPE", value_delimiter = ',')]
    scope: Vec<String>,
    /// CIDRs never to probe, comma-separated (repeatable).
    #[arg(long, env = "CENSUS_AGENT_EXCLUDE", value_delimiter = ',')]
    exclude: Vec<String>,
    /// Sweep only through this interface.
    #[arg(long, env = "CENSUS_AGENT_INTERFACE")]
    interface: Option<String>,
    /// Allow scopes larger than a /16.
    #[arg(long, env = "CENSUS_AGENT_ALLOW_LARGE_SCOPE")]
    allow_large_scope: bool,
    /// Directory for the agent's identity and sequence numbers (must exist).
    #[arg(long, env = "CENSUS_AGENT_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Time between sweeps, e.g. 15m [default: 15m].
    #[arg(long, env = "CENSUS_AGENT_INTERVAL", value_parser = config::parse_duration)]
    interval: Option<std::time::Duration>,
    /// ARP requests per second per interface [default: 2000].
    #[arg(long, env = "CENSUS_AGENT_ARP_RATE")]
    arp_rate: Option<u32>,
    /// Extra ARP rounds for silent addresses [default: 2].
    #[arg(long, env = "CENSUS_AGENT_ARP_RETRIES")]
    arp_retries: Option<u32>,
    /// Milliseconds to keep listening after the last ARP request [default: 1000].
    #[arg(long, env = "CENSUS_AGENT_ARP_REPLY_WINDOW_MS")]
    arp_reply_window_ms: Option<u64>,
}

impl Settings {
    fn resolve(&self) -> Result<Config, ConfigError> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if self.collector.is_some() {
            c.collector.clone_from(&self.collector);
        }
        if self.token.is_some() {
            c.token.clone_from(&self.token);
        }
        if self.token_file.is_some() {
            c.token_file.clone_from(&self.token_file);
        }
        if !self.scope.is_empty() {
            c.scopes = config::parse_cidrs(&self.scope.join(","))?;
        }
        if !self.exclude.is_empty() {
            c.exclude = config::parse_cidrs(&self.exclude.join(","))?;
        }
        if self.interface.is_some() {
            c.interface.clone_from(&self.interface);
        }
        c.allow_large_scope |= self.allow_large_scope;
        if self.state_dir.is_some() {
            c.state_dir.clone_from(&self.state_dir);
        }
        if let Some(v) = self.interval {
            c.interval = v;
        }
        if let Some(v) = self.arp_rate {
            c.arp.rate = v;
        }
        if let Some(v) = self.arp_retries {
            c.arp.retries = v;
        }
        if let Some(v) = self.arp_reply_window_ms {
            c.arp.reply_window_ms = v;
        }
        c.validate()?;
        Ok(c)
    }
}

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("census-agent: error: {message}");
    ExitCode::from(code)
}

fn exit_code(e: &AgentError) -> u8 {
    match e {
        AgentError::Config(_) | AgentError::Scope(_) | AgentError::State(_) => EX_USAGE,
        AgentError::Delivery(DeliveryError::Unreachable { .. }) => EX_UNAVAILABLE,
        AgentError::Delivery(DeliveryError::Refused(_)) | AgentError::Permission(_) => EX_NOPERM,
        _ => 1,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(matches!(cli.log_format, LogFormat::Json));
    match cli.command {
        Command::Validate { settings } => match settings.resolve() {
            Ok(c) => {
                println!(
                    "configuration is valid: collector {}, scopes {}",
                    c.collector.as_deref().unwrap_or_default(),
                    c.scopes
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(EX_USAGE, e),
        },
        Command::Run { settings, once } => {
            let config = match settings.resolve() {
                Ok(c) => c,
                Err(e) => return fail(EX_USAGE, e),
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return fail(1, format!("cannot start the async runtime: {e}")),
            };
            runtime.block_on(async {
                let shutdown = CancellationToken::new();
                signal::spawn_shutdown_on_signal(shutdown.clone());
                match run::run(config, RunOptions { once }, shutdown).await {
                    Ok(summary) => {
                        if once {
                            println!(
                                "swept {} addresses: {} answered, {} observations delivered",
                                summary.probed, summary.replies, summary.observations
                            );
                        }
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(exit_code(&e), e),
                }
            })
        }
    }
}
