//! `mail-relay diagnose`: walks from the settings to a logged-in SMTP session (and, when asked,
//! a sent test mail) one step at a time, and says for each step PASS, FAIL or SKIP, with the
//! cause and the fix on failure.
//!
//! The SMTP steps are the very ones the relay runs when it sends (`Connector`'s steps), so a
//! PASS here means the service will get as far. The token is fetched with [`TokenClient`] (one
//! request, no cache, no retries) so that Entra's answer is shown as it is. Nothing secret is
//! printed: a token appears only as its fingerprint and its non-secret claims.

mod certificate;

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use lettre::transport::smtp::authentication::Mechanism;
use lettre::transport::smtp::client::AsyncSmtpConnection;
use secrecy::ExposeSecret;

pub use certificate::CertificateSummary;

use crate::config::{Delivery, Encryption, OAuthSettings, Settings, SmtpAuthentication};
use crate::message::{MailRequest, MessageLimits, OutgoingMail};
use crate::remedy::{self, Cause, Facts};
use crate::smtp::{Connection, Connector, ImplicitTls, SmtpError, SmtpErrorKind};
use crate::token::{AccessToken, TokenClient, TokenError};

const SE: &str = "featureSwitches.sendEmail";

/// The outcome of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pass,
    Fail,
    Skip,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pass => "PASS",
            Self::Fail => "FAIL",
            Self::Skip => "SKIP",
        })
    }
}

/// One printed step: a status line, and on failure the cause and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: &'static str,
    pub status: Status,
    pub summary: String,
    pub cause: Option<String>,
    /// What to do, one line each (a checklist has several).
    pub fix: Vec<String>,
}

impl Step {
    pub fn pass(name: &'static str, summary: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Pass,
            summary: summary.into(),
            cause: None,
            fix: Vec::new(),
        }
    }

    pub fn skip(name: &'static str, summary: impl Into<String>) -> Self {
        Self {
            status: Status::Skip,
            ..Self::pass(name, summary)
        }
    }

    pub fn fail(
        name: &'static str,
        summary: impl Into<String>,
        cause: impl Into<String>,
        fix: Vec<String>,
    ) -> Self {
        Self {
            name,
            status: Status::Fail,
            summary: summary.into(),
            cause: Some(cause.into()),
            fix,
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:<9} {}", self.status, self.name, self.summary)?;
        if let Some(cause) = &self.cause {
            write!(f, "\n     cause: {cause}")?;
        }
        let mut fixes = self.fix.iter();
        if let Some(first) = fixes.next() {
            write!(f, "\n     fix:   {first}")?;
        }
        for more in fixes {
            write!(f, "\n            {more}")?;
        }
        Ok(())
    }
}

/// A real mail to send at the end (`--send-test --from X --to Y`).
#[derive(Debug, Clone)]
pub struct SendTest {
    pub from: String,
    pub to: String,
}

/// The first step: the settings file loaded and valid.
pub fn settings_passed(settings: &Settings) -> Step {
    let email = &settings.send_email;
    if let Delivery::Outbox { dir } = &settings.relay.delivery {
        return Step::pass(
            "settings",
            format!("valid: mailRelay.delivery.mode outbox ({})", dir.display()),
        );
    }
    let encryption = match email.smtp_encryption {
        Encryption::None => "plain text",
        Encryption::Ssl => "implicit TLS",
        Encryption::Tls => "STARTTLS",
    };
    let login = match &email.smtp_authentication {
        SmtpAuthentication::None => "no login".to_owned(),
        SmtpAuthentication::Basic { username, .. } => format!("BASIC as {username}"),
        SmtpAuthentication::MsOAuth { username, .. } => format!("MS_OAUTH as {username}"),
    };
    Step::pass(
        "settings",
        format!("valid: {} {encryption}, {login}", server(settings)),
    )
}

/// The first step failed: every invalid setting, one per line.
pub fn settings_failed(path: &std::path::Path, error: &crate::config::ConfigError) -> Step {
    let causes: Vec<String> = error.errors.iter().map(ToString::to_string).collect();
    Step::fail(
        "settings",
        format!("{} is not valid", path.display()),
        causes.join("\n            "),
        vec![format!(
            "correct each setting named above (mail-relay check-config --config {} lists them)",
            path.display()
        )],
    )
}

