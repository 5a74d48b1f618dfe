//! Starting a session (`connect` with a token) and attaching a page to a live one (`resume`
//! with its session id): the checks both make, and the link the page's socket keeps.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::mpsc;

use super::agent::{AppRules, Control, Ident, PAGE_QUEUE, Session};
use super::context::Context;
use super::control::ToPage;
use super::error::ApiError;
use super::event::Event;
use crate::sip::registration::Status;

/// Controls queued for a session (requests of one page, one at a time, and attach/detach).
const CONTROL_QUEUE: usize = 64;

/// Who is on the other end of a WebSocket.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The client's address (see the WebSocket handler for proxies).
    pub ip: std::net::IpAddr,
    /// The page's `Origin` header, lower-cased.
    pub origin: Option<String>,
}

/// A page's link to its session: requests in, events (replies included) out. When the session
/// ends, `events` closes.
pub struct Link {
    /// To the session.
    pub(crate) control: mpsc::Sender<Control>,
    /// From the session.
    pub(crate) events: mpsc::Receiver<ToPage>,
    /// This page among the session's successive pages.
    page_id: u64,
}

/// A new page's id (unique in the process).
fn next_page_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Link {
    /// Hands a request to the session without waiting: the session may itself be waiting for
    /// this socket to read its events. `Err` with the refusal when too many are in flight;
    /// `Ok(false)` when the session is gone.
    pub(crate) fn request(&self, req: super::request::Request) -> Result<bool, ApiError> {
        match self.control.try_send(Control::Request(req)) {
            Ok(()) => Ok(true),
            Err(mpsc::error::TrySendError::Full(_)) => Err(ApiError::BadRequest(
                "too many requests in flight; wait for their replies",
            )),
            Err(mpsc::error::TrySendError::Closed(_)) => Ok(false),
        }
    }

    /// The page's socket closed (the session waits for a resume, or ends). Delivered even
    /// when the session's queue is full, without holding up the socket's task.
    pub(crate) fn detach(self) {
        let (control, page_id) = (self.control, self.page_id);
        tokio::spawn(async move {
            let _ = control.send(Control::Detach { page_id }).await;
        });
    }
}

/// Whether `app` lets a page from `origin` in (`allowed_origins`, none: any).
fn origin_allowed(ctx: &Context, app: &str, origin: Option<&String>) -> bool {
    let apps = ctx.apps.get();
    let allowed = apps.origins.get(app).map_or(&[][..], Vec::as_slice);
    allowed.is_empty() || origin.is_some_and(|o| allowed.contains(o))
}

/// `connect`: checks the token and the page's origin, registers the agent, and starts its
/// session, whose first events (the reply, `connected`, the registration's state) are the
/// link's first.
pub(crate) async fn connect(
    ctx: &Arc<Context>,
    peer: &Peer,
    id: u64,
    token: &str,
) -> Result<Link, ApiError> {
    let (verified, rules) = admit(ctx, peer, token)?;
    let app = verified.app().to_owned();
    let states = rules.states.clone();
    let single_use = verified.single_use();
    let account = verified.into_account();
    let agent = account.aor();
    let group = account.group.clone();
    let slot = ctx
        .sessions
        .claim(&app, &agent, ctx.max_sessions_per_agent, &states)
        .map_err(|max| {
            tracing::info!(%agent, %app, max, "login refused: too many sessions of this agent");
            ApiError::TooManySessions(max)
        })?;
    if let Some((fingerprint, until)) = single_use {
        take_once(ctx, peer, fingerprint, until)?;
    }
    // Bearer credentials (128 random bits each) before anything is registered: without the OS
    // generator there is no login, never a predictable one.
    let session_id = format!("s-{}", crate::rand::hex::<16>()?);
    let api_token = ctx.credentials.issue(&app, &agent)?;
    let reg = match ctx.sip.register_for(&app, account).await {
        Ok(r) => r,
        Err(e) => {
            ctx.credentials.revoke(&api_token);
            return Err(e.into());
        }
    };
    tracing::info!(%agent, %app, "agent connected");
    if matches!(reg.status(), Status::Registered { .. }) {
        // Joined a live registration with the same credentials.
        ctx.credentials.activate(&api_token);
    }
    ctx.metrics.agent(1);
    let channel = ctx.hub.login(&agent, &app);
    let first = vec![
        Event::ok(id),
        Event::Connected {
            agent: agent.clone(),
            session_id: session_id.clone(),
            api_token: api_token.clone(),
            states: super::event::StateInfo::list(&states, group.as_deref()),
        },
        Event::registration(&reg.status()),
    ];
    let ident = Ident {
        session_id,
        agent,
        app,
        channel,
        api_token,
        group,
        slot,
    };
    Ok(start(ctx, ident, reg, rules, first))
}

