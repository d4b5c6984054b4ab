//! `SmtpSender`: hands mail to the SMTP server, with retries (`delivery` puts it behind
//! `MailSender`).

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant, SystemTime};

use lettre::transport::smtp::extension::ClientId;
use rand::Rng as _;

use super::classify::SmtpErrorKind;
use super::connect::{Connector, Login};
use super::connection::Connection;
use super::error::{SmtpError, SmtpReply, Stage};
use super::pool::Pool;
use super::slots::{ConnectionSlots, SHARED_MAX_IDLE, SLOT_POLL};
use super::tls::TlsSetup;
use super::{BeforeUpload, SmtpReceipt};
use crate::config::{Encryption, Settings, SmtpAuthentication};
use crate::message::OutgoingMail;
use crate::token::{AccessToken, TokenProvider};

/// A connection idle this long gets a `NOOP` before reuse; a fresher one is used as is.
const CHECK_AFTER_IDLE: Duration = Duration::from_secs(10);
/// A connection idle this long is quit rather than reused (servers drop idle sessions,
/// and an idle session still counts against Exchange's 3 per mailbox).
const MAX_IDLE: Duration = Duration::from_secs(60);
/// A connection whose token expires within this is not reused.
const TOKEN_MARGIN: Duration = Duration::from_secs(60);
/// How long a refused login stands as the answer for the same credentials. A login refused
/// after the token was already replaced once (or SMTP AUTH switched off, or a wrong password)
/// points at the setup, which does not change within seconds; trying again for every mail would
/// cost a token fetch and two refused logins each (and can lock out a BASIC account).
const REFUSED_LOGIN_STANDS: Duration = Duration::from_secs(30);

/// What health and metrics show of the SMTP side.
#[derive(Debug, Clone, Default)]
pub struct SmtpState {
    /// Open connections, in use or idle.
    pub open_connections: usize,
    pub idle_connections: usize,
    /// Mails the server took.
    pub sent: u64,
    /// Sends that failed (after retries). The last failure is in `telemetry::SendHistory`.
    pub failed: u64,
}

/// Delivers mail over SMTP through a small pool of authenticated connections.
/// Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct SmtpSender {
    inner: Arc<Inner>,
}

struct Inner {
    connector: Connector,
    pool: Pool,
    tokens: Option<Arc<dyn TokenProvider>>,
    send_deadline: Duration,
    sent: AtomicU64,
    failed: AtomicU64,
    refused_login: Mutex<Option<RefusedLogin>>,
    /// The mailbox's slots shared with other replicas; `None`: this replica's cap is the cap.
    slots: Option<Arc<dyn ConnectionSlots>>,
    /// Idle connections are closed after this (short when slots are shared).
    max_idle: Duration,
}

/// A login the server refused for a reason only the setup can fix.
struct RefusedLogin {
    /// The token it was refused with (`None`: BASIC or no login).
    token: Option<AccessToken>,
    kind: SmtpErrorKind,
    reply: SmtpReply,
    at: Instant,
}

impl SmtpSender {
    /// Checks the settings and prepares TLS; connects only when the first mail comes.
    /// `tokens` is required for `MS_OAUTH`.
    pub fn new(
        settings: &Settings,
        tokens: Option<Arc<dyn TokenProvider>>,
    ) -> Result<Self, SmtpError> {
        Self::with_slots(settings, tokens, None)
    }

