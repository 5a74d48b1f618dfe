//! Configuration: `callgate.toml` and the per-app key file `apps.toml`, validated into typed values.
//!
//! Every problem names the file, the key and what is wrong; all problems are reported at once.
//! With no file, the copies of `conf/callgate.toml` and `conf/apps.toml` compiled into the binary
//! are used, so `callgate run` works out of the box on a laptop.

pub mod call_data;
pub mod live;
mod raw;
pub mod states;
mod webhook;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use raw::{RawApps, RawConfig};

use crate::account::HostPort;
use crate::secret::SecretBytes;
use crate::token::{self, AppKeys, Keyring, Mode, TokenPolicy};

/// The built-in main configuration (the text of `conf/callgate.toml`).
pub const EMBEDDED_CONFIG: &str = include_str!("../../conf/callgate.toml");
/// The built-in app keys (the text of `conf/apps.toml`): the demo app only.
pub const EMBEDDED_APPS: &str = include_str!("../../conf/apps.toml");
/// The demo app key published in `conf/apps.toml`. Accepted only on a loopback-only HTTP server.
pub const DEMO_KEY_HEX: &str = "64656d6f2d6b65792d646f2d6e6f742d7573652d696e2d70726f64756374696f";

/// Where the configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The copies compiled into the binary.
    Embedded,
    /// A file on disk.
    File(PathBuf),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Embedded => f.write_str("<embedded default config>"),
            Source::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// HTTP server settings.
#[derive(Debug, Clone)]
pub struct Http {
    /// Listen address of the HTTP/WebSocket server.
    pub listen: SocketAddr,
    /// How long a logged-in session outlives its page's WebSocket, so a reloaded page can
    /// resume it with its calls (`None`: ends with the socket).
    pub resume: Option<Duration>,
    /// callgate pings each page's WebSocket this often; a page silent for three of these is
    /// disconnected (close code 4008).
    pub heartbeat: Duration,
    /// Reverse proxies whose `X-Forwarded-For` is believed (the client is the right-most
    /// address in it that is not one of these).
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Longest time a request's header may take to arrive (slow clients are cut off).
    pub header_timeout: Duration,
    /// Most open connections (HTTP and WebSocket) in all.
    pub max_connections: usize,
    /// Most open connections from one address (trusted proxies excepted).
    pub max_connections_per_ip: usize,
    /// Most sessions one agent (app and SIP identity) may have at once.
    pub max_sessions_per_agent: usize,
}

/// SIP settings.
#[derive(Debug, Clone)]
pub struct Sip {
    /// UDP listen address.
    pub listen: SocketAddr,
    /// Address for Via/Contact when behind NAT.
    pub public_address: Option<HostPort>,
    /// User-Agent header value.
    pub user_agent: String,
    /// Transaction timers T1, T2, T4.
    pub timers: crate::sip::transaction::Timers,
    /// Expiry asked for in REGISTER.
    pub register_expires: Duration,
    /// First retry delay after a failed registration (doubles up to `register_retry_max`).
    pub register_retry_min: Duration,
    /// Longest retry delay.
    pub register_retry_max: Duration,
    /// OPTIONS keepalive interval (`None`: off).
    pub keepalive: Option<Duration>,
    /// How long a registration outlives its last user.
    pub registration_grace: Duration,
    /// Most registrations at once.
    pub max_registrations: usize,
    /// DNS server for SRV lookups (`None`: /etc/resolv.conf).
    pub dns_server: Option<SocketAddr>,
    /// Offer a second incoming call while one is active (else 486 Busy Here).
    pub call_waiting: bool,
    /// Follow the far end's REFER (it transfers the agent's call elsewhere), subject to the
    /// app's dial plan; else 603 Decline.
    pub accept_refer: bool,
    /// Addresses besides the registrar / outbound proxy that may send new INVITEs.
    pub trusted_peers: Vec<std::net::IpAddr>,
}

impl Sip {
    /// Settings for [`crate::sip::endpoint::Endpoint::bind`].
    pub fn endpoint_settings(&self) -> crate::sip::endpoint::Settings {
        crate::sip::endpoint::Settings {
            listen: self.listen,
            public_address: self.public_address.clone(),
            timers: self.timers,
            registration: crate::sip::registration::Settings {
                expires: self.register_expires,
                retry_min: self.register_retry_min,
                retry_max: self.register_retry_max,
                keepalive: self.keepalive,
                user_agent: self.user_agent.clone(),
            },
            grace: self.registration_grace,
            max_registrations: self.max_registrations,
            call_waiting: self.call_waiting,
            min_session_expires: Duration::from_secs(90),
            dns_server: self.dns_server,
            trusted_peers: self.trusted_peers.clone(),
        }
    }
}

