//! The HTTP listener: accepts connections within [`ConnLimits`] and serves each with hyper's
//! HTTP/1.1, with a deadline on every request's header (a slow-loris client that trickles a
//! header byte by byte is cut off) and WebSocket upgrades. On shutdown it stops accepting and
//! lets each connection finish its request.
//!
//! axum's own `serve` has neither a header deadline nor connection limits; this loop is that
//! plus the graceful end, no more.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower_service::Service;

/// How many connections callgate holds at once, in all and per client address.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// Most open connections (HTTP and WebSocket) in all.
    pub total: usize,
    /// Most open connections from one address (reverse proxies in `exempt` excepted).
    pub per_ip: usize,
    /// Addresses the per-address limit does not apply to (the trusted reverse proxies, which
    /// carry everyone's connections).
    pub exempt: Vec<IpAddr>,
    /// Longest time a request's header may take to arrive.
    pub header_timeout: Duration,
    counts: Arc<Mutex<Counts>>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_ip: HashMap<IpAddr, usize>,
}

/// Why a connection was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// [`ConnLimits::total`] connections are open.
    Total(usize),
    /// [`ConnLimits::per_ip`] connections from this address are open.
    PerIp(usize),
}

impl Refusal {
    fn message(self) -> String {
        match self {
            Refusal::Total(n) => format!(
                "callgate holds {n} connections, its limit (http.max_connections); try again shortly"
            ),
            Refusal::PerIp(n) => format!(
                "{n} connections from this address are open, its limit (http.max_connections_per_ip); close some or ask for a higher limit"
            ),
        }
    }
}

/// A connection's place in the limits, given back when dropped.
#[derive(Debug)]
pub struct ConnGuard {
    ip: Option<IpAddr>,
    counts: Arc<Mutex<Counts>>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        c.total = c.total.saturating_sub(1);
        if let Some(ip) = self.ip {
            if let Some(n) = c.by_ip.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    c.by_ip.remove(&ip);
                }
            }
        }
    }
}

impl ConnLimits {
    /// Limits of `total` and `per_ip` open connections, and a header deadline.
    pub fn new(
        total: usize,
        per_ip: usize,
        exempt: Vec<IpAddr>,
        header_timeout: Duration,
    ) -> ConnLimits {
        ConnLimits {
            total,
            per_ip,
            exempt,
            header_timeout,
            counts: Arc::default(),
        }
    }

    /// Takes a place for a connection from `ip`, or says which limit is reached.
    ///
    /// A std `Mutex` around two counters: held only to count, never across an `.await`
    /// (STYLE.md §3's documented exception).
    pub fn admit(&self, ip: IpAddr) -> Result<ConnGuard, Refusal> {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if c.total >= self.total {
            return Err(Refusal::Total(self.total));
        }
        let counted = !self.exempt.contains(&ip);
        if counted && c.by_ip.get(&ip).copied().unwrap_or(0) >= self.per_ip {
            return Err(Refusal::PerIp(self.per_ip));
        }
        c.total += 1;
        if counted {
            *c.by_ip.entry(ip).or_default() += 1;
        }
        Ok(ConnGuard {
            ip: counted.then_some(ip),
            counts: self.counts.clone(),
        })
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }
}

/// A connection's stream with its place in the limits: the place is held for as long as the
/// stream is open, an upgraded WebSocket's too.
struct Counted {
    io: TcpStream,
    _guard: ConnGuard,
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Serves `router` on `listener` until `shutdown` completes, then waits for the requests in
/// progress. Each request carries its connection's [`ConnectInfo`].
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: pause rather than spin.
                    tracing::warn!("HTTP accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        match limits.admit(addr.ip()) {
            Ok(guard) => {
                let io = Counted {
                    io: stream,
                    _guard: guard,
                };
                tokio::spawn(connection(
                    io,
                    addr,
                    router.clone(),
                    limits.header_timeout,
                    stop_rx.clone(),
                ));
            }
            Err(refusal) => {
                tracing::info!(peer = %addr.ip(), "connection refused: {}", refusal.message());
                tokio::spawn(refuse(stream, refusal));
            }
        }
    }
    let _ = stop_tx.send(true);
    drop(stop_rx);
    // Every connection task holds a receiver: this returns when the last one ended.
    stop_tx.closed().await;
}

/// One connection: HTTP/1.1 with keep-alive and upgrades, until it closes or, on shutdown,
/// its request in progress is done.
async fn connection(
    io: Counted,
    addr: SocketAddr,
    router: Router,
    header_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(addr));
            let mut router = router.clone();
            async move {
                let response: Result<axum::response::Response, Infallible> =
                    router.call(req.map(axum::body::Body::new)).await;
                response
            }
        });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    let conn = http
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let mut stopping = false;
    loop {
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(peer = %addr, "HTTP connection ended: {e}");
                }
                break;
            }
            changed = stop.changed(), if !stopping => {
                stopping = true;
                if changed.is_ok() {
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// Tells a refused client why (503, JSON in the API's error form) and closes.
async fn refuse(mut stream: TcpStream, refusal: Refusal) {
    let body = serde_json::json!({
        "code": "too_many_connections",
        "message": refusal.message(),
    })
    .to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 5\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_count_per_address_and_in_all_and_give_places_back() {
        let proxy: IpAddr = "127.0.0.1".parse().unwrap();
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let l = ConnLimits::new(5, 2, vec![proxy], Duration::from_secs(1));
        let a1 = l.admit(a).unwrap();
        let _a2 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).unwrap_err(), Refusal::PerIp(2));
        let _b1 = l.admit(b).unwrap();
        // The proxy carries everyone: only the total applies.
        let _p1 = l.admit(proxy).unwrap();
        let _p2 = l.admit(proxy).unwrap();
        assert_eq!(l.admit(proxy).unwrap_err(), Refusal::Total(5));
        assert_eq!(l.open(), 5);
        drop(a1);
        assert_eq!(l.open(), 4);
        assert!(l.admit(a).is_ok());
    }
}
