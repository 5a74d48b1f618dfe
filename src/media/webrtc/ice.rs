//! ICE-lite (RFC 8445 §2.5): credentials, the demultiplexer's peek at a check's username, and
//! the answer to a check. Sans-IO.

use std::net::SocketAddr;

use webrtc::ice::use_candidate::UseCandidateAttr;
use webrtc::stun::attributes::ATTR_USERNAME;
use webrtc::stun::fingerprint::FINGERPRINT;
use webrtc::stun::integrity::MessageIntegrity;
use webrtc::stun::message::{BINDING_REQUEST, BINDING_SUCCESS, Message};
use webrtc::stun::textattrs::TextAttribute;
use webrtc::stun::xoraddr::XorMappedAddress;

use super::WebRtcError;

/// Our ICE credentials for one leg.
#[derive(Clone)]
pub(super) struct Ice {
    pub(super) ufrag: String,
    pub(super) pwd: String,
}

/// Our half of the USERNAME (`ours:theirs`) of a STUN binding request, read without decoding
/// the whole message (the leg's task checks it properly).
pub(super) fn stun_ufrag(pkt: &[u8]) -> Option<&str> {
    if pkt.get(..2)? != [0x00, 0x01] || pkt.get(4..8)? != [0x21, 0x12, 0xa4, 0x42] {
        return None;
    }
    let mut at = 20;
    while let Some(h) = pkt.get(at..at + 4) {
        let kind = u16::from_be_bytes([h[0], h[1]]);
        let len = usize::from(u16::from_be_bytes([h[2], h[3]]));
        let value = pkt.get(at + 4..at + 4 + len)?;
        if kind == 0x0006 {
            let user = std::str::from_utf8(value).ok()?;
            return user.split(':').next();
        }
        at += 4 + len.div_ceil(4) * 4;
    }
    None
}

/// The reply to a binding request for `ice` (RFC 8445 §7.3), and whether it nominates; `None`
/// if it is not one or does not prove it knows our password.
pub(super) fn check_reply(
    pkt: &[u8],
    from: SocketAddr,
    ice: &Ice,
    remote_ufrag: &str,
) -> Option<(Vec<u8>, bool)> {
    let mut m = Message::new();
    m.raw = pkt.to_vec();
    m.decode().ok()?;
    if m.typ != BINDING_REQUEST {
        return None;
    }
    let user = TextAttribute::get_from_as(&m, ATTR_USERNAME).ok()?;
    let (ours, theirs) = user.text.split_once(':')?;
    if ours != ice.ufrag || (!remote_ufrag.is_empty() && theirs != remote_ufrag) {
        return None;
    }
    MessageIntegrity::new_short_term_integrity(ice.pwd.clone())
        .check(&mut m)
        .ok()?;
    let nominated = UseCandidateAttr::is_set(&m);
    let mut out = Message::new();
    out.build(&[
        Box::new(m),
        Box::new(BINDING_SUCCESS),
        Box::new(XorMappedAddress {
            ip: from.ip(),
            port: from.port(),
        }),
        Box::new(MessageIntegrity::new_short_term_integrity(ice.pwd.clone())),
        Box::new(FINGERPRINT),
    ])
    .ok()?;
    Some((out.raw, nominated))
}

pub(super) fn random(buf: &mut [u8]) -> Result<(), WebRtcError> {
    crate::rand::fill(buf).map_err(|e| WebRtcError::Engine(e.to_string()))
}

pub(super) fn random_u32() -> Result<u32, WebRtcError> {
    let mut b = [0u8; 4];
    random(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// A random ICE token (RFC 8839 §5.4 ice-chars, 6 bits each).
pub(super) fn random_token(len: usize) -> Result<String, WebRtcError> {
    const CHARS: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b = vec![0u8; len];
    random(&mut b)?;
    Ok(b.iter()
        .map(|x| char::from(CHARS[usize::from(*x) % 64]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use webrtc::stun::agent::TransactionId;
    use webrtc::stun::message::{Getter, Setter};
    use webrtc::stun::textattrs::Username;

    fn check(username: &str, pwd: &str, nominate: bool) -> Vec<u8> {
        let mut setters: Vec<Box<dyn Setter>> = vec![
            Box::new(BINDING_REQUEST),
            Box::new(TransactionId::new()),
            Box::new(Username::new(ATTR_USERNAME, username.to_owned())),
        ];
        if nominate {
            setters.push(Box::new(UseCandidateAttr::new()));
        }
        setters.push(Box::new(MessageIntegrity::new_short_term_integrity(
            pwd.to_owned(),
        )));
        setters.push(Box::new(FINGERPRINT));
        let mut m = Message::new();
        m.build(&setters).unwrap();
        m.raw
    }

    fn ice() -> Ice {
        Ice {
            ufrag: "ours".into(),
            pwd: "our-password-of-22-chars".into(),
        }
    }

    #[test]
    fn the_demultiplexer_reads_our_ufrag() {
        let c = check("ours:theirs", "x", false);
        assert_eq!(stun_ufrag(&c), Some("ours"));
        // Not a binding request, no cookie, truncated: nothing.
        let mut response = c.clone();
        response[0] = 0x01;
        assert_eq!(stun_ufrag(&response), None);
        let mut no_cookie = c.clone();
        no_cookie[4] = 0;
        assert_eq!(stun_ufrag(&no_cookie), None);
        for n in 0..c.len() {
            let _ = stun_ufrag(&c[..n]);
        }
    }

    #[test]
    fn only_checks_signed_with_our_password_are_answered() {
        let from: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let ice = ice();
        let (reply, nominated) =
            check_reply(&check("ours:theirs", &ice.pwd, true), from, &ice, "theirs").unwrap();
        assert!(nominated);
        let mut m = Message::new();
        m.raw = reply;
        m.decode().unwrap();
        assert_eq!(m.typ, BINDING_SUCCESS);
        MessageIntegrity::new_short_term_integrity(ice.pwd.clone())
            .check(&mut m)
            .unwrap();
        let mut mapped = XorMappedAddress::default();
        mapped.get_from(&m).unwrap();
        assert_eq!(SocketAddr::new(mapped.ip, mapped.port), from);

        let plain = check_reply(&check("ours:theirs", &ice.pwd, false), from, &ice, "theirs");
        assert!(matches!(plain, Some((_, false))));
        for (user, pwd) in [
            ("ours:theirs", "wrong-password"),
            ("other:theirs", ice.pwd.as_str()),
            ("ours:someone-else", ice.pwd.as_str()),
            ("ours", ice.pwd.as_str()),
        ] {
            assert!(
                check_reply(&check(user, pwd, true), from, &ice, "theirs").is_none(),
                "{user} / {pwd}"
            );
        }
        assert!(check_reply(&[0, 1, 0, 0], from, &ice, "theirs").is_none());
    }

    #[test]
    fn tokens_are_ice_chars() {
        let t = random_token(24).unwrap();
        assert_eq!(t.len(), 24);
        assert!(
            t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
        );
        assert_ne!(t, random_token(24).unwrap());
    }
}
