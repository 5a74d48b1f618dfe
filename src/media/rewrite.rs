//! The bridge's stream rewriter: whatever arrives from one leg (new SSRC after a re-INVITE,
//! early media then the answer, a transfer, a gap during hold), the other leg sees one stream:
//! our SSRC, sequence numbers that continue by one, and timestamps that advance with wall time
//! across a source change. Payload types are mapped between the legs' negotiated numbers.

use std::time::Instant;

use super::rtp::RtpPacket;

/// One payload type mapping: input PT → output PT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PtMap {
    /// PT as negotiated on the leg the packet came from.
    pub from: u8,
    /// PT as negotiated on the leg it goes to.
    pub to: u8,
}

/// Rewrites one direction of the bridge.
#[derive(Debug, Clone)]
pub struct Rewriter {
    ssrc: u32,
    clock_rate: u32,
    map: Vec<PtMap>,
    /// Input SSRC we are following, and the offsets applied to it.
    source: Option<Source>,
    last_out: Option<(u16, u32, Instant)>,
    buf: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
struct Source {
    ssrc: u32,
    seq_offset: u16,
    ts_offset: u32,
}

impl Rewriter {
    /// A rewriter sending as `ssrc` at `clock_rate` (8000 for G.711), mapping payload types by
    /// `map`; packets of other payload types are dropped.
    pub fn new(ssrc: u32, clock_rate: u32, map: Vec<PtMap>) -> Rewriter {
        Rewriter {
            ssrc,
            clock_rate,
            map,
            source: None,
            last_out: None,
            buf: Vec::with_capacity(1500),
        }
    }

    /// Treats the next packet as a new source (after a hold or a pause in forwarding), so the
    /// output continues by one instead of jumping over what was not forwarded.
    pub fn rebase(&mut self) {
        self.source = None;
    }

    /// Replaces the payload type mapping (after a re-negotiation).
    pub fn set_map(&mut self, map: Vec<PtMap>) {
        self.map = map;
    }

    /// The RTP timestamp this stream is at, at `now` (the last packet's, advanced by wall time),
    /// and the sequence number the next packet takes; `None` before the first packet.
    fn position(&self, now: Instant) -> Option<(u16, u32)> {
        let (seq, ts, at) = self.last_out?;
        let elapsed = now.saturating_duration_since(at);
        let ticks = (elapsed.as_micros() * u128::from(self.clock_rate) / 1_000_000) as u32;
        Some((seq.wrapping_add(1), ts.wrapping_add(ticks)))
    }

    /// The timestamp a packet generated at `now` (a telephone-event we originate) starts at.
    pub fn timestamp_at(&self, now: Instant) -> u32 {
        self.position(now).map_or(0, |(_, ts)| ts)
    }

    /// A packet we originate (RFC 4733 DTMF): payload type `pt` (already the outgoing leg's),
    /// timestamp `timestamp` (from [`timestamp_at`](Self::timestamp_at) at `started`, shared by
    /// every packet of one event), the next sequence number and our SSRC. The forwarded stream
    /// continues after it by one (the next forwarded packet is treated as a new source).
    pub fn inject(
        &mut self,
        started: Instant,
        marker: bool,
        pt: u8,
        timestamp: u32,
        payload: &[u8],
    ) -> &[u8] {
        let sequence = self.position(started).map_or(0, |(seq, _)| seq);
        self.last_out = Some((sequence, timestamp, started));
        self.source = None;
        RtpPacket {
            marker,
            payload_type: pt,
            sequence,
            timestamp,
            ssrc: self.ssrc,
            payload,
        }
        .write(&mut self.buf);
        &self.buf
    }

