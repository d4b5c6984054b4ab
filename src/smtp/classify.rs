//! Sorting SMTP replies into the cases EXCHANGE.md section 3 names.
//!
//! lettre gives the basic reply code; the enhanced status code (`5.2.252`) and the
//! text come only as the reply's message, so both are parsed from there.

use std::fmt;

use super::error::Stage;

/// An enhanced status code (RFC 3463), e.g. `5.2.252`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EnhancedCode {
    pub class: u8,
    pub subject: u16,
    pub detail: u16,
}

impl EnhancedCode {
    pub const fn new(class: u8, subject: u16, detail: u16) -> Self {
        Self {
            class,
            subject,
            detail,
        }
    }

    /// Parses one word such as `5.7.139` (a trailing `,`, `;` or `:` is ignored).
    pub fn parse(word: &str) -> Option<Self> {
        let word = word.trim_end_matches([',', ';', ':']);
        let mut parts = word.split('.');
        let class = parts.next()?;
        let subject = parts.next()?;
        let detail = parts.next()?;
        if parts.next().is_some() || !matches!(class, "2" | "4" | "5") {
            return None;
        }
        let number = |s: &str| {
            (!s.is_empty() && s.len() <= 3 && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse::<u16>().ok())
                .flatten()
        };
        Some(Self::new(
            class.parse().ok()?,
            number(subject)?,
            number(detail)?,
        ))
    }
}

impl fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// The enhanced status code of a reply text: its first word when that is one, else the
/// first word that is one (Postfix puts its own text before an access map's reply).
pub fn parse_enhanced(text: &str) -> Option<EnhancedCode> {
    text.split_whitespace().find_map(EnhancedCode::parse)
}

/// What a failure means for the caller and the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SmtpErrorKind {
    /// The From mailbox has not granted Send As to the SMTP mailbox (5.2.252, 5.2.0 SendAsDenied, 5.7.60).
    SendAsDenied,
    /// SMTP AUTH is switched off for the tenant or mailbox (5.7.139).
    SmtpAuthDisabled,
    /// The tenant refuses Basic authentication (5.7.30).
    BasicAuthRefused,
    /// The login was refused: for XOAUTH2, the token was rejected (535 5.7.3, or 334 then 535).
    AuthFailed,
    /// Too many concurrent connections for the mailbox (432 4.3.2).
    ThreadLimit,
    /// The mailbox's daily recipient quota is used up (SubmissionQuotaExceeded).
    QuotaExceeded,
    /// The SMTP mailbox (its Sent Items) is full (5.2.2).
    MailboxFull,
    /// The message is larger than the server accepts (552, 5.3.4).
    TooLarge,
    /// The server's certificate was not accepted.
    Tls,
    /// Worth retrying: other 4xx, network failures, timeouts.
    Transient,
    /// Not worth retrying: other 5xx, a server lacking what the settings require.
    Permanent,
    /// No access token could be had.
    Token,
    /// The settings cannot work.
    Setup,
}

impl SmtpErrorKind {
    /// The server refuses SMTP AUTH itself (`535 5.7.139`, `550 5.7.30`): only the setup can
    /// fix it, and Microsoft Graph may work where SMTP does not.
    pub fn is_smtp_auth_off(self) -> bool {
        matches!(self, Self::SmtpAuthDisabled | Self::BasicAuthRefused)
    }

    /// A stable machine-readable name, for logs, metrics and API error codes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SendAsDenied => "send_as_denied",
            Self::SmtpAuthDisabled => "smtp_auth_disabled",
            Self::BasicAuthRefused => "basic_auth_refused",
            Self::AuthFailed => "smtp_auth_failed",
            Self::ThreadLimit => "smtp_thread_limit",
            Self::QuotaExceeded => "smtp_quota_exceeded",
            Self::MailboxFull => "smtp_mailbox_full",
            Self::TooLarge => "message_too_large",
            Self::Tls => "smtp_tls_failed",
            Self::Transient => "smtp_unavailable",
            Self::Permanent => "smtp_rejected",
            Self::Token => "token_unavailable",
            Self::Setup => "smtp_setup",
        }
    }
}

impl fmt::Display for SmtpErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

const SEND_AS_DENIED: EnhancedCode = EnhancedCode::new(5, 2, 252);
const NO_SEND_AS_PERMISSION: EnhancedCode = EnhancedCode::new(5, 7, 60);
const SMTP_AUTH_DISABLED: EnhancedCode = EnhancedCode::new(5, 7, 139);
const BASIC_AUTH_REFUSED: EnhancedCode = EnhancedCode::new(5, 7, 30);
const MAILBOX_FULL: EnhancedCode = EnhancedCode::new(5, 2, 2);
const TOO_LARGE: EnhancedCode = EnhancedCode::new(5, 3, 4);

