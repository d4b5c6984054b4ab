//! Queued delivery (`queue: always`) under the real peer and the real store: thousands of mails
//! from 64 clients, Postfix stopped for 30 s in the middle of the run or a replica SIGKILLed;
//! every `202` is delivered exactly once, counted by Message-ID in the Maildir.
//!
//! Exactly once where the protocol allows it: a session cut between the end of DATA and the
//! server's reply (Postfix stopped, a replica killed) leaves a mail that the relay marks
//! `unknown`, because the server may or may not have it. The tests then do what the README
//! tells an operator: look for its Message-ID in the mailbox, and `mail-relay queue retry ID`
//! only when it is not there. No other mail needs help, and no mail arrives twice.
//!
//! PostgreSQL runs two replicas. SQLite is one instance by design (the README), so its runs have
//! one replica, and in the SIGKILL run that replica's successor (the same settings and file,
//! started again) delivers what the killed one had claimed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::Semaphore;

use crate::cluster::{Cluster, RATE_LIMITS_OFF, post_mail, replica_yaml, source};
use crate::entra::FakeEntra;
use crate::harness::{Outcome, assert_exactly_once, delivered, marker, small_mail};
use crate::peer::Peer;
use crate::process::RelayProcess;
use crate::store::Store;
use crate::{require_peer, require_store};

const MAILS: usize = 5_000;
/// The SIGKILL runs and SQLite's (one instance) need fewer: what counts is the killed
/// replica's claims or the outage, not the volume.
const KILL_MAILS: usize = 2_000;
const CLIENTS: usize = 64;
const PEER_DOWN: Duration = Duration::from_secs(30);
/// Each mail's key is retried (after a transport error, 409 or 503) for at most this long.
const CLIENT_PATIENCE: Duration = Duration::from_secs(120);
/// Every accepted mail has finished (sent, or unknown) within this long after the last 202.
const DRAIN: Duration = Duration::from_secs(180);

/// Every request queued; retries come back within seconds, as a 30 s outage calls for (the
/// defaults, 30 s doubled up to 30 min, are for hours-long ones).
fn queued_extra(store: &str) -> String {
    format!(
        "{store}{RATE_LIMITS_OFF}  delivery:\n    queue: always\n    retryMinSeconds: 2\n    \
         retryMaxSeconds: 8\n"
    )
}

/// Shorter leases than the tests' defaults, so that a SIGKILLed replica's claims come back
/// sooner: a key's claim lasts `requestTimeoutSeconds` + 30 s, a mail's `sendDeadlineSeconds`
/// + 10 s.
fn short_leases(yaml: String) -> String {
    yaml.replacen(
        "    sendDeadlineSeconds: 20\n",
        "    sendDeadlineSeconds: 8\n",
        1,
    )
    .replacen(
        "    requestTimeoutSeconds: 30\n",
        "    requestTimeoutSeconds: 10\n",
        1,
    )
}

/// `server.port: 0` replaced by a port of its own, so that a successor can take it over.
fn on_fixed_port(yaml: String) -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    yaml.replacen("  port: 0\n", &format!("  port: {port}\n"), 1)
}

/// One mail the relay answered `202` queued.
#[derive(Debug, Clone)]
struct Accepted {
    n: usize,
    id: String,
    message_id: String,
    at: Instant,
}

/// What the clients got: the accepted mails, and every answer no outage explains.
struct Sent {
    accepted: Vec<Accepted>,
    problems: Vec<String>,
    took: Duration,
}