    /// As [`SmtpSender::new`], opening connections only with one of `slots` (shared by every
    /// replica), and closing idle ones after [`SHARED_MAX_IDLE`] so that others get theirs.
    pub fn with_slots(
        settings: &Settings,
        tokens: Option<Arc<dyn TokenProvider>>,
        slots: Option<Arc<dyn ConnectionSlots>>,
    ) -> Result<Self, SmtpError> {
        let tuning = &settings.relay.smtp;
        if tuning.max_connections == 0 {
            return Err(SmtpError::Setup {
                key: "mailRelay.smtp.maxConnections",
                message: "must be at least 1 (Exchange Online allows 3 per mailbox)".into(),
            });
        }
        let connector = Connector::from_settings(settings, tokens.is_some())?;
        let inner = Arc::new(Inner {
            connector,
            pool: Pool::new(tuning.max_connections),
            tokens,
            send_deadline: tuning.send_deadline,
            sent: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            refused_login: Mutex::new(None),
            max_idle: if slots.is_some() {
                SHARED_MAX_IDLE
            } else {
                MAX_IDLE
            },
            slots,
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(reap_idle(Arc::downgrade(&inner)));
        }
        Ok(Self { inner })
    }

    /// Sends one mail, retrying within `mailRelay.smtp.sendDeadlineSeconds` as the module doc says.
    pub async fn send_mail(&self, mail: &OutgoingMail) -> Result<SmtpReceipt, SmtpError> {
        self.send_mail_marked(mail, None).await
    }

    /// As [`SmtpSender::send_mail`], asking `before_upload` right before DATA.
    ///
    /// The span and the success line are debug detail: the caller's own line reports each mail
    /// at info (the request's line, or the queue's "queued mail sent"), and its span (the request's
    /// id, the queued mail's id) gives context to what this logs. At info they cost nothing, and a
    /// span and a line per mail were a tenth of the relay's CPU (issue 16).
    #[tracing::instrument(level = "debug", name = "smtp_send", skip_all, fields(mail_id = %mail.id, message_id = %mail.message_id))]
    pub async fn send_mail_marked(
        &self,
        mail: &OutgoingMail,
        before_upload: Option<BeforeUpload<'_>>,
    ) -> Result<SmtpReceipt, SmtpError> {
        let result = self.inner.send_with_retries(mail, before_upload).await;
        match &result {
            Ok(receipt) => {
                self.inner.sent.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(reply = %receipt.server_reply, "SMTP server took the mail");
            }
            Err(error) => {
                self.inner.failed.fetch_add(1, Ordering::Relaxed);
                // The request's own log line reports the failure (once); this is detail.
                tracing::debug!(kind = %error.kind(), error = %error, "SMTP send failed");
            }
        }
        result
    }

    /// Quits the idle connections and keeps no more (for shutdown); sends in flight finish.
    pub async fn close(&self) {
        for connection in self.inner.pool.close() {
            connection.quit().await;
        }
    }

    pub fn state(&self) -> SmtpState {
        SmtpState {
            open_connections: self.inner.connector.open.load(Ordering::Relaxed),
            idle_connections: self.inner.pool.idle_count(),
            sent: self.inner.sent.load(Ordering::Relaxed),
            failed: self.inner.failed.load(Ordering::Relaxed),
        }
    }
}

impl Inner {
    async fn send_with_retries(
        &self,
        mail: &OutgoingMail,
        before_upload: Option<BeforeUpload<'_>>,
    ) -> Result<SmtpReceipt, SmtpError> {
        if let Some(refused) = self.standing_refusal().await {
            return Err(refused);
        }
        let deadline = Instant::now() + self.send_deadline;
        let mut last: Option<SmtpError> = None;
        let mut token_retried = false;
        let mut transient_failures = 0u32;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            // Only the first refusal drops the token: a fresh token refused too points at
            // the tenant's setup, and stands for a while (`REFUSED_LOGIN_STANDS`).
            let uploading = AtomicBool::new(false);
            let attempt = self.attempt(mail, !token_retried, &uploading, before_upload);
            let error = match tokio::time::timeout(remaining, attempt).await {
                Ok(Ok(receipt)) => return Ok(receipt),
                Ok(Err(error)) => error,
                Err(_) => {
                    return Err(SmtpError::Deadline {
                        deadline: self.send_deadline,
                        last: last.map(Box::new),
                        // Cut off while the server was getting the mail: it may have it.
                        after_upload: uploading.load(Ordering::Relaxed),
                    });
                }
            };
            let kind = error.kind();
            if kind == SmtpErrorKind::AuthFailed && self.token_source().is_some() && !token_retried
            {
                // The token was dropped from the cache in `attempt`: one more try with a new one.
                tracing::warn!(error = %error, "XOAUTH2 token refused; retrying once with a new token");
                token_retried = true;
                last = Some(error);
                continue;
            }
            if !error.is_transient()
                || matches!(
                    error,
                    SmtpError::Token(_) | SmtpError::Slots(_) | SmtpError::Halted(_)
                )
                || error.outcome_unknown()
            {
                // Token errors: the cache does its own retrying.
                return Err(error);
            }
            transient_failures += 1;
            let pause = backoff(transient_failures, kind == SmtpErrorKind::ThreadLimit);
            if Instant::now() + pause >= deadline {
                return Err(error);
            }
            tracing::info!(error = %error, ?pause, "transient SMTP failure; retrying");
            last = Some(error);
            tokio::time::sleep(pause).await;
        }
    }

    /// One try: a turn in the pool, a connection (reused or new), one transaction.
    async fn attempt(
        &self,
        mail: &OutgoingMail,
        invalidate_refused_token: bool,
        uploading: &AtomicBool,
        before_upload: Option<BeforeUpload<'_>>,
    ) -> Result<SmtpReceipt, SmtpError> {
        let _turn = self.pool.turn().await;
        let token = match self.token_source() {
            Some(tokens) => Some(tokens.token().await?),
            None => None,
        };
        let mut connection = match self.connection(token.as_ref()).await {
            Ok(connection) => connection,
            Err(error) => {
                match (error.kind(), &self.tokens, &token) {
                    (SmtpErrorKind::AuthFailed, Some(tokens), Some(token), ..)
                        if invalidate_refused_token =>
                    {
                        tokens.invalidate(token);
                    }
                    _ => self.remember_refused_login(&error, token),
                }
                return Err(error);
            }
        };
        match connection.send(mail, uploading, before_upload).await {
            Ok(receipt) => {
                self.check_in(connection).await;
                Ok(receipt)
            }
            Err(error) => {
                // Send-as denied and other refusals end one transaction, not the session.
                if error.leaves_connection_usable() && connection.reset().await.is_ok() {
                    self.check_in(connection).await;
                }
                Err(error)
            }
        }
    }

