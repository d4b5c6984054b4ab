//! `DeliveryError`: why a mail was not handed over, in terms every caller can use without knowing
//! the transport. It answers for itself, as lettre's `Error::is_transient` does: its kind, whether
//! a retry may help, whether the server may have the mail anyway, whether an administrator must
//! act, and the fix. Only the transport adapters (`delivery/smtp.rs`) look inside.

use std::time::Duration;

use crate::graph::GraphError;
use crate::remedy::Cause;
use crate::smtp::SmtpError;
use crate::token::TokenError;

/// Why a mail was not handed over.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The SMTP server refused, failed or could not be reached (never a token failure: those
    /// are [`DeliveryError::Token`]).
    #[error(transparent)]
    Smtp(SmtpError),
    /// Microsoft Graph refused, failed or could not be reached (token failures are
    /// [`DeliveryError::Token`]).
    #[error(transparent)]
    Graph(GraphError),
    #[error(transparent)]
    Token(#[from] TokenError),
    /// No identity serves the mail's From any more (the settings changed after it was queued).
    #[error(transparent)]
    NoIdentity(crate::identity::NoIdentity),
    #[error("could not write the mail to the outbox {path}: {source}")]
    Outbox {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What went wrong, whatever the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The sending mailbox may not send as the From address.
    SendAsDenied,
    /// The login was refused (for OAuth2: a fresh token too).
    LoginRefused,
    /// Authenticated SMTP is off for the mailbox or the tenant.
    AuthDisabled,
    /// The tenant refuses Basic authentication.
    BasicAuthRefused,
    /// Too many connections or requests for the mailbox at once.
    Throttled,
    /// The mailbox's daily recipient quota is used up.
    QuotaExceeded,
    /// The sending mailbox is full.
    MailboxFull,
    /// The message is larger than the server accepts.
    TooLarge,
    /// The server's certificate was not accepted.
    Certificate,
    /// Not reachable, or "try later": a retry may help.
    Unavailable,
    /// Refused for good, for a reason without a known fix (the reply says which).
    Rejected,
    /// No access token could be had.
    Token,
    /// The transport's settings cannot work.
    Setup,
    /// The relay itself failed (the development outbox could not be written).
    Local,
    /// The shared store (which holds the mailbox's connection slots) did not answer.
    Store,
}

impl FailureKind {
    /// A stable machine-readable name, for logs, metrics and administrative notices.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Store => "store_unavailable",
            Self::SendAsDenied => "send_as_denied",
            Self::LoginRefused => "smtp_auth_failed",
            Self::AuthDisabled => "smtp_auth_disabled",
            Self::BasicAuthRefused => "basic_auth_refused",
            Self::Throttled => "smtp_thread_limit",
            Self::QuotaExceeded => "smtp_quota_exceeded",
            Self::MailboxFull => "smtp_mailbox_full",
            Self::TooLarge => "message_too_large",
            Self::Certificate => "smtp_tls_failed",
            Self::Unavailable => "smtp_unavailable",
            Self::Rejected => "smtp_rejected",
            Self::Token => "token_unavailable",
            Self::Setup => "smtp_setup",
            Self::Local => "outbox_unwritable",
        }
    }
}

/// Whose fault a failed hand-over is, as readiness sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The transport (or the outbox) does not work for this relay: counts towards "failing".
    Relay,
    /// This mail was refused (its sender, size, recipients, the quota): the server works.
    Mail,
    /// No access token: the token component shows it.
    Token,
}

impl DeliveryError {
    pub fn kind(&self) -> FailureKind {
        match self {
            Self::Smtp(e) => super::smtp::kind(e),
            Self::Graph(e) => super::graph::kind(e),
            Self::Token(_) => FailureKind::Token,
            Self::NoIdentity(_) => FailureKind::SendAsDenied,
            Self::Outbox { .. } => FailureKind::Local,
        }
    }

    /// Worth trying again later: the server, the network or Entra ID may be better then.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Smtp(e) => e.is_transient(),
            Self::Graph(e) => e.is_transient(),
            Self::Token(e) => e.is_transient(),
            Self::NoIdentity(_) | Self::Outbox { .. } => false,
        }
    }

    /// The whole message went out but no verdict came back: the server may have the mail, and
    /// sending it again could deliver it twice.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            Self::Smtp(e) => e.outcome_unknown(),
            Self::Graph(e) => e.outcome_unknown(),
            _ => false,
        }
    }

    /// A failure an administrator must fix: the login refused or switched off, TLS or settings
    /// that cannot work, a server lacking what the settings need, or Entra ID refusing the token
    /// request for a reason that will not pass by itself.
    pub fn needs_administrator(&self) -> bool {
        match self {
            Self::Smtp(e) => super::smtp::needs_administrator(e),
            Self::Graph(e) => super::graph::needs_administrator(e),
            Self::Token(e) => !e.is_transient(),
            Self::NoIdentity(_) => true,
            Self::Outbox { .. } => false,
        }
    }

    /// Whose fault it is, for readiness.
    pub fn blame(&self) -> Blame {
        match self {
            Self::Smtp(e) => super::smtp::blame(e),
            Self::Graph(e) => super::graph::blame(e),
            Self::Token(_) => Blame::Token,
            Self::NoIdentity(_) => Blame::Mail,
            Self::Outbox { .. } => Blame::Relay,
        }
    }

    /// The known cause, whose fix [`crate::remedy`] holds.
    pub fn cause(&self) -> Option<Cause> {
        match self {
            Self::Smtp(e) => e.cause(),
            Self::Graph(e) => e.cause(),
            Self::Token(_) | Self::NoIdentity(_) | Self::Outbox { .. } => None,
        }
    }

    /// What to do about it, when the catalogue knows.
    pub fn remedy(&self) -> Option<String> {
        match self {
            Self::Token(e) => e.entra().and_then(|e| e.known()).map(|k| k.fix.to_owned()),
            _ => self.cause().map(Cause::fix),
        }
    }

    /// A stable short name: Entra's explained code for token failures, else the kind's.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Token(e) => e.code(),
            _ => self.kind().as_str(),
        }
    }

    /// The server's reply to the refused command (`554 5.2.252 ...`), when there was one.
    pub fn server_reply(&self) -> Option<String> {
        match self {
            Self::Smtp(e) => e.reply().map(ToString::to_string),
            Self::Graph(e) => e.reply().map(|r| format!("HTTP {r}")),
            _ => None,
        }
    }

    /// The server's reply code, when there was one (for the request's log line).
    pub fn reply_code(&self) -> Option<u16> {
        match self {
            Self::Smtp(e) => e.code(),
            _ => None,
        }
    }

    /// Where in the transport's dialogue it happened (`connect`, `auth`, `mail_from`, ...).
    pub fn stage(&self) -> Option<&'static str> {
        match self {
            Self::Smtp(e) => e.stage().map(crate::smtp::Stage::name),
            _ => None,
        }
    }

    /// The server's enhanced status code (`4.3.2`), when it gave one.
    pub fn enhanced_code(&self) -> Option<String> {
        match self {
            Self::Smtp(e) => e.enhanced_code().map(|c| c.to_string()),
            _ => None,
        }
    }

    /// How long the other side asked us to wait, when it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Token(e) => e.retry_after(),
            Self::Graph(e) => e.retry_after(),
            _ => None,
        }
    }
}
