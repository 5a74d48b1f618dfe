//! SDP for the SIP leg (RFC 4566, offer/answer RFC 3264): one audio stream of G.711 and
//! RFC 4733 telephone-event. The browser leg's SDP belongs to the WebRTC engine, not here.

use std::fmt::Write as _;
use std::net::IpAddr;

/// Largest SDP body accepted.
pub const MAX_SDP_BYTES: usize = 16 * 1024;

/// Why an SDP body was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SdpError {
    /// Not UTF-8, too large, or a line callgate cannot read.
    #[error("malformed SDP ({0})")]
    Malformed(&'static str),
    /// No `m=audio` line.
    #[error("no audio stream in SDP")]
    NoAudio,
    /// No codec both sides support (answer: 488 Not Acceptable Here).
    #[error("no common audio codec")]
    NoCommonCodec,
}

/// A payload format of the audio stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Codec {
    /// RTP payload type.
    pub pt: u8,
    /// Encoding name, upper case (`PCMU`, `PCMA`, `TELEPHONE-EVENT`).
    pub name: String,
    /// Clock rate.
    pub rate: u32,
    /// `a=fmtp` parameters.
    pub fmtp: Option<String>,
}

impl Codec {
    /// Whether this is RFC 4733 telephone-event at 8 kHz (what pairs with G.711).
    pub fn is_telephone_event(&self) -> bool {
        self.name == "TELEPHONE-EVENT" && self.rate == 8000
    }
}

/// Stream direction (RFC 3264 §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Both ways.
    SendRecv,
    /// We only send (we hold the other side: they hear music or nothing, we hear nothing).
    SendOnly,
    /// We only receive.
    RecvOnly,
    /// Neither.
    Inactive,
}

impl Direction {
    fn attr(self) -> &'static str {
        match self {
            Direction::SendRecv => "sendrecv",
            Direction::SendOnly => "sendonly",
            Direction::RecvOnly => "recvonly",
            Direction::Inactive => "inactive",
        }
    }

    /// The direction an answer takes to this offered direction, given what we want.
    pub fn answer_to(self, wanted: Direction) -> Direction {
        let (they_send, they_recv) = match self {
            Direction::SendRecv => (true, true),
            Direction::SendOnly => (true, false),
            Direction::RecvOnly => (false, true),
            Direction::Inactive => (false, false),
        };
        let (we_send, we_recv) = match wanted {
            Direction::SendRecv => (true, true),
            Direction::SendOnly => (true, false),
            Direction::RecvOnly => (false, true),
            Direction::Inactive => (false, false),
        };
        match (we_send && they_recv, we_recv && they_send) {
            (true, true) => Direction::SendRecv,
            (true, false) => Direction::SendOnly,
            (false, true) => Direction::RecvOnly,
            (false, false) => Direction::Inactive,
        }
    }
}

/// One audio session description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AudioSdp {
    /// `o=` session id.
    pub session_id: u64,
    /// `o=` version (incremented on every change we offer).
    pub version: u64,
    /// Connection address (`c=`).
    pub addr: IpAddr,
    /// RTP port (0: stream refused).
    pub port: u16,
    /// Payload formats in preference order.
    pub codecs: Vec<Codec>,
    /// Direction.
    pub direction: Direction,
    /// `a=ptime`.
    pub ptime: Option<u32>,
}

fn static_codec(pt: u8) -> Option<Codec> {
    let (name, rate) = match pt {
        0 => ("PCMU", 8000),
        8 => ("PCMA", 8000),
        9 => ("G722", 8000),
        13 => ("CN", 8000),
        _ => return None,
    };
    Some(Codec {
        pt,
        name: name.into(),
        rate,
        fmtp: None,
    })
}

