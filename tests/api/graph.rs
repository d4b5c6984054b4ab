//! A fake Microsoft Graph `sendMail` (MIME form), answering as Graph does. The README's section
//! "The fake Microsoft Graph" says what each answer is based on.
//!
//! It checks the bearer token (signature, lifetime, audience, tenant, the `Mail.Send` role), the
//! mailbox, the request (content type, 4 MB, base64, the MIME's From and recipients, the Send As
//! right), and answers with Graph's JSON error bodies, `innerError.request-id` included. Tests
//! can script answers ahead of the checks. What it accepts goes into a Maildir, with the Bcc
//! header removed as Exchange does, and into [`FakeGraph::deliveries`].

#![allow(dead_code)]
// The fake's checks return the whole error answer as their `Err`: its size does not matter here.
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use mail_parser::MimeHeaders as _;
use url::Url;

use crate::entra::{CLIENT_ID, TENANT_ID};

/// The audience of an app-only Graph token.
pub const AUDIENCE: &str = "https://graph.microsoft.com";
pub const SCOPE: &str = "https://graph.microsoft.com/.default";
/// Graph's limit on one request, base64 included.
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// One mailbox the fake knows.
#[derive(Clone, Debug, Default)]
pub struct Mailbox {
    /// Addresses it has Send As on (besides its own).
    pub send_as: Vec<String>,
    /// Not an Exchange Online mailbox (on-premises, inactive, soft-deleted).
    pub not_enabled: bool,
    /// Outside the app's RBAC for Applications scope.
    pub out_of_scope: bool,
}

/// An answer given ahead of the checks.
#[derive(Clone, Debug)]
pub struct Scripted {
    pub status: u16,
    pub code: &'static str,
    pub message: &'static str,
    pub retry_after: Option<u64>,
    /// Deliver the mail, then answer with the status anyway (a 504 that delivered).
    pub deliver: bool,
    /// Wait this long before answering (after reading the request).
    pub delay: Duration,
}

impl Scripted {
    pub fn error(status: u16, code: &'static str, message: &'static str) -> Self {
        Self {
            status,
            code,
            message,
            retry_after: None,
            deliver: false,
            delay: Duration::ZERO,
        }
    }
}

/// A mail the fake accepted.
#[derive(Clone, Debug)]
pub struct Delivered {
    pub mailbox: String,
    /// To, Cc and Bcc of the MIME, as Exchange takes them.
    pub recipients: Vec<String>,
    /// The MIME as delivered: without the Bcc header.
    pub mime: Vec<u8>,
    /// The MIME exactly as it arrived, base64-decoded.
    pub received: Vec<u8>,
}

/// One request, as it arrived.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub client_request_id: Option<String>,
    pub content_type: Option<String>,
    pub body_bytes: usize,
    pub status: u16,
}

/// A draft made from MIME, with the attachments added to it since.
#[derive(Clone, Debug, Default)]
pub struct Draft {
    pub user: String,
    pub mime: Vec<u8>,
    /// Name, content type and bytes of each attachment added (JSON or upload session).
    pub attachments: Vec<(String, String, Vec<u8>)>,
}

/// An upload session: the attachment it fills, and the bytes so far.
#[derive(Clone, Debug)]
struct Upload {
    draft: String,
    name: String,
    content_type: String,
    size: usize,
    bytes: Vec<u8>,
    /// Graph's `expirationDateTime`: after it the session URL answers 404.
    expires_at: std::time::Instant,
}

#[derive(Default)]
struct Inner {
    mailboxes: HashMap<String, Mailbox>,
    drafts: HashMap<String, Draft>,
    uploads: HashMap<String, Upload>,
    script: VecDeque<Scripted>,
    /// Answers for one draft-path route only (`createUploadSession`, `send`, ...).
    route_script: HashMap<&'static str, VecDeque<Scripted>>,
    /// Upload sessions still to be created already expired.
    expired_sessions: usize,
    seen: Vec<Seen>,
    delivered: Vec<Delivered>,
    sequence: u64,
}

#[derive(Clone)]
struct Fake {
    key: Arc<Vec<u8>>,
    maildir: Arc<std::path::PathBuf>,
    /// The tenant's message size limit (35 MB by default, 150 MB at most).
    max_message_bytes: Arc<std::sync::atomic::AtomicUsize>,
    inner: Arc<Mutex<Inner>>,
}

pub struct FakeGraph {
    pub address: SocketAddr,
    pub maildir: tempfile::TempDir,
    fake: Fake,
}

