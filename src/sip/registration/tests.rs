use std::time::{Duration, Instant};

use super::*;
use crate::account::account_from_cli;
use crate::sip::digest::{Answer, Challenge, ChallengeKind};
use crate::sip::message::{Message, response_to};

fn settings() -> Settings {
    Settings {
        expires: Duration::from_secs(600),
        retry_min: Duration::from_secs(5),
        retry_max: Duration::from_secs(60),
        keepalive: Some(Duration::from_secs(30)),
        user_agent: "callgate-test".into(),
    }
}

fn reg() -> Registration {
    let account = account_from_cli(
        "1001",
        None,
        "pass1001".into(),
        "example.com",
        None,
        None,
        Some("Alice"),
    )
    .unwrap();
    let binding = Binding {
        via_host: "127.0.0.1:5070".into(),
        contact_user: "1001-abc".into(),
        call_id: "reg-call".into(),
        from_tag: "ft".into(),
        fixed_public_address: false,
    };
    Registration::new(account, settings(), binding, 42)
}

fn sent(r: &mut Registration) -> Message {
    let out = r.poll_request().expect("a request");
    assert!(r.poll_request().is_none(), "one request at a time");
    Message::parse(&out.data).unwrap()
}

fn challenge(req: &Message, nonce: &str, stale: bool) -> Message {
    response_to(req, 401, "Unauthorized", Some("rt"))
        .header(
            "WWW-Authenticate",
            format!(
                "Digest realm=\"example.com\", nonce=\"{nonce}\", qop=\"auth\", algorithm=MD5{}",
                if stale { ", stale=true" } else { "" }
            ),
        )
        .into_message()
        .unwrap()
}

fn ok(req: &Message, extra: &[(&str, &str)]) -> Message {
    let mut b = response_to(req, 200, "OK", Some("rt"));
    for (k, v) in extra {
        b = b.header(k, *v);
    }
    b.into_message().unwrap()
}

/// The registrar's check: the Authorization is right for password `pw`.
fn auth_ok(req: &Message, pw: &str) -> bool {
    let Some(h) = req.header("Authorization") else {
        return false;
    };
    let get = |k: &str| {
        h.split(", ")
            .find_map(|p| {
                p.strip_prefix(&format!("{k}="))
                    .map(|v| v.trim_matches('"').to_owned())
            })
            .unwrap_or_default()
    };
    let ch = Challenge::parse(
        ChallengeKind::Www,
        &format!(
            "Digest realm=\"{}\", nonce=\"{}\", qop=\"auth\"",
            get("realm"),
            get("nonce")
        ),
    )
    .unwrap();
    let pw = crate::secret::SecretString::new(pw.into());
    let nc = u32::from_str_radix(&get("nc"), 16).unwrap();
    let expected = ch.response(&Answer {
        username: &get("Digest username"),
        password: &pw,
        method: "REGISTER",
        uri: &get("uri"),
        body: b"",
        cnonce: &get("cnonce"),
        nc,
    });
    expected == get("response")
}

fn events(r: &mut Registration) -> Vec<Status> {
    std::iter::from_fn(|| r.poll_event()).collect()
}

