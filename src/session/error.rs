//! Why a page's request was refused: one enum, one stable `code()` per variant (never reused,
//! documented in docs/API.md, tested against it), and a message for people that never holds a
//! secret. Every refusal reaches the page through [`ApiError`]'s JSON form,
//! `{"code": "...", "message": "..."}`.

use std::borrow::Cow;

use serde::Serialize;

use crate::dialplan::DialError;
use crate::media::webrtc::WebRtcError;
use crate::rand::GetRandomFailed;
use crate::sip::endpoint::EndpointError;
use crate::token::TokenError;
use crate::token::replay::Reuse;

/// A refused request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// Not JSON, unknown `type`, missing or unknown fields, binary frame, bad values.
    #[error("{0}")]
    BadRequest(&'static str),
    /// The page's origin is not in the app's `allowed_origins`.
    #[error(
        "this page's origin may not use this app's tokens or sessions (allowed_origins in apps.toml)"
    )]
    OriginNotAllowed,
    /// Too many refused tokens from this address.
    #[error("too many refused tokens from this address; wait a minute")]
    RateLimited,
    /// `connect` or `resume` on a session that is logged in.
    #[error("this session is already logged in")]
    AlreadyConnected,
    /// A trickled candidate that is not an ICE candidate line.
    #[error("not an ICE candidate line (RFC 8839 §5.1)")]
    BadCandidate,
    /// `resume` of a session that does not exist (or no longer).
    #[error("no such session, or it ended (http.resume_secs passed): connect with a token")]
    UnknownSession,
    /// The token was refused.
    #[error("{0}")]
    Token(TokenError),
    /// The token's domain or outbound proxy does not resolve.
    #[error("{0}")]
    SipServerUnresolvable(String),
    /// `sip.max_registrations` reached.
    #[error("{0}")]
    TooManyRegistrations(String),
    /// callgate is shutting down (or its SIP side is gone).
    #[error("callgate is shutting down; connect again in a moment")]
    Unavailable,
    /// No session id or API credential can be made (the OS random generator failed).
    #[error("{0}")]
    Internal(GetRandomFailed),
    /// A call before `connect`.
    #[error("send connect with a token first")]
    NotConnected,
    /// The agent's registration is gone.
    #[error("not registered with the SIP provider")]
    NotRegistered,
    /// More calls than a page may have.
    #[error("this page has too many calls")]
    TooManyCalls,
    /// `call` while the agent's state does not allow calling out (its id).
    #[error("the agent's state \"{0}\" does not allow calling out; change state first")]
    StateForbidsCalls(String),
    /// `call` with a header the app does not allow (`call_headers`), or a bad value.
    #[error("{0}")]
    HeaderNotAllowed(String),
    /// `setState` with a state the app does not define, or not for the agent's group.
    #[error("no such state for this agent (its states are listed in `connected`)")]
    UnknownState,
    /// A call id this session does not have (or, for `answer`/`reject`, no longer ringing).
    #[error("{0}")]
    UnknownCall(&'static str),
    /// The browser's offer is unusable.
    #[error("{0}")]
    BadSdp(String),
    /// The browser and the far end have no codec in common.
    #[error("{0}")]
    NoCommonCodec(String),
    /// The WebRTC engine could not set the call up.
    #[error("{0}")]
    MediaError(String),
    /// `to` is not an extension, number or SIP URI.
    #[error("{0}")]
    BadDestination(String),
    /// `to` is a SIP URI and the app's dial plan allows none.
    #[error("{0}")]
    UriNotAllowed(String),
    /// The number starts with one of the app's denied prefixes.
    #[error("{0}")]
    DestinationDenied(String),
    /// The RTP port range is exhausted.
    #[error("{0}")]
    NoMediaPorts(String),
    /// The call has this many digits waiting to be sent already; these would pass the limit.
    #[error(
        "{0} digits of this call are still waiting to be sent (at most 64, each takes 200 ms); send these later"
    )]
    DtmfQueueFull(usize),
    /// The agent has this many sessions open already, the limit.
    #[error(
        "this agent has {0} sessions open, the limit (http.max_sessions_per_agent): close another page of this agent or wait for it to end"
    )]
    TooManySessions(usize),
    /// A single-use token logged in before (or too many live ones are remembered).
    #[error("{0}")]
    TokenReused(Reuse),
    /// Click-to-call for an agent whose page is not connected (reloading, or gone and the
    /// session waiting for it to come back).
    #[error("the agent's page is not connected (reloading or closed); try again in a moment")]
    PageDetached,
}

