//! The settings keys the relay knows, and Spring Boot's relaxed names for them.

/// One known key: its canonical spelling and how to treat its value.
#[derive(Debug, Clone, Copy)]
pub struct KeySpec {
    /// The full key as documented, e.g. `featureSwitches.sendEmail.smtpServer`.
    pub key: &'static str,
    /// Never shown: masked in errors and in `check-config` output.
    pub secret: bool,
    /// May also be read from a file named by the sibling key `<key>File`.
    pub from_file: bool,
}

const fn plain(key: &'static str) -> KeySpec {
    KeySpec {
        key,
        secret: false,
        from_file: false,
    }
}

const fn secret(key: &'static str) -> KeySpec {
    KeySpec {
        key,
        secret: true,
        from_file: true,
    }
}

pub const SERVER: &str = "server";
/// Whether queued mails are stored encrypted; read while resolving, to load the key.
pub const ENCRYPT_AT_REST: &str = "mailRelay.delivery.encryptAtRest";
pub const SEND_EMAIL: &str = "featureSwitches.sendEmail";
pub const MAIL_RELAY: &str = "mailRelay";

/// Every key the loader reads. A new `mailRelay` setting starts here.
pub const KEYS: &[KeySpec] = &[
    plain("server.address"),
    plain("server.port"),
    plain("featureSwitches.sendEmail.smtpServer"),
    plain("featureSwitches.sendEmail.smtpPort"),
    plain("featureSwitches.sendEmail.smtpEncryption"),
    plain("featureSwitches.sendEmail.smtpAuthentication"),
    plain("featureSwitches.sendEmail.smtpUsername"),
    secret("featureSwitches.sendEmail.smtpPassword"),
    plain("featureSwitches.sendEmail.oAuthClientId"),
    secret("featureSwitches.sendEmail.oAuthClientSecret"),
    // Not a secret, but as long as a PEM file: a file mount is the natural source.
    KeySpec {
        key: "featureSwitches.sendEmail.oAuthCertificate",
        secret: false,
        from_file: true,
    },
    secret("featureSwitches.sendEmail.oAuthPrivateKey"),
    plain("featureSwitches.sendEmail.oAuthFederatedTokenFile"),
    plain("featureSwitches.sendEmail.oAuthManagedIdentity"),
    plain("featureSwitches.sendEmail.oAuthTenantId"),
    plain("featureSwitches.sendEmail.oAuthTokenEndpoint"),
    plain("featureSwitches.sendEmail.oAuthScopes"),
    plain("featureSwitches.sendEmail.oAuthTokenGraceTimeInSeconds"),
    plain("mailRelay.cloud"),
    plain("mailRelay.defaultIdentity.name"),
    plain("mailRelay.delivery.mode"),
    plain("mailRelay.delivery.outboxDir"),
    plain("mailRelay.delivery.queue"),
    plain("mailRelay.delivery.workers"),
    plain("mailRelay.delivery.maxAgeSeconds"),
    plain("mailRelay.delivery.retentionSeconds"),
    plain("mailRelay.delivery.retryMinSeconds"),
    plain("mailRelay.delivery.retryMaxSeconds"),
    plain("mailRelay.delivery.maxQueuedBytes"),
    plain("mailRelay.delivery.webhook"),
    secret("mailRelay.delivery.webhookSecret"),
    plain(ENCRYPT_AT_REST),
    plain("mailRelay.graph.baseUrl"),
    plain("mailRelay.graph.scopes"),
    plain("mailRelay.graph.connectTimeoutSeconds"),
    plain("mailRelay.graph.requestTimeoutSeconds"),
    plain("mailRelay.graph.maxConcurrentRequests"),
    plain("mailRelay.graph.sentItemsLookupSeconds"),
    plain("mailRelay.smtp.maxConnections"),
    plain("mailRelay.smtp.connectTimeoutSeconds"),
    plain("mailRelay.smtp.commandTimeoutSeconds"),
    plain("mailRelay.smtp.sendDeadlineSeconds"),
    plain("mailRelay.smtp.caFile"),
    plain("mailRelay.smtp.helloName"),
    plain("mailRelay.smtp.sourceAddress"),
    plain("mailRelay.token.connectTimeoutSeconds"),
    plain("mailRelay.token.requestTimeoutSeconds"),
    plain("mailRelay.limits.maxBodyBytes"),
    plain("mailRelay.limits.maxMessageBytes"),
    plain("mailRelay.limits.maxRecipients"),
    plain("mailRelay.limits.maxInFlightBytes"),
    plain("mailRelay.limits.requestTimeoutSeconds"),
    plain("mailRelay.auth.allowAnonymous"),
    plain("mailRelay.auth.trustedProxy.userHeader"),
    plain("mailRelay.auth.trustedProxy.secretHeader"),
    secret("mailRelay.auth.trustedProxy.secret"),
    plain("mailRelay.auth.oidc.issuer"),
    plain("mailRelay.auth.oidc.audience"),
    plain("mailRelay.auth.oidc.jwksUri"),
    plain("mailRelay.auth.oidc.userClaim"),
    plain("mailRelay.auth.oidc.clockSkewSeconds"),
    plain("mailRelay.sendAs.denialMemorySeconds"),
    plain("mailRelay.rateLimits.mailboxMessagesPerMinute"),
    plain("mailRelay.rateLimits.mailboxRecipientsPerDay"),
    plain("mailRelay.rateLimits.callerMessagesPerMinute"),
    plain("mailRelay.rateLimits.callerRecipientsPerDay"),
    plain("mailRelay.idempotency.ttlSeconds"),
    plain("mailRelay.idempotency.maxEntries"),
    plain("mailRelay.idempotency.maxBytes"),
    plain("mailRelay.store.url"),
    secret("mailRelay.store.password"),
    plain("mailRelay.store.maxConnections"),
    plain("mailRelay.store.connectTimeoutSeconds"),
    plain("mailRelay.http.basePath"),
    plain("mailRelay.http.forwardedHeader"),
    plain("mailRelay.http.headerReadTimeoutSeconds"),
    plain("mailRelay.http.maxConnections"),
    plain("mailRelay.http.maxHeaderBytes"),
    plain("mailRelay.http.docs"),
    plain("mailRelay.shutdown.drainDelaySeconds"),
    plain("mailRelay.shutdown.deadlineSeconds"),
    plain("mailRelay.adminMail.enabled"),
    plain("mailRelay.adminMail.from"),
    plain("mailRelay.metrics.address"),
    plain("mailRelay.metrics.port"),
    plain("mailRelay.log.format"),
    plain("mailRelay.log.level"),
];

