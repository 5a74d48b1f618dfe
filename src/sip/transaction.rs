//! SIP transactions (RFC 3261 §17, with RFC 6026's Accepted state), over UDP, sans-IO.
//!
//! Call order, for the driver that owns the socket and the clock:
//! 1. feed input: [`TransactionLayer::handle_datagram`] (or `handle_message`), [`send_request`],
//!    [`respond`], and [`handle_timeout`] whenever `now >= poll_timeout()`;
//! 2. drain [`poll_transmit`] (send each datagram) and [`poll_event`] (hand to the TU);
//! 3. sleep until [`poll_timeout`] or the next input.
//!
//! No clock is read here; every method takes `now`. Matching: client transactions by top-Via branch
//! and CSeq method (§17.1.3); server transactions by branch, sent-by and method (§17.2.3), with
//! the RFC 2543 fallback (Call-ID, From tag, CSeq number, top Via) for branches without the magic
//! cookie. What matches no transaction (2xx retransmissions after the INVITE client transaction
//! ended, ACKs for 2xx) is handed up as [`Event::Stray`] for the dialog layer.
//!
//! Floods: out-of-dialog OPTIONS get no transaction at all ([`Event::Stateless`], answered
//! statelessly as RFC 3261 §8.2.7 allows). Server transactions have a budget per source address
//! ([`MAX_SERVER_PER_SOURCE`]) and, for sources not marked trusted with
//! [`TransactionLayer::set_trusted`], in total ([`MAX_UNTRUSTED_SERVER`]), so a flood cannot
//! take the room the registrar's requests and our own client transactions (REGISTER refreshes,
//! BYEs) need. Timers sit in one queue ordered by deadline: no datagram walks every transaction.
//!
//! [`send_request`]: TransactionLayer::send_request
//! [`respond`]: TransactionLayer::respond
//! [`handle_timeout`]: TransactionLayer::handle_timeout
//! [`poll_transmit`]: TransactionLayer::poll_transmit
//! [`poll_event`]: TransactionLayer::poll_event
//! [`poll_timeout`]: TransactionLayer::poll_timeout

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::message::{BRANCH_COOKIE, Builder, Message, ParseError, StartLine, response_to};

/// Timer base values (RFC 3261 §17.1.1.1, Table 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    /// T1: RTT estimate, 500 ms by default.
    pub t1: Duration,
    /// T2: maximum retransmit interval for non-INVITE requests and INVITE responses, 4 s.
    pub t2: Duration,
    /// T4: maximum duration a message remains in the network, 5 s.
    pub t4: Duration,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
        }
    }
}

impl Timers {
    /// 64*T1: Timers B, F, H, J, L, M.
    pub fn sixty_four_t1(&self) -> Duration {
        self.t1.saturating_mul(64)
    }
    /// Timer D: at least 32 s over UDP.
    pub fn d(&self) -> Duration {
        Duration::from_secs(32).max(self.sixty_four_t1())
    }
}

/// The timers of §17 (and RFC 6026), each firing in one kind of transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timer {
    /// A: INVITE client request retransmit, doubling from T1 (§17.1.1.2).
    A,
    /// B: INVITE client transaction timeout, 64*T1 (§17.1.1.2).
    B,
    /// D: wait time for response retransmits in INVITE client Completed (§17.1.1.2).
    D,
    /// E: non-INVITE client request retransmit, doubling from T1 up to T2 (§17.1.2.2).
    E,
    /// F: non-INVITE client transaction timeout, 64*T1 (§17.1.2.2).
    F,
    /// G: INVITE server response retransmit, doubling from T1 up to T2 (§17.2.1).
    G,
    /// H: wait time for ACK receipt, 64*T1 (§17.2.1).
    H,
    /// I: wait time for ACK retransmits, T4 (§17.2.1).
    I,
    /// J: wait time for non-INVITE request retransmits, 64*T1 (§17.2.2).
    J,
    /// K: wait time for response retransmits, T4 (§17.1.2.2).
    K,
    /// L: INVITE server Accepted state, absorbs INVITE retransmissions, 64*T1 (RFC 6026 §8.7).
    L,
    /// M: INVITE client Accepted state, passes 2xx retransmissions up, 64*T1 (RFC 6026 §8.4).
    M,
}

/// A transaction's handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxId(u64);

