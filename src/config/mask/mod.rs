//! The effective settings as YAML for `check-config`, every secret as `****`.

mod callers;

use std::fmt::Write as _;

use super::keys;
use super::resolve::{Origin, Resolved};
use super::{
    ClientCredential, Delivery, QueueSettings, SendEmailSettings, Settings, SmtpAuthentication,
};

const MASK: &str = "****";

struct Out<'a> {
    text: String,
    values: &'a Resolved,
    /// Say where each value came from (off for keys the environment cannot set).
    origins: bool,
}

impl Out<'_> {
    fn section(&mut self, indent: usize, name: &str) {
        let _ = writeln!(self.text, "{:indent$}{name}:", "");
    }

    /// One `name: value` line; `key` is the full key, for the origin comment and `{cipher}` masking.
    fn line(&mut self, indent: usize, key: &str, value: Option<String>) {
        let name = key.rsplit('.').next().unwrap_or(key);
        let effective = self.values.get(key);
        let value = match value {
            // A secret is masked here whatever the caller passed, so none can slip through.
            Some(_) if effective.is_some_and(|e| e.encrypted) || keys::is_secret(key) => {
                quote(MASK)
            }
            Some(v) => v,
            None => "null".into(),
        };
        let origin = match effective.map(|e| &e.origin) {
            _ if !self.origins => String::new(),
            None => " # default".to_owned(),
            Some(Origin::File) => String::new(),
            Some(Origin::Env(var)) => format!(" # from env {var}"),
            Some(Origin::SecretFile(path)) => format!(" # from file {}", path.display()),
        };
        let cipher = if effective.is_some_and(|e| e.encrypted) {
            " # {cipher}"
        } else {
            ""
        };
        let _ = writeln!(self.text, "{:indent$}{name}: {value}{origin}{cipher}", "");
    }
}

impl Out<'_> {
    /// A line without origin comment, for lists and maps.
    fn plain(&mut self, indent: usize, name: &str, value: &str) {
        let _ = writeln!(self.text, "{:indent$}{name}: {value}", "");
    }
}

fn flow_list<T: AsRef<str>>(items: impl IntoIterator<Item = T>) -> String {
    let items: Vec<String> = items.into_iter().map(|i| quote(i.as_ref())).collect();
    format!("[{}]", items.join(", "))
}

/// YAML double-quoted scalar (JSON's string syntax is valid YAML).
fn quote(text: &str) -> String {
    serde_json::Value::String(text.to_owned()).to_string()
}

fn secs(d: std::time::Duration) -> Option<String> {
    Some(d.as_secs().to_string())
}

/// Render `settings`; `values` says where each came from.
pub fn render(settings: &Settings, values: &Resolved) -> String {
    let mut out = Out {
        text: String::from("# mail-relay effective settings; secrets shown as ****\n"),
        values,
        origins: true,
    };
    let se = "featureSwitches.sendEmail";
    out.section(0, "server");
    out.line(
        2,
        "server.address",
        Some(quote(&settings.server.address.to_string())),
    );
    out.line(2, "server.port", Some(settings.server.port.to_string()));

    let s = &settings.send_email;
    out.section(0, "featureSwitches");
    out.section(2, "sendEmail");
    if matches!(settings.relay.delivery, Delivery::Outbox { .. }) {
        out.text.push_str(
            "    # unused: mailRelay.delivery.mode is outbox (present values are still checked)\n",
        );
    }
    render_send_email(&mut out, 4, se, s);

    let r = &settings.relay;
    out.section(0, "mailRelay");
    out.line(2, "mailRelay.cloud", Some(r.cloud.name().into()));
    out.section(2, "delivery");
    let mode = r.delivery.mode().name();
    out.line(4, "mailRelay.delivery.mode", Some(mode.into()));
    if let Delivery::Outbox { dir } = &r.delivery {
        out.line(
            4,
            "mailRelay.delivery.outboxDir",
            Some(quote(&dir.display().to_string())),
        );
    }
    render_queue(&mut out, &r.queue);
    let g = &r.graph;
    out.section(2, "graph");
    out.line(
        4,
        "mailRelay.graph.baseUrl",
        Some(quote(g.base_url.as_str())),
    );
    out.line(4, "mailRelay.graph.scopes", Some(quote(&g.scopes)));
    out.line(
        4,
        "mailRelay.graph.connectTimeoutSeconds",
        secs(g.connect_timeout),
    );
    out.line(
        4,
        "mailRelay.graph.requestTimeoutSeconds",
        secs(g.request_timeout),
    );
    out.line(
        4,
        "mailRelay.graph.maxConcurrentRequests",
        Some(g.max_concurrent_requests.to_string()),
    );
    out.line(
        4,
        "mailRelay.graph.sentItemsLookupSeconds",
        Some(g.sent_items_lookup.as_secs().to_string()),
    );
    out.section(2, "smtp");
    out.line(
        4,
        "mailRelay.smtp.maxConnections",
        Some(r.smtp.max_connections.to_string()),
    );
    out.line(
        4,
        "mailRelay.smtp.connectTimeoutSeconds",
        secs(r.smtp.connect_timeout),
    );
    out.line(
        4,
        "mailRelay.smtp.commandTimeoutSeconds",
        secs(r.smtp.command_timeout),
    );
    out.line(
        4,
        "mailRelay.smtp.sendDeadlineSeconds",
        secs(r.smtp.send_deadline),
    );
    out.line(
        4,
        "mailRelay.smtp.caFile",
        r.smtp
            .ca_file
            .as_ref()
            .map(|p| quote(&p.display().to_string())),
    );
    out.line(
        4,
        "mailRelay.smtp.helloName",
        r.smtp.hello_name.as_deref().map(quote),
    );
    out.line(
        4,
        "mailRelay.smtp.sourceAddress",
        r.smtp.source_address.map(|a| a.to_string()),
    );
    if let SmtpAuthentication::MsOAuth { oauth, .. } = &s.smtp_authentication {
        out.section(2, "token");
        out.line(
            4,
            "mailRelay.token.connectTimeoutSeconds",
            secs(oauth.connect_timeout),
        );
        out.line(
            4,
            "mailRelay.token.requestTimeoutSeconds",
            secs(oauth.request_timeout),
        );
    }
    out.section(2, "limits");
    out.line(
        4,
        "mailRelay.limits.maxBodyBytes",
        Some(r.limits.max_body_bytes.to_string()),
    );
    out.line(
        4,
        "mailRelay.limits.maxMessageBytes",
        Some(r.limits.max_message_bytes.to_string()),
    );
    out.line(
        4,
        "mailRelay.limits.maxRecipients",
        Some(r.limits.max_recipients.to_string()),
    );
    out.line(
        4,
        "mailRelay.limits.requestTimeoutSeconds",
        secs(r.limits.request_timeout),
    );
    out.line(
        4,
        "mailRelay.limits.maxInFlightBytes",
        Some(r.limits.max_in_flight_bytes.to_string()),
    );
    out.section(2, "metrics");
    let listen = r.metrics.listen;
    out.line(
        4,
        "mailRelay.metrics.address",
        listen.map(|l| quote(&l.ip().to_string())),
    );
    out.line(
        4,
        "mailRelay.metrics.port",
        listen.map(|l| l.port().to_string()),
    );
    out.section(2, "log");
    out.line(4, "mailRelay.log.format", Some(r.log.format.name().into()));
    out.line(4, "mailRelay.log.level", Some(quote(&r.log.filter)));
    callers::render_callers(&mut out, settings);
    render_rate_limits(&mut out, settings);
    render_identities(&mut out, settings);
    out.text
}

