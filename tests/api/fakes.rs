//! The scripted fakes the tests swap in for the two parts a test must replace: the mail
//! transport ([`FakeSender`]) and the token source ([`FakeTokens`]).

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use mail_relay::delivery::{DeliveryError, MailSender, Outbox, Receipt};
use mail_relay::message::OutgoingMail;
use mail_relay::smtp::{SmtpError, Stage};
use mail_relay::token::{AccessToken, TokenError, TokenProvider, TokenState};
use secrecy::SecretString;
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

type Mint = Box<dyn Fn(usize) -> Result<String, TokenError> + Send + Sync>;

/// A [`TokenProvider`] that hands out what its `mint` makes for the n-th fetch (from 1), valid
/// for a given lifetime. Like the real cache it keeps the token until it is invalidated (or
/// [`FakeTokens::rotate`]d); it counts fetches and invalidations.
pub struct FakeTokens {
    mint: Mint,
    lifetime: Duration,
    cached: bool,
    current: Mutex<Option<AccessToken>>,
    fetches: AtomicUsize,
    invalidated: AtomicUsize,
}

impl FakeTokens {
    /// Tokens from `mint`, each valid for `lifetime`.
    pub fn new(
        lifetime: Duration,
        mint: impl Fn(usize) -> Result<String, TokenError> + Send + Sync + 'static,
    ) -> Self {
        Self {
            mint: Box::new(mint),
            lifetime,
            cached: true,
            current: Mutex::new(None),
            fetches: AtomicUsize::new(0),
            invalidated: AtomicUsize::new(0),
        }
    }

    /// `token-1`, `token-2`, ..., valid for an hour.
    pub fn numbered() -> Self {
        Self::new(Duration::from_secs(3600), |n| Ok(format!("token-{n}")))
    }

    /// Every fetch fails with the error `make` builds.
    pub fn failing(make: fn() -> TokenError) -> Self {
        Self::new(Duration::from_secs(3600), move |_| Err(make()))
    }

    /// Keeps nothing: every call fetches a new token, and invalidating does nothing.
    pub fn uncached(mut self) -> Self {
        self.cached = false;
        self
    }

    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    pub fn invalidated(&self) -> usize {
        self.invalidated.load(Ordering::SeqCst)
    }

    /// Replaces the cached token with a new one, as the real cache does before expiry.
    pub fn rotate(&self) {
        *self.current.lock().unwrap() = None;
    }
}

#[async_trait]
impl TokenProvider for FakeTokens {
    async fn token(&self) -> Result<AccessToken, TokenError> {
        let mut current = self.current.lock().unwrap();
        if let Some(token) = current.as_ref() {
            return Ok(token.clone());
        }
        let n = self.fetches.fetch_add(1, Ordering::SeqCst) + 1;
        let secret = (self.mint)(n)?;
        let token = AccessToken::new(
            SecretString::from(secret),
            SystemTime::now() + self.lifetime,
        );
        if self.cached {
            *current = Some(token.clone());
        }
        Ok(token)
    }

    fn invalidate(&self, token: &AccessToken) {
        let mut current = self.current.lock().unwrap();
        if current.as_ref().is_some_and(|c| c.same_as(token)) {
            *current = None;
            self.invalidated.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn state(&self) -> TokenState {
        TokenState {
            fetch_count: self.fetches() as u64,
            ..TokenState::default()
        }
    }
}
