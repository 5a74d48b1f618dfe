//! The tokio shell around the SIP cores: one task owns the UDP socket, the transaction layer,
//! every registration and every call's dialog. Others hold an [`Endpoint`] (commands in),
//! [`RegistrationHandle`]s (status through a `watch` channel, incoming calls through a queue) and
//! [`CallHandle`]s (commands in, [`CallEvent`]s out). No locks: the task is the only owner.
//!
//! Two handles for the same SIP identity share one registration (reference counted). When the last
//! handle is dropped the registration lingers for a grace period (a page reload must not
//! REGISTER again, providers limit registrations), then unregisters. An incoming call goes to the
//! newest live handle of its registration (the page the agent opened last).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::call::{self, BadDestination, Call, CallEvent, Local, Party, dial_uri};
use super::message::{Message, StartLine, response_to};
use super::registration::{self, Binding, Purpose, Registration, Status};
use super::sdp::AudioSdp;
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
}

/// Why a registration could not be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// The registrar / proxy host did not resolve.
    #[error("cannot resolve SIP server {host}: {why}")]
    Resolve {
        /// host:port looked up.
        host: String,
        /// Resolver error.
        why: String,
    },
    /// Too many registrations.
    #[error("registration limit reached ({0})")]
    TooMany(usize),
    /// The endpoint task is gone (shutting down).
    #[error("SIP endpoint is shutting down")]
    Closed,
    /// The dialled destination is not usable.
    #[error("{0}")]
    BadDestination(#[from] BadDestination),
    /// The registration this call needs is gone.
    #[error("not registered")]
    NotRegistered,
    /// Too many calls.
    #[error("call limit reached ({0})")]
    TooManyCalls(usize),
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
}

enum Command {
    Acquire {
        account: Box<SipAccount>,
        target: SocketAddr,
        via_host: String,
        fixed: bool,
        reply: oneshot::Sender<Result<Acquired, EndpointError>>,
    },
    Release {
        key: String,
    },
    Dial {
        key: String,
        to: String,
        sdp: String,
        reply: oneshot::Sender<Result<CallHandle, EndpointError>>,
    },
    Call {
        id: u64,
        action: CallAction,
    },
    Shutdown {
        done: oneshot::Sender<()>,
    },
    Snapshot {
        reply: oneshot::Sender<crate::metrics::SipSnapshot>,
    },
}

struct Acquired {
    key: String,
    status: watch::Receiver<Status>,
    incoming: mpsc::UnboundedReceiver<IncomingCall>,
}

#[derive(Debug)]
enum CallAction {
    Answer(String),
    Reject(u16, String),
    Hangup,
    /// Hang up an established call whose media stopped.
    MediaTimeout,
    Hold(bool),
    Dtmf(String),
    Transfer(String),
    /// Attended transfer: replace call `.0` (the consultation) at this call's far end.
    CompleteTransfer(u64),
    /// The far end's REFER: follow it (call the target in its place) or decline it.
    FollowRefer(bool),
}

/// Most calls at once per endpoint.
pub const MAX_CALLS: usize = 10_000;

/// A running SIP endpoint.
#[derive(Clone)]
pub struct Endpoint {
    cmds: mpsc::UnboundedSender<Command>,
    local: SocketAddr,
    settings: Arc<Settings>,
    stats: Arc<Stats>,
}

/// One holder's share of a registration; dropping it releases the share.
pub struct RegistrationHandle {
    key: String,
    status: watch::Receiver<Status>,
    incoming: mpsc::UnboundedReceiver<IncomingCall>,
    cmds: mpsc::UnboundedSender<Command>,
}

impl RegistrationHandle {
    /// The current status.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// Waits for the next status change; `None` when the endpoint is gone.
    pub async fn changed(&mut self) -> Option<Status> {
        self.status.changed().await.ok()?;
        Some(self.status.borrow_and_update().clone())
    }

