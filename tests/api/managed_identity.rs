//! A fake of the two managed identity endpoints on loopback, and the relay's managed identity
//! credential against it. Tests never reach the real IMDS address (link-local, the setting's
//! default): every endpoint here is 127.0.0.1.
//!
//! What the fake answers, and what that is based on:
//! - IMDS, `GET /metadata/identity/oauth2/token` (Microsoft's "How to use managed identities on
//!   an Azure VM to acquire an access token"): `Metadata: true` required, else `400` "Required
//!   metadata header not specified" (the text Microsoft's IMDS FAQ quotes); `api-version` and
//!   `resource` required; `client_id` picks a user-assigned identity, and one not assigned is
//!   `400 {"error":"invalid_request","error_description":"Identity not found"}` (as IMDS is
//!   reported to answer); a resource Entra does not know is `400 invalid_resource` with
//!   AADSTS500011 passed through; success carries `expires_in` as a string. 404, 410 and 429 are
//!   scripted, for the documented retry guidance.
//! - App Service, `GET /msi/token` ("Managed identities for App Service and Azure Functions",
//!   REST protocol, api-version 2019-08-01): `X-IDENTITY-HEADER` must equal `IDENTITY_HEADER`;
//!   success carries `expires_on` (epoch seconds) and no `expires_in`; errors come as
//!   `{statusCode, message, correlationId}`, "Unable to load the proper Managed Identity." when
//!   no identity matches. The exact texts for a missing header or api-version are not
//!   documented: the fake's are plausible stand-ins, and no test depends on their wording.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use mail_relay::config::{ClientCredential, ManagedIdentity, OAuthSettings};
use mail_relay::token::{TokenClient, TokenError};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use url::Url;

pub const IDENTITY_HEADER: &str = "0f6c2a4e-fake-identity-header";
pub const USER_ASSIGNED: &str = "7d3e9b1a-2c4f-4e8d-9a6b-5f0c1e2d3a4b";
const GRAPH: &str = "https://graph.microsoft.com";

#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub query: HashMap<String, String>,
    pub metadata: Option<String>,
    pub identity_header: Option<String>,
}

#[derive(Default)]
struct Inner {
    /// Resource → the token handed out for it.
    tokens: HashMap<String, String>,
    system_assigned: bool,
    seen: Vec<Seen>,
    script: VecDeque<(u16, Value)>,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<Inner>>);

pub struct FakeIdentity {
    address: std::net::SocketAddr,
    fake: Fake,
}

impl FakeIdentity {
    /// Both endpoints, with a system-assigned identity and [`USER_ASSIGNED`], each issued
    /// `token` for Microsoft Graph.
    pub async fn start(graph_token: &str) -> Self {
        let fake = Fake::default();
        {
            let mut inner = fake.0.lock().unwrap();
            inner.system_assigned = true;
            inner.tokens.insert(GRAPH.into(), graph_token.into());
        }
        let app = Router::new()
            .route("/metadata/identity/oauth2/token", get(imds))
            .route("/msi/token", get(app_service))
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { address, fake }
    }

    pub fn imds_url(&self) -> Url {
        Url::parse(&format!(
            "http://{}/metadata/identity/oauth2/token",
            self.address
        ))
        .unwrap()
    }

    pub fn app_service_url(&self) -> Url {
        Url::parse(&format!("http://{}/msi/token", self.address)).unwrap()
    }

    pub fn without_system_assigned(&self) {
        self.fake.0.lock().unwrap().system_assigned = false;
    }

    /// The next answers, before any check.
    pub fn script(&self, status: u16, body: Value) {
        self.fake.0.lock().unwrap().script.push_back((status, body));
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.fake.0.lock().unwrap().seen.clone()
    }

