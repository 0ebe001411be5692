//! The counting policy: which of a client's devices go on the invoice, and why.
//!
//! I/O-free and clock-free: [`evaluate`] takes the time as an argument, so a decision can be
//! replayed and tested exactly. Every client counts under the built-in default
//! ([`Policy::default`], version `device-v1`) until an operator saves one of its own.
//!
//! **Versions.** Each policy an operator saves for client `acme` gets the next version of that
//! client: `acme-1`, `acme-2`, ... A version names exactly one set of rules forever: saving again
//! makes a new version, and the old ones stay stored, so a count or a billing snapshot that says
//! "policy acme-2" can always be explained by looking that version up. Versions are per client
//! (not one global counter) so a client's invoice history reads without gaps.
//!
//! **Rules**, checked in this order; the first that refuses decides:
//! 1. the window: a device counts if it was last seen within `window_days` of now. Devices that
//!    fall out of the window stop counting but stay listed (history is never deleted);
//! 2. the category: only the listed categories count (empty: all of them, `unknown` included);
//! 3. devices without a strong identifier (`weak_only`: randomized MACs, a name or an address
//!    only) follow the `randomized` rule: count them, exclude them, or count them only when they
//!    have a name (an mDNS host name or any other name), which is what lets a phone that rotates
//!    its MAC be recognised as one device.

use serde::{Deserialize, Serialize};

use crate::{identity, model::DeviceRecord};

/// The version of the built-in default policy.
pub const DEFAULT_VERSION: &str = "device-v1";
/// The default window: a device counts if seen within this many days.
pub const DEFAULT_WINDOW_DAYS: u32 = 30;
/// The longest window a policy may have (ten years).
pub const MAX_WINDOW_DAYS: u32 = 3650;
/// Every category a device can have, as `census.v1` labels them.
pub const CATEGORIES: &[&str] = &[
    "network",
    "printer",
    "computer",
    "server",
    "phone-tablet",
    "media-iot",
    "unknown",
];

const DAY_MS: u64 = 24 * 60 * 60 * 1000;

/// How devices without a strong identifier count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RandomizedRule {
    /// They count like any other device.
    #[default]
    Count,
    /// They never count.
    Exclude,
    /// They count only when they have a name (mDNS host name or any other).
    CountIfNamed,
}

impl RandomizedRule {
    /// The rule's name in the CLI, JSON and error messages.
    pub fn label(self) -> &'static str {
        match self {
            RandomizedRule::Count => "count",
            RandomizedRule::Exclude => "exclude",
            RandomizedRule::CountIfNamed => "count-if-named",
        }
    }

    /// Parses a label as [`RandomizedRule::label`] writes it (`_` accepted for `-`).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "count" => Some(RandomizedRule::Count),
            "exclude" => Some(RandomizedRule::Exclude),
            "count-if-named" => Some(RandomizedRule::CountIfNamed),
            _ => None,
        }
    }
}

/// The rules an operator sets; [`Policy`] adds the version the store assigns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRules {
    pub window_days: u32,
    /// The categories that count, sorted; empty means all of them.
    #[serde(default)]
    pub categories: Vec<String>,
    #[serde(default)]
    pub randomized: RandomizedRule,
}

impl Default for PolicyRules {
    fn default() -> Self {
        PolicyRules {
            window_days: DEFAULT_WINDOW_DAYS,
            categories: Vec::new(),
            randomized: RandomizedRule::Count,
        }
    }
}

/// Why a policy was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("window_days must be between 1 and {MAX_WINDOW_DAYS}, not {0}")]
    Window(u32),
    #[error("unknown category {0:?}: categories are {all}", all = CATEGORIES.join(", "))]
    Category(String),
    #[error("the randomized rule must be one of count, exclude, count-if-named")]
    Randomized,
}

