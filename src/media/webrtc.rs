//! The WebRTC leg toward the browser: the one module that touches the `webrtc` crate (pinned to
//! 0.17.2, see shared/harness/NOTES.md), so the engine can be swapped later.
//!
//! All browsers share one UDP port (an ICE UDP mux); callgate is ICE-lite (it has a public or
//! known address; the browser is controlling). Audio only: PCMU, PCMA and telephone-event/8000,
//! so the SIP side needs no transcoding. The crate's callbacks are turned into channel messages.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::oneshot;
use webrtc::api::media_engine::{
    MIME_TYPE_PCMA, MIME_TYPE_PCMU, MIME_TYPE_TELEPHONE_EVENT, MediaEngine,
};
use webrtc::api::setting_engine::SettingEngine;
use webrtc::api::{API, APIBuilder};
use webrtc::ice::udp_mux::{UDPMuxDefault, UDPMuxParams};
use webrtc::ice::udp_network::UDPNetwork;
use webrtc::ice_transport::ice_candidate_type::RTCIceCandidateType;
use webrtc::peer_connection::RTCPeerConnection;
use webrtc::peer_connection::configuration::RTCConfiguration;
use webrtc::peer_connection::sdp::session_description::RTCSessionDescription;
use webrtc::rtp_transceiver::rtp_codec::{
    RTCRtpCodecCapability, RTCRtpCodecParameters, RTPCodecType,
};
use webrtc::track::track_local::{TrackLocal, TrackLocalContext, TrackLocalWriter};
use webrtc::track::track_remote::TrackRemote;

use super::rtp::RtpPacket;

/// Receive buffer asked for the shared WebRTC port: at 500 calls it takes 25,000 packets/s, and
/// a busy machine may not read it for tens of milliseconds (the kernel caps the size at
/// `net.core.rmem_max`).
const MUX_RECV_BUFFER: usize = 4 * 1024 * 1024;
/// Below this the shared port is likely to drop packets under load: worth a warning.
const MUX_RECV_BUFFER_LOW: usize = 1024 * 1024;
/// Largest RTP packet read from the browser.
const RECEIVE_MTU: usize = 1500;
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
    /// The engine refused (no common codec, ICE/DTLS setup failed, ...).
    #[error("WebRTC engine error: {0}")]
    Engine(String),
}

fn engine_err(e: webrtc::Error) -> WebRtcError {
    WebRtcError::Engine(e.to_string())
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
}

/// The WebRTC engine: shared by all calls.
pub struct Engine {
    api: API,
    local: SocketAddr,
}

fn audio_codec(mime: &str, pt: u8, fmtp: &str) -> RTCRtpCodecParameters {
    RTCRtpCodecParameters {
        capability: RTCRtpCodecCapability {
            mime_type: mime.to_owned(),
            clock_rate: 8000,
            channels: 1,
            sdp_fmtp_line: fmtp.to_owned(),
            rtcp_feedback: vec![],
        },
        payload_type: pt,
        ..Default::default()
    }
}

impl Engine {
    /// Binds the media port and builds the engine.
    pub async fn new(settings: &Settings) -> Result<Engine, WebRtcError> {
        let mut se = SettingEngine::default();
        let local = match settings.port_range {
            Some((min, max)) => {
                let range = webrtc::ice::udp_network::EphemeralUDP::new(min, max).map_err(|e| {
                    WebRtcError::Engine(format!("WebRTC port range {min}-{max}: {e}"))
                })?;
                se.set_udp_network(UDPNetwork::Ephemeral(range));
                SocketAddr::new(settings.bind.ip(), min)
            }
            None => {
                let socket = bind_mux(settings.bind).map_err(|source| WebRtcError::Bind {
                    addr: settings.bind,
                    source,
                })?;
                let local = socket.local_addr().map_err(|source| WebRtcError::Bind {
                    addr: settings.bind,
                    source,
                })?;
                let mux = UDPMuxDefault::new(UDPMuxParams::new(socket));
                se.set_udp_network(UDPNetwork::Muxed(mux));
                local
            }
        };
        se.set_lite(true);
        // No mDNS: the browser's `.local` candidates need no resolving, since an ICE-lite agent
        // learns the browser's address from its checks. Left on, every call would open a
        // multicast socket on port 5353 (with a 64 KiB buffer) and query the LAN.
        se.set_ice_multicast_dns_mode(webrtc::ice::mdns::MulticastDnsMode::Disabled);
        if let Some(ip) = settings.public_ip {
            se.set_nat_1to1_ips(vec![ip.to_string()], RTCIceCandidateType::Host);
        }
        // Only advertise the address the mux is bound to (NOTES: else it lists every interface).
        let bound = settings.bind.ip();
        se.set_ip_filter(Box::new(move |ip| bound.is_unspecified() || ip == bound));
        se.set_include_loopback_candidate(settings.loopback);
        let mut m = MediaEngine::default();
        for c in [
            audio_codec(MIME_TYPE_PCMU, 0, ""),
            audio_codec(MIME_TYPE_PCMA, 8, ""),
            audio_codec(MIME_TYPE_TELEPHONE_EVENT, 101, "0-16"),
        ] {
            m.register_codec(c, RTPCodecType::Audio)
                .map_err(engine_err)?;
        }
        let api = APIBuilder::new()
            .with_media_engine(m)
            .with_setting_engine(se)
            .build();
        Ok(Engine { api, local })
    }

