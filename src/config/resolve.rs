//! From the file's text to each setting's effective text: environment overrides, placeholders,
//! `File` secrets and `{cipher}` values, in that order.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde_json::Value;

use super::SettingError;
use super::cipher::{self, CipherError, EncryptionKey};
use super::keys::{self, FILE_SUFFIX, KEYS};
use super::raw::RawFile;
use super::{placeholders, read};

/// Where a setting's effective value came from (shown by `check-config`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File,
    Env(String),
    /// Read from the file named by the `File` form of the key.
    SecretFile(PathBuf),
}

/// A setting's effective text. Not `Debug`: it may be a secret.
#[derive(Clone)]
pub struct Effective {
    pub text: String,
    pub origin: Origin,
    /// Was written as `{cipher}...`: shown masked even when the key is not a secret.
    pub encrypted: bool,
}

/// Every set key's effective text. Absent keys take their defaults in validation.
#[derive(Default)]
pub struct Resolved {
    pub values: BTreeMap<String, Effective>,
    /// [`keys::SUBTREES`] as in the file, strings' placeholders resolved.
    pub subtrees: BTreeMap<&'static str, Value>,
    /// Keys whose value could not be had (already reported): validation says no more of them.
    pub failed: BTreeSet<String>,
    /// The `{cipher}` key, loaded when `mailRelay.delivery.encryptAtRest` is `true` (or why it
    /// could not be).
    pub at_rest_key: Option<Result<EncryptionKey, String>>,
    /// `AZURE_FEDERATED_TOKEN_FILE`, where Azure Workload Identity mounts the pod's token: the
    /// federated credential's file when no other credential is set.
    pub azure_federated_token_file: Option<String>,
    /// `IDENTITY_ENDPOINT` and `IDENTITY_HEADER`, which App Service, Functions and Container
    /// Apps set for the managed identity: the defaults of `oAuthManagedIdentity: appService`.
    pub identity_endpoint: Option<String>,
    pub identity_header: Option<secrecy::SecretString>,
}

impl Resolved {
    pub fn get(&self, key: &str) -> Option<&Effective> {
        self.values.get(key)
    }

    /// The same environment with other values: an identity's keys over the default's.
    pub(super) fn with_values(&self, values: BTreeMap<String, Effective>) -> Self {
        Self {
            values,
            subtrees: self.subtrees.clone(),
            failed: self.failed.clone(),
            at_rest_key: None,
            azure_federated_token_file: self.azure_federated_token_file.clone(),
            identity_endpoint: self.identity_endpoint.clone(),
            identity_header: self.identity_header.clone(),
        }
    }
}

/// Prefixes of environment variables that can only mean a relay setting: a typo there is
/// worth a warning. (`SERVER_*` is too common to judge.)
const OWN_ENV_PREFIXES: &[&str] = &["MAILRELAY_", "FEATURESWITCHES_SENDEMAIL_"];

/// A variable the hosting platform sets (not a relay setting), when it is set and not blank.
fn platform_variable(env: &[(String, String)], wanted: &str) -> Option<String> {
    env.iter()
        .find(|(name, value)| name == wanted && !value.trim().is_empty())
        .map(|(_, value)| value.trim().to_owned())
}

