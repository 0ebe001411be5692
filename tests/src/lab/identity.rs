//! What identity resolution is tested against: devices whose identity is not one MAC at one
//! address. A multi-homed host (two NICs on one LAN), a host that changes its address or its
//! MAC between sweeps, randomized (locally administered) MACs, a VRRP virtual address on a
//! router (a macvlan with the VRRP MAC), and a router that answers ARP for the subnet behind it
//! (proxy ARP).
//!
//! Linux answers ARP for any of its addresses on any of its interfaces unless told otherwise
//! (`arp_ignore=0`), which would make a multi-homed host or a router with a virtual address
//! answer one address with two MACs. Each feature here sets the per-namespace sysctls that make
//! the wire look like the real device's: every address answered by the one interface that holds
//! it.

use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};

use super::cmd::{IP_TIMEOUT, netns_exec, run_ok};
use super::{
    Host, HostSpec, Ipv4Net, Lab, Router, Site, addr_line, check_addr, check_host_addr, check_mac,
    leaf_lines, mac_string, plug_lines,
};

/// The first octet's low nibble of the locally administered unicast MACs the lab hands out
/// (x2, x6, xA, xE: the four an operating system picks from when it randomizes a MAC).
const LOCAL_LOW_NIBBLES: [u8; 4] = [0x2, 0x6, 0xa, 0xe];

/// One interface of a [`Host`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInterface {
    /// `eth0` or `eth1`.
    pub name: String,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub mac: [u8; 6],
}

/// The VRRP (IPv4) virtual router MAC of `vrid`: 00:00:5e:00:01:<vrid> (RFC 5798 §7.3).
pub fn vrrp_mac(vrid: u8) -> [u8; 6] {
    [0x00, 0x00, 0x5e, 0x00, 0x01, vrid]
}

/// Whether `mac` is locally administered (the U/L bit), as randomized MACs are.
pub fn is_locally_administered(mac: [u8; 6]) -> bool {
    mac[0] & 0x02 != 0
}

// === impl Lab ===

impl Lab {
    /// A lab-unique locally administered unicast MAC, like the random MAC a phone or laptop
    /// uses on a Wi-Fi network: the first octet ends in 2, 6, A or E.
    pub fn randomized_mac(&self) -> Result<[u8; 6]> {
        let n = {
            let mut st = self.state();
            st.next_local_mac += 1;
            st.next_local_mac
        };
        let [top, a, b, c] = n.to_be_bytes();
        if top != 0 {
            bail!("the lab ran out of randomized MAC addresses");
        }
        // Vary the first octet too, from the same counter, so tests see every kind.
        let low = LOCAL_LOW_NIBBLES[usize::from(c % 4)];
        let high = (c / 4) & 0x0f;
        Ok([high << 4 | low, 0x5a, 0x1d, a, b, c])
    }

    /// Runs `key=value` sysctls (keys like `net.ipv4.conf.all.arp_ignore`; sysctls under
    /// /proc/sys/net are per namespace) in `ns`, in one shell.
    pub(super) fn sysctls(&self, ns: &str, settings: &[(&str, &str)]) -> Result<()> {
        let mut script = String::from("set -e\n");
        for (key, value) in settings {
            if !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_')
                || !value.chars().all(|c| c.is_ascii_digit())
            {
                bail!("not a sysctl the lab sets: {key}={value}");
            }
            script.push_str(&format!(
                "echo {value} > /proc/sys/{}\n",
                key.replace('.', "/")
            ));
        }
        let mut cmd = netns_exec(&self.ip, ns, "/bin/sh");
        cmd.arg("-c").arg(script);
        run_ok(cmd, None, IP_TIMEOUT)
            .map(drop)
            .with_context(|| format!("setting sysctls in {ns}"))
    }

