//! The browser WebSocket API against the running server and a real Kamailio: a minted token logs
//! the agent in and registers it; bad tokens are refused with their codes and register nothing;
//! the password never reaches the page.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use callgate::account::account_from_cli;
use callgate::config::Config;
use callgate::server::Bound;
use common::TempDir;
use common::peers::{Kamailio, free_udp_port};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
/// The HTTP API credentials of the test apps and of the admin.
const CRM_API_KEY: &str = "crm-api-key-0123456789abcdef";
const ERP_API_KEY: &str = "erp-api-key-0123456789abcdef";
const ADMIN_KEY: &str = "admin-key-for-tests-0123456789";

struct Server {
    addr: std::net::SocketAddr,
    config: Config,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    dir: TempDir,
}

impl Server {
    /// Stops serving and waits (15 s at most) for the server to finish.
    async fn shut_down(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send(()).unwrap();
        }
        tokio::time::timeout(Duration::from_secs(15), &mut self.task)
            .await
            .expect("shutdown")
            .unwrap();
    }
}

async fn server() -> Server {
    server_with_app_options("").await
}

async fn server_with_app_options(app_options: &str) -> Server {
    server_with(app_options, "").await
}

/// A server whose apps.toml app has `app_options`; `main_extra` goes into callgate.toml at the
/// end of its `[media]` table (more keys, or further tables).
async fn server_with(app_options: &str, main_extra: &str) -> Server {
    server_with_tables(app_options, "", "", main_extra).await
}

/// [`server_with`], plus `http_extra` and `sip_extra` keys in callgate.toml's `[http]` and
/// `[sip]` tables.
async fn server_with_tables(
    app_options: &str,
    http_extra: &str,
    sip_extra: &str,
    main_extra: &str,
) -> Server {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dir = TempDir::new("ws");
    dir.write(
        "callgate.toml",
        &format!(
            "[http]\nlisten = \"127.0.0.1:0\"\n{http_extra}\n[sip]\nlisten = \"127.0.0.1:0\"\nregistration_grace_secs = 0\n{sip_extra}\n\
             [media]\nwebrtc_port = {}\n{main_extra}\n",
            free_udp_port()
        ),
    );
    dir.write(
        "apps.toml",
        &format!(
            "admin_keys = [\"{ADMIN_KEY}\"]\n[apps.erp]\nkeys = [\"{KEY}\"]\napi_keys = [\"{ERP_API_KEY}\"]\n\
             [apps.crm]\nkeys = [\"{KEY}\"]\napi_keys = [\"{CRM_API_KEY}\"]\n{app_options}"
        ),
    );
    serve_dir(dir).await
}

/// Serves the configuration in `dir` (again, after a shutdown: the same history and queue).
async fn serve_dir(dir: TempDir) -> Server {
    let config = Config::load(&dir.path().join("callgate.toml")).expect("config");
    let bound = Bound::bind(config.clone()).await.expect("bind");
    let addr = bound.http_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        bound
            .serve(async {
                let _ = rx.await;
            })
            .await
            .expect("serve");
    });
    Server {
        addr,
        config,
        stop: Some(tx),
        task,
        dir,
    }
}

fn token(config: &Config, kam_port: u16, password: &str, ttl: i64) -> String {
    token_for(config, "crm", kam_port, password, ttl)
}

/// A token of `app` for 1001 at the registrar on `kam_port`.
fn token_for(config: &Config, app: &str, kam_port: u16, password: &str, ttl: i64) -> String {
    token_of_group(config, app, (kam_port, password), None, ttl)
}

/// [`token_for`] with the agent's `group`.
fn token_of_group(
    config: &Config,
    app: &str,
    (kam_port, password): (u16, &str),
    group: Option<&str>,
    ttl: i64,
) -> String {
    let acct = account_from_cli(
        "1001",
        None,
        password.into(),
        "127.0.0.1",
        None,
        Some(kam_port),
        None,
    )
    .and_then(|a| a.with_group(group))
    .unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    config
        .keyring()
        .mint(app, &acct, Some(now + ttl), [9; 16])
        .unwrap()
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(addr: std::net::SocketAddr) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .expect("ws connect");
    ws
}

/// A page logged in as 1001 (token for the registrar on `kam_port`), once registered.
async fn logged_in(srv: &Server, kam_port: u16, seen: &mut Vec<String>) -> Ws {
    let mut ws = open(srv.addr).await;
    let good = token(&srv.config, kam_port, "pass1001", 600);
    ws.send(Message::text(
        json!({"type": "connect", "id": 1, "token": good}).to_string(),
    ))
    .await
    .unwrap();
    loop {
        let ev = next(&mut ws, seen).await;
        if ev["type"] == "registration" && ev["state"] == "registered" {
            return ws;
        }
    }
}

/// Next JSON frame, recorded into `seen`.
async fn next(ws: &mut Ws, seen: &mut Vec<String>) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .expect("frame");
        if let Message::Text(t) = msg {
            seen.push(t.to_string());
            return serde_json::from_str(t.as_str()).expect("JSON");
        }
    }
}

/// The next frame that is not a heard digit.
async fn next_skipping_dtmf(ws: &mut Ws, seen: &mut Vec<String>) -> Value {
    loop {
        let v = next(ws, seen).await;
        if v["type"] != "dtmf" {
            return v;
        }
    }
}

/// The page places a call to `to` (request `id`) with a fresh WebRTC peer's offer; callgate must
/// accept it. Returns the peer, connected to callgate's answer, and the call id.
async fn place_call(
    ws: &mut Ws,
    seen: &mut Vec<String>,
    id: u64,
    to: &str,
) -> (common::rtc_peer::RtcPeer, String) {
    let (mut page, offer) = common::rtc_peer::RtcPeer::offer().await;
    ws.send(Message::text(
        json!({"type": "call", "id": id, "to": to, "sdp": offer}).to_string(),
    ))
    .await
    .unwrap();
    let reply = next(ws, seen).await;
    assert_eq!(reply["ok"], true, "{reply}");
    let call_id = reply["callId"].as_str().unwrap().to_owned();
    page.accept(reply["sdp"].as_str().unwrap()).await;
    (page, call_id)
}

