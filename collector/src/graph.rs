//! Microsoft 365 / Entra ID users, read by the collector from Microsoft Graph (issue 5; BRIEF:
//! "Users: what a billable user is"). This file owns the HTTP side: the OAuth2 client
//! credentials token (cached per tenant until shortly before it expires), `GET /v1.0/users`
//! with `$select` following `@odata.nextLink` to the end (asking for `signInActivity` first,
//! and again without it when the tenant refuses it: it needs Entra ID P1), and throttling (429
//! and 503 obey `Retry-After`; backoff with jitter otherwise). Everything is bounded: a timeout on every
//! request, a cap on pages, users, body size, attempts and each wait, and a deadline on the
//! whole read. The access token is only ever sent to the configured Graph origin: a next-page
//! link elsewhere is refused, and redirects are not followed.
//!
//! Layout (the submodules are I/O-free and re-exported here):
//! - `settings`: [`GraphSettings`] per client and where its secret is read from.
//! - `wire`: parsing what Graph and the login endpoint send ([`parse_users_page`], [`GraphUser`]).
//! - `decide`: the billable decision per user ([`decide`], [`LicencePolicy`], [`Decision`]).
//! - `join`: the hybrid join keys between AD and Entra accounts ([`join_key_ad`],
//!   [`join_key_graph`]).
//! - `backoff`: how long to wait before a retry.
//!
//! ## How the collector is meant to call this (the wiring lives elsewhere)
//! - Keep one [`GraphHttp`] for the daemon: it pools connections and caches tokens per tenant.
//! - Store [`GraphSettings`] with the client's configuration; check them with
//!   [`GraphSettings::validated`] when they are set, so bad settings are refused at the door
//!   (the `validate` subcommand can show its lines).
//! - On the client's schedule, under the root shutdown token (the read is cancel-safe: it has
//!   no effect but the token cache, so dropping it mid-way loses nothing):
//!   `tokio::select! { r = read_tenant(&settings, &http) => …, () = shutdown.cancelled() => … }`.
//! - On `Ok`: `let policy = read.licence_policy(&settings)`, then [`decide`] each user; store
//!   each user with its decision as evidence (a user absent from a complete read stops
//!   counting, with history kept); show [`LicencePolicy::unmatched`] part numbers to the
//!   operator.
//! - On `Err`: keep the previous users and counts, mark them stale, and show the error: one
//!   line naming the tenant, never the secret or the token.
//! - Hybrid users count once: an AD account and an Entra user that share a [`JoinKey`]
//!   ([`join_key_ad`] / [`join_key_graph`]) are one person.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::Mutex,
    time::Duration,
};

use reqwest::{
    StatusCode, Url,
    header::{ACCEPT, AUTHORIZATION, HeaderValue, RETRY_AFTER},
};
use tokio::time::Instant;
use tracing::{debug, info, warn};

mod backoff;
mod decide;
mod join;
mod settings;
mod wire;

#[cfg(test)]
mod tests;

pub use decide::{Decision, LicencePolicy, decide};
pub use join::{
    JoinKey, ad_bytes_from_guid_string, ad_guid_from_immutable_id, canonical_sid,
    guid_string_from_ad_bytes, immutable_id_from_ad_guid, join_key_ad, join_key_graph,
    sid_from_bytes,
};
pub(crate) use settings::humantime_serde_compat;
pub use settings::{
    ClientSecret, DEFAULT_GRAPH_BASE_URL, DEFAULT_LOGIN_BASE_URL, DEFAULT_TIMEOUT, GraphSettings,
    SecretSource, SettingsError, SettingsErrors,
};
pub use wire::{
    AadError, GraphUser, MAX_STRING, PageError, SubscribedSku, UsersPage, graph_time_ms,
    parse_skus, parse_users_page,
};