    /// A host with two NICs on one LAN: `eth0` from `a`, `eth1` from `b`.
    fn add_multihomed_on(&self, segment: usize, a: HostSpec, b: HostSpec) -> Result<Host<'_>> {
        let (subnet, gateway, switch_ns) = {
            let st = self.state();
            let seg = st.segments.get(segment).context("no such segment")?;
            (seg.subnet, seg.gateway, seg.switch_ns.clone())
        };
        check_host_addr(a.ip, subnet, "eth0 address")?;
        check_host_addr(b.ip, subnet, "eth1 address")?;
        if a.ip == b.ip {
            bail!("a multi-homed host needs two addresses, not {} twice", a.ip);
        }
        if a.answers_icmp != b.answers_icmp {
            bail!("ICMP echo is answered or ignored per host, not per interface");
        }
        let (ns, port_a, port_b, mac_a, mac_b) = {
            let mut st = self.state();
            let mac_a = match a.mac {
                Some(mac) => mac,
                None => Self::alloc_mac(&mut st)?,
            };
            let mac_b = match b.mac {
                Some(mac) => mac,
                None => Self::alloc_mac(&mut st)?,
            };
            let ns = Self::alloc_ns(&mut st, &self.prefix, "h");
            let seg = st.segments.get_mut(segment).context("no such segment")?;
            seg.next_port += 2;
            let (pa, pb) = (
                format!("p{}", seg.next_port - 1),
                format!("p{}", seg.next_port),
            );
            (ns, pa, pb, mac_a, mac_b)
        };
        check_mac(mac_a)?;
        check_mac(mac_b)?;
        if mac_a == mac_b {
            bail!(
                "a multi-homed host needs two MACs, not {}",
                mac_string(mac_a)
            );
        }
        self.create_namespaces(std::slice::from_ref(&ns))?;
        let mut plugs = plug_lines(&port_a, &ns, "eth0", mac_a);
        plugs.extend(plug_lines(&port_b, &ns, "eth1", mac_b));
        self.ip_batch(Some(&switch_ns), &plugs)?;
        // Before any address is up: each address is answered only on the interface that holds
        // it (arp_ignore=1), and ARP requests name the address of the interface they leave by
        // (arp_announce=2). Replies from eth1's address may still leave through eth0 (the first
        // route to the LAN), as on a real host with two NICs in one subnet; rp_filter is off in
        // a new namespace, so requests arriving on either NIC are accepted.
        let mut sysctls = vec![
            ("net.ipv4.conf.all.arp_ignore", "1"),
            ("net.ipv4.conf.all.arp_announce", "2"),
        ];
        if !a.answers_icmp {
            sysctls.push(("net.ipv4.icmp_echo_ignore_all", "1"));
        }
        self.sysctls(&ns, &sysctls)?;
        let mut lines = leaf_lines(a.ip, subnet.prefix_len(), gateway)?;
        lines.extend([
            "link set eth1 addrgenmode none".to_string(),
            addr_line(b.ip, subnet.prefix_len(), "eth1")?,
            "link set eth1 up".to_string(),
        ]);
        self.ip_batch(Some(&ns), &lines)?;
        let iface = |name: &str, ip, mac| HostInterface {
            name: name.into(),
            ip,
            prefix_len: subnet.prefix_len(),
            mac,
        };
        Ok(Host {
            lab: self,
            ns,
            segment,
            port: port_a,
            eth0: iface("eth0", a.ip, mac_a),
            eth1: Some(iface("eth1", b.ip, mac_b)),
        })
    }
}

// === impl Site ===

impl<'lab> Site<'lab> {
    /// One device with two NICs on this LAN, `eth0` from `eth0` and `eth1` from `eth1`, each
    /// answering ARP only for its own address. [`Host::run_snmpd`] serves both addresses from
    /// one `snmpd`, whose IF-MIB lists both MACs.
    pub fn add_multihomed_host(&self, eth0: HostSpec, eth1: HostSpec) -> Result<Host<'lab>> {
        self.lab.add_multihomed_on(self.lan(), eth0, eth1)
    }
}

// === impl Host ===

