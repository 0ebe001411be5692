//! Discovery methods. Each method owns a module; packet parsing inside them does no I/O.
//!
//! - [`arp`]: on-link addresses (raw Ethernet, one OS thread per interface; Unix only).
//! - [`icmp`]: routed addresses (echo, bounded concurrency).
//! - [`snmp`]: identity and tables of every responding address.
//! - [`mdns`]: DNS-SD services and host names.
//! - [`iphelper`]: Windows discovery without a capture driver (IP Helper API): interfaces,
//!   routes, ARP by neighbour resolution, and the ICMP echo calls behind `icmp`'s seam.
//! - [`pool`]: a paced, bounded pool of blocking probes (how the Windows ARP sweep runs).

#[cfg(unix)]
pub mod arp;
pub mod icmp;
pub mod iphelper;
pub mod mdns;
pub mod pool;
pub mod snmp;
