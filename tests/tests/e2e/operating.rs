//! The collector as an operator runs it: it accepts connections only once it can answer (its
//! store open, its log replayed, its CA and the operator's credentials written).

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
    support::{COLLECTOR_PORT, Collector},
};

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
    for seq in 1..=batches {
        let observations: Vec<_> = (0..1000u32)
            .filter_map(|i| {
                let n = u32::try_from(seq).ok()? * 1000 + i;
                let [_, a, b, c] = n.to_be_bytes();
                let wire = v1::Observation {
                    observed_at: Some(convert::timestamp_from_millis(1_000)),
                    method: v1::Method::Arp as i32,
                    addresses: vec![v1::IpAddress {
                        address: Ipv4Addr::new(198, 18, b, c).to_string(),
                        answered: true,
                        ..Default::default()
                    }],
                    macs: vec![vec![0, 0x16, 0x3e, a, b, c]],
                    ..Default::default()
                };
                clean_observation(&wire, 1_000, 0)
            })
            .collect();
        let id = BatchId {
            agent_id: "loader".into(),
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
    store_with_a_log_to_replay(&data, 40)?;
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
    assert_eq!(collector.devices_of("acme")?, 40_000);
    Ok(())
}
