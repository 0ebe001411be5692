//! SNMPv3 user-based security (USM, RFC 3414) for the probe: reading and validating a
//! configured [`SnmpV3User`], building snmp2's `Security` for it once the device's engine is
//! known, and the engine-discovery request. All of it I/O-free.
//!
//! Why the probe discovers engines itself rather than with `AsyncSession::init()`: snmp2 keeps
//! the discovered engine ID inside the session and offers no way to read it, and the engine ID
//! is what the collector needs (a strong identifier). A discovery request needs no credential,
//! so the probe also learns the engine ID of v1/v2c devices that speak v3, and one discovery
//! serves every v3 user tried on a device (keys are localized per engine, RFC 3414 §2.6).

use snmp2::{
    Pdu,
    v3::{Auth, AuthProtocol, Cipher, KeyExtension, Security},
};

use super::{
    ber::{OCTET_STRING, SEQUENCE, integer, tlv},
    tables,
};
use crate::config::SnmpV3User;

/// USM requires pass phrases of at least 8 characters (RFC 3414 §11.2); net-snmp refuses
/// shorter ones too. snmp2 also panics on an empty one when localizing a key, so this check
/// guards the probe as well as the config.
pub(crate) const MIN_PASSWORD_LEN: usize = 8;
/// SnmpAdminString user names are 1 to 32 octets (RFC 3414 usmUserName).
const MAX_USER_NAME_LEN: usize = 32;

/// What a configured user asks for, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UserLevel {
    pub auth: Option<AuthProtocol>,
    pub privacy: Option<Cipher>,
}

/// `md5`, `sha` (SHA-1), `sha224`, `sha256`, `sha384`, `sha512`; case-insensitive, `sha1` too.
pub(crate) fn auth_protocol(name: &str) -> Option<AuthProtocol> {
    Some(match name.to_ascii_lowercase().as_str() {
        "md5" => AuthProtocol::Md5,
        "sha" | "sha1" => AuthProtocol::Sha1,
        "sha224" => AuthProtocol::Sha224,
        "sha256" => AuthProtocol::Sha256,
        "sha384" => AuthProtocol::Sha384,
        "sha512" => AuthProtocol::Sha512,
        _ => return None,
    })
}

/// `des`, `aes` (AES-128), `aes192`, `aes256`; case-insensitive, `aes128` too.
pub(crate) fn cipher(name: &str) -> Option<Cipher> {
    Some(match name.to_ascii_lowercase().as_str() {
        "des" => Cipher::Des,
        "aes" | "aes128" => Cipher::Aes128,
        "aes192" => Cipher::Aes192,
        "aes256" => Cipher::Aes256,
        _ => return None,
    })
}

/// Checks a configured v3 user: a name, known protocol names, privacy only with
/// authentication, and a pass phrase of [`MIN_PASSWORD_LEN`] or more for each protocol set (and
/// none without one). With neither protocol the user is noAuthNoPriv.
pub(crate) fn parse_user(user: &SnmpV3User) -> Result<UserLevel, String> {
    let name = &user.name;
    if name.is_empty() || name.len() > MAX_USER_NAME_LEN {
        return Err(format!(
            "SNMPv3 user name must be 1 to {MAX_USER_NAME_LEN} bytes"
        ));
    }
    let auth = match &user.auth_protocol {
        None => None,
        Some(p) => Some(auth_protocol(p).ok_or_else(|| {
            format!(
                "SNMPv3 user {name}: unknown auth_protocol {p:?} \
                 (md5, sha, sha224, sha256, sha384 or sha512)"
            )
        })?),
    };
    let privacy = match &user.priv_protocol {
        None => None,
        Some(p) => Some(cipher(p).ok_or_else(|| {
            format!("SNMPv3 user {name}: unknown priv_protocol {p:?} (des, aes, aes192 or aes256)")
        })?),
    };
    if privacy.is_some() && auth.is_none() {
        return Err(format!(
            "SNMPv3 user {name}: priv_protocol needs an auth_protocol (USM has no privacy \
             without authentication)"
        ));
    }
    check_password(name, "auth", auth.is_some(), user.auth_password.as_deref())?;
    check_password(
        name,
        "priv",
        privacy.is_some(),
        user.priv_password.as_deref(),
    )?;
    Ok(UserLevel { auth, privacy })
}

