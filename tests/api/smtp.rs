//! SMTP delivery against the real test peer (Postfix + Dovecot XOAUTH2, `tests/peer/start.sh`).
//!
//! Tests that count connections bind their client sockets to their own loopback address
//! (127.0.42.N, N unique per test) and count the peer's `connect from` lines for it,
//! before and after, so earlier runs do not matter.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lettre::Message;
use lettre::message::header::ContentType;
use mail_relay::config::{Delivery, Encryption, Settings, SmtpAuthentication};
use mail_relay::delivery::{DeliveryError, MailSender};
use mail_relay::message::OutgoingMail;
use mail_relay::smtp::{EnhancedCode, SmtpError, SmtpErrorKind, SmtpSender};
use mail_relay::token::{TokenError, TokenProvider};
use secrecy::SecretString;

use crate::fakes::FakeTokens;
use crate::helpers::{peer_oauth_settings, test_settings};
use crate::peer::Peer;

/// Peer-valid JWTs for the OAuth user, valid for an hour.
fn peer_tokens(peer: &Peer) -> Arc<FakeTokens> {
    peer_tokens_for(peer, Duration::from_secs(3600))
}

/// Peer-valid JWTs for the OAuth user, each valid for `lifetime`.
fn peer_tokens_for(peer: &Peer, lifetime: Duration) -> Arc<FakeTokens> {
    let peer = peer.clone();
    Arc::new(FakeTokens::new(lifetime, move |_| {
        Ok(peer.mint_token(&peer.oauth_user, lifetime))
    }))
}

/// As [`peer_tokens`], but the first fetch returns a token signed with a key the peer does not
/// trust.
fn peer_tokens_bad_first(peer: &Peer) -> Arc<FakeTokens> {
    let peer = peer.clone();
    let lifetime = Duration::from_secs(3600);
    Arc::new(FakeTokens::new(lifetime, move |n| {
        let user = &peer.oauth_user;
        Ok(if n == 1 {
            peer.mint_token_wrong_key(user, lifetime)
        } else {
            peer.mint_token(user, lifetime)
        })
    }))
}

/// Settings for SMTP delivery to the peer with the given mode and port.
fn peer_settings(
    peer: &Peer,
    encryption: Encryption,
    port: u16,
    auth: SmtpAuthentication,
) -> Settings {
    let mut settings = peer_oauth_settings(peer, unused_oauth());
    settings.send_email.smtp_port = port;
    settings.send_email.smtp_encryption = encryption;
    settings.send_email.smtp_authentication = auth;
    settings.relay.smtp.hello_name = Some("relay.test".into());
    settings
}

fn oauth(peer: &Peer) -> SmtpAuthentication {
    oauth_as(&peer.oauth_user)
}

/// MS_OAUTH settings: the OAuth part is the token cache's business (the tests give their
/// own provider); the SMTP side needs only the username.
fn oauth_as(username: &str) -> SmtpAuthentication {
    SmtpAuthentication::MsOAuth {
        username: username.parse().unwrap(),
        oauth: unused_oauth(),
    }
}

/// OAuth settings no test fetches a token with.
fn unused_oauth() -> mail_relay::config::OAuthSettings {
    mail_relay::config::OAuthSettings {
        tenant_id: "contoso".into(),
        client_id: "11111111-2222-4333-8444-555555555555".into(),
        credential: mail_relay::config::ClientCredential::Secret(SecretString::from(
            "unused".to_string(),
        )),
        token_endpoint: "http://127.0.0.1:9/token".parse().unwrap(),
        scopes: "https://outlook.office365.com/.default".into(),
        grace: Duration::from_secs(300),
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(10),
    }
}

fn oauth_sender(
    peer: &Peer,
    tokens: &Arc<FakeTokens>,
    adjust: impl FnOnce(&mut Settings),
) -> SmtpSender {
    let mut settings = peer_settings(peer, Encryption::Tls, peer.submission_port, oauth(peer));
    adjust(&mut settings);
    let provider: Arc<dyn TokenProvider> = tokens.clone();
    SmtpSender::new(&settings, Some(provider)).unwrap()
}

/// A unique marker for telling delivered messages apart.
fn marker(test: &str) -> String {
    format!("{test}-{}", uuid::Uuid::new_v4().simple())
}

/// Sends a test mail that must fail, and returns why.
async fn refused(sender: &SmtpSender, test: &str) -> SmtpError {
    sender
        .send_mail(&mail(FROM, TO, &marker(test)))
        .await
        .unwrap_err()
}