/// The words of a reply that the server wrote: without `<…>` paths, `"…"` quoted strings and
/// words that hold an `@`. Quote-aware, as addresses are: a `>` inside a quoted local part
/// (`<"x>SubmissionQuotaExceeded"@contoso.com>`) does not end the path, and `\"` does not
/// end a quoted string. What is left open at the end is dropped, never read as the server's.
fn server_words(text: &str) -> String {
    #[derive(Clone, Copy)]
    enum In {
        Text,
        Path,
        Quoted { in_path: bool },
    }
    let mut plain = String::with_capacity(text.len());
    let mut state = In::Text;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        state = match (state, c) {
            (In::Text, '<') => In::Path,
            (In::Text, '"') => In::Quoted { in_path: false },
            (In::Text, c) => {
                plain.push(c);
                In::Text
            }
            (In::Path, '>') => In::Text,
            (In::Path, '"') => In::Quoted { in_path: true },
            (In::Path, _) => In::Path,
            (quoted @ In::Quoted { .. }, '\\') => {
                chars.next();
                quoted
            }
            (In::Quoted { in_path }, '"') => {
                if in_path {
                    In::Path
                } else {
                    In::Text
                }
            }
            (quoted @ In::Quoted { .. }, _) => quoted,
        };
    }
    plain
        .split_whitespace()
        .filter(|word| !word.contains('@'))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Sorts a negative reply. Pure: the stage, the basic code and the text (without the code) in,
