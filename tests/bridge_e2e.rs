//! Audio end to end on the media path: a WebRTC peer (the browser) ⇄ callgate's bridge ⇄ a real
//! SIP call through Kamailio to sipp, which echoes the RTP (`-rtp_echo`). What the "browser" sends
//! must come back to it through DTLS-SRTP, the bridge's rewriting and plain RTP both ways.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use callgate::media::bridge::{self, Flow, Mapping};
use callgate::media::rewrite::PtMap;
use callgate::media::rtp::RtpPacket;
use callgate::media::rtp_leg::{PortPool, RtpLeg};
use callgate::sip::call::CallEvent;
use callgate::sip::sdp::{AudioSdp, Direction};
use common::peers::{Kamailio, Sipp, free_udp_port};
use common::rtc_peer::RtcPeer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_audio_goes_through_a_real_call_and_back() {
    let kam = Kamailio::start(free_udp_port());
    let (ep, reg) = common::agent::registered_1001(common::agent::settings(), kam.port).await;
    let mut far = Sipp::uas_with(
        kam.port,
        "1002",
        "pass1002",
        "uas_answer.xml",
        &["-rtp_echo"],
    );

    // Browser side.
    let engine = common::rtc_peer::loopback_engine().await;
    let (mut browser, leg, browser_sdp) = RtcPeer::connect(&engine).await;

    // SIP side.
    let base = 33000 + (std::process::id() % 1000) as u16 * 2;
    let pool = PortPool::new(base, base + 9);
    let mut rtp = RtpLeg::open(&pool, "127.0.0.1".parse().unwrap())
        .await
        .unwrap();
    let offer = AudioSdp::offer(
        "127.0.0.1".parse().unwrap(),
        rtp.port(),
        &["PCMU"],
        1,
        Direction::SendRecv,
    );
    let mut call = ep.dial(&reg, "1002", offer.to_sdp()).await.unwrap();
    let answer = loop {
        match tokio::time::timeout(Duration::from_secs(10), call.next_event())
            .await
            .unwrap()
            .unwrap()
        {
            CallEvent::Answered { answer } => break answer.expect("SDP"),
            CallEvent::Ended { .. } => panic!("call failed\n{}", kam.log()),
            _ => {}
        }
    };
    rtp.set_remote(std::net::SocketAddr::new(answer.addr, answer.port));
    let (mut steer, ctl) = bridge::controls(Default::default());
    // The payload types of both negotiations, paired by name (the engine's own SDP parsed).
    let browser_audio = AudioSdp::parse(browser_sdp.as_bytes()).expect("the WebRTC answer parses");
    let mapping = Mapping::negotiate(&browser_audio, &answer).expect("bridgeable");
    let mapping_te = mapping.sip_telephone_event;
    assert_eq!(mapping.to_sip.first(), Some(&PtMap { from: 0, to: 0 }));
    let bridge = tokio::spawn(bridge::run(leg, rtp, mapping, 0xB41D, ctl));

    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let deadline = tokio::time::Instant::now() + Duration::from_millis(2600);
    let mut sent = 0u16;
    let mut back = 0;
    let mut seqs: Vec<u16> = Vec::new();
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => break,
            _ = tick.tick(), if sent < 80 => {
                // Packets 25-54 fall into a 600 ms hold: nothing is forwarded meanwhile.
                if sent == 25 {
                    steer.flow(Flow::Hold);
                }
                if sent == 55 {
                    steer.flow(Flow::Forward);
                }
                let mut b = Vec::new();
                RtpPacket { marker: sent == 0, payload_type: 0, sequence: sent, timestamp: u32::from(sent) * 160, ssrc: 3, payload: &[0x3c; 160] }.write(&mut b);
                browser.send(&b).await;
                sent += 1;
            }
            Some((seq, p)) = browser.heard.recv() => {
                if p == [0x3c; 160] {
                    back += 1;
                    seqs.push(seq);
                }
            }
        }
    }
    // DTMF crosses as RFC 4733 events with sipp's payload type; sipp echoes them and the bridge
    // reports each digit it hears once.
    assert_eq!(mapping_te, Some(101));
    steer.dtmf('5');
    steer.dtmf('#');
    let heard = tokio::time::timeout(Duration::from_secs(3), async {
        let mut d = String::new();
        while d.len() < 2 {
            d.push(steer.heard.recv().await.unwrap());
        }
        d
    })
    .await
    .expect("the echoed digits within 3 s");
    assert_eq!(heard, "5#");
    steer.flow(Flow::Stop);
    let stats = bridge.await.unwrap();
    // 80 sent, 30 of them during the hold: about 50 come back, before and after it.
    assert!(
        (45..=52).contains(&back),
        "echoed audio back at the browser: {back} (bridge {stats:?})"
    );
    assert!(stats.to_sip >= 45 && stats.to_browser >= 45, "{stats:?}");
    assert_eq!(stats.sip_in.lost(), 0, "{stats:?}");
    // Across the hold, the browser's stream continues by one: no gap, no jump.
    for w in seqs.windows(2) {
        assert_eq!(
            w[1],
            w[0].wrapping_add(1),
            "sequence numbers at the browser: {seqs:?}"
        );
    }
    call.hangup();
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(5), call.next_event()).await {
        if matches!(ev, CallEvent::Ended { .. }) {
            break;
        }
    }
    let (ok, log) = tokio::task::spawn_blocking(move || far.wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(ok, "{log}");
    browser.pc.close().await.unwrap();
}