fn check_password(
    name: &str,
    what: &str,
    protocol_set: bool,
    password: Option<&str>,
) -> Result<(), String> {
    match (protocol_set, password) {
        (true, None) => Err(format!(
            "SNMPv3 user {name}: {what}_protocol is set but {what}_password is missing"
        )),
        (true, Some(p)) if p.len() < MIN_PASSWORD_LEN => Err(format!(
            "SNMPv3 user {name}: {what}_password needs at least {MIN_PASSWORD_LEN} characters"
        )),
        (false, Some(_)) => Err(format!(
            "SNMPv3 user {name}: {what}_password is set but {what}_protocol is not"
        )),
        _ => Ok(()),
    }
}

/// What an engine-discovery report told: the authoritative engine and its clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Engine {
    pub id: Vec<u8>,
    pub boots: i64,
    pub time: i64,
}

/// The key-extension methods to try for a user: AES-192/256 keys longer than the auth hash
/// (MD5, SHA-1, SHA-224) need one, and vendors disagree on which (net-snmp's `AES192`/`AES256`
/// use Blumenthal's, Cisco's Reeder's), so both are tried, Blumenthal first. Other users: none.
pub(crate) fn key_extensions(level: &UserLevel) -> Vec<Option<KeyExtension>> {
    match (level.auth, level.privacy) {
        (Some(auth), Some(cipher)) if cipher.priv_key_needs_extension(&auth) => {
            vec![Some(KeyExtension::Blumenthal), Some(KeyExtension::Reeder)]
        }
        _ => vec![None],
    }
}

/// snmp2's `Security` for `user` at `engine`, keys localized (CPU-heavy: about 1 MiB hashed
/// per key; run it off the async threads). The user must have passed [`parse_user`].
pub(crate) fn security(
    user: &SnmpV3User,
    level: &UserLevel,
    extension: Option<KeyExtension>,
    engine: &Engine,
) -> Result<Security, String> {
    let auth_password = user.auth_password.as_deref().unwrap_or_default();
    let mut security = Security::new(user.name.as_bytes(), auth_password.as_bytes());
    security = match (level.auth, level.privacy) {
        (None, _) => security.with_auth(Auth::NoAuthNoPriv),
        (Some(protocol), None) => security
            .with_auth_protocol(protocol)
            .with_auth(Auth::AuthNoPriv),
        (Some(protocol), Some(cipher)) => {
            security
                .with_auth_protocol(protocol)
                .with_auth(Auth::AuthPriv {
                    cipher,
                    privacy_password: user
                        .priv_password
                        .as_deref()
                        .unwrap_or_default()
                        .as_bytes()
                        .to_vec(),
                })
        }
    };
    if let Some(method) = extension {
        security = security.with_key_extension_method(method);
    }
    Ok(security
        .with_engine_id(&engine.id)
        .map_err(|e| format!("localizing keys: {e}"))?
        .with_engine_boots_and_time(engine.boots, engine.time))
}

/// Reads an agent's answer to [`discovery_request`]: the engine it names, or `None` for
/// anything else (garbage, a v1/v2c message, a report without an engine ID). snmp2 does the
/// parsing, so what the probe learns here is exactly what an snmp2 session would have.
pub(crate) fn read_discovery_report(bytes: &[u8]) -> Option<Engine> {
    let mut security = Security::new(b"", b"").with_auth(Auth::NoAuthNoPriv);
    // A report teaching an unknown engine parses as `Err(AuthUpdated)`; the outcome does not
    // matter, only what the security context learnt.
    let _ = Pdu::from_bytes_with_security(bytes, Some(&mut security));
    let id = tables::engine_id(security.engine_id())?;
    Some(Engine {
        id,
        boots: security.engine_boots(),
        time: security.engine_time(),
    })
}

// === Engine discovery request ===

