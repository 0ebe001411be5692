//! Users in sled: a client's accounts, the state of its sources, staged parts of directory
//! reads, and the billable-user policies.
//!
//! Trees and keys (`\0` separates parts):
//! - `users`: the first byte says what a key is:
//!   - `a` `client\0source\0account id` -> [`Account`]
//!   - `s` `client\0source` -> [`SourceStatus`]
//!   - `p` `client\0source\0read id\0part (u32 BE)` -> [`StagedPart`]
//!   - `b` `client\0site\0agent id\0sequence (u64 BE)` -> the SHA-256 of the batch that
//!     carried a directory read part (so a replayed batch is applied once)
//! - `user_policies`: `client\0n (u64 BE)` -> [`UserPolicy`] version `<client>-users-<n>`
//!
//! Values are JSON (with the format byte), like policies and snapshots: users are few next to
//! devices, kept for years, and later fields must read old records. Every change of one call
//! commits as one atomic sled batch, then is flushed before the call returns.

use std::collections::BTreeMap;

use super::{SledStore, decode, encode_json, engine, graph_key, graph_prefix};
use crate::{
    model::Scope,
    store::{BatchId, BatchOutcome, StoreError},
    users::{
        Account, SourceStatus, UserPolicy, UserPolicyRules,
        apply::{self, Outcome, Read, ReadPart, StagedPart, Tables},
    },
};

const ACCOUNT: u8 = b'a';
const STATUS: u8 = b's';
const STAGED: u8 = b'p';
const BATCH: u8 = b'b';

/// One call's view of a client's user records: reads go to the tree (and to this call's own
/// status writes), writes are collected for one atomic batch.
struct SledTables<'a> {
    tree: &'a sled::Tree,
    client: &'a str,
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl SledTables<'_> {
    fn scan<T: serde::de::DeserializeOwned>(&self, p: &[u8]) -> Result<Vec<T>, StoreError> {
        self.tree
            .scan_prefix(p)
            .map(|kv| {
                let (k, v) = kv.map_err(engine)?;
                decode(&k, &v)
            })
            .collect()
    }

    fn commit(self, extra: Option<(Vec<u8>, Vec<u8>)>) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (k, v) in self.writes {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        if let Some((k, v)) = extra {
            batch.insert(k, v);
        }
        self.tree.apply_batch(batch).map_err(engine)
    }
}

impl Tables for SledTables<'_> {
    type Error = StoreError;

    fn status(&mut self, source: &str) -> Result<Option<SourceStatus>, StoreError> {
        let k = graph_key(STATUS, &[self.client.as_bytes(), source.as_bytes()]);
        if let Some(v) = self.writes.get(&k) {
            return v.as_ref().map(|v| decode(&k, v)).transpose();
        }
        self.tree
            .get(&k)
            .map_err(engine)?
            .map(|v| decode(&k, &v))
            .transpose()
    }

    fn staged(&mut self, source: &str) -> Result<Vec<StagedPart>, StoreError> {
        self.scan(&graph_prefix(
            STAGED,
            &[self.client.as_bytes(), source.as_bytes()],
        ))
    }

    fn accounts(&mut self, source: &str) -> Result<Vec<Account>, StoreError> {
        self.scan(&graph_prefix(
            ACCOUNT,
            &[self.client.as_bytes(), source.as_bytes()],
        ))
    }

    fn put_staged(&mut self, source: &str, part: &StagedPart) -> Result<(), StoreError> {
        let k = staged_key(self.client, source, &part.read_id, part.part);
        self.writes.insert(k, Some(encode_json(part)?));
        Ok(())
    }

    fn remove_staged(&mut self, source: &str, read_id: &str, part: u32) -> Result<(), StoreError> {
        self.writes
            .insert(staged_key(self.client, source, read_id, part), None);
        Ok(())
    }

    fn put_account(&mut self, account: &Account) -> Result<(), StoreError> {
        let k = graph_key(
            ACCOUNT,
            &[
                self.client.as_bytes(),
                account.source.as_bytes(),
                account.id.as_bytes(),
            ],
        );
        self.writes.insert(k, Some(encode_json(account)?));
        Ok(())
    }

    fn put_status(&mut self, status: &SourceStatus) -> Result<(), StoreError> {
        let k = graph_key(STATUS, &[self.client.as_bytes(), status.source.as_bytes()]);
        self.writes.insert(k, Some(encode_json(status)?));
        Ok(())
    }
}

fn staged_key(client: &str, source: &str, read_id: &str, part: u32) -> Vec<u8> {
    graph_key(
        STAGED,
        &[
            client.as_bytes(),
            source.as_bytes(),
            read_id.as_bytes(),
            &part.to_be_bytes(),
        ],
    )
}

impl SledStore {
    fn users_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        // Guards no data of its own: a call that panicked committed nothing.
        self.users_writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn users_apply_part(
        &self,
        scope: &Scope,
        batch: &BatchId,
        part: &ReadPart,
    ) -> Result<(BatchOutcome, Option<Outcome>), StoreError> {
        let batch_key = graph_key(
            BATCH,
            &[
                scope.client.as_bytes(),
                scope.site.as_bytes(),
                batch.stream().as_bytes(),
                &batch.sequence.to_be_bytes(),
            ],
        );
        let result = {
            let _w = self.users_lock();
            match self.users.get(&batch_key).map_err(engine)? {
                Some(d) if d.as_ref() == batch.digest => (BatchOutcome::Duplicate, None),
                Some(_) => (BatchOutcome::Conflict, None),
                None => {
                    self.room()?;
                    let mut t = SledTables {
                        tree: &self.users,
                        client: &scope.client,
                        writes: BTreeMap::new(),
                    };
                    let outcome = apply::apply_part(&mut t, part.clone())?;
                    t.commit(Some((batch_key, batch.digest.to_vec())))?;
                    (BatchOutcome::Stored, Some(outcome))
                }
            }
        };
        // Acknowledged only once on disk (a duplicate's first copy too).
        self.flush()?;
        Ok(result)
    }