fn mail(from: &str, to: &str, marker: &str) -> OutgoingMail {
    let message_id = format!("<{marker}@relay.test>");
    let message = Message::builder()
        .from(from.parse().unwrap())
        .to(to.parse().unwrap())
        .subject(format!("Test {marker}"))
        .message_id(Some(message_id.clone()))
        .header(ContentType::TEXT_PLAIN)
        .body(format!(
            "Hello from the relay tests.\r\nMarker: {marker}\r\n"
        ))
        .unwrap();
    OutgoingMail {
        id: marker.to_string(),
        message_id,
        envelope: message.envelope().clone(),
        formatted: message.formatted(),
    }
}

/// Reads a delivered message back and checks its headers and body.
async fn assert_delivered(peer: &Peer, marker: &str, from: &str, to: &str) {
    let bytes = peer
        .wait_for_message(marker, Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("no message with {marker} in the peer's Maildir"));
    let parsed = mail_parser::MessageParser::default().parse(&bytes).unwrap();
    assert_eq!(parsed.subject(), Some(format!("Test {marker}").as_str()));
    assert_eq!(
        parsed.message_id(),
        Some(format!("{marker}@relay.test").as_str())
    );
    let sender = parsed
        .from()
        .and_then(|a| a.first())
        .and_then(|a| a.address());
    assert_eq!(sender, Some(from));
    let recipient = parsed
        .to()
        .and_then(|a| a.first())
        .and_then(|a| a.address());
    assert_eq!(recipient, Some(to));
    let body = parsed.body_text(0).unwrap();
    assert!(body.contains(&format!("Marker: {marker}")), "{body}");
}

/// Counts the peer's connections from `ip` until it reaches `expected` or 3 s pass
/// (Postfix writes its log asynchronously), and returns the count.
/// Connections from `ip` since `before`, once `expected` have been logged (or after 3 s), and
/// then again after a pause: Postfix logs asynchronously, and a connection logged late must
/// still fail an "exactly `expected`" assertion.
async fn connections_from(peer: &Peer, ip: Ipv4Addr, before: usize, expected: usize) -> usize {
    let start = Instant::now();
    while peer.count_connections_from(ip) - before < expected
        && start.elapsed() < Duration::from_secs(3)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    peer.count_connections_from(ip) - before
}

const FROM: &str = "sender@contoso.test";
const TO: &str = "rcpt@contoso.test";

#[tokio::test]
async fn xoauth2_over_starttls_delivers() {
    let peer = crate::require_peer!();
    let tokens = peer_tokens(&peer);
    let sender = oauth_sender(&peer, &tokens, |_| {});
    let marker = marker("starttls");

    let receipt = sender.send(&mail(FROM, TO, &marker)).await.unwrap();

    assert!(
        receipt.server_reply.starts_with("250"),
        "{}",
        receipt.server_reply
    );
    assert_eq!(receipt.accepted, vec![TO.to_string()]);
    assert_delivered(&peer, &marker, FROM, TO).await;
    assert_eq!(tokens.fetches(), 1);
}

#[tokio::test]
async fn implicit_tls_delivers() {
    let peer = crate::require_peer!();
    let tokens = peer_tokens(&peer);
    let sender = oauth_sender(&peer, &tokens, |s| {
        s.send_email.smtp_encryption = Encryption::Ssl;
        s.send_email.smtp_port = peer.smtps_port;
    });
    let marker = marker("implicit-tls");

    sender.send(&mail(FROM, TO, &marker)).await.unwrap();

    assert_delivered(&peer, &marker, FROM, TO).await;
}

#[tokio::test]
async fn basic_auth_delivers() {
    let peer = crate::require_peer!();
    let settings = peer_settings(
        &peer,
        Encryption::Tls,
        peer.submission_port,
        SmtpAuthentication::Basic {
            username: peer.basic_user.clone(),
            password: SecretString::from(peer.basic_password.clone()),
        },
    );
    let sender = SmtpSender::new(&settings, None).unwrap();
    let marker = marker("basic");

    sender.send(&mail(FROM, TO, &marker)).await.unwrap();

    assert_delivered(&peer, &marker, FROM, TO).await;
}

