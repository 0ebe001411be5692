//! SNMP v1/v2c/v3 queries of responding devices (snmp2, async): identity (system group, engine
//! ID, ENTITY-MIB serial and model), interfaces and their MACs, router ARP caches, switch
//! forwarding tables and LLDP neighbours.
//!
//! Layout:
//! - this file: the public API ([`sweep`], its config and results, [`validate_v3_user`]) and
//!   the sweep itself: bounded concurrency, cancellation.
//! - `snmp/device.rs`: one device: which credential answers (communities in order of
//!   preference, v2c preferred to v1, then v3 users), then every table, each failure noted,
//!   never fatal.
//! - `snmp/credential.rs`: every community and version asked at once over one small socket,
//!   the preferred answer taken.
//! - `snmp/session.rs`: the I/O. snmp2 sessions with timeouts, retries on fresh sessions,
//!   GETBULK/GETNEXT walks that always end, v3 engine discovery.
//! - `snmp/usm.rs`: v3 users: validation, keys, the discovery message (no I/O).
//! - `snmp/ber.rs`: the BER the probe writes itself (discovery, the community GET).
//! - `snmp/tables.rs`: OIDs and the decoding of rows into identity fields (no I/O), capped
//!   and hostile-input safe.
//!
//! Bounds: at most `concurrency` devices at once; every request has `timeout` and `retries`;
//! a walk stops at `max_rows`, at the end of its subtree, at endOfMibView, at an OID that
//! does not increase, and after 30 s; a device's tables get 2 minutes together. Strings are
//! capped at 255 bytes and tables at `max_rows`. Cancellation drops every query at once.

pub(crate) mod ber;
mod credential;
mod device;
#[cfg(all(test, unix))]
mod lab_tests;
pub(crate) mod session;
pub(crate) mod tables;
pub(crate) mod usm;

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant},
};

use census_proto::v1;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, instrument, warn};

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
    /// UDP port of the agents.
    pub port: u16,
    /// How long to wait for each response.
    pub timeout: Duration,
    /// Extra attempts after a timeout, each on a fresh session.
    pub retries: u32,
    /// Devices queried at once (at least 1).
    pub concurrency: usize,
    /// GETBULK max-repetitions (halved when an agent answers tooBig).
    pub max_repetitions: u32,
    /// Most rows read from one table column of one device, and most entries of each table
    /// reported (at least 1).
    pub max_rows: usize,
}

impl Default for SnmpConfig {
    fn default() -> Self {
        Self {
            port: 161,
            timeout: Duration::from_secs(1),
            retries: 1,
            concurrency: 32,
            max_repetitions: 25,
            max_rows: 10_000,
        }
    }
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
    /// Addresses queried to the end (all targets unless the sweep was cancelled).
    pub probed: usize,
    /// Devices that answered a credential, by address.
    pub devices: Vec<SnmpDevice>,
    /// Addresses that answered no credential.
    pub silent: usize,
}

/// Checks a configured SNMPv3 user: a name of 1 to 32 bytes; `auth_protocol` one of md5, sha,
/// sha224, sha256, sha384, sha512 and `priv_protocol` one of des, aes, aes192, aes256 (any case;
/// `sha1` and `aes128` also accepted); privacy only with authentication; and a pass phrase of 8
/// or more characters for each protocol set, none without one. Neither protocol means
/// noAuthNoPriv. The message names the user, never a secret.
pub fn validate_v3_user(user: &SnmpV3User) -> Result<(), String> {
    usm::parse_user(user).map(|_| ())
}

/// Queries every target with every credential in turn until one answers, then reads its
/// identity and tables. A device that fails never stops the others. Ends promptly on `cancel`
/// (or when this future is dropped), with what finished by then.
///
/// Credential order per device: the communities in their configured order of preference (all
/// asked at once, v2c preferred to v1 for each), then each valid v3 user in order. Invalid v3
/// users are skipped with a warning.
///
/// The queries run on a thread of their own with a single-threaded runtime and a large stack:
/// snmp2's sessions hold two 64 KiB buffers inline and, in unoptimized builds, opening a v3
/// session alone takes about 2 MiB of stack (measured), more than a default tokio worker has.
/// One thread is plenty: the queries wait on the network, and key localization (the only heavy
/// CPU work) runs on that runtime's blocking pool.
#[instrument(skip_all, fields(targets = targets.len(), concurrency = cfg.concurrency))]
pub async fn sweep(
    targets: &[Ipv4Addr],
    credentials: &SnmpCredentials,
    cfg: &SnmpConfig,
    cancel: &CancellationToken,
) -> SnmpSweepResult {
    let started = Instant::now();
    let prepared = prepare(credentials);
    if prepared.communities.is_empty() && prepared.users.is_empty() {
        warn!("no SNMP credentials: SNMP sweep skipped");
        return SnmpSweepResult::default();
    }
    if targets.is_empty() {
        return SnmpSweepResult::default();
    }
    // Cancelled by the caller's token, or when this future is dropped.
    let stop = cancel.child_token();
    let _stop_on_drop = stop.clone().drop_guard();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let span = tracing::Span::current();
    let (targets, cfg) = (targets.to_vec(), cfg.clone());
    let spawned = std::thread::Builder::new()
        .name("census-snmp".into())
        .stack_size(SWEEP_STACK)
        .spawn(move || {
            let _entered = span.enter();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_stack_size(SWEEP_STACK)
                .build();
            match runtime {
                Ok(rt) => {
                    let result = rt.block_on(run(targets, prepared, cfg, stop));
                    let _ = tx.send(result);
                    // Key localizations still running are not waited for.
                    rt.shutdown_background();
                }
                Err(e) => warn!(error = %e, "cannot start the SNMP sweep's runtime"),
            }
        });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start the SNMP sweep's thread");
        return SnmpSweepResult::default();
    }
    let result = rx.await.unwrap_or_default();
    info!(
        probed = result.probed,
        answered = result.devices.len(),
        silent = result.silent,
        elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "SNMP sweep done"
    );
    result
}

