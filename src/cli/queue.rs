//! `mail-relay queue list|show|retry|drop`: the operator's hands on the outbox, with the same
//! settings (and so the same store) as the replicas.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Subcommand;

use super::EXIT_INVALID;
use crate::api::mail_status::{MailStatus, rfc3339};
use crate::clock::{Clock, SystemClock, duration_ms};
use crate::config::Settings;
use crate::queue::{MailRecord, MailState, QueueStore};
use crate::store::Store;

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// The newest mails, one a line, and how many are in each state.
    List {
        /// Only mails in this state: queued, sending, sent, failed, expired or unknown.
        #[arg(long, value_parser = parse_state)]
        state: Option<MailState>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// One mail: its caller, recipients and size, then its status as `GET /mail/{id}` shows it.
    Show { id: String },
    /// Send a mail again: a failed, expired or unknown one is queued anew, due at once, with a
    /// fresh `mailRelay.delivery.maxAgeSeconds`. For an `unknown` mail, first make sure the
    /// server does not have it (see the README's "Queued delivery").
    Retry { id: String },
    /// Delete a mail that no worker is sending, with its MIME.
    Drop { id: String },
}

fn parse_state(text: &str) -> Result<MailState, String> {
    MailState::parse(text).ok_or_else(|| {
        let states: Vec<_> = MailState::ALL.iter().map(|s| s.as_str()).collect();
        format!("not a state; one of {}", states.join(", "))
    })
}

/// Run one queue command on the store `settings` name.
pub async fn run(settings: &Settings, command: &QueueCommand) -> ExitCode {
    let Some(queue) = open(settings).await else {
        return ExitCode::from(EXIT_INVALID);
    };
    let outcome = match command {
        QueueCommand::List { state, limit } => list(&*queue, *state, *limit).await,
        QueueCommand::Show { id } => show(&*queue, id).await,
        QueueCommand::Retry { id } => retry(&*queue, settings, id).await,
        QueueCommand::Drop { id } => drop_mail(&*queue, id).await,
    };
    match outcome {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("queue: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The queue of the configured store, once its schema is in place; `None` (said on stderr)
/// when there is none.
async fn open(settings: &Settings) -> Option<Arc<dyn QueueStore>> {
    let store = match Store::open(&settings.relay.store) {
        Ok(store) => store,
        Err(e) => {
            eprintln!("queue: mailRelay.store.url: {e}");
            return None;
        }
    };
    let Some(queue) = store.queue() else {
        eprintln!(
            "queue: the memory store keeps no queue (mails are sent synchronously); set mailRelay.store.url to the replicas' store"
        );
        return None;
    };
    // Twice the connect timeout: one try to connect, one to apply or check the schema.
    if !store
        .wait_until_migrated(settings.relay.store.connect_timeout * 2)
        .await
    {
        let why = store
            .state()
            .and_then(|s| s.last_error)
            .unwrap_or_else(|| "no answer".to_owned());
        eprintln!("queue: the store is not reachable: {why}");
        return None;
    }
    Some(queue)
}

async fn list(
    queue: &dyn QueueStore,
    state: Option<MailState>,
    limit: u32,
) -> Result<String, String> {
    let mails = queue.list(state, limit).await?;
    let depth = queue.depth().await?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<36}  {:<8}  {:<24}  {:>8}  {:>9}  {:<24}  RECIPIENTS",
        "ID", "STATE", "CREATED", "ATTEMPTS", "BYTES", "CALLER"
    );
    for mail in &mails {
        let _ = writeln!(
            out,
            "{:<36}  {:<8}  {:<24}  {:>8}  {:>9}  {:<24}  {}",
            mail.id,
            mail.state.as_str(),
            rfc3339(mail.created_at),
            mail.attempts,
            mail.bytes,
            mail.caller,
            mail.recipients.join(",")
        );
    }
    let counts: Vec<String> = MailState::ALL
        .iter()
        .map(|state| {
            let count = depth
                .by_state
                .iter()
                .find(|(s, ..)| s == state)
                .map_or(0, |(_, count, _)| *count);
            format!("{} {count}", state.as_str())
        })
        .collect();
    let _ = writeln!(
        out,
        "{} shown; in the store: {}",
        mails.len(),
        counts.join(", ")
    );
    Ok(out)
}

async fn show(queue: &dyn QueueStore, id: &str) -> Result<String, String> {
    let mail = find(queue, id).await?;
    let mut out = String::new();
    let _ = writeln!(out, "caller:     {}", mail.caller);
    let _ = writeln!(out, "recipients: {}", mail.recipients.join(", "));
    let _ = writeln!(out, "bytes:      {}", mail.bytes);
    let status = serde_json::to_string_pretty(&MailStatus::from(mail))
        .map_err(|e| format!("cannot show the mail: {e}"))?;
    let _ = writeln!(out, "{status}");
    Ok(out)
}

async fn retry(queue: &dyn QueueStore, settings: &Settings, id: &str) -> Result<String, String> {
    let mail = find(queue, id).await?;
    match mail.state {
        MailState::Sent => {
            return Err(format!(
                "mail {id} was sent (the server accepted it); it is not sent again"
            ));
        }
        MailState::Sending => {
            return Err(format!(
                "mail {id} is being sent by a worker now; wait for its outcome"
            ));
        }
        _ => {}
    }
    let now = SystemClock.now_ms();
    let expires_at = now.saturating_add(duration_ms(settings.relay.queue.max_age));
    if !queue.requeue(id, now, expires_at).await? {
        return Err(format!(
            "mail {id} changed meanwhile (a worker took it or it was dropped); see `queue show {id}`"
        ));
    }
    Ok(format!(
        "mail {id} ({} before) is queued, due now, until {}\n",
        mail.state.as_str(),
        rfc3339(expires_at)
    ))
}

async fn drop_mail(queue: &dyn QueueStore, id: &str) -> Result<String, String> {
    let mail = find(queue, id).await?;
    if mail.state == MailState::Sending {
        return Err(format!(
            "mail {id} is being sent by a worker now; wait for its outcome, then drop it"
        ));
    }
    if !queue.remove(id).await? {
        return Err(format!(
            "mail {id} changed meanwhile (a worker took it or it was dropped); see `queue show {id}`"
        ));
    }
    Ok(format!("mail {id} ({}) is deleted\n", mail.state.as_str()))
}

async fn find(queue: &dyn QueueStore, id: &str) -> Result<MailRecord, String> {
    if uuid::Uuid::parse_str(id).is_err() {
        return Err(format!(
            "{id:?} is not a mail id (a UUID, as POST /mail answered)"
        ));
    }
    queue.get(id).await?.ok_or_else(|| {
        format!(
            "no mail {id} in the queue (never queued, or past mailRelay.delivery.retentionSeconds)"
        )
    })
}