    /// Settings asking `endpoint` as `identity` for `scope`, `client_id` empty for the
    /// system-assigned identity.
    pub fn oauth(
        endpoint: Url,
        identity: ManagedIdentity,
        client_id: &str,
        scope: &str,
    ) -> OAuthSettings {
        OAuthSettings {
            tenant_id: String::new(),
            client_id: client_id.into(),
            credential: ClientCredential::ManagedIdentity(identity),
            token_endpoint: endpoint,
            scopes: scope.into(),
            grace: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
        }
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn epoch(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs()
}

/// Records the request and takes the scripted answer, if any.
fn arrive(
    fake: &Fake,
    path: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Option<Response> {
    let mut inner = fake.0.lock().unwrap();
    inner.seen.push(Seen {
        path: path.into(),
        query: query.clone(),
        metadata: header(headers, "metadata"),
        identity_header: header(headers, "x-identity-header"),
    });
    let (status, body) = inner.script.pop_front()?;
    Some((StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response())
}

enum Issue {
    Token(String),
    NoIdentity,
    UnknownResource(String),
}

fn issue(fake: &Fake, query: &HashMap<String, String>) -> Issue {
    let inner = fake.0.lock().unwrap();
    let identity_ok = match query.get("client_id") {
        Some(id) => id == USER_ASSIGNED,
        None => inner.system_assigned,
    };
    let resource = query.get("resource").cloned().unwrap_or_default();
    if !identity_ok {
        return Issue::NoIdentity;
    }
    // Entra accepts the resource with or without a trailing slash.
    match inner.tokens.get(resource.trim_end_matches('/')) {
        Some(token) => Issue::Token(token.clone()),
        None => Issue::UnknownResource(resource),
    }
}

fn aadsts500011(resource: &str) -> String {
    format!(
        "AADSTS500011: The resource principal named {resource} was not found in the tenant named Contoso. This can happen if the application has not been installed by the administrator of the tenant.\r\nTrace ID: 1c2d3e4f-0000-4000-8000-000000000001\r\nCorrelation ID: 1c2d3e4f-0000-4000-8000-000000000002\r\nTimestamp: 2026-12-04 01:00:00Z"
    )
}

async fn imds(
    State(fake): State<Fake>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Some(scripted) = arrive(&fake, "imds", &query, &headers) {
        return scripted;
    }
    let bad = |error: &str, description: String| {
        (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": error, "error_description": description})),
        )
            .into_response()
    };
    if header(&headers, "metadata").as_deref() != Some("true") {
        return bad(
            "invalid_request",
            "Required metadata header not specified".into(),
        );
    }
    if query.get("api-version").map(String::as_str) != Some("2018-02-01") {
        return bad(
            "invalid_request",
            "Bad request. api-version was not specified in the request".into(),
        );
    }
    if !query.contains_key("resource") {
        return bad(
            "invalid_request",
            "Required audience parameter not specified".into(),
        );
    }
    match issue(&fake, &query) {
        Issue::NoIdentity => bad("invalid_request", "Identity not found".into()),
        Issue::UnknownResource(resource) => bad("invalid_resource", aadsts500011(&resource)),
        Issue::Token(token) => {
            let now = SystemTime::now();
            let lifetime = 86_399;
            axum::Json(json!({
                "access_token": token,
                "client_id": query.get("client_id").map_or("5e29463d-0000-4000-8000-00000000000a", String::as_str),
                "expires_in": lifetime.to_string(),
                "expires_on": (epoch(now) + lifetime).to_string(),
                "ext_expires_in": lifetime.to_string(),
                "not_before": epoch(now).to_string(),
                "resource": query["resource"],
                "token_type": "Bearer",
            }))
            .into_response()
        }
    }
}

async fn app_service(
    State(fake): State<Fake>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Some(scripted) = arrive(&fake, "appService", &query, &headers) {
        return scripted;
    }
    let bad = |message: String| {
        (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({
                "statusCode": 400,
                "message": message,
                "correlationId": "8a1b2c3d-0000-4000-8000-000000000003",
            })),
        )
            .into_response()
    };
    if header(&headers, "x-identity-header").as_deref() != Some(IDENTITY_HEADER) {
        return bad("The X-IDENTITY-HEADER header is missing or not valid.".into());
    }
    if query.get("api-version").map(String::as_str) != Some("2019-08-01") {
        return bad("The api-version is missing or not supported.".into());
    }
    match issue(&fake, &query) {
        Issue::NoIdentity => bad("Unable to load the proper Managed Identity.".into()),
        Issue::UnknownResource(resource) => bad(aadsts500011(&resource)),
        Issue::Token(token) => axum::Json(json!({
            "access_token": token,
            "expires_on": (epoch(SystemTime::now()) + 86_399).to_string(),
            "resource": query.get("resource"),
            "token_type": "Bearer",
            "client_id": query.get("client_id").map_or("5e29463d-0000-4000-8000-00000000000a", String::as_str),
        }))
        .into_response(),
    }
}

fn graph_scope() -> String {
    format!("{GRAPH}/.default")
}

fn app_service_identity() -> ManagedIdentity {
    ManagedIdentity::AppService {
        identity_header: IDENTITY_HEADER.to_owned().into(),
    }
}

#[tokio::test]
async fn imds_is_asked_with_the_metadata_header_for_the_scopes_resource() {
    let identity = FakeIdentity::start("graph-token-from-imds").await;
    let client = TokenClient::new(&FakeIdentity::oauth(
        identity.imds_url(),
        ManagedIdentity::Imds,
        "",
        &graph_scope(),
    ))
    .unwrap();

    let fetched = client.fetch(SystemTime::now()).await.unwrap();

    assert_eq!(
        fetched.access_token.expose_secret(),
        "graph-token-from-imds"
    );
    assert_eq!(fetched.lifetime, Duration::from_secs(86_399));
    let seen = identity.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "imds");
    assert_eq!(seen[0].metadata.as_deref(), Some("true"));
    assert_eq!(seen[0].query["resource"], GRAPH);
    assert_eq!(seen[0].query["api-version"], "2018-02-01");
    // The system-assigned identity: no client_id.
    assert!(!seen[0].query.contains_key("client_id"), "{:?}", seen[0]);
}

#[tokio::test]
async fn a_user_assigned_identity_is_named_and_a_missing_one_says_how_to_fix_it() {
    let identity = FakeIdentity::start("user-assigned-token").await;
    identity.without_system_assigned();
    let ask = |client_id: &str| {
        TokenClient::new(&FakeIdentity::oauth(
            identity.imds_url(),
            ManagedIdentity::Imds,
            client_id,
            &graph_scope(),
        ))
        .unwrap()
    };

    let fetched = ask(USER_ASSIGNED).fetch(SystemTime::now()).await.unwrap();
    assert_eq!(fetched.access_token.expose_secret(), "user-assigned-token");
    assert_eq!(identity.seen()[0].query["client_id"], USER_ASSIGNED);

    for client_id in ["", "00000000-0000-0000-0000-0000000000ff"] {
        let error = ask(client_id).fetch(SystemTime::now()).await.unwrap_err();
        assert_eq!(error.code(), "token_managed_identity_not_found", "{error}");
        assert!(!error.is_transient());
        let text = error.to_string();
        assert!(text.contains("Identity not found"), "{text}");
        assert!(text.contains("oAuthClientId"), "{text}");
    }
}

#[tokio::test]
async fn app_service_is_asked_with_its_identity_header_and_expires_on_sets_the_lifetime() {
    let identity = FakeIdentity::start("graph-token-from-app-service").await;
    let client = TokenClient::new(&FakeIdentity::oauth(
        identity.app_service_url(),
        app_service_identity(),
        USER_ASSIGNED,
        &graph_scope(),
    ))
    .unwrap();

    let fetched = client.fetch(SystemTime::now()).await.unwrap();

    assert_eq!(
        fetched.access_token.expose_secret(),
        "graph-token-from-app-service"
    );
    // Only expires_on came: the lifetime is counted from now.
    assert!(
        fetched.lifetime > Duration::from_secs(86_390)
            && fetched.lifetime <= Duration::from_secs(86_399),
        "{:?}",
        fetched.lifetime
    );
    let seen = &identity.seen()[0];
    assert_eq!(seen.identity_header.as_deref(), Some(IDENTITY_HEADER));
    assert_eq!(seen.query["api-version"], "2019-08-01");
    assert_eq!(seen.query["client_id"], USER_ASSIGNED);
    // The header is a secret: the client's Debug does not show it.
    assert!(!format!("{client:?}").contains(IDENTITY_HEADER));

    identity.without_system_assigned();
    let system = TokenClient::new(&FakeIdentity::oauth(
        identity.app_service_url(),
        app_service_identity(),
        "",
        &graph_scope(),
    ))
    .unwrap();
    let error = system.fetch(SystemTime::now()).await.unwrap_err();
    assert_eq!(error.code(), "token_managed_identity_not_found", "{error}");
}

#[tokio::test]
async fn an_unknown_resource_is_entras_aadsts500011_explained() {
    let identity = FakeIdentity::start("t").await;
    let client = TokenClient::new(&FakeIdentity::oauth(
        identity.imds_url(),
        ManagedIdentity::Imds,
        "",
        "https://outlook.office365.us/.default",
    ))
    .unwrap();
    let error = client.fetch(SystemTime::now()).await.unwrap_err();
    let entra = error.entra().expect("Entra's refusal");
    assert_eq!(entra.error_codes, [500011]);
    assert_eq!(entra.error, "invalid_resource");
    assert!(!error.is_transient());
}

#[tokio::test]
async fn imds_updating_or_throttling_is_retried_by_the_cache() {
    use mail_relay::token::{CacheOptions, RetryPolicy, TokenCache, TokenProvider};

    let identity = FakeIdentity::start("after-the-update").await;
    identity.script(410, json!({}));
    identity.script(404, json!({}));
    identity.script(
        429,
        json!({"error": "too_many_requests", "error_description": "IMDS throttle limit reached"}),
    );
    let cache = TokenCache::with_options(
        &FakeIdentity::oauth(
            identity.imds_url(),
            ManagedIdentity::Imds,
            "",
            &graph_scope(),
        ),
        CacheOptions {
            retry: RetryPolicy {
                attempts: 4,
                base_delay: Duration::from_millis(10),
                max_delay: Duration::from_millis(50),
                max_wait: Duration::from_secs(1),
            },
            ..CacheOptions::default()
        },
    )
    .unwrap();

    let token = cache.token().await.unwrap();

    assert_eq!(token.expose(), "after-the-update");
    assert_eq!(identity.seen().len(), 4);
}

#[tokio::test]
async fn a_remote_plain_http_identity_endpoint_is_refused_before_any_request() {
    let error = TokenClient::new(&FakeIdentity::oauth(
        Url::parse("http://identity.example.com/msi/token").unwrap(),
        app_service_identity(),
        "",
        &graph_scope(),
    ))
    .unwrap_err();
    assert!(
        matches!(error, TokenError::InsecureEndpoint { .. }),
        "{error}"
    );
    // Two resources cannot be one managed identity token.
    let error = TokenClient::new(&FakeIdentity::oauth(
        Url::parse("http://127.0.0.1:9/metadata/identity/oauth2/token").unwrap(),
        ManagedIdentity::Imds,
        "",
        "https://graph.microsoft.com/.default https://outlook.office365.com/.default",
    ))
    .unwrap_err();
    assert!(
        error.to_string().contains("exactly one resource"),
        "{error}"
    );
}
