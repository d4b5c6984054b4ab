//! E-mail addresses and mailboxes, parsed strictly at the edge.

use std::fmt;

/// Longest local part (RFC 5321 section 4.5.3.1.1).
const MAX_LOCAL: usize = 64;
/// Longest domain (RFC 5321 section 4.5.3.1.2).
const MAX_DOMAIN: usize = 255;
/// Longest label of a domain (RFC 1035).
const MAX_LABEL: usize = 63;
/// Longest path: a reverse or forward path is at most 256 octets with its angle brackets.
const MAX_ADDRESS: usize = 254;

/// A valid addr-spec (RFC 5321 mailbox syntax) that the relay can send: a dot-atom local part,
/// `@`, and a domain name in ASCII. An IDN domain is stored in its punycode form (`xn--...`), so
/// the address can go into an SMTP envelope without SMTPUTF8. A quoted local part is accepted
/// only when its quotes are not needed (`"alice"` is `alice`) and is stored without them: one
/// that needs them (`"a b"`, `"x>y"`) cannot be written into a From header by lettre, and
/// Exchange Online mailboxes never have one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EmailAddress {
    text: String,
    at: usize,
}

/// Why a string is not an e-mail address. The messages are shown to API callers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("not an e-mail address: it has no '@' between a local part and a domain")]
    MissingAt,
    #[error("not an e-mail address: it contains a line break (CR or LF)")]
    LineBreak,
    #[error("not an e-mail address: it contains white space or a control character")]
    Whitespace,
    #[error("not an e-mail address: the local part (before '@') is empty")]
    EmptyLocal,
    #[error("not an e-mail address: the local part is longer than 64 characters")]
    LocalTooLong,
    #[error(
        "not an e-mail address: the local part must be letters, digits and !#$%&'*+-/=?^_`{{|}}~ \
         separated by single dots, or a quoted string"
    )]
    InvalidLocal,
    #[error(
        "not an e-mail address: non-ASCII characters in the local part (SMTPUTF8) are not supported"
    )]
    NonAsciiLocal,
    #[error(
        "not an address the relay can send: a quoted local part is accepted only when the quotes \
         are not needed (\"alice\"@example.com is alice@example.com); spaces and characters such \
         as \" \\ ( ) < > , ; : @ [ ] in the local part are not supported"
    )]
    QuotedLocal,
    #[error("not an e-mail address: the domain (after '@') is empty")]
    EmptyDomain,
    #[error("not an e-mail address: the domain is longer than 255 characters")]
    DomainTooLong,
    #[error(
        "not an e-mail address: the domain must be labels of letters, digits and '-' separated \
         by dots (each label at most 63 characters, not starting or ending with '-')"
    )]
    InvalidDomain,
    #[error("not an e-mail address: address literals such as [192.0.2.1] are not accepted")]
    AddressLiteral,
    #[error("not an e-mail address: it is longer than 254 characters")]
    TooLong,
}

impl EmailAddress {
    /// Parse a bare address (`alice@example.com`, no display name, no angle brackets).
    pub fn parse(input: &str) -> Result<Self, AddressError> {
        if input.contains(['\r', '\n']) {
            return Err(AddressError::LineBreak);
        }
        let (local, domain) = input.rsplit_once('@').ok_or(AddressError::MissingAt)?;
        let local = check_local(local)?;
        let domain = normalize_domain(domain)?;
        let text = format!("{local}@{domain}");
        if text.len() > MAX_ADDRESS {
            return Err(AddressError::TooLong);
        }
        // lettre reads the From header back before it builds a message: an address it
        // would not read back is a 500 at build time, so it is refused here, naming the field.
        match lettre::Address::new(local, &domain) {
            Ok(_) => {}
            Err(lettre::address::AddressError::InvalidDomain) => {
                return Err(AddressError::InvalidDomain);
            }
            Err(_) => return Err(AddressError::InvalidLocal),
        }
        Ok(Self {
            at: local.len(),
            text,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The local part (a dot-atom: quotes that were not needed are gone).
    pub fn local_part(&self) -> &str {
        &self.text[..self.at]
    }

    /// The domain, in ASCII (punycode for IDN domains).
    pub fn domain(&self) -> &str {
        &self.text[self.at + 1..]
    }

    /// The same address as lettre's type.
    pub fn to_lettre(&self) -> lettre::Address {
        // `parse` checked this very pair with `lettre::Address::new`.
        lettre::Address::new_dangerous(self.local_part(), self.domain())
    }
}

impl fmt::Display for EmailAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl AsRef<str> for EmailAddress {
    fn as_ref(&self) -> &str {
        &self.text
    }
}

impl std::str::FromStr for EmailAddress {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// RFC 5322 `atext`.
fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c)
}

/// A dot-atom: atoms of `atext` separated by single dots.
fn is_dot_atom(text: &str) -> bool {
    text.split('.')
        .all(|atom| !atom.is_empty() && atom.chars().all(is_atext))
}

/// The local part as the relay sends it: a dot-atom, the quotes of `"alice"` removed.
fn check_local(local: &str) -> Result<&str, AddressError> {
    if local.is_empty() {
        return Err(AddressError::EmptyLocal);
    }
    if local.len() > MAX_LOCAL {
        return Err(AddressError::LocalTooLong);
    }
    if !local.is_ascii() {
        return Err(AddressError::NonAsciiLocal);
    }
    if let Some(quoted) = local.strip_prefix('"') {
        check_quoted(quoted)?;
        // RFC 5321 section 4.1.2: the quoted and unquoted forms of a dot-atom are the same
        // mailbox, and a sender should not quote what needs no quotes.
        let inner = &quoted[..quoted.len() - 1];
        return if is_dot_atom(inner) {
            Ok(inner)
        } else {
            Err(AddressError::QuotedLocal)
        };
    }
    if local
        .chars()
        .any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
    {
        return Err(AddressError::Whitespace);
    }
    if is_dot_atom(local) {
        Ok(local)
    } else {
        Err(AddressError::InvalidLocal)
    }
}

/// The rest of a quoted local part after its opening quote: `qtextSMTP` or `\` + a printable
/// character, then the closing quote, and nothing after it.
fn check_quoted(rest: &str) -> Result<(), AddressError> {
    // `""@example.com` is grammatical but names no one, and lettre refuses it.
    if rest == "\"" {
        return Err(AddressError::InvalidLocal);
    }
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                return if chars.as_str().is_empty() {
                    Ok(())
                } else {
                    Err(AddressError::InvalidLocal)
                };
            }
            '\\' => match chars.next() {
                Some(' '..='~') => {}
                _ => return Err(AddressError::InvalidLocal),
            },
            ' '..='~' => {}
            _ => return Err(AddressError::Whitespace),
        }
    }
    // No closing quote.
    Err(AddressError::InvalidLocal)
}

