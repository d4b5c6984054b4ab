//! The token step: one request to Entra ID, its answer explained, the token's claims read.

use std::time::SystemTime;

use secrecy::ExposeSecret;

use super::report::Step;
use crate::config::{ClientCredential, OAuthSettings};
use crate::remedy::Setup;
use crate::token::{AccessToken, TokenClaims, TokenClient, TokenError};

pub(super) async fn fetch_token(
    oauth: &OAuthSettings,
) -> Result<(AccessToken, TokenClaims, Step), Step> {
    let client = TokenClient::new(oauth).map_err(|e| token_failed(oauth, &e))?;
    let now = SystemTime::now();
    let fetched = client
        .fetch(now)
        .await
        .map_err(|e| token_failed(oauth, &e))?;
    let claims = TokenClaims::read(fetched.access_token.expose_secret());
    let token = AccessToken::new(fetched.access_token, now + fetched.lifetime);
    let mut summary = format!(
        "{} issued a token for client {} (fingerprint {}, valid {} min)",
        client.endpoint().host_str().unwrap_or("the token endpoint"),
        oauth.client_id,
        token.fingerprint(),
        fetched.lifetime.as_secs() / 60
    );
    if claims.readable {
        summary.push_str(&format!(
            "; audience {}, roles {}",
            claims.audience.as_deref().unwrap_or("(none)"),
            if claims.roles.is_empty() {
                "(none)".to_owned()
            } else {
                claims.roles.join(" ")
            }
        ));
    }
    Ok((token, claims, Step::pass("token", summary)))
}

/// Cause and fix for every way the token request fails; Entra's codes through [`TokenError`].
pub fn token_failed(oauth: &OAuthSettings, error: &TokenError) -> Step {
    let summary = format!(
        "no access token from {}",
        oauth
            .token_endpoint
            .host_str()
            .unwrap_or("the token endpoint")
    );
    if let Some(entra) = error.entra() {
        let codes = entra
            .error_codes
            .iter()
            .map(|c| format!("AADSTS{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let ids = match (&entra.trace_id, &entra.correlation_id) {
            (Some(t), Some(c)) => format!("; trace id {t}, correlation id {c}"),
            _ => String::new(),
        };
        return match entra.known() {
            Some(known) => Step::fail(
                "token",
                format!(
                    "{summary}: Entra ID refused the request ({codes}, {})",
                    entra.error
                ),
                format!("{}{ids}", known.meaning),
                vec![known.fix.to_owned()],
            ),
            None => Step::fail(
                "token",
                format!(
                    "{summary}: Entra ID refused the request ({codes}, {})",
                    entra.error
                ),
                format!("{}{ids}", entra.description),
                vec![Setup::UnknownAadsts.fix()],
            ),
        };
    }
    let managed = matches!(oauth.credential, ClientCredential::ManagedIdentity(_));
    let fix = match error {
        TokenError::Network { .. } | TokenError::Timeout { .. } if managed => {
            vec![
                Setup::ManagedIdentityUnreachable {
                    endpoint: oauth.token_endpoint.as_str(),
                }
                .fix(),
            ]
        }
        TokenError::Network { .. } => vec![Setup::TokenEndpointUnreachable.fix()],
        TokenError::Timeout { .. } => vec![Setup::TokenFirewall.fix(), Setup::TokenTimeouts.fix()],
        TokenError::Throttled { .. } | TokenError::Unavailable { .. } => {
            vec![Setup::EntraFailing.fix()]
        }
        TokenError::InvalidResponse { .. } => vec![Setup::TokenEndpointNotV2.fix()],
        TokenError::Credential(_) => vec![Setup::CertificatePair.fix()],
        TokenError::InsecureEndpoint { .. } => vec![Setup::HttpsTokenEndpoint.fix()],
        // The text says the fix already.
        TokenError::Setup(_)
        | TokenError::Rejected(_)
        | TokenError::ManagedIdentityRefused { .. } => Vec::new(),
    };
    Step::fail("token", summary, error.to_string(), fix)
}
