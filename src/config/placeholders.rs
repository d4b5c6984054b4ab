//! `${VAR}` and `${VAR:default}` in setting values, resolved from the environment snapshot.

/// Why a value's placeholders could not be resolved.
#[derive(Debug, PartialEq, Eq)]
pub enum PlaceholderError {
    /// `${VAR}` without default, and `VAR` is not set.
    Unset(String),
    /// `${` without its closing `}`.
    Unclosed,
    /// `${}` or `${:x}`.
    EmptyName,
}

impl std::fmt::Display for PlaceholderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unset(var) => write!(
                f,
                "placeholder ${{{var}}}: environment variable {var} is not set; set it or write ${{{var}:default}}"
            ),
            Self::Unclosed => f.write_str("a placeholder `${` has no closing `}`"),
            Self::EmptyName => f.write_str("a placeholder `${}` names no variable"),
        }
    }
}

/// Replace every placeholder in `value`. Text outside placeholders is kept as is; the
/// replacement is not scanned again, so a variable's value cannot inject placeholders.
pub fn resolve(value: &str, env: &[(String, String)]) -> Result<String, PlaceholderError> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or(PlaceholderError::Unclosed)?;
        let inner = &after[..end];
        let (name, default) = match inner.split_once(':') {
            Some((name, default)) => (name, Some(default)),
            None => (inner, None),
        };
        let name = name.trim();
        if name.is_empty() {
            return Err(PlaceholderError::EmptyName);
        }
        match (lookup(env, name), default) {
            (Some(found), _) => out.push_str(found),
            (None, Some(default)) => out.push_str(default),
            (None, None) => return Err(PlaceholderError::Unset(name.to_owned())),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn lookup<'a>(env: &'a [(String, String)], name: &str) -> Option<&'a str> {
    env.iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Vec<(String, String)> {
        vec![
            ("TENANT".into(), "contoso".into()),
            ("EMPTY".into(), String::new()),
        ]
    }

    #[test]
    fn resolves_set_variables_inside_text() {
        assert_eq!(
            resolve("https://x/${TENANT}/token", &env()).unwrap(),
            "https://x/contoso/token"
        );
    }

    #[test]
    fn default_applies_only_when_unset() {
        assert_eq!(resolve("${NOPE:587}", &env()).unwrap(), "587");
        assert_eq!(resolve("${TENANT:other}", &env()).unwrap(), "contoso");
        assert_eq!(resolve("${EMPTY:other}", &env()).unwrap(), "");
        assert_eq!(resolve("${NOPE:}", &env()).unwrap(), "");
    }

    #[test]
    fn default_may_contain_colons() {
        assert_eq!(
            resolve("${NOPE:https://a:8443/x}", &env()).unwrap(),
            "https://a:8443/x"
        );
    }

    #[test]
    fn unset_without_default_names_the_variable() {
        assert_eq!(
            resolve("${NOPE}", &env()),
            Err(PlaceholderError::Unset("NOPE".into()))
        );
    }

    #[test]
    fn malformed_placeholders_are_errors() {
        assert_eq!(resolve("${NOPE", &env()), Err(PlaceholderError::Unclosed));
        assert_eq!(resolve("${}", &env()), Err(PlaceholderError::EmptyName));
    }

    #[test]
    fn text_without_placeholders_is_unchanged() {
        assert_eq!(
            resolve("#TenantID# $HOME {x}", &env()).unwrap(),
            "#TenantID# $HOME {x}"
        );
    }
}
