//! The demo PBX's RTP: a task per call on 127.0.0.1, echoing what arrives (telephone-event
//! packets too, so DTMF comes back) or sending a 440 Hz tone, as [`Media`] says; a change
//! (hold, resume, a new far end) reaches the running task, so the port is never bound twice.

use std::collections::HashMap;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::watch;

use super::pbx::{Media, Play};
use crate::media::rtp::RtpPacket;

/// Samples in 20 ms at 8 kHz.
const FRAME: usize = 160;

/// The calls' RTP tasks.
#[derive(Default)]
pub struct MediaTasks {
    calls: HashMap<u64, watch::Sender<Media>>,
}

impl MediaTasks {
    /// Starts call `m.call`'s RTP, or changes it.
    pub fn start(&mut self, m: Media) {
        if let Some(tx) = self.calls.get(&m.call) {
            tx.send_replace(m);
            return;
        }
        let (tx, rx) = watch::channel(m.clone());
        self.calls.insert(m.call, tx);
        tokio::spawn(run(m.port, rx));
    }

    /// Stops call `call`'s RTP (its task ends, its port is let go).
    pub fn stop(&mut self, call: u64) {
        self.calls.remove(&call);
    }
}

async fn run(port: u16, mut plan: watch::Receiver<Media>) {
    let sock = match UdpSocket::bind(("127.0.0.1", port)).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(port, "demo PBX: cannot bind its RTP port: {e}");
            return;
        }
    };
    let mut buf = vec![0u8; 2048];
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tone = Tone::default();
    loop {
        let m = plan.borrow().clone();
        tokio::select! {
            changed = plan.changed() => if changed.is_err() { return },
            got = sock.recv_from(&mut buf) => {
                let Ok((n, _)) = got else { continue };
                if m.play == Play::Echo {
                    if let Some(back) = buf.get(..n).and_then(|p| tone.echo(p, m.pt)) {
                        let _ = sock.send_to(&back, m.remote).await;
                    }
                }
            }
            _ = tick.tick(), if m.play == Play::Tone => {
                let packet = tone.next(m.pt);
                let _ = sock.send_to(&packet, m.remote).await;
            }
        }
    }
}

/// A 440 Hz tone in 20 ms RTP packets.
struct Tone {
    seq: u16,
    timestamp: u32,
    ssrc: u32,
    phase: f64,
    out: Vec<u8>,
}

impl Default for Tone {
    fn default() -> Self {
        Tone {
            seq: 1,
            timestamp: 0,
            ssrc: crate::rand::u64().map_or(0x00de_0601, |r| r as u32),
            phase: 0.0,
            out: Vec::new(),
        }
    }
}

/// The two frequencies of a DTMF event (0-9, `*`, `#`, A-D).
fn dtmf_pair(event: u8) -> Option<(f64, f64)> {
    const ROWS: [f64; 4] = [697.0, 770.0, 852.0, 941.0];
    const COLS: [f64; 4] = [1209.0, 1336.0, 1477.0, 1633.0];
    let (row, col) = match event {
        0 => (3, 1),
        1..=9 => ((event - 1) / 3, (event - 1) % 3),
        10 => (3, 0),
        11 => (3, 2),
        12..=15 => (event - 12, 3),
        _ => return None,
    };
    Some((ROWS[usize::from(row)], COLS[usize::from(col)]))
}

impl Tone {
    /// The 440 Hz tone's next packet.
    fn next(&mut self, pt: u8) -> Vec<u8> {
        let payload = self.frame(pt, &[440.0], 8000.0);
        self.packet(pt, &payload)
    }

    /// What the echo sends back for `packet`: voice as it came, a DTMF event (RFC 4733) as
    /// its two tones, so a digit pressed is heard back; in a stream of its own (sequence,
    /// timestamp, SSRC), since an event's packets share one timestamp.
    fn echo(&mut self, packet: &[u8], voice_pt: u8) -> Option<Vec<u8>> {
        let p = RtpPacket::parse(packet).ok()?;
        if p.payload_type == voice_pt {
            let payload = p.payload.to_vec();
            return Some(self.packet(voice_pt, &payload));
        }
        let event = crate::media::dtmf::TelephoneEvent::parse(p.payload)?;
        let (low, high) = dtmf_pair(event.event)?;
        let payload = self.frame(voice_pt, &[low, high], 5000.0);
        Some(self.packet(voice_pt, &payload))
    }

