use std::time::{Duration, Instant};

use super::*;
use crate::account::account_from_cli;
use crate::sip::message::{Builder, Message, response_to};
use crate::sip::transaction::{TransactionLayer, TxId};

const SDP: &str = "v=0\r\no=x 1 1 IN IP4 127.0.0.1\r\ns=x\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n";

fn local() -> Local {
    Local {
        aor: "sip:1001@example.com".into(),
        contact: "sip:1001-abc@127.0.0.1:5070;transport=udp".into(),
        via_host: "127.0.0.1:5070".into(),
        target: "127.0.0.1:5060".parse().unwrap(),
        user_agent: "t".into(),
        min_session_expires: Duration::from_secs(90),
    }
}

fn account() -> crate::account::SipAccount {
    account_from_cli(
        "1001",
        None,
        "pass1001".into(),
        "example.com",
        None,
        None,
        None,
    )
    .unwrap()
}

/// Our call to sip:1002@example.com, INVITE queued.
fn outgoing_to_1002() -> Call {
    Call::outgoing(
        local(),
        account(),
        "sip:1002@example.com".into(),
        SDP.into(),
        Timers::default(),
        5,
    )
}

fn outputs(c: &mut Call) -> Vec<Output> {
    std::iter::from_fn(|| c.poll_output()).collect()
}

fn events(c: &mut Call) -> Vec<CallEvent> {
    std::iter::from_fn(|| c.poll_event()).collect()
}

fn request_of(o: &Output) -> (Purpose, Message, std::net::SocketAddr) {
    match o {
        Output::Request {
            purpose,
            data,
            dest,
        } => (*purpose, Message::parse(data).unwrap(), *dest),
        other => panic!("{other:?}"),
    }
}

fn sent(o: &Output) -> (Message, std::net::SocketAddr) {
    match o {
        Output::Send { data, dest } => (Message::parse(data).unwrap(), *dest),
        other => panic!("{other:?}"),
    }
}

fn reply(req: &Message, code: u16, extra: &[(&str, &str)], body: Option<&str>) -> Message {
    let mut b = response_to(req, code, "R", if code > 100 { Some("far") } else { None });
    for (k, v) in extra {
        b = b.header(k, *v);
    }
    if let Some(s) = body {
        b = b.body("application/sdp", s.as_bytes().to_vec());
    }
    b.into_message().unwrap()
}

#[test]
fn outbound_auth_ring_answer_ack_bye() {
    let t0 = Instant::now();
    let mut c = outgoing_to_1002();
    let out = outputs(&mut c);
    let (p, inv, dest) = request_of(&out[0]);
    assert_eq!(
        (p, dest),
        (Purpose::Invite, "127.0.0.1:5060".parse().unwrap())
    );
    assert_eq!(inv.body(), SDP.as_bytes());
    assert_eq!(inv.cseq(), Some((1, "INVITE")));
    c.handle_response(
        t0,
        Purpose::Invite,
        &reply(
            &inv,
            407,
            &[(
                "Proxy-Authenticate",
                "Digest realm=\"example.com\", nonce=\"n\", qop=\"auth\"",
            )],
            None,
        ),
    );
    let (_, inv2, _) = request_of(&outputs(&mut c)[0]);
    assert_eq!(inv2.cseq(), Some((2, "INVITE")));
    assert_eq!(inv2.call_id(), inv.call_id());
    assert_eq!(inv2.from_tag(), inv.from_tag());
    assert!(
        inv2.header("Proxy-Authorization")
            .unwrap()
            .contains("uri=\"sip:1002@example.com\"")
    );
    c.handle_response(t0, Purpose::Invite, &reply(&inv2, 180, &[], None));
    let rr = [
        ("Record-Route", "<sip:10.9.9.9;lr>, <sip:127.0.0.1:5060;lr>"),
        ("Contact", "<sip:1002@127.0.0.1:6060>"),
    ];
    let ok = reply(&inv2, 200, &rr, Some(SDP));
    c.handle_response(t0, Purpose::Invite, &ok);
    assert!(matches!(
        events(&mut c).as_slice(),
        [CallEvent::Ringing, CallEvent::Answered { answer: Some(_) }]
    ));
    let out = outputs(&mut c);
    let (ack, dest) = sent(&out[0]);
    assert_eq!(
        dest,
        "127.0.0.1:5060".parse::<std::net::SocketAddr>().unwrap(),
        "first hop of the reversed Record-Route"
    );
    assert_eq!(ack.method(), "ACK");
    assert_eq!(ack.cseq(), Some((2, "ACK")));
    assert_eq!(ack.to_tag(), Some("far"));
    assert_eq!(
        ack.headers("Route").collect::<Vec<_>>(),
        vec!["<sip:127.0.0.1:5060;lr>", "<sip:10.9.9.9;lr>"]
    );
    assert!(
        matches!(ack.start_line(), StartLine::Request { uri, .. } if uri == "sip:1002@127.0.0.1:6060")
    );
    // A retransmitted 200 is ACKed again.
    c.handle_stray_2xx(&ok);
    assert_eq!(sent(&outputs(&mut c)[0]).0.method(), "ACK");
    c.hangup(t0);
    let (p, bye, _) = request_of(&outputs(&mut c)[0]);
    assert_eq!(p, Purpose::Bye);
    assert_eq!(bye.cseq(), Some((3, "BYE")));
    assert_eq!(bye.to_tag(), Some("far"));
    assert!(matches!(
        events(&mut c).as_slice(),
        [CallEvent::Ended {
            reason: EndReason::LocalHangup,
            ..
        }]
    ));
    assert!(!c.is_finished(), "BYE in flight");
    c.handle_response(t0, Purpose::Bye, &reply(&bye, 200, &[], None));
    assert!(c.is_finished());
}