/// A domain as the relay compares and sends it: lower-case ASCII, an IDN in punycode. Settings
/// (`allowedFrom`, delegates) and callers' addresses go through it as From addresses do, so
/// `bücher.de` and `xn--bcher-kva.de` are the same domain everywhere.
pub fn normalize_domain(domain: &str) -> Result<String, AddressError> {
    if domain.is_empty() {
        return Err(AddressError::EmptyDomain);
    }
    if domain.starts_with('[') {
        return Err(AddressError::AddressLiteral);
    }
    if domain.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(AddressError::Whitespace);
    }
    let ascii = if domain.is_ascii() {
        domain.to_ascii_lowercase()
    } else {
        idna::domain_to_ascii_strict(domain).map_err(|_| AddressError::InvalidDomain)?
    };
    if ascii.len() > MAX_DOMAIN {
        return Err(AddressError::DomainTooLong);
    }
    let labels_ok = ascii.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= MAX_LABEL
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    });
    // An all-numeric last label is an IP address in disguise, never a top-level domain.
    let tld_ok = ascii
        .rsplit('.')
        .next()
        .is_some_and(|tld| !tld.chars().all(|c| c.is_ascii_digit()));
    if labels_ok && tld_ok {
        Ok(ascii)
    } else {
        Err(AddressError::InvalidDomain)
    }
}

/// An address with an optional display name (`"Alice Example" <alice@example.com>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    pub name: Option<super::HeaderText>,
    pub address: EmailAddress,
}

impl Mailbox {
    pub fn new(name: Option<super::HeaderText>, address: EmailAddress) -> Self {
        Self { name, address }
    }

    /// The same mailbox as lettre's type; lettre encodes a non-ASCII name per RFC 2047.
    pub fn to_lettre(&self) -> lettre::message::Mailbox {
        lettre::message::Mailbox::new(
            self.name.as_ref().map(|n| n.as_str().to_owned()),
            self.address.to_lettre(),
        )
    }
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{:?} <{}>", name.as_str(), self.address),
            None => write!(f, "{}", self.address),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn accepts_common_forms() {
        for ok in [
            "alice@example.com",
            "a.b+tag@sub.example.co.uk",
            "x@localhost",
            "o'brien@example.ie",
        ] {
            assert!(EmailAddress::parse(ok).is_ok(), "{ok} should parse");
        }
    }

    #[test]
    fn quotes_that_are_not_needed_are_dropped() {
        let a = EmailAddress::parse("\"john.doe\"@Example.com").unwrap();
        assert_eq!(a.as_str(), "john.doe@example.com");
        assert_eq!(a.local_part(), "john.doe");
        assert_eq!(a, EmailAddress::parse("john.doe@example.com").unwrap());
    }

    #[test]
    fn idn_domain_becomes_punycode() {
        let a = EmailAddress::parse("jörg@bücher.example").unwrap_err();
        assert_eq!(a, AddressError::NonAsciiLocal);
        let a = EmailAddress::parse("joerg@Bücher.example").unwrap();
        assert_eq!(a.domain(), "xn--bcher-kva.example");
        assert_eq!(a.as_str(), "joerg@xn--bcher-kva.example");
    }

