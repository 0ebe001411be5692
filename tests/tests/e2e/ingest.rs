//! The ingest contract over real gRPC on loopback (no namespaces needed: nothing is swept):
//! a batch sent twice is stored once, an agent's certificate confines it to its own client and
//! site, and malformed or oversized batches end only their own stream. (Enrollment, mutual TLS
//! and revocation are in `enrollment.rs`.)

use anyhow::{Context, Result};
use census_proto::v1::{
    self, admin_service_client::AdminServiceClient, query_service_client::QueryServiceClient,
};
use tonic::Code;

use crate::in_process::{Running, batch, start};

impl Running {
    async fn clients(&self) -> Result<Vec<String>> {
        let mut query = QueryServiceClient::new(self.channel().await?);
        let r = query
            .list_clients(self.op(v1::ListClientsRequest {}))
            .await?;
        Ok(r.into_inner().clients.into_iter().map(|c| c.name).collect())
    }
}

const MAC1: [u8; 6] = [0, 0x16, 0x3e, 0, 0, 1];
const MAC2: [u8; 6] = [0, 0x16, 0x3e, 0, 0, 2];

#[tokio::test]
async fn a_batch_sent_twice_is_stored_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let c = start(dir.path()).await?;
    let token = c.agent_named("acme", "hq", "agent-1").await?;
    let b = batch(
        "agent-1",
        1,
        &[("198.18.0.10", MAC1), ("198.18.0.11", MAC2)],
    );

    let first = c.report(&token, vec![b.clone()]).await??;
    assert_eq!(first[0].status, v1::AckStatus::Stored as i32);
    assert_eq!(first[0].observations, 2);
    // Resent on the same stream and on a new one: acknowledged, not applied.
    let again = c.report(&token, vec![b.clone(), b.clone()]).await??;
    assert!(
        again
            .iter()
            .all(|a| a.status == v1::AckStatus::Duplicate as i32 && a.sequence == 1),
        "{again:?}"
    );
    let devices = c.devices("acme").await?;
    assert_eq!(devices.len(), 2);
    assert!(
        devices
            .iter()
            .all(|d| d.evidence.len() == 1 && d.evidence[0].observations == 1),
        "{devices:?}"
    );

    // The next sequence is applied.
    let next = c
        .report(&token, vec![batch("agent-1", 2, &[("198.18.0.10", MAC1)])])
        .await??;
    assert_eq!(next[0].status, v1::AckStatus::Stored as i32);
    let devices = c.devices("acme").await?;
    let d = devices
        .iter()
        .find(|d| d.macs[0] == MAC1.to_vec())
        .context("MAC1 device")?;
    assert_eq!(d.evidence[0].observations, 2);
    Ok(())
}

#[tokio::test]
async fn an_agent_writes_only_for_the_client_and_site_of_its_token() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let c = start(dir.path()).await?;
    let acme = c.agent_named("acme", "hq", "a").await?;
    let _globex = c.agent_named("globex", "hq", "globex-agent").await?;
    c.report(&acme, vec![batch("a", 1, &[("198.18.0.10", MAC1)])])
        .await??;
    // Messages carry no client or site, and the agent is the one its certificate names: a
    // batch naming globex's agent under acme's certificate is refused...
    let refused = c
        .report(
            &acme,
            vec![batch("globex-agent", 1, &[("198.18.0.10", MAC2)])],
        )
        .await?
        .expect_err("another agent's batch");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    // ...and acme's own lands in acme, and globex is untouched.
    let acks = c
        .report(&acme, vec![batch("a", 2, &[("198.18.0.10", MAC2)])])
        .await??;
    assert_eq!(acks[0].status, v1::AckStatus::Stored as i32);
    assert_eq!(c.devices("acme").await?.len(), 2);
    assert!(c.devices("globex").await?.is_empty());
    assert!(
        c.devices("acme")
            .await?
            .iter()
            .all(|d| d.client == "acme" && d.site == "hq")
    );

    // An agent's certificate is not the operator's: it cannot make tokens or read counts.
    let mut admin = AdminServiceClient::new(c.agent_channel(&acme).await?);
    let err = admin
        .create_token(v1::CreateTokenRequest {
            client: "globex".into(),
            site: "evil".into(),
            expires_in_seconds: 0,
        })
        .await
        .expect_err("an agent must not administer");
    assert_eq!(err.code(), Code::PermissionDenied);
    let mut query = QueryServiceClient::new(c.agent_channel(&acme).await?);
    let err = query
        .get_counts(v1::GetCountsRequest {
            client: "globex".into(),
        })
        .await
        .expect_err("an agent must not query");
    assert_eq!(err.code(), Code::PermissionDenied);
    let mut clients = c.clients().await?;
    clients.sort();
    assert_eq!(clients, ["acme", "globex"]);
    Ok(())
}

