//! The SIP user agent, sans-IO: every registration and call of the endpoint over one
//! transaction layer. It routes responses to the registration or call whose transaction they
//! answer, in-dialog requests to their dialog, new INVITEs to the registration whose Contact they
//! name, and follows REFERs its calls' owners accept. The tokio shell
//! (`endpoint.rs`) only moves datagrams, commands and time in and datagrams out.
//!
//! Two handles for the same SIP identity of the same app with the same password share one
//! registration (reference counted, see [`RegKey`]). When the last handle is dropped the
//! registration lingers for a grace period (a page reload must not REGISTER again, providers
//! limit registrations), then unregisters. An incoming call goes to the newest live handle of
//! its registration (the page the agent opened last), and only once the registrar accepted it.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use super::IdGen;
use super::call::{self, Call, CallEvent, Local, dial_uri};
use super::handle::{
    Acquired, CallAction, CallHandle, Command, EndpointError, IncomingCall, RegKey,
};
use super::message::{Message, ParseError, StartLine, response_to};
use super::registration::{self, Binding, Purpose, Registration, Status};
use super::transaction::{Event, Timers, TransactionLayer, TxId};
use crate::account::{HostPort, SipAccount};

/// Endpoint settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// UDP listen address.
    pub listen: SocketAddr,
    /// Address for Via/Contact (behind NAT); else the local address toward each registrar.
    pub public_address: Option<HostPort>,
    /// Transaction timers.
    pub timers: Timers,
    /// Registration behaviour.
    pub registration: registration::Settings,
    /// How long a registration outlives its last handle.
    pub grace: Duration,
    /// Most registrations at once.
    pub max_registrations: usize,
    /// A second incoming call while the agent has a call: offer it (call waiting) or answer
    /// 486 Busy Here.
    pub call_waiting: bool,
    /// DNS server for SRV lookups (`None`: the first nameserver of /etc/resolv.conf).
    pub dns_server: Option<SocketAddr>,
    /// RFC 4028 Min-SE: shorter session intervals are refused with 422 (90 s by the RFC).
    pub min_session_expires: Duration,
    /// Besides each registration's registrar or outbound proxy, the addresses new INVITEs are
    /// accepted from (a provider's SBC pool). Anything else gets 403: a call from anywhere
    /// could otherwise reach a registered agent directly, with any P-Asserted-Identity.
    pub trusted_peers: Vec<std::net::IpAddr>,
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// Datagrams received.
    pub received: AtomicU64,
    /// Datagrams dropped as malformed (keepalives not counted).
    pub malformed: AtomicU64,
    /// Datagrams sent.
    pub sent: AtomicU64,
    /// Inputs (datagrams, commands, timer runs) dropped because handling them panicked: a
    /// bug, contained by the shell so that SIP carries on.
    pub panics: AtomicU64,
}

/// A datagram that makes the UA panic, in unit tests only: the shell must contain it.
#[cfg(test)]
pub(crate) const PANIC_PROBE: &[u8] = b"callgate test: panic now";

/// The methods we answer (in 200s to OPTIONS and in 501s).
const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, REFER, NOTIFY, UPDATE";

/// Most calls at once per endpoint.
pub const MAX_CALLS: usize = 10_000;

/// callgate's own id for a new call (`c-` and 16 hex digits): unguessable, never derived from
/// anything a peer sent.
fn public_id() -> Result<String, crate::rand::GetRandomFailed> {
    Ok(format!("c-{}", crate::rand::hex::<8>()?))
}

struct Entry {
    reg: Registration,
    target: SocketAddr,
    refs: usize,
    release_at: Option<Instant>,
    status: watch::Sender<Status>,
    /// The registrar accepted this registration's credentials at least once: until then it
    /// is offered no incoming call (a binding the registrar never took cannot be called
    /// legitimately).
    accepted: bool,
    /// One queue per live handle, newest last (unbounded by construction: at most the calls
    /// the UA admits, `MAX_CALLS`).
    incoming: Vec<mpsc::UnboundedSender<IncomingCall>>,
}

struct CallEntry {
    call: Call,
    /// callgate's own call id.
    public_id: String,
    /// The registration the call belongs to.
    reg_key: RegKey,
    /// Attended transfer in progress: the consultation call to end with this one.
    consult: Option<u64>,
    /// To the call's owner (unbounded by construction: a few events per SIP message of the
    /// call, which the transaction layer rate-bounds).
    events: Option<mpsc::UnboundedSender<CallEvent>>,
    /// The registration key, until the Incoming event is delivered.
    deliver_to: Option<RegKey>,
    /// A transfer the far end asked for is being followed by this new call.
    referral: Option<u64>,
    /// This call was placed for call `.0`'s far end's REFER and replaces it once answered.
    replacing: Option<u64>,
    /// The far end ended the call while its REFER is being followed: reported only if the
    /// new call fails.
    held_end: Option<CallEvent>,
}

