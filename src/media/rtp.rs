//! RTP packets (RFC 3550 §5.1): checked parsing and building, no allocation on parse.

/// Smallest RTP header.
pub const HEADER_LEN: usize = 12;

/// Why bytes are not an RTP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RtpError {
    /// Shorter than the header it announces.
    #[error("truncated RTP packet")]
    Truncated,
    /// Version is not 2.
    #[error("not RTP version 2")]
    Version,
    /// Padding length larger than the payload.
    #[error("bad RTP padding")]
    Padding,
}

/// A parsed RTP packet borrowing its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpPacket<'a> {
    /// Marker bit.
    pub marker: bool,
    /// Payload type (7 bits).
    pub payload_type: u8,
    /// Sequence number.
    pub sequence: u16,
    /// Timestamp.
    pub timestamp: u32,
    /// Synchronisation source.
    pub ssrc: u32,
    /// The payload (after CSRCs and header extension, without padding).
    pub payload: &'a [u8],
}

/// Whether `data` looks like RTCP rather than RTP when both share a port (RFC 5761 §4):
/// second byte (marker + PT) 192-223.
pub fn is_rtcp(data: &[u8]) -> bool {
    matches!(data.get(1), Some(192..=223))
}

impl<'a> RtpPacket<'a> {
    /// Parses one packet.
    pub fn parse(data: &'a [u8]) -> Result<RtpPacket<'a>, RtpError> {
        let b0 = *data.first().ok_or(RtpError::Truncated)?;
        if b0 >> 6 != 2 {
            return Err(RtpError::Version);
        }
        let padding = b0 & 0x20 != 0;
        let extension = b0 & 0x10 != 0;
        let csrc_count = usize::from(b0 & 0x0f);
        let b1 = *data.get(1).ok_or(RtpError::Truncated)?;
        let word = |i: usize| -> Result<u32, RtpError> {
            let b = data.get(i..i + 4).ok_or(RtpError::Truncated)?;
            Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        };
        let sequence = data
            .get(2..4)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or(RtpError::Truncated)?;
        let timestamp = word(4)?;
        let ssrc = word(8)?;
        let mut start = HEADER_LEN + 4 * csrc_count;
        if extension {
            let ext = data.get(start + 2..start + 4).ok_or(RtpError::Truncated)?;
            let words = usize::from(u16::from_be_bytes([ext[0], ext[1]]));
            start += 4 + 4 * words;
        }
        let mut end = data.len();
        if padding {
            let pad = usize::from(*data.last().ok_or(RtpError::Truncated)?);
            if pad == 0 || end < start + pad {
                return Err(RtpError::Padding);
            }
            end -= pad;
        }
        let payload = data.get(start..end).ok_or(RtpError::Truncated)?;
        Ok(RtpPacket {
            marker: b1 & 0x80 != 0,
            payload_type: b1 & 0x7f,
            sequence,
            timestamp,
            ssrc,
            payload,
        })
    }

    /// Writes the packet (no CSRC, no extension, no padding) into `out`, replacing its contents.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.clear();
        out.reserve(HEADER_LEN + self.payload.len());
        out.push(0x80);
        out.push((u8::from(self.marker) << 7) | (self.payload_type & 0x7f));
        out.extend_from_slice(&self.sequence.to_be_bytes());
        out.extend_from_slice(&self.timestamp.to_be_bytes());
        out.extend_from_slice(&self.ssrc.to_be_bytes());
        out.extend_from_slice(self.payload);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let p = RtpPacket {
            marker: true,
            payload_type: 0,
            sequence: 65535,
            timestamp: 0xdead_beef,
            ssrc: 0x1234_5678,
            payload: &[0xff; 160],
        };
        let mut buf = Vec::new();
        p.write(&mut buf);
        assert_eq!(buf.len(), 172);
        assert_eq!(RtpPacket::parse(&buf), Ok(p));
        assert!(!is_rtcp(&buf));
    }

    #[test]
    fn csrc_extension_padding() {
        // V=2 P=1 X=1 CC=1, PT 8, seq 1, ts 2, ssrc 3, csrc, ext (1 word), payload 2 bytes, pad 2.
        let mut d = vec![0xb1, 0x08, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3];
        d.extend_from_slice(&[9, 9, 9, 9]);
        d.extend_from_slice(&[0xbe, 0xde, 0, 1, 1, 2, 3, 4]);
        d.extend_from_slice(&[0xaa, 0xbb, 0, 2]);
        let p = RtpPacket::parse(&d).unwrap();
        assert_eq!(
            (p.payload_type, p.sequence, p.timestamp, p.ssrc),
            (8, 1, 2, 3)
        );
        assert_eq!(p.payload, &[0xaa, 0xbb]);
    }

    #[test]
    fn refusals_and_no_panics() {
        assert_eq!(RtpPacket::parse(&[]), Err(RtpError::Truncated));
        assert_eq!(RtpPacket::parse(&[0x40; 12]), Err(RtpError::Version));
        let mut bad_pad = vec![0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 200];
        assert_eq!(RtpPacket::parse(&bad_pad), Err(RtpError::Padding));
        bad_pad[13] = 0;
        assert_eq!(RtpPacket::parse(&bad_pad), Err(RtpError::Padding));
        assert!(is_rtcp(&[0x80, 200, 0, 6]));
        let mut x: u32 = 7;
        for len in 0..200usize {
            let d: Vec<u8> = (0..len)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (x >> 16) as u8 | 0x80
                })
                .collect();
            let _ = RtpPacket::parse(&d);
        }
    }
}
