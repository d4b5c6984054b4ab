//! The certificate credential: a client-assertion JWT signed with the app's private key.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::TokenError;

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

/// A certificate and its private key, parsed once at start-up.
pub struct CertificateCredential {
    key: EncodingKey,
    /// base64url SHA-256 of the certificate's DER: the `x5t#S256` header.
    thumbprint: String,
}

impl fmt::Debug for CertificateCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateCredential")
            .field("x5t#S256", &self.thumbprint)
            .finish_non_exhaustive()
    }
}

impl CertificateCredential {
    /// Parse the PEM pair and check that the key belongs to the certificate, so a mismatch
    /// is reported at start-up rather than as Entra's AADSTS700027 on the first mail.
    pub fn from_pem(
        certificate_pem: &str,
        private_key_pem: &SecretString,
    ) -> Result<Self, TokenError> {
        let der = CertificateDer::from_pem_slice(certificate_pem.as_bytes()).map_err(|e| {
            TokenError::Credential(format!(
                "the certificate (oAuthCertificate) is not a PEM certificate: {e}"
            ))
        })?;
        // jsonwebtoken's error text never quotes the key material.
        let key = EncodingKey::from_rsa_pem(private_key_pem.expose_secret().as_bytes()).map_err(|e| {
            TokenError::Credential(format!(
                "the private key (oAuthPrivateKey) is not an RSA private key in PEM (PKCS#8 or PKCS#1): {e}"
            ))
        })?;
        let thumbprint = URL_SAFE_NO_PAD.encode(Sha256::digest(der.as_ref()));
        let credential = Self { key, thumbprint };
        credential.check_pair(certificate_pem)?;
        Ok(credential)
    }

    /// The `x5t#S256` thumbprint Entra ID shows for the uploaded certificate (base64url form).
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    /// A freshly signed assertion for `client_id` at `token_url`.
    pub fn sign(
        &self,
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
        jsonwebtoken::encode(&self.header(), &claims, &self.key).map_err(|e| {
            TokenError::Credential(format!("signing the client assertion failed: {e}"))
        })
    }

    fn header(&self) -> Header {
        let mut header = Header::new(Algorithm::PS256);
        header.typ = Some("JWT".into());
        header.x5t_s256 = Some(self.thumbprint.clone());
        header
    }

    fn check_pair(&self, certificate_pem: &str) -> Result<(), TokenError> {
        let public = DecodingKey::from_rsa_pem(certificate_pem.as_bytes()).map_err(|e| {
            TokenError::Credential(format!(
                "the certificate (oAuthCertificate) does not hold an RSA public key: {e}"
            ))
        })?;
        let probe = self.sign("probe", "probe", SystemTime::now())?;
        let mut validation = Validation::new(Algorithm::PS256);
        validation.set_audience(&["probe"]);
        jsonwebtoken::decode::<AssertionClaims>(&probe, &public, &validation).map_err(|_| {
            TokenError::Credential(
                "the private key (oAuthPrivateKey) does not belong to the certificate (oAuthCertificate); configure the key the certificate was made from".into(),
            )
        })?;
        Ok(())
    }
}
