//! `SmtpError`: every way a hand-over to the SMTP server fails, sorted, with the fix.

use std::fmt;
use std::time::Duration;

use super::classify::{EnhancedCode, SmtpErrorKind, classify, parse_enhanced};
use crate::remedy::Cause;
use crate::token::TokenError;

/// A negative reply as the server sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpReply {
    /// The basic reply code, e.g. 554.
    pub code: u16,
    /// The enhanced status code parsed from the text, e.g. 5.2.252.
    pub enhanced: Option<EnhancedCode>,
    /// The server's text, lines joined by spaces.
    pub text: String,
}

impl SmtpReply {
    pub fn new(code: u16, text: impl Into<String>) -> Self {
        let text = text.into();
        Self {
            code,
            enhanced: parse_enhanced(&text),
            text,
        }
    }
}

impl fmt::Display for SmtpReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
}

/// Where in the SMTP dialogue a failure happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    Connect,
    Greeting,
    StartTls,
    Auth,
    MailFrom(String),
    RcptTo(String),
    Data,
    EndOfData,
    /// Checking or resetting a pooled connection.
    Reuse,
}

impl Stage {
    /// Setting up the session, before any mail is named.
    fn is_session(&self) -> bool {
        matches!(
            self,
            Self::Connect | Self::Greeting | Self::StartTls | Self::Auth | Self::Reuse
        )
    }
}

impl Stage {
    /// A stable name without the address a `MAIL FROM` or `RCPT TO` carries, for what anyone
    /// may see (the readiness probe).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Greeting => "greeting",
            Self::StartTls => "starttls",
            Self::Auth => "auth",
            Self::MailFrom(_) => "mail_from",
            Self::RcptTo(_) => "rcpt_to",
            Self::Data => "data",
            Self::EndOfData => "end_of_data",
            Self::Reuse => "reuse",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect => f.write_str("connecting"),
            Self::Greeting => f.write_str("greeting and EHLO"),
            Self::StartTls => f.write_str("STARTTLS"),
            Self::Auth => f.write_str("AUTH"),
            Self::MailFrom(from) => write!(f, "MAIL FROM:<{from}>"),
            Self::RcptTo(to) => write!(f, "RCPT TO:<{to}>"),
            Self::Data => f.write_str("DATA"),
            Self::EndOfData => f.write_str("end of DATA"),
            Self::Reuse => f.write_str("checking a pooled connection"),
        }
    }
}

