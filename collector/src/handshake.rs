//! The TLS listener: accepts TCP connections, completes each TLS handshake on a task of its
//! own, and hands tonic only the connections whose handshake succeeded.
//!
//! tonic's own TLS listener drops a failed handshake with a debug line, so an agent or an
//! operator whose CA is not this collector's (or who speaks plaintext to the TLS port) fails
//! with nothing in the collector's log. Here every failed handshake is counted
//! (`census_collector_tls_handshakes_failed_total{reason}`) and logged, rate-limited: the first
//! failure of a kind from a peer address is a warn line, then at most one a minute per address
//! and kind, saying how many were not logged since ([`Throttle`]). A scanner or a misconfigured agent retrying
//! every second cannot fill the log.
//!
//! The handshakes run at most [`MAX_HANDSHAKES`] at once, each under a deadline, so slow or
//! silent peers cannot hold more than that many tasks; past the limit, new connections wait in
//! the kernel's accept queue.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::Metrics;

/// TLS handshakes in progress at once.
pub const MAX_HANDSHAKES: usize = 256;
/// How often one peer address's failed handshakes of one kind are logged, at most.
pub const LOG_EVERY: Duration = Duration::from_secs(60);
/// Peer addresses whose last log line the throttle remembers; past this, addresses not logged
/// within [`LOG_EVERY`] are forgotten (and the next failure of one is logged again).
const MAX_PEERS: usize = 4096;

/// Why a handshake failed, as the `reason` label of the failed-handshakes metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failure {
    /// The peer does not trust this collector's certificate (it sent an unknown-CA or
    /// bad-certificate alert): it was given another CA, or none.
    UntrustedServer,
    /// The peer's client certificate is not signed by this collector's CA, or is invalid.
    BadClientCertificate,
    /// The peer did not speak TLS (plaintext gRPC or HTTP to the TLS port).
    NotTls,
    /// The handshake did not finish within its deadline.
    Timeout,
    /// Anything else (the peer went away mid-handshake, no common protocol version...).
    Other,
}

impl Failure {
    pub const ALL: [Failure; 5] = [
        Failure::UntrustedServer,
        Failure::BadClientCertificate,
        Failure::NotTls,
        Failure::Timeout,
        Failure::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Failure::UntrustedServer => "untrusted_server_certificate",
            Failure::BadClientCertificate => "bad_client_certificate",
            Failure::NotTls => "not_tls",
            Failure::Timeout => "timeout",
            Failure::Other => "other",
        }
    }

    /// What the operator can do about it, for the log line.
    fn hint(self) -> &'static str {
        match self {
            Failure::UntrustedServer => {
                "the client does not trust this collector's certificate: give it this collector's CA (<data dir>/tls/ca.pem; agents: enroll with --ca-file; census: the operator credentials of this collector)"
            }
            Failure::BadClientCertificate => {
                "the client presented a certificate this collector's CA did not sign: it belongs to another collector; enroll the agent with this one"
            }
            Failure::NotTls => {
                "the client did not speak TLS: it was given an http:// URL for this collector's https:// port"
            }
            Failure::Timeout => "the client did not complete the TLS handshake in time",
            Failure::Other => "the TLS handshake failed",
        }
    }

    /// Classifies a failed handshake by the rustls error inside `e`.
    pub fn of(e: &io::Error) -> Failure {
        if e.kind() == io::ErrorKind::TimedOut {
            return Failure::Timeout;
        }
        let Some(tls) = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        else {
            return Failure::Other;
        };
        use rustls::{AlertDescription as A, Error as E};
        match tls {
            // DecryptError: what rustls clients answer a certificate signed by another key
            // under the same CA name (another collector's CA).
            E::AlertReceived(
                A::UnknownCA | A::BadCertificate | A::CertificateUnknown | A::DecryptError,
            ) => Failure::UntrustedServer,
            E::InvalidCertificate(_) | E::NoCertificatesPresented => Failure::BadClientCertificate,
            E::InvalidMessage(_) | E::InappropriateMessage { .. } => Failure::NotTls,
            _ => Failure::Other,
        }
    }
}

/// Logs failed handshakes at most once per [`LOG_EVERY`] per peer address and kind.
#[derive(Debug, Default)]
pub struct Throttle {
    peers: Mutex<HashMap<(IpAddr, Failure), Peer>>,
}

#[derive(Debug)]
struct Peer {
    logged: Instant,
    /// Failures since the last line.
    unlogged: u64,
}

impl Throttle {
    /// Notes a failure of kind `why` from `ip` at `now`: `Some(n)` when it is to be logged
    /// now, `n` being the failures of that kind from it not logged since its last line.
    pub fn note(&self, ip: IpAddr, why: Failure, now: Instant) -> Option<u64> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = peers.get_mut(&(ip, why)) {
            if now.duration_since(p.logged) < LOG_EVERY {
                p.unlogged += 1;
                return None;
            }
            let unlogged = std::mem::take(&mut p.unlogged);
            p.logged = now;
            return Some(unlogged);
        }
        if peers.len() >= MAX_PEERS {
            peers.retain(|_, p| now.duration_since(p.logged) < LOG_EVERY);
            if peers.len() >= MAX_PEERS {
                // Thousands of addresses failing within a minute: the metric counts them, the
                // log does not take one line each.
                return None;
            }
        }
        peers.insert(
            (ip, why),
            Peer {
                logged: now,
                unlogged: 0,
            },
        );
        Some(0)
    }
}

