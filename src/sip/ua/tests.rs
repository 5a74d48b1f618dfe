//! The user agent on a fake clock: what it sends for what it receives, no socket.

use std::time::{Duration, Instant};

use super::*;
use crate::account::account_from_cli;
use crate::sip::message::{Builder, response_to};
use crate::sip::transaction::MAX_SERVER_PER_SOURCE;

const REGISTRAR: &str = "127.0.0.1:5060";
const SDP: &str = "v=0\r\no=x 1 1 IN IP4 127.0.0.1\r\ns=x\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";

fn settings() -> Arc<Settings> {
    Arc::new(Settings {
        listen: "127.0.0.1:5070".parse().unwrap(),
        public_address: None,
        timers: Timers::default(),
        registration: registration::Settings::default(),
        grace: Duration::from_secs(30),
        max_registrations: 10,
        call_waiting: true,
        dns_server: None,
        min_session_expires: Duration::from_secs(90),
        trusted_peers: Vec::new(),
    })
}

fn account(password: &str) -> SipAccount {
    account_from_cli(
        "1001",
        None,
        password.into(),
        "127.0.0.1",
        None,
        Some(5060),
        None,
    )
    .unwrap()
}

struct Rig {
    ua: UserAgent,
    now: Instant,
    /// Keeps the handles' command queue open.
    _cmds: mpsc::UnboundedReceiver<Command>,
    cmds_tx: mpsc::UnboundedSender<Command>,
}

impl Rig {
    fn new() -> Rig {
        Rig::with(settings())
    }

    fn with(settings: Arc<Settings>) -> Rig {
        let (tx, rx) = mpsc::unbounded_channel();
        Rig {
            ua: UserAgent::new(settings, Arc::default(), tx.clone()).unwrap(),
            now: Instant::now(),
            _cmds: rx,
            cmds_tx: tx,
        }
    }

    fn sent(&mut self) -> Vec<Message> {
        std::iter::from_fn(|| self.ua.poll_transmit())
            .map(|(_, d)| Message::parse(&d).unwrap())
            .collect()
    }

    fn receive(&mut self, m: Vec<u8>) {
        self.receive_from(m, REGISTRAR);
    }

    fn receive_from(&mut self, m: Vec<u8>, source: &str) {
        self.ua
            .handle_datagram(self.now, &m, source.parse().unwrap())
            .unwrap();
    }

    /// Acquires a registration of `app`'s 1001 with `password`.
    fn acquire(&mut self, app: &str, password: &str) -> Acquired {
        let (reply, mut rx) = oneshot::channel();
        self.ua.handle_command(
            self.now,
            Command::Acquire {
                app: app.into(),
                account: Box::new(account(password)),
                target: REGISTRAR.parse().unwrap(),
                via_host: "127.0.0.1:5070".into(),
                fixed: false,
                reply,
            },
        );
        rx.try_recv().unwrap().unwrap()
    }

    /// Answers every REGISTER sent with `code` (200 with the binding for 1 h).
    fn answer_registers(&mut self, code: u16) -> usize {
        let regs: Vec<Message> = self
            .sent()
            .into_iter()
            .filter(|m| m.method() == "REGISTER" && m.is_request())
            .collect();
        for r in &regs {
            let mut b = response_to(r, code, "R", Some("reg"));
            if code == 200 {
                let contact = r.header("Contact").unwrap_or_default().to_owned();
                b = b.header("Contact", format!("{contact};expires=3600"));
            }
            self.receive(b.build());
        }
        regs.len()
    }

    fn dial(&mut self, key: &RegKey) -> CallHandle {
        let (reply, mut rx) = oneshot::channel();
        self.ua.handle_command(
            self.now,
            Command::Dial {
                key: key.clone(),
                to: "1002".into(),
                sdp: SDP.into(),
                headers: vec![("X-Customer-Id".into(), "C-7".into())],
                reply,
            },
        );
        rx.try_recv().unwrap().unwrap()
    }

    /// An INVITE from the registrar for `contact_user`; the status the UA answered with.
    fn invite_for(&mut self, contact_user: &str) -> u16 {
        self.invite_from(contact_user, REGISTRAR, "in")
    }

