//! One SMTP connection: opening it (socket, TLS, EHLO, AUTH) and one mail transaction on it.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::commands::{Data, Mail, Noop, Quit, Rcpt, Rset};
use lettre::transport::smtp::extension::{Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::{Code, Response};
use secrecy::{ExposeSecret, SecretString};

use super::error::{SmtpError, Stage};
use super::tls::is_certificate_error;
use super::{BeforeUpload, SmtpReceipt};
use crate::message::OutgoingMail;
use crate::token::AccessToken;

use super::classify::SmtpErrorKind;

/// A message as DATA carries it, with the line that ends it: a line starting with `.` gets
/// another one in front (RFC 5321 4.5.2), as lettre's own codec does it.
pub(super) struct DataText<'a>(&'a str);

impl fmt::Display for DataText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0;
        let mut start = 0;
        let mut line_start = true;
        let mut after_cr = false;
        for (i, byte) in text.bytes().enumerate() {
            if byte == b'.' && line_start {
                f.write_str(&text[start..i])?;
                f.write_str(".")?;
                start = i;
            }
            line_start = after_cr && byte == b'\n';
            after_cr = byte == b'\r';
        }
        f.write_str(&text[start..])?;
        f.write_str("\r\n.\r\n")
    }
}

/// Sorts lettre's error: a reply becomes `Rejected`, the rest a connection failure.
pub(super) fn from_lettre(
    error: lettre::transport::smtp::Error,
    stage: Stage,
    server: &str,
) -> SmtpError {
    if let Some(code) = error.status() {
        let text = std::error::Error::source(&error)
            .map(ToString::to_string)
            .unwrap_or_default();
        return SmtpError::rejected(stage, code_number(code), text);
    }
    if error.is_client() {
        return SmtpError::Unsupported {
            detail: format!("cannot be used at {stage}: {error}"),
            stage,
            server: server.to_string(),
        };
    }
    let kind = if is_certificate_error(&error) {
        SmtpErrorKind::Tls
    } else {
        SmtpErrorKind::Transient
    };
    SmtpError::Connection {
        kind,
        stage,
        server: server.to_string(),
        detail: error.to_string(),
    }
}

pub(super) fn code_number(code: Code) -> u16 {
    u16::from(code.severity as u8) * 100
        + u16::from(code.category as u8) * 10
        + u16::from(code.detail as u8)
}

pub(super) fn reply_text(response: &Response) -> String {
    response.message().collect::<Vec<_>>().join(" ")
}

/// Counts itself in the connector's open-connection gauge while alive.
pub(super) struct OpenGuard(Arc<AtomicUsize>);

impl OpenGuard {
    pub(super) fn new(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(open))
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An AUTH line that carries a credential: kept out of `Debug`.
pub(super) struct SecretLine(SecretString);

impl fmt::Display for SecretLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.expose_secret())
    }
}

/// An open, authenticated connection.
pub(crate) struct Connection {
    pub(super) inner: AsyncSmtpConnection,
    /// The server offers PIPELINING (RFC 2920): MAIL FROM and RCPT TO go in one write.
    pub(super) pipelining: bool,
    /// The token this connection logged in with (XOAUTH2 only).
    pub token: Option<AccessToken>,
    pub last_used: Instant,
    pub(super) server: String,
    pub(super) command_timeout: Duration,
    pub(super) _open: OpenGuard,
    /// The mailbox's shared slot this connection holds (with a shared store). Declared last,
    /// so it is given back only after the session above is closed.
    pub slot: Option<super::Slot>,
}

impl Connection {
    pub(super) async fn command(
        &mut self,
        command: impl fmt::Display,
        stage: Stage,
    ) -> Result<Response, SmtpError> {
        let limit = self.command_timeout;
        match tokio::time::timeout(limit, self.inner.command(command)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(from_lettre(e, stage, &self.server)),
            Err(_) => Err(self.no_answer(stage)),
        }
    }

    fn no_answer(&self, stage: Stage) -> SmtpError {
        SmtpError::Connection {
            kind: SmtpErrorKind::Transient,
            stage,
            server: self.server.clone(),
            detail: format!(
                "no answer within mailRelay.smtp.commandTimeoutSeconds ({:?})",
                self.command_timeout
            ),
        }
    }

