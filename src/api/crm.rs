//! The HTTP API for CRM backends (`/api/v1/...`), behind [`auth`](super::auth): per-agent
//! events as Server-Sent Events. Errors are JSON, `{"error": {"code", "message"}}`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};

use super::auth::{Caller, Denied};
use super::events::{Channel, Hub, Item, SubscribeError};
use super::http::AppState;

/// A JSON error response.
pub fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({"error": {"code": code, "message": message}});
    (status, Json(body)).into_response()
}

/// The response for a refused credential or resource.
pub fn denied(d: Denied) -> Response {
    let (status, code) = match d {
        Denied::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
        Denied::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
        Denied::NotFound => (StatusCode::NOT_FOUND, "not_found"),
    };
    let mut r = refuse(status, code, &d.to_string());
    if d == Denied::Unauthorized {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    r
}

/// The caller of a request.
pub fn caller(state: &AppState, headers: &HeaderMap) -> Result<Caller, Denied> {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    state.credentials.identify(auth)
}

/// `GET /api/v1/agents/{agent}/events`: the agent's events as they happen, after the
/// `Last-Event-ID` the subscriber saw last (a `gap` event first if some are lost). An app or
/// admin key may subscribe before the agent logs in.
pub async fn agent_events(
    State(state): State<AppState>,
    Path(agent): Path<String>,
    headers: HeaderMap,
) -> Response {
    let who = match caller(&state, &headers) {
        Ok(c) => c,
        Err(d) => return denied(d),
    };
    let last_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if agent.is_empty() || agent.len() > 256 || agent.chars().any(char::is_control) {
        return denied(Denied::NotFound);
    }
    let create_for = match state.hub.get(&agent) {
        Some(ch) => {
            if let Err(d) = who.may_see(&agent, ch.app().as_deref()) {
                return denied(d);
            }
            None
        }
        None => match &who {
            Caller::Agent(me) if me != &agent => return denied(Denied::Forbidden),
            Caller::Agent(_) => None,
            Caller::App(app) => Some(Some(app.clone())),
            Caller::Admin => Some(None),
        },
    };
    let sub = match state.hub.subscribe(&agent, last_id, create_for) {
        Ok(Some(s)) => s,
        Ok(None) => return denied(Denied::NotFound),
        Err(e) => {
            let code = match e {
                SubscribeError::TooManyChannels => "too_many_channels",
                SubscribeError::TooManySubscribers => "too_many_subscribers",
            };
            return refuse(StatusCode::TOO_MANY_REQUESTS, code, &e.to_string());
        }
    };
    let stream = futures_util::stream::unfold(sub, |mut sub| async move {
        let ev = match sub.next().await? {
            Item::Event(id, json) => Event::default().id(id.to_string()).data(&*json),
            Item::Gap { after, resumes_at } => Event::default().data(
                serde_json::json!({"type": "gap", "after": after, "resumesAt": resumes_at})
                    .to_string(),
            ),
        };
        Some((Ok::<_, Infallible>(ev), sub))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// Where a session's events go: its page (through the session task) and, once logged in, the
/// agent's channel for CRM subscribers.
#[derive(Clone)]
pub struct EventSink {
    tx: tokio::sync::mpsc::Sender<super::ws::Outgoing>,
    channel: Option<(Arc<Hub>, Arc<Channel>)>,
}

impl EventSink {
    /// Events for the page only (not logged in yet).
    pub(crate) fn new(tx: tokio::sync::mpsc::Sender<super::ws::Outgoing>) -> EventSink {
        EventSink { tx, channel: None }
    }

    /// From now on also to the agent's channel.
    pub(crate) fn with_channel(self, hub: Arc<Hub>, channel: Arc<Channel>) -> EventSink {
        EventSink {
            tx: self.tx,
            channel: Some((hub, channel)),
        }
    }

    /// Publishes `ev` on the agent's channel (if it is an event CRMs get).
    pub(crate) fn publish(&self, ev: &super::ws::Outgoing) {
        if let (Some((hub, ch)), true) = (&self.channel, ev.for_crm()) {
            if let Ok(json) = serde_json::to_string(ev) {
                hub.publish(ch, json.into());
            }
        }
    }

    /// Publishes `ev` and queues it for the page.
    pub(crate) async fn send(&self, ev: super::ws::Outgoing) -> Result<(), ()> {
        self.publish(&ev);
        self.tx.send(ev).await.map_err(|_| ())
    }
}
