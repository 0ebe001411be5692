//! Users end to end (issue 5): the collector reads a client's Entra ID users from the lab's
//! Graph stand-in (`census-graph-lab`: several pages linked by `@odata.nextLink`, a 429 with
//! Retry-After in the middle, members and guests, licensed and unlicensed, disabled users) and
//! counts them exactly under the client's billable-user policy; an expired secret keeps the
//! counts, marked stale. The Active Directory side, with a real Samba AD DC read by the agent
//! and hybrid users joined with Entra ID, is in `directory_users` below.

use std::time::SystemTime;

use anyhow::{Context, Result, ensure};
use census_tests::{
    lab::{Lab, lab_skipped},
    support::{Collector, GraphLab, error_lines},
};
use serde_json::{Value, json};

const TENANT: &str = "contoso.onmicrosoft.com";
const CLIENT_ID: &str = "6731de76-14a6-49ae-97bc-6eba6914391e";
const SECRET: &str = "Zx8Q~lab.secret-value";
const E3: &str = "05e9a617-0261-4cee-bb44-138d3ef5d965";
const PBI: &str = "a403ebcc-fae0-4ca2-8c8c-7a907fd6c235";

/// A Graph time `days` ago.
fn days_ago(days: u64) -> String {
    let now = census_proto::convert::unix_millis(SystemTime::now());
    census_collector::snapshot::rfc3339(now - days * 24 * 3600 * 1000)
}

/// A user made in 2024 who signed in two days ago (Graph gives signInActivity only when it is
/// selected, which the collector does first).
fn graph_user(n: u32, kind: &str, enabled: bool, skus: &[&str]) -> Value {
    json!({
        "id": format!("00000000-0000-4000-8000-{n:012}"),
        "displayName": format!("User {n}"),
        "userPrincipalName": format!("user{n}@contoso.com"),
        "accountEnabled": enabled,
        "userType": kind,
        "assignedLicenses": skus.iter().map(|s| json!({"skuId": s, "disabledPlans": []})).collect::<Vec<_>>(),
        "createdDateTime": "2024-01-01T00:00:00Z",
        "signInActivity": {
            "lastSignInDateTime": days_ago(9),
            "lastNonInteractiveSignInDateTime": days_ago(2),
        },
    })
}

fn fixture(users: &[Value], expired: bool) -> Value {
    json!({
        "tenant": TENANT,
        "client_id": CLIENT_ID,
        "client_secret": SECRET,
        "secret_expired": expired,
        "page_size": 4,
        "throttle_page": 2,
        "retry_after": 1,
        "skus": [
            {"skuId": E3, "skuPartNumber": "SPE_E3"},
            {"skuId": PBI, "skuPartNumber": "POWER_BI_STANDARD"},
        ],
        "users": users,
    })
}

/// The collector's config: `client` reads the lab's tenant.
fn collector_config(lab: &Lab, graph: &GraphLab, client: &str) -> Result<std::path::PathBuf> {
    let dir = tempfile::Builder::new()
        .prefix("collector-config")
        .tempdir_in(lab.dir())?
        .keep();
    let secret = dir.join("graph-secret");
    std::fs::write(&secret, format!("{SECRET}\n"))?;
    let path = dir.join("collector.toml");
    std::fs::write(
        &path,
        format!(
            "graph_interval = \"1h\"\n\n[clients.{client}.graph]\ntenant_id = \"{TENANT}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = {{ file = {secret:?} }}\nlogin_base_url = \"{url}\"\ngraph_base_url = \"{url}\"\n",
            url = graph.url()
        ),
    )?;
    Ok(path)
}

/// The current billing period, `YYYY-MM`.
fn this_month() -> String {
    let now = census_proto::convert::unix_millis(SystemTime::now());
    census_collector::snapshot::rfc3339(now)[..7].to_owned()
}

fn users_where(listing: &Value, counted: bool) -> Vec<&Value> {
    listing["users"]
        .as_array()
        .map(|a| a.iter().filter(|u| u["counted"] == counted).collect())
        .unwrap_or_default()
}

fn reason_of<'a>(listing: &'a Value, upn: &str) -> Option<&'a str> {
    listing["users"]
        .as_array()?
        .iter()
        .find(|u| u["name"] == upn)?["reason"]
        .as_str()
}

