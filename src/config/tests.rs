use super::*;

fn problems(main: &str, apps: &str) -> Vec<String> {
    let dir = tempdir();
    std::fs::write(dir.join("callgate.toml"), main).unwrap();
    std::fs::write(dir.join("apps.toml"), apps).unwrap();
    let r = Config::load(&dir.join("callgate.toml"));
    let _ = std::fs::remove_dir_all(&dir);
    match r {
        Ok(_) => vec![],
        Err(ConfigError::Invalid(ps)) => ps
            .iter()
            .map(|p| format!("{}: {}", p.key, p.problem))
            .collect(),
        Err(e) => vec![e.to_string()],
    }
}

fn tempdir() -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "callgate-config-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

const GOOD_APPS: &str = "[apps.crm]\nkeys = [\"000102030405060708090a0b0c0d0e0f\"]\n";

#[test]
fn embedded_default_is_valid_and_uses_loopback() {
    let c = Config::embedded().unwrap();
    assert_eq!(c.source, Source::Embedded);
    assert!(c.http.listen.ip().is_loopback());
    assert!(c.sip.listen.ip().is_loopback());
    assert!(c.apps["demo"].demo_key);
    assert!(c.warnings().iter().any(|w| w.contains("public demo key")));
    assert_eq!(c.keyring().apps().count(), 1);
}

#[test]
fn sample_file_on_disk_loads_like_the_embedded_one() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/callgate.toml");
    let c = Config::load(&path).unwrap();
    assert_eq!(
        c.apps_file.as_deref(),
        Some(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("conf/apps.toml")
                .as_path()
        )
    );
    assert!(c.storage.data_dir.starts_with(env!("CARGO_MANIFEST_DIR")));
}

#[test]
fn every_bad_value_is_named_by_key() {
    let main = r#"
[http]
listen = "localhost"
[sip]
listen = "1.2.3.4"
public_address = "bad host"
user_agent = ""
[media]
listen_ip = "0.0.0.0"
webrtc_port = 20000
rtp_port_min = 20001
rtp_port_max = 20000
[tokens]
max_bytes = 1
clock_skew_secs = -1
[log]
level = "info,,=["
format = "xml"
"#;
    let got = problems(main, GOOD_APPS);
    for key in [
        "http.listen",
        "sip.listen",
        "sip.public_address",
        "sip.user_agent",
        "media.public_ip",
        "media.rtp_port_min",
        "media.rtp_port_max",
        "tokens.max_bytes",
        "tokens.clock_skew_secs",
        "log.level",
        "log.format",
    ] {
        assert!(
            got.iter().any(|p| p.starts_with(&format!("{key}:"))),
            "{key} not reported in {got:#?}"
        );
    }
}

#[test]
fn webrtc_port_outside_rtp_range() {
    let got = problems(
        "[media]\nwebrtc_port = 20002\nrtp_port_min = 20000\nrtp_port_max = 20099\n",
        GOOD_APPS,
    );
    assert_eq!(
        got,
        vec!["media.webrtc_port: must lie outside media.rtp_port_min..media.rtp_port_max"]
    );
}

#[test]
fn app_problems() {
    let apps = r#"
[apps.a]
keys = []
[apps.b]
keys = ["zz", "0011", "000102030405060708090a0b0c0d0e0f", "000102030405060708090a0b0c0d0e0f"]
[apps.c]
keys = ["000102030405060708090a0b0c0d0e0f"]
mode = "ecb"
[apps.d]
keys = ["000102030405060708090a0b0c0d0e0f"]
iv = "00"
[apps.e]
keys = ["000102030405060708090a0b0c0d0e0f"]
mode = "ctr"
iv = "0011"
[apps.f]
keys = ["000102030405060708090a0b0c0d0e0f"]
max_lifetime_secs = 59
[apps.g]
keys = ["000102030405060708090a0b0c0d0e0f"]
require_expires = false
single_use = true
[apps.h]
keys = ["000102030405060708090a0b0c0d0e0f"]
require_expires = false
single_use = true
max_lifetime_secs = 600
"#;
    let got = problems("", apps);
    for want in [
        "apps.a.keys: must list at least one key",
        "apps.b.keys[0]: is not hex",
        "apps.b.keys[1]: is 2 bytes",
        "apps.b.keys[3]: is listed twice",
        "apps.c.mode: \"ecb\" is not",
        "apps.d.iv: is only used with mode \"ctr\"",
        "apps.e.iv: must be 32 hex digits",
        "apps.f.max_lifetime_secs: must be 60 to 31536000",
        "apps.g.single_use: needs tokens that expire",
    ] {
        assert!(
            got.iter().any(|p| p.starts_with(want)),
            "{want:?} not in {got:#?}"
        );
    }
    assert!(
        !got.iter().any(|p| p.starts_with("apps.h")),
        "single use with a lifetime cap is fine: {got:#?}"
    );
}

