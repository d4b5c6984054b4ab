//! Header values and the caller-supplied headers the relay lets through.

use std::fmt;

use serde::Deserialize;
use utoipa::ToSchema;

/// Longest header value a caller may give (before encoding); lettre folds longer lines.
const MAX_HEADER_TEXT: usize = 2048;

/// Longest line of a message, CRLF not counted (RFC 5322 section 2.1.1).
pub(crate) const MAX_LINE: usize = 998;

/// Whether `value`, folded only at its spaces as lettre folds, keeps every line of header
/// `name` within [`MAX_LINE`]: a word starts a line at worst, after `Name: ` or the space.
pub(crate) fn fits_when_folded(name: &str, value: &str) -> bool {
    let room = MAX_LINE.saturating_sub(name.len() + ": ".len());
    value.split(' ').all(|word| word.len() <= room)
}

/// Text that is safe as an unstructured header value: one line, no control characters other
/// than tab. A CR or LF is refused, never stripped: it is how header injection starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderText(String);

/// Why a string cannot be a header value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderTextError {
    #[error("contains a line break (CR or LF); header values must be a single line")]
    LineBreak,
    #[error("contains a control character (U+{0:04X})")]
    Control(u32),
    #[error("is longer than {MAX_HEADER_TEXT} characters")]
    TooLong,
}

