//! Why Graph did not take a mail: its JSON error (`{"error": {"code", "message", "innerError":
//! {"request-id", ...}}}`), a request that never reached it, or one whose answer never came.
//! The README (The fake Microsoft Graph) says what each case is based on.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use crate::remedy::Cause;
use crate::token::TokenError;

/// What the relay makes of a Graph error, whatever its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphErrorKind {
    /// `ErrorSendAsDenied`: the mailbox may not send as the From address.
    SendAsDenied,
    /// `ErrorAccessDenied` (no `Mail.Send`, or an RBAC scope or access policy that leaves the
    /// mailbox out), or a token Graph refused even fresh.
    AccessDenied,
    /// `MailboxNotEnabledForRESTAPI`, `ErrorInvalidUser`, `ResourceNotFound`: the mailbox is not
    /// an Exchange Online mailbox Graph can send from.
    MailboxUnusable,
    /// `413`, or `ErrorMessageSizeExceeded`.
    TooLarge,
    /// `ErrorQuotaExceeded`: the mailbox's sending quota is used up.
    QuotaExceeded,
    /// `429`: too many requests for the app or the mailbox.
    Throttled,
    /// `503`, or Graph could not be reached: nothing was sent.
    Unavailable,
    /// Any other refusal (`400` for a MIME Graph would not take, ...).
    Rejected,
}

/// Graph's error body, as documented for every Graph API.
#[derive(Debug, Clone, Default, Deserialize)]
struct Body {
    error: Option<Detail>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct Detail {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
    #[serde(rename = "innerError", default)]
    inner_error: Option<Inner>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct Inner {
    #[serde(rename = "request-id")]
    request_id: Option<String>,
}

/// An answer from Graph other than `202`.
#[derive(Debug, Clone)]
pub struct GraphReply {
    pub status: u16,
    /// Graph's error code (`ErrorSendAsDenied`), empty when the body had none.
    pub code: String,
    pub message: String,
    /// `innerError.request-id` (or the `request-id` header): what Microsoft support asks for.
    pub request_id: Option<String>,
    pub retry_after: Option<Duration>,
}

/// Longest error body read: Graph's are a few hundred bytes.
pub(super) const MAX_ERROR_BODY: usize = 16 * 1024;

impl GraphReply {
    pub(super) fn parse(
        status: u16,
        body: &[u8],
        header_request_id: Option<String>,
        retry_after: Option<Duration>,
    ) -> Self {
        let detail = serde_json::from_slice::<Body>(body)
            .ok()
            .and_then(|b| b.error)
            .unwrap_or_default();
        let request_id = detail
            .inner_error
            .and_then(|i| i.request_id)
            .or(header_request_id);
        let mut message: String = detail.message.chars().take(500).collect();
        if message.is_empty() {
            message = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        }
        Self {
            status,
            code: detail.code,
            message,
            request_id,
            retry_after,
        }
    }

    pub fn kind(&self) -> GraphErrorKind {
        // The code first, where Graph gave a known one; else what the status says.
        match self.code.as_str() {
            "ErrorSendAsDenied" => return GraphErrorKind::SendAsDenied,
            "ErrorAccessDenied" | "InvalidAuthenticationToken" => {
                return GraphErrorKind::AccessDenied;
            }
            "MailboxNotEnabledForRESTAPI" | "ErrorInvalidUser" | "ResourceNotFound" => {
                return GraphErrorKind::MailboxUnusable;
            }
            "ErrorMessageSizeExceeded" => return GraphErrorKind::TooLarge,
            "ErrorQuotaExceeded" => return GraphErrorKind::QuotaExceeded,
            _ => {}
        }
        match self.status {
            401 | 403 => GraphErrorKind::AccessDenied,
            404 => GraphErrorKind::MailboxUnusable,
            413 => GraphErrorKind::TooLarge,
            429 => GraphErrorKind::Throttled,
            503 => GraphErrorKind::Unavailable,
            _ => GraphErrorKind::Rejected,
        }
    }
}

impl fmt::Display for GraphReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.status)?;
        if !self.code.is_empty() {
            write!(f, " {}", self.code)?;
        }
        write!(f, ": {}", self.message.trim())?;
        if let Some(id) = &self.request_id {
            write!(f, " (request-id {id})")?;
        }
        Ok(())
    }
}