impl AudioSdp {
    /// Parses the first audio stream of an SDP body.
    pub fn parse(body: &[u8]) -> Result<AudioSdp, SdpError> {
        if body.len() > MAX_SDP_BYTES {
            return Err(SdpError::Malformed("too large"));
        }
        let text = std::str::from_utf8(body).map_err(|_| SdpError::Malformed("not UTF-8"))?;
        let mut session_id = 0;
        let mut version = 0;
        let mut session_addr: Option<IpAddr> = None;
        let mut session_dir = Direction::SendRecv;
        let mut media: Option<(u16, Vec<u8>)> = None;
        let mut media_addr: Option<IpAddr> = None;
        let mut media_dir: Option<Direction> = None;
        let mut rtpmaps: Vec<(u8, String, u32)> = Vec::new();
        let mut fmtps: Vec<(u8, String)> = Vec::new();
        let mut ptime = None;
        let mut in_audio = false;
        let mut seen_audio = false;
        for line in text.lines().map(str::trim_end) {
            let Some((kind, value)) = line.split_once('=') else {
                continue;
            };
            match kind {
                "o" => {
                    let f: Vec<&str> = value.split_whitespace().collect();
                    session_id = f.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
                    version = f.get(2).and_then(|v| v.parse().ok()).unwrap_or(0);
                }
                "m" => {
                    in_audio = false;
                    let f: Vec<&str> = value.split_whitespace().collect();
                    if f.first() == Some(&"audio") && !seen_audio {
                        seen_audio = true;
                        in_audio = true;
                        let port = f
                            .get(1)
                            .and_then(|p| p.split('/').next())
                            .and_then(|p| p.parse().ok())
                            .ok_or(SdpError::Malformed("bad m= port"))?;
                        let pts = f
                            .iter()
                            .skip(3)
                            .filter_map(|p| p.parse::<u8>().ok())
                            .take(32)
                            .collect();
                        media = Some((port, pts));
                    }
                }
                "c" => {
                    let addr = value
                        .split_whitespace()
                        .nth(2)
                        .and_then(|a| a.split('/').next()?.parse().ok());
                    if in_audio {
                        media_addr = addr;
                    } else if !seen_audio {
                        session_addr = addr;
                    }
                }
                "a" if in_audio || !seen_audio => {
                    let (name, arg) = value.split_once(':').unwrap_or((value, ""));
                    let dir = match name {
                        "sendrecv" => Some(Direction::SendRecv),
                        "sendonly" => Some(Direction::SendOnly),
                        "recvonly" => Some(Direction::RecvOnly),
                        "inactive" => Some(Direction::Inactive),
                        _ => None,
                    };
                    if let Some(d) = dir {
                        if in_audio {
                            media_dir = Some(d);
                        } else {
                            session_dir = d;
                        }
                        continue;
                    }
                    if !in_audio {
                        continue;
                    }
                    match name {
                        "rtpmap" => {
                            let (pt, enc) = arg
                                .split_once(' ')
                                .ok_or(SdpError::Malformed("bad rtpmap"))?;
                            let mut parts = enc.split('/');
                            let enc_name = parts.next().unwrap_or_default().to_ascii_uppercase();
                            let rate = parts.next().and_then(|r| r.parse().ok()).unwrap_or(8000);
                            if let Ok(pt) = pt.trim().parse() {
                                rtpmaps.push((pt, enc_name, rate));
                            }
                        }
                        "fmtp" => {
                            if let Some((pt, params)) = arg.split_once(' ') {
                                if let Ok(pt) = pt.trim().parse() {
                                    fmtps.push((pt, params.trim().to_owned()));
                                }
                            }
                        }
                        "ptime" => ptime = arg.trim().parse().ok(),
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        let (port, pts) = media.ok_or(SdpError::NoAudio)?;
        let addr = media_addr
            .or(session_addr)
            .ok_or(SdpError::Malformed("no c= address"))?;
        let codecs = pts
            .into_iter()
            .filter_map(|pt| {
                let mut c = match rtpmaps.iter().find(|(p, _, _)| *p == pt) {
                    Some((_, name, rate)) => Codec {
                        pt,
                        name: name.clone(),
                        rate: *rate,
                        fmtp: None,
                    },
                    None => static_codec(pt)?,
                };
                c.fmtp = fmtps.iter().find(|(p, _)| *p == pt).map(|(_, f)| f.clone());
                Some(c)
            })
            .collect();
        let mut direction = media_dir.unwrap_or(session_dir);
        // RFC 2543 hold: c=0.0.0.0 means "do not send to me".
        if addr.is_unspecified() && direction == Direction::SendRecv {
            direction = Direction::SendOnly;
        }
        Ok(AudioSdp {
            session_id,
            version,
            addr,
            port,
            codecs,
            direction,
            ptime,
        })
    }

    /// The first voice codec (not telephone-event / CN).
    pub fn voice_codec(&self) -> Option<&Codec> {
        self.codecs
            .iter()
            .find(|c| matches!(c.name.as_str(), "PCMU" | "PCMA"))
    }

    /// The telephone-event/8000 format, if negotiated.
    pub fn telephone_event(&self) -> Option<&Codec> {
        self.codecs.iter().find(|c| c.is_telephone_event())
    }

    /// Our answer to `offer`: the first offered codec we support (in the offerer's order, RFC 3264
    /// §6.1), plus telephone-event if offered, with the offer's payload type numbers.
    pub fn answer(
        offer: &AudioSdp,
        addr: IpAddr,
        port: u16,
        supported: &[&str],
        session_id: u64,
        wanted: Direction,
    ) -> Result<AudioSdp, SdpError> {
        let voice = offer
            .codecs
            .iter()
            .find(|c| c.rate == 8000 && supported.iter().any(|s| s.eq_ignore_ascii_case(&c.name)))
            .ok_or(SdpError::NoCommonCodec)?;
        let mut codecs = vec![voice.clone()];
        if let Some(te) = offer.telephone_event() {
            codecs.push(te.clone());
        }
        Ok(AudioSdp {
            session_id,
            version: 1,
            addr,
            port,
            codecs,
            direction: offer.direction.answer_to(wanted),
            ptime: Some(20),
        })
    }

    /// An offer of `codecs` (names in preference order, e.g. `["PCMU", "PCMA"]`) with
    /// telephone-event/8000 as payload type 101.
    pub fn offer(
        addr: IpAddr,
        port: u16,
        codecs: &[&str],
        session_id: u64,
        direction: Direction,
    ) -> AudioSdp {
        let mut list: Vec<Codec> = codecs
            .iter()
            .filter_map(|n| match n.to_ascii_uppercase().as_str() {
                "PCMU" => static_codec(0),
                "PCMA" => static_codec(8),
                _ => None,
            })
            .collect();
        list.push(Codec {
            pt: 101,
            name: "TELEPHONE-EVENT".into(),
            rate: 8000,
            fmtp: Some("0-16".into()),
        });
        AudioSdp {
            session_id,
            version: 1,
            addr,
            port,
            codecs: list,
            direction,
            ptime: Some(20),
        }
    }

    /// The SDP text.
    pub fn to_sdp(&self) -> String {
        let ip = if self.addr.is_ipv4() { "IP4" } else { "IP6" };
        let mut s = String::with_capacity(320);
        let _ = write!(
            s,
            "v=0\r\no=callgate {} {} IN {ip} {}\r\ns=callgate\r\nc=IN {ip} {}\r\nt=0 0\r\nm=audio {} RTP/AVP",
            self.session_id, self.version, self.addr, self.addr, self.port
        );
        for c in &self.codecs {
            let _ = write!(s, " {}", c.pt);
        }
        s.push_str("\r\n");
        for c in &self.codecs {
            let name = if c.is_telephone_event() {
                "telephone-event"
            } else {
                c.name.as_str()
            };
            let _ = write!(s, "a=rtpmap:{} {}/{}\r\n", c.pt, name, c.rate);
            if let Some(f) = &c.fmtp {
                let _ = write!(s, "a=fmtp:{} {f}\r\n", c.pt);
            }
        }
        if let Some(p) = self.ptime {
            let _ = write!(s, "a=ptime:{p}\r\n");
        }
        let _ = write!(s, "a={}\r\n", self.direction.attr());
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIPP_OFFER: &str = "v=0\r\no=user1 53655765 2353687637 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n\
t=0 0\r\nm=audio 6000 RTP/AVP 8 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n\
a=fmtp:101 0-15\r\na=ptime:20\r\n";

    #[test]
    fn parse_offer_and_answer_in_offerer_order() {
        let offer = AudioSdp::parse(SIPP_OFFER.as_bytes()).unwrap();
        assert_eq!(offer.port, 6000);
        assert_eq!(
            offer.codecs.iter().map(|c| c.pt).collect::<Vec<_>>(),
            vec![8, 0, 101]
        );
        assert_eq!(
            offer.codecs[0].name, "PCMA",
            "static payload type without rtpmap"
        );
        assert_eq!(offer.telephone_event().map(|c| c.pt), Some(101));
        assert_eq!(offer.session_id, 53655765);
        let ans = AudioSdp::answer(
            &offer,
            "127.0.0.1".parse().unwrap(),
            20000,
            &["PCMU", "PCMA"],
            7,
            Direction::SendRecv,
        )
        .unwrap();
        assert_eq!(
            ans.codecs.iter().map(|c| c.pt).collect::<Vec<_>>(),
            vec![8, 101]
        );
        let text = ans.to_sdp();
        assert!(text.contains("m=audio 20000 RTP/AVP 8 101\r\n"), "{text}");
        assert!(
            text.contains("a=rtpmap:101 telephone-event/8000\r\n"),
            "{text}"
        );
        assert_eq!(AudioSdp::parse(text.as_bytes()).unwrap(), ans);
    }

    #[test]
    fn hold_directions() {
        assert_eq!(
            Direction::SendOnly.answer_to(Direction::SendRecv),
            Direction::RecvOnly
        );
        assert_eq!(
            Direction::Inactive.answer_to(Direction::SendRecv),
            Direction::Inactive
        );
        assert_eq!(
            Direction::SendRecv.answer_to(Direction::SendOnly),
            Direction::SendOnly
        );
        assert_eq!(
            Direction::RecvOnly.answer_to(Direction::SendRecv),
            Direction::SendOnly
        );
        let old_hold = SIPP_OFFER.replace("c=IN IP4 127.0.0.1", "c=IN IP4 0.0.0.0");
        assert_eq!(
            AudioSdp::parse(old_hold.as_bytes()).unwrap().direction,
            Direction::SendOnly
        );
        let inactive = format!("{SIPP_OFFER}a=inactive\r\n");
        assert_eq!(
            AudioSdp::parse(inactive.as_bytes()).unwrap().direction,
            Direction::Inactive
        );
    }

    #[test]
    fn refusals() {
        assert_eq!(
            AudioSdp::parse(b"v=0\r\nm=video 5000 RTP/AVP 96\r\n"),
            Err(SdpError::NoAudio)
        );
        assert_eq!(
            AudioSdp::parse(b"v=0\r\nm=audio 5000 RTP/AVP 0\r\n"),
            Err(SdpError::Malformed("no c= address"))
        );
        let g729 = SIPP_OFFER
            .replace("RTP/AVP 8 0 101", "RTP/AVP 18")
            .replace("a=rtpmap:0 PCMU/8000\r\n", "a=rtpmap:18 G729/8000\r\n");
        let offer = AudioSdp::parse(g729.as_bytes()).unwrap();
        assert_eq!(
            AudioSdp::answer(
                &offer,
                "127.0.0.1".parse().unwrap(),
                1,
                &["PCMU"],
                1,
                Direction::SendRecv
            ),
            Err(SdpError::NoCommonCodec)
        );
        assert!(AudioSdp::parse(&vec![b'a'; MAX_SDP_BYTES + 1]).is_err());
        for cut in 0..SIPP_OFFER.len() {
            let _ = AudioSdp::parse(&SIPP_OFFER.as_bytes()[..cut]);
        }
    }

    #[test]
    fn our_offer() {
        let o = AudioSdp::offer(
            "192.0.2.1".parse().unwrap(),
            20002,
            &["PCMA", "PCMU"],
            99,
            Direction::SendRecv,
        );
        let t = o.to_sdp();
        assert!(t.contains("m=audio 20002 RTP/AVP 8 0 101\r\n"), "{t}");
        assert!(t.contains("a=fmtp:101 0-16\r\n"));
        assert_eq!(AudioSdp::parse(t.as_bytes()).unwrap(), o);
    }
}
