//! `census-agent`: parse the command line, start tracing, load and validate the config, then
//! run until SIGINT/SIGTERM (or, with `--once`, until one sweep is delivered). `install` and
//! `uninstall` set the agent up as a service (`service.rs`); on Windows the hidden `service`
//! command is what the registered service runs: the same `run`, stopped by the service's Stop.
//!
//! `enroll` trades an enrollment token for the agent's certificate (`enroll.rs`); `run` enrolls
//! first by itself when it has a token and no certificate.
//!
//! Exit codes: 0 done; 64 bad flags or config (or a state directory, or queue or identity in
//! it, that cannot be used; `enroll` on an enrolled agent without --force); 69 collector
//! unreachable; 75 `--once` stopped (a signal) before every
//! batch was acknowledged (with a state directory, what is left stays queued for the next
//! run); 77 a credential was refused (the enrollment token by `enroll`, the certificate by
//! `run --once`) or raw sockets are not allowed; 1 anything else. A failed directory read (`users`, or `run --once` after
//! delivering everything, the failed read included) exits by the same scheme, see
//! [`directory_exit_code`]: 64 its settings (URL, password file, CA file, a certificate that is
//! not trusted or names another host, too many users), 69 the directory unreachable, silent or
//! failing TLS, 77 the bind refused, 75 stopped by a signal, 1 otherwise (a failed search).

use std::{io::IsTerminal as _, net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc};

use census_agent::{
    config::{self, Config, ConfigError},
    directory::{self, DirectoryError},
    enroll::{self, EnrollError},
    metrics_http::{self, AgentMetrics},
    queue::QueueError,
    report::DeliveryError,
    run::{self, AgentError, RunOptions},
    service::{self, ServiceError},
    signal, telemetry,
};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

/// `println!` that ends the program quietly when stdout is closed early (`census-agent scan
/// --json | head`) instead of panicking, and in one line on any other write error.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            eprintln!("census-agent: error: cannot write the output: {e}");
            std::process::exit(1);
        }
    }};
}

