//! Enrollment: trading a single-use token for a certificate, and deciding whether `run` has
//! one to deliver with.
//!
//! `census-agent enroll` (and `run`, when the agent has no certificate yet but a token is
//! configured) makes a new ECDSA P-256 key pair, sends a certificate signing request with the
//! token to the collector's `EnrollmentService.Enroll` (TLS with only the collector's CA, no
//! client certificate yet), and keeps what comes back in `<state dir>/identity/`:
//! `ca.pem`, `cert.pem`, `key.pem` (see [`census_proto::transport::Credentials`], every file
//! mode 0600 on Unix) and `enrollment.json` ([`Enrollment`]: the agent id, client, site,
//! collector URL and the certificate's expiry). The key never leaves the machine.
//!
//! The collector binds the certificate to an agent id: the one in `agent.json` is proposed,
//! and whatever id the collector answers with is written back to `agent.json`, so every batch
//! carries the id its certificate names.
//!
//! [`plan`] is `run`'s decision: a certificate on disk is used; without one, a configured token
//! enrolls first; with neither, one line saying to run `census-agent enroll`.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use census_proto::{
    convert,
    transport::{self, Credentials, CredentialsError, EndpointError},
    v1::{self, enrollment_service_client::EnrollmentServiceClient},
};
use rustls::pki_types::{CertificateDer, pem::PemObject as _};
use serde::{Deserialize, Serialize};
use tonic::Code;

use crate::{config::Config, config::ConfigError, report::AgentState};

/// The identity's directory under the state directory.
pub const IDENTITY_DIR: &str = "identity";
/// What the collector said at enrollment, beside the credentials.
pub const ENROLLMENT_FILE: &str = "enrollment.json";
/// The most connecting (and the TLS handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The most the Enroll call may take once connected.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the agent's certificate lives: `<state dir>/identity`.
pub fn identity_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(IDENTITY_DIR)
}

/// Why enrollment failed. Each is one line saying what to do; `main.rs` maps each to an exit
/// code (see [`EnrollError::kind`]).
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The collector refused the token (UNAUTHENTICATED): it names why (expired, used,
    /// unknown, revoked).
    #[error(
        "the collector refused the enrollment token: {0}; ask your MSP for a new token: census token create --client C --site S"
    )]
    Refused(String),
    #[error("cannot reach the collector at {url}: {reason}{hint}")]
    Unreachable {
        url: String,
        reason: String,
        /// Why TLS may have failed (no CA file given), or nothing.
        hint: &'static str,
    },
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error(
        "cannot read the collector's CA file {path}: {reason} (ca_file / --ca-file: the collector's <data dir>/tls/ca.pem)"
    )]
    CaFile { path: PathBuf, reason: String },
    #[error(
        "this agent is already enrolled (its certificate is in {0}); pass --force to enroll again with a new key and token"
    )]
    AlreadyEnrolled(PathBuf),
    #[error("cannot use the state directory: {0}")]
    State(io::Error),
    #[error("cannot save the agent's identity: {0}")]
    Save(#[from] CredentialsError),
    #[error("cannot make the agent's key pair or certificate request: {0}")]
    Key(String),
    #[error("enrollment failed: {0}")]
    Collector(String),
}

/// What an [`EnrollError`] asks of the operator, for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Flags, config, files: 64.
    Usage,
    /// The collector cannot be reached: 69.
    Unavailable,
    /// The token was refused: 77.
    Refused,
    /// Anything else: 1.
    Other,
}

impl EnrollError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            EnrollError::Refused(_) => ErrorKind::Refused,
            EnrollError::Unreachable { .. } => ErrorKind::Unavailable,
            EnrollError::Endpoint(_)
            | EnrollError::CaFile { .. }
            | EnrollError::AlreadyEnrolled(_)
            | EnrollError::State(_)
            | EnrollError::Save(_) => ErrorKind::Usage,
            EnrollError::Key(_) | EnrollError::Collector(_) => ErrorKind::Other,
        }
    }
}

/// What enrollment gave this agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolled {
    pub agent_id: String,
    pub client: String,
    pub site: String,
    pub not_after: SystemTime,
}

impl Enrolled {
    /// The line `census-agent enroll` prints.
    pub fn line(&self) -> String {
        format!(
            "enrolled as agent {} of client {}, site {}; certificate valid until {}",
            self.agent_id,
            self.client,
            self.site,
            humantime::format_rfc3339_seconds(self.not_after)
        )
    }
}

