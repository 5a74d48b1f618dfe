//! The demo PBX's SIP side, sans-IO: a registrar with digest authentication for the demo
//! extensions, and the test numbers (600 echo, 601 tone, 602 rings and calls the agent back).
//! It speaks plain SIP over UDP to callgate's own SIP side, so a demo call takes the path a
//! production call takes. No socket, clock or randomness of its own: the shell passes
//! datagrams and `now` in, a seed for ids at construction, and carries out [`Output`]s.
//!
//! Call order: [`Pbx::handle_datagram`] / [`Pbx::handle_timeout`], then [`Pbx::poll_output`]
//! until `None`; sleep until [`Pbx::poll_timeout`].
//!
//! It is a demo, not a PBX: one UDP peer (callgate), no transaction layer (loopback loses no
//! datagram; a retransmitted request is answered again), no calls between extensions.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::secret::SecretString;
use crate::sip::digest::Authorization;
use crate::sip::message::{Builder, Message, response_to};
use crate::sip::sdp::{AudioSdp, Direction};

/// The echo number: what the caller says comes back.
pub const ECHO: &str = "600";
/// The tone number: a 440 Hz tone.
pub const TONE: &str = "601";
/// The call-back number: rings, declines, then calls the caller.
pub const CALLBACK: &str = "602";

/// The realm of the registrar's challenges.
pub const REALM: &str = "callgate-demo";
/// How long a registration lasts at most.
const MAX_EXPIRES: u32 = 3600;
/// How long the call-back number rings before it declines.
const CALLBACK_RINGS: Duration = Duration::from_millis(1500);
/// Then how long until it calls back.
const CALLBACK_AFTER: Duration = Duration::from_secs(2);
/// Any demo call is hung up after this.
const MAX_CALL: Duration = Duration::from_secs(600);
/// A nonce is good for this long.
const NONCE_LIFE: Duration = Duration::from_secs(300);
/// Challenges outstanding at most.
const MAX_NONCES: usize = 1024;
/// Calls at once at most (each holds an RTP port).
const MAX_CALLS: usize = 32;

/// What the number plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Play {
    /// Sends back what it receives.
    Echo,
    /// Sends a 440 Hz tone.
    Tone,
    /// Sends nothing (the far end holds the call).
    Quiet,
}

/// The media of one demo call, for the shell's RTP task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Media {
    /// The call (for [`Output::StopMedia`]).
    pub call: u64,
    /// Local RTP port (127.0.0.1).
    pub port: u16,
    /// Where callgate's RTP leg listens.
    pub remote: SocketAddr,
    /// The voice payload type (0 PCMU, 8 PCMA).
    pub pt: u8,
    /// What it plays.
    pub play: Play,
}

/// What the shell does next.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Output {
    /// Send a datagram.
    Transmit {
        /// To.
        to: SocketAddr,
        /// The SIP message.
        bytes: Vec<u8>,
    },
    /// Start a call's RTP, or change it (a new far end, hold, resume).
    StartMedia(Media),
    /// Stop a call's RTP.
    StopMedia {
        /// The call.
        call: u64,
    },
}

/// A registered extension.
#[derive(Debug, Clone)]
struct Binding {
    source: SocketAddr,
    contact: String,
    until: Instant,
}

#[derive(Debug)]
enum Leg {
    /// callgate called a number; `invite` is kept to answer it late (call-back's decline).
    Inbound {
        invite: Box<Message>,
        answered: bool,
    },
    /// A demo number calls an extension (the call-back, or a transfer's target).
    Outbound {
        cseq: u32,
        answered: bool,
        play: Play,
        /// The call whose REFER this call carries out (told of the outcome by NOTIFY).
        refer_of: Option<String>,
    },
}

#[derive(Debug)]
struct Call {
    id: u64,
    peer: SocketAddr,
    our_tag: String,
    leg: Leg,
    port: u16,
    /// The dialog's From and To as we send them in requests (for BYE).
    local: String,
    remote: String,
    target: String,
    /// The CSeq of our last request in the dialog.
    cseq: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Timer {
    /// The call-back number declines the call `call_id` and schedules the call-back.
    Decline { call_id: String, ext: String },
    /// It calls `ext` back.
    CallBack { ext: String },
    /// A call lasted [`MAX_CALL`].
    HangUp { call_id: String },
}

/// The demo PBX.
#[derive(Debug)]
pub struct Pbx {
    local: SocketAddr,
    passwords: HashMap<String, SecretString>,
    bindings: HashMap<String, Binding>,
    nonces: HashMap<String, Instant>,
    calls: HashMap<String, Call>,
    timers: Vec<(Instant, Timer)>,
    ports: VecDeque<u16>,
    out: VecDeque<Output>,
    rng: u64,
    next_call: u64,
}

impl Pbx {
    /// A PBX at `local` (127.0.0.1:port) for `extensions` (number, password), with RTP ports
    /// `ports` and `seed` for its tags, branches and nonces.
    pub fn new(
        local: SocketAddr,
        extensions: Vec<(String, SecretString)>,
        ports: Vec<u16>,
        seed: u64,
    ) -> Pbx {
        Pbx {
            local,
            passwords: extensions.into_iter().collect(),
            bindings: HashMap::new(),
            nonces: HashMap::new(),
            calls: HashMap::new(),
            timers: Vec::new(),
            ports: ports.into(),
            out: VecDeque::new(),
            rng: seed,
            next_call: 0,
        }
    }

