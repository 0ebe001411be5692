//! An agent's life as an MSP engineer sees it, with the real binaries in the lab: enrolled
//! with a single-use token from its own site's namespace, listed by `census agents`, locked out
//! by `census agent revoke`, and enrolled again with a new token.

use std::{net::Ipv4Addr, path::Path, process::Output};

use anyhow::{Context as _, Result, ensure};
use census_tests::{
    lab::{HostSpec, Lab, SiteSpec, lab_skipped},
    support::{self, Collector},
};

const HOSTS: u32 = 4;

fn run_once(lab: &Lab, ns: &str, collector: &Collector<'_>, state: &Path) -> Result<Output> {
    support::agent_once(
        lab,
        ns,
        [
            "--collector",
            &collector.url(),
            "--state-dir",
            state.to_str().context("utf-8 path")?,
            "--scope",
            "198.18.0.0/24",
            "--disable",
            "snmp,mdns",
        ],
    )
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn an_agent_enrolls_once_is_listed_and_a_revoked_one_is_refused_until_enrolled_again() -> Result<()>
{
    if lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let site = lab.add_site(SiteSpec::new(
        "site",
        "198.18.0.0/24".parse()?,
        Ipv4Addr::new(198, 18, 0, 2),
    ))?;
    site.add_hosts(HostSpec::range(Ipv4Addr::new(198, 18, 0, 10), HOSTS))?;
    let ns = site.agent().ns().to_owned();
    let collector =
        Collector::start_at(&lab, &lab.dir().join("collector"), support::COLLECTOR_PORT)?;

    // Enrolled from the site, with the token and the collector's CA.
    let token = support::token_file(&lab, &collector.token("acme", "hq")?)?;
    let state = support::lab_dir(&lab, "agent")?;
    let out = collector.run_enroll(&ns, &token, &state, false)?;
    ensure!(out.status.success(), "enroll: {}", stderr(&out));
    let line = String::from_utf8_lossy(&out.stdout);
    ensure!(
        line.starts_with("enrolled as agent ") && line.contains("of client acme, site hq"),
        "{line}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(state.join("identity").join("key.pem"))?
            .permissions()
            .mode();
        ensure!(
            mode & 0o077 == 0,
            "the private key is the agent's alone: {mode:o}"
        );
    }

    // The token is spent: a second agent cannot enroll with it (exit 77, one line).
    let other = support::lab_dir(&lab, "other")?;
    let out = collector.run_enroll(&ns, &token, &other, false)?;
    ensure!(out.status.code() == Some(77), "{out:?}");
    let errors = support::error_lines(&out);
    ensure!(
        errors.len() == 1 && errors[0].contains("already used"),
        "{errors:?}"
    );
    // Enrolling over an existing identity needs --force.
    let out = collector.run_enroll(&ns, &token, &state, false)?;
    ensure!(out.status.code() == Some(64), "{out:?}");

    // It sweeps and delivers over mutual TLS, and the collector lists it.
    let out = run_once(&lab, &ns, &collector, &state)?;
    ensure!(out.status.success(), "run: {}", stderr(&out));
    ensure!(collector.devices_of("acme")? == u64::from(HOSTS));
    let agents: Vec<serde_json::Value> =
        serde_json::from_str(&collector.census_ok(["agents", "--json"])?)?;
    ensure!(agents.len() == 1, "{agents:?}");
    let a = &agents[0];
    let id = a["agent_id"].as_str().context("agent_id")?.to_owned();
    ensure!(id == support::agent_id(&state)?, "{a}");
    ensure!(a["client"] == "acme" && a["site"] == "hq", "{a}");
    ensure!(a["version"] == env!("CARGO_PKG_VERSION"), "{a}");
    ensure!(a["last_seen"].is_string() && a["revoked"] == false, "{a}");
    ensure!(a["backlog"] == 0, "caught up, nothing left queued: {a}");
    let tokens: Vec<serde_json::Value> =
        serde_json::from_str(&collector.census_ok(["token", "list", "--json"])?)?;
    ensure!(
        tokens.len() == 1 && tokens[0]["used_by_agent"] == id.as_str(),
        "{tokens:?}"
    );

    // Revoked: its next run is refused in one line (exit 77), and nothing more is stored;
    // across a restart of the collector too (which makes a new server certificate from the
    // same CA, which the agent still trusts).
    collector.census_ok(["agent", "revoke", &id])?;
    let collector = collector.restart()?;
    site.add_host(HostSpec::new(Ipv4Addr::new(198, 18, 0, 100)))?;
    let out = run_once(&lab, &ns, &collector, &state)?;
    ensure!(out.status.code() == Some(77), "{out:?}");
    let errors = support::error_lines(&out);
    ensure!(
        errors.len() == 1 && errors[0].contains("revoked"),
        "{errors:?}"
    );
    ensure!(collector.devices_of("acme")? == u64::from(HOSTS));
    let listed = collector.census_ok(["agents"])?;
    ensure!(listed.contains("revoked"), "{listed}");

    // A new token and --force: the same state directory works again, and what was queued
    // while it was locked out is delivered.
    let token = support::token_file(&lab, &collector.token("acme", "hq")?)?;
    let out = collector.run_enroll(&ns, &token, &state, true)?;
    ensure!(out.status.success(), "re-enroll: {}", stderr(&out));
    let out = run_once(&lab, &ns, &collector, &state)?;
    ensure!(
        out.status.success(),
        "run after re-enrolling: {}",
        stderr(&out)
    );
    ensure!(collector.devices_of("acme")? == u64::from(HOSTS) + 1);
    Ok(())
}
