//! One client-credentials request to the token endpoint, and what its answer means.

use std::fmt;
use std::time::{Duration, SystemTime};

use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

use super::assertion::{ASSERTION_TYPE, sign_assertion};
use super::error::{EntraError, TokenError};
use super::managed::{self, ManagedRequest};
use crate::config::{CertificateCredential, ClientCredential, OAuthSettings};

/// A token as the endpoint handed it out.
pub struct Fetched {
    pub access_token: SecretString,
    /// `expires_in`: counted from when the answer arrived.
    pub lifetime: Duration,
}

impl fmt::Debug for Fetched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fetched")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

enum Credential {
    Secret(SecretString),
    FederatedTokenFile(std::path::PathBuf),
    Certificate(CertificateCredential),
    Managed(ManagedRequest),
}

/// Asks Entra ID (or whatever `token_endpoint` names) for app-only tokens.
pub struct TokenClient {
    http: reqwest::Client,
    endpoint: Url,
    client_id: String,
    scope: String,
    credential: Credential,
    connect_timeout: Duration,
    request_timeout: Duration,
}

impl fmt::Debug for TokenClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let credential = match &self.credential {
            Credential::Secret(_) => "secret",
            Credential::FederatedTokenFile(_) => "federated token file",
            Credential::Certificate(_) => "certificate",
            Credential::Managed(m) => m.kind(),
        };
        f.debug_struct("TokenClient")
            .field("endpoint", &self.endpoint.as_str())
            .field("client_id", &self.client_id)
            .field("scope", &self.scope)
            .field("credential", &credential)
            .finish_non_exhaustive()
    }
}

impl TokenClient {
    /// Builds the HTTP client around the settings' credential; fails on a plain-http remote endpoint.
    pub fn new(oauth: &OAuthSettings) -> Result<Self, TokenError> {
        let managed = matches!(oauth.credential, ClientCredential::ManagedIdentity(_));
        check_endpoint(&oauth.token_endpoint, managed)?;
        let credential = match &oauth.credential {
            ClientCredential::ManagedIdentity(identity) => Credential::Managed(
                ManagedRequest::new(identity, &oauth.scopes, &oauth.client_id)?,
            ),
            ClientCredential::Secret(secret) => Credential::Secret(secret.clone()),
            ClientCredential::FederatedTokenFile(path) => {
                Credential::FederatedTokenFile(path.clone())
            }
            ClientCredential::Certificate(certificate) => {
                Credential::Certificate(certificate.clone())
            }
        };
        let mut http = reqwest::Client::builder()
            .connect_timeout(oauth.connect_timeout)
            .timeout(oauth.request_timeout)
            // A redirect would carry the secret to another host: never follow one.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(crate::USER_AGENT);
        if managed {
            // The identity endpoint is on this host or its link-local network; IMDS refuses
            // proxied requests, and a proxy must never see the identity header.
            http = http.no_proxy();
        }
        let http = http
            .build()
            .map_err(|e| TokenError::Setup(crate::causes::line(&e)))?;
        Ok(Self {
            http,
            endpoint: oauth.token_endpoint.clone(),
            client_id: oauth.client_id.clone(),
            scope: oauth.scopes.clone(),
            credential,
            connect_timeout: oauth.connect_timeout,
            request_timeout: oauth.request_timeout,
        })
    }

    pub fn endpoint(&self) -> &Url {
        &self.endpoint
    }

    /// One request, no retries; `now` stamps the certificate assertion.
    #[tracing::instrument(name = "token.fetch", skip_all, fields(endpoint = %self.endpoint, client_id = %self.client_id))]
    pub async fn fetch(&self, now: SystemTime) -> Result<Fetched, TokenError> {
        let request = match &self.credential {
            Credential::Managed(managed) => managed.request(&self.http, &self.endpoint),
            _ => self.client_credentials(now).await?,
        };
        let response = request.send().await.map_err(|e| self.transport_error(&e))?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .map_err(|e| self.transport_error(&e))?;
        match self.credential {
            Credential::Managed(_) => managed::interpret(status, &headers, &body),
            _ => interpret(status, &headers, &body),
        }
    }

