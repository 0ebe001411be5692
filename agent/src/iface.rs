//! The host's network interfaces as the agent sees them: name, index, MAC, IPv4 subnets and
//! state. This is what the scope module matches configured CIDRs against and what the ARP
//! sweep sends from. Listing goes through `pnet` on Unix and the IP Helper API on Windows
//! (`probe/iphelper.rs`); routes come from `/proc/net/route` on Linux and the IP Helper API on
//! Windows.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// One network interface of this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    /// The OS name (`eth0`, `enp3s0`, `br0`).
    pub name: String,
    /// The OS interface index; 0 if the interface vanished while it was being listed.
    pub index: u32,
    /// The hardware address, `None` when the interface has none (or an all-zero one, as
    /// loopback and tunnels report): such an interface cannot be swept with ARP.
    pub mac: Option<[u8; 6]>,
    /// Every IPv4 address on the interface with its prefix length (host bits kept, so
    /// `addr()` is this host's address and `network()` the subnet).
    pub ipv4: Vec<Ipv4Net>,
    /// Administratively up (`IFF_UP`).
    pub is_up: bool,
    /// A loopback interface (`IFF_LOOPBACK`); never swept.
    pub is_loopback: bool,
}

impl Interface {
    /// This interface's address on the subnet that contains `target`, i.e. the source
    /// address to use when talking to `target` on-link. `None` if `target` is not on-link.
    pub fn ipv4_on_link(&self, target: Ipv4Addr) -> Option<Ipv4Net> {
        self.ipv4.iter().copied().find(|net| net.contains(&target))
    }
}

/// Why the interfaces could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    /// This platform has no interface listing backend.
    #[error("listing network interfaces is not supported on this platform yet")]
    Unsupported,
    /// The OS refused to list them.
    #[error("{0}")]
    Os(String),
}

/// Lists this host's interfaces, in the order the OS reports them.
#[cfg(unix)]
pub fn list() -> Result<Vec<Interface>, IfaceError> {
    // pnet's `interfaces()` returns an empty list (rather than an error) when getifaddrs
    // fails; an empty list is also what a caller has to handle for a host with no
    // interfaces, so we pass it on as is.
    Ok(pnet::datalink::interfaces()
        .into_iter()
        .map(from_pnet)
        .collect())
}

/// Lists this host's interfaces through the IP Helper API (pnet would need Npcap there).
#[cfg(windows)]
pub fn list() -> Result<Vec<Interface>, IfaceError> {
    use crate::probe::iphelper;
    iphelper::sys::adapters()
        .map(|all| all.into_iter().map(iphelper::interface).collect())
        .map_err(|e| IfaceError::Os(format!("GetAdaptersAddresses: {e}")))
}

/// Other platforms have no backend.
#[cfg(not(any(unix, windows)))]
pub fn list() -> Result<Vec<Interface>, IfaceError> {
    Err(IfaceError::Unsupported)
}

#[cfg(unix)]
fn from_pnet(ni: pnet::datalink::NetworkInterface) -> Interface {
    let mac = ni.mac.map(|m| m.octets()).filter(|m| *m != [0u8; 6]);
    let ipv4 = ni
        .ips
        .iter()
        .filter_map(|net| match net {
            pnet::ipnetwork::IpNetwork::V4(v4) => Ipv4Net::new(v4.ip(), v4.prefix()).ok(),
            pnet::ipnetwork::IpNetwork::V6(_) => None,
        })
        .collect();
    Interface {
        is_up: ni.is_up(),
        is_loopback: ni.is_loopback(),
        name: ni.name,
        index: ni.index,
        mac,
        ipv4,
    }
}

// === routes ===

/// One IPv4 route of this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The destination; 0.0.0.0/0 for the default route.
    pub destination: Ipv4Net,
    /// The next hop; `None` for a directly connected destination.
    pub gateway: Option<Ipv4Addr>,
    pub interface: String,
}

impl Route {
    pub fn is_default(&self) -> bool {
        self.destination.prefix_len() == 0
    }
}