/// The RFC 3414 §4 discovery message: an SNMPv3 GetRequest with no varbinds, no user, no
/// engine ID, flags reportable, noAuthNoPriv. The agent answers with a Report carrying its
/// snmpEngineID (and usually engineBoots/engineTime).
pub(crate) fn discovery_request(msg_id: i32) -> Vec<u8> {
    const GET_REQUEST: u8 = 0xa0;
    /// msgMaxSize: the largest UDP payload over IPv4, as snmp2 receives.
    const MAX_SIZE: i64 = 65_507;
    /// msgFlags: reportable, no auth, no privacy.
    const FLAGS_REPORTABLE: u8 = 0x04;
    /// msgSecurityModel: USM.
    const USM: i64 = 3;

    let id = i64::from(msg_id);
    let header = [
        integer(id),
        integer(MAX_SIZE),
        tlv(OCTET_STRING, &[FLAGS_REPORTABLE]),
        integer(USM),
    ]
    .concat();
    let usm = tlv(
        SEQUENCE,
        &[
            tlv(OCTET_STRING, &[]), // msgAuthoritativeEngineID
            integer(0),             // msgAuthoritativeEngineBoots
            integer(0),             // msgAuthoritativeEngineTime
            tlv(OCTET_STRING, &[]), // msgUserName
            tlv(OCTET_STRING, &[]), // msgAuthenticationParameters
            tlv(OCTET_STRING, &[]), // msgPrivacyParameters
        ]
        .concat(),
    );
    let pdu = tlv(
        GET_REQUEST,
        &[integer(id), integer(0), integer(0), tlv(SEQUENCE, &[])].concat(),
    );
    let scoped = tlv(
        SEQUENCE,
        &[tlv(OCTET_STRING, &[]), tlv(OCTET_STRING, &[]), pdu].concat(),
    );
    tlv(
        SEQUENCE,
        &[
            integer(3), // msgVersion: SNMPv3
            tlv(SEQUENCE, &header),
            tlv(OCTET_STRING, &usm),
            scoped,
        ]
        .concat(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use snmp2::AsnReader;

    /// An agent's discovery report: usmStatsUnknownEngineIDs.0 = 1 from `engine_id`.
    fn report(engine_id: &[u8], boots: i64, time: i64) -> Vec<u8> {
        let header = [integer(7), integer(65_507), tlv(0x04, &[0]), integer(3)].concat();
        let usm = tlv(
            0x30,
            &[
                tlv(0x04, engine_id),
                integer(boots),
                integer(time),
                tlv(0x04, &[]),
                tlv(0x04, &[]),
                tlv(0x04, &[]),
            ]
            .concat(),
        );
        // 1.3.6.1.6.3.15.1.1.4.0
        let oid = tlv(0x06, &[0x2b, 6, 1, 6, 3, 15, 1, 1, 4, 0]);
        let varbind = tlv(0x30, &[oid, tlv(0x41, &[1])].concat());
        let pdu = tlv(
            0xa8,
            &[integer(7), integer(0), integer(0), tlv(0x30, &varbind)].concat(),
        );
        let scoped = tlv(0x30, &[tlv(0x04, engine_id), tlv(0x04, &[]), pdu].concat());
        tlv(
            0x30,
            &[integer(3), tlv(0x30, &header), tlv(0x04, &usm), scoped].concat(),
        )
    }

    #[test]
    fn discovery_reports_name_the_engine() {
        let id = [0x80, 0, 0x1f, 0x88, 0x80, 1, 2, 3, 4];
        assert_eq!(
            read_discovery_report(&report(&id, 2, 345)),
            Some(Engine {
                id: id.to_vec(),
                boots: 2,
                time: 345
            })
        );
        // Agents may leave the clock out of the first report.
        assert_eq!(
            read_discovery_report(&report(&id, 0, 0)).map(|e| e.boots),
            Some(0)
        );
        assert_eq!(read_discovery_report(&report(&[], 1, 1)), None);
        let good = report(&id, 2, 345);
        for cut in 0..good.len() {
            let _ = read_discovery_report(&good[..cut]);
        }
        assert_eq!(read_discovery_report(b"\x30\x03\x02\x01\x01"), None);
        assert_eq!(read_discovery_report(&[]), None);
    }

    fn user(
        auth: Option<&str>,
        auth_pw: Option<&str>,
        privacy: Option<&str>,
        priv_pw: Option<&str>,
    ) -> SnmpV3User {
        SnmpV3User {
            name: "census".into(),
            auth_protocol: auth.map(Into::into),
            auth_password: auth_pw.map(Into::into),
            priv_protocol: privacy.map(Into::into),
            priv_password: priv_pw.map(Into::into),
        }
    }

    #[test]
    fn users_are_validated() {
        let ok = [
            user(None, None, None, None),
            user(Some("sha"), Some("authpass1"), None, None),
            user(
                Some("SHA256"),
                Some("authpass1"),
                Some("AES"),
                Some("privpass1"),
            ),
            user(
                Some("md5"),
                Some("authpass1"),
                Some("des"),
                Some("privpass1"),
            ),
            user(
                Some("sha512"),
                Some("authpass1"),
                Some("aes256"),
                Some("privpass1"),
            ),
        ];
        for u in &ok {
            assert!(parse_user(u).is_ok(), "{u:?}: {:?}", parse_user(u));
        }
        let bad = [
            user(Some("sha3"), Some("authpass1"), None, None),
            user(
                Some("sha"),
                Some("authpass1"),
                Some("3des"),
                Some("privpass1"),
            ),
            user(Some("sha"), None, None, None),
            user(Some("sha"), Some("short"), None, None),
            user(Some("sha"), Some(""), None, None),
            user(Some("sha"), Some("authpass1"), Some("aes"), None),
            user(Some("sha"), Some("authpass1"), Some("aes"), Some("1234567")),
            user(None, None, Some("aes"), Some("privpass1")),
            user(None, Some("authpass1"), None, None),
            user(Some("sha"), Some("authpass1"), None, Some("privpass1")),
        ];
        for u in &bad {
            assert!(parse_user(u).is_err(), "{u:?} was accepted");
        }
        let mut long = user(None, None, None, None);
        long.name = "x".repeat(33);
        assert!(parse_user(&long).is_err());
        long.name.clear();
        assert!(parse_user(&long).is_err());
        // The message never carries a secret.
        let err = parse_user(&user(Some("sha"), Some("secret"), None, None)).expect_err("short");
        assert!(!err.contains("secret"));
    }

    #[test]
    fn key_extension_only_where_needed() {
        let level = |a: &str, c: &str| UserLevel {
            auth: auth_protocol(a),
            privacy: cipher(c),
        };
        assert_eq!(key_extensions(&level("sha", "aes")), vec![None]);
        assert_eq!(key_extensions(&level("sha256", "aes256")), vec![None]);
        assert_eq!(key_extensions(&level("sha", "aes256")).len(), 2);
        assert_eq!(key_extensions(&level("md5", "aes192")).len(), 2);
    }

    #[test]
    fn securities_localize_for_every_pairing() {
        let engine = Engine {
            id: vec![0x80, 0, 0x1f, 0x88, 4, 1, 2, 3],
            boots: 3,
            time: 1000,
        };
        for (a, c) in [
            (None, None),
            (Some("md5"), None),
            (Some("md5"), Some("des")),
            (Some("sha"), Some("aes")),
            (Some("sha"), Some("aes256")),
            (Some("sha224"), Some("aes192")),
            (Some("sha512"), Some("aes256")),
        ] {
            let u = user(a, a.map(|_| "authpass1"), c, c.map(|_| "privpass1"));
            let level = parse_user(&u).expect("valid");
            for ext in key_extensions(&level) {
                let s = security(&u, &level, ext, &engine).expect("keys localize");
                assert_eq!(s.engine_id(), engine.id.as_slice());
                assert_eq!(s.engine_boots(), 3);
            }
        }
    }

    #[test]
    fn discovery_request_parses_as_snmpv3() {
        let msg = discovery_request(0x1234_5678);
        let mut outer = AsnReader::from_bytes(&msg);
        let mut message = AsnReader::from_bytes(outer.read_raw(0x30).expect("message"));
        assert_eq!(message.read_asn_integer().expect("version"), 3);
        let mut header = AsnReader::from_bytes(message.read_raw(0x30).expect("header"));
        assert_eq!(header.read_asn_integer().expect("msg id"), 0x1234_5678);
        assert_eq!(header.read_asn_integer().expect("max size"), 65_507);
        assert_eq!(header.read_asn_octetstring().expect("flags"), [4]);
        assert_eq!(header.read_asn_integer().expect("model"), 3);
        let usm = message.read_asn_octetstring().expect("usm");
        let mut usm =
            AsnReader::from_bytes(AsnReader::from_bytes(usm).read_raw(0x30).expect("seq"));
        assert_eq!(usm.read_asn_octetstring().expect("engine id"), b"");
        assert_eq!(usm.read_asn_integer().expect("boots"), 0);
        assert_eq!(usm.read_asn_integer().expect("time"), 0);
        for _ in 0..3 {
            assert_eq!(usm.read_asn_octetstring().expect("empty"), b"");
        }
        let mut scoped = AsnReader::from_bytes(message.read_raw(0x30).expect("scoped pdu"));
        assert_eq!(scoped.read_asn_octetstring().expect("context engine"), b"");
        assert_eq!(scoped.read_asn_octetstring().expect("context name"), b"");
        let mut pdu = AsnReader::from_bytes(scoped.read_raw(0xa0).expect("get"));
        assert_eq!(pdu.read_asn_integer().expect("req id"), 0x1234_5678);

        // Our own request is no report: nothing is learnt from it.
        assert_eq!(read_discovery_report(&msg), None);
    }
}
