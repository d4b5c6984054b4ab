//! From the caller's [`MailRequest`] to a [`Mail`] whose every field is parsed.
//! All field errors are collected, so the caller can fix everything in one go.

use base64::Engine;
use lettre::message::header::ContentType;

use super::request::{MailboxInput, Recipients};
use super::{
    CustomHeader, EmailAddress, FieldError, HeaderText, MailError, MailRequest, Mailbox,
    MessageLimits, Priority,
};

/// Longest attachment file name, in characters (what file systems allow).
const MAX_FILENAME: usize = 255;

/// Longest attachment content type, in characters (type, subtype and parameters).
const MAX_CONTENT_TYPE: usize = 255;

/// Longest word (text without a space) of a display name. lettre folds a name only at its
/// spaces and writes the address after it on the same line; this keeps an escaped name word
/// (twice as long at worst), the address and the brackets within RFC 5322's 998 octets.
const MAX_NAME_WORD: usize = 256;

/// A mail whose every part is valid; [`Mail::build`] gives its MIME form.
#[derive(Debug, Clone)]
pub struct Mail {
    pub from: Mailbox,
    pub to: Vec<Mailbox>,
    pub cc: Vec<Mailbox>,
    /// Envelope only: never written into a header.
    pub bcc: Vec<Mailbox>,
    pub reply_to: Vec<Mailbox>,
    pub subject: HeaderText,
    pub body: Body,
    pub attachments: Vec<Attachment>,
    pub headers: Vec<CustomHeader>,
    pub priority: Priority,
}

/// The text parts; at least one of them, or an attachment, is present.
#[derive(Debug, Clone, Default)]
pub struct Body {
    pub text: Option<String>,
    pub html: Option<String>,
}

/// A decoded attachment.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub filename: HeaderText,
    /// As the caller gave it; checked to parse as a MIME type.
    pub content_type: String,
    pub content: Vec<u8>,
    /// Set for inline parts of the HTML body (without angle brackets).
    pub content_id: Option<String>,
}

impl Mail {
    /// Every envelope recipient (to, cc, bcc), each address once.
    pub fn recipients(&self) -> Vec<&EmailAddress> {
        let mut seen = std::collections::HashSet::new();
        self.to
            .iter()
            .chain(&self.cc)
            .chain(&self.bcc)
            .map(|m| &m.address)
            .filter(|a| seen.insert(a.as_str().to_ascii_lowercase()))
            .collect()
    }
}

/// A file uploaded as a part of a `multipart/form-data` request, already read.
#[derive(Debug, Clone)]
pub struct UploadedFile {
    /// The form part's file name.
    pub filename: String,
    /// The form part's Content-Type (`application/octet-stream` when it has none).
    pub content_type: String,
    pub content: Vec<u8>,
    /// Set for inline parts of the HTML body (form part named `cid:<contentId>`).
    pub content_id: Option<String>,
}

/// An attachment before its checks, from the JSON (base64) or from a form upload.
struct Candidate {
    field: String,
    filename: String,
    content_type: String,
    content: Content,
    content_id: Option<String>,
}

enum Content {
    /// Decoded from base64 while the JSON was parsed, or why it could not be.
    Base64(Result<Vec<u8>, String>),
    Bytes(Vec<u8>),
}

impl MailRequest {
    /// Parse every field; on failure, list every invalid field.
    pub fn validate(self, limits: &MessageLimits) -> Result<Mail, MailError> {
        self.validate_with_files(limits, Vec::new())
    }

