//! Delivery: the queue's batches to the collector, oldest first, in windows on one ingest
//! stream, each removed from the queue once acknowledged; failures back off exponentially with
//! jitter.
//!
//! `run` starts [`deliver`] as a task of its own in [`Mode::Forever`]: it waits for batches,
//! delivers until the queue is empty, and, while the collector cannot be reached, retries on
//! the back-off schedule ([`Backoff`]: 1 s, doubling up to `queue.retry_max`, each wait drawn
//! between half and all of that), whatever the sweeps are doing meanwhile; their batches
//! queue up. `run --once` delivers in [`Mode::Once`]: until the queue (its sweep and whatever
//! earlier runs left) is empty, giving up after a few attempts.
//!
//! A window holds at most [`WINDOW_BATCHES`] batches of one agent id (see `queue.rs` for why),
//! so a backlog of hours is sent in bounded memory, and an acknowledgement frees its batch
//! while the rest of the backlog is still on disk.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use census_proto::transport::{Authenticate, Credentials};
use rand::Rng as _;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{error, info, warn};

use crate::{
    enroll,
    metrics::Metrics,
    queue::Queue,
    report::{self, DeliveryError},
    run::AgentError,
};

/// The first wait after a failed attempt; each failure doubles it, up to `queue.retry_max`.
pub const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// Batches per ingest stream window (500 observations each at most).
pub const WINDOW_BATCHES: usize = 32;
/// Encoded bytes per window (past its first batch).
pub const WINDOW_BYTES: u64 = 8 * 1024 * 1024;
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const ACK_TIMEOUT: Duration = Duration::from_secs(30);

// === impl Backoff ===

/// Exponential back-off with jitter. I/O-free: the jitter is a parameter of
/// [`Backoff::next_with`], so the schedule is tested without waiting.
#[derive(Debug, Clone)]
pub struct Backoff {
    ceiling: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// Starting at [`INITIAL_BACKOFF`] (or `max`, if that is less), up to `max`.
    pub fn new(max: Duration) -> Backoff {
        Backoff {
            ceiling: INITIAL_BACKOFF.min(max),
            max,
            failures: 0,
        }
    }

    /// The wait after one more failure, with `jitter` in [0, 1]: between half the current
    /// ceiling (jitter 0) and all of it (jitter 1), so agents that lost the collector together
    /// do not come back together, and (until the cap) every wait is at least as long as the one
    /// before. The ceiling then doubles, up to the maximum.
    pub fn next_with(&mut self, jitter: f64) -> Duration {
        let wait = self.ceiling.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0));
        self.ceiling = self.ceiling.saturating_mul(2).min(self.max);
        self.failures = self.failures.saturating_add(1);
        wait
    }

    /// [`Backoff::next_with`] a random jitter.
    pub fn next_wait(&mut self) -> Duration {
        self.next_with(rand::rng().random_range(0.0..=1.0))
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// A success: the next failure waits [`INITIAL_BACKOFF`] again.
    pub fn reset(&mut self) {
        self.ceiling = INITIAL_BACKOFF.min(self.max);
        self.failures = 0;
    }
}

// === impl Deliverer ===

/// Whether the delivery task is waiting out a back-off, for `run`'s loop: a sweep counts as
/// done once its batches are delivered or the collector is known to be away.
#[derive(Debug, Clone, Default)]
pub struct Status {
    backing_off: Arc<AtomicBool>,
}

impl Status {
    pub fn backing_off(&self) -> bool {
        self.backing_off.load(Ordering::Relaxed)
    }
}

/// What delivery needs: where, with which certificate, from which queue.
#[derive(Debug)]
pub struct Deliverer {
    pub url: String,
    /// The agent's certificate, key and the collector's CA.
    pub creds: Credentials,
    /// Where `creds` came from: after the collector refuses them, delivery reads them again
    /// from there before its next attempt, so an agent enrolled again (`census-agent enroll
    /// --force`) while the daemon runs delivers with the new certificate.
    pub identity_dir: Option<PathBuf>,
    auth: Authenticate,
    pub queue: Arc<Queue>,
    /// A connection already made (`run` connects once at start), or `None`.
    pub channel: Option<Channel>,
    pub metrics: &'static Metrics,
    pub status: Status,
    /// Batches acknowledged so far (to tell a conflict right after a rotation).
    acknowledged: u64,
    /// Whether the queue carries the id `creds` names (see [`Deliverer::adopt_identity`]).
    adopted: bool,
}