    #[test]
    fn rejects_with_a_reason() {
        let cases = [
            ("alice", AddressError::MissingAt),
            ("@example.com", AddressError::EmptyLocal),
            ("alice@", AddressError::EmptyDomain),
            ("al ice@example.com", AddressError::Whitespace),
            ("alice@example.com\r\nBcc: x@y.z", AddressError::LineBreak),
            (".alice@example.com", AddressError::InvalidLocal),
            ("al..ice@example.com", AddressError::InvalidLocal),
            ("al(ice@example.com", AddressError::InvalidLocal),
            ("alice@-example.com", AddressError::InvalidDomain),
            ("alice@example..com", AddressError::InvalidDomain),
            ("alice@exa_mple.com", AddressError::InvalidDomain),
            ("alice@1.2.3.4", AddressError::InvalidDomain),
            ("alice@[192.0.2.1]", AddressError::AddressLiteral),
            ("\"unterminated@example.com", AddressError::InvalidLocal),
            ("\"john doe\"@example.com", AddressError::QuotedLocal),
            ("\"a\\\"b\"@example.com", AddressError::QuotedLocal),
            ("\"x>y\"@example.com", AddressError::QuotedLocal),
            ("\"a..b\"@example.com", AddressError::QuotedLocal),
            ("Alice <alice@example.com>", AddressError::Whitespace),
        ];
        for (input, expected) in cases {
            assert_eq!(EmailAddress::parse(input), Err(expected), "{input:?}");
        }
    }

    #[test]
    fn length_limits() {
        let local = "a".repeat(64);
        assert!(EmailAddress::parse(&format!("{local}@example.com")).is_ok());
        let local = "a".repeat(65);
        assert_eq!(
            EmailAddress::parse(&format!("{local}@example.com")),
            Err(AddressError::LocalTooLong)
        );
        let label = "b".repeat(64);
        assert_eq!(
            EmailAddress::parse(&format!("a@{label}.com")),
            Err(AddressError::InvalidDomain)
        );
        let domain = vec!["c".repeat(60); 4].join(".") + ".com";
        assert_eq!(
            EmailAddress::parse(&format!("{}@{domain}", "a".repeat(20))),
            Err(AddressError::TooLong)
        );
    }

    fn atom() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9!#$%&'*+/=?^_`{|}~-]{1,10}"
    }

    fn local_part() -> impl Strategy<Value = String> {
        proptest::collection::vec(atom(), 1..4).prop_map(|atoms| atoms.join("."))
    }

    fn domain() -> impl Strategy<Value = String> {
        (
            proptest::collection::vec("[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", 1..4),
            "[a-z]{2,6}",
        )
            .prop_map(|(labels, tld)| format!("{}.{tld}", labels.join(".")))
    }

    proptest! {
        #[test]
        fn valid_addresses_round_trip(local in local_part(), domain in domain()) {
            let input = format!("{local}@{domain}");
            let parsed = EmailAddress::parse(&input).unwrap();
            prop_assert_eq!(parsed.as_str(), input.as_str());
            prop_assert_eq!(parsed.local_part(), local.as_str());
            prop_assert_eq!(parsed.domain(), domain.as_str());
            // lettre agrees that it is an address.
            let checked: Result<lettre::Address, _> = input.parse();
            prop_assert!(checked.is_ok(), "lettre refuses {}", input);
            prop_assert_eq!(parsed.to_lettre().to_string(), input);
        }

        #[test]
        fn quoted_local_parts_are_unquoted_or_refused(inner in "[ -!#-\\[\\]-~]{1,20}", domain in domain()) {
            let input = format!("\"{inner}\"@{domain}");
            match EmailAddress::parse(&input) {
                Ok(parsed) => {
                    prop_assert!(is_dot_atom(&inner), "{} accepted", input);
                    prop_assert_eq!(parsed.local_part(), inner.as_str());
                    prop_assert!(lettre::Address::new(parsed.local_part(), parsed.domain()).is_ok());
                }
                Err(e) => {
                    prop_assert!(!is_dot_atom(&inner), "{} refused", input);
                    prop_assert_eq!(e, AddressError::QuotedLocal);
                }
            }
        }

        #[test]
        fn line_breaks_anywhere_are_rejected(
            local in local_part(),
            domain in domain(),
            at in 0usize..100,
            brk in prop_oneof![Just("\r"), Just("\n"), Just("\r\n")],
        ) {
            let mut input = format!("{local}@{domain}");
            let mut at = at.min(input.len());
            while !input.is_char_boundary(at) { at -= 1; }
            input.insert_str(at, brk);
            prop_assert!(EmailAddress::parse(&input).is_err());
        }

        #[test]
        fn spaces_outside_quotes_are_rejected(a in atom(), b in atom(), domain in domain()) {
            let spaced_local = format!("{} {}@{}", a, b, domain);
            let spaced_domain = format!("{}@{} {}", a, b, domain);
            prop_assert!(EmailAddress::parse(&spaced_local).is_err());
            prop_assert!(EmailAddress::parse(&spaced_domain).is_err());
        }

        #[test]
        fn strings_without_at_are_rejected(s in "[^@]{0,40}") {
            let expected = if s.contains(['\r', '\n']) {
                AddressError::LineBreak
            } else {
                AddressError::MissingAt
            };
            prop_assert_eq!(EmailAddress::parse(&s), Err(expected));
        }
    }
}
