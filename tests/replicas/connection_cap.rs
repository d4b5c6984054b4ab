//! The cluster-wide SMTP connection cap, counted at the peer (Postfix's log), not by the relay:
//! `tests/load/shared_slots.rs` counts at a forwarder in front of the peer, these read what the
//! peer itself logged.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::cluster::{Answer, Cluster, RATE_LIMITS_OFF, outcome, post_mail, replica_yaml, source};
use crate::entra::FakeEntra;
use crate::harness::{assert_exactly_once, marker, small_mail, wait_for_deliveries};
use crate::peer_log::{log_offset, log_since, max_concurrent_authenticated, open_authenticated};
use crate::{require_peer, require_store};

/// `mailRelay.smtp.maxConnections` (the default, which `smtp_yaml` does not change).
const MAX_CONNECTIONS: usize = 3;
/// How soon the slots of a killed replica are free again. The README: "A stopped or killed
/// replica's sessions end with its process, which frees its slots at once" (PostgreSQL ends the
/// sessions holding the advisory locks when their sockets close).
const SLOT_RELEASE: Duration = Duration::from_secs(2);

/// Waits for Postfix's log daemon to write what it has been sent.
async fn settle_log() {
    tokio::time::sleep(Duration::from_millis(1500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_64_clients_over_3_replicas_the_peer_sees_at_most_3_connections() {
    const REPLICAS: usize = 3;
    const CLIENTS: usize = 64;
    const MAILS: usize = 640;
    let peer = require_peer!();
    let store = require_store!();
    let _turn = crate::exclusive().await;
    let db = store.fresh_database().await;
    let entra = FakeEntra::serving_peer_tokens(&peer).await;
    let extra = format!("{}{RATE_LIMITS_OFF}", db.store_yaml(""));
    let sources: Vec<_> = (0..REPLICAS).map(|r| source(6, r)).collect();
    let yamls: Vec<String> = sources
        .iter()
        .map(|s| replica_yaml(&peer, peer.submission_port, &entra, *s, &extra))
        .collect();
    let offset = log_offset(&peer.log);
    let mut cluster = Cluster::start(&yamls).await;
    let marker = marker("replicas-cap");

    let permits = Arc::new(Semaphore::new(CLIENTS));
    let mut tasks = Vec::new();
    for n in 0..MAILS {
        let (client, bases, marker, permits) = (
            cluster.client.clone(),
            cluster.bases.clone(),
            marker.clone(),
            permits.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await.unwrap();
            let mail = small_mail(&marker, n);
            (
                n,
                post_mail(&client, &bases, n % bases.len(), &mail, None).await,
            )
        }));
    }
    let mut answers: Vec<(usize, Answer)> = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    let refused: Vec<_> = answers.iter().filter(|(_, a)| a.status != 202).collect();
    assert!(
        refused.is_empty(),
        "{} of {MAILS} mails were not accepted, e.g. {:?}\n{}",
        refused.len(),
        refused.first(),
        cluster.problems(10)
    );
    // Idle pooled connections close with the replicas: every session then has its disconnect.
    cluster.stop_all().await;
    settle_log().await;
    let log = log_since(&peer.log, offset);
    let (most, sessions) = max_concurrent_authenticated(&log, &sources);
    eprintln!(
        "replicas-cap: {MAILS} mails from {CLIENTS} clients over {REPLICAS} replicas; the peer saw \
         {sessions} authenticated sessions from them, at most {most} at once"
    );
    assert!(
        sessions > 0,
        "the peer's log shows no session from {sources:?}"
    );
    assert!(
        most <= MAX_CONNECTIONS,
        "the peer saw {most} authenticated connections from the replicas at once; the cap is \
         {MAX_CONNECTIONS} for the whole deployment"
    );

    let outcomes: Vec<_> = answers.iter().map(|(n, a)| outcome(*n, a)).collect();
    let (ids, numbers) = wait_for_deliveries(&peer, &marker, MAILS, Duration::from_secs(60)).await;
    assert_exactly_once(&outcomes, &ids, &numbers);
    drop(cluster);
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_with_sigkill_frees_its_connection_slots() {
    const MAILS: usize = 30;
    let peer = require_peer!();
    let store = require_store!();
    let _turn = crate::exclusive().await;
    let db = store.fresh_database().await;
    let entra = FakeEntra::serving_peer_tokens(&peer).await;
    let extra = format!("{}{RATE_LIMITS_OFF}", db.store_yaml(""));
    let (doomed, survivor) = (source(7, 0), source(7, 1));
    // The doomed replica sends through the slow listener (each end of DATA answered seconds
    // late), so it holds every slot when it dies; the survivor through the normal one.
    let yamls = [
        replica_yaml(&peer, peer.slow_port, &entra, doomed, &extra),
        replica_yaml(&peer, peer.submission_port, &entra, survivor, &extra),
    ];
    let offset = log_offset(&peer.log);
    let cluster = Cluster::start(&yamls).await;
    let marker = marker("replicas-sigkill");

    let stop = Arc::new(AtomicBool::new(false));
    let mut busy = Vec::new();
    for c in 0..2 * MAX_CONNECTIONS {
        let (client, bases, marker, stop) = (
            cluster.client.clone(),
            cluster.bases.clone(),
            marker.clone(),
            stop.clone(),
        );
        busy.push(tokio::spawn(async move {
            let mut n = 100_000 + c;
            while !stop.load(Ordering::Relaxed) {
                let a = post_mail(&client, &bases, 0, &small_mail(&marker, n), None).await;
                if a.status == 0 {
                    break; // the replica is gone
                }
                n += 2 * MAX_CONNECTIONS;
            }
        }));
    }
    // Until the peer shows the doomed replica holding every slot.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let open = open_authenticated(&log_since(&peer.log, offset), &[doomed]);
        if open >= MAX_CONNECTIONS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the doomed replica never held {MAX_CONNECTIONS} connections (the peer shows {open})\n{}",
            cluster.problems(10)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The cap is in force: a mail to the survivor waits for a slot (none is free).
    let probe = {
        let (client, bases) = (cluster.client.clone(), cluster.bases.clone());
        let mail = small_mail(&marker, MAILS);
        tokio::spawn(async move { post_mail(&client, &bases, 1, &mail, None).await })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let survivor_open = open_authenticated(&log_since(&peer.log, offset), &[survivor]);
    assert!(
        !probe.is_finished() && survivor_open == 0,
        "while the doomed replica held every slot, the survivor sent anyway (its mail finished: \
         {}, its connections at the peer: {survivor_open})",
        probe.is_finished()
    );

    cluster.relays[0].sigkill();
    let killed_at = Instant::now();
    stop.store(true, Ordering::Relaxed);

    // The survivor gets the slots: its mails go through, retried on 503 as a client would.
    let mut tasks = Vec::new();
    for n in 0..MAILS {
        let (client, bases, marker) = (
            cluster.client.clone(),
            cluster.bases.clone(),
            marker.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mail = small_mail(&marker, n);
            loop {
                let a = post_mail(&client, &bases, 1, &mail, None).await;
                if a.status != 503 || killed_at.elapsed() > SLOT_RELEASE + Duration::from_secs(30) {
                    return (n, a, killed_at.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    let probe = probe.await.unwrap();
    answers.push((MAILS, probe.clone(), killed_at.elapsed()));
    assert!(
        probe.status == 202,
        "the mail that waited for a slot when the doomed replica died: {probe:?}"
    );
    for task in busy {
        let _ = task.await;
    }
    let first = answers
        .iter()
        .filter(|(_, a, _)| a.status == 202)
        .map(|(_, _, at)| *at)
        .min();
    let refused: Vec<_> = answers.iter().filter(|(_, a, _)| a.status != 202).collect();
    assert!(
        refused.is_empty(),
        "{} of the survivor's {MAILS} mails were not accepted, e.g. {:?}\n{}",
        refused.len(),
        refused.first(),
        cluster.log_tail(1, 10)
    );
    let first = first.unwrap();
    assert!(
        first <= SLOT_RELEASE + Duration::from_secs(5),
        "the survivor's first mail went through {first:?} after the kill; the slots should be \
         free within {SLOT_RELEASE:?}"
    );
    settle_log().await;
    let log = log_since(&peer.log, offset);
    let (survivor_most, _) = max_concurrent_authenticated(&log, &[survivor]);
    let (together, _) = max_concurrent_authenticated(&log, &[doomed, survivor]);
    eprintln!(
        "replicas-sigkill: the survivor's first mail {first:?} after the kill; it then held up to \
         {survivor_most} connections; both together at most {together}"
    );
    // All of the dead replica's slots came back, not only one.
    assert_eq!(
        survivor_most, MAX_CONNECTIONS,
        "the survivor never used all {MAX_CONNECTIONS} slots after the kill"
    );
    // Not asserted: `together`. The slow listener notices the dead replica's closed sockets
    // only after its delayed end-of-DATA reply, so the peer's log keeps them open a few seconds
    // longer than they were.

    let outcomes: Vec<_> = answers.iter().map(|(n, a, _)| outcome(*n, a)).collect();
    let (ids, numbers) = wait_for_deliveries(&peer, &marker, MAILS, Duration::from_secs(30)).await;
    // Only the survivor's mails (numbers below 100 000) are checked: the dead replica's
    // requests got no answer, and whether Postfix kept a mail cut in its end of DATA is its own
    // business.
    let ids: std::collections::HashMap<_, _> = ids
        .into_iter()
        .filter(|(id, _)| outcomes.iter().any(|o| o.message_id.as_deref() == Some(id)))
        .collect();
    let numbers: Vec<usize> = numbers.into_iter().filter(|n| *n < 100_000).collect();
    assert_exactly_once(&outcomes, &ids, &numbers);
    let mut sorted = numbers.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        numbers.len(),
        "a mail number was delivered twice"
    );
    drop(cluster);
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_starves_for_a_slot_under_sustained_load() {
    // The load of the 2,000-mail idempotency test without the keys: 32 clients over 3 replicas
    // sharing 3 slots, for long enough that a replica holding no slot must get one back from
    // the busy ones (idle connections alone never come free under such load).
    const REPLICAS: usize = 3;
    const CLIENTS: usize = 32;
    const MAILS: usize = 2000;
    let peer = require_peer!();
    let store = require_store!();
    let _turn = crate::exclusive().await;
    let db = store.fresh_database().await;
    let entra = FakeEntra::serving_peer_tokens(&peer).await;
    let extra = format!("{}{RATE_LIMITS_OFF}", db.store_yaml(""));
    let yamls: Vec<String> = (0..REPLICAS)
        .map(|r| replica_yaml(&peer, peer.submission_port, &entra, source(8, r), &extra))
        .collect();
    let cluster = Cluster::start(&yamls).await;
    let marker = marker("replicas-fair");
    let started = Instant::now();
    let permits = Arc::new(Semaphore::new(CLIENTS));
    let mut tasks = Vec::new();
    for n in 0..MAILS {
        let (client, bases, marker, permits) = (
            cluster.client.clone(),
            cluster.bases.clone(),
            marker.clone(),
            permits.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await.unwrap();
            let mail = small_mail(&marker, n);
            (
                n,
                post_mail(&client, &bases, n % bases.len(), &mail, None).await,
            )
        }));
    }
    let mut answers: Vec<(usize, Answer)> = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    let took = started.elapsed();
    let slowest = answers.iter().map(|(_, a)| a.elapsed).max().unwrap();
    let per_replica: Vec<(usize, usize)> = (0..REPLICAS)
        .map(|r| {
            let mine = answers.iter().filter(|(_, a)| a.replica == r);
            (
                mine.clone().filter(|(_, a)| a.status == 202).count(),
                mine.filter(|(_, a)| a.status != 202).count(),
            )
        })
        .collect();
    eprintln!(
        "replicas-fair: {MAILS} mails from {CLIENTS} clients over {REPLICAS} replicas in {took:?}; \
         slowest answer {slowest:?}; (accepted, refused) per replica {per_replica:?}"
    );
    let refused: Vec<_> = answers.iter().filter(|(_, a)| a.status != 202).collect();
    assert!(
        refused.is_empty(),
        "{} of {MAILS} mails were refused (a request that waits for a slot until \
         sendDeadlineSeconds gets 503 smtp_unavailable while the other replicas keep theirs); \
         (accepted, refused) per replica {per_replica:?}; e.g. {:?}",
        refused.len(),
        refused.first()
    );
    let outcomes: Vec<_> = answers.iter().map(|(n, a)| outcome(*n, a)).collect();
    let (ids, numbers) = wait_for_deliveries(&peer, &marker, MAILS, Duration::from_secs(60)).await;
    assert_exactly_once(&outcomes, &ids, &numbers);
    drop(cluster);
    db.drop_database().await;
}