#[tokio::test]
async fn malformed_batches_are_refused_and_the_collector_stays_healthy() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let c = start(dir.path()).await?;
    let token = c.agent_named("acme", "hq", "a").await?;
    let status = c
        .report(&token, vec![batch("a", 0, &[("198.18.0.10", MAC1)])])
        .await?
        .expect_err("sequence 0");
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = c
        .report(&token, vec![batch("", 1, &[("198.18.0.10", MAC1)])])
        .await?
        .expect_err("no agent id");
    assert_eq!(status.code(), Code::InvalidArgument);
    let huge: Vec<(&str, [u8; 6])> = vec![("198.18.0.10", MAC1); 10_001];
    let status = c
        .report(&token, vec![batch("a", 1, &huge)])
        .await?
        .expect_err("too many observations");
    assert_eq!(status.code(), Code::InvalidArgument);
    // Observations without identity are counted as rejected, the rest stored.
    let acks = c
        .report(
            &token,
            vec![batch(
                "a",
                1,
                &[("not-an-ip", [0; 6]), ("198.18.0.11", MAC2)],
            )],
        )
        .await??;
    assert_eq!((acks[0].observations, acks[0].rejected), (1, 1));
    assert_eq!(c.devices("acme").await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn oversized_messages_end_only_their_stream() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let c = start(dir.path()).await?;
    let token = c.agent_named("acme", "hq", "a").await?;
    let mut big = batch("a", 1, &[("198.18.0.10", MAC1)]);
    big.observations[0].names.push(v1::Name {
        value: "x".repeat(5 * 1024 * 1024),
        source: v1::NameSource::MdnsHost as i32,
    });
    let status = c
        .report(&token, vec![big])
        .await?
        .expect_err("over the 4 MiB limit");
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    assert!(c.devices("acme").await?.is_empty());
    // The collector is healthy: the next stream is served.
    let acks = c
        .report(&token, vec![batch("a", 1, &[("198.18.0.10", MAC1)])])
        .await??;
    assert_eq!(acks[0].status, v1::AckStatus::Stored as i32);
    Ok(())
}

#[tokio::test]
async fn health_and_reflection_are_served() -> Result<()> {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };

    let dir = tempfile::tempdir()?;
    let c = start(dir.path()).await?;
    let mut health = HealthClient::new(c.channel().await?);
    for service in [
        "census.v1.IngestService",
        "census.v1.QueryService",
        "census.v1.AdminService",
    ] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await?
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service}");
    }

    let mut reflection = ServerReflectionClient::new(c.channel().await?);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let response = responses
        .message()
        .await?
        .context("a reflection response")?;
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        anyhow::bail!("unexpected reflection response: {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "census.v1.IngestService",
        "census.v1.QueryService",
        "census.v1.AdminService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_reused_sequence_number_with_other_content_is_refused_not_dropped() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let c = start(dir.path()).await?;
    let token = c.agent_named("acme", "hq", "a").await?;
    c.report(&token, vec![batch("a", 1, &[("198.18.0.10", MAC1)])])
        .await??;
    // A restored or cloned agent sends other observations under the same sequence number.
    let status = c
        .report(&token, vec![batch("a", 1, &[("198.18.0.11", MAC2)])])
        .await?
        .expect_err("a conflict, not a duplicate");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("new sequence epoch"),
        "{status:?}"
    );
    // The agent continues in a new epoch, under the same id: its sequences start again.
    let mut again = batch("a", 1, &[("198.18.0.11", MAC2)]);
    again.epoch = 7;
    let acks = c.report(&token, vec![again.clone()]).await??;
    assert_eq!(acks[0].status, v1::AckStatus::Stored as i32);
    let acks = c.report(&token, vec![again]).await??;
    assert_eq!(
        acks[0].status,
        v1::AckStatus::Duplicate as i32,
        "replays stay idempotent"
    );
    let devices = c.devices("acme").await?;
    assert_eq!(devices.len(), 2);
    assert!(
        devices
            .iter()
            .all(|d| d.evidence.len() == 1 && d.evidence[0].agent_id == "a"),
        "{devices:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_batch_naming_another_agent_is_refused_and_spends_none_of_its_sequences() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let c = start(dir.path()).await?;
    let a = c.agent_named("acme", "hq", "agent-a").await?;
    let b = c.agent_named("acme", "hq", "agent-b").await?;
    // agent-a, enrolled at the same client and site, sends a batch naming agent-b.
    let forged = c
        .report(&a, vec![batch("agent-b", 1, &[("198.18.0.10", MAC1)])])
        .await?
        .expect_err("a batch naming another agent");
    assert_eq!(forged.code(), Code::PermissionDenied, "{forged:?}");
    assert!(
        forged.message().contains("names agent \"agent-b\"")
            && forged.message().contains("certificate is agent agent-a's"),
        "{forged:?}"
    );
    assert!(c.devices("acme").await?.is_empty(), "nothing was credited");
    // agent-b's own sequence 1 is still its own: stored, no conflict.
    let acks = c
        .report(&b, vec![batch("agent-b", 1, &[("198.18.0.11", MAC2)])])
        .await??;
    assert_eq!(acks[0].status, v1::AckStatus::Stored as i32);
    let devices = c.devices("acme").await?;
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].evidence[0].agent_id, "agent-b");
    // The agents list holds the two enrolled agents, no other id.
    let agents = c
        .admin()
        .await?
        .list_agents(c.op(v1::ListAgentsRequest::default()))
        .await?
        .into_inner()
        .agents;
    let mut ids: Vec<&str> = agents.iter().map(|a| a.agent_id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["agent-a", "agent-b"]);
    Ok(())
}