/// Every check after the settings, in order; `report` gets each step as soon as it is done.
/// True when no step failed.
pub async fn run(
    settings: &Settings,
    send_test: Option<&SendTest>,
    report: &mut dyn FnMut(&Step),
) -> bool {
    let mut ok = true;
    let mut emit = |step: Step| {
        ok &= step.status != Status::Fail;
        report(&step);
    };
    if let Delivery::Outbox { dir } = &settings.relay.delivery {
        let why = format!(
            "mailRelay.delivery.mode is outbox (mails go to {}): no SMTP server or token is used",
            dir.display()
        );
        for name in ["connect", "tls", "ehlo", "token", "auth", "send-test"] {
            emit(Step::skip(name, why.clone()));
        }
        return ok;
    }
    let connector = match Connector::from_settings(settings, true) {
        Ok(connector) => connector,
        Err(error) => {
            emit(Step::fail(
                "smtp",
                "the SMTP settings cannot be used",
                error.to_string(),
                vec!["correct the setting named above".into()],
            ));
            return ok;
        }
    };
    let email = &settings.send_email;

    // DNS and TCP.
    let session = match connect(settings, &connector).await {
        Ok((tcp, step)) => {
            emit(step);
            Some(tcp)
        }
        Err(step) => {
            emit(step);
            None
        }
    };

    // TLS (with the greeting before STARTTLS), then EHLO's offer.
    let session = match session {
        None => {
            emit(Step::skip("tls", "no connection (see above)"));
            emit(Step::skip("ehlo", "no connection (see above)"));
            None
        }
        Some(tcp) => {
            let (tls_step, connection) = secure(settings, &connector, tcp).await;
            emit(tls_step);
            match connection {
                None => {
                    emit(Step::skip("ehlo", "no TLS session (see above)"));
                    None
                }
                Some(connection) => {
                    let step = offer(settings, &connection);
                    let usable = step.status != Status::Fail;
                    emit(step);
                    if usable {
                        Some(connection)
                    } else {
                        connection_abort(connection).await;
                        None
                    }
                }
            }
        }
    };

    // The access token.
    let (token, claims) = match &email.smtp_authentication {
        SmtpAuthentication::MsOAuth { oauth, .. } => match fetch_token(oauth).await {
            Ok((token, claims, step)) => {
                emit(step);
                (Some(token), Some(claims))
            }
            Err(step) => {
                emit(step);
                (None, None)
            }
        },
        SmtpAuthentication::Basic { .. } => {
            emit(Step::skip(
                "token",
                "smtpAuthentication BASIC: no token (BASIC is being retired by Microsoft; MS_OAUTH is the lasting way)",
            ));
            (None, None)
        }
        SmtpAuthentication::None => {
            emit(Step::skip("token", "smtpAuthentication NONE: no token"));
            (None, None)
        }
    };

    // AUTH.
    let needs_token = matches!(
        email.smtp_authentication,
        SmtpAuthentication::MsOAuth { .. }
    );
    let logged_in = match session {
        None => {
            emit(Step::skip("auth", "no SMTP session (see above)"));
            None
        }
        Some(connection) if needs_token && token.is_none() => {
            connection_abort(connection).await;
            emit(Step::skip("auth", "no access token (see above)"));
            None
        }
        Some(connection) => {
            let started = Instant::now();
            match connector.login(connection, token.as_ref()).await {
                Ok(connection) => {
                    emit(auth_passed(settings, started.elapsed()));
                    Some(connection)
                }
                Err(error) => {
                    emit(auth_failed(settings, claims.as_ref(), &error));
                    None
                }
            }
        }
    };

    // The test mail.
    match (send_test, logged_in) {
        (None, connection) => {
            if let Some(connection) = connection {
                connection.quit().await;
            }
            emit(Step::skip(
                "send-test",
                "not asked for (add --send-test --from ADDRESS --to ADDRESS to send a real mail)",
            ));
        }
        (Some(_), None) => emit(Step::skip("send-test", "not logged in (see above)")),
        (Some(test), Some(mut connection)) => {
            let step = send_test_mail(settings, &mut connection, test).await;
            connection.quit().await;
            emit(step);
        }
    }
    ok
}

async fn connection_abort(mut connection: AsyncSmtpConnection) {
    connection.abort().await;
}

fn server(settings: &Settings) -> String {
    format!(
        "{}:{}",
        settings.send_email.smtp_server, settings.send_email.smtp_port
    )
}

fn host_fix() -> String {
    format!(
        "check {SE}.smtpServer and {SE}.smtpPort (Exchange Online: smtp.office365.com, port 587 with smtpEncryption TLS)"
    )
}

