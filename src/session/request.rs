//! The page's requests: their JSON form (docs/API.md, "Requests and replies") and the checks
//! that need no session state.

use serde::Deserialize;

use super::error::ApiError;

/// Largest WebSocket message accepted from a page.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// A request from the page. Every request carries the page's `id`, echoed in the reply.
#[derive(Debug, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase",
    deny_unknown_fields
)]
pub(crate) enum Request {
    /// Log in with a loginByToken token.
    Connect { id: u64, token: String },
    /// Take over a session whose page went away (reload, network change), within
    /// `http.resume_secs`: its registration and calls.
    Resume { id: u64, session_id: String },
    /// End the session now (hangs up its calls) instead of keeping it for a resume.
    Logout { id: u64 },
    /// A new browser offer for a call (after a resume): callgate answers it and the call's
    /// audio moves to the new connection while the SIP side stays as it is.
    Media {
        id: u64,
        call_id: String,
        sdp: String,
    },
    /// Liveness check.
    Ping { id: u64 },
    /// Call `to` with the browser's SDP offer; the reply carries callgate's answer. `headers`:
    /// X- headers for the INVITE, among the app's `call_headers`.
    Call {
        id: u64,
        to: String,
        sdp: String,
        #[serde(default)]
        headers: std::collections::BTreeMap<String, String>,
        /// The `dial` event this call carries out (click-to-call from the CRM backend).
        #[serde(default)]
        request_id: Option<u64>,
    },
    /// Hang up (or cancel) a call.
    Hangup { id: u64, call_id: String },
    /// Answer an incoming call with the browser's SDP offer; the reply carries the answer.
    Answer {
        id: u64,
        call_id: String,
        sdp: String,
    },
    /// Refuse an incoming call (`code` 486 Busy Here by default, or 603 Decline, ...).
    Reject {
        id: u64,
        call_id: String,
        code: Option<u16>,
    },
    /// Put the far end on hold.
    Hold { id: u64, call_id: String },
    /// Resume.
    Unhold { id: u64, call_id: String },
    /// Send DTMF digits (SIP INFO for now).
    Dtmf {
        id: u64,
        call_id: String,
        digits: String,
    },
    /// Blind transfer: the far end is asked to call `to`.
    Transfer {
        id: u64,
        call_id: String,
        to: String,
    },
    /// Consultation: hold `callId` and call `to` (the reply is as for `call`); then
    /// `completeTransfer` or hang up the consultation and `unhold`.
    Consult {
        id: u64,
        call_id: String,
        to: String,
        sdp: String,
    },
    /// A trickled ICE candidate of the page's connection for `callId` (empty: end of
    /// candidates).
    Ice {
        id: u64,
        call_id: String,
        candidate: String,
        sdp_mid: Option<String>,
        #[serde(rename = "sdpMLineIndex")]
        sdp_mline_index: Option<u16>,
    },
    /// Change the agent's state (an id from `connected`'s `states`); in a call it applies
    /// when the agent's last call ends.
    SetState { id: u64, state: String },
    /// Attended transfer: the far end of `callId` takes over `consultId` (a call to the target).
    CompleteTransfer {
        id: u64,
        call_id: String,
        consult_id: String,
    },
}

impl Request {
    /// Parses one text frame.
    pub(crate) fn parse(text: &str) -> Result<Request, ApiError> {
        serde_json::from_str(text)
            .map_err(|_| ApiError::BadRequest("not a known request (see docs/API.md)"))
    }
}

/// Digits a page may send: 1 to 64 of `0-9 * # A-D`.
pub(crate) fn check_digits(digits: &str) -> Result<(), ApiError> {
    if !digits.is_empty()
        && digits.len() <= 64
        && digits
            .chars()
            .all(|d| d.is_ascii_digit() || "*#ABCDabcd".contains(d))
    {
        Ok(())
    } else {
        Err(ApiError::BadRequest("digits are 1-64 of 0-9 * # A-D"))
    }
}

/// A trickled candidate's fields are plausible (callgate is ICE-lite: it never sends checks and
/// learns the page's address from the page's own checks, so it needs no candidates).
pub(crate) fn check_candidate(
    candidate: &str,
    sdp_mid: Option<&str>,
    sdp_mline_index: Option<u16>,
) -> Result<(), ApiError> {
    let mid_ok = sdp_mid.is_none_or(|m| m.len() <= 32) && sdp_mline_index.is_none_or(|i| i < 16);
    if mid_ok && (candidate.is_empty() || is_ice_candidate(candidate)) {
        Ok(())
    } else {
        Err(ApiError::BadCandidate)
    }
}

/// Whether `c` is an ICE candidate attribute value (RFC 8839 §5.1, with or without the
/// `candidate:` prefix): foundation, component, transport, priority, address, port, `typ`, type.
pub(crate) fn is_ice_candidate(c: &str) -> bool {
    let c = c.strip_prefix("candidate:").unwrap_or(c);
    let f: Vec<&str> = c.split_ascii_whitespace().collect();
    c.len() <= 1024
        && f.len() >= 8
        && f[1].parse::<u16>().is_ok()
        && (f[2].eq_ignore_ascii_case("udp") || f[2].eq_ignore_ascii_case("tcp"))
        && f[3].parse::<u32>().is_ok()
        && f[5].parse::<u16>().is_ok()
        && f[6] == "typ"
        && ["host", "srflx", "prflx", "relay"].contains(&f[7])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ice_candidates_are_checked() {
        for good in [
            "candidate:842163049 1 udp 1677729535 203.0.113.7 46154 typ srflx raddr 10.0.0.2 rport 46154 generation 0",
            "1 1 UDP 2130706431 127.0.0.1 50000 typ host",
            "candidate:2 1 tcp 1518280447 192.168.1.2 9 typ host tcptype active",
        ] {
            assert!(is_ice_candidate(good), "{good}");
        }
        for bad in [
            "",
            "candidate:1 1 udp 2130706431 127.0.0.1 50000",
            "candidate:1 x udp 1 127.0.0.1 50000 typ host",
            "candidate:1 1 sctp 1 127.0.0.1 50000 typ host",
            "candidate:1 1 udp 1 127.0.0.1 99999 typ host",
            "candidate:1 1 udp 1 127.0.0.1 5000 typ bogus",
        ] {
            assert!(!is_ice_candidate(bad), "{bad}");
        }
        let r = Request::parse(
            r#"{"type":"ice","id":3,"callId":"c-1","candidate":"","sdpMid":"0","sdpMLineIndex":0}"#,
        )
        .unwrap();
        assert!(matches!(
            r,
            Request::Ice {
                id: 3,
                sdp_mline_index: Some(0),
                ..
            }
        ));
        assert_eq!(check_candidate("", Some("0"), Some(0)), Ok(()));
        assert_eq!(
            check_candidate("bogus", None, None),
            Err(ApiError::BadCandidate)
        );
    }

    #[test]
    fn wire_format() {
        let r = Request::parse(r#"{"type":"connect","id":7,"token":"crm:00"}"#).unwrap();
        assert!(matches!(r, Request::Connect { id: 7, .. }));
        assert!(Request::parse(r#"{"type":"connect","id":7}"#).is_err());
        assert!(Request::parse(r#"{"type":"dance","id":7}"#).is_err());
        assert!(Request::parse(r#"{"type":"ping","id":1,"extra":1}"#).is_err());
        assert!(check_digits("12*#A").is_ok());
        assert!(check_digits("").is_err() && check_digits("12x").is_err());
    }
}
