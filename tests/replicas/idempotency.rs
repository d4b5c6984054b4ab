//! Idempotency-Keys across replicas: a key claimed on one replica is seen by every other at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::Semaphore;

use crate::cluster::{
    Answer, Cluster, RATE_LIMITS_OFF, is_original, outcome, post_mail, replica_yaml, source,
};
use crate::entra::FakeEntra;
use crate::harness::{assert_exactly_once, marker, small_mail, wait_for_deliveries};
use crate::{require_peer, require_store};

const REPLICAS: usize = 3;
const MAILS: usize = 2000;
const CONCURRENCY: usize = 32;
/// Every `OVERLAP`th mail is resent while its first request is still running.
const OVERLAP: usize = 4;
/// How many `503 smtp_unavailable` answers (a request that got no SMTP connection slot within
/// `sendDeadlineSeconds`, retried with its key) the run may see. Slot fairness itself is
/// `connection_cap::no_request_starves_for_a_slot_under_sustained_load`'s; here a few are
/// tolerated so that this test checks the keys.
const TRANSIENT: usize = 100;

/// What happened to one key.
struct KeyRun {
    n: usize,
    key: String,
    mail: Value,
    /// Every answer, in order: the two requests, then any retries of a 409.
    answers: Vec<Answer>,
    /// The final answer of each of the two requests.
    finals: [Answer; 2],
}

