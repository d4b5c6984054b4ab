//! What the load and fault tests share: a relay in front of the peer, mails with a per-run
//! marker, reading Message-IDs back from the Maildir, and a TCP forwarder that can go down.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mail_relay::app::Application;
use mail_relay::config::Settings;
use mail_relay::delivery::MailSender;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

use crate::entra::FakeEntra;
use crate::helpers::{TestApp, authenticated_client, peer_oauth_settings};
use crate::peer::Peer;

/// MS_OAUTH over STARTTLS to `port` on the peer's host, tokens from `entra`, rate limits off
/// (`test_settings` switches them off), a body limit for the big tests.
pub fn relay_settings(peer: &Peer, entra: &FakeEntra, port: u16) -> Settings {
    let mut settings = peer_oauth_settings(peer, entra.oauth_settings());
    settings.send_email.smtp_port = port;
    settings.relay.limits.max_body_bytes = 1024 * 1024;
    settings
}

/// The production build path (token cache + SMTP sender from the settings), on port 0.
pub async fn spawn_relay(settings: Settings) -> TestApp {
    crate::helpers::spawn_built(settings).await
}

/// A relay sending through `sender` (so that the test can watch the sender's state).
pub async fn spawn_relay_with(settings: Settings, sender: Arc<dyn MailSender>) -> TestApp {
    let app = Application::build_with(Arc::new(settings), sender)
        .await
        .unwrap();
    serve(app)
}

fn serve(app: Application) -> TestApp {
    let address = app.local_addr().unwrap();
    tokio::spawn(app.run_until(std::future::pending()));
    TestApp {
        address,
        client: authenticated_client(),
        outbox: tempfile::tempdir().unwrap(),
    }
}

/// A marker unique to this run, for the subject: the peer's Maildir is shared with other tests.
pub fn marker(test: &str) -> String {
    format!("{test}-{}", uuid::Uuid::new_v4().simple())
}

/// A small mail whose subject is `<marker> #<n>`.
pub fn small_mail(marker: &str, n: usize) -> Value {
    json!({
        "from": "load@contoso.test",
        "to": "alice@contoso.test",
        "subject": format!("{marker} #{n}"),
        "text": "Load test mail.\nIt has two lines.",
    })
}

/// What came back for one request.
#[derive(Debug)]
pub struct Outcome {
    pub n: usize,
    pub status: u16,
    /// `messageId` of a 2xx answer, without the angle brackets.
    pub message_id: Option<String>,
    /// `code` of a problem answer.
    pub code: Option<String>,
    pub retry_after: Option<String>,
    pub elapsed: Duration,
}

/// POSTs mail `n` and reads the answer; a transport error is status 0.
pub async fn send(app: &TestApp, marker: &str, n: usize) -> Outcome {
    let started = Instant::now();
    let response = app.mail_request().json(&small_mail(marker, n)).send().await;
    outcome(n, started, response).await
}

pub async fn outcome(
    n: usize,
    started: Instant,
    response: reqwest::Result<reqwest::Response>,
) -> Outcome {
    let Ok(response) = response else {
        return Outcome {
            n,
            status: 0,
            message_id: None,
            code: None,
            retry_after: None,
            elapsed: started.elapsed(),
        };
    };
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body: Value = response.json().await.unwrap_or(Value::Null);
    Outcome {
        n,
        status,
        message_id: body["messageId"]
            .as_str()
            .map(|id| id.trim_matches(['<', '>']).to_owned()),
        code: body["code"].as_str().map(str::to_owned),
        retry_after,
        elapsed: started.elapsed(),
    }
}

/// Message-IDs (without brackets) of the delivered mails whose subject carries `marker`, with
/// how often each was delivered, and the mail numbers (`#n`) seen.
pub fn delivered(peer: &Peer, marker: &str) -> (HashMap<String, usize>, Vec<usize>) {
    let mut ids = HashMap::new();
    let mut numbers = Vec::new();
    for raw in peer.find_messages(marker) {
        let text = String::from_utf8_lossy(&raw);
        for line in text.lines() {
            if line.is_empty() {
                break; // end of the header
            }
            let lower = line.to_ascii_lowercase();
            if lower.starts_with("message-id:") {
                let id = line["message-id:".len()..].trim().trim_matches(['<', '>']);
                *ids.entry(id.to_owned()).or_insert(0) += 1;
            } else if lower.starts_with("subject:")
                && let Some((_, n)) = line.rsplit_once(" #")
                && let Ok(n) = n.trim().parse()
            {
                numbers.push(n);
            }
        }
    }
    (ids, numbers)
}