    /// Rewrites `pkt` received at `now`; returns the bytes to send, or `None` to drop it.
    pub fn rewrite(&mut self, now: Instant, pkt: &RtpPacket<'_>) -> Option<&[u8]> {
        let pt = self.map.iter().find(|m| m.from == pkt.payload_type)?.to;
        let source = match self.source {
            Some(s) if s.ssrc == pkt.ssrc => s,
            _ => {
                // A new source: continue our numbering from the last packet sent, and advance the
                // timestamp by the wall time since then (at least one 20 ms frame).
                let (seq, ts) = match self.last_out {
                    Some((seq, ts, at)) => {
                        let elapsed = now.saturating_duration_since(at);
                        let ticks =
                            (elapsed.as_micros() * u128::from(self.clock_rate) / 1_000_000) as u32;
                        (
                            seq.wrapping_add(1),
                            ts.wrapping_add(ticks.max(self.clock_rate / 50)),
                        )
                    }
                    None => (pkt.sequence, pkt.timestamp),
                };
                let s = Source {
                    ssrc: pkt.ssrc,
                    seq_offset: seq.wrapping_sub(pkt.sequence),
                    ts_offset: ts.wrapping_sub(pkt.timestamp),
                };
                self.source = Some(s);
                s
            }
        };
        let out = RtpPacket {
            marker: pkt.marker,
            payload_type: pt,
            sequence: pkt.sequence.wrapping_add(source.seq_offset),
            timestamp: pkt.timestamp.wrapping_add(source.ts_offset),
            ssrc: self.ssrc,
            payload: pkt.payload,
        };
        // Only move forward: a late packet of the same source keeps its (older) numbers.
        let newer = self.last_out.is_none_or(|(seq, _, _)| {
            out.sequence.wrapping_sub(seq) < 0x8000 && out.sequence != seq
        });
        if newer {
            self.last_out = Some((out.sequence, out.timestamp, now));
        }
        out.write(&mut self.buf);
        Some(&self.buf)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn pkt(ssrc: u32, seq: u16, ts: u32, pt: u8) -> Vec<u8> {
        let mut b = Vec::new();
        RtpPacket {
            marker: false,
            payload_type: pt,
            sequence: seq,
            timestamp: ts,
            ssrc,
            payload: &[0xd5; 160],
        }
        .write(&mut b);
        b
    }

    fn out(r: &mut Rewriter, now: Instant, data: &[u8]) -> Option<(u16, u32, u32, u8)> {
        let p = RtpPacket::parse(data).unwrap();
        let bytes = r.rewrite(now, &p)?.to_vec();
        let o = RtpPacket::parse(&bytes).unwrap();
        Some((o.sequence, o.timestamp, o.ssrc, o.payload_type))
    }

    #[test]
    fn one_continuous_stream_across_a_source_change() {
        let t0 = Instant::now();
        let mut r = Rewriter::new(
            0xCA11,
            8000,
            vec![PtMap { from: 0, to: 0 }, PtMap { from: 101, to: 126 }],
        );
        assert_eq!(
            out(&mut r, t0, &pkt(1, 100, 1000, 0)),
            Some((100, 1000, 0xCA11, 0))
        );
        assert_eq!(
            out(
                &mut r,
                t0 + Duration::from_millis(20),
                &pkt(1, 101, 1160, 0)
            ),
            Some((101, 1160, 0xCA11, 0))
        );
        // Hold for 2 s, then a re-INVITE brings a new SSRC with its own numbering.
        let t1 = t0 + Duration::from_millis(2020);
        assert_eq!(
            out(&mut r, t1, &pkt(77, 5000, 900_000, 0)),
            Some((102, 1160 + 16000, 0xCA11, 0))
        );
        assert_eq!(
            out(
                &mut r,
                t1 + Duration::from_millis(20),
                &pkt(77, 5001, 900_160, 101)
            ),
            Some((103, 1160 + 16160, 0xCA11, 126)),
            "telephone-event mapped 101 → 126"
        );
        // Unknown payload types are dropped.
        assert_eq!(out(&mut r, t1, &pkt(77, 5002, 900_320, 18)), None);
    }

    #[test]
    fn rebase_after_hold_continues_by_one() {
        let t0 = Instant::now();
        let mut r = Rewriter::new(5, 8000, vec![PtMap { from: 0, to: 0 }]);
        assert_eq!(out(&mut r, t0, &pkt(1, 10, 1600, 0)).map(|o| o.0), Some(10));
        r.rebase();
        // 50 packets of the same source were not forwarded during a 1 s hold.
        let o = out(
            &mut r,
            t0 + Duration::from_secs(1),
            &pkt(1, 61, 1600 + 51 * 160, 0),
        )
        .unwrap();
        assert_eq!((o.0, o.1), (11, 1600 + 8000));
    }

    #[test]
    fn injected_events_share_the_sequence_and_timestamp_line() {
        let t0 = Instant::now();
        let mut r = Rewriter::new(5, 8000, vec![PtMap { from: 0, to: 0 }]);
        assert_eq!(out(&mut r, t0, &pkt(1, 10, 1600, 0)).map(|o| o.0), Some(10));
        let start = t0 + Duration::from_millis(20);
        let ts = r.timestamp_at(start);
        assert_eq!(ts, 1760);
        for i in 0..3u16 {
            let b = r.inject(start, i == 0, 101, ts, &[1, 0, 0, 160]).to_vec();
            let p = RtpPacket::parse(&b).unwrap();
            assert_eq!(
                (p.sequence, p.timestamp, p.ssrc, p.payload_type, p.marker),
                (11 + i, 1760, 5, 101, i == 0)
            );
        }
        // Voice resumes 100 ms after the event started: next number, wall-clock timestamp.
        let o = out(
            &mut r,
            start + Duration::from_millis(100),
            &pkt(1, 16, 1600 + 6 * 160, 0),
        )
        .unwrap();
        assert_eq!((o.0, o.1), (14, 1760 + 800));
    }

    #[test]
    fn wraparound_and_late_packets() {
        let t0 = Instant::now();
        let mut r = Rewriter::new(9, 8000, vec![PtMap { from: 8, to: 8 }]);
        assert_eq!(
            out(&mut r, t0, &pkt(1, 65535, u32::MAX - 100, 8)).map(|o| o.0),
            Some(65535)
        );
        assert_eq!(
            out(&mut r, t0, &pkt(1, 0, 59, 8)).map(|o| (o.0, o.1)),
            Some((0, 59))
        );
        // A late packet keeps its place and does not move the continuation point back.
        assert_eq!(
            out(&mut r, t0, &pkt(1, 65534, u32::MAX - 260, 8)).map(|o| o.0),
            Some(65534)
        );
        assert_eq!(
            out(&mut r, t0 + Duration::from_millis(20), &pkt(2, 7, 7, 8)).map(|o| o.0),
            Some(1)
        );
    }
}
