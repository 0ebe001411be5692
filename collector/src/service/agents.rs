//! Enrollment, the callers' certificates, and the agents list: who may call, and as whom.

use std::{borrow::Cow, sync::Arc};

use census_proto::{
    convert,
    v1::{self, enrollment_service_server::EnrollmentService},
};
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use super::{Collector, Security, auth_status, now_ms};
use crate::{
    auth::{self, AuthError},
    model::{self, AgentRecord},
    pki,
};

/// Default and longest lifetime of an enrollment token.
pub const DEFAULT_TOKEN_TTL_S: u64 = 24 * 60 * 60;
pub const MAX_TOKEN_TTL_S: u64 = 30 * 24 * 60 * 60;
/// Hostnames and versions agents report are kept to this many characters.
const MAX_LABEL: usize = 253;

/// The SHA-256 of the certificate the caller presented: over TLS, the one it proved it holds
/// the key of; in development mode on plaintext, the one in its metadata.
pub fn presented_certificate<T>(
    security: &Security,
    request: &Request<T>,
) -> Result<[u8; 32], AuthError> {
    if let Some(certs) = request.peer_certs()
        && let Some(leaf) = certs.first()
    {
        return Ok(pki::fingerprint(leaf.as_ref()));
    }
    if security.dev_plaintext
        && let Some(v) = request.metadata().get_bin(census_proto::DEV_CERTIFICATE)
        && let Ok(der) = v.to_bytes()
    {
        return Ok(pki::fingerprint(&der));
    }
    Err(AuthError::NoCertificate)
}

/// An interceptor that admits only the operator's certificate.
pub fn operator_check(
    security: Arc<Security>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |req: Request<()>| {
        let cert = presented_certificate(&security, &req).map_err(auth_status)?;
        if security.pki.is_operator(&cert) {
            Ok(req)
        } else if security.agents.identify(&cert).is_ok() {
            Err(Status::permission_denied(
                AuthError::NotOperator.to_string(),
            ))
        } else {
            Err(auth_status(AuthError::NotOperator))
        }
    }
}

/// A token's lifetime from `expires_in_seconds` (0: the default), in milliseconds.
pub fn token_ttl(seconds: u64) -> Result<u64, Status> {
    let s = if seconds == 0 {
        DEFAULT_TOKEN_TTL_S
    } else {
        seconds
    };
    if s > MAX_TOKEN_TTL_S {
        return Err(Status::invalid_argument(format!(
            "a token may live at most 30 days (asked for {s} s): enroll agents within that time, or make another token later"
        )));
    }
    Ok(s * 1000)
}

pub fn agent_to_wire(a: AgentRecord) -> v1::Agent {
    v1::Agent {
        agent_id: a.id,
        client: a.client,
        site: a.site,
        hostname: a.hostname,
        version: a.version,
        enrolled_at: Some(convert::timestamp_from_millis(a.enrolled_ms)),
        last_seen: (a.last_seen_ms > 0).then(|| convert::timestamp_from_millis(a.last_seen_ms)),
        backlog: a.backlog,
        revoked: a.revoked,
        certificate_not_after: Some(convert::timestamp_from_millis(a.cert_not_after_ms)),
        token_id: a.token_id,
    }
}

/// `s` without control characters, at most `MAX_LABEL` characters; `s` itself (no copy) when
/// it is that already, as an agent's version is on every batch.
fn label(s: &str) -> Cow<'_, str> {
    if s.len() <= MAX_LABEL && !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(
        s.chars()
            .filter(|c| !c.is_control())
            .take(MAX_LABEL)
            .collect(),
    )
}

impl Collector {
    /// Notes a batch's agent as seen, writing its record now and then.
    pub(super) fn note_seen(&self, cert: &[u8; 32], batch: &v1::ObservationBatch) {
        let version = label(&batch.agent_version);
        if let Some(id) = self
            .security
            .agents
            .seen(cert, &version, batch.backlog, now_ms())
        {
            // Off the batch's path: the ack waits for nothing of this.
            let store = Arc::clone(&self.store);
            let security = Arc::clone(&self.security);
            tokio::task::spawn_blocking(move || {
                let _writing = security
                    .agent_writes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                // The record as it is now (revoked meanwhile, say), not as it was noted.
                let Some(current) = security.agents.get(&id) else {
                    return;
                };
                match store.put_agent(&current, false) {
                    Ok(()) => {}
                    // Said once where the store fails; the next batch notes it again.
                    Err(e @ crate::store::StoreError::Unavailable(_)) => {
                        debug!(error = %e, "cannot save the agent's last-seen time");
                    }
                    Err(e) => warn!(error = %e, "cannot save the agent's last-seen time"),
                }
            });
        }
    }

