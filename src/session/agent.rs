//! One agent's session: the task that owns its registration share, dial plan, calls and the
//! attachment of its page. It outlives its socket: when the page goes away the session waits
//! `http.resume_secs` for a `resume` to attach a new one (a reload), then ends, hanging up its
//! calls and releasing its registration.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

mod backend;

use super::agent_state::{AgentState, Cause, Change, Outcome, StatePolicy};
use super::call::{CallCore, CallInfo, CallSettings};
use super::call_task::{COMMAND_QUEUE, CallCommand, CallTask, CallUpdate};
use super::context::Context;
pub(crate) use super::control::Control;
use super::control::{CLOSE_GOING_AWAY, CLOSE_LOGGED_OUT, CLOSE_RESUMED_ELSEWHERE, ToPage};
use super::error::ApiError;
use super::event::{Direction, Event};
use super::hub::Channel;
use super::media::{BrowserMedia, browser_leg, unix_ms};
use super::presence::Presence;
use super::request::{Request, check_candidate, check_digits};
use crate::dialplan::DialPlan;
use crate::media::dtmf::DigitQueue;
use crate::media::rtp_leg::RtpLeg;
use crate::media::webrtc::Leg;
use crate::sip::endpoint::{CallHandle, IncomingCall, RegistrationEvent, RegistrationHandle};
use crate::sip::registration::Status;
use crate::sip::sdp::AudioSdp;

/// Most simultaneous calls of one page (a call, a consultation, a waiting call).
pub const MAX_CALLS_PER_SESSION: usize = 4;

/// Events queued for the page's socket.
pub(crate) const PAGE_QUEUE: usize = 256;

/// A logged-in session's identity.
pub(crate) struct Ident {
    pub(crate) session_id: String,
    pub(crate) agent: String,
    pub(crate) app: String,
    /// The agent's event channel.
    pub(crate) channel: Arc<Channel>,
    /// The page's credential for the HTTP API.
    pub(crate) api_token: String,
    /// The agent's group (token `group`): which states it may use.
    pub(crate) group: Option<String>,
    /// Its place among the agent's sessions, held until the session ends, with the state
    /// they share.
    pub(crate) slot: super::registry::AgentSlot,
}

/// What the session keeps of its app's configuration, as at login.
pub(crate) struct AppRules {
    /// How dial strings are normalised.
    pub(crate) plan: DialPlan,
    /// The agent states.
    pub(crate) states: Arc<StatePolicy>,
    /// The incoming INVITE headers that become call data.
    pub(crate) call_data: Arc<crate::config::call_data::CallDataMap>,
    /// The X- headers its calls may add.
    pub(crate) call_headers: Arc<crate::config::call_data::CallHeaders>,
}

/// A call of this session, as the session sees it.
struct CallLink {
    commands: mpsc::Sender<CallCommand>,
    endpoint_id: u64,
    /// Until the agent answers: the caller's offer.
    ringing: Option<Option<AudioSdp>>,
    /// Its telephone-event digits waiting to be sent.
    digits: DigitQueue,
    /// It was established (its end starts the wrap-up).
    answered: bool,
    /// Its entry among the live calls (for the backend's call control).
    _live: super::registry::LiveCall,
}

/// The session task's state.
pub(crate) struct Session {
    ctx: Arc<Context>,
    ident: Ident,
    reg: RegistrationHandle,
    plan: DialPlan,
    page: Option<mpsc::Sender<ToPage>>,
    /// The id of the page attached last.
    page_id: u64,
    calls: HashMap<String, CallLink>,
    /// The page's attachment, and what a resuming page is told.
    presence: Presence,
    updates: mpsc::Sender<CallUpdate>,
    /// The page's queue closed under a send (its socket's task is gone): handled as a
    /// detach after the current input.
    page_lost: bool,
    /// The app's agent states (as at login).
    states: Arc<StatePolicy>,
    /// The incoming INVITE headers that become call data (as at login).
    call_data: Arc<crate::config::call_data::CallDataMap>,
    /// The X- headers its calls may add.
    call_headers: Arc<crate::config::call_data::CallHeaders>,
    /// Changes of the agent's state (shared with its other sessions).
    state_changes: tokio::sync::watch::Receiver<Cause>,
    /// Click-to-call requests the page was asked to carry out.
    dials: backend::Dials,
}

