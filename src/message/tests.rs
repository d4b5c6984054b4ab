//! Properties of the whole path, request -> validated mail -> built message: what validation
//! accepts, the builder builds, and every header line of the result fits RFC 5322.

use mail_parser::MessageParser;
use proptest::prelude::*;
use serde_json::{Value, json};

use super::{MailError, MailRequest, MessageLimits, OutgoingMail};

const LIMITS: MessageLimits = MessageLimits {
    max_recipients: 500,
    max_message_bytes: 1 << 22,
};

/// The built message, or the names of the invalid fields; any other failure is a bug.
fn outcome(body: &Value) -> Result<OutgoingMail, Vec<String>> {
    let request: MailRequest = serde_json::from_value(body.clone()).expect("a well-formed request");
    match request.validate(&LIMITS) {
        Err(MailError::Invalid(errors)) => Err(errors.into_iter().map(|e| e.field).collect()),
        Err(other) => panic!("{body}: {other}"),
        Ok(mail) => Ok(mail
            .build(&LIMITS)
            .unwrap_or_else(|e| panic!("{body} validated but did not build: {e}"))),
    }
}

fn head(formatted: &[u8]) -> &[u8] {
    let end = formatted
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header section");
    &formatted[..end]
}

/// The longest header line, CRLF not counted.
fn longest_header_line(formatted: &[u8]) -> usize {
    head(formatted)
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line).len())
        .max()
        .unwrap_or_default()
}

#[test]
fn quoted_local_parts_that_need_quotes_are_400_naming_the_field() {
    for (body, field) in [
        (
            json!({"from": "\"a b\"@example.test", "to": "x@example.com", "text": "t"}),
            "from",
        ),
        (
            json!({"from": {"name": "X", "address": "\"x>y\"@example.test"}, "to": "x@example.com", "text": "t"}),
            "from.address",
        ),
        (
            json!({"from": "a@example.com", "to": ["x@example.com", "y@example.com", "\"x y\"@example.com"], "text": "t"}),
            "to[2]",
        ),
        (
            json!({"from": "a@example.com", "to": "x@example.com", "replyTo": "\"(c)\"@example.com", "text": "t"}),
            "replyTo[0]",
        ),
    ] {
        assert_eq!(outcome(&body).err(), Some(vec![field.to_owned()]), "{body}");
    }
    // Quotes that are not needed are dropped: the same mailbox, sent and written unquoted.
    let mail = outcome(
        &json!({"from": "\"alice\"@example.test", "to": "\"bob.b\"@example.com", "text": "t"}),
    )
    .unwrap();
    assert_eq!(
        mail.envelope.from().unwrap().to_string(),
        "alice@example.test"
    );
    let head = String::from_utf8_lossy(head(&mail.formatted)).into_owned();
    assert!(head.contains("From: alice@example.test"), "{head}");
    assert!(head.contains("To: bob.b@example.com"), "{head}");
}

#[test]
fn a_2048_character_word_in_the_subject_and_an_x_header_is_encoded_within_998_octets() {
    let word: String = ('!'..='~')
        .filter(|c| *c != '=')
        .cycle()
        .take(2048)
        .collect();
    let mail = outcome(&json!({
        "from": "a@example.com", "to": "b@example.com", "subject": word, "text": "t",
        "headers": {"X-Long": word},
    }))
    .unwrap();
    assert!(longest_header_line(&mail.formatted) <= 998);
    let parsed = MessageParser::default().parse(&mail.formatted).unwrap();
    assert_eq!(parsed.subject(), Some(word.as_str()));
    // mail-parser decodes only the headers it knows: the X- header is read as a Subject.
    let raw = parsed.header_raw("X-Long").unwrap().trim();
    let only_subject = format!("Subject: {raw}\r\n\r\n");
    let as_subject = MessageParser::default()
        .parse(only_subject.as_bytes())
        .unwrap();
    assert_eq!(as_subject.subject(), Some(word.as_str()));
}

#[test]
fn a_long_recipient_list_is_folded_one_mailbox_a_line() {
    let to: Vec<Value> = (0..200)
        .map(|i| json!({"name": format!("Recipient {i}"), "address": format!("recipient.{i}@example.com")}))
        .collect();
    let cc: Vec<String> = (0..200).map(|i| format!("copy.{i}@example.com")).collect();
    let mail = outcome(&json!({"from": "a@example.com", "to": to, "cc": cc, "text": "t"})).unwrap();
    assert!(longest_header_line(&mail.formatted) <= 998);
    let parsed = MessageParser::default().parse(&mail.formatted).unwrap();
    let addresses = |list: Option<&mail_parser::Address>| -> Vec<String> {
        list.unwrap()
            .iter()
            .map(|a| a.address().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        addresses(parsed.to()),
        (0..200)
            .map(|i| format!("recipient.{i}@example.com"))
            .collect::<Vec<_>>()
    );
    assert_eq!(addresses(parsed.cc()), cc);
    assert_eq!(
        parsed.to().unwrap().first().unwrap().name(),
        Some("Recipient 0")
    );
}

#[test]
fn a_lone_cr_or_lf_reaches_data_as_crlf() {
    let mail = outcome(&json!({
        "from": "a@example.com", "to": "b@example.com",
        "text": "line\r.\rQUIT\nnext\r\nlast\r",
        "html": "<p>a\r.\r</p>",
    }))
    .unwrap();
    let bytes = &mail.formatted;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\r' {
            assert_eq!(bytes.get(i + 1), Some(&b'\n'), "lone CR at {i}");
        }
        if b == b'\n' {
            assert_eq!(bytes.get(i.wrapping_sub(1)), Some(&b'\r'), "lone LF at {i}");
        }
    }
    let parsed = MessageParser::default().parse(bytes).unwrap();
    assert_eq!(
        parsed.body_text(0).as_deref(),
        Some("line\r\n.\r\nQUIT\r\nnext\r\nlast\r\n")
    );
}