#[test]
fn demo_key_only_on_loopback() {
    let got = problems("[http]\nlisten = \"0.0.0.0:8080\"\n", EMBEDDED_APPS);
    assert!(
        got.iter()
            .any(|p| p.starts_with("apps.demo.keys[0]: is the public demo key")),
        "{got:#?}"
    );
    assert!(problems("[http]\nlisten = \"[::1]:8080\"\n", EMBEDDED_APPS).is_empty());
}

#[test]
fn syntax_errors_point_at_line_and_name_unknown_keys() {
    let got = problems(
        "[http]\nlisten = \"127.0.0.1:1\"\nlisten_typo = 1\n",
        GOOD_APPS,
    );
    assert_eq!(got.len(), 1);
    assert!(got[0].contains("callgate.toml:3:"), "{}", got[0]);
    assert!(got[0].contains("listen_typo"), "{}", got[0]);
    let got = problems("", "[apps.x]\nkeys = \"notalist\"\n");
    assert!(got[0].contains("apps.toml:2:"), "{}", got[0]);
}

#[test]
fn missing_apps_file_is_named() {
    let dir = tempdir();
    std::fs::write(dir.join("c.toml"), "apps_file = \"nope.toml\"\n").unwrap();
    let err = Config::load(&dir.join("c.toml")).unwrap_err().to_string();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(err.contains("nope.toml: cannot read"), "{err}");
}

#[test]
fn ctr_mode_warns() {
    let dir = tempdir();
    std::fs::write(dir.join("callgate.toml"), "").unwrap();
    std::fs::write(
        dir.join("apps.toml"),
        "[apps.old]\nkeys = [\"000102030405060708090a0b0c0d0e0f\"]\nmode = \"ctr\"\n",
    )
    .unwrap();
    let c = Config::load(&dir.join("callgate.toml")).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        c.warnings()
            .iter()
            .any(|w| w.contains("\"old\" uses mode \"ctr\"") && w.contains("ctr-hmac"))
    );
}

#[test]
fn sip_timer_and_registration_keys() {
    let main = "[sip]\nt1_ms = 1\nt2_ms = 5\nregister_expires_secs = 5\nregister_retry_min_secs = 60\n\
                register_retry_max_secs = 30\nkeepalive_secs = -1\ndns_server = \"resolver\"\n";
    let got = problems(main, GOOD_APPS);
    for key in [
        "sip.t1_ms",
        "sip.t2_ms",
        "sip.register_expires_secs",
        "sip.register_retry_max_secs",
        "sip.keepalive_secs",
        "sip.dns_server",
    ] {
        assert!(
            got.iter().any(|p| p.starts_with(&format!("{key}:"))),
            "{key} not reported in {got:#?}"
        );
    }
    let ok = "[sip]\nt1_ms = 100\nkeepalive_secs = 0\ndns_server = \"127.0.0.1\"\n";
    let dir = tempdir();
    std::fs::write(dir.join("callgate.toml"), ok).unwrap();
    std::fs::write(dir.join("apps.toml"), GOOD_APPS).unwrap();
    let c = Config::load(&dir.join("callgate.toml")).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let s = c.sip.endpoint_settings();
    assert_eq!(s.timers.t1, Duration::from_millis(100));
    assert_eq!(s.registration.keepalive, None);
    assert_eq!(s.dns_server, Some("127.0.0.1:53".parse().unwrap()));
}

#[test]
fn allowed_origins_are_origins() {
    let got = problems(
        "",
        "[apps.crm]\nkeys = [\"000102030405060708090a0b0c0d0e0f\"]\nallowed_origins = [\"https://crm.example.com/\", \"crm.example.com\", \"https://x/path\"]\n",
    );
    assert_eq!(got.len(), 2, "{got:#?}");
    assert!(
        got.iter()
            .all(|p| p.starts_with("apps.crm.allowed_origins[")),
        "{got:#?}"
    );
}

