//! The browser's offer and our answer (JSEP, RFC 8829 §5.3): one bundled audio section of G.711
//! and telephone-event, ICE-lite, DTLS-SRTP. Sans-IO.

use std::net::{IpAddr, Ipv4Addr};

use super::WebRtcError;
use super::ice::Ice;

/// The browser's DTLS role request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Setup {
    ActPass,
    Active,
    Passive,
}

/// A media section of the offer.
#[derive(Debug)]
struct Section {
    /// `m=` line's media, port-less: kind, proto and formats.
    kind: String,
    proto: String,
    formats: String,
    mid: Option<String>,
    /// For audio: `a=rtpmap` (pt, encoding, rate) and `a=fmtp` (pt, params).
    rtpmaps: Vec<(u8, String, u32)>,
    fmtps: Vec<(u8, String)>,
    direction: Option<&'static str>,
}

/// What the answer needs from the browser's offer.
#[derive(Debug)]
pub(super) struct Offer {
    pub(super) ufrag: String,
    pub(super) fingerprints: Vec<(String, String)>,
    pub(super) setup: Setup,
    sections: Vec<Section>,
    /// The section answered (the first audio one over DTLS-SRTP).
    audio: usize,
    direction: &'static str,
}

/// Our parts of an answer.
pub(super) struct AnswerParts<'a> {
    pub(super) ice: &'a Ice,
    pub(super) fingerprint: &'a str,
    pub(super) setup: &'static str,
    pub(super) candidates: &'a [IpAddr],
    pub(super) port: u16,
    pub(super) ssrc: u32,
    pub(super) session: u32,
}

const DIRECTIONS: [&str; 4] = ["sendrecv", "sendonly", "recvonly", "inactive"];

impl Offer {
    pub(super) fn parse(sdp: &str) -> Result<Offer, WebRtcError> {
        let mut ufrag = None;
        let mut pwd = None;
        let mut fingerprints = Vec::new();
        let mut setup = None;
        let mut session_direction = None;
        let mut sections: Vec<Section> = Vec::new();
        for line in sdp.lines().map(str::trim_end) {
            if let Some(m) = line.strip_prefix("m=") {
                let mut f = m.splitn(4, ' ');
                let (Some(kind), Some(_port), Some(proto)) = (f.next(), f.next(), f.next()) else {
                    return Err(WebRtcError::BadOffer("malformed m= line"));
                };
                sections.push(Section {
                    kind: kind.to_owned(),
                    proto: proto.to_owned(),
                    formats: f.next().unwrap_or("").to_owned(),
                    mid: None,
                    rtpmaps: Vec::new(),
                    fmtps: Vec::new(),
                    direction: None,
                });
                continue;
            }
            let Some(a) = line.strip_prefix("a=") else {
                continue;
            };
            let (name, value) = a.split_once(':').unwrap_or((a, ""));
            // ICE and DTLS attributes may sit at session level or in the bundled section.
            let in_bundle = sections.len() <= 1;
            match name {
                "ice-ufrag" if in_bundle && ufrag.is_none() => ufrag = Some(value.to_owned()),
                "ice-pwd" if in_bundle && pwd.is_none() => pwd = Some(value.to_owned()),
                "fingerprint" if in_bundle => {
                    if let Some((alg, v)) = value.split_once(' ') {
                        fingerprints.push((alg.to_owned(), v.trim().to_owned()));
                    }
                }
                "setup" if in_bundle && setup.is_none() => {
                    setup = Some(match value {
                        "active" => Setup::Active,
                        "passive" => Setup::Passive,
                        "actpass" => Setup::ActPass,
                        _ => {
                            return Err(WebRtcError::BadOffer(
                                "a=setup is not active, passive or actpass",
                            ));
                        }
                    });
                }
                _ => {}
            }
            let dir = DIRECTIONS.iter().find(|d| **d == name).copied();
            let Some(s) = sections.last_mut() else {
                if dir.is_some() {
                    session_direction = dir;
                }
                continue;
            };
            match name {
                "mid" => s.mid = Some(value.to_owned()),
                "rtpmap" => {
                    if let Some((pt, enc)) = value.split_once(' ') {
                        let mut e = enc.split('/');
                        let (Ok(pt), Some(name), Some(Ok(rate))) =
                            (pt.parse(), e.next(), e.next().map(str::parse))
                        else {
                            continue;
                        };
                        s.rtpmaps.push((pt, name.to_ascii_uppercase(), rate));
                    }
                }
                "fmtp" => {
                    if let Some((pt, params)) = value.split_once(' ')
                        && let Ok(pt) = pt.parse()
                    {
                        s.fmtps.push((pt, params.to_owned()));
                    }
                }
                _ if dir.is_some() => s.direction = dir,
                _ => {}
            }
        }
        let audio = sections
            .iter()
            .position(|s| s.kind == "audio" && s.proto.contains("SAVP"))
            .ok_or(WebRtcError::BadOffer("no audio stream over DTLS-SRTP"))?;
        let (Some(ufrag), Some(_pwd)) = (ufrag, pwd) else {
            return Err(WebRtcError::BadOffer("no ICE credentials"));
        };
        if fingerprints.is_empty() {
            return Err(WebRtcError::BadOffer("no DTLS fingerprint"));
        }
        let offered = sections
            .get(audio)
            .and_then(|s| s.direction)
            .or(session_direction);
        let direction = match offered {
            Some("sendonly") => "recvonly",
            Some("recvonly") => "sendonly",
            Some("inactive") => "inactive",
            _ => "sendrecv",
        };
        let offer = Offer {
            ufrag,
            fingerprints,
            setup: setup.unwrap_or(Setup::ActPass),
            sections,
            audio,
            direction,
        };
        if offer
            .codecs()
            .iter()
            .all(|(_, name, _)| *name == "telephone-event")
        {
            return Err(WebRtcError::NoCommonCodec);
        }
        Ok(offer)
    }

