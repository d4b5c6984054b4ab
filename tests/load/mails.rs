//! Many mails at once: nothing lost, nothing twice.

use std::time::{Duration, Instant};

use futures_util::StreamExt;

use crate::entra::FakeEntra;
use crate::harness::{
    assert_exactly_once, marker, relay_settings, send, spawn_relay, wait_for_deliveries,
};
use crate::require_peer;

/// Mails in the load test: `MAIL_RELAY_LOAD_MAILS`, default 5,000.
fn mail_count() -> usize {
    std::env::var("MAIL_RELAY_LOAD_MAILS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000)
}

const CLIENTS: usize = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_mail_of_a_64_client_load_arrives_exactly_once() {
    let peer = require_peer!();
    let _turn = crate::exclusive().await;
    let entra = FakeEntra::serving_peer_tokens(&peer).await;
    let app = spawn_relay(relay_settings(&peer, &entra, peer.submission_port)).await;
    let marker = marker("load");
    let count = mail_count();

    let started = Instant::now();
    let outcomes: Vec<_> = futures_util::stream::iter(0..count)
        .map(|n| {
            let (app, marker) = (&app, &marker);
            async move { send(app, marker, n).await }
        })
        .buffer_unordered(CLIENTS)
        .collect()
        .await;
    let elapsed = started.elapsed();
    let accepted = outcomes.iter().filter(|o| o.status == 202).count();
    eprintln!(
        "load: {count} mails from {CLIENTS} clients in {elapsed:.1?} ({:.0} mails/s), {accepted} accepted",
        count as f64 / elapsed.as_secs_f64()
    );
    let refused: Vec<_> = outcomes.iter().filter(|o| o.status != 202).collect();
    // Against a healthy peer with rate limits off, every mail is accepted.
    assert!(
        refused.is_empty(),
        "{} not accepted, e.g. {:?}",
        refused.len(),
        &refused[..refused.len().min(3)]
    );

    let (ids, numbers) =
        wait_for_deliveries(&peer, &marker, accepted, Duration::from_secs(120)).await;
    assert_exactly_once(&outcomes, &ids, &numbers);
    assert_eq!(entra.fetch_count().await, 1, "one token for the whole load");
}
