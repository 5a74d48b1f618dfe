//! The daemon: binds the listeners, logs where it listens, serves until shutdown.

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::TcpListener;

use crate::api;
use crate::config::Config;
use crate::media::rtp_leg::PortPool;
use crate::media::webrtc::{Engine, Settings as RtcSettings};
use crate::sip::endpoint::Endpoint;

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// A listen address could not be bound.
    #[error("cannot listen on {what} {addr}: {source}{hint}")]
    Bind {
        /// Which listener (`http.listen`, ...).
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// The media engine could not start.
    #[error("media engine failed to start: {0}")]
    Media(String),
    /// The storage directory or the call history cannot be used.
    #[error("{0}")]
    Storage(String),
}

fn bind_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            " (is another callgate or service using it? change the port in the config)"
        }
        std::io::ErrorKind::PermissionDenied => " (ports below 1024 need CAP_NET_BIND_SERVICE)",
        std::io::ErrorKind::AddrNotAvailable => " (that IP is not an address of this machine)",
        _ => "",
    }
}

/// Listeners bound but not yet serving: lets callers (and tests using port 0) learn the addresses.
pub struct Bound {
    config: Config,
    http: TcpListener,
    sip: Endpoint,
    webrtc: std::sync::Arc<Engine>,
    rtp_ports: PortPool,
    cdr: crate::cdr::CdrStore,
    demo: Option<(
        crate::demo::DemoPbx,
        std::sync::Arc<crate::demo::DemoAccounts>,
    )>,
}