/// DNS, then TCP through the relay's own socket code (source address, TCP_NODELAY).
async fn connect(
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
                vec![
                    "check this host's DNS resolver (/etc/resolv.conf, the container's DNS)".into(),
                    host_fix(),
                ],
            ));
        }
        Ok(Err(e)) => {
            return Err(Step::fail(
                "connect",
                format!("cannot resolve {}", email.smtp_server),
                format!("DNS lookup failed: {e}"),
                vec![
                    host_fix(),
                    "check this host's DNS resolver (/etc/resolv.conf, the container's DNS)".into(),
                ],
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
            let mut fix = Vec::new();
            if text.contains("refused") {
                fix.push(format!("nothing listens on {server}: {}", host_fix()));
            } else if text.contains("no answer within") {
                fix.push(format!(
                    "a firewall or proxy drops the connection: allow outbound TCP to {server} from this host"
                ));
                fix.push(host_fix());
            } else if text.contains("sourceAddress") {
                fix.push(
                    "check mailRelay.smtp.sourceAddress: it must be an address of this host".into(),
                );
            } else {
                fix.push(host_fix());
            }
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
async fn secure(
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
fn cause_of(error: &SmtpError) -> String {
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

fn greeting_failed(settings: &Settings, error: &SmtpError) -> Step {
    let server = server(settings);
    let mut fix = vec![format!(
        "{server} did not greet as an SMTP server: check {SE}.smtpServer and {SE}.smtpPort"
    )];
    match settings.send_email.smtp_encryption {
        Encryption::Tls | Encryption::None => fix.push(format!(
            "a port that speaks implicit TLS (usually 465) stays silent until a TLS handshake: use {SE}.smtpEncryption SSL there, or port 587 with TLS"
        )),
        Encryption::Ssl => {}
    }
    Step::fail(
        "tls",
        format!("no SMTP greeting from {server}"),
        cause_of(error),
        fix,
    )
}

async fn tls_failed(settings: &Settings, how: &str, error: &SmtpError) -> Step {
    let server = server(settings);
    let mut cause = cause_of(error);
    let mut fix = Vec::new();
    match error {
        SmtpError::Unsupported { .. } => fix.push(format!(
            "the server offers no STARTTLS on this port: use {SE}.smtpEncryption SSL for an implicit-TLS port (465), or the STARTTLS port (587)"
        )),
        _ if error.kind() == SmtpErrorKind::Tls => match refused_certificate(settings).await {
            Some(certificate) => {
                cause.push_str(&format!("\n            the server showed: {certificate}"));
                fix.extend(certificate_fixes(settings, &certificate));
            }
            None => {
                fix.push(format!(
                    "{SE}.smtpServer must be a name in the server's certificate (connect by name, not by IP address)"
                ));
                fix.push(
                    "a certificate from a private CA needs that CA's PEM file in mailRelay.smtp.caFile"
                        .into(),
                );
                fix.push("an expired certificate must be renewed on the server".into());
            }
        },
        _ => {
            if settings.send_email.smtp_encryption == Encryption::Ssl {
                fix.push(format!(
                    "the port may speak STARTTLS rather than implicit TLS (587 does): use {SE}.smtpEncryption TLS there"
                ));
            }
            fix.push("a TLS-inspecting proxy or firewall may break the handshake: let this host reach the server directly".into());
        }
    }
    Step::fail("tls", format!("{how} with {server} failed"), cause, fix)
}

/// The certificate a server showed although it was refused: a second handshake that
/// accepts anything, only to read it. Nothing is sent over that session.
async fn refused_certificate(settings: &Settings) -> Option<CertificateSummary> {
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
fn names_host(certificate: &CertificateSummary, host: &str) -> bool {
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
fn certificate_fixes(settings: &Settings, certificate: &CertificateSummary) -> Vec<String> {
    let host = &settings.send_email.smtp_server;
    let mut fix = Vec::new();
    if certificate.days_left(time::OffsetDateTime::now_utc()) < 0 {
        fix.push("the server's certificate has expired: it must be renewed on the server".into());
    }
    if !names_host(certificate, host) {
        let names = if certificate.names.is_empty() {
            certificate.subject.clone()
        } else {
            certificate.names.join(", ")
        };
        fix.push(format!(
            "{SE}.smtpServer {host:?} is not a name in the certificate ({names}): set smtpServer to one of them"
        ));
    }
    if fix.is_empty() {
        fix.push(format!(
            "the certificate's issuer ({}) is not trusted here: put that CA's PEM certificate in mailRelay.smtp.caFile",
            certificate.issuer
        ));
    }
    fix
}

fn mechanisms(connection: &AsyncSmtpConnection) -> Vec<&'static str> {
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
fn offer(settings: &Settings, connection: &AsyncSmtpConnection) -> Step {
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
            vec![
                format!("Exchange Online offers XOAUTH2 after STARTTLS on smtp.office365.com:587: check {SE}.smtpServer, smtpPort and smtpEncryption TLS"),
                "a server without OAuth2 support needs smtpAuthentication BASIC (if it offers PLAIN or LOGIN)".into(),
            ],
        ),
        SmtpAuthentication::Basic { .. } => Step::fail(
            "ehlo",
            summary,
            "smtpAuthentication BASIC needs AUTH PLAIN or LOGIN, which this server does not offer",
            vec![
                "Exchange Online offers only LOGIN and XOAUTH2, and only after STARTTLS: use smtpEncryption TLS".into(),
                "for Exchange Online, switch to smtpAuthentication MS_OAUTH".into(),
            ],
        ),
    }
}

/// The non-secret claims of an access token that explain an AUTH refusal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenClaims {
    pub audience: Option<String>,
    pub roles: Vec<String>,
    /// The claims could be read at all (Entra's tokens are JWTs; other issuers' may not be).
    pub readable: bool,
}

impl TokenClaims {
    /// Reads the JWT payload without checking the signature: only to print it.
    pub fn read(token: &str) -> Self {
        let payload = token.split('.').nth(1).and_then(|part| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(part.trim_end_matches('='))
                .ok()
        });
        let Some(json) =
            payload.and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        else {
            return Self::default();
        };
        let audience = match &json["aud"] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(items) => Some(
                items
                    .iter()
                    .filter_map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            _ => None,
        };
        let roles = json["roles"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            audience,
            roles,
            readable: true,
        }
    }

    fn lacks_send_as_app(&self) -> bool {
        self.readable && !self.roles.iter().any(|r| r == "SMTP.SendAsApp")
    }
}

async fn fetch_token(oauth: &OAuthSettings) -> Result<(AccessToken, TokenClaims, Step), Step> {
    let client = TokenClient::new(oauth).map_err(|e| token_failed(oauth, &e))?;
    let now = SystemTime::now();
    let fetched = client
        .fetch(now)
        .await
        .map_err(|e| token_failed(oauth, &e))?;
    let claims = TokenClaims::read(fetched.access_token.expose_secret());
    let token = AccessToken::new(fetched.access_token, now + fetched.lifetime);
    let mut summary = format!(
        "{} issued a token for client {} (fingerprint {}, valid {} min)",
        client.endpoint().host_str().unwrap_or("the token endpoint"),
        oauth.client_id,
        token.fingerprint(),
        fetched.lifetime.as_secs() / 60
    );
    if claims.readable {
        summary.push_str(&format!(
            "; audience {}, roles {}",
            claims.audience.as_deref().unwrap_or("(none)"),
            if claims.roles.is_empty() {
                "(none)".to_owned()
            } else {
                claims.roles.join(" ")
            }
        ));
    }
    Ok((token, claims, Step::pass("token", summary)))
}

/// Cause and fix for every way the token request fails; Entra's codes through [`TokenError`].
pub fn token_failed(oauth: &OAuthSettings, error: &TokenError) -> Step {
    let summary = format!(
        "no access token from {}",
        oauth
            .token_endpoint
            .host_str()
            .unwrap_or("the token endpoint")
    );
    if let Some(entra) = error.entra() {
        let codes = entra
            .error_codes
            .iter()
            .map(|c| format!("AADSTS{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let ids = match (&entra.trace_id, &entra.correlation_id) {
            (Some(t), Some(c)) => format!("; trace id {t}, correlation id {c}"),
            _ => String::new(),
        };
        return match entra.known() {
            Some(known) => Step::fail(
                "token",
                format!("{summary}: Entra ID refused the request ({codes}, {})", entra.error),
                format!("{}{ids}", known.meaning),
                vec![known.fix.to_owned()],
            ),
            None => Step::fail(
                "token",
                format!("{summary}: Entra ID refused the request ({codes}, {})", entra.error),
                format!("{}{ids}", entra.description),
                vec![
                    "look the AADSTS code up at https://login.microsoftonline.com/error?code=<number>".into(),
                ],
            ),
        };
    }
    let fix = match error {
        TokenError::Network { .. } => vec![format!(
            "check {SE}.oAuthTokenEndpoint, and that this host can reach login.microsoftonline.com on port 443 (proxy, firewall, DNS)"
        )],
        TokenError::Timeout { .. } => vec![
            "a firewall may drop the connection: allow outbound HTTPS to login.microsoftonline.com"
                .into(),
            "or raise mailRelay.token.connectTimeoutSeconds / requestTimeoutSeconds".into(),
        ],
        TokenError::Throttled { .. } | TokenError::Unavailable { .. } => {
            vec!["Entra ID is throttling or failing: try again in a few minutes".into()]
        }
        TokenError::InvalidResponse { .. } => vec![format!(
            "{SE}.oAuthTokenEndpoint must be Entra ID's v2.0 token URL (https://login.microsoftonline.com/#TenantID#/oauth2/v2.0/token)"
        )],
        TokenError::Credential(_) => vec![format!(
            "{SE}.oAuthCertificate and oAuthPrivateKey must be the certificate uploaded to the app registration and its RSA key"
        )],
        TokenError::InsecureEndpoint { .. } => {
            vec![format!("use an https URL in {SE}.oAuthTokenEndpoint")]
        }
        TokenError::Setup(_) | TokenError::Rejected(_) => Vec::new(),
    };
    Step::fail("token", summary, error.to_string(), fix)
}

fn auth_passed(settings: &Settings, took: Duration) -> Step {
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

fn auth_failed(settings: &Settings, claims: Option<&TokenClaims>, error: &SmtpError) -> Step {
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
                fix.push(
                    "most likely: the token's roles lack SMTP.SendAsApp, so step 3 below is missing"
                        .to_owned(),
                );
            }
            fix.push(
                "the server refused the token (Exchange answers 535 5.7.3 without saying why; Dovecot and Gmail answer a 334 challenge and then 535). Check:"
                    .to_owned(),
            );
            fix.extend(setup_checklist(username, oauth));
            fix
        }
        (SmtpErrorKind::SmtpAuthDisabled, _) => vec![Cause::SmtpAuthDisabled.fix_with(&Facts {
            mailbox: email.smtp_authentication.username(),
            ..Facts::default()
        })],
        (SmtpErrorKind::BasicAuthRefused, _) => vec![Cause::BasicAuthRefused.fix()],
        (SmtpErrorKind::AuthFailed, SmtpAuthentication::Basic { .. }) => vec![format!(
            "check {SE}.smtpUsername and smtpPassword (Exchange Online refuses Basic authentication for most tenants: prefer MS_OAUTH)"
        )],
        _ => error.cause().map(Cause::fix).into_iter().collect(),
    };
    Step::fail("auth", summary, cause_of(error), fix)
}

async fn send_test_mail(settings: &Settings, connection: &mut Connection, test: &SendTest) -> Step {
    let host = lettre::transport::smtp::extension::ClientId::default().to_string();
    let request = serde_json::json!({
        "from": test.from,
        "to": [test.to],
        "subject": "mail-relay diagnose: test mail",
        "text": format!(
            "This is a test mail sent by `mail-relay diagnose --send-test` on {host} at {}.\n\nIf it arrived, the relay can send as {} through {}.\n",
            httpdate::fmt_http_date(SystemTime::now()),
            test.from,
            server(settings),
        ),
    });
    let mail = match serde_json::from_value::<MailRequest>(request)
        .map_err(|e| e.to_string())
        .and_then(|r| {
            OutgoingMail::from_request(r, &MessageLimits::from(&settings.relay.limits))
                .map_err(|e| e.to_string())
        }) {
        Ok(mail) => mail,
        Err(e) => {
            return Step::fail(
                "send-test",
                "the test mail could not be built",
                e,
                vec!["give plain addresses: --from sender@contoso.com --to you@contoso.com".into()],
            );
        }
    };
    match connection
        .send(&mail, &std::sync::atomic::AtomicBool::new(false))
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
                    "Exchange answers SendAsDenied only after the whole message (after DATA)"
                        .into(),
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use secrecy::SecretString;

    use super::*;
    use crate::config::ClientCredential;
    use crate::smtp::Stage;
    use crate::token::EntraError;

    fn oauth() -> OAuthSettings {
        OAuthSettings {
            tenant_id: "contoso.onmicrosoft.com".into(),
            client_id: "c1d2".into(),
            credential: ClientCredential::Secret(SecretString::from("s3cr3t")),
            token_endpoint: "https://login.microsoftonline.com/t/oauth2/v2.0/token"
                .parse()
                .unwrap(),
            scopes: "https://outlook.office365.com/.default".into(),
            grace: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(15),
        }
    }

    #[test]
    fn a_failed_step_prints_cause_and_every_fix_line() {
        let step = Step::fail("auth", "refused", "535 5.7.3", vec!["a".into(), "b".into()]);
        let text = step.to_string();
        assert_eq!(
            text,
            "FAIL auth      refused\n     cause: 535 5.7.3\n     fix:   a\n            b"
        );
        assert_eq!(Step::skip("tls", "x").to_string(), "SKIP tls       x");
    }

    #[test]
    fn every_known_entra_code_gets_its_meaning_and_fix() {
        for known in crate::remedy::KNOWN_ENTRA_CODES {
            let error = TokenError::Rejected(Box::new(EntraError {
                status: 400,
                error: "invalid_request".into(),
                error_codes: vec![known.number],
                description: "AADSTS: text".into(),
                trace_id: Some("t".into()),
                correlation_id: Some("c".into()),
                timestamp: None,
            }));
            let step = token_failed(&oauth(), &error);
            assert_eq!(step.status, Status::Fail);
            assert!(step.summary.contains(&format!("AADSTS{}", known.number)));
            assert_eq!(
                step.cause.as_deref(),
                Some(&*format!("{}; trace id t, correlation id c", known.meaning))
            );
            assert_eq!(step.fix, vec![known.fix.to_owned()]);
        }
    }

    #[test]
    fn certificate_names_match_exactly_or_by_one_wildcard_label() {
        let mut certificate = CertificateSummary {
            subject: "CN=outlook.com, O=Microsoft Corporation".into(),
            issuer: "CN=CA".into(),
            names: vec!["*.office365.com".into(), "outlook.com".into()],
            not_after: time::OffsetDateTime::now_utc(),
        };
        assert!(names_host(&certificate, "smtp.office365.com"));
        assert!(names_host(&certificate, "Outlook.com."));
        assert!(!names_host(&certificate, "office365.com"));
        assert!(!names_host(&certificate, "a.smtp.office365.com"));
        certificate.names.clear();
        assert!(names_host(&certificate, "outlook.com"));
        assert!(!names_host(&certificate, "smtp.office365.com"));
    }

    #[test]
    fn claims_are_read_without_the_signature() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(r#"{"aud":"https://outlook.office365.com","roles":["SMTP.SendAsApp"]}"#);
        let claims = TokenClaims::read(&format!("h.{payload}.sig"));
        assert_eq!(
            claims.audience.as_deref(),
            Some("https://outlook.office365.com")
        );
        assert_eq!(claims.roles, vec!["SMTP.SendAsApp"]);
        assert!(!claims.lacks_send_as_app());
        let opaque = TokenClaims::read("not-a-jwt");
        assert!(!opaque.readable);
        assert!(!opaque.lacks_send_as_app());
    }

    #[test]
    fn a_refused_token_lists_the_setup_checklist() {
        let mut settings = crate::config::load_str(crate::config::DEV_DEFAULT, "dev", &[])
            .unwrap()
            .settings;
        settings.send_email.smtp_authentication = SmtpAuthentication::MsOAuth {
            username: "relay@contoso.com".into(),
            oauth: oauth(),
        };
        let error = SmtpError::rejected(Stage::Auth, 535, "5.7.3 Authentication unsuccessful");
        let claims = TokenClaims {
            audience: Some("https://outlook.office365.com".into()),
            roles: Vec::new(),
            readable: true,
        };
        let step = auth_failed(&settings, Some(&claims), &error);
        let text = step.to_string();
        assert!(text.contains("roles lack SMTP.SendAsApp"), "{text}");
        assert!(text.contains("New-ServicePrincipal -AppId c1d2"), "{text}");
        assert!(
            text.contains("Add-MailboxPermission -Identity relay@contoso.com"),
            "{text}"
        );
        assert!(
            text.contains("-SmtpClientAuthenticationDisabled $false"),
            "{text}"
        );

        let disabled = SmtpError::rejected(
            Stage::Auth,
            535,
            "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant",
        );
        let step = auth_failed(&settings, None, &disabled);
        assert_eq!(step.fix.len(), 1);
        assert!(step.fix[0].contains("enable Authenticated SMTP for relay@contoso.com"));
    }
}
