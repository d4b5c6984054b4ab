//! SMTP delivery: transport, XOAUTH2, connection pool, reply classification.
//! (Stub: the SMTP helper fills this in.)

/// Why the SMTP server did not take a mail.
#[derive(Debug, thiserror::Error)]
pub enum SmtpError {
    #[error("SMTP failure: {0}")]
    Other(String),
}
