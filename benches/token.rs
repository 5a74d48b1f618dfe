//! Token decoding cost per login, both modes. `cargo bench --bench token`.
#![allow(missing_docs, clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{SystemTime, UNIX_EPOCH};

use callgate::account::account_from_cli;
use callgate::secret::SecretBytes;
use callgate::token::{AppKeys, Keyring, Mode, TokenPolicy};
use criterion::{Criterion, criterion_group, criterion_main};

fn keyring() -> Keyring {
    let mut apps = BTreeMap::new();
    let key = || SecretBytes::new((0u8..32).collect());
    apps.insert(
        "crm".to_owned(),
        AppKeys::new(Mode::CtrHmac, vec![key()], [0; 16], true).expect("key"),
    );
    apps.insert(
        "legacy".to_owned(),
        AppKeys::new(Mode::Ctr, vec![key()], [0; 16], true).expect("key"),
    );
    Keyring::new(apps, TokenPolicy::default())
}

fn bench(c: &mut Criterion) {
    let kr = keyring();
    let now = SystemTime::now();
    let exp = now.duration_since(UNIX_EPOCH).expect("clock").as_secs() as i64 + 3600;
    let account = account_from_cli(
        "1001",
        None,
        "pass1001".into(),
        "sip.example.com",
        Some("proxy.example.com:5060"),
        None,
        Some("Alice Agent"),
    )
    .expect("account");
    let hmac_token = kr.mint("crm", &account, Some(exp), [7; 16]).expect("mint");
    let ctr_token = kr
        .mint("legacy", &account, Some(exp), [0; 16])
        .expect("mint");

    let mut g = c.benchmark_group("token");
    g.bench_function("verify ctr-hmac", |b| {
        b.iter(|| kr.verify(black_box(&hmac_token), now).is_ok())
    });
    g.bench_function("verify ctr", |b| {
        b.iter(|| kr.verify(black_box(&ctr_token), now).is_ok())
    });
    g.bench_function("reject tampered ctr-hmac", |b| {
        let mut t = hmac_token.clone().into_bytes();
        let i = t.len() - 1;
        t[i] = if t[i] == b'0' { b'1' } else { b'0' };
        let t = String::from_utf8(t).expect("ascii");
        b.iter(|| kr.verify(black_box(&t), now).is_err())
    });
    g.bench_function("mint ctr-hmac", |b| {
        b.iter(|| kr.mint("crm", black_box(&account), Some(exp), [7; 16]))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
