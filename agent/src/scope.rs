//! Turns configured CIDRs into per-interface target lists, and refuses what is unsafe or
//! impossible before a single packet leaves. I/O-free: the interfaces are an argument.
//!
//! A scope is swept by ARP through the interface it is on-link on: the scope must lie inside
//! one of that interface's IPv4 subnets. The agent's own addresses, the network and broadcast
//! addresses and every excluded CIDR are never probed.

use std::{collections::BTreeSet, fmt::Write as _, net::Ipv4Addr};

use ipnet::Ipv4Net;

use crate::iface::Interface;

/// Hard cap on the addresses one sweep probes, whatever the configuration says.
pub const MAX_TARGETS: usize = 1 << 20;

/// The addresses to probe through one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceTargets {
    pub interface: Interface,
    /// The scopes (as configured) this interface sweeps.
    pub scopes: Vec<Ipv4Net>,
    pub targets: Vec<Ipv4Addr>,
}

/// Why a set of scopes cannot be swept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("interface {name:?} does not exist (interfaces here: {known})")]
    NoSuchInterface { name: String, known: String },
    #[error("interface {0} is down: bring it up or choose another with --interface")]
    InterfaceDown(String),
    #[error(
        "scope {scope} is not on-link on {where_}: {subnets}; choose a scope inside one of them"
    )]
    NotOnLink {
        scope: Ipv4Net,
        where_: String,
        subnets: String,
    },
    #[error("the scopes hold {0} addresses, more than the agent's hard limit of {MAX_TARGETS}")]
    TooMany(usize),
    #[error("every address in the scopes is excluded or the agent's own: nothing to sweep")]
    Empty,
}

fn on_link_summary(ifaces: &[&Interface]) -> String {
    let mut out = String::new();
    for i in ifaces {
        for net in &i.ipv4 {
            if !out.is_empty() {
                out.push_str(", ");
            }
            let _ = write!(out, "{} {}", i.name, net.trunc());
        }
    }
    if out.is_empty() {
        out.push_str("no IPv4 subnets");
    }
    format!("on-link subnets are {out}")
}