impl FakeGraph {
    /// A fake on a loopback port that knows `mailbox`.
    pub async fn start(mailbox: &str, settings: Mailbox) -> Self {
        let maildir = tempfile::tempdir().unwrap();
        for sub in ["tmp", "new", "cur"] {
            std::fs::create_dir_all(maildir.path().join(sub)).unwrap();
        }
        let fake = Fake {
            key: Arc::new(uuid::Uuid::new_v4().as_bytes().to_vec()),
            maildir: Arc::new(maildir.path().to_path_buf()),
            // Exchange Online's default message size limit.
            max_message_bytes: Arc::new(35_usize.saturating_mul(1024 * 1024).into()),
            inner: Arc::default(),
        };
        fake.inner
            .lock()
            .unwrap()
            .mailboxes
            .insert(mailbox.to_ascii_lowercase(), settings);
        let app = Router::new()
            .route("/v1.0/users/{user}/sendMail", post(send_mail))
            .route("/v1.0/users/{user}/messages", post(create_draft))
            .route(
                "/v1.0/users/{user}/messages/{id}",
                axum::routing::delete(delete_draft),
            )
            .route(
                "/v1.0/users/{user}/messages/{id}/attachments",
                post(add_attachment),
            )
            .route(
                "/v1.0/users/{user}/messages/{id}/attachments/createUploadSession",
                post(create_upload_session),
            )
            .route("/v1.0/users/{user}/messages/{id}/send", post(send_draft))
            .route(
                "/v1.0/users/{user}/mailFolders/sentitems",
                axum::routing::get(sent_items_folder),
            )
            .route(
                "/v1.0/users/{user}/mailFolders/sentitems/messages",
                axum::routing::get(list_sent_items),
            )
            .route("/upload/{session}", axum::routing::put(upload_range))
            // Larger than Graph's limit, so that the fake itself answers 413 as Graph does.
            .layer(DefaultBodyLimit::max(64 * 1024 * 1024))
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            address,
            maildir,
            fake,
        }
    }

    /// `http://127.0.0.1:<port>/v1.0`, as `mailRelay.graph.baseUrl`.
    pub fn base_url(&self) -> Url {
        Url::parse(&format!("http://{}/v1.0/", self.address)).unwrap()
    }

    /// An app-only Graph token as Entra issues it, with `roles`.
    pub fn mint_token(&self, roles: &[&str], lifetime: Duration) -> String {
        let now = unix_now();
        self.mint(AUDIENCE, roles, now, now + lifetime.as_secs())
    }

    /// A token for another resource (Exchange's SMTP audience): Graph refuses it.
    pub fn mint_token_for(&self, audience: &str) -> String {
        let now = unix_now();
        self.mint(audience, &["Mail.Send"], now, now + 3600)
    }

    fn mint(&self, audience: &str, roles: &[&str], iat: u64, exp: u64) -> String {
        let claims = serde_json::json!({
            "aud": audience,
            "iss": format!("https://sts.windows.net/{TENANT_ID}/"),
            "tid": TENANT_ID,
            "appid": CLIENT_ID,
            "idtyp": "app",
            "roles": roles,
            "iat": iat, "nbf": iat, "exp": exp,
        });
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&self.fake.key),
        )
        .unwrap()
    }

    /// Answer the next request with `answer`, before any check but the token's.
    pub fn script(&self, answer: Scripted) {
        self.fake.inner.lock().unwrap().script.push_back(answer);
    }

    /// Answer the next request to `route` (the last path segment of a draft-path request:
    /// `messages`, `attachments`, `createUploadSession`, `send`) with `answer`.
    pub fn script_for(&self, route: &'static str, answer: Scripted) {
        self.fake
            .inner
            .lock()
            .unwrap()
            .route_script
            .entry(route)
            .or_default()
            .push_back(answer);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.fake.inner.lock().unwrap().seen.clone()
    }

    /// Raise or lower the tenant's message size limit.
    pub fn set_max_message_bytes(&self, bytes: usize) {
        self.fake
            .max_message_bytes
            .store(bytes, std::sync::atomic::Ordering::SeqCst);
    }

    /// The next `count` upload sessions expire as soon as they are created.
    pub fn expire_upload_sessions(&self, count: usize) {
        self.fake.inner.lock().unwrap().expired_sessions = count;
    }

    /// Drafts still in the mailbox (not sent, not deleted).
    pub fn drafts(&self) -> Vec<Draft> {
        self.fake
            .inner
            .lock()
            .unwrap()
            .drafts
            .values()
            .cloned()
            .collect()
    }

    pub fn deliveries(&self) -> Vec<Delivered> {
        self.fake.inner.lock().unwrap().delivered.clone()
    }

    /// The files in the Maildir's `new/`.
    pub fn maildir_files(&self) -> Vec<std::path::PathBuf> {
        std::fs::read_dir(self.maildir.path().join("new"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Graph's error body and headers.
fn error(
    status: u16,
    code: &str,
    message: &str,
    request_id: &str,
    client_request_id: Option<&str>,
    retry_after: Option<u64>,
) -> Response {
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let body = serde_json::json!({"error": {
        "code": code,
        "message": message,
        "innerError": {
            "date": date.trim_end_matches('Z'),
            "request-id": request_id,
            "client-request-id": client_request_id.unwrap_or(request_id),
        }
    }});
    let mut response = (
        StatusCode::from_u16(status).unwrap(),
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response();
    let headers = response.headers_mut();
    headers.insert("request-id", request_id.parse().unwrap());
    if let Some(id) = client_request_id {
        headers.insert("client-request-id", id.parse().unwrap());
    }
    if let Some(seconds) = retry_after {
        headers.insert("retry-after", seconds.into());
    }
    response
}

/// The token: signature, lifetime, audience, tenant (Graph's own 401 texts).
fn check_token(
    fake: &Fake,
    headers: &HeaderMap,
) -> Result<Claims, (u16, &'static str, &'static str)> {
    let Some(token) = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return Err((401, "InvalidAuthenticationToken", "Access token is empty."));
    };
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_audience(&[AUDIENCE, "00000003-0000-0000-c000-000000000000"]);
    validation.leeway = 0;
    let claims =
        jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(&fake.key), &validation)
            .map_err(|e| {
                let message = match e.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                        "Lifetime validation failed, the token is expired."
                    }
                    jsonwebtoken::errors::ErrorKind::InvalidAudience => {
                        "Access token validation failure. Invalid audience."
                    }
                    _ => "IDX14100: JWT is not well formed, there are no dots (.).",
                };
                (401, "InvalidAuthenticationToken", message)
            })?
            .claims;
    if claims.tid != TENANT_ID {
        return Err((
            401,
            "InvalidAuthenticationToken",
            "Access token validation failure.",
        ));
    }
    Ok(claims)
}

