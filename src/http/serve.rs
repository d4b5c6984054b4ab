//! The accept loop: the axum router on hyper, with a deadline for reading a request's head.
//!
//! `axum::serve` gives hyper no timer, so a client that sends its request head a byte at a time
//! (slowloris) holds a connection and a file descriptor for as long as it likes. Here every
//! connection gets `header_read_timeout`: a head not complete within it closes the connection.
//! Everything else is as `axum::serve` does it: `TCP_NODELAY`, HTTP/1.1 and HTTP/2, the peer's
//! address as `ConnectInfo`, and a graceful stop that lets open requests finish.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// How long a client may take to send a request's head (request line and headers). hyper runs the
/// same timer while a kept-alive connection waits for its next request, so it must stay above the
/// upstream keep-alive idle time of reverse proxies (nginx: 60 s), or they would reuse a connection
/// the relay is closing.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(75);

/// Serve `router` on `listener` until `stop` completes; then accept nothing more and return
/// once every open connection has finished its requests.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    header_read_timeout: Duration,
    stop: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
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
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            request
                .extensions_mut()
                .insert(ConnectInfo::<SocketAddr>(peer));
            router.clone().oneshot(request.map(Body::new))
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "connection closed with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
