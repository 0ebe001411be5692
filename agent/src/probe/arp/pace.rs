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
//! - [`RateControl`]: the sending rate, from what the sweep's check requests (an address that
//!   already answered, asked again) tell of the network: faster while they come back as fast
//!   as the fastest answer, slower when they come back late or not at all.

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
    /// Lowest latency in ns, plus one; 0 while nothing has been measured.
    lowest_ns_plus_one: AtomicU64,
}

impl Latency {
    /// Records one reply's latency.
    pub(crate) fn observe(&self, rtt: Duration) {
        let ns = u64::try_from(rtt.as_nanos())
            .unwrap_or(u64::MAX - 1)
            .min(u64::MAX - 1);
        self.highest_ns_plus_one
            .fetch_max(ns + 1, Ordering::Relaxed);
        // 0 means "none yet": replace it, or keep the lower of two samples.
        let _ = self
            .lowest_ns_plus_one
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                (old == 0 || ns + 1 < old).then_some(ns + 1)
            });
    }

    /// The lowest latency recorded, if any.
    pub(crate) fn lowest(&self) -> Option<Duration> {
        match self.lowest_ns_plus_one.load(Ordering::Relaxed) {
            0 => None,
            n => Some(Duration::from_nanos(n - 1)),
        }
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

/// How much later than twice the fastest answer of the sweep a check's answer may come and
/// still count as "the network keeps up". Hosts on a switched LAN answer ARP in well under a
/// millisecond; a queue that builds up in a switch, an access point or the hosts themselves
/// shows as answers that come back milliseconds later than they did.
pub(crate) const QUEUE_SLACK: Duration = Duration::from_millis(5);
/// The rate grows by a quarter after each check answered in time...
const SPEED_UP: f64 = 1.25;
/// ...shrinks by a quarter after one answered late...
const SLOW_DOWN_LATE: f64 = 0.75;
/// ...and halves after one not answered at all (a lost request or reply: loss is the
/// stronger sign of a network that does not keep up).
const SLOW_DOWN_LOST: f64 = 0.5;

/// What one check request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Check {
    /// Answered after this long.
    Answered(Duration),
    /// Not answered within the adaptive wait.
    Lost,
}

/// The sending rate of a sweep, between its start rate (the floor) and the configured rate
/// (the cap): multiplicative increase while checks come back in time, multiplicative decrease
/// when they come back late or are lost (AIMD's decrease, with a multiplicative increase
/// because a sweep lasts seconds, not a connection's lifetime). With the cap at or below the
/// start rate it is a fixed rate, the cap.
#[derive(Clone, Debug)]
pub(crate) struct RateControl {
    rate: f64,
    floor: f64,
    cap: f64,
}

impl RateControl {
    pub(crate) fn new(start_pps: u32, cap_pps: u32) -> Self {
        let cap = f64::from(cap_pps.max(1));
        let floor = f64::from(start_pps.max(1)).min(cap);
        RateControl {
            rate: floor,
            floor,
            cap,
        }
    }

    /// True if the rate can change at all (the cap is above the start).
    pub(crate) fn adaptive(&self) -> bool {
        self.cap > self.floor
    }

    /// The rate now, in requests per second.
    pub(crate) fn rate(&self) -> u32 {
        // In [1, cap], and the cap came from a u32.
        self.rate.round() as u32
    }

    /// Takes one check's outcome into account; `fastest` is the fastest answer of the sweep
    /// so far. Returns true if the rate changed.
    pub(crate) fn on_check(&mut self, check: Check, fastest: Duration) -> bool {
        let factor = match check {
            Check::Answered(latency)
                if latency <= fastest.saturating_mul(2).saturating_add(QUEUE_SLACK) =>
            {
                SPEED_UP
            }
            Check::Answered(_) => SLOW_DOWN_LATE,
            Check::Lost => SLOW_DOWN_LOST,
        };
        let before = self.rate();
        self.rate = (self.rate * factor).clamp(self.floor, self.cap);
        self.rate() != before
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
        let mut p = Pacer {
            interval: Duration::ZERO,
            tolerance: Duration::ZERO,
            tat: None,
        };
        p.set_rate(rate_per_sec);
        p
    }