#[test]
fn register_through_challenge_then_refresh_with_preemptive_credentials() {
    let t0 = Instant::now();
    let mut r = reg();
    r.start(t0);
    let first = sent(&mut r);
    assert_eq!(first.header("Expires"), Some("600"));
    assert!(first.header("Authorization").is_none());
    assert_eq!(
        first.header("Contact"),
        Some("<sip:1001-abc@127.0.0.1:5070;transport=udp>;expires=600")
    );
    assert_eq!(
        first.header("From"),
        Some("\"Alice\" <sip:1001@example.com>;tag=ft")
    );
    assert!(
        matches!(first.start_line(), crate::sip::message::StartLine::Request { uri, .. } if uri == "sip:example.com")
    );
    r.handle_response(t0, Purpose::Register, &challenge(&first, "n1", false));
    let second = sent(&mut r);
    assert!(auth_ok(&second, "pass1001"));
    assert_eq!(second.cseq(), Some((2, "REGISTER")));
    assert_ne!(
        first.top_via().unwrap().branch,
        second.top_via().unwrap().branch
    );
    // The registrar grants 120 s on our Contact (another device's contact says 3600).
    r.handle_response(
        t0,
        Purpose::Register,
        &ok(&second, &[("Contact", "<sip:other@10.0.0.9>;expires=3600, <sip:1001-abc@127.0.0.1:5070;transport=udp>;expires=120")]),
    );
    assert_eq!(
        events(&mut r),
        vec![
            Status::Registering,
            Status::Registered {
                expires: 120,
                count: 1
            }
        ]
    );
    // Refresh at 80 % (lead = max(24 s, 5 s)) → 96 s; keepalive is sooner at 30 s.
    assert_eq!(r.poll_timeout(), Some(t0 + Duration::from_secs(30)));
    r.handle_timeout(t0 + Duration::from_secs(30));
    let ka = sent(&mut r);
    assert_eq!(ka.method(), "OPTIONS");
    r.handle_response(
        t0 + Duration::from_secs(30),
        Purpose::Keepalive,
        &ok(&ka, &[]),
    );
    r.handle_timeout(t0 + Duration::from_secs(96));
    let refresh = sent(&mut r);
    assert_eq!(refresh.call_id(), Some("reg-call"), "§10.2.4: same Call-ID");
    assert_eq!(refresh.cseq(), Some((3, "REGISTER")));
    assert!(
        auth_ok(&refresh, "pass1001"),
        "preemptive credentials with the cached nonce"
    );
    assert!(
        refresh
            .header("Authorization")
            .unwrap()
            .contains("nc=00000002")
    );
    // The registrar's nonce has expired and it challenges (not stale): that is not a wrong password.
    r.handle_response(
        t0 + Duration::from_secs(96),
        Purpose::Register,
        &challenge(&refresh, "n2", false),
    );
    let answered = sent(&mut r);
    assert!(
        answered
            .header("Authorization")
            .unwrap()
            .contains("nc=00000001")
    );
    r.handle_response(
        t0 + Duration::from_secs(96),
        Purpose::Register,
        &ok(&answered, &[("Expires", "120")]),
    );
    assert_eq!(
        events(&mut r),
        vec![Status::Registered {
            expires: 120,
            count: 2
        }]
    );
}