    /// 20 ms of the sum of `freqs`, each at `level`, encoded for `pt`.
    fn frame(&mut self, pt: u8, freqs: &[f64], level: f64) -> Vec<u8> {
        let tau = 2.0 * std::f64::consts::PI;
        (0..FRAME)
            .map(|i| {
                let t = self.phase + i as f64 / 8000.0;
                let v: f64 = freqs.iter().map(|f| (tau * f * t).sin() * level).sum();
                let sample = v.clamp(-32_000.0, 32_000.0) as i16;
                if pt == 8 {
                    crate::media::g711::alaw_encode(sample)
                } else {
                    crate::media::g711::ulaw_encode(sample)
                }
            })
            .collect()
    }

    fn packet(&mut self, pt: u8, payload: &[u8]) -> Vec<u8> {
        // Time goes on by one frame per packet (kept short so the sines stay precise).
        self.phase = (self.phase + FRAME as f64 / 8000.0) % 1.0;
        RtpPacket {
            marker: self.seq == 1,
            payload_type: pt,
            sequence: self.seq,
            timestamp: self.timestamp,
            ssrc: self.ssrc,
            payload,
        }
        .write(&mut self.out);
        self.seq = self.seq.wrapping_add(1);
        self.timestamp = self.timestamp.wrapping_add(FRAME as u32);
        self.out.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The power of `freq` in `samples` (Goertzel).
    fn power(samples: &[f64], freq: f64) -> f64 {
        let k = 2.0 * (2.0 * std::f64::consts::PI * freq / 8000.0).cos();
        let (mut s1, mut s2) = (0.0, 0.0);
        for x in samples {
            let s0 = x + k * s1 - s2;
            s2 = s1;
            s1 = s0;
        }
        s1 * s1 + s2 * s2 - k * s1 * s2
    }

    fn packet(pt: u8, seq: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        RtpPacket {
            marker: false,
            payload_type: pt,
            sequence: seq,
            timestamp: 4000,
            ssrc: 42,
            payload,
        }
        .write(&mut out);
        out
    }

    #[test]
    fn the_echo_sends_voice_back_and_plays_a_digit_as_its_two_tones() {
        let mut echo = Tone::default();
        let voice = echo
            .echo(&packet(0, 7, &[0x5a; 160]), 0)
            .unwrap_or_default();
        let back = RtpPacket::parse(&voice).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!((back.payload_type, back.payload), (0, &[0x5a; 160][..]));
        // Digit 5 (770 + 1336 Hz), as RFC 4733 event packets: heard back as PCMU audio.
        let mut samples = Vec::new();
        for seq in 8..12 {
            let ev = crate::media::dtmf::TelephoneEvent {
                event: 5,
                end: false,
                volume: 10,
                duration: 160 * (seq - 7),
            };
            let out = echo
                .echo(&packet(101, seq, &ev.to_bytes()), 0)
                .unwrap_or_default();
            let p = RtpPacket::parse(&out).unwrap_or_else(|e| panic!("{e:?}"));
            assert_eq!(p.payload_type, 0);
            samples.extend(
                p.payload
                    .iter()
                    .map(|b| f64::from(crate::media::g711::ulaw_decode(*b))),
            );
        }
        let (low, high) = (power(&samples, 770.0), power(&samples, 1336.0));
        for other in [697.0, 852.0, 1209.0, 1477.0] {
            let p = power(&samples, other);
            assert!(
                low > 20.0 * p && high > 20.0 * p,
                "{other} Hz: {p} vs {low}, {high}"
            );
        }
        // Something that is neither: nothing back.
        assert_eq!(echo.echo(&packet(101, 13, &[200, 0, 0, 160]), 0), None);
        assert_eq!(echo.echo(b"junk", 0), None);
    }
}
