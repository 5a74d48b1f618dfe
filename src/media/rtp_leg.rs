//! The RTP leg toward the SIP side: one even/odd UDP port pair per call, picked at random from
//! the configured range (a stranger cannot guess the next call's port from the last), and
//! symmetric RTP through a [`Latch`] (we send to where the far end's packets come from, which
//! is what NAT'd providers need, and a second source cannot take a live stream).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;

use super::latch::{Latch, Verdict};
use super::rtp::{RtpPacket, is_rtcp};

/// Largest datagram accepted on a media socket.
pub const MAX_DATAGRAM: usize = 1500;

/// Ports handed out to calls, returned when a leg is dropped.
///
/// A std `Mutex` around a tiny set: taken only to pick or return a number, never across an
/// `.await`, shared by the call tasks that create legs (STYLE.md §3's documented exception).
#[derive(Debug, Clone)]
pub struct PortPool {
    inner: Arc<Mutex<PoolState>>,
}

#[derive(Debug)]
struct PoolState {
    min: u16,
    max: u16,
    in_use: BTreeSet<u16>,
}

/// Why a leg could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LegError {
    /// Every port pair of the range is in use or unbindable.
    #[error(
        "no free RTP port pair in {min}-{max} (raise media.rtp_port_max or lower the call count)"
    )]
    NoPorts {
        /// Range start.
        min: u16,
        /// Range end.
        max: u16,
    },
}

impl PortPool {
    /// Even ports `min..=max` (RTCP uses the odd port above each).
    pub fn new(min: u16, max: u16) -> PortPool {
        let min = min + min % 2;
        PortPool {
            inner: Arc::new(Mutex::new(PoolState {
                min,
                max,
                in_use: BTreeSet::new(),
            })),
        }
    }

    /// A free pair at a random place in the range (the first free one from a random start).
    fn take_candidate(&self) -> Option<u16> {
        // Unguessable is better, but a failing OS generator must not stop calls: then in order.
        let start = crate::rand::u64().unwrap_or(0);
        let mut s = self.inner.lock().ok()?;
        // Pairs p, p+1 with p even and p + 1 <= max.
        let pairs = u64::from(s.max.saturating_sub(s.min).saturating_add(1) / 2);
        if pairs == 0 {
            return None;
        }
        for i in 0..pairs {
            let index = (start.wrapping_add(i)) % pairs;
            let Ok(p) = u16::try_from(u64::from(s.min) + 2 * index) else {
                continue;
            };
            if s.in_use.insert(p) {
                return Some(p);
            }
        }
        None
    }

    fn release(&self, port: u16) {
        if let Ok(mut s) = self.inner.lock() {
            s.in_use.remove(&port);
        }
    }

    /// Ports currently handed out.
    pub fn in_use(&self) -> usize {
        self.inner.lock().map_or(0, |s| s.in_use.len())
    }

    fn range(&self) -> (u16, u16) {
        self.inner.lock().map_or((0, 0), |s| (s.min, s.max))
    }
}

/// A call's RTP/RTCP sockets. Dropping it frees the ports.
#[derive(Debug)]
pub struct RtpLeg {
    rtp: UdpSocket,
    rtcp: std::sync::Arc<UdpSocket>,
    port: u16,
    pool: PortPool,
    /// Which source is the far end, and where we send.
    latch: Latch,
}

impl RtpLeg {
    /// Opens a port pair on `ip` from `pool`.
    pub async fn open(pool: &PortPool, ip: IpAddr) -> Result<RtpLeg, LegError> {
        let (min, max) = pool.range();
        let attempts = usize::from(max.saturating_sub(min).div_ceil(2)).min(64);
        for _ in 0..attempts.max(1) {
            let Some(port) = pool.take_candidate() else {
                break;
            };
            let pair = async {
                let rtp = UdpSocket::bind(SocketAddr::new(ip, port)).await.ok()?;
                let rtcp = UdpSocket::bind(SocketAddr::new(ip, port + 1)).await.ok()?;
                Some((rtp, rtcp))
            };
            match pair.await {
                Some((rtp, rtcp)) => {
                    return Ok(RtpLeg {
                        rtp,
                        rtcp: std::sync::Arc::new(rtcp),
                        port,
                        pool: pool.clone(),
                        latch: Latch::default(),
                    });
                }
                // Taken by something else on this machine: try the next pair.
                None => pool.release(port),
            }
        }
        Err(LegError::NoPorts { min, max })
    }

    /// Our RTP port (for the SDP).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The peer's address from its SDP (re-INVITEs may change it: latching starts over).
    pub fn set_remote(&mut self, addr: SocketAddr) {
        self.latch.set_remote(addr);
    }

    /// Where we send: the latched source if any, else the SDP address.
    pub fn destination(&self) -> Option<SocketAddr> {
        self.latch.destination()
    }

    /// Packets refused as not the far end's (strangers, or a second source while the first
    /// is live).
    pub fn refused(&self) -> u64 {
        self.latch.refused()
    }

    /// Sends one RTP packet; `false` when no destination is known yet.
    pub async fn send(&self, packet: &[u8]) -> bool {
        match self.destination() {
            Some(dest) => self.rtp.send_to(packet, dest).await.is_ok(),
            None => false,
        }
    }

