//! What the outside world talks to: the HTTP server, the browser's WebSocket API, and the CRM's
//! HTTP API (per-agent events over SSE) with its credentials.

pub mod admin;
pub mod auth;
pub mod control;
pub mod crm;
pub mod demo;
pub mod http;
pub mod serve;
pub mod state;
pub mod ws;