/// Whether the session goes on after an input.
enum Next {
    Continue,
    End,
}

impl Session {
    /// A session for a page that just logged in, with its first events.
    pub(crate) fn new(
        ctx: Arc<Context>,
        ident: Ident,
        reg: RegistrationHandle,
        rules: AppRules,
        (page, page_id): (mpsc::Sender<ToPage>, u64),
    ) -> (Session, mpsc::Receiver<CallUpdate>) {
        let AppRules {
            plan,
            states,
            call_data,
            call_headers,
        } = rules;
        let (updates, updates_rx) = mpsc::channel(PAGE_QUEUE);
        let mut state_changes = ident.slot.shared().watch();
        state_changes.mark_unchanged();
        let s = Session {
            ctx,
            ident,
            reg,
            plan,
            page: Some(page),
            page_id,
            calls: HashMap::new(),
            presence: Presence::default(),
            updates,
            page_lost: false,
            states,
            state_changes,
            call_data,
            call_headers,
            dials: backend::Dials::default(),
        };
        (s, updates_rx)
    }

    /// Runs the session until it ends (logout, not resumed in time, SIP endpoint gone).
    pub(crate) async fn run(
        mut self,
        first: Vec<Event>,
        mut controls: mpsc::Receiver<Control>,
        mut updates: mpsc::Receiver<CallUpdate>,
    ) {
        // The agent's state right after `connected`, before the registration's state (which
        // may already be `registered` when the session joined a live registration).
        let mut first = first;
        let at = first
            .iter()
            .position(|e| matches!(e, Event::Connected { .. }))
            .map_or(first.len(), |i| i + 1);
        first.insert(at, self.state_event(*self.state_changes.borrow()));
        for ev in first {
            self.tell(ev).await;
        }
        loop {
            let grace = self
                .presence
                .poll_timeout()
                .map(tokio::time::Instant::from_std);
            let wrap_up = self
                .agent_state(|s| s.poll_timeout())
                .map(tokio::time::Instant::from_std);
            let next = tokio::select! {
                c = controls.recv() => match c {
                    Some(c) => self.control(c).await,
                    None => Next::End,
                },
                ev = self.reg.next() => match ev {
                    Some(RegistrationEvent::Status(s)) => self.status(&s).await,
                    Some(RegistrationEvent::Incoming(inc)) => self.incoming(*inc).await,
                    None => {
                        self.last_words(&mut updates).await;
                        self.close_page(CLOSE_GOING_AWAY, "callgate is shutting down").await;
                        Next::End
                    }
                },
                Some(u) = updates.recv() => self.update(u).await,
                Ok(()) = self.state_changes.changed() => {
                    let cause = *self.state_changes.borrow_and_update();
                    let ev = self.state_event(cause);
                    self.tell(ev).await;
                    Next::Continue
                }
                () = sleep_until(wrap_up) => {
                    let change = self.agent_state(|s| s.handle_timeout(Instant::now()));
                    self.state_changed(change);
                    Next::Continue
                }
                () = sleep_until(grace) => {
                    if self.presence.handle_timeout(Instant::now()) {
                        tracing::info!(agent = %self.ident.agent, "session not resumed in time: ending it");
                        Next::End
                    } else {
                        Next::Continue
                    }
                }
            };
            let next = match next {
                Next::Continue if std::mem::take(&mut self.page_lost) => self.detach(),
                other => other,
            };
            if matches!(next, Next::End) {
                break;
            }
        }
        self.end();
    }

    /// The SIP endpoint stopped (shutdown): the calls' last events are on their way; pass
    /// them on (for a second at most).
    async fn last_words(&mut self, updates: &mut mpsc::Receiver<CallUpdate>) {
        let until = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
        while !self.calls.is_empty() {
            let Ok(Some(u)) = tokio::time::timeout_at(until, updates.recv()).await else {
                break;
            };
            self.update(u).await;
        }
    }

