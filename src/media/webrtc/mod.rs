//! The WebRTC leg toward the browser: the one module that touches the `webrtc` crate family
//! (pinned to 0.17.2, see shared/harness/NOTES.md), so the engine can be swapped later.
//!
//! callgate is ICE-lite (it has a public or known address; the browser is controlling and runs
//! the checks), so this module needs no ICE agent: it answers the browser's checks, runs DTLS
//! with the crate's `dtls` and encrypts with its `srtp` contexts. Audio only: PCMU, PCMA and
//! telephone-event/8000, so the SIP side needs no transcoding.
//!
//! All browsers share one UDP port by default. One reader task per port demultiplexes by the
//! browser's address (learned from checks that carry our ICE password, RFC 8445 §7.3) and hands
//! SRTP straight to the call's bridge, which decrypts it: one task hand-off per packet. Packets
//! toward the browser are encrypted and sent by the bridge itself. STUN and DTLS go to one small
//! task per leg, which also ends the leg when the browser closes DTLS or stops its consent
//! checks (RFC 7675).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use sha2::Digest;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use webrtc::dtls::config::{ClientAuthType, Config as DtlsConfig};
use webrtc::dtls::conn::DTLSConn;
use webrtc::dtls::crypto::Certificate;
use webrtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile;
use webrtc::srtp::context::Context;
use webrtc::srtp::protection_profile::ProtectionProfile;
use webrtc::util::Conn;

use super::rtp::{RtpPacket, is_rtcp};

mod ice;
mod sdp;

/// Entry points for the fuzz targets in `fuzz/` and their corpus replay.
#[doc(hidden)]
pub mod fuzz {
    /// The browser's SDP offer, as a leg reads it, and the answer callgate would give.
    pub fn offer(sdp: &str) {
        if let Ok(offer) = super::sdp::Offer::parse(sdp) {
            let _ = std::hint::black_box(offer.fuzz_answer());
        }
    }

    /// A datagram on the WebRTC port, as the demultiplexer and a leg read STUN.
    pub fn stun(pkt: &[u8]) {
        let _ = std::hint::black_box(super::ice::stun_ufrag(pkt));
        let ice = super::ice::Ice {
            ufrag: "ours".into(),
            pwd: "our-password-of-22-chars".into(),
        };
        let from = std::net::SocketAddr::from(([127, 0, 0, 1], 5000));
        let _ = std::hint::black_box(super::ice::check_reply(pkt, from, &ice, ""));
        let _ = std::hint::black_box(super::ice::check_reply(pkt, from, &ice, "theirs"));
    }
}

use ice::{Ice, check_reply, random_token, random_u32, stun_ufrag};
use sdp::{AnswerParts, Offer, Setup};

/// Receive buffer asked for the shared WebRTC port: at 500 calls it takes 25,000 packets/s, and
/// a busy machine may not read it for tens of milliseconds (the kernel caps the size at
/// `net.core.rmem_max`).
const MUX_RECV_BUFFER: usize = 4 * 1024 * 1024;
/// Below this the shared port is likely to drop packets under load: worth a warning.
const MUX_RECV_BUFFER_LOW: usize = 1024 * 1024;
/// Receive buffer of a port of its own (one call).
const CALL_RECV_BUFFER: usize = 256 * 1024;
/// Largest datagram read from a browser; longer ones are cut (and then fail authentication).
const MAX_DATAGRAM: usize = 2048;
/// The reader receives into blocks this large, split per packet (one allocation per ~100).
const RECV_BLOCK: usize = 64 * 1024;
/// SRTP packets queued toward one bridge (2.5 s of 20 ms audio); more are dropped.
const MEDIA_QUEUE: usize = 128;
/// STUN and DTLS packets queued toward one leg's task; more are dropped.
const CONTROL_QUEUE: usize = 32;
/// A leg whose browser has not completed ICE and DTLS by then is given up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A browser that stops its consent checks for this long is gone (RFC 7675 §5.1).
pub const CONSENT_TIMEOUT: Duration = Duration::from_secs(30);
/// SRTP replay window toward the bridge (RFC 3711 §3.3.2 asks for at least 64).
const REPLAY_WINDOW: usize = 64;
/// Largest SDP offer accepted from a browser.
pub const MAX_OFFER_BYTES: usize = 32 * 1024;

