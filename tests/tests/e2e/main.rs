//! The one integration-test binary: a module per area.
//!
//! Lab tests need root to build network namespaces; run without it they fail with one line
//! saying so. `CENSUS_SKIP_LAB=1` skips them on purpose.

mod agents;
mod billing;
mod delivery;
mod directory;
mod discovery;
mod enrollment;
mod foundation;
mod identity;
mod in_process;
mod ingest;
mod lab;
mod metrics;
mod operating;
mod tls;
mod users;
