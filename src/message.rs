//! A validated outgoing message and its MIME form.
//! (Stub: the message helper fills in parsing and building.)

use lettre::Address;
use lettre::address::Envelope;

/// A mail ready to hand to a [`crate::delivery::MailSender`]: envelope plus the formatted RFC 5322 bytes.
#[derive(Debug, Clone)]
pub struct OutgoingMail {
    /// The relay's id for this mail (also in logs and the response).
    pub id: String,
    /// The `Message-ID` header value, with angle brackets.
    pub message_id: String,
    pub envelope: Envelope,
    pub formatted: Vec<u8>,
}

impl OutgoingMail {
    pub fn from_address(&self) -> Option<&Address> {
        self.envelope.from()
    }
}