const EX_USAGE: u8 = 64;
const EX_UNAVAILABLE: u8 = 69;
const EX_TEMPFAIL: u8 = 75;
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
    /// Trade an enrollment token for this agent's certificate (once per agent).
    ///
    /// Makes a new key pair, sends a certificate request with the token to the collector, and
    /// keeps the certificate, the key and the collector's CA in <state dir>/identity/. `run`
    /// then delivers with that certificate (mutual TLS). `run` also enrolls by itself on its
    /// first start when it has a token and no certificate yet.
    Enroll {
        #[command(flatten)]
        args: EnrollArgs,
    },
    /// Sweep the configured scopes (and read the directory, when enabled) and report to the
    /// collector.
    Run {
        #[command(flatten)]
        settings: Settings,
        /// Sweep once, wait until every batch is acknowledged, and exit.
        #[arg(long)]
        once: bool,
    },
    /// Sweep once and print what was found, without a collector (for onboarding a site).
    Scan {
        #[command(flatten)]
        settings: Settings,
        /// Print one JSON object per device instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Read the directory's users once and print them, without a collector (to set up the bind
    /// account).
    ///
    /// Reads with `[directory]` of the config file, whether or not it is enabled, and sends
    /// nothing anywhere.
    Users {
        #[command(flatten)]
        settings: Settings,
        /// Print one JSON document (the read and every user) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check a configuration (file, environment and flags together) and exit.
    Validate {
        #[command(flatten)]
        settings: Settings,
    },
    /// Install the agent as a service: a systemd unit on Linux, a Windows service on Windows.
    ///
    /// Linux: places this binary in /usr/local/bin, the unit in /etc/systemd/system and an
    /// example config in /etc/census/agent.toml if there is none (an existing config is never
    /// overwritten), then runs systemctl daemon-reload and enable. Windows: places the binary in
    /// %ProgramFiles%\Census, the example config in %ProgramData%\Census, and registers the
    /// service (automatic start, restart on failure).
    Install {
        #[command(flatten)]
        paths: ServicePaths,
        /// Also start the service now (only if its config validates).
        #[arg(long)]
        now: bool,
    },
    /// Stop and remove the service and its binary; config and state stay unless --purge.
    Uninstall {
        #[command(flatten)]
        paths: ServicePaths,
        /// Also remove the config, the enrollment token and the state directory.
        #[arg(long)]
        purge: bool,
    },
    /// Run as the Windows service (what `install` registers: the service control manager
    /// starts it; Stop and Shutdown stop the agent as SIGTERM does).
    #[cfg(windows)]
    #[command(hide = true)]
    Service {
        #[command(flatten)]
        settings: Settings,
    },
}

/// Where `install` puts things (and `uninstall` removes them from): the platform's places by
/// default; tests point them at a temp dir.
#[derive(Debug, Args)]
struct ServicePaths {
    /// The systemd unit directory (Linux) [default: /etc/systemd/system].
    #[arg(long)]
    unit_dir: Option<PathBuf>,
    /// Where the binary goes [default: /usr/local/bin; Windows: %ProgramFiles%\Census].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The config file; the enrollment token (agent.token) is beside it [default:
    /// /etc/census/agent.toml; Windows: %ProgramData%\Census\agent.toml].
    #[arg(long)]
    config_path: Option<PathBuf>,
    /// The state directory, removed by uninstall --purge [default: /var/lib/census-agent;
    /// Windows: %ProgramData%\Census\state].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Only place (or remove) the files; do not run systemctl (Linux).
    #[arg(long)]
    no_systemctl: bool,
    /// install: the collector's CA certificate (its <data dir>/tls/ca.pem), copied beside
    /// the config as agent-ca.pem for the service's first start to enroll with.
    #[arg(long)]
    ca_file: Option<PathBuf>,
}

/// The config file and how the agent reaches the collector and enrolls, which `enroll` and
/// every command of [`Settings`] share.
#[derive(Debug, Args)]
struct Connection {
    /// TOML config file.
    #[arg(long, short = 'c', env = "CENSUS_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// The collector's gRPC URL, e.g. https://collector.example:7400.
    #[arg(long, env = "CENSUS_AGENT_COLLECTOR")]
    collector: Option<String>,
    /// Enrollment token, needed only while the agent has no certificate yet (prefer
    /// --token-file: flags show up in process lists).
    #[arg(long, env = "CENSUS_AGENT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the enrollment token (from `census token create --client C --site S`),
    /// needed only while the agent has no certificate yet.
    #[arg(long, env = "CENSUS_AGENT_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The collector's CA certificate (its <data dir>/tls/ca.pem), to trust it by when
    /// enrolling over https:// (needed: the agent trusts no other CA).
    #[arg(long, env = "CENSUS_AGENT_CA_FILE")]
    ca_file: Option<PathBuf>,
}

impl Connection {
    /// The config file (or the defaults) with these flags over it.
    fn layered(&self) -> Result<Config, ConfigError> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        override_with(&mut c.collector, &self.collector);
        override_with(&mut c.token, &self.token);
        override_with(&mut c.token_file, &self.token_file);
        override_with(&mut c.ca_file, &self.ca_file);
        Ok(c)
    }
}

/// `enroll`'s settings: a config file (only its collector, token, CA and state settings are
/// used), overridden by `CENSUS_AGENT_*` variables, overridden by flags.
#[derive(Debug, Args)]
struct EnrollArgs {
    #[command(flatten)]
    connection: Connection,
    /// Where the identity is kept (<state dir>/identity/); created if missing.
    #[arg(long, env = "CENSUS_AGENT_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Enroll again although this agent already has a certificate (a new key, a new token).
    #[arg(long)]
    force: bool,
}

impl EnrollArgs {
    fn resolve(&self) -> Result<Config, ConfigError> {
        let mut c = self.connection.layered()?;
        override_with(&mut c.state_dir, &self.state_dir);
        c.validate_collector()?;
        if c.state_dir.is_none() {
            return Err(ConfigError::NoStateDir);
        }
        Ok(c)
    }
}

fn override_with<T: Clone>(setting: &mut Option<T>, flag: &Option<T>) {
    if flag.is_some() {
        setting.clone_from(flag);
    }
}

