//! Token errors and their stable codes.

use std::borrow::Cow;

pub use crate::account::Field;

/// Why a token was refused.
///
/// Every variant has a stable [`code`](TokenError::code) for APIs and metrics. The `Display` text
/// explains the problem to whoever mints tokens; neither ever contains token bytes, plaintext or
/// field values (context is `'static` text or numbers only).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The token is longer than the configured limit.
    #[error("token_too_large: the token is {len} bytes, the limit is {max}")]
    TooLarge {
        /// Length of the token received.
        len: usize,
        /// The configured limit (`tokens.max_bytes`).
        max: usize,
    },
    /// The token is not `APP:HEX` or its hex is broken or too short.
    #[error("malformed_token: {0}")]
    Malformed(&'static str),
    /// The app named before the `:` is not configured.
    #[error("unknown_app: the app named in the token is not configured in apps.toml")]
    UnknownApp,
    /// `ctr-hmac`: the tag does not verify under any of the app's keys.
    #[error(
        "bad_mac: the token's tag does not verify under any key of this app (tampered, truncated, or minted with another key)"
    )]
    BadMac,
    /// The decrypted bytes are not acceptable XML (in `ctr` mode, usually a wrong key or IV).
    #[error("bad_plaintext: {0}")]
    BadPlaintext(&'static str),
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
    /// The token's `expires` is in the past (beyond the tolerated clock skew). The message
    /// never shows `expired_at`: it is decrypted plaintext, and echoing it would make a
    /// malleable (`ctr`) token a decryption oracle.
    #[error(
        "token_expired: the token has expired (callgate's clock says Unix time {now}); the CRM must mint a fresh one"
    )]
    Expired {
        /// The token's `expires`, Unix seconds.
        expired_at: i64,
        /// The verifier's clock, Unix seconds.
        now: i64,
    },
}

impl TokenError {
    /// The stable, documented error code (`docs/API.md`, `docs/TOKENS.md`).
    pub fn code(&self) -> Cow<'static, str> {
        match self {
            TokenError::TooLarge { .. } => "token_too_large".into(),
            TokenError::Malformed(_) => "malformed_token".into(),
            TokenError::UnknownApp => "unknown_app".into(),
            TokenError::BadMac => "bad_mac".into(),
            TokenError::BadPlaintext(_) => "bad_plaintext".into(),
            TokenError::MissingField(f) => format!("missing_field:{f}").into(),
            TokenError::InvalidField { field, .. } => format!("invalid_field:{field}").into(),
            TokenError::Expired { .. } => "token_expired".into(),
        }
    }
}

/// Why a token could not be minted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MintError {
    /// No app of that name is configured.
    #[error("unknown_app: no app of that name is configured")]
    UnknownApp,
    /// The app has no keys left (all removed).
    #[error("no_key: the app has no key to mint with")]
    NoKey,
    /// A field would be refused by the verifier.
    #[error("{0}")]
    Invalid(TokenError),
}

impl From<crate::account::AccountError> for TokenError {
    fn from(e: crate::account::AccountError) -> TokenError {
        match e {
            crate::account::AccountError::MissingField(f) => TokenError::MissingField(f),
            crate::account::AccountError::InvalidField { field, why } => {
                TokenError::InvalidField { field, why }
            }
        }
    }
}