/// Media settings.
#[derive(Debug, Clone)]
pub struct Media {
    /// IP the media sockets bind to.
    pub listen_ip: IpAddr,
    /// The single UDP port for WebRTC media.
    pub webrtc_port: u16,
    /// A port range for browser media, one port per call, instead of the single shared port
    /// (spreads the receive work over several sockets and threads).
    pub webrtc_ports: Option<(u16, u16)>,
    /// Public IP announced when behind 1:1 NAT.
    pub public_ip: Option<IpAddr>,
    /// First RTP port (even).
    pub rtp_port_min: u16,
    /// Last RTP port.
    pub rtp_port_max: u16,
    /// How DTMF from the page reaches the SIP side.
    pub dtmf: DtmfMode,
    /// An established, unheld call whose SIP side sends no RTP for this long is hung up
    /// (`None`: never).
    pub timeout: Option<Duration>,
}

/// How DTMF digits from the page are sent to the SIP side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DtmfMode {
    /// RFC 4733 telephone-events in the RTP stream when the far end negotiated
    /// telephone-event/8000, SIP INFO otherwise.
    Rfc4733,
    /// Always SIP INFO (`application/dtmf-relay`).
    Info,
}

/// Storage locations.
#[derive(Debug, Clone)]
pub struct Storage {
    /// Call history and state.
    pub data_dir: PathBuf,
    /// Recordings.
    pub recordings_dir: PathBuf,
    /// Recordings older than this are deleted (`None`: kept).
    pub recordings_retention: Option<Duration>,
}

/// Logging settings.
#[derive(Debug, Clone)]
pub struct Log {
    /// Default filter directive.
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

/// What the configuration says about one app (keys live in the keyring only).
#[derive(Debug, Clone)]
pub struct AppInfo {
    /// Token mode.
    pub mode: Mode,
    /// Number of keys.
    pub key_count: usize,
    /// Whether it uses the published demo key.
    pub demo_key: bool,
    /// Page origins (`https://crm.example.com`) allowed to log in with this app's tokens; empty:
    /// any origin.
    pub allowed_origins: Vec<String>,
    /// How the app's agents' dial strings are normalised.
    pub dial_plan: crate::dialplan::DialPlan,
    /// SHA-256 digests of the app's API keys (its CRM backend's credentials for the HTTP API).
    pub api_keys: Vec<[u8; 32]>,
    /// Whether the app's calls are recorded.
    pub record: bool,
    /// The app's agent states.
    pub states: std::sync::Arc<states::StatePolicy>,
    /// Which incoming INVITE headers become the call's data fields.
    pub call_data: std::sync::Arc<call_data::CallDataMap>,
    /// The X- headers the app's calls may add to their INVITEs.
    pub call_headers: std::sync::Arc<call_data::CallHeaders>,
    /// Where the app's events are POSTed (`[apps.NAME.webhook]`); read at start-up only.
    pub webhook: Option<std::sync::Arc<crate::webhook::Target>>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from.
    pub source: Source,
    /// The apps file it read (`None` for the embedded one).
    pub apps_file: Option<PathBuf>,
    /// HTTP server.
    pub http: Http,
    /// SIP.
    pub sip: Sip,
    /// Media.
    pub media: Media,
    /// Token limits.
    pub tokens: TokenPolicy,
    /// Storage.
    pub storage: Storage,
    /// Logging.
    pub log: Log,
    /// On SIGTERM / SIGINT: how long calls in progress may go on before they are hung up.
    pub drain: Duration,
    /// The demo PBX and demo tokens (`[demo]`; on in the embedded configuration only).
    pub demo: Option<Demo>,
    /// Apps by name.
    pub apps: BTreeMap<String, AppInfo>,
    /// SHA-256 digests of the admin keys (apps.toml `admin_keys`).
    pub admin_keys: Vec<[u8; 32]>,
    /// Limits of the per-agent event channels.
    pub events: crate::session::hub::Limits,
    keyring: Keyring,
}

/// The app demo tokens are minted for.
pub const DEMO_APP: &str = "demo";

/// The demo mode (`[demo]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demo {
    /// Where the demo PBX listens (always 127.0.0.1).
    pub sip: SocketAddr,
}

