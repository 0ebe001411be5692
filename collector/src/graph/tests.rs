//! The Graph reader against a local server on 127.0.0.1 serving Entra ID and Graph-shaped
//! replies: a token endpoint (which refuses an expired secret as Entra does), three pages of
//! users linked by `@odata.nextLink` with a 429 and a 503 in the middle, members and guests,
//! licensed and unlicensed, disabled and hostile entries. Also: a next-page link to another
//! host, a closed port, a server that never answers, a missing permission, a Graph that stays
//! down. The only timing asserted is "waited at least what Retry-After asked".

use std::{
    collections::HashMap,
    future::Future,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Form, Router,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{any, get, post},
};
use serde_json::{Value, json};

use super::*;

const TENANT: &str = "contoso.onmicrosoft.com";
const CLIENT_ID: &str = "6731de76-14a6-49ae-97bc-6eba6914391e";
const GOOD_SECRET: &str = "Zx8Q~good.secret-value";
const EXPIRED_SECRET: &str = "Ab3Q~expired.secret-value";
const TOKEN: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.test.token";
const E3: &str = "05e9a617-0261-4cee-bb44-138d3ef5d965";
const SPB: &str = "cbdc14ab-d96c-4c30-b9f4-6ada7cdc1d46";
const PBI: &str = "a403ebcc-fae0-4ca2-8c8c-7a907fd6c235";
const ERIN_SID: &str = "S-1-5-21-1004336348-1177238915-682003330-1105";
const ERIN_GUID: &str = "bc7b1a3c-7289-4e3d-a2bf-4b7d1a6b4d4f";
const ERIN_IMMUTABLE: &str = "PBp7vIlyPU6iv0t9GmtNTw==";

/// What the fake serves, and what it saw.
#[derive(Default)]
struct Fake {
    base: String,
    /// Page 1's nextLink, instead of page 2 on this server.
    foreign_next: Option<String>,
    /// `/users` answers 403 as for an app without User.Read.All.
    forbid_users: bool,
    /// `/users` answers 503 forever.
    always_503: bool,
    /// `/users` refuses `signInActivity` (403) as Graph does on a tenant without Entra ID P1.
    no_premium: bool,
    /// The `$select` of every `/users` request, in order.
    selects: Mutex<Vec<String>>,
    token_requests: AtomicUsize,
    graph_requests: AtomicUsize,
    throttled: AtomicBool,
    failed_once: AtomicBool,
    throttled_at: Mutex<Option<Instant>>,
    resumed_at: Mutex<Option<Instant>>,
    first_query: Mutex<Option<HashMap<String, String>>>,
}