/// Sends mails `0..count` with `CLIENTS` clients, each mail with a key of its own, first to
/// replica `n % replicas` and after a transport error, `409` or `503` to the next one (the same
/// key), until a `202`; `progress` counts the 202s as they come.
async fn send_all(
    cluster: &Cluster,
    marker: &str,
    count: usize,
    progress: Arc<AtomicUsize>,
) -> Sent {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (client, bases, marker) = (
            cluster.client.clone(),
            cluster.bases.clone(),
            marker.to_owned(),
        );
        let (next, progress) = (next.clone(), progress.clone());
        tasks.push(tokio::spawn(async move {
            let mut accepted = Vec::new();
            let mut problems = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= count {
                    break;
                }
                let key = uuid::Uuid::new_v4().to_string();
                let mail = small_mail(&marker, n);
                let give_up = Instant::now() + CLIENT_PATIENCE;
                for attempt in 0.. {
                    let a = post_mail(
                        &client,
                        &bases,
                        (n + attempt) % bases.len(),
                        &mail,
                        Some(&key),
                    )
                    .await;
                    if a.status == 202 {
                        match (
                            a.body["status"].as_str(),
                            a.body["id"].as_str(),
                            a.message_id(),
                        ) {
                            (Some("queued"), Some(id), Some(message_id)) => {
                                progress.fetch_add(1, Ordering::Relaxed);
                                accepted.push(Accepted {
                                    n,
                                    id: id.to_owned(),
                                    message_id,
                                    at: Instant::now(),
                                });
                            }
                            _ => {
                                problems.push(format!("mail #{n}: a 202 that is not queued: {a:?}"))
                            }
                        }
                        break;
                    }
                    let outage = a.status == 0 || a.status == 409 || a.status == 503;
                    if !outage || Instant::now() > give_up {
                        problems.push(format!("mail #{n}: {a:?}"));
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            (accepted, problems)
        }));
    }
    let mut sent = Sent {
        accepted: Vec::new(),
        problems: Vec::new(),
        took: Duration::ZERO,
    };
    for task in tasks {
        let (accepted, problems) = task.await.unwrap();
        sent.accepted.extend(accepted);
        sent.problems.extend(problems);
    }
    sent.took = started.elapsed();
    sent
}

/// `GET /mail/{id}` of every mail in `ids` from `base`, 32 at a time: id -> status body.
async fn statuses(client: &reqwest::Client, base: &str, ids: &[String]) -> HashMap<String, Value> {
    let permits = Arc::new(Semaphore::new(32));
    let mut tasks = Vec::new();
    for id in ids {
        let (client, url, id) = (client.clone(), format!("{base}/mail/{id}"), id.clone());
        let permits = permits.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await.unwrap();
            let body = match client.get(&url).send().await {
                Ok(r) if r.status() == 200 => r.json().await.unwrap_or(Value::Null),
                Ok(r) => serde_json::json!({"status": format!("HTTP {}", r.status())}),
                Err(e) => serde_json::json!({"status": format!("transport error: {e}")}),
            };
            (id, body)
        }));
    }
    let mut out = HashMap::new();
    for task in tasks {
        let (id, body) = task.await.unwrap();
        out.insert(id, body);
    }
    out
}

