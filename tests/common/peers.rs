//! Real SIP peers for tests: Kamailio (registrar + proxy) and sipp, on 127.0.0.1 with ports the
//! test picks. Every process is started in its own process group and killed by it on drop.
#![allow(dead_code)]

use std::net::UdpSocket;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{TempDir, require_tool};

/// A free UDP port on 127.0.0.1 for a peer to bind. Ports come from 21000-32759, below the
/// kernel's ephemeral range (32768+), so a socket another test binds to port 0 meanwhile cannot
/// take one before the peer binds it (the race of "bind port 0, release, hand over"); each call
/// moves on by 4, as sipp also binds the media port + 2. Checked free before it is handed out.
pub fn free_udp_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        21000 + (std::process::id() % 64) as u16 * 4,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..1000 {
        let mut port = NEXT.fetch_add(4, Ordering::Relaxed);
        if port >= 32760 {
            port = 21000 + port % 4;
            NEXT.store(port + 4, Ordering::Relaxed);
        }
        let free = (0..3).all(|i| UdpSocket::bind(("127.0.0.1", port + i)).is_ok());
        if free {
            return port;
        }
    }
    panic!("no free UDP port in 21000-32759")
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/peers")
        .join(name)
}

fn kamailio_modules() -> String {
    std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("kamailio/modules"))
        .chain([PathBuf::from("/usr/lib/kamailio/modules")])
        .find(|p| p.join("tm.so").exists())
        .map(|p| format!("{}/", p.display()))
        .expect("Kamailio modules (apt-get install kamailio)")
}

/// A process group killed on drop.
pub struct Proc {
    child: Child,
    name: &'static str,
}

impl Proc {
    pub fn spawn(name: &'static str, cmd: &mut Command) -> Proc {
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc { child, name }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM to the group, then SIGKILL if it is still there after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        let pgid = format!("-{}", self.child.id());
        let quiet = |sig: &str| {
            let _ = Command::new("kill")
                .args([sig, "--", &pgid])
                .stderr(Stdio::null())
                .status();
        };
        quiet("-TERM");
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        quiet("-KILL");
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
        let _ = self.name;
    }
}

/// Kamailio with users 1001/1002/1003 (passwords pass1001/2/3), registrar + proxy.
pub struct Kamailio {
    pub port: u16,
    proc_: Proc,
    dir: TempDir,
}

impl Kamailio {
    pub fn start(port: u16) -> Kamailio {
        Kamailio::start_with(port, &[])
    }

    /// [`Kamailio::start`] with config defines (`-A`), e.g. `WITH_LOAD_USERS` for the load tool's
    /// agents 20000-21999 (password "pw" + number).
    pub fn start_with(port: u16, defines: &[&str]) -> Kamailio {
        require_tool("kamailio", "apt-get install kamailio");
        let dir = TempDir::new("kamailio");
        let cfg = std::fs::read_to_string(fixture("kamailio.cfg"))
            .expect("tests/peers/kamailio.cfg")
            .replace("__PORT__", &port.to_string())
            .replace("__MPATH__", &kamailio_modules());
        let cfg_path = dir.write("kamailio.cfg", &cfg);
        let run = dir.path().join("run");
        std::fs::create_dir_all(&run).expect("rundir");
        let log = std::fs::File::create(dir.path().join("kamailio.log")).expect("log file");
        let proc_ = Proc::spawn(
            "kamailio",
            Command::new("kamailio")
                .arg("-f")
                .arg(&cfg_path)
                .args(["-DD", "-E", "-Y"])
                .arg(&run)
                .args(["-m", "64", "-M", "8"])
                .args(defines.iter().flat_map(|d| ["-A", d]))
                .stdout(log.try_clone().expect("log"))
                .stderr(log),
        );
        let k = Kamailio { port, proc_, dir };
        k.wait_ready(Duration::from_secs(10));
        k
    }

