//! The RTP leg toward the SIP side: one even/odd UDP port pair per call from the configured range,
//! symmetric RTP (we send to where the peer's packets come from, which is what NAT'd providers
//! need), and the destination from the peer's SDP until the first packet arrives.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;

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
    next: u16,
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
                next: min,
                in_use: BTreeSet::new(),
            })),
        }
    }

    fn take_candidate(&self) -> Option<u16> {
        let mut s = self.inner.lock().ok()?;
        let pairs = usize::from(s.max.saturating_sub(s.min).div_ceil(2));
        for _ in 0..pairs {
            let p = s.next;
            s.next = if p.saturating_add(2) > s.max.saturating_sub(1) {
                s.min
            } else {
                p + 2
            };
            if !s.in_use.contains(&p) {
                s.in_use.insert(p);
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
    /// From the peer's SDP.
    remote: Option<SocketAddr>,
    /// Where the peer's packets actually come from (symmetric RTP).
    latched: Option<SocketAddr>,
    /// Where the peer's RTCP actually comes from.
    rtcp_latched: Option<SocketAddr>,
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
                        remote: None,
                        latched: None,
                        rtcp_latched: None,
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
        if self.remote != Some(addr) {
            self.remote = Some(addr);
            self.latched = None;
            self.rtcp_latched = None;
        }
    }

    /// Where we send: the latched source if any, else the SDP address.
    pub fn destination(&self) -> Option<SocketAddr> {
        self.latched.or(self.remote)
    }

    /// Sends one RTP packet; `false` when no destination is known yet.
    pub async fn send(&self, packet: &[u8]) -> bool {
        match self.destination() {
            Some(dest) => self.rtp.send_to(packet, dest).await.is_ok(),
            None => false,
        }
    }

    /// Receives the next RTP packet into `buf` (RTCP on the RTP port is skipped), latching onto
    /// its source. Returns the packet length.
    pub async fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let (n, from) = self.rtp.recv_from(buf).await?;
            let data = buf.get(..n).unwrap_or_default();
            if is_rtcp(data) || RtpPacket::parse(data).is_err() {
                continue;
            }
            // Latch only onto a source at the SDP's IP, or any source when the SDP address is
            // private/unspecified (the provider is behind NAT): a stranger cannot steal media.
            let acceptable = match self.remote {
                Some(r) => r.ip() == from.ip() || !is_public(r.ip()),
                None => true,
            };
            if acceptable {
                self.latched = Some(from);
                return Ok(n);
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
        let dest = self.rtcp_latched.or_else(|| {
            self.destination()
                .map(|d| SocketAddr::new(d.ip(), d.port().wrapping_add(1)))
        });
        match dest {
            Some(d) => self.rtcp.send_to(packet, d).await.is_ok(),
            None => false,
        }
    }

    /// The RTCP socket, to receive on while the leg is busy elsewhere.
    pub fn rtcp_socket(&self) -> std::sync::Arc<UdpSocket> {
        self.rtcp.clone()
    }

    /// Whether RTCP from `from` is the peer's (as for RTP: its SDP IP, or anyone when that is
    /// private); if so, later reports go back there (symmetric RTCP).
    pub fn accept_rtcp(&mut self, from: SocketAddr) -> bool {
        let ok = match self.remote {
            Some(r) => r.ip() == from.ip() || !is_public(r.ip()),
            None => false,
        };
        if ok {
            self.rtcp_latched = Some(from);
        }
        ok
    }
}

fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_private() || v4.is_loopback() || v4.is_link_local() || v4.is_unspecified())
        }
        IpAddr::V6(v6) => {
            !(v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xfe00) == 0xfc00)
        }
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
    }
}