/// `census-agent enroll`: one line on success, one error line otherwise.
fn enroll(args: &EnrollArgs) -> ExitCode {
    let prepared = args.resolve().and_then(|c| {
        let token = c.token()?;
        Ok((c, token))
    });
    let (config, token) = match prepared {
        Ok(p) => p,
        Err(e) => return fail(EX_USAGE, e),
    };
    if let Some(w) = config.collector_warning() {
        eprintln!("census-agent: warning: {w}");
    }
    let state_dir = config.state_dir.clone().unwrap_or_default();
    let ready = enroll::check_not_enrolled(&state_dir, args.force)
        .and_then(|()| enroll::config_ca(&config));
    let ca = match ready {
        Ok(ca) => ca,
        Err(e) => return fail(enroll_exit_code(&e), e),
    };
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let url = config.collector.clone().unwrap_or_default();
    match runtime.block_on(enroll::enroll(&url, &token, ca.as_deref(), &state_dir)) {
        Ok(enrolled) => {
            out!("{}", enrolled.line());
            ExitCode::SUCCESS
        }
        Err(e) => fail(enroll_exit_code(&e), e),
    }
}

/// An enrollment failure's exit code, by the scheme of [`exit_code`].
fn enroll_exit_code(e: &EnrollError) -> u8 {
    match e.kind() {
        enroll::ErrorKind::Usage => EX_USAGE,
        enroll::ErrorKind::Unavailable => EX_UNAVAILABLE,
        enroll::ErrorKind::Refused => EX_NOPERM,
        enroll::ErrorKind::Other => 1,
    }
}

impl ServicePaths {
    fn request(self, now: bool, purge: bool) -> service::Request {
        service::Request {
            unit_dir: self.unit_dir,
            bin_dir: self.bin_dir,
            config_path: self.config_path,
            state_dir: self.state_dir,
            systemctl: !self.no_systemctl,
            ca_file: self.ca_file,
            now,
            purge,
        }
    }
}

/// Settings: a config file, overridden by `CENSUS_AGENT_*` variables, overridden by flags.
#[derive(Debug, Args)]
struct Settings {
    #[command(flatten)]
    connection: Connection,
    /// CIDRs to sweep, comma-separated (repeatable).
    #[arg(long, env = "CENSUS_AGENT_SCOPE", value_delimiter = ',')]
    scope: Vec<String>,
    /// Also sweep every on-link subnet of these interfaces, comma-separated (repeatable).
    #[arg(long, env = "CENSUS_AGENT_SCOPE_INTERFACE", value_delimiter = ',')]
    scope_interface: Vec<String>,
    /// CIDRs never to probe, comma-separated (repeatable).
    #[arg(long, env = "CENSUS_AGENT_EXCLUDE", value_delimiter = ',')]
    exclude: Vec<String>,
    /// Sweep only through this interface.
    #[arg(long, env = "CENSUS_AGENT_INTERFACE")]
    interface: Option<String>,
    /// Allow scopes larger than a /16.
    #[arg(long, env = "CENSUS_AGENT_ALLOW_LARGE_SCOPE")]
    allow_large_scope: bool,
    /// Directory for the agent's certificate, id, sequence numbers and queue (must exist;
    /// `run` needs one).
    #[arg(long, env = "CENSUS_AGENT_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Time between sweeps, at least 10s, e.g. 15m [default: 15m].
    #[arg(long, env = "CENSUS_AGENT_INTERVAL", value_parser = config::parse_duration)]
    interval: Option<std::time::Duration>,
    /// Most ARP requests per second per interface, retries included; sweeps start at 1200/s and speed up toward it while the network keeps up (1200 or less: a fixed rate) [default: 6000].
    #[arg(long, env = "CENSUS_AGENT_ARP_RATE")]
    arp_rate: Option<u32>,
    /// How many more times an address silent to ARP is asked [default: 1].
    #[arg(long, env = "CENSUS_AGENT_ARP_RETRIES")]
    arp_retries: Option<u32>,
    /// Most milliseconds to listen after the last ARP request; the sweep listens 4x the
    /// highest reply latency it measured, at least 50 ms [default: 1000].
    #[arg(long, env = "CENSUS_AGENT_ARP_REPLY_WINDOW_MS")]
    arp_reply_window_ms: Option<u64>,
    /// ICMP echo requests per second for routed scopes [default: 1000].
    #[arg(long, env = "CENSUS_AGENT_ICMP_RATE")]
    icmp_rate: Option<u32>,
    /// SNMP v1/v2c communities to try, in order, comma-separated (v3 users: config file only).
    #[arg(
        long,
        env = "CENSUS_AGENT_SNMP_COMMUNITIES",
        value_delimiter = ',',
        hide_env_values = true
    )]
    snmp_community: Vec<String>,
    /// Milliseconds to listen for mDNS answers [default: 3000].
    #[arg(long, env = "CENSUS_AGENT_MDNS_WINDOW_MS")]
    mdns_window_ms: Option<u64>,
    /// Turn discovery methods off, comma-separated: arp, icmp, snmp, mdns.
    #[arg(long, env = "CENSUS_AGENT_DISABLE", value_delimiter = ',', value_parser = ["arp", "icmp", "snmp", "mdns"])]
    disable: Vec<String>,
    /// Serve Prometheus metrics (GET /metrics, plain HTTP) on this address while `run` runs,
    /// e.g. 127.0.0.1:7402 [default: none, no metrics served].
    #[arg(long, env = "CENSUS_AGENT_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
}

