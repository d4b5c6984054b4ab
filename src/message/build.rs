//! The MIME form of a [`Mail`], built with lettre.

use base64::Engine;
use lettre::address::Envelope;
use lettre::message::header::{ContentTransferEncoding, ContentType, HeaderName, HeaderValue};
use lettre::message::{Body, MultiPart, SinglePart};

use super::headers::fits_when_folded;
use super::validate::Attachment;
use super::{Mail, MailError, Mailbox, MessageLimits, OutgoingMail};

/// A MIME entity: one part or a multipart.
enum Entity {
    Single(SinglePart),
    Multi(MultiPart),
}

impl Entity {
    fn add_to(self, parent: MultiPart) -> MultiPart {
        match self {
            Self::Single(p) => parent.singlepart(p),
            Self::Multi(m) => parent.multipart(m),
        }
    }
}

impl Mail {
    /// Build the RFC 5322 message: the relay sets `Message-ID` (`<id@from domain>`) and `Date`;
    /// Bcc recipients go into the envelope only.
    /// Takes the mail by value: attachments move into the MIME parts instead of being copied,
    /// which keeps a large attachment from being held twice while the message is built.
    pub fn build(mut self, limits: &MessageLimits) -> Result<OutgoingMail, MailError> {
        let id = uuid::Uuid::now_v7().to_string();
        let message_id = format!("<{id}@{}>", self.from.address.domain());

        let mut builder = lettre::Message::builder()
            .from(self.from.to_lettre())
            .message_id(Some(message_id.clone()))
            .date_now()
            .raw_header(unstructured("Subject", self.subject.as_str())?);
        for (name, list) in [
            ("To", &self.to),
            ("Cc", &self.cc),
            ("Reply-To", &self.reply_to),
        ] {
            if let Some(header) = mailbox_list(name, list)? {
                builder = builder.raw_header(header);
            }
        }
        // Bcc is not given to the builder at all: the envelope below carries it, so no
        // header can leak it whatever lettre's defaults are.
        let envelope = Envelope::new(
            Some(self.from.address.to_lettre()),
            self.recipients()
                .into_iter()
                .map(|a| a.to_lettre())
                .collect(),
        )
        .map_err(|e| MailError::Build(e.to_string()))?;
        builder = builder.envelope(envelope);

        if let Some((x_priority, importance)) = self.priority.header_values() {
            builder = builder
                .raw_header(raw("X-Priority", x_priority)?)
                .raw_header(raw("Importance", importance)?);
        }
        for h in &self.headers {
            builder = builder.raw_header(if h.is_structured() {
                raw(h.name(), h.value())?
            } else {
                unstructured(h.name(), h.value())?
            });
        }

        // lettre lays out the message with a short stand-in for each attachment's base64;
        // the attachments are then encoded straight into the final buffer, one after the
        // other. lettre's own way holds every attachment three times at the end: the bytes,
        // their base64 in its body, and the formatted message.
        let mut attachments = std::mem::take(&mut self.attachments);
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let contents: Vec<(String, Vec<u8>)> = attachments
            .iter_mut()
            .enumerate()
            .map(|(i, a)| {
                let marker = format!("mail-relay-attachment-{nonce}-{i}");
                let content = std::mem::replace(&mut a.content, marker.clone().into_bytes());
                (marker, content)
            })
            .collect();
        let message = match self.content(attachments) {
            Entity::Single(part) => builder.singlepart(part),
            Entity::Multi(multi) => builder.multipart(multi),
        }
        .map_err(|e| MailError::Build(e.to_string()))?;

        let formatted = splice(&message.formatted(), contents, limits.max_message_bytes)?;
        Ok(OutgoingMail {
            id,
            message_id,
            envelope: message.envelope().clone(),
            formatted,
        })
    }

