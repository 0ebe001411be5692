//! Users: the accounts a client's directories hold, and the people billed for them (issue 5;
//! BRIEF: "Users: what a billable user is"). I/O-free and clock-free: stores keep the records,
//! this module decides.
//!
//! **Sources.** A client's users come from sources, each named by kind and directory:
//! `ad:<domain>` (on-prem Active Directory, read by an agent at the site and sent in parts of
//! a read, see [`apply`]) and `entra:<tenant>` (Microsoft 365 / Entra ID, read by the collector
//! through Microsoft Graph, see [`crate::graph`]). A complete read of a source replaces what
//! the source holds: accounts in it are present; accounts no longer in it stay stored, marked
//! removed, and stop counting (history is kept). A failed read changes no account: the
//! source is marked stale with the error until a read succeeds again.
//!
//! **People.** Accounts of all of a client's sources that share a stable join key (objectSid
//! ↔ onPremisesSecurityIdentifier, objectGUID ↔ onPremisesImmutableId; never a name) are one
//! person ([`people`]), who counts once when any of their present accounts is billable.
//!
//! **Decisions** ([`decide`]) follow the client's [`UserPolicy`]; each says why in words.

pub mod apply;
pub mod policy;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

use census_proto::{convert, v1};
use serde::{Deserialize, Serialize};

use crate::graph::{
    self, GraphUser, JoinKey, LicencePolicy, SubscribedSku, guid_string_from_ad_bytes, join_key_ad,
    join_key_graph,
};
pub use policy::{UserPolicy, UserPolicyError, UserPolicyRules};

/// sAMAccountType of a normal user account.
pub const SAM_NORMAL_USER_ACCOUNT: u32 = 805_306_368;
/// userAccountControl bit: the account is disabled.
pub const UAC_ACCOUNTDISABLE: u32 = 0x2;
/// Longest text kept of any account field.
pub const MAX_TEXT: usize = 256;
/// Longest memberOf DN kept.
pub const MAX_DN: usize = 1024;
/// Most memberOf DNs kept per account: as many as the agent sends (its `MAX_MEMBER_OF`), every
/// group the account is in, nested included. Kept in sorted order, so a longer list (from an
/// agent with a larger cap) loses the same groups every read.
pub const MAX_GROUPS: usize = 1024;
/// Longest source name (`ad:` or `entra:` and the directory).
pub const MAX_SOURCE: usize = 270;

const DAY_MS: u64 = 24 * 60 * 60 * 1000;

/// Which kind of directory a source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    ActiveDirectory,
    EntraId,
}

impl SourceKind {
    pub fn label(self) -> &'static str {
        match self {
            SourceKind::ActiveDirectory => "active-directory",
            SourceKind::EntraId => "entra-id",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            SourceKind::ActiveDirectory => "ad:",
            SourceKind::EntraId => "entra:",
        }
    }
}

/// The source name of an Active Directory domain (`ad:corp.example`), or why it is unusable.
pub fn ad_source(directory: &str) -> Result<String, String> {
    source_name(SourceKind::ActiveDirectory, directory)
}

/// The source name of an Entra ID tenant (`entra:<tenant>`).
pub fn entra_source(tenant: &str) -> Result<String, String> {
    source_name(SourceKind::EntraId, tenant)
}

fn source_name(kind: SourceKind, directory: &str) -> Result<String, String> {
    let d = directory.trim().to_ascii_lowercase();
    if d.is_empty()
        || d.len() + kind.prefix().len() > MAX_SOURCE
        || d.chars().any(|c| c.is_control() || c == '\0' || c == '/')
    {
        return Err(format!(
            "directory name must be 1 to {} characters without '/' or control characters",
            MAX_SOURCE - kind.prefix().len()
        ));
    }
    Ok(format!("{}{d}", kind.prefix()))
}