fn json_reply(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn token(
    State(fake): State<Arc<Fake>>,
    Path(tenant): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    fake.token_requests.fetch_add(1, Ordering::SeqCst);
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or_default();
    assert_eq!(tenant, TENANT);
    assert_eq!(field("grant_type"), "client_credentials");
    assert_eq!(field("scope"), "https://graph.microsoft.com/.default");
    assert_eq!(field("client_id"), CLIENT_ID);
    match field("client_secret") {
        GOOD_SECRET => json_reply(
            StatusCode::OK,
            json!({ "token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": TOKEN }),
        ),
        EXPIRED_SECRET => json_reply(
            StatusCode::UNAUTHORIZED,
            json!({
                "error": "invalid_client",
                "error_description": format!("AADSTS7000222: The provided client secret keys for app '{CLIENT_ID}' are expired. Visit the Azure portal to create new keys for your app: https://aka.ms/NewClientSecret, or consider using certificate credentials for added security: https://aka.ms/certCreds.\r\nTrace ID: 0b3a4f3e-8d2c-4e55-9a1d-3c0f2b7e6d00\r\nCorrelation ID: 5e1f0c2a-7b3d-4c8e-9f6a-1d2e3f4a5b6c\r\nTimestamp: 2024-05-02 10:11:12Z"),
                "error_codes": [7000222],
                "timestamp": "2024-05-02 10:11:12Z",
                "trace_id": "0b3a4f3e-8d2c-4e55-9a1d-3c0f2b7e6d00",
                "correlation_id": "5e1f0c2a-7b3d-4c8e-9f6a-1d2e3f4a5b6c",
                "error_uri": "https://login.microsoftonline.com/error?code=7000222"
            }),
        ),
        _ => json_reply(
            StatusCode::UNAUTHORIZED,
            json!({ "error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided.", "error_codes": [7000215] }),
        ),
    }
}

fn authorized(headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {TOKEN}"))
}

fn unauthorized() -> Response {
    json_reply(
        StatusCode::UNAUTHORIZED,
        json!({ "error": { "code": "InvalidAuthenticationToken", "message": "Access token validation failure." } }),
    )
}

async fn skus(State(fake): State<Arc<Fake>>, headers: HeaderMap) -> Response {
    fake.graph_requests.fetch_add(1, Ordering::SeqCst);
    if !authorized(&headers) {
        return unauthorized();
    }
    json_reply(
        StatusCode::OK,
        json!({
            "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#subscribedSkus",
            "value": [
                { "capabilityStatus": "Enabled", "consumedUnits": 5, "skuId": E3, "skuPartNumber": "SPE_E3", "appliesTo": "User" },
                { "capabilityStatus": "Enabled", "consumedUnits": 1, "skuId": SPB, "skuPartNumber": "SPB", "appliesTo": "User" },
                { "capabilityStatus": "Enabled", "consumedUnits": 9, "skuId": PBI, "skuPartNumber": "POWER_BI_STANDARD", "appliesTo": "User" }
            ]
        }),
    )
}

fn user(id: &str, upn: &str, kind: &str, enabled: bool, skus: &[&str]) -> Value {
    json!({
        "id": id,
        "displayName": upn.split('@').next(),
        "userPrincipalName": upn,
        "accountEnabled": enabled,
        "userType": kind,
        "assignedLicenses": skus.iter().map(|s| json!({ "disabledPlans": [], "skuId": s })).collect::<Vec<_>>(),
        "onPremisesSecurityIdentifier": null,
        "onPremisesImmutableId": null,
        "onPremisesSyncEnabled": null,
        "createdDateTime": "2022-01-10T09:00:00Z"
    })
}

async fn users(
    State(fake): State<Arc<Fake>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    fake.graph_requests.fetch_add(1, Ordering::SeqCst);
    if !authorized(&headers) {
        return unauthorized();
    }
    if fake.forbid_users {
        return json_reply(
            StatusCode::FORBIDDEN,
            json!({ "error": { "code": "Authorization_RequestDenied", "message": "Insufficient privileges to complete the operation." } }),
        );
    }
    if fake.always_503 {
        return (StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable").into_response();
    }
    let select = query.get("$select").cloned().unwrap_or_default();
    fake.selects.lock().expect("lock").push(select.clone());
    if fake.no_premium && select.split(',').any(|f| f == "signInActivity") {
        return json_reply(
            StatusCode::FORBIDDEN,
            json!({ "error": { "code": "Authentication_RequestFromNonPremiumTenantOrB2CTenant", "message": "Neither tenant is B2C or tenant doesn't have premium license" } }),
        );
    }
    let next = |token: &str| {
        format!(
            "{}/v1.0/users?$select={select}&$top=999&$skiptoken={token}",
            fake.base,
        )
    };
    match query.get("$skiptoken").map(String::as_str) {
        None => {
            *fake.first_query.lock().expect("lock") = Some(query.clone());
            let link = fake.foreign_next.clone().unwrap_or_else(|| next("p2"));
            json_reply(
                StatusCode::OK,
                json!({
                    "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#users",
                    "@odata.nextLink": link,
                    "value": [
                        user("11111111-0000-4000-8000-000000000001", "alice@contoso.com", "Member", true, &[E3]),
                        user("11111111-0000-4000-8000-000000000002", "bob@contoso.com", "Member", true, &[]),
                        user("11111111-0000-4000-8000-000000000003", "vendor_fabrikam.com#EXT#@contoso.onmicrosoft.com", "Guest", true, &[E3]),
                    ]
                }),
            )
        }
        Some("p2") => {
            if !fake.throttled.swap(true, Ordering::SeqCst) {
                *fake.throttled_at.lock().expect("lock") = Some(Instant::now());
                return (
                    StatusCode::TOO_MANY_REQUESTS,
                    [
                        (header::RETRY_AFTER, "1"),
                        (header::CONTENT_TYPE, "application/json"),
                    ],
                    r#"{"error":{"code":"TooManyRequests","message":"Too many requests."}}"#,
                )
                    .into_response();
            }
            fake.resumed_at
                .lock()
                .expect("lock")
                .get_or_insert_with(Instant::now);
            let mut erin = user(
                "11111111-0000-4000-8000-000000000006",
                "erin@contoso.com",
                "Member",
                true,
                &[PBI, E3],
            );
            erin["onPremisesSecurityIdentifier"] = json!(ERIN_SID);
            erin["onPremisesImmutableId"] = json!(ERIN_IMMUTABLE);
            erin["onPremisesSyncEnabled"] = json!(true);
            json_reply(
                StatusCode::OK,
                json!({
                    "@odata.nextLink": next("p3"),
                    "value": [
                        user("11111111-0000-4000-8000-000000000004", "carol@contoso.com", "Member", false, &[E3]),
                        user("11111111-0000-4000-8000-000000000005", "dave@contoso.com", "Member", true, &[PBI]),
                        erin,
                    ]
                }),
            )
        }
        Some("p3") => {
            if !fake.failed_once.swap(true, Ordering::SeqCst) {
                return (StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable").into_response();
            }
            json_reply(
                StatusCode::OK,
                json!({
                    "value": [
                        user("11111111-0000-4000-8000-000000000007", "frank@contoso.com", "Member", true, &[SPB]),
                        {
                            "id": "11111111-0000-4000-8000-000000000008",
                            "userPrincipalName": "mallory@contoso.com",
                            "displayName": "M".repeat(100_000),
                            "accountEnabled": "yes",
                            "userType": "Member",
                            "assignedLicenses": [{ "skuId": E3 }],
                            "extensionAttribute": { "deep": [1, 2, 3] }
                        },
                        { "displayName": "an entry without an id" },
                        user("11111111-0000-4000-8000-000000000001", "alice@contoso.com", "Member", true, &[E3]),
                    ]
                }),
            )
        }
        Some(other) => json_reply(
            StatusCode::BAD_REQUEST,
            json!({ "error": { "code": "BadRequest", "message": format!("unknown skiptoken {other}") } }),
        ),
    }
}

/// Starts the fake on 127.0.0.1:0; `configure` sets its behaviour.
async fn serve(configure: impl FnOnce(&mut Fake)) -> Arc<Fake> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let mut fake = Fake {
        base: format!("http://{}", listener.local_addr().expect("addr")),
        ..Fake::default()
    };
    configure(&mut fake);
    let fake = Arc::new(fake);
    let app = Router::new()
        .route("/{tenant}/oauth2/v2.0/token", post(token))
        .route("/v1.0/users", get(users))
        .route("/v1.0/subscribedSkus", get(skus))
        .with_state(fake.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    fake
}

/// A closed port: bound, then released.
async fn closed_port() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("http://{addr}")
}

struct Fixture {
    _dir: tempfile::TempDir,
    settings: GraphSettings,
}

fn fixture(base: &str, secret: &str) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let path: PathBuf = dir.path().join("contoso-graph");
    std::fs::write(&path, format!("{secret}\n")).expect("write secret");
    let mut settings = GraphSettings::new(TENANT, CLIENT_ID, SecretSource::File(path));
    settings.login_base_url = base.to_owned();
    settings.graph_base_url = base.to_owned();
    settings.licence_allow_list = vec![E3.to_owned(), "SPB".to_owned()];
    settings.timeout = Duration::from_secs(5);
    Fixture {
        _dir: dir,
        settings,
    }
}

/// Short backoff, so that only Retry-After can explain a wait of a second.
fn http() -> GraphHttp {
    GraphHttp::with_limits(GraphLimits {
        backoff_base: Duration::from_millis(20),
        backoff_cap: Duration::from_millis(100),
        max_attempts: 4,
        ..GraphLimits::default()
    })
    .expect("client")
}

/// A hang guard, not a timing assertion.
async fn guarded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("the read finished")
}

