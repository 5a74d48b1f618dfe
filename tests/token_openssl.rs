//! `ctr` mode must decrypt exactly what `openssl enc -aes-*-ctr -nosalt` produces.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use callgate::secret::SecretBytes;
use callgate::token::{AppKeys, Keyring, Mode, TokenPolicy};

fn openssl_ctr(key_hex: &str, iv_hex: &str, plaintext: &str) -> Vec<u8> {
    let cipher = format!("-aes-{}-ctr", key_hex.len() * 4);
    let mut child = Command::new("openssl")
        .args(["enc", &cipher, "-nosalt", "-K", key_hex, "-iv", iv_hex])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run openssl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(plaintext.as_bytes())
        .expect("write to openssl");
    let out = child.wait_with_output().expect("openssl output");
    assert!(out.status.success(), "openssl failed");
    out.stdout
}

#[test]
fn openssl_made_tokens_decode() {
    common::require_tool("openssl", "apt-get install openssl");
    let now = SystemTime::now();
    let exp = now.duration_since(UNIX_EPOCH).expect("clock").as_secs() + 300;
    // Long enough to span many AES blocks, with escapes, child elements and a non-ASCII name.
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<root login=\"1001\" password=\"p&amp;ss&lt;1001\" \
         domain=\"sip.example.com\">\n  <outboundProxy>proxy.example.com:5080</outboundProxy>\n  \
         <visibleName>Zoë Agent</visibleName>\n  <expires>{exp}</expires>\n</root>\n"
    );
    let cases = [
        (
            "2b7e151628aed2a6abf7158809cf4f3c",
            "00000000000000000000000000000000",
        ),
        (
            "2b7e151628aed2a6abf7158809cf4f3c",
            "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff",
        ),
        (
            "8e73b0f7da0e6452c810f32b809079e562f8ead2522c6b7b",
            "0000000000000000ffffffffffffffff",
        ),
        (
            "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4",
            "00000000000000000000000000000000",
        ),
        (
            "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4",
            "fffffffffffffffffffffffffffffffe",
        ),
    ];
    for (key, iv) in cases {
        let ct = openssl_ctr(key, iv, &xml);
        let iv_bytes: [u8; 16] = hex::decode(iv).expect("hex").try_into().expect("16 bytes");
        let mut apps = BTreeMap::new();
        apps.insert(
            "legacy".to_owned(),
            AppKeys::new(
                Mode::Ctr,
                vec![SecretBytes::new(hex::decode(key).expect("hex"))],
                iv_bytes,
                true,
            )
            .expect("key"),
        );
        let kr = Keyring::new(apps, TokenPolicy::default());
        let token = format!("legacy:{}", hex::encode(&ct));
        let v = kr
            .verify(&token, now)
            .unwrap_or_else(|e| panic!("AES-{} iv {iv}: {e}", key.len() * 4));
        let a = v.account();
        assert_eq!(a.login, "1001");
        assert_eq!(a.password.expose_secret(), "p&ss<1001");
        assert_eq!(
            a.outbound_proxy.as_ref().map(|p| p.to_string()).as_deref(),
            Some("proxy.example.com:5080")
        );
        assert_eq!(a.visible_name.as_deref(), Some("Zoë Agent"));
        assert_eq!(v.expires(), Some(exp as i64));

        // The wrong IV gives garbage, reported as bad_plaintext (ctr has no MAC to say more).
        let other_iv = openssl_ctr(key, "0102030405060708090a0b0c0d0e0f10", &xml);
        let err = kr
            .verify(&format!("legacy:{}", hex::encode(other_iv)), now)
            .expect_err("wrong IV must not decode");
        assert_eq!(err.code(), "bad_plaintext");

        // And once the token is old, it is refused as expired.
        let later = now + Duration::from_secs(300 + 31 + 1);
        assert_eq!(
            kr.verify(&token, later).expect_err("expired").code(),
            "token_expired"
        );
    }
}
