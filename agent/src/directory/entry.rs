//! From the directory's BER to `census.v1.DirectoryUser`, with no I/O and no panics: a search
//! result entry's DN and attributes read straight from the BER tree (ldap3's own
//! `SearchEntry::construct` panics on a malformed entry and guesses which values are binary),
//! the paged-results cookie of a search's response, and the mapping of one entry to a user with
//! every value capped.

use std::collections::BTreeSet;

use census_proto::v1;
use ldap3::asn1::{PL, StructureTag, TagClass, parse_tag};

use super::convert::{
    boolean, cap_text, filetime, generalized_time, guid_bytes, int32_bits, sid_to_string,
};

/// The most memberOf DNs a user is sent with: direct groups here, then every group, nested
/// included, once the read has resolved nesting (`groups.rs`). Far more than any real account is
/// in (AD's own token limit bites long before, at about 1015 security groups); a user past it is
/// sent with the first `MAX_MEMBER_OF` in sorted order and a warning is logged.
pub const MAX_MEMBER_OF: usize = 1024;

/// What a search for users asks for (lowercase is how [`RawEntry`] names them).
pub const USER_ATTRIBUTES: [&str; 15] = [
    "objectGUID",
    "objectSid",
    "sAMAccountName",
    "userPrincipalName",
    "displayName",
    "distinguishedName",
    "sAMAccountType",
    "userAccountControl",
    "accountExpires",
    "lastLogonTimestamp",
    "isCriticalSystemObject",
    "servicePrincipalName",
    "memberOf",
    "objectClass",
    "whenCreated",
];

/// One search result entry: its DN and every attribute's values as bytes, attribute names
/// lowercased and stripped of options (AD sends a long memberOf as `memberOf;range=0-1499`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawEntry {
    pub dn: Vec<u8>,
    pub attrs: Vec<(String, Vec<Vec<u8>>)>,
}

impl RawEntry {
    /// Every value of `name` (any case).
    pub fn values(&self, name: &str) -> impl Iterator<Item = &[u8]> {
        let name = name.to_ascii_lowercase();
        self.attrs
            .iter()
            .filter(move |(n, _)| *n == name)
            .flat_map(|(_, vs)| vs.iter().map(Vec::as_slice))
    }

    /// The first value of `name`.
    pub fn first(&self, name: &str) -> Option<&[u8]> {
        self.values(name).next()
    }

