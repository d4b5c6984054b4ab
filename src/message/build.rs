//! The MIME form of a [`Mail`], built with lettre.

use lettre::address::Envelope;
use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{MultiPart, SinglePart};

use super::validate::Attachment;
use super::{Mail, MailError, MessageLimits, OutgoingMail};

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
    pub fn build(&self, limits: &MessageLimits) -> Result<OutgoingMail, MailError> {
        let id = uuid::Uuid::now_v7().to_string();
        let message_id = format!("<{id}@{}>", self.from.address.domain());

        let mut builder = lettre::Message::builder()
            .from(self.from.to_lettre())
            .message_id(Some(message_id.clone()))
            .date_now()
            .subject(self.subject.as_str());
        for m in &self.to {
            builder = builder.to(m.to_lettre());
        }
        for m in &self.cc {
            builder = builder.cc(m.to_lettre());
        }
        for m in &self.reply_to {
            builder = builder.reply_to(m.to_lettre());
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
            builder = builder.raw_header(raw(h.name(), h.value())?);
        }

        let message = match self.content() {
            Entity::Single(part) => builder.singlepart(part),
            Entity::Multi(multi) => builder.multipart(multi),
        }
        .map_err(|e| MailError::Build(e.to_string()))?;

        let formatted = message.formatted();
        if formatted.len() > limits.max_message_bytes {
            return Err(MailError::TooLarge {
                size: formatted.len(),
                limit: limits.max_message_bytes,
            });
        }
        Ok(OutgoingMail {
            id,
            message_id,
            envelope: message.envelope().clone(),
            formatted,
        })
    }

    /// mixed( related( alternative(text, html), inline parts... ), attachments... ),
    /// leaving out every level that would hold a single child.
    fn content(&self) -> Entity {
        let text = match (&self.body.text, &self.body.html) {
            (Some(text), Some(html)) => Some(Entity::Multi(MultiPart::alternative_plain_html(
                text.clone(),
                html.clone(),
            ))),
            (Some(text), None) => Some(Entity::Single(SinglePart::plain(text.clone()))),
            (None, Some(html)) => Some(Entity::Single(SinglePart::html(html.clone()))),
            (None, None) => None,
        };
        let (inline, attached): (Vec<_>, Vec<_>) = self
            .attachments
            .iter()
            .partition(|a| a.content_id.is_some());

        let text = match text {
            Some(text) if !inline.is_empty() => {
                let related = inline
                    .iter()
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
                        .iter()
                        .fold(mixed, |m, a| m.singlepart(attachment_part(a))),
                )
            }
        }
    }
}

fn attachment_part(a: &Attachment) -> SinglePart {
    let filename = a.filename.as_str().to_owned();
    let kind = match &a.content_id {
        Some(id) => lettre::message::Attachment::new_inline_with_name(id.clone(), filename),
        None => lettre::message::Attachment::new(filename),
    };
    kind.body(
        a.content.clone(),
        content_type_with_name(&a.content_type, a.filename.as_str()),
    )
}

/// The caller's content type; lettre puts the file name (RFC 2231) into Content-Disposition.
fn content_type_with_name(content_type: &ContentType, _filename: &str) -> ContentType {
    content_type.clone()
}

fn raw(name: &str, value: &str) -> Result<HeaderValue, MailError> {
    let name = HeaderName::new_from_ascii(name.to_owned())
        .map_err(|e| MailError::Build(format!("header name {name}: {e}")))?;
    Ok(HeaderValue::new(name, value.to_owned()))
}