#[test]
fn outbound_failures_carry_status() {
    let t0 = Instant::now();
    let mut c = outgoing_to_1002();
    let (_, inv, _) = request_of(&outputs(&mut c)[0]);
    let busy = response_to(&inv, 486, "Busy Here", Some("x"))
        .into_message()
        .unwrap();
    c.handle_response(t0, Purpose::Invite, &busy);
    assert_eq!(
        events(&mut c),
        vec![CallEvent::Ended {
            reason: EndReason::Failed,
            status: Some(486),
            phrase: "Busy Here".into()
        }]
    );
    assert!(c.is_finished());
    let mut c = outgoing_to_1002();
    let _ = outputs(&mut c);
    c.handle_tx_timeout(Purpose::Invite);
    assert!(matches!(
        events(&mut c).as_slice(),
        [CallEvent::Ended {
            status: Some(408),
            ..
        }]
    ));
}

#[test]
fn cancel_waits_for_a_provisional() {
    let t0 = Instant::now();
    let mut c = outgoing_to_1002();
    let (_, inv, _) = request_of(&outputs(&mut c)[0]);
    c.hangup(t0);
    assert!(
        outputs(&mut c).is_empty(),
        "§9.1: no CANCEL before a provisional"
    );
    c.handle_response(t0, Purpose::Invite, &reply(&inv, 100, &[], None));
    let (p, cancel, _) = request_of(&outputs(&mut c)[0]);
    assert_eq!(p, Purpose::Cancel);
    assert_eq!(
        cancel.top_via().unwrap().branch,
        inv.top_via().unwrap().branch
    );
    assert_eq!(cancel.cseq(), Some((1, "CANCEL")));
    assert_eq!(cancel.to_tag(), None);
    c.handle_response(t0, Purpose::Cancel, &reply(&cancel, 200, &[], None));
    c.handle_response(t0, Purpose::Invite, &reply(&inv, 487, &[], None));
    assert!(matches!(
        events(&mut c).as_slice(),
        [CallEvent::Ended {
            reason: EndReason::Cancelled,
            status: Some(487),
            ..
        }]
    ));
    assert!(c.is_finished());
}

#[test]
fn answer_crossing_cancel_is_acked_and_byed() {
    let t0 = Instant::now();
    let mut c = outgoing_to_1002();
    let (_, inv, _) = request_of(&outputs(&mut c)[0]);
    c.handle_response(t0, Purpose::Invite, &reply(&inv, 180, &[], None));
    c.hangup(t0);
    let _cancel = outputs(&mut c);
    c.handle_response(
        t0,
        Purpose::Invite,
        &reply(
            &inv,
            200,
            &[("Contact", "<sip:1002@127.0.0.1:6060>")],
            Some(SDP),
        ),
    );
    let out = outputs(&mut c);
    assert_eq!(sent(&out[0]).0.method(), "ACK");
    assert_eq!(request_of(&out[1]).0, Purpose::Bye);
    assert!(events(&mut c).iter().any(|e| matches!(
        e,
        CallEvent::Ended {
            reason: EndReason::Cancelled,
            ..
        }
    )));
}

fn incoming(body: &str) -> (Call, Message) {
    let inv = Builder::request("INVITE", "sip:1001-abc@127.0.0.1:5070")
        .header(
            "Via",
            "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKkam;rport=5060",
        )
        .header("Record-Route", "<sip:127.0.0.1:5060;lr>")
        .header("From", "\"Bob B\" <sip:1002@example.com>;tag=bob")
        .header("To", "<sip:1001@example.com>")
        .header("Call-ID", "in-1")
        .header("CSeq", "7 INVITE")
        .header("Contact", "<sip:1002@127.0.0.1:6060>")
        .header(
            "P-Asserted-Identity",
            "\"Bob Verified\" <sip:+15551234@example.com>",
        )
        .body("application/sdp", body.as_bytes().to_vec())
        .into_message()
        .unwrap();
    let mut layer = TransactionLayer::new(Timers::default(), 1);
    layer.handle_message(
        Instant::now(),
        inv.clone(),
        "127.0.0.1:5060".parse().unwrap(),
    );
    let tx: TxId = match layer.poll_event() {
        Some(crate::sip::transaction::Event::Request { id, .. }) => id,
        other => panic!("{other:?}"),
    };
    let c = Call::incoming(
        local(),
        account(),
        inv.clone(),
        tx,
        "127.0.0.1:5060".parse().unwrap(),
        Timers::default(),
        9,
    );
    (c, inv)
}

