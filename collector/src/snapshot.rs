//! Billing snapshots: a client's counted devices for one billing period, frozen.
//!
//! I/O-free and clock-free, like [`crate::policy`]: [`build`] takes the devices, the policy and
//! the time; [`diff`] compares two snapshots; [`to_csv`] and [`to_json`] render one for a PSA.
//! The store writes a snapshot once and refuses to overwrite it, so what was invoiced can always
//! be shown again exactly as it was.
//!
//! A snapshot holds, for every counted device: its id, category, identifiers, names, current
//! addresses, sites, first and last seen, the rule that counted it, and a summary of its
//! evidence (per agent and method). It also holds the counts by category, the whole policy it
//! was counted under, and `as_of`. Its users ([`SnapshotUsers`], filled by [`users_part`]) are
//! the people counted under the client's billable-user policy, each with the rule that counted
//! it and its accounts, with that policy and the state of every user source (a source whose
//! latest read had failed makes the users `stale`: they come from its last complete read).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    time::{Duration, UNIX_EPOCH},
};

use census_proto::v1;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{
    identity,
    model::{self, DeviceRecord},
    policy::{self, Policy},
    users::{Person, SourceStatus, UserPolicy},
};

// === periods ===

/// A billing period: one calendar month, written `YYYY-MM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Period {
    pub year: u16,
    pub month: u8,
}

/// Why a period was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeriodError {
    #[error("period {0:?} is not a month: expected YYYY-MM with the month 01 to 12, e.g. 2026-11")]
    Invalid(String),
}

impl Period {
    /// Parses `YYYY-MM` (year 1970 to 9999, month 01 to 12).
    pub fn parse(s: &str) -> Result<Self, PeriodError> {
        let bad = || PeriodError::Invalid(s.chars().take(40).collect());
        let b = s.as_bytes();
        if b.len() != 7 || b[4] != b'-' {
            return Err(bad());
        }
        let digits = |r: std::ops::Range<usize>| -> Option<u16> {
            let part = s.get(r)?;
            if !part.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            part.parse().ok()
        };
        let year = digits(0..4).ok_or_else(bad)?;
        let month = digits(5..7).ok_or_else(bad)?;
        if year < 1970 || !(1..=12).contains(&month) {
            return Err(bad());
        }
        Ok(Period {
            year,
            month: u8::try_from(month).map_err(|_| bad())?,
        })
    }

    /// The first millisecond of the period (UTC).
    pub fn start_ms(self) -> u64 {
        days_from_civil(i64::from(self.year), u32::from(self.month), 1)
            .try_into()
            .map_or(0, |days: u64| days * 24 * 60 * 60 * 1000)
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

// === snapshots ===

/// One identifier of a counted device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotIdentifier {
    /// "mac", "snmp-engine-id", "serial", "randomized-mac", "mdns-name", "address".
    pub kind: String,
    pub value: String,
    pub strong: bool,
    /// The identity key, which is how [`diff`] follows a device whose id changed.
    pub key: String,
}

/// What saw a device: one line per agent and method.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvidenceSummary {
    pub agent_id: String,
    /// "arp", "icmp", "snmp", "mdns".
    pub method: String,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    pub observations: u64,
}

/// A counted device, as it was when the snapshot was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDevice {
    pub id: String,
    pub category: String,
    #[serde(default)]
    pub category_reason: String,
    pub identifiers: Vec<SnapshotIdentifier>,
    #[serde(default)]
    pub names: Vec<String>,
    /// The addresses it still held, as "site/address".
    #[serde(default)]
    pub addresses: Vec<String>,
    pub sites: Vec<String>,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    /// The policy rule that counted it, in words.
    pub counted_by: String,
    pub evidence: Vec<EvidenceSummary>,
}

/// A counted user (a person), as it was when the snapshot was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotUser {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub display_name: String,
    /// The rule that counted it, in words.
    pub counted_by: String,
    /// Its accounts as "source/name", for people.
    pub accounts: Vec<String>,
    /// Its accounts as "source/id", which is how [`diff`] follows a user whose id changed.
    #[serde(default)]
    pub account_keys: Vec<String>,
}