#[test]
fn entra_users_are_read_through_pages_and_throttling_and_counted_exactly() -> Result<()> {
    if lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    // 13 users over 4 pages: 6 billable members, the rest not for one reason each.
    let mut users = Vec::new();
    for n in 1..=4 {
        users.push(graph_user(n, "Member", true, &[E3]));
    }
    users.push(graph_user(5, "Member", true, &[PBI]));
    users.push(graph_user(6, "Member", true, &[E3, PBI]));
    users.push(graph_user(7, "Guest", true, &[E3])); // a guest
    users.push(graph_user(8, "Member", false, &[E3])); // disabled
    users.push(graph_user(9, "Member", true, &[])); // unlicensed
    users.push(graph_user(10, "Guest", true, &[]));
    users.push(graph_user(11, "Member", false, &[]));
    let mut no_state = graph_user(12, "Member", true, &[E3]);
    no_state
        .as_object_mut()
        .context("object")?
        .remove("accountEnabled"); // unknown state is not enabled
    users.push(no_state);
    users.push(graph_user(13, "Member", true, &[E3]));
    let graph = GraphLab::start(&lab, &fixture(&users, false))?;

    let data = lab.dir().join("collector");
    let config = collector_config(&lab, &graph, "contoso")?;
    let collector = Collector::start_with_config(&lab, &data, &config)?;

    // A read now (the schedule's first read may be running: reads of a client take turns).
    let out = collector.census_ok(["users", "refresh", "--client", "contoso", "--json"])?;
    let sources: Value = serde_json::from_str(&out)?;
    ensure!(
        sources[0]["source"] == format!("entra:{TENANT}") && sources[0]["accounts"] == 13,
        "{sources}"
    );
    let log = graph.log();
    ensure!(
        log.contains("users: page 2 throttled") && log.contains("users: page 4, 1 users"),
        "every page read, through the 429:\n{log}"
    );

    // Any licence counts by default: members 1-6 and 13.
    let counts = collector.counts_of("contoso")?;
    ensure!(
        counts.users == 7 && !counts.users_stale && counts.users_policy_version == "user-v1",
        "{counts:?}"
    );
    let listing = collector.users("contoso")?;
    ensure!(users_where(&listing, true).len() == 7);
    for (upn, why) in [
        ("user7@contoso.com", "guest account"),
        ("user8@contoso.com", "disabled"),
        ("user9@contoso.com", "no licence"),
        ("user12@contoso.com", "account state unknown"),
    ] {
        let reason = reason_of(&listing, upn).context("listed")?;
        ensure!(reason.contains(why), "{upn}: {reason}");
    }
    ensure!(
        reason_of(&listing, "user1@contoso.com")
            .is_some_and(|r| r.starts_with("counted: entra:") && r.contains("SPE_E3")),
        "{listing}"
    );

    // The policy's licence allow-list, by part number: only E3 holders count.
    collector.census_ok([
        "users",
        "policy",
        "set",
        "--client",
        "contoso",
        "--licences",
        "SPE_E3",
    ])?;
    let counts = collector.counts_of("contoso")?;
    ensure!(
        counts.users == 6 && counts.users_policy_version == "contoso-users-1",
        "user 5 holds only Power BI: {counts:?}"
    );

    // A user who leaves the tenant stops counting, with history kept.
    users.retain(|u| u["userPrincipalName"] != "user13@contoso.com");
    graph.set(&fixture(&users, false))?;
    collector.census_ok(["users", "refresh", "--client", "contoso"])?;
    let listing = collector.users("contoso")?;
    ensure!(collector.counts_of("contoso")?.users == 5);
    let gone = reason_of(&listing, "user13@contoso.com").context("user13 kept")?;
    ensure!(gone.contains("no longer in entra:"), "{gone}");

    // The snapshot freezes the users with the policy, and exports them.
    let period = this_month();
    collector.census_ok([
        "snapshot", "create", "--client", "contoso", "--period", &period,
    ])?;
    let csv = collector.census_ok([
        "snapshot",
        "export",
        "--client",
        "contoso",
        "--period",
        &period,
        "--format",
        "users-csv",
    ])?;
    ensure!(
        csv.lines().count() == 6 && csv.starts_with("client,period,user_id,name"),
        "{csv}"
    );

    // The secret expires: after a restart (no cached token) the read fails with one clear
    // line, and the counts are kept, marked stale.
    graph.set(&fixture(&users, true))?;
    let collector = collector.restart()?;
    let out = collector.census(["users", "refresh", "--client", "contoso"])?;
    let err = error_lines(&out);
    ensure!(
        !out.status.success()
            && err.len() == 1
            && err[0].contains("AADSTS7000222")
            && err[0].contains("kept, marked stale"),
        "{err:?}"
    );
    let counts = collector.counts_of("contoso")?;
    ensure!(counts.users == 5 && counts.users_stale, "{counts:?}");
    let warn = collector.census(["counts", "--client", "contoso"])?;
    let stderr = String::from_utf8_lossy(&warn.stderr);
    ensure!(
        stderr.contains("users from entra:contoso.onmicrosoft.com are stale"),
        "{stderr}"
    );

    // A client without a tenant is told how to configure one.
    let out = collector.census(["users", "refresh", "--client", "globex"])?;
    let err = error_lines(&out);
    ensure!(
        !out.status.success() && err.len() == 1 && err[0].contains("[clients.globex.graph]"),
        "{err:?}"
    );
    Ok(())
}