    /// An INVITE from `source` for `contact_user` (`tag` tells calls apart).
    fn invite_from(&mut self, contact_user: &str, source: &str, tag: &str) -> u16 {
        let invite = Builder::request("INVITE", &format!("sip:{contact_user}@127.0.0.1:5070"))
            .header(
                "Via",
                format!("SIP/2.0/UDP {source};branch=z9hG4bK{tag}{contact_user}"),
            )
            .header("From", "<sip:1002@127.0.0.1>;tag=caller")
            .header("To", "<sip:1001@127.0.0.1>")
            .header("Call-ID", format!("{tag}{contact_user}@far"))
            .header("CSeq", "1 INVITE")
            .header("Contact", "<sip:1002@127.0.0.1:5060>")
            .header("Max-Forwards", "70")
            .body("application/sdp", SDP.as_bytes().to_vec())
            .build();
        self.receive_from(invite, source);
        self.sent()
            .iter()
            .filter_map(Message::status)
            .find(|s| *s >= 180)
            .unwrap_or(0)
    }
}

fn contact_user(ua: &UserAgent, key: &RegKey) -> String {
    ua.regs[key].reg.contact_user().to_owned()
}

/// RFC 3261 §13.2.2.4: every retransmission of the 2xx to our INVITE gets the ACK again (the
/// first ACK may have been lost), here two copies of the 200 a second apart.
#[test]
fn each_retransmitted_2xx_to_our_invite_is_acked_again() {
    let mut r = Rig::new();
    let reg = r.acquire("crm", "pass1001");
    let _call = r.dial(&reg.key);
    let invite = r
        .sent()
        .into_iter()
        .find(|m| m.method() == "INVITE")
        .expect("INVITE sent");
    let ok = response_to(&invite, 200, "OK", Some("far"))
        .header("Contact", "<sip:1002@127.0.0.1:5060>")
        .body("application/sdp", SDP.as_bytes().to_vec())
        .build();
    let mut acks = 0;
    for _ in 0..3 {
        r.receive(ok.clone());
        let sent: Vec<Message> = r
            .sent()
            .into_iter()
            .filter(|m| m.method() == "ACK")
            .collect();
        assert_eq!(sent.len(), 1, "one ACK per 200: {sent:?}");
        assert_eq!(sent[0].method(), "ACK");
        assert_eq!(sent[0].cseq().map(|c| c.0), invite.cseq().map(|c| c.0));
        acks += 1;
        r.now += Duration::from_secs(1);
        r.ua.handle_timeout(r.now);
    }
    assert_eq!(acks, 3);
}

/// A login with the live agent's address but another password, or from another app, gets a
/// registration of its own; the same app and password share one.
#[test]
fn registrations_are_shared_only_by_the_same_app_and_password() {
    let mut r = Rig::new();
    let a = r.acquire("crm", "pass1001");
    assert_eq!(r.answer_registers(200), 1);
    let same = r.acquire("crm", "pass1001");
    assert_eq!(same.key, a.key);
    assert_eq!(r.answer_registers(200), 0, "joined: no new REGISTER");
    let wrong = r.acquire("erp", "guessed");
    let other_app = r.acquire("erp", "pass1001");
    let other_pw = r.acquire("crm", "guessed");
    for k in [&wrong.key, &other_app.key, &other_pw.key] {
        assert_ne!(k, &a.key);
    }
    assert_eq!(r.ua.regs.len(), 4);
    assert!(!format!("{:?}", a.key).contains("pass1001"));
    // The victim's account is untouched: its next REGISTER still authenticates as before.
    assert_eq!(
        r.ua.regs[&a.key].reg.account().password.expose_secret(),
        "pass1001"
    );
    let _ = r.cmds_tx.clone();
}

/// A binding the registrar refused is offered no incoming call, even when an INVITE names its
/// Contact; once a registration is accepted, its calls ring.
#[test]
fn no_incoming_call_for_a_registration_the_registrar_never_accepted() {
    let mut r = Rig::new();
    let refused = r.acquire("erp", "guessed");
    assert_eq!(r.answer_registers(403), 1);
    let user = contact_user(&r.ua, &refused.key);
    assert_eq!(r.invite_for(&user), 404);

    let accepted = r.acquire("crm", "pass1001");
    assert_eq!(r.answer_registers(200), 1);
    assert!(
        matches!(
            r.ua.regs[&accepted.key].reg.status(),
            Status::Registered { .. }
        ),
        "{:?}",
        r.ua.regs[&accepted.key].reg.status()
    );
    let user = contact_user(&r.ua, &accepted.key);
    assert_eq!(r.invite_for(&user), 180);
}

