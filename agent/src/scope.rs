//! Turns configured CIDRs into target lists, and refuses what is unsafe or impossible before a
//! single packet leaves. I/O-free: interfaces and routes are arguments.
//!
//! A scope inside an on-link subnet of an up interface is swept by ARP through that interface.
//! Any other scope must be covered by a route (a specific one, or the default route: other
//! VLANs of a client site are usually reached through the default gateway) and is swept by
//! ICMP. A scope that is neither is refused. The agent's own addresses, network and broadcast
//! addresses and every excluded CIDR are never probed.

use std::{collections::BTreeSet, fmt::Write as _, net::Ipv4Addr};

use ipnet::Ipv4Net;

use crate::iface::{Interface, Route};

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

/// Routed addresses to probe with ICMP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutedTargets {
    pub scope: Ipv4Net,
    /// The route that leads there.
    pub route: Route,
    pub targets: Vec<Ipv4Addr>,
}

/// Everything one sweep probes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepPlan {
    /// On-link targets, by interface (ARP).
    pub on_link: Vec<InterfaceTargets>,
    /// Routed targets (ICMP).
    pub routed: Vec<RoutedTargets>,
}

impl SweepPlan {
    /// Every address the plan probes.
    pub fn target_count(&self) -> usize {
        self.on_link.iter().map(|p| p.targets.len()).sum::<usize>()
            + self.routed.iter().map(|r| r.targets.len()).sum::<usize>()
    }
}

/// Why a set of scopes cannot be swept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("interface {name:?} does not exist (interfaces here: {known})")]
    NoSuchInterface { name: String, known: String },
    #[error("interface {0} is down: bring it up or choose another with --interface")]
    InterfaceDown(String),
    #[error(
        "scope {scope} is not on-link on {where_} and no route leads to it: {subnets}; choose a scope inside one of them or add a route"
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

