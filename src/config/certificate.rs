//! The certificate credential (`oAuthCertificate` with `oAuthPrivateKey`): read once, while the
//! settings are read, and handed to the token client ready to sign.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Why a certificate, its key or the pair cannot be used. No variant quotes key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertificateError {
    #[error("the certificate (oAuthCertificate) is not a PEM certificate: {0}")]
    Certificate(String),
    #[error(
        "the private key (oAuthPrivateKey) is not an RSA private key in PEM (PKCS#8 or PKCS#1): {0}"
    )]
    PrivateKey(String),
    #[error("the certificate (oAuthCertificate) does not hold an RSA public key: {0}")]
    PublicKey(String),
    #[error(
        "the private key (oAuthPrivateKey) does not belong to the certificate (oAuthCertificate); configure the key the certificate was made from"
    )]
    Mismatch,
    #[error("signing the client assertion failed: {0}")]
    Signing(String),
}

/// The certificate uploaded to the app registration: public, but long, so `Debug` shows its
/// thumbprint only.
#[derive(Clone)]
pub struct Certificate {
    pem: String,
    /// base64url SHA-256 of the certificate's DER: the `x5t#S256` header.
    thumbprint: String,
}

impl Certificate {
    pub fn from_pem(pem: &str) -> Result<Self, CertificateError> {
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| CertificateError::Certificate(e.to_string()))?;
        Ok(Self {
            pem: pem.to_owned(),
            thumbprint: URL_SAFE_NO_PAD.encode(Sha256::digest(der.as_ref())),
        })
    }
}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificate")
            .field("x5t#S256", &self.thumbprint)
            .finish_non_exhaustive()
    }
}

/// The certificate's RSA private key. `Debug` prints a placeholder, never the key.
#[derive(Clone)]
pub struct PrivateKey(EncodingKey);

impl PrivateKey {
    /// PEM, PKCS#8 (`BEGIN PRIVATE KEY`) or PKCS#1 (`BEGIN RSA PRIVATE KEY`), RSA only.
    pub fn from_pem(pem: &SecretString) -> Result<Self, CertificateError> {
        let pem = pem.expose_secret().as_bytes();
        // Neither error text quotes the key material.
        PrivateKeyDer::from_pem_slice(pem)
            .map_err(|e| CertificateError::PrivateKey(e.to_string()))?;
        EncodingKey::from_rsa_pem(pem)
            .map(Self)
            .map_err(|e| CertificateError::PrivateKey(e.to_string()))
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(****)")
    }
}

/// A certificate and the private key that belongs to it.
#[derive(Clone)]
pub struct CertificateCredential {
    certificate: Certificate,
    key: PrivateKey,
}

impl fmt::Debug for CertificateCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateCredential")
            .field("x5t#S256", &self.certificate.thumbprint)
            .finish_non_exhaustive()
    }
}

/// What the pair check signs: just enough for a validation to pass.
#[derive(Serialize, Deserialize)]
struct Probe {
    aud: String,
    exp: u64,
}

impl CertificateCredential {
    /// Both halves from PEM, and the pair check.
    pub fn from_pem(
        certificate_pem: &str,
        private_key_pem: &SecretString,
    ) -> Result<Self, CertificateError> {
        Self::pair(
            Certificate::from_pem(certificate_pem)?,
            PrivateKey::from_pem(private_key_pem)?,
        )
    }

    /// Checks that the key belongs to the certificate by signing and verifying a probe, so a
    /// mismatch is a settings error at start rather than Entra's AADSTS700027 on the first mail.
    pub fn pair(certificate: Certificate, key: PrivateKey) -> Result<Self, CertificateError> {
        let public = DecodingKey::from_rsa_pem(certificate.pem.as_bytes())
            .map_err(|e| CertificateError::PublicKey(e.to_string()))?;
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + Duration::from_secs(60).as_secs();
        let probe = Probe {
            aud: "probe".into(),
            exp,
        };
        let signed = jsonwebtoken::encode(&Header::new(Algorithm::PS256), &probe, &key.0)
            .map_err(|e| CertificateError::Signing(e.to_string()))?;
        let mut validation = Validation::new(Algorithm::PS256);
        validation.set_audience(&["probe"]);
        jsonwebtoken::decode::<Probe>(&signed, &public, &validation)
            .map_err(|_| CertificateError::Mismatch)?;
        Ok(Self { certificate, key })
    }

    /// The `x5t#S256` thumbprint Entra ID shows for the uploaded certificate (base64url form).
    pub fn thumbprint(&self) -> &str {
        &self.certificate.thumbprint
    }

    /// The certificate's PEM text, as configured (`check-config` prints its length).
    pub fn certificate_pem(&self) -> &str {
        &self.certificate.pem
    }

    /// The key to sign client assertions with; only the token client signs.
    pub fn signing_key(&self) -> &EncodingKey {
        &self.key.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERTIFICATE: &str = include_str!("../../tests/fixtures/config/oauth-cert.pem");
    const KEY: &str = include_str!("../../tests/fixtures/config/oauth-key.pem");
    const EC_KEY: &str = include_str!("../../tests/fixtures/config/ec-key.pem");

    fn key(text: &str) -> SecretString {
        SecretString::from(text.to_owned())
    }

    #[test]
    fn the_fixture_pair_parses_with_its_thumbprint() {
        let credential = CertificateCredential::from_pem(CERTIFICATE, &key(KEY)).unwrap();
        let der = CertificateDer::from_pem_slice(CERTIFICATE.as_bytes()).unwrap();
        let expected = URL_SAFE_NO_PAD.encode(Sha256::digest(der.as_ref()));
        assert_eq!(credential.thumbprint(), expected);
        assert_eq!(credential.certificate_pem(), CERTIFICATE);
    }

    #[test]
    fn debug_never_shows_the_key() {
        let credential = CertificateCredential::from_pem(CERTIFICATE, &key(KEY)).unwrap();
        let private_key = PrivateKey::from_pem(&key(KEY)).unwrap();
        let shown = format!(
            "{credential:?} {private_key:?} {:?}",
            credential.certificate
        );
        for line in KEY.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!shown.contains(line), "{shown}");
        }
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
        assert!(shown.contains(credential.thumbprint()), "{shown}");
    }

    #[test]
    fn broken_halves_are_told_apart_without_quoting_the_key() {
        assert!(matches!(
            Certificate::from_pem("not a certificate"),
            Err(CertificateError::Certificate(_))
        ));
        for text in [EC_KEY, CERTIFICATE, "garbage"] {
            let error = PrivateKey::from_pem(&key(text)).unwrap_err();
            assert!(matches!(error, CertificateError::PrivateKey(_)), "{error}");
            assert!(!error.to_string().contains("BEGIN"), "{error}");
        }
    }
}
