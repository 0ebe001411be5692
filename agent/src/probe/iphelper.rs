//! Windows discovery without a capture driver (Npcap's free licence forbids redistributing it):
//! the IP Helper API resolves neighbours (ARP), sends ICMP echoes, and lists adapters and
//! routes. This file turns what the API returns into the agent's own types and decisions, with
//! no I/O and on every platform, so it is unit-tested on Linux; `iphelper/sys.rs` (Windows
//! only, the one place with `unsafe`) makes the calls.
//!
//! - Interfaces: `GetAdaptersAddresses` -> [`Interface`] (the adapter's friendly name, e.g.
//!   `Ethernet`, is what `interface = ...` and `--scope-interface` name).
//! - Routes: `GetIpForwardTable2` -> [`Route`], so routed scopes are planned as on Linux.
//! - ARP: `ResolveIpNetEntry2` flushes the neighbour entry and resolves it afresh (so the
//!   answer is first-hand, not the OS's cache); a blocking call per address, swept through
//!   the paced, bounded pool of `probe/pool.rs` ([`arp_sweep`]).
//! - ICMP: `IcmpSendEcho2`, blocking, behind the same `Echoer` seam as surge-ping on Unix
//!   (`probe/icmp/windows.rs`), so pacing, rounds and reply checks are the same code.

#[cfg(windows)]
pub(crate) mod sys;

use std::{net::Ipv4Addr, time::Duration};

use ipnet::Ipv4Net;

use crate::iface::{Interface, Route};

/// `IF_TYPE_SOFTWARE_LOOPBACK`.
pub const IF_TYPE_SOFTWARE_LOOPBACK: u32 = 24;

// Win32 error codes the conversions tell apart.
const NO_ERROR: u32 = 0;
const ERROR_ACCESS_DENIED: u32 = 5;
const ERROR_GEN_FAILURE: u32 = 31;
const ERROR_BAD_NET_NAME: u32 = 67;
const ERROR_NOT_FOUND: u32 = 1168;
const ERROR_NETWORK_UNREACHABLE: u32 = 1231;
const ERROR_HOST_UNREACHABLE: u32 = 1232;
// IP_STATUS codes of IcmpSendEcho2.
const IP_SUCCESS: u32 = 0;
const IP_DEST_NET_UNREACHABLE: u32 = 11002;
const IP_DEST_PROT_UNREACHABLE: u32 = 11004;
const IP_DEST_PORT_UNREACHABLE: u32 = 11005;
const IP_REQ_TIMED_OUT: u32 = 11010;
const IP_TTL_EXPIRED_TRANSIT: u32 = 11013;
const IP_TTL_EXPIRED_REASSEM: u32 = 11014;
const IP_DEST_HOST_UNREACHABLE: u32 = 11003;

/// One adapter as `GetAdaptersAddresses` describes it, in plain Rust types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawAdapter {
    pub friendly_name: String,
    /// The IPv4 interface index (`IfIndex`).
    pub if_index: u32,
    /// `PhysicalAddress[..PhysicalAddressLength]`.
    pub physical: Vec<u8>,
    /// `OperStatus == IfOperStatusUp`.
    pub oper_up: bool,
    pub if_type: u32,
    /// Every IPv4 unicast address with its `OnLinkPrefixLength`.
    pub ipv4: Vec<(Ipv4Addr, u8)>,
}

/// An adapter as the scope planner and the sweeps see it. Only an Ethernet-sized hardware
/// address counts as a MAC (tunnels report none or longer ones), as on Linux.
pub fn interface(raw: RawAdapter) -> Interface {
    let mac = <[u8; 6]>::try_from(raw.physical.as_slice())
        .ok()
        .filter(|m| *m != [0; 6]);
    Interface {
        name: raw.friendly_name,
        index: raw.if_index,
        mac,
        ipv4: raw
            .ipv4
            .iter()
            .filter_map(|&(addr, prefix)| Ipv4Net::new(addr, prefix).ok())
            .collect(),
        is_up: raw.oper_up,
        is_loopback: raw.if_type == IF_TYPE_SOFTWARE_LOOPBACK,
    }
}

/// One row of `GetIpForwardTable2` (IPv4), in plain Rust types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawRoute {
    pub destination: Ipv4Addr,
    pub prefix_len: u8,
    /// 0.0.0.0 for an on-link route.
    pub next_hop: Ipv4Addr,
    pub if_index: u32,
}

