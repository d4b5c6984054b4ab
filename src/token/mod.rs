//! App-only access tokens from Entra ID (OAuth2 client credentials), kept in one shared cache.
//!
//! [`TokenCache`] is the real [`TokenProvider`]; the SMTP side holds it as `Arc<dyn TokenProvider>`.

mod assertion;
mod cache;
mod claims;
mod client;
mod error;
mod managed;

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

pub use assertion::{ASSERTION_TYPE, AssertionClaims};
pub use cache::{CacheKey, CacheOptions, RetryPolicy, TokenCache};
pub use claims::TokenClaims;
pub use client::{Fetched, TokenClient, retry_after};
pub use error::{EntraError, TokenError};

/// An access token. `Debug` shows only its fingerprint and expiry.
#[derive(Clone)]
pub struct AccessToken {
    secret: Arc<SecretString>,
    expires_at: SystemTime,
}

impl AccessToken {
    pub fn new(secret: SecretString, expires_at: SystemTime) -> Self {
        Self {
            secret: Arc::new(secret),
            expires_at,
        }
    }

    /// The bearer value, for the XOAUTH2 initial response only.
    pub fn expose(&self) -> &str {
        self.secret.expose_secret()
    }

    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }

    /// True when both are the very same token (not merely equal text).
    pub fn same_as(&self, other: &AccessToken) -> bool {
        Arc::ptr_eq(&self.secret, &other.secret)
    }

    /// First 8 hex digits of the token's SHA-256: tells tokens apart in logs without revealing them.
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(self.expose().as_bytes());
        hex::encode(&digest[..4])
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("fingerprint", &self.fingerprint())
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// What health and metrics show of the cache.
#[derive(Debug, Clone, Default)]
pub struct TokenState {
    pub has_token: bool,
    pub expires_at: Option<SystemTime>,
    pub last_error: Option<String>,
    /// The last error's stable code ([`TokenError::code`]), for the public probe, which shows no
    /// text from Entra ID.
    pub last_error_code: Option<&'static str>,
    /// Requests to the token endpoint, failed ones included.
    pub fetch_count: u64,
    /// Of those, the ones that failed.
    pub failed_fetches: u64,
}

/// The shared token cache, as the SMTP side sees it.
#[async_trait]
pub trait TokenProvider: Send + Sync + 'static {
    /// A token valid for at least the grace time, fetched only when needed.
    async fn token(&self) -> Result<AccessToken, TokenError>;
    /// Drop exactly this token (after the SMTP server refused it); a replaced one is ignored.
    fn invalidate(&self, token: &AccessToken);
    fn state(&self) -> TokenState;
}
