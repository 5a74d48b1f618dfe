//! The SIP account a token carries, validated so every value is safe to put in a SIP header.

use std::fmt;

use crate::secret::SecretString;

/// A field of the credentials XML carried by a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Field {
    /// `login`: the SIP user (the user part of the address of record).
    Login,
    /// `authenticationName`: the digest user name; defaults to `login`.
    AuthenticationName,
    /// `password`: the digest password.
    Password,
    /// `domain`: the SIP domain (the host part of the address of record).
    Domain,
    /// `outboundProxy`: `host[:port]` that all SIP requests are sent to.
    OutboundProxy,
    /// `port`: SIP port of the domain (or of the proxy when it has none); default 5060.
    Port,
    /// `visibleName`: display name in the From header.
    VisibleName,
    /// `group`: the agent's group, which decides the agent states it may use.
    Group,
    /// `expires`: Unix seconds or RFC 3339 time after which the token is refused.
    Expires,
}

impl Field {
    /// Every field, in the order the XML documents them.
    pub const ALL: [Field; 9] = [
        Field::Login,
        Field::AuthenticationName,
        Field::Password,
        Field::Domain,
        Field::OutboundProxy,
        Field::Port,
        Field::VisibleName,
        Field::Group,
        Field::Expires,
    ];

    /// The attribute / element name in the token XML.
    pub fn xml_name(self) -> &'static str {
        match self {
            Field::Login => "login",
            Field::AuthenticationName => "authenticationName",
            Field::Password => "password",
            Field::Domain => "domain",
            Field::OutboundProxy => "outboundProxy",
            Field::Port => "port",
            Field::VisibleName => "visibleName",
            Field::Group => "group",
            Field::Expires => "expires",
        }
    }

    pub(crate) fn from_xml_name(name: &[u8]) -> Option<Field> {
        Field::ALL
            .into_iter()
            .find(|f| f.xml_name().as_bytes() == name)
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.xml_name())
    }
}

/// Why an account's fields are not acceptable (a token's, or the command line's).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AccountError {
    /// A required field is absent or empty.
    #[error(
        "missing_field:{0}: the token's XML has no {0} (as an attribute of the root element or a child element)"
    )]
    MissingField(Field),
    /// A field is present but its value is not acceptable.
    #[error("invalid_field:{field}: {why}")]
    InvalidField {
        /// Which field.
        field: Field,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// Default SIP port (RFC 3261 §19.1.2).
pub const DEFAULT_SIP_PORT: u16 = 5060;

/// A SIP account: who callgate registers and calls as, on an agent's behalf.
///
/// Only built from a verified token (or by the CLI for minting); every field has been checked so
/// that it cannot break out of the SIP header it is written into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SipAccount {
    /// SIP user (user part of the address of record).
    pub login: String,
    /// Digest user name.
    pub auth_name: String,
    /// Digest password.
    pub password: SecretString,
    /// SIP domain (host part of the address of record, digest realm is usually this).
    pub domain: Host,
    /// Where requests go instead of the domain, if set.
    pub outbound_proxy: Option<HostPort>,
    /// Port of the domain (or of the proxy when the proxy names none).
    pub port: u16,
    /// Whether the token named the port (if not, the domain's DNS SRV records may choose one).
    pub port_explicit: bool,
    /// Display name for the From header.
    pub visible_name: Option<String>,
    /// The agent's group (apps.toml `states[].groups`), if the token names one.
    pub group: Option<String>,
}

impl SipAccount {
    /// The account with group `group` (the CLI's `--group`), checked as a token's would be.
    pub fn with_group(mut self, group: Option<&str>) -> Result<SipAccount, AccountError> {
        if let Some(g) = group {
            check_group(g).map_err(|why| AccountError::InvalidField {
                field: Field::Group,
                why,
            })?;
        }
        self.group = group.map(str::to_owned);
        Ok(self)
    }

    /// `login@domain`: the identity of this account (an agent id for APIs and logs).
    pub fn aor(&self) -> String {
        format!("{}@{}", self.login, self.domain)
    }
}

