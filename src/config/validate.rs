//! Effective text -> typed [`Settings`], collecting every problem at once.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use crate::message::EmailAddress;

use super::observe;
use super::read::Ctx;
use super::resolve::Resolved;
use super::trust::read_ca_certificates;
use super::{
    AdminMailSettings, Delivery, DeliveryMode, IdempotencySettings, Limits, RateLimitSettings,
    RelaySettings, SendEmailSettings, ServerSettings, SettingError, Settings, SmtpTuning,
};
use super::{callers, proxy};

pub const TENANT_PLACEHOLDER: &str = "#TenantID#";
pub(super) const OFFICE365_HOST: &str = "smtp.office365.com";

/// Settings that work but break a promise: more sessions than Exchange allows, or a shutdown
/// deadline that cuts off a send accepted during the drain delay.
fn warn_on_unsafe_limits(ctx: &mut Ctx<'_>, relay: &RelaySettings, send_email: &SendEmailSettings) {
    let max = relay.smtp.max_connections;
    if relay.delivery.uses_smtp()
        && send_email.smtp_server.eq_ignore_ascii_case(OFFICE365_HOST)
        && max > 3
    {
        ctx.warnings.push(format!(
            "mailRelay.smtp.maxConnections is {max}: Exchange Online allows 3 concurrent connections per mailbox and answers more with 432 4.3.2; use 3 or less"
        ));
    }
    let needed = relay.shutdown.drain_delay + relay.smtp.send_deadline;
    // A deadline not above the drain delay is an error already (`proxy::shutdown`).
    if relay.shutdown.deadline < needed && relay.shutdown.deadline > relay.shutdown.drain_delay {
        ctx.warnings.push(format!(
            "mailRelay.shutdown.deadlineSeconds ({} s) is below drainDelaySeconds + smtp.sendDeadlineSeconds ({} s): a send accepted at the end of the drain delay could be cut off at shutdown; raise it",
            relay.shutdown.deadline.as_secs(),
            needed.as_secs()
        ));
    }
}

const SE: &str = "featureSwitches.sendEmail";

pub(super) fn se(name: &str) -> String {
    format!("{SE}.{name}")
}