/// Accepts connections on `listener` until `shutdown`, and yields those whose TLS handshake
/// with `acceptor` succeeded within `timeout`; failed handshakes are counted and logged (see
/// the module doc).
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    timeout: Duration,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let throttle = Arc::new(Throttle::default());
    tokio::spawn(async move {
        loop {
            // A free handshake slot first: past the limit, connections wait in the backlog.
            let slot = tokio::select! {
                () = shutdown.cancelled() => break,
                slot = Arc::clone(&slots).acquire_owned() => match slot {
                    Ok(s) => s,
                    Err(_) => break,
                },
            };
            let (tcp, peer) = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors, or a connection reset while queued: the
                        // next accept may well work; not in a tight loop, though.
                        debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let (acceptor, tx, metrics, throttle) = (
                acceptor.clone(),
                tx.clone(),
                Arc::clone(&metrics),
                Arc::clone(&throttle),
            );
            tokio::spawn(async move {
                let _slot = slot;
                let result = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                    Ok(r) => r,
                    Err(_) => Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "no TLS handshake within {}",
                            humantime::format_duration(timeout)
                        ),
                    )),
                };
                match result {
                    Ok(tls) => {
                        // The server is gone when this fails: nothing left to serve.
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Err(e) => failed(&metrics, &throttle, peer, &e),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Counts a failed handshake, and logs it unless `throttle` says it was logged recently.
fn failed(metrics: &Metrics, throttle: &Throttle, peer: SocketAddr, e: &io::Error) {
    let why = Failure::of(e);
    metrics.tls_handshake_failed(why.label());
    if let Some(unlogged) = throttle.note(peer.ip(), why, Instant::now()) {
        warn!(
            peer = %peer,
            reason = why.label(),
            error = %e,
            not_logged_since_last = unlogged,
            "refused a connection: TLS handshake failed ({}); logged at most once a minute per address",
            why.hint()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_minute_per_address_with_the_count_of_those_not_logged() {
        let t = Throttle::default();
        let (a, b): (IpAddr, IpAddr) = (
            "198.18.0.1".parse().expect("ip"),
            "198.18.0.2".parse().expect("ip"),
        );
        let start = Instant::now();
        let why = Failure::NotTls;
        assert_eq!(t.note(a, why, start), Some(0), "the first is logged");
        for s in 1..=30 {
            assert_eq!(t.note(a, why, start + Duration::from_secs(s)), None);
        }
        assert_eq!(
            t.note(b, why, start),
            Some(0),
            "another address has its own"
        );
        assert_eq!(
            t.note(a, Failure::UntrustedServer, start + Duration::from_secs(1)),
            Some(0),
            "another kind of failure too"
        );
        assert_eq!(
            t.note(a, why, start + LOG_EVERY),
            Some(30),
            "a minute on: logged, with the 30 not logged meanwhile"
        );
        assert_eq!(
            t.note(a, why, start + LOG_EVERY + Duration::from_secs(1)),
            None
        );
    }

    #[test]
    fn many_addresses_do_not_grow_the_throttle_without_bound() {
        let t = Throttle::default();
        let start = Instant::now();
        for i in 0..(MAX_PEERS as u32 + 10) {
            t.note(IpAddr::from(i.to_be_bytes()), Failure::Other, start);
        }
        let n = t.peers.lock().expect("lock").len();
        assert_eq!(n, MAX_PEERS);
        // A minute later, the old ones make room.
        assert_eq!(
            t.note(
                IpAddr::from([10, 0, 0, 1]),
                Failure::Other,
                start + LOG_EVERY
            ),
            Some(0)
        );
        assert_eq!(t.peers.lock().expect("lock").len(), 1);
    }

    #[test]
    fn failures_are_classified_by_the_rustls_error() {
        let tls = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e);
        assert_eq!(
            Failure::of(&tls(rustls::Error::AlertReceived(
                rustls::AlertDescription::UnknownCA
            ))),
            Failure::UntrustedServer
        );
        assert_eq!(
            Failure::of(&tls(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer
            ))),
            Failure::BadClientCertificate
        );
        assert_eq!(
            Failure::of(&tls(rustls::Error::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType
            ))),
            Failure::NotTls
        );
        assert_eq!(
            Failure::of(&io::Error::new(io::ErrorKind::TimedOut, "slow")),
            Failure::Timeout
        );
        assert_eq!(
            Failure::of(&io::Error::from(io::ErrorKind::ConnectionReset)),
            Failure::Other
        );
    }
}
