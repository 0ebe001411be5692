//! Whether an Entra ID user is billable, and why, in words (BRIEF: "accountEnabled, userType
//! Member, a licence from an allow-list of SKUs"). I/O-free: the tenant's subscribed SKUs come
//! in as data, so the same read always gives the same decisions.

use std::collections::{BTreeMap, BTreeSet};

use super::wire::{GraphUser, SubscribedSku, is_guid};

/// A client's licence allow-list, resolved against the tenant's subscribed SKUs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LicencePolicy {
    /// An empty allow-list: any licence makes a user billable.
    any: bool,
    /// Allowed SKU ids, lower-case.
    allowed: BTreeSet<String>,
    /// Part numbers of the tenant's SKUs, by SKU id, for reasons.
    names: BTreeMap<String, String>,
    /// Allow-list part numbers the tenant does not subscribe to.
    unmatched: Vec<String>,
}

impl LicencePolicy {
    /// Resolves `allow_list` (SKU ids or part numbers, as validated in
    /// [`super::GraphSettings::validated`]) against the tenant's `skus`. A part number the tenant
    /// does not subscribe to matches nobody and is listed by [`Self::unmatched`] (an MSP may
    /// share one allow-list between clients, so it is not an error; a typo shows there).
    pub fn new(allow_list: &[String], skus: &[SubscribedSku]) -> Self {
        let names: BTreeMap<String, String> = skus
            .iter()
            .map(|s| (s.sku_id.to_ascii_lowercase(), s.part_number.clone()))
            .collect();
        let mut allowed = BTreeSet::new();
        let mut unmatched = Vec::new();
        for entry in allow_list {
            let entry = entry.trim();
            if is_guid(entry) {
                allowed.insert(entry.to_ascii_lowercase());
                continue;
            }
            let before = allowed.len();
            for s in skus {
                if s.part_number.eq_ignore_ascii_case(entry) {
                    allowed.insert(s.sku_id.to_ascii_lowercase());
                }
            }
            if allowed.len() == before {
                unmatched.push(entry.to_owned());
            }
        }
        LicencePolicy {
            any: allow_list.is_empty(),
            allowed,
            names,
            unmatched,
        }
    }

    /// Allow-list part numbers that matched none of the tenant's SKUs.
    pub fn unmatched(&self) -> &[String] {
        &self.unmatched
    }

    fn licence(&self, sku_id: &str) -> String {
        match self.names.get(sku_id) {
            Some(name) => format!("{name} (skuId {sku_id})"),
            None => format!("skuId {sku_id}"),
        }
    }
}

/// Whether a user is billable, and the rule that decided, in words.
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

