//! loginByToken: `APP:HEX` tokens carrying an agent's SIP account, encrypted under a per-app key.
//!
//! Sans-IO: no clock, no randomness, no files. Callers pass `now` to [`Keyring::verify`] and an IV
//! to [`Keyring::mint`]. Only `verify` builds a [`VerifiedToken`].
//!
//! Format and modes are documented for CRM developers in `docs/TOKENS.md`; the byte layout is in
//! [`cipher`].

pub mod cipher;
mod error;
pub mod replay;
mod xml;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use error::{Field, MintError, TokenError};

use crate::account::{SipAccount, account_from_fields};
use crate::secret::{SecretBytes, wipe};
use cipher::{DerivedKeys, IV_LEN, TAG_LEN};

/// Default limit on a token's length, in bytes of its `APP:HEX` text.
pub const DEFAULT_MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Longest accepted app name.
pub const MAX_APP_NAME: usize = 64;

/// How an app's tokens are encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// AES-CTR under the key with the app's fixed IV, as `openssl enc -aes-*-ctr -nosalt` makes.
    /// For CRMs that already mint such tokens; not authenticated and reuses the keystream.
    Ctr,
    /// Random IV, AES-CTR and an HMAC-SHA256 tag over app, IV and ciphertext. The default.
    CtrHmac,
}

impl Mode {
    /// The name used in apps.toml and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Ctr => "ctr",
            Mode::CtrHmac => "ctr-hmac",
        }
    }
}

/// Checks an app name: 1 to 64 of `A-Z a-z 0-9 _ - .`.
pub fn check_app_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > MAX_APP_NAME {
        return Err("must be 1 to 64 characters long");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    {
        return Err("may only hold letters, digits, '_', '-' and '.'");
    }
    Ok(())
}

/// One key of an app, with what `ctr-hmac` derives from it.
#[derive(Debug, Clone)]
struct AppKey {
    raw: SecretBytes,
    derived: DerivedKeys,
}

/// The token settings of one app.
#[derive(Debug, Clone)]
pub struct AppKeys {
    mode: Mode,
    keys: Vec<AppKey>,
    iv: [u8; IV_LEN],
    require_expires: bool,
    /// Tokens may not expire later than this after they are presented.
    max_lifetime: Option<Duration>,
    /// Each token logs in once (the caller keeps the [`replay::UsedTokens`]).
    single_use: bool,
}

impl AppKeys {
    /// Builds an app's settings. `keys` are tried in order; the first one mints.
    /// `iv` is used by `ctr` only. Fails on a key that is not 16, 24 or 32 bytes.
    pub fn new(
        mode: Mode,
        keys: Vec<SecretBytes>,
        iv: [u8; IV_LEN],
        require_expires: bool,
    ) -> Result<AppKeys, cipher::BadKeyLength> {
        let keys = keys
            .into_iter()
            .map(|raw| {
                let derived = DerivedKeys::derive(raw.expose_secret())?;
                Ok(AppKey { raw, derived })
            })
            .collect::<Result<_, _>>()?;
        Ok(AppKeys {
            mode,
            keys,
            iv,
            require_expires,
            max_lifetime: None,
            single_use: false,
        })
    }

    /// With limits against a captured token's reuse: `max_lifetime`, the furthest its
    /// `expires` may lie ahead (a token without one is then refused), and `single_use`, each
    /// token good for one login (see [`VerifiedToken::single_use`]).
    pub fn with_replay_limits(mut self, max_lifetime: Option<Duration>, single_use: bool) -> Self {
        self.max_lifetime = max_lifetime;
        self.single_use = single_use;
        self
    }

    /// Whether its tokens must carry `expires`.
    fn needs_expires(&self) -> bool {
        self.require_expires || self.max_lifetime.is_some() || self.single_use
    }

    /// The app's mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// How many keys the app has.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }
}

/// Limits that apply to every app.
#[derive(Debug, Clone, Copy)]
pub struct TokenPolicy {
    /// Longest accepted token text.
    pub max_token_bytes: usize,
    /// A token is accepted until `expires + clock_skew`, for CRM clocks that run behind.
    pub clock_skew: Duration,
}

impl Default for TokenPolicy {
    fn default() -> Self {
        TokenPolicy {
            max_token_bytes: DEFAULT_MAX_TOKEN_BYTES,
            clock_skew: Duration::from_secs(30),
        }
    }
}

/// A token that decrypted, parsed and has not expired. Only [`Keyring::verify`] makes one.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    app: String,
    account: SipAccount,
    expires: Option<i64>,
    key_index: usize,
    mode: Mode,
    /// The token's identity: its MAC (`ctr-hmac`), or SHA-256 over its bytes (`ctr`).
    fingerprint: [u8; 32],
    /// Until when (Unix seconds) it is accepted, if its app allows it once only.
    single_use_until: Option<i64>,
}

