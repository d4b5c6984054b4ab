//! Probes for orchestrators: `/health/live` and `/health/ready`.
//!
//! Liveness only says the process serves HTTP: restarting cannot fix Microsoft 365. Readiness
//! says whether this instance can send now, with each component's state and last error. Both
//! are unauthenticated: an error shows as its kind and codes, never as a server's text (an SMTP
//! reply can repeat `MAIL FROM:<…>` and `RCPT TO:<…>`); the text is in the log.

use std::time::SystemTime;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;

use crate::app::AppState;
use crate::telemetry::delivery::{FAILING_AFTER, FAILING_FOR, FailureSummary};

/// Liveness: the process is serving requests.
#[derive(Debug, Serialize, ToSchema)]
pub struct Live {
    #[schema(example = "ok")]
    pub status: &'static str,
    /// The relay's version.
    #[schema(example = "0.1.0")]
    pub version: &'static str,
}

/// Readiness: whether this instance should receive traffic, and the state of each part.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Ready {
    /// `ready` or `not_ready`.
    #[schema(example = "ready")]
    pub status: &'static str,
    /// Why the instance is not ready; absent when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(
        example = "smtp: the last 3 sends failed: SMTP connection to smtp.office365.com failed at connect: connection refused"
    )]
    pub reason: Option<String>,
    /// The instance is shutting down (SIGTERM): it finishes what it has and takes nothing new.
    pub draining: bool,
    pub components: Components,
}

/// An error as the probe shows it: what kind it is and the codes, without the server's text.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorSummary {
    /// The stable code: an SMTP kind (`smtp_unavailable`, `smtp_auth_failed`, `smtp_thread_limit`,
    /// …), `outbox_unwritable`, or a token code (`token_invalid_client_secret`, …).
    #[schema(example = "smtp_unavailable")]
    pub kind: &'static str,
    /// Where in the SMTP dialogue: `connect`, `greeting`, `starttls`, `auth`, `mail_from`,
    /// `rcpt_to`, `data`, `end_of_data`, `reuse`.
    #[schema(example = "mail_from")]
    pub stage: Option<&'static str>,
    /// The SMTP server's reply code, when it answered.
    #[schema(example = 421)]
    pub reply_code: Option<u16>,
    /// Its enhanced status code, when it gave one.
    #[schema(example = "4.3.2")]
    pub enhanced_code: Option<String>,
}

impl From<FailureSummary> for ErrorSummary {
    fn from(failure: FailureSummary) -> Self {
        Self {
            kind: failure.kind,
            stage: failure.stage,
            reply_code: failure.reply_code,
            enhanced_code: failure.enhanced_code,
        }
    }
}

impl ErrorSummary {
    fn code(kind: &'static str) -> Self {
        Self {
            kind,
            stage: None,
            reply_code: None,
            enhanced_code: None,
        }
    }
}

/// Each part readiness depends on.
#[derive(Debug, Serialize, ToSchema)]
pub struct Components {
    pub token: TokenComponent,
    /// The default identity's transport.
    pub smtp: SmtpComponent,
    pub store: StoreComponent,
    /// Every sending identity, the default first (`mailRelay.identities`).
    pub identities: Vec<IdentityComponent>,
}

/// One sending identity: its mailbox, transport and recent sends. One failing identity does
/// not make the instance unready while another still sends.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IdentityComponent {
    #[schema(example = "default")]
    pub name: String,
    /// The mailbox it sends as (`smtpUsername`).
    #[schema(example = "noreply@contoso.com")]
    pub mailbox: String,
    /// `failing` as for `smtp`, for this identity's sends alone.
    pub status: ComponentStatus,
    /// `smtp`, `graph` or `outbox`.
    #[schema(example = "smtp")]
    pub transport: &'static str,
    /// Open SMTP connections of its pool; absent without SMTP delivery.
    pub open_connections: Option<usize>,
    /// Its last relay-side send error, however old.
    pub last_error: Option<ErrorSummary>,
}

/// `ok`, `failing`, or `unused` (the settings do not need this part).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ComponentStatus {
    Ok,
    Failing,
    Unused,
}

