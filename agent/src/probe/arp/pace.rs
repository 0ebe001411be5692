//! Send pacing and adaptive timing for the ARP sweep (no I/O; the clock is a parameter or the
//! caller's, so both are deterministic to test).
//!
//! - [`Pacer`]: a GCRA (virtual-scheduling token bucket) that keeps the average rate exact while
//!   letting a small burst absorb the sender's sleep overshoot. `thread::sleep` overshoots by
//!   tens of microseconds, which at 1000 pps and above is a large share of the gap between
//!   packets; sleeping once per packet would undershoot the rate. Instead the sender sleeps
//!   until the next packet is due and then sends every packet the schedule allows by then (at
//!   most `burst`).
//! - [`Latency`] and [`adaptive_wait`]: how long to wait for an answer, from the reply latency
//!   measured so far in the sweep, nmap-style, between a floor and the configured maximum.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The shortest adaptive wait, however fast the replies. Wired hosts answer ARP within a few
/// milliseconds (under 1 ms in the lab); this leaves room for a host that is busy for a moment,
/// and is half of nmap's floor (`--min-rtt-timeout` 100 ms), because a silent address is asked
/// twice and so has two of these waits, plus the send time between them, to answer. Slower
/// hosts (a Wi-Fi client in power save answers after the next beacon, 100 to 300 ms) lift the
/// waits as soon as one of them has been timed; the case this floor can lose is a sweep whose
/// only slow host is among its last addresses, which the next sweep then finds.
pub(crate) const MIN_WAIT: Duration = Duration::from_millis(50);
/// Adaptive waits are this many times the highest reply latency seen (nmap's timeout is the
/// smoothed RTT plus 4 deviations; the highest latency seen is already a pessimistic figure).
pub(crate) const RTT_MULTIPLIER: u32 = 4;

/// How long to wait for answers: `RTT_MULTIPLIER` x the highest reply latency seen, between
/// [`MIN_WAIT`] (or `cap`, if that is smaller) and `cap`; `cap` itself until a reply has been
/// timed, so a network whose hosts we know nothing about yet gets the configured maximum.
pub(crate) fn adaptive_wait(highest: Option<Duration>, cap: Duration) -> Duration {
    match highest {
        None => cap,
        Some(rtt) => rtt
            .saturating_mul(RTT_MULTIPLIER)
            .clamp(MIN_WAIT.min(cap), cap),
    }
}

/// The highest reply latency seen in one sweep, shared lock-free by the receiving thread
/// (which measures) and the sender (which waits).
#[derive(Debug, Default)]
pub(crate) struct Latency {
    /// Highest latency in ns, plus one; 0 while nothing has been measured.
    highest_ns_plus_one: AtomicU64,
}

impl Latency {
    /// Records one reply's latency.
    pub(crate) fn observe(&self, rtt: Duration) {
        let ns = u64::try_from(rtt.as_nanos())
            .unwrap_or(u64::MAX - 1)
            .min(u64::MAX - 1);
        self.highest_ns_plus_one
            .fetch_max(ns + 1, Ordering::Relaxed);
    }

    /// The highest latency recorded, if any.
    pub(crate) fn highest(&self) -> Option<Duration> {
        match self.highest_ns_plus_one.load(Ordering::Relaxed) {
            0 => None,
            n => Some(Duration::from_nanos(n - 1)),
        }
    }

    /// [`adaptive_wait`] for what has been seen so far.
    pub(crate) fn wait(&self, cap: Duration) -> Duration {
        adaptive_wait(self.highest(), cap)
    }
}

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
    /// events, between 8 and 256. At least 8 so that at the default rate and below, a
    /// wake-up that is several ms late is made up rather than lost: the sender shares its CPU,
    /// and on a loaded machine (the benchmark's lab, where the kernel copies every broadcast
    /// to hundreds of namespaces) a burst of 2 let 500 pps fall to about 450.
    pub(crate) fn new(rate_per_sec: u32) -> Self {
        let rate = u64::from(rate_per_sec.max(1));
        let interval = Duration::from_nanos((1_000_000_000 / rate).max(1));
        let burst = (rate / 200).clamp(8, 256);
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
        for (rate, oversleep_us) in [
            (2000, 60),
            (20_000, 60),
            (100_000, 80),
            (50, 1000),
            // A sender that shares its CPU: late by milliseconds at every wake-up.
            (500, 5000),
            (1200, 4000),
        ] {
            let n = events_in(
                rate,
                Duration::from_secs(2),
                Duration::from_micros(oversleep_us),
            );
            let expected = 2 * u64::from(rate);
            let burst = u64::from(rate / 200).clamp(8, 256);
            assert!(
                n >= expected - expected / 100 && n <= expected + burst,
                "rate {rate}: {n} events in 2s"
            );
        }
    }

    #[test]
    fn waits_follow_the_highest_latency_between_floor_and_cap() {
        let ms = Duration::from_millis;
        let us = Duration::from_micros;
        let cap = ms(1000);
        // Nothing timed yet: the configured maximum.
        assert_eq!(adaptive_wait(None, cap), cap);
        // A fast LAN: the floor, not 4 x 300 us.
        assert_eq!(adaptive_wait(Some(us(300)), cap), MIN_WAIT);
        assert_eq!(adaptive_wait(Some(Duration::ZERO), cap), MIN_WAIT);
        // A slow host (a Wi-Fi client in power save): 4 x its latency.
        assert_eq!(adaptive_wait(Some(ms(30)), cap), ms(120));
        assert_eq!(adaptive_wait(Some(ms(200)), cap), ms(800));
        // Never beyond the cap, however slow, and no overflow.
        assert_eq!(adaptive_wait(Some(ms(400)), cap), cap);
        assert_eq!(adaptive_wait(Some(Duration::MAX), cap), cap);
        // A cap below the floor wins over the floor (and a zero cap means no wait at all).
        assert_eq!(adaptive_wait(Some(us(1)), ms(30)), ms(30));
        assert_eq!(adaptive_wait(None, Duration::ZERO), Duration::ZERO);
        assert_eq!(adaptive_wait(Some(ms(5)), Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn latency_keeps_the_highest_sample() {
        let l = Latency::default();
        let cap = Duration::from_millis(200);
        assert_eq!(l.highest(), None);
        assert_eq!(l.wait(cap), cap, "the cap until a reply is timed");
        l.observe(Duration::ZERO);
        assert_eq!(
            l.highest(),
            Some(Duration::ZERO),
            "a zero sample still counts"
        );
        assert_eq!(l.wait(cap), MIN_WAIT);
        l.observe(Duration::from_millis(20));
        l.observe(Duration::from_millis(3));
        assert_eq!(l.highest(), Some(Duration::from_millis(20)));
        assert_eq!(l.wait(cap), Duration::from_millis(80));
        l.observe(Duration::MAX);
        assert_eq!(l.wait(cap), cap);
    }

    #[test]
    fn latency_is_shared_between_threads() {
        let l = Latency::default();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let l = &l;
                s.spawn(move || {
                    for i in 0..1000u64 {
                        l.observe(Duration::from_micros(t * 1000 + i));
                    }
                });
            }
        });
        assert_eq!(l.highest(), Some(Duration::from_micros(3999)));
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
