//! The billable-user policy: which of a client's accounts go on the invoice (BRIEF: "Users:
//! what a billable user is"). Versioned like the device policy: every policy an operator saves
//! for client `acme` gets the next version, `acme-users-1`, `acme-users-2`, ...; a version names
//! one set of rules forever, so a count or a snapshot that names it can always be explained.
//! Every client counts under the built-in default ([`DEFAULT_VERSION`]) until one is saved.

use serde::{Deserialize, Serialize};

/// The version of the built-in default user policy.
pub const DEFAULT_VERSION: &str = "user-v1";
/// The default stale-logon window, in days.
pub const DEFAULT_STALE_LOGON_DAYS: u32 = 90;
/// `lastLogonTimestamp` is replicated only when it is older than 9 to 14 days
/// (ms-DS-Logon-Time-Sync-Interval, 14 days minus up to 5 random), so a shorter window would
/// call active users stale.
pub const MIN_STALE_LOGON_DAYS: u32 = 15;
/// The longest stale-logon window (ten years).
pub const MAX_STALE_LOGON_DAYS: u32 = 3650;
/// Most exclusion groups and allow-listed licences a policy holds.
pub const MAX_LIST: usize = 64;
/// Longest exclusion group or licence entry.
pub const MAX_ENTRY: usize = 512;

/// The rules an operator sets; [`UserPolicy`] adds the version the store assigns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserPolicyRules {
    /// An account with no logon in this many days does not count; 0 turns the rule off.
    /// `lastLogonTimestamp` lags real logons by 9 to 14 days, so the smallest window is
    /// [`MIN_STALE_LOGON_DAYS`]. An account that never logged on is a new account and counts
    /// until it is older than the window (whenCreated, createdDateTime); one with no creation
    /// time does not. Entra ID users follow the same rule on their latest sign-in where the
    /// tenant gives sign-in activity (Entra ID P1), see [`super::decide`].
    pub stale_logon_days: u32,
    /// Whether accounts with a servicePrincipalName (service accounts) count.
    #[serde(default)]
    pub count_service_accounts: bool,
    /// Active Directory groups whose members do not count, nested members included (the agent
    /// sends every group an account is in): a distinguished name, or a group's name (its CN),
    /// matched case-insensitively.
    #[serde(default)]
    pub exclusion_groups: Vec<String>,
    /// Entra ID licences that make a user billable: SKU ids (GUIDs) or SKU part numbers
    /// (`SPE_E3`). Empty: any licence.
    #[serde(default)]
    pub licence_allow_list: Vec<String>,
}

impl Default for UserPolicyRules {
    fn default() -> Self {
        UserPolicyRules {
            stale_logon_days: DEFAULT_STALE_LOGON_DAYS,
            count_service_accounts: false,
            exclusion_groups: Vec::new(),
            licence_allow_list: Vec::new(),
        }
    }
}

/// Why a user policy was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserPolicyError {
    #[error(
        "stale_logon_days must be 0 (off) or between {MIN_STALE_LOGON_DAYS} and {MAX_STALE_LOGON_DAYS}, not {0}: lastLogonTimestamp lags real logons by up to 14 days"
    )]
    StaleWindow(u32),
    #[error("at most {MAX_LIST} {0} may be listed")]
    TooMany(&'static str),
    #[error("{0} entries must be 1 to {MAX_ENTRY} characters without control characters")]
    Entry(&'static str),
}

impl UserPolicyRules {
    /// Checks the rules and puts them in canonical form (lists trimmed, deduplicated
    /// case-insensitively, sorted).
    pub fn validated(mut self) -> Result<Self, UserPolicyError> {
        if self.stale_logon_days != 0
            && !(MIN_STALE_LOGON_DAYS..=MAX_STALE_LOGON_DAYS).contains(&self.stale_logon_days)
        {
            return Err(UserPolicyError::StaleWindow(self.stale_logon_days));
        }
        self.exclusion_groups = canonical_list("exclusion groups", &self.exclusion_groups)?;
        self.licence_allow_list = canonical_list("licences", &self.licence_allow_list)?;
        Ok(self)
    }
}

fn canonical_list(what: &'static str, list: &[String]) -> Result<Vec<String>, UserPolicyError> {
    let mut out: Vec<String> = Vec::with_capacity(list.len());
    for entry in list {
        let entry = entry.trim();
        if entry.is_empty() {
            continue;
        }
        if entry.len() > MAX_ENTRY || entry.chars().any(char::is_control) {
            return Err(UserPolicyError::Entry(what));
        }
        if !out.iter().any(|e| e.eq_ignore_ascii_case(entry)) {
            out.push(entry.to_owned());
        }
    }
    if out.len() > MAX_LIST {
        return Err(UserPolicyError::TooMany(what));
    }
    out.sort_by_key(|e| e.to_ascii_lowercase());
    Ok(out)
}

/// A client's billable-user policy, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserPolicy {
    /// [`DEFAULT_VERSION`], or `<client>-users-<n>`.
    pub version: String,
    /// Empty for the default.
    pub client: String,
    /// When it was saved; 0 for the default.
    pub saved_ms: u64,
    pub rules: UserPolicyRules,
}