    /// Receives the next RTP packet of the far end into `buf` (RTCP on the RTP port and what
    /// the [`Latch`] refuses are skipped). Returns the packet length.
    pub async fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let (n, from) = self.rtp.recv_from(buf).await?;
            let data = buf.get(..n).unwrap_or_default();
            if is_rtcp(data) {
                continue;
            }
            let Ok(packet) = RtpPacket::parse(data) else {
                continue;
            };
            match self
                .latch
                .handle_rtp(std::time::Instant::now(), from, packet.ssrc)
            {
                Verdict::Accept => return Ok(n),
                Verdict::Latched { previous } => {
                    if let Some(previous) = previous {
                        tracing::info!(%previous, now = %from, "far end's RTP moved after its silence");
                    }
                    return Ok(n);
                }
                Verdict::Refuse => {}
            }
        }
    }

    /// The RTCP socket.
    pub fn rtcp(&self) -> &UdpSocket {
        &self.rtcp
    }

    /// Sends an RTCP packet: to where the peer's RTCP comes from, else to the RTP destination's
    /// port + 1 (RFC 3550 §11); `false` when no destination is known yet.
    pub async fn send_rtcp(&self, packet: &[u8]) -> bool {
        match self.latch.rtcp_destination() {
            Some(d) => self.rtcp.send_to(packet, d).await.is_ok(),
            None => false,
        }
    }

    /// The RTCP socket, to receive on while the leg is busy elsewhere.
    pub fn rtcp_socket(&self) -> std::sync::Arc<UdpSocket> {
        self.rtcp.clone()
    }

    /// Whether RTCP from `from` is the far end's (see [`Latch::handle_rtcp`]); if so, later
    /// reports go back there (symmetric RTCP).
    pub fn accept_rtcp(&mut self, from: SocketAddr) -> bool {
        self.latch.handle_rtcp(from)
    }
}

impl Drop for RtpLeg {
    fn drop(&mut self) {
        self.pool.release(self.port);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pairs_are_even_unique_and_returned() {
        let base = 42000 + (std::process::id() % 500) as u16 * 8;
        let pool = PortPool::new(base + 1, base + 6);
        let a = RtpLeg::open(&pool, "127.0.0.1".parse().unwrap())
            .await
            .unwrap();
        let b = RtpLeg::open(&pool, "127.0.0.1".parse().unwrap())
            .await
            .unwrap();
        assert!(a.port() % 2 == 0 && b.port() % 2 == 0 && a.port() != b.port());
        assert!(matches!(
            RtpLeg::open(&pool, "127.0.0.1".parse().unwrap()).await,
            Err(LegError::NoPorts { .. })
        ));
        assert_eq!(pool.in_use(), 2);
        drop(a);
        assert_eq!(pool.in_use(), 1);
        assert!(
            RtpLeg::open(&pool, "127.0.0.1".parse().unwrap())
                .await
                .is_ok()
        );
    }

    /// Issue 15 item 6: ports were handed out in order, so a stranger who saw one call's
    /// port knew the next one's.
    #[test]
    fn pairs_are_picked_at_random_and_all_used_before_refusing() {
        let pool = PortPool::new(40000, 40999);
        let picks: Vec<u16> = (0..500).map_while(|_| pool.take_candidate()).collect();
        assert_eq!(picks.len(), 500, "every pair of the range");
        assert!(
            picks
                .iter()
                .all(|p| p % 2 == 0 && (40000..=40998).contains(p))
        );
        let mut unique = picks.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), 500);
        assert_eq!(pool.take_candidate(), None);
        let in_order = picks.windows(2).filter(|w| w[1] == w[0] + 2).count();
        assert!(
            in_order < 250,
            "{in_order} of 499 picks followed the previous one"
        );
        pool.release(40500);
        assert_eq!(pool.take_candidate(), Some(40500));
        // An odd range end leaves no half pair.
        let tiny = PortPool::new(41001, 41003);
        assert_eq!(tiny.take_candidate(), Some(41002));
        assert_eq!(tiny.take_candidate(), None);
    }

    #[tokio::test]
    async fn latches_onto_the_real_source() {
        let base = 46000 + (std::process::id() % 500) as u16 * 4;
        let pool = PortPool::new(base, base + 3);
        let mut leg = RtpLeg::open(&pool, "127.0.0.1".parse().unwrap())
            .await
            .unwrap();
        // The SDP said port 9 (wrong, as behind NAT); packets come from elsewhere on the same IP.
        leg.set_remote("127.0.0.1:9".parse().unwrap());
        let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut pkt = Vec::new();
        RtpPacket {
            marker: false,
            payload_type: 0,
            sequence: 1,
            timestamp: 1,
            ssrc: 1,
            payload: &[1; 160],
        }
        .write(&mut pkt);
        peer.send_to(&[0x80, 200, 0, 1], ("127.0.0.1", leg.port()))
            .await
            .unwrap(); // RTCP: skipped
        peer.send_to(&pkt, ("127.0.0.1", leg.port())).await.unwrap();
        let mut buf = [0u8; MAX_DATAGRAM];
        assert_eq!(leg.recv(&mut buf).await.unwrap(), pkt.len());
        assert_eq!(leg.destination(), Some(peer.local_addr().unwrap()));
        assert!(leg.send(&pkt).await);
        let mut back = [0u8; 200];
        let (n, _) = peer.recv_from(&mut back).await.unwrap();
        assert_eq!(&back[..n], &pkt[..]);
        // A stranger's packet (127.0.0.1 is private, so its IP is plausible) is skipped, and
        // our audio keeps going to the peer.
        let stranger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        stranger
            .send_to(&pkt[..20], ("127.0.0.1", leg.port()))
            .await
            .unwrap();
        peer.send_to(&pkt, ("127.0.0.1", leg.port())).await.unwrap();
        assert_eq!(leg.recv(&mut buf).await.unwrap(), pkt.len());
        assert_eq!(leg.destination(), Some(peer.local_addr().unwrap()));
        assert_eq!(leg.refused(), 1);
    }
}