#[test]
fn wrong_password_stops_after_one_retry() {
    let t0 = Instant::now();
    let mut r = reg();
    r.start(t0);
    let first = sent(&mut r);
    r.handle_response(t0, Purpose::Register, &challenge(&first, "n1", false));
    let second = sent(&mut r);
    r.handle_response(t0, Purpose::Register, &challenge(&second, "n2", false));
    assert!(r.poll_request().is_none(), "no loop");
    assert_eq!(r.poll_timeout(), None, "no retry timer");
    match events(&mut r).last() {
        Some(Status::Failed {
            status: 401,
            retrying: false,
            reason,
        }) => assert!(reason.contains("wrong")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn stale_nonce_is_retried_without_counting() {
    let t0 = Instant::now();
    let mut r = reg();
    r.start(t0);
    let first = sent(&mut r);
    r.handle_response(t0, Purpose::Register, &challenge(&first, "n1", false));
    let second = sent(&mut r);
    r.handle_response(t0, Purpose::Register, &challenge(&second, "n2", true));
    let third = sent(&mut r);
    assert!(
        third
            .header("Authorization")
            .unwrap()
            .contains("nonce=\"n2\"")
    );
    r.handle_response(t0, Purpose::Register, &ok(&third, &[]));
    assert!(matches!(
        r.status(),
        Status::Registered { expires: 600, .. }
    ));
    // But a registrar that says stale forever is cut off.
    let mut r = reg();
    r.start(t0);
    let mut req = sent(&mut r);
    r.handle_response(t0, Purpose::Register, &challenge(&req, "s0", false));
    for i in 1..10 {
        let Some(out) = r.poll_request() else { break };
        req = Message::parse(&out.data).unwrap();
        r.handle_response(
            t0,
            Purpose::Register,
            &challenge(&req, &format!("s{i}"), true),
        );
    }
    assert!(matches!(
        r.status(),
        Status::Failed {
            status: 401,
            retrying: false,
            ..
        }
    ));
}

#[test]
fn interval_too_brief_uses_min_expires() {
    let t0 = Instant::now();
    let mut r = reg();
    r.start(t0);
    let first = sent(&mut r);
    let resp = response_to(&first, 423, "Interval Too Brief", Some("x"))
        .header("Min-Expires", "1800")
        .into_message()
        .unwrap();
    r.handle_response(t0, Purpose::Register, &resp);
    let second = sent(&mut r);
    assert_eq!(second.header("Expires"), Some("1800"));
    // The same 423 again (Min-Expires not above what we asked): give up but retry later.
    let resp = response_to(&second, 423, "Interval Too Brief", Some("x"))
        .header("Min-Expires", "1800")
        .into_message()
        .unwrap();
    r.handle_response(t0, Purpose::Register, &resp);
    assert!(matches!(
        r.status(),
        Status::Failed {
            status: 423,
            retrying: true,
            ..
        }
    ));
}

#[test]
fn timeouts_back_off_and_recover() {
    let t0 = Instant::now();
    let mut r = reg();
    r.start(t0);
    let _ = sent(&mut r);
    let mut now = t0 + Duration::from_secs(32);
    let mut delays = Vec::new();
    for _ in 0..5 {
        r.handle_tx_timeout(now, Purpose::Register);
        assert!(matches!(
            r.status(),
            Status::Failed {
                status: 408,
                retrying: true,
                ..
            }
        ));
        let at = r.poll_timeout().unwrap();
        delays.push((at - now).as_secs());
        now = at;
        r.handle_timeout(now);
        let _ = sent(&mut r);
    }
    assert_eq!(delays, vec![5, 10, 20, 40, 60]);
    // The registrar is back: the next attempt succeeds and the back-off resets.
    r.handle_tx_timeout(now, Purpose::Register);
    now = r.poll_timeout().unwrap();
    r.handle_timeout(now);
    let req = sent(&mut r);
    r.handle_response(now, Purpose::Register, &ok(&req, &[]));
    assert!(matches!(r.status(), Status::Registered { .. }));
}

#[test]
fn retry_after_and_definitive_failures() {
    let t0 = Instant::now();
    let mut r = reg();
    r.start(t0);
    let req = sent(&mut r);
    let resp = response_to(&req, 503, "Service Unavailable", Some("x"))
        .header("Retry-After", "45 (maintenance)")
        .into_message()
        .unwrap();
    r.handle_response(t0, Purpose::Register, &resp);
    assert_eq!(r.poll_timeout(), Some(t0 + Duration::from_secs(45)));
    let mut r = reg();
    r.start(t0);
    let req = sent(&mut r);
    r.handle_response(
        t0,
        Purpose::Register,
        &response_to(&req, 403, "Forbidden", Some("x"))
            .into_message()
            .unwrap(),
    );
    assert!(matches!(
        r.status(),
        Status::Failed {
            status: 403,
            retrying: false,
            ..
        }
    ));
    assert_eq!(r.poll_timeout(), None);
}

#[test]
fn unregister_removes_the_binding_with_credentials() {
    let t0 = Instant::now();
    let mut r = reg();
    r.start(t0);
    let a = sent(&mut r);
    r.handle_response(t0, Purpose::Register, &challenge(&a, "n1", false));
    let b = sent(&mut r);
    r.handle_response(t0, Purpose::Register, &ok(&b, &[]));
    r.unregister(t0);
    let un = sent(&mut r);
    assert_eq!(un.header("Expires"), Some("0"));
    assert!(un.header("Contact").unwrap().ends_with(";expires=0"));
    assert!(auth_ok(&un, "pass1001"));
    r.handle_response(t0, Purpose::Register, &ok(&un, &[]));
    assert_eq!(r.status(), &Status::Unregistered);
    assert!(r.is_finished());
    assert_eq!(
        r.poll_timeout(),
        None,
        "no refresh or keepalive after unregistering"
    );
}

#[test]
fn unregister_while_registering_waits_for_the_outcome() {
    let t0 = Instant::now();
    let mut r = reg();
    r.start(t0);
    let a = sent(&mut r);
    r.unregister(t0);
    assert!(
        r.poll_request().is_none(),
        "§10.2: not while one is in flight"
    );
    r.handle_response(t0, Purpose::Register, &ok(&a, &[]));
    let un = sent(&mut r);
    assert_eq!(un.header("Expires"), Some("0"));
    r.handle_response(t0, Purpose::Register, &ok(&un, &[]));
    assert!(r.is_finished());
    // Never registered: unregister is immediate.
    let mut r = reg();
    r.unregister(t0);
    assert!(r.is_finished() && r.poll_request().is_none());
}

/// A registration bound at `t0` on the first try, its status events read.
fn registered(t0: Instant) -> Registration {
    let mut r = reg();
    r.start(t0);
    let a = sent(&mut r);
    r.handle_response(t0, Purpose::Register, &ok(&a, &[]));
    let _ = events(&mut r);
    r
}

#[test]
fn keepalive_timeout_triggers_a_register() {
    let t0 = Instant::now();
    let mut r = registered(t0);
    r.handle_timeout(t0 + Duration::from_secs(30));
    let ka = sent(&mut r);
    assert_eq!(ka.method(), "OPTIONS");
    r.handle_tx_timeout(t0 + Duration::from_secs(62), Purpose::Keepalive);
    assert_eq!(sent(&mut r).method(), "REGISTER");
}

/// A registrar that comes back from an outage while a keepalive is being retransmitted answers
/// it, but if it restarted it has lost the binding: a late answer makes callgate register again,
/// a prompt one does not.
#[test]
fn a_keepalive_answered_late_registers_again() {
    let t0 = Instant::now();
    let mut r = registered(t0);

    let t1 = t0 + Duration::from_secs(30);
    r.handle_timeout(t1);
    let ka = sent(&mut r);
    assert_eq!(ka.method(), "OPTIONS");
    r.handle_response(
        t1 + Duration::from_millis(300),
        Purpose::Keepalive,
        &ok(&ka, &[]),
    );
    assert!(
        r.poll_request().is_none(),
        "a prompt answer changes nothing"
    );
    let t2 = r.poll_timeout().unwrap();
    assert_eq!(
        t2,
        t1 + Duration::from_millis(300) + Duration::from_secs(30)
    );

    r.handle_timeout(t2);
    let ka = sent(&mut r);
    assert_eq!(ka.method(), "OPTIONS");
    let late = t2 + Duration::from_secs(20);
    r.handle_response(late, Purpose::Keepalive, &ok(&ka, &[]));
    let again = sent(&mut r);
    assert_eq!(again.method(), "REGISTER");
    r.handle_response(late, Purpose::Register, &ok(&again, &[]));
    assert!(
        matches!(
            events(&mut r).as_slice(),
            [Status::Registered { count: 2, .. }]
        ),
        "bound again"
    );
}

#[test]
fn received_and_rport_fix_the_contact() {
    let t0 = Instant::now();
    let mut r = reg();
    r.start(t0);
    let a = sent(&mut r);
    // The registrar saw us from 198.51.100.4:40001 (NAT) and says so in the Via.
    let via = a
        .header("Via")
        .unwrap()
        .replace(";rport", ";rport=40001;received=198.51.100.4");
    let resp = Builder::response(200, "OK")
        .header("Via", via)
        .header("From", a.header("From").unwrap())
        .header("To", format!("{};tag=t", a.header("To").unwrap()))
        .header("Call-ID", "reg-call")
        .header("CSeq", "1 REGISTER")
        .into_message()
        .unwrap();
    r.handle_response(t0, Purpose::Register, &resp);
    assert_eq!(
        r.contact_uri(),
        "sip:1001-abc@198.51.100.4:40001;transport=udp"
    );
    r.handle_timeout(t0);
    let again = sent(&mut r);
    assert!(
        again
            .header("Contact")
            .unwrap()
            .contains("198.51.100.4:40001")
    );
}

/// A registrar's absurd expiry (u64::MAX seconds) used to overflow `Instant` and panic the
/// SIP endpoint, taking every registration and call down: now the refresh is at most a day off.
#[test]
fn an_absurd_granted_expiry_refreshes_within_a_day() {
    let t0 = Instant::now();
    let mut settings = settings();
    settings.keepalive = None;
    let mut r = reg();
    r.settings = settings;
    r.start(t0);
    let req = sent(&mut r);
    for expires in ["18446744073709551615", "4294967296"] {
        r.handle_response(t0, Purpose::Register, &ok(&req, &[("Expires", expires)]));
        let due = r.poll_timeout().expect("a refresh");
        assert!(
            due <= t0 + Duration::from_secs(MAX_REFRESH_SECS),
            "{expires}"
        );
        assert!(due > t0 + Duration::from_secs(MAX_REFRESH_SECS / 2));
    }
    assert!(matches!(
        events(&mut r).last(),
        Some(Status::Registered {
            expires: u32::MAX,
            ..
        })
    ));
}