    /// Sends OPTIONS (Max-Forwards: 0, answered by an explicit rule) until a 200 comes back.
    fn wait_ready(&self, limit: Duration) {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let local = sock.local_addr().expect("addr");
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 2048];
        let mut n = 0;
        while Instant::now() < deadline {
            n += 1;
            let msg = format!(
                "OPTIONS sip:127.0.0.1:{p} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bKping{n}\r\n\
                 Max-Forwards: 0\r\nFrom: <sip:ping@127.0.0.1>;tag=p\r\nTo: <sip:127.0.0.1>\r\nCall-ID: ping{n}\r\n\
                 CSeq: {n} OPTIONS\r\nContent-Length: 0\r\n\r\n",
                p = self.port
            );
            let _ = sock.send_to(msg.as_bytes(), ("127.0.0.1", self.port));
            if let Ok((len, _)) = sock.recv_from(&mut buf) {
                if buf
                    .get(..len)
                    .is_some_and(|b| b.starts_with(b"SIP/2.0 200"))
                {
                    return;
                }
            }
        }
        panic!(
            "Kamailio did not answer on 127.0.0.1:{} within {limit:?}:\n{}",
            self.port,
            self.log()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kamailio.log")).unwrap_or_default()
    }

    pub fn stop(&mut self) {
        self.proc_.stop(Duration::from_secs(3));
    }
}