    /// The audio formats we take, in the browser's order: G.711 (either law) and the first
    /// telephone-event at 8 kHz, as (pt, name, fmtp).
    fn codecs(&self) -> Vec<(u8, &'static str, Option<&str>)> {
        let Some(s) = self.sections.get(self.audio) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for pt in s
            .formats
            .split_whitespace()
            .filter_map(|f| f.parse::<u8>().ok())
        {
            let map = s.rtpmaps.iter().find(|(p, _, _)| *p == pt);
            let name = match (pt, map) {
                (_, Some((_, n, 8000))) if n == "PCMU" => "PCMU",
                (_, Some((_, n, 8000))) if n == "PCMA" => "PCMA",
                (_, Some((_, n, 8000))) if n == "TELEPHONE-EVENT" => "telephone-event",
                (0, None) => "PCMU",
                (8, None) => "PCMA",
                _ => continue,
            };
            if out.iter().any(|(_, n, _)| *n == name) {
                continue;
            }
            let fmtp = s
                .fmtps
                .iter()
                .find(|(p, _)| *p == pt)
                .map(|(_, f)| f.as_str());
            out.push((pt, name, fmtp));
        }
        out
    }

    /// The answer with fixed parts of ours, for the fuzz target (`super::fuzz`).
    pub(super) fn fuzz_answer(&self) -> String {
        let ice = Ice {
            ufrag: "ours".into(),
            pwd: "our-password-of-22-chars".into(),
        };
        self.answer(&AnswerParts {
            ice: &ice,
            fingerprint: "AA:BB",
            setup: "active",
            candidates: &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            port: 10000,
            ssrc: 42,
            session: 7,
        })
    }

