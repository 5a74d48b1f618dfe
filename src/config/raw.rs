//! The configuration files as written: serde shapes with defaults, nothing validated yet.

use serde::Deserialize;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawConfig {
    pub(crate) apps_file: Option<String>,
    pub(crate) http: RawHttp,
    pub(crate) sip: RawSip,
    pub(crate) media: RawMedia,
    pub(crate) tokens: RawTokens,
    pub(crate) storage: RawStorage,
    pub(crate) log: RawLog,
    pub(crate) service: RawService,
    pub(crate) events: RawEvents,
    pub(crate) demo: RawDemo,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawDemo {
    pub(crate) enabled: Option<bool>,
    pub(crate) sip_port: i64,
}

impl Default for RawDemo {
    fn default() -> Self {
        RawDemo {
            enabled: None,
            sip_port: 5080,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawEvents {
    pub(crate) max_channels: i64,
    pub(crate) max_subscribers: i64,
    pub(crate) buffer: i64,
}

impl Default for RawEvents {
    fn default() -> Self {
        RawEvents {
            max_channels: 10_000,
            max_subscribers: 8,
            buffer: 256,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawService {
    pub(crate) drain_secs: i64,
}

impl Default for RawService {
    fn default() -> Self {
        RawService { drain_secs: 30 }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawHttp {
    pub(crate) listen: String,
    pub(crate) resume_secs: i64,
    pub(crate) heartbeat_secs: i64,
    pub(crate) trusted_proxies: Vec<String>,
    pub(crate) header_timeout_secs: i64,
    pub(crate) max_connections: i64,
    pub(crate) max_connections_per_ip: i64,
    pub(crate) max_sessions_per_agent: i64,
}

impl Default for RawHttp {
    fn default() -> Self {
        RawHttp {
            listen: "127.0.0.1:8080".into(),
            resume_secs: 30,
            heartbeat_secs: 20,
            trusted_proxies: vec!["127.0.0.1".into(), "::1".into()],
            header_timeout_secs: 10,
            max_connections: 10_000,
            max_connections_per_ip: 1_000,
            max_sessions_per_agent: 8,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawSip {
    pub(crate) listen: String,
    pub(crate) public_address: String,
    pub(crate) user_agent: String,
    pub(crate) t1_ms: i64,
    pub(crate) t2_ms: i64,
    pub(crate) t4_ms: i64,
    pub(crate) register_expires_secs: i64,
    pub(crate) register_retry_min_secs: i64,
    pub(crate) register_retry_max_secs: i64,
    pub(crate) keepalive_secs: i64,
    pub(crate) registration_grace_secs: i64,
    pub(crate) max_registrations: i64,
    pub(crate) dns_server: String,
    pub(crate) call_waiting: bool,
    pub(crate) accept_refer: bool,
    pub(crate) trusted_peers: Vec<String>,
}

impl Default for RawSip {
    fn default() -> Self {
        RawSip {
            listen: "127.0.0.1:5070".into(),
            public_address: String::new(),
            user_agent: "callgate".into(),
            t1_ms: 500,
            t2_ms: 4000,
            t4_ms: 5000,
            register_expires_secs: 600,
            register_retry_min_secs: 5,
            register_retry_max_secs: 300,
            keepalive_secs: 30,
            registration_grace_secs: 10,
            max_registrations: 10_000,
            dns_server: String::new(),
            call_waiting: true,
            trusted_peers: Vec::new(),
            accept_refer: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawMedia {
    pub(crate) listen_ip: String,
    pub(crate) webrtc_port: i64,
    pub(crate) webrtc_port_min: i64,
    pub(crate) webrtc_port_max: i64,
    pub(crate) public_ip: String,
    pub(crate) rtp_port_min: i64,
    pub(crate) rtp_port_max: i64,
    pub(crate) dtmf: String,
    pub(crate) timeout_secs: i64,
}

impl Default for RawMedia {
    fn default() -> Self {
        RawMedia {
            listen_ip: "127.0.0.1".into(),
            webrtc_port: 10000,
            webrtc_port_min: 0,
            webrtc_port_max: 0,
            public_ip: String::new(),
            rtp_port_min: 20000,
            rtp_port_max: 20999,
            dtmf: "rfc4733".into(),
            timeout_secs: 60,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawTokens {
    pub(crate) max_bytes: i64,
    pub(crate) clock_skew_secs: i64,
}

impl Default for RawTokens {
    fn default() -> Self {
        RawTokens {
            max_bytes: 16384,
            clock_skew_secs: 30,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawStorage {
    pub(crate) data_dir: String,
    pub(crate) recordings_dir: String,
    pub(crate) recordings_retention_days: i64,
}

impl Default for RawStorage {
    fn default() -> Self {
        RawStorage {
            data_dir: "data".into(),
            recordings_dir: "data/recordings".into(),
            recordings_retention_days: 0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawLog {
    pub(crate) level: String,
    pub(crate) format: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawApps {
    pub(crate) admin_keys: Vec<String>,
    pub(crate) apps: std::collections::BTreeMap<String, RawApp>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawApp {
    #[serde(default)]
    pub(crate) keys: Vec<String>,
    #[serde(default)]
    pub(crate) mode: Option<String>,
    #[serde(default)]
    pub(crate) iv: Option<String>,
    #[serde(default = "yes")]
    pub(crate) require_expires: bool,
    #[serde(default)]
    pub(crate) max_lifetime_secs: Option<i64>,
    #[serde(default)]
    pub(crate) single_use: bool,
    #[serde(default)]
    pub(crate) allowed_origins: Vec<String>,
    #[serde(default)]
    pub(crate) api_keys: Vec<String>,
    #[serde(default)]
    pub(crate) record: bool,
    #[serde(default)]
    pub(crate) dial_plan: Option<RawDialPlan>,
    #[serde(default)]
    pub(crate) call_data: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) call_headers: Vec<String>,
    #[serde(default)]
    pub(crate) auto_answer: bool,
    #[serde(default)]
    pub(crate) auto_answer_header: Option<String>,
    #[serde(default)]
    pub(crate) states: Vec<RawState>,
    #[serde(default)]
    pub(crate) default_state: Option<String>,
    #[serde(default)]
    pub(crate) wrap_up_state: Option<String>,
    #[serde(default)]
    pub(crate) wrap_up_secs: Option<i64>,
    #[serde(default)]
    pub(crate) not_ready_status: Option<i64>,
    #[serde(default)]
    pub(crate) missed_calls_limit: Option<i64>,
    #[serde(default)]
    pub(crate) missed_calls_state: Option<String>,
    #[serde(default)]
    pub(crate) webhook: Option<RawWebhook>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawWebhook {
    pub(crate) url: String,
    pub(crate) secret: String,
    #[serde(default)]
    pub(crate) timeout_secs: Option<i64>,
    #[serde(default)]
    pub(crate) concurrency: Option<i64>,
    #[serde(default)]
    pub(crate) max_age_secs: Option<i64>,
    #[serde(default)]
    pub(crate) max_queue: Option<i64>,
    #[serde(default)]
    pub(crate) ca_file: Option<String>,
    #[serde(default)]
    pub(crate) insecure_http: bool,
    #[serde(default)]
    pub(crate) events: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawState {
    pub(crate) id: String,
    #[serde(default)]
    pub(crate) label: Option<String>,
    #[serde(default)]
    pub(crate) productive: bool,
    #[serde(default)]
    pub(crate) may_call_out: bool,
    #[serde(default)]
    pub(crate) may_receive: bool,
    #[serde(default)]
    pub(crate) groups: Vec<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawDialPlan {
    pub(crate) country_code: Option<String>,
    pub(crate) national_prefix: Option<String>,
    pub(crate) international_prefix: Option<String>,
    pub(crate) extension_max_digits: Option<i64>,
    pub(crate) e164_prefix: Option<String>,
    pub(crate) allow_uris: Option<bool>,
    pub(crate) deny_prefixes: Vec<String>,
}

fn yes() -> bool {
    true
}
