//! The JSON body of `POST /mail`, as the caller sends it. Nothing here is trusted yet:
//! [`MailRequest::validate`] turns it into a [`super::Mail`].

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{
    ArrayBuilder, KnownFormat, ObjectBuilder, OneOfBuilder, Schema, SchemaFormat, Type,
};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{PartialSchema, ToSchema};

use super::Priority;

/// A mail to send.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schema(example = json!({
    "from": {"name": "Contoso Support", "address": "support@contoso.com"},
    "to": ["alice@example.com", {"name": "Bob Müller", "address": "bob@example.com"}],
    "bcc": "audit@contoso.com",
    "replyTo": "helpdesk@contoso.com",
    "subject": "Ihre Anfrage – Ticket 4711",
    "text": "Hello Alice,\n\nyour ticket is resolved.\n",
    "html": "<p>Hello Alice,</p><p>your ticket is resolved.</p><img src=\"cid:logo\">",
    "attachments": [
        {"filename": "report.pdf", "contentType": "application/pdf", "content": "JVBERi0xLjQK"},
        {"filename": "logo.png", "contentType": "image/png", "content": "iVBORw0KGgo=", "contentId": "logo"}
    ],
    "headers": {"X-Ticket-Id": "4711", "In-Reply-To": "<ticket-4711@contoso.com>"},
    "priority": "high"
}))]
pub struct MailRequest {
    /// The sender: `From` header and envelope sender.
    pub from: MailboxInput,
    /// Recipients shown in `To`.
    #[serde(default)]
    pub to: Recipients,
    /// Recipients shown in `Cc`.
    #[serde(default)]
    pub cc: Recipients,
    /// Hidden recipients: in the envelope only, never in a header.
    #[serde(default)]
    pub bcc: Recipients,
    /// Where replies should go (`Reply-To`).
    #[serde(default)]
    pub reply_to: Recipients,
    /// Any Unicode text on one line; encoded per RFC 2047 when not ASCII.
    #[serde(default)]
    #[schema(example = "Ihre Anfrage – Ticket 4711")]
    pub subject: Option<String>,
    /// Plain-text body. With `html` as well, the mail is multipart/alternative. Every line break
    /// (CRLF, a lone CR or a lone LF) is sent as CRLF.
    #[serde(default)]
    pub text: Option<String>,
    /// HTML body; inline images are referenced as `cid:<contentId>`. Line breaks are sent as CRLF.
    #[serde(default)]
    pub html: Option<String>,
    /// Files, base64-encoded. With `contentId`, an inline image for the HTML body.
    #[serde(default)]
    pub attachments: Vec<AttachmentInput>,
    /// Extra headers, from an allow-list: In-Reply-To, References, List-Id, List-Unsubscribe,
    /// List-Unsubscribe-Post, Auto-Submitted, Keywords, Comments, and `X-*` headers except
    /// those starting with X-MS-, X-Microsoft-, X-Forefront-, X-Exchange-, X-Originating-,
    /// X-Spam, X-Virus, X-Priority, X-MSMail-Priority.
    #[serde(default)]
    #[schema(example = json!({"X-Ticket-Id": "4711"}))]
    pub headers: BTreeMap<String, String>,
    /// `high` or `low` set `X-Priority` and `Importance`; `normal` (the default) sets neither.
    #[serde(default)]
    pub priority: Priority,
}

/// A file attached to the mail.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AttachmentInput {
    /// The file name shown to the recipient (any Unicode; encoded per RFC 2231).
    #[schema(example = "Bericht März.pdf")]
    pub filename: String,
    /// The MIME type: type/subtype and parameters (`text/plain; charset=utf-8`), ASCII, at most
    /// 255 characters; not multipart.
    #[schema(example = "application/pdf")]
    pub content_type: String,
    /// The file's bytes, standard base64 with padding.
    #[schema(value_type = String, example = "JVBERi0xLjQK")]
    pub content: Base64Content,
    /// Makes the file an inline part of the HTML body, referenced there as `cid:<contentId>`.
    #[serde(default)]
    #[schema(example = "logo")]
    pub content_id: Option<String>,
}

