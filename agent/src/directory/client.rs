//! The LDAP conversation of one directory read: connect (TLS from the start for `ldaps://`, or
//! StartTLS), simple bind, find the base DN in the rootDSE when none is configured, then one
//! search for users and one for groups (to resolve nested membership, `groups.rs`), each in
//! pages of `page_size` with the paged-results control (RFC 2696; Active Directory answers an
//! unpaged search with at most 1000 entries and an error). Paging is done
//! here rather than with ldap3's `PagedResults` adapter so that every page has its own deadline,
//! the pages are counted, and a server that keeps handing out cookies cannot loop the agent.
//! Every step runs under `timeout_ms`; each failure is mapped to one [`DirectoryError`] line.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use census_proto::v1;
use ldap3::controls::{MakeCritical, PagedResults, RawControl};
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, LdapError, Scope, SearchResult};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use tracing::{debug, warn};

use super::convert::domain_of;
use super::entry::{MAX_MEMBER_OF, RawEntry, USER_ATTRIBUTES, paged_cookie, parse_entry, to_user};
use super::groups::{
    Full, GROUP_ATTRIBUTES, GROUP_FILTER, GroupGraph, MAX_DIRECTORY_GROUPS, MAX_GROUP_LINKS,
};
use super::{DirectoryError, DirectoryReadResult, USER_FILTER, password, read_small_file};
use crate::config::DirectorySettings;

/// The paged-results control's OID.
const PAGED_RESULTS_OID: &str = "1.2.840.113556.1.4.319";

/// Pages in a row that may come back empty while the server still hands out a cookie (a server
/// may, when a page runs into its time limit); past it the server is taken to be looping.
const MAX_EMPTY_PAGES: u32 = 10;

/// The largest paging cookie accepted (AD's are a few dozen bytes).
const MAX_COOKIE_BYTES: usize = 64 * 1024;

/// The bind password, kept out of `Debug`.
struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Everything a read needs, checked and loaded (password, CA file) before any packet is sent.
#[derive(Debug)]
pub(super) struct Plan {
    url: String,
    host: String,
    starttls: bool,
    /// `None` for plaintext (only with `allow_plaintext`).
    tls: Option<Arc<ClientConfig>>,
    bind_dn: String,
    password: Secret,
    base_dn: Option<String>,
    page_size: u32,
    timeout: Duration,
    max_users: usize,
}

