//! The HTTP application: state, router, middleware, graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use tokio::net::TcpListener;

use crate::admin::AdminNotifier;
use crate::api;
use crate::api::budget::MailBudget;
use crate::caller::Authenticator;
use crate::clock::{Clock, SystemClock};
use crate::config::Settings;
use crate::delivery::MailSender;
use crate::http::drain::InFlight;
use crate::http::serve::{ConnectionLimits, Connections, METRICS_MAX_CONNECTIONS};
use crate::idempotency::Idempotency;
use crate::identity::{Identities, Routed};
use crate::queue::{Queue, QueueDelivery};
use crate::store::Store;
use crate::telemetry::delivery::SendHistory;
use crate::telemetry::metrics::Metrics;
use crate::token::TokenProvider;

mod parts;
mod router;

use router::metrics_router;
pub use router::router;

/// Shared state: cheap to clone, one `Arc` per part.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub sender: Arc<dyn MailSender>,
    pub authenticator: Arc<Authenticator>,
    /// The sending identities, each with its own sender, mailbox limits and Send As checks;
    /// `sender` routes to them by From.
    pub identities: Arc<Identities>,
    /// The default identity's token cache, when its login uses MS_OAUTH.
    pub tokens: Option<Arc<dyn TokenProvider>>,
    pub idempotency: Idempotency,
    /// Where the state replicas share lives (`mailRelay.store.url`).
    pub store: Store,
    /// Queued delivery and its workers; `None` when mails are only sent synchronously (the
    /// memory store, or `mailRelay.delivery.queue: never`).
    pub queue: Option<Queue>,
    /// Administrative e-mails (`mailRelay.adminMail`); the mail handler reports failed sends.
    pub admin: AdminNotifier,
    /// This app's Prometheus registry (`GET /metrics`).
    pub metrics: Arc<Metrics>,
    /// The recent sends, for readiness.
    pub sends: Arc<SendHistory>,
    /// `GET /openapi.json`, built once for this base path.
    pub openapi: bytes::Bytes,
    /// The bytes of mail all requests may hold at once (`mailRelay.limits.maxInFlightBytes`).
    pub budget: MailBudget,
    draining: Arc<AtomicBool>,
    in_flight: InFlight,
    /// The main listener's connections, and the metrics listener's when it has one.
    connections: Connections,
    metrics_connections: Option<Connections>,
}

impl AppState {
    /// The state with the store `settings` name.
    pub fn new(settings: Arc<Settings>, sender: Arc<dyn MailSender>) -> std::io::Result<Self> {
        let store = Store::open(&settings.relay.store).map_err(std::io::Error::other)?;
        Self::with_store(settings, sender, store)
    }

    pub fn with_store(
        settings: Arc<Settings>,
        sender: Arc<dyn MailSender>,
        store: Store,
    ) -> std::io::Result<Self> {
        Self::with_parts(settings, sender, store, &mut parts::TokenCaches::default())
    }

    /// `sender` is the default identity's; the others' are built here, sharing `caches`.
    fn with_parts(
        settings: Arc<Settings>,
        sender: Arc<dyn MailSender>,
        store: Store,
        caches: &mut parts::TokenCaches,
    ) -> std::io::Result<Self> {
        let authenticator = Authenticator::new(&settings.relay.auth)
            .map_err(std::io::Error::other)?
            .with_allowed_origins(&settings.relay.cors.allowed_origins);

        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let metrics = Arc::new(Metrics::new());
        let identities = Arc::new(parts::identities_for(
            &settings, sender, &store, caches, &clock, &metrics,
        )?);
        // Each identity's sender is observed on its own (metrics, readiness); this one routes.
        let sender: Arc<dyn MailSender> = Arc::new(Routed(Arc::clone(&identities)));
        let sends = Arc::clone(&identities.default_identity().sends);
        let idempotency = Idempotency::new(store.idempotency(&settings), Arc::clone(&clock));
        let openapi = serde_json::to_vec(&api::openapi::document_for(&settings.relay.http))
            .map_err(std::io::Error::other)?;
        let admin = AdminNotifier::new(&settings, Arc::clone(&sender));
        let queue = parts::queue_for(
            &settings,
            &store,
            QueueDelivery {
                sender: Arc::clone(&sender),
                identities: Arc::clone(&identities),
                admin: admin.clone(),
                metrics: Arc::clone(&metrics),
                clock,
                explain: api::errors::refusal_problem,
                describe: api::mail_status::describe,
                send_deadline: settings.relay.smtp.send_deadline,
            },
        );
        Ok(Self {
            openapi: openapi.into(),
            budget: MailBudget::new(settings.relay.limits.max_in_flight_bytes),
            admin,
            queue,
            sender,
            authenticator: Arc::new(authenticator),
            identities,
            tokens: None,
            idempotency,
            store,
            metrics,
            sends,
            draining: Arc::new(AtomicBool::new(false)),
            in_flight: InFlight::default(),
            connections: Connections::new("main", settings.relay.http.max_connections),
            metrics_connections: settings
                .relay
                .metrics
                .listen
                .map(|_| Connections::new("metrics", METRICS_MAX_CONNECTIONS)),
            settings,
        })
    }

