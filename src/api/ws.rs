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

use std::collections::HashMap;

use tokio::sync::mpsc;

use super::crm::EventSink;
use super::events::Channel;
use super::http::AppState;
use crate::config::DtmfMode;
use crate::dialplan::{DialError, DialPlan};
use crate::media::bridge::{self, Flow, Mapping};
use crate::media::rtp_leg::RtpLeg;
use crate::media::webrtc::{Leg, WebRtcError};
use crate::sip::call::CallEvent;
use crate::sip::endpoint::{
    CallCommander, CallControl, EndpointError, RegistrationEvent, RegistrationHandle,
};
use crate::sip::registration::Status;
use crate::sip::sdp::{AudioSdp, Direction};

/// Largest WebSocket message accepted from a page.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// A request from the page. Every request carries the page's `id`, echoed in the reply.
#[derive(Debug, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase",
    deny_unknown_fields
)]
enum Request {
    /// Log in with a loginByToken token.
    Connect { id: u64, token: String },
    /// Take over a session whose page went away (reload, network change), within
    /// `http.resume_secs`: its registration and calls.
    Resume { id: u64, session_id: String },
    /// End the session now (hangs up its calls) instead of keeping it for a resume.
    Logout { id: u64 },
    /// A new browser offer for a call (after a resume): callgate answers it and the call's
    /// audio moves to the new connection while the SIP side stays as it is.
    Media {
        id: u64,
        call_id: String,
        sdp: String,
    },
    /// Liveness check.
    Ping { id: u64 },
    /// Call `to` with the browser's SDP offer; the reply carries callgate's answer.
    Call { id: u64, to: String, sdp: String },
    /// Hang up (or cancel) a call.
    Hangup { id: u64, call_id: String },
    /// Answer an incoming call with the browser's SDP offer; the reply carries the answer.
    Answer {
        id: u64,
        call_id: String,
        sdp: String,
    },
    /// Refuse an incoming call (`code` 486 Busy Here by default, or 603 Decline, ...).
    Reject {
        id: u64,
        call_id: String,
        code: Option<u16>,
    },
    /// Put the far end on hold.
    Hold { id: u64, call_id: String },
    /// Resume.
    Unhold { id: u64, call_id: String },
    /// Send DTMF digits (SIP INFO for now).
    Dtmf {
        id: u64,
        call_id: String,
        digits: String,
    },
    /// Blind transfer: the far end is asked to call `to`.
    Transfer {
        id: u64,
        call_id: String,
        to: String,
    },
    /// Consultation: hold `callId` and call `to` (the reply is as for `call`); then
    /// `completeTransfer` or hang up the consultation and `unhold`.
    Consult {
        id: u64,
        call_id: String,
        to: String,
        sdp: String,
    },
    /// A trickled ICE candidate of the page's connection for `callId` (empty: end of
    /// candidates).
    Ice {
        id: u64,
        call_id: String,
        candidate: String,
        sdp_mid: Option<String>,
        #[serde(rename = "sdpMLineIndex")]
        sdp_mline_index: Option<u16>,
    },
    /// Attended transfer: the far end of `callId` takes over `consultId` (a call to the target).
    CompleteTransfer {
        id: u64,
        call_id: String,
        consult_id: String,
    },
}

/// Close code: the page logged out.
pub const CLOSE_LOGGED_OUT: u16 = 4000;
/// Close code: callgate is shutting down (RFC 6455 "going away").
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code: the page answered no ping for three heartbeat intervals.
pub const CLOSE_HEARTBEAT: u16 = 4008;

/// Most simultaneous calls of one page (a call, a consultation, a waiting call).
pub const MAX_CALLS_PER_SESSION: usize = 4;

/// The SIP status that ended or refused a call.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct SipStatus {
    status: u16,
    reason: String,
}

/// An error as the page sees it: a stable `code` and a human `message` (never a secret).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct ApiError {
    code: String,
    message: String,
}

/// Everything callgate sends to the page.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub(crate) enum Outgoing {
    /// The answer to a request.
    Reply {
        id: Option<u64>,
        ok: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<ApiError>,
        #[serde(rename = "callId", skip_serializing_if = "Option::is_none")]
        call_id: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        sdp: Option<String>,
    },
    /// A call's state changed.
    Call {
        #[serde(rename = "callId")]
        call_id: String,
        state: &'static str,
        direction: &'static str,
        peer: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        sip: Option<SipStatus>,
        #[serde(rename = "endReason", skip_serializing_if = "Option::is_none")]
        end_reason: Option<&'static str>,
    },
    /// Progress of a transfer the agent asked for.
    Transfer {
        #[serde(rename = "callId")]
        call_id: String,
        state: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        status: Option<u16>,
    },
    /// The far end transfers the agent's call elsewhere (its REFER): whether callgate follows,
    /// then how the call to the new party goes. On `succeeded` the same call goes on with it.
    Referred {
        #[serde(rename = "callId")]
        call_id: String,
        state: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        to: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        sip: Option<SipStatus>,
    },
    /// A DTMF digit from the far end.
    Dtmf {
        #[serde(rename = "callId")]
        call_id: String,
        digit: String,
    },
    /// The caller gave up before the agent answered (for a missed-calls list); the call's
    /// `ended` event follows.
    Missed {
        #[serde(rename = "callId")]
        call_id: String,
        from: String,
    },
    /// A call for the agent: answer with `answer {callId, sdp}` or `reject`.
    Incoming {
        #[serde(rename = "callId")]
        call_id: String,
        from: String,
        #[serde(rename = "displayName", skip_serializing_if = "Option::is_none")]
        display_name: Option<String>,
    },
    /// The agent is logged in.
    Connected {
        agent: String,
        #[serde(rename = "sessionId")]
        session_id: String,
        /// The page's credential for the HTTP API (its own events, calls, recordings).
        #[serde(rename = "apiToken")]
        api_token: String,
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

impl Outgoing {
    /// Whether CRM subscribers of the agent's channel get this event (not replies, and not
    /// `connected`, which carries the session's credentials).
    pub(crate) fn for_crm(&self) -> bool {
        !matches!(self, Outgoing::Reply { .. } | Outgoing::Connected { .. })
    }
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
        call_id: None,
        sdp: None,
    }
}

fn ok(id: u64) -> Outgoing {
    Outgoing::Reply {
        id: Some(id),
        ok: true,
        error: None,
        call_id: None,
        sdp: None,
    }
}

/// Bad tokens tolerated per source address and minute before `connect` is refused outright.
pub const BAD_TOKENS_PER_MINUTE: u32 = 10;

/// Counts refused tokens per source address (a guard against token guessing and floods).
///
/// A std `Mutex` around a small map: held only to bump or read a counter, never across an
/// `.await`; shared by all WebSocket sessions (STYLE.md §3's documented exception). Bounded: when
/// it holds too many addresses, expired windows are dropped, and if still full, it is cleared.
#[derive(Debug, Default)]
pub struct BadTokens {
    map: std::sync::Mutex<HashMap<std::net::IpAddr, (u32, std::time::Instant)>>,
}

