//! The bridge: browser (WebRTC leg) ⇄ SIP (RTP leg), one task per call. Each direction goes
//! through a [`Rewriter`], so each side sees one continuous stream with its own payload types.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::dtmf::{self, Scheduled};
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

/// When the SIP side last sent media, for the inactivity hang-up (read by the call's owner,
/// which knows whether silence is expected, e.g. on hold).
#[derive(Debug)]
pub struct Activity {
    base: Instant,
    last_sip_ms: AtomicU64,
}

impl Activity {
    /// Starts counting now.
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            base: Instant::now(),
            last_sip_ms: AtomicU64::new(0),
        })
    }

    fn touch(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.base).as_millis() as u64;
        self.last_sip_ms.store(ms, Ordering::Relaxed);
    }

    /// How long since the SIP side's last RTP packet (or since the bridge started).
    pub fn sip_idle(&self, now: Instant) -> Duration {
        let last = self.base + Duration::from_millis(self.last_sip_ms.load(Ordering::Relaxed));
        now.saturating_duration_since(last)
    }
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
    /// Updated on each SIP-side packet.
    pub activity: Arc<Activity>,
    /// Where both sides' decoded audio goes when the call is recorded.
    pub tap: Option<super::recorder::Tap>,
    /// How often an RTCP report goes to the SIP side.
    pub rtcp_interval: Duration,
}

