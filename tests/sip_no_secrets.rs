//! No SIP password (nor the token's plaintext) reaches a log line, at any level, while callgate
//! registers through digest challenges (success and wrong password) with a real Kamailio.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use callgate::account::account_from_cli;
use callgate::sip::endpoint::{Endpoint, Settings};
use callgate::sip::registration::{self, Status};
use callgate::sip::transaction::Timers;
use common::peers::{Kamailio, free_udp_port};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("capture lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_logged() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let kam = Kamailio::start(free_udp_port());
    let settings = Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        public_address: None,
        timers: Timers::default(),
        registration: registration::Settings {
            expires: Duration::from_secs(60),
            keepalive: Some(Duration::from_millis(500)),
            ..registration::Settings::default()
        },
        grace: Duration::ZERO,
        max_registrations: 10,
        call_waiting: true,
        min_session_expires: Duration::from_secs(2),
        trusted_peers: Vec::new(),
        dns_server: None,
    };
    let ep = Endpoint::bind(settings).await.expect("bind");
    let good = account_from_cli(
        "1001",
        None,
        "pass1001".into(),
        "127.0.0.1",
        None,
        Some(kam.port),
        None,
    )
    .unwrap();
    let bad = account_from_cli(
        "1002",
        None,
        "Wr0ng-Secret".into(),
        "127.0.0.1",
        None,
        Some(kam.port),
        None,
    )
    .unwrap();
    let mut g = ep.register(good).await.unwrap();
    let mut b = ep.register(bad).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        g.wait_for(|s| matches!(s, Status::Registered { .. })).await;
        b.wait_for(|s| matches!(s, Status::Failed { .. })).await;
    })
    .await
    .expect("outcomes");
    tokio::time::sleep(Duration::from_millis(1200)).await; // a keepalive round too
    drop((g, b));
    ep.shutdown().await;

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("registered"), "the capture works: {logs}");
    assert!(logs.contains("registration failed"), "{logs}");
    for secret in ["pass1001", "Wr0ng-Secret"] {
        assert!(
            !logs.contains(secret),
            "{secret} leaked into the logs:\n{logs}"
        );
    }
}
