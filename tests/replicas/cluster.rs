//! Replicas of the real binary in front of the SMTP peer, and what the tests ask them.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::entra::FakeEntra;
use crate::helpers::TEST_API_KEY;
use crate::peer::Peer;
use crate::process::{RelayProcess, smtp_yaml};

/// `mailRelay.rateLimits` with every limit off (indent 2, under `mailRelay:`).
pub const RATE_LIMITS_OFF: &str = "  rateLimits:\n    mailboxMessagesPerMinute: 0\n    \
     mailboxRecipientsPerDay: 0\n    callerMessagesPerMinute: 0\n    callerRecipientsPerDay: 0\n";

/// The source address of replica `replica` in test number `test`: 127.0.44.<test><replica>, so
/// that the peer's log tells the tests' and the replicas' SMTP connections apart (other test
/// targets use 127.0.42.x and 127.0.43.x).
pub fn source(test: u8, replica: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 44, test * 10 + 1 + replica as u8)
}

/// Settings for one replica: MS_OAUTH over STARTTLS to the peer's `port`, tokens from `entra`,
/// SMTP from `source`, no drain delay (the tests stop replicas often), `relay_extra` under
/// `mailRelay:` (indent 2): the store and the rate limits.
pub fn replica_yaml(
    peer: &Peer,
    port: u16,
    entra: &FakeEntra,
    source: Ipv4Addr,
    relay_extra: &str,
) -> String {
    smtp_yaml(
        peer,
        port,
        source,
        entra,
        "",
        &format!("  shutdown:\n    drainDelaySeconds: 0\n    deadlineSeconds: 20\n{relay_extra}"),
    )
}

/// A client with the tests' API key and a generous timeout (no request should take long).
pub fn client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {TEST_API_KEY}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(64)
        .build()
        .unwrap()
}

/// Replicas started from `yamls`, all at once (so that their migrations race, as in a
/// Deployment that starts several pods), each waited for until `/health/ready` answers 200.
pub struct Cluster {
    pub relays: Vec<RelayProcess>,
    /// `http://127.0.0.1:<port>` of each replica, shareable with tasks.
    pub bases: Arc<Vec<String>>,
    pub client: reqwest::Client,
}

