//! One webhook attempt: a signed `POST` over HTTP/1.1 on a connection of its own, plain or
//! TLS (rustls, the built-in Mozilla roots plus the app's `ca_file`), bounded in time as a
//! whole. The response's body is not read: its status is the answer.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use super::Target;
use super::outbox::Failure;

/// Why an attempt failed; its `Display` is for logs (it never holds the body or the secret).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeliveryError {
    /// The name did not resolve or no address took the connection.
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    /// The TLS handshake failed (certificate, protocol).
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    /// The exchange broke off.
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    /// No answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The receiver answered with a status other than 2xx.
    #[error("the receiver answered {status}")]
    Status {
        /// The status.
        status: u16,
        /// Its `Retry-After` (seconds form).
        retry_after: Option<Duration>,
    },
    /// The attempt's task ended before it did.
    #[error("the attempt was cut off")]
    Aborted,
    /// The request could not be built (a host or path the configuration check let through).
    #[error("bad request: {0}")]
    Request(String),
}

impl DeliveryError {
    /// How the queue takes it: a refusal of this event (4xx but 408 and 429), or the
    /// receiver unavailable.
    pub fn failure(&self) -> Failure {
        match self {
            DeliveryError::Status { status, .. }
                if (400..500).contains(status) && *status != 408 && *status != 429 =>
            {
                Failure::Refused
            }
            DeliveryError::Status {
                status: 300..=399, ..
            }
            | DeliveryError::Request(_) => Failure::Refused,
            DeliveryError::Status { retry_after, .. } => Failure::Unavailable {
                retry_after: *retry_after,
            },
            _ => Failure::Unavailable { retry_after: None },
        }
    }
}

/// Sends an app's attempts (cheap to clone).
#[derive(Clone)]
pub struct Client {
    target: Arc<Target>,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Client {
    /// A client for `target`; fails on a `ca_file` certificate rustls will not take.
    pub fn new(target: Arc<Target>) -> Result<Client, String> {
        let tls = if target.tls {
            let mut roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            for der in &target.extra_roots {
                roots
                    .add(der.clone().into())
                    .map_err(|e| format!("a ca_file certificate: {e}"))?;
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
        } else {
            None
        };
        Ok(Client { target, tls })
    }

    /// POSTs `body` (delivery `id`) signed at `now` (Unix seconds).
    pub async fn post(&self, id: &str, body: Arc<str>, now: i64) -> Result<(), DeliveryError> {
        let limit = self.target.timeout;
        match tokio::time::timeout(limit, self.exchange(id, body, now)).await {
            Ok(r) => r,
            Err(_) => Err(DeliveryError::Timeout(limit)),
        }
    }

    async fn exchange(&self, id: &str, body: Arc<str>, now: i64) -> Result<(), DeliveryError> {
        let t = &self.target;
        let tcp = TcpStream::connect((t.host.as_str(), t.port))
            .await
            .map_err(DeliveryError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let status = match &self.tls {
            Some(tls) => {
                let name = rustls::pki_types::ServerName::try_from(t.host.clone())
                    .map_err(|e| DeliveryError::Request(e.to_string()))?;
                let stream = tls.connect(name, tcp).await.map_err(DeliveryError::Tls)?;
                self.request(TokioIo::new(stream), id, body, now).await?
            }
            None => self.request(TokioIo::new(tcp), id, body, now).await?,
        };
        let code = status.status().as_u16();
        if (200..300).contains(&code) {
            return Ok(());
        }
        let retry_after = status
            .headers()
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        Err(DeliveryError::Status {
            status: code,
            retry_after,
        })
    }

    async fn request<I>(
        &self,
        io: I,
        id: &str,
        body: Arc<str>,
        now: i64,
    ) -> Result<hyper::Response<hyper::body::Incoming>, DeliveryError>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let t = &self.target;
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
        // The connection is driven until the response's head is in; dropped after that.
        let driver = tokio::spawn(conn);
        let host = if t.host.contains(':') {
            format!("[{}]:{}", t.host, t.port)
        } else {
            format!("{}:{}", t.host, t.port)
        };
        let req = hyper::Request::post(t.path.as_str())
            .header(hyper::header::HOST, host)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(
                hyper::header::USER_AGENT,
                concat!("callgate/", env!("CARGO_PKG_VERSION")),
            )
            .header(hyper::header::CONNECTION, "close")
            .header(super::DELIVERY_HEADER, id)
            .header(
                super::SIGNATURE_HEADER,
                super::signature(&t.secret, now, &body),
            )
            .body(Full::new(Bytes::from(body.as_bytes().to_vec())))
            .map_err(|e| DeliveryError::Request(e.to_string()));
        let result = match req {
            Ok(req) => send.send_request(req).await.map_err(DeliveryError::from),
            Err(e) => Err(e),
        };
        driver.abort();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_refusals_or_unavailability() {
        let status = |status, retry_after| DeliveryError::Status {
            status,
            retry_after,
        };
        assert_eq!(status(400, None).failure(), Failure::Refused);
        assert_eq!(status(404, None).failure(), Failure::Refused);
        assert_eq!(status(301, None).failure(), Failure::Refused);
        let soon = Some(Duration::from_secs(3));
        for s in [408, 429, 500, 503] {
            assert_eq!(
                status(s, soon).failure(),
                Failure::Unavailable { retry_after: soon },
                "{s}"
            );
        }
        assert_eq!(
            DeliveryError::Timeout(Duration::from_secs(1)).failure(),
            Failure::Unavailable { retry_after: None }
        );
    }
}
