//! callgate load tool: N concurrent bridged calls, WebRTC client ⇄ callgate ⇄ RTP echo, for T
//! seconds, against the release `callgate` binary as its own process, a real Kamailio and
//! two sipps that answer the calls and echo their RTP. Reports calls held, packets lost,
//! callgate's CPU seconds per call-minute and resident memory per call (from /proc of the
//! callgate process), and the one-way latency callgate adds (p50 / p99).
//!
//! Loopback only, in a private network namespace:
//!
//! ```sh
//! unshare -n -- bash -c 'ip link set lo up && cargo bench --bench load -- --calls 100 --seconds 30'
//! ```
//!
//! `--pin` puts callgate on CPU 0 and the load rig (this tool, sipp, Kamailio) on the other
//! CPUs, so that the rig does not preempt the gateway it measures.
//!
//! The clients are light WebRTC peers (tests/common/lite_peer.rs: one ICE check, DTLS, then
//! SRTP straight on a socket), so that the rig costs a fraction of what it measures.
//!
//! `--webrtc-port-range` gives each call a WebRTC port of its own (40000-41999) instead of the
//! single shared one.
//!
//! The WebRTC clients run in this process and share the machine with callgate; callgate's
//! figures come from its own /proc entry, so they are its own whatever the clients cost.
#![allow(missing_docs, clippy::expect_used, clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use callgate::account::account_from_cli;
use callgate::config::Config;
use callgate::media::rtp::RtpPacket;
use common::lite_peer::LitePeer;
use common::peers::{Kamailio, Sipp, free_udp_port};
use common::{Daemon, TempDir, callgate};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
/// Marks our packets in the echo (and tells them from anything else).
const MAGIC: [u8; 4] = *b"cgLT";

struct Args {
    /// One WebRTC port per call (`media.webrtc_port_min/max`) instead of the shared one.
    port_range: bool,
    /// callgate on CPU 0, this tool, sipp and Kamailio on the others.
    pin: bool,
    calls: usize,
    seconds: u64,
    setups_at_once: usize,
    /// Calls each page (agent) places.
    calls_per_page: usize,
    /// Agents logged in and registered (the pages with calls, and idle ones up to this many).
    registrations: usize,
    /// Seconds between samples of callgate's memory, descriptors, threads and tasks.
    sample_secs: u64,
    /// After every page logged out: how long to wait for a last sample (memory given back).
    linger_secs: u64,
}

fn args() -> Args {
    let mut a = Args {
        port_range: false,
        pin: false,
        calls: 100,
        seconds: 30,
        setups_at_once: 8,
        calls_per_page: 4,
        registrations: 0,
        sample_secs: 60,
        linger_secs: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut num = || it.next().and_then(|v| v.parse::<u64>().ok());
        match arg.as_str() {
            "--calls" => a.calls = num().unwrap_or(100) as usize,
            "--seconds" => a.seconds = num().unwrap_or(30),
            "--webrtc-port-range" => a.port_range = true,
            "--pin" => a.pin = true,
            "--setups-at-once" => a.setups_at_once = num().unwrap_or(8).max(1) as usize,
            "--calls-per-page" => a.calls_per_page = num().unwrap_or(4).max(1) as usize,
            "--registrations" => a.registrations = num().unwrap_or(0) as usize,
            "--sample-secs" => a.sample_secs = num().unwrap_or(60).max(1),
            "--linger" => a.linger_secs = num().unwrap_or(60),
            // cargo bench passes --bench; ignore what is not ours.
            _ => {}
        }
    }
    a
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let hz = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(100.0);
    ticks / hz
}

/// Datagrams the kernel dropped (receive buffer full) on UDP sockets bound to a port in
/// `ports`, while they exist.
fn kernel_drops(ports: std::ops::RangeInclusive<u16>) -> u64 {
    std::fs::read_to_string("/proc/net/udp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                .is_some_and(|p| ports.contains(&p))
        })
        .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
        .sum()
}

/// Entries of `/proc/<pid>/<dir>` (open descriptors for `fd`, threads for `task`).
fn proc_entries(pid: u32, dir: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/{dir}")).map_or(0, Iterator::count)
}

/// A metric's value in callgate's `/metrics` text (0 when absent).
fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