    /// Waits until `pred` holds for the status (checked now and at every change).
    pub async fn wait_for(&mut self, mut pred: impl FnMut(&Status) -> bool) -> Option<Status> {
        loop {
            {
                let s = self.status.borrow_and_update();
                if pred(&s) {
                    return Some(s.clone());
                }
            }
            self.status.changed().await.ok()?;
        }
    }

    /// The next incoming call for this registration (already ringing at the caller).
    pub async fn next_incoming(&mut self) -> Option<IncomingCall> {
        self.incoming.recv().await
    }

    /// Whichever comes first: a status change or an incoming call. `None` when the endpoint is
    /// gone.
    pub async fn next(&mut self) -> Option<RegistrationEvent> {
        tokio::select! {
            changed = self.status.changed() => {
                changed.ok()?;
                Some(RegistrationEvent::Status(self.status.borrow_and_update().clone()))
            }
            incoming = self.incoming.recv() => incoming.map(|i| RegistrationEvent::Incoming(Box::new(i))),
        }
    }
}

impl Drop for RegistrationHandle {
    fn drop(&mut self) {
        let _ = self.cmds.send(Command::Release {
            key: std::mem::take(&mut self.key),
        });
    }
}

/// What a registration reports to its holder.
pub enum RegistrationEvent {
    /// The registration's status changed.
    Status(Status),
    /// A call for the agent.
    Incoming(Box<IncomingCall>),
}

/// An incoming call offered to the agent.
pub struct IncomingCall {
    /// Control of the call.
    pub call: CallHandle,
    /// The caller as From says.
    pub from: Party,
    /// The caller as the network asserts (P-Asserted-Identity).
    pub asserted: Option<Party>,
    /// The caller's SDP offer.
    pub offer: Option<AudioSdp>,
}

/// Control of one call; dropping it hangs the call up.
pub struct CallHandle {
    /// Hang up on drop (false once [`split`](Self::split) handed that duty to a `CallControl`).
    armed: bool,
    id: u64,
    call_id: String,
    sip_call_id: String,
    events: mpsc::UnboundedReceiver<CallEvent>,
    cmds: mpsc::UnboundedSender<Command>,
}

impl CallHandle {
    /// The SIP Call-ID.
    pub fn sip_call_id(&self) -> &str {
        &self.sip_call_id
    }

    /// callgate's own id for the call (`c-` and 16 hex digits): unique, stable, not derived from
    /// anything a peer sent; used by the API, call history and recordings.
    pub fn call_id(&self) -> &str {
        &self.call_id
    }

    /// The next event; `None` once the call is over and all events were read.
    pub async fn next_event(&mut self) -> Option<CallEvent> {
        self.events.recv().await
    }

    fn act(&self, action: CallAction) {
        let _ = self.cmds.send(Command::Call {
            id: self.id,
            action,
        });
    }

    /// Answers an incoming call with our SDP.
    pub fn answer(&self, sdp: String) {
        self.act(CallAction::Answer(sdp));
    }

    /// Rejects an incoming call with `code` (486, 603, ...).
    pub fn reject(&self, code: u16, reason: &str) {
        self.act(CallAction::Reject(code, reason.to_owned()));
    }

    /// Hangs up (CANCEL, BYE or decline, whatever the state needs).
    pub fn hangup(&self) {
        self.act(CallAction::Hangup);
    }

    /// Puts the far end on hold (re-INVITE, our SDP `sendonly`); see [`CallEvent::Hold`].
    pub fn hold(&self) {
        self.act(CallAction::Hold(true));
    }

    /// Resumes after [`hold`](Self::hold).
    pub fn unhold(&self) {
        self.act(CallAction::Hold(false));
    }

    /// Blind transfer: asks the far end to call `to` (extension, number or SIP URI); progress
    /// comes as [`CallEvent::Transfer`].
    pub fn transfer(&self, to: &str) {
        self.act(CallAction::Transfer(to.to_owned()));
    }

