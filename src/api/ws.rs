//! The browser's WebSocket: a pump between the socket and the page's session
//! ([`crate::session`]). It parses frames into requests, answers `ping`, starts or resumes a
//! session, forwards the rest, writes what the session sends, keeps the heartbeat and closes
//! with the documented codes. Protocol: docs/API.md.

use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;

use super::state::AppState;
use crate::session::control::ToPage;
pub use crate::session::control::{
    CLOSE_GOING_AWAY, CLOSE_HEARTBEAT, CLOSE_LOGGED_OUT, CLOSE_RESUMED_ELSEWHERE,
};
use crate::session::error::ApiError;
use crate::session::event::Event;
use crate::session::login::{self, Link, Peer};
use crate::session::request::{MAX_MESSAGE_BYTES, Request};

/// `GET /ws`: upgrades to the session protocol.
pub async fn handler(
    ws: WebSocketUpgrade,
    State(state): State<AppState>,
    axum::extract::ConnectInfo(addr): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: axum::http::HeaderMap,
) -> Response {
    let forwarded = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    let ip = client_ip(addr.ip(), &forwarded, &state.trusted_proxies);
    let origin = headers
        .get("origin")
        .and_then(|v| v.to_str().ok())
        .map(|o| o.trim_end_matches('/').to_ascii_lowercase());
    let peer = Peer { ip, origin };
    // Session messages are small: an 8 KiB read buffer per page instead of the default
    // 128 KiB allocated up front (larger messages still arrive, up to the limit).
    ws.max_message_size(MAX_MESSAGE_BYTES)
        .max_frame_size(MAX_MESSAGE_BYTES)
        .read_buffer_size(8 * 1024)
        .on_upgrade(move |socket| pump(socket, state, peer))
}

/// The client behind `peer`: `peer` itself unless it is a trusted proxy; then the right-most
/// `X-Forwarded-For` address that is not a trusted proxy (each proxy appends the address it
/// saw, so everything left of that is the client's own claim). A malformed entry stops the
/// walk at the last address believed.
fn client_ip(
    peer: std::net::IpAddr,
    forwarded: &str,
    trusted: &[std::net::IpAddr],
) -> std::net::IpAddr {
    let mut client = peer;
    if !trusted.contains(&peer) {
        return client;
    }
    for entry in forwarded
        .rsplit(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        let Ok(ip) = entry.parse::<std::net::IpAddr>() else {
            return client;
        };
        client = ip;
        if !trusted.contains(&ip) {
            break;
        }
    }
    client
}

/// Longest a frame may take to leave: a page that stops reading (its TCP window closed) has
/// its socket closed rather than holding this task, and its session's events, forever.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Sends `msg` within [`SEND_TIMEOUT`]; `false` if the socket is gone or stalled.
async fn send_frame(socket: &mut WebSocket, msg: Message) -> bool {
    matches!(
        tokio::time::timeout(SEND_TIMEOUT, socket.send(msg)).await,
        Ok(Ok(()))
    )
}

async fn send(socket: &mut WebSocket, msg: &Event) -> bool {
    match serde_json::to_string(msg) {
        Ok(text) => send_frame(socket, Message::Text(text.into())).await,
        Err(_) => false,
    }
}

/// Closes the socket with `code` and `reason` (the page's `CloseEvent` carries both), waiting a
/// moment for the page's closing frame (RFC 6455 §7.1.1: the client's data in flight is not
/// cut off by a reset).
async fn close(socket: &mut WebSocket, code: u16, reason: &'static str) {
    let frame = axum::extract::ws::CloseFrame {
        code,
        reason: reason.into(),
    };
    if !send_frame(socket, Message::Close(Some(frame))).await {
        return;
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        while let Some(Ok(m)) = socket.recv().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// What the page's session sends next; `None` when it ended (pending while logged out).
async fn from_session(link: &mut Option<Link>) -> Option<ToPage> {
    match link.as_mut() {
        Some(l) => l.events.recv().await,
        None => std::future::pending().await,
    }
}

/// What the pump does after a frame.
enum After {
    Go,
    Stop,
}

/// One socket's pump, until the page or its session goes.
async fn pump(mut socket: WebSocket, state: AppState, peer: Peer) {
    state.metrics.websocket(1);
    let mut link: Option<Link> = None;
    let mut heartbeat = tokio::time::interval_at(
        tokio::time::Instant::now() + state.heartbeat,
        state.heartbeat,
    );
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                if last_heard.elapsed() >= state.heartbeat * 3 {
                    tracing::info!("page silent for three heartbeats: closing its socket");
                    close(&mut socket, CLOSE_HEARTBEAT, "heartbeat timeout").await;
                    break;
                }
                if !send_frame(&mut socket, Message::Ping(Default::default())).await {
                    break;
                }
            }
            out = from_session(&mut link) => match out {
                Some(ToPage::Event(ev)) => {
                    if !send(&mut socket, &ev).await {
                        break;
                    }
                }
                Some(ToPage::Close(code, reason)) => {
                    // Logged out, resumed elsewhere, callgate stopping: the session is done
                    // with this socket.
                    link = None;
                    close(&mut socket, code, reason).await;
                    break;
                }
                None => {
                    link = None;
                    close(&mut socket, CLOSE_GOING_AWAY, "callgate is shutting down").await;
                    break;
                }
            },
            msg = socket.recv() => {
                last_heard = tokio::time::Instant::now();
                let text = match msg {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Binary(_))) => {
                        let e = ApiError::BadRequest("messages are JSON text frames");
                        if !send(&mut socket, &Event::refused(None, e)).await {
                            break;
                        }
                        continue;
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                };
                let req = Request::parse(text.as_str());
                match frame(&mut socket, &state, &peer, &mut link, req).await {
                    After::Go => {}
                    After::Stop => break,
                }
            }
        }
    }
    if let Some(l) = link {
        l.detach();
    }
    state.metrics.websocket(-1);
}