async fn metrics_of(http: std::net::SocketAddr) -> String {
    let addr = http.to_string();
    tokio::task::spawn_blocking(move || common::http_get(&addr, "/metrics"))
        .await
        .unwrap_or_default()
}

/// callgate's footprint at one moment: (RSS kB, open descriptors, threads, runtime tasks,
/// registrations held).
async fn footprint(pid: u32, http: std::net::SocketAddr) -> (u64, usize, usize, u64, u64) {
    let m = metrics_of(http).await;
    (
        rss_kb(pid),
        proc_entries(pid, "fd"),
        proc_entries(pid, "task"),
        counter(&m, "callgate_tasks"),
        counter(&m, "callgate_registrations{state=\"registered\"}"),
    )
}

/// Resident memory of `pid`, kB.
fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// One packet of the probe stream: magic, sequence, send time; 160 bytes like 20 ms of G.711.
fn probe(seq: u32) -> Vec<u8> {
    let mut p = vec![0x55u8; 160];
    p[..4].copy_from_slice(&MAGIC);
    p[4..8].copy_from_slice(&seq.to_be_bytes());
    p[8..16].copy_from_slice(&micros().to_be_bytes());
    p
}

fn rtt_of(payload: &[u8], now: u64) -> Option<u64> {
    if payload.len() < 16 || payload[..4] != MAGIC {
        return None;
    }
    let sent = u64::from_be_bytes(payload[8..16].try_into().ok()?);
    now.checked_sub(sent)
}

#[derive(Default)]
struct Totals {
    sent: AtomicU64,
    received: AtomicU64,
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_json(ws: &mut Ws) -> Option<Value> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .ok()??
            .ok()?;
        if let Message::Text(t) = msg {
            return serde_json::from_str(t.as_str()).ok();
        }
    }
}

/// A page: logs in, places `n` calls to 1002 one after another, then talks on all of them
/// for `talk`, measuring round trips; returns (calls established, calls still up at the end,
/// round-trip samples in µs).
#[allow(clippy::too_many_arguments)]
async fn page(
    http: std::net::SocketAddr,
    token: String,
    callee: &'static str,
    n: usize,
    start_talking: tokio::time::Instant,
    talk: Duration,
    totals: Arc<Totals>,
    setups: Arc<tokio::sync::Semaphore>,
) -> (usize, usize, Vec<u64>) {
    let Ok((mut ws, _)) = tokio_tungstenite::connect_async(format!("ws://{http}/ws")).await else {
        return (0, 0, Vec::new());
    };
    let _ = ws
        .send(Message::text(
            json!({"type": "connect", "id": 1, "token": token}).to_string(),
        ))
        .await;
    while let Some(ev) = next_json(&mut ws).await {
        if ev["type"] == "registration" && ev["state"] == "registered" {
            break;
        }
    }
    // Echoes are timed as they arrive, in each peer's reader.
    let rtts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut peers = Vec::new();
    for i in 0..n {
        let _permit = setups.acquire().await;
        let (mut peer, offer) = LitePeer::offer().await;
        let id = 10 + i as u64;
        let _ = ws
            .send(Message::text(
                json!({"type": "call", "id": id, "to": callee, "sdp": offer}).to_string(),
            ))
            .await;
        let mut answer = None;
        while let Some(ev) = next_json(&mut ws).await {
            if ev["type"] == "reply" && ev["id"] == id {
                answer = ev["sdp"].as_str().map(str::to_owned);
                break;
            }
        }
        let Some(answer) = answer else { continue };
        let (rtts, totals) = (rtts.clone(), totals.clone());
        let on_rtp: common::lite_peer::OnRtp = Box::new(move |p| {
            if let Some(rtt) = rtt_of(p.payload, micros()) {
                rtts.lock().unwrap().push(rtt);
                totals.received.fetch_add(1, Ordering::Relaxed);
            }
        });
        // `accept` waits for ICE + DTLS (and panics after 10 s): run it as a task to survive.
        let connected = tokio::spawn(async move {
            peer.accept(&answer, on_rtp).await;
            peer
        })
        .await;
        if let Ok(peer) = connected {
            peers.push(peer);
        }
    }
    let established = peers.len();
    tokio::time::sleep_until(start_talking).await;
    let end = start_talking + talk;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut seq = 0u32;
    let mut ended = 0usize;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(end) => break,
            _ = tick.tick() => {
                for p in &peers {
                    let mut b = Vec::new();
                    RtpPacket { marker: false, payload_type: 0, sequence: seq as u16, timestamp: seq.wrapping_mul(160), ssrc: 1, payload: &probe(seq) }.write(&mut b);
                    p.send(&b).await;
                    totals.sent.fetch_add(1, Ordering::Relaxed);
                }
                seq += 1;
            }
            ev = next_json(&mut ws) => {
                if ev.as_ref().is_some_and(|e| e["type"] == "call" && e["state"] == "ended") {
                    ended += 1;
                }
            }
        }
    }
    // Echoes still in flight.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = ws
        .send(Message::text(
            json!({"type": "logout", "id": 9}).to_string(),
        ))
        .await;
    for p in &peers {
        p.close().await;
    }
    let rtts = std::mem::take(&mut *rtts.lock().unwrap());
    (established, established.saturating_sub(ended), rtts)
}

