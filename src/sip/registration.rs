//! One SIP account's registration (RFC 3261 §10), sans-IO.
//!
//! The owner (the endpoint driver) sends what [`Registration::poll_request`] gives through a client
//! transaction, and feeds back the final response ([`handle_response`]) or the transaction's
//! timeout ([`handle_tx_timeout`]). It calls [`handle_timeout`] when `now >= poll_timeout()`
//! (refresh, retry, keepalive) and reads status changes from [`poll_event`].
//!
//! Only one REGISTER is outstanding at a time (§10.2). A chain of REGISTERs (first try, answers
//! to challenges, 423 retries) ends with one outcome. Within a chain, a second non-`stale`
//! challenge after we answered one means the credentials are wrong: we stop, without retrying.
//!
//! [`handle_response`]: Registration::handle_response
//! [`handle_tx_timeout`]: Registration::handle_tx_timeout
//! [`handle_timeout`]: Registration::handle_timeout
//! [`poll_event`]: Registration::poll_event

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::digest::{Answer, Challenge};
use super::message::{Builder, Message, header_param, name_addr_uri, split_list};
use crate::account::SipAccount;

/// Most challenges answered in one chain (guards against endless `stale=true`).
const MAX_AUTH_ROUNDS: u32 = 4;

/// A keepalive answered this long after it was sent went unanswered through at least three
/// retransmissions (RFC 3261 Timer E with the default T1: 0.5, 1 and 2 s): the registrar was out of reach, and may
/// have restarted and lost the binding meanwhile, so callgate registers again.
const KEEPALIVE_LATE: Duration = Duration::from_secs(4);

/// Longest wait between refreshes, whatever expiry the registrar grants (one day).
const MAX_REFRESH_SECS: u64 = 86_400;

/// Registration settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Expiry asked for.
    pub expires: Duration,
    /// First retry delay after a failure; doubles per failure.
    pub retry_min: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// OPTIONS keepalive interval toward the registrar/proxy while registered (`None`: off).
    pub keepalive: Option<Duration>,
    /// User-Agent header.
    pub user_agent: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            expires: Duration::from_secs(600),
            retry_min: Duration::from_secs(5),
            retry_max: Duration::from_secs(300),
            keepalive: Some(Duration::from_secs(30)),
            user_agent: "callgate".into(),
        }
    }
}

/// Status of a registration, as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Status {
    /// Not registered and not trying.
    Idle,
    /// First REGISTER chain in progress.
    Registering,
    /// Bound at the registrar.
    Registered {
        /// Seconds the registrar granted.
        expires: u32,
        /// Successful REGISTERs so far (1 after the first, +1 per refresh).
        count: u32,
    },
    /// The last attempt failed.
    Failed {
        /// SIP status (408 for no answer).
        status: u16,
        /// Reason phrase or explanation.
        reason: String,
        /// Whether callgate retries on its own (false for wrong credentials, 403, 404).
        retrying: bool,
    },
    /// Unregistered on request.
    Unregistered,
}

/// A request the owner must send in a new client transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// What it is for.
    pub purpose: Purpose,
    /// Wire bytes (fresh branch).
    pub data: Vec<u8>,
}

/// What an outgoing request is for; the owner hands it back with the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A REGISTER.
    Register,
    /// An OPTIONS keepalive.
    Keepalive,
}

