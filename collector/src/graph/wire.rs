//! What Entra ID and Microsoft Graph send, parsed without I/O: pages of users, the tenant's
//! subscribed SKUs, token replies and error bodies. Everything here comes from the network, so
//! nothing is trusted: strings are capped ([`MAX_STRING`] bytes, control characters blanked),
//! values of the wrong type count as missing, unknown fields are ignored, and a user without an
//! id is skipped (and counted) rather than failing the page.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Longest string kept from a Graph value, in bytes (cut on a character boundary).
pub const MAX_STRING: usize = 255;
/// Most licences kept per user (Microsoft's largest tenants assign a handful).
pub const MAX_LICENCES_PER_USER: usize = 100;
/// Longest `@odata.nextLink` accepted: a cut link would be a wrong link, so longer is an error.
pub const MAX_NEXT_LINK: usize = 8192;
/// Most SKUs read from `subscribedSkus`.
pub const MAX_SKUS: usize = 2000;
/// Longest error detail kept from an error body.
pub const MAX_DETAIL: usize = 300;

/// The fields requested from `/v1.0/users` on every tenant.
pub const USER_SELECT: &str = "id,displayName,userPrincipalName,accountEnabled,userType,\
assignedLicenses,onPremisesSecurityIdentifier,onPremisesImmutableId,onPremisesSyncEnabled,\
createdDateTime";
/// [`USER_SELECT`] with `signInActivity`, asked first: Graph gives it only to an app with
/// AuditLog.Read.All on a tenant with Entra ID P1 or P2, and refuses the whole page (403)
/// otherwise.
pub const USER_SELECT_WITH_SIGN_IN: &str = "id,displayName,userPrincipalName,accountEnabled,\
userType,assignedLicenses,onPremisesSecurityIdentifier,onPremisesImmutableId,\
onPremisesSyncEnabled,createdDateTime,signInActivity";

/// One Entra ID user as read from Graph, with just what the billable decision, the evidence and
/// the hybrid join need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphUser {
    /// Graph object id (a GUID): the user's stable identity in the tenant.
    pub id: String,
    /// `userPrincipalName`, empty when Graph did not send one. For display only.
    pub upn: String,
    /// `displayName`, empty when Graph did not send one. For display only, never for joining.
    pub display_name: String,
    /// `accountEnabled`; `None` when missing or not a boolean.
    pub enabled: Option<bool>,
    /// `userType` (`Member`, `Guest`); `None` when missing.
    pub user_type: Option<String>,
    /// SKU ids of the assigned licences, lower-case, sorted, deduplicated.
    pub sku_ids: Vec<String>,
    /// `onPremisesSecurityIdentifier`: the AD objectSid of a synchronised user.
    pub on_premises_sid: Option<String>,
    /// `onPremisesImmutableId`: the source anchor of a synchronised user (by default the base64
    /// of its AD objectGUID).
    pub on_premises_immutable_id: Option<String>,
    /// `onPremisesSyncEnabled`: `Some(true)` while the user is synchronised from AD.
    pub on_premises_sync_enabled: Option<bool>,
    /// `createdDateTime` as Graph wrote it (ISO 8601).
    pub created: Option<String>,
    /// Whether the read had the tenant's sign-in activity (`signInActivity`): only then does
    /// a user without a sign-in mean one who never signed in.
    #[serde(default)]
    pub sign_in_read: bool,
    /// The latest of `signInActivity`'s `lastSignInDateTime` (interactive),
    /// `lastNonInteractiveSignInDateTime` (an app using its token, as Outlook does for weeks)
    /// and `lastSuccessfulSignInDateTime`, as Graph wrote it; `None` when it has none.
    #[serde(default)]
    pub last_sign_in: Option<String>,
}

/// A Graph time (ISO 8601 in UTC, `2024-01-01T00:00:00Z`, with or without fractions) in Unix
/// millis; `None` when it is no such time or before 1970.
pub fn graph_time_ms(text: &str) -> Option<u64> {
    let t = humantime::parse_rfc3339_weak(text.trim()).ok()?;
    let ms = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis();
    u64::try_from(ms).ok()
}

/// One page of `/v1.0/users`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsersPage {
    pub users: Vec<GraphUser>,
    /// `@odata.nextLink`: where the next page is, if any (not yet checked against the host).
    pub next_link: Option<String>,
    /// Entries skipped because they had no usable id.
    pub skipped: usize,
}

/// Why a page could not be read at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    #[error("the body is not JSON: {0}")]
    NotJson(String),
    #[error("the body is not a Graph collection (no \"value\" array)")]
    NotACollection,
    #[error("@odata.nextLink is not a string")]
    NextLinkType,
    #[error("@odata.nextLink is longer than {MAX_NEXT_LINK} bytes")]
    NextLinkTooLong,
}

