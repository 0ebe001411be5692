//! Per-client Microsoft Graph settings: which tenant, which app, where its secret lives, which
//! licences make a user billable. [`GraphSettings::validated`] checks them and puts them in
//! their canonical form, with one line per problem; the secret itself is read only when a token
//! is needed ([`SecretSource::load`]), so a rotated secret file is picked up without a restart.

use std::{
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use reqwest::Url;
use serde::{Deserialize, Serialize};

use super::wire::{cap, is_guid};

/// Default Entra ID login endpoint (the public cloud).
pub const DEFAULT_LOGIN_BASE_URL: &str = "https://login.microsoftonline.com";
/// Default Microsoft Graph endpoint (the public cloud).
pub const DEFAULT_GRAPH_BASE_URL: &str = "https://graph.microsoft.com";
/// Default timeout of each HTTP request (connect, send, and read the whole body).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Shortest and longest request timeout accepted.
pub const TIMEOUT_RANGE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(300));
/// Largest secret file read, in bytes: a client secret is about 40 characters.
const MAX_SECRET_BYTES: u64 = 4096;
/// Longest SKU part number accepted in an allow-list (Microsoft's are under 40 characters).
const MAX_PART_NUMBER: usize = 64;

/// How the collector reads one client's Entra ID users through Microsoft Graph.
///
/// In TOML (how the per-client configuration is meant to hold it):
/// ```toml
/// tenant_id = "contoso.onmicrosoft.com"          # or the tenant GUID
/// client_id = "6731de76-14a6-49ae-97bc-6eba6914391e"
/// client_secret = { file = "/etc/census/secrets/contoso-graph" }  # or { env = "CONTOSO_GRAPH_SECRET" }
/// licence_allow_list = ["SPE_E3", "cbdc14ab-d96c-4c30-b9f4-6ada7cdc1d46"]
/// timeout = "30s"
/// ```
/// The secret is never held here, only where to read it: `Debug` and logs show a file path or
/// a variable name, never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphSettings {
    /// The client's tenant: its GUID or one of its domains (`contoso.onmicrosoft.com`).
    pub tenant_id: String,
    /// The application (client) id of the app registration, with the `User.Read.All`
    /// application permission (and `Organization.Read.All` to name licences by part number).
    pub client_id: String,
    /// Where the app's client secret is read from.
    pub client_secret: SecretSource,
    /// Entra ID login endpoint; other clouds (or a test server) change it.
    #[serde(default = "default_login")]
    pub login_base_url: String,
    /// Microsoft Graph endpoint; other clouds (or a test server) change it. Access tokens are
    /// only ever sent to this origin.
    #[serde(default = "default_graph")]
    pub graph_base_url: String,
    /// Licences that make a user billable: SKU ids (GUIDs) or SKU part numbers (`SPE_E3`).
    /// Empty means any licence.
    #[serde(default)]
    pub licence_allow_list: Vec<String>,
    /// Timeout of each HTTP request.
    #[serde(default = "default_timeout", with = "humantime_serde_compat")]
    pub timeout: Duration,
}

fn default_login() -> String {
    DEFAULT_LOGIN_BASE_URL.to_owned()
}
fn default_graph() -> String {
    DEFAULT_GRAPH_BASE_URL.to_owned()
}
fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}