    /// The session is over: its HTTP credential and channel share go; dropping the calls'
    /// command queues hangs them up, dropping the registration handle releases its share.
    fn end(self) {
        for link in self.calls.values() {
            let answered = link.answered;
            let change = self.agent_state(|s| s.call_ended(&self.states, Instant::now(), answered));
            self.state_changed(change);
        }
        let ctx = &self.ctx;
        ctx.sessions.remove(&self.ident.session_id);
        ctx.credentials.revoke(&self.ident.api_token);
        ctx.hub.logout(&self.ident.channel);
        ctx.metrics.agent(-1);
        if self.presence.is_detached() {
            ctx.metrics.parked(-1);
        }
        tracing::info!(agent = %self.ident.agent, calls = self.calls.len(), "session ended");
    }

    /// To the page (if one is attached) and, unless private, to the agent's CRM channel.
    async fn tell(&mut self, ev: Event) {
        if ev.for_crm() {
            if let Ok(json) = serde_json::to_string(&ev) {
                self.ctx.hub.publish(&self.ident.channel, json.into());
            }
        }
        let Some(page) = &self.page else {
            self.presence.missed(ev);
            return;
        };
        // Never waits for the page: one that stops reading (its socket stalled, its tab
        // frozen) must not hold up the calls. Its queue full, it is let go as if its socket
        // had closed; the page resumes and is told what it missed.
        match page.try_send(ToPage::Event(ev)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(ToPage::Event(ev))) => {
                tracing::info!(agent = %self.ident.agent, "page not reading its events: detached");
                self.page = None;
                self.page_lost = true;
                self.presence.missed(ev);
            }
            Err(_) => {
                self.page = None;
                self.page_lost = true;
            }
        }
    }

    /// Tells the page's socket to close (the page is detached from then on).
    async fn close_page(&mut self, code: u16, reason: &'static str) {
        if let Some(page) = self.page.take() {
            let _ = page.send(ToPage::Close(code, reason)).await;
        }
    }

    async fn reply(&mut self, id: u64, r: Result<Event, ApiError>) {
        let ev = r.unwrap_or_else(|e| Event::refused(Some(id), e));
        self.tell(ev).await;
    }

    async fn control(&mut self, c: Control) -> Next {
        match c {
            Control::Request(Request::Logout { id }) => {
                self.tell(Event::ok(id)).await;
                self.close_page(CLOSE_LOGGED_OUT, "logged out").await;
                Next::End
            }
            Control::Request(req) => {
                self.request(req).await;
                Next::Continue
            }
            Control::Attach { page, id, page_id } => {
                self.page_id = page_id;
                self.attach(page, id).await;
                Next::Continue
            }
            // A page that was replaced says goodbye late: not the session's page any more.
            Control::SetState { state, reply } => {
                let r = self
                    .set_state(0, &state, Cause::Api)
                    .map(|_| self.state_event(*self.state_changes.borrow()));
                let _ = reply.send(r);
                Next::Continue
            }
            Control::Dial { to, headers, reply } => {
                self.dial(to, headers, reply).await;
                Next::Continue
            }
            Control::Act {
                call_id,
                action,
                reply,
            } => {
                let _ = reply.send(self.act(&call_id, action));
                Next::Continue
            }
            Control::Detach { page_id } if page_id != self.page_id => Next::Continue,
            Control::Detach { .. } => self.detach(),
        }
    }

    /// A page resumed the session: it gets what a fresh login would, and each call's state.
    async fn attach(&mut self, page: mpsc::Sender<ToPage>, id: u64) {
        tracing::info!(agent = %self.ident.agent, "session resumed");
        let (was_detached, replay) = self.presence.attach();
        if was_detached {
            self.ctx.metrics.parked(-1);
        }
        // A page still attached is replaced: the session id is the bearer's proof.
        if let Some(old) = self.page.replace(page) {
            let _ = old.try_send(ToPage::Close(CLOSE_RESUMED_ELSEWHERE, "resumed elsewhere"));
        }
        let mut out = vec![
            Event::ok(id),
            Event::Connected {
                agent: self.ident.agent.clone(),
                session_id: self.ident.session_id.clone(),
                api_token: self.ident.api_token.clone(),
                states: super::event::StateInfo::list(&self.states, self.ident.group.as_deref()),
            },
            Event::registration(&self.reg.status()),
            self.state_event(*self.state_changes.borrow()),
        ];
        out.extend(replay);
        for ev in out {
            // Replays are for the page only; the CRM saw them when they happened.
            if let Some(page) = &self.page {
                let _ = page.send(ToPage::Event(ev)).await;
            }
        }
    }

    /// The page's socket closed: wait for a resume, or end now.
    fn detach(&mut self) -> Next {
        self.page = None;
        self.dials.fail_all();
        let grace = self.ctx.resume.filter(|_| !self.ctx.metrics.is_draining());
        let was_detached = self.presence.is_detached();
        if !self.presence.detach(Instant::now(), grace) {
            return Next::End;
        }
        if !was_detached {
            tracing::info!(agent = %self.ident.agent, calls = self.calls.len(), "page gone: keeping its session for a resume");
            self.ctx.metrics.parked(1);
        }
        Next::Continue
    }

    async fn status(&mut self, s: &Status) -> Next {
        if matches!(s, Status::Registered { .. }) {
            // The registrar accepted the agent's credentials: the API opens.
            self.ctx.credentials.activate(&self.ident.api_token);
        }
        self.tell(Event::registration(s)).await;
        Next::Continue
    }

    async fn update(&mut self, u: CallUpdate) -> Next {
        match u {
            CallUpdate::Event(ev) => {
                if let Event::Call { call_id, state, .. } = &ev {
                    self.presence.call_event(call_id, &ev);
                    if *state == super::event::CallState::Established {
                        if let Some(link) = self.calls.get_mut(call_id) {
                            link.answered = true;
                        }
                    }
                }
                self.tell(ev).await;
            }
            CallUpdate::Finished(call_id) => {
                // (A rejected call is unlinked at once: it was not answered.)
                let link = self.calls.remove(&call_id);
                let answered = link.as_ref().is_some_and(|l| l.answered);
                // Still ringing at its end: the caller gave up, or it rang out.
                let missed = link.is_some_and(|l| !l.answered && l.ringing.is_some());
                self.presence.call_finished(&call_id);
                let now = Instant::now();
                let change = self.agent_state(|s| s.call_ended(&self.states, now, answered));
                self.state_changed(change);
                if missed {
                    let change = self.agent_state(|s| s.call_missed(&self.states, now));
                    self.state_changed(change);
                }
            }
        }
        Next::Continue
    }

    /// A call for the agent: refused while draining or at the call limit, else offered.
    async fn incoming(&mut self, inc: IncomingCall) -> Next {
        if self.ctx.metrics.is_draining() {
            // Shutting down: the caller should try elsewhere (RFC 3261 §21.5.4).
            inc.call.reject(503, "Service Unavailable");
            return Next::Continue;
        }
        if self.calls.len() >= MAX_CALLS_PER_SESSION {
            inc.call.reject(486, "Busy Here");
            return Next::Continue;
        }
        if !self.agent_state(|s| s.may_receive(&self.states)) {
            let status = self.states.refuse_status;
            tracing::info!(agent = %self.ident.agent, status, "incoming call refused: the agent's state does not receive");
            inc.call.reject(
                status,
                if status == 486 {
                    "Busy Here"
                } else {
                    "Temporarily Unavailable"
                },
            );
            return Next::Continue;
        }
        let peer = inc.asserted.as_ref().unwrap_or(&inc.from).user().to_owned();
        let data = self.call_data.extract(&inc.headers);
        let announce = Event::Incoming {
            call_id: inc.call.call_id().to_owned(),
            from: peer.clone(),
            display_name: inc.from.display.clone(),
            data: data.clone(),
            auto_answer: self.call_data.auto_answer(&inc.headers),
        };
        let offer = inc.offer.clone();
        let call_id = self.spawn_call(
            inc.call,
            Direction::Inbound,
            (peer, data),
            None,
            offer.clone(),
        );
        if let Some(link) = self.calls.get_mut(&call_id) {
            link.ringing = Some(offer);
        }
        self.presence.call_began(&call_id, Some(announce.clone()));
        self.tell(announce).await;
        Next::Continue
    }

    /// Starts the task that follows a call; returns its id.
    fn spawn_call(
        &mut self,
        handle: CallHandle,
        direction: Direction,
        (peer, data): (String, BTreeMap<String, String>),
        media: Option<BrowserMedia>,
        caller_offer: Option<AudioSdp>,
    ) -> String {
        let info = CallInfo {
            call_id: handle.call_id().to_owned(),
            sip_call_id: handle.sip_call_id().to_owned(),
            app: self.ident.app.clone(),
            agent: self.ident.agent.clone(),
            direction,
            peer,
            data,
        };
        let settings = CallSettings {
            dtmf_mode: self.ctx.dtmf,
            media_timeout: self.ctx.media_timeout,
            refer: self.ctx.accept_refer.then(|| self.plan.clone()),
        };
        let (browser, legs) = match media {
            Some(m) => (Some(m.browser), Some((m.leg, m.rtp))),
            None => (None, None),
        };
        let call_id = info.call_id.clone();
        let record = self.ctx.recording_path(&self.ident.app, &call_id);
        self.ctx.metrics.call_started(match direction {
            Direction::Outbound => crate::metrics::Direction::Outbound,
            Direction::Inbound => crate::metrics::Direction::Inbound,
        });
        let core = CallCore::new(
            Instant::now(),
            unix_ms(),
            info,
            settings,
            browser,
            caller_offer,
        );
        let (control, sip_events) = handle.split();
        let (commands_tx, commands) = mpsc::channel(COMMAND_QUEUE);
        let digits = DigitQueue::default();
        let endpoint_id = control.endpoint_id();
        tokio::spawn(
            CallTask {
                core,
                control,
                sip_events,
                commands,
                updates: self.updates.clone(),
                legs,
                store: self.ctx.cdr.clone(),
                record,
                metrics: self.ctx.metrics.clone(),
                digits: digits.clone(),
            }
            .run(),
        );
        self.calls.insert(
            call_id.clone(),
            CallLink {
                commands: commands_tx,
                endpoint_id,
                ringing: None,
                digits,
                answered: false,
                _live: self
                    .ctx
                    .sessions
                    .call_began(&call_id, &self.ident.session_id),
            },
        );
        self.agent_state(AgentState::call_began);
        if direction == Direction::Outbound {
            self.presence.call_began(&call_id, None);
        }
        call_id
    }

    /// A call of this session that is past ringing (outbound, or answered).
    fn live_call(&self, call_id: &str) -> Result<&CallLink, ApiError> {
        self.calls
            .get(call_id)
            .filter(|c| c.ringing.is_none())
            .ok_or(ApiError::UnknownCall("no such call in this session"))
    }

    /// Queues `cmd` for call `call_id` without waiting (a call's queue never blocks the
    /// session: the call task may be waiting for the session itself).
    fn command(&self, call_id: &str, cmd: CallCommand) -> Result<(), ApiError> {
        let link = self
            .calls
            .get(call_id)
            .ok_or(ApiError::UnknownCall("no such call in this session"))?;
        link.commands.try_send(cmd).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                ApiError::BadRequest("this call has too many requests pending; wait for replies")
            }
            mpsc::error::TrySendError::Closed(_) => {
                ApiError::UnknownCall("the call ended meanwhile")
            }
        })
    }
}

