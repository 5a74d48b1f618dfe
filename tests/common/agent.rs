//! A callgate SIP endpoint for tests, and agent 1001 registered through it.
#![allow(dead_code)]

use std::time::Duration;

use callgate::account::account_from_cli;
use callgate::sip::endpoint::{Endpoint, RegistrationHandle, Settings};
use callgate::sip::registration::{self, Status};
use callgate::sip::transaction::Timers;

/// Endpoint settings for tests: 127.0.0.1, an ephemeral port, no grace period.
pub fn settings() -> Settings {
    Settings {
        listen: "127.0.0.1:0".parse().expect("addr"),
        public_address: None,
        timers: Timers::default(),
        registration: registration::Settings {
            expires: Duration::from_secs(60),
            ..registration::Settings::default()
        },
        grace: Duration::ZERO,
        max_registrations: 10,
        call_waiting: true,
        min_session_expires: Duration::from_secs(90),
        trusted_peers: Vec::new(),
        dns_server: None,
    }
}

/// Binds an endpoint with `settings` and registers 1001 (password pass1001) at the registrar
/// on 127.0.0.1:`registrar_port`, waiting until it is registered.
pub async fn registered_1001(
    settings: Settings,
    registrar_port: u16,
) -> (Endpoint, RegistrationHandle) {
    let ep = Endpoint::bind(settings).await.expect("bind");
    let acct = account_from_cli(
        "1001",
        None,
        "pass1001".into(),
        "127.0.0.1",
        None,
        Some(registrar_port),
        Some("Agent One"),
    )
    .expect("account");
    let mut reg = ep.register(acct).await.expect("register");
    let s = tokio::time::timeout(
        Duration::from_secs(15),
        reg.wait_for(|s| !matches!(s, Status::Registering)),
    )
    .await
    .expect("registration in time");
    assert!(matches!(s, Some(Status::Registered { .. })), "{s:?}");
    (ep, reg)
}
