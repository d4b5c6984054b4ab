//! The `Caller` extractor: authentication runs from the headers alone, before the body is read,
//! so an unauthenticated request costs no upload.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;

use super::ApiError;
use crate::app::AppState;
use crate::caller::Caller;

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            // A listener on `::` sees IPv4 peers as `::ffff:a.b.c.d`; the sources are written as IPv4.
            .map(|ConnectInfo(addr)| addr.ip().to_canonical())
            .ok_or_else(|| {
                tracing::error!("no peer address on the request: serve with connect info");
                ApiError::Internal
            })?;
        Ok(state
            .authenticator
            .authenticate(&parts.headers, peer)
            .await?)
    }
}
