//! The hybrid join: one person with an AD account and an Entra ID account is one user. The
//! keys are the stable anchors Entra Connect / Cloud Sync copy from AD, never names:
//! - AD `objectSid` ↔ Graph `onPremisesSecurityIdentifier` (both as `S-1-5-21-…` strings);
//! - AD `objectGUID` ↔ Graph `onPremisesImmutableId`, which by default is the base64 of the
//!   GUID's 16 bytes *in AD's byte order* (the first three fields little-endian, as LDAP
//!   returns the attribute), e.g. `PBp7vIlyPU6iv0t9GmtNTw==` is the GUID
//!   `bc7b1a3c-7289-4e3d-a2bf-4b7d1a6b4d4f`. (When the source anchor is `ms-DS-ConsistencyGuid`
//!   it starts as a copy of objectGUID, so the same conversion applies to it.)
//!
//! Two accounts are one person when they share any key. I/O-free.

use std::fmt;

use base64::{
    Engine, alphabet,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig, general_purpose::STANDARD},
};
use serde::{Deserialize, Serialize};

use super::wire::GraphUser;

/// A stable key shared by an AD account and its Entra ID counterpart.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum JoinKey {
    /// A SID in canonical string form (`S-1-5-21-…`, decimal, upper-case `S`).
    Sid(String),
    /// An objectGUID in its usual string form, lower-case.
    ObjectGuid(String),
}

impl fmt::Display for JoinKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JoinKey::Sid(s) => write!(f, "sid:{s}"),
            JoinKey::ObjectGuid(g) => write!(f, "guid:{g}"),
        }
    }
}

/// Join keys of an AD account, from its `objectSid` (string form; see [`sid_from_bytes`] for
/// the binary attribute) and its raw 16-byte `objectGUID` attribute. Malformed values give no
/// key rather than a wrong one.
pub fn join_key_ad(object_sid: Option<&str>, object_guid_bytes: Option<&[u8]>) -> Vec<JoinKey> {
    let mut keys = Vec::with_capacity(2);
    if let Some(sid) = object_sid.and_then(canonical_sid) {
        keys.push(JoinKey::Sid(sid));
    }
    if let Some(bytes) = object_guid_bytes.and_then(|b| <[u8; 16]>::try_from(b).ok()) {
        keys.push(JoinKey::ObjectGuid(guid_string_from_ad_bytes(&bytes)));
    }
    keys
}

/// Join keys of an Entra ID user: its on-premises SID, and the GUID its immutable id encodes
/// (an immutable id that is not the base64 of 16 bytes was not made from an objectGUID and
/// gives no key). Cloud-only users have neither, so they never join.
pub fn join_key_graph(user: &GraphUser) -> Vec<JoinKey> {
    let mut keys = Vec::with_capacity(2);
    if let Some(sid) = user.on_premises_sid.as_deref().and_then(canonical_sid) {
        keys.push(JoinKey::Sid(sid));
    }
    if let Some(bytes) = user
        .on_premises_immutable_id
        .as_deref()
        .and_then(ad_guid_from_immutable_id)
    {
        keys.push(JoinKey::ObjectGuid(guid_string_from_ad_bytes(&bytes)));
    }
    keys
}

/// The immutable id Entra Connect derives from an objectGUID: base64 of the AD bytes.
pub fn immutable_id_from_ad_guid(bytes: &[u8; 16]) -> String {
    STANDARD.encode(bytes)
}

/// The objectGUID bytes (AD order) an immutable id encodes, if it encodes 16 bytes. Padding is
/// optional, surrounding whitespace ignored.
pub fn ad_guid_from_immutable_id(immutable_id: &str) -> Option<[u8; 16]> {
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let s = immutable_id.trim();
    if s.len() > 24 {
        return None;
    }
    LENIENT.decode(s).ok()?.try_into().ok()
}

/// Where each byte of a GUID's string form sits in its AD bytes: the first three fields are
/// little-endian, the last two as written. The order is its own inverse.
const AD_ORDER: [usize; 16] = [3, 2, 1, 0, 5, 4, 7, 6, 8, 9, 10, 11, 12, 13, 14, 15];

/// The string form of a GUID from its AD (little-endian fields) bytes.
pub fn guid_string_from_ad_bytes(b: &[u8; 16]) -> String {
    let mut out = String::with_capacity(36);
    for (i, &at) in AD_ORDER.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push_str(&format!("{:02x}", b[at]));
    }
    out
}