/// Waits until at least `expected` mails with `marker` are in the Maildir (or `timeout`), then a
/// little longer so that a duplicate delivered late would be seen too.
pub async fn wait_for_deliveries(
    peer: &Peer,
    marker: &str,
    expected: usize,
    timeout: Duration,
) -> (HashMap<String, usize>, Vec<usize>) {
    let deadline = Instant::now() + timeout;
    loop {
        let count = peer.find_messages(marker).len();
        if count >= expected || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    delivered(peer, marker)
}

/// Every 2xx was delivered exactly once; no failed request was delivered.
pub fn assert_exactly_once(outcomes: &[Outcome], ids: &HashMap<String, usize>, numbers: &[usize]) {
    let mut missing = Vec::new();
    for o in outcomes.iter().filter(|o| (200..300).contains(&o.status)) {
        let id = o
            .message_id
            .as_deref()
            .expect("a 2xx answer names its messageId");
        match ids.get(id) {
            Some(1) => {}
            Some(n) => panic!("{id} (mail #{}) was delivered {n} times", o.n),
            None => missing.push(id.to_owned()),
        }
    }
    assert!(
        missing.is_empty(),
        "{} accepted mails never arrived, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    for o in outcomes.iter().filter(|o| !(200..300).contains(&o.status)) {
        assert!(
            !numbers.contains(&o.n),
            "mail #{} was answered {} ({:?}) but delivered",
            o.n,
            o.status,
            o.code
        );
    }
    let accepted = outcomes
        .iter()
        .filter(|o| (200..300).contains(&o.status))
        .count();
    assert_eq!(
        ids.len(),
        accepted,
        "the Maildir holds mails with this marker that no 2xx answer named"
    );
}

/// A TCP forwarder from a loopback port of its own to `target`, which a test can take down
/// (listener closed, every forwarded connection cut: connects are refused, like a server
/// that stopped) and bring back on the same port.
pub struct Forwarder {
    pub port: u16,
    target: SocketAddr,
    state: Arc<Mutex<ForwarderState>>,
    /// Connections forwarded now, and the most at once: what the server saw.
    open: Arc<std::sync::atomic::AtomicUsize>,
    peak: Arc<std::sync::atomic::AtomicUsize>,
}

#[derive(Default)]
struct ForwarderState {
    acceptor: Option<JoinHandle<()>>,
    connections: Vec<JoinHandle<()>>,
}

impl Forwarder {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = bind_reusable(0).await;
        let port = listener.local_addr().unwrap().port();
        let forwarder = Self {
            port,
            target,
            state: Arc::default(),
            open: Arc::default(),
            peak: Arc::default(),
        };
        forwarder.accept_on(listener);
        forwarder
    }

    fn accept_on(&self, listener: TcpListener) {
        use std::sync::atomic::Ordering;
        let state = self.state.clone();
        let target = self.target;
        let (open, peak) = (self.open.clone(), self.peak.clone());
        let acceptor = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let (open, peak) = (open.clone(), peak.clone());
                let task = tokio::spawn(async move {
                    let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = inbound.set_nodelay(true);
                        let _ = outbound.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
                let mut state = state.lock().unwrap();
                state.connections.retain(|t| !t.is_finished());
                state.connections.push(task);
            }
        });
        self.state.lock().unwrap().acceptor = Some(acceptor);
    }

    /// The most connections forwarded at once so far.
    pub fn peak(&self) -> usize {
        self.peak.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Connections forwarded now.
    pub fn open(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stop listening and cut every forwarded connection.
    pub async fn down(&self) {
        let (acceptor, connections) = {
            let mut state = self.state.lock().unwrap();
            (
                state.acceptor.take(),
                std::mem::take(&mut state.connections),
            )
        };
        for task in acceptor.into_iter().chain(connections) {
            task.abort();
            let _ = task.await;
        }
    }

    /// Listen again on the same port.
    pub async fn up(&self) {
        let listener = bind_reusable(self.port).await;
        self.accept_on(listener);
    }
}

async fn bind_reusable(port: u16) -> TcpListener {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket
        .bind(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port))
        .unwrap();
    socket.listen(128).unwrap()
}

/// A forwarder that cuts its first `cuts` connections once the client has sent `after` bytes:
/// past the greeting, STARTTLS and AUTH (a few KiB), inside a large message's DATA. The traffic
/// is TLS, so the forwarder counts bytes instead of reading commands.
pub struct CuttingForwarder {
    pub port: u16,
    /// Connections cut so far.
    pub cut: Arc<std::sync::atomic::AtomicUsize>,
    acceptor: JoinHandle<()>,
}

impl CuttingForwarder {
    pub async fn start(target: SocketAddr, after: usize, cuts: usize) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = bind_reusable(0).await;
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicUsize::new(0));
        let counter = cut.clone();
        let acceptor = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut client_read, mut client_write) = inbound.into_split();
                    let (mut server_read, mut server_write) = outbound.into_split();
                    let replies = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                    });
                    let mut sent = 0usize;
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match client_read.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let room = after.saturating_sub(sent);
                        if n > room && counter.load(Ordering::SeqCst) < cuts {
                            counter.fetch_add(1, Ordering::SeqCst);
                            let _ = server_write.write_all(&buf[..room]).await;
                            // Both sides go: the server sees half a message, the relay a reset.
                            replies.abort();
                            return;
                        }
                        sent += n;
                        if server_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = server_write.shutdown().await;
                    let _ = replies.await;
                });
            }
        });
        Self {
            port,
            cut,
            acceptor,
        }
    }
}

impl Drop for CuttingForwarder {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}