    /// Why this instance should get no traffic now, if it should not.
    pub fn not_ready_reason(&self) -> Option<String> {
        api::health::check(self).reason
    }

    /// Whether [`AppState::start_draining`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Turn readiness off (on SIGTERM), so load balancers stop sending traffic.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// The requests being served now.
    pub fn in_flight(&self) -> &InFlight {
        &self.in_flight
    }

    /// Each listener's open and refused connections, for `/metrics`.
    pub fn listeners(&self) -> impl Iterator<Item = &Connections> {
        std::iter::once(&self.connections).chain(&self.metrics_connections)
    }
}

/// A bound, ready-to-run server.
pub struct Application {
    listener: TcpListener,
    router: Router,
    state: AppState,
    /// `mailRelay.metrics.port`'s own listener, serving only `/metrics`.
    metrics: Option<(TcpListener, Router)>,
}

impl Application {
    /// Bind first, so that port 0 works in tests and the address is known before serving.
    pub async fn build(settings: Settings) -> std::io::Result<Self> {
        let settings = Arc::new(settings);
        let store = Store::open(&settings.relay.store).map_err(std::io::Error::other)?;
        let mut caches = parts::TokenCaches::default();
        let tokens = parts::token_cache_for(&settings, &mut caches)?;
        let sender = parts::sender_for(&settings, tokens.clone(), &store, &mut caches)?;
        Self::assemble(settings, sender, tokens, store, caches).await
    }

    /// As [`Application::build`], with the mail sender chosen by the caller.
    pub async fn build_with(
        settings: Arc<Settings>,
        sender: Arc<dyn MailSender>,
    ) -> std::io::Result<Self> {
        let store = Store::open(&settings.relay.store).map_err(std::io::Error::other)?;
        Self::assemble(settings, sender, None, store, parts::TokenCaches::default()).await
    }

    async fn assemble(
        settings: Arc<Settings>,
        sender: Arc<dyn MailSender>,
        tokens: Option<Arc<dyn TokenProvider>>,
        store: Store,
        mut caches: parts::TokenCaches,
    ) -> std::io::Result<Self> {
        let listener = bind(settings.server.socket_addr(), "server.address/server.port").await?;
        let mut state = AppState::with_parts(settings, sender, store, &mut caches)?;
        state.tokens = tokens;
        let metrics = match state.settings.relay.metrics.listen {
            Some(address) => Some((
                bind(address, "mailRelay.metrics.address/port").await?,
                metrics_router(state.clone()),
            )),
            None => None,
        };
        let router = router(state.clone());
        Ok(Self {
            listener,
            router,
            state,
            metrics,
        })
    }

