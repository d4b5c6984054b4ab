//! PostgreSQL stopped and started under the replicas' feet: while it is down the relay answers
//! `503 store_unavailable` with Retry-After and is not ready (it never sends unchecked); once it
//! is back the same processes send again, and no keyed mail is delivered twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::cluster::{Answer, Cluster, is_original, outcome, post_mail, replica_yaml, source};
use crate::entra::FakeEntra;
use crate::harness::{Outcome, assert_exactly_once, marker, small_mail, wait_for_deliveries};
use crate::peer_log::{log_offset, log_since, max_concurrent_authenticated};
use crate::restart::{assert_all_sent, send_keyed};
use crate::{require_peer, require_store};

const REPLICAS: usize = 2;
const BEFORE: usize = 20;
/// Clients sending keyed mails all through the outage, each retrying its key until a 202.
const CLIENTS: usize = 8;
const DOWN_FOR: Duration = Duration::from_secs(4);
/// Once the store is back, every key is answered 202 within this long: readiness returns within
/// a ping (5 s), and the relay's Retry-After while down is 5 s.
const RECOVERY: Duration = Duration::from_secs(15);

/// What one background client saw: the final answer of each of its mails, and every answer
/// that is not one the outage allows.
struct ClientRun {
    finals: Vec<(usize, Answer)>,
    /// When each of `finals` came.
    final_at: Vec<Instant>,
    /// The slowest answer.
    slowest: Option<Answer>,
    /// Keys that got 409 idempotency_in_progress: mail number, how many 409s, the time from
    /// the first 409 to the key's final answer, and the answers before the first 409.
    in_progress: Vec<(usize, usize, Duration, Vec<String>)>,
    store_unavailable: usize,
    problems: Vec<String>,
}

