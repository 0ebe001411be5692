//! Send pacing for the ARP sweep: a GCRA (virtual-scheduling token bucket) that keeps the
//! average rate exact while letting a small burst absorb the sender's sleep overshoot.
//!
//! `thread::sleep` overshoots by tens of microseconds, which at 2000 pps and above is a
//! large share of the gap between packets; sleeping once per packet would undershoot the
//! rate. Instead the sender sleeps until the next packet is due and then sends every packet
//! the schedule allows by then (at most `burst`). The clock is a parameter, so this is
//! deterministic to test.

use std::time::{Duration, Instant};

/// Paces events to `rate` per second with bursts of at most `burst` events.
#[derive(Debug)]
pub(crate) struct Pacer {
    interval: Duration,
    /// How far ahead of `now` the schedule may run: `(burst - 1) * interval`.
    tolerance: Duration,
    /// Theoretical arrival time of the next event; `None` before the first one.
    tat: Option<Instant>,
}

impl Pacer {
    /// A pacer for `rate_per_sec` (clamped to at least 1) with a burst of 5 ms worth of
    /// events, between 2 and 256 (2 so that even slow rates absorb a late wake-up).
    pub(crate) fn new(rate_per_sec: u32) -> Self {
        let rate = u64::from(rate_per_sec.max(1));
        let interval = Duration::from_nanos((1_000_000_000 / rate).max(1));
        let burst = (rate / 200).clamp(2, 256);
        let tolerance = interval.saturating_mul(u32::try_from(burst - 1).unwrap_or(255));
        Pacer {
            interval,
            tolerance,
            tat: None,
        }
    }

    /// Takes one slot if the schedule allows an event at `now`; otherwise says how long to
    /// wait until it does.
    pub(crate) fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
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

    /// Drives the pacer with a synthetic clock that wakes `step` late every time it is
    /// told to wait, and counts the events in `span`.
    fn events_in(rate: u32, span: Duration, oversleep: Duration) -> u64 {
        let t0 = Instant::now();
        let mut now = t0;
        let mut p = Pacer::new(rate);
        let mut n = 0;
        while now < t0 + span {
            match p.try_take(now) {
                Ok(()) => n += 1,
                Err(wait) => now += wait + oversleep,
            }
        }
        n
    }

    #[test]
    fn average_rate_is_exact_despite_oversleep() {
        for (rate, oversleep_us) in [(2000, 60), (20_000, 60), (100_000, 80), (50, 1000)] {
            let n = events_in(
                rate,
                Duration::from_secs(2),
                Duration::from_micros(oversleep_us),
            );
            let expected = 2 * u64::from(rate);
            let burst = u64::from(rate / 200).clamp(2, 256);
            assert!(
                n >= expected - expected / 100 && n <= expected + burst,
                "rate {rate}: {n} events in 2s"
            );
        }
    }

    #[test]
    fn bursts_are_bounded_after_idle() {
        let mut p = Pacer::new(2000); // burst 10
        let t = Instant::now();
        let mut n = 0;
        while p.try_take(t).is_ok() {
            n += 1;
        }
        assert_eq!(n, 10);
        // After a long idle gap, the burst is again 10, not the whole backlog.
        let later = t + Duration::from_secs(5);
        let mut m = 0;
        while p.try_take(later).is_ok() {
            m += 1;
        }
        assert_eq!(m, 10);
        assert_eq!(p.try_take(later), Err(Duration::from_micros(500)));
    }
}
