//! The bridge core on a fake clock: packets in, packets out, no sockets.

use std::time::{Duration, Instant, SystemTime};

use super::*;
use crate::media::rewrite::PtMap;

/// Browser PCMU 0 + telephone-event 126, SIP PCMU 0 + telephone-event 101.
fn mapping(te: bool) -> Mapping {
    let mut to_sip = vec![PtMap { from: 0, to: 0 }];
    let mut to_browser = vec![PtMap { from: 0, to: 0 }];
    if te {
        to_sip.push(PtMap { from: 126, to: 101 });
        to_browser.push(PtMap { from: 101, to: 126 });
    }
    Mapping {
        to_sip,
        to_browser,
        sip_telephone_event: te.then_some(101),
        voice: (0, 0, false),
    }
}

fn rtp(pt: u8, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    RtpPacket {
        marker: false,
        payload_type: pt,
        sequence: seq,
        timestamp: u32::from(seq) * 160,
        ssrc: 0x1234,
        payload,
    }
    .write(&mut b);
    b
}

fn from_browser(core: &mut BridgeCore, now: Instant, seq: u16) -> bool {
    let data = rtp(0, seq, &[0x55; 160]);
    let p = RtpPacket::parse(&data).unwrap();
    core.handle_browser_rtp(now, &p).is_some()
}

fn transmits(core: &mut BridgeCore) -> Vec<Transmit> {
    std::iter::from_fn(|| core.poll_transmit()).collect()
}

#[test]
fn hold_forwards_nothing_either_way_and_forward_resumes() {
    let t0 = Instant::now();
    let mut c = BridgeCore::new(t0, mapping(true), 7, Duration::from_secs(5), None);
    assert!(c.handle_sip_rtp(t0, &rtp(0, 1, &[1; 160])).is_some());
    assert!(from_browser(&mut c, t0, 1));
    c.flow(Flow::Hold);
    let t = t0 + Duration::from_millis(20);
    assert!(c.handle_sip_rtp(t, &rtp(0, 2, &[1; 160])).is_none());
    assert!(!from_browser(&mut c, t, 2));
    c.flow(Flow::Forward);
    let t = t0 + Duration::from_millis(40);
    let out = c
        .handle_sip_rtp(t, &rtp(0, 3, &[1; 160]))
        .map(<[u8]>::to_vec);
    let out = out.expect("forwarded again");
    let p = RtpPacket::parse(&out).unwrap();
    assert_eq!((p.payload_type, p.ssrc), (0, 7 ^ 0x5555_5555));
    // The far end's packets are counted while held too (its stream's statistics).
    assert_eq!(c.into_stats().sip_in.received(), 3);
}

#[test]
fn digits_go_out_on_the_clock_and_pause_the_agents_audio() {
    let t0 = Instant::now();
    let mut c = BridgeCore::new(t0, mapping(true), 7, Duration::from_secs(5), None);
    assert!(c.queue_digit('5') && c.queue_digit('#'));
    assert_eq!(c.poll_timeout(), Some(t0), "the first digit starts now");
    c.handle_timeout(t0, SystemTime::now());
    let first = transmits(&mut c);
    assert_eq!(first.len(), 1, "{first:?}");
    let Transmit::Rtp(b) = &first[0] else {
        panic!("{first:?}")
    };
    let p = RtpPacket::parse(b).unwrap();
    assert!(p.marker && p.payload_type == 101, "{p:?}");
    assert_eq!(
        dtmf::TelephoneEvent::parse(p.payload).map(|e| e.event),
        Some(5)
    );
    // While the digit goes out the agent's audio waits.
    assert!(!from_browser(&mut c, t0 + Duration::from_millis(10), 1));
    // Every 20 ms the next packet; the three end packets together at 100 ms.
    let mut at = Vec::new();
    let mut now = t0;
    for _ in 0..20 {
        let Some(due) = c
            .poll_timeout()
            .filter(|d| *d < t0 + Duration::from_secs(1))
        else {
            break;
        };
        now = due;
        c.handle_timeout(now, SystemTime::now());
        for t in transmits(&mut c) {
            if let Transmit::Rtp(b) = t {
                let e = dtmf::TelephoneEvent::parse(RtpPacket::parse(&b).unwrap().payload).unwrap();
                at.push((now.duration_since(t0).as_millis(), e.event, e.end));
            }
        }
    }
    assert_eq!(
        at,
        [
            (20, 5, false),
            (40, 5, false),
            (60, 5, false),
            (80, 5, false),
            (100, 5, true),
            (100, 5, true),
            (100, 5, true),
            // The next digit after an 80 ms gap.
            (180, 11, false),
            (200, 11, false),
            (220, 11, false),
            (240, 11, false),
            (260, 11, false),
            (280, 11, true),
            (280, 11, true),
            (280, 11, true),
        ]
    );
    assert!(
        from_browser(&mut c, now + Duration::from_millis(1), 2),
        "audio again"
    );
}