impl Settings {
    /// Like [`Settings::resolve`], but a scan needs no collector or token.
    fn resolve_for_scan(&self) -> Result<Config, ConfigError> {
        let c = self.layered()?;
        c.validate_sweep()?;
        Ok(c)
    }

    /// Like [`Settings::resolve`], but `users` needs only `[directory]`, which it checks as if
    /// enabled (it reads whether or not `run` would). Also returns whether it was enabled.
    fn resolve_for_users(&self) -> Result<(Config, bool), ConfigError> {
        let mut c = self.layered()?;
        let enabled = c.directory.enabled;
        c.directory.enabled = true;
        c.directory.validate()?;
        Ok((c, enabled))
    }

    fn resolve(&self) -> Result<Config, ConfigError> {
        let c = self.layered()?;
        c.validate()?;
        Ok(c)
    }

    fn layered(&self) -> Result<Config, ConfigError> {
        let mut c = self.connection.layered()?;
        if !self.scope.is_empty() {
            c.scopes = config::parse_cidrs(&self.scope.join(","))?;
        }
        if !self.scope_interface.is_empty() {
            c.scope_interfaces.clone_from(&self.scope_interface);
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
        if let Some(v) = self.icmp_rate {
            c.icmp.rate = v;
        }
        if !self.snmp_community.is_empty() {
            c.snmp.communities.clone_from(&self.snmp_community);
        }
        if let Some(v) = self.mdns_window_ms {
            c.mdns.window_ms = v;
        }
        if self.metrics_listen.is_some() {
            c.metrics_listen = self.metrics_listen;
        }
        for method in &self.disable {
            match method.as_str() {
                "arp" => c.arp.enabled = false,
                "icmp" => c.icmp.enabled = false,
                "snmp" => c.snmp.enabled = false,
                _ => c.mdns.enabled = false,
            }
        }
        Ok(c)
    }
}

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("census-agent: error: {message}");
    ExitCode::from(code)
}

fn exit_code(e: &AgentError) -> u8 {
    match e {
        AgentError::Config(_)
        | AgentError::Scope(_)
        | AgentError::State(_)
        | AgentError::Queue(QueueError::Open { .. } | QueueError::State(_)) => EX_USAGE,
        AgentError::Delivery(DeliveryError::Unreachable { .. }) => EX_UNAVAILABLE,
        AgentError::Delivery(DeliveryError::Refused(_)) | AgentError::Permission(_) => EX_NOPERM,
        AgentError::Enroll(e) => enroll_exit_code(e),
        AgentError::Identity(_) => EX_USAGE,
        AgentError::Interrupted { .. } => EX_TEMPFAIL,
        _ => 1,
    }
}