/// `[demo]`: on by default in the embedded configuration only; anywhere it needs HTTP on
/// loopback (demo tokens are for this machine) and the `demo` app.
fn check_demo(
    c: &mut Checker,
    file: &str,
    raw: &raw::RawDemo,
    embedded: bool,
    http_loopback_only: bool,
    has_demo_app: bool,
) -> Option<Demo> {
    if !raw.enabled.unwrap_or(embedded) {
        return None;
    }
    let port = match u16::try_from(raw.sip_port) {
        Ok(p @ 1..) => p,
        _ => {
            c.add(file, "demo.sip_port", "must be 1 to 65535");
            return None;
        }
    };
    if !http_loopback_only {
        c.add(
            file,
            "demo.enabled",
            "the demo hands out tokens to whoever reaches the page: it needs http.listen on a loopback address",
        );
    }
    if !has_demo_app {
        c.add(
            file,
            "demo.enabled",
            "needs an app named \"demo\" in the apps file (its tokens are minted for it)",
        );
    }
    Some(Demo {
        sip: SocketAddr::from(([127, 0, 0, 1], port)),
    })
}

/// One thing wrong in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file.
    pub file: String,
    /// The key, dotted (`media.rtp_port_min`, `apps.crm.keys[1]`).
    pub key: String,
    /// What is wrong and what is expected.
    pub problem: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.file, self.key, self.problem)
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The file.
        file: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is not valid TOML, or has an unknown key or a value of the wrong type.
    #[error("{file}:{line}:{column}: {message}")]
    Syntax {
        /// The file.
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The parser's explanation.
        message: String,
    },
    /// Values that parsed but are not acceptable.
    #[error("{}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

fn syntax_error(file: &str, text: &str, e: &toml::de::Error) -> ConfigError {
    let (line, column) = match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            (line, column)
        }
        None => (0, 0),
    };
    ConfigError::Syntax {
        file: file.to_owned(),
        line,
        column,
        message: e.message().trim().to_owned(),
    }
}

struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn add(&mut self, file: &str, key: impl Into<String>, problem: impl Into<String>) {
        self.problems.push(Problem {
            file: file.to_owned(),
            key: key.into(),
            problem: problem.into(),
        });
    }

    /// A list of IP addresses; each bad entry is a problem of its own.
    fn ip_list(&mut self, file: &str, key: &str, values: &[String]) -> Vec<std::net::IpAddr> {
        values
            .iter()
            .filter_map(|v| {
                self.parse(
                    file,
                    key,
                    v,
                    "an IP address (no port, no range) such as \"192.0.2.10\"",
                )
            })
            .collect()
    }

    fn parse<T>(&mut self, file: &str, key: &str, value: &str, expected: &str) -> Option<T>
    where
        T: std::str::FromStr,
    {
        match value.parse() {
            Ok(v) => Some(v),
            Err(_) => {
                self.add(file, key, format!("{value:?} is not {expected}"));
                None
            }
        }
    }

    fn port(&mut self, file: &str, key: &str, value: i64, allow_zero: bool) -> Option<u16> {
        match u16::try_from(value) {
            Ok(0) if !allow_zero => {
                self.add(file, key, "must be a port number from 1 to 65535");
                None
            }
            Ok(p) => Some(p),
            Err(_) => {
                self.add(
                    file,
                    key,
                    format!("{value} is not a port number (1 to 65535)"),
                );
                None
            }
        }
    }
}

impl Config {
    /// The built-in configuration (`conf/*.toml` as compiled in); paths relative to the current
    /// directory.
    pub fn embedded() -> Result<Config, ConfigError> {
        Config::from_texts(Source::Embedded, EMBEDDED_CONFIG, false, Path::new("."))
    }

