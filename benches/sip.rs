//! SIP message and digest costs. `cargo bench --bench sip`.
#![allow(missing_docs, clippy::expect_used, clippy::unwrap_used)]

use std::hint::black_box;

use callgate::secret::SecretString;
use callgate::sip::digest::{Answer, Challenge, ChallengeKind};
use callgate::sip::message::{Builder, Message, response_to};
use criterion::{Criterion, criterion_group, criterion_main};

fn register() -> Vec<u8> {
    Builder::request("REGISTER", "sip:sip.example.com")
        .header("Via", "SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bK5f1b2c3d4e5f6a7b;rport")
        .header("Max-Forwards", "70")
        .header("From", "\"Alice Agent\" <sip:1001@sip.example.com>;tag=8a7b6c5d")
        .header("To", "<sip:1001@sip.example.com>")
        .header("Call-ID", "4f3e2d1c0b9a8f7e@callgate")
        .header("CSeq", "2 REGISTER")
        .header("Contact", "<sip:1001-1a2b3c4d@203.0.113.5:5060;transport=udp>;expires=600")
        .header("Expires", "600")
        .header("Allow", "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, REFER, NOTIFY, UPDATE")
        .header("User-Agent", "callgate")
        .header(
            "Authorization",
            "Digest username=\"1001\", realm=\"sip.example.com\", nonce=\"Y2FsbGdhdGUtYmVuY2gtbm9uY2U=\", \
             uri=\"sip:sip.example.com\", response=\"8ca523f5e9506fed4657c9700eebdbec\", algorithm=MD5, qop=auth, \
             nc=00000001, cnonce=\"0a4f113b\"",
        )
        .build()
}

fn bench(c: &mut Criterion) {
    let reg = register();
    let parsed = Message::parse(&reg).unwrap();
    let ok = response_to(&parsed, 200, "OK", Some("as8d7f6"))
        .header(
            "Contact",
            "<sip:1001-1a2b3c4d@203.0.113.5:5060;transport=udp>;expires=600",
        )
        .build();
    let mut g = c.benchmark_group("sip");
    g.bench_function("parse REGISTER", |b| {
        b.iter(|| Message::parse(black_box(&reg)).is_ok())
    });
    g.bench_function("parse 200 OK", |b| {
        b.iter(|| Message::parse(black_box(&ok)).is_ok())
    });
    g.bench_function("build REGISTER", |b| b.iter(register));
    g.bench_function("build 200 OK from request", |b| {
        b.iter(|| response_to(black_box(&parsed), 200, "OK", Some("as8d7f6")).build())
    });
    let pw = SecretString::new("pass1001".into());
    for alg in ["MD5", "SHA-256"] {
        let ch = Challenge::parse(
            ChallengeKind::Www,
            &format!("Digest realm=\"sip.example.com\", nonce=\"Y2FsbGdhdGU=\", qop=\"auth\", algorithm={alg}"),
        )
        .unwrap();
        g.bench_function(format!("digest Authorization {alg}"), |b| {
            b.iter(|| {
                ch.authorization(&Answer {
                    username: "1001",
                    password: &pw,
                    method: "REGISTER",
                    uri: "sip:sip.example.com",
                    body: b"",
                    cnonce: "0a4f113b",
                    nc: 1,
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
