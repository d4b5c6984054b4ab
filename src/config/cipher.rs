//! `{cipher}` values: secrets encrypted at rest with AES-256-GCM.
//!
//! Format: `{cipher}` + standard base64 of `nonce (12 bytes) || ciphertext || tag (16 bytes)`.
//! The key (32 bytes) comes from `MAIL_RELAY_ENCRYPT_KEY` (base64) or from the file named by
//! `MAIL_RELAY_ENCRYPT_KEY_FILE` (base64 text or the 32 raw bytes); `openssl rand -base64 32`
//! makes one.

use std::path::PathBuf;

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use secrecy::SecretString;

/// Marks an encrypted value.
pub const PREFIX: &str = "{cipher}";
/// Environment variable holding the key, base64.
pub const ENV_KEY: &str = "MAIL_RELAY_ENCRYPT_KEY";
/// Environment variable naming a file that holds the key.
pub const ENV_KEY_FILE: &str = "MAIL_RELAY_ENCRYPT_KEY_FILE";

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// Why a key could not be had or a value not decrypted. Never carries key or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum CipherError {
    #[error(
        "no encryption key: set {ENV_KEY} (base64 of 32 bytes, e.g. from `openssl rand -base64 32`) or {ENV_KEY_FILE}"
    )]
    NoKey,
    #[error("both {ENV_KEY} and {ENV_KEY_FILE} are set; set only one")]
    TwoKeys,
    #[error(
        "{source_name} is not a valid key: {problem}; it must be 32 bytes, base64-encoded (`openssl rand -base64 32`)"
    )]
    BadKey {
        source_name: String,
        problem: &'static str,
    },
    #[error("cannot read the key file {path} named by {ENV_KEY_FILE}: {source}")]
    KeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the {{cipher}} value is not valid base64; encrypt the secret again with `mail-relay encrypt-secret`"
    )]
    NotBase64,
    #[error(
        "the {{cipher}} value is too short to be an encrypted value; encrypt the secret again with `mail-relay encrypt-secret`"
    )]
    TooShort,
    #[error(
        "cannot decrypt the {{cipher}} value: the key ({ENV_KEY} or {ENV_KEY_FILE}) is not the one it was encrypted with, or the value is damaged"
    )]
    WrongKeyOrDamaged,
    #[error("the decrypted {{cipher}} value is not UTF-8 text")]
    NotUtf8,
    #[error("encryption failed")]
    Encrypt,
}

/// A 32-byte AES-256-GCM key.
#[derive(Clone)]
pub struct EncryptionKey(Aes256Gcm);

impl std::fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EncryptionKey(****)")
    }
}

impl EncryptionKey {
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        Self(Aes256Gcm::new(bytes.into()))
    }

    /// A key written as base64 text; `source_name` says where it came from, for the error.
    pub fn from_base64(text: &str, source_name: &str) -> Result<Self, CipherError> {
        let bad = |problem| CipherError::BadKey {
            source_name: source_name.to_owned(),
            problem,
        };
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|_| bad("not base64"))?;
        let bytes: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| bad("not 32 bytes long"))?;
        Ok(Self::from_bytes(&bytes))
    }

    /// The key configured in the environment snapshot; [`CipherError::NoKey`] when none is.
    pub fn from_env(env: &[(String, String)]) -> Result<Self, CipherError> {
        let get = |name: &str| {
            env.iter()
                .rev()
                .find(|(k, v)| k == name && !v.is_empty())
                .map(|(_, v)| v.as_str())
        };
        match (get(ENV_KEY), get(ENV_KEY_FILE)) {
            (Some(_), Some(_)) => Err(CipherError::TwoKeys),
            (Some(text), None) => Self::from_base64(text, ENV_KEY),
            (None, Some(path)) => {
                let path = PathBuf::from(path);
                let bytes = std::fs::read(&path).map_err(|source| CipherError::KeyFile {
                    path: path.clone(),
                    source,
                })?;
                // Base64 of 32 bytes is 44 characters, so 32 bytes can only be the raw key.
                match <[u8; 32]>::try_from(bytes.as_slice()) {
                    Ok(raw) => Ok(Self::from_bytes(&raw)),
                    Err(_) => Self::from_base64(
                        std::str::from_utf8(&bytes).map_err(|_| CipherError::BadKey {
                            source_name: format!("key file {}", path.display()),
                            problem: "neither 32 raw bytes nor base64 text",
                        })?,
                        &format!("key file {}", path.display()),
                    ),
                }
            }
            (None, None) => Err(CipherError::NoKey),
        }
    }
}