/// The Entra ID access token cache (SMTP login with `MS_OAUTH`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenComponent {
    /// `failing` when there is no valid token and the last fetch failed; never having needed
    /// one yet is `ok`.
    pub status: ComponentStatus,
    /// Seconds until the cached token expires; absent without a valid token.
    #[schema(example = 3125)]
    pub expires_in_seconds: Option<u64>,
    /// The last fetch's error, until a fetch succeeds.
    pub last_error: Option<ErrorSummary>,
    /// Requests to the token endpoint so far, failed ones included.
    #[schema(example = 2)]
    pub fetch_count: u64,
}

/// The SMTP side (or the outbox in development).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SmtpComponent {
    /// `failing` when the last 3 sends all failed on the relay's side (connection, TLS, login,
    /// the mailbox; not a refusal of one mail) and the last of them is less than 60 s old.
    pub status: ComponentStatus,
    /// Open SMTP connections, in use or idle; absent without SMTP delivery.
    #[schema(example = 1)]
    pub open_connections: Option<usize>,
    /// The last relay-side send error, however old.
    pub last_error: Option<ErrorSummary>,
    /// When it happened (RFC 3339).
    #[schema(example = "2026-11-26T08:15:00Z")]
    pub last_error_at: Option<String>,
    /// Mails the server took, and sends that failed, since start (SMTP delivery only).
    pub sent: Option<u64>,
    pub failed: Option<u64>,
    /// The transport carrying mail now: `smtp`, `graph` or `outbox`.
    #[schema(example = "smtp")]
    pub transport: &'static str,
    /// With `mailRelay.delivery.mode: auto`: since when Microsoft Graph stands in because the
    /// server refuses SMTP AUTH (RFC 3339); absent while SMTP works.
    #[schema(example = "2026-12-03T08:15:00Z")]
    pub graph_fallback_since: Option<String>,
}

/// Where shared state lives (`mailRelay.store.url`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoreComponent {
    /// `memory`, `sqlite` or `postgres`.
    #[schema(example = "postgres")]
    pub kind: &'static str,
    /// `failing` while the database does not answer or its schema is not applied; `ok` for
    /// memory.
    pub status: ComponentStatus,
    /// The newest schema version applied; absent for memory or before the first migration.
    #[schema(example = 20261202000001i64)]
    pub schema_version: Option<i64>,
    /// How long the last ping took, in milliseconds.
    #[schema(example = 1.2)]
    pub ping_ms: Option<f64>,
    /// `store_unavailable` or `store_schema_not_applied` while failing (the log has the cause).
    pub last_error: Option<ErrorSummary>,
}

/// The readiness report for `state`.
pub fn check(state: &AppState) -> Ready {
    let token = token_component(state);
    let smtp = smtp_component(state);
    let store = store_component(state);
    let draining = state.is_draining();
    let reason = if draining {
        Some("draining: the instance is shutting down".to_string())
    } else if let Some(error) = &store.last_error {
        Some(format!("store: {}", error.kind))
    } else if token.status == ComponentStatus::Failing {
        Some(format!(
            "token: no valid access token: {}",
            token
                .last_error
                .as_ref()
                .map_or("the last fetch failed", |e| e.kind)
        ))
    } else {
        // Ready while any identity still sends: the failing ones say so in their component.
        let failing: Option<Vec<_>> = state
            .identities
            .iter()
            .map(|identity| identity.sends.failing())
            .collect();
        failing
            .and_then(|errors| errors.into_iter().next())
            .map(|error| {
                let whose = if state.identities.several() {
                    "every identity's"
                } else {
                    "the"
                };
                format!(
                    "smtp: {whose} last {FAILING_AFTER} sends failed within {}s: {error}",
                    FAILING_FOR.as_secs()
                )
            })
    };
    Ready {
        status: if reason.is_none() {
            "ready"
        } else {
            "not_ready"
        },
        reason,
        draining,
        components: Components {
            token,
            smtp,
            store,
            identities: identity_components(state),
        },
    }
}

