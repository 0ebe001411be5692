//! A collector served in-process on 127.0.0.1:0, for the tests that speak gRPC to it directly
//! (no namespaces needed: nothing is swept), and the calls those tests share.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::Result;
use census_collector::{config::Config, metrics::Metrics, server};
use census_proto::v1::{
    self, admin_service_client::AdminServiceClient, query_service_client::QueryServiceClient,
};
use tokio_util::sync::CancellationToken;
use tonic::{Request, transport::Channel};

/// A running in-process collector, stopped on drop.
pub struct Running {
    pub addr: SocketAddr,
    /// The operator token the collector wrote into its data directory.
    pub operator: String,
    /// What the collector counts (the page `/metrics` would serve: `metrics.render()`).
    pub metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.task.abort();
    }
}

/// Starts a collector on `dir` with the default configuration.
pub async fn start(dir: &Path) -> Result<Running> {
    let config = Config {
        data_dir: Some(dir.to_owned()),
        ..Config::default()
    };
    let prepared = server::prepare(&config)?;
    let operator = std::fs::read_to_string(&prepared.operator_token_path)?
        .trim()
        .to_owned();
    let metrics = Arc::clone(&prepared.metrics);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let task = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = server::run(&config, prepared, listener, shutdown).await {
                eprintln!("collector failed: {e}");
            }
        })
    };
    Ok(Running {
        addr,
        operator,
        metrics,
        shutdown,
        task,
    })
}

/// `msg` with `authorization: Bearer <token>`.
pub fn authed<T>(token: &str, msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert(
        census_proto::AUTHORIZATION,
        format!("Bearer {token}").parse().expect("ascii token"),
    );
    req
}

impl Running {
    pub async fn channel(&self) -> Result<Channel> {
        Ok(Channel::from_shared(format!("http://{}", self.addr))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?)
    }

    pub async fn query(&self) -> Result<QueryServiceClient<Channel>> {
        Ok(QueryServiceClient::new(self.channel().await?))
    }

    pub async fn admin(&self) -> Result<AdminServiceClient<Channel>> {
        Ok(AdminServiceClient::new(self.channel().await?))
    }

    /// `msg` with the operator's credential.
    pub fn op<T>(&self, msg: T) -> Request<T> {
        authed(&self.operator, msg)
    }

    /// An enrollment token for (client, site).
    pub async fn token(&self, client: &str, site: &str) -> Result<String> {
        let r = self
            .admin()
            .await?
            .create_token(self.op(v1::CreateTokenRequest {
                client: client.into(),
                site: site.into(),
            }))
            .await?;
        Ok(r.into_inner().token)
    }

    /// Every device of a client.
    pub async fn devices(&self, client: &str) -> Result<Vec<v1::Device>> {
        let r = self
            .query()
            .await?
            .list_devices(self.op(v1::ListDevicesRequest {
                client: client.into(),
                ..Default::default()
            }))
            .await?;
        Ok(r.into_inner().devices)
    }
}