#[tokio::test]
async fn wrong_basic_password_is_auth_failed_and_not_retried() {
    let peer = crate::require_peer!();
    let source = Ipv4Addr::new(127, 0, 42, 6);
    let before = peer.count_connections_from(source);
    let mut settings = peer_settings(
        &peer,
        Encryption::Tls,
        peer.submission_port,
        SmtpAuthentication::Basic {
            username: peer.basic_user.clone(),
            password: SecretString::from("wrong password".to_string()),
        },
    );
    settings.relay.smtp.source_address = Some(IpAddr::V4(source));
    let sender = SmtpSender::new(&settings, None).unwrap();

    let error = refused(&sender, "basic-bad").await;
    // A second mail at once: the refusal stands, no login is tried again (no account lock-out).
    let again = refused(&sender, "basic-bad-again").await;

    assert_eq!(error.kind(), SmtpErrorKind::AuthFailed, "{error}");
    assert_eq!(error.code(), Some(535));
    assert!(!error.to_string().contains("wrong password"), "{error}");
    assert_eq!(again.kind(), SmtpErrorKind::AuthFailed, "{again}");
    assert_eq!(
        connections_from(&peer, source, before, 1).await,
        1,
        "one login for both mails"
    );
}

#[tokio::test]
async fn no_encryption_no_auth_on_the_plain_port_delivers() {
    let peer = crate::require_peer!();
    let mut settings = peer_settings(
        &peer,
        Encryption::None,
        peer.plain_port,
        SmtpAuthentication::None,
    );
    settings.relay.smtp.ca_file = None;
    let sender = SmtpSender::new(&settings, None).unwrap();
    let marker = marker("plain");

    sender.send(&mail(FROM, TO, &marker)).await.unwrap();

    assert_delivered(&peer, &marker, FROM, TO).await;
}

#[tokio::test]
async fn a_refused_token_is_invalidated_and_replaced_once() {
    let peer = crate::require_peer!();
    let tokens = peer_tokens_bad_first(&peer);
    let sender = oauth_sender(&peer, &tokens, |_| {});
    let marker = marker("bad-token");

    sender.send(&mail(FROM, TO, &marker)).await.unwrap();

    assert_eq!(tokens.fetches(), 2, "one refused token, one good one");
    assert_eq!(tokens.invalidated(), 1);
    assert_delivered(&peer, &marker, FROM, TO).await;
}

#[tokio::test]
async fn a_token_refused_twice_is_reported_with_the_setup_steps() {
    let peer = crate::require_peer!();
    // A token for another mailbox than the login: the peer refuses it every time. A new one at
    // every call, none kept.
    let lifetime = Duration::from_secs(600);
    let minter = peer.clone();
    let counter = Arc::new(
        FakeTokens::new(lifetime, move |_| {
            Ok(minter.mint_token("someone-else@contoso.test", lifetime))
        })
        .uncached(),
    );
    let settings = peer_settings(&peer, Encryption::Tls, peer.submission_port, oauth(&peer));
    let provider: Arc<dyn TokenProvider> = counter.clone();
    let sender = SmtpSender::new(&settings, Some(provider)).unwrap();

    let error = refused(&sender, "refused").await;

    assert_eq!(error.kind(), SmtpErrorKind::AuthFailed, "{error}");
    assert_eq!(error.code(), Some(535));
    assert_eq!(counter.fetches(), 2, "retried exactly once");
    assert!(error.to_string().contains("SMTP.SendAsApp"), "{error}");
}

#[tokio::test]
async fn send_as_denied_after_data_is_classified_and_not_retried() {
    let peer = crate::require_peer!();
    let source = Ipv4Addr::new(127, 0, 42, 1);
    let before = peer.count_connections_from(source);
    let tokens = peer_tokens(&peer);
    let sender = oauth_sender(&peer, &tokens, |s| {
        s.relay.smtp.source_address = Some(IpAddr::V4(source));
    });
    let denied = marker("send-as-denied");

    let error = sender
        .send_mail(&mail(&peer.sendas_denied, TO, &denied))
        .await
        .unwrap_err();

    assert_eq!(error.kind(), SmtpErrorKind::SendAsDenied, "{error}");
    assert!(!error.is_transient());
    assert_eq!(error.code(), Some(554));
    assert_eq!(error.enhanced_code(), Some(EnhancedCode::new(5, 2, 252)));
    assert!(
        error.server_text().unwrap().contains("SendAsDenied"),
        "{error}"
    );
    assert!(
        error.to_string().contains("Add-RecipientPermission"),
        "{error}"
    );

    // The session survives the refusal: the next mail goes over the same connection.
    let allowed = marker("after-denied");
    sender.send(&mail(FROM, TO, &allowed)).await.unwrap();
    assert_delivered(&peer, &allowed, FROM, TO).await;
    assert!(
        peer.find_messages(&denied).is_empty(),
        "the denied mail was delivered"
    );
    assert_eq!(
        connections_from(&peer, source, before, 1).await,
        1,
        "not retried, not reconnected"
    );
    assert_eq!(tokens.fetches(), 1);
}