    /// Attended transfer: asks this call's far end to take over `consult` (a call to the
    /// transfer target, usually made while this one was held). On success both legs end.
    pub fn complete_transfer(&self, consult: &CallHandle) {
        self.act(CallAction::CompleteTransfer(consult.id));
    }

    /// Sends DTMF digits by SIP INFO (`application/dtmf-relay`), in order.
    pub fn dtmf_info(&self, digits: &str) {
        self.act(CallAction::Dtmf(digits.to_owned()));
    }
}

impl Drop for CallHandle {
    fn drop(&mut self) {
        if self.armed {
            self.act(CallAction::Hangup);
        }
    }
}

/// The command half of a [`CallHandle`] (clone-free, hangs up on drop), for owners that read
/// events in another task.
pub struct CallControl {
    id: u64,
    call_id: String,
    cmds: mpsc::UnboundedSender<Command>,
}

impl CallHandle {
    /// Splits into commands and events.
    pub fn split(mut self) -> (CallControl, mpsc::UnboundedReceiver<CallEvent>) {
        let (_, dead) = mpsc::unbounded_channel();
        let events = std::mem::replace(&mut self.events, dead);
        let control = CallControl {
            id: self.id,
            call_id: std::mem::take(&mut self.call_id),
            cmds: self.cmds.clone(),
        };
        // The control now owns the hang-up duty.
        self.armed = false;
        (control, events)
    }
}

impl CallControl {
    fn act(&self, action: CallAction) {
        let _ = self.cmds.send(Command::Call {
            id: self.id,
            action,
        });
    }

    /// callgate's id for the call.
    pub fn call_id(&self) -> &str {
        &self.call_id
    }

    /// See [`CallHandle::hangup`].
    pub fn hangup(&self) {
        self.act(CallAction::Hangup);
    }

    /// See [`CallHandle::answer`].
    pub fn answer(&self, sdp: String) {
        self.act(CallAction::Answer(sdp));
    }

    /// See [`CallHandle::reject`].
    pub fn reject(&self, code: u16, reason: &str) {
        self.act(CallAction::Reject(code, reason.to_owned()));
    }

    /// A second, non-owning handle for the call's media side: it can send DTMF by INFO and hang
    /// up on a media timeout, but dropping it does not end the call.
    pub fn commander(&self) -> CallCommander {
        CallCommander {
            id: self.id,
            cmds: self.cmds.clone(),
        }
    }

    /// See [`CallHandle::hold`].
    pub fn hold(&self) {
        self.act(CallAction::Hold(true));
    }

    /// See [`CallHandle::unhold`].
    pub fn unhold(&self) {
        self.act(CallAction::Hold(false));
    }

    /// See [`CallHandle::dtmf_info`].
    pub fn dtmf_info(&self, digits: &str) {
        self.act(CallAction::Dtmf(digits.to_owned()));
    }

    /// See [`CallHandle::transfer`].
    pub fn transfer(&self, to: &str) {
        self.act(CallAction::Transfer(to.to_owned()));
    }

    /// See [`CallHandle::complete_transfer`].
    pub fn complete_transfer(&self, consult: &CallControl) {
        self.act(CallAction::CompleteTransfer(consult.id));
    }
}

/// What the media side of a call may ask of it (see [`CallControl::commander`]).
#[derive(Clone)]
pub struct CallCommander {
    id: u64,
    cmds: mpsc::UnboundedSender<Command>,
}

impl CallCommander {
    fn act(&self, action: CallAction) {
        let _ = self.cmds.send(Command::Call {
            id: self.id,
            action,
        });
    }

    /// See [`CallHandle::dtmf_info`].
    pub fn dtmf_info(&self, digits: &str) {
        self.act(CallAction::Dtmf(digits.to_owned()));
    }

    /// Hangs up an established call because its media stopped (it ends with
    /// [`EndReason::MediaTimeout`](crate::sip::call::EndReason::MediaTimeout)).
    pub fn hangup_media_timeout(&self) {
        self.act(CallAction::MediaTimeout);
    }