/// Why the SMTP server did not take a mail.
#[derive(Debug, thiserror::Error)]
pub enum SmtpError {
    /// The server answered with a negative reply.
    #[error("the SMTP server refused {stage}: {}{}", reply.to_string().trim_end_matches('.'), hint_suffix(*kind))]
    Rejected {
        kind: SmtpErrorKind,
        stage: Stage,
        reply: SmtpReply,
    },
    /// No usable reply: refused or dropped connection, TLS failure, timeout.
    #[error("SMTP connection to {server} failed at {stage}: {detail}{}", hint_suffix(*kind))]
    Connection {
        /// `Transient`, or `Tls` when the certificate was not accepted.
        kind: SmtpErrorKind,
        stage: Stage,
        server: String,
        detail: String,
    },
    /// The server lacks something the settings (STARTTLS, an AUTH mechanism) or one mail
    /// (SMTPUTF8, 8BITMIME) requires; `stage` tells which.
    #[error("the SMTP server {server} {detail}")]
    Unsupported {
        stage: Stage,
        server: String,
        detail: String,
    },
    /// No access token for XOAUTH2 could be had.
    #[error("no access token for SMTP: {0}")]
    Token(#[from] TokenError),
    /// The send did not finish within `mailRelay.smtp.sendDeadlineSeconds`.
    #[error("the SMTP send did not finish within mailRelay.smtp.sendDeadlineSeconds ({deadline:?}){}", last_suffix(.last))]
    Deadline {
        deadline: Duration,
        last: Option<Box<SmtpError>>,
        /// The deadline struck after the message had started going out.
        after_upload: bool,
    },
    /// The SMTP settings cannot work.
    #[error("setting {key}: {message}")]
    Setup { key: &'static str, message: String },
    /// The mailbox's connection slots, shared with other replicas, could not be asked.
    #[error("the shared connection slots could not be taken: {0}")]
    Slots(String),
    /// The caller's check before the upload ([`super::BeforeUpload`]) said no; nothing was sent.
    #[error("the send stopped before the message went out: {0}")]
    Halted(String),
}

fn hint_suffix(kind: SmtpErrorKind) -> String {
    cause_of(kind).map_or_else(String::new, |cause| format!(". Fix: {}", cause.fix()))
}

fn last_suffix(last: &Option<Box<SmtpError>>) -> String {
    last.as_ref()
        .map_or_else(String::new, |e| format!("; last error: {e}"))
}

/// The known cause of a kind, whose fix the catalogue holds (EXCHANGE.md section 1).
fn cause_of(kind: SmtpErrorKind) -> Option<Cause> {
    Some(match kind {
        SmtpErrorKind::SendAsDenied => Cause::SendAsDenied,
        SmtpErrorKind::SmtpAuthDisabled => Cause::SmtpAuthDisabled,
        SmtpErrorKind::BasicAuthRefused => Cause::BasicAuthRefused,
        SmtpErrorKind::AuthFailed => Cause::LoginRefused,
        SmtpErrorKind::ThreadLimit => Cause::ThreadLimit,
        SmtpErrorKind::QuotaExceeded => Cause::QuotaExceeded,
        SmtpErrorKind::MailboxFull => Cause::MailboxFull,
        SmtpErrorKind::TooLarge => Cause::TooLarge,
        SmtpErrorKind::Tls => Cause::Certificate,
        SmtpErrorKind::Transient
        | SmtpErrorKind::Permanent
        | SmtpErrorKind::Token
        | SmtpErrorKind::Setup => return None,
    })
}

impl SmtpError {
    /// A negative reply, sorted by [`classify`].
    pub fn rejected(stage: Stage, code: u16, text: impl Into<String>) -> Self {
        let reply = SmtpReply::new(code, text);
        let kind = classify(&stage, reply.code, &reply.text);
        Self::Rejected { kind, stage, reply }
    }

    /// The case this error is, flat.
    pub fn kind(&self) -> SmtpErrorKind {
        match self {
            Self::Rejected { kind, .. } | Self::Connection { kind, .. } => *kind,
            Self::Unsupported { .. } => SmtpErrorKind::Permanent,
            Self::Token(_) => SmtpErrorKind::Token,
            Self::Deadline { .. } => SmtpErrorKind::Transient,
            Self::Setup { .. } => SmtpErrorKind::Setup,
            // The store may answer again in a moment.
            Self::Slots(_) | Self::Halted(_) => SmtpErrorKind::Transient,
        }
    }

    /// The server's reply, when there was one.
    pub fn reply(&self) -> Option<&SmtpReply> {
        match self {
            Self::Rejected { reply, .. } => Some(reply),
            Self::Deadline {
                last: Some(last), ..
            } => last.reply(),
            _ => None,
        }
    }

    /// Where in the dialogue it happened, when that is known.
    pub fn stage(&self) -> Option<&Stage> {
        match self {
            Self::Rejected { stage, .. }
            | Self::Connection { stage, .. }
            | Self::Unsupported { stage, .. } => Some(stage),
            Self::Deadline {
                last: Some(last), ..
            } => last.stage(),
            _ => None,
        }
    }

    /// The basic reply code, when the server answered.
    pub fn code(&self) -> Option<u16> {
        self.reply().map(|r| r.code)
    }

    /// The enhanced status code, when the server gave one.
    pub fn enhanced_code(&self) -> Option<EnhancedCode> {
        self.reply().and_then(|r| r.enhanced)
    }

    /// The server's text, when the server answered.
    pub fn server_text(&self) -> Option<&str> {
        self.reply().map(|r| r.text.as_str())
    }

    /// The known cause, whose fix [`crate::remedy`] holds.
    pub fn cause(&self) -> Option<Cause> {
        cause_of(self.kind())
    }

    /// Worth trying again later: the server or the network may be better then.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Token(e) => e.is_transient(),
            _ => matches!(
                self.kind(),
                SmtpErrorKind::Transient | SmtpErrorKind::ThreadLimit
            ),
        }
    }

