//! How agents and the `census` CLI reach the collector: mutual TLS with credentials the
//! collector's certificate authority issued.
//!
//! A credentials directory holds three PEM files: [`CA_FILE`] (the CA to trust the collector
//! by), [`CERT_FILE`] (this party's certificate) and [`KEY_FILE`] (its private key, readable by
//! its owner only). An agent's is made by `census-agent enroll`; the operator's by the collector
//! on its first start, in `<data dir>/operator`.
//!
//! `https://` URLs use mutual TLS. `http://` URLs are plaintext, which only a collector in its
//! development mode (`--dev-plaintext`) accepts; the certificate then travels in the
//! [`crate::DEV_CERTIFICATE`] metadata, proving nothing about who sends it.

use std::{
    fmt, fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
    time::Duration,
};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tonic::{
    Request, Status,
    metadata::{BinaryMetadataValue, MetadataValue},
    service::Interceptor,
    transport::{Certificate, ClientTlsConfig, Endpoint, Identity},
};

pub const CA_FILE: &str = "ca.pem";
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";

/// Why credentials cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} holds no {what} in PEM form")]
    Pem { path: PathBuf, what: &'static str },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// A CA certificate, a certificate and its private key, all PEM.
#[derive(Clone)]
pub struct Credentials {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials").finish_non_exhaustive()
    }
}

impl Credentials {
    /// Whether `dir` holds a certificate (an agent that has enrolled).
    pub fn exist(dir: &Path) -> bool {
        dir.join(CERT_FILE).is_file() && dir.join(KEY_FILE).is_file()
    }

    /// Reads and checks the three files of `dir`.
    pub fn load(dir: &Path) -> Result<Self, CredentialsError> {
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read_to_string(&path).map_err(|source| CredentialsError::Read { path, source })
        };
        let creds = Credentials {
            ca_pem: read(CA_FILE)?,
            cert_pem: read(CERT_FILE)?,
            key_pem: read(KEY_FILE)?,
        };
        let bad = |name: &str, what| CredentialsError::Pem {
            path: dir.join(name),
            what,
        };
        if CertificateDer::from_pem_slice(creds.ca_pem.as_bytes()).is_err() {
            return Err(bad(CA_FILE, "certificate"));
        }
        if creds.certificate_der().is_none() {
            return Err(bad(CERT_FILE, "certificate"));
        }
        if PrivateKeyDer::from_pem_slice(creds.key_pem.as_bytes()).is_err() {
            return Err(bad(KEY_FILE, "private key"));
        }
        Ok(creds)
    }

    /// Writes the three files into `dir` (created if missing), each whole or not at all; the
    /// key (and on Unix every file) readable by the owner only.
    pub fn save(&self, dir: &Path) -> Result<(), CredentialsError> {
        fs::create_dir_all(dir).map_err(|source| CredentialsError::Write {
            path: dir.to_owned(),
            source,
        })?;
        for (name, text) in [
            (KEY_FILE, &self.key_pem),
            (CERT_FILE, &self.cert_pem),
            (CA_FILE, &self.ca_pem),
        ] {
            write_private(&dir.join(name), text.as_bytes()).map_err(|source| {
                CredentialsError::Write {
                    path: dir.join(name),
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// This party's certificate, DER (the first of its PEM file).
    pub fn certificate_der(&self) -> Option<Vec<u8>> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .ok()
            .map(|c| c.as_ref().to_vec())
    }

    /// What a plaintext (development mode) call carries in place of TLS.
    fn dev_certificate(&self) -> Option<BinaryMetadataValue> {
        self.certificate_der()
            .map(|der| MetadataValue::from_bytes(&der))
    }
}

/// Writes `bytes` to `path` through a temporary file renamed into place, synced, mode 0600 on
/// Unix.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    {
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// Why a collector URL cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("{url:?} is not a valid collector URL (expected e.g. https://collector.example:7400)")]
    Url { url: String },
    #[error(
        "{url:?}: the collector URL must start with https:// (or http:// for a collector in development mode)"
    )]
    Scheme { url: String },
    #[error("cannot set up TLS for {url}: {reason}")]
    Tls { url: String, reason: String },
}

/// An endpoint for `url`: mutual TLS with `creds` for `https://` (with only the CA when
/// `creds` has no certificate yet, as in enrollment), plaintext for `http://`.
pub fn endpoint(
    url: &str,
    ca_pem: Option<&str>,
    creds: Option<&Credentials>,
    connect_timeout: Duration,
) -> Result<Endpoint, EndpointError> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|_| EndpointError::Url { url: url.into() })?
        .connect_timeout(connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    match endpoint.uri().scheme_str() {
        Some("https") => {
            let mut tls = ClientTlsConfig::new();
            match ca_pem.or(creds.map(|c| c.ca_pem.as_str())) {
                Some(ca) => tls = tls.ca_certificate(Certificate::from_pem(ca)),
                // Enrollment without a CA file: the platform's roots (a collector whose server
                // certificate a public CA signed).
                None => tls = tls.with_enabled_roots(),
            }
            if let Some(c) = creds {
                tls = tls.identity(Identity::from_pem(&c.cert_pem, &c.key_pem));
            }
            endpoint.tls_config(tls).map_err(|e| EndpointError::Tls {
                url: url.into(),
                reason: error_chain(&e),
            })
        }
        Some("http") => Ok(endpoint),
        _ => Err(EndpointError::Scheme { url: url.into() }),
    }
}

/// Adds the development-mode certificate to plaintext calls; does nothing over TLS.
#[derive(Clone, Default)]
pub struct Authenticate {
    dev_certificate: Option<BinaryMetadataValue>,
}

impl fmt::Debug for Authenticate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticate")
            .field("plaintext", &self.dev_certificate.is_some())
            .finish()
    }
}

impl Authenticate {
    /// For calls to `url` with `creds`.
    pub fn new(url: &str, creds: Option<&Credentials>) -> Self {
        let plaintext = url.starts_with("http://");
        Authenticate {
            dev_certificate: creds
                .filter(|_| plaintext)
                .and_then(Credentials::dev_certificate),
        }
    }

    /// Adds what this caller must send to `req`'s metadata.
    pub fn apply<T>(&self, req: &mut Request<T>) {
        if let Some(v) = &self.dev_certificate {
            req.metadata_mut()
                .insert_bin(crate::DEV_CERTIFICATE, v.clone());
        }
    }
}

impl Interceptor for Authenticate {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        self.apply(&mut req);
        Ok(req)
    }
}

/// An error and its sources on one line: tonic's own message is only "transport error".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_name_a_scheme_we_speak() {
        let t = Duration::from_secs(1);
        assert!(matches!(
            endpoint("ftp://x:1", None, None, t),
            Err(EndpointError::Scheme { .. })
        ));
        assert!(matches!(
            endpoint("not a url", None, None, t),
            Err(EndpointError::Url { .. })
        ));
        assert!(endpoint("http://127.0.0.1:7400", None, None, t).is_ok());
    }

    #[test]
    fn missing_or_wrong_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Credentials::load(dir.path()).expect_err("empty dir");
        assert!(err.to_string().contains(CA_FILE), "{err}");
        for name in [CA_FILE, CERT_FILE, KEY_FILE] {
            fs::write(dir.path().join(name), "junk").expect("write");
        }
        let err = Credentials::load(dir.path()).expect_err("junk");
        assert!(err.to_string().contains("holds no certificate"), "{err}");
        assert!(!Credentials::exist(&dir.path().join("nope")));
    }
}
