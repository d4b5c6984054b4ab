//! What the relay trusts beyond the public certificate authorities: this machine and its
//! link-local network, where plain http or SMTP without TLS may be allowed, and the extra CA
//! certificates of `mailRelay.smtp.caFile`. The settings check and the transports ask the same
//! functions.

use std::net::IpAddr;
use std::path::Path;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// Is `host` this machine: `localhost`, 127.0.0.0/8 or ::1?
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim().trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") || host.eq_ignore_ascii_case("localhost.") {
        return true;
    }
    host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Is `host` this machine or its link-local network (169.254.0.0/16, fe80::/10), where the
/// platform's managed identity endpoints live and answer plain http?
pub fn is_host_local(host: &str) -> bool {
    let bare = host.trim().trim_start_matches('[').trim_end_matches(']');
    is_loopback_host(host)
        || match bare.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => ip.is_link_local(),
            Ok(IpAddr::V6(ip)) => ip.is_unicast_link_local(),
            Err(_) => false,
        }
}

/// The CA certificates in the PEM file `path` (`mailRelay.smtp.caFile`); the error says what to
/// give instead. The settings check and the SMTP side's TLS set-up read it the same way.
pub fn read_ca_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| {
        format!(
            "cannot read {}: {e}; give the path of a PEM file of CA certificates",
            path.display()
        )
    })?;
    match CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>() {
        Ok(certs) if !certs.is_empty() => Ok(certs),
        _ => Err(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----): give a PEM file with the CA certificate(s)",
            path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for host in [
            "localhost",
            "LOCALHOST.",
            "127.0.0.1",
            "127.0.0.2",
            "[::1]",
            "::1",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "smtp.office365.com",
            "10.0.0.1",
            "localhost.example",
            "[::2]",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }
}