fn responded(o: &Output) -> Message {
    match o {
        Output::Respond { data, .. } => Message::parse(data).unwrap(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn inbound_ring_answer_retransmit_ack_remote_bye() {
    let t0 = Instant::now();
    let (mut c, inv) = incoming(SDP);
    let r180 = responded(&outputs(&mut c)[0]);
    assert_eq!(r180.status(), Some(180));
    assert!(r180.to_tag().is_some());
    assert_eq!(r180.header("Record-Route"), Some("<sip:127.0.0.1:5060;lr>"));
    match events(&mut c).as_slice() {
        [
            CallEvent::Incoming {
                from,
                asserted,
                offer,
                headers,
            },
        ] => {
            assert!(
                headers
                    .iter()
                    .any(|(n, _)| n.eq_ignore_ascii_case("Call-ID")),
                "{headers:?}"
            );
            assert_eq!(from.display.as_deref(), Some("Bob B"));
            assert_eq!(from.user(), "1002");
            assert_eq!(asserted.as_ref().map(|p| p.user()), Some("+15551234"));
            assert!(offer.is_some());
        }
        other => panic!("{other:?}"),
    }
    c.answer(t0, SDP.into());
    let ok = responded(&outputs(&mut c)[0]);
    assert_eq!(ok.status(), Some(200));
    assert_eq!(ok.body(), SDP.as_bytes());
    assert_eq!(ok.to_tag(), r180.to_tag(), "one dialog, one tag");
    let t1 = Duration::from_millis(500);
    assert_eq!(c.poll_timeout(), Some(t0 + t1));
    c.handle_timeout(t0 + t1);
    c.handle_timeout(t0 + t1 * 3);
    let resent: Vec<_> = outputs(&mut c).iter().map(|o| sent(o).0.status()).collect();
    assert_eq!(resent, vec![Some(200), Some(200)]);
    c.handle_ack();
    assert_eq!(c.poll_timeout(), None);
    assert_eq!(events(&mut c), vec![CallEvent::Confirmed]);
    let bye = Builder::request("BYE", "sip:1001-abc@127.0.0.1:5070")
        .header("Via", "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKbye")
        .header("From", inv.header("From").unwrap())
        .header(
            "To",
            format!("<sip:1001@example.com>;tag={}", c.local_tag()),
        )
        .header("Call-ID", "in-1")
        .header("CSeq", "8 BYE")
        .into_message()
        .unwrap();
    c.handle_request(Instant::now(), TxId_for_test(), &bye);
    assert_eq!(responded(&outputs(&mut c)[0]).status(), Some(200));
    assert!(matches!(
        events(&mut c).as_slice(),
        [CallEvent::Ended {
            reason: EndReason::RemoteHangup,
            ..
        }]
    ));
    assert!(c.is_finished());
}

#[allow(non_snake_case)]
fn TxId_for_test() -> TxId {
    let mut layer = TransactionLayer::new(Timers::default(), 1);
    let req = Builder::request("INFO", "sip:x@127.0.0.1")
        .header("Via", "SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKt")
        .header("From", "<sip:a@b>;tag=1")
        .header("To", "<sip:a@b>")
        .header("Call-ID", "t")
        .header("CSeq", "1 INFO")
        .build();
    layer
        .handle_datagram(Instant::now(), &req, "127.0.0.1:9".parse().unwrap())
        .unwrap();
    match layer.poll_event() {
        Some(crate::sip::transaction::Event::Request { id, .. }) => id,
        other => panic!("{other:?}"),
    }
}

#[test]
fn inbound_without_ack_ends_with_bye() {
    let t0 = Instant::now();
    let (mut c, _) = incoming(SDP);
    let _ = (outputs(&mut c), events(&mut c));
    c.answer(t0, SDP.into());
    let _ = outputs(&mut c);
    let mut now = t0;
    for _ in 0..100 {
        match c.poll_timeout() {
            Some(t) => {
                now = t;
                c.handle_timeout(now);
            }
            None => break,
        }
    }
    assert_eq!(now - t0, Duration::from_secs(32));
    let out = outputs(&mut c);
    let (p, bye, _) = request_of(out.last().unwrap());
    assert_eq!((p, bye.method()), (Purpose::Bye, "BYE"));
    assert_eq!(
        bye.header("Route"),
        Some("<sip:127.0.0.1:5060;lr>"),
        "UAS route set: Record-Route in order"
    );
    assert!(matches!(
        events(&mut c).as_slice(),
        [CallEvent::Ended {
            reason: EndReason::Timeout,
            ..
        }]
    ));
}

#[test]
fn inbound_cancel_is_missed_and_reject_is_rejected() {
    let (mut c, inv) = incoming(SDP);
    let _ = (outputs(&mut c), events(&mut c));
    let cancel = Builder::request("CANCEL", "sip:1001-abc@127.0.0.1:5070")
        .header("Via", inv.header("Via").unwrap())
        .header("From", inv.header("From").unwrap())
        .header("To", inv.header("To").unwrap())
        .header("Call-ID", "in-1")
        .header("CSeq", "7 CANCEL")
        .into_message()
        .unwrap();
    c.handle_request(Instant::now(), TxId_for_test(), &cancel);
    let codes: Vec<_> = outputs(&mut c)
        .iter()
        .map(|o| responded(o).status())
        .collect();
    assert_eq!(codes, vec![Some(200), Some(487)]);
    assert!(matches!(
        events(&mut c).as_slice(),
        [CallEvent::Ended {
            reason: EndReason::Missed,
            ..
        }]
    ));

    let (mut c, _) = incoming(SDP);
    let _ = (outputs(&mut c), events(&mut c));
    c.reject(486, "Busy Here");
    assert_eq!(responded(&outputs(&mut c)[0]).status(), Some(486));
    assert!(matches!(
        events(&mut c).as_slice(),
        [CallEvent::Ended {
            reason: EndReason::Rejected,
            status: Some(486),
            ..
        }]
    ));
}

#[test]
fn unusable_offer_is_refused_with_488() {
    let (mut c, _) = incoming("v=0\r\nm=video 1 RTP/AVP 96\r\n");
    assert_eq!(responded(&outputs(&mut c)[0]).status(), Some(488));
    assert!(c.is_ended());
}

#[test]
fn dial_strings() {
    assert_eq!(
        dial_uri("1002", "example.com"),
        Ok("sip:1002@example.com".into())
    );
    assert_eq!(
        dial_uri("+49 (30) 123-45", "example.com"),
        Ok("sip:+493012345@example.com;user=phone".into())
    );
    assert_eq!(
        dial_uri("sip:bob@other.example:5080;transport=udp", "x"),
        Ok("sip:bob@other.example:5080".into())
    );
    assert_eq!(
        dial_uri("bob@other.example", "x"),
        Ok("sip:bob@other.example".into())
    );
    for bad in [
        "",
        "a b\r\nVia: x",
        "sip:nohost",
        "<sip:a@b>",
        "+12ab",
        "+1234567890123456",
    ] {
        assert!(dial_uri(bad, "example.com").is_err(), "{bad:?}");
    }
}

/// An established outbound call (ACK sent), for the hold tests.
fn established() -> (Call, Message) {
    let t0 = Instant::now();
    let mut c = outgoing_to_1002();
    let (_, inv, _) = request_of(&outputs(&mut c)[0]);
    let ok = reply(
        &inv,
        200,
        &[("Contact", "<sip:1002@127.0.0.1:6060>")],
        Some(SDP),
    );
    c.handle_response(t0, Purpose::Invite, &ok);
    let _ = (outputs(&mut c), events(&mut c));
    (c, ok)
}

#[test]
fn media_timeout_hangs_up_with_its_reason() {
    let (mut c, _) = established();
    c.hangup_because(Instant::now(), EndReason::MediaTimeout);
    let (p, bye, _) = request_of(&outputs(&mut c)[0]);
    assert_eq!((p, bye.method()), (Purpose::Bye, "BYE"));
    match events(&mut c).as_slice() {
        [CallEvent::Ended { reason, .. }] => assert_eq!(reason.code(), "media_timeout"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn local_hold_and_resume() {
    let t0 = Instant::now();
    let (mut c, _) = established();
    c.hold(t0);
    let (p, re, dest) = request_of(&outputs(&mut c)[0]);
    assert_eq!(
        (p, dest),
        (Purpose::Reinvite, "127.0.0.1:6060".parse().unwrap())
    );
    assert_eq!(re.cseq(), Some((2, "INVITE")));
    assert_eq!(re.to_tag(), Some("far"));
    let offer = AudioSdp::parse(re.body()).unwrap();
    assert_eq!(offer.direction, crate::sip::sdp::Direction::SendOnly);
    assert_eq!(offer.version, 2, "o= version bumped");
    c.hold(t0);
    assert!(outputs(&mut c).is_empty(), "one re-INVITE at a time");
    let answer = SDP.replace("a=rtpmap:101", "a=recvonly\r\na=rtpmap:101");
    let ok = reply(&re, 200, &[], Some(&answer));
    c.handle_response(t0, Purpose::Reinvite, &ok);
    let (ack, _) = sent(&outputs(&mut c)[0]);
    assert_eq!(ack.cseq(), Some((2, "ACK")));
    assert!(matches!(
        events(&mut c).as_slice(),
        [CallEvent::Hold {
            held: true,
            answer: Some(_)
        }]
    ));
    c.handle_response(t0, Purpose::Reinvite, &ok);
    assert_eq!(
        sent(&outputs(&mut c)[0]).0.method(),
        "ACK",
        "retransmitted 2xx re-ACKed"
    );
    c.unhold(t0);
    let (_, re2, _) = request_of(&outputs(&mut c)[0]);
    assert_eq!(
        AudioSdp::parse(re2.body()).unwrap().direction,
        crate::sip::sdp::Direction::SendRecv
    );
    assert_eq!(re2.cseq(), Some((3, "INVITE")));
}

#[test]
fn glare_retries_after_the_rfc_delay() {
    let t0 = Instant::now();
    let (mut c, _) = established();
    c.hold(t0);
    let (_, re, _) = request_of(&outputs(&mut c)[0]);
    let pending = response_to(&re, 491, "Request Pending", Some("far"))
        .into_message()
        .unwrap();
    c.handle_response(t0, Purpose::Reinvite, &pending);
    let at = c.poll_timeout().expect("a retry");
    let wait = at - t0;
    assert!(
        wait >= Duration::from_millis(2100) && wait <= Duration::from_secs(4),
        "{wait:?}"
    );
    c.handle_timeout(at);
    let (p, again, _) = request_of(&outputs(&mut c)[0]);
    assert_eq!(p, Purpose::Reinvite);
    assert_eq!(again.cseq(), Some((3, "INVITE")));
}

#[test]
fn remote_hold_is_answered_recvonly_and_reported() {
    let t0 = Instant::now();
    let (mut c, ok) = established();
    let hold_offer = SDP.replace("a=rtpmap:101", "a=sendonly\r\na=rtpmap:101");
    let re = from_far_end(&c, &ok, "INVITE", 10)
        .body("application/sdp", hold_offer.into_bytes())
        .into_message()
        .unwrap();
    c.handle_request(t0, TxId_for_test(), &re);
    let resp = responded(&outputs(&mut c)[0]);
    assert_eq!(resp.status(), Some(200));
    assert_eq!(
        AudioSdp::parse(resp.body()).unwrap().direction,
        crate::sip::sdp::Direction::RecvOnly
    );
    assert!(matches!(
        events(&mut c).as_slice(),
        [CallEvent::RemoteHold {
            held: true,
            offer: Some(_)
        }]
    ));
    // While that 200 waits for its ACK, our own hold must wait, and a crossing re-INVITE gets 491.
    c.hold(t0);
    assert!(outputs(&mut c).is_empty());
    c.handle_request(t0, TxId_for_test(), &re);
    assert_eq!(responded(&outputs(&mut c)[0]).status(), Some(491));
    c.handle_ack();
    assert_eq!(c.poll_timeout(), None);
}

#[test]
fn dtmf_info_in_order_one_at_a_time() {
    let t0 = Instant::now();
    let (mut c, _) = established();
    assert!(!c.send_dtmf_info("12x"));
    assert!(c.send_dtmf_info("1#"));
    let out = outputs(&mut c);
    assert_eq!(out.len(), 1, "one INFO in flight");
    let (p, info, _) = request_of(&out[0]);
    assert_eq!(p, Purpose::Info);
    assert_eq!(info.header("Content-Type"), Some("application/dtmf-relay"));
    assert_eq!(info.body(), b"Signal=1\r\nDuration=160\r\n");
    c.handle_response(t0, Purpose::Info, &reply(&info, 200, &[], None));
    let (_, info2, _) = request_of(&outputs(&mut c)[0]);
    assert_eq!(info2.body(), b"Signal=#\r\nDuration=160\r\n");
    assert!(info2.cseq().unwrap().0 > info.cseq().unwrap().0);
}

#[test]
fn dtmf_info_received() {
    let t0 = Instant::now();
    let (mut c, ok) = established();
    for (ct, body, want) in [
        (
            "application/dtmf-relay",
            "Signal=7\r\nDuration=250\r\n",
            Some(('7', Some(250))),
        ),
        (
            "application/dtmf-relay",
            "Signal= 11\r\n",
            Some(('#', None)),
        ),
        ("application/dtmf", "*", Some(('*', None))),
        ("application/dtmf-relay", "Signal=Z\r\n", None),
        ("text/plain", "5", None),
    ] {
        let info = from_far_end(&c, &ok, "INFO", 20)
            .body(ct, body.as_bytes().to_vec())
            .into_message()
            .unwrap();
        c.handle_request(t0, TxId_for_test(), &info);
        assert_eq!(responded(&outputs(&mut c)[0]).status(), Some(200));
        let got = events(&mut c).into_iter().find_map(|e| match e {
            CallEvent::Dtmf { digit, duration_ms } => Some((digit, duration_ms)),
            _ => None,
        });
        assert_eq!(got, want, "{ct} {body:?}");
    }
}

/// A request from the far end of an established call (`ok` is the 200 that established it).
fn from_far_end(c: &Call, ok: &Message, method: &str, cseq: u32) -> Builder {
    Builder::request(method, "sip:1001-abc@127.0.0.1:5070")
        .header(
            "Via",
            format!("SIP/2.0/UDP 127.0.0.1:6060;branch=z9hG4bK{method}{cseq}"),
        )
        .header("From", ok.header("To").unwrap())
        .header(
            "To",
            format!("<sip:1001@example.com>;tag={}", c.local_tag()),
        )
        .header("Call-ID", c.call_id().to_owned())
        .header("CSeq", format!("{cseq} {method}"))
}

fn notify(c: &Call, ok: &Message, cseq: u32, state: &str, frag: &str) -> Message {
    from_far_end(c, ok, "NOTIFY", cseq)
        .header("Event", "refer")
        .header("Subscription-State", state)
        .body("message/sipfrag;version=2.0", frag.as_bytes().to_vec())
        .into_message()
        .unwrap()
}

#[test]
fn blind_transfer_success_ends_our_leg() {
    let t0 = Instant::now();
    let (mut c, ok) = established();
    assert!(!c.transfer("1003"), "a SIP URI is required at this level");
    assert!(c.transfer("sip:1003@example.com"));
    assert!(
        !c.transfer("sip:1004@example.com"),
        "one transfer at a time"
    );
    let (p, refer, _) = request_of(&outputs(&mut c)[0]);
    assert_eq!(p, Purpose::Refer);
    assert_eq!(refer.header("Refer-To"), Some("<sip:1003@example.com>"));
    assert_eq!(refer.header("Referred-By"), Some("<sip:1001@example.com>"));
    c.handle_response(t0, Purpose::Refer, &reply(&refer, 202, &[], None));
    c.handle_request(
        t0,
        TxId_for_test(),
        &notify(&c, &ok, 1, "active;expires=60", "SIP/2.0 100 Trying\r\n"),
    );
    c.handle_request(
        t0,
        TxId_for_test(),
        &notify(
            &c,
            &ok,
            2,
            "terminated;reason=noresource",
            "SIP/2.0 200 OK\r\n",
        ),
    );
    let out = outputs(&mut c);
    assert_eq!(responded(&out[0]).status(), Some(200));
    assert_eq!(request_of(out.last().unwrap()).1.method(), "BYE");
    assert_eq!(
        events(&mut c),
        vec![
            CallEvent::Transfer {
                state: TransferState::Accepted,
                status: Some(202)
            },
            CallEvent::Transfer {
                state: TransferState::Progress,
                status: Some(100)
            },
            CallEvent::Transfer {
                state: TransferState::Succeeded,
                status: Some(200)
            },
            CallEvent::Ended {
                reason: EndReason::Transferred,
                status: Some(200),
                phrase: String::new()
            },
        ]
    );
}

#[test]
fn failed_transfer_keeps_the_call() {
    let t0 = Instant::now();
    let (mut c, ok) = established();
    assert!(c.transfer("sip:1003@example.com"));
    let (_, refer, _) = request_of(&outputs(&mut c)[0]);
    c.handle_response(t0, Purpose::Refer, &reply(&refer, 202, &[], None));
    c.handle_request(
        t0,
        TxId_for_test(),
        &notify(&c, &ok, 1, "terminated", "SIP/2.0 486 Busy Here\r\n"),
    );
    let _ = outputs(&mut c);
    let evs = events(&mut c);
    assert_eq!(
        evs.last(),
        Some(&CallEvent::Transfer {
            state: TransferState::Failed,
            status: Some(486)
        })
    );
    assert!(!c.is_ended());
    assert!(
        c.transfer("sip:1004@example.com"),
        "another attempt is allowed"
    );
    // A refused REFER.
    let (_, refer, _) = request_of(&outputs(&mut c)[0]);
    c.handle_response(t0, Purpose::Refer, &reply(&refer, 603, &[], None));
    assert_eq!(
        events(&mut c).last(),
        Some(&CallEvent::Transfer {
            state: TransferState::Failed,
            status: Some(603)
        })
    );
}

#[test]
fn attended_transfer_refer_names_the_consult_dialog() {
    let t0 = Instant::now();
    let (mut a, _) = established();
    // The consultation call B: our tag, their tag "far", Call-ID with an '@' that must be escaped.
    let (b, _) = established();
    let uri = b.replaces_uri().expect("B is up");
    let expected = format!(
        "sip:1002@example.com?Replaces={}%3Bto-tag%3Dfar%3Bfrom-tag%3D{}",
        b.call_id().replace('@', "%40"),
        b.local_tag()
    );
    assert_eq!(uri, expected);
    assert!(a.transfer(&uri));
    let (_, refer, _) = request_of(&outputs(&mut a)[0]);
    assert_eq!(
        refer.header("Refer-To"),
        Some(format!("<{expected}>").as_str())
    );
    let _ = t0;
    // Not up: no Replaces.
    let c = Call::outgoing(
        local(),
        account(),
        "sip:1003@example.com".into(),
        SDP.into(),
        Timers::default(),
        7,
    );
    assert_eq!(c.replaces_uri(), None);
}

fn incoming_with(extra: &[(&str, &str)]) -> Call {
    let mut b = Builder::request("INVITE", "sip:1001-abc@127.0.0.1:5070")
        .header(
            "Via",
            "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKst;rport=5060",
        )
        .header("From", "<sip:1002@example.com>;tag=bob")
        .header("To", "<sip:1001@example.com>")
        .header("Call-ID", "st-1")
        .header("CSeq", "1 INVITE")
        .header("Contact", "<sip:1002@127.0.0.1:6060>");
    for (k, v) in extra {
        b = b.header(k, *v);
    }
    let inv = b
        .body("application/sdp", SDP.as_bytes().to_vec())
        .into_message()
        .unwrap();
    Call::incoming(
        local(),
        account(),
        inv,
        TxId_for_test(),
        "127.0.0.1:5060".parse().unwrap(),
        Timers::default(),
        3,
    )
}

#[test]
fn session_timer_peer_refreshes_or_we_hang_up() {
    let t0 = Instant::now();
    let mut c = incoming_with(&[
        ("Session-Expires", "120;refresher=uac"),
        ("Supported", "timer"),
    ]);
    let _ = (outputs(&mut c), events(&mut c));
    c.answer(t0, SDP.into());
    let ok = responded(&outputs(&mut c)[0]);
    assert_eq!(ok.header("Session-Expires"), Some("120;refresher=uac"));
    assert_eq!(ok.header("Require"), Some("timer"));
    c.handle_ack();
    let _ = events(&mut c);
    // The caller refreshes at 60 s with an UPDATE: the deadline moves to 60 + 120 - 32 = 148 s.
    let update = Builder::request("UPDATE", "sip:1001-abc@127.0.0.1:5070")
        .header("Via", "SIP/2.0/UDP 127.0.0.1:6060;branch=z9hG4bKupd")
        .header("From", "<sip:1002@example.com>;tag=bob")
        .header(
            "To",
            format!("<sip:1001@example.com>;tag={}", c.local_tag()),
        )
        .header("Call-ID", "st-1")
        .header("CSeq", "2 UPDATE")
        .header("Session-Expires", "120;refresher=uac")
        .into_message()
        .unwrap();
    c.handle_request(t0 + Duration::from_secs(60), TxId_for_test(), &update);
    assert_eq!(responded(&outputs(&mut c)[0]).status(), Some(200));
    assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(148)));
    c.handle_timeout(t0 + Duration::from_secs(148));
    let (p, bye, _) = request_of(&outputs(&mut c)[0]);
    assert_eq!((p, bye.method()), (Purpose::Bye, "BYE"));
    assert_eq!(
        events(&mut c),
        vec![CallEvent::Ended {
            reason: EndReason::Timeout,
            status: Some(408),
            phrase: "session timer expired".into()
        }]
    );
}

#[test]
fn session_interval_below_min_se_gets_422() {
    let mut c = incoming_with(&[("Session-Expires", "30")]);
    let r = responded(&outputs(&mut c)[0]);
    assert_eq!(r.status(), Some(422));
    assert_eq!(r.header("Min-SE"), Some("90"));
    assert!(c.is_ended());
}

#[test]
fn we_refresh_when_the_answer_says_so() {
    let t0 = Instant::now();
    let mut c = outgoing_to_1002();
    let (_, inv, _) = request_of(&outputs(&mut c)[0]);
    assert_eq!(inv.header("Supported"), Some("timer"));
    let ok = reply(
        &inv,
        200,
        &[
            ("Contact", "<sip:1002@127.0.0.1:6060>"),
            ("Session-Expires", "100;refresher=uac"),
        ],
        Some(SDP),
    );
    c.handle_response(t0, Purpose::Invite, &ok);
    let _ = (outputs(&mut c), events(&mut c));
    assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(50)));
    c.handle_timeout(t0 + Duration::from_secs(50));
    let (p, re, _) = request_of(&outputs(&mut c)[0]);
    assert_eq!(p, Purpose::Reinvite);
    assert_eq!(re.header("Session-Expires"), Some("100;refresher=uac"));
    assert_eq!(
        re.body(),
        SDP.as_bytes(),
        "a refresh re-offers the same SDP"
    );
    c.handle_response(
        t0 + Duration::from_secs(50),
        Purpose::Reinvite,
        &reply(&re, 200, &[], Some(SDP)),
    );
    assert_eq!(sent(&outputs(&mut c)[0]).0.method(), "ACK");
    assert!(events(&mut c).is_empty(), "refreshes are silent");
    assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(100)));
}

