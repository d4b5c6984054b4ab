//! Where accepted mail goes: the [`MailSender`] trait, the transport-neutral failure model, and
//! the transports behind the trait (the SMTP server, Microsoft Graph, or a local outbox folder for
//! development).
//! Everything above this module asks a [`DeliveryError`] what it means; nothing above it knows a
//! transport.

mod error;
mod fallback;
mod graph;
mod outbox;
mod smtp;

use async_trait::async_trait;

pub use error::{Blame, DeliveryError, FailureKind};
pub use fallback::{Fallback, RECHECK};
pub use outbox::Outbox;
pub use smtp::example_failures;

pub use crate::smtp::BeforeUpload;

use crate::message::OutgoingMail;

/// What a successful hand-over returns.
#[derive(Debug, Clone)]
pub struct Receipt {
    /// The recipients the server accepted.
    pub accepted: Vec<String>,
    /// The server's reply to the end of DATA (or where the outbox wrote the file).
    pub server_reply: String,
}

/// Which transport carries mail now, for readiness, metrics and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InUse {
    /// `smtp`, `graph` or `outbox`.
    pub transport: &'static str,
    /// With `delivery.mode: auto`, since when Graph stands in for an SMTP AUTH refused.
    pub fallback_since: Option<std::time::SystemTime>,
}

/// Hands a mail over; success means the receiving side took responsibility for it.
#[async_trait]
pub trait MailSender: Send + Sync + 'static {
    async fn send(&self, mail: &OutgoingMail) -> Result<Receipt, DeliveryError>;

    /// As [`MailSender::send`], asking `before_upload` right before the message goes out (the
    /// queue's exactness mark); its `Err` stops the send with [`FailureKind::Store`]. A sender
    /// without a dialogue asks it first thing.
    async fn send_marked(
        &self,
        mail: &OutgoingMail,
        before_upload: Option<BeforeUpload<'_>>,
    ) -> Result<Receipt, DeliveryError> {
        if let Some(before_upload) = before_upload {
            before_upload()
                .await
                .map_err(|detail| DeliveryError::Smtp(crate::smtp::SmtpError::Halted(detail)))?;
        }
        self.send(mail).await
    }

    /// Finish politely at shutdown (e.g. QUIT idle SMTP connections); sends in flight finish.
    async fn close(&self) {}

    /// The SMTP pool's state, for health and metrics; `None` for senders without one.
    fn smtp_state(&self) -> Option<crate::smtp::SmtpState> {
        None
    }

    /// Which transport carries mail now.
    fn in_use(&self) -> InUse {
        InUse {
            transport: "other",
            fallback_since: None,
        }
    }
}