impl Bound {
    /// Binds every listener the config names.
    pub async fn bind(config: Config) -> Result<Bound, RunError> {
        let addr = config.http.listen;
        let http = TcpListener::bind(addr)
            .await
            .map_err(|source| RunError::Bind {
                what: "http.listen",
                addr,
                hint: bind_hint(&source),
                source,
            })?;
        let sip_addr = config.sip.listen;
        let sip = Endpoint::bind(config.sip.endpoint_settings())
            .await
            .map_err(|source| RunError::Bind {
                what: "sip.listen",
                addr: sip_addr,
                hint: bind_hint(&source),
                source,
            })?;
        let media_addr = SocketAddr::new(config.media.listen_ip, config.media.webrtc_port);
        let webrtc = Engine::new(&RtcSettings {
            bind: media_addr,
            public_ip: config.media.public_ip,
            // Loopback candidates only when the media address is loopback (a laptop or tests).
            loopback: config.media.listen_ip.is_loopback(),
            port_range: config.media.webrtc_ports,
            consent_timeout: crate::media::webrtc::CONSENT_TIMEOUT,
        })
        .await
        .map_err(|e| match e {
            crate::media::webrtc::WebRtcError::Bind { addr, source } => RunError::Bind {
                what: "media.webrtc_port",
                addr,
                hint: bind_hint(&source),
                source,
            },
            other => RunError::Media(other.to_string()),
        })?;
        let rtp_ports = PortPool::new(config.media.rtp_port_min, config.media.rtp_port_max);
        let data = &config.storage.data_dir;
        std::fs::create_dir_all(data).map_err(|e| {
            RunError::Storage(format!(
                "cannot create storage.data_dir {}: {e}",
                data.display()
            ))
        })?;
        let cdr = crate::cdr::CdrStore::open(&data.join("calls.sqlite"))
            .map_err(|e| RunError::Storage(e.to_string()))?;
        let rec = &config.storage.recordings_dir;
        // Calls the last run left going (a crash, SIGKILL, power loss): closed, with recordings.
        match cdr.close_interrupted(Some(rec.clone())).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                calls = n,
                "calls cut off when callgate last stopped are in the history as interrupted"
            ),
            Err(e) => return Err(RunError::Storage(e.to_string())),
        }
        if config.apps.values().any(|a| a.record) {
            std::fs::create_dir_all(rec).map_err(|e| {
                RunError::Storage(format!(
                    "cannot create storage.recordings_dir {}: {e}",
                    rec.display()
                ))
            })?;
        }
        let demo = match &config.demo {
            Some(d) => {
                Some(
                    crate::demo::DemoPbx::bind(d)
                        .await
                        .map_err(|source| RunError::Bind {
                            what: "demo.sip_port",
                            addr: d.sip,
                            hint: bind_hint(&source),
                            source,
                        })?,
                )
            }
            None => None,
        };
        Ok(Bound {
            demo,
            cdr,
            config,
            http,
            sip,
            webrtc: std::sync::Arc::new(webrtc),
            rtp_ports,
        })
    }

    /// The SIP endpoint (registrations).
    pub fn sip(&self) -> &Endpoint {
        &self.sip
    }

    /// The WebRTC engine (browser media).
    pub fn webrtc(&self) -> &Engine {
        &self.webrtc
    }

    /// RTP ports for the SIP side of calls.
    pub fn rtp_ports(&self) -> &PortPool {
        &self.rtp_ports
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.local_addr().ok()
    }

    /// Serves until `shutdown` completes.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), RunError> {
        let http_addr = self.http_addr().unwrap_or(self.config.http.listen);
        let sip_addr = self.sip.local_addr();
        let media_addr = self.webrtc.local_addr();
        tracing::info!(
            http = %http_addr,
            sip = %sip_addr,
            webrtc = %media_addr,
            config = %self.config.source,
            apps = self.config.apps.len(),
            "callgate {} listening: HTTP API at http://{http_addr}/ (health: /healthz), SIP on udp:{sip_addr}, browser media on udp:{media_addr}",
            env!("CARGO_PKG_VERSION"),
        );
        let metrics = std::sync::Arc::new(crate::metrics::Metrics::default());
        let credentials = std::sync::Arc::new(crate::session::credentials::Credentials::new(
            self.config
                .apps
                .iter()
                .flat_map(|(name, app)| app.api_keys.iter().map(move |k| (*k, name.clone()))),
            self.config.admin_keys.iter().copied(),
        ));
        let apps = crate::config::live::LiveApps::new(&self.config, credentials.clone());
        let webhooks = start_webhooks(&self.config, &self.cdr).await?;
        metrics.set_webhooks(webhooks.stats());
        let hub = std::sync::Arc::new(crate::session::hub::Hub::with_webhooks(
            self.config.events,
            webhooks.sinks(),
        ));
        let state = api::http::AppState(std::sync::Arc::new(crate::session::context::Context {
            apps: apps.clone(),
            sip: self.sip.clone(),
            webrtc: self.webrtc.clone(),
            rtp_ports: self.rtp_ports.clone(),
            rtp_bind_ip: self.config.media.listen_ip,
            rtp_public_ip: self
                .config
                .media
                .public_ip
                .unwrap_or(self.config.media.listen_ip),
            bad_tokens: crate::session::limits::BadTokens::default(),
            used_tokens: Default::default(),
            dtmf: self.config.media.dtmf,
            media_timeout: self.config.media.timeout,
            accept_refer: self.config.sip.accept_refer,
            sessions: crate::session::registry::Registry::logging_to(self.cdr.clone()),
            max_sessions_per_agent: self.config.http.max_sessions_per_agent,
            resume: self.config.http.resume,
            heartbeat: self.config.http.heartbeat,
            trusted_proxies: self.config.http.trusted_proxies.clone(),
            hub: hub.clone(),
            cdr: self.cdr.clone(),
            recordings_dir: self.config.storage.recordings_dir.clone(),
            credentials: credentials.clone(),
            metrics: metrics.clone(),
            demo: start_demo(self.demo, http_addr),
        }));
        let sip = self.sip.clone();
        let drain = self.config.drain;
        // On the signal: stop taking logins and calls, let calls go on for up to `drain`, then
        // stop serving; what is left is hung up below.
        let drained = async move {
            shutdown.await;
            crate::sdnotify::notify("STOPPING=1");
            metrics
                .draining
                .store(true, std::sync::atomic::Ordering::Relaxed);
            let deadline = tokio::time::Instant::now() + drain;
            let calls = sip.snapshot().await.calls;
            if calls > 0 {
                tracing::info!(
                    calls,
                    "shutting down: letting calls finish for up to {}s",
                    drain.as_secs()
                );
            }
            while tokio::time::Instant::now() < deadline && sip.snapshot().await.calls > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            let left = sip.snapshot().await.calls;
            tracing::info!(
                calls_left = left,
                "shutting down: hanging up what is left, unregistering"
            );
            // CRM event streams end, or serving would wait for them.
            hub.close();
        };
        if let Some(max_age) = self.config.storage.recordings_retention {
            let dir = self.config.storage.recordings_dir.clone();
            tokio::spawn(async move {
                let mut hourly = tokio::time::interval(std::time::Duration::from_secs(3600));
                loop {
                    hourly.tick().await;
                    let dir = dir.clone();
                    let gone = tokio::task::spawn_blocking(move || {
                        crate::media::recorder::sweep(&dir, max_age)
                    })
                    .await
                    .unwrap_or(0);
                    if gone > 0 {
                        tracing::info!(
                            gone,
                            "old recordings deleted (storage.recordings_retention_days)"
                        );
                    }
                }
            });
        }
        #[cfg(unix)]
        {
            // SIGHUP: read the configuration again and put its apps in force.
            let live = state.apps.clone();
            tokio::spawn(async move {
                let kind = tokio::signal::unix::SignalKind::hangup();
                let Ok(mut hup) = tokio::signal::unix::signal(kind) else {
                    return;
                };
                while hup.recv().await.is_some() {
                    let _one = live.writing.lock().await;
                    match live.reload() {
                        Ok(done) => tracing::info!(
                            apps = done.apps,
                            "configuration reloaded (SIGHUP): apps and API keys in force; other settings need a restart"
                        ),
                        Err(e) => {
                            tracing::warn!("configuration not reloaded, the running one stays: {e}")
                        }
                    }
                }
            });
        }
        crate::sdnotify::notify("READY=1");
        let limits = api::serve::ConnLimits::new(
            self.config.http.max_connections,
            self.config.http.max_connections_per_ip,
            self.config.http.trusted_proxies.clone(),
            self.config.http.header_timeout,
        );
        api::serve::serve(self.http, api::http::router(state), limits, drained).await;
        // Remove every registration before leaving (bounded by Timer F).
        self.sip.shutdown().await;
        // Webhook events still arriving are stored, to go out at the next start.
        webhooks.close().await;
        // Every call ended above: let their history rows reach the disk.
        self.cdr.flush(std::time::Duration::from_secs(5)).await;
        tracing::info!("callgate stopped");
        Ok(())
    }
}

