//! Reading a JSON body: every refusal is problem+json, like every other error.

use axum::extract::{FromRef, Request};
use axum::http::header;
use futures_util::StreamExt as _;
use serde::de::DeserializeOwned;

use super::ApiError;
use super::errors::FieldError;
use crate::app::AppState;

/// The raw bytes of a JSON body: 415 for another content type, 413 past the body limit.
/// Read into one buffer of the declared length, frame by frame, so that a large body is held
/// once (collecting the frames first and joining them would hold it twice for a moment).
pub async fn body<S>(request: Request, state: &S) -> Result<Vec<u8>, ApiError>
where
    S: Send + Sync,
    AppState: FromRef<S>,
{
    check_content_type(&request)?;
    let limit = AppState::from_ref(state)
        .settings
        .relay
        .limits
        .max_body_bytes;
    let declared = super::budget::declared_length(request.headers()).unwrap_or(0);
    let mut buffer = Vec::with_capacity(declared.min(limit));
    let mut frames = request.into_body().into_data_stream();
    while let Some(frame) = frames.next().await {
        let frame = frame.map_err(|e| {
            if super::budget::is_length_limit(&e) {
                // A body without Content-Length that grew past the limit while being read.
                ApiError::PayloadTooLarge { limit }
            } else {
                ApiError::InvalidRequest {
                    detail: format!("the request body could not be read: {e}"),
                    errors: Vec::new(),
                }
            }
        })?;
        if buffer.len() + frame.len() > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        buffer.extend_from_slice(&frame);
    }
    Ok(buffer)
}

fn check_content_type(request: &Request) -> Result<(), ApiError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("(not text)"));
    let is_json = content_type
        .and_then(|ct| ct.parse::<mime_essence::Essence>().ok())
        .is_some_and(|e| e.is_json());
    if is_json {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType(format!(
            "the body must be JSON with Content-Type: application/json (got {})",
            content_type.unwrap_or("no Content-Type")
        )))
    }
}

/// Deserialize, naming the field at fault as `to[2].address`.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner();
        let message = inner.to_string();
        let field = if inner.is_syntax() || inner.is_eof() {
            "body".to_owned()
        } else {
            field_of(&path, &message)
        };
        let detail = if inner.is_syntax() || inner.is_eof() {
            format!("the body is not valid JSON: {message}")
        } else {
            format!("the body is not a valid mail request: {field}: {message}")
        };
        ApiError::InvalidRequest {
            detail,
            errors: vec![FieldError::new(field, message)],
        }
    })
}

/// The field to name: serde_path_to_error's path already ends in an unknown key, but a
/// missing one is reported at the enclosing object, with the name only in the message.
fn field_of(path: &str, message: &str) -> String {
    let missing = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(name, _)| name);
    match (path, missing) {
        (".", Some(name)) => name.to_owned(),
        (parent, Some(name)) => format!("{parent}.{name}"),
        (".", None) => "body".to_owned(),
        (path, None) => path.to_owned(),
    }
}

/// Just enough media-type parsing to tell JSON from the rest.
mod mime_essence {
    pub struct Essence(String);

    impl std::str::FromStr for Essence {
        type Err = ();

        fn from_str(s: &str) -> Result<Self, ()> {
            let essence = s.split(';').next().unwrap_or_default().trim();
            if essence.contains('/') {
                Ok(Self(essence.to_ascii_lowercase()))
            } else {
                Err(())
            }
        }
    }

    impl Essence {
        /// `application/json` or any `application/*+json`.
        pub fn is_json(&self) -> bool {
            self.0 == "application/json"
                || (self.0.starts_with("application/") && self.0.ends_with("+json"))
        }
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        list: Vec<Inner>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        n: u8,
    }

    fn field(body: &str) -> String {
        match parse::<Outer>(body.as_bytes()) {
            Err(ApiError::InvalidRequest { errors, .. }) => errors[0].field.clone(),
            other => panic!("expected invalid_request, got {other:?}"),
        }
    }

    #[test]
    fn names_the_field_at_fault() {
        assert_eq!(field(r#"{"list": [{"n": 1}, {"n": "x"}]}"#), "list[1].n");
        assert_eq!(field(r#"{"list": [], "extra": 1}"#), "extra");
        assert_eq!(field(r#"{"list": [{"n": 1, "m": 2}]}"#), "list[0].m");
        assert_eq!(field(r#"{"list": ["#), "body");
        assert_eq!(field(r#"{"list": [{}]}"#), "list[0].n");
        assert_eq!(field(r#"{}"#), "list");
        assert_eq!(field(r#"[]"#), "body");
    }
}
