//! What reaches a session task from outside (its page's requests, a page that resumes it, the
//! page's going away) and what it sends its page's socket (events, and why it closes).

use tokio::sync::mpsc;

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
        reply: tokio::sync::oneshot::Sender<Result<Event, super::error::ApiError>>,
    },
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
