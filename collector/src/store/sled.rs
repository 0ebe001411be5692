//! The default store: sled, embedded in the collector, one directory, nothing to install.
//!
//! Trees and keys (`\0` separates parts; names never contain it):
//! - `clients`: `client` -> [`ClientRecord`]
//! - `sites`: `client\0site` -> [`SiteRecord`]
//! - `tokens`: `token id` -> [`TokenRecord`]
//! - `devices`: `client\0device id` -> [`DeviceRecord`]
//! - `keys`: `client\0identity key` -> [`KeyRecord`] (see [`crate::identity`])
//! - `owners`: `client\0site\0address` -> [`AddressOwner`]
//! - `vmacs`: `client\0virtual MAC` -> [`VirtualMacRecord`]
//! - `events`: `client\0sequence (u64 BE)` -> [`Event`] (merges and splits)
//! - `batches`: `client\0site\0agent id\0sequence (u64 BE)` -> applied-at millis (u64 BE)
//!   and the SHA-256 of the batch's content
//! - `policies`: `client\0n (u64 BE)` -> [`Policy`] version `<client>-<n>`, never rewritten
//! - `snapshots`: `client\0period` -> [`Snapshot`], written once, never overwritten
//!
//! Values are one format byte followed by postcard, or (policies and snapshots) by JSON: those
//! are kept for years and read rarely, so they are stored in a self-describing form that later
//! fields (`#[serde(default)]`) can be added to without rewriting them. Every write that is
//! acknowledged to anyone is flushed first: sled's background flush alone can lose the last half
//! second.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use census_proto::convert::MacAddr;

use serde::{Serialize, de::DeserializeOwned};
use sled::{
    Transactional,
    transaction::{ConflictableTransactionError, TransactionError, TransactionalTree},
};

use super::{BatchId, BatchOutcome, Edit, Store, StoreError, present, run_edit};
use crate::{
    identity::{self, AddressOwner, EditError, Event, Graph, KeyRecord, VirtualMacRecord},
    model::{CleanObservation, ClientRecord, DeviceRecord, Scope, SiteRecord, TokenRecord},
    policy::{Policy, PolicyRules},
    snapshot::Snapshot,
};

/// Format byte in front of every stored value: postcard.
const FORMAT_V1: u8 = 1;
/// Format byte for values stored as JSON.
const FORMAT_JSON: u8 = 2;