#[test]
fn entra_sign_ins_new_accounts_and_reads_that_outlive_the_cli() -> Result<()> {
    if lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    // All licensed members; what differs is their sign-ins and age.
    let user = |n: u32, last_sign_in: Option<u64>, created_days_ago: u64| {
        let mut u = graph_user(n, "Member", true, &[E3]);
        u["createdDateTime"] = json!(days_ago(created_days_ago));
        match last_sign_in {
            Some(days) => u["signInActivity"] = json!({"lastSignInDateTime": days_ago(days)}),
            // Graph leaves signInActivity out for a user who never signed in.
            None => {
                if let Some(o) = u.as_object_mut() {
                    o.remove("signInActivity");
                }
            }
        }
        u
    };
    let mut kiosk = user(5, Some(1), 700);
    kiosk["userPrincipalName"] = Value::Null;
    kiosk["displayName"] = json!("Kiosk Shared");
    let users = vec![
        user(1, Some(2), 900),   // active
        user(2, None, 3),        // a new hire
        user(3, None, 400),      // never used, old
        user(4, Some(200), 900), // gone quiet
        kiosk,                   // no UPN: shown by its display name
    ];
    let mut fixture = fixture(&users, false);
    fixture["throttle_page"] = json!(0);
    let graph = GraphLab::start(&lab, &fixture)?;
    let data = lab.dir().join("collector");
    let config = collector_config(&lab, &graph, "contoso")?;
    let collector = Collector::start_with_config(&lab, &data, &config)?;

    collector.census_ok(["users", "refresh", "--client", "contoso"])?;
    let listing = collector.users("contoso")?;
    for (upn, counted, why) in [
        ("user1@contoso.com", true, ", last sign-in "),
        ("user2@contoso.com", true, "never signed in, created "),
        (
            "user3@contoso.com",
            false,
            "stale: never signed in, created ",
        ),
        ("user4@contoso.com", false, "stale: last sign-in "),
        ("Kiosk Shared", true, ", last sign-in "),
    ] {
        let u = listing["users"]
            .as_array()
            .and_then(|a| a.iter().find(|u| u["name"] == upn))
            .with_context(|| format!("{upn} in {listing}"))?;
        ensure!(
            u["counted"] == counted && u["reason"].as_str().is_some_and(|r| r.contains(why)),
            "{upn}: {u}"
        );
    }
    ensure!(
        reason_of(&listing, "user2@contoso.com")
            .is_some_and(|r| r.contains("(3 days ago): a new account")),
        "{listing}"
    );
    ensure!(collector.counts_of("contoso")?.users == 3);

    // The table leads with a name people read: the UPN, else the display name.
    let table = collector.census_ok(["users", "--client", "contoso"])?;
    let mut lines = table.lines();
    ensure!(
        lines.next().is_some_and(|h| h.starts_with("NAME ")),
        "{table}"
    );
    ensure!(
        table.lines().any(|l| l.starts_with("user1@contoso.com "))
            && table.lines().any(|l| l.starts_with("Kiosk Shared ")),
        "{table}"
    );

    // A tenant without Entra ID P1 refuses signInActivity: the read goes on without it, and
    // the licence decides alone (nobody's sign-ins are known).
    fixture["no_premium"] = json!(true);
    graph.set(&fixture)?;
    collector.census_ok(["users", "refresh", "--client", "contoso"])?;
    ensure!(
        graph.log().contains("users: signInActivity refused"),
        "{}",
        graph.log()
    );
    let counts = collector.counts_of("contoso")?;
    ensure!(counts.users == 5 && !counts.users_stale, "{counts:?}");

    // Graph answers 503 for longer than the CLI waits (8 attempts, 2 s apart). Two refreshes
    // at once: each says in one line that the read goes on and where to see its outcome
    // (exit 75); they share one read.
    fixture["busy"] = json!(true);
    fixture["retry_after"] = json!(2);
    graph.set(&fixture)?;
    let refresh =
        || collector.census(["--timeout", "3", "users", "refresh", "--client", "contoso"]);
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(refresh);
        let b = s.spawn(refresh);
        (a.join(), b.join())
    });
    for out in [a, b] {
        let out = out.map_err(|_| anyhow::anyhow!("census panicked"))??;
        let (code, err) = (out.status.code(), error_lines(&out));
        ensure!(
            code == Some(75)
                && err.len() == 1
                && err[0].contains("is still running on the collector")
                && err[0].contains("`census users --client contoso` shows its outcome"),
            "{code:?}: {err:?}"
        );
    }
    // Meanwhile `census users` says the read is running (it has at least six more waits of
    // Retry-After: 2 to obey).
    let listing = collector.users("contoso")?;
    ensure!(
        listing["sources"][0]["reading"] == true,
        "{}",
        listing["sources"]
    );
    let table = collector.census_ok(["users", "--client", "contoso"])?;
    ensure!(table.contains("READING NOW"), "{table}");
    // The read runs to its end on the collector, and its failure is stored: the source is
    // stale with the error and the time of the attempt, and the counts say so.
    let mut source = Value::Null;
    for _ in 0..120 {
        let listing = collector.users("contoso")?;
        source = listing["sources"]
            .as_array()
            .and_then(|s| s.first())
            .cloned()
            .unwrap_or_default();
        // The outcome is stored a moment before the read's task ends.
        if source["stale"] == true && source["reading"] == false {
            break;
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    ensure!(
        source["stale"] == true
            && source["reading"] == false
            && source["error"]
                .as_str()
                .is_some_and(|e| e.contains("HTTP 503") && e.contains("after 8 attempts"))
            && source["last_attempt"].is_string(),
        "{source}"
    );
    let busy = graph.log().matches("users: page 1 busy").count();
    ensure!(busy == 8, "one read for both refreshes, 8 attempts: {busy}");
    let counts = collector.counts_of("contoso")?;
    ensure!(counts.users == 5 && counts.users_stale, "{counts:?}");
    let table = collector.census_ok(["users", "--client", "contoso"])?;
    ensure!(
        table.contains("LAST ATTEMPT")
            && table.contains("STALE: Microsoft Graph still answered HTTP 503"),
        "{table}"
    );
    Ok(())
}

/// A FILETIME (100 ns ticks since 1601) `days` ago.
fn filetime_days_ago(days: u64) -> i64 {
    let t = SystemTime::now() - std::time::Duration::from_secs(days * 24 * 3600);
    let unix = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (i64::try_from(unix.as_secs()).unwrap_or(0) + 11_644_473_600) * 10_000_000
}

/// The person one of whose accounts is `sam` (its name is the UPN `sam@…` or `sam`).
fn person<'a>(listing: &'a Value, sam: &str) -> Result<&'a Value> {
    let prefix = format!("{sam}@");
    listing["users"]
        .as_array()
        .and_then(|users| {
            users.iter().find(|u| {
                u["accounts"].as_array().is_some_and(|accounts| {
                    accounts.iter().any(|a| {
                        a["name"].as_str().is_some_and(|n| {
                            n.eq_ignore_ascii_case(sam)
                                || n.to_ascii_lowercase().starts_with(&prefix)
                        })
                    })
                })
            })
        })
        .with_context(|| format!("no user {sam}"))
}