/// `<state dir>/identity/enrollment.json`: for the operator and for support, not read back by
/// delivery (which needs only the credentials).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    pub agent_id: String,
    pub client: String,
    pub site: String,
    pub collector: String,
    /// The certificate's expiry, RFC 3339.
    pub not_after: String,
}

/// A new key pair and a certificate signing request for it.
pub struct Csr {
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The PKCS#10 request, DER, its subject's common name the agent id.
    pub csr_der: Vec<u8>,
}

impl std::fmt::Debug for Csr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Csr")
            .field("csr_der", &self.csr_der.len())
            .finish_non_exhaustive()
    }
}

/// Makes an ECDSA P-256 key pair and a CSR whose subject is `CN=<agent_id>`. The collector
/// uses only the public key (it decides what the certificate says); the CN makes the request
/// readable to a person.
pub fn make_csr(agent_id: &str) -> Result<Csr, EnrollError> {
    let key = rcgen::KeyPair::generate().map_err(|e| EnrollError::Key(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| EnrollError::Key(e.to_string()))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, agent_id);
    let csr = params
        .serialize_request(&key)
        .map_err(|e| EnrollError::Key(e.to_string()))?;
    Ok(Csr {
        key_pem: key.serialize_pem(),
        csr_der: csr.der().to_vec(),
    })
}

/// Refuses to enroll over an existing identity unless `force`.
pub fn check_not_enrolled(state_dir: &Path, force: bool) -> Result<(), EnrollError> {
    let dir = identity_dir(state_dir);
    if !force && Credentials::exist(&dir) {
        return Err(EnrollError::AlreadyEnrolled(dir));
    }
    Ok(())
}

/// Reads the collector's CA certificate (PEM) from `path`, checking that it holds one.
pub fn read_ca_file(path: &Path) -> Result<String, EnrollError> {
    let bad = |reason: String| EnrollError::CaFile {
        path: path.to_owned(),
        reason,
    };
    let text = fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    if CertificateDer::from_pem_slice(text.as_bytes()).is_err() {
        return Err(bad("it holds no PEM certificate".into()));
    }
    Ok(text)
}

/// Enrolls this agent with the collector at `url` using `token`: a new key pair and CSR, the
/// Enroll call over TLS trusting `ca_pem` (the collector's CA; `None`: the platform's trust
/// store) or plaintext for an `http://` development collector, then the identity saved in
/// `<state_dir>/identity/` (replacing any there) and the agent id the collector bound the
/// certificate to written to `<state_dir>/agent.json`. `state_dir` is created if missing.
pub async fn enroll(
    url: &str,
    token: &str,
    ca_pem: Option<&str>,
    state_dir: &Path,
) -> Result<Enrolled, EnrollError> {
    create_state_dir(state_dir)?;
    let mut state = AgentState::load_or_create(Some(state_dir)).map_err(EnrollError::State)?;
    let csr = make_csr(&state.agent_id)?;
    let endpoint = transport::endpoint(url, ca_pem, None, CONNECT_TIMEOUT)?.timeout(CALL_TIMEOUT);
    let unreachable = |reason: String| EnrollError::Unreachable {
        url: url.to_owned(),
        hint: ca_hint(url, ca_pem.is_some(), &reason),
        reason,
    };
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| unreachable(transport::error_chain(&e)))?;
    let request = v1::EnrollRequest {
        token: token.to_owned(),
        csr_der: csr.csr_der,
        agent_id: state.agent_id.clone(),
        hostname: hostname(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let response = EnrollmentServiceClient::new(channel)
        .enroll(request)
        .await
        .map_err(|s| match s.code() {
            Code::Unauthenticated => EnrollError::Refused(s.message().to_owned()),
            Code::Unavailable | Code::DeadlineExceeded => unreachable(format!(
                "{}{}",
                s.message(),
                std::error::Error::source(&s)
                    .map(|e| format!(": {}", transport::error_chain(e)))
                    .unwrap_or_default()
            )),
            code => EnrollError::Collector(format!("{code:?}: {}", s.message())),
        })?
        .into_inner();
    let bad = |what: &str| EnrollError::Collector(format!("the collector's answer {what}"));
    if response.agent_id.trim().is_empty() {
        return Err(bad("names no agent id"));
    }
    let not_after = response
        .not_after
        .as_ref()
        .and_then(convert::system_time)
        .ok_or_else(|| bad("has no certificate expiry"))?;
    let creds = Credentials {
        ca_pem: response.ca_pem,
        cert_pem: response.certificate_pem,
        key_pem: csr.key_pem,
    };
    if creds.certificate_der().is_none() {
        return Err(bad("holds no certificate"));
    }
    if CertificateDer::from_pem_slice(creds.ca_pem.as_bytes()).is_err() {
        return Err(bad("holds no CA certificate"));
    }
    let enrollment = Enrollment {
        agent_id: response.agent_id.clone(),
        client: response.client.clone(),
        site: response.site.clone(),
        collector: url.to_owned(),
        not_after: humantime::format_rfc3339_seconds(not_after).to_string(),
    };
    save_identity(state_dir, &creds, &enrollment)?;
    if state.agent_id != response.agent_id {
        state
            .adopt(&response.agent_id)
            .map_err(EnrollError::State)?;
    }
    Ok(Enrolled {
        agent_id: response.agent_id,
        client: response.client,
        site: response.site,
        not_after,
    })
}

/// What to add to a failure to connect over `https://` without a CA file when TLS (not the
/// network) failed: most likely the collector's own CA, which no system trusts.
fn ca_hint(url: &str, ca_given: bool, reason: &str) -> &'static str {
    let reason = reason.to_ascii_lowercase();
    let tls = ["certificate", "tls", "handshake", "issuer"]
        .iter()
        .any(|w| reason.contains(w));
    if !ca_given && tls && url.to_ascii_lowercase().starts_with("https://") {
        " (no CA file given, so the collector's certificate was checked against this \
         machine's trust store: pass --ca-file with the collector's <data dir>/tls/ca.pem)"
    } else {
        ""
    }
}