#[test]
fn dial_plans_and_media_options_are_checked() {
    let got = problems(
        "[media]\ndtmf = \"inband\"\ntimeout_secs = -1\n",
        "[apps.crm]\nkeys = [\"000102030405060708090a0b0c0d0e0f\"]\n[apps.crm.dial_plan]\n\
         country_code = \"+49\"\nnational_prefix = \"x\"\nextension_max_digits = 40\n\
         e164_prefix = \"plus\"\ndeny_prefixes = [\"1900\", \"+44909\"]\n",
    );
    let keys: Vec<&str> = got
        .iter()
        .map(|p| p.split(':').next().unwrap_or_default())
        .collect();
    for key in [
        "media.dtmf",
        "media.timeout_secs",
        "apps.crm.dial_plan.country_code",
        "apps.crm.dial_plan.national_prefix",
        "apps.crm.dial_plan.extension_max_digits",
        "apps.crm.dial_plan.e164_prefix",
        "apps.crm.dial_plan.deny_prefixes[0]",
    ] {
        assert!(
            got.iter().any(|p| p.starts_with(key)),
            "{key} not reported: {got:#?}"
        );
    }
    assert_eq!(keys.len(), 7, "{got:#?}");
    let dir = tempdir();
    std::fs::write(dir.join("callgate.toml"), "").unwrap();
    std::fs::write(
        dir.join("apps.toml"),
        "[apps.crm]\nkeys = [\"000102030405060708090a0b0c0d0e0f\"]\n[apps.crm.dial_plan]\ncountry_code = \"49\"\n",
    )
    .unwrap();
    let c = Config::load(&dir.join("callgate.toml"));
    let _ = std::fs::remove_dir_all(&dir);
    let c = c.unwrap();
    let plan = &c.apps["crm"].dial_plan;
    assert_eq!(plan.apply("030 1234"), Ok("+49301234".into()));
}

#[test]
fn api_keys_events_and_session_options_are_checked() {
    let got = problems(
        "[http]\nresume_secs = -1\nheartbeat_secs = 0\n[events]\nmax_subscribers = 0\nbuffer = 0\n",
        "admin_keys = [\"short\"]\n[apps.crm]\nkeys = [\"000102030405060708090a0b0c0d0e0f\"]\n\
         api_keys = [\"has spaces in it, which is not ok\", \"crm-api-key-0123456789abcdef\"]\n",
    );
    for key in [
        "http.resume_secs",
        "http.heartbeat_secs",
        "events.max_subscribers",
        "events.buffer",
        "admin_keys[0]",
        "apps.crm.api_keys[0]",
    ] {
        assert!(
            got.iter().any(|p| p.starts_with(key)),
            "{key} not reported: {got:#?}"
        );
    }
    assert_eq!(got.len(), 6, "{got:#?}");
    // Nothing of a key reaches the messages.
    assert!(
        !got.iter()
            .any(|p| p.contains("short") || p.contains("has spaces")),
        "{got:#?}"
    );
}

#[test]
fn agent_states_are_checked() {
    let app = "[apps.crm]\nkeys = [\"000102030405060708090a0b0c0d0e0f\"]\n";
    let got = problems(
        "",
        &format!(
            "{app}default_state = \"lunch\"\nwrap_up_state = \"gone\"\nnot_ready_status = 404\n\
             states = [\n\
             {{ id = \"available\", may_call_out = true, may_receive = true }},\n\
             {{ id = \"Available\" }},\n\
             {{ id = \"available\" }},\n\
             {{ id = \"lunch\", groups = [\"sales\"] }},\n\
             {{ id = \"break\", groups = [\"bad group\"] }},\n\
             {{ id = \"x\", label = \"\" }},\n]\n"
        ),
    );
    for key in [
        "apps.crm.states[1].id",
        "apps.crm.states[2].id",
        "apps.crm.states[4].groups",
        "apps.crm.states[5].label",
        "apps.crm.default_state",
        "apps.crm.wrap_up_state",
        "apps.crm.not_ready_status",
    ] {
        assert!(
            got.iter().any(|p| p.starts_with(key)),
            "{key} not reported: {got:#?}"
        );
    }
    assert_eq!(got.len(), 7, "{got:#?}");
    assert!(
        got.iter().any(
            |p| p.starts_with("apps.crm.default_state") && p.contains("limited to some groups")
        ),
        "{got:#?}"
    );

    // A good policy: groups limit who may use a state; the default and wrap-up apply to all.
    let dir = tempdir();
    std::fs::write(dir.join("callgate.toml"), "").unwrap();
    std::fs::write(
        dir.join("apps.toml"),
        format!(
            "{app}wrap_up_state = \"wrap\"\nwrap_up_secs = 20\nnot_ready_status = 486\nstates = [\n\
             {{ id = \"ready\", productive = true, may_call_out = true, may_receive = true }},\n\
             {{ id = \"wrap\", productive = true }},\n\
             {{ id = \"outbound\", may_call_out = true, groups = [\"sales\", \"vip.team\"] }},\n]\n"
        ),
    )
    .unwrap();
    let c = Config::load(&dir.join("callgate.toml"));
    let _ = std::fs::remove_dir_all(&dir);
    let c = c.unwrap();
    let p = &c.apps["crm"].states;
    assert_eq!(p.default, 0);
    assert_eq!(p.wrap_up, Some((1, std::time::Duration::from_secs(20))));
    assert_eq!(p.refuse_status, 486);
    assert_eq!(p.find_for("outbound", Some("sales")), Some(2));
    assert_eq!(p.find_for("outbound", Some("support")), None);
    assert_eq!(p.find_for("outbound", None), None);
    assert_eq!(p.find_for("wrap", None), Some(1));
    let ids = |g| p.allowed(g).map(|s| s.id.as_str()).collect::<Vec<_>>();
    assert_eq!(ids(Some("vip.team")), ["ready", "wrap", "outbound"]);
    assert_eq!(ids(None), ["ready", "wrap"]);
}

