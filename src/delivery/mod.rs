//! Where accepted mail goes: the SMTP server, or a local outbox folder for development.

mod outbox;

use async_trait::async_trait;

pub use outbox::Outbox;

use crate::message::OutgoingMail;
use crate::smtp::SmtpError;
use crate::token::TokenError;

/// What a successful hand-over returns.
#[derive(Debug, Clone)]
pub struct Receipt {
    /// The recipients the server accepted.
    pub accepted: Vec<String>,
    /// The server's reply to the end of DATA (or where the outbox wrote the file).
    pub server_reply: String,
}

/// Why a mail was not handed over.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error(transparent)]
    Smtp(#[from] SmtpError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("could not write the mail to the outbox {path}: {source}")]
    Outbox {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Hands a mail over; success means the receiving side took responsibility for it.
#[async_trait]
pub trait MailSender: Send + Sync + 'static {
    async fn send(&self, mail: &OutgoingMail) -> Result<Receipt, DeliveryError>;

    /// Finish politely at shutdown (e.g. QUIT idle SMTP connections); sends in flight finish.
    async fn close(&self) {}

    /// The SMTP pool's state, for health and metrics; `None` for senders without one.
    fn smtp_state(&self) -> Option<crate::smtp::SmtpState> {
        None
    }
}
