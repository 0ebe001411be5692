//! Serves the metrics over HTTP: `GET /metrics` answers what `render` returns, in the text
//! exposition format 0.0.4; any other path is 404 and any other method 405. It is a separate
//! listener from gRPC (plain HTTP/1.1, no authentication), so it is off unless
//! `metrics_listen` is set, and belongs on loopback or a monitoring network.
//!
//! The agent has its own copy (`agent/src/metrics_http.rs`): the two daemons share only
//! `census-proto`, the gRPC contract, where an HTTP server does not belong.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Router,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::CONTENT_TYPE;

/// What renders the page: called once per scrape, on a blocking thread.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Serves `GET /metrics` on `listener` until `shutdown` is cancelled.
pub fn serve(listener: TcpListener, render: Render, shutdown: CancellationToken) -> JoinHandle<()> {
    let addr = listener.local_addr().ok();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let render = Arc::clone(&render);
                async move { metrics_page(render).await }
            }),
        )
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "not found: metrics are at /metrics\n",
            )
        });
    tokio::spawn(async move {
        if let Some(addr) = addr {
            info!(%addr, "metrics served at /metrics");
        }
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            warn!(error = %e, "the metrics server failed");
        }
    })
}

/// Binds `listen` for [`serve`], so that a bad address fails at start, before anything runs.
pub async fn bind(listen: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(listen).await
}

async fn metrics_page(render: Render) -> Response {
    match tokio::task::spawn_blocking(move || render()).await {
        Ok(body) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
        Err(e) => {
            warn!(error = %e, "rendering the metrics failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot render the metrics\n",
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// One HTTP/1.1 request over a fresh connection; the whole response as text.
    async fn request(addr: SocketAddr, line: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("{line}\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn serves_metrics_until_shutdown() {
        let listener = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let m = super::super::Metrics::new(None);
        m.batches_stored.inc_by(7);
        let m2 = Arc::clone(&m);
        let task = serve(listener, Arc::new(move || m2.render()), shutdown.clone());

        let ok = request(addr, "GET /metrics HTTP/1.1").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(
            ok.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{ok}"
        );
        assert!(
            ok.contains("\ncensus_collector_batches_stored_total 7\n"),
            "{ok}"
        );
        let missing = request(addr, "GET / HTTP/1.1").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let post = request(addr, "POST /metrics HTTP/1.1").await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");

        shutdown.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("stops on shutdown")
            .expect("task");
    }
}
