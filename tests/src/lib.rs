//! census-tests: the lab of simulated client sites and the end-to-end test support.
//!
//! Layout:
//! - [`lab`]: client sites built from Linux network namespaces, veth pairs and bridges, with
//!   real responders; torn down on drop, even after a panic.
//! - [`support`]: running the collector, agents and the `census` CLI inside a lab.

#![forbid(unsafe_code)]

pub mod lab;
pub mod support;
