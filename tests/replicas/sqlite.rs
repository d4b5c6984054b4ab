//! The SQLite store (one instance, durable): answers stored under Idempotency-Keys survive a
//! restart of the process.

use std::time::Duration;

use crate::cluster::{Cluster, RATE_LIMITS_OFF, outcome, replica_yaml, source};
use crate::entra::FakeEntra;
use crate::harness::{assert_exactly_once, marker, wait_for_deliveries};
use crate::require_peer;
use crate::restart::{assert_all_sent, replay_everywhere, send_keyed};

const MAILS: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_keeps_the_stored_answers_across_a_restart() {
    let peer = require_peer!();
    let _turn = crate::exclusive().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("relay.db");
    let entra = FakeEntra::serving_peer_tokens(&peer).await;
    let extra = format!(
        "  store:\n    url: \"sqlite:{}\"\n{RATE_LIMITS_OFF}",
        db.display()
    );
    let yaml = [replica_yaml(
        &peer,
        peer.submission_port,
        &entra,
        source(5, 0),
        &extra,
    )];
    let mut relay = Cluster::start(&yaml).await;
    let marker = marker("replicas-sqlite");

    let sent = send_keyed(&relay, &marker, 0, MAILS, 4).await;
    assert_all_sent(&relay, &sent);
    // Replayed before the restart, too.
    let problems = replay_everywhere(&relay, &sent).await;
    assert!(problems.is_empty(), "before the restart: {problems:#?}");
    let (ids, _) = wait_for_deliveries(&peer, &marker, MAILS, Duration::from_secs(30)).await;
    assert_eq!(
        ids.len(),
        MAILS,
        "not every mail arrived before the restart"
    );
    relay.stop_all().await;
    drop(relay);
    assert!(
        db.metadata().is_ok_and(|m| m.len() > 0),
        "no SQLite file at {}",
        db.display()
    );

    let relay = Cluster::start(&yaml).await;
    let problems = replay_everywhere(&relay, &sent).await;
    assert!(
        problems.is_empty(),
        "{} answers after the restart are not the stored ones, the first: {:#?}\n{}",
        problems.len(),
        &problems[..problems.len().min(10)],
        relay.problems(10)
    );
    let outcomes: Vec<_> = sent.iter().map(|k| outcome(k.n, &k.answer)).collect();
    let (ids, numbers) =
        wait_for_deliveries(&peer, &marker, MAILS + 1, Duration::from_secs(3)).await;
    assert_exactly_once(&outcomes, &ids, &numbers);
}
