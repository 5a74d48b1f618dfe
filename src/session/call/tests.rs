//! The call core on a fake clock: every timer is a jump of `now`, nothing sleeps.

use std::time::{Duration, Instant};

use super::*;
use crate::sip::call::{Party, TransferState};

const BROWSER: &str = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0 126\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:126 telephone-event/8000\r\n";
const FAR_TE: &str = "v=0\r\no=x 1 1 IN IP4 127.0.0.1\r\ns=x\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n";
const FAR_PLAIN: &str = "v=0\r\no=x 1 1 IN IP4 127.0.0.1\r\ns=x\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6002 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";
const FAR_PCMA: &str = "v=0\r\no=x 1 1 IN IP4 127.0.0.1\r\ns=x\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6004 RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\n";
const MOVED: &str = "v=0\r\no=x 1 2 IN IP4 127.0.0.2\r\ns=x\r\nc=IN IP4 127.0.0.2\r\nt=0 0\r\nm=audio 7000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n";

fn sdp(s: &str) -> AudioSdp {
    AudioSdp::parse(s.as_bytes()).unwrap()
}

fn info(direction: Direction) -> CallInfo {
    CallInfo {
        call_id: "c-0000000000000001".into(),
        sip_call_id: "x@callgate".into(),
        app: "crm".into(),
        agent: "1001@pbx".into(),
        direction,
        peer: "1002".into(),
        data: [("customerId".to_owned(), "C-7".to_owned())].into(),
    }
}

fn settings(refer: Option<DialPlan>) -> CallSettings {
    CallSettings {
        dtmf_mode: DtmfMode::Rfc4733,
        media_timeout: Some(Duration::from_secs(30)),
        refer,
    }
}

const T0_MS: i64 = 1_800_000_000_000;

fn outbound(t0: Instant, refer: Option<DialPlan>) -> CallCore {
    CallCore::new(
        t0,
        T0_MS,
        info(Direction::Outbound),
        settings(refer),
        Some(sdp(BROWSER)),
        None,
    )
}

fn drain(c: &mut CallCore) -> Vec<Output> {
    std::iter::from_fn(|| c.poll_output()).collect()
}

/// The `call` states among `out`.
fn states(out: &[Output]) -> Vec<CallState> {
    out.iter()
        .filter_map(|o| match o {
            Output::Event(Event::Call { state, .. }) => Some(*state),
            _ => None,
        })
        .collect()
}

/// The history row among `out`.
fn finished_row(out: &[Output]) -> &crate::cdr::CallRecord {
    out.iter()
        .find_map(|o| match o {
            Output::Finished(r) => Some(&**r),
            _ => None,
        })
        .expect("a row")
}

fn flows(out: &[Output]) -> Vec<Flow> {
    out.iter()
        .filter_map(|o| match o {
            Output::Flow(f) => Some(*f),
            _ => None,
        })
        .collect()
}

/// An outbound call answered with `far` at `t0 + 2 s`.
fn answered(t0: Instant, far: &str) -> CallCore {
    let mut c = outbound(t0, None);
    assert_eq!(states(&drain(&mut c)), [CallState::Trying]);
    c.handle_sip(
        t0 + Duration::from_secs(2),
        CallEvent::Answered {
            answer: Some(sdp(far)),
        },
    );
    let out = drain(&mut c);
    assert!(
        out.iter().any(
            |o| matches!(o, Output::StartBridge { remote, .. } if remote.port() == sdp(far).port)
        ),
        "{out:?}"
    );
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::SetupTime(d) if *d == Duration::from_secs(2)))
    );
    assert_eq!(states(&out), [CallState::Established]);
    c
}