impl GraphSettings {
    /// Settings with the default endpoints, timeout, and an empty allow-list (any licence).
    pub fn new(tenant_id: &str, client_id: &str, client_secret: SecretSource) -> Self {
        GraphSettings {
            tenant_id: tenant_id.to_owned(),
            client_id: client_id.to_owned(),
            client_secret,
            login_base_url: default_login(),
            graph_base_url: default_graph(),
            licence_allow_list: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Checks every setting and returns them in canonical form: ids lower-case, base URLs
    /// without a trailing `/`, SKU ids lower-case, the allow-list deduplicated. Every problem
    /// is reported, one line each.
    pub fn validated(mut self) -> Result<Self, SettingsErrors> {
        let mut problems = Vec::new();

        let tenant = self.tenant_id.trim().to_ascii_lowercase();
        if ["common", "organizations", "consumers"].contains(&tenant.as_str()) {
            problems.push(SettingsError::TenantAlias(tenant.clone()));
        } else if !(is_guid(&tenant) || is_domain(&tenant)) {
            problems.push(SettingsError::TenantId(cap(&self.tenant_id, 80)));
        }
        self.tenant_id = tenant;

        let client = self.client_id.trim().to_ascii_lowercase();
        if !is_guid(&client) {
            problems.push(SettingsError::ClientId(cap(&self.client_id, 80)));
        }
        self.client_id = client;

        if let Err(why) = self.client_secret.check() {
            problems.push(SettingsError::Secret(why));
        }

        for (field, url) in [
            ("login_base_url", &mut self.login_base_url),
            ("graph_base_url", &mut self.graph_base_url),
        ] {
            match check_base_url(url) {
                Ok(canonical) => *url = canonical,
                Err(why) => problems.push(SettingsError::BaseUrl {
                    field,
                    url: cap(url, 120),
                    why,
                }),
            }
        }

        let mut allow = Vec::with_capacity(self.licence_allow_list.len());
        for entry in &self.licence_allow_list {
            let entry = entry.trim();
            if is_guid(entry) {
                allow.push(entry.to_ascii_lowercase());
            } else if is_part_number(entry) {
                allow.push(entry.to_owned());
            } else {
                problems.push(SettingsError::Licence(cap(entry, 80)));
            }
        }
        allow.sort();
        allow.dedup_by(|a, b| a.eq_ignore_ascii_case(b));
        self.licence_allow_list = allow;

        if !(TIMEOUT_RANGE.0..=TIMEOUT_RANGE.1).contains(&self.timeout) {
            problems.push(SettingsError::Timeout(
                humantime::format_duration(self.timeout).to_string(),
            ));
        }

        if problems.is_empty() {
            Ok(self)
        } else {
            Err(SettingsErrors(problems))
        }
    }

    /// Whether the allow-list names a licence by part number, which needs the tenant's
    /// subscribed SKUs (and the `Organization.Read.All` permission) to resolve.
    pub fn allow_list_has_part_numbers(&self) -> bool {
        self.licence_allow_list.iter().any(|e| !is_guid(e))
    }
}

/// A domain name usable as a tenant (`contoso.onmicrosoft.com`): it goes into a URL path, so
/// only letters, digits, `-` and dots between non-empty labels.
fn is_domain(s: &str) -> bool {
    s.len() <= 253
        && s.contains('.')
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// A SKU part number as Microsoft writes them: `SPE_E3`, `O365_BUSINESS_PREMIUM`,
/// `Microsoft_365_E5_(no_Teams)`, `O365_w/o_Teams_Bundle_M3`: printable ASCII, no spaces.
fn is_part_number(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_PART_NUMBER && s.bytes().all(|b| b.is_ascii_graphic())
}

/// Checks a base URL and returns it without a trailing `/`. Plain `http` is allowed only to a
/// loopback address (a test server): a token never crosses a network in clear.
fn check_base_url(raw: &str) -> Result<String, &'static str> {
    let url = Url::parse(raw.trim()).map_err(|_| "not a URL")?;
    let host = url.host_str().ok_or("it has no host")?;
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|a| a.is_loopback());
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        "http" => return Err("it must use https (plain http only to a loopback test server)"),
        _ => return Err("it must be an https URL"),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("it must not carry a user name or password");
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("it must not have a query or fragment");
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// Where a client secret is read from. Never the secret itself: configuration files get copied,
/// pasted into tickets and logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SecretSource {
    /// A file holding the secret (surrounding whitespace and a final newline are ignored).
    File(PathBuf),
    /// An environment variable of the collector's process holding the secret.
    Env(String),
}

impl SecretSource {
    /// Checks the source without reading the secret.
    fn check(&self) -> Result<(), String> {
        match self {
            SecretSource::File(path) if path.as_os_str().is_empty() => {
                Err("the secret file path is empty".to_owned())
            }
            SecretSource::File(_) => Ok(()),
            SecretSource::Env(name)
                if name.is_empty()
                    || name.len() > 128
                    || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') =>
            {
                Err(format!(
                    "{:?} is not an environment variable name (letters, digits and _)",
                    cap(name, 80)
                ))
            }
            SecretSource::Env(_) => Ok(()),
        }
    }

