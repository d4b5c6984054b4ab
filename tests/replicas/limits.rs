//! Rate limits across replicas: `mailboxMessagesPerMinute` counts for the whole deployment.

use std::time::Duration;

use crate::cluster::{Cluster, outcome, post_mail, replica_yaml, source};
use crate::entra::FakeEntra;
use crate::harness::{assert_exactly_once, marker, small_mail, wait_for_deliveries};
use crate::{require_peer, require_store};

const REPLICAS: usize = 3;
const LIMIT: usize = 10;
const REQUESTS: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mailbox_limit_holds_across_replicas() {
    let peer = require_peer!();
    let store = require_store!();
    let _turn = crate::exclusive().await;
    // A database of its own: no earlier run's window counts.
    let db = store.fresh_database().await;
    let entra = FakeEntra::serving_peer_tokens(&peer).await;
    let extra = format!(
        "{}  rateLimits:\n    mailboxMessagesPerMinute: {LIMIT}\n    mailboxRecipientsPerDay: 0\n    \
         callerMessagesPerMinute: 0\n    callerRecipientsPerDay: 0\n",
        db.store_yaml("")
    );
    let yamls: Vec<String> = (0..REPLICAS)
        .map(|r| replica_yaml(&peer, peer.submission_port, &entra, source(2, r), &extra))
        .collect();
    let cluster = Cluster::start(&yamls).await;
    let marker = marker("replicas-limit");

    // All at once, spread over the replicas: the count must hold under races too.
    let mut tasks = Vec::new();
    for n in 0..REQUESTS {
        let (client, bases, marker) = (
            cluster.client.clone(),
            cluster.bases.clone(),
            marker.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mail = small_mail(&marker, n);
            (
                n,
                post_mail(&client, &bases, n % bases.len(), &mail, None).await,
            )
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    let accepted: Vec<_> = answers.iter().filter(|(_, a)| a.status == 202).collect();
    let limited: Vec<_> = answers
        .iter()
        .filter(|(_, a)| a.is(429, "rate_limited") && a.retry_after.is_some())
        .collect();
    let per_replica: Vec<usize> = (0..REPLICAS)
        .map(|r| accepted.iter().filter(|(_, a)| a.replica == r).count())
        .collect();
    assert_eq!(
        (accepted.len(), limited.len()),
        (LIMIT, REQUESTS - LIMIT),
        "with mailboxMessagesPerMinute {LIMIT} over {REPLICAS} replicas, expected {LIMIT} × 202 \
         and the rest 429 rate_limited with Retry-After; accepted per replica {per_replica:?}; \
         answers: {:#?}\n{}",
        answers
            .iter()
            .map(|(n, a)| format!("#{n} replica {}: {} {:?}", a.replica, a.status, a.code))
            .collect::<Vec<_>>(),
        cluster.problems(5)
    );

    let outcomes: Vec<_> = answers.iter().map(|(n, a)| outcome(*n, a)).collect();
    let (ids, numbers) = wait_for_deliveries(&peer, &marker, LIMIT, Duration::from_secs(30)).await;
    assert_exactly_once(&outcomes, &ids, &numbers);
    assert_eq!(
        ids.len(),
        LIMIT,
        "the deployment delivered more than its limit"
    );
    drop(cluster);
    db.drop_database().await;
}