#[derive(serde::Deserialize)]
struct Claims {
    tid: String,
    #[serde(default)]
    roles: Vec<String>,
}

async fn send_mail(
    State(fake): State<Fake>,
    Path(user): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request_id = uuid::Uuid::new_v4().to_string();
    let client_request_id = headers
        .get("client-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (status, response) = answer(
        &fake,
        &user,
        &headers,
        &body,
        &request_id,
        client_request_id.as_deref(),
    )
    .await;
    fake.inner.lock().unwrap().seen.push(Seen {
        path: format!("/v1.0/users/{user}/sendMail"),
        client_request_id,
        content_type: headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body_bytes: body.len(),
        status,
    });
    response
}

async fn answer(
    fake: &Fake,
    user: &str,
    headers: &HeaderMap,
    body: &Bytes,
    request_id: &str,
    client_request_id: Option<&str>,
) -> (u16, Response) {
    let fail = |status: u16, code: &str, message: &str| {
        (
            status,
            error(status, code, message, request_id, client_request_id, None),
        )
    };
    let claims = match check_token(fake, headers) {
        Ok(claims) => claims,
        Err((status, code, message)) => return fail(status, code, message),
    };
    let scripted = fake.inner.lock().unwrap().script.pop_front();
    if let Some(s) = &scripted
        && !s.deliver
    {
        tokio::time::sleep(s.delay).await;
        return (
            s.status,
            error(
                s.status,
                s.code,
                s.message,
                request_id,
                client_request_id,
                s.retry_after,
            ),
        );
    }
    if !claims.roles.iter().any(|r| r == "Mail.Send") {
        return fail(
            403,
            "ErrorAccessDenied",
            "Access is denied. Check credentials and try again.",
        );
    }
    let mailbox = fake
        .inner
        .lock()
        .unwrap()
        .mailboxes
        .get(&user.to_ascii_lowercase())
        .cloned();
    let Some(mailbox) = mailbox else {
        return fail(
            404,
            "ErrorInvalidUser",
            &format!("The requested user '{user}' is invalid."),
        );
    };
    if mailbox.not_enabled {
        return fail(
            404,
            "MailboxNotEnabledForRESTAPI",
            "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
        );
    }
    if mailbox.out_of_scope {
        return fail(
            403,
            "ErrorAccessDenied",
            "Access is denied. Check credentials and try again.",
        );
    }
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.starts_with("text/plain") {
        return fail(
            415,
            "UnsupportedMediaType",
            "The fake speaks only the MIME form of sendMail (Content-Type: text/plain).",
        );
    }
    if body.len() > MAX_REQUEST_BYTES {
        return fail(
            413,
            "RequestEntityTooLarge",
            "The request entity is too large.",
        );
    }
    // Graph's own example wraps the base64 in lines; whitespace is not part of it.
    let text: Vec<u8> = body
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let Ok(mime) = base64::engine::general_purpose::STANDARD.decode(&text) else {
        return fail(
            400,
            "ErrorMimeContentInvalidBase64String",
            "Invalid base64 string for MIME content.",
        );
    };
    if mime.len()
        > fake
            .max_message_bytes
            .load(std::sync::atomic::Ordering::SeqCst)
    {
        return fail(
            400,
            "ErrorMessageSizeExceeded",
            "The message exceeds the maximum supported size., Cannot save changes made to an item to store.",
        );
    }
    let Some(parsed) = mail_parser::MessageParser::default().parse(&mime) else {
        return fail(
            400,
            "ErrorMimeContentInvalid",
            "MIME content does not contain all required information, malformed formatting, or empty.",
        );
    };
    let (from, recipients) = addresses(&parsed);
    if from.is_empty() || recipients.is_empty() {
        return fail(
            400,
            "ErrorMimeContentInvalid",
            "MIME content does not contain all required information, malformed formatting, or empty.",
        );
    }
    if !may_send_as(&mailbox, user, &from) {
        return fail(403, "ErrorSendAsDenied", SEND_AS_DENIED);
    }
    deliver(fake, user, recipients, mime);
    if let Some(s) = scripted {
        tokio::time::sleep(s.delay).await;
        return (
            s.status,
            error(
                s.status,
                s.code,
                s.message,
                request_id,
                client_request_id,
                s.retry_after,
            ),
        );
    }
    let mut response = StatusCode::ACCEPTED.into_response();
    response
        .headers_mut()
        .insert("request-id", request_id.parse().unwrap());
    if let Some(id) = client_request_id {
        response
            .headers_mut()
            .insert("client-request-id", id.parse().unwrap());
    }
    (202, response)
}