#[test]
fn early_media_then_answer() {
    let t0 = Instant::now();
    let mut c = Call::outgoing(
        local(),
        account(),
        "sip:+4930123@example.com;user=phone".into(),
        SDP.into(),
        Timers::default(),
        5,
    );
    let (_, inv, _) = request_of(&outputs(&mut c)[0]);
    c.handle_response(t0, Purpose::Invite, &reply(&inv, 183, &[], Some(SDP)));
    c.handle_response(t0, Purpose::Invite, &reply(&inv, 183, &[], Some(SDP)));
    c.handle_response(
        t0,
        Purpose::Invite,
        &reply(&inv, 200, &[("Contact", "<sip:gw@127.0.0.1:6060>")], None),
    );
    let evs = events(&mut c);
    assert!(
        matches!(
            evs.as_slice(),
            [
                CallEvent::EarlyMedia { .. },
                CallEvent::Answered { answer: None }
            ]
        ),
        "{evs:?}"
    );
}

fn refer_from_far_end(c: &Call, ok: &Message, cseq: u32, refer_to: &str) -> Message {
    from_far_end(c, ok, "REFER", cseq)
        .header("Refer-To", refer_to)
        .header("Referred-By", "<sip:1002@example.com>")
        .into_message()
        .unwrap()
}

