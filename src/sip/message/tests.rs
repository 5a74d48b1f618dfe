use super::*;

const REG_401: &str = "SIP/2.0 401 Unauthorized\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1;rport=5071;received=10.0.0.1\r\n\
From: <sip:1001@a>;tag=1\r\nTo: <sip:1001@a>;tag=2\r\nCall-ID: x\r\nCSeq: 1 REGISTER\r\n\
WWW-Authenticate: Digest realm=\"a\", nonce=\"n1\", qop=\"auth,auth-int\", algorithm=SHA-256\r\n\
WWW-Authenticate: Digest realm=\"a\", nonce=\"n2\", qop=\"auth\", algorithm=MD5\r\n\
Content-Length: 0\r\n\r\n";

#[test]
fn multiple_challenges_and_qop_lists_survive() {
    let m = Message::parse(REG_401.as_bytes()).unwrap();
    assert_eq!(m.status(), Some(401));
    let ch: Vec<_> = m.headers("www-authenticate").collect();
    assert_eq!(ch.len(), 2);
    assert!(ch[0].contains("qop=\"auth,auth-int\""));
    let via = m.top_via().unwrap();
    assert_eq!(via.branch.as_deref(), Some("z9hG4bK1"));
    assert_eq!(via.rport, Some(Some(5071)));
    assert_eq!(via.received.as_deref(), Some("10.0.0.1"));
    assert_eq!(m.cseq(), Some((1, "REGISTER")));
    assert_eq!(m.method(), "REGISTER");
    assert_eq!((m.from_tag(), m.to_tag()), (Some("1"), Some("2")));
}

#[test]
fn compact_names_are_expanded() {
    let raw = "SIP/2.0 200 OK\r\nv: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\r\nf: <sip:1001@a>;tag=1\r\n\
t: <sip:1001@a>;tag=2\r\ni: abc\r\nCSeq: 1 REGISTER\r\nm: <sip:1001@127.0.0.1:5070>;expires=60\r\nl: 0\r\n\r\n";
    let m = Message::parse(raw.as_bytes()).unwrap();
    assert_eq!(m.call_id(), Some("abc"));
    assert_eq!(
        m.header("Contact"),
        Some("<sip:1001@127.0.0.1:5070>;expires=60")
    );
    assert_eq!(m.top_via().unwrap().branch.as_deref(), Some("z9hG4bK1"));
}

#[test]
fn folded_lines_are_unfolded() {
    let raw = "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:5070\r\n ;branch=z9hG4bK9\r\nFrom: <sip:1001@a>;tag=1\r\n\
To: <sip:1001@a>;tag=2\r\nCall-ID: x\r\nCSeq: 7\r\n\tREGISTER\r\nSubject: a\r\n  b\r\nContent-Length: 0\r\n\r\n";
    let m = Message::parse(raw.as_bytes()).unwrap();
    assert_eq!(m.top_via().unwrap().branch.as_deref(), Some("z9hG4bK9"));
    assert_eq!(m.cseq(), Some((7, "REGISTER")));
    assert_eq!(m.header("Subject"), Some("a b"));
}

#[test]
fn unknown_methods_are_flagged_not_dropped() {
    let raw = "FOO sip:1001@a SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\r\nFrom: <sip:1001@a>;tag=1\r\n\
To: <sip:1001@a>\r\nCall-ID: x\r\nCSeq: 1 FOO\r\nContent-Length: 0\r\n\r\n";
    let m = Message::parse(raw.as_bytes()).unwrap();
    assert_eq!(m.unknown_method(), Some("FOO"));
    assert_eq!(m.method(), "FOO");
    let resp = response_to(&m, 501, "Not Implemented", Some("t1"))
        .into_message()
        .unwrap();
    assert_eq!(resp.cseq(), Some((1, "FOO")));
    assert_eq!(resp.to_tag(), Some("t1"));
}

#[test]
fn bare_lf_and_leading_crlf() {
    let raw = "\r\nSIP/2.0 200 OK\nVia: SIP/2.0/UDP h;branch=z9hG4bKx\nFrom: <sip:a@b>;tag=1\nTo: <sip:a@b>\nCall-ID: c\nCSeq: 2 OPTIONS\n\n";
    let m = Message::parse(raw.as_bytes()).unwrap();
    assert_eq!(m.cseq(), Some((2, "OPTIONS")));
}

