//! Every timer path with a fake clock: time jumps to the next `poll_timeout`, never sleeps.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::*;
use crate::sip::message::{Builder, Message, response_to};

const PEER: &str = "127.0.0.1:5060";

fn peer() -> SocketAddr {
    PEER.parse().unwrap()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn request(method: &str, branch: &str) -> Vec<u8> {
    Builder::request(method, "sip:1002@127.0.0.1")
        .header(
            "Via",
            format!("SIP/2.0/UDP 127.0.0.1:5070;branch={branch};rport"),
        )
        .header("Max-Forwards", "70")
        .header("From", "<sip:1001@127.0.0.1>;tag=f1")
        .header("To", "<sip:1002@127.0.0.1>")
        .header("Call-ID", "call-1")
        .header("CSeq", format!("1 {method}"))
        .header("Route", "<sip:127.0.0.1;lr>")
        .build()
}

fn reply(req: &[u8], code: u16) -> Vec<u8> {
    let m = Message::parse(req).unwrap();
    response_to(&m, code, "X", if code > 100 { Some("t2") } else { None }).build()
}

struct Harness {
    layer: TransactionLayer,
    start: Instant,
    now: Instant,
    sent: Vec<(Duration, Vec<u8>)>,
    events: Vec<(Duration, Event)>,
}

impl Harness {
    fn new() -> Harness {
        let now = Instant::now();
        Harness {
            layer: TransactionLayer::new(Timers::default(), 1),
            start: now,
            now,
            sent: Vec::new(),
            events: Vec::new(),
        }
    }

    fn drain(&mut self) {
        let at = self.now - self.start;
        while let Some(t) = self.layer.poll_transmit() {
            self.sent.push((at, t.data));
        }
        while let Some(e) = self.layer.poll_event() {
            self.events.push((at, e));
        }
    }

    /// Jumps to each deadline until `until` (bounded).
    fn run_until(&mut self, until: Duration) {
        for _ in 0..10_000 {
            self.drain();
            match self.layer.poll_timeout() {
                Some(t) if t - self.start <= until => {
                    self.now = t.max(self.now);
                    self.layer.handle_timeout(self.now);
                }
                _ => break,
            }
        }
        self.now = self.start + until;
        self.drain();
    }

    fn feed(&mut self, data: &[u8]) {
        self.layer.handle_datagram(self.now, data, peer()).unwrap();
        self.drain();
    }

    fn sent_times(&self, start_line: &str) -> Vec<Duration> {
        self.sent
            .iter()
            .filter(|(_, d)| d.starts_with(start_line.as_bytes()))
            .map(|(t, _)| *t)
            .collect()
    }
}

/// Timer E doubles from T1 to T2 and stays there; Timer F gives Timeout at 64*T1 exactly.
#[test]
fn non_invite_client_retransmits_and_times_out() {
    let mut h = Harness::new();
    let id = h
        .layer
        .send_request(h.now, request("REGISTER", "z9hG4bKa"), peer())
        .unwrap();
    h.run_until(Duration::from_secs(40));
    let expect: Vec<Duration> = [
        0, 500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500,
    ]
    .into_iter()
    .map(ms)
    .collect();
    assert_eq!(h.sent_times("REGISTER"), expect);
    assert!(
        matches!(h.events.as_slice(), [(t, Event::Timeout { id: i })] if *t == ms(32_000) && *i == id)
    );
    assert!(h.layer.is_empty());
}

/// A provisional response moves E to T2; the final ends retransmission; Timer K (T4) cleans up and
/// absorbs retransmitted finals.
#[test]
fn non_invite_client_proceeding_completed_k() {
    let mut h = Harness::new();
    let req = request("OPTIONS", "z9hG4bKb");
    let id = h.layer.send_request(h.now, req.clone(), peer()).unwrap();
    h.run_until(ms(600));
    h.feed(&reply(&req, 100));
    assert_eq!(h.layer.state(id), Some(State::Proceeding));
    h.run_until(ms(4_000));
    // Sent at 0 and 500 (E = T1, then 2*T1); the 1xx came at 600, so the 1500 ms firing
    // re-arms E at T2: next would be 5500.
    assert_eq!(h.sent_times("OPTIONS"), vec![ms(0), ms(500), ms(1500)]);
    h.feed(&reply(&req, 200));
    assert_eq!(h.layer.state(id), Some(State::Completed));
    h.feed(&reply(&req, 200));
    let finals = h.events.iter().filter(|(_, e)| matches!(e, Event::Response { response, .. } if response.status() == Some(200))).count();
    assert_eq!(finals, 1, "retransmitted final absorbed");
    h.run_until(ms(4_000) + ms(4_999));
    assert_eq!(h.layer.state(id), Some(State::Completed));
    h.run_until(ms(9_000));
    assert_eq!(h.layer.state(id), None, "Timer K = T4 after the final");
    assert_eq!(h.sent_times("OPTIONS").len(), 3);
}

/// Timer A doubles without cap until Timer B (64*T1) times the INVITE out.
#[test]
fn invite_client_timer_a_and_b() {
    let mut h = Harness::new();
    let id = h
        .layer
        .send_request(h.now, request("INVITE", "z9hG4bKc"), peer())
        .unwrap();
    h.run_until(Duration::from_secs(40));
    let expect: Vec<Duration> = [0, 500, 1500, 3500, 7500, 15500, 31500]
        .into_iter()
        .map(ms)
        .collect();
    assert_eq!(h.sent_times("INVITE"), expect);
    assert!(
        matches!(h.events.as_slice(), [(t, Event::Timeout { id: i })] if *t == ms(32_000) && *i == id)
    );
}

/// A non-2xx final is ACKed by the transaction (To tag from the response, same branch, Route
/// kept), re-ACKed on retransmission, and Timer D ends it.
#[test]
fn invite_client_non_2xx_ack_and_timer_d() {
    let mut h = Harness::new();
    let req = request("INVITE", "z9hG4bKd");
    let id = h.layer.send_request(h.now, req.clone(), peer()).unwrap();
    h.feed(&reply(&req, 180));
    h.run_until(Duration::from_secs(10));
    assert_eq!(
        h.sent_times("INVITE"),
        vec![ms(0)],
        "a provisional stops Timer A and B"
    );
    h.feed(&reply(&req, 486));
    h.feed(&reply(&req, 486));
    let acks: Vec<_> = h
        .sent
        .iter()
        .filter(|(_, d)| d.starts_with(b"ACK "))
        .collect();
    assert_eq!(acks.len(), 2);
    let ack = Message::parse(&acks[0].1).unwrap();
    assert_eq!(ack.top_via().unwrap().branch.as_deref(), Some("z9hG4bKd"));
    assert_eq!(ack.to_tag(), Some("t2"));
    assert_eq!(ack.cseq(), Some((1, "ACK")));
    assert_eq!(ack.header("Route"), Some("<sip:127.0.0.1;lr>"));
    assert_eq!(h.layer.state(id), Some(State::Completed));
    h.run_until(Duration::from_secs(10) + Duration::from_secs(32) - ms(1));
    assert_eq!(h.layer.state(id), Some(State::Completed));
    h.run_until(Duration::from_secs(43));
    assert_eq!(h.layer.state(id), None);
    let responses = h
        .events
        .iter()
        .filter(|(_, e)| matches!(e, Event::Response { .. }))
        .count();
    assert_eq!(responses, 2, "180 and the first 486 only");
}

/// 2xx: Accepted (RFC 6026); retransmitted 2xx go up to the dialog until Timer M; no ACK here.
#[test]
fn invite_client_2xx_accepted_timer_m() {
    let mut h = Harness::new();
    let req = request("INVITE", "z9hG4bKe");
    let id = h.layer.send_request(h.now, req.clone(), peer()).unwrap();
    h.feed(&reply(&req, 200));
    h.run_until(ms(1000));
    h.feed(&reply(&req, 200));
    assert_eq!(h.layer.state(id), Some(State::Accepted));
    let oks = h
        .events
        .iter()
        .filter(|(_, e)| matches!(e, Event::Response { .. }))
        .count();
    assert_eq!(oks, 2);
    assert!(
        h.sent_times("ACK").is_empty(),
        "the dialog ACKs a 2xx, not the transaction"
    );
    h.run_until(Duration::from_secs(33));
    assert_eq!(h.layer.state(id), None);
    h.feed(&reply(&req, 200));
    assert!(
        matches!(h.events.last(), Some((_, Event::Stray { .. }))),
        "after M: stray, for the dialog"
    );
}

/// Server INVITE: immediate 100; retransmitted INVITE re-sends the last response; non-2xx final
/// is retransmitted by Timer G (T1 doubling to T2); ACK → Confirmed; Timer I ends it.
#[test]
fn invite_server_g_ack_i() {
    let mut h = Harness::new();
    let req = request("INVITE", "z9hG4bKf");
    h.feed(&req);
    let id = match h.events.as_slice() {
        [(_, Event::Request { id, request, .. })] => {
            assert_eq!(request.method(), "INVITE");
            *id
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(h.sent_times("SIP/2.0 100").len(), 1);
    h.feed(&req);
    assert_eq!(
        h.sent_times("SIP/2.0 100").len(),
        2,
        "retransmitted INVITE gets the 100 again"
    );
    assert_eq!(h.events.len(), 1, "and is not a new request");
    h.layer.respond(h.now, id, reply(&req, 486)).unwrap();
    h.run_until(ms(9_000));
    let expect: Vec<Duration> = [0, 500, 1500, 3500, 7500].into_iter().map(ms).collect();
    assert_eq!(h.sent_times("SIP/2.0 486"), expect);
    let ack = Builder::request("ACK", "sip:1002@127.0.0.1")
        .header("Via", "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKf;rport")
        .header("From", "<sip:1001@127.0.0.1>;tag=f1")
        .header("To", "<sip:1002@127.0.0.1>;tag=t2")
        .header("Call-ID", "call-1")
        .header("CSeq", "1 ACK")
        .build();
    h.feed(&ack);
    assert_eq!(h.layer.state(id), Some(State::Confirmed));
    h.run_until(ms(20_000));
    assert_eq!(h.sent_times("SIP/2.0 486").len(), 5, "ACK stops Timer G");
    assert_eq!(h.layer.state(id), None, "Timer I");
    assert_eq!(h.events.len(), 1, "the ACK is absorbed");
    assert_eq!(
        h.layer.respond(h.now, id, reply(&req, 200)),
        Err(TxError::NoSuchTransaction)
    );
}

/// No ACK: Timer H gives AckTimeout at 64*T1; G kept retransmitting at T2 until then.
#[test]
fn invite_server_timer_h() {
    let mut h = Harness::new();
    let req = request("INVITE", "z9hG4bKg");
    h.feed(&req);
    let Some((_, Event::Request { id, .. })) = h.events.first().cloned() else {
        panic!()
    };
    h.layer.respond(h.now, id, reply(&req, 603)).unwrap();
    h.run_until(Duration::from_secs(40));
    assert!(matches!(h.events.last(), Some((t, Event::AckTimeout { .. })) if *t == ms(32_000)));
    let n = h.sent_times("SIP/2.0 603").len();
    // 0, .5, 1.5, 3.5, 7.5, then every 4 s: 11.5 ... 31.5
    assert_eq!(n, 11);
}

/// Server INVITE 2xx → Accepted: retransmitted INVITEs absorbed until Timer L; ACK for the 2xx is
/// a different transaction and goes to the dialog.
#[test]
fn invite_server_accepted_timer_l() {
    let mut h = Harness::new();
    let req = request("INVITE", "z9hG4bKh");
    h.feed(&req);
    let Some((_, Event::Request { id, .. })) = h.events.first().cloned() else {
        panic!()
    };
    h.layer.respond(h.now, id, reply(&req, 200)).unwrap();
    h.feed(&req);
    assert_eq!(h.events.len(), 1);
    assert_eq!(
        h.layer.respond(h.now, id, reply(&req, 200)),
        Err(TxError::AlreadyFinal)
    );
    let ack = Builder::request("ACK", "sip:1002@127.0.0.1")
        .header("Via", "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKother")
        .header("From", "<sip:1001@127.0.0.1>;tag=f1")
        .header("To", "<sip:1002@127.0.0.1>;tag=t2")
        .header("Call-ID", "call-1")
        .header("CSeq", "1 ACK")
        .build();
    h.feed(&ack);
    assert!(matches!(h.events.last(), Some((_, Event::Stray { .. }))));
    h.run_until(Duration::from_secs(33));
    assert_eq!(h.layer.state(id), None);
}

/// Server non-INVITE: retransmission before the answer is absorbed, after it re-sends the answer;
/// Timer J ends the transaction.
#[test]
fn non_invite_server_j() {
    let mut h = Harness::new();
    let req = request("INFO", "z9hG4bKi");
    h.feed(&req);
    h.feed(&req);
    assert_eq!(h.events.len(), 1);
    assert!(h.sent.is_empty());
    let Some((_, Event::Request { id, .. })) = h.events.first().cloned() else {
        panic!()
    };
    h.layer.respond(h.now, id, reply(&req, 200)).unwrap();
    h.feed(&req);
    assert_eq!(h.sent_times("SIP/2.0 200").len(), 2);
    h.run_until(Duration::from_secs(32) - ms(1));
    assert_eq!(h.layer.state(id), Some(State::Completed));
    h.run_until(Duration::from_secs(32));
    assert_eq!(h.layer.state(id), None);
}

/// RFC 2543 peers (no magic cookie) still get retransmission matching.
#[test]
fn rfc2543_matching() {
    let mut h = Harness::new();
    let req = request("INFO", "oldstyle1");
    h.feed(&req);
    h.feed(&req);
    assert_eq!(h.events.len(), 1);
}

#[test]
fn responses_with_unknown_branch_are_stray_and_bad_input_is_refused() {
    let mut h = Harness::new();
    h.feed(&reply(&request("OPTIONS", "z9hG4bKnobody"), 200));
    assert!(matches!(h.events.as_slice(), [(_, Event::Stray { .. })]));
    assert_eq!(
        h.layer
            .send_request(h.now, request("OPTIONS", "nocookie"), peer()),
        Err(TxError::BadBranch)
    );
    assert!(
        h.layer
            .send_request(h.now, b"junk".to_vec(), peer())
            .is_err()
    );
    assert_eq!(
        h.layer.handle_datagram(h.now, b"junk\r\n\r\n", peer()),
        Err(crate::sip::message::ParseError::Rejected)
    );
}

#[test]
fn rport_and_received_decide_where_responses_go() {
    let src: SocketAddr = "192.0.2.7:40000".parse().unwrap();
    let with_rport = Message::parse(&request("OPTIONS", "z9hG4bK1")).unwrap();
    assert_eq!(response_destination(&with_rport, src), src);
    let plain = Builder::request("OPTIONS", "sip:a@b")
        .header("Via", "SIP/2.0/UDP 192.0.2.7:5062;branch=z9hG4bK2")
        .header("From", "<sip:a@b>;tag=1")
        .header("To", "<sip:a@b>")
        .header("Call-ID", "c")
        .header("CSeq", "1 OPTIONS")
        .into_message()
        .unwrap();
    assert_eq!(
        response_destination(&plain, src),
        "192.0.2.7:5062".parse::<std::net::SocketAddr>().unwrap()
    );
}

fn request_from(method: &str, branch: &str, source: SocketAddr) -> Vec<u8> {
    Builder::request(method, "sip:1002@127.0.0.1")
        .header("Via", format!("SIP/2.0/UDP {source};branch={branch};rport"))
        .header("Max-Forwards", "70")
        .header("From", format!("<sip:x@{}>;tag={branch}", source.ip()))
        .header("To", "<sip:1002@127.0.0.1>")
        .header("Call-ID", format!("flood-{branch}"))
        .header("CSeq", format!("1 {method}"))
        .build()
}

impl Harness {
    /// Feeds `n` requests with distinct branches, the i-th from `source(i)`, and answers each
    /// that became a transaction with a final response, as the UA does; returns how many did.
    fn flood(&mut self, method: &str, n: usize, source: impl Fn(usize) -> SocketAddr) -> usize {
        let before = self.events.len();
        for i in 0..n {
            let src = source(i);
            let req = request_from(method, &format!("z9hG4bKflood{method}{i}"), src);
            self.layer.handle_datagram(self.now, &req, src).unwrap();
            self.drain();
        }
        let admitted: Vec<(TxId, Message)> = self.events[before..]
            .iter()
            .filter_map(|(_, e)| match e {
                Event::Request { id, request, .. } => Some((*id, request.clone())),
                _ => None,
            })
            .collect();
        for (id, req) in &admitted {
            let resp = response_to(req, 405, "Method Not Allowed", Some("t")).build();
            self.layer.respond(self.now, *id, resp).unwrap();
        }
        self.drain();
        admitted.len()
    }

    fn client_request_fits(&mut self) -> bool {
        let branch = format!("z9hG4bKours{}", self.layer.len());
        self.layer
            .send_request(self.now, request("REGISTER", &branch), peer())
            .is_ok()
    }
}

/// Issue 15 item 1: 625 OPTIONS a second with fresh branches used to fill the whole table for
/// Timer J's 32 s, and every REGISTER refresh, INVITE and BYE then failed with `Overloaded`.
#[test]
fn out_of_dialog_options_are_answered_without_a_transaction() {
    let mut h = Harness::new();
    let attacker: SocketAddr = "127.0.0.9:5060".parse().unwrap();
    assert_eq!(
        h.flood("OPTIONS", MAX_TRANSACTIONS + 5_000, |_| attacker),
        0
    );
    assert!(h.layer.is_empty());
    let stateless = h
        .events
        .iter()
        .filter(|(_, e)| matches!(e, Event::Stateless { reply_to, .. } if *reply_to == attacker))
        .count();
    assert_eq!(stateless, MAX_TRANSACTIONS + 5_000);
    assert!(h.client_request_fits());
    // In a dialog (a To tag), OPTIONS is the dialog's business: a transaction as usual.
    let in_dialog = String::from_utf8(request("OPTIONS", "z9hG4bKdlg"))
        .unwrap()
        .replace(
            "To: <sip:1002@127.0.0.1>",
            "To: <sip:1002@127.0.0.1>;tag=ours",
        );
    h.feed(in_dialog.as_bytes());
    assert!(matches!(h.events.last(), Some((_, Event::Request { .. }))));
}

#[test]
fn one_source_gets_its_budget_of_server_transactions_and_no_more() {
    let mut h = Harness::new();
    let attacker: SocketAddr = "127.0.0.9:5060".parse().unwrap();
    let admitted = h.flood("INFO", MAX_TRANSACTIONS, |_| attacker);
    assert_eq!(admitted, MAX_SERVER_PER_SOURCE as usize);
    let refused = h.sent_times("SIP/2.0 503").len();
    assert_eq!(h.sent_times("SIP/2.0 405").len(), admitted);
    assert_eq!(refused, MAX_TRANSACTIONS - admitted);
    // Another source, our own requests: untouched.
    let other: SocketAddr = "127.0.0.10:5060".parse().unwrap();
    assert_eq!(h.flood("BYE", 3, |_| other), 3);
    assert!(h.client_request_fits());
    // Timer J frees the attacker's room again.
    h.run_until(Duration::from_secs(33));
    assert_eq!(h.flood("INFO", 1, |_| attacker), 1);
}

/// Spoofed sources (one request from each of many addresses) fill only the untrusted share:
/// the registrar's requests and ours still fit.
#[test]
fn many_sources_fill_only_the_untrusted_share() {
    let mut h = Harness::new();
    let registrar: SocketAddr = "127.0.0.1:5060".parse().unwrap();
    h.layer.set_trusted([registrar.ip()].into_iter().collect());
    let spoofed = |i: usize| {
        let [_, a, b, c] = (i as u32 + 0x7f01_0000).to_be_bytes();
        SocketAddr::from(([127, a, b, c], 5060))
    };
    assert_eq!(
        h.flood("INFO", MAX_TRANSACTIONS, spoofed),
        MAX_UNTRUSTED_SERVER
    );
    assert_eq!(h.flood("INVITE", 100, |_| registrar), 100);
    for _ in 0..1_000 {
        assert!(h.client_request_fits());
    }
    // Trusted sources too have a ceiling below the table's size: room stays for our requests.
    let trusted_flood = h.flood("INFO", MAX_TRANSACTIONS, |_| registrar);
    assert_eq!(trusted_flood, MAX_SERVER - MAX_UNTRUSTED_SERVER - 100);
    assert!(h.client_request_fits());
}

/// Retransmissions do not grow the timer queue: one live entry per transaction.
#[test]
fn retransmissions_leave_one_queue_entry_per_transaction() {
    let mut h = Harness::new();
    let req = request("INVITE", "z9hG4bKq");
    h.feed(&req);
    let Some((_, Event::Request { id, .. })) = h.events.first().cloned() else {
        panic!("no request event")
    };
    h.layer.respond(h.now, id, reply(&req, 486)).unwrap();
    for _ in 0..10_000 {
        h.feed(&req);
    }
    assert!(
        h.layer.queue.len() <= 2,
        "{} queue entries",
        h.layer.queue.len()
    );
    h.run_until(Duration::from_secs(40));
    assert!(h.layer.is_empty());
    assert!(h.layer.queue.is_empty());
}
