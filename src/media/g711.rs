//! G.711 μ-law and A-law (ITU-T G.711), for the recording tap and tone checks.

const BIAS: i32 = 0x84;
const CLIP: i32 = 32635;

/// Linear 16-bit → μ-law.
pub fn ulaw_encode(sample: i16) -> u8 {
    let mut s = i32::from(sample);
    let sign = if s < 0 {
        s = -s;
        0x80
    } else {
        0
    };
    s = s.min(CLIP) + BIAS;
    let exponent = (7 - (s.leading_zeros() as i32 - 17)).clamp(0, 7);
    let mantissa = (s >> (exponent + 3)) & 0x0f;
    !(sign | (exponent << 4) as u8 | mantissa as u8)
}

/// μ-law → linear 16-bit.
pub fn ulaw_decode(byte: u8) -> i16 {
    let b = !byte;
    let sign = b & 0x80;
    let exponent = i32::from((b >> 4) & 0x07);
    let mantissa = i32::from(b & 0x0f);
    let magnitude = (((mantissa << 3) + BIAS) << exponent) - BIAS;
    (if sign != 0 { -magnitude } else { magnitude }) as i16
}

/// Linear 16-bit → A-law.
pub fn alaw_encode(sample: i16) -> u8 {
    let s = i32::from(sample);
    let (sign, mag) = if s >= 0 {
        (0xD5u8, s)
    } else {
        (0x55u8, -s - 1)
    };
    let mag = mag.min(32767);
    let byte = if mag < 256 {
        (mag >> 4) as u8
    } else {
        let exponent = (31 - mag.leading_zeros() as i32 - 7).clamp(1, 7);
        let mantissa = (mag >> (exponent + 3)) & 0x0f;
        ((exponent << 4) | mantissa) as u8
    };
    byte ^ sign
}

/// A-law → linear 16-bit.
pub fn alaw_decode(byte: u8) -> i16 {
    let b = byte ^ 0x55;
    let sign = b & 0x80;
    let exponent = i32::from((b >> 4) & 0x07);
    let mantissa = i32::from(b & 0x0f);
    let magnitude = if exponent == 0 {
        (mantissa << 4) + 8
    } else {
        ((mantissa << 4) + 0x108) << (exponent - 1)
    };
    (if sign != 0 { magnitude } else { -magnitude }) as i16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // Silence codes and full scale, as every G.711 implementation has them.
        assert_eq!(ulaw_encode(0), 0xFF);
        assert_eq!(ulaw_decode(0xFF), 0);
        assert_eq!(alaw_encode(0), 0xD5);
        assert_eq!(ulaw_decode(0x00), -32124);
        assert_eq!(ulaw_decode(0x80), 32124);
        assert_eq!(alaw_decode(0xD5), 8);
        assert_eq!(alaw_decode(0x55), -8);
    }

    #[test]
    fn round_trip_error_is_within_the_quantisation_step() {
        for s in (-32768i32..=32767).step_by(7) {
            let s = s as i16;
            let u = ulaw_decode(ulaw_encode(s));
            let a = alaw_decode(alaw_encode(s));
            // The step is at most 1/16 of the magnitude (plus a small constant near zero).
            let tol = (i32::from(s).abs() / 16).max(16) + 8;
            assert!(
                (i32::from(u) - i32::from(s)).abs() <= tol * 2,
                "ulaw {s} -> {u}"
            );
            assert!(
                (i32::from(a) - i32::from(s)).abs() <= tol * 2,
                "alaw {s} -> {a}"
            );
        }
        // Decoding every code and encoding again is the identity (except μ-law's two zeros).
        for b in 0..=255u8 {
            assert_eq!(alaw_encode(alaw_decode(b)), b, "alaw {b:#x}");
            if b != 0x7F {
                assert_eq!(ulaw_encode(ulaw_decode(b)), b, "ulaw {b:#x}");
            }
        }
    }
}
