//! The agent's counters: plain atomics, one process-wide set ([`global`]), read as a
//! [`Snapshot`]. Nothing here exports them; a metrics endpoint reads [`global`]`().snapshot()`.
//!
//! Counters only go up (from the start of the process); `queue_batches` and `queue_bytes` are
//! gauges (what is queued now, on disk or in memory). Tests give a queue a `Metrics` of its own
//! so tests running at once do not count each other's batches.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The counters. See [`Snapshot`] for what each one counts.
#[derive(Debug, Default)]
pub struct Metrics {
    sweeps: AtomicU64,
    arp_replies: AtomicU64,
    icmp_replies: AtomicU64,
    snmp_devices: AtomicU64,
    mdns_hosts: AtomicU64,
    directory_reads: AtomicU64,
    directory_read_failures: AtomicU64,
    batches_queued: AtomicU64,
    observations_queued: AtomicU64,
    batches_sent: AtomicU64,
    batches_acknowledged: AtomicU64,
    batches_duplicate: AtomicU64,
    batches_dropped: AtomicU64,
    observations_dropped: AtomicU64,
    batches_corrupt: AtomicU64,
    batches_rejected: AtomicU64,
    observations_rejected: AtomicU64,
    delivery_failures: AtomicU64,
    queue_batches: AtomicU64,
    queue_bytes: AtomicU64,
}

/// The counters at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// Sweeps finished.
    pub sweeps: u64,
    /// Replies per method, summed over sweeps: addresses that answered ARP, ICMP, devices that
    /// answered SNMP, hosts advertised over mDNS.
    pub arp_replies: u64,
    pub icmp_replies: u64,
    pub snmp_devices: u64,
    pub mdns_hosts: u64,
    /// Directory reads finished, and how many of them failed.
    pub directory_reads: u64,
    pub directory_read_failures: u64,
    /// Batches (and their observations) written to the queue.
    pub batches_queued: u64,
    pub observations_queued: u64,
    /// Batches put on an ingest stream (a resend counts again).
    pub batches_sent: u64,
    /// Batches the collector acknowledged (stored now, or `batches_duplicate`: stored before),
    /// and so removed from the queue.
    pub batches_acknowledged: u64,
    pub batches_duplicate: u64,
    /// Batches (and observations) dropped, oldest first, to keep the queue under its cap.
    pub batches_dropped: u64,
    pub observations_dropped: u64,
    /// Queue entries that could not be read back (removed and logged).
    pub batches_corrupt: u64,
    /// Batches (and observations) the collector refused as invalid (removed and logged).
    pub batches_rejected: u64,
    pub observations_rejected: u64,
    /// Delivery attempts that failed (each is followed by a back-off).
    pub delivery_failures: u64,
    /// Batches and bytes queued now.
    pub queue_batches: u64,
    pub queue_bytes: u64,
}

static GLOBAL: Metrics = Metrics::new();

/// The process's counters, as the agent's run loop and queue count them.
pub fn global() -> &'static Metrics {
    &GLOBAL
}

impl Metrics {
    pub const fn new() -> Metrics {
        Metrics {
            sweeps: AtomicU64::new(0),
            arp_replies: AtomicU64::new(0),
            icmp_replies: AtomicU64::new(0),
            snmp_devices: AtomicU64::new(0),
            mdns_hosts: AtomicU64::new(0),
            directory_reads: AtomicU64::new(0),
            directory_read_failures: AtomicU64::new(0),
            batches_queued: AtomicU64::new(0),
            observations_queued: AtomicU64::new(0),
            batches_sent: AtomicU64::new(0),
            batches_acknowledged: AtomicU64::new(0),
            batches_duplicate: AtomicU64::new(0),
            batches_dropped: AtomicU64::new(0),
            observations_dropped: AtomicU64::new(0),
            batches_corrupt: AtomicU64::new(0),
            batches_rejected: AtomicU64::new(0),
            observations_rejected: AtomicU64::new(0),
            delivery_failures: AtomicU64::new(0),
            queue_batches: AtomicU64::new(0),
            queue_bytes: AtomicU64::new(0),
        }
    }

