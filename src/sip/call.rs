//! One call's INVITE dialog (RFC 3261 §12-§15), both directions, sans-IO.
//!
//! The owner (the endpoint driver) performs the [`Output`]s: `Request` in a new client
//! transaction toward `dest`, `Respond` on a server transaction, `Send` as a bare datagram (the
//! ACK for a 2xx and 2xx retransmissions live outside transactions, §13.3.1.4 and §17.1.1.3). It
//! feeds back responses and timeouts of the call's transactions, in-dialog requests, stray ACKs
//! and 2xx, and calls [`Call::handle_timeout`] at [`Call::poll_timeout`].

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::digest::{Answer, Challenge};
use super::message::{Builder, Message, StartLine, name_addr_uri, response_to, split_list};
use super::sdp::AudioSdp;
use super::transaction::{Timers, TxId, response_destination};
use crate::account::SipAccount;

/// What a request of the call is for (handed back with its response).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Purpose {
    /// The initial INVITE.
    Invite,
    /// CANCEL of the initial INVITE.
    Cancel,
    /// BYE.
    Bye,
    /// A re-INVITE (hold / resume).
    Reinvite,
    /// An INFO carrying a DTMF digit.
    Info,
    /// A REFER (transfer).
    Refer,
    /// A NOTIFY reporting the progress of a transfer the far end asked of us.
    Notify,
}

/// Something for the owner to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Start a client transaction with `data` toward `dest`.
    Request {
        /// For what.
        purpose: Purpose,
        /// Wire bytes.
        data: Vec<u8>,
        /// Next hop.
        dest: SocketAddr,
    },
    /// Answer on server transaction `tx`.
    Respond {
        /// The server transaction.
        tx: TxId,
        /// Wire bytes.
        data: Vec<u8>,
    },
    /// Send a datagram outside any transaction.
    Send {
        /// Destination.
        dest: SocketAddr,
        /// Wire bytes.
        data: Vec<u8>,
    },
}

/// Why a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EndReason {
    /// We hung up (BYE sent).
    LocalHangup,
    /// The far end hung up (BYE received).
    RemoteHangup,
    /// We cancelled our call before it was answered.
    Cancelled,
    /// The caller cancelled before we answered.
    Missed,
    /// We rejected the incoming call.
    Rejected,
    /// Our call was refused (3xx-6xx) or got no answer (408).
    Failed,
    /// The peer vanished (no ACK for our 2xx).
    Timeout,
    /// We transferred the far end elsewhere and the transfer succeeded.
    Transferred,
    /// The far end sent no media for too long; we hung up (BYE sent).
    MediaTimeout,
}

impl EndReason {
    /// Stable code for APIs and CDRs.
    pub fn code(self) -> &'static str {
        match self {
            EndReason::LocalHangup => "local_hangup",
            EndReason::RemoteHangup => "remote_hangup",
            EndReason::Cancelled => "cancelled",
            EndReason::Missed => "missed",
            EndReason::Rejected => "rejected",
            EndReason::Failed => "failed",
            EndReason::Timeout => "timeout",
            EndReason::Transferred => "transferred",
            EndReason::MediaTimeout => "media_timeout",
        }
    }
}

/// A party as a SIP header names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Party {
    /// The URI.
    pub uri: String,
    /// The display name, if any.
    pub display: Option<String>,
}

impl Party {
    fn from_header(value: &str) -> Party {
        let display = value
            .split_once('<')
            .map(|(d, _)| d.trim().trim_matches('"').trim().to_owned())
            .filter(|d| !d.is_empty());
        Party {
            uri: name_addr_uri(value).to_owned(),
            display,
        }
    }

    /// The user part of the URI (`1002` of `sip:1002@host`).
    pub fn user(&self) -> &str {
        let u = self
            .uri
            .split_once(':')
            .map_or(self.uri.as_str(), |(_, r)| r);
        u.split_once('@').map_or("", |(user, _)| user)
    }
}

/// What the call tells its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallEvent {
    /// An incoming call (the call has sent 180 Ringing).
    Incoming {
        /// From.
        from: Party,
        /// P-Asserted-Identity, when the network vouches for the caller.
        asserted: Option<Party>,
        /// The caller's SDP offer.
        offer: Option<AudioSdp>,
        /// The INVITE's headers, in order (for the app's call data: a dialler's X- headers).
        headers: Vec<(String, String)>,
    },
    /// The far end is ringing (180, or 183 without SDP).
    Ringing,
    /// Early media: a provisional with an SDP answer.
    EarlyMedia {
        /// The answer.
        answer: AudioSdp,
    },
    /// Our call was answered.
    Answered {
        /// The final SDP answer (absent if it came with early media only).
        answer: Option<AudioSdp>,
    },
    /// Incoming call: the caller ACKed our 2xx, the dialog is confirmed.
    Confirmed,
    /// Our hold / resume re-INVITE succeeded.
    Hold {
        /// Whether we now hold the far end.
        held: bool,
        /// The far end's SDP answer.
        answer: Option<AudioSdp>,
    },
    /// Our hold / resume re-INVITE was refused; the call goes on as before.
    HoldFailed {
        /// The SIP status.
        status: u16,
    },
    /// Progress of a transfer we asked for (REFER, RFC 3515).
    Transfer {
        /// Where it stands.
        state: TransferState,
        /// The status the far end reported (202 for the REFER, then the new call's status).
        status: Option<u16>,
    },
    /// A DTMF digit from the far end (SIP INFO).
    Dtmf {
        /// `0`-`9`, `*`, `#`, `A`-`D`.
        digit: char,
        /// Duration in milliseconds, if given.
        duration_ms: Option<u32>,
    },
    /// The far end put us on hold (sendonly / inactive offer) or resumed.
    RemoteHold {
        /// Whether we are held now.
        held: bool,
        /// Their new SDP offer (new address or port for media, if any).
        offer: Option<AudioSdp>,
    },
    /// The far end asks us to call `target` in its place (an inbound REFER, RFC 3515). The
    /// owner answers with [`Call::accept_refer`] or [`Call::decline_refer`].
    Referred {
        /// The SIP URI to call.
        target: String,
    },
    /// Progress of the call placed for the far end's REFER: a status of that new call. From 300
    /// on it failed, and this call goes on as before.
    ReferProgress {
        /// The new call's status.
        status: u16,
        /// Its reason phrase.
        phrase: String,
    },
    /// The call placed for the far end's REFER was answered: from now on this call is with
    /// `peer`, whose media is described by `answer`.
    Replaced {
        /// The new far party.
        peer: Party,
        /// Their SDP (absent if it came with early media only).
        answer: Option<AudioSdp>,
    },
    /// The call is over.
    Ended {
        /// Why.
        reason: EndReason,
        /// The SIP status that ended it, if one did.
        status: Option<u16>,
        /// Its reason phrase.
        phrase: String,
    },
}

/// Where a transfer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransferState {
    /// The far end accepted the REFER (202) and is calling the target.
    Accepted,
    /// A provisional from the target (trying, ringing).
    Progress,
    /// The target answered; our leg ends.
    Succeeded,
    /// The REFER was refused or the target did not answer; the call goes on.
    Failed,
}

impl TransferState {
    /// Stable code for APIs.
    pub fn code(self) -> &'static str {
        match self {
            TransferState::Accepted => "accepted",
            TransferState::Progress => "progress",
            TransferState::Succeeded => "succeeded",
            TransferState::Failed => "failed",
        }
    }
}

/// A transfer the far end asked of us (an inbound REFER), once accepted: whom to call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Referral {
    /// The target's SIP URI (the Refer-To URI without its header part).
    pub target: String,
    /// The Replaces header value for the new INVITE (attended transfer, RFC 3891), decoded.
    pub replaces: Option<String>,
    /// The Referred-By value to pass on (RFC 3892): the REFER's own, or the referrer's address.
    pub referred_by: String,
}

/// An inbound REFER waiting for the owner's decision.
#[derive(Debug)]
struct InboundRefer {
    tx: TxId,
    request: Message,
    referral: Referral,
}

/// Longest Refer-To we follow.
const MAX_REFER_TO: usize = 1024;

