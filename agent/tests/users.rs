//! `census-agent users`, the binary as an MSP engineer runs it, against a real Active Directory:
//! a Samba AD DC provisioned in a lab namespace, read from the lab's agent namespace over LDAPS
//! to the DC's 198.18.0.0/15 address (see `census_tests::lab::samba`). One test makes every
//! lab assertion, so the DC is provisioned once; it and its namespaces go with the lab, also
//! when the test fails. The configuration checks that need no directory run without a lab.
//!
//! Lab tests need root; `CENSUS_SKIP_LAB=1` skips them (as every lab test of the workspace).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use census_tests::lab::{Lab, SiteSpec, lab_skipped, namespaces_with_prefix};

const AGENT: &str = env!("CARGO_BIN_EXE_census-agent");

/// The user filter the agent searches with (`directory::USER_FILTER`).
const USER_FILTER: &str = "(&(objectCategory=person)(objectClass=user))";

/// Users per batch (`directory::DEFAULT_USERS_PER_BATCH`).
const USERS_PER_BATCH: usize = 100;

fn code(out: &Output) -> Option<i32> {
    out.status.code()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The `census-agent: error: ...` lines of a run.
fn errors(out: &Output) -> Vec<String> {
    stderr(out)
        .lines()
        .filter(|l| l.starts_with("census-agent: error: "))
        .map(str::to_owned)
        .collect()
}

/// Runs the agent outside any lab: only for commands that send nothing.
fn agent_here(args: &[&str]) -> Result<Output> {
    std::process::Command::new(AGENT)
        .args(args)
        .env_remove("CENSUS_AGENT_CONFIG")
        .env_remove("CENSUS_AGENT_DIRECTORY_PASSWORD")
        .output()
        .context("running census-agent")
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// `validate` and `users` refuse a bad `[directory]` in one line with exit 64, before any
/// packet is sent.
#[test]
fn bad_directory_settings_are_refused_in_one_line() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let pw = tmp.path().join("pw");
    write(&pw, "secret\n")?;
    let config = tmp.path().join("agent.toml");
    let base = format!(
        "collector = \"https://198.19.255.1:7400\"\ntoken = \"t\"\nscopes = [\"198.18.0.0/24\"]\n\
         state_dir = \"{}\"\n\
         [directory]\nenabled = true\nurl = \"ldaps://198.18.0.10\"\nbind_dn = \"census@lab\"\n\
         password_file = \"{}\"\n",
        tmp.path().display(),
        pw.display()
    );
    let config_arg = config.display().to_string();

    write(&config, &format!("{base}interval = \"30s\"\n"))?;
    let out = agent_here(&["validate", "--config", &config_arg])?;
    ensure!(code(&out) == Some(64), "{out:?}");
    let lines = errors(&out);
    ensure!(
        lines
            == [
                "census-agent: error: directory.interval must be between 1m and 7days, got 30s: \
                 set e.g. interval = \"1h\" under [directory]"
            ],
        "{lines:?}"
    );

    write(&config, &format!("{base}interval = \"2h\"\n"))?;
    let out = agent_here(&["validate", "--config", &config_arg])?;
    ensure!(code(&out) == Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        stdout.trim()
            == "configuration is valid: collector https://198.19.255.1:7400, not enrolled yet \
                (run enrolls first with the token), scopes 198.18.0.0/24, directory \
                ldaps://198.18.0.10 every 2h",
        "{stdout}"
    );

    // `users` needs only [directory], and checks it even when it is not enabled.
    write(
        &config,
        "[directory]\nenabled = false\nurl = \"ldap://198.18.0.10\"\nbind_dn = \"a@b\"\n",
    )?;
    let out = agent_here(&["users", "--config", &config_arg])?;
    ensure!(code(&out) == Some(64), "{out:?}");
    let lines = errors(&out);
    ensure!(
        lines.len() == 1 && lines[0].contains("is plaintext"),
        "{lines:?}"
    );
    let out = agent_here(&["users"])?;
    ensure!(code(&out) == Some(64), "{out:?}");
    let lines = errors(&out);
    ensure!(
        lines == ["census-agent: error: set directory.url (e.g. ldaps://dc1.corp.example:636)"],
        "{lines:?}"
    );
    Ok(())
}

/// A DC with a few kinds of account and 230 bulk users, listed by `census-agent users` (JSON
/// and table) with a page size of 40 from the agent's namespace; then the failures an engineer
/// setting up the bind account meets, each one line with its exit code.
#[test]
fn lab_users_lists_a_real_active_directory() -> Result<()> {
    if lab_skipped() {
        eprintln!("skipped: CENSUS_SKIP_LAB=1");
        return Ok(());
    }
    let lab = Lab::new()?;
    let prefix = lab.prefix().to_owned();
    let dc_ip = Ipv4Addr::new(198, 18, 42, 10);
    let site = lab.add_site(SiteSpec::new(
        "users",
        "198.18.42.0/24".parse()?,
        Ipv4Addr::new(198, 18, 42, 2),
    ))?;
    let ns = site.agent().ns().to_owned();
    let t = Instant::now();
    let dc = lab.samba_dc(&site, dc_ip, "users.census.test")?;
    let domain = dc.dns_domain();
    let base = dc.base_dn().to_owned();
    let pw = "Lab-User-Passw0rd!";
    for name in [
        "census-reader",
        "alice",
        "bob",
        "carol",
        "svc-backup",
        "frank",
    ] {
        dc.add_user(name, pw)?;
    }
    dc.disable_user("bob")?;
    dc.set_expiry_days("carol", 0)?;
    dc.add_spn("http/backup.users.census.test", "svc-backup")?;
    dc.add_computer("ws01")?;
    // 2016-02-15T08:53:20Z as a FILETIME.
    dc.set_last_logon("frank", 131_000_000_000_000_000)?;
    dc.add_bulk_users("bulk", 230)?;
    eprintln!("users lab: DC ready in {} ms", t.elapsed().as_millis());

    let oracle: BTreeSet<String> = dc
        .ldbsearch(USER_FILTER, &["sAMAccountName"])?
        .into_iter()
        .filter_map(|e| e.get("sAMAccountName").map(str::to_owned))
        .collect();
    let n = oracle.len();
    ensure!(n >= 230 + 8, "{n} users in sam.ldb");

    let dir = lab.dir().to_owned();
    let good = dir.join("users-password");
    write(&good, &format!("{pw}\n"))?;
    let wrong = dir.join("users-wrong-password");
    write(&wrong, "not-the-password\n")?;
    let config = |name: &str, url: &str, password: &Path, ca: bool| -> Result<String> {
        let path = dir.join(format!("users-{name}.toml"));
        let ca_line = if ca {
            format!("ca_file = \"{}\"\n", dc.ca_file().display())
        } else {
            String::new()
        };
        write(
            &path,
            &format!(
                "[directory]\nenabled = false\nurl = \"{url}\"\nbind_dn = \
                 \"census-reader@{domain}\"\npassword_file = \"{}\"\n{ca_line}page_size = 40\n\
                 timeout_ms = 2000\n",
                password.display()
            ),
        )?;
        Ok(path.display().to_string())
    };
    let users = |args: &[&str]| -> Result<Output> {
        let mut full = vec![AGENT, "users"];
        full.extend_from_slice(args);
        lab.exec_timeout(&ns, full, Duration::from_secs(120))
    };

    // --- JSON: every user once, with its facts; pages of 40; batches of 100 ---
    let good_config = config("good", &dc.url(), &good, true)?;
    let out = users(&["--json", "--config", &good_config])?;
    ensure!(code(&out) == Some(0), "{out:?}");
    ensure!(
        stderr(&out).contains("note: directory.enabled is false"),
        "{}",
        stderr(&out)
    );
    let doc: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("one JSON document")?;
    ensure!(doc["directory"] == domain.as_str(), "{}", doc["directory"]);
    ensure!(doc["base_dn"] == base.as_str(), "{}", doc["base_dn"]);
    ensure!(doc["skipped"] == 0, "{}", doc["skipped"]);
    let pages = doc["pages"].as_u64().context("pages")?;
    ensure!(
        pages >= n.div_ceil(40) as u64,
        "{pages} pages of 40 for {n} users"
    );
    ensure!(
        doc["batches"] == n.div_ceil(USERS_PER_BATCH),
        "{} batches for {n} users",
        doc["batches"]
    );
    let list = doc["users"].as_array().context("users")?;
    let names: BTreeSet<String> = list
        .iter()
        .filter_map(|u| u["sam_account_name"].as_str().map(str::to_owned))
        .collect();
    ensure!(
        names.len() == list.len() && names == oracle,
        "users differ from sam.ldb: only listed {:?}, only in sam.ldb {:?}",
        names.difference(&oracle).collect::<Vec<_>>(),
        oracle.difference(&names).collect::<Vec<_>>()
    );
    let user = |sam: &str| -> Result<&serde_json::Value> {
        list.iter()
            .find(|u| u["sam_account_name"] == sam)
            .with_context(|| format!("{sam} not listed"))
    };
    let alice = user("alice")?;
    ensure!(
        alice["enabled"] == true
            && alice["expired"] == false
            && alice["user_principal_name"] == format!("alice@{domain}")
            && alice["last_logon"].is_null()
            && alice["flags"] == serde_json::json!([])
            && alice["object_sid"]
                .as_str()
                .is_some_and(|s| s.starts_with("S-1-5-21-")),
        "{alice}"
    );
    ensure!(user("bob")?["enabled"] == false, "{}", user("bob")?);
    ensure!(user("carol")?["expired"] == true, "{}", user("carol")?);
    ensure!(
        user("svc-backup")?["flags"] == serde_json::json!(["service"]),
        "{}",
        user("svc-backup")?
    );
    ensure!(
        user("frank")?["last_logon"] == "2016-02-15T08:53:20Z",
        "{}",
        user("frank")?
    );
    let admin = user("Administrator")?;
    ensure!(
        admin["flags"] == serde_json::json!(["critical"]) && admin["enabled"] == true,
        "{admin}"
    );
    ensure!(!names.contains("ws01$"), "computers are not users");

    // --- the table: a header, a line per user, a summary line ---
    let out = users(&["--config", &good_config])?;
    ensure!(code(&out) == Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    ensure!(lines.len() == n + 2, "{} lines for {n} users", lines.len());
    ensure!(lines[0].starts_with("ACCOUNT "), "{}", lines[0]);
    let bob = lines
        .iter()
        .find(|l| l.starts_with("bob "))
        .context("bob's line")?;
    ensure!(bob.contains(" disabled "), "{bob}");
    let summary = lines[n + 1];
    ensure!(
        summary.starts_with(&format!("read {n} users from {domain} ({base}) in "))
            && summary.contains(&format!(", {pages} pages, 0 skipped: "))
            && summary.ends_with(&format!(
                "`census-agent run` sends them in {} batches",
                n.div_ceil(USERS_PER_BATCH)
            )),
        "{summary}"
    );

    // --- the password from the environment instead of a file ---
    let env_config = dir.join("users-env.toml");
    write(
        &env_config,
        &format!(
            "[directory]\nurl = \"{}\"\nbind_dn = \"census-reader@{domain}\"\nca_file = \"{}\"\n",
            dc.url(),
            dc.ca_file().display()
        ),
    )?;
    let password_env = format!("CENSUS_AGENT_DIRECTORY_PASSWORD={pw}");
    let out = lab.exec_timeout(
        &ns,
        [
            "env",
            password_env.as_str(),
            AGENT,
            "users",
            "--json",
            "--config",
            &env_config.display().to_string(),
        ],
        Duration::from_secs(120),
    )?;
    ensure!(code(&out) == Some(0), "{out:?}");

    // --- failures: one line each, the exit code of the scheme, never the password ---
    let failures = [
        (
            "wrong password",
            config("wrong", &dc.url(), &wrong, true)?,
            77,
            format!("the directory refused the bind for census-reader@{domain}: "),
        ),
        (
            "no CA",
            config("no-ca", &dc.url(), &good, false)?,
            64,
            format!("{}: certificate not trusted", dc.url()),
        ),
        (
            "no host",
            config("no-host", "ldaps://198.18.42.99:636", &good, true)?,
            69,
            "cannot reach ldaps://198.18.42.99:636: ".to_owned(),
        ),
        (
            "no listener",
            config("no-listener", &format!("ldaps://{dc_ip}:6360"), &good, true)?,
            69,
            format!("cannot reach ldaps://{dc_ip}:6360: "),
        ),
    ];
    for (what, path, expected, start) in failures {
        let out = users(&["--json", "--config", &path])?;
        let lines = errors(&out);
        eprintln!("users lab: {what}: exit {:?}: {lines:?}", code(&out));
        ensure!(code(&out) == Some(expected), "{what}: {out:?}");
        ensure!(out.stdout.is_empty(), "{what}: nothing on stdout");
        ensure!(
            lines.len() == 1 && lines[0].starts_with(&format!("census-agent: error: {start}")),
            "{what}: {lines:?}"
        );
        ensure!(!stderr(&out).contains(pw), "{what}: the password leaked");
    }

    drop(dc);
    drop(site);
    drop(lab);
    let left = namespaces_with_prefix(&prefix);
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    Ok(())
}
