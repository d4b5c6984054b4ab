//! The accept loop: the axum router on hyper, with every connection bounded in number, in time
//! without a request, and in the size of a request's head.
//!
//! `axum::serve` gives hyper no timer, and hyper alone times only an HTTP/1 head once it has
//! started: a client that sends nothing, only the HTTP/2 preface, or opens HTTP/2 and then sits
//! idle, would hold a connection and a file descriptor for as long as it likes. Here a connection
//! without a request in progress for `header_read_timeout` is closed, whatever its protocol and
//! whether or not it is known yet; at most `max` connections are open per listener. Otherwise
//! it is what `axum::serve` does: `TCP_NODELAY`, HTTP/1.1 and HTTP/2, the peer's address as
//! `ConnectInfo`, and a graceful stop that lets open requests finish; only protocol upgrades
//! are left out, as no route needs one (no WebSocket).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, watch};
use tower::ServiceExt;

pub use super::connection::Connections;
use super::connection::{Activity, Tracked};
use super::detect::{Protocol, Replayed, detect};
use crate::config::HttpSettings;

/// HTTP/2: a PING after this long without a frame from the client, so that a peer gone away
/// mid-request is noticed...
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// ...and the connection closed when the PING is not answered within this.
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// An idle connection told to close (HTTP/2 GOAWAY) that has not closed after this is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// At most one log line this often about connections refused at the cap.
const REFUSALS_LOGGED_EVERY: Duration = Duration::from_secs(10);
/// The `/metrics` listener's cap: a few scrapers, each with a connection or two.
pub const METRICS_MAX_CONNECTIONS: usize = 32;

/// What each connection may do; from `mailRelay.http.*`.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// How long a connection may go without a request in progress: from being accepted to a
    /// complete request head, and between requests. hyper also applies it to an HTTP/1 head
    /// once begun. It must stay above the upstream keep-alive idle time of reverse proxies
    /// (nginx: 60 s), or they would reuse a connection the relay is closing.
    pub header_read_timeout: Duration,
    /// The request head (HTTP/1) or header list (HTTP/2) at most; hyper answers more with 431.
    pub max_header_bytes: usize,
}

impl From<&HttpSettings> for ConnectionLimits {
    fn from(http: &HttpSettings) -> Self {
        Self {
            header_read_timeout: http.header_read_timeout,
            max_header_bytes: http.max_header_bytes,
        }
    }
}

/// hyper's builders for each protocol, set up once.
#[derive(Clone)]
struct Builders {
    http1: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

impl Builders {
    fn new(limits: ConnectionLimits) -> Self {
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_header_size(limits.max_header_bytes);
        let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(KEEP_ALIVE_TIMEOUT);
        Self { http1, http2 }
    }
}

/// Serve `router` on `listener` until `stop` completes; then accept nothing more and return
/// once every open connection has finished its requests.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    connections: Connections,
    stop: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let builders = Arc::new(Builders::new(limits));
    let (stopping, stopped) = watch::channel(false);
    let mut refusals = Refusals::default();
    let mut stop = pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(slot) = connections.try_open() else {
            // Closed at once: the client learns now, rather than waiting in the backlog.
            drop(stream);
            refusals.note(&connections);
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        let connection = Connection {
            peer,
            router: router.clone(),
            builders: builders.clone(),
            limits,
            stop: stopped.clone(),
            _slot: slot,
        };
        tokio::spawn(connection.run(stream));
    }
    drop(listener);
    let _ = stopping.send(true);
    connections.all_closed().await;
    Ok(())
}

/// One accepted connection and what it needs; its place under the cap is freed when it ends.
struct Connection {
    peer: SocketAddr,
    router: Router,
    builders: Arc<Builders>,
    limits: ConnectionLimits,
    stop: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
}