#[test]
fn digits_are_bounded_and_need_telephone_event() {
    let t0 = Instant::now();
    let mut none = BridgeCore::new(t0, mapping(false), 7, Duration::from_secs(5), None);
    assert!(
        !none.queue_digit('1'),
        "no telephone-event negotiated: SIP INFO instead"
    );
    let mut c = BridgeCore::new(t0, mapping(true), 7, Duration::from_secs(5), None);
    for _ in 0..MAX_QUEUED_DIGITS {
        assert!(c.queue_digit('1'));
    }
    assert!(
        !c.queue_digit('1'),
        "a flood of digits is not queued without bound"
    );
    assert_eq!(
        none.take_finished_digits(),
        1,
        "a dropped digit is finished"
    );
    assert_eq!(c.take_finished_digits(), 1);
}

/// Each digit is counted finished once it has been sent, so the session's queue frees its room
/// at the pace the far end hears them: 200 ms a digit.
#[test]
fn digits_are_counted_finished_as_they_are_sent() {
    let t0 = Instant::now();
    let mut c = BridgeCore::new(t0, mapping(true), 7, Duration::from_secs(5), None);
    for d in "123".chars() {
        assert!(c.queue_digit(d));
    }
    let mut finished = Vec::new();
    while let Some(now) = c
        .poll_timeout()
        .filter(|d| *d < t0 + Duration::from_secs(1))
    {
        c.handle_timeout(now, SystemTime::now());
        let _ = transmits(&mut c);
        for _ in 0..c.take_finished_digits() {
            finished.push(now.duration_since(t0).as_millis());
        }
    }
    assert_eq!(finished, [100, 280, 460]);
    assert_eq!(c.take_finished_digits(), 0);
}

#[test]
fn the_session_digit_queue_refuses_what_would_pass_the_limit() {
    let q = crate::media::dtmf::DigitQueue::default();
    assert!(q.try_reserve(60));
    assert!(!q.try_reserve(5), "all or nothing");
    assert_eq!(q.len(), 60);
    assert!(q.try_reserve(4));
    assert!(!q.try_reserve(1));
    q.release(3);
    assert!(q.try_reserve(3));
    q.release(usize::MAX);
    assert!(q.is_empty());
    assert!(!q.try_reserve(usize::MAX), "no overflow");
}

#[test]
fn digits_heard_from_the_far_end_are_reported_once() {
    let t0 = Instant::now();
    let mut c = BridgeCore::new(t0, mapping(true), 7, Duration::from_secs(5), None);
    let ev = |end: bool, duration: u16| {
        dtmf::TelephoneEvent {
            event: 9,
            end,
            volume: 10,
            duration,
        }
        .to_bytes()
    };
    for (seq, (end, d)) in [(false, 160), (false, 320), (true, 480), (true, 480)]
        .into_iter()
        .enumerate()
    {
        let mut b = Vec::new();
        RtpPacket {
            marker: seq == 0,
            payload_type: 101,
            sequence: seq as u16,
            timestamp: 8000,
            ssrc: 0x1234,
            payload: &ev(end, d),
        }
        .write(&mut b);
        let _ = c.handle_sip_rtp(t0 + Duration::from_millis(20 * seq as u64), &b);
    }
    assert_eq!(
        std::iter::from_fn(|| c.poll_digit()).collect::<String>(),
        "9"
    );
}