/// What Active Directory says of an account, as the policy needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdFacts {
    /// objectSid, canonical (`S-1-5-21-…`); empty when missing.
    pub object_sid: String,
    pub sam_account_name: String,
    pub distinguished_name: String,
    pub sam_account_type: u32,
    pub user_account_control: u32,
    /// accountExpires in Unix millis; `None` when it never expires.
    pub account_expires_ms: Option<u64>,
    /// lastLogonTimestamp in Unix millis; `None` when never logged on.
    pub last_logon_ms: Option<u64>,
    pub critical_system_object: bool,
    pub has_service_principal_name: bool,
    pub member_of: Vec<String>,
    pub is_computer: bool,
    /// whenCreated in Unix millis; `None` when the agent did not send it (older agents).
    #[serde(default)]
    pub created_ms: Option<u64>,
}

/// What a source says of an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Facts {
    Ad(AdFacts),
    Entra(GraphUser),
}

/// One account of one source, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// `ad:<domain>` or `entra:<tenant>`.
    pub source: String,
    /// Stable within the source: the objectGUID (AD) or the Graph object id (Entra), lower-case.
    pub id: String,
    /// For people: the userPrincipalName, else the sAMAccountName (AD), else the display
    /// name, else the id.
    pub name: String,
    pub display_name: String,
    /// The hybrid join keys (see [`crate::graph::join_key_ad`]).
    pub join_keys: Vec<JoinKey>,
    pub facts: Facts,
    /// The first and the latest complete read that held it.
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    /// In the source's latest complete read.
    pub present: bool,
    /// When a complete read first no longer held it (while it is absent).
    pub removed_ms: Option<u64>,
}

impl Account {
    /// The key that names it among all of a client's accounts.
    pub fn key(&self) -> String {
        format!("{}/{}", self.source, self.id)
    }
}

/// Caps text from a client network: at most `max` bytes, on a character boundary, without
/// control characters.
pub fn cap(s: &str, max: usize) -> String {
    crate::model::clean_text(s, max)
}

/// A timestamp in Unix millis (0 for instants before 1970).
pub fn millis(ts: &prost_types::Timestamp) -> u64 {
    convert::system_time(ts).map_or(0, convert::unix_millis)
}

/// The first of `names` that is not blank, else `id`: what people read an account by.
fn readable_name(names: &[&String], id: &str) -> String {
    names
        .iter()
        .find(|n| !n.trim().is_empty())
        .map_or_else(|| id.to_owned(), |n| (*n).clone())
}

/// An Active Directory account as an agent reported it, or `None` when it has no usable
/// objectGUID (it could not be told apart from others).
pub fn ad_account(source: &str, user: &v1::DirectoryUser, read_at_ms: u64) -> Option<Account> {
    let guid = <[u8; 16]>::try_from(user.object_guid.as_slice()).ok()?;
    let id = guid_string_from_ad_bytes(&guid);
    let sid = graph::canonical_sid(&user.object_sid).unwrap_or_default();
    let join_keys = join_key_ad(
        (!sid.is_empty()).then_some(sid.as_str()),
        Some(user.object_guid.as_slice()),
    );
    let upn = cap(&user.user_principal_name, MAX_TEXT);
    let sam = cap(&user.sam_account_name, MAX_TEXT);
    let display_name = cap(&user.display_name, MAX_TEXT);
    let name = readable_name(&[&upn, &sam, &display_name], &id);
    // Sorted before the cap, so which groups a list too long loses does not depend on the
    // order they came in (the message size limit bounds the work).
    let mut member_of: Vec<String> = user
        .member_of
        .iter()
        .map(|g| cap(g, MAX_DN))
        .filter(|g| !g.is_empty())
        .collect();
    member_of.sort();
    member_of.dedup();
    member_of.truncate(MAX_GROUPS);
    let facts = AdFacts {
        object_sid: sid,
        sam_account_name: sam,
        distinguished_name: cap(&user.distinguished_name, MAX_DN),
        sam_account_type: user.sam_account_type,
        user_account_control: user.user_account_control,
        account_expires_ms: user.account_expires.as_ref().map(millis),
        last_logon_ms: user.last_logon.as_ref().map(millis),
        critical_system_object: user.critical_system_object,
        has_service_principal_name: user.has_service_principal_name,
        member_of,
        is_computer: user.is_computer,
        created_ms: user.when_created.as_ref().map(millis),
    };
    Some(Account {
        source: source.to_owned(),
        id,
        name,
        display_name,
        join_keys,
        facts: Facts::Ad(facts),
        first_seen_ms: read_at_ms,
        last_seen_ms: read_at_ms,
        present: true,
        removed_ms: None,
    })
}

