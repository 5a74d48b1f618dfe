//! The WebRTC leg against a real WebRTC peer (the `webrtc` crate playing the browser, as the media
//! issue allows until headless Chromium arrives): ICE over the single mux port, DTLS-SRTP, and
//! RTP both ways. Loopback only; run in a private network namespace (tests/run).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use callgate::media::rtp::RtpPacket;
use callgate::media::webrtc::{Engine, Settings};
use tokio::sync::mpsc;
use webrtc::api::APIBuilder;
use webrtc::api::media_engine::{MIME_TYPE_PCMU, MediaEngine};
use webrtc::api::setting_engine::SettingEngine;
use webrtc::peer_connection::configuration::RTCConfiguration;
use webrtc::peer_connection::peer_connection_state::RTCPeerConnectionState;
use webrtc::peer_connection::sdp::session_description::RTCSessionDescription;
use webrtc::rtp_transceiver::rtp_codec::RTCRtpCodecCapability;
use webrtc::track::track_local::TrackLocalWriter;
use webrtc::track::track_local::track_local_static_rtp::TrackLocalStaticRTP;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_like_peer_exchanges_rtp_through_the_leg() {
    let engine = Engine::new(&Settings {
        bind: "127.0.0.1:0".parse().unwrap(),
        public_ip: None,
        loopback: true,
    })
    .await
    .expect("engine");
    let port = engine.local_addr().port();

    // The "browser".
    let mut m = MediaEngine::default();
    m.register_default_codecs().unwrap();
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
            .unwrap(),
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
    pc.add_track(track.clone()).await.unwrap();
    let (heard_tx, mut heard) = mpsc::channel::<Vec<u8>>(256);
    pc.on_track(Box::new(move |remote, _, _| {
        let tx = heard_tx.clone();
        Box::pin(async move {
            while let Ok((p, _)) = remote.read_rtp().await {
                let _ = tx.try_send(p.payload.to_vec());
            }
        })
    }));
    let (state_tx, mut state) = mpsc::channel(16);
    pc.on_peer_connection_state_change(Box::new(move |s| {
        let tx = state_tx.clone();
        Box::pin(async move {
            let _ = tx.send(s).await;
        })
    }));
    let offer = pc.create_offer(None).await.unwrap();
    let mut gathered = pc.gathering_complete_promise().await;
    pc.set_local_description(offer).await.unwrap();
    let _ = gathered.recv().await;
    let offer_sdp = pc.local_description().await.unwrap().sdp;

    let (mut leg, answer) =
        tokio::time::timeout(Duration::from_secs(10), engine.answer(&offer_sdp))
            .await
            .expect("answer in time")
            .expect("answer");
    assert!(answer.contains("a=rtpmap:0 PCMU/8000"), "{answer}");
    assert!(
        !answer.to_ascii_lowercase().contains("opus"),
        "no codec the SIP side cannot take: {answer}"
    );
    assert!(
        answer.contains(&format!("127.0.0.1 {port} typ host")),
        "one candidate on the mux port: {answer}"
    );
    assert!(answer.contains("a=ice-lite"), "{answer}");
    assert!(answer.contains("a=sendrecv"), "{answer}");
    pc.set_remote_description(RTCSessionDescription::answer(answer).unwrap())
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(s) = state.recv().await {
            if s == RTCPeerConnectionState::Connected {
                return;
            }
            assert_ne!(s, RTCPeerConnectionState::Failed);
        }
    })
    .await
    .expect("ICE + DTLS connected");

    // One second each way, 20 ms packets.
    let mut from_browser = 0;
    let mut to_browser = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1800);
    let mut n = 0u16;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => break,
            _ = tick.tick(), if n < 50 => {
                let mut b = Vec::new();
                RtpPacket { marker: false, payload_type: 0, sequence: n, timestamp: u32::from(n) * 160, ssrc: 1, payload: &[0x11; 160] }.write(&mut b);
                track.write(&b).await.unwrap();
                let mut c = Vec::new();
                RtpPacket { marker: false, payload_type: 0, sequence: n, timestamp: u32::from(n) * 160, ssrc: 2, payload: &[0x22; 160] }.write(&mut c);
                leg.send_rtp(&c).await.unwrap();
                n += 1;
            }
            Some(p) = leg.recv_rtp() => {
                if RtpPacket::parse(&p).is_ok_and(|r| r.payload == [0x11; 160]) {
                    from_browser += 1;
                }
            }
            Some(payload) = heard.recv() => {
                if payload == [0x22; 160] {
                    to_browser += 1;
                }
            }
        }
    }
    assert!(
        from_browser >= 45,
        "browser → callgate: {from_browser} of 50"
    );
    assert!(to_browser >= 45, "callgate → browser: {to_browser} of 50");
    leg.close().await;
    pc.close().await.unwrap();
}
