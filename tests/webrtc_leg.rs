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
        consent_timeout: callgate::media::webrtc::CONSENT_TIMEOUT,
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

/// A light peer connected to a leg of `engine`, its offer first passed through `tamper`; with
/// callgate's answer and what the peer hears.
async fn lite_pair(
    engine: &Engine,
    tamper: impl FnOnce(String) -> String,
) -> (
    common::lite_peer::LitePeer,
    callgate::media::webrtc::Leg,
    tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
) {
    let (mut browser, offer) = common::lite_peer::LitePeer::offer().await;
    let (leg, answer) = engine.answer(&tamper(offer)).await.expect("answer");
    let (tx, heard) = tokio::sync::mpsc::unbounded_channel();
    browser
        .accept(
            &answer,
            Box::new(move |p| {
                let _ = tx.send(p.payload.to_vec());
            }),
        )
        .await;
    (browser, leg, heard)
}

/// Sends from the peer until the leg hears it (DTLS may still be finishing on callgate's side).
async fn first_packet(
    browser: &common::lite_peer::LitePeer,
    leg: &mut callgate::media::webrtc::Leg,
) {
    let heard = tokio::time::timeout(Duration::from_secs(5), async {
        let mut n = 0u16;
        loop {
            browser.send(&rtp(n, 1, 0x11)).await;
            n += 1;
            if let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(20), leg.recv_rtp()).await
            {
                return;
            }
        }
    })
    .await;
    assert!(heard.is_ok(), "no media from the peer within 5 s");
}

/// Waits for the leg to report its browser gone.
async fn ended_within(leg: &mut callgate::media::webrtc::Leg, secs: u64) -> bool {
    tokio::time::timeout(Duration::from_secs(secs), async {
        while leg.recv_rtp().await.is_some() {}
    })
    .await
    .is_ok()
}

/// Audio queued before anyone reads it can be dropped; a browser that closes its connection
/// (DTLS close_notify) ends the leg at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_audio_can_be_discarded_and_a_dtls_close_ends_the_leg() {
    let engine = common::rtc_peer::loopback_engine().await;
    let (browser, mut leg, _) = lite_pair(&engine, |o| o).await;
    first_packet(&browser, &mut leg).await;
    // Audio nobody read yet (a call ringing before its bridge runs) can be dropped at once.
    for n in 100..110 {
        browser.send(&rtp(n, 1, 0x33)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        leg.discard_pending() >= 10,
        "the queued packets are discarded"
    );
    browser.send(&rtp(110, 1, 0x44)).await;
    let next = tokio::time::timeout(Duration::from_secs(2), leg.recv_rtp()).await;
    let next = next.expect("a packet after the discard").expect("leg open");
    assert_eq!(next.packet().payload, [0x44; 160], "only what came after");
    browser.close().await;
    assert!(
        ended_within(&mut leg, 5).await,
        "leg still open 5 s after DTLS closed"
    );
}

/// A browser that vanishes without a word (no DTLS close) is given up when its ICE consent
/// checks stop (RFC 7675), and not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leg_ends_when_the_browser_stops_its_consent_checks() {
    let engine = Engine::new(&Settings {
        port_range: None,
        bind: "127.0.0.1:0".parse().unwrap(),
        public_ip: None,
        loopback: true,
        consent_timeout: Duration::from_secs(3),
    })
    .await
    .expect("engine");
    let (browser, mut leg, _) = lite_pair(&engine, |o| o).await;
    first_packet(&browser, &mut leg).await;
    // Checks every 2 s: past the 3 s timeout the leg still carries media.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    first_packet(&browser, &mut leg).await;
    browser.go_silent();
    assert!(
        ended_within(&mut leg, 8).await,
        "leg still open 8 s after the checks stopped"
    );
}

/// DTLS-SRTP is only as good as the fingerprint check: a peer whose certificate is not the one
/// its offer announced (a man in the middle) gets its connection closed and no media through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_is_not_the_offered_one_gets_no_media_through() {
    let engine = common::rtc_peer::loopback_engine().await;
    let (browser, mut leg, _) = lite_pair(&engine, |offer| {
        let at = offer.find("a=fingerprint:sha-256 ").unwrap() + 22;
        let old = &offer[at..at + 2];
        let new = if old == "00" { "11" } else { "00" };
        format!("{}{new}{}", &offer[..at], &offer[at + 2..])
    })
    .await;
    for n in 0..20 {
        browser.send(&rtp(n, 1, 0x11)).await;
    }
    let got = tokio::time::timeout(Duration::from_secs(5), leg.recv_rtp()).await;
    assert!(
        matches!(got, Ok(None)),
        "the leg must end without media: {got:?}"
    );
}

/// Only checks signed with the leg's ICE password are answered, and nothing from an address
/// that has not passed one reaches the leg.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_without_our_password_get_no_answer_and_no_route() {
    let engine = common::rtc_peer::loopback_engine().await;
    let (_peer, offer) = common::lite_peer::LitePeer::offer().await;
    let (mut leg, answer) = engine.answer(&offer).await.expect("answer");
    let attr = |sdp: &str, name: &str| -> String {
        sdp.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim()
            .to_owned()
    };
    let username = format!(
        "{}:{}",
        attr(&answer, "a=ice-ufrag:"),
        attr(&offer, "a=ice-ufrag:")
    );
    let pwd = attr(&answer, "a=ice-pwd:");
    let intruder = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = engine.local_addr();
    let reply = async |check: &[u8]| -> Option<Vec<u8>> {
        intruder.send_to(check, port).await.unwrap();
        let mut buf = [0u8; 1500];
        let n = tokio::time::timeout(Duration::from_millis(700), intruder.recv(&mut buf))
            .await
            .ok()?
            .ok()?;
        Some(buf[..n].to_vec())
    };
    let bad = common::lite_peer::binding_request(&username, "not-the-password-of-this-leg");
    assert_eq!(
        reply(&bad).await,
        None,
        "a check with the wrong password was answered"
    );
    intruder.send_to(&rtp(1, 1, 0x11), port).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), leg.recv_rtp())
            .await
            .is_err(),
        "RTP from an unchecked address reached the leg"
    );
    // The positive control: the same check with the right password is answered.
    let good = common::lite_peer::binding_request(&username, &pwd);
    let answered = reply(&good).await.expect("no answer to a good check");
    assert_eq!(&answered[..2], &[0x01, 0x01], "a binding success");
    leg.close().await;
}
