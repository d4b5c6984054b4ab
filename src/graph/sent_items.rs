//! A send whose answer was lost (a `5xx` other than `503`, a timeout, a `200`): Graph may have
//! sent it anyway. With `Mail.Read` (or `Mail.ReadWrite`) the relay looks its Message-ID up in
//! the mailbox's Sent Items: found, it is sent; not found within
//! `mailRelay.graph.sentItemsLookupSeconds`, it is sent once more. Without either role it stays
//! *outcome unknown* and is never sent again.
//!
//! Based on Graph's "List messages" (`GET /users/{id}/mailFolders/sentitems/messages`, with the
//! well-known folder name `sentitems`), `$filter` on `internetMessageId` (a filterable property
//! of `message`), and `sendMail` saving a copy to Sent Items by default.

use std::time::{Duration, Instant};

use serde::Deserialize;

use super::{GraphError, GraphReceipt, GraphSender, Step, read_capped};
use crate::message::OutgoingMail;
use crate::token::TokenClaims;

/// What Sent Items says of a mail.
enum Lookup {
    Found,
    /// Not there after every look.
    Absent,
    /// The lookup itself failed.
    Unknown(String),
}

#[derive(Deserialize)]
struct Listing {
    #[serde(default)]
    value: Vec<Message>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(rename = "internetMessageId")]
    internet_message_id: Option<String>,
}

impl GraphSender {
    /// The answer to `mail`'s send was lost (`detail` says how): settle it through Sent Items
    /// when the token may read them.
    pub(super) async fn settle(
        &self,
        mail: &OutgoingMail,
        recipients: &[String],
        detail: String,
        deadline: Instant,
    ) -> Result<GraphReceipt, GraphError> {
        if !self.may_read_sent_items().await {
            return Err(GraphError::NoVerdict { detail });
        }
        match self.look_for(mail, deadline).await {
            Lookup::Found => {
                tracing::info!(mail_id = %mail.id, "the send's answer was lost, but Sent Items holds the mail: sent");
                Ok(GraphReceipt {
                    reply: format!(
                        "found in Sent Items after the send's answer was lost ({detail})"
                    ),
                })
            }
            Lookup::Absent => {
                tracing::warn!(mail_id = %mail.id, %detail, "the send's answer was lost and Sent Items does not hold the mail: sending it once more");
                match self.send_once(mail, recipients, deadline).await {
                    Err(GraphError::NoVerdict { detail: again }) => Err(GraphError::NoVerdict {
                        detail: format!(
                            "{again}, after a first send ({detail}) that Sent Items did not show"
                        ),
                    }),
                    other => other,
                }
            }
            Lookup::Unknown(why) => Err(GraphError::NoVerdict {
                detail: format!("{detail}; Sent Items could not be searched ({why})"),
            }),
        }
    }

    /// Reads the mailbox's Sent Items folder: Graph answers for the mailbox as it would for a
    /// send (not an Exchange Online mailbox, outside the app's RBAC scope), without sending.
    /// Needs `Mail.Read` or `Mail.ReadWrite`.
    pub async fn reach_mailbox(&self) -> Result<(), GraphError> {
        let deadline = Instant::now() + self.send_deadline;
        let mut url = self.user_url(&["mailFolders", "sentitems"]);
        url.query_pairs_mut().append_pair("$select", "id");
        self.call(deadline, Step::Lookup, "diagnose", |http| {
            http.get(url.clone())
        })
        .await
        .map(drop)
    }

    /// Only a token with `Mail.Read` or `Mail.ReadWrite` may list Sent Items.
    async fn may_read_sent_items(&self) -> bool {
        if self.sent_items_lookup.is_zero() {
            return false;
        }
        let Ok(token) = self.tokens.token().await else {
            return false;
        };
        let claims = TokenClaims::read(token.expose());
        claims.has("Mail.Read") || claims.has("Mail.ReadWrite")
    }

    /// Looks after 1 s, then 2 s, 4 s ... later, until the lookup time or the deadline is over:
    /// Exchange files the copy shortly after it takes the mail.
    async fn look_for(&self, mail: &OutgoingMail, deadline: Instant) -> Lookup {
        let until = (Instant::now() + self.sent_items_lookup).min(deadline);
        let mut pause = Duration::from_secs(1);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            tokio::time::sleep(pause.min(left)).await;
            match self.in_sent_items(mail, deadline).await {
                Ok(true) => return Lookup::Found,
                Ok(false) if Instant::now() >= until => return Lookup::Absent,
                Ok(false) => pause *= 2,
                Err(e) => return Lookup::Unknown(e.to_string()),
            }
        }
    }

    async fn in_sent_items(
        &self,
        mail: &OutgoingMail,
        deadline: Instant,
    ) -> Result<bool, GraphError> {
        let mut url = self.user_url(&["mailFolders", "sentitems", "messages"]);
        // An OData string literal doubles its quotes.
        let filter = format!(
            "internetMessageId eq '{}'",
            mail.message_id.replace('\'', "''")
        );
        url.query_pairs_mut()
            .append_pair("$filter", &filter)
            .append_pair("$select", "internetMessageId")
            .append_pair("$top", "1");
        let response = self
            .call(deadline, Step::Lookup, &mail.id, |http| {
                http.get(url.clone())
            })
            .await?;
        let body = read_capped(response).await;
        let listing: Listing =
            serde_json::from_slice(&body).map_err(|e| GraphError::Interrupted {
                detail: format!("Sent Items answered with a body that is not a message list ({e})"),
            })?;
        Ok(listing
            .value
            .iter()
            .any(|m| m.internet_message_id.as_deref() == Some(mail.message_id.as_str())))
    }
}