#[test]
fn inbound_refer_declined_keeps_the_call() {
    let t0 = Instant::now();
    let (mut c, ok) = established();
    c.handle_request(
        t0,
        TxId_for_test(),
        &refer_from_far_end(&c, &ok, 30, "<sip:1003@example.com>"),
    );
    assert!(outputs(&mut c).is_empty(), "the owner decides");
    assert_eq!(
        events(&mut c),
        vec![CallEvent::Referred {
            target: "sip:1003@example.com".into()
        }]
    );
    // A second REFER meanwhile: one transfer at a time.
    c.handle_request(
        t0,
        TxId_for_test(),
        &refer_from_far_end(&c, &ok, 31, "<sip:1004@example.com>"),
    );
    assert_eq!(responded(&outputs(&mut c)[0]).status(), Some(491));
    c.decline_refer();
    assert_eq!(responded(&outputs(&mut c)[0]).status(), Some(603));
    assert!(!c.is_ended());
    assert_eq!(c.accept_refer(), None, "nothing left to accept");
}

#[test]
fn inbound_refer_bad_or_missing_target_is_400() {
    let t0 = Instant::now();
    let (mut c, ok) = established();
    for bad in ["<tel:+4930123>", "<sip:>", "<sips:1003@example.com>"] {
        c.handle_request(t0, TxId_for_test(), &refer_from_far_end(&c, &ok, 40, bad));
        assert_eq!(responded(&outputs(&mut c)[0]).status(), Some(400), "{bad}");
    }
    let no_refer_to = from_far_end(&c, &ok, "REFER", 41).into_message().unwrap();
    c.handle_request(t0, TxId_for_test(), &no_refer_to);
    assert_eq!(responded(&outputs(&mut c)[0]).status(), Some(400));
    assert!(events(&mut c).is_empty());
}