/// Local parts as callers write them: dot-atoms, quoted strings with anything printable
/// (quotes, backslashes, `>`), and comments.
fn local_part() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9!#$%&'*+/=?^_`{|}~-]{1,8}(\\.[a-zA-Z0-9!#$%&'*+/=?^_`{|}~-]{1,8}){0,2}",
        "\"[ -~]{0,16}\"",
        "\"[a-z.]{1,12}\"",
        "[a-z]{1,6}\\([ -~]{0,8}\\)[a-z]{0,4}",
        "\\([a-z ]{0,8}\\)[a-z.]{1,6}",
    ]
}

/// Domains: ASCII, international (sent as punycode), with comments, upper case.
fn domain() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9]{1,8}(\\.[a-z0-9-]{1,8}){0,2}\\.[a-z]{2,4}",
        "[A-Z0-9]{1,6}\\.[A-Za-z]{2,4}",
        "(bücher|münchen|пример|例え|straße|ÄÖÜ|xn--bcher-kva|ελληνικά)\\.(example|de|рф|中国)",
        "[a-z]{1,5}\\([a-z]{0,5}\\)\\.example",
        "\\([a-z]{0,5}\\)[a-z]{1,5}\\.example",
        "[a-z]{1,8}",
    ]
}

fn address() -> impl Strategy<Value = String> {
    (local_part(), domain()).prop_map(|(l, d)| format!("{l}@{d}"))
}

/// Header text: long words, escapes, encoded-word look-alikes, any Unicode.
fn header_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[!-~]{0,2048}",
        "[ -~]{0,2048}",
        "([!-~]{0,300} ){0,6}",
        "\\PC{0,200}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    // Whatever the relay's address parser accepts, the builder puts on the envelope and in the
    // headers, unchanged; whatever it refuses is a field error naming the field.
    #[test]
    fn every_address_the_parser_accepts_is_built(from in address(), to in address(), reply_to in address()) {
        let body = json!({"from": from, "to": [to], "replyTo": reply_to, "text": "t"});
        let parsed = |a: &str| super::EmailAddress::parse(a).ok().map(|a| a.as_str().to_owned());
        match outcome(&body) {
            Ok(mail) => {
                let (from, to, reply_to) = (parsed(&from).unwrap(), parsed(&to).unwrap(), parsed(&reply_to).unwrap());
                prop_assert_eq!(mail.envelope.from().map(ToString::to_string), Some(from.clone()));
                let envelope_to: Vec<String> = mail.envelope.to().iter().map(ToString::to_string).collect();
                prop_assert_eq!(envelope_to, vec![to.clone()]);
                let message = MessageParser::default().parse(&mail.formatted).unwrap();
                let first = |list: Option<&mail_parser::Address>| {
                    list.and_then(|l| l.first()).and_then(|a| a.address()).map(str::to_owned)
                };
                prop_assert_eq!(first(message.from()), Some(from));
                prop_assert_eq!(first(message.to()), Some(to));
                prop_assert_eq!(first(message.reply_to()), Some(reply_to));
            }
            Err(fields) => {
                let mut expected = Vec::new();
                for (field, address) in [("from", &from), ("to[0]", &to), ("replyTo[0]", &reply_to)] {
                    if parsed(address).is_none() {
                        expected.push(field.to_owned());
                    }
                }
                prop_assert_eq!(fields, expected);
            }
        }
    }

    // No header line of a built message is longer than 998 octets, whatever the text.
    #[test]
    fn no_header_line_exceeds_998_octets(
        subject in header_text(),
        x_value in header_text(),
        keywords in header_text(),
        name in "([!-~]{1,256} ){0,8}|\\PC{1,200}",
        recipients in 1usize..80,
        filename in "[!-~]{1,255}|\\PC{1,255}",
    ) {
        let to: Vec<Value> = (0..recipients)
            .map(|i| json!({"name": name, "address": format!("r{i}@example.com")}))
            .collect();
        let body = json!({
            "from": {"name": name, "address": "a@example.com"}, "to": to, "subject": subject,
            "text": "t", "headers": {"X-Value": x_value, "Keywords": keywords},
            "attachments": [{"filename": filename, "contentType": format!("application/x-{}", "a".repeat(241)), "content": ""}],
        });
        if let Ok(mail) = outcome(&body) {
            prop_assert!(longest_header_line(&mail.formatted) <= 998, "{}", String::from_utf8_lossy(head(&mail.formatted)));
        }
    }
}