impl PolicyRules {
    /// Checks the rules and puts them in their canonical form (categories lower-case, sorted,
    /// deduplicated; every category listed is the same as none listed: all count).
    pub fn validated(mut self) -> Result<Self, PolicyError> {
        if !(1..=MAX_WINDOW_DAYS).contains(&self.window_days) {
            return Err(PolicyError::Window(self.window_days));
        }
        let mut categories = Vec::with_capacity(self.categories.len());
        for c in &self.categories {
            let c = c.trim().to_ascii_lowercase();
            if c.is_empty() {
                continue;
            }
            if !CATEGORIES.contains(&c.as_str()) {
                return Err(PolicyError::Category(c.chars().take(40).collect()));
            }
            categories.push(c);
        }
        categories.sort();
        categories.dedup();
        if categories.len() == CATEGORIES.len() {
            categories.clear();
        }
        self.categories = categories;
        Ok(self)
    }
}

/// A client's counting policy, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// `device-v1` for the default, `<client>-<n>` for the n-th policy saved for a client.
    pub version: String,
    /// The client it belongs to; empty for the default.
    #[serde(default)]
    pub client: String,
    /// When an operator saved it; 0 for the default.
    #[serde(default)]
    pub saved_ms: u64,
    pub rules: PolicyRules,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            version: DEFAULT_VERSION.to_owned(),
            client: String::new(),
            saved_ms: 0,
            rules: PolicyRules::default(),
        }
    }
}

impl Policy {
    /// Whether this is the built-in default (no policy saved for the client).
    pub fn is_default(&self) -> bool {
        self.version == DEFAULT_VERSION
    }

    /// The version of the `n`-th policy saved for `client` (n starts at 1).
    pub fn version_for(client: &str, n: u64) -> String {
        format!("{client}-{n}")
    }

    /// Whether a category counts under this policy.
    pub fn counts_category(&self, category: &str) -> bool {
        self.rules.categories.is_empty() || self.rules.categories.iter().any(|c| c == category)
    }

    /// One line for people: "window 30 days, categories all, randomized count".
    pub fn summary(&self) -> String {
        format!(
            "window {} days, categories {}, randomized {}",
            self.rules.window_days,
            if self.rules.categories.is_empty() {
                "all".to_owned()
            } else {
                self.rules.categories.join(",")
            },
            self.rules.randomized.label()
        )
    }
}

/// Whether a device counts, and the rule that decided, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub counted: bool,
    pub rule: String,
}

fn ago(age_ms: u64) -> String {
    match age_ms / DAY_MS {
        0 => "seen today".to_owned(),
        1 => "seen 1 day ago".to_owned(),
        n => format!("seen {n} days ago"),
    }
}

/// Decides whether `device` counts under `policy` at `now_ms`, and says why.
pub fn evaluate(policy: &Policy, device: &DeviceRecord, now_ms: u64) -> Decision {
    let rules = &policy.rules;
    let version = &policy.version;
    let window = rules.window_days;
    let age_ms = now_ms.saturating_sub(device.last_seen_ms);
    let seen = ago(age_ms);
    if age_ms > u64::from(window) * DAY_MS {
        return Decision {
            counted: false,
            rule: format!("{seen}, outside the {window}-day window of policy {version}"),
        };
    }
    let category = crate::model::category(device);
    if !policy.counts_category(category) {
        return Decision {
            counted: false,
            rule: format!("category {category} is not counted under policy {version}"),
        };
    }
    if device.weak_only {
        let what = weak_kind(device);
        match rules.randomized {
            RandomizedRule::Count => {}
            RandomizedRule::Exclude => {
                return Decision {
                    counted: false,
                    rule: format!("{what}: excluded by policy {version}"),
                };
            }
            RandomizedRule::CountIfNamed => match device_name(device) {
                Some(name) => {
                    return Decision {
                        counted: true,
                        rule: format!(
                            "{what} named {name}, {seen}, within {window} days (policy {version})"
                        ),
                    };
                }
                None => {
                    return Decision {
                        counted: false,
                        rule: format!("{what} without a name: excluded by policy {version}"),
                    };
                }
            },
        }
    }
    Decision {
        counted: true,
        rule: format!("{seen}, within {window} days (policy {version})"),
    }
}

