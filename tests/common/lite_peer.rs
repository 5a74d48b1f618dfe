//! A light WebRTC endpoint playing the browser, for the load tool: one socket and one task per
//! peer, one ICE check (controlling, nominating), DTLS by the `dtls` crate, then SRTP with the
//! `srtp` crate's contexts directly (no ICE agent, interceptors or per-packet task hand-offs).
//! About a fifth of a `webrtc`-crate peer's CPU, so that on a 2-core machine the clients leave
//! room for the gateway under test. Loopback only. The `RtcPeer` stays the reference peer of
//! the functional tests; a test in `webrtc_leg.rs` keeps this one honest against callgate.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use callgate::media::rtp::RtpPacket;
use sha2::{Digest, Sha256};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use webrtc::dtls::config::Config as DtlsConfig;
use webrtc::dtls::conn::DTLSConn;
use webrtc::dtls::crypto::Certificate;
use webrtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile;
use webrtc::ice::control::AttrControlling;
use webrtc::ice::priority::PriorityAttr;
use webrtc::ice::use_candidate::UseCandidateAttr;
use webrtc::srtp::context::Context;
use webrtc::srtp::protection_profile::ProtectionProfile;
use webrtc::stun::agent::TransactionId;
use webrtc::stun::attributes::ATTR_USERNAME;
use webrtc::stun::fingerprint::FINGERPRINT;
use webrtc::stun::integrity::MessageIntegrity;
use webrtc::stun::message::{BINDING_REQUEST, BINDING_SUCCESS, Message, Setter};
use webrtc::stun::textattrs::Username;
use webrtc::stun::xoraddr::XorMappedAddress;
use webrtc::util::Conn;

/// What the peer hears: each decrypted RTP packet.
pub type OnRtp = Box<dyn FnMut(&RtpPacket<'_>) + Send>;

pub struct LitePeer {
    socket: Arc<UdpSocket>,
    ufrag: String,
    pwd: String,
    cert: Certificate,
    remote: Option<SocketAddr>,
    out: Option<Mutex<Context>>,
    ssrc: u32,
    dtls: Option<Arc<DTLSConn>>,
    /// The reader and the consent checks.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// A short random token for ICE credentials.
fn token(len: usize) -> String {
    let mut b = vec![0u8; len];
    getrandom::fill(&mut b).expect("random");
    b.iter()
        .map(|x| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[usize::from(*x) % 36]))
        .collect()
}

fn sdp_attr<'a>(sdp: &'a str, name: &str) -> Option<&'a str> {
    sdp.lines()
        .find_map(|l| l.trim().strip_prefix("a=")?.strip_prefix(name))
}

