//! A directory read as `census-agent users` prints it: a table with one line per user and a
//! summary line, or one JSON document. Facts only (enabled, expired, last logon, groups, flags);
//! whether a user is billable is the collector's policy. Groups are every group the user is in,
//! nested groups included (the read resolves nesting), not only AD's direct memberOf.

use std::time::SystemTime;

use census_proto::{convert, v1};
use serde_json::json;

use super::DirectoryReadResult;
use super::convert::guid_to_string;

/// userAccountControl's ACCOUNTDISABLE bit.
const ACCOUNT_DISABLE: u32 = 0x2;
/// sAMAccountType of a normal user account.
const SAM_NORMAL_USER: u32 = 805_306_368;
/// sAMAccountType of an interdomain trust account.
const SAM_TRUST_ACCOUNT: u32 = 805_306_370;

/// Whether the account is enabled (ACCOUNTDISABLE clear).
pub fn enabled(u: &v1::DirectoryUser) -> bool {
    u.user_account_control & ACCOUNT_DISABLE == 0
}

/// Whether accountExpires is at or before `now`.
pub fn expired(u: &v1::DirectoryUser, now: SystemTime) -> bool {
    u.account_expires
        .as_ref()
        .is_some_and(|t| convert::system_time(t).is_none_or(|at| at <= now))
}

/// What sets the account apart, in words: `service` (a servicePrincipalName), `critical`
/// (isCriticalSystemObject), `computer`, `trust-account` or `type-N` (not a normal user
/// account).
pub fn flags(u: &v1::DirectoryUser) -> Vec<String> {
    let mut out = Vec::new();
    if u.has_service_principal_name {
        out.push("service".to_owned());
    }
    if u.critical_system_object {
        out.push("critical".to_owned());
    }
    if u.is_computer {
        out.push("computer".to_owned());
    }
    match u.sam_account_type {
        SAM_NORMAL_USER => {}
        SAM_TRUST_ACCOUNT => out.push("trust-account".to_owned()),
        other => out.push(format!("type-{other}")),
    }
    out
}

/// RFC 3339 to the second, or `None` when unset or out of range.
fn rfc3339(t: Option<&prost_types::Timestamp>) -> Option<String> {
    let at = convert::system_time(t?)?;
    Some(humantime::format_rfc3339_seconds(at).to_string())
}

/// The header line of [`user_line`]'s table.
pub fn header_line() -> String {
    format!(
        "{:<20} {:<40} {:<8} {:<7} {:<10} {:>6} FLAGS",
        "ACCOUNT", "UPN", "STATE", "EXPIRED", "LAST LOGON", "GROUPS"
    )
}

/// One user as a table line: sAMAccountName, UPN, enabled or disabled, expired, the date of
/// lastLogonTimestamp (which lags the real last logon by up to 14 days) or `never`, how many
/// groups the user is in (nested included), flags.
pub fn user_line(u: &v1::DirectoryUser, now: SystemTime) -> String {
    let or_dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    let last_logon = rfc3339(u.last_logon.as_ref())
        .map_or_else(|| "never".to_owned(), |t| t.chars().take(10).collect());
    let flags = flags(u);
    format!(
        "{:<20} {:<40} {:<8} {:<7} {:<10} {:>6} {}",
        or_dash(&u.sam_account_name),
        or_dash(&u.user_principal_name),
        if enabled(u) { "enabled" } else { "disabled" },
        if expired(u, now) { "yes" } else { "no" },
        last_logon,
        u.member_of.len(),
        if flags.is_empty() {
            "-".to_owned()
        } else {
            flags.join(",")
        }
    )
}

/// The summary line: users by state, pages, skipped, and how `run` would send them.
pub fn summary_line(
    read: &DirectoryReadResult,
    batches: usize,
    elapsed: std::time::Duration,
    now: SystemTime,
) -> String {
    let disabled = read.users.iter().filter(|u| !enabled(u)).count();
    let expired = read.users.iter().filter(|u| expired(u, now)).count();
    format!(
        "read {} users from {} ({}) in {:.1}s, {} pages, {} skipped: {} enabled, {} disabled, {} expired; `census-agent run` sends them in {} batches",
        read.users.len(),
        read.directory,
        read.base_dn,
        elapsed.as_secs_f64(),
        read.pages,
        read.skipped,
        read.users.len() - disabled,
        disabled,
        expired,
        batches
    )
}