    /// Loads `path` and the apps file it names (relative to `path`'s directory).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::from_texts(Source::File(path.to_owned()), &text, true, base)
    }

    /// Parses a main config text; the apps file is read from disk when `apps_from_disk`, else the
    /// embedded one is used.
    fn from_texts(
        source: Source,
        text: &str,
        apps_from_disk: bool,
        base: &Path,
    ) -> Result<Config, ConfigError> {
        let file = source.to_string();
        let raw: RawConfig = toml::from_str(text).map_err(|e| syntax_error(&file, text, &e))?;
        let resolve = |p: &str| {
            let p = Path::new(p);
            if p.is_absolute() {
                p.to_owned()
            } else {
                base.join(p)
            }
        };
        let (apps_file, apps_name, apps_text) = match apps_from_disk {
            true => {
                let path = resolve(raw.apps_file.as_deref().unwrap_or("apps.toml"));
                let name = path.display().to_string();
                let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                    file: name.clone(),
                    source,
                })?;
                (Some(path), name, text)
            }
            false => (
                None,
                "<embedded apps.toml>".to_owned(),
                EMBEDDED_APPS.to_owned(),
            ),
        };
        let raw_apps: RawApps =
            toml::from_str(&apps_text).map_err(|e| syntax_error(&apps_name, &apps_text, &e))?;
        let mut c = Checker {
            problems: Vec::new(),
        };

        let http_listen = c.parse::<SocketAddr>(
            &file,
            "http.listen",
            &raw.http.listen,
            "an address:port such as 127.0.0.1:8080",
        );
        let trusted_peers = c.ip_list(&file, "sip.trusted_peers", &raw.sip.trusted_peers);
        let trusted_proxies = c.ip_list(&file, "http.trusted_proxies", &raw.http.trusted_proxies);

        let sip_listen = c.parse::<SocketAddr>(
            &file,
            "sip.listen",
            &raw.sip.listen,
            "an address:port such as 0.0.0.0:5060",
        );
        let public_address = if raw.sip.public_address.is_empty() {
            None
        } else {
            match HostPort::parse(&raw.sip.public_address) {
                Ok(hp) => Some(hp),
                Err(why) => {
                    c.add(
                        &file,
                        "sip.public_address",
                        format!("{why}; expected host or host:port"),
                    );
                    None
                }
            }
        };
        let ua = raw.sip.user_agent.trim().to_owned();
        if ua.is_empty() || ua.len() > 128 || ua.chars().any(char::is_control) {
            c.add(
                &file,
                "sip.user_agent",
                "must be 1 to 128 printable characters",
            );
        }

        let mut range = |key: &str, v: i64, lo: i64, hi: i64, unit: &str| -> u64 {
            if (lo..=hi).contains(&v) {
                u64::try_from(v).unwrap_or(0)
            } else {
                c.add(
                    &file,
                    key,
                    format!("{v} is out of range: {lo} to {hi} {unit}"),
                );
                u64::try_from(lo).unwrap_or(0)
            }
        };
        let t1 = range("sip.t1_ms", raw.sip.t1_ms, 10, 10_000, "milliseconds");
        let t2 = range("sip.t2_ms", raw.sip.t2_ms, 10, 60_000, "milliseconds");
        let t4 = range("sip.t4_ms", raw.sip.t4_ms, 0, 60_000, "milliseconds");
        let reg_expires = range(
            "sip.register_expires_secs",
            raw.sip.register_expires_secs,
            10,
            86_400,
            "seconds",
        );
        let retry_min = range(
            "sip.register_retry_min_secs",
            raw.sip.register_retry_min_secs,
            1,
            3_600,
            "seconds",
        );
        let retry_max = range(
            "sip.register_retry_max_secs",
            raw.sip.register_retry_max_secs,
            1,
            86_400,
            "seconds",
        );
        let keepalive = range(
            "sip.keepalive_secs",
            raw.sip.keepalive_secs,
            0,
            3_600,
            "seconds (0 = off)",
        );
        let grace = range(
            "sip.registration_grace_secs",
            raw.sip.registration_grace_secs,
            0,
            600,
            "seconds",
        );
        let media_timeout = range(
            "media.timeout_secs",
            raw.media.timeout_secs,
            0,
            86_400,
            "seconds (0 = never)",
        );
        let resume = range(
            "http.resume_secs",
            raw.http.resume_secs,
            0,
            3_600,
            "seconds (0 = sessions end with their page)",
        );
        let retention_days = range(
            "storage.recordings_retention_days",
            raw.storage.recordings_retention_days,
            0,
            36_500,
            "days (0 = keep)",
        );
        let heartbeat = range(
            "http.heartbeat_secs",
            raw.http.heartbeat_secs,
            1,
            600,
            "seconds",
        );
        let header_timeout = range(
            "http.header_timeout_secs",
            raw.http.header_timeout_secs,
            1,
            300,
            "seconds",
        );
        let max_connections = range(
            "http.max_connections",
            raw.http.max_connections,
            1,
            1_000_000,
            "connections",
        );
        let max_connections_per_ip = range(
            "http.max_connections_per_ip",
            raw.http.max_connections_per_ip,
            1,
            1_000_000,
            "connections",
        );
        let max_sessions_per_agent = range(
            "http.max_sessions_per_agent",
            raw.http.max_sessions_per_agent,
            1,
            1_000,
            "sessions",
        );
        let events = crate::session::hub::Limits {
            max_channels: range(
                "events.max_channels",
                raw.events.max_channels,
                1,
                1_000_000,
                "agents",
            ) as usize,
            max_subscribers: range(
                "events.max_subscribers",
                raw.events.max_subscribers,
                1,
                1_000,
                "subscribers",
            ) as usize,
            buffer: range("events.buffer", raw.events.buffer, 1, 100_000, "events") as usize,
        };
        let drain = range(
            "service.drain_secs",
            raw.service.drain_secs,
            0,
            3_600,
            "seconds",
        );
        let max_regs = range(
            "sip.max_registrations",
            raw.sip.max_registrations,
            1,
            1_000_000,
            "",
        );
        let dns_server = if raw.sip.dns_server.is_empty() {
            None
        } else {
            let v = &raw.sip.dns_server;
            let parsed = v
                .parse::<SocketAddr>()
                .ok()
                .or_else(|| v.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)));
            if parsed.is_none() {
                c.add(
                    &file,
                    "sip.dns_server",
                    format!("{v:?} is not an IP address or address:port"),
                );
            }
            parsed
        };
        if t2 < t1 {
            c.add(&file, "sip.t2_ms", "must be at least sip.t1_ms");
        }
        if retry_max < retry_min {
            c.add(
                &file,
                "sip.register_retry_max_secs",
                "must be at least sip.register_retry_min_secs",
            );
        }

        let listen_ip = c.parse::<IpAddr>(
            &file,
            "media.listen_ip",
            &raw.media.listen_ip,
            "an IP address",
        );
        let webrtc_port = c.port(&file, "media.webrtc_port", raw.media.webrtc_port, false);
        let public_ip = if raw.media.public_ip.is_empty() {
            None
        } else {
            c.parse::<IpAddr>(
                &file,
                "media.public_ip",
                &raw.media.public_ip,
                "an IP address",
            )
        };
        if public_ip.is_some_and(|ip| ip.is_unspecified()) {
            c.add(
                &file,
                "media.public_ip",
                "must be an address peers can reach, not 0.0.0.0 or ::",
            );
        }
        if listen_ip.is_some_and(|ip| ip.is_unspecified()) && public_ip.is_none() {
            c.add(
                &file,
                "media.public_ip",
                "must be set when media.listen_ip is 0.0.0.0 or :: (peers need a concrete address)",
            );
        }
        let dtmf = match raw.media.dtmf.as_str() {
            "rfc4733" => DtmfMode::Rfc4733,
            "info" => DtmfMode::Info,
            other => {
                c.add(
                    &file,
                    "media.dtmf",
                    format!("{other:?} is not \"rfc4733\" or \"info\""),
                );
                DtmfMode::Rfc4733
            }
        };
        let rtp_min = c.port(&file, "media.rtp_port_min", raw.media.rtp_port_min, false);
        let rtp_max = c.port(&file, "media.rtp_port_max", raw.media.rtp_port_max, false);
        if let (Some(lo), Some(hi)) = (rtp_min, rtp_max) {
            if lo % 2 != 0 {
                c.add(
                    &file,
                    "media.rtp_port_min",
                    "must be even (RTP uses the even port of each pair)",
                );
            }
            if hi <= lo {
                c.add(
                    &file,
                    "media.rtp_port_max",
                    "must be greater than media.rtp_port_min (at least one port pair)",
                );
            }
            let (wlo, whi) = (raw.media.webrtc_port_min, raw.media.webrtc_port_max);
            if (wlo, whi) != (0, 0) && !(1024 <= wlo && wlo <= whi && whi <= 65535) {
                c.add(
                    &file,
                    "media.webrtc_port_min",
                    "webrtc_port_min..webrtc_port_max must be a range within 1024..65535 (or both 0 for the single webrtc_port)",
                );
            } else if (wlo, whi) != (0, 0) && wlo <= i64::from(hi) && i64::from(lo) <= whi {
                c.add(
                    &file,
                    "media.webrtc_port_min",
                    "the WebRTC port range must not overlap media.rtp_port_min..media.rtp_port_max",
                );
            }
            if webrtc_port.is_some_and(|w| (lo..=hi).contains(&w)) {
                c.add(
                    &file,
                    "media.webrtc_port",
                    "must lie outside media.rtp_port_min..media.rtp_port_max",
                );
            }
        }

        if !(64..=1_048_576).contains(&raw.tokens.max_bytes) {
            c.add(&file, "tokens.max_bytes", "must be between 64 and 1048576");
        }
        if !(0..=3600).contains(&raw.tokens.clock_skew_secs) {
            c.add(
                &file,
                "tokens.clock_skew_secs",
                "must be between 0 and 3600 seconds",
            );
        }

        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&raw.log.level) {
            c.add(
                &file,
                "log.level",
                format!("is not a valid filter ({e}); try \"info\" or \"callgate=debug,info\""),
            );
        }
        let format = match raw.log.format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                c.add(
                    &file,
                    "log.format",
                    format!("{other:?} is not \"text\" or \"json\""),
                );
                LogFormat::Text
            }
        };
        for (key, dir) in [
            ("storage.data_dir", &raw.storage.data_dir),
            ("storage.recordings_dir", &raw.storage.recordings_dir),
        ] {
            if dir.is_empty() {
                c.add(&file, key, "must name a directory");
            }
        }

        let http_loopback_only = http_listen.is_some_and(|a| a.ip().is_loopback());
        let admin_keys = check_api_keys(&mut c, &apps_name, "admin_keys", &raw_apps.admin_keys);
        let (apps, keyring_apps) = check_apps(&mut c, &apps_name, raw_apps, http_loopback_only);
        let demo = check_demo(
            &mut c,
            &file,
            &raw.demo,
            matches!(source, Source::Embedded),
            http_loopback_only,
            apps.contains_key(DEMO_APP),
        );

        let (
            Some(http_listen),
            Some(sip_listen),
            Some(listen_ip),
            Some(webrtc_port),
            Some(rtp_port_min),
            Some(rtp_port_max),
        ) = (
            http_listen,
            sip_listen,
            listen_ip,
            webrtc_port,
            rtp_min,
            rtp_max,
        )
        else {
            return Err(ConfigError::Invalid(c.problems));
        };
        if !c.problems.is_empty() {
            return Err(ConfigError::Invalid(c.problems));
        }
        let tokens = TokenPolicy {
            max_token_bytes: usize::try_from(raw.tokens.max_bytes)
                .unwrap_or(token::DEFAULT_MAX_TOKEN_BYTES),
            clock_skew: Duration::from_secs(
                u64::try_from(raw.tokens.clock_skew_secs).unwrap_or(30),
            ),
        };
        Ok(Config {
            source,
            apps_file,
            http: Http {
                listen: http_listen,
                resume: (resume > 0).then(|| Duration::from_secs(resume)),
                heartbeat: Duration::from_secs(heartbeat),
                trusted_proxies,
                header_timeout: Duration::from_secs(header_timeout),
                max_connections: max_connections as usize,
                max_connections_per_ip: max_connections_per_ip as usize,
                max_sessions_per_agent: max_sessions_per_agent as usize,
            },
            sip: Sip {
                listen: sip_listen,
                public_address,
                user_agent: ua,
                timers: crate::sip::transaction::Timers {
                    t1: Duration::from_millis(t1),
                    t2: Duration::from_millis(t2),
                    t4: Duration::from_millis(t4),
                },
                register_expires: Duration::from_secs(reg_expires),
                register_retry_min: Duration::from_secs(retry_min),
                register_retry_max: Duration::from_secs(retry_max),
                keepalive: (keepalive > 0).then(|| Duration::from_secs(keepalive)),
                registration_grace: Duration::from_secs(grace),
                max_registrations: usize::try_from(max_regs).unwrap_or(10_000),
                dns_server,
                call_waiting: raw.sip.call_waiting,
                accept_refer: raw.sip.accept_refer,
                trusted_peers,
            },
            media: Media {
                listen_ip,
                webrtc_port,
                webrtc_ports: (raw.media.webrtc_port_min != 0).then(|| {
                    let p = |v: i64| u16::try_from(v).unwrap_or(0);
                    (p(raw.media.webrtc_port_min), p(raw.media.webrtc_port_max))
                }),
                public_ip,
                rtp_port_min,
                rtp_port_max,
                dtmf,
                timeout: (media_timeout > 0).then(|| Duration::from_secs(media_timeout)),
            },
            tokens,
            storage: Storage {
                data_dir: resolve(&raw.storage.data_dir),
                recordings_dir: resolve(&raw.storage.recordings_dir),
                recordings_retention: (retention_days > 0)
                    .then(|| Duration::from_secs(retention_days * 86_400)),
            },
            log: Log {
                level: raw.log.level,
                format,
            },
            drain: Duration::from_secs(drain),
            demo,
            apps,
            admin_keys,
            events,
            keyring: Keyring::new(keyring_apps, tokens),
        })
    }

    /// The token keyring built from the apps file.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// Things that work but deserve an admin's attention; logged at startup, shown by check-config.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.apps.is_empty() {
            w.push("no apps are configured: no token can log in".to_owned());
        }
        for (name, app) in &self.apps {
            if app.mode == Mode::Ctr {
                w.push(format!(
                    "app {name:?} uses mode \"ctr\": its fixed IV reuses the keystream across tokens and CTR \
                     has no integrity, so tokens can be altered; switch the CRM to mode \"ctr-hmac\" (docs/TOKENS.md)"
                ));
            }
            if app.demo_key {
                w.push(format!(
                    "app {name:?} uses the public demo key: anyone can mint tokens for it; \
                     replace it (callgate keygen) before exposing callgate beyond this machine"
                ));
            }
        }
        w
    }
}

