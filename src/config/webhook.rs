//! `[apps.NAME.webhook]`: where an app's events are POSTed, and how.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::Checker;
use super::raw::RawWebhook;
use crate::webhook::Target;
use crate::webhook::outbox::Policy;

/// Validates an app's webhook (`at` is its dotted key); `dir` is where a relative `ca_file`
/// is looked for. `None` when it is absent or wrong (each problem is reported).
pub(super) fn check_webhook(
    c: &mut Checker,
    file: &str,
    at: &str,
    dir: &Path,
    raw: &RawWebhook,
) -> Option<Arc<Target>> {
    let problems = c.problems.len();
    let url = parse_url(&raw.url);
    if let Err(e) = &url {
        c.add(file, format!("{at}.url"), *e);
    }
    if let Ok((false, host, _, _)) = &url {
        if !raw.insecure_http && !is_loopback(host) {
            c.add(
                file,
                format!("{at}.url"),
                "http:// sends the agents' events (callers' numbers, customer data) in the clear: use https://, or set insecure_http = true for a receiver on a trusted network",
            );
        }
    }
    let secret_ok =
        (24..=256).contains(&raw.secret.len()) && raw.secret.bytes().all(|b| b.is_ascii_graphic());
    if !secret_ok {
        c.add(
            file,
            format!("{at}.secret"),
            "must be 24 to 256 visible ASCII characters (no spaces); `callgate keygen` makes one",
        );
    }
    let mut number =
        |key: &str, v: Option<i64>, range: std::ops::RangeInclusive<i64>, default: i64| {
            let v = v.unwrap_or(default);
            if range.contains(&v) {
                v.unsigned_abs()
            } else {
                c.add(
                    file,
                    format!("{at}.{key}"),
                    format!("must be {} to {}", range.start(), range.end()),
                );
                default.unsigned_abs()
            }
        };
    let defaults = Policy::default();
    let timeout = number("timeout_secs", raw.timeout_secs, 1..=60, 10);
    let concurrency = number("concurrency", raw.concurrency, 1..=64, 4);
    let max_age = number(
        "max_age_secs",
        raw.max_age_secs,
        60..=7 * 86_400,
        i64::try_from(defaults.max_age.as_secs()).unwrap_or(86_400),
    );
    let max_queue = number("max_queue", raw.max_queue, 100..=1_000_000, 20_000);
    let extra_roots = match &raw.ca_file {
        None => Vec::new(),
        Some(p) => {
            let path = dir.join(p);
            match std::fs::read(&path).map(|pem| certificates(&pem)) {
                Ok(certs) if !certs.is_empty() => certs,
                Ok(_) => {
                    c.add(
                        file,
                        format!("{at}.ca_file"),
                        format!("{} holds no PEM certificate", path.display()),
                    );
                    Vec::new()
                }
                Err(e) => {
                    c.add(
                        file,
                        format!("{at}.ca_file"),
                        format!("cannot read {}: {e}", path.display()),
                    );
                    Vec::new()
                }
            }
        }
    };
    if let Some(events) = &raw.events {
        for (i, e) in events.iter().enumerate() {
            if !crate::webhook::EVENT_TYPES.contains(&e.as_str()) {
                c.add(
                    file,
                    format!("{at}.events[{i}]"),
                    format!(
                        "is not an event type: one of {}",
                        crate::webhook::EVENT_TYPES.join(", ")
                    ),
                );
            }
        }
    }
    let (tls, host, port, path) = url.ok()?;
    if c.problems.len() > problems {
        return None;
    }
    Some(Arc::new(Target {
        tls,
        host,
        port,
        path,
        secret: crate::secret::SecretString::new(raw.secret.clone()),
        timeout: Duration::from_secs(timeout),
        policy: Policy {
            concurrency: usize::try_from(concurrency).unwrap_or(4),
            max_age: Duration::from_secs(max_age),
            max_queue: usize::try_from(max_queue).unwrap_or(20_000),
            ..defaults
        },
        extra_roots,
        events: raw.events.clone(),
    }))
}

/// `http(s)://host[:port][/path][?query]` into (tls, host, port, path and query).
fn parse_url(url: &str) -> Result<(bool, String, u16, String), &'static str> {
    const SHAPE: &str = "must be an https:// URL like https://crm.example.com/callgate/events";
    let uri: hyper::Uri = url.parse().map_err(|_| SHAPE)?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(SHAPE),
    };
    let authority = uri.authority().ok_or(SHAPE)?;
    if authority.as_str().contains('@') {
        return Err("must not hold a user name or password (the signature authenticates callgate)");
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.is_empty() || url.contains('#') || url.len() > 2048 {
        return Err(SHAPE);
    }
    let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let path = if path.is_empty() { "/" } else { path };
    Ok((tls, host.to_owned(), port, path.to_owned()))
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The DER of each `CERTIFICATE` block of a PEM file.
fn certificates(pem: &[u8]) -> Vec<Vec<u8>> {
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .map(|c| c.as_ref().to_vec())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_split_and_checked() {
        assert_eq!(
            parse_url("https://crm.example.com/hooks/cg?k=1"),
            Ok((true, "crm.example.com".into(), 443, "/hooks/cg?k=1".into()))
        );
        assert_eq!(
            parse_url("http://127.0.0.1:8081"),
            Ok((false, "127.0.0.1".into(), 8081, "/".into()))
        );
        assert_eq!(
            parse_url("https://[::1]:9/x"),
            Ok((true, "::1".into(), 9, "/x".into()))
        );
        for bad in [
            "ftp://x/",
            "crm.example.com/x",
            "https://u:p@x/",
            "https:///x",
            "https://x/#f",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        assert!(is_loopback("127.0.0.1") && is_loopback("::1") && is_loopback("LOCALHOST"));
        assert!(!is_loopback("10.0.0.1") && !is_loopback("crm.example.com"));
    }
}
