//! Enrollment and mutual TLS over real gRPC on loopback: single-use expiring tokens, forged
//! tokens, revoked agents (also on streams already open), certificates confined to their own
//! client, callers without a certificate or with one of another CA, plaintext refused outside
//! development mode, and streams that never finish cut off without hurting other agents.

use std::time::Duration;

use anyhow::{Context as _, Result};
use census_collector::config::Config;
use census_proto::{
    transport::Credentials,
    v1::{
        self, admin_service_client::AdminServiceClient, ingest_service_client::IngestServiceClient,
        query_service_client::QueryServiceClient,
    },
};
use tonic::{Code, Request};

use census_tests::support::key_and_csr;

use crate::in_process::{Running, batch, start, start_with};

const MAC1: [u8; 6] = [0x00, 0x16, 0x3e, 0x11, 0x22, 0x33];
const MAC2: [u8; 6] = [0x00, 0x16, 0x3e, 0x44, 0x55, 0x66];

impl Running {
    async fn agents(&self) -> Result<Vec<v1::Agent>> {
        Ok(self
            .admin()
            .await?
            .list_agents(self.op(v1::ListAgentsRequest::default()))
            .await?
            .into_inner()
            .agents)
    }
}

fn refused(r: std::result::Result<impl std::fmt::Debug, tonic::Status>, code: Code, says: &str) {
    let status = r.expect_err("must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    let m = status.message();
    assert!(
        m.contains(says) && !m.contains('\n'),
        "{says:?} not in {m:?}"
    );
}

#[tokio::test]
async fn tokens_enroll_one_agent_before_they_expire_and_forged_ones_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let c = start(dir.path()).await?;

    let token = c.token("acme", "hq").await?;
    let (agent, r) = c.enroll_with(&token, "agent-one").await??;
    assert_eq!(
        (r.agent_id.as_str(), r.client.as_str(), r.site.as_str()),
        ("agent-one", "acme", "hq")
    );
    assert_eq!(r.ca_pem, c.ca_pem);
    assert_eq!(
        c.report(
            &agent,
            vec![batch("agent-one", 1, &[("198.18.0.10", MAC1)])]
        )
        .await??
        .len(),
        1
    );

    // Reused: a token enrolls one agent.
    refused(
        c.enroll_with(&token, "agent-two").await?,
        Code::Unauthenticated,
        "already used",
    );

    // Expired.
    let short = c.token_expiring("acme", "hq", 1).await?;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    refused(
        c.enroll_with(&short, "agent-late").await?,
        Code::Unauthenticated,
        "expired",
    );

    // Forged: a real id with a wrong secret; nonsense; an empty token.
    let fresh = c.token("acme", "hq").await?;
    let id = fresh.split('_').nth(1).context("token id")?;
    let forged = format!("cen1_{id}_{}", "0".repeat(64));
    for bad in [forged.as_str(), "cen1_nonsense", ""] {
        refused(
            c.enroll_with(bad, "agent-x").await?,
            Code::Unauthenticated,
            "token",
        );
    }
    // The forgery did not spend the real token.
    c.enroll_with(&fresh, "agent-three").await??;

    // Revoked before use.
    let revoked = c.token("acme", "hq").await?;
    let id = revoked.split('_').nth(1).context("token id")?;
    c.admin()
        .await?
        .revoke_token(c.op(v1::RevokeTokenRequest {
            token_id: id.into(),
        }))
        .await?;
    refused(
        c.enroll_with(&revoked, "agent-y").await?,
        Code::Unauthenticated,
        "revoked",
    );

    // A CSR that is not one is refused without spending the token.
    let token = c.token("acme", "hq").await?;
    let mut e = census_proto::v1::enrollment_service_client::EnrollmentServiceClient::new(
        c.channel_as(None).await?,
    );
    let status = e
        .enroll(v1::EnrollRequest {
            token: token.clone(),
            csr_der: b"garbage".to_vec(),
            ..Default::default()
        })
        .await
        .expect_err("garbage CSR");
    assert_eq!(status.code(), Code::InvalidArgument);
    c.enroll_with(&token, "agent-four").await??;

    // Only the enrolled agents are listed, each once, with its token.
    let mut ids: Vec<String> = c.agents().await?.into_iter().map(|a| a.agent_id).collect();
    ids.sort();
    assert_eq!(ids, ["agent-four", "agent-one", "agent-three"]);
    // A proposed id already taken is replaced, not shared.
    let (_, r) = c
        .enroll_with(&c.token("acme", "hq").await?, "agent-one")
        .await??;
    assert_ne!(r.agent_id, "agent-one");
    Ok(())
}