    pub(super) async fn basic(
        &mut self,
        username: &str,
        password: &SecretString,
    ) -> Result<(), SmtpError> {
        let credentials = Credentials::new(username.to_string(), password.expose_secret().into());
        let limit = self.command_timeout;
        let outcome = tokio::time::timeout(
            limit,
            self.inner
                .auth(&[Mechanism::Plain, Mechanism::Login], &credentials),
        )
        .await;
        match outcome {
            Ok(Ok(response)) if code_number(response.code()) == 235 => Ok(()),
            Ok(Ok(response)) => Err(SmtpError::rejected(
                Stage::Auth,
                code_number(response.code()),
                reply_text(&response),
            )),
            Ok(Err(e)) => Err(from_lettre(e, Stage::Auth, &self.server)),
            Err(_) => Err(self.no_answer(Stage::Auth)),
        }
    }

    /// SASL XOAUTH2 with an initial response. Exchange refuses a token with `535` at once;
    /// Gmail and Dovecot first send a `334` JSON challenge, answered with an empty line,
    /// and then `535`. lettre's own `auth` gives up on that challenge, so this is done here.
    pub(super) async fn xoauth2(
        &mut self,
        username: &str,
        token: &AccessToken,
    ) -> Result<(), SmtpError> {
        if !self
            .inner
            .server_info()
            .supports_auth_mechanism(Mechanism::Xoauth2)
        {
            return Err(SmtpError::Unsupported {
                stage: Stage::Auth,
                server: self.server.clone(),
                detail: format!(
                    "does not offer AUTH XOAUTH2 (it offers: {}), which MS_OAUTH needs",
                    self.inner.server_info()
                ),
            });
        }
        let initial = BASE64.encode(format!(
            "user={username}\x01auth=Bearer {}\x01\x01",
            token.expose()
        ));
        let line = SecretLine(SecretString::from(format!("AUTH XOAUTH2 {initial}\r\n")));
        let mut response = self.command(line, Stage::Auth).await?;
        if code_number(response.code()) == 334 {
            tracing::debug!(
                challenge = %decode_challenge(&response),
                "XOAUTH2 token refused with a challenge; answering with an empty line"
            );
            response = self.command("\r\n", Stage::Auth).await?;
        }
        match code_number(response.code()) {
            235 => Ok(()),
            code => Err(SmtpError::rejected(
                Stage::Auth,
                code,
                reply_text(&response),
            )),
        }
    }

