//! Mails over Graph's request limit: the message without its large attachments becomes a draft,
//! and each of them is added to the draft on its own (an upload session from 3 MB on, one JSON
//! request below), within Graph's request limit each; then the draft is sent.

use mail_parser::{MessageParser, MimeHeaders};
use reqwest::header::CONTENT_TYPE;

use super::{GraphError, Step};

/// An attachment taken out of the message, to be added to the draft.
pub(super) struct Attachment {
    pub name: String,
    pub content_type: String,
    pub content_id: Option<String>,
    pub inline: bool,
    pub bytes: bytes::Bytes,
}

/// The message, split so that the draft fits in one request.
pub(super) struct Split {
    pub draft: Vec<u8>,
    pub attachments: Vec<Attachment>,
}

/// Takes attachments out of `mime`, the largest first, until what is left is at most `fits`
/// bytes; `None` when the message has no attachment part to take out.
pub(super) fn split(mime: &[u8], fits: usize) -> Option<Split> {
    let message = MessageParser::default().parse(mime)?;
    let mut parts: Vec<_> = message
        .attachments()
        .map(|part| {
            let start = part.raw_header_offset() as usize;
            // The delimiter before the part (its CRLF and `--boundary` line) goes with it.
            let cut = mime[..start]
                .windows(4)
                .rposition(|w| w == b"\r\n--")
                .unwrap_or(start);
            (cut, part.raw_end_offset() as usize, part)
        })
        .collect();
    if parts.is_empty() {
        return None;
    }
    parts.sort_by_key(|(cut, end, _)| std::cmp::Reverse(end - cut));
    let mut left = mime.len();
    let mut taken = Vec::new();
    for (cut, end, part) in parts {
        if left <= fits {
            break;
        }
        left -= end - cut;
        taken.push((cut, end, part));
    }
    taken.sort_by_key(|(cut, ..)| *cut);
    let mut draft = Vec::with_capacity(left);
    let mut at = 0;
    let mut attachments = Vec::new();
    for (cut, end, part) in taken {
        draft.extend_from_slice(&mime[at..cut]);
        at = end;
        let content_type = part.content_type().map_or_else(
            || "application/octet-stream".to_owned(),
            |t| format!("{}/{}", t.ctype(), t.subtype().unwrap_or("octet-stream")),
        );
        attachments.push(Attachment {
            name: part.attachment_name().unwrap_or("attachment").to_owned(),
            content_type,
            content_id: part.content_id().map(str::to_owned),
            inline: part.content_disposition().is_some_and(|d| d.is_inline()),
            bytes: bytes::Bytes::copy_from_slice(part.contents()),
        });
    }
    draft.extend_from_slice(&mime[at..]);
    Some(Split { draft, attachments })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{MessageLimits, OutgoingMail};

    fn built(attachments: serde_json::Value) -> Vec<u8> {
        let request = serde_json::json!({
            "from": "a@contoso.com", "to": "b@example.com", "subject": "big", "text": "body text",
            "attachments": attachments,
        });
        let limits = MessageLimits {
            max_recipients: 10,
            max_message_bytes: 64 << 20,
        };
        OutgoingMail::from_request(serde_json::from_value(request).unwrap(), &limits)
            .unwrap()
            .formatted
    }

    fn b64(bytes: &[u8]) -> String {
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes)
    }

    #[test]
    fn the_largest_attachments_leave_until_the_rest_fits_and_the_draft_still_parses() {
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let small = b"small one".to_vec();
        let mime = built(serde_json::json!([
            {"filename": "small.txt", "contentType": "text/plain", "content": b64(&small)},
            {"filename": "big.bin", "contentType": "application/pdf", "content": b64(&big)},
        ]));
        let split = split(&mime, 100_000).unwrap();
        assert_eq!(split.attachments.len(), 1);
        let a = &split.attachments[0];
        assert_eq!(
            (a.name.as_str(), a.content_type.as_str()),
            ("big.bin", "application/pdf")
        );
        assert_eq!(a.bytes, big);
        assert!(!a.inline);
        let draft = MessageParser::default().parse(&split.draft).unwrap();
        assert_eq!(draft.subject(), Some("big"));
        assert_eq!(draft.body_text(0).as_deref(), Some("body text"));
        let left: Vec<_> = draft.attachments().map(|p| p.contents().to_vec()).collect();
        assert_eq!(left, [small]);
        // Exactly the part and its delimiter left: the rest is byte for byte the message.
        assert!(split.draft.len() < 10_000, "{}", split.draft.len());
        assert!(mime.starts_with(&split.draft[..split.draft.len() / 2]));
    }

    #[test]
    fn a_message_without_attachments_cannot_be_split() {
        assert!(split(&built(serde_json::json!([])), 10).is_none());
    }
}

