//! A validated outgoing message and its MIME form.
//!
//! The flow is `MailRequest` (the JSON body, [`request`]) -> [`Mail`] (every field parsed,
//! `validate`) -> [`OutgoingMail`] (envelope plus RFC 5322 bytes, `build`). The send-as
//! decision sits between the last two, so a refused sender costs no MIME work.

mod address;
mod build;
mod headers;
pub mod request;
mod validate;

#[cfg(test)]
mod tests;

use std::fmt;

use lettre::address::Envelope;
use serde::Serialize;
use utoipa::ToSchema;

pub use address::{AddressError, EmailAddress, Mailbox, normalize_domain};
pub use headers::{CustomHeader, HeaderText, HeaderTextError, Priority, allowed_header_names};
pub use request::MailRequest;
pub use validate::{Attachment, Body, Mail, UploadedFile};

/// A mail ready to hand to a [`crate::delivery::MailSender`]: envelope plus the formatted RFC 5322 bytes.
#[derive(Debug, Clone)]
pub struct OutgoingMail {
    /// The relay's id for this mail (also in logs and the response).
    pub id: String,
    /// The `Message-ID` header value, with angle brackets.
    pub message_id: String,
    pub envelope: Envelope,
    pub formatted: Vec<u8>,
}

impl OutgoingMail {
    /// Validate a request and build its MIME form in one step (no send-as check in between).
    pub fn from_request(request: MailRequest, limits: &MessageLimits) -> Result<Self, MailError> {
        request.validate(limits)?.build(limits)
    }
}

/// The limits a message must keep, from `mailRelay.limits`.
#[derive(Debug, Clone, Copy)]
pub struct MessageLimits {
    /// Most recipients (to + cc + bcc).
    pub max_recipients: usize,
    /// Largest formatted message, in bytes, after base64 and all other encoding.
    pub max_message_bytes: usize,
}

impl From<&crate::config::Limits> for MessageLimits {
    fn from(limits: &crate::config::Limits) -> Self {
        Self {
            max_recipients: limits.max_recipients,
            max_message_bytes: limits.max_message_bytes,
        }
    }
}

/// One invalid field of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct FieldError {
    /// Path of the field, e.g. `to[2]`.
    #[schema(example = "to[2]")]
    pub field: String,
    /// What is wrong with it.
    #[schema(example = "not an e-mail address: it has no '@' between a local part and a domain")]
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl fmt::Display) -> Self {
        Self {
            field: field.into(),
            message: message.to_string(),
        }
    }
}

/// Why a request did not become a message.
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    /// One or more fields are invalid; all of them are listed.
    #[error("{} field(s) of the mail are invalid", .0.len())]
    Invalid(Vec<FieldError>),
    #[error("the mail has {count} recipients (to + cc + bcc); at most {limit} are allowed")]
    TooManyRecipients { count: usize, limit: usize },
    #[error(
        "the encoded mail is {size} bytes, more than the limit of {limit} bytes \
         (attachments grow by about a third when base64-encoded)"
    )]
    TooLarge { size: usize, limit: usize },
    /// lettre refused what validation accepted: a bug in the relay, not the caller's fault.
    #[error("the message could not be built: {0}")]
    Build(String),
}
