//! Tracing set-up: `warn,census_agent=info` unless `RUST_LOG` says otherwise, human-readable
//! text on stderr, or JSON lines on request.

use tracing_subscriber::{EnvFilter, fmt};

/// Installs the global subscriber. `json` picks JSON lines instead of text.
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("warn,census_agent=info"));
    // Under systemd, stderr goes to journald (which sets JOURNAL_STREAM): it stamps every line
    // itself and shows colour codes as garbage, so neither is written there.
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(!journald && std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match (json, journald) {
        (true, _) => builder.json().try_init(),
        (false, true) => builder.without_time().try_init(),
        (false, false) => builder.try_init(),
    };
}