    /// One mail: MAIL FROM, RCPT TO for each recipient, DATA, the message.
    /// Success only after the server's positive reply to the end of DATA. `uploading` turns true
    /// when the message itself starts going out: from then on the server may end up with it.
    pub async fn send(
        &mut self,
        mail: &OutgoingMail,
        uploading: &AtomicBool,
        before_upload: Option<BeforeUpload<'_>>,
    ) -> Result<SmtpReceipt, SmtpError> {
        let envelope = &mail.envelope;
        let from = envelope.from().map(ToString::to_string).unwrap_or_default();
        let server_info = self.inner.server_info();
        let mut parameters = Vec::new();
        let non_ascii_address = envelope
            .from()
            .is_some_and(|a| !AsRef::<str>::as_ref(a).is_ascii())
            || envelope
                .to()
                .iter()
                .any(|a| !AsRef::<str>::as_ref(a).is_ascii());
        if non_ascii_address {
            if !server_info.supports_feature(Extension::SmtpUtfEight) {
                return Err(SmtpError::Unsupported {
                    stage: Stage::MailFrom(from.clone()),
                    server: self.server.clone(),
                    detail: "does not support SMTPUTF8, needed for a non-ASCII address".into(),
                });
            }
            parameters.push(MailParameter::SmtpUtfEight);
        }
        if !mail.formatted.is_ascii() {
            if !server_info.supports_feature(Extension::EightBitMime) {
                return Err(SmtpError::Unsupported {
                    stage: Stage::MailFrom(from.clone()),
                    server: self.server.clone(),
                    detail: "does not support 8BITMIME, needed for this 8-bit message".into(),
                });
            }
            parameters.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        let mut commands = vec![(
            Mail::new(envelope.from().cloned(), parameters).to_string(),
            Stage::MailFrom(from),
        )];
        commands.extend(envelope.to().iter().map(|to| {
            (
                Rcpt::new(to.clone(), Vec::new()).to_string(),
                Stage::RcptTo(to.to_string()),
            )
        }));
        if self.pipelining {
            self.pipelined(commands).await?;
        } else {
            for (command, stage) in commands {
                self.command(command, stage).await?;
            }
        }
        if let Some(before_upload) = before_upload {
            before_upload().await.map_err(SmtpError::Halted)?;
        }
        self.command(Data, Stage::Data).await?;
        uploading.store(true, Ordering::Relaxed);
        // The upload may take longer than one command: allow a slow link of 1 MB/s on top.
        let limit =
            self.command_timeout + Duration::from_secs((mail.formatted.len() / 1_000_000) as u64);
        // A small message goes in one write with its end, where lettre's `message` makes two
        // (two TLS records, two packets with TCP_NODELAY). A large one goes in slices, each
        // dot-stuffed into a buffer of its own size: one dot-stuffed copy of the whole message
        // would double what the send holds.
        let upload = async {
            let small = (mail.formatted.len() <= ONE_WRITE_MAX)
                .then(|| std::str::from_utf8(&mail.formatted).ok())
                .flatten();
            match small {
                Some(text) => self.inner.command(DataText(text)).await,
                None => {
                    self.inner
                        .message_iter(mail.formatted.chunks(DATA_SLICE))
                        .await
                }
            }
        };
        let response = match tokio::time::timeout(limit, upload).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => return Err(from_lettre(e, Stage::EndOfData, &self.server)),
            Err(_) => {
                return Err(SmtpError::Connection {
                    kind: SmtpErrorKind::Transient,
                    stage: Stage::EndOfData,
                    server: self.server.clone(),
                    detail: format!(
                        "no answer within {limit:?}; the server may or may not have taken the mail"
                    ),
                });
            }
        };
        // lettre counts any 2xx or 3xx as positive; only a 2xx (RFC 5321: 250) means the
        // server took the mail. Anything else after the whole message is a broken exchange.
        let code = code_number(response.code());
        if !(200..300).contains(&code) {
            return Err(SmtpError::Connection {
                kind: SmtpErrorKind::Transient,
                stage: Stage::EndOfData,
                server: self.server.clone(),
                detail: format!(
                    "answered {code} {} to the end of the message, which is neither success nor \
                     refusal; the server may or may not have taken the mail",
                    reply_text(&response)
                ),
            });
        }
        self.last_used = Instant::now();
        Ok(SmtpReceipt {
            accepted: envelope.to().iter().map(ToString::to_string).collect(),
            server_reply: format!("{} {}", code_number(response.code()), reply_text(&response)),
        })
    }

    /// The envelope in one write, then every reply in order (RFC 2920): one round trip instead
    /// of one per command. All replies are read, so the session stays in step for `RSET`; the
    /// first refusal is the answer (after a refused MAIL FROM the RCPTs fail too).
    async fn pipelined(&mut self, commands: Vec<(String, Stage)>) -> Result<(), SmtpError> {
        let batch: String = commands
            .iter()
            .map(|(command, _)| command.as_str())
            .collect();
        let limit = self.command_timeout;
        let server = self.server.clone();
        let inner = &mut self.inner;
        let first_stage = commands.first().map(|(_, stage)| stage.clone());
        let exchange = async move {
            let mut refused = None;
            for (i, (_, stage)) in commands.into_iter().enumerate() {
                let reply = if i == 0 {
                    inner.command(&batch).await
                } else {
                    inner.read_response().await
                };
                match reply {
                    Ok(_) => {}
                    Err(e) if e.status().is_some() => {
                        refused.get_or_insert_with(|| from_lettre(e, stage, &server));
                    }
                    // No reply: the session is out of step and cannot be used again.
                    Err(e) => return Err(from_lettre(e, stage, &server)),
                }
            }
            refused.map_or(Ok(()), Err)
        };
        match tokio::time::timeout(limit, exchange).await {
            Ok(result) => result,
            Err(_) => Err(self.no_answer(first_stage.unwrap_or(Stage::Data))),
        }
    }