/// The page answers ringing call `call_id` with a fresh WebRTC peer's offer (request id 2);
/// callgate must accept it. Returns the peer, connected to callgate's answer.
async fn answer_incoming(
    ws: &mut Ws,
    seen: &mut Vec<String>,
    call_id: &str,
) -> common::rtc_peer::RtcPeer {
    let (mut page, offer) = common::rtc_peer::RtcPeer::offer().await;
    ws.send(Message::text(
        json!({"type": "answer", "id": 2, "callId": call_id, "sdp": offer}).to_string(),
    ))
    .await
    .unwrap();
    let reply = loop {
        let ev = next(ws, seen).await;
        if ev["type"] == "reply" {
            break ev;
        }
    };
    assert_eq!(reply["ok"], true, "{reply}");
    page.accept(reply["sdp"].as_str().unwrap()).await;
    page
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_login_registers_and_bad_tokens_do_not() {
    let kam = Kamailio::start(free_udp_port());
    let mut srv = server().await;
    let mut seen = Vec::new();

    // A good token: reply ok, connected, then registered with Kamailio.
    let mut ws = open(srv.addr).await;
    let good = token(&srv.config, kam.port, "pass1001", 600);
    ws.send(Message::text(
        json!({"type": "connect", "id": 1, "token": good}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(
        next(&mut ws, &mut seen).await,
        json!({"type": "reply", "id": 1, "ok": true})
    );
    let connected = next(&mut ws, &mut seen).await;
    assert_eq!(connected["type"], "connected");
    assert_eq!(connected["agent"], "1001@127.0.0.1");
    assert!(connected["sessionId"].as_str().unwrap().starts_with("s-"));
    let mut told_state = false;
    loop {
        let ev = next(&mut ws, &mut seen).await;
        if ev["type"] == "agentState" {
            // The app's default state, entered at login (once, among the registration events).
            assert_eq!(
                (ev["state"].as_str(), ev["cause"].as_str()),
                (Some("available"), Some("login")),
                "{ev}"
            );
            assert!(!told_state, "{ev}");
            told_state = true;
            continue;
        }
        assert_eq!(ev["type"], "registration", "{ev}");
        if ev["state"] == "registered" {
            assert!(ev["expires"].as_u64().unwrap() > 0);
            break;
        }
        assert_eq!(ev["state"], "registering", "{ev}\n{}", kam.log());
    }
    assert!(told_state, "the page was told the agent's state at login");
    ws.send(Message::text(r#"{"type":"ping","id":2}"#))
        .await
        .unwrap();
    assert_eq!(
        next(&mut ws, &mut seen).await,
        json!({"type": "reply", "id": 2, "ok": true})
    );
    ws.send(Message::text(r#"{"type":"connect","id":3,"token":"x"}"#))
        .await
        .unwrap();
    assert_eq!(
        next(&mut ws, &mut seen).await["error"]["code"],
        "already_connected"
    );
    ws.send(Message::text("not json")).await.unwrap();
    assert_eq!(
        next(&mut ws, &mut seen).await["error"]["code"],
        "bad_request"
    );

    // Bad tokens, each on its own page: refused with the token's code, nothing registers.
    let mut tampered = token(&srv.config, kam.port, "pass1001", 600).into_bytes();
    let last = tampered.len() - 1;
    tampered[last] = if tampered[last] == b'0' { b'1' } else { b'0' };
    let cases = [
        (String::from_utf8(tampered).unwrap(), "bad_mac"),
        (
            token(&srv.config, kam.port, "pass1001", -120),
            "token_expired",
        ),
        ("nope:00".to_owned(), "unknown_app"),
    ];
    for (t, code) in cases {
        let mut bad = open(srv.addr).await;
        bad.send(Message::text(
            json!({"type": "connect", "id": 9, "token": t}).to_string(),
        ))
        .await
        .unwrap();
        let r = next(&mut bad, &mut seen).await;
        assert_eq!(r["error"]["code"], code, "{r}");
        // And nothing else follows (no connected, no registration); heartbeat pings aside.
        let quiet_until = tokio::time::Instant::now() + Duration::from_millis(300);
        while let Ok(more) = tokio::time::timeout_at(quiet_until, bad.next()).await {
            assert!(
                matches!(more, Some(Ok(Message::Ping(_)))),
                "unexpected frame after a refused token: {more:?}"
            );
        }
    }

    // The password was never in anything the pages received.
    for frame in &seen {
        assert!(!frame.contains("pass1001"), "{frame}");
    }

    let _ = ws.close(None).await;
    srv.shut_down().await;
}

/// The page calls over the API: its WebRTC offer goes in `call`, callgate's answer comes back,
/// the SIP call goes through Kamailio to sipp (which echoes RTP), and the page hears itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_calls_and_hears_the_far_end() {
    use callgate::media::rtp::RtpPacket;
    use common::peers::Sipp;

    let kam = Kamailio::start(free_udp_port());
    let mut far = Sipp::uas_with(
        kam.port,
        "1002",
        "pass1002",
        "uas_answer.xml",
        &["-rtp_echo"],
    );
    let mut srv = server().await;
    let mut seen = Vec::new();
    let mut ws = logged_in(&srv, kam.port, &mut seen).await;

    let (mut page, call_id) = place_call(&mut ws, &mut seen, 2, "1002").await;
    let mut states = Vec::new();
    while !states.contains(&"established".to_owned()) {
        let ev = next(&mut ws, &mut seen).await;
        assert_eq!(ev["type"], "call", "{ev}");
        assert_eq!(ev["callId"], call_id.as_str());
        assert_ne!(ev["state"], "ended", "{ev}\n{}", kam.log());
        states.push(ev["state"].as_str().unwrap().to_owned());
    }
    assert!(states.contains(&"ringing".to_owned()), "{states:?}");

    // One second of "microphone"; the far end echoes it back through callgate.
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let deadline = tokio::time::Instant::now() + Duration::from_millis(2000);
    let (mut sent, mut back) = (0u16, 0);
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => break,
            _ = tick.tick(), if sent < 50 => {
                let mut b = Vec::new();
                RtpPacket { marker: false, payload_type: 0, sequence: sent, timestamp: u32::from(sent) * 160, ssrc: 9, payload: &[0x5a; 160] }.write(&mut b);
                page.send(&b).await;
                sent += 1;
            }
            Some((_, p)) = page.heard.recv() => {
                if p == [0x5a; 160] {
                    back += 1;
                }
            }
        }
    }
    assert!(back >= 45, "the page heard {back} of 50 echoed packets");

    // Trickled candidates are acknowledged (callgate is ICE-lite and needs none), checked, and
    // only for the page's own calls.
    for (id, call, candidate, code) in [
        (
            10,
            call_id.as_str(),
            "candidate:1 1 udp 2130706431 127.0.0.1 50000 typ host",
            None,
        ),
        (11, call_id.as_str(), "", None),
        (
            12,
            call_id.as_str(),
            "candidate:1 1 udp",
            Some("bad_candidate"),
        ),
        (13, "c-0000000000000000", "", Some("unknown_call")),
    ] {
        ws.send(Message::text(
            json!({"type": "ice", "id": id, "callId": call, "candidate": candidate, "sdpMid": "0", "sdpMLineIndex": 0}).to_string(),
        ))
        .await
        .unwrap();
        let reply = next(&mut ws, &mut seen).await;
        assert_eq!(reply["id"], id, "{reply}");
        assert_eq!(reply["error"]["code"].as_str(), code, "{reply}");
    }

    // DTMF: sipp negotiated telephone-event/8000, so the digits go as RFC 4733 events in the
    // RTP stream (with sipp's payload type); sipp echoes them, and callgate reports each digit
    // it hears back once, and passes the events on to the page with the page's payload type.
    ws.send(Message::text(
        json!({"type": "dtmf", "id": 5, "callId": call_id, "digits": "12#"}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(
        next(&mut ws, &mut seen).await,
        json!({"type": "reply", "id": 5, "ok": true})
    );
    let mut digits = String::new();
    while digits.len() < 3 {
        let ev = next(&mut ws, &mut seen).await;
        assert_eq!(
            (ev["type"].as_str(), ev["callId"].as_str()),
            (Some("dtmf"), Some(call_id.as_str())),
            "{ev}"
        );
        digits.push_str(ev["digit"].as_str().unwrap());
    }
    assert_eq!(digits, "12#");
    let mut events_at_page = Vec::new();
    while let Ok(Some((_, p))) =
        tokio::time::timeout(Duration::from_millis(300), page.heard.recv()).await
    {
        if p.len() == 4 && p[1] & 0x80 != 0 && events_at_page.last() != Some(&p[0]) {
            events_at_page.push(p[0]);
        }
    }
    assert_eq!(
        events_at_page,
        vec![1, 2, 11],
        "telephone-event end packets at the page"
    );
    // Issue 15 item 8: 64 digits may wait (12.8 s of paused audio); a request that would pass
    // that is refused whole with a code, where before its digits were silently dropped.
    ws.send(Message::text(
        json!({"type": "dtmf", "id": 6, "callId": call_id, "digits": "1".repeat(64)}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(
        next_skipping_dtmf(&mut ws, &mut seen).await,
        json!({"type": "reply", "id": 6, "ok": true})
    );
    ws.send(Message::text(
        json!({"type": "dtmf", "id": 7, "callId": call_id, "digits": "2"}).to_string(),
    ))
    .await
    .unwrap();
    let full = next_skipping_dtmf(&mut ws, &mut seen).await;
    assert_eq!(
        (full["id"].as_u64(), full["error"]["code"].as_str()),
        (Some(7), Some("dtmf_queue_full")),
        "{full}"
    );
    // Room comes back as digits are sent (200 ms each).
    tokio::time::sleep(Duration::from_millis(700)).await;
    ws.send(Message::text(
        json!({"type": "dtmf", "id": 8, "callId": call_id, "digits": "2"}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(
        next_skipping_dtmf(&mut ws, &mut seen).await,
        json!({"type": "reply", "id": 8, "ok": true})
    );

    ws.send(Message::text(
        json!({"type": "hangup", "id": 3, "callId": call_id}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(
        next_skipping_dtmf(&mut ws, &mut seen).await,
        json!({"type": "reply", "id": 3, "ok": true})
    );
    let ended = next_skipping_dtmf(&mut ws, &mut seen).await;
    assert_eq!(
        (ended["state"].as_str(), ended["endReason"].as_str()),
        (Some("ended"), Some("local_hangup")),
        "{ended}"
    );
    // The history row has figures of both legs: the SIP side's and the page's (50 sent).
    let row = finished_row(srv.addr, &call_id).await;
    assert!(
        row["packetsReceived"].as_u64().unwrap_or(0) >= 45
            && row["packetsSent"].as_u64().unwrap_or(0) >= 45,
        "{row}"
    );
    assert_eq!(
        (
            row["pagePacketsReceived"].as_u64(),
            row["pagePacketsLost"].as_u64()
        ),
        (Some(50), Some(0)),
        "{row}"
    );
    assert!(
        row["pageJitterMs"].as_f64().is_some_and(|j| j < 20.0),
        "{row}"
    );
    for frame in &seen {
        assert!(!frame.contains("pass1001"), "{frame}");
    }
    let (ok, log) = tokio::task::spawn_blocking(move || far.wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(ok, "{log}");
    let _ = ws.close(None).await;
    page.pc.close().await.unwrap();
    srv.shut_down().await;
}

/// Incoming calls over the API: the page is told, answers with its WebRTC offer and hears the
/// caller (sipp echoing RTP); the caller hangs up. A second caller is rejected by the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_answers_and_rejects_incoming_calls() {
    use callgate::media::rtp::RtpPacket;
    use common::peers::Sipp;

    let kam = Kamailio::start(free_udp_port());
    let mut srv = server().await;
    let mut seen = Vec::new();
    let mut ws = logged_in(&srv, kam.port, &mut seen).await;

    let mut caller = Sipp::uac_with(kam.port, "1001", "uac_answered_long.xml", &["-rtp_echo"]);
    let incoming = loop {
        let ev = next(&mut ws, &mut seen).await;
        if ev["type"] == "incoming" {
            break ev;
        }
    };
    assert_eq!(incoming["from"], "1002", "{incoming}");
    let call_id = incoming["callId"].as_str().unwrap().to_owned();
    let mut page = answer_incoming(&mut ws, &mut seen, &call_id).await;

    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let (mut sent, mut back, mut ended) = (0u16, 0, None);
    while ended.is_none() {
        tokio::select! {
            _ = tick.tick(), if sent < 100 => {
                let mut b = Vec::new();
                RtpPacket { marker: false, payload_type: 0, sequence: sent, timestamp: u32::from(sent) * 160, ssrc: 4, payload: &[0x6b; 160] }.write(&mut b);
                page.send(&b).await;
                sent += 1;
            }
            Some((_, p)) = page.heard.recv() => {
                if p == [0x6b; 160] {
                    back += 1;
                }
            }
            ev = next(&mut ws, &mut seen) => {
                if ev["type"] == "call" && ev["state"] == "ended" {
                    ended = Some(ev);
                }
            }
        }
    }
    let ended = ended.unwrap();
    assert_eq!(ended["endReason"], "remote_hangup", "{ended}");
    assert!(
        back >= 25,
        "the page heard {back} echoed packets before the caller hung up"
    );
    let (ok, log) = tokio::task::spawn_blocking(move || caller.wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(ok, "{log}");

    // A second caller: the page rejects; the caller sees 486.
    let port = kam.port;
    let probe = tokio::task::spawn_blocking(move || common::peers::sipp_probe(port, "1001", 486));
    let incoming = loop {
        let ev = next(&mut ws, &mut seen).await;
        if ev["type"] == "incoming" {
            break ev;
        }
    };
    let id2 = incoming["callId"].as_str().unwrap().to_owned();
    ws.send(Message::text(
        json!({"type": "reject", "id": 3, "callId": id2}).to_string(),
    ))
    .await
    .unwrap();
    let (ok, log) = probe.await.unwrap();
    assert!(ok, "caller did not get 486:\n{log}");

    // A third caller gives up while the page rings: `missed`, then the call ends `missed`.
    let mut quitter = Sipp::uac(kam.port, "1001", "uac_cancel.xml");
    let id3 = loop {
        let ev = next(&mut ws, &mut seen).await;
        if ev["type"] == "incoming" {
            break ev["callId"].as_str().unwrap().to_owned();
        }
    };
    let missed = loop {
        let ev = next(&mut ws, &mut seen).await;
        if ev["type"] == "missed" {
            break ev;
        }
    };
    assert_eq!(
        missed,
        json!({"type": "missed", "callId": id3, "from": "1002"})
    );
    let ended = next(&mut ws, &mut seen).await;
    assert_eq!(
        (ended["callId"].as_str(), ended["endReason"].as_str()),
        (Some(id3.as_str()), Some("missed")),
        "{ended}"
    );
    let (ok, log) = tokio::task::spawn_blocking(move || quitter.wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(ok, "{log}");
    let _ = ws.close(None).await;
    page.pc.close().await.unwrap();
    srv.shut_down().await;
}

/// Blind transfer over the API: the page calls baresip (1002) and transfers it to 1003 (sipp);
/// baresip follows the REFER, 1003 really gets the call, and the page's call ends `transferred`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_transfers_a_call() {
    use common::peers::{Baresip, Sipp};

    let kam = Kamailio::start(free_udp_port());
    let mut third = Sipp::uas(kam.port, "1003", "pass1003", "uas_hangup.xml");
    let transferee = Baresip::start(kam.port, "1002", "pass1002");
    let mut srv = server().await;
    let mut seen = Vec::new();
    let mut ws = logged_in(&srv, kam.port, &mut seen).await;
    let (page, call_id) = place_call(&mut ws, &mut seen, 2, "1002").await;
    loop {
        let ev = next(&mut ws, &mut seen).await;
        assert_ne!(ev["state"], "ended", "{ev}\n{}", transferee.log());
        if ev["state"] == "established" {
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let target = format!("sip:1003@127.0.0.1:{}", kam.port);
    ws.send(Message::text(
        json!({"type": "transfer", "id": 3, "callId": call_id, "to": target}).to_string(),
    ))
    .await
    .unwrap();
    let mut transfer_states = Vec::new();
    let ended = loop {
        let ev = next(&mut ws, &mut seen).await;
        if ev["type"] == "transfer" {
            transfer_states.push(ev["state"].as_str().unwrap().to_owned());
        }
        if ev["type"] == "call" && ev["state"] == "ended" {
            break ev;
        }
    };
    assert!(
        transfer_states.contains(&"accepted".to_owned()),
        "{transfer_states:?}"
    );
    assert!(
        transfer_states.contains(&"succeeded".to_owned()),
        "{transfer_states:?}"
    );
    assert_eq!(ended["endReason"], "transferred", "{ended}");
    let (ok, log) = tokio::task::spawn_blocking(move || third.wait(Duration::from_secs(15)))
        .await
        .unwrap();
    assert!(ok, "1003 did not get the transferred call:\n{log}");
    let _ = ws.close(None).await;
    page.pc.close().await.unwrap();
    srv.shut_down().await;
}

/// The far end transfers the agent (an inbound REFER, `sip.accept_refer = true`): sipp 1002
/// calls the page, which answers; sipp REFERs it to 1003. callgate calls 1003 (with Referred-By),
/// NOTIFYs sipp of the progress until 200, and the page's call goes on with 1003 under the same
/// call id: the page hears 1003's echo, its received sequence numbers run on without a jump, and
/// its hang-up reaches 1003.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn far_end_transfers_the_page_to_a_third_party() {
    use callgate::media::rtp::RtpPacket;
    use common::peers::Sipp;

    let kam = Kamailio::start(free_udp_port());
    let mut target = Sipp::uas_with(
        kam.port,
        "1003",
        "pass1003",
        "uas_referred.xml",
        &["-rtp_echo", "-trace_logs"],
    );
    let mut srv = server_with_tables("", "", "accept_refer = true", "").await;
    let mut seen = Vec::new();
    let mut ws = logged_in(&srv, kam.port, &mut seen).await;
    let mut transferor = Sipp::uac_with(
        kam.port,
        "1001",
        "uac_refers.xml",
        &["-rtp_echo", "-trace_logs"],
    );
    let incoming = loop {
        let ev = next(&mut ws, &mut seen).await;
        if ev["type"] == "incoming" {
            break ev;
        }
    };
    let call_id = incoming["callId"].as_str().unwrap().to_owned();
    let mut page = answer_incoming(&mut ws, &mut seen, &call_id).await;

    // Talk all along: 0x6b until the transfer succeeded, then 0x3c, which only 1003 can echo
    // (callgate no longer sends to the transferor).
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let (mut sent, mut from_target, mut pattern) = (0u16, 0, 0x6bu8);
    let mut referred = Vec::new();
    let mut seqs = Vec::new();
    let mut with_target = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while from_target < 25 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no echo from 1003; referred: {referred:?}\n{}",
            kam.log()
        );
        tokio::select! {
            _ = tick.tick() => {
                let mut b = Vec::new();
                RtpPacket { marker: false, payload_type: 0, sequence: sent, timestamp: u32::from(sent) * 160, ssrc: 4, payload: &[pattern; 160] }.write(&mut b);
                page.send(&b).await;
                sent = sent.wrapping_add(1);
            }
            Some((seq, p)) = page.heard.recv() => {
                if p.len() == 160 {
                    seqs.push(seq);
                }
                if p == [0x3c; 160] {
                    from_target += 1;
                }
            }
            ev = next(&mut ws, &mut seen) => {
                assert_eq!(ev["callId"], call_id.as_str(), "{ev}");
                assert_ne!(ev["state"], "ended", "{ev}\nreferred: {referred:?}");
                if ev["type"] == "referred" {
                    referred.push(ev["state"].as_str().unwrap().to_owned());
                    if ev["state"] == "accepted" {
                        assert_eq!(ev["to"], format!("sip:1003@127.0.0.1:{}", kam.port), "{ev}");
                    }
                }
                // The call's established event with 1003 and the REFER's success may come in
                // either order: both tell that 1003 is on the line.
                if ev["type"] == "call" && ev["state"] == "established" && ev["peer"] == "1003" {
                    with_target = true;
                }
                if with_target && referred.contains(&"succeeded".to_owned()) {
                    pattern = 0x3c;
                }
            }
        }
    }
    assert_eq!(referred.first().map(String::as_str), Some("accepted"));
    assert_eq!(referred.last().map(String::as_str), Some("succeeded"));
    // One stream at the page across both far ends: no jump back or ahead beyond a lost packet.
    for w in seqs.windows(2) {
        let step = w[1].wrapping_sub(w[0]);
        assert!(
            (1..=3).contains(&step),
            "sequence numbers at the page jump {} -> {}",
            w[0],
            w[1]
        );
    }
    let (ok, log) = tokio::task::spawn_blocking(move || transferor.wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(ok, "the transferor's scenario: {log}");
    assert!(log.contains("FRAG 100"), "{log}");
    assert!(log.contains("FRAG 200"), "{log}");

    ws.send(Message::text(
        json!({"type": "hangup", "id": 3, "callId": call_id}).to_string(),
    ))
    .await
    .unwrap();
    let ended = loop {
        let ev = next(&mut ws, &mut seen).await;
        if ev["type"] == "call" && ev["state"] == "ended" {
            break ev;
        }
    };
    assert_eq!(ended["callId"], call_id.as_str());
    assert_eq!(ended["endReason"], "local_hangup", "{ended}");
    let (ok, log) = tokio::task::spawn_blocking(move || target.wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(ok, "1003 got the call and our BYE: {log}");
    assert!(
        log.lines().any(
            |l| l.starts_with("REFERRED-BY") && l.trim_end().ends_with(" <sip:1002@127.0.0.1>")
        ),
        "the INVITE to 1003 names the transferor in Referred-By: {log}"
    );
    let _ = ws.close(None).await;
    page.pc.close().await.unwrap();
    srv.shut_down().await;
}

/// A page that goes away (reload, network change) keeps its session for `http.resume_secs`: a
/// new socket resumes it with the session id, gets its registration and the call back, sends a
/// new WebRTC offer for the call and hears the far end again, while the SIP call stays up
/// throughout. A session not resumed in time ends, and its call gets a BYE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_resumes_its_session_and_call() {
    use callgate::media::rtp::RtpPacket;
    use common::peers::Sipp;
    use common::rtc_peer::RtcPeer;

    /// Talks for `ms` with `pattern`; returns how many packets came back.
    async fn talk(page: &mut RtcPeer, pattern: u8, ms: u64) -> usize {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
        let (mut sent, mut back) = (0u16, 0);
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => return back,
                _ = tick.tick() => {
                    let mut b = Vec::new();
                    RtpPacket { marker: false, payload_type: 0, sequence: sent, timestamp: u32::from(sent) * 160, ssrc: u32::from(pattern), payload: &[pattern; 160] }.write(&mut b);
                    page.send(&b).await;
                    sent += 1;
                }
                Some((_, p)) = page.heard.recv() => {
                    if p == [pattern; 160] {
                        back += 1;
                    }
                }
            }
        }
    }

    let kam = Kamailio::start(free_udp_port());
    let mut far = Sipp::uas_with(
        kam.port,
        "1002",
        "pass1002",
        "uas_answer.xml",
        &["-rtp_echo"],
    );
    let mut srv = server_with_tables("", "resume_secs = 3", "", "").await;
    let mut seen = Vec::new();
    let mut ws = logged_in(&srv, kam.port, &mut seen).await;
    let session_id = connected_field(&seen, "sessionId");
    assert!(session_id.len() >= 34, "128 random bits: {session_id}");
    let (mut page, call_id) = place_call(&mut ws, &mut seen, 2, "1002").await;
    loop {
        let ev = next(&mut ws, &mut seen).await;
        assert_ne!(ev["state"], "ended", "{ev}");
        if ev["state"] == "established" {
            break;
        }
    }
    assert!(
        talk(&mut page, 0x11, 1000).await >= 20,
        "audio before the reload"
    );

    // The page reloads: socket and peer connection gone without a goodbye.
    drop(ws);
    page.pc.close().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut ws = open(srv.addr).await;
    ws.send(Message::text(
        json!({"type": "resume", "id": 1, "sessionId": "s-00000000000000000000000000000000"})
            .to_string(),
    ))
    .await
    .unwrap();
    let refused = next(&mut ws, &mut seen).await;
    assert_eq!(refused["error"]["code"], "unknown_session", "{refused}");
    ws.send(Message::text(
        json!({"type": "resume", "id": 2, "sessionId": session_id}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(
        next(&mut ws, &mut seen).await,
        json!({"type": "reply", "id": 2, "ok": true})
    );
    let connected = next(&mut ws, &mut seen).await;
    assert_eq!(
        (connected["type"].as_str(), connected["sessionId"].as_str()),
        (Some("connected"), Some(session_id.as_str())),
        "{connected}"
    );
    let reg = next(&mut ws, &mut seen).await;
    assert_eq!(reg["state"], "registered", "{reg}");
    let state = next(&mut ws, &mut seen).await;
    assert_eq!(
        (state["type"].as_str(), state["state"].as_str()),
        (Some("agentState"), Some("available")),
        "the resumed page is told the agent's state: {state}"
    );
    let call = next(&mut ws, &mut seen).await;
    assert_eq!(
        (call["callId"].as_str(), call["state"].as_str()),
        (Some(call_id.as_str()), Some("established")),
        "{call}"
    );
    let (mut page, offer) = RtcPeer::offer().await;
    ws.send(Message::text(
        json!({"type": "media", "id": 3, "callId": call_id, "sdp": offer}).to_string(),
    ))
    .await
    .unwrap();
    let reply = next(&mut ws, &mut seen).await;
    assert_eq!(reply["ok"], true, "{reply}");
    page.accept(reply["sdp"].as_str().unwrap()).await;
    let back = talk(&mut page, 0x22, 1500).await;
    assert!(back >= 25, "the resumed page heard {back} echoed packets");

    // Gone again, for good this time: after resume_secs the call is hung up.
    drop(ws);
    page.pc.close().await.unwrap();
    let (ok, log) = tokio::task::spawn_blocking(move || far.wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(ok, "sipp got the BYE of the expired session: {log}");
    for frame in &seen {
        assert!(!frame.contains("pass1001"), "{frame}");
    }
    srv.shut_down().await;
}

/// Heartbeats and close codes: a page that answers callgate's pings stays connected; one that
/// answers nothing for three intervals is closed with 4008; `logout` closes with 4000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_pages_are_closed_and_logout_says_so() {
    async fn close_code(ws: &mut Ws) -> Option<u16> {
        loop {
            match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| u16::from(f.code)),
                Ok(Some(Ok(_))) => {}
                _ => return None,
            }
        }
    }

    let mut srv = server_with_tables("", "heartbeat_secs = 1", "", "").await;
    // Reading (tungstenite answers each ping with a pong as it reads): still open after 4 s.
    let mut alive = open(srv.addr).await;
    let until = tokio::time::Instant::now() + Duration::from_secs(4);
    let mut pings = 0;
    while let Ok(frame) = tokio::time::timeout_at(until, alive.next()).await {
        match frame {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("a live page was sent {other:?}"),
        }
    }
    assert!(pings >= 3, "{pings} pings in 4 s");
    alive
        .send(Message::text(json!({"type": "ping", "id": 1}).to_string()))
        .await
        .unwrap();
    let mut seen = Vec::new();
    assert_eq!(next(&mut alive, &mut seen).await["ok"], true);

    alive
        .send(Message::text(
            json!({"type": "logout", "id": 2}).to_string(),
        ))
        .await
        .unwrap();
    assert_eq!(
        next(&mut alive, &mut seen).await,
        json!({"type": "reply", "id": 2, "ok": true})
    );
    assert_eq!(close_code(&mut alive).await, Some(4000));
    // A page that answers nothing (a raw socket that completes the handshake, then only
    // listens): closed with 4008 after three intervals.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
        tcp.write_all(
            format!(
                "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                srv.addr
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut bytes = Vec::new();
        tokio::time::timeout(Duration::from_secs(8), tcp.read_to_end(&mut bytes))
            .await
            .expect("closed within 8 s")
            .unwrap();
        let head_end = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert!(bytes.starts_with(b"HTTP/1.1 101"));
        // Server frames are unmasked: opcode byte, 7-bit length (small frames), payload.
        let mut frames = &bytes[head_end..];
        let mut close = None;
        while frames.len() >= 2 {
            let (op, len) = (frames[0] & 0x0f, usize::from(frames[1] & 0x7f));
            let payload = &frames[2..2 + len];
            if op == 0x8 {
                close = Some((
                    u16::from_be_bytes([payload[0], payload[1]]),
                    String::from_utf8_lossy(&payload[2..]).into_owned(),
                ));
            }
            frames = &frames[2 + len..];
        }
        assert_eq!(close, Some((4008, "heartbeat timeout".to_owned())));
    }

    srv.shut_down().await;
}

/// Consult and attended transfer over the API: the page calls 1002, `consult`s 1003 (1002 is
/// held), then `completeTransfer`: 1002 gets a REFER whose Replaces names exactly the page's
/// dialog with 1003 (both sipps log it), and both of the page's calls end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_consults_then_completes_an_attended_transfer() {
    use common::peers::Sipp;
    use common::rtc_peer::RtcPeer;

    let kam = Kamailio::start(free_udp_port());
    let mut transferee = Sipp::uas_with(
        kam.port,
        "1002",
        "pass1002",
        "uas_transferee.xml",
        &["-trace_logs"],
    );
    let mut target = Sipp::uas_with(
        kam.port,
        "1003",
        "pass1003",
        "uas_consulted.xml",
        &["-trace_logs"],
    );
    let mut srv = server().await;
    let mut seen = Vec::new();
    let mut ws = logged_in(&srv, kam.port, &mut seen).await;
    let (first_page, first) = place_call(&mut ws, &mut seen, 2, "1002").await;
    while next(&mut ws, &mut seen).await["state"] != "established" {}
    let (mut consult_page, offer) = RtcPeer::offer().await;
    ws.send(Message::text(
        json!({"type": "consult", "id": 3, "callId": first, "to": "1003", "sdp": offer})
            .to_string(),
    ))
    .await
    .unwrap();
    let reply = next(&mut ws, &mut seen).await;
    assert_eq!(reply["ok"], true, "{reply}");
    let consult = reply["callId"].as_str().unwrap().to_owned();
    assert_ne!(consult, first);
    consult_page.accept(reply["sdp"].as_str().unwrap()).await;
    let (mut first_held, mut consult_up) = (false, false);
    while !(first_held && consult_up) {
        let ev = next(&mut ws, &mut seen).await;
        assert_ne!(ev["state"], "ended", "{ev}");
        first_held |= ev["callId"] == first.as_str() && ev["state"] == "held";
        consult_up |= ev["callId"] == consult.as_str() && ev["state"] == "established";
    }
    ws.send(Message::text(
        json!({"type": "completeTransfer", "id": 4, "callId": first, "consultId": consult})
            .to_string(),
    ))
    .await
    .unwrap();
    let mut ended = std::collections::HashMap::new();
    let mut transfer = Vec::new();
    while ended.len() < 2 {
        let ev = next(&mut ws, &mut seen).await;
        if ev["type"] == "transfer" {
            transfer.push(ev["state"].as_str().unwrap().to_owned());
        }
        if ev["state"] == "ended" {
            ended.insert(
                ev["callId"].as_str().unwrap().to_owned(),
                ev["endReason"].as_str().unwrap().to_owned(),
            );
        }
    }
    assert_eq!(
        transfer.last().map(String::as_str),
        Some("succeeded"),
        "{transfer:?}"
    );
    assert_eq!(ended[&first], "transferred");
    assert_eq!(ended[&consult], "local_hangup");
    let ((c_ok, c_log), (b_ok, b_log)) = tokio::task::spawn_blocking(move || {
        (
            transferee.wait(Duration::from_secs(10)),
            target.wait(Duration::from_secs(10)),
        )
    })
    .await
    .unwrap();
    assert!(c_ok, "transferee: {c_log}");
    assert!(b_ok, "target: {b_log}");
    let words = |log: &str, tag: &str| -> Vec<String> {
        log.lines()
            .find_map(|l| l.strip_prefix(tag))
            .unwrap_or_else(|| panic!("no {tag} line in {log}"))
            .split_whitespace()
            .map(|w| w.replace("%40", "@").replace("%3A", ":"))
            .collect()
    };
    assert_eq!(words(&c_log, "REPLACES "), words(&b_log, "DIALOG "));
    let _ = ws.close(None).await;
    first_page.pc.close().await.unwrap();
    consult_page.pc.close().await.unwrap();
    srv.shut_down().await;
}

/// The CRM's view: per-agent events over SSE. Two subscribers (the app's key, the agent's own
/// credential) share the agent's channel and see a real call's events with the same ids; one
/// that drops out and comes back with `Last-Event-ID` gets exactly what it missed. The owner
/// rule: 401 without a credential, 403 for another agent's or another app's agent, 200 for the
/// admin; the subscriber limit answers 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crm_subscribers_share_the_agents_events_and_replay_what_they_missed() {
    use common::peers::Sipp;
    use common::sse::Sse;

    /// The `call` states (with their ids) up to `until`; every event's data must be free of
    /// session credentials.
    async fn call_states(s: &mut Sse, until: &str) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        loop {
            let ev = s.next(Duration::from_secs(10)).await.expect("an event");
            let text = ev.data.to_string();
            assert!(
                !text.contains("apiToken") && !text.contains("sessionId") && !text.contains("at-"),
                "{text}"
            );
            if ev.data["type"] == "call" {
                let state = ev.data["state"].as_str().unwrap().to_owned();
                out.push((ev.id.expect("an id"), state.clone()));
                if state == until {
                    return out;
                }
            }
        }
    }

    let kam = Kamailio::start(free_udp_port());
    let mut far = Sipp::uas(kam.port, "1002", "pass1002", "uas_answer.xml");
    let mut srv = server_with_tables("", "", "", "[events]\nmax_subscribers = 3").await;
    let mut seen = Vec::new();
    let mut ws = logged_in(&srv, kam.port, &mut seen).await;
    let api_token = api_token_of(&seen);
    let path = "/api/v1/agents/1001@127.0.0.1/events";
    let mut crm = Sse::open(srv.addr, path, Some(CRM_API_KEY), None).await;
    let mut own = Sse::open(srv.addr, path, Some(&api_token), None).await;
    assert_eq!((crm.status, own.status), (200, 200));

    let (page, call_id) = place_call(&mut ws, &mut seen, 2, "1002").await;
    while next(&mut ws, &mut seen).await["state"] != "established" {}
    let crm_seen = call_states(&mut crm, "established").await;
    let own_seen = call_states(&mut own, "established").await;
    assert_eq!(crm_seen, own_seen, "one channel, the same events and ids");
    assert_eq!(crm_seen.first().map(|e| e.1.as_str()), Some("trying"));
    let last_seen = crm_seen.last().unwrap().0;
    drop(crm);

    ws.send(Message::text(
        json!({"type": "hangup", "id": 3, "callId": call_id}).to_string(),
    ))
    .await
    .unwrap();
    let ended = call_states(&mut own, "ended").await;
    let mut back = Sse::open(srv.addr, path, Some(CRM_API_KEY), Some(last_seen)).await;
    assert_eq!(back.status, 200);
    assert_eq!(
        call_states(&mut back, "ended").await,
        ended,
        "replayed after Last-Event-ID {last_seen}"
    );

    // The call is in the history, once the page's follower wrote it.
    async fn api(addr: std::net::SocketAddr, path: &str, bearer: Option<&str>) -> (u16, Value) {
        let r = Sse::open(addr, path, bearer, None).await;
        (r.status, r.body().await)
    }
    let row = format!("/api/v1/calls/{call_id}");
    let mut tries = 0;
    let call = loop {
        let (status, body) = api(srv.addr, &row, Some(CRM_API_KEY)).await;
        // The row exists from the call's start; its end is written just after the call ends.
        if (status == 200 && body["endReason"] != "in_progress") || tries == 20 {
            assert_eq!(status, 200, "{body}");
            break body;
        }
        tries += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(call["agent"], "1001@127.0.0.1", "{call}");
    assert_eq!(
        (
            call["direction"].as_str(),
            call["from"].as_str(),
            call["to"].as_str()
        ),
        (Some("outbound"), Some("1001@127.0.0.1"), Some("1002")),
        "{call}"
    );
    assert_eq!(call["endReason"], "local_hangup", "{call}");
    assert_eq!(call["app"], "crm");
    assert!(
        call["sipCallId"].as_str().unwrap().ends_with("@callgate"),
        "{call}"
    );
    let (started, answered, ended_at) = (
        call["startedAt"].as_i64().unwrap(),
        call["answeredAt"].as_i64().unwrap(),
        call["endedAt"].as_i64().unwrap(),
    );
    assert!(started <= answered && answered <= ended_at, "{call}");
    assert_eq!(call["durationMs"].as_i64().unwrap(), ended_at - answered);
    let (status, listed) = api(
        srv.addr,
        "/api/v1/calls?agent=1001%40127.0.0.1&limit=10",
        Some(&api_token),
    )
    .await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["calls"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed["calls"][0]["callId"], call_id.as_str());
    let (status, stats) = api(
        srv.addr,
        "/api/v1/agents/1001@127.0.0.1/stats?from=0",
        Some(ADMIN_KEY),
    )
    .await;
    assert_eq!(status, 200, "{stats}");
    assert_eq!(
        (
            stats["callsOut"].as_u64(),
            stats["callsIn"].as_u64(),
            stats["answered"].as_u64()
        ),
        (Some(1), Some(0), Some(1)),
        "{stats}"
    );
    // The owner rule on the history, every endpoint.
    for (path, bearer, want) in [
        (row.as_str(), None, 401),
        (row.as_str(), Some(ERP_API_KEY), 403),
        (row.as_str(), Some(api_token.as_str()), 200),
        (row.as_str(), Some(ADMIN_KEY), 200),
        ("/api/v1/calls/c-0000000000000000", Some(ADMIN_KEY), 404),
        ("/api/v1/calls", None, 401),
        (
            "/api/v1/calls?agent=1002%40127.0.0.1",
            Some(api_token.as_str()),
            403,
        ),
        (
            "/api/v1/calls?agent=1001%40127.0.0.1",
            Some(ERP_API_KEY),
            403,
        ),
        (
            "/api/v1/calls?agent=nobody%40127.0.0.1",
            Some(CRM_API_KEY),
            404,
        ),
        ("/api/v1/calls?limit=0", Some(CRM_API_KEY), 400),
        ("/api/v1/calls?bogus=1", Some(CRM_API_KEY), 400),
        ("/api/v1/agents/1001@127.0.0.1/stats", None, 401),
        (
            "/api/v1/agents/1002@127.0.0.1/stats",
            Some(api_token.as_str()),
            403,
        ),
        (
            "/api/v1/agents/1001@127.0.0.1/stats",
            Some(ERP_API_KEY),
            403,
        ),
        (
            "/api/v1/agents/nobody@127.0.0.1/stats",
            Some(ADMIN_KEY),
            404,
        ),
        (
            "/api/v1/agents/1001@127.0.0.1/stats?from=yesterday",
            Some(ADMIN_KEY),
            400,
        ),
    ] {
        let (status, body) = api(srv.addr, path, bearer).await;
        assert_eq!(status, want, "{path} with {bearer:?}: {body}");
    }
    let (_, erp_page) = api(srv.addr, "/api/v1/calls", Some(ERP_API_KEY)).await;
    assert_eq!(
        erp_page["calls"],
        json!([]),
        "another app's key lists none of crm's calls"
    );

    // The owner rule.
    let refused = Sse::open(srv.addr, path, None, None).await;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.body().await["error"]["code"], "unauthorized");
    let r = Sse::open(srv.addr, path, Some("not-a-known-credential-000000"), None).await;
    assert_eq!(r.status, 401);
    let other_agent = "/api/v1/agents/1002@127.0.0.1/events";
    let r = Sse::open(srv.addr, other_agent, Some(&api_token), None).await;
    assert_eq!(r.status, 403, "an agent sees only its own events");
    let r = Sse::open(srv.addr, path, Some(ERP_API_KEY), None).await;
    assert_eq!(r.status, 403, "another app's key");
    let admin = Sse::open(srv.addr, path, Some(ADMIN_KEY), None).await;
    assert_eq!(admin.status, 200);
    // own, back, admin: the channel is full.
    let r = Sse::open(srv.addr, path, Some(CRM_API_KEY), None).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.body().await["error"]["code"], "too_many_subscribers");
    let metrics = {
        let addr = srv.addr.to_string();
        tokio::task::spawn_blocking(move || common::http_get(&addr, "/metrics"))
            .await
            .unwrap()
    };
    assert!(
        metrics.contains("\ncallgate_sse_subscribers 3\n"),
        "{metrics}"
    );

    let (ok, log) = tokio::task::spawn_blocking(move || far.wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(ok, "{log}");
    drop((own, back, admin));
    let _ = ws.close(None).await;
    page.pc.close().await.unwrap();
    srv.shut_down().await;
}

/// Recording (`record = true`): the page talks to baresip, which plays 440 Hz, while the page's
/// "microphone" sends 1 kHz. The call's WAV, fetched through the API, is stereo with the agent's
/// 1 kHz on the left and the far end's 440 Hz on the right; Range requests get 206; the owner
/// rule holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_call_has_the_agent_left_and_the_far_end_right() {
    use callgate::media::g711::ulaw_encode;
    use callgate::media::rtp::RtpPacket;
    use common::peers::{Baresip, dominant_frequency};
    use common::sse::get_raw;

    let kam = Kamailio::start(free_udp_port());
    let far = Baresip::start(kam.port, "1002", "pass1002");
    let mut srv = server_with("record = true", "").await;
    let mut seen = Vec::new();
    let mut ws = logged_in(&srv, kam.port, &mut seen).await;
    let (page, call_id) = place_call(&mut ws, &mut seen, 2, "1002").await;
    loop {
        let ev = next(&mut ws, &mut seen).await;
        assert_ne!(ev["state"], "ended", "{ev}\n{}", far.log());
        if ev["state"] == "established" {
            break;
        }
    }
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for n in 0u16..150 {
        tick.tick().await;
        let payload: Vec<u8> = (0..160)
            .map(|i| {
                let t = f64::from(u32::from(n) * 160 + i) / 8000.0;
                ulaw_encode(((t * 1000.0 * 2.0 * std::f64::consts::PI).sin() * 8000.0) as i16)
            })
            .collect();
        let mut b = Vec::new();
        RtpPacket {
            marker: n == 0,
            payload_type: 0,
            sequence: n,
            timestamp: u32::from(n) * 160,
            ssrc: 7,
            payload: &payload,
        }
        .write(&mut b);
        page.send(&b).await;
    }
    ws.send(Message::text(
        json!({"type": "hangup", "id": 3, "callId": call_id}).to_string(),
    ))
    .await
    .unwrap();
    while next(&mut ws, &mut seen).await["state"] != "ended" {}

    let row = format!("/api/v1/calls/{call_id}");
    let mut recording = Value::Null;
    for _ in 0..30 {
        let (status, _, body) = get_raw(srv.addr, &row, Some(CRM_API_KEY), "").await;
        if status == 200 {
            recording = serde_json::from_slice::<Value>(&body).unwrap()["recording"].clone();
            if !recording.is_null() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(recording, format!("{call_id}.wav"));
    // The writer finishes its last second after the call.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let path = format!("{row}/recording");
    let (status, head, wav) = get_raw(srv.addr, &path, Some(CRM_API_KEY), "").await;
    assert_eq!(status, 200, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: audio/wav"),
        "{head}"
    );
    assert_eq!(&wav[..4], b"RIFF");
    assert_eq!(u16::from_le_bytes([wav[22], wav[23]]), 2, "stereo");
    let frames: Vec<(i16, i16)> = wav[44..]
        .chunks_exact(4)
        .map(|c| {
            (
                i16::from_le_bytes([c[0], c[1]]),
                i16::from_le_bytes([c[2], c[3]]),
            )
        })
        .collect();
    assert!(frames.len() >= 8000 * 2, "{} frames", frames.len());
    let left: Vec<i16> = frames.iter().map(|f| f.0).collect();
    let right: Vec<i16> = frames.iter().map(|f| f.1).collect();
    let (lf, ls) = dominant_frequency(&left);
    let (rf, rs) = dominant_frequency(&right);
    assert!(
        (lf - 1000.0).abs() <= 20.0 && ls > 0.3,
        "left (agent): {lf} Hz, {ls}"
    );
    assert!(
        (rf - 440.0).abs() <= 20.0 && rs > 0.3,
        "right (far end): {rf} Hz, {rs}"
    );

    let (status, head, part) =
        get_raw(srv.addr, &path, Some(CRM_API_KEY), "Range: bytes=0-43\r\n").await;
    assert_eq!(status, 206, "{head}");
    assert_eq!(part, wav[..44]);
    assert!(
        head.contains(&format!("bytes 0-43/{}", wav.len())),
        "{head}"
    );
    for (bearer, want) in [(None, 401), (Some(ERP_API_KEY), 403)] {
        let (status, _, _) = get_raw(srv.addr, &path, bearer, "").await;
        assert_eq!(status, want, "{bearer:?}");
    }
    let (status, _, _) = get_raw(
        srv.addr,
        "/api/v1/calls/c-0000000000000000/recording",
        Some(ADMIN_KEY),
        "",
    )
    .await;
    assert_eq!(status, 404);
    let _ = ws.close(None).await;
    page.pc.close().await.unwrap();
    srv.shut_down().await;
}

/// Key administration without a restart: the admin lists apps (fingerprints, never keys),
/// rotates crm's key (new first, old kept), then drops the old one, and deletes the erp app.
/// Each change is in force for the next login at once, apps.toml on disk is rewritten with
/// mode 0600, and a change that would break the configuration is refused with the file left
/// as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_rotates_and_removes_keys_without_a_restart() {
    use callgate::api::admin::fingerprint;
    use common::sse::request;

    const NEW_KEY: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";
    // A registrar, so the logins' registrations come and go quickly.
    let kam = Kamailio::start(free_udp_port());
    let mut srv = server().await;
    let apps_path = srv.dir.path().join("apps.toml");
    let cfg_path = srv.dir.path().join("callgate.toml");
    let (old_fp, new_fp) = (fingerprint(KEY), fingerprint(NEW_KEY));
    let admin = Some(ADMIN_KEY);

    let (status, list) = request(srv.addr, "GET", "/api/v1/admin/apps", admin, None).await;
    assert_eq!(status, 200, "{list}");
    let crm = list["apps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["app"] == "crm")
        .unwrap()
        .clone();
    assert_eq!(crm["keys"], json!([old_fp]), "{crm}");
    assert!(!list.to_string().contains(KEY), "keys never leave callgate");
    for (bearer, want) in [(None, 401), (Some(CRM_API_KEY), 403)] {
        let (status, _) = request(srv.addr, "GET", "/api/v1/admin/apps", bearer, None).await;
        assert_eq!(status, want);
    }

    // A login with the old key, then rotation: new key first, old kept.
    let login = |t: String| async move {
        let mut ws = open(srv.addr).await;
        ws.send(Message::text(
            json!({"type": "connect", "id": 1, "token": t}).to_string(),
        ))
        .await
        .unwrap();
        let mut seen = Vec::new();
        let reply = next(&mut ws, &mut seen).await;
        let _ = ws.close(None).await;
        reply
    };
    let old_token = token(&srv.config, kam.port, "pass1001", 600);
    assert_eq!(login(old_token.clone()).await["ok"], true);
    let (status, crm) = request(
        srv.addr,
        "PUT",
        "/api/v1/admin/apps/crm",
        admin,
        Some(&json!({"keys": [NEW_KEY, old_fp]})),
    )
    .await;
    assert_eq!(status, 200, "{crm}");
    assert_eq!(crm["keys"], json!([new_fp, old_fp]));
    let on_disk = std::fs::read_to_string(&apps_path).unwrap();
    assert!(
        on_disk.contains(NEW_KEY) && on_disk.contains(KEY),
        "{on_disk}"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&apps_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let rotated = Config::load(&cfg_path).expect("the rewritten files load");
    let new_token = token(&rotated, kam.port, "pass1001", 600);
    assert_eq!(
        login(new_token.clone()).await["ok"],
        true,
        "the new key works at once"
    );
    assert_eq!(
        login(old_token.clone()).await["ok"],
        true,
        "the old one until removed"
    );

    // The CRM has moved: drop the old key.
    let (status, crm) = request(
        srv.addr,
        "PUT",
        "/api/v1/admin/apps/crm",
        admin,
        Some(&json!({"keys": [new_fp]})),
    )
    .await;
    assert_eq!((status, crm["keys"].clone()), (200, json!([new_fp])));
    assert_eq!(login(old_token).await["error"]["code"], "bad_mac");
    assert_eq!(login(new_token).await["ok"], true);

    // Refused changes leave the file alone.
    let before = std::fs::read_to_string(&apps_path).unwrap();
    for body in [
        json!({"keys": ["fp:0000000000000000"]}),
        json!({"keys": ["not-hex"]}),
        json!({"keys": []}),
        json!({"key": NEW_KEY}),
    ] {
        let (status, r) = request(
            srv.addr,
            "PUT",
            "/api/v1/admin/apps/crm",
            admin,
            Some(&body),
        )
        .await;
        assert_eq!(status, 400, "{body}: {r}");
    }
    assert_eq!(std::fs::read_to_string(&apps_path).unwrap(), before);

    // Removing an app: its tokens and API keys stop working.
    let (status, _) = request(srv.addr, "DELETE", "/api/v1/admin/apps/erp", admin, None).await;
    assert_eq!(status, 200);
    let (status, _) = request(srv.addr, "GET", "/api/v1/admin/apps/erp", admin, None).await;
    assert_eq!(status, 404);
    let (status, _) = request(srv.addr, "DELETE", "/api/v1/admin/apps/erp", admin, None).await;
    assert_eq!(status, 404);
    let (status, _) = request(srv.addr, "GET", "/api/v1/calls", Some(ERP_API_KEY), None).await;
    assert_eq!(status, 401, "the removed app's API key");
    srv.shut_down().await;
}

/// docs/openapi.json and the server agree: the documented paths are exactly the HTTP API routes
/// of src/api/http.rs (besides the page, the SDK and /ws, documented in docs/API.md), each one
/// answers on a running server, and the server serves the document itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_matches_the_routes() {
    use common::sse::Sse;

    let doc: Value = serde_json::from_str(include_str!("../docs/openapi.json")).unwrap();
    let documented: std::collections::BTreeSet<String> =
        doc["paths"].as_object().unwrap().keys().cloned().collect();
    let code = include_str!("../src/api/http.rs");
    let routed: std::collections::BTreeSet<String> = code
        .split(".route(")
        .skip(1)
        .filter_map(|piece| piece.trim_start().strip_prefix('"'))
        .filter_map(|rest| rest.split('"').next())
        .filter(|p| !["/", "/callgate.js", "/callgate.d.ts", "/favicon.ico", "/ws"].contains(p))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        documented, routed,
        "docs/openapi.json vs the routes of src/api/http.rs"
    );

    let mut srv = server().await;
    for path in &documented {
        let concrete = path
            .replace("{agent}", "nobody@example.com")
            .replace("{callId}", "c-0000000000000000");
        let r = Sse::open(srv.addr, &concrete, Some(ADMIN_KEY), None).await;
        let status = r.status;
        if doc["paths"][path].get("get").is_none() {
            // Routed for other methods only (PUT .../state, checked by its own test).
            assert_eq!(status, 405, "{concrete}");
        } else if status == 404 {
            // Our own 404 (no such agent or call) is JSON; a missing route is not.
            assert_eq!(r.body().await["error"]["code"], "not_found", "{concrete}");
        } else {
            assert!([200, 503].contains(&status), "{concrete}: {status}");
        }
    }
    let served = Sse::open(srv.addr, "/api/v1/openapi.json", None, None).await;
    assert_eq!(served.status, 200);
    assert_eq!(served.body().await, doc);
    srv.shut_down().await;
}

/// Refused tokens are counted per address: after 10 in a minute even a good token is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_rate_limited() {
    let mut srv = server().await;
    let mut seen = Vec::new();
    let mut ws = open(srv.addr).await;
    for i in 0..10 {
        ws.send(Message::text(
            json!({"type": "connect", "id": i, "token": "crm:00"}).to_string(),
        ))
        .await
        .unwrap();
        assert_eq!(
            next(&mut ws, &mut seen).await["error"]["code"],
            "malformed_token"
        );
    }
    let good = token(&srv.config, free_udp_port(), "pass1001", 600);
    let mut other = open(srv.addr).await;
    other
        .send(Message::text(
            json!({"type": "connect", "id": 99, "token": good}).to_string(),
        ))
        .await
        .unwrap();
    assert_eq!(
        next(&mut other, &mut seen).await["error"]["code"],
        "rate_limited"
    );
    srv.shut_down().await;
}

/// An app with `allowed_origins` only logs in pages from those origins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_are_checked() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut srv =
        server_with_app_options("allowed_origins = [\"https://crm.example.com\"]\n").await;
    let mut seen = Vec::new();
    let good = token(&srv.config, free_udp_port(), "pass1001", 600);
    for (origin, want_ok) in [
        (None, false),
        (Some("https://evil.example"), false),
        (Some("https://crm.example.com"), true),
    ] {
        let mut req = format!("ws://{}/ws", srv.addr)
            .into_client_request()
            .unwrap();
        if let Some(o) = origin {
            req.headers_mut().insert("Origin", o.parse().unwrap());
        }
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        ws.send(Message::text(
            json!({"type": "connect", "id": 1, "token": good}).to_string(),
        ))
        .await
        .unwrap();
        let r = next(&mut ws, &mut seen).await;
        if want_ok {
            assert_eq!(r["ok"], true, "{origin:?}: {r}");
        } else {
            assert_eq!(r["error"]["code"], "origin_not_allowed", "{origin:?}: {r}");
        }
    }
    srv.shut_down().await;
}

/// A far end that answers and then sends no media (a dead peer, a broken NAT): callgate hangs
/// up after `media.timeout_secs`, sends BYE, and tells the page why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_far_end_is_hung_up_after_the_media_timeout() {
    use common::peers::Sipp;

    let kam = Kamailio::start(free_udp_port());
    // No -rtp_echo: sipp answers and stays silent; it expects our BYE.
    let mut far = Sipp::uas(kam.port, "1002", "pass1002", "uas_answer.xml");
    let mut srv = server_with("", "timeout_secs = 2").await;
    let mut seen = Vec::new();
    let mut ws = logged_in(&srv, kam.port, &mut seen).await;
    let (page, call_id) = place_call(&mut ws, &mut seen, 2, "1002").await;
    let started = tokio::time::Instant::now();
    let mut established = false;
    let ended = loop {
        let ev = next(&mut ws, &mut seen).await;
        established |= ev["state"] == "established";
        if ev["state"] == "ended" {
            break ev;
        }
    };
    assert!(established, "the call was answered first");
    assert_eq!(ended["endReason"], "media_timeout", "{ended}");
    // Silence is measured from the answer as callgate saw it (the call's history row): the
    // page may read `established` late (here: while its own WebRTC connection comes up).
    let token = api_token_of(&seen);
    let mut row = Value::Null;
    for _ in 0..20 {
        let r = common::sse::Sse::open(
            srv.addr,
            &format!("/api/v1/calls/{call_id}"),
            Some(&token),
            None,
        )
        .await;
        if r.status == 200 {
            row = r.body().await;
            // The row exists from the call's start: wait for its end.
            if row["endReason"] != "in_progress" {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let silent_for = Duration::from_millis(row["durationMs"].as_u64().expect("a history row"));
    assert!(
        silent_for >= Duration::from_millis(1900) && started.elapsed() < Duration::from_secs(8),
        "hung up {silent_for:?} after the answer"
    );
    let (ok, log) = tokio::task::spawn_blocking(move || far.wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(ok, "sipp got our BYE: {log}");
    let _ = ws.close(None).await;
    page.pc.close().await.unwrap();
    srv.shut_down().await;
}

/// The app's dial plan: a national number typed by the agent reaches the far end in E.164 (sipp
/// is registered as +49301234567 at Kamailio, so only the normalised number finds it); denied
/// prefixes and, when the app says so, SIP URIs are refused with their codes before any SIP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_plan_normalises_and_refuses() {
    use common::peers::Sipp;

    let kam = Kamailio::start(free_udp_port());
    let mut far = Sipp::uas(kam.port, "+49301234567", "pass4930", "uas_hangup.xml");
    let mut srv = server_with_app_options(
        "[apps.crm.dial_plan]\ncountry_code = \"49\"\ndeny_prefixes = [\"+49900\"]\nallow_uris = false\n",
    )
    .await;
    let mut seen = Vec::new();
    let mut ws = logged_in(&srv, kam.port, &mut seen).await;
    for (id, to, code) in [
        (2, "0900 1234567", "destination_denied"),
        (3, "sip:1002@127.0.0.1", "uri_not_allowed"),
        (4, "+49 30 12ab", "bad_destination"),
    ] {
        ws.send(Message::text(
            json!({"type": "call", "id": id, "to": to, "sdp": "v=0"}).to_string(),
        ))
        .await
        .unwrap();
        let reply = next(&mut ws, &mut seen).await;
        assert_eq!(reply["error"]["code"], code, "{to}: {reply}");
    }
    let (page, _call_id) = place_call(&mut ws, &mut seen, 5, "030 123 45-67").await;
    let mut states = Vec::new();
    loop {
        let ev = next(&mut ws, &mut seen).await;
        states.push(ev["state"].as_str().unwrap_or_default().to_owned());
        if ev["state"] == "ended" {
            // uas_hangup answers, then hangs up itself.
            assert_eq!(ev["endReason"], "remote_hangup", "{ev}\n{}", kam.log());
            break;
        }
    }
    assert!(states.contains(&"established".to_owned()), "{states:?}");
    let (ok, log) = tokio::task::spawn_blocking(move || far.wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(ok, "{log}");
    let _ = ws.close(None).await;
    page.pc.close().await.unwrap();
    srv.shut_down().await;
}

/// Shutdown with a call up: callgate turns not-ready (/readyz 503), refuses new calls, lets the
/// call go on for `service.drain_secs`, then hangs it up (BYE) and stops. /metrics counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_calls_then_hangs_up() {
    use common::http_get;
    use common::peers::Sipp;

    let kam = Kamailio::start(free_udp_port());
    let mut far = Sipp::uas(kam.port, "1002", "pass1002", "uas_answer.xml");
    let mut srv = server_with("", "[service]\ndrain_secs = 2").await;
    let addr = srv.addr.to_string();
    let mut seen = Vec::new();
    let mut ws = logged_in(&srv, kam.port, &mut seen).await;
    let (page, call_id) = place_call(&mut ws, &mut seen, 2, "1002").await;
    while next(&mut ws, &mut seen).await["state"] != "established" {}

    let get = |path: &'static str| {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || http_get(&addr, path))
    };
    let metrics = get("/metrics").await.unwrap();
    for line in [
        "callgate_calls_active 1",
        "callgate_agent_sessions 1",
        "callgate_calls_started_total{direction=\"outbound\"} 1",
        "callgate_registrations{state=\"registered\"} 1",
        "callgate_call_setup_seconds_count 1",
        "callgate_calls{state=\"established\"} 1",
        "callgate_calls{state=\"trying\"} 0",
        "callgate_calls{state=\"ringing\"} 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    assert!(!metrics.contains("pass1001"));

    let stop_at = tokio::time::Instant::now();
    srv.stop.take().unwrap().send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ready = get("/readyz").await.unwrap();
    assert!(
        ready.starts_with("HTTP/1.1 503") && ready.ends_with("draining\n"),
        "{ready}"
    );
    ws.send(Message::text(
        json!({"type": "call", "id": 3, "to": "1002", "sdp": "v=0"}).to_string(),
    ))
    .await
    .unwrap();
    let refused = next(&mut ws, &mut seen).await;
    assert_eq!(refused["error"]["code"], "unavailable", "{refused}");
    // A new incoming call is turned away too, with 503 (which Kamailio, as a proxy must, passes
    // upstream as 500 once it has no other target: RFC 3261 §16.7), while the drained call goes
    // on.
    let port = kam.port;
    let (ok, log) =
        tokio::task::spawn_blocking(move || common::peers::sipp_probe(port, "1001", 500))
            .await
            .unwrap();
    assert!(ok, "a caller during the drain is refused:\n{log}");
    let ended = loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), next(&mut ws, &mut seen))
            .await
            .expect("the call ends after the drain");
        if ev["state"] == "ended" {
            break ev;
        }
    };
    let drained_for = stop_at.elapsed();
    assert_eq!(ended["endReason"], "local_hangup", "{ended}");
    assert!(
        drained_for >= Duration::from_millis(1900),
        "hung up {drained_for:?} after the signal, before the 2 s drain"
    );
    tokio::time::timeout(Duration::from_secs(15), &mut srv.task)
        .await
        .expect("shutdown")
        .unwrap();
    // The call hung up at shutdown is in the history on disk (written before serve returned,
    // that is before the process would exit).
    let db = srv.dir.path().join("data/calls.sqlite");
    let history = callgate::cdr::CdrStore::open(&db).expect("the history exists");
    let row = history
        .get(&call_id)
        .await
        .unwrap()
        .expect("a row for the drained call");
    assert_eq!(row.end_reason, "local_hangup", "{row:?}");
    assert!(
        row.answered_at.is_some() && row.duration_ms >= 1900,
        "{row:?}"
    );
    let (ok, log) = tokio::task::spawn_blocking(move || far.wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(ok, "sipp got our BYE: {log}");
    page.pc.close().await.unwrap();
}

/// The `apiToken` of the `connected` event among `seen` frames.
fn api_token_of(seen: &[String]) -> String {
    connected_field(seen, "apiToken")
}

/// Field `name` of the `connected` event among `seen` frames.
fn connected_field(seen: &[String], name: &str) -> String {
    seen.iter()
        .filter_map(|f| serde_json::from_str::<Value>(f).ok())
        .find(|v| v["type"] == "connected")
        .and_then(|v| v[name].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("connected with {name}"))
}

/// Registration identity: another app's token naming crm's live agent 1001 with a wrong password
/// (what a rogue CRM could mint) joins nothing. Its registration is its own and refused by
/// Kamailio; its `apiToken` reads none of crm's calls, recordings, stats or events; the agent's
/// next incoming call rings crm's page only; crm's registration still refreshes with the right
/// password; and erp's API key cannot subscribe to or read crm's agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_apps_token_with_a_wrong_password_gets_nothing_of_a_live_agent() {
    use common::peers::Sipp;
    use common::sse::Sse;

    let kam = Kamailio::start(free_udp_port());
    let far = Sipp::uas(kam.port, "1002", "pass1002", "uas_answer.xml");
    let mut srv = server_with_tables("record = true", "", "register_expires_secs = 10", "").await;
    let mut seen = Vec::new();
    let mut victim = logged_in(&srv, kam.port, &mut seen).await;
    let victim_token = api_token_of(&seen);
    // A call in crm's history (and a recording of it).
    let (_page, call_id) = place_call(&mut victim, &mut seen, 2, "1002").await;
    while next(&mut victim, &mut seen).await["state"] != "established" {}
    victim
        .send(Message::text(
            json!({"type": "hangup", "id": 3, "callId": call_id}).to_string(),
        ))
        .await
        .unwrap();
    while next(&mut victim, &mut seen).await["state"] != "ended" {}

    async fn api(addr: std::net::SocketAddr, path: &str, bearer: &str) -> (u16, Value) {
        let r = Sse::open(addr, path, Some(bearer), None).await;
        (r.status, r.body().await)
    }
    let row = format!("/api/v1/calls/{call_id}");
    // Before any erp login: erp's key cannot open or read crm's agent.
    for path in [
        row.as_str(),
        "/api/v1/agents/1001@127.0.0.1/stats",
        "/api/v1/agents/1001@127.0.0.1/events",
    ] {
        let (status, body) = api(srv.addr, path, ERP_API_KEY).await;
        assert_eq!(status, 403, "{path} with erp's key: {body}");
    }

    // erp's token for the same address, wrong password.
    let mut rogue = open(srv.addr).await;
    let bad = token_for(&srv.config, "erp", kam.port, "guessed-password", 600);
    rogue
        .send(Message::text(
            json!({"type": "connect", "id": 1, "token": bad}).to_string(),
        ))
        .await
        .unwrap();
    let mut rogue_seen = Vec::new();
    loop {
        let ev = next(&mut rogue, &mut rogue_seen).await;
        assert_ne!(ev["type"], "incoming", "{ev}");
        if ev["type"] == "registration" && ev["state"] == "failed" {
            break;
        }
        assert_ne!(
            ev["state"], "registered",
            "the registrar accepted a wrong password: {ev}"
        );
    }
    let rogue_token = api_token_of(&rogue_seen);
    assert_ne!(rogue_token, victim_token);

    let recording = format!("{row}/recording");
    for path in [
        "/api/v1/calls",
        row.as_str(),
        recording.as_str(),
        "/api/v1/agents/1001@127.0.0.1/stats",
        "/api/v1/agents/1001@127.0.0.1/events",
    ] {
        let (status, body) = api(srv.addr, path, &rogue_token).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert_eq!(body["error"]["code"], "not_registered", "{path}: {body}");
    }
    // erp's key now has an agent 1001 of its own (the rogue's session): it sees that one's
    // figures and events, none of crm's.
    let (status, body) = api(srv.addr, &row, ERP_API_KEY).await;
    assert_eq!(status, 403, "crm's call with erp's key: {body}");
    let (status, stats) = api(srv.addr, "/api/v1/agents/1001@127.0.0.1/stats", ERP_API_KEY).await;
    assert_eq!(
        (status, stats["callsOut"].as_u64()),
        (200, Some(0)),
        "{stats}"
    );
    let mut erp_events = Sse::open(
        srv.addr,
        "/api/v1/agents/1001@127.0.0.1/events",
        Some(ERP_API_KEY),
        None,
    )
    .await;
    assert_eq!(erp_events.status, 200);
    let (status, listed) = api(srv.addr, "/api/v1/calls?limit=10", ERP_API_KEY).await;
    assert_eq!((status, &listed["calls"]), (200, &json!([])), "{listed}");
    // The victim's own credential still reads its call.
    let (status, body) = api(srv.addr, &row, &victim_token).await;
    assert_eq!(status, 200, "{body}");

    // The agent's next caller rings crm's page, not the rogue's.
    let mut caller = Sipp::uac(kam.port, "1001", "uac_cancel.xml");
    let rang = loop {
        let ev = next(&mut victim, &mut seen).await;
        if ev["type"] == "incoming" {
            break ev;
        }
    };
    while next(&mut victim, &mut seen).await["state"] != "ended" {}
    let (ok, log) = tokio::task::spawn_blocking(move || caller.wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(ok, "{log}");
    assert_eq!(rang["from"], "1002", "{rang}");
    while let Some(ev) = erp_events.next(Duration::from_millis(500)).await {
        assert_ne!(
            ev.data["type"], "incoming",
            "crm's call reached erp's subscriber: {ev:?}"
        );
        assert_ne!(
            ev.data["type"], "call",
            "crm's call reached erp's subscriber: {ev:?}"
        );
    }
    while let Ok(Some(Ok(Message::Text(t)))) =
        tokio::time::timeout(Duration::from_millis(500), rogue.next()).await
    {
        assert!(
            !t.contains("\"incoming\""),
            "the rogue page was offered the call: {t}"
        );
    }

    // crm's registration refreshes (10 s expiry) with its own password.
    let refreshed = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let ev = next_within(&mut victim, &mut seen, Duration::from_secs(15)).await;
            if ev["type"] == "registration" {
                break ev;
            }
        }
    })
    .await
    .expect("a refresh within the expiry");
    assert_eq!(refreshed["state"], "registered", "{refreshed}");

    drop((rogue, victim, erp_events));
    srv.shut_down().await;
    drop(far);
}

/// [`next`] with a longer wait.
async fn next_within(ws: &mut Ws, seen: &mut Vec<String>, limit: Duration) -> Value {
    loop {
        let msg = tokio::time::timeout(limit, ws.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .expect("frame");
        if let Message::Text(t) = msg {
            seen.push(t.to_string());
            return serde_json::from_str(t.as_str()).expect("JSON");
        }
    }
}

/// A `resume` while the session's old socket is still open (a second tab, or a reconnect before
/// the old socket's end was noticed) takes the session over: the old socket is closed with 4001
/// `resumed elsewhere`, the new one gets the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_takes_over_a_session_whose_old_socket_is_open() {
    let kam = Kamailio::start(free_udp_port());
    let mut srv = server().await;
    let mut seen = Vec::new();
    let mut old = logged_in(&srv, kam.port, &mut seen).await;
    let session_id = connected_field(&seen, "sessionId");
    let mut new = open(srv.addr).await;
    new.send(Message::text(
        json!({"type": "resume", "id": 1, "sessionId": session_id}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(
        next(&mut new, &mut seen).await,
        json!({"type": "reply", "id": 1, "ok": true})
    );
    assert_eq!(next(&mut new, &mut seen).await["type"], "connected");
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(5), old.next())
            .await
            .expect("the old socket hears in time")
        {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    let frame = closed.expect("a close code");
    assert_eq!(
        (u16::from(frame.code), frame.reason.as_str()),
        (4001, "resumed elsewhere")
    );
    // The new socket is the session's page now.
    new.send(Message::text(
        json!({"type": "logout", "id": 2}).to_string(),
    ))
    .await
    .unwrap();
    let reply = loop {
        let ev = next(&mut new, &mut seen).await;
        if ev["type"] == "reply" {
            break ev;
        }
    };
    assert_eq!(
        (reply["id"].as_u64(), reply["ok"].as_bool()),
        (Some(2), Some(true))
    );
    drop((old, new));
    srv.shut_down().await;
}

/// What a raw TCP client reads until the server closes (or 5 s pass).
async fn read_until_closed(s: &mut tokio::net::TcpStream) -> (String, Duration) {
    use tokio::io::AsyncReadExt;
    let started = tokio::time::Instant::now();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

/// `connect` with `token` on a new socket; the reply's error code, or "ok".
async fn connect_code(srv: &Server, token: &str, seen: &mut Vec<String>) -> (Ws, String) {
    let mut ws = open(srv.addr).await;
    ws.send(Message::text(
        json!({"type": "connect", "id": 1, "token": token}).to_string(),
    ))
    .await
    .unwrap();
    let reply = next(&mut ws, seen).await;
    let code = reply["error"]["code"].as_str().unwrap_or("ok").to_owned();
    (ws, code)
}

/// Slow-loris and flooding clients: a header that trickles is cut off at
/// `http.header_timeout_secs`; connections past `http.max_connections_per_ip` get 503
/// `too_many_connections` and the place comes back when one closes; an agent's sessions past
/// `http.max_sessions_per_agent` get `too_many_sessions`, and the place comes back at logout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_and_session_limits_refuse_with_their_codes() {
    use tokio::io::AsyncWriteExt;
    let mut srv = server_with_tables(
        "",
        "trusted_proxies = []\nheader_timeout_secs = 1\nmax_connections_per_ip = 3\nmax_sessions_per_agent = 2",
        "",
        "",
    )
    .await;
    let mut seen = Vec::new();

    // A header never finished: closed after about a second, unanswered.
    let mut slow = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (got, took) = read_until_closed(&mut slow).await;
    assert!(
        took < Duration::from_secs(4) && took >= Duration::from_millis(800),
        "a trickling header was cut off after {took:?}: {got:?}"
    );
    assert!(!got.contains("200 OK"), "{got}");
    drop(slow);

    // Two sessions of agent 1001 (no registrar needed: the limit holds before registering).
    let good = token(&srv.config, free_udp_port(), "pass1001", 600);
    let (mut first, code) = connect_code(&srv, &good, &mut seen).await;
    assert_eq!(code, "ok");
    let (_second, code) = connect_code(&srv, &good, &mut seen).await;
    assert_eq!(code, "ok");
    let (mut third, code) = connect_code(&srv, &good, &mut seen).await;
    assert_eq!(code, "too_many_sessions", "{seen:?}");

    // Three sockets open from 127.0.0.1: the fourth connection is refused.
    let mut fourth = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    fourth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (got, _) = read_until_closed(&mut fourth).await;
    assert!(got.starts_with("HTTP/1.1 503"), "{got}");
    assert!(got.to_ascii_lowercase().contains("retry-after: 5"), "{got}");
    assert!(got.contains("\"too_many_connections\""), "{got}");

    // The first page logs out: its session's place and its socket's are given back.
    first
        .send(Message::text(
            json!({"type": "logout", "id": 2}).to_string(),
        ))
        .await
        .unwrap();
    while first.next().await.is_some_and(|m| m.is_ok()) {}
    drop(first);
    let mut freed = false;
    for i in 0..50 {
        third
            .send(Message::text(
                json!({"type": "connect", "id": 10 + i, "token": good}).to_string(),
            ))
            .await
            .unwrap();
        let reply = next(&mut third, &mut seen).await;
        if reply["ok"] == true {
            freed = true;
            break;
        }
        assert_eq!(reply["error"]["code"], "too_many_sessions");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(freed, "the logged-out session's place never came back");
    let addr = srv.addr.to_string();
    let health = tokio::task::spawn_blocking(move || common::http_get(&addr, "/healthz"))
        .await
        .unwrap();
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    srv.shut_down().await;
}

/// A page that sends but never reads: once its socket cannot take more, the frame in
/// progress times out and callgate closes the socket instead of holding its task forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_that_never_reads_is_let_go() {
    let mut srv = server().await;
    let addr = srv.addr.to_string();
    let websockets = || {
        let addr = addr.clone();
        async move {
            let m = tokio::task::spawn_blocking(move || common::http_get(&addr, "/metrics"))
                .await
                .unwrap();
            m.lines()
                .find_map(|l| l.strip_prefix("callgate_websocket_sessions "))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        }
    };
    // A small receive window, so that replies back up quickly.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(srv.addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{}/ws", srv.addr), tcp)
        .await
        .unwrap();
    assert_eq!(websockets().await, "1");
    // Pings whose replies are never read, until callgate stops taking them (its replies
    // filled both buffers) or 20 s pass.
    let ping = json!({"type": "ping", "id": 1}).to_string();
    let flood = async {
        loop {
            if ws.send(Message::text(ping.clone())).await.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(20), flood).await;
    let mut closed = false;
    for _ in 0..300 {
        if websockets().await == "0" {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(closed, "a socket that is never read stayed open");
    drop(ws);
    srv.shut_down().await;
}

/// Captured tokens: an app with `single_use` takes each token once (`token_replayed` after,
/// and the replay counts toward the bad-token limit), and one with `max_lifetime_secs` refuses
/// tokens minted to live longer. An app kept in mode `ctr` is counted by /metrics and named in
/// the admin API's warnings at each reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_tokens_do_not_log_in_again() {
    use common::sse::request;
    let mut srv = server_with_app_options(&format!(
        "single_use = true\nmax_lifetime_secs = 900\n[apps.old]\nkeys = [\"{KEY}\"]\nmode = \"ctr\"\n"
    ))
    .await;
    let mut seen = Vec::new();
    let port = free_udp_port();

    let once = token(&srv.config, port, "pass1001", 600);
    let (first, code) = connect_code(&srv, &once, &mut seen).await;
    assert_eq!(code, "ok", "{seen:?}");
    drop(first);
    // Again, while the first session lives and after it is gone: refused both times.
    let (_ws, code) = connect_code(&srv, &once, &mut seen).await;
    assert_eq!(code, "token_replayed", "{seen:?}");
    // (The helper mints with a fixed IV: another expiry makes another token. A lifetime only a
    // second shorter made the same expiry whenever a second boundary passed between the two
    // mints, and the "fresh" token was the first one again.)
    let fresh = token(&srv.config, port, "pass1001", 500);
    let (_ws, code) = connect_code(&srv, &fresh, &mut seen).await;
    assert_eq!(code, "ok", "a fresh token logs in: {seen:?}");

    // Minted for an hour where the app allows 15 minutes.
    let long = token(&srv.config, port, "pass1001", 3600);
    let (_ws, code) = connect_code(&srv, &long, &mut seen).await;
    assert_eq!(code, "invalid_field:expires", "{seen:?}");
    assert!(
        !seen.iter().any(|f| f.contains("pass1001")),
        "no password in any reply: {seen:?}"
    );

    let addr = srv.addr.to_string();
    let metrics = tokio::task::spawn_blocking(move || common::http_get(&addr, "/metrics"))
        .await
        .unwrap();
    assert!(
        metrics.lines().any(|l| l == "callgate_apps_insecure 1"),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l == "callgate_token_failures_total{code=\"token_replayed\"} 1"),
        "{metrics}"
    );

    // Rotating the ctr app's key through the admin API: the reload warns about its mode.
    let (status, old) = request(
        srv.addr,
        "GET",
        "/api/v1/admin/apps/old",
        Some(ADMIN_KEY),
        None,
    )
    .await;
    assert_eq!(status, 200, "{old}");
    let (status, put) = request(
        srv.addr,
        "PUT",
        "/api/v1/admin/apps/old",
        Some(ADMIN_KEY),
        Some(&json!({"keys": old["keys"]})),
    )
    .await;
    assert_eq!(status, 200, "{put}");
    let warnings = put["warnings"].to_string();
    assert!(
        warnings.contains("\\\"old\\\" uses mode \\\"ctr\\\""),
        "{put}"
    );
    let (_, crm) = request(
        srv.addr,
        "GET",
        "/api/v1/admin/apps/crm",
        Some(ADMIN_KEY),
        None,
    )
    .await;
    assert_eq!(
        (crm["singleUse"].clone(), crm["maxLifetimeSecs"].clone()),
        (json!(true), json!(900)),
        "{crm}"
    );
    srv.shut_down().await;
}

/// A crash mid-call loses nothing: callgate is SIGKILLed during a recorded call; at its next
/// start the call is in the history as `interrupted`, answered, with its recording, which is
/// served and holds the audio recorded until the crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_cut_off_by_a_crash_stays_in_the_history() {
    use common::Daemon;
    use common::peers::Sipp;
    use common::sse::{get_raw, request};

    let kam = Kamailio::start(free_udp_port());
    let _far = Sipp::uas_with(
        kam.port,
        "1002",
        "pass1002",
        "uas_answer.xml",
        &["-rtp_echo"],
    );
    let dir = TempDir::new("crash");
    let http = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap();
    let cfg = dir.write(
        "callgate.toml",
        &format!(
            "[http]\nlisten = \"{http}\"\n[sip]\nlisten = \"127.0.0.1:0\"\nregistration_grace_secs = 0\n\
             [media]\nwebrtc_port = {}\n",
            free_udp_port()
        ),
    );
    dir.write(
        "apps.toml",
        &format!("[apps.crm]\nkeys = [\"{KEY}\"]\napi_keys = [\"{CRM_API_KEY}\"]\nrecord = true\n"),
    );
    let config = Config::load(&cfg).expect("config");
    let start = || {
        let mut d = Daemon::spawn(
            common::callgate()
                .args(["run", "--config"])
                .arg(&cfg)
                .env("RUST_LOG", "info"),
        );
        d.wait_for("listening", Duration::from_secs(15));
        d
    };
    let mut first = start();

    let mut seen = Vec::new();
    let mut ws = open(http).await;
    let good = token(&config, kam.port, "pass1001", 600);
    ws.send(Message::text(
        json!({"type": "connect", "id": 1, "token": good}).to_string(),
    ))
    .await
    .unwrap();
    while next(&mut ws, &mut seen).await["state"] != "registered" {}
    let (_page, call_id) = place_call(&mut ws, &mut seen, 2, "1002").await;
    while next(&mut ws, &mut seen).await["state"] != "established" {}
    // While it goes on, the CRM sees it already.
    let row = format!("/api/v1/calls/{call_id}");
    let (status, live) = request(http, "GET", &row, Some(CRM_API_KEY), None).await;
    assert_eq!(status, 200, "{live}");
    assert_eq!(live["endReason"], "in_progress", "{live}");
    assert_eq!(live["endedAt"], Value::Null, "{live}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    first.kill();
    drop(ws);

    let mut second = start();
    // (Said before it listens.)
    assert!(
        second
            .seen
            .iter()
            .any(|l| l.contains("WARN") && l.contains("interrupted") && l.contains("calls=1")),
        "{:?}",
        second.seen
    );
    let (status, call) = request(http, "GET", &row, Some(CRM_API_KEY), None).await;
    assert_eq!(status, 200, "{call}");
    assert_eq!(call["endReason"], "interrupted", "{call}");
    let (answered, ended) = (
        call["answeredAt"].as_i64().unwrap(),
        call["endedAt"].as_i64().unwrap(),
    );
    assert!(
        ended >= answered + 500,
        "ended at the recording's last write: {call}"
    );
    assert_eq!(call["durationMs"].as_i64().unwrap(), ended - answered);
    assert_eq!(
        call["recording"].as_str(),
        Some(format!("{call_id}.wav").as_str()),
        "{call}"
    );
    // The recording as written until the crash: a valid WAV whose header counts its audio.
    let path = format!("{row}/recording");
    let (status, head, wav) = get_raw(http, &path, Some(CRM_API_KEY), "").await;
    assert_eq!(status, 200, "{head}");
    assert_eq!(&wav[..4], b"RIFF");
    let data = u32::from_le_bytes([wav[40], wav[41], wav[42], wav[43]]) as usize;
    assert!(
        data > 0 && data == wav.len() - 44,
        "{data} of {} bytes",
        wav.len()
    );
    let status = second.terminate(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
}

/// Talks over the page's call for up to `limit` (50 packets/s toward the far end's echo) while
/// reading the page's events, and stops early at an event `done` accepts. Returns the packets
/// sent, those heard back, the events read, and whether `done` accepted one.
async fn talk(
    ws: &mut Ws,
    seen: &mut Vec<String>,
    page: &mut common::rtc_peer::RtcPeer,
    seq: &mut u16,
    limit: Duration,
    mut done: impl FnMut(&Value) -> bool,
) -> (u32, u32, Vec<Value>, bool) {
    use callgate::media::rtp::RtpPacket;
    const SOUND: [u8; 160] = [0x3c; 160];
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let deadline = tokio::time::Instant::now() + limit;
    let (mut sent, mut back, mut events) = (0, 0, Vec::new());
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => return (sent, back, events, false),
            _ = tick.tick() => {
                let mut b = Vec::new();
                RtpPacket { marker: false, payload_type: 0, sequence: *seq, timestamp: u32::from(*seq) * 160, ssrc: 77, payload: &SOUND }.write(&mut b);
                page.send(&b).await;
                *seq = seq.wrapping_add(1);
                sent += 1;
            }
            Some((_, p)) = page.heard.recv() => {
                if p == SOUND {
                    back += 1;
                }
            }
            ev = next(ws, seen) => {
                let stop = done(&ev);
                events.push(ev);
                if stop {
                    return (sent, back, events, true);
                }
            }
        }
    }
}

/// At least 95 % of a phase's `sent` packets came back (up to 3 may still be on their way).
fn assert_heard(phase: &str, sent: u32, back: u32) {
    assert!(
        (back + 3) * 100 >= sent * 95,
        "{phase}: heard {back} of {sent}"
    );
}

/// The history row of `call_id` once the call's end is written in it.
async fn finished_row(addr: std::net::SocketAddr, call_id: &str) -> Value {
    let path = format!("/api/v1/calls/{call_id}");
    for _ in 0..50 {
        let (status, row) = common::sse::request(addr, "GET", &path, Some(CRM_API_KEY), None).await;
        if status == 200 && row["endReason"] != "in_progress" {
            return row;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no finished history row for {call_id}");
}

/// Registrar outage: Kamailio stops for 60 s in the middle of a call, then starts again with the
/// bindings it kept in memory gone. The call's media, which does not pass through Kamailio, goes
/// on all along and the call is not ended; callgate notices the outage (a keepalive unanswered,
/// or answered late) and registers again within its retry back-off once Kamailio is back, so a
/// new call reaches the page; the first call then hangs up normally through the new Kamailio,
/// and both calls are in the history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registrar_outage_keeps_calls_and_the_registration_comes_back() {
    use common::peers::{Sipp, sipp_probe};

    let port = free_udp_port();
    let kam = Kamailio::start(port);
    let mut far = Sipp::uas_with(
        port,
        "1002",
        "pass1002",
        "uas_answer.xml",
        &["-rtp_echo", "-timeout", "240s"],
    );
    let mut srv = server().await;
    let mut seen = Vec::new();
    let mut ws = logged_in(&srv, port, &mut seen).await;
    let (mut page, call_id) = place_call(&mut ws, &mut seen, 2, "1002").await;
    while next(&mut ws, &mut seen).await["state"] != "established" {}
    let mut seq = 0;
    let (sent, back, _, _) = talk(
        &mut ws,
        &mut seen,
        &mut page,
        &mut seq,
        Duration::from_secs(2),
        |_| false,
    )
    .await;
    assert_heard("before", sent, back);

    tokio::task::spawn_blocking(move || drop(kam))
        .await
        .unwrap();
    let (sent, back, events, _) = talk(
        &mut ws,
        &mut seen,
        &mut page,
        &mut seq,
        Duration::from_secs(60),
        |_| false,
    )
    .await;
    assert!(
        events.iter().all(|e| e["type"] != "call"),
        "the call goes on through the outage: {events:?}"
    );
    assert_heard("during the outage", sent, back);

    let kam = tokio::task::spawn_blocking(move || Kamailio::start(port))
        .await
        .unwrap();
    let (sent, back, events, registered) = talk(
        &mut ws,
        &mut seen,
        &mut page,
        &mut seq,
        Duration::from_secs(40),
        |e| e["type"] == "registration" && e["state"] == "registered",
    )
    .await;
    assert!(
        registered,
        "registered again within the back-off: {events:?}\n{}",
        kam.log()
    );
    assert_heard("after", sent, back);

    // The new Kamailio knows the agent again: a caller reaches the page (which turns it away).
    let probe = tokio::task::spawn_blocking(move || sipp_probe(port, "1001", 486));
    let second = loop {
        let ev = next(&mut ws, &mut seen).await;
        if ev["type"] == "incoming" {
            break ev["callId"].as_str().unwrap().to_owned();
        }
    };
    ws.send(Message::text(
        json!({"type": "reject", "id": 3, "callId": second}).to_string(),
    ))
    .await
    .unwrap();
    let (ok, log) = probe.await.unwrap();
    assert!(ok, "the caller did not get 486:\n{log}");

    // The first call ends normally: its BYE reaches the far end through the new Kamailio.
    ws.send(Message::text(
        json!({"type": "hangup", "id": 4, "callId": call_id}).to_string(),
    ))
    .await
    .unwrap();
    let ended = loop {
        let ev = next(&mut ws, &mut seen).await;
        if ev["type"] == "call" && ev["callId"] == call_id.as_str() && ev["state"] == "ended" {
            break ev;
        }
    };
    assert_eq!(ended["endReason"], "local_hangup", "{ended}");
    let (ok, log) = tokio::task::spawn_blocking(move || far.wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(ok, "the far end did not get its BYE:\n{log}");

    let first = finished_row(srv.addr, &call_id).await;
    assert_eq!(first["endReason"], "local_hangup", "{first}");
    assert!(first["durationMs"].as_i64().unwrap() >= 62_000, "{first}");
    let turned_away = finished_row(srv.addr, &second).await;
    assert_eq!(turned_away["direction"], "inbound", "{turned_away}");
    let _ = ws.close(None).await;
    page.pc.close().await.unwrap();
    srv.shut_down().await;
}

/// The next `agentState` event of the page.
async fn next_state(ws: &mut Ws, seen: &mut Vec<String>) -> Value {
    loop {
        let ev = next(ws, seen).await;
        if ev["type"] == "agentState" {
            return ev;
        }
    }
}

/// Agent states: the app defines available / paused / wrap_up. A paused agent cannot call out
/// and its callers get 480 without the page hearing of them; a change asked for during a call
/// waits for the call's end; an answered call's end enters wrap-up, which refuses calls too
/// and ends on time. The CRM's channel gets every change once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_states_gate_calls_and_wrap_up_follows_a_call() {
    use common::peers::{Sipp, sipp_probe};
    use common::sse::Sse;

    let kam = Kamailio::start(free_udp_port());
    let port = kam.port;
    let mut far = Sipp::uas_with(port, "1002", "pass1002", "uas_answer.xml", &["-rtp_echo"]);
    let mut srv = server_with_app_options(
        "states = [\n\
         { id = \"available\", label = \"Available\", productive = true, may_call_out = true, may_receive = true },\n\
         { id = \"paused\", label = \"Paused\" },\n\
         { id = \"wrap_up\", label = \"Wrap-up\", productive = true },\n\
         ]\nwrap_up_state = \"wrap_up\"\nwrap_up_secs = 4\n",
    )
    .await;
    let mut seen = Vec::new();
    let mut ws = logged_in(&srv, port, &mut seen).await;
    let connected: Value = seen
        .iter()
        .map(|t| serde_json::from_str::<Value>(t).unwrap())
        .find(|v| v["type"] == "connected")
        .unwrap();
    let ids: Vec<&str> = connected["states"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["available", "paused", "wrap_up"], "{connected}");
    let mut crm = Sse::open(
        srv.addr,
        "/api/v1/agents/1001@127.0.0.1/events",
        Some(CRM_API_KEY),
        None,
    )
    .await;
    // (Sent with `connected`, before the registration's outcome.)
    let first: Value = seen
        .iter()
        .map(|t| serde_json::from_str::<Value>(t).unwrap())
        .find(|v| v["type"] == "agentState")
        .unwrap();
    assert_eq!(
        (first["state"].as_str(), first["cause"].as_str()),
        (Some("available"), Some("login")),
        "{first}"
    );

    let set = |id: u64, state: &str| {
        Message::text(json!({"type": "setState", "id": id, "state": state}).to_string())
    };
    ws.send(set(2, "lunch")).await.unwrap();
    assert_eq!(
        next(&mut ws, &mut seen).await["error"]["code"],
        "unknown_state"
    );
    ws.send(set(3, "paused")).await.unwrap();
    assert_eq!(
        next(&mut ws, &mut seen).await,
        json!({"type": "reply", "id": 3, "ok": true})
    );
    let paused = next_state(&mut ws, &mut seen).await;
    assert_eq!(
        (
            paused["state"].as_str(),
            paused["mayCallOut"].as_bool(),
            paused["mayReceive"].as_bool()
        ),
        (Some("paused"), Some(false), Some(false)),
        "{paused}"
    );
    ws.send(Message::text(
        json!({"type": "call", "id": 4, "to": "1002", "sdp": "v=0"}).to_string(),
    ))
    .await
    .unwrap();
    let refused = next(&mut ws, &mut seen).await;
    assert_eq!(refused["error"]["code"], "state_forbids_calls", "{refused}");
    let (ok, log) = tokio::task::spawn_blocking(move || sipp_probe(port, "1001", 480))
        .await
        .unwrap();
    assert!(ok, "a paused agent's caller gets 480:\n{log}");

    // Available again; a pause asked for during a call waits for its end (and comes before
    // wrap-up).
    ws.send(set(5, "available")).await.unwrap();
    assert_eq!(next_state(&mut ws, &mut seen).await["state"], "available");
    let (_page, call_id) = place_call(&mut ws, &mut seen, 6, "1002").await;
    while next(&mut ws, &mut seen).await["state"] != "established" {}
    ws.send(set(7, "paused")).await.unwrap();
    let pending = next_state(&mut ws, &mut seen).await;
    assert_eq!(
        (pending["state"].as_str(), pending["pending"].as_str()),
        (Some("available"), Some("paused")),
        "{pending}"
    );
    ws.send(Message::text(
        json!({"type": "hangup", "id": 8, "callId": call_id}).to_string(),
    ))
    .await
    .unwrap();
    let after = next_state(&mut ws, &mut seen).await;
    assert_eq!(
        (after["state"].as_str(), after["cause"].as_str()),
        (Some("paused"), Some("call_ended")),
        "{after}"
    );
    let (ok, log) = tokio::task::spawn_blocking(move || far.wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(ok, "{log}");

    // An answered incoming call ends: wrap-up, refusing calls, until its time is up.
    ws.send(set(9, "available")).await.unwrap();
    assert_eq!(next_state(&mut ws, &mut seen).await["state"], "available");
    let mut caller = Sipp::uac_with(port, "1001", "uac_answered.xml", &["-rtp_echo"]);
    let incoming = loop {
        let ev = next(&mut ws, &mut seen).await;
        if ev["type"] == "incoming" {
            break ev["callId"].as_str().unwrap().to_owned();
        }
    };
    let _answered = answer_incoming(&mut ws, &mut seen, &incoming).await;
    let wrap = next_state(&mut ws, &mut seen).await;
    let began = std::time::Instant::now();
    assert_eq!(
        (wrap["state"].as_str(), wrap["cause"].as_str()),
        (Some("wrap_up"), Some("wrap_up")),
        "{wrap}"
    );
    let length = wrap["wrapUpEndsAt"].as_i64().unwrap() - wrap["since"].as_i64().unwrap();
    assert!((3999..=4001).contains(&length), "{wrap}");
    let (ok, log) = tokio::task::spawn_blocking(move || caller.wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(ok, "{log}");
    let (ok, log) = tokio::task::spawn_blocking(move || sipp_probe(port, "1001", 480))
        .await
        .unwrap();
    assert!(ok, "wrap-up refuses calls:\n{log}");
    let over = next_state(&mut ws, &mut seen).await;
    let took = began.elapsed();
    assert_eq!(
        (over["state"].as_str(), over["cause"].as_str()),
        (Some("available"), Some("wrap_up_over")),
        "{over}"
    );
    assert!(
        took > Duration::from_millis(3500) && took < Duration::from_secs(6),
        "wrap-up lasted {took:?}"
    );

    // The CRM saw each change once, in order.
    let mut crm_states = Vec::new();
    while crm_states.len() < 7 {
        let ev = crm.next(Duration::from_secs(5)).await.expect("an event");
        if ev.data["type"] == "agentState" {
            crm_states.push(ev.data["state"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(
        crm_states,
        [
            "paused",
            "available",
            "available",
            "paused",
            "available",
            "wrap_up",
            "available"
        ]
    );
    // The CRM's stream is still open: it ends with the shutdown instead of holding it up
    // (shut_down fails after 15 s).
    let _ = ws.close(None).await;
    srv.shut_down().await;
    drop(crm);
}

/// Agent groups: a state limited to some groups is listed, and may be chosen, only by agents
/// whose token names one of them; the state is the agent's, so its other page follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_groups_limit_the_states_an_agent_may_choose() {
    let kam = Kamailio::start(free_udp_port());
    let srv = server_with_app_options(
        "states = [\n\
         { id = \"available\", may_call_out = true, may_receive = true },\n\
         { id = \"outbound\", label = \"Outbound campaign\", may_call_out = true, groups = [\"sales\"] },\n\
         { id = \"coaching\", groups = [\"support\", \"sales\"] },\n\
         ]\n",
    )
    .await;
    let mut srv = srv;
    let listed = |seen: &[String]| -> Vec<String> {
        let connected = seen
            .iter()
            .map(|t| serde_json::from_str::<Value>(t).unwrap())
            .rfind(|v| v["type"] == "connected")
            .unwrap();
        connected["states"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let set = |id: u64, state: &str| {
        Message::text(json!({"type": "setState", "id": id, "state": state}).to_string())
    };

    // No group in the token: only the states open to all.
    let mut seen = Vec::new();
    let mut plain = logged_in(&srv, kam.port, &mut seen).await;
    assert_eq!(listed(&seen), ["available"]);
    plain.send(set(2, "outbound")).await.unwrap();
    assert_eq!(
        next(&mut plain, &mut seen).await["error"]["code"],
        "unknown_state"
    );

    // The same agent on a second page, with a token of group "sales".
    let sales = token_of_group(
        &srv.config,
        "crm",
        (kam.port, "pass1001"),
        Some("sales"),
        600,
    );
    let mut seen2 = Vec::new();
    let mut ws = open(srv.addr).await;
    ws.send(Message::text(
        json!({"type": "connect", "id": 1, "token": sales}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(next(&mut ws, &mut seen2).await["ok"], true);
    assert_eq!(next(&mut ws, &mut seen2).await["type"], "connected");
    assert_eq!(listed(&seen2), ["available", "outbound", "coaching"]);
    ws.send(set(2, "outbound")).await.unwrap();
    let reply = loop {
        let ev = next(&mut ws, &mut seen2).await;
        if ev["type"] == "reply" {
            break ev;
        }
    };
    assert_eq!(reply, json!({"type": "reply", "id": 2, "ok": true}));
    let st = next_state(&mut ws, &mut seen2).await;
    assert_eq!(st["state"], "outbound", "{st}");
    // The first page is told, though it could not have chosen it.
    let st = next_state(&mut plain, &mut seen).await;
    assert_eq!(
        (
            st["state"].as_str(),
            st["label"].as_str(),
            st["mayReceive"].as_bool()
        ),
        (Some("outbound"), Some("Outbound campaign"), Some(false)),
        "{st}"
    );

    let _ = ws.close(None).await;
    let _ = plain.close(None).await;
    srv.shut_down().await;
}

/// The CRM backend sets a logged-in agent's state over HTTP (the page follows), within its own
/// app only; every change is in the agent-state log, so the stats give the time in each state,
/// productive or not, once the agent has logged out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crm_sets_an_agents_state_and_the_stats_show_the_time_in_each() {
    use common::sse::request;

    let kam = Kamailio::start(free_udp_port());
    let mut srv = server_with_app_options(
        "states = [\n\
         { id = \"available\", productive = true, may_call_out = true, may_receive = true },\n\
         { id = \"paused\", label = \"Paused\" },\n\
         ]\n",
    )
    .await;
    let mut seen = Vec::new();
    let path = "/api/v1/agents/1001@127.0.0.1/state";
    let put = |state: &str| json!({ "state": state });
    // Not logged in yet: nothing to set.
    let (status, body) = request(
        srv.addr,
        "PUT",
        path,
        Some(CRM_API_KEY),
        Some(&put("paused")),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("agent_offline")),
        "{body}"
    );

    let mut ws = logged_in(&srv, kam.port, &mut seen).await;
    let t0 = tokio::time::Instant::now();
    let refusals = [
        (
            Some(ERP_API_KEY),
            json!({"state": "paused"}),
            403,
            "forbidden",
        ),
        (
            Some("no-such-key-0123456789abcdef"),
            json!({"state": "paused"}),
            401,
            "unauthorized",
        ),
        (
            Some(CRM_API_KEY),
            json!({"state": "lunch"}),
            400,
            "unknown_state",
        ),
        (
            Some(CRM_API_KEY),
            json!({"status": "paused"}),
            400,
            "bad_request",
        ),
        (
            Some(CRM_API_KEY),
            json!({"state": "x".repeat(5000)}),
            413,
            "body_too_large",
        ),
    ];
    for (key, body, want, code) in refusals {
        let (status, answer) = request(srv.addr, "PUT", path, key, Some(&body)).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (want, Some(code)),
            "{body}: {answer}"
        );
    }
    let (status, body) = request(
        srv.addr,
        "PUT",
        path,
        Some(CRM_API_KEY),
        Some(&put("paused")),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (
            body["type"].as_str(),
            body["state"].as_str(),
            body["mayCallOut"].as_bool()
        ),
        (Some("agentState"), Some("paused"), Some(false)),
        "{body}"
    );
    let st = next_state(&mut ws, &mut seen).await;
    assert_eq!(
        (st["state"].as_str(), st["cause"].as_str()),
        (Some("paused"), Some("api")),
        "{st}: a change through the HTTP API says so"
    );
    let paused_at = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(2200)).await;
    // The page's own API credential may set its agent's state too.
    let page_token = api_token_of(&seen);
    let (status, body) = request(
        srv.addr,
        "PUT",
        path,
        Some(&page_token),
        Some(&put("available")),
    )
    .await;
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("available")),
        "{body}"
    );
    let paused_for = paused_at.elapsed();
    assert_eq!(next_state(&mut ws, &mut seen).await["state"], "available");
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // Logged out: the last stretch ends; the stats add them up.
    ws.send(Message::text(r#"{"type":"logout","id":9}"#))
        .await
        .unwrap();
    let _ = next(&mut ws, &mut seen).await;
    let online = t0.elapsed();
    let stats_path = "/api/v1/agents/1001@127.0.0.1/stats";
    let mut tries = 0;
    let stats = loop {
        let (status, body) = request(srv.addr, "GET", stats_path, Some(CRM_API_KEY), None).await;
        assert_eq!(status, 200, "{body}");
        let total =
            body["productiveSecs"].as_u64().unwrap() + body["unproductiveSecs"].as_u64().unwrap();
        // Written just after the session ends.
        if total + 1 >= online.as_secs() || tries == 30 {
            break body;
        }
        tries += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let secs = |k: &str| stats["stateSecs"][k].as_u64().unwrap_or(u64::MAX);
    assert!(
        secs("paused").abs_diff(paused_for.as_secs()) <= 1,
        "{stats} (paused {paused_for:?})"
    );
    let available = online.saturating_sub(paused_for).as_secs();
    assert!(
        secs("available").abs_diff(available) <= 1,
        "{stats} (online {online:?})"
    );
    assert_eq!(
        stats["unproductiveSecs"], stats["stateSecs"]["paused"],
        "{stats}"
    );
    assert_eq!(
        stats["productiveSecs"], stats["stateSecs"]["available"],
        "{stats}"
    );
    // The log itself: each stretch with its cause, oldest first, all closed at the logout.
    let log_path = "/api/v1/agents/1001@127.0.0.1/states";
    let (status, log) = request(srv.addr, "GET", log_path, Some(CRM_API_KEY), None).await;
    assert_eq!(status, 200, "{log}");
    let stretches: Vec<(&str, &str, bool)> = log["states"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["state"].as_str().unwrap(),
                s["cause"].as_str().unwrap(),
                s["endedAt"].is_i64(),
            )
        })
        .collect();
    assert_eq!(
        stretches,
        [
            ("available", "login", true),
            ("paused", "api", true),
            ("available", "api", true)
        ],
        "{log}"
    );
    let (status, body) = request(srv.addr, "GET", log_path, Some(ERP_API_KEY), None).await;
    assert_eq!(status, 403, "another app's key: {body}");
    srv.shut_down().await;
}

/// Dialler data: a call whose INVITE carries the customer's id, campaign and CRM link (X-
/// headers and Call-Info, through Kamailio) rings the page with them as the app's named
/// fields, in `incoming`, in the CRM's event stream and in the call's history row; headers the
/// app does not map stay out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diallers_headers_reach_the_page_the_crm_and_the_history() {
    use common::peers::Sipp;
    use common::sse::Sse;

    let kam = Kamailio::start(free_udp_port());
    let mut srv = server_with_app_options(
        "[apps.crm.call_data]\n\
         \"X-Customer-Id\" = \"customerId\"\n\
         \"X-Campaign\" = \"campaign\"\n\
         \"Call-Info\" = \"crmLink\"\n\
         \"X-Not-Sent\" = \"absent\"\n",
    )
    .await;
    let mut seen = Vec::new();
    let mut ws = logged_in(&srv, kam.port, &mut seen).await;
    let mut crm = Sse::open(
        srv.addr,
        "/api/v1/agents/1001@127.0.0.1/events",
        Some(CRM_API_KEY),
        None,
    )
    .await;
    let want = json!({
        "customerId": "C-1042",
        "campaign": "spring-renewals",
        "crmLink": "<https://crm.example.com/customers/C-1042>;purpose=info",
    });

    let mut caller = Sipp::uac_with(kam.port, "1001", "uac_dialler.xml", &["-rtp_echo"]);
    let incoming = loop {
        let ev = next(&mut ws, &mut seen).await;
        if ev["type"] == "incoming" {
            break ev;
        }
    };
    assert_eq!(incoming["data"], want, "{incoming}");
    let call_id = incoming["callId"].as_str().unwrap().to_owned();
    let crm_incoming = loop {
        let ev = crm
            .next(Duration::from_secs(5))
            .await
            .expect("the CRM's event");
        if ev.data["type"] == "incoming" {
            break ev.data;
        }
    };
    assert_eq!(crm_incoming["data"], want, "{crm_incoming}");
    let _page = answer_incoming(&mut ws, &mut seen, &call_id).await;
    while next(&mut ws, &mut seen).await["state"] != "ended" {}
    let (ok, log) = tokio::task::spawn_blocking(move || caller.wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(ok, "{log}");

    let call = finished_row(srv.addr, &call_id).await;
    assert_eq!(call["data"], want, "{call}");
    assert!(!call.to_string().contains("X-Internal-Score"), "{call}");
    let _ = ws.close(None).await;
    drop(crm);
    srv.shut_down().await;
}

/// Automatic not-ready: with `missed_calls_limit = 2`, two calls in a row that the agent lets
/// ring out (the callers give up) put the agent in `missed_calls_state`, whose callers then get
/// 480; an answered call in between starts the count again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_left_ringing_twice_make_the_agent_not_ready() {
    use common::peers::{Sipp, sipp_probe};

    let kam = Kamailio::start(free_udp_port());
    let port = kam.port;
    let mut srv = server_with_app_options(
        "states = [\n\
         { id = \"available\", may_call_out = true, may_receive = true },\n\
         { id = \"not_ready\", label = \"Not ready\" },\n\
         ]\nmissed_calls_limit = 2\nmissed_calls_state = \"not_ready\"\n",
    )
    .await;
    let mut seen = Vec::new();
    let mut ws = logged_in(&srv, port, &mut seen).await;
    let miss = async |ws: &mut Ws, seen: &mut Vec<String>| {
        let mut quitter = Sipp::uac(port, "1001", "uac_cancel.xml");
        loop {
            let ev = next(ws, seen).await;
            assert_ne!(ev["type"], "agentState", "{ev}");
            if ev["type"] == "call" && ev["endReason"] == "missed" {
                break;
            }
        }
        let (ok, log) = tokio::task::spawn_blocking(move || quitter.wait(Duration::from_secs(10)))
            .await
            .unwrap();
        assert!(ok, "{log}");
    };
    // One missed, one answered (the count starts again), one missed: still available.
    miss(&mut ws, &mut seen).await;
    let mut caller = Sipp::uac_with(port, "1001", "uac_answered.xml", &["-rtp_echo"]);
    let incoming = loop {
        let ev = next(&mut ws, &mut seen).await;
        if ev["type"] == "incoming" {
            break ev;
        }
    };
    let call_id = incoming["callId"].as_str().unwrap().to_owned();
    let _page = answer_incoming(&mut ws, &mut seen, &call_id).await;
    while next(&mut ws, &mut seen).await["state"] != "ended" {}
    let (ok, log) = tokio::task::spawn_blocking(move || caller.wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(ok, "{log}");
    miss(&mut ws, &mut seen).await;
    // The second in a row.
    let mut quitter = Sipp::uac(port, "1001", "uac_cancel.xml");
    let state = next_state(&mut ws, &mut seen).await;
    assert_eq!(
        (
            state["state"].as_str(),
            state["cause"].as_str(),
            state["mayReceive"].as_bool()
        ),
        (Some("not_ready"), Some("missed_calls"), Some(false)),
        "{state}"
    );
    let (ok, log) = tokio::task::spawn_blocking(move || quitter.wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(ok, "{log}");
    let (ok, log) = tokio::task::spawn_blocking(move || sipp_probe(port, "1001", 480))
        .await
        .unwrap();
    assert!(ok, "a not-ready agent's caller gets 480:\n{log}");
    let _ = ws.close(None).await;
    srv.shut_down().await;
}

/// X- headers on outgoing calls: the page's `call` may add the app's `call_headers` (sipp checks
/// them in the INVITE, spelled as configured); any other header, or a value with a line break,
/// is refused with `header_not_allowed` before anything is dialled. The call's history row keeps
/// them under the app's `call_data` names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_carries_the_x_headers_the_app_allows() {
    use common::peers::Sipp;

    let kam = Kamailio::start(free_udp_port());
    let mut far = Sipp::uas_with(
        kam.port,
        "1002",
        "pass1002",
        "uas_x_headers.xml",
        &["-rtp_echo"],
    );
    let mut srv = server_with_app_options(
        "call_headers = [\"X-Customer-Id\", \"X-Campaign\"]\n\
         [apps.crm.call_data]\n\"X-Customer-Id\" = \"customerId\"\n",
    )
    .await;
    let mut seen = Vec::new();
    let mut ws = logged_in(&srv, kam.port, &mut seen).await;
    let call = |id: u64, headers: Value| {
        Message::text(
            json!({"type": "call", "id": id, "to": "1002", "sdp": "v=0", "headers": headers})
                .to_string(),
        )
    };
    for (id, headers) in [
        (2, json!({"Via": "SIP/2.0/UDP 192.0.2.1"})),
        (3, json!({"X-Other": "1"})),
        (4, json!({"X-Campaign": "a\r\nVia: SIP/2.0/UDP 192.0.2.1"})),
    ] {
        ws.send(call(id, headers.clone())).await.unwrap();
        let r = next(&mut ws, &mut seen).await;
        assert_eq!(r["error"]["code"], "header_not_allowed", "{headers}: {r}");
    }

    let (mut page, offer) = common::rtc_peer::RtcPeer::offer().await;
    ws.send(Message::text(
        json!({"type": "call", "id": 5, "to": "1002", "sdp": offer,
               "headers": {"x-customer-id": "C-1042", "X-Campaign": "spring-renewals"}})
        .to_string(),
    ))
    .await
    .unwrap();
    let reply = next(&mut ws, &mut seen).await;
    assert_eq!(reply["ok"], true, "{reply}");
    let call_id = reply["callId"].as_str().unwrap().to_owned();
    page.accept(reply["sdp"].as_str().unwrap()).await;
    while next(&mut ws, &mut seen).await["state"] != "established" {}
    ws.send(Message::text(
        json!({"type": "hangup", "id": 6, "callId": call_id}).to_string(),
    ))
    .await
    .unwrap();
    while next(&mut ws, &mut seen).await["state"] != "ended" {}
    let (ok, log) = tokio::task::spawn_blocking(move || far.wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(ok, "the INVITE lacked the X- headers:\n{log}");

    let rec = finished_row(srv.addr, &call_id).await;
    assert_eq!(rec["data"], json!({"customerId": "C-1042"}), "{rec}");
    let _ = ws.close(None).await;
    srv.shut_down().await;
}

/// Backend call control: the CRM's click-to-call reaches the page as a `dial` event, the page's
/// `call` carrying its `requestId` answers the HTTP request with the call's id; then the CRM
/// holds, resumes, sends digits (with the agent's own apiToken) and hangs up, each seen by sipp
/// and told to the page. Another app's key, a wrong body, a header the app does not allow and an
/// ended call are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crm_places_holds_and_hangs_up_a_call_through_the_page() {
    use common::peers::Sipp;
    use common::sse::request;

    let kam = Kamailio::start(free_udp_port());
    let mut far = Sipp::uas(kam.port, "1002", "pass1002", "uas_hold_dtmf.xml");
    let mut srv = server_with_app_options("call_headers = [\"X-Ticket\"]").await;
    let mut seen = Vec::new();
    let calls = "/api/v1/agents/1001@127.0.0.1/calls";
    let dial = json!({"to": "1002"});
    let (status, body) = request(srv.addr, "POST", calls, Some(CRM_API_KEY), Some(&dial)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("agent_offline")),
        "{body}"
    );
    let mut ws = logged_in(&srv, kam.port, &mut seen).await;
    let own = api_token_of(&seen);
    let refusals = [
        (ERP_API_KEY, dial.clone(), 403, "forbidden"),
        (CRM_API_KEY, json!({"number": "1002"}), 400, "bad_request"),
        (
            CRM_API_KEY,
            json!({"to": "1002", "headers": {"X-Other": "1"}}),
            400,
            "header_not_allowed",
        ),
        (
            CRM_API_KEY,
            json!({"to": "1002", "headers": {"X-Ticket": "x".repeat(5000)}}),
            413,
            "body_too_large",
        ),
    ];
    for (key, body, want, code) in refusals {
        let (status, answer) = request(srv.addr, "POST", calls, Some(key), Some(&body)).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (want, Some(code)),
            "{body}: {answer}"
        );
    }

    // Click-to-call: the HTTP request waits while the page places the call.
    let addr = srv.addr;
    let asked = json!({"to": "1002", "headers": {"X-Ticket": "T-77"}});
    let crm =
        tokio::spawn(
            async move { request(addr, "POST", calls, Some(CRM_API_KEY), Some(&asked)).await },
        );
    let ev = loop {
        let ev = next(&mut ws, &mut seen).await;
        if ev["type"] == "dial" {
            break ev;
        }
    };
    assert_eq!(
        (ev["to"].as_str(), ev["headers"]["X-Ticket"].as_str()),
        (Some("1002"), Some("T-77")),
        "{ev}"
    );
    let (mut page, offer) = common::rtc_peer::RtcPeer::offer().await;
    let call = json!({"type": "call", "id": 5, "to": ev["to"], "headers": ev["headers"],
        "requestId": ev["requestId"], "sdp": offer});
    ws.send(Message::text(call.to_string())).await.unwrap();
    let reply = next(&mut ws, &mut seen).await;
    assert_eq!(reply["ok"], true, "{reply}");
    page.accept(reply["sdp"].as_str().unwrap()).await;
    let (status, placed) = crm.await.unwrap();
    assert_eq!(status, 201, "{placed}");
    let call_id = reply["callId"].as_str().unwrap().to_owned();
    assert_eq!(placed["callId"], call_id.as_str(), "{placed}");
    let state_is = async |ws: &mut Ws, seen: &mut Vec<String>, want: &str| loop {
        let ev = next(ws, seen).await;
        if ev["type"] == "call" && ev["state"] == want {
            break;
        }
        assert_ne!(ev["state"], "ended", "{ev}");
    };
    state_is(&mut ws, &mut seen, "established").await;

    let on_call = |action: &str| format!("/api/v1/calls/{call_id}/{action}");
    // Another app's key may not touch the call; an unknown one is not live.
    let (status, body) = request(srv.addr, "POST", &on_call("hold"), Some(ERP_API_KEY), None).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = request(
        srv.addr,
        "POST",
        "/api/v1/calls/no-such-call/hold",
        Some(CRM_API_KEY),
        None,
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("call_not_live")),
        "{body}"
    );
    let (status, body) = request(srv.addr, "POST", &on_call("hold"), Some(CRM_API_KEY), None).await;
    assert_eq!(
        (status, body["action"].as_str()),
        (202, Some("hold")),
        "{body}"
    );
    state_is(&mut ws, &mut seen, "held").await;
    let (status, body) = request(
        srv.addr,
        "POST",
        &on_call("unhold"),
        Some(CRM_API_KEY),
        None,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    state_is(&mut ws, &mut seen, "established").await;
    let bad = json!({"digits": "12x"});
    let (status, body) = request(srv.addr, "POST", &on_call("dtmf"), Some(&own), Some(&bad)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("bad_request")),
        "{body}"
    );
    let digits = json!({"digits": "1#"});
    let (status, body) = request(
        srv.addr,
        "POST",
        &on_call("dtmf"),
        Some(&own),
        Some(&digits),
    )
    .await;
    assert_eq!(status, 202, "the agent's own credential: {body}");
    // Two INFOs, 200 ms each, before the hang-up.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (status, body) = request(
        srv.addr,
        "POST",
        &on_call("hangup"),
        Some(CRM_API_KEY),
        None,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    state_is(&mut ws, &mut seen, "ended").await;
    let (ok, log) = tokio::task::spawn_blocking(move || far.wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(ok, "sipp saw hold, resume, 1 and # and the BYE:\n{log}");
    let (status, body) = request(
        srv.addr,
        "POST",
        &on_call("hangup"),
        Some(CRM_API_KEY),
        None,
    )
    .await;
    assert_eq!(status, 404, "an ended call: {body}");
    let rec = finished_row(srv.addr, &call_id).await;
    assert_eq!(rec["direction"], "outbound", "{rec}");
    let _ = ws.close(None).await;
    page.pc.close().await.unwrap();
    srv.shut_down().await;
}

/// Call disposition: the CRM records a wrap-up code, notes and custom fields on a call while it
/// goes on and after it ended (each PATCH merged into the last, `null` removing); the call's end
/// keeps them; the history returns them in the call and in the list; another app's key, a bad
/// body, an oversized one and an unknown call are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crm_records_a_disposition_kept_with_the_call() {
    use common::peers::Sipp;
    use common::sse::request;

    let kam = Kamailio::start(free_udp_port());
    let mut far = Sipp::uas(kam.port, "1002", "pass1002", "uas_answer.xml");
    let mut srv = server().await;
    let mut seen = Vec::new();
    let mut ws = logged_in(&srv, kam.port, &mut seen).await;
    let (page, call_id) = place_call(&mut ws, &mut seen, 2, "1002").await;
    let path = format!("/api/v1/calls/{call_id}");
    let during =
        json!({"code": "callback", "notes": "Busy now.\nCall at 5.", "fields": {"orderId": "O-1"}});
    let (status, row) = request(srv.addr, "PATCH", &path, Some(CRM_API_KEY), Some(&during)).await;
    assert_eq!(status, 200, "{row}");
    assert_eq!(row["disposition"]["code"], "callback", "{row}");
    let refusals = [
        (ERP_API_KEY, path.clone(), json!({"code": "x"}), 403),
        (CRM_API_KEY, path.clone(), json!({"outcome": "sale"}), 400),
        (CRM_API_KEY, path.clone(), json!({"code": "a\r\nb"}), 400),
        (
            CRM_API_KEY,
            path.clone(),
            json!({"notes": "x".repeat(20_000)}),
            413,
        ),
        (
            CRM_API_KEY,
            "/api/v1/calls/c-no-such-call".into(),
            json!({"code": "x"}),
            404,
        ),
    ];
    for (key, at, body, want) in refusals {
        let (status, answer) = request(srv.addr, "PATCH", &at, Some(key), Some(&body)).await;
        assert_eq!(status, want, "{body}: {answer}");
    }
    ws.send(Message::text(
        json!({"type": "hangup", "id": 3, "callId": call_id}).to_string(),
    ))
    .await
    .unwrap();
    let ended = finished_row(srv.addr, &call_id).await;
    assert_eq!(
        ended["disposition"]["notes"], "Busy now.\nCall at 5.",
        "{ended}"
    );
    let after =
        json!({"code": "sale", "notes": null, "fields": {"plan": "yearly", "orderId": null}});
    let (status, row) = request(srv.addr, "PATCH", &path, Some(CRM_API_KEY), Some(&after)).await;
    assert_eq!(status, 200, "{row}");
    let d = &row["disposition"];
    assert_eq!(
        (
            d["code"].clone(),
            d.get("notes").is_none(),
            d["fields"].clone()
        ),
        (json!("sale"), true, json!({"plan": "yearly"})),
        "{row}"
    );
    assert!(d["updatedAt"].as_i64().unwrap() > 0, "{row}");
    let (status, list) = request(
        srv.addr,
        "GET",
        "/api/v1/calls?agent=1001@127.0.0.1",
        Some(CRM_API_KEY),
        None,
    )
    .await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["calls"][0]["disposition"]["code"], "sale", "{list}");
    let (ok, log) = tokio::task::spawn_blocking(move || far.wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(ok, "{log}");
    let _ = ws.close(None).await;
    page.pc.close().await.unwrap();
    srv.shut_down().await;
}

/// Click-to-call for an agent with two sessions, one of them waiting for its reloaded page:
/// the `dial` goes to the page that is there (the page's refusal comes back to the CRM); with
/// no page there at all the CRM gets `page_detached`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn click_to_call_reaches_the_agents_page_that_is_there() {
    use common::sse::request;

    let kam = Kamailio::start(free_udp_port());
    let mut srv = server().await;
    let (mut seen_a, mut seen_b) = (Vec::new(), Vec::new());
    let mut a = logged_in(&srv, kam.port, &mut seen_a).await;
    let mut b = logged_in(&srv, kam.port, &mut seen_b).await;
    let calls = "/api/v1/agents/1001@127.0.0.1/calls";
    let dial = json!({"to": "1002"});
    // Page A goes away (a reload): its session waits for it.
    let _ = a.close(None).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..3 {
        let addr = srv.addr;
        let crm = tokio::spawn({
            let dial = dial.clone();
            async move { request(addr, "POST", calls, Some(CRM_API_KEY), Some(&dial)).await }
        });
        let ev = loop {
            let ev = next(&mut b, &mut seen_b).await;
            if ev["type"] == "dial" {
                break ev;
            }
        };
        // The page cannot set up its media: its refusal is the CRM's answer.
        let call = json!({"type": "call", "id": 7, "to": ev["to"], "requestId": ev["requestId"],
            "sdp": "v=0"});
        b.send(Message::text(call.to_string())).await.unwrap();
        let (status, body) = crm.await.unwrap();
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (502, Some("bad_sdp")),
            "{body}"
        );
    }
    // Neither page is there.
    let _ = b.close(None).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = request(srv.addr, "POST", calls, Some(CRM_API_KEY), Some(&dial)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("page_detached")),
        "{body}"
    );
    srv.shut_down().await;
}

/// Webhooks: the app's receiver gets every event of its agent that the CRM's SSE stream gets,
/// each signed (checked as docs/API.md tells receivers to), in order, through an outage of the
/// receiver (callgate backs off and catches up) and a restart of callgate while the receiver
/// is down (the queue is on disk): nothing lost, and `/metrics` shows the failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_deliver_every_event_signed_through_an_outage_and_a_restart() {
    use common::sse::{Sse, get_raw};
    use common::webhook::{Receiver, events};

    const SECRET: &str = "webhook-secret-0123456789abcdef";
    let kam = Kamailio::start(free_udp_port());
    let port = free_udp_port();
    let got: common::webhook::Got = Default::default();
    let receiver = Receiver::start(port, SECRET, got.clone()).await;
    let mut srv = server_with_app_options(&format!(
        "states = [{{ id = \"available\", productive = true, may_call_out = true, may_receive = true }}, {{ id = \"paused\" }}]\n\
         [apps.crm.webhook]\nurl = \"http://127.0.0.1:{port}/hooks?tenant=7\"\nsecret = \"{SECRET}\"\n"
    ))
    .await;
    let path = "/api/v1/agents/1001@127.0.0.1/events";
    let mut sse = Sse::open(srv.addr, path, Some(CRM_API_KEY), None).await;
    assert_eq!(sse.status, 200);
    let mut seen = Vec::new();
    let mut ws = logged_in(&srv, kam.port, &mut seen).await;
    async fn until(
        got: &common::webhook::Got,
        limit: Duration,
        check: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let evs = events(got);
            if check(&evs) || tokio::time::Instant::now() > deadline {
                return evs;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let states = |evs: &[Value]| -> Vec<String> {
        evs.iter()
            .filter(|e| e["type"] == "agentState")
            .map(|e| e["state"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    // Live: the registration arrives at once.
    let evs = until(&got, Duration::from_secs(5), |e| {
        e.iter()
            .any(|e| e["type"] == "registration" && e["state"] == "registered")
    })
    .await;
    assert!(
        evs.iter()
            .any(|e| e["type"] == "registration" && e["state"] == "registered"),
        "{evs:?}"
    );
    let set = |id: u64, state: &str| {
        Message::text(json!({"type": "setState", "id": id, "state": state}).to_string())
    };

    // The receiver goes down: two changes wait, attempts fail and are counted.
    receiver.stop().await;
    ws.send(set(2, "paused")).await.unwrap();
    assert_eq!(next_state(&mut ws, &mut seen).await["state"], "paused");
    ws.send(set(3, "available")).await.unwrap();
    assert_eq!(next_state(&mut ws, &mut seen).await["state"], "available");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let (_, _, body) = get_raw(srv.addr, "/metrics", None, "").await;
        let text = String::from_utf8_lossy(&body).into_owned();
        let failed = text.lines().any(|l| {
            l.starts_with("callgate_webhook_failed_attempts_total{app=\"crm\"}")
                && !l.ends_with(" 0")
        });
        if failed || tokio::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        metrics.lines().any(|l| l
            .starts_with("callgate_webhook_failed_attempts_total{app=\"crm\"}")
            && !l.ends_with(" 0")),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("callgate_webhook_queue{app=\"crm\"}") && !l.ends_with(" 0")),
        "{metrics}"
    );
    // Back up: callgate's next attempt (within its back-off) catches up.
    let receiver = Receiver::start(port, SECRET, got.clone()).await;
    let evs = until(&got, Duration::from_secs(20), |e| {
        states(e).ends_with(&["paused".into(), "available".into()])
    })
    .await;
    assert!(
        states(&evs).ends_with(&["paused".into(), "available".into()]),
        "{evs:?}"
    );

    // Down again, then callgate restarts before the receiver is back.
    receiver.stop().await;
    ws.send(set(4, "paused")).await.unwrap();
    assert_eq!(next_state(&mut ws, &mut seen).await["state"], "paused");
    srv.shut_down().await;
    let mut streamed = Vec::new();
    while let Some(ev) = sse.next(Duration::from_secs(5)).await {
        streamed.push(ev.data);
    }
    assert!(
        states(&streamed).ends_with(&["paused".into()]),
        "{streamed:?}"
    );
    let _receiver = Receiver::start(port, SECRET, got.clone()).await;
    let dir = std::mem::replace(&mut srv.dir, TempDir::new("ws-spent"));
    // (A port of its own for the browser media: the first run's may still be held.)
    let cfg = std::fs::read_to_string(dir.path().join("callgate.toml")).unwrap();
    let webrtc = format!("webrtc_port = {}", srv.config.media.webrtc_port);
    let fresh = format!("webrtc_port = {}", free_udp_port());
    dir.write("callgate.toml", &cfg.replace(&webrtc, &fresh));
    let mut again = serve_dir(dir).await;
    let n = streamed.len();
    let evs = until(&got, Duration::from_secs(20), |e| e.len() >= n).await;
    // Everything the SSE stream had, in its order; the last change only after the restart.
    assert_eq!(&evs[..n.min(evs.len())], &streamed[..], "{evs:#?}");
    let all = got.lock().unwrap().clone();
    assert!(
        all.iter().all(|d| d.target == "/hooks?tenant=7"),
        "{all:#?}"
    );
    assert!(
        all.iter().all(|d| d.valid),
        "every delivery is signed: {all:#?}"
    );
    assert!(
        all.iter().all(|d| d.body["app"] == "crm"
            && d.body["agent"] == "1001@127.0.0.1"
            && d.body["id"] == d.id.as_str()),
        "{all:#?}"
    );
    drop(ws);
    again.shut_down().await;
}

/// Webhooks over HTTPS: a receiver whose certificate the app trusts (`ca_file`) gets the
/// events (only the types it asked for: `events = ["registration"]`); one the app does not
/// trust (erp, built-in roots only) gets none, and the failed attempts are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_go_over_tls_to_a_trusted_receiver_only() {
    use common::sse::get_raw;
    use common::webhook::{Receiver, events, tls_for_loopback};

    const SECRET: &str = "webhook-secret-0123456789abcdef";
    let kam = Kamailio::start(free_udp_port());
    let port = free_udp_port();
    let (pem, tls) = tls_for_loopback();
    let ca = TempDir::new("ca");
    let ca_file = ca.write("ca.pem", &pem);
    let got: common::webhook::Got = Default::default();
    let _receiver = Receiver::start_with(port, SECRET, got.clone(), Some(tls)).await;
    let url = format!("https://127.0.0.1:{port}/hooks");
    let mut srv = server_with_app_options(&format!(
        "states = [{{ id = \"available\", may_call_out = true, may_receive = true }}, {{ id = \"paused\" }}]\n\
         [apps.crm.webhook]\nurl = \"{url}\"\nsecret = \"{SECRET}\"\nca_file = \"{}\"\nevents = [\"registration\"]\n\
         [apps.erp.webhook]\nurl = \"{url}\"\nsecret = \"{SECRET}\"\n",
        ca_file.display()
    ))
    .await;
    let mut seen = Vec::new();
    let mut crm = logged_in(&srv, kam.port, &mut seen).await;
    // An agentState event, which this webhook did not ask for.
    crm.send(Message::text(
        json!({"type": "setState", "id": 2, "state": "paused"}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(next_state(&mut crm, &mut seen).await["state"], "paused");
    let mut erp = open(srv.addr).await;
    let erp_token = token_for(&srv.config, "erp", kam.port, "pass1001", 600);
    erp.send(Message::text(
        json!({"type": "connect", "id": 1, "token": erp_token}).to_string(),
    ))
    .await
    .unwrap();
    while next(&mut erp, &mut seen).await["state"] != "registered" {}
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (evs, metrics) = loop {
        let evs = events(&got);
        let (_, _, body) = get_raw(srv.addr, "/metrics", None, "").await;
        let metrics = String::from_utf8_lossy(&body).into_owned();
        let erp_failed = metrics.lines().any(|l| {
            l.starts_with("callgate_webhook_failed_attempts_total{app=\"erp\"}")
                && !l.ends_with(" 0")
        });
        let crm_got = evs.iter().any(|e| e["state"] == "registered");
        if (erp_failed && crm_got) || tokio::time::Instant::now() > deadline {
            break (evs, metrics);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        evs.iter().any(|e| e["state"] == "registered"),
        "{evs:?}\n{metrics}"
    );
    // (Time for the agentState to arrive, were it sent.)
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = got.lock().unwrap().clone();
    assert!(
        all.iter().all(|d| d.valid && d.body["app"] == "crm"),
        "only crm's deliveries, each signed: {all:#?}"
    );
    assert!(
        all.iter()
            .all(|d| d.body["event"]["type"] == "registration"),
        "only the types asked for (no agentState): {all:#?}"
    );
    assert!(
        metrics.lines().any(|l| l
            .starts_with("callgate_webhook_failed_attempts_total{app=\"erp\"}")
            && !l.ends_with(" 0")),
        "{metrics}"
    );
    assert!(
        metrics.contains("callgate_webhook_delivered_total{app=\"erp\"} 0"),
        "{metrics}"
    );
    srv.shut_down().await;
}

/// The demo: off with a written configuration unless switched on (both endpoints 404); on,
/// it says what to call, refuses a token to a request that came through a proxy (a reverse
/// proxy on this machine makes every visitor look local), and its token logs the page in and
/// registers with the demo PBX (digest over real SIP).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_is_off_unless_switched_on_and_hands_tokens_to_this_machine_only() {
    use common::sse::{get_raw, request};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn post(addr: std::net::SocketAddr, extra: &str) -> (u16, Value) {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "POST /api/v1/demo/token HTTP/1.0\r\nHost: {addr}\r\n{extra}Content-Length: 0\r\n\r\n"
        );
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut all = String::new();
        tokio::time::timeout(Duration::from_secs(5), tcp.read_to_string(&mut all))
            .await
            .unwrap()
            .unwrap();
        let status = all
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = all.split("\r\n\r\n").nth(1).unwrap_or_default();
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    let mut off = server().await;
    let (status, _, _) = get_raw(off.addr, "/api/v1/demo", None, "").await;
    assert_eq!(status, 404);
    let (status, body) = post(off.addr, "").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    off.shut_down().await;

    let mut srv = server_with_tables(
        &format!("[apps.demo]\nkeys = [\"{KEY}\"]\n"),
        "",
        "",
        &format!("[demo]\nenabled = true\nsip_port = {}\n", free_udp_port()),
    )
    .await;
    let (status, info) = request(srv.addr, "GET", "/api/v1/demo", None, None).await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["numbers"][0]["number"], "600", "{info}");
    for proxied in [
        "X-Forwarded-For: 203.0.113.5\r\n",
        "Forwarded: for=203.0.113.5\r\n",
    ] {
        let (status, body) = post(srv.addr, proxied).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (403, Some("forbidden")),
            "{proxied}"
        );
    }
    let (status, body) = post(srv.addr, "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["extension"], "1001", "{body}");
    let token = body["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("demo:"), "{token}");
    let mut ws = open(srv.addr).await;
    ws.send(Message::text(
        json!({"type": "connect", "id": 1, "token": token}).to_string(),
    ))
    .await
    .unwrap();
    let mut seen = Vec::new();
    loop {
        let ev = next(&mut ws, &mut seen).await;
        assert_ne!(ev["state"], "failed", "{ev}");
        if ev["type"] == "registration" && ev["state"] == "registered" {
            break;
        }
    }
    // The next page is the next extension.
    let (_, body) = post(srv.addr, "").await;
    assert_eq!(body["extension"], "1002", "{body}");
    let mut other = open(srv.addr).await;
    other
        .send(Message::text(
            json!({"type": "connect", "id": 1, "token": body["token"]}).to_string(),
        ))
        .await
        .unwrap();
    while next(&mut other, &mut seen).await["state"] != "registered" {}

    // 1001 calls the echo and transfers it to 1002 (blind): 1002's page rings with the echo,
    // answers it and hears itself; 1001's call ends transferred.
    let (mut page, call_id) = place_call(&mut ws, &mut seen, 2, "600").await;
    while next(&mut ws, &mut seen).await["state"] != "established" {}
    // A digit pressed in the echo call comes back as its two tones (5: 770 + 1336 Hz).
    ws.send(Message::text(
        json!({"type": "dtmf", "id": 4, "callId": call_id, "digits": "5"}).to_string(),
    ))
    .await
    .unwrap();
    let goertzel = |frame: &[u8], freq: f64| {
        let k = 2.0 * (2.0 * std::f64::consts::PI * freq / 8000.0).cos();
        let (mut s1, mut s2) = (0.0f64, 0.0f64);
        for b in frame {
            let s0 = f64::from(callgate::media::g711::ulaw_decode(*b)) + k * s1 - s2;
            s2 = s1;
            s1 = s0;
        }
        s1 * s1 + s2 * s2 - k * s1 * s2
    };
    // Silence from the "microphone" (u-law 0xff), so what comes back is the digit.
    let heard = talk_and_hear(&mut page, 0xff, 75).await;
    let digit_frames = heard
        .iter()
        .filter(|p| {
            let (low, high, off) = (goertzel(p, 770.0), goertzel(p, 1336.0), goertzel(p, 1209.0));
            low > 10.0 * off && high > 10.0 * off && low > 1e9
        })
        .count();
    assert!(
        digit_frames >= 3,
        "the digit came back as tones in {digit_frames} frames"
    );
    ws.send(Message::text(
        json!({"type": "transfer", "id": 3, "callId": call_id, "to": "1002"}).to_string(),
    ))
    .await
    .unwrap();
    let incoming = loop {
        let ev = next(&mut other, &mut seen).await;
        if ev["type"] == "incoming" {
            break ev;
        }
    };
    assert_eq!(incoming["from"], "600", "{incoming}");
    let transferred_id = incoming["callId"].as_str().unwrap().to_owned();
    let mut second = answer_incoming(&mut other, &mut seen, &transferred_id).await;
    let ended = loop {
        let ev = next(&mut ws, &mut seen).await;
        if ev["type"] == "call" && ev["state"] == "ended" {
            break ev;
        }
    };
    assert_eq!(ended["endReason"], "transferred", "{ended}");
    let back = talk_and_hear(&mut second, 0x5a, 50)
        .await
        .iter()
        .filter(|p| **p == [0x5a; 160])
        .count();
    assert!(back >= 40, "1002 hears the echo: {back} of 50 packets");
    other
        .send(Message::text(
            json!({"type": "hangup", "id": 3, "callId": transferred_id}).to_string(),
        ))
        .await
        .unwrap();
    while next(&mut other, &mut seen).await["state"] != "ended" {}
    drop((ws, other, page, second));
    srv.shut_down().await;
}

/// Sends `n` 20 ms PCMU packets of `byte` from `page`'s "microphone"; what it heard meanwhile
/// and for half a second after.
async fn talk_and_hear(page: &mut common::rtc_peer::RtcPeer, byte: u8, n: u16) -> Vec<Vec<u8>> {
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let deadline = tokio::time::Instant::now() + Duration::from_millis(u64::from(n) * 20 + 500);
    let (mut sent, mut heard) = (0u16, Vec::new());
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => return heard,
            _ = tick.tick(), if sent < n => {
                let mut b = Vec::new();
                callgate::media::rtp::RtpPacket { marker: false, payload_type: 0, sequence: sent, timestamp: u32::from(sent) * 160, ssrc: 9, payload: &[byte; 160] }.write(&mut b);
                page.send(&b).await;
                sent += 1;
            }
            Some((_, p)) = page.heard.recv() => heard.push(p),
        }
    }
}
