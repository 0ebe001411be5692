//! Tracing set-up: `warn,census_agent=info` unless `RUST_LOG` says otherwise, human-readable
//! text on stderr, or JSON lines on request.

use tracing_subscriber::{EnvFilter, fmt};

/// Installs the global subscriber. `json` picks JSON lines instead of text.
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("warn,census_agent=info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