    /// Ends a refused transaction so the connection can take the next mail.
    pub async fn reset(&mut self) -> Result<(), SmtpError> {
        self.command(Rset, Stage::Reuse).await?;
        self.last_used = Instant::now();
        Ok(())
    }

    /// A cheap liveness check before reusing a connection that sat idle.
    pub async fn noop(&mut self) -> Result<(), SmtpError> {
        // A session a firewall dropped silently must not eat the send's deadline.
        match tokio::time::timeout(HOUSEKEEPING_TIMEOUT, self.command(Noop, Stage::Reuse)).await {
            Ok(result) => result.map(|_| ()),
            Err(_) => Err(SmtpError::Connection {
                kind: SmtpErrorKind::Transient,
                stage: Stage::Reuse,
                server: self.server.clone(),
                detail: format!("no answer to NOOP within {HOUSEKEEPING_TIMEOUT:?}"),
            }),
        }
    }

    /// Says goodbye, briefly; errors do not matter any more.
    pub async fn quit(mut self) {
        let _ = tokio::time::timeout(HOUSEKEEPING_TIMEOUT, self.inner.command(Quit)).await;
    }
}

/// Largest message sent in one write with its end line.
const ONE_WRITE_MAX: usize = 1024 * 1024;
/// Slices a larger message goes out in.
const DATA_SLICE: usize = 256 * 1024;

/// `NOOP` and `QUIT` on pooled connections: a live server answers at once.
const HOUSEKEEPING_TIMEOUT: Duration = Duration::from_secs(3);

pub(super) fn decode_challenge(response: &Response) -> String {
    let text = reply_text(response);
    BASE64
        .decode(text.trim())
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .unwrap_or(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lettre::transport::smtp::response::{Category, Detail, Severity};

    /// lettre 0.11's `ClientCodec::encode` (private there), transcribed state for state, then
    /// the end line `message_iter` writes: the reference `DataText` must match.
    fn lettre_data(text: &str) -> String {
        #[derive(Clone, Copy)]
        #[allow(clippy::enum_variant_names)] // lettre's names, kept for the comparison
        enum Status {
            MiddleOfLine,
            StartingNewLine,
            StartOfNewLine,
        }
        let mut status = Status::StartOfNewLine;
        let mut buf = Vec::new();
        for &b in text.as_bytes() {
            buf.push(b);
            match (b, status) {
                (b'\r', _) => status = Status::StartingNewLine,
                (b'\n', Status::StartingNewLine) => status = Status::StartOfNewLine,
                (_, Status::StartingNewLine) => status = Status::MiddleOfLine,
                (b'.', Status::StartOfNewLine) => {
                    status = Status::MiddleOfLine;
                    buf.push(b'.');
                }
                (_, Status::StartOfNewLine) => status = Status::MiddleOfLine,
                _ => {}
            }
        }
        String::from_utf8(buf).unwrap() + "\r\n.\r\n"
    }

    #[test]
    fn data_text_doubles_leading_dots_and_ends_the_data() {
        assert_eq!(
            DataText(".top\r\n.\r\n..two\r\nmid.dle\r\n\n.bare-lf\r.cr").to_string(),
            "..top\r\n..\r\n...two\r\nmid.dle\r\n\n.bare-lf\r.cr\r\n.\r\n"
        );
        assert_eq!(DataText("").to_string(), "\r\n.\r\n");
    }

    proptest::proptest! {
        #[test]
        fn data_text_is_what_lettre_would_send(text in "[.\r\na-zé]{0,60}") {
            proptest::prop_assert_eq!(DataText(&text).to_string(), lettre_data(&text));
        }
    }

    #[test]
    fn reply_codes_become_numbers() {
        let code = Code::new(
            Severity::PermanentNegativeCompletion,
            Category::Unspecified3,
            Detail::Five,
        );
        assert_eq!(code_number(code), 535);
        let code = Code::new(
            Severity::PositiveIntermediate,
            Category::Unspecified3,
            Detail::Four,
        );
        assert_eq!(code_number(code), 334);
    }

    #[test]
    fn secret_line_has_no_debug_and_displays_the_line() {
        let line = SecretLine(SecretString::from("AUTH XOAUTH2 abc\r\n".to_string()));
        assert_eq!(line.to_string(), "AUTH XOAUTH2 abc\r\n");
    }
}