/// Sections under `mailRelay` that hold lists or maps (API keys, policies): the loader hands
/// each one, as a tree, to its section's parser instead of reading single values.
/// From the environment they take a comma-separated list (`a@x.com,b@x.com`) or, starting
/// with `[` or `{`, YAML flow text (`[{name: billing, sha256: ..., allowedFrom: [...]}]`).
pub const SUBTREES: &[&str] = &[
    "mailRelay.auth.apiKeys",
    "mailRelay.auth.trustedProxy.sources",
    "mailRelay.sendAs.delegates",
    "mailRelay.sendAs.groups",
    "mailRelay.sendAs.exchangeGrants",
    "mailRelay.cors.allowedOrigins",
    "mailRelay.http.trustedProxies",
    "mailRelay.adminMail.recipients",
    "mailRelay.identities",
    "mailRelay.defaultIdentity.from",
];

/// Suffix of the sibling key that names a file holding the value (`oAuthClientSecretFile`).
pub const FILE_SUFFIX: &str = "File";

/// The spec of `key`, if known.
pub fn spec(key: &str) -> Option<&'static KeySpec> {
    KEYS.iter().find(|k| k.key == key)
}

/// Every key a file or the environment may set: the known keys and their `File` forms.
pub fn settable() -> impl Iterator<Item = String> {
    KEYS.iter().flat_map(|k| {
        let file = k.from_file.then(|| format!("{}{FILE_SUFFIX}", k.key));
        std::iter::once(k.key.to_owned()).chain(file)
    })
}

