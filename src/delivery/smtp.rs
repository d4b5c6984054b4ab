//! The SMTP transport behind [`MailSender`]: the one place that reads SMTP's own failure cases
//! and turns them into the neutral [`FailureKind`] and [`Blame`].

use async_trait::async_trait;

use super::{BeforeUpload, Blame, DeliveryError, FailureKind, MailSender, Receipt};
use crate::message::OutgoingMail;
use crate::smtp::{SmtpError, SmtpErrorKind, SmtpReceipt, SmtpSender, SmtpState, Stage};

#[async_trait]
impl MailSender for SmtpSender {
    async fn send(&self, mail: &OutgoingMail) -> Result<Receipt, DeliveryError> {
        self.send_marked(mail, None).await
    }

    async fn send_marked(
        &self,
        mail: &OutgoingMail,
        before_upload: Option<BeforeUpload<'_>>,
    ) -> Result<Receipt, DeliveryError> {
        self.send_mail_marked(mail, before_upload)
            .await
            .map(
                |SmtpReceipt {
                     accepted,
                     server_reply,
                 }| Receipt {
                    accepted,
                    server_reply,
                },
            )
            .map_err(DeliveryError::from)
    }

    async fn close(&self) {
        SmtpSender::close(self).await;
    }

    fn smtp_state(&self) -> Option<SmtpState> {
        Some(self.state())
    }

    fn in_use(&self) -> super::InUse {
        super::InUse {
            transport: "smtp",
            fallback_since: None,
        }
    }
}

impl From<SmtpError> for DeliveryError {
    /// A token failure met while logging in is a token failure, not an SMTP one.
    fn from(e: SmtpError) -> Self {
        match e {
            SmtpError::Token(token) => Self::Token(token),
            other => Self::Smtp(other),
        }
    }
}

pub(super) fn kind(e: &SmtpError) -> FailureKind {
    if let SmtpError::Slots(_) | SmtpError::Halted(_) = e {
        return FailureKind::Store;
    }
    match e.kind() {
        SmtpErrorKind::SendAsDenied => FailureKind::SendAsDenied,
        SmtpErrorKind::SmtpAuthDisabled => FailureKind::AuthDisabled,
        SmtpErrorKind::BasicAuthRefused => FailureKind::BasicAuthRefused,
        SmtpErrorKind::AuthFailed => FailureKind::LoginRefused,
        SmtpErrorKind::ThreadLimit => FailureKind::Throttled,
        SmtpErrorKind::QuotaExceeded => FailureKind::QuotaExceeded,
        SmtpErrorKind::MailboxFull => FailureKind::MailboxFull,
        SmtpErrorKind::TooLarge => FailureKind::TooLarge,
        SmtpErrorKind::Tls => FailureKind::Certificate,
        SmtpErrorKind::Transient => FailureKind::Unavailable,
        SmtpErrorKind::Permanent => FailureKind::Rejected,
        SmtpErrorKind::Token => FailureKind::Token,
        SmtpErrorKind::Setup => FailureKind::Setup,
    }
}

pub(super) fn needs_administrator(e: &SmtpError) -> bool {
    match e {
        // A server lacking STARTTLS or XOAUTH2 refuses every mail; one lacking SMTPUTF8 only
        // the mail that needs it.
        SmtpError::Unsupported { .. } => e.refuses_the_session(),
        _ => matches!(
            kind(e),
            FailureKind::LoginRefused
                | FailureKind::AuthDisabled
                | FailureKind::BasicAuthRefused
                | FailureKind::Certificate
                | FailureKind::Setup
        ),
    }
}

pub(super) fn blame(e: &SmtpError) -> Blame {
    if e.refuses_the_session() {
        return Blame::Relay;
    }
    match kind(e) {
        FailureKind::Token => Blame::Token,
        FailureKind::SendAsDenied
        | FailureKind::TooLarge
        | FailureKind::QuotaExceeded
        | FailureKind::Rejected => Blame::Mail,
        FailureKind::AuthDisabled
        | FailureKind::BasicAuthRefused
        | FailureKind::LoginRefused
        | FailureKind::Throttled
        | FailureKind::MailboxFull
        | FailureKind::Certificate
        | FailureKind::Unavailable
        | FailureKind::Setup
        | FailureKind::Local
        | FailureKind::Store => Blame::Relay,
    }
}