    /// Where `/metrics` is served when it has a listener of its own.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
            .as_ref()
            .and_then(|(listener, _)| listener.local_addr().ok())
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serve until `shutdown` completes, then drain: readiness turns 503 at once, requests are
    /// still accepted for `mailRelay.shutdown.drainDelaySeconds`, in-flight requests finish, idle
    /// SMTP connections get `QUIT`. All of that must end within `deadlineSeconds` of `shutdown`;
    /// otherwise the error names what was still running.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let state = self.state.clone();
        let drain = state.settings.relay.shutdown.clone();
        let (signalled, on_signal) = tokio::sync::oneshot::channel::<tokio::time::Instant>();
        let stop_accepting = {
            let state = state.clone();
            async move {
                shutdown.await;
                let _ = signalled.send(tokio::time::Instant::now());
                state.start_draining();
                // Workers claim nothing more; the mails they hold finish below.
                if let Some(queue) = &state.queue {
                    queue.stop();
                }
                tracing::info!(
                    drain_delay_seconds = drain.drain_delay.as_secs(),
                    deadline_seconds = drain.deadline.as_secs(),
                    in_flight = state.in_flight.count(),
                    "shutting down: readiness is 503; still accepting requests for the drain delay"
                );
                tokio::time::sleep(drain.drain_delay).await;
                tracing::info!(
                    in_flight = state.in_flight.count(),
                    "drain delay over: accepting no new connections; finishing in-flight requests"
                );
            }
        };
        // Scrapes go on through the drain; the listener closes when the app is done.
        // Through the same accept loop as the API, so a slow client cannot hold a connection, and
        // with a cap of its own, so that scrapes still get through when the API's is reached.
        let limits = ConnectionLimits::from(&state.settings.relay.http);
        let metrics = self.metrics.map(|(listener, router)| {
            let connections = state
                .metrics_connections
                .clone()
                .unwrap_or_else(|| Connections::new("metrics", METRICS_MAX_CONNECTIONS));
            tokio::spawn(crate::http::serve::serve(
                listener,
                router,
                limits,
                connections,
                std::future::pending(),
            ))
        });
        let stop_metrics = move || {
            if let Some(metrics) = &metrics {
                metrics.abort();
            }
        };
        let serve = crate::http::serve::serve(
            self.listener,
            self.router,
            limits,
            state.connections.clone(),
            stop_accepting,
        );
        tokio::pin!(serve);
        let signalled_at = tokio::select! {
            served = &mut serve => {
                // The server ended without a shutdown signal (an accept error).
                served?;
                state.sender.close().await;
                stop_metrics();
                return Ok(());
            }
            Ok(at) = on_signal => at,
        };
        let deadline = signalled_at + drain.deadline;
        let closing = Arc::new(AtomicBool::new(false));
        let finish = {
            let closing = closing.clone();
            let sender = state.sender.clone();
            let admin = state.admin.clone();
            let queue = state.queue.clone();
            async move {
                serve.await?;
                if let Some(queue) = queue {
                    queue.stopped().await;
                }
                // Every request has finished: tell the administrators, then say QUIT on the
                // idle SMTP connections.
                admin.stopping().await;
                closing.store(true, Ordering::Relaxed);
                sender.close().await;
                std::io::Result::Ok(())
            }
        };
        let outcome = match tokio::time::timeout_at(deadline, finish).await {
            Ok(Ok(())) => {
                tracing::info!("shut down cleanly");
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => {
                let mut running = state.in_flight.describe();
                if closing.load(Ordering::Relaxed) {
                    running.push("closing SMTP connections (QUIT)".into());
                }
                let running = if running.is_empty() {
                    "finishing open connections".to_owned()
                } else {
                    running.join("; ")
                };
                tracing::error!(
                    deadline_seconds = drain.deadline.as_secs(),
                    still_running = %running,
                    "shutdown deadline passed: abandoning what is still running; raise mailRelay.shutdown.deadlineSeconds if sends need longer"
                );
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "mailRelay.shutdown.deadlineSeconds ({} s) passed with work still running: {running}",
                        drain.deadline.as_secs()
                    ),
                ))
            }
        };
        stop_metrics();
        outcome
    }

    /// Serve until SIGTERM or Ctrl-C.
    pub async fn run(self) -> std::io::Result<()> {
        self.run_until(shutdown_signal()).await
    }
}

/// Binds `address`, or says which settings to change.
async fn bind(address: std::net::SocketAddr, keys: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {address} ({keys}): {e}; free the port or change {keys}"),
        )
    })
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
