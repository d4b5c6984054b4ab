//! The scripted fakes the tests swap in for a real part: the mail transport ([`FakeSender`]).

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use mail_relay::delivery::{DeliveryError, MailSender, Outbox, Receipt};
use mail_relay::message::OutgoingMail;
use mail_relay::smtp::{SmtpError, Stage};
use tokio::sync::Semaphore;

/// What the fake sender answers to one mail.
#[derive(Clone, Copy)]
pub enum Answer {
    /// The mail is taken: written to the outbox folder when the fake has one, else a `250`
    /// receipt for every recipient.
    Accept,
    /// The send fails with what the function makes. It runs inside the send, so it may also
    /// panic or record something in the request's context, as a real transport could.
    Fail(fn() -> DeliveryError),
}

/// A [`MailSender`] that answers as scripted: the queued one-off answers first, then the
/// standing one. It counts and keeps the mails it was given, and can make each send wait for
/// a delay or for the test to open its gate (to hold a send in flight).
pub struct FakeSender {
    next: Mutex<VecDeque<Answer>>,
    always: Mutex<Answer>,
    outbox: Option<Outbox>,
    gate: Option<Semaphore>,
    delay: Option<Duration>,
    calls: AtomicUsize,
    mails: Mutex<Vec<OutgoingMail>>,
}

impl FakeSender {
    /// Accepts every mail.
    pub fn accepting() -> Self {
        Self::answering(Answer::Accept)
    }

    /// Refuses every mail with the error `make` builds.
    pub fn failing(make: fn() -> DeliveryError) -> Self {
        Self::answering(Answer::Fail(make))
    }

    fn answering(answer: Answer) -> Self {
        Self {
            next: Mutex::new(VecDeque::new()),
            always: Mutex::new(answer),
            outbox: None,
            gate: None,
            delay: None,
            calls: AtomicUsize::new(0),
            mails: Mutex::new(Vec::new()),
        }
    }

    /// Accepted mails are written to `dir` by the real outbox sender, so a test can count them.
    pub fn writing_to(mut self, dir: &Path) -> Self {
        self.outbox = Some(Outbox::new(dir.to_path_buf()));
        self
    }

    /// Each send waits for a permit from [`FakeSender::open`] before it answers.
    pub fn gated(mut self) -> Self {
        self.gate = Some(Semaphore::new(0));
        self
    }

    /// Each send takes `delay` before it answers.
    pub fn delayed(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// The next send (after those already queued) answers `answer`, once.
    pub fn answer_next(&self, answer: Answer) {
        self.next.lock().unwrap().push_back(answer);
    }

    /// From now on every send answers `answer` (after the queued one-off answers).
    pub fn answer_always(&self, answer: Answer) {
        *self.always.lock().unwrap() = answer;
    }

    /// Lets `sends` waiting (or future) sends through the gate.
    pub fn open(&self, sends: usize) {
        self.gate
            .as_ref()
            .expect("open needs a gated fake")
            .add_permits(sends);
    }

    /// The sends that reached the fake, finished or still waiting.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Waits until the fake was reached `count` times (at most 5 s).
    pub async fn until_called(&self, count: usize) {
        for _ in 0..500 {
            if self.calls() >= count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the sender was not reached {count} times");
    }

    /// The mails the fake was given, in order.
    pub fn mails(&self) -> Vec<OutgoingMail> {
        self.mails.lock().unwrap().clone()
    }
}

#[async_trait]
impl MailSender for FakeSender {
    async fn send(&self, mail: &OutgoingMail) -> Result<Receipt, DeliveryError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.mails.lock().unwrap().push(mail.clone());
        if let Some(gate) = &self.gate {
            gate.acquire().await.unwrap().forget();
        }
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
        // Decided after the wait, so that a test can change the answer while a send is held.
        let queued = self.next.lock().unwrap().pop_front();
        let answer = queued.unwrap_or_else(|| *self.always.lock().unwrap());
        match (answer, &self.outbox) {
            (Answer::Fail(make), _) => Err(make()),
            (Answer::Accept, Some(outbox)) => outbox.send(mail).await,
            (Answer::Accept, None) => Ok(Receipt {
                accepted: mail.envelope.to().iter().map(ToString::to_string).collect(),
                server_reply: "250 2.0.0 OK queued".into(),
            }),
        }
    }
}

/// A transient refusal before the server accepted anything: `451 4.3.0` to MAIL FROM.
pub fn try_later() -> DeliveryError {
    DeliveryError::Smtp(SmtpError::rejected(
        Stage::MailFrom("x".into()),
        451,
        "4.3.0 try later",
    ))
}