/// `mailRelay.defaultIdentity` and every `mailRelay.identities` entry in full, inherited keys
/// included: what each identity will use, its secrets masked as everywhere.
fn render_identities(out: &mut Out<'_>, settings: &Settings) {
    let all = &settings.relay.identities;
    let list = |patterns: &[super::AddressPattern]| {
        let items: Vec<String> = patterns.iter().map(|p| quote(&p.to_string())).collect();
        format!("[{}]", items.join(", "))
    };
    out.section(2, "defaultIdentity");
    out.line(
        4,
        "mailRelay.defaultIdentity.name",
        Some(quote(&all.default_name)),
    );
    let from = if all.default_from.is_empty() {
        "[] # every From: there are no other identities".to_owned()
    } else {
        list(&all.default_from)
    };
    let _ = writeln!(out.text, "    from: {from}");
    if all.others.is_empty() {
        return;
    }
    out.section(2, "identities");
    // The entries' keys are not the environment's: no origin comments.
    out.origins = false;
    for (i, identity) in all.others.iter().enumerate() {
        let _ = writeln!(out.text, "    - name: {}", quote(&identity.name));
        let _ = writeln!(out.text, "      from: {}", list(&identity.from));
        let transport = identity.delivery.mode().name();
        let _ = writeln!(out.text, "      transport: {transport}");
        let limit = |l: Option<std::num::NonZeroU32>| l.map_or(0, std::num::NonZeroU32::get);
        let _ = writeln!(
            out.text,
            "      mailboxMessagesPerMinute: {}",
            limit(identity.rate_limits.mailbox_messages_per_minute)
        );
        let _ = writeln!(
            out.text,
            "      mailboxRecipientsPerDay: {}",
            limit(identity.rate_limits.mailbox_recipients_per_day)
        );
        render_send_email(
            out,
            6,
            &format!("mailRelay.identities[{i}]"),
            &identity.send_email,
        );
    }
    out.origins = true;
}

