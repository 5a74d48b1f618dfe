//! The tokio shell around the SIP cores: one task owns the UDP socket, the transaction layer and
//! every registration. Others hold an [`Endpoint`] (commands in) and [`RegistrationHandle`]s
//! (status out, through a `watch` channel). No locks: the task is the only owner.
//!
//! Two handles for the same SIP identity share one registration (reference counted). When the last
//! handle is dropped the registration lingers for a grace period (a page reload must not
//! REGISTER again, providers limit registrations), then unregisters.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::message::{Message, response_to};
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
    /// DNS server for SRV lookups (`None`: the first nameserver of /etc/resolv.conf).
    pub dns_server: Option<SocketAddr>,
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
        reply: oneshot::Sender<Result<(String, watch::Receiver<Status>), EndpointError>>,
    },
    Release {
        key: String,
    },
    Shutdown {
        done: oneshot::Sender<()>,
    },
}

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
}

impl Drop for RegistrationHandle {
    fn drop(&mut self) {
        let _ = self.cmds.send(Command::Release {
            key: std::mem::take(&mut self.key),
        });
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
            owners: HashMap::new(),
            settings: settings.clone(),
            stats: stats.clone(),
            shutdown: None,
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
        let (key, status) = rx.await.map_err(|_| EndpointError::Closed)??;
        Ok(RegistrationHandle {
            key,
            status,
            cmds: self.cmds.clone(),
        })
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

    /// Unregisters everything (bounded by Timer F) and stops the task.
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
}

struct Task {
    socket: UdpSocket,
    layer: TransactionLayer,
    regs: HashMap<String, Entry>,
    owners: HashMap<TxId, (String, Purpose)>,
    settings: Arc<Settings>,
    stats: Arc<Stats>,
    shutdown: Option<(oneshot::Sender<()>, Instant)>,
}

impl Task {
    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Command>) {
        let mut buf = vec![0u8; super::message::MAX_MESSAGE_BYTES + 1];
        loop {
            self.pump(Instant::now()).await;
            if let Some((_, deadline)) = &self.shutdown {
                if self.regs.is_empty() || Instant::now() >= *deadline {
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
                        if let Err(e) = self.layer.handle_datagram(now_std(), data, src) {
                            if e != super::message::ParseError::Keepalive {
                                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                                tracing::debug!(%src, error = e.code(), "dropped malformed SIP datagram");
                            }
                        }
                    }
                    Err(e) => tracing::debug!("SIP socket receive error: {e}"),
                },
                cmd = cmds.recv() => match cmd {
                    Some(c) => self.command(c),
                    None => {
                        // Every Endpoint clone is gone: unregister and stop.
                        self.begin_shutdown();
                    }
                },
                () = sleep_until(deadline) => {}
            }
        }
    }

    fn begin_shutdown(&mut self) {
        let now = Instant::now();
        for e in self.regs.values_mut() {
            e.reg.unregister(now.into_std());
        }
        // Leave time for one unregister transaction (Timer F), no more.
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
                if let Some(e) = self.regs.get_mut(&key) {
                    e.refs += 1;
                    e.release_at = None;
                    e.target = target;
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
                    let _ = reply.send(Ok((key, e.status.subscribe())));
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
                    },
                );
                let _ = reply.send(Ok((key, rx)));
            }
            Command::Release { key } => {
                if let Some(e) = self.regs.get_mut(&key) {
                    e.refs = e.refs.saturating_sub(1);
                    if e.refs == 0 {
                        e.release_at = Some(now + self.settings.grace);
                    }
                }
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

    fn next_deadline(&self) -> Option<Instant> {
        let to_tokio = |i: std::time::Instant| Instant::from_std(i);
        let mut d = self.layer.poll_timeout().map(to_tokio);
        for e in self.regs.values() {
            for t in [e.reg.poll_timeout().map(to_tokio), e.release_at]
                .into_iter()
                .flatten()
            {
                d = Some(d.map_or(t, |x| x.min(t)));
            }
        }
        if let Some((_, t)) = &self.shutdown {
            d = Some(d.map_or(*t, |x| x.min(*t)));
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
                            self.owners.insert(id, (key.clone(), out.purpose));
                        }
                        Err(err) => tracing::error!("cannot start a SIP transaction: {err}"),
                    }
                }
                while let Some(s) = e.reg.poll_event() {
                    progressed = true;
                    log_status(key, &s);
                    let _ = e.status.send(s);
                }
            }
            if !progressed {
                break;
            }
        }
        // Registrations nobody holds that are done: forget them.
        self.regs
            .retain(|_, e| !(e.refs == 0 && e.release_at.is_none() && e.reg.is_finished()));
        if self.shutdown.is_some() {
            self.regs.retain(|_, e| !e.reg.is_finished());
        }
        while let Some(t) = self.layer.poll_transmit() {
            self.stats.sent.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.socket.send_to(&t.data, t.dest).await {
                tracing::debug!(dest = %t.dest, "SIP send failed: {e}");
            }
        }
    }

    fn tx_event(&mut self, now: std::time::Instant, ev: Event) {
        match ev {
            Event::Response { id, response } => {
                let Some((key, purpose)) = self.owners.get(&id).cloned() else {
                    return;
                };
                if response.status().is_some_and(|c| c >= 200) {
                    self.owners.remove(&id);
                }
                tracing::debug!(
                    status = response.status(),
                    method = response.method(),
                    "SIP response"
                );
                if let Some(e) = self.regs.get_mut(&key) {
                    e.reg.handle_response(now, purpose, &response);
                }
            }
            Event::Timeout { id } => {
                if let Some((key, purpose)) = self.owners.remove(&id) {
                    if let Some(e) = self.regs.get_mut(&key) {
                        e.reg.handle_tx_timeout(now, purpose);
                    }
                }
            }
            Event::Request { id, request, .. } => self.request(now, id, &request),
            Event::AckTimeout { .. } | Event::Stray { .. } => {}
        }
    }

    /// Requests outside calls. Calls arrive with the call-control layer; until then an INVITE
    /// for a registered agent is refused with 480.
    fn request(&mut self, now: std::time::Instant, id: TxId, req: &Message) {
        let to_tag = self.layer.new_tag();
        let (code, reason) = if req.unknown_method().is_some() {
            (501, "Not Implemented")
        } else {
            match req.method() {
                "OPTIONS" => (200, "OK"),
                "INVITE" => {
                    let user = match req.start_line() {
                        super::message::StartLine::Request { uri, .. } => uri
                            .strip_prefix("sip:")
                            .and_then(|u| u.split_once('@'))
                            .map(|(u, _)| u.to_owned()),
                        super::message::StartLine::Response { .. } => None,
                    };
                    let known =
                        user.is_some_and(|u| self.regs.values().any(|e| e.reg.contact_user() == u));
                    if known {
                        (480, "Temporarily Unavailable")
                    } else {
                        (404, "Not Found")
                    }
                }
                _ => (481, "Call/Transaction Does Not Exist"),
            }
        };
        tracing::debug!(method = req.method(), code, "answering SIP request");
        let mut b = response_to(req, code, reason, Some(&to_tag));
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
