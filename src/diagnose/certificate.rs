//! Just enough X.509 reading to tell the operator which certificate the server showed:
//! subject, issuer, DNS names and expiry.
//!
//! rustls has already verified the certificate when this runs; this reads it only to print
//! it. A small DER walker instead of a crate: the four fields needed sit at fixed places in
//! `TBSCertificate`, and anything unexpected just yields `None` (the check still passes).

use std::fmt;

use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time};

/// What `diagnose` prints of the server's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateSummary {
    /// e.g. `CN=outlook.com, O=Microsoft Corporation, C=US`.
    pub subject: String,
    pub issuer: String,
    /// DNS names and IP addresses of the subjectAltName extension.
    pub names: Vec<String>,
    pub not_after: OffsetDateTime,
}

impl CertificateSummary {
    /// Reads a DER certificate; `None` when it is not one this reader understands.
    pub fn from_der(der: &[u8]) -> Option<Self> {
        let (certificate, _) = expect(der, SEQUENCE)?;
        let (tbs, _) = expect(certificate, SEQUENCE)?;
        let mut rest = tbs;
        // [0] EXPLICIT version, absent for v1 certificates.
        if let Some((tag, _, after)) = tlv(rest)
            && tag == 0xA0
        {
            rest = after;
        }
        let (_serial, rest) = expect(rest, INTEGER)?;
        let (_signature, rest) = expect(rest, SEQUENCE)?;
        let (issuer, rest) = expect(rest, SEQUENCE)?;
        let (validity, rest) = expect(rest, SEQUENCE)?;
        let (subject, rest) = expect(rest, SEQUENCE)?;
        let (_key, mut rest) = expect(rest, SEQUENCE)?;
        let (_not_before, validity) = tlv(validity).map(|(_, v, r)| (v, r))?;
        let (tag, not_after, _) = tlv(validity)?;
        let not_after = parse_time(tag, not_after)?;
        let mut names = Vec::new();
        while let Some((tag, value, after)) = tlv(rest) {
            if tag == 0xA3 {
                names = subject_alt_names(value).unwrap_or_default();
            }
            rest = after;
        }
        Some(Self {
            subject: render_name(subject)?,
            issuer: render_name(issuer)?,
            names,
            not_after,
        })
    }

    /// Whole days from `now` to expiry; negative once expired.
    pub fn days_left(&self, now: OffsetDateTime) -> i64 {
        (self.not_after - now).whole_days()
    }
}

impl fmt::Display for CertificateSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "subject {}", self.subject)?;
        if !self.names.is_empty() {
            write!(f, ", names {}", self.names.join(" "))?;
        }
        let at = self.not_after;
        write!(
            f,
            ", issuer {}, expires {:04}-{:02}-{:02} {:02}:{:02} UTC",
            self.issuer,
            at.year(),
            u8::from(at.month()),
            at.day(),
            at.hour(),
            at.minute()
        )
    }
}

const INTEGER: u8 = 0x02;
const SEQUENCE: u8 = 0x30;
const OCTET_STRING: u8 = 0x04;
const OBJECT_ID: u8 = 0x06;
/// 2.5.29.17, subjectAltName.
const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1D, 0x11];

/// One DER element: tag, contents, what follows. Only single-byte tags (all X.509 needs).
fn tlv(data: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, data) = data.split_first()?;
    let (&first, mut data) = data.split_first()?;
    let length = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7F);
        if count == 0 || count > 4 || data.len() < count {
            return None;
        }
        let (bytes, after) = data.split_at(count);
        data = after;
        bytes.iter().fold(0usize, |n, b| (n << 8) | usize::from(*b))
    };
    if data.len() < length {
        return None;
    }
    let (value, rest) = data.split_at(length);
    Some((tag, value, rest))
}

fn expect(data: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (found, value, rest) = tlv(data)?;
    (found == tag).then_some((value, rest))
}

fn attribute_name(oid: &[u8]) -> Option<&'static str> {
    Some(match oid {
        [0x55, 0x04, 0x03] => "CN",
        [0x55, 0x04, 0x06] => "C",
        [0x55, 0x04, 0x07] => "L",
        [0x55, 0x04, 0x08] => "ST",
        [0x55, 0x04, 0x0A] => "O",
        [0x55, 0x04, 0x0B] => "OU",
        _ => return None,
    })
}

/// `Name` as `CN=..., O=...`, the attributes an operator recognises; others are left out.
fn render_name(mut rdns: &[u8]) -> Option<String> {
    let mut parts = Vec::new();
    while let Some((_set, set, after)) = tlv(rdns) {
        let mut attributes = set;
        while let Some((attribute, after_attribute)) = expect(attributes, SEQUENCE) {
            let (oid, value) = expect(attribute, OBJECT_ID)?;
            let (_string_type, text, _) = tlv(value)?;
            if let Some(name) = attribute_name(oid) {
                parts.push(format!("{name}={}", String::from_utf8_lossy(text)));
            }
            attributes = after_attribute;
        }
        rdns = after;
    }
    Some(parts.join(", "))
}

