//! Wires the store and the services into one gRPC server and runs it until shutdown.

use std::{sync::Arc, time::Duration};

use census_proto::v1::{
    admin_service_server::AdminServiceServer, enrollment_service_server::EnrollmentServiceServer,
    ingest_service_server::IngestServiceServer, query_service_server::QueryServiceServer,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    auth::Registry,
    config::{Config, ConfigError},
    entra::{EntraError, EntraReader},
    graph::GraphLimits,
    handshake,
    metrics::{Metrics, grpc::GrpcMetricsLayer},
    pki::{Pki, PkiError},
    service::{Collector, Limits, Security, operator_check},
    store::{
        Store, StoreError,
        sled::{Reopening, SledOptions},
    },
};

/// Streams and calls one connection may have open at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 16;

/// How long a connection gets to complete its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long in-flight calls get to finish after shutdown is asked for.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// How often the store is asked whether it takes writes, for the ingest service's health and
/// `census_collector_store_writable`.
const STORE_CHECK: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("TLS: {0}")]
    Pki(#[from] PkiError),
    #[error("cannot start reading Entra ID users: {0}")]
    Entra(#[from] EntraError),
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// A collector ready to serve: the store is open, the CA and the operator's credentials exist.
#[derive(Debug)]
pub struct Prepared {
    pub store: Arc<dyn Store>,
    pub pki: Arc<Pki>,
    /// The enrolled agents, read from the store.
    pub agents: Registry,
    /// The collector's metrics (served by [`crate::metrics::http`] when `metrics_listen` is
    /// set; counted either way).
    pub metrics: Arc<Metrics>,
}

/// Validates the config, opens the store, and loads (or makes) the CA, the server certificate
/// and the operator's credentials.
pub fn prepare(config: &Config) -> Result<Prepared, RunError> {
    config.validate()?;
    let dir = config.data_dir.as_deref().ok_or(ConfigError::NoDataDir)?;
    // The store first: its lock tells a second collector on the same directory to stop
    // before it writes anything.
    let options = SledOptions {
        cache_bytes: config.cache_mb * 1024 * 1024,
    };
    let store: Arc<dyn Store> = Arc::new(Reopening::open(dir, &options)?);
    let pki = Arc::new(Pki::load_or_create(dir, &config.tls, config.listen)?);
    let agents = Registry::new(store.agents()?);
    Ok(Prepared {
        store,
        pki,
        agents,
        metrics: Metrics::new(Some(dir)),
    })
}

/// Serves `census.v1`, gRPC health and reflection on `listener` until `shutdown` is cancelled,
/// then drains in-flight calls for up to ten seconds.
pub async fn run(
    config: &Config,
    prepared: Prepared,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let tenants = config.graph_tenants()?;
    let store = Arc::clone(&prepared.store);
    let watched = Arc::clone(&prepared.store);
    let metrics = Arc::clone(&prepared.metrics);
    let security = Arc::new(Security::new(
        Arc::clone(&prepared.pki),
        prepared.agents,
        config.dev_plaintext,
    ));
    let mut collector = Collector::new(
        prepared.store,
        Arc::clone(&security),
        Limits {
            max_batch_observations: config.max_batch_observations,
            stream_idle: config.stream_idle_timeout,
        },
        shutdown.clone(),
    )
    .with_metrics(Arc::clone(&metrics));
    let mut entra = None;
    if !tenants.is_empty() {
        info!(clients = tenants.len(), interval = %humantime::format_duration(config.graph_interval), "reading Entra ID users");
        let reader = Arc::new(
            EntraReader::new(
                tenants,
                config.graph_interval,
                GraphLimits {
                    deadline: config.graph_read_deadline,
                    ..GraphLimits::default()
                },
            )?
            .with_metrics(Arc::clone(&metrics)),
        );
        reader.spawn(store, shutdown.clone());
        collector = collector.with_entra(Arc::clone(&reader));
        entra = Some(reader);
    }
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<IngestServiceServer<Collector>>()
        .await;
    health_reporter
        .set_serving::<QueryServiceServer<Collector>>()
        .await;
    health_reporter
        .set_serving::<AdminServiceServer<Collector>>()
        .await;
    health_reporter
        .set_serving::<EnrollmentServiceServer<Collector>>()
        .await;
    tokio::spawn(watch_store(
        watched,
        Arc::clone(&metrics),
        health_reporter.clone(),
        shutdown.clone(),
    ));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(census_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| RunError::Store(StoreError::Engine(format!("reflection: {e}"))))?;

    let max = config.max_message_bytes;
    let ingest = IngestServiceServer::new(collector.clone())
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let query = tonic::service::interceptor::InterceptedService::new(
        QueryServiceServer::new(collector.clone()).max_encoding_message_size(64 * 1024 * 1024),
        operator_check(Arc::clone(&security)),
    );
    let admin = tonic::service::interceptor::InterceptedService::new(
        AdminServiceServer::new(collector.clone()),
        operator_check(Arc::clone(&security)),
    );
    let enrollment =
        EnrollmentServiceServer::new(collector.clone()).max_decoding_message_size(64 * 1024);

    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "collector listening");
    }
    // Mutual TLS (unless in development mode): a client certificate is optional at the
    // handshake (enrollment is made without one), and every service but enrollment refuses
    // calls without one. The handshakes are ours ([`handshake`]), so failed ones are logged.
    let tls = if config.dev_plaintext {
        warn!(
            "DEVELOPMENT MODE: serving plaintext gRPC and taking callers' certificates on their word; never use this across a network"
        );
        None
    } else {
        Some(tokio_rustls::TlsAcceptor::from(
            prepared.pki.server_tls_config()?,
        ))
    };
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        // One connection (one agent, or a leaked token) cannot hold unbounded streams.
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .concurrency_limit_per_connection(MAX_STREAMS_PER_CONNECTION as usize)
        .layer(GrpcMetricsLayer::new(Arc::clone(&metrics)))
        .add_service(health)
        .add_service(reflection)
        .add_service(ingest)
        .add_service(query)
        .add_service(admin)
        .add_service(enrollment);
    let stopped = shutdown.clone().cancelled_owned();
    let server: std::pin::Pin<
        Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>,
    > = match tls {
        None => {
            Box::pin(router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopped))
        }
        Some(acceptor) => Box::pin(router.serve_with_incoming_shutdown(
            handshake::incoming(
                listener,
                acceptor,
                TLS_HANDSHAKE_TIMEOUT,
                Arc::clone(&metrics),
                shutdown.clone(),
            ),
            stopped,
        )),
    };
    tokio::pin!(server);
    tokio::select! {
        res = &mut server => res?,
        () = async { shutdown.cancelled().await; tokio::time::sleep(DRAIN_DEADLINE).await } => {
            warn!(deadline = ?DRAIN_DEADLINE, "in-flight calls did not finish before the drain deadline; stopping anyway");
        }
    }
    // Entra ID reads end at the shutdown token; their tasks are owned by the reader.
    if let Some(reader) = &entra
        && tokio::time::timeout(DRAIN_DEADLINE, reader.drain())
            .await
            .is_err()
    {
        warn!(deadline = ?DRAIN_DEADLINE, "Entra ID reads did not end before the drain deadline; stopping anyway");
    }
    health_reporter
        .set_not_serving::<IngestServiceServer<Collector>>()
        .await;
    info!("collector stopped");
    Ok(())
}

