//! The users part of the services: directory read parts in agents' batches, `ListUsers`, the
//! billable-user policy, `RefreshUsers`, and the users' messages.

use std::time::Duration;

use census_proto::{convert, v1};
use tonic::{Request, Response, Status};
use tracing::info;

use super::{Collector, name_status, now_ms};
use crate::{
    entra::{EntraError, EntraReader},
    graph::graph_time_ms,
    model,
    snapshot::SnapshotUser,
    store::{Store, StoreError},
    users::{
        self, Account, Facts, Person, SourceStatus, UserPolicy, UserPolicyRules, UserTally,
        apply::ReadPart,
    },
};

/// Longest a `RefreshUsers` call waits for its read, whatever it asks (the read goes on).
const MAX_REFRESH_WAIT: Duration = Duration::from_secs(3600);

/// Most users one batch may carry (agents send 100).
pub const MAX_BATCH_USERS: usize = 1_000;

/// The directory read part a batch carries, if any, with the users left out for having no
/// usable objectGUID. `offset` is how far the collector's clock is ahead of the agent's.
pub(super) fn directory_part(
    batch: &v1::ObservationBatch,
    received_ms: u64,
    offset: i64,
) -> Result<Option<(ReadPart, usize)>, Status> {
    let Some(read) = &batch.directory_read else {
        if !batch.users.is_empty() {
            return Err(Status::invalid_argument(
                "a batch with users must say which directory read they belong to (directory_read)",
            ));
        }
        return Ok(None);
    };
    if batch.users.len() > MAX_BATCH_USERS {
        return Err(Status::invalid_argument(format!(
            "batch {} holds {} users, more than the collector's limit of {MAX_BATCH_USERS}: send smaller parts",
            batch.sequence,
            batch.users.len()
        )));
    }
    let source = users::ad_source(&read.directory)
        .map_err(|e| Status::invalid_argument(format!("directory_read.directory: {e}")))?;
    // The agent's clock, corrected by the batch's offset, and never in the future.
    let read_at_ms = read.read_at.as_ref().map_or(received_ms, |t| {
        let agent = i128::from(users::millis(t)) + i128::from(offset);
        u64::try_from(agent.clamp(0, i128::from(received_ms))).unwrap_or(received_ms)
    });
    let accounts: Vec<Account> = batch
        .users
        .iter()
        .filter_map(|u| users::ad_account(&source, u, read_at_ms))
        .collect();
    let skipped = batch.users.len() - accounts.len();
    let part = ReadPart {
        source,
        read_id: read.read_id.clone(),
        part: read.part,
        parts: read.parts,
        read_at_ms,
        error: (!read.error.is_empty()).then(|| users::cap(&read.error, users::apply::MAX_ERROR)),
        accounts,
    };
    part.check().map_err(Status::invalid_argument)?;
    Ok(Some((part, skipped)))
}

/// A client's people, the policy and the sources, at `now`.
pub(super) fn client_people(
    s: &dyn Store,
    client: &str,
    now: u64,
) -> Result<(Vec<Person>, UserPolicy, Vec<SourceStatus>), StoreError> {
    let policy = s.user_policy(client)?;
    let (accounts, sources) = s.user_accounts(client)?;
    let people = users::people(&policy, accounts, &sources, now);
    Ok((people, policy, sources))
}

/// The client's user count for `GetCounts`.
pub(super) fn user_counts(
    s: &dyn Store,
    client: &str,
    now: u64,
) -> Result<(UserTally, UserPolicy, Vec<v1::UserSource>), StoreError> {
    let (people, policy, sources) = client_people(s, client, now)?;
    Ok((
        users::tally(&people, &sources),
        policy,
        sources.iter().map(source_to_wire).collect(),
    ))
}

fn ts(ms: u64) -> Option<prost_types::Timestamp> {
    Some(convert::timestamp_from_millis(ms))
}