/// Parses one page of `/v1.0/users`.
pub fn parse_users_page(body: &[u8]) -> Result<UsersPage, PageError> {
    let (values, object) = collection(body)?;
    let next_link = match object.get("@odata.nextLink") {
        None | Some(Value::Null) => None,
        Some(Value::String(link)) if link.len() > MAX_NEXT_LINK => {
            return Err(PageError::NextLinkTooLong);
        }
        Some(Value::String(link)) => Some(link.clone()),
        Some(_) => return Err(PageError::NextLinkType),
    };
    let mut users = Vec::with_capacity(values.len());
    let mut skipped = 0;
    for v in values {
        match v.as_object().and_then(user) {
            Some(u) => users.push(u),
            None => skipped += 1,
        }
    }
    Ok(UsersPage {
        users,
        next_link,
        skipped,
    })
}

fn collection(body: &[u8]) -> Result<(Vec<Value>, Map<String, Value>), PageError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| PageError::NotJson(e.to_string()))?;
    let Value::Object(mut object) = value else {
        return Err(PageError::NotACollection);
    };
    match object.remove("value") {
        Some(Value::Array(values)) => Ok((values, object)),
        _ => Err(PageError::NotACollection),
    }
}

fn user(o: &Map<String, Value>) -> Option<GraphUser> {
    let id = string(o, "id").filter(|id| !id.trim().is_empty())?;
    let mut sku_ids: Vec<String> = match o.get("assignedLicenses") {
        Some(Value::Array(licences)) => licences
            .iter()
            .take(MAX_LICENCES_PER_USER)
            .filter_map(|l| l.get("skuId")?.as_str())
            .filter(|s| is_guid(s))
            .map(str::to_ascii_lowercase)
            .collect(),
        _ => Vec::new(),
    };
    sku_ids.sort();
    sku_ids.dedup();
    Some(GraphUser {
        id,
        upn: string(o, "userPrincipalName").unwrap_or_default(),
        display_name: string(o, "displayName").unwrap_or_default(),
        enabled: o.get("accountEnabled").and_then(Value::as_bool),
        user_type: string(o, "userType"),
        sku_ids,
        on_premises_sid: string(o, "onPremisesSecurityIdentifier"),
        on_premises_immutable_id: string(o, "onPremisesImmutableId"),
        on_premises_sync_enabled: o.get("onPremisesSyncEnabled").and_then(Value::as_bool),
        created: string(o, "createdDateTime"),
        // Set by the reader, which knows whether it asked for signInActivity.
        sign_in_read: false,
        last_sign_in: o
            .get("signInActivity")
            .and_then(Value::as_object)
            .and_then(latest_sign_in),
    })
}

/// The latest sign-in time of a `signInActivity` object.
fn latest_sign_in(activity: &Map<String, Value>) -> Option<String> {
    [
        "lastSignInDateTime",
        "lastNonInteractiveSignInDateTime",
        "lastSuccessfulSignInDateTime",
    ]
    .iter()
    .filter_map(|k| string(activity, k))
    .filter_map(|t| graph_time_ms(&t).map(|ms| (ms, t)))
    .max_by_key(|(ms, _)| *ms)
    .map(|(_, t)| t)
}

fn string(o: &Map<String, Value>, key: &str) -> Option<String> {
    o.get(key)?.as_str().map(|s| cap(s, MAX_STRING))
}

/// One licence the tenant subscribes to: what turns a part number into a SKU id, and a SKU id
/// into a readable name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscribedSku {
    /// SKU id, lower-case.
    pub sku_id: String,
    /// Part number, like `SPE_E3`.
    pub part_number: String,
}

/// Parses `/v1.0/subscribedSkus`. Entries without a GUID skuId or a part number are skipped.
pub fn parse_skus(body: &[u8]) -> Result<Vec<SubscribedSku>, PageError> {
    let (values, _) = collection(body)?;
    Ok(values
        .iter()
        .take(MAX_SKUS)
        .filter_map(|v| {
            let o = v.as_object()?;
            let sku_id = o.get("skuId")?.as_str().filter(|s| is_guid(s))?;
            let part_number = string(o, "skuPartNumber").filter(|p| !p.is_empty())?;
            Some(SubscribedSku {
                sku_id: sku_id.to_ascii_lowercase(),
                part_number,
            })
        })
        .collect())
}

