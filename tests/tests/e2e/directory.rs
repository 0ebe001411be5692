//! The lab's Active Directory: a Samba AD DC provisioned into the lab's temp dir serves, over
//! LDAPS verified against the lab's CA from an agent's namespace, exactly the accounts the
//! billable-user rules are about (enabled, disabled, expired, computer, contact, service,
//! critical system, exclusion-group member, stale logon) and over a thousand bulk users that are
//! proper user objects; a wrong password is refused; and nothing of it outlives the lab. An
//! agent there only for the directory (every discovery method disabled, no scope) delivers the
//! users and sweeps nothing.
//!
//! The agent's reader is tested against the same kind of DC in the agent crate
//! (`agent/src/directory/tests.rs`), where it can run inside the lab's agent namespace.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use census_tests::{
    lab::{
        HostSpec, Lab, LdifEntry, SAM_USER_OBJECT, SiteSpec, lab_skipped, namespaces_with_prefix,
    },
    support::{self, Collector},
};

/// A FILETIME (100 ns ticks since 1601) of a time.
fn filetime(t: SystemTime) -> i64 {
    let unix = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    (i64::try_from(unix.as_secs()).unwrap_or(0) + 11_644_473_600) * 10_000_000
        + i64::from(unix.subsec_nanos() / 100)
}

fn one<'a>(entries: &'a [LdifEntry], what: &str) -> Result<&'a LdifEntry> {
    ensure!(
        entries.len() == 1,
        "{what}: expected one entry, got {entries:?}"
    );
    entries.first().context("one entry")
}