/// Graph's text for a From the mailbox may not send as.
const SEND_AS_DENIED: &str = "The user account which was used to submit this request does not have the right to send mail on behalf of the specified sending account., Cannot submit message.";

/// The MIME's From (lower case, empty when absent) and its To, Cc and Bcc, as Exchange reads them.
fn addresses(parsed: &mail_parser::Message<'_>) -> (String, Vec<String>) {
    let from = parsed
        .from()
        .and_then(|a| a.first())
        .and_then(|a| a.address())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let recipients = [parsed.to(), parsed.cc(), parsed.bcc()]
        .into_iter()
        .flatten()
        .flat_map(|list| list.iter().filter_map(|a| a.address()).map(str::to_owned))
        .collect();
    (from, recipients)
}

/// Its own address, or one it has Send As on.
fn may_send_as(mailbox: &Mailbox, user: &str, from: &str) -> bool {
    from.eq_ignore_ascii_case(user) || mailbox.send_as.iter().any(|a| a.eq_ignore_ascii_case(from))
}

/// Into the Maildir, without the Bcc header (Exchange strips it before delivery).
fn deliver(fake: &Fake, user: &str, recipients: Vec<String>, received: Vec<u8>) {
    let mut mime = Vec::with_capacity(received.len());
    let head_end = received
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(received.len(), |p| p + 2);
    let head = String::from_utf8_lossy(&received[..head_end]).into_owned();
    let mut in_bcc = false;
    for line in head.split_inclusive("\r\n") {
        if !line.starts_with([' ', '\t']) {
            in_bcc = line.to_ascii_lowercase().starts_with("bcc:");
        }
        if !in_bcc {
            mime.extend_from_slice(line.as_bytes());
        }
    }
    mime.extend_from_slice(&received[head_end..]);
    let mut inner = fake.inner.lock().unwrap();
    inner.sequence += 1;
    let name = format!("{}.{}.fake-graph", unix_now(), inner.sequence);
    let tmp = fake.maildir.join("tmp").join(&name);
    std::fs::write(&tmp, &mime).unwrap();
    std::fs::rename(&tmp, fake.maildir.join("new").join(&name)).unwrap();
    inner.delivered.push(Delivered {
        mailbox: user.to_owned(),
        recipients,
        mime,
        received,
    });
}