/// States (RFC 3261 Figures 5-8, RFC 6026 Figures 3-5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// INVITE client, request sent.
    Calling,
    /// Non-INVITE client or server, before any response.
    Trying,
    /// A provisional response was received / sent.
    Proceeding,
    /// A final response (client: non-2xx for INVITE) was received / sent.
    Completed,
    /// INVITE server, ACK received.
    Confirmed,
    /// INVITE, 2xx received / sent (RFC 6026).
    Accepted,
    /// Done; removed from the layer.
    Terminated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    InviteClient,
    NonInviteClient,
    InviteServer,
    NonInviteServer,
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Destination.
    pub dest: SocketAddr,
    /// Bytes.
    pub data: Vec<u8>,
}

/// What the transaction layer tells its user.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// Client transaction: a response (provisional or final; for INVITE also 2xx retransmissions
    /// while Accepted).
    Response {
        /// The transaction.
        id: TxId,
        /// The response.
        response: Message,
    },
    /// Client transaction: no final response in time (Timer B or F): treat as 408.
    Timeout {
        /// The transaction.
        id: TxId,
    },
    /// Server transaction: a new request; answer with [`TransactionLayer::respond`].
    Request {
        /// The transaction.
        id: TxId,
        /// The request.
        request: Message,
        /// Where it came from (responses go to the Via, RFC 3581 `rport` aware).
        source: SocketAddr,
    },
    /// Server INVITE transaction: our non-2xx final response was never ACKed (Timer H).
    AckTimeout {
        /// The transaction.
        id: TxId,
    },
    /// An out-of-dialog OPTIONS: answer it with [`TransactionLayer::send_stateless`], no
    /// transaction is kept (its retransmissions are answered again).
    Stateless {
        /// The request.
        request: Message,
        /// Where the answer goes (RFC 3581 aware).
        reply_to: SocketAddr,
    },
    /// A message matching no transaction: ACK for a 2xx, 2xx retransmissions after the client
    /// transaction ended, responses to unknown branches. For the dialog layer.
    Stray {
        /// The message.
        message: Message,
        /// Its source.
        source: SocketAddr,
    },
}

/// Misuse of the transaction API (a bug in the caller, never peer input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TxError {
    /// The bytes given are not a valid SIP message.
    #[error("not a valid SIP message: {0}")]
    Invalid(ParseError),
    /// A request was expected (or a response).
    #[error("wrong kind of message for this call")]
    WrongKind,
    /// No such (live) server transaction.
    #[error("no such transaction")]
    NoSuchTransaction,
    /// The request's branch does not start with the RFC 3261 magic cookie.
    #[error("branch must start with z9hG4bK")]
    BadBranch,
    /// The transaction already sent a final response.
    #[error("the transaction already has a final response")]
    AlreadyFinal,
    /// Too many transactions in progress.
    #[error("transaction limit reached")]
    Overloaded,
}

/// Most live transactions at once; beyond, new requests get a stateless 503 and
/// [`TransactionLayer::send_request`] fails with [`TxError::Overloaded`].
pub const MAX_TRANSACTIONS: usize = 20_000;

/// Most server transactions at once: the rest of [`MAX_TRANSACTIONS`] is kept for our own
/// requests (REGISTER refreshes, INVITEs, BYEs), whatever peers send.
pub const MAX_SERVER: usize = 15_000;

/// Most server transactions at once from sources not marked trusted (anything but the
/// registrars, proxies and `sip.trusted_peers`), all together.
pub const MAX_UNTRUSTED_SERVER: usize = 5_000;

/// Most server transactions at once from one untrusted source address (about 8 requests a
/// second for the 32 s a completed non-INVITE transaction lives).
pub const MAX_SERVER_PER_SOURCE: u32 = 256;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum ServerKey {
    /// RFC 3261: branch, sent-by, method (ACK counted as INVITE).
    Rfc3261 {
        branch: String,
        sent_by: String,
        method: String,
    },
    /// RFC 2543 fallback.
    Rfc2543 {
        call_id: String,
        from_tag: String,
        cseq: u32,
        via: String,
        method: String,
    },
}