/// Writes the credentials and `enrollment.json` into a fresh directory beside the identity's,
/// then swaps it in, so a crash leaves the old identity or the new one, never a key of one
/// with the certificate of the other.
pub fn save_identity(
    state_dir: &Path,
    creds: &Credentials,
    enrollment: &Enrollment,
) -> Result<(), EnrollError> {
    let dir = identity_dir(state_dir);
    let new = state_dir.join(format!("{IDENTITY_DIR}.new"));
    let old = state_dir.join(format!("{IDENTITY_DIR}.old"));
    for leftover in [&new, &old] {
        if leftover.exists() {
            fs::remove_dir_all(leftover).map_err(EnrollError::State)?;
        }
    }
    creds.save(&new)?;
    let json = serde_json::to_string_pretty(enrollment)
        .map_err(|e| EnrollError::Collector(e.to_string()))?;
    transport::write_private(&new.join(ENROLLMENT_FILE), json.as_bytes()).map_err(|source| {
        CredentialsError::Write {
            path: new.join(ENROLLMENT_FILE),
            source,
        }
    })?;
    if dir.exists() {
        fs::rename(&dir, &old).map_err(EnrollError::State)?;
    }
    fs::rename(&new, &dir).map_err(EnrollError::State)?;
    if old.exists() {
        fs::remove_dir_all(&old).map_err(EnrollError::State)?;
    }
    #[cfg(unix)]
    fs::File::open(state_dir)
        .and_then(|d| d.sync_all())
        .map_err(EnrollError::State)?;
    Ok(())
}