fn check_apps(
    c: &mut Checker,
    file: &str,
    raw: RawApps,
    http_loopback_only: bool,
) -> (BTreeMap<String, AppInfo>, BTreeMap<String, AppKeys>) {
    let mut infos = BTreeMap::new();
    let mut keyrings = BTreeMap::new();
    for (name, app) in raw.apps {
        let at = |k: &str| format!("apps.{name}.{k}");
        if let Err(why) = token::check_app_name(&name) {
            c.add(file, format!("apps.{name}"), format!("app name {why}"));
            continue;
        }
        let mode = match app.mode.as_deref() {
            None | Some("ctr-hmac") => Mode::CtrHmac,
            Some("ctr") => Mode::Ctr,
            Some(other) => {
                c.add(
                    file,
                    at("mode"),
                    format!("{other:?} is not \"ctr-hmac\" or \"ctr\""),
                );
                continue;
            }
        };
        if app.keys.is_empty() {
            c.add(
                file,
                at("keys"),
                "must list at least one key (generate one with `callgate keygen`)",
            );
        }
        let mut keys = Vec::new();
        let mut demo_key = false;
        for (i, k) in app.keys.iter().enumerate() {
            let k = k.trim();
            match hex::decode(k) {
                Ok(bytes) if matches!(bytes.len(), 16 | 24 | 32) => {
                    if keys
                        .iter()
                        .any(|existing: &SecretBytes| existing.expose_secret() == bytes.as_slice())
                    {
                        c.add(file, format!("{}[{i}]", at("keys")), "is listed twice");
                    }
                    if k.eq_ignore_ascii_case(DEMO_KEY_HEX) {
                        demo_key = true;
                        if !http_loopback_only {
                            c.add(
                                file,
                                format!("{}[{i}]", at("keys")),
                                "is the public demo key, allowed only while http.listen is a loopback address; \
                                 generate a real key with `callgate keygen`",
                            );
                        }
                    }
                    keys.push(SecretBytes::new(bytes));
                }
                Ok(bytes) => c.add(
                    file,
                    format!("{}[{i}]", at("keys")),
                    format!(
                        "is {} bytes; AES keys are 16, 24 or 32 bytes (32, 48 or 64 hex digits)",
                        bytes.len()
                    ),
                ),
                Err(_) => c.add(
                    file,
                    format!("{}[{i}]", at("keys")),
                    "is not hex (32, 48 or 64 hex digits)",
                ),
            }
        }
        let iv = match (mode, app.iv.as_deref()) {
            (Mode::CtrHmac, Some(_)) => {
                c.add(
                    file,
                    at("iv"),
                    "is only used with mode \"ctr\" (ctr-hmac tokens carry a random IV); remove it",
                );
                [0; 16]
            }
            (_, None) => [0; 16],
            (Mode::Ctr, Some(iv)) => match hex::decode(iv.trim())
                .ok()
                .and_then(|b| <[u8; 16]>::try_from(b).ok())
            {
                Some(iv) => iv,
                None => {
                    c.add(
                        file,
                        at("iv"),
                        "must be 32 hex digits (16 bytes), as given to openssl -iv",
                    );
                    [0; 16]
                }
            },
        };
        let key_count = keys.len();
        let mut allowed_origins = Vec::new();
        for (i, o) in app.allowed_origins.iter().enumerate() {
            let o = o.trim().trim_end_matches('/');
            let ok = (o.starts_with("https://") || o.starts_with("http://"))
                && o.split_once("//")
                    .is_some_and(|(_, host)| !host.is_empty() && !host.contains('/'));
            if ok {
                allowed_origins.push(o.to_ascii_lowercase());
            } else {
                c.add(
                    file,
                    format!("{}[{i}]", at("allowed_origins")),
                    "must be an origin like https://crm.example.com (scheme and host, no path)",
                );
            }
        }
        let states = std::sync::Arc::new(states::check_states(c, file, &at, &app));
        let call_data = std::sync::Arc::new(call_data::check_call_data(
            c,
            file,
            (&at("call_data"), &at("auto_answer_header")),
            &app.call_data,
            (app.auto_answer, app.auto_answer_header.as_ref()),
        ));
        let call_headers = std::sync::Arc::new(call_data::check_call_headers(
            c,
            file,
            &at("call_headers"),
            &app.call_headers,
        ));
        let dial_plan = check_dial_plan(c, file, &at("dial_plan"), app.dial_plan);
        let api_keys = check_api_keys(c, file, &at("api_keys"), &app.api_keys);
        let webhook = app.webhook.as_ref().and_then(|w| {
            let dir = Path::new(file).parent().unwrap_or(Path::new("."));
            webhook::check_webhook(c, file, &at("webhook"), dir, w)
        });
        let max_lifetime = match app.max_lifetime_secs {
            None => None,
            Some(s @ 60..=31_536_000) => Some(Duration::from_secs(s.unsigned_abs())),
            Some(_) => {
                c.add(
                    file,
                    at("max_lifetime_secs"),
                    "must be 60 to 31536000 seconds (a year); tokens are best minted for minutes",
                );
                None
            }
        };
        if app.single_use && !app.require_expires && max_lifetime.is_none() {
            c.add(
                file,
                at("single_use"),
                "needs tokens that expire (each is remembered until then): keep require_expires = true or set max_lifetime_secs",
            );
        }
        match AppKeys::new(mode, keys, iv, app.require_expires) {
            Ok(k) => {
                let k = k.with_replay_limits(max_lifetime, app.single_use);
                keyrings.insert(name.clone(), k);
            }
            Err(e) => c.add(
                file,
                at("keys"),
                format!("a key has {} bytes; AES keys are 16, 24 or 32", e.0),
            ),
        }
        infos.insert(
            name,
            AppInfo {
                mode,
                key_count,
                demo_key,
                allowed_origins,
                dial_plan,
                api_keys,
                record: app.record,
                states,
                call_data,
                call_headers,
                webhook,
            },
        );
    }
    (infos, keyrings)
}