#[derive(Debug)]
struct Tx {
    kind: Kind,
    state: State,
    request: Message,
    request_bytes: Vec<u8>,
    /// Where requests (client) or responses (server) go.
    peer: SocketAddr,
    /// Last response sent (server) for retransmission.
    last_response: Option<Vec<u8>>,
    /// ACK for a non-2xx final (INVITE client), resent on retransmitted finals.
    ack: Option<Vec<u8>>,
    timers: Vec<(Timer, Instant)>,
    /// Current retransmit interval (A, E or G).
    interval: Duration,
    client_key: Option<(String, String)>,
    server_key: Option<ServerKey>,
    /// Server transactions: the source address it is counted against, and whether trusted.
    budget: Option<(IpAddr, bool)>,
    /// The deadline of this transaction's live entry in the layer's queue.
    queued: Option<Instant>,
}

impl Tx {
    fn next_deadline(&self) -> Option<Instant> {
        self.timers.iter().map(|(_, at)| *at).min()
    }
    fn set(&mut self, t: Timer, at: Instant) {
        self.timers.retain(|(x, _)| *x != t);
        self.timers.push((t, at));
    }
    fn clear(&mut self, t: Timer) {
        self.timers.retain(|(x, _)| *x != t);
    }
}

/// All transactions of one SIP endpoint.
#[derive(Debug)]
pub struct TransactionLayer {
    timers: Timers,
    txs: HashMap<TxId, Tx>,
    client_index: HashMap<(String, String), TxId>,
    server_index: HashMap<ServerKey, TxId>,
    /// Deadlines: each change of a transaction's timers pushes its earliest one. Entries of
    /// transactions gone or rescheduled are skipped when popped.
    queue: BinaryHeap<Reverse<(Instant, TxId)>>,
    servers: usize,
    untrusted_servers: usize,
    per_source: HashMap<IpAddr, u32>,
    trusted: HashSet<IpAddr>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    next_id: u64,
    to_tag_seed: u64,
    /// Keys [`stateless_tag`](Self::stateless_tag) (fixed for the process).
    stateless_seed: u64,
}

fn server_key(msg: &Message) -> Option<ServerKey> {
    let via = msg.top_via()?;
    let method = match msg.method() {
        "ACK" => "INVITE".to_owned(),
        m => m.to_owned(),
    };
    match via.branch {
        Some(b) if b.starts_with(BRANCH_COOKIE) => Some(ServerKey::Rfc3261 {
            branch: b,
            sent_by: format!(
                "{}:{}",
                via.host.to_ascii_lowercase(),
                via.port.unwrap_or(5060)
            ),
            method,
        }),
        _ => Some(ServerKey::Rfc2543 {
            call_id: msg.call_id()?.to_owned(),
            from_tag: msg.from_tag().unwrap_or_default().to_owned(),
            cseq: msg.cseq()?.0,
            via: msg.header("Via")?.to_owned(),
            method,
        }),
    }
}

impl TransactionLayer {
    /// A layer with these timer values. `tag_seed` makes generated To tags unique per process.
    pub fn new(timers: Timers, tag_seed: u64) -> TransactionLayer {
        TransactionLayer {
            timers,
            txs: HashMap::new(),
            client_index: HashMap::new(),
            server_index: HashMap::new(),
            queue: BinaryHeap::new(),
            servers: 0,
            untrusted_servers: 0,
            per_source: HashMap::new(),
            trusted: HashSet::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            next_id: 1,
            to_tag_seed: tag_seed,
            stateless_seed: tag_seed.rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15,
        }
    }

    /// The timer values.
    pub fn timers(&self) -> Timers {
        self.timers
    }

    /// Live transactions.
    pub fn len(&self) -> usize {
        self.txs.len()
    }

    /// Whether no transaction is live.
    pub fn is_empty(&self) -> bool {
        self.txs.is_empty()
    }

    /// The state of a live transaction.
    pub fn state(&self, id: TxId) -> Option<State> {
        self.txs.get(&id).map(|t| t.state)
    }

    /// The sources whose requests count against [`MAX_SERVER`] only, not the untrusted
    /// budgets (registrars, outbound proxies, `sip.trusted_peers`).
    pub fn set_trusted(&mut self, trusted: HashSet<IpAddr>) {
        self.trusted = trusted;
    }

    /// Queues a response built for an [`Event::Stateless`] request.
    pub fn send_stateless(&mut self, dest: SocketAddr, response: Vec<u8>) {
        self.transmits.push_back(Transmit {
            dest,
            data: response,
        });
    }

