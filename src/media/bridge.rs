//! The bridge: browser (WebRTC leg) ⇄ SIP (RTP leg), one task per call. Each direction goes
//! through a [`Rewriter`], so each side sees one continuous stream with its own payload types.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

mod core;
use self::core::BridgeCore;

use super::rewrite::PtMap;
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
    /// The SIP side's telephone-event/8000 PT, when both sides negotiated it (RFC 4733 DTMF
    /// possible; otherwise DTMF goes by SIP INFO).
    pub sip_telephone_event: Option<u8>,
    /// The voice codec: its PT on the browser side, on the SIP side, and whether it is PCMA
    /// (else PCMU); for the recording tap.
    pub voice: (u8, u8, bool),
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
        let mut sip_telephone_event = None;
        if let (Some(bt), Some(st)) = (browser.telephone_event(), sip.telephone_event()) {
            sip_telephone_event = Some(st.pt);
            to_sip.push(PtMap {
                from: bt.pt,
                to: st.pt,
            });
            to_browser.push(PtMap {
                from: st.pt,
                to: bt.pt,
            });
        }
        Ok(Mapping {
            to_sip,
            to_browser,
            sip_telephone_event,
            voice: (bv.pt, sv.pt, g711_name(&sv.name) == "PCMA"),
        })
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
    /// Reception statistics of the browser's stream (reported to it in RTCP).
    pub browser_in: ReceiveStats,
    /// The SIP side's last RTCP report on our stream (loss, jitter as it sees them).
    pub far_end: Option<super::rtcp::ReportBlock>,
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

/// Whether the SIP side sends media, for the inactivity hang-up (the call's owner knows
/// whether silence is expected, e.g. on hold): reported when it stops and when it starts again,
/// never per packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaActivity {
    /// No SIP-side packet since `since` (the last one, or the bridge's start or retarget).
    Silent {
        /// When the silence began.
        since: Instant,
    },
    /// Packets come again.
    Flowing,
}

/// What a call's owner tells its bridge, in order, on one channel (the bridge polls one
/// queue per wake-up rather than one per kind of order).
#[derive(Debug)]
enum Control {
    /// Forward / hold / stop.
    Flow(Flow),
    /// A DTMF digit to send to the SIP side as an RFC 4733 telephone-event.
    Dtmf(char),
    /// A new SIP-side peer (a re-INVITE moved its media, or a followed transfer replaced it):
    /// its address and the payload types negotiated with it.
    Retarget(Box<(SocketAddr, Mapping)>),
    /// A new browser leg (the page reloaded and negotiated again), with the payload types
    /// mapped for it; the old leg is closed.
    Rebrowse(Box<(Leg, Mapping)>),
}

/// How a call's owner steers its bridge and hears from it.
#[derive(Debug)]
pub struct Controls {
    /// The owner's orders; all senders gone means stop.
    control: mpsc::UnboundedReceiver<Control>,
    /// Digits the SIP side sent as telephone-events (each reported once).
    pub heard: mpsc::UnboundedSender<char>,
    /// When the SIP side's media stops and starts again.
    pub activity: mpsc::UnboundedSender<MediaActivity>,
    /// Where both sides' decoded audio goes when the call is recorded.
    pub tap: Option<super::recorder::Tap>,
    /// How often an RTCP report goes to the SIP side.
    pub rtcp_interval: Duration,
    /// The call's digits waiting: freed here as each ends.
    pub digits: super::dtmf::DigitQueue,
}

/// The owner's ends of a bridge's [`Controls`]. Orders to a bridge that has ended are dropped
/// (with a new browser leg in one, that leg closes).
#[derive(Debug)]
pub struct Steering {
    control: mpsc::UnboundedSender<Control>,
    /// Digits heard from the SIP side.
    pub heard: mpsc::UnboundedReceiver<char>,
    /// The SIP side's media activity.
    pub activity: mpsc::UnboundedReceiver<MediaActivity>,
}

impl Steering {
    /// Forward, hold or stop.
    pub fn flow(&self, flow: Flow) {
        let _ = self.control.send(Control::Flow(flow));
    }

    /// Queues a digit to send as a telephone-event.
    pub fn dtmf(&self, digit: char) {
        let _ = self.control.send(Control::Dtmf(digit));
    }

    /// Points the SIP side at a new peer with the payload types negotiated with it.
    pub fn retarget(&self, remote: SocketAddr, mapping: Mapping) {
        let _ = self
            .control
            .send(Control::Retarget(Box::new((remote, mapping))));
    }

    /// Hands the bridge a new browser leg; the old one is closed.
    pub fn rebrowse(&self, leg: Leg, mapping: Mapping) {
        let _ = self
            .control
            .send(Control::Rebrowse(Box::new((leg, mapping))));
    }
}

/// A connected pair of [`Steering`] (for the call's owner) and [`Controls`] (for [`run`]).
///
/// Both queues are unbounded by construction: orders come from the call's one owner, at most a
/// few per page request or SIP event it handled (and a page's DTMF is capped per request), and
/// heard digits are at most one per RFC 4733 event the far end sent, each reported once, and
/// activity changes at most two per silence threshold.
pub fn controls(digits: super::dtmf::DigitQueue) -> (Steering, Controls) {
    let (control_tx, control) = mpsc::unbounded_channel();
    let (heard, heard_rx) = mpsc::unbounded_channel();
    let (activity, activity_rx) = mpsc::unbounded_channel();
    (
        Steering {
            control: control_tx,
            heard: heard_rx,
            activity: activity_rx,
        },
        Controls {
            control,
            heard,
            activity,
            tap: None,
            rtcp_interval: Duration::from_secs(5),
            digits,
        },
    )
}

