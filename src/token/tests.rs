use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::*;
use crate::secret::{SecretBytes, SecretString};

const NOW: u64 = 1_800_000_000;

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW)
}

fn key(byte: u8, len: usize) -> SecretBytes {
    SecretBytes::new(vec![byte; len])
}

fn keyring() -> Keyring {
    let mut apps = BTreeMap::new();
    let hmac_app =
        AppKeys::new(Mode::CtrHmac, vec![key(1, 32), key(2, 16)], [0; 16], true).unwrap();
    let ctr_app = AppKeys::new(Mode::Ctr, vec![key(3, 16), key(4, 32)], [9; 16], true).unwrap();
    let lax = AppKeys::new(Mode::CtrHmac, vec![key(5, 24)], [0; 16], false).unwrap();
    apps.insert("crm".to_owned(), hmac_app);
    apps.insert("legacy".to_owned(), ctr_app);
    apps.insert("lax".to_owned(), lax);
    Keyring::new(apps, TokenPolicy::default())
}

fn account() -> SipAccount {
    account_from_fields(
        |f| match f {
            Field::Login => Some("1001".into()),
            Field::Domain => Some("sip.example.com".into()),
            Field::OutboundProxy => Some("proxy.example.com:5080".into()),
            Field::VisibleName => Some("Agent Smith".into()),
            Field::Group => Some("sales.emea".into()),
            _ => None,
        },
        Some(SecretString::new("s3cr&t<\"pw".into())),
    )
    .unwrap()
}

fn exp(delta: i64) -> Option<i64> {
    Some(NOW as i64 + delta)
}

/// Seals arbitrary plaintext as `app`'s first key would.
fn seal_raw(app: &str, key_byte: u8, key_len: usize, plaintext: &str) -> String {
    let keys = DerivedKeys::derive(&vec![key_byte; key_len]).unwrap();
    format!(
        "{app}:{}",
        hex::encode(keys.seal(app, &[7; 16], plaintext.as_bytes()))
    )
}

fn code(r: Result<VerifiedToken, TokenError>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => e.code().into_owned(),
    }
}

#[test]
fn ctr_hmac_round_trip() {
    let kr = keyring();
    let acct = account();
    let token = kr.mint("crm", &acct, exp(600), [42; 16]).unwrap();
    assert!(token.starts_with("crm:"));
    let v = kr.verify(&token, now()).unwrap();
    assert_eq!(v.account(), &acct);
    assert_eq!(v.account().group.as_deref(), Some("sales.emea"));
    assert_eq!(v.expires(), exp(600));
    assert_eq!(
        (v.app(), v.mode(), v.key_index()),
        ("crm", Mode::CtrHmac, 0)
    );
    // Upper-case hex and surrounding whitespace (copy-paste) are fine.
    let upper = format!("crm:{}\n", token["crm:".len()..].to_ascii_uppercase());
    assert!(kr.verify(&upper, now()).is_ok());
}

#[test]
fn ctr_round_trip_all_key_sizes() {
    for len in [16, 24, 32] {
        let mut apps = BTreeMap::new();
        apps.insert(
            "a".to_owned(),
            AppKeys::new(Mode::Ctr, vec![key(8, len)], [3; 16], true).unwrap(),
        );
        let kr = Keyring::new(apps, TokenPolicy::default());
        let token = kr.mint("a", &account(), exp(60), [0; 16]).unwrap();
        assert_eq!(
            kr.verify(&token, now()).unwrap().account(),
            &account(),
            "AES-{}",
            len * 8
        );
    }
}

#[test]
fn any_flipped_bit_gives_bad_mac() {
    let kr = keyring();
    let token = kr.mint("crm", &account(), exp(600), [42; 16]).unwrap();
    let bytes = hex::decode(&token[4..]).unwrap();
    for i in 0..bytes.len() {
        for bit in [0x01u8, 0x80] {
            let mut t = bytes.clone();
            t[i] ^= bit;
            let tampered = format!("crm:{}", hex::encode(&t));
            assert_eq!(
                code(kr.verify(&tampered, now())),
                "bad_mac",
                "byte {i} bit {bit:#x}"
            );
        }
    }
    // Truncated, or replayed under another app with the same keys.
    assert_eq!(code(kr.verify(&token[..token.len() - 2], now())), "bad_mac");
}

