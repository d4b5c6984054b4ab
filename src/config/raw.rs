//! The YAML file as the loader first sees it: the known keys' values as text, before any
//! override, placeholder or decryption. Unknown keys become warnings or errors here.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::SettingError;
use super::keys::{self, MAIL_RELAY, SEND_EMAIL, SERVER};

/// What the file sets.
#[derive(Default)]
pub struct RawFile {
    /// Known key (canonical spelling, `File` forms included) -> its text.
    pub values: BTreeMap<String, String>,
    /// Subtrees listed in [`keys::SUBTREES`], for their section's own parser.
    pub subtrees: BTreeMap<&'static str, Value>,
    pub warnings: Vec<String>,
    pub errors: Vec<SettingError>,
    /// Known keys whose value was unusable (reported in `errors`).
    pub failed: BTreeSet<String>,
}

/// Parse `text` (YAML). `Err` carries the parser's message when it is not YAML at all.
pub fn parse(text: &str) -> Result<RawFile, String> {
    let document: Value = if text.trim().is_empty() {
        Value::Null
    } else {
        // Keep number-like text as written where YAML allows it (`0123`, `1_000`, `yes`):
        // settings are text until validation, and a secret must not change. No snippet in
        // errors: the lines around a syntax error may hold a secret; line and column suffice.
        let options = serde_saphyr::options! {
            leading_zero_numbers_as_strings: true,
            underscored_numbers_as_strings: true,
            strict_booleans: true,
            with_snippet: false,
        };
        serde_saphyr::from_str_with_options(text, options).map_err(|e| e.to_string())?
    };
    let mut raw = RawFile::default();
    match &document {
        Value::Null => {}
        Value::Object(_) => {
            let mut leaves = Vec::new();
            flatten(&document, String::new(), &mut leaves, &mut raw.subtrees);
            let known: Vec<String> = keys::settable().collect();
            for (path, leaf) in leaves {
                raw.classify(&known, path, leaf);
            }
        }
        _ => raw.errors.push(SettingError {
            key: "(file)".into(),
            message: "the file must be a YAML mapping (server:, featureSwitches:, mailRelay:)"
                .into(),
        }),
    }
    Ok(raw)
}

enum Leaf {
    Text(String),
    /// A plain scalar YAML read as a number or boolean: its text as re-rendered, which may
    /// differ from what was written (`1.50` -> `1.5`).
    Typed(String),
    List,
}

/// Flatten nested mappings to dotted keys; a dotted key in the file (`server.port: 80`) is
/// split the same way, as Spring does.
fn flatten(
    value: &Value,
    prefix: String,
    out: &mut Vec<(String, Leaf)>,
    subtrees: &mut BTreeMap<&'static str, Value>,
) {
    if let Some(subtree) =
        keys::subtree_names().find(|s| keys::canonical(s) == keys::canonical(&prefix))
    {
        subtrees.insert(subtree, value.clone());
        return;
    }
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(v, path, out, subtrees);
            }
        }
        Value::Null => {}
        Value::Array(_) => out.push((prefix, Leaf::List)),
        Value::String(s) => out.push((prefix, Leaf::Text(s.clone()))),
        Value::Bool(b) => out.push((prefix, Leaf::Typed(b.to_string()))),
        Value::Number(n) => out.push((prefix, Leaf::Typed(n.to_string()))),
    }
}

fn section_of(path: &str) -> Option<&'static str> {
    let canonical = keys::canonical(path);
    [SEND_EMAIL, SERVER, MAIL_RELAY]
        .into_iter()
        .find(|section| {
            let section = keys::canonical(section);
            canonical == section || canonical.starts_with(&format!("{section}."))
        })
}