#[derive(Clone)]
enum Owner {
    Registration(RegKey, Purpose),
    Call(u64, call::Purpose),
}

/// The SIP user agent: every registration and call of the endpoint, and the transaction layer
/// under them. Sans-IO: datagrams, commands and time in; datagrams and deadlines out.
///
/// Call order: any of [`handle_datagram`](Self::handle_datagram),
/// [`handle_command`](Self::handle_command) or [`handle_timeout`](Self::handle_timeout) (each
/// runs the cores until they settle), then [`poll_transmit`](Self::poll_transmit) until `None`,
/// then wait until [`poll_timeout`](Self::poll_timeout) or the next input.
pub(crate) struct UserAgent {
    layer: TransactionLayer,
    regs: HashMap<RegKey, Entry>,
    calls: HashMap<u64, CallEntry>,
    /// (Call-ID, our tag) → call.
    dialogs: HashMap<(String, String), u64>,
    owners: HashMap<TxId, Owner>,
    /// Datagrams to send, in order.
    sends: VecDeque<(SocketAddr, Vec<u8>)>,
    settings: Arc<Settings>,
    stats: Arc<Stats>,
    cmds: mpsc::UnboundedSender<Command>,
    shutdown: Option<(oneshot::Sender<()>, Instant)>,
    next_call: u64,
    /// Calls replaced by a followed transfer → the call that carries on for them.
    aliases: HashMap<u64, u64>,
    /// Branches, tags, Call-IDs and cnonces (unique, not secret; seeded from the OS).
    ids: IdGen,
    /// Keys the password digests in [`RegKey`]s.
    key_secret: [u8; 32],
    /// Contact user part → registration, for incoming INVITEs.
    contacts: HashMap<String, RegKey>,
    /// Registrar / outbound proxy addresses → how many registrations use them: with
    /// `trusted_peers`, the sources the transaction layer's flood budgets trust.
    targets: HashMap<std::net::IpAddr, usize>,
}

impl UserAgent {
    /// A UA with no registration or call. `cmds` is the queue its handles send commands to
    /// (the shell's); the OS random generator seeds its identifiers.
    pub(crate) fn new(
        settings: Arc<Settings>,
        stats: Arc<Stats>,
        cmds: mpsc::UnboundedSender<Command>,
    ) -> Result<UserAgent, crate::rand::GetRandomFailed> {
        let mut layer = TransactionLayer::new(settings.timers, crate::rand::u64()?);
        layer.set_trusted(settings.trusted_peers.iter().copied().collect());
        Ok(UserAgent {
            layer,
            regs: HashMap::new(),
            calls: HashMap::new(),
            dialogs: HashMap::new(),
            owners: HashMap::new(),
            sends: VecDeque::new(),
            settings,
            stats,
            cmds,
            shutdown: None,
            next_call: 1,
            aliases: HashMap::new(),
            ids: IdGen::new(crate::rand::u64()?),
            key_secret: crate::rand::bytes()?,
            contacts: HashMap::new(),
            targets: HashMap::new(),
        })
    }

    /// Hangs up every call and unregisters everything; the UA is done once they are, or at
    /// the latest one Timer F later.
    pub(crate) fn begin_shutdown(&mut self, now: Instant) {
        for c in self.calls.values_mut() {
            c.call.hangup(now);
        }
        for e in self.regs.values_mut() {
            e.reg.unregister(now);
        }
        // Leave time for one BYE / unregister transaction (Timer F), no more.
        let limit = now
            + self
                .settings
                .timers
                .sixty_four_t1()
                .min(Duration::from_secs(10));
        if self.shutdown.is_none() {
            let (tx, _rx) = oneshot::channel();
            self.shutdown = Some((tx, limit));
        }
    }

    /// A holder's command.
    pub(crate) fn handle_command(&mut self, now: Instant, cmd: Command) {
        self.command(now, cmd);
        self.drive(now);
    }

