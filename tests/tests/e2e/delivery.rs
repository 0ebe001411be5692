//! Nothing lost on the way from the agent: a running agent (`census-agent run`, not `--once`)
//! whose collector is down for three sweeps queues them on disk, backs off, and delivers every
//! observation once when the collector is back; an agent killed with SIGKILL while its batches
//! are on the wire, unacknowledged, delivers them after a restart (`run --once` too), and killed
//! again right after an acknowledgement, resends what the collector already holds, whose
//! idempotency keeps the counts exact; and an agent whose state was restored from a backup, or
//! wiped and used again with the same certificate, goes on as the agent its certificate names
//! (a new sequence epoch where its sequences were already used), with nothing lost.

use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use census_tests::{
    lab::{HostSpec, Lab, Proc, SiteSpec, lab_skipped},
    support::{self, AgentLogLine, COLLECTOR_PORT, Collector, Device},
};

/// Hosts on the site: every one answers ARP, so each sweep is this many observations.
pub(crate) const HOSTS: u32 = 24;
pub(crate) const CLIENT: &str = "steady";

/// A site on 198.18.0.0/24 with [`HOSTS`] hosts from .10.
pub(crate) fn site_with_hosts(lab: &Lab) -> Result<census_tests::lab::Site<'_>> {
    let site = lab.add_site(SiteSpec::new(
        "site",
        "198.18.0.0/24".parse()?,
        Ipv4Addr::new(198, 18, 0, 2),
    ))?;
    site.add_hosts(HostSpec::range(Ipv4Addr::new(198, 18, 0, 10), HOSTS))?;
    Ok(site)
}

/// Starts `census-agent run` every 10 s (the shortest interval) with a state directory and
/// a config file whose back-off tops out at 4 s, so the test need not wait minutes.
pub(crate) fn start_agent(lab: &Lab, ns: &str, url: &str, state: &Path) -> Result<Proc> {
    let config = state.with_extension("toml");
    std::fs::write(&config, "[queue]\nmax_mb = 16\nretry_max = \"4s\"\n")?;
    support::spawn_agent(
        lab,
        ns,
        [
            "--config",
            config.to_str().context("utf-8 path")?,
            "--collector",
            url,
            "--scope",
            "198.18.0.0/24",
            "--state-dir",
            state.to_str().context("utf-8 path")?,
            "--interval",
            "10s",
            "--disable",
            "snmp,mdns",
        ],
    )
}

/// Runs `census-agent run --once` as [`start_agent`] runs `run` (its config file must exist),
/// which must exit 0; returns its log.
fn once(lab: &Lab, ns: &str, url: &str, state: &Path) -> Result<Vec<AgentLogLine>> {
    let config = state.with_extension("toml");
    let out = support::agent_once(
        lab,
        ns,
        [
            "--log-format",
            "json",
            "--config",
            config.to_str().context("utf-8 path")?,
            "--collector",
            url,
            "--scope",
            "198.18.0.0/24",
            "--state-dir",
            state.to_str().context("utf-8 path")?,
            "--disable",
            "snmp,mdns",
        ],
    )?;
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        out.status.success(),
        "run --once failed ({}):\n{log}",
        out.status
    );
    Ok(support::agent_log(&log))
}

pub(crate) fn lines(proc: &Proc) -> Vec<AgentLogLine> {
    support::agent_log(&proc.log())
}