/// Relaxed form of a key, as Spring Boot compares them: lower case, dashes removed.
/// `featureSwitches.sendEmail.smtp-server` and `...smtpServer` are the same key.
pub fn canonical(key: &str) -> String {
    key.chars()
        .filter(|c| *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

/// The environment variable that overrides `key`: upper case, dots to `_`, dashes removed
/// (`mailRelay.smtp.maxConnections` -> `MAILRELAY_SMTP_MAXCONNECTIONS`).
pub fn env_name(key: &str) -> String {
    key.chars()
        .filter(|c| *c != '-')
        .map(|c| if c == '.' { '_' } else { c })
        .flat_map(char::to_uppercase)
        .collect()
}

/// The key among `candidates` that the environment variable `var` overrides, if any.
pub fn key_for_env<'a>(
    var: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let relaxed: String = var
        .chars()
        .map(|c| if c == '_' { '.' } else { c })
        .flat_map(char::to_lowercase)
        .collect();
    candidates.into_iter().find(|k| canonical(k) == relaxed)
}

/// The candidate closest to `unknown` (for "did you mean ...?").
pub fn nearest<'a>(
    unknown: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let unknown = unknown.to_lowercase();
    candidates
        .into_iter()
        .map(|c| (strsim::levenshtein(&unknown, &c.to_lowercase()), c))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// What the README's keys table (`### Keys`) names in its first column: the keys (`…` is
    /// `featureSwitches.sendEmail.`, `.x` a sibling of the key before it), the sections it
    /// points elsewhere for (`a.*`), and the keys marked as readable from a file (`(…File)`).
    struct ReadmeTable {
        keys: Vec<String>,
        sections: Vec<String>,
        from_file: Vec<String>,
    }

    fn readme_table() -> ReadmeTable {
        let readme = include_str!("../../README.md");
        let (_, table) = readme
            .split_once("\n### Keys\n")
            .expect("the README has a Keys section");
        let mut named = ReadmeTable {
            keys: Vec::new(),
            sections: Vec::new(),
            from_file: Vec::new(),
        };
        let rows = table
            .lines()
            .skip_while(|line| !line.starts_with('|'))
            .take_while(|line| line.starts_with('|'));
        for row in rows {
            let first = row.split('|').nth(1).unwrap_or_default();
            let mut last = String::new();
            for token in first.split('`').skip(1).step_by(2) {
                if token == "…File" {
                    named.from_file.push(last.clone());
                } else if let Some(section) = token.strip_suffix('*') {
                    named.sections.push(section.to_owned());
                } else {
                    last = if let Some(name) = token.strip_prefix('…') {
                        format!("{SEND_EMAIL}.{name}")
                    } else if let Some(sibling) = token.strip_prefix('.') {
                        let parent = last.rsplit_once('.').map_or("", |(parent, _)| parent);
                        format!("{parent}.{sibling}")
                    } else {
                        token.to_owned()
                    };
                    named.keys.push(last.clone());
                }
            }
        }
        named
    }

    #[test]
    fn the_readme_keys_table_names_every_key_and_only_known_ones() {
        let table = readme_table();
        assert!(table.keys.len() > 40, "read only {:?}", table.keys);
        let known: Vec<&str> = KEYS
            .iter()
            .map(|k| k.key)
            .chain(SUBTREES.iter().copied())
            .collect();
        for key in &table.keys {
            assert!(
                known.contains(&key.as_str()),
                "the README's keys table names {key}, which is no key"
            );
        }
        for section in &table.sections {
            assert!(
                known.iter().any(|k| k.starts_with(section.as_str())),
                "the README's keys table points to {section}*, which holds no key"
            );
        }
        for key in known {
            assert!(
                table.keys.iter().any(|k| k == key)
                    || table.sections.iter().any(|s| key.starts_with(s.as_str())),
                "{key} is missing from the README's keys table"
            );
        }
        for spec in KEYS
            .iter()
            .filter(|k| table.keys.iter().any(|t| t == k.key))
        {
            assert_eq!(
                table.from_file.iter().any(|k| k == spec.key),
                spec.from_file,
                "{}: the README's (…File) mark and the key's declaration disagree",
                spec.key
            );
        }
    }

    #[test]
    fn env_names_follow_spring_relaxed_binding() {
        assert_eq!(
            env_name("featureSwitches.sendEmail.smtpServer"),
            "FEATURESWITCHES_SENDEMAIL_SMTPSERVER"
        );
        assert_eq!(env_name("server.port"), "SERVER_PORT");
        assert_eq!(
            env_name("mailRelay.smtp.maxConnections"),
            "MAILRELAY_SMTP_MAXCONNECTIONS"
        );
    }

    #[test]
    fn every_known_key_is_found_from_its_env_name() {
        let all: Vec<String> = settable().collect();
        for key in &all {
            let found = key_for_env(&env_name(key), all.iter().map(String::as_str));
            assert_eq!(found, Some(key.as_str()), "{key}");
        }
    }

    #[test]
    fn subtree_env_names_are_found() {
        assert_eq!(
            key_for_env("MAILRELAY_CORS_ALLOWEDORIGINS", SUBTREES.iter().copied()),
            Some("mailRelay.cors.allowedOrigins")
        );
    }

    #[test]
    fn dashed_keys_are_the_same_key() {
        assert_eq!(
            canonical("featureSwitches.send-email.smtp-server"),
            canonical("featureSwitches.sendEmail.smtpServer")
        );
    }

    #[test]
    fn nearest_names_the_typo_fix() {
        assert_eq!(
            nearest("smtpSever", ["smtpServer", "smtpPort", "oAuthScopes"]),
            Some("smtpServer")
        );
    }

    fn camel_segment() -> impl Strategy<Value = String> {
        (
            "[a-z][a-z0-9]{0,6}",
            prop::collection::vec("[A-Z][a-z0-9]{0,6}", 0..4),
        )
            .prop_map(|(head, tail)| format!("{head}{}", tail.concat()))
    }

    proptest! {
        #[test]
        fn relaxed_env_name_maps_back_to_its_key(
            segments in prop::collection::vec(camel_segment(), 1..5),
            others in prop::collection::vec(prop::collection::vec(camel_segment(), 1..5), 0..5),
        ) {
            let key = segments.join(".");
            let others: Vec<String> = others.iter().map(|s| s.join(".")).collect();
            // The key must be found among other keys, unless one of them is the same key relaxed.
            let candidates: Vec<&str> = others
                .iter()
                .map(String::as_str)
                .filter(|o| canonical(o) != canonical(&key))
                .chain(std::iter::once(key.as_str()))
                .collect();
            prop_assert_eq!(key_for_env(&env_name(&key), candidates), Some(key.as_str()));
        }
    }
}