    fn command(&mut self, now: Instant, cmd: Command) {
        match cmd {
            Command::Acquire {
                app,
                account,
                target,
                via_host,
                fixed,
                reply,
            } => {
                if self.shutdown.is_some() {
                    let _ = reply.send(Err(EndpointError::Closed));
                    return;
                }
                let account = *account;
                let key = RegKey::new(&app, &account, &self.key_secret);
                let (in_tx, in_rx) = mpsc::unbounded_channel();
                if let Some(e) = self.regs.get_mut(&key) {
                    e.refs += 1;
                    e.release_at = None;
                    let old = std::mem::replace(&mut e.target, target);
                    e.incoming.push(in_tx);
                    e.reg.update_account(account);
                    if matches!(
                        e.reg.status(),
                        Status::Failed {
                            retrying: false,
                            ..
                        } | Status::Unregistered
                            | Status::Idle
                    ) || e.reg.is_finished()
                    {
                        e.reg.start(now);
                    }
                    let _ = reply.send(Ok(Acquired {
                        key,
                        status: e.status.subscribe(),
                        incoming: in_rx,
                    }));
                    if old.ip() != target.ip() {
                        self.count_target(old, false);
                        self.count_target(target, true);
                    }
                    return;
                }
                if self.regs.len() >= self.settings.max_registrations {
                    let _ =
                        reply.send(Err(EndpointError::TooMany(self.settings.max_registrations)));
                    return;
                }
                let id = self.ids.next();
                let binding = Binding {
                    via_host,
                    contact_user: format!("{}-{:08x}", account.login, id as u32),
                    call_id: format!("{}@callgate", self.ids.hex()),
                    from_tag: format!("{:08x}", (id >> 32) as u32),
                    fixed_public_address: fixed,
                };
                tracing::info!(aor = %account.aor(), %target, "registering");
                let mut reg = Registration::new(
                    account,
                    self.settings.registration.clone(),
                    binding,
                    self.ids.next(),
                );
                reg.start(now);
                let (status, rx) = watch::channel(reg.status().clone());
                self.contacts
                    .insert(reg.contact_user().to_owned(), key.clone());
                self.count_target(target, true);
                self.regs.insert(
                    key.clone(),
                    Entry {
                        reg,
                        target,
                        refs: 1,
                        release_at: None,
                        status,
                        accepted: false,
                        incoming: vec![in_tx],
                    },
                );
                let _ = reply.send(Ok(Acquired {
                    key,
                    status: rx,
                    incoming: in_rx,
                }));
            }
            Command::Release { key } => {
                if let Some(e) = self.regs.get_mut(&key) {
                    e.refs = e.refs.saturating_sub(1);
                    e.incoming.retain(|tx| !tx.is_closed());
                    if e.refs == 0 {
                        e.release_at = Some(now + self.settings.grace);
                    }
                }
            }
            Command::Dial {
                key,
                to,
                sdp,
                headers,
                reply,
            } => {
                let result = self.dial(&key, &to, sdp, headers);
                let _ = reply.send(result);
            }
            Command::Call { id, action } => {
                let id = self.aliases.get(&id).copied().unwrap_or(id);
                if let CallAction::FollowRefer(accept) = action {
                    self.follow_refer(id, accept);
                    return;
                }
                if matches!(action, CallAction::Hangup | CallAction::MediaTimeout) {
                    // Hanging up while a transfer is followed ends the new call too.
                    let new = self.calls.get(&id).and_then(|c| c.referral);
                    if let Some(n) = new.and_then(|n| self.calls.get_mut(&n)) {
                        n.call.hangup(now);
                    }
                }
                if let CallAction::CompleteTransfer(consult) = action {
                    let consult = self.aliases.get(&consult).copied().unwrap_or(consult);
                    let uri = self.calls.get(&consult).and_then(|b| b.call.replaces_uri());
                    if let Some(c) = self.calls.get_mut(&id) {
                        match uri {
                            Some(uri) if c.call.transfer(&uri) => c.consult = Some(consult),
                            _ => c.call.refuse_transfer(),
                        }
                    }
                    return;
                }
                if let Some(c) = self.calls.get_mut(&id) {
                    match action {
                        CallAction::Answer(sdp) => c.call.answer(now, sdp),
                        CallAction::Reject(code, reason) => c.call.reject(code, &reason),
                        CallAction::Hangup => c.call.hangup(now),
                        CallAction::MediaTimeout => c
                            .call
                            .hangup_because(now, crate::sip::call::EndReason::MediaTimeout),
                        CallAction::Hold(true) => c.call.hold(now),
                        CallAction::Hold(false) => c.call.unhold(now),
                        CallAction::CompleteTransfer(_) | CallAction::FollowRefer(_) => {}
                        CallAction::Transfer(to) => {
                            let domain = c.call.domain().to_owned();
                            match dial_uri(&to, &domain) {
                                Ok(uri) if c.call.transfer(&uri) => {}
                                _ => c.call.refuse_transfer(),
                            }
                        }
                        CallAction::Dtmf(digits) => {
                            if !c.call.send_dtmf_info(&digits) {
                                tracing::debug!(
                                    "DTMF refused: invalid digits or call not established"
                                );
                            }
                        }
                    }
                }
            }
            Command::Snapshot { reply } => {
                let mut snap = crate::metrics::SipSnapshot {
                    calls: self.calls.len(),
                    received: self.stats.received.load(Ordering::Relaxed),
                    sent: self.stats.sent.load(Ordering::Relaxed),
                    malformed: self.stats.malformed.load(Ordering::Relaxed),
                    panics: self.stats.panics.load(Ordering::Relaxed),
                    ..Default::default()
                };
                for e in self.regs.values() {
                    let state = match &*e.status.borrow() {
                        Status::Idle => "idle",
                        Status::Registering => "registering",
                        Status::Registered { .. } => "registered",
                        Status::Failed { .. } => "failed",
                        Status::Unregistered => "unregistered",
                    };
                    *snap.registrations.entry(state).or_default() += 1;
                }
                let _ = reply.send(snap);
            }
            Command::Shutdown { done } => {
                self.begin_shutdown(now);
                if let Some((old, deadline)) = self.shutdown.take() {
                    drop(old);
                    self.shutdown = Some((done, deadline));
                }
            }
        }
    }

