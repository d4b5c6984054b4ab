//! SMTP delivery: transport, XOAUTH2, connection pool, reply classification.
//!
//! # Design
//!
//! Built on lettre's low-level [`lettre::transport::smtp::client::AsyncSmtpConnection`], not
//! on `AsyncSmtpTransport`, whose pool bounds only idle connections, fixes the credentials
//! when it is built, and gives up on a `334` XOAUTH2 challenge.
//!
//! - **Sockets** are ours: a `tokio::net::TcpStream` bound to `mailRelay.smtp.sourceAddress`
//!   when set, with `TCP_NODELAY` (lettre writes the body and the final `.` separately;
//!   with Nagle and delayed ACKs each mail would wait about 40 ms), handed to lettre with
//!   `connect_with_transport`. `TLS` = STARTTLS, required (a server not offering it is an
//!   error, never a fall-back to plain text); `SSL` = implicit TLS via tokio-rustls; `NONE`
//!   = plain. Certificates are always verified against the system roots plus
//!   `mailRelay.smtp.caFile`.
//! - **Cap**: a semaphore with `mailRelay.smtp.maxConnections` permits (default 3,
//!   Exchange's limit per mailbox). A send holds a permit from checkout to check-in and
//!   opens a connection only when no idle one is left, so open connections (in use + idle)
//!   never exceed the cap. Waiting for a permit counts against the send deadline.
//! - **Tokens**: each pooled connection remembers the [`crate::token::AccessToken`] it
//!   logged in with. At checkout the current token is asked from the cache (cheap when
//!   cached); an idle connection logged in with another token (replaced or invalidated)
//!   or one expiring within a minute is quit and dropped, never reused, and a new
//!   connection logs in with the current token. So a token change retires old
//!   connections as they come up, without a pool swap.
//! - **Reuse check**: a connection used in the last 10 s is reused as is (no extra round
//!   trip per mail); idle longer, it gets a `NOOP` first; idle over 60 s it is quit (also
//!   by a background reaper), as servers drop idle sessions and each one holds one of the
//!   mailbox's few slots.
//! - **XOAUTH2** is sent by hand (`AUTH XOAUTH2 <base64>`): a `535` (Exchange) and a `334`
//!   JSON challenge answered with an empty line and then `535` (Gmail, Dovecot) both end
//!   as [`SmtpErrorKind::AuthFailed`]. The AUTH line never reaches `Debug` or logs
//!   (lettre's `tracing` feature is off for that reason: it logs every line it writes).
//! - **Transaction**: MAIL FROM and RCPT TO (in one write when the server offers
//!   PIPELINING: lettre does not pipeline, so the relay writes the batch and reads each reply),
//!   DATA, then the message and its end in one write; success only on a 2xx reply to the end
//!   of DATA. A refusal of the transaction (e.g. send-as denied, which comes
//!   after DATA) leaves the session usable: `RSET` and back to the pool.
//! - **Retries** within `mailRelay.smtp.sendDeadlineSeconds`: token refused → the token is
//!   invalidated in the cache and the send tried once more with a new one; refused again
//!   (or SMTP AUTH off, or a wrong password), the refusal stands for 30 s for the same
//!   credentials, so a broken setup costs no login per mail; transient
//!   (other 4xx, 432 thread limit, network, timeout) → back-off with jitter and retry;
//!   permanent → no retry. A connection lost after the whole message was sent is not
//!   retried (the server may have taken it: no duplicates).
//! - **Replies** are sorted by the pure [`classify`] from the code and the text (the
//!   enhanced status code is parsed from the text) into [`SmtpErrorKind`]; every
//!   [`SmtpError`] carries code, enhanced code, the server's text and the operator's fix.

mod classify;
mod connect;
mod connection;
mod error;
mod pool;
mod sender;
mod slots;
mod tls;

pub use classify::{EnhancedCode, SmtpErrorKind, classify, parse_enhanced};
pub use error::{SmtpError, SmtpReply, Stage};
pub use sender::{SmtpSender, SmtpState};
pub use slots::{ConnectionSlots, SHARED_MAX_IDLE, SLOT_POLL, Slot};

/// Asked right before DATA, once the envelope is accepted: the send goes on only when it answers
/// `Ok`. The queue records there that the message is about to go out (its exactness mark); an
/// `Err` ends the attempt with [`SmtpError::Halted`], the session reset and kept.
pub type BeforeUpload<'a> =
    &'a (dyn Fn() -> futures_util::future::BoxFuture<'a, Result<(), String>> + Send + Sync);

/// What the server took: the recipients it accepted and its reply to the end of DATA.
#[derive(Debug, Clone)]
pub struct SmtpReceipt {
    pub accepted: Vec<String>,
    pub server_reply: String,
}

// The steps of opening a connection, for `mail-relay diagnose`.
pub(crate) use connect::Connector;
pub(crate) use connection::Connection;
pub(crate) use tls::ImplicitTls;