    /// Our answer: the audio section accepted, every other one refused (RFC 8843 §7.3.3).
    pub(super) fn answer(&self, us: &AnswerParts<'_>) -> String {
        use std::fmt::Write as _;
        let first = us
            .candidates
            .first()
            .copied()
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let family = if first.is_ipv6() { "IP6" } else { "IP4" };
        let mut a = String::with_capacity(1024);
        let mid = self
            .sections
            .get(self.audio)
            .and_then(|s| s.mid.clone())
            .unwrap_or_else(|| "0".into());
        let _ = write!(
            a,
            "v=0\r\no=callgate {} 2 IN {family} {first}\r\ns=-\r\nt=0 0\r\n\
             a=group:BUNDLE {mid}\r\na=ice-lite\r\na=msid-semantic: WMS callgate\r\n",
            us.session
        );
        for (i, s) in self.sections.iter().enumerate() {
            if i != self.audio {
                let _ = write!(
                    a,
                    "m={} 0 {} {}\r\nc=IN {family} {first}\r\n",
                    s.kind, s.proto, s.formats
                );
                if let Some(m) = &s.mid {
                    let _ = write!(a, "a=mid:{m}\r\n");
                }
                continue;
            }
            let codecs = self.codecs();
            let pts: Vec<String> = codecs.iter().map(|(pt, _, _)| pt.to_string()).collect();
            let _ = write!(
                a,
                "m=audio {port} {} {}\r\nc=IN {family} {first}\r\n\
                 a=rtcp:{port} IN {family} {first}\r\n\
                 a=ice-ufrag:{}\r\na=ice-pwd:{}\r\na=fingerprint:sha-256 {}\r\n\
                 a=setup:{}\r\na=mid:{mid}\r\na={}\r\na=rtcp-mux\r\n",
                s.proto,
                pts.join(" "),
                us.ice.ufrag,
                us.ice.pwd,
                us.fingerprint,
                us.setup,
                self.direction,
                port = us.port,
            );
            for (pt, name, fmtp) in &codecs {
                let _ = write!(a, "a=rtpmap:{pt} {name}/8000\r\n");
                if *name == "telephone-event" {
                    let _ = write!(a, "a=fmtp:{pt} {}\r\n", fmtp.unwrap_or("0-16"));
                }
            }
            let _ = write!(
                a,
                "a=ssrc:{0} cname:callgate\r\na=ssrc:{0} msid:callgate audio\r\n\
                 a=msid:callgate audio\r\n",
                us.ssrc
            );
            for (n, ip) in us.candidates.iter().enumerate() {
                // Host candidates, in order of preference (RFC 8445 §5.1.2.1).
                let priority = (126u32 << 24) | ((65535 - n as u32) << 8) | 255;
                let _ = write!(
                    a,
                    "a=candidate:{} 1 udp {priority} {ip} {} typ host\r\n",
                    n + 1,
                    us.port
                );
            }
            a.push_str("a=end-of-candidates\r\n");
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An audio-only offer as Chromium writes it (trimmed of extmaps), with a data channel
    /// section after it.
    const CHROME: &str = "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
        a=group:BUNDLE 0 1\r\na=extmap-allow-mixed\r\na=msid-semantic: WMS 8b5c\r\n\
        m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126\r\nc=IN IP4 0.0.0.0\r\n\
        a=rtcp:9 IN IP4 0.0.0.0\r\na=ice-ufrag:Xy7q\r\na=ice-pwd:3Bb5y0dKcPNeH5wqhHjJ2Fn0\r\n\
        a=ice-options:trickle\r\n\
        a=fingerprint:sha-256 6B:8B:F0:65:5F:78:E2:51:3B:AC:6F:F3:3F:46:1B:35:DC:B8:5F:64:1A:24:C2:43:F0:A1:58:D0:A1:2C:19:08\r\n\
        a=setup:actpass\r\na=mid:0\r\na=sendrecv\r\na=msid:8b5c 1f2e\r\na=rtcp-mux\r\n\
        a=rtpmap:111 opus/48000/2\r\na=rtcp-fb:111 transport-cc\r\na=fmtp:111 minptime=10;useinbandfec=1\r\n\
        a=rtpmap:63 red/48000/2\r\na=fmtp:63 111/111\r\na=rtpmap:9 G722/8000\r\n\
        a=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:13 CN/8000\r\n\
        a=rtpmap:110 telephone-event/48000\r\na=rtpmap:126 telephone-event/8000\r\n\
        a=ssrc:1001 cname:abc\r\n\
        m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\n\
        a=ice-ufrag:Xy7q\r\na=ice-pwd:3Bb5y0dKcPNeH5wqhHjJ2Fn0\r\na=mid:1\r\na=sctp-port:5000\r\n";

    fn parts<'a>(ice: &'a Ice, candidates: &'a [IpAddr]) -> AnswerParts<'a> {
        AnswerParts {
            ice,
            fingerprint: "AA:BB",
            setup: "active",
            candidates,
            port: 10000,
            ssrc: 42,
            session: 7,
        }
    }

    #[test]
    fn a_chrome_offer_gets_g711_and_its_8k_telephone_event() {
        let offer = Offer::parse(CHROME).unwrap();
        assert_eq!(offer.ufrag, "Xy7q");
        assert_eq!(offer.setup, Setup::ActPass);
        assert_eq!(offer.fingerprints.len(), 1);
        assert_eq!(
            offer.codecs(),
            vec![
                (0, "PCMU", None),
                (8, "PCMA", None),
                (126, "telephone-event", None)
            ]
        );
        let ice = Ice {
            ufrag: "ufrag".into(),
            pwd: "pwd".into(),
        };
        let ips = ["203.0.113.5".parse().unwrap(), "127.0.0.1".parse().unwrap()];
        let a = offer.answer(&parts(&ice, &ips));
        let lines: Vec<&str> = a.lines().collect();
        for want in [
            "a=group:BUNDLE 0",
            "a=ice-lite",
            "m=audio 10000 UDP/TLS/RTP/SAVPF 0 8 126",
            "a=ice-ufrag:ufrag",
            "a=ice-pwd:pwd",
            "a=fingerprint:sha-256 AA:BB",
            "a=setup:active",
            "a=mid:0",
            "a=sendrecv",
            "a=rtcp-mux",
            "a=rtpmap:126 telephone-event/8000",
            "a=fmtp:126 0-16",
            "a=ssrc:42 cname:callgate",
            "a=candidate:1 1 udp 2130706431 203.0.113.5 10000 typ host",
            "a=candidate:2 1 udp 2130706175 127.0.0.1 10000 typ host",
            // The data channel is refused, keeping its place (RFC 3264 §6).
            "m=application 0 UDP/DTLS/SCTP webrtc-datachannel",
            "a=mid:1",
        ] {
            assert!(lines.contains(&want), "{want} missing from\n{a}");
        }
        assert!(!a.contains("opus") && !a.contains("G722"), "{a}");
        // The SIP side reads the answer with its own parser.
        let audio = crate::sip::sdp::AudioSdp::parse(a.as_bytes()).unwrap();
        assert_eq!(audio.voice_codec().map(|c| c.name.as_str()), Some("PCMU"));
        assert_eq!(audio.telephone_event().map(|c| c.pt), Some(126));
    }

    #[test]
    fn directions_and_roles_are_answered() {
        let sendonly = CHROME.replace("a=sendrecv", "a=sendonly");
        assert_eq!(Offer::parse(&sendonly).unwrap().direction, "recvonly");
        let recvonly = CHROME.replace("a=sendrecv", "a=recvonly");
        assert_eq!(Offer::parse(&recvonly).unwrap().direction, "sendonly");
        let active = CHROME.replace("a=setup:actpass", "a=setup:active");
        assert_eq!(Offer::parse(&active).unwrap().setup, Setup::Active);
    }

    #[test]
    fn unusable_offers_are_refused_with_the_reason() {
        let no_g711 = CHROME.replace(" 0 8 13 ", " 13 ");
        assert!(matches!(
            Offer::parse(&no_g711),
            Err(WebRtcError::NoCommonCodec)
        ));
        let plain_rtp = CHROME.replace("UDP/TLS/RTP/SAVPF", "RTP/AVP");
        assert!(matches!(
            Offer::parse(&plain_rtp),
            Err(WebRtcError::BadOffer(_))
        ));
        let no_ice = CHROME.replace("a=ice-pwd:", "a=x-pwd:");
        assert!(matches!(
            Offer::parse(&no_ice),
            Err(WebRtcError::BadOffer(_))
        ));
        let no_fp = CHROME.replace("a=fingerprint:", "a=x-fingerprint:");
        assert!(matches!(
            Offer::parse(&no_fp),
            Err(WebRtcError::BadOffer(_))
        ));
        let bad_setup = CHROME.replace("a=setup:actpass", "a=setup:holdconn");
        assert!(matches!(
            Offer::parse(&bad_setup),
            Err(WebRtcError::BadOffer(_))
        ));
        for junk in [
            "",
            "m=",
            "m=audio",
            "a=rtpmap:x",
            "\u{0}\u{ff}",
            "m=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=rtpmap:0 PCMU/",
        ] {
            assert!(Offer::parse(junk).is_err(), "{junk:?}");
        }
    }
}