    /// Answers the far end's REFER ([`CallEvent::Referred`]). Followed: callgate calls the
    /// target with the same media, reports [`CallEvent::ReferProgress`], and when the target
    /// answers the call carries on with it ([`CallEvent::Replaced`]: same call id, same
    /// control). Declined: 603, and the call goes on.
    pub fn follow_refer(&self, accept: bool) {
        self.act(CallAction::FollowRefer(accept));
    }
}

impl Drop for CallControl {
    fn drop(&mut self) {
        self.act(CallAction::Hangup);
    }
}

fn registration_key(a: &SipAccount) -> String {
    format!(
        "{}@{}|{}|{}|{}",
        a.login,
        a.domain,
        a.auth_name,
        a.outbound_proxy
            .as_ref()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        a.port
    )
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // Falls back to a clock-derived value: these are identifiers, not keys.
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return t ^ 0x9e37_79b9_7f4a_7c15;
    }
    u64::from_le_bytes(b)
}

impl Endpoint {
    /// Binds the socket and starts the task.
    pub async fn bind(settings: Settings) -> std::io::Result<Endpoint> {
        let socket = UdpSocket::bind(settings.listen).await?;
        let local = socket.local_addr()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let settings = Arc::new(settings);
        let stats = Arc::new(Stats::default());
        let task = Task {
            socket,
            layer: TransactionLayer::new(settings.timers, random_u64()),
            regs: HashMap::new(),
            calls: HashMap::new(),
            dialogs: HashMap::new(),
            owners: HashMap::new(),
            sends: Vec::new(),
            settings: settings.clone(),
            stats: stats.clone(),
            cmds: tx.clone(),
            shutdown: None,
            next_call: 1,
            aliases: HashMap::new(),
        };
        tokio::spawn(task.run(rx));
        Ok(Endpoint {
            cmds: tx,
            local,
            settings,
            stats,
        })
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Where requests for `account` go (RFC 3263, UDP only): the outbound proxy, else the domain;
    /// when no port was given and the host is a name, its `_sip._udp` SRV records first, then
    /// A/AAAA (preferring our socket's address family).
    pub async fn resolve(&self, account: &SipAccount) -> Result<SocketAddr, EndpointError> {
        let (host, port, explicit) = match &account.outbound_proxy {
            Some(p) => (
                p.host.as_str().to_owned(),
                p.port.unwrap_or(account.port),
                p.port.is_some() || account.port_explicit,
            ),
            None => (
                account.domain.as_str().to_owned(),
                account.port,
                account.port_explicit,
            ),
        };
        let bare = host.trim_matches(['[', ']']).to_owned();
        if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
            return Ok(SocketAddr::new(ip, port));
        }
        if !explicit {
            if let Some(server) = self
                .settings
                .dns_server
                .or_else(super::dns::system_nameserver)
            {
                let name = format!("_sip._udp.{bare}");
                match super::dns::lookup_srv(server, &name, Duration::from_secs(2)).await {
                    Ok(records) => {
                        let ordered = super::dns::order(records, |total| {
                            (random_u64() % (u64::from(total) + 1)) as u32
                        });
                        for r in ordered {
                            if let Ok(addr) = self.lookup(&r.target, r.port).await {
                                tracing::debug!(%name, target = %r.target, %addr, "SIP server from DNS SRV");
                                return Ok(addr);
                            }
                        }
                    }
                    Err(e) => tracing::debug!(%name, "no SRV answer ({e}); using A/AAAA"),
                }
            }
        }
        self.lookup(&bare, port).await
    }