impl Plan {
    /// Checks `settings` as [`DirectorySettings::validate`] does (a caller may not have), reads
    /// the password and builds the TLS configuration.
    pub(super) fn new(settings: &DirectorySettings) -> Result<Plan, DirectoryError> {
        let bad = |m: &str| DirectoryError::Settings(m.to_owned());
        let url = settings
            .url
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .ok_or_else(|| bad("set directory.url"))?
            .to_owned();
        let lower = url.to_ascii_lowercase();
        let tls = if lower.starts_with("ldaps://") {
            if settings.starttls {
                return Err(bad("starttls is for ldap:// URLs; ldaps:// is TLS already"));
            }
            true
        } else if lower.starts_with("ldap://") {
            if !settings.starttls && !settings.allow_plaintext {
                return Err(bad(
                    "ldap:// without starttls would send the bind password in clear: use \
                     ldaps://, set starttls = true, or allow_plaintext = true",
                ));
            }
            settings.starttls
        } else {
            return Err(bad("directory.url must start with ldaps:// or ldap://"));
        };
        let host = host_of(&url)
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("directory.url names no host"))?;
        let bind_dn = settings
            .bind_dn
            .as_deref()
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .ok_or_else(|| bad("set directory.bind_dn"))?
            .to_owned();
        if !(1..=1000).contains(&settings.page_size) {
            return Err(bad("directory.page_size must be between 1 and 1000"));
        }
        if settings.max_users == 0 {
            return Err(bad("directory.max_users must be at least 1"));
        }
        let password = Secret(password(settings)?);
        let tls = if tls {
            Some(tls_config(settings)?)
        } else {
            None
        };
        Ok(Plan {
            url,
            host,
            starttls: settings.starttls,
            tls,
            bind_dn,
            password,
            base_dn: settings
                .base_dn
                .as_deref()
                .map(str::trim)
                .filter(|b| !b.is_empty())
                .map(str::to_owned),
            page_size: settings.page_size,
            timeout: Duration::from_millis(settings.timeout_ms.max(1)),
            max_users: settings.max_users,
        })
    }

    fn timeout_error(&self, step: &str) -> DirectoryError {
        DirectoryError::Timeout {
            url: self.url.clone(),
            step: step.to_owned(),
            timeout: self.timeout,
        }
    }

    /// A failure while connecting (TCP, TLS, StartTLS).
    fn connect_error(&self, e: LdapError) -> DirectoryError {
        let url = self.url.clone();
        match e {
            LdapError::Timeout { .. } => DirectoryError::Unreachable {
                url,
                message: format!("no answer within {:?}", self.timeout),
            },
            LdapError::Io { source } => match source
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            {
                Some(tls) => self.tls_error(tls),
                None if self.tls.is_some() && is_handshake_eof(&source) => DirectoryError::Tls {
                    url,
                    message: format!(
                        "the directory closed the connection during the TLS handshake ({source}): \
                         is this a TLS port?"
                    ),
                },
                None => DirectoryError::Unreachable {
                    url,
                    message: source.to_string(),
                },
            },
            LdapError::Rustls { source } => self.tls_error(&source),
            LdapError::DNSName { source } => DirectoryError::Settings(format!(
                "directory.url host {:?} is not a valid TLS server name: {source}",
                self.host
            )),
            LdapError::LdapResult { result } => DirectoryError::Tls {
                url,
                message: format!(
                    "the directory refused StartTLS: {} ({}) {}",
                    result_name(result.rc),
                    result.rc,
                    one_line(&result.text)
                ),
            },
            other => DirectoryError::Unreachable {
                url,
                message: other.to_string(),
            },
        }
    }

    fn tls_error(&self, e: &rustls::Error) -> DirectoryError {
        let url = self.url.clone();
        let message = e.to_string();
        match e {
            // No name at all to put in directory.url: the certificate must be reissued.
            rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                presented,
                ..
            }) if presented.is_empty() => DirectoryError::NoSubjectAltName {
                url,
                host: self.host.clone(),
            },
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ) => DirectoryError::WrongName {
                url,
                host: self.host.clone(),
                message,
            },
            rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
                | CertificateError::BadSignature
                | CertificateError::BadEncoding
                | CertificateError::InvalidPurpose
                | CertificateError::UnhandledCriticalExtension,
            ) => DirectoryError::Untrusted { url, message },
            _ => DirectoryError::Tls { url, message },
        }
    }

    /// A failure of an operation on an established connection.
    fn op_error(&self, step: &str, e: LdapError) -> DirectoryError {
        match e {
            LdapError::Timeout { .. } => self.timeout_error(step),
            // The connection's driver ended: the server hung up, or sent what is not LDAP.
            LdapError::ResultRecv { .. } | LdapError::OpSend { .. } | LdapError::EndOfStream => {
                DirectoryError::Unreachable {
                    url: self.url.clone(),
                    message: format!(
                        "the connection closed during {step} (the server hung up, or answered \
                         with something that is not LDAP)"
                    ),
                }
            }
            other => DirectoryError::Unreachable {
                url: self.url.clone(),
                message: format!("the connection failed during {step}: {other}"),
            },
        }
    }

    async fn bind(&self, ldap: &mut Ldap) -> Result<(), DirectoryError> {
        let bind = ldap
            .with_timeout(self.timeout)
            .simple_bind(&self.bind_dn, &self.password.0);
        let result = tokio::time::timeout(self.timeout, bind)
            .await
            .map_err(|_| self.timeout_error("the bind"))?
            .map_err(|e| self.op_error("the bind", e))?;
        match result.rc {
            0 => Ok(()),
            49 => Err(DirectoryError::BindRefused {
                bind_dn: self.bind_dn.clone(),
                hint: bind_hint(&result.text),
            }),
            rc => Err(DirectoryError::Bind {
                url: self.url.clone(),
                bind_dn: self.bind_dn.clone(),
                message: match rc {
                    8 | 13 => "the directory wants a protected connection for binds: use \
                               ldaps:// or starttls"
                        .to_owned(),
                    _ => format!("{} ({rc}) {}", result_name(rc), one_line(&result.text)),
                },
            }),
        }
    }

    fn search_error(&self, base_dn: &str, message: String) -> DirectoryError {
        DirectoryError::Search {
            url: self.url.clone(),
            base_dn: base_dn.to_owned(),
            message,
        }
    }

    /// The rootDSE's defaultNamingContext: the domain's own DN.
    async fn default_naming_context(&self, ldap: &mut Ldap) -> Result<String, DirectoryError> {
        let search = ldap.with_timeout(self.timeout).search(
            "",
            Scope::Base,
            "(objectClass=*)",
            vec!["defaultNamingContext"],
        );
        let SearchResult(entries, result) = tokio::time::timeout(self.timeout, search)
            .await
            .map_err(|_| self.timeout_error("the rootDSE read"))?
            .map_err(|e| self.op_error("the rootDSE read", e))?;
        if result.rc != 0 {
            return Err(self.search_error(
                "the rootDSE",
                format!(
                    "{} ({}) {}",
                    result_name(result.rc),
                    result.rc,
                    one_line(&result.text)
                ),
            ));
        }
        entries
            .iter()
            .filter_map(|e| parse_entry(&e.0))
            .find_map(|e| {
                e.first("defaultNamingContext")
                    .map(|v| String::from_utf8_lossy(v).trim().to_owned())
            })
            .filter(|dn| !dn.is_empty())
            .ok_or_else(|| {
                DirectoryError::Settings(
                    "the directory names no defaultNamingContext: set directory.base_dn".into(),
                )
            })
    }

    /// One paged search under `base_dn` (`what` names it in errors: "user search"), handing
    /// each entry to `on_entry`, which may end the search with an error; returns the pages.
    async fn paged_search(
        &self,
        ldap: &mut Ldap,
        base_dn: &str,
        what: &str,
        filter: &str,
        attributes: &[&str],
        mut on_entry: impl FnMut(Option<RawEntry>) -> Result<(), DirectoryError>,
    ) -> Result<u32, DirectoryError> {
        let page_size = i32::try_from(self.page_size).unwrap_or(1000);
        let mut cookie: Vec<u8> = Vec::new();
        let (mut pages, mut empty_in_a_row) = (0u32, 0u32);
        loop {
            pages += 1;
            let step = format!("page {pages} of the {what}");
            // Critical: a server that cannot page must fail, not answer with a truncated list.
            let control: RawControl = PagedResults {
                size: page_size,
                cookie: std::mem::take(&mut cookie),
            }
            .critical()
            .into();
            let search = ldap
                .with_controls(control)
                .with_timeout(self.timeout)
                .search(base_dn, Scope::Subtree, filter, attributes.to_vec());
            let SearchResult(entries, result) = tokio::time::timeout(self.timeout, search)
                .await
                .map_err(|_| self.timeout_error(&step))?
                .map_err(|e| self.op_error(&step, e))?;
            if result.rc != 0 {
                let hint = match result.rc {
                    32 => ": is directory.base_dn right?",
                    10 => ": the base DN is in another domain",
                    _ => "",
                };
                return Err(self.search_error(
                    base_dn,
                    format!(
                        "{what}: {} ({}) {}{hint}",
                        result_name(result.rc),
                        result.rc,
                        one_line(&result.text)
                    ),
                ));
            }
            if entries.is_empty() {
                empty_in_a_row += 1;
            } else {
                empty_in_a_row = 0;
            }
            for entry in entries {
                if entry.is_ref() || entry.is_intermediate() {
                    continue;
                }
                on_entry(parse_entry(&entry.0))?;
            }
            let control = result.ctrls.iter().find(|c| c.1.ctype == PAGED_RESULTS_OID);
            let Some(control) = control else {
                // The server did not page (it answered the whole search at once).
                break;
            };
            let next = control
                .1
                .val
                .as_deref()
                .and_then(paged_cookie)
                .ok_or_else(|| {
                    self.search_error(base_dn, format!("{what}: malformed paged-results control"))
                })?;
            if next.is_empty() {
                break;
            }
            if next.len() > MAX_COOKIE_BYTES {
                return Err(self.search_error(
                    base_dn,
                    format!("{what}: a paging cookie of {} bytes", next.len()),
                ));
            }
            if empty_in_a_row > MAX_EMPTY_PAGES {
                return Err(self.search_error(
                    base_dn,
                    format!("{what}: {empty_in_a_row} empty pages in a row: the server is looping"),
                ));
            }
            cookie = next;
        }
        Ok(pages)
    }

    /// Every user under `base_dn`, in pages; also the number of pages and of entries skipped.
    /// Each user's memberOf is still its direct groups here.
    async fn search_users(
        &self,
        ldap: &mut Ldap,
        base_dn: &str,
    ) -> Result<(Vec<v1::DirectoryUser>, u32, u32), DirectoryError> {
        let mut users: Vec<v1::DirectoryUser> = Vec::new();
        let mut seen: HashSet<Vec<u8>> = HashSet::new();
        let mut skipped = 0u32;
        let pages = self
            .paged_search(
                ldap,
                base_dn,
                "user search",
                USER_FILTER,
                &USER_ATTRIBUTES,
                |raw| {
                    let user = raw.as_ref().and_then(|raw| {
                        let user = to_user(raw).ok()?;
                        let direct = raw.values("memberOf").filter(|v| !v.is_empty()).count();
                        if direct > MAX_MEMBER_OF {
                            warn!(
                                user = %user.sam_account_name,
                                groups = direct,
                                kept = MAX_MEMBER_OF,
                                "a user is a direct member of more groups than the agent sends: \
                                 it is sent with the first {MAX_MEMBER_OF} in sorted order"
                            );
                        }
                        Some(user)
                    });
                    match user {
                        Some(user) if seen.insert(user.object_guid.clone()) => users.push(user),
                        _ => skipped += 1,
                    }
                    if users.len() + skipped as usize > self.max_users {
                        return Err(DirectoryError::TooManyUsers {
                            max: self.max_users,
                            base_dn: base_dn.to_owned(),
                        });
                    }
                    Ok(())
                },
            )
            .await?;
        Ok((users, pages, skipped))
    }

    /// Every group under `base_dn` with the groups it is a direct member of. A failure fails
    /// the read: resolving nesting from part of the directory could miss an exclusion group.
    async fn search_groups(
        &self,
        ldap: &mut Ldap,
        base_dn: &str,
    ) -> Result<(GroupGraph, u32), DirectoryError> {
        let mut graph = GroupGraph::new();
        let pages = self
            .paged_search(
                ldap,
                base_dn,
                "group search",
                GROUP_FILTER,
                &GROUP_ATTRIBUTES,
                |raw| {
                    // A group entry that does not parse names no group to follow; skip it as the
                    // user search skips a user without a GUID.
                    let Some(raw) = raw else { return Ok(()) };
                    graph
                        .add_entry(&raw)
                        .map_err(|full| DirectoryError::TooManyGroups {
                            what: match full {
                                Full::Groups => format!("{MAX_DIRECTORY_GROUPS} groups"),
                                Full::Links => format!("{MAX_GROUP_LINKS} group memberships"),
                            },
                            base_dn: base_dn.to_owned(),
                        })
                },
            )
            .await?;
        Ok((graph, pages))
    }
}

