//! Credentials: single-use enrollment tokens, and the registry of enrolled agents.
//!
//! An enrollment token is `cen1_<id>_<secret>`: the id (16 hex digits) names the token in lists
//! and revocations; the secret (64 hex digits) is shown once and only its SHA-256 is stored. A
//! token is bound to one client and site when it is made, expires (24 hours by default), and
//! enrolls one agent: the agent trades it, with a CSR, for a certificate ([`crate::pki`]).
//! From then on the agent is known by that certificate alone, over mutual TLS, and the
//! [`Registry`] maps the certificate to the agent's client and site, the only source of its
//! scope. The operator is known by the operator certificate ([`crate::pki::Pki::is_operator`]).

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use rand::RngCore as _;
use sha2::{Digest as _, Sha256};

use crate::model::{AgentRecord, Scope, TokenRecord};

const TOKEN_PREFIX: &str = "cen1";

/// Why a presented credential was refused. Messages are shown to the caller, so they say what
/// to do, and never echo a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "unknown or wrong enrollment token: create one with `census token create --client C --site S`"
    )]
    UnknownToken,
    #[error("enrollment token {0} has been revoked: create a new one with `census token create`")]
    Revoked(String),
    #[error("enrollment token {0} has expired: create a new one with `census token create`")]
    Expired(String),
    #[error(
        "enrollment token {id} was already used (by agent {agent}): tokens enroll one agent; create a new one with `census token create`"
    )]
    Used { id: String, agent: String },
    #[error(
        "no client certificate: agents enroll first (`census-agent enroll`), operators use the collector's operator credentials"
    )]
    NoCertificate,
    #[error(
        "this certificate belongs to no enrolled agent: enroll with `census-agent enroll --token ...`"
    )]
    UnknownCertificate,
    #[error(
        "agent {0} has been revoked: enroll it again with a new token (`census token create`, then `census-agent enroll --force`)"
    )]
    AgentRevoked(String),
    #[error("this call needs the operator's credentials (<collector data dir>/operator)")]
    NotOperator,
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

