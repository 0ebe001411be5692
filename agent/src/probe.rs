//! Discovery methods. Each method owns a module; packet parsing inside them does no I/O.

#[cfg(unix)]
pub mod arp;