/// An attachment's `content`, decoded from base64 while the body is parsed. The text is read
/// where it lies in the request body and never copied out of it: a large attachment is held
/// as the body and its decoded bytes, not also as an owned copy of its base64 (a third of the
/// peak memory for one large mail). Text that is not base64 is kept as its error, which
/// validation reports with every other invalid field.
pub struct Base64Content {
    /// The length of the text as sent, white space included: the early size estimate.
    text_len: usize,
    decoded: Result<Vec<u8>, String>,
}

impl Base64Content {
    /// Decode standard base64 with padding; white space (line-wrapped base64) is ignored.
    pub fn decode(text: &str) -> Self {
        Self {
            text_len: text.len(),
            decoded: super::validate::decode_base64(text),
        }
    }

    /// The length of the base64 text, before decoding.
    pub fn text_len(&self) -> usize {
        self.text_len
    }

    /// The decoded bytes, or what is wrong with the text.
    pub fn into_decoded(self) -> Result<Vec<u8>, String> {
        self.decoded
    }
}

impl fmt::Debug for Base64Content {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match &self.decoded {
            Ok(bytes) => write!(f, "Base64Content({} bytes)", bytes.len()),
            Err(e) => write!(f, "Base64Content(invalid: {e})"),
        }
    }
}

impl<'de> Deserialize<'de> for Base64Content {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TextVisitor;

        impl Visitor<'_> for TextVisitor {
            type Value = Base64Content;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }

            // serde_json hands over the text in the body itself (or, when it has escapes, in
            // its scratch buffer): decoded from there, it is never copied into a String.
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Base64Content::decode(v))
            }
        }

        d.deserialize_str(TextVisitor)
    }
}

/// A mailbox with a display name.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NamedMailbox {
    /// Display name (any Unicode; encoded per RFC 2047).
    #[serde(default)]
    #[schema(example = "Bob Müller")]
    pub name: Option<String>,
    #[schema(example = "bob@example.com", format = Email)]
    pub address: String,
}

/// An address as a string (`alice@example.com`), or `{name, address}`.
#[derive(Debug, Clone)]
pub enum MailboxInput {
    Address(String),
    Named(NamedMailbox),
}

impl MailboxInput {
    pub fn address(&self) -> &str {
        match self {
            Self::Address(a) => a,
            Self::Named(n) => &n.address,
        }
    }

    pub fn name(&self) -> Option<&str> {
        match self {
            Self::Address(_) => None,
            Self::Named(n) => n.name.as_deref(),
        }
    }
}

const MAILBOX_EXPECTED: &str = "an e-mail address string or an object {name, address}";

struct MailboxVisitor;

impl<'de> Visitor<'de> for MailboxVisitor {
    type Value = MailboxInput;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(MAILBOX_EXPECTED)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(MailboxInput::Address(v.to_owned()))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        NamedMailbox::deserialize(de::value::MapAccessDeserializer::new(map))
            .map(MailboxInput::Named)
    }
}

impl<'de> Deserialize<'de> for MailboxInput {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(MailboxVisitor)
    }
}

impl PartialSchema for MailboxInput {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::Email)))
                    .examples([serde_json::json!("alice@example.com")]),
            )
            .item(Ref::from_schema_name(NamedMailbox::name()))
            .description(Some(format!("A mailbox: {MAILBOX_EXPECTED}.")))
            .into()
    }
}

impl ToSchema for MailboxInput {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((NamedMailbox::name().into_owned(), NamedMailbox::schema()));
        NamedMailbox::schemas(schemas);
    }
}

/// One mailbox or a list of them.
#[derive(Debug, Clone, Default)]
pub struct Recipients(pub Vec<MailboxInput>);

struct RecipientsVisitor;

