//! `POST /mail`: the endpoint web clients call.
//! (Stub: the message helper fills this in.)

use axum::extract::State;

use super::ApiError;
use crate::app::AppState;

/// Send one mail.
#[utoipa::path(post, path = "/mail", tag = "mail",
    responses((status = 202, description = "The SMTP server accepted the mail")))]
pub async fn send_mail(State(_state): State<AppState>) -> Result<(), ApiError> {
    Err(ApiError::Internal)
}
