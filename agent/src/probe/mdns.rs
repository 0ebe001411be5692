//! mDNS / DNS-SD browsing (mdns-sd). PLACEHOLDER: being implemented.

use std::{net::Ipv4Addr, time::Duration};

use census_proto::v1;
use ipnet::Ipv4Net;
use tokio_util::sync::CancellationToken;

/// Tuning for one mDNS browse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MdnsConfig {
    /// Interfaces to browse on (the on-link scopes' interfaces).
    pub interfaces: Vec<String>,
    /// Only hosts with an address inside these are kept.
    pub scopes: Vec<Ipv4Net>,
    /// How long to listen.
    pub window: Duration,
}

/// One host that advertised services.
#[derive(Debug, Clone, PartialEq)]
pub struct MdnsHost {
    pub addresses: Vec<Ipv4Addr>,
    /// `host_name` and `services` (instance, type, port, TXT).
    pub identity: v1::MdnsIdentity,
}

/// What one browse found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MdnsSweepResult {
    pub hosts: Vec<MdnsHost>,
    /// Service types seen (from `_services._dns-sd._udp.local.`).
    pub service_types: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum MdnsError {
    #[error("cannot start mDNS browsing: {0}")]
    Daemon(String),
}

/// Browses `_services._dns-sd._udp.local.`, then each type found, for `cfg.window`, and
/// returns the hosts inside `cfg.scopes` with their services.
pub async fn sweep(
    cfg: &MdnsConfig,
    cancel: &CancellationToken,
) -> Result<MdnsSweepResult, MdnsError> {
    let _ = (cfg, cancel);
    Ok(MdnsSweepResult::default())
}
