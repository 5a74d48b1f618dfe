//! An app's call data (`[apps.NAME.call_data]` in apps.toml): which headers of an incoming
//! INVITE (a dialler's `X-Customer-Id`, `Call-Info`, `Diversion`...) become named fields of
//! the call, for the CRM's screen pop. The mapping and the checks on each value live here; the
//! session puts the fields in the `incoming` event, the CRM's stream and the call's history row.

use std::collections::BTreeMap;

use super::Checker;

/// Most headers one app maps.
pub const MAX_FIELDS: usize = 32;
/// Longest value kept, in bytes; a longer one is left out (never cut: a cut id is a wrong id).
pub const MAX_VALUE: usize = 256;

/// Header (lower-case) -> field name, in the order configured; and whether callers may ask
/// for auto-answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallDataMap {
    fields: Vec<(String, String)>,
    /// `auto_answer = true`: callers' requests are honoured (`Some`), with the app's own
    /// header (`auto_answer_header`) as a further way to ask.
    auto_answer: Option<Option<String>>,
}

impl CallDataMap {
    /// The fields `headers` (an INVITE's, in order) carry: the first value of each mapped
    /// header, when it is at most [`MAX_VALUE`] bytes and free of control characters
    /// (surrounding spaces trimmed). Values that fail are left out and logged.
    pub fn extract(&self, headers: &[(String, String)]) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (header, field) in &self.fields {
            let Some((_, value)) = headers
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(header))
            else {
                continue;
            };
            let value = value.trim();
            if value.len() > MAX_VALUE || value.chars().any(char::is_control) {
                tracing::info!(
                    header = %header,
                    bytes = value.len(),
                    "call data left out: longer than {MAX_VALUE} bytes or with control characters"
                );
                continue;
            }
            out.insert(field.clone(), value.to_owned());
        }
        out
    }

    /// Whether it maps nothing.
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// Whether an INVITE with `headers` is to be answered at once: the app allows it and the
    /// caller asks, with `Call-Info: <...>;answer-after=0` (RFC 7462's parameter, as diallers
    /// and paging systems send it), `Alert-Info: <...>;info=alert-autoanswer`, or the app's
    /// `auto_answer_header` with any value but `false`, `no` or `0`.
    pub fn auto_answer(&self, headers: &[(String, String)]) -> bool {
        let Some(own) = &self.auto_answer else {
            return false;
        };
        let param = |value: &str, name: &str, want: &str| {
            value.split(';').skip(1).any(|p| {
                p.split_once('=').is_some_and(|(k, v)| {
                    k.trim().eq_ignore_ascii_case(name)
                        && v.trim().trim_matches('"').eq_ignore_ascii_case(want)
                })
            })
        };
        headers.iter().any(|(name, value)| {
            (name.eq_ignore_ascii_case("call-info") && param(value, "answer-after", "0"))
                || (name.eq_ignore_ascii_case("alert-info")
                    && param(value, "info", "alert-autoanswer"))
                || own.as_ref().is_some_and(|h| {
                    name.eq_ignore_ascii_case(h)
                        && !["false", "no", "0"]
                            .iter()
                            .any(|n| value.trim().eq_ignore_ascii_case(n))
                })
        })
    }
}

/// Most headers a call may add (apps.toml `call_headers`).
pub const MAX_CALL_HEADERS: usize = 16;

/// The X- headers an app's pages and backend may add to the INVITEs of their calls
/// (`call_headers` in apps.toml), as configured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallHeaders {
    names: Vec<String>,
}

impl CallHeaders {
    /// The headers a `call` asks for, as they go into the INVITE (the configured spelling of
    /// each name), or why not: a name the app does not allow, or a value over [`MAX_VALUE`]
    /// bytes or with control characters (which could split the message).
    pub fn check(&self, asked: &BTreeMap<String, String>) -> Result<Vec<(String, String)>, String> {
        if asked.len() > MAX_CALL_HEADERS {
            return Err(format!("at most {MAX_CALL_HEADERS} headers"));
        }
        let mut out = Vec::with_capacity(asked.len());
        for (name, value) in asked {
            let Some(allowed) = self.names.iter().find(|n| n.eq_ignore_ascii_case(name)) else {
                return Err(format!(
                    "the app does not allow the header {name:?} (apps.toml call_headers)"
                ));
            };
            if value.len() > MAX_VALUE || value.chars().any(char::is_control) {
                return Err(format!(
                    "the value of {allowed} must be at most {MAX_VALUE} bytes, without control characters"
                ));
            }
            out.push((allowed.clone(), value.trim().to_owned()));
        }
        Ok(out)
    }
}