impl HeaderText {
    pub fn parse(input: &str) -> Result<Self, HeaderTextError> {
        if input.contains(['\r', '\n']) {
            return Err(HeaderTextError::LineBreak);
        }
        if let Some(c) = input.chars().find(|c| c.is_control() && *c != '\t') {
            return Err(HeaderTextError::Control(c.into()));
        }
        if input.chars().count() > MAX_HEADER_TEXT {
            return Err(HeaderTextError::TooLong);
        }
        Ok(Self(input.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HeaderText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `priority`: shown by mail clients as a flag; sets `X-Priority` and `Importance`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    /// `(X-Priority, Importance)` values, or `None` for normal (clients assume it when absent).
    pub fn header_values(self) -> Option<(&'static str, &'static str)> {
        match self {
            Self::High => Some(("1 (Highest)", "high")),
            Self::Normal => None,
            Self::Low => Some(("5 (Lowest)", "low")),
        }
    }
}

/// The headers a caller may set besides the ones the relay writes: the structured ones, then
/// these of free text.
const FREE_TEXT: &[&str] = &["Keywords", "Comments"];

/// Every allowed header name, in the order error messages list them.
fn allowed() -> impl Iterator<Item = &'static str> {
    STRUCTURED.iter().chain(FREE_TEXT).copied()
}

/// `X-` headers that Exchange, spam filters or the relay itself give meaning to. Letting a
/// caller set them would let it steer transport rules or spam verdicts (`X-MS-Exchange-
/// Organization-SCL: -1`) or contradict `priority`.
const DENIED_X_PREFIXES: &[&str] = &[
    "x-ms-",
    "x-microsoft-",
    "x-forefront-",
    "x-exchange-",
    "x-originating-",
    "x-spam",
    "x-virus",
    "x-priority",
    "x-msmail-priority",
];

/// The allow-list, for error messages and documentation.
pub fn allowed_header_names() -> String {
    format!(
        "{}, and X-* headers except those starting with {}",
        allowed().collect::<Vec<_>>().join(", "),
        DENIED_X_PREFIXES.join(", ")
    )
}

/// A caller-supplied header that passed the allow-list and its value's grammar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomHeader {
    name: String,
    value: HeaderText,
}

impl CustomHeader {
    /// Check one entry of the request's `headers` map; the error is the message for that field.
    pub fn parse(name: &str, value: &str) -> Result<Self, String> {
        let canonical = canonical_name(name)?;
        let value = HeaderText::parse(value).map_err(|e| e.to_string())?;
        check_value(&canonical, value.as_str())?;
        // Free text is encoded when a word is too long for a line; a structured value cannot
        // be (an encoded word is not a message id or URI), so it must fit as it is.
        if STRUCTURED.contains(&canonical.as_str()) && !fits_when_folded(&canonical, value.as_str())
        {
            return Err(format!(
                "has a word (text without a space) too long for one header line: at most {} \
                 characters for {canonical} (RFC 5322 allows {MAX_LINE} on a line)",
                MAX_LINE - canonical.len() - 2
            ));
        }
        Ok(Self {
            name: canonical,
            value,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn value(&self) -> &str {
        self.value.as_str()
    }

    /// Structured headers (message ids, URIs, keywords) are ASCII by their grammar and
    /// written as they are; the others are free text, encoded when not ASCII.
    pub fn is_structured(&self) -> bool {
        STRUCTURED.contains(&self.name.as_str())
    }
}

/// Allowed headers whose value has a grammar (checked in `check_value`).
const STRUCTURED: &[&str] = &[
    "In-Reply-To",
    "References",
    "List-Id",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "Auto-Submitted",
];

fn canonical_name(name: &str) -> Result<String, String> {
    if let Some(known) = allowed().find(|a| a.eq_ignore_ascii_case(name)) {
        return Ok(known.to_owned());
    }
    let lower = name.to_ascii_lowercase();
    let is_x = lower.len() > 2
        && lower.starts_with("x-")
        && lower.len() <= 76
        && lower.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if !is_x {
        return Err(format!(
            "header not allowed; allowed are {}",
            allowed_header_names()
        ));
    }
    if DENIED_X_PREFIXES.iter().any(|p| lower.starts_with(p)) {
        return Err(format!(
            "header not allowed: {name} has a meaning to Exchange, spam filters or the relay \
             (use the `priority` field for priorities)"
        ));
    }
    Ok(name.to_owned())
}

fn check_value(name: &str, value: &str) -> Result<(), String> {
    match name {
        "In-Reply-To" | "References" => {
            let ok = value.is_ascii()
                && !value.trim().is_empty()
                && value.split_whitespace().all(is_msg_id);
            ok.then_some(())
                .ok_or_else(|| "must be one or more message ids like <id@example.com>".into())
        }
        "List-Unsubscribe" => {
            let ok = value.is_ascii()
                && value.split(',').all(|item| {
                    let item = item.trim();
                    item.len() > 2 && item.starts_with('<') && item.ends_with('>')
                });
            ok.then_some(()).ok_or_else(|| {
                "must be a comma-separated list of <uri>, e.g. <https://example.com/unsub>".into()
            })
        }
        "List-Unsubscribe-Post" => (value == "List-Unsubscribe=One-Click")
            .then_some(())
            .ok_or_else(|| "must be exactly List-Unsubscribe=One-Click (RFC 8058)".into()),
        "Auto-Submitted" => {
            let keyword = value.split(';').next().unwrap_or_default().trim();
            ["no", "auto-generated", "auto-replied", "auto-notified"]
                .iter()
                .any(|k| k.eq_ignore_ascii_case(keyword))
                .then_some(())
                .ok_or_else(|| {
                    "must be no, auto-generated, auto-replied or auto-notified (RFC 3834)".into()
                })
        }
        "List-Id" => (value.is_ascii() && value.contains('<') && value.ends_with('>'))
            .then_some(())
            .ok_or_else(|| "must be like Name <list-id.example.com> (RFC 2919)".into()),
        _ => Ok(()),
    }
}

fn is_msg_id(token: &str) -> bool {
    token
        .strip_prefix('<')
        .and_then(|t| t.strip_suffix('>'))
        .is_some_and(|inner| {
            inner
                .split_once('@')
                .is_some_and(|(l, r)| !l.is_empty() && !r.is_empty())
                && inner
                    .chars()
                    .all(|c| c.is_ascii_graphic() && c != '<' && c != '>')
        })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn allow_list() {
        assert_eq!(
            CustomHeader::parse("in-reply-to", "<a@b.c>")
                .unwrap()
                .name(),
            "In-Reply-To"
        );
        assert!(CustomHeader::parse("References", "<a@b.c> <d@e.f>").is_ok());
        assert!(CustomHeader::parse("X-Ticket-Id", "4711").is_ok());
        assert!(
            CustomHeader::parse(
                "List-Unsubscribe",
                "<mailto:u@example.com>, <https://e.com/u>"
            )
            .is_ok()
        );
        assert!(CustomHeader::parse("Auto-Submitted", "auto-generated").is_ok());
        // Free text may hold long words: it is encoded, not refused.
        assert!(CustomHeader::parse("X-Token", &"a".repeat(2048)).is_ok());
        let id = format!("<{}@example.com>", "a".repeat(970));
        assert!(CustomHeader::parse("References", &format!("{id} {id}")).is_ok());
        for (name, value) in [
            ("From", "x@example.com"),
            ("Subject", "hi"),
            ("Content-Type", "text/plain"),
            ("Received", "from x"),
            ("X-MS-Exchange-Organization-SCL", "-1"),
            ("X-Priority", "1"),
            ("X-", "1"),
            ("X-Bad Name", "1"),
            ("In-Reply-To", "not a message id"),
            ("Auto-Submitted", "sometimes"),
            ("List-Unsubscribe-Post", "yes"),
            ("X-Ok", "line\r\nBcc: victim@example.com"),
            ("References", &format!("<{}@example.com>", "a".repeat(1000))),
        ] {
            assert!(
                CustomHeader::parse(name, value).is_err(),
                "{name}: {value:?} should be refused"
            );
        }
    }

    proptest! {
        #[test]
        fn header_text_refuses_exactly_line_breaks(
            before in "\\PC{0,20}",
            after in "\\PC{0,20}",
            brk in prop_oneof![Just("\r"), Just("\n"), Just("\r\n")],
        ) {
            prop_assert!(HeaderText::parse(&before).is_ok());
            prop_assert_eq!(
                HeaderText::parse(&format!("{before}{brk}{after}")),
                Err(HeaderTextError::LineBreak)
            );
        }
    }
}