// ---- Sent Items: where a send whose answer was lost is looked for ---------------------------

/// `GET /users/{user}/mailFolders/sentitems`: the folder itself, as `diagnose` reads it.
async fn sent_items_folder(
    State(fake): State<Fake>,
    Path(user): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (rid, cid) = ids(&headers);
    let answer = match authorize(
        &fake,
        &user,
        &headers,
        "Mail.Read",
        (&rid, cid.as_deref()),
        "sentitems",
    ) {
        Err(e) => e,
        Ok(_) => json_answer(
            200,
            serde_json::json!({
                "@odata.context": format!("https://graph.microsoft.com/v1.0/$metadata#users('{user}')/mailFolders(id)/$entity"),
                "id": "AAMkAGVmMDEzMTM4LTZmYWUtNDdkNC1hMDZiLTU1OGY5OTZhYmY4OAAuAAAAAAAiQ8W967B7TKBjgx9rVEURAQAiIsqMbYjsT5e-T7KzowPTAAAAAAEJAAA=",
            }),
        ),
    };
    record(
        &fake,
        format!("GET /v1.0/users/{user}/mailFolders/sentitems"),
        &headers,
        0,
        answer,
    )
}

/// `GET /users/{user}/mailFolders/sentitems/messages?$filter=internetMessageId eq '<...>'`: the
/// mails the fake delivered from `user` with that Message-ID (Graph's `internetMessageId` keeps
/// the angle brackets).
async fn list_sent_items(
    State(fake): State<Fake>,
    Path(user): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let (rid, cid) = ids(&headers);
    let answer = match authorize(
        &fake,
        &user,
        &headers,
        "Mail.Read",
        (&rid, cid.as_deref()),
        "sentitems",
    ) {
        Err(e) => e,
        Ok(_) => {
            let wanted = query
                .get("$filter")
                .and_then(|f| f.strip_prefix("internetMessageId eq '"))
                .and_then(|rest| rest.strip_suffix('\''))
                .map(|id| id.replace("''", "'"));
            match wanted {
                None => (
                    400,
                    error(
                        400,
                        "BadRequest",
                        "Invalid filter clause",
                        &rid,
                        cid.as_deref(),
                        None,
                    ),
                ),
                Some(wanted) => {
                    let value: Vec<serde_json::Value> = fake
                        .inner
                        .lock()
                        .unwrap()
                        .delivered
                        .iter()
                        .filter(|d| d.mailbox.eq_ignore_ascii_case(&user))
                        .filter_map(|d| {
                            let parsed = mail_parser::MessageParser::default().parse(&d.mime)?;
                            let id = format!("<{}>", parsed.message_id()?);
                            (id == wanted).then(|| serde_json::json!({"id": uuid::Uuid::new_v4().to_string(), "internetMessageId": id}))
                        })
                        .collect();
                    json_answer(
                        200,
                        serde_json::json!({
                            "@odata.context": format!("https://graph.microsoft.com/v1.0/$metadata#users('{user}')/mailFolders('sentitems')/messages(internetMessageId)"),
                            "value": value,
                        }),
                    )
                }
            }
        }
    };
    record(
        &fake,
        format!("GET /v1.0/users/{user}/mailFolders/sentitems/messages"),
        &headers,
        0,
        answer,
    )
}

// ---- the draft path: a mail over 4 MB -------------------------------------------------------