/// Validates `call_headers` (`at` is its dotted key).
pub(super) fn check_call_headers(
    c: &mut Checker,
    file: &str,
    at: &str,
    raw: &[String],
) -> CallHeaders {
    if raw.len() > MAX_CALL_HEADERS {
        c.add(file, at, format!("at most {MAX_CALL_HEADERS} headers"));
    }
    let mut names = Vec::new();
    for (i, name) in raw.iter().take(MAX_CALL_HEADERS).enumerate() {
        let ok = (3..=64).contains(&name.len())
            && name.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("x-"))
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.!%*+`'~".contains(&b));
        if ok {
            names.push(name.clone());
        } else {
            c.add(
                file,
                format!("{at}[{i}]"),
                "must be an X- header name (e.g. X-Customer-Id): callgate writes the others itself",
            );
        }
    }
    CallHeaders { names }
}

/// Validates `[apps.NAME.call_data]` (`at` is its dotted key) and the auto-answer switches
/// (`auto_answer`, and `auto_answer_header`, at `header_at`).
pub(super) fn check_call_data(
    c: &mut Checker,
    file: &str,
    (at, header_at): (&str, &str),
    raw: &BTreeMap<String, String>,
    (auto_answer, header): (bool, Option<&String>),
) -> CallDataMap {
    if raw.len() > MAX_FIELDS {
        c.add(file, at, format!("at most {MAX_FIELDS} headers"));
    }
    let mut map = CallDataMap::default();
    for (header, field) in raw.iter().take(MAX_FIELDS) {
        let key = format!("{at}.\"{header}\"");
        let header_ok = (1..=64).contains(&header.len())
            && header
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.!%*+`'~".contains(&b));
        if !header_ok {
            c.add(file, &key, "must be a SIP header name (e.g. X-Customer-Id)");
            continue;
        }
        let field_ok = (1..=32).contains(&field.len())
            && field
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !field_ok {
            c.add(
                file,
                &key,
                "the field name must be 1 to 32 letters, digits or _ (e.g. \"customerId\")",
            );
            continue;
        }
        if map.fields.iter().any(|(_, f)| f == field) {
            c.add(
                file,
                &key,
                format!("field \"{field}\" is given by two headers"),
            );
            continue;
        }
        map.fields
            .push((header.to_ascii_lowercase(), field.to_owned()));
    }
    if let Some(h) = header {
        let ok = (1..=64).contains(&h.len())
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.!%*+`'~".contains(&b));
        if !ok {
            c.add(
                file,
                header_at,
                "must be a SIP header name (e.g. X-Auto-Answer)",
            );
        } else if !auto_answer {
            c.add(
                file,
                header_at,
                "needs auto_answer = true (which allows auto-answer at all)",
            );
        }
    }
    if auto_answer {
        map.auto_answer = Some(header.cloned());
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> CallDataMap {
        CallDataMap {
            fields: pairs
                .iter()
                .map(|(h, f)| (h.to_ascii_lowercase(), (*f).to_owned()))
                .collect(),
            auto_answer: None,
        }
    }

    #[test]
    fn auto_answer_is_what_the_caller_asks_for_when_the_app_allows_it() {
        let asks = [
            headers(&[("Call-Info", "<sip:dialler.example>;answer-after=0")]),
            headers(&[("call-info", "<http://x>; Answer-After = 0 ;purpose=info")]),
            headers(&[(
                "Alert-Info",
                "<http://www.notused.com>;info=alert-autoanswer",
            )]),
            headers(&[("X-Auto-Answer", "yes")]),
        ];
        let not = [
            headers(&[("Call-Info", "<sip:dialler.example>;answer-after=5")]),
            headers(&[("Call-Info", "<sip:answer-after=0@x>")]),
            headers(&[("X-Auto-Answer", "false")]),
            headers(&[("X-Customer-Id", "answer-after=0")]),
            headers(&[]),
        ];
        let allowed = CallDataMap {
            auto_answer: Some(Some("X-Auto-Answer".into())),
            ..CallDataMap::default()
        };
        for h in &asks {
            assert!(allowed.auto_answer(h), "{h:?}");
            // Not allowed by the app: never.
            assert!(!CallDataMap::default().auto_answer(h), "{h:?}");
        }
        for h in &not {
            assert!(!allowed.auto_answer(h), "{h:?}");
        }
        // Without its own header, the app honours the standard ones only.
        let standard = CallDataMap {
            auto_answer: Some(None),
            ..CallDataMap::default()
        };
        assert!(standard.auto_answer(&asks[0]));
        assert!(!standard.auto_answer(&asks[3]));
    }

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(h, v)| ((*h).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_call_adds_only_allowed_x_headers_with_clean_values() {
        let allowed = CallHeaders {
            names: vec!["X-Customer-Id".into(), "X-Campaign".into()],
        };
        let ask = |pairs: &[(&str, &str)]| {
            let asked: BTreeMap<String, String> = pairs
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect();
            allowed.check(&asked)
        };
        assert_eq!(
            ask(&[("x-customer-id", "C-1042 ")]),
            Ok(vec![("X-Customer-Id".to_owned(), "C-1042".to_owned())])
        );
        assert!(ask(&[("Via", "SIP/2.0/UDP evil")]).is_err());
        assert!(ask(&[("X-Other", "1")]).is_err());
        assert!(ask(&[("X-Campaign", "a\r\nVia: x")]).is_err());
        assert!(ask(&[("X-Campaign", &"a".repeat(MAX_VALUE + 1))]).is_err());
        assert_eq!(ask(&[]), Ok(vec![]));
    }

    #[test]
    fn mapped_headers_become_fields_and_bad_values_are_left_out() {
        let m = map(&[
            ("X-Customer-Id", "customerId"),
            ("Call-Info", "callInfo"),
            ("X-Campaign", "campaign"),
            ("X-Note", "note"),
            ("Diversion", "divertedFrom"),
        ]);
        let got = m.extract(&headers(&[
            ("Via", "SIP/2.0/UDP 127.0.0.1"),
            ("x-customer-id", "  C-1042 "),
            ("X-Customer-Id", "second value ignored"),
            ("Call-Info", "<http://crm/c/1042>;purpose=info"),
            ("X-Campaign", &"x".repeat(MAX_VALUE + 1)),
            ("X-Note", "line\r\nInjected: 1"),
        ]));
        assert_eq!(
            got,
            [
                ("customerId".to_owned(), "C-1042".to_owned()),
                (
                    "callInfo".to_owned(),
                    "<http://crm/c/1042>;purpose=info".to_owned()
                ),
            ]
            .into()
        );
        assert!(map(&[]).extract(&headers(&[("X-A", "1")])).is_empty());
    }
}