impl BadTokens {
    const MAX_ADDRESSES: usize = 10_000;
    const WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

    fn blocked(&self, ip: std::net::IpAddr) -> bool {
        let Ok(map) = self.map.lock() else {
            return false;
        };
        map.get(&ip)
            .is_some_and(|(n, since)| *n >= BAD_TOKENS_PER_MINUTE && since.elapsed() < Self::WINDOW)
    }

    fn record(&self, ip: std::net::IpAddr) {
        let Ok(mut map) = self.map.lock() else { return };
        if map.len() >= Self::MAX_ADDRESSES {
            map.retain(|_, (_, since)| since.elapsed() < Self::WINDOW);
            if map.len() >= Self::MAX_ADDRESSES {
                map.clear();
            }
        }
        let entry = map.entry(ip).or_insert((0, std::time::Instant::now()));
        if entry.1.elapsed() >= Self::WINDOW {
            *entry = (0, std::time::Instant::now());
        }
        entry.0 += 1;
    }
}

/// Who is on the other end of a WebSocket.
#[derive(Debug, Clone)]
struct Peer {
    /// The client's address: the TCP peer, or, when that is a proxy on this machine, the first
    /// `X-Forwarded-For` address.
    ip: std::net::IpAddr,
    /// The page's `Origin` header, lower-cased.
    origin: Option<String>,
}

/// `GET /ws`: upgrades to the session protocol.
pub async fn handler(
    ws: WebSocketUpgrade,
    State(state): State<AppState>,
    axum::extract::ConnectInfo(addr): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: axum::http::HeaderMap,
) -> Response {
    let forwarded = headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.trim().parse::<std::net::IpAddr>().ok());
    let ip = match forwarded {
        // Trust X-Forwarded-For only from a proxy on this machine.
        Some(f) if addr.ip().is_loopback() => f,
        _ => addr.ip(),
    };
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
        .on_upgrade(move |socket| session(socket, state, peer))
}

async fn send(socket: &mut WebSocket, msg: &Outgoing) -> bool {
    match serde_json::to_string(msg) {
        Ok(text) => socket.send(Message::Text(text.into())).await.is_ok(),
        Err(_) => false,
    }
}