/// What every draft request checks first: the token, a role, the mailbox.
fn authorize(
    fake: &Fake,
    user: &str,
    headers: &HeaderMap,
    role: &str,
    ids: (&str, Option<&str>),
    route: &'static str,
) -> Result<Mailbox, (u16, Response)> {
    let (request_id, client_request_id) = ids;
    let fail = |status: u16, code: &str, message: &str| {
        (
            status,
            error(status, code, message, request_id, client_request_id, None),
        )
    };
    let claims = check_token(fake, headers).map_err(|(s, c, m)| fail(s, c, m))?;
    let scripted = fake
        .inner
        .lock()
        .unwrap()
        .route_script
        .get_mut(route)
        .and_then(VecDeque::pop_front);
    if let Some(s) = scripted {
        return Err((
            s.status,
            error(
                s.status,
                s.code,
                s.message,
                request_id,
                client_request_id,
                s.retry_after,
            ),
        ));
    }
    // Mail.ReadWrite includes reading.
    let granted = |r: &String| r == role || (role == "Mail.Read" && r == "Mail.ReadWrite");
    if !claims.roles.iter().any(granted) {
        return Err(fail(
            403,
            "ErrorAccessDenied",
            "Access is denied. Check credentials and try again.",
        ));
    }
    let mailbox = fake
        .inner
        .lock()
        .unwrap()
        .mailboxes
        .get(&user.to_ascii_lowercase())
        .cloned();
    let Some(mailbox) = mailbox else {
        return Err(fail(
            404,
            "ErrorInvalidUser",
            &format!("The requested user '{user}' is invalid."),
        ));
    };
    if mailbox.not_enabled {
        return Err(fail(
            404,
            "MailboxNotEnabledForRESTAPI",
            "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
        ));
    }
    if mailbox.out_of_scope {
        return Err(fail(
            403,
            "ErrorAccessDenied",
            "Access is denied. Check credentials and try again.",
        ));
    }
    Ok(mailbox)
}

