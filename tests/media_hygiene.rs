//! Every socket, task and port of a call's media is released when it ends: 25 short "calls"
//! (WebRTC leg with a real peer + RTP leg + bridge, and a leg whose page never connects), then
//! file descriptors, tokio tasks and RTP ports are back to where they started. Its own test binary, so nothing else moves the counts.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use callgate::media::bridge::{self, Flow, Mapping};
use callgate::media::rewrite::PtMap;
use callgate::media::rtp_leg::{PortPool, RtpLeg};
use common::rtc_peer::RtcPeer;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_calls_leave_nothing_behind() {
    let engine = common::rtc_peer::loopback_engine().await;
    let pool = PortPool::new(35000, 35199);
    let metrics = tokio::runtime::Handle::current().metrics();

    let mut baseline = None;
    for i in 0..26 {
        let (browser, leg, _) = RtcPeer::connect(&engine).await;
        let rtp = RtpLeg::open(&pool, "127.0.0.1".parse().unwrap())
            .await
            .unwrap();
        let (steer, ctl) = bridge::controls(Default::default());
        let mapping = Mapping {
            to_sip: vec![PtMap { from: 0, to: 0 }],
            to_browser: vec![PtMap { from: 0, to: 0 }],
            sip_telephone_event: None,
            voice: (0, 0, false),
        };
        let task = tokio::spawn(bridge::run(leg, rtp, mapping, 1, ctl));
        tokio::time::sleep(Duration::from_millis(40)).await;
        steer.flow(Flow::Stop);
        task.await.unwrap();
        browser.pc.close().await.unwrap();
        drop(browser);
        // A page that never connects: its leg is closed, or just dropped, before ICE.
        let (_page, offer) = common::lite_peer::LitePeer::offer().await;
        let (unused, _) = engine.answer(&offer).await.unwrap();
        if i % 2 == 0 {
            unused.close().await;
        } else {
            drop(unused);
        }
        if i == 0 {
            // The first call warms up lazily created things (the engine's mux, runtime workers).
            tokio::time::sleep(Duration::from_millis(500)).await;
            baseline = Some((open_fds(), metrics.num_alive_tasks()));
        }
    }
    let (fds0, tasks0) = baseline.unwrap();
    // Let closing connections finish their last timers.
    let mut settled = (0, 0);
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        settled = (open_fds(), metrics.num_alive_tasks());
        if settled.0 <= fds0 && settled.1 <= tasks0 {
            break;
        }
    }
    assert!(
        settled.0 <= fds0,
        "file descriptors: {} after 25 calls, {} before",
        settled.0,
        fds0
    );
    assert!(
        settled.1 <= tasks0,
        "tokio tasks: {} after 25 calls, {} before",
        settled.1,
        tasks0
    );
    assert_eq!(pool.in_use(), 0, "RTP ports returned");
}