#[test]
fn call_data_mappings_are_checked() {
    let got = problems(
        "",
        "[apps.crm]\nkeys = [\"000102030405060708090a0b0c0d0e0f\"]\n[apps.crm.call_data]\n\
         \"X-Customer-Id\" = \"customerId\"\n\"X Bad\" = \"x\"\n\"X-Two\" = \"customerId\"\n\
         \"X-Field\" = \"has space\"\n",
    );
    assert_eq!(got.len(), 3, "{got:#?}");
    for key in [
        "apps.crm.call_data.\"X Bad\"",
        "apps.crm.call_data.\"X-Two\"",
        "apps.crm.call_data.\"X-Field\"",
    ] {
        assert!(
            got.iter().any(|p| p.starts_with(key)),
            "{key} not reported: {got:#?}"
        );
    }
}

#[test]
fn the_automatic_not_ready_needs_a_limit_and_a_state_that_does_not_receive() {
    let app = "[apps.crm]\nkeys = [\"000102030405060708090a0b0c0d0e0f\"]\nstates = [\n\
               { id = \"available\", may_receive = true },\n{ id = \"away\" },\n]\n";
    for (extra, key) in [
        ("missed_calls_limit = 3\n", "apps.crm.missed_calls_limit"),
        (
            "missed_calls_state = \"away\"\n",
            "apps.crm.missed_calls_state",
        ),
        (
            "missed_calls_limit = 0\nmissed_calls_state = \"away\"\n",
            "apps.crm.missed_calls_limit",
        ),
        (
            "missed_calls_limit = 3\nmissed_calls_state = \"available\"\n",
            "apps.crm.missed_calls_state",
        ),
    ] {
        let got = problems("", &format!("{app}{extra}"));
        assert!(
            got.len() == 1 && got[0].starts_with(key),
            "{extra}: {got:#?}"
        );
    }
    assert!(
        problems(
            "",
            &format!("{app}missed_calls_limit = 3\nmissed_calls_state = \"away\"\n")
        )
        .is_empty()
    );
}

#[test]
fn call_headers_must_be_x_headers() {
    let got = problems(
        "",
        "[apps.crm]\nkeys = [\"000102030405060708090a0b0c0d0e0f\"]\n\
         call_headers = [\"X-Customer-Id\", \"Via\", \"X-Bad Name\"]\n",
    );
    let keys: Vec<&str> = got
        .iter()
        .map(|p| p.split(':').next().unwrap_or_default())
        .collect();
    assert_eq!(
        keys,
        ["apps.crm.call_headers[1]", "apps.crm.call_headers[2]"],
        "{got:#?}"
    );
}

#[test]
fn an_auto_answer_header_needs_auto_answer_and_a_header_name() {
    let app = "[apps.crm]\nkeys = [\"000102030405060708090a0b0c0d0e0f\"]\n";
    let got = problems(
        "",
        &format!("{app}auto_answer_header = \"X-Auto-Answer\"\n"),
    );
    assert!(
        got.len() == 1 && got[0].starts_with("apps.crm.auto_answer_header"),
        "{got:#?}"
    );
    let got = problems(
        "",
        &format!("{app}auto_answer = true\nauto_answer_header = \"X Auto\"\n"),
    );
    assert!(
        got.len() == 1 && got[0].starts_with("apps.crm.auto_answer_header"),
        "{got:#?}"
    );
    assert!(
        problems(
            "",
            &format!("{app}auto_answer = true\nauto_answer_header = \"X-Auto-Answer\"\n")
        )
        .is_empty()
    );
}

