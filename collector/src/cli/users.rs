//! `census users`: a client's users and why each counts, the billable-user policy, and an
//! Entra ID read on demand.

use census_proto::v1::{
    self, admin_service_client::AdminServiceClient, query_service_client::QueryServiceClient,
};
use clap::{Args, Subcommand};
use serde_json::json;

use super::{
    Authed, EX_USAGE, Failure, list_or_empty, print_json, print_table, status_failure, time,
};

/// `census users [--client C] [--counted|--not-counted] [--json]`, or one of its subcommands.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct UsersArgs {
    #[command(subcommand)]
    pub command: Option<UsersCommand>,
    /// The client whose users to list.
    #[arg(long, required = true)]
    pub client: Option<String>,
    /// Only users that count (or, with --not-counted, that do not).
    #[arg(long, conflicts_with = "not_counted")]
    pub counted: bool,
    #[arg(long)]
    pub not_counted: bool,
    /// Show every account of each user, with its own decision.
    #[arg(long)]
    pub accounts: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// The client's billable-user policy (versioned; the default is user-v1).
    #[command(subcommand)]
    Policy(UserPolicyCommand),
    /// Read the client's Entra ID users now (the collector reads them every graph_interval
    /// anyway, and a refresh while a read runs joins it) and show the state of its user
    /// sources. Waits up to --timeout; a read still running then goes on on the collector
    /// (exit 75), and `census users --client C` shows its outcome.
    Refresh {
        #[arg(long)]
        client: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum UserPolicyCommand {
    /// The client's current user policy (or one version of it).
    Show {
        #[arg(long)]
        client: String,
        /// A version to show, e.g. one a snapshot names (acme-users-2, user-v1).
        #[arg(long)]
        version: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Save a new version of the client's user policy: the options given replace those of the
    /// current policy, the others are kept.
    Set {
        #[arg(long)]
        client: String,
        /// An account with no logon in this many days does not count (AD lastLogonTimestamp;
        /// Entra ID sign-ins where the tenant has Entra ID P1); an account that never logged
        /// on counts until it is this many days old. 0 (off) or 15 to 3650
        /// (lastLogonTimestamp lags real logons by up to 14 days).
        #[arg(long)]
        stale_logon_days: Option<u32>,
        /// Whether AD accounts with a servicePrincipalName count.
        #[arg(long)]
        count_service_accounts: Option<bool>,
        /// AD groups (DNs or names) whose members do not count, nested members included
        /// (a member of a group inside an exclusion group is excluded too), comma-separated,
        /// or "none".
        #[arg(long, value_delimiter = ',')]
        exclusion_groups: Option<Vec<String>>,
        /// Entra ID licences that make a user billable (SKU ids or part numbers such as
        /// SPE_E3), comma-separated, or "any".
        #[arg(long, value_delimiter = ',')]
        licences: Option<Vec<String>>,
    },
}

/// The USERS cell of `census counts`: the count, marked when it comes from a failed source.
pub(super) fn users_cell(c: &v1::ClientCounts) -> String {
    if c.users_stale {
        format!("{} (stale)", c.users)
    } else {
        c.users.to_string()
    }
}

/// One line on stderr per stale user source: the count is kept but must not be trusted blindly.
pub(super) fn warn_stale(counts: &[v1::ClientCounts]) {
    for c in counts {
        for s in c.user_sources.iter().filter(|s| s.stale) {
            eprintln!(
                "warning: client {}: users from {} are stale: its latest read failed ({}); counted from the read of {}",
                c.client,
                s.source,
                s.error,
                non_empty(time(s.last_read.as_ref()), "never")
            );
        }
    }
}

fn non_empty(s: String, otherwise: &str) -> String {
    if s.is_empty() {
        otherwise.to_owned()
    } else {
        s
    }
}

pub(super) fn source_json(s: &v1::UserSource) -> serde_json::Value {
    json!({
        "source": s.source,
        "kind": s.kind,
        "last_read": (s.last_read.is_some()).then(|| time(s.last_read.as_ref())),
        "accounts": s.accounts,
        "last_attempt": (s.last_attempt.is_some()).then(|| time(s.last_attempt.as_ref())),
        "error": (!s.error.is_empty()).then_some(&s.error),
        "stale": s.stale,
        "reading": s.reading,
    })
}

pub(super) fn snapshot_user_json(u: &v1::SnapshotUser) -> serde_json::Value {
    json!({
        "user_id": u.id,
        "name": u.name,
        "display_name": u.display_name,
        "accounts": u.accounts,
        "counted_by": u.reason,
    })
}

fn account_json(a: &v1::UserAccount) -> serde_json::Value {
    json!({
        "source": a.source,
        "id": a.id,
        "name": a.name,
        "display_name": a.display_name,
        "billable": a.billable,
        "reason": a.reason,
        "present": a.present,
        "first_seen": time(a.first_seen.as_ref()),
        "last_seen": time(a.last_seen.as_ref()),
        "removed_at": a.removed_at.is_some().then(|| time(a.removed_at.as_ref())),
        "join_keys": a.join_keys,
        "last_logon": a.last_logon.is_some().then(|| time(a.last_logon.as_ref())),
        "created": a.created.is_some().then(|| time(a.created.as_ref())),
    })
}

fn user_json(u: &v1::User) -> serde_json::Value {
    json!({
        "id": u.id,
        "name": u.name,
        "display_name": u.display_name,
        "counted": u.counted,
        "reason": u.reason,
        "stale": u.stale,
        "accounts": u.accounts.iter().map(account_json).collect::<Vec<_>>(),
    })
}

fn user_policy_json(client: &str, p: &v1::UserPolicy) -> serde_json::Value {
    json!({
        "client": client,
        "version": p.version,
        "default": p.is_default,
        "stale_logon_days": p.stale_logon_days,
        "count_service_accounts": p.count_service_accounts,
        "exclusion_groups": p.exclusion_groups,
        "licence_allow_list": p.licence_allow_list,
        "saved_at": p.saved_at.is_some().then(|| time(p.saved_at.as_ref())),
    })
}

fn print_user_policy(client: &str, p: &v1::UserPolicy) {
    out!(
        "user policy {} of client {client}{}",
        p.version,
        if p.is_default { " (the default)" } else { "" }
    );
    out!(
        "stale logon         {}",
        if p.stale_logon_days == 0 {
            "off".to_owned()
        } else {
            format!("no logon within {} days: not counted", p.stale_logon_days)
        }
    );
    out!(
        "service accounts    {}",
        if p.count_service_accounts {
            "count"
        } else {
            "not counted"
        }
    );
    out!(
        "exclusion groups    {}",
        if p.exclusion_groups.is_empty() {
            "none".to_owned()
        } else {
            p.exclusion_groups.join(", ")
        }
    );
    out!(
        "licences (Entra ID) {}",
        if p.licence_allow_list.is_empty() {
            "any licence".to_owned()
        } else {
            p.licence_allow_list.join(", ")
        }
    );
    if p.saved_at.is_some() {
        out!("saved               {}", time(p.saved_at.as_ref()));
    }
}

fn print_sources(sources: &[v1::UserSource]) {
    let rows = sources
        .iter()
        .map(|s| {
            vec![
                s.source.clone(),
                non_empty(time(s.last_read.as_ref()), "never"),
                s.accounts.to_string(),
                non_empty(time(s.last_attempt.as_ref()), "-"),
                match (s.reading, s.stale) {
                    (true, true) => format!("READING NOW; last attempt STALE: {}", s.error),
                    (true, false) => "READING NOW".into(),
                    (false, true) => format!("STALE: {}", s.error),
                    (false, false) => "ok".into(),
                },
            ]
        })
        .collect();
    print_table(
        &["SOURCE", "LAST READ", "ACCOUNTS", "LAST ATTEMPT", "STATE"],
        rows,
    );
}

/// sysexits EX_TEMPFAIL: the Entra ID read asked for has not ended yet; it goes on.
const EX_TEMPFAIL: u8 = 75;
/// How much sooner than `--timeout` the collector is asked to answer a refresh, so its answer
/// ("still running") arrives before the CLI gives up.
const REFRESH_MARGIN_SECS: u64 = 2;

/// The one line for a refresh whose read goes on after the CLI stopped waiting.
fn still_running(client: &str, waited: &str) -> Failure {
    Failure::new(
        EX_TEMPFAIL,
        format!(
            "the Entra ID read of client {client} is still running on the collector after {waited} (raise --timeout to wait longer); it goes on by itself: `census users --client {client}` shows its outcome (the source's last attempt and error) once it ends"
        ),
    )
}

pub(super) async fn run<F: tonic::service::Interceptor>(
    args: UsersArgs,
    query: &mut QueryServiceClient<Authed<F>>,
    admin: &mut AdminServiceClient<Authed<F>>,
    url: &str,
    timeout_secs: u64,
) -> Result<(), Failure> {
    match args.command {
        None => {
            let client = args.client.ok_or_else(|| {
                Failure::new(
                    EX_USAGE,
                    "census users needs --client (see census users --help)",
                )
            })?;
            list(
                query,
                client,
                if args.counted {
                    v1::CountedFilter::Counted
                } else if args.not_counted {
                    v1::CountedFilter::NotCounted
                } else {
                    v1::CountedFilter::Any
                },
                args.accounts,
                args.json,
                url,
            )
            .await
        }
        Some(UsersCommand::Refresh { client, json }) => {
            let wait = timeout_secs.saturating_sub(REFRESH_MARGIN_SECS).max(1);
            let r = admin
                .refresh_users(v1::RefreshUsersRequest {
                    client: client.clone(),
                    wait_seconds: u32::try_from(wait).unwrap_or(u32::MAX),
                })
                .await
                .map_err(|s| {
                    // The CLI's own --timeout ran out before the collector answered (tonic
                    // reports it as CANCELLED "Timeout expired"): the read goes on there.
                    if s.code() == tonic::Code::Cancelled && s.message().contains("Timeout") {
                        still_running(&client, &format!("{timeout_secs} s"))
                    } else {
                        status_failure(s, url)
                    }
                })?
                .into_inner();
            if r.running {
                return Err(still_running(&client, &format!("{wait} s")));
            }
            if json {
                print_json(&r.sources.iter().map(source_json).collect::<Vec<_>>());
            } else {
                print_sources(&r.sources);
            }
            // A failed read is stored (the users are kept, marked stale), but the person who
            // asked for it must see it failed.
            match r.sources.iter().find(|s| s.kind == "entra-id" && s.stale) {
                Some(s) => Err(Failure::new(
                    1,
                    format!(
                        "the Entra ID read of client {client} failed: {}; the users of its last complete read are kept, marked stale",
                        s.error
                    ),
                )),
                None => Ok(()),
            }
        }
        Some(UsersCommand::Policy(UserPolicyCommand::Show {
            client,
            version,
            json,
        })) => {
            let p = query
                .get_user_policy(v1::GetUserPolicyRequest {
                    client: client.clone(),
                    version: version.unwrap_or_default(),
                })
                .await
                .map_err(|s| status_failure(s, url))?
                .into_inner();
            if json {
                out!(
                    "{}",
                    serde_json::to_string_pretty(&user_policy_json(&client, &p))
                        .unwrap_or_default()
                );
            } else {
                print_user_policy(&client, &p);
            }
            Ok(())
        }
        Some(UsersCommand::Policy(UserPolicyCommand::Set {
            client,
            stale_logon_days,
            count_service_accounts,
            exclusion_groups,
            licences,
        })) => {
            if stale_logon_days.is_none()
                && count_service_accounts.is_none()
                && exclusion_groups.is_none()
                && licences.is_none()
            {
                return Err(Failure::new(
                    EX_USAGE,
                    "nothing to set: pass --stale-logon-days, --count-service-accounts, --exclusion-groups or --licences",
                ));
            }
            let mut p = query
                .get_user_policy(v1::GetUserPolicyRequest {
                    client: client.clone(),
                    version: String::new(),
                })
                .await
                .map_err(|s| status_failure(s, url))?
                .into_inner();
            if let Some(days) = stale_logon_days {
                p.stale_logon_days = days;
            }
            if let Some(b) = count_service_accounts {
                p.count_service_accounts = b;
            }
            if let Some(list) = exclusion_groups {
                p.exclusion_groups = list_or_empty(list, "none");
            }
            if let Some(list) = licences {
                p.licence_allow_list = list_or_empty(list, "any");
            }
            let saved = admin
                .set_user_policy(v1::SetUserPolicyRequest {
                    client: client.clone(),
                    policy: Some(p),
                })
                .await
                .map_err(|s| status_failure(s, url))?
                .into_inner();
            eprintln!(
                "saved user policy {} for client {client}; user counts follow it from now on",
                saved.version
            );
            print_user_policy(&client, &saved);
            Ok(())
        }
    }
}

/// What a person reads a user by: the collector's name (a UPN, else a sAMAccountName, else
/// the display name), else the display name, else the id.
fn readable(u: &v1::User) -> String {
    [&u.name, &u.display_name, &u.id]
        .into_iter()
        .find(|n| !n.trim().is_empty())
        .cloned()
        .unwrap_or_default()
}

async fn list<F: tonic::service::Interceptor>(
    query: &mut QueryServiceClient<Authed<F>>,
    client: String,
    counted: v1::CountedFilter,
    accounts: bool,
    json: bool,
    url: &str,
) -> Result<(), Failure> {
    let r = query
        .list_users(v1::ListUsersRequest {
            client: client.clone(),
            counted: counted as i32,
        })
        .await
        .map_err(|s| status_failure(s, url))?
        .into_inner();
    if json {
        let value = json!({
            "client": client,
            "as_of": time(r.as_of.as_ref()),
            "policy": r.policy.as_ref().map(|p| user_policy_json(&client, p)),
            "sources": r.sources.iter().map(source_json).collect::<Vec<_>>(),
            "users": r.users.iter().map(user_json).collect::<Vec<_>>(),
        });
        out!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        return Ok(());
    }
    let rows = r
        .users
        .iter()
        .map(|u| {
            vec![
                readable(u),
                u.id.clone(),
                u.accounts
                    .iter()
                    .map(|a| a.source.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                if u.counted { "yes" } else { "no" }.into(),
                u.reason.clone(),
            ]
        })
        .collect();
    print_table(&["NAME", "USER", "SOURCES", "COUNTED", "WHY"], rows);
    if accounts {
        out!();
        let rows = r
            .users
            .iter()
            .flat_map(|u| {
                u.accounts.iter().map(move |a| {
                    vec![
                        u.id.clone(),
                        format!("{}/{}", a.source, a.name),
                        if a.present { "present" } else { "removed" }.into(),
                        non_empty(time(a.last_logon.as_ref()), "-"),
                        if a.billable { "yes" } else { "no" }.into(),
                        a.reason.clone(),
                    ]
                })
            })
            .collect();
        print_table(
            &["USER", "ACCOUNT", "STATE", "LAST LOGON", "BILLABLE", "WHY"],
            rows,
        );
    }
    out!();
    let counted_n = r.users.iter().filter(|u| u.counted).count();
    let policy = r.policy.as_ref().map_or("", |p| p.version.as_str());
    out!(
        "{counted_n} of {} users counted under policy {policy}, as of {}",
        r.users.len(),
        time(r.as_of.as_ref())
    );
    print_sources(&r.sources);
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use crate::cli::Cli;

    /// The help of `census users policy set`, with whitespace folded (clap wraps lines).
    fn policy_set_help() -> String {
        let mut cli = Cli::command();
        let set = cli
            .find_subcommand_mut("users")
            .and_then(|c| c.find_subcommand_mut("policy"))
            .and_then(|c| c.find_subcommand_mut("set"))
            .expect("census users policy set");
        set.render_long_help()
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn policy_set_help_says_nested_members_are_excluded() {
        let help = policy_set_help();
        assert!(help.contains("nested members included"), "{help}");
        assert!(!help.contains("direct members"), "{help}");
        assert!(
            help.contains("an account that never logged on counts until it is this many days old"),
            "{help}"
        );
    }

    #[test]
    fn a_call_that_outlives_the_timeout_names_the_flag() {
        let f = crate::cli::status_failure(
            tonic::Status::cancelled("Timeout expired"),
            "https://127.0.0.1:7400",
        );
        assert_eq!(f.code, crate::cli::EX_UNAVAILABLE);
        assert!(
            f.message.contains("did not answer within --timeout"),
            "{}",
            f.message
        );
        let running = super::still_running("acme", "13 s");
        assert_eq!(running.code, 75);
        assert!(
            running
                .message
                .contains("still running on the collector after 13 s (raise --timeout")
                && running
                    .message
                    .contains("`census users --client acme` shows its outcome"),
            "{}",
            running.message
        );
    }

    #[test]
    fn a_user_is_shown_by_a_name_people_read() {
        let user = |name: &str, display: &str| census_proto::v1::User {
            id: "sid:S-1-5-21-1-2-3-1001".into(),
            name: name.into(),
            display_name: display.into(),
            ..Default::default()
        };
        assert_eq!(
            super::readable(&user("alice@corp.example", "Alice")),
            "alice@corp.example"
        );
        assert_eq!(super::readable(&user("", "Kiosk")), "Kiosk");
        assert_eq!(super::readable(&user("", "")), "sid:S-1-5-21-1-2-3-1001");
    }
}
