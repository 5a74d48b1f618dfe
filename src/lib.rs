//! callgate: a WebRTC-to-SIP gateway.
//!
//! Browsers log in with a loginByToken token minted by their CRM; callgate decrypts it, registers
//! with the SIP provider on the agent's behalf and bridges calls. Modules follow one call:
//! `api` → `session` → {`config`, `sip`, `token`} → `media`.

pub mod account;
pub mod api;
pub mod cdr;
pub mod cli;
pub mod config;
pub mod demo;
pub mod dialplan;
#[doc(hidden)]
pub mod fuzzing;
pub mod logging;
pub mod media;
pub mod metrics;
pub mod rand;
pub mod sdnotify;
pub mod secret;
pub mod server;
pub mod session;
pub mod sip;
pub mod token;
pub mod webhook;