/// Why the WebRTC leg failed. Messages carry no SDP or keys.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WebRtcError {
    /// The media port could not be bound.
    #[error("cannot bind the WebRTC media port {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// OS error.
        source: std::io::Error,
    },
    /// The browser's offer is too large or not acceptable.
    #[error("bad SDP offer: {0}")]
    BadOffer(&'static str),
    /// The browser offered neither PCMU nor PCMA.
    #[error("the browser offered neither PCMU nor PCMA")]
    NoCommonCodec,
    /// The engine could not start (certificate, addresses) or a leg could not get a port.
    #[error("WebRTC engine error: {0}")]
    Engine(String),
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// IP and the single UDP port for all browser media.
    pub bind: SocketAddr,
    /// Public IP announced in ICE candidates when behind 1:1 NAT.
    pub public_ip: Option<IpAddr>,
    /// Offer loopback candidates (tests on 127.0.0.1 only).
    pub loopback: bool,
    /// One port per call from this range instead of the single `bind` port.
    pub port_range: Option<(u16, u16)>,
    /// A browser silent this long (no ICE consent checks) is gone: [`CONSENT_TIMEOUT`] but in
    /// tests.
    pub consent_timeout: Duration,
}

/// Where legs get their socket.
enum Ports {
    /// Every leg on the one port.
    Shared(Arc<Port>),
    /// A port per leg from `min..=max`, tried from `next` on.
    Range {
        ip: IpAddr,
        min: u16,
        max: u16,
        next: AtomicU32,
    },
}

/// The WebRTC engine: shared by all calls.
pub struct Engine {
    ports: Ports,
    /// One DTLS certificate for the process (its key never leaves it).
    cert: Certificate,
    /// Its SHA-256 fingerprint, as SDP writes it.
    fingerprint: String,
    /// Addresses announced as host candidates.
    candidates: Vec<IpAddr>,
    local: SocketAddr,
    consent_timeout: Duration,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("local", &self.local)
            .field("candidates", &self.candidates)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Binds the media port and builds the engine.
    pub async fn new(settings: &Settings) -> Result<Engine, WebRtcError> {
        let candidates = candidate_ips(settings);
        if candidates.is_empty() {
            return Err(WebRtcError::Engine(
                "no address to announce to browsers: set media.public_ip or media.listen_ip".into(),
            ));
        }
        let (ports, local) = match settings.port_range {
            Some((min, max)) if min > 0 && min <= max => (
                Ports::Range {
                    ip: settings.bind.ip(),
                    min,
                    max,
                    next: AtomicU32::new(0),
                },
                SocketAddr::new(settings.bind.ip(), min),
            ),
            Some((min, max)) => {
                return Err(WebRtcError::Engine(format!(
                    "bad WebRTC port range {min}-{max}"
                )));
            }
            None => {
                let socket = bind_udp(settings.bind, MUX_RECV_BUFFER).map_err(|source| {
                    WebRtcError::Bind {
                        addr: settings.bind,
                        source,
                    }
                })?;
                let got = socket2::SockRef::from(&socket)
                    .recv_buffer_size()
                    .unwrap_or(0)
                    / 2;
                if got < MUX_RECV_BUFFER_LOW {
                    tracing::warn!(
                        bytes = got,
                        "the shared WebRTC port's receive buffer is small and may drop packets \
                         under load; raise net.core.rmem_max (sysctl) to at least \
                         {MUX_RECV_BUFFER}"
                    );
                }
                let port = Port::new(socket).map_err(|source| WebRtcError::Bind {
                    addr: settings.bind,
                    source,
                })?;
                let local = port.local;
                (Ports::Shared(Arc::new(port)), local)
            }
        };
        let cert = Certificate::generate_self_signed(vec!["callgate".to_owned()])
            .map_err(|e| WebRtcError::Engine(format!("DTLS certificate: {e}")))?;
        let fingerprint = cert
            .certificate
            .first()
            .map(|der| hex_colons(&sha2::Sha256::digest(der.as_ref())))
            .ok_or_else(|| WebRtcError::Engine("DTLS certificate: empty chain".into()))?;
        Ok(Engine {
            ports,
            cert,
            fingerprint,
            candidates,
            local,
            consent_timeout: settings.consent_timeout,
        })
    }

