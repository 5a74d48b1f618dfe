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