    /// The owner's answer to call `id`'s far end's REFER.
    fn follow_refer(&mut self, id: u64, accept: bool) {
        let full = self.shutdown.is_some() || self.calls.len() >= MAX_CALLS;
        let Some(c) = self.calls.get_mut(&id) else {
            return;
        };
        let reg_key = c.reg_key.clone();
        let sdp = c.call.offer_for_new_dialog();
        let local = self.local_for(&reg_key);
        let Some(c) = self.calls.get_mut(&id) else {
            return;
        };
        let (Some(sdp), Some((local, account)), true, false) = (sdp, local, accept, full) else {
            c.call.decline_refer();
            return;
        };
        let Some(referral) = c.call.accept_refer() else {
            return;
        };
        let public_id = c.public_id.clone();
        tracing::info!(call = %public_id, target = %referral.target, "following the far end's transfer");
        let call = Call::referred(
            local,
            account,
            &referral,
            sdp,
            self.settings.timers,
            self.ids.next(),
        );
        // The new dialog carries on for the page's call: same public id.
        let (new_id, _, _) = self.new_call(call, &reg_key, None, public_id);
        if let Some(n) = self.calls.get_mut(&new_id) {
            n.events = None;
            n.replacing = Some(id);
        }
        if let Some(c) = self.calls.get_mut(&id) {
            c.referral = Some(new_id);
        }
    }

    /// An event of a call placed for a REFER (`new_id`), before it replaces the original:
    /// progress is NOTIFYed to the referrer and reported; the answer moves the original's
    /// owner over to the new call; a failure leaves the original as it was.
    fn referral_event(&mut self, now: Instant, new_id: u64, ev: CallEvent) {
        let Some(old_id) = self.calls.get(&new_id).and_then(|n| n.replacing) else {
            return;
        };
        let (status, phrase) = match &ev {
            CallEvent::Ringing => (180, "Ringing".to_owned()),
            CallEvent::EarlyMedia { .. } => (183, "Session Progress".to_owned()),
            CallEvent::Answered { .. } => (200, "OK".to_owned()),
            CallEvent::Ended { status, phrase, .. } => (
                status.filter(|s| *s >= 300).unwrap_or(487),
                if phrase.is_empty() {
                    "Request Terminated".to_owned()
                } else {
                    phrase.clone()
                },
            ),
            _ => return,
        };
        let Some(old) = self.calls.get_mut(&old_id) else {
            return;
        };
        old.call.refer_progress(now, status, &phrase);
        match ev {
            CallEvent::Answered { answer } => {
                let events = old.events.take();
                old.referral = None;
                old.held_end = None;
                let Some(new) = self.calls.get_mut(&new_id) else {
                    return;
                };
                new.replacing = None;
                new.events = events;
                tracing::info!(call = %new.public_id, "transfer followed: the call goes on with the target");
                if let Some(tx) = &new.events {
                    let peer = new.call.remote_party();
                    let _ = tx.send(CallEvent::Replaced { peer, answer });
                }
                for v in self.aliases.values_mut() {
                    if *v == old_id {
                        *v = new_id;
                    }
                }
                self.aliases.insert(old_id, new_id);
            }
            CallEvent::Ended { .. } => {
                old.referral = None;
                if let Some(tx) = &old.events {
                    let _ = tx.send(CallEvent::ReferProgress { status, phrase });
                    if let Some(end) = old.held_end.take() {
                        let _ = tx.send(end);
                    }
                }
                if let Some(new) = self.calls.get_mut(&new_id) {
                    new.replacing = None;
                }
            }
            _ => {
                if let Some(tx) = &old.events {
                    let _ = tx.send(CallEvent::ReferProgress { status, phrase });
                }
            }
        }
    }

