//! The bridge's decisions, sans-IO: payload types and stream continuity each way (through the
//! [`Rewriter`]s), hold, RFC 4733 digits sent (scheduled on the clock, the agent's audio paused
//! meanwhile) and heard, the recording tap, and RTCP toward the SIP side (our SR with a report
//! block on the far end's stream, on an interval; the far end's SR/RR read).
//!
//! Packets in: [`handle_sip_rtp`](BridgeCore::handle_sip_rtp) and
//! [`handle_browser_rtp`](BridgeCore::handle_browser_rtp) return what to send the other way
//! (borrowed: nothing is allocated per packet), [`handle_sip_rtcp`](BridgeCore::handle_sip_rtcp).
//! Time: [`handle_timeout`](BridgeCore::handle_timeout) at [`poll_timeout`](BridgeCore::poll_timeout),
//! then [`poll_transmit`](BridgeCore::poll_transmit) (digits, reports) and
//! [`poll_digit`](BridgeCore::poll_digit) (heard digits). Orders: [`flow`](BridgeCore::flow),
//! [`queue_digit`](BridgeCore::queue_digit), [`remap`](BridgeCore::remap).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::super::dtmf::{self, Scheduled};
use super::super::recorder::{Side, Tap};
use super::super::rewrite::Rewriter;
use super::super::rtcp;
use super::super::rtp::RtpPacket;
use super::{BridgeStats, Flow, Mapping, MediaActivity};

/// Length of one DTMF digit we send, and the pause before the next.
const DIGIT_MS: u32 = 120;
const DIGIT_GAP: Duration = Duration::from_millis(80);
pub(crate) use super::super::dtmf::MAX_QUEUED_DIGITS;
/// The shortest RTCP interval.
const MIN_RTCP_INTERVAL: Duration = Duration::from_millis(100);
/// SIP-side silence this long is reported (as from its start): well under any media timeout.
pub(crate) const SILENCE: Duration = Duration::from_millis(500);
/// When the browser gets its first report.
const FIRST_BROWSER_REPORT: Duration = Duration::from_secs(1);

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

/// What goes to the SIP side besides relayed audio.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Transmit {
    /// An RTP packet (a telephone-event) on the RTP socket.
    Rtp(Vec<u8>),
    /// A compound RTCP packet on the RTCP socket.
    Rtcp(Vec<u8>),
    /// A compound report for the browser (SR on our stream to it, a block on its stream), so
    /// its `getStats()` has remote-inbound figures.
    BrowserRtcp(Vec<u8>),
}

/// The sans-IO core of one bridge.
pub(crate) struct BridgeCore {
    start: Instant,
    ssrc: u32,
    sip_te: Option<u8>,
    /// The voice codec: browser PT, SIP PT, whether PCMA.
    voice: (u8, u8, bool),
    to_sip: Rewriter,
    to_browser: Rewriter,
    stats: BridgeStats,
    octets_to_sip: u64,
    sip_ssrc: Option<u32>,
    /// The middle bits of the SIP side's last SR and when it came (for LSR / DLSR).
    last_sr: Option<(u32, Instant)>,
    held: bool,
    digits: VecDeque<char>,
    /// Digits ended (sent or dropped) since [`take_finished_digits`](Self::take_finished_digits).
    finished_digits: usize,
    sending: Option<Sending>,
    next_digit_at: Instant,
    heard: dtmf::Receiver,
    heard_out: VecDeque<char>,
    browser_open: bool,
    /// The SSRC the browser leg sends under, and the browser's own stream's.
    browser_leg_ssrc: u32,
    browser_ssrc: Option<u32>,
    octets_to_browser: u64,
    /// The browser's first report comes soon (its `getStats()` fills in), then on the interval.
    next_browser_rtcp: Instant,
    rtcp_interval: Duration,
    next_rtcp: Instant,
    tap: Option<Tap>,
    out: VecDeque<Transmit>,
    /// The SIP side's last packet (or the start, or a retarget), and whether its silence since
    /// was reported.
    last_sip: Instant,
    silent: bool,
    activity: VecDeque<MediaActivity>,
}

