//! The token step: one request to Entra ID, its answer explained, the token's claims read.

use std::time::SystemTime;

use secrecy::ExposeSecret;

use super::SE;
use super::report::Step;
use crate::config::{ClientCredential, OAuthSettings};
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
                format!("{summary}: Entra ID refused the request ({codes}, {})", entra.error),
                format!("{}{ids}", known.meaning),
                vec![known.fix.to_owned()],
            ),
            None => Step::fail(
                "token",
                format!("{summary}: Entra ID refused the request ({codes}, {})", entra.error),
                format!("{}{ids}", entra.description),
                vec![
                    "look the AADSTS code up at https://login.microsoftonline.com/error?code=<number>".into(),
                ],
            ),
        };
    }
    let managed = matches!(oauth.credential, ClientCredential::ManagedIdentity(_));
    let fix = match error {
        TokenError::Network { .. } | TokenError::Timeout { .. } if managed => vec![format!(
            "nothing answers at {}: the managed identity endpoint exists only where the platform runs it (IMDS on Azure VMs, IDENTITY_ENDPOINT on App Service and Container Apps) once the identity is turned on; check {SE}.oAuthManagedIdentity and oAuthTokenEndpoint",
            oauth.token_endpoint
        )],
        TokenError::Network { .. } => vec![format!(
            "check {SE}.oAuthTokenEndpoint, and that this host can reach login.microsoftonline.com on port 443 (proxy, firewall, DNS)"
        )],
        TokenError::Timeout { .. } => vec![
            "a firewall may drop the connection: allow outbound HTTPS to login.microsoftonline.com"
                .into(),
            "or raise mailRelay.token.connectTimeoutSeconds / requestTimeoutSeconds".into(),
        ],
        TokenError::Throttled { .. } | TokenError::Unavailable { .. } => {
            vec!["Entra ID is throttling or failing: try again in a few minutes".into()]
        }
        TokenError::InvalidResponse { .. } => vec![format!(
            "{SE}.oAuthTokenEndpoint must be Entra ID's v2.0 token URL (https://login.microsoftonline.com/#TenantID#/oauth2/v2.0/token)"
        )],
        TokenError::Credential(_) => vec![format!(
            "{SE}.oAuthCertificate and oAuthPrivateKey must be the certificate uploaded to the app registration and its RSA key"
        )],
        TokenError::InsecureEndpoint { .. } => {
            vec![format!("use an https URL in {SE}.oAuthTokenEndpoint")]
        }
        // The text says the fix already.
        TokenError::Setup(_)
        | TokenError::Rejected(_)
        | TokenError::ManagedIdentityRefused { .. } => Vec::new(),
    };
    Step::fail("token", summary, error.to_string(), fix)
}