pub fn validate(values: &Resolved) -> (Result<Settings, Vec<SettingError>>, Vec<String>) {
    let mut ctx = Ctx {
        values,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let server = server(&mut ctx);
    let cloud = ctx.choice("mailRelay.cloud", super::Cloud::CHOICES);
    let delivery = delivery(&mut ctx);
    let smtp = smtp_tuning(&mut ctx);
    let limits = limits(&mut ctx);
    let rate_limits = rate_limits(&mut ctx, limits.max_recipients, &delivery);
    let store = super::store::store(&mut ctx);
    let queue = super::queue::queue(&mut ctx, &store.url);
    let graph = graph(&mut ctx, cloud);
    let idempotency = idempotency(&mut ctx);
    let send_email = super::send_email::send_email(&mut ctx, &delivery, cloud);
    let identities =
        super::identities::identities(&mut ctx, &send_email, &delivery, cloud, rate_limits);
    let auth = callers::auth(&mut ctx, delivery.is_remote());
    let relay = RelaySettings {
        send_as: callers::send_as(&mut ctx),
        cors: callers::cors(&mut ctx),
        http: proxy::http(&mut ctx),
        shutdown: proxy::shutdown(&mut ctx),
        admin_mail: admin_mail(&mut ctx, &send_email),
        metrics: observe::metrics(&mut ctx, server.socket_addr()),
        log: observe::log(&mut ctx),
        cloud,
        delivery,
        smtp,
        limits,
        auth,
        rate_limits,
        idempotency,
        store,
        queue,
        graph,
        identities,
    };
    // Checks across sections, once every section is read.
    check_timeouts(&mut ctx, &relay);
    check_rate_limits(&mut ctx, &relay, &send_email);
    check_key_identities(&mut ctx, &relay);
    warn_on_unsafe_limits(&mut ctx, &relay, &send_email);
    let settings = Settings {
        server,
        send_email,
        relay,
    };
    let Ctx {
        errors, warnings, ..
    } = ctx;
    if errors.is_empty() {
        (Ok(settings), warnings)
    } else {
        (Err(errors), warnings)
    }
}

/// `server.*` and `mailRelay.http.*` alone, with their errors (see [`super::load::listener`]).
pub(super) fn listener(
    values: &Resolved,
) -> ((ServerSettings, super::HttpSettings), Vec<SettingError>) {
    let mut ctx = Ctx {
        values,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let listener = (server(&mut ctx), proxy::http(&mut ctx));
    (listener, ctx.errors)
}

fn server(ctx: &mut Ctx<'_>) -> ServerSettings {
    let key = "server.address";
    let address = match ctx.text(key).map(str::to_owned) {
        None => IpAddr::from([127, 0, 0, 1]),
        Some(text) => text.parse().unwrap_or_else(|_| {
            ctx.error(
                key,
                format!("{text:?} is not an IP address; use e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (all interfaces)"),
            );
            IpAddr::from([127, 0, 0, 1])
        }),
    };
    // 0 picks a free port, as in Spring Boot.
    let port = ctx.whole("server.port");
    ServerSettings { address, port }
}

fn delivery(ctx: &mut Ctx<'_>) -> Delivery {
    let mode = ctx.choice("mailRelay.delivery.mode", DeliveryMode::CHOICES);
    mode.remote().unwrap_or_else(|| Delivery::Outbox {
        dir: PathBuf::from(ctx.text_or_preset("mailRelay.delivery.outboxDir")),
    })
}

fn smtp_tuning(ctx: &mut Ctx<'_>) -> SmtpTuning {
    let max_connections = ctx.whole("mailRelay.smtp.maxConnections");
    let connect_timeout = ctx.seconds("mailRelay.smtp.connectTimeoutSeconds");
    let command_timeout = ctx.seconds("mailRelay.smtp.commandTimeoutSeconds");
    let send_deadline = ctx.seconds("mailRelay.smtp.sendDeadlineSeconds");
    let ca_file = ctx.text("mailRelay.smtp.caFile").map(PathBuf::from);
    if let Some(path) = &ca_file {
        check_ca_file(ctx, path);
    }
    let hello_name = ctx.text("mailRelay.smtp.helloName").map(str::to_owned);
    if let Some(name) = &hello_name
        && (name.contains(|c: char| c.is_whitespace() || c.is_control()) || name.len() > 255)
    {
        ctx.error(
            "mailRelay.smtp.helloName",
            format!(
                "{name:?} is not a host name; use this machine's DNS name, e.g. relay.contoso.com"
            ),
        );
    }
    let source_text = ctx.text("mailRelay.smtp.sourceAddress").map(str::to_owned);
    let source_address = source_text.and_then(|text| {
        let parsed = text.parse::<std::net::IpAddr>().ok();
        if parsed.is_none() {
            ctx.error(
                "mailRelay.smtp.sourceAddress",
                format!("{text:?} is not an IP address; give a local address such as 10.0.0.5"),
            );
        }
        parsed
    });
    SmtpTuning {
        max_connections,
        connect_timeout,
        command_timeout,
        send_deadline,
        ca_file,
        hello_name,
        source_address,
    }
}

fn limits(ctx: &mut Ctx<'_>) -> Limits {
    Limits {
        max_body_bytes: ctx.whole("mailRelay.limits.maxBodyBytes"),
        max_message_bytes: ctx.whole("mailRelay.limits.maxMessageBytes"),
        max_recipients: ctx.whole("mailRelay.limits.maxRecipients"),
        request_timeout: ctx.seconds("mailRelay.limits.requestTimeoutSeconds"),
        max_in_flight_bytes: ctx.whole("mailRelay.limits.maxInFlightBytes"),
    }
}

const RATE_LIMITS: &str = "mailRelay.rateLimits";
const EXCHANGE_MESSAGES_PER_MINUTE: u32 = RateLimitSettings::EXCHANGE_MESSAGES_PER_MINUTE;
const EXCHANGE_RECIPIENTS_PER_DAY: u32 = RateLimitSettings::EXCHANGE_RECIPIENTS_PER_DAY;
/// Graph's own limit (Outlook service limits: 10,000 requests per 10 minutes per app and
/// mailbox); the 30 a minute are SMTP client submission's.
const GRAPH_MESSAGES_PER_MINUTE: u32 = 1_000;

pub(super) fn rate_limits(
    ctx: &mut Ctx<'_>,
    max_recipients: usize,
    delivery: &Delivery,
) -> RateLimitSettings {
    let mut limit = |name: &str, default: Option<NonZeroU32>| {
        let default = default.map_or(0, NonZeroU32::get);
        NonZeroU32::new(ctx.whole_or(&format!("{RATE_LIMITS}.{name}"), default))
    };
    let per_minute = match delivery {
        Delivery::Graph => GRAPH_MESSAGES_PER_MINUTE,
        _ => EXCHANGE_MESSAGES_PER_MINUTE,
    };
    let mailbox_messages_per_minute =
        limit("mailboxMessagesPerMinute", NonZeroU32::new(per_minute));
    let mailbox_recipients_per_day = limit(
        "mailboxRecipientsPerDay",
        NonZeroU32::new(EXCHANGE_RECIPIENTS_PER_DAY),
    );
    // The per-caller defaults follow the mailbox's; the daily one never below what one mail
    // may carry (nor above the mailbox's own), so that the default alone refuses no mail.
    let share = RateLimitSettings::caller_share;
    let per_mail = u32::try_from(max_recipients).unwrap_or(u32::MAX);
    let recipients_default = share(mailbox_recipients_per_day).map(|quarter| {
        let mailbox = mailbox_recipients_per_day.map_or(u32::MAX, NonZeroU32::get);
        quarter.max(NonZeroU32::new(per_mail.min(mailbox)).unwrap_or(quarter))
    });
    RateLimitSettings {
        mailbox_messages_per_minute,
        mailbox_recipients_per_day,
        caller_messages_per_minute: limit(
            "callerMessagesPerMinute",
            share(mailbox_messages_per_minute),
        ),
        caller_recipients_per_day: limit("callerRecipientsPerDay", recipients_default),
    }
}

pub(super) fn idempotency(ctx: &mut Ctx<'_>) -> IdempotencySettings {
    IdempotencySettings {
        // Up to a week: clients retrying after a long outage still get the first result.
        ttl: ctx.seconds("mailRelay.idempotency.ttlSeconds"),
        max_entries: ctx.whole("mailRelay.idempotency.maxEntries"),
        max_bytes: ctx.whole("mailRelay.idempotency.maxBytes"),
    }
}

fn check_rate_limits(ctx: &mut Ctx<'_>, relay: &RelaySettings, send_email: &SendEmailSettings) {
    let limits = &relay.rate_limits;
    let max_recipients = relay.limits.max_recipients;
    if let Some(per_day) = limits.mailbox_recipients_per_day
        && usize::try_from(per_day.get()).is_ok_and(|per_day| per_day < max_recipients)
    {
        ctx.error(
            &format!("{RATE_LIMITS}.mailboxRecipientsPerDay"),
            format!(
                "{per_day} is below mailRelay.limits.maxRecipients ({max_recipients}): a mail with that many recipients could never be sent; raise it, set it to 0 (off), or lower maxRecipients"
            ),
        );
    }
    if let Some(per_day) = limits.caller_recipients_per_day
        && usize::try_from(per_day.get()).is_ok_and(|per_day| per_day < max_recipients)
    {
        ctx.error(
            &format!("{RATE_LIMITS}.callerRecipientsPerDay"),
            format!(
                "{per_day} is below mailRelay.limits.maxRecipients ({max_recipients}): a mail with that many recipients could never be sent by any caller; raise it, set it to 0 (off), or lower maxRecipients"
            ),
        );
    }
    let exchange =
        relay.delivery.uses_smtp() && send_email.smtp_server.eq_ignore_ascii_case(OFFICE365_HOST);
    if !exchange {
        return;
    }
    let above = |limit: Option<NonZeroU32>, exchange: u32| limit.is_none_or(|l| l.get() > exchange);
    if above(
        limits.mailbox_messages_per_minute,
        EXCHANGE_MESSAGES_PER_MINUTE,
    ) {
        ctx.warnings.push(format!(
            "{RATE_LIMITS}.mailboxMessagesPerMinute allows more than Exchange Online's {EXCHANGE_MESSAGES_PER_MINUTE} messages per minute per mailbox: Exchange throttles or refuses the excess; use {EXCHANGE_MESSAGES_PER_MINUTE} or less"
        ));
    }
    if above(
        limits.mailbox_recipients_per_day,
        EXCHANGE_RECIPIENTS_PER_DAY,
    ) {
        ctx.warnings.push(format!(
            "{RATE_LIMITS}.mailboxRecipientsPerDay allows more than Exchange Online's {EXCHANGE_RECIPIENTS_PER_DAY} recipients per day per mailbox: past it Exchange refuses every mail for up to a day (SubmissionQuotaExceeded); use {EXCHANGE_RECIPIENTS_PER_DAY} or less"
        ));
    }
}

const ADMIN_ENABLED: &str = "mailRelay.adminMail.enabled";
const ADMIN_FROM: &str = "mailRelay.adminMail.from";
const ADMIN_RECIPIENTS: &str = "mailRelay.adminMail.recipients";

/// `mailRelay.adminMail`; present values are checked even when it is off.
fn admin_mail(ctx: &mut Ctx<'_>, send_email: &SendEmailSettings) -> Option<AdminMailSettings> {
    let enabled = ctx.flag(ADMIN_ENABLED);
    let recipients: Vec<EmailAddress> = callers::list_at(ctx, ADMIN_RECIPIENTS)
        .into_iter()
        .filter_map(|address| match EmailAddress::parse(&address) {
            Ok(parsed) => Some(parsed),
            Err(_) => {
                ctx.error(
                    ADMIN_RECIPIENTS,
                    format!("{address:?} is not an e-mail address; list addresses such as ops@contoso.com"),
                );
                None
            }
        })
        .collect();
    let username = send_email.smtp_authentication.username().map(str::to_owned);
    let from = ctx.text(ADMIN_FROM).map(str::to_owned);
    if let (Some(from), Some(username)) = (&from, &username)
        && !from.eq_ignore_ascii_case(username)
    {
        // Exchange lets the SMTP mailbox send as itself; any other From needs a Send As
        // grant, and a refused notice would go unseen.
        ctx.error(
            ADMIN_FROM,
            format!(
                "{from:?} differs from {SE}.smtpUsername ({username:?}): {ADMIN_FROM} must equal {SE}.smtpUsername, the mailbox the relay logs in as (leave {ADMIN_FROM} out to use it)"
            ),
        );
    }
    if !enabled {
        return None;
    }
    if recipients.is_empty() && !ctx.values.failed.contains(ADMIN_RECIPIENTS) {
        ctx.error(
            ADMIN_RECIPIENTS,
            format!("is required when {ADMIN_ENABLED} is true: list the administrators' addresses, e.g. [ops@contoso.com]"),
        );
    }
    let from = match from.or(username) {
        Some(text) => match EmailAddress::parse(&text) {
            Ok(from) => from,
            Err(_) => {
                ctx.error(
                    ADMIN_FROM,
                    format!(
                        "{text:?} is not an e-mail address; {ADMIN_FROM} must equal {SE}.smtpUsername"
                    ),
                );
                return None;
            }
        },
        None => {
            ctx.error(
                ADMIN_FROM,
                format!("is required when {ADMIN_ENABLED} is true and {SE}.smtpUsername is not set: give the address the notices come from"),
            );
            return None;
        }
    };
    (!recipients.is_empty()).then_some(AdminMailSettings { from, recipients })
}

fn check_ca_file(ctx: &mut Ctx<'_>, path: &Path) {
    if let Err(message) = read_ca_certificates(path) {
        ctx.error("mailRelay.smtp.caFile", message);
    }
}

/// `mailRelay.graph.*`, checked whatever the mode, so that a switch to `graph` finds no surprise.
pub(super) fn graph(ctx: &mut Ctx<'_>, cloud: super::Cloud) -> super::GraphSettings {
    let key = "mailRelay.graph.baseUrl";
    let text = ctx
        .text(key)
        .map_or_else(|| cloud.graph_url(), str::to_owned);
    let base_url =
        super::send_email::https_url(ctx, key, &text, "the mails and their token travel over it")
            .map(|mut url| {
                // `users/...` is joined to it: a missing trailing slash would drop `v1.0`.
                if !url.path().ends_with('/') {
                    url.set_path(&format!("{}/", url.path()));
                }
                url
            })
            .unwrap_or_else(|| {
                url::Url::parse(&cloud.graph_url()).expect("a cloud's Graph URL parses")
            });
    super::GraphSettings {
        base_url,
        scopes: ctx
            .text("mailRelay.graph.scopes")
            .map_or_else(|| cloud.graph_scope(), str::to_owned),
        connect_timeout: ctx.seconds("mailRelay.graph.connectTimeoutSeconds"),
        request_timeout: ctx.seconds("mailRelay.graph.requestTimeoutSeconds"),
        max_concurrent_requests: ctx.whole("mailRelay.graph.maxConcurrentRequests"),
        sent_items_lookup: ctx.seconds("mailRelay.graph.sentItemsLookupSeconds"),
    }
}

/// An API key restricted to identities names ones that exist.
fn check_key_identities(ctx: &mut Ctx<'_>, relay: &RelaySettings) {
    let all = &relay.identities;
    let exists = |name: &str| name == all.default_name || all.others.iter().any(|i| i.name == name);
    for (i, key) in relay.auth.api_keys.iter().enumerate() {
        for name in key.identities.iter().filter(|n| !exists(n)) {
            let known: Vec<&str> = std::iter::once(all.default_name.as_str())
                .chain(all.others.iter().map(|i| i.name.as_str()))
                .collect();
            ctx.error(
                &format!("mailRelay.auth.apiKeys[{i}].identities"),
                format!(
                    "{name:?} is not an identity; the identities are {}",
                    known.join(", ")
                ),
            );
        }
    }
}

fn check_timeouts(ctx: &mut Ctx<'_>, relay: &RelaySettings) {
    if relay.delivery.is_remote() && relay.smtp.send_deadline >= relay.limits.request_timeout {
        ctx.warnings.push(format!(
            "mailRelay.smtp.sendDeadlineSeconds ({}) is not below mailRelay.limits.requestTimeoutSeconds ({}): a slow send is cut off by the request timeout before its own deadline",
            relay.smtp.send_deadline.as_secs(),
            relay.limits.request_timeout.as_secs()
        ));
    }
}
