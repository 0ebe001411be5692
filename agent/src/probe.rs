//! Discovery methods. Each method owns a module; packet parsing inside them does no I/O.
//!
//! - [`arp`]: on-link addresses (raw Ethernet, one OS thread per interface; Unix only).
//! - [`icmp`]: routed addresses (echo, bounded concurrency).
//! - [`snmp`]: identity and tables of every responding address.
//! - [`mdns`]: DNS-SD services and host names.

#[cfg(unix)]
pub mod arp;
pub mod icmp;
pub mod mdns;
pub mod snmp;
