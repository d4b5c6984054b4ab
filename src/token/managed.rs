//! Tokens from a managed identity: Azure's Instance Metadata Service, or the identity endpoint
//! that App Service, Functions and Container Apps run beside the app. No credential of the
//! relay's travels: the platform vouches for the machine or container asking.
//!
//! What this relies on, from Microsoft's documentation:
//! - IMDS ("How to use managed identities for Azure resources on an Azure VM to acquire an
//!   access token"): `GET` with `api-version=2018-02-01`, `resource` (not a scope), optional
//!   `client_id` for a user-assigned identity, and the header `Metadata: true`; never through a
//!   proxy. Retry 404 (IMDS is updating), 410 (updating, back within 70 s), 429 and 5xx; other
//!   4xx are design-time errors, in OAuth2's `{error, error_description}` shape, Entra's AADSTS
//!   text passed through. `expires_in` comes as a string of digits.
//! - App Service ("Managed identities for App Service and Azure Functions", REST protocol):
//!   `IDENTITY_ENDPOINT` with `api-version=2019-08-01`, `resource`, optional `client_id`, and the
//!   header `X-IDENTITY-HEADER` carrying `IDENTITY_HEADER`. The answer has `expires_on` (seconds
//!   since the epoch) and no `expires_in`; errors come as `{statusCode, message, correlationId}`.

use reqwest::header::HeaderMap;
use reqwest::{RequestBuilder, StatusCode};
use secrecy::ExposeSecret;
use serde::Deserialize;
use url::Url;

use super::client::{Fetched, describe, parse_success, retry_after};
use super::error::{EntraError, TokenError};
use crate::config::ManagedIdentity;

const IMDS_API_VERSION: &str = "2018-02-01";
const APP_SERVICE_API_VERSION: &str = "2019-08-01";

/// One managed identity's token request, ready to be sent again and again.
pub(super) struct ManagedRequest {
    identity: ManagedIdentity,
    resource: String,
    /// A user-assigned identity; `None` asks for the system-assigned one.
    client_id: Option<String>,
}

impl ManagedRequest {
    pub(super) fn new(
        identity: &ManagedIdentity,
        scopes: &str,
        client_id: &str,
    ) -> Result<Self, TokenError> {
        Ok(Self {
            identity: identity.clone(),
            resource: resource_of(scopes)?,
            client_id: Some(client_id.trim())
                .filter(|c| !c.is_empty())
                .map(str::to_owned),
        })
    }

    pub(super) fn kind(&self) -> &'static str {
        match self.identity {
            ManagedIdentity::Imds => "managed identity (IMDS)",
            ManagedIdentity::AppService { .. } => "managed identity (App Service)",
        }
    }

    pub(super) fn request(&self, http: &reqwest::Client, endpoint: &Url) -> RequestBuilder {
        let mut url = endpoint.clone();
        let api_version = match self.identity {
            ManagedIdentity::Imds => IMDS_API_VERSION,
            ManagedIdentity::AppService { .. } => APP_SERVICE_API_VERSION,
        };
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("api-version", api_version);
            query.append_pair("resource", &self.resource);
            if let Some(client_id) = &self.client_id {
                query.append_pair("client_id", client_id);
            }
        }
        let request = http
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json");
        match &self.identity {
            ManagedIdentity::Imds => request.header("Metadata", "true"),
            ManagedIdentity::AppService { identity_header } => {
                request.header("X-IDENTITY-HEADER", identity_header.expose_secret())
            }
        }
    }
}

/// The resource a scope names: `https://graph.microsoft.com/.default` asks for
/// `https://graph.microsoft.com`. Managed identities take exactly one.
fn resource_of(scopes: &str) -> Result<String, TokenError> {
    let mut each = scopes.split_whitespace();
    match (each.next(), each.next()) {
        (Some(scope), None) => Ok(scope.strip_suffix("/.default").unwrap_or(scope).to_owned()),
        _ => Err(TokenError::Setup(format!(
            "a managed identity is issued a token for exactly one resource, but the scopes are {scopes:?}"
        ))),
    }
}

/// Both endpoints' error bodies: IMDS speaks OAuth2, App Service its own JSON.
#[derive(Deserialize)]
struct ErrorBody {
    error: Option<String>,
    error_description: Option<String>,
    message: Option<String>,
    #[serde(rename = "correlationId")]
    correlation_id: Option<String>,
}