/// Routes named by interface, as `scope::plan` matches them; rows of unknown interfaces and
/// invalid prefixes are left out.
pub fn routes(raw: &[RawRoute], interfaces: &[Interface]) -> Vec<Route> {
    raw.iter()
        .filter_map(|r| {
            let iface = interfaces.iter().find(|i| i.index == r.if_index)?;
            Some(Route {
                destination: Ipv4Net::new(r.destination, r.prefix_len).ok()?.trunc(),
                gateway: Some(r.next_hop).filter(|g| !g.is_unspecified()),
                interface: iface.name.clone(),
            })
        })
        .collect()
}

/// What one neighbour resolution said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Neighbour {
    Mac([u8; 6]),
    /// Nobody answered.
    Silent,
    /// Only an administrator may resolve neighbours.
    Denied,
    Failed(String),
}

/// Reads `ResolveIpNetEntry2`'s result: its return code and the row's physical address.
pub fn neighbour(code: u32, physical: &[u8], len: u32) -> Neighbour {
    match code {
        NO_ERROR => {
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            match physical.get(..len).map(<[u8; 6]>::try_from) {
                // An all-zero or group address is no host's (an incomplete entry, a
                // multicast mapping).
                Some(Ok(mac)) if mac != [0; 6] && mac[0] & 1 == 0 => Neighbour::Mac(mac),
                _ => Neighbour::Silent,
            }
        }
        ERROR_BAD_NET_NAME
        | ERROR_GEN_FAILURE
        | ERROR_NOT_FOUND
        | ERROR_NETWORK_UNREACHABLE
        | ERROR_HOST_UNREACHABLE => Neighbour::Silent,
        ERROR_ACCESS_DENIED => Neighbour::Denied,
        other => Neighbour::Failed(format!(
            "ResolveIpNetEntry2 failed: {}",
            std::io::Error::from_raw_os_error(i32::try_from(other).unwrap_or(i32::MAX))
        )),
    }
}

/// What one ICMP echo said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Echo {
    /// A packet came back (`IcmpSendEcho2` returned a reply): an echo reply, or an ICMP error
    /// (`icmp_type` 3 unreachable, 11 time exceeded) from `source` about the target.
    Packet {
        source: Ipv4Addr,
        icmp_type: u8,
        rtt: Duration,
    },
    Timeout,
    /// The request could not be sent (`last_error` is the OS error).
    SendFailed(u32),
}

/// Reads `IcmpSendEcho2`'s result: the number of replies it returned, `GetLastError()` when
/// that is 0, and the first reply's `Status`, `Address` and `RoundTripTime` (ms).
pub fn echo(replies: u32, last_error: u32, status: u32, address: [u8; 4], rtt_ms: u32) -> Echo {
    if replies == 0 {
        return match last_error {
            IP_REQ_TIMED_OUT => Echo::Timeout,
            e => Echo::SendFailed(e),
        };
    }
    let icmp_type = match status {
        IP_SUCCESS => 0,
        IP_REQ_TIMED_OUT => return Echo::Timeout,
        IP_TTL_EXPIRED_TRANSIT | IP_TTL_EXPIRED_REASSEM => 11,
        IP_DEST_NET_UNREACHABLE
        | IP_DEST_HOST_UNREACHABLE
        | IP_DEST_PROT_UNREACHABLE
        | IP_DEST_PORT_UNREACHABLE => 3,
        // Any other status is some ICMP error about the target: never a reply.
        _ => 3,
    };
    Echo::Packet {
        source: Ipv4Addr::from(address),
        icmp_type,
        rtt: Duration::from_millis(u64::from(rtt_ms)),
    }
}

#[cfg(windows)]
pub use self::windows::{WinArpError, arp_sweep};

#[cfg(windows)]
mod windows {
    //! The Windows ARP sweep: `ResolveIpNetEntry2` per address through the paced, bounded
    //! pool.

    use std::{net::Ipv4Addr, sync::Arc, time::Duration};

    use tokio_util::sync::CancellationToken;

    use super::{Neighbour, neighbour, sys};
    use crate::{
        discovery::ArpFound,
        iface::Interface,
        probe::pool::{self, Outcome, PoolConfig},
    };