/// Replaces each user's direct memberOf with every group they are in, nested included, and
/// warns for a user in more than [`MAX_MEMBER_OF`] groups (sent with the first in sorted order).
pub(super) fn resolve_nesting(users: &mut [v1::DirectoryUser], graph: &GroupGraph) {
    for user in users {
        let closure = graph.closure(user.member_of.iter().map(String::as_str));
        if closure.total > closure.groups.len() {
            warn!(
                user = %user.sam_account_name,
                groups = closure.total,
                kept = closure.groups.len(),
                "a user is in more groups (nested included) than the agent sends: it is sent \
                 with the first {MAX_MEMBER_OF} in sorted order"
            );
        }
        user.member_of = closure.groups;
    }
}

/// One read, start to end.
pub(super) async fn run(plan: Plan) -> Result<DirectoryReadResult, DirectoryError> {
    let read_at = SystemTime::now();
    let mut settings = LdapConnSettings::new()
        .set_conn_timeout(plan.timeout)
        .set_starttls(plan.starttls);
    if let Some(config) = &plan.tls {
        settings = settings.set_config(config.clone());
    }
    let (conn, mut ldap) = LdapConnAsync::with_settings(settings, &plan.url)
        .await
        .map_err(|e| plan.connect_error(e))?;
    let _driver = AbortOnDrop(tokio::spawn(async move {
        if let Err(e) = conn.drive().await {
            debug!(error = %e, "directory connection ended");
        }
    }));
    plan.bind(&mut ldap).await?;
    let base_dn = match &plan.base_dn {
        Some(base) => base.clone(),
        None => plan.default_naming_context(&mut ldap).await?,
    };
    let (mut users, pages, skipped) = plan.search_users(&mut ldap, &base_dn).await?;
    let (groups, group_pages) = plan.search_groups(&mut ldap, &base_dn).await?;
    debug!(
        groups = groups.groups(),
        pages = group_pages,
        "directory groups read"
    );
    resolve_nesting(&mut users, &groups);
    // Courtesy only: the read is complete whatever the unbind does.
    let _ = tokio::time::timeout(plan.timeout, ldap.unbind()).await;
    Ok(DirectoryReadResult {
        directory: domain_of(&base_dn),
        base_dn,
        read_at,
        users,
        pages,
        skipped,
    })
}