/// An access token from the login endpoint.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenReply {
    pub access_token: String,
    /// Lifetime in seconds, if the reply said.
    pub expires_in: Option<u64>,
}

impl std::fmt::Debug for TokenReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReply")
            .field("access_token", &"<redacted>")
            .field("expires_in", &self.expires_in)
            .finish()
    }
}

/// Longest access token accepted (Entra tokens are 1-3 KB).
const MAX_TOKEN: usize = 16 * 1024;

/// Parses a successful token reply. `expires_in` may be a number or, from older endpoints, a
/// string of digits.
pub fn parse_token(body: &[u8]) -> Result<TokenReply, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let token = value
        .get("access_token")
        .and_then(Value::as_str)
        .ok_or("no access_token in the reply")?;
    if token.is_empty() || token.len() > MAX_TOKEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the access_token is empty, too long or not printable ASCII".to_owned());
    }
    if let Some(kind) = value.get("token_type").and_then(Value::as_str)
        && !kind.eq_ignore_ascii_case("bearer")
    {
        return Err(format!("token_type is {:?}, not Bearer", cap(kind, 40)));
    }
    let expires_in = match value.get("expires_in") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    };
    Ok(TokenReply {
        access_token: token.to_owned(),
        expires_in,
    })
}

/// An OAuth2 error from the login endpoint:
/// `{"error":"invalid_client","error_description":"AADSTS7000222: ...","error_codes":[7000222]}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AadError {
    /// The OAuth2 error (`invalid_client`, `unauthorized_client`, `invalid_request`).
    pub error: String,
    /// The first line of `error_description` (without trace and correlation ids), capped.
    pub description: String,
    /// `error_codes`: the AADSTS numbers.
    pub codes: Vec<u64>,
}

impl AadError {
    /// Whether the login endpoint refused the client's credentials (wrong, expired or missing
    /// secret) rather than something else (unknown tenant or app).
    pub fn is_bad_secret(&self) -> bool {
        self.error == "invalid_client"
            || self
                .codes
                .iter()
                .any(|c| matches!(c, 7000215 | 7000222 | 7000218))
    }

    /// A one-line detail: the description (which starts with its AADSTS code), or the error.
    pub fn detail(&self) -> String {
        match (self.description.is_empty(), self.codes.first()) {
            (false, _) => self.description.clone(),
            (true, Some(code)) => format!("{}: AADSTS{code}", self.error),
            (true, None) => self.error.clone(),
        }
    }
}

/// Parses a login endpoint error body, if it is one.
pub fn parse_aad_error(body: &[u8]) -> Option<AadError> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let error = value.get("error")?.as_str()?;
    let description = value
        .get("error_description")
        .and_then(Value::as_str)
        .unwrap_or_default();
    // Descriptions end with "\r\nTrace ID: ...\r\nCorrelation ID: ...\r\nTimestamp: ...".
    let first = description
        .split(['\r', '\n'])
        .next()
        .unwrap_or_default()
        .split(" Trace ID:")
        .next()
        .unwrap_or_default()
        .trim();
    let codes = value
        .get("error_codes")
        .and_then(Value::as_array)
        .map(|a| a.iter().take(8).filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    Some(AadError {
        error: cap(error, 80),
        description: cap(first, MAX_DETAIL),
        codes,
    })
}

/// A one-line detail from a Graph error body (`{"error":{"code":..,"message":..}}`), or from
/// whatever the body is.
pub fn graph_error_detail(body: &[u8]) -> String {
    let parsed: Option<(String, String)> =
        serde_json::from_slice::<Value>(body).ok().and_then(|v| {
            let e = v.get("error")?;
            let code = e.get("code").and_then(Value::as_str).unwrap_or_default();
            let message = e.get("message").and_then(Value::as_str).unwrap_or_default();
            Some((code.to_owned(), message.to_owned()))
        });
    match parsed {
        Some((code, message)) if !message.is_empty() => {
            cap(&format!("{code}: {message}"), MAX_DETAIL)
        }
        Some((code, _)) if !code.is_empty() => cap(&code, MAX_DETAIL),
        _ if body.is_empty() => "empty body".to_owned(),
        _ => cap(&String::from_utf8_lossy(body), MAX_DETAIL),
    }
}

/// `s` with control characters blanked, cut to at most `max` bytes on a character boundary.
pub fn cap(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for c in s.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out
}