/// Validates API or admin keys (`at` is their dotted key): 24 to 256 visible ASCII characters
/// each (e.g. `callgate keygen` output). Returns their SHA-256 digests.
fn check_api_keys(c: &mut Checker, file: &str, at: &str, keys: &[String]) -> Vec<[u8; 32]> {
    use sha2::Digest;
    let mut out = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        if (24..=256).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()) {
            out.push(sha2::Sha256::digest(k.as_bytes()).into());
        } else {
            c.add(
                file,
                format!("{at}[{i}]"),
                "must be 24 to 256 visible ASCII characters (no spaces); `callgate keygen` makes one",
            );
        }
    }
    out
}

/// Validates `[apps.NAME.dial_plan]` (`at` is its dotted key); absent: the default plan.
fn check_dial_plan(
    c: &mut Checker,
    file: &str,
    at: &str,
    raw: Option<raw::RawDialPlan>,
) -> crate::dialplan::DialPlan {
    let mut plan = crate::dialplan::DialPlan::default();
    let Some(raw) = raw else { return plan };
    let digits = |s: &str, max: usize| s.len() <= max && s.bytes().all(|b| b.is_ascii_digit());
    if let Some(cc) = raw.country_code {
        if !cc.is_empty() && digits(&cc, 3) {
            plan.country_code = Some(cc);
        } else {
            c.add(
                file,
                format!("{at}.country_code"),
                "must be 1 to 3 digits, e.g. \"49\"",
            );
        }
    }
    for (key, value, target) in [
        (
            "national_prefix",
            raw.national_prefix,
            &mut plan.national_prefix,
        ),
        (
            "international_prefix",
            raw.international_prefix,
            &mut plan.international_prefix,
        ),
    ] {
        if let Some(v) = value {
            if digits(&v, 4) {
                *target = v;
            } else {
                c.add(
                    file,
                    format!("{at}.{key}"),
                    "must be up to 4 digits (\"\" for none)",
                );
            }
        }
    }
    if let Some(n) = raw.extension_max_digits {
        match usize::try_from(n) {
            Ok(n) if n <= 15 => plan.extension_max_digits = n,
            _ => c.add(
                file,
                format!("{at}.extension_max_digits"),
                "must be between 0 and 15",
            ),
        }
    }
    if let Some(p) = raw.e164_prefix {
        if p == "+" || digits(&p, 4) {
            plan.e164_prefix = p;
        } else {
            c.add(
                file,
                format!("{at}.e164_prefix"),
                "must be \"+\", up to 4 digits (\"00\"), or \"\"",
            );
        }
    }
    if let Some(a) = raw.allow_uris {
        plan.allow_uris = a;
    }
    for (i, p) in raw.deny_prefixes.into_iter().enumerate() {
        match p.strip_prefix('+') {
            Some(d) if !d.is_empty() && digits(d, 15) => plan.deny_prefixes.push(p),
            _ => c.add(
                file,
                format!("{at}.deny_prefixes[{i}]"),
                "must be an E.164 prefix like \"+1900\"",
            ),
        }
    }
    plan
}

#[cfg(test)]
mod tests;