#[tokio::test]
async fn fifty_concurrent_mails_use_at_most_three_connections() {
    let peer = crate::require_peer!();
    let source = Ipv4Addr::new(127, 0, 42, 2);
    let before = peer.count_connections_from(source);
    let tokens = peer_tokens(&peer);
    let sender = oauth_sender(&peer, &tokens, |s| {
        s.relay.smtp.source_address = Some(IpAddr::V4(source));
        s.relay.smtp.max_connections = 3;
    });
    let run = marker("fifty");
    let mails: Vec<OutgoingMail> = (0..50)
        .map(|i| mail(FROM, TO, &format!("{run}-{i:02}x")))
        .collect();

    let results = futures_util::future::join_all(mails.iter().map(|m| sender.send(m))).await;

    for result in &results {
        assert!(result.is_ok(), "{result:?}");
    }
    let connections = connections_from(&peer, source, before, 3).await;
    assert!((1..=3).contains(&connections), "{connections} connections");
    assert!(sender.state().open_connections <= 3);
    assert!(
        tokens.fetches() <= 3,
        "{} token fetches for 50 mails",
        tokens.fetches()
    );
    assert_eq!(sender.state().sent, 50);
    for m in [&mails[0], &mails[49]] {
        assert_delivered(&peer, &m.id, FROM, TO).await;
    }
}

#[tokio::test]
async fn a_token_change_retires_old_connections() {
    let peer = crate::require_peer!();
    let source = Ipv4Addr::new(127, 0, 42, 3);
    let before = peer.count_connections_from(source);
    let tokens = peer_tokens(&peer);
    let sender = oauth_sender(&peer, &tokens, |s| {
        s.relay.smtp.source_address = Some(IpAddr::V4(source));
    });

    sender
        .send(&mail(FROM, TO, &marker("token-a1")))
        .await
        .unwrap();
    sender
        .send(&mail(FROM, TO, &marker("token-a2")))
        .await
        .unwrap();
    assert_eq!(
        connections_from(&peer, source, before, 1).await,
        1,
        "reused"
    );

    tokens.rotate();
    let last = marker("token-b");
    sender.send(&mail(FROM, TO, &last)).await.unwrap();

    assert_eq!(
        connections_from(&peer, source, before, 2).await,
        2,
        "new token, new connection"
    );
    assert_eq!(
        sender.state().open_connections,
        1,
        "the old connection was quit"
    );
    assert_eq!(tokens.fetches(), 2);
    assert_delivered(&peer, &last, FROM, TO).await;
}

#[tokio::test]
async fn a_connection_whose_token_expires_soon_is_not_reused() {
    let peer = crate::require_peer!();
    let source = Ipv4Addr::new(127, 0, 42, 4);
    let before = peer.count_connections_from(source);
    // Still valid, but within the sender's one-minute margin.
    let tokens = peer_tokens_for(&peer, Duration::from_secs(30));
    let sender = oauth_sender(&peer, &tokens, |s| {
        s.relay.smtp.source_address = Some(IpAddr::V4(source));
    });

    sender
        .send(&mail(FROM, TO, &marker("expiring-1")))
        .await
        .unwrap();
    sender
        .send(&mail(FROM, TO, &marker("expiring-2")))
        .await
        .unwrap();

    assert_eq!(connections_from(&peer, source, before, 2).await, 2);
    assert_eq!(sender.state().open_connections, 1);
}

#[tokio::test]
async fn server_down_is_transient_within_the_deadline() {
    let port = crate::peer::closed_port();
    let mut settings = test_settings(std::env::temp_dir());
    settings.relay.delivery = Delivery::Smtp;
    settings.send_email.smtp_port = port;
    settings.relay.smtp.send_deadline = Duration::from_secs(2);
    let sender = SmtpSender::new(&settings, None).unwrap();

    let start = Instant::now();
    let error = refused(&sender, "down").await;

    assert!(error.is_transient(), "{error}");
    assert_eq!(error.kind(), SmtpErrorKind::Transient);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert!(error.to_string().contains(&port.to_string()), "{error}");
    assert_eq!(sender.state().failed, 1);
}