/// Mail `n` with a new key to replica `n % R`, and the same mail with the same key to a random
/// other replica: after the first answer, or (every `OVERLAP`th mail) at the same time. A 409
/// is asked again once both have answered.
async fn send_twice(
    client: reqwest::Client,
    bases: Arc<Vec<String>>,
    marker: String,
    n: usize,
) -> KeyRun {
    let replicas = bases.len();
    let key = uuid::Uuid::new_v4().to_string();
    let mail = small_mail(&marker, n);
    let first = n % replicas;
    let second = (first + 1 + rand::random_range(0..replicas - 1)) % replicas;
    let targets = [first, second];
    let (a, b) = if n.is_multiple_of(OVERLAP) {
        tokio::join!(
            post_mail(&client, &bases, first, &mail, Some(&key)),
            async {
                // Within a few milliseconds: while the first is still sending.
                tokio::time::sleep(Duration::from_millis((n % 3) as u64)).await;
                post_mail(&client, &bases, second, &mail, Some(&key)).await
            }
        )
    } else {
        let a = post_mail(&client, &bases, first, &mail, Some(&key)).await;
        let b = post_mail(&client, &bases, second, &mail, Some(&key)).await;
        (a, b)
    };
    let mut answers = vec![a.clone(), b.clone()];
    let mut finals = [a, b];
    for (i, last) in finals.iter_mut().enumerate() {
        // Both requests have answered: a claim still "in progress" would be a stuck one. Give
        // it a few Retry-After periods anyway. A transient 503 is retried with the same key, as
        // a client does (and counted: see `TRANSIENT`).
        for attempt in 0..10 {
            let transient = last.is(503, "smtp_unavailable");
            if last.status != 409 && !transient {
                break;
            }
            if attempt > 0 || transient {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            *last = post_mail(&client, &bases, targets[i], &mail, Some(&key)).await;
            answers.push(last.clone());
        }
    }
    KeyRun {
        n,
        key,
        mail,
        answers,
        finals,
    }
}

/// What is wrong with one key's answers, if anything.
fn check_key(run: &KeyRun) -> Vec<String> {
    let mut problems = Vec::new();
    let n = run.n;
    for a in &run.answers {
        match a.status {
            202 => {}
            503 if a.is(503, "smtp_unavailable") && a.retry_after.is_some() => {}
            409 => {
                if !a.is(409, "idempotency_in_progress") || a.retry_after.is_none() {
                    problems.push(format!(
                        "mail #{n}: a 409 without code idempotency_in_progress and Retry-After: {a:?}"
                    ));
                }
            }
            _ => problems.push(format!("mail #{n}: unexpected answer {a:?}")),
        }
    }
    let originals: Vec<&Answer> = run.finals.iter().filter(|a| is_original(a)).collect();
    if originals.len() != 1 {
        problems.push(format!(
            "mail #{n}: {} of its two requests were answered as sent (not replayed); finals {:?}",
            originals.len(),
            run.finals
        ));
        return problems;
    }
    let original = originals[0];
    for a in &run.finals {
        if std::ptr::eq(a, original) {
            continue;
        }
        if !(a.status == 202 && a.replayed && a.body == original.body) {
            problems.push(format!(
                "mail #{n}: the other request's final answer is not the replayed original \
                 {original:?}: {a:?}"
            ));
        }
    }
    problems
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_mails_resent_to_other_replicas_are_delivered_exactly_once() {
    let peer = require_peer!();
    let store = require_store!();
    let _turn = crate::exclusive().await;
    let db = store.fresh_database().await;
    let entra = FakeEntra::serving_peer_tokens(&peer).await;
    let extra = format!("{}{RATE_LIMITS_OFF}", db.store_yaml(""));
    let yamls: Vec<String> = (0..REPLICAS)
        .map(|r| replica_yaml(&peer, peer.submission_port, &entra, source(1, r), &extra))
        .collect();
    let cluster = Cluster::start(&yamls).await;
    let marker = marker("replicas-idem");
    let started = Instant::now();

    // Every mail sent twice, CONCURRENCY mails at a time.
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    let mut tasks = Vec::new();
    for n in 0..MAILS {
        let (client, bases, marker) = (
            cluster.client.clone(),
            cluster.bases.clone(),
            marker.clone(),
        );
        let permits = permits.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await.unwrap();
            send_twice(client, bases, marker, n).await
        }));
    }
    let mut runs = Vec::new();
    for task in tasks {
        runs.push(task.await.unwrap());
    }
    let sent_in = started.elapsed();
    let in_progress = runs
        .iter()
        .flat_map(|r| &r.answers)
        .filter(|a| a.status == 409)
        .count();
    let transient = runs
        .iter()
        .flat_map(|r| &r.answers)
        .filter(|a| a.status == 503)
        .count();
    let mut problems: Vec<String> = runs.iter().flat_map(check_key).collect();
    if transient > TRANSIENT {
        problems.push(format!(
            "{transient} answers 503 smtp_unavailable (more than {TRANSIENT})"
        ));
    }
    assert!(
        problems.is_empty(),
        "{} problems, the first: {:#?}\n{}",
        problems.len(),
        &problems[..problems.len().min(10)],
        cluster.problems(10)
    );
    assert!(
        in_progress > 0,
        "no resend overlapped its first request (none got 409 idempotency_in_progress): \
         the in-progress case went untested"
    );

    // Every key's answer, asked of every replica: the same 202, replayed.
    let originals: Vec<(usize, String, Value, Answer)> = runs
        .iter()
        .map(|r| {
            let original = r.finals.iter().find(|a| is_original(a)).unwrap().clone();
            (r.n, r.key.clone(), r.mail.clone(), original)
        })
        .collect();
    let originals = Arc::new(originals);
    let mut tasks = Vec::new();
    for i in 0..originals.len() {
        let (client, bases, originals) = (
            cluster.client.clone(),
            cluster.bases.clone(),
            originals.clone(),
        );
        let permits = permits.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await.unwrap();
            let (n, key, mail, original) = &originals[i];
            let mut problems = Vec::new();
            for r in 0..bases.len() {
                let a = post_mail(&client, &bases, r, mail, Some(key)).await;
                if !(a.status == 202 && a.replayed && a.body == original.body) {
                    problems.push(format!(
                        "mail #{n} asked again of replica {r}: {a:?}, not the replayed {original:?}"
                    ));
                }
            }
            problems
        }));
    }
    let mut problems = Vec::new();
    for task in tasks {
        problems.extend(task.await.unwrap());
    }
    assert!(
        problems.is_empty(),
        "{} final answers differ, the first: {:#?}\n{}",
        problems.len(),
        &problems[..problems.len().min(10)],
        cluster.problems(10)
    );

    let outcomes: Vec<_> = originals
        .iter()
        .map(|(n, _, _, a)| outcome(*n, a))
        .collect();
    let (ids, numbers) = wait_for_deliveries(&peer, &marker, MAILS, Duration::from_secs(120)).await;
    eprintln!(
        "replicas-idem: {MAILS} keyed mails sent twice over {REPLICAS} replicas in {sent_in:?}, \
         {in_progress} answers 409 idempotency_in_progress, {transient} answers 503 retried; \
         {} delivered",
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
