//! The demo's HTTP side (demo mode only, see `crate::demo`): `GET /api/v1/demo` says whether
//! it is on and which numbers to call; `POST /api/v1/demo/token` hands a demo token to a page
//! on this machine, never to one reached through a proxy or from elsewhere.

use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::auth::refuse;
use super::state::AppState;
use crate::demo::pbx::{CALLBACK, ECHO, TONE};

fn numbers() -> serde_json::Value {
    serde_json::json!([
        {"number": ECHO, "name": "Echo: you hear yourself"},
        {"number": TONE, "name": "Tone: a 440 Hz tone"},
        {"number": CALLBACK, "name": "Call-back: rings, then calls you back to try incoming calls"},
    ])
}

fn off() -> Response {
    refuse(
        StatusCode::NOT_FOUND,
        "not_found",
        "the demo is off (it is on only with the built-in configuration, or [demo] enabled = true)",
    )
}

/// `GET /api/v1/demo`.
pub async fn info(State(state): State<AppState>) -> Response {
    if state.demo.is_none() {
        return off();
    }
    Json(serde_json::json!({"numbers": numbers()})).into_response()
}

/// Whether a request comes from this machine itself: a loopback peer with no sign of a proxy
/// in between (a reverse proxy on this machine would make every visitor look local).
fn from_this_machine(peer: std::net::SocketAddr, headers: &HeaderMap) -> bool {
    let proxied = ["forwarded", "x-forwarded-for", "x-real-ip", "via"]
        .iter()
        .any(|h| headers.contains_key(*h));
    peer.ip().is_loopback() && !proxied
}

/// `POST /api/v1/demo/token`: a token for the next demo extension.
pub async fn token(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let Some(demo) = &state.demo else {
        return off();
    };
    if !from_this_machine(peer, &headers) {
        return refuse(
            StatusCode::FORBIDDEN,
            "forbidden",
            "demo tokens are handed only to a browser on this machine, not through a proxy",
        );
    }
    let (Some(account), Ok(iv)) = (demo.next_account(), crate::rand::bytes::<16>()) else {
        return refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "no demo account",
        );
    };
    let expires =
        crate::token::unix_seconds(std::time::SystemTime::now()) + crate::demo::TOKEN_LIFE_SECS;
    let apps = state.apps.get();
    match apps
        .keyring
        .mint(crate::config::DEMO_APP, &account, Some(expires), iv)
    {
        Ok(token) => Json(serde_json::json!({
            "token": token,
            "extension": account.login,
            "numbers": numbers(),
        }))
        .into_response(),
        Err(e) => refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &format!("cannot mint a demo token: {e}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_unproxied_loopback_peer_is_this_machine() {
        let local: std::net::SocketAddr =
            "127.0.0.1:5000".parse().unwrap_or(([0, 0, 0, 0], 0).into());
        let remote: std::net::SocketAddr =
            "192.0.2.7:5000".parse().unwrap_or(([0, 0, 0, 0], 0).into());
        let mut proxied = HeaderMap::new();
        proxied.insert(
            "x-forwarded-for",
            axum::http::HeaderValue::from_static("203.0.113.5"),
        );
        assert!(from_this_machine(local, &HeaderMap::new()));
        assert!(!from_this_machine(local, &proxied));
        assert!(!from_this_machine(remote, &HeaderMap::new()));
    }
}
