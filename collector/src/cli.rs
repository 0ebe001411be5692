//! The `census` command-line client: enrollment tokens, agents, clients, counts, devices and users,
//! counting policies and billing snapshots, over the collector's admin and query services.
//! Output is a table for people or `--json` for scripts. The users commands are in `users.rs`.
//!
//! Every failure ends in one line on stderr and an exit code: 64 for a usage error, 69 when the
//! collector cannot be reached (or speaks another protocol than the URL's scheme), 77 when a
//! credential is refused or the collector's certificate is not signed by the CA we trust, 1
//! otherwise; `reach.rs` reads the transport's error chain to say which.

use std::{error::Error as _, path::PathBuf, time::Duration};

use census_proto::{
    convert::{self, MacAddr},
    transport::{self, Authenticate, Credentials},
    v1::{
        self, admin_service_client::AdminServiceClient, query_service_client::QueryServiceClient,
    },
};
use clap::{Parser, Subcommand};
use serde_json::json;
use tonic::{Code, Status, transport::Channel};

use crate::{
    policy::{self, RandomizedRule},
    snapshot::Period,
};

/// `println!` that ends the program quietly when stdout is closed early (`census counts | head`)
/// instead of panicking, and in one line on any other write error.
macro_rules! out {
    () => { out!("") };
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            $crate::cli::stdout_failed(&e);
        }
    }};
}

mod reach;
mod users;
pub use users::{UserPolicyCommand, UsersArgs, UsersCommand};

pub const EX_USAGE: u8 = 64;
pub const EX_UNAVAILABLE: u8 = 69;
pub const EX_NOPERM: u8 = 77;

