//! Persistence behind one trait, so the engine can change without the services noticing.
//!
//! - [`sled`]: the default store, embedded, nothing to install.
//! - [`memory`]: the same contract in memory, for tests and tools.
//!
//! Every key is scoped by client (and site where it applies); a store never answers a question
//! across clients. [`Store::apply_batch`] is atomic and durable: when it returns `Ok`, the batch
//! and its effect on devices are on disk together, and the batch is marked applied so a replay
//! changes nothing.
//!
//! Counting policies and billing snapshots are stored here too: a saved policy gets the next
//! version of its client and is never changed afterwards; a snapshot is written once per
//! (client, period) and a second write is refused, never applied.

pub mod memory;
pub mod sled;

use std::{collections::BTreeMap, net::IpAddr};

use census_proto::convert::MacAddr;

use crate::{
    identity::{self, AddressOwner, EditResult, Event, Graph, VirtualMacRecord},
    model::{
        AddressRecord, AgentRecord, CleanObservation, ClientRecord, DeviceRecord, Scope,
        SiteRecord, TokenRecord,
    },
    policy::{self, Policy, PolicyRules, Tally},
    snapshot::Snapshot,
    users::{
        Account, SourceStatus, UserPolicy, UserPolicyRules,
        apply::{Outcome as ReadOutcome, Read, ReadPart},
    },
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

/// Names a batch: (agent, epoch, sequence) within the certificate's scope, and a digest of its
/// content that tells a replay from a reused sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchId {
    /// The agent its certificate names (never what the batch says).
    pub agent_id: String,
    /// The agent's sequence epoch: an agent whose sequences were already used (its state was
    /// restored or copied) starts a new epoch under the same id.
    pub epoch: u64,
    pub sequence: u64,
    pub digest: [u8; 32],
}

impl BatchId {
    /// The name the batch's sequence is kept under: the agent id, and for epochs past 0 a NUL
    /// and the epoch (agent ids hold no control characters, so no two streams share a name;
    /// epoch 0 keeps the name batches had before epochs, so replays of those stay duplicates).
    pub fn stream(&self) -> std::borrow::Cow<'_, str> {
        if self.epoch == 0 {
            std::borrow::Cow::Borrowed(&self.agent_id)
        } else {
            std::borrow::Cow::Owned(format!("{}\0{}", self.agent_id, self.epoch))
        }
    }
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
    /// The store cannot write now (its disk is full or failing). Nothing of the refused write
    /// is kept, and what was stored before still answers; writes resume by themselves once
    /// the disk takes them again, so the caller should try again later.
    #[error("the store cannot write now: {0}")]
    Unavailable(String),
}

