//! Webhooks: every event of an app's agents (what its SSE streams carry) POSTed to the app's
//! URL, signed with its secret, from a queue kept in the embedded database so that neither a
//! receiver's downtime nor a callgate restart loses one.
//!
//! - [`outbox`]: the sans-IO queue (order per agent, back-off, giving up).
//! - [`client`]: one signed POST over HTTP/1.1, plain or TLS.
//! - [`worker`]: the per-app task between the event hub, the queue, the store and the client.
//!
//! Delivery is at least once: an attempt cut off by a crash or a restart is made again, with
//! the same `id`, which receivers use to ignore a repeat.

pub mod client;
pub mod outbox;
pub mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use hmac::Mac as _;

use crate::secret::SecretString;

pub use worker::{Sink, Webhooks};

/// The header carrying the signature: `t=<unix seconds>,v1=<hex HMAC-SHA256>`.
pub const SIGNATURE_HEADER: &str = "callgate-signature";
/// The header carrying the delivery's id (the body's `id`).
pub const DELIVERY_HEADER: &str = "callgate-delivery";
/// Receivers should refuse a signature whose `t` is further than this from their clock.
pub const TOLERANCE: Duration = Duration::from_secs(300);

/// Where and how an app's events are delivered (apps.toml `[apps.NAME.webhook]`).
#[derive(Clone)]
pub struct Target {
    /// `https` (or `http`, allowed only to loopback or with `insecure_http`).
    pub tls: bool,
    /// Host name or IP address (no brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Path and query, from `/`.
    pub path: String,
    /// The HMAC key.
    pub secret: SecretString,
    /// Each attempt's bound: connect, TLS, request and the response's head.
    pub timeout: Duration,
    /// Queue behaviour.
    pub policy: outbox::Policy,
    /// Certificates (DER) trusted besides the built-in roots (`ca_file`).
    pub extra_roots: Vec<Vec<u8>>,
    /// The event types sent (`events`); `None`: all.
    pub events: Option<Vec<String>>,
}

/// The event types a webhook may be limited to (apps.toml `events`).
pub const EVENT_TYPES: [&str; 8] = [
    "registration",
    "agentState",
    "incoming",
    "missed",
    "call",
    "transfer",
    "referred",
    "dtmf",
];

/// Whether `event` (JSON as the hub publishes it, `{"type":"...",...}`) is one of `only`.
pub fn wanted(only: Option<&[String]>, event: &str) -> bool {
    let Some(only) = only else {
        return true;
    };
    let kind = event
        .strip_prefix("{\"type\":\"")
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_default();
    only.iter().any(|t| t == kind)
}

impl Target {
    /// The URL without its query (which may hold a receiver's token): for logs.
    pub fn display_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let path = self.path.split('?').next().unwrap_or("/");
        format!("{scheme}://{host}:{}{path}", self.port)
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("url", &self.display_url())
            .field("secret", &self.secret)
            .field("timeout", &self.timeout)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// The signature header's value for `body` sent at `t` (Unix seconds): the receiver computes
/// HMAC-SHA256 over `"{t}.{body}"` with the same secret and compares.
pub fn signature(secret: &SecretString, t: i64, body: &str) -> String {
    let mut mac = <hmac::Hmac<sha2::Sha256>>::new_from_slice(secret.expose_secret().as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// The body POSTed for one event: its delivery `id`, the app, the agent, when it was queued
/// (Unix ms) and the event itself (as the SSE stream has it).
pub fn body(id: &str, app: &str, agent: &str, at: i64, event: &str) -> String {
    let s = |v: &str| serde_json::to_string(v).unwrap_or_else(|_| "\"\"".into());
    format!(
        "{{\"id\":{},\"app\":{},\"agent\":{},\"at\":{at},\"event\":{event}}}",
        s(id),
        s(app),
        s(agent)
    )
}

/// One app's delivery figures, for `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Events delivered.
    pub delivered: AtomicU64,
    /// Attempts that failed (each retry counts).
    pub failed_attempts: AtomicU64,
    /// Events given up, by reason: expired, refused, queue full.
    pub expired: AtomicU64,
    /// See `expired`.
    pub refused: AtomicU64,
    /// See `expired`.
    pub queue_full: AtomicU64,
    /// Events waiting now.
    pub waiting: AtomicUsize,
    /// When the oldest waiting event was queued (Unix ms; 0: none).
    pub oldest: AtomicI64,
}

impl Stats {
    fn given_up(&self, outcome: outbox::Outcome) {
        let c = match outcome {
            outbox::Outcome::Delivered => &self.delivered,
            outbox::Outcome::Expired => &self.expired,
            outbox::Outcome::Refused => &self.refused,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// The apps' stats, in app order.
pub type AllStats = Vec<(String, Arc<Stats>)>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_over_the_timestamp_and_the_body() {
        // As a receiver computes it: printf '1700000000.{}' | openssl dgst -sha256 -hmac secret
        let secret = SecretString::new("secret".into());
        assert_eq!(
            signature(&secret, 1_700_000_000, "{}"),
            "t=1700000000,v1=b8569b78799ff9e3cbff0fc2d63a33a2b57f3282abd07c37ae5e8e7d79a5f163"
        );
        assert_ne!(
            signature(&secret, 1_700_000_001, "{}"),
            signature(&secret, 1_700_000_000, "{}")
        );
    }

    #[test]
    fn a_webhook_limited_to_some_types_gets_only_those() {
        let only = vec!["call".to_owned(), "agentState".to_owned()];
        assert!(wanted(Some(&only), r#"{"type":"call","callId":"c-1"}"#));
        assert!(wanted(
            Some(&only),
            r#"{"type":"agentState","state":"paused"}"#
        ));
        assert!(!wanted(
            Some(&only),
            r#"{"type":"registration","state":"registered"}"#
        ));
        assert!(!wanted(Some(&only), "not json"));
        assert!(wanted(None, r#"{"type":"registration"}"#));
    }

    #[test]
    fn the_body_quotes_its_strings() {
        let b = body("d1", "crm", "1001@x\"y", 5, "{\"type\":\"call\"}");
        let v: serde_json::Value = serde_json::from_str(&b).unwrap_or_default();
        assert_eq!(v["agent"], "1001@x\"y");
        assert_eq!(v["event"]["type"], "call");
        assert_eq!(v["at"], 5);
    }
}