    /// The To tag for a stateless response to `req`: the same for its retransmissions
    /// (RFC 3261 §8.2.7), different per request and per process.
    pub fn stateless_tag(&self, req: &Message) -> String {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.stateless_seed.hash(&mut h);
        req.call_id().hash(&mut h);
        req.from_tag().hash(&mut h);
        req.top_via().and_then(|v| v.branch).hash(&mut h);
        req.cseq().map(|(n, _)| n).hash(&mut h);
        format!("{:016x}", h.finish())
    }

    /// Puts transaction `id`'s earliest deadline in the queue (after any change of its timers).
    fn schedule(&mut self, id: TxId) {
        let Some(tx) = self.txs.get_mut(&id) else {
            return;
        };
        let next = tx.next_deadline();
        if next != tx.queued {
            if let Some(at) = next {
                self.queue.push(Reverse((at, id)));
            }
            tx.queued = next;
        }
    }

    /// Whether a new server transaction from `source` fits its budgets, and whether trusted.
    fn admit(&self, source: IpAddr) -> Option<bool> {
        let trusted = self.trusted.contains(&source);
        let room = self.txs.len() < MAX_TRANSACTIONS
            && self.servers < MAX_SERVER
            && (trusted
                || (self.untrusted_servers < MAX_UNTRUSTED_SERVER
                    && self.per_source.get(&source).copied().unwrap_or(0) < MAX_SERVER_PER_SOURCE));
        room.then_some(trusted)
    }

    fn alloc(&mut self) -> TxId {
        let id = TxId(self.next_id);
        self.next_id += 1;
        id
    }

    /// Starts a client transaction for `request` (wire bytes whose top Via carries a fresh
    /// branch) toward `dest`, and queues its first transmission.
    pub fn send_request(
        &mut self,
        now: Instant,
        request: Vec<u8>,
        dest: SocketAddr,
    ) -> Result<TxId, TxError> {
        let msg = Message::parse(&request).map_err(TxError::Invalid)?;
        if !msg.is_request() || msg.method() == "ACK" {
            return Err(TxError::WrongKind);
        }
        if self.txs.len() >= MAX_TRANSACTIONS {
            return Err(TxError::Overloaded);
        }
        let branch = msg.top_via().and_then(|v| v.branch).unwrap_or_default();
        if !branch.starts_with(BRANCH_COOKIE) {
            return Err(TxError::BadBranch);
        }
        let key = (branch, msg.method().to_owned());
        let invite = msg.method() == "INVITE";
        let id = self.alloc();
        let t1 = self.timers.t1;
        let mut tx = Tx {
            kind: if invite {
                Kind::InviteClient
            } else {
                Kind::NonInviteClient
            },
            state: if invite {
                State::Calling
            } else {
                State::Trying
            },
            request: msg,
            request_bytes: request.clone(),
            peer: dest,
            last_response: None,
            ack: None,
            timers: Vec::new(),
            interval: t1,
            client_key: Some(key.clone()),
            server_key: None,
            budget: None,
            queued: None,
        };
        if invite {
            tx.set(Timer::A, now + t1);
            tx.set(Timer::B, now + self.timers.sixty_four_t1());
        } else {
            tx.set(Timer::E, now + t1);
            tx.set(Timer::F, now + self.timers.sixty_four_t1());
        }
        self.transmits.push_back(Transmit {
            dest,
            data: request,
        });
        self.client_index.insert(key, id);
        self.txs.insert(id, tx);
        self.schedule(id);
        Ok(id)
    }

