//! What reaches a session task from outside (its page's requests, a page that resumes it, the
//! page's going away) and what it sends its page's socket (events, and why it closes).

use std::collections::BTreeMap;

use tokio::sync::{mpsc, oneshot};

use super::event::Event;
use super::request::Request;

/// What reaches a session from outside its task.
pub(crate) enum Control {
    /// A request of the attached page.
    Request(Request),
    /// A page resumes the session (request `id`): it becomes the attached page.
    Attach {
        page: mpsc::Sender<ToPage>,
        id: u64,
        /// Tells this page's later `Detach` from another's.
        page_id: u64,
    },
    /// Page `page_id`'s socket closed (ignored if another page has taken over since).
    Detach { page_id: u64 },
    /// The CRM backend sets the agent's state (`PUT /api/v1/agents/{agent}/state`): the
    /// reply is the `agentState` event as it stands after it.
    SetState {
        state: String,
        reply: oneshot::Sender<Result<Event, super::error::ApiError>>,
    },
    /// The CRM backend asks the agent's page to place a call (click-to-call): the reply is
    /// the call's id once the page has placed it.
    Dial {
        to: String,
        headers: BTreeMap<String, String>,
        reply: oneshot::Sender<Result<String, super::error::ApiError>>,
    },
    /// The CRM backend acts on a call of this session.
    Act {
        call_id: String,
        action: CallAction,
        reply: oneshot::Sender<Result<(), super::error::ApiError>>,
    },
}

/// What the CRM backend may do to a live call (`POST /api/v1/calls/{callId}/...`), as the
/// page's requests of the same names do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CallAction {
    Hangup,
    Hold(bool),
    Dtmf(String),
    Transfer(String),
}

/// What a session sends its page's socket.
#[derive(Debug)]
pub(crate) enum ToPage {
    /// An event or reply, as JSON text.
    Event(Event),
    /// Close the socket with this code and reason (docs/API.md, "close codes").
    Close(u16, &'static str),
}

/// Close code: the page logged out.
pub const CLOSE_LOGGED_OUT: u16 = 4000;
/// Close code: another socket resumed the session.
pub const CLOSE_RESUMED_ELSEWHERE: u16 = 4001;
/// Close code: callgate is shutting down (RFC 6455 "going away").
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code: the page answered no ping for three heartbeat intervals.
pub const CLOSE_HEARTBEAT: u16 = 4008;
