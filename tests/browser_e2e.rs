//! The capstone: headless Chromium runs the softphone page served by callgate against a real
//! Kamailio, sipp and baresip: log in with a token minted by callgate, call out and answer a call
//! with audio both ways (tones checked at both ends), hold, DTMF, blind transfer, survive a page
//! reload mid-call, refuse bad tokens visibly; nothing the browser received contains the
//! password. Needs Debian's `chromium` and `playwright-core` in tests/browser (tests/run installs
//! both). Screenshots land in tests/artifacts/screenshots/.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use callgate::account::account_from_cli;
use callgate::config::Config;
use callgate::server::Bound;
use common::peers::{Kamailio, Sipp, free_udp_port};
use common::{TempDir, require_tool, run_bounded};

const PASSWORD: &str = "pass1001";
/// The CRM backend's API key for app crm.
const CRM_API_KEY: &str = "browser-crm-api-key-0123456789";
/// The agent the page logs in as.
const AGENT: &str = "1001@127.0.0.1";

/// One browser scenario at a time: three Chromiums, Kamailios and sipps at once overload a
/// 2-core machine and make timing assertions meaningless.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Gateway {
    kam: Kamailio,
    url: String,
    config: Config,
    config_path: std::path::PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: TempDir,
}

impl Gateway {
    async fn start() -> Gateway {
        require_tool("chromium", "apt-get install chromium");
        require_tool("node", "apt-get install nodejs");
        let kam = Kamailio::start(free_udp_port());
        let dir = TempDir::new("browser");
        let cfg = dir.write(
            "callgate.toml",
            &format!(
                "[http]\nlisten = \"127.0.0.1:0\"\n[sip]\nlisten = \"127.0.0.1:0\"\nregistration_grace_secs = 0\n\
                 [media]\nwebrtc_port = {}\n",
                free_udp_port()
            ),
        );
        dir.write(
            "apps.toml",
            "[apps.crm]\nkeys = [\"00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\"]\n\
             api_keys = [\"browser-crm-api-key-0123456789\"]\nauto_answer = true\n\
             states = [\n\
             { id = \"available\", label = \"Available\", may_call_out = true, may_receive = true },\n\
             { id = \"paused\", label = \"Paused\" },\n]\n\
             [apps.crm.call_data]\n\"X-Customer-Id\" = \"customerId\"\n",
        );
        let config = Config::load(&cfg).unwrap();
        let bound = Bound::bind(config.clone()).await.unwrap();
        let url = format!("http://{}/", bound.http_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(bound.serve(async {
            let _ = stopped.await;
        }));
        Gateway {
            kam,
            url,
            config,
            config_path: cfg,
            stop: Some(stop),
            _dir: dir,
        }
    }

    /// The HTTP address.
    fn addr(&self) -> std::net::SocketAddr {
        self.url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .unwrap()
    }

    /// Waits (up to 20 s) until the page's agent is registered, as callgate's /metrics says
    /// (Chromium takes one to several seconds to launch and log in).
    async fn page_registered(addr: std::net::SocketAddr) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::time::Instant::now() < deadline {
            let m = tokio::task::spawn_blocking(move || {
                common::http_get(&addr.to_string(), "/metrics")
            })
            .await
            .unwrap();
            if m.contains("callgate_registrations{state=\"registered\"} 1") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A token as a CRM developer mints one: with `callgate token mint` and the gateway's config.
    fn cli_token(&self) -> String {
        let out = run_bounded(
            common::callgate()
                .args(["token", "mint", "--config"])
                .arg(&self.config_path)
                .args([
                    "--app",
                    "crm",
                    "--login",
                    "1001",
                    "--password",
                    PASSWORD,
                    "--domain",
                    "127.0.0.1",
                ])
                .args(["--port", &self.kam.port.to_string(), "--ttl", "10m"]),
            Duration::from_secs(10),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A token minted in-process (for lifetimes the CLI refuses, such as already expired).
    fn token(&self, ttl: i64) -> String {
        let acct = account_from_cli(
            "1001",
            None,
            PASSWORD.into(),
            "127.0.0.1",
            None,
            Some(self.kam.port),
            None,
        )
        .unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        self.config
            .keyring()
            .mint("crm", &acct, Some(now + ttl), [3; 16])
            .unwrap()
    }

    /// Runs the driver in `mode`; returns its report after checking no frame held the password.
    async fn drive(&self, args: Vec<String>) -> serde_json::Value {
        self.drive_with_mic(args, None, None).await
    }

    /// [`Gateway::drive`] with Chromium's fake microphone playing `mic` (a WAV file).
    /// [`drive`](Self::drive) with `mic` as the microphone's signal, and the browser taking
    /// `slow_answer` ms to apply each SDP answer (a slow machine).
    async fn drive_with_mic(
        &self,
        args: Vec<String>,
        mic: Option<std::path::PathBuf>,
        slow_answer: Option<u64>,
    ) -> serde_json::Value {
        let report = run_driver(args, mic, slow_answer).await;
        for frame in report["frames"].as_array().unwrap() {
            assert!(
                !frame.as_str().unwrap().contains(PASSWORD),
                "the password reached the browser: {frame}"
            );
        }
        report
    }
}

/// Runs tests/browser/drive.js with `args` (see its header), `mic` as the microphone's signal
/// and the browser taking `slow_answer` ms to apply each SDP answer; its report.
async fn run_driver(
    args: Vec<String>,
    mic: Option<std::path::PathBuf>,
    slow_answer: Option<u64>,
) -> serde_json::Value {
    let shots =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/artifacts/screenshots");
    let _ = std::fs::create_dir_all(&shots);
    let out = tokio::task::spawn_blocking(move || {
        run_bounded(
            std::process::Command::new("node")
                .arg(
                    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/drive.js"),
                )
                .args(&args)
                .env("SHOTS", &shots)
                .envs(slow_answer.map(|ms| ("SLOW_ANSWER_MS", ms.to_string())))
                .env("FAKE_AUDIO", mic.unwrap_or_default()),
            Duration::from_secs(90),
        )
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    serde_json::from_str(text.trim()).unwrap_or_else(|_| {
        panic!(
            "driver output: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// The page plays the call's audio: its `<audio>` element holds the call's stream and runs.
fn assert_playing(report: &serde_json::Value) {
    assert_eq!(
        report["stats"]["playing"], true,
        "the page does not play the call's audio: {:#}",
        report["stats"]
    );
}

fn assert_audio(report: &serde_json::Value) {
    assert_playing(report);
    let received = report["stats"]["packetsReceived"].as_u64().unwrap_or(0);
    let sent = report["stats"]["packetsSent"].as_u64().unwrap_or(0);
    // 3 s at 50 packets/s: the fake microphone's audio went out and came back echoed.
    assert!(
        sent >= 100 && received >= 100,
        "sent {sent}, received {received}: {:#}",
        report["stats"]
    );
}

/// Early media: the far end answers 183 with SDP and, for 3 s before its 200, sends audio
/// (sipp echoing the page's microphone, as ringback or an announcement would come). The page
/// plays it then, not only once the call is answered: agents hear ringback and announcements.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_plays_early_media_before_the_answer() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let gw = Gateway::start().await;
    let mut far = Sipp::uas_with(
        gw.kam.port,
        "1002",
        "pass1002",
        "uas_early_media.xml",
        &["-rtp_echo"],
    );
    let report = gw
        .drive(vec![
            "early".into(),
            gw.url.clone(),
            gw.token(600),
            "1002".into(),
        ])
        .await;
    assert!(report.get("error").is_none(), "{report:#}");
    assert_eq!(report["early_state"], "early", "{report:#}");
    assert_playing(&report);
    let received = report["stats"]["packetsReceived"].as_u64().unwrap_or(0);
    let energy = report["stats"]["totalAudioEnergy"].as_f64().unwrap_or(0.0);
    assert!(
        received >= 50 && energy > 0.0,
        "before the answer the page got {received} packets, energy {energy}: {:#}",
        report["stats"]
    );
    assert_eq!(report["ended"], true);
    let (ok, log) = tokio::task::spawn_blocking(move || far.wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(ok, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_logs_in_and_calls_with_audio_both_ways() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let gw = Gateway::start().await;
    let mut far = Sipp::uas_with(
        gw.kam.port,
        "1002",
        "pass1002",
        "uas_answer.xml",
        &["-rtp_echo"],
    );
    let report = gw
        .drive(vec![
            "outbound".into(),
            gw.url.clone(),
            gw.cli_token(),
            "1002".into(),
            "3".into(),
        ])
        .await;
    assert!(
        report.get("error").is_none(),
        "{report:#}\n{}",
        gw.kam.log()
    );
    assert_eq!(report["registered"], true);
    assert_eq!(
        report["agent"], "1001@127.0.0.1",
        "the page shows who is logged in"
    );
    assert_audio(&report);
    assert_eq!(report["ended"], true);
    let (ok, log) = tokio::task::spawn_blocking(move || far.wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(ok, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_answers_an_incoming_call() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let gw = Gateway::start().await;
    let kam_port = gw.kam.port;
    // The caller (sipp as 1002, echoing RTP) dials 1001 once the page is registered.
    let addr = gw.addr();
    let caller = tokio::spawn(async move {
        Gateway::page_registered(addr).await;
        let mut c = Sipp::uac_with(kam_port, "1001", "uac_answered_long.xml", &["-rtp_echo"]);
        tokio::task::spawn_blocking(move || c.wait(Duration::from_secs(30)))
            .await
            .unwrap()
    });
    let report = gw
        .drive(vec![
            "inbound".into(),
            gw.url.clone(),
            gw.token(600),
            "1".into(),
        ])
        .await;
    assert!(
        report.get("error").is_none(),
        "{report:#}\n{}",
        gw.kam.log()
    );
    assert_eq!(report["caller"], "1002", "the banner names the caller");
    assert_eq!(
        report["banner_data"], "customerId: C-1042",
        "the banner shows the dialler's data"
    );
    assert_playing(&report);
    let received = report["stats"]["packetsReceived"].as_u64().unwrap_or(0);
    assert!(received >= 40, "{:#}", report["stats"]);
    assert_eq!(
        report["ended"], true,
        "the caller hung up and the page saw it"
    );
    let (ok, log) = caller.await.unwrap();
    assert!(ok, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_shows_why_a_token_is_refused() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let gw = Gateway::start().await;
    let mut tampered = gw.token(600).into_bytes();
    let i = tampered.len() - 3;
    tampered[i] = if tampered[i] == b'a' { b'b' } else { b'a' };
    for (token, code) in [
        (String::from_utf8(tampered).unwrap(), "bad_mac"),
        (gw.token(-300), "token_expired"),
    ] {
        let report = gw
            .drive(vec!["refused".into(), gw.url.clone(), token])
            .await;
        assert!(report.get("error").is_none(), "{report:#}");
        let shown = report["error_shown"].as_str().unwrap_or_default();
        assert!(
            shown.starts_with(code),
            "the page shows {shown:?}, expected {code}"
        );
        assert_eq!(report["error_visible"], true);
        assert!(
            !report["frames"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f.as_str().unwrap().contains("registration")),
            "nothing registers: {:#}",
            report["frames"]
        );
    }
}

/// A CRM that opens the page with `?token=` in its address: the page logs in with it and takes
/// it out of the address at once (the other parameters and the fragment stay, no history entry
/// keeps it), and a reload, with no token left to read, resumes the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_takes_the_token_out_of_its_address() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let gw = Gateway::start().await;
    let token = gw.token(600);
    let report = gw
        .drive(vec!["urltoken".into(), gw.url.clone(), token.clone()])
        .await;
    assert!(report.get("error").is_none(), "{report:#}");
    assert_eq!(report["registered"], true, "{report:#}");
    let want = format!("{}?lang=x&autoconnect=1#dialer", gw.url);
    assert_eq!(report["href"], want.as_str(), "{report:#}");
    assert_eq!(
        report["href_before"], "about:blank",
        "no entry with the token: {report:#}"
    );
    assert_eq!(report["registered_after_reload"], true, "{report:#}");
    assert_eq!(report["href_after_reload"], want.as_str(), "{report:#}");
    let hex = token.split(':').nth(1).unwrap_or_default().to_owned();
    assert!(!report.to_string().contains(&hex), "{report:#}");
}

/// Hold, resume and DTMF from the page's buttons; sipp checks the re-INVITE directions and the
/// INFO digits, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_holds_resumes_and_sends_dtmf() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let gw = Gateway::start().await;
    let mut far = Sipp::uas(gw.kam.port, "1002", "pass1002", "uas_hold_dtmf.xml");
    let report = gw
        .drive(vec![
            "features".into(),
            gw.url.clone(),
            gw.token(600),
            "1002".into(),
        ])
        .await;
    assert!(
        report.get("error").is_none(),
        "{report:#}\n{}",
        gw.kam.log()
    );
    assert_eq!(
        (report["held"].as_bool(), report["resumed"].as_bool()),
        (Some(true), Some(true))
    );
    assert_eq!(
        (report["muted"].as_bool(), report["unmuted"].as_bool()),
        (Some(true), Some(true)),
        "{report:#}"
    );
    // The state selector lists the app's states; Paused turns Call off, Available back on.
    assert_eq!(
        report["state_options"],
        serde_json::json!(["available", "paused"]),
        "{report:#}"
    );
    assert_eq!(
        (
            report["paused_call_off"].as_bool(),
            report["available_call_on"].as_bool()
        ),
        (Some(true), Some(true)),
        "{report:#}"
    );
    assert_eq!(report["ended"], true);
    let (ok, log) = tokio::task::spawn_blocking(move || far.wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(
        ok,
        "sipp did not see hold, resume and DTMF 1 # in order:\n{log}"
    );
}

/// A page reload in the middle of a call: the page resumes its session, the same call (same id,
/// SIP dialog untouched: sipp's scenario allows no second INVITE) goes on, and audio flows on the
/// reloaded page's new peer connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_keeps_the_call_across_a_reload() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let gw = Gateway::start().await;
    let mut far = Sipp::uas_with(
        gw.kam.port,
        "1002",
        "pass1002",
        "uas_answer.xml",
        &["-rtp_echo"],
    );
    let report = gw
        .drive(vec![
            "reload".into(),
            gw.url.clone(),
            gw.token(600),
            "1002".into(),
        ])
        .await;
    assert!(
        report.get("error").is_none(),
        "{report:#}\n{}",
        gw.kam.log()
    );
    assert!(
        report["before"]["packetsReceived"].as_u64().unwrap_or(0) > 20,
        "{report:#}"
    );
    assert_eq!(report["same_call"], true, "{report:#}");
    assert_eq!(report["state_after"], "established", "{report:#}");
    assert_playing(&report);
    let after = report["stats"]["packetsReceived"].as_u64().unwrap_or(0);
    assert!(
        after > 40,
        "the reloaded page received {after} packets: {report:#}"
    );
    assert_eq!(report["ended"], true);
    let (ok, log) = tokio::task::spawn_blocking(move || far.wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(ok, "one call, one BYE: {log}");
}

/// Audio both ways, checked by ear: the page calls baresip (auto-answer, playing a 440 Hz tone,
/// recording what it hears) while Chromium's microphone plays a 1 kHz tone. The page's
/// `getStats()` shows baresip's audio arriving with energy, and baresip's recording is
/// dominated by 1 kHz: the browser's voice crossed WebRTC, callgate's bridge and RTP intact.
/// callgate's RTCP reports on the page's stream reach it (`remote-inbound-rtp`).
/// The browser is slow to apply the SDP answer, so baresip's instant answer establishes the
/// call before the SDK's `call()` resolves: the page still plays it (it once missed that
/// `established` and never attached the audio: packets arrived, energy 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_and_baresip_hear_each_others_tones() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let gw = Gateway::start().await;
    let far = common::peers::Baresip::recording(gw.kam.port, "1002", "pass1002");
    let mic_dir = TempDir::new("mic");
    let mic = common::peers::write_tone_wav(&mic_dir.path().join("mic.wav"), 1000.0, 30);
    let report = gw
        .drive_with_mic(
            vec![
                "outbound".into(),
                gw.url.clone(),
                gw.token(600),
                "1002".into(),
                "4".into(),
            ],
            Some(mic),
            Some(400),
        )
        .await;
    assert!(report.get("error").is_none(), "{report:#}\n{}", far.log());
    assert_playing(&report);
    let received = report["stats"]["packetsReceived"].as_u64().unwrap_or(0);
    let energy = report["stats"]["totalAudioEnergy"].as_f64().unwrap_or(0.0);
    assert!(
        received >= 150 && energy > 0.01,
        "the page got {received} packets of baresip's tone, energy {energy}: {:#}",
        report["stats"]
    );
    // callgate reports on the page's stream (RTCP): the page knows how its audio arrives.
    let remote = &report["stats"]["remoteInbound"];
    assert_eq!(
        remote["packetsLost"], 0,
        "remote-inbound-rtp: {:#}",
        report["stats"]
    );
    assert!(
        remote["jitter"].as_f64().is_some_and(|j| j < 0.05),
        "{remote}"
    );
    assert_eq!(report["ended"], true);
    // baresip writes its recording as the call ends.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let samples = loop {
        let s = far.received_audio();
        if s.len() >= 8000 || std::time::Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        samples.len() >= 8000,
        "baresip recorded {} samples:\n{}",
        samples.len(),
        far.log()
    );
    let (freq, share) = common::peers::dominant_frequency(&samples);
    assert!(
        (freq - 1000.0).abs() <= 20.0 && share > 0.3,
        "baresip heard mostly {freq} Hz ({:.0} % of the power), not the page's 1 kHz",
        share * 100.0
    );
}

/// Blind transfer from the page's Transfer button: the page calls baresip (1002) and transfers it
/// to 1003 (sipp, which must really get the call); the page's call ends `transferred`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_transfers_a_call_blind() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let gw = Gateway::start().await;
    let mut third = Sipp::uas(gw.kam.port, "1003", "pass1003", "uas_hangup.xml");
    let transferee = common::peers::Baresip::start(gw.kam.port, "1002", "pass1002");
    let report = gw
        .drive(vec![
            "transfer".into(),
            gw.url.clone(),
            gw.token(600),
            "1002".into(),
            format!("sip:1003@127.0.0.1:{}", gw.kam.port),
        ])
        .await;
    assert!(
        report.get("error").is_none(),
        "{report:#}\n{}",
        transferee.log()
    );
    assert_eq!(report["end_reason"], "transferred", "{report:#}");
    let states: Vec<&str> = report["transfer"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    assert!(
        states.contains(&"accepted") && states.last() == Some(&"succeeded"),
        "{states:?}"
    );
    let (ok, log) = tokio::task::spawn_blocking(move || third.wait(Duration::from_secs(15)))
        .await
        .unwrap();
    assert!(ok, "1003 did not get the transferred call:\n{log}");
}

/// The next event of `sse` for which `pick` holds (within 30 s in all).
async fn sse_until(
    sse: &mut common::sse::Sse,
    pick: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let ev = sse.next(left).await.expect("the event in time").data;
        if pick(&ev) {
            return ev;
        }
    }
}

/// Click-to-call from the CRM backend: the page (Chromium, callgate.js) places the call without
/// a click, with audio both ways through baresip; then the backend transfers it blind to 1003
/// (sipp), and the page sees it end as transferred.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_places_the_crms_click_to_call_and_the_crm_transfers_it() {
    use common::sse::{Sse, request};

    let _serial = ONE_AT_A_TIME.lock().await;
    let gw = Gateway::start().await;
    let mut third = Sipp::uas(gw.kam.port, "1003", "pass1003", "uas_hangup.xml");
    let far = common::peers::Baresip::start(gw.kam.port, "1002", "pass1002");
    let addr = gw.addr();
    let events = format!("/api/v1/agents/{AGENT}/events");
    let mut sse = Sse::open(addr, &events, Some(CRM_API_KEY), None).await;
    assert_eq!(sse.status, 200);
    let target = format!("sip:1003@127.0.0.1:{}", gw.kam.port);
    let crm = tokio::spawn(async move {
        Gateway::page_registered(addr).await;
        let calls = format!("/api/v1/agents/{AGENT}/calls");
        let (status, placed) = request(
            addr,
            "POST",
            &calls,
            Some(CRM_API_KEY),
            Some(&serde_json::json!({"to": "1002"})),
        )
        .await;
        assert_eq!(status, 201, "{placed}");
        let call_id = placed["callId"].as_str().unwrap().to_owned();
        sse_until(&mut sse, |ev| {
            ev["callId"] == call_id.as_str() && ev["state"] == "established"
        })
        .await;
        // The page measures its audio 2 s after the answer; then the transfer.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let path = format!("/api/v1/calls/{call_id}/transfer");
        let to = serde_json::json!({ "to": target });
        let (status, body) = request(addr, "POST", &path, Some(CRM_API_KEY), Some(&to)).await;
        assert_eq!(status, 202, "{body}");
        call_id
    });
    let report = gw
        .drive(vec![
            "backend".into(),
            gw.url.clone(),
            gw.token(600),
            "2".into(),
        ])
        .await;
    assert!(report.get("error").is_none(), "{report:#}\n{}", far.log());
    let call_id = crm.await.unwrap();
    assert_eq!(report["outgoing"], call_id.as_str(), "{report:#}");
    assert_playing(&report);
    let received = report["stats"]["packetsReceived"].as_u64().unwrap_or(0);
    let sent = report["stats"]["packetsSent"].as_u64().unwrap_or(0);
    assert!(sent >= 50 && received >= 50, "{:#}", report["stats"]);
    assert_eq!(
        report["calls_shown"], 1,
        "the page shows the call it placed"
    );
    assert_eq!(report["end_reason"], "transferred", "{report:#}");
    let (ok, log) = tokio::task::spawn_blocking(move || third.wait(Duration::from_secs(15)))
        .await
        .unwrap();
    assert!(ok, "1003 did not get the transferred call:\n{log}");
}

/// A dialler's call asking for auto-answer (`Call-Info: ...;answer-after=0`, the app has
/// `auto_answer = true`) is answered by the page with no click and no ringing banner; the CRM's
/// event stream and the call's history row carry the dialler's customer id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_auto_answers_a_diallers_call() {
    use common::sse::Sse;

    let _serial = ONE_AT_A_TIME.lock().await;
    let gw = Gateway::start().await;
    let (addr, kam_port) = (gw.addr(), gw.kam.port);
    let events = format!("/api/v1/agents/{AGENT}/events");
    let mut sse = Sse::open(addr, &events, Some(CRM_API_KEY), None).await;
    let caller = tokio::spawn(async move {
        Gateway::page_registered(addr).await;
        let mut c = Sipp::uac_with(kam_port, "1001", "uac_auto_answer.xml", &["-rtp_echo"]);
        tokio::task::spawn_blocking(move || c.wait(Duration::from_secs(30)))
            .await
            .unwrap()
    });
    let report = gw
        .drive(vec![
            "autoanswer".into(),
            gw.url.clone(),
            gw.token(600),
            "1".into(),
        ])
        .await;
    assert!(report.get("error").is_none(), "{report:#}");
    let (ok, log) = caller.await.unwrap();
    assert!(ok, "the dialler's call was answered and hung up:\n{log}");
    assert_eq!(report["auto"], true, "{report:#}");
    assert_eq!(report["banner"], false, "no ringing banner: {report:#}");
    assert_eq!(report["end_reason"], "remote_hangup", "{report:#}");
    assert_playing(&report);
    let received = report["stats"]["packetsReceived"].as_u64().unwrap_or(0);
    assert!(received >= 25, "{:#}", report["stats"]);
    let incoming = sse_until(&mut sse, |ev| ev["type"] == "incoming").await;
    assert_eq!(
        (
            incoming["data"]["customerId"].as_str(),
            incoming["autoAnswer"].as_bool()
        ),
        (Some("C-1042"), Some(true)),
        "{incoming}"
    );
    let call_id = incoming["callId"].as_str().unwrap().to_owned();
    let path = format!("/api/v1/calls/{call_id}");
    let mut row = serde_json::Value::Null;
    for _ in 0..20 {
        let r = Sse::open(addr, &path, Some(CRM_API_KEY), None).await;
        row = r.body().await;
        if row["endReason"] != "in_progress" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(row["data"]["customerId"], "C-1042", "{row}");
    assert_eq!(row["direction"], "inbound", "{row}");
}

/// The quick start, as a new user meets it: `callgate run` with the built-in configuration
/// (no file, nothing else running), the page at http://127.0.0.1:8080/, "Try the demo". The
/// page registers with the built-in demo PBX over real SIP (digest and all); 600 sends the
/// microphone's 1 kHz back and 601 plays 440 Hz (each the dominant frequency of what the
/// page plays); 602 declines, then calls the page back, and the page answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_tries_the_built_in_demo() {
    let _serial = ONE_AT_A_TIME.lock().await;
    require_tool("chromium", "apt-get install chromium");
    let dir = TempDir::new("demo");
    let mut gw = common::Daemon::spawn(
        common::callgate()
            .arg("run")
            .current_dir(dir.path())
            .env("RUST_LOG", "info"),
    );
    gw.wait_for("press \"Try the demo\"", Duration::from_secs(20));
    let mic_dir = TempDir::new("mic");
    let mic = common::peers::write_tone_wav(&mic_dir.path().join("mic.wav"), 1000.0, 40);
    let report = run_driver(
        vec!["demo".into(), "http://127.0.0.1:8080/".into(), "-".into()],
        Some(mic),
        None,
    )
    .await;
    assert!(report.get("error").is_none(), "{report:#}");
    assert_eq!(report["agent"], "1001@127.0.0.1", "{report:#}");
    let numbers = report["numbers"].as_str().unwrap_or_default();
    assert!(
        numbers.contains("600") && numbers.contains("601") && numbers.contains("602"),
        "the page says what to call: {numbers}"
    );
    let near = |v: &serde_json::Value, hz: i64| (v["hz"].as_i64().unwrap_or(0) - hz).abs() <= 30;
    assert!(
        near(&report["echo"], 1000),
        "600 echoes the 1 kHz microphone: {report:#}"
    );
    assert!(near(&report["tone"], 440), "601 plays 440 Hz: {report:#}");
    assert!(
        report["callback_from"]
            .as_str()
            .unwrap_or_default()
            .contains("602"),
        "the banner names the call-back number: {report:#}"
    );
    assert_playing(&report);
    let received = report["stats"]["packetsReceived"].as_u64().unwrap_or(0);
    assert!(received >= 25, "the call-back's audio: {report:#}");
    assert_eq!(report["ended"], true, "{report:#}");
    drop(gw);
}