/// A Refer-To value split into the URI to call and its decoded `Replaces` header, if any
/// (`<sip:b@host?Replaces=id%3Bto-tag%3D1%3Bfrom-tag%3D2>`). Only `sip:` URIs are followed.
fn parse_refer_to(value: &str) -> Option<(String, Option<String>)> {
    if value.len() > MAX_REFER_TO {
        return None;
    }
    let uri = name_addr_uri(value).trim();
    let (target, headers) = match uri.split_once('?') {
        Some((t, h)) => (t, Some(h)),
        None => (uri, None),
    };
    let scheme_ok = target
        .get(..4)
        .is_some_and(|s| s.eq_ignore_ascii_case("sip:"));
    let host = target.get(4..).unwrap_or_default();
    if !scheme_ok || host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return None;
    }
    let mut replaces = None;
    for h in headers.into_iter().flat_map(|h| h.split('&')) {
        if let Some((name, v)) = h.split_once('=') {
            if name.eq_ignore_ascii_case("replaces") {
                let v = super::message::percent_decode(v)?;
                if v.chars().any(char::is_control) {
                    return None;
                }
                replaces = Some(v);
            }
        }
    }
    Some((format!("sip:{host}"), replaces))
}

/// Who we are in this call.
#[derive(Debug, Clone)]
pub struct Local {
    /// Our address of record, `sip:login@domain`.
    pub aor: String,
    /// Our Contact URI (the registration's).
    pub contact: String,
    /// host:port for Via.
    pub via_host: String,
    /// Where requests go first (outbound proxy / registrar address).
    pub target: SocketAddr,
    /// User-Agent.
    pub user_agent: String,
    /// Smallest session interval we accept (RFC 4028 Min-SE; 90 s unless testing).
    pub min_session_expires: Duration,
}

/// The digit of an INFO request: `application/dtmf-relay` (`Signal=5` / `Duration=160`) or
/// `application/dtmf` (the digit alone).
fn dtmf_from_info(req: &Message) -> Option<(char, Option<u32>)> {
    let ct = req.header("Content-Type")?.to_ascii_lowercase();
    let body = std::str::from_utf8(req.body()).ok()?;
    let digit_of = |s: &str| {
        let s = s.trim();
        let mut chars = s.chars();
        let c = chars.next()?.to_ascii_uppercase();
        let ok = chars.next().is_none() && (c.is_ascii_digit() || "*#ABCD".contains(c));
        // Some devices send the RFC 4733 event number (10 = *, 11 = #).
        match (ok, s) {
            (true, _) => Some(c),
            (false, "10") => Some('*'),
            (false, "11") => Some('#'),
            _ => None,
        }
    };
    if ct.starts_with("application/dtmf-relay") {
        let mut digit = None;
        let mut duration = None;
        for line in body.lines() {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            match k.trim().to_ascii_lowercase().as_str() {
                "signal" => digit = digit_of(v),
                "duration" => duration = v.trim().parse().ok(),
                _ => {}
            }
        }
        digit.map(|d| (d, duration))
    } else if ct.starts_with("application/dtmf") {
        digit_of(body).map(|d| (d, None))
    } else {
        None
    }
}

/// Why a dial string was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid destination: use an extension, a number or a sip: URI")]
pub struct BadDestination;

/// Turns what an agent dialled into a request URI: `1002` → `sip:1002@domain`, `+4930123` →
/// `sip:+4930123@domain;user=phone`, `sip:bob@example.com` kept. Separators (spaces, dashes, dots
/// and parentheses) in numbers are dropped.
pub fn dial_uri(to: &str, domain: &str) -> Result<String, BadDestination> {
    let to = to.trim();
    if to.is_empty()
        || to.len() > 256
        || to
            .chars()
            .any(|c| c.is_control() || c == '<' || c == '>' || c == '"')
    {
        return Err(BadDestination);
    }
    if let Some(rest) = to.strip_prefix("sip:").or_else(|| to.strip_prefix("sips:")) {
        let (user, host) = rest.split_once('@').ok_or(BadDestination)?;
        crate::account::check_sip_user(user).map_err(|_| BadDestination)?;
        let host_only = host.split([';', '?']).next().unwrap_or_default();
        crate::account::HostPort::parse(host_only).map_err(|_| BadDestination)?;
        return Ok(format!("sip:{user}@{host_only}"));
    }
    if let Some((user, host)) = to.split_once('@') {
        crate::account::check_sip_user(user).map_err(|_| BadDestination)?;
        crate::account::HostPort::parse(host).map_err(|_| BadDestination)?;
        return Ok(format!("sip:{user}@{host}"));
    }
    let digits: String = to.chars().filter(|c| !" -.()".contains(*c)).collect();
    if let Some(e164) = digits.strip_prefix('+') {
        if !e164.is_empty() && e164.len() <= 15 && e164.bytes().all(|b| b.is_ascii_digit()) {
            return Ok(format!("sip:+{e164}@{domain};user=phone"));
        }
        return Err(BadDestination);
    }
    crate::account::check_sip_user(&digits).map_err(|_| BadDestination)?;
    Ok(format!("sip:{digits}@{domain}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// UAC: INVITE sent, nothing back yet. UAS: ringing, not answered.
    Initial,
    /// UAC: a provisional arrived.
    Proceeding,
    /// 2xx sent (UAS, waiting for ACK) or received (UAC).
    Established,
    /// Over.
    Ended,
}

/// RFC 4028 session timer of an established call.
#[derive(Debug, Clone, Copy)]
struct SessionTimer {
    interval: Duration,
    /// We refresh (re-INVITE at half the interval); otherwise we expect the peer to.
    we_refresh: bool,
    /// Refresh due (we refresh) or expiry (they refresh).
    next: Instant,
}

impl SessionTimer {
    fn new(now: Instant, interval: Duration, we_refresh: bool) -> SessionTimer {
        let next = if we_refresh {
            now + interval / 2
        } else {
            // §10: send BYE if no refresh by interval - min(32 s, interval / 3).
            now + interval - Duration::from_secs(32).min(interval / 3)
        };
        SessionTimer {
            interval,
            we_refresh,
            next,
        }
    }
}

/// `Session-Expires: 1800;refresher=uac` → (interval, refresher is the UAC?).
fn session_expires(msg: &Message) -> Option<(Duration, Option<bool>)> {
    let v = msg.header("Session-Expires")?;
    let mut parts = v.split(';');
    let secs: u64 = parts.next()?.trim().parse().ok()?;
    let refresher = parts
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("refresher"))
        .map(|(_, r)| r.trim().eq_ignore_ascii_case("uac"));
    Some((Duration::from_secs(secs.clamp(1, 86_400)), refresher))
}

fn supports_timer(msg: &Message) -> bool {
    msg.headers("Supported")
        .chain(msg.headers("Require"))
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("timer"))
}

/// Retransmission of our 2xx until the ACK (§13.3.1.4).
#[derive(Debug)]
struct OkRetransmit {
    data: Vec<u8>,
    dest: SocketAddr,
    next: Instant,
    interval: Duration,
    give_up: Instant,
}

/// Is this an outbound or an inbound call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// We called (UAC).
    Outbound,
    /// We were called (UAS).
    Inbound,
}

