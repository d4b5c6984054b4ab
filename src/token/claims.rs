//! What an access token says of itself: its audience and app roles, read from the JWT payload
//! without checking the signature (the relay got it from the token endpoint; it only reads it).

use base64::Engine as _;

/// The non-secret claims of an access token that explain an AUTH refusal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenClaims {
    pub audience: Option<String>,
    pub roles: Vec<String>,
    /// The claims could be read at all (Entra's tokens are JWTs; other issuers' may not be).
    pub readable: bool,
}

impl TokenClaims {
    /// Reads the JWT payload without checking the signature: only to print it.
    pub fn read(token: &str) -> Self {
        let payload = token.split('.').nth(1).and_then(|part| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(part.trim_end_matches('='))
                .ok()
        });
        let Some(json) =
            payload.and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        else {
            return Self::default();
        };
        let audience = match &json["aud"] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(items) => Some(
                items
                    .iter()
                    .filter_map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            _ => None,
        };
        let roles = json["roles"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            audience,
            roles,
            readable: true,
        }
    }

    /// The token is readable and does not carry `role`.
    pub fn lacks(&self, role: &str) -> bool {
        self.readable && !self.has(role)
    }

    pub fn has(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    pub fn lacks_send_as_app(&self) -> bool {
        self.lacks("SMTP.SendAsApp")
    }
}
