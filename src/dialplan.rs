//! Per-app dial plans: what an agent types (`030 1234567`, `0049 30 1234567`, `+49 30 1234567`,
//! `1002`, `sip:bob@example.com`) becomes one canonical destination before it reaches SIP, with
//! premium-rate and other prefixes refusable per app. Pure functions; configured in apps.toml
//! (`[apps.NAME.dial_plan]`).

/// How one app's agents' dial strings are normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialPlan {
    /// Country code (1-3 digits) that national numbers belong to; `None`: national numbers are
    /// sent as dialled.
    pub country_code: Option<String>,
    /// Trunk prefix of national numbers (`0` in most of Europe), replaced by the country code.
    pub national_prefix: String,
    /// Prefix of international numbers (`00`; `011` in North America), replaced by `+`.
    pub international_prefix: String,
    /// Digit strings this long or shorter are internal extensions, sent as dialled.
    pub extension_max_digits: usize,
    /// What E.164 numbers are sent with: `+` (as `sip:+4930…;user=phone`), `00`, or nothing.
    pub e164_prefix: String,
    /// Whether agents may dial SIP URIs (`sip:bob@example.com`, `bob@example.com`).
    pub allow_uris: bool,
    /// E.164 prefixes (`+1900`, `+44909`) agents may not call.
    pub deny_prefixes: Vec<String>,
}

impl Default for DialPlan {
    /// Numbers sent as dialled (`+` numbers as E.164), URIs allowed, nothing denied.
    fn default() -> Self {
        DialPlan {
            country_code: None,
            national_prefix: "0".into(),
            international_prefix: "00".into(),
            extension_max_digits: 6,
            e164_prefix: "+".into(),
            allow_uris: true,
            deny_prefixes: Vec::new(),
        }
    }
}

/// Why a dial string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    /// Empty, too long, or characters that are not part of a number or SIP URI.
    #[error("invalid destination: use an extension, a number or a sip: URI")]
    Invalid,
    /// The app's dial plan does not allow SIP URIs.
    #[error("this app's dial plan allows numbers and extensions only, not SIP URIs")]
    UriNotAllowed,
    /// The number matches one of the app's denied prefixes.
    #[error("calls to {prefix} numbers are not allowed for this app (dial_plan.deny_prefixes)")]
    Denied {
        /// The denied prefix that matched.
        prefix: String,
    },
}

/// Separators people type inside numbers.
const SEPARATORS: &str = " -./()";

impl DialPlan {
    /// The destination to dial for `dialled`: a SIP URI (kept), an extension or unrecognised
    /// digit string (as dialled, without separators), or a number in E.164 with the app's
    /// [`e164_prefix`](Self::e164_prefix).
    pub fn apply(&self, dialled: &str) -> Result<String, DialError> {
        let d = dialled.trim();
        if d.is_empty() || d.len() > 256 || d.chars().any(char::is_control) {
            return Err(DialError::Invalid);
        }
        if let Some(number) = d.strip_prefix("tel:") {
            // RFC 3966: a number, whatever the scheme says.
            return self.number(number.split(';').next().unwrap_or(number));
        }
        if d.contains('@') || d.starts_with("sip:") || d.starts_with("sips:") {
            if !self.allow_uris {
                return Err(DialError::UriNotAllowed);
            }
            // The provider routes on the user part as it decodes it: `sip:+1900...@provider`
            // and `sip:%2B1900...@provider` are numbers for the deny list.
            self.check_uri_user(d)?;
            return Ok(d.to_owned());
        }
        if d.contains('%') {
            // Escapes belong to URIs; in a number they can only hide digits.
            return Err(DialError::Invalid);
        }
        self.number(d)
    }

