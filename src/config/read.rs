//! Reading one effective value into a type: its text, a secret, a number, seconds or one of
//! a set of choices, each problem collected with its key (a secret's value masked) so that
//! every one is reported at once.

use std::fmt::Display;
use std::str::FromStr;
use std::time::Duration;

use secrecy::SecretString;

use super::keys::{Allowed, KeySpec};
use super::resolve::Resolved;
use super::{SettingError, keys};

pub(super) struct Ctx<'a> {
    pub(super) values: &'a Resolved,
    pub(super) errors: Vec<SettingError>,
    pub(super) warnings: Vec<String>,
}

impl Ctx<'_> {
    pub(super) fn error(&mut self, key: &str, message: impl Into<String>) {
        // Its value could not be read at all; that error is already reported.
        if self.values.failed.contains(key) {
            return;
        }
        let mut message = message.into();
        // Checks quote values as `{value:?}`: for a secret or `{cipher}` value, whichever check
        // wrote the message, that quote becomes `****` (`shown` does the same up front).
        if let Some(value) = self.values.get(key).filter(|_| self.masked(key)) {
            for form in [value.text.as_str(), value.text.trim()] {
                message = message.replace(&format!("{form:?}"), "****");
            }
        }
        self.errors.push(SettingError {
            key: key.to_owned(),
            message,
        });
    }

    fn masked(&self, key: &str) -> bool {
        keys::is_secret(key) || self.values.get(key).is_some_and(|v| v.encrypted)
    }

    /// The effective text of a non-secret key, trimmed.
    pub(super) fn text(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(|v| v.text.trim())
    }

    /// The effective text of a secret key, untouched (spaces may belong to a password).
    pub(super) fn secret(&self, key: &str) -> Option<SecretString> {
        self.values
            .get(key)
            .map(|v| SecretString::from(v.text.clone()))
    }

    /// The value as it may appear in a message: masked for secrets and `{cipher}` values.
    pub(super) fn shown(&self, key: &str, value: &str) -> String {
        if self.masked(key) {
            "****".into()
        } else {
            format!("{value:?}")
        }
    }

    pub(super) fn required(&mut self, key: &str, why: &str) -> Option<String> {
        match self.text(key) {
            Some(v) => Some(v.to_owned()),
            None => {
                self.error(key, format!("is required {why}"));
                None
            }
        }
    }

    /// A whole-number key: its range and default come from its declaration.
    pub(super) fn whole<T>(&mut self, key: &str) -> T
    where
        T: FromStr + TryFrom<u64> + PartialOrd + Display + Copy,
    {
        let default = declared(key)
            .preset_text()
            .and_then(|text| text.parse().ok())
            .unwrap_or_else(|| panic!("{key}: declared without a whole-number default"));
        self.whole_or(key, default)
    }

    /// A whole-number key whose default is derived from other settings.
    pub(super) fn whole_or<T>(&mut self, key: &str, default: T) -> T
    where
        T: FromStr + TryFrom<u64> + PartialOrd + Display + Copy,
    {
        let Allowed::Whole { min, max } = declared(key).allowed else {
            panic!("{key}: not declared as a whole number");
        };
        let bound = |n: u64| {
            T::try_from(n)
                .ok()
                .unwrap_or_else(|| panic!("{key}: {n} does not fit its type"))
        };
        let allowed = bound(min)..=bound(max);
        let Some(text) = self.text(key).map(str::to_owned) else {
            return default;
        };
        let range = format!("{min}..={max}");
        let shown = self.shown(key, &text);
        // A whole number too large for the type is out of range, not "not a number".
        if text.parse::<i128>().is_err() {
            self.error(
                key,
                format!("{shown} is not a whole number; allowed {range}"),
            );
            return default;
        }
        match text.parse::<T>() {
            Ok(n) if allowed.contains(&n) => n,
            _ => {
                self.error(key, format!("{shown} is out of range; allowed {range}"));
                default
            }
        }
    }

    /// A key in seconds, as declared.
    pub(super) fn seconds(&mut self, key: &str) -> Duration {
        Duration::from_secs(self.whole(key))
    }

    /// A `true`/`false` key, any case, defaulting as declared.
    pub(super) fn flag(&mut self, key: &str) -> bool {
        self.choice(key, FLAG)
    }

    /// One of `choices`, defaulting as declared.
    pub(super) fn choice<T: Copy + PartialEq>(&mut self, key: &str, choices: &[(&str, T)]) -> T {
        let default = declared(key)
            .preset_text()
            .and_then(|text| find(choices, text))
            .unwrap_or_else(|| panic!("{key}: declared without a default among its choices"));
        self.choice_or(key, default, choices)
    }

    /// One of `choices`, with a default of the caller's; the error lists them as declared.
    pub(super) fn choice_or<T: Copy + PartialEq>(
        &mut self,
        key: &str,
        default: T,
        choices: &[(&str, T)],
    ) -> T {
        let Some(text) = self.text(key).map(str::to_owned) else {
            return default;
        };
        match find(choices, &text) {
            Some(v) => v,
            None => {
                let allowed = match declared(key).allowed {
                    Allowed::Choice(listing) => listing(),
                    Allowed::Flag => listed(FLAG),
                    _ => listed(choices),
                };
                let shown = self.shown(key, &text);
                self.error(key, format!("{shown} is not one of {allowed}"));
                default
            }
        }
    }

    /// The effective text of a key, or its declared default.
    pub(super) fn text_or_preset(&self, key: &str) -> &str {
        self.text(key).unwrap_or_else(|| self.preset(key))
    }

    /// A key's declared default as written ("" when it has none or it is derived).
    pub(super) fn preset(&self, key: &str) -> &'static str {
        declared(key).preset_text().unwrap_or_default()
    }
}

