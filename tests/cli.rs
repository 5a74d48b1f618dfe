//! The `callgate` command as an admin or CRM developer uses it.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use common::{Daemon, TempDir, callgate, http_get, run_bounded};

const LIMIT: Duration = Duration::from_secs(20);

fn stdout(cmd: &mut std::process::Command) -> (bool, String, String) {
    let out = run_bounded(cmd, LIMIT);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn keygen_prints_fresh_keys() {
    let (ok, a, _) = stdout(callgate().arg("keygen"));
    let (_, b, _) = stdout(callgate().arg("keygen"));
    assert!(ok);
    assert_eq!(a.trim().len(), 64);
    assert!(a.trim().bytes().all(|c| c.is_ascii_hexdigit()));
    assert_ne!(a, b);
    let (_, short, _) = stdout(callgate().args(["keygen", "--bits", "128"]));
    assert_eq!(short.trim().len(), 32);
    let (ok, _, err) = stdout(callgate().args(["keygen", "--bits", "100"]));
    assert!(!ok && err.contains("128, 192 or 256"), "{err}");
}

#[test]
fn mint_then_inspect_with_the_builtin_demo_app() {
    let (ok, token, err) = stdout(callgate().args([
        "token",
        "mint",
        "--app",
        "demo",
        "--login",
        "1001",
        "--password",
        "Pa55-word!",
        "--domain",
        "sip.example.com",
        "--outbound-proxy",
        "127.0.0.1:5060",
        "--visible-name",
        "Alice",
        "--ttl",
        "2m",
    ]));
    assert!(ok, "{err}");
    let token = token.trim();
    assert!(token.starts_with("demo:"));
    let (ok, report, err) = stdout(callgate().args(["token", "inspect", token]));
    assert!(ok, "{err}");
    for want in [
        "login               1001",
        "password            ******** (hidden)",
        "outboundProxy       127.0.0.1:5060",
        "visibleName         Alice",
        "mode                ctr-hmac",
    ] {
        assert!(report.contains(want), "{want:?} not in\n{report}");
    }
    assert!(!report.contains("Pa55"), "{report}");
    let secs: i64 = report
        .lines()
        .find(|l| l.starts_with("expires"))
        .and_then(|l| l.split("(in ").nth(1))
        .and_then(|s| s.trim_end_matches("s)").parse().ok())
        .expect("expires line");
    assert!((110..=120).contains(&secs), "{report}");

    // One flipped hex digit: refused with its code, exit status 1, and no secret in the message.
    let mut tampered = token.to_owned().into_bytes();
    let i = tampered.len() - 10;
    tampered[i] = if tampered[i] == b'0' { b'1' } else { b'0' };
    let tampered = String::from_utf8(tampered).expect("ascii");
    let out = run_bounded(callgate().args(["token", "inspect", &tampered]), LIMIT);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad_mac"), "{err}");
}

#[test]
fn mint_reads_the_password_from_stdin() {
    let mut child = callgate()
        .args([
            "token",
            "mint",
            "--app",
            "demo",
            "--login",
            "1001",
            "--password-stdin",
            "--domain",
            "example.com",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"from-stdin\n")
        .expect("write");
    let out = child.wait_with_output().expect("output");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let config = callgate::config::Config::embedded().expect("embedded");
    let v = config
        .keyring()
        .verify(&token, std::time::SystemTime::now())
        .expect("verify");
    assert_eq!(v.account().password.expose_secret(), "from-stdin");
}

#[test]
fn mint_refuses_what_the_gateway_would_refuse() {
    let base = [
        "token",
        "mint",
        "--password",
        "x",
        "--domain",
        "example.com",
    ];
    for (extra, want) in [
        (&["--app", "nope", "--login", "1"][..], "unknown_app"),
        (
            &["--app", "demo", "--login", "a b"][..],
            "invalid_field:login",
        ),
        (
            &["--app", "demo", "--login", "1", "--ttl", "5y"][..],
            "--ttl",
        ),
        (
            &["--app", "demo", "--login", "1", "--mode", "ctr"][..],
            "configured for mode ctr-hmac",
        ),
        (
            &["--app", "demo", "--login", "1", "--no-expiry"][..],
            "missing_field:expires",
        ),
    ] {
        let (ok, _, err) = stdout(callgate().args(base).args(extra));
        assert!(!ok, "{extra:?} was accepted");
        assert!(err.contains(want), "{extra:?}: {err}");
    }
}

#[test]
fn check_config_names_file_and_key() {
    let dir = TempDir::new("cli-check");
    let cfg = dir.write("callgate.toml", "[http]\nlisten = \"nowhere\"\n");
    dir.write("apps.toml", "[apps.crm]\nkeys = [\"abcd\"]\n");
    let (ok, _, err) = stdout(callgate().arg("check-config").arg(&cfg));
    assert!(!ok);
    assert!(
        err.contains("callgate.toml: http.listen: \"nowhere\" is not an address:port"),
        "{err}"
    );
    assert!(
        err.contains("apps.toml: apps.crm.keys[0]: is 2 bytes"),
        "{err}"
    );

    let (ok, out, err) = stdout(callgate().arg("check-config"));
    assert!(ok, "{err}");
    assert!(out.contains("<embedded default config>: OK"), "{out}");
    assert!(out.contains("public demo key"), "{out}");

    let sample = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/callgate.toml");
    let (ok, _, err) = stdout(callgate().arg("check-config").arg(sample));
    assert!(ok, "{err}");
}

/// `callgate run` with no config on a fresh machine: starts on the built-in config, logs where it
/// listens, serves, and stops cleanly on SIGTERM. Uses port 8080: run inside a private network
/// namespace (tests/run does) so nothing else holds it.
#[test]
fn run_with_no_config_starts_and_stops() {
    let dir = TempDir::new("cli-run");
    // systemd's readiness socket (Type=notify), as systemd would pass it.
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).expect("notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let notified = || {
        let mut buf = [0u8; 256];
        let n = notify.recv(&mut buf).expect("a notification in time");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut d = Daemon::spawn(
        callgate()
            .arg("run")
            .current_dir(dir.path())
            .env("NOTIFY_SOCKET", &notify_path)
            .env_remove("RUST_LOG"),
    );
    assert_eq!(notified(), "READY=1");
    let line = d.wait_for("listening", Duration::from_secs(15));
    assert!(line.contains("http=127.0.0.1:8080"), "{line}");
    assert!(
        line.contains("sip=127.0.0.1:5070") && line.contains("webrtc=127.0.0.1:10000"),
        "{line}"
    );
    assert!(
        d.seen
            .iter()
            .any(|l| l.contains("WARN") && l.contains("public demo key")),
        "{:?}",
        d.seen
    );
    let resp = http_get("127.0.0.1:8080", "/healthz");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("ok\n"), "{resp}");
    let resp = http_get("127.0.0.1:8080", "/readyz");
    assert!(
        resp.starts_with("HTTP/1.1 200") && resp.ends_with("ready\n"),
        "{resp}"
    );
    let resp = http_get("127.0.0.1:8080", "/metrics");
    assert!(
        resp.starts_with("HTTP/1.1 200")
            && resp.contains("text/plain; version=0.0.4")
            && resp.contains("\ncallgate_calls_active 0\n")
            && resp.contains("\ncallgate_sessions_awaiting_resume 0\n"),
        "{resp}"
    );
    // The SDK and its TypeScript declarations.
    let resp = http_get("127.0.0.1:8080", "/callgate.js");
    assert!(
        resp.starts_with("HTTP/1.1 200") && resp.contains("export class Callgate"),
        "{resp}"
    );
    let resp = http_get("127.0.0.1:8080", "/callgate.d.ts");
    assert!(
        resp.starts_with("HTTP/1.1 200") && resp.contains("static resume(url: string)"),
        "{resp}"
    );
    let status = d.terminate(Duration::from_secs(10));
    assert_eq!(notified(), "STOPPING=1");
    assert!(status.success(), "{status:?}");
    assert!(
        d.seen.iter().any(|l| l.contains("callgate stopped")),
        "{:?}",
        d.seen
    );
}

#[test]
fn run_reports_a_busy_port_clearly() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = holder.local_addr().expect("addr").port();
    let dir = TempDir::new("cli-busy");
    let cfg = dir.write(
        "callgate.toml",
        &format!("[http]\nlisten = \"127.0.0.1:{port}\"\n[sip]\nlisten = \"127.0.0.1:0\"\n[media]\nwebrtc_port = {}\n", free_port()),
    );
    dir.write("apps.toml", callgate::config::EMBEDDED_APPS);
    let (ok, _, err) = stdout(
        callgate()
            .arg("run")
            .arg("--config")
            .arg(cfg)
            .env_remove("RUST_LOG"),
    );
    assert!(!ok);
    assert!(
        err.contains(&format!("cannot listen on http.listen 127.0.0.1:{port}")),
        "{err}"
    );
    assert!(err.contains("change the port"), "{err}");
}