/// Runs until told [`Flow::Stop`] (or the [`Steering`] is dropped); returns the statistics.
/// When the browser leg closes (the page went away) the SIP side's audio is dropped until a new
/// leg arrives by `rebrowse` (the page came back) or the call ends. The decisions are
/// [`BridgeCore`]'s; this shell moves packets, orders and time.
pub async fn run(
    mut browser: Leg,
    mut sip: RtpLeg,
    mapping: Mapping,
    ssrc: u32,
    mut ctl: Controls,
) -> BridgeStats {
    let start = Instant::now();
    // What the page said while the call was ringing is not for the far end.
    let stale = browser.discard_pending();
    if stale > 0 {
        tracing::debug!(
            packets = stale,
            "browser audio from before the bridge discarded"
        );
    }
    let mut core = BridgeCore::new(start, mapping, ssrc, ctl.rtcp_interval, ctl.tap.take());
    core.browser_leg(browser.ssrc());
    let mut rtcp_buf = vec![0u8; 1500];
    let rtcp_socket = sip.rtcp_socket();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        // Biased: orders first (a stop is never starved), then the two media sources.
        tokio::select! {
            biased;
            c = ctl.control.recv() => match c {
                None | Some(Control::Flow(Flow::Stop)) => break,
                Some(order) => {
                    steer(order, &mut core, &mut browser, &mut sip).await;
                    report(&mut core, &ctl);
                }
            },
            n = sip.recv(&mut buf) => {
                let Ok(n) = n else { break };
                let out = core.handle_sip_rtp(Instant::now(), buf.get(..n).unwrap_or_default());
                if let Some(out) = out.and_then(|b| RtpPacket::parse(b).ok()) {
                    let octets = out.payload.len();
                    if browser.send_rtp(&out).await.is_ok() {
                        core.sent_to_browser(octets);
                    }
                }
                report(&mut core, &ctl);
            }
            pkt = browser.recv_rtp(), if core.browser_open() => {
                let Some(pkt) = pkt else {
                    tracing::debug!("browser leg gone; waiting for the page to come back");
                    core.browser_gone();
                    continue;
                };
                let p = pkt.packet();
                if let Some(out) = core.handle_browser_rtp(Instant::now(), &p) {
                    if sip.send(out).await {
                        core.sent_to_sip(p.payload.len());
                    }
                }
            }
            () = sleep_until(core.poll_timeout()) => {
                core.handle_timeout(Instant::now(), std::time::SystemTime::now());
                transmit(&mut core, &mut sip, &mut browser).await;
                report(&mut core, &ctl);
            }
            r = rtcp_socket.recv_from(&mut rtcp_buf) => {
                let Ok((n, from)) = r else { continue };
                if sip.accept_rtcp(from) {
                    core.handle_sip_rtcp(Instant::now(), rtcp_buf.get(..n).unwrap_or_default());
                }
            }
        }
    }
    browser.close().await;
    let stats = core.into_stats();
    tracing::debug!(
        to_sip = stats.to_sip,
        to_browser = stats.to_browser,
        sip_in = stats.sip_in.received(),
        lost = stats.sip_in.lost(),
        "bridge ended"
    );
    stats
}

/// An order of the call's owner (all but stop).
async fn steer(order: Control, core: &mut BridgeCore, browser: &mut Leg, sip: &mut RtpLeg) {
    match order {
        Control::Flow(f) => core.flow(f),
        Control::Dtmf(d) => {
            if !core.queue_digit(d) {
                tracing::debug!("digit not sent: no telephone-event, or too many queued");
            }
        }
        Control::Rebrowse(b) => {
            let (mut leg, m) = *b;
            tracing::debug!(mapping = ?m, "browser leg replaced");
            leg.discard_pending();
            let old = std::mem::replace(browser, leg);
            old.close().await;
            core.remap_browser(m);
            core.browser_leg(browser.ssrc());
        }
        Control::Retarget(r) => {
            let (addr, m) = *r;
            // Same streams for both sides, continued from where they are (the Rewriters take
            // the new source's numbering as a source change).
            tracing::debug!(remote = %addr, mapping = ?m, "SIP side retargeted");
            sip.set_remote(addr);
            core.remap_peer(Instant::now(), m);
        }
    }
}

/// Tells the owner what the core heard and saw.
fn report(core: &mut BridgeCore, ctl: &Controls) {
    ctl.digits.release(core.take_finished_digits());
    while let Some(d) = core.poll_digit() {
        let _ = ctl.heard.send(d);
    }
    while let Some(a) = core.poll_activity() {
        let _ = ctl.activity.send(a);
    }
}

/// Sends the core's digits and reports to the SIP side, and its reports to the browser.
async fn transmit(core: &mut BridgeCore, sip: &mut RtpLeg, browser: &mut Leg) {
    while let Some(t) = core.poll_transmit() {
        match t {
            self::core::Transmit::Rtp(bytes) => {
                if sip.send(&bytes).await {
                    core.sent_to_sip(0);
                }
            }
            self::core::Transmit::Rtcp(packet) => {
                let _ = sip.send_rtcp(&packet).await;
            }
            self::core::Transmit::BrowserRtcp(packet) => {
                let _ = browser.send_rtcp(&packet).await;
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
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