/// Page size asked of Graph (its maximum for `/users`).
const PAGE_SIZE: u32 = 999;
/// Page size asked when selecting `signInActivity`: Graph's maximum then (it serves at most 120
/// users a page with sign-in activity, whatever `$top` says).
const SIGN_IN_PAGE_SIZE: u32 = 120;
/// The token scope for the public cloud, also used with a plain-http test server.
const DEFAULT_SCOPE: &str = "https://graph.microsoft.com/.default";
/// A token is renewed this long before it expires (or at half its life, if that is shorter).
const TOKEN_MARGIN: Duration = Duration::from_secs(5 * 60);
/// Longest token lifetime believed (Entra's are about an hour).
const MAX_TOKEN_LIFE: Duration = Duration::from_secs(24 * 3600);

/// Bounds on one read, the same for every client. The defaults suit the largest MSP clients;
/// tests shrink them.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphLimits {
    /// Most pages of users read; more is an error (5,000 pages: 600,000 users at the 120 a page
    /// Graph serves with sign-in activity).
    pub max_pages: u32,
    /// Most users read; more is an error.
    pub max_users: usize,
    /// Most attempts of one request (throttled, 5xx, or a transport failure mid-read).
    pub max_attempts: u32,
    /// Longest single wait, whatever `Retry-After` asks.
    pub max_wait: Duration,
    /// First backoff step when the server does not say how long to wait.
    pub backoff_base: Duration,
    /// Longest backoff step.
    pub backoff_cap: Duration,
    /// The whole read, waits included, must finish within this.
    pub deadline: Duration,
    /// Largest response body read (a page of 999 users is about 1 MB).
    pub max_body_bytes: usize,
}

impl Default for GraphLimits {
    fn default() -> Self {
        GraphLimits {
            max_pages: 5_000,
            max_users: 500_000,
            max_attempts: 8,
            max_wait: Duration::from_secs(120),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(60),
            deadline: Duration::from_secs(30 * 60),
            max_body_bytes: 32 * 1024 * 1024,
        }
    }
}

/// Which side a request went to, for errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Login,
    Graph,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Endpoint::Login => "the Entra ID login endpoint",
            Endpoint::Graph => "Microsoft Graph",
        })
    }
}

/// Why a read failed, in one line naming the tenant. Never contains the secret or a token.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("{0}")]
    Settings(#[from] SettingsErrors),
    #[error("cannot read the client secret for tenant {tenant}: {reason}")]
    Secret { tenant: String, reason: String },
    #[error(
        "Graph refused the client secret for tenant {tenant}: it is wrong or expired ({detail}){hint}"
    )]
    SecretRejected {
        tenant: String,
        detail: String,
        hint: &'static str,
    },
    #[error(
        "the Entra ID login endpoint refused a token for tenant {tenant} (HTTP {status}): {detail}"
    )]
    TokenRefused {
        tenant: String,
        status: u16,
        detail: String,
    },
    #[error(
        "Microsoft Graph refused a fresh access token for tenant {tenant} (HTTP 401): {detail}"
    )]
    Unauthorized { tenant: String, detail: String },
    #[error(
        "Microsoft Graph denied reading {resource} for tenant {tenant} (HTTP 403: {detail}): grant the app the {permission} application permission, with admin consent"
    )]
    Forbidden {
        tenant: String,
        resource: &'static str,
        permission: &'static str,
        detail: String,
    },
    #[error("{endpoint} answered HTTP {status} for tenant {tenant}: {detail}")]
    Status {
        tenant: String,
        endpoint: Endpoint,
        status: u16,
        detail: String,
    },
    #[error("cannot reach {endpoint} at {origin} for tenant {tenant}: {reason}")]
    Unreachable {
        tenant: String,
        endpoint: Endpoint,
        origin: String,
        reason: String,
    },
    #[error(
        "{endpoint} at {origin} did not answer within {timeout} for tenant {tenant} (one request's limit: raise `timeout` in the client's [clients.<name>.graph] settings)"
    )]
    Timeout {
        tenant: String,
        endpoint: Endpoint,
        origin: String,
        timeout: String,
    },
    #[error(
        "{endpoint} still answered HTTP {status} for tenant {tenant} after {attempts} attempts: giving up until the next read"
    )]
    GaveUp {
        tenant: String,
        endpoint: Endpoint,
        status: u16,
        attempts: u32,
    },
    #[error(
        "reading tenant {tenant} did not finish within {deadline} (waited {waited} for throttling and retries; the whole read's limit: raise the collector's --graph-read-deadline, graph_read_deadline in its config): giving up until the next read"
    )]
    Deadline {
        tenant: String,
        deadline: String,
        waited: String,
    },
    #[error(
        "Microsoft Graph sent a next-page link to {link_origin} for tenant {tenant}: refused, the access token is only sent to {graph_origin}"
    )]
    ForeignNextLink {
        tenant: String,
        link_origin: String,
        graph_origin: String,
    },
    #[error("Microsoft Graph sent the same next-page link twice for tenant {tenant}: refused")]
    NextLinkLoop { tenant: String },
    #[error(
        "tenant {tenant} has more than {max} pages of users: refused (the cap guards against a runaway listing)"
    )]
    TooManyPages { tenant: String, max: u32 },
    #[error(
        "tenant {tenant} has more than {max} users: refused (the cap guards against a runaway listing)"
    )]
    TooManyUsers { tenant: String, max: usize },
    #[error("{endpoint} sent an unreadable reply for tenant {tenant}: {detail}")]
    BadReply {
        tenant: String,
        endpoint: Endpoint,
        detail: String,
    },
    #[error("cannot set up the HTTPS client: {0}")]
    Client(String),
}