/// This host's IPv4 routes (the main table), from `/proc/net/route` on Linux and
/// `GetIpForwardTable2` on Windows. Other platforms have no backend yet: no routes, so only
/// on-link scopes can be planned there. A table that cannot be read is no routes.
pub fn routes() -> Vec<Route> {
    #[cfg(target_os = "linux")]
    {
        std::fs::read_to_string("/proc/net/route")
            .map(|text| parse_proc_route(&text))
            .unwrap_or_default()
    }
    #[cfg(windows)]
    {
        use crate::probe::iphelper;
        match iphelper::sys::routes() {
            Ok(raw) => iphelper::routes(&raw, &list().unwrap_or_default()),
            Err(_) => Vec::new(),
        }
    }
    #[cfg(not(any(target_os = "linux", windows)))]
    {
        Vec::new()
    }
}

/// Parses `/proc/net/route`: a header, then one route per line with hex little-endian
/// addresses. Lines that do not parse are skipped; only routes that are up (flag 0x1) count.
pub fn parse_proc_route(text: &str) -> Vec<Route> {
    const RTF_UP: u32 = 0x1;
    const RTF_GATEWAY: u32 = 0x2;
    let hex_addr = |s: &str| {
        u32::from_str_radix(s, 16)
            .ok()
            .map(|v| Ipv4Addr::from(v.swap_bytes()))
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (iface, dest, gw, flags, mask) =
                (f.first()?, f.get(1)?, f.get(2)?, f.get(3)?, f.get(7)?);
            let flags = u32::from_str_radix(flags, 16).ok()?;
            if flags & RTF_UP == 0 {
                return None;
            }
            let mask = u32::from(hex_addr(mask)?);
            if mask.leading_ones() + mask.trailing_zeros() != 32 {
                return None;
            }
            let prefix = u8::try_from(mask.leading_ones()).ok()?;
            let destination = Ipv4Net::new(hex_addr(dest)?, prefix).ok()?.trunc();
            let gateway = hex_addr(gw).filter(|g| flags & RTF_GATEWAY != 0 && !g.is_unspecified());
            Some(Route {
                destination,
                gateway,
                interface: (*iface).to_owned(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_link_source_is_the_containing_subnet() {
        let iface = Interface {
            name: "eth0".into(),
            index: 2,
            mac: Some([2, 0, 0, 0, 0, 1]),
            ipv4: vec![
                "198.18.7.1/24".parse().expect("literal"),
                "198.19.0.9/16".parse().expect("literal"),
            ],
            is_up: true,
            is_loopback: false,
        };
        let src = iface
            .ipv4_on_link(Ipv4Addr::new(198, 19, 4, 4))
            .expect("on link");
        assert_eq!(src.addr(), Ipv4Addr::new(198, 19, 0, 9));
        assert_eq!(iface.ipv4_on_link(Ipv4Addr::new(198, 20, 0, 1)), None);
    }

    #[cfg(unix)]
    #[test]
    fn lists_loopback_without_a_mac() {
        let all = list().expect("unix lists interfaces");
        let lo = all
            .iter()
            .find(|i| i.is_loopback)
            .expect("a loopback interface");
        assert_eq!(lo.mac, None, "loopback's all-zero MAC is reported as none");
        assert!(lo.index > 0);
    }

    #[test]
    fn proc_net_route_parses() {
        let text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
eth0\t00000000\t010012C6\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
eth0\t000012C6\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
eth0\t000112C6\t010012C6\t0003\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
eth9\t000212C6\t00000000\t0000\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
garbage line\n";
        let routes = parse_proc_route(text);
        assert_eq!(routes.len(), 3, "{routes:?}");
        assert!(routes[0].is_default());
        assert_eq!(routes[0].gateway, Some(Ipv4Addr::new(198, 18, 0, 1)));
        assert_eq!(routes[1].destination.to_string(), "198.18.0.0/24");
        assert_eq!(routes[1].gateway, None);
        assert_eq!(routes[2].destination.to_string(), "198.18.1.0/24");
        assert_eq!(routes[2].gateway, Some(Ipv4Addr::new(198, 18, 0, 1)));
    }
}
