//! The WebRTC leg toward the browser: the one module that touches the `webrtc` crate (pinned to
//! 0.17.2, see shared/harness/NOTES.md), so the engine can be swapped later.
//!
//! All browsers share one UDP port (an ICE UDP mux); callgate is ICE-lite (it has a public or
//! known address; the browser is controlling). Audio only: PCMU, PCMA and telephone-event/8000,
//! so the SIP side needs no transcoding. The crate's callbacks are turned into channel messages.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::sync::mpsc;
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
use webrtc::track::track_local::TrackLocalWriter;
use webrtc::track::track_local::track_local_static_rtp::TrackLocalStaticRTP;
use webrtc::util::Marshal;

/// Packets from the browser buffered per leg before the oldest are dropped.
const INBOUND_QUEUE: usize = 256;

/// Browser packets dropped because a bridge did not keep up (its queue was full), since start.
pub static INBOUND_DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
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
                let socket =
                    tokio::net::UdpSocket::bind(settings.bind)
                        .await
                        .map_err(|source| WebRtcError::Bind {
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
        let track = Arc::new(TrackLocalStaticRTP::new(
            audio_codec(MIME_TYPE_PCMU, 0, "").capability,
            "audio".to_owned(),
            "callgate".to_owned(),
        ));
        // Before the remote description, or the answer says recvonly (NOTES).
        pc.add_track(track.clone()).await.map_err(engine_err)?;
        let (tx, rx) = mpsc::channel::<Vec<u8>>(INBOUND_QUEUE);
        pc.on_track(Box::new(move |remote, _receiver, _transceiver| {
            let tx = tx.clone();
            Box::pin(async move {
                while let Ok((pkt, _)) = remote.read_rtp().await {
                    if let Ok(bytes) = pkt.marshal() {
                        // A slow consumer loses the oldest audio, never blocks the engine.
                        if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(bytes.to_vec())
                        {
                            INBOUND_DROPPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
            })
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
                inbound: rx,
            },
            sdp,
        ))
    }
}

/// One browser's media: RTP in (decrypted) and out (encrypted by the engine).
pub struct Leg {
    pc: Arc<RTCPeerConnection>,
    track: Arc<TrackLocalStaticRTP>,
    inbound: mpsc::Receiver<Vec<u8>>,
}

impl std::fmt::Debug for Leg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leg").finish_non_exhaustive()
    }
}

impl Leg {
    /// Sends one RTP packet to the browser (the engine sets SSRC and the negotiated PT).
    pub async fn send_rtp(&self, packet: &[u8]) -> Result<(), WebRtcError> {
        self.track
            .write(packet)
            .await
            .map(|_| ())
            .map_err(engine_err)
    }

    /// The next RTP packet from the browser; `None` when the connection is gone.
    pub async fn recv_rtp(&mut self) -> Option<Vec<u8>> {
        self.inbound.recv().await
    }

    /// Closes the peer connection (DTLS close, sockets of this leg released).
    pub async fn close(&self) {
        let _ = self.pc.close().await;
    }
}