#[test]
fn samba_dc_serves_the_accounts_the_user_rules_need() -> Result<()> {
    if lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let prefix = lab.prefix().to_owned();
    let site = lab.add_site(SiteSpec::new(
        "directory",
        "198.18.40.0/24".parse()?,
        Ipv4Addr::new(198, 18, 40, 2),
    ))?;
    let agent_ns = site.agent().ns().to_owned();
    let started = Instant::now();
    let dc = lab.samba_dc(&site, Ipv4Addr::new(198, 18, 40, 10), "lab.census.test")?;
    let ready = started.elapsed();

    // Everything of the DC is under its target dir in the lab's dir.
    let dir = dc.dir().display().to_string();
    ensure!(dc.dir().starts_with(lab.dir()));
    let conf = std::fs::read_to_string(dc.smb_conf())?;
    for key in [
        "private dir",
        "state directory",
        "cache directory",
        "lock directory",
        "pid directory",
        "log file",
        "binddns dir",
    ] {
        let line = conf
            .lines()
            .find(|l| l.trim_start().starts_with(key))
            .with_context(|| format!("{key} in smb.conf:\n{conf}"))?;
        ensure!(line.contains(&dir), "{line} is outside {dir}");
    }
    ensure!(!conf.contains("dns forwarder"), "{conf}");
    ensure!(dc.sam_ldb().is_file() && dc.ca_file().is_file());

    // The accounts, as the agent's lab test makes them.
    let t = Instant::now();
    let password = "Lab-User-Passw0rd!";
    for name in ["alice", "bob", "carol", "svc-backup", "dave", "frank"] {
        dc.add_user(name, password)?;
    }
    dc.disable_user("bob")?;
    let before_expiry = SystemTime::now() - Duration::from_secs(5);
    dc.set_expiry_days("carol", 0)?;
    dc.add_spn("http/backup.lab.census.test", "svc-backup")?;
    dc.add_group("Billing Exclusions")?;
    dc.add_group_members("Billing Exclusions", &["dave"])?;
    dc.add_computer("ws01")?;
    dc.add_contact("Erin External")?;
    let stale = 131_000_000_000_000_000i64; // 2016-02-16
    dc.set_last_logon("frank", stale)?;
    dc.set_attribute(&dc.user_dn("alice"), "displayName", &["Alice Ünicode 日本"])?;
    let accounts = t.elapsed();
    let t = Instant::now();
    let bulk = dc.add_bulk_users("bulk", 1200)?;
    let bulk_time = t.elapsed();

    // samba-tool honours -s: it sees the users in the lab DC's sam.ldb.
    let listed = dc.samba_tool(&["user", "list"])?;
    ensure!(
        listed.lines().any(|l| l == "alice") && listed.lines().any(|l| l == "bulk01199"),
        "samba-tool user list -s: {listed}"
    );

    // Read back over LDAPS from the agent's namespace, the certificate checked against the CA.
    let attrs = [
        "sAMAccountName",
        "sAMAccountType",
        "userAccountControl",
        "accountExpires",
        "lastLogonTimestamp",
        "isCriticalSystemObject",
        "servicePrincipalName",
        "memberOf",
        "objectClass",
        "objectSid",
        "objectGUID",
        "displayName",
    ];
    let get = |filter: &str| dc.search_from(&agent_ns, filter, &attrs);
    let alice = get("(sAMAccountName=alice)")?;
    let alice = one(&alice, "alice")?;
    ensure!(alice.get("userAccountControl") == Some("512"), "{alice:?}");
    ensure!(
        alice.get("sAMAccountType") == Some("805306368"),
        "{alice:?}"
    );
    ensure!(alice.get("objectSid").is_some() && alice.get("objectGUID").is_some());
    ensure!(
        alice.get("accountExpires") == Some("9223372036854775807"),
        "never expires: {alice:?}"
    );
    ensure!(alice.get("lastLogonTimestamp").is_none(), "{alice:?}");
    let bob = get("(sAMAccountName=bob)")?;
    ensure!(one(&bob, "bob")?.get("userAccountControl") == Some("514"));
    let carol = get("(sAMAccountName=carol)")?;
    let expires: i64 = one(&carol, "carol")?
        .get("accountExpires")
        .context("accountExpires")?
        .parse()?;
    ensure!(
        expires >= filetime(before_expiry) && expires <= filetime(SystemTime::now()),
        "carol expires at {expires}"
    );
    let svc = get("(sAMAccountName=svc-backup)")?;
    ensure!(one(&svc, "svc")?.values("servicePrincipalName") == ["http/backup.lab.census.test"]);
    let dave = get("(sAMAccountName=dave)")?;
    ensure!(
        one(&dave, "dave")?.values("memberOf")
            == ["CN=Billing Exclusions,CN=Users,DC=lab,DC=census,DC=test"]
    );
    let frank = get("(sAMAccountName=frank)")?;
    ensure!(one(&frank, "frank")?.get("lastLogonTimestamp") == Some(&*stale.to_string()));
    let ws01 = get("(sAMAccountName=ws01$)")?;
    let ws01 = one(&ws01, "ws01")?;
    ensure!(ws01.values("objectClass").contains(&"computer"), "{ws01:?}");
    ensure!(ws01.get("sAMAccountType") == Some("805306369"), "{ws01:?}");
    let contact = get("(cn=Erin External)")?;
    let contact = one(&contact, "contact")?;
    ensure!(contact.values("objectClass").contains(&"contact"));
    ensure!(contact.get("sAMAccountName").is_none(), "{contact:?}");
    let admin = get("(sAMAccountName=Administrator)")?;
    ensure!(one(&admin, "Administrator")?.get("isCriticalSystemObject") == Some("TRUE"));

    // The agent's filter: people that are users; no computer, no contact.
    let users = get("(&(objectCategory=person)(objectClass=user))")?;
    let names: Vec<&str> = users
        .iter()
        .filter_map(|u| u.get("sAMAccountName"))
        .collect();
    for expected in [
        "alice",
        "bob",
        "carol",
        "dave",
        "frank",
        "svc-backup",
        "krbtgt",
    ] {
        ensure!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    ensure!(!names.contains(&"ws01$"), "computers are not persons");
    ensure!(users.len() >= 1200 + 9, "{} users", users.len());
    let bulk_entries: Vec<&LdifEntry> = users
        .iter()
        .filter(|u| {
            u.get("sAMAccountName")
                .is_some_and(|n| n.starts_with("bulk"))
        })
        .collect();
    ensure!(bulk_entries.len() == bulk.len());
    for u in &bulk_entries {
        ensure!(
            u.get("sAMAccountType") == Some(&*SAM_USER_OBJECT.to_string())
                && u.get("userAccountControl") == Some("512")
                && u.get("objectSid").is_some()
                && u.get("objectGUID").is_some(),
            "a bulk user is not a proper user: {u:?}"
        );
    }

    // A wrong password is refused (invalidCredentials, 49).
    let out = dc.search_as(&agent_ns, &dc.admin_upn(), "wrong-password", "(cn=x)", &[])?;
    ensure!(out.status.code() == Some(49), "{out:?}");

    eprintln!(
        "lab DC: ready in {} ms; 12 accounts by samba-tool and ldbmodify in {} ms; {} bulk \
         users by ldbadd in {} ms",
        ready.as_millis(),
        accounts.as_millis(),
        bulk.len(),
        bulk_time.as_millis()
    );

    let pid = dc.proc().pid();
    let dc_dir = dc.dir().to_owned();
    drop(dc);
    drop(site);
    drop(lab);
    ensure!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "samba (pid {pid}) outlived the lab"
    );
    ensure!(!dc_dir.exists(), "{} outlived the lab", dc_dir.display());
    let left = namespaces_with_prefix(&prefix);
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    Ok(())
}