pub fn resolve(
    raw: RawFile,
    env: &[(String, String)],
    errors: &mut Vec<SettingError>,
    warnings: &mut Vec<String>,
) -> Resolved {
    let settable: Vec<String> = keys::settable().collect();
    let mut resolved = Resolved {
        failed: raw.failed,
        azure_federated_token_file: platform_variable(env, "AZURE_FEDERATED_TOKEN_FILE"),
        identity_endpoint: platform_variable(env, "IDENTITY_ENDPOINT"),
        identity_header: platform_variable(env, "IDENTITY_HEADER").map(Into::into),
        ..Resolved::default()
    };

    // 1. The environment beats the file, also for keys the file lacks.
    let mut candidates: BTreeMap<String, (String, Origin)> = raw
        .values
        .into_iter()
        .map(|(k, v)| (k, (v, Origin::File)))
        .collect();
    let mut subtree_env: BTreeMap<&'static str, (String, String)> = BTreeMap::new();
    // An empty variable counts as unset (Kubernetes sets optional secrets' variables empty).
    for (name, value) in env.iter().filter(|(_, v)| !v.trim().is_empty()) {
        if let Some(subtree) = keys::key_for_env(name, keys::subtree_names()) {
            subtree_env.insert(subtree, (name.clone(), value.clone()));
            continue;
        }
        match keys::key_for_env(name, settable.iter().map(String::as_str)) {
            Some(key) => {
                resolved.failed.remove(key);
                candidates.insert(key.to_owned(), (value.clone(), Origin::Env(name.clone())));
            }
            None if OWN_ENV_PREFIXES.iter().any(|p| name.starts_with(p)) => {
                let names: Vec<String> = settable
                    .iter()
                    .map(String::as_str)
                    .chain(keys::subtree_names())
                    .map(keys::env_name)
                    .collect();
                let hint = keys::nearest(name, names.iter().map(String::as_str))
                    .map(|n| format!("; did you mean {n}?"))
                    .unwrap_or_default();
                warnings.push(format!(
                    "environment variable {name} matches no setting, ignored{hint}"
                ));
            }
            None => {}
        }
    }

    // 2. Placeholders; an empty result counts as unset, so `${VAR:}` makes a key optional.
    for (key, (text, origin)) in candidates {
        match placeholders::resolve(&text, env) {
            Ok(text) if text.trim().is_empty() => {}
            Ok(text) => {
                resolved.values.insert(
                    key,
                    Effective {
                        text,
                        origin,
                        encrypted: false,
                    },
                );
            }
            Err(e) => {
                resolved.failed.insert(key.clone());
                errors.push(SettingError {
                    message: match &origin {
                        Origin::Env(var) => format!("{e} (in environment variable {var})"),
                        _ => e.to_string(),
                    },
                    key,
                });
            }
        }
    }
    let mut subtrees = raw.subtrees;
    for (subtree, (var, value)) in subtree_env {
        match env_tree(&value) {
            Ok(tree) => {
                subtrees.insert(subtree, tree);
            }
            Err(message) => {
                resolved.failed.insert(subtree.to_owned());
                errors.push(SettingError {
                    key: subtree.to_owned(),
                    message: format!("environment variable {var}: {message}"),
                });
            }
        }
    }
    for (name, tree) in subtrees {
        let mut unresolved = BTreeSet::new();
        let tree = resolve_tree(name, tree, env, errors, &mut unresolved);
        // The entries holding an unresolved value count as failed too, up to the list itself,
        // so validation adds no "is required" for the gap it leaves.
        for key in unresolved {
            let mut path = key.as_str();
            resolved.failed.insert(path.to_owned());
            while path.len() > name.len()
                && let Some(cut) = path.rfind(['.', '['])
            {
                path = &path[..cut];
                resolved.failed.insert(path.to_owned());
            }
        }
        resolved.subtrees.insert(name, tree);
    }

    // 3. `<key>File`: the value is the content of the named file (a Kubernetes secret mount).
    for spec in KEYS.iter().filter(|k| k.from_file) {
        let file_key = format!("{}{FILE_SUFFIX}", spec.key);
        let Some(file) = resolved.values.remove(&file_key) else {
            continue;
        };
        if resolved.values.contains_key(spec.key) {
            resolved.failed.insert(spec.key.to_owned());
            errors.push(SettingError {
                key: spec.key.to_owned(),
                message: format!(
                    "both {key} and {file_key} are set; set only one (the value, or the file holding it)",
                    key = spec.key
                ),
            });
            continue;
        }
        let path = PathBuf::from(file.text.trim());
        match std::fs::read_to_string(&path) {
            Ok(content) => {
                let text = content.trim_end_matches(['\n', '\r']).to_owned();
                if text.trim().is_empty() {
                    resolved.failed.insert(spec.key.to_owned());
                    errors.push(SettingError {
                        message: format!(
                            "the file {} is empty; put the value in it, or unset {file_key} and give {} directly",
                            path.display(),
                            spec.key
                        ),
                        key: file_key,
                    });
                } else {
                    resolved.values.insert(
                        spec.key.to_owned(),
                        Effective {
                            text,
                            origin: Origin::SecretFile(path),
                            encrypted: false,
                        },
                    );
                }
            }
            Err(e) => {
                resolved.failed.insert(spec.key.to_owned());
                errors.push(SettingError {
                    key: file_key,
                    message: format!(
                        "cannot read {}: {e}; mount the secret there or fix the path",
                        path.display()
                    ),
                });
            }
        }
    }

    // 4. `{cipher}` values, under a key loaded only when one is present.
    let mut key: Option<Result<EncryptionKey, CipherError>> = None;
    for (name, value) in resolved.values.iter_mut() {
        if !cipher::is_encrypted(&value.text) {
            continue;
        }
        let key = key.get_or_insert_with(|| EncryptionKey::from_env(env));
        let outcome = match key {
            Ok(key) => cipher::decrypt(key, &value.text).map_err(|e| e.to_string()),
            Err(e) => Err(format!("is a {{cipher}} value, but {e}")),
        };
        match outcome {
            Ok(plain) => {
                use secrecy::ExposeSecret;
                value.text = plain.expose_secret().to_owned();
                value.encrypted = true;
            }
            Err(message) => {
                resolved.failed.insert(name.clone());
                errors.push(SettingError {
                    key: name.clone(),
                    message,
                });
            }
        }
    }
    // 5. The same key for the queued mails, when they are to be encrypted at rest.
    let at_rest = resolved
        .values
        .get(keys::ENCRYPT_AT_REST)
        .is_some_and(|v| read::find(read::FLAG, v.text.trim()) == Some(true));
    if at_rest {
        let key = key.get_or_insert_with(|| EncryptionKey::from_env(env));
        resolved.at_rest_key = Some(key.as_ref().map(Clone::clone).map_err(ToString::to_string));
    }
    // An undecryptable value must not reach validation, whose messages may quote values.
    let failed = &resolved.failed;
    resolved.values.retain(|k, _| !failed.contains(k));
    resolved
}