impl LitePeer {
    /// A peer and its offer (one host candidate on 127.0.0.1, PCMU and telephone-event/8000).
    pub async fn offer() -> (LitePeer, String) {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
        let port = socket.local_addr().expect("addr").port();
        let cert = Certificate::generate_self_signed(vec!["load".to_owned()]).expect("cert");
        let der = cert.certificate.first().expect("a certificate");
        let fingerprint = Sha256::digest(der.as_ref())
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":");
        let (ufrag, pwd) = (token(8), token(24));
        let mut ssrc = [0u8; 4];
        getrandom::fill(&mut ssrc).expect("random");
        let ssrc = u32::from_be_bytes(ssrc) | 1;
        let offer = format!(
            "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n\
             m=audio 9 UDP/TLS/RTP/SAVPF 0 126\r\nc=IN IP4 0.0.0.0\r\n\
             a=ice-ufrag:{ufrag}\r\na=ice-pwd:{pwd}\r\na=fingerprint:sha-256 {fingerprint}\r\n\
             a=setup:actpass\r\na=mid:0\r\na=sendrecv\r\na=msid:load audio\r\na=rtcp-mux\r\n\
             a=rtpmap:0 PCMU/8000\r\na=rtpmap:126 telephone-event/8000\r\n\
             a=fmtp:126 0-16\r\na=ssrc:{ssrc} cname:load\r\n\
             a=candidate:1 1 udp 2130706431 127.0.0.1 {port} typ host\r\na=end-of-candidates\r\n"
        );
        (
            LitePeer {
                socket,
                ufrag,
                pwd,
                cert,
                remote: None,
                out: None,
                ssrc,
                dtls: None,
                tasks: Vec::new(),
            },
            offer,
        )
    }

    /// Applies callgate's answer: checks its candidate, runs DTLS in the role the answer left
    /// us, and starts delivering decrypted RTP to `on_rtp`. Panics after 10 s.
    pub async fn accept(&mut self, answer: &str, on_rtp: OnRtp) {
        tokio::time::timeout(Duration::from_secs(10), self.connect(answer, on_rtp))
            .await
            .expect("ICE and DTLS within 10 s");
    }

    async fn connect(&mut self, answer: &str, on_rtp: OnRtp) {
        let r_ufrag = sdp_attr(answer, "ice-ufrag:").expect("ice-ufrag").trim();
        let r_pwd = sdp_attr(answer, "ice-pwd:").expect("ice-pwd").trim();
        // The callgate candidate on 127.0.0.1 (its loopback candidate).
        let remote: SocketAddr = answer
            .lines()
            .filter_map(|l| l.trim().strip_prefix("a=candidate:"))
            .find_map(|c| {
                let f: Vec<&str> = c.split_whitespace().collect();
                (f.get(4) == Some(&"127.0.0.1")).then(|| format!("127.0.0.1:{}", f[5]))
            })
            .and_then(|a| a.parse().ok())
            .expect("a 127.0.0.1 candidate in the answer");
        self.remote = Some(remote);
        // Callgate answers `active` (it is the DTLS client) unless told otherwise.
        let we_are_client = sdp_attr(answer, "setup:").is_some_and(|s| s.trim() == "passive");

        let (dtls_tx, dtls_rx) = mpsc::channel::<Vec<u8>>(64);
        let (stun_tx, stun_rx) = oneshot::channel::<()>();
        let inbound: Arc<Mutex<Option<Context>>> = Arc::new(Mutex::new(None));
        self.tasks.push(tokio::spawn(read_loop(
            self.socket.clone(),
            dtls_tx,
            stun_tx,
            self.pwd.clone(),
            inbound.clone(),
            on_rtp,
        )));

        // One check, nominating; the reply means callgate has the pair.
        let username = format!("{r_ufrag}:{}", self.ufrag);
        let check = binding_request(&username, r_pwd);
        let mut stun_rx = stun_rx;

        loop {
            self.socket
                .send_to(&check, remote)
                .await
                .expect("send check");
            match tokio::time::timeout(Duration::from_millis(200), &mut stun_rx).await {
                Ok(_) => break,
                Err(_) => continue,
            }
        }
        // Consent (RFC 7675): a check every 2 s keeps callgate from giving the peer up.
        let (socket, keep) = (self.socket.clone(), check.clone());
        self.tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                if socket.send_to(&keep, remote).await.is_err() {
                    break;
                }
            }
        }));

        let conn: Arc<dyn Conn + Send + Sync> = Arc::new(DtlsPipe {
            socket: self.socket.clone(),
            remote,
            rx: tokio::sync::Mutex::new(dtls_rx),
        });
        let config = DtlsConfig {
            certificates: vec![self.cert.clone()],
            srtp_protection_profiles: vec![
                SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm,
                SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80,
            ],
            insecure_skip_verify: true,
            ..Default::default()
        };
        let dtls = DTLSConn::new(conn, config, we_are_client, None)
            .await
            .expect("DTLS handshake");
        let profile = match dtls.selected_srtpprotection_profile() {
            SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm => ProtectionProfile::AeadAes128Gcm,
            _ => ProtectionProfile::Aes128CmHmacSha1_80,
        };
        let mut cfg = webrtc::srtp::config::Config {
            profile,
            ..Default::default()
        };
        cfg.extract_session_keys_from_dtls(dtls.connection_state().await, we_are_client)
            .await
            .expect("SRTP keys");
        let out = Context::new(
            &cfg.keys.local_master_key,
            &cfg.keys.local_master_salt,
            profile,
            None,
            None,
        )
        .expect("outbound SRTP context");
        let inc = Context::new(
            &cfg.keys.remote_master_key,
            &cfg.keys.remote_master_salt,
            profile,
            None,
            None,
        )
        .expect("inbound SRTP context");
        *inbound.lock().expect("lock") = Some(inc);
        self.out = Some(Mutex::new(out));
        self.dtls = Some(Arc::new(dtls));
    }

    /// Sends one plain RTP packet (its SSRC replaced by the one the offer announced).
    pub async fn send(&self, rtp: &[u8]) {
        let (Some(out), Some(remote)) = (&self.out, self.remote) else {
            return;
        };
        let mut plain = rtp.to_vec();
        if plain.len() >= 12 {
            plain[8..12].copy_from_slice(&self.ssrc.to_be_bytes());
        }
        let sealed = out.lock().expect("lock").encrypt_rtp(&plain);
        if let Ok(sealed) = sealed {
            let _ = self.socket.send_to(&sealed, remote).await;
        }
    }

    /// Stops the consent checks, as a browser that vanished would (media stops with them).
    pub fn go_silent(&self) {
        if let Some(consent) = self.tasks.get(1) {
            consent.abort();
        }
    }

    /// Ends DTLS (callgate sees the close) and stops the reader.
    pub async fn close(&self) {
        if let Some(d) = &self.dtls {
            let _ = d.close().await;
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for LitePeer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A nominating ICE check (RFC 8445 §7.2.2) for `username` (`theirs:ours`), signed with `pwd`.
pub fn binding_request(username: &str, pwd: &str) -> Vec<u8> {
    let mut m = Message::new();
    let mut tiebreaker = [0u8; 8];
    getrandom::fill(&mut tiebreaker).expect("random");
    let setters: Vec<Box<dyn Setter>> = vec![
        Box::new(BINDING_REQUEST),
        Box::new(TransactionId::new()),
        Box::new(Username::new(ATTR_USERNAME, username.to_owned())),
        Box::new(UseCandidateAttr::new()),
        Box::new(AttrControlling(u64::from_be_bytes(tiebreaker))),
        Box::new(PriorityAttr(2_130_706_431)),
        Box::new(MessageIntegrity::new_short_term_integrity(pwd.to_owned())),
        Box::new(FINGERPRINT),
    ];
    m.build(&setters).expect("binding request");
    m.raw
}

/// The answer to callgate's check (RFC 8445 §7.3.1.4), signed with our password.
fn binding_success(request: &[u8], from: SocketAddr, pwd: &str) -> Option<Vec<u8>> {
    let mut req = Message::new();
    req.raw = request.to_vec();
    req.decode().ok()?;
    let mut out = Message::new();
    out.build(&[
        Box::new(req),
        Box::new(BINDING_SUCCESS),
        Box::new(XorMappedAddress {
            ip: from.ip(),
            port: from.port(),
        }),
        Box::new(MessageIntegrity::new_short_term_integrity(pwd.to_owned())),
        Box::new(FINGERPRINT),
    ])
    .ok()?;
    Some(out.raw)
}

/// Reads the peer's socket: STUN replies signal ICE, DTLS records go to the handshake, SRTP is
/// decrypted and handed to `on_rtp` (RFC 7983 demultiplexing by first byte).
async fn read_loop(
    socket: Arc<UdpSocket>,
    dtls: mpsc::Sender<Vec<u8>>,
    stun: oneshot::Sender<()>,
    pwd: String,
    inbound: Arc<Mutex<Option<Context>>>,
    mut on_rtp: OnRtp,
) {
    let mut stun = Some(stun);
    let mut buf = vec![0u8; 2048];
    let mut ctx: Option<Context> = None;
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            return;
        };
        let data = &buf[..n];
        match data.first() {
            Some(0..=3) => {
                // A binding success (0x0101) answers our check. Checks to us (0x0001) are
                // answered too, as the `webrtc` crate's agent sends them even when lite.
                match data.get(..2) {
                    Some([0x01, 0x01]) => {
                        if let Some(s) = stun.take() {
                            let _ = s.send(());
                        }
                    }
                    Some([0x00, 0x01]) => {
                        if let Some(reply) = binding_success(data, from, &pwd) {
                            let _ = socket.send_to(&reply, from).await;
                        }
                    }
                    _ => {}
                }
            }
            Some(20..=63) => {
                let _ = dtls.try_send(data.to_vec());
            }
            Some(128..=191) => {
                if ctx.is_none() {
                    ctx = inbound.lock().expect("lock").take();
                }
                // RTCP (PT 192-223) is not ours to read.
                if matches!(data.get(1), Some(192..=223)) {
                    continue;
                }
                if let Some(c) = ctx.as_mut() {
                    if let Ok(plain) = c.decrypt_rtp(data) {
                        if let Ok(p) = RtpPacket::parse(&plain) {
                            on_rtp(&p);
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// The DTLS handshake's view of the socket: records the reader routed to it, sends straight out.
struct DtlsPipe {
    socket: Arc<UdpSocket>,
    remote: SocketAddr,
    rx: tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>>,
}

#[async_trait::async_trait]
impl Conn for DtlsPipe {
    async fn connect(&self, _addr: SocketAddr) -> webrtc::util::Result<()> {
        Ok(())
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc::util::Result<usize> {
        let pkt = self
            .rx
            .lock()
            .await
            .recv()
            .await
            .ok_or(webrtc::util::Error::ErrClosedListener)?;
        let n = pkt.len().min(buf.len());
        buf[..n].copy_from_slice(&pkt[..n]);
        Ok(n)
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc::util::Result<(usize, SocketAddr)> {
        Ok((self.recv(buf).await?, self.remote))
    }

    async fn send(&self, buf: &[u8]) -> webrtc::util::Result<usize> {
        Ok(self.socket.send_to(buf, self.remote).await?)
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc::util::Result<usize> {
        Ok(self.socket.send_to(buf, target).await?)
    }

    fn local_addr(&self) -> webrtc::util::Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        Some(self.remote)
    }

    async fn close(&self) -> webrtc::util::Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}