/// `install` / `uninstall`: what was done, one line each on stdout, or one error line.
fn service_command(result: Result<Vec<String>, ServiceError>) -> ExitCode {
    match result {
        Ok(done) => {
            for line in done {
                out!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let code = match &e {
                ServiceError::NotRoot(_) => EX_NOPERM,
                ServiceError::NoSystemd => EX_UNAVAILABLE,
                ServiceError::Path { .. } | ServiceError::NotStarted(_) => EX_USAGE,
                _ => 1,
            };
            fail(code, e)
        }
    }
}

/// `census-agent service`: the Windows service entry. The body is `census-agent run`'s: the
/// config resolved the same way, `run::run` with the root shutdown token, which the service's
/// Stop and Shutdown cancel. A bad config is logged and reported as the service's exit code
/// (64), not left to look like a service that never answered.
#[cfg(windows)]
fn windows_service(settings: Settings) -> ExitCode {
    let result = service::windows::run_as_service(move |shutdown| {
        let config = match settings.resolve() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "bad configuration");
                return EX_USAGE;
            }
        };
        let Ok(runtime) = runtime() else {
            return 1;
        };
        runtime.block_on(async move {
            match run::run(config, RunOptions::default(), shutdown).await {
                Ok(_) => 0,
                Err(e) => {
                    tracing::error!(error = %e, "the agent stopped");
                    exit_code(&e)
                }
            }
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(1, e),
    }
}

/// The exit code of a failed directory read, by the scheme of [`exit_code`]: what the
/// configuration must fix is 64, a directory that cannot be reached (or will not speak TLS) is
/// 69 like an unreachable collector, a refused bind is 77 like a refused token.
fn directory_exit_code(e: &DirectoryError) -> u8 {
    match e {
        DirectoryError::Settings(_)
        | DirectoryError::Password(_)
        | DirectoryError::CaFile { .. }
        | DirectoryError::Untrusted { .. }
        | DirectoryError::WrongName { .. }
        | DirectoryError::NoSubjectAltName { .. }
        | DirectoryError::TooManyUsers { .. }
        | DirectoryError::TooManyGroups { .. } => EX_USAGE,
        DirectoryError::Unreachable { .. }
        | DirectoryError::Timeout { .. }
        | DirectoryError::Tls { .. } => EX_UNAVAILABLE,
        DirectoryError::BindRefused { .. } | DirectoryError::Bind { .. } => EX_NOPERM,
        DirectoryError::Cancelled => EX_TEMPFAIL,
        DirectoryError::Search { .. } | DirectoryError::Internal(_) => 1,
    }
}

/// The `--once` line about the directory read (printed after the sweep's).
fn directory_line(d: &run::DirectorySummary) -> String {
    match &d.error {
        None => format!(
            "read {} directory users from {} in {} pages ({} skipped); {} batches delivered",
            d.users, d.directory, d.pages, d.skipped, d.batches
        ),
        Some(_) if d.batches == 0 => "directory read failed; not reported to the collector \
                                      (no read has named the directory yet: set directory.base_dn)"
            .to_owned(),
        Some(_) => format!(
            "directory read of {} failed; its failed-read batch was delivered",
            d.directory
        ),
    }
}

fn summary_line(s: &run::SweepSummary) -> String {
    format!(
        "swept {} addresses in {:.1}s: {} answered ARP, {} answered ICMP, {} answered SNMP, {} advertised over mDNS; {} devices delivered",
        s.probed,
        s.duration.as_secs_f64(),
        s.arp_replies,
        s.icmp_replies,
        s.snmp_devices,
        s.mdns_hosts,
        s.observations
    )
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| fail(1, format!("cannot start the async runtime: {e}")))
}

