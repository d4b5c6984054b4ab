//! Faults while mail flows: the SMTP server goes away and comes back, the token endpoint
//! misbehaves, the SMTP server is slow.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use mail_relay::clock::ManualClock;
use mail_relay::delivery::MailSender;
use mail_relay::smtp::SmtpSender;
use mail_relay::token::{CacheOptions, RetryPolicy, TokenCache, TokenProvider};
use wiremock::ResponseTemplate;

use crate::entra::{FakeEntra, token_response};
use crate::harness::{
    CuttingForwarder, Forwarder, Outcome, assert_exactly_once, marker, outcome, relay_settings,
    send, small_mail, spawn_relay, spawn_relay_with, wait_for_deliveries,
};
use crate::helpers::{TEST_API_KEY, TestApp};
use crate::require_peer;

async fn send_many(app: &TestApp, marker: &str, range: std::ops::Range<usize>) -> Vec<Outcome> {
    futures_util::stream::iter(range)
        .map(|n| send(app, marker, n))
        .buffer_unordered(8)
        .collect()
        .await
}

fn assert_unavailable(o: &Outcome, code: &str, within: Duration) {
    assert_eq!(o.status, 503, "mail #{}: {o:?}", o.n);
    assert_eq!(o.code.as_deref(), Some(code), "mail #{}: {o:?}", o.n);
    let retry_after: u64 = o
        .retry_after
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("503 without a Retry-After in seconds: {o:?}"));
    assert!(retry_after >= 1, "{o:?}");
    assert!(
        o.elapsed <= within,
        "mail #{} answered after {:?}, more than {within:?}",
        o.n,
        o.elapsed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_server_down_mid_run_gives_prompt_503s_and_the_relay_recovers_without_restart() {
    let peer = require_peer!();
    let _turn = crate::exclusive().await;
    let target: SocketAddr = format!("{}:{}", peer.host, peer.submission_port)
        .parse()
        .unwrap();
    let forwarder = Forwarder::start(target).await;
    let entra = FakeEntra::serving_peer_tokens(&peer).await;
    let mut settings = relay_settings(&peer, &entra, forwarder.port);
    let deadline = Duration::from_secs(3);
    settings.relay.smtp.send_deadline = deadline;
    settings.relay.smtp.connect_timeout = Duration::from_secs(2);
    let app = spawn_relay(settings).await;
    let marker = marker("outage");

    let mut outcomes = send_many(&app, &marker, 0..24).await;
    assert!(
        outcomes.iter().all(|o| o.status == 202),
        "before the outage: {outcomes:?}"
    );

    forwarder.down().await;
    let during = send_many(&app, &marker, 24..40).await;
    for o in &during {
        // The send deadline plus a little for the HTTP round trip: no hang.
        assert_unavailable(o, "smtp_unavailable", deadline + Duration::from_secs(2));
    }
    outcomes.extend(during);

    forwarder.up().await;
    // The relay needs no restart: the first send after the server is back goes through.
    let back = Instant::now();
    let mut n = 40;
    loop {
        let o = send(&app, &marker, n).await;
        n += 1;
        let accepted = o.status == 202;
        outcomes.push(o);
        if accepted {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(15),
            "no recovery: {:?}",
            outcomes.last()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = send_many(&app, &marker, n..n + 24).await;
    assert!(
        after.iter().all(|o| o.status == 202),
        "after the outage: {after:?}"
    );
    outcomes.extend(after);

    let accepted = outcomes.iter().filter(|o| o.status == 202).count();
    let (ids, numbers) =
        wait_for_deliveries(&peer, &marker, accepted, Duration::from_secs(30)).await;
    assert_exactly_once(&outcomes, &ids, &numbers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_failures_do_not_stop_sends_while_a_token_is_valid_and_then_give_503() {
    let peer = require_peer!();
    let _turn = crate::exclusive().await;
    let entra = FakeEntra::start().await;
    let good = peer.mint_token(&peer.oauth_user, Duration::from_secs(3600));
    entra.mount_token_once(&good, 3599).await;
    // Then, one after the other: a 500, a 429 with Retry-After, and answers too slow to wait for.
    FakeEntra::token_request()
        .respond_with(ResponseTemplate::new(500).set_body_string("{}"))
        .up_to_n_times(1)
        .with_priority(2)
        .mount(&entra.server)
        .await;
    FakeEntra::token_request()
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("Retry-After", "1")
                .set_body_string("{}"),
        )
        .up_to_n_times(1)
        .with_priority(3)
        .mount(&entra.server)
        .await;
    FakeEntra::token_request()
        .respond_with(token_response(&good, 3599).set_delay(Duration::from_secs(3)))
        .with_priority(4)
        .mount(&entra.server)
        .await;

    let mut oauth = entra.oauth_settings();
    oauth.request_timeout = Duration::from_secs(1);
    let clock = ManualClock::at(SystemTime::now());
    let options = CacheOptions {
        clock: Arc::new(clock.clone()),
        retry: RetryPolicy {
            attempts: 3,
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(500),
            max_wait: Duration::from_secs(4),
        },
    };
    let cache: Arc<dyn TokenProvider> =
        Arc::new(TokenCache::with_options(&oauth, options).unwrap());
    let mut settings = relay_settings(&peer, &entra, peer.submission_port);
    if let mail_relay::config::SmtpAuthentication::MsOAuth { oauth: o, .. } =
        &mut settings.send_email.smtp_authentication
    {
        *o = oauth.clone();
    }
    let sender = SmtpSender::new(&settings, Some(cache.clone())).unwrap();
    let app = spawn_relay_with(settings, Arc::new(sender) as Arc<dyn MailSender>).await;
    let marker = marker("token-faults");

    let mut outcomes = vec![send(&app, &marker, 0).await];
    assert_eq!(outcomes[0].status, 202, "{:?}", outcomes[0]);

    // Past the refresh point (80 % of 3300 s), well before expiry: every refresh from now on
    // fails (500, 429, timeouts) while the cached token stays valid, and mail keeps flowing.
    clock.advance(Duration::from_secs(3000));
    let started = Instant::now();
    let mut n = 1;
    while entra.fetch_count().await < 5 {
        assert!(
            started.elapsed() < Duration::from_secs(30) && n < 120,
            "the refresh never reached the slow answers: {} requests",
            entra.fetch_count().await
        );
        let o = send(&app, &marker, n).await;
        assert_eq!(o.status, 202, "with a valid cached token: {o:?}");
        outcomes.push(o);
        n += 1;
        // The cache's back-off runs on its clock: let it pass (still far from expiry).
        clock.advance(Duration::from_secs(2));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let state = cache.state();
    assert!(state.has_token, "{state:?}");
    assert!(state.last_error.is_some(), "{state:?}");

    // The cached token expires: no valid token, a clear 503 within the retry budget.
    clock.advance(Duration::from_secs(700));
    let o = send(&app, &marker, n).await;
    assert_unavailable(&o, "token_unavailable", Duration::from_secs(10));
    outcomes.push(o);

    let accepted = outcomes.iter().filter(|o| o.status == 202).count();
    let (ids, numbers) =
        wait_for_deliveries(&peer, &marker, accepted, Duration::from_secs(30)).await;
    assert_exactly_once(&outcomes, &ids, &numbers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_smtp_server_times_out_as_configured_and_connections_return_to_the_limit() {
    let peer = require_peer!();
    let _turn = crate::exclusive().await;
    let entra = FakeEntra::serving_peer_tokens(&peer).await;
    let mut settings = relay_settings(&peer, &entra, peer.slow_port);
    let command_timeout = Duration::from_secs(2);
    let deadline = Duration::from_secs(4);
    assert!(peer.slow_delay > command_timeout + Duration::from_secs(1));
    settings.relay.smtp.command_timeout = command_timeout;
    settings.relay.smtp.send_deadline = deadline;
    let max = settings.relay.smtp.max_connections;
    let tokens: Arc<dyn TokenProvider> =
        Arc::new(TokenCache::new(&entra.oauth_settings()).unwrap());
    let sender = Arc::new(SmtpSender::new(&settings, Some(tokens.clone())).unwrap());
    let app = spawn_relay_with(settings, sender.clone() as Arc<dyn MailSender>).await;
    let marker = marker("slow-smtp");

    // Watch the number of open connections while twice as many mails as connections wait.
    let most_open = Arc::new(AtomicUsize::new(0));
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (sender, most_open, watching) = (sender.clone(), most_open.clone(), watching.clone());
        tokio::spawn(async move {
            while watching.load(Ordering::Relaxed) {
                most_open.fetch_max(sender.state().open_connections, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // Tasks alive before the sends: afterwards none of theirs may be left behind. The client
    // keeps no idle connection, so the relay's connection tasks end with their requests too.
    // The token cache's refresher is one of the relay's standing tasks: started first.
    tokens.token().await.unwrap();
    let runtime = tokio::runtime::Handle::current().metrics();
    let tasks_before = runtime.num_alive_tasks();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let outcomes: Vec<Outcome> = futures_util::stream::iter(0..2 * max)
        .map(|n| {
            let request = client
                .post(app.url("/mail"))
                .bearer_auth(TEST_API_KEY)
                .json(&small_mail(&marker, n));
            async move { outcome(n, Instant::now(), request.send().await).await }
        })
        .buffer_unordered(2 * max)
        .collect()
        .await;
    watching.store(false, Ordering::Relaxed);
    watcher.await.unwrap();

    for o in &outcomes {
        // Not the server's 5 s: the configured timeouts end each send. The slow server delays
        // its reply to the end of DATA, so it may have the mail: an unknown outcome, not a
        // "try again" (which could deliver it twice).
        assert_eq!(o.status, 502, "mail #{}: {o:?}", o.n);
        assert_eq!(
            o.code.as_deref(),
            Some("smtp_outcome_unknown"),
            "mail #{}: {o:?}",
            o.n
        );
        assert!(o.retry_after.is_none(), "{o:?}");
        assert!(
            o.elapsed <= deadline + Duration::from_secs(1),
            "mail #{} took {:?}",
            o.n,
            o.elapsed
        );
    }
    let first = outcomes.iter().map(|o| o.elapsed).min().unwrap();
    assert!(
        first >= command_timeout,
        "the first answer came after {first:?}, before the command timeout"
    );
    assert!(
        most_open.load(Ordering::Relaxed) <= max,
        "{} connections open at once, limit {max}",
        most_open.load(Ordering::Relaxed)
    );
    // Connections that timed out are closed, none stays checked out.
    let state = sender.state();
    assert!(state.open_connections <= max, "{state:?}");
    assert_eq!(state.open_connections, state.idle_connections, "{state:?}");
    // No send, connection or timer task outlives its request (a short grace for the ones that
    // are finishing their QUIT).
    let mut tasks_after = runtime.num_alive_tasks();
    for _ in 0..50 {
        if tasks_after <= tasks_before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        tasks_after = runtime.num_alive_tasks();
    }
    assert!(
        tasks_after <= tasks_before,
        "{tasks_after} tasks alive after the sends, {tasks_before} before"
    );
}

/// A mail whose text is `size` bytes: large enough that the cut falls inside DATA.
fn large_mail(marker: &str, n: usize, size: usize) -> serde_json::Value {
    let line = "A line of a large mail, long enough to matter.\n";
    serde_json::json!({
        "from": "load@contoso.test",
        "to": "alice@contoso.test",
        "subject": format!("{marker} #{n}"),
        "text": line.repeat(size / line.len()),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_in_the_middle_of_data_never_delivers_a_mail_twice_or_reports_it_sent() {
    let peer = require_peer!();
    let _turn = crate::exclusive().await;
    let entra = FakeEntra::serving_peer_tokens(&peer).await;
    let target: SocketAddr = format!("{}:{}", peer.host, peer.submission_port)
        .parse()
        .unwrap();
    // 64 KiB into a session: past STARTTLS and AUTH, inside a 300 KB message.
    let cuts = 3;
    let forwarder = CuttingForwarder::start(target, 64 * 1024, cuts).await;
    let app = spawn_relay(relay_settings(&peer, &entra, forwarder.port)).await;
    let marker = marker("cut-in-data");

    let mut outcomes = Vec::new();
    for n in 0..6 {
        let started = Instant::now();
        let response = app
            .mail_request()
            .header("idempotency-key", format!("{marker}-{n}"))
            .json(&large_mail(&marker, n, 300_000))
            .send()
            .await;
        outcomes.push(outcome(n, started, response).await);
    }
    assert_eq!(forwarder.cut.load(Ordering::SeqCst), cuts, "{outcomes:?}");
    for o in &outcomes {
        // Cut while the message was going out, the relay cannot know what the server has:
        // either it was cut before its last byte went (a retry on a new connection, 202) or
        // after (502 smtp_outcome_unknown, never retried). Never a 5xx that invites a resend.
        let known = o.status == 202
            || (o.status == 502 && o.code.as_deref() == Some("smtp_outcome_unknown"))
            || (o.status == 503 && o.code.as_deref() == Some("smtp_unavailable"));
        assert!(known, "mail #{}: {o:?}", o.n);
    }
    let accepted = outcomes.iter().filter(|o| o.status == 202).count();
    assert!(
        accepted >= 3,
        "the mails after the cuts go through: {outcomes:?}"
    );
    let (ids, numbers) =
        wait_for_deliveries(&peer, &marker, accepted, Duration::from_secs(30)).await;
    assert_exactly_once(&outcomes, &ids, &numbers);
    // A cut message never arrives half: every delivered one is whole.
    for n in &numbers {
        let o = &outcomes[*n];
        assert_eq!(o.status, 202, "mail #{n} was delivered but answered {o:?}");
    }

    // Retries with the same keys: a 202 is replayed, an unknown outcome too; nothing is resent.
    for o in &outcomes {
        let response = app
            .post_mail_with_key(
                &format!("{marker}-{}", o.n),
                &large_mail(&marker, o.n, 300_000),
            )
            .await;
        if o.status == 202 || o.status == 502 {
            assert_eq!(response.status().as_u16(), o.status, "mail #{}", o.n);
            assert_eq!(
                response
                    .headers()
                    .get("idempotent-replayed")
                    .map(|v| v.to_str().unwrap()),
                Some("true"),
                "mail #{}",
                o.n
            );
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ids_after, _) =
        wait_for_deliveries(&peer, &marker, accepted, Duration::from_secs(5)).await;
    assert_eq!(ids_after, ids, "the retries delivered nothing more");
}