/// Keeps the session's call maps in step with an event on its way to the page: an ended call
/// goes, any other state is remembered for a resume.
fn note(
    ev: &Outgoing,
    calls: &mut HashMap<String, SessionCall>,
    ringing: &mut HashMap<String, Ringing>,
    last: &mut HashMap<String, Outgoing>,
) {
    if let Outgoing::Call { call_id, state, .. } = ev {
        if *state == "ended" {
            calls.remove(call_id);
            ringing.remove(call_id);
            last.remove(call_id);
        } else {
            last.insert(call_id.clone(), ev.clone());
        }
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
    if socket.send(Message::Close(Some(frame))).await.is_err() {
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

async fn next_registration_event(
    reg: &mut Option<RegistrationHandle>,
) -> Option<RegistrationEvent> {
    match reg.as_mut() {
        Some(r) => r.next().await,
        None => std::future::pending().await,
    }
}

/// A call of this session: its control, and its follower's DTMF input (the follower picks
/// RFC 4733 or SIP INFO once it knows what the far end negotiated).
struct SessionCall {
    control: CallControl,
    dtmf: mpsc::UnboundedSender<String>,
    /// A new browser leg for the call (after a resume), with its negotiated SDP.
    media: mpsc::UnboundedSender<(Leg, AudioSdp)>,
}

impl std::ops::Deref for SessionCall {
    type Target = CallControl;
    fn deref(&self) -> &CallControl {
        &self.control
    }
}

/// An incoming call waiting for the page's `answer`.
struct Ringing {
    control: CallControl,
    dtmf: mpsc::UnboundedSender<String>,
    /// Hands the media legs to the call's follower once the page answered.
    handoff: tokio::sync::oneshot::Sender<(Leg, RtpLeg, AudioSdp)>,
    offer: Option<AudioSdp>,
    media: mpsc::UnboundedSender<(Leg, AudioSdp)>,
    /// The `incoming` event, repeated to a page that resumes the session.
    announce: Outgoing,
}

/// A logged-in session whose page went away, kept for the page to resume.
struct Parked {
    reg: RegistrationHandle,
    plan: DialPlan,
    ident: Ident,
    calls: HashMap<String, SessionCall>,
    ringing: HashMap<String, Ringing>,
    events_tx: EventSink,
    events_rx: mpsc::Receiver<Outgoing>,
    last: HashMap<String, Outgoing>,
    /// Tells this parking from a later one of the same session.
    parking: u64,
}

/// A logged-in session's identity.
struct Ident {
    session_id: String,
    agent: String,
    app: String,
    /// The agent's event channel.
    channel: std::sync::Arc<Channel>,
    /// The page's credential for the HTTP API.
    api_token: String,
}

/// A session is over: its HTTP credential goes, and its agent's channel loses a session.
fn end_session(state: &AppState, ident: &Ident) {
    state.credentials.revoke(&ident.api_token);
    state.hub.logout(&ident.channel);
}

/// Sessions whose page went away, each kept for `http.resume_secs` so that the page, reloaded
/// or reconnected, can `resume` it (registration and calls) with its session id. One that is
/// not resumed in time ends: its calls are hung up and its registration released.
#[derive(Default)]
pub struct Sessions {
    parked: std::sync::Mutex<HashMap<String, Parked>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Parked>> {
        self.parked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn park(
        self: &std::sync::Arc<Self>,
        parked: Parked,
        grace: std::time::Duration,
        state: AppState,
    ) {
        let parking = parked.parking;
        let id = parked.ident.session_id.clone();
        self.lock().insert(id.clone(), parked);
        state.metrics.parked(1);
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let expired = {
                let mut m = me.lock();
                match m.get(&id) {
                    Some(p) if p.parking == parking => m.remove(&id),
                    _ => None,
                }
            };
            if let Some(p) = expired {
                tracing::info!(agent = %p.ident.agent, "session not resumed in time: ending it");
                state.metrics.parked(-1);
                state.metrics.agent(-1);
                end_session(&state, &p.ident);
                drop(p);
            }
        });
    }

    fn app_of(&self, id: &str) -> Option<String> {
        self.lock().get(id).map(|p| p.ident.app.clone())
    }

    fn take(&self, id: &str) -> Option<Parked> {
        self.lock().remove(id)
    }

    /// How many sessions wait for their page.
    pub fn parked(&self) -> usize {
        self.lock().len()
    }
}

/// A number that must be unique, not secret (an SDP origin, a parking stamp): from the OS
/// generator, else from a process-wide counter.
fn unique_u64() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    crate::rand::u64().unwrap_or_else(|_| NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

async fn session(mut socket: WebSocket, state: AppState, peer: Peer) {
    state.metrics.websocket(1);
    let mut reg: Option<RegistrationHandle> = None;
    // The logged-in agent's app's dial plan.
    let mut plan = DialPlan::default();
    let mut calls: HashMap<String, SessionCall> = HashMap::new();
    let mut ringing: HashMap<String, Ringing> = HashMap::new();
    let (tx, mut events_rx) = mpsc::channel::<Outgoing>(256);
    let mut events_tx = EventSink::new(tx);
    let mut ident: Option<Ident> = None;
    // Each call's latest `call` event, replayed to a page that resumes.
    let mut last: HashMap<String, Outgoing> = HashMap::new();
    let mut logged_out = false;
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
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    break;
                }
            }
            Some(ev) = events_rx.recv() => {
                note(&ev, &mut calls, &mut ringing, &mut last);
                if !send(&mut socket, &ev).await {
                    break;
                }
            }
            msg = socket.recv() => {
                last_heard = tokio::time::Instant::now();
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
                    Ok(Request::Ping { id }) => vec![ok(id)],
                    Ok(Request::Connect { id, token }) => {
                        let out = connect(&state, &peer, &mut reg, &mut plan, &mut ident, id, &token).await;
                        if let Some(me) = &ident {
                            events_tx = events_tx.clone().with_channel(state.hub.clone(), me.channel.clone());
                            for ev in &out {
                                events_tx.publish(ev);
                            }
                        }
                        out
                    }
                    Ok(Request::Logout { id }) => {
                        logged_out = true;
                        let _ = send(&mut socket, &ok(id)).await;
                        close(&mut socket, CLOSE_LOGGED_OUT, "logged out").await;
                        break;
                    }
                    Ok(Request::Resume { id, session_id }) => match resume(&state, &peer, reg.is_some(), id, &session_id) {
                        Err(refusal) => vec![*refusal],
                        Ok(p) => {
                            tracing::info!(agent = %p.ident.agent, "session resumed");
                            let mut out = vec![
                                ok(id),
                                Outgoing::Connected { agent: p.ident.agent.clone(), session_id, api_token: p.ident.api_token.clone() },
                                registration_event(&p.reg.status()),
                            ];
                            out.extend(p.calls.keys().filter_map(|c| p.last.get(c).cloned()));
                            out.extend(p.ringing.values().map(|r| r.announce.clone()));
                            reg = Some(p.reg);
                            plan = p.plan;
                            calls = p.calls;
                            ringing = p.ringing;
                            events_tx = p.events_tx;
                            events_rx = p.events_rx;
                            last = p.last;
                            ident = Some(p.ident);
                            out
                        }
                    },
                    Ok(Request::Media { id, call_id, sdp }) => match calls.get(&call_id) {
                        None => vec![error(Some(id), "unknown_call", "no such call in this session")],
                        Some(c) => match browser_leg(&state, &sdp).await {
                            Err((code, message)) => vec![error(Some(id), code, message)],
                            Ok((leg, answer, browser, _)) => {
                                if c.media.send((leg, browser)).is_ok() {
                                    vec![Outgoing::Reply { id: Some(id), ok: true, error: None, call_id: Some(call_id), sdp: Some(answer) }]
                                } else {
                                    vec![error(Some(id), "unknown_call", "the call ended meanwhile")]
                                }
                            }
                        },
                    },
                    Ok(Request::Call { id, to, sdp }) => {
                        match place(&state, reg.as_ref().zip(ident.as_ref()), &plan, calls.len(), (id, &to, &sdp), events_tx.clone()).await {
                            Ok((call, reply)) => {
                                calls.insert(call.call_id().to_owned(), call);
                                vec![reply]
                            }
                            Err(refusal) => vec![*refusal],
                        }
                    }
                    Ok(Request::Consult { id, call_id, .. }) if !calls.contains_key(&call_id) => {
                        vec![error(Some(id), "unknown_call", "no such call in this session")]
                    }
                    Ok(Request::Consult { id, call_id, to, sdp }) => {
                        match place(&state, reg.as_ref().zip(ident.as_ref()), &plan, calls.len(), (id, &to, &sdp), events_tx.clone()).await {
                            Ok((call, reply)) => {
                                if let Some(first) = calls.get(&call_id) {
                                    first.hold();
                                }
                                calls.insert(call.call_id().to_owned(), call);
                                vec![reply]
                            }
                            Err(refusal) => vec![*refusal],
                        }
                    }
                    Ok(Request::Hangup { id, call_id }) => match calls.get(&call_id) {
                        Some(c) => {
                            c.hangup();
                            vec![ok(id)]
                        }
                        None => match ringing.remove(&call_id) {
                            Some(r) => {
                                r.control.reject(603, "Decline");
                                vec![ok(id)]
                            }
                            None => vec![error(Some(id), "unknown_call", "no such call in this session")],
                        },
                    },
                    Ok(Request::Reject { id, call_id, code }) => match ringing.remove(&call_id) {
                        Some(r) => {
                            // The follower reports the `ended` (rejected) event.
                            r.control.reject(code.filter(|c| (400..700).contains(c)).unwrap_or(486), "Busy Here");
                            vec![ok(id)]
                        }
                        None => vec![error(Some(id), "unknown_call", "no ringing call with that id")],
                    },
                    Ok(Request::Answer { id, call_id, sdp }) => match ringing.remove(&call_id) {
                        Some(r) => match answer_call(&state, r, &sdp).await {
                            Ok((call, answer)) => {
                                calls.insert(call_id.clone(), call);
                                vec![Outgoing::Reply { id: Some(id), ok: true, error: None, call_id: Some(call_id), sdp: Some(answer) }]
                            }
                            Err((code, message)) => vec![error(Some(id), code, message)],
                        },
                        None => vec![error(Some(id), "unknown_call", "no ringing call with that id")],
                    },
                    Ok(Request::Hold { id, call_id }) | Ok(Request::Unhold { id, call_id }) if !calls.contains_key(&call_id) => {
                        vec![error(Some(id), "unknown_call", "no such call in this session")]
                    }
                    Ok(Request::Hold { id, call_id }) => {
                        if let Some(c) = calls.get(&call_id) { c.hold(); }
                        vec![ok(id)]
                    }
                    Ok(Request::Unhold { id, call_id }) => {
                        if let Some(c) = calls.get(&call_id) { c.unhold(); }
                        vec![ok(id)]
                    }
                    Ok(Request::Dtmf { id, call_id, digits }) => match calls.get(&call_id) {
                        Some(c) if !digits.is_empty() && digits.len() <= 64 && digits.chars().all(|d| d.is_ascii_digit() || "*#ABCDabcd".contains(d)) => {
                            let _ = c.dtmf.send(digits);
                            vec![ok(id)]
                        }
                        Some(_) => vec![error(Some(id), "bad_request", "digits are 1-64 of 0-9 * # A-D")],
                        None => vec![error(Some(id), "unknown_call", "no such call in this session")],
                    },
                    Ok(Request::Transfer { id, call_id, to }) => match calls.get(&call_id) {
                        Some(c) => match plan.apply(&to) {
                            Ok(to) => {
                                c.transfer(&to);
                                vec![ok(id)]
                            }
                            Err(e) => vec![refused(id, &e)],
                        },
                        None => vec![error(Some(id), "unknown_call", "no such call in this session")],
                    },
                    Ok(Request::Ice { id, call_id, candidate, sdp_mid, sdp_mline_index }) => {
                        let mid_ok = sdp_mid.as_ref().is_none_or(|m| m.len() <= 32) && sdp_mline_index.is_none_or(|i| i < 16);
                        if !calls.contains_key(&call_id) && !ringing.contains_key(&call_id) {
                            vec![error(Some(id), "unknown_call", "no such call in this session")]
                        } else if mid_ok && (candidate.is_empty() || is_ice_candidate(&candidate)) {
                            tracing::trace!(call = %call_id, mid = ?sdp_mid, index = ?sdp_mline_index, "trickled candidate");
                            // callgate is ICE-lite: it never sends checks and learns the page's
                            // address from the page's own checks, so it needs no candidates.
                            vec![ok(id)]
                        } else {
                            vec![error(Some(id), "bad_candidate", "not an ICE candidate line (RFC 8839 §5.1)")]
                        }
                    }
                    Ok(Request::CompleteTransfer { id, call_id, consult_id }) => match (calls.get(&call_id), calls.get(&consult_id)) {
                        (Some(a), Some(b)) if call_id != consult_id => {
                            a.complete_transfer(&b.control);
                            vec![ok(id)]
                        }
                        _ => vec![error(Some(id), "unknown_call", "callId and consultId must be two calls of this session")],
                    },
                };
                for r in &reply {
                    if !send(&mut socket, r).await {
                        return;
                    }
                }
            }
            ev = next_registration_event(&mut reg) => match ev {
                Some(RegistrationEvent::Status(s)) => {
                    if let (Status::Registered { .. }, Some(me)) = (&s, &ident) {
                        // The registrar accepted the agent's credentials: the API opens.
                        state.credentials.activate(&me.api_token);
                    }
                    let ev = registration_event(&s);
                    events_tx.publish(&ev);
                    if !send(&mut socket, &ev).await {
                        break;
                    }
                }
                Some(RegistrationEvent::Incoming(inc)) => {
                    let inc = *inc;
                    let history = ident.as_ref().map(|me| History {
                        store: state.cdr.clone(),
                        app: me.app.clone(),
                        agent: me.agent.clone(),
                        sip_call_id: inc.call.sip_call_id().to_owned(),
                        record: state.recording_path(&me.app, inc.call.call_id()),
                    });
                    let (control, events) = inc.call.split();
                    let call_id = control.call_id().to_owned();
                    let peer = inc.asserted.as_ref().unwrap_or(&inc.from).user().to_owned();
                    let display_name = inc.from.display.clone();
                    if state.metrics.is_draining() {
                        // Shutting down: the caller should try elsewhere (RFC 3261 §21.5.4).
                        control.reject(503, "Service Unavailable");
                        continue;
                    }
                    if ringing.len() + calls.len() >= MAX_CALLS_PER_SESSION {
                        control.reject(486, "Busy Here");
                        continue;
                    }
                    let ev = Outgoing::Incoming { call_id: call_id.clone(), from: peer.clone(), display_name };
                    let (handoff, media) = tokio::sync::oneshot::channel();
                    let (dtmf, dtmf_rx) = mpsc::unbounded_channel();
                    let (media_tx, media_in) = mpsc::unbounded_channel();
                    // Follows the call from now on: a caller's CANCEL before the answer reaches
                    // the page as `ended` (`missed`).
                    let Some(history) = history else { continue };
                    tokio::spawn(follow_call(Follow {
                        history,
                        call_id: call_id.clone(),
                        peer,
                        direction: "inbound",
                        call_events: events,
                        media: CallMedia::Later(media, inc.offer.clone()),
                        events: events_tx.clone(),
                        commander: control.commander(),
                        dtmf: dtmf_rx,
                        media_in,
                        dtmf_mode: state.dtmf,
                        media_timeout: state.media_timeout,
                        refer: state.accept_refer.then(|| plan.clone()),
                        metrics: state.metrics.clone(),
                    }));
                    ringing.insert(call_id.clone(), Ringing { control, dtmf, handoff, offer: inc.offer, media: media_tx, announce: ev.clone() });
                    events_tx.publish(&ev);
                    if !send(&mut socket, &ev).await {
                        break;
                    }
                }
                None => {
                    // The SIP endpoint stopped (shutdown): its calls' last events are on their
                    // way; pass them on, then say goodbye.
                    let until = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
                    while !calls.is_empty() || !ringing.is_empty() {
                        let Ok(Some(ev)) = tokio::time::timeout_at(until, events_rx.recv()).await else { break };
                        note(&ev, &mut calls, &mut ringing, &mut last);
                        if !send(&mut socket, &ev).await {
                            break;
                        }
                    }
                    close(&mut socket, CLOSE_GOING_AWAY, "callgate is shutting down").await;
                    break;
                }
            },
        }
    }
    state.metrics.websocket(-1);
    match (reg, ident, state.resume) {
        (Some(reg), Some(ident), Some(grace)) if !logged_out && !state.metrics.is_draining() => {
            tracing::info!(agent = %ident.agent, calls = calls.len(), secs = grace.as_secs(), "page gone: keeping its session for a resume");
            let parked = Parked {
                reg,
                plan,
                ident,
                calls,
                ringing,
                events_tx,
                events_rx,
                last,
                parking: unique_u64(),
            };
            state.sessions.park(parked, grace, state.clone());
        }
        // Dropping `reg` releases this session's share of the registration; dropping the
        // calls' controls hangs them up.
        (Some(_), ident, _) => {
            state.metrics.agent(-1);
            if let Some(ident) = ident {
                end_session(&state, &ident);
            }
        }
        _ => {}
    }
}