fn token_component(state: &AppState) -> TokenComponent {
    let Some(tokens) = &state.tokens else {
        return TokenComponent {
            status: ComponentStatus::Unused,
            expires_in_seconds: None,
            last_error: None,
            fetch_count: 0,
        };
    };
    let tokens = tokens.state();
    let expires_in = tokens
        .expires_at
        .and_then(|at| at.duration_since(SystemTime::now()).ok());
    let status = match (expires_in, &tokens.last_error) {
        (None, Some(_)) => ComponentStatus::Failing,
        _ => ComponentStatus::Ok,
    };
    TokenComponent {
        status,
        expires_in_seconds: expires_in.map(|d| d.as_secs()),
        last_error: tokens
            .last_error
            .is_some()
            .then(|| ErrorSummary::code(tokens.last_error_code.unwrap_or("token_unavailable"))),
        fetch_count: tokens.fetch_count,
    }
}

fn store_component(state: &AppState) -> StoreComponent {
    let Some(store) = state.store.state() else {
        return StoreComponent {
            kind: "memory",
            status: ComponentStatus::Ok,
            schema_version: None,
            ping_ms: None,
            last_error: None,
        };
    };
    let error = if !store.migrated {
        Some("store_schema_not_applied")
    } else if !store.reachable {
        Some("store_unavailable")
    } else {
        None
    };
    StoreComponent {
        kind: store.kind,
        status: if error.is_some() {
            ComponentStatus::Failing
        } else {
            ComponentStatus::Ok
        },
        schema_version: store.schema_version,
        ping_ms: store.ping.map(|d| d.as_secs_f64() * 1000.0),
        last_error: error.map(ErrorSummary::code),
    }
}

fn smtp_component(state: &AppState) -> SmtpComponent {
    let pool = state.sender.smtp_state();
    let in_use = state.sender.in_use();
    let last = state.sends.last_error();
    SmtpComponent {
        status: if state.sends.failing().is_some() {
            ComponentStatus::Failing
        } else {
            ComponentStatus::Ok
        },
        open_connections: pool.as_ref().map(|p| p.open_connections),
        last_error_at: last.as_ref().map(|(at, _)| rfc3339(*at)),
        last_error: last.map(|(_, e)| e.into()),
        sent: pool.as_ref().map(|p| p.sent),
        failed: pool.as_ref().map(|p| p.failed),
        transport: in_use.transport,
        graph_fallback_since: in_use.fallback_since.map(rfc3339),
    }
}

fn identity_components(state: &AppState) -> Vec<IdentityComponent> {
    state
        .identities
        .iter()
        .map(|identity| IdentityComponent {
            name: identity.name.to_string(),
            mailbox: identity.mailbox.clone(),
            status: if identity.sends.failing().is_some() {
                ComponentStatus::Failing
            } else {
                ComponentStatus::Ok
            },
            transport: identity.sender.in_use().transport,
            open_connections: identity.sender.smtp_state().map(|p| p.open_connections),
            last_error: identity.sends.last_error().map(|(_, e)| e.into()),
        })
        .collect()
}

fn rfc3339(at: SystemTime) -> String {
    time::OffsetDateTime::from(at)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The process is up and serving.
#[utoipa::path(get, path = "/health/live", tag = "health",
    responses((status = 200, description = "The process serves requests", body = Live)))]
pub async fn live() -> Json<Live> {
    Json(Live {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
    })
}

/// Whether this instance can send now: not draining, an access token at hand (or none needed
/// yet), and the SMTP side not failing.
#[utoipa::path(get, path = "/health/ready", tag = "health",
    responses(
        (status = 200, description = "Ready for traffic", body = Ready),
        (status = 503, description = "Not ready: draining, no access token after a failed fetch, or the SMTP side failing; `reason` and the components say which", body = Ready),
    ))]
pub async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    let report = check(&state);
    if report.components.token.status == ComponentStatus::Failing
        && let Some(tokens) = state.tokens.clone()
    {
        // Not ready means no traffic, and without traffic nobody would fetch a token again:
        // the probe asks for one in the background (the cache's back-off bounds how often),
        // so that the instance turns ready by itself once Entra ID answers.
        tokio::spawn(async move {
            let _ = tokens.token().await;
        });
    }
    let status = if report.reason.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report))
}