impl Deliverer {
    pub fn new(
        url: String,
        creds: Credentials,
        identity_dir: Option<PathBuf>,
        queue: Arc<Queue>,
        channel: Option<Channel>,
        metrics: &'static Metrics,
    ) -> Deliverer {
        Deliverer {
            auth: Authenticate::new(&url, Some(&creds)),
            url,
            creds,
            identity_dir,
            queue,
            channel,
            metrics,
            status: Status::default(),
            acknowledged: 0,
            adopted: false,
        }
    }

    /// Has the queue carry the agent id the certificate names (the collector refuses batches
    /// naming another agent): queued batches under another id are renumbered under it.
    fn adopt_identity(&mut self) -> Result<(), AgentError> {
        if self.adopted {
            return Ok(());
        }
        match enroll::certificate_agent_id(&self.creds) {
            Some(id) => {
                let renumbered = self.queue.adopt(&id).map_err(AgentError::Queue)?;
                if renumbered > 0 {
                    info!(agent_id = %id, batches = renumbered, "queued batches under another agent id renumbered under the one this agent's certificate names");
                }
            }
            // The collector says what is wrong with such a certificate when it is presented.
            None => warn!("the agent's certificate names no agent id (no common name)"),
        }
        self.adopted = true;
        Ok(())
    }

    /// One attempt: sends windows until the queue is empty, `stop` is cancelled, or a window
    /// fails. What was acknowledged leaves the queue either way.
    pub async fn drain(&mut self, stop: &CancellationToken) -> Result<(), AgentError> {
        self.adopt_identity()?;
        loop {
            if stop.is_cancelled() {
                return Ok(());
            }
            let window = self
                .queue
                .peek(WINDOW_BATCHES, WINDOW_BYTES)
                .map_err(AgentError::Queue)?;
            if window.is_empty() {
                return Ok(());
            }
            let channel = match self.channel.take() {
                Some(c) => c,
                None => report::connect(&self.url, &self.creds, CONNECT_TIMEOUT).await?,
            };
            let keys: BTreeMap<u64, u64> =
                window.iter().map(|q| (q.batch.sequence, q.key)).collect();
            let users: BTreeMap<u64, usize> = window
                .iter()
                .map(|q| (q.batch.sequence, q.batch.users.len()))
                .collect();
            let batches: Vec<_> = window.into_iter().map(|q| q.batch).collect();
            if let (Some(first), Some(last)) = (batches.first(), batches.last()) {
                info!(
                    batches = batches.len(),
                    agent_id = %first.agent_id,
                    epoch = first.epoch,
                    first = first.sequence,
                    last = last.sequence,
                    "sending queued batches"
                );
            }
            self.metrics.sent(batches.len() as u64);
            let backlog = self.queue.len() as u64;
            let (acked, delivered, result) = report::deliver(
                channel.clone(),
                &self.url,
                &self.auth,
                &batches,
                backlog,
                ACK_TIMEOUT,
            )
            .await;
            // The collector takes a stream's batches one after the other and stops at the first
            // it refuses: the first one not acknowledged.
            let refused = batches
                .iter()
                .find(|b| !acked.contains(&b.sequence))
                .map(|b| Refused {
                    key: keys.get(&b.sequence).copied(),
                    agent_id: b.agent_id.clone(),
                    sequence: b.sequence,
                    observations: b.observations.len() as u64,
                    users: b.users.len() as u64,
                });
            drop(batches);
            if !acked.is_empty() {
                let done: Vec<u64> = acked.iter().filter_map(|s| keys.get(s).copied()).collect();
                self.acknowledged += acked.len() as u64;
                self.metrics
                    .acknowledged(acked.len() as u64, delivered.duplicates);
                // Logged before the batches leave the queue: whoever sees the queue empty has
                // the line already (a crash in between only resends them, as duplicates).
                info!(
                    batches = acked.len(),
                    stored = delivered.stored,
                    duplicates = delivered.duplicates,
                    observations = delivered.observations,
                    rejected = delivered.rejected_observations,
                    users = acked.iter().filter_map(|s| users.get(s)).sum::<usize>(),
                    queued = self.queue.len().saturating_sub(done.len()),
                    "delivered"
                );
                self.queue.remove(&done).map_err(AgentError::Queue)?;
            }
            if let (Err(DeliveryError::Rejected(reason)), Some(refused)) = (&result, refused) {
                self.set_aside(&refused, reason)?;
            }
            result?;
            self.channel = Some(channel);
        }
    }
}