/// Waits until `proc` has logged a line from line `from` on that `want` accepts; returns the
/// index of that line.
pub(crate) fn wait_for(
    proc: &Proc,
    from: usize,
    what: &str,
    timeout: Duration,
    want: impl Fn(&AgentLogLine) -> bool,
) -> Result<usize> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(i) = lines(proc)
            .iter()
            .enumerate()
            .skip(from)
            .find_map(|(i, l)| want(l).then_some(i))
        {
            return Ok(i);
        }
        ensure!(proc.is_running(), "the agent stopped:\n{}", proc.log());
        ensure!(
            Instant::now() < deadline,
            "no {what} within {timeout:?}; the agent's log:\n{}",
            proc.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub(crate) fn is_sweep_done(l: &AgentLogLine, pending: impl Fn(u64) -> bool) -> bool {
    l.message() == "sweep done" && l.number("pending").is_some_and(pending)
}

/// Observations the agent queued (every sweep's), by its `batches queued` lines.
pub(crate) fn queued_observations(log: &[AgentLogLine]) -> u64 {
    log.iter()
        .filter(|l| l.message() == "batches queued")
        .filter_map(|l| l.number("observations"))
        .sum()
}

/// Observations stored from `agent`: every observation here is one ARP answer.
pub(crate) fn stored_by(devices: &[Device], agent: &str) -> u64 {
    devices
        .iter()
        .flat_map(|d| &d.evidence)
        .filter(|e| e.agent_id == agent)
        .map(|e| e.observations)
        .sum()
}

/// Sends `signal` to a process this test started (through the lab).
fn signal(proc: &Proc, signal: &str) -> Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(proc.pid().to_string())
        .status()
        .context("running kill")?;
    ensure!(status.success(), "kill -{signal} {} failed", proc.pid());
    Ok(())
}

/// Resumes a stopped process when dropped, also when the test fails.
struct Resume<'a>(&'a Proc);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        let _ = signal(self.0, "CONT");
    }
}

#[test]
fn a_collector_down_for_three_sweeps_loses_nothing_and_counts_nothing_twice() -> Result<()> {
    if lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let site = site_with_hosts(&lab)?;
    let collector = Collector::start_at(&lab, &lab.dir().join("collector"), COLLECTOR_PORT)?;
    let state = collector.enroll(CLIENT, "hq")?;
    let agent = start_agent(&lab, site.agent().ns(), &collector.url(), &state)?;

    // The first sweep is delivered while the collector is up.
    let first = wait_for(
        &agent,
        0,
        "first sweep delivered",
        Duration::from_secs(60),
        |l| is_sweep_done(l, |p| p == 0),
    )?;
    assert_eq!(collector.devices_of(CLIENT)?, u64::from(HOSTS));

    // Down for three sweeps: each is queued (the queue grows), and the agent keeps trying.
    collector.kill()?;
    let mut at = first + 1;
    let mut pending = Vec::new();
    for n in 1..=3 {
        at = wait_for(
            &agent,
            at,
            &format!("sweep {n} with the collector down"),
            Duration::from_secs(40),
            |l| is_sweep_done(l, |p| p > 0),
        )? + 1;
        pending.push(lines(&agent)[at - 1].number("pending").unwrap_or_default());
    }
    ensure!(
        pending.windows(2).all(|w| w[0] < w[1]),
        "the queue grows sweep by sweep: {pending:?}"
    );
    let outage = lines(&agent);
    let retries: Vec<(u64, u64)> = outage
        .iter()
        .skip(first)
        .filter(|l| l.message().starts_with("delivery failed; retrying"))
        .map(|l| {
            (
                l.number("attempt").unwrap_or_default(),
                l.number("retry_in_ms").unwrap_or_default(),
            )
        })
        .collect();
    eprintln!("back-off while the collector was down (attempt, wait ms): {retries:?}");
    ensure!(retries.len() >= 4, "retries between sweeps: {retries:?}");
    // 1 s, 2 s, 4 s, then 4 s (retry_max), each between half and all of that.
    for (i, (attempt, wait)) in retries.iter().enumerate() {
        let ceiling = 1000u64 << i.min(2);
        ensure!(
            *attempt == i as u64 + 1 && *wait >= ceiling / 2 && *wait <= ceiling,
            "retry {} waited {wait} ms, not within [{}, {ceiling}]: {retries:?}",
            i + 1,
            ceiling / 2
        );
    }

    // Back up on the same address: the backlog arrives, oldest first, and nothing twice.
    let collector = collector.restart()?;
    let back = wait_for(
        &agent,
        at,
        "the backlog delivered",
        Duration::from_secs(30),
        |l| l.message() == "delivered" && l.number("queued") == Some(0),
    )?;
    ensure!(
        lines(&agent)
            .iter()
            .skip(at)
            .any(|l| l.message().starts_with("collector reachable again")),
        "{}",
        agent.log()
    );
    // Stop the agent right after a sweep it delivered entirely: it then sleeps ~10 s, so no
    // batch is half-delivered when the books are compared.
    wait_for(
        &agent,
        back,
        "a sweep delivered after the outage",
        Duration::from_secs(40),
        |l| is_sweep_done(l, |p| p == 0),
    )?;
    agent.kill()?;

    let log = lines(&agent);
    let queued = queued_observations(&log);
    let sweeps = log.iter().filter(|l| l.message() == "sweep done").count() as u64;
    ensure!(sweeps >= 5, "{sweeps} sweeps");
    ensure!(
        queued == sweeps * u64::from(HOSTS),
        "every sweep saw every host: {queued} observations in {sweeps} sweeps"
    );
    assert_eq!(collector.devices_of(CLIENT)?, u64::from(HOSTS));
    let devices = collector.devices(CLIENT)?;
    let id = support::agent_id(&state)?;
    assert_eq!(
        stored_by(&devices, &id),
        queued,
        "every observation the agent queued is stored exactly once"
    );
    let acked: u64 = support::deliveries(&agent.log())
        .iter()
        .map(|d| d.observations)
        .sum();
    assert_eq!(acked, queued);
    ensure!(
        !agent.log().contains("QUEUE FULL"),
        "nothing was dropped:\n{}",
        agent.log()
    );
    Ok(())
}

