//! Tokens already used, for apps whose tokens log in once (`single_use`): a captured token
//! (from a proxy log, a browser history, a shoulder) cannot log in again. Each is remembered
//! until it would expire anyway, so the memory is bounded by the logins within a token's
//! lifetime. Sans-IO: the caller passes the time.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};

/// Most tokens remembered at once (about 80 bytes each).
pub const MAX_REMEMBERED: usize = 1_000_000;

/// Why a token was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Reuse {
    /// It logged in before.
    #[error("this token was used already; the CRM must mint a fresh one for each login")]
    Replayed,
    /// [`MAX_REMEMBERED`] unexpired tokens are remembered: refusing is safer than forgetting.
    #[error(
        "too many single-use tokens are live (their apps' lifetimes are long); try again later"
    )]
    Full,
}

/// Fingerprints of used tokens, each until its expiry.
#[derive(Debug)]
pub struct UsedTokens {
    seen: HashSet<[u8; 32]>,
    by_expiry: BinaryHeap<Reverse<(i64, [u8; 32])>>,
    max: usize,
}

impl Default for UsedTokens {
    fn default() -> Self {
        UsedTokens::with_capacity(MAX_REMEMBERED)
    }
}

impl UsedTokens {
    /// Remembers at most `max` tokens.
    pub fn with_capacity(max: usize) -> UsedTokens {
        UsedTokens {
            seen: HashSet::new(),
            by_expiry: BinaryHeap::new(),
            max,
        }
    }

    /// Takes the token `fingerprint`, accepted until Unix second `until`, at `now`: `Ok` the
    /// first time, [`Reuse::Replayed`] after.
    pub fn take(&mut self, fingerprint: [u8; 32], until: i64, now: i64) -> Result<(), Reuse> {
        self.forget_expired(now);
        if self.seen.contains(&fingerprint) {
            return Err(Reuse::Replayed);
        }
        if until < now {
            // Expired already (the verifier would not have let it through): nothing to keep.
            return Ok(());
        }
        if self.seen.len() >= self.max {
            return Err(Reuse::Full);
        }
        self.seen.insert(fingerprint);
        self.by_expiry.push(Reverse((until, fingerprint)));
        Ok(())
    }

    /// Tokens remembered now.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    fn forget_expired(&mut self, now: i64) {
        while let Some(Reverse((until, fp))) = self.by_expiry.peek().copied() {
            if until >= now {
                break;
            }
            self.by_expiry.pop();
            self.seen.remove(&fp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_taken_once_until_it_expires() {
        let mut used = UsedTokens::default();
        assert_eq!(used.take([1; 32], 1_000, 900), Ok(()));
        assert_eq!(used.take([1; 32], 1_000, 950), Err(Reuse::Replayed));
        // Another token is its own.
        assert_eq!(used.take([2; 32], 1_100, 950), Ok(()));
        assert_eq!(used.len(), 2);
        // Past its expiry it is forgotten (the verifier refuses it by then anyway).
        assert_eq!(used.take([3; 32], 2_000, 1_001), Ok(()));
        assert_eq!(used.len(), 2, "the first token's memory went at its expiry");
    }

    #[test]
    fn when_full_it_refuses_rather_than_forgets() {
        let mut used = UsedTokens::with_capacity(2);
        assert!(used.take([1; 32], 100, 0).is_ok());
        assert!(used.take([2; 32], 200, 0).is_ok());
        assert_eq!(used.take([3; 32], 300, 0), Err(Reuse::Full));
        // A used one is still told apart from a full memory.
        assert_eq!(used.take([1; 32], 100, 0), Err(Reuse::Replayed));
        // Room again once one expires.
        assert!(used.take([3; 32], 300, 101).is_ok());
    }
}