/// Where the registration's identity and transport addresses come from.
#[derive(Debug, Clone)]
pub struct Binding {
    /// host:port written in Via and Contact (public address behind NAT).
    pub via_host: String,
    /// Unique user part of our Contact: inbound requests for this account carry it.
    pub contact_user: String,
    /// Call-ID for all REGISTERs of this binding (§10.2.4: same Call-ID for refreshes).
    pub call_id: String,
    /// From tag.
    pub from_tag: String,
    /// Whether `via_host` was configured (then `received`/`rport` do not change it).
    pub fixed_public_address: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Goal {
    Registered,
    Unregistered,
}

/// One account's registration state machine.
#[derive(Debug)]
pub struct Registration {
    account: SipAccount,
    settings: Settings,
    binding: Binding,
    request_uri: String,
    cseq: u32,
    rng: super::IdGen,
    goal: Goal,
    status: Status,
    /// The goal of the REGISTER in flight, if one is.
    in_flight: Option<Goal>,
    /// Whether a binding may exist at the registrar (a REGISTER ever succeeded).
    ever_registered: bool,
    /// Challenges answered in this chain (bounded: a registrar that keeps saying `stale`).
    auth_rounds: u32,
    /// When the OPTIONS keepalive in flight was sent.
    keepalive_sent: Option<Instant>,
    /// Expires we ask for now (raised by 423).
    asking: Duration,
    challenge: Option<Challenge>,
    nc: u32,
    /// This chain already answered a fresh challenge.
    answered_challenge: bool,
    failures: u32,
    refresh_at: Option<Instant>,
    retry_at: Option<Instant>,
    keepalive_at: Option<Instant>,
    out: VecDeque<Outgoing>,
    events: VecDeque<Status>,
}

impl Registration {
    /// A registration for `account`, bound as `binding`; nothing is sent until [`start`](Self::start).
    pub fn new(
        account: SipAccount,
        settings: Settings,
        binding: Binding,
        seed: u64,
    ) -> Registration {
        let request_uri = match (&account.outbound_proxy, account.port) {
            (None, p) if p != crate::account::DEFAULT_SIP_PORT => {
                format!("sip:{}:{p}", account.domain)
            }
            _ => format!("sip:{}", account.domain),
        };
        let asking = settings.expires;
        Registration {
            account,
            settings,
            binding,
            request_uri,
            cseq: 0,
            rng: super::IdGen::new(seed),
            goal: Goal::Registered,
            status: Status::Idle,
            in_flight: None,
            ever_registered: false,
            auth_rounds: 0,
            keepalive_sent: None,
            asking,
            challenge: None,
            nc: 0,
            answered_challenge: false,
            failures: 0,
            refresh_at: None,
            retry_at: None,
            keepalive_at: None,
            out: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// The account.
    pub fn account(&self) -> &SipAccount {
        &self.account
    }

    /// Replaces the credentials used from the next request on (a newer token for the same
    /// identity).
    pub fn update_account(&mut self, account: SipAccount) {
        self.account = account;
    }

    /// Current status.
    pub fn status(&self) -> &Status {
        &self.status
    }

    /// Our Contact URI.
    pub fn contact_uri(&self) -> String {
        format!(
            "sip:{}@{};transport=udp",
            self.binding.contact_user, self.binding.via_host
        )
    }

    /// host:port we put in Via (and Contact).
    pub fn via_host(&self) -> &str {
        &self.binding.via_host
    }

    /// The unique Contact user part (inbound requests for this binding carry it).
    pub fn contact_user(&self) -> &str {
        &self.binding.contact_user
    }

    fn set_status(&mut self, s: Status) {
        if self.status != s {
            self.status = s.clone();
            self.events.push_back(s);
        }
    }

    /// Starts registering (or re-registering after `unregister`).
    pub fn start(&mut self, now: Instant) {
        self.goal = Goal::Registered;
        self.failures = 0;
        self.asking = self.settings.expires;
        if !matches!(self.status, Status::Registered { .. }) {
            self.set_status(Status::Registering);
        }
        self.begin_chain(now);
    }

    /// Removes the binding (Expires: 0). Reports [`Status::Unregistered`] when done.
    pub fn unregister(&mut self, now: Instant) {
        self.goal = Goal::Unregistered;
        self.refresh_at = None;
        self.retry_at = None;
        self.keepalive_at = None;
        if self.in_flight.is_some() {
            // §10.2: one REGISTER at a time; the in-flight one's outcome triggers the unregister.
            return;
        }
        if !self.ever_registered {
            self.set_status(Status::Unregistered);
            return;
        }
        self.begin_chain(now);
    }

    /// Whether the goal is reached and nothing is in flight (the owner may drop it).
    pub fn is_finished(&self) -> bool {
        self.goal == Goal::Unregistered
            && self.in_flight.is_none()
            && self.status == Status::Unregistered
    }

    fn begin_chain(&mut self, now: Instant) {
        let _ = now;
        self.answered_challenge = false;
        self.auth_rounds = 0;
        self.retry_at = None;
        self.refresh_at = None;
        if self.in_flight.is_none() {
            self.send_register();
        }
    }

    /// A request to the registrar: Request-URI, our Via with a fresh branch, Max-Forwards.
    fn request(&mut self, method: &str) -> Builder {
        let via = format!(
            "SIP/2.0/UDP {};branch=z9hG4bK{};rport",
            self.binding.via_host,
            self.rng.hex()
        );
        Builder::request(method, &self.request_uri)
            .header("Via", via)
            .header("Max-Forwards", "70")
    }

    fn send_register(&mut self) {
        self.cseq += 1;
        let expires = match self.goal {
            Goal::Registered => self.asking.as_secs(),
            Goal::Unregistered => 0,
        };
        let aor = format!("sip:{}@{}", self.account.login, self.account.domain);
        let from = match &self.account.visible_name {
            Some(name) => format!("\"{name}\" <{aor}>;tag={}", self.binding.from_tag),
            None => format!("<{aor}>;tag={}", self.binding.from_tag),
        };
        let mut b = self
            .request("REGISTER")
            .header("From", from)
            .header("To", format!("<{aor}>"))
            .header("Call-ID", self.binding.call_id.clone())
            .header("CSeq", format!("{} REGISTER", self.cseq))
            .header(
                "Contact",
                format!("<{}>;expires={expires}", self.contact_uri()),
            )
            .header("Expires", expires.to_string())
            .header(
                "Allow",
                "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, REFER, NOTIFY, UPDATE",
            )
            .header("User-Agent", self.settings.user_agent.clone());
        if let Some(ch) = &self.challenge {
            self.nc += 1;
            let cnonce = self.rng.hex();
            let answer = Answer {
                username: &self.account.auth_name,
                password: &self.account.password,
                method: "REGISTER",
                uri: &self.request_uri,
                body: b"",
                cnonce: &cnonce,
                nc: self.nc,
            };
            b = b.header(ch.kind.answer_header(), ch.authorization(&answer));
        }
        self.in_flight = Some(self.goal);
        self.out.push_back(Outgoing {
            purpose: Purpose::Register,
            data: b.build(),
        });
    }

    fn send_keepalive(&mut self, now: Instant) {
        let aor = format!("sip:{}@{}", self.account.login, self.account.domain);
        let b = self
            .request("OPTIONS")
            .header("From", format!("<{aor}>;tag={}", self.rng.hex()))
            .header("To", format!("<{}>", self.request_uri))
            .header("Call-ID", format!("ka-{}", self.rng.hex()))
            .header("CSeq", "1 OPTIONS")
            .header("User-Agent", self.settings.user_agent.clone());
        self.keepalive_sent = Some(now);
        self.out.push_back(Outgoing {
            purpose: Purpose::Keepalive,
            data: b.build(),
        });
    }

    /// A final response to a request of ours (provisionals are ignored).
    pub fn handle_response(&mut self, now: Instant, purpose: Purpose, resp: &Message) {
        let Some(code) = resp.status() else { return };
        if code < 200 {
            return;
        }
        if purpose == Purpose::Keepalive {
            let late = self
                .keepalive_sent
                .take()
                .is_some_and(|sent| now.saturating_duration_since(sent) >= KEEPALIVE_LATE);
            if late && self.goal == Goal::Registered && self.in_flight.is_none() {
                // The registrar was out of reach for a while: if it restarted meanwhile it has
                // forgotten the binding (and would still answer OPTIONS), so bind again now.
                self.begin_chain(now);
                return;
            }
            self.arm_keepalive(now);
            return;
        }
        let sent_for = self.in_flight.take();
        let moved = self.learn_public_address(resp);
        if sent_for == Some(Goal::Registered) && self.goal == Goal::Unregistered {
            // Unregister was asked for meanwhile: whatever this said, remove the binding now.
            if code < 300 {
                self.ever_registered = true;
            }
            if let Some(ch) = Challenge::best(Challenge::from_response(resp)) {
                self.challenge = Some(ch);
                self.nc = 0;
            }
            if self.ever_registered {
                self.begin_chain(now);
            } else {
                self.set_status(Status::Unregistered);
            }
            return;
        }
        let reason = match resp.start_line() {
            super::message::StartLine::Response { reason, .. } => reason,
            super::message::StartLine::Request { .. } => String::new(),
        };
        match code {
            200..=299 => {
                self.on_success(now, resp);
                if moved && self.goal == Goal::Registered {
                    // The binding just made names our old address: replace it at once.
                    self.refresh_at = Some(now);
                }
            }
            401 | 407 => {
                let Some(ch) = Challenge::best(Challenge::from_response(resp)) else {
                    return self.fail(
                        now,
                        code,
                        "challenge callgate cannot answer (no usable Digest algorithm)",
                        false,
                    );
                };
                if (self.answered_challenge && !ch.stale) || self.auth_rounds >= MAX_AUTH_ROUNDS {
                    // §22.2/§22.3: challenged again after answering → credentials refused.
                    self.challenge = None;
                    return self.fail(
                        now,
                        code,
                        &format!("{reason} (wrong user name or password)"),
                        false,
                    );
                }
                if self.challenge.as_ref().is_none_or(|c| c.nonce != ch.nonce) {
                    self.nc = 0;
                }
                // Preemptive credentials at the start of a chain (cached nonce) do not count:
                // only a challenge that answers our answer means the password is wrong.
                self.answered_challenge = true;
                self.auth_rounds += 1;
                self.challenge = Some(ch);
                self.send_register();
            }
            423 if self.goal == Goal::Registered => {
                let min = resp
                    .header("Min-Expires")
                    .and_then(|v| v.trim().parse::<u64>().ok());
                match min {
                    Some(m) if Duration::from_secs(m) > self.asking && m <= 86_400 => {
                        self.asking = Duration::from_secs(m);
                        self.send_register();
                    }
                    _ => self.fail(
                        now,
                        code,
                        "Interval Too Brief without a usable Min-Expires",
                        true,
                    ),
                }
            }
            403 | 404 => self.fail(now, code, &reason, false),
            _ => {
                let retry_after = resp.header("Retry-After").and_then(|v| {
                    v.split(|c: char| !c.is_ascii_digit())
                        .next()
                        .and_then(|n| n.parse::<u64>().ok())
                });
                self.fail_with_retry(now, code, &reason, retry_after.map(Duration::from_secs));
            }
        }
    }

    /// The REGISTER (or keepalive) transaction timed out (Timer F).
    pub fn handle_tx_timeout(&mut self, now: Instant, purpose: Purpose) {
        if purpose == Purpose::Keepalive {
            // The path to the registrar may be gone: re-REGISTER now, its outcome tells.
            self.keepalive_sent = None;
            if self.goal == Goal::Registered && self.in_flight.is_none() {
                self.begin_chain(now);
            }
            return;
        }
        self.in_flight = None;
        self.fail(
            now,
            408,
            "Request Timeout (no response from the registrar)",
            true,
        );
    }

    fn on_success(&mut self, now: Instant, resp: &Message) {
        self.failures = 0;
        if self.goal == Goal::Unregistered {
            self.ever_registered = false;
            self.set_status(Status::Unregistered);
            return;
        }
        self.ever_registered = true;
        let mine = self.contact_uri();
        let user = format!("sip:{}@", self.binding.contact_user);
        let contact_expires = resp
            .headers("Contact")
            .flat_map(split_list)
            .find(|c| {
                let uri = name_addr_uri(c);
                uri.eq_ignore_ascii_case(&mine) || uri.starts_with(&user)
            })
            .and_then(|c| {
                header_param(c, "expires")
                    .flatten()
                    .and_then(|v| v.parse::<u64>().ok())
            });
        let granted = contact_expires
            .or_else(|| resp.header("Expires").and_then(|v| v.trim().parse().ok()))
            .unwrap_or(self.asking.as_secs());
        if granted == 0 {
            // The registrar dropped our binding although we asked to keep it.
            return self.fail_with_retry(
                now,
                200,
                "registrar granted no binding (expires=0)",
                None,
            );
        }
        let count = match self.status {
            Status::Registered { count, .. } => count + 1,
            _ => 1,
        };
        let granted32 = u32::try_from(granted).unwrap_or(u32::MAX);
        self.set_status(Status::Registered {
            expires: granted32,
            count,
        });
        // Refresh well before expiry: at 80 %, and at least 5 s early when the binding is long;
        // at least daily, whatever the registrar says (`Expires: 18446744073709551615` used to
        // overflow the clock and panic the endpoint).
        let g = Duration::from_secs(granted.min(MAX_REFRESH_SECS));
        let lead = (g / 5).max(Duration::from_secs(5).min(g / 2));
        self.refresh_at = Some(now + g.saturating_sub(lead));
        self.arm_keepalive(now);
    }

    fn arm_keepalive(&mut self, now: Instant) {
        self.keepalive_at = match (self.settings.keepalive, &self.status, self.goal) {
            (Some(k), Status::Registered { .. }, Goal::Registered) => Some(now + k),
            _ => None,
        };
    }

    fn fail(&mut self, now: Instant, status: u16, reason: &str, retry: bool) {
        if retry {
            self.fail_with_retry(now, status, reason, None);
        } else {
            self.refresh_at = None;
            self.retry_at = None;
            self.keepalive_at = None;
            if self.goal == Goal::Unregistered {
                self.set_status(Status::Unregistered);
            } else {
                self.set_status(Status::Failed {
                    status,
                    reason: reason.to_owned(),
                    retrying: false,
                });
            }
        }
    }

    fn fail_with_retry(&mut self, now: Instant, status: u16, reason: &str, hint: Option<Duration>) {
        self.refresh_at = None;
        self.keepalive_at = None;
        if self.goal == Goal::Unregistered {
            // Best effort: the binding expires on its own.
            self.set_status(Status::Unregistered);
            return;
        }
        self.failures += 1;
        let backoff = self
            .settings
            .retry_min
            .saturating_mul(1u32 << self.failures.saturating_sub(1).min(16))
            .min(self.settings.retry_max);
        let delay = hint.map_or(backoff, |h| {
            h.clamp(self.settings.retry_min, self.settings.retry_max)
        });
        self.retry_at = Some(now + delay);
        self.set_status(Status::Failed {
            status,
            reason: reason.to_owned(),
            retrying: true,
        });
    }

    /// RFC 3581: when no public address is configured, learn it from `received`/`rport` and
    /// re-register with a Contact the registrar can reach.
    /// Returns whether the address changed.
    fn learn_public_address(&mut self, resp: &Message) -> bool {
        if self.binding.fixed_public_address {
            return false;
        }
        let Some(via) = resp.top_via() else {
            return false;
        };
        let (Some(received), Some(Some(rport))) = (via.received.as_deref(), via.rport) else {
            return false;
        };
        let Ok(ip) = received.parse::<std::net::IpAddr>() else {
            return false;
        };
        let learned = std::net::SocketAddr::new(ip, rport).to_string();
        if learned == self.binding.via_host {
            return false;
        }
        self.binding.via_host = learned;
        true
    }

    /// Fires refresh, retry and keepalive timers due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.retry_at.is_some_and(|t| t <= now) {
            self.retry_at = None;
            self.begin_chain(now);
        }
        if self.refresh_at.is_some_and(|t| t <= now) {
            self.refresh_at = None;
            self.begin_chain(now);
        }
        if self.keepalive_at.is_some_and(|t| t <= now) {
            self.keepalive_at = None;
            if self.keepalive_sent.is_none() && self.in_flight.is_none() {
                self.send_keepalive(now);
            }
        }
    }

    /// The next request to send.
    #[must_use]
    pub fn poll_request(&mut self) -> Option<Outgoing> {
        self.out.pop_front()
    }

    /// The next status change.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Status> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        [self.refresh_at, self.retry_at, self.keepalive_at]
            .into_iter()
            .flatten()
            .min()
    }
}

#[cfg(test)]
mod tests;