    async fn lookup(&self, host: &str, port: u16) -> Result<SocketAddr, EndpointError> {
        let name = format!("{host}:{port}");
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| EndpointError::Resolve {
                host: name.clone(),
                why: e.to_string(),
            })?
            .collect();
        let same_family = addrs
            .iter()
            .find(|a| a.is_ipv4() == self.local.is_ipv4())
            .copied();
        same_family
            .or_else(|| addrs.first().copied())
            .ok_or(EndpointError::Resolve {
                host: name,
                why: "no address".into(),
            })
    }

    /// Registers `account` (or joins its existing registration) and returns a handle.
    pub async fn register(&self, account: SipAccount) -> Result<RegistrationHandle, EndpointError> {
        let target = self.resolve(&account).await?;
        let (via_host, fixed) = match &self.settings.public_address {
            Some(hp) => (
                format!("{}:{}", hp.host, hp.port.unwrap_or(self.local.port())),
                true,
            ),
            None => (self.local_toward(target).await.to_string(), false),
        };
        let (reply, rx) = oneshot::channel();
        self.cmds
            .send(Command::Acquire {
                account: Box::new(account),
                target,
                via_host,
                fixed,
                reply,
            })
            .map_err(|_| EndpointError::Closed)?;
        let acquired = rx.await.map_err(|_| EndpointError::Closed)??;
        Ok(RegistrationHandle {
            key: acquired.key,
            status: acquired.status,
            incoming: acquired.incoming,
            cmds: self.cmds.clone(),
        })
    }

    /// Calls `to` (extension, number or SIP URI) as the registration's account, offering `sdp`.
    pub async fn dial(
        &self,
        reg: &RegistrationHandle,
        to: &str,
        sdp: String,
    ) -> Result<CallHandle, EndpointError> {
        let (reply, rx) = oneshot::channel();
        self.cmds
            .send(Command::Dial {
                key: reg.key.clone(),
                to: to.to_owned(),
                sdp,
                reply,
            })
            .map_err(|_| EndpointError::Closed)?;
        rx.await.map_err(|_| EndpointError::Closed)?
    }

    /// Our address as seen from the interface that routes to `target` (when bound to 0.0.0.0).
    async fn local_toward(&self, target: SocketAddr) -> SocketAddr {
        if !self.local.ip().is_unspecified() {
            return self.local;
        }
        let probe = async {
            let s = UdpSocket::bind(SocketAddr::new(self.local.ip(), 0))
                .await
                .ok()?;
            s.connect(target).await.ok()?;
            s.local_addr().ok()
        };
        match probe.await {
            Some(a) => SocketAddr::new(a.ip(), self.local.port()),
            None => self.local,
        }
    }

    /// Calls and registrations right now, and the datagram counters (for metrics and the
    /// shutdown drain).
    pub async fn snapshot(&self) -> crate::metrics::SipSnapshot {
        let (reply, rx) = oneshot::channel();
        if self.cmds.send(Command::Snapshot { reply }).is_err() {
            return crate::metrics::SipSnapshot::default();
        }
        rx.await.unwrap_or_default()
    }

    /// Hangs up every call, unregisters everything (bounded by Timer F) and stops the task.
    pub async fn shutdown(&self) {
        let (done, rx) = oneshot::channel();
        if self.cmds.send(Command::Shutdown { done }).is_ok() {
            let _ = rx.await;
        }
    }
}

struct Entry {
    reg: Registration,
    target: SocketAddr,
    refs: usize,
    release_at: Option<Instant>,
    status: watch::Sender<Status>,
    /// One queue per live handle, newest last.
    incoming: Vec<mpsc::UnboundedSender<IncomingCall>>,
}

struct CallEntry {
    call: Call,
    /// callgate's own call id.
    public_id: String,
    /// The registration the call belongs to.
    reg_key: String,
    /// Attended transfer in progress: the consultation call to end with this one.
    consult: Option<u64>,
    events: Option<mpsc::UnboundedSender<CallEvent>>,
    /// The registration key, until the Incoming event is delivered.
    deliver_to: Option<String>,
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
    Registration(String, Purpose),
    Call(u64, call::Purpose),
}