/// The parked session `session_id`, for a page that is not logged in and whose origin the
/// session's app allows. Unknown ids count as bad tokens (they are bearer credentials).
fn resume(
    state: &AppState,
    peer: &Peer,
    logged_in: bool,
    id: u64,
    session_id: &str,
) -> Result<Parked, Box<Outgoing>> {
    if logged_in {
        return Err(Box::new(error(
            Some(id),
            "already_connected",
            "this session is already logged in",
        )));
    }
    if state.bad_tokens.blocked(peer.ip) {
        return Err(Box::new(error(
            Some(id),
            "rate_limited",
            "too many refused tokens from this address; wait a minute",
        )));
    }
    let Some(app) = state.sessions.app_of(session_id) else {
        state.bad_tokens.record(peer.ip);
        return Err(Box::new(error(
            Some(id),
            "unknown_session",
            "no such session, or it ended (http.resume_secs passed): connect with a token",
        )));
    };
    let apps = state.apps.get();
    let allowed = apps.origins.get(&app).map_or(&[][..], Vec::as_slice);
    if !allowed.is_empty() && !peer.origin.as_ref().is_some_and(|o| allowed.contains(o)) {
        return Err(Box::new(error(
            Some(id),
            "origin_not_allowed",
            "this page's origin may not use this app's sessions (allowed_origins in apps.toml)",
        )));
    }
    let parked = state.sessions.take(session_id);
    if parked.is_some() {
        state.metrics.parked(-1);
    }
    parked.ok_or_else(|| {
        Box::new(error(
            Some(id),
            "unknown_session",
            "no such session, or it ended (http.resume_secs passed): connect with a token",
        ))
    })
}