/// The users of a snapshot. Snapshots taken before users were counted have a count of 0 and
/// an empty version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotUsers {
    pub count: u64,
    /// The billable-user policy version.
    #[serde(default)]
    pub policy_version: String,
    /// The whole policy.
    #[serde(default)]
    pub policy: Option<UserPolicy>,
    /// The counted users, in id order.
    #[serde(default)]
    pub users: Vec<SnapshotUser>,
    /// A source's latest read had failed: its users come from its last complete read.
    #[serde(default)]
    pub stale: bool,
    /// The user sources as they were.
    #[serde(default)]
    pub sources: Vec<SourceStatus>,
}

/// The users part of a snapshot: the counted people of `people` (as [`crate::users::people`]
/// made them under `policy`).
pub fn users_part(
    policy: &UserPolicy,
    people: &[Person],
    sources: &[SourceStatus],
) -> SnapshotUsers {
    let users: Vec<SnapshotUser> = people
        .iter()
        .filter(|p| p.counted)
        .map(|p| SnapshotUser {
            id: p.id.clone(),
            name: p.name.clone(),
            display_name: p.display_name.clone(),
            counted_by: p.reason.clone(),
            accounts: p
                .accounts
                .iter()
                .map(|(a, _)| format!("{}/{}", a.source, a.name))
                .collect(),
            account_keys: p.accounts.iter().map(|(a, _)| a.key()).collect(),
        })
        .collect();
    SnapshotUsers {
        count: users.len() as u64,
        policy_version: policy.version.clone(),
        policy: Some(policy.clone()),
        users,
        stale: sources.iter().any(SourceStatus::stale),
        sources: sources.to_vec(),
    }
}

/// A client's counts for one billing period, frozen. Stored as JSON so fields can be added
/// (with `#[serde(default)]`) without ever rewriting a stored snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub client: String,
    /// `YYYY-MM`.
    pub period: String,
    /// The instant the devices were counted at.
    pub as_of_ms: u64,
    /// The whole policy it was counted under (its version names it).
    pub policy: Policy,
    /// The counted devices, in id order.
    pub devices: Vec<SnapshotDevice>,
    /// Counted devices per category.
    pub by_category: BTreeMap<String, u64>,
    #[serde(default)]
    pub users: SnapshotUsers,
}

impl Snapshot {
    /// How many devices were counted.
    pub fn device_count(&self) -> u64 {
        self.devices.len() as u64
    }
}

/// Freezes `devices` of `client` for `period`: evaluates each under `policy` at `as_of_ms` and
/// keeps those that count, with the rule that counted them.
pub fn build(
    client: &str,
    period: Period,
    policy: &Policy,
    devices: &[DeviceRecord],
    as_of_ms: u64,
) -> Snapshot {
    let mut counted: Vec<SnapshotDevice> = Vec::new();
    let mut by_category = BTreeMap::new();
    for dev in devices {
        let decision = policy::evaluate(policy, dev, as_of_ms);
        if !decision.counted {
            continue;
        }
        let category = model::category(dev).to_owned();
        *by_category.entry(category.clone()).or_default() += 1;
        counted.push(SnapshotDevice {
            id: dev.id.clone(),
            category,
            category_reason: model::category_reason(dev).to_owned(),
            identifiers: dev
                .keys
                .iter()
                .map(|k| {
                    let (kind, value) = identity::describe_key(k);
                    SnapshotIdentifier {
                        kind: kind.to_owned(),
                        value: value.to_owned(),
                        strong: identity::is_strong(k),
                        key: k.clone(),
                    }
                })
                .collect(),
            names: dev.names.clone(),
            addresses: dev
                .addresses
                .iter()
                .filter(|a| a.current)
                .map(|a| format!("{}/{}", a.site, a.ip))
                .collect(),
            sites: dev.sites.clone(),
            first_seen_ms: dev.first_seen_ms,
            last_seen_ms: dev.last_seen_ms,
            counted_by: decision.rule,
            evidence: dev
                .evidence
                .iter()
                .map(|e| EvidenceSummary {
                    agent_id: e.agent_id.clone(),
                    method: v1::Method::try_from(e.method)
                        .map(v1::Method::label)
                        .unwrap_or("unknown")
                        .to_owned(),
                    first_seen_ms: e.first_seen_ms,
                    last_seen_ms: e.last_seen_ms,
                    observations: e.observations,
                })
                .collect(),
        });
    }
    counted.sort_by(|a, b| a.id.cmp(&b.id));
    Snapshot {
        client: client.to_owned(),
        period: period.to_string(),
        as_of_ms,
        policy: policy.clone(),
        devices: counted,
        by_category,
        users: SnapshotUsers::default(),
    }
}

