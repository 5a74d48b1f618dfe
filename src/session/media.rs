//! A call's media set up from the page's offer: the WebRTC leg toward the browser and an RTP
//! port pair toward the SIP side.

use super::context::Context;
use super::error::ApiError;
use crate::media::rtp_leg::RtpLeg;
use crate::media::webrtc::Leg;
use crate::sip::sdp::{AudioSdp, Direction};

/// The browser side of a call, set up from the page's offer.
pub(crate) struct BrowserMedia {
    pub(crate) leg: Leg,
    /// callgate's SDP answer for the page.
    pub(crate) answer: String,
    /// The negotiated browser side.
    pub(crate) browser: AudioSdp,
    /// The G.711 law the browser got (the SIP side must use the same: no transcoding yet).
    pub(crate) voice: String,
    pub(crate) rtp: RtpLeg,
    /// `o=` session id for the SIP side's SDP.
    pub(crate) session_id: u64,
}

impl BrowserMedia {
    /// Answers the page's offer with the WebRTC engine and opens an RTP port pair.
    pub(crate) async fn set_up(ctx: &Context, offer: &str) -> Result<BrowserMedia, ApiError> {
        let (leg, answer, browser, voice) = browser_leg(ctx, offer).await?;
        let rtp = RtpLeg::open(&ctx.rtp_ports, ctx.rtp_bind_ip)
            .await
            .map_err(|e| ApiError::NoMediaPorts(e.to_string()))?;
        Ok(BrowserMedia {
            leg,
            answer,
            browser,
            voice,
            rtp,
            session_id: unique_u64() >> 1,
        })
    }

    /// Our SDP offer toward the SIP side, with the codec the browser got.
    pub(crate) fn sip_offer(&self, ctx: &Context) -> AudioSdp {
        AudioSdp::offer(
            ctx.rtp_public_ip,
            self.rtp.port(),
            &[self.voice.as_str()],
            self.session_id,
            Direction::SendRecv,
        )
    }

    /// Our SDP answer to the caller's `offer`, with the codec the browser got.
    pub(crate) fn sip_answer(&self, ctx: &Context, offer: &AudioSdp) -> Result<AudioSdp, ApiError> {
        AudioSdp::answer(
            offer,
            ctx.rtp_public_ip,
            self.rtp.port(),
            &[self.voice.as_str()],
            self.session_id,
            Direction::SendRecv,
        )
        .map_err(|_| {
            ApiError::NoCommonCodec(format!(
                "the caller did not offer {}, which the browser chose",
                self.voice
            ))
        })
    }
}

/// Answers the page's offer with the WebRTC engine: the leg, callgate's SDP answer, the
/// negotiated browser side and its G.711 law.
pub(crate) async fn browser_leg(
    ctx: &Context,
    offer: &str,
) -> Result<(Leg, String, AudioSdp, String), ApiError> {
    let (leg, answer) = ctx.webrtc.answer(offer).await?;
    let browser = AudioSdp::parse(answer.as_bytes())
        .ok()
        .filter(|a| a.voice_codec().is_some())
        .ok_or_else(|| {
            ApiError::NoCommonCodec("the browser offered neither PCMU nor PCMA".to_owned())
        })?;
    let voice = browser
        .voice_codec()
        .map(|c| c.name.clone())
        .unwrap_or_default();
    Ok((leg, answer, browser, voice))
}

/// A number that must be unique, not secret (an SDP origin): from the OS generator, else from
/// a process-wide counter.
pub(crate) fn unique_u64() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    crate::rand::u64().unwrap_or_else(|_| NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// Wall-clock Unix milliseconds (for history rows).
pub(crate) fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