impl BridgeCore {
    /// A bridge starting at `now` with `mapping`, sending as `ssrc` (and `ssrc ^ 0x55555555`
    /// toward the browser), reporting RTCP every `rtcp_interval`, recording into `tap`.
    pub(crate) fn new(
        now: Instant,
        mapping: Mapping,
        ssrc: u32,
        rtcp_interval: Duration,
        tap: Option<Tap>,
    ) -> BridgeCore {
        BridgeCore {
            start: now,
            ssrc,
            sip_te: mapping.sip_telephone_event,
            voice: mapping.voice,
            to_sip: Rewriter::new(ssrc, 8000, mapping.to_sip),
            to_browser: Rewriter::new(ssrc ^ 0x5555_5555, 8000, mapping.to_browser),
            stats: BridgeStats::default(),
            octets_to_sip: 0,
            sip_ssrc: None,
            last_sr: None,
            held: false,
            digits: VecDeque::new(),
            finished_digits: 0,
            sending: None,
            next_digit_at: now,
            heard: dtmf::Receiver::default(),
            heard_out: VecDeque::new(),
            browser_open: true,
            browser_leg_ssrc: 0,
            browser_ssrc: None,
            octets_to_browser: 0,
            next_browser_rtcp: now + FIRST_BROWSER_REPORT.min(rtcp_interval),
            rtcp_interval: rtcp_interval.max(MIN_RTCP_INTERVAL),
            next_rtcp: now + rtcp_interval,
            tap,
            out: VecDeque::new(),
            last_sip: now,
            silent: false,
            activity: VecDeque::new(),
        }
    }

    /// Hold (nothing forwarded) or forward again; both streams continue seamlessly.
    pub(crate) fn flow(&mut self, f: Flow) {
        match f {
            Flow::Hold => self.held = true,
            Flow::Forward if self.held => {
                self.held = false;
                self.to_sip.rebase();
                self.to_browser.rebase();
            }
            Flow::Forward | Flow::Stop => {}
        }
    }

    /// A digit to send as a telephone-event (dropped when the far end negotiated none, or
    /// [`MAX_QUEUED_DIGITS`] wait already: the session's [`DigitQueue`] keeps pages below).
    ///
    /// [`DigitQueue`]: super::super::dtmf::DigitQueue
    pub(crate) fn queue_digit(&mut self, d: char) -> bool {
        if self.sip_te.is_none() || self.digits.len() >= MAX_QUEUED_DIGITS {
            self.finished_digits += 1;
            return false;
        }
        self.digits.push_back(d);
        true
    }

    /// How many digits ended (were sent or dropped) since the last call.
    pub(crate) fn take_finished_digits(&mut self) -> usize {
        std::mem::take(&mut self.finished_digits)
    }

    /// New payload types; each stream continues from where it is.
    fn remap(&mut self, m: Mapping) {
        self.to_sip.set_map(m.to_sip);
        self.to_browser.set_map(m.to_browser);
        self.to_sip.rebase();
        self.to_browser.rebase();
        self.sip_te = m.sip_telephone_event;
        self.voice = m.voice;
    }

    /// A new SIP-side peer at `now` (a re-INVITE moved its media, a followed transfer): its
    /// digits start afresh, and its silence counts from now.
    pub(crate) fn remap_peer(&mut self, now: Instant, m: Mapping) {
        self.remap(m);
        self.heard = dtmf::Receiver::default();
        self.sending = None;
        self.sip_packet(now);
    }

    /// A new browser leg (the page came back).
    pub(crate) fn remap_browser(&mut self, m: Mapping) {
        self.remap(m);
        self.browser_open = true;
    }

    /// The SIP side is heard from at `now`.
    fn sip_packet(&mut self, now: Instant) {
        self.last_sip = now;
        if std::mem::take(&mut self.silent) {
            self.activity.push_back(MediaActivity::Flowing);
        }
    }

    /// The browser leg closed (the page went away): the SIP side's audio is dropped until a
    /// new leg comes.
    /// The browser leg (a new one after a page reload) sends under `ssrc`: reports to the
    /// browser come from it, and what was counted of the old one's streams starts afresh.
    pub(crate) fn browser_leg(&mut self, ssrc: u32) {
        if ssrc != self.browser_leg_ssrc {
            self.browser_leg_ssrc = ssrc;
            self.browser_ssrc = None;
            self.stats.browser_in = Default::default();
        }
    }