async fn connect(
    state: &AppState,
    peer: &Peer,
    reg: &mut Option<RegistrationHandle>,
    plan: &mut DialPlan,
    ident: &mut Option<Ident>,
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
    if state.metrics.is_draining() {
        return vec![error(
            Some(id),
            "unavailable",
            "callgate is shutting down; connect again in a moment",
        )];
    }
    if state.bad_tokens.blocked(peer.ip) {
        return vec![error(
            Some(id),
            "rate_limited",
            "too many refused tokens from this address; wait a minute",
        )];
    }
    let apps = state.apps.get();
    let verified = match apps.keyring.verify(token, SystemTime::now()) {
        Ok(v) => v,
        Err(e) => {
            state.bad_tokens.record(peer.ip);
            state.metrics.token_failure(&e.code());
            tracing::info!(code = %e.code(), "token refused");
            return vec![error(Some(id), e.code(), e.to_string())];
        }
    };
    let allowed = apps
        .origins
        .get(verified.app())
        .map_or(&[][..], Vec::as_slice);
    if !allowed.is_empty() && !peer.origin.as_ref().is_some_and(|o| allowed.contains(o)) {
        tracing::info!(
            app = verified.app(),
            "login refused: page origin not allowed"
        );
        return vec![error(
            Some(id),
            "origin_not_allowed",
            "this page's origin may not use this app's tokens (allowed_origins in apps.toml)",
        )];
    }
    let app = verified.app().to_owned();
    if let Some(p) = apps.dial_plans.get(&app) {
        *plan = p.clone();
    }
    let account = verified.into_account();
    let agent = account.aor();
    // Bearer credentials (128 random bits each) before anything is registered: without the OS
    // generator there is no login, never a predictable one.
    let (session_id, api_token) = match (
        crate::rand::hex::<16>(),
        state.credentials.issue(&app, &agent),
    ) {
        (Ok(s), Ok(t)) => (format!("s-{s}"), t),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!("login refused: {e}");
            return vec![error(Some(id), "internal_error", e.to_string())];
        }
    };
    let handle = match state.sip.register_for(&app, account).await {
        Ok(h) => h,
        Err(e) => {
            let code = match e {
                EndpointError::Resolve { .. } => "sip_server_unresolvable",
                EndpointError::TooMany(_) => "too_many_registrations",
                _ => "unavailable",
            };
            state.credentials.revoke(&api_token);
            return vec![error(Some(id), code, e.to_string())];
        }
    };
    tracing::info!(%agent, %app, "agent connected");
    if matches!(handle.status(), Status::Registered { .. }) {
        // Joined a live registration with the same credentials.
        state.credentials.activate(&api_token);
    }
    let current = registration_event(&handle.status());
    *reg = Some(handle);
    state.metrics.agent(1);
    let channel = state.hub.login(&agent, &app);
    *ident = Some(Ident {
        session_id: session_id.clone(),
        agent: agent.clone(),
        app,
        channel,
        api_token: api_token.clone(),
    });
    vec![
        ok(id),
        Outgoing::Connected {
            agent,
            session_id,
            api_token,
        },
        current,
    ]
}

/// Places a call for the page (`call`, `consult`) once the session may: logged in, not
/// draining, below its call limit, and `to` allowed by the app's dial plan. `req` is the
/// request's (id, to, sdp); the reply carries the call id and callgate's SDP answer.
async fn place(
    state: &AppState,
    logged_in: Option<(&RegistrationHandle, &Ident)>,
    plan: &DialPlan,
    calls: usize,
    req: (u64, &str, &str),
    events: EventSink,
) -> Result<(SessionCall, Outgoing), Box<Outgoing>> {
    let (id, to, sdp) = req;
    let refuse = |code: &str, message: &str| Box::new(error(Some(id), code, message));
    let Some(who) = logged_in else {
        return Err(refuse("not_connected", "send connect with a token first"));
    };
    if state.metrics.is_draining() {
        return Err(refuse("unavailable", "callgate is shutting down"));
    }
    if calls >= MAX_CALLS_PER_SESSION {
        return Err(refuse("too_many_calls", "this page has too many calls"));
    }
    let to = plan.apply(to).map_err(|e| Box::new(refused(id, &e)))?;
    let (call, answer) = start_call(state, who, &to, sdp, events, plan)
        .await
        .map_err(|(code, message)| refuse(code, &message))?;
    let reply = Outgoing::Reply {
        id: Some(id),
        ok: true,
        error: None,
        call_id: Some(call.call_id().to_owned()),
        sdp: Some(answer),
    };
    Ok((call, reply))
}

/// Whether `c` is an ICE candidate attribute value (RFC 8839 §5.1, with or without the
/// `candidate:` prefix): foundation, component, transport, priority, address, port, `typ`, type.
fn is_ice_candidate(c: &str) -> bool {
    let c = c.strip_prefix("candidate:").unwrap_or(c);
    let f: Vec<&str> = c.split_ascii_whitespace().collect();
    c.len() <= 1024
        && f.len() >= 8
        && f[1].parse::<u16>().is_ok()
        && (f[2].eq_ignore_ascii_case("udp") || f[2].eq_ignore_ascii_case("tcp"))
        && f[3].parse::<u32>().is_ok()
        && f[5].parse::<u16>().is_ok()
        && f[6] == "typ"
        && ["host", "srflx", "prflx", "relay"].contains(&f[7])
}

/// The reply for a dial string the app's dial plan refused.
fn refused(id: u64, e: &DialError) -> Outgoing {
    let code = match e {
        DialError::UriNotAllowed => "uri_not_allowed",
        DialError::Denied { .. } => "destination_denied",
        _ => "bad_destination",
    };
    error(Some(id), code, e.to_string())
}

/// The browser side of a call, set up from the page's offer.
struct BrowserMedia {
    leg: Leg,
    /// callgate's SDP answer for the page.
    answer: String,
    /// The negotiated browser side.
    browser: AudioSdp,
    /// The G.711 law the browser got (the SIP side must use the same: no transcoding yet).
    voice: String,
    rtp: RtpLeg,
    /// `o=` session id for the SIP side's SDP.
    session_id: u64,
}

/// Answers the page's offer with the WebRTC engine and opens an RTP port pair for the SIP side.
async fn browser_media(
    state: &AppState,
    offer: &str,
) -> Result<BrowserMedia, (&'static str, String)> {
    let (leg, answer, browser, voice) = browser_leg(state, offer).await?;
    let rtp = RtpLeg::open(&state.rtp_ports, state.rtp_bind_ip)
        .await
        .map_err(|e| ("no_media_ports", e.to_string()))?;
    Ok(BrowserMedia {
        leg,
        answer,
        browser,
        voice,
        rtp,
        session_id: unique_u64() >> 1,
    })
}