    /// As [`MailRequest::validate`], with files uploaded beside the JSON; their fields are
    /// named `files[i]`, in upload order.
    pub fn validate_with_files(
        mut self,
        limits: &MessageLimits,
        files: Vec<UploadedFile>,
    ) -> Result<Mail, MailError> {
        // Checked first: a request with 100,000 recipients is refused without parsing them.
        let count = self.to.0.len() + self.cc.0.len() + self.bcc.0.len();
        if count > limits.max_recipients {
            return Err(MailError::TooManyRecipients {
                count,
                limit: limits.max_recipients,
            });
        }
        // Base64 in JSON is about as long as base64 in MIME: a cheap early refusal of
        // mails that cannot fit, before building anything.
        let estimate = self
            .attachments
            .iter()
            .map(|a| a.content.text_len())
            .sum::<usize>()
            + files
                .iter()
                .map(|f| f.content.len().div_ceil(3) * 4)
                .sum::<usize>()
            + self.text.as_ref().map_or(0, String::len)
            + self.html.as_ref().map_or(0, String::len);
        if estimate > limits.max_message_bytes {
            return Err(MailError::TooLarge {
                size: estimate,
                limit: limits.max_message_bytes,
            });
        }

        let mut errors = Errors::default();
        let from = errors.mailbox("from", &self.from);
        let to = errors.recipients("to", &self.to);
        let cc = errors.recipients("cc", &self.cc);
        let bcc = errors.recipients("bcc", &self.bcc);
        let reply_to = errors.recipients("replyTo", &self.reply_to);
        if count == 0 {
            errors.push("to", "at least one recipient is needed in to, cc or bcc");
        }
        let subject = errors.header_text("subject", self.subject.as_deref().unwrap_or_default());

        for (field, body) in [("text", &self.text), ("html", &self.html)] {
            if body.as_ref().is_some_and(|b| b.contains('\0')) {
                errors.push(field, "contains a NUL character, which mail cannot carry");
            }
        }
        let file_count = files.len();
        // Moved, not copied: the decoded bytes exist once.
        let attached = std::mem::take(&mut self.attachments);
        let attached_count = attached.len();
        if self.text.is_none() && self.html.is_none() && attached_count == 0 && file_count == 0 {
            errors.push(
                "text",
                "the mail needs text, html or at least one attachment",
            );
        }
        let candidates = attached
            .into_iter()
            .enumerate()
            .map(|(i, a)| Candidate {
                field: format!("attachments[{i}]"),
                filename: a.filename,
                content_type: a.content_type,
                content: Content::Base64(a.content.into_decoded()),
                content_id: a.content_id,
            })
            // Uploads are moved, not copied: their bytes exist once.
            .chain(files.into_iter().enumerate().map(|(i, f)| Candidate {
                field: format!("files[{i}]"),
                filename: f.filename,
                content_type: f.content_type,
                content: Content::Bytes(f.content),
                content_id: f.content_id,
            }));
        let mut attachments = Vec::with_capacity(attached_count + file_count);
        let mut content_ids = std::collections::HashSet::new();
        for candidate in candidates {
            if let Some(id) = &candidate.content_id {
                let field = format!("{}.contentId", candidate.field);
                if self.html.is_none() {
                    errors.push(
                        field,
                        "inline parts (contentId) need an html body that refers to them as cid:",
                    );
                } else if !content_ids.insert(id.trim_matches(['<', '>']).to_owned()) {
                    errors.push(field, "used by another attachment");
                }
            }
            if let Some(a) = errors.attachment(candidate) {
                attachments.push(a);
            }
        }

        let mut headers = Vec::with_capacity(self.headers.len());
        let mut names = std::collections::HashSet::new();
        for (name, value) in &self.headers {
            let field = format!("headers.{name}");
            match CustomHeader::parse(name, value) {
                Ok(h) if !names.insert(h.name().to_ascii_lowercase()) => {
                    errors.push(field, "given twice (header names ignore case)");
                }
                Ok(h) => headers.push(h),
                Err(message) => errors.push(field, message),
            }
        }

        match (from, subject) {
            (Some(from), Some(subject)) if errors.0.is_empty() => Ok(Mail {
                from,
                to,
                cc,
                bcc,
                reply_to,
                subject,
                body: Body {
                    text: self.text.map(crlf_line_endings),
                    html: self.html.map(crlf_line_endings),
                },
                attachments,
                headers,
                priority: self.priority,
            }),
            _ => Err(MailError::Invalid(errors.0)),
        }
    }
}

/// Every line break (CRLF, a lone CR, a lone LF) as CRLF. lettre turns a lone LF into CRLF
/// but leaves a lone CR, which some receivers take for a line end: a `.` after it would end
/// the DATA there without having been dot-stuffed (SMTP smuggling).
fn crlf_line_endings(text: String) -> String {
    if !text.contains('\r') && !text.contains('\n') {
        return text;
    }
    let mut out = String::with_capacity(text.len() + text.len() / 32);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                chars.next_if_eq(&'\n');
                out.push_str("\r\n");
            }
            '\n' => out.push_str("\r\n"),
            c => out.push(c),
        }
    }
    out
}

