//! Credentials: agents' enrollment tokens and the operator token.
//!
//! An enrollment token is `cen1_<id>_<secret>`: the id (16 hex digits) names the token in lists
//! and revocations; the secret (64 hex digits) is shown once and only its SHA-256 is stored. A
//! token is bound to one client and site when it is made, and that binding is the only source
//! of an agent's scope.
//!
//! The operator token (`cop1_<64 hex digits>`) guards the query and admin services. The
//! collector makes one on first start and writes it, readable by its owner only, to
//! `<data dir>/operator.token`; `census` reads it from a flag, a file or the environment.

use std::{
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use rand::RngCore as _;
use sha2::{Digest as _, Sha256};

use crate::model::{Scope, TokenRecord};

const TOKEN_PREFIX: &str = "cen1";
const OPERATOR_PREFIX: &str = "cop1";
pub const OPERATOR_TOKEN_FILE: &str = "operator.token";

/// Why a presented credential was refused. Messages are shown to the caller, so they say what
/// to do, and never echo a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing credential: send `authorization: Bearer <token>`")]
    Missing,
    #[error("malformed credential: expected `Bearer <token>`")]
    Malformed,
    #[error(
        "unknown or wrong enrollment token: create one with `census token create --client C --site S`"
    )]
    UnknownToken,
    #[error("enrollment token {0} has been revoked")]
    Revoked(String),
    #[error("wrong operator token: use the one in <data dir>/operator.token")]
    WrongOperatorToken,
}

/// A freshly made enrollment token: the secret text for the agent and the record to store.
#[derive(Debug)]
pub struct NewToken {
    pub text: String,
    pub record: TokenRecord,
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

fn sha256(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// Equality that takes the same time wherever the first difference is.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Makes a new enrollment token bound to `scope`.
pub fn new_token(scope: &Scope, now_ms: u64) -> NewToken {
    let id = random_hex(8);
    let secret = random_hex(32);
    NewToken {
        text: format!("{TOKEN_PREFIX}_{id}_{secret}"),
        record: TokenRecord {
            secret_sha256: sha256(&secret),
            id,
            client: scope.client.clone(),
            site: scope.site.clone(),
            created_ms: now_ms,
            revoked: false,
        },
    }
}

/// Splits a token's text into (id, secret) without looking anything up.
pub fn parse_token(text: &str) -> Result<(&str, &str), AuthError> {
    let mut parts = text.split('_');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(TOKEN_PREFIX), Some(id), Some(secret), None)
            if id.len() == 16 && secret.len() == 64 && is_hex(id) && is_hex(secret) =>
        {
            Ok((id, secret))
        }
        _ => Err(AuthError::UnknownToken),
    }
}

fn is_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Checks a token's secret against its stored record.
pub fn verify_token(record: &TokenRecord, secret: &str) -> Result<Scope, AuthError> {
    if !constant_time_eq(&record.secret_sha256, &sha256(secret)) {
        return Err(AuthError::UnknownToken);
    }
    if record.revoked {
        return Err(AuthError::Revoked(record.id.clone()));
    }
    Ok(Scope {
        client: record.client.clone(),
        site: record.site.clone(),
    })
}

/// The bearer credential in a request's metadata.
pub fn bearer(meta: &tonic::metadata::MetadataMap) -> Result<&str, AuthError> {
    let value = meta
        .get(census_proto::AUTHORIZATION)
        .ok_or(AuthError::Missing)?
        .to_str()
        .map_err(|_| AuthError::Malformed)?;
    value
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(AuthError::Malformed)
}

/// The operator credential, held as its hash.
#[derive(Clone)]
pub struct OperatorToken {
    sha256: [u8; 32],
}

impl std::fmt::Debug for OperatorToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OperatorToken(..)")
    }
}

impl OperatorToken {
    pub fn from_text(text: &str) -> Self {
        OperatorToken {
            sha256: sha256(text.trim()),
        }
    }

    pub fn check(&self, presented: &str) -> Result<(), AuthError> {
        if constant_time_eq(&self.sha256, &sha256(presented.trim())) {
            Ok(())
        } else {
            Err(AuthError::WrongOperatorToken)
        }
    }

    /// Reads `<data dir>/operator.token`, making it first if it does not exist. Returns the
    /// token, the file's path, and whether it was made now.
    pub fn load_or_create(data_dir: &Path) -> io::Result<(Self, PathBuf, bool)> {
        let path = data_dir.join(OPERATOR_TOKEN_FILE);
        match fs::read_to_string(&path) {
            Ok(text) if !text.trim().is_empty() => {
                return Ok((Self::from_text(&text), path, false));
            }
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} is empty: remove it to have a new operator token made",
                        path.display()
                    ),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let text = format!("{OPERATOR_PREFIX}_{}", random_hex(32));
        // Written whole to a temporary file of this process, then linked into place: a crash
        // never leaves half a token, and of two first starts at once exactly one token wins.
        let tmp = data_dir.join(format!("{OPERATOR_TOKEN_FILE}.{}.tmp", std::process::id()));
        {
            let mut opts = fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts.open(&tmp)?;
            writeln!(f, "{text}")?;
            f.sync_all()?;
        }
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Self::load_or_create(data_dir);
            }
            Err(e) => return Err(e),
        }
        Ok((Self::from_text(&text), path, true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope() -> Scope {
        Scope {
            client: "acme".into(),
            site: "hq".into(),
        }
    }

    #[test]
    fn token_round_trip() {
        let t = new_token(&scope(), 5);
        let (id, secret) = parse_token(&t.text).expect("parses");
        assert_eq!(id, t.record.id);
        assert_eq!(verify_token(&t.record, secret), Ok(scope()));
        assert!(!t.text.contains(&hex::encode(t.record.secret_sha256)));
    }

    #[test]
    fn wrong_and_revoked_tokens_fail() {
        let t = new_token(&scope(), 5);
        let other = new_token(&scope(), 5);
        let (_, other_secret) = parse_token(&other.text).expect("parses");
        assert_eq!(
            verify_token(&t.record, other_secret),
            Err(AuthError::UnknownToken)
        );
        let (_, secret) = parse_token(&t.text).expect("parses");
        let mut revoked = t.record.clone();
        revoked.revoked = true;
        assert!(matches!(
            verify_token(&revoked, secret),
            Err(AuthError::Revoked(_))
        ));
        for bad in [
            "",
            "cen1",
            "cen1_abc_def",
            "cop1_00",
            "cen1_zzzzzzzzzzzzzzzz_00",
            &t.text[..t.text.len() - 1],
        ] {
            assert!(parse_token(bad).is_err(), "{bad:?} must not parse");
        }
    }

    #[test]
    fn operator_token_is_made_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, path, created) = OperatorToken::load_or_create(dir.path()).expect("create");
        assert!(created);
        let (b, _, created) = OperatorToken::load_or_create(dir.path()).expect("load");
        assert!(!created);
        let text = fs::read_to_string(&path).expect("read");
        assert!(a.check(&text).is_ok() && b.check(&text).is_ok());
        assert_eq!(a.check("cop1_nope"), Err(AuthError::WrongOperatorToken));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = fs::metadata(&path).expect("stat").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