/// The codes of [`ApiError`] apart from the token's own (docs/TOKENS.md), as docs/API.md lists
/// them.
pub const CODES: &[&str] = &[
    "bad_request",
    "origin_not_allowed",
    "rate_limited",
    "already_connected",
    "bad_candidate",
    "unknown_session",
    "sip_server_unresolvable",
    "too_many_registrations",
    "unavailable",
    "internal_error",
    "not_connected",
    "not_registered",
    "too_many_calls",
    "unknown_call",
    "bad_sdp",
    "no_common_codec",
    "media_error",
    "bad_destination",
    "uri_not_allowed",
    "destination_denied",
    "no_media_ports",
    "dtmf_queue_full",
    "too_many_sessions",
    "token_replayed",
    "too_many_live_tokens",
    "state_forbids_calls",
    "unknown_state",
    "header_not_allowed",
    "page_detached",
];

impl ApiError {
    /// The stable code (snake_case, never reused).
    pub fn code(&self) -> Cow<'static, str> {
        Cow::Borrowed(match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::OriginNotAllowed => "origin_not_allowed",
            ApiError::RateLimited => "rate_limited",
            ApiError::AlreadyConnected => "already_connected",
            ApiError::BadCandidate => "bad_candidate",
            ApiError::UnknownSession => "unknown_session",
            ApiError::Token(e) => return e.code(),
            ApiError::SipServerUnresolvable(_) => "sip_server_unresolvable",
            ApiError::TooManyRegistrations(_) => "too_many_registrations",
            ApiError::Unavailable => "unavailable",
            ApiError::Internal(_) => "internal_error",
            ApiError::NotConnected => "not_connected",
            ApiError::NotRegistered => "not_registered",
            ApiError::TooManyCalls => "too_many_calls",
            ApiError::UnknownCall(_) => "unknown_call",
            ApiError::BadSdp(_) => "bad_sdp",
            ApiError::NoCommonCodec(_) => "no_common_codec",
            ApiError::MediaError(_) => "media_error",
            ApiError::BadDestination(_) => "bad_destination",
            ApiError::UriNotAllowed(_) => "uri_not_allowed",
            ApiError::DestinationDenied(_) => "destination_denied",
            ApiError::NoMediaPorts(_) => "no_media_ports",
            ApiError::DtmfQueueFull(_) => "dtmf_queue_full",
            ApiError::TooManySessions(_) => "too_many_sessions",
            ApiError::TokenReused(Reuse::Replayed) => "token_replayed",
            ApiError::TokenReused(Reuse::Full) => "too_many_live_tokens",
            ApiError::StateForbidsCalls(_) => "state_forbids_calls",
            ApiError::UnknownState => "unknown_state",
            ApiError::HeaderNotAllowed(_) => "header_not_allowed",
            ApiError::PageDetached => "page_detached",
        })
    }
}

impl Serialize for ApiError {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("ApiError", 2)?;
        st.serialize_field("code", &self.code())?;
        st.serialize_field("message", &self.to_string())?;
        st.end()
    }
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> ApiError {
        ApiError::Token(e)
    }
}

impl From<GetRandomFailed> for ApiError {
    fn from(e: GetRandomFailed) -> ApiError {
        ApiError::Internal(e)
    }
}

impl From<DialError> for ApiError {
    fn from(e: DialError) -> ApiError {
        match e {
            DialError::UriNotAllowed => ApiError::UriNotAllowed(e.to_string()),
            DialError::Denied { .. } => ApiError::DestinationDenied(e.to_string()),
            _ => ApiError::BadDestination(e.to_string()),
        }
    }
}

impl From<WebRtcError> for ApiError {
    fn from(e: WebRtcError) -> ApiError {
        match e {
            WebRtcError::BadOffer(_) => ApiError::BadSdp(e.to_string()),
            WebRtcError::NoCommonCodec => ApiError::NoCommonCodec(e.to_string()),
            _ => ApiError::MediaError(e.to_string()),
        }
    }
}