/// Turns the identity endpoint's answer into a token or the matching error.
pub(super) fn interpret(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Fetched, TokenError> {
    let code = status.as_u16();
    if status.is_success() {
        return parse_success(code, headers, body);
    }
    let error_body = serde_json::from_slice::<ErrorBody>(body).ok();
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Err(TokenError::Throttled {
            retry_after: retry_after(headers),
        });
    }
    // 404 and 410: IMDS is being updated, and back soon.
    if status.is_server_error() || code == 404 || code == 410 {
        return Err(TokenError::Unavailable {
            status: code,
            retry_after: retry_after(headers),
            trace_id: None,
            correlation_id: error_body.and_then(|b| b.correlation_id),
        });
    }
    let Some(body_json) = error_body else {
        return Err(not_json(code, headers, body));
    };
    let Some(description) = body_json
        .error_description
        .or(body_json.message)
        .map(|d| d.lines().next().unwrap_or_default().trim().to_owned())
    else {
        return Err(not_json(code, headers, body));
    };
    // Entra's refusal passed through (AADSTS500011 for an unknown resource): explained as such.
    if let Some(number) = aadsts(&description) {
        return Err(TokenError::Rejected(Box::new(EntraError {
            status: code,
            error: body_json.error.unwrap_or_else(|| "invalid_request".into()),
            error_codes: vec![number],
            description,
            trace_id: None,
            correlation_id: body_json.correlation_id,
            timestamp: None,
        })));
    }
    Err(TokenError::managed_identity_refused(code, description))
}

fn not_json(status: u16, headers: &HeaderMap, body: &[u8]) -> TokenError {
    TokenError::InvalidResponse {
        status,
        detail: format!(
            "a body that is not a managed identity endpoint's error JSON ({})",
            describe(headers, body)
        ),
        transient: false,
    }
}

/// `AADSTS500011: The resource principal ...` → 500011.
fn aadsts(description: &str) -> Option<u64> {
    let digits = description.strip_prefix("AADSTS")?;
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resource_is_the_scope_without_default() {
        assert_eq!(
            resource_of("https://graph.microsoft.com/.default").unwrap(),
            "https://graph.microsoft.com"
        );
        assert_eq!(
            resource_of(" https://outlook.office365.com ").unwrap(),
            "https://outlook.office365.com"
        );
        assert!(resource_of("a/.default b/.default").is_err());
        assert!(resource_of("").is_err());
    }

    #[test]
    fn updating_throttled_and_failing_are_transient_others_are_not() {
        for status in [404, 410, 429, 500, 503] {
            let e = interpret(
                StatusCode::from_u16(status).unwrap(),
                &HeaderMap::new(),
                b"",
            )
            .unwrap_err();
            assert!(e.is_transient(), "{status}: {e}");
        }
        let e = interpret(
            StatusCode::BAD_REQUEST,
            &HeaderMap::new(),
            br#"{"error":"invalid_request","error_description":"Identity not found"}"#,
        )
        .unwrap_err();
        assert!(!e.is_transient());
        assert_eq!(e.code(), "token_managed_identity_not_found");
        assert!(e.to_string().contains("oAuthClientId"), "{e}");
    }

    #[test]
    fn entras_code_passed_through_is_explained_as_entras() {
        let e = interpret(
            StatusCode::BAD_REQUEST,
            &HeaderMap::new(),
            br#"{"error":"invalid_resource","error_description":"AADSTS500011: The resource principal named https://x was not found in the tenant.\r\nTrace ID: t"}"#,
        )
        .unwrap_err();
        assert_eq!(e.entra().unwrap().error_codes, [500011]);
        assert!(!e.to_string().contains("Trace ID"), "{e}");
    }

    #[test]
    fn app_services_error_shape_is_read() {
        let e = interpret(
            StatusCode::BAD_REQUEST,
            &HeaderMap::new(),
            br#"{"statusCode":400,"message":"Unable to load the proper Managed Identity.","correlationId":"c-9"}"#,
        )
        .unwrap_err();
        assert_eq!(e.code(), "token_managed_identity_not_found");
    }
}
