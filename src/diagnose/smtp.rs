//! The SMTP steps: connect, greeting and EHLO, what the server offers, AUTH, the test mail.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use lettre::transport::smtp::authentication::Mechanism;
use lettre::transport::smtp::client::AsyncSmtpConnection;

use super::SendTest;
use super::report::Step;
use crate::config::{Encryption, OAuthSettings, Settings, SmtpAuthentication};
use crate::message::{MailRequest, MessageLimits, OutgoingMail};
use crate::remedy::{self, Cause, Facts, Setup};
use crate::smtp::{Connection, Connector, SmtpError, SmtpErrorKind};
use crate::token::TokenClaims;

pub(super) async fn connection_abort(mut connection: AsyncSmtpConnection) {
    connection.abort().await;
}

pub(super) fn server(settings: &Settings) -> String {
    format!(
        "{}:{}",
        settings.send_email.smtp_server, settings.send_email.smtp_port
    )
}

/// DNS, then TCP through the relay's own socket code (source address, TCP_NODELAY).
pub(super) async fn connect(
    settings: &Settings,
    connector: &Connector,
) -> Result<(tokio::net::TcpStream, Step), Step> {
    let email = &settings.send_email;
    let server = server(settings);
    let timeout = settings.relay.smtp.connect_timeout;
    let lookup = tokio::time::timeout(
        timeout,
        tokio::net::lookup_host((email.smtp_server.as_str(), email.smtp_port)),
    )
    .await;
    let addresses: Vec<SocketAddr> = match lookup {
        Err(_) => {
            return Err(Step::fail(
                "connect",
                format!("cannot resolve {}", email.smtp_server),
                format!(
                    "no DNS answer within mailRelay.smtp.connectTimeoutSeconds ({}s)",
                    timeout.as_secs()
                ),
                vec![Setup::DnsResolver.fix(), Setup::SmtpHost.fix()],
            ));
        }
        Ok(Err(e)) => {
            return Err(Step::fail(
                "connect",
                format!("cannot resolve {}", email.smtp_server),
                format!("DNS lookup failed: {e}"),
                vec![Setup::SmtpHost.fix(), Setup::DnsResolver.fix()],
            ));
        }
        Ok(Ok(addresses)) => addresses.collect(),
    };
    let shown: Vec<String> = addresses.iter().map(|a| a.ip().to_string()).collect();
    let started = Instant::now();
    match connector.connect_tcp().await {
        Ok(tcp) => {
            let peer = tcp
                .peer_addr()
                .map_or_else(|_| server.clone(), |a| a.to_string());
            Ok((
                tcp,
                Step::pass(
                    "connect",
                    format!(
                        "{server} resolves to {}; TCP connected to {peer} in {} ms",
                        shown.join(", "),
                        started.elapsed().as_millis()
                    ),
                ),
            ))
        }
        Err(error) => {
            let text = cause_of(&error);
            let server = server.as_str();
            let fix = if text.contains("refused") {
                vec![Setup::NothingListens { server }.fix()]
            } else if text.contains("no answer within") {
                vec![Setup::SmtpFirewall { server }.fix(), Setup::SmtpHost.fix()]
            } else if text.contains("sourceAddress") {
                vec![Setup::SourceAddress.fix()]
            } else {
                vec![Setup::SmtpHost.fix()]
            };
            Err(Step::fail(
                "connect",
                format!(
                    "{server} resolves to {} but the TCP connection failed",
                    shown.join(", ")
                ),
                text,
                fix,
            ))
        }
    }
}

/// TLS as `smtpEncryption` says, and the greeting; the step line names the certificate.
pub(super) fn cause_of(error: &SmtpError) -> String {
    match error {
        SmtpError::Rejected { stage, reply, .. } => {
            format!("the server refused {stage}: {reply}")
        }
        SmtpError::Connection {
            stage,
            server,
            detail,
            ..
        } => format!("SMTP connection to {server} failed at {stage}: {detail}"),
        other => other.to_string(),
    }
}