/// Until shutdown: reports whether the store takes writes. While it cannot (a full or failing
/// disk), `census.v1.IngestService` is NOT_SERVING in gRPC health and
/// `census_collector_store_writable` is 0: a load balancer in front of agents can send them
/// elsewhere, and they retry anyway (their batches are refused UNAVAILABLE). The server as a
/// whole (the empty service name) stays SERVING: queries still answer, from what is stored.
async fn watch_store(
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    health: tonic_health::server::HealthReporter,
    shutdown: CancellationToken,
) {
    let mut writable = true;
    let mut tick = tokio::time::interval(STORE_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Off the async threads: the store may be busy reopening.
        let store = Arc::clone(&store);
        let Ok(failure) = tokio::task::spawn_blocking(move || store.write_failure()).await else {
            continue;
        };
        if failure.is_none() == writable {
            continue;
        }
        writable = failure.is_none();
        metrics.store_writable.set(i64::from(writable));
        match failure {
            Some(reason) => {
                warn!(%reason, "the store cannot write: ingest reported NOT_SERVING until it can");
                health
                    .set_not_serving::<IngestServiceServer<Collector>>()
                    .await;
            }
            None => {
                info!("the store takes writes again: ingest SERVING");
                health.set_serving::<IngestServiceServer<Collector>>().await;
            }
        }
    }
}
