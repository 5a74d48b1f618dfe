//! Registration against a real Kamailio (registrar + proxy with digest auth), verified from the
//! outside with sipp calls: 480 while callgate holds the binding, 404 once it is gone.
//! Run inside a private network namespace (tests/run).
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use callgate::account::{SipAccount, account_from_cli};
use callgate::sip::endpoint::{Endpoint, RegistrationHandle, Settings};
use callgate::sip::registration::{self, Status};
use callgate::sip::transaction::Timers;
use common::peers::{Kamailio, free_udp_port, sipp_probe};

fn account(login: &str, password: &str, port: u16) -> SipAccount {
    account_from_cli(
        login,
        None,
        password.into(),
        "127.0.0.1",
        None,
        Some(port),
        None,
    )
    .expect("account")
}

fn settings(expires: u64, grace: Duration, t1: Duration) -> Settings {
    Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        public_address: None,
        timers: Timers {
            t1,
            ..Timers::default()
        },
        registration: registration::Settings {
            expires: Duration::from_secs(expires),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(4),
            keepalive: Some(Duration::from_secs(1)),
            user_agent: "callgate-test".into(),
        },
        grace,
        max_registrations: 10,
        call_waiting: true,
        min_session_expires: Duration::from_secs(2),
        trusted_peers: Vec::new(),
        dns_server: None,
    }
}

async fn within<T>(limit: Duration, what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {limit:?}"))
}