/// Waits until every mail of `ids` has finished (no longer `queued` or `sending`), asking `base`;
/// returns the final statuses.
async fn wait_finished(cluster: &Cluster, base: &str, ids: &[String]) -> HashMap<String, Value> {
    let deadline = Instant::now() + DRAIN;
    let mut finished = HashMap::new();
    let mut open: Vec<String> = ids.to_vec();
    loop {
        for (id, body) in statuses(&cluster.client, base, &open).await {
            if !matches!(body["status"].as_str(), Some("queued" | "sending")) {
                finished.insert(id, body);
            }
        }
        open.retain(|id| !finished.contains_key(id));
        if open.is_empty() {
            return finished;
        }
        let sample = statuses(&cluster.client, base, &open[..1]).await;
        assert!(
            Instant::now() < deadline,
            "{} accepted mails have not finished within {DRAIN:?}, e.g. {sample:?}\n{}",
            open.len(),
            cluster.problems(10)
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `mail-relay --config <config> queue retry <id>`, as an operator runs it.
fn operator_retry(config: &std::path::Path, id: &str) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mail-relay"))
        .arg("--config")
        .arg(config)
        .args(["queue", "retry", id])
        .env_remove("MAILRELAY_STORE_URL")
        .output()
        .unwrap();
    assert!(out.status.success(), "mail-relay queue retry {id}: {out:?}");
}

/// What happens in the middle of a run.
enum Event {
    /// Postfix stopped for `PEER_DOWN`.
    PeerDown,
    /// Replica `r` SIGKILLed; with `restart`, started again (same settings) a second later.
    Kill { r: usize, restart: bool },
}

/// One run: `mails` queued mails, `event` once half of them are accepted, then the checks.
async fn queued_run(peer: &Peer, test: &str, yamls: Vec<String>, mails: usize, event: Event) {
    let mut cluster = Cluster::start(&yamls).await;
    let marker = marker(test);
    let progress = Arc::new(AtomicUsize::new(0));
    let sending = {
        let (cluster, marker, progress) = (&cluster, marker.clone(), progress.clone());
        async move { send_all(cluster, &marker, mails, progress).await }
    };
    let peer_events = async {
        while progress.load(Ordering::Relaxed) < mails / 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let at = Instant::now();
        let mut successor = None;
        match event {
            Event::PeerDown => {
                let stopped = peer.stop_postfix().await;
                tokio::time::sleep(PEER_DOWN).await;
                stopped.start().await;
            }
            Event::Kill { r, restart } => {
                cluster.relays[r].sigkill();
                if restart {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let yaml = yamls[r].clone();
                    let relay = tokio::task::spawn_blocking(move || RelayProcess::start(&yaml));
                    successor = Some(relay.await.unwrap());
                }
            }
        }
        (at, Instant::now(), successor)
    };
    let (sent, (event_at, event_end, successor)) = tokio::join!(sending, peer_events);
    // The replica that answers the status and the operator's commands.
    let mut live = 0;
    if let Event::Kill { r, .. } = event {
        match successor {
            Some(relay) => {
                assert_eq!(
                    relay.url(""),
                    cluster.bases[r],
                    "the successor has the same port"
                );
                cluster.relays[r] = relay;
                live = r;
            }
            None => live = (r + 1) % cluster.len(),
        }
    }
    assert!(
        sent.problems.is_empty(),
        "{} mails got answers the run does not explain, the first: {:#?}\n{}",
        sent.problems.len(),
        &sent.problems[..sent.problems.len().min(5)],
        cluster.problems(10)
    );
    assert_eq!(sent.accepted.len(), mails);
    let during = sent
        .accepted
        .iter()
        .filter(|a| a.at > event_at && a.at < event_end)
        .count();
    if matches!(event, Event::PeerDown) {
        assert!(
            during > 0,
            "no mail was accepted while Postfix was down: the queue should take them"
        );
    }

    let ids: Vec<String> = sent.accepted.iter().map(|a| a.id.clone()).collect();
    let base = cluster.bases[live].clone();
    let finished = wait_finished(&cluster, &base, &ids).await;
    let drained = event_end.elapsed();
    let state = |id: &str| finished[id]["status"].as_str().unwrap_or("?").to_owned();
    let attempts: usize = finished
        .values()
        .map(|s| s["attempts"].as_array().map_or(0, Vec::len))
        .sum();
    let unknown: Vec<&Accepted> = sent
        .accepted
        .iter()
        .filter(|a| state(&a.id) == "unknown")
        .collect();
    let other: Vec<String> = sent
        .accepted
        .iter()
        .filter(|a| !matches!(state(&a.id).as_str(), "sent" | "unknown"))
        .map(|a| format!("#{} {}", a.n, finished[&a.id]))
        .collect();
    assert!(
        other.is_empty(),
        "{} mails ended neither sent nor unknown, e.g. {:?}",
        other.len(),
        other.first()
    );
    // Only a session cut after the message went out can leave one: one per connection at most
    // (3 across the replicas), per cut.
    assert!(
        unknown.len() <= 3,
        "{} mails ended unknown; at most the 3 connections' mails in flight may: {unknown:?}",
        unknown.len()
    );

    // The operator's decision for each unknown mail: resend it only when the mailbox lacks it.
    let (ids_now, _) = delivered(peer, &marker);
    let missing: Vec<&Accepted> = unknown
        .iter()
        .copied()
        .filter(|a| !ids_now.contains_key(&a.message_id))
        .collect();
    for a in &missing {
        operator_retry(&cluster.relays[live].config_path(), &a.id);
    }
    let resent: Vec<String> = missing.iter().map(|a| a.id.clone()).collect();
    let again = wait_finished(&cluster, &base, &resent).await;
    for (id, status) in &again {
        assert_eq!(status["status"], "sent", "{id} after queue retry: {status}");
    }

    let outcomes: Vec<Outcome> = sent
        .accepted
        .iter()
        .map(|a| Outcome {
            n: a.n,
            status: 202,
            message_id: Some(a.message_id.clone()),
            code: None,
            retry_after: None,
            elapsed: Duration::ZERO,
        })
        .collect();
    let (ids, numbers) = wait_delivered(peer, &marker, mails).await;
    let distinct: HashSet<&usize> = numbers.iter().collect();
    eprintln!(
        "{test}: {mails} mails accepted in {:.1?} ({during} while the event lasted); all finished \
         {drained:.1?} after it; {attempts} attempts; {} unknown, {} of them resent; {} delivered",
        sent.took,
        unknown.len(),
        missing.len(),
        distinct.len()
    );
    assert_exactly_once(&outcomes, &ids, &numbers);
    if let Event::Kill { r, restart: false } = event {
        // It is gone already; the others stop as usual.
        cluster.relays.remove(r);
    }
    cluster.stop_all().await;
}

/// The Maildir once it holds `expected` mails with `marker` (Postfix delivers a moment after
/// its 250), and a second longer so that a late duplicate would be seen.
async fn wait_delivered(
    peer: &Peer,
    marker: &str,
    expected: usize,
) -> (HashMap<String, usize>, Vec<usize>) {
    crate::harness::wait_for_deliveries(peer, marker, expected, Duration::from_secs(60)).await
}

/// Two PostgreSQL replicas (sources `source(test, r)`) in a database of their own: `queued_run`.
async fn postgres_run(
    peer: &Peer,
    store: &Store,
    test: &str,
    source_test: u8,
    mails: usize,
    event: Event,
) {
    let db = store.fresh_database().await;
    let entra = FakeEntra::serving_peer_tokens(peer).await;
    let extra = queued_extra(&db.store_yaml(""));
    let yamls = (0..2)
        .map(|r| {
            short_leases(replica_yaml(
                peer,
                peer.submission_port,
                &entra,
                source(source_test, r),
                &extra,
            ))
        })
        .collect();
    queued_run(peer, test, yamls, mails, event).await;
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_5000_queued_mails_over_two_replicas_survive_a_30_s_peer_outage() {
    let peer = require_peer!();
    let store = require_store!();
    let _turn = crate::exclusive().await;
    postgres_run(&peer, &store, "queued-pg-outage", 7, MAILS, Event::PeerDown).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_sigkilled_replicas_claims_are_delivered_by_the_other() {
    let peer = require_peer!();
    let store = require_store!();
    let _turn = crate::exclusive().await;
    let kill = Event::Kill {
        r: 0,
        restart: false,
    };
    postgres_run(&peer, &store, "queued-pg-sigkill", 8, KILL_MAILS, kill).await;
}

fn sqlite_yaml(peer: &Peer, entra: &FakeEntra, db: &std::path::Path, test: u8) -> String {
    let store = format!("  store:\n    url: \"sqlite:{}\"\n", db.display());
    short_leases(replica_yaml(
        peer,
        peer.submission_port,
        entra,
        source(test, 0),
        &queued_extra(&store),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_2000_queued_mails_survive_a_30_s_peer_outage() {
    let peer = require_peer!();
    let _turn = crate::exclusive().await;
    let dir = tempfile::tempdir().unwrap();
    let entra = FakeEntra::serving_peer_tokens(&peer).await;
    let yaml = sqlite_yaml(&peer, &entra, &dir.path().join("relay.db"), 7);
    queued_run(
        &peer,
        "queued-sqlite-outage",
        vec![yaml],
        KILL_MAILS,
        Event::PeerDown,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_sigkilled_relays_claims_are_delivered_by_its_successor() {
    let peer = require_peer!();
    let _turn = crate::exclusive().await;
    let dir = tempfile::tempdir().unwrap();
    let entra = FakeEntra::serving_peer_tokens(&peer).await;
    let yaml = on_fixed_port(sqlite_yaml(&peer, &entra, &dir.path().join("relay.db"), 8));
    let kill = Event::Kill {
        r: 0,
        restart: true,
    };
    queued_run(&peer, "queued-sqlite-sigkill", vec![yaml], KILL_MAILS, kill).await;
}
