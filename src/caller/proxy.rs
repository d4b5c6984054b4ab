//! A user named by a trusted reverse proxy: believed only from the proxy's own address, with its
//! shared secret when one is set, and never for a browser page from an unlisted origin.

use std::net::IpAddr;

use axum::http::{HeaderMap, HeaderValue, header};
use secrecy::ExposeSecret;
use subtle::ConstantTimeEq;

use super::{AuthError, Caller, UserSource};
use crate::config::TrustedProxySettings;
use crate::message::EmailAddress;

/// The proxy's user, when its header came from a configured source; from anywhere else it is
/// ignored.
pub(super) fn user(
    proxy: &TrustedProxySettings,
    allowed_origins: &[HeaderValue],
    headers: &HeaderMap,
    peer: IpAddr,
) -> Result<Option<Caller>, AuthError> {
    let Some(value) = headers.get(&proxy.user_header) else {
        return Ok(None);
    };
    if !proxy.sources.iter().any(|net| net.contains(&peer)) {
        tracing::warn!(%peer, header = %proxy.user_header, "user header from an untrusted address ignored");
        return Ok(None);
    }
    if let Some(secret) = &proxy.secret {
        let sent = headers
            .get(&secret.header)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !bool::from(sent.ct_eq(secret.value.expose_secret().as_bytes())) {
            return Err(AuthError::ProxySecretMismatch);
        }
    }
    // A proxy that appends rather than replaces would let the client's own header come first.
    if headers.get_all(&proxy.user_header).iter().count() != 1 {
        return Err(AuthError::ProxyUserInvalid);
    }
    let address = value
        .to_str()
        .map_err(|_| AuthError::ProxyUserInvalid)?
        .trim();
    if address.contains([',', ';', '<', '>', '"']) {
        return Err(AuthError::ProxyUserInvalid);
    }
    // Parsed as From addresses are, so an IDN domain compares in the same (punycode) form.
    let address = EmailAddress::parse(address).map_err(|_| AuthError::ProxyUserInvalid)?;
    // Form posts are "simple" requests that browsers send cross-site without asking, with
    // the proxy's cookie: only listed origins may send as the logged-in user.
    if let Some(origin) = headers.get(header::ORIGIN)
        && !allowed_origins.contains(origin)
    {
        return Err(AuthError::ForeignOrigin(
            String::from_utf8_lossy(origin.as_bytes()).into_owned(),
        ));
    }
    Ok(Some(Caller::User {
        address: address.as_str().to_ascii_lowercase(),
        via: UserSource::TrustedProxy,
    }))
}