/// Runs sipp as user 1002 calling `callee` through the proxy; true if the final response was
/// `expected`. Returns sipp's output for diagnostics too.
pub fn sipp_probe(proxy_port: u16, callee: &str, expected: u16) -> (bool, String) {
    require_tool("sipp", "apt-get install sip-tester");
    let dir = TempDir::new("sipp");
    let scenario = std::fs::read_to_string(fixture("probe_invite.xml"))
        .expect("probe scenario")
        .replace("__EXPECTED__", &expected.to_string());
    let sf = dir.write("probe.xml", &scenario);
    let out = super::run_bounded(
        Command::new("sipp")
            .arg(format!("127.0.0.1:{proxy_port}"))
            .arg("-sf")
            .arg(&sf)
            .args([
                "-s", callee, "-key", "caller", "1002", "-au", "1002", "-ap", "pass1002",
            ])
            .args([
                "-i",
                "127.0.0.1",
                "-p",
                &free_udp_port().to_string(),
                "-mp",
                &free_udp_port().to_string(),
            ])
            .args([
                "-m",
                "1",
                "-nostdin",
                "-timeout",
                "10s",
                "-timeout_error",
                "-recv_timeout",
                "8000",
            ])
            .current_dir(dir.path()),
        Duration::from_secs(20),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

impl Proc {
    /// Waits up to `limit` for the process to exit by itself.
    pub fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A sipp process running a scenario from tests/peers in the background.
pub struct Sipp {
    proc_: Proc,
    dir: TempDir,
}

impl Sipp {
    fn spawn(proxy_port: u16, scenario: &str, local_port: u16, args: &[&str]) -> Sipp {
        require_tool("sipp", "apt-get install sip-tester");
        let dir = TempDir::new("sipp");
        let log = std::fs::File::create(dir.path().join("sipp.log")).expect("log");
        let proc_ = Proc::spawn(
            "sipp",
            Command::new("sipp")
                .arg(format!("127.0.0.1:{proxy_port}"))
                .arg("-sf")
                .arg(fixture(scenario))
                .args([
                    "-i",
                    "127.0.0.1",
                    "-p",
                    &local_port.to_string(),
                    "-mp",
                    &free_udp_port().to_string(),
                ])
                .args([
                    "-m",
                    "1",
                    "-nostdin",
                    "-timeout",
                    "20s",
                    "-timeout_error",
                    "-trace_err",
                ])
                .args(args)
                .current_dir(dir.path())
                .stdout(log.try_clone().expect("log"))
                .stderr(log),
        );
        Sipp { proc_, dir }
    }

    /// A far end registered as `user` that then runs `scenario` (UAS) on the same port.
    pub fn uas(proxy_port: u16, user: &str, password: &str, scenario: &str) -> Sipp {
        Sipp::uas_with(proxy_port, user, password, scenario, &[])
    }

    /// [`Sipp::uas`] with extra sipp arguments (e.g. `-rtp_echo`).
    pub fn uas_with(
        proxy_port: u16,
        user: &str,
        password: &str,
        scenario: &str,
        extra: &[&str],
    ) -> Sipp {
        let port = free_udp_port();
        let mut reg = Sipp::spawn(
            proxy_port,
            "reg.xml",
            port,
            &["-s", user, "-au", user, "-ap", password],
        );
        let ok = reg.wait(Duration::from_secs(10));
        assert!(ok.0, "sipp could not register {user}:\n{}", ok.1);
        let mut args = vec!["-s", user];
        args.extend_from_slice(extra);
        Sipp::spawn(proxy_port, scenario, port, &args)
    }

    /// [`Sipp::uac`] with extra sipp arguments (e.g. `-rtp_echo`).
    pub fn uac_with(proxy_port: u16, callee: &str, scenario: &str, extra: &[&str]) -> Sipp {
        let mut args = vec![
            "-s", callee, "-key", "caller", "1002", "-au", "1002", "-ap", "pass1002",
        ];
        args.extend_from_slice(extra);
        Sipp::spawn(proxy_port, scenario, free_udp_port(), &args)
    }

    /// A caller (as 1002) calling `callee` through the proxy with `scenario` (UAC).
    pub fn uac(proxy_port: u16, callee: &str, scenario: &str) -> Sipp {
        Sipp::spawn(
            proxy_port,
            scenario,
            free_udp_port(),
            &[
                "-s", callee, "-key", "caller", "1002", "-au", "1002", "-ap", "pass1002",
            ],
        )
    }

    /// Waits for the scenario to end: (succeeded, sipp's output and error log).
    pub fn wait(&mut self, limit: Duration) -> (bool, String) {
        let status = self.proc_.wait(limit);
        let mut log = std::fs::read_to_string(self.dir.path().join("sipp.log")).unwrap_or_default();
        for entry in std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            // Errors, and what scenarios logged with <log> (sipp -trace_logs).
            if name.ends_with("_errors.log") || name.ends_with("_logs.log") {
                log.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
            }
        }
        (status.is_some_and(|s| s.success()), log)
    }
}

/// Writes `secs` seconds of a `freq` Hz sine as 8 kHz 16-bit mono PCM WAV.
pub fn write_tone_wav(path: &Path, freq: f64, secs: u32) -> PathBuf {
    let samples = 8000 * secs;
    let mut out = Vec::with_capacity(44 + samples as usize * 2);
    let data_len = samples * 2;
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&8000u32.to_le_bytes());
    out.extend_from_slice(&16000u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    for n in 0..samples {
        let v = (f64::from(n) * freq * 2.0 * std::f64::consts::PI / 8000.0).sin() * 8000.0;
        out.extend_from_slice(&(v as i16).to_le_bytes());
    }
    std::fs::write(path, out).expect("write wav");
    path.to_owned()
}

/// baresip as a SIP phone registered as `user`: auto-answers, plays a 440 Hz tone, and follows
/// transfers (REFER) with its `menu` module; [`Baresip::recording`] also records what it hears
/// (its `sndfile` module). Killed on drop.
pub struct Baresip {
    proc_: Proc,
    dir: TempDir,
}

impl Baresip {
    pub fn start(proxy_port: u16, user: &str, password: &str) -> Baresip {
        Baresip::start_with(proxy_port, user, password, false)
    }

    /// [`Baresip::start`], recording each call's received audio to a WAV file (see
    /// [`Baresip::received_audio`]).
    pub fn recording(proxy_port: u16, user: &str, password: &str) -> Baresip {
        Baresip::start_with(proxy_port, user, password, true)
    }

    fn start_with(proxy_port: u16, user: &str, password: &str, record: bool) -> Baresip {
        require_tool(
            "baresip",
            "apt-get install --no-install-recommends baresip-core",
        );
        let dir = TempDir::new("baresip");
        let rtp = free_udp_port() / 2 * 2;
        let config = format!(
            "poll_method\t\tepoll\nsip_listen\t\t127.0.0.1:{sip}\nnet_interface\t\t127.0.0.1\n\
             dns_server\t\t127.0.0.1:53\ncall_local_timeout\t120\ncall_max_calls\t\t4\n\
             audio_source\t\taufile,{wav}\naudio_player\t\talsa,null\naudio_alert\t\talsa,null\n\
             ausrc_srate\t\t8000\nausrc_channels\t\t1\nauplay_srate\t\t8000\nauplay_channels\t\t1\n\
             rtp_ports\t\t{rtp}-{rtp_end}\nrtcp_mux\t\tno\nmodule_path\t\t/usr/lib/baresip/modules\n\
             module\t\t\tg711.so\nmodule\t\t\taufile.so\nmodule\t\t\talsa.so\n\
             module_app\t\taccount.so\nmodule_app\t\tmenu.so\n",
            sip = free_udp_port(),
            rtp_end = rtp + 20,
            wav = write_tone_wav(&dir.path().join("tone.wav"), 440.0, 20).display(),
        );
        let config = if record {
            format!(
                "{config}module\t\t\tsndfile.so\nsnd_path\t\t{}\n",
                dir.path().display()
            )
        } else {
            config
        };
        std::fs::write(dir.path().join("config"), config).expect("baresip config");
        std::fs::write(
            dir.path().join("accounts"),
            format!(
                "<sip:{user}@127.0.0.1:{proxy_port}>;auth_pass={password};answermode=auto;audio_codecs=PCMU;regint=600\n"
            ),
        )
        .expect("baresip accounts");
        let log = std::fs::File::create(dir.path().join("baresip.log")).expect("log");
        let proc_ = Proc::spawn(
            "baresip",
            Command::new("baresip")
                .arg("-f")
                .arg(dir.path())
                .stdout(log.try_clone().expect("log"))
                .stderr(log),
        );
        let b = Baresip { proc_, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if b.log()
                .lines()
                .any(|l| l.contains(&format!("{user}@")) && l.contains("200 OK"))
            {
                return b;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("baresip did not register as {user}:\n{}", b.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("baresip.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.proc_.pid()
    }

    /// The samples baresip received in its recorded call(s) (`sndfile`'s `*dec.wav`, 16-bit
    /// mono), concatenated.
    pub fn received_audio(&self) -> Vec<i16> {
        let mut samples = Vec::new();
        for entry in std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !(name.ends_with("dec.wav")) {
                continue;
            }
            let bytes = std::fs::read(entry.path()).unwrap_or_default();
            // The `data` chunk of a RIFF/WAVE file.
            let mut i = 12;
            while i + 8 <= bytes.len() {
                let len = u32::from_le_bytes(bytes[i + 4..i + 8].try_into().unwrap()) as usize;
                if &bytes[i..i + 4] == b"data" {
                    let end = (i + 8 + len).min(bytes.len());
                    samples.extend(
                        bytes[i + 8..end]
                            .chunks_exact(2)
                            .map(|c| i16::from_le_bytes([c[0], c[1]])),
                    );
                    break;
                }
                i += 8 + len + (len & 1);
            }
        }
        samples
    }
}

/// The strongest frequency in `samples` (8 kHz) between 200 and 2000 Hz, to 10 Hz (Goertzel),
/// and its share of the total power over that scan.
pub fn dominant_frequency(samples: &[i16]) -> (f64, f64) {
    let power = |freq: f64| {
        let w = 2.0 * std::f64::consts::PI * freq / 8000.0;
        let coeff = 2.0 * w.cos();
        let (mut s1, mut s2) = (0.0f64, 0.0f64);
        for &x in samples {
            let s0 = f64::from(x) + coeff * s1 - s2;
            s2 = s1;
            s1 = s0;
        }
        s1 * s1 + s2 * s2 - coeff * s1 * s2
    };
    let scan: Vec<(f64, f64)> = (20..=200)
        .map(|f| f64::from(f) * 10.0)
        .map(|f| (f, power(f)))
        .collect();
    let total: f64 = scan.iter().map(|(_, p)| p).sum();
    let (f, p) = scan
        .iter()
        .copied()
        .fold((0.0, 0.0), |best, x| if x.1 > best.1 { x } else { best });
    (f, if total > 0.0 { p / total } else { 0.0 })
}

impl Drop for Baresip {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- baresip log ---\n{}", self.log());
        }
    }
}

impl Drop for Kamailio {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- kamailio log (last 60 lines) ---");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}