    /// A connection for one send: an idle one fit for reuse, or a new one. With shared
    /// slots a new one needs a free slot first; until there is one, the send looks again at
    /// both (bounded by the send's deadline around it), so a connection of its own replica
    /// coming back serves it as soon as a slot would.
    async fn connection(&self, token: Option<&AccessToken>) -> Result<Connection, SmtpError> {
        loop {
            if let Some(connection) = self.reusable_connection(token).await {
                return Ok(connection);
            }
            let Some(slots) = &self.slots else {
                return self.connector.open(token).await;
            };
            if let Some(slot) = slots.try_acquire().await.map_err(SmtpError::Slots)? {
                let mut connection = self.connector.open(token).await?;
                connection.slot = Some(slot);
                return Ok(connection);
            }
            tokio::time::sleep(SLOT_POLL).await;
        }
    }

    /// Where XOAUTH2 logins get their tokens; `None` for other logins.
    fn token_source(&self) -> Option<&Arc<dyn TokenProvider>> {
        match (&self.tokens, &self.connector.login) {
            (Some(tokens), Login::XOAuth2 { .. }) => Some(tokens),
            _ => None,
        }
    }

    /// The refusal of the current credentials, while it stands ([`REFUSED_LOGIN_STANDS`]).
    async fn standing_refusal(&self) -> Option<SmtpError> {
        let (kind, reply, refused_token) = {
            let refused = self
                .refused_login
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let refused = refused
                .as_ref()
                .filter(|r| r.at.elapsed() < REFUSED_LOGIN_STANDS)?;
            (refused.kind, refused.reply.clone(), refused.token.clone())
        };
        let current = match self.token_source() {
            Some(tokens) => tokens.token().await.ok(),
            None => None,
        };
        let same = match (&current, &refused_token) {
            (None, None) => true,
            (Some(current), Some(refused)) => current.same_as(refused),
            _ => false,
        };
        same.then_some(SmtpError::Rejected {
            kind,
            stage: Stage::Auth,
            reply,
        })
    }

    /// Keeps a login refusal that only the setup can fix, so the next mails fail at once.
    fn remember_refused_login(&self, error: &SmtpError, token: Option<AccessToken>) {
        let SmtpError::Rejected {
            kind,
            stage: Stage::Auth,
            reply,
        } = error
        else {
            return;
        };
        if !matches!(
            kind,
            SmtpErrorKind::AuthFailed
                | SmtpErrorKind::SmtpAuthDisabled
                | SmtpErrorKind::BasicAuthRefused
        ) {
            return;
        }
        // The error itself is in the failed request's own log line.
        tracing::warn!(
            kind = %kind,
            "SMTP login refused; mails fail at once with the same error for {} s before the next login",
            REFUSED_LOGIN_STANDS.as_secs()
        );
        *self
            .refused_login
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(RefusedLogin {
            token,
            kind: *kind,
            reply: reply.clone(),
            at: Instant::now(),
        });
    }

    async fn check_in(&self, connection: Connection) {
        if let Some(connection) = self.pool.put_back(connection) {
            connection.quit().await;
        }
    }

    /// An idle connection fit for reuse: logged in with the current token, not idle too
    /// long, and answering `NOOP` if it sat for a while. Unfit ones are quit.
    async fn reusable_connection(&self, token: Option<&AccessToken>) -> Option<Connection> {
        while let Some(mut connection) = self.pool.take_idle() {
            let token_fit = match (token, &connection.token) {
                (None, None) => true,
                (Some(current), Some(used)) => {
                    current.same_as(used) && used.expires_at() > SystemTime::now() + TOKEN_MARGIN
                }
                _ => false,
            };
            let idle = connection.last_used.elapsed();
            if !token_fit || idle > self.max_idle {
                tracing::debug!(token_fit, ?idle, "retiring an idle SMTP connection");
                connection.quit().await;
                continue;
            }
            if idle > CHECK_AFTER_IDLE && connection.noop().await.is_err() {
                continue;
            }
            return Some(connection);
        }
        None
    }
}

