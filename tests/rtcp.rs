//! RTCP on the SIP side of a bridge: callgate sends sender reports (with a report block on the
//! stream it receives and an SDES CNAME) to the peer's RTCP port, and takes in the peer's own
//! reports on the stream callgate sends (the loss it reports ends up in the bridge's stats).
//! The SIP peer here is two plain UDP sockets; the browser a real WebRTC peer.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::{Duration, SystemTime};

use callgate::media::bridge::{self, Flow, Mapping};
use callgate::media::rewrite::PtMap;
use callgate::media::rtcp::{self, ReportBlock, Sent};
use callgate::media::rtp::RtpPacket;
use callgate::media::rtp_leg::{PortPool, RtpLeg};
use common::rtc_peer::RtcPeer;
use tokio::net::UdpSocket;

const OUR_SSRC: u32 = 0x00ca_11ed;
const PEER_SSRC: u32 = 0x5150;

/// An even/odd UDP port pair on loopback (the SIP peer's RTP and RTCP).
async fn pair() -> (UdpSocket, UdpSocket) {
    loop {
        let rtp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = rtp.local_addr().unwrap().port();
        if port % 2 == 0 {
            if let Ok(rtcp) = UdpSocket::bind(("127.0.0.1", port + 1)).await {
                return (rtp, rtcp);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_go_both_ways() {
    let engine = common::rtc_peer::loopback_engine().await;
    let (browser, leg, _) = RtcPeer::connect(&engine).await;
    let pool = PortPool::new(35_600, 35_699);
    let mut rtp = RtpLeg::open(&pool, "127.0.0.1".parse().unwrap())
        .await
        .unwrap();
    let callgate_rtp = std::net::SocketAddr::from(([127, 0, 0, 1], rtp.port()));
    let callgate_rtcp = std::net::SocketAddr::from(([127, 0, 0, 1], rtp.port() + 1));
    let (peer_rtp, peer_rtcp) = pair().await;
    rtp.set_remote(peer_rtp.local_addr().unwrap());
    let (steer, mut ctl) = bridge::controls(Default::default());
    ctl.rtcp_interval = Duration::from_millis(300);
    let mapping = Mapping {
        to_sip: vec![PtMap { from: 0, to: 0 }],
        to_browser: vec![PtMap { from: 0, to: 0 }],
        sip_telephone_event: None,
        voice: (0, 0, false),
    };
    let task = tokio::spawn(bridge::run(leg, rtp, mapping, OUR_SSRC, ctl));

    // Both sides talk for a second: 50 packets each, 3 of the peer's never sent (lost).
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for seq in 0u16..50 {
        tick.tick().await;
        let mut b = Vec::new();
        RtpPacket {
            marker: false,
            payload_type: 0,
            sequence: seq,
            timestamp: u32::from(seq) * 160,
            ssrc: 1,
            payload: &[0x11; 160],
        }
        .write(&mut b);
        browser.send(&b).await;
        if ![10, 20, 30].contains(&seq) {
            let mut b = Vec::new();
            RtpPacket {
                marker: false,
                payload_type: 0,
                sequence: 1000 + seq,
                timestamp: u32::from(seq) * 160,
                ssrc: PEER_SSRC,
                payload: &[0x22; 160],
            }
            .write(&mut b);
            peer_rtp.send_to(&b, callgate_rtp).await.unwrap();
        }
    }
    // The peer's own sender report, saying it lost 7 of ours.
    let our_view = ReportBlock {
        ssrc: OUR_SSRC,
        fraction_lost: 9,
        cumulative_lost: 7,
        highest_seq: 49,
        jitter: 3,
        lsr: 0,
        dlsr: 0,
    };
    let sr_time = rtcp::ntp(SystemTime::now());
    let sent = Sent {
        ssrc: PEER_SSRC,
        rtp_timestamp: 50 * 160,
        packets: 47,
        octets: 47 * 160,
    };
    peer_rtcp
        .send_to(
            &rtcp::compound(sr_time, sent, Some(our_view), "peer"),
            callgate_rtcp,
        )
        .await
        .unwrap();

    // callgate's next report: an SR for its stream, a block on ours, our SR's time as LSR.
    let mut buf = [0u8; 1500];
    let report = loop {
        let (n, from) = tokio::time::timeout(Duration::from_secs(3), peer_rtcp.recv_from(&mut buf))
            .await
            .expect("an RTCP report from callgate")
            .unwrap();
        assert_eq!(from, callgate_rtcp, "sent from callgate's RTCP port");
        let inc = rtcp::parse(&buf[..n]).expect("RTCP");
        if inc.blocks.first().is_some_and(|b| b.lsr != 0) {
            break inc;
        }
    };
    let (sender, _) = report
        .sender
        .expect("a sender report: callgate sends media");
    assert_eq!(sender, OUR_SSRC);
    let block = report.blocks[0];
    assert_eq!(block.ssrc, PEER_SSRC);
    assert_eq!(block.highest_seq, 1049);
    assert_eq!(block.cumulative_lost, 3, "{block:?}");
    assert_eq!(block.lsr, rtcp::ntp_middle(sr_time));
    assert!(
        block.dlsr < 65_536,
        "answered within a second: {}",
        block.dlsr
    );
    assert!(
        buf[..200].windows(8).any(|w| w == b"callgate"),
        "SDES CNAME"
    );

    steer.flow(Flow::Stop);
    let stats = task.await.unwrap();
    assert_eq!(
        stats.far_end,
        Some(our_view),
        "the peer's report on our stream"
    );
    browser.pc.close().await.unwrap();
}
