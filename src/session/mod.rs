//! The session layer: one task per logged-in agent that owns its registration share, dial plan,
//! page attachment and calls ([`agent`]), one sans-IO core per call ([`call`]) with its thin
//! shell ([`call_task`]), the typed events and errors the page sees ([`event`], [`error`]),
//! the page's requests ([`request`]), and what sessions share: the live-session [`registry`]
//! (senders only), the CRM's event [`hub`], the HTTP API [`credentials`], login [`limits`].
//!
//! Stack: `api` -> `session` -> {`config`, `sip`, `token`} -> `media`.

pub mod agent;
pub mod agent_state;
pub mod call;
pub(crate) mod call_task;
pub mod context;
pub(crate) mod control;
pub mod credentials;
pub mod error;
pub mod event;
pub mod hub;
pub mod limits;
pub mod login;
pub(crate) mod media;
pub(crate) mod presence;
pub mod registry;
pub mod request;