    /// The media port's address (the first port of the range when there is one).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Answers a browser's offer: returns the leg and our SDP answer (ICE candidates included,
    /// so the browser needs no trickle from us).
    pub async fn answer(&self, offer: &str) -> Result<(Leg, String), WebRtcError> {
        if offer.len() > MAX_OFFER_BYTES {
            return Err(WebRtcError::BadOffer("larger than 32 KiB"));
        }
        let offer = Offer::parse(offer)?;
        let port = match &self.ports {
            Ports::Shared(p) => p.clone(),
            Ports::Range { ip, min, max, next } => Arc::new(bind_in_range(*ip, *min, *max, next)?),
        };
        let ssrc = random_u32()? | 1;
        let session = random_u32()?;
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let (media_tx, media_rx) = mpsc::channel(MEDIA_QUEUE);
        let route = Arc::new(Route {
            control: control_tx,
            media: media_tx,
        });
        let ice = port.register(&route)?;
        // RFC 5763 §5: the answerer should be the DTLS client, unless the browser insists.
        let we_are_client = offer.setup != Setup::Active;
        let answer = offer.answer(&AnswerParts {
            ice: &ice,
            fingerprint: &self.fingerprint,
            setup: if we_are_client { "active" } else { "passive" },
            candidates: &self.candidates,
            port: port.local.port(),
            ssrc,
            session,
        });
        let shared = Arc::new(Shared::default());
        let (close_tx, close_rx) = oneshot::channel();
        let task = tokio::spawn(
            LegTask {
                port: port.clone(),
                route,
                shared: shared.clone(),
                ice,
                remote_ufrag: offer.ufrag,
                fingerprints: offer.fingerprints,
                we_are_client,
                cert: self.cert.clone(),
                consent_timeout: self.consent_timeout,
            }
            .run(control_rx, close_rx),
        );
        Ok((
            Leg {
                media: media_rx,
                inbound: None,
                shared,
                ssrc,
                stop: Mutex::new(Some((close_tx, task))),
                port,
            },
            answer,
        ))
    }
}

/// The addresses to announce: the public IP, else the bound IP, else the machine's addresses;
/// loopback ones only when asked for (tests), link-local ones never.
fn candidate_ips(s: &Settings) -> Vec<IpAddr> {
    let bound = s.bind.ip();
    let mut ips: Vec<IpAddr> = match (s.public_ip, bound.is_unspecified()) {
        (Some(ip), _) => vec![ip],
        (None, false) => vec![bound],
        (None, true) => webrtc::util::ifaces::ifaces()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|i| i.addr.map(|a| a.ip()))
            .filter(|ip| bound.is_ipv6() || ip.is_ipv4())
            .collect(),
    };
    ips.retain(|ip| match ip {
        IpAddr::V4(v4) => !v4.is_link_local() && !v4.is_unspecified(),
        IpAddr::V6(v6) => !v6.is_unicast_link_local() && !v6.is_unspecified(),
    });
    if s.loopback {
        if (bound.is_unspecified() || bound.is_loopback()) && !ips.iter().any(IpAddr::is_loopback) {
            ips.push(if bound.is_ipv6() {
                IpAddr::V6(Ipv6Addr::LOCALHOST)
            } else {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            });
        }
    } else {
        ips.retain(|ip| !ip.is_loopback());
    }
    let mut seen = Vec::with_capacity(ips.len());
    ips.retain(|ip| {
        let new = !seen.contains(ip);
        seen.push(*ip);
        new
    });
    ips
}

/// Binds a UDP socket asking for `buffer` bytes of receive buffer (best effort: the kernel caps
/// it at net.core.rmem_max).
fn bind_udp(addr: SocketAddr, buffer: usize) -> std::io::Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    socket.set_nonblocking(true)?;
    let _ = socket.set_recv_buffer_size(buffer);
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// A port of its own for one leg, from the range (the next free one after the last given).
fn bind_in_range(ip: IpAddr, min: u16, max: u16, next: &AtomicU32) -> Result<Port, WebRtcError> {
    let span = u32::from(max - min) + 1;
    for _ in 0..span {
        let offset = next.fetch_add(1, Ordering::Relaxed) % span;
        let Ok(offset) = u16::try_from(offset) else {
            continue;
        };
        let addr = SocketAddr::new(ip, min + offset);
        if let Ok(socket) = bind_udp(addr, CALL_RECV_BUFFER) {
            return Port::new(socket).map_err(|source| WebRtcError::Bind { addr, source });
        }
    }
    Err(WebRtcError::Engine(format!(
        "no free WebRTC port in {min}-{max} (media.webrtc_port_min/max)"
    )))
}

/// A UDP port and the legs on it.
struct Port {
    socket: Arc<UdpSocket>,
    local: SocketAddr,
    table: Arc<Mutex<Table>>,
    reader: JoinHandle<()>,
}