#[test]
fn an_agent_killed_mid_delivery_delivers_after_a_restart_and_nothing_counts_twice() -> Result<()> {
    if lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let site = site_with_hosts(&lab)?;
    let collector = Collector::start_at(&lab, &lab.dir().join("collector"), COLLECTOR_PORT)?;
    let state = collector.enroll(CLIENT, "hq")?;
    let ns = site.agent().ns();
    let agent = start_agent(&lab, ns, &collector.url(), &state)?;
    let first = wait_for(
        &agent,
        0,
        "first sweep delivered",
        Duration::from_secs(60),
        |l| is_sweep_done(l, |p| p == 0),
    )?;

    // Freeze the collector (SIGSTOP): the agent's next sweep goes out on its open connection
    // and waits for acknowledgements that do not come. Kill the agent (SIGKILL) right then,
    // with its batch on the wire. When the collector thaws it may well store what the dead
    // agent sent, so the acknowledgement is lost: the restarted agent must resend it, and the
    // collector must take the resend for a replay.
    signal(collector.proc(), "STOP")?;
    let frozen = Resume(collector.proc());
    let sent = wait_for(
        &agent,
        first + 1,
        "a batch sent to the frozen collector",
        Duration::from_secs(30),
        |l| l.message() == "sending queued batches",
    )?;
    std::thread::sleep(Duration::from_millis(300));
    ensure!(
        !lines(&agent)
            .iter()
            .skip(sent)
            .any(|l| l.message() == "delivered"),
        "a frozen collector acknowledged a batch:\n{}",
        agent.log()
    );
    agent.kill()?;
    let killed_log = lines(&agent);
    drop(frozen);

    // `run --once` delivers what the killed agent left before its own sweep, and exits 0 only
    // once both are acknowledged.
    let once_log = once(&lab, ns, &collector.url(), &state)?;
    let found = once_log
        .iter()
        .find(|l| l.message().starts_with("batches queued by an earlier run"))
        .and_then(|l| l.number("batches"));
    ensure!(
        found.is_some_and(|n| n >= 1),
        "run --once found no batch left by the killed agent: {found:?}"
    );

    // A restarted `run`, killed the moment its own sweep is acknowledged: the removal from the
    // queue may not be on disk yet (it is not flushed by itself), and the next start then
    // resends a batch the collector already holds. The next sweep is 10 s away, so nothing is
    // being queued.
    let agent = start_agent(&lab, ns, &collector.url(), &state)?;
    let own = wait_for(
        &agent,
        0,
        "the restarted agent's sweep queued",
        Duration::from_secs(30),
        |l| l.message() == "batches queued",
    )?;
    wait_for(
        &agent,
        own,
        "the restarted agent's sweep delivered",
        Duration::from_secs(30),
        |l| l.message() == "delivered" && l.number("queued") == Some(0),
    )?;
    agent.kill()?;
    let restarted_log = lines(&agent);

    // And `run --once` again delivers whatever that left, then its own sweep.
    let last_log = once(&lab, ns, &collector.url(), &state)?;

    let runs = [&killed_log, &once_log, &restarted_log, &last_log];
    let queued: u64 = runs.iter().map(|log| queued_observations(log)).sum();
    let sweeps = runs
        .iter()
        .flat_map(|log| log.iter())
        .filter(|l| l.message() == "batches queued")
        .count() as u64;
    ensure!(
        // Two by the killed agent, one by each run after it.
        sweeps == 5 && queued == sweeps * u64::from(HOSTS),
        "every sweep saw every host: {queued} observations in {sweeps} sweeps"
    );
    assert_eq!(collector.devices_of(CLIENT)?, u64::from(HOSTS));
    let devices = collector.devices(CLIENT)?;
    let id = support::agent_id(&state)?;
    assert_eq!(
        stored_by(&devices, &id),
        queued,
        "every observation queued by any of the four runs is stored exactly once"
    );
    for d in &devices {
        assert_eq!(d.agents(), std::slice::from_ref(&id), "{d:?}");
    }
    let replays: u64 = runs
        .iter()
        .flat_map(|log| log.iter())
        .filter(|l| l.message() == "delivered")
        .filter_map(|l| l.number("duplicates"))
        .sum();
    eprintln!("{replays} batches were resent after a lost acknowledgement and taken as replays");
    Ok(())
}

