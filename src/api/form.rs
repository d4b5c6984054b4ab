//! `POST /mail` as `multipart/form-data`: a `mail` part with the JSON request, and file parts
//! that become attachments, so browsers can upload files without base64.

use axum::extract::Multipart;
use axum::extract::multipart::MultipartError;
use axum::http::StatusCode;
use utoipa::ToSchema;

use bytes::Bytes;

use super::ApiError;
use super::errors::FieldError;
use super::json;
use crate::config::Limits;
use crate::idempotency::Fingerprint;
use crate::message::{MailRequest, UploadedFile};

/// The name of the form part that holds the JSON mail request.
pub const MAIL_PART: &str = "mail";
/// Prefix of a file part's name that makes it an inline image: `cid:logo` -> Content-ID `logo`.
pub const INLINE_PREFIX: &str = "cid:";

/// A mail as `multipart/form-data`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct MailForm {
    /// The mail request as JSON (the same object as the `application/json` body; its
    /// `attachments` may stay empty).
    #[schema(content_media_type = "application/json")]
    mail: MailRequest,
    /// Files to attach, any number, each with a file name and a Content-Type. A part named
    /// `cid:<id>` becomes an inline image referenced from the HTML as `cid:<id>`; any other
    /// name (e.g. `file`) an attachment. Validation errors name them `files[i]` in upload order.
    #[schema(value_type = Vec<String>, format = Binary, required = false)]
    file: Vec<Vec<u8>>,
}

/// Read the form: the request and the uploaded files, each file read chunk by chunk into
/// one buffer. A form whose files cannot fit `max_message_bytes` once base64-encoded is
/// refused as soon as that is known, without reading the rest.
pub async fn read(
    mut form: Multipart,
    limits: &Limits,
) -> Result<(MailRequest, Vec<UploadedFile>, Fingerprint), ApiError> {
    let max_message_bytes = limits.max_message_bytes;
    let form_error = |e: MultipartError| form_error(e, limits.max_body_bytes);
    let mut request = None;
    let mut mail_part = Bytes::new();
    let mut files = Vec::new();
    // Base64 size of everything read so far.
    let mut encoded = 0usize;
    while let Some(mut part) = form.next_field().await.map_err(form_error)? {
        let name = part.name().unwrap_or_default().to_owned();
        if name == MAIL_PART {
            if request.is_some() {
                return Err(invalid(MAIL_PART, "the form has more than one `mail` part"));
            }
            let bytes = part.bytes().await.map_err(form_error)?;
            request = Some(json::parse::<MailRequest>(&bytes)?);
            mail_part = bytes;
            continue;
        }
        let Some(filename) = part.file_name().map(str::to_owned) else {
            return Err(invalid(
                format!("parts.{name}"),
                "a form part other than `mail` must be a file (with a filename)",
            ));
        };
        let content_type = part
            .content_type()
            .unwrap_or("application/octet-stream")
            .to_owned();
        let content_id = name.strip_prefix(INLINE_PREFIX).map(str::to_owned);
        let mut content = Vec::new();
        while let Some(chunk) = part.chunk().await.map_err(form_error)? {
            content.extend_from_slice(&chunk);
            let so_far = encoded + content.len().div_ceil(3) * 4;
            if so_far > max_message_bytes {
                return Err(ApiError::MessageTooLarge {
                    size: so_far,
                    limit: max_message_bytes,
                });
            }
        }
        encoded += content.len().div_ceil(3) * 4;
        files.push(UploadedFile {
            filename,
            content_type,
            content,
            content_id,
        });
    }
    let request = request.ok_or_else(|| {
        invalid(
            MAIL_PART,
            "the form has no `mail` part with the JSON mail request",
        )
    })?;
    let fingerprint = fingerprint(&mail_part, &files);
    Ok((request, files, fingerprint))
}

/// The request's identity for Idempotency-Key: the `mail` part and every file, not the raw
/// body, whose multipart boundary changes on each retry.
fn fingerprint(mail_part: &[u8], files: &[UploadedFile]) -> Fingerprint {
    let file_parts = files.iter().flat_map(|f| {
        [
            f.filename.as_bytes(),
            f.content_type.as_bytes(),
            f.content_id.as_deref().unwrap_or_default().as_bytes(),
            f.content.as_slice(),
        ]
    });
    Fingerprint::of_parts(std::iter::once(mail_part).chain(file_parts))
}

fn invalid(field: impl Into<String>, message: &str) -> ApiError {
    let field = field.into();
    ApiError::InvalidRequest {
        detail: format!("the form is not a valid mail request: {field}: {message}"),
        errors: vec![FieldError::new(field, message)],
    }
}

fn form_error(e: MultipartError, max_body_bytes: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::PayloadTooLarge {
            limit: max_body_bytes,
        };
    }
    ApiError::InvalidRequest {
        detail: format!(
            "the multipart/form-data body could not be read: {}",
            e.body_text()
        ),
        errors: vec![FieldError::new("body", e.body_text())],
    }
}