/// Answers the page's offer with the WebRTC engine: the leg, callgate's SDP answer, the
/// negotiated browser side and its G.711 law.
async fn browser_leg(
    state: &AppState,
    offer: &str,
) -> Result<(Leg, String, AudioSdp, String), (&'static str, String)> {
    let (leg, answer) = state.webrtc.answer(offer).await.map_err(|e| match e {
        WebRtcError::BadOffer(_) => ("bad_sdp", e.to_string()),
        WebRtcError::NoCommonCodec => ("no_common_codec", e.to_string()),
        _ => ("media_error", e.to_string()),
    })?;
    let browser = AudioSdp::parse(answer.as_bytes())
        .ok()
        .filter(|a| a.voice_codec().is_some())
        .ok_or((
            "no_common_codec",
            "the browser offered neither PCMU nor PCMA".to_owned(),
        ))?;
    let voice = browser
        .voice_codec()
        .map(|c| c.name.clone())
        .unwrap_or_default();
    Ok((leg, answer, browser, voice))
}

/// Sets up an outbound call: the browser's offer answered by the WebRTC engine, an RTP port pair,
/// the SIP INVITE offering the codec the browser got, and a task that follows the call.
async fn start_call(
    state: &AppState,
    (reg, me): (&RegistrationHandle, &Ident),
    to: &str,
    offer: &str,
    events: EventSink,
    plan: &DialPlan,
) -> Result<(SessionCall, String), (&'static str, String)> {
    let BrowserMedia {
        leg,
        answer,
        browser,
        voice,
        rtp,
        session_id,
    } = browser_media(state, offer).await?;
    let sip_offer = AudioSdp::offer(
        state.rtp_public_ip,
        rtp.port(),
        &[voice.as_str()],
        session_id,
        Direction::SendRecv,
    );
    let handle = state
        .sip
        .dial(reg, to, sip_offer.to_sdp())
        .await
        .map_err(|e| match e {
            EndpointError::BadDestination(_) => ("bad_destination", e.to_string()),
            EndpointError::NotRegistered => ("not_registered", e.to_string()),
            _ => ("unavailable", e.to_string()),
        })?;
    let history = History {
        store: state.cdr.clone(),
        app: me.app.clone(),
        agent: me.agent.clone(),
        sip_call_id: handle.sip_call_id().to_owned(),
        record: state.recording_path(&me.app, handle.call_id()),
    };
    let (control, call_events) = handle.split();
    let (dtmf, dtmf_rx) = mpsc::unbounded_channel();
    let (media, media_in) = mpsc::unbounded_channel();
    tokio::spawn(follow_call(Follow {
        history,
        call_id: control.call_id().to_owned(),
        peer: to.to_owned(),
        direction: "outbound",
        call_events,
        media: CallMedia::Now(Box::new((leg, rtp, browser))),
        events,
        commander: control.commander(),
        dtmf: dtmf_rx,
        media_in,
        dtmf_mode: state.dtmf,
        media_timeout: state.media_timeout,
        refer: state.accept_refer.then(|| plan.clone()),
        metrics: state.metrics.clone(),
    }));
    Ok((
        SessionCall {
            control,
            dtmf,
            media,
        },
        answer,
    ))
}

/// The media of a call: ready (outbound, set up before dialling) or handed over when the page
/// answers (inbound), with the caller's offer.
enum CallMedia {
    Now(Box<(Leg, RtpLeg, AudioSdp)>),
    Later(
        tokio::sync::oneshot::Receiver<(Leg, RtpLeg, AudioSdp)>,
        Option<AudioSdp>,
    ),
}

/// Answers a ringing call: the browser's offer answered by the WebRTC engine, an RTP port pair,
/// and the SIP 200 answering the caller's offer with the codec the browser got.
async fn answer_call(
    state: &AppState,
    ringing: Ringing,
    offer: &str,
) -> Result<(SessionCall, String), (&'static str, String)> {
    let caller = ringing.offer.clone().ok_or((
        "no_common_codec",
        "the caller sent no SDP offer (not supported yet)".to_owned(),
    ))?;
    let BrowserMedia {
        leg,
        answer,
        browser,
        voice,
        rtp,
        session_id,
    } = browser_media(state, offer).await?;
    let sip_answer = AudioSdp::answer(
        &caller,
        state.rtp_public_ip,
        rtp.port(),
        &[voice.as_str()],
        session_id,
        Direction::SendRecv,
    )
    .map_err(|_| {
        (
            "no_common_codec",
            format!("the caller did not offer {voice}, which the browser chose"),
        )
    })?;
    ringing.control.answer(sip_answer.to_sdp());
    if ringing.handoff.send((leg, rtp, browser)).is_err() {
        return Err(("unknown_call", "the call ended meanwhile".to_owned()));
    }
    Ok((
        SessionCall {
            control: ringing.control,
            dtmf: ringing.dtmf,
            media: ringing.media,
        },
        answer,
    ))
}

