//! The tokio shell around the SIP [user agent](super::ua): one task owns the UDP socket and the
//! UA, moving datagrams, commands and time between them in one select loop. Others hold an
//! [`Endpoint`] (commands in, DNS resolution), [`RegistrationHandle`]s and [`CallHandle`]s
//! (see [`handle`](super::handle)). No locks: the task is the only owner.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::handle::Command;
pub use super::handle::{
    CallCommander, CallControl, CallHandle, EndpointError, IncomingCall, RegistrationEvent,
    RegistrationHandle,
};
use super::ua::UserAgent;
pub use super::ua::{MAX_CALLS, Settings, Stats};
use crate::account::SipAccount;

/// A running SIP endpoint.
#[derive(Clone)]
pub struct Endpoint {
    cmds: mpsc::UnboundedSender<Command>,
    local: SocketAddr,
    settings: Arc<Settings>,
    stats: Arc<Stats>,
}

impl Endpoint {
    /// Binds the socket and starts the task.
    pub async fn bind(settings: Settings) -> std::io::Result<Endpoint> {
        let socket = UdpSocket::bind(settings.listen).await?;
        let local = socket.local_addr()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let settings = Arc::new(settings);
        let stats = Arc::new(Stats::default());
        let ua = UserAgent::new(settings.clone(), stats.clone(), tx.clone())
            .map_err(std::io::Error::other)?;
        tokio::spawn(run(socket, ua, stats.clone(), rx));
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
                        // The weighted pick needs no secrecy: without the OS generator, the
                        // first of the heaviest records.
                        let ordered = super::dns::order(records, |total| {
                            (crate::rand::u64().unwrap_or(0) % (u64::from(total) + 1)) as u32
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
        self.register_for("", account).await
    }

    /// Registers `account` for `app`'s agent, sharing a registration only with logins of the
    /// same app, address of record, digest user, route and password.
    pub async fn register_for(
        &self,
        app: &str,
        account: SipAccount,
    ) -> Result<RegistrationHandle, EndpointError> {
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
                app: app.to_owned(),
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
        self.dial_with(reg, to, sdp, Vec::new()).await
    }

    /// [`dial`](Self::dial) with `headers` added to the INVITE (the app's allowed X- headers,
    /// already checked).
    pub async fn dial_with(
        &self,
        reg: &RegistrationHandle,
        to: &str,
        sdp: String,
        headers: Vec<(String, String)>,
    ) -> Result<CallHandle, EndpointError> {
        let (reply, rx) = oneshot::channel();
        self.cmds
            .send(Command::Dial {
                key: reg.key.clone(),
                to: to.to_owned(),
                sdp,
                headers,
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

/// The task: the socket and the UA, one select loop.
async fn run(
    socket: UdpSocket,
    mut ua: UserAgent,
    stats: Arc<Stats>,
    mut cmds: mpsc::UnboundedReceiver<Command>,
) {
    let mut buf = vec![0u8; super::message::MAX_MESSAGE_BYTES + 1];
    let mut cmds_open = true;
    loop {
        flush(&socket, &mut ua, &stats).await;
        if ua.is_stopped(std::time::Instant::now()) {
            tracing::info!("SIP endpoint stopped");
            return;
        }
        let deadline = ua.poll_timeout().map(Instant::from_std);
        tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok((n, src)) => {
                    stats.received.fetch_add(1, Ordering::Relaxed);
                    let data = buf.get(..n).unwrap_or_default();
                    if tracing::enabled!(tracing::Level::DEBUG) {
                        let line = data.split(|b| *b == b'\r').next().unwrap_or_default();
                        tracing::debug!(%src, "SIP in: {}", String::from_utf8_lossy(line));
                    }
                    let now = std::time::Instant::now();
                    let handled = guarded(&stats, "a datagram", || ua.handle_datagram(now, data, src));
                    if let Some(Err(e)) = handled {
                        if e != super::message::ParseError::Keepalive {
                            stats.malformed.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(%src, error = e.code(), "dropped malformed SIP datagram: {e}");
                        }
                    }
                }
                Err(e) => tracing::debug!("SIP socket receive error: {e}"),
            },
            cmd = cmds.recv(), if cmds_open => match cmd {
                Some(c) => {
                    guarded(&stats, "a command", || ua.handle_command(std::time::Instant::now(), c));
                }
                None => {
                    // Every Endpoint and handle is gone: unregister and stop.
                    cmds_open = false;
                    ua.begin_shutdown(std::time::Instant::now());
                }
            },
            () = sleep_until(deadline) => {
                guarded(&stats, "timers", || ua.handle_timeout(std::time::Instant::now()));
            }
        }
    }
}

/// Runs one step of the UA. A panic there is a bug; it costs that input (a datagram, a command
/// or one timer run), not every registration and call of the process, which is what ending the
/// task would. The UA stays consistent enough to carry on: each step leaves its cores between
/// inputs, and what a half-done step queued is sent or retried like any other output.
fn guarded<T>(stats: &Stats, what: &str, step: impl FnOnce() -> T) -> Option<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(step)) {
        Ok(v) => Some(v),
        Err(_) => {
            stats.panics.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                "SIP endpoint: handling {what} panicked (a bug, see the panic message above); \
                 dropped it and carrying on"
            );
            None
        }
    }
}

/// Sends what the UA has for the wire.
async fn flush(socket: &UdpSocket, ua: &mut UserAgent, stats: &Stats) {
    while let Some((dest, data)) = ua.poll_transmit() {
        stats.sent.fetch_add(1, Ordering::Relaxed);
        if tracing::enabled!(tracing::Level::DEBUG) {
            // The start line only: never headers (Authorization) or bodies.
            let line = data.split(|b| *b == b'\r').next().unwrap_or_default();
            tracing::debug!(%dest, "SIP out: {}", String::from_utf8_lossy(line));
        }
        if let Err(e) = socket.send_to(&data, dest).await {
            tracing::debug!(%dest, "SIP send failed: {e}");
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 15 item 10: a panic while handling one datagram used to end the endpoint's task,
    /// and with it every registration and call of the process. Now that input is dropped,
    /// counted, and the next datagram is answered.
    #[tokio::test]
    async fn a_panic_costs_one_datagram_not_all_sip() {
        let settings = Settings {
            listen: "127.0.0.1:0".parse().unwrap(),
            public_address: None,
            timers: Default::default(),
            registration: Default::default(),
            grace: Duration::from_secs(1),
            max_registrations: 1,
            call_waiting: true,
            dns_server: None,
            min_session_expires: Duration::from_secs(90),
            trusted_peers: Vec::new(),
        };
        let ep = Endpoint::bind(settings).await.unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let me = peer.local_addr().unwrap();
        let options = super::super::message::Builder::request("OPTIONS", "sip:x@127.0.0.1")
            .header("Via", format!("SIP/2.0/UDP {me};branch=z9hG4bKprobe"))
            .header("From", "<sip:t@127.0.0.1>;tag=t")
            .header("To", "<sip:x@127.0.0.1>")
            .header("Call-ID", "probe")
            .header("CSeq", "1 OPTIONS")
            .build();
        let mut buf = [0u8; 4096];
        for round in 0..2 {
            peer.send_to(super::super::ua::PANIC_PROBE, ep.local_addr())
                .await
                .unwrap();
            peer.send_to(&options, ep.local_addr()).await.unwrap();
            let (n, _) = tokio::time::timeout(Duration::from_secs(5), peer.recv_from(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no answer after panic {}", round + 1))
                .unwrap();
            assert!(buf[..n].starts_with(b"SIP/2.0 200"));
        }
        assert_eq!(ep.stats().panics.load(Ordering::Relaxed), 2);
        assert_eq!(ep.snapshot().await.panics, 2);
    }
}