/// Why a mail did not go out through Graph.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// Graph answered, and not with `202`.
    #[error("Microsoft Graph refused the mail: {reply}{fix}", reply = .0, fix = fix_suffix(.0.kind()))]
    Refused(GraphReply),
    /// The request could not be made (connect, TLS): Graph has not seen it.
    #[error("Microsoft Graph could not be reached at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    /// The request went out but no answer came (a timeout, a dropped connection, or a `5xx`
    /// other than `503`): Graph may have sent the mail.
    #[error("no verdict from Microsoft Graph after the mail was sent: {detail}")]
    NoVerdict { detail: String },
    /// A request before the send (the draft, an attachment) got no answer: Graph holds at
    /// most a draft, which is not a sent mail.
    #[error("Microsoft Graph did not answer while the mail was being prepared: {detail}")]
    Interrupted { detail: String },
    /// The MIME message, base64-encoded, is larger than one Graph request may be.
    #[error(
        "the message is {size} bytes as base64, more than the {limit} bytes one Microsoft Graph request may carry, and no attachment can be taken out to send it in parts; send a shorter body, or use mailRelay.delivery.mode smtp"
    )]
    RequestTooLarge { size: usize, limit: usize },
    /// No token for Graph.
    #[error(transparent)]
    Token(TokenError),
    /// The send deadline ended while Graph kept asking to wait.
    #[error(
        "Microsoft Graph still refused after retrying for {} s (mailRelay.smtp.sendDeadlineSeconds): {last}",
        waited.as_secs()
    )]
    Deadline {
        waited: Duration,
        last: Box<GraphError>,
    },
    /// The queue's mark before the upload failed.
    #[error("{0}")]
    Halted(String),
}

/// The cause of a kind, whose fix [`crate::remedy`] holds.
fn cause_of(kind: GraphErrorKind) -> Option<Cause> {
    match kind {
        GraphErrorKind::SendAsDenied => Some(Cause::SendAsDenied),
        GraphErrorKind::AccessDenied => Some(Cause::GraphAccessDenied),
        GraphErrorKind::MailboxUnusable => Some(Cause::GraphMailboxUnusable),
        GraphErrorKind::QuotaExceeded => Some(Cause::QuotaExceeded),
        GraphErrorKind::TooLarge => Some(Cause::TooLarge),
        GraphErrorKind::Throttled | GraphErrorKind::Unavailable | GraphErrorKind::Rejected => None,
    }
}

fn fix_suffix(kind: GraphErrorKind) -> String {
    cause_of(kind).map_or_else(String::new, |cause| format!(". Fix: {}", cause.fix()))
}

impl GraphError {
    /// The known cause, whose fix [`crate::remedy`] holds.
    pub fn cause(&self) -> Option<Cause> {
        match self {
            Self::Refused(_) | Self::Deadline { .. } => cause_of(self.kind()),
            _ => None,
        }
    }

    /// What it means, for the cases the relay tells apart.
    pub fn kind(&self) -> GraphErrorKind {
        match self {
            Self::Refused(reply) => reply.kind(),
            Self::RequestTooLarge { .. } => GraphErrorKind::TooLarge,
            Self::Deadline { last, .. } => last.kind(),
            Self::Unreachable { .. }
            | Self::Interrupted { .. }
            | Self::NoVerdict { .. }
            | Self::Token(_)
            | Self::Halted(_) => GraphErrorKind::Unavailable,
        }
    }

