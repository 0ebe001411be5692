//! The default store: sled, embedded in the collector, one directory, nothing to install.
//!
//! Trees and keys (`\0` separates parts; names never contain it):
//! - `clients`: `client` -> [`ClientRecord`]
//! - `sites`: `client\0site` -> [`SiteRecord`]
//! - `tokens`: `token id` -> [`TokenRecord`]
//! - `devices`: `client\0site\0device key` -> [`DeviceRecord`]
//! - `batches`: `client\0site\0agent id\0sequence (u64 BE)` -> applied-at millis (u64 BE)
//!   and the SHA-256 of the batch's content
//!
//! Values are one format byte followed by postcard. Every write that is acknowledged to anyone
//! is flushed first: sled's background flush alone can lose the last half second.

use std::path::Path;

use serde::{Serialize, de::DeserializeOwned};
use sled::{
    Transactional,
    transaction::{ConflictableTransactionError, TransactionError},
};

use super::{BatchId, BatchOutcome, Store, StoreError, fold_batch};
use crate::model::{CleanObservation, ClientRecord, DeviceRecord, Scope, SiteRecord, TokenRecord};

/// Format byte in front of every stored value.
const FORMAT_V1: u8 = 1;

/// The sled-backed store. Cheap to clone handles are inside; share it behind an `Arc`.
#[derive(Debug, Clone)]
pub struct SledStore {
    db: sled::Db,
    clients: sled::Tree,
    sites: sled::Tree,
    tokens: sled::Tree,
    devices: sled::Tree,
    batches: sled::Tree,
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
            batches: tree("batches")?,
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

fn decode<T: DeserializeOwned>(k: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        key: String::from_utf8_lossy(k).replace('\0', "/"),
        reason,
    };
    match bytes.split_first() {
        Some((&FORMAT_V1, rest)) => postcard::from_bytes(rest).map_err(|e| corrupt(e.to_string())),
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
        let outcome = (&self.devices, &self.batches)
            .transaction(|(devices, batches)| {
                let abort = ConflictableTransactionError::Abort;
                if let Some(stored) = batches.get(&batch_key)? {
                    return Ok(if stored.get(8..) == Some(&batch.digest[..]) {
                        BatchOutcome::Duplicate
                    } else {
                        BatchOutcome::Conflict
                    });
                }
                fold_batch(
                    scope,
                    &batch.agent_id,
                    observations,
                    |k| {
                        let dk = key(&[client, site, k.as_bytes()]);
                        match devices.get(&dk)? {
                            Some(v) => decode(&dk, &v).map(Some).map_err(abort),
                            None => Ok(None),
                        }
                    },
                    |k, dev| {
                        let dk = key(&[client, site, k.as_bytes()]);
                        devices.insert(dk, encode(dev).map_err(abort)?)?;
                        Ok(())
                    },
                )?;
                batches.insert(batch_key.as_slice(), record.as_slice())?;
                Ok(BatchOutcome::Stored)
            })
            .map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => engine(e),
            })?;
        // The acknowledgement promises the batch is on disk: also for a duplicate, whose first
        // copy may still be on its way there (a resend racing the first flush).
        self.flush()?;
        Ok(outcome)
    }

    fn devices(&self, client: &str, site: Option<&str>) -> Result<Vec<DeviceRecord>, StoreError> {
        let p = match site {
            Some(site) => prefix(&[client.as_bytes(), site.as_bytes()]),
            None => prefix(&[client.as_bytes()]),
        };
        scan(&self.devices, &p)
    }
}

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