    /// At most this many resolutions at once: each holds a blocking thread for up to the OS's
    /// resolution time (3 solicitations 1 s apart by default) when the address is silent, so
    /// a /24 of mostly silent addresses takes about 6 s, and the agent at most this many
    /// threads.
    pub const MAX_IN_FLIGHT: usize = 128;
    /// How long one resolution is waited for: beyond the OS's own 3 s.
    pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
    const DENIED: &str = "resolving neighbours (ResolveIpNetEntry2) needs an administrator: \
                          run census-agent as Administrator or as the installed service";

    /// Why a Windows ARP sweep failed.
    #[derive(Debug, thiserror::Error)]
    pub enum WinArpError {
        #[error("{DENIED}")]
        PermissionDenied,
        #[error("ARP sweep of {interface}: {message}")]
        Failed { interface: String, message: String },
    }

    /// Resolves every target on `iface` (each must be on-link there; the planner made sure):
    /// `rate_pps` resolutions started per second, `retries` more rounds for silent ones.
    pub async fn arp_sweep(
        iface: &Interface,
        targets: &[Ipv4Addr],
        rate_pps: u32,
        retries: u32,
        cancel: &CancellationToken,
    ) -> Result<ArpFound, WinArpError> {
        let if_index = iface.index;
        let jobs: Vec<(Ipv4Addr, Option<Ipv4Addr>)> = targets
            .iter()
            .map(|&t| (t, iface.ipv4_on_link(t).map(|n| n.addr())))
            .collect();
        let probe = Arc::new(move |&(target, source): &(Ipv4Addr, Option<Ipv4Addr>)| {
            let (code, physical, len) = sys::resolve_neighbour(if_index, target, source);
            match neighbour(code, &physical, len) {
                Neighbour::Mac(mac) => Outcome::Found(mac),
                Neighbour::Silent => Outcome::Silent,
                Neighbour::Denied => Outcome::Failed(DENIED.to_owned()),
                Neighbour::Failed(why) => Outcome::Failed(why),
            }
        });
        let cfg = PoolConfig {
            rate_pps,
            concurrency: MAX_IN_FLIGHT,
            timeout: RESOLVE_TIMEOUT,
            retries,
        };
        let r = pool::sweep(jobs.clone(), &cfg, probe, cancel).await;
        match r.first_failure.as_deref() {
            Some(DENIED) => return Err(WinArpError::PermissionDenied),
            // Every call failed: the sweep found nothing it could trust, say why.
            Some(why) if r.found.is_empty() && r.failures >= r.calls => {
                return Err(WinArpError::Failed {
                    interface: iface.name.clone(),
                    message: why.to_owned(),
                });
            }
            _ => {}
        }
        Ok(ArpFound {
            interface: iface.name.clone(),
            probed: r.probed,
            requests_sent: r.calls,
            checks_sent: 0,
            peak_rate_pps: rate_pps,
            replies: r
                .found
                .into_iter()
                .filter_map(|(i, mac, at)| jobs.get(i).map(|(ip, _)| (*ip, mac, at)))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter() -> RawAdapter {
        RawAdapter {
            friendly_name: "Ethernet".into(),
            if_index: 7,
            physical: vec![0x00, 0x16, 0x3e, 0, 0, 1],
            oper_up: true,
            if_type: 6,
            ipv4: vec![(Ipv4Addr::new(198, 18, 0, 2), 24)],
        }
    }

    #[test]
    fn an_adapter_becomes_an_interface() {
        let i = interface(adapter());
        assert_eq!(i.name, "Ethernet");
        assert_eq!(i.index, 7);
        assert_eq!(i.mac, Some([0x00, 0x16, 0x3e, 0, 0, 1]));
        assert_eq!(i.ipv4, ["198.18.0.2/24".parse::<Ipv4Net>().expect("net")]);
        assert!(i.is_up && !i.is_loopback);
        assert_eq!(
            i.ipv4_on_link(Ipv4Addr::new(198, 18, 0, 77))
                .map(|n| n.addr()),
            Some(Ipv4Addr::new(198, 18, 0, 2))
        );
    }

    #[test]
    fn loopback_tunnels_and_bad_prefixes() {
        let lo = interface(RawAdapter {
            friendly_name: "Loopback Pseudo-Interface 1".into(),
            physical: Vec::new(),
            if_type: IF_TYPE_SOFTWARE_LOOPBACK,
            ipv4: vec![(Ipv4Addr::LOCALHOST, 8)],
            ..adapter()
        });
        assert!(lo.is_loopback);
        assert_eq!(lo.mac, None);
        // A tunnel's 8-byte (or all-zero) hardware address is no MAC; a prefix over 32 is
        // dropped, not a panic.
        let tunnel = interface(RawAdapter {
            physical: vec![0; 8],
            oper_up: false,
            ipv4: vec![(Ipv4Addr::new(198, 18, 9, 1), 33)],
            ..adapter()
        });
        assert_eq!(tunnel.mac, None);
        assert!(tunnel.ipv4.is_empty());
        assert!(!tunnel.is_up);
    }

    #[test]
    fn routes_are_named_by_interface() {
        let ifaces = vec![interface(adapter())];
        let raw = [
            RawRoute {
                destination: Ipv4Addr::UNSPECIFIED,
                prefix_len: 0,
                next_hop: Ipv4Addr::new(198, 18, 0, 1),
                if_index: 7,
            },
            RawRoute {
                destination: Ipv4Addr::new(198, 18, 0, 9),
                prefix_len: 24,
                next_hop: Ipv4Addr::UNSPECIFIED,
                if_index: 7,
            },
            // An interface the adapter list does not know (it left meanwhile).
            RawRoute {
                destination: Ipv4Addr::new(198, 19, 0, 0),
                prefix_len: 16,
                next_hop: Ipv4Addr::UNSPECIFIED,
                if_index: 99,
            },
        ];
        let routes = routes(&raw, &ifaces);
        assert_eq!(routes.len(), 2);
        assert!(routes[0].is_default());
        assert_eq!(routes[0].gateway, Some(Ipv4Addr::new(198, 18, 0, 1)));
        assert_eq!(routes[0].interface, "Ethernet");
        assert_eq!(routes[1].destination.to_string(), "198.18.0.0/24");
        assert_eq!(routes[1].gateway, None);
    }

    #[test]
    fn neighbour_results() {
        let mut physical = [0u8; 32];
        physical[..6].copy_from_slice(&[0x00, 0x16, 0x3e, 0, 0, 9]);
        assert_eq!(
            neighbour(0, &physical, 6),
            Neighbour::Mac([0x00, 0x16, 0x3e, 0, 0, 9])
        );
        // Success with no address, a zero or a group address: nobody we can count.
        assert_eq!(neighbour(0, &physical, 0), Neighbour::Silent);
        assert_eq!(neighbour(0, &[0; 32], 6), Neighbour::Silent);
        let mut group = physical;
        group[0] = 0x01;
        assert_eq!(neighbour(0, &group, 6), Neighbour::Silent);
        // A length past the buffer is not trusted.
        assert_eq!(neighbour(0, &physical, 64), Neighbour::Silent);
        for silent in [31, 67, 1168, 1231, 1232] {
            assert_eq!(
                neighbour(silent, &physical, 6),
                Neighbour::Silent,
                "{silent}"
            );
        }
        assert_eq!(neighbour(5, &physical, 6), Neighbour::Denied);
        assert!(matches!(neighbour(87, &physical, 6), Neighbour::Failed(_)));
    }

    #[test]
    fn echo_results() {
        let target = [198, 18, 1, 5];
        assert_eq!(
            echo(1, 0, 0, target, 3),
            Echo::Packet {
                source: Ipv4Addr::new(198, 18, 1, 5),
                icmp_type: 0,
                rtt: Duration::from_millis(3)
            }
        );
        // A router's "host unreachable" about the target is a packet, not a reply: the sweep
        // loop counts it as an error because its type is not 0.
        assert_eq!(
            echo(1, 0, IP_DEST_HOST_UNREACHABLE, [198, 18, 0, 1], 1),
            Echo::Packet {
                source: Ipv4Addr::new(198, 18, 0, 1),
                icmp_type: 3,
                rtt: Duration::from_millis(1)
            }
        );
        assert!(matches!(
            echo(1, 0, IP_TTL_EXPIRED_TRANSIT, target, 1),
            Echo::Packet { icmp_type: 11, .. }
        ));
        assert_eq!(echo(0, IP_REQ_TIMED_OUT, 0, [0; 4], 0), Echo::Timeout);
        assert_eq!(echo(1, 0, IP_REQ_TIMED_OUT, target, 0), Echo::Timeout);
        assert_eq!(echo(0, 1231, 0, [0; 4], 0), Echo::SendFailed(1231));
    }
}