    /// Sends `response` (wire bytes) on server transaction `id`.
    pub fn respond(&mut self, now: Instant, id: TxId, response: Vec<u8>) -> Result<(), TxError> {
        let code = Message::parse(&response)
            .map_err(TxError::Invalid)?
            .status()
            .ok_or(TxError::WrongKind)?;
        let timers = self.timers;
        let tx = self.txs.get_mut(&id).ok_or(TxError::NoSuchTransaction)?;
        match (tx.kind, tx.state) {
            (Kind::InviteServer, State::Proceeding)
            | (Kind::NonInviteServer, State::Trying | State::Proceeding) => {}
            (Kind::InviteServer | Kind::NonInviteServer, _) => return Err(TxError::AlreadyFinal),
            _ => return Err(TxError::NoSuchTransaction),
        }
        self.transmits.push_back(Transmit {
            dest: tx.peer,
            data: response.clone(),
        });
        tx.last_response = Some(response);
        match (tx.kind, code) {
            (_, 100..=199) => {
                if tx.kind == Kind::NonInviteServer {
                    tx.state = State::Proceeding;
                }
            }
            (Kind::InviteServer, 200..=299) => {
                // RFC 6026: stay to absorb INVITE retransmissions; 2xx retransmission is the
                // dialog layer's job.
                tx.state = State::Accepted;
                tx.set(Timer::L, now + timers.sixty_four_t1());
            }
            (Kind::InviteServer, _) => {
                tx.state = State::Completed;
                tx.interval = timers.t1;
                tx.set(Timer::G, now + timers.t1);
                tx.set(Timer::H, now + timers.sixty_four_t1());
            }
            (_, _) => {
                tx.state = State::Completed;
                tx.set(Timer::J, now + timers.sixty_four_t1());
            }
        }
        self.schedule(id);
        Ok(())
    }