#[tokio::test]
async fn a_revoked_agent_is_locked_out_at_once_even_on_an_open_stream() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let c = start(dir.path()).await?;
    let token = c.token("acme", "hq").await?;
    let (agent, r) = c.enroll_with(&token, "agent-r").await??;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut ingest = IngestServiceClient::new(c.agent_channel(&agent).await?);
    let mut acks = ingest
        .report(c.as_agent(&agent, tokio_stream::wrappers::ReceiverStream::new(rx)))
        .await?
        .into_inner();
    tx.send(batch("agent-r", 1, &[("198.18.0.10", MAC1)]))
        .await?;
    acks.message().await?.context("first ack")?;
    let listed = c.agents().await?;
    let a = listed
        .iter()
        .find(|a| a.agent_id == r.agent_id)
        .context("listed")?;
    assert!(
        a.last_seen.is_some() && a.version == "0.0.0-test" && !a.revoked,
        "{a:?}"
    );

    let revoked = c
        .admin()
        .await?
        .revoke_agent(c.op(v1::RevokeAgentRequest {
            agent_id: r.agent_id.clone(),
        }))
        .await?
        .into_inner();
    assert!(revoked.agent.context("agent")?.revoked);
    tx.send(batch("agent-r", 2, &[("198.18.0.11", MAC2)]))
        .await?;
    let status = acks
        .message()
        .await
        .expect_err("the open stream is cut off");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("revoked"), "{status:?}");
    // And a new stream is refused.
    refused(
        c.report(&agent, vec![batch("agent-r", 3, &[("198.18.0.12", MAC2)])])
            .await?,
        Code::Unauthenticated,
        "revoked",
    );
    assert_eq!(
        c.devices("acme").await?.len(),
        1,
        "nothing after the revocation"
    );
    // Unknown agents cannot be revoked.
    let err = c
        .admin()
        .await?
        .revoke_agent(c.op(v1::RevokeAgentRequest {
            agent_id: "nobody".into(),
        }))
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    Ok(())
}

#[tokio::test]
async fn an_agent_of_one_client_cannot_write_or_read_anything_of_another() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let c = start(dir.path()).await?;
    let a = c.agent_named("acme", "hq", "a").await?;
    let g = c.agent_named("globex", "hq", "g").await?;
    c.report(&g, vec![batch("g", 1, &[("198.18.0.10", MAC2)])])
        .await??;
    // Batches carry no client, and the agent is the one its certificate names: a batch of
    // acme's agent naming the globex agent is refused; its own lands in acme.
    refused(
        c.report(&a, vec![batch("g", 2, &[("198.18.0.10", MAC1)])])
            .await?,
        Code::PermissionDenied,
        "names agent \"g\"",
    );
    c.report(&a, vec![batch("a", 1, &[("198.18.0.10", MAC1)])])
        .await??;
    let acme = c.devices("acme").await?;
    let globex = c.devices("globex").await?;
    assert_eq!((acme.len(), globex.len()), (1, 1));
    assert_eq!(acme[0].macs, vec![MAC1.to_vec()]);
    assert_eq!(globex[0].macs, vec![MAC2.to_vec()]);
    // Nor can it read or administer: those are the operator's.
    let mut q = QueryServiceClient::new(c.agent_channel(&a).await?);
    let err = q
        .list_devices(v1::ListDevicesRequest {
            client: "globex".into(),
            ..Default::default()
        })
        .await
        .expect_err("an agent must not query");
    assert_eq!(err.code(), Code::PermissionDenied);
    let mut admin = AdminServiceClient::new(c.agent_channel(&a).await?);
    let err = admin
        .revoke_agent(v1::RevokeAgentRequest {
            agent_id: "x".into(),
        })
        .await
        .expect_err("an agent must not administer");
    assert_eq!(err.code(), Code::PermissionDenied);
    // The operator's certificate is no agent's.
    refused(
        c.report(&c.operator, vec![batch("o", 1, &[("198.18.0.11", MAC1)])])
            .await?,
        Code::Unauthenticated,
        "no enrolled agent",
    );
    Ok(())
}