    /// Reads the secret. The error names the file or the variable, never the secret.
    pub fn load(&self) -> Result<ClientSecret, String> {
        let text = match self {
            SecretSource::File(path) => read_secret_file(path)?,
            SecretSource::Env(name) => std::env::var(name).map_err(|e| match e {
                std::env::VarError::NotPresent => {
                    format!("the environment variable {name} is not set")
                }
                std::env::VarError::NotUnicode(_) => {
                    format!("the environment variable {name} is not valid UTF-8")
                }
            })?,
        };
        let secret = text.trim();
        if secret.is_empty() {
            return Err(format!("{self} is empty"));
        }
        if secret.chars().any(char::is_control) {
            return Err(format!("{self} holds control characters"));
        }
        Ok(ClientSecret(secret.to_owned()))
    }
}

fn read_secret_file(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let file = std::fs::File::open(path)
        .map_err(|e| format!("cannot read the secret file {}: {e}", path.display()))?;
    let mut text = String::new();
    file.take(MAX_SECRET_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read the secret file {}: {e}", path.display()))?;
    if text.len() as u64 > MAX_SECRET_BYTES {
        return Err(format!(
            "the secret file {} is larger than {MAX_SECRET_BYTES} bytes: is it the right file?",
            path.display()
        ));
    }
    Ok(text)
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::File(path) => write!(f, "the secret file {}", path.display()),
            SecretSource::Env(name) => write!(f, "the environment variable {name}"),
        }
    }
}

/// A client secret, read for one token request. `Debug` redacts it and there is no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientSecret(String);

impl ClientSecret {
    /// The secret, for the token request body only.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientSecret(<redacted>)")
    }
}

/// One problem with [`GraphSettings`], in one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error(
        "tenant_id {0:?} is not a tenant GUID or one of its domains (like contoso.onmicrosoft.com)"
    )]
    TenantId(String),
    #[error(
        "tenant_id {0:?} is a multi-tenant alias: client credentials need the client's own tenant id or domain"
    )]
    TenantAlias(String),
    #[error("client_id {0:?} is not an application (client) id: expected a GUID")]
    ClientId(String),
    #[error("client_secret: {0}")]
    Secret(String),
    #[error("{field} {url:?} is not usable: {why}")]
    BaseUrl {
        field: &'static str,
        url: String,
        why: &'static str,
    },
    #[error(
        "licence_allow_list entry {0:?} is neither a SKU id (a GUID) nor a SKU part number (like SPE_E3)"
    )]
    Licence(String),
    #[error("timeout must be between 1s and 5m, not {0}")]
    Timeout(String),
}

/// Every problem found in [`GraphSettings`], one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsErrors(pub Vec<SettingsError>);

impl fmt::Display for SettingsErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SettingsErrors {}

