//! SIP: messages, digest authentication, transactions, registration, UDP transport.
//!
//! Nothing here may panic on input: indexing, `unwrap`, `expect` and `panic!` are refused by
//! the lints below (tests excepted), arithmetic on peer-given times is clamped, and the
//! endpoint's shell contains what slips through (`endpoint::guarded`).
#![cfg_attr(
    not(test),
    deny(
        clippy::indexing_slicing,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::unreachable
    )
)]

pub mod call;
pub mod digest;
pub mod dns;
pub mod endpoint;
pub(crate) mod handle;
pub mod message;
pub mod registration;
pub mod sdp;
pub mod transaction;
pub(crate) mod ua;

/// Identifiers for branches, tags, cnonces and Call-IDs: unique, not secret. xorshift64*, seeded
/// by the owner (from the OS RNG), so the sans-IO cores stay deterministic under test.
#[derive(Debug, Clone)]
pub(crate) struct IdGen(u64);

impl IdGen {
    pub(crate) fn new(seed: u64) -> IdGen {
        IdGen(seed | 1)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// 16 lower-case hex digits.
    pub(crate) fn hex(&mut self) -> String {
        format!("{:016x}", self.next())
    }
}