/// What a device without a strong identifier is known by, for reasons.
fn weak_kind(device: &DeviceRecord) -> &'static str {
    let has = |kind: &str| {
        device
            .keys
            .iter()
            .any(|k| identity::describe_key(k).0 == kind)
    };
    if has("randomized-mac") {
        "randomized MAC"
    } else if has("mdns-name") {
        "device known only by its mDNS name"
    } else {
        "device without a strong identifier"
    }
}

/// The name a weak device goes by: its mDNS host name, else any other name it has.
fn device_name(device: &DeviceRecord) -> Option<&str> {
    device
        .keys
        .iter()
        .map(|k| identity::describe_key(k))
        .find(|(kind, _)| *kind == "mdns-name")
        .map(|(_, v)| v)
        .or_else(|| {
            device
                .names
                .iter()
                .map(String::as_str)
                .find(|n| !n.is_empty())
        })
}

/// What the counting rules read of a device, and nothing more: a store can keep this beside
/// each device and count a client without reading whole records (see [`counts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceSummary<'a> {
    pub last_seen_ms: u64,
    /// As [`crate::model::category`] says it: "unknown" when no agent decided one.
    pub category: &'a str,
    pub weak_only: bool,
    /// Whether it has a name the `count-if-named` rule accepts.
    pub named: bool,
}

impl<'a> DeviceSummary<'a> {
    pub fn of(device: &'a DeviceRecord) -> Self {
        DeviceSummary {
            last_seen_ms: device.last_seen_ms,
            category: crate::model::category(device),
            weak_only: device.weak_only,
            named: device_name(device).is_some(),
        }
    }
}

/// Whether a device counts under `policy` at `now_ms`: the same decision as [`evaluate`], without
/// the words, from the summary alone.
pub fn counts(policy: &Policy, device: &DeviceSummary<'_>, now_ms: u64) -> bool {
    let rules = &policy.rules;
    if now_ms.saturating_sub(device.last_seen_ms) > u64::from(rules.window_days) * DAY_MS {
        return false;
    }
    if !policy.counts_category(device.category) {
        return false;
    }
    !device.weak_only
        || match rules.randomized {
            RandomizedRule::Count => true,
            RandomizedRule::Exclude => false,
            RandomizedRule::CountIfNamed => device.named,
        }
}

/// Per-client totals under one policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    pub devices: u64,
    pub by_category: std::collections::BTreeMap<String, u64>,
}

impl Tally {
    /// Counts `device` if `decision` says so.
    pub fn add(&mut self, device: &DeviceRecord, decision: &Decision) {
        if decision.counted {
            self.count(crate::model::category(device));
        }
    }

    /// Counts the summarised device if it counts under `policy` at `now_ms`.
    pub fn add_summary(&mut self, policy: &Policy, device: &DeviceSummary<'_>, now_ms: u64) {
        if counts(policy, device, now_ms) {
            self.count(device.category);
        }
    }

