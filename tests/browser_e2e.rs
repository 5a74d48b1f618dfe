//! The capstone: headless Chromium runs the softphone page served by callgate, logs in with a
//! token minted by callgate, calls 1002 (sipp through Kamailio, echoing RTP) and hears audio;
//! nothing the browser received contains the password. Needs Debian's `chromium` and
//! `playwright-core` in tests/browser (tests/run installs both).
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use callgate::account::account_from_cli;
use callgate::config::Config;
use callgate::server::Bound;
use common::peers::{Kamailio, Sipp, free_udp_port};
use common::{TempDir, require_tool, run_bounded};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_logs_in_and_calls_with_audio_both_ways() {
    require_tool("chromium", "apt-get install chromium");
    require_tool("node", "apt-get install nodejs");
    let kam = Kamailio::start(free_udp_port());
    let mut far = Sipp::uas_with(
        kam.port,
        "1002",
        "pass1002",
        "uas_answer.xml",
        &["-rtp_echo"],
    );

    let dir = TempDir::new("browser");
    let cfg = dir.write(
        "callgate.toml",
        &format!(
            "[http]\nlisten = \"127.0.0.1:0\"\n[sip]\nlisten = \"127.0.0.1:0\"\nregistration_grace_secs = 0\n\
             [media]\nwebrtc_port = {}\n",
            free_udp_port()
        ),
    );
    dir.write("apps.toml", "[apps.crm]\nkeys = [\"00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\"]\n");
    let config = Config::load(&cfg).unwrap();
    let acct = account_from_cli(
        "1001",
        None,
        "pass1001".into(),
        "127.0.0.1",
        None,
        Some(kam.port),
        None,
    )
    .unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let token = config
        .keyring()
        .mint("crm", &acct, Some(now + 600), [3; 16])
        .unwrap();
    let bound = Bound::bind(config).await.unwrap();
    let addr = bound.http_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(bound.serve(async {
        let _ = stopped.await;
    }));

    let shots =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/artifacts/screenshots");
    let _ = std::fs::create_dir_all(&shots);
    let out = tokio::task::spawn_blocking(move || {
        run_bounded(
            std::process::Command::new("node")
                .arg(
                    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/drive.js"),
                )
                .arg(format!("http://{addr}/"))
                .arg(&token)
                .args(["1002", "3"])
                .env("SHOTS", &shots),
            Duration::from_secs(90),
        )
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let report: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_else(|_| {
        panic!(
            "driver output: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(report.get("error").is_none(), "{report:#}\n{}", kam.log());
    assert_eq!(report["registered"], true);
    assert_eq!(
        report["agent"], "1001@127.0.0.1",
        "the page shows who is logged in"
    );
    let received = report["stats"]["packetsReceived"].as_u64().unwrap_or(0);
    let sent = report["stats"]["packetsSent"].as_u64().unwrap_or(0);
    // 3 s at 50 packets/s: the fake microphone's audio went out and came back echoed.
    assert!(
        sent >= 100 && received >= 100,
        "sent {sent}, received {received}: {:#}",
        report["stats"]
    );
    assert_eq!(report["ended"], true);
    for frame in report["frames"].as_array().unwrap() {
        assert!(!frame.as_str().unwrap().contains("pass1001"), "{frame}");
    }
    let (ok, log) = tokio::task::spawn_blocking(move || far.wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(ok, "{log}");
    stop.send(()).unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(15), server).await;
}