/// One call.
#[derive(Debug)]
pub struct Call {
    role: Role,
    state: State,
    timers: Timers,
    local: Local,
    account: SipAccount,
    call_id: String,
    local_tag: String,
    /// From (UAC) or To-with-our-tag (UAS) header value.
    local_header: String,
    /// To (UAC, tag added once known) or From (UAS) header value.
    remote_header: String,
    remote_tag: Option<String>,
    remote_target: String,
    route_set: Vec<String>,
    local_cseq: u32,
    invite_cseq: u32,
    remote_cseq: u32,
    request_uri: String,
    /// UAC: our latest INVITE. UAS: theirs.
    invite: Option<Message>,
    invite_tx: Option<TxId>,
    invite_source: Option<SocketAddr>,
    local_sdp: Option<String>,
    sdp_version: u64,
    local_hold: bool,
    remote_hold: bool,
    /// Our re-INVITE in flight: the message and the hold state it asks for.
    /// `Some(held)` for hold / resume, `None` for a session refresh.
    reinvite: Option<(Message, Option<bool>)>,
    /// RFC 4028 session timer, once negotiated.
    session: Option<SessionTimer>,
    /// The interval and refresher a caller asked for (applied when we answer).
    session_offer: Option<(Duration, bool)>,
    /// The `now` of the input being handled (for paths that start timers deep inside).
    now_hint: Instant,
    reinvite_ack: Option<(Vec<u8>, SocketAddr)>,
    /// After a 491: when to try again, and for which hold state (RFC 3261 §14.1).
    glare_retry: Option<(Instant, bool)>,
    /// DTMF digits waiting to be sent by INFO, one INFO in flight at a time (order matters).
    dtmf_queue: VecDeque<char>,
    info_in_flight: bool,
    /// A transfer is under way (REFER sent, final NOTIFY not yet received).
    transferring: bool,
    /// An inbound REFER waiting for the owner's decision.
    inbound_refer: Option<InboundRefer>,
    /// We accepted an inbound REFER and owe the referrer NOTIFYs until the final one.
    refer_subscription: bool,
    /// Headers of our INVITE beyond the usual ones (Referred-By, Replaces).
    extra_headers: Vec<(String, String)>,
    /// After a transfer we followed succeeded: when to BYE this dialog ourselves if the
    /// referrer has not (RFC 5589 leaves it to the referrer).
    bye_at: Option<Instant>,
    challenge: Option<Challenge>,
    nc: u32,
    answered_challenge: bool,
    provisional_seen: bool,
    ringing_reported: bool,
    early_reported: bool,
    cancel_pending: bool,
    cancel_sent: bool,
    ack: Option<(Vec<u8>, SocketAddr)>,
    ok_retransmit: Option<OkRetransmit>,
    confirmed: bool,
    pending: Vec<Purpose>,
    rng: super::IdGen,
    out: VecDeque<Output>,
    events: VecDeque<CallEvent>,
}

/// The host:port of an IP-literal SIP URI (`sip:x@127.0.0.1:5060;lr`).
fn uri_socket(uri: &str) -> Option<SocketAddr> {
    let rest = uri.split_once(':')?.1;
    let hostport = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let hostport = hostport.split([';', '?', '>']).next()?;
    let hp = crate::account::HostPort::parse(hostport).ok()?;
    let ip: std::net::IpAddr = hp.host.as_str().trim_matches(['[', ']']).parse().ok()?;
    Some(SocketAddr::new(ip, hp.port.unwrap_or(5060)))
}