/// A list or map from one environment variable: YAML flow text, or a comma-separated list.
fn env_tree(value: &str) -> Result<Value, String> {
    let trimmed = value.trim();
    if trimmed.starts_with('[') || trimmed.starts_with('{') {
        serde_saphyr::from_str(trimmed)
            .map_err(|e| format!("not valid YAML flow text ([...] or {{...}}): {e}"))
    } else {
        Ok(Value::Array(
            trimmed
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_owned()))
                .collect(),
        ))
    }
}

/// Placeholders inside a list or map; a value that cannot be resolved is reported, left out and
/// added to `unresolved`.
fn resolve_tree(
    key: &str,
    tree: Value,
    env: &[(String, String)],
    errors: &mut Vec<SettingError>,
    unresolved: &mut BTreeSet<String>,
) -> Value {
    match tree {
        Value::String(s) => match placeholders::resolve(&s, env) {
            Ok(s) => Value::String(s),
            Err(e) => {
                errors.push(SettingError {
                    key: key.to_owned(),
                    message: e.to_string(),
                });
                unresolved.insert(key.to_owned());
                Value::Null
            }
        },
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| resolve_tree(&format!("{key}[{i}]"), v, env, errors, unresolved))
                .collect(),
        ),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let child = resolve_tree(&format!("{key}.{k}"), v, env, errors, unresolved);
                    (k, child)
                })
                .collect(),
        ),
        other => other,
    }
}
