//! The body of a MIME `sendMail`: the relay's own message, base64-encoded.
//!
//! Graph takes the recipients of a MIME message from its headers, not from an envelope. The
//! relay keeps Bcc recipients out of the headers (the SMTP envelope carries them), so here a
//! `Bcc:` header naming them is put in front; Exchange removes it before delivery, as it does for
//! any Bcc header. Every other byte is the message the SMTP path sends.

use std::io::Write as _;

use base64::engine::general_purpose::STANDARD;
use base64::write::EncoderStringWriter;

/// `message`, with a `Bcc:` header for the envelope recipients its To and Cc do not name, as
/// base64 (no line breaks: Graph reads either).
pub(super) fn request_body(message: &[u8], recipients: &[String]) -> String {
    let blind = blind_recipients(message, recipients);
    let mut out = String::with_capacity(message.len().div_ceil(3) * 4 + 256);
    let mut writer = EncoderStringWriter::from_consumer(&mut out, &STANDARD);
    if !blind.is_empty() {
        // One address a line: no line can grow past the 998 bytes RFC 5322 allows.
        let header = format!("Bcc: {}\r\n", blind.join(",\r\n "));
        let _ = writer.write_all(header.as_bytes());
    }
    // Writing to a String cannot fail.
    let _ = writer.write_all(message);
    writer.into_inner();
    out
}

/// The recipients that neither `To` nor `Cc` names (compared without case).
fn blind_recipients<'a>(message: &[u8], recipients: &'a [String]) -> Vec<&'a str> {
    let head_end = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(message.len());
    let head = String::from_utf8_lossy(&message[..head_end]).to_ascii_lowercase();
    let mut named = String::new();
    let mut current = false;
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if current {
                named.push_str(line);
            }
            continue;
        }
        current = line.starts_with("to:") || line.starts_with("cc:");
        if current {
            named.push(',');
            named.push_str(&line[3..]);
        }
    }
    recipients
        .iter()
        .filter(|r| !names(&named, &r.to_ascii_lowercase()))
        .map(String::as_str)
        .collect()
}

/// `list` (lower case) names `address` as `<address>` or as a bare list item.
fn names(list: &str, address: &str) -> bool {
    list.match_indices(address).any(|(at, _)| {
        let before = list[..at].chars().next_back();
        let after = list[at + address.len()..].chars().next();
        matches!(before, None | Some('<' | ',' | ' ' | '\t'))
            && matches!(after, None | Some('>' | ',' | ' ' | '\t'))
    })
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    use super::*;

    const MESSAGE: &[u8] = b"From: a@example.com\r\nTo: \"B, Person\" <b@example.com>,\r\n c@example.com\r\nCc: D@Example.com\r\nSubject: bcc@example.com\r\n\r\nTo: e@example.com\r\n";

    fn decoded(body: &str) -> String {
        String::from_utf8(STANDARD.decode(body).unwrap()).unwrap()
    }

    #[test]
    fn recipients_outside_to_and_cc_get_a_bcc_header_in_front_of_the_unchanged_message() {
        let recipients: Vec<String> = [
            "b@example.com",
            "c@example.com",
            "d@example.com",
            "bcc@example.com",
            "e@example.com",
        ]
        .map(String::from)
        .into();
        let body = decoded(&request_body(MESSAGE, &recipients));
        // The subject and the body name addresses, but only To and Cc count.
        assert_eq!(
            body,
            format!(
                "Bcc: bcc@example.com,\r\n e@example.com\r\n{}",
                String::from_utf8_lossy(MESSAGE)
            )
        );
    }

    #[test]
    fn without_blind_recipients_the_body_is_the_message_itself() {
        let recipients = vec!["b@example.com".to_owned()];
        assert_eq!(
            decoded(&request_body(MESSAGE, &recipients)).as_bytes(),
            MESSAGE
        );
        // A longer address that contains a named one is not named.
        assert!(!names(",<xb@example.com>", "b@example.com"));
        assert!(names(",<b@example.com>", "b@example.com"));
    }
}