/// Encrypt `plaintext` under `key` with a fresh random nonce; returns the `{cipher}...` value.
pub fn encrypt(key: &EncryptionKey, plaintext: &str) -> Result<String, CipherError> {
    let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
    let ciphertext = key
        .0
        .encrypt(&nonce, plaintext.as_bytes())
        .map_err(|_| CipherError::Encrypt)?;
    let mut blob = Vec::with_capacity(NONCE_LEN + ciphertext.len());
    blob.extend_from_slice(&nonce);
    blob.extend_from_slice(&ciphertext);
    Ok(format!("{PREFIX}{}", STANDARD.encode(blob)))
}

/// Marks bytes [`seal`]ed at rest. A message's bytes never start with NUL.
const SEALED: &[u8] = b"\0mail-relay-sealed-v1\0";

/// `plaintext` encrypted under `key` with a fresh nonce, bound to `context` (e.g. the mail's
/// id, so that sealed bytes moved to another row do not open): `SEALED || nonce || ciphertext || tag`.
pub fn seal(key: &EncryptionKey, plaintext: &[u8], context: &[u8]) -> Result<Vec<u8>, CipherError> {
    use aes_gcm::aead::Payload;
    let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
    let ciphertext = key
        .0
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext,
                aad: context,
            },
        )
        .map_err(|_| CipherError::Encrypt)?;
    let mut blob = Vec::with_capacity(SEALED.len() + NONCE_LEN + ciphertext.len());
    blob.extend_from_slice(SEALED);
    blob.extend_from_slice(&nonce);
    blob.extend_from_slice(&ciphertext);
    Ok(blob)
}

/// Are these bytes [`seal`]ed?
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.starts_with(SEALED)
}

/// The plaintext of [`seal`]ed bytes, under the same `key` and `context`.
pub fn open(key: &EncryptionKey, sealed: &[u8], context: &[u8]) -> Result<Vec<u8>, CipherError> {
    use aes_gcm::aead::Payload;
    let blob = sealed.strip_prefix(SEALED).ok_or(CipherError::TooShort)?;
    if blob.len() < NONCE_LEN + TAG_LEN {
        return Err(CipherError::TooShort);
    }
    let (nonce, ciphertext) = blob.split_at(NONCE_LEN);
    key.0
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad: context,
            },
        )
        .map_err(|_| CipherError::WrongKeyOrDamaged)
}

/// Decrypt a `{cipher}...` value (the prefix is optional).
pub fn decrypt(key: &EncryptionKey, value: &str) -> Result<SecretString, CipherError> {
    let encoded = value.strip_prefix(PREFIX).unwrap_or(value).trim();
    let blob = STANDARD
        .decode(encoded)
        .map_err(|_| CipherError::NotBase64)?;
    if blob.len() < NONCE_LEN + TAG_LEN {
        return Err(CipherError::TooShort);
    }
    let (nonce, ciphertext) = blob.split_at(NONCE_LEN);
    let plaintext = key
        .0
        .decrypt(Nonce::from_slice(nonce), ciphertext)
        .map_err(|_| CipherError::WrongKeyOrDamaged)?;
    let text = String::from_utf8(plaintext).map_err(|_| CipherError::NotUtf8)?;
    Ok(SecretString::from(text))
}