    /// Whether `ext` is registered now.
    pub fn is_registered(&self, ext: &str, now: Instant) -> bool {
        self.bindings.get(ext).is_some_and(|b| b.until > now)
    }

    /// A datagram from `from`.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        let Ok(msg) = Message::parse(datagram) else {
            return;
        };
        if msg.is_request() {
            self.handle_request(now, from, &msg);
        } else {
            self.handle_response(from, &msg);
        }
    }

    /// Time has come for a timer (call at [`poll_timeout`](Self::poll_timeout) or later).
    pub fn handle_timeout(&mut self, now: Instant) {
        let (due, later): (Vec<_>, Vec<_>) = self.timers.drain(..).partition(|(t, _)| *t <= now);
        self.timers = later;
        for (_, timer) in due {
            match timer {
                Timer::Decline { call_id, ext } => self.decline(now, &call_id, ext),
                Timer::CallBack { ext } => self.call_back(now, &ext),
                Timer::HangUp { call_id } => self.hang_up(&call_id),
            }
        }
        self.nonces.retain(|_, t| *t > now);
        self.bindings.retain(|_, b| b.until > now);
    }

    /// The next thing to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When to call [`handle_timeout`](Self::handle_timeout).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.iter().map(|(t, _)| *t).min()
    }

    fn id(&mut self) -> String {
        // splitmix64: ids that do not repeat, from the shell's random seed.
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        format!("{:016x}", z ^ (z >> 31))
    }

    fn send(&mut self, to: SocketAddr, b: Builder) {
        let b = b.header("Server", "callgate-demo-pbx");
        self.out.push_back(Output::Transmit {
            to,
            bytes: b.build(),
        });
    }

    fn reply(&mut self, to: SocketAddr, req: &Message, code: u16, reason: &str) {
        let b = response_to(req, code, reason, None);
        self.send(to, b);
    }

    /// One of our requests, with its Via (branch `branch`), Max-Forwards, From, To, Call-ID
    /// and CSeq.
    fn request(
        &self,
        method: &str,
        target: &str,
        (from, to): (&str, &str),
        (call_id, cseq): (&str, u32),
        branch: &str,
    ) -> Builder {
        Builder::request(method, target)
            .header(
                "Via",
                format!("SIP/2.0/UDP {};branch={branch};rport", self.local),
            )
            .header("Max-Forwards", "70")
            .header("From", from)
            .header("To", to)
            .header("Call-ID", call_id)
            .header("CSeq", format!("{cseq} {method}"))
    }

    /// A call of ours begins: hung up after [`MAX_CALL`] at the latest.
    fn admit(&mut self, now: Instant, call_id: String, call: Call) {
        self.timers.push((
            now + MAX_CALL,
            Timer::HangUp {
                call_id: call_id.clone(),
            },
        ));
        self.calls.insert(call_id, call);
        self.next_call += 1;
    }

    fn handle_request(&mut self, now: Instant, from: SocketAddr, req: &Message) {
        match req.method() {
            "REGISTER" => self.register(now, from, req),
            "INVITE" if req.to_tag().is_some() => self.reinvite(from, req),
            "INVITE" => self.invite(now, from, req),
            "ACK" => {}
            "BYE" => {
                self.reply(from, req, 200, "OK");
                if let Some(id) = req.call_id() {
                    self.forget(id);
                }
            }
            "CANCEL" => self.cancel(from, req),
            "REFER" => self.refer(now, from, req),
            "NOTIFY" => self.reply(from, req, 200, "OK"),
            "OPTIONS" => self.reply(from, req, 200, "OK"),
            _ => self.reply(from, req, 405, "Method Not Allowed"),
        }
    }

    fn register(&mut self, now: Instant, from: SocketAddr, req: &Message) {
        let ext = req.header("To").map(user_of).unwrap_or_default();
        let Some(password) = self.passwords.get(&ext).cloned() else {
            self.reply(from, req, 404, "Not Found (demo extensions only)");
            return;
        };
        let authorized = req
            .header("Authorization")
            .and_then(Authorization::parse)
            .filter(|a| {
                a.username == ext
                    && a.realm == REALM
                    && self.nonces.get(&a.nonce).is_some_and(|t| *t > now)
            })
            .is_some_and(|a| a.verify("REGISTER", &password));
        if !authorized {
            let nonce = self.id();
            if self.nonces.len() >= MAX_NONCES {
                // A flood of unanswered challenges: the oldest go (a client mid-login retries).
                self.nonces.retain(|_, t| *t > now + NONCE_LIFE / 2);
                if self.nonces.len() >= MAX_NONCES {
                    self.nonces.clear();
                }
            }
            self.nonces.insert(nonce.clone(), now + NONCE_LIFE);
            let b = response_to(req, 401, "Unauthorized", Some(&self.id())).header(
                "WWW-Authenticate",
                format!("Digest realm=\"{REALM}\", nonce=\"{nonce}\", algorithm=MD5, qop=\"auth\""),
            );
            self.send(from, b);
            return;
        }
        let contact = req.header("Contact").unwrap_or_default().to_owned();
        let asked = req
            .header("Expires")
            .and_then(|e| e.trim().parse::<u32>().ok())
            .or_else(|| {
                crate::sip::message::header_param(&contact, "expires")
                    .flatten()
                    .and_then(|e| e.parse().ok())
            })
            .unwrap_or(MAX_EXPIRES);
        let expires = asked.min(MAX_EXPIRES);
        let uri = crate::sip::message::name_addr_uri(&contact).to_owned();
        if expires == 0 || contact.trim() == "*" {
            self.bindings.remove(&ext);
            let b = response_to(req, 200, "OK", Some(&self.id()));
            self.send(from, b);
            return;
        }
        self.bindings.insert(
            ext,
            Binding {
                source: from,
                contact: uri.clone(),
                until: now + Duration::from_secs(u64::from(expires)),
            },
        );
        let b = response_to(req, 200, "OK", Some(&self.id()))
            .header("Contact", format!("<{uri}>;expires={expires}"))
            .header("Expires", expires.to_string());
        self.send(from, b);
    }

    /// The extension registered from `from` that `req` comes from, if any.
    fn caller(&self, now: Instant, from: SocketAddr, req: &Message) -> Option<String> {
        let ext = req.header("From").map(user_of)?;
        self.bindings
            .get(&ext)
            .filter(|b| b.source == from && b.until > now)
            .map(|_| ext)
    }

    fn invite(&mut self, now: Instant, from: SocketAddr, req: &Message) {
        let Some(call_id) = req.call_id().map(str::to_owned) else {
            return;
        };
        if self.calls.contains_key(&call_id) {
            return; // a retransmission: answered already
        }
        let Some(ext) = self.caller(now, from, req) else {
            self.reply(
                from,
                req,
                403,
                "Forbidden (register a demo extension first)",
            );
            return;
        };
        let number = uri_user(&req_uri(req));
        let play = match number.as_str() {
            ECHO | CALLBACK => Play::Echo,
            TONE => Play::Tone,
            _ => {
                self.reply(
                    from,
                    req,
                    404,
                    "Not Found (demo numbers: 600 echo, 601 tone, 602 call-back)",
                );
                return;
            }
        };
        if self.calls.len() >= MAX_CALLS {
            self.reply(from, req, 486, "Busy Here (demo calls at their limit)");
            return;
        }
        let Some(offer) = AudioSdp::parse(req.body()).ok() else {
            self.reply(from, req, 488, "Not Acceptable Here (no audio offer)");
            return;
        };
        let our_tag = self.id();
        if number == CALLBACK {
            let ringing = response_to(req, 180, "Ringing", Some(&our_tag));
            self.send(from, ringing);
            self.timers.push((
                now + CALLBACK_RINGS,
                Timer::Decline {
                    call_id: call_id.clone(),
                    ext,
                },
            ));
            self.calls.insert(
                call_id,
                Call {
                    id: self.next_call,
                    peer: from,
                    our_tag,
                    leg: Leg::Inbound {
                        invite: Box::new(req.clone()),
                        answered: false,
                    },
                    port: 0,
                    local: String::new(),
                    remote: String::new(),
                    target: String::new(),
                    cseq: 0,
                },
            );
            self.next_call += 1;
            return;
        }
        let Some(port) = self.ports.pop_front() else {
            self.reply(from, req, 486, "Busy Here (no demo media port free)");
            return;
        };
        let Some((answer, media)) = self.answer(&offer, port, play) else {
            self.ports.push_back(port);
            self.reply(from, req, 488, "Not Acceptable Here (PCMU or PCMA only)");
            return;
        };
        let contact = format!("<sip:{number}@{}>", self.local);
        let ok = response_to(req, 200, "OK", Some(&our_tag))
            .header("Contact", contact)
            .body("application/sdp", answer.into_bytes());
        self.send(from, ok);
        self.out.push_back(Output::StartMedia(media));
        let to = req.header("To").unwrap_or_default();
        let remote_contact = req
            .header("Contact")
            .map(crate::sip::message::name_addr_uri)
            .unwrap_or_default()
            .to_owned();
        self.admit(
            now,
            call_id,
            Call {
                id: self.next_call,
                peer: from,
                our_tag: our_tag.clone(),
                leg: Leg::Inbound {
                    invite: Box::new(req.clone()),
                    answered: true,
                },
                port,
                local: format!("{to};tag={our_tag}"),
                remote: req.header("From").unwrap_or_default().to_owned(),
                target: remote_contact,
                cseq: 0,
            },
        );
    }

    /// SDP answer and media plan for `offer` on `port`.
    fn answer(&mut self, offer: &AudioSdp, port: u16, play: Play) -> Option<(String, Media)> {
        let local_ip = self.local.ip();
        let sdp = AudioSdp::answer(
            offer,
            local_ip,
            port,
            &["PCMU", "PCMA"],
            self.next_call + 1,
            Direction::SendRecv,
        )
        .ok()?;
        let pt = sdp.voice_codec()?.pt;
        let media = Media {
            call: self.next_call,
            port,
            remote: SocketAddr::new(offer.addr, offer.port),
            pt,
            play,
        };
        Some((sdp.to_sdp(), media))
    }

    /// A re-INVITE (hold, resume, new media): answered with the same port, media restarted
    /// toward the new address, silent while the far end holds.
    fn reinvite(&mut self, from: SocketAddr, req: &Message) {
        let Some(call_id) = req.call_id() else {
            return;
        };
        let Some((id, port, tag)) = self
            .calls
            .get(call_id)
            .map(|c| (c.id, c.port, c.our_tag.clone()))
        else {
            self.reply(from, req, 481, "Call/Transaction Does Not Exist");
            return;
        };
        let Some(offer) = AudioSdp::parse(req.body()).ok() else {
            self.reply(from, req, 488, "Not Acceptable Here");
            return;
        };
        let play = match self.calls.get(call_id).map(|c| &c.leg) {
            Some(Leg::Inbound { invite, .. }) if uri_user(&req_uri(invite)) == TONE => Play::Tone,
            _ => Play::Echo,
        };
        let saved = self.next_call;
        self.next_call = id;
        let planned = self.answer(&offer, port, play);
        self.next_call = saved;
        let Some((answer, media)) = planned else {
            self.reply(from, req, 488, "Not Acceptable Here");
            return;
        };
        let ok = response_to(req, 200, "OK", Some(&tag))
            .header("Contact", format!("<sip:demo@{}>", self.local))
            .body("application/sdp", answer.into_bytes());
        self.send(from, ok);
        let held = matches!(offer.direction, Direction::SendOnly | Direction::Inactive)
            || offer.addr.is_unspecified();
        let play = if held { Play::Quiet } else { media.play };
        self.out
            .push_back(Output::StartMedia(Media { play, ..media }));
    }

    fn cancel(&mut self, from: SocketAddr, req: &Message) {
        self.reply(from, req, 200, "OK");
        let Some(call_id) = req.call_id().map(str::to_owned) else {
            return;
        };
        let pending = match self.calls.get(&call_id) {
            Some(Call {
                leg: Leg::Inbound { invite, answered },
                our_tag,
                ..
            }) if !answered => Some((invite.clone(), our_tag.clone())),
            _ => None,
        };
        if let Some((invite, tag)) = pending {
            let b = response_to(&invite, 487, "Request Terminated", Some(&tag));
            self.send(from, b);
            self.calls.remove(&call_id);
            self.timers
                .retain(|(_, t)| !matches!(t, Timer::Decline { call_id: c, .. } if *c == call_id));
        }
    }

    /// The call-back number declines, and calls back later.
    fn decline(&mut self, now: Instant, call_id: &str, ext: String) {
        let Some(call) = self.calls.remove(call_id) else {
            return;
        };
        if let Leg::Inbound { invite, .. } = &call.leg {
            let b = response_to(
                invite,
                480,
                "Temporarily Unavailable (calling you back)",
                Some(&call.our_tag),
            );
            self.send(call.peer, b);
        }
        self.timers
            .push((now + CALLBACK_AFTER, Timer::CallBack { ext }));
    }

    /// The call-back number calls `ext`.
    fn call_back(&mut self, now: Instant, ext: &str) {
        let _ = self.dial(now, ext, CALLBACK, Play::Echo, None);
    }

    /// Demo number `number` calls extension `ext`, playing `play`; `false` if it cannot
    /// (not registered, no port, too many calls).
    fn dial(
        &mut self,
        now: Instant,
        ext: &str,
        number: &str,
        play: Play,
        refer_of: Option<String>,
    ) -> bool {
        let Some(binding) = self.bindings.get(ext).filter(|b| b.until > now).cloned() else {
            return false;
        };
        if self.calls.len() >= MAX_CALLS {
            return false;
        }
        let Some(port) = self.ports.pop_front() else {
            return false;
        };
        let call_id = format!("{}@callgate-demo", self.id());
        let tag = self.id();
        let branch = format!("z9hG4bK{}", self.id());
        let name = match number {
            ECHO => "Demo echo",
            TONE => "Demo tone",
            _ => "Demo call-back",
        };
        let local = format!("\"{name}\" <sip:{number}@{}>;tag={tag}", self.local);
        let remote = format!("<sip:{ext}@{}>", self.local.ip());
        let offer = AudioSdp::offer(
            self.local.ip(),
            port,
            &["PCMU", "PCMA"],
            self.next_call + 1,
            Direction::SendRecv,
        );
        let b = self
            .request(
                "INVITE",
                &binding.contact,
                (&local, &remote),
                (&call_id, 1),
                &branch,
            )
            .header("Contact", format!("<sip:{number}@{}>", self.local))
            .body("application/sdp", offer.to_sdp().into_bytes());
        self.send(binding.source, b);
        self.admit(
            now,
            call_id,
            Call {
                id: self.next_call,
                peer: binding.source,
                our_tag: tag,
                leg: Leg::Outbound {
                    cseq: 1,
                    answered: false,
                    play,
                    refer_of,
                },
                port,
                local,
                remote,
                target: binding.contact,
                cseq: 1,
            },
        );
        true
    }

    /// A REFER in a demo call (the agent transfers it, blind): 202, then the demo number
    /// calls the target extension, and the agent's side hears how it went by NOTIFY.
    fn refer(&mut self, now: Instant, from: SocketAddr, req: &Message) {
        let Some(call_id) = req.call_id().map(str::to_owned) else {
            return;
        };
        let Some(call) = self.calls.get(&call_id) else {
            self.reply(from, req, 481, "Call/Transaction Does Not Exist");
            return;
        };
        let (number, play) = match &call.leg {
            Leg::Inbound { invite, .. } => {
                let number = uri_user(&req_uri(invite));
                let play = if number == TONE {
                    Play::Tone
                } else {
                    Play::Echo
                };
                (number, play)
            }
            Leg::Outbound { play, .. } => (CALLBACK.to_owned(), *play),
        };
        let Some(ext) = req.header("Refer-To").map(user_of) else {
            self.reply(from, req, 400, "Bad Request (no Refer-To)");
            return;
        };
        self.reply(from, req, 202, "Accepted");
        self.notify(&call_id, "SIP/2.0 100 Trying", false);
        if !self.dial(now, &ext, &number, play, Some(call_id.clone())) {
            self.notify(&call_id, "SIP/2.0 404 Not Found", true);
        }
    }

    /// Tells the referrer of call `call_id` how its transfer goes (RFC 3515 §2.4.5).
    fn notify(&mut self, call_id: &str, sipfrag: &str, done: bool) {
        let state = if done {
            "terminated;reason=noresource"
        } else {
            "active;expires=60"
        };
        self.in_dialog(call_id, "NOTIFY", |b| {
            b.header("Event", "refer")
                .header("Subscription-State", state)
                .body(
                    "message/sipfrag;version=2.0",
                    format!("{sipfrag}\r\n").into_bytes(),
                )
        });
    }

    /// Sends a request in call `call_id`'s dialog.
    fn in_dialog(&mut self, call_id: &str, method: &str, more: impl FnOnce(Builder) -> Builder) {
        let branch = format!("z9hG4bK{}", self.id());
        let Some(call) = self.calls.get_mut(call_id) else {
            return;
        };
        call.cseq += 1;
        let call = &self.calls[call_id];
        let b = self
            .request(
                method,
                &call.target,
                (&call.local, &call.remote),
                (call_id, call.cseq),
                &branch,
            )
            .header("Contact", format!("<sip:demo@{}>", self.local));
        let peer = call.peer;
        let b = more(b);
        self.send(peer, b);
    }

    fn handle_response(&mut self, from: SocketAddr, resp: &Message) {
        let Some(call_id) = resp.call_id().map(str::to_owned) else {
            return;
        };
        let Some((_, method)) = resp.cseq() else {
            return;
        };
        let status = resp.status().unwrap_or(0);
        if method != "INVITE" || status < 200 {
            return;
        }
        let Some(call) = self.calls.get_mut(&call_id) else {
            return;
        };
        let Leg::Outbound {
            cseq,
            answered,
            play,
            refer_of,
        } = &mut call.leg
        else {
            return;
        };
        let cseq = *cseq;
        let first = !*answered;
        let play = *play;
        // A transfer's outcome goes to the referrer once, with the first final answer.
        let referrer = if first { refer_of.take() } else { None };
        let to = resp.header("To").unwrap_or_default().to_owned();
        if status < 300 {
            *answered = true;
            call.remote = to.clone();
            if let Some(c) = resp.header("Contact") {
                call.target = crate::sip::message::name_addr_uri(c).to_owned();
            }
        }
        let target = call.target.clone();
        let local = call.local.clone();
        let (id, port) = (call.id, call.port);
        // ACK: for a 2xx its own transaction, for a failure the INVITE's (same branch).
        let branch = match (status < 300, resp.top_via()) {
            (false, Some(v)) => v.branch.unwrap_or_default(),
            _ => format!("z9hG4bK{}", self.id()),
        };
        let ack = self.request("ACK", &target, (&local, &to), (&call_id, cseq), &branch);
        self.send(from, ack);
        if let Some(referrer) = referrer {
            let reason = match resp.start_line() {
                crate::sip::message::StartLine::Response { reason, .. } => reason,
                crate::sip::message::StartLine::Request { .. } => String::new(),
            };
            self.notify(&referrer, &format!("SIP/2.0 {status} {reason}"), true);
        }
        if status >= 300 {
            self.forget(&call_id);
            return;
        }
        if first {
            if let Ok(answer) = AudioSdp::parse(resp.body()) {
                if let Some(codec) = answer.voice_codec() {
                    self.out.push_back(Output::StartMedia(Media {
                        call: id,
                        port,
                        remote: SocketAddr::new(answer.addr, answer.port),
                        pt: codec.pt,
                        play,
                    }));
                }
            }
        }
    }

    /// Our side ends call `call_id` (its time is up).
    fn hang_up(&mut self, call_id: &str) {
        let Some(call) = self.calls.get(call_id) else {
            return;
        };
        let live = match &call.leg {
            Leg::Inbound { answered, .. } | Leg::Outbound { answered, .. } => *answered,
        };
        if live {
            self.in_dialog(call_id, "BYE", |b| b);
        }
        self.forget(call_id);
    }

    /// Call `call_id` is over: its media stops and its port is free again.
    fn forget(&mut self, call_id: &str) {
        let Some(call) = self.calls.remove(call_id) else {
            return;
        };
        if call.port != 0 {
            self.out.push_back(Output::StopMedia { call: call.id });
            self.ports.push_back(call.port);
        }
        self.timers.retain(|(_, t)| match t {
            Timer::HangUp { call_id: c } | Timer::Decline { call_id: c, .. } => c != call_id,
            Timer::CallBack { .. } => true,
        });
    }

    /// The address the PBX listens on.
    pub fn local(&self) -> SocketAddr {
        self.local
    }

    /// The IP of the PBX (for tokens).
    pub fn ip(&self) -> IpAddr {
        self.local.ip()
    }
}

