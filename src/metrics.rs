//! Service counters and their Prometheus text exposition (`GET /metrics`), plus the draining
//! flag `/readyz` reports. Counters are atomics or small maps of fixed label sets; nothing here
//! ever holds a secret (labels are error codes, end reasons and directions, never user data).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the call setup time histogram's buckets.
const SETUP_BUCKETS: [f64; 9] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// What the SIP endpoint reports at scrape time.
#[derive(Debug, Clone, Default)]
pub struct SipSnapshot {
    /// Calls the endpoint holds (any state).
    pub calls: usize,
    /// Registrations by state (`registering`, `registered`, `failed`, ...).
    pub registrations: BTreeMap<&'static str, usize>,
    /// SIP datagrams received.
    pub received: u64,
    /// SIP datagrams sent.
    pub sent: u64,
    /// SIP datagrams dropped as malformed.
    pub malformed: u64,
    /// SIP inputs dropped because handling them panicked (a bug; SIP carries on).
    pub panics: u64,
}

/// The service's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Set once shutdown began: `/readyz` answers 503 and new logins and calls are refused.
    pub draining: AtomicBool,
    websockets: AtomicI64,
    parked: AtomicI64,
    agents: AtomicI64,
    logins: AtomicU64,
    token_failures: Mutex<BTreeMap<String, u64>>,
    calls_started: [AtomicU64; 2],
    calls_in_state: [AtomicI64; CALL_STATES.len()],
    calls_ended: Mutex<BTreeMap<&'static str, u64>>,
    setup_buckets: [AtomicU64; SETUP_BUCKETS.len()],
    setup_count: AtomicU64,
    setup_sum_us: AtomicU64,
    packets_to_sip: AtomicU64,
    packets_to_browser: AtomicU64,
    packets_lost: AtomicU64,
    far_end_lost: AtomicU64,
    webhooks: std::sync::OnceLock<crate::webhook::AllStats>,
}

/// The states a call of the browser API is in (`callgate_calls{state}`).
pub const CALL_STATES: [&str; 6] = [
    "trying",
    "ringing",
    "early",
    "established",
    "held",
    "held_by_remote",
];

/// Direction of a call, as a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Placed by the agent.
    Outbound,
    /// Offered to the agent.
    Inbound,
}

/// Figures the metrics take from elsewhere at each scrape.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    /// CRM subscribers of event channels.
    pub sse_subscribers: usize,
    /// Apps in token mode `ctr`.
    pub insecure_apps: usize,
    /// Failed call-history writes.
    pub history_write_failures: u64,
    /// Tasks alive in the async runtime.
    pub tasks: usize,
}

impl Metrics {
    /// Whether shutdown began.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// A WebSocket opened (`+1`) or closed (`-1`).
    pub fn websocket(&self, delta: i64) {
        self.websockets.fetch_add(delta, Ordering::Relaxed);
    }

    /// A logged-in session lost its page and waits to be resumed (`+1`), or stopped waiting.
    pub fn parked(&self, delta: i64) {
        self.parked.fetch_add(delta, Ordering::Relaxed);
    }

    /// An agent logged in (`+1`) or its session ended (`-1`).
    pub fn agent(&self, delta: i64) {
        if delta > 0 {
            self.logins.fetch_add(1, Ordering::Relaxed);
        }
        self.agents.fetch_add(delta, Ordering::Relaxed);
    }

    /// A token was refused with `code`.
    pub fn token_failure(&self, code: &str) {
        if let Ok(mut m) = self.token_failures.lock() {
            *m.entry(code.to_owned()).or_default() += 1;
        }
    }

