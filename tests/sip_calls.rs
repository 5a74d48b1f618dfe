//! Calls through a real Kamailio to and from sipp far ends: answered and hung up from each side,
//! busy, unknown number, CANCEL while ringing, inbound answered / rejected / missed.
//! Run inside a private network namespace (tests/run). Media is not exchanged here (SDP only).
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use callgate::sip::call::{CallEvent, EndReason, TransferState};
use callgate::sip::endpoint::{CallHandle, Endpoint, RegistrationHandle};
use callgate::sip::sdp::{AudioSdp, Direction};
use common::peers::{Kamailio, Sipp, free_udp_port};

const LIMIT: Duration = Duration::from_secs(15);

struct Agent {
    kam: Kamailio,
    ep: Endpoint,
    reg: RegistrationHandle,
}

async fn agent() -> Agent {
    agent_with(true).await
}

async fn agent_with(call_waiting: bool) -> Agent {
    // RUST_LOG=callgate=debug shows the SIP flow (methods and status codes only).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let kam = Kamailio::start(free_udp_port());
    let settings = callgate::sip::endpoint::Settings {
        call_waiting,
        min_session_expires: Duration::from_secs(2),
        trusted_peers: Vec::new(),
        ..common::agent::settings()
    };
    let (ep, reg) = common::agent::registered_1001(settings, kam.port).await;
    Agent { kam, ep, reg }
}

fn sdp() -> String {
    AudioSdp::offer(
        "127.0.0.1".parse().unwrap(),
        40000,
        &["PCMU", "PCMA"],
        1,
        Direction::SendRecv,
    )
    .to_sdp()
}

async fn next(call: &mut CallHandle) -> CallEvent {
    tokio::time::timeout(LIMIT, call.next_event())
        .await
        .expect("a call event in time")
        .expect("call events end only after Ended")
}

async fn until_ended(call: &mut CallHandle) -> (Vec<CallEvent>, EndReason, Option<u16>) {
    let mut seen = Vec::new();
    loop {
        match next(call).await {
            CallEvent::Ended { reason, status, .. } => return (seen, reason, status),
            other => seen.push(other),
        }
    }
}

