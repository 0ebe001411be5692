//! census-collector: the MSP's central daemon. It authenticates agents, stores every
//! observation durably, resolves observations into devices per client, and answers queries for
//! authoritative counts with the evidence behind each one.
//!
//! Layout:
//! - [`config`]: the daemon's `Config` (TOML, environment, flags) and its validation.
//! - [`model`]: records and validation of observations.
//! - [`identity`]: the I/O-free rules that decide which observations are one device.
//! - [`graph`]: Microsoft 365 / Entra ID users read from Microsoft Graph, the billable decision
//!   per user, and the hybrid join keys to AD accounts.
//! - [`users`]: a client's accounts from Active Directory and Entra ID, the people they are
//!   (hybrid accounts joined on stable keys), and the versioned billable-user policy.
//! - [`entra`]: reads each configured client's Entra ID users on a schedule.
//! - [`policy`]: the versioned counting policy per client, and why each device counts or not.
//! - [`snapshot`]: billing snapshots per period, their diff and their CSV/JSON export.
//! - [`store`]: the [`store::Store`] trait, the sled store and the in-memory store.
//! - [`auth`]: single-use enrollment tokens and the registry of enrolled agents.
//! - [`pki`]: the certificate authority: server, operator and agent certificates.
//! - [`service`]: the `census.v1` gRPC services (ingest, query, admin).
//! - [`metrics`]: the collector's Prometheus metrics, their gRPC layer and their HTTP endpoint.
//! - [`server`]: wires store and services into a tonic server with health and reflection.
//! - [`handshake`]: the TLS listener, which counts and logs (rate-limited) failed handshakes.
//! - [`cli`]: the `census` command-line client.
//! - [`signal`], [`telemetry`]: shutdown signals and tracing set-up.

#![forbid(unsafe_code)]

pub mod auth;
pub mod cli;
pub mod config;
pub mod entra;
pub mod graph;
pub mod handshake;
pub mod identity;
pub mod metrics;
pub mod model;
pub mod pki;
pub mod policy;
pub mod server;
pub mod service;
pub mod signal;
pub mod snapshot;
pub mod store;
pub mod telemetry;
pub mod users;