#[test]
fn a_restored_or_wiped_state_goes_on_as_the_agent_its_certificate_names() -> Result<()> {
    if lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let site = site_with_hosts(&lab)?;
    let collector = Collector::start_at(&lab, &lab.dir().join("collector"), COLLECTOR_PORT)?;
    let state = collector.enroll(CLIENT, "hq")?;
    let id = support::enrolled_agent_id(&state)?;
    std::fs::write(state.with_extension("toml"), "[queue]\nmax_mb = 16\n")?;
    let ns = site.agent().ns();

    let first = once(&lab, ns, &collector.url(), &state)?;
    let backup = std::fs::read(state.join("agent.json"))?;
    let second = once(&lab, ns, &collector.url(), &state)?;

    // agent.json restored from the backup: the next sweep reuses sequence numbers the
    // collector holds with other content. It is refused as a conflict, and the agent goes on
    // in a new sequence epoch under the same id.
    std::fs::write(state.join("agent.json"), &backup)?;
    let restored = once(&lab, ns, &collector.url(), &state)?;
    ensure!(
        restored
            .iter()
            .any(|l| l.message().starts_with("sequence numbers already used")),
        "no conflict after the restore: {restored:?}"
    );

    // The state wiped (the queue and agent.json), the identity kept: a new state, in an epoch
    // of its own, that carries the certificate's id.
    std::fs::remove_file(state.join("agent.json"))?;
    std::fs::remove_dir_all(state.join("queue"))?;
    let wiped = once(&lab, ns, &collector.url(), &state)?;
    ensure!(
        support::agent_id(&state)? == id,
        "agent.json names the certificate's id"
    );

    // `census agents` lists the one real agent, and every observation of the four runs is
    // credited to it, once.
    let agents: Vec<serde_json::Value> =
        serde_json::from_str(&collector.census_ok(["agents", "--json"])?)?;
    let listed: Vec<&str> = agents
        .iter()
        .filter_map(|a| a["agent_id"].as_str())
        .collect();
    assert_eq!(listed, [id.as_str()]);
    let runs = [&first, &second, &restored, &wiped];
    let queued: u64 = runs.iter().map(|log| queued_observations(log)).sum();
    assert_eq!(queued, 4 * u64::from(HOSTS), "every sweep saw every host");
    let devices = collector.devices(CLIENT)?;
    assert_eq!(devices.len() as u64, u64::from(HOSTS));
    assert_eq!(stored_by(&devices, &id), queued);
    for d in &devices {
        assert_eq!(d.agents(), std::slice::from_ref(&id), "{d:?}");
    }
    Ok(())
}
