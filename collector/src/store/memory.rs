//! The store contract in memory: for tests and tools. Nothing survives the process.

use std::{
    collections::BTreeMap,
    sync::{Mutex, MutexGuard},
};

use super::{BatchId, BatchOutcome, Edit, Store, StoreError, present, run_edit};
use crate::identity::{self, Event, MemGraph};
use crate::model::{
    AgentRecord, CleanObservation, ClientRecord, DeviceRecord, Scope, SiteRecord, TokenRecord,
};
use crate::policy::{Policy, PolicyRules};
use crate::snapshot::Snapshot;
use crate::users::{
    Account, SourceStatus, UserPolicy, UserPolicyRules,
    apply::{self, MemTables, Outcome, Read, ReadPart},
};

#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    clients: BTreeMap<String, ClientRecord>,
    sites: BTreeMap<(String, String), SiteRecord>,
    tokens: BTreeMap<String, TokenRecord>,
    agents: BTreeMap<String, AgentRecord>,
    /// Per client.
    graphs: BTreeMap<String, MemGraph>,
    batches: BTreeMap<(String, String, String, u64), [u8; 32]>,
    /// Per client, oldest first.
    policies: BTreeMap<String, Vec<Policy>>,
    /// Per (client, period).
    snapshots: BTreeMap<(String, String), Snapshot>,
    /// Per client.
    users: BTreeMap<String, MemTables>,
    /// Batches that carried directory read parts.
    user_batches: BTreeMap<(String, String, String, u64), [u8; 32]>,
    /// Per client, oldest first.
    user_policies: BTreeMap<String, Vec<UserPolicy>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied batch: batches are applied
        // to a copy first. So a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store for MemoryStore {
    fn ensure_client(&self, name: &str, now_ms: u64) -> Result<(ClientRecord, bool), StoreError> {
        let mut inner = self.lock();
        if let Some(c) = inner.clients.get(name) {
            return Ok((c.clone(), false));
        }
        let record = ClientRecord {
            name: name.to_owned(),
            created_ms: now_ms,
        };
        inner.clients.insert(name.to_owned(), record.clone());
        Ok((record, true))
    }

    fn ensure_site(&self, client: &str, site: &str, now_ms: u64) -> Result<bool, StoreError> {
        self.ensure_client(client, now_ms)?;
        let mut inner = self.lock();
        let k = (client.to_owned(), site.to_owned());
        if inner.sites.contains_key(&k) {
            return Ok(false);
        }
        inner.sites.insert(
            k,
            SiteRecord {
                client: client.to_owned(),
                name: site.to_owned(),
                created_ms: now_ms,
            },
        );
        Ok(true)
    }

    fn client(&self, name: &str) -> Result<Option<ClientRecord>, StoreError> {
        Ok(self.lock().clients.get(name).cloned())
    }

    fn clients(&self) -> Result<Vec<ClientRecord>, StoreError> {
        Ok(self.lock().clients.values().cloned().collect())
    }

    fn sites(&self, client: &str) -> Result<Vec<SiteRecord>, StoreError> {
        Ok(self
            .lock()
            .sites
            .values()
            .filter(|s| s.client == client)
            .cloned()
            .collect())
    }

    fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        self.lock().tokens.insert(token.id.clone(), token.clone());
        Ok(())
    }

    fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        Ok(self.lock().tokens.get(id).cloned())
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        Ok(self.lock().tokens.values().cloned().collect())
    }

    fn enroll(&self, token: &TokenRecord, agent: &AgentRecord) -> Result<(), StoreError> {
        let mut inner = self.lock();
        inner.tokens.insert(token.id.clone(), token.clone());
        inner.agents.insert(agent.id.clone(), agent.clone());
        Ok(())
    }

    fn put_agent(&self, agent: &AgentRecord, _durable: bool) -> Result<(), StoreError> {
        self.lock().agents.insert(agent.id.clone(), agent.clone());
        Ok(())
    }

    fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        Ok(self.lock().agents.values().cloned().collect())
    }

    fn apply_batch(
        &self,
        scope: &Scope,
        batch: &BatchId,
        observations: &[CleanObservation],
    ) -> Result<BatchOutcome, StoreError> {
        let mut inner = self.lock();
        let agent_id = batch.agent_id.as_str();
        let key = (
            scope.client.clone(),
            scope.site.clone(),
            batch.stream().into_owned(),
            batch.sequence,
        );
        if let Some(digest) = inner.batches.get(&key) {
            return Ok(if *digest == batch.digest {
                BatchOutcome::Duplicate
            } else {
                BatchOutcome::Conflict
            });
        }
        // Apply to a copy of the client's graph, then commit it whole: a batch is applied
        // whole or not at all.
        let mut graph = inner.graphs.get(&scope.client).cloned().unwrap_or_default();
        for obs in observations {
            let Ok(()) = identity::apply(&mut graph, scope, agent_id, obs);
        }
        inner.graphs.insert(scope.client.clone(), graph);
        inner.batches.insert(key, batch.digest);
        Ok(BatchOutcome::Stored)
    }

    fn devices(&self, client: &str, site: Option<&str>) -> Result<Vec<DeviceRecord>, StoreError> {
        let inner = self.lock();
        let Some(g) = inner.graphs.get(client) else {
            return Ok(Vec::new());
        };
        let devices = g
            .devices
            .values()
            .filter(|d| site.is_none_or(|s| d.sites.iter().any(|x| x == s)))
            .cloned()
            .collect();
        let virtual_macs: Vec<_> = g
            .virtual_macs
            .iter()
            .map(|(m, v)| (*m, v.clone()))
            .collect();
        Ok(present(devices, &g.owners, &virtual_macs))
    }

    fn edit(
        &self,
        client: &str,
        edit: &Edit,
        at_ms: u64,
    ) -> Result<Result<Event, identity::EditError>, StoreError> {
        let mut inner = self.lock();
        let mut graph = inner.graphs.get(client).cloned().unwrap_or_default();
        let Ok(outcome) = run_edit(&mut graph, client, edit, at_ms);
        if outcome.is_ok() {
            inner.graphs.insert(client.to_owned(), graph);
        }
        Ok(outcome)
    }

    fn history(&self, client: &str) -> Result<Vec<Event>, StoreError> {
        Ok(self
            .lock()
            .graphs
            .get(client)
            .map(|g| g.events.values().cloned().collect())
            .unwrap_or_default())
    }

    fn put_policy(
        &self,
        client: &str,
        rules: &PolicyRules,
        at_ms: u64,
    ) -> Result<Policy, StoreError> {
        let mut inner = self.lock();
        let list = inner.policies.entry(client.to_owned()).or_default();
        let policy = Policy {
            version: Policy::version_for(client, list.len() as u64 + 1),
            client: client.to_owned(),
            saved_ms: at_ms,
            rules: rules.clone(),
        };
        list.push(policy.clone());
        Ok(policy)
    }

    fn policies(&self, client: &str) -> Result<Vec<Policy>, StoreError> {
        Ok(self
            .lock()
            .policies
            .get(client)
            .cloned()
            .unwrap_or_default())
    }

    fn create_snapshot(&self, snapshot: &Snapshot) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let k = (snapshot.client.clone(), snapshot.period.clone());
        if inner.snapshots.contains_key(&k) {
            return Ok(false);
        }
        inner.snapshots.insert(k, snapshot.clone());
        Ok(true)
    }

    fn snapshot(&self, client: &str, period: &str) -> Result<Option<Snapshot>, StoreError> {
        Ok(self
            .lock()
            .snapshots
            .get(&(client.to_owned(), period.to_owned()))
            .cloned())
    }

    fn snapshots(&self, client: &str) -> Result<Vec<Snapshot>, StoreError> {
        Ok(self
            .lock()
            .snapshots
            .values()
            .filter(|s| s.client == client)
            .cloned()
            .collect())
    }

    fn apply_directory_part(
        &self,
        scope: &Scope,
        batch: &BatchId,
        part: &ReadPart,
    ) -> Result<(BatchOutcome, Option<Outcome>), StoreError> {
        let mut inner = self.lock();
        let key = (
            scope.client.clone(),
            scope.site.clone(),
            batch.stream().into_owned(),
            batch.sequence,
        );
        if let Some(digest) = inner.user_batches.get(&key) {
            let outcome = if *digest == batch.digest {
                BatchOutcome::Duplicate
            } else {
                BatchOutcome::Conflict
            };
            return Ok((outcome, None));
        }
        let tables = inner.users.entry(scope.client.clone()).or_default();
        let Ok(outcome) = apply::apply_part(tables, part.clone());
        inner.user_batches.insert(key, batch.digest);
        Ok((BatchOutcome::Stored, Some(outcome)))
    }

    fn apply_user_read(&self, client: &str, read: &Read) -> Result<Outcome, StoreError> {
        let mut inner = self.lock();
        let tables = inner.users.entry(client.to_owned()).or_default();
        let Ok(outcome) = apply::apply_read(tables, read.clone());
        Ok(outcome)
    }

    fn user_accounts(&self, client: &str) -> Result<(Vec<Account>, Vec<SourceStatus>), StoreError> {
        let inner = self.lock();
        Ok(inner.users.get(client).map_or_else(Default::default, |t| {
            (
                t.accounts.values().cloned().collect(),
                t.statuses.values().cloned().collect(),
            )
        }))
    }

    fn put_user_policy(
        &self,
        client: &str,
        rules: &UserPolicyRules,
        at_ms: u64,
    ) -> Result<UserPolicy, StoreError> {
        let mut inner = self.lock();
        let list = inner.user_policies.entry(client.to_owned()).or_default();
        let policy = UserPolicy {
            version: UserPolicy::version_for(client, list.len() as u64 + 1),
            client: client.to_owned(),
            saved_ms: at_ms,
            rules: rules.clone(),
        };
        list.push(policy.clone());
        Ok(policy)
    }

    fn user_policies(&self, client: &str) -> Result<Vec<UserPolicy>, StoreError> {
        Ok(self
            .lock()
            .user_policies
            .get(client)
            .cloned()
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn memory_store_keeps_the_contract() {
        super::super::contract::run(&super::MemoryStore::new());
    }
}