/// The row is written as the call starts (a crash mid-call keeps it) and brought up to date
/// once at the answer; the end completes it.
#[test]
fn the_history_row_is_written_at_the_start_and_the_answer() {
    let t0 = Instant::now();
    let mut c = outbound(t0, None);
    let out = drain(&mut c);
    match &out[..] {
        [Output::Started(row), ..] => {
            assert_eq!(row.end_reason, crate::cdr::IN_PROGRESS);
            assert_eq!(
                (row.started_at, row.ended_at, row.answered_at),
                (T0_MS, None, None)
            );
            assert_eq!((row.from.as_str(), row.to.as_str()), ("1001@pbx", "1002"));
        }
        other => panic!("the row comes first: {other:?}"),
    }
    let answered_at = |out: &[Output]| {
        out.iter()
            .filter_map(|o| match o {
                Output::Answered(at) => Some(*at),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let t1 = t0 + Duration::from_millis(2_500);
    c.handle_sip(
        t1,
        CallEvent::Answered {
            answer: Some(sdp(FAR_TE)),
        },
    );
    assert_eq!(answered_at(&drain(&mut c)), [T0_MS + 2_500]);
    // A 200 OK retransmitted or a second answer: the first one stands.
    c.handle_sip(
        t1 + Duration::from_secs(1),
        CallEvent::Answered { answer: None },
    );
    assert_eq!(answered_at(&drain(&mut c)), Vec::<i64>::new());
}

#[test]
fn hold_and_resume_both_ways() {
    let t0 = Instant::now();
    let mut c = answered(t0, FAR_TE);
    let t = t0 + Duration::from_secs(5);
    // The agent holds, then resumes: the bridge holds and forwards again.
    c.handle_sip(
        t,
        CallEvent::Hold {
            held: true,
            answer: None,
        },
    );
    let out = drain(&mut c);
    assert_eq!(
        (states(&out), flows(&out)),
        (vec![CallState::Held], vec![Flow::Hold])
    );
    assert_eq!(c.poll_timeout(), None, "no media watch while held");
    c.handle_sip(
        t,
        CallEvent::Hold {
            held: false,
            answer: None,
        },
    );
    let out = drain(&mut c);
    assert_eq!(
        (states(&out), flows(&out)),
        (vec![CallState::Established], vec![Flow::Forward])
    );
    // The far end holds, then resumes: the page is told, the bridge keeps forwarding.
    c.handle_sip(
        t,
        CallEvent::RemoteHold {
            held: true,
            offer: None,
        },
    );
    let out = drain(&mut c);
    assert_eq!(
        (states(&out), flows(&out)),
        (vec![CallState::HeldByRemote], vec![])
    );
    assert_eq!(c.poll_timeout(), None);
    c.handle_sip(
        t + Duration::from_secs(1),
        CallEvent::RemoteHold {
            held: false,
            offer: Some(sdp(MOVED)),
        },
    );
    let out = drain(&mut c);
    assert_eq!(states(&out), [CallState::Established]);
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Retarget { remote, .. } if remote.port() == 7000)),
        "its re-INVITE moved the media: {out:?}"
    );
    assert_eq!(c.poll_timeout(), None, "no silence reported");
    c.handle_bridge(t, BridgeInput::Media(MediaActivity::Silent { since: t0 }));
    assert_eq!(
        c.poll_timeout(),
        Some(t + Duration::from_secs(31)),
        "counted from the resume"
    );
}

#[test]
fn media_timeout_hangs_up_only_a_silent_unheld_call() {
    let t0 = Instant::now();
    let mut c = answered(t0, FAR_TE);
    let answer = t0 + Duration::from_secs(2);
    assert_eq!(c.poll_timeout(), None, "media flows: nothing to watch");
    // The bridge reports silence from before the answer: the watch counts from the answer.
    c.handle_bridge(
        answer,
        BridgeInput::Media(MediaActivity::Silent { since: t0 }),
    );
    assert_eq!(c.poll_timeout(), Some(answer + Duration::from_secs(30)));
    // Media came back, then stopped 10 s after the answer: the watch moves with it.
    c.handle_bridge(answer, BridgeInput::Media(MediaActivity::Flowing));
    assert_eq!(c.poll_timeout(), None);
    let stopped = answer + Duration::from_secs(10);
    c.handle_bridge(
        stopped + Duration::from_millis(500),
        BridgeInput::Media(MediaActivity::Silent { since: stopped }),
    );
    let t = answer + Duration::from_secs(30);
    c.handle_timeout(t);
    assert!(drain(&mut c).is_empty(), "media 20 s ago: not yet");
    assert_eq!(c.poll_timeout(), Some(answer + Duration::from_secs(40)));
    let t = answer + Duration::from_secs(40);
    c.handle_timeout(t);
    let out = drain(&mut c);
    assert!(matches!(out[..], [Output::HangupMediaTimeout]), "{out:?}");
    assert_eq!(c.poll_timeout(), None, "once");
    // The BYE's end comes back as the call's end, with its history row.
    c.handle_sip(
        t,
        CallEvent::Ended {
            reason: EndReason::MediaTimeout,
            status: None,
            phrase: String::new(),
        },
    );
    let out = drain(&mut c);
    let row = finished_row(&out);
    assert_eq!(row.end_reason, "media_timeout");
    assert_eq!(row.answered_at, Some(T0_MS + 2_000));
    assert_eq!(row.ended_at, Some(T0_MS + 42_000));
    assert_eq!(row.duration_ms, 40_000);
    assert_eq!((row.from.as_str(), row.to.as_str()), ("1001@pbx", "1002"));
    assert!(c.is_finished());
}