/// What a call's history row needs beyond what [`follow_call`] sees.
struct History {
    store: crate::cdr::CdrStore,
    app: String,
    agent: String,
    sip_call_id: String,
    /// Where to record the call, if its app records.
    record: Option<std::path::PathBuf>,
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// What [`follow_call`] needs.
struct Follow {
    history: History,
    call_id: String,
    peer: String,
    direction: &'static str,
    call_events: mpsc::UnboundedReceiver<CallEvent>,
    media: CallMedia,
    events: EventSink,
    commander: CallCommander,
    /// Digits the page asked to send.
    dtmf: mpsc::UnboundedReceiver<String>,
    /// New browser legs (a resumed page negotiated again).
    media_in: mpsc::UnboundedReceiver<(Leg, AudioSdp)>,
    dtmf_mode: DtmfMode,
    media_timeout: Option<std::time::Duration>,
    /// Follow the far end's REFER to targets this dial plan allows; `None`: decline.
    refer: Option<DialPlan>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

/// Follows one call: reports its states to the page, runs the media bridge once the far end
/// sends its SDP (early media or answer), routes the page's DTMF (RFC 4733 when the far end
/// negotiated telephone-event, SIP INFO otherwise), reports the far end's RFC 4733 digits, and
/// hangs up an established call whose far end stopped sending media.
async fn follow_call(f: Follow) {
    let Follow {
        history,
        call_id,
        mut peer,
        direction,
        mut call_events,
        media,
        events,
        commander,
        dtmf: mut dtmf_in,
        mut media_in,
        dtmf_mode,
        media_timeout,
        refer,
        metrics,
    } = f;
    let placed = std::time::Instant::now();
    // For the call's history row, written when it ends (shutdown waits for it).
    let _pending = history.store.track();
    let started_at = unix_ms();
    let dialled = peer.clone();
    let mut answered_at = None;
    let mut transfer = None;
    let mut ended = ("failed", None, None);
    let mut history = history;
    let mut recording = None;
    metrics.call_started(if direction == "outbound" {
        crate::metrics::Direction::Outbound
    } else {
        crate::metrics::Direction::Inbound
    });
    let report = |peer: &str,
                  state: &'static str,
                  sip: Option<SipStatus>,
                  end_reason: Option<&'static str>| {
        Outgoing::Call {
            call_id: call_id.clone(),
            state,
            direction,
            peer: peer.to_owned(),
            sip,
            end_reason,
        }
    };
    let referred =
        |state: &'static str, to: Option<String>, sip: Option<SipStatus>| Outgoing::Referred {
            call_id: call_id.clone(),
            state,
            to,
            sip,
        };
    // The browser side's SDP once the bridge runs (to map payload types for a new SIP peer),
    // and where the SIP side's media goes.
    let mut browser_sdp: Option<AudioSdp> = None;
    let mut sip_media: Option<std::net::SocketAddr> = None;
    let mut sip_sdp: Option<AudioSdp> = None;
    let (mut steer, ctl) = bridge::controls();
    let mut ctl = Some(ctl);
    let mut bridge = None;
    let mut rfc4733 = false;
    let (mut media, mut later, mut caller_offer) = match media {
        CallMedia::Now(now) => (Some(*now), None, None),
        CallMedia::Later(rx, offer) => (None, Some(rx), offer),
    };
    // Media liveness: watched while established and held by nobody, from `watch_from` on.
    let (mut established, mut held, mut remote_held) = (false, false, false);
    let mut watch_from = std::time::Instant::now();
    let mut timed_out = false;
    let mut liveness = tokio::time::interval(std::time::Duration::from_millis(500));
    let first = if direction == "outbound" {
        "trying"
    } else {
        "ringing"
    };
    // The state the page was last told, for the calls-by-state gauge.
    let mut shown = Some(first);
    metrics.call_state(None, shown);
    let _ = events.send(report(&peer, first, None, None)).await;
    loop {
        let ev = tokio::select! {
            ev = call_events.recv() => match ev {
                Some(ev) => ev,
                None => break,
            },
            handed = async {
                match later.as_mut() {
                    Some(rx) => rx.await.ok(),
                    None => std::future::pending().await,
                }
            } => {
                later = None;
                // The page answered an incoming call: the caller's offer is the far SDP.
                match (handed, caller_offer.take()) {
                    (Some(m), Some(offer)) => {
                        media = Some(m);
                        CallEvent::Answered { answer: Some(offer) }
                    }
                    _ => continue,
                }
            }
            Some(digits) = dtmf_in.recv() => {
                if rfc4733 && dtmf_mode == DtmfMode::Rfc4733 {
                    for d in digits.chars() {
                        steer.dtmf(d);
                    }
                } else {
                    commander.dtmf_info(&digits);
                }
                continue;
            }
            Some((leg, b)) = media_in.recv() => {
                // The page came back with a new connection: the audio moves to it.
                match (&bridge, media.as_mut(), sip_sdp.as_ref()) {
                    (Some(_), _, Some(far)) => match Mapping::negotiate(&b, far) {
                        Ok(mapping) => {
                            tracing::debug!(call = %call_id, "browser leg replaced");
                            browser_sdp = Some(b);
                            steer.rebrowse(leg, mapping);
                        }
                        Err(e) => {
                            tracing::warn!(call = %call_id, "cannot bridge the new browser leg: {e}");
                            leg.close().await;
                        }
                    },
                    (None, Some(m), _) => {
                        // Not bridged yet (no far SDP): the new leg waits in place of the old.
                        let old = std::mem::replace(&mut m.0, leg);
                        m.2 = b;
                        old.close().await;
                    }
                    _ => leg.close().await,
                }
                continue;
            }
            Some(digit) = steer.heard.recv() => {
                let out = Outgoing::Dtmf { call_id: call_id.clone(), digit: digit.to_string() };
                if events.send(out).await.is_err() {
                    break;
                }
                continue;
            }
            _ = liveness.tick(), if media_timeout.is_some() && bridge.is_some() && !timed_out => {
                let now = std::time::Instant::now();
                if let Some(limit) = media_timeout {
                    if established && !held && !remote_held
                        && now.saturating_duration_since(watch_from) >= limit
                        && steer.activity.sip_idle(now) >= limit
                    {
                        tracing::info!(call = %call_id, secs = limit.as_secs(), "no media from the far end: hanging up");
                        timed_out = true;
                        commander.hangup_media_timeout();
                    }
                }
                continue;
            }
        };
        tracing::debug!(call = %call_id, event = ?ev, "call event");
        let far_sdp = match &ev {
            CallEvent::EarlyMedia { answer } => Some(answer.clone()),
            CallEvent::Answered { answer } => answer.clone(),
            _ => None,
        };
        // Take the legs only when the far end's SDP is here (not on a plain 180).
        if let Some((sdp, (leg, mut rtp, browser), mut ctl)) = far_sdp
            .and_then(|sdp| media.take().map(|m| (sdp, m)))
            .and_then(|(sdp, m)| ctl.take().map(|c| (sdp, m, c)))
        {
            if let Some(path) = history.record.take() {
                match crate::media::recorder::start(path.clone(), history.store.track()) {
                    Ok(tap) => {
                        ctl.tap = Some(tap);
                        recording = path.file_name().map(|f| f.to_string_lossy().into_owned());
                    }
                    Err(e) => {
                        tracing::warn!(call = %call_id, file = %path.display(), "cannot record: {e}")
                    }
                }
            }
            match Mapping::negotiate(&browser, &sdp) {
                Ok(mapping) => {
                    let remote = std::net::SocketAddr::new(sdp.addr, sdp.port);
                    rtp.set_remote(remote);
                    sip_media = Some(remote);
                    sip_sdp = Some(sdp.clone());
                    browser_sdp = Some(browser.clone());
                    tracing::debug!(call = %call_id, remote = %sdp.addr, port = sdp.port, ?mapping, "bridge starts");
                    rfc4733 = mapping.sip_telephone_event.is_some();
                    bridge = Some(tokio::spawn(bridge::run(
                        leg,
                        rtp,
                        mapping,
                        0x00ca_11ed,
                        ctl,
                    )));
                }
                Err(e) => tracing::warn!(call = %call_id, "cannot bridge media: {e}"),
            }
        }
        // A new SIP-side peer or address for a running bridge: a re-INVITE that moved the far
        // end's media, or the party a followed transfer reached.
        let moved = match &ev {
            CallEvent::RemoteHold { offer: Some(s), .. }
            | CallEvent::Hold {
                answer: Some(s), ..
            }
            | CallEvent::Replaced {
                answer: Some(s), ..
            } => Some(s),
            _ => None,
        };
        if let (Some(sdp), Some(b), true) = (moved, browser_sdp.as_ref(), bridge.is_some()) {
            let remote = std::net::SocketAddr::new(sdp.addr, sdp.port);
            let changed = Some(remote) != sip_media || matches!(ev, CallEvent::Replaced { .. });
            // An old-style hold (c=0.0.0.0) says "do not send", not where to.
            if changed && !sdp.addr.is_unspecified() && sdp.port != 0 {
                match Mapping::negotiate(b, sdp) {
                    Ok(mapping) => {
                        tracing::debug!(call = %call_id, %remote, "the far end's media moved");
                        rfc4733 = mapping.sip_telephone_event.is_some();
                        sip_media = Some(remote);
                        sip_sdp = Some(sdp.clone());
                        steer.retarget(remote, mapping);
                    }
                    Err(e) => {
                        tracing::warn!(call = %call_id, "cannot bridge the new far end's media: {e}")
                    }
                }
            }
        }
        let out = match ev {
            CallEvent::Ringing => report(&peer, "ringing", None, None),
            CallEvent::EarlyMedia { .. } => report(&peer, "early", None, None),
            CallEvent::Answered { .. } => {
                answered_at.get_or_insert_with(unix_ms);
                established = true;
                watch_from = std::time::Instant::now();
                if direction == "outbound" {
                    metrics.call_setup(placed.elapsed());
                }
                report(&peer, "established", None, None)
            }
            CallEvent::Hold { held: h, .. } => {
                held = h;
                watch_from = std::time::Instant::now();
                steer.flow(if h { Flow::Hold } else { Flow::Forward });
                report(&peer, if h { "held" } else { "established" }, None, None)
            }
            CallEvent::RemoteHold { held: h, .. } => {
                remote_held = h;
                watch_from = std::time::Instant::now();
                report(
                    &peer,
                    if h { "held_by_remote" } else { "established" },
                    None,
                    None,
                )
            }
            CallEvent::Referred { target } => {
                let verdict = match &refer {
                    None => Err("transfers by the far end are off (sip.accept_refer)".to_owned()),
                    Some(plan) => plan.check_referral(&target).map_err(|e| e.to_string()),
                };
                commander.follow_refer(verdict.is_ok());
                if let Err(why) = &verdict {
                    tracing::info!(call = %call_id, %target, "declined the far end's transfer: {why}");
                }
                referred(
                    if verdict.is_ok() {
                        "accepted"
                    } else {
                        "declined"
                    },
                    Some(target),
                    None,
                )
            }
            CallEvent::ReferProgress { status, phrase } => referred(
                if status >= 300 { "failed" } else { "progress" },
                None,
                Some(SipStatus {
                    status,
                    reason: phrase,
                }),
            ),
            CallEvent::Replaced { peer: p, .. } => {
                transfer = Some(format!("referred:{}", p.uri));
                peer = if p.user().is_empty() {
                    p.uri.clone()
                } else {
                    p.user().to_owned()
                };
                let _ = events.send(referred("succeeded", Some(p.uri), None)).await;
                // The new party's call is established and ours to hold: start clean.
                remote_held = false;
                if held {
                    held = false;
                    steer.flow(Flow::Forward);
                }
                watch_from = std::time::Instant::now();
                report(&peer, "established", None, None)
            }
            CallEvent::Transfer { state, status } => Outgoing::Transfer {
                call_id: call_id.clone(),
                state: state.code(),
                status,
            },
            CallEvent::Dtmf { digit, .. } => Outgoing::Dtmf {
                call_id: call_id.clone(),
                digit: digit.to_string(),
            },
            CallEvent::Ended {
                reason,
                status,
                phrase,
            } => {
                ended = (
                    reason.code(),
                    status,
                    (!phrase.is_empty()).then(|| phrase.clone()),
                );
                if reason == crate::sip::call::EndReason::Transferred {
                    transfer = Some("transferred".to_owned());
                }
                let sip = status.map(|status| SipStatus {
                    status,
                    reason: phrase,
                });
                metrics.call_ended(reason.code());
                if reason == crate::sip::call::EndReason::Missed {
                    let missed = Outgoing::Missed {
                        call_id: call_id.clone(),
                        from: peer.clone(),
                    };
                    let _ = events.send(missed).await;
                }
                let _ = events
                    .send(report(&peer, "ended", sip, Some(reason.code())))
                    .await;
                break;
            }
            _ => continue,
        };
        if let Outgoing::Call { state, .. } = &out {
            metrics.call_state(shown, Some(state));
            shown = Some(state);
        }
        if events.send(out).await.is_err() {
            break;
        }
    }
    metrics.call_state(shown, None);
    steer.flow(Flow::Stop);
    let mut media_stats = crate::media::bridge::BridgeStats::default();
    if let Some(b) = bridge {
        if let Ok(stats) = b.await {
            metrics.media(stats.to_sip, stats.to_browser, stats.sip_in.lost());
            if let Some(far) = stats.far_end {
                metrics.far_end_lost(far.cumulative_lost);
            }
            media_stats = stats;
        }
    } else if let Some((leg, _, _)) = media {
        leg.close().await;
    }
    let ended_at = unix_ms();
    let (from, to) = if direction == "outbound" {
        (history.agent.clone(), dialled)
    } else {
        (dialled, history.agent.clone())
    };
    let record = crate::cdr::CallRecord {
        call_id: call_id.clone(),
        sip_call_id: history.sip_call_id,
        app: history.app,
        agent: history.agent,
        direction: direction.to_owned(),
        from,
        to,
        started_at,
        answered_at,
        ended_at,
        duration_ms: answered_at.map_or(0, |a| ended_at.saturating_sub(a)),
        end_reason: ended.0.to_owned(),
        sip_status: ended.1,
        sip_reason: ended.2,
        transfer,
        packets_sent: media_stats.to_sip,
        packets_received: media_stats.to_browser,
        packets_lost: media_stats.sip_in.lost(),
        jitter_ms: media_stats.sip_in.jitter() as f64 / 8.0,
        recording,
    };
    if let Err(e) = history.store.insert(record).await {
        tracing::warn!(call = %call_id, "call not recorded in the history: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ice_candidates_are_checked() {
        for good in [
            "candidate:842163049 1 udp 1677729535 203.0.113.7 46154 typ srflx raddr 10.0.0.2 rport 46154 generation 0",
            "1 1 UDP 2130706431 127.0.0.1 50000 typ host",
            "candidate:2 1 tcp 1518280447 192.168.1.2 9 typ host tcptype active",
        ] {
            assert!(is_ice_candidate(good), "{good}");
        }
        for bad in [
            "",
            "candidate:1 1 udp 2130706431 127.0.0.1 50000",
            "candidate:1 x udp 1 127.0.0.1 50000 typ host",
            "candidate:1 1 sctp 1 127.0.0.1 50000 typ host",
            "candidate:1 1 udp 1 127.0.0.1 99999 typ host",
            "candidate:1 1 udp 1 127.0.0.1 5000 typ bogus",
        ] {
            assert!(!is_ice_candidate(bad), "{bad}");
        }
        let r: Request = serde_json::from_str(
            r#"{"type":"ice","id":3,"callId":"c-1","candidate":"","sdpMid":"0","sdpMLineIndex":0}"#,
        )
        .unwrap();
        assert!(matches!(
            r,
            Request::Ice {
                id: 3,
                sdp_mline_index: Some(0),
                ..
            }
        ));
    }

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
