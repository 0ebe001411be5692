//! Persistence behind one trait, so the engine can change without the services noticing.
//!
//! - [`sled`]: the default store, embedded, nothing to install.
//! - [`memory`]: the same contract in memory, for tests and tools.
//!
//! Every key is scoped by client (and site where it applies); a store never answers a question
//! across clients. [`Store::apply_batch`] is atomic and durable: when it returns `Ok`, the batch
//! and its effect on devices are on disk together, and the batch is marked applied so a replay
//! changes nothing.

pub mod memory;
pub mod sled;

use crate::model::{
    self, CleanObservation, ClientRecord, DeviceRecord, Scope, SiteRecord, TokenRecord,
};

/// What happened to a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Applied and durably stored.
    Stored,
    /// Already stored earlier, with the same content: nothing was applied again.
    Duplicate,
    /// A different batch was stored earlier under the same agent and sequence (an agent whose
    /// state was restored from a backup or cloned): nothing was applied.
    Conflict,
}

/// Names a batch: (agent, sequence) within the token's scope, and a digest of its content
/// that tells a replay from a reused sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchId {
    pub agent_id: String,
    pub sequence: u64,
    pub digest: [u8; 32],
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage engine error: {0}")]
    Engine(String),
    #[error("stored record {key} cannot be decoded: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("no client named {0:?}")]
    NoSuchClient(String),
    #[error(
        "data directory {path} is in use by another census-collector (or not writable): {reason}"
    )]
    Locked { path: String, reason: String },
}

/// The collector's storage contract. Methods block; async callers use `spawn_blocking`.
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Creates the client if new; returns it and whether it was created.
    fn ensure_client(&self, name: &str, now_ms: u64) -> Result<(ClientRecord, bool), StoreError>;
    /// Creates the site (and its client) if new; returns whether the site was created.
    fn ensure_site(&self, client: &str, site: &str, now_ms: u64) -> Result<bool, StoreError>;
    fn client(&self, name: &str) -> Result<Option<ClientRecord>, StoreError>;
    fn clients(&self) -> Result<Vec<ClientRecord>, StoreError>;
    fn sites(&self, client: &str) -> Result<Vec<SiteRecord>, StoreError>;

    /// Stores (or replaces) a token record, durably.
    fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError>;
    fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError>;
    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;

    /// Applies a batch of validated observations for `scope`, atomically and durably, at most
    /// once per (scope, agent, sequence).
    fn apply_batch(
        &self,
        scope: &Scope,
        batch: &BatchId,
        observations: &[CleanObservation],
    ) -> Result<BatchOutcome, StoreError>;

    /// A client's devices, optionally of one site, in key order.
    fn devices(&self, client: &str, site: Option<&str>) -> Result<Vec<DeviceRecord>, StoreError>;
}

/// Folds a batch into devices through a store's own read and write of device records, so both
/// stores share one definition of what a batch does.
pub(crate) fn fold_batch<E>(
    scope: &Scope,
    agent_id: &str,
    observations: &[CleanObservation],
    mut get: impl FnMut(&str) -> Result<Option<DeviceRecord>, E>,
    mut put: impl FnMut(&str, &DeviceRecord) -> Result<(), E>,
) -> Result<(), E> {
    for obs in observations {
        let Some(key) = model::device_key(obs) else {
            continue;
        };
        let existing = get(&key)?;
        let updated = model::apply_observation(existing, scope, &key, agent_id, obs);
        put(&key, &updated)?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod contract {
    //! The behaviour every store must have, run against each implementation.

    use census_proto::{convert, v1};

    use super::*;

    fn obs(ip: &str, mac: [u8; 6], at: u64) -> CleanObservation {
        let wire = v1::Observation {
            observed_at: Some(convert::timestamp_from_millis(at)),
            method: v1::Method::Arp as i32,
            addresses: vec![v1::IpAddress {
                address: ip.into(),
                answered: true,
                ..Default::default()
            }],
            macs: vec![mac.to_vec()],
            ..Default::default()
        };
        model::clean_observation(&wire, at, 0).expect("valid observation")
    }

    fn scope(client: &str, site: &str) -> Scope {
        Scope {
            client: client.into(),
            site: site.into(),
        }
    }

    pub(crate) fn run(store: &dyn Store) {
        let (_, created) = store.ensure_client("acme", 1).expect("client");
        assert!(created);
        assert!(!store.ensure_client("acme", 2).expect("client").1);
        assert!(store.ensure_site("acme", "hq", 1).expect("site"));
        assert!(!store.ensure_site("acme", "hq", 1).expect("site"));
        assert!(store.ensure_site("globex", "hq", 1).expect("site"));
        assert_eq!(store.clients().expect("clients").len(), 2);
        assert_eq!(store.sites("acme").expect("sites").len(), 1);

        let a = scope("acme", "hq");
        let g = scope("globex", "hq");
        let batch = [
            obs("198.18.0.10", [0, 0x16, 0x3e, 0, 0, 1], 100),
            obs("198.18.0.11", [0, 0x16, 0x3e, 0, 0, 2], 100),
        ];
        let id = |agent: &str, sequence: u64, digest: u8| BatchId {
            agent_id: agent.into(),
            sequence,
            digest: [digest; 32],
        };
        assert_eq!(
            store
                .apply_batch(&a, &id("ag", 1, 1), &batch)
                .expect("apply"),
            BatchOutcome::Stored
        );
        assert_eq!(
            store
                .apply_batch(&a, &id("ag", 1, 1), &batch)
                .expect("apply"),
            BatchOutcome::Duplicate
        );
        // The same agent id and sequence under another client is another batch.
        assert_eq!(
            store
                .apply_batch(&g, &id("ag", 1, 1), &batch[..1])
                .expect("apply"),
            BatchOutcome::Stored
        );

        // The same agent and sequence with other content is a conflict, and changes nothing.
        assert_eq!(
            store
                .apply_batch(&a, &id("ag", 1, 2), &batch[..1])
                .expect("apply"),
            BatchOutcome::Conflict
        );
        let acme = store.devices("acme", None).expect("devices");
        assert_eq!(acme.len(), 2);
        assert!(
            acme.iter().all(|d| d.evidence[0].observations == 1),
            "replay applied twice"
        );
        assert_eq!(store.devices("globex", None).expect("devices").len(), 1);
        assert_eq!(store.devices("acme", Some("hq")).expect("devices").len(), 2);
        assert_eq!(
            store
                .devices("acme", Some("branch"))
                .expect("devices")
                .len(),
            0
        );
        // A client whose name is a prefix of another's sees nothing of it.
        assert_eq!(store.devices("acm", None).expect("devices").len(), 0);

        let token = TokenRecord {
            id: "t1".into(),
            secret_sha256: [7; 32],
            client: "acme".into(),
            site: "hq".into(),
            created_ms: 1,
            revoked: false,
        };
        store.put_token(&token).expect("token");
        assert_eq!(store.token("t1").expect("token"), Some(token));
        assert_eq!(store.token("t2").expect("token"), None);
        assert_eq!(store.tokens().expect("tokens").len(), 1);
    }
}
