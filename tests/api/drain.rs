//! Graceful drain of the real binary: SIGTERM while a send waits for the peer's slow port.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::entra::FakeEntra;
use crate::helpers::authenticated_client;
use crate::peer::Peer;
use crate::process::{RelayProcess, smtp_yaml};
use crate::require_peer;

fn mail(subject: &str) -> Value {
    json!({"from": "noreply@contoso.test", "to": "alice@contoso.test", "subject": subject, "text": "drain"})
}

/// Start a send in the background; it returns the status and body.
fn start_send(relay: &RelayProcess, subject: &str) -> tokio::task::JoinHandle<(u16, Value)> {
    let url = relay.url("/mail");
    let body = mail(subject);
    tokio::spawn(async move {
        // A client of its own: a new connection, as a new caller would open.
        match authenticated_client().post(url).json(&body).send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                (status, response.json().await.unwrap_or(Value::Null))
            }
            // The relay went away mid-request: no answer at all.
            Err(e) => (0, Value::String(e.to_string())),
        }
    })
}

/// Wait until the relay fetched its token: the send is past authentication, on its way to SMTP.
async fn wait_for_token_fetch(entra: &FakeEntra) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while entra.fetch_count().await == 0 {
        assert!(
            Instant::now() < deadline,
            "the relay never asked for a token"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `disconnect from ...[ip]` lines in the peer's log: (all, those after a QUIT).
fn disconnects_from(peer: &Peer, ip: Ipv4Addr) -> (usize, usize) {
    let log = std::fs::read_to_string(&peer.log).unwrap_or_default();
    let client = format!("[{ip}]");
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.split_once(": disconnect from ")
                .is_some_and(|(_, r)| r.contains(&client))
        })
        .collect();
    let quits = lines.iter().filter(|l| l.contains(" quit=1")).count();
    (lines.len(), quits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_slow_send_finish_refuses_readiness_and_exits_0() {
    let peer = require_peer!();
    let entra = FakeEntra::serving_peer_tokens(&peer).await;
    let source = Ipv4Addr::new(127, 0, 43, 1);
    let (disconnects_before, quits_before) = disconnects_from(&peer, source);
    let mut relay = RelayProcess::start(&smtp_yaml(
        &peer,
        peer.slow_port,
        source,
        &entra,
        "",
        "  shutdown:\n    drainDelaySeconds: 2\n    deadlineSeconds: 20\n",
    ));
    let client = reqwest::Client::new();
    let ready = client.get(relay.url("/health/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200);

    let marker = format!("drain-{}", uuid::Uuid::new_v4().simple());
    let in_flight = start_send(&relay, &marker);
    wait_for_token_fetch(&entra).await;
    let signalled = Instant::now();
    relay.sigterm();

    // Readiness turns 503 at once (the signal itself takes a moment to arrive).
    let mut readiness = Vec::new();
    loop {
        let response = client.get(relay.url("/health/ready")).send().await.unwrap();
        readiness.push(response.status().as_u16());
        if response.status() == 503 {
            let body: Value = response.json().await.unwrap();
            assert!(
                body["reason"].as_str().unwrap().contains("draining"),
                "{body}"
            );
            break;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(2),
            "still ready after SIGTERM: {readiness:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // New callers are still served during the drain delay, on new connections.
    let late_marker = format!("drain-late-{}", uuid::Uuid::new_v4().simple());
    let late = start_send(&relay, &late_marker);
    let live = reqwest::Client::new()
        .get(relay.url("/health/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200);

    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, 202, "{body}");
    let (status, late_body) = late.await.unwrap();
    assert_eq!(status, 202, "{late_body}");
    for accepted in [&body, &late_body] {
        let id = accepted["messageId"]
            .as_str()
            .unwrap()
            .trim_matches(['<', '>']);
        assert!(
            peer.wait_for_message(id, Duration::from_secs(10))
                .await
                .is_some(),
            "{id} not in {}",
            peer.maildir.display()
        );
    }

    let exit = relay.wait_exit(Duration::from_secs(25)).await;
    let exit =
        exit.unwrap_or_else(|| panic!("still running 25 s after SIGTERM:\n{}", relay.log_text()));
    assert!(exit.success(), "exit {exit}:\n{}", relay.log_text());
    assert!(
        signalled.elapsed() < Duration::from_secs(20),
        "exited after the deadline"
    );
    // After the drain delay, no new connections are taken.
    assert!(
        reqwest::Client::new()
            .get(relay.url("/health/live"))
            .send()
            .await
            .is_err()
    );

    // Every SMTP connection of this relay ended with QUIT (the log is written asynchronously).
    let deadline = Instant::now() + Duration::from_secs(5);
    let (disconnects, quits) = loop {
        let (d, q) = disconnects_from(&peer, source);
        let counts = (d - disconnects_before, q - quits_before);
        if counts.0 >= 1 && counts.0 == counts.1 || Instant::now() >= deadline {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(disconnects >= 1, "no SMTP connection from {source} ended");
    assert_eq!(quits, disconnects, "connections closed without QUIT");
    let logs = relay.log_text();
    assert!(logs.contains("shut down cleanly"), "{logs}");
    // The only errors allowed are the request log's lines for the 503 readiness answers.
    let errors: Vec<Value> = relay
        .json_lines()
        .into_iter()
        .filter(|l| l["level"] == "ERROR" && l["span"]["path"] != "/health/ready")
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_still_running_at_the_deadline_is_named_and_the_exit_is_non_zero() {
    let peer = require_peer!();
    let entra = FakeEntra::serving_peer_tokens(&peer).await;
    // The slow port answers the end of DATA 5 s late; the deadline is 2 s after SIGTERM.
    assert!(
        peer.slow_delay > Duration::from_secs(3),
        "{:?}",
        peer.slow_delay
    );
    let mut relay = RelayProcess::start(&smtp_yaml(
        &peer,
        peer.slow_port,
        Ipv4Addr::new(127, 0, 43, 2),
        &entra,
        "",
        "  shutdown:\n    drainDelaySeconds: 0\n    deadlineSeconds: 2\n",
    ));
    let send = start_send(&relay, "cut off by the deadline");
    wait_for_token_fetch(&entra).await;
    relay.sigterm();

    let exit = relay.wait_exit(Duration::from_secs(10)).await;
    let exit =
        exit.unwrap_or_else(|| panic!("still running 10 s after SIGTERM:\n{}", relay.log_text()));
    assert!(
        !exit.success(),
        "exit {exit} although a send was cut off:\n{}",
        relay.log_text()
    );
    let line = relay
        .json_lines()
        .into_iter()
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("shutdown deadline passed"))
        })
        .unwrap_or_else(|| panic!("no deadline line:\n{}", relay.log_text()));
    assert_eq!(line["level"], "ERROR");
    let running = line["still_running"].as_str().unwrap();
    assert!(running.contains("POST /mail (request id "), "{running}");
    assert!(
        line["message"]
            .as_str()
            .unwrap()
            .contains("deadlineSeconds"),
        "{line}"
    );
    // The caller never got a 202 it could trust: the connection died with the process.
    let outcome = send.await.unwrap();
    assert_ne!(outcome.0, 202, "{outcome:?}");
}
