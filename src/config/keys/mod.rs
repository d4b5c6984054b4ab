//! The settings keys the relay knows, and Spring Boot's relaxed names for them.

mod declared;
pub mod table;

pub use declared::{KEYS, SUBTREES};

/// One known key: its name, what it may hold, its default and what it means. Loading reads
/// the range and default from here, `check-config` the secrecy, and the README's key tables
/// are printed from it (`mail-relay keys`).
#[derive(Debug, Clone, Copy)]
pub struct KeySpec {
    /// The full key as documented, e.g. `featureSwitches.sendEmail.smtpServer`.
    pub key: &'static str,
    /// Never shown: masked in errors and in `check-config` output.
    pub secret: bool,
    /// May also be read from a file named by the sibling key `<key>File`.
    pub from_file: bool,
    pub allowed: Allowed,
    pub preset: Preset,
    /// What the key means, for the README's tables (Markdown).
    pub help: &'static str,
}

/// What a key's value may be.
#[derive(Debug, Clone, Copy)]
pub enum Allowed {
    /// Text its section checks (a host, a URL, a path): `help` says what.
    Text,
    /// A whole number in `min..=max`.
    Whole { min: u64, max: u64 },
    /// One of an enum's spellings; the function lists them as an error names them.
    Choice(fn() -> String),
    /// `true` or `false`, any case.
    Flag,
    /// A list or map its section parses (API keys, policies, addresses).
    Tree,
}

/// The value a key has when nothing sets it.
#[derive(Debug, Clone, Copy)]
pub enum Preset {
    /// No value: the feature is off, or its section requires it.
    Unset,
    /// This value, as it would be written.
    Is(&'static str),
    /// Derived from other settings, as the text says (Markdown).
    Said(&'static str),
}

impl KeySpec {
    const fn new(key: &'static str, allowed: Allowed, preset: Preset, help: &'static str) -> Self {
        Self {
            key,
            secret: false,
            from_file: false,
            allowed,
            preset,
            help,
        }
    }

    /// A secret: masked everywhere, and readable from a file (`<key>File`).
    const fn secret(self) -> Self {
        Self {
            secret: true,
            from_file: true,
            ..self
        }
    }

    /// Not a secret, but long (a PEM file): readable from a file too.
    const fn read_from_file(self) -> Self {
        Self {
            from_file: true,
            ..self
        }
    }

    /// The default as written, when it is one value.
    pub fn preset_text(&self) -> Option<&'static str> {
        match self.preset {
            Preset::Is(text) => Some(text),
            Preset::Unset | Preset::Said(_) => None,
        }
    }
}

pub const SERVER: &str = "server";
/// Whether queued mails are stored encrypted; read while resolving, to load the key.
pub const ENCRYPT_AT_REST: &str = "mailRelay.delivery.encryptAtRest";
pub const SEND_EMAIL: &str = "featureSwitches.sendEmail";
pub const MAIL_RELAY: &str = "mailRelay";

/// Suffix of the sibling key that names a file holding the value (`oAuthClientSecretFile`).
pub const FILE_SUFFIX: &str = "File";

/// The spec of `key`, if known.
pub fn spec(key: &str) -> Option<&'static KeySpec> {
    KEYS.iter().find(|k| k.key == key)
}

/// Whether `key` is a secret; an identity's keys (`mailRelay.identities[0].smtpPassword`)
/// are `featureSwitches.sendEmail`'s.
pub fn is_secret(key: &str) -> bool {
    let spec = match key.strip_prefix("mailRelay.identities[") {
        Some(rest) => rest
            .split_once("].")
            .and_then(|(_, name)| spec(&format!("{SEND_EMAIL}.{name}"))),
        None => spec(key),
    };
    spec.is_some_and(|s| s.secret)
}

/// The sections that hold lists or maps, by name.
pub fn subtree_names<'a>() -> impl Iterator<Item = &'a str> + Clone {
    SUBTREES.iter().map(|s| -> &'a str { s.key })
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
            key_for_env("MAILRELAY_CORS_ALLOWEDORIGINS", subtree_names()),
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