    /// A later try may succeed without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Token(e) => e.is_transient(),
            Self::Halted(_) | Self::Unreachable { .. } | Self::Interrupted { .. } => true,
            Self::NoVerdict { .. } | Self::RequestTooLarge { .. } => false,
            Self::Deadline { last, .. } => last.is_transient(),
            Self::Refused(reply) => matches!(
                reply.kind(),
                GraphErrorKind::Throttled | GraphErrorKind::Unavailable
            ),
        }
    }

    /// Graph may have the mail: sending it again could deliver it twice.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            Self::NoVerdict { .. } => true,
            Self::Deadline { last, .. } => last.outcome_unknown(),
            _ => false,
        }
    }

    /// How long Graph asked to wait.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Refused(reply) => reply.retry_after,
            Self::Deadline { last, .. } => last.retry_after(),
            Self::Token(e) => e.retry_after(),
            _ => None,
        }
    }

    /// Graph's answer, when there was one.
    pub fn reply(&self) -> Option<&GraphReply> {
        match self {
            Self::Refused(reply) => Some(reply),
            Self::Deadline { last, .. } => last.reply(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(status: u16, code: &str) -> GraphReply {
        let body = serde_json::json!({"error": {"code": code, "message": "m",
            "innerError": {"date": "2026-12-03T10:00:00", "request-id": "r-1", "client-request-id": "c-1"}}});
        GraphReply::parse(status, body.to_string().as_bytes(), None, None)
    }

    #[test]
    fn graph_codes_are_classified_as_the_error_table_says() {
        let cases = [
            (403, "ErrorSendAsDenied", GraphErrorKind::SendAsDenied),
            (403, "ErrorAccessDenied", GraphErrorKind::AccessDenied),
            (
                401,
                "InvalidAuthenticationToken",
                GraphErrorKind::AccessDenied,
            ),
            (
                404,
                "MailboxNotEnabledForRESTAPI",
                GraphErrorKind::MailboxUnusable,
            ),
            (404, "ErrorInvalidUser", GraphErrorKind::MailboxUnusable),
            (404, "ResourceNotFound", GraphErrorKind::MailboxUnusable),
            (413, "", GraphErrorKind::TooLarge),
            (400, "ErrorMessageSizeExceeded", GraphErrorKind::TooLarge),
            (403, "ErrorQuotaExceeded", GraphErrorKind::QuotaExceeded),
            (429, "ApplicationThrottled", GraphErrorKind::Throttled),
            (429, "MailboxConcurrency", GraphErrorKind::Throttled),
            (503, "ServiceUnavailable", GraphErrorKind::Unavailable),
            (
                400,
                "ErrorMimeContentInvalidBase64String",
                GraphErrorKind::Rejected,
            ),
        ];
        for (status, code, kind) in cases {
            assert_eq!(reply(status, code).kind(), kind, "{status} {code}");
        }
    }

    #[test]
    fn the_request_id_comes_from_the_body_and_the_text_names_it() {
        let r = reply(403, "ErrorSendAsDenied");
        assert_eq!(r.request_id.as_deref(), Some("r-1"));
        assert_eq!(r.to_string(), "403 ErrorSendAsDenied: m (request-id r-1)");
        let bare = GraphReply::parse(502, b"<html>bad gateway</html>", Some("h-2".into()), None);
        assert_eq!(
            bare.to_string(),
            "502: <html>bad gateway</html> (request-id h-2)"
        );
    }

    #[test]
    fn only_a_lost_answer_is_outcome_unknown_and_only_waits_are_transient() {
        let throttled = GraphError::Refused(reply(429, "ApplicationThrottled"));
        assert!(throttled.is_transient() && !throttled.outcome_unknown());
        let denied = GraphError::Refused(reply(403, "ErrorSendAsDenied"));
        assert!(!denied.is_transient() && !denied.outcome_unknown());
        let lost = GraphError::NoVerdict {
            detail: "504".into(),
        };
        assert!(lost.outcome_unknown() && !lost.is_transient());
    }
}
