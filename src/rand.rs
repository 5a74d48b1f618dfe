//! The one source of random identifiers and secrets: session ids, API credentials, SIP
//! Call-IDs, tags and branches, ICE credentials, file names.
//!
//! Every function returns an error when the operating system's generator fails, and callers
//! refuse what they were doing (a login, a call) rather than fall back to zeros or the clock:
//! a predictable session id or API token is a stolen session (rustls's `GetRandomFailed` is the
//! model).

/// The operating system's random number generator failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the operating system's random number generator failed; callgate refuses to go on without it"
)]
pub struct GetRandomFailed;

#[cfg(test)]
thread_local! {
    /// Makes this thread's draws fail (tests of the refusal paths).
    static FAIL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Makes every draw on this thread fail while `f` runs (tests only).
#[cfg(test)]
pub(crate) fn failing<T>(f: impl FnOnce() -> T) -> T {
    FAIL.with(|c| c.set(true));
    let out = f();
    FAIL.with(|c| c.set(false));
    out
}

/// Fills `buf` with random bytes.
pub fn fill(buf: &mut [u8]) -> Result<(), GetRandomFailed> {
    #[cfg(test)]
    if FAIL.with(std::cell::Cell::get) {
        return Err(GetRandomFailed);
    }
    getrandom::fill(buf).map_err(|_| GetRandomFailed)
}

/// `N` random bytes.
pub fn bytes<const N: usize>() -> Result<[u8; N], GetRandomFailed> {
    let mut b = [0u8; N];
    fill(&mut b)?;
    Ok(b)
}

/// A random `u64`.
pub fn u64() -> Result<u64, GetRandomFailed> {
    bytes::<8>().map(u64::from_le_bytes)
}

/// `N` random bytes as lower-case hex (`2 * N` characters).
pub fn hex<const N: usize>() -> Result<String, GetRandomFailed> {
    bytes::<N>().map(hex::encode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_differ_and_failures_are_errors() {
        let (a, b) = (u64(), u64());
        assert!(a.is_ok() && a != b);
        assert_eq!(hex::<16>().map(|h| h.len()), Ok(32));
        assert_eq!(failing(u64), Err(GetRandomFailed));
        assert_eq!(failing(hex::<16>), Err(GetRandomFailed));
        assert!(u64().is_ok(), "only while failing() runs");
    }
}
