//! Metrics end to end: a collector serving `/metrics` in the lab's core namespace, a real agent
//! sweeping a site and delivering, and the collector's counters read over HTTP from inside the
//! lab: batches stored equal the batches the agent had acknowledged, observations stored equal
//! the site's devices, nothing refused, the stream closed, the store's size and the queries
//! counted. The agent's own endpoint answers inside its namespace. Duplicates and refusals,
//! which a healthy agent does not cause, are sent by hand to an in-process collector.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use census_proto::{
    convert,
    v1::{self, ingest_service_client::IngestServiceClient},
};
use census_tests::{
    lab::{HostSpec, Lab, SiteSpec, lab_skipped},
    support::{self, Collector, HttpResponse},
};

use crate::in_process::{Running, start};
use census_proto::transport::Credentials;

const HOSTS: u32 = 6;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("test address")
}

/// The value of `name` on the page, or an error quoting the page.
fn value(page: &HttpResponse, name: &str) -> Result<f64> {
    page.sample(name)
        .with_context(|| format!("no sample {name} in:\n{}", page.body))
}

#[test]
fn collector_metrics_match_what_the_agent_delivered() -> Result<()> {
    if lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let site = lab.add_site(SiteSpec::new(
        "metrics-hq",
        "198.18.0.0/24".parse()?,
        ip("198.18.0.2"),
    ))?;
    site.add_hosts((0..HOSTS).map(|i| {
        HostSpec::new(Ipv4Addr::from(u32::from(ip("198.18.0.10")) + i)).with_mac([
            0x00,
            0x16,
            0x3e,
            0x6d,
            0x00,
            u8::try_from(i).expect("few hosts"),
        ])
    }))?;
    let listen = format!("{}:0", lab.collector_ip());
    let collector = Collector::start_with_args(
        &lab,
        &lab.dir().join("collector"),
        &["--metrics-listen", &listen],
    )?;

    // Before any agent: served in format 0.0.4, every counter at 0, the store on disk.
    let page = collector.metrics()?;
    assert_eq!(page.status, 200, "{page:?}");
    let content_type = page.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    assert!(
        page.body
            .contains("# TYPE census_collector_batches_stored_total counter")
    );
    assert_eq!(
        value(&page, "census_collector_batches_received_total")?,
        0.0
    );
    assert_eq!(value(&page, "census_collector_report_streams")?, 0.0);
    assert!(value(&page, "census_collector_store_bytes")? > 0.0);
    assert!(value(&page, "process_start_time_seconds")? > 1.7e9);
    // Only /metrics is served.
    let other = support::http_get(
        &lab,
        lab.core_ns(),
        &collector
            .metrics_url()
            .context("metrics url")?
            .replace("/metrics", "/"),
    )?;
    assert_eq!(other.status, 404);

    let state = collector.enroll("acme", "hq")?;
    let out = support::agent_once(
        &lab,
        site.agent().ns(),
        [
            "--log-format",
            "json",
            "--collector",
            &collector.url(),
            "--state-dir",
            state.to_str().expect("utf-8 path"),
            "--scope",
            "198.18.0.0/24",
            "--disable",
            "mdns",
        ],
    )?;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "agent failed: {log}");
    let deliveries = support::deliveries(&log);
    let sent: u64 = deliveries.iter().map(|d| d.batches).sum();
    let stored: u64 = deliveries.iter().map(|d| d.stored).sum();
    let observations: u64 = deliveries.iter().map(|d| d.observations).sum();
    assert!(sent >= 1, "no delivery logged: {log}");
    assert_eq!(stored, sent, "{deliveries:?}");
    assert_eq!(observations, u64::from(HOSTS), "{deliveries:?}");
    assert_eq!(collector.devices_of("acme")?, u64::from(HOSTS));

    // The agent is gone: its stream closes (the collector notices within moments).
    let deadline = Instant::now() + Duration::from_secs(10);
    let page = loop {
        let page = collector.metrics()?;
        if value(&page, "census_collector_report_streams")? == 0.0 {
            break page;
        }
        if Instant::now() > deadline {
            bail!(
                "the agent's stream is still counted as open:\n{}",
                page.body
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let count = |name: &str| value(&page, name);
    let (sent, hosts) = (sent as f64, f64::from(HOSTS));
    assert_eq!(count("census_collector_batches_received_total")?, sent);
    assert_eq!(count("census_collector_batches_stored_total")?, sent);
    assert_eq!(count("census_collector_batches_duplicate_total")?, 0.0);
    for reason in [
        "invalid",
        "unauthenticated",
        "conflict",
        "malformed",
        "unavailable",
        "error",
    ] {
        assert_eq!(
            count(&format!(
                "census_collector_batches_refused_total{{reason=\"{reason}\"}}"
            ))?,
            0.0,
            "{reason}"
        );
    }
    assert_eq!(count("census_collector_observations_stored_total")?, hosts);
    assert_eq!(count("census_collector_observations_rejected_total")?, 0.0);
    assert_eq!(count("census_collector_batch_store_seconds_count")?, sent);
    assert!(
        count(
            "census_collector_grpc_requests_total{method=\"Report\",service=\"census.v1.IngestService\"}"
        )? >= 1.0
    );
    assert!(count("census_collector_store_bytes")? > 0.0);

    // Queries are counted and timed: `census counts` is one GetCounts call.
    let get_counts = "census_collector_grpc_requests_total{method=\"GetCounts\",service=\"census.v1.QueryService\"}";
    let before = page.sample(get_counts).unwrap_or(0.0);
    collector.counts()?;
    let page = collector.metrics()?;
    assert_eq!(value(&page, get_counts)?, before + 1.0);
    assert_eq!(
        value(
            &page,
            "census_collector_grpc_request_seconds_count{method=\"GetCounts\",service=\"census.v1.QueryService\"}"
        )?,
        before + 1.0
    );
    Ok(())
}

#[test]
fn the_agent_serves_its_metrics_in_its_namespace() -> Result<()> {
    if lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let site = lab.add_site(SiteSpec::new(
        "metrics-agent",
        "198.18.0.0/24".parse()?,
        ip("198.18.0.2"),
    ))?;
    let host = site.add_host(HostSpec::new(ip("198.18.0.10")))?;
    let collector = Collector::start(&lab, &lab.dir().join("collector"))?;
    let state = collector.enroll("acme", "hq")?;
    // Each namespace has a loopback of its own, so a fixed port cannot collide.
    let agent = support::spawn_agent(
        &lab,
        site.agent().ns(),
        [
            "--collector",
            &collector.url(),
            "--state-dir",
            state.to_str().expect("utf-8 path"),
            "--scope",
            "198.18.0.0/24",
            "--disable",
            "mdns",
            "--interval",
            "1h",
            "--metrics-listen",
            "127.0.0.1:7402",
        ],
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let page = loop {
        match support::http_get(&lab, site.agent().ns(), "http://127.0.0.1:7402/metrics") {
            Ok(page) if page.status == 200 => break page,
            _ if Instant::now() > deadline || !agent.is_running() => {
                bail!("the agent serves no metrics; its log:\n{}", agent.log())
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let content_type = page.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let build = format!(
        "census_agent_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(value(&page, &build)?, 1.0);
    assert!(value(&page, "process_start_time_seconds")? > 1.7e9);
    // The delivery path's counters: once the first sweep is acknowledged, the page shows it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let page = loop {
        let page = support::http_get(&lab, site.agent().ns(), "http://127.0.0.1:7402/metrics")?;
        if page
            .sample("census_agent_batches_acknowledged_total")
            .unwrap_or(0.0)
            >= 1.0
        {
            break page;
        }
        if Instant::now() > deadline || !agent.is_running() {
            bail!(
                "no acknowledged batch on the agent's page; its log:\n{}",
                agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(value(&page, "census_agent_sweeps_total")?, 1.0);
    assert!(value(&page, "census_agent_replies_total{method=\"arp\"}")? >= 1.0);
    assert_eq!(
        value(&page, "census_agent_batches_sent_total")?,
        value(&page, "census_agent_batches_acknowledged_total")?
    );
    assert_eq!(value(&page, "census_agent_batches_dropped_total")?, 0.0);
    // Not reachable from the site: it listens on the agent's loopback only.
    let from_site = support::http_get(&lab, host.ns(), "http://198.18.0.2:7402/metrics");
    assert!(from_site.is_err(), "{from_site:?}");
    agent.kill()?;
    Ok(())
}

/// A batch of one ARP observation of `mac` at 198.18.0.10.
fn batch(sequence: u64, mac: [u8; 6]) -> v1::ObservationBatch {
    v1::ObservationBatch {
        agent_id: "metrics-agent".into(),
        sequence,
        observations: vec![v1::Observation {
            observed_at: Some(convert::timestamp(std::time::SystemTime::now())),
            method: v1::Method::Arp as i32,
            addresses: vec![v1::IpAddress {
                address: "198.18.0.10".into(),
                answered: true,
                ..Default::default()
            }],
            macs: vec![mac.to_vec()],
            ..Default::default()
        }],
        agent_version: "test".into(),
        ..Default::default()
    }
}

/// Sends `batches` on one Report stream; the number of acks before the stream ended.
async fn send(
    c: &Running,
    token: &Credentials,
    batches: Vec<v1::ObservationBatch>,
) -> Result<usize> {
    let mut ingest = IngestServiceClient::new(c.agent_channel(token).await?);
    let n = batches.len();
    let mut acks = ingest
        .report(c.as_agent(token, tokio_stream::iter(batches)))
        .await?
        .into_inner();
    let mut got = 0;
    while got < n {
        match tokio::time::timeout(Duration::from_secs(10), acks.message()).await? {
            Ok(Some(_)) => got += 1,
            Ok(None) | Err(_) => break,
        }
    }
    Ok(got)
}

#[tokio::test]
async fn duplicates_and_refusals_are_counted_by_reason() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let c = start(dir.path()).await?;
    let token = c.agent_named("acme", "hq", "metrics-agent").await?;
    let mac = [0, 0x16, 0x3e, 0x6d, 0, 1];
    let first = batch(1, mac);
    assert_eq!(send(&c, &token, vec![first.clone()]).await?, 1);
    // A resend after a lost ack: acknowledged as a duplicate, not stored again.
    assert_eq!(send(&c, &token, vec![first]).await?, 1);
    // The same sequence number with other content: refused as a conflict, ending the stream.
    assert_eq!(
        send(&c, &token, vec![batch(1, [0, 0x16, 0x3e, 0x6d, 0, 2])]).await?,
        0
    );
    // Sequence numbers start at 1: refused as invalid.
    assert_eq!(send(&c, &token, vec![batch(0, mac)]).await?, 0);
    // Over the 4 MiB message limit: refused as malformed, ending the stream.
    let mut big = batch(2, mac);
    big.observations[0].names.push(v1::Name {
        value: "x".repeat(5 * 1024 * 1024),
        source: v1::NameSource::MdnsHost as i32,
    });
    assert_eq!(send(&c, &token, vec![big]).await?, 0);

    let m = &c.metrics;
    assert_eq!(m.batches_received.get(), 5);
    assert_eq!(m.batches_stored.get(), 1);
    assert_eq!(m.batches_duplicate.get(), 1);
    assert_eq!(m.observations_stored.get(), 1);
    let refused = |reason: &str| m.batches_refused.with_label_values(&[reason]).get();
    assert_eq!(refused("conflict"), 1);
    assert_eq!(refused("invalid"), 1);
    assert_eq!(refused("malformed"), 1);
    assert_eq!(refused("unauthenticated") + refused("error"), 0);
    let page = m.render();
    assert!(
        page.contains("\ncensus_collector_batches_refused_total{reason=\"conflict\"} 1\n"),
        "{page}"
    );
    // Every stream has ended.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while m.report_streams.get() != 0 {
        assert!(std::time::Instant::now() < deadline, "streams still open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
