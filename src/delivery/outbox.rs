//! The development delivery mode: every accepted mail becomes an `.eml` file.

use std::path::PathBuf;

use async_trait::async_trait;

use super::{DeliveryError, MailSender, Receipt};
use crate::message::OutgoingMail;

/// Writes each mail to `<dir>/<id>.eml`, atomically (temporary file, then rename),
/// so a reader never sees half a message.
#[derive(Debug, Clone)]
pub struct Outbox {
    dir: PathBuf,
}

impl Outbox {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    fn io_error(&self, source: std::io::Error) -> DeliveryError {
        DeliveryError::Outbox {
            path: self.dir.display().to_string(),
            source,
        }
    }
}

#[async_trait]
impl MailSender for Outbox {
    fn in_use(&self) -> super::InUse {
        super::InUse {
            transport: "outbox",
            fallback_since: None,
        }
    }

    async fn send(&self, mail: &OutgoingMail) -> Result<Receipt, DeliveryError> {
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(|e| self.io_error(e))?;
        let target = self.dir.join(format!("{}.eml", mail.id));
        let partial = self.dir.join(format!(".{}.eml.part", mail.id));
        tokio::fs::write(&partial, &mail.formatted)
            .await
            .map_err(|e| self.io_error(e))?;
        tokio::fs::rename(&partial, &target)
            .await
            .map_err(|e| self.io_error(e))?;
        Ok(Receipt {
            accepted: mail.envelope.to().iter().map(ToString::to_string).collect(),
            server_reply: format!("written to {}", target.display()),
        })
    }
}

#[cfg(test)]
mod tests {
    use lettre::address::Envelope;

    use super::*;

    #[tokio::test]
    async fn writes_the_formatted_message_under_its_id() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::new(dir.path().join("out"));
        let envelope = Envelope::new(
            Some("a@example.com".parse().unwrap()),
            vec!["b@example.com".parse().unwrap()],
        )
        .unwrap();
        let mail = OutgoingMail {
            id: "abc".into(),
            message_id: "<abc@example.com>".into(),
            envelope,
            formatted: b"Subject: hi\r\n\r\nbody\r\n".to_vec(),
        };
        let receipt = outbox.send(&mail).await.unwrap();
        assert_eq!(receipt.accepted, vec!["b@example.com".to_string()]);
        let written = std::fs::read(dir.path().join("out/abc.eml")).unwrap();
        assert_eq!(written, mail.formatted);
    }
}