/// The AD bytes of a GUID in string form (with or without braces), if it is one.
pub fn ad_bytes_from_guid_string(s: &str) -> Option<[u8; 16]> {
    let s = s.trim().trim_start_matches('{').trim_end_matches('}');
    if !super::wire::is_guid(s) {
        return None;
    }
    let hex: Vec<u8> = s
        .bytes()
        .filter(|b| *b != b'-')
        .collect::<Vec<u8>>()
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    let text: [u8; 16] = hex.try_into().ok()?;
    let mut b = [0u8; 16];
    for (i, &at) in AD_ORDER.iter().enumerate() {
        b[at] = text[i];
    }
    Some(b)
}

/// Most sub-authorities a SID has (Windows' limit).
const MAX_SUB_AUTHORITIES: usize = 15;

/// The canonical string form of a SID string (`s-1-5-21-…` → `S-1-5-21-…`, no leading zeros,
/// a hexadecimal `0x…` authority as Windows prints it only above 2³²), if it is one.
pub fn canonical_sid(s: &str) -> Option<String> {
    let mut parts = s.trim().split('-');
    if !parts.next()?.eq_ignore_ascii_case("s") {
        return None;
    }
    let revision: u8 = parts.next()?.parse().ok()?;
    let authority_text = parts.next()?;
    let authority = match authority_text
        .strip_prefix("0x")
        .or_else(|| authority_text.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16).ok()?,
        None => authority_text.parse().ok()?,
    };
    if authority >= 1 << 48 {
        return None;
    }
    let subs: Vec<u32> = parts
        .map(|p| p.parse().ok())
        .collect::<Option<Vec<u32>>>()?;
    if subs.len() > MAX_SUB_AUTHORITIES {
        return None;
    }
    Some(format_sid(revision, authority, &subs))
}

/// The string form of a binary `objectSid` attribute, if it is one.
pub fn sid_from_bytes(b: &[u8]) -> Option<String> {
    let (&revision, rest) = b.split_first()?;
    let (&count, rest) = rest.split_first()?;
    let count = usize::from(count);
    if count > MAX_SUB_AUTHORITIES || rest.len() != 6 + 4 * count {
        return None;
    }
    let authority = rest[..6]
        .iter()
        .fold(0u64, |acc, &byte| (acc << 8) | u64::from(byte));
    let subs: Vec<u32> = rest[6..]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Some(format_sid(revision, authority, &subs))
}