    /// A dial string that is not a URI: an extension or feature code as dialled, or a number in
    /// E.164 checked against the deny list.
    fn number(&self, d: &str) -> Result<String, DialError> {
        let digits: String = d.chars().filter(|c| !SEPARATORS.contains(*c)).collect();
        let e164 = if let Some(rest) = digits.strip_prefix('+') {
            rest.to_owned()
        } else if !digits.bytes().all(|b| b.is_ascii_digit()) {
            // Feature codes (`*97`) and other non-numeric users: as dialled.
            return Ok(digits);
        } else if digits.len() <= self.extension_max_digits {
            return Ok(digits);
        } else if let Some(rest) = nonempty_strip(&digits, &self.international_prefix) {
            rest.to_owned()
        } else if let (Some(cc), Some(rest)) = (
            self.country_code.as_deref(),
            nonempty_strip(&digits, &self.national_prefix),
        ) {
            format!("{cc}{rest}")
        } else {
            return Ok(digits);
        };
        if e164.is_empty() || e164.len() > 15 || !e164.bytes().all(|b| b.is_ascii_digit()) {
            return Err(DialError::Invalid);
        }
        let plus = format!("+{e164}");
        if let Some(p) = self
            .deny_prefixes
            .iter()
            .find(|p| plus.starts_with(p.as_str()))
        {
            return Err(DialError::Denied { prefix: p.clone() });
        }
        Ok(format!("{}{e164}", self.e164_prefix))
    }

    /// The user part of a SIP URI, percent-decoded (RFC 3261 §19.1.2), must pass as a number
    /// if it is one (the deny list); a user that does not decode cleanly is refused.
    fn check_uri_user(&self, uri: &str) -> Result<(), DialError> {
        let rest = uri
            .split_once(':')
            .filter(|(s, _)| !s.contains('@'))
            .map_or(uri, |(_, r)| r);
        let Some((user, _)) = rest.split_once('@') else {
            return Ok(());
        };
        let user = user.split(';').next().unwrap_or(user);
        let decoded = crate::sip::message::percent_decode(user).ok_or(DialError::Invalid)?;
        if decoded.contains('%') || decoded.chars().any(char::is_control) {
            return Err(DialError::Invalid);
        }
        self.number(&decoded).map(|_| ())
    }
}

impl DialPlan {
    /// Whether the far end may transfer the agent's call to `uri` (an inbound REFER's target,
    /// called at the agent's expense): its user part, percent-decoded, must pass the plan as if
    /// dialled, so `deny_prefixes` apply to numbers however they are written.
    pub fn check_referral(&self, uri: &str) -> Result<(), DialError> {
        if let Some(number) = uri.strip_prefix("tel:") {
            return self
                .number(number.split(';').next().unwrap_or(number))
                .map(|_| ());
        }
        // Allowed although the app may refuse URIs typed by agents: a REFER's target is one.
        self.check_uri_user(uri)
    }
}