/// `timeout = "30s"` in TOML, through humantime.
pub(crate) mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(text.trim()).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> GraphSettings {
        GraphSettings::new(
            "Contoso.onmicrosoft.com",
            "6731DE76-14a6-49ae-97bc-6eba6914391e",
            SecretSource::Env("CONTOSO_GRAPH_SECRET".into()),
        )
    }

    #[test]
    fn canonical_form() {
        let mut s = good();
        s.graph_base_url = "https://graph.microsoft.com/".into();
        s.licence_allow_list = vec![
            "SPE_E3".into(),
            " 05E9A617-0261-4CEE-BB44-138D3EF5D965 ".into(),
            "spe_e3".into(),
        ];
        let s = s.validated().expect("valid");
        assert_eq!(s.tenant_id, "contoso.onmicrosoft.com");
        assert_eq!(s.client_id, "6731de76-14a6-49ae-97bc-6eba6914391e");
        assert_eq!(s.graph_base_url, "https://graph.microsoft.com");
        assert_eq!(
            s.licence_allow_list,
            vec!["05e9a617-0261-4cee-bb44-138d3ef5d965", "SPE_E3"]
        );
        assert!(s.allow_list_has_part_numbers());
    }

    #[test]
    fn every_problem_one_line_each() {
        let mut s = good();
        s.tenant_id = "common".into();
        s.client_id = "my app".into();
        s.client_secret = SecretSource::Env("NOT A NAME".into());
        s.login_base_url = "http://login.example.com".into();
        s.graph_base_url = "https://user:pw@graph.example.com".into();
        s.licence_allow_list = vec!["E3 licence".into()];
        s.timeout = Duration::from_millis(10);
        let err = s.validated().expect_err("invalid");
        assert_eq!(err.0.len(), 7, "{err}");
        let text = err.to_string();
        assert_eq!(text.lines().count(), 7, "{text}");
        assert!(text.contains("multi-tenant alias"), "{text}");
        assert!(text.contains("login_base_url"), "{text}");
        assert!(text.contains("must use https"), "{text}");
    }

    #[test]
    fn tenant_in_a_url_path_cannot_escape_it() {
        for bad in ["../x", "contoso/..", "a b.com", "x?y.com", "", "-a.com"] {
            let mut s = good();
            s.tenant_id = bad.into();
            assert!(s.validated().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn http_only_to_loopback() {
        for ok in [
            "http://127.0.0.1:8080",
            "http://[::1]:1",
            "http://localhost:9",
            "https://graph.microsoft.us",
        ] {
            let mut s = good();
            s.graph_base_url = ok.into();
            assert!(s.validated().is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.1",
            "ftp://127.0.0.1",
            "graph.microsoft.com",
            "https://g.example/?x=1",
        ] {
            let mut s = good();
            s.graph_base_url = bad.into();
            assert!(s.validated().is_err(), "{bad}");
        }
    }

    #[test]
    fn secret_never_in_debug() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret");
        std::fs::write(&path, "s3cr3t-value\n").expect("write");
        let source = SecretSource::File(path);
        let secret = source.load().expect("loads");
        assert_eq!(secret.expose(), "s3cr3t-value");
        assert!(!format!("{secret:?}").contains("s3cr3t"));
        let mut s = good();
        s.client_secret = source;
        assert!(!format!("{s:?}").contains("s3cr3t"));
    }

    #[test]
    fn secret_errors_name_the_source() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = SecretSource::File(dir.path().join("nope"));
        assert!(missing.load().expect_err("missing").contains("nope"));
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").expect("write");
        let err = SecretSource::File(empty).load().expect_err("empty");
        assert!(err.contains("is empty"), "{err}");
        let unset = SecretSource::Env("CENSUS_TEST_SURELY_UNSET_SECRET_VAR".into());
        assert!(unset.load().expect_err("unset").contains("not set"));
    }

    #[test]
    fn toml_shape() {
        let s: GraphSettings = toml::from_str(
            r#"
            tenant_id = "contoso.onmicrosoft.com"
            client_id = "6731de76-14a6-49ae-97bc-6eba6914391e"
            client_secret = { file = "/etc/census/secrets/contoso-graph" }
            licence_allow_list = ["SPE_E3"]
            timeout = "45s"
            "#,
        )
        .expect("parses");
        assert_eq!(
            s.client_secret,
            SecretSource::File("/etc/census/secrets/contoso-graph".into())
        );
        assert_eq!(s.timeout, Duration::from_secs(45));
        assert_eq!(s.graph_base_url, DEFAULT_GRAPH_BASE_URL);
        assert!(s.validated().is_ok());
        let unknown = toml::from_str::<GraphSettings>(
            r#"
            tenant_id = "t.example"
            client_id = "6731de76-14a6-49ae-97bc-6eba6914391e"
            client_secret = { env = "X" }
            secret_value = "inline"
            "#,
        );
        assert!(unknown.is_err());
    }
}