/// the kind out.
pub fn classify(stage: &Stage, code: u16, text: &str) -> SmtpErrorKind {
    // A refusal of one recipient repeats the recipient's address, which the caller chose: its
    // text must not decide anything beyond "this recipient, now or for good".
    if matches!(stage, Stage::RcptTo(_)) {
        return match code {
            400..=499 => SmtpErrorKind::Transient,
            _ => SmtpErrorKind::Permanent,
        };
    }
    // Addresses in the reply are the caller's words (a From of `SubmissionQuotaExceeded@…`):
    // only the server's own words count.
    let text = server_words(text);
    let enhanced = parse_enhanced(&text);
    let lower = text.to_ascii_lowercase();
    let has = |needle: &str| lower.contains(needle);
    // Exchange answers SendAsDenied and SubmissionQuotaExceeded only to the end of DATA
    // (EXCHANGE.md section 3): the same words at MAIL FROM or DATA are not those replies, and a
    // quota refusal stops all mail for a day, so only that stage may decide it.
    let after_data = *stage == Stage::EndOfData;

    // Exchange's texts first: they are more specific than its codes (5.2.0 carries
    // both the quota and the send-as cases).
    if after_data
        && (has("sendasdenied")
            || enhanced == Some(SEND_AS_DENIED)
            || enhanced == Some(NO_SEND_AS_PERMISSION))
    {
        return SmtpErrorKind::SendAsDenied;
    }
    if enhanced == Some(SMTP_AUTH_DISABLED) || has("smtpclientauthentication is disabled") {
        return SmtpErrorKind::SmtpAuthDisabled;
    }
    if enhanced == Some(BASIC_AUTH_REFUSED) || has("basic authentication is not supported") {
        return SmtpErrorKind::BasicAuthRefused;
    }
    if after_data && has("submissionquotaexceeded") {
        return SmtpErrorKind::QuotaExceeded;
    }
    if code == 432 || has("thread limit exceeded") {
        return SmtpErrorKind::ThreadLimit;
    }
    // Final only as a 5xx (EXCHANGE.md: `554 5.2.2`); a 4xx "mailbox full" may clear, and is
    // retried as any other 4xx.
    if code >= 500 && (enhanced == Some(MAILBOX_FULL) || has("mailbox full")) {
        return SmtpErrorKind::MailboxFull;
    }
    if code == 552 || enhanced == Some(TOO_LARGE) {
        return SmtpErrorKind::TooLarge;
    }
    if code == 535 {
        return SmtpErrorKind::AuthFailed;
    }
    match code {
        400..=499 => SmtpErrorKind::Transient,
        _ => SmtpErrorKind::Permanent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where Exchange gives each reply of these tests: AUTH refusals at AUTH, the rest after DATA.
    fn stage_of(line: &str) -> Stage {
        if line.starts_with("535") || line.contains("5.7.30") {
            Stage::Auth
        } else {
            Stage::EndOfData
        }
    }

    /// Splits a reply as seen on the wire into code and text.
    fn classify_line(line: &str) -> SmtpErrorKind {
        let (code, text) = line.split_once(' ').unwrap();
        classify(&stage_of(line), code.parse().unwrap(), text)
    }

    #[test]
    fn addresses_in_a_reply_decide_nothing() {
        assert_eq!(
            classify(
                &Stage::EndOfData,
                550,
                "5.1.1 <SubmissionQuotaExceeded@contoso.com>: Recipient address rejected"
            ),
            SmtpErrorKind::Permanent
        );
        assert_eq!(
            classify(
                &Stage::EndOfData,
                550,
                "5.1.10 Recipient \"SendAsDenied x\"@contoso.com not found"
            ),
            SmtpErrorKind::Permanent
        );
        // Exchange's own words still count, with the addresses it names around them.
        assert_eq!(
            classify(
                &Stage::EndOfData,
                554,
                "5.2.252 SendAsDenied; relay@contoso.com not allowed to send as ceo@contoso.com"
            ),
            SmtpErrorKind::SendAsDenied
        );
    }

    /// Replies as Postfix and Exchange echo a hostile From or recipient, at every stage.
    #[test]
    fn hostile_addresses_echoed_at_any_stage_decide_neither_quota_nor_send_as() {
        use crate::smtp::SmtpError;
        let hostile = [
            "\"x>SubmissionQuotaExceeded\"@contoso.com",
            "\"x>SubmissionQuotaExceededException; y\"@contoso.com",
            "\"a\\\">SendAsDenied; 5.2.252 b\"@contoso.com",
            "\"q\\\"<\\\" STOREDRV.Submission.Exception:SubmissionQuotaExceededException\"@contoso.com",
        ];
        for address in hostile {
            let stages = [
                Stage::MailFrom(address.into()),
                Stage::RcptTo(address.into()),
                Stage::Data,
                Stage::EndOfData,
            ];
            for stage in stages {
                for text in [
                    format!("5.7.1 <{address}>: Sender address rejected: Access denied"),
                    format!("5.1.8 Sender {address} refused"),
                    format!("5.1.1 <{address}>... User unknown"),
                ] {
                    let kind = SmtpError::rejected(stage.clone(), 554, text.as_str()).kind();
                    assert_eq!(kind, SmtpErrorKind::Permanent, "{stage}: 554 {text}");
                }
            }
        }
    }

    #[test]
    fn quota_and_send_as_count_only_after_data_and_only_in_the_servers_words() {
        use crate::smtp::SmtpError;
        let quota = "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message";
        let send_as = "5.2.252 SendAsDenied; relay@contoso.com not allowed to send as \"x>y\"@contoso.com; STOREDRV.Submission.Exception:SendAsDeniedException";
        let kind = |stage: Stage, text: &str| SmtpError::rejected(stage, 554, text).kind();
        assert_eq!(kind(Stage::EndOfData, quota), SmtpErrorKind::QuotaExceeded);
        assert_eq!(kind(Stage::EndOfData, send_as), SmtpErrorKind::SendAsDenied);
        // Postfix (the test peer) puts the echoed address first.
        let echoed = "5.2.0 <\"a>b\"@contoso.test>: Sender address rejected: STOREDRV.Submission.Exception:SubmissionQuotaExceededException; x";
        assert_eq!(kind(Stage::EndOfData, echoed), SmtpErrorKind::QuotaExceeded);
        for stage in [
            Stage::MailFrom("a@contoso.com".into()),
            Stage::RcptTo("a@contoso.com".into()),
            Stage::Data,
        ] {
            assert_eq!(
                kind(stage.clone(), quota),
                SmtpErrorKind::Permanent,
                "{stage}"
            );
            assert_eq!(
                kind(stage.clone(), send_as),
                SmtpErrorKind::Permanent,
                "{stage}"
            );
        }
    }

    #[test]
    fn parses_enhanced_codes() {
        assert_eq!(
            parse_enhanced("5.2.252 SendAsDenied; x"),
            Some(EnhancedCode::new(5, 2, 252))
        );
        assert_eq!(
            parse_enhanced("<a@b.c>: Sender address rejected: 5.7.60 Client"),
            Some(EnhancedCode::new(5, 7, 60))
        );
        assert_eq!(parse_enhanced("Authentication unsuccessful"), None);
        assert_eq!(parse_enhanced("version 1.2 is fine"), None);
        assert_eq!(parse_enhanced("6.1.1 bad class"), None);
        assert_eq!(parse_enhanced("5.1234.1 too long"), None);
        assert_eq!(
            EnhancedCode::new(5, 7, 139).to_string(),
            "5.7.139".to_string()
        );
    }

    #[test]
    fn token_rejected_535_5_7_3() {
        assert_eq!(
            classify_line("535 5.7.3 Authentication unsuccessful"),
            SmtpErrorKind::AuthFailed
        );
    }

    #[test]
    fn dovecot_535_after_challenge_is_auth_failed() {
        assert_eq!(
            classify_line("535 5.7.8 Error: authentication failed"),
            SmtpErrorKind::AuthFailed
        );
    }

    #[test]
    fn smtp_auth_disabled_for_tenant_and_mailbox() {
        for line in [
            "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant",
            "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox",
        ] {
            assert_eq!(
                classify_line(line),
                SmtpErrorKind::SmtpAuthDisabled,
                "{line}"
            );
        }
    }

    #[test]
    fn basic_auth_refused() {
        assert_eq!(
            classify_line("550 5.7.30 Basic authentication is not supported for Client Submission"),
            SmtpErrorKind::BasicAuthRefused
        );
    }

    #[test]
    fn send_as_denied_in_every_form() {
        for line in [
            "554 5.2.252 SendAsDenied; relay@contoso.test not allowed to send as boss@contoso.test; STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied",
            "554 5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; Failed to process message",
            "550 5.7.60 Client does not have permissions to send as this sender",
            // The peer: Postfix puts its own text before the access map's reply.
            "554 5.7.1 <denied@contoso.test>: Sender address rejected: 5.2.252 SendAsDenied; relay@contoso.test not allowed to send as denied@contoso.test",
        ] {
            assert_eq!(classify_line(line), SmtpErrorKind::SendAsDenied, "{line}");
        }
    }

    #[test]
    fn thread_limit() {
        assert_eq!(
            classify_line("432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded"),
            SmtpErrorKind::ThreadLimit
        );
    }

    #[test]
    fn quota_exceeded() {
        assert_eq!(
            classify_line(
                "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message"
            ),
            SmtpErrorKind::QuotaExceeded
        );
    }

    #[test]
    fn mailbox_full() {
        assert_eq!(
            classify_line("554 5.2.2 mailbox full"),
            SmtpErrorKind::MailboxFull
        );
    }

    #[test]
    fn too_large() {
        assert_eq!(
            classify_line("552 5.3.4 Message size exceeds fixed maximum message size"),
            SmtpErrorKind::TooLarge
        );
        assert_eq!(
            classify_line("552 Message size exceeds fixed limit"),
            SmtpErrorKind::TooLarge
        );
        assert_eq!(
            classify_line("554 5.3.4 Message too big for system"),
            SmtpErrorKind::TooLarge
        );
    }

    #[test]
    fn other_4xx_is_transient() {
        for line in [
            "451 5.7.3 STARTTLS is required to send mail",
            "421 4.4.2 Connection dropped due to timeout",
            "454 4.7.0 Temporary authentication failure",
            "450 4.2.1 try later",
            "452 4.2.2 Mailbox full",
        ] {
            assert_eq!(classify_line(line), SmtpErrorKind::Transient, "{line}");
        }
    }

    #[test]
    fn other_5xx_is_permanent() {
        for line in [
            "530 5.7.57 Client not authenticated to send mail",
            "550 5.1.1 User unknown",
            "554 5.2.0 something else entirely",
        ] {
            assert_eq!(classify_line(line), SmtpErrorKind::Permanent, "{line}");
        }
    }

    #[test]
    fn mailbox_full_code_is_not_a_prefix_match() {
        // 5.2.252 starts like 5.2.2: only the exact code means mailbox full.
        assert_eq!(
            classify_line("554 5.2.252 something"),
            SmtpErrorKind::SendAsDenied
        );
        assert_eq!(
            classify_line("554 5.2.22 something"),
            SmtpErrorKind::Permanent
        );
    }

    proptest::proptest! {
        #[test]
        fn enhanced_codes_round_trip(class in proptest::sample::select(vec![2u8, 4, 5]), subject in 0u16..1000, detail in 0u16..1000, text in "[a-zA-Z ;]{0,40}") {
            let code = EnhancedCode::new(class, subject, detail);
            proptest::prop_assert_eq!(parse_enhanced(&format!("{code} {text}")), Some(code));
        }

        #[test]
        fn every_reply_gets_a_kind_and_4xx_never_counts_as_permanent(code in 200u16..600, text in "\\PC{0,80}") {
            let kind = classify(&Stage::EndOfData, code, &text);
            if (400..500).contains(&code) {
                proptest::prop_assert!(
                    !matches!(kind, SmtpErrorKind::Permanent | SmtpErrorKind::TooLarge | SmtpErrorKind::AuthFailed | SmtpErrorKind::MailboxFull),
                    "{code} {text:?} -> {kind:?}"
                );
            }
        }
    }
}
