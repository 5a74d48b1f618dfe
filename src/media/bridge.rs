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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// Browser PT → SIP PT (voice codec and telephone-event).
    pub to_sip: Vec<PtMap>,
    /// SIP PT → browser PT.
    pub to_browser: Vec<PtMap>,
}

/// Why two negotiations cannot be bridged as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MappingError {
    /// One side's SDP has no usable audio.
    #[error("no G.711 audio negotiated on the {0} side")]
    NoVoice(&'static str),
    /// PCMU on one side, PCMA on the other (needs transcoding, not done yet).
    #[error(
        "the browser negotiated {browser}, the SIP side {sip}: transcoding is not supported yet"
    )]
    VoiceMismatch {
        /// Browser side codec.
        browser: &'static str,
        /// SIP side codec.
        sip: &'static str,
    },
}

fn g711_name(name: &str) -> &'static str {
    if name.eq_ignore_ascii_case("PCMA") {
        "PCMA"
    } else {
        "PCMU"
    }
}

impl Mapping {
    /// The mapping for a call from the browser's negotiated SDP (the WebRTC answer or offer
    /// callgate accepted) and the SIP side's: the voice codec and telephone-event/8000 are paired
    /// by name, each side keeping its own payload type numbers (Chrome uses 126 for
    /// telephone-event/8000, SIP peers usually 101: never assume numbers).
    pub fn negotiate(
        browser: &crate::sip::sdp::AudioSdp,
        sip: &crate::sip::sdp::AudioSdp,
    ) -> Result<Mapping, MappingError> {
        let bv = browser
            .voice_codec()
            .ok_or(MappingError::NoVoice("browser"))?;
        let sv = sip.voice_codec().ok_or(MappingError::NoVoice("SIP"))?;
        if !bv.name.eq_ignore_ascii_case(&sv.name) {
            return Err(MappingError::VoiceMismatch {
                browser: g711_name(&bv.name),
                sip: g711_name(&sv.name),
            });
        }
        let mut to_sip = vec![PtMap {
            from: bv.pt,
            to: sv.pt,
        }];
        let mut to_browser = vec![PtMap {
            from: sv.pt,
            to: bv.pt,
        }];
        if let (Some(bt), Some(st)) = (browser.telephone_event(), sip.telephone_event()) {
            to_sip.push(PtMap {
                from: bt.pt,
                to: st.pt,
            });
            to_browser.push(PtMap {
                from: st.pt,
                to: bt.pt,
            });
        }
        Ok(Mapping { to_sip, to_browser })
    }
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
    tracing::debug!(
        to_sip = stats.to_sip,
        to_browser = stats.to_browser,
        sip_in = stats.sip_in.received(),
        lost = stats.sip_in.lost(),
        "bridge ended"
    );
    stats
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::sdp::AudioSdp;

    const CHROME_ANSWER: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 0 126\r\nc=IN IP4 0.0.0.0\r\na=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:126 telephone-event/8000\r\na=sendrecv\r\n";

    fn sip(body: &str) -> AudioSdp {
        AudioSdp::parse(body.as_bytes()).unwrap()
    }

    #[test]
    fn pairs_by_name_not_number() {
        let b = AudioSdp::parse(CHROME_ANSWER.as_bytes()).unwrap();
        let s = sip(
            "v=0\r\nc=IN IP4 10.0.0.1\r\nm=audio 4000 RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\n",
        );
        let m = Mapping::negotiate(&b, &s).unwrap();
        assert_eq!(
            m.to_sip,
            vec![PtMap { from: 0, to: 0 }, PtMap { from: 126, to: 101 }]
        );
        assert_eq!(
            m.to_browser,
            vec![PtMap { from: 0, to: 0 }, PtMap { from: 101, to: 126 }]
        );
        // No telephone-event on the SIP side: DTMF must go by INFO; voice still maps.
        let s = sip("v=0\r\nc=IN IP4 10.0.0.1\r\nm=audio 4000 RTP/AVP 0\r\n");
        assert_eq!(Mapping::negotiate(&b, &s).unwrap().to_sip.len(), 1);
    }

    #[test]
    fn voice_mismatch_is_refused() {
        let b = AudioSdp::parse(CHROME_ANSWER.as_bytes()).unwrap();
        let s = sip("v=0\r\nc=IN IP4 10.0.0.1\r\nm=audio 4000 RTP/AVP 8\r\n");
        assert_eq!(
            Mapping::negotiate(&b, &s),
            Err(MappingError::VoiceMismatch {
                browser: "PCMU",
                sip: "PCMA"
            })
        );
    }
}