#[test]
fn refer_is_followed_only_where_the_dial_plan_allows() {
    let plan = DialPlan {
        deny_prefixes: vec!["+1900".into()],
        ..DialPlan::default()
    };
    let t0 = Instant::now();
    let mut c = outbound(t0, Some(plan));
    drain(&mut c);
    let referred = |c: &mut CallCore, target: &str| {
        c.handle_sip(
            t0,
            CallEvent::Referred {
                target: target.into(),
            },
        );
        drain(c)
    };
    let out = referred(&mut c, "sip:1003@pbx");
    assert!(matches!(out[0], Output::FollowRefer(true)), "{out:?}");
    assert!(matches!(
        &out[1],
        Output::Event(Event::Referred { state: Progress::Accepted, to: Some(t), .. }) if t == "sip:1003@pbx"
    ));
    let out = referred(&mut c, "sip:+19005550100@pbx");
    assert!(matches!(out[0], Output::FollowRefer(false)), "{out:?}");
    assert!(matches!(
        out[1],
        Output::Event(Event::Referred {
            state: Progress::Declined,
            ..
        })
    ));
    // With sip.accept_refer off, nothing is followed.
    let mut off = outbound(t0, None);
    drain(&mut off);
    let out = referred(&mut off, "sip:1003@pbx");
    assert!(matches!(out[0], Output::FollowRefer(false)), "{out:?}");
    // A followed transfer that reaches the target: the same call goes on with the new party.
    let mut c = answered(t0, FAR_TE);
    c.handle_sip(
        t0,
        CallEvent::Replaced {
            peer: Party {
                uri: "sip:1003@pbx".into(),
                display: None,
            },
            answer: Some(sdp(MOVED)),
        },
    );
    let out = drain(&mut c);
    assert!(out.iter().any(|o| matches!(o, Output::Retarget { .. })));
    assert!(out.iter().any(|o| matches!(o, Output::Event(Event::Call { peer, state: CallState::Established, .. }) if peer == "1003")));
}

#[test]
fn dtmf_goes_in_the_media_when_the_far_end_negotiated_telephone_event() {
    let t0 = Instant::now();
    let mut c = answered(t0, FAR_TE);
    c.handle_page(t0, PageInput::Dtmf("12#".into()));
    let out = drain(&mut c);
    assert!(
        matches!(
            out[..],
            [
                Output::BridgeDtmf('1'),
                Output::BridgeDtmf('2'),
                Output::BridgeDtmf('#')
            ]
        ),
        "{out:?}"
    );
    let mut plain = answered(t0, FAR_PLAIN);
    plain.handle_page(t0, PageInput::Dtmf("12#".into()));
    let out = drain(&mut plain);
    assert!(
        matches!(&out[..], [Output::SipInfo(d)] if d == "12#"),
        "{out:?}"
    );
    // Digits the far end sends reach the page.
    plain.handle_bridge(t0, BridgeInput::Digit('5'));
    let out = drain(&mut plain);
    assert!(matches!(&out[..], [Output::Event(Event::Dtmf { digit, .. })] if digit == "5"));
}