/// The queue's keys, inside `delivery`.
/// `featureSwitches.sendEmail`'s keys (or an identity's, under `prefix`) at `indent`.
fn render_send_email(out: &mut Out<'_>, indent: usize, prefix: &str, s: &SendEmailSettings) {
    let k = |name: &str| format!("{prefix}.{name}");
    out.line(
        indent,
        &k("smtpServer"),
        (!s.smtp_server.is_empty()).then(|| quote(&s.smtp_server)),
    );
    out.line(indent, &k("smtpPort"), Some(s.smtp_port.to_string()));
    out.line(
        indent,
        &k("smtpEncryption"),
        Some(s.smtp_encryption.name().into()),
    );
    let mode = s.smtp_authentication.mode().name();
    out.line(indent, &k("smtpAuthentication"), Some(mode.into()));
    match &s.smtp_authentication {
        SmtpAuthentication::None => {}
        SmtpAuthentication::Basic { username, .. } => {
            out.line(indent, &k("smtpUsername"), Some(quote(username.as_str())));
            out.line(indent, &k("smtpPassword"), Some(quote(MASK)));
        }
        SmtpAuthentication::MsOAuth { username, oauth } => {
            out.line(indent, &k("smtpUsername"), Some(quote(username.as_str())));
            out.line(indent, &k("oAuthTenantId"), Some(quote(&oauth.tenant_id)));
            out.line(indent, &k("oAuthClientId"), Some(quote(&oauth.client_id)));
            match &oauth.credential {
                ClientCredential::Secret(_) => {
                    out.line(indent, &k("oAuthClientSecret"), Some(quote(MASK)));
                }
                ClientCredential::FederatedTokenFile(path) => {
                    let path = path.display().to_string();
                    out.line(indent, &k("oAuthFederatedTokenFile"), Some(quote(&path)));
                }
                ClientCredential::Certificate(certificate) => {
                    let summary = format!(
                        "(PEM certificate, {} bytes)",
                        certificate.certificate_pem().len()
                    );
                    out.line(indent, &k("oAuthCertificate"), Some(quote(&summary)));
                    out.line(indent, &k("oAuthPrivateKey"), Some(quote(MASK)));
                }
                ClientCredential::ManagedIdentity(managed) => {
                    let kind = managed.kind().name();
                    out.line(indent, &k("oAuthManagedIdentity"), Some(quote(kind)));
                }
            }
            out.line(
                indent,
                &k("oAuthTokenEndpoint"),
                Some(quote(oauth.token_endpoint.as_str())),
            );
            out.line(indent, &k("oAuthScopes"), Some(quote(&oauth.scopes)));
            out.line(
                indent,
                &k("oAuthTokenGraceTimeInSeconds"),
                secs(oauth.grace),
            );
        }
    }
}

fn render_queue(out: &mut Out<'_>, q: &QueueSettings) {
    let d = |name: &str| format!("mailRelay.delivery.{name}");
    out.line(4, &d("queue"), Some(q.mode.name().into()));
    out.line(4, &d("workers"), Some(q.workers.to_string()));
    out.line(4, &d("maxAgeSeconds"), secs(q.max_age));
    out.line(4, &d("retentionSeconds"), secs(q.retention));
    out.line(4, &d("retryMinSeconds"), secs(q.retry_min));
    out.line(4, &d("retryMaxSeconds"), secs(q.retry_max));
    out.line(
        4,
        &d("maxQueuedBytes"),
        Some(q.max_queued_bytes.to_string()),
    );
    out.line(
        4,
        &d("encryptAtRest"),
        Some(q.at_rest.is_some().to_string()),
    );
    out.line(
        4,
        &d("webhook"),
        q.webhook.as_ref().map(|w| quote(w.url.as_str())),
    );
    out.line(
        4,
        &d("webhookSecret"),
        q.webhook.as_ref().map(|_| quote(MASK)),
    );
}

fn render_rate_limits(out: &mut Out<'_>, settings: &Settings) {
    let limits = &settings.relay.rate_limits;
    // 0 is how the settings say "off".
    let n = |limit: Option<std::num::NonZeroU32>| Some(limit.map_or(0, |l| l.get()).to_string());
    out.section(2, "rateLimits");
    out.line(
        4,
        "mailRelay.rateLimits.mailboxMessagesPerMinute",
        n(limits.mailbox_messages_per_minute),
    );
    out.line(
        4,
        "mailRelay.rateLimits.mailboxRecipientsPerDay",
        n(limits.mailbox_recipients_per_day),
    );
    out.line(
        4,
        "mailRelay.rateLimits.callerMessagesPerMinute",
        n(limits.caller_messages_per_minute),
    );
    out.line(
        4,
        "mailRelay.rateLimits.callerRecipientsPerDay",
        n(limits.caller_recipients_per_day),
    );
    let idempotency = &settings.relay.idempotency;
    out.section(2, "idempotency");
    out.line(4, "mailRelay.idempotency.ttlSeconds", secs(idempotency.ttl));
    out.line(
        4,
        "mailRelay.idempotency.maxEntries",
        Some(idempotency.max_entries.to_string()),
    );
    out.line(
        4,
        "mailRelay.idempotency.maxBytes",
        Some(idempotency.max_bytes.to_string()),
    );
    let store = &settings.relay.store;
    out.section(2, "store");
    out.line(
        4,
        "mailRelay.store.url",
        Some(quote(&store.url.to_string())),
    );
    if store.password.is_some() {
        out.line(4, "mailRelay.store.password", Some(quote(MASK)));
    }
    out.line(
        4,
        "mailRelay.store.maxConnections",
        Some(store.max_connections.to_string()),
    );
    out.line(
        4,
        "mailRelay.store.connectTimeoutSeconds",
        secs(store.connect_timeout),
    );
}
