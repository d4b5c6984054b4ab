//! Answers stored under Idempotency-Keys outlive the replicas: every replica restarted, the
//! keys get the same answers again and nothing is sent twice.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Semaphore;

use crate::cluster::{
    Answer, Cluster, RATE_LIMITS_OFF, is_original, outcome, post_mail, replica_yaml, source,
};
use crate::entra::FakeEntra;
use crate::harness::{assert_exactly_once, marker, small_mail, wait_for_deliveries};
use crate::{require_peer, require_store};

const REPLICAS: usize = 3;
const MAILS: usize = 60;

/// One keyed mail and its first answer.
#[derive(Clone)]
pub struct Keyed {
    pub n: usize,
    pub key: String,
    pub mail: Value,
    pub answer: Answer,
}

/// Mails `from..from + count`, each with a new key, spread over the replicas, `concurrency` at
/// a time.
pub async fn send_keyed(
    cluster: &Cluster,
    marker: &str,
    from: usize,
    count: usize,
    concurrency: usize,
) -> Vec<Keyed> {
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut tasks = Vec::new();
    for n in from..from + count {
        let (client, bases, marker) = (
            cluster.client.clone(),
            cluster.bases.clone(),
            marker.to_owned(),
        );
        let permits = permits.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await.unwrap();
            let key = uuid::Uuid::new_v4().to_string();
            let mail = small_mail(&marker, n);
            let answer = post_mail(&client, &bases, n % bases.len(), &mail, Some(&key)).await;
            Keyed {
                n,
                key,
                mail,
                answer,
            }
        }));
    }
    let mut sent = Vec::new();
    for task in tasks {
        sent.push(task.await.unwrap());
    }
    sent
}

/// Each of `sent` asked again of every replica: the problems (answers that are not the original
/// answer, replayed).
pub async fn replay_everywhere(cluster: &Cluster, sent: &[Keyed]) -> Vec<String> {
    let mut problems = Vec::new();
    for k in sent {
        for r in 0..cluster.len() {
            let a = post_mail(&cluster.client, &cluster.bases, r, &k.mail, Some(&k.key)).await;
            if !(a.status == 202 && a.replayed && a.body == k.answer.body) {
                problems.push(format!(
                    "mail #{} asked again of replica {r}: {a:?}, not the replayed {:?}",
                    k.n, k.answer
                ));
            }
        }
    }
    problems
}

/// Every first answer a 202 sent now.
pub fn assert_all_sent(cluster: &Cluster, sent: &[Keyed]) {
    let refused: Vec<_> = sent.iter().filter(|k| !is_original(&k.answer)).collect();
    assert!(
        refused.is_empty(),
        "{} keyed mails were not answered 202 (sent), e.g. {:?}\n{}",
        refused.len(),
        refused.first().map(|k| &k.answer),
        cluster.problems(10)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_every_replica_keeps_the_stored_answers() {
    let peer = require_peer!();
    let store = require_store!();
    let _turn = crate::exclusive().await;
    let db = store.fresh_database().await;
    let entra = FakeEntra::serving_peer_tokens(&peer).await;
    let extra = format!("{}{RATE_LIMITS_OFF}", db.store_yaml(""));
    let yamls: Vec<String> = (0..REPLICAS)
        .map(|r| replica_yaml(&peer, peer.submission_port, &entra, source(3, r), &extra))
        .collect();
    let mut cluster = Cluster::start(&yamls).await;
    let marker = marker("replicas-restart");

    let sent = send_keyed(&cluster, &marker, 0, MAILS, 8).await;
    assert_all_sent(&cluster, &sent);
    let (ids, _) = wait_for_deliveries(&peer, &marker, MAILS, Duration::from_secs(30)).await;
    assert_eq!(
        ids.len(),
        MAILS,
        "not every mail arrived before the restart"
    );

    cluster.stop_all().await;
    drop(cluster);
    // The same settings (and so the same database), new processes on new ports.
    let cluster = Cluster::start(&yamls).await;
    let problems = replay_everywhere(&cluster, &sent).await;
    assert!(
        problems.is_empty(),
        "{} answers after the restart are not the stored ones, the first: {:#?}\n{}",
        problems.len(),
        &problems[..problems.len().min(10)],
        cluster.problems(10)
    );

    let outcomes: Vec<_> = sent.iter().map(|k| outcome(k.n, &k.answer)).collect();
    // Nothing new may arrive: wait_for_deliveries waits a second longer for a late duplicate.
    let (ids, numbers) =
        wait_for_deliveries(&peer, &marker, MAILS + 1, Duration::from_secs(3)).await;
    assert_exactly_once(&outcomes, &ids, &numbers);
    drop(cluster);
    db.drop_database().await;
}