impl VerifiedToken {
    /// The app the token was minted for.
    pub fn app(&self) -> &str {
        &self.app
    }
    /// The SIP account it carries.
    pub fn account(&self) -> &SipAccount {
        &self.account
    }
    /// Consumes the token, keeping the account.
    pub fn into_account(self) -> SipAccount {
        self.account
    }
    /// When it expires (Unix seconds), if it does.
    pub fn expires(&self) -> Option<i64> {
        self.expires
    }
    /// Which of the app's keys verified it (0 = the first, the one that mints).
    pub fn key_index(&self) -> usize {
        self.key_index
    }
    /// The mode it was decoded with.
    pub fn mode(&self) -> Mode {
        self.mode
    }
    /// If its app takes each token once: the token's fingerprint (its MAC, or a digest of a
    /// `ctr` token's bytes) and the Unix second until which it would be accepted, for
    /// [`replay::UsedTokens`] to remember.
    pub fn single_use(&self) -> Option<([u8; 32], i64)> {
        self.single_use_until.map(|until| (self.fingerprint, until))
    }
}

/// All apps' keys: verifies and mints tokens.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    apps: BTreeMap<String, AppKeys>,
    policy: TokenPolicy,
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// `t` in Unix seconds (negative before 1970), as token expiries are written.
pub fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// Parses `expires`: Unix seconds, or an RFC 3339 time (`2026-11-23T10:00:00Z`, `...+02:00`).
pub fn parse_expires(s: &str) -> Result<i64, TokenError> {
    let invalid = TokenError::InvalidField {
        field: Field::Expires,
        why: "is neither Unix seconds nor an RFC 3339 time",
    };
    if !s.is_empty() && s.len() <= 19 && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse::<i64>().map_err(|_| invalid);
    }
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|_| invalid)
}

impl Keyring {
    /// A keyring with these apps and limits.
    pub fn new(apps: BTreeMap<String, AppKeys>, policy: TokenPolicy) -> Keyring {
        Keyring { apps, policy }
    }

