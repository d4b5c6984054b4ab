//! `mailRelay.identities` and `mailRelay.defaultIdentity`: more than one sending mailbox (or
//! app, or tenant), each serving the From addresses it names. `featureSwitches.sendEmail` stays
//! the default identity; each entry takes the same keys, and a key it leaves out is the default's.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::PathBuf;

use serde_json::Value;

use super::callers::patterns;
use super::read::{Ctx, find, listed};
use super::resolve::{Effective, Origin};
use super::validate::se;
use super::{
    AddressPattern, Cloud, Delivery, DeliveryMode, IdentitiesSettings, IdentitySettings,
    RateLimitSettings, SendEmailSettings, keys,
};

const IDENTITIES: &str = "mailRelay.identities";
const DEFAULT_NAME: &str = "mailRelay.defaultIdentity.name";
const DEFAULT_FROM: &str = "mailRelay.defaultIdentity.from";

/// The credential keys: an identity that sets one of them inherits none of the others.
const CREDENTIAL_KEYS: &[&str] = &[
    "oAuthClientSecret",
    "oAuthCertificate",
    "oAuthPrivateKey",
    "oAuthFederatedTokenFile",
    "oAuthManagedIdentity",
    "smtpPassword",
];

/// Keys of an entry that are not `sendEmail` keys.
const OWN_KEYS: &[&str] = &[
    "name",
    "from",
    "transport",
    "mailboxMessagesPerMinute",
    "mailboxRecipientsPerDay",
];

pub(super) fn identities(
    ctx: &mut Ctx<'_>,
    default: &SendEmailSettings,
    delivery: &Delivery,
    cloud: Cloud,
    rate_limits: RateLimitSettings,
) -> IdentitiesSettings {
    let default_name = ctx.text(DEFAULT_NAME).unwrap_or("default").to_owned();
    check_name(ctx, DEFAULT_NAME, &default_name);
    let tree = ctx
        .values
        .subtrees
        .get(IDENTITIES)
        .cloned()
        .unwrap_or(Value::Null);
    let entries = match tree {
        Value::Null => Vec::new(),
        Value::Array(items) => items,
        _ => {
            ctx.error(
                IDENTITIES,
                "is not a list; give a list of identities, each with name, from and the sendEmail keys that differ",
            );
            Vec::new()
        }
    };
    let mut others = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        if let Some(identity) = identity(ctx, i, entry, delivery, cloud, rate_limits) {
            others.push(identity);
        }
    }
    let default_tree = ctx.values.subtrees.get(DEFAULT_FROM).cloned();
    let mut default_from = match default_tree {
        Some(tree) => patterns(ctx, DEFAULT_FROM, &tree),
        None => Vec::new(),
    };
    // With other identities, the default serves only what it names: never a silent catch-all.
    if default_from.is_empty() && !entries.is_empty() {
        match default
            .smtp_authentication
            .username()
            .and_then(AddressPattern::parse)
        {
            Some(own) => default_from.push(own),
            None => ctx.error(
                DEFAULT_FROM,
                "is required with mailRelay.identities when featureSwitches.sendEmail has no smtpUsername: name the From addresses the default identity serves (it never serves every From beside other identities)",
            ),
        }
    }
    check_unique(ctx, &default_name, &default_from, &others);
    IdentitiesSettings {
        default_name,
        default_from,
        others,
    }
}

fn check_name(ctx: &mut Ctx<'_>, key: &str, name: &str) {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !ok {
        ctx.error(
            key,
            format!("{name:?} is not a name: 1 to 64 letters, digits, - and _ (it labels metrics and logs)"),
        );
    }
}

/// No two identities share a name or a From pattern: which one sends must never be a guess.
fn check_unique(
    ctx: &mut Ctx<'_>,
    default_name: &str,
    default_from: &[AddressPattern],
    others: &[IdentitySettings],
) {
    let mut names = BTreeMap::from([(default_name.to_owned(), DEFAULT_NAME.to_owned())]);
    let mut owners: BTreeMap<String, String> = default_from
        .iter()
        .map(|p| (p.to_string(), default_name.to_owned()))
        .collect();
    for (i, identity) in others.iter().enumerate() {
        if let Some(first) = names.insert(identity.name.clone(), format!("{IDENTITIES}[{i}]")) {
            ctx.error(
                &format!("{IDENTITIES}[{i}].name"),
                format!(
                    "{:?} is already the name of {first}; names must differ",
                    identity.name
                ),
            );
        }
        for pattern in &identity.from {
            if let Some(owner) = owners.insert(pattern.to_string(), identity.name.clone()) {
                ctx.error(
                    &format!("{IDENTITIES}[{i}].from"),
                    format!("{pattern} is served by {owner:?} already; each From pattern belongs to one identity"),
                );
            }
        }
    }
}