/// The agent's state: what the sessions of an agent share.
impl Session {
    fn agent_state<R>(&self, f: impl FnOnce(&mut AgentState) -> R) -> R {
        self.ident.slot.shared().with(f)
    }

    /// The `agentState` event for the state as it is now, entered for `cause`.
    fn state_event(&self, cause: Cause) -> Event {
        let (current, since, pending, ends) =
            self.agent_state(|s| (s.current(), s.since(), s.pending(), s.wrap_up_ends()));
        let (now, now_ms) = (Instant::now(), unix_ms());
        let ms = |d: std::time::Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let def = self.states.get(current);
        Event::AgentState {
            state: def.id.clone(),
            label: def.label.clone(),
            may_call_out: def.may_call_out,
            may_receive: def.may_receive,
            productive: def.productive,
            since: now_ms.saturating_sub(ms(now.saturating_duration_since(since))),
            cause: cause.code(),
            pending: pending.map(|p| self.states.get(p).id.clone()),
            wrap_up_ends_at: ends
                .map(|t| now_ms.saturating_add(ms(t.saturating_duration_since(now)))),
        }
    }

    /// A change of the agent's state (if any): published to its CRM channel once, and to
    /// the pages of all its sessions (each tells its own, this one included).
    fn state_changed(&self, change: Option<Change>) {
        if let Some(change) = change {
            tracing::info!(
                agent = %self.ident.agent,
                from = %self.states.get(change.from).id,
                to = %self.states.get(change.to).id,
                cause = change.cause.code(),
                "agent state"
            );
            self.ident
                .slot
                .shared()
                .logged(self.states.get(change.to), change.cause);
            self.state_published(change.cause);
        }
    }