/// Waits for the answer, then lets our ACK reach the far end before the test sends anything else
/// in the dialog: Kamailio's two workers may reorder back-to-back requests, which sipp does not
/// tolerate (a real phone does, and a person never acts within microseconds of the answer).
async fn answered(call: &mut CallHandle) {
    loop {
        match next(call).await {
            CallEvent::Answered { .. } => break,
            CallEvent::Ended { reason, status, .. } => {
                panic!("ended before answer: {reason:?} {status:?}")
            }
            _ => {}
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
}

async fn sipp_done(mut sipp: Sipp) {
    let (ok, log) = tokio::task::spawn_blocking(move || sipp.wait(LIMIT))
        .await
        .expect("join");
    assert!(ok, "sipp scenario failed:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_answered_and_hung_up_by_us() {
    let a = agent().await;
    let far = Sipp::uas(a.kam.port, "1002", "pass1002", "uas_answer.xml");
    let mut call = a.ep.dial(&a.reg, "1002", sdp()).await.expect("dial");
    let mut seen = Vec::new();
    loop {
        match next(&mut call).await {
            CallEvent::Answered { answer } => {
                let answer = answer.expect("SDP answer in the 200");
                assert_eq!(answer.voice_codec().map(|c| c.name.as_str()), Some("PCMU"));
                break;
            }
            CallEvent::Ended { .. } => panic!("ended early: {seen:?}\n{}", a.kam.log()),
            other => seen.push(other),
        }
    }
    assert!(seen.contains(&CallEvent::Ringing), "{seen:?}");
    call.hangup();
    let (_, reason, _) = until_ended(&mut call).await;
    assert_eq!(reason, EndReason::LocalHangup);
    sipp_done(far).await; // sipp saw our ACK and our BYE, and answered the BYE
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_answered_and_hung_up_by_them() {
    let a = agent().await;
    let far = Sipp::uas(a.kam.port, "1002", "pass1002", "uas_hangup.xml");
    let mut call = a.ep.dial(&a.reg, "1002", sdp()).await.expect("dial");
    let (seen, reason, _) = until_ended(&mut call).await;
    assert!(
        seen.iter().any(|e| matches!(e, CallEvent::Answered { .. })),
        "{seen:?}"
    );
    assert_eq!(reason, EndReason::RemoteHangup);
    sipp_done(far).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_busy_and_unknown() {
    let a = agent().await;
    let far = Sipp::uas(a.kam.port, "1002", "pass1002", "uas_busy.xml");
    let mut call = a.ep.dial(&a.reg, "1002", sdp()).await.expect("dial");
    let (_, reason, status) = until_ended(&mut call).await;
    assert_eq!((reason, status), (EndReason::Failed, Some(486)));
    sipp_done(far).await;

    let mut call = a.ep.dial(&a.reg, "1999", sdp()).await.expect("dial");
    let (_, reason, status) = until_ended(&mut call).await;
    assert_eq!((reason, status), (EndReason::Failed, Some(404)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_cancelled_while_ringing() {
    let a = agent().await;
    let far = Sipp::uas(a.kam.port, "1002", "pass1002", "uas_ring.xml");
    let mut call = a.ep.dial(&a.reg, "1002", sdp()).await.expect("dial");
    assert_eq!(next(&mut call).await, CallEvent::Ringing);
    call.hangup();
    let (_, reason, status) = until_ended(&mut call).await;
    assert_eq!((reason, status), (EndReason::Cancelled, Some(487)));
    sipp_done(far).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_answered_then_caller_hangs_up() {
    let mut a = agent().await;
    let caller = Sipp::uac(a.kam.port, "1001", "uac_answered.xml");
    let inc = tokio::time::timeout(LIMIT, a.reg.next_incoming())
        .await
        .expect("incoming")
        .expect("call");
    assert_eq!(inc.from.user(), "1002");
    let offer = inc.offer.clone().expect("offer");
    assert_eq!(offer.voice_codec().map(|c| c.pt), Some(0));
    let mut call = inc.call;
    let answer = AudioSdp::answer(
        &offer,
        "127.0.0.1".parse().unwrap(),
        40002,
        &["PCMU"],
        5,
        Direction::SendRecv,
    )
    .unwrap();
    call.answer(answer.to_sdp());
    assert_eq!(next(&mut call).await, CallEvent::Confirmed);
    let (_, reason, _) = until_ended(&mut call).await;
    assert_eq!(reason, EndReason::RemoteHangup);
    sipp_done(caller).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_rejected_busy() {
    let mut a = agent().await;
    let scenario = "probe_invite.xml";
    // The probe expects __EXPECTED__; use a copy that expects 486.
    let dir = common::TempDir::new("reject");
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/peers")
            .join(scenario),
    )
    .unwrap()
    .replace("__EXPECTED__", "486");
    let _ = dir.write("expect486.xml", &text);
    let caller = tokio::task::spawn_blocking({
        let port = a.kam.port;
        move || common::peers::sipp_probe(port, "1001", 486)
    });
    let inc = tokio::time::timeout(LIMIT, a.reg.next_incoming())
        .await
        .expect("incoming")
        .expect("call");
    let mut call = inc.call;
    call.reject(486, "Busy Here");
    let (_, reason, status) = until_ended(&mut call).await;
    assert_eq!((reason, status), (EndReason::Rejected, Some(486)));
    let (ok, log) = caller.await.expect("join");
    assert!(ok, "caller did not see 486:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_cancelled_by_caller_is_missed() {
    let mut a = agent().await;
    let caller = Sipp::uac(a.kam.port, "1001", "uac_cancel.xml");
    let inc = tokio::time::timeout(LIMIT, a.reg.next_incoming())
        .await
        .expect("incoming")
        .expect("call");
    let mut call = inc.call;
    let (_, reason, status) = until_ended(&mut call).await;
    assert_eq!((reason, status), (EndReason::Missed, Some(487)));
    sipp_done(caller).await;
    drop(a.reg);
    a.ep.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn we_hold_and_resume() {
    let a = agent().await;
    let far = Sipp::uas(a.kam.port, "1002", "pass1002", "uas_hold.xml");
    let mut call = a.ep.dial(&a.reg, "1002", sdp()).await.expect("dial");
    answered(&mut call).await;
    call.hold();
    match next(&mut call).await {
        CallEvent::Hold { held: true, answer } => {
            assert_eq!(answer.map(|a| a.direction), Some(Direction::RecvOnly));
        }
        other => panic!("{other:?}"),
    }
    // Kamailio's two workers may relay our ACK and an immediate resume re-INVITE out of order,
    // which sipp does not tolerate; a person never resumes within microseconds anyway.
    tokio::time::sleep(Duration::from_millis(300)).await;
    call.unhold();
    match next(&mut call).await {
        CallEvent::Hold { held: false, .. } => {}
        other => panic!("{other:?}"),
    }
    call.hangup();
    let (_, reason, _) = until_ended(&mut call).await;
    assert_eq!(reason, EndReason::LocalHangup);
    sipp_done(far).await; // sipp checked our sendonly / sendrecv offers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn far_end_holds_and_resumes_us() {
    let mut a = agent().await;
    let caller = Sipp::uac(a.kam.port, "1001", "uac_hold.xml");
    let inc = tokio::time::timeout(LIMIT, a.reg.next_incoming())
        .await
        .expect("incoming")
        .expect("call");
    let offer = inc.offer.clone().expect("offer");
    let mut call = inc.call;
    let answer = AudioSdp::answer(
        &offer,
        "127.0.0.1".parse().unwrap(),
        40004,
        &["PCMU"],
        5,
        Direction::SendRecv,
    )
    .unwrap();
    call.answer(answer.to_sdp());
    assert_eq!(next(&mut call).await, CallEvent::Confirmed);
    assert!(matches!(
        next(&mut call).await,
        CallEvent::RemoteHold { held: true, .. }
    ));
    assert!(matches!(
        next(&mut call).await,
        CallEvent::RemoteHold { held: false, .. }
    ));
    let (_, reason, _) = until_ended(&mut call).await;
    assert_eq!(reason, EndReason::RemoteHangup);
    sipp_done(caller).await; // sipp checked our recvonly / sendrecv answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dtmf_by_sip_info_both_ways() {
    let mut a = agent().await;
    // Ours reach the far end, in order (sipp checks each INFO body).
    let far = Sipp::uas(a.kam.port, "1002", "pass1002", "uas_dtmf.xml");
    let mut call = a.ep.dial(&a.reg, "1002", sdp()).await.expect("dial");
    answered(&mut call).await;
    call.dtmf_info("1#");
    tokio::time::sleep(Duration::from_millis(500)).await;
    call.hangup();
    until_ended(&mut call).await;
    sipp_done(far).await;

    // Theirs are reported.
    let caller = Sipp::uac(a.kam.port, "1001", "uac_dtmf.xml");
    let inc = tokio::time::timeout(LIMIT, a.reg.next_incoming())
        .await
        .expect("incoming")
        .expect("call");
    let offer = inc.offer.clone().expect("offer");
    let mut call = inc.call;
    call.answer(
        AudioSdp::answer(
            &offer,
            "127.0.0.1".parse().unwrap(),
            40006,
            &["PCMU"],
            5,
            Direction::SendRecv,
        )
        .unwrap()
        .to_sdp(),
    );
    let (seen, reason, _) = until_ended(&mut call).await;
    assert!(
        seen.contains(&CallEvent::Dtmf {
            digit: '7',
            duration_ms: Some(200)
        }),
        "{seen:?}"
    );
    assert_eq!(reason, EndReason::RemoteHangup);
    sipp_done(caller).await;
}

/// Blind transfer: we call baresip (1002), then transfer it to 1003 (sipp, which answers and later
/// hangs up). baresip follows the REFER, 1003 really gets the call, and our leg ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blind_transfer_reaches_the_third_party() {
    let a = agent().await;
    let third = Sipp::uas(a.kam.port, "1003", "pass1003", "uas_hangup.xml");
    let transferee = common::peers::Baresip::start(a.kam.port, "1002", "pass1002");
    let mut call = a.ep.dial(&a.reg, "1002", sdp()).await.expect("dial");
    answered(&mut call).await;
    call.transfer(&format!("sip:1003@127.0.0.1:{}", a.kam.port));
    let (seen, reason, _) = until_ended(&mut call).await;
    assert!(
        seen.iter().any(|e| matches!(
            e,
            CallEvent::Transfer {
                state: TransferState::Accepted,
                ..
            }
        )),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|e| matches!(
            e,
            CallEvent::Transfer {
                state: TransferState::Succeeded,
                ..
            }
        )),
        "{seen:?}\n{}",
        transferee.log()
    );
    assert_eq!(reason, EndReason::Transferred);
    // 1003 answered the transferred call (and hung it up): the third party really got it.
    sipp_done(third).await;
}

/// Attended transfer: 1002 (the transferee) is held while we consult 1003 (the target); then we
/// REFER 1002 to 1003 with a Replaces naming the consultation dialog. Both sipp peers log what
/// they saw, and the Replaces must name exactly the dialog 1003 has with us (its Call-ID, its own
/// tag as to-tag, ours as from-tag). 1002 reports success; both our legs end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attended_transfer_replaces_the_consultation_dialog() {
    let a = agent().await;
    let transferee = Sipp::uas_with(
        a.kam.port,
        "1002",
        "pass1002",
        "uas_transferee.xml",
        &["-trace_logs"],
    );
    let target = Sipp::uas_with(
        a.kam.port,
        "1003",
        "pass1003",
        "uas_consulted.xml",
        &["-trace_logs"],
    );
    let mut first = a.ep.dial(&a.reg, "1002", sdp()).await.expect("dial");
    answered(&mut first).await;
    first.hold();
    assert!(matches!(
        next(&mut first).await,
        CallEvent::Hold { held: true, .. }
    ));
    let mut consult =
        a.ep.dial(&a.reg, "1003", sdp())
            .await
            .expect("dial consult");
    answered(&mut consult).await;
    first.complete_transfer(&consult);
    let (seen, reason, _) = until_ended(&mut first).await;
    assert!(
        seen.iter().any(|e| matches!(
            e,
            CallEvent::Transfer {
                state: TransferState::Succeeded,
                ..
            }
        )),
        "{seen:?}"
    );
    assert_eq!(reason, EndReason::Transferred);
    let (_, consult_reason, _) = until_ended(&mut consult).await;
    assert_eq!(consult_reason, EndReason::LocalHangup);
    let logs = tokio::task::spawn_blocking(move || {
        let (mut c, mut b) = (transferee, target);
        (c.wait(LIMIT), b.wait(LIMIT))
    })
    .await
    .unwrap();
    let ((c_ok, c_log), (b_ok, b_log)) = logs;
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
    let replaces = words(&c_log, "REPLACES ");
    let dialog = words(&b_log, "DIALOG ");
    assert_eq!(replaces.len(), 3, "{replaces:?}");
    assert_eq!(replaces, dialog, "Replaces vs the target's dialog");
}

/// Consult: the first call is held while a second one is made, then resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consult_call_while_the_first_is_held() {
    let a = agent().await;
    let first_far = Sipp::uas(a.kam.port, "1002", "pass1002", "uas_hold.xml");
    let second_far = Sipp::uas(a.kam.port, "1003", "pass1003", "uas_answer.xml");
    let mut first = a.ep.dial(&a.reg, "1002", sdp()).await.expect("dial");
    answered(&mut first).await;
    first.hold();
    assert!(matches!(
        next(&mut first).await,
        CallEvent::Hold { held: true, .. }
    ));
    let mut consult =
        a.ep.dial(&a.reg, "1003", sdp())
            .await
            .expect("dial consult");
    assert_ne!(consult.call_id(), first.call_id());
    assert!(
        consult.call_id().starts_with("c-") && consult.call_id().len() == 18,
        "{}",
        consult.call_id()
    );
    answered(&mut consult).await;
    consult.hangup();
    until_ended(&mut consult).await;
    first.unhold();
    assert!(matches!(
        next(&mut first).await,
        CallEvent::Hold { held: false, .. }
    ));
    first.hangup();
    until_ended(&mut first).await;
    sipp_done(second_far).await;
    sipp_done(first_far).await;
}

/// With call waiting off, a second caller gets 486 while the agent is on a call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_agent_refuses_a_second_call_when_call_waiting_is_off() {
    let a = agent_with(false).await;
    let far = Sipp::uas(a.kam.port, "1003", "pass1003", "uas_answer.xml");
    let mut call = a.ep.dial(&a.reg, "1003", sdp()).await.expect("dial");
    while !matches!(next(&mut call).await, CallEvent::Answered { .. }) {}
    let port = a.kam.port;
    let (ok, log) =
        tokio::task::spawn_blocking(move || common::peers::sipp_probe(port, "1001", 486))
            .await
            .expect("join");
    assert!(ok, "second caller did not get 486:\n{log}");
    call.hangup();
    until_ended(&mut call).await;
    sipp_done(far).await;
}

/// RFC 4028: the caller asks for a 4 s session it refreshes itself, then goes silent; callgate
/// ends the dead call with a BYE at 4 s - 4/3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_timer_ends_a_dead_call() {
    let mut a = agent().await;
    let caller = Sipp::uac(a.kam.port, "1001", "uac_session_timer.xml");
    let inc = tokio::time::timeout(LIMIT, a.reg.next_incoming())
        .await
        .expect("incoming")
        .expect("call");
    let offer = inc.offer.clone().expect("offer");
    let mut call = inc.call;
    call.answer(
        AudioSdp::answer(
            &offer,
            "127.0.0.1".parse().unwrap(),
            40008,
            &["PCMU"],
            5,
            Direction::SendRecv,
        )
        .unwrap()
        .to_sdp(),
    );
    let t0 = std::time::Instant::now();
    let (_, reason, status) = until_ended(&mut call).await;
    let took = t0.elapsed();
    assert_eq!((reason, status), (EndReason::Timeout, Some(408)));
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(5),
        "{took:?}"
    );
    sipp_done(caller).await;
}
