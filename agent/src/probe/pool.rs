//! A paced, bounded pool of blocking probes: how the Windows backends sweep, where the OS
//! offers only a blocking call per address (`ResolveIpNetEntry2` for ARP) instead of a raw
//! socket the agent paces itself. Platform-free, so its scheduling is tested on Linux with a
//! fake probe.
//!
//! - **Rate**: calls start no faster than `rate_pps` (an absolute schedule, so sleeps rounded
//!   up to the timer's millisecond do not lower the average).
//! - **Concurrency**: at most `concurrency` calls run at once, on tokio's blocking threads.
//!   The slot is released by the call itself when it returns, not when the sweep stops
//!   waiting for it: a call that overran its timeout still holds its thread, and so its
//!   slot, so the number of threads is bounded whatever the OS does.
//! - **Timeout**: a call whose answer has not come within `timeout` counts as silent.
//! - **Retries**: silent targets are asked again, up to `retries` more rounds.
//! - **Cancellation**: ends promptly with what has been found (`cancelled` set); calls still
//!   running finish on their own threads and are ignored.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tokio::{sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// How a pool sweep runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Calls started per second.
    pub rate_pps: u32,
    /// Calls running at once.
    pub concurrency: usize,
    /// How long to wait for one call.
    pub timeout: Duration,
    /// Extra rounds for targets that stayed silent.
    pub retries: u32,
}

/// What one blocking call found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<R> {
    Found(R),
    /// No answer: asked again in the next round.
    Silent,
    /// The call failed for a reason that asking again will not change (not retried).
    Failed(String),
}

/// What a pool sweep found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolResult<R> {
    /// Unique targets asked at least once.
    pub probed: usize,
    /// Calls started, retries included.
    pub calls: u64,
    /// One per answering target, in target order, with when its answer came.
    pub found: Vec<(usize, R, SystemTime)>,
    /// Calls that failed (not silent), with the first reason.
    pub failures: u64,
    pub first_failure: Option<String>,
    /// Calls still running when the sweep stopped waiting for them.
    pub timed_out: u64,
    pub cancelled: bool,
}

/// Runs `probe` for every target (retrying silent ones) under `cfg`. Bounded: at most
/// `targets x (retries + 1)` calls, each waited for at most `timeout`.
pub async fn sweep<T, R, F>(
    targets: Vec<T>,
    cfg: &PoolConfig,
    probe: Arc<F>,
    cancel: &CancellationToken,
) -> PoolResult<R>
where
    T: Send + Sync + 'static,
    R: Send + 'static,
    F: Fn(&T) -> Outcome<R> + Send + Sync + 'static,
{
    let started = Instant::now();
    let period = Duration::from_secs(1) / cfg.rate_pps.max(1);
    let slots = Arc::new(Semaphore::new(cfg.concurrency.max(1)));
    let mut result = PoolResult {
        probed: 0,
        calls: 0,
        found: Vec::new(),
        failures: 0,
        first_failure: None,
        timed_out: 0,
        cancelled: cancel.is_cancelled(),
    };
    let mut found: BTreeMap<usize, (R, SystemTime)> = BTreeMap::new();
    let mut silent: Vec<usize> = (0..targets.len()).collect();
    let targets = Arc::new(targets);
    let mut round = 0;
    'rounds: while !silent.is_empty() && round <= cfg.retries && !result.cancelled {
        let mut tasks: JoinSet<(usize, Option<Outcome<R>>)> = JoinSet::new();
        let mut still_silent = Vec::new();
        for &index in &silent {
            // The next start on the schedule.
            let due =
                started + period.saturating_mul(u32::try_from(result.calls).unwrap_or(u32::MAX));
            // A free slot, then the schedule, either interrupted by cancellation.
            let permit = tokio::select! {
                biased;
                () = cancel.cancelled() => {
                    result.cancelled = true;
                    None
                }
                p = Arc::clone(&slots).acquire_owned() => p.ok(),
            };
            let Some(permit) = permit else {
                drain(&mut tasks, &mut result, &mut found, &mut still_silent);
                break 'rounds;
            };
            tokio::select! {
                biased;
                () = cancel.cancelled() => {
                    result.cancelled = true;
                    drain(&mut tasks, &mut result, &mut found, &mut still_silent);
                    break 'rounds;
                }
                () = tokio::time::sleep_until(due.into()) => {}
            }
            let (probe, targets) = (Arc::clone(&probe), Arc::clone(&targets));
            let call = tokio::task::spawn_blocking(move || {
                let outcome = probe(&targets[index]);
                drop(permit);
                outcome
            });
            let timeout = cfg.timeout;
            tasks.spawn(async move {
                match tokio::time::timeout(timeout, call).await {
                    Ok(Ok(outcome)) => (index, Some(outcome)),
                    Ok(Err(e)) => (
                        index,
                        Some(Outcome::Failed(format!("the call panicked: {e}"))),
                    ),
                    Err(_) => (index, None),
                }
            });
            result.calls += 1;
            if round == 0 {
                result.probed += 1;
            }
            drain(&mut tasks, &mut result, &mut found, &mut still_silent);
        }
        // The next round asks only who is still silent: wait for this one to finish.
        loop {
            let joined = tokio::select! {
                biased;
                () = cancel.cancelled() => {
                    result.cancelled = true;
                    drain(&mut tasks, &mut result, &mut found, &mut still_silent);
                    break 'rounds;
                }
                j = tasks.join_next() => j,
            };
            match joined {
                Some(Ok(done)) => record(done, &mut result, &mut found, &mut still_silent),
                Some(Err(_)) => {}
                None => break,
            }
        }
        still_silent.sort_unstable();
        silent = still_silent;
        round += 1;
    }
    result.found = found.into_iter().map(|(i, (r, at))| (i, r, at)).collect();
    debug!(
        probed = result.probed,
        calls = result.calls,
        found = result.found.len(),
        failures = result.failures,
        timed_out = result.timed_out,
        cancelled = result.cancelled,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "pool sweep done"
    );
    result
}