    /// mixed( related( alternative(text, html), inline parts... ), attachments... ),
    /// leaving out every level that would hold a single child.
    fn content(&self, attachments: Vec<Attachment>) -> Entity {
        let text = match (&self.body.text, &self.body.html) {
            (Some(text), Some(html)) => Some(Entity::Multi(MultiPart::alternative_plain_html(
                text.clone(),
                html.clone(),
            ))),
            (Some(text), None) => Some(Entity::Single(SinglePart::plain(text.clone()))),
            (None, Some(html)) => Some(Entity::Single(SinglePart::html(html.clone()))),
            (None, None) => None,
        };
        let (inline, attached): (Vec<_>, Vec<_>) = attachments
            .into_iter()
            .partition(|a| a.content_id.is_some());

        let text = match text {
            Some(text) if !inline.is_empty() => {
                let related = inline
                    .into_iter()
                    .fold(text.add_to(MultiPart::related().build()), |m, a| {
                        m.singlepart(attachment_part(a))
                    });
                Some(Entity::Multi(related))
            }
            other => other,
        };
        match (text, attached.is_empty()) {
            (Some(text), true) => text,
            (text, _) => {
                let mixed = MultiPart::mixed().build();
                let mixed = match text {
                    Some(text) => text.add_to(mixed),
                    None => mixed,
                };
                Entity::Multi(
                    attached
                        .into_iter()
                        .fold(mixed, |m, a| m.singlepart(attachment_part(a))),
                )
            }
        }
    }
}

fn attachment_part(a: Attachment) -> SinglePart {
    let filename = a.filename.as_str().to_owned();
    let kind = match a.content_id {
        Some(id) => lettre::message::Attachment::new_inline_with_name(id, filename),
        None => lettre::message::Attachment::new(filename),
    };
    // Always base64: lettre would pick 7bit for bytes that merely look like ASCII (NUL
    // included), and binary data must survive every hop unchanged. The content here is the
    // stand-in that `splice` replaces with the encoded bytes.
    let body = Body::dangerous_pre_encoded(a.content, ContentTransferEncoding::Base64);
    kind.body(
        body,
        content_type_with_name(&a.content_type, a.filename.as_str()),
    )
}

/// Base64 lines as lettre writes them (RFC 2045: 76 characters, CRLF between lines, none
/// after the last); a body line never starts with a dot, so DATA adds nothing to them.
const LINE_BYTES: usize = 57;
const LINE_CHARS: usize = 76;

fn base64_len(bytes: usize) -> usize {
    let lines = bytes.div_ceil(LINE_BYTES);
    bytes.div_ceil(3) * 4 + lines.saturating_sub(1) * 2
}

/// The message with each stand-in replaced by its attachment in base64, written into one
/// buffer of the exact final size; each attachment's bytes are dropped once encoded. The size
/// is known before anything is encoded, so a mail over `max_message_bytes` costs nothing more.
fn splice(
    skeleton: &[u8],
    contents: Vec<(String, Vec<u8>)>,
    max_message_bytes: usize,
) -> Result<Vec<u8>, MailError> {
    let mut placed = Vec::with_capacity(contents.len());
    for (marker, content) in contents {
        let at = skeleton
            .windows(marker.len())
            .position(|w| w == marker.as_bytes())
            .ok_or_else(|| MailError::Build(format!("{marker} is not in the message")))?;
        placed.push((at, marker.len(), content));
    }
    placed.sort_by_key(|(at, ..)| *at);
    let size = placed
        .iter()
        .fold(skeleton.len(), |size, (_, marker, content)| {
            size - marker + base64_len(content.len())
        });
    if size > max_message_bytes {
        return Err(MailError::TooLarge {
            size,
            limit: max_message_bytes,
        });
    }
    let mut out = Vec::with_capacity(size);
    let mut from = 0;
    for (at, marker, content) in placed {
        out.extend_from_slice(&skeleton[from..at]);
        let mut line = [0u8; LINE_CHARS];
        for (i, chunk) in content.chunks(LINE_BYTES).enumerate() {
            if i > 0 {
                out.extend_from_slice(b"\r\n");
            }
            let n = base64::engine::general_purpose::STANDARD
                .encode_slice(chunk, &mut line)
                .map_err(|e| MailError::Build(format!("base64: {e}")))?;
            out.extend_from_slice(&line[..n]);
        }
        from = at + marker;
    }
    out.extend_from_slice(&skeleton[from..]);
    Ok(out)
}