#[test]
fn webhooks_are_checked() {
    let app = |hook: &str| {
        format!(
            "[apps.crm]\nkeys = [\"000102030405060708090a0b0c0d0e0f\"]\n[apps.crm.webhook]\n{hook}"
        )
    };
    let got = problems(
        "",
        &app(
            "url = \"http://crm.example.com/hook\"\nsecret = \"short\"\ntimeout_secs = 0\n\
              concurrency = 65\nmax_age_secs = 10\nmax_queue = 1\nca_file = \"/nonexistent/ca.pem\"\n",
        ),
    );
    for key in [
        "apps.crm.webhook.url",
        "apps.crm.webhook.secret",
        "apps.crm.webhook.timeout_secs",
        "apps.crm.webhook.concurrency",
        "apps.crm.webhook.max_age_secs",
        "apps.crm.webhook.max_queue",
        "apps.crm.webhook.ca_file",
    ] {
        assert!(
            got.iter().any(|p| p.starts_with(key)),
            "{key} not reported: {got:#?}"
        );
    }
    assert_eq!(got.len(), 7, "{got:#?}");
    assert!(
        !got.iter().any(|p| p.contains("short")),
        "no secret: {got:#?}"
    );
    // http:// to a remote receiver needs insecure_http; to loopback it does not.
    let secret = "secret = \"webhook-secret-0123456789abcdef\"\n";
    assert!(
        problems(
            "",
            &app(&format!("url = \"http://127.0.0.1:9/h\"\n{secret}"))
        )
        .is_empty()
    );
    assert!(
        problems(
            "",
            &app(&format!(
                "url = \"http://10.0.0.5/h\"\ninsecure_http = true\n{secret}"
            ))
        )
        .is_empty()
    );
    let bad = problems("", &app(&format!("url = \"ftp://x/\"\n{secret}")));
    assert_eq!(bad.len(), 1, "{bad:#?}");
    // A webhook limited to some event types names known ones.
    let url = "url = \"https://crm.example.com/h\"\n";
    assert!(
        problems(
            "",
            &app(&format!(
                "{url}{secret}events = [\"call\", \"agentState\"]\n"
            ))
        )
        .is_empty()
    );
    let bad = problems(
        "",
        &app(&format!("{url}{secret}events = [\"call\", \"calls\"]\n")),
    );
    assert!(
        bad.len() == 1 && bad[0].starts_with("apps.crm.webhook.events[1]"),
        "{bad:#?}"
    );
}

#[test]
fn the_demo_is_on_in_the_embedded_configuration_only_and_stays_on_loopback() {
    let embedded = Config::embedded().unwrap();
    assert_eq!(
        embedded.demo.map(|d| d.sip.to_string()),
        Some("127.0.0.1:5080".to_owned())
    );
    // The same settings written to a file: off unless switched on.
    let dir = tempdir();
    std::fs::write(dir.join("callgate.toml"), EMBEDDED_CONFIG).unwrap();
    std::fs::write(dir.join("apps.toml"), EMBEDDED_APPS).unwrap();
    let written = Config::load(&dir.join("callgate.toml"));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(written.unwrap().demo, None);
    // Switched on: HTTP on loopback and the demo app are required.
    let got = problems(
        "[http]\nlisten = \"0.0.0.0:8080\"\n[demo]\nenabled = true\nsip_port = 0\n",
        GOOD_APPS,
    );
    assert!(
        got.iter().any(|p| p.starts_with("demo.sip_port")),
        "{got:#?}"
    );
    let got = problems("[demo]\nenabled = true\n", GOOD_APPS);
    assert!(
        got.iter()
            .any(|p| p.starts_with("demo.enabled") && p.contains("\"demo\"")),
        "{got:#?}"
    );
    let got = problems(
        "[http]\nlisten = \"0.0.0.0:8080\"\n[demo]\nenabled = true\n",
        &format!("{GOOD_APPS}[apps.demo]\nkeys = [\"000102030405060708090a0b0c0d0e0f\"]\n"),
    );
    assert!(
        got.iter()
            .any(|p| p.starts_with("demo.enabled") && p.contains("loopback")),
        "{got:#?}"
    );
}