/// Is `value` an encrypted value?
pub fn is_encrypted(value: &str) -> bool {
    value.starts_with(PREFIX)
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    fn key(byte: u8) -> EncryptionKey {
        EncryptionKey::from_bytes(&[byte; 32])
    }

    #[test]
    fn round_trip() {
        let value = encrypt(&key(1), "s3cr3t-value").unwrap();
        assert!(value.starts_with(PREFIX));
        assert!(!value.contains("s3cr3t"));
        assert_eq!(
            decrypt(&key(1), &value).unwrap().expose_secret(),
            "s3cr3t-value"
        );
    }

    #[test]
    fn nonces_differ_between_encryptions() {
        assert_ne!(
            encrypt(&key(1), "x").unwrap(),
            encrypt(&key(1), "x").unwrap()
        );
    }

    #[test]
    fn wrong_key_is_detected() {
        let value = encrypt(&key(1), "s3cr3t").unwrap();
        assert!(matches!(
            decrypt(&key(2), &value),
            Err(CipherError::WrongKeyOrDamaged)
        ));
    }

    #[test]
    fn garbled_values_are_detected() {
        assert!(matches!(
            decrypt(&key(1), "{cipher}!!!"),
            Err(CipherError::NotBase64)
        ));
        assert!(matches!(
            decrypt(&key(1), "{cipher}AAAA"),
            Err(CipherError::TooShort)
        ));
        let mut value = encrypt(&key(1), "s3cr3t").unwrap();
        value.pop();
        value.pop();
        value.push_str("A=");
        assert!(decrypt(&key(1), &value).is_err());
    }

    #[test]
    fn key_from_env_base64() {
        let env = vec![(ENV_KEY.to_owned(), STANDARD.encode([7u8; 32]))];
        let from_env = EncryptionKey::from_env(&env).unwrap();
        let value = encrypt(&key(7), "x").unwrap();
        assert_eq!(decrypt(&from_env, &value).unwrap().expose_secret(), "x");
    }

    #[test]
    fn key_of_wrong_length_is_rejected_without_showing_it() {
        let env = vec![(ENV_KEY.to_owned(), STANDARD.encode([7u8; 16]))];
        let err = EncryptionKey::from_env(&env).unwrap_err().to_string();
        assert!(err.contains("MAIL_RELAY_ENCRYPT_KEY"), "{err}");
        assert!(err.contains("32 bytes"), "{err}");
        assert!(!err.contains(&STANDARD.encode([7u8; 16])), "{err}");
    }

    #[test]
    fn key_file_raw_or_base64() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw");
        std::fs::write(&raw, [9u8; 32]).unwrap();
        let text = dir.path().join("text");
        std::fs::write(&text, format!("{}\n", STANDARD.encode([9u8; 32]))).unwrap();
        let value = encrypt(&key(9), "x").unwrap();
        for path in [raw, text] {
            let env = vec![(ENV_KEY_FILE.to_owned(), path.display().to_string())];
            let k = EncryptionKey::from_env(&env).unwrap();
            assert_eq!(decrypt(&k, &value).unwrap().expose_secret(), "x");
        }
    }

    #[test]
    fn no_key_says_which_variable_to_set() {
        let err = EncryptionKey::from_env(&[]).unwrap_err().to_string();
        assert!(err.contains(ENV_KEY) && err.contains(ENV_KEY_FILE), "{err}");
    }

    #[test]
    fn sealed_bytes_open_only_with_their_key_and_context() {
        let sealed = seal(&key(1), b"Subject: hi\r\n\r\nbody", b"mail-1").unwrap();
        assert!(is_sealed(&sealed) && !is_sealed(b"Subject: hi"));
        assert!(!sealed.windows(4).any(|w| w == b"body"));
        assert_eq!(
            open(&key(1), &sealed, b"mail-1").unwrap(),
            b"Subject: hi\r\n\r\nbody"
        );
        assert!(matches!(
            open(&key(2), &sealed, b"mail-1"),
            Err(CipherError::WrongKeyOrDamaged)
        ));
        assert!(matches!(
            open(&key(1), &sealed, b"mail-2"),
            Err(CipherError::WrongKeyOrDamaged)
        ));
    }

    #[test]
    fn debug_hides_the_key() {
        assert_eq!(format!("{:?}", key(1)), "EncryptionKey(****)");
    }
}