#[tokio::test]
async fn an_untrusted_certificate_is_refused() {
    let peer = crate::require_peer!();
    let tokens = peer_tokens(&peer);
    let sender = oauth_sender(&peer, &tokens, |s| s.relay.smtp.ca_file = None);

    let error = refused(&sender, "untrusted").await;

    assert_eq!(error.kind(), SmtpErrorKind::Tls, "{error}");
    assert!(!error.is_transient());
    assert!(
        error.to_string().contains("mailRelay.smtp.caFile"),
        "{error}"
    );
}

#[tokio::test]
async fn close_quits_idle_connections() {
    let peer = crate::require_peer!();
    let tokens = peer_tokens(&peer);
    let sender = oauth_sender(&peer, &tokens, |_| {});
    sender
        .send(&mail(FROM, TO, &marker("close")))
        .await
        .unwrap();
    assert_eq!(sender.state().open_connections, 1);

    MailSender::close(&sender).await;

    assert_eq!(sender.state().open_connections, 0);
}

#[tokio::test]
async fn settings_that_cannot_work_are_refused_with_the_key() {
    let mut settings = test_settings(std::env::temp_dir());
    settings.send_email.smtp_server = "smtp.example.com".into();
    settings.send_email.smtp_authentication = SmtpAuthentication::Basic {
        username: "u@example.com".into(),
        password: SecretString::from("secret-password".to_string()),
    };
    let error = SmtpSender::new(&settings, None).err().unwrap();
    assert_eq!(error.kind(), SmtpErrorKind::Setup);
    assert!(error.to_string().contains("smtpEncryption"), "{error}");
    assert!(!error.to_string().contains("secret-password"));

    let mut settings = test_settings(std::env::temp_dir());
    settings.send_email.smtp_encryption = Encryption::Tls;
    settings.send_email.smtp_authentication = SmtpAuthentication::MsOAuth {
        username: "relay@contoso.test".parse().unwrap(),
        oauth: match oauth_as("relay@contoso.test") {
            SmtpAuthentication::MsOAuth { oauth, .. } => oauth,
            _ => unreachable!(),
        },
    };
    let error = SmtpSender::new(&settings, None).err().unwrap();
    assert!(error.to_string().contains("smtpAuthentication"), "{error}");

    let mut settings = test_settings(std::env::temp_dir());
    settings.relay.smtp.max_connections = 0;
    let error = SmtpSender::new(&settings, None).err().unwrap();
    assert!(error.to_string().contains("maxConnections"), "{error}");
}

#[tokio::test]
async fn token_errors_reach_the_caller_as_token_errors() {
    let no_token = FakeTokens::failing(|| TokenError::Network {
        endpoint: "https://login.example.test/token".into(),
        detail: "connection refused".into(),
    });
    let mut settings = test_settings(std::env::temp_dir());
    settings.send_email.smtp_encryption = Encryption::Tls;
    settings.send_email.smtp_authentication = oauth_as("relay@contoso.test");
    let sender = SmtpSender::new(&settings, Some(Arc::new(no_token))).unwrap();

    let error = sender
        .send(&mail(FROM, TO, &marker("no-token")))
        .await
        .unwrap_err();

    assert!(matches!(error, DeliveryError::Token(_)), "{error:?}");
}

/// Replies the peer cannot give (Exchange's own), from a scripted fake server on loopback.
pub(crate) mod exchange_replies {
    use std::collections::VecDeque;

    use base64::Engine as _;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    use super::*;

    /// What the fake server answers; each AUTH entry is a list of replies, the ones after
    /// the first sent after reading one more client line (a challenge's answer).
    #[derive(Default)]
    pub(crate) struct Script {
        pub(crate) auth: Mutex<VecDeque<Vec<&'static str>>>,
        mail_from: Mutex<VecDeque<&'static str>>,
        rcpt_to: Mutex<VecDeque<&'static str>>,
        /// Replies to the end of the message, before the default 250.
        end_of_data: Mutex<VecDeque<&'static str>>,
        /// MAIL FROM commands that arrived with their RCPT TO already behind them (pipelined).
        pipelined: AtomicUsize,
        pub(crate) connections: AtomicUsize,
        mail_commands: AtomicUsize,
        pub(crate) delivered: AtomicUsize,
        /// Every line the client sent, as received.
        lines: Mutex<Vec<String>>,
    }