/// The caller's content type plus a `name` parameter. lettre writes the file name into
/// Content-Disposition per RFC 2231 (`filename*0*=utf-8''...`), which the standard asks
/// for; Outlook and other clients that ignore RFC 2231 read the Content-Type `name`, so
/// it is added in the form they understand (RFC 2047 encoded words inside the quotes, as
/// Thunderbird and Gmail write it).
fn content_type_with_name(content_type: &str, filename: &str) -> ContentType {
    let has_name = content_type
        .split(';')
        .skip(1)
        .any(|p| p.trim_start().to_ascii_lowercase().starts_with("name"));
    let plain = || ContentType::parse(content_type).unwrap_or(ContentType::TEXT_PLAIN);
    if has_name {
        return plain();
    }
    let with_name = |name: &str| ContentType::parse(&format!("{content_type}; name=\"{name}\""));
    let printable = filename.bytes().all(|b| (b' '..=b'~').contains(&b));
    // The mime parser refuses some quoted ASCII (quotes, backslashes, `;`): those names go
    // as encoded words too.
    printable
        .then(|| with_name(filename).ok())
        .flatten()
        .or_else(|| with_name(&encoded_words(filename)).ok())
        .unwrap_or_else(plain)
}

/// An unstructured header (Subject, X-*): ASCII text as it is, anything else as RFC 2047
/// encoded words only. lettre encodes word by word and leaves the spaces between encoded
/// words outside them, where decoders must drop them ("a  b" with non-ASCII letters
/// arrives as "ab"); text that merely looks like an encoded word would be decoded too.
/// ASCII with a word too long for a 998-octet line is encoded too: lettre folds only at
/// spaces, and encoded words are split anywhere.
fn unstructured(name: &str, value: &str) -> Result<HeaderValue, MailError> {
    let plain = value
        .bytes()
        .all(|b| (b' '..=b'~').contains(&b) || b == b'\t')
        && !value.contains("=?")
        && fits_when_folded(name, value);
    if plain {
        return raw(name, value);
    }
    let header = HeaderName::new_from_ascii(name.to_owned())
        .map_err(|e| MailError::Build(format!("header name {name}: {e}")))?;
    let encoded = encoded_words(value).replace(' ', "\r\n ");
    Ok(HeaderValue::dangerous_new_pre_encoded(
        header,
        value.to_owned(),
        encoded,
    ))
}

/// RFC 2047 B-encoded words, split on character boundaries, separated by single spaces
/// (which decoders drop between encoded words).
fn encoded_words(text: &str) -> String {
    // 39 bytes of UTF-8 are 52 characters of base64; with `=?utf-8?B?` and `?=`, 64:
    // a line stays under 78 characters even after `Subject: `.
    const CHUNK: usize = 39;
    let mut words = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut end = rest.len().min(CHUNK);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let (chunk, tail) = rest.split_at(end);
        words.push(format!(
            "=?utf-8?B?{}?=",
            base64::engine::general_purpose::STANDARD.encode(chunk)
        ));
        rest = tail;
    }
    words.join(" ")
}

/// An address header (To, Cc, Reply-To) with one mailbox a line, each as lettre writes a
/// single mailbox. lettre writes a whole list on one line, which a few dozen recipients take
/// past RFC 5322's 998 octets.
fn mailbox_list(name: &str, mailboxes: &[Mailbox]) -> Result<Option<HeaderValue>, MailError> {
    use lettre::message::Mailboxes;
    use lettre::message::header::{Headers, To};

    if mailboxes.is_empty() {
        return Ok(None);
    }
    let header = HeaderName::new_from_ascii(name.to_owned())
        .map_err(|e| MailError::Build(format!("header name {name}: {e}")))?;
    let mut raw_value = Vec::with_capacity(mailboxes.len());
    let mut encoded = Vec::with_capacity(mailboxes.len());
    for mailbox in mailboxes {
        let mailbox = mailbox.to_lettre();
        raw_value.push(mailbox.to_string());
        let mut one = Headers::new();
        one.set(To::from(Mailboxes::from(mailbox)));
        let line = one.to_string();
        let value = line
            .strip_prefix("To: ")
            .and_then(|l| l.strip_suffix("\r\n"))
            .ok_or_else(|| MailError::Build(format!("unexpected {name} header: {line:?}")))?;
        encoded.push(value.to_owned());
    }
    Ok(Some(HeaderValue::dangerous_new_pre_encoded(
        header,
        raw_value.join(", "),
        encoded.join(",\r\n "),
    )))
}

fn raw(name: &str, value: &str) -> Result<HeaderValue, MailError> {
    let name = HeaderName::new_from_ascii(name.to_owned())
        .map_err(|e| MailError::Build(format!("header name {name}: {e}")))?;
    Ok(HeaderValue::new(name, value.to_owned()))
}

#[cfg(test)]
mod tests {
    use mail_parser::{MessageParser, MimeHeaders};
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::message::MailRequest;