    pub(super) fn users_apply_read(
        &self,
        client: &str,
        read: &Read,
    ) -> Result<Outcome, StoreError> {
        self.room()?;
        let outcome = {
            let _w = self.users_lock();
            let mut t = SledTables {
                tree: &self.users,
                client,
                writes: BTreeMap::new(),
            };
            let outcome = apply::apply_read(&mut t, read.clone())?;
            t.commit(None)?;
            outcome
        };
        self.flush()?;
        Ok(outcome)
    }

    pub(super) fn users_accounts(
        &self,
        client: &str,
    ) -> Result<(Vec<Account>, Vec<SourceStatus>), StoreError> {
        let t = SledTables {
            tree: &self.users,
            client,
            writes: BTreeMap::new(),
        };
        let accounts = t.scan(&graph_prefix(ACCOUNT, &[client.as_bytes()]))?;
        let statuses = t.scan(&graph_prefix(STATUS, &[client.as_bytes()]))?;
        Ok((accounts, statuses))
    }

    pub(super) fn users_put_policy(
        &self,
        client: &str,
        rules: &UserPolicyRules,
        at_ms: u64,
    ) -> Result<UserPolicy, StoreError> {
        self.room()?;
        let policy = super::put_versioned(&self.user_policies, client, |n| UserPolicy {
            version: UserPolicy::version_for(client, n),
            client: client.to_owned(),
            saved_ms: at_ms,
            rules: rules.clone(),
        })?;
        self.flush()?;
        Ok(policy)
    }

    pub(super) fn users_policies(&self, client: &str) -> Result<Vec<UserPolicy>, StoreError> {
        let p = super::prefix(&[client.as_bytes()]);
        self.user_policies
            .scan_prefix(&p)
            .map(|kv| {
                let (k, v) = kv.map_err(engine)?;
                decode(&k, &v)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use census_proto::v1;

    use super::*;
    use crate::store::Store as _;
    use crate::users::{self, SourceKind, apply::ReadData};

    #[test]
    fn users_sources_and_staged_parts_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let scope = Scope {
            client: "acme".into(),
            site: "hq".into(),
        };
        let user = v1::DirectoryUser {
            object_guid: [7; 16].to_vec(),
            sam_account_name: "alice".into(),
            sam_account_type: users::SAM_NORMAL_USER_ACCOUNT,
            ..Default::default()
        };
        let part = |n: u32| ReadPart {
            source: "ad:corp.example".into(),
            read_id: "r1".into(),
            part: n,
            parts: 2,
            read_at_ms: 100,
            error: None,
            accounts: users::ad_account("ad:corp.example", &user, 100)
                .into_iter()
                .collect(),
        };
        let batch = |sequence| BatchId {
            agent_id: "ag".into(),
            epoch: 0,
            sequence,
            digest: [1; 32],
        };
        {
            let store = SledStore::open(dir.path()).expect("open");
            let (outcome, _) = store
                .apply_directory_part(&scope, &batch(1), &part(1))
                .expect("part");
            assert_eq!(outcome, BatchOutcome::Stored);
            let read = Read {
                source: "entra:t".into(),
                kind: SourceKind::EntraId,
                read_id: "g".into(),
                read_at_ms: 50,
                outcome: Err("unreachable".into()),
            };
            store.apply_user_read("acme", &read).expect("read");
            store
                .put_user_policy("acme", &UserPolicyRules::default(), 1)
                .expect("policy");
        }
        let store = SledStore::open(dir.path()).expect("reopen");
        // The staged first part waited on disk: the second completes the read.
        let (outcome, applied) = store
            .apply_directory_part(&scope, &batch(2), &part(2))
            .expect("part");
        assert_eq!(outcome, BatchOutcome::Stored);
        assert!(
            matches!(applied, Some(Outcome::Applied { present: 1, .. })),
            "{applied:?}"
        );
        let (accounts, sources) = store.user_accounts("acme").expect("accounts");
        assert_eq!(accounts.len(), 1);
        assert_eq!(sources.len(), 2);
        assert!(sources.iter().any(|s| s.source == "entra:t" && s.stale()));
        assert_eq!(
            store
                .apply_directory_part(&scope, &batch(1), &part(1))
                .expect("replay")
                .0,
            BatchOutcome::Duplicate
        );
        assert_eq!(
            store.user_policy("acme").expect("policy").version,
            "acme-users-1"
        );
        let ok = Read {
            source: "entra:t".into(),
            kind: SourceKind::EntraId,
            read_id: "g2".into(),
            read_at_ms: 60,
            outcome: Ok(ReadData::default()),
        };
        assert!(matches!(
            store.apply_user_read("acme", &ok),
            Ok(Outcome::Applied { .. })
        ));
    }
}