pub(super) fn greeting_failed(settings: &Settings, error: &SmtpError) -> Step {
    let server = server(settings);
    let mut fix = vec![Setup::NoGreeting { server: &server }.fix()];
    match settings.send_email.smtp_encryption {
        Encryption::Tls | Encryption::None => fix.push(Setup::SilentImplicitTls.fix()),
        Encryption::Ssl => {}
    }
    Step::fail(
        "tls",
        format!("no SMTP greeting from {server}"),
        cause_of(error),
        fix,
    )
}

pub(super) fn mechanisms(connection: &AsyncSmtpConnection) -> Vec<&'static str> {
    let info = connection.server_info();
    [
        (Mechanism::Plain, "PLAIN"),
        (Mechanism::Login, "LOGIN"),
        (Mechanism::Xoauth2, "XOAUTH2"),
    ]
    .into_iter()
    .filter(|(m, _)| info.supports_auth_mechanism(*m))
    .map(|(_, name)| name)
    .collect()
}

/// Does the EHLO answer (after STARTTLS) offer the login the settings need?
pub(super) fn offer(settings: &Settings, connection: &AsyncSmtpConnection) -> Step {
    let offered = mechanisms(connection);
    let name = connection.server_info().name().to_owned();
    let after = match settings.send_email.smtp_encryption {
        Encryption::Tls => "after STARTTLS ",
        _ => "",
    };
    let offered_text = if offered.is_empty() {
        "no AUTH".to_owned()
    } else {
        format!("AUTH {}", offered.join(" "))
    };
    let summary = format!("{name} offers {offered_text} {after}in its EHLO answer");
    match &settings.send_email.smtp_authentication {
        SmtpAuthentication::None => Step::pass("ehlo", summary),
        SmtpAuthentication::MsOAuth { .. } if offered.contains(&"XOAUTH2") => {
            Step::pass("ehlo", summary)
        }
        SmtpAuthentication::Basic { .. }
            if offered.contains(&"PLAIN") || offered.contains(&"LOGIN") =>
        {
            Step::pass("ehlo", summary)
        }
        SmtpAuthentication::MsOAuth { .. } => Step::fail(
            "ehlo",
            summary,
            "smtpAuthentication MS_OAUTH needs AUTH XOAUTH2, which this server does not offer",
            vec![Setup::NoXoauth2.fix(), Setup::BasicInstead.fix()],
        ),
        SmtpAuthentication::Basic { .. } => Step::fail(
            "ehlo",
            summary,
            "smtpAuthentication BASIC needs AUTH PLAIN or LOGIN, which this server does not offer",
            vec![Setup::NoPlainLogin.fix(), Setup::OAuthInstead.fix()],
        ),
    }
}

pub(super) fn auth_passed(settings: &Settings, took: Duration) -> Step {
    let email = &settings.send_email;
    let summary = match &email.smtp_authentication {
        SmtpAuthentication::None => {
            return Step::skip("auth", "smtpAuthentication NONE: no login");
        }
        SmtpAuthentication::Basic { username, .. } => {
            format!("PLAIN/LOGIN as {username} accepted")
        }
        SmtpAuthentication::MsOAuth { username, .. } => {
            format!("XOAUTH2 as {username} accepted")
        }
    };
    Step::pass("auth", format!("{summary} in {} ms", took.as_millis()))
}

/// EXCHANGE.md section 1, with this relay's values filled in.
pub fn setup_checklist(username: &str, oauth: &OAuthSettings) -> Vec<String> {
    remedy::ms_oauth_checklist(username, &oauth.client_id, &oauth.tenant_id)
}

