//! The browser's WebSocket API, first slice: `connect {token}` logs the agent in (callgate
//! verifies the token and registers with the SIP provider), `ping`; the page is told about
//! `connected` and every `registration` change. The socket task owns the registration handle:
//! when the page goes away the registration is released (and removed after the grace period).
//! Protocol: docs/API.md.

use std::time::SystemTime;

use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use serde::{Deserialize, Serialize};

use super::http::AppState;
use crate::sip::endpoint::{EndpointError, RegistrationHandle};
use crate::sip::registration::Status;

/// Largest WebSocket message accepted from a page.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// A request from the page. Every request carries the page's `id`, echoed in the reply.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
enum Request {
    /// Log in with a loginByToken token.
    Connect { id: u64, token: String },
    /// Liveness check.
    Ping { id: u64 },
}

/// An error as the page sees it: a stable `code` and a human `message` (never a secret).
#[derive(Debug, Serialize, PartialEq, Eq)]
struct ApiError {
    code: String,
    message: String,
}

/// Everything callgate sends to the page.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "camelCase")]
enum Outgoing {
    /// The answer to a request.
    Reply {
        id: Option<u64>,
        ok: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<ApiError>,
    },
    /// The agent is logged in.
    Connected {
        agent: String,
        #[serde(rename = "sessionId")]
        session_id: String,
    },
    /// Registration with the SIP provider changed.
    Registration {
        state: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        expires: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        status: Option<u16>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

fn registration_event(s: &Status) -> Outgoing {
    let (state, expires, status, reason) = match s {
        Status::Idle => ("idle", None, None, None),
        Status::Registering => ("registering", None, None, None),
        Status::Registered { expires, .. } => ("registered", Some(*expires), None, None),
        Status::Failed { status, reason, .. } => {
            ("failed", None, Some(*status), Some(reason.clone()))
        }
        Status::Unregistered => ("unregistered", None, None, None),
    };
    Outgoing::Registration {
        state,
        expires,
        status,
        reason,
    }
}

fn error(id: Option<u64>, code: impl Into<String>, message: impl Into<String>) -> Outgoing {
    Outgoing::Reply {
        id,
        ok: false,
        error: Some(ApiError {
            code: code.into(),
            message: message.into(),
        }),
    }
}

/// `GET /ws`: upgrades to the session protocol.
pub async fn handler(ws: WebSocketUpgrade, State(state): State<AppState>) -> Response {
    ws.max_message_size(MAX_MESSAGE_BYTES)
        .max_frame_size(MAX_MESSAGE_BYTES)
        .on_upgrade(move |socket| session(socket, state))
}

async fn send(socket: &mut WebSocket, msg: &Outgoing) -> bool {
    match serde_json::to_string(msg) {
        Ok(text) => socket.send(Message::Text(text.into())).await.is_ok(),
        Err(_) => false,
    }
}

async fn next_status(reg: &mut Option<RegistrationHandle>) -> Option<Status> {
    match reg.as_mut() {
        Some(r) => r.changed().await,
        None => std::future::pending().await,
    }
}

async fn session(mut socket: WebSocket, state: AppState) {
    let mut reg: Option<RegistrationHandle> = None;
    loop {
        tokio::select! {
            msg = socket.recv() => {
                let text = match msg {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Binary(_))) => {
                        if !send(&mut socket, &error(None, "bad_request", "messages are JSON text frames")).await {
                            break;
                        }
                        continue;
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                };
                let reply = match serde_json::from_str::<Request>(text.as_str()) {
                    Err(_) => vec![error(None, "bad_request", "not a known request (see docs/API.md)")],
                    Ok(Request::Ping { id }) => vec![Outgoing::Reply { id: Some(id), ok: true, error: None }],
                    Ok(Request::Connect { id, token }) => connect(&state, &mut reg, id, &token).await,
                };
                for r in &reply {
                    if !send(&mut socket, r).await {
                        return;
                    }
                }
            }
            status = next_status(&mut reg) => match status {
                Some(s) => {
                    if !send(&mut socket, &registration_event(&s)).await {
                        break;
                    }
                }
                None => break,
            },
        }
    }
    // Dropping `reg` releases this session's share of the registration.
}

async fn connect(
    state: &AppState,
    reg: &mut Option<RegistrationHandle>,
    id: u64,
    token: &str,
) -> Vec<Outgoing> {
    if reg.is_some() {
        return vec![error(
            Some(id),
            "already_connected",
            "this session is already logged in",
        )];
    }
    let verified = match state.keyring.verify(token, SystemTime::now()) {
        Ok(v) => v,
        Err(e) => {
            tracing::info!(code = %e.code(), "token refused");
            return vec![error(Some(id), e.code(), e.to_string())];
        }
    };
    let app = verified.app().to_owned();
    let account = verified.into_account();
    let agent = account.aor();
    let handle = match state.sip.register(account).await {
        Ok(h) => h,
        Err(e) => {
            let code = match e {
                EndpointError::Resolve { .. } => "sip_server_unresolvable",
                EndpointError::TooMany(_) => "too_many_registrations",
                _ => "unavailable",
            };
            return vec![error(Some(id), code, e.to_string())];
        }
    };
    tracing::info!(%agent, %app, "agent connected");
    let current = registration_event(&handle.status());
    *reg = Some(handle);
    let session_id = format!("s-{:016x}", {
        let mut b = [0u8; 8];
        let _ = getrandom::fill(&mut b);
        u64::from_le_bytes(b)
    });
    vec![
        Outgoing::Reply {
            id: Some(id),
            ok: true,
            error: None,
        },
        Outgoing::Connected { agent, session_id },
        current,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        let r: Request =
            serde_json::from_str(r#"{"type":"connect","id":7,"token":"crm:00"}"#).unwrap();
        assert!(matches!(r, Request::Connect { id: 7, .. }));
        assert!(serde_json::from_str::<Request>(r#"{"type":"connect","id":7}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"type":"dance","id":7}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"type":"ping","id":1,"extra":1}"#).is_err());
        let e = serde_json::to_string(&error(Some(3), "bad_mac", "m")).unwrap();
        assert_eq!(
            e,
            r#"{"type":"reply","id":3,"ok":false,"error":{"code":"bad_mac","message":"m"}}"#
        );
        let ev = serde_json::to_string(&registration_event(&Status::Registered {
            expires: 60,
            count: 1,
        }))
        .unwrap();
        assert_eq!(
            ev,
            r#"{"type":"registration","state":"registered","expires":60}"#
        );
        let ev = serde_json::to_string(&registration_event(&Status::Failed {
            status: 401,
            reason: "Unauthorized".into(),
            retrying: false,
        }))
        .unwrap();
        assert_eq!(
            ev,
            r#"{"type":"registration","state":"failed","status":401,"reason":"Unauthorized"}"#
        );
    }
}