impl Connection {
    async fn run(mut self, mut stream: TcpStream) {
        let peer = self.peer;
        // The protocol, within the time a request head may take: a client that sends nothing,
        // or the HTTP/2 preface a byte at a time, is closed like a slow HTTP/1 head.
        let detected = tokio::select! {
            detected = tokio::time::timeout(self.limits.header_read_timeout, detect(&mut stream)) => detected,
            _ = self.stop.wait_for(|stop| *stop) => return,
        };
        let (protocol, read) = match detected {
            Ok(Ok(Some(detected))) => detected,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "connection failed before its first request");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "closing a connection that sent no request in time");
                return;
            }
        };
        let io = TokioIo::new(Replayed::new(read, stream));
        let activity = Arc::new(Activity::default());
        let service = {
            let router = self.router.clone();
            let activity = activity.clone();
            hyper::service::service_fn(move |mut request: Request<Incoming>| {
                let busy = activity.begin();
                request
                    .extensions_mut()
                    .insert(ConnectInfo::<SocketAddr>(peer));
                let answer = router.clone().oneshot(request.map(Body::new));
                async move {
                    let response = answer.await?;
                    Ok::<_, Infallible>(response.map(|body| Tracked::new(body, busy)))
                }
            })
        };
        let idle = self.limits.header_read_timeout;
        match protocol {
            Protocol::Http1 => {
                let connection = self.builders.http1.serve_connection(io, service);
                drive(connection, &activity, idle, self.stop, peer).await;
            }
            Protocol::Http2 => {
                let connection = self.builders.http2.serve_connection(io, service);
                drive(connection, &activity, idle, self.stop, peer).await;
            }
        }
    }
}

/// Runs one connection to its end: closed when idle for `idle`, told to finish when the server
/// stops.
async fn drive<C>(
    connection: C,
    activity: &Activity,
    idle: Duration,
    mut stop: watch::Receiver<bool>,
    peer: SocketAddr,
) where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    let mut connection = pin!(connection);
    let mut idle_for = pin!(activity.idle_for(idle));
    let mut stopping = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "connection closed with an error");
                }
                return;
            }
            () = async { let _ = stop.wait_for(|stop| *stop).await; }, if !stopping => {
                stopping = true;
                connection.as_mut().graceful_shutdown();
            }
            () = idle_for.as_mut() => break,
        }
    }
    tracing::debug!(%peer, idle_seconds = idle.as_secs_f64(), "closing an idle connection");
    // HTTP/1 closes at once; HTTP/2 says GOAWAY, which a silent peer never answers.
    connection.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(CLOSE_GRACE, connection.as_mut()).await;
}

/// Connections refused at the cap since the last log line about them.
#[derive(Debug, Default)]
struct Refusals {
    since_logged: u64,
    logged_at: Option<Instant>,
}

impl Refusals {
    fn note(&mut self, connections: &Connections) {
        if let Some(refused) = self.due(Instant::now()) {
            tracing::warn!(
                listener = connections.listener(),
                max_connections = connections.max(),
                refused,
                "connection limit reached: closing new connections at once; raise mailRelay.http.maxConnections (and the file descriptor limit) if this is real traffic"
            );
        }
    }

    /// Counts one refusal at `now`; the number to log when a line is due.
    fn due(&mut self, now: Instant) -> Option<u64> {
        self.since_logged += 1;
        if self
            .logged_at
            .is_some_and(|at| now.saturating_duration_since(at) < REFUSALS_LOGGED_EVERY)
        {
            return None;
        }
        self.logged_at = Some(now);
        Some(std::mem::take(&mut self.since_logged))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_logged_at_most_every_ten_seconds_with_their_count() {
        let mut refusals = Refusals::default();
        let start = Instant::now();
        assert_eq!(refusals.due(start), Some(1), "the first one at once");
        for n in 1..=50 {
            assert_eq!(refusals.due(start + Duration::from_millis(n * 100)), None);
        }
        assert_eq!(
            refusals.due(start + REFUSALS_LOGGED_EVERY),
            Some(51),
            "then all since"
        );
        assert_eq!(refusals.due(start + REFUSALS_LOGGED_EVERY), None);
    }
}
