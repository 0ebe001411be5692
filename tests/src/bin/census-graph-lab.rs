//! `census-graph-lab --fixture FILE [--listen 127.0.0.1:0]`: a local HTTP server that answers
//! as Entra ID's token endpoint and Microsoft Graph do, for the end-to-end tests of the
//! collector's Entra ID reader (Graph itself cannot be reached from here; BRIEF: "Testing
//! against the real thing"). It prints `listening on ADDR` once it listens, then one line per
//! request it answers.
//!
//! It serves what the fixture (JSON, read again on every request, so a test can change it while
//! the server runs) says:
//! ```json
//! { "tenant": "contoso.onmicrosoft.com", "client_id": "…", "client_secret": "…",
//!   "secret_expired": false, "page_size": 3, "throttle_page": 2, "retry_after": 1,
//!   "skus": [{"skuId": "…", "skuPartNumber": "SPE_E3"}],
//!   "users": [{ Graph user objects as /v1.0/users returns them }] }
//! ```
//! - `POST /{tenant}/oauth2/v2.0/token` (client credentials): a bearer token for the right
//!   secret; Entra's own 401 replies for an expired secret (AADSTS7000222) or a wrong one.
//! - `GET /v1.0/subscribedSkus`: the SKUs.
//! - `GET /v1.0/users?$select=…&$top=N`: the users in pages of `page_size` linked by
//!   `@odata.nextLink` (`$skiptoken`), only the `$select`ed fields; page `throttle_page` first
//!   answers 429 with `Retry-After: retry_after` (once per listing). With `"busy": true`
//!   every users request answers 503 with `Retry-After: retry_after` (a Graph that stays
//!   down longer than anyone waits); with `"no_premium": true` a request that selects
//!   `signInActivity` answers 403 as Graph does for a tenant without Entra ID P1.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::{Context, Result, bail};
use axum::{
    Form, Router,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Debug, Deserialize)]
struct Fixture {
    tenant: String,
    client_id: String,
    client_secret: String,
    #[serde(default)]
    secret_expired: bool,
    #[serde(default = "default_page_size")]
    page_size: usize,
    /// The page (from 1) that answers 429 once per listing; 0 for none.
    #[serde(default)]
    throttle_page: usize,
    #[serde(default = "default_retry_after")]
    retry_after: u64,
    /// Every users request answers 503 with Retry-After.
    #[serde(default)]
    busy: bool,
    /// Selecting signInActivity is refused (403), as on a tenant without Entra ID P1.
    #[serde(default)]
    no_premium: bool,
    #[serde(default)]
    skus: Vec<Value>,
    #[serde(default)]
    users: Vec<Value>,
}

fn default_page_size() -> usize {
    100
}
fn default_retry_after() -> u64 {
    1
}

struct Server {
    fixture: PathBuf,
    /// Tokens handed out; each token's listing is throttled once.
    issued: AtomicU64,
    /// The listing (token number) whose throttled page already answered 429.
    throttled_for: AtomicU64,
}

impl Server {
    /// The fixture as it is now; an unreadable one is a 500 naming why.
    fn fixture(&self) -> Result<Fixture, Box<Response>> {
        let broken = |message: String| {
            Box::new(reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": {"code": "fixture", "message": message}}),
            ))
        };
        let text = std::fs::read_to_string(&self.fixture).map_err(|e| broken(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| broken(e.to_string()))
    }

    /// The token number of a request's bearer token, if it is one of ours.
    fn bearer(&self, headers: &HeaderMap) -> Option<u64> {
        let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let n: u64 = v.strip_prefix("Bearer lab-token-")?.parse().ok()?;
        (n >= 1 && n <= self.issued.load(Ordering::SeqCst)).then_some(n)
    }
}

