//! The SMTP test peer works end to end, without relay code: plain lettre against Postfix + Dovecot.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::peer::Peer;

const WAIT: Duration = Duration::from_secs(10);
const TOKEN_LIFETIME: Duration = Duration::from_secs(600);

fn tls(peer: &Peer, name: &str) -> TlsParameters {
    TlsParameters::builder(name.to_owned())
        .add_root_certificate(Certificate::from_pem(&peer.ca_pem()).unwrap())
        .build_rustls()
        .unwrap()
}

fn transport(
    peer: &Peer,
    port: u16,
    tls: Tls,
    auth: Option<(Credentials, Mechanism)>,
) -> AsyncSmtpTransport<Tokio1Executor> {
    transport_with_timeout(peer, port, tls, auth, Duration::from_secs(10))
}

fn transport_with_timeout(
    peer: &Peer,
    port: u16,
    tls: Tls,
    auth: Option<(Credentials, Mechanism)>,
    timeout: Duration,
) -> AsyncSmtpTransport<Tokio1Executor> {
    let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&peer.host)
        .port(port)
        .tls(tls)
        .timeout(Some(timeout));
    if let Some((credentials, mechanism)) = auth {
        builder = builder
            .credentials(credentials)
            .authentication(vec![mechanism]);
    }
    builder.build()
}

fn xoauth2(peer: &Peer, token: String) -> Option<(Credentials, Mechanism)> {
    Some((
        Credentials::new(peer.oauth_user.clone(), token),
        Mechanism::Xoauth2,
    ))
}

/// A mail with a unique marker in its Message-ID, subject and body.
fn mail(from: &str, to: &str) -> (Message, String) {
    let marker = format!("peer-smoke-{}", uuid::Uuid::new_v4());
    let message = Message::builder()
        .from(from.parse().unwrap())
        .to(to.parse().unwrap())
        .subject(format!("smoke {marker}"))
        .message_id(Some(format!("<{marker}@peer-smoke.test>")))
        .header(ContentType::TEXT_PLAIN)
        .body(format!("body of {marker}\r\n"))
        .unwrap();
    (message, marker)
}

async fn assert_delivered(peer: &Peer, marker: &str, to: &str) {
    let raw = peer
        .wait_for_message(marker, WAIT)
        .await
        .unwrap_or_else(|| panic!("mail {marker} not delivered to {}", peer.maildir.display()));
    let text = String::from_utf8_lossy(&raw);
    assert!(text.contains(&format!("Delivered-To: {to}")), "{text}");
    assert!(text.contains(&format!("Subject: smoke {marker}")), "{text}");
    assert!(text.contains(&format!("body of {marker}")), "{text}");
}

#[tokio::test]
async fn xoauth2_over_starttls_delivers() {
    let peer = crate::require_peer!();
    let token = peer.mint_token(&peer.oauth_user, TOKEN_LIFETIME);
    let smtp = transport(
        &peer,
        peer.submission_port,
        Tls::Required(tls(&peer, "localhost")),
        xoauth2(&peer, token),
    );
    let (message, marker) = mail(&peer.oauth_user, "alice@contoso.test");
    let response = smtp.send(message).await.unwrap();
    assert!(response.is_positive());
    assert_delivered(&peer, &marker, "alice@contoso.test").await;
}

#[tokio::test]
async fn xoauth2_over_implicit_tls_delivers_and_the_ip_address_verifies() {
    let peer = crate::require_peer!();
    let token = peer.mint_token(&peer.oauth_user, TOKEN_LIFETIME);
    // The certificate carries IP:127.0.0.1, so a relay configured with the address verifies too.
    let smtp = transport(
        &peer,
        peer.smtps_port,
        Tls::Wrapper(tls(&peer, &peer.host)),
        xoauth2(&peer, token),
    );
    let (message, marker) = mail("someone@contoso.test", "bob@contoso.test");
    smtp.send(message).await.unwrap();
    assert_delivered(&peer, &marker, "bob@contoso.test").await;
}