fn nonempty_strip<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    if prefix.is_empty() {
        None
    } else {
        s.strip_prefix(prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn germany() -> DialPlan {
        DialPlan {
            country_code: Some("49".into()),
            deny_prefixes: vec!["+49900".into(), "+1900".into()],
            ..DialPlan::default()
        }
    }

    #[test]
    fn national_international_and_e164_become_one_number() {
        let p = germany();
        for dialled in [
            "030 1234567",
            "0049 30 1234567",
            "+49 (30) 123-4567",
            "+49.30.1234567",
        ] {
            assert_eq!(p.apply(dialled), Ok("+49301234567".into()), "{dialled}");
        }
        let p = DialPlan {
            e164_prefix: "00".into(),
            ..germany()
        };
        assert_eq!(p.apply("030 1234567"), Ok("0049301234567".into()));
    }

    #[test]
    fn extensions_codes_and_uris() {
        let p = germany();
        assert_eq!(p.apply("1002"), Ok("1002".into()));
        assert_eq!(p.apply(" 100-2 "), Ok("1002".into()));
        assert_eq!(p.apply("*97"), Ok("*97".into()));
        assert_eq!(
            p.apply("sip:bob@example.com"),
            Ok("sip:bob@example.com".into())
        );
        let closed = DialPlan {
            allow_uris: false,
            ..germany()
        };
        assert_eq!(
            closed.apply("bob@example.com"),
            Err(DialError::UriNotAllowed)
        );
        assert_eq!(closed.apply("sip:bob@x"), Err(DialError::UriNotAllowed));
    }

    #[test]
    fn without_a_country_code_numbers_go_as_dialled() {
        let p = DialPlan::default();
        assert_eq!(p.apply("030 1234567"), Ok("0301234567".into()));
        assert_eq!(p.apply("0049301234567"), Ok("+49301234567".into()));
        assert_eq!(p.apply("+1 212 555 0100"), Ok("+12125550100".into()));
    }

    #[test]
    fn referral_targets_obey_the_deny_list_in_any_spelling() {
        let p = germany();
        assert_eq!(p.check_referral("sip:1003@pbx.example.com"), Ok(()));
        assert_eq!(
            p.check_referral("sip:alice@example.com;transport=udp"),
            Ok(())
        );
        assert_eq!(p.check_referral("sip:pbx.example.com"), Ok(()));
        for premium in [
            "sip:+499001234567@example.com",
            "sip:09001234567@example.com",
            "sip:00499001234567;user=phone@example.com",
        ] {
            assert!(
                matches!(p.check_referral(premium), Err(DialError::Denied { .. })),
                "{premium}"
            );
        }
        // Allowed although the app refuses URIs typed by agents: a REFER's target is a URI.
        let strict = DialPlan {
            allow_uris: false,
            ..germany()
        };
        assert_eq!(
            strict.check_referral("sip:+49301234567@example.com"),
            Ok(())
        );
    }

    /// Toll fraud through spelling: `+1900` in a URI the app allows, percent-escaped digits,
    /// `tel:` URIs. Each is the premium number the provider will dial, so the deny list applies.
    #[test]
    fn premium_numbers_are_denied_however_they_are_written() {
        let p = germany();
        for premium in [
            "+19005550100@provider.example",
            "sip:+19005550100@provider.example",
            "sip:%2B19005550100@provider.example",
            "sip:%2b1900%35550100@provider.example;user=phone",
            "sip:0019005550100@provider.example",
            "tel:+1-900-555-0100",
            "tel:+19005550100;phone-context=+1",
        ] {
            assert!(
                matches!(p.apply(premium), Err(DialError::Denied { .. })),
                "{premium}: {:?}",
                p.apply(premium)
            );
            assert!(
                matches!(p.check_referral(premium), Err(DialError::Denied { .. })),
                "REFER to {premium}"
            );
        }
        // Escapes hide digits in a number; a broken or doubled escape hides anything.
        for bad in [
            "%2B19005550100",
            "+1900%35550100",
            "sip:%2@provider.example",
            "sip:%252B19005550100@provider.example",
            "sip:%ff%fe@provider.example",
        ] {
            assert_eq!(p.apply(bad), Err(DialError::Invalid), "{bad}");
        }
        // Ordinary URIs and numbers still go.
        assert_eq!(
            p.apply("sip:alice%20smith@example.com"),
            Ok("sip:alice%20smith@example.com".into())
        );
        assert_eq!(p.apply("tel:+49301234567"), Ok("+49301234567".into()));
        assert_eq!(
            p.apply("sip:+49301234567@provider.example"),
            Ok("sip:+49301234567@provider.example".into())
        );
    }

    #[test]
    fn denied_prefixes_and_garbage() {
        let p = germany();
        assert_eq!(
            p.apply("0900 123456"),
            Err(DialError::Denied {
                prefix: "+49900".into()
            })
        );
        assert_eq!(
            p.apply("001 900 5550100"),
            Err(DialError::Denied {
                prefix: "+1900".into()
            })
        );
        for bad in ["", "  ", "+", "+12ab", "+1234567890123456", "12\r\n34"] {
            assert!(p.apply(bad).is_err(), "{bad:?}");
        }
    }
}