fn reply(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn unauthorized() -> Response {
    reply(
        StatusCode::UNAUTHORIZED,
        json!({"error": {"code": "InvalidAuthenticationToken", "message": "Access token validation failure."}}),
    )
}

async fn token(
    State(server): State<Arc<Server>>,
    Path(tenant): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let f = match server.fixture() {
        Ok(f) => f,
        Err(r) => return *r,
    };
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or_default();
    if !tenant.eq_ignore_ascii_case(&f.tenant) {
        println!("token: unknown tenant {tenant}");
        return reply(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_request", "error_description": format!("AADSTS90002: Tenant '{tenant}' not found."), "error_codes": [90002]}),
        );
    }
    if field("grant_type") != "client_credentials" || field("client_id") != f.client_id {
        println!("token: bad request");
        return reply(
            StatusCode::BAD_REQUEST,
            json!({"error": "unauthorized_client", "error_description": "AADSTS700016: Application not found in the directory.", "error_codes": [700016]}),
        );
    }
    if field("client_secret") != f.client_secret {
        println!("token: wrong secret");
        return reply(
            StatusCode::UNAUTHORIZED,
            json!({"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided.", "error_codes": [7000215]}),
        );
    }
    if f.secret_expired {
        println!("token: expired secret");
        return reply(
            StatusCode::UNAUTHORIZED,
            json!({"error": "invalid_client", "error_description": format!("AADSTS7000222: The provided client secret keys for app '{}' are expired.", f.client_id), "error_codes": [7000222]}),
        );
    }
    let n = server.issued.fetch_add(1, Ordering::SeqCst) + 1;
    println!("token: issued {n}");
    reply(
        StatusCode::OK,
        json!({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": format!("lab-token-{n}")}),
    )
}

async fn skus(State(server): State<Arc<Server>>, headers: HeaderMap) -> Response {
    if server.bearer(&headers).is_none() {
        return unauthorized();
    }
    match server.fixture() {
        Ok(f) => {
            println!("skus: {}", f.skus.len());
            reply(StatusCode::OK, json!({"value": f.skus}))
        }
        Err(r) => *r,
    }
}

async fn users(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Some(listing) = server.bearer(&headers) else {
        return unauthorized();
    };
    let f = match server.fixture() {
        Ok(f) => f,
        Err(r) => return *r,
    };
    let top: usize = q
        .get("$top")
        .and_then(|t| t.parse().ok())
        .unwrap_or(100)
        .min(f.page_size.max(1));
    let skip: usize = q
        .get("$skiptoken")
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let page = skip / top + 1;
    let select: Vec<String> = q
        .get("$select")
        .map(|s| s.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    if f.busy {
        println!("users: page {page} busy");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [
                (header::CONTENT_TYPE, "application/json".to_owned()),
                (header::RETRY_AFTER, f.retry_after.to_string()),
            ],
            json!({"error": {"code": "ServiceUnavailable", "message": "Service unavailable."}})
                .to_string(),
        )
            .into_response();
    }
    if f.no_premium && select.iter().any(|s| s == "signInActivity") {
        println!("users: signInActivity refused (no Entra ID P1)");
        return reply(
            StatusCode::FORBIDDEN,
            json!({"error": {"code": "Authentication_RequestFromNonPremiumTenantOrB2CTenant", "message": "Neither tenant is B2C or tenant doesn't have premium license"}}),
        );
    }
    if page == f.throttle_page && server.throttled_for.swap(listing, Ordering::SeqCst) != listing {
        println!("users: page {page} throttled");
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [
                (header::CONTENT_TYPE, "application/json".to_owned()),
                (header::RETRY_AFTER, f.retry_after.to_string()),
            ],
            json!({"error": {"code": "TooManyRequests", "message": "Too many requests."}})
                .to_string(),
        )
            .into_response();
    }
    let value: Vec<Value> = f
        .users
        .iter()
        .skip(skip)
        .take(top)
        .map(|u| match u.as_object() {
            Some(o) if !select.is_empty() => Value::Object(
                o.iter()
                    .filter(|(k, _)| select.iter().any(|s| s == *k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
            _ => u.clone(),
        })
        .collect();
    let mut body = json!({"@odata.context": "https://graph.microsoft.com/v1.0/$metadata#users", "value": value});
    if skip + top < f.users.len() {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("127.0.0.1");
        body["@odata.nextLink"] = json!(format!(
            "http://{host}/v1.0/users?$select={}&$top={top}&$skiptoken={}",
            select.join(","),
            skip + top
        ));
    }
    println!("users: page {page}, {} users", value.len());
    reply(StatusCode::OK, body)
}

fn args() -> Result<(PathBuf, SocketAddr)> {
    let mut fixture = None;
    let mut listen: SocketAddr = "127.0.0.1:0".parse()?;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--fixture" => fixture = it.next().map(PathBuf::from),
            "--listen" => listen = it.next().context("--listen needs an address")?.parse()?,
            other => bail!(
                "unknown argument {other:?}: usage: census-graph-lab --fixture FILE [--listen ADDR]"
            ),
        }
    }
    let fixture = fixture.context("usage: census-graph-lab --fixture FILE [--listen ADDR]")?;
    if !listen.ip().is_loopback() {
        bail!("census-graph-lab listens on loopback only, not {listen}");
    }
    Ok((fixture, listen))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let (fixture, listen) = args()?;
    let server = Arc::new(Server {
        fixture,
        issued: AtomicU64::new(0),
        throttled_for: AtomicU64::new(0),
    });
    let app = Router::new()
        .route("/{tenant}/oauth2/v2.0/token", post(token))
        .route("/v1.0/subscribedSkus", get(skus))
        .route("/v1.0/users", get(users))
        .with_state(server);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
