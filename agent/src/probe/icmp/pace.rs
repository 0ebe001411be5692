//! Send pacing for the ICMP sweep: a GCRA (virtual-scheduling token bucket) that keeps the
//! average rate exact while a small burst absorbs the timer's coarseness.
//!
//! Tokio's timer has millisecond resolution, so above ~1000 pps sleeping once per packet
//! would cap the rate at 1000 pps and below it every late wake-up would lose time for good.
//! Instead the sender sleeps until the next packet is due and then sends every packet the
//! schedule allows by then (at most `burst` at once). Debt older than the burst is forgiven,
//! so a sender that was held up (by the concurrency limit, say) never catches up in a flood.
//! The clock is a parameter: this does no I/O and reads no clock, so it tests deterministically.

use std::time::{Duration, Instant};

/// Bounds of the burst, in packets: at least 2 so a slow rate still absorbs a late wake-up.
const MIN_BURST: u64 = 2;
const MAX_BURST: u64 = 4096;

/// Paces events to `rate` per second with bursts of at most [`Pacer::burst`] events.
#[derive(Debug)]
pub(crate) struct Pacer {
    interval: Duration,
    /// How far ahead of `now` the schedule may run: `(burst - 1) * interval`.
    tolerance: Duration,
    burst: u64,
    /// Theoretical arrival time of the next event; `None` before the first one.
    tat: Option<Instant>,
}

impl Pacer {
    /// A pacer for `rate_per_sec` (clamped to at least 1) with a burst of 5 ms worth of
    /// events, between 2 and 4096.
    pub(crate) fn new(rate_per_sec: u32) -> Self {
        let rate = u64::from(rate_per_sec.max(1));
        // Whole nanoseconds: at 1 Mpps the truncation is below 0.1 %.
        let interval = Duration::from_nanos((1_000_000_000 / rate).max(1));
        // 5 ms of the schedule may go at once: several ticks of tokio's 1 ms timer.
        let burst = (rate / 200).clamp(MIN_BURST, MAX_BURST);
        // `burst` is at most 4096, so the conversion cannot fail.
        let tolerance = interval.saturating_mul(u32::try_from(burst - 1).unwrap_or(u32::MAX));
        Pacer {
            interval,
            tolerance,
            burst,
            tat: None,
        }
    }

    /// The largest number of events sent back to back.
    pub(crate) fn burst(&self) -> u64 {
        self.burst
    }

    /// Takes one slot if the schedule allows an event at `now`; otherwise says how long to
    /// wait until it does.
    pub(crate) fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        // A schedule that fell behind `now` restarts at `now`: old debt is forgiven.
        let tat = self.tat.map_or(now, |t| t.max(now));
        let ahead = tat.saturating_duration_since(now);
        if ahead <= self.tolerance {
            self.tat = Some(tat + self.interval);
            Ok(())
        } else {
            Err(ahead - self.tolerance)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives the pacer with a synthetic clock that, every time it is told to wait, wakes
    /// at the next multiple of `tick` after the wait (a coarse timer), plus `late`.
    fn events_in(rate: u32, span: Duration, tick: Duration, late: Duration) -> u64 {
        let t0 = Instant::now();
        let mut now = t0;
        let mut p = Pacer::new(rate);
        let mut n = 0;
        while now < t0 + span {
            match p.try_take(now) {
                Ok(()) => n += 1,
                Err(wait) => {
                    let target = (now - t0) + wait;
                    let ticks = target.as_nanos().div_ceil(tick.as_nanos().max(1));
                    let woke = Duration::from_nanos(
                        u64::try_from(ticks * tick.as_nanos()).expect("small"),
                    );
                    now = t0 + woke.max(target) + late;
                }
            }
        }
        n
    }

    #[test]
    fn average_rate_is_exact_with_a_millisecond_timer() {
        let ms = Duration::from_millis(1);
        for (rate, late_us) in [
            (1, 0),
            (50, 300),
            (1000, 0),
            (1000, 250),
            (2000, 100),
            (20_000, 80),
            (100_000, 50),
        ] {
            let span = Duration::from_secs(2);
            let n = events_in(rate, span, ms, Duration::from_micros(late_us));
            let expected = 2 * u64::from(rate);
            let burst = Pacer::new(rate).burst();
            // Never more than the rate allows (plus the initial burst).
            assert!(
                n <= expected + burst,
                "rate {rate}: {n} events > {expected}"
            );
            // And not noticeably fewer, although the timer is coarse and late.
            assert!(
                n * 1000 >= expected * 995,
                "rate {rate} late {late_us}us: only {n} of {expected}"
            );
        }
    }

    #[test]
    fn a_per_packet_sleep_would_not_reach_high_rates_but_the_pacer_does() {
        // 50 000 pps is 20 us apart, far below a 1 ms timer: bursts make up the difference.
        let n = events_in(
            50_000,
            Duration::from_secs(1),
            Duration::from_millis(1),
            Duration::ZERO,
        );
        assert!(n >= 49_700, "{n}");
    }

    #[test]
    fn bursts_are_bounded() {
        let t0 = Instant::now();
        for rate in [1, 100, 1000, 10_000, 1_000_000, u32::MAX] {
            let mut p = Pacer::new(rate);
            let burst = p.burst();
            assert!((MIN_BURST..=MAX_BURST).contains(&burst), "rate {rate}");
            let mut n = 0;
            while p.try_take(t0).is_ok() {
                n += 1;
                assert!(n <= MAX_BURST, "rate {rate}: unbounded burst");
            }
            assert_eq!(n, burst, "rate {rate}");
        }
        assert_eq!(Pacer::new(1000).burst(), 5);
        assert_eq!(Pacer::new(0).burst(), MIN_BURST);
    }

    #[test]
    fn old_debt_is_forgiven() {
        let t0 = Instant::now();
        let mut p = Pacer::new(1000);
        assert!(p.try_take(t0).is_ok());
        // A sender that stalled for a second may send one burst, not a second's worth.
        let later = t0 + Duration::from_secs(1);
        let mut n = 0;
        while p.try_take(later).is_ok() {
            n += 1;
        }
        assert_eq!(n, p.burst());
    }

    #[test]
    fn the_wait_is_until_the_next_slot() {
        let t0 = Instant::now();
        let mut p = Pacer::new(10); // 100 ms apart, burst 2
        assert!(p.try_take(t0).is_ok());
        assert!(p.try_take(t0).is_ok());
        assert_eq!(p.try_take(t0), Err(Duration::from_millis(100)));
        assert_eq!(
            p.try_take(t0 + Duration::from_millis(40)),
            Err(Duration::from_millis(60))
        );
        assert!(p.try_take(t0 + Duration::from_millis(100)).is_ok());
    }
}