/// An Entra ID user as the collector read it from Graph.
pub fn entra_account(source: &str, user: &GraphUser, read_at_ms: u64) -> Account {
    let id = user.id.to_ascii_lowercase();
    let display_name = cap(&user.display_name, MAX_TEXT);
    let name = readable_name(&[&cap(&user.upn, MAX_TEXT), &display_name], &id);
    Account {
        source: source.to_owned(),
        id,
        name,
        display_name,
        join_keys: join_key_graph(user),
        facts: Facts::Entra(user.clone()),
        first_seen_ms: read_at_ms,
        last_seen_ms: read_at_ms,
        present: true,
        removed_ms: None,
    }
}

/// A source's state: its latest complete read and its latest attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStatus {
    pub source: String,
    pub kind: SourceKind,
    /// The latest complete read applied: its id and when it was read.
    pub read_id: String,
    pub read_ms: Option<u64>,
    /// Accounts in that read.
    pub accounts: u64,
    /// The latest attempt, successful or not.
    pub attempt_ms: u64,
    /// The latest attempt's error, while no later read succeeded.
    pub error: Option<String>,
    /// The tenant's subscribed SKUs at the latest read (Entra ID), to resolve the policy's
    /// licence part numbers and name licences.
    pub skus: Vec<SubscribedSku>,
}

impl SourceStatus {
    pub fn new(source: &str, kind: SourceKind) -> Self {
        SourceStatus {
            source: source.to_owned(),
            kind,
            read_id: String::new(),
            read_ms: None,
            accounts: 0,
            attempt_ms: 0,
            error: None,
            skus: Vec::new(),
        }
    }

    /// The latest attempt failed: what is shown comes from an earlier read (or none).
    pub fn stale(&self) -> bool {
        self.error.is_some()
    }

    /// One line on how fresh the source is.
    pub fn describe(&self) -> String {
        let read = self.read_ms.map_or_else(
            || "never read successfully".to_owned(),
            |ms| format!("last read {} ({} accounts)", day(ms), self.accounts),
        );
        match &self.error {
            Some(e) => format!(
                "{}: STALE, the read of {} failed: {e}; {read}",
                self.source,
                day(self.attempt_ms)
            ),
            None => format!("{}: {read}", self.source),
        }
    }
}

fn day(ms: u64) -> String {
    crate::snapshot::rfc3339(ms)
}

/// Whether an account is billable, and the rule that decided, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub billable: bool,
    pub reason: String,
}

impl Decision {
    fn no(reason: impl Into<String>) -> Self {
        Decision {
            billable: false,
            reason: reason.into(),
        }
    }
}

/// A policy resolved for one client's sources (each tenant's licences resolved once).
#[derive(Debug)]
pub struct Resolved<'a> {
    pub policy: &'a UserPolicy,
    licences: BTreeMap<String, LicencePolicy>,
}

impl<'a> Resolved<'a> {
    pub fn new(policy: &'a UserPolicy, sources: &[SourceStatus]) -> Self {
        let licences = sources
            .iter()
            .filter(|s| s.kind == SourceKind::EntraId)
            .map(|s| {
                (
                    s.source.clone(),
                    LicencePolicy::new(&policy.rules.licence_allow_list, &s.skus),
                )
            })
            .collect();
        Resolved { policy, licences }
    }
}

