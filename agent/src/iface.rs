//! The host's network interfaces as the agent sees them: name, index, MAC, IPv4 subnets and
//! state. This is what the scope module matches configured CIDRs against and what the ARP
//! sweep sends from. Listing goes through `pnet` on Unix; Windows has no backend yet.

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

/// Lists this host's interfaces. Windows has no backend yet (pnet needs Npcap there).
#[cfg(not(unix))]
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
}