impl Deliverer {
    /// After the collector refused the certificate: the next attempt connects anew, with the
    /// identity read again from disk (the operator may have enrolled the agent again). Keeps
    /// the old one when the files cannot be read.
    fn reload_identity(&mut self) {
        self.channel = None;
        let Some(dir) = &self.identity_dir else {
            return;
        };
        match Credentials::load(dir) {
            Ok(creds) => {
                if creds.cert_pem != self.creds.cert_pem {
                    info!(identity = %dir.display(), "a new certificate is in place: delivering with it");
                }
                self.auth = Authenticate::new(&self.url, Some(&creds));
                self.creds = creds;
                self.adopted = false;
            }
            Err(e) => {
                warn!(error = %e, "cannot read the agent's identity again; keeping the one loaded")
            }
        }
    }
}

/// A batch the collector refused as invalid.
#[derive(Debug)]
struct Refused {
    key: Option<u64>,
    agent_id: String,
    sequence: u64,
    observations: u64,
    users: u64,
}

impl Deliverer {
    /// Takes a batch the collector refused out of the queue: it would be refused again on every
    /// attempt, and hold up every batch behind it for ever (also across restarts). Never
    /// silently: an error line and the `batches_rejected` counter.
    fn set_aside(&self, refused: &Refused, reason: &str) -> Result<(), AgentError> {
        let Some(key) = refused.key else {
            return Ok(());
        };
        self.queue.remove(&[key]).map_err(AgentError::Queue)?;
        self.metrics.rejected(1, refused.observations);
        error!(
            agent_id = %refused.agent_id,
            sequence = refused.sequence,
            observations = refused.observations,
            users = refused.users,
            %reason,
            "the collector refused a batch as invalid: removed from the queue, never to be delivered"
        );
        Ok(())
    }
}

/// How long [`deliver`] keeps going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `run --once`: until the queue is empty; up to `attempts` attempts.
    Once { attempts: u32 },
    /// `run`: until `shutdown`; waits for batches when the queue is empty.
    Forever,
}

/// Waits out a back-off of `wait` (or until `shutdown`), marked as backing off meanwhile.
async fn back_off(d: &Deliverer, wait: Duration, shutdown: &CancellationToken) {
    d.status.backing_off.store(true, Ordering::Relaxed);
    d.queue.poke();
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = tokio::time::sleep(wait) => {}
    }
    d.status.backing_off.store(false, Ordering::Relaxed);
}

