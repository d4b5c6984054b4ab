//! The TLS step, and when the server's certificate is refused, what is wrong with it.

use lettre::transport::smtp::client::AsyncSmtpConnection;

use super::certificate::CertificateSummary;

use super::report::Step;
use super::smtp::{cause_of, greeting_failed, server};
use crate::config::{Encryption, Settings};
use crate::remedy::Setup;
use crate::smtp::{Connector, ImplicitTls, SmtpError, SmtpErrorKind};

pub(super) async fn secure(
    settings: &Settings,
    connector: &Connector,
    tcp: tokio::net::TcpStream,
) -> (Step, Option<AsyncSmtpConnection>) {
    let email = &settings.send_email;
    let server = server(settings);
    match email.smtp_encryption {
        Encryption::None => match connector.greet(Box::new(tcp)).await {
            Ok(connection) => (
                Step::skip(
                    "tls",
                    "smtpEncryption NONE: plain text (allowed only on loopback or without login)",
                ),
                Some(connection),
            ),
            Err(error) => (greeting_failed(settings, &error), None),
        },
        Encryption::Ssl => {
            let stream = match connector.implicit_tls(tcp).await {
                Ok(stream) => stream,
                Err(error) => return (tls_failed(settings, "implicit TLS", &error).await, None),
            };
            let session = stream.get_ref().1;
            let version = session
                .protocol_version()
                .map(|v| format!("{v:?}").replace('_', "."))
                .unwrap_or_default();
            let certificate = session
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|der| describe_certificate(der.as_ref()));
            match connector.greet(Box::new(ImplicitTls(stream))).await {
                Ok(connection) => (
                    Step::pass(
                        "tls",
                        format!(
                            "implicit TLS ({version}) with {server}; {}",
                            certificate.unwrap_or_else(|| "certificate not shown".into())
                        ),
                    ),
                    Some(connection),
                ),
                Err(error) => (greeting_failed(settings, &error), None),
            }
        }
        Encryption::Tls => {
            let mut connection = match connector.greet(Box::new(tcp)).await {
                Ok(connection) => connection,
                Err(error) => return (greeting_failed(settings, &error), None),
            };
            if let Err(error) = connector.starttls(&mut connection).await {
                // Dropped, not aborted: after a failed upgrade lettre has no stream left to
                // write QUIT to (and asserts so in debug builds).
                return (tls_failed(settings, "STARTTLS", &error).await, None);
            }
            let certificate = connection
                .peer_certificate()
                .map(|der| describe_certificate(&der))
                .unwrap_or_else(|_| "certificate not shown".into());
            (
                Step::pass("tls", format!("STARTTLS with {server}; {certificate}")),
                Some(connection),
            )
        }
    }
}

/// The error without the generic fix its message carries: the step lists its own fixes.
pub(super) async fn tls_failed(settings: &Settings, how: &str, error: &SmtpError) -> Step {
    let server = server(settings);
    let mut cause = cause_of(error);
    let mut fix = Vec::new();
    match error {
        SmtpError::Unsupported { .. } => fix.push(Setup::NoStarttls.fix()),
        _ if error.kind() == SmtpErrorKind::Tls => match refused_certificate(settings).await {
            Some(certificate) => {
                cause.push_str(&format!("\n            the server showed: {certificate}"));
                fix.extend(certificate_fixes(settings, &certificate));
            }
            None => fix.extend(
                [
                    Setup::CertificateName,
                    Setup::PrivateCa,
                    Setup::MaybeExpired,
                ]
                .map(Setup::fix),
            ),
        },
        _ => {
            if settings.send_email.smtp_encryption == Encryption::Ssl {
                fix.push(Setup::StarttlsPort.fix());
            }
            fix.push(Setup::TlsInspection.fix());
        }
    }
    Step::fail("tls", format!("{how} with {server} failed"), cause, fix)
}

/// The certificate a server showed although it was refused: a second handshake that
/// accepts anything, only to read it. Nothing is sent over that session.
pub(super) async fn refused_certificate(settings: &Settings) -> Option<CertificateSummary> {
    use lettre::transport::smtp::client::TlsParameters;
    use lettre::transport::smtp::extension::ClientId;

    let email = &settings.send_email;
    let parameters = TlsParameters::builder(email.smtp_server.clone())
        .dangerous_accept_invalid_certs(true)
        .dangerous_accept_invalid_hostnames(true)
        .build_rustls()
        .ok()?;
    let hello = ClientId::default();
    let timeout = settings.relay.smtp.connect_timeout;
    let address = (email.smtp_server.as_str(), email.smtp_port);
    let look = async {
        let mut connection = match email.smtp_encryption {
            Encryption::Ssl => AsyncSmtpConnection::connect_tokio1(
                address,
                Some(timeout),
                &hello,
                Some(parameters),
                None,
            )
            .await
            .ok()?,
            Encryption::Tls => {
                let mut connection =
                    AsyncSmtpConnection::connect_tokio1(address, Some(timeout), &hello, None, None)
                        .await
                        .ok()?;
                connection.starttls(parameters, &hello).await.ok()?;
                connection
            }
            Encryption::None => return None,
        };
        let der = connection.peer_certificate().ok();
        connection.abort().await;
        der
    };
    let der = tokio::time::timeout(timeout + settings.relay.smtp.command_timeout, look)
        .await
        .ok()
        .flatten()?;
    CertificateSummary::from_der(&der)
}

/// Does the certificate name `host` (exactly, or by a `*.` wildcard for one label)?
pub(super) fn names_host(certificate: &CertificateSummary, host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let subject_cn = certificate
        .subject
        .split(", ")
        .filter_map(|part| part.strip_prefix("CN="))
        .map(str::to_owned);
    let names: Vec<String> = if certificate.names.is_empty() {
        subject_cn.collect()
    } else {
        certificate.names.clone()
    };
    names.iter().any(|name| {
        let name = name.to_ascii_lowercase();
        match name.strip_prefix("*.") {
            Some(parent) => host
                .split_once('.')
                .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
            None => name == host,
        }
    })
}

/// Why a certificate that the server showed was refused, most likely first.
pub(super) fn certificate_fixes(
    settings: &Settings,
    certificate: &CertificateSummary,
) -> Vec<String> {
    let host = &settings.send_email.smtp_server;
    let mut fix = Vec::new();
    if certificate.days_left(time::OffsetDateTime::now_utc()) < 0 {
        fix.push(Setup::Expired.fix());
    }
    if !names_host(certificate, host) {
        let names = if certificate.names.is_empty() {
            certificate.subject.clone()
        } else {
            certificate.names.join(", ")
        };
        fix.push(
            Setup::NotInCertificate {
                host,
                names: &names,
            }
            .fix(),
        );
    }
    if fix.is_empty() {
        fix.push(
            Setup::UntrustedIssuer {
                issuer: &certificate.issuer,
            }
            .fix(),
        );
    }
    fix
}

fn describe_certificate(der: &[u8]) -> String {
    match CertificateSummary::from_der(der) {
        None => "certificate accepted (its fields could not be read)".into(),
        Some(summary) => {
            let days = summary.days_left(time::OffsetDateTime::now_utc());
            let warning = if days < 30 {
                " - WARNING: renew it soon"
            } else {
                ""
            };
            format!("certificate {summary} (in {days} days){warning}")
        }
    }
}