/// One failure of each kind the API documents, named as its OpenAPI example: the document's
/// examples come from the same code as the real answers.
pub fn example_failures() -> Vec<(&'static str, DeliveryError)> {
    let rejected = |stage, code, text: &str| SmtpError::rejected(stage, code, text).into();
    vec![
        (
            "smtp_auth_failed",
            rejected(Stage::Auth, 535, "5.7.3 Authentication unsuccessful"),
        ),
        (
            "smtp_auth_disabled",
            rejected(
                Stage::Auth,
                535,
                "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.",
            ),
        ),
        (
            "smtp_rejected",
            rejected(
                Stage::RcptTo("x@fabrikam.com".into()),
                550,
                "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
            ),
        ),
        (
            "smtp_outcome_unknown",
            SmtpError::Connection {
                kind: SmtpErrorKind::Transient,
                stage: Stage::EndOfData,
                server: "smtp.office365.com:587".into(),
                detail: "connection reset by peer".into(),
            }
            .into(),
        ),
        (
            "smtp_unavailable",
            SmtpError::Connection {
                kind: SmtpErrorKind::Transient,
                stage: Stage::Connect,
                server: "smtp.office365.com:587".into(),
                detail: "connection timed out".into(),
            }
            .into(),
        ),
        (
            "token_unavailable",
            crate::token::TokenError::Network {
                endpoint:
                    "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
                        .into(),
                detail: "dns error: failed to lookup address information".into(),
            }
            .into(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{EntraError, TokenError};

    fn entra(code: u64) -> DeliveryError {
        DeliveryError::Token(TokenError::Rejected(Box::new(EntraError {
            status: 401,
            error: "invalid_client".into(),
            error_codes: vec![code],
            description: String::new(),
            trace_id: None,
            correlation_id: None,
            timestamp: None,
        })))
    }

    #[test]
    fn configuration_failures_need_an_administrator() {
        let auth = SmtpError::rejected(Stage::Auth, 535, "5.7.3 Authentication unsuccessful");
        assert!(DeliveryError::from(auth).needs_administrator());
        let disabled = SmtpError::rejected(
            Stage::Auth,
            535,
            "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant",
        );
        assert!(DeliveryError::from(disabled).needs_administrator());
        let basic = SmtpError::rejected(
            Stage::Auth,
            550,
            "5.7.30 Basic authentication is not supported for Client Submission",
        );
        assert!(DeliveryError::from(basic).needs_administrator());
        let tls = SmtpError::Connection {
            kind: SmtpErrorKind::Tls,
            stage: Stage::StartTls,
            server: "s:587".into(),
            detail: "invalid peer certificate".into(),
        };
        assert!(DeliveryError::from(tls).needs_administrator());
        let setup = SmtpError::Setup {
            key: "mailRelay.smtp.caFile",
            message: "x".into(),
        };
        assert!(DeliveryError::from(setup).needs_administrator());
        let no_xoauth2 = SmtpError::Unsupported {
            stage: Stage::Auth,
            server: "s:587".into(),
            detail: "does not offer AUTH XOAUTH2".into(),
        };
        assert!(DeliveryError::from(no_xoauth2).needs_administrator());
        assert!(entra(7000215).needs_administrator());
        assert!(
            DeliveryError::from(SmtpError::Token(TokenError::Credential("bad key".into())))
                .needs_administrator()
        );
    }

    #[test]
    fn passing_or_per_mail_failures_do_not() {
        let transient = SmtpError::rejected(Stage::Data, 451, "4.3.0 try later");
        assert!(!DeliveryError::from(transient).needs_administrator());
        let send_as = SmtpError::rejected(Stage::EndOfData, 554, "5.2.252 SendAsDenied; x");
        assert!(!DeliveryError::from(send_as).needs_administrator());
        let no_smtputf8 = SmtpError::Unsupported {
            stage: Stage::MailFrom("jörg@contoso.com".into()),
            server: "s:587".into(),
            detail: "does not support SMTPUTF8".into(),
        };
        assert!(!DeliveryError::from(no_smtputf8).needs_administrator());
        let network = TokenError::Network {
            endpoint: "https://login".into(),
            detail: "reset".into(),
        };
        assert!(!DeliveryError::Token(network).needs_administrator());
        assert!(
            !DeliveryError::Token(TokenError::Throttled { retry_after: None })
                .needs_administrator()
        );
    }

    #[test]
    fn codes_and_fixes_name_the_cause() {
        assert_eq!(entra(90002).code(), "token_tenant_not_found");
        assert!(entra(90002).remedy().unwrap().contains("oAuthTenantId"));
        let disabled = DeliveryError::from(SmtpError::rejected(
            Stage::Auth,
            535,
            "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox",
        ));
        assert_eq!(disabled.code(), "smtp_auth_disabled");
        assert!(disabled.remedy().unwrap().contains("Set-CASMailbox"));
    }

    #[test]
    fn refusals_of_one_mail_do_not_count_against_the_server() {
        let denied = DeliveryError::from(SmtpError::rejected(
            Stage::EndOfData,
            554,
            "5.2.252 SendAsDenied",
        ));
        assert!(matches!(denied.blame(), Blame::Mail));
        let login = DeliveryError::from(SmtpError::rejected(
            Stage::EndOfData,
            535,
            "5.7.3 Authentication unsuccessful",
        ));
        assert!(matches!(login.blame(), Blame::Relay));
        // A refusal of the session itself says the server will take no mail from this relay.
        for (stage, code, text) in [
            (Stage::Greeting, 554, "5.7.1 Client host blocked"),
            (Stage::Auth, 504, "5.7.4 Unrecognized authentication type"),
            (
                Stage::MailFrom("a@b.c".into()),
                530,
                "5.7.57 Client not authenticated to send mail",
            ),
        ] {
            let refused = DeliveryError::from(SmtpError::rejected(stage, code, text));
            assert!(matches!(refused.blame(), Blame::Relay), "{refused}");
        }
        let one_mail = DeliveryError::from(SmtpError::rejected(
            Stage::MailFrom("a@b.c".into()),
            550,
            "5.7.1 sender refused",
        ));
        assert!(matches!(one_mail.blame(), Blame::Mail));
    }

    #[test]
    fn a_server_lacking_what_the_session_needs_counts_against_the_server() {
        let unsupported = |stage| {
            DeliveryError::from(SmtpError::Unsupported {
                stage,
                server: "smtp.example:587".into(),
                detail: "does not offer it".into(),
            })
        };
        assert!(matches!(unsupported(Stage::StartTls).blame(), Blame::Relay));
        assert!(matches!(unsupported(Stage::Auth).blame(), Blame::Relay));
        // SMTPUTF8 or 8BITMIME missing stops only the mail that needs it.
        assert!(matches!(
            unsupported(Stage::MailFrom("jörg@b.c".into())).blame(),
            Blame::Mail
        ));
    }
}