    fn state_published(&self, cause: Cause) {
        if let Ok(json) = serde_json::to_string(&self.state_event(cause)) {
            self.ctx.hub.publish(&self.ident.channel, json.into());
        }
        self.ident.slot.shared().changed(cause);
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The page's requests, one function each (docs/API.md).
impl Session {
    async fn request(&mut self, req: Request) {
        let (id, r) = match req {
            Request::Connect { id, .. } | Request::Resume { id, .. } => {
                (id, Err(ApiError::AlreadyConnected))
            }
            Request::Logout { id } | Request::Ping { id } => (id, Ok(Event::ok(id))),
            Request::Media { id, call_id, sdp } => (id, self.media(id, call_id, &sdp).await),
            Request::Call {
                id,
                to,
                sdp,
                headers,
                request_id,
            } => {
                let r = self.call(id, &to, &sdp, &headers).await;
                if let Some(request_id) = request_id {
                    self.dials.settle(request_id, &r);
                }
                (id, r)
            }
            Request::SetState { id, state } => (id, self.set_state(id, &state, Cause::Requested)),
            Request::Consult {
                id,
                call_id,
                to,
                sdp,
            } => (id, self.consult(id, &call_id, &to, &sdp).await),
            Request::Hangup { id, call_id } => (id, self.hangup(id, &call_id)),
            Request::Answer { id, call_id, sdp } => (id, self.answer(id, call_id, &sdp).await),
            Request::Reject { id, call_id, code } => (id, self.reject(id, &call_id, code)),
            Request::Hold { id, call_id } => (id, self.hold(id, &call_id, true)),
            Request::Unhold { id, call_id } => (id, self.hold(id, &call_id, false)),
            Request::Dtmf {
                id,
                call_id,
                digits,
            } => (id, self.dtmf(id, &call_id, digits)),
            Request::Transfer { id, call_id, to } => (id, self.transfer(id, &call_id, &to)),
            Request::Ice {
                id,
                call_id,
                candidate,
                sdp_mid,
                sdp_mline_index,
            } => (
                id,
                self.calls
                    .get(&call_id)
                    .ok_or(ApiError::UnknownCall("no such call in this session"))
                    .and_then(|_| check_candidate(&candidate, sdp_mid.as_deref(), sdp_mline_index))
                    .map(|()| Event::ok(id)),
            ),
            Request::CompleteTransfer {
                id,
                call_id,
                consult_id,
            } => (id, self.complete_transfer(id, &call_id, &consult_id)),
        };
        self.reply(id, r).await;
    }

    /// `call`: places a call if the agent's state allows calling out, with the X- headers
    /// asked for if the app allows them.
    async fn call(
        &mut self,
        id: u64,
        to: &str,
        sdp: &str,
        headers: &BTreeMap<String, String>,
    ) -> Result<Event, ApiError> {
        let headers = self.may_call_with(headers)?;
        self.place(id, to, sdp, headers).await
    }

    /// Whether the agent's state calls out, and `headers` as the INVITE carries them if the
    /// app allows them.
    fn may_call_with(
        &self,
        headers: &BTreeMap<String, String>,
    ) -> Result<Vec<(String, String)>, ApiError> {
        if !self.agent_state(|s| s.may_call_out(&self.states)) {
            let state = self.agent_state(|s| s.current());
            return Err(ApiError::StateForbidsCalls(
                self.states.get(state).id.clone(),
            ));
        }
        self.call_headers
            .check(headers)
            .map_err(ApiError::HeaderNotAllowed)
    }

    /// `setState`: the agent's state now, or (in a call) when its last call ends; `by` says
    /// who asked (the agent, or the CRM).
    fn set_state(&mut self, id: u64, state: &str, by: Cause) -> Result<Event, ApiError> {
        let to = self
            .states
            .find_for(state, self.ident.group.as_deref())
            .ok_or(ApiError::UnknownState)?;
        let (had_pending, outcome) =
            self.agent_state(|s| (s.pending().is_some(), s.request_by(Instant::now(), to, by)));
        match outcome {
            Outcome::Changed(change) => self.state_changed(Some(change)),
            Outcome::Pending(_) => self.state_published(by),
            Outcome::Unchanged if had_pending => self.state_published(by),
            Outcome::Unchanged => {}
        }
        Ok(Event::ok(id))
    }

    /// Places a call (`call`, `consult`) once the session may: not draining, below its call
    /// limit, and `to` allowed by the app's dial plan. The reply carries callgate's answer.
    async fn place(
        &mut self,
        id: u64,
        to: &str,
        sdp: &str,
        headers: Vec<(String, String)>,
    ) -> Result<Event, ApiError> {
        if self.ctx.metrics.is_draining() {
            return Err(ApiError::Unavailable);
        }
        if self.calls.len() >= MAX_CALLS_PER_SESSION {
            return Err(ApiError::TooManyCalls);
        }
        let to = self.plan.apply(to)?;
        let media = BrowserMedia::set_up(&self.ctx, sdp).await?;
        let offer = media.sip_offer(&self.ctx);
        // What the call carries, by the app's call_data names, for its history row.
        let data = self.call_data.extract(&headers);
        let handle = self
            .ctx
            .sip
            .dial_with(&self.reg, &to, offer.to_sdp(), headers)
            .await?;
        let answer = media.answer.clone();
        let call_id = self.spawn_call(handle, Direction::Outbound, (to, data), Some(media), None);
        Ok(Event::ok_call(id, call_id, answer))
    }

    async fn consult(
        &mut self,
        id: u64,
        call_id: &str,
        to: &str,
        sdp: &str,
    ) -> Result<Event, ApiError> {
        self.live_call(call_id)?;
        let reply = self.place(id, to, sdp, Vec::new()).await?;
        let _ = self.command(call_id, CallCommand::Hold(true));
        Ok(reply)
    }

    async fn media(&mut self, id: u64, call_id: String, sdp: &str) -> Result<Event, ApiError> {
        self.live_call(&call_id)?;
        let (leg, answer, browser, _) = browser_leg(&self.ctx, sdp).await?;
        self.command(&call_id, CallCommand::NewLeg(leg, browser))?;
        Ok(Event::ok_call(id, call_id, answer))
    }

    fn hangup(&mut self, id: u64, call_id: &str) -> Result<Event, ApiError> {
        let ringing = self.calls.get(call_id).is_some_and(|c| c.ringing.is_some());
        if ringing {
            return self.reject(id, call_id, Some(603));
        }
        self.command(call_id, CallCommand::Hangup)?;
        Ok(Event::ok(id))
    }

    /// Refuses a ringing call (486 Busy Here by default); its `ended` event follows.
    fn reject(&mut self, id: u64, call_id: &str, code: Option<u16>) -> Result<Event, ApiError> {
        if self.calls.get(call_id).is_none_or(|c| c.ringing.is_none()) {
            return Err(ApiError::UnknownCall("no ringing call with that id"));
        }
        let cmd = match code.filter(|c| (400..700).contains(c)) {
            Some(603) => CallCommand::Reject(603, "Decline"),
            Some(c) => CallCommand::Reject(c, "Busy Here"),
            None => CallCommand::Reject(486, "Busy Here"),
        };
        self.command(call_id, cmd)?;
        // The call task reports the end; the session lets go of it now.
        self.calls.remove(call_id);
        self.presence.not_ringing(call_id);
        Ok(Event::ok(id))
    }

    /// Answers a ringing call: the page's legs, and the SIP answer to the caller's offer with
    /// the codec the browser got. A call that cannot be answered is dropped (hung up).
    async fn answer(&mut self, id: u64, call_id: String, sdp: &str) -> Result<Event, ApiError> {
        let Some(offer) = self.calls.get(&call_id).and_then(|c| c.ringing.clone()) else {
            return Err(ApiError::UnknownCall("no ringing call with that id"));
        };
        let answered = self.answer_with(&call_id, offer, sdp).await;
        match &answered {
            Ok(_) => {
                if let Some(c) = self.calls.get_mut(&call_id) {
                    c.ringing = None;
                }
            }
            Err(_) => {
                self.calls.remove(&call_id);
            }
        }
        self.presence.not_ringing(&call_id);
        answered.map(|answer| Event::ok_call(id, call_id, answer))
    }

    async fn answer_with(
        &mut self,
        call_id: &str,
        offer: Option<AudioSdp>,
        sdp: &str,
    ) -> Result<String, ApiError> {
        let offer = offer.ok_or_else(|| {
            ApiError::NoCommonCodec("the caller sent no SDP offer (not supported yet)".to_owned())
        })?;
        let media = BrowserMedia::set_up(&self.ctx, sdp).await?;
        let sip_answer = media.sip_answer(&self.ctx, &offer)?.to_sdp();
        let BrowserMedia {
            leg,
            answer,
            browser,
            rtp,
            ..
        } = media;
        self.command(call_id, answer_command(sip_answer, leg, rtp, browser))?;
        Ok(answer)
    }

    fn hold(&mut self, id: u64, call_id: &str, hold: bool) -> Result<Event, ApiError> {
        self.live_call(call_id)?;
        self.command(call_id, CallCommand::Hold(hold))?;
        Ok(Event::ok(id))
    }

    fn dtmf(&mut self, id: u64, call_id: &str, digits: String) -> Result<Event, ApiError> {
        let queue = self.live_call(call_id)?.digits.clone();
        check_digits(&digits)?;
        if !queue.try_reserve(digits.len()) {
            return Err(ApiError::DtmfQueueFull(queue.len()));
        }
        let n = digits.len();
        self.command(call_id, CallCommand::Dtmf(digits))
            .inspect_err(|_| queue.release(n))?;
        Ok(Event::ok(id))
    }

    fn transfer(&mut self, id: u64, call_id: &str, to: &str) -> Result<Event, ApiError> {
        self.live_call(call_id)?;
        let to = self.plan.apply(to)?;
        self.command(call_id, CallCommand::Transfer(to))?;
        Ok(Event::ok(id))
    }

    fn complete_transfer(
        &mut self,
        id: u64,
        call_id: &str,
        consult_id: &str,
    ) -> Result<Event, ApiError> {
        let two = ApiError::UnknownCall("callId and consultId must be two calls of this session");
        if call_id == consult_id {
            return Err(two);
        }
        let consult = self
            .live_call(consult_id)
            .map_err(|_| two.clone())?
            .endpoint_id;
        self.live_call(call_id).map_err(|_| two)?;
        self.command(call_id, CallCommand::CompleteTransfer(consult))?;
        Ok(Event::ok(id))
    }
}

fn answer_command(sip_answer: String, leg: Leg, rtp: RtpLeg, browser: AudioSdp) -> CallCommand {
    CallCommand::Answer {
        sip_answer,
        leg,
        rtp: Box::new(rtp),
        browser,
    }
}