#[test]
fn content_length_is_honoured() {
    let base = "INVITE sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKx\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:a@b>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n";
    let m =
        Message::parse(format!("{base}Content-Length: 4\r\n\r\nv=0\r\ntrailing junk").as_bytes())
            .unwrap();
    assert_eq!(m.body(), b"v=0\r");
    let e = Message::parse(format!("{base}Content-Length: 400\r\n\r\nv=0\r\n").as_bytes());
    assert_eq!(e.err(), Some(ParseError::BadContentLength));
    let e = Message::parse(format!("{base}Content-Length: -1\r\n\r\n").as_bytes());
    assert_eq!(e.err(), Some(ParseError::BadContentLength));
}

#[test]
fn limits_and_garbage() {
    assert_eq!(
        Message::parse(b"\r\n\r\n").err(),
        Some(ParseError::Keepalive)
    );
    assert_eq!(
        Message::parse(&vec![b'a'; MAX_MESSAGE_BYTES + 1]).err(),
        Some(ParseError::TooLarge)
    );
    let many = format!(
        "OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKx\r\n{}\r\n",
        "X-A: 1\r\n".repeat(200)
    );
    assert_eq!(
        Message::parse(many.as_bytes()).err(),
        Some(ParseError::TooManyHeaders)
    );
    let no_callid = "OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKx\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:a@b>\r\nCSeq: 1 OPTIONS\r\n\r\n";
    assert_eq!(
        Message::parse(no_callid.as_bytes()).err(),
        Some(ParseError::MissingHeader("Call-ID"))
    );
    assert_eq!(Message::parse(b"hello").err(), Some(ParseError::Truncated));
    assert!(Message::parse(b"GARBAGE\r\n\r\n").is_err());
}

#[test]
fn list_and_param_helpers() {
    assert_eq!(
        split_list("<sip:a@b;x=1,2>;expires=5, \"Bo, b\" <sip:c@d>, sip:e@f"),
        vec![
            "<sip:a@b;x=1,2>;expires=5",
            "\"Bo, b\" <sip:c@d>",
            "sip:e@f"
        ]
    );
    assert_eq!(
        header_param("<sip:a@b;tag=no>;tag=yes;lr", "tag"),
        Some(Some("yes"))
    );
    assert_eq!(header_param("<sip:a@b>;lr", "lr"), Some(None));
    assert_eq!(name_addr_uri("\"A\" <sip:a@b;x>;tag=1"), "sip:a@b;x");
    assert_eq!(name_addr_uri("sip:a@b;tag=1"), "sip:a@b");
    let v = Via::parse("SIP/2.0/UDP [::1]:5060;branch=z9hG4bKq;rport").unwrap();
    assert_eq!(
        (v.host.as_str(), v.port, v.rport),
        ("[::1]", Some(5060), Some(None))
    );
}

/// No datagram panics the parser: random bytes and mutations of real messages.
#[test]
fn no_panic_sweep() {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let seed = REG_401.as_bytes();
    for _ in 0..20_000 {
        let mut m = seed.to_vec();
        for _ in 0..(next() % 8) {
            let i = (next() as usize) % m.len();
            match next() % 4 {
                0 => m[i] = next() as u8,
                1 => m[i] = b"\r\n:;,<>\" \t="[(next() % 11) as usize],
                2 => {
                    m.truncate(i);
                }
                _ => m.insert(i, b"\r\n "[(next() % 3) as usize]),
            }
            if m.is_empty() {
                break;
            }
        }
        if let Ok(msg) = Message::parse(&m) {
            let _ = (
                msg.top_via(),
                msg.cseq(),
                msg.start_line(),
                msg.from_tag(),
                msg.to_tag(),
            );
        }
        let len = (next() % 300) as usize;
        let junk: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let _ = Message::parse(&junk);
    }
}

#[test]
fn reason_phrase_is_the_peers() {
    let raw = "SIP/2.0 486 Busy Here Right Now\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKx\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:a@b>;tag=2\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n\r\n";
    let m = Message::parse(raw.as_bytes()).unwrap();
    assert_eq!(
        m.start_line(),
        StartLine::Response {
            code: 486,
            reason: "Busy Here Right Now".into()
        }
    );
}