impl Default for UserPolicy {
    fn default() -> Self {
        UserPolicy {
            version: DEFAULT_VERSION.to_owned(),
            client: String::new(),
            saved_ms: 0,
            rules: UserPolicyRules::default(),
        }
    }
}

impl UserPolicy {
    pub fn is_default(&self) -> bool {
        self.version == DEFAULT_VERSION
    }

    /// The version of the `n`-th user policy saved for `client`.
    pub fn version_for(client: &str, n: u64) -> String {
        format!("{client}-users-{n}")
    }

    /// The rules in one line, for logs and the CLI.
    pub fn summary(&self) -> String {
        let r = &self.rules;
        let stale = if r.stale_logon_days == 0 {
            "no stale-logon rule".to_owned()
        } else {
            format!("logon within {} days", r.stale_logon_days)
        };
        let service = if r.count_service_accounts {
            "service accounts count"
        } else {
            "service accounts excluded"
        };
        let groups = if r.exclusion_groups.is_empty() {
            "no exclusion group".to_owned()
        } else {
            format!("excluding members of {}", r.exclusion_groups.join(", "))
        };
        let licences = if r.licence_allow_list.is_empty() {
            "any licence".to_owned()
        } else {
            format!("licences {}", r.licence_allow_list.join(", "))
        };
        format!("{stale}; {service}; {groups}; {licences}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_canonicalises_and_refuses() {
        let rules = UserPolicyRules {
            stale_logon_days: 30,
            count_service_accounts: true,
            exclusion_groups: vec![" NoBill ".into(), "nobill".into(), String::new()],
            licence_allow_list: vec!["SPE_E3".into(), "spb".into()],
        }
        .validated()
        .expect("valid");
        assert_eq!(rules.exclusion_groups, ["NoBill"]);
        assert_eq!(rules.licence_allow_list, ["spb", "SPE_E3"]);
        for days in [1, 14, 3651] {
            let bad = UserPolicyRules {
                stale_logon_days: days,
                ..UserPolicyRules::default()
            };
            assert_eq!(bad.validated(), Err(UserPolicyError::StaleWindow(days)));
        }
        let off = UserPolicyRules {
            stale_logon_days: 0,
            ..UserPolicyRules::default()
        };
        assert!(off.validated().is_ok());
        let control = UserPolicyRules {
            exclusion_groups: vec!["a\nb".into()],
            ..UserPolicyRules::default()
        };
        assert!(control.validated().is_err());
        let many = UserPolicyRules {
            licence_allow_list: (0..65).map(|i| format!("SKU{i}")).collect(),
            ..UserPolicyRules::default()
        };
        assert_eq!(many.validated(), Err(UserPolicyError::TooMany("licences")));
    }

    #[test]
    fn default_summary_reads() {
        assert_eq!(
            UserPolicy::default().summary(),
            "logon within 90 days; service accounts excluded; no exclusion group; any licence"
        );
        assert_eq!(UserPolicy::version_for("acme", 2), "acme-users-2");
    }
}