    /// The client-credentials `POST` to Entra ID, with the secret or the client assertion.
    async fn client_credentials(
        &self,
        now: SystemTime,
    ) -> Result<reqwest::RequestBuilder, TokenError> {
        let assertion;
        let mut form: Vec<(&str, &str)> = vec![
            ("grant_type", "client_credentials"),
            ("client_id", &self.client_id),
            ("scope", &self.scope),
        ];
        match &self.credential {
            Credential::Secret(secret) => form.push(("client_secret", secret.expose_secret())),
            Credential::Certificate(cert) => {
                assertion = sign_assertion(cert, &self.client_id, self.endpoint.as_str(), now)?;
                form.push(("client_assertion_type", ASSERTION_TYPE));
                form.push(("client_assertion", &assertion));
            }
            Credential::FederatedTokenFile(path) => {
                // Read every time: Kubernetes rotates the projected token (hourly by default).
                let text = tokio::fs::read_to_string(path).await.map_err(|e| {
                    TokenError::Setup(format!(
                        "the federated token file {} cannot be read: {e}",
                        path.display()
                    ))
                })?;
                assertion = text.trim().to_owned();
                form.push(("client_assertion_type", ASSERTION_TYPE));
                form.push(("client_assertion", &assertion));
            }
            Credential::Managed(_) => unreachable!("a managed identity sends no form"),
        }
        Ok(self
            .http
            .post(self.endpoint.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&form))
    }

    fn transport_error(&self, e: &reqwest::Error) -> TokenError {
        let endpoint = self.endpoint.to_string();
        if e.is_timeout() {
            let (timeout, setting) = if e.is_connect() {
                (
                    self.connect_timeout,
                    "mailRelay.token.connectTimeoutSeconds",
                )
            } else {
                (
                    self.request_timeout,
                    "mailRelay.token.requestTimeoutSeconds",
                )
            };
            TokenError::Timeout {
                endpoint,
                timeout,
                setting,
            }
        } else {
            TokenError::Network {
                endpoint,
                detail: crate::causes::line(e),
            }
        }
    }
}

/// Plain http only to loopback (tests, a local proxy): the request carries the client secret.
/// A managed identity's endpoint may also be link-local (IMDS): it is the platform's own.
fn check_endpoint(url: &Url, managed: bool) -> Result<(), TokenError> {
    // The same rule as the settings check, so an endpoint that passed it works here too.
    let local = url.host_str().is_some_and(|host| {
        if managed {
            crate::config::is_host_local(host)
        } else {
            crate::config::is_loopback_host(host)
        }
    });
    match url.scheme() {
        "https" => Ok(()),
        "http" if local => Ok(()),
        _ => Err(TokenError::InsecureEndpoint {
            endpoint: url.to_string(),
        }),
    }
}

#[derive(Deserialize)]
struct SuccessBody {
    access_token: Option<String>,
    token_type: Option<String>,
    /// A number, or (seen in the wild, and always from IMDS) a string of digits.
    expires_in: Option<serde_json::Value>,
    /// Seconds since the epoch: all App Service's identity endpoint gives.
    expires_on: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
    #[serde(default)]
    error_codes: Vec<u64>,
    trace_id: Option<String>,
    correlation_id: Option<String>,
    timestamp: Option<String>,
}

/// Turns the endpoint's answer into a token or the matching error.
pub(crate) fn interpret(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Fetched, TokenError> {
    let code = status.as_u16();
    if status.is_success() {
        return parse_success(code, headers, body);
    }
    let retry_after = retry_after(headers);
    let error_body = serde_json::from_slice::<ErrorBody>(body).ok();
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Err(TokenError::Throttled { retry_after });
    }
    if status.is_server_error() {
        let (trace_id, correlation_id) = error_body
            .map(|b| (b.trace_id, b.correlation_id))
            .unwrap_or_default();
        return Err(TokenError::Unavailable {
            status: code,
            retry_after,
            trace_id,
            correlation_id,
        });
    }
    match error_body {
        Some(ErrorBody {
            error: Some(error),
            error_description,
            error_codes,
            trace_id,
            correlation_id,
            timestamp,
        }) => {
            let description = error_description
                .as_deref()
                .and_then(|d| d.lines().next())
                .unwrap_or_default()
                .trim()
                .to_owned();
            Err(TokenError::Rejected(Box::new(EntraError {
                status: code,
                error,
                error_codes,
                description,
                trace_id,
                correlation_id,
                timestamp,
            })))
        }
        _ => Err(TokenError::InvalidResponse {
            status: code,
            detail: format!(
                "a body that is not Entra ID's error JSON ({})",
                describe(headers, body)
            ),
            // A 404 or 405 here means a wrong URL, which no retry fixes.
            transient: false,
        }),
    }
}