    /// Changes the rate from the next event on (the schedule already taken stands).
    pub(crate) fn set_rate(&mut self, rate_per_sec: u32) {
        let rate = u64::from(rate_per_sec.max(1));
        self.interval = Duration::from_nanos((1_000_000_000 / rate).max(1));
        let burst = (rate / 200).clamp(8, 256);
        self.tolerance = self
            .interval
            .saturating_mul(u32::try_from(burst - 1).unwrap_or(255));
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
    fn the_rate_grows_while_checks_come_back_in_time_and_falls_when_not() {
        let ms = Duration::from_millis;
        let us = Duration::from_micros;
        let mut r = RateControl::new(1200, 6000);
        assert!(r.adaptive());
        assert_eq!(r.rate(), 1200, "starts at the start rate");
        // Answers as fast as the fastest (300 us), or within 2x + 5 ms of it: faster.
        assert!(r.on_check(Check::Answered(us(300)), us(300)));
        assert_eq!(r.rate(), 1500);
        assert!(r.on_check(Check::Answered(us(5600)), us(300)));
        assert_eq!(r.rate(), 1875);
        for _ in 0..20 {
            r.on_check(Check::Answered(us(400)), us(300));
        }
        assert_eq!(r.rate(), 6000, "never above the cap");
        assert!(!r.on_check(Check::Answered(us(400)), us(300)));
        // Late (a queue building up): a quarter slower; lost: half.
        assert!(r.on_check(Check::Answered(ms(6)), us(300)));
        assert_eq!(r.rate(), 4500);
        assert!(r.on_check(Check::Lost, us(300)));
        assert_eq!(r.rate(), 2250);
        for _ in 0..20 {
            r.on_check(Check::Lost, us(300));
        }
        assert_eq!(r.rate(), 1200, "never below the start rate");
        // No overflow on absurd samples.
        r.on_check(Check::Answered(Duration::MAX), Duration::MAX);
        assert_eq!(r.rate(), 1500);
    }

    #[test]
    fn a_cap_at_or_below_the_start_is_a_fixed_rate() {
        for (start, cap) in [(1200, 1200), (1200, 500), (0, 0)] {
            let mut r = RateControl::new(start, cap);
            assert!(!r.adaptive());
            let fixed = r.rate();
            assert_eq!(fixed, cap.max(1));
            assert!(!r.on_check(Check::Answered(Duration::ZERO), Duration::ZERO));
            assert!(!r.on_check(Check::Lost, Duration::ZERO));
            assert_eq!(r.rate(), fixed);
        }
    }

    #[test]
    fn a_new_rate_applies_to_the_next_events() {
        let t0 = Instant::now();
        let mut p = Pacer::new(1000);
        let mut now = t0;
        let mut n = 0u32;
        // One second at 1000/s, then one at 4000/s.
        while now < t0 + Duration::from_secs(1) {
            match p.try_take(now) {
                Ok(()) => n += 1,
                Err(wait) => now += wait,
            }
        }
        let first = n;
        p.set_rate(4000);
        while now < t0 + Duration::from_secs(2) {
            match p.try_take(now) {
                Ok(()) => n += 1,
                Err(wait) => now += wait,
            }
        }
        assert!(
            (1000..=1010).contains(&first),
            "{first} in the first second"
        );
        assert!(
            (3990..=4030).contains(&(n - first)),
            "{} in the second",
            n - first
        );
    }

    #[test]
    fn latency_keeps_the_highest_sample() {
        let l = Latency::default();
        let cap = Duration::from_millis(200);
        assert_eq!(l.highest(), None);
        assert_eq!(l.lowest(), None);
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
        assert_eq!(l.lowest(), Some(Duration::ZERO));
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