/// Whether `s` is a GUID in its string form (`6731de76-14a6-49ae-97bc-6eba6914391e`).
pub fn is_guid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const E3: &str = "05e9a617-0261-4cee-bb44-138d3ef5d965";

    #[test]
    fn a_real_shaped_page() {
        let body = format!(
            r#"{{
              "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#users(id,displayName)",
              "@odata.nextLink": "https://graph.microsoft.com/v1.0/users?$select=id&$top=999&$skiptoken=RFNwdAIAAQAAAD8",
              "value": [
                {{
                  "id": "87d349ed-44d7-43e1-9a83-5f2406dee5bd",
                  "displayName": "Adele Vance",
                  "userPrincipalName": "AdeleV@contoso.com",
                  "accountEnabled": true,
                  "userType": "Member",
                  "assignedLicenses": [
                    {{ "disabledPlans": [], "skuId": "{}" }},
                    {{ "disabledPlans": ["a23b959c-7ce8-4e57-9140-b90eb88a9e97"], "skuId": "{E3}" }}
                  ],
                  "onPremisesSecurityIdentifier": "S-1-5-21-1004336348-1177238915-682003330-1105",
                  "onPremisesImmutableId": "PBp7vIlyPU6iv0t9GmtNTw==",
                  "onPremisesSyncEnabled": true,
                  "createdDateTime": "2021-03-04T05:06:07Z",
                  "businessPhones": ["+1 425 555 0109"]
                }}
              ]
            }}"#,
            E3.to_uppercase()
        );
        let page = parse_users_page(body.as_bytes()).expect("parses");
        assert_eq!(page.skipped, 0);
        assert!(
            page.next_link
                .as_deref()
                .is_some_and(|l| l.ends_with("RFNwdAIAAQAAAD8"))
        );
        let u = &page.users[0];
        assert_eq!(u.upn, "AdeleV@contoso.com");
        assert_eq!(u.enabled, Some(true));
        assert_eq!(u.user_type.as_deref(), Some("Member"));
        assert_eq!(
            u.sku_ids,
            vec![E3.to_owned()],
            "lower-cased and deduplicated"
        );
        assert_eq!(u.on_premises_sync_enabled, Some(true));
        assert_eq!(u.created.as_deref(), Some("2021-03-04T05:06:07Z"));
    }

    #[test]
    fn sign_in_activity_gives_the_latest_sign_in() {
        let body = br#"{"value": [
            {"id": "a", "createdDateTime": "2024-01-01T00:00:00Z",
             "signInActivity": {
               "lastSignInDateTime": "2024-03-01T10:00:00Z",
               "lastSignInRequestId": "e0c4d4e5-0000-0000-0000-000000000000",
               "lastNonInteractiveSignInDateTime": "2024-05-02T11:12:13.1234567Z",
               "lastSuccessfulSignInDateTime": null}},
            {"id": "b", "signInActivity": {"lastSignInDateTime": null,
               "lastNonInteractiveSignInDateTime": null}},
            {"id": "c", "signInActivity": {"lastSignInDateTime": "not a time"}},
            {"id": "d"}
        ]}"#;
        let page = parse_users_page(body).expect("parses");
        let last: Vec<Option<&str>> = page
            .users
            .iter()
            .map(|u| u.last_sign_in.as_deref())
            .collect();
        assert_eq!(
            last,
            [Some("2024-05-02T11:12:13.1234567Z"), None, None, None],
            "the latest of interactive and non-interactive sign-ins"
        );
        assert!(
            page.users.iter().all(|u| !u.sign_in_read),
            "the reader sets it"
        );
        assert_eq!(
            graph_time_ms("2024-01-01T00:00:00Z"),
            Some(1_704_067_200_000)
        );
        assert_eq!(
            graph_time_ms("2024-05-02T11:12:13.1234567Z"),
            Some(1_714_648_333_123)
        );
        assert_eq!(graph_time_ms("yesterday"), None);
    }

    #[test]
    fn hostile_values_are_capped_or_dropped() {
        let huge = "é".repeat(10_000);
        let body = serde_json::json!({
            "value": [
                { "id": "a", "displayName": huge, "accountEnabled": "yes", "userType": 7,
                  "assignedLicenses": [{ "skuId": "../../etc" }, { "skuId": 3 }, "x"],
                  "onPremisesImmutableId": "line\nbreak" },
                { "displayName": "no id" },
                { "id": "" },
                { "id": 42 },
                "not an object",
            ]
        })
        .to_string();
        let page = parse_users_page(body.as_bytes()).expect("parses");
        assert_eq!(page.skipped, 4);
        let u = &page.users[0];
        assert!(u.display_name.len() <= MAX_STRING);
        assert!(
            u.display_name.chars().all(|c| c == 'é'),
            "cut on a char boundary"
        );
        assert_eq!(u.enabled, None);
        assert_eq!(u.user_type, None);
        assert!(u.sku_ids.is_empty());
        assert_eq!(u.on_premises_immutable_id.as_deref(), Some("line break"));
        assert_eq!(u.upn, "");
        assert_eq!(page.next_link, None);
    }

    #[test]
    fn not_a_page() {
        assert!(matches!(
            parse_users_page(b"<html>"),
            Err(PageError::NotJson(_))
        ));
        assert_eq!(parse_users_page(b"[]"), Err(PageError::NotACollection));
        assert_eq!(
            parse_users_page(br#"{"value": {}}"#),
            Err(PageError::NotACollection)
        );
        assert_eq!(
            parse_users_page(br#"{"value": [], "@odata.nextLink": 5}"#),
            Err(PageError::NextLinkType)
        );
        let long =
            serde_json::json!({ "value": [], "@odata.nextLink": "x".repeat(MAX_NEXT_LINK + 1) });
        assert_eq!(
            parse_users_page(long.to_string().as_bytes()),
            Err(PageError::NextLinkTooLong)
        );
    }

    #[test]
    fn skus() {
        let body = format!(
            r#"{{"value":[
                {{"capabilityStatus":"Enabled","consumedUnits":14,"skuId":"{E3}","skuPartNumber":"SPE_E3",
                  "prepaidUnits":{{"enabled":25}}}},
                {{"skuId":"not-a-guid","skuPartNumber":"X"}},
                {{"skuId":"{E3}"}}
            ]}}"#
        );
        assert_eq!(
            parse_skus(body.as_bytes()).expect("parses"),
            vec![SubscribedSku {
                sku_id: E3.into(),
                part_number: "SPE_E3".into()
            }]
        );
    }

    #[test]
    fn token_replies() {
        let t = parse_token(
            br#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"eyJ0eXAi.x.y"}"#,
        )
        .expect("parses");
        assert_eq!(t.expires_in, Some(3599));
        assert!(!format!("{t:?}").contains("eyJ0"));
        let old = parse_token(br#"{"token_type":"Bearer","expires_in":"3600","access_token":"a"}"#)
            .expect("parses");
        assert_eq!(old.expires_in, Some(3600));
        assert!(parse_token(br#"{"token_type":"mac","access_token":"a"}"#).is_err());
        assert!(parse_token(br#"{"access_token":"a b"}"#).is_err());
        assert!(parse_token(b"{}").is_err());
    }

    #[test]
    fn aad_errors() {
        let body = br#"{"error":"invalid_client","error_description":"AADSTS7000222: The provided client secret keys for app '6731de76-14a6-49ae-97bc-6eba6914391e' are expired. Visit the Azure portal to create new keys for your app: https://aka.ms/NewClientSecret.\r\nTrace ID: 2f6b1c1e-5d1a-4a84-9f3b-1c2d3e4f5a00\r\nCorrelation ID: 1a2b3c4d-0000-4000-8000-000000000000\r\nTimestamp: 2024-05-02 10:11:12Z","error_codes":[7000222],"timestamp":"2024-05-02 10:11:12Z","error_uri":"https://login.microsoftonline.com/error?code=7000222"}"#;
        let e = parse_aad_error(body).expect("an AAD error");
        assert!(e.is_bad_secret());
        assert_eq!(e.codes, vec![7000222]);
        assert!(
            e.detail()
                .starts_with("AADSTS7000222: The provided client secret keys")
        );
        assert!(!e.detail().contains("Trace ID"));
        let tenant = parse_aad_error(
            br#"{"error":"invalid_request","error_description":"AADSTS90002: Tenant 'nope' not found.","error_codes":[90002]}"#,
        )
        .expect("an AAD error");
        assert!(!tenant.is_bad_secret());
        assert_eq!(parse_aad_error(b"oops"), None);
    }

    #[test]
    fn graph_errors() {
        assert_eq!(
            graph_error_detail(
                br#"{"error":{"code":"Authorization_RequestDenied","message":"Insufficient privileges to complete the operation.","innerError":{}}}"#
            ),
            "Authorization_RequestDenied: Insufficient privileges to complete the operation."
        );
        assert_eq!(graph_error_detail(b""), "empty body");
        assert_eq!(graph_error_detail(b"Bad\ngateway"), "Bad gateway");
    }

    #[test]
    fn guids() {
        assert!(is_guid(E3));
        assert!(is_guid(&E3.to_uppercase()));
        assert!(!is_guid("05e9a617-0261-4cee-bb44-138d3ef5d96"));
        assert!(!is_guid("05e9a617x0261-4cee-bb44-138d3ef5d965"));
        assert!(!is_guid("SPE_E3"));
    }
}
