//! A fake Entra ID token endpoint (wiremock) answering as the real one does.
//!
//! Reusable by other tests: `FakeEntra::start().await`, `mount_token(token, expires_in)`,
//! `mount_error(code)`, `fetch_count()`, and `oauth_settings()` pointing at it.

#![allow(dead_code)]

use std::time::Duration;

use mail_relay::config::{ClientCredential, OAuthSettings};
use secrecy::SecretString;
use url::Url;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockBuilder, MockServer, Request, ResponseTemplate};

pub const TENANT_ID: &str = "9188040d-6c67-4c5b-b112-36a304b66dad";
pub const CLIENT_ID: &str = "3fa85f64-5717-4562-b3fc-2c963f66afa6";
pub const CLIENT_SECRET: &str = "Xq8Q~fake.client-secret_value-DO-NOT-LOG";
pub const SCOPE: &str = "https://outlook.office365.com/.default";
pub const TRACE_ID: &str = "0fd0b0e4-4a3b-4c1c-9d62-7e1e4a0b2d00";
pub const CORRELATION_ID: &str = "5b9e1f6e-2d5a-4f5c-8b0f-3c2e8d7a1b11";
const TIMESTAMP: &str = "2026-11-26 08:00:00Z";

/// The Entra codes the fake can answer with.
pub const ERROR_CODES: &[u64] = &[
    7000215, 7000222, 700016, 90002, 70011, 700027, 7000112, 500011, 53003, 900144,
];

pub struct FakeEntra {
    pub server: MockServer,
}

impl FakeEntra {
    pub async fn start() -> Self {
        Self {
            server: MockServer::start().await,
        }
    }

    /// A fake serving, to every request, an hour-long token the SMTP test peer accepts.
    pub async fn serving_peer_tokens(peer: &crate::peer::Peer) -> Self {
        let entra = Self::start().await;
        entra
            .mount_token(
                &peer.mint_token(&peer.oauth_user, Duration::from_secs(3600)),
                3599,
            )
            .await;
        entra
    }

    /// `http://127.0.0.1:<port>/<tenant>/oauth2/v2.0/token`, like Entra's v2.0 endpoint.
    pub fn token_url(&self) -> Url {
        Url::parse(&format!(
            "{}/{TENANT_ID}/oauth2/v2.0/token",
            self.server.uri()
        ))
        .unwrap()
    }

    /// Secret-mode settings pointing at the fake.
    pub fn oauth_settings(&self) -> OAuthSettings {
        self.oauth_settings_with(ClientCredential::Secret(SecretString::from(CLIENT_SECRET)))
    }

    pub fn oauth_settings_with(&self, credential: ClientCredential) -> OAuthSettings {
        OAuthSettings {
            tenant_id: TENANT_ID.into(),
            client_id: CLIENT_ID.into(),
            credential,
            token_endpoint: self.token_url(),
            scopes: SCOPE.into(),
            grace: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
        }
    }

    /// A mock for `POST` to the token path, to add responses, counts and priorities to.
    pub fn token_request() -> MockBuilder {
        Mock::given(method("POST")).and(path(format!("/{TENANT_ID}/oauth2/v2.0/token")))
    }

    /// Serve `token` to every request.
    pub async fn mount_token(&self, token: &str, expires_in: u64) {
        Self::token_request()
            .respond_with(token_response(token, expires_in))
            .mount(&self.server)
            .await;
    }

    /// Serve `token` to the next request only (ahead of anything mounted with `mount_token`).
    pub async fn mount_token_once(&self, token: &str, expires_in: u64) {
        Self::token_request()
            .respond_with(token_response(token, expires_in))
            .up_to_n_times(1)
            .with_priority(1)
            .mount(&self.server)
            .await;
    }

    /// Answer every request with Entra's error for `code`.
    pub async fn mount_error(&self, code: u64) {
        Self::token_request()
            .respond_with(error_response(code))
            .mount(&self.server)
            .await;
    }

    /// Requests the endpoint received so far.
    pub async fn fetch_count(&self) -> usize {
        self.requests().await.len()
    }

    pub async fn requests(&self) -> Vec<Request> {
        self.server.received_requests().await.unwrap_or_default()
    }
}

/// Entra's success answer.
pub fn token_response(token: &str, expires_in: u64) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(
        format!(
            r#"{{"token_type":"Bearer","expires_in":{expires_in},"ext_expires_in":{expires_in},"access_token":"{token}"}}"#
        ),
        "application/json; charset=utf-8",
    )
}

/// Entra's error answer for `code`, as its v2.0 endpoint sends it.
pub fn error_response(code: u64) -> ResponseTemplate {
    let (status, error, text) = error_text(code);
    let description = format!(
        "AADSTS{code}: {text}\r\nTrace ID: {TRACE_ID}\r\nCorrelation ID: {CORRELATION_ID}\r\nTimestamp: {TIMESTAMP}"
    );
    let body = serde_json::json!({
        "error": error,
        "error_description": description,
        "error_codes": [code],
        "timestamp": TIMESTAMP,
        "trace_id": TRACE_ID,
        "correlation_id": CORRELATION_ID,
        "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
    });
    ResponseTemplate::new(status).set_body_raw(body.to_string(), "application/json; charset=utf-8")
}

/// HTTP status, OAuth error and Entra's text per code (texts as Entra words them).
pub fn error_text(code: u64) -> (u16, &'static str, String) {
    match code {
        7000215 => (
            401,
            "invalid_client",
            format!(
                "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{CLIENT_ID}'."
            ),
        ),
        7000222 => (
            401,
            "invalid_client",
            format!(
                "The provided client secret keys for app '{CLIENT_ID}' are expired. Visit the Azure portal to create new keys for your app: https://aka.ms/NewClientSecret, or consider using certificate credentials for added security: https://aka.ms/certCreds."
            ),
        ),
        700016 => (
            400,
            "unauthorized_client",
            format!(
                "Application with identifier '{CLIENT_ID}' was not found in the directory '{TENANT_ID}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant."
            ),
        ),
        90002 => (
            400,
            "invalid_request",
            format!(
                "Tenant '{TENANT_ID}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud. Check with your subscription administrator, this may happen if there are no active subscriptions for the tenant."
            ),
        ),
        70011 => (
            400,
            "invalid_scope",
            "The provided request must include a 'scope' input parameter. The provided value for the input parameter 'scope' is not valid. The scope https://outlook.office365.com/SMTP.Send is not valid.".to_string(),
        ),
        700027 => (
            401,
            "invalid_client",
            "Client assertion failed signature validation.".to_string(),
        ),
        7000112 => (
            400,
            "unauthorized_client",
            format!("Application '{CLIENT_ID}'(mail-relay) is disabled."),
        ),
        500011 => (
            400,
            "invalid_resource",
            format!(
                "The resource principal named https://outlook.office365.com was not found in the tenant named {TENANT_ID}. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You might have sent your authentication request to the wrong tenant."
            ),
        ),
        53003 => (
            400,
            "access_denied",
            "Access has been blocked by Conditional Access policies. The access policy does not allow token issuance.".to_string(),
        ),
        900144 => (
            400,
            "invalid_request",
            "The request body must contain the following parameter: 'grant_type'.".to_string(),
        ),
        other => (
            400,
            "invalid_request",
            format!("Something the relay has no explanation for ({other})."),
        ),
    }
}

/// The form fields of a received token request.
pub fn form_fields(request: &Request) -> Vec<(String, String)> {
    url::form_urlencoded::parse(&request.body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

pub fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}