/// Attachments from this size on go through an upload session; smaller ones in one JSON request
/// (whose base64 then stays under the request limit).
const UPLOAD_SESSION_FROM: usize = 2_500_000;
/// One byte range of an upload session: 10 × 320 KiB, under Graph's 4 MB per request.
pub(super) const CHUNK: usize = 10 * 320 * 1024;

#[derive(serde::Deserialize)]
struct Created {
    id: String,
}

/// An upload session's answer to a byte range that did not complete it.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Progress {
    #[serde(default)]
    next_expected_ranges: Vec<String>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Session {
    upload_url: url::Url,
    #[serde(default)]
    next_expected_ranges: Vec<String>,
}

impl super::GraphSender {
    /// The mail as a draft (`POST /users/{id}/messages`, MIME), its large attachments added
    /// (`createUploadSession` and byte ranges, or `POST .../attachments`), then
    /// `POST /users/{id}/messages/{draft}/send`. Needs `Mail.ReadWrite`. A draft left by a failed
    /// step is deleted.
    pub(super) async fn send_large(
        &self,
        mail: &crate::message::OutgoingMail,
        recipients: &[String],
        deadline: std::time::Instant,
    ) -> Result<super::GraphReceipt, GraphError> {
        // Base64 makes 3 bytes 4; the Bcc header and the JSON around attachments need a little more.
        let fits = super::MAX_REQUEST_BYTES / 4 * 3 - 64 * 1024;
        let Some(split) = split(&mail.formatted, fits).filter(|s| s.draft.len() <= fits) else {
            let size = mail.formatted.len().div_ceil(3) * 4;
            return Err(GraphError::RequestTooLarge {
                size,
                limit: super::MAX_REQUEST_BYTES,
            });
        };
        let body = bytes::Bytes::from(super::mime::request_body(&split.draft, recipients));
        let messages = self.user_url(&["messages"]);
        let response = self
            .call(deadline, Step::Draft, &mail.id, |http| {
                http.post(messages.clone())
                    .header(CONTENT_TYPE, "text/plain")
                    .body(body.clone())
            })
            .await
            .map_err(needs_read_write)?;
        let draft: Created = json(response).await?;
        let result = self
            .complete(mail, &draft.id, split.attachments, deadline)
            .await;
        if result.is_err() {
            let url = self.user_url(&["messages", &draft.id]);
            // Best effort: a draft left over is clutter in the mailbox, not a sent mail.
            let _ = self
                .call(
                    deadline + std::time::Duration::from_secs(5),
                    Step::Draft,
                    &mail.id,
                    |http| http.delete(url.clone()),
                )
                .await;
        }
        result
    }