    const LIMITS: MessageLimits = MessageLimits {
        max_recipients: 10,
        max_message_bytes: 1 << 20,
    };

    fn build(body: serde_json::Value) -> OutgoingMail {
        serde_json::from_value::<MailRequest>(body)
            .unwrap()
            .validate(&LIMITS)
            .unwrap()
            .build(&LIMITS)
            .unwrap()
    }

    fn head(formatted: &[u8]) -> String {
        let end = formatted.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        String::from_utf8(formatted[..end].to_vec()).unwrap()
    }

    #[test]
    fn structure_is_mixed_related_alternative() {
        let mail = build(json!({
            "from": "a@example.com", "to": "b@example.com", "bcc": "hidden.bcc@example.com",
            "text": "t", "html": "<img src=\"cid:i\">",
            "attachments": [
                {"filename": "i.png", "contentType": "image/png", "content": "AAAA", "contentId": "i"},
                {"filename": "f.txt", "contentType": "text/plain", "content": "AAAA"},
            ],
        }));
        let text = String::from_utf8_lossy(&mail.formatted);
        let mixed = text.find("multipart/mixed").unwrap();
        let related = text.find("multipart/related").unwrap();
        let alternative = text.find("multipart/alternative").unwrap();
        assert!(mixed < related && related < alternative, "{text}");
        // (A distinctive address: the Message-ID ends in `@example.com` too.)
        let head = head(&mail.formatted);
        assert!(
            !head.contains("hidden.bcc") && !head.contains("\r\nBcc:"),
            "{head}"
        );
        let envelope: Vec<String> = mail.envelope.to().iter().map(ToString::to_string).collect();
        assert_eq!(envelope, ["b@example.com", "hidden.bcc@example.com"]);
    }

    #[test]
    fn attachments_are_encoded_as_lettre_would_encode_them() {
        let big: Vec<u8> = (0..100_003u32).map(|i| (i * 7 % 251) as u8).collect();
        let small = b"\x00.\r\n.".to_vec();
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        let mail = build(json!({
            "from": "a@example.com", "to": "b@example.com", "text": "t", "html": "<img src=\"cid:i\">",
            "attachments": [
                {"filename": "big.bin", "contentType": "application/octet-stream", "content": b64(&big)},
                {"filename": "i.png", "contentType": "image/png", "content": b64(&small), "contentId": "i"},
                {"filename": "empty.txt", "contentType": "text/plain", "content": ""},
            ],
        }));
        for content in [&big, &small] {
            let lettre = Body::new_with_encoding(content.clone(), ContentTransferEncoding::Base64)
                .unwrap()
                .into_vec();
            assert_eq!(base64_len(content.len()), lettre.len());
            let mut expected = b"\r\n\r\n".to_vec();
            expected.extend_from_slice(&lettre);
            expected.extend_from_slice(b"\r\n--");
            assert!(
                mail.formatted
                    .windows(expected.len())
                    .any(|w| w == expected),
                "{} bytes not found as lettre encodes them",
                content.len()
            );
        }
        assert!(!String::from_utf8_lossy(&mail.formatted).contains("mail-relay-attachment-"));
        let parsed = MessageParser::default().parse(&mail.formatted).unwrap();
        let contents: Vec<&[u8]> = parsed.attachments().map(|a| a.contents()).collect();
        assert_eq!(contents, [small.as_slice(), big.as_slice(), b"".as_slice()]);
        for n in [0, 1, 2, 3, 56, 57, 58, 114, 115, 1000] {
            let lettre =
                Body::new_with_encoding(vec![0; n], ContentTransferEncoding::Base64).unwrap();
            assert_eq!(base64_len(n), lettre.len(), "{n}");
        }
    }

