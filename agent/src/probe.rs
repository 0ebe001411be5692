//! Discovery methods. Each method owns a module; packet parsing inside them does no I/O.
//!
//! - [`arp`]: on-link addresses (raw Ethernet, one OS thread per interface; Unix only).
//! - [`icmp`]: routed addresses (echo, bounded concurrency).
//! - [`snmp`]: identity and tables of every responding address.
//! - [`mdns`]: DNS-SD services and host names.
//! - [`iphelper`]: Windows discovery without a capture driver (IP Helper API): interfaces,
//!   routes, ARP by neighbour resolution, and the ICMP echo calls behind `icmp`'s seam.
//! - [`pool`]: a paced, bounded pool of blocking probes (how the Windows ARP sweep runs).

/// The rate every ARP sweep starts at: 1200 ARP requests per second. Each is a 60-byte broadcast
/// frame (42 bytes of Ethernet and ARP, padded to Ethernet's minimum), so 72 kB/s (0.58
/// Mbit/s: under 0.1% of a gigabit link, 0.6% of 100 Mbit/s), and 1200 broadcasts a second
/// that every host on the segment must look at. That is no more than nmap itself sends at its
/// defaults on the benchmark's sites (`nmap -sn --packet-trace`, three runs each): its first
/// 255 requests on the /24 at 1216 per second, and at most 1260 to 1307 in any one second on
/// the /20 (1420 to 1520 in its busiest 100 ms on either site). arp-scan's default, 256
/// kbit/s, is about 500 a second. A sweep goes faster only while its checks show that the
/// network keeps up, and falls back toward this rate as soon as they do not (`arp`). On
/// Windows, where the system sends the requests, it is the highest rate of resolutions.
pub const ARP_START_RATE_PPS: u32 = 1200;

#[cfg(unix)]
pub mod arp;
pub mod icmp;
pub mod iphelper;
pub mod mdns;
pub mod pool;
pub mod snmp;