impl Drop for Port {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Which leg a packet belongs to: by our ICE username fragment for checks, by the browser's
/// address (once a check from it proved it knows our password) for everything.
#[derive(Default)]
struct Table {
    by_ufrag: HashMap<String, Arc<Route>>,
    by_addr: HashMap<SocketAddr, Arc<Route>>,
}

/// One leg's inboxes.
struct Route {
    /// STUN and DTLS, with the sender's address.
    control: mpsc::Sender<(Bytes, SocketAddr)>,
    /// SRTP and SRTCP.
    media: mpsc::Sender<Bytes>,
}

impl Port {
    fn new(socket: UdpSocket) -> std::io::Result<Port> {
        let local = socket.local_addr()?;
        let socket = Arc::new(socket);
        let table = Arc::new(Mutex::new(Table::default()));
        let reader = tokio::spawn(demux(socket.clone(), table.clone()));
        Ok(Port {
            socket,
            local,
            table,
            reader,
        })
    }

    /// Gives `route` fresh ICE credentials on this port.
    fn register(&self, route: &Arc<Route>) -> Result<Ice, WebRtcError> {
        let mut t = self
            .table
            .lock()
            .map_err(|_| WebRtcError::Engine("media table poisoned".into()))?;
        loop {
            let ufrag = random_token(16)?;
            if !t.by_ufrag.contains_key(&ufrag) {
                t.by_ufrag.insert(ufrag.clone(), route.clone());
                return Ok(Ice {
                    ufrag,
                    pwd: random_token(24)?,
                });
            }
        }
    }

    /// Routes the browser's address to `route`.
    fn learn(&self, from: SocketAddr, route: &Arc<Route>) {
        if let Ok(mut t) = self.table.lock() {
            if !t.by_addr.get(&from).is_some_and(|r| Arc::ptr_eq(r, route)) {
                t.by_addr.insert(from, route.clone());
            }
        }
    }

    /// Removes every trace of `route` (its inboxes close once the leg's task lets go).
    fn forget(&self, route: &Arc<Route>) {
        if let Ok(mut t) = self.table.lock() {
            t.by_ufrag.retain(|_, r| !Arc::ptr_eq(r, route));
            t.by_addr.retain(|_, r| !Arc::ptr_eq(r, route));
        }
    }
}

/// Reads a port: RFC 7983 demultiplexing by first byte, then by address or ICE username.
async fn demux(socket: Arc<UdpSocket>, table: Arc<Mutex<Table>>) {
    let mut buf = BytesMut::with_capacity(RECV_BLOCK);
    loop {
        if buf.capacity() < MAX_DATAGRAM {
            buf = BytesMut::with_capacity(RECV_BLOCK);
        }
        let from = match socket.recv_buf_from(&mut buf).await {
            Ok((_, from)) => from,
            Err(e) => {
                tracing::debug!(error = %e, "WebRTC port read failed");
                buf.clear();
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let pkt = buf.split().freeze();
        let Ok(t) = table.lock() else { return };
        match pkt.first() {
            Some(128..=191) => {
                if let Some(r) = t.by_addr.get(&from) {
                    let _ = r.media.try_send(pkt);
                }
            }
            Some(20..=63) => {
                if let Some(r) = t.by_addr.get(&from) {
                    let _ = r.control.try_send((pkt, from));
                }
            }
            Some(0..=3) => {
                if let Some(r) = stun_ufrag(&pkt).and_then(|u| t.by_ufrag.get(u)) {
                    let _ = r.control.try_send((pkt, from));
                }
            }
            _ => {}
        }
    }
}

/// What the leg's task shares with the bridge.
#[derive(Default)]
struct Shared {
    out: Mutex<Out>,
    /// The inbound SRTP context, for the bridge to take once DTLS is up.
    inbound: Mutex<Option<Box<Context>>>,
}

/// Toward the browser.
#[derive(Default)]
struct Out {
    /// The browser's nominated address (or where its DTLS came from).
    to: Option<SocketAddr>,
    /// Set once DTLS is up.
    srtp: Option<Context>,
    /// The plain packet being built (kept to save an allocation per packet).
    plain: Vec<u8>,
}

impl Shared {
    fn target(&self) -> Option<SocketAddr> {
        self.out.lock().ok().and_then(|o| o.to)
    }

    fn set_target(&self, to: SocketAddr) {
        if let Ok(mut o) = self.out.lock() {
            o.to = Some(to);
        }
    }
}

/// One browser's media: RTP in (decrypted here) and out (encrypted here).
pub struct Leg {
    media: mpsc::Receiver<Bytes>,
    /// Boxed: the leg is moved around in call state and should stay small.
    inbound: Option<Box<Context>>,
    shared: Arc<Shared>,
    ssrc: u32,
    /// Ends the leg's task (dropping the sender does too) and waits for it.
    stop: Mutex<Option<(oneshot::Sender<()>, JoinHandle<()>)>>,
    /// Its port (a port of its own is released with the leg).
    port: Arc<Port>,
}

impl std::fmt::Debug for Leg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leg")
            .field("ssrc", &self.ssrc)
            .finish_non_exhaustive()
    }
}

/// One packet from the browser (decrypted).
#[derive(Debug)]
pub struct Inbound {
    plain: Bytes,
    marker: bool,
    payload_type: u8,
    sequence: u16,
    timestamp: u32,
    ssrc: u32,
    payload: std::ops::Range<usize>,
}

impl Inbound {
    /// The packet's fields (padding and extensions already removed).
    pub fn packet(&self) -> RtpPacket<'_> {
        RtpPacket {
            marker: self.marker,
            payload_type: self.payload_type,
            sequence: self.sequence,
            timestamp: self.timestamp,
            ssrc: self.ssrc,
            payload: self.plain.get(self.payload.clone()).unwrap_or_default(),
        }
    }