/// One complete read of a tenant's users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantUsers {
    /// Every user, once each, in Graph's order.
    pub users: Vec<GraphUser>,
    /// The tenant's subscribed SKUs (empty if Graph would not list them and the allow-list
    /// needs no part numbers).
    pub skus: Vec<SubscribedSku>,
    /// Pages of users read.
    pub pages: u32,
    /// Entries skipped because they had no usable id.
    pub skipped: usize,
    /// Entries dropped because their id was already read.
    pub duplicates: usize,
    /// Time spent waiting for throttling and retries.
    pub waited: Duration,
    /// `None` when the read had the tenant's sign-in activity; else why Graph refused it.
    pub sign_in_refused: Option<String>,
}

impl TenantUsers {
    /// The client's allow-list resolved against this tenant's SKUs, for [`decide`].
    pub fn licence_policy(&self, settings: &GraphSettings) -> LicencePolicy {
        LicencePolicy::new(&settings.licence_allow_list, &self.skus)
    }
}

// === impl GraphHttp ===

/// The collector's HTTPS client for Entra ID and Graph: one per daemon, shared by every
/// client's reads. It caches access tokens per (login endpoint, tenant, app, scope).
#[derive(Debug)]
pub struct GraphHttp {
    client: reqwest::Client,
    limits: GraphLimits,
    tokens: Mutex<HashMap<TokenKey, CachedToken>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TokenKey {
    login: String,
    tenant: String,
    client_id: String,
    scope: String,
}

#[derive(Clone)]
struct CachedToken {
    /// `Bearer …`, marked sensitive.
    header: HeaderValue,
    renew_at: Instant,
}

impl fmt::Debug for CachedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedToken")
            .field("header", &"<redacted>")
            .field("renew_at", &self.renew_at)
            .finish()
    }
}

impl GraphHttp {
    /// A client with the default [`GraphLimits`].
    pub fn new() -> Result<Self, GraphError> {
        Self::with_limits(GraphLimits::default())
    }