impl From<EndpointError> for ApiError {
    fn from(e: EndpointError) -> ApiError {
        match e {
            EndpointError::Resolve { .. } => ApiError::SipServerUnresolvable(e.to_string()),
            EndpointError::TooMany(_) => ApiError::TooManyRegistrations(e.to_string()),
            EndpointError::BadDestination(_) => ApiError::BadDestination(e.to_string()),
            EndpointError::NotRegistered => ApiError::NotRegistered,
            EndpointError::Random(r) => ApiError::Internal(r),
            _ => ApiError::Unavailable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One of each variant (the match makes a new variant a compile error here until added).
    fn every() -> Vec<ApiError> {
        let all = vec![
            ApiError::BadRequest("x"),
            ApiError::OriginNotAllowed,
            ApiError::RateLimited,
            ApiError::AlreadyConnected,
            ApiError::BadCandidate,
            ApiError::UnknownSession,
            ApiError::SipServerUnresolvable("x".into()),
            ApiError::TooManyRegistrations("x".into()),
            ApiError::Unavailable,
            ApiError::Internal(GetRandomFailed),
            ApiError::NotConnected,
            ApiError::NotRegistered,
            ApiError::TooManyCalls,
            ApiError::UnknownCall("x"),
            ApiError::BadSdp("x".into()),
            ApiError::NoCommonCodec("x".into()),
            ApiError::MediaError("x".into()),
            ApiError::BadDestination("x".into()),
            ApiError::UriNotAllowed("x".into()),
            ApiError::DestinationDenied("x".into()),
            ApiError::NoMediaPorts("x".into()),
            ApiError::DtmfQueueFull(64),
            ApiError::TooManySessions(8),
            ApiError::TokenReused(Reuse::Replayed),
            ApiError::TokenReused(Reuse::Full),
            ApiError::StateForbidsCalls("x".into()),
            ApiError::UnknownState,
            ApiError::HeaderNotAllowed("x".into()),
            ApiError::PageDetached,
        ];
        for e in &all {
            match e {
                ApiError::BadRequest(_)
                | ApiError::OriginNotAllowed
                | ApiError::RateLimited
                | ApiError::AlreadyConnected
                | ApiError::BadCandidate
                | ApiError::UnknownSession
                | ApiError::Token(_)
                | ApiError::SipServerUnresolvable(_)
                | ApiError::TooManyRegistrations(_)
                | ApiError::Unavailable
                | ApiError::Internal(_)
                | ApiError::NotConnected
                | ApiError::NotRegistered
                | ApiError::TooManyCalls
                | ApiError::UnknownCall(_)
                | ApiError::BadSdp(_)
                | ApiError::NoCommonCodec(_)
                | ApiError::MediaError(_)
                | ApiError::BadDestination(_)
                | ApiError::UriNotAllowed(_)
                | ApiError::DestinationDenied(_)
                | ApiError::NoMediaPorts(_)
                | ApiError::DtmfQueueFull(_)
                | ApiError::TooManySessions(_)
                | ApiError::TokenReused(_)
                | ApiError::StateForbidsCalls(_)
                | ApiError::UnknownState
                | ApiError::HeaderNotAllowed(_)
                | ApiError::PageDetached => {}
            }
        }
        all
    }

    #[test]
    fn every_code_is_listed_once_and_documented() {
        let codes: Vec<_> = every().iter().map(ApiError::code).collect();
        assert_eq!(codes, CODES, "CODES lists every variant's code, in order");
        let doc = include_str!("../../docs/API.md");
        for code in CODES {
            assert!(
                doc.contains(&format!("`{code}`")),
                "docs/API.md does not list the error code `{code}`"
            );
        }
        // The token's codes too (their prefix for the per-field ones).
        for code in [
            "token_too_large",
            "malformed_token",
            "unknown_app",
            "bad_mac",
            "bad_plaintext",
            "missing_field:",
            "invalid_field:",
            "token_expired",
        ] {
            assert!(doc.contains(&format!("`{code}")), "{code}");
        }
    }

    #[test]
    fn json_form() {
        let e =
            serde_json::to_string(&ApiError::UnknownCall("no such call in this session")).unwrap();
        assert_eq!(
            e,
            r#"{"code":"unknown_call","message":"no such call in this session"}"#
        );
    }
}