    fn new(plain: Bytes) -> Option<Inbound> {
        let p = RtpPacket::parse(&plain).ok()?;
        let start = p.payload.as_ptr() as usize - plain.as_ptr() as usize;
        let payload = start..start + p.payload.len();
        Some(Inbound {
            marker: p.marker,
            payload_type: p.payload_type,
            sequence: p.sequence,
            timestamp: p.timestamp,
            ssrc: p.ssrc,
            payload,
            plain,
        })
    }
}

impl Leg {
    /// Sends one RTP packet to the browser with its payload type, sequence number and
    /// timestamp, under the SSRC the answer announced. Dropped (`Ok`) until DTLS is up. The
    /// future does not borrow the leg.
    pub fn send_rtp(
        &self,
        packet: &RtpPacket<'_>,
    ) -> impl Future<Output = Result<(), WebRtcError>> + Send + 'static {
        let sealed = self.seal(|srtp, plain| {
            RtpPacket {
                ssrc: self.ssrc,
                ..*packet
            }
            .write(plain);
            srtp.encrypt_rtp(plain)
                .map_err(|e| WebRtcError::Engine(format!("SRTP: {e}")))
        });
        send_sealed(self.port.socket.clone(), sealed)
    }

    /// The SSRC this leg sends under (the answer's `a=ssrc`).
    pub fn ssrc(&self) -> u32 {
        self.ssrc
    }

    /// Sends a compound RTCP packet to the browser (SRTCP); dropped (`Ok`) until DTLS is up.
    pub fn send_rtcp(
        &self,
        plain: &[u8],
    ) -> impl Future<Output = Result<(), WebRtcError>> + Send + 'static {
        let sealed = self.seal(|srtp, _| {
            srtp.encrypt_rtcp(plain)
                .map_err(|e| WebRtcError::Engine(format!("SRTCP: {e}")))
        });
        send_sealed(self.port.socket.clone(), sealed)
    }

    /// A packet sealed with the leg's outbound SRTP context (`seal` gets it and the leg's
    /// plain-packet buffer), with the browser's address; `None` until DTLS is up.
    fn seal(
        &self,
        seal: impl FnOnce(&mut Context, &mut Vec<u8>) -> Result<Bytes, WebRtcError>,
    ) -> Option<Result<(Bytes, SocketAddr), WebRtcError>> {
        self.shared.out.lock().ok().and_then(|mut o| {
            let Out { to, srtp, plain } = &mut *o;
            let (to, srtp) = (*to.as_ref()?, srtp.as_mut()?);
            Some(seal(srtp, plain).map(|b| (b, to)))
        })
    }

    /// The next RTP packet from the browser; `None` once the browser is gone (DTLS closed,
    /// consent lost, never connected) or the leg closed. Cancel safe.
    pub async fn recv_rtp(&mut self) -> Option<Inbound> {
        loop {
            let pkt = self.media.recv().await?;
            // The browser's RTCP reports are not used.
            if is_rtcp(&pkt) {
                continue;
            }
            if self.inbound.is_none() {
                self.inbound = self.shared.inbound.lock().ok().and_then(|mut i| i.take());
            }
            let Some(ctx) = self.inbound.as_mut() else {
                continue;
            };
            if let Some(p) = ctx.decrypt_rtp(&pkt).ok().and_then(Inbound::new) {
                return Some(p);
            }
        }
    }

    /// Drops what the browser sent and nobody read yet (up to 2.5 s queue while a call rings
    /// before its bridge runs); returns how many packets.
    pub fn discard_pending(&mut self) -> usize {
        let mut n = 0;
        while self.media.try_recv().is_ok() {
            n += 1;
        }
        n
    }

    /// Ends the leg: DTLS closed toward the browser, its routes and task released.
    pub fn close(&self) -> impl Future<Output = ()> + Send + 'static {
        let stop = self.stop.lock().ok().and_then(|mut s| s.take());
        async move {
            if let Some((tx, task)) = stop {
                let _ = tx.send(());
                let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
            }
        }
    }
}