/// The collector's storage contract. Methods block; async callers use `spawn_blocking`.
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Why the store cannot take writes now, if it cannot (a full or failing disk); `None`
    /// when it can. The collector reports it as its ingest service's health and a metric.
    fn write_failure(&self) -> Option<String> {
        None
    }

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

    /// Stores an enrolled agent and the token that enrolled it (now marked used), together and
    /// durably: a token is never spent without its agent, nor an agent stored with its token
    /// still unspent.
    fn enroll(&self, token: &TokenRecord, agent: &AgentRecord) -> Result<(), StoreError>;
    /// Stores (or replaces) an agent record; with `durable`, on disk before returning (a
    /// revocation), otherwise with the store's next flush (a last-seen time).
    fn put_agent(&self, agent: &AgentRecord, durable: bool) -> Result<(), StoreError>;
    fn agents(&self) -> Result<Vec<AgentRecord>, StoreError>;

    /// Applies a batch of validated observations for `scope`, atomically and durably, at most
    /// once per (scope, agent, sequence).
    fn apply_batch(
        &self,
        scope: &Scope,
        batch: &BatchId,
        observations: &[CleanObservation],
    ) -> Result<BatchOutcome, StoreError>;

    /// A client's devices, optionally only those seen at one site, in id order, ready for
    /// people (see [`present`]).
    fn devices(&self, client: &str, site: Option<&str>) -> Result<Vec<DeviceRecord>, StoreError>;

    /// The client's counts under `policy` at `now_ms`: every device [`policy::counts`] admits,
    /// by category. Stores override this to count from a compact index instead of whole
    /// records; the answer must be the same.
    fn tally(&self, client: &str, policy: &Policy, now_ms: u64) -> Result<Tally, StoreError> {
        let mut tally = Tally::default();
        for dev in self.devices(client, None)? {
            tally.add_summary(policy, &policy::DeviceSummary::of(&dev), now_ms);
        }
        Ok(tally)
    }

    /// One device of a client.
    fn device(&self, client: &str, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        Ok(self.devices(client, None)?.into_iter().find(|d| d.id == id))
    }

    /// Applies an operator's edit, atomically and durably.
    fn edit(
        &self,
        client: &str,
        edit: &Edit,
        at_ms: u64,
    ) -> Result<Result<Event, identity::EditError>, StoreError>;

    /// The client's merges and splits, oldest first.
    fn history(&self, client: &str) -> Result<Vec<Event>, StoreError>;

    /// Saves `rules` as the client's counting policy under its next version (`<client>-<n>`),
    /// durably, and returns it. Earlier versions stay stored.
    fn put_policy(
        &self,
        client: &str,
        rules: &PolicyRules,
        at_ms: u64,
    ) -> Result<Policy, StoreError>;

    /// Every policy saved for the client, oldest first.
    fn policies(&self, client: &str) -> Result<Vec<Policy>, StoreError>;

    /// The client's current policy: the last one saved, or the default.
    fn policy(&self, client: &str) -> Result<Policy, StoreError> {
        Ok(self.policies(client)?.pop().unwrap_or_default())
    }

    /// Stores a billing snapshot, durably, unless its client and period already have one.
    /// Returns `false` (and writes nothing) when one exists: snapshots are immutable.
    fn create_snapshot(&self, snapshot: &Snapshot) -> Result<bool, StoreError>;

    /// The client's snapshot for `period` (`YYYY-MM`).
    fn snapshot(&self, client: &str, period: &str) -> Result<Option<Snapshot>, StoreError>;

    /// The client's snapshots, oldest period first.
    fn snapshots(&self, client: &str) -> Result<Vec<Snapshot>, StoreError>;

    /// Stores one part of a directory read that an agent of `scope` sent in batch `batch`,
    /// atomically and durably, at most once per batch (as [`Store::apply_batch`]); when the part
    /// completes its read, the read replaces the source's accounts (see
    /// [`crate::users::apply`]). The outcome is `None` for a duplicate or a conflict.
    fn apply_directory_part(
        &self,
        scope: &Scope,
        batch: &BatchId,
        part: &ReadPart,
    ) -> Result<(BatchOutcome, Option<ReadOutcome>), StoreError>;

    /// Applies a complete read of one of the client's user sources (or records a failed one),
    /// atomically and durably.
    fn apply_user_read(&self, client: &str, read: &Read) -> Result<ReadOutcome, StoreError>;

    /// Every account of the client, present or not, and the state of each of its sources.
    fn user_accounts(&self, client: &str) -> Result<(Vec<Account>, Vec<SourceStatus>), StoreError>;

    /// Saves `rules` as the client's billable-user policy under its next version
    /// (`<client>-users-<n>`), durably. Earlier versions stay stored.
    fn put_user_policy(
        &self,
        client: &str,
        rules: &UserPolicyRules,
        at_ms: u64,
    ) -> Result<UserPolicy, StoreError>;

    /// Every user policy saved for the client, oldest first.
    fn user_policies(&self, client: &str) -> Result<Vec<UserPolicy>, StoreError>;

    /// The client's current user policy: the last one saved, or the default.
    fn user_policy(&self, client: &str) -> Result<UserPolicy, StoreError> {
        Ok(self.user_policies(client)?.pop().unwrap_or_default())
    }
}

/// An operator's edit of a client's devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// Merge device `b` into device `a`.
    Merge {
        a: String,
        b: String,
        reason: String,
    },
    /// Split `keys` out of device `id`.
    Split {
        id: String,
        keys: Vec<String>,
        reason: String,
    },
    /// Undo history event `seq`.
    Undo { seq: u64 },
}

/// Applies an edit through a graph.
pub(crate) fn run_edit<G: Graph>(
    g: &mut G,
    client: &str,
    edit: &Edit,
    at_ms: u64,
) -> EditResult<G::Error> {
    match edit {
        Edit::Merge { a, b, reason } => identity::merge(g, client, a, b, reason, at_ms),
        Edit::Split { id, keys, reason } => identity::split(g, client, id, keys, reason, at_ms),
        Edit::Undo { seq } => identity::undo(g, client, *seq, at_ms),
    }
}

