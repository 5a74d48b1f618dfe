//! The HTTP server: health, and the browser WebSocket API at `/ws`.

use axum::Router;
use axum::routing::get;

use crate::sip::endpoint::Endpoint;
use crate::token::Keyring;

/// What the handlers share: immutable configuration and handles to the tasks that own state.
#[derive(Clone)]
pub struct AppState {
    /// Token keys.
    pub keyring: std::sync::Arc<Keyring>,
    /// The SIP endpoint.
    pub sip: Endpoint,
    /// The WebRTC engine (browser media).
    pub webrtc: std::sync::Arc<crate::media::webrtc::Engine>,
    /// RTP port pairs for the SIP side.
    pub rtp_ports: crate::media::rtp_leg::PortPool,
    /// IP the RTP sockets bind to.
    pub rtp_bind_ip: std::net::IpAddr,
    /// IP announced in SDP toward SIP peers (the public one behind NAT).
    pub rtp_public_ip: std::net::IpAddr,
}

/// The HTTP routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/ws", get(super::ws::handler))
        .with_state(state)
}

/// Liveness: the process is up and serving HTTP.
async fn healthz() -> &'static str {
    "ok\n"
}