impl RawFile {
    fn classify(&mut self, known: &[String], path: String, leaf: Leaf) {
        // Other sections belong to the web client sharing the file.
        let Some(section) = section_of(&path) else {
            return;
        };
        let canonical = keys::canonical(&path);
        if let Some(key) = known.iter().find(|k| keys::canonical(k) == canonical) {
            let secret = keys::is_secret(key);
            if matches!(leaf, Leaf::List) || (secret && matches!(leaf, Leaf::Typed(_))) {
                self.failed.insert(key.clone());
            }
            match leaf {
                Leaf::Typed(_) if secret => self.errors.push(SettingError {
                    key: key.clone(),
                    message: "YAML reads this secret as a number or boolean, which may change its text; put it in quotes".into(),
                }),
                Leaf::Text(text) | Leaf::Typed(text) => {
                    self.values.insert(key.clone(), text);
                }
                Leaf::List => self.errors.push(SettingError {
                    key: key.clone(),
                    message: "is a list; a single value is expected".into(),
                }),
            }
            return;
        }
        let in_section: Vec<&str> = known
            .iter()
            .filter(|k| section_of(k) == Some(section))
            .map(String::as_str)
            .collect();
        if section == MAIL_RELAY {
            let hint = keys::nearest(
                &path,
                in_section.iter().copied().chain(keys::subtree_names()),
            )
            .map(|k| format!("; did you mean {k}?"))
            .unwrap_or_default();
            self.errors.push(SettingError {
                key: path,
                message: format!(
                    "unknown key{hint} (mailRelay only takes the keys the relay knows)"
                ),
            });
        } else {
            let relative = |k: &str| k.get(section.len() + 1..).unwrap_or(k).to_owned();
            let hint = keys::nearest(
                &relative(&path),
                in_section
                    .iter()
                    .map(|k| k.get(section.len() + 1..).unwrap_or(k)),
            )
            .map(|k| format!("; did you mean {k}?"))
            .unwrap_or_default();
            self.warnings
                .push(format!("{path}: unknown key, ignored{hint}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_and_dotted_keys_are_the_same() {
        let raw = parse(
            "server.port: 9000\nfeatureSwitches:\n  sendEmail:\n    smtpServer: smtp.office365.com\n    smtp-port: 587\n",
        )
        .unwrap();
        assert_eq!(raw.values["server.port"], "9000");
        assert_eq!(
            raw.values["featureSwitches.sendEmail.smtpServer"],
            "smtp.office365.com"
        );
        assert_eq!(raw.values["featureSwitches.sendEmail.smtpPort"], "587");
    }

    #[test]
    fn other_sections_are_ignored() {
        let raw = parse("spring:\n  foo: 1\nfeatureSwitches:\n  showBanner: true\n").unwrap();
        assert!(raw.values.is_empty());
        assert!(raw.warnings.is_empty());
        assert!(raw.errors.is_empty());
    }

    #[test]
    fn unknown_server_key_is_a_warning_with_the_nearest_key() {
        let raw = parse("server:\n  prot: 80\n").unwrap();
        assert_eq!(
            raw.warnings,
            vec!["server.prot: unknown key, ignored; did you mean port?"]
        );
    }

    #[test]
    fn a_list_where_a_value_belongs_is_an_error() {
        let raw = parse("server:\n  port: [1, 2]\n").unwrap();
        assert_eq!(raw.errors[0].key, "server.port");
    }

    #[test]
    fn number_like_text_is_kept_as_written() {
        let raw = parse("featureSwitches:\n  sendEmail:\n    oAuthClientId: 0123\n    smtpPort: 1_000\n    smtpServer: yes\n").unwrap();
        assert_eq!(
            raw.values["featureSwitches.sendEmail.oAuthClientId"],
            "0123"
        );
        assert_eq!(raw.values["featureSwitches.sendEmail.smtpPort"], "1_000");
        assert_eq!(raw.values["featureSwitches.sendEmail.smtpServer"], "yes");
    }

    #[test]
    fn a_secret_read_as_a_number_must_be_quoted() {
        let raw = parse("featureSwitches:\n  sendEmail:\n    smtpPassword: 1.50\n").unwrap();
        assert_eq!(raw.errors[0].key, "featureSwitches.sendEmail.smtpPassword");
        assert!(raw.errors[0].message.contains("quotes"));
        assert!(!raw.errors[0].message.contains("1.5"));
        let raw = parse("featureSwitches:\n  sendEmail:\n    smtpPassword: \"1.50\"\n").unwrap();
        assert_eq!(raw.values["featureSwitches.sendEmail.smtpPassword"], "1.50");
    }

    #[test]
    fn a_top_level_list_is_an_error() {
        let raw = parse("- a\n- b\n").unwrap();
        assert_eq!(raw.errors[0].key, "(file)");
    }
}
