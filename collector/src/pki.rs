//! The collector's certificate authority: it signs the collector's server certificate, the
//! operator's client certificate and every enrolled agent's certificate.
//!
//! The CA is the collector's own, made on first start in `<data dir>/tls/` (`ca.pem`, and
//! `ca-key.pem` readable by the collector only), or one the MSP provides (`[tls] ca_cert` and
//! `ca_key`). The server certificate is made afresh at every start for the configured names, so
//! a name added to the config needs only a restart; agents trust the CA, not the server
//! certificate. The operator's credentials (`<data dir>/operator/`: the CA, a certificate and
//! its key) are made on first start, and again whenever the CA changes.
//!
//! An agent's certificate says who it is (CN = agent id, O = client, OU = site), but the
//! collector never trusts those fields: it finds the agent by the SHA-256 of the certificate
//! it presents (see [`fingerprint`]), in the records it wrote when it signed it.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use census_proto::transport::{self, Credentials};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateSigningRequestDer;
use sha2::{Digest as _, Sha256};
use time::{Duration, OffsetDateTime};
use tracing::{info, warn};

/// Where the collector's own CA lives under the data directory.
pub const TLS_DIR: &str = "tls";
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// Where the operator's credentials are made under the data directory.
pub const OPERATOR_DIR: &str = "operator";

/// How long certificates are valid. Agents' outlive any deployment plan on purpose: an agent
/// is locked out by revocation (checked on every call), not by expiry.
const CA_VALIDITY: Duration = Duration::days(20 * 365);
const AGENT_VALIDITY: Duration = Duration::days(10 * 365);
const OPERATOR_VALIDITY: Duration = Duration::days(10 * 365);
const SERVER_VALIDITY: Duration = Duration::days(2 * 365);

/// Why the CA or a certificate cannot be used or made.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a usable {what}: {reason}")]
    Invalid {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error(
        "[tls] ca_cert and ca_key go together: set both to use your own CA, or neither to have the collector make one"
    )]
    HalfCa,
    #[error("{0}")]
    Operator(#[from] transport::CredentialsError),
    #[error("the certificate signing request is not usable: {0}")]
    Csr(String),
    #[error("cannot make a certificate: {0}")]
    Sign(#[from] rcgen::Error),
    #[error("cannot set up the TLS listener: {0}")]
    Listener(String),
}

/// The TLS settings of the collector's config (`[tls]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// Names and addresses agents and operators reach the collector by (the server
    /// certificate's subject alternative names), besides `localhost`, the loopback addresses
    /// and the listen address.
    #[serde(default)]
    pub server_names: Vec<String>,
    /// A CA the MSP provides (PEM certificate and PEM PKCS#8 key) instead of the collector's
    /// own.
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
}

/// A certificate signed for an agent.
#[derive(Debug, Clone)]
pub struct Issued {
    pub certificate_pem: String,
    pub sha256: [u8; 32],
    pub not_after_ms: u64,
}

/// The CA, the server's identity and the operator's certificate.
pub struct Pki {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
    server_cert_pem: String,
    server_key_pem: String,
    operator_sha256: [u8; 32],
    operator_dir: PathBuf,
    operator_created: bool,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("operator_dir", &self.operator_dir)
            .finish_non_exhaustive()
    }
}

/// The SHA-256 of a certificate's DER: how the collector recognises the certificates it
/// issued.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_owned(),
        source,
    })
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    // Positive and non-zero, as RFC 5280 asks.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

fn leaf_params(
    common_name: &str,
    now: OffsetDateTime,
    validity: Duration,
    usage: ExtendedKeyUsagePurpose,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    // A few minutes back, for clocks a little behind the collector's.
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + validity;
    params.serial_number = Some(random_serial());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    params
}

