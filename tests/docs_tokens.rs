//! Runs every snippet of docs/TOKENS.md exactly as printed, and checks the tokens they mint with
//! `callgate token inspect` against the apps.toml snippet of the same page.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{TempDir, callgate, require_tool, run_bounded};

/// The fenced block that follows `<!-- snippet: NAME -->`.
fn snippet(doc: &str, name: &str) -> String {
    let marker = format!("<!-- snippet: {name} -->");
    let start = doc
        .find(&marker)
        .unwrap_or_else(|| panic!("docs/TOKENS.md has no snippet {name}"));
    let rest = &doc[start + marker.len()..];
    let fence = rest.find("```").expect("opening fence");
    let body_start = rest[fence..].find('\n').expect("fence line") + fence + 1;
    let body_len = rest[body_start..].find("\n```").expect("closing fence");
    rest[body_start..body_start + body_len + 1].to_owned()
}

fn setup() -> (String, TempDir) {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/TOKENS.md"))
        .expect("read docs/TOKENS.md");
    let dir = TempDir::new("docs");
    dir.write("apps.toml", &snippet(&doc, "apps-toml"));
    dir.write("callgate.toml", "");
    (doc, dir)
}

fn check(dir: &TempDir, stdout: &[u8], app: &str, password_hint: &str) {
    let out = String::from_utf8_lossy(stdout);
    let token = out.lines().last().unwrap_or_default().trim().to_owned();
    assert!(
        token.starts_with(&format!("{app}:")),
        "snippet printed {out:?}"
    );
    let inspected = run_bounded(
        callgate()
            .args(["token", "inspect", "--config"])
            .arg(dir.path().join("callgate.toml"))
            .arg(&token),
        Duration::from_secs(10),
    );
    let report = String::from_utf8_lossy(&inspected.stdout);
    assert!(
        inspected.status.success(),
        "callgate refused the {app} snippet's token: {}",
        String::from_utf8_lossy(&inspected.stderr)
    );
    assert!(report.contains("login               1001"), "{report}");
    assert!(
        report.contains("domain              sip.example.com"),
        "{report}"
    );
    assert!(
        !report.contains(password_hint),
        "inspect must hide the password: {report}"
    );
}

#[test]
fn openssl_shell_snippet() {
    require_tool("openssl", "apt-get install openssl");
    let (doc, dir) = setup();
    let script = dir.write("mint.sh", &snippet(&doc, "openssl-ctr"));
    let out = run_bounded(
        std::process::Command::new("sh").arg(script),
        Duration::from_secs(20),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check(&dir, &out.stdout, "legacycrm", "pass1001");
}

#[test]
fn python_snippet() {
    require_tool("python3", "apt-get install python3 python3-cryptography");
    let (doc, dir) = setup();
    let script = dir.write("mint.py", &snippet(&doc, "python-ctr-hmac"));
    let out = run_bounded(
        std::process::Command::new("python3").arg(script),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "python snippet failed (needs `pip install cryptography`): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    check(&dir, &out.stdout, "crm", "pa&ss");
}

#[test]
fn node_snippet() {
    require_tool("node", "apt-get install nodejs");
    let (doc, dir) = setup();
    let script = dir.write("mint.js", &snippet(&doc, "node-ctr-hmac"));
    let out = run_bounded(
        std::process::Command::new("node").arg(script),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check(&dir, &out.stdout, "crm", "pa&ss");
}

/// The snippets' password has every XML-special character; make sure it survives exactly.
#[test]
fn snippet_password_round_trips_exactly() {
    require_tool("node", "apt-get install nodejs");
    let (doc, dir) = setup();
    let script = dir.write("mint.js", &snippet(&doc, "node-ctr-hmac"));
    let out = run_bounded(
        std::process::Command::new("node").arg(script),
        Duration::from_secs(30),
    );
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let config = callgate::config::Config::load(&dir.path().join("callgate.toml")).expect("config");
    let v = config
        .keyring()
        .verify(&token, std::time::SystemTime::now())
        .expect("verify");
    assert_eq!(v.account().password.expose_secret(), "pa&ss<1001>\"'");
    assert_eq!(v.account().visible_name.as_deref(), Some("Alice Agent"));
}

/// docs/API.md's webhook check for receivers, run as printed: it accepts what callgate signs
/// and refuses a changed body, another secret and a replayed (old) signature.
#[test]
fn webhook_verify_snippet() {
    require_tool("python3", "apt-get install python3");
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/API.md"))
        .expect("read docs/API.md");
    let secret = "webhook-secret-0123456789abcdef";
    let key = callgate::secret::SecretString::new(secret.into());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let body = r#"{"id":"d1","app":"crm","agent":"1001@x","at":1,"event":{"type":"call"}}"#;
    let good = callgate::webhook::signature(&key, now, body);
    let old = callgate::webhook::signature(&key, now - 600, body);
    let dir = TempDir::new("docs");
    let script = dir.write(
        "verify.py",
        &format!(
            "{}\nbody = {body:?}.encode()\nprint(verify({secret:?}, {good:?}, body), \
             verify({secret:?}, {good:?}, body + b' '), verify('another-secret-0123456789', {good:?}, body), \
             verify({secret:?}, {old:?}, body), verify({secret:?}, 'garbage', body))\n",
            snippet(&doc, "webhook-verify-python")
        ),
    );
    let out = run_bounded(
        std::process::Command::new("python3").arg(script),
        Duration::from_secs(30),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "True False False False False",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