/// Polls sipp until the probe sees `code` (the registrar's view may lag by a transaction). While
/// callgate holds the registration, the agent side (`agent`) refuses the probe call with 480.
async fn probe_until(
    port: u16,
    callee: &str,
    code: u16,
    limit: Duration,
    mut agent: Option<&mut RegistrationHandle>,
) {
    let deadline = Instant::now() + limit;
    loop {
        let mut sipp = tokio::task::spawn_blocking({
            let callee = callee.to_owned();
            move || sipp_probe(port, &callee, code)
        });
        let (ok, out) = loop {
            tokio::select! {
                r = &mut sipp => break r.expect("sipp task"),
                Some(inc) = async {
                    match agent.as_deref_mut() {
                        Some(a) => a.next_incoming().await,
                        None => std::future::pending().await,
                    }
                } => inc.call.reject(480, "Temporarily Unavailable"),
            }
        };
        if ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "sipp never saw {code} for {callee}:\n{out}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_share_and_unregister() {
    let kam = Kamailio::start(free_udp_port());
    let ep = Endpoint::bind(settings(
        60,
        Duration::from_millis(500),
        Duration::from_millis(500),
    ))
    .await
    .expect("bind");
    let mut first = ep
        .register(account("1001", "pass1001", kam.port))
        .await
        .expect("register");
    let s = within(
        Duration::from_secs(5),
        "registered",
        first.wait_for(|s| matches!(s, Status::Registered { .. })),
    )
    .await;
    assert_eq!(
        s,
        Some(Status::Registered {
            expires: 60,
            count: 1
        }),
        "{}",
        kam.log()
    );
    // Kamailio now routes calls for 1001 to callgate, whose agent side refuses this one with 480.
    probe_until(
        kam.port,
        "1001",
        480,
        Duration::from_secs(10),
        Some(&mut first),
    )
    .await;

    // A second session of the same identity joins the registration: no new REGISTER.
    let sent_before = ep.stats().sent.load(std::sync::atomic::Ordering::Relaxed);
    let second = ep
        .register(account("1001", "pass1001", kam.port))
        .await
        .expect("join");
    assert!(matches!(
        second.status(),
        Status::Registered { count: 1, .. }
    ));
    drop(first);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        matches!(second.status(), Status::Registered { count: 1, .. }),
        "still held by the second handle"
    );
    let sent_after = ep.stats().sent.load(std::sync::atomic::Ordering::Relaxed);
    // Keepalive OPTIONS (1 s) may have gone out, but no REGISTER: the count above stayed 1.
    assert!(sent_after >= sent_before);

    // Last handle gone: after the grace period callgate unregisters, and the registrar forgets us.
    drop(second);
    probe_until(kam.port, "1001", 404, Duration::from_secs(10), None).await;
    ep.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_fails_once_without_looping() {
    let kam = Kamailio::start(free_udp_port());
    let ep = Endpoint::bind(settings(60, Duration::ZERO, Duration::from_millis(500)))
        .await
        .expect("bind");
    let mut h = ep
        .register(account("1001", "not-the-password", kam.port))
        .await
        .expect("register");
    let s = within(
        Duration::from_secs(5),
        "failure",
        h.wait_for(|s| matches!(s, Status::Failed { .. })),
    )
    .await;
    match s {
        Some(Status::Failed {
            status, retrying, ..
        }) => {
            assert!(status == 401 || status == 403, "status {status}");
            assert!(!retrying);
        }
        other => panic!("{other:?}"),
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        ep.stats().sent.load(std::sync::atomic::Ordering::Relaxed),
        2,
        "REGISTER, REGISTER+auth, nothing more"
    );
    assert_eq!(
        kam.log().matches("auth failed for 1001").count(),
        1,
        "{}",
        kam.log()
    );
    drop(h);
    ep.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_before_expiry() {
    let kam = Kamailio::start(free_udp_port());
    // Ask for 4 s (Kamailio's min_expires is 2 in the test config): refreshed every 2 s.
    let ep = Endpoint::bind(settings(4, Duration::ZERO, Duration::from_millis(500)))
        .await
        .expect("bind");
    let mut h = ep
        .register(account("1001", "pass1001", kam.port))
        .await
        .expect("register");
    let t0 = Instant::now();
    within(
        Duration::from_secs(5),
        "registered",
        h.wait_for(|s| matches!(s, Status::Registered { .. })),
    )
    .await;
    let s = within(
        Duration::from_secs(8),
        "third registration",
        h.wait_for(|s| matches!(s, Status::Registered { count, .. } if *count >= 3)),
    )
    .await;
    assert!(
        matches!(s, Some(Status::Registered { expires: 4, .. })),
        "{s:?}"
    );
    // Well past the first binding's expiry, the registrar still has us.
    assert!(t0.elapsed() >= Duration::from_secs(3));
    probe_until(kam.port, "1001", 480, Duration::from_secs(5), Some(&mut h)).await;
    drop(h);
    ep.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrar_down_times_out_then_recovers() {
    let port = free_udp_port();
    // T1 = 50 ms → Timer F = 3.2 s.
    let ep = Endpoint::bind(settings(60, Duration::ZERO, Duration::from_millis(50)))
        .await
        .expect("bind");
    let mut h = ep
        .register(account("1001", "pass1001", port))
        .await
        .expect("register");
    let t0 = Instant::now();
    let s = within(
        Duration::from_secs(6),
        "timeout",
        h.wait_for(|s| matches!(s, Status::Failed { .. })),
    )
    .await;
    let elapsed = t0.elapsed();
    assert!(
        matches!(
            s,
            Some(Status::Failed {
                status: 408,
                retrying: true,
                ..
            })
        ),
        "{s:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(3100) && elapsed < Duration::from_millis(4500),
        "Timer F: {elapsed:?}"
    );
    // The registrar comes back; the back-off retry registers.
    let kam = Kamailio::start(port);
    let s = within(
        Duration::from_secs(10),
        "recovery",
        h.wait_for(|s| matches!(s, Status::Registered { .. })),
    )
    .await;
    assert!(
        matches!(s, Some(Status::Registered { .. })),
        "{s:?}\n{}",
        kam.log()
    );
    drop(h);
    ep.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_unregisters() {
    let kam = Kamailio::start(free_udp_port());
    let ep = Endpoint::bind(settings(
        60,
        Duration::from_secs(600),
        Duration::from_millis(500),
    ))
    .await
    .expect("bind");
    let mut h = ep
        .register(account("1003", "pass1003", kam.port))
        .await
        .expect("register");
    within(
        Duration::from_secs(5),
        "registered",
        h.wait_for(|s| matches!(s, Status::Registered { .. })),
    )
    .await;
    within(Duration::from_secs(10), "shutdown", ep.shutdown()).await;
    assert_eq!(h.status(), Status::Unregistered);
    probe_until(kam.port, "1003", 404, Duration::from_secs(5), None).await;
}

/// A domain with no port in the token is located through its `_sip._udp` SRV record (RFC 3263):
/// a DNS responder in the test points `sip.test` at Kamailio's port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_located_by_dns_srv() {
    use callgate::sip::dns::{Srv, build_srv_answer};
    let kam = Kamailio::start(free_udp_port());
    let dns = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    dns.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let dns_addr = dns.local_addr().unwrap();
    let kam_port = kam.port;
    let responder = std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        let (n, from) = dns.recv_from(&mut buf).expect("a DNS query");
        let query = buf[..n].to_vec();
        let asked = String::from_utf8_lossy(&query).into_owned();
        let answer = build_srv_answer(
            &query,
            &[Srv {
                priority: 10,
                weight: 1,
                port: kam_port,
                target: "127.0.0.1".into(),
            }],
        )
        .expect("answer");
        dns.send_to(&answer, from).expect("reply");
        asked
    });
    let mut s = settings(60, Duration::ZERO, Duration::from_millis(500));
    s.dns_server = Some(dns_addr);
    let ep = Endpoint::bind(s).await.expect("bind");
    let acct = account_from_cli(
        "1001",
        None,
        "pass1001".into(),
        "sip.test",
        None,
        None,
        None,
    )
    .unwrap();
    let mut h = ep.register(acct).await.expect("register via SRV");
    let st = within(
        Duration::from_secs(5),
        "registered",
        h.wait_for(|s| !matches!(s, Status::Registering)),
    )
    .await;
    assert!(
        matches!(st, Some(Status::Registered { .. })),
        "{st:?}\n{}",
        kam.log()
    );
    let asked = responder.join().expect("responder");
    assert!(
        asked.contains("_sip") && asked.contains("_udp") && asked.contains("test"),
        "{asked:?}"
    );
    drop(h);
    ep.shutdown().await;
}
