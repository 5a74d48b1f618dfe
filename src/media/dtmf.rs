//! RFC 4733 telephone-events: the 4-byte payload, a sender schedule for one digit, and a receiver
//! that reports each digit once despite the redundant end packets.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Digits one call may have waiting to be sent as telephone-events (each takes 200 ms and
/// pauses the agent's audio): a page's `dtmf` beyond is refused with `dtmf_queue_full`.
pub const MAX_QUEUED_DIGITS: usize = 64;

/// How many digits a call has waiting to be sent as telephone-events. Shared by the session,
/// which reserves room before it accepts a page's `dtmf`, and the bridge, which frees it as
/// each digit ends or is dropped; so the page is told when digits would be dropped.
#[derive(Debug, Clone, Default)]
pub struct DigitQueue(Arc<AtomicUsize>);

impl DigitQueue {
    /// Takes room for `n` digits, or none if that would exceed [`MAX_QUEUED_DIGITS`].
    pub fn try_reserve(&self, n: usize) -> bool {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                cur.checked_add(n).filter(|t| *t <= MAX_QUEUED_DIGITS)
            })
            .is_ok()
    }

    /// Frees the room of `n` digits (sent, dropped, or handed to SIP INFO).
    pub fn release(&self, n: usize) {
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                Some(cur.saturating_sub(n))
            });
    }

    /// Digits waiting now.
    pub fn len(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One telephone-event payload (RFC 4733 §2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TelephoneEvent {
    /// Event code: 0-9 digits, 10 `*`, 11 `#`, 12-15 `A`-`D`.
    pub event: u8,
    /// End of the event.
    pub end: bool,
    /// Power level in -dBm0 (0-63).
    pub volume: u8,
    /// Duration so far, in timestamp units.
    pub duration: u16,
}

impl TelephoneEvent {
    /// Parses the first 4 bytes of a telephone-event payload.
    pub fn parse(payload: &[u8]) -> Option<TelephoneEvent> {
        let b = payload.get(..4)?;
        Some(TelephoneEvent {
            event: b[0],
            end: b[1] & 0x80 != 0,
            volume: b[1] & 0x3f,
            duration: u16::from_be_bytes([b[2], b[3]]),
        })
    }

    /// The payload bytes.
    pub fn to_bytes(self) -> [u8; 4] {
        let d = self.duration.to_be_bytes();
        [
            self.event,
            (u8::from(self.end) << 7) | (self.volume & 0x3f),
            d[0],
            d[1],
        ]
    }
}

/// The event code of a DTMF digit.
pub fn event_of_digit(c: char) -> Option<u8> {
    match c.to_ascii_uppercase() {
        d @ '0'..='9' => Some(d as u8 - b'0'),
        '*' => Some(10),
        '#' => Some(11),
        l @ 'A'..='D' => Some(l as u8 - b'A' + 12),
        _ => None,
    }
}

/// The digit of an event code.
pub fn digit_of_event(e: u8) -> Option<char> {
    match e {
        0..=9 => Some(char::from(b'0' + e)),
        10 => Some('*'),
        11 => Some('#'),
        12..=15 => Some(char::from(b'A' + e - 12)),
        _ => None,
    }
}

/// One packet of a digit: when to send it (ms after the start), whether it carries the marker,
/// and the payload. All packets of one digit share one RTP timestamp (the event start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduled {
    /// Milliseconds after the start of the event.
    pub at_ms: u32,
    /// RTP marker bit (first packet only).
    pub marker: bool,
    /// The payload.
    pub event: TelephoneEvent,
}

/// The packets for `digit` lasting `duration_ms` (40-2000) at 8 kHz: one every 20 ms with a
/// growing duration, then the end packet three times (RFC 4733 §2.5.1.4).
pub fn digit_schedule(digit: char, duration_ms: u32) -> Option<Vec<Scheduled>> {
    let event = event_of_digit(digit)?;
    let duration_ms = duration_ms.clamp(40, 2000);
    let mut out = Vec::new();
    let mut t = 20;
    while t < duration_ms {
        out.push(Scheduled {
            at_ms: t - 20,
            marker: t == 20,
            event: TelephoneEvent {
                event,
                end: false,
                volume: 10,
                duration: u16::try_from(t * 8).unwrap_or(u16::MAX),
            },
        });
        t += 20;
    }
    let end = TelephoneEvent {
        event,
        end: true,
        volume: 10,
        duration: u16::try_from(duration_ms * 8).unwrap_or(u16::MAX),
    };
    for _ in 0..3 {
        out.push(Scheduled {
            at_ms: duration_ms - 20,
            marker: false,
            event: end,
        });
    }
    Some(out)
}

/// Reports each received digit once (at its first end packet), whatever the redundancy.
#[derive(Debug, Default, Clone)]
pub struct Receiver {
    reported: Option<u32>,
}

impl Receiver {
    /// A telephone-event packet with RTP timestamp `ts`: the digit, when it just ended.
    pub fn on_packet(&mut self, ts: u32, payload: &[u8]) -> Option<char> {
        let ev = TelephoneEvent::parse(payload)?;
        if !ev.end || self.reported == Some(ts) {
            return None;
        }
        self.reported = Some(ts);
        digit_of_event(ev.event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_and_events() {
        for (c, e) in [
            ('0', 0),
            ('9', 9),
            ('*', 10),
            ('#', 11),
            ('a', 12),
            ('D', 15),
        ] {
            assert_eq!(event_of_digit(c), Some(e));
            assert_eq!(digit_of_event(e), Some(c.to_ascii_uppercase()));
        }
        assert_eq!(event_of_digit('x'), None);
        assert_eq!(digit_of_event(16), None);
        let ev = TelephoneEvent {
            event: 11,
            end: true,
            volume: 10,
            duration: 800,
        };
        assert_eq!(TelephoneEvent::parse(&ev.to_bytes()), Some(ev));
        assert_eq!(TelephoneEvent::parse(&[1, 2]), None);
    }

    #[test]
    fn schedule_for_100ms() {
        let s = digit_schedule('5', 100).unwrap();
        let times: Vec<u32> = s.iter().map(|p| p.at_ms).collect();
        assert_eq!(times, vec![0, 20, 40, 60, 80, 80, 80]);
        assert!(s[0].marker && !s[1].marker);
        assert_eq!(s[3].event.duration, 640);
        assert!(
            s[4..]
                .iter()
                .all(|p| p.event.end && p.event.duration == 800)
        );
    }

    #[test]
    fn receiver_reports_once() {
        let mut r = Receiver::default();
        let mid = TelephoneEvent {
            event: 7,
            end: false,
            volume: 10,
            duration: 160,
        }
        .to_bytes();
        let end = TelephoneEvent {
            event: 7,
            end: true,
            volume: 10,
            duration: 800,
        }
        .to_bytes();
        assert_eq!(r.on_packet(1000, &mid), None);
        assert_eq!(r.on_packet(1000, &end), Some('7'));
        assert_eq!(r.on_packet(1000, &end), None);
        assert_eq!(r.on_packet(1000, &end), None);
        assert_eq!(
            r.on_packet(2600, &end),
            Some('7'),
            "the same digit again is a new event"
        );
    }
}
