//! RTCP toward the SIP side (RFC 3550 §6), sans-IO: the sender report callgate sends for the
//! stream it sends, with a report block on the stream it receives, plus the SDES CNAME every
//! compound packet needs; and the parsing of the far end's SR / RR for what it says of our
//! stream (loss, jitter) and for the LSR / DLSR round-trip fields.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One report block (RFC 3550 §6.4.1): what a receiver says of one source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReportBlock {
    /// The source reported on.
    pub ssrc: u32,
    /// Fraction lost since the previous report, in 1/256.
    pub fraction_lost: u8,
    /// Packets lost since the beginning (24 bits).
    pub cumulative_lost: u32,
    /// Extended highest sequence number received.
    pub highest_seq: u32,
    /// Interarrival jitter, timestamp units.
    pub jitter: u32,
    /// Middle 32 bits of the NTP time of the last SR received from that source (0: none).
    pub lsr: u32,
    /// Delay since that SR, 1/65536 s.
    pub dlsr: u32,
}

impl ReportBlock {
    /// The block a receiver of source `ssrc` sends, from its reception statistics (which
    /// start a new loss interval), with the LSR/DLSR of that source's last SR (0, 0: none).
    pub fn from_stats(
        ssrc: u32,
        stats: &mut super::stats::ReceiveStats,
        (lsr, dlsr): (u32, u32),
    ) -> ReportBlock {
        let (fraction_lost, cumulative_lost) = stats.report_loss();
        ReportBlock {
            ssrc,
            fraction_lost,
            cumulative_lost,
            highest_seq: stats.extended_max(),
            jitter: u32::try_from(stats.jitter()).unwrap_or(u32::MAX),
            lsr,
            dlsr,
        }
    }
}

/// What an incoming compound RTCP packet says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Incoming {
    /// From a sender report: its SSRC and the middle 32 bits of its NTP time (for our LSR).
    pub sender: Option<(u32, u32)>,
    /// Report blocks of its SR or RR.
    pub blocks: Vec<ReportBlock>,
}

/// The sending side of a report: our SSRC and what we sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// Our SSRC toward the SIP side.
    pub ssrc: u32,
    /// The RTP timestamp that corresponds to now.
    pub rtp_timestamp: u32,
    /// Packets sent so far.
    pub packets: u32,
    /// Payload octets sent so far.
    pub octets: u32,
}

/// NTP time (seconds since 1900, 32.32 fixed point) of `t`.
pub fn ntp(t: SystemTime) -> u64 {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = d.as_secs() + 2_208_988_800;
    let frac = (u64::from(d.subsec_nanos()) << 32) / 1_000_000_000;
    (secs << 32) | frac
}

/// The middle 32 bits of an NTP time (the LSR / DLSR unit, RFC 3550 §6.4.1).
pub fn ntp_middle(ntp: u64) -> u32 {
    (ntp >> 16) as u32
}

fn header(out: &mut Vec<u8>, count: u8, pt: u8, words: usize) {
    out.push(0x80 | (count & 0x1f));
    out.push(pt);
    out.extend_from_slice(&u16::try_from(words).unwrap_or(u16::MAX).to_be_bytes());
}

fn block(out: &mut Vec<u8>, b: &ReportBlock) {
    out.extend_from_slice(&b.ssrc.to_be_bytes());
    out.push(b.fraction_lost);
    out.extend_from_slice(&(b.cumulative_lost.min(0x7f_ffff)).to_be_bytes()[1..]);
    for v in [b.highest_seq, b.jitter, b.lsr, b.dlsr] {
        out.extend_from_slice(&v.to_be_bytes());
    }
}

fn sdes_cname(out: &mut Vec<u8>, ssrc: u32, cname: &str) {
    let name = &cname.as_bytes()[..cname.len().min(255)];
    // SSRC, CNAME item (type 1, length, text), end item (0), padded to 32 bits.
    let item = 4 + 2 + name.len() + 1;
    let padded = item.div_ceil(4) * 4;
    header(out, 1, 202, padded / 4);
    out.extend_from_slice(&ssrc.to_be_bytes());
    out.push(1);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.resize(out.len() + (padded - item) + 1, 0);
}