    #[test]
    fn an_encoded_mail_over_the_limit_is_refused_with_its_exact_size() {
        let limits = MessageLimits {
            max_recipients: 10,
            max_message_bytes: 2_000,
        };
        let content = base64::engine::general_purpose::STANDARD.encode(vec![1u8; 1_400]);
        let request: MailRequest = serde_json::from_value(json!({
            "from": "a@example.com", "to": "b@example.com",
            "attachments": [{"filename": "f", "contentType": "application/octet-stream", "content": content}],
        }))
        .unwrap();
        let mail = request.validate(&LIMITS).unwrap();
        let fits = mail.clone().build(&LIMITS).unwrap().formatted.len();
        match mail.build(&limits) {
            Err(MailError::TooLarge { size, limit: 2_000 }) => assert_eq!(size, fits),
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn non_ascii_filenames_use_rfc_2231() {
        let mail = build(json!({
            "from": "a@example.com", "to": "b@example.com",
            "attachments": [
                {"filename": "Übersicht.pdf", "contentType": "application/pdf", "content": "AAAA"},
                {"filename": "a \"quoted\"; name.txt", "contentType": "application/octet-stream", "content": "AAAA"},
            ],
        }));
        let text = String::from_utf8_lossy(&mail.formatted);
        assert!(
            text.contains("filename*0*=utf-8''%C3%9Cbersicht.pdf"),
            "{text}"
        );
        assert!(text.contains("Content-Transfer-Encoding: base64"), "{text}");
        let parsed = MessageParser::default().parse(&mail.formatted).unwrap();
        let names: Vec<_> = parsed.attachments().map(|a| a.attachment_name()).collect();
        assert_eq!(
            names,
            [Some("Übersicht.pdf"), Some("a \"quoted\"; name.txt")]
        );
        // The Content-Type `name` that clients ignoring RFC 2231 read, decoded the same.
        let ct_names: Vec<_> = parsed
            .attachments()
            .map(|a| a.content_type().and_then(|c| c.attribute("name")))
            .collect();
        assert_eq!(
            ct_names,
            [Some("Übersicht.pdf"), Some("a \"quoted\"; name.txt")]
        );
    }

    #[test]
    fn priority_sets_both_headers_except_for_normal() {
        for (priority, expected) in [
            ("high", Some(("1 (Highest)", "high"))),
            ("low", Some(("5 (Lowest)", "low"))),
            ("normal", None),
        ] {
            let mail = build(json!({
                "from": "a@example.com", "to": "b@example.com", "text": "x", "priority": priority,
            }));
            let parsed = MessageParser::default().parse(&mail.formatted).unwrap();
            let got = parsed
                .header_raw("X-Priority")
                .map(str::trim)
                .zip(parsed.header_raw("Importance").map(str::trim));
            assert_eq!(got, expected, "{priority}");
        }
    }

    #[test]
    fn text_that_looks_like_an_encoded_word_stays_literal() {
        let subject = "=?utf-8?b?SGFja2Vk?= and  two spaces";
        let mail = build(
            json!({"from": "a@example.com", "to": "b@example.com", "subject": subject, "text": "x"}),
        );
        let parsed = MessageParser::default().parse(&mail.formatted).unwrap();
        assert_eq!(parsed.subject(), Some(subject));
    }

    fn squeeze(s: &str) -> String {
        s.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    fn expected_header_names() -> Vec<&'static str> {
        vec![
            "From",
            "To",
            "Subject",
            "Message-ID",
            "Date",
            "MIME-Version",
            "Content-Type",
            "Content-Transfer-Encoding",
            "X-Note",
        ]
    }

    proptest! {
        // Any one-line text survives as the subject, and no input adds a header.
        #[test]
        fn any_single_line_subject_round_trips(subject in "[^\\r\\n\\p{Cc}]{0,200}") {
            let mail = build(json!({
                "from": "a@example.com", "to": "b@example.com", "subject": subject, "text": "x",
                "headers": {"X-Note": subject},
            }));
            let parsed = MessageParser::default().parse(&mail.formatted).unwrap();
            // Compared with white-space runs collapsed: folding may turn a run into one
            // space, and mail-parser drops the second of two spaces after an encoded word.
            prop_assert_eq!(squeeze(parsed.subject().unwrap_or_default()), squeeze(&subject));
            let mut names: Vec<&str> = parsed.headers().iter().map(|h| h.name()).collect();
            names.sort_unstable();
            let mut expected = expected_header_names();
            expected.sort_unstable();
            prop_assert_eq!(names, expected);
        }

        #[test]
        fn any_display_name_round_trips(name in "[^\\r\\n\\p{Cc}]{1,80}") {
            prop_assume!(!name.trim().is_empty());
            let mail = build(json!({"from": {"name": name, "address": "a@example.com"}, "to": "b@example.com", "text": "x"}));
            let parsed = MessageParser::default().parse(&mail.formatted).unwrap();
            let from = parsed.from().unwrap().first().unwrap();
            prop_assert_eq!(from.address(), Some("a@example.com"));
            prop_assert_eq!(squeeze(from.name().unwrap_or_default()), squeeze(&name));
        }
    }
}