    /// The media port's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Answers a browser's offer: returns the leg and our SDP answer (ICE candidates included,
    /// so the browser needs no trickle from us).
    pub async fn answer(&self, offer: &str) -> Result<(Leg, String), WebRtcError> {
        if offer.len() > MAX_OFFER_BYTES {
            return Err(WebRtcError::BadOffer("larger than 32 KiB"));
        }
        let pc = Arc::new(
            self.api
                .new_peer_connection(RTCConfiguration::default())
                .await
                .map_err(engine_err)?,
        );
        let track = Arc::new(Outbound::default());
        // Before the remote description, or the answer says recvonly (NOTES).
        pc.add_track(track.clone()).await.map_err(engine_err)?;
        // The browser's track is read by the bridge itself (no task or queue in between).
        let (tx, rx) = oneshot::channel::<Arc<TrackRemote>>();
        let tx = Mutex::new(Some(tx));
        pc.on_track(Box::new(move |remote, _receiver, _transceiver| {
            if let Some(tx) = tx.lock().ok().and_then(|mut t| t.take()) {
                let _ = tx.send(remote);
            }
            Box::pin(async {})
        }));
        let offer = RTCSessionDescription::offer(offer.to_owned())
            .map_err(|_| WebRtcError::BadOffer("not an SDP offer"))?;
        pc.set_remote_description(offer).await.map_err(engine_err)?;
        let answer = pc.create_answer(None).await.map_err(engine_err)?;
        let mut gathered = pc.gathering_complete_promise().await;
        pc.set_local_description(answer).await.map_err(engine_err)?;
        let _ = gathered.recv().await;
        let sdp = pc
            .local_description()
            .await
            .map(|d| d.sdp)
            .ok_or_else(|| WebRtcError::Engine("no local description".into()))?;
        Ok((
            Leg {
                pc,
                track,
                remote: Remote::Waiting(rx),
                reading: None,
            },
            sdp,
        ))
    }
}

/// Binds the shared WebRTC port with a large receive buffer.
fn bind_mux(addr: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    socket.set_nonblocking(true)?;
    // Best effort: the kernel caps it at net.core.rmem_max (and reports twice what it keeps).
    let _ = socket.set_recv_buffer_size(MUX_RECV_BUFFER);
    let got = socket.recv_buffer_size().unwrap_or(0) / 2;
    if got < MUX_RECV_BUFFER_LOW {
        tracing::warn!(
            bytes = got,
            "the shared WebRTC port's receive buffer is small and may drop packets under load; \
             raise net.core.rmem_max (sysctl) to at least {MUX_RECV_BUFFER}"
        );
    }
    socket.bind(&addr.into())?;
    tokio::net::UdpSocket::from_std(socket.into())
}

/// A future reading the browser's next packet.
type Reading = Pin<Box<dyn Future<Output = Option<webrtc::rtp::packet::Packet>> + Send>>;

/// The browser's track: announced by the engine once ICE and DTLS are up.
enum Remote {
    Waiting(oneshot::Receiver<Arc<TrackRemote>>),
    Ready(Arc<TrackRemote>),
    Gone,
}

/// One browser's media: RTP in (decrypted) and out (encrypted by the engine).
pub struct Leg {
    pc: Arc<RTCPeerConnection>,
    track: Arc<Outbound>,
    remote: Remote,
    /// The read in progress, kept across `recv_rtp` calls: the engine's read is not cancel
    /// safe, so a `select!` that drops `recv_rtp` must not drop the read.
    reading: Option<Reading>,
}

impl Drop for Leg {
    /// A leg dropped without [`Leg::close`] (an order that reached an ended bridge, an error
    /// path) still releases its connection.
    fn drop(&mut self) {
        if self.track.closed.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let pc = self.pc.clone();
            rt.spawn(async move {
                let _ = pc.close().await;
            });
        }
    }
}

/// One packet from the browser (decrypted).
#[derive(Debug)]
pub struct Inbound(webrtc::rtp::packet::Packet);

impl Inbound {
    /// The packet's fields (padding and extensions already removed).
    pub fn packet(&self) -> RtpPacket<'_> {
        let h = &self.0.header;
        RtpPacket {
            marker: h.marker,
            payload_type: h.payload_type,
            sequence: h.sequence_number,
            timestamp: h.timestamp,
            ssrc: h.ssrc,
            payload: &self.0.payload,
        }
    }
}

