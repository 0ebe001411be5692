//! The collector as an operator runs it: it accepts connections only once it can answer (its
//! store open, its log replayed, its CA and the operator's credentials written); and a full
//! disk makes it refuse batches (UNAVAILABLE, which agents retry) without counting any of
//! them, keeps its counts answering, and lets it take the agents' backlog by itself once room
//! is freed.

use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use census_collector::{
    model::{Scope, clean_observation},
    store::{BatchId, BatchOutcome, Store, sled::SledStore},
};
use census_proto::{convert, v1};
use census_tests::{
    lab::{Lab, lab_skipped},
    support::{self, COLLECTOR_PORT, Collector},
};

use crate::delivery::{
    CLIENT, HOSTS, is_sweep_done, lines, queued_observations, site_with_hosts, start_agent,
    stored_by, wait_for,
};
use crate::in_process::{batch, start};

/// Copies a directory tree as it is at this moment: what a crash would leave behind.
fn crash_image(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            crash_image(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Writes a store into `data` whose write-ahead log holds `batches` batches of 1,000 devices
/// each that never reached sled: what a collector killed under load leaves, and what the next
/// start must replay before it can answer.
fn store_with_a_log_to_replay(data: &Path, batches: u64) -> Result<()> {
    let live = tempfile::tempdir()?;
    let store = SledStore::open(live.path())?;
    let scope = Scope {
        client: "acme".into(),
        site: "hq".into(),
    };
    // Seen now: the default policy counts devices seen in the last days.
    let now = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis(),
    )?;
    store.ensure_site(&scope.client, &scope.site, now)?;
    for seq in 1..=batches {
        let observations: Vec<_> = (0..1000u32)
            .filter_map(|i| {
                let n = u32::try_from(seq).ok()? * 1000 + i;
                let [_, a, b, c] = n.to_be_bytes();
                let wire = v1::Observation {
                    observed_at: Some(convert::timestamp_from_millis(now)),
                    method: v1::Method::Arp as i32,
                    addresses: vec![v1::IpAddress {
                        address: Ipv4Addr::new(198, 18, b, c).to_string(),
                        answered: true,
                        ..Default::default()
                    }],
                    macs: vec![vec![0, 0x16, 0x3e, a, b, c]],
                    ..Default::default()
                };
                clean_observation(&wire, now, 0)
            })
            .collect();
        let id = BatchId {
            agent_id: "loader".into(),
            epoch: 0,
            sequence: seq,
            digest: [seq as u8; 32],
        };
        ensure!(store.apply_batch(&scope, &id, &observations)? == BatchOutcome::Stored);
    }
    // Taken while the store is open, before its checkpoint (2 s after the last commit) moves
    // the log into sled.
    crash_image(live.path(), data)?;
    ensure!(
        data.join("wal").read_dir()?.count() > 0,
        "the copy holds a log to replay"
    );
    Ok(())
}

#[test]
fn the_collector_accepts_connections_only_once_its_credentials_exist() -> Result<()> {
    if lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let data = lab.dir().join("collector");
    store_with_a_log_to_replay(&data, 10)?;
    ensure!(!data.join("operator").exists() && !data.join("tls").exists());

    // In the collector's namespace, from before it starts: connect to its port until it
    // accepts, and look for the operator's credentials and the CA at that moment. (Bounded:
    // 6,000 tries 10 ms apart.)
    let addr = format!("{}:{COLLECTOR_PORT}", lab.collector_ip());
    let (ip, port) = addr.split_once(':').context("address")?;
    let script = format!(
        "for i in $(seq 1 6000); do \
           if (exec 3<>/dev/tcp/{ip}/{port}) 2>/dev/null; then \
             c=missing; k=missing; \
             [ -s '{d}/operator/cert.pem' ] && [ -s '{d}/operator/key.pem' ] && c=present; \
             [ -s '{d}/tls/ca.pem' ] && k=present; \
             echo \"accepted credentials=$c ca=$k\"; exit 0; \
           fi; sleep 0.01; \
         done; echo never-accepted; exit 1",
        d = data.display()
    );
    let poller = lab.spawn(lab.core_ns(), ["bash", "-c", &script])?;
    let started = Instant::now();
    let collector = Collector::start_at(&lab, &data, COLLECTOR_PORT)?;
    let status = poller
        .wait_timeout(Duration::from_secs(30))?
        .context("the poller did not finish")?;
    let seen = poller.log();
    eprintln!(
        "collector listening after {:?}; at its first accepted connection: {}",
        started.elapsed(),
        seen.trim()
    );
    ensure!(status.success(), "the port never accepted: {seen}");
    ensure!(
        seen.contains("accepted credentials=present ca=present"),
        "the port accepted before the collector was ready: {seen}"
    );
    // And it answers: every replayed device is counted.
    assert_eq!(collector.devices_of("acme")?, 10_000);
    Ok(())
}

/// A tmpfs of `size` mounted on a directory of the test's own, unmounted when dropped, also
/// when the test fails (lazily: a collector still running on it lets go when the lab kills it).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .context("running mount")?;
        ensure!(
            status.success(),
            "mount -t tmpfs on {} failed",
            dir.display()
        );
        Ok(Tmpfs(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Another program's file that fills the file system of its path, and keeps it full until the
/// test frees the room: whatever the collector frees during the outage (a probe file it wrote
/// while the filler ran, the torn end of its log cut off, log segments a checkpoint under way
/// removes) is taken again within a tenth of a second, so the disk stays full until
/// [`Filler::free`], as a disk another program filled does.
struct Filler {
    path: std::path::PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Writes to `f` until a write fails for lack of room (at most 1 GiB, in 1 MiB writes; the
/// last write is partial: what is left of the disk, down to the last page). The bytes written.
fn top_up(f: &mut std::fs::File) -> Result<u64> {
    use std::io::Write as _;
    let chunk = vec![0x5a; 1 << 20];
    let mut written = 0u64;
    for _ in 0..1024 {
        match f.write(&chunk) {
            Ok(0) => return Ok(written),
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => return Ok(written),
            Err(e) => return Err(e).context("writing the filler"),
        }
    }
    anyhow::bail!("the filler took 1 GiB without filling up")
}

impl Filler {
    /// Fills the disk now (returns once it is full, with the bytes written), then keeps it
    /// full on a thread of its own, for at most five minutes.
    fn start(path: &Path) -> Result<(Self, u64)> {
        use std::sync::{Arc, atomic::AtomicBool, atomic::Ordering};
        let mut f =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let written = top_up(&mut f)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let until = Instant::now() + Duration::from_secs(300);
                while !stop.load(Ordering::SeqCst) && Instant::now() < until {
                    if top_up(&mut f).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        Ok((
            Filler {
                path: path.to_owned(),
                stop,
                thread: Some(thread),
            },
            written,
        ))
    }

    /// Stops topping up and deletes the file: the disk has room again.
    fn free(mut self) -> Result<()> {
        self.halt();
        std::fs::remove_file(&self.path)
            .with_context(|| format!("removing {}", self.path.display()))
    }

    fn halt(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Filler {
    fn drop(&mut self) {
        // A failed test: stop writing (the tmpfs guard unmounts the disk afterwards).
        self.halt();
    }
}

/// The sum of a metric's samples whose name (labels included) starts with `prefix`.
fn metric(collector: &Collector<'_>, name: &str) -> Result<f64> {
    let page = collector.metrics()?;
    page.sample(name)
        .with_context(|| format!("no sample {name} in the collector's metrics"))
}

/// Waits (at most 10 s) until a metric reads `want`: the collector checks whether its store
/// takes writes once a second, so the gauge follows the disk within a second or so.
fn metric_becomes(collector: &Collector<'_>, name: &str, want: f64) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let got = metric(collector, name)?;
        if got == want {
            return Ok(());
        }
        ensure!(
            Instant::now() < until,
            "{name} is {got}, not {want}, after 10 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_full_disk_refuses_batches_uncounted_and_ingest_resumes_by_itself_when_room_is_freed()
-> Result<()> {
    if lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let site = site_with_hosts(&lab)?;
    let disk = Tmpfs::mount(&lab.dir().join("small-disk"), "48m")?;
    let data = disk.0.join("collector");
    let metrics_at = format!("{}:0", lab.collector_ip());
    let collector = Collector::start_with_args(&lab, &data, &["--metrics-listen", &metrics_at])?;
    let state = collector.enroll(CLIENT, "hq")?;
    let agent = start_agent(&lab, site.agent().ns(), &collector.url(), &state)?;
    let first = wait_for(
        &agent,
        0,
        "first sweep delivered",
        Duration::from_secs(60),
        |l| is_sweep_done(l, |p| p == 0),
    )?;
    let id = support::agent_id(&state)?;
    let before = stored_by(&collector.devices(CLIENT)?, &id);
    assert_eq!(before, u64::from(HOSTS));
    assert_eq!(metric(&collector, "census_collector_store_writable")?, 1.0);

    // The disk fills up (another program's file): the next sweeps are refused, and retried.
    let (filler, took) = Filler::start(&disk.0.join("filler"))?;
    eprintln!("the filler took {} MiB", took >> 20);
    let mut at = first + 1;
    for n in 1..=2 {
        at = wait_for(
            &agent,
            at,
            &format!("a refused delivery ({n})"),
            Duration::from_secs(40),
            |l| l.message().starts_with("delivery failed; retrying"),
        )? + 1;
    }
    let refusal = lines(&agent)[at - 1].fields.get("error").cloned();
    eprintln!("the agent was told: {refusal:?}");
    ensure!(
        format!("{refusal:?}").contains("cannot store"),
        "the refusal says why: {refusal:?}"
    );
    // Counts answer, from what was acknowledged: nothing of the refused sweeps.
    let counts = collector.counts_of(CLIENT)?;
    assert_eq!(counts.devices, u64::from(HOSTS), "{counts:?}");
    assert_eq!(stored_by(&collector.devices(CLIENT)?, &id), before);
    metric_becomes(&collector, "census_collector_store_writable", 0.0)?;
    ensure!(
        metric(
            &collector,
            "census_collector_batches_refused_total{reason=\"unavailable\"}"
        )? >= 2.0
    );
    // A billing snapshot is refused whole, not half-written.
    let create = [
        "snapshot", "create", "--client", CLIENT, "--period", "2020-02",
    ];
    let snap = collector.census(create)?;
    ensure!(
        !snap.status.success(),
        "a snapshot was made on a full disk: {}",
        String::from_utf8_lossy(&snap.stdout)
    );
    let listed = collector.census_ok(["snapshot", "list", "--client", CLIENT, "--json"])?;
    ensure!(
        listed.trim() == "[]",
        "snapshots after a refused one: {listed}"
    );

    // Room again: no restart, the backlog goes in, and nothing counts twice.
    filler.free()?;
    let back = wait_for(
        &agent,
        at,
        "the backlog delivered",
        Duration::from_secs(60),
        |l| l.message() == "delivered" && l.number("queued") == Some(0),
    )?;
    wait_for(
        &agent,
        back,
        "a sweep delivered after the outage",
        Duration::from_secs(40),
        |l| is_sweep_done(l, |p| p == 0),
    )?;
    agent.kill()?;
    ensure!(collector.proc().is_running(), "the collector stopped");
    let log = lines(&agent);
    let queued = queued_observations(&log);
    let devices = collector.devices(CLIENT)?;
    assert_eq!(devices.len() as u64, u64::from(HOSTS));
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
    metric_becomes(&collector, "census_collector_store_writable", 1.0)?;
    // And the snapshot refused before is made now, whole.
    collector.census_ok(create)?;
    let listed = collector.census_ok(["snapshot", "list", "--client", CLIENT, "--json"])?;
    ensure!(listed.contains("2020-02"), "{listed}");
    // Said once, not once per refused batch.
    let said = collector
        .proc()
        .log()
        .lines()
        .filter(|l| {
            l.contains("cannot write the write-ahead log")
                || l.contains("the store failed to write")
        })
        .count();
    ensure!(
        (1..=4).contains(&said),
        "{said} lines about the full disk:\n{}",
        collector.proc().log()
    );
    collector.kill()?;
    drop(disk);
    Ok(())
}

/// The health of `service` (`""`: the server as a whole).
async fn health(
    channel: tonic::transport::Channel,
    service: &str,
) -> Result<tonic_health::pb::health_check_response::ServingStatus> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await?
        .into_inner()
        .status();
    Ok(status)
}

/// Waits (up to 30 s) until `service`'s health is `want`.
async fn health_becomes(
    c: &crate::in_process::Running,
    service: &str,
    want: tonic_health::pb::health_check_response::ServingStatus,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = health(c.channel().await?, service).await?;
        if now == want {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{service} stayed {now:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_full_disk_is_unavailable_to_agents_and_not_serving_for_ingest_until_it_has_room()
-> Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    // Mounting a tmpfs needs root, as the lab does.
    if lab_skipped() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let disk = Tmpfs::mount(&tmp.path().join("disk"), "32m")?;
    let data = disk.0.join("collector");
    std::fs::create_dir_all(&data)?;
    let c = start(&data).await?;
    let agent = c.agent_named("acme", "hq", "a").await?;
    let mac = |n: u8| [0, 0x16, 0x3e, 0, 0, n];
    c.report(&agent, vec![batch("a", 1, &[("198.18.0.10", mac(1))])])
        .await??;
    // Large enough to need pages of its own (a few bytes more may still fit in the log's
    // last page).
    let hosts: Vec<(String, [u8; 6])> = (0..=255u8)
        .map(|n| (format!("198.18.1.{n}"), [0, 0x16, 0x3e, 0, 1, n]))
        .collect();
    let hosts: Vec<(&str, [u8; 6])> = hosts.iter().map(|(ip, m)| (ip.as_str(), *m)).collect();
    let second = batch("a", 2, &hosts);

    let (filler, _) = Filler::start(&disk.0.join("filler"))?;
    let refused = c
        .report(&agent, vec![second.clone()])
        .await?
        .expect_err("a batch stored on a full disk");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    // Queries answer, without the refused batch; ingest says it cannot take batches, the
    // server as a whole (queries) still serves.
    assert_eq!(c.devices("acme").await?.len(), 1);
    health_becomes(&c, "census.v1.IngestService", ServingStatus::NotServing).await?;
    assert_eq!(
        health(c.channel().await?, "").await?,
        ServingStatus::Serving
    );
    assert_eq!(
        health(c.channel().await?, "census.v1.QueryService").await?,
        ServingStatus::Serving
    );
    assert_eq!(c.metrics.store_writable.get(), 0);

    filler.free()?;
    health_becomes(&c, "census.v1.IngestService", ServingStatus::Serving).await?;
    assert_eq!(c.metrics.store_writable.get(), 1);
    let acks = c.report(&agent, vec![second]).await??;
    assert_eq!(acks[0].status, v1::AckStatus::Stored as i32);
    assert_eq!(c.devices("acme").await?.len(), 257);
    drop(c);
    drop(disk);
    Ok(())
}