    /// A client with the given limits.
    pub fn with_limits(limits: GraphLimits) -> Result<Self, GraphError> {
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls_config()?)
            .user_agent(concat!("census-collector/", env!("CARGO_PKG_VERSION")))
            // A redirect could carry the request (and its token) elsewhere: none are followed.
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| GraphError::Client(error_chain(&e)))?;
        Ok(GraphHttp {
            client,
            limits,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    fn cached(&self, key: &TokenKey) -> Option<HeaderValue> {
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens
            .get(key)
            .filter(|t| Instant::now() < t.renew_at)
            .map(|t| t.header.clone())
    }

    fn remember(&self, key: TokenKey, token: CachedToken) {
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens.retain(|_, t| Instant::now() < t.renew_at);
        tokens.insert(key, token);
    }

    fn forget(&self, key: &TokenKey) {
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens.remove(key);
    }
}

/// TLS for Entra ID and Graph: rustls with the ring provider (the one the agent's LDAP client
/// uses, so the workspace builds a single crypto library; given explicitly, so no process-wide
/// default is installed) and the platform verifier (the OS trust store, where an MSP's
/// TLS-inspecting proxy CA would be).
fn tls_config() -> Result<rustls::ClientConfig, GraphError> {
    use rustls_platform_verifier::BuilderVerifierExt;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_platform_verifier())
        .map_err(|e| GraphError::Client(e.to_string()))?
        .with_no_client_auth();
    Ok(config)
}

/// Reads every user of the tenant in `settings`. See [`read_tenant`], which also returns the
/// tenant's SKUs (to name licences and resolve part numbers) and how the read went.
pub async fn read_users(
    settings: &GraphSettings,
    http: &GraphHttp,
) -> Result<Vec<GraphUser>, GraphError> {
    Ok(read_tenant(settings, http).await?.users)
}

/// Reads the tenant's subscribed SKUs, then every user, page by page, to the end. Either the
/// whole listing is returned or an error: never a partial list, which would look like users
/// leaving.
#[tracing::instrument(name = "graph_read", skip_all, fields(tenant = %settings.tenant_id))]
pub async fn read_tenant(
    settings: &GraphSettings,
    http: &GraphHttp,
) -> Result<TenantUsers, GraphError> {
    let settings = settings.clone().validated()?;
    let mut session = Session::new(&settings, http)?;

    let skus = match session.subscribed_skus().await {
        Ok(skus) => skus,
        // Without part numbers in the allow-list, SKUs only name licences in reasons: a
        // tenant that will not list them (no Organization.Read.All) is still read.
        Err(
            e @ (GraphError::Forbidden { .. }
            | GraphError::Status { .. }
            | GraphError::BadReply { .. }),
        ) if !settings.allow_list_has_part_numbers() => {
            debug!(error = %e, "licences will be shown by SKU id only");
            Vec::new()
        }
        Err(e) => return Err(e),
    };

    let mut read = session.users().await?;
    read.skus = skus;
    read.waited = session.waited;
    info!(
        users = read.users.len(),
        pages = read.pages,
        skipped = read.skipped,
        waited = ?read.waited,
        sign_in_activity = read.sign_in_refused.is_none(),
        "read Entra ID users"
    );
    Ok(read)
}

// === impl Session ===

/// One read of one tenant: its deadline, what has answered, and time spent waiting.
struct Session<'a> {
    settings: &'a GraphSettings,
    http: &'a GraphHttp,
    login_base: Url,
    graph_base: Url,
    token_key: TokenKey,
    deadline: Instant,
    /// Whether each endpoint has answered during this read: a transport failure is retried
    /// only after it has. A host that never answered is reported at once (an unreachable
    /// Graph fails within one timeout); a blip in the middle of 400 pages does not throw the
    /// listing away.
    answered: [bool; 2],
    waited: Duration,
}

/// What came back from a request that is not retried.
struct Reply {
    status: StatusCode,
    body: Vec<u8>,
    request_id: Option<String>,
}

impl Reply {
    /// A Graph error body in one line, with Graph's request id for a support ticket.
    fn graph_detail(&self) -> String {
        let detail = wire::graph_error_detail(&self.body);
        match &self.request_id {
            Some(id) => format!("{detail} (request-id {id})"),
            None => detail,
        }
    }
}

/// The resources read, with the permission each needs.
#[derive(Clone, Copy)]
enum Resource {
    Users,
    Skus,
}