/// Plans a sweep: which addresses go through which interface.
pub fn plan(
    scopes: &[Ipv4Net],
    exclude: &[Ipv4Net],
    interface: Option<&str>,
    ifaces: &[Interface],
) -> Result<Vec<InterfaceTargets>, ScopeError> {
    let usable: Vec<&Interface> = match interface {
        Some(name) => {
            let i = ifaces.iter().find(|i| i.name == name).ok_or_else(|| {
                ScopeError::NoSuchInterface {
                    name: name.to_owned(),
                    known: ifaces
                        .iter()
                        .map(|i| i.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                }
            })?;
            if !i.is_up {
                return Err(ScopeError::InterfaceDown(i.name.clone()));
            }
            vec![i]
        }
        None => ifaces
            .iter()
            .filter(|i| i.is_up && !i.is_loopback && i.mac.is_some())
            .collect(),
    };
    let own: BTreeSet<Ipv4Addr> = ifaces
        .iter()
        .flat_map(|i| i.ipv4.iter().map(|n| n.addr()))
        .collect();
    let mut plans: Vec<InterfaceTargets> = Vec::new();
    let mut total = 0usize;
    for scope in scopes {
        let found = usable.iter().find_map(|i| {
            i.ipv4
                .iter()
                .find(|net| net.trunc().contains(scope))
                .map(|net| (*i, *net))
        });
        let Some((iface, subnet)) = found else {
            return Err(ScopeError::NotOnLink {
                scope: *scope,
                where_: interface
                    .map_or_else(|| "any interface".to_owned(), |n| format!("interface {n}")),
                subnets: on_link_summary(&usable),
            });
        };
        let subnet = subnet.trunc();
        let size = 1usize << (32 - u32::from(scope.prefix_len()));
        total = total.saturating_add(size);
        if total > MAX_TARGETS {
            return Err(ScopeError::TooMany(total));
        }
        let targets = scope.hosts().filter(|ip| {
            // The subnet's network and broadcast addresses are not hosts, even when the scope
            // is a /32 or a slice of the subnet.
            let edge =
                subnet.prefix_len() < 31 && (*ip == subnet.network() || *ip == subnet.broadcast());
            !edge && !own.contains(ip) && !exclude.iter().any(|x| x.contains(ip))
        });
        match plans.iter_mut().find(|p| p.interface.name == iface.name) {
            Some(p) => {
                p.scopes.push(*scope);
                p.targets.extend(targets);
            }
            None => plans.push(InterfaceTargets {
                interface: iface.clone(),
                scopes: vec![*scope],
                targets: targets.collect(),
            }),
        }
    }
    for p in &mut plans {
        p.targets.sort_unstable();
        p.targets.dedup();
    }
    plans.retain(|p| !p.targets.is_empty());
    if plans.is_empty() {
        return Err(ScopeError::Empty);
    }
    Ok(plans)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, cidr: &str, up: bool) -> Interface {
        Interface {
            name: name.into(),
            index: 2,
            mac: Some([0, 0x16, 0x3e, 0, 0, 1]),
            ipv4: vec![cidr.parse().expect("cidr")],
            is_up: up,
            is_loopback: false,
        }
    }

    fn nets(s: &str) -> Vec<Ipv4Net> {
        crate::config::parse_cidrs(s).expect("cidrs")
    }

    #[test]
    fn a_24_sweeps_every_host_but_our_own() {
        let ifaces = [
            iface("eth0", "198.18.0.2/24", true),
            iface("up0", "198.19.255.2/24", true),
        ];
        let plan = plan(&nets("198.18.0.0/24"), &[], None, &ifaces).expect("plan");
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].interface.name, "eth0");
        assert_eq!(plan[0].targets.len(), 253);
        assert!(!plan[0].targets.contains(&"198.18.0.2".parse().expect("ip")));
        assert!(
            !plan[0]
                .targets
                .contains(&"198.18.0.255".parse().expect("ip"))
        );
    }

    #[test]
    fn exclusions_and_slices() {
        let ifaces = [iface("eth0", "198.18.0.2/24", true)];
        let plan = plan(
            &nets("198.18.0.0/28,198.18.0.255/32"),
            &nets("198.18.0.8/29"),
            None,
            &ifaces,
        )
        .expect("plan");
        let t: Vec<String> = plan[0].targets.iter().map(|i| i.to_string()).collect();
        assert_eq!(
            t,
            [
                "198.18.0.1",
                "198.18.0.3",
                "198.18.0.4",
                "198.18.0.5",
                "198.18.0.6",
                "198.18.0.7"
            ]
        );
    }

    #[test]
    fn off_link_scopes_and_bad_interfaces_are_refused() {
        let ifaces = [
            iface("eth0", "198.18.0.2/24", true),
            iface("eth1", "198.18.1.2/24", false),
        ];
        let err = plan(&nets("198.18.5.0/24"), &[], None, &ifaces).expect_err("off link");
        assert!(err.to_string().contains("eth0 198.18.0.0/24"), "{err}");
        // A scope only on-link on a down interface is not on-link.
        assert!(matches!(
            plan(&nets("198.18.1.0/24"), &[], None, &ifaces),
            Err(ScopeError::NotOnLink { .. })
        ));
        assert!(matches!(
            plan(&nets("198.18.0.0/24"), &[], Some("eth9"), &ifaces),
            Err(ScopeError::NoSuchInterface { .. })
        ));
        assert!(matches!(
            plan(&nets("198.18.1.0/24"), &[], Some("eth1"), &ifaces),
            Err(ScopeError::InterfaceDown(_))
        ));
        // Wider than the interface's subnet: not on-link as a whole.
        assert!(matches!(
            plan(&nets("198.18.0.0/23"), &[], None, &ifaces),
            Err(ScopeError::NotOnLink { .. })
        ));
        assert!(matches!(
            plan(&nets("198.18.0.2/32"), &[], None, &ifaces),
            Err(ScopeError::Empty)
        ));
    }
}