    /// Every counter now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            sweeps: self.sweeps.load(Relaxed),
            arp_replies: self.arp_replies.load(Relaxed),
            icmp_replies: self.icmp_replies.load(Relaxed),
            snmp_devices: self.snmp_devices.load(Relaxed),
            mdns_hosts: self.mdns_hosts.load(Relaxed),
            directory_reads: self.directory_reads.load(Relaxed),
            directory_read_failures: self.directory_read_failures.load(Relaxed),
            batches_queued: self.batches_queued.load(Relaxed),
            observations_queued: self.observations_queued.load(Relaxed),
            batches_sent: self.batches_sent.load(Relaxed),
            batches_acknowledged: self.batches_acknowledged.load(Relaxed),
            batches_duplicate: self.batches_duplicate.load(Relaxed),
            batches_dropped: self.batches_dropped.load(Relaxed),
            observations_dropped: self.observations_dropped.load(Relaxed),
            batches_corrupt: self.batches_corrupt.load(Relaxed),
            batches_rejected: self.batches_rejected.load(Relaxed),
            observations_rejected: self.observations_rejected.load(Relaxed),
            delivery_failures: self.delivery_failures.load(Relaxed),
            queue_batches: self.queue_batches.load(Relaxed),
            queue_bytes: self.queue_bytes.load(Relaxed),
        }
    }

    /// A sweep finished with these replies per method.
    pub fn sweep(&self, s: &crate::discovery::SweepSummary) {
        self.sweeps.fetch_add(1, Relaxed);
        self.arp_replies.fetch_add(s.arp_replies as u64, Relaxed);
        self.icmp_replies.fetch_add(s.icmp_replies as u64, Relaxed);
        self.snmp_devices.fetch_add(s.snmp_devices as u64, Relaxed);
        self.mdns_hosts.fetch_add(s.mdns_hosts as u64, Relaxed);
    }

    /// A directory read finished (`failed`: with an error).
    pub fn directory_read(&self, failed: bool) {
        self.directory_reads.fetch_add(1, Relaxed);
        if failed {
            self.directory_read_failures.fetch_add(1, Relaxed);
        }
    }

    pub(crate) fn queued(&self, batches: u64, observations: u64) {
        self.batches_queued.fetch_add(batches, Relaxed);
        self.observations_queued.fetch_add(observations, Relaxed);
    }

    pub(crate) fn sent(&self, batches: u64) {
        self.batches_sent.fetch_add(batches, Relaxed);
    }

    pub(crate) fn acknowledged(&self, batches: u64, duplicates: u64) {
        self.batches_acknowledged.fetch_add(batches, Relaxed);
        self.batches_duplicate.fetch_add(duplicates, Relaxed);
    }

    pub(crate) fn dropped(&self, batches: u64, observations: u64) {
        self.batches_dropped.fetch_add(batches, Relaxed);
        self.observations_dropped.fetch_add(observations, Relaxed);
    }

    pub(crate) fn corrupt(&self, batches: u64) {
        self.batches_corrupt.fetch_add(batches, Relaxed);
    }

    pub(crate) fn rejected(&self, batches: u64, observations: u64) {
        self.batches_rejected.fetch_add(batches, Relaxed);
        self.observations_rejected.fetch_add(observations, Relaxed);
    }

    pub(crate) fn delivery_failed(&self) {
        self.delivery_failures.fetch_add(1, Relaxed);
    }

    pub(crate) fn queue_size(&self, batches: u64, bytes: u64) {
        self.queue_batches.store(batches, Relaxed);
        self.queue_bytes.store(bytes, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_up_and_gauges_are_set() {
        let m = Metrics::new();
        m.queued(3, 1200);
        m.sent(3);
        m.acknowledged(2, 1);
        m.dropped(1, 500);
        m.queue_size(1, 4096);
        m.queue_size(0, 0);
        m.sweep(&crate::discovery::SweepSummary {
            arp_replies: 7,
            ..Default::default()
        });
        let s = m.snapshot();
        assert_eq!(
            (s.batches_queued, s.observations_queued, s.batches_sent),
            (3, 1200, 3)
        );
        assert_eq!((s.batches_acknowledged, s.batches_duplicate), (2, 1));
        assert_eq!((s.batches_dropped, s.observations_dropped), (1, 500));
        assert_eq!((s.queue_batches, s.queue_bytes), (0, 0));
        assert_eq!((s.sweeps, s.arp_replies), (1, 7));
    }
}

/// The agent's counters ([`global`]) as the metrics page reads them.
#[derive(Debug, Clone, Copy, Default)]
pub struct GlobalCounters;

impl crate::metrics_http::AgentCounters for GlobalCounters {
    fn snapshot(&self) -> crate::metrics_http::CounterSnapshot {
        let s = global().snapshot();
        crate::metrics_http::CounterSnapshot {
            sweeps: Some(s.sweeps),
            replies: vec![
                ("arp", s.arp_replies),
                ("icmp", s.icmp_replies),
                ("snmp", s.snmp_devices),
                ("mdns", s.mdns_hosts),
            ],
            batches_queued: Some(s.batches_queued),
            batches_sent: Some(s.batches_sent),
            batches_acknowledged: Some(s.batches_acknowledged),
            batches_dropped: Some(s.batches_dropped),
        }
    }
}