/// What `reader` makes of no settings at all: every key at its declared default. The
/// sections' `Default` impls are this, so that each default is written once, in
/// `keys/declared.rs`.
pub(super) fn from_presets<T>(reader: impl FnOnce(&mut Ctx<'_>) -> T) -> T {
    let values = Resolved::default();
    let mut ctx = Ctx {
        values: &values,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let read = reader(&mut ctx);
    debug_assert!(
        ctx.errors.is_empty(),
        "a declared default is refused: {:?}",
        ctx.errors
    );
    read
}

/// The declaration of `key`; reading an undeclared key is the relay's own bug.
fn declared(key: &str) -> &'static KeySpec {
    keys::spec(key).unwrap_or_else(|| panic!("{key} is read but not declared in config/keys"))
}

// An enum setting's spellings live in one `CHOICES` table, `(spelling, value)`, beside the enum:
// the first spelling of a value is its name, the one `check-config` prints; later ones are
// aliases. Parsing, the "allowed" list of an error and the printer all read that table.

/// A boolean setting's spellings.
pub(super) const FLAG: &[(&str, bool)] = &[("true", true), ("false", false)];

/// The value `text` spells in `choices`, ignoring ASCII case.
pub(super) fn find<T: Copy>(choices: &[(&str, T)], text: &str) -> Option<T> {
    choices
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(text))
        .map(|(_, value)| *value)
}

/// The name of `value`: its first spelling in `choices`.
pub(super) fn name_in<T: PartialEq>(choices: &[(&'static str, T)], value: &T) -> &'static str {
    choices
        .iter()
        .find(|(_, v)| v == value)
        .map_or("", |(name, _)| name)
}

/// The allowed spellings as an error lists them: the names, then the aliases, as in
/// `NONE, SSL, TLS (or 0, 1, 2)`.
pub(super) fn listed<T: PartialEq>(choices: &[(&str, T)]) -> String {
    let mut names = Vec::new();
    let mut aliases = Vec::new();
    for (i, (spelling, value)) in choices.iter().enumerate() {
        if choices[..i].iter().any(|(_, v)| v == value) {
            aliases.push(*spelling);
        } else {
            names.push(*spelling);
        }
    }
    if aliases.is_empty() {
        names.join(", ")
    } else {
        format!("{} (or {})", names.join(", "), aliases.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{
        AuthMode, Cloud, DeliveryMode, Encryption, ForwardedHeader, LogFormat, ManagedKind,
        QueueMode,
    };
    use super::*;

    /// Each spelling parses to its value, and a value's name parses back to it.
    fn round_trip<T: Copy + PartialEq + std::fmt::Debug>(choices: &[(&'static str, T)]) {
        for (spelling, value) in choices {
            assert_eq!(find(choices, spelling), Some(*value));
            assert_eq!(find(choices, &spelling.to_lowercase()), Some(*value));
            assert_eq!(find(choices, name_in(choices, value)), Some(*value));
        }
        assert_eq!(find(choices, "no such spelling"), None);
    }

    #[test]
    fn every_table_lists_its_names_then_its_aliases() {
        round_trip(Encryption::CHOICES);
        round_trip(AuthMode::CHOICES);
        round_trip(Cloud::CHOICES);
        assert_eq!(listed(Encryption::CHOICES), "NONE, SSL, TLS (or 0, 1, 2)");
        assert_eq!(Encryption::None.name(), "NONE");
        assert_eq!(Encryption::Tls.name(), "TLS");
        assert_eq!(listed(AuthMode::CHOICES), "NONE, BASIC, MS_OAUTH");
        assert_eq!(AuthMode::MsOAuth.name(), "MS_OAUTH");
        assert_eq!(listed(Cloud::CHOICES), "global, usGovHigh, usGovDoD, china");
        round_trip(QueueMode::CHOICES);
        round_trip(LogFormat::CHOICES);
        round_trip(ForwardedHeader::CHOICES);
        assert_eq!(listed(QueueMode::CHOICES), "prefer, always, never");
        assert_eq!(QueueMode::Never.name(), "never");
        assert_eq!(listed(LogFormat::CHOICES), "json, text");
        assert_eq!(
            listed(ForwardedHeader::CHOICES),
            "X-Forwarded-For, Forwarded"
        );
        assert_eq!(ForwardedHeader::XForwardedFor.name(), "X-Forwarded-For");
        round_trip(FLAG);
        assert_eq!(listed(FLAG), "true, false");
        round_trip(ManagedKind::CHOICES);
        assert_eq!(ManagedKind::AppService.name(), "appService");
        round_trip(DeliveryMode::CHOICES);
        assert_eq!(listed(DeliveryMode::CHOICES), "smtp, graph, auto, outbox");
        for (name, mode) in DeliveryMode::CHOICES {
            let delivery = mode.remote();
            assert_eq!(
                delivery.map(|d| d.mode()),
                (*name != "outbox").then_some(*mode)
            );
        }
    }
}
