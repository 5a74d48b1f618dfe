//! What every session shares: immutable settings and handles to the tasks that own state.

use std::sync::Arc;

use super::credentials::Credentials;
use super::hub::Hub;
use super::limits::BadTokens;
use super::registry::Registry;
use crate::config::live::LiveApps;
use crate::sip::endpoint::Endpoint;

/// The session layer's shared context (the HTTP API's state derefs to it).
pub struct Context {
    /// The apps in force (token keys, origins, dial plans, recording), reloadable.
    pub apps: LiveApps,
    /// The SIP endpoint.
    pub sip: Endpoint,
    /// The WebRTC engine (browser media).
    pub webrtc: Arc<crate::media::webrtc::Engine>,
    /// RTP port pairs for the SIP side.
    pub rtp_ports: crate::media::rtp_leg::PortPool,
    /// IP the RTP sockets bind to.
    pub rtp_bind_ip: std::net::IpAddr,
    /// IP announced in SDP toward SIP peers (the public one behind NAT).
    pub rtp_public_ip: std::net::IpAddr,
    /// Bad-token counter per source address.
    pub bad_tokens: BadTokens,
    /// Single-use tokens that logged in, until they expire (STYLE.md §3: a std `Mutex`, held
    /// to look up and insert one entry, never across an `.await`).
    pub used_tokens: std::sync::Mutex<crate::token::replay::UsedTokens>,
    /// How DTMF from the page is sent.
    pub dtmf: crate::config::DtmfMode,
    /// Hang-up after this long without SIP-side RTP (`None`: never).
    pub media_timeout: Option<std::time::Duration>,
    /// Follow the far end's REFER (checked against the app's dial plan).
    pub accept_refer: bool,
    /// Live sessions.
    pub sessions: Registry,
    /// Most live sessions of one agent.
    pub max_sessions_per_agent: usize,
    /// How long a session waits for its page to come back (`None`: sessions end with their
    /// socket).
    pub resume: Option<std::time::Duration>,
    /// WebSocket ping interval; three without an answer close the socket.
    pub heartbeat: std::time::Duration,
    /// Reverse proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Call history.
    pub cdr: crate::cdr::CdrStore,
    /// Where recordings go.
    pub recordings_dir: std::path::PathBuf,
    /// Per-agent event channels (SSE).
    pub hub: Arc<Hub>,
    /// Who may call the HTTP API.
    pub credentials: Arc<Credentials>,
    /// Counters for /metrics, and the draining flag.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The demo accounts (demo mode only).
    pub demo: Option<Arc<crate::demo::DemoAccounts>>,
}

impl Context {
    /// Where call `call_id` of `app` is recorded, if that app records.
    pub fn recording_path(&self, app: &str, call_id: &str) -> Option<std::path::PathBuf> {
        if !self.apps.get().record.contains(app) {
            return None;
        }
        crate::media::recorder::file_name(call_id).map(|f| self.recordings_dir.join(f))
    }
}