    fn count(&mut self, category: &str) {
        self.devices += 1;
        // Looked up before inserting: a client's thousands of devices fall in a handful of
        // categories, so the label is copied only once each.
        match self.by_category.get_mut(category) {
            Some(n) => *n += 1,
            None => {
                self.by_category.insert(category.to_owned(), 1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn device(keys: &[&str], category: &str, last_seen_ms: u64) -> DeviceRecord {
        DeviceRecord {
            id: "d1".into(),
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
            first_seen_ms: 0,
            last_seen_ms,
            evidence: Vec::new(),
            weak_only: keys.iter().all(|k| !identity::is_strong(k)),
            anomalies: Vec::new(),
        }
    }

    fn policy(version: &str, rules: PolicyRules) -> Policy {
        Policy {
            version: version.into(),
            client: "acme".into(),
            saved_ms: 1,
            rules: rules.validated().expect("valid rules"),
        }
    }

    #[test]
    fn the_default_counts_everything_seen_within_30_days() {
        let p = Policy::default();
        let d = device(&["1mac:00:16:3e:00:00:01"], "", NOW - 3 * DAY_MS - 5);
        assert_eq!(
            evaluate(&p, &d, NOW),
            Decision {
                counted: true,
                rule: "seen 3 days ago, within 30 days (policy device-v1)".into()
            }
        );
        let edge = device(&["1mac:00:16:3e:00:00:01"], "printer", NOW - 30 * DAY_MS);
        assert!(evaluate(&p, &edge, NOW).counted);
        let stale = device(
            &["1mac:00:16:3e:00:00:01"],
            "printer",
            NOW - 30 * DAY_MS - 1,
        );
        let d = evaluate(&p, &stale, NOW);
        assert!(!d.counted);
        assert_eq!(
            d.rule,
            "seen 30 days ago, outside the 30-day window of policy device-v1"
        );
        // Randomized devices count by default.
        let phone = device(&["4lmac:02:00:00:00:00:01"], "", NOW);
        assert_eq!(
            evaluate(&p, &phone, NOW).rule,
            "seen today, within 30 days (policy device-v1)"
        );
        // A device stamped slightly in the future (clock skew) is seen today.
        assert!(evaluate(&p, &device(&["1mac:00:16:3e:00:00:01"], "", NOW + 10), NOW).counted);
    }

    #[test]
    fn categories_and_window_follow_the_policy() {
        let p = policy(
            "acme-2",
            PolicyRules {
                window_days: 7,
                categories: vec!["Computer".into(), "network".into(), "computer".into()],
                randomized: RandomizedRule::Count,
            },
        );
        assert_eq!(p.rules.categories, ["computer", "network"]);
        let printer = device(&["1mac:00:16:3e:00:00:01"], "printer", NOW);
        assert_eq!(
            evaluate(&p, &printer, NOW),
            Decision {
                counted: false,
                rule: "category printer is not counted under policy acme-2".into()
            }
        );
        let unknown = device(&["1mac:00:16:3e:00:00:01"], "", NOW);
        assert_eq!(
            evaluate(&p, &unknown, NOW).rule,
            "category unknown is not counted under policy acme-2"
        );
        let pc = device(&["1mac:00:16:3e:00:00:01"], "computer", NOW - 8 * DAY_MS);
        assert_eq!(
            evaluate(&p, &pc, NOW).rule,
            "seen 8 days ago, outside the 7-day window of policy acme-2"
        );
        let pc = device(&["1mac:00:16:3e:00:00:01"], "computer", NOW - DAY_MS);
        assert_eq!(
            evaluate(&p, &pc, NOW),
            Decision {
                counted: true,
                rule: "seen 1 day ago, within 7 days (policy acme-2)".into()
            }
        );
    }

    #[test]
    fn randomized_devices_follow_their_rule() {
        let exclude = policy(
            "acme-3",
            PolicyRules {
                randomized: RandomizedRule::Exclude,
                ..PolicyRules::default()
            },
        );
        let if_named = policy(
            "acme-4",
            PolicyRules {
                randomized: RandomizedRule::CountIfNamed,
                ..PolicyRules::default()
            },
        );
        let bare = device(&["4lmac:02:00:00:00:00:01"], "phone-tablet", NOW);
        let named = device(
            &["4lmac:02:00:00:00:00:02", "5mdns:pixel-7.local"],
            "phone-tablet",
            NOW,
        );
        let mut sys_named = device(&["4lmac:02:00:00:00:00:03"], "", NOW);
        sys_named.names = vec!["kiosk".into()];
        let strong = device(&["1mac:00:16:3e:00:00:01"], "", NOW);
        let address_only = device(&["6ip:hq:198.18.0.9"], "", NOW);

        assert_eq!(
            evaluate(&exclude, &bare, NOW),
            Decision {
                counted: false,
                rule: "randomized MAC: excluded by policy acme-3".into()
            }
        );
        assert!(!evaluate(&exclude, &named, NOW).counted);
        assert!(evaluate(&exclude, &strong, NOW).counted);
        assert_eq!(
            evaluate(&exclude, &address_only, NOW).rule,
            "device without a strong identifier: excluded by policy acme-3"
        );

        assert_eq!(
            evaluate(&if_named, &bare, NOW),
            Decision {
                counted: false,
                rule: "randomized MAC without a name: excluded by policy acme-4".into()
            }
        );
        assert_eq!(
            evaluate(&if_named, &named, NOW),
            Decision {
                counted: true,
                rule:
                    "randomized MAC named pixel-7.local, seen today, within 30 days (policy acme-4)"
                        .into()
            }
        );
        assert!(
            evaluate(&if_named, &sys_named, NOW)
                .rule
                .contains("named kiosk")
        );
        assert!(evaluate(&if_named, &strong, NOW).counted);
        // The window still applies first.
        let old = device(&["4lmac:02:00:00:00:00:02", "5mdns:pixel-7.local"], "", 0);
        assert!(!evaluate(&if_named, &old, NOW).counted);
    }

    #[test]
    fn rules_are_validated() {
        let bad = |rules: PolicyRules| rules.validated().expect_err("refused");
        assert_eq!(
            bad(PolicyRules {
                window_days: 0,
                ..PolicyRules::default()
            }),
            PolicyError::Window(0)
        );
        assert_eq!(
            bad(PolicyRules {
                window_days: MAX_WINDOW_DAYS + 1,
                ..PolicyRules::default()
            }),
            PolicyError::Window(MAX_WINDOW_DAYS + 1)
        );
        assert!(matches!(
            bad(PolicyRules {
                categories: vec!["toaster".into()],
                ..PolicyRules::default()
            }),
            PolicyError::Category(c) if c == "toaster"
        ));
        // Listing every category is the same as listing none.
        let all = PolicyRules {
            categories: CATEGORIES.iter().map(|c| (*c).to_owned()).collect(),
            ..PolicyRules::default()
        };
        assert!(all.validated().expect("valid").categories.is_empty());
        assert_eq!(
            RandomizedRule::parse("count_if_named"),
            Some(RandomizedRule::CountIfNamed)
        );
        assert_eq!(RandomizedRule::parse("sometimes"), None);
        assert_eq!(Policy::version_for("acme", 2), "acme-2");
        assert_eq!(
            Policy::default().summary(),
            "window 30 days, categories all, randomized count"
        );
    }

    #[test]
    fn a_tally_counts_only_counted_devices_by_category() {
        let p = policy(
            "acme-1",
            PolicyRules {
                categories: vec!["computer".into()],
                ..PolicyRules::default()
            },
        );
        let mut t = Tally::default();
        for d in [
            device(&["1mac:00:16:3e:00:00:01"], "computer", NOW),
            device(&["1mac:00:16:3e:00:00:02"], "computer", NOW),
            device(&["1mac:00:16:3e:00:00:03"], "printer", NOW),
        ] {
            t.add(&d, &evaluate(&p, &d, NOW));
        }
        assert_eq!(t.devices, 2);
        assert_eq!(t.by_category.get("computer"), Some(&2));
        assert_eq!(t.by_category.get("printer"), None);
    }

    proptest::proptest! {
        /// Counting from a summary decides exactly as `evaluate` on the whole record.
        #[test]
        fn counting_a_summary_agrees_with_evaluate(
            age_days in 0u64..40,
            age_ms in 0u64..DAY_MS,
            window_days in 1u32..35,
            category in proptest::sample::select(vec!["", "computer", "printer", "network"]),
            counted in proptest::sample::subsequence(vec!["computer", "printer", "unknown"], 0..3),
            key in proptest::sample::select(vec![
                "1mac:00:16:3e:00:00:01",
                "4lmac:02:00:00:00:00:01",
                "5mdns:pixel-7.local",
                "6ip:hq:198.18.0.9",
            ]),
            name in proptest::sample::select(vec!["", "kiosk"]),
            randomized in proptest::sample::select(vec![
                RandomizedRule::Count,
                RandomizedRule::Exclude,
                RandomizedRule::CountIfNamed,
            ]),
        ) {
            let p = policy("acme-1", PolicyRules {
                window_days,
                categories: counted.iter().map(|c| (*c).to_owned()).collect(),
                randomized,
            });
            let mut d = device(&[key], category, NOW - age_days * DAY_MS - age_ms);
            if !name.is_empty() {
                d.names = vec![name.into()];
            }
            proptest::prop_assert_eq!(
                counts(&p, &DeviceSummary::of(&d), NOW),
                evaluate(&p, &d, NOW).counted
            );
        }
    }
}
