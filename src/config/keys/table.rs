//! The README's key tables, printed from the declarations: `mail-relay keys [SECTION ...]`.

use super::{Allowed, KEYS, KeySpec, Preset, SUBTREES};

/// A Markdown table of the keys under any of `sections` (every key when there are none),
/// grouped by the section that holds them, in the order they are declared.
pub fn markdown(sections: &[&str]) -> String {
    let chosen: Vec<&KeySpec> = KEYS
        .iter()
        .chain(SUBTREES)
        .filter(|spec| {
            sections.is_empty()
                || sections
                    .iter()
                    .any(|s| spec.key.starts_with(&format!("{s}.")) || spec.key == *s)
        })
        .collect();
    let parent = |spec: &KeySpec| spec.key.rsplit_once('.').map_or("", |(p, _)| p);
    let mut parents: Vec<&str> = Vec::new();
    for spec in &chosen {
        if !parents.contains(&parent(spec)) {
            parents.push(parent(spec));
        }
    }
    let mut out = String::from("| Key | Default | Allowed / meaning |\n|---|---|---|\n");
    for section in parents {
        for spec in chosen.iter().filter(|s| parent(s) == section) {
            out.push_str(&row(spec));
        }
    }
    out
}

fn row(spec: &KeySpec) -> String {
    let mut key = format!("`{}`", spec.key);
    if spec.from_file {
        let name = spec.key.rsplit('.').next().unwrap_or(spec.key);
        key.push_str(&format!(" (`{name}File`)"));
    }
    let default = match spec.preset {
        Preset::Unset => "–".to_owned(),
        Preset::Is(value) => format!("`{value}`"),
        Preset::Said(text) => text.to_owned(),
    };
    let allowed = match spec.allowed {
        Allowed::Text | Allowed::Tree => String::new(),
        Allowed::Whole { min, max } => format!("{min}..{max}"),
        Allowed::Choice(listing) => listing(),
        Allowed::Flag => "`true` or `false`".to_owned(),
    };
    let mut meaning = [allowed.as_str(), spec.help]
        .into_iter()
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join(": ");
    if spec.secret {
        meaning.push_str(if meaning.is_empty() {
            "secret"
        } else {
            "; secret"
        });
    }
    format!("| {key} | {default} | {meaning} |\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const README: &str = include_str!("../../../README.md");
    const MARK: &str = "<!-- keys";

    /// Each `<!-- keys [SECTION ...] -->` mark in the README, with the table right after it.
    fn readme_tables() -> Vec<(Vec<&'static str>, String)> {
        let lines: Vec<&str> = README.lines().collect();
        lines
            .iter()
            .enumerate()
            .filter_map(|(i, line)| {
                let sections = line.strip_prefix(MARK)?.strip_suffix("-->")?;
                let table: String = lines[i + 1..]
                    .iter()
                    .take_while(|l| l.starts_with('|'))
                    .map(|l| format!("{l}\n"))
                    .collect();
                Some((sections.split_whitespace().collect(), table))
            })
            .collect()
    }

    #[test]
    fn the_readme_key_tables_are_the_declarations() {
        let tables = readme_tables();
        assert!(
            tables.iter().any(|(sections, _)| sections.is_empty()),
            "the README has no full keys table (`{MARK} -->`)"
        );
        assert!(tables.len() > 5, "found only {} key tables", tables.len());
        for (sections, table) in tables {
            let expected = markdown(&sections);
            assert!(
                expected.lines().count() > 2,
                "{sections:?} holds no declared key"
            );
            assert_eq!(
                table,
                expected,
                "the README's table after `{MARK} {}-->` is not what `mail-relay keys {}` prints",
                sections.join(" "),
                sections.join(" ")
            );
        }
    }

    #[test]
    fn every_key_has_one_row_and_secrets_say_so() {
        let all = markdown(&[]);
        for spec in KEYS.iter().chain(SUBTREES) {
            let rows: Vec<&str> = all
                .lines()
                .filter(|l| l.starts_with(&format!("| `{}`", spec.key)))
                .collect();
            assert_eq!(rows.len(), 1, "{}", spec.key);
            assert_eq!(rows[0].ends_with("secret |"), spec.secret, "{}", spec.key);
        }
    }

    #[test]
    fn every_single_default_is_allowed_by_its_own_declaration() {
        for spec in KEYS {
            let Some(value) = spec.preset_text() else {
                continue;
            };
            match spec.allowed {
                Allowed::Whole { min, max } => {
                    let n: u64 = value.parse().unwrap_or_else(|_| panic!("{}", spec.key));
                    assert!((min..=max).contains(&n), "{}: {n}", spec.key);
                }
                Allowed::Choice(listing) => {
                    assert!(listing().contains(value), "{}: {value}", spec.key);
                }
                Allowed::Flag => assert!(["true", "false"].contains(&value), "{}", spec.key),
                Allowed::Text | Allowed::Tree => assert!(!value.is_empty(), "{}", spec.key),
            }
        }
    }
}