#[test]
fn a_directory_only_agent_reads_the_users_and_sweeps_nothing() -> Result<()> {
    if lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let site = lab.add_site(SiteSpec::new(
        "dc-only",
        "198.18.42.0/24".parse()?,
        Ipv4Addr::new(198, 18, 42, 2),
    ))?;
    // Hosts that would answer a sweep, were there one.
    site.add_hosts(HostSpec::range(Ipv4Addr::new(198, 18, 42, 20), 4))?;
    let agent_ns = site.agent().ns().to_owned();
    let dc = lab.samba_dc(&site, Ipv4Addr::new(198, 18, 42, 10), "dconly.census.test")?;
    for name in ["alice", "bob"] {
        dc.add_user(name, "Lab-User-Passw0rd!")?;
    }
    let persons = dc.search(
        "(&(objectCategory=person)(objectClass=user))",
        &["sAMAccountName"],
    )?;

    let collector = Collector::start(&lab, &lab.dir().join("collector"))?;
    let conf_dir = support::lab_dir(&lab, "dc-only-agent")?;
    let state = conf_dir.join("state");
    collector.enroll_into("dconly", "dc", &state)?;
    let password_file = conf_dir.join("bind.password");
    std::fs::write(&password_file, dc.admin_password())?;
    let directory = format!(
        "[directory]\nenabled = true\nurl = \"{}\"\nbind_dn = \"{}\"\npassword_file = {:?}\nca_file = {:?}\n",
        dc.url(),
        dc.admin_upn(),
        password_file,
        dc.ca_file()
    );
    let with_directory = conf_dir.join("agent.toml");
    std::fs::write(&with_directory, &directory)?;
    let without = conf_dir.join("none.toml");
    std::fs::write(&without, "")?;
    let url = collector.url();
    let state_arg = state.display().to_string();
    let args = |config: &std::path::Path| -> Vec<String> {
        vec![
            "--state-dir".into(),
            state_arg.clone(),
            "--config".into(),
            config.display().to_string(),
            "--disable".into(),
            "arp,icmp,snmp,mdns".into(),
            "--collector".into(),
            url.clone(),
        ]
    };

    // No method and no directory: nothing to do, said in one line (64).
    let out = support::agent_once(&lab, &agent_ns, args(&without))?;
    ensure!(out.status.code() == Some(64), "{out:?}");
    let errors = support::error_lines(&out);
    ensure!(
        errors.len() == 1 && errors[0].contains("[directory]"),
        "{errors:?}"
    );

    // No method, no scope, the directory enabled: valid, and it reads only the directory.
    let out = support::agent_once(&lab, &agent_ns, args(&with_directory))?;
    let log = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "agent run --once: {log}");
    ensure!(log.contains("only reads the directory"), "{log}");
    let listing = collector.users("dconly")?;
    let source = listing["sources"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["source"] == "ad:dconly.census.test"))
        .with_context(|| format!("the AD source in {listing}"))?;
    ensure!(
        source["accounts"] == persons.len() && source["stale"] == false,
        "every person of the directory: {source} vs {}",
        persons.len()
    );
    ensure!(
        collector.devices("dconly")?.is_empty(),
        "nothing was swept, so no device"
    );
    Ok(())
}
