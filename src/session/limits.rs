//! Limits on who may try to log in: refused tokens per source address.

use std::collections::HashMap;

/// Bad tokens tolerated per source address and minute before `connect` is refused outright.
pub const BAD_TOKENS_PER_MINUTE: u32 = 10;

/// Counts refused tokens per source address (a guard against token guessing and floods).
///
/// A std `Mutex` around a small map: held only to bump or read a counter, never across an
/// `.await`; shared by all WebSocket sessions (STYLE.md §3's documented exception). Bounded: when
/// it holds too many addresses, expired windows are dropped, and if still full, it is cleared.
#[derive(Debug, Default)]
pub struct BadTokens {
    map: std::sync::Mutex<HashMap<std::net::IpAddr, (u32, std::time::Instant)>>,
}

impl BadTokens {
    const MAX_ADDRESSES: usize = 10_000;
    const WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

    pub(crate) fn blocked(&self, ip: std::net::IpAddr) -> bool {
        let Ok(map) = self.map.lock() else {
            return false;
        };
        map.get(&ip)
            .is_some_and(|(n, since)| *n >= BAD_TOKENS_PER_MINUTE && since.elapsed() < Self::WINDOW)
    }

    pub(crate) fn record(&self, ip: std::net::IpAddr) {
        let Ok(mut map) = self.map.lock() else { return };
        if map.len() >= Self::MAX_ADDRESSES {
            map.retain(|_, (_, since)| since.elapsed() < Self::WINDOW);
            if map.len() >= Self::MAX_ADDRESSES {
                map.clear();
            }
        }
        let entry = map.entry(ip).or_insert((0, std::time::Instant::now()));
        if entry.1.elapsed() >= Self::WINDOW {
            *entry = (0, std::time::Instant::now());
        }
        entry.0 += 1;
    }
}