fn counted_users(collector: &Collector<'_>, client: &str) -> Result<u64> {
    Ok(collector.counts_of(client)?.users)
}

#[test]
fn directory_users_from_samba_and_entra_count_once_per_person() -> Result<()> {
    use census_collector::graph::{ad_bytes_from_guid_string, immutable_id_from_ad_guid};
    use census_tests::{lab::SiteSpec, support::agent_once};
    use std::net::Ipv4Addr;

    if lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let site = lab.add_site(SiteSpec::new(
        "users",
        "198.18.41.0/24".parse()?,
        Ipv4Addr::new(198, 18, 41, 2),
    ))?;
    let agent_ns = site.agent().ns().to_owned();
    let dc = lab.samba_dc(&site, Ipv4Addr::new(198, 18, 41, 10), "corp.census.test")?;

    // Every kind of account the policy is about; all but gina, ivan and the bulk users logged
    // on two days ago, so only the rule meant for each decides it.
    let password = "Lab-User-Passw0rd!";
    for name in [
        "alice",
        "erin",
        "bob",
        "carol",
        "svc-backup",
        "dave",
        "frank",
        "gina",
        "hank",
        "ivan",
    ] {
        dc.add_user(name, password)?;
    }
    // gina and the bulk users are new hires who never logged on (billed: an account is billed
    // from the day it exists); ivan never logged on either, but his account is 400 days old.
    let now_secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    dc.set_when_created("ivan", now_secs - 400 * 24 * 3600)?;
    dc.disable_user("bob")?;
    dc.set_expiry_days("carol", 0)?;
    dc.add_spn("http/backup.corp.census.test", "svc-backup")?;
    dc.add_group("Billing Exclusions")?;
    dc.add_group_members("Billing Exclusions", &["dave"])?;
    // hank is only in Contractors EU, two levels inside Billing Exclusions (by way of
    // Contractors), and Contractors EU and Contractors are in each other: a cycle.
    dc.add_group("Contractors")?;
    dc.add_group("Contractors EU")?;
    dc.add_group_members("Billing Exclusions", &["Contractors"])?;
    dc.add_group_members("Contractors", &["Contractors EU"])?;
    dc.add_group_members("Contractors EU", &["Contractors", "hank"])?;
    dc.add_computer("ws01")?;
    dc.add_contact("Erin External")?;
    let recent = filetime_days_ago(2);
    for name in [
        "alice",
        "erin",
        "bob",
        "carol",
        "svc-backup",
        "dave",
        "hank",
        "Administrator",
    ] {
        dc.set_last_logon(name, recent)?;
    }
    dc.set_last_logon("frank", filetime_days_ago(400))?;
    let bulk = dc.add_bulk_users("bulk", 1100)?;
    let persons = dc.search(
        "(&(objectCategory=person)(objectClass=user))",
        &["sAMAccountName"],
    )?;
    ensure!(persons.len() >= 1100 + 10, "{} persons", persons.len());

    // Entra ID: alice synchronised (joined by SID), erin synchronised (joined by the objectGUID
    // her immutable id encodes), bob synchronised and disabled in both, a cloud-only member
    // and a guest.
    let one = |sam: &str, attr: &str| -> Result<String> {
        // ldbsearch gives objectGUID and objectSid in their text forms.
        let e = dc.ldbsearch(&format!("(sAMAccountName={sam})"), &[attr])?;
        e.first()
            .and_then(|e| e.get(attr))
            .map(str::to_owned)
            .with_context(|| format!("{attr} of {sam}"))
    };
    let erin_guid =
        ad_bytes_from_guid_string(&one("erin", "objectGUID")?).context("erin's objectGUID")?;
    let mut alice = graph_user(1, "Member", true, &[E3]);
    alice["onPremisesSecurityIdentifier"] = json!(one("alice", "objectSid")?);
    alice["onPremisesSyncEnabled"] = json!(true);
    let mut erin = graph_user(2, "Member", true, &[E3]);
    erin["onPremisesImmutableId"] = json!(immutable_id_from_ad_guid(&erin_guid));
    let mut bob = graph_user(3, "Member", false, &[E3]);
    bob["onPremisesSecurityIdentifier"] = json!(one("bob", "objectSid")?);
    let zoe = graph_user(4, "Member", true, &[E3]);
    let partner = graph_user(5, "Guest", true, &[E3]);
    let graph = GraphLab::start(&lab, &fixture(&[alice, erin, bob, zoe, partner], false))?;

    let data = lab.dir().join("collector");
    let config = collector_config(&lab, &graph, "corp")?;
    let collector = Collector::start_with_config(&lab, &data, &config)?;

    // The agent reads the directory over LDAPS, verified against the lab's CA, in pages of 100.
    let conf_dir = tempfile::Builder::new()
        .prefix("agent-config")
        .tempdir_in(lab.dir())?
        .keep();
    let password_file = conf_dir.join("bind.password");
    std::fs::write(&password_file, dc.admin_password())?;
    let agent_config = conf_dir.join("agent.toml");
    std::fs::write(
        &agent_config,
        format!(
            "[directory]\nenabled = true\nurl = \"{}\"\nbind_dn = \"{}\"\npassword_file = {:?}\nca_file = {:?}\npage_size = 100\n",
            dc.url(),
            dc.admin_upn(),
            password_file,
            dc.ca_file()
        ),
    )?;
    let url = collector.url();
    let config_arg = agent_config.display().to_string();
    // The state directory keeps the agent's identity and the directory its last read named,
    // which names a failed read for the collector.
    let state = conf_dir.join("state");
    collector.enroll_into("corp", "hq", &state)?;
    let state_arg = state.display().to_string();
    let agent_args = [
        "--state-dir",
        state_arg.as_str(),
        "--config",
        config_arg.as_str(),
        "--scope",
        "198.18.41.0/24",
        "--disable",
        "snmp,mdns",
        "--collector",
        url.as_str(),
    ];
    let out = agent_once(&lab, &agent_ns, agent_args)?;
    ensure!(
        out.status.success(),
        "agent run --once: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    collector.census_ok(["users", "refresh", "--client", "corp"])?;

    let listing = collector.users("corp")?;
    let ad_source = listing["sources"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["source"] == "ad:corp.census.test"))
        .context("the AD source")?;
    ensure!(
        ad_source["accounts"] == persons.len() && ad_source["stale"] == false,
        "every person of the directory read, through the paging: {ad_source} vs {}",
        persons.len()
    );
    ensure!(
        listing["users"].as_array().is_some_and(|u| !u
            .iter()
            .any(|u| u["name"].as_str().is_some_and(|n| n.starts_with("ws01")))),
        "computers are not users"
    );
    ensure!(
        !listing.to_string().contains("Erin External"),
        "contacts are not users"
    );
    for (sam, why) in [
        ("bob", "disabled"),
        ("carol", "expired"),
        ("svc-backup", "service account"),
        ("frank", "stale: last logon"),
        ("ivan", "stale: never logged on, created "),
        ("Administrator", "critical system object"),
    ] {
        let p = person(&listing, sam)?;
        ensure!(
            p["counted"] == false && p["reason"].as_str().is_some_and(|r| r.contains(why)),
            "{sam}: {p}"
        );
    }
    let ivan = person(&listing, "ivan")?;
    ensure!(
        ivan["reason"]
            .as_str()
            .is_some_and(|r| r.contains("(400 days ago, more than 90 days)")),
        "the backdated whenCreated, read over LDAPS: {ivan}"
    );
    // New hires count from the day their account exists, saying so.
    for sam in ["gina", "bulk00000", "bulk01099"] {
        let p = person(&listing, sam)?;
        ensure!(
            p["counted"] == true
                && p["reason"].as_str().is_some_and(|r| {
                    r.contains("never logged on, created ")
                        && r.contains("(0 days ago): a new account")
                })
                && p["accounts"][0]["created"].is_string(),
            "{sam}: {p}"
        );
    }
    // Hybrid users are one person each, joined on a stable key, counted once.
    let alice = person(&listing, "alice")?;
    ensure!(
        alice["counted"] == true
            && alice["accounts"].as_array().map(Vec::len) == Some(2)
            && alice["reason"]
                .as_str()
                .is_some_and(|r| r.contains("joined on sid:S-1-5-21-")),
        "{alice}"
    );
    let erin = person(&listing, "erin")?;
    ensure!(
        erin["accounts"].as_array().map(Vec::len) == Some(2)
            && erin["reason"]
                .as_str()
                .is_some_and(|r| r.contains("joined on guid:")),
        "{erin}"
    );
    let bob = person(&listing, "bob")?;
    ensure!(
        bob["accounts"].as_array().map(Vec::len) == Some(2) && bob["counted"] == false,
        "{bob}"
    );
    // alice, erin, dave and hank (no exclusion group yet), zoe (cloud only), and the new
    // hires gina and the bulk users.
    let new_hires = 1 + bulk.len() as u64;
    ensure!(
        counted_users(&collector, "corp")? == 5 + new_hires,
        "{listing}"
    );

    // The policy: the exclusion group, then no stale-logon rule, then service accounts.
    let set = |args: &[&str]| -> Result<()> {
        let mut full = vec!["users", "policy", "set", "--client", "corp"];
        full.extend_from_slice(args);
        collector.census_ok(full).map(drop)
    };
    set(&["--exclusion-groups", "Billing Exclusions"])?;
    ensure!(counted_users(&collector, "corp")? == 3 + new_hires);
    let dave = person(&collector.users("corp")?, "dave")?.clone();
    ensure!(
        dave["reason"]
            .as_str()
            .is_some_and(|r| r.contains("member of exclusion group CN=Billing Exclusions")),
        "{dave}"
    );
    // hank too, though Billing Exclusions holds him only through two nested groups (and a
    // cycle): the agent sent every group he is in.
    let hank = person(&collector.users("corp")?, "hank")?.clone();
    ensure!(
        hank["counted"] == false
            && hank["reason"]
                .as_str()
                .is_some_and(|r| r.contains("member of exclusion group CN=Billing Exclusions")),
        "{hank}"
    );
    set(&["--stale-logon-days", "0"])?;
    // + frank and ivan.
    let without_stale = 3 + new_hires + 2;
    ensure!(counted_users(&collector, "corp")? == without_stale);
    set(&["--count-service-accounts", "true"])?;
    ensure!(counted_users(&collector, "corp")? == without_stale + 1);
    let policy = collector.census_ok(["users", "policy", "show", "--client", "corp", "--json"])?;
    ensure!(policy.contains("\"corp-users-3\""), "{policy}");

    // The snapshot freezes them.
    let period = this_month();
    let created = collector.census_ok([
        "snapshot", "create", "--client", "corp", "--period", &period,
    ])?;
    ensure!(
        created.contains(&format!("{} users", without_stale + 1)),
        "{created}"
    );

    // A wrong bind password: the agent says so in one line and exits 77; the collector keeps
    // every user, marked stale.
    std::fs::write(&password_file, "not-the-password")?;
    let out = agent_once(&lab, &agent_ns, agent_args)?;
    let err = error_lines(&out);
    ensure!(
        out.status.code() == Some(77) && err.len() == 1 && err[0].contains("refused the bind"),
        "{:?}: {err:?}",
        out.status
    );
    let counts = collector.counts_of("corp")?;
    ensure!(
        counts.users == without_stale + 1 && counts.users_stale,
        "{counts:?}"
    );

    // The directory unreachable: the same, exit 69.
    std::fs::write(&password_file, dc.admin_password())?;
    dc.stop()?;
    let out = agent_once(&lab, &agent_ns, agent_args)?;
    let err = error_lines(&out);
    ensure!(
        out.status.code() == Some(69) && err.len() == 1,
        "{:?}: {err:?}",
        out.status
    );
    let listing = collector.users("corp")?;
    let ad_source = listing["sources"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["source"] == "ad:corp.census.test"))
        .context("the AD source")?;
    ensure!(
        ad_source["stale"] == true
            && ad_source["accounts"] == persons.len()
            && ad_source["error"]
                .as_str()
                .is_some_and(|e| e.contains("cannot reach")),
        "{ad_source}"
    );
    ensure!(counted_users(&collector, "corp")? == without_stale + 1);
    Ok(())
}