struct Task {
    socket: UdpSocket,
    layer: TransactionLayer,
    regs: HashMap<String, Entry>,
    calls: HashMap<u64, CallEntry>,
    /// (Call-ID, our tag) → call.
    dialogs: HashMap<(String, String), u64>,
    owners: HashMap<TxId, Owner>,
    /// Datagrams to send outside transactions.
    sends: Vec<(SocketAddr, Vec<u8>)>,
    settings: Arc<Settings>,
    stats: Arc<Stats>,
    cmds: mpsc::UnboundedSender<Command>,
    shutdown: Option<(oneshot::Sender<()>, Instant)>,
    next_call: u64,
    /// Calls replaced by a followed transfer → the call that carries on for them.
    aliases: HashMap<u64, u64>,
}

impl Task {
    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Command>) {
        let mut buf = vec![0u8; super::message::MAX_MESSAGE_BYTES + 1];
        let mut cmds_open = true;
        loop {
            self.pump(Instant::now()).await;
            if let Some((_, deadline)) = &self.shutdown {
                if (self.regs.is_empty() && self.calls.is_empty()) || Instant::now() >= *deadline {
                    if let Some((done, _)) = self.shutdown.take() {
                        let _ = done.send(());
                    }
                    tracing::info!("SIP endpoint stopped");
                    return;
                }
            }
            let deadline = self.next_deadline();
            tokio::select! {
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok((n, src)) => {
                        self.stats.received.fetch_add(1, Ordering::Relaxed);
                        let data = buf.get(..n).unwrap_or_default();
                        if tracing::enabled!(tracing::Level::DEBUG) {
                            let line = data.split(|b| *b == b'\r').next().unwrap_or_default();
                            tracing::debug!(%src, "SIP in: {}", String::from_utf8_lossy(line));
                        }
                        if let Err(e) = self.layer.handle_datagram(now_std(), data, src) {
                            if e != super::message::ParseError::Keepalive {
                                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                                tracing::debug!(%src, error = e.code(), "dropped malformed SIP datagram: {e}");
                            }
                        }
                    }
                    Err(e) => tracing::debug!("SIP socket receive error: {e}"),
                },
                cmd = cmds.recv(), if cmds_open => match cmd {
                    Some(c) => self.command(c),
                    None => {
                        // Every Endpoint and handle is gone: unregister and stop.
                        cmds_open = false;
                        self.begin_shutdown();
                    }
                },
                () = sleep_until(deadline) => {}
            }
        }
    }

    fn begin_shutdown(&mut self) {
        let now = Instant::now();
        for c in self.calls.values_mut() {
            c.call.hangup(now.into_std());
        }
        for e in self.regs.values_mut() {
            e.reg.unregister(now.into_std());
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

    fn command(&mut self, cmd: Command) {
        let now = Instant::now();
        match cmd {
            Command::Acquire {
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
                let key = registration_key(&account);
                let (in_tx, in_rx) = mpsc::unbounded_channel();
                if let Some(e) = self.regs.get_mut(&key) {
                    e.refs += 1;
                    e.release_at = None;
                    e.target = target;
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
                        e.reg.start(now.into_std());
                    }
                    let _ = reply.send(Ok(Acquired {
                        key,
                        status: e.status.subscribe(),
                        incoming: in_rx,
                    }));
                    return;
                }
                if self.regs.len() >= self.settings.max_registrations {
                    let _ =
                        reply.send(Err(EndpointError::TooMany(self.settings.max_registrations)));
                    return;
                }
                let id = random_u64();
                let binding = Binding {
                    via_host,
                    contact_user: format!("{}-{:08x}", account.login, id as u32),
                    call_id: format!("{:016x}@callgate", random_u64()),
                    from_tag: format!("{:08x}", (id >> 32) as u32),
                    fixed_public_address: fixed,
                };
                tracing::info!(aor = %account.aor(), %target, "registering");
                let mut reg = Registration::new(
                    account,
                    self.settings.registration.clone(),
                    binding,
                    random_u64(),
                );
                reg.start(now.into_std());
                let (status, rx) = watch::channel(reg.status().clone());
                self.regs.insert(
                    key.clone(),
                    Entry {
                        reg,
                        target,
                        refs: 1,
                        release_at: None,
                        status,
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
                reply,
            } => {
                let result = self.dial(&key, &to, sdp);
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
                        n.call.hangup(now.into_std());
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
                        CallAction::Answer(sdp) => c.call.answer(now.into_std(), sdp),
                        CallAction::Reject(code, reason) => c.call.reject(code, &reason),
                        CallAction::Hangup => c.call.hangup(now.into_std()),
                        CallAction::MediaTimeout => c.call.hangup_because(
                            now.into_std(),
                            crate::sip::call::EndReason::MediaTimeout,
                        ),
                        CallAction::Hold(true) => c.call.hold(now.into_std()),
                        CallAction::Hold(false) => c.call.unhold(now.into_std()),
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
                self.begin_shutdown();
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
            random_u64(),
        );
        let (new_id, _, _) = self.new_call(call, &reg_key, None);
        if let Some(n) = self.calls.get_mut(&new_id) {
            n.events = None;
            n.public_id = public_id;
            n.replacing = Some(id);
        }
        if let Some(c) = self.calls.get_mut(&id) {
            c.referral = Some(new_id);
        }
    }

    /// An event of a call placed for a REFER (`new_id`), before it replaces the original:
    /// progress is NOTIFYed to the referrer and reported; the answer moves the original's
    /// owner over to the new call; a failure leaves the original as it was.
    fn referral_event(&mut self, now: std::time::Instant, new_id: u64, ev: CallEvent) {
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

    fn local_for(&self, key: &str) -> Option<(Local, SipAccount)> {
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
        reg_key: &str,
        deliver_to: Option<String>,
    ) -> (u64, String, mpsc::UnboundedReceiver<CallEvent>) {
        let id = self.next_call;
        self.next_call += 1;
        let (tx, rx) = mpsc::unbounded_channel();
        let public_id = format!("c-{:016x}", random_u64());
        self.dialogs
            .insert((call.call_id().to_owned(), call.local_tag().to_owned()), id);
        self.calls.insert(
            id,
            CallEntry {
                call,
                public_id: public_id.clone(),
                reg_key: reg_key.to_owned(),
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

    fn dial(&mut self, key: &str, to: &str, sdp: String) -> Result<CallHandle, EndpointError> {
        if self.shutdown.is_some() {
            return Err(EndpointError::Closed);
        }
        if self.calls.len() >= MAX_CALLS {
            return Err(EndpointError::TooManyCalls(MAX_CALLS));
        }
        let (local, account) = self.local_for(key).ok_or(EndpointError::NotRegistered)?;
        let uri = dial_uri(to, account.domain.as_str())?;
        tracing::info!(from = %local.aor, "dialling");
        let call = Call::outgoing(local, account, uri, sdp, self.settings.timers, random_u64());
        let sip_call_id = call.call_id().to_owned();
        let (id, call_id, events) = self.new_call(call, key, None);
        Ok(CallHandle {
            armed: true,
            id,
            call_id,
            sip_call_id,
            events,
            cmds: self.cmds.clone(),
        })
    }

    fn next_deadline(&self) -> Option<Instant> {
        let to_tokio = |i: std::time::Instant| Instant::from_std(i);
        let mut d = self.layer.poll_timeout().map(to_tokio);
        let mut consider = |t: Instant| d = Some(d.map_or(t, |x: Instant| x.min(t)));
        for e in self.regs.values() {
            for t in [e.reg.poll_timeout().map(to_tokio), e.release_at]
                .into_iter()
                .flatten()
            {
                consider(t);
            }
        }
        for c in self.calls.values() {
            if let Some(t) = c.call.poll_timeout() {
                consider(to_tokio(t));
            }
        }
        if let Some((_, t)) = &self.shutdown {
            consider(*t);
        }
        d
    }

    /// Runs the cores until nothing more happens, then sends what they produced.
    async fn pump(&mut self, now: Instant) {
        let std_now = now.into_std();
        self.layer.handle_timeout(std_now);
        for (key, e) in self.regs.iter_mut() {
            if e.release_at.is_some_and(|t| t <= now) {
                e.release_at = None;
                tracing::info!(registration = %key.split('|').next().unwrap_or_default(), "last user gone: unregistering");
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
        self.regs
            .retain(|_, e| !(e.refs == 0 && e.release_at.is_none() && e.reg.is_finished()));
        if self.shutdown.is_some() {
            self.regs.retain(|_, e| !e.reg.is_finished());
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
            self.sends.push((t.dest, t.data));
        }
        for (dest, data) in std::mem::take(&mut self.sends) {
            self.stats.sent.fetch_add(1, Ordering::Relaxed);
            if tracing::enabled!(tracing::Level::DEBUG) {
                // The start line only: never headers (Authorization) or bodies.
                let line = data.split(|b| *b == b'\r').next().unwrap_or_default();
                tracing::debug!(%dest, "SIP out: {}", String::from_utf8_lossy(line));
            }
            if let Err(e) = self.socket.send_to(&data, dest).await {
                tracing::debug!(%dest, "SIP send failed: {e}");
            }
        }
    }

    fn pump_calls(&mut self, now: std::time::Instant) -> bool {
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
                    call::Output::Send { dest, data } => self.sends.push((dest, data)),
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

    fn tx_event(&mut self, now: std::time::Instant, ev: Event) {
        match ev {
            Event::Response { id, response } => {
                let Some(owner) = self.owners.get(&id).cloned() else {
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

    fn respond(
        &mut self,
        now: std::time::Instant,
        id: TxId,
        req: &Message,
        code: u16,
        reason: &str,
    ) {
        let tag = self.layer.new_tag();
        let mut b = response_to(req, code, reason, Some(&tag));
        if code == 200 || code == 501 {
            b = b.header(
                "Allow",
                "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, REFER, NOTIFY, UPDATE",
            );
        }
        if let Err(e) = self.layer.respond(now, id, b.build()) {
            tracing::debug!("cannot answer: {e}");
        }
    }

    fn request(&mut self, now: std::time::Instant, id: TxId, req: &Message, source: SocketAddr) {
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

    fn incoming(&mut self, now: std::time::Instant, id: TxId, req: &Message, source: SocketAddr) {
        let user = match req.start_line() {
            StartLine::Request { uri, .. } => uri
                .strip_prefix("sip:")
                .and_then(|u| u.split_once('@'))
                .map(|(u, _)| u.to_owned()),
            StartLine::Response { .. } => None,
        };
        let key = user.and_then(|u| {
            self.regs
                .iter()
                .find(|(_, e)| e.reg.contact_user() == u)
                .map(|(k, _)| k.clone())
        });
        let Some(key) = key else {
            return self.respond(now, id, req, 404, "Not Found");
        };
        if self.shutdown.is_some() || self.calls.len() >= MAX_CALLS {
            return self.respond(now, id, req, 503, "Service Unavailable");
        }
        let Some((local, account)) = self.local_for(&key) else {
            return self.respond(now, id, req, 404, "Not Found");
        };
        let busy = self
            .calls
            .values()
            .any(|c| c.reg_key == key && !c.call.is_ended());
        if busy && !self.settings.call_waiting {
            tracing::info!(to = %local.aor, "incoming call refused: agent busy and call waiting is off");
            return self.respond(now, id, req, 486, "Busy Here");
        }
        tracing::info!(to = %local.aor, "incoming call");
        let call = Call::incoming(
            local,
            account,
            req.clone(),
            id,
            source,
            self.settings.timers,
            random_u64(),
        );
        let (_, _, rx) = self.new_call(call, &key, Some(key.clone()));
        // The handle's receiver is created when the Incoming event is delivered.
        drop(rx);
    }
}

fn log_status(key: &str, s: &Status) {
    let aor = key.split('|').next().unwrap_or_default();
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

fn now_std() -> std::time::Instant {
    Instant::now().into_std()
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
