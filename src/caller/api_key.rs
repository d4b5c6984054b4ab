//! Services' API keys: only their SHA-256 is kept, and a presented key is compared with every one
//! in constant time.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{AuthError, Caller};
use crate::config::AddressPattern;

/// Prefix of keys made by `mail-relay hash-key`, so they are recognisable in secret scanners.
pub(super) const API_KEY_PREFIX: &str = "mr_";

pub(super) struct ApiKeyEntry {
    pub(super) name: String,
    pub(super) sha256: [u8; 32],
    pub(super) allowed_from: Arc<[AddressPattern]>,
}

/// The caller whose key was presented.
pub(super) fn find(keys: &[ApiKeyEntry], presented: &str) -> Result<Caller, AuthError> {
    let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    // Compare with every key, in constant time, so timing tells nothing about near matches.
    let mut found = None;
    for entry in keys {
        if bool::from(entry.sha256.ct_eq(&digest)) {
            found = Some(entry);
        }
    }
    found
        .map(|entry| Caller::ApiKey {
            name: entry.name.clone(),
            allowed_from: entry.allowed_from.clone(),
        })
        .ok_or(AuthError::UnknownApiKey)
}

/// A new random API key and the SHA-256 (hex) to put in the settings: `(key, hash)`.
pub fn new_api_key() -> (String, String) {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let key = format!("{API_KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
    let hash = hex::encode(Sha256::digest(key.as_bytes()));
    (key, hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_api_keys_are_random_and_hash_to_their_hash() {
        let (a, hash_a) = new_api_key();
        let (b, _) = new_api_key();
        assert_ne!(a, b);
        assert!(a.starts_with(API_KEY_PREFIX) && !a.contains('.'));
        assert_eq!(hash_a, hex::encode(Sha256::digest(a.as_bytes())));
    }
}
