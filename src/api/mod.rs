//! What the outside world talks to: the HTTP server (health now; WebSocket, REST, SSE to come).

pub mod http;
pub mod ws;
