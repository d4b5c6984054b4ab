//! The certificate credential's client assertion: a JWT signed with the app's private key.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, Header};
use serde::{Deserialize, Serialize};

use super::TokenError;
use crate::config::CertificateCredential;

/// `client_assertion_type` for a JWT client assertion (RFC 7523).
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How long a signed assertion is valid: Entra ID wants a few minutes.
const LIFETIME: Duration = Duration::from_secs(10 * 60);

/// Claims of the client assertion, as Entra ID documents them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AssertionClaims {
    pub aud: String,
    pub iss: String,
    pub sub: String,
    pub jti: String,
    pub nbf: u64,
    pub iat: u64,
    pub exp: u64,
}

/// A freshly signed assertion for `client_id` at `token_url`, with the certificate's key.
pub(super) fn sign_assertion(
    certificate: &CertificateCredential,
    client_id: &str,
    token_url: &str,
    now: SystemTime,
) -> Result<String, TokenError> {
    let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let claims = AssertionClaims {
        aud: token_url.to_owned(),
        iss: client_id.to_owned(),
        sub: client_id.to_owned(),
        jti: uuid::Uuid::new_v4().to_string(),
        nbf: now,
        iat: now,
        exp: now + LIFETIME.as_secs(),
    };
    let mut header = Header::new(Algorithm::PS256);
    header.typ = Some("JWT".into());
    header.x5t_s256 = Some(certificate.thumbprint().to_owned());
    jsonwebtoken::encode(&header, &claims, certificate.signing_key())
        .map_err(|e| TokenError::Credential(format!("signing the client assertion failed: {e}")))
}