/// Sends keyed mails `base, base + 1, …` until `stop`; each mail's key is retried (on 503 after
/// Retry-After, at most a second; on 409 after half a second) until it is answered 202, for at
/// most 60 s after `stop`.
async fn keep_sending(
    client: reqwest::Client,
    bases: Arc<Vec<String>>,
    marker: String,
    base: usize,
    stop: Arc<AtomicBool>,
) -> ClientRun {
    let mut run = ClientRun {
        finals: Vec::new(),
        final_at: Vec::new(),
        slowest: None,
        in_progress: Vec::new(),
        store_unavailable: 0,
        problems: Vec::new(),
    };
    let mut n = base;
    let mut deadline: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        let key = uuid::Uuid::new_v4().to_string();
        let mail = small_mail(&marker, n);
        let mut attempt = 0;
        let mut first_409: Option<(Instant, usize)> = None;
        let mut history: Vec<String> = Vec::new();
        let last = loop {
            let a = post_mail(
                &client,
                &bases,
                (n + attempt) % bases.len(),
                &mail,
                Some(&key),
            )
            .await;
            attempt += 1;
            if run.slowest.as_ref().is_none_or(|s| s.elapsed < a.elapsed) {
                run.slowest = Some(a.clone());
            }
            if first_409.is_none() && a.status != 409 {
                history.push(format!(
                    "{} {} replica {} request {} after {:?}",
                    a.status,
                    a.code.as_deref().unwrap_or(""),
                    a.replica,
                    a.body["requestId"].as_str().unwrap_or("-"),
                    a.elapsed
                ));
            }
            let pause = match a.status {
                202 => break a,
                503 if a.is(503, "store_unavailable") => {
                    run.store_unavailable += 1;
                    if a.retry_after.is_none() {
                        run.problems
                            .push(format!("mail #{n}: 503 without Retry-After: {a:?}"));
                    }
                    let secs = a
                        .retry_after
                        .as_deref()
                        .and_then(|s| s.parse::<u64>().ok())
                        .unwrap_or(1);
                    Duration::from_secs(secs.min(1))
                }
                409 if a.is(409, "idempotency_in_progress") => {
                    first_409.get_or_insert((Instant::now(), 0)).1 += 1;
                    Duration::from_millis(500)
                }
                _ => {
                    run.problems.push(format!(
                        "mail #{n}: an answer the outage does not explain: {a:?}"
                    ));
                    Duration::from_millis(500)
                }
            };
            if stop.load(Ordering::Relaxed) {
                let d = *deadline.get_or_insert_with(|| Instant::now() + Duration::from_secs(60));
                if Instant::now() >= d {
                    run.problems.push(format!(
                        "mail #{n}: no 202 for its key within 60 s after the store came back; \
                         last answer {a:?}"
                    ));
                    break a;
                }
            }
            tokio::time::sleep(pause).await;
        };
        if let Some((since, count)) = first_409 {
            run.in_progress.push((n, count, since.elapsed(), history));
        }
        run.finals.push((n, last));
        run.final_at.push(Instant::now());
        n += 1;
        // A steady trickle, not a flood: the point is mails in flight when the store goes.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_and_started_mid_run() {
    let peer = require_peer!();
    let store = require_store!();
    let _turn = crate::exclusive().await;
    let db = store.fresh_database().await;
    let entra = FakeEntra::serving_peer_tokens(&peer).await;
    // Rate limits on (high), so that a mail without a key needs the store as well.
    let extra = format!(
        "{}  rateLimits:\n    mailboxMessagesPerMinute: 100000\n    \
         mailboxRecipientsPerDay: 10000000\n    callerMessagesPerMinute: 0\n    \
         callerRecipientsPerDay: 0\n",
        db.store_yaml("    connectTimeoutSeconds: 2\n")
    );
    let yamls: Vec<String> = (0..REPLICAS)
        .map(|r| replica_yaml(&peer, peer.submission_port, &entra, source(4, r), &extra))
        .collect();
    let sources: Vec<_> = (0..REPLICAS).map(|r| source(4, r)).collect();
    let offset = log_offset(&peer.log);
    let cluster = Cluster::start(&yamls).await;
    let marker = marker("replicas-outage");

    let before = send_keyed(&cluster, &marker, 0, BEFORE, 4).await;
    assert_all_sent(&cluster, &before);

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            tokio::spawn(keep_sending(
                cluster.client.clone(),
                cluster.bases.clone(),
                marker.clone(),
                10_000 * (c + 1),
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;

    let t0 = Instant::now();
    let stopped = store.stop().await;
    let down_since = Instant::now();
    eprintln!("store stopped in {:?}", t0.elapsed());
    let mut problems = Vec::new();
    // Mails answered while the store was down: must never arrive.
    let mut refused: Vec<Outcome> = Vec::new();
    // (replica, mail number, key): keyed mails refused while down, sent again once it is back.
    let mut retry_later = Vec::new();
    for (r, old) in before.iter().enumerate().take(REPLICAS) {
        let body = cluster
            .wait_readiness(r, 503, Duration::from_secs(15))
            .await;
        eprintln!("replica {r} not ready while the store is down: {body}");
        // A new key, a key answered before (its answer is in the store, out of reach), no key.
        let new_key = format!("down-{r}-{}", uuid::Uuid::new_v4());
        let fresh = post_mail(
            &cluster.client,
            &cluster.bases,
            r,
            &small_mail(&marker, 500 + r),
            Some(&new_key),
        )
        .await;
        let again = post_mail(
            &cluster.client,
            &cluster.bases,
            r,
            &old.mail,
            Some(&old.key),
        )
        .await;
        let unkeyed = post_mail(
            &cluster.client,
            &cluster.bases,
            r,
            &small_mail(&marker, 600 + r),
            None,
        )
        .await;
        for (what, a) in [
            ("a new key", &fresh),
            ("a key answered before", &again),
            ("no key", &unkeyed),
        ] {
            if !(a.is(503, "store_unavailable") && a.retry_after.is_some()) {
                problems.push(format!(
                    "replica {r}, store down, {what}: expected 503 store_unavailable with \
                     Retry-After, got {a:?}"
                ));
            }
        }
        refused.push(outcome(600 + r, &unkeyed));
        retry_later.push((r, 500 + r, new_key));
    }
    let elapsed = down_since.elapsed();
    if elapsed < DOWN_FOR {
        tokio::time::sleep(DOWN_FOR - elapsed).await;
    }
    eprintln!("{:?} since the stop: probes done", t0.elapsed());
    stopped.start().await;
    let back_at = Instant::now();

    // The same processes recover on their own.
    for r in 0..REPLICAS {
        cluster.wait_ready(r, Duration::from_secs(30)).await;
    }
    eprintln!(
        "replicas ready {:?} after the store came back",
        back_at.elapsed()
    );
    eprintln!("{:?} since the stop: ready again", t0.elapsed());
    let mut after: Vec<Outcome> = Vec::new();
    for (r, n, key) in &retry_later {
        // Refused while down, so nothing was stored under the key: sent now, not replayed.
        let a = post_mail(
            &cluster.client,
            &cluster.bases,
            *r,
            &small_mail(&marker, *n),
            Some(key),
        )
        .await;
        if !is_original(&a) {
            problems.push(format!(
                "replica {r}, store back: the key refused while it was down got {a:?}, not a 202 \
                 sent now"
            ));
        }
        after.push(outcome(*n, &a));
    }
    for r in 0..REPLICAS {
        // Keys answered before the outage: replayed, not sent again.
        for old in &before {
            let a = post_mail(
                &cluster.client,
                &cluster.bases,
                r,
                &old.mail,
                Some(&old.key),
            )
            .await;
            if !(a.status == 202 && a.replayed && a.body == old.answer.body) {
                problems.push(format!(
                    "replica {r}, store back: mail #{} asked again got {a:?}, not the replayed {:?}",
                    old.n, old.answer
                ));
            }
        }
    }
    eprintln!(
        "{:?} since the stop: keys checked after the outage",
        t0.elapsed()
    );
    // Let the clients send through the recovered store for a moment, then stop them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut runs = Vec::new();
    for client in clients {
        runs.push(client.await.unwrap());
    }
    eprintln!("{:?} since the stop: background clients done", t0.elapsed());
    for run in &runs {
        eprintln!(
            "a background client's slowest answer: {:?}; keys answered 409 (mail, 409s, for): {:?}",
            run.slowest, run.in_progress
        );
    }
    let unavailable: usize = runs.iter().map(|r| r.store_unavailable).sum();
    // The restart ended the database sessions that held the SMTP slots: the connections opened
    // with them must not live on next to new ones.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (most, sessions) = max_concurrent_authenticated(&log_since(&peer.log, offset), &sources);
    eprintln!("replicas-outage: the peer saw {sessions} SMTP sessions, at most {most} at once");
    if most > 3 {
        problems.push(format!(
            "the peer saw {most} authenticated connections from the replicas at once (the cap is 3)"
        ));
    }
    // A key whose request was cut by the outage must not stay blocked once the store is back.
    for run in &runs {
        for ((n, a), at) in run.finals.iter().zip(&run.final_at) {
            let late = at.saturating_duration_since(back_at);
            if late <= RECOVERY {
                continue;
            }
            let (count, history) = run
                .in_progress
                .iter()
                .find(|(m, ..)| m == n)
                .map(|(_, count, _, history)| (*count, history.clone()))
                .unwrap_or_default();
            let first_request = history
                .first()
                .and_then(|h| h.split(" request ").nth(1))
                .and_then(|h| h.split(' ').next())
                .unwrap_or("-")
                .to_owned();
            let logs: Vec<String> = cluster
                .relays
                .iter()
                .flat_map(|r| r.log_text().lines().map(str::to_owned).collect::<Vec<_>>())
                .filter(|l| l.contains(&first_request))
                .collect();
            problems.push(format!(
                "mail #{n}: its key was answered {} only {late:?} after the store was back \
                 (bound {RECOVERY:?}), after {count} answers 409 idempotency_in_progress; \
                 its answers before the first 409: {history:?}; the relay's log of its first \
                 request:\n{}",
                a.status,
                logs.join("\n")
            ));
        }
    }
    for run in &runs {
        problems.extend(run.problems.iter().cloned());
    }
    assert!(
        problems.is_empty(),
        "{} problems, the first: {:#?}\n{}\n--- PostgreSQL:\n{}",
        problems.len(),
        &problems[..problems.len().min(10)],
        cluster.problems(10),
        store.log_tail(10)
    );
    assert!(
        unavailable > 0,
        "the background clients never saw the outage (no 503 store_unavailable)"
    );

    // Exactly once: the first answers before, the unkeyed mails refused while down (never
    // delivered), the refused keys sent after, and each background mail's final answer.
    let mut outcomes: Vec<Outcome> = before.iter().map(|k| outcome(k.n, &k.answer)).collect();
    outcomes.extend(refused);
    outcomes.extend(after);
    outcomes.extend(
        runs.iter()
            .flat_map(|r| &r.finals)
            .map(|(n, a)| outcome(*n, a)),
    );
    let accepted = outcomes.iter().filter(|o| o.status == 202).count();
    let (ids, numbers) =
        wait_for_deliveries(&peer, &marker, accepted, Duration::from_secs(60)).await;
    eprintln!("{:?} since the stop: deliveries counted", t0.elapsed());
    eprintln!(
        "replicas-outage: {accepted} mails accepted, {unavailable} answers 503 store_unavailable \
         to the background clients, {} delivered",
        ids.len()
    );
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
