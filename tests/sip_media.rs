//! The SIP-side RTP leg in a real call: through Kamailio to sipp, which echoes our RTP
//! (`-rtp_echo`). Audio really flows both ways on the SIP side.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use callgate::media::g711::ulaw_encode;
use callgate::media::rtp::RtpPacket;
use callgate::media::rtp_leg::{MAX_DATAGRAM, PortPool, RtpLeg};
use callgate::sip::call::CallEvent;
use callgate::sip::sdp::{AudioSdp, Direction};
use common::peers::{Kamailio, Sipp, free_udp_port};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtp_flows_both_ways_through_a_real_call() {
    let kam = Kamailio::start(free_udp_port());
    let (ep, reg) = common::agent::registered_1001(common::agent::settings(), kam.port).await;
    let far = Sipp::uas_with(
        kam.port,
        "1002",
        "pass1002",
        "uas_answer.xml",
        &["-rtp_echo"],
    );

    let base = 31000 + (std::process::id() % 1000) as u16 * 2;
    let pool = PortPool::new(base, base + 9);
    let mut leg = RtpLeg::open(&pool, "127.0.0.1".parse().unwrap())
        .await
        .expect("ports");
    let offer = AudioSdp::offer(
        "127.0.0.1".parse().unwrap(),
        leg.port(),
        &["PCMU"],
        1,
        Direction::SendRecv,
    );
    let mut call = ep.dial(&reg, "1002", offer.to_sdp()).await.expect("dial");
    let answer = loop {
        match tokio::time::timeout(Duration::from_secs(10), call.next_event())
            .await
            .expect("event")
            .expect("open")
        {
            CallEvent::Answered { answer } => break answer.expect("SDP answer"),
            CallEvent::Ended { .. } => panic!("call failed\n{}", kam.log()),
            _ => {}
        }
    };
    assert_eq!(answer.voice_codec().map(|c| c.pt), Some(0));
    leg.set_remote(std::net::SocketAddr::new(answer.addr, answer.port));

    // One second of a 1 kHz tone, 20 ms packets; count what comes back.
    let tone: Vec<u8> = (0..160)
        .map(|n| {
            ulaw_encode(
                ((n as f64) * std::f64::consts::TAU / 8.0)
                    .sin()
                    .mul_add(8000.0, 0.0) as i16,
            )
        })
        .collect();
    let mut buf = [0u8; MAX_DATAGRAM];
    let mut echoed = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    let mut sent = 0u16;
    while tokio::time::Instant::now() < deadline {
        tokio::select! {
            _ = tick.tick(), if sent < 50 => {
                let mut pkt = Vec::new();
                RtpPacket { marker: sent == 0, payload_type: 0, sequence: sent, timestamp: u32::from(sent) * 160, ssrc: 0x5EED, payload: &tone }.write(&mut pkt);
                assert!(leg.send(&pkt).await, "a destination is known");
                sent += 1;
            }
            () = tokio::time::sleep_until(deadline) => break,
            r = leg.recv(&mut buf) => {
                let n = r.expect("recv");
                let p = RtpPacket::parse(&buf[..n]).expect("rtp");
                if p.ssrc == 0x5EED && p.payload == tone.as_slice() {
                    echoed += 1;
                }
            }
        }
    }
    assert_eq!(sent, 50);
    assert!(echoed >= 45, "only {echoed} of 50 packets came back");
    call.hangup();
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(5), call.next_event()).await {
        if matches!(ev, CallEvent::Ended { .. }) {
            break;
        }
    }
    let mut far = far;
    let (ok, log) = tokio::task::spawn_blocking(move || far.wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(ok, "{log}");
}
