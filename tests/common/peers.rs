//! Real SIP peers for tests: Kamailio (registrar + proxy) and sipp, on 127.0.0.1 with ports the
//! test picks. Every process is started in its own process group and killed by it on drop.
#![allow(dead_code)]

use std::net::UdpSocket;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{TempDir, require_tool};

/// A free UDP port on 127.0.0.1 (bound and released; tests run in their own namespace).
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free UDP port")
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
        let _ = Command::new("kill").args(["-TERM", "--", &pgid]).status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("kill").args(["-KILL", "--", &pgid]).status();
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
        let port = free_udp_port();
        let mut reg = Sipp::spawn(
            proxy_port,
            "reg.xml",
            port,
            &["-s", user, "-au", user, "-ap", password],
        );
        let ok = reg.wait(Duration::from_secs(10));
        assert!(ok.0, "sipp could not register {user}:\n{}", ok.1);
        Sipp::spawn(proxy_port, scenario, port, &["-s", user])
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
            if entry.file_name().to_string_lossy().ends_with("_errors.log") {
                log.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
            }
        }
        (status.is_some_and(|s| s.success()), log)
    }
}