/// `census-agent scan`: sweep once and print, no collector needed.
fn scan(settings: &Settings, json: bool) -> ExitCode {
    let config = match settings.resolve_for_scan() {
        Ok(c) => c,
        Err(e) => return fail(EX_USAGE, e),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        signal::spawn_shutdown_on_signal(shutdown.clone());
        match run::scan(&config, std::io::stderr().is_terminal(), &shutdown).await {
            Ok((observations, summary)) => {
                if json {
                    for o in &observations {
                        out!("{}", census_agent::discovery::to_json(o));
                    }
                } else {
                    print_table(&observations);
                    out!("{}", summary_line(&summary).replace("delivered", "found"));
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(exit_code(&e), e),
        }
    })
}

/// `census-agent users`: read the directory once and print it, no collector needed.
fn users(settings: &Settings, json: bool) -> ExitCode {
    let (config, enabled) = match settings.resolve_for_users() {
        Ok(c) => c,
        Err(e) => return fail(EX_USAGE, e),
    };
    if !enabled {
        eprintln!(
            "census-agent: note: directory.enabled is false: `census-agent run` reads the \
             directory only once it is true"
        );
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        signal::spawn_shutdown_on_signal(shutdown.clone());
        let started = std::time::Instant::now();
        match directory::read(&config.directory, &shutdown).await {
            Ok(read) => {
                let now = std::time::SystemTime::now();
                let batches = read.batch_count();
                if json {
                    out!("{}", directory::show::read_json(&read, batches, now));
                } else {
                    out!("{}", directory::show::header_line());
                    for u in &read.users {
                        out!("{}", directory::show::user_line(u, now));
                    }
                    out!(
                        "{}",
                        directory::show::summary_line(&read, batches, started.elapsed(), now)
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(directory_exit_code(&e), e),
        }
    })
}

fn print_table(observations: &[census_proto::v1::Observation]) {
    use census_proto::{convert::MacAddr, v1};
    out!(
        "{:<16} {:<18} {:<12} {:<16} {:<24} NAMES",
        "ADDRESS",
        "MAC",
        "CATEGORY",
        "METHODS",
        "VENDOR"
    );
    for o in observations {
        let addr = o
            .addresses
            .first()
            .map(|a| a.address.as_str())
            .unwrap_or("-");
        let ev = o.mac_evidence.first();
        let mac = ev
            .and_then(|e| MacAddr::try_from(e.mac.as_slice()).ok())
            .map_or_else(|| "-".into(), |m| m.to_string());
        let vendor: String = ev
            .map(|e| e.vendor.chars().take(24).collect())
            .unwrap_or_default();
        let methods = o
            .methods
            .iter()
            .map(|m| {
                v1::Method::try_from(*m)
                    .map(v1::Method::label)
                    .unwrap_or("?")
            })
            .collect::<Vec<_>>()
            .join(",");
        let category = v1::Category::try_from(o.category)
            .unwrap_or_default()
            .label();
        let names = o
            .names
            .iter()
            .map(|n| n.value.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        out!("{addr:<16} {mac:<18} {category:<12} {methods:<16} {vendor:<24} {names}");
    }
}

/// Parses the command line: help and version as asked (exit 0); a usage error is one line and
/// exit 64, like every other bad input.
fn parse_args() -> Result<Cli, ExitCode> {
    use clap::error::ErrorKind;
    Cli::try_parse().map_err(|e| match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            ExitCode::from(EX_USAGE)
        }
        _ => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            fail(
                EX_USAGE,
                format!(
                    "{} (see census-agent --help)",
                    first.strip_prefix("error: ").unwrap_or(first)
                ),
            )
        }
    })
}

fn main() -> ExitCode {
    let cli = match parse_args() {
        Ok(c) => c,
        Err(code) => return code,
    };
    telemetry::init(matches!(cli.log_format, LogFormat::Json));
    match cli.command {
        Command::Enroll { args } => enroll(&args),
        Command::Validate { settings } => {
            let checked = settings.resolve().and_then(|c| {
                let start = enroll::plan(&c)?;
                Ok((c, start))
            });
            match checked {
                Ok((c, start)) => {
                    if let Some(w) = c.collector_warning() {
                        eprintln!("census-agent: warning: {w}");
                    }
                    let identity = match start {
                        enroll::Start::Enrolled { .. } => "enrolled",
                        enroll::Start::Enroll { .. } => {
                            "not enrolled yet (run enrolls first with the token)"
                        }
                    };
                    let directory = if c.directory.enabled {
                        format!(
                            ", directory {} every {}",
                            c.directory.url.as_deref().unwrap_or_default(),
                            humantime::format_duration(c.directory.interval)
                        )
                    } else {
                        String::new()
                    };
                    out!(
                        "configuration is valid: collector {}, {identity}, scopes {}{directory}",
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
            }
        }
        Command::Install { paths, now } => {
            service_command(service::install(&paths.request(now, false)))
        }
        Command::Uninstall { paths, purge } => {
            service_command(service::uninstall(&paths.request(false, purge)))
        }
        #[cfg(windows)]
        Command::Service { settings } => windows_service(settings),
        Command::Scan { settings, json } => scan(&settings, json),
        Command::Users { settings, json } => users(&settings, json),
        Command::Run { settings, once } => {
            let config = match settings.resolve() {
                Ok(c) => c,
                Err(e) => return fail(EX_USAGE, e),
            };
            let runtime = match runtime() {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            runtime.block_on(async {
                let shutdown = CancellationToken::new();
                signal::spawn_shutdown_on_signal(shutdown.clone());
                if let Err(code) = serve_metrics(config.metrics_listen, &shutdown).await {
                    return code;
                }
                let progress = once && std::io::stderr().is_terminal();
                match run::run(config, RunOptions { once, progress }, shutdown).await {
                    Ok(summary) => {
                        if once {
                            out!("{}", summary_line(&summary.sweep));
                            if let Some(d) = &summary.directory {
                                out!("{}", directory_line(d));
                            }
                        }
                        // With --once a failed read is an error once everything, its
                        // failed-read part included, is delivered.
                        match &summary.directory {
                            Some(run::DirectorySummary {
                                error: Some(e),
                                batches,
                                ..
                            }) if once => fail(
                                directory_exit_code(e),
                                format!(
                                    "directory read failed ({}): {e}",
                                    if *batches == 0 {
                                        "not reported to the collector"
                                    } else {
                                        "reported to the collector"
                                    }
                                ),
                            ),
                            _ => ExitCode::SUCCESS,
                        }
                    }
                    Err(e) => fail(exit_code(&e), e),
                }
            })
        }
    }
}

/// Serves the agent's metrics on `listen`, if set, until `shutdown`: the page reads the
/// agent's counters ([`census_agent::metrics::global`]) at each scrape.
async fn serve_metrics(
    listen: Option<SocketAddr>,
    shutdown: &CancellationToken,
) -> Result<(), ExitCode> {
    let Some(listen) = listen else {
        return Ok(());
    };
    let metrics = AgentMetrics::new(Arc::new(census_agent::metrics::GlobalCounters));
    match metrics_http::serve(listen, move || metrics.render(), shutdown.clone()).await {
        // serve logs the address it listens on.
        Ok(_serving) => Ok(()),
        Err(e) => Err(fail(
            1,
            format!(
                "cannot serve metrics on {listen}: {e} (choose another address with --metrics-listen)"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_failures_exit_by_the_scheme() {
        let url = || "ldaps://198.18.0.10:636".to_owned();
        let cases = [
            (DirectoryError::Settings("x".into()), EX_USAGE),
            (DirectoryError::Password("x".into()), EX_USAGE),
            (
                DirectoryError::Untrusted {
                    url: url(),
                    message: "x".into(),
                },
                EX_USAGE,
            ),
            (
                DirectoryError::TooManyUsers {
                    max: 1,
                    base_dn: "DC=lab".into(),
                },
                EX_USAGE,
            ),
            (
                DirectoryError::Unreachable {
                    url: url(),
                    message: "x".into(),
                },
                EX_UNAVAILABLE,
            ),
            (
                DirectoryError::Timeout {
                    url: url(),
                    step: "the bind".into(),
                    timeout: std::time::Duration::from_secs(1),
                },
                EX_UNAVAILABLE,
            ),
            (
                DirectoryError::BindRefused {
                    bind_dn: "census@lab".into(),
                    hint: String::new(),
                },
                EX_NOPERM,
            ),
            (DirectoryError::Cancelled, EX_TEMPFAIL),
            (
                DirectoryError::Search {
                    url: url(),
                    base_dn: "DC=lab".into(),
                    message: "x".into(),
                },
                1,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(directory_exit_code(&e), code, "{e}");
        }
    }

    #[test]
    fn the_once_lines_for_a_read() {
        let mut d = run::DirectorySummary {
            directory: "lab.census.test".into(),
            read_id: "r".into(),
            users: 1211,
            pages: 13,
            skipped: 0,
            batches: 13,
            error: None,
        };
        assert_eq!(
            directory_line(&d),
            "read 1211 directory users from lab.census.test in 13 pages (0 skipped); 13 batches delivered"
        );
        d.error = Some(DirectoryError::Cancelled);
        d.batches = 1;
        assert!(directory_line(&d).contains("failed-read batch was delivered"));
        d.batches = 0;
        assert!(directory_line(&d).contains("set directory.base_dn"));
    }
}