pub(super) fn source_to_wire(s: &SourceStatus) -> v1::UserSource {
    v1::UserSource {
        source: s.source.clone(),
        kind: s.kind.label().to_owned(),
        last_read: s.read_ms.and_then(ts),
        accounts: s.accounts,
        last_attempt: (s.attempt_ms != 0).then(|| convert::timestamp_from_millis(s.attempt_ms)),
        error: s.error.clone().unwrap_or_default(),
        stale: s.stale(),
        reading: false,
    }
}

fn account_to_wire(a: &Account, d: &users::Decision) -> v1::UserAccount {
    v1::UserAccount {
        source: a.source.clone(),
        id: a.id.clone(),
        name: a.name.clone(),
        display_name: a.display_name.clone(),
        billable: d.billable,
        reason: d.reason.clone(),
        present: a.present,
        first_seen: ts(a.first_seen_ms),
        last_seen: ts(a.last_seen_ms),
        removed_at: a.removed_ms.and_then(ts),
        join_keys: a.join_keys.iter().map(ToString::to_string).collect(),
        last_logon: match &a.facts {
            Facts::Ad(ad) => ad.last_logon_ms.and_then(ts),
            Facts::Entra(u) => u
                .last_sign_in
                .as_deref()
                .and_then(graph_time_ms)
                .and_then(ts),
        },
        created: match &a.facts {
            Facts::Ad(ad) => ad.created_ms.and_then(ts),
            Facts::Entra(u) => u.created.as_deref().and_then(graph_time_ms).and_then(ts),
        },
    }
}

fn person_to_wire(p: &Person) -> v1::User {
    v1::User {
        id: p.id.clone(),
        name: p.name.clone(),
        display_name: p.display_name.clone(),
        counted: p.counted,
        reason: p.reason.clone(),
        accounts: p
            .accounts
            .iter()
            .map(|(a, d)| account_to_wire(a, d))
            .collect(),
        stale: p.stale,
    }
}

pub(super) fn user_policy_to_wire(p: &UserPolicy) -> v1::UserPolicy {
    v1::UserPolicy {
        version: p.version.clone(),
        client: p.client.clone(),
        stale_logon_days: p.rules.stale_logon_days,
        count_service_accounts: p.rules.count_service_accounts,
        exclusion_groups: p.rules.exclusion_groups.clone(),
        licence_allow_list: p.rules.licence_allow_list.clone(),
        saved_at: (p.saved_ms != 0).then(|| convert::timestamp_from_millis(p.saved_ms)),
        is_default: p.is_default(),
    }
}

pub(super) fn snapshot_user_to_wire(u: &SnapshotUser) -> v1::SnapshotUser {
    v1::SnapshotUser {
        id: u.id.clone(),
        name: u.name.clone(),
        display_name: u.display_name.clone(),
        reason: u.counted_by.clone(),
        accounts: u.accounts.clone(),
    }
}

impl Collector {
    pub(super) async fn list_users_impl(
        &self,
        request: Request<v1::ListUsersRequest>,
    ) -> Result<Response<v1::ListUsersResponse>, Status> {
        let req = request.into_inner();
        model::validate_name("client", &req.client).map_err(name_status)?;
        self.require_client(&req.client).await?;
        let counted = v1::CountedFilter::try_from(req.counted).unwrap_or_default();
        let now = now_ms();
        let reading = self.entra.as_ref().and_then(|e| e.reading(&req.client));
        let (people, policy, sources) = self
            .blocking(move |s| client_people(s, &req.client, now))
            .await?;
        let mut sources: Vec<v1::UserSource> = sources.iter().map(source_to_wire).collect();
        for s in &mut sources {
            s.reading = reading.as_deref() == Some(s.source.as_str());
        }
        Ok(Response::new(v1::ListUsersResponse {
            users: people
                .iter()
                .filter(|p| match counted {
                    v1::CountedFilter::Any => true,
                    v1::CountedFilter::Counted => p.counted,
                    v1::CountedFilter::NotCounted => !p.counted,
                })
                .map(person_to_wire)
                .collect(),
            sources,
            policy: Some(user_policy_to_wire(&policy)),
            as_of: ts(now),
        }))
    }

