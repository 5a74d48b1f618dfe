//! What the fuzz targets in `fuzz/` feed their inputs to, one function per target, each taking
//! raw bytes as an attacker would send them. The same functions replay the committed corpora
//! as a normal test (`tests/fuzz_corpora.rs`), so `bash tests/run` needs no nightly toolchain
//! and every input that ever found a bug stays a regression test. None may panic.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::secret::SecretBytes;
use crate::token::{AppKeys, Keyring, Mode, TokenPolicy};

/// What a target does with one input.
pub type Target = fn(&[u8]);

/// The targets, by name (the directory of each corpus under `fuzz/corpus/`).
pub const TARGETS: &[(&str, Target)] = &[
    ("token", token),
    ("sip_message", sip_message),
    ("sip_sdp", sip_sdp),
    ("webrtc_sdp", webrtc_sdp),
    ("stun", stun),
    ("rtp", rtp),
    ("rtcp", rtcp),
    ("page_json", page_json),
];

/// The keys the token target's inputs are checked with (the corpus's tokens were minted
/// with them): app `crm` in `ctr-hmac`, app `old` in `ctr`.
pub fn keyring() -> &'static Keyring {
    static KEYRING: OnceLock<Keyring> = OnceLock::new();
    KEYRING.get_or_init(|| {
        let key = |b: u8| SecretBytes::new(vec![b; 32]);
        let mut apps = BTreeMap::new();
        if let Ok(k) = AppKeys::new(Mode::CtrHmac, vec![key(1)], [0; 16], true) {
            apps.insert(
                "crm".to_owned(),
                k.with_replay_limits(Some(Duration::from_secs(3600)), true),
            );
        }
        if let Ok(k) = AppKeys::new(Mode::Ctr, vec![key(2), key(3)], [7; 16], false) {
            apps.insert("old".to_owned(), k);
        }
        Keyring::new(apps, TokenPolicy::default())
    })
}

/// The moment tokens are checked at (the corpus's tokens expire after it).
pub const TOKEN_NOW: u64 = 1_800_000_000;

/// A `loginByToken` token, as a page sends it.
pub fn token(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let now = UNIX_EPOCH + Duration::from_secs(TOKEN_NOW);
    if let Ok(v) = keyring().verify(text, now) {
        let _ = std::hint::black_box(v.single_use());
        let _ = std::hint::black_box(v.into_account().aor());
    }
    let _ = std::hint::black_box(keyring().verify(text, SystemTime::now()));
}

/// A SIP datagram, parsed and handed to the transaction layer as the endpoint would.
pub fn sip_message(data: &[u8]) {
    let Ok(msg) = crate::sip::message::Message::parse(data) else {
        return;
    };
    let _ = std::hint::black_box((msg.start_line(), msg.method(), msg.cseq(), msg.call_id()));
    for (name, value) in msg.all_headers() {
        let _ = std::hint::black_box(crate::sip::message::header_params(value));
        if name.eq_ignore_ascii_case("Via") {
            let _ = std::hint::black_box(crate::sip::message::Via::parse(value));
        }
        for kind in [
            crate::sip::digest::ChallengeKind::Www,
            crate::sip::digest::ChallengeKind::Proxy,
        ] {
            let _ = std::hint::black_box(crate::sip::digest::Challenge::parse(kind, value));
        }
    }
    let _ = std::hint::black_box(crate::sip::sdp::AudioSdp::parse(msg.body()));
    let mut layer = crate::sip::transaction::TransactionLayer::new(Default::default(), 1);
    let now = Instant::now();
    let from = SocketAddr::from(([127, 0, 0, 1], 5060));
    layer.handle_message(now, msg, from);
    layer.handle_timeout(now + Duration::from_secs(64));
    while layer.poll_transmit().is_some() || layer.poll_event().is_some() {}
}

/// The SDP of a SIP peer (an INVITE's or a 200's body).
pub fn sip_sdp(data: &[u8]) {
    if let Ok(sdp) = crate::sip::sdp::AudioSdp::parse(data) {
        let _ = std::hint::black_box(format!("{sdp:?}"));
    }
}

/// A browser's SDP offer, and the answer to it.
pub fn webrtc_sdp(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        crate::media::webrtc::fuzz::offer(text);
    }
}

/// A datagram on the WebRTC port read as STUN (an ICE check).
pub fn stun(data: &[u8]) {
    crate::media::webrtc::fuzz::stun(data);
}

/// An RTP packet from either side, with its telephone-event payload.
pub fn rtp(data: &[u8]) {
    if let Ok(p) = crate::media::rtp::RtpPacket::parse(data) {
        let _ = std::hint::black_box(crate::media::dtmf::TelephoneEvent::parse(p.payload));
    }
}

/// A compound RTCP packet.
pub fn rtcp(data: &[u8]) {
    let _ = std::hint::black_box(crate::media::rtcp::parse(data));
}

/// A page's WebSocket text frame, and the destination it dials through a strict dial plan.
pub fn page_json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = std::hint::black_box(crate::session::request::Request::parse(text));
    let plan = crate::dialplan::DialPlan::default();
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
        for key in ["to", "target"] {
            if let Some(to) = v.get(key).and_then(serde_json::Value::as_str) {
                let _ = std::hint::black_box(plan.apply(to));
                let _ = std::hint::black_box(plan.check_referral(to));
            }
        }
    }
}