/// The field errors found so far.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, field: impl Into<String>, message: impl std::fmt::Display) {
        self.0.push(FieldError::new(field, message));
    }

    fn header_text(&mut self, field: &str, value: &str) -> Option<HeaderText> {
        HeaderText::parse(value)
            .map_err(|e| self.push(field, e))
            .ok()
    }

    fn mailbox(&mut self, field: &str, input: &MailboxInput) -> Option<Mailbox> {
        // A string names the field itself; an object names its member.
        let (address_field, name_field) = match input {
            MailboxInput::Address(_) => (field.to_owned(), field.to_owned()),
            MailboxInput::Named(_) => (format!("{field}.address"), format!("{field}.name")),
        };
        let address = EmailAddress::parse(input.address())
            .map_err(|e| self.push(address_field, e))
            .ok();
        let name = match input.name().filter(|n| !n.trim().is_empty()) {
            None => Some(None),
            Some(n) if n.split(' ').any(|w| w.chars().count() > MAX_NAME_WORD) => {
                self.push(
                    &name_field,
                    format!(
                        "has a word (text without a space) longer than {MAX_NAME_WORD} characters, \
                         too long for a header line"
                    ),
                );
                None
            }
            Some(n) => self.header_text(&name_field, n).map(Some),
        };
        Some(Mailbox::new(name?, address?))
    }

    fn recipients(&mut self, field: &str, list: &Recipients) -> Vec<Mailbox> {
        list.0
            .iter()
            .enumerate()
            .filter_map(|(i, m)| self.mailbox(&format!("{field}[{i}]"), m))
            .collect()
    }

    fn attachment(&mut self, input: Candidate) -> Option<Attachment> {
        let field = &input.field;
        let before = self.0.len();
        let filename_field = format!("{field}.filename");
        let filename = self.header_text(&filename_field, &input.filename);
        if input.filename.trim().is_empty() {
            self.push(&filename_field, "must not be empty");
        } else if input.filename.chars().count() > MAX_FILENAME {
            self.push(
                &filename_field,
                format!("is longer than {MAX_FILENAME} characters"),
            );
        }
        let content_type = self.content_type(&format!("{field}.contentType"), &input.content_type);
        let content = match input.content {
            Content::Base64(decoded) => decoded
                .map_err(|message| self.push(format!("{field}.content"), message))
                .ok(),
            Content::Bytes(bytes) => Some(bytes),
        };
        let content_id = input
            .content_id
            .as_deref()
            .map(|id| self.content_id(&format!("{field}.contentId"), id));
        if self.0.len() > before {
            return None;
        }
        Some(Attachment {
            filename: filename?,
            content_type: content_type?,
            content: content?,
            content_id: content_id.flatten(),
        })
    }

    fn content_type(&mut self, field: &str, value: &str) -> Option<String> {
        const HINT: &str = "not a MIME type like application/pdf or image/png";
        if value.contains(['\r', '\n']) {
            self.push(field, "contains a line break (CR or LF)");
            return None;
        }
        if !value.is_ascii() {
            self.push(field, format!("{HINT}: only ASCII is allowed"));
            return None;
        }
        if value.len() > MAX_CONTENT_TYPE {
            self.push(
                field,
                format!("is longer than {MAX_CONTENT_TYPE} characters; {HINT}"),
            );
            return None;
        }
        // type/subtype plus parameters, as the `mime` crate (lettre's parser) reads them.
        if ContentType::parse(value).is_err() {
            self.push(field, HINT);
            return None;
        }
        let lower = value.trim_start().to_ascii_lowercase();
        if lower.starts_with("multipart/") {
            self.push(
                field,
                "multipart types cannot be attachments; the relay builds the structure",
            );
            return None;
        }
        Some(value.trim().to_owned())
    }

    fn content_id(&mut self, field: &str, value: &str) -> Option<String> {
        let id = value
            .strip_prefix('<')
            .and_then(|v| v.strip_suffix('>'))
            .unwrap_or(value);
        let ok = !id.is_empty()
            && id.len() <= 250
            && id
                .chars()
                .all(|c| c.is_ascii_graphic() && !"<>()[]\\\",;:".contains(c));
        if ok {
            Some(id.to_owned())
        } else {
            self.push(
                field,
                "must be letters, digits and . - _ @ (e.g. logo or logo@contoso.com)",
            );
            None
        }
    }
}