// === diff ===

/// A device whose category changed between two periods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CategoryChange {
    pub id: String,
    pub from: String,
    pub to: String,
}

/// A device counted in both periods under different ids (a merge or a new smaller identifier
/// changed its id): it is neither added nor removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reidentified {
    pub previous_id: String,
    pub id: String,
    /// The identifier key both had.
    pub shared_key: String,
}

/// A count in both periods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountDelta {
    pub category: String,
    pub before: u64,
    pub after: u64,
}

impl CountDelta {
    pub fn delta(&self) -> i64 {
        i64::try_from(self.after).unwrap_or(i64::MAX) - i64::try_from(self.before).unwrap_or(0)
    }
}

/// What changed from one period's snapshot to the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diff {
    /// The period compared against; `None` when there is no earlier snapshot (everything is
    /// added).
    pub previous_period: Option<String>,
    pub period: String,
    /// Counted now, not before.
    pub added: Vec<SnapshotDevice>,
    /// Counted before, not now.
    pub removed: Vec<SnapshotDevice>,
    pub category_changed: Vec<CategoryChange>,
    pub reidentified: Vec<Reidentified>,
    /// Devices counted before and after (category "" is the total).
    pub devices: CountDelta,
    /// Per category, every category that appears in either snapshot.
    pub by_category: Vec<CountDelta>,
    pub users: CountDelta,
    /// Users counted now, not before (matched by id, then by a shared account).
    pub users_added: Vec<SnapshotUser>,
    /// Users counted before, not now.
    pub users_removed: Vec<SnapshotUser>,
}