#[test]
fn rtcp_reports_go_on_the_interval_with_a_block_once_the_far_end_sent() {
    let t0 = Instant::now();
    let every = Duration::from_secs(5);
    let mut c = BridgeCore::new(t0, mapping(true), 7, every, None);
    assert_eq!(
        c.poll_timeout(),
        Some(t0 + SILENCE),
        "the silence watch first"
    );
    c.handle_timeout(t0 + SILENCE, SystemTime::now());
    assert!(transmits(&mut c).is_empty());
    // The browser's first report comes early, then both on the interval.
    assert_eq!(c.poll_timeout(), Some(t0 + FIRST_BROWSER_REPORT));
    c.handle_timeout(t0 + FIRST_BROWSER_REPORT, SystemTime::now());
    assert!(matches!(&transmits(&mut c)[..], [Transmit::BrowserRtcp(_)]));
    assert_eq!(c.poll_timeout(), Some(t0 + every));
    c.handle_timeout(t0 + every, SystemTime::now());
    let first = transmits(&mut c);
    let [Transmit::Rtcp(sr)] = &first[..] else {
        panic!("{first:?}")
    };
    let parsed = rtcp::parse(sr).expect("our own SR parses");
    assert!(parsed.blocks.is_empty(), "no far-end stream yet");
    let _ = c.handle_sip_rtp(t0 + every, &rtp(0, 1, &[1; 160]));
    // A late wake-up does not burst the missed reports.
    c.handle_timeout(t0 + every * 3 + Duration::from_millis(7), SystemTime::now());
    let second = transmits(&mut c);
    let [Transmit::Rtcp(sr), Transmit::BrowserRtcp(_)] = &second[..] else {
        panic!("{second:?}")
    };
    let parsed = rtcp::parse(sr).unwrap();
    assert_eq!(parsed.blocks.len(), 1);
    assert_eq!(parsed.blocks[0].ssrc, 0x1234);
    // The browser's next (it runs 1 s after the SIP side's), then the SIP side's.
    assert_eq!(
        c.poll_timeout(),
        Some(t0 + FIRST_BROWSER_REPORT + every * 3)
    );
    c.handle_timeout(t0 + FIRST_BROWSER_REPORT + every * 3, SystemTime::now());
    let _ = transmits(&mut c);
    assert_eq!(c.poll_timeout(), Some(t0 + every * 4));
}

#[test]
fn the_browser_gets_reports_on_its_stream_from_the_legs_ssrc() {
    let t0 = Instant::now();
    let every = Duration::from_secs(5);
    let mut c = BridgeCore::new(t0, mapping(true), 7, every, None);
    c.browser_leg(0xb0b);
    // Ten packets from the browser, one lost (seq 5), and two sent to it.
    for seq in (1..=11).filter(|s| *s != 5) {
        let _ = from_browser(&mut c, t0 + Duration::from_millis(20 * u64::from(seq)), seq);
    }
    c.sent_to_browser(160);
    c.sent_to_browser(160);
    c.handle_timeout(t0 + every, SystemTime::now());
    let out = transmits(&mut c);
    let Some(Transmit::BrowserRtcp(report)) = out.get(1) else {
        panic!("{out:?}")
    };
    let parsed = rtcp::parse(report).expect("a compound report");
    assert_eq!(
        parsed.sender.map(|s| s.0),
        Some(0xb0b),
        "an SR from the leg's SSRC"
    );
    let [block] = &parsed.blocks[..] else {
        panic!("{parsed:?}")
    };
    assert_eq!(
        (block.ssrc, block.cumulative_lost, block.highest_seq),
        (0x1234, 1, 11)
    );
    // Gone: no more reports to the browser; a new leg starts its figures afresh.
    c.browser_gone();
    c.handle_timeout(t0 + every * 2, SystemTime::now());
    assert!(
        !transmits(&mut c)
            .iter()
            .any(|t| matches!(t, Transmit::BrowserRtcp(_)))
    );
    c.browser_leg(0xb0c);
    c.remap_browser(mapping(true));
    c.handle_timeout(t0 + every * 3, SystemTime::now());
    let out = transmits(&mut c);
    let Some(Transmit::BrowserRtcp(report)) = out.get(1) else {
        panic!("{out:?}")
    };
    assert!(
        rtcp::parse(report).unwrap().blocks.is_empty(),
        "the new leg's browser sent nothing yet"
    );
}

#[test]
fn silence_on_the_sip_side_is_reported_once_and_its_end_too() {
    let t0 = Instant::now();
    let mut c = BridgeCore::new(t0, mapping(true), 7, Duration::from_secs(5), None);
    assert_eq!(c.poll_timeout(), Some(t0 + SILENCE));
    c.handle_timeout(t0 + SILENCE, SystemTime::now());
    assert_eq!(c.poll_activity(), Some(MediaActivity::Silent { since: t0 }));
    assert_eq!(c.poll_activity(), None);
    assert_eq!(
        c.poll_timeout(),
        Some(t0 + FIRST_BROWSER_REPORT),
        "only RTCP until media comes"
    );
    let t = t0 + Duration::from_secs(2);
    let _ = c.handle_sip_rtp(t, &rtp(0, 1, &[1; 160]));
    assert_eq!(c.poll_activity(), Some(MediaActivity::Flowing));
    let _ = c.handle_sip_rtp(t + Duration::from_millis(20), &rtp(0, 2, &[1; 160]));
    assert_eq!(c.poll_activity(), None, "no event per packet");
    // A new far end counts its silence from the retarget.
    let moved = t + Duration::from_secs(1);
    c.remap_peer(moved, mapping(true));
    c.handle_timeout(moved + SILENCE, SystemTime::now());
    assert_eq!(
        c.poll_activity(),
        Some(MediaActivity::Silent { since: moved })
    );
}