/// A request from the page: answered here (ping, login, resume, refusals while logged out)
/// or handed to the session.
async fn frame(
    socket: &mut WebSocket,
    state: &AppState,
    peer: &Peer,
    link: &mut Option<Link>,
    req: Result<Request, ApiError>,
) -> After {
    let reply = match (req, link.as_ref()) {
        (Err(e), _) => Event::refused(None, e),
        (Ok(Request::Ping { id }), _) => Event::ok(id),
        (Ok(req), Some(l)) => {
            let id = request_id(&req);
            match l.request(req) {
                Ok(true) => return After::Go,
                Ok(false) => return After::Stop,
                Err(e) => Event::refused(Some(id), e),
            }
        }
        (Ok(Request::Connect { id, token }), None) => {
            match login::connect(&state.0, peer, id, &token).await {
                Ok(l) => {
                    *link = Some(l);
                    return After::Go;
                }
                Err(e) => Event::refused(Some(id), e),
            }
        }
        (Ok(Request::Resume { id, session_id }), None) => {
            match login::resume(&state.0, peer, id, &session_id).await {
                Ok(l) => {
                    *link = Some(l);
                    return After::Go;
                }
                Err(e) => Event::refused(Some(id), e),
            }
        }
        (Ok(Request::Logout { id }), None) => {
            let _ = send(socket, &Event::ok(id)).await;
            close(socket, CLOSE_LOGGED_OUT, "logged out").await;
            return After::Stop;
        }
        (Ok(Request::Call { id, .. }), None) => Event::refused(Some(id), ApiError::NotConnected),
        (Ok(other), None) => Event::refused(
            Some(request_id(&other)),
            ApiError::UnknownCall("no such call in this session"),
        ),
    };
    if send(socket, &reply).await {
        After::Go
    } else {
        After::Stop
    }
}

/// A request's `id`.
fn request_id(r: &Request) -> u64 {
    match r {
        Request::Connect { id, .. }
        | Request::Resume { id, .. }
        | Request::Logout { id }
        | Request::Media { id, .. }
        | Request::Ping { id }
        | Request::Call { id, .. }
        | Request::Hangup { id, .. }
        | Request::Answer { id, .. }
        | Request::Reject { id, .. }
        | Request::Hold { id, .. }
        | Request::Unhold { id, .. }
        | Request::Dtmf { id, .. }
        | Request::Transfer { id, .. }
        | Request::Consult { id, .. }
        | Request::Ice { id, .. }
        | Request::SetState { id, .. }
        | Request::CompleteTransfer { id, .. } => *id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_is_the_right_most_address_a_trusted_proxy_added() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let trusted = [ip("127.0.0.1"), ip("10.0.0.5")];
        // The client claims 6.6.6.6; the proxy appended what it saw.
        assert_eq!(
            client_ip(ip("127.0.0.1"), "6.6.6.6, 203.0.113.9", &trusted),
            ip("203.0.113.9")
        );
        // Two proxies in a row: the right-most untrusted one.
        assert_eq!(
            client_ip(ip("127.0.0.1"), "6.6.6.6, 203.0.113.9, 10.0.0.5", &trusted),
            ip("203.0.113.9")
        );
        // Not from a trusted proxy: the header is the client's own and means nothing.
        assert_eq!(
            client_ip(ip("198.51.100.7"), "203.0.113.9", &trusted),
            ip("198.51.100.7")
        );
        // No header, or garbage right of the proxy: the proxy (what we know).
        assert_eq!(client_ip(ip("127.0.0.1"), "", &trusted), ip("127.0.0.1"));
        assert_eq!(
            client_ip(ip("127.0.0.1"), "203.0.113.9, bogus", &trusted),
            ip("127.0.0.1")
        );
    }
}
