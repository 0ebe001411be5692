//! The agent's main loop: plan the sweep, sweep each interface on its own OS thread, turn the
//! answers into observation batches, and deliver them until acknowledged. `--once` does one
//! sweep and returns when every batch is acknowledged; otherwise it sweeps every interval
//! (with jitter) until the shutdown token is cancelled.

use std::{collections::BTreeMap, time::Duration};

use census_proto::v1;
use rand::Rng as _;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use crate::discovery::SweepSummary;
use crate::{
    config::{Config, ConfigError},
    discovery::{self, Progress},
    iface,
    report::{self, AgentState, DeliveryError},
    scope::{self, ScopeError, SweepPlan},
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
    #[error(
        "stopped before every batch was acknowledged ({pending} batches undelivered): run again to sweep and deliver anew"
    )]
    Interrupted { pending: usize },
}

/// How the agent runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Sweep once, deliver, and return.
    pub once: bool,
    /// Print progress lines on stderr (a person is watching a terminal).
    pub progress: bool,
}

/// Plans the sweep from the configuration and this host's interfaces and routes, and logs what
/// it is about to sweep.
pub fn plan(config: &Config) -> Result<SweepPlan, AgentError> {
    let interfaces = iface::list().map_err(|e| AgentError::Interfaces(e.to_string()))?;
    let routes = iface::routes();
    let mut scopes = config.scopes.clone();
    let from_interfaces = scope::interface_scopes(&config.scope_interfaces, &interfaces)?;
    config.check_scope_sizes(&from_interfaces)?;
    scopes.extend(from_interfaces);
    let plan = scope::plan(
        &scopes,
        &config.exclude,
        config.interface.as_deref(),
        &interfaces,
        &routes,
    )?;
    for p in &plan.on_link {
        info!(
            interface = %p.interface.name,
            scopes = %p.scopes.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            targets = p.targets.len(),
            rate_pps = config.arp.rate,
            method = if config.arp.enabled { "arp" } else { "none (arp disabled)" },
            "will sweep on-link"
        );
    }
    for r in &plan.routed {
        info!(
            scope = %r.scope,
            via = %r.route.gateway.map_or_else(|| r.route.interface.clone(), |g| format!("{g} on {}", r.route.interface)),
            targets = r.targets.len(),
            rate_pps = config.icmp.rate,
            method = if config.icmp.enabled { "icmp" } else { "none (icmp disabled)" },
            "will sweep routed"
        );
    }
    Ok(plan)
}

/// Sweeps once and returns the observations without delivering them (`census-agent scan`).
pub async fn scan(
    config: &Config,
    progress: bool,
    shutdown: &CancellationToken,
) -> Result<(Vec<v1::Observation>, SweepSummary), AgentError> {
    config.validate_sweep()?;
    let plan = plan(config)?;
    discovery::sweep(&plan, config, Progress { enabled: progress }, shutdown).await
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
    let plan = plan(&config)?;
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
        let (observations, summary) = discovery::sweep(
            &plan,
            &config,
            Progress {
                enabled: options.progress,
            },
            &shutdown,
        )
        .await?;
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
            &mut state,
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
    if options.once && (shutdown.is_cancelled() || !pending.is_empty()) {
        return Err(AgentError::Interrupted {
            pending: pending.len(),
        });
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
    state: &mut AgentState,
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
            Err(DeliveryError::Conflict(reason)) if attempt < attempts || attempts == 1 => {
                // Our state was restored or copied: the collector already holds other batches
                // under our sequence numbers. Continue as a new agent, resending everything.
                let old = state.agent_id.clone();
                let batches: Vec<v1::ObservationBatch> =
                    std::mem::take(pending).into_values().collect();
                let renumbered = state.rotate(batches).map_err(AgentError::State)?;
                warn!(old_agent_id = %old, new_agent_id = %state.agent_id, %reason, "sequence numbers already used: continuing under a new agent id");
                pending.extend(renumbered.into_iter().map(|b| (b.sequence, b)));
            }
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