/// Decides whether `account` is billable at `now_ms`. An account no longer in its source never
/// is. Active Directory, in order: computer accounts, accounts that are not normal user
/// accounts, critical system objects, disabled, expired, service accounts (unless the policy
/// counts them), members of an exclusion group, and (when the rule is on) the stale-logon rule
/// (`Activity::decide`: no logon within the window; an account that never logged on is
/// stale only once it is older than the window). Entra ID: [`crate::graph::decide`], then the
/// same stale-logon rule on the latest sign-in and createdDateTime, where the tenant gives
/// sign-in activity.
pub fn decide(resolved: &Resolved<'_>, account: &Account, now_ms: u64) -> Decision {
    if !account.present {
        return Decision::no(format!(
            "no longer in {} (since {})",
            account.source,
            day(account.removed_ms.unwrap_or(account.last_seen_ms))
        ));
    }
    match &account.facts {
        Facts::Ad(ad) => decide_ad(resolved.policy, ad, now_ms),
        Facts::Entra(user) => {
            let fallback;
            let licences = match resolved.licences.get(&account.source) {
                Some(l) => l,
                None => {
                    fallback = LicencePolicy::new(&resolved.policy.rules.licence_allow_list, &[]);
                    &fallback
                }
            };
            let d = graph::decide(user, licences);
            let window = resolved.policy.rules.stale_logon_days;
            // The stale-logon rule needs the tenant's sign-in activity (Entra ID P1): without
            // it there is no evidence either way, and the licence decides alone.
            if !d.billable || window == 0 || !user.sign_in_read {
                return Decision {
                    billable: d.billable,
                    reason: d.reason,
                };
            }
            let activity = Activity {
                last_ms: user.last_sign_in.as_deref().and_then(graph::graph_time_ms),
                created_ms: user.created.as_deref().and_then(graph::graph_time_ms),
                words: &ENTRA_WORDS,
            };
            let a = activity.decide(window, now_ms);
            Decision {
                billable: a.billable,
                reason: if a.billable {
                    format!("{}, {}", d.reason, a.reason)
                } else {
                    a.reason
                },
            }
        }
    }
}

fn decide_ad(policy: &UserPolicy, ad: &AdFacts, now_ms: u64) -> Decision {
    let rules = &policy.rules;
    if ad.is_computer {
        return Decision::no("computer account");
    }
    if ad.sam_account_type != SAM_NORMAL_USER_ACCOUNT {
        return Decision::no(format!(
            "not a normal user account (sAMAccountType {})",
            ad.sam_account_type
        ));
    }
    if ad.critical_system_object {
        return Decision::no("critical system object (a built-in account)");
    }
    if ad.user_account_control & UAC_ACCOUNTDISABLE != 0 {
        return Decision::no("disabled");
    }
    if let Some(expires) = ad.account_expires_ms
        && expires <= now_ms
    {
        return Decision::no(format!("expired {}", day(expires)));
    }
    if ad.has_service_principal_name && !rules.count_service_accounts {
        return Decision::no("service account (has a servicePrincipalName)");
    }
    if let Some(group) = ad
        .member_of
        .iter()
        .find(|dn| rules.exclusion_groups.iter().any(|g| group_matches(g, dn)))
    {
        return Decision::no(format!("member of exclusion group {group}"));
    }
    let window = rules.stale_logon_days;
    if window == 0 {
        return Decision {
            billable: true,
            reason: "enabled user account (no stale-logon rule)".into(),
        };
    }
    let activity = Activity {
        last_ms: ad.last_logon_ms,
        created_ms: ad.created_ms,
        words: &AD_WORDS,
    };
    let d = activity.decide(window, now_ms);
    Decision {
        billable: d.billable,
        reason: if d.billable {
            format!("enabled user account, {}", d.reason)
        } else {
            d.reason
        },
    }
}

/// How a source names what the stale-logon rule reads, for reasons.
struct ActivityWords {
    /// "last logon", "last sign-in".
    last: &'static str,
    /// "never logged on", "never signed in".
    never: &'static str,
    /// The attribute that says so, and its caveat.
    last_attr: &'static str,
    created_attr: &'static str,
}

