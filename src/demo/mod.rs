//! The demo mode of the embedded default configuration: a small PBX on loopback (a registrar
//! for demo extensions with digest authentication, and numbers that answer: 600 echo, 601
//! tone, 602 rings and calls the agent back), and demo tokens for the page's "Try the demo".
//! Never on unless the configuration says so (the embedded one does), never beyond loopback.

pub mod media;
pub mod pbx;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::UdpSocket;

use crate::account::SipAccount;
use crate::secret::SecretString;

/// The demo extensions (each gets a random password at start-up).
pub const EXTENSIONS: [&str; 8] = [
    "1001", "1002", "1003", "1004", "1005", "1006", "1007", "1008",
];
/// RTP ports of the demo PBX's calls (127.0.0.1).
const RTP_PORTS: std::ops::Range<u16> = 5100..5164;
/// How long a demo token lasts.
pub const TOKEN_LIFE_SECS: i64 = 3600;

/// What the HTTP side needs of the demo: the accounts to mint tokens for.
#[derive(Debug)]
pub struct DemoAccounts {
    sip: SocketAddr,
    extensions: Vec<(String, SecretString)>,
    next: AtomicUsize,
}

impl DemoAccounts {
    /// The next demo extension's account (round robin, so two tabs are two extensions).
    pub fn next_account(&self) -> Option<SipAccount> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.extensions.len().max(1);
        let (ext, password) = self.extensions.get(i)?;
        crate::account::account_from_cli(
            ext,
            None,
            password.expose_secret().to_owned(),
            &self.sip.ip().to_string(),
            None,
            Some(self.sip.port()),
            Some(&format!("Demo {ext}")),
        )
        .ok()
    }
}

/// The demo PBX, bound, not yet running.
pub struct DemoPbx {
    socket: UdpSocket,
    pbx: pbx::Pbx,
}

impl DemoPbx {
    /// Binds 127.0.0.1:`demo.sip` and makes the extensions' passwords.
    pub async fn bind(demo: &crate::config::Demo) -> std::io::Result<(DemoPbx, Arc<DemoAccounts>)> {
        let sip = SocketAddr::from(([127, 0, 0, 1], demo.sip.port()));
        let socket = UdpSocket::bind(sip).await?;
        let random = |_| std::io::Error::other("no randomness for the demo passwords");
        let mut extensions = Vec::new();
        for ext in EXTENSIONS {
            extensions.push((
                ext.to_owned(),
                SecretString::new(crate::rand::hex::<12>().map_err(random)?),
            ));
        }
        let seed = crate::rand::u64().map_err(random)?;
        let pbx = pbx::Pbx::new(
            sip,
            extensions.clone(),
            RTP_PORTS.step_by(2).collect(),
            seed,
        );
        let accounts = Arc::new(DemoAccounts {
            sip,
            extensions,
            next: AtomicUsize::new(0),
        });
        Ok((DemoPbx { socket, pbx }, accounts))
    }

    /// Runs until the task is dropped.
    pub async fn run(mut self) {
        let mut media = media::MediaTasks::default();
        let mut buf = vec![0u8; 65_536];
        loop {
            while let Some(out) = self.pbx.poll_output() {
                match out {
                    pbx::Output::Transmit { to, bytes } => {
                        let _ = self.socket.send_to(&bytes, to).await;
                    }
                    pbx::Output::StartMedia(m) => media.start(m),
                    pbx::Output::StopMedia { call } => media.stop(call),
                }
            }
            let wake = self.pbx.poll_timeout();
            tokio::select! {
                got = self.socket.recv_from(&mut buf) => if let Ok((n, from)) = got {
                    // Only this machine talks to the demo PBX.
                    if from.ip().is_loopback() {
                        self.pbx.handle_datagram(std::time::Instant::now(), from, &buf[..n]);
                    }
                },
                () = sleep_until(wake) => self.pbx.handle_timeout(std::time::Instant::now()),
            }
        }
    }
}

async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
