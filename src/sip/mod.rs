//! SIP: messages, digest authentication, transactions, registration, UDP transport.

pub mod call;
pub mod digest;
pub mod dns;
pub mod endpoint;
pub mod message;
pub mod registration;
pub mod sdp;
pub mod transaction;