impl Cluster {
    pub async fn start(yamls: &[String]) -> Cluster {
        let threads: Vec<_> = yamls
            .iter()
            .cloned()
            .map(|yaml| std::thread::spawn(move || RelayProcess::start(&yaml)))
            .collect();
        let mut relays = Vec::new();
        for thread in threads {
            match thread.join() {
                Ok(relay) => relays.push(relay),
                // RelayProcess::start panicked with the replica's log: show that panic.
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        let cluster = Cluster {
            bases: Arc::new(relays.iter().map(|r| r.url("")).collect()),
            relays,
            client: client(),
        };
        for r in 0..cluster.relays.len() {
            cluster.wait_ready(r, Duration::from_secs(30)).await;
        }
        cluster
    }

    pub fn len(&self) -> usize {
        self.relays.len()
    }

    /// Waits until replica `r` answers `/health/ready` with 200.
    pub async fn wait_ready(&self, r: usize, timeout: Duration) {
        self.wait_readiness(r, 200, timeout).await;
    }

    /// Waits until replica `r` answers `/health/ready` with `status`; returns that answer's body.
    pub async fn wait_readiness(&self, r: usize, status: u16, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self
                .client
                .get(format!("{}/health/ready", self.bases[r]))
                .send()
                .await
            {
                Ok(response) => {
                    let got = response.status().as_u16();
                    let body: Value = response.json().await.unwrap_or(Value::Null);
                    if got == status {
                        return body;
                    }
                    format!("{got} {body}")
                }
                Err(e) => format!("transport error: {e}"),
            };
            assert!(
                Instant::now() < deadline,
                "replica {r} did not answer /health/ready with {status} within {timeout:?}; \
                 last answer: {last}\n{}",
                self.log_tail(r, 8)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last `n` log lines of replica `r`.
    pub fn log_tail(&self, r: usize, n: usize) -> String {
        let text = self.relays[r].log_text();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- last {n} log lines of replica {r}:\n{}",
            lines[lines.len().saturating_sub(n)..].join("\n")
        )
    }

    /// Warnings and errors of every replica (the last `n` each), for a failure message.
    pub fn problems(&self, n: usize) -> String {
        let mut out = String::new();
        for (r, relay) in self.relays.iter().enumerate() {
            let lines: Vec<String> = relay
                .json_lines()
                .into_iter()
                .filter(|l| matches!(l["level"].as_str(), Some("WARN" | "ERROR")))
                .map(|l| l.to_string())
                .collect();
            out.push_str(&format!(
                "--- replica {r}: {} warnings and errors, the last {n}:\n{}\n",
                lines.len(),
                lines[lines.len().saturating_sub(n)..].join("\n")
            ));
        }
        out
    }

    /// SIGTERM to every replica, then waits until each has exited with success.
    pub async fn stop_all(&mut self) {
        for relay in &self.relays {
            relay.sigterm();
        }
        for (r, relay) in self.relays.iter_mut().enumerate() {
            let status = relay.wait_exit(Duration::from_secs(30)).await;
            assert!(
                status.is_some_and(|s| s.success()),
                "replica {r} after SIGTERM: {status:?}\n{}",
                relay.log_text()
            );
        }
    }
}

/// One answer of `POST /mail`.
#[derive(Debug, Clone)]
pub struct Answer {
    pub replica: usize,
    /// 0: no HTTP answer at all (`code` then says why).
    pub status: u16,
    /// `Idempotent-Replayed: true`.
    pub replayed: bool,
    pub retry_after: Option<String>,
    pub code: Option<String>,
    pub body: Value,
    /// How long the answer took.
    pub elapsed: Duration,
}

impl Answer {
    /// `messageId` of a 2xx answer, without the angle brackets.
    pub fn message_id(&self) -> Option<String> {
        self.body["messageId"]
            .as_str()
            .map(|id| id.trim_matches(['<', '>']).to_owned())
    }

    pub fn is(&self, status: u16, code: &str) -> bool {
        self.status == status && self.code.as_deref() == Some(code)
    }
}

/// POSTs `mail` to replica `replica` (of `bases`), with `Idempotency-Key: key` when given.
pub async fn post_mail(
    client: &reqwest::Client,
    bases: &[String],
    replica: usize,
    mail: &Value,
    key: Option<&str>,
) -> Answer {
    let mut request = client.post(format!("{}/mail", bases[replica])).json(mail);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let started = Instant::now();
    let response = match request.send().await {
        Ok(response) => response,
        Err(e) => {
            return Answer {
                replica,
                status: 0,
                replayed: false,
                retry_after: None,
                code: Some(format!("transport error: {e}")),
                body: Value::Null,
                elapsed: started.elapsed(),
            };
        }
    };
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let replayed = header("idempotent-replayed").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let retry_after = header("retry-after");
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    Answer {
        replica,
        status,
        replayed,
        retry_after,
        code: body["code"].as_str().map(str::to_owned),
        body,
        elapsed: started.elapsed(),
    }
}

/// The load harness's record of a request, for `assert_exactly_once`: mail `n` answered `answer`.
pub fn outcome(n: usize, answer: &Answer) -> crate::harness::Outcome {
    crate::harness::Outcome {
        n,
        status: answer.status,
        message_id: answer.message_id(),
        code: answer.code.clone(),
        retry_after: answer.retry_after.clone(),
        elapsed: answer.elapsed,
    }
}

/// A 202 that is the mail's first answer: sent now, not replayed.
pub fn is_original(answer: &Answer) -> bool {
    answer.status == 202 && !answer.replayed && answer.message_id().is_some()
}