/// Makes a new enrollment token bound to `scope`, usable for `ttl_ms`.
pub fn new_token(scope: &Scope, now_ms: u64, ttl_ms: u64) -> NewToken {
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
            expires_ms: now_ms.saturating_add(ttl_ms),
            used_by: None,
            used_ms: None,
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

/// Checks a token's secret against its stored record, and that it can still enroll.
pub fn verify_token(record: &TokenRecord, secret: &str, now_ms: u64) -> Result<Scope, AuthError> {
    if !constant_time_eq(&record.secret_sha256, &sha256(secret)) {
        return Err(AuthError::UnknownToken);
    }
    if record.revoked {
        return Err(AuthError::Revoked(record.id.clone()));
    }
    if let Some(agent) = &record.used_by {
        return Err(AuthError::Used {
            id: record.id.clone(),
            agent: agent.clone(),
        });
    }
    if now_ms >= record.expires_ms {
        return Err(AuthError::Expired(record.id.clone()));
    }
    Ok(Scope {
        client: record.client.clone(),
        site: record.site.clone(),
    })
}

/// How often an agent's last-seen time and backlog are written to the store (they are kept
/// in memory between writes, and `census agents` reads memory).
const SEEN_PERSIST_MS: u64 = 60_000;

/// Enrolled agents by certificate, in memory, written through to the store.
#[derive(Debug, Default, Clone)]
pub struct Registry {
    inner: Arc<RwLock<RegistryInner>>,
}

#[derive(Debug, Default)]
struct RegistryInner {
    by_cert: HashMap<[u8; 32], Entry>,
}

#[derive(Debug)]
struct Entry {
    agent: AgentRecord,
    /// When the record was last written to the store.
    persisted_ms: u64,
}

impl Registry {
    pub fn new(agents: Vec<AgentRecord>) -> Self {
        let r = Registry::default();
        for a in agents {
            r.insert(a);
        }
        r
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, RegistryInner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, RegistryInner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, agent: AgentRecord) {
        let mut inner = self.write();
        // A re-enrolled agent id leaves its old certificate behind.
        inner.by_cert.retain(|_, e| e.agent.id != agent.id);
        inner.by_cert.insert(
            agent.cert_sha256,
            Entry {
                persisted_ms: agent.last_seen_ms,
                agent,
            },
        );
    }

    /// The agent a certificate belongs to, if it may still call.
    pub fn identify(&self, cert_sha256: &[u8; 32]) -> Result<AgentRecord, AuthError> {
        match self.read().by_cert.get(cert_sha256).map(|e| &e.agent) {
            None => Err(AuthError::UnknownCertificate),
            Some(a) if a.revoked => Err(AuthError::AgentRevoked(a.id.clone())),
            Some(a) => Ok(a.clone()),
        }
    }

    pub fn get(&self, id: &str) -> Option<AgentRecord> {
        self.read()
            .by_cert
            .values()
            .find(|e| e.agent.id == id)
            .map(|e| e.agent.clone())
    }

    /// Whether an id is taken.
    pub fn contains(&self, id: &str) -> bool {
        self.get(id).is_some()
    }

    pub fn list(&self) -> Vec<AgentRecord> {
        let mut out: Vec<AgentRecord> = self
            .read()
            .by_cert
            .values()
            .map(|e| e.agent.clone())
            .collect();
        out.sort_by(|a, b| (&a.client, &a.site, &a.id).cmp(&(&b.client, &b.site, &b.id)));
        out
    }

    /// Notes a batch from the agent with `cert_sha256`; returns its id when its record is due
    /// to be written to the store (a new version, or a minute since the last write).
    pub fn seen(
        &self,
        cert_sha256: &[u8; 32],
        version: &str,
        backlog: u64,
        now_ms: u64,
    ) -> Option<String> {
        let mut inner = self.write();
        let entry = inner.by_cert.get_mut(cert_sha256)?;
        let agent = &mut entry.agent;
        let new_version = !version.is_empty() && agent.version != version;
        if new_version {
            version.clone_into(&mut agent.version);
        }
        agent.last_seen_ms = agent.last_seen_ms.max(now_ms);
        agent.backlog = backlog;
        if new_version || now_ms.saturating_sub(entry.persisted_ms) >= SEEN_PERSIST_MS {
            entry.persisted_ms = now_ms;
            Some(entry.agent.id.clone())
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 24 * 60 * 60 * 1000;

    fn scope() -> Scope {
        Scope {
            client: "acme".into(),
            site: "hq".into(),
        }
    }

    #[test]
    fn token_round_trip() {
        let t = new_token(&scope(), 5, DAY);
        let (id, secret) = parse_token(&t.text).expect("parses");
        assert_eq!(id, t.record.id);
        assert_eq!(t.record.expires_ms, 5 + DAY);
        assert_eq!(verify_token(&t.record, secret, 6), Ok(scope()));
        assert!(!t.text.contains(&hex::encode(t.record.secret_sha256)));
    }

    #[test]
    fn wrong_revoked_expired_and_used_tokens_fail() {
        let t = new_token(&scope(), 5, DAY);
        let other = new_token(&scope(), 5, DAY);
        let (_, other_secret) = parse_token(&other.text).expect("parses");
        assert_eq!(
            verify_token(&t.record, other_secret, 6),
            Err(AuthError::UnknownToken)
        );
        let (_, secret) = parse_token(&t.text).expect("parses");
        let mut revoked = t.record.clone();
        revoked.revoked = true;
        assert!(matches!(
            verify_token(&revoked, secret, 6),
            Err(AuthError::Revoked(_))
        ));
        assert!(matches!(
            verify_token(&t.record, secret, 5 + DAY),
            Err(AuthError::Expired(_))
        ));
        let mut used = t.record.clone();
        used.used_by = Some("a1".into());
        assert!(matches!(
            verify_token(&used, secret, 6),
            Err(AuthError::Used { .. })
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

    fn agent(id: &str, cert: u8) -> AgentRecord {
        AgentRecord {
            id: id.into(),
            client: "acme".into(),
            site: "hq".into(),
            hostname: "box".into(),
            version: "0.1.0".into(),
            token_id: "t".into(),
            enrolled_ms: 1,
            cert_sha256: [cert; 32],
            cert_not_after_ms: 2,
            revoked: false,
            last_seen_ms: 0,
            backlog: 0,
        }
    }

    #[test]
    fn the_registry_knows_agents_by_certificate_and_honours_revocation() {
        let r = Registry::new(vec![agent("a1", 1)]);
        assert_eq!(r.identify(&[1; 32]).map(|a| a.id), Ok("a1".to_owned()));
        assert_eq!(r.identify(&[2; 32]), Err(AuthError::UnknownCertificate));
        // Re-enrolled: the old certificate no longer works.
        r.insert(agent("a1", 2));
        assert_eq!(r.identify(&[1; 32]), Err(AuthError::UnknownCertificate));
        let mut revoked = agent("a1", 2);
        revoked.revoked = true;
        r.insert(revoked);
        assert_eq!(
            r.identify(&[2; 32]),
            Err(AuthError::AgentRevoked("a1".into()))
        );
        assert_eq!(r.list().len(), 1);
    }

    #[test]
    fn last_seen_is_written_through_at_most_once_a_minute() {
        let r = Registry::new(vec![agent("a1", 1)]);
        let first = r.seen(&[1; 32], "0.1.0", 3, 100_000).expect("first is due");
        assert_eq!(first, "a1");
        let noted = r.get("a1").expect("a1");
        assert_eq!((noted.last_seen_ms, noted.backlog), (100_000, 3));
        assert!(r.seen(&[1; 32], "0.1.0", 2, 110_000).is_none());
        assert_eq!(r.get("a1").map(|a| a.backlog), Some(2), "memory is current");
        assert!(
            r.seen(&[1; 32], "0.2.0", 1, 120_000).is_some(),
            "a new version is due"
        );
        assert!(r.seen(&[1; 32], "0.2.0", 0, 180_000).is_some());
        assert!(r.seen(&[9; 32], "0.2.0", 0, 180_000).is_none(), "unknown");
    }
}