/// Compares `current` with `previous` (the snapshot of the period before, if any). Devices are
/// matched by id first, then by a shared identifier key, so a device whose id changed (merged
/// with another, or a smaller MAC learnt) is not reported as removed and added.
pub fn diff(previous: Option<&Snapshot>, current: &Snapshot) -> Diff {
    let empty = Vec::new();
    let before = previous.map_or(&empty, |p| &p.devices);
    let by_id: BTreeMap<&str, &SnapshotDevice> =
        before.iter().map(|d| (d.id.as_str(), d)).collect();
    let current_ids: BTreeSet<&str> = current.devices.iter().map(|d| d.id.as_str()).collect();
    // Identifier keys of previous devices that have no namesake now.
    let mut by_key: BTreeMap<&str, &SnapshotDevice> = BTreeMap::new();
    for d in before
        .iter()
        .filter(|d| !current_ids.contains(d.id.as_str()))
    {
        for i in &d.identifiers {
            by_key.entry(i.key.as_str()).or_insert(d);
        }
    }
    let mut matched_previous: BTreeSet<&str> = BTreeSet::new();
    let mut out = Diff {
        previous_period: previous.map(|p| p.period.clone()),
        period: current.period.clone(),
        added: Vec::new(),
        removed: Vec::new(),
        category_changed: Vec::new(),
        reidentified: Vec::new(),
        devices: CountDelta {
            category: String::new(),
            before: before.len() as u64,
            after: current.device_count(),
        },
        by_category: Vec::new(),
        users: CountDelta {
            category: "users".into(),
            before: previous.map_or(0, |p| p.users.count),
            after: current.users.count,
        },
        users_added: Vec::new(),
        users_removed: Vec::new(),
    };
    (out.users_added, out.users_removed) = diff_users(
        previous.map_or(&[][..], |p| &p.users.users),
        &current.users.users,
    );
    for d in &current.devices {
        let earlier = by_id.get(d.id.as_str()).copied().or_else(|| {
            // Strong keys sort first, so a shared strong identifier is preferred.
            d.identifiers.iter().find_map(|i| {
                let p = by_key.get(i.key.as_str())?;
                (!matched_previous.contains(p.id.as_str())).then(|| {
                    out.reidentified.push(Reidentified {
                        previous_id: p.id.clone(),
                        id: d.id.clone(),
                        shared_key: i.key.clone(),
                    });
                    *p
                })
            })
        });
        match earlier {
            Some(p) => {
                matched_previous.insert(p.id.as_str());
                if p.category != d.category {
                    out.category_changed.push(CategoryChange {
                        id: d.id.clone(),
                        from: p.category.clone(),
                        to: d.category.clone(),
                    });
                }
            }
            None => out.added.push(d.clone()),
        }
    }
    out.removed = before
        .iter()
        .filter(|p| !matched_previous.contains(p.id.as_str()))
        .cloned()
        .collect();
    let empty_counts = BTreeMap::new();
    let before_counts = previous.map_or(&empty_counts, |p| &p.by_category);
    let categories: BTreeSet<&String> = before_counts
        .keys()
        .chain(current.by_category.keys())
        .collect();
    out.by_category = categories
        .into_iter()
        .map(|c| CountDelta {
            category: c.clone(),
            before: before_counts.get(c).copied().unwrap_or(0),
            after: current.by_category.get(c).copied().unwrap_or(0),
        })
        .collect();
    out
}

/// Users of `current` not in `before`, and the reverse: a user is the same when its id is, or
/// when it shares an account (its id changes when a hybrid link is learnt).
fn diff_users(
    before: &[SnapshotUser],
    current: &[SnapshotUser],
) -> (Vec<SnapshotUser>, Vec<SnapshotUser>) {
    let same = |a: &SnapshotUser, b: &SnapshotUser| {
        a.id == b.id || a.account_keys.iter().any(|k| b.account_keys.contains(k))
    };
    let added = current
        .iter()
        .filter(|u| !before.iter().any(|b| same(u, b)))
        .cloned()
        .collect();
    let removed = before
        .iter()
        .filter(|b| !current.iter().any(|u| same(u, b)))
        .cloned()
        .collect();
    (added, removed)
}

// === export ===

/// The CSV header: one row per counted device, columns a PSA can import.
pub const CSV_HEADER: &[&str] = &[
    "client",
    "period",
    "device_id",
    "category",
    "identifiers",
    "sites",
    "first_seen",
    "last_seen",
    "counted_by",
];

/// RFC 3339 UTC, to the second.
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// One CSV field (RFC 4180): quoted when it holds a comma, quote or line break. A field that a
/// spreadsheet would run as a formula (it starts with `=`, `+`, `-`, `@`, tab or CR: device
/// names come from the client's network) is prefixed with `'`.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// The identifiers of a device in one CSV cell: `mac=00:16:3e:00:00:01;mdns-name=pc.local`.
fn identifiers_cell(d: &SnapshotDevice) -> String {
    d.identifiers
        .iter()
        .map(|i| format!("{}={}", i.kind, i.value))
        .collect::<Vec<_>>()
        .join(";")
}

/// The snapshot as CSV: a header and one row per counted device, CRLF line ends (RFC 4180).
pub fn to_csv(s: &Snapshot) -> String {
    let mut out = CSV_HEADER.join(",");
    out.push_str("\r\n");
    for d in &s.devices {
        let row = [
            s.client.clone(),
            s.period.clone(),
            d.id.clone(),
            d.category.clone(),
            identifiers_cell(d),
            d.sites.join(";"),
            rfc3339(d.first_seen_ms),
            rfc3339(d.last_seen_ms),
            d.counted_by.clone(),
        ];
        out.push_str(
            &row.iter()
                .map(|f| csv_field(f))
                .collect::<Vec<_>>()
                .join(","),
        );
        out.push_str("\r\n");
    }
    out
}

