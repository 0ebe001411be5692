//! A collector served in-process on 127.0.0.1:0, for the tests that speak gRPC to it directly
//! (no namespaces needed: nothing is swept), and the calls those tests share.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use census_collector::{config::Config, metrics::Metrics, server};
use census_proto::{
    convert,
    transport::{self, Authenticate, Credentials},
    v1::{
        self, admin_service_client::AdminServiceClient, ingest_service_client::IngestServiceClient,
        query_service_client::QueryServiceClient,
    },
};
use tokio_util::sync::CancellationToken;
use tonic::{Request, transport::Channel};

/// A running in-process collector, stopped on drop.
pub struct Running {
    pub addr: SocketAddr,
    /// The collector's data directory.
    pub dir: std::path::PathBuf,
    /// The operator's credentials the collector made in its data directory.
    pub operator: Credentials,
    /// The CA agents trust the collector by.
    pub ca_pem: String,
    /// Plaintext (development mode) instead of mutual TLS.
    pub plaintext: bool,
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
    start_with(Config {
        data_dir: Some(dir.to_owned()),
        ..Config::default()
    })
    .await
}

/// Starts a collector with `config` (its `data_dir` set) on 127.0.0.1:0.
pub async fn start_with(config: Config) -> Result<Running> {
    let dir = config.data_dir.clone().context("data_dir")?;
    let prepared = server::prepare(&config)?;
    let operator = Credentials::load(&dir.join("operator"))?;
    let dir = dir.clone();
    let ca_pem = prepared.pki.ca_pem().to_owned();
    let metrics = Arc::clone(&prepared.metrics);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let plaintext = config.dev_plaintext;
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
        dir,
        operator,
        ca_pem,
        plaintext,
        metrics,
        shutdown,
        task,
    })
}

impl Running {
    pub fn url(&self) -> String {
        let scheme = if self.plaintext { "http" } else { "https" };
        format!("{scheme}://{}", self.addr)
    }

    /// A channel presenting `creds` (the operator's, an agent's, or none).
    pub async fn channel_as(&self, creds: Option<&Credentials>) -> Result<Channel> {
        let endpoint = transport::endpoint(
            &self.url(),
            Some(&self.ca_pem),
            creds,
            Duration::from_secs(5),
        )?;
        Ok(endpoint.connect().await?)
    }

    /// A channel with the operator's credentials.
    pub async fn channel(&self) -> Result<Channel> {
        self.channel_as(Some(&self.operator)).await
    }

    /// A channel with an agent's credentials.
    pub async fn agent_channel(&self, agent: &Credentials) -> Result<Channel> {
        self.channel_as(Some(agent)).await
    }

    /// Calls Enroll with `token` and a fresh key; the agent's credentials, or the status.
    pub async fn enroll_with(
        &self,
        token: &str,
        agent_id: &str,
    ) -> Result<std::result::Result<(Credentials, v1::EnrollResponse), tonic::Status>> {
        let channel = self.channel_as(None).await?;
        census_tests::support::enroll_over(channel, token, agent_id, "test-host", "0.0.0-test")
            .await
    }

    /// Sends `batches` on one stream and returns the acks, or the stream's error status.
    pub async fn report(
        &self,
        token: &Credentials,
        batches: Vec<v1::ObservationBatch>,
    ) -> Result<Result<Vec<v1::BatchAck>, tonic::Status>> {
        let mut ingest = IngestServiceClient::new(self.agent_channel(token).await?);
        let n = batches.len();
        let stream = tokio_stream::iter(batches);
        let mut acks = match ingest.report(self.as_agent(token, stream)).await {
            Ok(r) => r.into_inner(),
            Err(status) => return Ok(Err(status)),
        };
        let mut out = Vec::new();
        while out.len() < n {
            match tokio::time::timeout(Duration::from_secs(10), acks.message())
                .await
                .context("ack timeout")?
            {
                Ok(Some(ack)) => out.push(ack),
                Ok(None) => break,
                Err(status) => return Ok(Err(status)),
            }
        }
        Ok(Ok(out))
    }

    /// An agent enrolled into (client, site): its credentials.
    pub async fn agent(&self, client: &str, site: &str) -> Result<Credentials> {
        self.agent_named(client, site, &format!("agent-{}", uuid_like()))
            .await
    }

    /// An agent enrolled into (client, site) as `id` (its batches must name it: the collector
    /// takes the agent's identity from its certificate): its credentials.
    pub async fn agent_named(&self, client: &str, site: &str, id: &str) -> Result<Credentials> {
        let token = self.token(client, site).await?;
        let (creds, response) = self
            .enroll_with(&token, id)
            .await?
            .map_err(|s| anyhow::anyhow!("enrollment refused: {s:?}"))?;
        anyhow::ensure!(response.agent_id == id, "enrolled as {}", response.agent_id);
        Ok(creds)
    }

    pub async fn query(&self) -> Result<QueryServiceClient<Channel>> {
        Ok(QueryServiceClient::new(self.channel().await?))
    }

    pub async fn admin(&self) -> Result<AdminServiceClient<Channel>> {
        Ok(AdminServiceClient::new(self.channel().await?))
    }

    /// `msg` as the operator sends it (the credentials are the channel's: see
    /// [`Running::channel`]); and over plaintext, with the development-mode certificate.
    pub fn op<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        Authenticate::new(&self.url(), Some(&self.operator)).apply(&mut req);
        req
    }

    /// `msg` as an agent sends it (see [`Running::op`]).
    pub fn as_agent<T>(&self, agent: &Credentials, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        Authenticate::new(&self.url(), Some(agent)).apply(&mut req);
        req
    }

    /// A single-use enrollment token for (client, site), with the default lifetime.
    pub async fn token(&self, client: &str, site: &str) -> Result<String> {
        self.token_expiring(client, site, 0).await
    }

    /// A single-use enrollment token for (client, site) that expires after `seconds` (0: the
    /// collector's default).
    pub async fn token_expiring(&self, client: &str, site: &str, seconds: u64) -> Result<String> {
        let r = self
            .admin()
            .await?
            .create_token(self.op(v1::CreateTokenRequest {
                client: client.into(),
                site: site.into(),
                expires_in_seconds: seconds,
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

/// 16 random hex digits.
pub fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!(
        "{:016x}",
        t ^ (N.fetch_add(1, Ordering::Relaxed) << 48) ^ u64::from(std::process::id())
    )
}

/// A batch of ARP observations of `hosts` (address, MAC), as agent `agent` sends it.
pub fn batch(agent: &str, sequence: u64, hosts: &[(&str, [u8; 6])]) -> v1::ObservationBatch {
    v1::ObservationBatch {
        agent_id: agent.into(),
        sequence,
        observations: hosts
            .iter()
            .map(|(ip, mac)| v1::Observation {
                observed_at: Some(convert::timestamp(std::time::SystemTime::now())),
                method: v1::Method::Arp as i32,
                addresses: vec![v1::IpAddress {
                    address: (*ip).into(),
                    answered: true,
                    ..Default::default()
                }],
                macs: vec![mac.to_vec()],
                ..Default::default()
            })
            .collect(),
        agent_version: "0.0.0-test".into(),
        sent_at: None,
        ..Default::default()
    }
}