/// Decides whether `user` is billable under `policy`. The rules, in order: a Member (guests
/// and users of unknown type are not billed), enabled (a missing `accountEnabled` is not
/// billed: unknown is not enabled), and holding a licence from the allow-list (any licence when
/// the allow-list is empty).
pub fn decide(user: &GraphUser, policy: &LicencePolicy) -> Decision {
    match user.user_type.as_deref() {
        Some(t) if t.eq_ignore_ascii_case("member") => {}
        Some(t) if t.eq_ignore_ascii_case("guest") => return Decision::no("guest account"),
        Some(t) => return Decision::no(format!("user type {t:?}, not Member")),
        None => return Decision::no("user type unknown (no userType), not Member"),
    }
    match user.enabled {
        Some(true) => {}
        Some(false) => return Decision::no("disabled"),
        None => return Decision::no("account state unknown (no accountEnabled)"),
    }
    if user.sku_ids.is_empty() {
        return Decision::no("no licence");
    }
    let allowed = user
        .sku_ids
        .iter()
        .find(|s| policy.any || policy.allowed.contains(s.as_str()));
    match allowed {
        Some(sku) if policy.any => Decision {
            billable: true,
            reason: format!("licensed {} (any licence counts)", policy.licence(sku)),
        },
        Some(sku) => Decision {
            billable: true,
            reason: format!("licensed {}", policy.licence(sku)),
        },
        None => Decision::no("no licence from the allow-list"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const E3: &str = "05e9a617-0261-4cee-bb44-138d3ef5d965";
    const SPB: &str = "cbdc14ab-d96c-4c30-b9f4-6ada7cdc1d46";
    const PBI: &str = "a403ebcc-fae0-4ca2-8c8c-7a907fd6c235";

    fn skus() -> Vec<SubscribedSku> {
        [(E3, "SPE_E3"), (SPB, "SPB"), (PBI, "POWER_BI_STANDARD")]
            .iter()
            .map(|(id, name)| SubscribedSku {
                sku_id: (*id).into(),
                part_number: (*name).into(),
            })
            .collect()
    }

    fn user(kind: Option<&str>, enabled: Option<bool>, skus: &[&str]) -> GraphUser {
        GraphUser {
            id: "u".into(),
            upn: "u@contoso.com".into(),
            display_name: "U".into(),
            enabled,
            user_type: kind.map(Into::into),
            sku_ids: skus.iter().map(|s| (*s).to_owned()).collect(),
            on_premises_sid: None,
            on_premises_immutable_id: None,
            on_premises_sync_enabled: None,
            created: None,
            sign_in_read: false,
            last_sign_in: None,
        }
    }

    fn reason(u: &GraphUser, p: &LicencePolicy) -> (bool, String) {
        let d = decide(u, p);
        (d.billable, d.reason)
    }

    #[test]
    fn each_rule_names_itself() {
        let p = LicencePolicy::new(&[E3.into(), "spb".into()], &skus());
        let m = Some("Member");
        assert_eq!(
            reason(&user(m, Some(true), &[E3]), &p),
            (true, format!("licensed SPE_E3 (skuId {E3})"))
        );
        assert_eq!(
            reason(&user(m, Some(true), &[PBI, SPB]), &p),
            (true, format!("licensed SPB (skuId {SPB})")),
            "part numbers match case-insensitively"
        );
        assert_eq!(
            reason(&user(Some("Guest"), Some(true), &[E3]), &p),
            (false, "guest account".into())
        );
        assert_eq!(
            reason(&user(m, Some(false), &[E3]), &p),
            (false, "disabled".into())
        );
        assert_eq!(
            reason(&user(m, Some(true), &[]), &p),
            (false, "no licence".into())
        );
        assert_eq!(
            reason(&user(m, Some(true), &[PBI]), &p),
            (false, "no licence from the allow-list".into())
        );
        assert!(!decide(&user(None, Some(true), &[E3]), &p).billable);
        assert!(!decide(&user(m, None, &[E3]), &p).billable);
        assert!(!decide(&user(Some("Contractor"), Some(true), &[E3]), &p).billable);
    }

    #[test]
    fn empty_allow_list_means_any_licence() {
        let p = LicencePolicy::new(&[], &skus());
        let d = decide(&user(Some("Member"), Some(true), &[PBI]), &p);
        assert!(d.billable);
        assert_eq!(
            d.reason,
            format!("licensed POWER_BI_STANDARD (skuId {PBI}) (any licence counts)")
        );
        assert!(!decide(&user(Some("Member"), Some(true), &[]), &p).billable);
    }

    #[test]
    fn unknown_part_numbers_match_nobody_and_are_reported() {
        let p = LicencePolicy::new(&["SPE_E5".into()], &skus());
        assert_eq!(p.unmatched(), ["SPE_E5"]);
        assert!(!decide(&user(Some("Member"), Some(true), &[E3]), &p).billable);
    }

    #[test]
    fn sku_ids_need_no_subscribed_skus() {
        let p = LicencePolicy::new(&[E3.to_uppercase()], &[]);
        assert_eq!(
            reason(&user(Some("Member"), Some(true), &[E3]), &p),
            (true, format!("licensed skuId {E3}"))
        );
    }
}