pub(super) fn parse_success(
    code: u16,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Fetched, TokenError> {
    let invalid = |detail: String, transient| TokenError::InvalidResponse {
        status: code,
        detail,
        transient,
    };
    // serde_json's message could quote part of the body (the token): report only where it broke.
    let parsed: SuccessBody = serde_json::from_slice(body).map_err(|e| {
        invalid(
            format!(
                "a body that is not JSON ({}; invalid at line {} column {})",
                describe(headers, body),
                e.line(),
                e.column()
            ),
            true,
        )
    })?;
    let access_token = match parsed.access_token {
        Some(t) if !t.trim().is_empty() => SecretString::from(t),
        _ => return Err(invalid("JSON without an access_token".into(), false)),
    };
    if let Some(kind) = &parsed.token_type
        && !kind.eq_ignore_ascii_case("bearer")
    {
        return Err(invalid(
            format!("token_type {kind:?} where Bearer was expected"),
            false,
        ));
    }
    let number = |value: &Option<serde_json::Value>| match value {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::String(s)) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    let seconds = number(&parsed.expires_in).or_else(|| {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(number(&parsed.expires_on)?);
        at.duration_since(SystemTime::now())
            .ok()
            .map(|left| left.as_secs())
    });
    match seconds {
        Some(s) if s > 0 => Ok(Fetched {
            access_token,
            lifetime: Duration::from_secs(s),
        }),
        _ => Err(invalid(
            "JSON without a positive expires_in (seconds, as a number or a string) or a future expires_on".into(),
            false,
        )),
    }
}

pub(super) fn describe(headers: &HeaderMap, body: &[u8]) -> String {
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("no content type");
    format!("{content_type}, {} bytes", body.len())
}

/// `Retry-After` as seconds or as an HTTP date (Entra ID and Graph both send it).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn json_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h
    }

    #[test]
    fn expires_in_as_number_or_string() {
        for body in [
            r#"{"token_type":"Bearer","expires_in":3599,"access_token":"abc"}"#,
            r#"{"token_type":"Bearer","expires_in":"3599","access_token":"abc"}"#,
        ] {
            let f = interpret(StatusCode::OK, &json_headers(), body.as_bytes()).unwrap();
            assert_eq!(f.lifetime, Duration::from_secs(3599));
            assert_eq!(f.access_token.expose_secret(), "abc");
        }
    }

    #[test]
    fn ok_without_token_is_an_error() {
        let e = interpret(
            StatusCode::OK,
            &json_headers(),
            br#"{"token_type":"Bearer","expires_in":3599}"#,
        )
        .unwrap_err();
        assert!(matches!(
            e,
            TokenError::InvalidResponse {
                transient: false,
                ..
            }
        ));
        assert!(e.to_string().contains("access_token"));
    }

    #[test]
    fn html_from_a_proxy_is_transient_and_not_quoted() {
        let e = interpret(
            StatusCode::OK,
            &HeaderMap::new(),
            b"<html>secret-ish</html>",
        )
        .unwrap_err();
        assert!(e.is_transient());
        assert!(!e.to_string().contains("secret-ish"));
    }

    #[test]
    fn retry_after_seconds_and_date() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("12"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(12)));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        h.insert(RETRY_AFTER, HeaderValue::from_str(&later).unwrap());
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
    }

    #[test]
    fn only_loopback_may_use_http() {
        for ok in [
            "https://login.microsoftonline.com/t/oauth2/v2.0/token",
            "http://127.0.0.1:8080/token",
            "http://localhost/token",
            "http://[::1]:9/token",
        ] {
            assert!(
                check_endpoint(&Url::parse(ok).unwrap(), false).is_ok(),
                "{ok}"
            );
        }
        let e = check_endpoint(
            &Url::parse("http://login.microsoftonline.com/t").unwrap(),
            false,
        )
        .unwrap_err();
        assert!(e.to_string().contains("must use https"));
        // IMDS is link-local: fine for a managed identity, never for a secret.
        let imds = Url::parse("http://169.254.169.254/metadata/identity/oauth2/token").unwrap();
        assert!(check_endpoint(&imds, true).is_ok());
        assert!(check_endpoint(&imds, false).is_err());
        let remote = Url::parse("http://10.0.0.1/msi/token").unwrap();
        assert!(check_endpoint(&remote, true).is_err());
    }
}