    async fn complete(
        &self,
        mail: &crate::message::OutgoingMail,
        draft: &str,
        attachments: Vec<Attachment>,
        deadline: std::time::Instant,
    ) -> Result<super::GraphReceipt, GraphError> {
        for attachment in attachments {
            if attachment.bytes.len() >= UPLOAD_SESSION_FROM {
                self.upload(mail, draft, &attachment, deadline).await?;
            } else {
                let url = self.user_url(&["messages", draft, "attachments"]);
                let item = serde_json::json!({
                    "@odata.type": "#microsoft.graph.fileAttachment",
                    "name": attachment.name,
                    "contentType": attachment.content_type,
                    "contentBytes": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &attachment.bytes),
                    "isInline": attachment.inline,
                    "contentId": attachment.content_id,
                });
                self.call(deadline, Step::Draft, &mail.id, |http| {
                    http.post(url.clone()).json(&item)
                })
                .await
                .map_err(needs_read_write)?;
            }
        }
        let url = self.user_url(&["messages", draft, "send"]);
        let response = self
            .call(deadline, Step::Send, &mail.id, |http| {
                http.post(url.clone())
                    .header(reqwest::header::CONTENT_LENGTH, "0")
            })
            .await?;
        super::accepted(&response)
    }

    /// One attachment through an upload session, in byte ranges of [`CHUNK`].
    async fn upload(
        &self,
        mail: &crate::message::OutgoingMail,
        draft: &str,
        attachment: &Attachment,
        deadline: std::time::Instant,
    ) -> Result<(), GraphError> {
        let url = self.user_url(&["messages", draft, "attachments", "createUploadSession"]);
        let total = attachment.bytes.len();
        let item = serde_json::json!({"AttachmentItem": {
            "attachmentType": "file",
            "name": attachment.name,
            "size": total,
            "contentType": attachment.content_type,
            "isInline": attachment.inline,
            "contentId": attachment.content_id,
        }});
        // An expired session (404 on its URL) is started afresh once: nothing was sent yet.
        let mut restarted = false;
        'session: loop {
            let response = self
                .call(deadline, Step::Draft, &mail.id, |http| {
                    http.post(url.clone()).json(&item)
                })
                .await
                .map_err(needs_read_write)?;
            let session: Session = json(response).await?;
            // The upload URL carries its own authorisation; it must be as safe as the API root.
            let loopback = session
                .upload_url
                .host_str()
                .is_some_and(crate::config::is_loopback_host);
            if session.upload_url.scheme() != "https" && !loopback {
                return Err(GraphError::Interrupted {
                    detail: format!(
                        "Graph gave an upload URL that is not https: {}",
                        session.upload_url.origin().ascii_serialization()
                    ),
                });
            }
            let mut next = first_expected(&session.next_expected_ranges).unwrap_or(0);
            while next < total {
                let end = (next + CHUNK).min(total);
                // A view into the attachment, not a copy.
                let chunk = attachment.bytes.slice(next..end);
                let range = format!("bytes {next}-{}/{total}", end - 1);
                let answer = self
                    .call(deadline, Step::Upload, &mail.id, |http| {
                        http.put(session.upload_url.clone())
                            .header(reqwest::header::CONTENT_RANGE, range.as_str())
                            .body(chunk.clone())
                    })
                    .await;
                let response = match answer {
                    Err(GraphError::Refused(reply)) if reply.status == 404 && !restarted => {
                        tracing::info!(mail_id = %mail.id, attachment = %attachment.name, "the upload session expired: starting a new one");
                        restarted = true;
                        continue 'session;
                    }
                    Err(GraphError::Refused(reply)) if reply.status == 404 => {
                        return Err(GraphError::Interrupted {
                            detail: format!(
                                "the upload session for {:?} expired twice ({reply})",
                                attachment.name
                            ),
                        });
                    }
                    other => other?,
                };
                if response.status() == reqwest::StatusCode::CREATED {
                    return Ok(());
                }
                let progress: Progress = json(response).await?;
                next = first_expected(&progress.next_expected_ranges).unwrap_or(end);
            }
            return Ok(());
        }
    }
}

/// `"3276800-"` or `"3276800-6553599"`: where the next range starts.
fn first_expected(ranges: &[String]) -> Option<usize> {
    ranges.first()?.split('-').next()?.parse().ok()
}

async fn json<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
) -> Result<T, GraphError> {
    let body = super::read_capped(response).await;
    serde_json::from_slice(&body).map_err(|e| GraphError::Interrupted {
        detail: format!("Graph's answer could not be read: {e}"),
    })
}

/// The draft path needs `Mail.ReadWrite`: an access denial here names it.
fn needs_read_write(error: GraphError) -> GraphError {
    match error {
        GraphError::Refused(mut reply) if reply.kind() == super::GraphErrorKind::AccessDenied => {
            reply.message = format!(
                "{} (a mail over Graph's 4 MB request limit is sent as a draft, which needs the application permission Mail.ReadWrite besides Mail.Send)",
                reply.message.trim()
            );
            GraphError::Refused(reply)
        }
        other => other,
    }
}