const AD_WORDS: ActivityWords = ActivityWords {
    last: "last logon",
    never: "never logged on",
    last_attr: "lastLogonTimestamp lags up to 14 days",
    created_attr: "whenCreated",
};

const ENTRA_WORDS: ActivityWords = ActivityWords {
    last: "last sign-in",
    never: "never signed in",
    last_attr: "signInActivity",
    created_attr: "createdDateTime",
};

/// What a source says of an account's activity, for the stale-logon rule.
struct Activity<'w> {
    /// The latest logon (AD lastLogonTimestamp) or sign-in (Entra ID signInActivity).
    last_ms: Option<u64>,
    /// When the account was made (AD whenCreated, Entra ID createdDateTime).
    created_ms: Option<u64>,
    words: &'w ActivityWords,
}

impl Activity<'_> {
    /// The stale-logon rule, the same for every source: an account with a logon within
    /// `window` days counts and one whose latest logon is older does not. An account that
    /// never logged on is a new account, billed from the day it exists, until it is older
    /// than the window: then it is stale. One that never logged on and whose creation time is
    /// unknown is stale (the rule asks for evidence of use, and there is none).
    fn decide(&self, window: u32, now_ms: u64) -> Decision {
        let w = self.words;
        let window_ms = u64::from(window) * DAY_MS;
        let days_ago = |at: u64| now_ms.saturating_sub(at) / DAY_MS;
        match (self.last_ms, self.created_ms) {
            (Some(at), _) if now_ms.saturating_sub(at) > window_ms => Decision::no(format!(
                "stale: {} {}, more than {window} days ago ({})",
                w.last,
                day(at),
                w.last_attr
            )),
            (Some(at), _) => Decision {
                billable: true,
                reason: format!("{} {} (within {window} days)", w.last, day(at)),
            },
            (None, Some(created)) if now_ms.saturating_sub(created) > window_ms => {
                Decision::no(format!(
                    "stale: {}, created {} ({} days ago, more than {window} days)",
                    w.never,
                    day(created),
                    days_ago(created)
                ))
            }
            (None, Some(created)) => Decision {
                billable: true,
                reason: format!(
                    "{}, created {} ({} days ago): a new account, billed until it is {window} days old without a logon",
                    w.never,
                    day(created),
                    days_ago(created)
                ),
            },
            (None, None) => Decision::no(format!(
                "stale: {} and no creation time ({}) to tell a new account from an unused one; the policy wants a logon within {window} days",
                w.never, w.created_attr
            )),
        }
    }
}

/// Whether a policy's exclusion group names the group `dn`: the whole DN, or its CN.
fn group_matches(wanted: &str, dn: &str) -> bool {
    if wanted.eq_ignore_ascii_case(dn) {
        return true;
    }
    let first = dn.split(',').next().unwrap_or_default();
    first.split_once('=').is_some_and(|(attr, value)| {
        attr.trim().eq_ignore_ascii_case("cn") && value.trim().eq_ignore_ascii_case(wanted)
    })
}

/// One person: the accounts of a client's sources joined on stable keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    /// Stable: the person's smallest join key (`sid:…`), else its account key.
    pub id: String,
    /// A name for people: a present account's name.
    pub name: String,
    pub display_name: String,
    pub counted: bool,
    /// Why it counts, or why not.
    pub reason: String,
    /// Every account, with its own decision, by source.
    pub accounts: Vec<(Account, Decision)>,
    /// An account comes from a source whose latest read failed.
    pub stale: bool,
}