pub(super) fn auth_failed(
    settings: &Settings,
    claims: Option<&TokenClaims>,
    error: &SmtpError,
) -> Step {
    let email = &settings.send_email;
    let summary = match &email.smtp_authentication {
        SmtpAuthentication::MsOAuth { username, .. } => {
            format!("XOAUTH2 as {username} refused")
        }
        SmtpAuthentication::Basic { username, .. } => format!("login as {username} refused"),
        SmtpAuthentication::None => "the session could not be used".into(),
    };
    let fix = match (error.kind(), &email.smtp_authentication) {
        (SmtpErrorKind::AuthFailed, SmtpAuthentication::MsOAuth { username, oauth }) => {
            let mut fix = Vec::new();
            if claims.is_some_and(TokenClaims::lacks_send_as_app) {
                fix.push(Setup::LacksSendAsApp.fix());
            }
            fix.push(Setup::TokenRefused.fix());
            fix.extend(setup_checklist(username.as_str(), oauth));
            fix
        }
        (SmtpErrorKind::SmtpAuthDisabled, _) => vec![Cause::SmtpAuthDisabled.fix_with(&Facts {
            mailbox: email.smtp_authentication.username(),
            ..Facts::default()
        })],
        (SmtpErrorKind::BasicAuthRefused, _) => vec![Cause::BasicAuthRefused.fix()],
        (SmtpErrorKind::AuthFailed, SmtpAuthentication::Basic { .. }) => {
            vec![Setup::BasicLogin.fix()]
        }
        _ => error.cause().map(Cause::fix).into_iter().collect(),
    };
    Step::fail("auth", summary, cause_of(error), fix)
}

pub(super) async fn send_test_mail(
    settings: &Settings,
    connection: &mut Connection,
    test: &SendTest,
) -> Step {
    let mail = match test_mail(settings, test, &server(settings)) {
        Ok(mail) => mail,
        Err(step) => return step,
    };
    match connection
        .send(&mail, &std::sync::atomic::AtomicBool::new(false), None)
        .await
    {
        Ok(receipt) => Step::pass(
            "send-test",
            format!(
                "the server took the test mail from {} to {}: {} (Message-ID {})",
                test.from, test.to, receipt.server_reply, mail.message_id
            ),
        ),
        Err(error) if error.kind() == SmtpErrorKind::SendAsDenied => {
            let login = settings
                .send_email
                .smtp_authentication
                .username()
                .unwrap_or("<smtpUsername>");
            let facts = Facts {
                mailbox: Some(login),
                from: Some(&test.from),
                client_id: None,
            };
            Step::fail(
                "send-test",
                format!("SendAsDenied: {login} may not send as {}", test.from),
                cause_of(&error),
                vec![
                    Cause::SendAsDenied.fix_with(&facts),
                    Setup::SendAsAfterData.fix(),
                ],
            )
        }
        Err(error) => Step::fail(
            "send-test",
            format!(
                "the server refused the test mail from {} to {}",
                test.from, test.to
            ),
            cause_of(&error),
            error.cause().map(Cause::fix).into_iter().collect(),
        ),
    }
}

/// The test mail `--send-test` sends, saying it went `via` (the server, or Graph).
pub(super) fn test_mail(
    settings: &Settings,
    test: &SendTest,
    via: &str,
) -> Result<OutgoingMail, Step> {
    let host = lettre::transport::smtp::extension::ClientId::default().to_string();
    let request = serde_json::json!({
        "from": test.from,
        "to": [test.to],
        "subject": "mail-relay diagnose: test mail",
        "text": format!(
            "This is a test mail sent by `mail-relay diagnose --send-test` on {host} at {}.\n\nIf it arrived, the relay can send as {} through {via}.\n",
            httpdate::fmt_http_date(SystemTime::now()),
            test.from,
        ),
    });
    serde_json::from_value::<MailRequest>(request)
        .map_err(|e| e.to_string())
        .and_then(|r| {
            OutgoingMail::from_request(r, &MessageLimits::from(&settings.relay.limits))
                .map_err(|e| e.to_string())
        })
        .map_err(|e| {
            Step::fail(
                "send-test",
                "the test mail could not be built",
                e,
                vec!["give plain addresses: --from sender@contoso.com --to you@contoso.com".into()],
            )
        })
}