/// The owner's ends of a bridge's [`Controls`]. Orders to a bridge that has ended are dropped
/// (with a new browser leg in one, that leg closes).
#[derive(Debug)]
pub struct Steering {
    control: mpsc::UnboundedSender<Control>,
    /// Digits heard from the SIP side.
    pub heard: mpsc::UnboundedReceiver<char>,
    /// The SIP side's media activity.
    pub activity: Arc<Activity>,
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
/// heard digits are at most one per RFC 4733 event the far end sent, each reported once.
pub fn controls() -> (Steering, Controls) {
    let (control_tx, control) = mpsc::unbounded_channel();
    let (heard, heard_rx) = mpsc::unbounded_channel();
    let activity = Activity::new();
    (
        Steering {
            control: control_tx,
            heard: heard_rx,
            activity: activity.clone(),
        },
        Controls {
            control,
            heard,
            activity,
            tap: None,
            rtcp_interval: Duration::from_secs(5),
        },
    )
}

/// Length of one DTMF digit we send, and the pause before the next.
const DIGIT_MS: u32 = 120;
const DIGIT_GAP: Duration = Duration::from_millis(80);

/// The telephone-event we are sending: its packets, the next one, and the event's timestamp.
struct Sending {
    started: Instant,
    timestamp: u32,
    packets: Vec<Scheduled>,
    next: usize,
}

impl Sending {
    fn due(&self) -> Option<Instant> {
        let p = self.packets.get(self.next)?;
        Some(self.started + Duration::from_millis(u64::from(p.at_ms)))
    }
}

/// Runs until told [`Flow::Stop`] (or the [`Steering`] is dropped); returns the statistics. When the browser leg closes
/// (the page went away) the SIP side's audio is dropped until a new leg arrives by `rebrowse`
/// (the page came back) or the call ends.
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
    let mut sip_te = mapping.sip_telephone_event;
    let mut voice = mapping.voice;
    // RTCP: our reports every interval; what the SIP side says of our stream.
    let mut rtcp_tick = tokio::time::interval_at(
        (start + ctl.rtcp_interval).into(),
        ctl.rtcp_interval.max(Duration::from_millis(100)),
    );
    let mut rtcp_buf = vec![0u8; 1500];
    let rtcp_socket = sip.rtcp_socket();
    let mut octets_to_sip: u64 = 0;
    let mut sip_ssrc: Option<u32> = None;
    // The middle bits of the SIP side's last SR and when it came (for LSR / DLSR).
    let mut last_sr: Option<(u32, Instant)> = None;
    // Decoded audio of one side for the recorder (a full recorder queue drops audio rather
    // than slow the call down).
    let record = |tap: &Option<super::recorder::Tap>, side, alaw: bool, payload: &[u8]| {
        if let Some(t) = tap {
            let decode = if alaw {
                super::g711::alaw_decode
            } else {
                super::g711::ulaw_decode
            };
            let _ = t.try_send((side, payload.iter().map(|b| decode(*b)).collect()));
        }
    };
    let mut to_sip = Rewriter::new(ssrc, 8000, mapping.to_sip);
    let mut to_browser = Rewriter::new(ssrc ^ 0x5555_5555, 8000, mapping.to_browser);
    let mut stats = BridgeStats::default();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut held = false;
    let mut digits: VecDeque<char> = VecDeque::new();
    let mut sending: Option<Sending> = None;
    let mut next_digit_at = start;
    let mut heard = dtmf::Receiver::default();
    let mut browser_open = true;
    ctl.activity.touch(start);
    loop {
        // The next telephone-event packet to send, or the next digit to start.
        let wake = match &sending {
            Some(s) => s.due(),
            None if !digits.is_empty() => Some(next_digit_at),
            None => None,
        };
        // Biased: orders first (a stop is never starved), then the two media sources.
        tokio::select! {
            biased;
            c = ctl.control.recv() => match c {
                None | Some(Control::Flow(Flow::Stop)) => break,
                Some(Control::Flow(Flow::Hold)) => held = true,
                Some(Control::Flow(Flow::Forward)) => {
                    if held {
                        held = false;
                        to_sip.rebase();
                        to_browser.rebase();
                    }
                }
                Some(Control::Dtmf(d)) => {
                    if sip_te.is_some() {
                        digits.push_back(d);
                    }
                }
                Some(Control::Rebrowse(b)) => {
                    let (mut leg, m) = *b;
                    tracing::debug!(mapping = ?m, "browser leg replaced");
                    leg.discard_pending();
                    let old = std::mem::replace(&mut browser, leg);
                    old.close().await;
                    browser_open = true;
                    (sip_te, voice) = remap(&mut to_sip, &mut to_browser, m);
                }
                Some(Control::Retarget(r)) => {
                    let (addr, m) = *r;
                    // Same streams for both sides, continued from where they are (the
                    // Rewriters take the new source's numbering as a source change).
                    tracing::debug!(remote = %addr, mapping = ?m, "SIP side retargeted");
                    sip.set_remote(addr);
                    (sip_te, voice) = remap(&mut to_sip, &mut to_browser, m);
                    heard = dtmf::Receiver::default();
                    sending = None;
                    ctl.activity.touch(Instant::now());
                }
            },
            n = sip.recv(&mut buf) => {
                let Ok(n) = n else { break };
                let Ok(p) = RtpPacket::parse(buf.get(..n).unwrap_or_default()) else { continue };
                let now = Instant::now();
                ctl.activity.touch(now);
                sip_ssrc = Some(p.ssrc);
                let arrival = now.saturating_duration_since(start).as_millis() as u64 * 8;
                stats.sip_in.on_packet(p.sequence, p.timestamp, p.payload.len(), arrival);
                if held || !browser_open {
                    continue;
                }
                if Some(p.payload_type) == sip_te {
                    if let Some(d) = heard.on_packet(p.timestamp, p.payload) {
                        let _ = ctl.heard.send(d);
                    }
                } else if p.payload_type == voice.1 {
                    record(&ctl.tap, super::recorder::Side::Far, voice.2, p.payload);
                }
                if let Some(out) = to_browser.rewrite(now, &p).and_then(|b| RtpPacket::parse(b).ok()) {
                    if browser.send_rtp(&out).await.is_ok() {
                        stats.to_browser += 1;
                    }
                }
            }
            pkt = browser.recv_rtp(), if browser_open => {
                let Some(pkt) = pkt else {
                    tracing::debug!("browser leg gone; waiting for the page to come back");
                    browser_open = false;
                    continue;
                };
                let p = pkt.packet();
                // While we send a telephone-event, the browser's audio waits (RFC 4733 §2.5.1.1).
                if held || sending.is_some() {
                    continue;
                }
                if p.payload_type == voice.0 {
                    record(&ctl.tap, super::recorder::Side::Agent, voice.2, p.payload);
                }
                if let Some(out) = to_sip.rewrite(Instant::now(), &p) {
                    if sip.send(out).await {
                        stats.to_sip += 1;
                        octets_to_sip += p.payload.len() as u64;
                    }
                }
            }
            () = sleep_until(wake), if wake.is_some() => {
                let now = Instant::now();
                let Some(pt) = sip_te else { digits.clear(); sending = None; continue };
                if sending.is_none() {
                    let Some(packets) = digits.pop_front().and_then(|d| dtmf::digit_schedule(d, DIGIT_MS)) else { continue };
                    sending = Some(Sending { started: now, timestamp: to_sip.timestamp_at(now), packets, next: 0 });
                }
                let Some(s) = sending.as_mut() else { continue };
                // Send what is due (several end packets share one instant).
                while let Some(p) = s.packets.get(s.next).copied() {
                    if s.started + Duration::from_millis(u64::from(p.at_ms)) > now {
                        break;
                    }
                    s.next += 1;
                    if held {
                        continue;
                    }
                    let bytes = to_sip.inject(s.started, p.marker, pt, s.timestamp, &p.event.to_bytes());
                    if sip.send(bytes).await {
                        stats.to_sip += 1;
                    }
                }
                if s.next >= s.packets.len() {
                    sending = None;
                    next_digit_at = now + DIGIT_GAP;
                }
            }
            r = rtcp_socket.recv_from(&mut rtcp_buf) => {
                let Ok((n, from)) = r else { continue };
                if !sip.accept_rtcp(from) {
                    continue;
                }
                if let Some(inc) = rtcp_buf.get(..n).and_then(super::rtcp::parse) {
                    if let Some((_, lsr)) = inc.sender {
                        last_sr = Some((lsr, Instant::now()));
                    }
                    if let Some(b) = inc.blocks.iter().find(|b| b.ssrc == ssrc) {
                        stats.far_end = Some(*b);
                    }
                }
            }
            _ = rtcp_tick.tick() => {
                let now = Instant::now();
                let block = sip_ssrc.map(|s| {
                    let (fraction_lost, cumulative_lost) = stats.sip_in.report_loss();
                    let (lsr, dlsr) = last_sr.map_or((0, 0), |(lsr, at)| {
                        let d = now.saturating_duration_since(at);
                        (lsr, (d.as_secs_f64() * 65536.0) as u32)
                    });
                    super::rtcp::ReportBlock {
                        ssrc: s,
                        fraction_lost,
                        cumulative_lost,
                        highest_seq: stats.sip_in.extended_max(),
                        jitter: u32::try_from(stats.sip_in.jitter()).unwrap_or(u32::MAX),
                        lsr,
                        dlsr,
                    }
                });
                let sent = super::rtcp::Sent {
                    ssrc,
                    rtp_timestamp: to_sip.timestamp_at(now),
                    packets: stats.to_sip as u32,
                    octets: octets_to_sip as u32,
                };
                let packet = super::rtcp::compound(
                    super::rtcp::ntp(std::time::SystemTime::now()),
                    sent,
                    block,
                    "callgate",
                );
                let _ = sip.send_rtcp(&packet).await;
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

/// Puts a new negotiation's payload types in force on both rewriters, each stream continuing
/// from where it is; returns the SIP side's telephone-event PT and the voice codec.
fn remap(
    to_sip: &mut Rewriter,
    to_browser: &mut Rewriter,
    m: Mapping,
) -> (Option<u8>, (u8, u8, bool)) {
    to_sip.set_map(m.to_sip);
    to_browser.set_map(m.to_browser);
    to_sip.rebase();
    to_browser.rebase();
    (m.sip_telephone_event, m.voice)
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