/// An attachment's base64 `content` decoded, or the message that names what is wrong with it.
pub(super) fn decode_base64(value: &str) -> Result<Vec<u8>, String> {
    // Line-wrapped base64 (as MIME tools write it) is common; the white space carries nothing.
    // Decoded without a white-space-free copy of the whole text, which for a large
    // attachment would be one more copy of it; only invalid input is copied, for the error.
    if let Some(decoded) = decode_base64_lean(value) {
        return Ok(decoded);
    }
    let compact: String = value.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact)
        .map_err(|e| format!("not valid base64 (standard alphabet with padding): {e}"))
}

/// Standard base64 with padding, white space ignored, decoded in slices of a few kilobytes;
/// `None` for anything invalid.
fn decode_base64_lean(value: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::STANDARD;
    if !value.bytes().any(|b| b.is_ascii_whitespace()) {
        return STANDARD.decode(value).ok();
    }
    // A multiple of 4: every slice but the last decodes on its own.
    const SLICE: usize = 4096;
    let mut out = Vec::with_capacity(value.len() / 4 * 3);
    let mut slice = Vec::with_capacity(SLICE);
    let mut bytes = value
        .bytes()
        .filter(|b| !b.is_ascii_whitespace())
        .peekable();
    while bytes.peek().is_some() {
        slice.clear();
        slice.extend(bytes.by_ref().take(SLICE));
        // Padding ends the data: after it, only the end may follow.
        if slice.last() == Some(&b'=') && bytes.peek().is_some() {
            return None;
        }
        STANDARD.decode_vec(&slice, &mut out).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const LIMITS: MessageLimits = MessageLimits {
        max_recipients: 5,
        max_message_bytes: 10_000,
    };

    fn validate(body: serde_json::Value) -> Result<Mail, MailError> {
        serde_json::from_value::<MailRequest>(body)
            .unwrap()
            .validate(&LIMITS)
    }

    fn fields(result: Result<Mail, MailError>) -> Vec<String> {
        match result {
            Err(MailError::Invalid(errors)) => errors.into_iter().map(|e| e.field).collect(),
            other => panic!("expected field errors, got {other:?}"),
        }
    }

    #[test]
    fn a_good_request_becomes_a_mail() {
        let mail = validate(json!({
            "from": {"name": "Zoë", "address": "zoe@example.com"},
            "to": ["a@example.com", "A@example.com"],
            "bcc": "b@example.com",
            "subject": "Grüße",
            "text": "hi",
            "attachments": [{"filename": "a.txt", "contentType": "text/plain", "content": "aGk="}],
        }))
        .unwrap();
        assert_eq!(mail.from.name.as_ref().unwrap().as_str(), "Zoë");
        assert_eq!(mail.attachments[0].content, b"hi");
        // The same address twice is one envelope recipient.
        assert_eq!(mail.recipients().len(), 2);
    }

    #[test]
    fn every_invalid_field_is_listed() {
        let got = fields(validate(json!({
            "from": {"name": "Bad\nName", "address": "nope"},
            "to": ["a@example.com", "b@example.com", "not-an-address"],
            "cc": [{"address": "c@@"}],
            "subject": "Hi\r\nBcc: x@example.com",
            "html": "<p>",
            "attachments": [{"filename": "", "contentType": "bad", "content": "!!", "contentId": "a b"}],
            "headers": {"Received": "x", "X-Ok": "fine"},
        })));
        assert_eq!(
            got,
            [
                "from.address",
                "from.name",
                "to[2]",
                "cc[0].address",
                "subject",
                "attachments[0].filename",
                "attachments[0].contentType",
                "attachments[0].content",
                "attachments[0].contentId",
                "headers.Received",
            ]
        );
    }

    #[test]
    fn every_line_break_of_text_and_html_becomes_crlf() {
        let mail = validate(json!({
            "from": "a@example.com", "to": "b@example.com",
            "text": "a\rb\r.\rc\nd\r\ne\r\r\n\n",
            "html": "<p>\r.\r</p>",
        }))
        .unwrap();
        assert_eq!(
            mail.body.text.as_deref(),
            Some("a\r\nb\r\n.\r\nc\r\nd\r\ne\r\n\r\n\r\n")
        );
        assert_eq!(mail.body.html.as_deref(), Some("<p>\r\n.\r\n</p>"));
    }

    #[test]
    fn content_type_is_a_mime_type_of_at_most_255_characters() {
        let attachment = |content_type: &str| {
            json!({
                "from": "a@example.com", "to": "b@example.com",
                "attachments": [{"filename": "f", "contentType": content_type, "content": ""}],
            })
        };
        let longest = format!("application/x-{}", "a".repeat(255 - 14));
        assert!(validate(attachment(&longest)).is_ok());
        assert!(validate(attachment("text/plain; charset=utf-8")).is_ok());
        for bad in [
            format!("{longest}a"),
            format!("application/x-{}", "a".repeat(3000)),
            "text".to_owned(),
            "text/plain; charset".to_owned(),
            "/plain".to_owned(),
        ] {
            assert_eq!(
                fields(validate(attachment(&bad))),
                ["attachments[0].contentType"],
                "{bad}"
            );
        }
    }

    #[test]
    fn a_display_name_word_too_long_for_a_header_line_is_named() {
        let got = fields(validate(json!({
            "from": {"name": "a".repeat(257), "address": "a@example.com"},
            "to": [{"name": format!("{} x", "b".repeat(256)), "address": "b@example.com"}],
            "text": "x",
        })));
        assert_eq!(got, ["from.name"]);
    }

    #[test]
    fn needs_a_recipient_and_a_body() {
        let got = fields(validate(json!({"from": "a@example.com"})));
        assert_eq!(got, ["to", "text"]);
    }

    #[test]
    fn inline_parts_need_html() {
        let got = fields(validate(json!({
            "from": "a@example.com", "to": "b@example.com", "text": "x",
            "attachments": [{"filename": "l.png", "contentType": "image/png", "content": "", "contentId": "logo"}],
        })));
        assert_eq!(got, ["attachments[0].contentId"]);
    }

    #[test]
    fn recipient_limit_counts_to_cc_and_bcc() {
        let err = validate(json!({
            "from": "a@example.com",
            "to": ["1@example.com", "2@example.com"],
            "cc": ["3@example.com", "4@example.com"],
            "bcc": ["5@example.com", "6@example.com"],
            "text": "x",
        }))
        .unwrap_err();
        assert!(matches!(
            err,
            MailError::TooManyRecipients { count: 6, limit: 5 }
        ));
    }

    #[test]
    fn wrapped_base64_decodes_as_the_compact_text_would() {
        use base64::engine::general_purpose::STANDARD;
        let bytes: Vec<u8> = (0..20_000u32).map(|i| (i % 253) as u8).collect();
        let encoded = STANDARD.encode(&bytes);
        let wrapped: String = encoded
            .as_bytes()
            .chunks(76)
            .map(|line| std::str::from_utf8(line).unwrap())
            .collect::<Vec<_>>()
            .join("\r\n");
        assert_eq!(decode_base64_lean(&wrapped).unwrap(), bytes);
        assert_eq!(decode_base64_lean(&encoded).unwrap(), bytes);
        assert_eq!(decode_base64_lean(" aGk= \n").unwrap(), b"hi");
        // Padding in the middle is refused however the slices fall.
        let twice = format!("{}\n{}", "QUFB".repeat(1023) + "QQ==", "QUFB");
        assert!(decode_base64_lean(&twice).is_none());
        assert!(STANDARD.decode(twice.replace('\n', "")).is_err());
        assert!(decode_base64_lean("aGk\n").is_none());
    }

    #[test]
    fn oversized_content_is_refused_before_decoding() {
        let err = validate(json!({
            "from": "a@example.com", "to": "b@example.com",
            "attachments": [{"filename": "big", "contentType": "application/octet-stream", "content": "A".repeat(10_004)}],
        }))
        .unwrap_err();
        assert!(matches!(err, MailError::TooLarge { limit: 10_000, .. }));
    }
}