#[tokio::test]
async fn without_a_trusted_certificate_nothing_but_enrollment_is_served() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let c = start(dir.path()).await?;
    let _ = c.agent("acme", "hq").await?;

    // TLS without a client certificate: the stream and the queries are refused.
    let mut ingest = IngestServiceClient::new(c.channel_as(None).await?);
    let status = ingest
        .report(Request::new(tokio_stream::iter(vec![batch(
            "n",
            1,
            &[("198.18.0.10", MAC1)],
        )])))
        .await
        .map(|_| ())
        .expect_err("no certificate");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().contains("no client certificate"),
        "{status:?}"
    );
    let mut q = QueryServiceClient::new(c.channel_as(None).await?);
    let err = q
        .get_counts(v1::GetCountsRequest::default())
        .await
        .expect_err("no certificate");
    assert_eq!(err.code(), Code::Unauthenticated);

    // A certificate of another CA (a collector's own, made elsewhere) fails the handshake or
    // is refused: either way nothing is stored.
    let other_dir = tempfile::tempdir()?;
    let other = start(other_dir.path()).await?;
    let stranger = other.agent("acme", "hq").await?;
    let foreign = Credentials {
        ca_pem: c.ca_pem.clone(),
        ..stranger
    };
    let outcome = match c.agent_channel(&foreign).await {
        Err(_) => None,
        Ok(ch) => Some(
            IngestServiceClient::new(ch)
                .report(Request::new(tokio_stream::iter(vec![batch(
                    "f",
                    1,
                    &[("198.18.0.10", MAC1)],
                )])))
                .await
                .map(|_| ()),
        ),
    };
    if let Some(r) = outcome {
        assert!(r.is_err(), "a foreign certificate must not open a stream");
    }

    // Plaintext to a TLS collector: refused.
    let plain = census_proto::transport::endpoint(
        &format!("http://{}", c.addr),
        None,
        None,
        Duration::from_secs(5),
    )?;
    let refused_plain = match plain.connect().await {
        Err(_) => true,
        Ok(ch) => QueryServiceClient::new(ch)
            .get_counts(v1::GetCountsRequest::default())
            .await
            .is_err(),
    };
    assert!(refused_plain, "plaintext must be refused");
    assert!(c.devices("acme").await?.is_empty());

    // Enrollment itself needs no client certificate.
    let token = c.token("acme", "hq").await?;
    let (_key, csr) = key_and_csr("late")?;
    assert!(!csr.is_empty());
    c.enroll_with(&token, "late").await??;
    Ok(())
}

#[tokio::test]
async fn development_mode_serves_plaintext_and_still_needs_an_enrolled_certificate() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let c = start_with(Config {
        data_dir: Some(dir.path().to_owned()),
        dev_plaintext: true,
        ..Config::default()
    })
    .await?;
    let agent = c.agent_named("acme", "hq", "d").await?;
    assert_eq!(
        c.report(&agent, vec![batch("d", 1, &[("198.18.0.10", MAC1)])])
            .await??
            .len(),
        1
    );
    assert_eq!(c.devices("acme").await?.len(), 1);
    // Without the certificate metadata: refused.
    let mut ingest = IngestServiceClient::new(c.channel_as(None).await?);
    let status = ingest
        .report(Request::new(tokio_stream::iter(vec![batch(
            "d",
            2,
            &[("198.18.0.11", MAC2)],
        )])))
        .await
        .map(|_| ())
        .expect_err("no certificate");
    assert_eq!(status.code(), Code::Unauthenticated);
    Ok(())
}

#[tokio::test]
async fn a_stream_that_never_finishes_is_cut_off_and_others_carry_on() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let c = start_with(Config {
        data_dir: Some(dir.path().to_owned()),
        stream_idle_timeout: Duration::from_secs(1),
        ..Config::default()
    })
    .await?;
    let stalled = c.agent_named("acme", "hq", "s").await?;
    let healthy = c.agent_named("acme", "branch", "h").await?;
    // A stream that opens and then sends nothing, ever.
    let (tx, rx) = tokio::sync::mpsc::channel::<v1::ObservationBatch>(1);
    let mut ingest = IngestServiceClient::new(c.agent_channel(&stalled).await?);
    let mut acks = ingest
        .report(c.as_agent(&stalled, tokio_stream::wrappers::ReceiverStream::new(rx)))
        .await?
        .into_inner();
    // Meanwhile another agent delivers as usual.
    assert_eq!(
        c.report(&healthy, vec![batch("h", 1, &[("198.18.0.10", MAC1)])])
            .await??
            .len(),
        1
    );
    let status = tokio::time::timeout(Duration::from_secs(10), acks.message())
        .await
        .context("the idle stream must be closed by the collector")?
        .expect_err("closed with a status");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("no batch arrived"), "{status:?}");
    assert_eq!(c.metrics.streams_idle_closed.get(), 1);
    drop(tx);
    // The stalled agent can open a new stream and deliver.
    assert_eq!(
        c.report(&stalled, vec![batch("s", 1, &[("198.18.0.11", MAC2)])])
            .await??
            .len(),
        1
    );
    assert_eq!(c.devices("acme").await?.len(), 2);
    Ok(())
}