fn subject_alt_names(extensions: &[u8]) -> Option<Vec<String>> {
    let (mut list, _) = expect(extensions, SEQUENCE)?;
    while let Some((extension, after)) = expect(list, SEQUENCE) {
        let (oid, mut rest) = expect(extension, OBJECT_ID)?;
        if oid == SUBJECT_ALT_NAME {
            // An optional `critical` BOOLEAN comes before the value.
            if let Some((0x01, _, after_critical)) = tlv(rest) {
                rest = after_critical;
            }
            let (value, _) = expect(rest, OCTET_STRING)?;
            let (mut general_names, _) = expect(value, SEQUENCE)?;
            let mut names = Vec::new();
            while let Some((tag, name, after_name)) = tlv(general_names) {
                match (tag, name.len()) {
                    // dNSName [2]
                    (0x82, _) => names.push(String::from_utf8_lossy(name).into_owned()),
                    // iPAddress [7]
                    (0x87, 4) => {
                        names.push(format!("{}.{}.{}.{}", name[0], name[1], name[2], name[3]))
                    }
                    (0x87, 16) => {
                        let mut octets = [0u8; 16];
                        octets.copy_from_slice(name);
                        names.push(std::net::Ipv6Addr::from(octets).to_string());
                    }
                    _ => {}
                }
                general_names = after_name;
            }
            return Some(names);
        }
        list = after;
    }
    Some(Vec::new())
}

/// UTCTime (`YYMMDDHHMMSSZ`, tag 0x17) or GeneralizedTime (`YYYYMMDDHHMMSSZ`, tag 0x18).
fn parse_time(tag: u8, text: &[u8]) -> Option<OffsetDateTime> {
    let text = std::str::from_utf8(text).ok()?;
    let text = text.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 => {
            let yy: i32 = text.get(..2)?.parse().ok()?;
            // RFC 5280: 50..99 are 19xx, 00..49 are 20xx.
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, text.get(2..)?)
        }
        0x18 => (text.get(..4)?.parse().ok()?, text.get(4..)?),
        _ => return None,
    };
    let field = |range: std::ops::Range<usize>| rest.get(range)?.parse::<u8>().ok();
    let date =
        Date::from_calendar_date(year, Month::try_from(field(0..2)?).ok()?, field(2..4)?).ok()?;
    let time = Time::from_hms(field(4..6)?, field(6..8)?, field(8..10)?).ok()?;
    Some(PrimitiveDateTime::new(date, time).assume_utc())
}

#[cfg(test)]
mod tests {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    use super::*;

    const FIXTURE: &str = include_str!("../../tests/fixtures/config/oauth-cert.pem");

    #[test]
    fn reads_subject_issuer_and_expiry_of_a_real_certificate() {
        let der = CertificateDer::from_pem_slice(FIXTURE.as_bytes()).unwrap();
        let summary = CertificateSummary::from_der(&der).unwrap();
        // openssl x509 -noout -subject -enddate: CN = mail-relay test, Nov 23 08:15:25 2036 GMT
        assert_eq!(summary.subject, "CN=mail-relay test");
        assert_eq!(summary.issuer, "CN=mail-relay test");
        assert_eq!(summary.not_after.year(), 2036);
        assert_eq!(summary.not_after.month(), Month::November);
        assert_eq!(summary.not_after.day(), 23);
        let text = summary.to_string();
        assert!(text.contains("expires 2036-11-23 08:15 UTC"), "{text}");
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert_eq!(CertificateSummary::from_der(b""), None);
        assert_eq!(CertificateSummary::from_der(&[0x30, 0x82, 0xff]), None);
        assert_eq!(
            CertificateSummary::from_der(&[0x30, 0x03, 0x02, 0x01, 0x00]),
            None
        );
    }

    #[test]
    fn both_time_forms_are_read() {
        let utc = parse_time(0x17, b"491231235959Z").unwrap();
        assert_eq!(utc.year(), 2049);
        let old = parse_time(0x17, b"500101000000Z").unwrap();
        assert_eq!(old.year(), 1950);
        let generalized = parse_time(0x18, b"21060203040506Z").unwrap();
        assert_eq!((generalized.year(), generalized.second()), (2106, 6));
        assert_eq!(parse_time(0x17, b"491331235959Z"), None);
    }

    #[test]
    fn days_left_counts_down_and_goes_negative() {
        let summary = CertificateSummary {
            subject: "CN=x".into(),
            issuer: "CN=y".into(),
            names: vec![],
            not_after: parse_time(0x17, b"300101000000Z").unwrap(),
        };
        let before = parse_time(0x17, b"291222000000Z").unwrap();
        assert_eq!(summary.days_left(before), 10);
        let after = parse_time(0x17, b"300111000000Z").unwrap();
        assert_eq!(summary.days_left(after), -10);
    }
}