/// A compound packet: SR (if we have sent media, else RR) with `report` on the stream we
/// receive (if any), then SDES with `cname`.
pub fn compound(now_ntp: u64, sent: Sent, report: Option<ReportBlock>, cname: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(80);
    let blocks = usize::from(report.is_some());
    if sent.packets > 0 {
        header(&mut out, blocks as u8, 200, 6 + 6 * blocks);
        out.extend_from_slice(&sent.ssrc.to_be_bytes());
        out.extend_from_slice(&now_ntp.to_be_bytes());
        out.extend_from_slice(&sent.rtp_timestamp.to_be_bytes());
        out.extend_from_slice(&sent.packets.to_be_bytes());
        out.extend_from_slice(&sent.octets.to_be_bytes());
    } else {
        header(&mut out, blocks as u8, 201, 1 + 6 * blocks);
        out.extend_from_slice(&sent.ssrc.to_be_bytes());
    }
    if let Some(b) = report {
        block(&mut out, &b);
    }
    sdes_cname(&mut out, sent.ssrc, cname);
    out
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn parse_blocks(body: &[u8], count: usize, out: &mut Vec<ReportBlock>) {
    for i in 0..count {
        let at = i * 24;
        let Some(b) = body.get(at..at + 24) else {
            return;
        };
        let (Some(ssrc), Some(hs), Some(j), Some(lsr), Some(dlsr)) = (
            be32(b, 0),
            be32(b, 8),
            be32(b, 12),
            be32(b, 16),
            be32(b, 20),
        ) else {
            return;
        };
        out.push(ReportBlock {
            ssrc,
            fraction_lost: b[4],
            cumulative_lost: u32::from_be_bytes([0, b[5], b[6], b[7]]),
            highest_seq: hs,
            jitter: j,
            lsr,
            dlsr,
        });
    }
}

/// Parses a compound RTCP packet; `None` if it is not RTCP at all. Unknown packet types are
/// skipped; truncated ones end the walk.
pub fn parse(data: &[u8]) -> Option<Incoming> {
    let first = data.get(..2)?;
    if first[0] >> 6 != 2 || !(200..=204).contains(&first[1]) {
        return None;
    }
    let mut inc = Incoming::default();
    let mut rest = data;
    while rest.len() >= 4 {
        let count = usize::from(rest[0] & 0x1f);
        let pt = rest[1];
        let len = (usize::from(u16::from_be_bytes([rest[2], rest[3]])) + 1) * 4;
        let Some(packet) = rest.get(..len) else {
            break;
        };
        match pt {
            200 if packet.len() >= 28 => {
                let ssrc = be32(packet, 4)?;
                let ntp = (u64::from(be32(packet, 8)?) << 32) | u64::from(be32(packet, 12)?);
                inc.sender = Some((ssrc, ntp_middle(ntp)));
                parse_blocks(&packet[28..], count, &mut inc.blocks);
            }
            201 if packet.len() >= 8 => parse_blocks(&packet[8..], count, &mut inc.blocks),
            _ => {}
        }
        rest = &rest[len..];
    }
    Some(inc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_report_with_a_block_round_trips() {
        let b = ReportBlock {
            ssrc: 0xdead_beef,
            fraction_lost: 12,
            cumulative_lost: 345,
            highest_seq: 70_000,
            jitter: 80,
            lsr: 0x1234_5678,
            dlsr: 65_536,
        };
        let now = ntp(SystemTime::now());
        let sent = Sent {
            ssrc: 0x00ca_11ed,
            rtp_timestamp: 160_000,
            packets: 1000,
            octets: 160_000,
        };
        let p = compound(now, sent, Some(b), "callgate");
        assert_eq!(p.len() % 4, 0);
        assert_eq!(p[1], 200);
        // SR (7 words + 6) then SDES.
        assert_eq!(p[28 + 24 + 1], 202);
        let inc = parse(&p).unwrap();
        assert_eq!(inc.sender, Some((0x00ca_11ed, ntp_middle(now))));
        assert_eq!(inc.blocks, vec![b]);
    }

    #[test]
    fn a_receiver_report_when_nothing_was_sent() {
        let sent = Sent {
            ssrc: 7,
            rtp_timestamp: 0,
            packets: 0,
            octets: 0,
        };
        let p = compound(0, sent, None, "x");
        assert_eq!((p[0], p[1]), (0x80, 201));
        assert_eq!(parse(&p).unwrap(), Incoming::default());
    }

    #[test]
    fn garbage_and_truncation_are_harmless() {
        assert_eq!(parse(&[]), None);
        assert_eq!(parse(&[0x80, 0x00, 0, 0]), None, "RTP, not RTCP");
        let sent = Sent {
            ssrc: 1,
            rtp_timestamp: 2,
            packets: 3,
            octets: 4,
        };
        let full = compound(5, sent, Some(ReportBlock::default()), "cg");
        for cut in 0..full.len() {
            let _ = parse(&full[..cut]);
        }
        // The NTP middle bits: 1 s = 65536 units.
        let t = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let d = ntp_middle(ntp(t + Duration::from_secs(1))) - ntp_middle(ntp(t));
        assert_eq!(d, 65_536);
    }
}
