//! The Graph transport behind [`MailSender`]: the one place that reads Graph's own failure cases
//! and turns them into the neutral [`FailureKind`] and [`Blame`], with the same meanings (and so
//! the same problem codes) as the SMTP transport's.

use async_trait::async_trait;

use super::{Blame, DeliveryError, FailureKind, MailSender, Receipt};
use crate::graph::{GraphError, GraphErrorKind, GraphSender};
use crate::message::OutgoingMail;

#[async_trait]
impl MailSender for GraphSender {
    async fn send(&self, mail: &OutgoingMail) -> Result<Receipt, DeliveryError> {
        let receipt = GraphSender::send(self, mail).await.map_err(|e| match e {
            GraphError::Token(token) => DeliveryError::Token(token),
            other => DeliveryError::Graph(other),
        })?;
        Ok(Receipt {
            // Graph takes the whole message or nothing.
            accepted: mail.envelope.to().iter().map(ToString::to_string).collect(),
            server_reply: receipt.reply,
        })
    }

    fn in_use(&self) -> super::InUse {
        super::InUse {
            transport: "graph",
            fallback_since: None,
        }
    }
}

pub(super) fn kind(e: &GraphError) -> FailureKind {
    if let GraphError::Halted(_) = e {
        return FailureKind::Store;
    }
    match e.kind() {
        GraphErrorKind::SendAsDenied => FailureKind::SendAsDenied,
        GraphErrorKind::AccessDenied => FailureKind::LoginRefused,
        GraphErrorKind::MailboxUnusable => FailureKind::Setup,
        GraphErrorKind::TooLarge => FailureKind::TooLarge,
        GraphErrorKind::QuotaExceeded => FailureKind::QuotaExceeded,
        GraphErrorKind::Throttled => FailureKind::Throttled,
        GraphErrorKind::Unavailable => FailureKind::Unavailable,
        GraphErrorKind::Rejected => FailureKind::Rejected,
    }
}

/// The app's permissions and the mailbox are the administrator's to fix.
pub(super) fn needs_administrator(e: &GraphError) -> bool {
    matches!(
        e.kind(),
        GraphErrorKind::AccessDenied | GraphErrorKind::MailboxUnusable
    )
}

pub(super) fn blame(e: &GraphError) -> Blame {
    match e.kind() {
        GraphErrorKind::SendAsDenied
        | GraphErrorKind::TooLarge
        | GraphErrorKind::QuotaExceeded
        | GraphErrorKind::Rejected => Blame::Mail,
        GraphErrorKind::AccessDenied
        | GraphErrorKind::MailboxUnusable
        | GraphErrorKind::Throttled
        | GraphErrorKind::Unavailable => Blame::Relay,
    }
}
