//! The Microsoft Graph transport: `POST {baseUrl}/users/{mailbox}/sendMail` with the relay's own
//! MIME message, for tenants where SMTP AUTH is off. It knows nothing of `delivery`; its errors
//! are turned into `DeliveryError` there. The README says what each behaviour relies on.

mod error;
mod large;
mod mime;
mod sent_items;

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderMap};
use tokio::sync::Semaphore;
use url::Url;

pub use error::{GraphError, GraphErrorKind, GraphReply};

use crate::config::Settings;
use crate::message::OutgoingMail;
use crate::token::{TokenProvider, retry_after};

/// Graph's limit on one request, base64 included (about 4 MB; microsoft-graph-docs #9834).
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// Waits Graph asks for longer than this end the send (the queue, if any, waits instead).
const LONGEST_WAIT: Duration = Duration::from_secs(30);

/// The answer to a mail Graph took.
#[derive(Debug, Clone)]
pub struct GraphReceipt {
    /// `202 Accepted (request-id ...)`.
    pub reply: String,
}

/// Sends mail as the `smtpUsername` mailbox through Graph.
pub struct GraphSender {
    http: reqwest::Client,
    /// `{baseUrl}/users/{mailbox}`.
    users_url: Url,
    send_url: Url,
    tokens: Arc<dyn TokenProvider>,
    /// Outlook allows 4 concurrent requests per mailbox; more get `429 MailboxConcurrency`.
    in_flight: Semaphore,
    send_deadline: Duration,
    /// `mailRelay.graph.sentItemsLookupSeconds`.
    sent_items_lookup: Duration,
}

impl std::fmt::Debug for GraphSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphSender")
            .field("send_url", &self.send_url.as_str())
            .finish_non_exhaustive()
    }
}

impl GraphSender {
    /// The sender for `smtpUsername`, with `tokens` for the Graph scope.
    pub fn new(settings: &Settings, tokens: Arc<dyn TokenProvider>) -> Result<Self, String> {
        let graph = &settings.relay.graph;
        let mailbox =
            settings.send_email.smtp_authentication.username().ok_or(
                "mailRelay.delivery.mode graph needs featureSwitches.sendEmail.smtpUsername",
            )?;
        let mut users_url = graph.base_url.clone();
        users_url
            .path_segments_mut()
            .map_err(|()| format!("{} cannot be a base URL", graph.base_url))?
            .pop_if_empty()
            .extend(["users", mailbox]);
        let mut send_url = users_url.clone();
        if let Ok(mut path) = send_url.path_segments_mut() {
            path.push("sendMail");
        }
        let http = reqwest::Client::builder()
            .connect_timeout(graph.connect_timeout)
            .timeout(graph.request_timeout)
            .tcp_nodelay(true)
            // Kept alive (HTTP/2 where Graph offers it): a send costs no new TLS handshake.
            .pool_idle_timeout(Duration::from_secs(90))
            // A redirect would carry the token elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(crate::USER_AGENT)
            .build()
            .map_err(|e| crate::causes::line(&e))?;
        Ok(Self {
            http,
            users_url,
            send_url,
            tokens,
            in_flight: Semaphore::new(graph.max_concurrent_requests),
            send_deadline: settings.relay.smtp.send_deadline,
            sent_items_lookup: graph.sent_items_lookup,
        })
    }

    /// Hand `mail` to Graph: `Ok` only on its `202`. `429` and `503` are retried within the send
    /// deadline, after the `Retry-After` Graph gave; a token Graph calls invalid is fetched anew
    /// once. A request that went out without an answer is sent again only when Sent Items, read
    /// with `Mail.Read`, shows it was not sent. A mail over Graph's request limit goes as a
    /// draft with its large attachments added one by one.
    pub async fn send(&self, mail: &OutgoingMail) -> Result<GraphReceipt, GraphError> {
        let deadline = Instant::now() + self.send_deadline;
        let recipients: Vec<String> = mail.envelope.to().iter().map(ToString::to_string).collect();
        let _permit = self
            .in_flight
            .acquire()
            .await
            .map_err(|_| GraphError::Halted("the Graph sender is closed".into()))?;
        match self.send_once(mail, &recipients, deadline).await {
            Err(GraphError::NoVerdict { detail }) => {
                self.settle(mail, &recipients, detail, deadline).await
            }
            other => other,
        }
    }

    async fn send_once(
        &self,
        mail: &OutgoingMail,
        recipients: &[String],
        deadline: Instant,
    ) -> Result<GraphReceipt, GraphError> {
        // Known from the length alone: a large mail is not base64-encoded whole for nothing.
        if mail.formatted.len().div_ceil(3) * 4 > MAX_REQUEST_BYTES {
            return self.send_large(mail, recipients, deadline).await;
        }
        let body = bytes::Bytes::from(mime::request_body(&mail.formatted, recipients));
        if body.len() > MAX_REQUEST_BYTES {
            // Only the Bcc header pushed it over.
            return self.send_large(mail, recipients, deadline).await;
        }
        let response = self
            .call(deadline, Step::Send, &mail.id, |http| {
                http.post(self.send_url.clone())
                    .header(CONTENT_TYPE, "text/plain")
                    .body(body.clone())
            })
            .await?;
        accepted(&response)
    }