#[test]
fn json_logs() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = holder.local_addr().expect("addr").port();
    drop(holder);
    let dir = TempDir::new("cli-json");
    let cfg = dir.write(
        "callgate.toml",
        &format!("[http]\nlisten = \"127.0.0.1:{port}\"\n[sip]\nlisten = \"127.0.0.1:0\"\n[media]\nwebrtc_port = {}\n", free_port()),
    );
    dir.write("apps.toml", callgate::config::EMBEDDED_APPS);
    let mut d = Daemon::spawn(
        callgate()
            .args(["--log-format", "json", "run", "--config"])
            .arg(cfg)
            .env_remove("RUST_LOG"),
    );
    let line = d.wait_for("listening", Duration::from_secs(15));
    assert!(
        line.starts_with('{') && line.contains("\"level\":\"INFO\""),
        "{line}"
    );
    d.terminate(Duration::from_secs(10));
}

/// A free UDP port (for the media port, which must be non-zero in the config).
fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("port")
}

/// SIGHUP reloads apps.toml: an admin key added to the file works after the signal (401 before);
/// a broken file is refused with a log line and the running configuration stays.
#[test]
fn sighup_reloads_the_apps() {
    use std::io::{Read, Write};

    const ADMIN: &str = "admin-key-added-at-runtime-0123";
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    let port = holder.local_addr().expect("addr").port();
    drop(holder);
    let dir = TempDir::new("cli-hup");
    let cfg = dir.write(
        "callgate.toml",
        &format!(
            "[http]\nlisten = \"127.0.0.1:{port}\"\n[sip]\nlisten = \"127.0.0.1:0\"\n[media]\nwebrtc_port = {}\n",
            free_port()
        ),
    );
    dir.write("apps.toml", callgate::config::EMBEDDED_APPS);
    let mut d = Daemon::spawn(
        callgate()
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "info"),
    );
    d.wait_for("listening", Duration::from_secs(15));
    let admin_status = || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        write!(
            s,
            "GET /api/v1/admin/apps HTTP/1.0\r\nAuthorization: Bearer {ADMIN}\r\n\r\n"
        )
        .expect("send");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.split_whitespace().nth(1).unwrap_or_default().to_owned()
    };
    let hup = |pid: u32| {
        let _ = std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status();
    };
    assert_eq!(admin_status(), "401");
    dir.write(
        "apps.toml",
        &format!(
            "admin_keys = [\"{ADMIN}\"]\n{}",
            callgate::config::EMBEDDED_APPS
        ),
    );
    hup(d.pid());
    let line = d.wait_for("configuration reloaded", Duration::from_secs(10));
    assert!(line.contains("apps=1"), "{line}");
    assert_eq!(admin_status(), "200");
    dir.write(
        "apps.toml",
        &format!("admin_keys = [\"{ADMIN}\"]\n[apps.demo]\nkeys = [\"nothex\"]\n"),
    );
    hup(d.pid());
    let line = d.wait_for("not reloaded", Duration::from_secs(10));
    assert!(line.contains("apps.demo.keys"), "names the bad key: {line}");
    assert_eq!(admin_status(), "200", "the running configuration stays");
    let status = d.terminate(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
}