/// One user as JSON: every field the agent sends, the GUID in its text form, times in RFC 3339
/// (`null` when unset), and the derived `enabled`, `expired` and `flags`. `member_of` is every
/// group the user is in, nested included, sorted (as sent to the collector).
pub fn user_json(u: &v1::DirectoryUser, now: SystemTime) -> serde_json::Value {
    json!({
        "sam_account_name": u.sam_account_name,
        "user_principal_name": u.user_principal_name,
        "display_name": u.display_name,
        "distinguished_name": u.distinguished_name,
        "object_guid": <[u8; 16]>::try_from(u.object_guid.as_slice()).map(|g| guid_to_string(&g)).unwrap_or_default(),
        "object_sid": u.object_sid,
        "sam_account_type": u.sam_account_type,
        "user_account_control": u.user_account_control,
        "enabled": enabled(u),
        "expired": expired(u, now),
        "account_expires": rfc3339(u.account_expires.as_ref()),
        "last_logon": rfc3339(u.last_logon.as_ref()),
        "when_created": rfc3339(u.when_created.as_ref()),
        "critical_system_object": u.critical_system_object,
        "service_principal_name": u.has_service_principal_name,
        "computer": u.is_computer,
        "member_of": u.member_of,
        "flags": flags(u),
    })
}

/// The whole read as one JSON document: the read's facts (directory, base DN, when, pages,
/// skipped, the batches `run` would send) and `users`, each as [`user_json`].
pub fn read_json(read: &DirectoryReadResult, batches: usize, now: SystemTime) -> serde_json::Value {
    json!({
        "directory": read.directory,
        "base_dn": read.base_dn,
        "read_at": humantime::format_rfc3339_seconds(read.read_at).to_string(),
        "pages": read.pages,
        "skipped": read.skipped,
        "batches": batches,
        "users": read.users.iter().map(|u| user_json(u, now)).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn alice() -> v1::DirectoryUser {
        v1::DirectoryUser {
            object_guid: (0u8..16).collect(),
            object_sid: "S-1-5-21-1-2-3-1105".into(),
            sam_account_name: "alice".into(),
            user_principal_name: "alice@lab.census.test".into(),
            sam_account_type: SAM_NORMAL_USER,
            user_account_control: 0x200,
            ..Default::default()
        }
    }

    #[test]
    fn state_expiry_and_flags() {
        let now = at(1_800_000_000);
        let mut u = alice();
        assert!(enabled(&u) && !expired(&u, now) && flags(&u).is_empty());
        u.user_account_control |= ACCOUNT_DISABLE;
        u.account_expires = Some(convert::timestamp(at(1_700_000_000)));
        u.has_service_principal_name = true;
        u.critical_system_object = true;
        u.sam_account_type = SAM_TRUST_ACCOUNT;
        assert!(!enabled(&u) && expired(&u, now));
        assert_eq!(flags(&u), ["service", "critical", "trust-account"]);
        u.account_expires = Some(convert::timestamp(at(1_900_000_000)));
        assert!(!expired(&u, now), "expires later");
        u.sam_account_type = 1;
        u.is_computer = true;
        assert_eq!(flags(&u), ["service", "critical", "computer", "type-1"]);
    }

    #[test]
    fn lines_and_json() {
        let now = at(1_800_000_000);
        let mut u = alice();
        let line = user_line(&u, now);
        assert!(line.starts_with("alice "), "{line}");
        assert!(
            line.contains(" enabled ") && line.contains(" never "),
            "{line}"
        );
        assert!(line.ends_with("      0 -"), "no groups, no flags: {line}");
        u.last_logon = Some(convert::timestamp(at(1_455_526_400)));
        u.user_principal_name.clear();
        u.member_of = vec!["CN=A,DC=lab".into(), "CN=B,DC=lab".into()];
        assert!(
            user_line(&u, now).ends_with("      2 -"),
            "{}",
            user_line(&u, now)
        );
        let line = user_line(&u, now);
        assert!(line.contains(" 2016-02-15 "), "{line}");
        assert!(line.contains(" - "), "an empty UPN shows as -: {line}");
        assert_eq!(
            header_line().split_whitespace().next(),
            Some("ACCOUNT"),
            "{}",
            header_line()
        );

        let read = DirectoryReadResult {
            directory: "lab.census.test".into(),
            base_dn: "DC=lab,DC=census,DC=test".into(),
            read_at: at(1_800_000_000),
            users: vec![alice(), u],
            pages: 1,
            skipped: 0,
        };
        let doc = read_json(&read, 1, now);
        assert_eq!(doc["users"].as_array().map(Vec::len), Some(2));
        assert_eq!(doc["batches"], 1);
        assert_eq!(doc["read_at"], "2027-01-15T08:00:00Z");
        let first = &doc["users"][0];
        assert_eq!(first["object_guid"], "03020100-0504-0706-0809-0a0b0c0d0e0f");
        assert_eq!(first["enabled"], true);
        assert_eq!(first["last_logon"], serde_json::Value::Null);
        assert_eq!(doc["users"][1]["last_logon"], "2016-02-15T08:53:20Z");
        let summary = summary_line(&read, 1, Duration::from_millis(1500), now);
        assert!(
            summary.starts_with("read 2 users from lab.census.test (DC=lab,DC=census,DC=test) in 1.5s, 1 pages, 0 skipped: 2 enabled, 0 disabled, 0 expired"),
            "{summary}"
        );
    }
}