    /// A failure after the whole message was sent, with no reply: the server may have taken
    /// the mail, and sending it again could deliver it twice.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            Self::Connection { stage, .. } => *stage == Stage::EndOfData,
            Self::Deadline {
                after_upload: true, ..
            } => true,
            Self::Deadline {
                last: Some(last), ..
            } => last.outcome_unknown(),
            _ => false,
        }
    }

    /// A refusal before any mail was named (connecting, greeting, STARTTLS, AUTH, reuse), or of
    /// an unauthenticated session, or a server lacking what the session needs (STARTTLS,
    /// XOAUTH2): the server refuses this relay, not one mail.
    pub fn refuses_the_session(&self) -> bool {
        match self {
            Self::Rejected { stage, reply, .. } => {
                stage.is_session() || (matches!(stage, Stage::MailFrom(_)) && reply.code == 530)
            }
            Self::Unsupported { stage, .. } => stage.is_session(),
            _ => false,
        }
    }

    /// Whether the connection it happened on can take the next mail (after `RSET`):
    /// the server refused one transaction, not the session.
    pub(crate) fn leaves_connection_usable(&self) -> bool {
        match self {
            Self::Rejected { stage, reply, .. } => {
                reply.code != 421
                    && matches!(
                        stage,
                        Stage::MailFrom(_) | Stage::RcptTo(_) | Stage::Data | Stage::EndOfData
                    )
            }
            // Stopped between RCPT and DATA: RSET ends the transaction.
            Self::Halted(_) => true,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recipient_refusal_is_about_that_recipient_only() {
        let full = SmtpError::rejected(
            Stage::RcptTo("x@contoso.com".into()),
            552,
            "5.2.2 mailbox full",
        );
        assert_eq!(full.kind(), SmtpErrorKind::Permanent);
        let later = SmtpError::rejected(
            Stage::RcptTo("SubmissionQuotaExceeded@contoso.com".into()),
            450,
            "4.2.0 <SubmissionQuotaExceeded@contoso.com>: try later",
        );
        assert_eq!(later.kind(), SmtpErrorKind::Transient);
    }

    #[test]
    fn rejected_carries_code_enhanced_code_text_and_fix() {
        let e = SmtpError::rejected(
            Stage::EndOfData,
            554,
            "5.2.252 SendAsDenied; relay@contoso.test not allowed to send as boss@contoso.test",
        );
        assert_eq!(e.kind(), SmtpErrorKind::SendAsDenied);
        assert_eq!(e.code(), Some(554));
        assert_eq!(e.enhanced_code(), Some(EnhancedCode::new(5, 2, 252)));
        assert!(e.server_text().unwrap().contains("not allowed to send as"));
        assert!(!e.is_transient());
        assert!(e.leaves_connection_usable());
        let message = e.to_string();
        assert!(message.contains("end of DATA"), "{message}");
        assert!(message.contains("Add-RecipientPermission"), "{message}");
    }

    #[test]
    fn auth_disabled_names_the_setting_to_change() {
        let e = SmtpError::rejected(
            Stage::Auth,
            535,
            "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox",
        );
        assert_eq!(e.kind(), SmtpErrorKind::SmtpAuthDisabled);
        assert!(
            e.to_string()
                .contains("SmtpClientAuthenticationDisabled $false")
        );
        assert!(!e.leaves_connection_usable());
    }

    #[test]
    fn thread_limit_and_4xx_are_transient_5xx_not() {
        let limit = SmtpError::rejected(
            Stage::MailFrom("a@b.c".into()),
            432,
            "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded",
        );
        assert!(limit.is_transient());
        assert!(SmtpError::rejected(Stage::Data, 451, "4.3.0 try later").is_transient());
        assert!(!SmtpError::rejected(Stage::Data, 554, "5.0.0 no").is_transient());
        let closing = SmtpError::rejected(Stage::Data, 421, "4.4.2 closing");
        assert!(!closing.leaves_connection_usable());
    }

    #[test]
    fn deadline_reports_the_last_error() {
        let e = SmtpError::Deadline {
            deadline: Duration::from_secs(3),
            after_upload: false,
            last: Some(Box::new(SmtpError::Connection {
                kind: SmtpErrorKind::Transient,
                stage: Stage::Connect,
                server: "127.0.0.1:1".into(),
                detail: "connection refused".into(),
            })),
        };
        assert!(e.is_transient());
        let message = e.to_string();
        assert!(message.contains("sendDeadline"), "{message}");
        assert!(message.contains("connection refused"), "{message}");
    }
}