#[test]
fn inbound_refer_followed_notifies_then_hangs_up_if_the_referrer_does_not() {
    let t0 = Instant::now();
    let (mut c, ok) = established();
    c.handle_request(
        t0,
        TxId_for_test(),
        &refer_from_far_end(
            &c,
            &ok,
            30,
            "<sip:1003@example.com?Replaces=abc%40host%3Bto-tag%3D7%3Bfrom-tag%3D9>",
        ),
    );
    let _ = events(&mut c);
    let r = c.accept_refer().unwrap();
    assert_eq!(
        r,
        Referral {
            target: "sip:1003@example.com".into(),
            replaces: Some("abc@host;to-tag=7;from-tag=9".into()),
            referred_by: "<sip:1002@example.com>".into(),
        }
    );
    let out = outputs(&mut c);
    assert_eq!(responded(&out[0]).status(), Some(202));
    let (p, n, dest) = request_of(&out[1]);
    assert_eq!(p, Purpose::Notify);
    assert_eq!(dest.to_string(), "127.0.0.1:6060", "to the remote target");
    assert_eq!(n.header("Event"), Some("refer"));
    assert_eq!(n.header("Subscription-State"), Some("active;expires=60"));
    assert_eq!(n.body(), b"SIP/2.0 100 Trying\r\n");
    c.refer_progress(t0, 180, "Ringing");
    let (_, n, _) = request_of(&outputs(&mut c)[0]);
    assert_eq!(n.body(), b"SIP/2.0 180 Ringing\r\n");
    c.refer_progress(t0, 200, "OK");
    let (_, n, _) = request_of(&outputs(&mut c)[0]);
    assert_eq!(
        n.header("Subscription-State"),
        Some("terminated;reason=noresource")
    );
    assert_eq!(n.body(), b"SIP/2.0 200 OK\r\n");
    c.refer_progress(t0, 200, "OK");
    assert!(outputs(&mut c).is_empty(), "the subscription is over");
    // The referrer should BYE us now; if it does not, we do.
    let at = c.poll_timeout().unwrap();
    assert!(at > t0 && at <= t0 + Duration::from_secs(5), "{at:?}");
    c.handle_timeout(at);
    assert_eq!(request_of(&outputs(&mut c)[0]).1.method(), "BYE");
    assert!(c.is_ended());
}