#[test]
fn key_rotation_accepts_every_listed_key() {
    let kr = keyring();
    // A token made with the app's *second* key (16 bytes of 2) still verifies.
    let token = seal_raw(
        "crm",
        2,
        16,
        &format!(
            r#"<a login="1" password="p" domain="d.example" expires="{}"/>"#,
            NOW + 60
        ),
    );
    let v = kr.verify(&token, now()).unwrap();
    assert_eq!(v.key_index(), 1);
    // A key that is not listed is refused.
    let foreign = seal_raw("crm", 9, 32, r#"<a login="1" password="p" domain="d"/>"#);
    assert_eq!(code(kr.verify(&foreign, now())), "bad_mac");
}

#[test]
fn ctr_rotation_uses_the_key_that_yields_xml() {
    let kr = keyring();
    let xml = format!(
        r#"<a login="1" password="p" domain="d.example" expires="{}"/>"#,
        NOW + 60
    );
    let mut ct = xml.clone().into_bytes();
    cipher::apply_ctr(&[4; 32], &[9; 16], &mut ct).unwrap();
    let v = kr
        .verify(&format!("legacy:{}", hex::encode(&ct)), now())
        .unwrap();
    assert_eq!(v.key_index(), 1);
    // Under an unknown key the plaintext is garbage.
    let mut ct = xml.into_bytes();
    cipher::apply_ctr(&[5; 16], &[9; 16], &mut ct).unwrap();
    assert_eq!(
        code(kr.verify(&format!("legacy:{}", hex::encode(&ct)), now())),
        "bad_plaintext"
    );
}

#[test]
fn expiry_and_skew() {
    let kr = keyring();
    let a = account();
    let t = kr.mint("crm", &a, exp(-10), [1; 16]).unwrap();
    assert_eq!(
        code(kr.verify(&t, now())),
        "ok",
        "10 s late is inside the 30 s skew"
    );
    let t = kr.mint("crm", &a, exp(-31), [1; 16]).unwrap();
    match kr.verify(&t, now()) {
        Err(e @ TokenError::Expired { expired_at, now }) => {
            assert_eq!((expired_at, now), (NOW as i64 - 31, NOW as i64));
            // What the page sees says nothing of the decrypted plaintext.
            assert!(!e.to_string().contains(&expired_at.to_string()), "{e}");
        }
        other => panic!("{other:?}"),
    }
    // RFC 3339 with offsets.
    for (s, ok) in [
        ("2027-01-15T08:00:00Z", "ok"),
        ("2027-01-15T10:00:00+02:00", "ok"),
        ("2020-01-15T08:00:00Z", "token_expired"),
        ("tomorrow", "invalid_field:expires"),
        ("99999999999999999999", "invalid_field:expires"),
    ] {
        let t = seal_raw(
            "crm",
            1,
            32,
            &format!(r#"<a login="1" password="p" domain="d" expires="{s}"/>"#),
        );
        assert_eq!(code(kr.verify(&t, now())), ok, "{s}");
    }
}

#[test]
fn expires_is_required_unless_the_app_says_otherwise() {
    let kr = keyring();
    assert_eq!(
        kr.mint("crm", &account(), None, [0; 16])
            .err()
            .map(|e| e.to_string()),
        Some(TokenError::MissingField(Field::Expires).to_string())
    );
    let t = seal_raw("crm", 1, 32, r#"<a login="1" password="p" domain="d"/>"#);
    assert_eq!(code(kr.verify(&t, now())), "missing_field:expires");
    let t = kr.mint("lax", &account(), None, [0; 16]).unwrap();
    assert_eq!(kr.verify(&t, now()).unwrap().expires(), None);
}

#[test]
fn max_lifetime_refuses_tokens_that_live_too_long() {
    let limited = AppKeys::new(Mode::CtrHmac, vec![key(6, 32)], [0; 16], false)
        .unwrap()
        .with_replay_limits(Some(Duration::from_secs(600)), false);
    let kr = Keyring::new(
        BTreeMap::from([("crm".to_owned(), limited)]),
        TokenPolicy::default(),
    );
    let a = account();
    for (delta, want) in [
        (600, "ok"),
        (630, "ok"),
        (631, "invalid_field:expires"),
        (86_400, "invalid_field:expires"),
    ] {
        let t = kr.mint("crm", &a, exp(delta), [1; 16]).unwrap();
        assert_eq!(code(kr.verify(&t, now())), want, "expires in {delta} s");
    }
    // A limit needs an expiry, even where require_expires is off.
    assert!(kr.mint("crm", &a, None, [1; 16]).is_err());
    let t = seal_raw("crm", 6, 32, r#"<a login="1" password="p" domain="d"/>"#);
    assert_eq!(code(kr.verify(&t, now())), "missing_field:expires");
}

#[test]
fn single_use_tokens_carry_a_fingerprint_that_tells_them_apart() {
    let once = |mode| {
        AppKeys::new(mode, vec![key(7, 16)], [3; 16], true)
            .unwrap()
            .with_replay_limits(None, true)
    };
    let kr = Keyring::new(
        BTreeMap::from([
            ("crm".to_owned(), once(Mode::CtrHmac)),
            ("legacy".to_owned(), once(Mode::Ctr)),
        ]),
        TokenPolicy::default(),
    );
    let a = account();
    for app in ["crm", "legacy"] {
        let t1 = kr.mint(app, &a, exp(300), [1; 16]).unwrap();
        let t2 = kr.mint(app, &a, exp(301), [2; 16]).unwrap();
        let (f1, until) = kr.verify(&t1, now()).unwrap().single_use().unwrap();
        let (f1_again, _) = kr.verify(&t1, now()).unwrap().single_use().unwrap();
        let (f2, _) = kr.verify(&t2, now()).unwrap().single_use().unwrap();
        assert_eq!(f1, f1_again, "{app}: the same token, the same fingerprint");
        assert_ne!(f1, f2, "{app}: another token, another fingerprint");
        // Remembered until it would stop being accepted: expiry plus the clock skew.
        assert_eq!(until, NOW as i64 + 300 + 30, "{app}");
    }
    // Apps without the flag hand out none.
    let t = keyring().mint("crm", &a, exp(300), [1; 16]).unwrap();
    assert_eq!(keyring().verify(&t, now()).unwrap().single_use(), None);
}

#[test]
fn each_refusal_has_its_own_code() {
    let kr = keyring();
    let e = NOW + 60;
    let cases: Vec<(String, &str)> = vec![
        ("nocolon".into(), "malformed_token"),
        ("crm:zz".into(), "malformed_token"),
        ("crm:abc".into(), "malformed_token"),
        ("crm:".into(), "malformed_token"),
        ("crm:00ff".into(), "malformed_token"),
        ("legacy:".into(), "malformed_token"),
        ("bad app:00".into(), "malformed_token"),
        (":00".into(), "malformed_token"),
        ("nobody:00".into(), "unknown_app"),
        ("x".repeat(DEFAULT_MAX_TOKEN_BYTES + 1), "token_too_large"),
        (seal_raw("crm", 1, 32, "not xml at all"), "bad_plaintext"),
        (
            seal_raw(
                "crm",
                1,
                32,
                &format!(r#"<a password="p" domain="d" expires="{e}"/>"#),
            ),
            "missing_field:login",
        ),
        (
            seal_raw(
                "crm",
                1,
                32,
                &format!(r#"<a login="1" domain="d" expires="{e}"/>"#),
            ),
            "missing_field:password",
        ),
        (
            seal_raw(
                "crm",
                1,
                32,
                &format!(r#"<a login="1" password="" domain="d" expires="{e}"/>"#),
            ),
            "missing_field:password",
        ),
        (
            seal_raw(
                "crm",
                1,
                32,
                &format!(r#"<a login="1" password="p" expires="{e}"/>"#),
            ),
            "missing_field:domain",
        ),
        (
            seal_raw(
                "crm",
                1,
                32,
                &format!(r#"<a login="1 2" password="p" domain="d" expires="{e}"/>"#),
            ),
            "invalid_field:login",
        ),
        (
            seal_raw(
                "crm",
                1,
                32,
                &format!(r#"<a login="1" password="p" domain="d&#13;&#10;X: y" expires="{e}"/>"#),
            ),
            "invalid_field:domain",
        ),
        (
            seal_raw(
                "crm",
                1,
                32,
                &format!(r#"<a login="1" password="p" domain="d" port="0" expires="{e}"/>"#),
            ),
            "invalid_field:port",
        ),
        (
            seal_raw(
                "crm",
                1,
                32,
                &format!(
                    r#"<a login="1" password="p" domain="d" outboundProxy="p:x" expires="{e}"/>"#
                ),
            ),
            "invalid_field:outboundProxy",
        ),
        (
            seal_raw(
                "crm",
                1,
                32,
                &format!(
                    r#"<a login="1" password="p" domain="d" visibleName="a&quot;b" expires="{e}"/>"#
                ),
            ),
            "invalid_field:visibleName",
        ),
        (
            seal_raw(
                "crm",
                1,
                32,
                &format!(r#"<a login="1" password="p" domain="d" group="a b" expires="{e}"/>"#),
            ),
            "invalid_field:group",
        ),
        (
            seal_raw(
                "crm",
                1,
                32,
                &format!(
                    r#"<a login="1" password="p" domain="d" authenticationName="a&#10;b" expires="{e}"/>"#
                ),
            ),
            "invalid_field:authenticationName",
        ),
        (
            seal_raw(
                "crm",
                1,
                32,
                &format!(
                    "<!DOCTYPE a><a login=\"1\" password=\"p\" domain=\"d\" expires=\"{e}\"/>"
                ),
            ),
            "bad_plaintext",
        ),
    ];
    for (token, want) in &cases {
        assert_eq!(
            &code(kr.verify(token, now())),
            want,
            "{}",
            &token[..token.len().min(60)]
        );
    }
}

#[test]
fn defaults_and_child_elements() {
    let kr = keyring();
    let t = seal_raw(
        "crm",
        1,
        32,
        &format!(
            "<root>\n <login>1001</login>\n <password>pw</password>\n <domain>SIP.example.com</domain>\n \
             <expires>{}</expires>\n <somethingElse a=\"b\">x</somethingElse>\n</root>",
            NOW + 60
        ),
    );
    let v = kr.verify(&t, now()).unwrap();
    let a = v.account();
    assert_eq!(
        (a.login.as_str(), a.auth_name.as_str(), a.port),
        ("1001", "1001", 5060)
    );
    assert_eq!(a.domain.as_str(), "sip.example.com");
    assert_eq!(a.password.expose_secret(), "pw");
    assert_eq!(a.outbound_proxy, None);
}

#[test]
fn errors_and_debug_never_show_secrets() {
    let kr = keyring();
    let a = account();
    let t = kr.mint("crm", &a, exp(600), [0; 16]).unwrap();
    let v = kr.verify(&t, now()).unwrap();
    let dbg = format!("{v:?} {kr:?}");
    assert!(!dbg.contains("s3cr"), "{dbg}");
    assert!(dbg.contains("[redacted"));
    let t = seal_raw(
        "crm",
        1,
        32,
        r#"<a login="1" password="TopSecret" domain="bad..d" expires="1"/>"#,
    );
    let err = kr.verify(&t, now()).unwrap_err();
    assert!(!format!("{err} {err:?}").contains("TopSecret"));
}

/// A small deterministic PRNG, so the sweep needs no extra crate and replays exactly.
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// No input panics the verifier: random text, random hex under real apps, and random
/// XML-ish plaintexts behind a valid MAC (the parser sees attacker-chosen bytes in `ctr` mode).
#[test]
fn no_panic_sweep() {
    let kr = keyring();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let alphabet = b"crmlegacy:0123456789abcdefABCDEF \n<>/=\"'&;#x!-[]?";
    let pieces = [
        "<",
        ">",
        "</",
        "/>",
        "<a",
        " login=\"1\"",
        " password=\"p\"",
        " domain=\"d\"",
        "<login>",
        "</login>",
        "&amp;",
        "&#x41;",
        "&#0;",
        "&bogus;",
        "<![CDATA[",
        "]]>",
        "<!--",
        "-->",
        "<?xml version=\"1.0\"?>",
        "<!DOCTYPE",
        "\u{feff}",
        "\u{0}",
        "é",
        " expires=\"",
        "\"",
        "2026-01-01T00:00:00Z",
        "\n",
    ];
    for _ in 0..20_000 {
        let len = rng.below(80);
        let s: String = (0..len)
            .map(|_| alphabet[rng.below(alphabet.len())] as char)
            .collect();
        let _ = kr.verify(&s, now());
        let hexlen = rng.below(200) * 2;
        let h: String = (0..hexlen)
            .map(|_| b"0123456789abcdef"[rng.below(16)] as char)
            .collect();
        let _ = kr.verify(&format!("crm:{h}"), now());
        let _ = kr.verify(&format!("legacy:{h}"), now());
        let n = rng.below(12);
        let xml: String = (0..n).map(|_| pieces[rng.below(pieces.len())]).collect();
        let _ = kr.verify(&seal_raw("crm", 1, 32, &xml), now());
    }
}
