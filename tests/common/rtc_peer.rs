//! A WebRTC peer playing the browser (the `webrtc` crate, loopback candidates only).
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use callgate::media::webrtc::{Engine, Leg};
use tokio::sync::mpsc;
use webrtc::api::APIBuilder;
use webrtc::api::media_engine::{MIME_TYPE_PCMU, MIME_TYPE_TELEPHONE_EVENT, MediaEngine};
use webrtc::api::setting_engine::SettingEngine;
use webrtc::peer_connection::RTCPeerConnection;
use webrtc::peer_connection::configuration::RTCConfiguration;
use webrtc::peer_connection::peer_connection_state::RTCPeerConnectionState;
use webrtc::peer_connection::sdp::session_description::RTCSessionDescription;
use webrtc::rtp_transceiver::rtp_codec::RTCRtpCodecCapability;
use webrtc::rtp_transceiver::rtp_codec::RTCRtpCodecParameters;
use webrtc::rtp_transceiver::rtp_codec::RTPCodecType;
use webrtc::track::track_local::TrackLocalWriter;
use webrtc::track::track_local::track_local_static_rtp::TrackLocalStaticRTP;

pub struct RtcPeer {
    pub pc: Arc<RTCPeerConnection>,
    track: Arc<TrackLocalStaticRTP>,
    /// (sequence number, payload) of the RTP packets the peer received.
    pub heard: mpsc::Receiver<(u16, Vec<u8>)>,
    state: mpsc::Receiver<RTCPeerConnectionState>,
}

/// callgate's WebRTC engine on loopback, its single port chosen by the system.
pub async fn loopback_engine() -> Engine {
    Engine::new(&callgate::media::webrtc::Settings {
        port_range: None,
        bind: "127.0.0.1:0".parse().expect("addr"),
        public_ip: None,
        loopback: true,
        consent_timeout: callgate::media::webrtc::CONSENT_TIMEOUT,
    })
    .await
    .expect("engine")
}

impl RtcPeer {
    /// Offers to `engine` (as a browser would), applies its answer and waits for ICE + DTLS.
    pub async fn connect(engine: &Engine) -> (RtcPeer, Leg, String) {
        let (mut peer, offer) = RtcPeer::offer().await;
        let (leg, answer) = tokio::time::timeout(Duration::from_secs(10), engine.answer(&offer))
            .await
            .expect("answer in time")
            .expect("answer");
        peer.accept(&answer).await;
        (peer, leg, answer)
    }

    /// A peer and its offer (ICE candidates gathered, no trickle), as a page would send it.
    pub async fn offer() -> (RtcPeer, String) {
        let mut m = MediaEngine::default();
        m.register_default_codecs().expect("codecs");
        // As Chrome does: telephone-event/8000 with a dynamic payload type (126, not 101).
        m.register_codec(
            RTCRtpCodecParameters {
                capability: RTCRtpCodecCapability {
                    mime_type: MIME_TYPE_TELEPHONE_EVENT.to_owned(),
                    clock_rate: 8000,
                    channels: 1,
                    sdp_fmtp_line: "0-15".to_owned(),
                    rtcp_feedback: vec![],
                },
                payload_type: 126,
                ..Default::default()
            },
            RTPCodecType::Audio,
        )
        .expect("telephone-event");
        let mut se = SettingEngine::default();
        se.set_include_loopback_candidate(true);
        se.set_ip_filter(Box::new(|ip| ip.is_loopback()));
        let api = APIBuilder::new()
            .with_media_engine(m)
            .with_setting_engine(se)
            .build();
        let pc = Arc::new(
            api.new_peer_connection(RTCConfiguration::default())
                .await
                .expect("pc"),
        );
        let track = Arc::new(TrackLocalStaticRTP::new(
            RTCRtpCodecCapability {
                mime_type: MIME_TYPE_PCMU.to_owned(),
                clock_rate: 8000,
                channels: 1,
                ..Default::default()
            },
            "mic".into(),
            "browser".into(),
        ));
        pc.add_track(track.clone()).await.expect("track");
        let (heard_tx, heard) = mpsc::channel::<(u16, Vec<u8>)>(512);
        pc.on_track(Box::new(move |remote, _, _| {
            let tx = heard_tx.clone();
            Box::pin(async move {
                while let Ok((p, _)) = remote.read_rtp().await {
                    let _ = tx.try_send((p.header.sequence_number, p.payload.to_vec()));
                }
            })
        }));
        let (state_tx, state) = mpsc::channel(16);
        pc.on_peer_connection_state_change(Box::new(move |s| {
            let tx = state_tx.clone();
            Box::pin(async move {
                let _ = tx.send(s).await;
            })
        }));
        let offer = pc.create_offer(None).await.expect("offer");
        let mut gathered = pc.gathering_complete_promise().await;
        pc.set_local_description(offer).await.expect("local");
        let _ = gathered.recv().await;
        let sdp = pc.local_description().await.expect("sdp").sdp;
        (
            RtcPeer {
                pc,
                track,
                heard,
                state,
            },
            sdp,
        )
    }

    /// Applies callgate's answer and waits for ICE + DTLS.
    pub async fn accept(&mut self, answer: &str) {
        self.pc
            .set_remote_description(
                RTCSessionDescription::answer(answer.to_owned()).expect("answer sdp"),
            )
            .await
            .expect("remote");
        let state = &mut self.state;
        tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(s) = state.recv().await {
                if s == RTCPeerConnectionState::Connected {
                    return;
                }
                assert_ne!(s, RTCPeerConnectionState::Failed, "ICE/DTLS failed");
            }
        })
        .await
        .expect("ICE + DTLS connected");
    }

    /// Sends one RTP packet from the "microphone".
    pub async fn send(&self, rtp: &[u8]) {
        self.track.write(rtp).await.expect("write");
    }
}