/// Sends what [`Leg::seal`] sealed (nothing: not connected yet).
async fn send_sealed(
    socket: Arc<UdpSocket>,
    sealed: Option<Result<(Bytes, SocketAddr), WebRtcError>>,
) -> Result<(), WebRtcError> {
    match sealed {
        Some(Ok((b, to))) => socket
            .send_to(&b, to)
            .await
            .map(|_| ())
            .map_err(|e| WebRtcError::Engine(format!("send to the browser: {e}"))),
        Some(Err(e)) => Err(e),
        None => Ok(()),
    }
}

/// The leg's side work: answers checks, runs DTLS, watches consent.
struct LegTask {
    port: Arc<Port>,
    route: Arc<Route>,
    shared: Arc<Shared>,
    ice: Ice,
    remote_ufrag: String,
    fingerprints: Vec<(String, String)>,
    we_are_client: bool,
    cert: Certificate,
    consent_timeout: Duration,
}

/// A DTLS handshake in progress.
type Handshake = Pin<Box<dyn Future<Output = Result<DTLSConn, webrtc::dtls::Error>> + Send>>;
/// Waits for the browser to close DTLS.
type Watch = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Awaits `f` if there is one, else never.
async fn maybe<F: Future + Unpin>(f: &mut Option<F>) -> F::Output {
    match f.as_mut() {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

impl LegTask {
    async fn run(
        self,
        mut control: mpsc::Receiver<(Bytes, SocketAddr)>,
        mut close: oneshot::Receiver<()>,
    ) {
        let started = Instant::now();
        let mut last_check: Option<Instant> = None;
        let (dtls_tx, dtls_rx) = mpsc::channel::<Bytes>(CONTROL_QUEUE);
        let mut dtls_rx = Some(dtls_rx);
        let mut handshake: Option<Handshake> = None;
        let mut conn: Option<Arc<DTLSConn>> = None;
        let mut watch: Option<Watch> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let why = loop {
            // The DTLS client starts once it knows where the browser is; a server waits.
            if handshake.is_none()
                && (!self.we_are_client || self.shared.target().is_some())
                && let Some(rx) = dtls_rx.take()
            {
                handshake = Some(self.handshake(rx));
            }
            tokio::select! {
                biased;
                _ = &mut close => break "closed",
                m = control.recv() => {
                    let Some((pkt, from)) = m else { break "closed" };
                    if pkt.first().is_some_and(|b| *b < 4) {
                        if self.on_check(&pkt, from).await {
                            last_check = Some(Instant::now());
                        }
                    } else {
                        // DTLS from a checked address: a passive side learns where to answer.
                        if self.shared.target().is_none() {
                            self.shared.set_target(from);
                        }
                        let _ = dtls_tx.try_send(pkt);
                    }
                }
                r = maybe(&mut handshake) => {
                    handshake = None;
                    let c = match r {
                        Ok(c) => Arc::new(c),
                        Err(e) => {
                            tracing::debug!(error = %e, "DTLS handshake with the browser failed");
                            break "DTLS failed";
                        }
                    };
                    conn = Some(c.clone());
                    match self.keys(&c).await {
                        Ok((inbound, out)) => {
                            if let Ok(mut i) = self.shared.inbound.lock() {
                                *i = Some(Box::new(inbound));
                            }
                            if let Ok(mut o) = self.shared.out.lock() {
                                o.srtp = Some(out);
                            }
                            tracing::debug!("browser media connected (ICE-lite, DTLS-SRTP)");
                            watch = Some(Box::pin(async move {
                                let mut b = vec![0u8; MAX_DATAGRAM];
                                while c.read(&mut b, None).await.is_ok() {}
                            }));
                        }
                        Err(e) => {
                            tracing::info!(error = %e, "browser DTLS refused");
                            break "DTLS refused";
                        }
                    }
                }
                _ = maybe(&mut watch) => break "the browser closed DTLS",
                _ = tick.tick() => {
                    let now = Instant::now();
                    if conn.is_none() && now.duration_since(started) > CONNECT_TIMEOUT {
                        break "no ICE and DTLS within 30 s";
                    }
                    if last_check.is_some_and(|t| now.duration_since(t) > self.consent_timeout) {
                        break "consent lost (no checks from the browser)";
                    }
                }
            }
        };
        tracing::debug!(reason = why, "browser media leg ended");
        // The bridge's inbox closes with the last route (this task's, below).
        self.port.forget(&self.route);
        drop(watch);
        drop(handshake);
        if let Some(c) = conn {
            let _ = tokio::time::timeout(Duration::from_secs(1), c.close()).await;
        }
    }

    /// Answers a binding request that carries our credentials; routes its sender to this leg.
    /// Returns whether it was one.
    async fn on_check(&self, pkt: &[u8], from: SocketAddr) -> bool {
        let Some((reply, nominated)) = check_reply(pkt, from, &self.ice, &self.remote_ufrag) else {
            return false;
        };
        self.port.learn(from, &self.route);
        if nominated && self.shared.target() != Some(from) {
            tracing::debug!(browser = %from, "ICE pair nominated");
            self.shared.set_target(from);
        }
        let _ = self.port.socket.send_to(&reply, from).await;
        true
    }

    fn handshake(&self, rx: mpsc::Receiver<Bytes>) -> Handshake {
        let pipe: Arc<dyn Conn + Send + Sync> = Arc::new(DtlsPipe {
            socket: self.port.socket.clone(),
            local: self.port.local,
            shared: self.shared.clone(),
            rx: tokio::sync::Mutex::new(rx),
        });
        let config = DtlsConfig {
            certificates: vec![self.cert.clone()],
            srtp_protection_profiles: vec![
                SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm,
                SrtpProtectionProfile::Srtp_Aead_Aes_256_Gcm,
                SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80,
                SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_32,
            ],
            client_auth: ClientAuthType::RequireAnyClientCert,
            // Self-signed on both sides: the fingerprint from the offer is checked instead.
            insecure_skip_verify: true,
            ..Default::default()
        };
        Box::pin(DTLSConn::new(pipe, config, self.we_are_client, None))
    }

    /// Checks the browser's certificate against the offer and derives the SRTP contexts
    /// (inbound, outbound).
    async fn keys(&self, c: &DTLSConn) -> Result<(Context, Context), String> {
        let profile = match c.selected_srtpprotection_profile() {
            SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm => ProtectionProfile::AeadAes128Gcm,
            SrtpProtectionProfile::Srtp_Aead_Aes_256_Gcm => ProtectionProfile::AeadAes256Gcm,
            SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80 => {
                ProtectionProfile::Aes128CmHmacSha1_80
            }
            SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_32 => {
                ProtectionProfile::Aes128CmHmacSha1_32
            }
            _ => return Err("no SRTP profile agreed".into()),
        };
        let state = c.connection_state().await;
        let cert = state
            .peer_certificates
            .first()
            .ok_or("the browser sent no certificate")?;
        if !fingerprint_matches(cert, &self.fingerprints) {
            return Err("the browser's certificate does not match its SDP fingerprint".into());
        }
        let mut cfg = webrtc::srtp::config::Config {
            profile,
            ..Default::default()
        };
        cfg.extract_session_keys_from_dtls(state, self.we_are_client)
            .await
            .map_err(|e| format!("SRTP keys: {e}"))?;
        let k = &cfg.keys;
        let inbound = Context::new(
            &k.remote_master_key,
            &k.remote_master_salt,
            profile,
            Some(webrtc::srtp::option::srtp_replay_protection(REPLAY_WINDOW)),
            None,
        )
        .map_err(|e| format!("SRTP: {e}"))?;
        let outbound = Context::new(
            &k.local_master_key,
            &k.local_master_salt,
            profile,
            None,
            None,
        )
        .map_err(|e| format!("SRTP: {e}"))?;
        Ok((inbound, outbound))
    }
}

/// Whether `cert` (DER) has one of the offered fingerprints (sha-256, -384 or -512).
fn fingerprint_matches(cert: &[u8], offered: &[(String, String)]) -> bool {
    offered.iter().any(|(alg, value)| {
        let ours = match alg.to_ascii_lowercase().as_str() {
            "sha-256" => hex_colons(&sha2::Sha256::digest(cert)),
            "sha-384" => hex_colons(&sha2::Sha384::digest(cert)),
            "sha-512" => hex_colons(&sha2::Sha512::digest(cert)),
            _ => return false,
        };
        ours.eq_ignore_ascii_case(value)
    })
}

fn hex_colons(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 3);
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            s.push(':');
        }
        s.push_str(&format!("{b:02X}"));
    }
    s
}