    pub(crate) fn browser_gone(&mut self) {
        self.browser_open = false;
    }

    /// Whether a browser leg is there to read.
    pub(crate) fn browser_open(&self) -> bool {
        self.browser_open
    }

    fn record(&self, side: Side, payload: &[u8]) {
        if let Some(t) = &self.tap {
            let decode = if self.voice.2 {
                super::super::g711::alaw_decode
            } else {
                super::super::g711::ulaw_decode
            };
            // A full recorder queue drops audio rather than slow the call down.
            let _ = t.try_send((side, payload.iter().map(|b| decode(*b)).collect()));
        }
    }

    /// A datagram from the SIP side's RTP socket: the packet to send the browser, if any.
    pub(crate) fn handle_sip_rtp(&mut self, now: Instant, data: &[u8]) -> Option<&[u8]> {
        let p = RtpPacket::parse(data).ok()?;
        self.sip_packet(now);
        self.sip_ssrc = Some(p.ssrc);
        let arrival = now.saturating_duration_since(self.start).as_millis() as u64 * 8;
        self.stats
            .sip_in
            .on_packet(p.sequence, p.timestamp, p.payload.len(), arrival);
        if self.held || !self.browser_open {
            return None;
        }
        if Some(p.payload_type) == self.sip_te {
            if let Some(d) = self.heard.on_packet(p.timestamp, p.payload) {
                self.heard_out.push_back(d);
            }
        } else if p.payload_type == self.voice.1 {
            self.record(Side::Far, p.payload);
        }
        self.to_browser.rewrite(now, &p)
    }

    /// A packet of the browser's: what to send the SIP side, if any. While a telephone-event
    /// goes out, the browser's audio waits (RFC 4733 §2.5.1.1).
    pub(crate) fn handle_browser_rtp(&mut self, now: Instant, p: &RtpPacket<'_>) -> Option<&[u8]> {
        self.browser_ssrc = Some(p.ssrc);
        let arrival = now.saturating_duration_since(self.start).as_millis() as u64 * 8;
        self.stats
            .browser_in
            .on_packet(p.sequence, p.timestamp, p.payload.len(), arrival);
        if self.held || self.sending.is_some() {
            return None;
        }
        if p.payload_type == self.voice.0 {
            self.record(Side::Agent, p.payload);
        }
        self.to_sip.rewrite(now, p)
    }

    /// A packet with `octets` of payload went to the browser.
    pub(crate) fn sent_to_browser(&mut self, octets: usize) {
        self.stats.to_browser += 1;
        self.octets_to_browser += octets as u64;
    }

    /// A packet with `octets` of payload went to the SIP side.
    pub(crate) fn sent_to_sip(&mut self, octets: usize) {
        self.stats.to_sip += 1;
        self.octets_to_sip += octets as u64;
    }

    /// An RTCP datagram from the SIP side (from its accepted address).
    pub(crate) fn handle_sip_rtcp(&mut self, now: Instant, data: &[u8]) {
        if let Some(inc) = rtcp::parse(data) {
            if let Some((_, lsr)) = inc.sender {
                self.last_sr = Some((lsr, now));
            }
            if let Some(b) = inc.blocks.iter().find(|b| b.ssrc == self.ssrc) {
                self.stats.far_end = Some(*b);
            }
        }
    }