/// A host: DNS name, IPv4 address or bracketed IPv6 address (`[::1]`), lower-cased.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Host(String);

impl Host {
    /// Parses a host as it appears in a SIP URI.
    pub fn parse(s: &str) -> Result<Host, &'static str> {
        if s.is_empty() {
            return Err("is empty");
        }
        if s.len() > 253 {
            return Err("is longer than 253 characters");
        }
        if let Some(inner) = s.strip_prefix('[') {
            let inner = inner.strip_suffix(']').ok_or("has '[' without ']'")?;
            inner
                .parse::<std::net::Ipv6Addr>()
                .map_err(|_| "is not a valid IPv6 address")?;
            return Ok(Host(s.to_ascii_lowercase()));
        }
        if s.parse::<std::net::Ipv6Addr>().is_ok() {
            return Err("is an IPv6 address without brackets (write [addr])");
        }
        let labels_ok = s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
        if !labels_ok {
            return Err("is not a valid host name or IP address");
        }
        Ok(Host(s.to_ascii_lowercase()))
    }

    /// The host as written in a SIP URI.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// The host.
    pub host: Host,
    /// The port, if given.
    pub port: Option<u16>,
}

impl HostPort {
    /// Parses `host[:port]`, `[v6][:port]`, with an optional `sip:` prefix as CRMs often write it.
    pub fn parse(s: &str) -> Result<HostPort, &'static str> {
        let s = s.strip_prefix("sip:").unwrap_or(s);
        let (host, port) = if s.starts_with('[') {
            match s.find(']') {
                Some(end) => {
                    let (h, rest) = s.split_at(end + 1);
                    match rest.strip_prefix(':') {
                        Some(p) => (h, Some(p)),
                        None if rest.is_empty() => (h, None),
                        None => return Err("has text after the IPv6 address"),
                    }
                }
                None => return Err("has '[' without ']'"),
            }
        } else {
            match s.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        let port = port.map(parse_port).transpose()?;
        Ok(HostPort {
            host: Host::parse(host)?,
            port,
        })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.host),
            None => write!(f, "{}", self.host),
        }
    }
}

/// A port number 1..=65535 in decimal.
pub fn parse_port(s: &str) -> Result<u16, &'static str> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err("is not a port number (1-65535)");
    }
    match s.parse::<u16>() {
        Ok(0) | Err(_) => Err("is not a port number (1-65535)"),
        Ok(p) => Ok(p),
    }
}

/// Checks a SIP user part (RFC 3261 §25.1 `user`): unreserved, user-unreserved and `%HH`.
pub fn check_sip_user(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("is empty");
    }
    if s.len() > 128 {
        return Err("is longer than 128 characters");
    }
    let ok = s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.!~*'()&=+$,;?/%".contains(&b));
    if ok {
        Ok(())
    } else {
        Err("may only hold letters, digits and -_.!~*'()&=+$,;?/% (a SIP user part)")
    }
}

/// Checks text that goes into a quoted SIP string (digest user name, display name).
pub fn check_quoted_text(s: &str, max_chars: usize) -> Result<(), &'static str> {
    if s.chars().count() > max_chars {
        return Err("is too long");
    }
    if s.chars().any(|c| c.is_control() || c == '"' || c == '\\') {
        return Err("may not hold control characters, '\"' or '\\'");
    }
    Ok(())
}