    pub(super) async fn revoke(
        &self,
        id: String,
    ) -> Result<Response<v1::RevokeAgentResponse>, Status> {
        let security = Arc::clone(&self.security);
        let id2 = id.clone();
        // Refused in memory at once, then stored durably before the operator hears it worked.
        let agent = self
            .blocking(move |s| {
                let _writing = security
                    .agent_writes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let Some(mut agent) = security.agents.get(&id2) else {
                    return Ok(None);
                };
                agent.revoked = true;
                security.agents.insert(agent.clone());
                s.put_agent(&agent, true)?;
                Ok(Some(agent))
            })
            .await?;
        let Some(agent) = agent else {
            return Err(Status::not_found(format!(
                "no enrolled agent with id {id:?}: see `census agents`"
            )));
        };
        info!(agent = %id, client = %agent.client, site = %agent.site, "agent revoked");
        Ok(Response::new(v1::RevokeAgentResponse {
            agent: Some(agent_to_wire(agent)),
        }))
    }
}

#[tonic::async_trait]
impl EnrollmentService for Collector {
    async fn enroll(
        &self,
        request: Request<v1::EnrollRequest>,
    ) -> Result<Response<v1::EnrollResponse>, Status> {
        let req = request.into_inner();
        let (token_id, secret) = auth::parse_token(req.token.trim()).map_err(auth_status)?;
        let (token_id, secret) = (token_id.to_owned(), secret.to_owned());
        // One enrollment at a time: the token is read, checked and spent under this lock.
        let _spending = self.security.enrolling.lock().await;
        let id = token_id.clone();
        let mut token = self
            .blocking(move |s| s.token(&id))
            .await?
            .ok_or_else(|| auth_status(AuthError::UnknownToken))?;
        let now = now_ms();
        let scope = match auth::verify_token(&token, &secret, now) {
            Ok(scope) => scope,
            Err(e) => {
                warn!(token_id = %token_id, error = %e, "enrollment refused");
                return Err(auth_status(e));
            }
        };
        // The agent's own id when it is well-formed and free; a new one otherwise.
        let proposed = req.agent_id.trim();
        let agent_id = if model::validate_name("agent id", proposed).is_ok()
            && !self.security.agents.contains(proposed)
        {
            proposed.to_owned()
        } else {
            uuid::Uuid::new_v4().to_string()
        };
        let issued = self
            .security
            .pki
            .sign_agent(&req.csr_der, &agent_id, &scope.client, &scope.site)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let agent = AgentRecord {
            id: agent_id.clone(),
            client: scope.client.clone(),
            site: scope.site.clone(),
            hostname: label(&req.hostname).into_owned(),
            version: label(&req.agent_version).into_owned(),
            token_id: token.id.clone(),
            enrolled_ms: now,
            cert_sha256: issued.sha256,
            cert_not_after_ms: issued.not_after_ms,
            revoked: false,
            last_seen_ms: 0,
            backlog: 0,
        };
        token.used_by = Some(agent_id.clone());
        token.used_ms = Some(now);
        let record = agent.clone();
        self.blocking(move |s| s.enroll(&token, &record)).await?;
        self.security.agents.insert(agent.clone());
        info!(agent = %agent_id, client = %scope.client, site = %scope.site, token_id = %token_id, hostname = %agent.hostname, "agent enrolled");
        Ok(Response::new(v1::EnrollResponse {
            agent_id,
            client: scope.client,
            site: scope.site,
            certificate_pem: issued.certificate_pem,
            ca_pem: self.security.pki.ca_pem().to_owned(),
            not_after: Some(convert::timestamp_from_millis(issued.not_after_ms)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_lifetimes() {
        assert_eq!(token_ttl(0).ok(), Some(DEFAULT_TOKEN_TTL_S * 1000));
        assert_eq!(token_ttl(60).ok(), Some(60_000));
        assert!(token_ttl(MAX_TOKEN_TTL_S + 1).is_err());
    }

    #[test]
    fn labels_are_bounded_and_clean() {
        assert_eq!(label("a\u{0}b\nc"), "abc");
        assert_eq!(label(&"x".repeat(10_000)).len(), MAX_LABEL);
    }
}
