//! Reception statistics (RFC 3550 A.1, A.3, A.8): packets, loss, interarrival jitter.

/// Statistics of one received stream.
#[derive(Debug, Clone, Default)]
pub struct ReceiveStats {
    base_seq: u32,
    max_seq: u16,
    cycles: u32,
    received: u64,
    bytes: u64,
    started: bool,
    /// Last (arrival - timestamp), in timestamp units, and the jitter estimate ×16.
    transit: Option<i64>,
    jitter16: u64,
    /// Expected and received at the previous report (RFC 3550 A.3).
    expected_prior: u64,
    received_prior: u64,
}

impl ReceiveStats {
    /// Records a packet with sequence `seq`, RTP timestamp `ts`, `len` payload bytes, arriving at
    /// `arrival` (in timestamp units of the same clock, e.g. ms × 8 for 8 kHz).
    pub fn on_packet(&mut self, seq: u16, ts: u32, len: usize, arrival: u64) {
        if !self.started {
            self.started = true;
            self.base_seq = u32::from(seq);
            self.max_seq = seq;
        } else {
            let delta = seq.wrapping_sub(self.max_seq);
            if delta > 0 && delta < 0x8000 {
                if seq < self.max_seq {
                    self.cycles += 1;
                }
                self.max_seq = seq;
            }
        }
        self.received += 1;
        self.bytes += len as u64;
        let transit = arrival as i64 - i64::from(ts);
        if let Some(prev) = self.transit {
            let d = (transit - prev).unsigned_abs();
            // J += (|D| - J) / 16, kept ×16 to stay in integers (A.8).
            self.jitter16 = self.jitter16 + d - ((self.jitter16 + 8) >> 4);
        }
        self.transit = Some(transit);
    }

    /// Packets received.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Payload bytes received.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Packets expected from the sequence numbers seen.
    pub fn expected(&self) -> u64 {
        if !self.started {
            return 0;
        }
        let extended = u64::from(self.cycles) * 65536 + u64::from(self.max_seq);
        extended + 1 - u64::from(self.base_seq)
    }

    /// Packets lost (never negative; duplicates can hide losses, as in RFC 3550).
    pub fn lost(&self) -> u64 {
        self.expected().saturating_sub(self.received)
    }

    /// The extended highest sequence number received (cycles in the high 16 bits).
    pub fn extended_max(&self) -> u32 {
        (self.cycles << 16) | u32::from(self.max_seq)
    }

    /// For a report block: the fraction lost (1/256) since the previous call, and the
    /// cumulative loss.
    pub fn report_loss(&mut self) -> (u8, u32) {
        let (expected, received) = (self.expected(), self.received);
        let exp_int = expected.saturating_sub(self.expected_prior);
        let rec_int = received.saturating_sub(self.received_prior);
        self.expected_prior = expected;
        self.received_prior = received;
        let lost_int = exp_int.saturating_sub(rec_int);
        let fraction = (lost_int << 8)
            .checked_div(exp_int)
            .map_or(0, |f| f.min(255) as u8);
        (fraction, u32::try_from(self.lost()).unwrap_or(u32::MAX))
    }

    /// Interarrival jitter in timestamp units.
    pub fn jitter(&self) -> u64 {
        self.jitter16 >> 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_with_wraparound() {
        let mut s = ReceiveStats::default();
        let mut ts = 0u32;
        let mut seq = 65530u16;
        for i in 0..20 {
            if i != 7 && i != 8 {
                s.on_packet(seq, ts, 160, u64::from(ts));
            }
            seq = seq.wrapping_add(1);
            ts += 160;
        }
        assert_eq!((s.expected(), s.received(), s.lost()), (20, 18, 2));
        assert_eq!(s.jitter(), 0, "perfectly paced");
        assert_eq!(s.bytes(), 18 * 160);
    }

    #[test]
    fn jitter_grows_with_irregular_arrival() {
        let mut s = ReceiveStats::default();
        for i in 0..200u32 {
            let arrival = u64::from(i * 160) + if i % 2 == 0 { 0 } else { 80 };
            s.on_packet(i as u16, i * 160, 160, arrival);
        }
        // Alternating ±80 ticks: |D| = 80 each time; J converges to 80.
        assert!((75..=80).contains(&s.jitter()), "{}", s.jitter());
    }

    #[test]
    fn report_loss_is_per_interval() {
        let mut s = ReceiveStats::default();
        for seq in (0u16..100).filter(|q| q % 4 != 1) {
            s.on_packet(seq, 0, 160, 0);
        }
        // 25 of 100 lost: 64/256.
        assert_eq!(s.report_loss(), (64, 25));
        for seq in 100u16..200 {
            s.on_packet(seq, 0, 160, 0);
        }
        assert_eq!(s.report_loss(), (0, 25), "none lost in this interval");
        assert_eq!(s.extended_max(), 199);
    }
}
