//! The collector's Prometheus metrics: what it ingested, refused and stored, how many agents
//! stream to it, how its users are read, how large its store is and how long its gRPC calls
//! take. Every collector counts into its own [`Metrics`] (no global registry, so collectors
//! in one test process never mix their numbers); `metrics_listen` in the config decides
//! whether they are served, by [`http`], as `GET /metrics` in the text exposition format
//! 0.0.4.
//!
//! Names follow Prometheus' conventions: `census_collector_` prefix, `_total` counters that
//! `rate()` turns into per-second rates, `_seconds` and `_bytes` units. The Metrics section of
//! `collector/README.md` lists every one.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use prometheus::{
    Encoder as _, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub mod grpc;
pub mod http;

/// The content type of what [`Metrics::render`] returns: the text exposition format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Latency buckets, in seconds, for storing a batch and for gRPC calls: from a cached count
/// (well under a millisecond) to a large export or a slow disk (seconds).
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Why a batch was refused, as the `reason` label of `census_collector_batches_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedReason {
    /// The envelope or its contents break the contract (too many observations, a bad agent id,
    /// a bad directory part).
    Invalid,
    /// The token was revoked, is unknown, or now names another scope.
    Unauthenticated,
    /// The sequence number was already stored with other content.
    Conflict,
    /// The message could not be decoded or was over the size limit (it ends the stream).
    Malformed,
    /// The collector could not take it now (its store cannot write, or it is shutting down):
    /// the agent keeps it and retries.
    Unavailable,
    /// The collector failed (store error).
    Error,
}

impl RefusedReason {
    pub fn label(self) -> &'static str {
        match self {
            RefusedReason::Invalid => "invalid",
            RefusedReason::Unauthenticated => "unauthenticated",
            RefusedReason::Conflict => "conflict",
            RefusedReason::Malformed => "malformed",
            RefusedReason::Unavailable => "unavailable",
            RefusedReason::Error => "error",
        }
    }

    /// The reason a refused batch's status stands for.
    pub fn of(status: &tonic::Status) -> Self {
        use tonic::Code;
        match status.code() {
            Code::InvalidArgument | Code::OutOfRange => RefusedReason::Invalid,
            Code::Unauthenticated | Code::PermissionDenied | Code::NotFound => {
                RefusedReason::Unauthenticated
            }
            Code::FailedPrecondition => RefusedReason::Conflict,
            Code::Unavailable => RefusedReason::Unavailable,
            _ => RefusedReason::Error,
        }
    }
}

/// Every metric of one collector, registered in its own registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// The data directory whose files' sizes are `census_collector_store_bytes`, if known.
    data_dir: Option<PathBuf>,
    pub batches_received: IntCounter,
    pub batches_stored: IntCounter,
    pub batches_duplicate: IntCounter,
    pub batches_refused: IntCounterVec,
    pub observations_stored: IntCounter,
    pub observations_rejected: IntCounter,
    pub batch_store_seconds: Histogram,
    pub report_streams: IntGauge,
    pub streams_idle_closed: IntCounter,
    pub directory_parts: IntCounterVec,
    pub directory_users: IntCounter,
    pub entra_reads: IntCounterVec,
    pub grpc_requests: IntCounterVec,
    pub grpc_seconds: HistogramVec,
    pub tls_handshakes_failed: IntCounterVec,
    /// 1 while the store takes writes, 0 while it cannot (a full or failing disk).
    pub store_writable: IntGauge,
    store_bytes: IntGauge,
}

/// Registers `metric` in `registry`. Registration fails only on a duplicate or malformed name,
/// which the unit tests would catch; a metric that could not be registered still counts, it
/// just is not shown.
fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    if let Err(e) = registry.register(Box::new(metric.clone())) {
        tracing::warn!(error = %e, "cannot register a metric");
    }
    metric
}

/// Builds metric `T` from its options; the options are constants checked by the unit tests.
macro_rules! metric {
    ($registry:expr, $ty:ty, $opts:expr) => {
        register(
            $registry,
            <$ty>::with_opts($opts).unwrap_or_else(|e| panic!("metric: {e}")),
        )
    };
    ($registry:expr, $ty:ty, $opts:expr, $labels:expr) => {
        register(
            $registry,
            <$ty>::new($opts, $labels).unwrap_or_else(|e| panic!("metric: {e}")),
        )
    };
}

impl Metrics {
    /// A fresh set of metrics; the store's size is read from `data_dir` at each render.
    pub fn new(data_dir: Option<&Path>) -> Arc<Self> {
        let r = Registry::new();
        let r = &r;
        let latency = |name: &str, help: &str| {
            HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec())
        };
        let m = Metrics {
            data_dir: data_dir.map(Path::to_owned),
            batches_received: metric!(
                r,
                IntCounter,
                Opts::new(
                    "census_collector_batches_received_total",
                    "Batches received on agents' Report streams, before any check."
                )
            ),
            batches_stored: metric!(
                r,
                IntCounter,
                Opts::new(
                    "census_collector_batches_stored_total",
                    "Batches stored for the first time and acknowledged as stored."
                )
            ),
            batches_duplicate: metric!(
                r,
                IntCounter,
                Opts::new(
                    "census_collector_batches_duplicate_total",
                    "Batches acknowledged as duplicates: resent after a lost acknowledgement, stored before."
                )
            ),
            batches_refused: metric!(
                r,
                IntCounterVec,
                Opts::new(
                    "census_collector_batches_refused_total",
                    "Batches refused, by reason: invalid, unauthenticated, conflict, malformed, error."
                ),
                &["reason"]
            ),
            observations_stored: metric!(
                r,
                IntCounter,
                Opts::new(
                    "census_collector_observations_stored_total",
                    "Observations stored from newly stored batches (rate() of it is the ingest rate)."
                )
            ),
            observations_rejected: metric!(
                r,
                IntCounter,
                Opts::new(
                    "census_collector_observations_rejected_total",
                    "Observations left out of newly stored batches for failing validation."
                )
            ),
            batch_store_seconds: metric!(
                r,
                Histogram,
                latency(
                    "census_collector_batch_store_seconds",
                    "Time to store one batch and make it durable, waiting for a storing slot included."
                )
            ),
            report_streams: metric!(
                r,
                IntGauge,
                Opts::new(
                    "census_collector_report_streams",
                    "Report streams open now: the agents connected."
                )
            ),
            streams_idle_closed: metric!(
                r,
                IntCounter,
                Opts::new(
                    "census_collector_streams_idle_closed_total",
                    "Report streams closed because no whole batch arrived within stream_idle_timeout."
                )
            ),
            directory_parts: metric!(
                r,
                IntCounterVec,
                Opts::new(
                    "census_collector_directory_parts_total",
                    "Active Directory read parts stored from agents' batches, by result: ok, failed (the agent's read failed)."
                ),
                &["result"]
            ),
            directory_users: metric!(
                r,
                IntCounter,
                Opts::new(
                    "census_collector_directory_users_total",
                    "Active Directory users stored from agents' read parts."
                )
            ),
            entra_reads: metric!(
                r,
                IntCounterVec,
                Opts::new(
                    "census_collector_entra_reads_total",
                    "Entra ID (Microsoft Graph) reads of a client's users, by result: ok, failed."
                ),
                &["result"]
            ),
            tls_handshakes_failed: metric!(
                r,
                IntCounterVec,
                Opts::new(
                    "census_collector_tls_handshakes_failed_total",
                    "Connections refused because their TLS handshake failed, by reason: untrusted_server_certificate, bad_client_certificate, not_tls, timeout, other."
                ),
                &["reason"]
            ),
            grpc_requests: metric!(
                r,
                IntCounterVec,
                Opts::new(
                    "census_collector_grpc_requests_total",
                    "gRPC calls received, by service and method (Report counts streams opened)."
                ),
                &["service", "method"]
            ),
            grpc_seconds: metric!(
                r,
                HistogramVec,
                latency(
                    "census_collector_grpc_request_seconds",
                    "Time from a gRPC call's request to its response headers (for unary calls such as GetCounts, the whole call)."
                ),
                &["service", "method"]
            ),
            store_writable: metric!(
                r,
                IntGauge,
                Opts::new(
                    "census_collector_store_writable",
                    "1 while the store takes writes; 0 while it cannot (a full or failing disk: batches are refused UNAVAILABLE and agents retry)."
                )
            ),
            store_bytes: metric!(
                r,
                IntGauge,
                Opts::new(
                    "census_collector_store_bytes",
                    "Bytes of the files in the collector's data directory (the store and the operator token), read at each scrape."
                )
            ),
            registry: r.clone(),
        };
        m.store_writable.set(1);
        let start = metric!(
            r,
            prometheus::Gauge,
            Opts::new(
                "process_start_time_seconds",
                "Start time of the collector since the Unix epoch, in seconds."
            )
        );
        start.set(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_secs_f64(),
        );
        let info = metric!(
            r,
            IntGaugeVec,
            Opts::new(
                "census_collector_build_info",
                "Always 1, labelled with the collector's version."
            ),
            &["version"]
        );
        info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        // Every label value shows from the start, at 0, so alerts on them have a series.
        for reason in [
            RefusedReason::Invalid,
            RefusedReason::Unauthenticated,
            RefusedReason::Conflict,
            RefusedReason::Malformed,
            RefusedReason::Unavailable,
            RefusedReason::Error,
        ] {
            m.batches_refused.with_label_values(&[reason.label()]);
        }
        for result in ["ok", "failed"] {
            m.directory_parts.with_label_values(&[result]);
            m.entra_reads.with_label_values(&[result]);
        }
        for why in crate::handshake::Failure::ALL {
            m.tls_handshakes_failed.with_label_values(&[why.label()]);
        }
        Arc::new(m)
    }

    /// A connection's TLS handshake failed, for `reason` (a [`crate::handshake::Failure`]).
    pub fn tls_handshake_failed(&self, reason: &str) {
        self.tls_handshakes_failed
            .with_label_values(&[reason])
            .inc();
    }

    /// A batch was refused for `reason`.
    pub fn refused(&self, reason: RefusedReason) {
        self.batches_refused
            .with_label_values(&[reason.label()])
            .inc();
    }

    /// An open Report stream, counted in `census_collector_report_streams` until dropped.
    pub fn stream_opened(self: &Arc<Self>) -> StreamGuard {
        self.report_streams.inc();
        StreamGuard(Arc::clone(self))
    }

    /// Every metric in the text exposition format 0.0.4 ([`CONTENT_TYPE`]). Reads the data
    /// directory's size, so call it off the async threads.
    pub fn render(&self) -> String {
        if let Some(dir) = &self.data_dir {
            self.store_bytes
                .set(i64::try_from(dir_size(dir)).unwrap_or(i64::MAX));
        }
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot render the metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Decrements `census_collector_report_streams` when the stream's task ends, however it ends.
#[derive(Debug)]
pub struct StreamGuard(Arc<Metrics>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.report_streams.dec();
    }
}

/// The total size of the regular files under `dir`, following no symbolic links; what cannot
/// be read counts as 0. The store's engine is not asked: walking the directory works for any
/// store kept there and needs no lock.
pub fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut pending = vec![dir.to_owned()];
    while let Some(d) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => pending.push(entry.path()),
                Ok(t) if t.is_file() => {
                    total += entry.metadata().map_or(0, |m| m.len());
                }
                _ => {}
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample `name` (with its labels, as rendered) in `text`.
    fn sample(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn every_metric_is_registered_and_rendered_in_format_0_0_4() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("store")).expect("mkdir");
        std::fs::write(dir.path().join("store").join("db"), vec![0u8; 4096]).expect("write");
        std::fs::write(dir.path().join("operator.token"), b"0123456789").expect("write");
        let m = Metrics::new(Some(dir.path()));
        m.batches_received.inc_by(3);
        m.batches_stored.inc_by(2);
        m.batches_duplicate.inc();
        m.refused(RefusedReason::Conflict);
        m.observations_stored.inc_by(40);
        m.observations_rejected.inc_by(2);
        m.directory_parts.with_label_values(&["ok"]).inc();
        m.entra_reads.with_label_values(&["failed"]).inc();
        m.tls_handshake_failed("not_tls");
        m.grpc_seconds
            .with_label_values(&["census.v1.QueryService", "GetCounts"])
            .observe(0.002);
        let text = m.render();
        for (name, want) in [
            ("census_collector_batches_received_total", 3.0),
            ("census_collector_batches_stored_total", 2.0),
            ("census_collector_batches_duplicate_total", 1.0),
            (
                "census_collector_batches_refused_total{reason=\"conflict\"}",
                1.0,
            ),
            ("census_collector_observations_stored_total", 40.0),
            ("census_collector_observations_rejected_total", 2.0),
            ("census_collector_directory_parts_total{result=\"ok\"}", 1.0),
            ("census_collector_entra_reads_total{result=\"failed\"}", 1.0),
            (
                "census_collector_tls_handshakes_failed_total{reason=\"not_tls\"}",
                1.0,
            ),
            ("census_collector_report_streams", 0.0),
            ("census_collector_store_writable", 1.0),
            ("census_collector_store_bytes", 4106.0),
            (
                "census_collector_grpc_request_seconds_count{method=\"GetCounts\",service=\"census.v1.QueryService\"}",
                1.0,
            ),
            ("census_collector_build_info{version=\"0.1.0\"}", 1.0),
        ] {
            assert_eq!(sample(&text, name), Some(want), "{name} in\n{text}");
        }
        assert!(sample(&text, "process_start_time_seconds").is_some_and(|t| t > 1.7e9));
        // 0.0.4: HELP and TYPE lines, no OpenMetrics `# EOF`.
        assert!(text.contains("# TYPE census_collector_batches_stored_total counter\n"));
        assert!(text.contains("# TYPE census_collector_report_streams gauge\n"));
        assert!(text.contains("# TYPE census_collector_batch_store_seconds histogram\n"));
        assert!(!text.contains("# EOF"));
        assert_eq!(
            TextEncoder::new().format_type(),
            "text/plain; version=0.0.4"
        );
    }

    #[test]
    fn open_streams_are_counted_until_their_guard_drops() {
        let m = Metrics::new(None);
        let a = m.stream_opened();
        let b = m.stream_opened();
        assert_eq!(m.report_streams.get(), 2);
        drop(a);
        assert_eq!(m.report_streams.get(), 1);
        drop(b);
        assert_eq!(m.report_streams.get(), 0);
    }

    #[test]
    fn refusals_are_named_by_their_status() {
        use tonic::Status;
        for (status, want) in [
            (Status::invalid_argument("x"), RefusedReason::Invalid),
            (Status::unauthenticated("x"), RefusedReason::Unauthenticated),
            (Status::failed_precondition("x"), RefusedReason::Conflict),
            (Status::internal("x"), RefusedReason::Error),
            (Status::unavailable("x"), RefusedReason::Unavailable),
        ] {
            assert_eq!(RefusedReason::of(&status), want, "{status}");
        }
    }

    #[test]
    fn collectors_in_one_process_count_apart() {
        let (a, b) = (Metrics::new(None), Metrics::new(None));
        a.batches_stored.inc();
        assert_eq!(b.batches_stored.get(), 0);
        assert_eq!(
            sample(&b.render(), "census_collector_batches_stored_total"),
            Some(0.0)
        );
    }
}