    pub(super) async fn get_user_policy_impl(
        &self,
        request: Request<v1::GetUserPolicyRequest>,
    ) -> Result<Response<v1::UserPolicy>, Status> {
        let req = request.into_inner();
        model::validate_name("client", &req.client).map_err(name_status)?;
        self.require_client(&req.client).await?;
        let (client, version) = (req.client.clone(), req.version.clone());
        let found = self
            .blocking(move |s| {
                Ok(if version.is_empty() {
                    Some(s.user_policy(&client)?)
                } else if version == users::policy::DEFAULT_VERSION {
                    Some(UserPolicy::default())
                } else {
                    s.user_policies(&client)?
                        .into_iter()
                        .find(|p| p.version == version)
                })
            })
            .await?;
        found
            .map(|p| Response::new(user_policy_to_wire(&p)))
            .ok_or_else(|| {
                Status::not_found(format!(
                    "client {:?} has no user policy version {:?}",
                    req.client, req.version
                ))
            })
    }

    pub(super) async fn set_user_policy_impl(
        &self,
        request: Request<v1::SetUserPolicyRequest>,
    ) -> Result<Response<v1::UserPolicy>, Status> {
        let req = request.into_inner();
        model::validate_name("client", &req.client).map_err(name_status)?;
        let wire = req
            .policy
            .ok_or_else(|| Status::invalid_argument("the request holds no policy"))?;
        let rules = UserPolicyRules {
            stale_logon_days: wire.stale_logon_days,
            count_service_accounts: wire.count_service_accounts,
            exclusion_groups: wire.exclusion_groups,
            licence_allow_list: wire.licence_allow_list,
        }
        .validated()
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.require_client(&req.client).await?;
        let now = now_ms();
        let client = req.client.clone();
        let saved = self
            .blocking(move |s| s.put_user_policy(&client, &rules, now))
            .await?;
        info!(client = %req.client, version = %saved.version, rules = %saved.summary(), "user policy saved");
        Ok(Response::new(user_policy_to_wire(&saved)))
    }

    pub(super) async fn refresh_users_impl(
        &self,
        request: Request<v1::RefreshUsersRequest>,
    ) -> Result<Response<v1::RefreshUsersResponse>, Status> {
        let req = request.into_inner();
        let client = req.client;
        model::validate_name("client", &client).map_err(name_status)?;
        let Some(reader) = &self.entra else {
            return Err(Status::failed_precondition(
                EntraError::NotConfigured(client).to_string(),
            ));
        };
        // The read runs on the reader's own task: this call only waits for it, and a caller
        // that goes away stops the wait, not the read.
        let read = reader
            .start(&self.store, &client, &self.shutdown)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let outcome = EntraReader::outcome(read);
        let finished = match req.wait_seconds {
            0 => Some(outcome.await),
            secs => {
                let wait = Duration::from_secs(u64::from(secs)).min(MAX_REFRESH_WAIT);
                tokio::time::timeout(wait, outcome).await.ok()
            }
        };
        match finished.as_ref().map(|f| f.as_ref().map_err(|e| &**e)) {
            None | Some(Ok(_)) => {}
            Some(Err(e @ EntraError::NotConfigured(_))) => {
                return Err(Status::failed_precondition(e.to_string()));
            }
            Some(Err(EntraError::Cancelled)) => {
                return Err(Status::unavailable("collector is shutting down"));
            }
            // Logged by the read's task.
            Some(Err(e)) => return Err(Status::internal(e.to_string())),
        }
        let c = client.clone();
        let (_, sources) = self.blocking(move |s| s.user_accounts(&c)).await?;
        Ok(Response::new(v1::RefreshUsersResponse {
            sources: sources.iter().map(source_to_wire).collect(),
            running: finished.is_none(),
        }))
    }
}