/// Ends the connection's driver task when the read ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// === TLS ===

/// rustls with the ring provider, named explicitly: with more than one provider compiled into
/// a build (the collector's HTTP client brings another), rustls cannot pick a default.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_config(settings: &DirectorySettings) -> Result<Arc<ClientConfig>, DirectoryError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| DirectoryError::Internal(format!("TLS set-up: {e}")))?;
    let config = if settings.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate { provider }))
            .with_no_client_auth()
    } else {
        let roots = match &settings.ca_file {
            Some(path) => ca_roots(path)?,
            None => {
                let mut roots = RootCertStore::empty();
                let native = rustls_native_certs::load_native_certs();
                let (added, _) = roots.add_parsable_certificates(native.certs);
                debug!(roots = added, "directory TLS trusts the platform's store");
                roots
            }
        };
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// The certificates of a PEM file as the only trust anchors.
fn ca_roots(path: &std::path::Path) -> Result<RootCertStore, DirectoryError> {
    let err = |message: String| DirectoryError::CaFile {
        path: path.to_owned(),
        message,
    };
    let pem = read_small_file(path).map_err(|e| err(e.to_string()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| err(format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in it".into()));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| err(format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// `insecure_skip_verify`: accepts any certificate for any name, but still checks that the
/// server holds the key of the certificate it showed (the handshake signatures).
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

// === helpers ===

/// The host of an `ldap://` or `ldaps://` URL (an IPv6 literal without its brackets).
fn host_of(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        authority.split(':').next().unwrap_or_default()
    };
    Some(host.to_owned())
}

fn is_handshake_eof(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
    )
}

/// What Active Directory's `data NNN` in an invalidCredentials answer means.
fn bind_hint(text: &str) -> String {
    let code = text
        .split("data ")
        .nth(1)
        .map(|rest| {
            rest.chars()
                .take_while(char::is_ascii_hexdigit)
                .collect::<String>()
        })
        .unwrap_or_default();
    let meaning = match code.to_ascii_lowercase().as_str() {
        "525" => "no such account",
        "52e" => "wrong password (or no such account)",
        "530" => "the account may not log on at this time",
        "531" => "the account may not log on from this workstation",
        "532" => "the account's password has expired",
        "533" => "the account is disabled",
        "701" => "the account has expired",
        "773" => "the account must change its password",
        "775" => "the account is locked out",
        _ => "",
    };
    if !meaning.is_empty() {
        format!(": {meaning} (AD data {code})")
    } else if text.trim().is_empty() {
        String::new()
    } else {
        format!(" ({})", one_line(text))
    }
}

/// Server text made one short line.
fn one_line(text: &str) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    flat.trim().to_owned()
}

/// RFC 4511's names for the result codes a read may meet.
fn result_name(rc: u32) -> &'static str {
    match rc {
        1 => "operationsError",
        2 => "protocolError",
        3 => "timeLimitExceeded",
        4 => "sizeLimitExceeded",
        7 => "authMethodNotSupported",
        8 => "strongerAuthRequired",
        10 => "referral",
        11 => "adminLimitExceeded",
        12 => "unavailableCriticalExtension",
        13 => "confidentialityRequired",
        32 => "noSuchObject",
        34 => "invalidDNSyntax",
        48 => "inappropriateAuthentication",
        49 => "invalidCredentials",
        50 => "insufficientAccessRights",
        51 => "busy",
        52 => "unavailable",
        53 => "unwillingToPerform",
        80 => "other",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_come_out_of_urls() {
        let h = |u: &str| host_of(u);
        assert_eq!(
            h("ldaps://dc1.corp.example:636").as_deref(),
            Some("dc1.corp.example")
        );
        assert_eq!(h("ldap://198.18.0.10").as_deref(), Some("198.18.0.10"));
        assert_eq!(h("ldaps://198.18.0.10/").as_deref(), Some("198.18.0.10"));
        assert_eq!(
            h("ldaps://[2001:db8::1]:636").as_deref(),
            Some("2001:db8::1")
        );
        assert_eq!(h("ldaps://").as_deref(), Some(""));
        assert_eq!(h("dc1"), None);
    }

    #[test]
    fn ad_bind_answers_are_explained() {
        let text = "80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext error, \
                    data 52e, v4563";
        assert_eq!(
            bind_hint(text),
            ": wrong password (or no such account) (AD data 52e)"
        );
        assert!(bind_hint("... data 533, v1db1").contains("disabled"));
        assert!(bind_hint("... data 775, v1db1").contains("locked out"));
        assert_eq!(bind_hint(""), "");
        assert_eq!(bind_hint("Invalid\ncredentials"), " (Invalid credentials)");
    }

    fn settings(dir: &std::path::Path) -> DirectorySettings {
        let password = dir.join("pw");
        std::fs::write(&password, "pw-Zq7-never-logged\n").expect("write");
        DirectorySettings {
            enabled: true,
            url: Some("ldaps://198.18.0.10".into()),
            bind_dn: Some("census@lab".into()),
            password_file: Some(password),
            insecure_skip_verify: true,
            ..DirectorySettings::default()
        }
    }

    #[test]
    fn a_plan_checks_what_validate_checks() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = settings(tmp.path());
        let plan = Plan::new(&s).expect("valid");
        assert_eq!(plan.host, "198.18.0.10");
        assert!(plan.tls.is_some());
        assert!(
            !format!("{plan:?}").contains("pw-Zq7"),
            "no password in Debug"
        );
        let plain = DirectorySettings {
            url: Some("ldap://198.18.0.10".into()),
            ..s.clone()
        };
        let err = Plan::new(&plain).expect_err("plaintext").to_string();
        assert!(err.contains("in clear"), "{err}");
        let allowed = DirectorySettings {
            allow_plaintext: true,
            ..plain.clone()
        };
        assert!(Plan::new(&allowed).expect("by consent").tls.is_none());
        let starttls = DirectorySettings {
            starttls: true,
            ..plain
        };
        assert!(Plan::new(&starttls).expect("starttls").tls.is_some());
        let big = DirectorySettings {
            page_size: 5000,
            ..s.clone()
        };
        assert!(Plan::new(&big).is_err());
    }

    #[test]
    fn ca_files_must_hold_certificates() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").expect("write");
        let err = ca_roots(&path).expect_err("no PEM").to_string();
        assert!(err.contains("no PEM certificate"), "{err}");
        std::fs::write(
            &path,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let err = ca_roots(&path).expect_err("not a certificate").to_string();
        assert!(err.contains("ca_file"), "{err}");
        let err = ca_roots(&tmp.path().join("missing.pem"))
            .expect_err("missing")
            .to_string();
        assert!(err.contains("missing.pem"), "{err}");
    }

    /// A directory whose certificate (issued by a CA the agent trusts) names the DC only in its
    /// subject CN, with no subjectAltName, as older AD CS templates issue them: rustls accepts it
    /// for no name, and the error must say the certificate needs reissuing with a SAN rather
    /// than ask for a name it does not hold. A real TLS handshake on loopback.
    #[test]
    fn a_certificate_without_subject_alt_name_must_be_reissued() {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        use rustls::{ServerConfig, ServerConnection};

        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Census test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA cert");
        let issuer = Issuer::new(ca_params, ca_key);
        let dc_key = KeyPair::generate().expect("DC key");
        let mut dc_params = CertificateParams::new(Vec::<String>::new()).expect("DC params");
        dc_params
            .distinguished_name
            .push(DnType::CommonName, "127.0.0.1");
        let dc_cert = dc_params.signed_by(&dc_key, &issuer).expect("DC cert");

        let server_config = Arc::new(
            ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_no_client_auth()
                .with_single_cert(
                    vec![dc_cert.der().clone()],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(dc_key.serialize_der())),
                )
                .expect("server config"),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        // One handshake, then the thread ends (bounded by the socket timeouts).
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            let timeout = Some(std::time::Duration::from_secs(20));
            stream.set_read_timeout(timeout).expect("timeout");
            stream.set_write_timeout(timeout).expect("timeout");
            let mut conn = ServerConnection::new(server_config).expect("server connection");
            while conn.is_handshaking() {
                if conn.complete_io(&mut stream).is_err() {
                    break;
                }
            }
        });

        let tmp = tempfile::tempdir().expect("tempdir");
        let ca_file = tmp.path().join("ca.pem");
        std::fs::write(&ca_file, ca_cert.pem()).expect("write CA");
        let settings = DirectorySettings {
            url: Some(format!("ldaps://127.0.0.1:{port}")),
            insecure_skip_verify: false,
            ca_file: Some(ca_file),
            timeout_ms: 20_000,
            ..settings(tmp.path())
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let err = runtime
            .block_on(super::super::read(
                &settings,
                &tokio_util::sync::CancellationToken::new(),
            ))
            .expect_err("no name to verify");
        server.join().expect("server thread");
        assert!(
            matches!(err, DirectoryError::NoSubjectAltName { .. }),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("has no subjectAltName (SAN)")
                && text.contains(
                    "reissue the domain controller's certificate with a SAN naming 127.0.0.1"
                )
                && !text.contains("put a name the certificate holds"),
            "{text}"
        );
    }
}