    fn local_for(&self, key: &RegKey) -> Option<(Local, SipAccount)> {
        let e = self.regs.get(key)?;
        let account = e.reg.account().clone();
        let local = Local {
            aor: format!("sip:{}@{}", account.login, account.domain),
            contact: e.reg.contact_uri(),
            via_host: e.reg.via_host().to_owned(),
            target: e.target,
            user_agent: self.settings.registration.user_agent.clone(),
            min_session_expires: self.settings.min_session_expires,
        };
        Some((local, account))
    }

    fn new_call(
        &mut self,
        call: Call,
        reg_key: &RegKey,
        deliver_to: Option<RegKey>,
        public_id: String,
    ) -> (u64, String, mpsc::UnboundedReceiver<CallEvent>) {
        let id = self.next_call;
        self.next_call += 1;
        let (tx, rx) = mpsc::unbounded_channel();
        self.dialogs
            .insert((call.call_id().to_owned(), call.local_tag().to_owned()), id);
        self.calls.insert(
            id,
            CallEntry {
                call,
                public_id: public_id.clone(),
                reg_key: reg_key.clone(),
                consult: None,
                events: Some(tx),
                deliver_to,
                referral: None,
                replacing: None,
                held_end: None,
            },
        );
        (id, public_id, rx)
    }

    fn dial(
        &mut self,
        key: &RegKey,
        to: &str,
        sdp: String,
        headers: Vec<(String, String)>,
    ) -> Result<CallHandle, EndpointError> {
        if self.shutdown.is_some() {
            return Err(EndpointError::Closed);
        }
        if self.calls.len() >= MAX_CALLS {
            return Err(EndpointError::TooManyCalls(MAX_CALLS));
        }
        let (local, account) = self.local_for(key).ok_or(EndpointError::NotRegistered)?;
        let uri = dial_uri(to, account.domain.as_str())?;
        tracing::info!(from = %local.aor, "dialling");
        let call = Call::outgoing_with(
            local,
            account,
            uri,
            sdp,
            self.settings.timers,
            self.ids.next(),
            headers,
        );
        let sip_call_id = call.call_id().to_owned();
        let (id, call_id, events) = self.new_call(call, key, None, public_id()?);
        Ok(CallHandle {
            armed: true,
            id,
            call_id,
            sip_call_id,
            events,
            cmds: self.cmds.clone(),
        })
    }