impl Resource {
    fn name(self) -> &'static str {
        match self {
            Resource::Users => "users",
            Resource::Skus => "subscribed SKUs",
        }
    }

    fn permission(self) -> &'static str {
        match self {
            Resource::Users => "User.Read.All",
            Resource::Skus => "Organization.Read.All",
        }
    }
}

impl<'a> Session<'a> {
    fn new(settings: &'a GraphSettings, http: &'a GraphHttp) -> Result<Self, GraphError> {
        // Validated settings parse; a failure here is a bug, reported as a settings problem.
        let parse = |field: &'static str, url: &str| {
            Url::parse(url).map_err(|_| {
                GraphError::Settings(SettingsErrors(vec![SettingsError::BaseUrl {
                    field,
                    url: url.to_owned(),
                    why: "not a URL",
                }]))
            })
        };
        let login_base = parse("login_base_url", &settings.login_base_url)?;
        let graph_base = parse("graph_base_url", &settings.graph_base_url)?;
        let scope = if graph_base.scheme() == "https" {
            format!("{}/.default", graph_base.origin().ascii_serialization())
        } else {
            DEFAULT_SCOPE.to_owned()
        };
        let token_key = TokenKey {
            login: settings.login_base_url.clone(),
            tenant: settings.tenant_id.clone(),
            client_id: settings.client_id.clone(),
            scope,
        };
        Ok(Session {
            settings,
            http,
            login_base,
            graph_base,
            token_key,
            deadline: Instant::now() + http.limits.deadline,
            answered: [false; 2],
            waited: Duration::ZERO,
        })
    }

    fn tenant(&self) -> String {
        self.settings.tenant_id.clone()
    }

    fn origin(&self, endpoint: Endpoint) -> String {
        match endpoint {
            Endpoint::Login => self.login_base.origin().ascii_serialization(),
            Endpoint::Graph => self.graph_base.origin().ascii_serialization(),
        }
    }

    fn deadline_error(&self) -> GraphError {
        GraphError::Deadline {
            tenant: self.tenant(),
            deadline: humantime::format_duration(self.http.limits.deadline).to_string(),
            waited: humantime::format_duration(round_ms(self.waited)).to_string(),
        }
    }

    fn transport_error(&self, endpoint: Endpoint, e: &reqwest::Error) -> GraphError {
        if e.is_timeout() {
            GraphError::Timeout {
                tenant: self.tenant(),
                endpoint,
                origin: self.origin(endpoint),
                timeout: humantime::format_duration(self.settings.timeout).to_string(),
            }
        } else {
            GraphError::Unreachable {
                tenant: self.tenant(),
                endpoint,
                origin: self.origin(endpoint),
                reason: innermost(e),
            }
        }
    }

    /// Sends the request `make` builds until it gets an answer that is not retried: 429, 500,
    /// 502, 503 and 504 are retried after `Retry-After` or backoff, transport failures too once
    /// the endpoint has answered in this read; all within the attempt cap and the deadline.
    async fn execute(
        &mut self,
        endpoint: Endpoint,
        make: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<Reply, GraphError> {
        let limits = &self.http.limits;
        let mut attempt = 0u32;
        loop {
            if Instant::now() >= self.deadline {
                return Err(self.deadline_error());
            }
            attempt += 1;
            let failure = match make().timeout(self.settings.timeout).send().await {
                Ok(mut response) => {
                    self.answered[endpoint as usize] = true;
                    let status = response.status();
                    if retryable(status) {
                        let asked = backoff::retry_after(
                            response
                                .headers()
                                .get(RETRY_AFTER)
                                .and_then(|v| v.to_str().ok()),
                        );
                        Failure::Status(status, asked)
                    } else {
                        let request_id = response
                            .headers()
                            .get("request-id")
                            .and_then(|v| v.to_str().ok())
                            .map(|v| wire::cap(v, 64));
                        match read_body(&mut response, limits.max_body_bytes).await {
                            Ok(body) => {
                                return Ok(Reply {
                                    status,
                                    body,
                                    request_id,
                                });
                            }
                            Err(BodyError::TooLarge) => {
                                return Err(GraphError::BadReply {
                                    tenant: self.tenant(),
                                    endpoint,
                                    detail: format!(
                                        "the body is larger than {} bytes",
                                        limits.max_body_bytes
                                    ),
                                });
                            }
                            Err(BodyError::Transport(e)) => Failure::Transport(e),
                        }
                    }
                }
                Err(e) => Failure::Transport(e),
            };

            let asked = match &failure {
                Failure::Transport(e) if !self.answered[endpoint as usize] => {
                    return Err(self.transport_error(endpoint, e));
                }
                Failure::Transport(_) => None,
                Failure::Status(_, asked) => *asked,
            };
            if attempt >= limits.max_attempts {
                return Err(match failure {
                    Failure::Transport(e) => self.transport_error(endpoint, &e),
                    Failure::Status(status, _) => GraphError::GaveUp {
                        tenant: self.tenant(),
                        endpoint,
                        status: status.as_u16(),
                        attempts: attempt,
                    },
                });
            }
            let wait = backoff::wait_before_retry(
                asked,
                attempt - 1,
                limits.backoff_base,
                limits.backoff_cap,
                limits.max_wait,
                rand::random::<f64>(),
            );
            if Instant::now() + wait > self.deadline {
                return Err(self.deadline_error());
            }
            match &failure {
                // Throttling is Graph's normal flow control: worth a line, not a warning.
                Failure::Status(status, Some(_)) => info!(
                    %endpoint, status = status.as_u16(), ?wait, attempt,
                    "throttled: waiting as Retry-After asks"
                ),
                Failure::Status(status, None) => warn!(
                    %endpoint, status = status.as_u16(), ?wait, attempt,
                    "server busy or failing: backing off"
                ),
                Failure::Transport(e) => warn!(
                    %endpoint, error = %innermost(e), ?wait, attempt,
                    "request failed mid-read: backing off"
                ),
            }
            tokio::time::sleep(wait).await;
            self.waited += wait;
        }
    }

    /// An access token for Graph: cached, or fetched with the client credentials.
    async fn token(&mut self) -> Result<HeaderValue, GraphError> {
        if let Some(header) = self.http.cached(&self.token_key) {
            return Ok(header);
        }
        let secret = self
            .settings
            .client_secret
            .load()
            .map_err(|reason| GraphError::Secret {
                tenant: self.tenant(),
                reason,
            })?;
        let url = format!(
            "{}/{}/oauth2/v2.0/token",
            self.settings.login_base_url, self.settings.tenant_id
        );
        let scope = self.token_key.scope.clone();
        let form = [
            ("client_id", self.settings.client_id.as_str()),
            ("client_secret", secret.expose()),
            ("scope", scope.as_str()),
            ("grant_type", "client_credentials"),
        ];
        let client = self.http.client.clone();
        let asked_at = Instant::now();
        let reply = self
            .execute(Endpoint::Login, || client.post(&url).form(&form))
            .await?;
        match reply.status.as_u16() {
            200 => {}
            400 | 401 => {
                return Err(match wire::parse_aad_error(&reply.body) {
                    Some(e) if e.is_bad_secret() => GraphError::SecretRejected {
                        tenant: self.tenant(),
                        detail: e.detail(),
                        hint: if e.codes.contains(&7000215) {
                            "; check that the configured secret is its Value, not its Secret ID"
                        } else {
                            ""
                        },
                    },
                    Some(e) => GraphError::TokenRefused {
                        tenant: self.tenant(),
                        status: reply.status.as_u16(),
                        detail: e.detail(),
                    },
                    None => GraphError::TokenRefused {
                        tenant: self.tenant(),
                        status: reply.status.as_u16(),
                        detail: wire::graph_error_detail(&reply.body),
                    },
                });
            }
            status => {
                return Err(GraphError::Status {
                    tenant: self.tenant(),
                    endpoint: Endpoint::Login,
                    status,
                    detail: reply.graph_detail(),
                });
            }
        }
        let token = wire::parse_token(&reply.body).map_err(|detail| GraphError::BadReply {
            tenant: self.tenant(),
            endpoint: Endpoint::Login,
            detail,
        })?;
        let mut header =
            HeaderValue::from_str(&format!("Bearer {}", token.access_token)).map_err(|_| {
                GraphError::BadReply {
                    tenant: self.tenant(),
                    endpoint: Endpoint::Login,
                    detail: "the access token is not a valid header value".to_owned(),
                }
            })?;
        header.set_sensitive(true);
        if let Some(secs) = token.expires_in {
            let life = Duration::from_secs(secs).min(MAX_TOKEN_LIFE);
            let margin = TOKEN_MARGIN.min(life / 2);
            self.http.remember(
                self.token_key.clone(),
                CachedToken {
                    header: header.clone(),
                    renew_at: asked_at + (life - margin),
                },
            );
        }
        debug!(expires_in = ?token.expires_in, "got an access token");
        Ok(header)
    }

    /// GETs a Graph URL with the token; a 401 gets one fresh token and one more try.
    async fn get(&mut self, url: &str, resource: Resource) -> Result<Vec<u8>, GraphError> {
        let mut fresh = false;
        loop {
            let token = self.token().await?;
            let client = self.http.client.clone();
            let reply = self
                .execute(Endpoint::Graph, || {
                    client
                        .get(url)
                        .header(AUTHORIZATION, token.clone())
                        .header(ACCEPT, "application/json")
                })
                .await?;
            match reply.status.as_u16() {
                200 => return Ok(reply.body),
                401 if !fresh => {
                    // Revoked or expired early: forget it and ask once for another.
                    self.http.forget(&self.token_key);
                    fresh = true;
                }
                401 => {
                    return Err(GraphError::Unauthorized {
                        tenant: self.tenant(),
                        detail: reply.graph_detail(),
                    });
                }
                403 => {
                    return Err(GraphError::Forbidden {
                        tenant: self.tenant(),
                        resource: resource.name(),
                        permission: resource.permission(),
                        detail: reply.graph_detail(),
                    });
                }
                status => {
                    return Err(GraphError::Status {
                        tenant: self.tenant(),
                        endpoint: Endpoint::Graph,
                        status,
                        detail: reply.graph_detail(),
                    });
                }
            }
        }
    }

    async fn subscribed_skus(&mut self) -> Result<Vec<SubscribedSku>, GraphError> {
        let url = format!("{}/v1.0/subscribedSkus", self.settings.graph_base_url);
        let body = self.get(&url, Resource::Skus).await?;
        wire::parse_skus(&body).map_err(|e| GraphError::BadReply {
            tenant: self.tenant(),
            endpoint: Endpoint::Graph,
            detail: format!("subscribedSkus: {e}"),
        })
    }

    async fn users(&mut self) -> Result<TenantUsers, GraphError> {
        let limits = self.http.limits.clone();
        let select_url = |select: &str, top: u32| {
            format!(
                "{}/v1.0/users?$select={select}&$top={top}",
                self.settings.graph_base_url
            )
        };
        let mut url = select_url(wire::USER_SELECT_WITH_SIGN_IN, SIGN_IN_PAGE_SIZE);
        let mut read = TenantUsers {
            users: Vec::new(),
            skus: Vec::new(),
            pages: 0,
            skipped: 0,
            duplicates: 0,
            waited: Duration::ZERO,
            sign_in_refused: None,
        };
        let mut with_sign_in = true;
        let mut seen = HashSet::new();
        loop {
            if read.pages >= limits.max_pages {
                return Err(GraphError::TooManyPages {
                    tenant: self.tenant(),
                    max: limits.max_pages,
                });
            }
            let body = match self.get(&url, Resource::Users).await {
                Ok(body) => body,
                // Sign-in activity needs Entra ID P1 and AuditLog.Read.All: a tenant without
                // them refuses the page that asks for it. Every tenant is still read (the
                // licence decides alone there); the read asks again next time, so a tenant
                // that gains P1 is picked up without a setting.
                Err(GraphError::Forbidden { detail, .. }) if with_sign_in && read.pages == 0 => {
                    info!(
                        %detail,
                        "sign-in activity refused (it needs Entra ID P1 and AuditLog.Read.All): reading users without it; the stale-logon rule does not apply to this tenant's users"
                    );
                    read.sign_in_refused = Some(wire::cap(&detail, wire::MAX_DETAIL));
                    with_sign_in = false;
                    url = select_url(wire::USER_SELECT, PAGE_SIZE);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let page = parse_users_page(&body).map_err(|e| GraphError::BadReply {
                tenant: self.tenant(),
                endpoint: Endpoint::Graph,
                detail: format!("users page {}: {e}", read.pages + 1),
            })?;
            read.pages += 1;
            read.skipped += page.skipped;
            for mut user in page.users {
                user.sign_in_read = with_sign_in;
                if seen.insert(user.id.clone()) {
                    read.users.push(user);
                } else {
                    read.duplicates += 1;
                }
            }
            if read.users.len() > limits.max_users {
                return Err(GraphError::TooManyUsers {
                    tenant: self.tenant(),
                    max: limits.max_users,
                });
            }
            debug!(
                page = read.pages,
                users = read.users.len(),
                "read a page of users"
            );
            match page.next_link {
                None => break,
                Some(next) => {
                    self.check_next_link(&next)?;
                    if next == url {
                        return Err(GraphError::NextLinkLoop {
                            tenant: self.tenant(),
                        });
                    }
                    url = next;
                }
            }
        }
        if read.skipped > 0 || read.duplicates > 0 {
            warn!(
                skipped = read.skipped,
                duplicates = read.duplicates,
                "Graph listed entries without an id or twice; they were left out"
            );
        }
        Ok(read)
    }

    /// A next-page link must stay on the configured Graph origin, under its base path: the
    /// token goes with it.
    fn check_next_link(&self, link: &str) -> Result<(), GraphError> {
        let url = Url::parse(link).map_err(|_| GraphError::BadReply {
            tenant: self.tenant(),
            endpoint: Endpoint::Graph,
            detail: format!("@odata.nextLink {:?} is not a URL", wire::cap(link, 120)),
        })?;
        let base_path = self.graph_base.path().trim_end_matches('/');
        let same = url.origin() == self.graph_base.origin()
            && url.username().is_empty()
            && url.password().is_none()
            && url.path().starts_with(base_path);
        if same {
            Ok(())
        } else {
            Err(GraphError::ForeignNextLink {
                tenant: self.tenant(),
                link_origin: wire::cap(&url.origin().ascii_serialization(), 120),
                graph_origin: self.origin(Endpoint::Graph),
            })
        }
    }
}

/// Why an attempt did not produce a final answer.
enum Failure {
    Status(StatusCode, Option<Duration>),
    Transport(reqwest::Error),
}

fn retryable(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 500 | 502 | 503 | 504)
}

enum BodyError {
    TooLarge,
    Transport(reqwest::Error),
}

/// Reads a body up to `max` bytes, without trusting `Content-Length`.
async fn read_body(response: &mut reqwest::Response, max: usize) -> Result<Vec<u8>, BodyError> {
    if response
        .content_length()
        .is_some_and(|len| len > max as u64)
    {
        return Err(BodyError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Transport)? {
        if body.len() + chunk.len() > max {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The innermost cause of a transport error ("Connection refused (os error 111)"), which says
/// more than reqwest's "error sending request".
fn innermost(e: &reqwest::Error) -> String {
    let mut inner: &dyn std::error::Error = e;
    while let Some(source) = inner.source() {
        inner = source;
    }
    wire::cap(&inner.to_string(), wire::MAX_DETAIL)
}

/// Every cause of an error, joined.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut inner = e.source();
    while let Some(source) = inner {
        out.push_str(": ");
        out.push_str(&source.to_string());
        inner = source.source();
    }
    out
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