#[tokio::test]
async fn plain_login_for_the_basic_user_delivers() {
    let peer = crate::require_peer!();
    let credentials = Credentials::new(peer.basic_user.clone(), peer.basic_password.clone());
    let smtp = transport(
        &peer,
        peer.submission_port,
        Tls::Required(tls(&peer, "localhost")),
        Some((credentials, Mechanism::Plain)),
    );
    let (message, marker) = mail(&peer.basic_user, "carol@contoso.test");
    smtp.send(message).await.unwrap();
    assert_delivered(&peer, &marker, "carol@contoso.test").await;
}

#[tokio::test]
async fn the_plain_port_delivers_without_tls_or_auth() {
    let peer = crate::require_peer!();
    let smtp = transport(&peer, peer.plain_port, Tls::None, None);
    let (message, marker) = mail("noreply@contoso.test", "dave@contoso.test");
    smtp.send(message).await.unwrap();
    assert_delivered(&peer, &marker, "dave@contoso.test").await;
}

#[tokio::test]
async fn bad_tokens_are_rejected_and_a_good_login_still_works_after_them() {
    let peer = crate::require_peer!();
    let user = peer.oauth_user.clone();
    let bad_tokens = [
        (
            "wrong key",
            peer.mint_token_wrong_key(&user, TOKEN_LIFETIME),
        ),
        ("expired", peer.mint_token_expired(&user)),
        (
            "other audience",
            peer.mint_token_for_audience(&user, "another-app", TOKEN_LIFETIME),
        ),
        (
            "other user",
            peer.mint_token("someone-else@contoso.test", TOKEN_LIFETIME),
        ),
    ];
    for (what, token) in bad_tokens {
        let smtp = transport(
            &peer,
            peer.submission_port,
            Tls::Required(tls(&peer, "localhost")),
            xoauth2(&peer, token),
        );
        let (message, marker) = mail(&user, "erin@contoso.test");
        let error = smtp
            .send(message)
            .await
            .expect_err(&format!("a token with the {what} must be rejected"));
        // Dovecot answers like Gmail (334 + JSON, then 535), which lettre 0.11 reports as a
        // client error without a status code.
        assert!(
            error.to_string().contains("challenge"),
            "{what}: unexpected error {error}"
        );
        assert!(peer.find_messages(&marker).is_empty(), "{what}: delivered");
    }

    // No auth penalty: a good login right after the failures succeeds.
    let smtp = transport(
        &peer,
        peer.submission_port,
        Tls::Required(tls(&peer, "localhost")),
        xoauth2(&peer, peer.mint_token(&user, TOKEN_LIFETIME)),
    );
    let (message, marker) = mail(&user, "erin@contoso.test");
    smtp.send(message).await.unwrap();
    assert_delivered(&peer, &marker, "erin@contoso.test").await;
}

#[tokio::test]
async fn a_denied_sender_gets_exchanges_send_as_reply_after_data() {
    let peer = crate::require_peer!();
    let token = peer.mint_token(&peer.oauth_user, TOKEN_LIFETIME);
    let smtp = transport(
        &peer,
        peer.submission_port,
        Tls::Required(tls(&peer, "localhost")),
        xoauth2(&peer, token),
    );
    let (message, marker) = mail(&peer.sendas_denied, "frank@contoso.test");
    let error = smtp.send(message).await.unwrap_err();
    assert_eq!(
        error.status().map(|code| code.to_string()),
        Some("554".into())
    );
    // Postfix puts `<addr>: Sender address rejected:` between the enhanced code and Exchange's
    // text; the code comes first and Exchange's text is intact.
    let text = error.to_string();
    assert!(text.contains("(554): 5.2.252 "), "{text}");
    let exchange = format!(
        "SendAsDenied; {} not allowed to send as {}; STOREDRV.Submission.Exception:SendAsDeniedException",
        peer.oauth_user, peer.sendas_denied
    );
    assert!(text.contains(&exchange), "{text}");
    assert!(peer.find_messages(&marker).is_empty());
}