    /// A call started.
    pub fn call_started(&self, d: Direction) {
        self.calls_started[d as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A call left state `from` and entered `to` (either may be `None`: it began or ended; names
    /// outside [`CALL_STATES`] count as none).
    pub fn call_state(&self, from: Option<&str>, to: Option<&str>) {
        let slot = |s: Option<&str>| s.and_then(|s| CALL_STATES.iter().position(|x| *x == s));
        if let Some(i) = slot(from) {
            self.calls_in_state[i].fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(i) = slot(to) {
            self.calls_in_state[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The SIP side reported (RTCP) losing `n` of a call's packets.
    pub fn far_end_lost(&self, n: u32) {
        self.far_end_lost.fetch_add(u64::from(n), Ordering::Relaxed);
    }

    /// A call ended with `reason` (an end reason code).
    pub fn call_ended(&self, reason: &'static str) {
        if let Ok(mut m) = self.calls_ended.lock() {
            *m.entry(reason).or_default() += 1;
        }
    }

    /// An outbound call was answered `took` after it was placed.
    pub fn call_setup(&self, took: Duration) {
        let secs = took.as_secs_f64();
        for (b, le) in self.setup_buckets.iter().zip(SETUP_BUCKETS) {
            if secs <= le {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.setup_count.fetch_add(1, Ordering::Relaxed);
        self.setup_sum_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// A call's media bridge ended with these totals.
    pub fn media(&self, to_sip: u64, to_browser: u64, lost: u64) {
        self.packets_to_sip.fetch_add(to_sip, Ordering::Relaxed);
        self.packets_to_browser
            .fetch_add(to_browser, Ordering::Relaxed);
        self.packets_lost.fetch_add(lost, Ordering::Relaxed);
    }

    /// The apps' webhook figures (set once, at start-up).
    pub fn set_webhooks(&self, stats: crate::webhook::AllStats) {
        let _ = self.webhooks.set(stats);
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self, sip: &SipSnapshot, gauges: &Gauges) -> String {
        let Gauges {
            sse_subscribers,
            insecure_apps,
            history_write_failures,
            tasks,
        } = *gauges;
        let mut o = String::with_capacity(4096);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(o, "{name}{labels} {value}");
            }
        };
        let one = |v: String| vec![(String::new(), v)];
        metric(
            "callgate_draining",
            "gauge",
            "1 while shutting down (no new logins or calls).",
            &one(u8::from(self.is_draining()).to_string()),
        );
        metric(
            "callgate_history_write_failures_total",
            "counter",
            "Failed writes to the call history (each retry counts; rows left open are closed as interrupted at the next start).",
            &one(history_write_failures.to_string()),
        );
        metric(
            "callgate_tasks",
            "gauge",
            "Tasks alive in the async runtime (a few per session, call and subscriber): a figure that only grows is a leak.",
            &one(tasks.to_string()),
        );
        metric(
            "callgate_apps_insecure",
            "gauge",
            "Apps whose tokens use mode \"ctr\" (no integrity, keystream reused): move them to \"ctr-hmac\".",
            &one(insecure_apps.to_string()),
        );
        metric(
            "callgate_websocket_sessions",
            "gauge",
            "Open browser WebSocket connections.",
            &one(self.websockets.load(Ordering::Relaxed).to_string()),
        );
        metric(
            "callgate_sse_subscribers",
            "gauge",
            "CRM subscribers of per-agent event channels.",
            &one(sse_subscribers.to_string()),
        );
        metric(
            "callgate_sessions_awaiting_resume",
            "gauge",
            "Logged-in sessions whose page went away, kept for http.resume_secs.",
            &one(self.parked.load(Ordering::Relaxed).to_string()),
        );
        metric(
            "callgate_agent_sessions",
            "gauge",
            "Browser sessions logged in with a token.",
            &one(self.agents.load(Ordering::Relaxed).to_string()),
        );
        metric(
            "callgate_logins_total",
            "counter",
            "Successful token logins.",
            &one(load(&self.logins).to_string()),
        );
        let failures: Vec<(String, String)> = self
            .token_failures
            .lock()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (format!("{{code=\"{}\"}}", label(k)), v.to_string()))
                    .collect()
            })
            .unwrap_or_default();
        metric(
            "callgate_token_failures_total",
            "counter",
            "Refused tokens by error code.",
            &failures,
        );
        let regs: Vec<(String, String)> = sip
            .registrations
            .iter()
            .map(|(k, v)| (format!("{{state=\"{k}\"}}"), v.to_string()))
            .collect();
        metric(
            "callgate_registrations",
            "gauge",
            "SIP registrations by state.",
            &regs,
        );
        metric(
            "callgate_calls_active",
            "gauge",
            "Calls in progress (any state).",
            &one(sip.calls.to_string()),
        );
        let by_state: Vec<(String, String)> = CALL_STATES
            .iter()
            .zip(&self.calls_in_state)
            .map(|(s, n)| {
                (
                    format!("{{state=\"{s}\"}}"),
                    n.load(Ordering::Relaxed).to_string(),
                )
            })
            .collect();
        metric(
            "callgate_calls",
            "gauge",
            "Calls of browser sessions by state.",
            &by_state,
        );
        metric(
            "callgate_calls_started_total",
            "counter",
            "Calls placed or offered, by direction.",
            &[
                (
                    "{direction=\"outbound\"}".into(),
                    load(&self.calls_started[0]).to_string(),
                ),
                (
                    "{direction=\"inbound\"}".into(),
                    load(&self.calls_started[1]).to_string(),
                ),
            ],
        );
        let ended: Vec<(String, String)> = self
            .calls_ended
            .lock()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (format!("{{reason=\"{k}\"}}"), v.to_string()))
                    .collect()
            })
            .unwrap_or_default();
        metric(
            "callgate_calls_ended_total",
            "counter",
            "Ended calls by end reason.",
            &ended,
        );
        let mut setup: Vec<(String, String)> = self
            .setup_buckets
            .iter()
            .zip(SETUP_BUCKETS)
            .map(|(b, le)| (format!("_bucket{{le=\"{le}\"}}"), load(b).to_string()))
            .collect();
        let count = load(&self.setup_count);
        setup.push(("_bucket{le=\"+Inf\"}".into(), count.to_string()));
        setup.push((
            "_sum".into(),
            format!("{}", load(&self.setup_sum_us) as f64 / 1e6),
        ));
        setup.push(("_count".into(), count.to_string()));
        metric(
            "callgate_call_setup_seconds",
            "histogram",
            "Time from placing an outbound call to its answer.",
            &setup,
        );
        metric(
            "callgate_media_packets_total",
            "counter",
            "RTP packets forwarded by ended calls' bridges, by direction.",
            &[
                (
                    "{direction=\"to_sip\"}".into(),
                    load(&self.packets_to_sip).to_string(),
                ),
                (
                    "{direction=\"to_browser\"}".into(),
                    load(&self.packets_to_browser).to_string(),
                ),
            ],
        );
        metric(
            "callgate_media_packets_lost_total",
            "counter",
            "RTP packets the SIP side sent that never arrived (ended calls).",
            &one(load(&self.packets_lost).to_string()),
        );
        metric(
            "callgate_media_far_end_lost_total",
            "counter",
            "RTP packets the SIP side reported lost in its RTCP (ended calls).",
            &one(load(&self.far_end_lost).to_string()),
        );
        metric(
            "callgate_sip_datagrams_total",
            "counter",
            "SIP datagrams, by direction.",
            &[
                ("{direction=\"received\"}".into(), sip.received.to_string()),
                ("{direction=\"sent\"}".into(), sip.sent.to_string()),
            ],
        );
        metric(
            "callgate_sip_malformed_total",
            "counter",
            "SIP datagrams dropped as malformed.",
            &one(sip.malformed.to_string()),
        );
        metric(
            "callgate_sip_panics_total",
            "counter",
            "SIP inputs dropped because handling them panicked (a bug: please report it).",
            &one(sip.panics.to_string()),
        );
        if let Some(hooks) = self.webhooks.get().filter(|h| !h.is_empty()) {
            webhook_metrics(&mut metric, hooks);
        }
        o
    }
}

/// `callgate_webhook_*`, one sample per app with a webhook.
fn webhook_metrics(
    metric: &mut impl FnMut(&str, &str, &str, &[(String, String)]),
    hooks: &crate::webhook::AllStats,
) {
    let per_app = |f: &dyn Fn(&crate::webhook::Stats) -> String, extra: &str| {
        hooks
            .iter()
            .map(|(app, s)| (format!("{{app=\"{}\"{extra}}}", label(app)), f(s)))
            .collect::<Vec<_>>()
    };
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
    metric(
        "callgate_webhook_delivered_total",
        "counter",
        "Events delivered to the app's webhook (2xx).",
        &per_app(&|s| n(&s.delivered), ""),
    );
    metric(
        "callgate_webhook_failed_attempts_total",
        "counter",
        "Webhook attempts that failed (unreachable, timeout, non-2xx); each retry counts.",
        &per_app(&|s| n(&s.failed_attempts), ""),
    );
    let mut dropped = per_app(&|s| n(&s.expired), ",reason=\"expired\"");
    dropped.extend(per_app(&|s| n(&s.refused), ",reason=\"refused\""));
    dropped.extend(per_app(&|s| n(&s.queue_full), ",reason=\"queue_full\""));
    metric(
        "callgate_webhook_dropped_total",
        "counter",
        "Webhook events given up: older than max_age, refused (4xx) max times, or the queue full.",
        &dropped,
    );
    metric(
        "callgate_webhook_queue",
        "gauge",
        "Webhook events waiting to be delivered.",
        &per_app(&|s| s.waiting.load(Ordering::Relaxed).to_string(), ""),
    );
    let now = crate::cdr::unix_ms();
    metric(
        "callgate_webhook_oldest_age_seconds",
        "gauge",
        "Age of the oldest webhook event waiting (0: none): alert when it grows.",
        &per_app(
            &|s| match s.oldest.load(Ordering::Relaxed) {
                0 => "0".into(),
                t => format!("{:.3}", (now - t).max(0) as f64 / 1000.0),
            },
            "",
        ),
    );
}

/// A label value with `\`, `"` and newlines escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_format() {
        let m = Metrics::default();
        m.websocket(1);
        m.agent(1);
        m.token_failure("bad_mac");
        m.token_failure("bad_mac");
        m.call_started(Direction::Outbound);
        m.call_ended("remote_hangup");
        m.call_state(None, Some("ringing"));
        m.call_state(Some("ringing"), Some("established"));
        m.call_state(None, Some("established"));
        m.call_state(Some("established"), None);
        m.call_setup(Duration::from_millis(300));
        m.media(50, 49, 1);
        let mut sip = SipSnapshot {
            calls: 1,
            ..Default::default()
        };
        sip.registrations.insert("registered", 1);
        let text = m.render(
            &sip,
            &Gauges {
                sse_subscribers: 3,
                insecure_apps: 2,
                history_write_failures: 4,
                tasks: 17,
            },
        );
        for line in [
            "# TYPE callgate_token_failures_total counter",
            "callgate_token_failures_total{code=\"bad_mac\"} 2",
            "callgate_registrations{state=\"registered\"} 1",
            "callgate_calls_started_total{direction=\"outbound\"} 1",
            "callgate_calls_ended_total{reason=\"remote_hangup\"} 1",
            "callgate_call_setup_seconds_bucket{le=\"0.25\"} 0",
            "callgate_call_setup_seconds_bucket{le=\"0.5\"} 1",
            "callgate_call_setup_seconds_bucket{le=\"+Inf\"} 1",
            "callgate_call_setup_seconds_sum 0.3",
            "callgate_media_packets_lost_total 1",
            "callgate_draining 0",
            "callgate_apps_insecure 2",
            "callgate_tasks 17",
            "callgate_history_write_failures_total 4",
            "callgate_calls{state=\"ringing\"} 0",
            "callgate_calls{state=\"established\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        // Every sample line is `name{labels} value` with a numeric value.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let v = l.rsplit(' ').next().unwrap();
            assert!(v.parse::<f64>().is_ok(), "{l}");
        }
        assert_eq!(label("a\"b\\c\n"), "a\\\"b\\\\c\\n");
    }
}