/// The sled-backed store. Cheap to clone handles are inside; share it behind an `Arc`.
#[derive(Debug, Clone)]
pub struct SledStore {
    db: sled::Db,
    clients: sled::Tree,
    sites: sled::Tree,
    tokens: sled::Tree,
    devices: sled::Tree,
    keys: sled::Tree,
    owners: sled::Tree,
    vmacs: sled::Tree,
    events: sled::Tree,
    batches: sled::Tree,
    policies: sled::Tree,
    snapshots: sled::Tree,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`, which must exist.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("store");
        let db = sled::Config::new()
            .path(&path)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io)
                    if io.kind() == std::io::ErrorKind::WouldBlock
                        || io.to_string().contains("lock") =>
                {
                    StoreError::Locked {
                        path: path.display().to_string(),
                        reason: io.to_string(),
                    }
                }
                sled::Error::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
                    StoreError::Locked {
                        path: path.display().to_string(),
                        reason: io.to_string(),
                    }
                }
                other => StoreError::Engine(other.to_string()),
            })?;
        let tree = |name: &str| db.open_tree(name).map_err(engine);
        Ok(SledStore {
            clients: tree("clients")?,
            sites: tree("sites")?,
            tokens: tree("tokens")?,
            devices: tree("devices")?,
            keys: tree("keys")?,
            owners: tree("owners")?,
            vmacs: tree("vmacs")?,
            events: tree("events")?,
            batches: tree("batches")?,
            policies: tree("policies")?,
            snapshots: tree("snapshots")?,
            db,
        })
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(drop).map_err(engine)
    }
}

fn engine(e: sled::Error) -> StoreError {
    StoreError::Engine(e.to_string())
}

fn key(parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p);
    }
    k
}

fn prefix(parts: &[&[u8]]) -> Vec<u8> {
    let mut k = key(parts);
    k.push(0);
    k
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![FORMAT_V1];
    out.extend(postcard::to_stdvec(value).map_err(|e| StoreError::Engine(e.to_string()))?);
    Ok(out)
}

fn encode_json<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![FORMAT_JSON];
    serde_json::to_writer(&mut out, value).map_err(|e| StoreError::Engine(e.to_string()))?;
    Ok(out)
}

fn decode<T: DeserializeOwned>(k: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        key: String::from_utf8_lossy(k).replace('\0', "/"),
        reason,
    };
    match bytes.split_first() {
        Some((&FORMAT_V1, rest)) => postcard::from_bytes(rest).map_err(|e| corrupt(e.to_string())),
        Some((&FORMAT_JSON, rest)) => {
            serde_json::from_slice(rest).map_err(|e| corrupt(e.to_string()))
        }
        Some((v, _)) => Err(corrupt(format!("unknown format {v}"))),
        None => Err(corrupt("empty value".into())),
    }
}

fn scan<T: DeserializeOwned>(tree: &sled::Tree, prefix: &[u8]) -> Result<Vec<T>, StoreError> {
    tree.scan_prefix(prefix)
        .map(|kv| {
            let (k, v) = kv.map_err(engine)?;
            decode(&k, &v)
        })
        .collect()
}

impl Store for SledStore {
    fn ensure_client(&self, name: &str, now_ms: u64) -> Result<(ClientRecord, bool), StoreError> {
        let record = ClientRecord {
            name: name.to_owned(),
            created_ms: now_ms,
        };
        let prev = self
            .clients
            .compare_and_swap(
                name.as_bytes(),
                None as Option<&[u8]>,
                Some(encode(&record)?),
            )
            .map_err(engine)?;
        match prev {
            Ok(()) => {
                self.flush()?;
                Ok((record, true))
            }
            Err(cas) => {
                let current = cas
                    .current
                    .ok_or_else(|| StoreError::Engine("client vanished".into()))?;
                Ok((decode(name.as_bytes(), &current)?, false))
            }
        }
    }

    fn ensure_site(&self, client: &str, site: &str, now_ms: u64) -> Result<bool, StoreError> {
        self.ensure_client(client, now_ms)?;
        let record = SiteRecord {
            client: client.to_owned(),
            name: site.to_owned(),
            created_ms: now_ms,
        };
        let created = self
            .sites
            .compare_and_swap(
                key(&[client.as_bytes(), site.as_bytes()]),
                None as Option<&[u8]>,
                Some(encode(&record)?),
            )
            .map_err(engine)?
            .is_ok();
        if created {
            self.flush()?;
        }
        Ok(created)
    }

    fn client(&self, name: &str) -> Result<Option<ClientRecord>, StoreError> {
        self.clients
            .get(name.as_bytes())
            .map_err(engine)?
            .map(|v| decode(name.as_bytes(), &v))
            .transpose()
    }

    fn clients(&self) -> Result<Vec<ClientRecord>, StoreError> {
        scan(&self.clients, b"")
    }

    fn sites(&self, client: &str) -> Result<Vec<SiteRecord>, StoreError> {
        scan(&self.sites, &prefix(&[client.as_bytes()]))
    }

    fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        self.tokens
            .insert(token.id.as_bytes(), encode(token)?)
            .map_err(engine)?;
        self.flush()
    }

    fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.tokens
            .get(id.as_bytes())
            .map_err(engine)?
            .map(|v| decode(id.as_bytes(), &v))
            .transpose()
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        scan(&self.tokens, b"")
    }

    fn apply_batch(
        &self,
        scope: &Scope,
        batch: &BatchId,
        observations: &[CleanObservation],
    ) -> Result<BatchOutcome, StoreError> {
        let client = scope.client.as_bytes();
        let site = scope.site.as_bytes();
        let batch_key = key(&[
            client,
            site,
            batch.agent_id.as_bytes(),
            &batch.sequence.to_be_bytes(),
        ]);
        let applied_ms = observations
            .iter()
            .map(|o| o.observed_ms)
            .max()
            .unwrap_or(0);
        // The batch record: when it was applied, and the digest of its content.
        let mut record = applied_ms.to_be_bytes().to_vec();
        record.extend_from_slice(&batch.digest);
        let outcome = (
            &self.devices,
            &self.keys,
            &self.owners,
            &self.vmacs,
            &self.events,
            &self.batches,
        )
            .transaction(|(devices, keys, owners, vmacs, events, batches)| {
                if let Some(stored) = batches.get(&batch_key)? {
                    return Ok(if stored.get(8..) == Some(&batch.digest[..]) {
                        BatchOutcome::Duplicate
                    } else {
                        BatchOutcome::Conflict
                    });
                }
                let mut g = SledGraph {
                    client,
                    devices,
                    keys,
                    owners,
                    vmacs,
                    events,
                };
                for obs in observations {
                    identity::apply(&mut g, scope, &batch.agent_id, obs)?;
                }
                batches.insert(batch_key.as_slice(), record.as_slice())?;
                Ok(BatchOutcome::Stored)
            })
            .map_err(|e| match e {
                TransactionError::Abort(Refused::Store(e)) => e,
                TransactionError::Abort(Refused::Edit(e)) => StoreError::Engine(e.to_string()),
                TransactionError::Storage(e) => engine(e),
            })?;
        // The acknowledgement promises the batch is on disk: also for a duplicate, whose first
        // copy may still be on its way there (a resend racing the first flush).
        self.flush()?;
        Ok(outcome)
    }

    fn devices(&self, client: &str, site: Option<&str>) -> Result<Vec<DeviceRecord>, StoreError> {
        let c = client.as_bytes();
        let devices: Vec<DeviceRecord> = scan(&self.devices, &prefix(&[c]))?
            .into_iter()
            .filter(|d: &DeviceRecord| site.is_none_or(|s| d.sites.iter().any(|x| x == s)))
            .collect();
        let mut owners = BTreeMap::new();
        let owner_prefix = prefix(&[c]);
        for kv in self.owners.scan_prefix(&owner_prefix) {
            let (k, v) = kv.map_err(engine)?;
            let rest = &k[owner_prefix.len()..];
            let mut parts = rest.splitn(2, |b| *b == 0);
            let (Some(site), Some(ip)) = (parts.next(), parts.next()) else {
                continue;
            };
            let Some(ip) = std::str::from_utf8(ip)
                .ok()
                .and_then(|t| t.parse::<IpAddr>().ok())
            else {
                continue;
            };
            owners.insert(
                (String::from_utf8_lossy(site).into_owned(), ip),
                decode::<AddressOwner>(&k, &v)?,
            );
        }
        let mut virtual_macs = Vec::new();
        for kv in self.vmacs.scan_prefix(&owner_prefix) {
            let (k, v) = kv.map_err(engine)?;
            let Some(mac) = std::str::from_utf8(&k[owner_prefix.len()..])
                .ok()
                .and_then(|t| t.parse::<MacAddr>().ok())
            else {
                continue;
            };
            virtual_macs.push((mac, decode::<VirtualMacRecord>(&k, &v)?));
        }
        Ok(present(devices, &owners, &virtual_macs))
    }

    fn device(&self, client: &str, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        let k = key(&[client.as_bytes(), id.as_bytes()]);
        if self.devices.get(&k).map_err(engine)?.is_none() {
            return Ok(None);
        }
        Ok(self.devices(client, None)?.into_iter().find(|d| d.id == id))
    }

    fn edit(
        &self,
        client: &str,
        edit: &Edit,
        at_ms: u64,
    ) -> Result<Result<Event, EditError>, StoreError> {
        let c = client.as_bytes();
        let outcome = (
            &self.devices,
            &self.keys,
            &self.owners,
            &self.vmacs,
            &self.events,
        )
            .transaction(|(devices, keys, owners, vmacs, events)| {
                let mut g = SledGraph {
                    client: c,
                    devices,
                    keys,
                    owners,
                    vmacs,
                    events,
                };
                match run_edit(&mut g, client, edit, at_ms)? {
                    Ok(event) => Ok(Ok(event)),
                    // Refused: nothing may have been written half, so abort the transaction.
                    Err(refusal) => {
                        Err(ConflictableTransactionError::Abort(Refused::Edit(refusal)))
                    }
                }
            });
        let outcome = match outcome {
            Ok(event) => event,
            Err(TransactionError::Abort(Refused::Edit(refusal))) => return Ok(Err(refusal)),
            Err(TransactionError::Abort(Refused::Store(e))) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(engine(e)),
        };
        self.flush()?;
        Ok(outcome)
    }

    fn history(&self, client: &str) -> Result<Vec<Event>, StoreError> {
        scan(&self.events, &prefix(&[client.as_bytes()]))
    }

    fn put_policy(
        &self,
        client: &str,
        rules: &PolicyRules,
        at_ms: u64,
    ) -> Result<Policy, StoreError> {
        let p = prefix(&[client.as_bytes()]);
        // The next number after the client's last; compare-and-swap into an empty key, so two
        // operators saving at once get two versions, never one overwritten.
        loop {
            let last = match self.policies.scan_prefix(&p).next_back() {
                Some(kv) => {
                    let (k, _) = kv.map_err(engine)?;
                    k.get(p.len()..)
                        .and_then(|n| <[u8; 8]>::try_from(n).ok())
                        .map(u64::from_be_bytes)
                        .ok_or_else(|| StoreError::Corrupt {
                            key: String::from_utf8_lossy(&k).replace('\0', "/"),
                            reason: "policy key has no version number".into(),
                        })?
                }
                None => 0,
            };
            let n = last + 1;
            let policy = Policy {
                version: Policy::version_for(client, n),
                client: client.to_owned(),
                saved_ms: at_ms,
                rules: rules.clone(),
            };
            let swapped = self
                .policies
                .compare_and_swap(
                    key(&[client.as_bytes(), &n.to_be_bytes()]),
                    None as Option<&[u8]>,
                    Some(encode_json(&policy)?),
                )
                .map_err(engine)?;
            if swapped.is_ok() {
                self.flush()?;
                return Ok(policy);
            }
        }
    }

    fn policies(&self, client: &str) -> Result<Vec<Policy>, StoreError> {
        scan(&self.policies, &prefix(&[client.as_bytes()]))
    }

    fn policy(&self, client: &str) -> Result<Policy, StoreError> {
        match self
            .policies
            .scan_prefix(prefix(&[client.as_bytes()]))
            .next_back()
        {
            Some(kv) => {
                let (k, v) = kv.map_err(engine)?;
                decode(&k, &v)
            }
            None => Ok(Policy::default()),
        }
    }

    fn create_snapshot(&self, snapshot: &Snapshot) -> Result<bool, StoreError> {
        let k = key(&[snapshot.client.as_bytes(), snapshot.period.as_bytes()]);
        let value = encode_json(snapshot)?;
        // One transaction that refuses to overwrite: a snapshot is written once, whole.
        let created = self
            .snapshots
            .transaction(|t| {
                if t.get(&k)?.is_some() {
                    return Ok(false);
                }
                t.insert(k.as_slice(), value.as_slice())?;
                Ok(true)
            })
            .map_err(|e: TransactionError<()>| match e {
                TransactionError::Storage(e) => engine(e),
                TransactionError::Abort(()) => StoreError::Engine("snapshot write aborted".into()),
            })?;
        if created {
            self.flush()?;
        }
        Ok(created)
    }

    fn snapshot(&self, client: &str, period: &str) -> Result<Option<Snapshot>, StoreError> {
        let k = key(&[client.as_bytes(), period.as_bytes()]);
        self.snapshots
            .get(&k)
            .map_err(engine)?
            .map(|v| decode(&k, &v))
            .transpose()
    }

    fn snapshots(&self, client: &str) -> Result<Vec<Snapshot>, StoreError> {
        scan(&self.snapshots, &prefix(&[client.as_bytes()]))
    }
}

/// Why an edit's transaction was aborted.
enum Refused {
    Edit(EditError),
    Store(StoreError),
}

impl From<StoreError> for Refused {
    fn from(e: StoreError) -> Self {
        Refused::Store(e)
    }
}

// === impl SledGraph ===

/// The identity graph of one client, inside a sled transaction.
struct SledGraph<'a> {
    client: &'a [u8],
    devices: &'a TransactionalTree,
    keys: &'a TransactionalTree,
    owners: &'a TransactionalTree,
    vmacs: &'a TransactionalTree,
    events: &'a TransactionalTree,
}

type TxError<E> = ConflictableTransactionError<E>;

fn tx_get<T: DeserializeOwned, E: From<StoreError>>(
    tree: &TransactionalTree,
    k: &[u8],
) -> Result<Option<T>, TxError<E>> {
    match tree.get(k)? {
        Some(v) => decode(k, &v)
            .map(Some)
            .map_err(|e| TxError::Abort(e.into())),
        None => Ok(None),
    }
}

fn tx_put<T: Serialize, E: From<StoreError>>(
    tree: &TransactionalTree,
    k: Vec<u8>,
    value: &T,
) -> Result<(), TxError<E>> {
    tree.insert(k, encode(value).map_err(|e| TxError::Abort(e.into()))?)?;
    Ok(())
}

macro_rules! sled_graph {
    ($err:ty) => {
        impl Graph for SledGraph<'_> {
            type Error = TxError<$err>;

            fn key(&mut self, k: &str) -> Result<Option<KeyRecord>, Self::Error> {
                tx_get(self.keys, &key(&[self.client, k.as_bytes()]))
            }
            fn put_key(&mut self, k: &str, record: &KeyRecord) -> Result<(), Self::Error> {
                tx_put(self.keys, key(&[self.client, k.as_bytes()]), record)
            }
            fn device(&mut self, id: &str) -> Result<Option<DeviceRecord>, Self::Error> {
                tx_get(self.devices, &key(&[self.client, id.as_bytes()]))
            }
            fn put_device(&mut self, device: &DeviceRecord) -> Result<(), Self::Error> {
                tx_put(
                    self.devices,
                    key(&[self.client, device.id.as_bytes()]),
                    device,
                )
            }
            fn delete_device(&mut self, id: &str) -> Result<(), Self::Error> {
                self.devices.remove(key(&[self.client, id.as_bytes()]))?;
                Ok(())
            }
            fn address_owner(
                &mut self,
                site: &str,
                ip: IpAddr,
            ) -> Result<Option<AddressOwner>, Self::Error> {
                tx_get(
                    self.owners,
                    &key(&[self.client, site.as_bytes(), ip.to_string().as_bytes()]),
                )
            }
            fn put_address_owner(
                &mut self,
                site: &str,
                ip: IpAddr,
                owner: &AddressOwner,
            ) -> Result<(), Self::Error> {
                tx_put(
                    self.owners,
                    key(&[self.client, site.as_bytes(), ip.to_string().as_bytes()]),
                    owner,
                )
            }
            fn virtual_mac(
                &mut self,
                mac: MacAddr,
            ) -> Result<Option<VirtualMacRecord>, Self::Error> {
                tx_get(self.vmacs, &key(&[self.client, mac.to_string().as_bytes()]))
            }
            fn put_virtual_mac(
                &mut self,
                mac: MacAddr,
                record: &VirtualMacRecord,
            ) -> Result<(), Self::Error> {
                tx_put(
                    self.vmacs,
                    key(&[self.client, mac.to_string().as_bytes()]),
                    record,
                )
            }
            fn event(&mut self, seq: u64) -> Result<Option<Event>, Self::Error> {
                tx_get(self.events, &key(&[self.client, &seq.to_be_bytes()]))
            }
            fn put_event(&mut self, event: &mut Event) -> Result<(), Self::Error> {
                if event.seq == 0 {
                    // Unique and increasing across the database; ids start at 0, events at 1.
                    event.seq = self.events.generate_id()? + 1;
                }
                tx_put(
                    self.events,
                    key(&[self.client, &event.seq.to_be_bytes()]),
                    event,
                )
            }
        }
    };
}

sled_graph!(Refused);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sled_store_keeps_the_contract() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        super::super::contract::run(&store);
    }

    #[test]
    fn sled_store_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = SledStore::open(dir.path()).expect("open");
            store.ensure_site("acme", "hq", 1).expect("site");
        }
        let store = SledStore::open(dir.path()).expect("reopen");
        assert_eq!(store.sites("acme").expect("sites").len(), 1);
    }

    #[test]
    fn policies_and_snapshots_survive_reopen() {
        use crate::{
            policy::{PolicyRules, RandomizedRule},
            snapshot::{self, Period},
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let rules = PolicyRules {
            randomized: RandomizedRule::CountIfNamed,
            ..PolicyRules::default()
        };
        let period = Period::parse("2026-11").expect("period");
        let snap = {
            let store = SledStore::open(dir.path()).expect("open");
            let policy = store.put_policy("acme", &rules, 5).expect("put");
            let snap = snapshot::build("acme", period, &policy, &[], 6);
            assert!(store.create_snapshot(&snap).expect("create"));
            snap
        };
        let store = SledStore::open(dir.path()).expect("reopen");
        assert_eq!(store.policy("acme").expect("policy").version, "acme-1");
        assert_eq!(store.policy("acme").expect("policy").rules, rules);
        assert_eq!(store.snapshot("acme", "2026-11").expect("get"), Some(snap));
        assert!(
            !store
                .create_snapshot(&snapshot::build(
                    "acme",
                    period,
                    &Default::default(),
                    &[],
                    7
                ))
                .expect("create")
        );
        assert_eq!(
            store.put_policy("acme", &rules, 8).expect("put").version,
            "acme-2"
        );
    }

    #[test]
    fn corrupt_values_are_reported_not_panicked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        store
            .clients
            .insert("acme", &[FORMAT_V1, 0xff, 0xff][..])
            .expect("insert");
        store.clients.insert("zed", &[][..]).expect("insert");
        assert!(matches!(
            store.client("acme"),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            store.client("zed"),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