#[tokio::test]
async fn submission_refuses_mail_without_auth_like_exchange() {
    let peer = crate::require_peer!();
    let smtp = transport(
        &peer,
        peer.submission_port,
        Tls::Required(tls(&peer, "localhost")),
        None,
    );
    let (message, _) = mail(&peer.oauth_user, "gina@contoso.test");
    let error = smtp.send(message).await.unwrap_err();
    assert_eq!(
        error.status().map(|code| code.to_string()),
        Some("530".into())
    );
    assert!(error.to_string().contains("5.7.57"), "{error}");
}

/// Opens a connection from `source`, reads the banner and quits.
async fn connect_from(source: Ipv4Addr, port: u16) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source.into(), 0)).unwrap();
    let stream = socket
        .connect(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port))
        .await
        .unwrap();
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let banner = lines.next_line().await.unwrap().unwrap();
    assert!(banner.starts_with("220 "), "{banner}");
    write.write_all(b"QUIT\r\n").await.unwrap();
    let bye = lines.next_line().await.unwrap().unwrap();
    assert!(bye.starts_with("221 "), "{bye}");
}

#[tokio::test]
async fn connections_are_counted_per_source_address() {
    let peer = crate::require_peer!();
    // 127.0.0.200 is this test's own source address.
    let source = Ipv4Addr::new(127, 0, 0, 200);
    let before = peer.count_connections_from(source);
    connect_from(source, peer.plain_port).await;
    connect_from(source, peer.submission_port).await;
    // Postfix writes its log through postlogd: give the lines a moment to land.
    let deadline = tokio::time::Instant::now() + WAIT;
    while peer.count_connections_from(source) < before + 2 && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(peer.count_connections_from(source), before + 2);
}

#[tokio::test]
async fn the_slow_port_answers_the_end_of_data_late() {
    let peer = crate::require_peer!();
    let smtp = transport_with_timeout(
        &peer,
        peer.slow_port,
        Tls::Required(tls(&peer, "localhost")),
        xoauth2(&peer, peer.mint_token(&peer.oauth_user, TOKEN_LIFETIME)),
        peer.slow_delay * 3,
    );
    // lettre's own timeout covers only the connect: a caller bounds the whole send itself.
    let (message, _) = mail(&peer.oauth_user, "hank@contoso.test");
    let impatient = tokio::time::timeout(peer.slow_delay / 5, smtp.send(message)).await;
    assert!(impatient.is_err(), "the slow port answered at once");
    // Note for relay tests: Postfix still queues the abandoned mail once its delay is over (the
    // whole message had been sent), as a real server may: a retry after a timeout at the end of
    // DATA can deliver twice.

    // Patient enough, the same port delivers.
    let (message, marker) = mail(&peer.oauth_user, "hank@contoso.test");
    smtp.send(message).await.unwrap();
    assert_delivered(&peer, &marker, "hank@contoso.test").await;
}

#[tokio::test]
async fn special_senders_get_exchanges_throttling_and_quota_replies_after_data() {
    let peer = crate::require_peer!();
    let cases = [
        (
            &peer.sender_throttled,
            "432",
            "4.3.2 ",
            "sender thread limit exceeded",
        ),
        (
            &peer.sender_quota,
            "554",
            "5.2.0 ",
            "SubmissionQuotaExceededException",
        ),
    ];
    for (sender, code, enhanced, exchange) in cases {
        let smtp = transport(
            &peer,
            peer.submission_port,
            Tls::Required(tls(&peer, "localhost")),
            xoauth2(&peer, peer.mint_token(&peer.oauth_user, TOKEN_LIFETIME)),
        );
        let (message, marker) = mail(sender, "ivan@contoso.test");
        let error = smtp.send(message).await.unwrap_err();
        assert_eq!(error.status().map(|c| c.to_string()).as_deref(), Some(code));
        let text = error.to_string();
        assert!(text.contains(&format!("({code}): {enhanced}")), "{text}");
        assert!(text.contains(exchange), "{text}");
        assert!(peer.find_messages(&marker).is_empty());
    }
}