/// A client's people at `now_ms`, in id order: accounts joined on any shared key (transitively).
pub fn people(
    policy: &UserPolicy,
    accounts: Vec<Account>,
    sources: &[SourceStatus],
    now_ms: u64,
) -> Vec<Person> {
    let resolved = Resolved::new(policy, sources);
    let stale: BTreeSet<&str> = sources
        .iter()
        .filter(|s| s.stale())
        .map(|s| s.source.as_str())
        .collect();

    // Union-find over accounts; accounts sharing a key are one set.
    let n = accounts.len();
    let mut parent: Vec<usize> = (0..n).collect();
    fn find(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let mut by_key: BTreeMap<&JoinKey, usize> = BTreeMap::new();
    for (i, a) in accounts.iter().enumerate() {
        for k in &a.join_keys {
            match by_key.get(k) {
                Some(&j) => {
                    let (ri, rj) = (find(&mut parent, i), find(&mut parent, j));
                    if ri != rj {
                        parent[ri.max(rj)] = ri.min(rj);
                    }
                }
                None => {
                    by_key.insert(k, i);
                }
            }
        }
    }
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in 0..n {
        let r = find(&mut parent, i);
        groups.entry(r).or_default().push(i);
    }

    let mut slots: Vec<Option<Account>> = accounts.into_iter().map(Some).collect();
    let mut out: Vec<Person> = groups
        .into_values()
        .map(|members| {
            let mut accs: Vec<(Account, Decision)> = members
                .into_iter()
                .filter_map(|i| slots[i].take())
                .map(|a| {
                    let d = decide(&resolved, &a, now_ms);
                    (a, d)
                })
                .collect();
            accs.sort_by_key(|(a, _)| a.key());
            person(accs, &stale)
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

fn person(accounts: Vec<(Account, Decision)>, stale: &BTreeSet<&str>) -> Person {
    let id = accounts
        .iter()
        .flat_map(|(a, _)| a.join_keys.iter().map(ToString::to_string))
        .min()
        .or_else(|| accounts.iter().map(|(a, _)| a.key()).min())
        .unwrap_or_default();
    let named = accounts
        .iter()
        .find(|(a, _)| a.present)
        .or_else(|| accounts.first());
    let (name, display_name) = named.map_or_else(Default::default, |(a, _)| {
        (a.name.clone(), a.display_name.clone())
    });
    let billable: Vec<&(Account, Decision)> = accounts.iter().filter(|(_, d)| d.billable).collect();
    let counted = !billable.is_empty();
    let joined = if accounts.len() > 1 {
        let sources: BTreeSet<&str> = accounts.iter().map(|(a, _)| a.source.as_str()).collect();
        format!(
            " (one person in {}, joined on {})",
            sources.into_iter().collect::<Vec<_>>().join(" and "),
            shared_key(&accounts)
        )
    } else {
        String::new()
    };
    let reason = if let Some((a, d)) = billable.first() {
        format!("counted: {}: {}{joined}", a.source, d.reason)
    } else {
        let why: Vec<String> = accounts
            .iter()
            .map(|(a, d)| format!("{}: {}", a.source, d.reason))
            .collect();
        format!("not counted: {}{joined}", why.join("; "))
    };
    Person {
        id,
        name,
        display_name,
        counted,
        reason,
        stale: accounts
            .iter()
            .any(|(a, _)| stale.contains(a.source.as_str())),
        accounts,
    }
}

/// A key the accounts share, for evidence.
fn shared_key(accounts: &[(Account, Decision)]) -> String {
    let mut seen: BTreeMap<&JoinKey, usize> = BTreeMap::new();
    for (a, _) in accounts {
        for k in &a.join_keys {
            *seen.entry(k).or_default() += 1;
        }
    }
    seen.into_iter()
        .find(|(_, n)| *n > 1)
        .map_or_else(String::new, |(k, _)| k.to_string())
}

/// A client's user count.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserTally {
    pub count: u64,
    /// Some source's latest read failed: the count comes from earlier reads.
    pub stale: bool,
    /// [`SourceStatus::describe`] of every source.
    pub sources: Vec<String>,
}

/// Counts people.
pub fn tally(people: &[Person], sources: &[SourceStatus]) -> UserTally {
    UserTally {
        count: people.iter().filter(|p| p.counted).count() as u64,
        stale: sources.iter().any(SourceStatus::stale),
        sources: sources.iter().map(SourceStatus::describe).collect(),
    }
}