/// A new INVITE is taken only from the registration's registrar or proxy, or a configured
/// trusted peer: anyone else who learnt the Contact gets 403 (and cannot assert an identity).
#[test]
fn incoming_calls_come_only_from_the_registrar_or_trusted_peers() {
    let mut r = Rig::with(Arc::new(Settings {
        trusted_peers: vec!["192.0.2.10".parse().unwrap()],
        ..(*settings()).clone()
    }));
    let reg = r.acquire("crm", "pass1001");
    assert_eq!(r.answer_registers(200), 1);
    let user = contact_user(&r.ua, &reg.key);
    assert_eq!(r.invite_from(&user, "198.51.100.7:5060", "spoof"), 403);
    assert_eq!(r.invite_from(&user, "192.0.2.10:5070", "sbc"), 180);
    assert_eq!(r.invite_from(&user, REGISTRAR, "proxy"), 180);
}

/// Issue 15 item 1, at the UA: an outsider's flood of OPTIONS (answered statelessly) and of
/// other requests (its budget, then 503) leaves the registrar's INVITEs and our REGISTER
/// refreshes working. Before, ~20,000 requests with fresh branches filled the one table and
/// every refresh failed with `Overloaded` for 32 s.
#[test]
fn an_outsiders_request_flood_leaves_registrations_and_calls_working() {
    let mut rig = Rig::new();
    let acq = rig.acquire("app", "pass1001");
    assert_eq!(rig.answer_registers(200), 1);
    let user = contact_user(&rig.ua, &acq.key);
    let outsider = "127.0.0.9:5099";
    let mut statuses = HashMap::<(String, u16), usize>::new();
    for (method, n) in [("OPTIONS", 21_000), ("INFO", 1_000)] {
        for i in 0..n {
            let req = Builder::request(method, "sip:1001@127.0.0.1:5070")
                .header("Via", format!("SIP/2.0/UDP {outsider};branch=z9hG4bKf{i}"))
                .header("From", "<sip:x@127.0.0.9>;tag=x")
                .header("To", "<sip:1001@127.0.0.1>")
                .header("Call-ID", format!("flood{i}"))
                .header("CSeq", format!("1 {method}"))
                .build();
            rig.receive_from(req, outsider);
            for m in rig.sent() {
                let key = (m.method().to_owned(), m.status().unwrap_or(0));
                if key == ("OPTIONS".to_owned(), 200) {
                    assert!(m.header("Allow").is_some_and(|a| a.contains("INVITE")));
                }
                *statuses.entry(key).or_default() += 1;
            }
        }
    }
    let count = |m: &str, s: u16| statuses.get(&(m.to_owned(), s)).copied().unwrap_or(0);
    assert_eq!(count("OPTIONS", 200), 21_000);
    assert_eq!(count("INFO", 405), MAX_SERVER_PER_SOURCE as usize);
    assert_eq!(count("INFO", 503), 1_000 - MAX_SERVER_PER_SOURCE as usize);
    // A stateless answer's To tag is the same for a retransmission.
    let options = Builder::request("OPTIONS", "sip:1001@127.0.0.1:5070")
        .header("Via", format!("SIP/2.0/UDP {outsider};branch=z9hG4bKagain"))
        .header("From", "<sip:x@127.0.0.9>;tag=x")
        .header("To", "<sip:1001@127.0.0.1>")
        .header("Call-ID", "again")
        .header("CSeq", "1 OPTIONS")
        .build();
    let tags: Vec<String> = (0..2)
        .map(|_| {
            rig.receive_from(options.clone(), outsider);
            rig.sent()[0].to_tag().unwrap_or_default().to_owned()
        })
        .collect();
    assert_eq!(tags[0], tags[1]);
    assert!(!tags[0].is_empty());
    // The registrar's INVITE still rings the agent.
    assert_eq!(rig.invite_for(&user), 180);
    // And the refresh goes out when due.
    let mut refreshed = false;
    for _ in 0..1_000 {
        let Some(t) = rig.ua.poll_timeout() else {
            break;
        };
        rig.now = rig.now.max(t);
        rig.ua.handle_timeout(rig.now);
        if rig
            .sent()
            .iter()
            .any(|m| m.is_request() && m.method() == "REGISTER")
        {
            refreshed = true;
            break;
        }
    }
    assert!(refreshed, "no REGISTER refresh");
}
