//! The agent's Prometheus endpoint: `GET /metrics` on `metrics_listen` (off by default), in the
//! text exposition format 0.0.4. [`serve`] is the HTTP side; [`AgentMetrics`] renders the page
//! from an [`AgentCounters`] source.
//!
//! The counts themselves (sweeps, replies per method, batches queued, sent, acknowledged and
//! dropped) are kept by the delivery path, which owns them; this file only reads them through
//! [`AgentCounters`] at each scrape, so it needs no lock on the hot path and no global
//! registry. Until a source is wired, [`NotWired`] reports nothing and the page holds only
//! `census_agent_build_info` and `process_start_time_seconds`; a metric that is not counted
//! is left out rather than shown as a misleading 0.
//!
//! The collector serves its own page with the same server (`collector/src/metrics/http.rs`):
//! the daemons share only `census-proto`, the gRPC contract, where HTTP does not belong.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::{
    Router,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus::{Encoder as _, IntCounter, IntCounterVec, Opts, Registry, TextEncoder};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The content type of the page: the text exposition format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The discovery methods, as the `method` label of `census_agent_replies_total`.
pub const METHODS: [&str; 4] = ["arp", "icmp", "snmp", "mdns"];

// === impl AgentCounters ===

/// What the agent has counted since it started. `None` is "not counted by this build": the
/// metric is left off the page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Sweeps finished.
    pub sweeps: Option<u64>,
    /// Addresses or hosts that answered, per method (`arp`, `icmp`, `snmp`, `mdns`), summed
    /// over sweeps; methods missing from the list are left out.
    pub replies: Vec<(&'static str, u64)>,
    /// Batches written to the queue to be sent.
    pub batches_queued: Option<u64>,
    /// Batches sent to the collector (a resend counts again).
    pub batches_sent: Option<u64>,
    /// Batches the collector acknowledged (stored or duplicate).
    pub batches_acknowledged: Option<u64>,
    /// Batches dropped undelivered (the queue's size cap reached).
    pub batches_dropped: Option<u64>,
}

/// Where the page's numbers come from: the delivery path's counters, read at each scrape.
/// Implement it for the counters' type (plain atomics read with `Relaxed` are enough).
pub trait AgentCounters: Send + Sync + std::fmt::Debug {
    fn snapshot(&self) -> CounterSnapshot;
}

/// No counters wired: the page shows only the build and the start time.
#[derive(Debug, Clone, Copy, Default)]
pub struct NotWired;

impl AgentCounters for NotWired {
    fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot::default()
    }
}

// === impl AgentMetrics ===

/// Renders the agent's page from its counters.
#[derive(Debug, Clone)]
pub struct AgentMetrics {
    started: SystemTime,
    counters: Arc<dyn AgentCounters>,
}

impl AgentMetrics {
    /// Metrics of an agent that started now, read from `counters`.
    pub fn new(counters: Arc<dyn AgentCounters>) -> Self {
        AgentMetrics {
            started: SystemTime::now(),
            counters,
        }
    }

    /// The page, in the text exposition format 0.0.4 ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        render(&self.counters.snapshot(), self.started)
    }
}

/// Renders `snapshot` into a fresh registry: the counters live in the delivery path, so each
/// scrape copies their current values (a handful of integers) instead of sharing a registry.
fn render(snapshot: &CounterSnapshot, started: SystemTime) -> String {
    let registry = Registry::new();
    let counter = |name: &str, help: &str, value: Option<u64>| {
        let Some(value) = value else { return };
        if let Ok(c) = IntCounter::with_opts(Opts::new(name, help)) {
            c.inc_by(value);
            let _ = registry.register(Box::new(c));
        }
    };
    counter(
        "census_agent_sweeps_total",
        "Sweeps finished since the agent started.",
        snapshot.sweeps,
    );
    counter(
        "census_agent_batches_queued_total",
        "Batches queued to be sent to the collector.",
        snapshot.batches_queued,
    );
    counter(
        "census_agent_batches_sent_total",
        "Batches sent to the collector (a resend counts again).",
        snapshot.batches_sent,
    );
    counter(
        "census_agent_batches_acknowledged_total",
        "Batches the collector acknowledged (stored or duplicate).",
        snapshot.batches_acknowledged,
    );
    counter(
        "census_agent_batches_dropped_total",
        "Batches dropped undelivered because the queue reached its size cap.",
        snapshot.batches_dropped,
    );
    if !snapshot.replies.is_empty()
        && let Ok(replies) = IntCounterVec::new(
            Opts::new(
                "census_agent_replies_total",
                "Addresses (arp, icmp, snmp) or hosts (mdns) that answered, per method, summed over sweeps.",
            ),
            &["method"],
        )
    {
        for (method, n) in &snapshot.replies {
            replies.with_label_values(&[*method]).inc_by(*n);
        }
        let _ = registry.register(Box::new(replies));
    }
    if let Ok(start) = prometheus::Gauge::with_opts(Opts::new(
        "process_start_time_seconds",
        "Start time of the agent since the Unix epoch, in seconds.",
    )) {
        start.set(
            started
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_secs_f64(),
        );
        let _ = registry.register(Box::new(start));
    }
    if let Ok(info) = prometheus::IntGaugeVec::new(
        Opts::new(
            "census_agent_build_info",
            "Always 1, labelled with the agent's version.",
        ),
        &["version"],
    ) {
        info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let _ = registry.register(Box::new(info));
    }
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut out) {
        warn!(error = %e, "cannot render the metrics");
    }
    String::from_utf8(out).unwrap_or_default()
}

