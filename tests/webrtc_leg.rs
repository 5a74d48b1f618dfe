//! The WebRTC leg against a real WebRTC peer (the `webrtc` crate playing the browser, as the media
//! issue allows until headless Chromium arrives): ICE over the single mux port, DTLS-SRTP, and
//! RTP both ways. Loopback only; run in a private network namespace (tests/run).
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use callgate::media::rtp::RtpPacket;
use callgate::media::webrtc::{Engine, Settings};
use common::rtc_peer::RtcPeer;

fn rtp(seq: u16, ssrc: u32, fill: u8) -> Vec<u8> {
    let mut b = Vec::new();
    let payload = [fill; 160];
    RtpPacket {
        marker: false,
        payload_type: 0,
        sequence: seq,
        timestamp: u32::from(seq) * 160,
        ssrc,
        payload: &payload,
    }
    .write(&mut b);
    b
}

/// The load tool's light peer (tests/common/lite_peer.rs) against the leg: ICE, DTLS-SRTP and
/// RTP both ways, and the payload type the bridge chose reaches the browser unchanged (voice
/// and telephone-event on one stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn light_load_peer_exchanges_rtp_through_the_leg() {
    use common::lite_peer::LitePeer;
    let engine = common::rtc_peer::loopback_engine().await;
    let (mut browser, offer) = LitePeer::offer().await;
    let (mut leg, answer) = tokio::time::timeout(Duration::from_secs(10), engine.answer(&offer))
        .await
        .expect("answer in time")
        .expect("answer");
    assert!(
        answer.contains("a=rtpmap:126 telephone-event/8000"),
        "{answer}"
    );
    let (tx, mut heard) = tokio::sync::mpsc::unbounded_channel();
    browser
        .accept(
            &answer,
            Box::new(move |p| {
                let _ = tx.send((p.payload_type, p.payload.to_vec()));
            }),
        )
        .await;
    let (mut from_browser, mut voice, mut events, mut n) = (0, 0, 0, 0u16);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1800);
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => break,
            _ = tick.tick(), if n < 50 => {
                browser.send(&rtp(n, 1, 0x11)).await;
                // Every fifth packet toward the browser is a telephone-event (PT 126 here).
                let mut out = rtp(n, 2, 0x22);
                if n % 5 == 0 {
                    out[1] = 126;
                }
                leg.send_rtp(&RtpPacket::parse(&out).unwrap()).await.unwrap();
                n += 1;
            }
            Some(p) = leg.recv_rtp() => {
                if p.packet().payload == [0x11; 160] {
                    from_browser += 1;
                }
            }
            Some((pt, payload)) = heard.recv() => {
                match pt {
                    0 if payload == [0x22; 160] => voice += 1,
                    126 => events += 1,
                    _ => panic!("payload type {pt} reached the browser"),
                }
            }
        }
    }
    assert!(
        from_browser >= 45,
        "browser → callgate: {from_browser} of 50"
    );
    assert!(
        voice >= 36 && events >= 9,
        "callgate → browser: {voice} voice, {events} events"
    );
    leg.close().await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_like_peer_exchanges_rtp_through_the_leg() {
    let engine = common::rtc_peer::loopback_engine().await;
    let port = engine.local_addr().port();
    let (browser, leg, answer) = RtcPeer::connect(&engine).await;
    assert!(
        answer.contains(&format!("127.0.0.1 {port} typ host")),
        "one candidate on the mux port: {answer}"
    );
    exchange(browser, leg, &answer).await;
}

/// With `media.webrtc_port_min/max`, each call gets a port of its own from the range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_range_gives_each_call_its_own_port() {
    let engine = Engine::new(&Settings {
        port_range: Some((34_000, 34_099)),
        bind: "127.0.0.1:0".parse().unwrap(),
        public_ip: None,
        loopback: true,
    })
    .await
    .expect("engine");
    let (first, first_leg, first_answer) = RtcPeer::connect(&engine).await;
    let (second, second_leg, second_answer) = RtcPeer::connect(&engine).await;
    let port_of = |answer: &str| -> u16 {
        let line = answer
            .lines()
            .find(|l| l.starts_with("a=candidate:") && l.contains(" typ host"))
            .unwrap_or_else(|| panic!("no host candidate: {answer}"));
        line.split_whitespace().nth(5).unwrap().parse().unwrap()
    };
    let (p1, p2) = (port_of(&first_answer), port_of(&second_answer));
    assert!(
        (34_000..=34_099).contains(&p1) && (34_000..=34_099).contains(&p2),
        "{p1} {p2}"
    );
    assert_ne!(p1, p2, "a port per call");
    exchange(first, first_leg, &first_answer).await;
    exchange(second, second_leg, &second_answer).await;
}

/// One second of RTP each way between a connected peer and its leg.
async fn exchange(mut browser: RtcPeer, mut leg: callgate::media::webrtc::Leg, answer: &str) {
    assert!(answer.contains("a=rtpmap:0 PCMU/8000"), "{answer}");
    assert!(
        !answer.to_ascii_lowercase().contains("opus"),
        "no codec the SIP side cannot take: {answer}"
    );
    assert!(answer.contains("a=ice-lite"), "{answer}");
    assert!(answer.contains("a=sendrecv"), "{answer}");

    // One second each way, 20 ms packets.
    let (mut from_browser, mut to_browser, mut n) = (0, 0, 0u16);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1800);
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => break,
            _ = tick.tick(), if n < 50 => {
                browser.send(&rtp(n, 1, 0x11)).await;
                let out = rtp(n, 2, 0x22);
                leg.send_rtp(&RtpPacket::parse(&out).unwrap()).await.unwrap();
                n += 1;
            }
            Some(p) = leg.recv_rtp() => {
                if p.packet().payload == [0x11; 160] {
                    from_browser += 1;
                }
            }
            Some((_, payload)) = browser.heard.recv() => {
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
    browser.pc.close().await.unwrap();
}