#[derive(Debug, Parser)]
#[command(
    name = "census",
    version,
    about = "Query and administer a Census collector."
)]
pub struct Cli {
    /// The collector's gRPC URL (https://; http:// only for a collector in development mode).
    #[arg(
        long,
        global = true,
        env = "CENSUS_COLLECTOR_URL",
        default_value = "https://127.0.0.1:7400"
    )]
    pub collector: String,
    /// The operator's credentials: the directory the collector makes on first start,
    /// <data dir>/operator (ca.pem, cert.pem, key.pem).
    #[arg(
        long,
        global = true,
        env = "CENSUS_CREDENTIALS",
        default_value = "/var/lib/census-collector/operator"
    )]
    pub credentials: PathBuf,
    /// Seconds to wait for the collector to answer.
    #[arg(long, global = true, default_value_t = 15)]
    pub timeout: u64,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Enrollment tokens for agents.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Enrolled agents: client, site, version, last seen, backlog.
    Agents {
        /// Only this client's agents.
        #[arg(long)]
        client: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// One enrolled agent.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// List clients and their sites.
    Clients {
        #[arg(long)]
        json: bool,
    },
    /// Billable counts per client.
    Counts {
        /// Only this client.
        #[arg(long)]
        client: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// A client's devices with their addresses and evidence.
    Devices {
        #[arg(long)]
        client: String,
        /// Only devices seen at this site.
        #[arg(long)]
        site: Option<String>,
        /// Only this category (network, printer, computer, server, phone-tablet, media-iot,
        /// unknown).
        #[arg(long)]
        category: Option<String>,
        /// Only devices that count (or, with --not-counted, that do not).
        #[arg(long, conflicts_with = "not_counted")]
        counted: bool,
        #[arg(long)]
        not_counted: bool,
        #[arg(long)]
        json: bool,
    },
    /// One device: identifiers, addresses (current, previous or lost), evidence, and why it
    /// counts.
    Device {
        #[arg(long)]
        client: String,
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Merge device B into device A (recorded; undo with `census undo`).
    Merge {
        #[arg(long)]
        client: String,
        a: String,
        b: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Split identifiers (keys from `census device`) out of a device into a device of their own.
    Split {
        #[arg(long)]
        client: String,
        id: String,
        /// Identifier keys, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        keys: Vec<String>,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Undo a merge or split by its history number.
    Undo {
        #[arg(long)]
        client: String,
        seq: u64,
    },
    /// A client's merges and splits.
    History {
        #[arg(long)]
        client: String,
        #[arg(long)]
        json: bool,
    },
    /// A client's device counting policy (versioned; the default is device-v1).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Billing snapshots: a client's counted devices and users for a month, frozen.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// A client's users (people from Active Directory and Entra ID) and why each counts or
    /// not; `users policy` for the billable-user policy, `users refresh` to read Entra ID now.
    Users(UsersArgs),
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// The client's current policy (or one version of it).
    Show {
        #[arg(long)]
        client: String,
        /// A version to show, e.g. one a snapshot names (acme-2, device-v1).
        #[arg(long)]
        version: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Save a new version of the client's policy: the options given replace those of the
    /// current policy, the others are kept.
    Set {
        #[arg(long)]
        client: String,
        /// A device counts if seen within this many days (1 to 3650).
        #[arg(long)]
        window_days: Option<u32>,
        /// The categories that count, comma-separated (network, printer, computer, server,
        /// phone-tablet, media-iot, unknown), or "all".
        #[arg(long, value_delimiter = ',')]
        categories: Option<Vec<String>>,
        /// How devices without a strong identifier (randomized MACs) count: count, exclude, or
        /// count-if-named (only with an mDNS or other name).
        #[arg(long, value_parser = parse_randomized)]
        randomized: Option<RandomizedRule>,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Freeze the client's counted devices for a billing period. A period's snapshot is never
    /// changed: creating it again is refused.
    Create {
        #[arg(long)]
        client: String,
        /// The billing month, YYYY-MM.
        #[arg(long, value_parser = parse_period)]
        period: String,
    },
    /// The client's snapshots, oldest first.
    List {
        #[arg(long)]
        client: String,
        #[arg(long)]
        json: bool,
    },
    /// One snapshot with its counted devices (--json: the whole snapshot).
    Show {
        #[arg(long)]
        client: String,
        #[arg(long, value_parser = parse_period)]
        period: String,
        #[arg(long)]
        json: bool,
    },
    /// What changed since the previous period that has a snapshot: devices added, removed,
    /// recategorized, and the count deltas.
    Diff {
        #[arg(long)]
        client: String,
        #[arg(long, value_parser = parse_period)]
        period: String,
        /// Compare with this period instead of the previous one.
        #[arg(long, value_parser = parse_period)]
        against: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Export a snapshot for a PSA: CSV (one row per counted device) or JSON (the whole
    /// snapshot), to stdout or a file.
    Export {
        #[arg(long)]
        client: String,
        #[arg(long, value_parser = parse_period)]
        period: String,
        /// csv (one row per counted device), users-csv (one row per counted user), or json.
        #[arg(long, value_parser = SnapshotCommand::FORMATS)]
        format: String,
        /// Write to this file instead of stdout.
        #[arg(long)]
        output: Option<PathBuf>,
    },
}

impl SnapshotCommand {
    /// The export formats `--format` takes: csv (devices), users-csv (users), json (all).
    pub const FORMATS: [&str; 3] = ["csv", "users-csv", "json"];
}

fn parse_period(s: &str) -> Result<String, String> {
    Period::parse(s)
        .map(|p| p.to_string())
        .map_err(|e| e.to_string())
}

fn parse_randomized(s: &str) -> Result<RandomizedRule, String> {
    RandomizedRule::parse(s).ok_or_else(|| "expected count, exclude or count-if-named".to_owned())
}

/// How large a snapshot the CLI accepts in one message (the collector sends up to 64 MiB).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a single-use token that enrolls one agent into a client and site (both created if
    /// new). The token is printed alone on stdout.
    Create {
        #[arg(long)]
        client: String,
        #[arg(long)]
        site: String,
        /// How long the token can be used, e.g. 1h, 7d (at most 30 days).
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        expires: Duration,
    },
    /// List enrollment tokens (never their secrets).
    List {
        #[arg(long)]
        client: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Revoke an unused token by its id: it enrolls nothing from now on (to lock out an agent
    /// it enrolled, use `census agent revoke`).
    Revoke { token_id: String },
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Lock an agent out at once: its certificate is refused from its next call or batch on.
    Revoke { agent_id: String },
}

/// Parses the command line of `program`; on a usage error prints one line and returns exit code
/// 64 (help and version are printed as asked, exit 0).
pub fn parse_args<P: Parser>(program: &str) -> Result<P, std::process::ExitCode> {
    P::try_parse().map_err(|e| usage_exit(program, &e))
}

/// The exit for a clap error: help and version on stdout with 0; anything else one line, 64.
pub fn usage_exit(program: &str, e: &clap::Error) -> std::process::ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            std::process::ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            std::process::ExitCode::from(EX_USAGE)
        }
        _ => {
            // The message up to the first blank line, on one line: clap lists missing
            // arguments on the lines after "the following required arguments were not provided:".
            let text = e.to_string();
            let first: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let first = first.join(" ");
            let first = first.strip_prefix("error: ").unwrap_or(&first);
            eprintln!("{program}: error: {first} (see {program} --help)");
            std::process::ExitCode::from(EX_USAGE)
        }
    }
}

/// Ends the program after a failed write to stdout: quietly (exit 0) when the reader went away,
/// as `head` does; with one line (exit 1) otherwise.
pub fn stdout_failed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("census: error: cannot write the output: {e}");
    std::process::exit(1);
}

/// A failure with its exit code and one-line message.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
}

/// Runs the CLI; `Ok` output is already printed.
pub async fn run(cli: Cli) -> Result<(), Failure> {
    let creds = Credentials::load(&cli.credentials).map_err(|e| {
        Failure::new(
            EX_USAGE,
            format!("cannot use the operator's credentials: {e} (pass --credentials <collector data dir>/operator, or set CENSUS_CREDENTIALS)"),
        )
    })?;
    let channel = connect(
        &cli.collector,
        &creds,
        &cli.credentials,
        Duration::from_secs(cli.timeout.max(1)),
    )
    .await?;
    let auth = Authenticate::new(&cli.collector, Some(&creds));
    let mut query = QueryServiceClient::with_interceptor(channel.clone(), auth.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let mut admin = AdminServiceClient::with_interceptor(channel, auth)
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let url = cli.collector.as_str();
    match cli.command {
        Command::Token(TokenCommand::Create {
            client,
            site,
            expires,
        }) => {
            let r = admin
                .create_token(v1::CreateTokenRequest {
                    client,
                    site,
                    expires_in_seconds: expires.as_secs().max(1),
                })
                .await
                .map_err(|s| status_failure(s, url))?
                .into_inner();
            if r.client_created {
                eprintln!("created client {}", r.client);
            }
            if r.site_created {
                eprintln!("created site {} of client {}", r.site, r.client);
            }
            eprintln!(
                "token {} enrolls one agent into client {} site {} until {}; it is shown only now:",
                r.token_id,
                r.client,
                r.site,
                time(r.expires_at.as_ref())
            );
            out!("{}", r.token);
        }
        Command::Token(TokenCommand::List { client, json }) => {
            let now = std::time::SystemTime::now();
            let r = admin
                .list_tokens(v1::ListTokensRequest {
                    client: client.unwrap_or_default(),
                })
                .await
                .map_err(|s| status_failure(s, url))?
                .into_inner();
            if json {
                let rows: Vec<_> = r
                    .tokens
                    .iter()
                    .map(|t| json!({"token_id": t.token_id, "client": t.client, "site": t.site, "created_at": time(t.created_at.as_ref()), "expires_at": time(t.expires_at.as_ref()), "revoked": t.revoked, "used_by_agent": t.used_by_agent, "used_at": time(t.used_at.as_ref())}))
                    .collect();
                print_json(&rows);
            } else {
                let rows = r
                    .tokens
                    .iter()
                    .map(|t| {
                        vec![
                            t.token_id.clone(),
                            t.client.clone(),
                            t.site.clone(),
                            time(t.created_at.as_ref()),
                            time(t.expires_at.as_ref()),
                            token_state(t, now),
                        ]
                    })
                    .collect();
                print_table(
                    &["TOKEN ID", "CLIENT", "SITE", "CREATED", "EXPIRES", "STATE"],
                    rows,
                );
            }
        }
        Command::Token(TokenCommand::Revoke { token_id }) => {
            admin
                .revoke_token(v1::RevokeTokenRequest {
                    token_id: token_id.clone(),
                })
                .await
                .map_err(|s| status_failure(s, url))?;
            eprintln!("token {token_id} revoked");
        }
        Command::Agents { client, json } => {
            let r = admin
                .list_agents(v1::ListAgentsRequest {
                    client: client.unwrap_or_default(),
                })
                .await
                .map_err(|s| status_failure(s, url))?
                .into_inner();
            if json {
                let rows: Vec<_> = r
                    .agents
                    .iter()
                    .map(|a| json!({"agent_id": a.agent_id, "client": a.client, "site": a.site, "hostname": a.hostname, "version": a.version, "enrolled_at": time(a.enrolled_at.as_ref()), "last_seen": a.last_seen.as_ref().map(|t| time(Some(t))), "backlog": a.backlog, "revoked": a.revoked, "certificate_not_after": time(a.certificate_not_after.as_ref()), "token_id": a.token_id}))
                    .collect();
                print_json(&rows);
            } else {
                let rows = r
                    .agents
                    .iter()
                    .map(|a| {
                        vec![
                            a.agent_id.clone(),
                            a.client.clone(),
                            a.site.clone(),
                            a.hostname.clone(),
                            a.version.clone(),
                            a.last_seen
                                .as_ref()
                                .map_or_else(|| "never".into(), |t| time(Some(t))),
                            a.backlog.to_string(),
                            if a.revoked { "revoked" } else { "active" }.into(),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "AGENT ID",
                        "CLIENT",
                        "SITE",
                        "HOSTNAME",
                        "VERSION",
                        "LAST SEEN",
                        "BACKLOG",
                        "STATE",
                    ],
                    rows,
                );
            }
        }
        Command::Agent(AgentCommand::Revoke { agent_id }) => {
            let r = admin
                .revoke_agent(v1::RevokeAgentRequest {
                    agent_id: agent_id.clone(),
                })
                .await
                .map_err(|s| status_failure(s, url))?
                .into_inner();
            let (client, site) = r.agent.map(|a| (a.client, a.site)).unwrap_or_default();
            eprintln!(
                "agent {agent_id} of client {client} site {site} revoked: it is refused from now on"
            );
        }
        Command::Clients { json } => {
            let r = query
                .list_clients(v1::ListClientsRequest {})
                .await
                .map_err(|s| status_failure(s, url))?
                .into_inner();
            if json {
                let rows: Vec<_> = r
                    .clients
                    .iter()
                    .map(|c| json!({"client": c.name, "sites": c.sites, "created_at": time(c.created_at.as_ref())}))
                    .collect();
                print_json(&rows);
            } else {
                let rows = r
                    .clients
                    .iter()
                    .map(|c| {
                        vec![
                            c.name.clone(),
                            list_cell(&c.sites),
                            time(c.created_at.as_ref()),
                        ]
                    })
                    .collect();
                print_table(&["CLIENT", "SITES", "CREATED"], rows);
            }
        }
        Command::Counts { client, json } => {
            let r = query
                .get_counts(v1::GetCountsRequest {
                    client: client.unwrap_or_default(),
                })
                .await
                .map_err(|s| status_failure(s, url))?
                .into_inner();
            if json {
                let rows: Vec<_> = r.counts.iter().map(counts_json).collect();
                print_json(&rows);
            } else {
                let rows = r
                    .counts
                    .iter()
                    .map(|c| {
                        vec![
                            c.client.clone(),
                            c.devices.to_string(),
                            users::users_cell(c),
                            c.devices_by_category
                                .iter()
                                .map(|k| format!("{}={}", k.category, k.count))
                                .collect::<Vec<_>>()
                                .join(" "),
                            c.policy_version.clone(),
                            time(c.as_of.as_ref()),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "CLIENT",
                        "DEVICES",
                        "USERS",
                        "BY CATEGORY",
                        "POLICY",
                        "AS OF",
                    ],
                    rows,
                );
            }
            users::warn_stale(&r.counts);
        }
        Command::Device { client, id, json } => {
            let d = query
                .get_device(v1::GetDeviceRequest { client, id })
                .await
                .map_err(|s| status_failure(s, url))?
                .into_inner();
            if json {
                out!(
                    "{}",
                    serde_json::to_string_pretty(&device_json(&d)).unwrap_or_default()
                );
            } else {
                print_device(&d);
            }
        }
        Command::Merge {
            client,
            a,
            b,
            reason,
        } => {
            let e = admin
                .merge_devices(v1::MergeDevicesRequest {
                    client,
                    a,
                    b,
                    reason,
                })
                .await
                .map_err(|s| status_failure(s, url))?
                .into_inner();
            print_event(&e);
        }
        Command::Split {
            client,
            id,
            keys,
            reason,
        } => {
            let e = admin
                .split_device(v1::SplitDeviceRequest {
                    client,
                    id,
                    keys,
                    reason,
                })
                .await
                .map_err(|s| status_failure(s, url))?
                .into_inner();
            print_event(&e);
        }
        Command::Undo { client, seq } => {
            let e = admin
                .undo_event(v1::UndoEventRequest { client, seq })
                .await
                .map_err(|s| status_failure(s, url))?
                .into_inner();
            print_event(&e);
        }
        Command::History { client, json } => {
            let r = query
                .list_history(v1::ListHistoryRequest { client })
                .await
                .map_err(|s| status_failure(s, url))?
                .into_inner();
            if json {
                let rows: Vec<_> = r.events.iter().map(event_json).collect();
                print_json(&rows);
            } else {
                for e in &r.events {
                    print_event(e);
                }
            }
        }
        Command::Policy(cmd) => policy_command(cmd, &mut query, &mut admin, url).await?,
        Command::Snapshot(cmd) => snapshot_command(cmd, &mut query, &mut admin, url).await?,
        Command::Users(args) => {
            users::run(args, &mut query, &mut admin, url, cli.timeout.max(1)).await?
        }
        Command::Devices {
            client,
            site,
            category,
            counted,
            not_counted,
            json,
        } => {
            let r = query
                .list_devices(v1::ListDevicesRequest {
                    client,
                    site: site.unwrap_or_default(),
                    category: category.unwrap_or_default(),
                    counted: if counted {
                        v1::CountedFilter::Counted
                    } else if not_counted {
                        v1::CountedFilter::NotCounted
                    } else {
                        v1::CountedFilter::Any
                    } as i32,
                })
                .await
                .map_err(|s| status_failure(s, url))?
                .into_inner();
            if json {
                let rows: Vec<_> = r.devices.iter().map(device_json).collect();
                print_json(&rows);
            } else {
                let rows = r
                    .devices
                    .iter()
                    .map(|d| {
                        vec![
                            d.id.clone(),
                            d.site.clone(),
                            list_cell(&macs(&d.macs)),
                            list_cell(&listed_addresses(d)),
                            d.category.clone(),
                            list_cell(&d.names),
                            time(d.first_seen.as_ref()),
                            time(d.last_seen.as_ref()),
                            if d.counted { "yes" } else { "no" }.into(),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "DEVICE",
                        "SITE",
                        "MACS",
                        "IPS",
                        "CATEGORY",
                        "NAMES",
                        "FIRST SEEN",
                        "LAST SEEN",
                        "COUNTED",
                    ],
                    rows,
                );
            }
        }
    }
    Ok(())
}

/// A device's addresses for its table row: current ones first (those it answers on now).
fn listed_addresses(d: &v1::Device) -> Vec<&str> {
    let mut out: Vec<&str> = d
        .addresses
        .iter()
        .filter(|a| a.current)
        .map(|a| a.address.as_str())
        .collect();
    out.extend(
        d.addresses
            .iter()
            .filter(|a| !a.current)
            .map(|a| a.address.as_str()),
    );
    out
}

/// A token's state at `now`, for `census token list`.
fn token_state(t: &v1::EnrollmentToken, now: std::time::SystemTime) -> String {
    let expired = t
        .expires_at
        .as_ref()
        .and_then(convert::system_time)
        .is_some_and(|e| now >= e);
    if t.revoked {
        "revoked".into()
    } else if !t.used_by_agent.is_empty() {
        format!("used by {}", t.used_by_agent)
    } else if expired {
        "expired".into()
    } else {
        "unused".into()
    }
}

/// Connects (TCP and the TLS handshake) to the collector at `url` with the credentials read
/// from `dir`.
async fn connect(
    url: &str,
    creds: &Credentials,
    dir: &std::path::Path,
    timeout: Duration,
) -> Result<Channel, Failure> {
    let endpoint = transport::endpoint(url, None, Some(creds), timeout)
        .map_err(|e| Failure::new(EX_USAGE, e.to_string()))?
        .timeout(timeout);
    endpoint
        .connect()
        .await
        .map_err(|e| reach::failure(url, Some(dir), &e))
}

pub use census_proto::transport::error_chain;

fn status_failure(status: Status, url: &str) -> Failure {
    // A status made on our side from a transport error (the connection broke, TLS failed)
    // carries that error as its source; the collector's own statuses carry none.
    if matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Internal
    ) && let Some(source) = status.source()
    {
        return reach::failure(url, None, source);
    }
    let msg = status.message().to_owned();
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => Failure::new(
            EX_NOPERM,
            format!("the collector refused the operator's credentials: {msg}"),
        ),
        Code::Unavailable => Failure::new(
            EX_UNAVAILABLE,
            format!(
                "cannot reach the collector at {url}: {msg}{}",
                status
                    .source()
                    .map(|s| format!(": {}", error_chain(s)))
                    .unwrap_or_default()
            ),
        ),
        // tonic's own client deadline (--timeout) ran out: name the step and the flag.
        Code::Cancelled if msg.contains("Timeout expired") => Failure::new(
            EX_UNAVAILABLE,
            format!(
                "the collector at {url} did not answer within --timeout (15 seconds unless set): raise --timeout, or see the collector's log for what it was doing"
            ),
        ),
        Code::InvalidArgument => Failure::new(EX_USAGE, msg),
        Code::NotFound | Code::FailedPrecondition => Failure::new(1, msg),
        code => Failure::new(1, format!("collector error ({code:?}): {msg}")),
    }
}

fn time(ts: Option<&prost_types::Timestamp>) -> String {
    ts.and_then(convert::system_time)
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_default()
}

fn macs(raw: &[Vec<u8>]) -> Vec<String> {
    raw.iter()
        .map(|m| {
            MacAddr::try_from(m.as_slice())
                .map(|m| m.to_string())
                .unwrap_or_else(|_| hex_bytes(m))
        })
        .collect()
}

fn hex_bytes(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn method(m: i32) -> &'static str {
    v1::Method::try_from(m)
        .map(v1::Method::label)
        .unwrap_or("unknown")
}

fn counts_json(c: &v1::ClientCounts) -> serde_json::Value {
    let by: serde_json::Map<String, serde_json::Value> = c
        .devices_by_category
        .iter()
        .map(|k| (k.category.clone(), json!(k.count)))
        .collect();
    json!({
        "client": c.client,
        "devices": c.devices,
        "users": c.users,
        "devices_by_category": by,
        "as_of": time(c.as_of.as_ref()),
        "policy_version": c.policy_version,
        "users_policy_version": c.users_policy_version,
        "users_stale": c.users_stale,
        "user_sources": c.user_sources.iter().map(users::source_json).collect::<Vec<_>>(),
    })
}

fn device_json(d: &v1::Device) -> serde_json::Value {
    json!({
        "id": d.id,
        "client": d.client,
        "site": d.site,
        "macs": macs(&d.macs),
        "addresses": d.addresses.iter().map(|a| json!({"address": a.address, "site": a.site, "answered": a.answered, "current": a.current, "lost": a.lost, "state": address_state(a), "last_seen": time(a.last_seen.as_ref())})).collect::<Vec<_>>(),
        "identifiers": d.identifiers.iter().map(|i| json!({"kind": i.kind, "value": i.value, "strong": i.strong, "key": i.key})).collect::<Vec<_>>(),
        "sites": d.sites,
        "anomalies": d.anomalies,
        "weak_only": d.weak_only,
        "names": d.names,
        "category": d.category,
        "category_reason": d.category_reason,
        "first_seen": time(d.first_seen.as_ref()),
        "last_seen": time(d.last_seen.as_ref()),
        "counted": d.counted,
        "reason": d.reason,
        "evidence": d.evidence.iter().map(|e| json!({
            "agent_id": e.agent_id,
            "method": method(e.method),
            "first_seen": time(e.first_seen.as_ref()),
            "last_seen": time(e.last_seen.as_ref()),
            "observations": e.observations,
        })).collect::<Vec<_>>(),
    })
}

fn history_kind(k: i32) -> &'static str {
    match v1::HistoryKind::try_from(k) {
        Ok(v1::HistoryKind::Merge) => "merge",
        Ok(v1::HistoryKind::ManualMerge) => "manual-merge",
        Ok(v1::HistoryKind::Split) => "split",
        _ => "unknown",
    }
}

fn event_json(e: &v1::HistoryEvent) -> serde_json::Value {
    let ids = |l: &[v1::DeviceIdentity]| {
        l.iter()
            .map(|d| json!({"id": d.id, "keys": d.keys}))
            .collect::<Vec<_>>()
    };
    json!({
        "seq": e.seq,
        "at": time(e.at.as_ref()),
        "kind": history_kind(e.kind),
        "reason": e.reason,
        "before": ids(&e.before),
        "after": ids(&e.after),
        "undone_by": (e.undone_by != 0).then_some(e.undone_by),
        "undoes": (e.undoes != 0).then_some(e.undoes),
    })
}

fn print_event(e: &v1::HistoryEvent) {
    let ids = |l: &[v1::DeviceIdentity]| {
        l.iter()
            .map(|d| d.id.as_str())
            .collect::<Vec<_>>()
            .join(" + ")
    };
    let mut line = format!(
        "#{} {} {}: {} -> {} ({})",
        e.seq,
        time(e.at.as_ref()),
        history_kind(e.kind),
        ids(&e.before),
        ids(&e.after),
        e.reason
    );
    if e.undone_by != 0 {
        line.push_str(&format!(" [undone by #{}]", e.undone_by));
    }
    out!("{line}");
}

fn print_device(d: &v1::Device) {
    out!("device     {}", d.id);
    out!("client     {} (sites {})", d.client, d.sites.join(", "));
    out!("category   {} ({})", d.category, d.category_reason);
    out!(
        "counted    {} ({})",
        if d.counted { "yes" } else { "no" },
        d.reason
    );
    out!(
        "seen       {} .. {}",
        time(d.first_seen.as_ref()),
        time(d.last_seen.as_ref())
    );
    out!("names      {}", d.names.join(", "));
    for i in &d.identifiers {
        out!(
            "identifier {:<15} {:<40} {} key={}",
            i.kind,
            i.value,
            if i.strong { "strong" } else { "weak" },
            i.key
        );
    }
    for a in &d.addresses {
        out!(
            "address    {:<16} site {:<10} {}, {}, last seen {}",
            a.address,
            a.site,
            if a.answered { "answered" } else { "claimed" },
            match address_state(a) {
                "lost" => "lost to another device",
                state => state,
            },
            time(a.last_seen.as_ref())
        );
    }
    for e in &d.evidence {
        out!(
            "evidence   agent {} by {}: {} observations, {} .. {}",
            e.agent_id,
            method(e.method),
            e.observations,
            time(e.first_seen.as_ref()),
            time(e.last_seen.as_ref())
        );
    }
    for a in &d.anomalies {
        out!("note       {a}");
    }
}

/// "current" (answered on in the device's latest sighting at its site), "previous" (the device
/// has moved on from it) or "lost" (another device answered on it since).
fn address_state(a: &v1::DeviceAddress) -> &'static str {
    if a.current {
        "current"
    } else if a.lost {
        "lost"
    } else {
        "previous"
    }
}

/// The most characters a list takes in a table cell: two MACs, or a few addresses.
const LIST_CELL_WIDTH: usize = 36;

/// A list for a table cell: as many items as fit in [`LIST_CELL_WIDTH`] (at least one, itself
/// cut to the width with `…` when longer), comma-separated, then `+N` for the rest, so one
/// device with many addresses (or a long name) cannot widen every row past a terminal.
/// `--json` always gives whole lists.
pub(crate) fn list_cell<S: AsRef<str>>(items: &[S]) -> String {
    let mut out = String::new();
    let mut shown = 0;
    for item in items {
        let item = item.as_ref();
        let len = item.chars().count();
        if shown == 0 && len > LIST_CELL_WIDTH {
            out.extend(item.chars().take(LIST_CELL_WIDTH - 1));
            out.push('…');
        } else if shown == 0 {
            out.push_str(item);
        } else if out.chars().count() + 1 + len <= LIST_CELL_WIDTH {
            out.push(',');
            out.push_str(item);
        } else {
            break;
        }
        shown += 1;
    }
    if shown < items.len() {
        out.push_str(&format!(" +{}", items.len() - shown));
    }
    out
}

fn print_json(rows: &[serde_json::Value]) {
    out!(
        "{}",
        serde_json::to_string_pretty(rows).unwrap_or_else(|_| "[]".into())
    );
}

fn print_table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out!("{}", out.trim_end());
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}

// === policy and snapshots ===

type Authed<F> = tonic::service::interceptor::InterceptedService<Channel, F>;

async fn policy_command<F: tonic::service::Interceptor>(
    cmd: PolicyCommand,
    query: &mut QueryServiceClient<Authed<F>>,
    admin: &mut AdminServiceClient<Authed<F>>,
    url: &str,
) -> Result<(), Failure> {
    match cmd {
        PolicyCommand::Show {
            client,
            version,
            json,
        } => {
            let p = query
                .get_policy(v1::GetPolicyRequest {
                    client: client.clone(),
                    version: version.unwrap_or_default(),
                })
                .await
                .map_err(|s| status_failure(s, url))?
                .into_inner();
            if json {
                out!(
                    "{}",
                    serde_json::to_string_pretty(&policy_json(&client, &p)).unwrap_or_default()
                );
            } else {
                print_policy(&client, &p);
            }
        }
        PolicyCommand::Set {
            client,
            window_days,
            categories,
            randomized,
        } => {
            if window_days.is_none() && categories.is_none() && randomized.is_none() {
                return Err(Failure::new(
                    EX_USAGE,
                    "nothing to set: pass --window-days, --categories or --randomized",
                ));
            }
            // The options given replace those of the current policy; the rest are kept.
            let mut p = query
                .get_policy(v1::GetPolicyRequest {
                    client: client.clone(),
                    version: String::new(),
                })
                .await
                .map_err(|s| status_failure(s, url))?
                .into_inner();
            if let Some(days) = window_days {
                p.window_days = days;
            }
            if let Some(list) = categories {
                p.categories = list_or_empty(list, "all");
            }
            if let Some(rule) = randomized {
                p.randomized = match rule {
                    RandomizedRule::Count => v1::RandomizedRule::Count,
                    RandomizedRule::Exclude => v1::RandomizedRule::Exclude,
                    RandomizedRule::CountIfNamed => v1::RandomizedRule::CountIfNamed,
                } as i32;
            }
            let saved = admin
                .set_policy(v1::SetPolicyRequest {
                    client: client.clone(),
                    policy: Some(p),
                })
                .await
                .map_err(|s| status_failure(s, url))?
                .into_inner();
            eprintln!(
                "saved policy {} for client {client}; counts follow it from now on",
                saved.version
            );
            print_policy(&client, &saved);
        }
    }
    Ok(())
}

/// A list option where one word ("all", "none", "any") means the empty list.
fn list_or_empty(list: Vec<String>, empty_word: &str) -> Vec<String> {
    if list
        .iter()
        .any(|x| x.trim().eq_ignore_ascii_case(empty_word))
    {
        Vec::new()
    } else {
        list
    }
}

fn randomized_label(r: i32) -> &'static str {
    match v1::RandomizedRule::try_from(r) {
        Ok(v1::RandomizedRule::Exclude) => RandomizedRule::Exclude.label(),
        Ok(v1::RandomizedRule::CountIfNamed) => RandomizedRule::CountIfNamed.label(),
        _ => RandomizedRule::Count.label(),
    }
}

/// The categories a policy counts: every one when it lists none.
fn policy_categories(p: &v1::CountingPolicy) -> Vec<String> {
    if p.categories.is_empty() {
        policy::CATEGORIES.iter().map(|c| (*c).to_owned()).collect()
    } else {
        p.categories.clone()
    }
}

fn policy_json(client: &str, p: &v1::CountingPolicy) -> serde_json::Value {
    json!({
        "client": client,
        "version": p.version,
        "default": p.is_default,
        "window_days": p.window_days,
        "categories": policy_categories(p),
        "randomized": randomized_label(p.randomized),
        "saved_at": p.saved_at.as_ref().map(|t| time(Some(t))),
    })
}

fn print_policy(client: &str, p: &v1::CountingPolicy) {
    out!("client      {client}");
    if p.is_default {
        out!("version     {} (built-in default)", p.version);
    } else {
        out!(
            "version     {} (saved {})",
            p.version,
            time(p.saved_at.as_ref())
        );
    }
    out!("window      {} days", p.window_days);
    out!(
        "categories  {}",
        if p.categories.is_empty() {
            "all".to_owned()
        } else {
            p.categories.join(", ")
        }
    );
    out!("randomized  {}", randomized_label(p.randomized));
}

fn by_category(counts: &[v1::CategoryCount]) -> String {
    counts
        .iter()
        .map(|k| format!("{}={}", k.category, k.count))
        .collect::<Vec<_>>()
        .join(" ")
}

/// "12 devices (computer=10 printer=2)", without the parentheses when there are none.
fn devices_text(devices: u64, counts: &[v1::CategoryCount]) -> String {
    if counts.is_empty() {
        format!("{devices} devices")
    } else {
        format!("{devices} devices ({})", by_category(counts))
    }
}

fn summary_json(s: &v1::SnapshotSummary) -> serde_json::Value {
    let by: serde_json::Map<String, serde_json::Value> = s
        .devices_by_category
        .iter()
        .map(|k| (k.category.clone(), json!(k.count)))
        .collect();
    json!({
        "client": s.client,
        "period": s.period,
        "as_of": time(s.as_of.as_ref()),
        "policy_version": s.policy_version,
        "devices": s.devices,
        "devices_by_category": by,
        "users": s.users,
        "users_policy_version": s.users_policy_version,
        "users_stale": s.users_stale,
    })
}

fn identifiers_text(ids: &[v1::Identifier]) -> String {
    ids.iter()
        .map(|i| format!("{}={}", i.kind, i.value))
        .collect::<Vec<_>>()
        .join(";")
}

fn snapshot_device_json(d: &v1::SnapshotDevice) -> serde_json::Value {
    json!({
        "device_id": d.id,
        "category": d.category,
        "identifiers": d.identifiers.iter().map(|i| json!({"kind": i.kind, "value": i.value, "strong": i.strong, "key": i.key})).collect::<Vec<_>>(),
        "sites": d.sites,
        "first_seen": time(d.first_seen.as_ref()),
        "last_seen": time(d.last_seen.as_ref()),
        "counted_by": d.counted_by,
    })
}

fn change_json(c: Option<&v1::CountChange>) -> serde_json::Value {
    c.map_or(
        serde_json::Value::Null,
        |c| json!({"before": c.before, "after": c.after, "delta": c.delta}),
    )
}

fn change_text(c: Option<&v1::CountChange>) -> String {
    c.map_or_else(String::new, |c| {
        format!("{} -> {} ({:+})", c.before, c.after, c.delta)
    })
}

async fn snapshot_command<F: tonic::service::Interceptor>(
    cmd: SnapshotCommand,
    query: &mut QueryServiceClient<Authed<F>>,
    admin: &mut AdminServiceClient<Authed<F>>,
    url: &str,
) -> Result<(), Failure> {
    match cmd {
        SnapshotCommand::Create { client, period } => {
            let s = admin
                .create_snapshot(v1::CreateSnapshotRequest { client, period })
                .await
                .map_err(|s| status_failure(s, url))?
                .into_inner();
            out!(
                "snapshot {} {} created: {}, {} users, policy {}, as of {}",
                s.client,
                s.period,
                devices_text(s.devices, &s.devices_by_category),
                s.users,
                s.policy_version,
                time(s.as_of.as_ref())
            );
        }
        SnapshotCommand::List { client, json } => {
            let r = query
                .list_snapshots(v1::ListSnapshotsRequest { client })
                .await
                .map_err(|s| status_failure(s, url))?
                .into_inner();
            if json {
                let rows: Vec<_> = r.snapshots.iter().map(summary_json).collect();
                print_json(&rows);
            } else {
                let rows = r
                    .snapshots
                    .iter()
                    .map(|s| {
                        vec![
                            s.period.clone(),
                            s.devices.to_string(),
                            s.users.to_string(),
                            by_category(&s.devices_by_category),
                            s.policy_version.clone(),
                            time(s.as_of.as_ref()),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "PERIOD",
                        "DEVICES",
                        "USERS",
                        "BY CATEGORY",
                        "POLICY",
                        "AS OF",
                    ],
                    rows,
                );
            }
        }
        SnapshotCommand::Show {
            client,
            period,
            json,
        } => {
            if json {
                // The whole snapshot, exactly as `snapshot export --format json` writes it.
                let bytes = export(query, client, period, v1::ExportFormat::Json, url).await?;
                print_bytes(&bytes)?;
                return Ok(());
            }
            let snap = query
                .get_snapshot(v1::GetSnapshotRequest { client, period })
                .await
                .map_err(|s| status_failure(s, url))?
                .into_inner();
            let s = snap.summary.unwrap_or_default();
            out!("snapshot    {} {}", s.client, s.period);
            out!("as of       {}", time(s.as_of.as_ref()));
            out!("policy      {}", s.policy_version);
            out!(
                "devices     {}",
                devices_text(s.devices, &s.devices_by_category)
            );
            out!(
                "users       {} (policy {}{})",
                s.users,
                s.users_policy_version,
                if s.users_stale {
                    "; STALE: a user source's latest read had failed"
                } else {
                    ""
                }
            );
            out!();
            let rows = snap
                .devices
                .iter()
                .map(|d| {
                    vec![
                        d.id.clone(),
                        d.category.clone(),
                        list_cell(
                            &d.identifiers
                                .iter()
                                .map(|i| format!("{}={}", i.kind, i.value))
                                .collect::<Vec<_>>(),
                        ),
                        list_cell(&d.sites),
                        time(d.first_seen.as_ref()),
                        time(d.last_seen.as_ref()),
                        d.counted_by.clone(),
                    ]
                })
                .collect();
            print_table(
                &[
                    "DEVICE",
                    "CATEGORY",
                    "IDENTIFIERS",
                    "SITES",
                    "FIRST SEEN",
                    "LAST SEEN",
                    "COUNTED BY",
                ],
                rows,
            );
            if !snap.users.is_empty() {
                out!();
                let rows = snap
                    .users
                    .iter()
                    .map(|u| {
                        vec![
                            u.id.clone(),
                            u.name.clone(),
                            list_cell(&u.accounts),
                            u.reason.clone(),
                        ]
                    })
                    .collect();
                print_table(&["USER", "NAME", "ACCOUNTS", "COUNTED BY"], rows);
            }
        }
        SnapshotCommand::Diff {
            client,
            period,
            against,
            json,
        } => {
            let d = query
                .diff_snapshot(v1::DiffSnapshotRequest {
                    client,
                    period,
                    against: against.unwrap_or_default(),
                })
                .await
                .map_err(|s| status_failure(s, url))?
                .into_inner();
            if json {
                let by: serde_json::Map<String, serde_json::Value> = d
                    .devices_by_category
                    .iter()
                    .map(|c| (c.category.clone(), change_json(Some(c))))
                    .collect();
                let value = json!({
                    "client": d.client,
                    "period": d.period,
                    "previous_period": (!d.previous_period.is_empty()).then_some(&d.previous_period),
                    "devices": change_json(d.devices.as_ref()),
                    "devices_by_category": by,
                    "users": change_json(d.users.as_ref()),
                    "added": d.added.iter().map(snapshot_device_json).collect::<Vec<_>>(),
                    "removed": d.removed.iter().map(snapshot_device_json).collect::<Vec<_>>(),
                    "category_changed": d.category_changed.iter().map(|c| json!({"device_id": c.id, "from": c.from, "to": c.to})).collect::<Vec<_>>(),
                    "reidentified": d.reidentified.iter().map(|r| json!({"previous_id": r.previous_id, "device_id": r.id, "shared_key": r.shared_key})).collect::<Vec<_>>(),
                    "users_added": d.users_added.iter().map(users::snapshot_user_json).collect::<Vec<_>>(),
                    "users_removed": d.users_removed.iter().map(users::snapshot_user_json).collect::<Vec<_>>(),
                });
                out!(
                    "{}",
                    serde_json::to_string_pretty(&value).unwrap_or_default()
                );
            } else {
                if d.previous_period.is_empty() {
                    out!(
                        "{} {}: no earlier snapshot, every device is added",
                        d.client,
                        d.period
                    );
                } else {
                    out!("{} {} against {}", d.client, d.period, d.previous_period);
                }
                out!("devices   {}", change_text(d.devices.as_ref()));
                for c in &d.devices_by_category {
                    out!("  {:<14}{}", c.category, change_text(Some(c)));
                }
                out!("users     {}", change_text(d.users.as_ref()));
                for x in &d.added {
                    out!(
                        "added     {} {} {}",
                        x.id,
                        x.category,
                        identifiers_text(&x.identifiers)
                    );
                }
                for x in &d.removed {
                    out!(
                        "removed   {} {} {} (last seen {})",
                        x.id,
                        x.category,
                        identifiers_text(&x.identifiers),
                        time(x.last_seen.as_ref())
                    );
                }
                for c in &d.category_changed {
                    out!("category  {} {} -> {}", c.id, c.from, c.to);
                }
                for r in &d.reidentified {
                    out!(
                        "same      {} is now {} (shares {})",
                        r.previous_id,
                        r.id,
                        r.shared_key
                    );
                }
                for u in &d.users_added {
                    out!("user +    {} {} ({})", u.id, u.name, u.accounts.join(", "));
                }
                for u in &d.users_removed {
                    out!("user -    {} {} ({})", u.id, u.name, u.accounts.join(", "));
                }
            }
        }
        SnapshotCommand::Export {
            client,
            period,
            format,
            output,
        } => {
            let format = match format.as_str() {
                "json" => v1::ExportFormat::Json,
                "users-csv" => v1::ExportFormat::UsersCsv,
                _ => v1::ExportFormat::Csv,
            };
            let bytes = export(query, client, period, format, url).await?;
            match output {
                Some(path) => {
                    std::fs::write(&path, &bytes).map_err(|e| {
                        Failure::new(1, format!("cannot write {}: {e}", path.display()))
                    })?;
                    eprintln!("wrote {} ({} bytes)", path.display(), bytes.len());
                }
                None => print_bytes(&bytes)?,
            }
        }
    }
    Ok(())
}

/// Fetches an export whole (it arrives in chunks).
async fn export<F: tonic::service::Interceptor>(
    query: &mut QueryServiceClient<Authed<F>>,
    client: String,
    period: String,
    format: v1::ExportFormat,
    url: &str,
) -> Result<Vec<u8>, Failure> {
    let mut stream = query
        .export_snapshot(v1::ExportSnapshotRequest {
            client,
            period,
            format: format as i32,
        })
        .await
        .map_err(|s| status_failure(s, url))?
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.message().await.map_err(|s| status_failure(s, url))? {
        out.extend_from_slice(&chunk.data);
    }
    Ok(out)
}

fn print_bytes(bytes: &[u8]) -> Result<(), Failure> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| Failure::new(1, format!("cannot write to stdout: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_cells_are_cut_to_fit_a_terminal() {
        // A proxy-ARP router's 21 addresses: a few shown, the rest counted.
        let addresses: Vec<String> = (3..24).map(|i| format!("198.18.20.{i}")).collect();
        let cell = list_cell(&addresses);
        assert_eq!(cell, "198.18.20.3,198.18.20.4,198.18.20.5 +18");
        assert!(cell.chars().count() <= LIST_CELL_WIDTH + " +18".len());
        // A dual-NIC server's two MACs fit whole.
        let macs = ["00:16:3e:50:00:0a", "00:16:3e:50:00:0b"];
        assert_eq!(list_cell(&macs), "00:16:3e:50:00:0a,00:16:3e:50:00:0b");
        // A name longer than the cell is cut too; no items is an empty cell.
        let long = "x".repeat(80);
        let cut = format!("{}…", "x".repeat(LIST_CELL_WIDTH - 1));
        assert_eq!(list_cell(&[&long]), cut);
        assert_eq!(list_cell(&[long.as_str(), "b"]), format!("{cut} +1"));
        assert_eq!(list_cell::<&str>(&[]), "");
    }
}
