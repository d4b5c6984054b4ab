//! An error and its causes on one line: reqwest's and rustls's own text names only the outermost
//! layer ("error sending request for url …"), while the reason (refused, timed out, bad
//! certificate) sits in the sources.

/// `e`, then each of its sources, joined by `": "`.
pub fn line(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