/// The request's URI.
fn req_uri(req: &Message) -> String {
    match req.start_line() {
        crate::sip::message::StartLine::Request { uri, .. } => uri,
        crate::sip::message::StartLine::Response { .. } => String::new(),
    }
}

/// The user part of a header's URI (`"X" <sip:1001@host>;tag=..` -> `1001`).
fn user_of(value: &str) -> String {
    uri_user(crate::sip::message::name_addr_uri(value))
}

/// The user part of a SIP URI.
fn uri_user(uri: &str) -> String {
    let rest = uri
        .strip_prefix("sip:")
        .or_else(|| uri.strip_prefix("sips:"))
        .unwrap_or(uri);
    rest.split(['@', ';', '?'])
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::digest::{Answer, Challenge, ChallengeKind};

    const PBX: &str = "127.0.0.1:5080";
    const GW: &str = "127.0.0.1:5070";

    fn pbx() -> Pbx {
        Pbx::new(
            PBX.parse().unwrap_or(([0, 0, 0, 0], 0).into()),
            vec![
                ("1001".into(), SecretString::new("secret-1001".into())),
                ("1002".into(), SecretString::new("secret-1002".into())),
            ],
            vec![5100, 5102],
            7,
        )
    }

    fn gw() -> SocketAddr {
        GW.parse().unwrap_or(([0, 0, 0, 0], 0).into())
    }

    fn sent(p: &mut Pbx) -> Vec<Output> {
        std::iter::from_fn(|| p.poll_output()).collect()
    }

    fn messages(out: &[Output]) -> Vec<Message> {
        out.iter()
            .filter_map(|o| match o {
                Output::Transmit { bytes, .. } => Message::parse(bytes).ok(),
                _ => None,
            })
            .collect()
    }

    fn register(ext: &str, auth: Option<String>) -> Vec<u8> {
        let mut b = Builder::request("REGISTER", &format!("sip:{PBX}"))
            .header("Via", format!("SIP/2.0/UDP {GW};branch=z9hG4bKr{ext}"))
            .header("From", format!("<sip:{ext}@127.0.0.1>;tag=a"))
            .header("To", format!("<sip:{ext}@127.0.0.1>"))
            .header("Call-ID", format!("reg-{ext}"))
            .header("CSeq", "1 REGISTER")
            .header("Contact", format!("<sip:{ext}@{GW}>"))
            .header("Expires", "600");
        if let Some(a) = auth {
            b = b.header("Authorization", a);
        }
        b.build()
    }

    /// Registers 1001 through the digest challenge, as callgate's UA does.
    fn registered(p: &mut Pbx, now: Instant) {
        registered_as(p, now, "1001");
    }

    fn registered_as(p: &mut Pbx, now: Instant, ext: &str) {
        p.handle_datagram(now, gw(), &register(ext, None));
        let challenge = messages(&sent(p)).remove(0);
        assert_eq!(challenge.status(), Some(401));
        let ch = Challenge::parse(
            ChallengeKind::Www,
            challenge.header("WWW-Authenticate").unwrap_or_default(),
        )
        .unwrap_or_else(|| panic!("a digest challenge"));
        let password = SecretString::new(format!("secret-{ext}"));
        let answer = Answer {
            username: ext,
            password: &password,
            method: "REGISTER",
            uri: &format!("sip:{PBX}"),
            body: b"",
            cnonce: "c0ffee",
            nc: 1,
        };
        p.handle_datagram(now, gw(), &register(ext, Some(ch.authorization(&answer))));
        let ok = messages(&sent(p)).remove(0);
        assert_eq!(ok.status(), Some(200), "{ok:?}");
        assert!(p.is_registered(ext, now));
    }

    /// callgate's 200 to the PBX's INVITE `inv`, as extension `ext` with RTP on `port`.
    fn answered(inv: &Message, ext: &str, tag: &str, port: u16) -> Vec<u8> {
        let answer = AudioSdp::offer(
            "127.0.0.1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
            port,
            &["PCMU"],
            9,
            Direction::SendRecv,
        );
        response_to(inv, 200, "OK", Some(tag))
            .header("Contact", format!("<sip:{ext}@{GW}>"))
            .body("application/sdp", answer.to_sdp().into_bytes())
            .build()
    }

    /// A request of 1001's in call `call_id` with demo number `number`.
    fn in_call(
        method: &str,
        number: &str,
        call_id: &str,
        cseq: u32,
        to: impl Into<String>,
    ) -> Builder {
        Builder::request(method, &format!("sip:{number}@{PBX}"))
            .header(
                "Via",
                format!("SIP/2.0/UDP {GW};branch=z9hG4bK{call_id}{method}{cseq}"),
            )
            .header("From", "<sip:1001@127.0.0.1>;tag=b")
            .header("To", to)
            .header("Call-ID", call_id)
            .header("CSeq", format!("{cseq} {method}"))
    }

    fn invite(to: &str, call_id: &str) -> Vec<u8> {
        let sdp = AudioSdp::offer(
            "127.0.0.1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
            20000,
            &["PCMU"],
            1,
            Direction::SendRecv,
        )
        .to_sdp();
        Builder::request("INVITE", &format!("sip:{to}@{PBX}"))
            .header("Via", format!("SIP/2.0/UDP {GW};branch=z9hG4bK{call_id}"))
            .header("From", "<sip:1001@127.0.0.1>;tag=b")
            .header("To", format!("<sip:{to}@127.0.0.1>"))
            .header("Call-ID", call_id)
            .header("CSeq", "1 INVITE")
            .header("Contact", format!("<sip:1001@{GW}>"))
            .body("application/sdp", sdp.into_bytes())
            .build()
    }

    #[test]
    fn a_wrong_password_or_an_unknown_extension_does_not_register() {
        let mut p = pbx();
        let now = Instant::now();
        p.handle_datagram(now, gw(), &register("1001", None));
        let challenge = messages(&sent(&mut p)).remove(0);
        let ch = Challenge::parse(
            ChallengeKind::Www,
            challenge.header("WWW-Authenticate").unwrap_or_default(),
        )
        .unwrap_or_else(|| panic!("a digest challenge"));
        let wrong = SecretString::new("guess".into());
        let answer = Answer {
            username: "1001",
            password: &wrong,
            method: "REGISTER",
            uri: &format!("sip:{PBX}"),
            body: b"",
            cnonce: "c0ffee",
            nc: 1,
        };
        p.handle_datagram(
            now,
            gw(),
            &register("1001", Some(ch.authorization(&answer))),
        );
        assert_eq!(messages(&sent(&mut p))[0].status(), Some(401));
        assert!(!p.is_registered("1001", now));
        // Calls from an unregistered extension are refused.
        p.handle_datagram(now, gw(), &invite(ECHO, "c1"));
        assert_eq!(messages(&sent(&mut p))[0].status(), Some(403));
    }

    #[test]
    fn the_echo_number_answers_with_media_and_a_bye_stops_it() {
        let mut p = pbx();
        let now = Instant::now();
        registered(&mut p, now);
        p.handle_datagram(now, gw(), &invite(ECHO, "c1"));
        let out = sent(&mut p);
        let ok = &messages(&out)[0];
        assert_eq!(ok.status(), Some(200));
        let answer = AudioSdp::parse(ok.body()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(answer.port, 5100);
        let media = out.iter().find_map(|o| match o {
            Output::StartMedia(m) => Some(m.clone()),
            _ => None,
        });
        assert_eq!(
            media.map(|m| (m.port, m.remote.port(), m.pt, m.play)),
            Some((5100, 20000, 0, Play::Echo))
        );
        // A retransmitted INVITE is not a second call.
        p.handle_datagram(now, gw(), &invite(ECHO, "c1"));
        assert!(sent(&mut p).is_empty());
        let bye = in_call(
            "BYE",
            ECHO,
            "c1",
            2,
            format!("<sip:{ECHO}@127.0.0.1>;tag=x"),
        )
        .build();
        p.handle_datagram(now, gw(), &bye);
        let out = sent(&mut p);
        assert_eq!(messages(&out)[0].status(), Some(200));
        assert!(out.contains(&Output::StopMedia { call: 0 }));
        assert_eq!(p.poll_timeout(), None, "no timer left");
    }

    #[test]
    fn the_call_back_number_declines_then_calls_the_extension() {
        let mut p = pbx();
        let t0 = Instant::now();
        registered(&mut p, t0);
        p.handle_datagram(t0, gw(), &invite(CALLBACK, "c2"));
        assert_eq!(messages(&sent(&mut p))[0].status(), Some(180));
        assert_eq!(p.poll_timeout(), Some(t0 + CALLBACK_RINGS));
        p.handle_timeout(t0 + CALLBACK_RINGS);
        assert_eq!(messages(&sent(&mut p))[0].status(), Some(480));
        let t1 = t0 + CALLBACK_RINGS + CALLBACK_AFTER;
        assert_eq!(p.poll_timeout(), Some(t1));
        p.handle_timeout(t1);
        let out = sent(&mut p);
        let inv = &messages(&out)[0];
        assert_eq!(inv.method(), "INVITE");
        assert!(matches!(&out[0], Output::Transmit { to, .. } if *to == gw()));
        assert!(inv.header("From").unwrap_or_default().contains("602"));
        // callgate answers: ACK, and the echo starts toward its SDP.
        let ok = answered(inv, "1001", "gw", 20002);
        p.handle_datagram(t1, gw(), &ok);
        let out = sent(&mut p);
        assert_eq!(messages(&out)[0].method(), "ACK");
        assert!(out.iter().any(
            |o| matches!(o, Output::StartMedia(m) if m.remote.port() == 20002 && m.play == Play::Echo)
        ));
    }

    #[test]
    fn a_cancelled_call_back_is_not_called_back() {
        let mut p = pbx();
        let t0 = Instant::now();
        registered(&mut p, t0);
        p.handle_datagram(t0, gw(), &invite(CALLBACK, "c3"));
        let _ = sent(&mut p);
        let cancel = in_call(
            "CANCEL",
            CALLBACK,
            "c3",
            1,
            format!("<sip:{CALLBACK}@127.0.0.1>"),
        )
        .build();
        p.handle_datagram(t0, gw(), &cancel);
        let codes: Vec<_> = messages(&sent(&mut p))
            .iter()
            .filter_map(Message::status)
            .collect();
        assert_eq!(codes, vec![200, 487]);
        assert_eq!(p.poll_timeout(), None);
    }

    #[test]
    fn unknown_numbers_and_full_ports_are_refused() {
        let mut p = pbx();
        let now = Instant::now();
        registered(&mut p, now);
        p.handle_datagram(now, gw(), &invite("1234", "c4"));
        assert_eq!(messages(&sent(&mut p))[0].status(), Some(404));
        for id in ["c5", "c6", "c7"] {
            p.handle_datagram(now, gw(), &invite(TONE, id));
        }
        let codes: Vec<_> = messages(&sent(&mut p))
            .iter()
            .filter_map(Message::status)
            .collect();
        assert_eq!(codes, vec![200, 200, 486], "two media ports");
    }

    #[test]
    fn a_referred_demo_call_goes_to_the_target_and_the_referrer_hears_how() {
        let mut p = pbx();
        let now = Instant::now();
        registered_as(&mut p, now, "1001");
        registered_as(&mut p, now, "1002");
        p.handle_datagram(now, gw(), &invite(ECHO, "c8"));
        let ok = messages(&sent(&mut p)).remove(0);
        let to = ok.header("To").unwrap_or_default().to_owned();
        let refer = in_call("REFER", ECHO, "c8", 2, to)
            .header("Refer-To", "<sip:1002@127.0.0.1>")
            .build();
        p.handle_datagram(now, gw(), &refer);
        let msgs = messages(&sent(&mut p));
        assert_eq!(msgs[0].status(), Some(202));
        assert_eq!(msgs[1].method(), "NOTIFY");
        assert_eq!(msgs[1].body(), b"SIP/2.0 100 Trying\r\n");
        assert_eq!(msgs[1].header("CSeq"), Some("1 NOTIFY"));
        let inv = &msgs[2];
        assert_eq!(inv.method(), "INVITE");
        assert!(inv.header("To").unwrap_or_default().contains("1002"));
        assert!(inv.header("From").unwrap_or_default().contains("600"));
        // 1002 answers: ACK, the echo toward 1002, and the referrer's final NOTIFY.
        let ok = answered(inv, "1002", "gw2", 20004);
        p.handle_datagram(now, gw(), &ok);
        let out = sent(&mut p);
        let msgs = messages(&out);
        assert_eq!(msgs[0].method(), "ACK");
        assert_eq!(msgs[1].method(), "NOTIFY");
        assert_eq!(msgs[1].body(), b"SIP/2.0 200 OK\r\n");
        assert!(
            msgs[1]
                .header("Subscription-State")
                .unwrap_or_default()
                .starts_with("terminated")
        );
        assert!(out.iter().any(
            |o| matches!(o, Output::StartMedia(m) if m.remote.port() == 20004 && m.play == Play::Echo)
        ));
        // The referrer hangs up its side (as callgate does after that NOTIFY).
        let bye = in_call(
            "BYE",
            ECHO,
            "c8",
            3,
            format!("<sip:{ECHO}@127.0.0.1>;tag=x"),
        )
        .build();
        p.handle_datagram(now, gw(), &bye);
        let _ = sent(&mut p);
        // A transfer to an extension that is not registered fails at once.
        p.handle_datagram(now, gw(), &invite(TONE, "c9"));
        let to = messages(&sent(&mut p))
            .remove(0)
            .header("To")
            .unwrap_or_default()
            .to_owned();
        let refer = in_call("REFER", TONE, "c9", 2, to)
            .header("Refer-To", "<sip:1005@127.0.0.1>")
            .build();
        p.handle_datagram(now, gw(), &refer);
        let msgs = messages(&sent(&mut p));
        assert_eq!(
            msgs.last().map(Message::body),
            Some(&b"SIP/2.0 404 Not Found\r\n"[..])
        );
    }
}
