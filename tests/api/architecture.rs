//! The arrows ARCHITECTURE.md forbids, checked on the source: data flows one way (request ->
//! caller -> policy -> message -> delivery -> transport -> token), and no room reaches back up.
//! Test modules may import anything (they build the parts they test), so only the code before a
//! file's `#[cfg(test)]` counts; comment lines do not count either.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Everything a room that sits below the request path must not know.
const ABOVE: &[&str] = &["api", "app", "cli", "admin", "diagnose", "http"];

/// Each room and the rooms it must never import (besides its own).
fn forbidden(room: &str) -> Vec<&'static str> {
    let mut rooms: Vec<&'static str> = match room {
        // The API knows no transport and no credential: it asks `delivery` what a failure means.
        "api" => vec!["smtp", "graph", "token", "diagnose", "cli", "admin"],
        "http" => vec![
            "api",
            "caller",
            "delivery",
            "idempotency",
            "message",
            "rate_limit",
            "send_as",
            "smtp",
            "graph",
            "token",
        ],
        "caller" => vec![
            "delivery",
            "idempotency",
            "rate_limit",
            "send_as",
            "smtp",
            "graph",
            "token",
        ],
        // The policy keeps its state behind its own traits; the store implements them.
        "idempotency" | "rate_limit" | "send_as" => {
            vec!["delivery", "smtp", "graph", "token", "store"]
        }
        // The store knows the policy's traits and the settings, nothing that runs a mail.
        "store" => vec![
            "caller",
            "delivery",
            "message",
            "smtp",
            "graph",
            "token",
            "telemetry",
        ],
        "message" => vec![
            "caller",
            "delivery",
            "idempotency",
            "rate_limit",
            "send_as",
            "smtp",
            "graph",
            "token",
            "telemetry",
        ],
        "delivery" => vec!["caller", "idempotency", "rate_limit", "send_as"],
        // Transports sit below `delivery`: they never implement or name its trait themselves.
        "smtp" => vec![
            "caller",
            "delivery",
            "graph",
            "idempotency",
            "rate_limit",
            "send_as",
            "telemetry",
        ],
        "graph" => vec![
            "caller",
            "delivery",
            "idempotency",
            "rate_limit",
            "send_as",
            "smtp",
            "store",
            "telemetry",
        ],
        "token" => vec![
            "caller",
            "delivery",
            "idempotency",
            "message",
            "rate_limit",
            "send_as",
            "smtp",
            "graph",
            "telemetry",
        ],
        // The settings are read first and hand typed values down: the credential is parsed
        // here and given to `token`, never the other way round.
        "config" => vec![
            "caller",
            "delivery",
            "idempotency",
            "rate_limit",
            "send_as",
            "smtp",
            "graph",
            "token",
            "telemetry",
        ],
        "telemetry" => vec!["admin", "cli", "diagnose"],
        // Queued delivery sits above `delivery`, beside the API: its rows behind its own trait.
        "queue" => vec![
            "smtp", "graph", "token", "store", "api", "app", "cli", "diagnose", "http",
        ],
        // The catalogue of fixes, the clock and an error's text are leaves: everyone may use them.
        "remedy" | "clock" | "causes" => return every_room_but(room),
        _ => return Vec::new(),
    };
    if !matches!(room, "api" | "telemetry" | "queue") {
        rooms.extend_from_slice(ABOVE);
    }
    rooms.retain(|r| *r != room);
    rooms
}

fn every_room_but(room: &str) -> Vec<&'static str> {
    [
        "admin",
        "api",
        "app",
        "caller",
        "cli",
        "config",
        "delivery",
        "diagnose",
        "graph",
        "http",
        "idempotency",
        "message",
        "rate_limit",
        "send_as",
        "smtp",
        "store",
        "telemetry",
        "token",
    ]
    .into_iter()
    .filter(|r| *r != room)
    .collect()
}

fn source_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            source_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The rooms a file's production code names as `crate::<room>`.
fn imported_rooms(text: &str) -> BTreeSet<String> {
    let production = text.split("#[cfg(test)]").next().unwrap_or_default();
    let mut rooms = BTreeSet::new();
    for line in production.lines() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        for (at, _) in code.match_indices("crate::") {
            let rest = &code[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                rooms.insert(name);
            }
        }
    }
    rooms
}

#[test]
fn no_room_imports_what_the_architecture_forbids() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    source_files(&src, &mut files);
    assert!(files.len() > 20, "found only {} source files", files.len());
    let mut violations = Vec::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        let room = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        let text = std::fs::read_to_string(&file).unwrap();
        let forbidden = forbidden(&room);
        for imported in imported_rooms(&text) {
            if forbidden.contains(&imported.as_str()) {
                violations.push(format!("{} imports crate::{imported}", relative.display()));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "forbidden imports (see ARCHITECTURE.md):\n{}",
        violations.join("\n")
    );
}

/// About 600 lines of code outside its tests at most: a file past it holds more than one concern
/// (issue 14), and is split along a seam, not trimmed.
const MAX_PRODUCTION_LINES: usize = 600;

#[test]
fn no_source_file_is_over_the_size_bound() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    source_files(&src, &mut files);
    let mut over: Vec<String> = files
        .iter()
        .filter_map(|file| {
            let text = std::fs::read_to_string(file).unwrap();
            let production = text.split("#[cfg(test)]").next().unwrap_or_default();
            let lines = production.lines().count();
            (lines > MAX_PRODUCTION_LINES).then(|| {
                let relative = file.strip_prefix(&src).unwrap().display();
                format!("{relative}: {lines} lines before its tests")
            })
        })
        .collect();
    over.sort();
    assert!(
        over.is_empty(),
        "over {MAX_PRODUCTION_LINES} lines of code outside tests; split along a seam:\n{}",
        over.join("\n")
    );
}

#[test]
fn the_check_sees_an_import_and_ignores_tests_and_comments() {
    let text = "use crate::smtp::SmtpError;\n// crate::token in a comment\n#[cfg(test)]\nuse crate::api;\n";
    let rooms = imported_rooms(text);
    assert_eq!(
        rooms.into_iter().collect::<Vec<_>>(),
        vec!["smtp".to_string()]
    );
    assert!(forbidden("api").contains(&"smtp"));
    assert!(forbidden("smtp").contains(&"delivery"));
    assert!(forbidden("config").contains(&"token"));
}
