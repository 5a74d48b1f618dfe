//! Symmetric RTP without handing the stream to strangers, sans-IO: which source of packets
//! on a call's RTP port is the far end, and where our packets go.
//!
//! Providers behind NAT put a private (or `0.0.0.0`) address in their SDP, so the far end is
//! wherever its packets come from. The first acceptable packet latches: from then on only
//! that source (address and port) is the far end. Another source is taken only once the
//! latched one has been silent for [`RELATCH_AFTER`] (a NAT rebinding, or a media server that
//! moved without a re-INVITE), so a stranger spraying packets at the port cannot inject audio
//! into a live stream nor turn our audio toward itself. A re-INVITE with a new SDP address
//! starts over. "Acceptable": from the SDP's IP when that is public; from anywhere when it
//! is private or unspecified (nothing better is known); RTCP only from the latched RTP
//! source's IP.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// How long the latched source must be silent before another may take its place.
pub const RELATCH_AFTER: Duration = Duration::from_secs(2);

/// The far end's RTP source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latched {
    /// Where its packets come from.
    pub from: SocketAddr,
    /// Its stream (for logs: a new source usually brings a new SSRC).
    pub ssrc: u32,
    /// Its last packet.
    pub last: Instant,
}

/// What became of one received packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// From the far end: pass it on.
    Accept,
    /// The first packet, or a new source after the old one's silence: the far end is now here.
    Latched {
        /// The previous source, if any.
        previous: Option<SocketAddr>,
    },
    /// Not the far end's: drop it.
    Refuse,
}

/// The latch of one RTP leg.
#[derive(Debug, Clone, Default)]
pub struct Latch {
    /// From the far end's SDP.
    remote: Option<SocketAddr>,
    latched: Option<Latched>,
    rtcp: Option<SocketAddr>,
    refused: u64,
}

impl Latch {
    /// The far end's address from its SDP; a new one (re-INVITE) starts over.
    pub fn set_remote(&mut self, addr: SocketAddr) {
        if self.remote != Some(addr) {
            self.remote = Some(addr);
            self.latched = None;
            self.rtcp = None;
        }
    }

    /// Where RTP goes: the latched source, else the SDP address.
    pub fn destination(&self) -> Option<SocketAddr> {
        self.latched.map(|l| l.from).or(self.remote)
    }

    /// Where RTCP goes: where the far end's RTCP comes from, else the RTP destination's port
    /// + 1 (RFC 3550 §11).
    pub fn rtcp_destination(&self) -> Option<SocketAddr> {
        self.rtcp.or_else(|| {
            self.destination()
                .map(|d| SocketAddr::new(d.ip(), d.port().wrapping_add(1)))
        })
    }

    /// The source latched onto, if any.
    pub fn latched(&self) -> Option<Latched> {
        self.latched
    }

    /// Packets refused so far (strangers, or a second source while the first is live).
    pub fn refused(&self) -> u64 {
        self.refused
    }

    fn plausible(&self, ip: IpAddr) -> bool {
        match self.remote {
            Some(r) => r.ip() == ip || !is_public(r.ip()),
            // An answer without an address is not bridged; nothing to go by yet.
            None => true,
        }
    }

    /// An RTP packet of stream `ssrc` from `from` at `now`.
    pub fn handle_rtp(&mut self, now: Instant, from: SocketAddr, ssrc: u32) -> Verdict {
        let plausible = self.plausible(from.ip());
        match &mut self.latched {
            Some(l) if l.from == from => {
                l.last = now;
                l.ssrc = ssrc;
                Verdict::Accept
            }
            Some(l) if now.saturating_duration_since(l.last) < RELATCH_AFTER => {
                self.refused += 1;
                Verdict::Refuse
            }
            _ if !plausible => {
                self.refused += 1;
                Verdict::Refuse
            }
            previous => {
                let previous = previous.map(|l| l.from);
                self.latched = Some(Latched {
                    from,
                    ssrc,
                    last: now,
                });
                if previous.is_some_and(|p| p.ip() != from.ip()) {
                    self.rtcp = None;
                }
                Verdict::Latched { previous }
            }
        }
    }

    /// Whether RTCP from `from` is the far end's: from the latched RTP source's IP (before
    /// any RTP: the SDP's IP, or anyone when that is private). If so, our reports go back
    /// there.
    pub fn handle_rtcp(&mut self, from: SocketAddr) -> bool {
        let ok = match (self.latched, self.remote) {
            (Some(l), _) => l.from.ip() == from.ip(),
            (None, Some(r)) => r.ip() == from.ip() || !is_public(r.ip()),
            (None, None) => false,
        };
        if ok {
            self.rtcp = Some(from);
        } else {
            self.refused += 1;
        }
        ok
    }
}

