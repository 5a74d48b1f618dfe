//! The CRM backend drives its agents' phones (docs/API.md, "Call control"): sets an agent's
//! state, asks its page to place a call (click-to-call), and hangs up, holds, resumes,
//! transfers or sends digits on a live call. Each request reaches the session that owns the
//! agent or the call through its control queue; who may ask is the rule of the rest of the
//! API (an app key for its own agents, an agent's apiToken for itself, an admin key for all).

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tokio::sync::{mpsc, oneshot};

use super::auth::{Auth, denied, refuse};
use super::state::AppState;
use crate::session::control::{CallAction, Control};
use crate::session::credentials::{Caller, Denied};
use crate::session::error::ApiError;

/// Most bytes in a call-control or state request's body.
const MAX_BODY: usize = 4096;
/// How long a session may take to answer (it is one task; it answers in milliseconds).
const SESSION_DEADLINE: Duration = Duration::from_secs(5);
/// How long the agent's page may take to place a click-to-call call (its media set-up).
const PAGE_DEADLINE: Duration = Duration::from_secs(15);

/// The JSON body of a request, at most [`MAX_BODY`] bytes.
fn body<T: serde::de::DeserializeOwned>(bytes: &[u8], shape: &str) -> Result<T, Box<Response>> {
    if bytes.len() > MAX_BODY {
        return Err(Box::new(refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            &format!("the body is {} bytes; at most {MAX_BODY}", bytes.len()),
        )));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        Box::new(refuse(
            StatusCode::BAD_REQUEST,
            "bad_request",
            &format!("expected {shape}: {e}"),
        ))
    })
}

/// The control queue of a live session of `agent` that `who` may drive (any: they share the
/// agent's state): 403 for an agent of another app, 404 `agent_offline` when it has none.
fn agent_session(
    state: &AppState,
    who: &Caller,
    agent: &str,
) -> Result<mpsc::Sender<Control>, Box<Response>> {
    agent_sessions(state, who, agent)?
        .into_iter()
        .next()
        .ok_or_else(offline)
}

fn offline() -> Box<Response> {
    Box::new(refuse(
        StatusCode::NOT_FOUND,
        "agent_offline",
        "the agent has no live session (it is not logged in)",
    ))
}

/// The control queues of every live session of `agent` that `who` may drive, as
/// [`agent_session`] finds one.
fn agent_sessions(
    state: &AppState,
    who: &Caller,
    agent: &str,
) -> Result<Vec<mpsc::Sender<Control>>, Box<Response>> {
    let live = state.sessions.apps_of(agent);
    let app = match who {
        Caller::Agent { app, agent: me } if me == agent => Some(app.clone()),
        Caller::Agent { .. } => return Err(Box::new(denied(Denied::Forbidden))),
        Caller::App(mine) if live.contains(mine) => Some(mine.clone()),
        Caller::App(_) if !live.is_empty() => return Err(Box::new(denied(Denied::Forbidden))),
        Caller::App(_) => None,
        Caller::Admin => live.into_iter().next(),
    };
    let sessions = app.map_or_else(Vec::new, |app| state.sessions.sessions_of(&app, agent));
    if sessions.is_empty() {
        return Err(offline());
    }
    Ok(sessions)
}

/// The control queue of the session with live call `call_id`, if `who` may drive it (the
/// owner rule of `GET /api/v1/calls/{callId}`); 404 `call_not_live` for no such live call.
fn call_session(
    state: &AppState,
    who: &Caller,
    call_id: &str,
) -> Result<mpsc::Sender<Control>, Box<Response>> {
    let Some(owner) = state.sessions.owner_of_call(call_id) else {
        return Err(Box::new(refuse(
            StatusCode::NOT_FOUND,
            "call_not_live",
            "no live call with this id (it ended, or never was)",
        )));
    };
    who.may_see(&owner.agent, Some(&owner.app))
        .map_err(|d| Box::new(denied(d)))?;
    Ok(owner.control)
}