    /// Parses and handles one datagram. Malformed ones are dropped and reported for counting.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        data: &[u8],
        source: SocketAddr,
    ) -> Result<(), ParseError> {
        let msg = Message::parse(data)?;
        self.handle_message(now, msg, source);
        Ok(())
    }

    /// Handles one parsed message.
    pub fn handle_message(&mut self, now: Instant, msg: Message, source: SocketAddr) {
        if msg.is_request() {
            self.handle_request(now, msg, source);
        } else {
            self.handle_response(now, msg, source);
        }
    }

    fn handle_response(&mut self, now: Instant, msg: Message, source: SocketAddr) {
        let key = msg
            .top_via()
            .and_then(|v| v.branch)
            .map(|b| (b, msg.cseq().map(|(_, m)| m.to_owned()).unwrap_or_default()));
        let Some(id) = key.and_then(|k| self.client_index.get(&k).copied()) else {
            self.events.push_back(Event::Stray {
                message: msg,
                source,
            });
            return;
        };
        let Some(code) = msg.status() else { return };
        let timers = self.timers;
        let Some(tx) = self.txs.get_mut(&id) else {
            return;
        };
        match (tx.kind, tx.state, code) {
            (Kind::InviteClient, State::Calling | State::Proceeding, 100..=199) => {
                tx.state = State::Proceeding;
                tx.clear(Timer::A);
                tx.clear(Timer::B);
                self.events.push_back(Event::Response { id, response: msg });
            }
            (Kind::InviteClient, State::Calling | State::Proceeding, 200..=299) => {
                tx.state = State::Accepted;
                tx.timers.clear();
                tx.set(Timer::M, now + timers.sixty_four_t1());
                self.events.push_back(Event::Response { id, response: msg });
            }
            (Kind::InviteClient, State::Accepted, 200..=299) => {
                self.events.push_back(Event::Response { id, response: msg });
            }
            (Kind::InviteClient, State::Calling | State::Proceeding, 300..) => {
                let ack = build_ack(&tx.request, &msg);
                self.transmits.push_back(Transmit {
                    dest: tx.peer,
                    data: ack.clone(),
                });
                tx.ack = Some(ack);
                tx.state = State::Completed;
                tx.timers.clear();
                tx.set(Timer::D, now + timers.d());
                self.events.push_back(Event::Response { id, response: msg });
            }
            (Kind::InviteClient, State::Completed, 300..) => {
                if let Some(ack) = &tx.ack {
                    self.transmits.push_back(Transmit {
                        dest: tx.peer,
                        data: ack.clone(),
                    });
                }
            }
            (Kind::NonInviteClient, State::Trying | State::Proceeding, 100..=199) => {
                if tx.state == State::Trying {
                    tx.state = State::Proceeding;
                }
                self.events.push_back(Event::Response { id, response: msg });
            }
            (Kind::NonInviteClient, State::Trying | State::Proceeding, 200..) => {
                tx.state = State::Completed;
                tx.timers.clear();
                tx.set(Timer::K, now + timers.t4);
                self.events.push_back(Event::Response { id, response: msg });
            }
            // Retransmissions of what we already have: absorbed.
            _ => {}
        }
        self.schedule(id);
    }

    fn handle_request(&mut self, now: Instant, msg: Message, source: SocketAddr) {
        let Some(key) = server_key(&msg) else { return };
        if let Some(&id) = self.server_index.get(&key) {
            let timers = self.timers;
            let Some(tx) = self.txs.get_mut(&id) else {
                return;
            };
            let is_ack = msg.method() == "ACK";
            match (tx.kind, tx.state, is_ack) {
                (Kind::InviteServer, State::Completed, true) => {
                    tx.state = State::Confirmed;
                    tx.timers.clear();
                    tx.set(Timer::I, now + timers.t4);
                }
                (Kind::InviteServer, State::Proceeding | State::Completed, false)
                | (Kind::NonInviteServer, State::Proceeding | State::Completed, false) => {
                    if let Some(r) = &tx.last_response {
                        self.transmits.push_back(Transmit {
                            dest: tx.peer,
                            data: r.clone(),
                        });
                    }
                }
                // Trying (no response yet), Confirmed, Accepted: absorb.
                _ => {}
            }
            self.schedule(id);
            return;
        }
        if msg.method() == "ACK" {
            // ACK for a 2xx (its own transaction, RFC 3261 §17.2.1 / RFC 6026): the dialog's.
            self.events.push_back(Event::Stray {
                message: msg,
                source,
            });
            return;
        }
        let peer = response_destination(&msg, source);
        if msg.method() == "OPTIONS" && msg.to_tag().is_none() {
            self.events.push_back(Event::Stateless {
                request: msg,
                reply_to: peer,
            });
            return;
        }
        let Some(trusted) = self.admit(source.ip()) else {
            let resp = response_to(&msg, 503, "Service Unavailable", None)
                .header("Retry-After", "5")
                .build();
            self.transmits.push_back(Transmit {
                dest: peer,
                data: resp,
            });
            return;
        };
        let invite = msg.method() == "INVITE";
        let id = self.alloc();
        let mut tx = Tx {
            kind: if invite {
                Kind::InviteServer
            } else {
                Kind::NonInviteServer
            },
            state: if invite {
                State::Proceeding
            } else {
                State::Trying
            },
            request: msg.clone(),
            request_bytes: Vec::new(),
            peer,
            last_response: None,
            ack: None,
            timers: Vec::new(),
            interval: self.timers.t1,
            client_key: None,
            server_key: Some(key.clone()),
            budget: Some((source.ip(), trusted)),
            queued: None,
        };
        if invite {
            // §17.2.1: 100 Trying at once, so the client stops retransmitting.
            let trying = response_to(&msg, 100, "Trying", None).build();
            self.transmits.push_back(Transmit {
                dest: peer,
                data: trying.clone(),
            });
            tx.last_response = Some(trying);
        }
        self.server_index.insert(key, id);
        self.txs.insert(id, tx);
        self.servers += 1;
        if !trusted {
            self.untrusted_servers += 1;
            *self.per_source.entry(source.ip()).or_default() += 1;
        }
        self.events.push_back(Event::Request {
            id,
            request: msg,
            source,
        });
    }

    /// Fires every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&Reverse((at, id))) = self.queue.peek() {
            if at > now {
                break;
            }
            self.queue.pop();
            let Some(tx) = self.txs.get(&id) else {
                continue;
            };
            // A stale entry (the timers changed since): the current deadline has its own.
            if tx.queued != Some(at) {
                continue;
            }
            let due: Vec<Timer> = tx
                .timers
                .iter()
                .filter(|(_, t)| *t <= now)
                .map(|(t, _)| *t)
                .collect();
            if let Some(tx) = self.txs.get_mut(&id) {
                tx.queued = None;
            }
            for timer in due {
                self.fire(now, id, timer);
            }
            self.schedule(id);
        }
    }

    fn fire(&mut self, now: Instant, id: TxId, timer: Timer) {
        let timers = self.timers;
        let Some(tx) = self.txs.get_mut(&id) else {
            return;
        };
        // Another timer of the same batch may have changed state; check this one is still armed.
        if !tx.timers.iter().any(|(t, at)| *t == timer && *at <= now) {
            return;
        }
        tx.clear(timer);
        let mut terminate = false;
        match timer {
            Timer::A => {
                self.transmits.push_back(Transmit {
                    dest: tx.peer,
                    data: tx.request_bytes.clone(),
                });
                tx.interval = tx.interval.saturating_mul(2);
                tx.set(Timer::A, now + tx.interval);
            }
            Timer::E => {
                self.transmits.push_back(Transmit {
                    dest: tx.peer,
                    data: tx.request_bytes.clone(),
                });
                tx.interval = if tx.state == State::Proceeding {
                    timers.t2
                } else {
                    tx.interval.saturating_mul(2).min(timers.t2)
                };
                tx.set(Timer::E, now + tx.interval);
            }
            Timer::G => {
                if let Some(r) = &tx.last_response {
                    self.transmits.push_back(Transmit {
                        dest: tx.peer,
                        data: r.clone(),
                    });
                }
                tx.interval = tx.interval.saturating_mul(2).min(timers.t2);
                tx.set(Timer::G, now + tx.interval);
            }
            Timer::B | Timer::F => {
                self.events.push_back(Event::Timeout { id });
                terminate = true;
            }
            Timer::H => {
                self.events.push_back(Event::AckTimeout { id });
                terminate = true;
            }
            Timer::D | Timer::I | Timer::J | Timer::K | Timer::L | Timer::M => terminate = true,
        }
        if terminate {
            self.remove(id);
        }
    }

    fn remove(&mut self, id: TxId) {
        if let Some(tx) = self.txs.remove(&id) {
            if let Some((source, trusted)) = tx.budget {
                self.servers -= 1;
                if !trusted {
                    self.untrusted_servers -= 1;
                    if let Some(n) = self.per_source.get_mut(&source) {
                        *n -= 1;
                        if *n == 0 {
                            self.per_source.remove(&source);
                        }
                    }
                }
            }
            if let Some(k) = tx.client_key {
                self.client_index.remove(&k);
            }
            if let Some(k) = tx.server_key {
                self.server_index.remove(&k);
            }
        }
    }

    /// Drops a transaction at once (its owner is gone, e.g. the agent logged out).
    pub fn abandon(&mut self, id: TxId) {
        self.remove(id);
    }

    /// The next datagram to send.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event for the transaction user.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        // May be a stale entry's (earlier than needed): an early wake-up that skips it.
        self.queue.peek().map(|Reverse((at, _))| *at)
    }

    /// A fresh To tag for a response that creates a dialog (unique within this process).
    pub fn new_tag(&mut self) -> String {
        self.to_tag_seed = self
            .to_tag_seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        format!("{:016x}", self.to_tag_seed)
    }
}

