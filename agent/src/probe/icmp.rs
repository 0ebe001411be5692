//! ICMP echo sweep of routed addresses (surge-ping). PLACEHOLDER: being implemented.

use std::{
    net::Ipv4Addr,
    time::{Duration, SystemTime},
};

use tokio_util::sync::CancellationToken;

/// Tuning for one ICMP sweep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IcmpConfig {
    /// Echo requests per second, across all targets.
    pub rate_pps: u32,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// How long to wait for each reply.
    pub timeout: Duration,
    /// Extra attempts for targets that stayed silent.
    pub retries: u32,
}

/// One address that answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IcmpReply {
    pub ip: Ipv4Addr,
    pub rtt: Duration,
    pub at: SystemTime,
}

/// What one ICMP sweep found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IcmpSweepResult {
    pub probed: usize,
    pub requests_sent: u64,
    /// One per answering address, sorted by address.
    pub replies: Vec<IcmpReply>,
    pub cancelled: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum IcmpError {
    #[error("ICMP needs raw socket access (CAP_NET_RAW): run as root or grant CAP_NET_RAW ({0})")]
    PermissionDenied(std::io::Error),
    #[error("cannot open an ICMP socket: {0}")]
    Socket(std::io::Error),
}

/// Pings every target (at most `cfg.concurrency` in flight, paced at `cfg.rate_pps`), retrying
/// silent ones, and returns who answered. Ends promptly on `cancel`.
pub async fn sweep(
    targets: &[Ipv4Addr],
    cfg: &IcmpConfig,
    cancel: &CancellationToken,
) -> Result<IcmpSweepResult, IcmpError> {
    let _ = (cfg, cancel);
    Ok(IcmpSweepResult {
        probed: targets.len(),
        ..Default::default()
    })
}