/// The on-link IPv4 subnets of the named interfaces, as scopes (`--scope-interface eth0`).
/// Point-to-point /32 addresses have no subnet to sweep and are skipped.
pub fn interface_scopes(
    names: &[String],
    ifaces: &[Interface],
) -> Result<Vec<Ipv4Net>, ScopeError> {
    let mut out = Vec::new();
    for name in names {
        let i =
            ifaces
                .iter()
                .find(|i| &i.name == name)
                .ok_or_else(|| ScopeError::NoSuchInterface {
                    name: name.clone(),
                    known: ifaces
                        .iter()
                        .map(|i| i.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
        out.extend(
            i.ipv4
                .iter()
                .filter(|n| n.prefix_len() < 32)
                .map(Ipv4Net::trunc),
        );
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Plans a sweep: which addresses go through which interface, and which are routed.
pub fn plan(
    scopes: &[Ipv4Net],
    exclude: &[Ipv4Net],
    interface: Option<&str>,
    ifaces: &[Interface],
    routes: &[Route],
) -> Result<SweepPlan, ScopeError> {
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
    let wanted = |ip: &Ipv4Addr| !own.contains(ip) && !exclude.iter().any(|x| x.contains(ip));
    let mut plan = SweepPlan::default();
    let mut total = 0usize;
    for scope in scopes {
        total = total.saturating_add(1usize << (32 - u32::from(scope.prefix_len())));
        if total > MAX_TARGETS {
            return Err(ScopeError::TooMany(total));
        }
        let on_link = usable.iter().find_map(|i| {
            i.ipv4
                .iter()
                .find(|net| net.trunc().contains(scope))
                .map(|net| (*i, net.trunc()))
        });
        if let Some((iface, subnet)) = on_link {
            let targets = scope.hosts().filter(|ip| {
                // The subnet's network and broadcast addresses are not hosts, even when the
                // scope is a /32 or a slice of the subnet.
                let edge = subnet.prefix_len() < 31
                    && (*ip == subnet.network() || *ip == subnet.broadcast());
                !edge && wanted(ip)
            });
            match plan
                .on_link
                .iter_mut()
                .find(|p| p.interface.name == iface.name)
            {
                Some(p) => {
                    p.scopes.push(*scope);
                    p.targets.extend(targets);
                }
                None => plan.on_link.push(InterfaceTargets {
                    interface: iface.clone(),
                    scopes: vec![*scope],
                    targets: targets.collect(),
                }),
            }
            continue;
        }
        // The most specific route covering the whole scope, through a usable interface.
        let route = routes
            .iter()
            .filter(|r| {
                r.destination.contains(scope) && usable.iter().any(|i| i.name == r.interface)
            })
            .max_by_key(|r| r.destination.prefix_len());
        let Some(route) = route else {
            return Err(ScopeError::NotOnLink {
                scope: *scope,
                where_: interface
                    .map_or_else(|| "any interface".to_owned(), |n| format!("interface {n}")),
                subnets: on_link_summary(&usable),
            });
        };
        plan.routed.push(RoutedTargets {
            scope: *scope,
            route: route.clone(),
            targets: scope.hosts().filter(|ip| wanted(ip)).collect(),
        });
    }
    for p in &mut plan.on_link {
        p.targets.sort_unstable();
        p.targets.dedup();
    }
    plan.on_link.retain(|p| !p.targets.is_empty());
    plan.routed.retain(|r| !r.targets.is_empty());
    if plan.on_link.is_empty() && plan.routed.is_empty() {
        return Err(ScopeError::Empty);
    }
    Ok(plan)
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
        let plan = plan(&nets("198.18.0.0/24"), &[], None, &ifaces, &[])
            .expect("plan")
            .on_link;
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
            &[],
        )
        .expect("plan")
        .on_link;
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
        let err = plan(&nets("198.18.5.0/24"), &[], None, &ifaces, &[]).expect_err("off link");
        assert!(err.to_string().contains("eth0 198.18.0.0/24"), "{err}");
        // A scope only on-link on a down interface is not on-link.
        assert!(matches!(
            plan(&nets("198.18.1.0/24"), &[], None, &ifaces, &[]),
            Err(ScopeError::NotOnLink { .. })
        ));
        assert!(matches!(
            plan(&nets("198.18.0.0/24"), &[], Some("eth9"), &ifaces, &[]),
            Err(ScopeError::NoSuchInterface { .. })
        ));
        assert!(matches!(
            plan(&nets("198.18.1.0/24"), &[], Some("eth1"), &ifaces, &[]),
            Err(ScopeError::InterfaceDown(_))
        ));
        // Wider than the interface's subnet: not on-link as a whole.
        assert!(matches!(
            plan(&nets("198.18.0.0/23"), &[], None, &ifaces, &[]),
            Err(ScopeError::NotOnLink { .. })
        ));
        assert!(matches!(
            plan(&nets("198.18.0.2/32"), &[], None, &ifaces, &[]),
            Err(ScopeError::Empty)
        ));
    }

    #[test]
    fn routed_scopes_go_to_icmp_through_the_most_specific_route() {
        let ifaces = [iface("eth0", "198.18.0.2/24", true)];
        let route = |dest: &str, gw: Option<&str>| Route {
            destination: dest.parse().expect("cidr"),
            gateway: gw.map(|g| g.parse().expect("ip")),
            interface: "eth0".into(),
        };
        let routes = [
            route("0.0.0.0/0", Some("198.18.0.1")),
            route("198.18.1.0/24", Some("198.18.0.254")),
        ];
        let p = plan(
            &nets("198.18.0.0/24,198.18.1.0/24,198.18.2.0/25"),
            &nets("198.18.1.9/32"),
            None,
            &ifaces,
            &routes,
        )
        .expect("plan");
        assert_eq!(p.on_link.len(), 1);
        assert_eq!(p.routed.len(), 2);
        assert_eq!(
            p.routed[0].route.gateway,
            Some("198.18.0.254".parse().expect("ip"))
        );
        assert_eq!(
            p.routed[0].targets.len(),
            253,
            "254 hosts less the excluded one"
        );
        assert!(p.routed[1].route.is_default());
        assert_eq!(p.target_count(), 253 + 253 + 126);
        // Without any route, an off-link scope is refused.
        let err =
            plan(&nets("198.18.2.0/24"), &[], None, &ifaces, &routes[1..]).expect_err("no route");
        assert!(err.to_string().contains("no route leads to it"), "{err}");
    }

    #[test]
    fn interface_scopes_are_their_subnets() {
        let mut eth0 = iface("eth0", "198.18.0.2/24", true);
        eth0.ipv4.push("198.18.5.1/32".parse().expect("cidr"));
        let ifaces = [eth0, iface("eth1", "198.18.1.2/25", true)];
        let nets = interface_scopes(&["eth1".into(), "eth0".into()], &ifaces).expect("scopes");
        let text: Vec<String> = nets.iter().map(ToString::to_string).collect();
        assert_eq!(text, ["198.18.0.0/24", "198.18.1.0/25"]);
        assert!(matches!(
            interface_scopes(&["eth7".into()], &ifaces),
            Err(ScopeError::NoSuchInterface { .. })
        ));
    }
}