/// Delivers what is queued, as `mode` says. Retryable failures (the collector unreachable, a
/// stream cut) back off; a conflict (our sequence numbers already used with other content)
/// continues in a new sequence epoch at once; a batch the collector refuses as invalid is taken out
/// of the queue (see [`Deliverer::set_aside`]) and delivery goes on after a back-off, except
/// with `--once`, which then ends with that error; a refused certificate ends `--once` with
/// that error, and in the daemon is an error line and a back-off before trying again with the
/// identity read anew from disk. Returns `Ok` when `shutdown` is cancelled.
pub async fn deliver(
    d: &mut Deliverer,
    mode: Mode,
    retry_max: Duration,
    shutdown: &CancellationToken,
) -> Result<(), AgentError> {
    let mut backoff = Backoff::new(retry_max);
    let mut attempt = 0u32;
    // The acknowledgement count at the last rotation: a conflict again with no ack since means
    // rotating does not help.
    let mut rotated_at: Option<u64> = None;
    loop {
        if mode == Mode::Forever {
            loop {
                let changed = d.queue.changed();
                if !d.queue.is_empty() || shutdown.is_cancelled() {
                    break;
                }
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = changed => {}
                }
            }
        }
        if shutdown.is_cancelled() {
            return Ok(());
        }
        attempt += 1;
        let error = match d.drain(shutdown).await {
            Ok(()) => {
                if backoff.failures() > 0 {
                    info!(
                        failed_attempts = backoff.failures(),
                        "collector reachable again: backlog delivered"
                    );
                }
                backoff.reset();
                attempt = 0;
                if matches!(mode, Mode::Once { .. }) || shutdown.is_cancelled() {
                    return Ok(());
                }
                continue;
            }
            Err(AgentError::Delivery(e)) => e,
            Err(e) => return Err(e),
        };
        let last = matches!(mode, Mode::Once { attempts } if attempt >= attempts);
        match error {
            DeliveryError::Conflict(reason) if !last && rotated_at != Some(d.acknowledged) => {
                // Our state was restored or copied: the collector already holds other batches
                // under our sequence numbers. Continue in a new sequence epoch (the same agent
                // id, the one the certificate names), resending everything queued.
                let (old, new) = d.queue.rotate().map_err(AgentError::Queue)?;
                rotated_at = Some(d.acknowledged);
                warn!(agent_id = %d.queue.agent_id(), old_epoch = old, new_epoch = new, %reason, queued = d.queue.len(), "sequence numbers already used (the agent's state was restored or copied): continuing in a new sequence epoch");
            }
            // A refused certificate (revoked, expired, unknown to this collector): loud, and in
            // the daemon retried on the back-off schedule, reading the identity again each
            // time, so re-enrolling the agent brings it back without a restart. `--once` ends.
            DeliveryError::Refused(reason) if mode == Mode::Forever => {
                d.metrics.delivery_failed();
                let wait = backoff.next_wait();
                error!(
                    %reason,
                    attempt = backoff.failures(),
                    retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                    queued = d.queue.len(),
                    "the collector refused this agent's certificate (revoked or expired?): \
                     nothing is delivered until the agent is enrolled again (census-agent \
                     enroll --force --token-file FILE); retrying after a back-off"
                );
                back_off(d, wait, shutdown).await;
                d.reload_identity();
            }
            // A refused batch is set aside already; the rest waits a back-off all the same, so
            // a collector that refuses everything does not empty the queue in a moment.
            e if (e.is_retryable()
                || (mode == Mode::Forever && matches!(e, DeliveryError::Rejected(_))))
                && !last =>
            {
                d.metrics.delivery_failed();
                let wait = backoff.next_wait();
                warn!(
                    error = %e,
                    attempt = backoff.failures(),
                    retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                    queued = d.queue.len(),
                    "delivery failed; retrying after a back-off"
                );
                back_off(d, wait, shutdown).await;
            }
            e => {
                d.metrics.delivery_failed();
                return Err(e.into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap_and_resets() {
        let max = Duration::from_secs(300);
        let mut b = Backoff::new(max);
        let top: Vec<u64> = (0..12).map(|_| b.next_with(1.0).as_secs()).collect();
        assert_eq!(top, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(b.failures(), 12);
        b.reset();
        assert_eq!(b.failures(), 0);
        let bottom: Vec<u64> = (0..4)
            .map(|_| b.next_with(0.0).as_millis() as u64)
            .collect();
        assert_eq!(bottom, [500, 1000, 2000, 4000]);
        // Whatever the jitter, before the cap a wait is never shorter than the one before it.
        let mut b = Backoff::new(max);
        for _ in 0..8 {
            let longest = b.clone().next_with(1.0);
            b.next_with(0.5);
            let shortest_next = b.clone().next_with(0.0);
            assert!(
                shortest_next >= longest,
                "{shortest_next:?} after {longest:?}"
            );
        }
        let mut random = Backoff::new(Duration::from_secs(4));
        for _ in 0..10 {
            let w = random.next_wait();
            assert!(w >= Duration::from_millis(500) && w <= Duration::from_secs(4));
        }
        // A cap under the first wait is the wait.
        assert_eq!(
            Backoff::new(Duration::from_millis(200)).next_with(1.0),
            Duration::from_millis(200)
        );
    }
}