/// The DTLS connection's view of the socket: records the leg's task routed to it in, datagrams
/// out to the browser's address.
struct DtlsPipe {
    socket: Arc<UdpSocket>,
    local: SocketAddr,
    shared: Arc<Shared>,
    rx: tokio::sync::Mutex<mpsc::Receiver<Bytes>>,
}

#[async_trait::async_trait]
impl Conn for DtlsPipe {
    async fn connect(&self, _addr: SocketAddr) -> webrtc::util::Result<()> {
        Ok(())
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc::util::Result<usize> {
        let pkt = self
            .rx
            .lock()
            .await
            .recv()
            .await
            .ok_or(webrtc::util::Error::ErrClosedListener)?;
        let n = pkt.len().min(buf.len());
        buf[..n].copy_from_slice(&pkt[..n]);
        Ok(n)
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc::util::Result<(usize, SocketAddr)> {
        let n = self.recv(buf).await?;
        Ok((n, self.shared.target().unwrap_or(self.local)))
    }

    async fn send(&self, buf: &[u8]) -> webrtc::util::Result<usize> {
        match self.shared.target() {
            Some(to) => Ok(self.socket.send_to(buf, to).await?),
            None => Ok(buf.len()),
        }
    }

    async fn send_to(&self, buf: &[u8], _target: SocketAddr) -> webrtc::util::Result<usize> {
        self.send(buf).await
    }

    fn local_addr(&self) -> webrtc::util::Result<SocketAddr> {
        Ok(self.local)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        self.shared.target()
    }

    async fn close(&self) -> webrtc::util::Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_shared_port_gets_a_large_receive_buffer() {
        let socket = bind_udp("127.0.0.1:0".parse().expect("addr"), MUX_RECV_BUFFER).expect("bind");
        let got = socket2::SockRef::from(&socket)
            .recv_buffer_size()
            .expect("SO_RCVBUF");
        // The kernel grants up to net.core.rmem_max and reports twice what it keeps.
        let max = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(MUX_RECV_BUFFER);
        assert!(
            got / 2 >= MUX_RECV_BUFFER.min(max),
            "receive buffer {got} (rmem_max {max})"
        );
    }

    fn settings(bind: &str, public: Option<&str>, loopback: bool) -> Settings {
        Settings {
            bind: bind.parse().expect("addr"),
            public_ip: public.map(|p| p.parse().expect("ip")),
            loopback,
            port_range: None,
            consent_timeout: CONSENT_TIMEOUT,
        }
    }

    #[test]
    fn candidates_are_the_public_or_bound_address_and_loopback_only_when_asked() {
        let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
        assert_eq!(
            candidate_ips(&settings("10.0.0.5:10000", Some("203.0.113.9"), false)),
            vec![ip("203.0.113.9")]
        );
        assert_eq!(
            candidate_ips(&settings("10.0.0.5:10000", None, false)),
            vec![ip("10.0.0.5")]
        );
        assert_eq!(
            candidate_ips(&settings("127.0.0.1:10000", None, true)),
            vec![ip("127.0.0.1")]
        );
        assert!(candidate_ips(&settings("127.0.0.1:10000", None, false)).is_empty());
        let any = candidate_ips(&settings("0.0.0.0:10000", None, false));
        assert!(
            any.iter()
                .all(|a| a.is_ipv4() && !a.is_loopback() && !a.is_unspecified()),
            "{any:?}"
        );
    }

    #[test]
    fn the_certificate_must_match_an_offered_fingerprint() {
        let der = b"not really DER, but hashed all the same";
        let fp = hex_colons(&sha2::Sha256::digest(der));
        let offered = |alg: &str, v: &str| vec![(alg.to_owned(), v.to_owned())];
        assert!(fingerprint_matches(der, &offered("sha-256", &fp)));
        assert!(fingerprint_matches(
            der,
            &offered("SHA-256", &fp.to_lowercase())
        ));
        let fp512 = hex_colons(&sha2::Sha512::digest(der));
        assert!(fingerprint_matches(der, &offered("sha-512", &fp512)));
        assert!(!fingerprint_matches(der, &offered("sha-256", &fp512)));
        assert!(!fingerprint_matches(der, &offered("sha-1", &fp)));
        assert!(!fingerprint_matches(
            b"another certificate",
            &offered("sha-256", &fp)
        ));
        assert!(!fingerprint_matches(der, &[]));
    }
}