/// Readies stored devices for people: which addresses are current, previous or lost, and the
/// virtual router addresses they hold. Both engines list through it, so they cannot differ.
pub(crate) fn present(
    mut devices: Vec<DeviceRecord>,
    owners: &BTreeMap<(String, IpAddr), AddressOwner>,
    virtual_macs: &[(MacAddr, VirtualMacRecord)],
) -> Vec<DeviceRecord> {
    let sightings = identity::Sightings::new(owners);
    for dev in &mut devices {
        identity::mark_current(dev, owners, &sightings);
        for (mac, v) in virtual_macs {
            if v.owner.as_ref().is_some_and(|o| dev.keys.contains(o)) {
                for a in &v.addresses {
                    dev.anomalies.push(format!(
                        "holds virtual router address {} ({mac}) at {}",
                        a.ip, a.site
                    ));
                    if !dev
                        .addresses
                        .iter()
                        .any(|x| x.ip == a.ip && x.site == a.site)
                    {
                        dev.addresses.push(AddressRecord {
                            answered: false,
                            ..a.clone()
                        });
                    }
                }
            }
        }
    }
    devices
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
        crate::model::clean_observation(&wire, at, 0).expect("valid observation")
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
            epoch: 0,
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

        edits_and_tallies(store);
        listings(store);

        let token = TokenRecord {
            id: "t1".into(),
            secret_sha256: [7; 32],
            client: "acme".into(),
            site: "hq".into(),
            created_ms: 1,
            revoked: false,
            expires_ms: 2,
            used_by: None,
            used_ms: None,
        };
        store.put_token(&token).expect("token");
        assert_eq!(store.token("t1").expect("token"), Some(token.clone()));
        assert_eq!(store.token("t2").expect("token"), None);
        assert_eq!(store.tokens().expect("tokens").len(), 1);

        let used = TokenRecord {
            used_by: Some("a1".into()),
            used_ms: Some(3),
            ..token
        };
        let mut agent = AgentRecord {
            id: "a1".into(),
            client: "acme".into(),
            site: "hq".into(),
            hostname: "box".into(),
            version: "0.1.0".into(),
            token_id: "t1".into(),
            enrolled_ms: 3,
            cert_sha256: [9; 32],
            cert_not_after_ms: 10,
            revoked: false,
            last_seen_ms: 0,
            backlog: 0,
        };
        store.enroll(&used, &agent).expect("enroll");
        assert_eq!(store.token("t1").expect("token"), Some(used));
        assert_eq!(store.agents().expect("agents"), vec![agent.clone()]);
        agent.revoked = true;
        store.put_agent(&agent, true).expect("agent");
        assert_eq!(store.agents().expect("agents"), vec![agent]);

        policies(store);
        snapshots(store);
        users(store);
    }

    fn users(store: &dyn Store) {
        use crate::users::{
            self, SourceKind, UserPolicyRules,
            apply::{Outcome, Read, ReadData, ReadPart},
        };

        let user = |n: u8, name: &str| v1::DirectoryUser {
            object_guid: [n; 16].to_vec(),
            object_sid: format!("S-1-5-21-9-9-9-{}", 1100 + u32::from(n)),
            sam_account_name: name.into(),
            sam_account_type: users::SAM_NORMAL_USER_ACCOUNT,
            ..Default::default()
        };
        let part = |read: &str, at: u64, part: u32, parts: u32, names: &[(u8, &str)]| ReadPart {
            source: "ad:corp.example".into(),
            read_id: read.into(),
            part,
            parts,
            read_at_ms: at,
            error: None,
            accounts: names
                .iter()
                .filter_map(|(n, name)| users::ad_account("ad:corp.example", &user(*n, name), at))
                .collect(),
        };
        let id = |sequence: u64, digest: u8| BatchId {
            agent_id: "ag".into(),
            epoch: 0,
            sequence,
            digest: [digest; 32],
        };
        let a = scope("acme", "hq");
        let present = |client: &str| {
            let (accounts, _) = store.user_accounts(client).expect("accounts");
            accounts.iter().filter(|a| a.present).count()
        };
        let p2 = part("r1", 100, 2, 2, &[(3, "carol")]);
        assert_eq!(
            store
                .apply_directory_part(&a, &id(10, 1), &p2)
                .expect("part"),
            (BatchOutcome::Stored, Some(Outcome::Staged { missing: 1 }))
        );
        // The same batch again is a duplicate; other content under its sequence a conflict.
        assert_eq!(
            store
                .apply_directory_part(&a, &id(10, 1), &p2)
                .expect("part")
                .0,
            BatchOutcome::Duplicate
        );
        assert_eq!(
            store
                .apply_directory_part(&a, &id(10, 2), &p2)
                .expect("part")
                .0,
            BatchOutcome::Conflict
        );
        assert_eq!(present("acme"), 0, "a read counts once complete");
        let p1 = part("r1", 100, 1, 2, &[(1, "alice"), (2, "bob")]);
        assert_eq!(
            store
                .apply_directory_part(&a, &id(11, 1), &p1)
                .expect("part")
                .1,
            Some(Outcome::Applied {
                present: 3,
                added: 3,
                removed: 0
            })
        );
        assert_eq!(present("acme"), 3);
        assert_eq!(present("acm"), 0);
        assert_eq!(present("globex"), 0);

        // Entra ID reads, and a failed one that keeps everything.
        let graph_read = |at: u64, outcome| Read {
            source: "entra:tenant".into(),
            kind: SourceKind::EntraId,
            read_id: format!("g{at}"),
            read_at_ms: at,
            outcome,
        };
        let ok = store
            .apply_user_read("acme", &graph_read(200, Ok(ReadData::default())))
            .expect("read");
        assert!(matches!(ok, Outcome::Applied { present: 0, .. }));
        let failed = store
            .apply_user_read("acme", &graph_read(300, Err("expired secret".into())))
            .expect("read");
        assert_eq!(failed, Outcome::Failed);
        let (_, sources) = store.user_accounts("acme").expect("accounts");
        assert_eq!(sources.len(), 2);
        let entra = sources
            .iter()
            .find(|s| s.source == "entra:tenant")
            .expect("entra source");
        assert_eq!(
            (entra.stale(), entra.read_ms, entra.error.as_deref()),
            (true, Some(200), Some("expired secret"))
        );
        assert_eq!(present("acme"), 3);

        // Versioned user policies, per client.
        assert_eq!(
            store.user_policy("acme").expect("policy").version,
            users::policy::DEFAULT_VERSION
        );
        let rules = UserPolicyRules {
            stale_logon_days: 0,
            ..UserPolicyRules::default()
        };
        let u1 = store.put_user_policy("acme", &rules, 5).expect("put");
        let u2 = store
            .put_user_policy("acme", &UserPolicyRules::default(), 6)
            .expect("put");
        assert_eq!(
            (u1.version.as_str(), u2.version.as_str()),
            ("acme-users-1", "acme-users-2")
        );
        assert_eq!(store.user_policies("acme").expect("list"), [u1, u2.clone()]);
        assert_eq!(store.user_policy("acme").expect("policy"), u2);
        assert!(store.user_policies("acm").expect("list").is_empty());
        // The device policies are their own series.
        assert_eq!(store.policy("globex").expect("policy").version, "globex-1");
    }

    /// The store's count agrees with evaluating every device, before and after edits.
    fn assert_tally(store: &dyn Store, client: &str, policy: &Policy, now: u64, want: u64) {
        let tally = store.tally(client, policy, now).expect("tally");
        let mut expected = Tally::default();
        for d in store.devices(client, None).expect("devices") {
            expected.add(&d, &policy::evaluate(policy, &d, now));
        }
        assert_eq!(tally, expected, "{client} at {now}");
        assert_eq!(tally.devices, want, "{client} at {now}");
    }

    fn edits_and_tallies(store: &dyn Store) {
        use crate::policy::{PolicyRules, RandomizedRule};

        let all = Policy::default();
        assert_tally(store, "acme", &all, 200, 2);
        assert_eq!(
            store.tally("acme", &all, 200).expect("tally").by_category["unknown"],
            2
        );
        assert_tally(store, "globex", &all, 200, 1);
        assert_tally(store, "nobody", &all, 200, 0);
        let day = 24 * 60 * 60 * 1000;
        let short = Policy {
            version: "acme-x".into(),
            client: "acme".into(),
            saved_ms: 1,
            rules: PolicyRules {
                window_days: 1,
                categories: Vec::new(),
                randomized: RandomizedRule::Exclude,
            },
        };
        assert_tally(store, "acme", &short, 100 + day, 2);
        assert_tally(store, "acme", &short, 101 + day, 0);

        let ids: Vec<String> = store
            .devices("acme", None)
            .expect("devices")
            .into_iter()
            .map(|d| d.id)
            .collect();
        let merged = store
            .edit(
                "acme",
                &Edit::Merge {
                    a: ids[0].clone(),
                    b: ids[1].clone(),
                    reason: "one box".into(),
                },
                300,
            )
            .expect("edit")
            .expect("merged");
        assert_eq!(store.devices("acme", None).expect("devices").len(), 1);
        assert_tally(store, "acme", &all, 400, 1);
        // A refused edit changes nothing.
        let refused = store
            .edit(
                "acme",
                &Edit::Merge {
                    a: ids[0].clone(),
                    b: "no-such-device".into(),
                    reason: "typo".into(),
                },
                310,
            )
            .expect("edit");
        let refused = refused.expect_err("refused");
        assert_eq!(
            refused.to_string(),
            "no device \"no-such-device\" in client \"acme\": `census devices --client acme` lists its devices",
            "the refusal names the client it looked in"
        );
        assert_eq!(store.history("acme").expect("history").len(), 1);
        store
            .edit("acme", &Edit::Undo { seq: merged.seq }, 320)
            .expect("edit")
            .expect("undone");
        let history = store.history("acme").expect("history");
        assert_eq!(history.len(), 2);
        assert_eq!(history[0].undone_by, Some(history[1].seq));
        assert!(store.history("globex").expect("history").is_empty());
        assert_eq!(store.devices("acme", None).expect("devices").len(), 2);
        assert_tally(store, "acme", &all, 400, 2);
    }

    /// What both engines list, through [`present`]: after a split each device lists its own
    /// MACs and addresses; an address is current, previous or lost by the latest sighting; an
    /// `unknown` category keeps the agent's reason; snapshots follow.
    fn listings(store: &dyn Store) {
        use crate::{
            policy::Policy,
            snapshot::{self, Period},
        };

        let s = scope("initech", "hq");
        store.ensure_site("initech", "hq", 1).expect("site");
        let (a, b, c) = (
            [0, 0x16, 0x3e, 0, 0x10, 1],
            [0, 0x16, 0x3e, 0, 0x10, 2],
            [0, 0x16, 0x3e, 0, 0x10, 3],
        );
        // A dual-NIC server (each NIC answers on its address, its SNMP lists both MACs), and a
        // DHCP host that gets a new lease.
        let nic = |ip: &str, mac: [u8; 6], at: u64| CleanObservation {
            interface_macs: vec![MacAddr(a), MacAddr(b)],
            methods: vec![v1::Method::Arp, v1::Method::Snmp],
            category: Some((
                v1::Category::Server,
                "SNMP sysDescr says Linux: server".into(),
            )),
            ..obs(ip, mac, at)
        };
        let unknown = |ip: &str, at: u64| CleanObservation {
            category: Some((v1::Category::Unknown, "no identifying evidence".into())),
            ..obs(ip, c, at)
        };
        let batches = [
            vec![
                nic("198.18.0.10", a, 1_000),
                nic("198.18.0.11", b, 1_003),
                unknown("198.18.0.20", 1_000),
            ],
            vec![unknown("198.18.0.21", 2_000)],
        ];
        for (i, batch) in batches.iter().enumerate() {
            let id = BatchId {
                agent_id: "ag".into(),
                epoch: 0,
                sequence: i as u64 + 1,
                digest: [9; 32],
            };
            store.apply_batch(&s, &id, batch).expect("apply");
        }
        let with = |devices: &[DeviceRecord], mac: [u8; 6]| {
            let key = format!("1mac:{}", MacAddr(mac));
            devices
                .iter()
                .find(|d| d.keys.contains(&key))
                .cloned()
                .expect("a device with that MAC")
        };
        let states = |d: &DeviceRecord| {
            d.addresses
                .iter()
                .map(|x| {
                    let state = match (x.current, x.lost) {
                        (true, _) => "current",
                        (false, true) => "lost",
                        (false, false) => "previous",
                    };
                    (x.ip.to_string(), state)
                })
                .collect::<Vec<_>>()
        };
        let pair = |ip: &str, state: &'static str| (ip.to_owned(), state);

        let devices = store.devices("initech", None).expect("devices");
        assert_eq!(devices.len(), 2);
        let server = with(&devices, a);
        assert_eq!(server.macs, [MacAddr(a), MacAddr(b)]);
        assert_eq!(
            states(&server),
            [
                pair("198.18.0.10", "current"),
                pair("198.18.0.11", "current")
            ]
        );
        let host = with(&devices, c);
        assert_eq!(
            states(&host),
            [
                pair("198.18.0.20", "previous"),
                pair("198.18.0.21", "current")
            ]
        );
        assert_eq!(crate::model::category(&host), "unknown");
        assert_eq!(host.category_reason, "no identifying evidence");

        store
            .edit(
                "initech",
                &Edit::Split {
                    id: server.id.clone(),
                    keys: vec![format!("1mac:{}", MacAddr(b))],
                    reason: "two boxes".into(),
                },
                3_000,
            )
            .expect("edit")
            .expect("split");
        let devices = store.devices("initech", None).expect("devices");
        let (left, right) = (with(&devices, a), with(&devices, b));
        assert_eq!(left.macs, [MacAddr(a)], "the split-out MAC left");
        assert_eq!(right.macs, [MacAddr(b)]);
        assert_eq!(states(&left), [pair("198.18.0.10", "current")]);
        assert_eq!(states(&right), [pair("198.18.0.11", "current")]);
        let snap = snapshot::build(
            "initech",
            Period::parse("2026-11").expect("period"),
            &Policy::default(),
            &devices,
            3_000,
        );
        let listed = |id: &str| {
            snap.devices
                .iter()
                .find(|d| d.id == id)
                .map(|d| d.addresses.clone())
        };
        assert_eq!(listed(&left.id), Some(vec!["hq/198.18.0.10".to_owned()]));
        assert_eq!(listed(&right.id), Some(vec!["hq/198.18.0.11".to_owned()]));
        assert_eq!(listed(&host.id), Some(vec!["hq/198.18.0.21".to_owned()]));
    }

    fn policies(store: &dyn Store) {
        use crate::policy::{DEFAULT_VERSION, PolicyRules, RandomizedRule};

        // No policy saved: the default.
        assert_eq!(
            store.policy("acme").expect("policy").version,
            DEFAULT_VERSION
        );
        assert!(store.policies("acme").expect("policies").is_empty());
        let strict = PolicyRules {
            window_days: 7,
            categories: vec!["computer".into()],
            randomized: RandomizedRule::Exclude,
        };
        let p1 = store.put_policy("acme", &strict, 10).expect("put");
        assert_eq!(p1.version, "acme-1");
        assert_eq!((p1.client.as_str(), p1.saved_ms), ("acme", 10));
        let p2 = store
            .put_policy("acme", &PolicyRules::default(), 20)
            .expect("put");
        assert_eq!(p2.version, "acme-2");
        assert_eq!(store.policy("acme").expect("policy"), p2);
        // Old versions stay, in order; other clients (and prefixes) are untouched.
        assert_eq!(store.policies("acme").expect("policies"), [p1.clone(), p2]);
        assert_eq!(
            store.policy("acm").expect("policy").version,
            DEFAULT_VERSION
        );
        assert_eq!(
            store.policy("globex").expect("policy").version,
            DEFAULT_VERSION
        );
        assert_eq!(
            store
                .put_policy("globex", &strict, 30)
                .expect("put")
                .version,
            "globex-1"
        );
        assert_eq!(p1.rules, strict);
    }

    fn snapshots(store: &dyn Store) {
        use crate::{
            policy::Policy,
            snapshot::{self, Period},
        };

        let devices = store.devices("acme", None).expect("devices");
        let period = |p: &str| Period::parse(p).expect("period");
        let nov = snapshot::build("acme", period("2026-11"), &Policy::default(), &devices, 200);
        assert_eq!(nov.devices.len(), 2);
        assert!(store.create_snapshot(&nov).expect("create"));
        // A second write of the same period is refused and changes nothing.
        let other = snapshot::build("acme", period("2026-11"), &Policy::default(), &[], 300);
        assert!(!store.create_snapshot(&other).expect("create"));
        assert_eq!(
            store.snapshot("acme", "2026-11").expect("get"),
            Some(nov.clone())
        );
        let oct = snapshot::build("acme", period("2026-10"), &Policy::default(), &[], 100);
        assert!(store.create_snapshot(&oct).expect("create"));
        let globex = snapshot::build("globex", period("2026-11"), &Policy::default(), &[], 1);
        assert!(store.create_snapshot(&globex).expect("create"));
        let list = store.snapshots("acme").expect("list");
        assert_eq!(
            list.iter().map(|s| s.period.as_str()).collect::<Vec<_>>(),
            ["2026-10", "2026-11"]
        );
        assert_eq!(store.snapshot("acme", "2026-12").expect("get"), None);
        assert!(store.snapshots("acm").expect("list").is_empty());
        assert_eq!(store.snapshots("globex").expect("list").len(), 1);
    }
}
