//! `mail-relay diagnose`: walks from the settings to a logged-in SMTP session (and, when asked,
//! a sent test mail) one step at a time, and says for each step PASS, FAIL or SKIP, with the
//! cause and the fix on failure.
//!
//! The SMTP steps are the very ones the relay runs when it sends (`Connector`'s steps), so a
//! PASS here means the service will get as far. The token is fetched with [`crate::token::TokenClient`] (one
//! request, no cache, no retries) so that Entra's answer is shown as it is. Nothing secret is
//! printed: a token appears only as its fingerprint and its non-secret claims.

mod certificate;
mod graph;
mod report;
mod smtp;
mod store;
mod tls;
mod token;

use std::time::Instant;

pub use certificate::CertificateSummary;

use crate::config::{Delivery, Encryption, Settings, SmtpAuthentication};
use crate::remedy::Setup;
use crate::smtp::Connector;

pub use crate::token::TokenClaims;
pub use report::{Status, Step};
pub use smtp::setup_checklist;
use smtp::{auth_failed, auth_passed, connect, connection_abort, offer, send_test_mail, server};
use tls::secure;
use token::fetch_token;
pub use token::token_failed;

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
    if let (Delivery::Graph, Some(mailbox)) = (
        &settings.relay.delivery,
        email.smtp_authentication.username(),
    ) {
        return Step::pass(
            "settings",
            format!(
                "valid: mailRelay.delivery.mode graph ({}) as {mailbox}",
                settings.relay.graph.base_url
            ),
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
        vec![
            Setup::InvalidSettings {
                path: &path.display().to_string(),
            }
            .fix(),
        ],
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
    emit(store::check(&settings.relay.store).await);
    if settings.relay.delivery == Delivery::Graph {
        graph::run(settings, send_test, &mut emit).await;
        return ok;
    }
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
                vec![Setup::SettingNamedAbove.fix()],
            ));
            return ok;
        }
    };
    let email = &settings.send_email;
    let auto = settings.relay.delivery == Delivery::Auto;

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
    let mut smtp_auth_off = false;
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
                Err(error) if auto && error.kind().is_smtp_auth_off() => {
                    smtp_auth_off = true;
                    emit(Step::skip(
                        "auth",
                        format!(
                            "the server refuses SMTP AUTH ({error}): with mailRelay.delivery.mode auto mail goes through Microsoft Graph instead (checked below)"
                        ),
                    ));
                    None
                }
                Err(error) => {
                    emit(auth_failed(settings, claims.as_ref(), &error));
                    None
                }
            }
        }
    };

    // With auto, Graph stands in whenever SMTP AUTH is refused: it must work too.
    let graph_token = if auto {
        graph::checks(settings, "graph-token", &mut emit).await
    } else {
        None
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
        (Some(test), None) => match graph_token {
            // The relay itself would send it through Graph now.
            Some(token) if smtp_auth_off => graph::send(settings, token, test, &mut emit).await,
            _ => emit(Step::skip("send-test", "not logged in (see above)")),
        },
        (Some(test), Some(mut connection)) => {
            let step = send_test_mail(settings, &mut connection, test).await;
            connection.quit().await;
            emit(step);
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use secrecy::SecretString;

    use base64::Engine as _;

    use super::tls::names_host;
    use super::*;
    use crate::config::{ClientCredential, OAuthSettings};
    use crate::smtp::{SmtpError, Stage};
    use crate::token::{EntraError, TokenError};

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
            username: "relay@contoso.com".parse().unwrap(),
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