fn unix_ms(t: OffsetDateTime) -> u64 {
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

impl Pki {
    /// Loads (or makes) the CA, makes the server certificate for `listen` and the configured
    /// names, and loads (or makes) the operator's credentials.
    pub fn load_or_create(
        data_dir: &Path,
        settings: &TlsSettings,
        listen: SocketAddr,
    ) -> Result<Pki, PkiError> {
        let now = OffsetDateTime::now_utc();
        let (ca_pem, ca_key_pem, ca_path) = match (&settings.ca_cert, &settings.ca_key) {
            (Some(cert), Some(key)) => (read(cert)?, read(key)?, cert.clone()),
            (None, None) => own_ca(data_dir, now)?,
            _ => return Err(PkiError::HalfCa),
        };
        let key = KeyPair::from_pem(&ca_key_pem).map_err(|e| PkiError::Invalid {
            path: ca_path.clone(),
            what: "CA key",
            reason: e.to_string(),
        })?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key).map_err(|e| PkiError::Invalid {
            path: ca_path.clone(),
            what: "CA certificate",
            reason: e.to_string(),
        })?;

        let mut names = vec![
            "localhost".to_owned(),
            Ipv4Addr::LOCALHOST.to_string(),
            Ipv6Addr::LOCALHOST.to_string(),
        ];
        if !listen.ip().is_unspecified() {
            names.push(listen.ip().to_string());
        }
        names.extend(settings.server_names.iter().cloned());
        names.sort();
        names.dedup();
        let mut params = leaf_params(
            "census-collector",
            now,
            SERVER_VALIDITY,
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => n.clone().try_into().map(SanType::DnsName),
            })
            .collect::<Result<_, _>>()?;
        let server_key = KeyPair::generate()?;
        let server = params.signed_by(&server_key, &issuer)?;

        let operator_dir = data_dir.join(OPERATOR_DIR);
        let existing = match Credentials::load(&operator_dir) {
            Ok(c) if c.ca_pem == ca_pem => Some(c),
            Ok(_) => {
                warn!(dir = %operator_dir.display(), "the CA changed: making new operator credentials");
                None
            }
            Err(_) if !Credentials::exist(&operator_dir) => None,
            Err(e) => return Err(e.into()),
        };
        let (operator, operator_created) = match existing {
            Some(c) => (c, false),
            None => {
                let key = KeyPair::generate()?;
                let cert = leaf_params(
                    "census-operator",
                    now,
                    OPERATOR_VALIDITY,
                    ExtendedKeyUsagePurpose::ClientAuth,
                )
                .signed_by(&key, &issuer)?;
                let c = Credentials {
                    ca_pem: ca_pem.clone(),
                    cert_pem: cert.pem(),
                    key_pem: key.serialize_pem(),
                };
                c.save(&operator_dir)?;
                (c, true)
            }
        };
        let operator_sha256 =
            fingerprint(
                &operator
                    .certificate_der()
                    .ok_or_else(|| PkiError::Invalid {
                        path: operator_dir.join(transport::CERT_FILE),
                        what: "certificate",
                        reason: "no PEM certificate".into(),
                    })?,
            );
        info!(names = ?names, "server certificate made");
        Ok(Pki {
            ca_pem,
            issuer,
            server_cert_pem: server.pem(),
            server_key_pem: server_key.serialize_pem(),
            operator_sha256,
            operator_dir,
            operator_created,
        })
    }

    /// The CA certificate, PEM: what agents and operators trust the collector by.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The TLS listener's rustls configuration: the server's certificate; client
    /// certificates optional at the handshake (enrollment is made without one) but, when
    /// presented, signed by this CA; HTTP/2 (what tonic's own listener sets up).
    pub fn server_tls_config(&self) -> Result<std::sync::Arc<rustls::ServerConfig>, PkiError> {
        use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
        let bad = |e: &dyn std::fmt::Display| PkiError::Listener(e.to_string());
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(ca.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::clone(&provider),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| bad(&e))?;
        let chain = CertificateDer::pem_slice_iter(self.server_cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(&e))?;
        let key =
            PrivateKeyDer::from_pem_slice(self.server_key_pem.as_bytes()).map_err(|e| bad(&e))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(&e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| bad(&e))?;
        config.alpn_protocols.push(b"h2".to_vec());
        Ok(std::sync::Arc::new(config))
    }

    /// Where the operator's credentials are, and whether this start made them.
    pub fn operator_dir(&self) -> (&Path, bool) {
        (&self.operator_dir, self.operator_created)
    }

    /// Whether a presented certificate is the operator's.
    pub fn is_operator(&self, sha256: &[u8; 32]) -> bool {
        sha256 == &self.operator_sha256
    }

    /// Signs a certificate for an agent from its CSR. Only the CSR's public key is used (its
    /// signature proves the agent holds the key); every field of the certificate is ours.
    pub fn sign_agent(
        &self,
        csr_der: &[u8],
        agent_id: &str,
        client: &str,
        site: &str,
    ) -> Result<Issued, PkiError> {
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(|e| PkiError::Csr(e.to_string()))?;
        let now = OffsetDateTime::now_utc();
        let mut params = leaf_params(
            agent_id,
            now,
            AGENT_VALIDITY,
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        params
            .distinguished_name
            .push(DnType::OrganizationName, client);
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, site);
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(Issued {
            certificate_pem: cert.pem(),
            sha256: fingerprint(cert.der()),
            not_after_ms: unix_ms(params.not_after),
        })
    }
}

