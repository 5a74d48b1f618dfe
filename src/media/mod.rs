//! Media: the WebRTC leg (ICE-lite, DTLS-SRTP; `webrtc/`), the RTP leg toward SIP (`rtp_leg.rs`),
//! the bridge between them (`bridge.rs`) and its recorder (`recorder.rs`), over sans-IO parts:
//! RTP packets, the stream rewriter that keeps one continuous stream toward each leg, RFC 4733
//! DTMF events, G.711, and reception statistics.

pub mod bridge;
pub mod dtmf;
pub mod g711;
pub mod latch;
pub mod mixer;
pub mod recorder;
pub mod rewrite;
pub mod rtcp;
pub mod rtp;
pub mod rtp_leg;
pub mod stats;
pub mod webrtc;