    /// `{baseUrl}/users/{mailbox}/` and `segments`.
    fn user_url(&self, segments: &[&str]) -> Url {
        let mut url = self.users_url.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.extend(segments);
        }
        url
    }

    /// One request, with a fresh bearer token, retried as [`GraphSender::send`] says; `Ok` is a
    /// `2xx`. Only for [`Step::Send`] is a lost answer *outcome unknown*: before it, Graph holds
    /// at most a draft.
    async fn call(
        &self,
        deadline: Instant,
        step: Step,
        mail_id: &str,
        request: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, GraphError> {
        let started = Instant::now();
        let mut refetched = false;
        let mut pause = Duration::from_millis(200);
        loop {
            let token = match step {
                Step::Upload => None,
                _ => Some(self.tokens.token().await.map_err(GraphError::Token)?),
            };
            let mut builder = request(&self.http).header("client-request-id", mail_id);
            if let Some(token) = &token {
                builder = builder.bearer_auth(token.expose());
            }
            let error = match attempt(builder, step).await {
                Ok(response) => return Ok(response),
                Err(error) => error,
            };
            let wait = match (&error, &token) {
                (GraphError::Refused(reply), Some(token)) if reply.status == 401 && !refetched => {
                    // Revoked or rotated keys: a fresh token may pass; a second 401 is final.
                    self.tokens.invalidate(token);
                    refetched = true;
                    Duration::ZERO
                }
                (GraphError::Refused(reply), _) if error.is_transient() => {
                    reply.retry_after.unwrap_or(pause)
                }
                (GraphError::Unreachable { .. }, _) => pause,
                _ => return Err(error),
            };
            pause = (pause * 2).min(Duration::from_secs(5));
            if wait > LONGEST_WAIT || Instant::now() + wait >= deadline {
                return Err(GraphError::Deadline {
                    waited: started.elapsed(),
                    last: Box::new(error),
                });
            }
            tokio::time::sleep(wait).await;
        }
    }
}

/// Which request of a send: only the one that sends can leave the outcome unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// `sendMail`, or a draft's `send`.
    Send,
    /// Creating the draft or adding an attachment to it.
    Draft,
    /// A byte range to an upload session's pre-authorised URL (no bearer token: Graph refuses
    /// one there).
    Upload,
    /// Reading Sent Items after a send whose answer was lost.
    Lookup,
}

/// The mail is Graph's only on `202 Accepted`. Another `2xx` to a send is not success: Graph
/// has been seen to answer `200` to a MIME send it did not take (microsoft-graph-docs-contrib
/// #3079), so the outcome is unknown and the mail is not sent again.
fn accepted(response: &reqwest::Response) -> Result<GraphReceipt, GraphError> {
    let id = header(response.headers(), "request-id")
        .map_or_else(String::new, |id| format!(" (request-id {id})"));
    let status = response.status();
    if status != StatusCode::ACCEPTED {
        return Err(GraphError::NoVerdict {
            detail: format!("Microsoft Graph answered {status}{id} to the send, not 202 Accepted"),
        });
    }
    Ok(GraphReceipt {
        reply: format!("202 Accepted{id}"),
    })
}

/// One request: a `2xx`, or why not.
async fn attempt(
    builder: reqwest::RequestBuilder,
    step: Step,
) -> Result<reqwest::Response, GraphError> {
    let lost = |detail: String| match step {
        Step::Send => GraphError::NoVerdict { detail },
        Step::Draft | Step::Upload | Step::Lookup => GraphError::Interrupted { detail },
    };
    let response = match builder.send().await {
        Ok(response) => response,
        Err(e) if e.is_connect() => {
            return Err(GraphError::Unreachable {
                url: e.url().map_or_else(String::new, |u| {
                    format!("{}://{}", u.scheme(), u.authority())
                }),
                detail: crate::causes::line(&e),
            });
        }
        Err(e) => return Err(lost(crate::causes::line(&e))),
    };
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let headers = response.headers().clone();
    let body = read_capped(response).await;
    let reply = GraphReply::parse(
        status.as_u16(),
        &body,
        header(&headers, "request-id"),
        retry_after(&headers),
    );
    // A 5xx other than 503 came after Graph had the whole request: it may send the mail
    // anyway (a 504 has been seen to deliver).
    if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
        return Err(lost(format!("Microsoft Graph answered {reply}")));
    }
    Err(GraphError::Refused(reply))
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().take(100).collect())
}

/// The error body, at most [`error::MAX_ERROR_BODY`] bytes: a misbehaving peer cannot make the
/// relay hold more.
pub(super) async fn read_capped(mut response: reqwest::Response) -> Vec<u8> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = error::MAX_ERROR_BODY - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= error::MAX_ERROR_BODY {
            break;
        }
    }
    body
}