/// The collector's own CA in `<data dir>/tls/`, made if missing.
fn own_ca(data_dir: &Path, now: OffsetDateTime) -> Result<(String, String, PathBuf), PkiError> {
    let dir = data_dir.join(TLS_DIR);
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    if cert_path.exists() || key_path.exists() {
        return Ok((read(&cert_path)?, read(&key_path)?, cert_path));
    }
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| PkiError::Write { path, source }
    };
    fs::create_dir_all(&dir).map_err(write_err(&dir))?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "Census collector CA");
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + CA_VALIDITY;
    params.serial_number = Some(random_serial());
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key)?;
    // The key first: a CA certificate without its key would be unusable after a crash.
    transport::write_private(&key_path, key.serialize_pem().as_bytes())
        .map_err(write_err(&key_path))?;
    transport::write_private(&cert_path, cert.pem().as_bytes()).map_err(write_err(&cert_path))?;
    info!(path = %cert_path.display(), "certificate authority made");
    Ok((cert.pem(), key.serialize_pem(), cert_path))
}

#[cfg(test)]
mod tests {
    use rustls_pki_types::{CertificateDer, pem::PemObject as _};

    use super::*;

    fn listen() -> SocketAddr {
        SocketAddr::from(([198, 19, 0, 1], 7400))
    }

    #[test]
    fn the_ca_and_operator_are_made_once_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Pki::load_or_create(dir.path(), &TlsSettings::default(), listen()).expect("pki");
        assert!(a.operator_dir().1, "made on first start");
        let b = Pki::load_or_create(dir.path(), &TlsSettings::default(), listen()).expect("pki");
        assert!(!b.operator_dir().1, "kept afterwards");
        assert_eq!(a.ca_pem(), b.ca_pem());
        assert_eq!(a.operator_sha256, b.operator_sha256);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            for p in [
                dir.path().join(TLS_DIR).join(CA_KEY_FILE),
                dir.path().join(OPERATOR_DIR).join(transport::KEY_FILE),
            ] {
                let mode = fs::metadata(&p).expect("stat").permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{}", p.display());
            }
        }
    }

    #[test]
    fn an_agent_certificate_takes_only_the_key_from_the_csr() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::load_or_create(dir.path(), &TlsSettings::default(), listen()).expect("pki");
        let key = KeyPair::generate().expect("key");
        let mut asked = CertificateParams::new(vec!["evil.example".to_owned()]).expect("params");
        asked.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = asked.serialize_request(&key).expect("csr");
        let issued = pki
            .sign_agent(csr.der(), "agent-1", "acme", "hq")
            .expect("signed");
        let der = CertificateDer::from_pem_slice(issued.certificate_pem.as_bytes()).expect("pem");
        assert_eq!(fingerprint(der.as_ref()), issued.sha256);
        let (_, x509) = x509_parser::parse_x509_certificate(der.as_ref()).expect("x509");
        let subject = x509.subject().to_string();
        assert!(subject.contains("CN=agent-1"), "{subject}");
        assert!(
            subject.contains("O=acme") && subject.contains("OU=hq"),
            "{subject}"
        );
        assert!(!x509.is_ca(), "a CA bit asked for is not granted");
        assert!(x509.subject_alternative_name().ok().flatten().is_none());
        assert!(issued.not_after_ms > unix_ms(OffsetDateTime::now_utc()));

        assert!(matches!(
            pki.sign_agent(b"not a csr", "agent-1", "acme", "hq"),
            Err(PkiError::Csr(_))
        ));
    }

    #[test]
    fn half_a_ca_is_refused_and_a_given_ca_is_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let half = TlsSettings {
            ca_cert: Some(dir.path().join("x")),
            ..TlsSettings::default()
        };
        assert!(matches!(
            Pki::load_or_create(dir.path(), &half, listen()),
            Err(PkiError::HalfCa)
        ));
        // An MSP's CA: the collector's own, moved elsewhere, stands in for one.
        let theirs = tempfile::tempdir().expect("tempdir");
        let made =
            Pki::load_or_create(theirs.path(), &TlsSettings::default(), listen()).expect("pki");
        let given = TlsSettings {
            ca_cert: Some(theirs.path().join(TLS_DIR).join(CA_CERT_FILE)),
            ca_key: Some(theirs.path().join(TLS_DIR).join(CA_KEY_FILE)),
            server_names: vec!["census.msp.example".into()],
        };
        let pki = Pki::load_or_create(dir.path(), &given, listen()).expect("pki");
        assert_eq!(pki.ca_pem(), made.ca_pem());
        assert!(!dir.path().join(TLS_DIR).exists(), "no CA of its own made");
    }
}
