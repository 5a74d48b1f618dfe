//! The bridge: browser (WebRTC leg) ⇄ SIP (RTP leg), one task per call. Each direction goes
//! through a [`Rewriter`], so each side sees one continuous stream with its own payload types.

use std::time::Instant;

use tokio::sync::watch;

use super::rewrite::{PtMap, Rewriter};
use super::rtp::RtpPacket;
use super::rtp_leg::{MAX_DATAGRAM, RtpLeg};
use super::stats::ReceiveStats;
use super::webrtc::Leg;

/// Payload type mappings of one call, from the two negotiations.
#[derive(Debug, Clone)]
pub struct Mapping {
    /// Browser PT → SIP PT (voice codec and telephone-event).
    pub to_sip: Vec<PtMap>,
    /// SIP PT → browser PT.
    pub to_browser: Vec<PtMap>,
}

/// What went through a bridge.
#[derive(Debug, Clone, Default)]
pub struct BridgeStats {
    /// Packets forwarded browser → SIP.
    pub to_sip: u64,
    /// Packets forwarded SIP → browser.
    pub to_browser: u64,
    /// Reception statistics of the SIP side's stream.
    pub sip_in: ReceiveStats,
}

/// What the bridge does with media.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Forward both ways.
    Forward,
    /// Forward nothing (a held call); both streams continue seamlessly on resume.
    Hold,
    /// End the bridge.
    Stop,
}

/// Runs until `flow` says [`Flow::Stop`] or the browser leg closes; returns the statistics.
pub async fn run(
    mut browser: Leg,
    mut sip: RtpLeg,
    mapping: Mapping,
    ssrc: u32,
    mut flow: watch::Receiver<Flow>,
) -> BridgeStats {
    let start = Instant::now();
    let mut to_sip = Rewriter::new(ssrc, 8000, mapping.to_sip);
    let mut to_browser = Rewriter::new(ssrc ^ 0x5555_5555, 8000, mapping.to_browser);
    let mut stats = BridgeStats::default();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut held = *flow.borrow() == Flow::Hold;
    loop {
        tokio::select! {
            changed = flow.changed() => {
                let now = match changed {
                    Ok(()) => *flow.borrow(),
                    Err(_) => Flow::Stop,
                };
                match now {
                    Flow::Stop => break,
                    Flow::Hold => held = true,
                    Flow::Forward => {
                        if held {
                            held = false;
                            to_sip.rebase();
                            to_browser.rebase();
                        }
                    }
                }
            }
            pkt = browser.recv_rtp() => {
                let Some(pkt) = pkt else { break };
                let Ok(p) = RtpPacket::parse(&pkt) else { continue };
                if held {
                    continue;
                }
                if let Some(out) = to_sip.rewrite(Instant::now(), &p) {
                    if sip.send(out).await {
                        stats.to_sip += 1;
                    }
                }
            }
            n = sip.recv(&mut buf) => {
                let Ok(n) = n else { break };
                let Ok(p) = RtpPacket::parse(buf.get(..n).unwrap_or_default()) else { continue };
                let arrival = start.elapsed().as_millis() as u64 * 8;
                stats.sip_in.on_packet(p.sequence, p.timestamp, p.payload.len(), arrival);
                if held {
                    continue;
                }
                if let Some(out) = to_browser.rewrite(Instant::now(), &p) {
                    if browser.send_rtp(out).await.is_ok() {
                        stats.to_browser += 1;
                    }
                }
            }
        }
    }
    browser.close().await;
    stats
}