fn identity(
    ctx: &mut Ctx<'_>,
    i: usize,
    entry: &Value,
    delivery: &Delivery,
    cloud: Cloud,
    rate_limits: RateLimitSettings,
) -> Option<IdentitySettings> {
    let at = format!("{IDENTITIES}[{i}]");
    let Value::Object(fields) = entry else {
        ctx.error(
            &at,
            "is not a mapping; give name, from and the sendEmail keys that differ",
        );
        return None;
    };
    let text = |name: &str| -> Option<String> {
        match fields.get(name)? {
            Value::String(s) => Some(s.trim().to_owned()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    };
    let name = text("name").unwrap_or_default();
    if name.is_empty() {
        ctx.error(
            &format!("{at}.name"),
            "is required: the identity's name in logs, metrics, health and errors (letters, digits, - and _)",
        );
    } else {
        check_name(ctx, &format!("{at}.name"), &name);
    }
    let from = patterns(
        ctx,
        &format!("{at}.from"),
        fields.get("from").unwrap_or(&Value::Null),
    );
    if from.is_empty() {
        ctx.error(
            &format!("{at}.from"),
            "is required: the From addresses (noreply@contoso.com) or domains (\"*@contoso.com\") this identity sends as",
        );
    }
    // The development outbox takes every identity's mail alike; an identity's own transport
    // is a remote one.
    let transports: Vec<_> = DeliveryMode::CHOICES
        .iter()
        .copied()
        .filter(|(_, mode)| mode.remote().is_some())
        .collect();
    let delivery = match (delivery, text("transport").as_deref()) {
        (Delivery::Outbox { .. }, _) | (_, None) => delivery.clone(),
        (_, Some(t)) => match find(&transports, t).and_then(DeliveryMode::remote) {
            Some(chosen) => chosen,
            None => {
                ctx.error(
                    &format!("{at}.transport"),
                    format!("{t:?} is not one of {}", listed(&transports)),
                );
                delivery.clone()
            }
        },
    };
    let limit = |ctx: &mut Ctx<'_>, key: &str, inherited: Option<NonZeroU32>| match fields.get(key)
    {
        None => inherited,
        Some(value) => match value.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) => NonZeroU32::new(n),
            None => {
                ctx.error(
                    &format!("{at}.{key}"),
                    "is not a whole number from 0 (off) to 4294967295",
                );
                inherited
            }
        },
    };
    let rate_limits = RateLimitSettings {
        mailbox_messages_per_minute: limit(
            ctx,
            "mailboxMessagesPerMinute",
            rate_limits.mailbox_messages_per_minute,
        ),
        mailbox_recipients_per_day: limit(
            ctx,
            "mailboxRecipientsPerDay",
            rate_limits.mailbox_recipients_per_day,
        ),
        ..rate_limits
    };
    let send_email = send_email_of(ctx, &at, fields, &delivery, cloud)?;
    Some(IdentitySettings {
        name,
        from,
        send_email,
        delivery,
        rate_limits,
    })
}

/// The entry's `sendEmail` keys over the default's, validated as `featureSwitches.sendEmail`
/// is, every error named after the entry.
fn send_email_of(
    ctx: &mut Ctx<'_>,
    at: &str,
    fields: &serde_json::Map<String, Value>,
    delivery: &Delivery,
    cloud: Cloud,
) -> Option<SendEmailSettings> {
    let sets_credential = CREDENTIAL_KEYS.iter().any(|k| {
        fields.contains_key(*k) || fields.contains_key(&format!("{k}{}", keys::FILE_SUFFIX))
    });
    let mut values: BTreeMap<String, Effective> = ctx
        .values
        .values
        .iter()
        .filter(|(key, _)| {
            !(sets_credential && CREDENTIAL_KEYS.iter().any(|name| key.as_str() == se(name)))
        })
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    let mut ok = true;
    for (field, value) in fields {
        if OWN_KEYS.contains(&field.as_str()) {
            continue;
        }
        let (name, from_file) = match field.strip_suffix(keys::FILE_SUFFIX) {
            Some(base) if keys::spec(&se(base)).is_some_and(|s| s.from_file) => (base, true),
            _ => (field.as_str(), false),
        };
        if keys::spec(&se(name)).is_none() {
            ctx.error(
                &format!("{at}.{field}"),
                "unknown key: an identity takes name, from, transport, mailboxMessagesPerMinute, mailboxRecipientsPerDay and the featureSwitches.sendEmail keys",
            );
            ok = false;
            continue;
        }
        let text = match value {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            _ => {
                ctx.error(&format!("{at}.{field}"), "is not a single value");
                ok = false;
                continue;
            }
        };
        let effective = if from_file {
            match std::fs::read_to_string(text.trim()) {
                Ok(content) => Effective {
                    text: content.trim_end_matches(['\r', '\n']).to_owned(),
                    origin: Origin::SecretFile(PathBuf::from(text.trim())),
                    encrypted: false,
                },
                Err(e) => {
                    ctx.error(
                        &format!("{at}.{field}"),
                        format!("{:?} cannot be read: {e}", text.trim()),
                    );
                    ok = false;
                    continue;
                }
            }
        } else {
            Effective {
                text,
                origin: Origin::File,
                encrypted: false,
            }
        };
        values.insert(se(name), effective);
    }
    let overlay = ctx.values.with_values(values);
    let mut inner = Ctx {
        values: &overlay,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let settings = super::send_email::send_email(&mut inner, delivery, cloud);
    let prefix = se("");
    for error in inner.errors {
        let key = match error.key.strip_prefix(&prefix) {
            Some(name) => format!("{at}.{name}"),
            None => format!("{at} ({})", error.key),
        };
        ctx.error(&key, error.message);
        ok = false;
    }
    for warning in inner.warnings {
        ctx.warnings.push(format!("{at}: {warning}"));
    }
    ok.then_some(settings)
}