/// Whether `ip` is an address the internet routes (not private, loopback, link-local,
/// unspecified, or IPv6 unique-local).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_private() || v4.is_loopback() || v4.is_link_local() || v4.is_unspecified())
        }
        IpAddr::V6(v6) => {
            !(v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xfe00) == 0xfc00)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const MS: Duration = Duration::from_millis(1);

    /// Issue 15 item 6: with a private SDP address every packet used to re-latch, so a
    /// stranger's one packet turned the agent's audio toward it, and its packets were played
    /// to the agent.
    #[test]
    fn a_stranger_cannot_take_a_live_stream() {
        let t0 = Instant::now();
        let mut l = Latch::default();
        l.set_remote(a("10.0.0.5:4000"));
        let peer = a("203.0.113.7:31000");
        let stranger = a("198.51.100.9:5555");
        assert_eq!(
            l.handle_rtp(t0, peer, 1),
            Verdict::Latched { previous: None }
        );
        for i in 1..100 {
            let now = t0 + 20 * MS * i;
            assert_eq!(l.handle_rtp(now, stranger, 99), Verdict::Refuse);
            assert_eq!(l.handle_rtp(now, peer, 1), Verdict::Accept);
        }
        assert_eq!(l.destination(), Some(peer));
        assert_eq!(l.refused(), 99);
        // The stranger's RTCP is not taken either; the peer's is.
        assert!(!l.handle_rtcp(stranger));
        assert!(l.handle_rtcp(a("203.0.113.7:31001")));
        assert_eq!(l.rtcp_destination(), Some(a("203.0.113.7:31001")));
    }

    #[test]
    fn another_source_takes_over_only_after_the_latched_one_went_silent() {
        let t0 = Instant::now();
        let mut l = Latch::default();
        l.set_remote(a("0.0.0.0:4000"));
        let old = a("203.0.113.7:31000");
        let new = a("203.0.113.7:42000");
        l.handle_rtp(t0, old, 1);
        // NAT rebinding: the far end now sends from another port.
        let last = t0 + 100 * MS;
        assert_eq!(l.handle_rtp(last, old, 1), Verdict::Accept);
        assert_eq!(
            l.handle_rtp(last + RELATCH_AFTER - MS, new, 1),
            Verdict::Refuse
        );
        assert_eq!(
            l.handle_rtp(last + RELATCH_AFTER, new, 2),
            Verdict::Latched {
                previous: Some(old)
            }
        );
        assert_eq!(l.destination(), Some(new));
        assert_eq!(l.latched().map(|x| x.ssrc), Some(2));
        // And the old one is now the stranger.
        assert_eq!(
            l.handle_rtp(last + RELATCH_AFTER + MS, old, 1),
            Verdict::Refuse
        );
    }

    #[test]
    fn a_public_sdp_address_admits_only_that_ip_and_a_new_sdp_starts_over() {
        let t0 = Instant::now();
        let mut l = Latch::default();
        l.set_remote(a("203.0.113.7:4000"));
        assert_eq!(l.destination(), Some(a("203.0.113.7:4000")));
        assert_eq!(l.rtcp_destination(), Some(a("203.0.113.7:4001")));
        assert_eq!(l.handle_rtp(t0, a("198.51.100.9:4000"), 1), Verdict::Refuse);
        assert!(!l.handle_rtcp(a("198.51.100.9:4001")));
        assert_eq!(
            l.handle_rtp(t0, a("203.0.113.7:4002"), 1),
            Verdict::Latched { previous: None }
        );
        // Even after silence, a stranger's IP is no candidate.
        let later = t0 + RELATCH_AFTER * 3;
        assert_eq!(
            l.handle_rtp(later, a("198.51.100.9:4000"), 5),
            Verdict::Refuse
        );
        l.set_remote(a("203.0.113.8:6000"));
        assert_eq!(l.latched(), None);
        assert_eq!(l.destination(), Some(a("203.0.113.8:6000")));
    }

    #[test]
    fn public_and_private_addresses() {
        for ip in [
            "10.1.2.3",
            "192.168.0.1",
            "172.16.5.5",
            "127.0.0.1",
            "0.0.0.0",
            "169.254.1.1",
            "::1",
            "::",
            "fd00::1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["203.0.113.7", "8.8.8.8", "2001:db8::1"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }
}