#[tokio::test]
async fn reads_every_page_through_throttling_and_counts_exactly() {
    let fake = serve(|_| {}).await;
    let fx = fixture(&fake.base, GOOD_SECRET);
    let http = http();

    let read = guarded(read_tenant(&fx.settings, &http))
        .await
        .expect("read succeeds");

    // The 429 was obeyed: the client came back no sooner than Retry-After, then went on.
    let throttled_at = fake
        .throttled_at
        .lock()
        .expect("lock")
        .expect("a 429 was served");
    let resumed_at = fake
        .resumed_at
        .lock()
        .expect("lock")
        .expect("page 2 was served");
    assert!(
        resumed_at.duration_since(throttled_at) >= Duration::from_secs(1),
        "came back after {:?}",
        resumed_at.duration_since(throttled_at)
    );
    assert!(read.waited >= Duration::from_secs(1), "{:?}", read.waited);
    assert!(fake.failed_once.load(Ordering::SeqCst), "a 503 was served");

    // The first request asked for exactly what is needed, in big pages.
    let first = fake
        .first_query
        .lock()
        .expect("lock")
        .clone()
        .expect("page 1");
    assert_eq!(
        first.get("$select").map(String::as_str),
        Some(wire::USER_SELECT_WITH_SIGN_IN),
        "sign-in activity is asked for first"
    );
    assert_eq!(read.sign_in_refused, None);
    assert!(read.users.iter().all(|u| u.sign_in_read));
    assert_eq!(
        first.get("$top").map(String::as_str),
        Some("120"),
        "Graph's page size with sign-in activity"
    );

    assert_eq!(read.pages, 3);
    assert_eq!(read.skipped, 1, "the entry without an id");
    assert_eq!(read.duplicates, 1, "alice listed twice");
    assert_eq!(read.users.len(), 8);
    let mallory = read
        .users
        .iter()
        .find(|u| u.upn == "mallory@contoso.com")
        .expect("mallory");
    assert_eq!(mallory.display_name.len(), MAX_STRING);

    let policy = read.licence_policy(&fx.settings);
    assert!(policy.unmatched().is_empty());
    let decisions: Vec<(String, bool, String)> = read
        .users
        .iter()
        .map(|u| {
            let d = decide(u, &policy);
            (u.upn.clone(), d.billable, d.reason)
        })
        .collect();
    let expected = [
        (
            "alice@contoso.com",
            true,
            format!("licensed SPE_E3 (skuId {E3})"),
        ),
        ("bob@contoso.com", false, "no licence".to_owned()),
        (
            "vendor_fabrikam.com#EXT#@contoso.onmicrosoft.com",
            false,
            "guest account".to_owned(),
        ),
        ("carol@contoso.com", false, "disabled".to_owned()),
        (
            "dave@contoso.com",
            false,
            "no licence from the allow-list".to_owned(),
        ),
        (
            "erin@contoso.com",
            true,
            format!("licensed SPE_E3 (skuId {E3})"),
        ),
        (
            "frank@contoso.com",
            true,
            format!("licensed SPB (skuId {SPB})"),
        ),
        (
            "mallory@contoso.com",
            false,
            "account state unknown (no accountEnabled)".to_owned(),
        ),
    ];
    let expected: Vec<(String, bool, String)> = expected
        .into_iter()
        .map(|(u, b, r)| (u.to_owned(), b, r))
        .collect();
    assert_eq!(decisions, expected);
    assert_eq!(decisions.iter().filter(|d| d.1).count(), 3);

    // Erin is hybrid: her AD account has the same keys, so she is one person.
    let erin = read
        .users
        .iter()
        .find(|u| u.upn == "erin@contoso.com")
        .expect("erin");
    let guid = ad_bytes_from_guid_string(ERIN_GUID).expect("a guid");
    assert_eq!(
        join_key_graph(erin),
        join_key_ad(Some(ERIN_SID), Some(&guid))
    );

    // A second read reuses the cached token.
    let again = guarded(read_users(&fx.settings, &http))
        .await
        .expect("second read");
    assert_eq!(again, read.users);
    assert_eq!(fake.token_requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_expired_secret_is_a_clear_error() {
    let fake = serve(|_| {}).await;
    let fx = fixture(&fake.base, EXPIRED_SECRET);
    let err = guarded(read_users(&fx.settings, &http()))
        .await
        .expect_err("refused");
    let text = err.to_string();
    assert!(matches!(err, GraphError::SecretRejected { .. }), "{err:?}");
    assert!(
        text.starts_with(
            "Graph refused the client secret for tenant contoso.onmicrosoft.com: it is wrong or expired (AADSTS7000222: The provided client secret keys"
        ),
        "{text}"
    );
    assert!(!text.contains("Trace ID"), "{text}");
    assert!(!text.contains(EXPIRED_SECRET), "{text}");
    assert!(!format!("{err:?}").contains(EXPIRED_SECRET));
    assert_eq!(fake.graph_requests.load(Ordering::SeqCst), 0);

    let fx = fixture(&fake.base, "the secret id, not its value");
    let err = guarded(read_users(&fx.settings, &http()))
        .await
        .expect_err("refused");
    assert!(
        err.to_string().contains("Value, not its Secret ID"),
        "{err}"
    );
}

#[tokio::test]
async fn a_next_link_to_another_host_is_refused() {
    // The other host is a live server too, to prove it never hears from us.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let evil = format!("http://{}", listener.local_addr().expect("addr"));
    let evil_hits = Arc::new(AtomicUsize::new(0));
    let hits = evil_hits.clone();
    let app = Router::new().fallback(any(move || {
        let hits = hits.clone();
        async move {
            hits.fetch_add(1, Ordering::SeqCst);
            StatusCode::OK
        }
    }));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let link = format!("{evil}/v1.0/users?$skiptoken=p2");
    let fake = serve(|f| f.foreign_next = Some(link)).await;
    let fx = fixture(&fake.base, GOOD_SECRET);
    let err = guarded(read_users(&fx.settings, &http()))
        .await
        .expect_err("refused");
    assert!(matches!(err, GraphError::ForeignNextLink { .. }), "{err:?}");
    assert!(err.to_string().contains(&evil), "{err}");
    assert_eq!(evil_hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_unreachable_graph_is_a_clear_error() {
    let closed = closed_port().await;

    let fake = serve(|_| {}).await;
    let mut fx = fixture(&fake.base, GOOD_SECRET);
    fx.settings.graph_base_url = closed.clone();
    let err = guarded(read_users(&fx.settings, &http()))
        .await
        .expect_err("unreachable");
    assert!(
        matches!(
            err,
            GraphError::Unreachable {
                endpoint: Endpoint::Graph,
                ..
            }
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "cannot reach Microsoft Graph at {closed} for tenant contoso.onmicrosoft.com: "
        )),
        "{text}"
    );
    assert!(text.to_lowercase().contains("refused"), "{text}");

    let fx = fixture(&closed, GOOD_SECRET);
    let err = guarded(read_users(&fx.settings, &http()))
        .await
        .expect_err("unreachable");
    assert!(
        err.to_string()
            .starts_with("cannot reach the Entra ID login endpoint at"),
        "{err}"
    );
}

#[tokio::test]
async fn a_silent_graph_times_out() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let mut fx = fixture(&silent, GOOD_SECRET);
    fx.settings.timeout = Duration::from_secs(1);
    let err = guarded(read_users(&fx.settings, &http()))
        .await
        .expect_err("times out");
    assert!(matches!(err, GraphError::Timeout { .. }), "{err:?}");
    assert!(
        err.to_string().contains("did not answer within 1s"),
        "{err}"
    );
}

#[tokio::test]
async fn a_tenant_without_sign_in_activity_is_read_without_it() {
    let fake = serve(|f| f.no_premium = true).await;
    let fx = fixture(&fake.base, GOOD_SECRET);
    let read = guarded(read_tenant(&fx.settings, &http()))
        .await
        .expect("read without sign-in activity");
    assert_eq!(read.users.len(), 8, "every page, every user");
    assert!(read.users.iter().all(|u| !u.sign_in_read));
    assert!(
        read.sign_in_refused
            .as_deref()
            .is_some_and(|r| r.contains("RequestFromNonPremiumTenant")),
        "{:?}",
        read.sign_in_refused
    );
    let selects = fake.selects.lock().expect("lock").clone();
    assert_eq!(
        selects.first().map(String::as_str),
        Some(wire::USER_SELECT_WITH_SIGN_IN)
    );
    assert!(
        selects[1..].iter().all(|s| s == wire::USER_SELECT),
        "asked once, then every page without it: {selects:?}"
    );
}

#[tokio::test]
async fn a_missing_permission_is_named() {
    let fake = serve(|f| f.forbid_users = true).await;
    let fx = fixture(&fake.base, GOOD_SECRET);
    let err = guarded(read_users(&fx.settings, &http()))
        .await
        .expect_err("forbidden");
    let text = err.to_string();
    assert!(text.contains("HTTP 403"), "{text}");
    assert!(text.contains("Insufficient privileges"), "{text}");
    assert!(text.contains("User.Read.All"), "{text}");
}

#[tokio::test]
async fn a_graph_that_stays_down_is_given_up_on() {
    let fake = serve(|f| f.always_503 = true).await;
    let fx = fixture(&fake.base, GOOD_SECRET);
    let err = guarded(read_users(&fx.settings, &http()))
        .await
        .expect_err("gives up");
    assert!(
        matches!(
            err,
            GraphError::GaveUp {
                status: 503,
                attempts: 4,
                ..
            }
        ),
        "{err:?}"
    );
    // One request for the SKUs, four attempts at the first page.
    assert_eq!(fake.graph_requests.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn invalid_settings_are_refused_before_any_request() {
    let fake = serve(|_| {}).await;
    let mut fx = fixture(&fake.base, GOOD_SECRET);
    fx.settings.graph_base_url = "http://graph.example.com".into();
    fx.settings.client_id = "not-a-guid".into();
    let err = guarded(read_users(&fx.settings, &http()))
        .await
        .expect_err("invalid");
    assert_eq!(err.to_string().lines().count(), 2, "{err}");
    assert_eq!(fake.token_requests.load(Ordering::SeqCst), 0);
}
