//! Abuse of the HTTP listener: slowloris and oversized headers do not starve other clients, and
//! connections that send nothing (or only the HTTP/2 preface) do not stay open.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{outbox_files, spawn_app, spawn_app_with};

const SLOW_CLIENTS: usize = 200;

/// Reads what the server answers (its status line), or `None` when it closes without one.
async fn status_line(stream: &mut TcpStream) -> Option<String> {
    let mut answer = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                answer.extend_from_slice(&chunk[..n]);
                if answer.windows(2).any(|w| w == b"\r\n") {
                    break;
                }
            }
        }
    }
    let text = String::from_utf8_lossy(&answer);
    text.lines().next().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_oversized_headers_do_not_keep_others_from_being_served() {
    let _turn = crate::exclusive().await;
    let app = spawn_app().await;

    // Slowloris: many connections that send a request head a byte at a time and never finish it.
    let mut slow = Vec::new();
    for _ in 0..SLOW_CLIENTS {
        let mut stream = TcpStream::connect(app.address).await.unwrap();
        stream
            .write_all(b"POST /mail HTTP/1.1\r\nHost: relay\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(tokio::spawn(async move {
            for _ in 0..60 {
                if stream.write_all(b"a").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }));
    }

    // Oversized heads: one 1 MiB header, and a head with 10,000 headers.
    let huge_value = format!(
        "GET /health/live HTTP/1.1\r\nHost: relay\r\nX-Big: {}\r\n\r\n",
        "b".repeat(1024 * 1024)
    );
    let many_headers = format!(
        "GET /health/live HTTP/1.1\r\nHost: relay\r\n{}\r\n",
        (0..10_000)
            .map(|i| format!("X-H{i}: v\r\n"))
            .collect::<String>()
    );
    for head in [huge_value, many_headers] {
        let mut stream = TcpStream::connect(app.address).await.unwrap();
        let started = Instant::now();
        // The server may stop reading and close before the whole head is written.
        let _ = stream.write_all(head.as_bytes()).await;
        let line = tokio::time::timeout(Duration::from_secs(5), status_line(&mut stream))
            .await
            .expect("an oversized head is answered or the connection closed, promptly");
        if let Some(line) = line {
            assert!(
                line.starts_with("HTTP/1.1 431") || line.starts_with("HTTP/1.1 400"),
                "oversized head answered {line:?}"
            );
        }
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    // Everyone else is served, promptly, while the slow connections hang on.
    for n in 0..20 {
        let started = Instant::now();
        let live = app.get("/health/live").await;
        assert_eq!(live.status(), 200);
        let body = json!({"from": "a@contoso.test", "to": "b@contoso.test",
                          "subject": format!("still served {n}"), "text": "hi"});
        let response = app.post_mail(&body).await;
        assert_eq!(response.status(), 202);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "request {n} took {:?} behind {SLOW_CLIENTS} slow connections",
            started.elapsed()
        );
    }
    assert_eq!(outbox_files(&app).len(), 20);
    let still_open = slow.iter().filter(|t| !t.is_finished()).count();
    eprintln!("slowloris: {still_open} of {SLOW_CLIENTS} slow connections still open");
    for task in slow {
        task.abort();
    }
}

const SILENT_CLIENTS: usize = 300;
const PREFACE_ONLY_CLIENTS: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_preface_only_connections_are_all_closed_after_the_head_timeout() {
    let _turn = crate::exclusive().await;
    let timeout = Duration::from_secs(2);
    let app = spawn_app_with(|s| s.relay.http.header_read_timeout = timeout).await;
    let mut held = Vec::new();
    for n in 0..SILENT_CLIENTS + PREFACE_ONLY_CLIENTS {
        let mut stream = TcpStream::connect(app.address).await.unwrap();
        if n >= SILENT_CLIENTS {
            stream
                .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                .await
                .unwrap();
        }
        held.push(tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = stream.read_to_end(&mut sink).await;
        }));
    }
    let started = Instant::now();
    // Served meanwhile: the idle ones take places, not the listener.
    assert_eq!(app.get("/health/live").await.status(), 200);
    let closed = tokio::time::timeout(timeout * 3, futures_util::future::join_all(held)).await;
    assert!(
        closed.is_ok(),
        "{SILENT_CLIENTS} silent and {PREFACE_ONLY_CLIENTS} preface-only connections still open after {:?}",
        started.elapsed()
    );
}