/// Where responses to `req` go (RFC 3261 §18.2.2 with RFC 3581): the source address when `rport`
/// was requested or `received` would be set, else the top Via's sent-by.
pub fn response_destination(req: &Message, source: SocketAddr) -> SocketAddr {
    let Some(via) = req.top_via() else {
        return source;
    };
    if via.rport.is_some() {
        return source;
    }
    match (
        via.host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>(),
        via.port,
    ) {
        (Ok(ip), port) if ip == source.ip() => SocketAddr::new(ip, port.unwrap_or(5060)),
        // sent-by differs from the packet's source (NAT): reply to the source, as `received` says.
        _ => source,
    }
}

/// The ACK for a non-2xx final response (RFC 3261 §17.1.1.3).
fn build_ack(invite: &Message, response: &Message) -> Vec<u8> {
    let uri = match invite.start_line() {
        StartLine::Request { uri, .. } => uri,
        StartLine::Response { .. } => String::new(),
    };
    let mut b = Builder::request("ACK", &uri);
    if let Some(v) = invite.headers("Via").next() {
        b = b.header(
            "Via",
            super::message::split_list(v).first().copied().unwrap_or(v),
        );
    }
    for r in invite.headers("Route") {
        b = b.header("Route", r);
    }
    b = b.header("Max-Forwards", "70");
    if let Some(f) = invite.header("From") {
        b = b.header("From", f);
    }
    if let Some(t) = response.header("To") {
        b = b.header("To", t);
    }
    if let Some(c) = invite.call_id() {
        b = b.header("Call-ID", c);
    }
    if let Some((n, _)) = invite.cseq() {
        b = b.header("CSeq", format!("{n} ACK"));
    }
    b.build()
}

#[cfg(test)]
mod tests;
