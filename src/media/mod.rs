//! Media: the pieces of the WebRTC ⇄ RTP bridge that need no socket or engine (sans-IO).
//!
//! The WebRTC leg (ICE, DTLS-SRTP) and the RTP sockets come later; these are the parts both sides
//! share: RTP packets, the stream rewriter that keeps one continuous stream toward each leg,
//! RFC 4733 DTMF events, G.711, and reception statistics.

pub mod bridge;
pub mod dtmf;
pub mod g711;
pub mod rewrite;
pub mod rtp;
pub mod rtp_leg;
pub mod stats;
pub mod webrtc;