    impl Script {
        fn next_auth(&self) -> Vec<&'static str> {
            self.auth
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or_else(|| vec!["235 2.7.0 Authentication successful"])
        }
    }

    pub(crate) async fn serve(script: Arc<Script>) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                script.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(session(stream, Arc::clone(&script)));
            }
        });
        port
    }

    async fn session(stream: tokio::net::TcpStream, script: Arc<Script>) {
        let (read, mut write) = stream.into_split();
        let mut read = BufReader::new(read);
        let send = async |write: &mut tokio::net::tcp::OwnedWriteHalf, reply: &str| {
            write
                .write_all(format!("{reply}\r\n").as_bytes())
                .await
                .unwrap();
        };
        send(
            &mut write,
            "220 fake.outlook.test Microsoft ESMTP MAIL Service ready",
        )
        .await;
        let mut line = String::new();
        loop {
            line.clear();
            if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            script.lines.lock().unwrap().push(line.clone());
            let command = line.trim_end().to_ascii_uppercase();
            if command.starts_with("EHLO") {
                send(
                    &mut write,
                    "250-fake.outlook.test Hello\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 AUTH LOGIN XOAUTH2",
                )
                .await;
            } else if command.starts_with("AUTH XOAUTH2") {
                let replies = script.next_auth();
                for (i, reply) in replies.iter().enumerate() {
                    if i > 0 {
                        let mut answer = String::new();
                        read.read_line(&mut answer).await.unwrap();
                        script.lines.lock().unwrap().push(answer);
                    }
                    send(&mut write, reply).await;
                }
            } else if command.starts_with("MAIL FROM") {
                script.mail_commands.fetch_add(1, Ordering::SeqCst);
                if read.buffer().starts_with(b"RCPT TO") {
                    script.pipelined.fetch_add(1, Ordering::SeqCst);
                }
                let reply = script.mail_from.lock().unwrap().pop_front();
                send(&mut write, reply.unwrap_or("250 2.1.0 Sender OK")).await;
            } else if command.starts_with("RCPT TO") {
                let reply = script.rcpt_to.lock().unwrap().pop_front();
                send(&mut write, reply.unwrap_or("250 2.1.5 Recipient OK")).await;
            } else if command == "DATA" {
                send(&mut write, "354 Start mail input; end with <CRLF>.<CRLF>").await;
                loop {
                    line.clear();
                    if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if line == ".\r\n" {
                        break;
                    }
                }
                let reply = script.end_of_data.lock().unwrap().pop_front();
                let reply =
                    reply.unwrap_or("250 2.0.0 OK <queued@fake.outlook.test> [Hostname=FAKE]");
                if reply.starts_with('2') {
                    script.delivered.fetch_add(1, Ordering::SeqCst);
                }
                send(&mut write, reply).await;
            } else if command == "QUIT" {
                send(&mut write, "221 2.0.0 Service closing transmission channel").await;
                return;
            } else {
                // RSET, NOOP
                send(&mut write, "250 2.0.0 OK").await;
            }
        }
    }

    async fn fake_exchange(script: &Arc<Script>) -> (SmtpSender, Arc<FakeTokens>) {
        let port = serve(Arc::clone(script)).await;
        let mut settings = test_settings(std::env::temp_dir());
        settings.relay.delivery = Delivery::Smtp;
        settings.send_email.smtp_port = port;
        // Plain text is allowed on loopback: the fake has no TLS.
        settings.send_email.smtp_authentication = oauth_as("relay@contoso.test");
        settings.relay.smtp.send_deadline = Duration::from_secs(10);
        // Hands out `token-1`, `token-2`, ...
        let tokens = Arc::new(FakeTokens::numbered());
        let provider: Arc<dyn TokenProvider> = tokens.clone();
        (SmtpSender::new(&settings, Some(provider)).unwrap(), tokens)
    }

    #[tokio::test]
    async fn the_xoauth2_initial_response_has_the_documented_form() {
        let script = Arc::new(Script::default());
        let (sender, _) = fake_exchange(&script).await;

        sender
            .send(&mail(FROM, TO, &marker("xoauth2")))
            .await
            .unwrap();

        let lines = script.lines.lock().unwrap().clone();
        let auth = lines
            .iter()
            .find(|l| l.starts_with("AUTH XOAUTH2 "))
            .unwrap();
        let encoded = auth.trim_end().strip_prefix("AUTH XOAUTH2 ").unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        assert_eq!(
            decoded,
            b"user=relay@contoso.test\x01auth=Bearer token-1\x01\x01".to_vec()
        );
        assert_eq!(script.delivered.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn exchange_535_at_once_gets_a_new_token_and_one_retry() {
        let script = Arc::new(Script::default());
        script.auth.lock().unwrap().push_back(vec![
            "535 5.7.3 Authentication unsuccessful [FAKE.prod.outlook.com]",
        ]);
        let (sender, tokens) = fake_exchange(&script).await;

        sender.send(&mail(FROM, TO, &marker("535"))).await.unwrap();

        assert_eq!(tokens.fetches(), 2);
        assert_eq!(tokens.invalidated(), 1);
        assert_eq!(script.delivered.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_334_challenge_is_answered_with_an_empty_line_and_ends_as_token_refused() {
        let script = Arc::new(Script::default());
        for _ in 0..2 {
            script.auth.lock().unwrap().push_back(vec![
                // base64 of {"status":"401","schemes":"bearer","scope":"mail"}
                "334 eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJtYWlsIn0=",
                "535 5.7.8 Error: authentication failed",
            ]);
        }
        let (sender, tokens) = fake_exchange(&script).await;

        let error = refused(&sender, "334").await;

        assert_eq!(error.kind(), SmtpErrorKind::AuthFailed, "{error}");
        assert_eq!(tokens.fetches(), 2, "one retry with a new token");
        // The fresh token, refused too, stays cached: no token fetch per failing mail.
        assert_eq!(tokens.invalidated(), 1);
        let lines = script.lines.lock().unwrap().clone();
        assert_eq!(lines.iter().filter(|l| l.as_str() == "\r\n").count(), 2);
        assert_eq!(script.delivered.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_refused_fresh_token_stands_for_the_next_mails_until_the_token_changes() {
        let script = Arc::new(Script::default());
        for _ in 0..4 {
            script
                .auth
                .lock()
                .unwrap()
                .push_back(vec!["535 5.7.3 Authentication unsuccessful"]);
        }
        let (sender, tokens) = fake_exchange(&script).await;
        let first = refused(&sender, "refused-1").await;
        assert_eq!(first.kind(), SmtpErrorKind::AuthFailed, "{first}");
        assert_eq!(script.connections.load(Ordering::SeqCst), 2);

        // The same token again: the refusal stands, with no login and no token fetch.
        for n in 2..5 {
            let again = refused(&sender, &format!("refused-{n}")).await;
            assert_eq!(again.kind(), SmtpErrorKind::AuthFailed, "{again}");
            assert_eq!(again.code(), Some(535));
            assert!(again.to_string().contains("SMTP.SendAsApp"), "{again}");
        }
        assert_eq!(script.connections.load(Ordering::SeqCst), 2);
        assert_eq!(tokens.fetches(), 2);

        // A new token (the cache refreshed it) gets the usual login, and retry, at once.
        let current = tokens.token().await.unwrap();
        tokens.invalidate(&current);
        let retried = refused(&sender, "new-token").await;
        assert_eq!(retried.kind(), SmtpErrorKind::AuthFailed, "{retried}");
        assert_eq!(script.connections.load(Ordering::SeqCst), 4);
        assert_eq!(tokens.fetches(), 4);
    }

    #[tokio::test]
    async fn the_envelope_is_pipelined_and_a_refused_recipient_leaves_the_session_in_step() {
        let script = Arc::new(Script::default());
        script.rcpt_to.lock().unwrap().extend([
            "250 2.1.5 Recipient OK",
            "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found",
        ]);
        let (sender, _) = fake_exchange(&script).await;
        let two = |marker: &str| {
            let mut mail = mail(FROM, TO, marker);
            mail.envelope = lettre::address::Envelope::new(
                Some(FROM.parse().unwrap()),
                vec![TO.parse().unwrap(), "gone@contoso.test".parse().unwrap()],
            )
            .unwrap();
            mail
        };

        let error = sender.send_mail(&two("pipelined-1")).await.unwrap_err();

        assert!(
            error.to_string().contains("RCPT TO:<gone@contoso.test>"),
            "{error}"
        );
        assert_eq!(script.pipelined.load(Ordering::SeqCst), 1);
        // Every reply was read: after RSET the same session takes the next mail.
        sender.send_mail(&two("pipelined-2")).await.unwrap();
        assert_eq!(script.connections.load(Ordering::SeqCst), 1);
        assert_eq!(script.delivered.load(Ordering::SeqCst), 1);
        assert_eq!(script.pipelined.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn only_a_2xx_to_the_end_of_the_message_is_success() {
        let script = Arc::new(Script::default());
        script
            .end_of_data
            .lock()
            .unwrap()
            .push_back("354 Start mail input");
        let (sender, _) = fake_exchange(&script).await;

        let error = refused(&sender, "354-after-data").await;

        assert!(error.outcome_unknown(), "{error}");
        assert!(error.to_string().contains("354"), "{error}");
        // Not sent again: the server may have it.
        assert_eq!(script.mail_commands.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn smtp_auth_disabled_is_not_retried() {
        let script = Arc::new(Script::default());
        script.auth.lock().unwrap().push_back(vec![
            "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.",
        ]);
        let (sender, tokens) = fake_exchange(&script).await;

        let error = refused(&sender, "139").await;

        assert_eq!(error.kind(), SmtpErrorKind::SmtpAuthDisabled, "{error}");
        assert_eq!(error.enhanced_code(), Some(EnhancedCode::new(5, 7, 139)));
        assert_eq!(tokens.fetches(), 1);
        assert_eq!(script.connections.load(Ordering::SeqCst), 1);
        assert!(error.to_string().contains("Authenticated SMTP"), "{error}");

        // Switched off stays switched off for a while: the next mail is told so without a login.
        let again = refused(&sender, "139-again").await;
        assert_eq!(again.kind(), SmtpErrorKind::SmtpAuthDisabled, "{again}");
        assert_eq!(script.connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn thread_limit_backs_off_and_retries() {
        let script = Arc::new(Script::default());
        script
            .mail_from
            .lock()
            .unwrap()
            .push_back("432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded");
        let (sender, _) = fake_exchange(&script).await;

        sender.send(&mail(FROM, TO, &marker("432"))).await.unwrap();

        assert_eq!(script.mail_commands.load(Ordering::SeqCst), 2);
        assert_eq!(script.delivered.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_permanent_refusal_is_not_retried_and_names_the_recipient() {
        let script = Arc::new(Script::default());
        script.rcpt_to.lock().unwrap().push_back(
            "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
        );
        let (sender, _) = fake_exchange(&script).await;

        let error = refused(&sender, "550").await;

        assert_eq!(error.kind(), SmtpErrorKind::Permanent, "{error}");
        assert_eq!(error.code(), Some(550));
        assert!(error.to_string().contains(TO), "{error}");
        assert_eq!(script.mail_commands.load(Ordering::SeqCst), 1);
        // The session is kept (after RSET) for the next mail.
        sender
            .send(&mail(FROM, TO, &marker("after-550")))
            .await
            .unwrap();
        assert_eq!(script.connections.load(Ordering::SeqCst), 1);
    }
}

#[tokio::test]
async fn a_server_without_starttls_is_refused_for_tls() {
    let peer = crate::require_peer!();
    let tokens = peer_tokens(&peer);
    let sender = oauth_sender(&peer, &tokens, |s| s.send_email.smtp_port = peer.plain_port);

    let error = refused(&sender, "no-starttls").await;

    assert_eq!(error.kind(), SmtpErrorKind::Permanent, "{error}");
    assert!(error.to_string().contains("STARTTLS"), "{error}");
    assert_eq!(tokens.fetches(), 1, "not retried");
}

#[tokio::test]
async fn a_lost_reply_to_the_end_of_data_is_not_retried() {
    let peer = crate::require_peer!();
    let source = Ipv4Addr::new(127, 0, 42, 5);
    let before = peer.count_connections_from(source);
    let tokens = peer_tokens(&peer);
    // The slow listener answers the end of DATA only after `slow_delay`.
    let sender = oauth_sender(&peer, &tokens, |s| {
        s.send_email.smtp_port = peer.slow_port;
        s.relay.smtp.source_address = Some(IpAddr::V4(source));
        s.relay.smtp.command_timeout = peer.slow_delay / 3;
        s.relay.smtp.send_deadline = peer.slow_delay * 3;
    });
    let marker = marker("slow");

    let error = sender
        .send_mail(&mail(FROM, TO, &marker))
        .await
        .unwrap_err();

    assert_eq!(error.kind(), SmtpErrorKind::Transient, "{error}");
    assert!(error.to_string().contains("end of DATA"), "{error}");
    assert!(error.to_string().contains("may or may not"), "{error}");
    // Sending it again could deliver it twice: one connection, one attempt.
    assert_eq!(connections_from(&peer, source, before, 1).await, 1);
    tokio::time::sleep(peer.slow_delay + Duration::from_secs(1)).await;
    assert!(peer.find_messages(&marker).len() <= 1);
}