/// Where the bridge's packets go toward the browser: the sender's one binding. Unlike the
/// crate's `TrackLocalStaticRTP`, it keeps the payload type the bridge chose (voice or
/// telephone-event) and does not take an async lock, copy the bindings and reparse per packet.
#[derive(Default)]
struct Outbound {
    binding: Mutex<Option<Binding>>,
    /// Set by [`Leg::close`], so that dropping the leg does not close it a second time.
    closed: std::sync::atomic::AtomicBool,
}

struct Binding {
    id: String,
    ssrc: u32,
    writer: Arc<dyn TrackLocalWriter + Send + Sync>,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound").finish_non_exhaustive()
    }
}

impl Outbound {
    /// The bound stream's SSRC and writer (per packet: no allocation).
    fn writer(&self) -> Option<(u32, Arc<dyn TrackLocalWriter + Send + Sync>)> {
        let b = self.binding.lock().ok()?;
        b.as_ref().map(|b| (b.ssrc, b.writer.clone()))
    }
}

#[async_trait::async_trait]
impl TrackLocal for Outbound {
    async fn bind(&self, t: &TrackLocalContext) -> webrtc::error::Result<RTCRtpCodecParameters> {
        // The voice codec the browser accepted (telephone-event rides on the same stream).
        let codec = t
            .codec_parameters()
            .iter()
            .find(|c| {
                let m = &c.capability.mime_type;
                m.eq_ignore_ascii_case(MIME_TYPE_PCMU) || m.eq_ignore_ascii_case(MIME_TYPE_PCMA)
            })
            .cloned()
            .ok_or(webrtc::Error::ErrUnsupportedCodec)?;
        if let Ok(mut b) = self.binding.lock() {
            *b = Some(Binding {
                id: t.id(),
                ssrc: t.ssrc(),
                writer: t.write_stream(),
            });
        }
        Ok(codec)
    }

    async fn unbind(&self, t: &TrackLocalContext) -> webrtc::error::Result<()> {
        if let Ok(mut b) = self.binding.lock() {
            if b.as_ref().is_some_and(|b| b.id == t.id()) {
                *b = None;
            }
        }
        Ok(())
    }

    fn id(&self) -> &str {
        "audio"
    }

    fn rid(&self) -> Option<&str> {
        None
    }

    fn stream_id(&self) -> &str {
        "callgate"
    }

    fn kind(&self) -> RTPCodecType {
        RTPCodecType::Audio
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl std::fmt::Debug for Leg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leg").finish_non_exhaustive()
    }
}

impl Leg {
    /// Sends one RTP packet to the browser with its payload type, sequence number and
    /// timestamp; the engine sets the SSRC it announced and encrypts. Dropped (`Ok`) until
    /// DTLS is up. The future does not borrow the leg (the leg is not `Sync`: it holds the
    /// read in progress).
    pub fn send_rtp(
        &self,
        packet: &RtpPacket<'_>,
    ) -> impl Future<Output = Result<(), WebRtcError>> + Send + 'static {
        let out = self.track.writer().map(|(ssrc, writer)| {
            let pkt = webrtc::rtp::packet::Packet {
                header: webrtc::rtp::header::Header {
                    version: 2,
                    marker: packet.marker,
                    payload_type: packet.payload_type,
                    sequence_number: packet.sequence,
                    timestamp: packet.timestamp,
                    ssrc,
                    ..Default::default()
                },
                payload: Bytes::copy_from_slice(packet.payload),
            };
            (writer, pkt)
        });
        async move {
            match out {
                Some((writer, pkt)) => writer.write_rtp(&pkt).await.map(|_| ()).map_err(engine_err),
                None => Ok(()),
            }
        }
    }

    /// The next RTP packet from the browser; `None` once the connection is gone. Cancel safe:
    /// a read interrupted by another `select!` branch goes on at the next call.
    pub async fn recv_rtp(&mut self) -> Option<Inbound> {
        loop {
            if let Some(reading) = self.reading.as_mut() {
                let pkt = reading.await;
                self.reading = None;
                return match pkt {
                    Some(p) => Some(Inbound(p)),
                    None => {
                        self.remote = Remote::Gone;
                        None
                    }
                };
            }
            match &mut self.remote {
                Remote::Waiting(rx) => match rx.await {
                    Ok(track) => self.remote = Remote::Ready(track),
                    Err(_) => {
                        self.remote = Remote::Gone;
                        return None;
                    }
                },
                Remote::Ready(track) => {
                    let track = track.clone();
                    self.reading = Some(Box::pin(async move {
                        let mut buf = [0u8; RECEIVE_MTU];
                        track.read(&mut buf).await.ok().map(|(p, _)| p)
                    }));
                }
                Remote::Gone => return None,
            }
        }
    }

    /// Closes the peer connection (DTLS close, sockets of this leg released).
    pub fn close(&self) -> impl Future<Output = ()> + Send + 'static {
        self.track
            .closed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let pc = self.pc.clone();
        async move {
            let _ = pc.close().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_shared_port_gets_a_large_receive_buffer() {
        let socket = bind_mux("127.0.0.1:0".parse().expect("addr")).expect("bind");
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
}
