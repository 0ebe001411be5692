//! The agent's main loop: plan the sweep, sweep each interface on its own OS thread, turn the
//! answers into observation batches, and deliver them until acknowledged. `--once` does one
//! sweep and returns when every batch is acknowledged; otherwise it sweeps every interval
//! (with jitter) until the shutdown token is cancelled.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    time::{Duration, Instant, SystemTime},
};

use census_proto::v1;
use rand::Rng as _;
use tokio_util::sync::CancellationToken;
use tracing::{info, instrument, warn};

use crate::{
    config::{Config, ConfigError},
    iface,
    report::{self, AgentState, DeliveryError},
    scope::{self, InterfaceTargets, ScopeError},
};

/// How long `--once` waits for the collector to come back before giving up.
const ONCE_DELIVERY_ATTEMPTS: u32 = 5;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the agent stopped. Each kind maps to its own exit code in the binary.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Scope(#[from] ScopeError),
    #[error("cannot list network interfaces: {0}")]
    Interfaces(String),
    #[error("cannot use the state directory: {0}")]
    State(std::io::Error),
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    #[error("{0}")]
    Sweep(String),
    #[error("sweep needs raw socket access: {0}")]
    Permission(String),
}

/// What one sweep found, across interfaces.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepSummary {
    pub probed: usize,
    pub replies: usize,
    pub observations: usize,
    pub duration: Duration,
}

/// How the agent runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Sweep once, deliver, and return.
    pub once: bool,
}

/// Runs the agent until `shutdown` is cancelled (or, with `once`, until one sweep is
/// delivered).
pub async fn run(
    config: Config,
    options: RunOptions,
    shutdown: CancellationToken,
) -> Result<SweepSummary, AgentError> {
    config.validate()?;
    let token = config.token()?;
    let url = config.collector.clone().ok_or(ConfigError::NoCollector)?;
    let interfaces = iface::list().map_err(|e| AgentError::Interfaces(e.to_string()))?;
    let plan = scope::plan(
        &config.scopes,
        &config.exclude,
        config.interface.as_deref(),
        &interfaces,
    )?;
    for p in &plan {
        info!(
            interface = %p.interface.name,
            scopes = %p.scopes.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            targets = p.targets.len(),
            rate_pps = config.arp.rate,
            "will sweep with ARP"
        );
    }
    let mut state =
        AgentState::load_or_create(config.state_dir.as_deref()).map_err(AgentError::State)?;
    info!(agent_id = %state.agent_id, collector = %url, "agent starting");

    // With --once a collector that is not there is an error now, before any packet is sent.
    let mut channel = match report::connect(&url, CONNECT_TIMEOUT).await {
        Ok(c) => Some(c),
        Err(e) if options.once => return Err(e.into()),
        Err(e) => {
            warn!(error = %e, "collector unreachable; sweeping anyway and delivering when it is back");
            None
        }
    };

    // Batches swept but not yet acknowledged, by sequence.
    let mut pending: BTreeMap<u64, v1::ObservationBatch> = BTreeMap::new();
    let mut last = SweepSummary::default();
    loop {
        let (summary, observations) = sweep(&plan, &config, &shutdown).await?;
        if shutdown.is_cancelled() {
            break;
        }
        let first = state
            .reserve(report::batch_count(observations.len()))
            .map_err(AgentError::State)?;
        for b in report::into_batches(&state.agent_id, first, observations) {
            pending.insert(b.sequence, b);
        }
        last = summary;

        let attempts = if options.once {
            ONCE_DELIVERY_ATTEMPTS
        } else {
            1
        };
        flush(
            &url,
            &token,
            &mut channel,
            &mut pending,
            attempts,
            &shutdown,
        )
        .await?;
        if options.once {
            break;
        }
        let jitter = rand::rng().random_range(0.9..1.1);
        let wait = config.interval.mul_f64(jitter);
        info!(next_in = ?wait, pending = pending.len(), "sweep done");
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
        }
    }
    if !pending.is_empty() {
        warn!(
            batches = pending.len(),
            "stopping with undelivered batches (an on-disk queue arrives with the production issue)"
        );
    }
    Ok(last)
}