impl Host<'_> {
    /// Moves `eth0` to `ip` (same LAN, same prefix): its old address is gone, as after a new
    /// DHCP lease. Responders bound to the old address ([`Host::run_snmpd`],
    /// [`Host::run_mdns`]) stop answering: start them again.
    pub fn set_ip(&mut self, ip: Ipv4Addr) -> Result<()> {
        let (subnet, gateway) = {
            let st = self.lab.state();
            let seg = st.segments.get(self.segment).context("no such segment")?;
            (seg.subnet, seg.gateway)
        };
        check_host_addr(ip, subnet, "new host address")?;
        if self.eth1.as_ref().is_some_and(|i| i.ip == ip) {
            bail!("{ip} is already this host's eth1 address");
        }
        // Removing eth0's last address also removes the routes through it: put them back.
        let route = match gateway {
            Some(gw) => {
                check_addr(gw, "gateway")?;
                format!("route replace default via {gw} dev eth0")
            }
            None => "route replace 224.0.0.0/4 dev eth0".to_string(),
        };
        let lines = [
            "addr flush dev eth0".to_string(),
            addr_line(ip, subnet.prefix_len(), "eth0")?,
            route,
        ];
        self.lab.ip_batch(Some(&self.ns), &lines)?;
        self.eth0.ip = ip;
        Ok(())
    }

    /// Gives `eth0` a new MAC (a phone rotating its random MAC, a replaced NIC). The address
    /// stays; peers learn the new MAC at their next ARP.
    pub fn set_mac(&mut self, mac: [u8; 6]) -> Result<()> {
        check_mac(mac)?;
        if self.eth1.as_ref().is_some_and(|i| i.mac == mac) {
            bail!("{} is already this host's eth1 MAC", mac_string(mac));
        }
        self.lab.ip_batch(
            Some(&self.ns),
            &[format!("link set eth0 address {}", mac_string(mac))],
        )?;
        self.eth0.mac = mac;
        Ok(())
    }
}

// === impl Router ===

impl Router<'_> {
    /// The site LAN the router's `eth0` is on.
    pub fn lan_subnet(&self) -> Ipv4Net {
        self.lan_subnet
    }

    /// A VRRP virtual address, as the master router of virtual router `vrid` holds it: a
    /// macvlan `vrrp<vrid>` on `eth0` with MAC 00:00:5e:00:01:<vrid> and address `vip` on the
    /// LAN. ARP for `vip` is answered with the VRRP MAC (and only with it: `arp_ignore=1` keeps
    /// `eth0` from answering for an address it does not hold), and the router's `snmpd` lists
    /// the macvlan in its IF-MIB. Returns the virtual MAC.
    pub fn add_virtual_address(&self, vip: Ipv4Addr, vrid: u8) -> Result<[u8; 6]> {
        if vrid == 0 {
            bail!("VRRP virtual router ids are 1 to 255");
        }
        check_host_addr(vip, self.lan_subnet, "virtual address")?;
        if vip == self.lan_ip {
            bail!("the virtual address must differ from the router's own {vip}");
        }
        let mac = vrrp_mac(vrid);
        self.lab.sysctls(
            &self.ns,
            &[
                ("net.ipv4.conf.all.arp_ignore", "1"),
                ("net.ipv4.conf.all.arp_announce", "2"),
            ],
        )?;
        let dev = format!("vrrp{vrid}");
        // Private mode: the macvlan talks to the wire only, like a VRRP master's virtual MAC.
        let lines = [
            format!(
                "link add link eth0 name {dev} address {} type macvlan mode private",
                mac_string(mac)
            ),
            format!("link set {dev} addrgenmode none"),
            addr_line(vip, self.lan_subnet.prefix_len(), &dev)?,
            format!("link set {dev} up"),
        ];
        self.lab.ip_batch(Some(&self.ns), &lines)?;
        Ok(mac)
    }

    /// Turns proxy ARP on for the LAN leg: the router answers ARP on the LAN, with its own LAN
    /// MAC, for every address it routes out of another interface. That only matters for
    /// addresses the LAN takes for on-link ones: a routed subnet carved out of the LAN (see
    /// [`Site::add_router`]). Replies go out at once (`proxy_delay=0`) rather than after
    /// Linux's random delay of up to 0.8 s, whose queue (64 requests) would drop most of a
    /// fast sweep's.
    pub fn enable_proxy_arp(&self) -> Result<()> {
        self.lab.sysctls(
            &self.ns,
            &[
                ("net.ipv4.conf.eth0.proxy_arp", "1"),
                ("net.ipv4.neigh.eth0.proxy_delay", "0"),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vrrp_and_local_macs() {
        assert_eq!(mac_string(vrrp_mac(7)), "00:00:5e:00:01:07");
        assert!(!is_locally_administered(vrrp_mac(7)));
        assert!(is_locally_administered([0x02, 0, 0, 0, 0, 1]));
        assert!(is_locally_administered([0xfe, 0, 0, 0, 0, 1]));
        assert!(!is_locally_administered([0x00, 0x16, 0x3e, 0, 0, 1]));
    }
}