#[test]
fn the_referrers_bye_ends_a_followed_transfer_quietly() {
    let t0 = Instant::now();
    let (mut c, ok) = established();
    c.handle_request(
        t0,
        TxId_for_test(),
        &refer_from_far_end(&c, &ok, 30, "sip:1003@example.com"),
    );
    assert!(c.accept_refer().is_some());
    c.refer_progress(t0, 200, "OK");
    let _ = (outputs(&mut c), events(&mut c));
    let bye = from_far_end(&c, &ok, "BYE", 31).into_message().unwrap();
    c.handle_request(t0, TxId_for_test(), &bye);
    assert_eq!(responded(&outputs(&mut c)[0]).status(), Some(200));
    assert_eq!(c.poll_timeout(), None, "no BYE of our own pending");
    // A REFER still undecided when the dialog ends gets its final answer.
    let (mut c, ok) = established();
    c.handle_request(
        t0,
        TxId_for_test(),
        &refer_from_far_end(&c, &ok, 30, "sip:1003@example.com"),
    );
    let bye = from_far_end(&c, &ok, "BYE", 31).into_message().unwrap();
    c.handle_request(t0, TxId_for_test(), &bye);
    let codes: Vec<_> = outputs(&mut c)
        .iter()
        .map(|o| responded(o).status())
        .collect();
    assert_eq!(codes, vec![Some(200), Some(481)]);
}

#[test]
fn referred_call_carries_referred_by_and_replaces() {
    let referral = Referral {
        target: "sip:1003@example.com".into(),
        replaces: Some("abc@host;to-tag=7;from-tag=9".into()),
        referred_by: "<sip:1002@example.com>".into(),
    };
    let (mut old, _) = established();
    let sdp = old.offer_for_new_dialog().unwrap();
    assert!(sdp.contains("a=sendrecv"), "{sdp}");
    let mut c = Call::referred(
        local(),
        account(),
        &referral,
        sdp,
        crate::sip::transaction::Timers::default(),
        5,
    );
    let (_, inv, _) = request_of(&outputs(&mut c)[0]);
    assert!(
        matches!(inv.start_line(), StartLine::Request { uri, .. } if uri == "sip:1003@example.com")
    );
    assert_eq!(inv.header("Referred-By"), Some("<sip:1002@example.com>"));
    assert_eq!(inv.header("Replaces"), Some("abc@host;to-tag=7;from-tag=9"));
    assert_eq!(inv.header("Require"), Some("replaces"));
    assert_eq!(c.remote_party().uri, "sip:1003@example.com");
    let _ = outputs(&mut old);
}