/// Sends the control `make` builds to a session and waits up to `limit` for its answer;
/// `None` if the session ended first or took too long.
async fn ask<T>(
    control: &mpsc::Sender<Control>,
    make: impl FnOnce(oneshot::Sender<Result<T, ApiError>>) -> Control,
    limit: Duration,
) -> Option<Result<T, ApiError>> {
    let (reply, answer) = oneshot::channel();
    let sent = control.send(make(reply));
    tokio::time::timeout(limit, async {
        sent.await.ok()?;
        answer.await.ok()
    })
    .await
    .ok()
    .flatten()
}

/// The HTTP form of a session's refusal.
fn refused(e: &ApiError) -> Response {
    let status = match e {
        ApiError::BadRequest(_)
        | ApiError::BadDestination(_)
        | ApiError::HeaderNotAllowed(_)
        | ApiError::UnknownState => StatusCode::BAD_REQUEST,
        ApiError::UriNotAllowed(_) | ApiError::DestinationDenied(_) => StatusCode::FORBIDDEN,
        ApiError::PageDetached
        | ApiError::StateForbidsCalls(_)
        | ApiError::TooManyCalls
        | ApiError::UnknownCall(_)
        | ApiError::DtmfQueueFull(_) => StatusCode::CONFLICT,
        ApiError::NotRegistered | ApiError::Unavailable | ApiError::NoMediaPorts(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ApiError::BadSdp(_) | ApiError::NoCommonCodec(_) | ApiError::MediaError(_) => {
            StatusCode::BAD_GATEWAY
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    refuse(status, &e.code(), &e.to_string())
}

fn gone(what: &str) -> Response {
    refuse(
        StatusCode::SERVICE_UNAVAILABLE,
        "agent_offline",
        &format!("the agent's session ended before it {what}"),
    )
}

/// The body of `PUT /api/v1/agents/{agent}/state`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PutState {
    state: String,
}

/// `PUT /api/v1/agents/{agent}/state` `{"state": "paused"}`: the CRM backend (or the agent's
/// own page credential) sets a logged-in agent's state, as the page's `setState` would: during
/// a call it is pending until the call ends. The reply is the `agentState` event after it.
pub async fn put_agent_state(
    State(state): State<AppState>,
    Auth(who): Auth,
    Path(agent): Path<String>,
    bytes: axum::body::Bytes,
) -> Response {
    let put: PutState = match body(&bytes, "{\"state\": \"<state id>\"}") {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let control = match agent_session(&state, &who, &agent) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let make = |reply| Control::SetState {
        state: put.state,
        reply,
    };
    match ask(&control, make, SESSION_DEADLINE).await {
        Some(Ok(ev)) => Json(ev).into_response(),
        Some(Err(e)) => refused(&e),
        None => gone("took the change"),
    }
}

/// The body of `POST /api/v1/agents/{agent}/calls`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Dial {
    to: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

/// `POST /api/v1/agents/{agent}/calls` `{"to": "0612345678", "headers": {...}}`: click-to-call.
/// The agent's page is asked to dial (the SDK does so without a click); 201 with the call's id
/// once the page has placed it, as the page's own `call` would be refused otherwise.
pub async fn click_to_call(
    State(state): State<AppState>,
    Auth(who): Auth,
    Path(agent): Path<String>,
    bytes: axum::body::Bytes,
) -> Response {
    let dial: Dial = match body(&bytes, "{\"to\": \"<number>\", \"headers\": {...}}") {
        Ok(d) => d,
        Err(r) => return *r,
    };
    let sessions = match agent_sessions(&state, &who, &agent) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    // The first of the agent's sessions whose page is there (another may be waiting for a
    // reloaded page to resume it).
    let mut answer = Some(Err(ApiError::PageDetached));
    for control in &sessions {
        let make = |reply| Control::Dial {
            to: dial.to.clone(),
            headers: dial.headers.clone(),
            reply,
        };
        answer = ask(control, make, PAGE_DEADLINE).await;
        if !matches!(answer, Some(Err(ApiError::PageDetached))) {
            break;
        }
    }
    let to = dial.to;
    match answer {
        Some(Ok(call_id)) => (
            StatusCode::CREATED,
            Json(serde_json::json!({"callId": call_id, "agent": agent, "to": to})),
        )
            .into_response(),
        Some(Err(e)) => refused(&e),
        None => refuse(
            StatusCode::GATEWAY_TIMEOUT,
            "page_unresponsive",
            "the agent's page did not place the call in time (no microphone permission, or the page is not running callgate.js)",
        ),
    }
}

/// Does `action` on live call `call_id`: 202, the outcome follows as the call's events.
async fn act(state: &AppState, who: &Caller, call_id: String, action: CallAction) -> Response {
    let control = match call_session(state, who, &call_id) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let name = match &action {
        CallAction::Hangup => "hangup",
        CallAction::Hold(true) => "hold",
        CallAction::Hold(false) => "unhold",
        CallAction::Dtmf(_) => "dtmf",
        CallAction::Transfer(_) => "transfer",
    };
    let make = |reply| Control::Act {
        call_id: call_id.clone(),
        action,
        reply,
    };
    match ask(&control, make, SESSION_DEADLINE).await {
        Some(Ok(())) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({"callId": call_id, "action": name})),
        )
            .into_response(),
        Some(Err(e)) => refused(&e),
        None => gone("took the request"),
    }
}

/// `POST /api/v1/calls/{callId}/hangup`: hangs up (or, ringing, declines with 603) a call.
pub async fn hangup(
    State(state): State<AppState>,
    Auth(who): Auth,
    Path(call_id): Path<String>,
) -> Response {
    act(&state, &who, call_id, CallAction::Hangup).await
}

/// `POST /api/v1/calls/{callId}/hold`: puts the far end on hold.
pub async fn hold(
    State(state): State<AppState>,
    Auth(who): Auth,
    Path(call_id): Path<String>,
) -> Response {
    act(&state, &who, call_id, CallAction::Hold(true)).await
}

/// `POST /api/v1/calls/{callId}/unhold`: resumes a held call.
pub async fn unhold(
    State(state): State<AppState>,
    Auth(who): Auth,
    Path(call_id): Path<String>,
) -> Response {
    act(&state, &who, call_id, CallAction::Hold(false)).await
}

/// The body of `POST /api/v1/calls/{callId}/dtmf`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Digits {
    digits: String,
}

/// `POST /api/v1/calls/{callId}/dtmf` `{"digits": "1234#"}`: sends digits to the far end.
pub async fn dtmf(
    State(state): State<AppState>,
    Auth(who): Auth,
    Path(call_id): Path<String>,
    bytes: axum::body::Bytes,
) -> Response {
    match body::<Digits>(&bytes, "{\"digits\": \"0-9 * # A-D\"}") {
        Ok(d) => act(&state, &who, call_id, CallAction::Dtmf(d.digits)).await,
        Err(r) => *r,
    }
}

/// The body of `POST /api/v1/calls/{callId}/transfer`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Transfer {
    to: String,
}

/// `POST /api/v1/calls/{callId}/transfer` `{"to": "1003"}`: blind transfer (the far end is
/// asked to call `to`, through the app's dial plan).
pub async fn transfer(
    State(state): State<AppState>,
    Auth(who): Auth,
    Path(call_id): Path<String>,
    bytes: axum::body::Bytes,
) -> Response {
    match body::<Transfer>(&bytes, "{\"to\": \"<number>\"}") {
        Ok(t) => act(&state, &who, call_id, CallAction::Transfer(t.to)).await,
        Err(r) => *r,
    }
}