/// Round trips through sipp's echo alone (no callgate), µs.
async fn direct_rtts(echo: std::net::SocketAddr, count: u32) -> Vec<u64> {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    for seq in 0..count {
        let mut b = Vec::new();
        RtpPacket {
            marker: false,
            payload_type: 0,
            sequence: seq as u16,
            timestamp: seq * 160,
            ssrc: 9,
            payload: &probe(seq),
        }
        .write(&mut b);
        let _ = s.send_to(&b, echo).await;
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(200), s.recv_from(&mut buf)).await
        {
            if let Ok(p) = RtpPacket::parse(&buf[..n]) {
                if let Some(rtt) = rtt_of(p.payload, micros()) {
                    out.push(rtt);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    out
}

fn main() {
    let a = args();
    if a.pin {
        // Before any thread exists, so that all of the tool's threads and children inherit it.
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert!(cpus >= 2, "--pin needs two CPUs or more");
        let status = std::process::Command::new("taskset")
            .args([
                "-p",
                "-c",
                &format!("1-{}", cpus - 1),
                &std::process::id().to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("taskset");
        assert!(status.success(), "taskset failed");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(a));
}

async fn run(a: Args) {
    let kam = Kamailio::start_with(free_udp_port(), &["WITH_LOAD_USERS"]);
    // Two far ends (sipp's echo is one thread on one socket): pages alternate between them.
    let calls = a.calls.to_string();
    let far_ends: Vec<(Sipp, u16)> = [("1002", "pass1002"), ("1003", "pass1003")]
        .into_iter()
        .map(|(user, password)| {
            let echo_port = free_udp_port();
            let sipp = Sipp::uas_with(
                kam.port,
                user,
                password,
                "uas_answer.xml",
                &[
                    "-rtp_echo",
                    "-mp",
                    &echo_port.to_string(),
                    "-m",
                    &calls,
                    "-l",
                    &calls,
                    "-timeout",
                    "3600s",
                ],
            );
            (sipp, echo_port)
        })
        .collect();
    let echo_port = far_ends[0].1;
    let dir = TempDir::new("load");
    let webrtc_port = free_udp_port();
    let http_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let range = if a.port_range {
        "webrtc_port_min = 40000\nwebrtc_port_max = 41999\n"
    } else {
        ""
    };
    let cfg = dir.write(
        "callgate.toml",
        &format!(
            "[http]\nlisten = \"127.0.0.1:{http_port}\"\nresume_secs = 0\nmax_connections_per_ip = 5000\n\
             [sip]\nlisten = \"127.0.0.1:0\"\nregistration_grace_secs = 0\n\
             [media]\nwebrtc_port = {webrtc_port}\n{range}rtp_port_min = 36000\nrtp_port_max = 39999\ntimeout_secs = 0\n\
             [log]\nlevel = \"warn\"\n"
        ),
    );
    dir.write("apps.toml", &format!("[apps.crm]\nkeys = [\"{KEY}\"]\n"));
    let config = Config::load(&cfg).expect("config");
    let mut gw = Daemon::spawn(
        (if a.pin {
            let mut c = std::process::Command::new("taskset");
            c.args(["-c", "0", env!("CARGO_BIN_EXE_callgate")]);
            c
        } else {
            callgate()
        })
        .args(["run", "--config"])
        .arg(&cfg)
        .env_remove("RUST_LOG"),
    );
    let pid = gw.pid();
    let http: std::net::SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(http).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_idle = rss_kb(pid);
    let idle = footprint(pid, http).await;
    let expires = (micros() / 1_000_000) as i64 + 3600;
    let calling_pages = a.calls.div_ceil(a.calls_per_page);
    let pages = calling_pages.max(a.registrations);
    assert!(
        pages <= 2000,
        "Kamailio knows agents 20000-21999: 2000 pages at most"
    );
    let totals = Arc::new(Totals::default());
    let setups = Arc::new(tokio::sync::Semaphore::new(a.setups_at_once));
    // Setting calls up takes a while at 8 at a time; everyone starts talking together after.
    let setup_budget = Duration::from_millis(400) * a.calls as u32 / a.setups_at_once as u32
        + Duration::from_secs(5);
    let start_talking = tokio::time::Instant::now() + setup_budget;
    let talk = Duration::from_secs(a.seconds);
    eprintln!(
        "load: {} calls on {calling_pages} of {pages} pages (agents); setting up for {:?}, then {}s of audio",
        a.calls, setup_budget, a.seconds
    );
    let mut tasks = Vec::new();
    for p in 0..pages {
        let n = a
            .calls
            .saturating_sub(p * a.calls_per_page)
            .min(a.calls_per_page);
        let agent = (20_000 + p).to_string();
        let acct = account_from_cli(
            &agent,
            None,
            format!("pw{agent}"),
            "127.0.0.1",
            None,
            Some(kam.port),
            None,
        )
        .unwrap();
        let token = config
            .keyring()
            .mint("crm", &acct, Some(expires), [p as u8; 16])
            .unwrap();
        tasks.push(tokio::spawn(page(
            http,
            token,
            if p % 2 == 0 { "1002" } else { "1003" },
            n,
            start_talking,
            talk,
            totals.clone(),
            setups.clone(),
        )));
    }
    tokio::time::sleep_until(start_talking).await;
    // Let the streams settle before measuring callgate.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu0 = cpu_seconds(pid);
    let t0 = Instant::now();
    // callgate's footprint through the calls: it must stay flat.
    let mut samples = Vec::new();
    let measure_end = t0 + talk.saturating_sub(Duration::from_secs(3));
    loop {
        samples.push((t0.elapsed().as_secs(), footprint(pid, http).await));
        let next = t0 + Duration::from_secs(a.sample_secs * samples.len() as u64);
        if next >= measure_end {
            break;
        }
        tokio::time::sleep(next - Instant::now()).await;
    }
    tokio::time::sleep(measure_end.saturating_duration_since(Instant::now())).await;
    samples.push((t0.elapsed().as_secs(), footprint(pid, http).await));
    let cpu1 = cpu_seconds(pid);
    // While the calls' sockets still exist.
    let kernel = kernel_drops(webrtc_port..=webrtc_port) + kernel_drops(40_000..=41_999);
    let kernel_rtp = kernel_drops(36_000..=39_999);
    let kernel_echo: u64 = far_ends
        .iter()
        .map(|(_, port)| kernel_drops(*port..=*port))
        .sum();
    let measured = t0.elapsed().as_secs_f64();
    let rss_busy = rss_kb(pid);
    let (mut established, mut held, mut rtts) = (0, 0, Vec::new());
    for t in tasks {
        if let Ok((e, h, r)) = t.await {
            established += e;
            held += h;
            rtts.extend(r);
        }
    }
    // Where packets went missing: callgate's own counters (its bridges have ended by now).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let metrics = metrics_of(http).await;
    let to_sip = counter(
        &metrics,
        "callgate_media_packets_total{direction=\"to_sip\"}",
    );
    let to_browser = counter(
        &metrics,
        "callgate_media_packets_total{direction=\"to_browser\"}",
    );
    let sip_lost = counter(&metrics, "callgate_media_packets_lost_total");
    // Every page logged out: the registrations are removed (Expires: 0) and what the sessions
    // and calls held is given back.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut after = footprint(pid, http).await;
    while after.4 > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        after = footprint(pid, http).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = footprint(pid, http).await;
    let later = if a.linger_secs > 0 {
        tokio::time::sleep(Duration::from_secs(a.linger_secs)).await;
        Some(footprint(pid, http).await)
    } else {
        None
    };
    let direct = direct_rtts(format!("127.0.0.1:{echo_port}").parse().unwrap(), 200).await;
    let status = gw.terminate(Duration::from_secs(30));
    for (mut far, _) in far_ends {
        let _ = far.wait(Duration::from_secs(1));
    }

    rtts.sort_unstable();
    let mut direct = direct;
    direct.sort_unstable();
    let sent = totals.sent.load(Ordering::Relaxed);
    let received = totals.received.load(Ordering::Relaxed);
    let lost = sent.saturating_sub(received);
    let cpu = cpu1 - cpu0;
    let call_minutes = established.max(1) as f64 * measured / 60.0;
    let added = |p: f64| {
        (percentile(&rtts, p) as f64 - percentile(&direct, p) as f64).max(0.0) / 2.0 / 1000.0
    };
    println!("calls requested      {}", a.calls);
    println!("calls established    {established}");
    println!("calls held to the end {held}");
    println!("packets sent         {sent}");
    println!("packets echoed back  {received}");
    println!(
        "packets lost         {lost} ({:.3} %)",
        lost as f64 * 100.0 / sent.max(1) as f64
    );
    println!(
        "where                clients sent {sent}; callgate got and sent on to SIP {to_sip} \
         (lost before callgate: {}, of which dropped by the kernel at callgate's WebRTC \
         port(s): {kernel}); sipp's echo missing \
         at callgate {sip_lost} (dropped by the kernel at callgate's RTP ports: {kernel_rtp}, at \
         sipp's echo ports: {kernel_echo}); \
         callgate sent to the clients {to_browser} (lost after callgate: {})",
        sent.saturating_sub(to_sip),
        to_browser.saturating_sub(received)
    );
    println!(
        "callgate CPU         {cpu:.2} s over {measured:.1} s = {:.1} % of one core; {:.3} CPU s per call-minute; {:.1} % of a core per 100 calls",
        cpu * 100.0 / measured,
        cpu / call_minutes,
        cpu * 100.0 / measured * 100.0 / established.max(1) as f64
    );
    println!(
        "callgate RSS         {rss_idle} kB idle, {rss_busy} kB with the calls: {:.0} kB per call{}",
        rss_busy.saturating_sub(rss_idle) as f64 / established.max(1) as f64,
        if pages > calling_pages {
            format!(
                " (counting the {} pages without calls)",
                pages - calling_pages
            )
        } else {
            String::new()
        }
    );
    println!(
        "round trip           p50 {:.2} ms, p99 {:.2} ms (direct to the echo: p50 {:.2} ms, p99 {:.2} ms)",
        percentile(&rtts, 0.5) as f64 / 1000.0,
        percentile(&rtts, 0.99) as f64 / 1000.0,
        percentile(&direct, 0.5) as f64 / 1000.0,
        percentile(&direct, 0.99) as f64 / 1000.0
    );
    println!(
        "added one-way        p50 {:.2} ms, p99 {:.2} ms (half the difference; includes this tool's WebRTC stack)",
        added(0.5),
        added(0.99)
    );
    println!("footprint            when     RSS kB   fds  threads  tasks  registered");
    let row = |when: String, f: (u64, usize, usize, u64, u64)| {
        println!(
            "                     {when:>8} {:>8} {:>5} {:>8} {:>6} {:>11}",
            f.0, f.1, f.2, f.3, f.4
        );
    };
    row("idle".into(), idle);
    for (secs, f) in &samples {
        row(format!("{secs} s"), *f);
    }
    row("after".into(), after);
    if let Some(later) = later {
        row(format!("+{} s", a.linger_secs), later);
    }
    println!("callgate exit        {status:?}");
    // (Its log level is `warn`: every line is a warning or an error.)
    println!("callgate log lines   {}", gw.seen.len());
    for l in gw.seen.iter().take(10) {
        println!("                     {l}");
    }
}
