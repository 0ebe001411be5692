//! census-agent: discovers the devices at one client site and streams them to the collector.
//!
//! Layout:
//! - [`config`]: the agent's `Config` (TOML file, `CENSUS_AGENT_*` environment, flags) and its
//!   validation.
//! - [`iface`]: the host's network interfaces and their IPv4 subnets.
//! - [`scope`]: turns configured CIDRs into per-interface target lists, refusing what is unsafe.
//! - [`probe`]: one module per discovery method (`probe/arp.rs`, `icmp.rs`, `snmp.rs`,
//!   `mdns.rs`).
//! - [`discovery`]: one sweep with every method, merged into one observation per device.
//! - [`directory`]: the site's Active Directory users, read over LDAPS with paged searches.
//! - [`classify`]: MAC vendors and device categories, from the evidence.
//! - [`metrics_http`]: the Prometheus endpoint (`GET /metrics` on `metrics_listen`) and the
//!   page it renders from the delivery path's counters.
//! - [`enroll`]: trades an enrollment token for the agent's certificate (`census-agent
//!   enroll`, or `run`'s first start), kept in `<state dir>/identity/`; and `run`'s decision
//!   whether it has one.
//! - [`report`]: turns sweep results into observation batches and delivers them over gRPC
//!   (mutual TLS with the agent's certificate); the agent's id and sequence numbers (`agent.json`).
//! - [`queue`]: the on-disk (sled) queue every batch waits in until acknowledged, with its
//!   cap; the crash windows are written down there.
//! - [`delivery`]: sends the queue to the collector, in order, backing off with jitter.
//! - [`metrics`]: the agent's counters (sweeps, replies, batches queued/sent/acknowledged/
//!   dropped), for a metrics endpoint to read.
//! - [`run`]: the agent's main loop, driven by a shutdown token.
//! - [`service`]: `install` / `uninstall` as a systemd unit or a Windows service, and the
//!   Windows service entry (Stop and Shutdown cancel the same shutdown token as signals).
//! - [`signal`]: the shutdown trigger (Unix signals, Windows console events).
//! - [`telemetry`]: tracing set-up.
//! - `fuzzing` (hidden): thin wrappers the cargo-fuzz targets in `agent/fuzz/` and the corpus
//!   replay test (`tests/fuzz_corpus.rs`) call.

// No unsafe code, except the IP Helper calls of the Windows backend (`probe/iphelper/sys.rs`,
// which allows it for itself alone): forbidden outright everywhere else.
#![cfg_attr(not(windows), forbid(unsafe_code))]
#![cfg_attr(windows, deny(unsafe_code))]

pub mod classify;
pub mod config;
pub mod delivery;
pub mod directory;
pub mod discovery;
pub mod enroll;
#[doc(hidden)]
pub mod fuzzing;
pub mod iface;
pub mod metrics;
pub mod metrics_http;
pub mod probe;
pub mod queue;
pub mod report;
pub mod run;
pub mod scope;
pub mod service;
pub mod signal;
pub mod telemetry;
#[cfg(all(test, unix))]
mod testing;