/// Reads `enrollment.json`, if the agent has enrolled.
/// The agent id a certificate names: its subject's common name (the collector signs the id it
/// bound the certificate to there, and takes the agent's identity from it).
pub fn certificate_agent_id(creds: &Credentials) -> Option<String> {
    let der = creds.certificate_der()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

pub fn load_enrollment(state_dir: &Path) -> Option<Enrollment> {
    let text = fs::read_to_string(identity_dir(state_dir).join(ENROLLMENT_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

fn create_state_dir(dir: &Path) -> Result<(), EnrollError> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(EnrollError::State)
}

/// This machine's name, for `census agents` (best effort: empty when unknown).
fn hostname() -> String {
    let from_env = ["HOSTNAME", "COMPUTERNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok());
    from_env
        .or_else(|| fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

// === run's decision ===

/// How `run` gets the certificate it delivers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// `<state dir>/identity` holds one.
    Enrolled { identity_dir: PathBuf },
    /// None yet: enroll with this token first.
    Enroll { token: String },
}

/// `run`'s decision: the identity in the state directory if there is one, else enrollment with
/// the configured token, else an error saying to run `census-agent enroll`. A token that is
/// configured but cannot be read is that error, not "not enrolled".
pub fn plan(config: &Config) -> Result<Start, ConfigError> {
    let state_dir = config.state_dir.as_deref().ok_or(ConfigError::NoStateDir)?;
    let dir = identity_dir(state_dir);
    if Credentials::exist(&dir) {
        return Ok(Start::Enrolled { identity_dir: dir });
    }
    match config.token() {
        Ok(token) => Ok(Start::Enroll { token }),
        Err(ConfigError::NoToken) => Err(ConfigError::NotEnrolled(dir)),
        Err(e) => Err(e),
    }
}

/// The collector's CA from `config.ca_file`, if set.
pub fn config_ca(config: &Config) -> Result<Option<String>, EnrollError> {
    config.ca_file.as_deref().map(read_ca_file).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_csr_parses_back_with_the_agent_id_as_common_name() {
        let id = "6f1c2a9e-4b1d-4c3e-9a57-0d6f1e2b3c4d";
        let csr = make_csr(id).expect("csr");
        let der = rustls::pki_types::CertificateSigningRequestDer::from(csr.csr_der.as_slice());
        // from_der also checks the request's signature.
        let params = rcgen::CertificateSigningRequestParams::from_der(&der).expect("parses");
        match params
            .params
            .distinguished_name
            .get(&rcgen::DnType::CommonName)
        {
            Some(rcgen::DnValue::Utf8String(cn)) => assert_eq!(cn, id),
            other => panic!("common name {other:?}"),
        }
        // The key is P-256 and matches the request's public key.
        let key = rcgen::KeyPair::from_pem(&csr.key_pem).expect("key parses");
        assert!(std::ptr::eq(
            key.algorithm(),
            &rcgen::PKCS_ECDSA_P256_SHA256
        ));
        assert_eq!(
            rcgen::PublicKeyData::subject_public_key_info(&key),
            rcgen::PublicKeyData::subject_public_key_info(&params.public_key)
        );
        // Each call makes a new key.
        assert_ne!(make_csr(id).expect("csr").key_pem, csr.key_pem);
    }

    /// A self-signed certificate standing in for the collector's answer.
    fn credentials(agent_id: &str) -> Credentials {
        let csr = make_csr(agent_id).expect("csr");
        let key = rcgen::KeyPair::from_pem(&csr.key_pem).expect("key");
        let cert = rcgen::CertificateParams::new(vec!["census-agent".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        Credentials {
            ca_pem: cert.pem(),
            cert_pem: cert.pem(),
            key_pem: csr.key_pem,
        }
    }

    fn enrollment() -> Enrollment {
        Enrollment {
            agent_id: "a1".into(),
            client: "acme".into(),
            site: "hq".into(),
            collector: "https://collector.example:7400".into(),
            not_after: "2027-01-01T00:00:00Z".into(),
        }
    }

    #[test]
    fn the_identity_round_trips_with_a_private_key() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let creds = credentials("a1");
        save_identity(tmp.path(), &creds, &enrollment()).expect("save");
        let dir = identity_dir(tmp.path());
        assert!(Credentials::exist(&dir));
        let loaded = Credentials::load(&dir).expect("load");
        assert_eq!(
            (&loaded.ca_pem, &loaded.cert_pem, &loaded.key_pem),
            (&creds.ca_pem, &creds.cert_pem, &creds.key_pem)
        );
        assert_eq!(load_enrollment(tmp.path()), Some(enrollment()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = fs::metadata(dir.join(transport::KEY_FILE))
                .expect("key")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Enrolling again replaces the whole identity and leaves nothing beside it.
        let again = credentials("a1");
        save_identity(tmp.path(), &again, &enrollment()).expect("save again");
        assert_eq!(
            Credentials::load(&dir).expect("load").key_pem,
            again.key_pem
        );
        let mut names: Vec<_> = fs::read_dir(tmp.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        names.sort();
        assert_eq!(names, [IDENTITY_DIR]);
        // And is refused without --force.
        assert!(matches!(
            check_not_enrolled(tmp.path(), false),
            Err(EnrollError::AlreadyEnrolled(_))
        ));
        check_not_enrolled(tmp.path(), true).expect("forced");
        check_not_enrolled(&tmp.path().join("elsewhere"), false).expect("not enrolled");
    }

    #[test]
    fn run_uses_the_identity_else_a_token_else_says_to_enroll() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut c = Config {
            state_dir: Some(tmp.path().to_owned()),
            ..Config::default()
        };
        let err = plan(&c).expect_err("neither").to_string();
        assert!(
            err.contains("not enrolled") && err.contains("census-agent enroll"),
            "{err}"
        );
        c.token_file = Some(tmp.path().join("missing.token"));
        let err = plan(&c).expect_err("unreadable token").to_string();
        assert!(err.contains("cannot read token file"), "{err}");
        c.token_file = None;
        c.token = Some(" cen1_abc \n".into());
        assert_eq!(
            plan(&c).expect("token"),
            Start::Enroll {
                token: "cen1_abc".into()
            }
        );
        save_identity(tmp.path(), &credentials("a1"), &enrollment()).expect("save");
        assert_eq!(
            plan(&c).expect("identity"),
            Start::Enrolled {
                identity_dir: identity_dir(tmp.path())
            },
            "an identity wins over a token"
        );
        c.token = None;
        assert!(matches!(plan(&c), Ok(Start::Enrolled { .. })));
        c.state_dir = None;
        let err = plan(&c).expect_err("no state dir").to_string();
        assert!(err.contains("state directory"), "{err}");
    }

    #[test]
    fn a_ca_file_must_hold_a_certificate() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("ca.pem");
        assert!(
            read_ca_file(&path)
                .expect_err("missing")
                .to_string()
                .contains("tls/ca.pem")
        );
        fs::write(&path, "not a certificate").expect("write");
        assert!(matches!(
            read_ca_file(&path),
            Err(EnrollError::CaFile { .. })
        ));
        fs::write(&path, credentials("a").ca_pem).expect("write");
        read_ca_file(&path).expect("a certificate");
    }

    #[test]
    fn errors_map_to_what_the_operator_must_do() {
        let refused = EnrollError::Refused("token expired".into());
        assert_eq!(refused.kind(), ErrorKind::Refused);
        let text = refused.to_string();
        assert!(
            text.contains("token expired")
                && text.contains("census token create --client C --site S"),
            "{text}"
        );
        assert_eq!(
            EnrollError::Unreachable {
                url: "https://x".into(),
                reason: "refused".into(),
                hint: ""
            }
            .kind(),
            ErrorKind::Unavailable
        );
        assert_eq!(
            EnrollError::AlreadyEnrolled("/x".into()).kind(),
            ErrorKind::Usage
        );
        let line = Enrolled {
            agent_id: "a1".into(),
            client: "acme".into(),
            site: "hq".into(),
            not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        }
        .line();
        assert_eq!(
            line,
            "enrolled as agent a1 of client acme, site hq; certificate valid until 2027-01-15T08:00:00Z"
        );
    }

    #[test]
    fn a_tls_failure_without_a_ca_file_says_to_pass_one() {
        let tls = "transport error: invalid peer certificate: UnknownIssuer";
        assert!(ca_hint("https://c:7400", false, tls).contains("--ca-file"));
        assert_eq!(ca_hint("https://c:7400", true, tls), "");
        assert_eq!(ca_hint("http://c:7400", false, tls), "");
        assert_eq!(
            ca_hint(
                "https://c:7400",
                false,
                "tcp connect error: Connection refused"
            ),
            ""
        );
    }

    /// Nothing listens: unreachable, and no word about the CA.
    #[tokio::test]
    async fn an_absent_collector_is_unreachable() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let err = enroll(
            &format!("https://127.0.0.1:{port}"),
            "t",
            None,
            &tmp.path().join("state"),
        )
        .await
        .expect_err("nothing listens");
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
        assert!(
            !err.to_string().contains("--ca-file"),
            "a refused connection is no TLS matter: {err}"
        );
        assert!(
            tmp.path().join("state/agent.json").is_file(),
            "the state directory and agent id were made"
        );
        assert!(!Credentials::exist(&identity_dir(
            &tmp.path().join("state")
        )));
    }
}