#[test]
fn an_incoming_call_bridges_when_the_agent_answers_and_reports_a_caller_who_gives_up() {
    let t0 = Instant::now();
    let mut c = CallCore::new(
        t0,
        T0_MS,
        info(Direction::Inbound),
        settings(None),
        None,
        Some(sdp(FAR_TE)),
    );
    assert_eq!(states(&drain(&mut c)), [CallState::Ringing]);
    c.handle_page(
        t0 + Duration::from_secs(3),
        PageInput::Answered {
            browser: sdp(BROWSER),
        },
    );
    let out = drain(&mut c);
    assert!(
        out.iter().any(|o| matches!(o, Output::StartBridge { .. })),
        "{out:?}"
    );
    assert!(
        !out.iter().any(|o| matches!(o, Output::SetupTime(_))),
        "inbound"
    );
    assert_eq!(states(&out), [CallState::Established]);

    let mut missed = CallCore::new(
        t0,
        T0_MS,
        info(Direction::Inbound),
        settings(None),
        None,
        Some(sdp(FAR_TE)),
    );
    drain(&mut missed);
    missed.handle_sip(
        t0 + Duration::from_secs(4),
        CallEvent::Ended {
            reason: EndReason::Missed,
            status: Some(487),
            phrase: "Request Terminated".into(),
        },
    );
    let out = drain(&mut missed);
    assert!(matches!(&out[0], Output::Ended(EndReason::Missed)));
    assert!(matches!(&out[1], Output::Event(Event::Missed { from, .. }) if from == "1002"));
    assert_eq!(states(&out), [CallState::Ended]);
    let row = finished_row(&out);
    assert_eq!(
        (row.end_reason.as_str(), row.answered_at, row.sip_status),
        ("missed", None, Some(487))
    );
    assert_eq!((row.from.as_str(), row.to.as_str()), ("1002", "1001@pbx"));
}

#[test]
fn a_new_browser_leg_replaces_the_old_one_before_and_after_the_bridge_starts() {
    let t0 = Instant::now();
    let mut c = outbound(t0, None);
    drain(&mut c);
    // Not bridged yet: the new leg waits in place of the old.
    c.handle_page(
        t0,
        PageInput::NewLeg {
            browser: sdp(BROWSER),
        },
    );
    assert!(matches!(drain(&mut c)[..], [Output::ReplacePendingLeg]));
    c.handle_sip(
        t0,
        CallEvent::EarlyMedia {
            answer: sdp(FAR_TE),
        },
    );
    let out = drain(&mut c);
    assert!(out.iter().any(|o| matches!(o, Output::StartBridge { .. })));
    assert_eq!(states(&out), [CallState::Early]);
    // Bridged: the bridge takes the new leg.
    c.handle_page(
        t0,
        PageInput::NewLeg {
            browser: sdp(BROWSER),
        },
    );
    assert!(matches!(drain(&mut c)[..], [Output::Rebrowse(_)]));
    // A far end that cannot be bridged with the browser's codec: its legs close.
    let mut bad = outbound(t0, None);
    drain(&mut bad);
    bad.handle_sip(
        t0,
        CallEvent::Answered {
            answer: Some(sdp(FAR_PCMA)),
        },
    );
    let out = drain(&mut bad);
    assert!(matches!(out[0], Output::CloseLegs), "{out:?}");
    bad.handle_page(
        t0,
        PageInput::NewLeg {
            browser: sdp(BROWSER),
        },
    );
    assert!(matches!(drain(&mut bad)[..], [Output::CloseNewLeg]));
}

#[test]
fn transfer_progress_reaches_the_page() {
    let t0 = Instant::now();
    let mut c = answered(t0, FAR_TE);
    c.handle_sip(
        t0,
        CallEvent::Transfer {
            state: TransferState::Accepted,
            status: Some(202),
        },
    );
    let out = drain(&mut c);
    assert!(matches!(
        out[..],
        [Output::Event(Event::Transfer {
            state: Progress::Accepted,
            status: Some(202),
            ..
        })]
    ));
    c.handle_sip(
        t0,
        CallEvent::Ended {
            reason: EndReason::Transferred,
            status: None,
            phrase: String::new(),
        },
    );
    let out = drain(&mut c);
    assert_eq!(finished_row(&out).transfer.as_deref(), Some("transferred"));
}