/// Stack of the sweep's thread (and its blocking pool); see [`sweep`]. Only the pages used are
/// ever resident.
const SWEEP_STACK: usize = 8 << 20;

/// The sweep proper, on its own runtime: at most `concurrency` devices at once.
async fn run(
    targets: Vec<Ipv4Addr>,
    prepared: device::Prepared,
    cfg: SnmpConfig,
    stop: CancellationToken,
) -> SnmpSweepResult {
    let prepared = Arc::new(prepared);
    let cfg = Arc::new(cfg);
    let mut result = SnmpSweepResult::default();
    let mut seen = BTreeSet::new();
    let mut pending = targets.into_iter().filter(|ip| seen.insert(*ip));
    let mut running = JoinSet::new();
    loop {
        while running.len() < cfg.concurrency.max(1) {
            let Some(ip) = pending.next() else { break };
            running.spawn(device::query(ip, Arc::clone(&prepared), Arc::clone(&cfg)));
        }
        let joined = tokio::select! {
            biased;
            () = stop.cancelled() => {
                debug!("SNMP sweep cancelled");
                running.abort_all();
                break;
            }
            joined = running.join_next() => joined,
        };
        let Some(joined) = joined else { break };
        result.probed += 1;
        match joined {
            Ok(Some(device)) => result.devices.push(device),
            Ok(None) => result.silent += 1,
            Err(e) => {
                // A panic in one device's query (a bug) costs that device only.
                warn!(error = %e, "an SNMP query failed");
                result.silent += 1;
            }
        }
    }
    result.devices.sort_by_key(|d| d.ip);
    result
}

/// The credentials in the form the queries use; invalid v3 users dropped with a warning.
fn prepare(credentials: &SnmpCredentials) -> device::Prepared {
    let users = credentials
        .v3_users
        .iter()
        .filter_map(|user| match usm::parse_user(user) {
            Ok(level) => Some((user.clone(), level)),
            Err(e) => {
                warn!(error = %e, "SNMPv3 user skipped");
                None
            }
        })
        .collect();
    device::Prepared {
        communities: credentials
            .communities
            .iter()
            .map(|c| c.as_bytes().to_vec())
            .collect(),
        users,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_ones() {
        let cfg = SnmpConfig::default();
        assert_eq!(cfg.port, 161);
        assert_eq!(cfg.timeout, Duration::from_secs(1));
        assert_eq!(
            (
                cfg.retries,
                cfg.concurrency,
                cfg.max_repetitions,
                cfg.max_rows
            ),
            (1, 32, 25, 10_000)
        );
    }

    #[test]
    fn invalid_users_are_dropped_before_the_sweep() {
        let good = SnmpV3User {
            name: "census".into(),
            auth_protocol: Some("sha".into()),
            auth_password: Some("authpass1".into()),
            priv_protocol: Some("aes".into()),
            priv_password: Some("privpass1".into()),
        };
        let bad = SnmpV3User {
            auth_password: Some("short".into()),
            ..good.clone()
        };
        assert!(validate_v3_user(&good).is_ok());
        assert!(validate_v3_user(&bad).is_err());
        let prepared = prepare(&SnmpCredentials {
            communities: vec!["public".into()],
            v3_users: vec![bad, good],
        });
        assert_eq!(prepared.communities, vec![b"public".to_vec()]);
        assert_eq!(prepared.users.len(), 1);
    }

    #[tokio::test]
    async fn a_sweep_without_credentials_or_targets_sends_nothing() {
        let cancel = CancellationToken::new();
        let cfg = SnmpConfig::default();
        let r = sweep(
            &[Ipv4Addr::new(198, 18, 0, 1)],
            &SnmpCredentials::default(),
            &cfg,
            &cancel,
        )
        .await;
        assert_eq!(r, SnmpSweepResult::default());
        let creds = SnmpCredentials {
            communities: vec!["public".into()],
            v3_users: vec![],
        };
        assert_eq!(
            sweep(&[], &creds, &cfg, &cancel).await,
            SnmpSweepResult::default()
        );
    }
}