/// Runs the demo PBX (demo mode only); the accounts the demo tokens are for.
fn start_demo(
    demo: Option<(
        crate::demo::DemoPbx,
        std::sync::Arc<crate::demo::DemoAccounts>,
    )>,
    http: SocketAddr,
) -> Option<std::sync::Arc<crate::demo::DemoAccounts>> {
    let (pbx, accounts) = demo?;
    tracing::info!(
        "demo mode (built-in configuration): open http://{http}/, press \"Try the demo\" and call {} (echo), {} (tone) or {} (it calls you back)",
        crate::demo::pbx::ECHO,
        crate::demo::pbx::TONE,
        crate::demo::pbx::CALLBACK,
    );
    tokio::spawn(pbx.run());
    Some(accounts)
}

/// The apps' webhook workers, with what the last run left queued.
async fn start_webhooks(
    config: &Config,
    cdr: &crate::cdr::CdrStore,
) -> Result<crate::webhook::Webhooks, RunError> {
    let targets = config
        .apps
        .iter()
        .filter_map(|(name, app)| Some((name.clone(), app.webhook.clone()?)))
        .collect();
    crate::webhook::Webhooks::start(&targets, cdr)
        .await
        .map_err(RunError::Storage)
}

/// Logs the config's warnings, binds, and serves until `shutdown`.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    for w in config.warnings() {
        tracing::warn!("{w}");
    }
    Bound::bind(config).await?.serve(shutdown).await
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown requested");
}
