//! `mailRelay.delivery.mode: auto`: SMTP first, Microsoft Graph for the mailbox while the server
//! refuses SMTP AUTH for a reason only the setup can fix (`535 5.7.139` SMTP AUTH off, `550
//! 5.7.30` Basic authentication refused). Such a refusal comes at login, before any mail is
//! named, so the mail that met it goes out through Graph at once. Every [`RECHECK`] one mail tries
//! SMTP first again; its success ends the fallback. Each switch is logged once, not per mail.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;

use super::{BeforeUpload, DeliveryError, FailureKind, InUse, MailSender, Receipt};
use crate::message::OutgoingMail;

/// How long Graph is used before SMTP is tried again.
pub const RECHECK: Duration = Duration::from_secs(300);

struct FallenBack {
    since: SystemTime,
    next_check: Instant,
}

/// SMTP, with Graph behind it.
pub struct Fallback {
    smtp: Arc<dyn MailSender>,
    graph: Arc<dyn MailSender>,
    mailbox: String,
    recheck: Duration,
    state: Mutex<Option<FallenBack>>,
}

impl Fallback {
    pub fn new(smtp: Arc<dyn MailSender>, graph: Arc<dyn MailSender>, mailbox: String) -> Self {
        Self::with_recheck(smtp, graph, mailbox, RECHECK)
    }

    /// As [`Fallback::new`], trying SMTP again after `recheck` (tests use a short one).
    pub fn with_recheck(
        smtp: Arc<dyn MailSender>,
        graph: Arc<dyn MailSender>,
        mailbox: String,
        recheck: Duration,
    ) -> Self {
        Self {
            smtp,
            graph,
            mailbox,
            recheck,
            state: Mutex::new(None),
        }
    }

    /// Graph is in use and SMTP is not due for another try.
    fn graph_now(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.as_mut() {
            Some(f) if Instant::now() < f.next_check => true,
            Some(f) => {
                // This mail tries SMTP; the others keep using Graph meanwhile.
                f.next_check = Instant::now() + self.recheck;
                false
            }
            None => false,
        }
    }

    fn fall_back(&self, error: &DeliveryError) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.as_mut() {
            Some(f) => f.next_check = Instant::now() + self.recheck,
            None => {
                tracing::warn!(
                    mailbox = %self.mailbox,
                    code = error.code(),
                    %error,
                    "the SMTP server refuses SMTP AUTH for this mailbox: mail goes through Microsoft Graph until an SMTP login succeeds again (tried every {} s)",
                    self.recheck.as_secs()
                );
                *state = Some(FallenBack {
                    since: SystemTime::now(),
                    next_check: Instant::now() + self.recheck,
                });
            }
        }
    }

    fn smtp_works(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.take().is_some() {
            tracing::info!(mailbox = %self.mailbox, "SMTP AUTH works again for this mailbox: mail goes over SMTP again, not through Microsoft Graph");
        }
    }
}

/// Refusals only the setup can fix, met at login: Graph may work where SMTP AUTH does not.
fn smtp_auth_refused(error: &DeliveryError) -> bool {
    matches!(
        error.kind(),
        FailureKind::AuthDisabled | FailureKind::BasicAuthRefused
    )
}

#[async_trait]
impl MailSender for Fallback {
    async fn send(&self, mail: &OutgoingMail) -> Result<Receipt, DeliveryError> {
        self.send_marked(mail, None).await
    }

    async fn send_marked(
        &self,
        mail: &OutgoingMail,
        before_upload: Option<BeforeUpload<'_>>,
    ) -> Result<Receipt, DeliveryError> {
        if self.graph_now() {
            return self.graph.send_marked(mail, before_upload).await;
        }
        match self.smtp.send_marked(mail, before_upload).await {
            Ok(receipt) => {
                self.smtp_works();
                Ok(receipt)
            }
            // Nothing of the mail went out: the login was refused.
            Err(error) if smtp_auth_refused(&error) => {
                self.fall_back(&error);
                self.graph.send_marked(mail, before_upload).await
            }
            Err(error) => Err(error),
        }
    }