impl Call {
    fn blank(role: Role, local: Local, account: SipAccount, timers: Timers, seed: u64) -> Call {
        let mut rng = super::IdGen::new(seed);
        Call {
            role,
            state: State::Initial,
            timers,
            local_tag: rng.hex(),
            call_id: format!("{}@callgate", rng.hex()),
            local,
            account,
            local_header: String::new(),
            remote_header: String::new(),
            remote_tag: None,
            remote_target: String::new(),
            route_set: Vec::new(),
            local_cseq: 0,
            invite_cseq: 0,
            remote_cseq: 0,
            request_uri: String::new(),
            invite: None,
            invite_tx: None,
            invite_source: None,
            local_sdp: None,
            sdp_version: 1,
            local_hold: false,
            remote_hold: false,
            reinvite: None,
            session: None,
            session_offer: None,
            now_hint: Instant::now(),

            reinvite_ack: None,
            glare_retry: None,
            dtmf_queue: VecDeque::new(),
            info_in_flight: false,
            transferring: false,
            inbound_refer: None,
            refer_subscription: false,
            extra_headers: Vec::new(),
            bye_at: None,
            challenge: None,
            nc: 0,
            answered_challenge: false,
            provisional_seen: false,
            ringing_reported: false,
            early_reported: false,
            cancel_pending: false,
            cancel_sent: false,
            ack: None,
            ok_retransmit: None,
            confirmed: false,
            pending: Vec::new(),
            rng,
            out: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Starts an outbound call to `request_uri` (see [`dial_uri`]) offering `sdp`.
    pub fn outgoing(
        local: Local,
        account: SipAccount,
        request_uri: String,
        sdp: String,
        timers: Timers,
        seed: u64,
    ) -> Call {
        Call::outgoing_with(local, account, request_uri, sdp, timers, seed, Vec::new())
    }

    /// Starts the call a followed transfer asks for: to the referral's target, with its
    /// Referred-By (RFC 3892) and, for an attended transfer, its Replaces (RFC 3891).
    pub fn referred(
        local: Local,
        account: SipAccount,
        referral: &Referral,
        sdp: String,
        timers: Timers,
        seed: u64,
    ) -> Call {
        let mut extra = vec![("Referred-By".to_owned(), referral.referred_by.clone())];
        if let Some(r) = &referral.replaces {
            extra.push(("Replaces".to_owned(), r.clone()));
            extra.push(("Require".to_owned(), "replaces".to_owned()));
        }
        Call::outgoing_with(
            local,
            account,
            referral.target.clone(),
            sdp,
            timers,
            seed,
            extra,
        )
    }

    /// [`outgoing`](Self::outgoing) with `extra_headers` in its INVITEs (checked by the
    /// caller: names and values that cannot break the message).
    pub(crate) fn outgoing_with(
        local: Local,
        account: SipAccount,
        request_uri: String,
        sdp: String,
        timers: Timers,
        seed: u64,
        extra_headers: Vec<(String, String)>,
    ) -> Call {
        let mut c = Call::blank(Role::Outbound, local, account, timers, seed);
        c.extra_headers = extra_headers;
        c.local_header = match &c.account.visible_name {
            Some(n) => format!("\"{n}\" <{}>;tag={}", c.local.aor, c.local_tag),
            None => format!("<{}>;tag={}", c.local.aor, c.local_tag),
        };
        c.remote_header = format!("<{request_uri}>");
        c.remote_target = request_uri.clone();
        c.request_uri = request_uri;
        c.local_sdp = Some(sdp);
        c.local_cseq = 1;
        c.send_invite();
        c
    }

    /// Takes an incoming INVITE (already on server transaction `tx`, 100 sent by it): sends 180
    /// and reports [`CallEvent::Incoming`]. A body that is not usable SDP is refused with 488.
    pub fn incoming(
        local: Local,
        account: SipAccount,
        invite: Message,
        tx: TxId,
        source: SocketAddr,
        timers: Timers,
        seed: u64,
    ) -> Call {
        let mut c = Call::blank(Role::Inbound, local, account, timers, seed);
        c.call_id = invite.call_id().unwrap_or_default().to_owned();
        c.remote_header = invite.header("From").unwrap_or_default().to_owned();
        c.remote_tag = invite.from_tag().map(str::to_owned);
        c.local_header = format!(
            "{};tag={}",
            invite.header("To").unwrap_or_default(),
            c.local_tag
        );
        c.remote_target = invite
            .header("Contact")
            .map(|v| name_addr_uri(v).to_owned())
            .unwrap_or_default();
        c.route_set = invite
            .headers("Record-Route")
            .flat_map(split_list)
            .map(str::to_owned)
            .collect();
        c.remote_cseq = invite.cseq().map_or(0, |(n, _)| n);
        c.invite_tx = Some(tx);
        c.invite_source = Some(source);
        c.local_cseq = 1;
        let offer = if invite.body().is_empty() {
            Ok(None)
        } else {
            AudioSdp::parse(invite.body()).map(Some)
        };
        let from = Party::from_header(&c.remote_header);
        let asserted = invite.header("P-Asserted-Identity").map(Party::from_header);
        let headers = invite.all_headers().to_vec();
        c.invite = Some(invite);
        if let Some(inv) = &c.invite {
            if let Some((interval, refresher)) = session_expires(inv) {
                if interval < c.local.min_session_expires {
                    // §6: too short for us: 422 with our minimum.
                    let min = c.local.min_session_expires.as_secs().to_string();
                    let data =
                        response_to(inv, 422, "Session Interval Too Small", Some(&c.local_tag))
                            .header("Min-SE", min)
                            .build();
                    c.out.push_back(Output::Respond { tx, data });
                    c.end(EndReason::Rejected, Some(422), "Session Interval Too Small");
                    return c;
                }
                // §9: keep the caller's choice; if none, the caller refreshes when it can.
                let uac_refreshes = refresher.unwrap_or_else(|| supports_timer(inv));
                c.session_offer = Some((interval, uac_refreshes));
            }
        }
        match offer {
            Ok(offer) => {
                let ringing = c.response(180, "Ringing", None);
                c.out.push_back(Output::Respond { tx, data: ringing });
                c.events.push_back(CallEvent::Incoming {
                    from,
                    asserted,
                    offer,
                    headers,
                });
            }
            Err(_) => {
                let resp = c.response(488, "Not Acceptable Here", None);
                c.out.push_back(Output::Respond { tx, data: resp });
                c.end(EndReason::Rejected, Some(488), "Not Acceptable Here");
            }
        }
        c
    }

    /// Inbound or outbound.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The SIP Call-ID.
    pub fn call_id(&self) -> &str {
        &self.call_id
    }

    /// The account's SIP domain (for dial strings).
    pub fn domain(&self) -> &str {
        self.account.domain.as_str()
    }

    /// Reports a transfer that could not even be asked for (bad target, call not up).
    pub fn refuse_transfer(&mut self) {
        self.events.push_back(CallEvent::Transfer {
            state: TransferState::Failed,
            status: None,
        });
    }

    /// The far end's tag, once known.
    pub fn remote_tag(&self) -> Option<&str> {
        self.remote_tag.as_deref()
    }

    /// Our tag (identifies the dialog together with the Call-ID).
    pub fn local_tag(&self) -> &str {
        &self.local_tag
    }

    /// Whether the call is over and nothing of it is in flight (the owner may drop it).
    pub fn is_finished(&self) -> bool {
        self.state == State::Ended && self.pending.is_empty() && self.ok_retransmit.is_none()
    }

    /// Whether the call has ended (events may still be in flight).
    pub fn is_ended(&self) -> bool {
        self.state == State::Ended
    }

    fn end(&mut self, reason: EndReason, status: Option<u16>, phrase: &str) {
        if let Some(r) = self.inbound_refer.take() {
            let data = response_to(
                &r.request,
                481,
                "Call Does Not Exist",
                Some(&self.local_tag),
            )
            .build();
            self.out.push_back(Output::Respond { tx: r.tx, data });
        }
        self.refer_subscription = false;
        self.bye_at = None;
        if self.state != State::Ended {
            self.state = State::Ended;
            self.events.push_back(CallEvent::Ended {
                reason,
                status,
                phrase: phrase.to_owned(),
            });
        }
    }

    fn next_hop(&self) -> SocketAddr {
        match self.route_set.first() {
            Some(r) => uri_socket(name_addr_uri(r)),
            None => uri_socket(&self.remote_target),
        }
        .unwrap_or(self.local.target)
    }

    fn branch(&mut self) -> String {
        format!("z9hG4bK{}", self.rng.hex())
    }

    fn send_invite(&mut self) {
        self.invite_cseq = self.local_cseq;
        let branch = self.branch();
        let mut b = Builder::request("INVITE", &self.request_uri)
            .header(
                "Via",
                format!("SIP/2.0/UDP {};branch={branch};rport", self.local.via_host),
            )
            .header("Max-Forwards", "70")
            .header("From", self.local_header.clone())
            .header("To", self.remote_header.clone())
            .header("Call-ID", self.call_id.clone())
            .header("CSeq", format!("{} INVITE", self.invite_cseq))
            .header("Contact", format!("<{}>", self.local.contact))
            .header(
                "Allow",
                "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, REFER, NOTIFY, UPDATE",
            )
            .header("Supported", "timer")
            .header("User-Agent", self.local.user_agent.clone());
        for (name, value) in &self.extra_headers {
            b = b.header(name, value.clone());
        }
        if let Some(ch) = &self.challenge {
            self.nc += 1;
            let cnonce = self.rng.hex();
            let body = self.local_sdp.clone().unwrap_or_default();
            let auth = ch.authorization(&Answer {
                username: &self.account.auth_name,
                password: &self.account.password,
                method: "INVITE",
                uri: &self.request_uri,
                body: body.as_bytes(),
                cnonce: &cnonce,
                nc: self.nc,
            });
            b = b.header(ch.kind.answer_header(), auth);
        }
        if let Some(sdp) = &self.local_sdp {
            b = b.body("application/sdp", sdp.clone().into_bytes());
        }
        let data = b.build();
        self.invite = Message::parse(&data).ok();
        let target = self.local.target;
        self.start_request(Purpose::Invite, data, target);
    }

    fn send_cancel(&mut self) {
        let Some(inv) = &self.invite else { return };
        // §9.1: same Request-URI, Call-ID, From, To (no tag), CSeq number, top Via, Route.
        let mut b = Builder::request("CANCEL", &self.request_uri);
        if let Some(v) = inv.headers("Via").next() {
            b = b.header("Via", v);
        }
        b = b
            .header("Max-Forwards", "70")
            .header("From", self.local_header.clone())
            .header("To", inv.header("To").unwrap_or_default())
            .header("Call-ID", self.call_id.clone())
            .header("CSeq", format!("{} CANCEL", self.invite_cseq));
        for r in inv.headers("Route") {
            b = b.header("Route", r);
        }
        self.cancel_sent = true;
        let target = self.local.target;
        self.start_request(Purpose::Cancel, b.build(), target);
    }

    /// The ACK for a 2xx to our INVITE / re-INVITE with CSeq `cseq` (§13.2.2.4): its own branch,
    /// along the route set, and where it goes.
    fn dialog_ack(&mut self, cseq: u32) -> (Vec<u8>, SocketAddr) {
        let ack = self.dialog_request("ACK", cseq).build();
        (ack, self.next_hop())
    }

    fn in_dialog(&mut self, method: &str) -> Builder {
        self.local_cseq += 1;
        self.dialog_request(method, self.local_cseq)
    }

    /// Starts a client transaction of this call: remembered as pending until its final response.
    fn start_request(&mut self, purpose: Purpose, data: Vec<u8>, dest: SocketAddr) {
        self.pending.push(purpose);
        self.out.push_back(Output::Request {
            purpose,
            data,
            dest,
        });
    }

    /// A request inside the dialog (§12.2.1.1): remote target, route set, tags.
    fn dialog_request(&mut self, method: &str, cseq: u32) -> Builder {
        let branch = self.branch();
        let mut b = Builder::request(method, &self.remote_target)
            .header(
                "Via",
                format!("SIP/2.0/UDP {};branch={branch};rport", self.local.via_host),
            )
            .header("Max-Forwards", "70");
        for r in &self.route_set {
            b = b.header("Route", r.clone());
        }
        b.header("From", self.local_header.clone())
            .header("To", self.remote_header.clone())
            .header("Call-ID", self.call_id.clone())
            .header("CSeq", format!("{cseq} {method}"))
    }

    fn send_bye(&mut self) {
        let data = self
            .in_dialog("BYE")
            .header("User-Agent", self.local.user_agent.clone())
            .build();
        let dest = self.next_hop();
        self.start_request(Purpose::Bye, data, dest);
    }

    /// A response to the INVITE on our side of the dialog (UAS), with our tag and Contact.
    fn response(&self, code: u16, reason: &str, body: Option<&str>) -> Vec<u8> {
        let Some(inv) = &self.invite else {
            return Vec::new();
        };
        let mut b = response_to(inv, code, reason, Some(&self.local_tag));
        if (101..300).contains(&code) {
            for rr in inv.headers("Record-Route") {
                b = b.header("Record-Route", rr);
            }
            b = b.header("Contact", format!("<{}>", self.local.contact));
        }
        if code == 200 {
            b = b.header(
                "Allow",
                "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, REFER, NOTIFY, UPDATE",
            );
        }
        b = b.header("User-Agent", self.local.user_agent.clone());
        if let Some(sdp) = body {
            b = b.body("application/sdp", sdp.as_bytes().to_vec());
        }
        b.build()
    }

    /// Our 2xx with the negotiated session timer (§9).
    fn response_with_session(
        &self,
        code: u16,
        reason: &str,
        sdp: &str,
        interval: Duration,
        uac_refreshes: bool,
    ) -> Vec<u8> {
        let Ok(base) = Message::parse(&self.response(code, reason, Some(sdp))) else {
            return Vec::new();
        };
        let mut b = Builder::response(code, reason);
        for (n, v) in base.all_headers() {
            if !n.eq_ignore_ascii_case("Content-Length") && !n.eq_ignore_ascii_case("Content-Type")
            {
                b = b.header(n, v.clone());
            }
        }
        let refresher = if uac_refreshes { "uac" } else { "uas" };
        b = b.header(
            "Session-Expires",
            format!("{};refresher={refresher}", interval.as_secs()),
        );
        if uac_refreshes {
            b = b.header("Require", "timer");
        }
        b.body("application/sdp", sdp.as_bytes().to_vec()).build()
    }

    /// Answers an incoming call with our SDP. Ignored unless the call is ringing.
    pub fn answer(&mut self, now: Instant, sdp: String) {
        if self.role != Role::Inbound || self.state != State::Initial {
            return;
        }
        let Some(tx) = self.invite_tx else { return };
        let data = match self.session_offer {
            Some((interval, uac_refreshes)) => {
                self.session = Some(SessionTimer::new(now, interval, !uac_refreshes));
                self.response_with_session(200, "OK", &sdp, interval, uac_refreshes)
            }
            None => self.response(200, "OK", Some(&sdp)),
        };
        self.local_sdp = Some(sdp);
        self.out.push_back(Output::Respond {
            tx,
            data: data.clone(),
        });
        let dest = match (&self.invite, self.invite_source) {
            (Some(inv), Some(src)) => response_destination(inv, src),
            (_, Some(src)) => src,
            _ => self.local.target,
        };
        self.ok_retransmit = Some(OkRetransmit {
            data,
            dest,
            next: now + self.timers.t1,
            interval: self.timers.t1,
            give_up: now + self.timers.sixty_four_t1(),
        });
        self.state = State::Established;
    }

    /// Rejects an incoming call (486 Busy Here, 603 Decline, ...). Ignored unless ringing.
    pub fn reject(&mut self, code: u16, reason: &str) {
        if self.role != Role::Inbound || self.state != State::Initial {
            return;
        }
        let code = if (300..700).contains(&code) {
            code
        } else {
            603
        };
        if let Some(tx) = self.invite_tx {
            let data = self.response(code, reason, None);
            self.out.push_back(Output::Respond { tx, data });
        }
        self.end(EndReason::Rejected, Some(code), reason);
    }

    /// Hangs up in whatever state: CANCEL, BYE, or 603 for an unanswered incoming call.
    pub fn hangup(&mut self, now: Instant) {
        self.hangup_because(now, EndReason::LocalHangup);
    }

    /// [`hangup`](Self::hangup), recording why an established call ended (e.g.
    /// [`EndReason::MediaTimeout`]).
    pub fn hangup_because(&mut self, now: Instant, reason: EndReason) {
        let _ = now;
        match (self.role, self.state) {
            (_, State::Ended) => {}
            (Role::Inbound, State::Initial | State::Proceeding) => self.reject(603, "Decline"),
            (Role::Outbound, State::Initial) => {
                // §9.1: no CANCEL before a provisional response; send it when one arrives.
                self.cancel_pending = true;
                if self.provisional_seen {
                    self.send_cancel();
                }
            }
            (Role::Outbound, State::Proceeding) => {
                if !self.cancel_sent {
                    self.send_cancel();
                }
                self.cancel_pending = true;
            }
            (_, State::Established) => {
                self.ok_retransmit = None;
                self.send_bye();
                self.end(reason, None, "");
            }
        }
    }

    /// A response on one of the call's client transactions.
    pub fn handle_response(&mut self, now: Instant, purpose: Purpose, resp: &Message) {
        let Some(code) = resp.status() else { return };
        if code >= 200 {
            if let Some(i) = self.pending.iter().position(|p| *p == purpose) {
                self.pending.remove(i);
            }
        }
        match purpose {
            Purpose::Invite => self.invite_response(now, code, resp),
            // CANCEL's 200 says nothing about the call; the INVITE's 487 does.
            Purpose::Cancel => {}
            Purpose::Bye => {}
            Purpose::Reinvite => self.reinvite_response(now, code, resp),
            Purpose::Notify => {
                if code == 481 {
                    // The referrer ended the subscription (or the dialog): nothing more to say.
                    self.refer_subscription = false;
                }
            }
            Purpose::Refer => {
                if (200..300).contains(&code) {
                    self.events.push_back(CallEvent::Transfer {
                        state: TransferState::Accepted,
                        status: Some(code),
                    });
                } else if code >= 300 {
                    self.transferring = false;
                    self.events.push_back(CallEvent::Transfer {
                        state: TransferState::Failed,
                        status: Some(code),
                    });
                }
            }
            Purpose::Info => {
                if code >= 200 {
                    self.info_in_flight = false;
                    if code >= 300 {
                        // The peer refuses INFO: drop the rest rather than send them out of order.
                        self.dtmf_queue.clear();
                    }
                    self.send_next_info();
                }
            }
        }
    }

    /// Blind transfer (RFC 3515, RFC 5589 §6): asks the far end to call `target` (a SIP URI, see
    /// [`dial_uri`]). Progress comes as [`CallEvent::Transfer`]; on success our leg is hung up.
    /// Returns false if the call is not up or a transfer is already under way.
    pub fn transfer(&mut self, target: &str) -> bool {
        if self.state != State::Established || self.transferring || !target.starts_with("sip:") {
            return false;
        }
        let data = self
            .in_dialog("REFER")
            .header("Refer-To", format!("<{target}>"))
            .header("Referred-By", format!("<{}>", self.local.aor))
            .header("Contact", format!("<{}>", self.local.contact))
            .header("User-Agent", self.local.user_agent.clone())
            .build();
        self.transferring = true;
        let dest = self.next_hop();
        self.start_request(Purpose::Refer, data, dest);
        true
    }

    /// For attended transfer (RFC 5589 §7): the Refer-To URI that makes the transferee replace
    /// this (consultation) call: the far party's address with `?Replaces=` naming this dialog
    /// (RFC 3891 §6.1, `to-tag` = the far party's tag). `None` unless the call is up.
    pub fn replaces_uri(&self) -> Option<String> {
        if self.state != State::Established {
            return None;
        }
        let remote_tag = self.remote_tag.as_deref()?;
        let aor = match self.role {
            Role::Outbound => self
                .request_uri
                .split(';')
                .next()
                .unwrap_or(&self.request_uri)
                .to_owned(),
            Role::Inbound => name_addr_uri(&self.remote_header).to_owned(),
        };
        let esc = |s: &str| {
            let mut out = String::with_capacity(s.len() + 8);
            for b in s.bytes() {
                if b.is_ascii_alphanumeric() || b"-_.!~*'()".contains(&b) {
                    out.push(char::from(b));
                } else {
                    out.push_str(&format!("%{b:02X}"));
                }
            }
            out
        };
        Some(format!(
            "{aor}?Replaces={}%3Bto-tag%3D{}%3Bfrom-tag%3D{}",
            esc(&self.call_id),
            esc(remote_tag),
            esc(&self.local_tag)
        ))
    }

    /// A NOTIFY of the implicit `refer` subscription: the new call's status in a sipfrag.
    fn refer_notify(&mut self, req: &Message) {
        if !self.transferring {
            return;
        }
        let is_refer = req
            .header("Event")
            .is_some_and(|e| e.trim().to_ascii_lowercase().starts_with("refer"));
        if !is_refer {
            return;
        }
        // message/sipfrag: "SIP/2.0 180 Ringing"
        let status = std::str::from_utf8(req.body())
            .ok()
            .and_then(|b| b.lines().next())
            .and_then(|l| l.strip_prefix("SIP/2.0 "))
            .and_then(|r| r.get(..3))
            .and_then(|c| c.parse::<u16>().ok());
        let terminated = req
            .header("Subscription-State")
            .is_some_and(|s| s.trim().to_ascii_lowercase().starts_with("terminated"));
        let state = match status {
            Some(200..=299) => TransferState::Succeeded,
            Some(100..=199) if !terminated => TransferState::Progress,
            _ => TransferState::Failed,
        };
        if state == TransferState::Progress {
            self.events.push_back(CallEvent::Transfer { state, status });
            return;
        }
        self.transferring = false;
        self.events.push_back(CallEvent::Transfer { state, status });
        if state == TransferState::Succeeded {
            // RFC 5589 §6: the transferor ends its dialog with the transferee.
            self.ok_retransmit = None;
            self.send_bye();
            self.end(EndReason::Transferred, status, "");
        }
    }

    /// The far end asks us to call someone in its place (RFC 3515): keep the request for the
    /// owner's decision and report [`CallEvent::Referred`].
    fn inbound_refer(&mut self, tx: TxId, req: &Message) {
        let refuse = |c: &mut Call, code: u16, reason: &str| {
            let data = response_to(req, code, reason, Some(&c.local_tag)).build();
            c.out.push_back(Output::Respond { tx, data });
        };
        let Some(value) = req.header("Refer-To") else {
            return refuse(self, 400, "Missing Refer-To");
        };
        if self.state != State::Established {
            return refuse(self, 603, "Decline");
        }
        if self.inbound_refer.is_some() || self.refer_subscription || self.transferring {
            // One transfer at a time.
            return refuse(self, 491, "Request Pending");
        }
        let Some((target, replaces)) = parse_refer_to(value) else {
            return refuse(self, 400, "Bad Refer-To");
        };
        let referred_by = req
            .header("Referred-By")
            .filter(|v| v.len() <= MAX_REFER_TO)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("<{}>", name_addr_uri(&self.remote_header)));
        self.inbound_refer = Some(InboundRefer {
            tx,
            request: req.clone(),
            referral: Referral {
                target: target.clone(),
                replaces,
                referred_by,
            },
        });
        self.events.push_back(CallEvent::Referred { target });
    }

    /// Accepts the far end's REFER (202, then a NOTIFY `100 Trying`) and returns whom to call;
    /// report that call's progress with [`refer_progress`](Self::refer_progress). `None` if no
    /// REFER is waiting.
    pub fn accept_refer(&mut self) -> Option<Referral> {
        let r = self.inbound_refer.take()?;
        let data = response_to(&r.request, 202, "Accepted", Some(&self.local_tag))
            .header("Contact", format!("<{}>", self.local.contact))
            .build();
        self.out.push_back(Output::Respond { tx: r.tx, data });
        self.refer_subscription = true;
        self.send_refer_notify(100, "Trying");
        Some(r.referral)
    }

    /// Declines the far end's REFER (603); the call goes on.
    pub fn decline_refer(&mut self) {
        if let Some(r) = self.inbound_refer.take() {
            let data = response_to(&r.request, 603, "Decline", Some(&self.local_tag)).build();
            self.out.push_back(Output::Respond { tx: r.tx, data });
        }
    }

    /// Tells the referrer how the call it asked for is going (a NOTIFY with a sipfrag). A final
    /// status ends the subscription; after a 2xx this dialog is hung up unless the referrer
    /// does so first (it should, RFC 5589 §6).
    pub fn refer_progress(&mut self, now: Instant, status: u16, phrase: &str) {
        if !self.refer_subscription {
            return;
        }
        self.send_refer_notify(status, phrase);
        if (200..300).contains(&status) {
            self.bye_at = Some(now + self.timers.t1 * 8);
        }
    }

    fn send_refer_notify(&mut self, status: u16, phrase: &str) {
        if !self.refer_subscription || self.state != State::Established {
            return;
        }
        let sub_state = if status >= 200 {
            self.refer_subscription = false;
            "terminated;reason=noresource"
        } else {
            "active;expires=60"
        };
        let phrase: String = phrase
            .chars()
            .filter(|c| !c.is_control())
            .take(128)
            .collect();
        let data = self
            .in_dialog("NOTIFY")
            .header("Event", "refer")
            .header("Subscription-State", sub_state)
            .header("Contact", format!("<{}>", self.local.contact))
            .header("User-Agent", self.local.user_agent.clone())
            .body(
                "message/sipfrag;version=2.0",
                format!("SIP/2.0 {status} {phrase}\r\n").into_bytes(),
            )
            .build();
        let dest = self.next_hop();
        self.start_request(Purpose::Notify, data, dest);
    }

    /// An SDP offer for a new dialog from this call's media (the same address and codecs,
    /// sendrecv): what a followed transfer offers the target.
    pub fn offer_for_new_dialog(&self) -> Option<String> {
        let mut sdp = AudioSdp::parse(self.local_sdp.as_deref()?.as_bytes()).ok()?;
        sdp.version += 1;
        sdp.direction = super::sdp::Direction::SendRecv;
        Some(sdp.to_sdp())
    }

    /// The far party as the dialog names it.
    pub fn remote_party(&self) -> Party {
        Party::from_header(&self.remote_header)
    }

    /// Queues DTMF `digits` (`0-9 * # A-D`) to be sent by SIP INFO (`application/dtmf-relay`),
    /// in order. Returns false (and queues nothing) if a digit is invalid or the call is not up.
    pub fn send_dtmf_info(&mut self, digits: &str) -> bool {
        let valid = !digits.is_empty()
            && digits.len() <= 64
            && digits
                .chars()
                .all(|c| c.is_ascii_digit() || "*#ABCDabcd".contains(c));
        if !valid || self.state != State::Established || self.dtmf_queue.len() > 256 {
            return false;
        }
        self.dtmf_queue
            .extend(digits.chars().map(|c| c.to_ascii_uppercase()));
        self.send_next_info();
        true
    }

    fn send_next_info(&mut self) {
        if self.info_in_flight || self.state != State::Established {
            return;
        }
        let Some(digit) = self.dtmf_queue.pop_front() else {
            return;
        };
        let body = format!("Signal={digit}\r\nDuration=160\r\n");
        let data = self
            .in_dialog("INFO")
            .header("User-Agent", self.local.user_agent.clone())
            .body("application/dtmf-relay", body.into_bytes())
            .build();
        self.info_in_flight = true;
        let dest = self.next_hop();
        self.start_request(Purpose::Info, data, dest);
    }

    /// Puts the far end on hold (re-INVITE with our SDP `sendonly`).
    pub fn hold(&mut self, now: Instant) {
        self.set_hold(now, true);
    }

    /// Resumes a held call (re-INVITE with `sendrecv`).
    pub fn unhold(&mut self, now: Instant) {
        self.set_hold(now, false);
    }

    /// Refreshes the session (§7.4 / §9): a re-INVITE with our current SDP, unchanged.
    fn send_refresh(&mut self, now: Instant) {
        let Some(session) = &mut self.session else {
            return;
        };
        if !(self.state == State::Established
            && (self.role == Role::Outbound || self.confirmed)
            && self.reinvite.is_none()
            && self.ok_retransmit.is_none())
        {
            // Busy with another offer: try again shortly.
            session.next = now + Duration::from_secs(1);
            return;
        }
        let interval = session.interval;
        session.next = now + interval;
        let refresher = if self.role == Role::Outbound {
            "uac"
        } else {
            "uas"
        };
        let sdp = self.local_sdp.clone().unwrap_or_default();
        let data = self
            .in_dialog("INVITE")
            .header("Contact", format!("<{}>", self.local.contact))
            .header("Supported", "timer")
            .header(
                "Session-Expires",
                format!("{};refresher={refresher}", interval.as_secs()),
            )
            .header("User-Agent", self.local.user_agent.clone())
            .body("application/sdp", sdp.into_bytes())
            .build();
        let Ok(msg) = Message::parse(&data) else {
            return;
        };
        self.reinvite = Some((msg, None));
        self.reinvite_ack = None;
        let dest = self.next_hop();
        self.start_request(Purpose::Reinvite, data, dest);
    }

    fn can_reinvite(&self) -> bool {
        self.state == State::Established
            && (self.role == Role::Outbound || self.confirmed)
            && self.reinvite.is_none()
            && self.ok_retransmit.is_none()
    }

    /// Our SDP with `direction` and the next version (RFC 3264 §8: a changed SDP bumps `o=`).
    fn next_local_sdp(&mut self, direction: super::sdp::Direction) -> Option<String> {
        let mut sdp = AudioSdp::parse(self.local_sdp.as_deref()?.as_bytes()).ok()?;
        self.sdp_version = self.sdp_version.max(sdp.version) + 1;
        sdp.version = self.sdp_version;
        sdp.direction = direction;
        let text = sdp.to_sdp();
        self.local_sdp = Some(text.clone());
        Some(text)
    }

    fn set_hold(&mut self, now: Instant, held: bool) {
        let _ = now;
        if !self.can_reinvite() || (self.local_hold == held && self.glare_retry.is_none()) {
            return;
        }
        self.glare_retry = None;
        let dir = if held {
            super::sdp::Direction::SendOnly
        } else {
            super::sdp::Direction::SendRecv
        };
        let Some(sdp) = self.next_local_sdp(dir) else {
            return;
        };
        let data = self
            .in_dialog("INVITE")
            .header("Contact", format!("<{}>", self.local.contact))
            .header("User-Agent", self.local.user_agent.clone())
            .body("application/sdp", sdp.into_bytes())
            .build();
        let Ok(msg) = Message::parse(&data) else {
            return;
        };
        self.reinvite = Some((msg, Some(held)));
        self.reinvite_ack = None;
        let dest = self.next_hop();
        self.start_request(Purpose::Reinvite, data, dest);
    }

    fn reinvite_response(&mut self, now: Instant, code: u16, resp: &Message) {
        match code {
            100..=199 => {}
            200..=299 => {
                if let Some((ack, dest)) = &self.reinvite_ack {
                    self.out.push_back(Output::Send {
                        dest: *dest,
                        data: ack.clone(),
                    });
                    return;
                }
                let Some((req, target)) = self.reinvite.take() else {
                    return;
                };
                let cseq = req.cseq().map_or(self.local_cseq, |(n, _)| n);
                let (ack, dest) = self.dialog_ack(cseq);
                self.out.push_back(Output::Send {
                    dest,
                    data: ack.clone(),
                });
                self.reinvite_ack = Some((ack, dest));
                if let Some(session) = &mut self.session {
                    *session = SessionTimer::new(now, session.interval, session.we_refresh);
                }
                let Some(held) = target else {
                    // A session refresh: nothing to report.
                    return;
                };
                self.local_hold = held;
                let answer = (!resp.body().is_empty())
                    .then(|| AudioSdp::parse(resp.body()).ok())
                    .flatten();
                self.events.push_back(CallEvent::Hold { held, answer });
            }
            491 => {
                // Glare: both sides re-INVITEd. §14.1: the Call-ID owner waits 2.1-4 s, the
                // other side 0-2 s, then tries again.
                let Some((_, target)) = self.reinvite.take() else {
                    return;
                };
                let r = u64::from_str_radix(self.rng.hex().get(..4).unwrap_or("0"), 16)
                    .unwrap_or(0)
                    % 1000;
                let wait = if self.role == Role::Outbound {
                    Duration::from_millis(2100 + r * 19 / 10)
                } else {
                    Duration::from_millis(r * 2)
                };
                match target {
                    Some(held) => self.glare_retry = Some((now + wait, held)),
                    // A refresh: try again after the same back-off.
                    None => {
                        if let Some(session) = &mut self.session {
                            session.next = now + wait;
                        }
                    }
                }
            }
            _ => {
                if let Some((_, target)) = self.reinvite.take() {
                    if target.is_some() {
                        self.events
                            .push_back(CallEvent::HoldFailed { status: code });
                    }
                }
                if code == 481 || code == 408 {
                    // §14.1: the dialog is gone.
                    self.send_bye();
                    self.end(EndReason::Failed, Some(code), &Call::phrase(resp));
                }
            }
        }
    }

    fn phrase(resp: &Message) -> String {
        match resp.start_line() {
            StartLine::Response { reason, .. } => reason,
            StartLine::Request { .. } => String::new(),
        }
    }

    fn invite_response(&mut self, now: Instant, code: u16, resp: &Message) {
        self.now_hint = now;
        match code {
            100..=199 => {
                if self.state == State::Ended {
                    return;
                }
                self.provisional_seen = true;
                if code > 100 {
                    self.state = State::Proceeding;
                    let sdp = (!resp.body().is_empty())
                        .then(|| AudioSdp::parse(resp.body()).ok())
                        .flatten();
                    match sdp {
                        Some(answer) if !self.early_reported => {
                            self.early_reported = true;
                            self.events.push_back(CallEvent::EarlyMedia { answer });
                        }
                        None if !self.ringing_reported && (code == 180 || code == 183) => {
                            self.ringing_reported = true;
                            self.events.push_back(CallEvent::Ringing);
                        }
                        _ => {}
                    }
                }
                if self.cancel_pending && !self.cancel_sent {
                    self.send_cancel();
                }
            }
            200..=299 => self.on_2xx(resp),
            401 | 407 if self.state != State::Ended && !self.cancel_pending => {
                match Challenge::best(Challenge::from_response(resp)) {
                    Some(ch) if !self.answered_challenge || ch.stale => {
                        self.answered_challenge = true;
                        self.nc = 0;
                        self.challenge = Some(ch);
                        self.local_cseq += 1;
                        self.provisional_seen = false;
                        self.send_invite();
                    }
                    _ => self.end(EndReason::Failed, Some(code), &Call::phrase(resp)),
                }
            }
            _ => {
                if self.cancel_sent && code == 487 {
                    self.end(EndReason::Cancelled, Some(487), &Call::phrase(resp));
                } else {
                    self.end(EndReason::Failed, Some(code), &Call::phrase(resp));
                }
            }
        }
    }

    fn on_2xx(&mut self, resp: &Message) {
        if let Some((ack, dest)) = &self.ack {
            // A retransmitted 2xx: our ACK was lost (§13.2.2.4).
            self.out.push_back(Output::Send {
                dest: *dest,
                data: ack.clone(),
            });
            return;
        }
        self.remote_tag = resp.to_tag().map(str::to_owned);
        self.remote_header = resp.header("To").unwrap_or_default().to_owned();
        if let Some(c) = resp.header("Contact") {
            self.remote_target = name_addr_uri(c).to_owned();
        }
        // §12.1.2: the UAC's route set is the Record-Route list, reversed.
        let mut rr: Vec<String> = resp
            .headers("Record-Route")
            .flat_map(split_list)
            .map(str::to_owned)
            .collect();
        rr.reverse();
        self.route_set = rr;
        let (ack, dest) = self.dialog_ack(self.invite_cseq);
        self.out.push_back(Output::Send {
            dest,
            data: ack.clone(),
        });
        self.ack = Some((ack, dest));
        if self.state == State::Ended || self.cancel_pending {
            // Answered although we hung up meanwhile (the 2xx crossed our CANCEL): end it.
            self.state = State::Established;
            self.send_bye();
            self.end(EndReason::Cancelled, None, "");
            return;
        }
        self.state = State::Established;
        if let Some((interval, refresher)) = session_expires(resp) {
            // §7.2: without a refresher parameter the UAC (we) refreshes.
            self.session = Some(SessionTimer::new(
                self.now_hint,
                interval,
                refresher.unwrap_or(true),
            ));
        }
        let answer = (!resp.body().is_empty())
            .then(|| AudioSdp::parse(resp.body()).ok())
            .flatten();
        self.events.push_back(CallEvent::Answered { answer });
    }

    /// A client transaction of the call timed out.
    pub fn handle_tx_timeout(&mut self, purpose: Purpose) {
        if let Some(i) = self.pending.iter().position(|p| *p == purpose) {
            self.pending.remove(i);
        }
        if purpose == Purpose::Invite {
            self.end(EndReason::Failed, Some(408), "Request Timeout");
        }
    }

    /// An in-dialog request (BYE, re-INVITE, INFO, ...) or a CANCEL for our incoming INVITE, on
    /// server transaction `tx`.
    pub fn handle_request(&mut self, now: Instant, tx: TxId, req: &Message) {
        let method = req.method().to_owned();
        let respond = |c: &Call, code: u16, reason: &str| {
            response_to(req, code, reason, Some(&c.local_tag)).build()
        };
        if method == "CANCEL" {
            let ok = respond(self, 200, "OK");
            self.out.push_back(Output::Respond { tx, data: ok });
            if self.role == Role::Inbound && self.state == State::Initial {
                if let Some(itx) = self.invite_tx {
                    let data = self.response(487, "Request Terminated", None);
                    self.out.push_back(Output::Respond { tx: itx, data });
                }
                self.end(EndReason::Missed, Some(487), "Request Terminated");
            }
            return;
        }
        let cseq = req.cseq().map_or(0, |(n, _)| n);
        if cseq < self.remote_cseq && self.remote_cseq != 0 {
            let data = respond(self, 500, "Server Internal Error");
            self.out.push_back(Output::Respond { tx, data });
            return;
        }
        self.remote_cseq = self.remote_cseq.max(cseq);
        match method.as_str() {
            "BYE" => {
                let data = respond(self, 200, "OK");
                self.out.push_back(Output::Respond { tx, data });
                self.ok_retransmit = None;
                if self.role == Role::Inbound && self.state == State::Initial {
                    if let Some(itx) = self.invite_tx {
                        let data = self.response(487, "Request Terminated", None);
                        self.out.push_back(Output::Respond { tx: itx, data });
                    }
                }
                self.end(EndReason::RemoteHangup, None, "");
            }
            "INVITE" => self.remote_reinvite(now, tx, req),
            "INFO" => {
                let data = respond(self, 200, "OK");
                self.out.push_back(Output::Respond { tx, data });
                if let Some((digit, duration_ms)) = dtmf_from_info(req) {
                    self.events
                        .push_back(CallEvent::Dtmf { digit, duration_ms });
                }
            }
            "NOTIFY" => {
                let data = respond(self, 200, "OK");
                self.out.push_back(Output::Respond { tx, data });
                self.refer_notify(req);
            }
            "UPDATE" => {
                // Without a body: a session refresh (RFC 4028 §8 allows UPDATE for it).
                let data = respond(self, 200, "OK");
                self.out.push_back(Output::Respond { tx, data });
                self.peer_refreshed(now, req);
            }
            "OPTIONS" => {
                let data = respond(self, 200, "OK");
                self.out.push_back(Output::Respond { tx, data });
            }
            "REFER" => self.inbound_refer(tx, req),
            _ => {
                let data = response_to(req, 501, "Not Implemented", Some(&self.local_tag))
                    .header("Allow", "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO")
                    .build();
                self.out.push_back(Output::Respond { tx, data });
            }
        }
    }

    /// A re-INVITE from the far end: hold, resume or a media change.
    fn remote_reinvite(&mut self, now: Instant, tx: TxId, req: &Message) {
        self.peer_refreshed(now, req);
        if self.reinvite.is_some() || self.ok_retransmit.is_some() {
            // §14.2: one offer at a time.
            let data = response_to(req, 491, "Request Pending", Some(&self.local_tag)).build();
            self.out.push_back(Output::Respond { tx, data });
            return;
        }
        let offer = if req.body().is_empty() {
            None
        } else {
            AudioSdp::parse(req.body()).ok()
        };
        if !req.body().is_empty() && offer.is_none() {
            let data = response_to(req, 488, "Not Acceptable Here", Some(&self.local_tag)).build();
            self.out.push_back(Output::Respond { tx, data });
            return;
        }
        use super::sdp::Direction;
        let wanted = if self.local_hold {
            Direction::SendOnly
        } else {
            Direction::SendRecv
        };
        let dir = offer
            .as_ref()
            .map_or(wanted, |o| o.direction.answer_to(wanted));
        let Some(sdp) = self.next_local_sdp(dir) else {
            let data = response_to(req, 488, "Not Acceptable Here", Some(&self.local_tag)).build();
            self.out.push_back(Output::Respond { tx, data });
            return;
        };
        let mut b = response_to(req, 200, "OK", Some(&self.local_tag))
            .header("Contact", format!("<{}>", self.local.contact))
            .header("User-Agent", self.local.user_agent.clone());
        b = b.body("application/sdp", sdp.into_bytes());
        let data = b.build();
        self.out.push_back(Output::Respond {
            tx,
            data: data.clone(),
        });
        // Our 2xx to a re-INVITE is retransmitted until its ACK, like the first one (§13.3.1.4).
        self.ok_retransmit = Some(OkRetransmit {
            data,
            dest: response_destination(req, self.next_hop()),
            next: now + self.timers.t1,
            interval: self.timers.t1,
            give_up: now + self.timers.sixty_four_t1(),
        });
        let held = offer
            .as_ref()
            .is_some_and(|o| matches!(o.direction, Direction::SendOnly | Direction::Inactive));
        if held != self.remote_hold || offer.is_some() {
            self.remote_hold = held;
            self.events.push_back(CallEvent::RemoteHold { held, offer });
        }
    }

    /// The peer refreshed the session (re-INVITE or UPDATE): restart the timer, adopting a
    /// changed interval.
    fn peer_refreshed(&mut self, now: Instant, req: &Message) {
        if let Some(session) = &mut self.session {
            let interval = session_expires(req).map_or(session.interval, |(i, _)| i);
            *session = SessionTimer::new(now, interval, session.we_refresh);
        }
    }

    /// An ACK for our 2xx (incoming calls).
    pub fn handle_ack(&mut self) {
        if self.ok_retransmit.take().is_some() && self.role == Role::Inbound && !self.confirmed {
            self.confirmed = true;
            if self.state == State::Established {
                self.events.push_back(CallEvent::Confirmed);
            }
        }
    }

    /// A 2xx for our INVITE that arrived after its transaction ended.
    pub fn handle_stray_2xx(&mut self, resp: &Message) {
        self.on_2xx(resp);
    }

    /// Fires the 2xx retransmission timer.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.bye_at.is_some_and(|at| now >= at) {
            self.bye_at = None;
            if self.state == State::Established {
                self.ok_retransmit = None;
                self.send_bye();
                self.end(EndReason::Transferred, None, "");
            }
            return;
        }
        if let Some(session) = self.session {
            if now >= session.next && self.state == State::Established {
                if session.we_refresh {
                    self.send_refresh(now);
                } else {
                    // §10: the refresher went silent: the session is dead.
                    self.session = None;
                    self.ok_retransmit = None;
                    self.send_bye();
                    self.end(EndReason::Timeout, Some(408), "session timer expired");
                    return;
                }
            }
        }
        if let Some((at, held)) = self.glare_retry {
            if now >= at {
                self.set_hold(now, held);
            }
        }
        let Some(r) = &mut self.ok_retransmit else {
            return;
        };
        if now >= r.give_up {
            // §13.3.1.4: no ACK within 64*T1 → confirm then end the dialog with a BYE.
            self.ok_retransmit = None;
            self.send_bye();
            self.end(EndReason::Timeout, Some(408), "no ACK for 200 OK");
            return;
        }
        if now >= r.next {
            self.out.push_back(Output::Send {
                dest: r.dest,
                data: r.data.clone(),
            });
            r.interval = (r.interval * 2).min(self.timers.t2);
            r.next = now + r.interval;
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next run.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let ok = self.ok_retransmit.as_ref().map(|r| r.next.min(r.give_up));
        let glare = self.glare_retry.map(|(at, _)| at);
        let session = self
            .session
            .filter(|_| self.state == State::Established)
            .map(|s| s.next);
        ok.into_iter()
            .chain(glare)
            .chain(session)
            .chain(self.bye_at)
            .min()
    }

    /// The next thing to do.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// The next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<CallEvent> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests;