    fn dtmf_due(&self) -> Option<Instant> {
        match &self.sending {
            Some(s) => s.due(),
            None if !self.digits.is_empty() => Some(self.next_digit_at),
            None => None,
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) is due: the next telephone-event packet
    /// or digit, the next RTCP report, or the SIP side's silence to report.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let silence = (!self.silent).then_some(self.last_sip + SILENCE);
        [
            self.dtmf_due(),
            Some(self.next_rtcp),
            Some(self.next_browser_rtcp),
            silence,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Time passed: what is due of the digits being sent, and the RTCP report.
    pub(crate) fn handle_timeout(&mut self, now: Instant, wall: std::time::SystemTime) {
        if self.dtmf_due().is_some_and(|d| d <= now) {
            self.send_digits(now);
        }
        if !self.silent && self.last_sip + SILENCE <= now {
            self.silent = true;
            self.activity.push_back(MediaActivity::Silent {
                since: self.last_sip,
            });
        }
        if self.next_rtcp <= now {
            while self.next_rtcp <= now {
                self.next_rtcp += self.rtcp_interval;
            }
            let report = self.report(now, wall);
            self.out.push_back(Transmit::Rtcp(report));
        }
        if self.next_browser_rtcp <= now {
            while self.next_browser_rtcp <= now {
                self.next_browser_rtcp += self.rtcp_interval;
            }
            if self.browser_open {
                let report = self.browser_report(now, wall);
                self.out.push_back(Transmit::BrowserRtcp(report));
            }
        }
    }

    fn send_digits(&mut self, now: Instant) {
        let Some(pt) = self.sip_te else {
            self.finished_digits += self.digits.len() + usize::from(self.sending.is_some());
            self.digits.clear();
            self.sending = None;
            return;
        };
        if self.sending.is_none() {
            let Some(digit) = self.digits.pop_front() else {
                return;
            };
            let Some(packets) = dtmf::digit_schedule(digit, DIGIT_MS) else {
                self.finished_digits += 1;
                return;
            };
            self.sending = Some(Sending {
                started: now,
                timestamp: self.to_sip.timestamp_at(now),
                packets,
                next: 0,
            });
        }
        let Some(s) = self.sending.as_mut() else {
            return;
        };
        // Send what is due (several end packets share one instant).
        while let Some(p) = s.packets.get(s.next).copied() {
            if s.started + Duration::from_millis(u64::from(p.at_ms)) > now {
                break;
            }
            s.next += 1;
            if self.held {
                continue;
            }
            let bytes =
                self.to_sip
                    .inject(s.started, p.marker, pt, s.timestamp, &p.event.to_bytes());
            self.out.push_back(Transmit::Rtp(bytes.to_vec()));
        }
        if s.next >= s.packets.len() {
            self.sending = None;
            self.finished_digits += 1;
            self.next_digit_at = now + DIGIT_GAP;
        }
    }

    /// Our SR, with a report block on the SIP side's stream once it sent one.
    fn report(&mut self, now: Instant, wall: std::time::SystemTime) -> Vec<u8> {
        let (lsr, dlsr) = self.last_sr.map_or((0, 0), |(lsr, at)| {
            let d = now.saturating_duration_since(at);
            (lsr, (d.as_secs_f64() * 65536.0) as u32)
        });
        let block = self
            .sip_ssrc
            .map(|s| rtcp::ReportBlock::from_stats(s, &mut self.stats.sip_in, (lsr, dlsr)));
        let sent = rtcp::Sent {
            ssrc: self.ssrc,
            rtp_timestamp: self.to_sip.timestamp_at(now),
            packets: self.stats.to_sip as u32,
            octets: self.octets_to_sip as u32,
        };
        rtcp::compound(rtcp::ntp(wall), sent, block, "callgate")
    }

    /// Our report to the browser: an SR on the stream we send it (an RR before the first
    /// packet), with a block on its stream once it sent one.
    fn browser_report(&mut self, now: Instant, wall: std::time::SystemTime) -> Vec<u8> {
        // (The browser's own reports are not read: no LSR to give back.)
        let block = self
            .browser_ssrc
            .map(|s| rtcp::ReportBlock::from_stats(s, &mut self.stats.browser_in, (0, 0)));
        let sent = rtcp::Sent {
            ssrc: self.browser_leg_ssrc,
            rtp_timestamp: self.to_browser.timestamp_at(now),
            packets: self.stats.to_browser as u32,
            octets: self.octets_to_browser as u32,
        };
        rtcp::compound(rtcp::ntp(wall), sent, block, "callgate")
    }

    /// The next packet for the SIP side (digits, reports).
    pub(crate) fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    /// The next change of the SIP side's media activity.
    pub(crate) fn poll_activity(&mut self) -> Option<MediaActivity> {
        self.activity.pop_front()
    }

    /// The next digit heard from the SIP side.
    pub(crate) fn poll_digit(&mut self) -> Option<char> {
        self.heard_out.pop_front()
    }

    /// Ends the bridge: its statistics.
    pub(crate) fn into_stats(self) -> BridgeStats {
        self.stats
    }
}

#[cfg(test)]
mod tests;
