//! SNMP v1/v2c/v3 queries of responding devices (snmp2). PLACEHOLDER: being implemented.

use std::{net::Ipv4Addr, time::Duration};

use census_proto::v1;
use tokio_util::sync::CancellationToken;

use crate::config::SnmpV3User;

/// Credentials for one site: communities tried in order, then v3 users.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SnmpCredentials {
    pub communities: Vec<String>,
    pub v3_users: Vec<SnmpV3User>,
}

/// Tuning for one SNMP sweep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnmpConfig {
    pub port: u16,
    pub timeout: Duration,
    pub retries: u32,
    pub concurrency: usize,
    pub max_repetitions: u32,
    pub max_rows: usize,
}

/// What one device said over SNMP. `identity` carries everything that goes on the wire
/// (system group, engine id, serial, model, interfaces, ARP cache, FDB, LLDP, the version and
/// which credential answered).
#[derive(Debug, Clone, PartialEq)]
pub struct SnmpDevice {
    pub ip: Ipv4Addr,
    pub identity: v1::SnmpIdentity,
    /// Parts that failed (a table that timed out mid-walk, ...), for the log.
    pub errors: Vec<String>,
}

/// What one SNMP sweep found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SnmpSweepResult {
    pub probed: usize,
    pub devices: Vec<SnmpDevice>,
    /// Addresses that answered no credential.
    pub silent: usize,
}

/// Queries every target with every credential in turn until one answers, then reads its
/// identity and tables. A device that fails never stops the others. Ends promptly on `cancel`.
pub async fn sweep(
    targets: &[Ipv4Addr],
    credentials: &SnmpCredentials,
    cfg: &SnmpConfig,
    cancel: &CancellationToken,
) -> SnmpSweepResult {
    let _ = (credentials, cfg, cancel);
    SnmpSweepResult {
        probed: targets.len(),
        ..Default::default()
    }
}