// === impl serve ===

/// The running endpoint.
#[derive(Debug)]
pub struct Serving {
    /// Where it listens (the port chosen when `listen` asked for port 0).
    pub addr: SocketAddr,
    /// Ends once `shutdown` is cancelled and open scrapes are answered.
    pub task: JoinHandle<()>,
}

/// Binds `listen` and serves `GET /metrics` with what `render` returns (called on a blocking
/// thread, once per scrape) until `shutdown` is cancelled; other paths are 404, other methods
/// 405. Binding happens before this returns, so an address in use is an error at start.
pub async fn serve(
    listen: SocketAddr,
    render: impl Fn() -> String + Send + Sync + 'static,
    shutdown: CancellationToken,
) -> std::io::Result<Serving> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let render = Arc::new(render);
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let render = Arc::clone(&render);
                async move {
                    match tokio::task::spawn_blocking(move || render()).await {
                        Ok(body) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
                        Err(e) => {
                            warn!(error = %e, "rendering the metrics failed");
                            (
                                StatusCode::INTERNAL_SERVER_ERROR,
                                "cannot render the metrics\n",
                            )
                                .into_response()
                        }
                    }
                }
            }),
        )
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "not found: metrics are at /metrics\n",
            )
                .into_response() as Response
        });
    info!(%addr, "metrics served at /metrics");
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            warn!(error = %e, "the metrics server failed");
        }
    });
    Ok(Serving { addr, task })
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[derive(Debug)]
    struct Fixed(CounterSnapshot);

    impl AgentCounters for Fixed {
        fn snapshot(&self) -> CounterSnapshot {
            self.0.clone()
        }
    }

    fn sample(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn renders_what_the_counters_hold_in_format_0_0_4() {
        let m = AgentMetrics::new(Arc::new(Fixed(CounterSnapshot {
            sweeps: Some(3),
            replies: vec![("arp", 40), ("icmp", 2), ("snmp", 5), ("mdns", 1)],
            batches_queued: Some(9),
            batches_sent: Some(10),
            batches_acknowledged: Some(9),
            batches_dropped: Some(0),
        })));
        let text = m.render();
        for (name, want) in [
            ("census_agent_sweeps_total", 3.0),
            ("census_agent_replies_total{method=\"arp\"}", 40.0),
            ("census_agent_replies_total{method=\"mdns\"}", 1.0),
            ("census_agent_batches_queued_total", 9.0),
            ("census_agent_batches_sent_total", 10.0),
            ("census_agent_batches_acknowledged_total", 9.0),
            ("census_agent_batches_dropped_total", 0.0),
            ("census_agent_build_info{version=\"0.1.0\"}", 1.0),
        ] {
            assert_eq!(sample(&text, name), Some(want), "{name} in\n{text}");
        }
        assert!(sample(&text, "process_start_time_seconds").is_some_and(|t| t > 1.7e9));
        assert!(
            text.contains("# TYPE census_agent_sweeps_total counter\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn what_is_not_counted_is_left_out() {
        let text = AgentMetrics::new(Arc::new(NotWired)).render();
        assert!(!text.contains("census_agent_batches"), "{text}");
        assert!(!text.contains("census_agent_replies"), "{text}");
        assert!(text.contains("census_agent_build_info"), "{text}");
    }

    async fn request(addr: SocketAddr, line: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("{line}\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn serves_the_page_until_shutdown() {
        let shutdown = CancellationToken::new();
        let m = AgentMetrics::new(Arc::new(Fixed(CounterSnapshot {
            sweeps: Some(1),
            ..CounterSnapshot::default()
        })));
        let serving = serve(
            "127.0.0.1:0".parse().expect("addr"),
            move || m.render(),
            shutdown.clone(),
        )
        .await
        .expect("serve");
        let ok = request(serving.addr, "GET /metrics HTTP/1.1").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(
            ok.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{ok}"
        );
        assert!(ok.contains("\ncensus_agent_sweeps_total 1\n"), "{ok}");
        let missing = request(serving.addr, "GET /other HTTP/1.1").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        // A second endpoint on the same address is refused at once.
        assert!(
            serve(serving.addr, String::new, shutdown.clone())
                .await
                .is_err()
        );
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), serving.task)
            .await
            .expect("stops on shutdown")
            .expect("task");
    }
}