impl Connector {
    /// Everything needed to open connections to `featureSwitches.sendEmail`'s server; checks
    /// the settings and prepares TLS. `has_tokens`: a token source exists (required for MS_OAUTH).
    pub(crate) fn from_settings(settings: &Settings, has_tokens: bool) -> Result<Self, SmtpError> {
        let email = &settings.send_email;
        let tuning = &settings.relay.smtp;
        let login = match &email.smtp_authentication {
            SmtpAuthentication::None => Login::None,
            SmtpAuthentication::Basic { username, password } => Login::Basic {
                username: username.clone(),
                password: password.clone(),
            },
            SmtpAuthentication::MsOAuth { username, .. } => {
                if !has_tokens {
                    return Err(SmtpError::Setup {
                        key: "featureSwitches.sendEmail.smtpAuthentication",
                        message: "MS_OAUTH needs the token cache, and none was given".into(),
                    });
                }
                Login::XOAuth2 {
                    username: username.to_string(),
                }
            }
        };
        if email.smtp_encryption == Encryption::None
            && !matches!(login, Login::None)
            && !crate::config::is_loopback_host(&email.smtp_server)
        {
            return Err(SmtpError::Setup {
                key: "featureSwitches.sendEmail.smtpEncryption",
                message: format!(
                    "NONE would send the credentials in clear text to {}: use TLS (STARTTLS) \
                     or SSL; NONE is allowed only with smtpAuthentication NONE or on loopback",
                    email.smtp_server
                ),
            });
        }
        if email.smtp_encryption == Encryption::Ssl
            && email
                .smtp_server
                .to_ascii_lowercase()
                .ends_with("office365.com")
        {
            tracing::warn!(
                server = %email.smtp_server,
                "smtpEncryption SSL (implicit TLS) does not work with Exchange Online, which \
                 offers only STARTTLS on port 587: use smtpEncryption TLS"
            );
        }
        let tls = match email.smtp_encryption {
            Encryption::None => None,
            Encryption::Ssl | Encryption::Tls => Some(TlsSetup::new(
                &email.smtp_server,
                tuning.ca_file.as_deref(),
            )?),
        };
        let hello = match &tuning.hello_name {
            Some(name) => match name.parse::<IpAddr>() {
                Ok(IpAddr::V4(ip)) => ClientId::Ipv4(ip),
                Ok(IpAddr::V6(ip)) => ClientId::Ipv6(ip),
                Err(_) => ClientId::Domain(name.clone()),
            },
            None => ClientId::default(),
        };
        Ok(Connector {
            host: email.smtp_server.clone(),
            port: email.smtp_port,
            encryption: email.smtp_encryption,
            login,
            tls,
            hello,
            source_address: tuning.source_address,
            connect_timeout: tuning.connect_timeout,
            command_timeout: tuning.command_timeout,
            open: Arc::new(AtomicUsize::new(0)),
        })
    }
}

/// Closes connections that sat idle too long, so they do not hold one of the mailbox's
/// few sessions for nothing. Ends when the sender is gone.
async fn reap_idle(inner: Weak<Inner>) {
    let Some(max_idle) = inner.upgrade().map(|i| i.max_idle) else {
        return;
    };
    let mut tick = tokio::time::interval(max_idle / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        // Closed at once, without QUIT: a QUIT taking its time here would leave room for a
        // send to open one more session than the mailbox's limit.
        drop(inner.pool.take_where(|c| c.last_used.elapsed() > max_idle));
    }
}

/// Exponential back-off with jitter; longer for Exchange's thread limit.
fn backoff(failures: u32, thread_limit: bool) -> Duration {
    let (base, cap) = if thread_limit {
        (Duration::from_millis(500), Duration::from_secs(5))
    } else {
        (Duration::from_millis(100), Duration::from_secs(2))
    };
    let full = base
        .saturating_mul(1u32 << failures.saturating_sub(1).min(10))
        .min(cap);
    // Half fixed, half random: spreads retries of concurrent sends apart.
    let half = full / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::Stage;

    #[test]
    fn backoff_grows_and_stays_capped() {
        for failures in 1..20 {
            let pause = backoff(failures, false);
            assert!(pause <= Duration::from_secs(2), "{failures}: {pause:?}");
            assert!(pause >= Duration::from_millis(50), "{failures}: {pause:?}");
        }
        assert!(backoff(6, false) >= Duration::from_secs(1));
        assert!(backoff(1, true) >= Duration::from_millis(250));
        assert!(backoff(20, true) <= Duration::from_secs(5));
    }

    #[test]
    fn only_a_lost_final_reply_is_outcome_unknown() {
        let lost = SmtpError::Connection {
            kind: SmtpErrorKind::Transient,
            stage: Stage::EndOfData,
            server: "s:1".into(),
            detail: "reset".into(),
        };
        assert!(lost.outcome_unknown());
        let refused = SmtpError::rejected(Stage::EndOfData, 451, "4.3.0 later");
        assert!(!refused.outcome_unknown());
    }
}
