//! Loading: YAML -> environment overrides -> placeholders -> `{cipher}` -> validation.

use std::fmt;
use std::path::PathBuf;

use super::{HttpSettings, ServerSettings, Settings, mask, raw, resolve, validate};

/// What to load and which environment to resolve against.
#[derive(Clone)]
pub struct LoadOptions {
    pub path: PathBuf,
    /// A snapshot of the environment, so tests control it.
    pub env: Vec<(String, String)>,
}

/// Names the variables only: the environment holds secrets (`OAUTH_CLIENT_SECRET`,
/// `MAIL_RELAY_ENCRYPT_KEY`).
impl fmt::Debug for LoadOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadOptions")
            .field("path", &self.path)
            .field("env", &self.env.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .finish()
    }
}

impl LoadOptions {
    /// Load `path` against the process environment.
    pub fn from_process(path: PathBuf) -> Self {
        Self {
            path,
            env: std::env::vars().collect(),
        }
    }
}

/// Valid settings, plus the warnings to log at start-up and the masked effective settings.
#[derive(Debug)]
pub struct Loaded {
    pub settings: Settings,
    pub warnings: Vec<String>,
    /// The effective settings as YAML with every secret shown as `****`.
    pub masked: String,
}

/// One invalid setting: its full key and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingError {
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for SettingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Every problem found in the settings, reported at once.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub path: String,
    pub errors: Vec<SettingError>,
    /// Warnings found on the way (a typo warned about often explains a missing key).
    pub warnings: Vec<String>,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid settings in {}:", self.path)?;
        for error in &self.errors {
            write!(f, "\n  - {error}")?;
        }
        if !self.warnings.is_empty() {
            write!(f, "\nwarnings:")?;
            for warning in &self.warnings {
                write!(f, "\n  - {warning}")?;
            }
        }
        Ok(())
    }
}

/// Load and validate the settings in the file `options.path`.
pub fn load(options: &LoadOptions) -> Result<Loaded, ConfigError> {
    let (text, path) = read(options)?;
    load_str(&text, &path, &options.env)
}

/// Only where the service listens: `server.address`, `server.port` and
/// `mailRelay.http.basePath`, for the health check, which must not fail over a secret, a
/// certificate or any other setting it does not use.
pub fn listener(options: &LoadOptions) -> Result<(ServerSettings, HttpSettings), ConfigError> {
    let (text, path) = read(options)?;
    let fail = |errors| ConfigError {
        path: path.clone(),
        errors,
        warnings: Vec::new(),
    };
    let raw = raw::parse(text.as_str()).map_err(|message| {
        fail(vec![SettingError {
            key: "(file)".into(),
            message: format!("not valid YAML: {message}"),
        }])
    })?;
    let (mut errors, mut warnings) = (Vec::new(), Vec::new());
    let resolved = resolve::resolve(raw, &options.env, &mut errors, &mut warnings);
    let (listener, more) = validate::listener(&resolved);
    errors.extend(more);
    errors.retain(|e| e.key.starts_with("server.") || e.key.starts_with("mailRelay.http."));
    if errors.is_empty() {
        Ok(listener)
    } else {
        Err(fail(errors))
    }
}

fn read(options: &LoadOptions) -> Result<(String, String), ConfigError> {
    let path = options.path.display().to_string();
    match std::fs::read_to_string(&options.path) {
        Ok(text) => Ok((text, path)),
        Err(e) => Err(ConfigError {
            errors: vec![SettingError {
                key: "(file)".into(),
                message: format!(
                    "cannot read the settings file {path}: {e}; pass --config PATH or set MAIL_RELAY_CONFIG"
                ),
            }],
            path,
            warnings: Vec::new(),
        }),
    }
}

/// Load and validate settings given as YAML text; `source` names it in errors.
pub fn load_str(text: &str, source: &str, env: &[(String, String)]) -> Result<Loaded, ConfigError> {
    let fail = |errors, warnings| ConfigError {
        path: source.to_owned(),
        errors,
        warnings,
    };
    let raw = raw::parse(text).map_err(|message| {
        fail(
            vec![SettingError {
                key: "(file)".into(),
                message: format!("not valid YAML: {message}"),
            }],
            Vec::new(),
        )
    })?;
    let mut warnings = raw.warnings.clone();
    let mut errors = raw.errors.clone();
    let resolved = resolve::resolve(raw, env, &mut errors, &mut warnings);
    let (settings, more_warnings) = validate::validate(&resolved);
    warnings.extend(more_warnings);
    match settings {
        Ok(settings) if errors.is_empty() => {
            let masked = mask::render(&settings, &resolved);
            Ok(Loaded {
                settings,
                warnings,
                masked,
            })
        }
        Ok(_) => Err(fail(errors, warnings)),
        Err(more) => {
            errors.extend(more);
            Err(fail(errors, warnings))
        }
    }
}
