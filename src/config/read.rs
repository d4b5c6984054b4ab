//! Reading one effective value into a type: its text, a secret, a number, seconds or one of
//! a set of choices, each problem collected with its key (a secret's value masked) so that
//! every one is reported at once.

use std::fmt::Display;
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::time::Duration;

use secrecy::SecretString;

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
        keys::spec(key).is_some_and(|s| s.secret)
            || self.values.get(key).is_some_and(|v| v.encrypted)
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

    pub(super) fn number<T>(&mut self, key: &str, default: T, allowed: RangeInclusive<T>) -> T
    where
        T: FromStr + PartialOrd + Display + Copy,
    {
        let Some(text) = self.text(key).map(str::to_owned) else {
            return default;
        };
        let range = format!("{}..={}", allowed.start(), allowed.end());
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

    pub(super) fn seconds(&mut self, key: &str, default: u64) -> Duration {
        Duration::from_secs(self.number(key, default, 1..=86_400))
    }

    pub(super) fn one_of<T: Copy>(
        &mut self,
        key: &str,
        default: T,
        choices: &[(&str, T)],
        allowed: &str,
    ) -> T {
        let Some(text) = self.text(key).map(str::to_owned) else {
            return default;
        };
        match choices
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(&text))
        {
            Some((_, v)) => *v,
            None => {
                let shown = self.shown(key, &text);
                self.error(key, format!("{shown} is not one of {allowed}"));
                default
            }
        }
    }
}