    /// The configured apps, by name.
    pub fn apps(&self) -> impl Iterator<Item = (&str, &AppKeys)> {
        self.apps.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Decrypts and checks `token` at wall-clock time `now`.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<VerifiedToken, TokenError> {
        if token.len() > self.policy.max_token_bytes {
            return Err(TokenError::TooLarge {
                len: token.len(),
                max: self.policy.max_token_bytes,
            });
        }
        let token = token.trim();
        let (app, hex_part) = token
            .split_once(':')
            .ok_or(TokenError::Malformed("expected APP:HEX (no ':' found)"))?;
        check_app_name(app).map_err(|_| {
            TokenError::Malformed(
                "the app name before ':' may only hold 1-64 letters, digits, '_', '-', '.'",
            )
        })?;
        let keys = self.apps.get(app).ok_or(TokenError::UnknownApp)?;
        let bytes = hex::decode(hex_part).map_err(|_| {
            TokenError::Malformed("the part after ':' is not an even number of hex digits")
        })?;
        let now = unix_seconds(now);

        match keys.mode {
            Mode::Ctr => {
                if bytes.is_empty() {
                    return Err(TokenError::Malformed("the token holds no ciphertext"));
                }
                let mut first_err = None;
                for (i, key) in keys.keys.iter().enumerate() {
                    let mut pt = bytes.clone();
                    if apply_ctr_or_skip(key.raw.expose_secret(), &keys.iv, &mut pt) {
                        let result = self.decode_plaintext(keys, &pt, now);
                        wipe(&mut pt);
                        match result {
                            Ok((account, expires)) => {
                                let fingerprint = sha256(&bytes);
                                return Ok(self.verified(
                                    app,
                                    keys,
                                    account,
                                    expires,
                                    i,
                                    fingerprint,
                                ));
                            }
                            // Garbage from a wrong key: try the next key.
                            Err(e @ TokenError::BadPlaintext(_)) => {
                                first_err.get_or_insert(e);
                            }
                            // Well-formed XML: this was the right key; its verdict stands.
                            Err(e) => return Err(e),
                        }
                    }
                }
                Err(first_err.unwrap_or(TokenError::BadPlaintext("the app has no keys")))
            }
            Mode::CtrHmac => {
                if bytes.len() <= IV_LEN + TAG_LEN {
                    return Err(TokenError::Malformed(
                        "too short for a ctr-hmac token (IV, ciphertext and tag)",
                    ));
                }
                for (i, key) in keys.keys.iter().enumerate() {
                    if let Some(mut pt) = key.derived.open(app, &bytes) {
                        let result = self.decode_plaintext(keys, &pt, now);
                        wipe(&mut pt);
                        let (account, expires) = result?;
                        let fingerprint = cipher::tag_of(&bytes);
                        return Ok(self.verified(app, keys, account, expires, i, fingerprint));
                    }
                }
                Err(TokenError::BadMac)
            }
        }
    }

    fn verified(
        &self,
        app: &str,
        keys: &AppKeys,
        account: SipAccount,
        expires: Option<i64>,
        key_index: usize,
        fingerprint: [u8; 32],
    ) -> VerifiedToken {
        // Remembered for as long as it would be accepted (single-use tokens must expire).
        let skew = i64::try_from(self.policy.clock_skew.as_secs()).unwrap_or(i64::MAX);
        let until = expires.map_or(i64::MAX, |e| e.saturating_add(skew));
        VerifiedToken {
            app: app.to_owned(),
            account,
            expires,
            key_index,
            mode: keys.mode,
            fingerprint,
            single_use_until: keys.single_use.then_some(until),
        }
    }

    fn decode_plaintext(
        &self,
        keys: &AppKeys,
        pt: &[u8],
        now: i64,
    ) -> Result<(SipAccount, Option<i64>), TokenError> {
        let text = std::str::from_utf8(pt).map_err(|_| {
            TokenError::BadPlaintext("the decrypted token is not UTF-8 text (wrong key or IV?)")
        })?;
        let mut raw = xml::parse(text)?;
        let password = raw.take_password();
        let account = account_from_fields(|f| raw.get(f), password)?;
        let expires = match raw.get(Field::Expires).filter(|v| !v.is_empty()) {
            Some(v) => Some(parse_expires(&v)?),
            None if keys.needs_expires() => return Err(TokenError::MissingField(Field::Expires)),
            None => None,
        };
        if let Some(exp) = expires {
            let skew = i64::try_from(self.policy.clock_skew.as_secs()).unwrap_or(i64::MAX);
            if now > exp.saturating_add(skew) {
                return Err(TokenError::Expired {
                    expired_at: exp,
                    now,
                });
            }
            if let Some(max) = keys.max_lifetime {
                let max = i64::try_from(max.as_secs()).unwrap_or(i64::MAX);
                if exp > now.saturating_add(max).saturating_add(skew) {
                    return Err(TokenError::InvalidField {
                        field: Field::Expires,
                        why: "lies further ahead than the app's max_lifetime_secs allows; mint tokens that expire sooner",
                    });
                }
            }
        }
        Ok((account, expires))
    }

    /// Mints a token for `account` with the app's first key. `iv` must be fresh random bytes for
    /// `ctr-hmac` (`ctr` uses the app's configured IV instead). `expires` is Unix seconds.
    pub fn mint(
        &self,
        app: &str,
        account: &SipAccount,
        expires: Option<i64>,
        iv: [u8; IV_LEN],
    ) -> Result<String, MintError> {
        let keys = self.apps.get(app).ok_or(MintError::UnknownApp)?;
        let key = keys.keys.first().ok_or(MintError::NoKey)?;
        if keys.needs_expires() && expires.is_none() {
            return Err(MintError::Invalid(TokenError::MissingField(Field::Expires)));
        }
        let port = account.port.to_string();
        let domain = account.domain.to_string();
        let proxy = account.outbound_proxy.as_ref().map(|p| p.to_string());
        let expires = expires.map(|e| e.to_string());
        let mut pairs: Vec<(Field, &str)> = vec![(Field::Login, &account.login)];
        if account.auth_name != account.login {
            pairs.push((Field::AuthenticationName, &account.auth_name));
        }
        pairs.push((Field::Password, account.password.expose_secret()));
        pairs.push((Field::Domain, &domain));
        if let Some(p) = &proxy {
            pairs.push((Field::OutboundProxy, p));
        }
        if account.port_explicit {
            pairs.push((Field::Port, &port));
        }
        if let Some(v) = &account.visible_name {
            pairs.push((Field::VisibleName, v));
        }
        if let Some(g) = &account.group {
            pairs.push((Field::Group, g));
        }
        if let Some(e) = &expires {
            pairs.push((Field::Expires, e));
        }
        let mut plaintext = xml::build(&pairs).into_bytes();
        let bytes = match keys.mode {
            Mode::Ctr => {
                let mut ct = plaintext.clone();
                if !apply_ctr_or_skip(key.raw.expose_secret(), &keys.iv, &mut ct) {
                    return Err(MintError::NoKey);
                }
                ct
            }
            Mode::CtrHmac => key.derived.seal(app, &iv, &plaintext),
        };
        wipe(&mut plaintext);
        Ok(format!("{app}:{}", hex::encode(bytes)))
    }
}

/// Keys were length-checked when the keyring was built, so this only fails on a bug.
fn apply_ctr_or_skip(key: &[u8], iv: &[u8; IV_LEN], data: &mut [u8]) -> bool {
    cipher::apply_ctr(key, iv, data).is_ok()
}

#[cfg(test)]
mod tests;
