//! A webhook receiver on 127.0.0.1: it checks each delivery's signature as docs/API.md tells
//! receivers to (HMAC-SHA256 over `t.body`, `t` within 5 minutes), answers 200 to a good one
//! and 401 to a bad one, and keeps everything it got. Stopped and started again on the same
//! port, it plays a receiver that is down for a while.

use std::sync::{Arc, Mutex};

use hmac::Mac as _;

/// One POST it got.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Path and query it was sent to.
    pub target: String,
    /// `Callgate-Delivery`.
    pub id: String,
    /// Whether `Callgate-Signature` checked out.
    pub valid: bool,
    /// The body, as JSON.
    pub body: serde_json::Value,
}

pub type Got = Arc<Mutex<Vec<Delivery>>>;

pub struct Receiver {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

/// Whether `header` (`t=..,v1=..`) signs `body` with `secret`, at a `t` within 300 s of now.
pub fn verify(secret: &str, header: &str, body: &[u8]) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1 = hex::decode(v).ok(),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    if (now - t).abs() > 300 {
        return false;
    }
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    mac.verify_slice(&v1).is_ok()
}

/// A self-signed certificate for 127.0.0.1: (PEM for `ca_file`, the TLS acceptor).
pub fn tls_for_loopback() -> (String, tokio_rustls::TlsAcceptor) {
    use tokio_rustls::rustls;
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(made.key_pair.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![made.cert.der().clone()], key)
    .unwrap();
    (
        made.cert.pem(),
        tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)),
    )
}

impl Receiver {
    /// Listens on 127.0.0.1:`port`, appending to `got`.
    pub async fn start(port: u16, secret: &'static str, got: Got) -> Receiver {
        Receiver::start_with(port, secret, got, None).await
    }

    /// [`start`](Self::start), over TLS with `tls`.
    pub async fn start_with(
        port: u16,
        secret: &'static str,
        got: Got,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Receiver {
        use axum::body::Bytes;
        use axum::http::{HeaderMap, StatusCode, Uri};
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("receiver port");
        let app = axum::Router::new().fallback(axum::routing::post(
            move |uri: Uri, headers: HeaderMap, body: Bytes| {
                let got = got.clone();
                async move {
                    let header = |h: &str| {
                        headers
                            .get(h)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    let valid = verify(secret, &header("callgate-signature"), &body);
                    got.lock().unwrap().push(Delivery {
                        target: uri.to_string(),
                        id: header("callgate-delivery"),
                        valid,
                        body: serde_json::from_slice(&body).unwrap_or_default(),
                    });
                    if valid {
                        StatusCode::OK
                    } else {
                        StatusCode::UNAUTHORIZED
                    }
                }
            },
        ));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        if let Some(tls) = tls {
            let task = tokio::spawn(async move {
                let serve = async {
                    while let Ok((tcp, _)) = listener.accept().await {
                        let (tls, app) = (tls.clone(), app.clone());
                        tokio::spawn(async move {
                            let Ok(stream) = tls.accept(tcp).await else {
                                return;
                            };
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(
                                    hyper_util::rt::TokioIo::new(stream),
                                    hyper_util::service::TowerToHyperService::new(app),
                                )
                                .await;
                        });
                    }
                };
                tokio::select! {
                    () = serve => {}
                    _ = stopped => {}
                }
            });
            return Receiver {
                stop: Some(stop),
                task,
            };
        }
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Receiver {
            stop: Some(stop),
            task,
        }
    }

    /// Stops listening (the port refuses connections from now on).
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), &mut self.task).await;
        self.task.abort();
    }
}

/// The events delivered (each delivery id once), in the order they first arrived.
pub fn events(got: &Got) -> Vec<serde_json::Value> {
    let mut ids = std::collections::HashSet::new();
    got.lock()
        .unwrap()
        .iter()
        .filter(|d| d.valid && ids.insert(d.id.clone()))
        .map(|d| d.body["event"].clone())
        .collect()
}