/// Builds an account from raw field values (`None` = absent), checking each one.
pub(crate) fn account_from_fields(
    get: impl Fn(Field) -> Option<String>,
    password: Option<SecretString>,
) -> Result<SipAccount, AccountError> {
    let invalid = |field, why| AccountError::InvalidField { field, why };
    let required = |field| {
        get(field)
            .filter(|v| !v.is_empty())
            .ok_or(AccountError::MissingField(field))
    };

    let login = required(Field::Login)?;
    check_sip_user(&login).map_err(|why| invalid(Field::Login, why))?;

    let auth_name = get(Field::AuthenticationName)
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| login.clone());
    check_quoted_text(&auth_name, 128).map_err(|why| invalid(Field::AuthenticationName, why))?;
    if auth_name.is_empty() {
        return Err(AccountError::MissingField(Field::AuthenticationName));
    }

    let password = password
        .filter(|p| !p.expose_secret().is_empty())
        .ok_or(AccountError::MissingField(Field::Password))?;
    if password.expose_secret().len() > 256 {
        return Err(invalid(Field::Password, "is longer than 256 bytes"));
    }

    let domain =
        Host::parse(&required(Field::Domain)?).map_err(|why| invalid(Field::Domain, why))?;

    let outbound_proxy = match get(Field::OutboundProxy).filter(|v| !v.is_empty()) {
        Some(v) => Some(HostPort::parse(&v).map_err(|why| invalid(Field::OutboundProxy, why))?),
        None => None,
    };

    let (port, port_explicit) = match get(Field::Port).filter(|v| !v.is_empty()) {
        Some(v) => (
            parse_port(&v).map_err(|why| invalid(Field::Port, why))?,
            true,
        ),
        None => (DEFAULT_SIP_PORT, false),
    };

    let visible_name = get(Field::VisibleName).filter(|v| !v.is_empty());
    if let Some(name) = &visible_name {
        check_quoted_text(name, 128).map_err(|why| invalid(Field::VisibleName, why))?;
    }

    let group = get(Field::Group).filter(|v| !v.is_empty());
    if let Some(g) = &group {
        check_group(g).map_err(|why| invalid(Field::Group, why))?;
    }

    Ok(SipAccount {
        login,
        auth_name,
        password,
        domain,
        outbound_proxy,
        port,
        port_explicit,
        visible_name,
        group,
    })
}

/// Checks an agent group's name (token `group`, apps.toml `states[].groups`).
pub fn check_group(s: &str) -> Result<(), &'static str> {
    let ok = (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err("must be 1 to 64 letters, digits, '-', '_' or '.'")
    }
}

/// Builds an account from command-line values, with the same checks a token's fields get.
pub fn account_from_cli(
    login: &str,
    auth_name: Option<&str>,
    password: String,
    domain: &str,
    outbound_proxy: Option<&str>,
    port: Option<u16>,
    visible_name: Option<&str>,
) -> Result<SipAccount, AccountError> {
    let port = port.map(|p| p.to_string());
    account_from_fields(
        |f| {
            match f {
                Field::Login => Some(login),
                Field::AuthenticationName => auth_name,
                Field::Domain => Some(domain),
                Field::OutboundProxy => outbound_proxy,
                Field::Port => port.as_deref(),
                Field::VisibleName => visible_name,
                _ => None,
            }
            .map(str::to_owned)
        },
        Some(SecretString::new(password)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        assert_eq!(
            Host::parse("Sip.Example.COM").map(|h| h.0),
            Ok("sip.example.com".into())
        );
        assert!(Host::parse("127.0.0.1").is_ok());
        assert!(Host::parse("[::1]").is_ok());
        assert!(Host::parse("::1").is_err());
        assert!(Host::parse("a..b").is_err());
        assert!(Host::parse("evil.com\r\nVia: x").is_err());
        assert!(Host::parse("-a.com").is_err());
    }

    #[test]
    fn host_ports() {
        let hp = HostPort::parse("sip:proxy.example.com:5080").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(hp.to_string(), "proxy.example.com:5080");
        let hp = HostPort::parse("[::1]:5062").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(hp.port, Some(5062));
        assert_eq!(HostPort::parse("[::1]").map(|h| h.port), Ok(None));
        assert!(HostPort::parse("p.example.com:0").is_err());
        assert!(HostPort::parse("p.example.com:70000").is_err());
        assert!(HostPort::parse("p.example.com:").is_err());
        assert!(HostPort::parse("[::1]x").is_err());
    }

    #[test]
    fn users() {
        assert!(check_sip_user("1001").is_ok());
        assert!(check_sip_user("agent.smith+1").is_ok());
        assert!(check_sip_user("a b").is_err());
        assert!(check_sip_user("a@b").is_err());
        assert!(check_sip_user("a\r\n").is_err());
    }
}