    /// When [`handle_timeout`](Self::handle_timeout) is due next.
    #[must_use]
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let regs = self
            .regs
            .values()
            .flat_map(|e| [e.reg.poll_timeout(), e.release_at]);
        let calls = self.calls.values().map(|c| c.call.poll_timeout());
        [
            self.layer.poll_timeout(),
            self.shutdown.as_ref().map(|s| s.1),
        ]
        .into_iter()
        .chain(regs)
        .chain(calls)
        .flatten()
        .min()
    }

    /// Time passed: retransmissions, refreshes, session timers, released registrations.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        self.drive(now);
    }

    /// A datagram from `source`. A malformed one is dropped (its error says why).
    pub(crate) fn handle_datagram(
        &mut self,
        now: Instant,
        data: &[u8],
        source: SocketAddr,
    ) -> Result<(), ParseError> {
        #[cfg(test)]
        if data == PANIC_PROBE {
            panic!("the test's panic probe");
        }
        let parsed = self.layer.handle_datagram(now, data, source);
        self.drive(now);
        parsed
    }

    /// The next datagram to send.
    #[must_use]
    pub(crate) fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.sends.pop_front()
    }

    /// Whether a shutdown finished (every call ended and registration removed, or the time
    /// for it ran out): the shell sends what is left and stops.
    pub(crate) fn is_stopped(&mut self, now: Instant) -> bool {
        let done = match &self.shutdown {
            Some((_, deadline)) => {
                (self.regs.is_empty() && self.calls.is_empty()) || now >= *deadline
            }
            None => false,
        };
        if done {
            if let Some((done, _)) = self.shutdown.take() {
                let _ = done.send(());
            }
        }
        done
    }

    /// Runs the cores until nothing more happens; what they send waits in the outbox.
    fn drive(&mut self, now: Instant) {
        let std_now = now;
        self.layer.handle_timeout(std_now);
        for (key, e) in self.regs.iter_mut() {
            if e.release_at.is_some_and(|t| t <= now) {
                e.release_at = None;
                tracing::info!(registration = %key.aor(), "last user gone: unregistering");
                e.reg.unregister(std_now);
            }
            e.reg.handle_timeout(std_now);
        }
        for c in self.calls.values_mut() {
            c.call.handle_timeout(std_now);
        }
        for _ in 0..64 {
            let mut progressed = false;
            while let Some(ev) = self.layer.poll_event() {
                progressed = true;
                self.tx_event(std_now, ev);
            }
            for (key, e) in self.regs.iter_mut() {
                while let Some(out) = e.reg.poll_request() {
                    progressed = true;
                    match self.layer.send_request(std_now, out.data, e.target) {
                        Ok(id) => {
                            self.owners
                                .insert(id, Owner::Registration(key.clone(), out.purpose));
                        }
                        Err(err) => tracing::error!("cannot start a SIP transaction: {err}"),
                    }
                }
                while let Some(s) = e.reg.poll_event() {
                    progressed = true;
                    e.accepted |= matches!(s, Status::Registered { .. });
                    log_status(key, &s);
                    // Only real changes reach the holders (the first status is already there).
                    e.status.send_if_modified(|cur| {
                        let changed = *cur != s;
                        *cur = s.clone();
                        changed
                    });
                }
            }
            progressed |= self.pump_calls(std_now);
            if !progressed {
                break;
            }
        }
        // Registrations nobody holds that are done, and finished calls: forget them.
        let shutdown = self.shutdown.is_some();
        let done: Vec<RegKey> = self
            .regs
            .iter()
            .filter(|(_, e)| {
                e.reg.is_finished() && (shutdown || (e.refs == 0 && e.release_at.is_none()))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in done {
            if let Some(e) = self.regs.remove(&key) {
                self.contacts.remove(e.reg.contact_user());
                self.count_target(e.target, false);
            }
        }
        let finished: Vec<u64> = self
            .calls
            .iter()
            .filter(|(_, c)| c.call.is_finished() && c.referral.is_none())
            .map(|(id, _)| *id)
            .collect();
        for id in finished {
            self.aliases.retain(|_, to| *to != id);
            if let Some(c) = self.calls.remove(&id) {
                self.dialogs
                    .remove(&(c.call.call_id().to_owned(), c.call.local_tag().to_owned()));
            }
        }
        while let Some(t) = self.layer.poll_transmit() {
            self.sends.push_back((t.dest, t.data));
        }
    }

    /// One more (or one fewer) registration uses `target`; the layer's trusted set follows.
    fn count_target(&mut self, target: SocketAddr, add: bool) {
        let ip = target.ip();
        if add {
            *self.targets.entry(ip).or_default() += 1;
        } else if let Some(n) = self.targets.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.targets.remove(&ip);
            }
        }
        let trusted = self
            .targets
            .keys()
            .chain(&self.settings.trusted_peers)
            .copied()
            .collect();
        self.layer.set_trusted(trusted);
    }

    fn pump_calls(&mut self, now: Instant) -> bool {
        let mut progressed = false;
        let ids: Vec<u64> = self.calls.keys().copied().collect();
        for id in ids {
            let Some(c) = self.calls.get_mut(&id) else {
                continue;
            };
            while let Some(out) = c.call.poll_output() {
                progressed = true;
                match out {
                    call::Output::Request {
                        purpose,
                        data,
                        dest,
                    } => match self.layer.send_request(now, data, dest) {
                        Ok(tx) => {
                            self.owners.insert(tx, Owner::Call(id, purpose));
                        }
                        Err(err) => tracing::error!("cannot start a SIP transaction: {err}"),
                    },
                    call::Output::Respond { tx, data } => {
                        if let Err(err) = self.layer.respond(now, tx, data) {
                            tracing::debug!("cannot respond: {err}");
                        }
                    }
                    call::Output::Send { dest, data } => self.sends.push_back((dest, data)),
                }
            }
            let mut end_consult = None;
            let mut referral_events = Vec::new();
            while let Some(ev) = c.call.poll_event() {
                progressed = true;
                if let CallEvent::Ended { reason, status, .. } = &ev {
                    tracing::info!(call = %c.call.call_id(), reason = reason.code(), status, "call ended");
                    if *reason == call::EndReason::Transferred {
                        // The target should BYE the replaced dialog itself (RFC 5589 §7); end it
                        // here too in case it does not (a 481 then is harmless).
                        end_consult = c.consult.take();
                    }
                }
                if c.replacing.is_some() {
                    referral_events.push(ev);
                    continue;
                }
                if c.referral.is_some() && matches!(ev, CallEvent::Ended { .. }) {
                    // The referrer hung up after its REFER (allowed): the page keeps its call
                    // while the target is being called.
                    c.held_end = Some(ev);
                    continue;
                }
                match (ev, c.deliver_to.take()) {
                    (
                        CallEvent::Incoming {
                            from,
                            asserted,
                            offer,
                            headers,
                        },
                        Some(key),
                    ) => {
                        let handle = CallHandle {
                            armed: true,
                            id,
                            call_id: c.public_id.clone(),
                            sip_call_id: c.call.call_id().to_owned(),
                            events: match c.events.take() {
                                Some(tx) => {
                                    let (new_tx, rx) = mpsc::unbounded_channel();
                                    drop(tx);
                                    c.events = Some(new_tx);
                                    rx
                                }
                                None => mpsc::unbounded_channel().1,
                            },
                            cmds: self.cmds.clone(),
                        };
                        let mut pending = Some(IncomingCall {
                            call: handle,
                            from,
                            asserted,
                            offer,
                            headers,
                        });
                        if let Some(e) = self.regs.get_mut(&key) {
                            e.incoming.retain(|tx| !tx.is_closed());
                            for tx in e.incoming.iter().rev() {
                                let Some(offered) = pending.take() else { break };
                                if let Err(mpsc::error::SendError(back)) = tx.send(offered) {
                                    pending = Some(back);
                                }
                            }
                        }
                        if let Some(undelivered) = pending {
                            // Nobody to ring (all pages closed during the grace period). Reject
                            // before the handle's drop asks for a hang-up (then a no-op).
                            c.call.reject(480, "Temporarily Unavailable");
                            drop(undelivered);
                        }
                    }
                    (ev, deliver_to) => {
                        c.deliver_to = deliver_to;
                        if let Some(tx) = &c.events {
                            let _ = tx.send(ev);
                        }
                    }
                }
            }
            if let Some(b) = end_consult.and_then(|b| self.calls.get_mut(&b)) {
                b.call.hangup(now);
                progressed = true;
            }
            for ev in referral_events {
                self.referral_event(now, id, ev);
            }
        }
        progressed
    }

    fn tx_event(&mut self, now: Instant, ev: Event) {
        match ev {
            Event::Response { id, response } => {
                let Some(owner) = self.owners.get(&id).cloned() else {
                    // A 2xx retransmission in the INVITE client transaction's Accepted state
                    // (our ACK was lost, RFC 6026 §8.4): the dialog ACKs it again (RFC 3261
                    // §13.2.2.4). Its owner was released with the first 2xx.
                    if response.method() == "INVITE"
                        && response.status().is_some_and(|s| (200..300).contains(&s))
                    {
                        self.stray(&response);
                    }
                    return;
                };
                let final_ = response.status().is_some_and(|c| c >= 200);
                if final_ {
                    self.owners.remove(&id);
                }
                tracing::debug!(
                    status = response.status(),
                    method = response.method(),
                    "SIP response"
                );
                match owner {
                    Owner::Registration(key, purpose) => {
                        if let Some(e) = self.regs.get_mut(&key) {
                            e.reg.handle_response(now, purpose, &response);
                        }
                    }
                    Owner::Call(cid, purpose) => {
                        if let Some(c) = self.calls.get_mut(&cid) {
                            c.call.handle_response(now, purpose, &response);
                        }
                    }
                }
            }
            Event::Timeout { id } => match self.owners.remove(&id) {
                Some(Owner::Registration(key, purpose)) => {
                    if let Some(e) = self.regs.get_mut(&key) {
                        e.reg.handle_tx_timeout(now, purpose);
                    }
                }
                Some(Owner::Call(cid, purpose)) => {
                    if let Some(c) = self.calls.get_mut(&cid) {
                        c.call.handle_tx_timeout(purpose);
                    }
                }
                None => {}
            },
            Event::Request {
                id,
                request,
                source,
            } => self.request(now, id, &request, source),
            Event::Stateless { request, reply_to } => self.stateless(&request, reply_to),
            Event::Stray { message, .. } => self.stray(&message),
            Event::AckTimeout { .. } => {}
        }
    }

    fn dialog_of(&self, call_id: Option<&str>, tag: Option<&str>) -> Option<u64> {
        self.dialogs
            .get(&(call_id?.to_owned(), tag?.to_owned()))
            .copied()
    }

    /// ACKs for our 2xx, and 2xx retransmissions after the INVITE transaction ended.
    fn stray(&mut self, msg: &Message) {
        if msg.is_request() && msg.method() == "ACK" {
            if let Some(id) = self.dialog_of(msg.call_id(), msg.to_tag()) {
                if let Some(c) = self.calls.get_mut(&id) {
                    c.call.handle_ack();
                }
            }
        } else if msg.status().is_some_and(|s| (200..300).contains(&s)) && msg.method() == "INVITE"
        {
            if let Some(id) = self.dialog_of(msg.call_id(), msg.from_tag()) {
                if let Some(c) = self.calls.get_mut(&id) {
                    c.call.handle_stray_2xx(msg);
                }
            }
        }
    }

    /// An out-of-dialog OPTIONS (a keepalive or a capability query): 200 with what we allow,
    /// no transaction kept.
    fn stateless(&mut self, req: &Message, reply_to: SocketAddr) {
        let tag = self.layer.stateless_tag(req);
        let b = response_to(req, 200, "OK", Some(&tag)).header("Allow", ALLOW);
        self.layer.send_stateless(reply_to, b.build());
    }

    fn respond(&mut self, now: Instant, id: TxId, req: &Message, code: u16, reason: &str) {
        let tag = self.layer.new_tag();
        let mut b = response_to(req, code, reason, Some(&tag));
        if code == 200 || code == 501 {
            b = b.header("Allow", ALLOW);
        }
        if let Err(e) = self.layer.respond(now, id, b.build()) {
            tracing::debug!("cannot answer: {e}");
        }
    }

    fn request(&mut self, now: Instant, id: TxId, req: &Message, source: SocketAddr) {
        if req.unknown_method().is_some() {
            return self.respond(now, id, req, 501, "Not Implemented");
        }
        let method = req.method();
        // In-dialog requests carry our tag in To.
        if req.to_tag().is_some() {
            match self
                .dialog_of(req.call_id(), req.to_tag())
                .and_then(|d| self.calls.get_mut(&d))
            {
                Some(c) => c.call.handle_request(now, id, req),
                None => self.respond(now, id, req, 481, "Call/Transaction Does Not Exist"),
            }
            return;
        }
        match method {
            "CANCEL" => {
                let target = self
                    .calls
                    .iter_mut()
                    .find(|(_, c)| {
                        c.call.role() == call::Role::Inbound
                            && Some(c.call.call_id()) == req.call_id()
                            && c.call.remote_tag() == req.from_tag()
                    })
                    .map(|(k, _)| *k);
                match target.and_then(|t| self.calls.get_mut(&t)) {
                    Some(c) => c.call.handle_request(now, id, req),
                    None => self.respond(now, id, req, 481, "Call/Transaction Does Not Exist"),
                }
            }
            "OPTIONS" => self.respond(now, id, req, 200, "OK"),
            "INVITE" => self.incoming(now, id, req, source),
            _ => self.respond(now, id, req, 405, "Method Not Allowed"),
        }
    }

    fn incoming(&mut self, now: Instant, id: TxId, req: &Message, source: SocketAddr) {
        let user = match req.start_line() {
            StartLine::Request { uri, .. } => uri
                .strip_prefix("sip:")
                .and_then(|u| u.split_once('@'))
                .map(|(u, _)| u.to_owned()),
            StartLine::Response { .. } => None,
        };
        let key = user
            .and_then(|u| self.contacts.get(&u))
            .filter(|k| self.regs.get(*k).is_some_and(|e| e.accepted))
            .cloned();
        let Some(key) = key else {
            return self.respond(now, id, req, 404, "Not Found");
        };
        if self.shutdown.is_some() || self.calls.len() >= MAX_CALLS {
            return self.respond(now, id, req, 503, "Service Unavailable");
        }
        let Some((local, account)) = self.local_for(&key) else {
            return self.respond(now, id, req, 404, "Not Found");
        };
        if source.ip() != local.target.ip() && !self.settings.trusted_peers.contains(&source.ip()) {
            tracing::info!(%source, to = %local.aor, "INVITE refused: not from the registrar, the proxy or sip.trusted_peers");
            return self.respond(now, id, req, 403, "Forbidden");
        }
        let busy = self
            .calls
            .values()
            .any(|c| c.reg_key == key && !c.call.is_ended());
        if busy && !self.settings.call_waiting {
            tracing::info!(to = %local.aor, "incoming call refused: agent busy and call waiting is off");
            return self.respond(now, id, req, 486, "Busy Here");
        }
        let Ok(public_id) = public_id() else {
            return self.respond(now, id, req, 500, "Server Internal Error");
        };
        tracing::info!(to = %local.aor, "incoming call");
        let call = Call::incoming(
            local,
            account,
            req.clone(),
            id,
            source,
            self.settings.timers,
            self.ids.next(),
        );
        let (_, _, rx) = self.new_call(call, &key, Some(key.clone()), public_id);
        // The handle's receiver is created when the Incoming event is delivered.
        drop(rx);
    }
}

fn log_status(key: &RegKey, s: &Status) {
    let aor = key.aor();
    match s {
        Status::Registered { expires, count } => {
            tracing::info!(%aor, expires, refreshes = count.saturating_sub(1), "registered")
        }
        Status::Failed {
            status,
            reason,
            retrying,
        } => {
            tracing::warn!(%aor, status, %reason, retrying, "registration failed")
        }
        Status::Unregistered => tracing::info!(%aor, "unregistered"),
        other => tracing::debug!(%aor, status = ?other, "registration status"),
    }
}

#[cfg(test)]
mod tests;