fn format_sid(revision: u8, authority: u64, subs: &[u32]) -> String {
    let mut out = if authority < 1 << 32 {
        format!("S-{revision}-{authority}")
    } else {
        format!("S-{revision}-0x{authority:012X}")
    };
    for s in subs {
        out.push('-');
        out.push_str(&s.to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Vectors checked independently with Python: `uuid.UUID(bytes_le=base64.b64decode(id))`.
    const VECTORS: [(&str, &str); 3] = [
        (
            "PBp7vIlyPU6iv0t9GmtNTw==",
            "bc7b1a3c-7289-4e3d-a2bf-4b7d1a6b4d4f",
        ),
        (
            "rWWa4C8Hp0aQg/y7EiAqEw==",
            "e09a65ad-072f-46a7-9083-fcbb12202a13",
        ),
        (
            "06VDDjYsnkq9RH7U6fbCsQ==",
            "0e43a5d3-2c36-4a9e-bd44-7ed4e9f6c2b1",
        ),
    ];

    #[test]
    fn immutable_id_is_base64_of_the_ad_bytes() {
        for (immutable, guid) in VECTORS {
            let bytes = ad_bytes_from_guid_string(guid).expect("a guid");
            assert_eq!(immutable_id_from_ad_guid(&bytes), immutable);
            assert_eq!(ad_guid_from_immutable_id(immutable), Some(bytes));
            assert_eq!(guid_string_from_ad_bytes(&bytes), guid);
        }
        // The AD byte order: the first three fields reversed, the rest as written.
        let b =
            ad_bytes_from_guid_string("{BC7B1A3C-7289-4E3D-A2BF-4B7D1A6B4D4F}").expect("a guid");
        assert_eq!(
            b,
            [
                0x3c, 0x1a, 0x7b, 0xbc, 0x89, 0x72, 0x3d, 0x4e, 0xa2, 0xbf, 0x4b, 0x7d, 0x1a, 0x6b,
                0x4d, 0x4f
            ]
        );
        assert_eq!(ad_guid_from_immutable_id("PBp7vIlyPU6iv0t9GmtNTw"), Some(b));
        assert_eq!(ad_guid_from_immutable_id("alice@contoso.com"), None);
        assert_eq!(ad_guid_from_immutable_id("AAAA"), None, "3 bytes");
        assert_eq!(ad_bytes_from_guid_string("not-a-guid"), None);
    }

    #[test]
    fn sids() {
        let admins = [
            0x01, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x05, 0x20, 0x00, 0x00, 0x00, 0x20, 0x02,
            0x00, 0x00,
        ];
        assert_eq!(sid_from_bytes(&admins).as_deref(), Some("S-1-5-32-544"));
        assert_eq!(sid_from_bytes(&admins[..15]), None);
        assert_eq!(sid_from_bytes(&[]), None);
        assert_eq!(
            canonical_sid(" s-1-5-21-01004336348-1177238915-682003330-1105 ").as_deref(),
            Some("S-1-5-21-1004336348-1177238915-682003330-1105")
        );
        assert_eq!(
            canonical_sid("S-1-0x000000000005-32").as_deref(),
            Some("S-1-5-32")
        );
        for bad in [
            "",
            "S-1",
            "X-1-5-21",
            "S-1-5-21-x",
            "S-1-5-21-4294967296",
            "S-1-5--1",
        ] {
            assert_eq!(canonical_sid(bad), None, "{bad:?}");
        }
    }

    fn graph_user(sid: Option<&str>, immutable: Option<&str>) -> GraphUser {
        GraphUser {
            id: "87d349ed-44d7-43e1-9a83-5f2406dee5bd".into(),
            upn: "AdeleV@contoso.com".into(),
            display_name: "Adele Vance".into(),
            enabled: Some(true),
            user_type: Some("Member".into()),
            sku_ids: vec![],
            on_premises_sid: sid.map(Into::into),
            on_premises_immutable_id: immutable.map(Into::into),
            on_premises_sync_enabled: Some(true),
            created: None,
            sign_in_read: false,
            last_sign_in: None,
        }
    }

    #[test]
    fn a_hybrid_user_shares_both_keys() {
        let sid = "S-1-5-21-1004336348-1177238915-682003330-1105";
        let guid = ad_bytes_from_guid_string(VECTORS[0].1).expect("a guid");
        let ad = join_key_ad(Some(sid), Some(&guid));
        let cloud = join_key_graph(&graph_user(Some(sid), Some(VECTORS[0].0)));
        assert_eq!(ad, cloud);
        assert_eq!(ad[1].to_string(), format!("guid:{}", VECTORS[0].1));
        // Either key alone is enough to join.
        let sid_only = join_key_graph(&graph_user(Some(&sid.to_lowercase()), None));
        assert!(ad.iter().any(|k| sid_only.contains(k)));
        // Cloud-only users (or other anchors) give no key; never a name.
        assert!(join_key_graph(&graph_user(None, None)).is_empty());
        assert!(join_key_graph(&graph_user(None, Some("adele@contoso.com"))).is_empty());
        assert!(join_key_ad(Some("Adele Vance"), Some(&guid[..8])).is_empty());
    }

    proptest! {
        #[test]
        fn guid_conversions_round_trip(bytes in any::<[u8; 16]>()) {
            let id = immutable_id_from_ad_guid(&bytes);
            prop_assert_eq!(ad_guid_from_immutable_id(&id), Some(bytes));
            let text = guid_string_from_ad_bytes(&bytes);
            prop_assert_eq!(ad_bytes_from_guid_string(&text), Some(bytes));
        }

        #[test]
        fn sid_bytes_and_strings_agree(authority in 0u64..(1 << 48), subs in proptest::collection::vec(any::<u32>(), 0..=15)) {
            let mut b = vec![1u8, subs.len() as u8];
            b.extend_from_slice(&authority.to_be_bytes()[2..]);
            for s in &subs {
                b.extend_from_slice(&s.to_le_bytes());
            }
            let text = sid_from_bytes(&b).expect("a sid");
            prop_assert_eq!(canonical_sid(&text), Some(text));
        }
    }
}