/// Delivers pending batches, retrying with backoff up to `attempts` times. Retryable failures
/// are kept for the next call unless this was the last attempt of a `--once` run.
async fn flush(
    url: &str,
    token: &str,
    channel: &mut Option<tonic::transport::Channel>,
    pending: &mut BTreeMap<u64, v1::ObservationBatch>,
    attempts: u32,
    shutdown: &CancellationToken,
) -> Result<(), AgentError> {
    let mut backoff = Duration::from_millis(500);
    for attempt in 1..=attempts {
        if pending.is_empty() {
            return Ok(());
        }
        let result = async {
            let ch = match channel.take() {
                Some(c) => c,
                None => report::connect(url, CONNECT_TIMEOUT).await?,
            };
            let batches: Vec<_> = pending.values().cloned().collect();
            let (acked, delivered, result) =
                report::deliver(ch.clone(), url, token, &batches, ACK_TIMEOUT).await;
            for seq in &acked {
                pending.remove(seq);
            }
            if !acked.is_empty() {
                info!(
                    batches = acked.len(),
                    stored = delivered.stored,
                    duplicates = delivered.duplicates,
                    observations = delivered.observations,
                    rejected = delivered.rejected_observations,
                    "delivered"
                );
            }
            if result.is_ok() {
                *channel = Some(ch);
            }
            result
        }
        .await;
        match result {
            Ok(()) => return Ok(()),
            Err(e) if e.is_retryable() && attempt < attempts => {
                warn!(error = %e, attempt, retry_in = ?backoff, "delivery failed; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            Err(e) if e.is_retryable() && attempts == 1 => {
                warn!(error = %e, pending = pending.len(), "delivery failed; will retry after the next sweep");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Sweeps every planned interface in parallel, one OS thread each (pnet's receive blocks).
#[instrument(skip_all)]
async fn sweep(
    plan: &[InterfaceTargets],
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<(SweepSummary, Vec<v1::Observation>), AgentError> {
    let started = Instant::now();
    let mut summary = SweepSummary::default();
    let mut observations = Vec::new();
    let results = sweep_arp(plan, config, shutdown).await?;
    for r in results {
        summary.probed += r.probed;
        summary.replies += r.replies.len();
        info!(interface = %r.interface, probed = r.probed, replies = r.replies.len(), requests = r.requests_sent, "ARP sweep");
        for (ip, mac, at) in r.replies {
            observations.push(report::arp_observation(ip, mac, &r.interface, at));
        }
    }
    summary.observations = observations.len();
    summary.duration = started.elapsed();
    info!(probed = summary.probed, replies = summary.replies, duration = ?summary.duration, "sweep finished");
    Ok((summary, observations))
}

/// What ARP found on one interface, independent of the platform's backend.
#[derive(Debug)]
struct ArpFound {
    interface: String,
    probed: usize,
    requests_sent: u64,
    replies: Vec<(Ipv4Addr, [u8; 6], SystemTime)>,
}

#[cfg(unix)]
async fn sweep_arp(
    plan: &[InterfaceTargets],
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<Vec<ArpFound>, AgentError> {
    use crate::probe::arp::{self, ArpConfig, ArpError};

    let arp_config = ArpConfig {
        rate_pps: config.arp.rate,
        retries: config.arp.retries,
        reply_window: Duration::from_millis(config.arp.reply_window_ms),
        ..ArpConfig::default()
    };
    let mut waiting = Vec::new();
    for p in plan {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (iface, targets, cfg, cancel) = (
            p.interface.clone(),
            p.targets.clone(),
            arp_config.clone(),
            shutdown.clone(),
        );
        std::thread::Builder::new()
            .name(format!("arp-{}", p.interface.name))
            .spawn(move || {
                let _ = tx.send(arp::sweep(&iface, &targets, &cfg, &cancel));
            })
            .map_err(|e| AgentError::Sweep(format!("cannot start the ARP thread: {e}")))?;
        waiting.push(rx);
    }
    let mut out = Vec::new();
    for rx in waiting {
        match rx.await {
            Ok(Ok(r)) => out.push(ArpFound {
                interface: r.interface,
                probed: r.probed,
                requests_sent: r.requests_sent,
                replies: r
                    .replies
                    .into_iter()
                    .map(|a| (a.ip, a.mac, a.first_seen))
                    .collect(),
            }),
            Ok(Err(e @ ArpError::PermissionDenied { .. })) => {
                return Err(AgentError::Permission(e.to_string()));
            }
            Ok(Err(e)) => return Err(AgentError::Sweep(e.to_string())),
            Err(_) => {
                return Err(AgentError::Sweep(
                    "the ARP thread ended without a result".into(),
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(not(unix))]
async fn sweep_arp(
    _plan: &[InterfaceTargets],
    _config: &Config,
    _shutdown: &CancellationToken,
) -> Result<Vec<ArpFound>, AgentError> {
    Err(AgentError::Sweep(
        "ARP sweeps on Windows need the IP Helper backend, which is not built yet".into(),
    ))
}