/// The CSV header of the users export: one row per counted user.
pub const USERS_CSV_HEADER: &[&str] = &[
    "client",
    "period",
    "user_id",
    "name",
    "display_name",
    "accounts",
    "counted_by",
];

/// The snapshot's counted users as CSV: a header and one row per user, CRLF line ends.
pub fn to_users_csv(s: &Snapshot) -> String {
    let mut out = USERS_CSV_HEADER.join(",");
    out.push_str("\r\n");
    for u in &s.users.users {
        let row = [
            s.client.clone(),
            s.period.clone(),
            u.id.clone(),
            u.name.clone(),
            u.display_name.clone(),
            u.accounts.join(";"),
            u.counted_by.clone(),
        ];
        out.push_str(
            &row.iter()
                .map(|f| csv_field(f))
                .collect::<Vec<_>>()
                .join(","),
        );
        out.push_str("\r\n");
    }
    out
}

/// A user policy as JSON, as `census users policy show --json` prints it.
pub fn user_policy_json(p: &UserPolicy) -> serde_json::Value {
    json!({
        "version": p.version,
        "default": p.is_default(),
        "stale_logon_days": p.rules.stale_logon_days,
        "count_service_accounts": p.rules.count_service_accounts,
        "exclusion_groups": p.rules.exclusion_groups,
        "licence_allow_list": p.rules.licence_allow_list,
        "saved_at": (p.saved_ms != 0).then(|| rfc3339(p.saved_ms)),
    })
}

/// The policy as JSON, as `census policy show --json` prints it.
pub fn policy_json(p: &Policy) -> serde_json::Value {
    json!({
        "version": p.version,
        "default": p.is_default(),
        "window_days": p.rules.window_days,
        "categories": if p.rules.categories.is_empty() {
            policy::CATEGORIES.iter().map(|c| (*c).to_owned()).collect()
        } else {
            p.rules.categories.clone()
        },
        "randomized": p.rules.randomized.label(),
        "saved_at": (p.saved_ms != 0).then(|| rfc3339(p.saved_ms)),
    })
}