/// Records every call that has finished, without waiting.
fn drain<R>(
    tasks: &mut JoinSet<(usize, Option<Outcome<R>>)>,
    result: &mut PoolResult<R>,
    found: &mut BTreeMap<usize, (R, SystemTime)>,
    still_silent: &mut Vec<usize>,
) where
    R: Send + 'static,
{
    while let Some(joined) = tasks.try_join_next() {
        if let Ok(done) = joined {
            record(done, result, found, still_silent);
        }
    }
}

fn record<R>(
    (index, outcome): (usize, Option<Outcome<R>>),
    result: &mut PoolResult<R>,
    found: &mut BTreeMap<usize, (R, SystemTime)>,
    still_silent: &mut Vec<usize>,
) {
    match outcome {
        Some(Outcome::Found(r)) => {
            found.entry(index).or_insert((r, SystemTime::now()));
        }
        Some(Outcome::Silent) => still_silent.push(index),
        Some(Outcome::Failed(why)) => {
            result.failures += 1;
            result.first_failure.get_or_insert(why);
        }
        None => {
            result.timed_out += 1;
            still_silent.push(index);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    fn cfg(rate_pps: u32, concurrency: usize, timeout_ms: u64, retries: u32) -> PoolConfig {
        PoolConfig {
            rate_pps,
            concurrency,
            timeout: Duration::from_millis(timeout_ms),
            retries,
        }
    }

    /// Counts calls in flight and the most at once.
    #[derive(Default)]
    struct Gauge {
        now: AtomicUsize,
        max: AtomicUsize,
    }

    impl Gauge {
        fn enter(&self) {
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.max.fetch_max(n, Ordering::SeqCst);
        }
        fn leave(&self) {
            self.now.fetch_sub(1, Ordering::SeqCst);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn finds_who_answers_in_target_order_within_the_concurrency() {
        let gauge = Arc::new(Gauge::default());
        let g = Arc::clone(&gauge);
        let probe = Arc::new(move |t: &u32| {
            g.enter();
            std::thread::sleep(Duration::from_millis(20));
            g.leave();
            if t.is_multiple_of(3) {
                Outcome::Found(t * 10)
            } else {
                Outcome::Silent
            }
        });
        let targets: Vec<u32> = (0..40).collect();
        let r = sweep(
            targets,
            &cfg(10_000, 4, 1000, 0),
            probe,
            &CancellationToken::new(),
        )
        .await;
        assert_eq!(r.probed, 40);
        assert_eq!(r.calls, 40);
        let found: Vec<(usize, u32)> = r.found.iter().map(|(i, v, _)| (*i, *v)).collect();
        let want: Vec<(usize, u32)> = (0..40)
            .filter(|t: &u32| t.is_multiple_of(3))
            .map(|t| (t as usize, t * 10))
            .collect();
        assert_eq!(found, want);
        let max = gauge.max.load(Ordering::SeqCst);
        assert!((2..=4).contains(&max), "at most 4 calls at once, saw {max}");
        assert!(!r.cancelled);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn silent_targets_are_asked_again_up_to_the_retries() {
        let asked = Arc::new(Mutex::new(BTreeMap::<u32, u32>::new()));
        let a = Arc::clone(&asked);
        let probe = Arc::new(move |t: &u32| {
            let mut asked = a.lock().expect("lock");
            let n = asked.entry(*t).or_default();
            *n += 1;
            // Target 1 answers the second time; target 2 never.
            match (*t, *n) {
                (0, _) | (1, 2) => Outcome::Found(()),
                (3, _) => Outcome::Failed("no such interface".into()),
                _ => Outcome::Silent,
            }
        });
        let r = sweep(
            vec![0, 1, 2, 3],
            &cfg(10_000, 8, 1000, 2),
            probe,
            &CancellationToken::new(),
        )
        .await;
        let asked = asked.lock().expect("lock").clone();
        assert_eq!(asked, BTreeMap::from([(0, 1), (1, 2), (2, 3), (3, 1)]));
        assert_eq!(r.found.iter().map(|f| f.0).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(r.calls, 7);
        assert_eq!(r.probed, 4);
        assert_eq!(r.failures, 1);
        assert_eq!(r.first_failure.as_deref(), Some("no such interface"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_start_no_faster_than_the_rate() {
        let probe = Arc::new(|_: &u32| Outcome::<()>::Silent);
        let started = Instant::now();
        // 21 calls at 100/s: the last starts 200 ms after the first.
        let r = sweep(
            (0..21).collect(),
            &cfg(100, 64, 1000, 0),
            probe,
            &CancellationToken::new(),
        )
        .await;
        let took = started.elapsed();
        assert_eq!(r.calls, 21);
        assert!(took >= Duration::from_millis(195), "took {took:?}");
        assert!(took < Duration::from_secs(2), "took {took:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_past_its_timeout_is_silent_and_keeps_its_slot() {
        let gauge = Arc::new(Gauge::default());
        let g = Arc::clone(&gauge);
        let probe = Arc::new(move |t: &u32| {
            g.enter();
            // Target 0 hangs far past the timeout; the others answer within it. Were its slot
            // freed when the sweep stops waiting (50 ms), two others would run beside it.
            std::thread::sleep(Duration::from_millis(if *t == 0 { 400 } else { 30 }));
            g.leave();
            Outcome::Found(())
        });
        let started = Instant::now();
        let r = sweep(
            (0..6).collect(),
            &cfg(10_000, 2, 50, 0),
            probe,
            &CancellationToken::new(),
        )
        .await;
        assert_eq!(r.timed_out, 1);
        assert_eq!(
            r.found.iter().map(|f| f.0).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(
            gauge.max.load(Ordering::SeqCst),
            2,
            "the hung call kept its slot"
        );
        assert!(
            started.elapsed() < Duration::from_millis(390),
            "not waited for"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancellation_ends_the_sweep_with_what_it_has() {
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        let calls = Arc::new(AtomicUsize::new(0));
        let n = Arc::clone(&calls);
        let probe = Arc::new(move |_: &u32| {
            if n.fetch_add(1, Ordering::SeqCst) == 5 {
                c.cancel();
            }
            Outcome::Found(())
        });
        // 1000 targets at 200/s would take 5 s.
        let started = Instant::now();
        let r = sweep((0..1000).collect(), &cfg(200, 4, 1000, 0), probe, &cancel).await;
        assert!(r.cancelled);
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(r.calls < 20, "{}", r.calls);
        assert!(!r.found.is_empty());
    }
}
