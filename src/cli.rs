//! Helpers behind the `callgate token ...` and `keygen` commands (kept here so they are unit-tested).

use std::fmt::Write as _;
use std::time::Duration;

use crate::token::VerifiedToken;

/// Longest `--ttl` accepted.
pub const MAX_TTL: Duration = Duration::from_secs(366 * 24 * 3600);

/// Parses a lifetime: `90` or `90s`, `10m`, `8h`, `7d`.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 90s, 10m, 8h or 7d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86400),
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use s, m, h or d")),
    };
    let d = Duration::from_secs(secs);
    if d.is_zero() || d > MAX_TTL {
        return Err(format!("{s:?} must be between 1s and 366d"));
    }
    Ok(d)
}

/// A fresh random AES key of `bits` (128, 192 or 256), hex.
pub fn keygen(bits: u16) -> Result<String, String> {
    let len = match bits {
        128 | 192 | 256 => usize::from(bits / 8),
        _ => return Err(format!("--bits {bits}: choose 128, 192 or 256")),
    };
    let mut key = vec![0u8; len];
    crate::rand::fill(&mut key).map_err(|e| e.to_string())?;
    Ok(hex::encode(key))
}

/// A fresh random IV for `ctr-hmac`.
pub fn random_iv() -> Result<[u8; 16], String> {
    crate::rand::bytes().map_err(|e| e.to_string())
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// What `callgate token inspect` prints for a valid token: every field, the password masked.
pub fn inspect_report(v: &VerifiedToken, now_unix: i64) -> String {
    let a = v.account();
    let mut out = String::new();
    let mut line = |k: &str, val: &str| {
        let _ = writeln!(out, "{k:<20}{val}");
    };
    line("app", v.app());
    line(
        "mode",
        &format!(
            "{} (key #{} of the app's keys)",
            v.mode().as_str(),
            v.key_index() + 1
        ),
    );
    line("login", &a.login);
    line("authenticationName", &a.auth_name);
    line("password", "******** (hidden)");
    line("domain", a.domain.as_str());
    line(
        "outboundProxy",
        &a.outbound_proxy
            .as_ref()
            .map_or_else(|| "(none)".to_owned(), |p| p.to_string()),
    );
    line(
        "port",
        &if a.port_explicit {
            a.port.to_string()
        } else {
            format!("{} (default; DNS SRV may override)", a.port)
        },
    );
    line("visibleName", a.visible_name.as_deref().unwrap_or("(none)"));
    line("group", a.group.as_deref().unwrap_or("(none)"));
    let expires = match v.expires() {
        Some(e) => format!("{} (in {}s)", rfc3339(e), e - now_unix),
        None => "never (the app does not require expires)".to_owned(),
    };
    line("expires", &expires);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls() {
        assert_eq!(parse_ttl("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_ttl("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("7d"), Ok(Duration::from_secs(7 * 86400)));
        for bad in [
            "",
            "m",
            "10x",
            "0s",
            "367d",
            "-5m",
            "1.5h",
            "99999999999999999999999d",
        ] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_are_random_and_sized() {
        let a = keygen(256).unwrap();
        let b = keygen(256).unwrap();
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert_eq!(keygen(128).unwrap().len(), 32);
        assert!(keygen(100).is_err());
    }
}