/// The checks before a login takes anything: not draining, the address not blocked for bad
/// tokens, the token good, the page's origin allowed; then the app's rules as they are now.
fn admit(
    ctx: &Context,
    peer: &Peer,
    token: &str,
) -> Result<(crate::token::VerifiedToken, AppRules), ApiError> {
    if ctx.metrics.is_draining() {
        return Err(ApiError::Unavailable);
    }
    if ctx.bad_tokens.blocked(peer.ip) {
        return Err(ApiError::RateLimited);
    }
    let apps = ctx.apps.get();
    let verified = apps.keyring.verify(token, SystemTime::now()).map_err(|e| {
        ctx.bad_tokens.record(peer.ip);
        ctx.metrics.token_failure(&e.code());
        tracing::info!(code = %e.code(), "token refused");
        ApiError::Token(e)
    })?;
    let app = verified.app();
    if !origin_allowed(ctx, app, peer.origin.as_ref()) {
        tracing::info!(%app, "login refused: page origin not allowed");
        return Err(ApiError::OriginNotAllowed);
    }
    let rules = AppRules {
        plan: apps.dial_plans.get(app).cloned().unwrap_or_default(),
        states: apps.states.get(app).cloned().unwrap_or_default(),
        call_data: apps.call_data.get(app).cloned().unwrap_or_default(),
        call_headers: apps.call_headers.get(app).cloned().unwrap_or_default(),
    };
    Ok((verified, rules))
}

/// Marks a single-use token used; refuses one used before (counted as a bad token: a replay
/// is an attack or a leak).
fn take_once(
    ctx: &Context,
    peer: &Peer,
    fingerprint: [u8; 32],
    until: i64,
) -> Result<(), ApiError> {
    let now = crate::token::unix_seconds(SystemTime::now());
    let taken = ctx
        .used_tokens
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take(fingerprint, until, now);
    taken.map_err(|reuse| {
        let e = ApiError::TokenReused(reuse);
        if reuse == crate::token::replay::Reuse::Replayed {
            ctx.bad_tokens.record(peer.ip);
        }
        ctx.metrics.token_failure(&e.code());
        tracing::warn!(code = %e.code(), "single-use token refused");
        e
    })
}

fn start(
    ctx: &Arc<Context>,
    ident: Ident,
    reg: crate::sip::endpoint::RegistrationHandle,
    rules: AppRules,
    first: Vec<Event>,
) -> Link {
    let (page, events) = mpsc::channel(PAGE_QUEUE);
    let (control, controls) = mpsc::channel(CONTROL_QUEUE);
    ctx.sessions
        .insert(&ident.session_id, &ident.app, &ident.agent, control.clone());
    let page_id = next_page_id();
    let (session, updates) = Session::new(ctx.clone(), ident, reg, rules, (page, page_id));
    tokio::spawn(session.run(first, controls, updates));
    Link {
        control,
        events,
        page_id,
    }
}

/// `resume`: attaches the page to live session `session_id` if the session's app allows the
/// page's origin. Unknown ids count as bad tokens (they are bearer credentials).
pub(crate) async fn resume(
    ctx: &Arc<Context>,
    peer: &Peer,
    id: u64,
    session_id: &str,
) -> Result<Link, ApiError> {
    if ctx.bad_tokens.blocked(peer.ip) {
        return Err(ApiError::RateLimited);
    }
    let Some((app, control)) = ctx.sessions.get(session_id) else {
        ctx.bad_tokens.record(peer.ip);
        return Err(ApiError::UnknownSession);
    };
    if !origin_allowed(ctx, &app, peer.origin.as_ref()) {
        return Err(ApiError::OriginNotAllowed);
    }
    let (page, events) = mpsc::channel(PAGE_QUEUE);
    let page_id = next_page_id();
    control
        .send(Control::Attach { page, id, page_id })
        .await
        .map_err(|_| ApiError::UnknownSession)?;
    Ok(Link {
        control,
        events,
        page_id,
    })
}