    async fn close(&self) {
        self.smtp.close().await;
        self.graph.close().await;
    }

    fn smtp_state(&self) -> Option<crate::smtp::SmtpState> {
        self.smtp.smtp_state()
    }

    fn in_use(&self) -> InUse {
        match &*self.state.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(f) => InUse {
                transport: "graph",
                fallback_since: Some(f.since),
            },
            None => InUse {
                transport: "smtp",
                fallback_since: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::smtp::{SmtpError, Stage};

    /// A transport that answers from a list (then succeeds), counting its sends.
    #[derive(Default)]
    struct Scripted {
        answers: Mutex<VecDeque<&'static str>>,
        sends: AtomicUsize,
    }

    #[async_trait]
    impl MailSender for Scripted {
        async fn send(&self, _: &OutgoingMail) -> Result<Receipt, DeliveryError> {
            self.sends.fetch_add(1, Ordering::SeqCst);
            match self.answers.lock().unwrap().pop_front() {
                None => Ok(Receipt {
                    accepted: vec![],
                    server_reply: "250 ok".into(),
                }),
                Some(reply) => {
                    let code = reply[..3].parse().unwrap();
                    Err(SmtpError::rejected(Stage::Auth, code, reply).into())
                }
            }
        }
    }

    fn mail() -> OutgoingMail {
        let request =
            serde_json::json!({"from": "a@contoso.com", "to": "b@example.com", "text": "x"});
        OutgoingMail::from_request(
            serde_json::from_value(request).unwrap(),
            &crate::message::MessageLimits {
                max_recipients: 10,
                max_message_bytes: 1 << 20,
            },
        )
        .unwrap()
    }

    fn pair(recheck: Duration) -> (Arc<Scripted>, Arc<Scripted>, Fallback) {
        let smtp = Arc::new(Scripted::default());
        let graph = Arc::new(Scripted::default());
        let fallback = Fallback::with_recheck(
            smtp.clone(),
            graph.clone(),
            "relay@contoso.com".into(),
            recheck,
        );
        (smtp, graph, fallback)
    }

    #[tokio::test]
    async fn only_a_refused_smtp_auth_turns_to_graph_and_a_later_smtp_success_turns_back() {
        let (smtp, graph, fallback) = pair(Duration::ZERO);
        // A refusal of another kind is the caller's answer, not a reason for Graph.
        smtp.answers.lock().unwrap().push_back("554 5.7.1 rejected");
        assert!(fallback.send(&mail()).await.is_err());
        assert_eq!(graph.sends.load(Ordering::SeqCst), 0);

        smtp.answers.lock().unwrap().push_back(
            "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled",
        );
        fallback.send(&mail()).await.unwrap();
        assert_eq!(graph.sends.load(Ordering::SeqCst), 1);
        assert_eq!(fallback.in_use().transport, "graph");
        assert!(fallback.in_use().fallback_since.is_some());

        // Due for a recheck at once (recheck zero): SMTP works again and takes the mail.
        fallback.send(&mail()).await.unwrap();
        assert_eq!(smtp.sends.load(Ordering::SeqCst), 3);
        assert_eq!(graph.sends.load(Ordering::SeqCst), 1);
        assert_eq!(fallback.in_use().transport, "smtp");
    }

    #[tokio::test]
    async fn until_the_recheck_every_mail_goes_to_graph_without_trying_smtp() {
        let (smtp, graph, fallback) = pair(Duration::from_secs(3600));
        smtp.answers
            .lock()
            .unwrap()
            .push_back("550 5.7.30 Basic authentication is not supported for Client Submission");
        for _ in 0..3 {
            fallback.send(&mail()).await.unwrap();
        }
        assert_eq!(smtp.sends.load(Ordering::SeqCst), 1);
        assert_eq!(graph.sends.load(Ordering::SeqCst), 3);
    }
}
