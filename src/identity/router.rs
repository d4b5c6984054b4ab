//! The identities as one [`MailSender`]: each mail goes to the sender of the identity its From
//! names. The queue's workers and the administrative notices send through it, so a mail
//! accepted for an identity is delivered by that identity, however long it waited.

use std::sync::Arc;

use async_trait::async_trait;

use super::Identities;
use crate::delivery::{BeforeUpload, DeliveryError, InUse, MailSender, Receipt};
use crate::message::OutgoingMail;

/// Routes every mail by its envelope's From to its identity's sender.
pub struct Routed(pub Arc<Identities>);

#[async_trait]
impl MailSender for Routed {
    async fn send(&self, mail: &OutgoingMail) -> Result<Receipt, DeliveryError> {
        self.send_marked(mail, None).await
    }

    async fn send_marked(
        &self,
        mail: &OutgoingMail,
        before_upload: Option<BeforeUpload<'_>>,
    ) -> Result<Receipt, DeliveryError> {
        let from = mail
            .envelope
            .from()
            .map(ToString::to_string)
            .unwrap_or_default();
        // Checked when the mail was accepted; the settings may have changed since.
        let identity = self.0.route(&from).map_err(DeliveryError::NoIdentity)?;
        identity.sender.send_marked(mail, before_upload).await
    }

    async fn close(&self) {
        for identity in self.0.iter() {
            identity.sender.close().await;
        }
    }

    fn smtp_state(&self) -> Option<crate::smtp::SmtpState> {
        self.0.default_identity().sender.smtp_state()
    }

    fn in_use(&self) -> InUse {
        self.0.default_identity().sender.in_use()
    }
}