    /// The first value of `name` as text (lossy).
    fn text(&self, name: &str) -> Option<String> {
        self.first(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

fn primitive(tag: &StructureTag) -> Option<&[u8]> {
    match &tag.payload {
        PL::P(bytes) => Some(bytes),
        PL::C(_) => None,
    }
}

fn constructed(tag: &StructureTag) -> Option<&[StructureTag]> {
    match &tag.payload {
        PL::C(inner) => Some(inner),
        PL::P(_) => None,
    }
}

/// Reads a SearchResultEntry (`[APPLICATION 4] SEQUENCE { objectName, attributes }`, RFC 4511
/// 4.5.2); `None` for anything else or anything malformed.
pub fn parse_entry(tag: &StructureTag) -> Option<RawEntry> {
    if tag.class != TagClass::Application || tag.id != 4 {
        return None;
    }
    let [name, attributes] = constructed(tag)? else {
        return None;
    };
    let mut entry = RawEntry {
        dn: primitive(name)?.to_vec(),
        attrs: Vec::new(),
    };
    for attribute in constructed(attributes)? {
        let [kind, values] = constructed(attribute)? else {
            return None;
        };
        let kind = String::from_utf8_lossy(primitive(kind)?);
        let base = kind
            .split(';')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let values: Option<Vec<Vec<u8>>> = constructed(values)?
            .iter()
            .map(|v| primitive(v).map(<[u8]>::to_vec))
            .collect();
        entry.attrs.push((base, values?));
    }
    Some(entry)
}

/// The cookie of a paged-results response control's value (`SEQUENCE { size INTEGER, cookie
/// OCTET STRING }`, RFC 2696); empty when the search is complete. `None` when malformed.
pub fn paged_cookie(value: &[u8]) -> Option<Vec<u8>> {
    let (_, tag) = parse_tag(value).ok()?;
    let [_size, cookie] = constructed(&tag)? else {
        return None;
    };
    primitive(cookie).map(<[u8]>::to_vec)
}

/// Why an entry was not made a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skipped {
    /// No objectGUID of 16 bytes: nothing to key the user on.
    NoGuid,
}

/// One entry as the user the collector's policy judges. Every string is capped at
/// [`MAX_TEXT_BYTES`](super::convert::MAX_TEXT_BYTES), memberOf at [`MAX_MEMBER_OF`] DNs (sorted, so what is kept does not
/// depend on the directory's order); values that do not parse are left unset rather than
/// guessed (a userAccountControl that is no number reads 0, as if absent).
pub fn to_user(entry: &RawEntry) -> Result<v1::DirectoryUser, Skipped> {
    let guid = entry
        .first("objectGUID")
        .and_then(guid_bytes)
        .ok_or(Skipped::NoGuid)?;
    let text = |name: &str| entry.first(name).map(cap_text).unwrap_or_default();
    let int = |name: &str| {
        entry
            .text(name)
            .and_then(|t| int32_bits(&t))
            .unwrap_or_default()
    };
    let time = |name: &str| entry.text(name).and_then(|t| filetime(&t));
    let dn = if entry.dn.is_empty() {
        text("distinguishedName")
    } else {
        cap_text(&entry.dn)
    };
    let member_of: BTreeSet<String> = entry
        .values("memberOf")
        .filter(|v| !v.is_empty())
        .map(cap_text)
        .collect();
    Ok(v1::DirectoryUser {
        object_guid: guid.to_vec(),
        object_sid: entry
            .first("objectSid")
            .and_then(sid_to_string)
            .unwrap_or_default(),
        sam_account_name: text("sAMAccountName"),
        user_principal_name: text("userPrincipalName"),
        display_name: text("displayName"),
        distinguished_name: dn,
        sam_account_type: int("sAMAccountType"),
        user_account_control: int("userAccountControl"),
        account_expires: time("accountExpires"),
        last_logon: time("lastLogonTimestamp"),
        critical_system_object: entry
            .text("isCriticalSystemObject")
            .is_some_and(|t| boolean(&t)),
        has_service_principal_name: entry.values("servicePrincipalName").any(|v| !v.is_empty()),
        member_of: member_of.into_iter().take(MAX_MEMBER_OF).collect(),
        is_computer: entry
            .values("objectClass")
            .any(|v| v.eq_ignore_ascii_case(b"computer")),
        when_created: entry.text("whenCreated").and_then(|t| generalized_time(&t)),
    })
}

#[cfg(test)]
mod tests {
    use ldap3::asn1::{ASNTag, OctetString, Sequence, Set, Tag};

    use super::super::convert::MAX_TEXT_BYTES;
    use super::*;

    fn octets(bytes: &[u8]) -> Tag {
        Tag::OctetString(OctetString {
            inner: bytes.to_vec(),
            ..Default::default()
        })
    }

    /// A SearchResultEntry as a server sends it.
    fn entry_tag(dn: &str, attrs: &[(&str, Vec<Vec<u8>>)]) -> StructureTag {
        let attributes = attrs
            .iter()
            .map(|(name, values)| {
                Tag::Sequence(Sequence {
                    inner: vec![
                        octets(name.as_bytes()),
                        Tag::Set(Set {
                            inner: values.iter().map(|v| octets(v)).collect(),
                            ..Default::default()
                        }),
                    ],
                    ..Default::default()
                })
            })
            .collect();
        Tag::Sequence(Sequence {
            id: 4,
            class: TagClass::Application,
            inner: vec![
                octets(dn.as_bytes()),
                Tag::Sequence(Sequence {
                    inner: attributes,
                    ..Default::default()
                }),
            ],
        })
        .into_structure()
    }

    fn s(v: &str) -> Vec<u8> {
        v.as_bytes().to_vec()
    }

    const GUID: [u8; 16] = [
        0x32, 0x36, 0x0e, 0x64, 0xc8, 0xc4, 0xea, 0x42, 0x83, 0x18, 0x73, 0x99, 0x21, 0xdf, 0x23,
        0x45,
    ];
    const SID: [u8; 28] = [
        1, 5, 0, 0, 0, 0, 0, 5, 21, 0, 0, 0, 0xf5, 0xaa, 0xc1, 0x3d, 0x7d, 0x67, 0x3e, 0x60, 0x72,
        0x9d, 0x3f, 0xf9, 0xf4, 0x01, 0, 0,
    ];

    fn alice() -> Vec<(&'static str, Vec<Vec<u8>>)> {
        vec![
            (
                "objectClass",
                vec![s("top"), s("person"), s("organizationalPerson"), s("user")],
            ),
            ("objectGUID", vec![GUID.to_vec()]),
            ("objectSid", vec![SID.to_vec()]),
            ("sAMAccountName", vec![s("alice")]),
            ("userPrincipalName", vec![s("alice@lab.census.test")]),
            ("displayName", vec![s("Alice Ace")]),
            ("sAMAccountType", vec![s("805306368")]),
            ("userAccountControl", vec![s("512")]),
            ("accountExpires", vec![s("9223372036854775807")]),
            ("lastLogonTimestamp", vec![s("132223104000000000")]),
            ("whenCreated", vec![s("20191231080000.0Z")]),
            (
                "memberOf",
                vec![s("CN=Staff,DC=lab"), s("CN=Billing Exclusions,DC=lab")],
            ),
        ]
    }

    #[test]
    fn a_user_entry_maps_field_by_field() {
        let tag = entry_tag("CN=Alice Ace,CN=Users,DC=lab", &alice());
        let entry = parse_entry(&tag).expect("an entry");
        let user = to_user(&entry).expect("a user");
        assert_eq!(user.object_guid, GUID.to_vec());
        assert_eq!(
            user.object_sid,
            "S-1-5-21-1036102389-1614702461-4181695858-500"
        );
        assert_eq!(user.sam_account_name, "alice");
        assert_eq!(user.user_principal_name, "alice@lab.census.test");
        assert_eq!(user.display_name, "Alice Ace");
        assert_eq!(user.distinguished_name, "CN=Alice Ace,CN=Users,DC=lab");
        assert_eq!(user.sam_account_type, 805_306_368);
        assert_eq!(user.user_account_control, 512);
        assert_eq!(user.account_expires, None, "never expires");
        assert_eq!(user.last_logon.map(|t| t.seconds), Some(1_577_836_800));
        assert_eq!(
            user.when_created.map(|t| t.seconds),
            Some(1_577_779_200),
            "2019-12-31T08:00:00Z"
        );
        assert!(!user.critical_system_object);
        assert!(!user.has_service_principal_name);
        assert!(!user.is_computer);
        assert_eq!(
            user.member_of,
            ["CN=Billing Exclusions,DC=lab", "CN=Staff,DC=lab"],
            "sorted"
        );
    }

    #[test]
    fn flags_spn_computer_and_critical() {
        let mut attrs = alice();
        attrs.push(("servicePrincipalName", vec![s("http/backup.lab")]));
        attrs.push(("isCriticalSystemObject", vec![s("TRUE")]));
        attrs[0].1.push(s("computer"));
        let user = to_user(&parse_entry(&entry_tag("CN=x", &attrs)).expect("entry")).expect("user");
        assert!(user.has_service_principal_name);
        assert!(user.critical_system_object);
        assert!(user.is_computer);
    }

    #[test]
    fn attribute_names_match_in_any_case_and_with_range_options() {
        let attrs = vec![
            ("OBJECTGUID", vec![GUID.to_vec()]),
            ("useraccountcontrol", vec![s("514")]),
            ("memberOf;range=0-1499", vec![s("CN=A"), s("CN=B")]),
        ];
        let user = to_user(&parse_entry(&entry_tag("CN=x", &attrs)).expect("entry")).expect("user");
        assert_eq!(user.user_account_control, 514);
        assert_eq!(user.member_of, ["CN=A", "CN=B"]);
    }

    #[test]
    fn hostile_and_odd_values_are_capped_or_left_unset() {
        let huge = vec![b'x'; 100_000];
        let groups: Vec<Vec<u8>> = (0..MAX_MEMBER_OF + 100)
            .map(|i| s(&format!("CN=G{i:04},DC=lab")))
            .collect();
        let attrs = vec![
            ("objectGUID", vec![GUID.to_vec()]),
            ("objectSid", vec![vec![1, 5, 0]]),
            ("sAMAccountName", vec![huge.clone()]),
            (
                "displayName",
                vec![s("Zoë\u{1b}[31m 日本"), s("second value ignored")],
            ),
            ("userPrincipalName", vec![vec![0xff, 0xfe, b'a']]),
            ("sAMAccountType", vec![s("not a number")]),
            ("userAccountControl", vec![s("-2147483646")]),
            ("accountExpires", vec![s("1")]),
            ("lastLogonTimestamp", vec![s("0")]),
            ("whenCreated", vec![s("yesterday")]),
            ("isCriticalSystemObject", vec![s("yes")]),
            ("servicePrincipalName", vec![vec![]]),
            ("memberOf", groups),
        ];
        let user = to_user(&parse_entry(&entry_tag(&"d".repeat(600), &attrs)).expect("entry"))
            .expect("user");
        assert_eq!(user.object_sid, "", "a truncated SID is dropped");
        assert_eq!(user.sam_account_name.len(), MAX_TEXT_BYTES);
        assert_eq!(user.display_name, "Zoë\u{FFFD}[31m 日本");
        assert_eq!(user.user_principal_name, "\u{FFFD}\u{FFFD}a");
        assert_eq!(user.sam_account_type, 0);
        assert_eq!(user.user_account_control, 0x8000_0002);
        assert_eq!(
            user.account_expires.map(|t| t.seconds),
            Some(0),
            "expired in 1601 is expired"
        );
        assert_eq!(user.last_logon, None, "never logged on");
        assert_eq!(user.when_created, None, "no GeneralizedTime: unknown");
        assert!(!user.critical_system_object);
        assert!(!user.has_service_principal_name, "an empty value is no SPN");
        assert_eq!(user.member_of.len(), MAX_MEMBER_OF);
        assert_eq!(user.member_of[0], "CN=G0000,DC=lab");
        assert_eq!(user.distinguished_name.len(), MAX_TEXT_BYTES);
    }

    #[test]
    fn an_entry_without_a_guid_is_skipped() {
        let mut attrs = alice();
        attrs.retain(|(n, _)| *n != "objectGUID");
        let entry = parse_entry(&entry_tag("CN=x", &attrs)).expect("entry");
        assert_eq!(to_user(&entry), Err(Skipped::NoGuid));
        attrs.push(("objectGUID", vec![vec![1; 15]]));
        let entry = parse_entry(&entry_tag("CN=x", &attrs)).expect("entry");
        assert_eq!(to_user(&entry), Err(Skipped::NoGuid));
    }

    #[test]
    fn the_dn_attribute_stands_in_for_an_empty_entry_name() {
        let mut attrs = alice();
        attrs.push(("distinguishedName", vec![s("CN=From,DC=Attr")]));
        let user = to_user(&parse_entry(&entry_tag("", &attrs)).expect("entry")).expect("user");
        assert_eq!(user.distinguished_name, "CN=From,DC=Attr");
    }

    #[test]
    fn malformed_ber_is_refused_not_a_panic() {
        // Not an entry: a SearchResultDone ([APPLICATION 5]).
        let done = Tag::Sequence(Sequence {
            id: 5,
            class: TagClass::Application,
            inner: vec![],
        })
        .into_structure();
        assert_eq!(parse_entry(&done), None);
        // An entry whose attribute list is a primitive.
        let bad = StructureTag {
            class: TagClass::Application,
            id: 4,
            payload: PL::C(vec![
                StructureTag {
                    class: TagClass::Universal,
                    id: 4,
                    payload: PL::P(s("CN=x")),
                },
                StructureTag {
                    class: TagClass::Universal,
                    id: 16,
                    payload: PL::P(s("oops")),
                },
            ]),
        };
        assert_eq!(parse_entry(&bad), None);
        // An entry with a value that is constructed.
        let nested = StructureTag {
            class: TagClass::Application,
            id: 4,
            payload: PL::C(vec![
                StructureTag {
                    class: TagClass::Universal,
                    id: 4,
                    payload: PL::P(s("CN=x")),
                },
                StructureTag {
                    class: TagClass::Universal,
                    id: 16,
                    payload: PL::C(vec![StructureTag {
                        class: TagClass::Universal,
                        id: 16,
                        payload: PL::C(vec![
                            StructureTag {
                                class: TagClass::Universal,
                                id: 4,
                                payload: PL::P(s("cn")),
                            },
                            StructureTag {
                                class: TagClass::Universal,
                                id: 17,
                                payload: PL::C(vec![StructureTag {
                                    class: TagClass::Universal,
                                    id: 16,
                                    payload: PL::C(vec![]),
                                }]),
                            },
                        ]),
                    }]),
                },
            ]),
        };
        assert_eq!(parse_entry(&nested), None);
    }

    #[test]
    fn paged_cookies() {
        // SEQUENCE { INTEGER 0, OCTET STRING "next" } and { INTEGER 1200, "" }, in BER.
        let more = [
            0x30, 0x09, 0x02, 0x01, 0x00, 0x04, 0x04, b'n', b'e', b'x', b't',
        ];
        let done = [0x30, 0x06, 0x02, 0x02, 0x04, 0xb0, 0x04, 0x00];
        assert_eq!(paged_cookie(&more), Some(s("next")));
        assert_eq!(paged_cookie(&done), Some(vec![]));
        assert_eq!(paged_cookie(&[]), None);
        assert_eq!(paged_cookie(&[0x30, 0x03, 0x02, 0x01]), None, "truncated");
        assert_eq!(paged_cookie(&[0x04, 0x01, 0x00]), None, "not a sequence");
    }
}
