//! The mailbox's connection cap across replicas: three relays on one PostgreSQL store never
//! hold more SMTP connections than `maxConnections` together, counted at a forwarder in front
//! of the SMTP peer (what the server sees), not by the relays.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt as _;

use crate::entra::FakeEntra;
use crate::harness::{
    Forwarder, Outcome, assert_exactly_once, marker, relay_settings, send, spawn_relay,
    wait_for_deliveries,
};
use crate::require_peer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_sharing_a_store_never_open_more_than_the_mailboxs_connections() {
    let peer = require_peer!();
    let Some(store) = crate::store_settings::postgres() else {
        return crate::peer::missing("PostgreSQL store", "tests/store/start.sh", "shared_slots");
    };
    let _turn = crate::exclusive().await;
    let entra = FakeEntra::serving_peer_tokens(&peer).await;
    let target: SocketAddr = format!("{}:{}", peer.host, peer.submission_port)
        .parse()
        .unwrap();
    let server = Forwarder::start(target).await;
    let max = 3;
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let mut settings = relay_settings(&peer, &entra, server.port);
        settings.relay.store = store.clone();
        settings.relay.smtp.max_connections = max;
        let replica = spawn_relay(settings).await;
        // As an orchestrator would: traffic only once ready (the store's schema in place).
        let mut ready = false;
        for _ in 0..100 {
            let probe = replica
                .client
                .get(replica.url("/health/ready"))
                .send()
                .await;
            if probe.is_ok_and(|r| r.status() == 200) {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ready, "a replica never turned ready");
        replicas.push(replica);
    }
    let marker = marker("shared-slots");

    // 64 clients at once, spread over the replicas: each replica alone would open 3.
    let outcomes: Vec<Outcome> = futures_util::stream::iter(0..150)
        .map(|n| send(&replicas[n % 3], &marker, n))
        .buffer_unordered(64)
        .collect()
        .await;
    for o in &outcomes {
        assert_eq!(o.status, 202, "mail #{}: {o:?}", o.n);
    }
    assert!(
        server.peak() <= max,
        "the server saw {} connections at once from three replicas, limit {max}",
        server.peak()
    );
    assert!(
        server.peak() >= 2,
        "the replicas shared the slots, one at a time is not a test"
    );
    let (ids, numbers) =
        wait_for_deliveries(&peer, &marker, outcomes.len(), Duration::from_secs(60)).await;
    assert_exactly_once(&outcomes, &ids, &numbers);

    // Idle connections give their slots back within moments: every replica can send again,
    // even one that had none.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        server.open(),
        0,
        "idle connections are closed and their slots freed"
    );
}