/// The whole snapshot as JSON, times in RFC 3339.
pub fn to_json(s: &Snapshot) -> serde_json::Value {
    json!({
        "client": s.client,
        "period": s.period,
        "as_of": rfc3339(s.as_of_ms),
        "policy_version": s.policy.version,
        "policy": policy_json(&s.policy),
        "devices": s.device_count(),
        "devices_by_category": s.by_category,
        "users": {
            "count": s.users.count,
            "policy_version": s.users.policy_version,
            "policy": s.users.policy.as_ref().map(user_policy_json),
            "stale": s.users.stale,
            "sources": s.users.sources.iter().map(SourceStatus::describe).collect::<Vec<_>>(),
        },
        "counted_users": s.users.users.iter().map(|u| json!({
            "user_id": u.id,
            "name": u.name,
            "display_name": u.display_name,
            "accounts": u.accounts,
            "counted_by": u.counted_by,
        })).collect::<Vec<_>>(),
        "counted_devices": s.devices.iter().map(|d| json!({
            "device_id": d.id,
            "category": d.category,
            "category_reason": d.category_reason,
            "identifiers": d.identifiers.iter().map(|i| json!({
                "kind": i.kind, "value": i.value, "strong": i.strong, "key": i.key,
            })).collect::<Vec<_>>(),
            "names": d.names,
            "addresses": d.addresses,
            "sites": d.sites,
            "first_seen": rfc3339(d.first_seen_ms),
            "last_seen": rfc3339(d.last_seen_ms),
            "counted_by": d.counted_by,
            "evidence": d.evidence.iter().map(|e| json!({
                "agent_id": e.agent_id,
                "method": e.method,
                "first_seen": rfc3339(e.first_seen_ms),
                "last_seen": rfc3339(e.last_seen_ms),
                "observations": e.observations,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{PolicyRules, RandomizedRule};

    const DAY: u64 = 24 * 60 * 60 * 1000;
    const NOW: u64 = 1_800_000_000_000;

    fn dev(id: &str, keys: &[&str], category: &str, last_seen_ms: u64) -> DeviceRecord {
        DeviceRecord {
            id: id.into(),
            keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            category: category.into(),
            category_reason: String::new(),
            category_ms: 0,
            client: "acme".into(),
            site: "hq".into(),
            sites: vec!["hq".into()],
            macs: Vec::new(),
            addresses: Vec::new(),
            names: Vec::new(),
            first_seen_ms: last_seen_ms.saturating_sub(DAY),
            last_seen_ms,
            evidence: vec![model::EvidenceRecord {
                agent_id: "agent-1".into(),
                method: v1::Method::Arp as i32,
                first_seen_ms: 1,
                last_seen_ms,
                observations: 3,
            }],
            weak_only: keys.iter().all(|k| !identity::is_strong(k)),
            anomalies: Vec::new(),
        }
    }

    fn period(s: &str) -> Period {
        Period::parse(s).expect("valid period")
    }

    #[test]
    fn periods_are_months() {
        assert_eq!(
            period("2026-11"),
            Period {
                year: 2026,
                month: 11
            }
        );
        assert_eq!(period("2026-01").to_string(), "2026-01");
        for bad in [
            "2026-13",
            "2026-00",
            "2026-1",
            "26-11",
            "2026/11",
            "2026-11-01",
            "",
            "abcd-ef",
            "1969-12",
            "+026-11",
            "2026-+1",
        ] {
            let e = Period::parse(bad).expect_err(bad);
            assert!(e.to_string().contains("expected YYYY-MM"), "{e}");
        }
        assert!(period("2026-11") < period("2026-12") && period("2026-12") < period("2027-01"));
        assert_eq!(period("1970-01").start_ms(), 0);
        assert_eq!(period("1970-02").start_ms(), 31 * DAY);
        // 2024-03-01T00:00:00Z
        assert_eq!(period("2024-03").start_ms(), 1_709_251_200_000);
    }

    #[test]
    fn a_snapshot_keeps_only_counted_devices_with_their_rule() {
        let policy = Policy {
            version: "acme-1".into(),
            client: "acme".into(),
            saved_ms: 5,
            rules: PolicyRules {
                randomized: RandomizedRule::Exclude,
                ..PolicyRules::default()
            },
        };
        let devices = [
            dev("b", &["1mac:00:16:3e:00:00:02"], "printer", NOW),
            dev("a", &["1mac:00:16:3e:00:00:01"], "computer", NOW - DAY),
            dev("c", &["1mac:00:16:3e:00:00:03"], "computer", NOW - 40 * DAY),
            dev("d", &["4lmac:02:00:00:00:00:04"], "", NOW),
        ];
        let s = build("acme", period("2026-11"), &policy, &devices, NOW);
        assert_eq!(s.period, "2026-11");
        assert_eq!(
            s.devices.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(s.device_count(), 2);
        assert_eq!(s.by_category.get("computer"), Some(&1));
        assert_eq!(s.by_category.get("printer"), Some(&1));
        assert_eq!(
            s.devices[0].counted_by,
            "seen 1 day ago, within 30 days (policy acme-1)"
        );
        assert_eq!(s.devices[0].identifiers[0].kind, "mac");
        assert_eq!(s.devices[0].evidence[0].method, "arp");
        assert_eq!(s.users, SnapshotUsers::default());
        // Stored as JSON and read back unchanged.
        let text = serde_json::to_string(&s).expect("encode");
        assert_eq!(serde_json::from_str::<Snapshot>(&text).expect("decode"), s);
    }

    #[test]
    fn diff_shows_added_removed_recategorized_and_deltas() {
        let policy = Policy::default();
        let nov = build(
            "acme",
            period("2026-11"),
            &policy,
            &[
                dev("a", &["1mac:00:16:3e:00:00:01"], "computer", NOW),
                dev("b", &["1mac:00:16:3e:00:00:02"], "printer", NOW),
                dev("c", &["1mac:00:16:3e:00:00:03"], "", NOW),
                dev("old-id", &["1mac:00:16:3e:00:00:09"], "network", NOW),
            ],
            NOW,
        );
        let dec = build(
            "acme",
            period("2026-12"),
            &policy,
            &[
                dev("a", &["1mac:00:16:3e:00:00:01"], "computer", NOW + DAY),
                dev("c", &["1mac:00:16:3e:00:00:03"], "computer", NOW + DAY),
                dev("d", &["1mac:00:16:3e:00:00:04"], "phone-tablet", NOW + DAY),
                // Same device, a smaller MAC learnt: its id changed.
                dev(
                    "new-id",
                    &["1mac:00:16:3e:00:00:00", "1mac:00:16:3e:00:00:09"],
                    "network",
                    NOW + DAY,
                ),
            ],
            NOW + DAY,
        );
        let d = diff(Some(&nov), &dec);
        assert_eq!(d.previous_period.as_deref(), Some("2026-11"));
        assert_eq!(
            d.added.iter().map(|x| x.id.as_str()).collect::<Vec<_>>(),
            ["d"]
        );
        assert_eq!(
            d.removed.iter().map(|x| x.id.as_str()).collect::<Vec<_>>(),
            ["b"]
        );
        assert_eq!(
            d.category_changed,
            [CategoryChange {
                id: "c".into(),
                from: "unknown".into(),
                to: "computer".into()
            }]
        );
        assert_eq!(
            d.reidentified,
            [Reidentified {
                previous_id: "old-id".into(),
                id: "new-id".into(),
                shared_key: "1mac:00:16:3e:00:00:09".into()
            }]
        );
        assert_eq!(
            (d.devices.before, d.devices.after, d.devices.delta()),
            (4, 4, 0)
        );
        let delta = |c: &str| {
            d.by_category
                .iter()
                .find(|x| x.category == c)
                .map(CountDelta::delta)
        };
        assert_eq!(delta("computer"), Some(1));
        assert_eq!(delta("printer"), Some(-1));
        assert_eq!(delta("unknown"), Some(-1));
        assert_eq!(delta("phone-tablet"), Some(1));
        assert_eq!(delta("network"), Some(0));
        assert_eq!(d.users.delta(), 0);

        // Against nothing, everything is added.
        let first = diff(None, &nov);
        assert_eq!(first.previous_period, None);
        assert_eq!(first.added.len(), 4);
        assert!(first.removed.is_empty());
        assert_eq!(first.devices.delta(), 4);
    }

    #[test]
    fn csv_has_a_header_and_one_escaped_row_per_counted_device() {
        let mut weird = dev("a", &["1mac:00:16:3e:00:00:01", "5mdns:x"], "computer", NOW);
        weird.sites = vec!["hq".into(), "branch".into()];
        let mut s = build("acme", period("2026-11"), &Policy::default(), &[weird], NOW);
        s.devices[0].counted_by = "say \"hi\", then\nleave".into();
        s.devices[0].category = "=cmd|calc".into();
        let csv = to_csv(&s);
        let lines: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(
            lines[0],
            "client,period,device_id,category,identifiers,sites,first_seen,last_seen,counted_by"
        );
        assert!(
            lines[1].starts_with(
                "acme,2026-11,a,'=cmd|calc,mac=00:16:3e:00:00:01;mdns-name=x,hq;branch,"
            ),
            "{}",
            lines[1]
        );
        assert!(csv.contains("\"say \"\"hi\"\", then\nleave\"\r\n"), "{csv}");
        assert_eq!(csv_field("-1"), "'-1");
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");

        let json = to_json(&s);
        assert_eq!(json["period"], "2026-11");
        assert_eq!(json["policy_version"], "device-v1");
        assert_eq!(json["counted_devices"][0]["device_id"], "a");
        assert_eq!(json["users"]["count"], 0);
    }
}