impl<'de> Visitor<'de> for RecipientsVisitor {
    type Value = Recipients;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a list of mailboxes, or one mailbox: {MAILBOX_EXPECTED}")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        MailboxVisitor.visit_str(v).map(|m| Recipients(vec![m]))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        MailboxVisitor.visit_map(map).map(|m| Recipients(vec![m]))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut all = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(one) = seq.next_element::<MailboxInput>()? {
            all.push(one);
        }
        Ok(Recipients(all))
    }

    // `"cc": null` means none, as leaving it out does.
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Recipients::default())
    }
}

impl<'de> Deserialize<'de> for Recipients {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(RecipientsVisitor)
    }
}

impl PartialSchema for Recipients {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(
                ArrayBuilder::new()
                    .items(Ref::from_schema_name(<MailboxInput as ToSchema>::name()))
                    .examples([serde_json::json!([
                        "alice@example.com",
                        {"name": "Bob Müller", "address": "bob@example.com"}
                    ])]),
            )
            .item(Ref::from_schema_name(<MailboxInput as ToSchema>::name()))
            // `null` is accepted as "none" (see `visit_unit`); the schema must say so, or
            // schema-driven clients and fuzzers treat a valid request as invalid.
            .item(ObjectBuilder::new().schema_type(Type::Null))
            .description(Some("A list of mailboxes, a single one, or null (none)."))
            .into()
    }
}

impl ToSchema for Recipients {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((
            <MailboxInput as ToSchema>::name().into_owned(),
            MailboxInput::schema(),
        ));
        MailboxInput::schemas(schemas);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_or_many_and_both_mailbox_forms() {
        let r: MailRequest = serde_json::from_value(serde_json::json!({
            "from": {"name": "A", "address": "a@example.com"},
            "to": "b@example.com",
            "cc": ["c@example.com", {"address": "d@example.com"}],
            "bcc": null,
        }))
        .unwrap();
        assert_eq!(r.from.name(), Some("A"));
        assert_eq!(r.to.0.len(), 1);
        assert_eq!(r.cc.0[1].address(), "d@example.com");
        assert!(r.bcc.0.is_empty());
        assert_eq!(r.priority, Priority::Normal);
    }

    fn content(json: &str) -> Base64Content {
        let body = format!(
            r#"{{"from": "a@example.com", "attachments": [
                {{"filename": "f", "contentType": "text/plain", "content": {json}}}]}}"#
        );
        let mut r: MailRequest = serde_json::from_str(&body).unwrap();
        r.attachments.remove(0).content
    }

    #[test]
    fn attachment_content_is_decoded_while_parsed() {
        let plain = content(r#""aGk/Pz8+""#);
        assert_eq!(plain.text_len(), 8);
        assert_eq!(plain.into_decoded().unwrap(), b"hi???>");
        // Escapes (`\/` from PHP's json_encode, `\n` in wrapped base64) decode the same.
        assert_eq!(content(r#""aGk\/Pz8+""#).into_decoded().unwrap(), b"hi???>");
        assert_eq!(
            content(r#""aGk/\r\nPz8+""#).into_decoded().unwrap(),
            b"hi???>"
        );
        let bad = content(r#""not base64!""#).into_decoded().unwrap_err();
        assert!(bad.starts_with("not valid base64"), "{bad}");
        let wrong = serde_json::from_str::<AttachmentInput>(
            r#"{"filename": "f", "contentType": "text/plain", "content": 5}"#,
        )
        .unwrap_err();
        assert!(
            wrong
                .to_string()
                .starts_with("invalid type: integer `5`, expected a string"),
            "{wrong}"
        );
    }

    #[test]
    fn unknown_fields_are_refused_at_every_level() {
        for body in [
            serde_json::json!({"from": "a@example.com", "too": "b@example.com"}),
            serde_json::json!({"from": {"address": "a@example.com", "mail": "x"}}),
            serde_json::json!({"from": "a@example.com", "attachments": [
                {"filename": "f", "contentType": "text/plain", "content": "", "size": 1}
            ]}),
        ] {
            assert!(serde_json::from_value::<MailRequest>(body).is_err());
        }
    }
}
