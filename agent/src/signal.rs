//! The shutdown trigger: SIGINT or SIGTERM on Unix, Ctrl-C on Windows (the Windows service's
//! Stop will cancel the same token). Every task listens to that one root token.

use tokio_util::sync::CancellationToken;
use tracing::info;

/// Cancels `token` on the first shutdown signal.
pub fn spawn_shutdown_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        wait().await;
        info!("shutdown requested");
        token.cancel();
    });
}

#[cfg(unix)]
async fn wait() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait() {
    let _ = tokio::signal::ctrl_c().await;
}