/// Notes a request the way `send_mail` does.
fn record(
    fake: &Fake,
    path: String,
    headers: &HeaderMap,
    body_bytes: usize,
    answer: (u16, Response),
) -> Response {
    fake.inner.lock().unwrap().seen.push(Seen {
        path,
        client_request_id: headers
            .get("client-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        content_type: headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body_bytes,
        status: answer.0,
    });
    answer.1
}

fn ids(headers: &HeaderMap) -> (String, Option<String>) {
    (
        uuid::Uuid::new_v4().to_string(),
        headers
            .get("client-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    )
}

fn json_answer(status: u16, body: serde_json::Value) -> (u16, Response) {
    (
        status,
        (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response(),
    )
}

async fn create_draft(
    State(fake): State<Fake>,
    Path(user): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (rid, cid) = ids(&headers);
    let answer = (|| {
        authorize(
            &fake,
            &user,
            &headers,
            "Mail.ReadWrite",
            (&rid, cid.as_deref()),
            "messages",
        )?;
        let fail = |status: u16, code: &str, message: &str| {
            (
                status,
                error(status, code, message, &rid, cid.as_deref(), None),
            )
        };
        if body.len() > MAX_REQUEST_BYTES {
            return Err(fail(
                413,
                "RequestEntityTooLarge",
                "The request entity is too large.",
            ));
        }
        let text: Vec<u8> = body
            .iter()
            .copied()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        let mime = base64::engine::general_purpose::STANDARD
            .decode(&text)
            .map_err(|_| {
                fail(
                    400,
                    "ErrorMimeContentInvalidBase64String",
                    "Invalid base64 string for MIME content.",
                )
            })?;
        let id = format!("AAMkAD{}", uuid::Uuid::new_v4().simple());
        fake.inner.lock().unwrap().drafts.insert(
            id.clone(),
            Draft {
                user: user.clone(),
                mime,
                attachments: vec![],
            },
        );
        Ok(json_answer(
            201,
            serde_json::json!({"id": id, "isDraft": true}),
        ))
    })()
    .unwrap_or_else(|e| e);
    record(
        &fake,
        format!("/v1.0/users/{user}/messages"),
        &headers,
        body.len(),
        answer,
    )
}

async fn delete_draft(
    State(fake): State<Fake>,
    Path((user, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let (rid, cid) = ids(&headers);
    let answer = match authorize(
        &fake,
        &user,
        &headers,
        "Mail.ReadWrite",
        (&rid, cid.as_deref()),
        "delete",
    ) {
        Err(e) => e,
        Ok(_) => {
            fake.inner.lock().unwrap().drafts.remove(&id);
            (204, StatusCode::NO_CONTENT.into_response())
        }
    };
    record(
        &fake,
        format!("DELETE /v1.0/users/{user}/messages/{id}"),
        &headers,
        0,
        answer,
    )
}

async fn add_attachment(
    State(fake): State<Fake>,
    Path((user, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (rid, cid) = ids(&headers);
    let answer = (|| {
        authorize(
            &fake,
            &user,
            &headers,
            "Mail.ReadWrite",
            (&rid, cid.as_deref()),
            "attachments",
        )?;
        let fail = |status: u16, code: &str, message: &str| {
            (
                status,
                error(status, code, message, &rid, cid.as_deref(), None),
            )
        };
        if body.len() > MAX_REQUEST_BYTES {
            return Err(fail(
                413,
                "RequestEntityTooLarge",
                "The request entity is too large.",
            ));
        }
        let item: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|_| fail(400, "BadRequest", "Unable to read JSON request payload."))?;
        let bytes = item["contentBytes"]
            .as_str()
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .ok_or_else(|| {
                fail(
                    400,
                    "ErrorInvalidProperty",
                    "contentBytes is not valid base64.",
                )
            })?;
        let mut inner = fake.inner.lock().unwrap();
        let draft = inner.drafts.get_mut(&id).ok_or_else(|| {
            fail(
                404,
                "ErrorItemNotFound",
                "The specified object was not found in the store.",
            )
        })?;
        draft.attachments.push((
            item["name"].as_str().unwrap_or("").to_owned(),
            item["contentType"].as_str().unwrap_or("").to_owned(),
            bytes,
        ));
        Ok(json_answer(
            201,
            serde_json::json!({"id": uuid::Uuid::new_v4().to_string()}),
        ))
    })()
    .unwrap_or_else(|e| e);
    record(
        &fake,
        format!("/v1.0/users/{user}/messages/{id}/attachments"),
        &headers,
        body.len(),
        answer,
    )
}

async fn create_upload_session(
    State(fake): State<Fake>,
    Path((user, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (rid, cid) = ids(&headers);
    let host = headers
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_owned();
    let answer = (|| {
        authorize(&fake, &user, &headers, "Mail.ReadWrite", (&rid, cid.as_deref()), "createUploadSession")?;
        let fail = |status: u16, code: &str, message: &str| (status, error(status, code, message, &rid, cid.as_deref(), None));
        let request: serde_json::Value = serde_json::from_slice(&body).map_err(|_| fail(400, "BadRequest", "Unable to read JSON request payload."))?;
        let item = &request["AttachmentItem"];
        let size = item["size"].as_u64().ok_or_else(|| fail(400, "ErrorInvalidProperty", "AttachmentItem.size is required."))? as usize;
        // Outlook takes attachments of up to 150 MB this way.
        if size > 150 * 1024 * 1024 {
            return Err(fail(400, "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize", "Attachment size is not within the supported range."));
        }
        let mut inner = fake.inner.lock().unwrap();
        if !inner.drafts.contains_key(&id) {
            return Err(fail(404, "ErrorItemNotFound", "The specified object was not found in the store."));
        }
        let session = uuid::Uuid::new_v4().simple().to_string();
        let lifetime = if inner.expired_sessions > 0 {
            inner.expired_sessions -= 1;
            Duration::ZERO
        } else {
            Duration::from_secs(15 * 60)
        };
        inner.uploads.insert(session.clone(), Upload {
            expires_at: std::time::Instant::now() + lifetime,
            draft: id.clone(),
            name: item["name"].as_str().unwrap_or("").to_owned(),
            content_type: item["contentType"].as_str().unwrap_or("").to_owned(),
            size,
            bytes: Vec::with_capacity(size),
        });
        let expires = time::OffsetDateTime::now_utc() + time::Duration::minutes(15);
        Ok(json_answer(201, serde_json::json!({
            "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#microsoft.graph.uploadSession",
            "uploadUrl": format!("http://{host}/upload/{session}"),
            "expirationDateTime": expires.format(&time::format_description::well_known::Rfc3339).unwrap(),
            "nextExpectedRanges": ["0-"],
        })))
    })()
    .unwrap_or_else(|e| e);
    record(
        &fake,
        format!("/v1.0/users/{user}/messages/{id}/attachments/createUploadSession"),
        &headers,
        body.len(),
        answer,
    )
}

/// A byte range: `Content-Range: bytes a-b/total`, in order, each under 4 MB; no Authorization
/// header (Graph answers 401 to one on the upload URL).
async fn upload_range(
    State(fake): State<Fake>,
    Path(session): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (rid, cid) = ids(&headers);
    let answer = (|| {
        let fail = |status: u16, code: &str, message: &str| {
            (
                status,
                error(status, code, message, &rid, cid.as_deref(), None),
            )
        };
        if headers.contains_key("authorization") {
            return Err(fail(
                401,
                "InvalidAuthenticationToken",
                "Do not send an Authorization header to the upload URL.",
            ));
        }
        if body.len() >= MAX_REQUEST_BYTES {
            return Err(fail(
                413,
                "RequestEntityTooLarge",
                "The request entity is too large.",
            ));
        }
        let range = headers
            .get("content-range")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let parsed = range.strip_prefix("bytes ").and_then(|r| {
            let (span, total) = r.split_once('/')?;
            let (a, b) = span.split_once('-')?;
            Some((
                a.parse::<usize>().ok()?,
                b.parse::<usize>().ok()?,
                total.parse::<usize>().ok()?,
            ))
        });
        let mut inner = fake.inner.lock().unwrap();
        if inner
            .uploads
            .get(&session)
            .is_some_and(|u| u.expires_at <= std::time::Instant::now())
        {
            inner.uploads.remove(&session);
        }
        let upload = inner.uploads.get_mut(&session).ok_or_else(|| {
            fail(
                404,
                "ErrorItemNotFound",
                "The upload session was not found or has expired.",
            )
        })?;
        let Some((a, b, total)) = parsed.filter(|(a, b, total)| {
            *a == upload.bytes.len() && b + 1 - a == body.len() && *total == upload.size
        }) else {
            return Err(fail(
                416,
                "InvalidRange",
                "The Content-Range header does not match the next expected range.",
            ));
        };
        upload.bytes.extend_from_slice(&body);
        if b + 1 < total {
            return Ok(json_answer(
                200,
                serde_json::json!({"nextExpectedRanges": [format!("{}-", b + 1)]}),
            ));
        }
        let _ = a;
        let upload = inner.uploads.remove(&session).unwrap();
        if let Some(draft) = inner.drafts.get_mut(&upload.draft) {
            draft
                .attachments
                .push((upload.name, upload.content_type, upload.bytes));
        }
        Ok((201, StatusCode::CREATED.into_response()))
    })()
    .unwrap_or_else(|e| e);
    record(
        &fake,
        "PUT /upload".to_owned(),
        &headers,
        body.len(),
        answer,
    )
}

async fn send_draft(
    State(fake): State<Fake>,
    Path((user, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let (rid, cid) = ids(&headers);
    let answer = (|| {
        let mailbox = authorize(&fake, &user, &headers, "Mail.Send", (&rid, cid.as_deref()), "send")?;
        let fail = |status: u16, code: &str, message: &str| (status, error(status, code, message, &rid, cid.as_deref(), None));
        let draft = fake.inner.lock().unwrap().drafts.remove(&id)
            .ok_or_else(|| fail(404, "ErrorItemNotFound", "The specified object was not found in the store."))?;
        let mime = assemble(&draft);
        if mime.len() > fake.max_message_bytes.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(fail(400, "ErrorMessageSizeExceeded", "The message exceeds the maximum supported size., Cannot save changes made to an item to store."));
        }
        let parsed = mail_parser::MessageParser::default().parse(&mime).unwrap();
        let (from, recipients) = addresses(&parsed);
        if !may_send_as(&mailbox, &user, &from) {
            return Err(fail(403, "ErrorSendAsDenied", SEND_AS_DENIED));
        }
        drop(parsed);
        deliver(&fake, &user, recipients, mime);
        Ok((202, StatusCode::ACCEPTED.into_response()))
    })()
    .unwrap_or_else(|e| e);
    record(
        &fake,
        format!("/v1.0/users/{user}/messages/{id}/send"),
        &headers,
        0,
        answer,
    )
}

/// The draft's MIME with each added attachment as a part of its top-level multipart, as
/// Exchange would send it.
fn assemble(draft: &Draft) -> Vec<u8> {
    let parsed = mail_parser::MessageParser::default()
        .parse(&draft.mime)
        .unwrap();
    let boundary = parsed
        .content_type()
        .and_then(|t| t.attribute("boundary"))
        .expect("the relay's drafts are multipart")
        .to_owned();
    drop(parsed);
    let end = format!("\r\n--{boundary}--");
    let at = draft
        .mime
        .windows(end.len())
        .rposition(|w| w == end.as_bytes())
        .expect("the closing delimiter");
    let mut out = draft.mime[..at].to_vec();
    for (name, content_type, bytes) in &draft.attachments {
        out.extend_from_slice(
            format!("\r\n--{boundary}\r\nContent-Type: {content_type}; name=\"{name}\"\r\nContent-Disposition: attachment; filename=\"{name}\"\r\nContent-Transfer-Encoding: base64\r\n\r\n").as_bytes(),
        );
        let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
        for line in encoded.as_bytes().chunks(76) {
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
        }
        out.truncate(out.len() - 2);
    }
    out.extend_from_slice(&draft.mime[at..]);
    out
}
