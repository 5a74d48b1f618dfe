//! A bare HTTP/1.0 client for Server-Sent Events (so the body is the plain event stream, not
//! chunked), and for the JSON error answers of the HTTP API.
#![allow(dead_code)]

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

pub struct Sse {
    pub status: u16,
    reader: BufReader<TcpStream>,
}

/// One event: its `id:` (if any) and its `data:` as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub id: Option<u64>,
    pub data: serde_json::Value,
}

impl Sse {
    /// `GET path` with an optional bearer credential and `Last-Event-ID`; reads the head.
    pub async fn open(
        addr: std::net::SocketAddr,
        path: &str,
        bearer: Option<&str>,
        last_id: Option<u64>,
    ) -> Sse {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let mut req =
            format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
        if let Some(b) = bearer {
            req.push_str(&format!("Authorization: Bearer {b}\r\n"));
        }
        if let Some(id) = last_id {
            req.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        req.push_str("\r\n");
        tcp.write_all(req.as_bytes()).await.expect("send");
        let mut reader = BufReader::new(tcp);
        let mut status_line = String::new();
        tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut status_line))
            .await
            .expect("status in time")
            .expect("status");
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).await.expect("header");
            if line.trim().is_empty() {
                break;
            }
        }
        Sse { status, reader }
    }

    /// The rest of a non-streaming answer, as JSON.
    pub async fn body(mut self) -> serde_json::Value {
        let mut s = String::new();
        let _ =
            tokio::time::timeout(Duration::from_secs(5), self.reader.read_to_string(&mut s)).await;
        serde_json::from_str(&s).unwrap_or(serde_json::Value::Null)
    }

    /// The next event within `limit` (keep-alive comments skipped); `None` on timeout or end.
    pub async fn next(&mut self, limit: Duration) -> Option<SseEvent> {
        let read = async {
            let (mut id, mut data) = (None, String::new());
            loop {
                let mut line = String::new();
                if self.reader.read_line(&mut line).await.ok()? == 0 {
                    return None;
                }
                let line = line.trim_end_matches(['\r', '\n']);
                if line.is_empty() {
                    if data.is_empty() {
                        continue;
                    }
                    return Some(SseEvent {
                        id,
                        data: serde_json::from_str(&data).ok()?,
                    });
                }
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().parse().ok();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
        };
        tokio::time::timeout(limit, read).await.ok().flatten()
    }
}

/// A plain HTTP/1.0 GET: status, header block, body bytes.
pub async fn get_raw(
    addr: std::net::SocketAddr,
    path: &str,
    bearer: Option<&str>,
    extra: &str,
) -> (u16, String, Vec<u8>) {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let mut req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n{extra}");
    if let Some(b) = bearer {
        req.push_str(&format!("Authorization: Bearer {b}\r\n"));
    }
    req.push_str("\r\n");
    tcp.write_all(req.as_bytes()).await.expect("send");
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut all))
        .await
        .expect("answer in time")
        .expect("read");
    let split = all.windows(4).position(|w| w == b"\r\n\r\n").expect("head");
    let head = String::from_utf8_lossy(&all[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head, all[split + 4..].to_vec())
}

/// An HTTP/1.0 request with a JSON body (or none): status and the JSON answer.
pub async fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    if let Some(b) = bearer {
        req.push_str(&format!("Authorization: Bearer {b}\r\n"));
    }
    if !body.is_empty() {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    tcp.write_all(req.as_bytes()).await.expect("send");
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut all))
        .await
        .expect("answer in time")
        .expect("read");
    let split = all.windows(4).position(|w| w == b"\r\n\r\n").expect("head");
    let status = String::from_utf8_lossy(&all[..split])
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let json = serde_json::from_slice(&all[split + 4..]).unwrap_or(serde_json::Value::Null);
    (status, json)
}
