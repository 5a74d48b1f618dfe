//! What callgate tells the page (and, except replies and credentials, the agent's CRM
//! subscribers): typed events with one JSON form (docs/API.md, "Events").

use serde::Serialize;

use super::error::ApiError;
use crate::sip::call::EndReason;
use crate::sip::registration::Status;

/// A call's state as the page sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CallState {
    /// Our call is on its way (no answer from the far end yet).
    Trying,
    /// Ringing: the far end (outbound) or the agent (inbound).
    Ringing,
    /// The far end sends early media.
    Early,
    /// Talking.
    Established,
    /// The agent put the far end on hold.
    Held,
    /// The far end put the agent on hold.
    HeldByRemote,
    /// Over (the event carries the end reason).
    Ended,
}

impl CallState {
    /// The stable name (`trying`, `ringing`, ...), as in the JSON and the metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            CallState::Trying => "trying",
            CallState::Ringing => "ringing",
            CallState::Early => "early",
            CallState::Established => "established",
            CallState::Held => "held",
            CallState::HeldByRemote => "held_by_remote",
            CallState::Ended => "ended",
        }
    }
}

/// Who placed a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// The agent called out.
    Outbound,
    /// Someone called the agent.
    Inbound,
}

impl Direction {
    /// `outbound` or `inbound`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// How a call ended, by its stable code (`local_hangup`, `missed`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ending(pub EndReason);

impl Serialize for Ending {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.code())
    }
}

/// Progress of something SIP reports with a status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Progress {
    /// Accepted (202, or callgate follows the far end's REFER).
    Accepted,
    /// Declined by callgate (dial plan, `sip.accept_refer`).
    Declined,
    /// A provisional answer.
    Progress,
    /// Done.
    Succeeded,
    /// It did not work; the call goes on as it was.
    Failed,
}

impl From<crate::sip::call::TransferState> for Progress {
    fn from(s: crate::sip::call::TransferState) -> Progress {
        use crate::sip::call::TransferState as T;
        match s {
            T::Accepted => Progress::Accepted,
            T::Progress => Progress::Progress,
            T::Succeeded => Progress::Succeeded,
            T::Failed => Progress::Failed,
        }
    }
}

/// The SIP status that ended or refused a call.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SipStatus {
    /// The status code.
    pub status: u16,
    /// Its reason phrase, as the peer sent it.
    pub reason: String,
}

/// A registration's state as the page sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RegistrationState {
    /// Not started.
    Idle,
    /// REGISTER on its way.
    Registering,
    /// The registrar accepted the binding.
    Registered,
    /// Refused or unreachable (the event carries the status).
    Failed,
    /// Removed.
    Unregistered,
}

/// One of the app's agent states, as `connected` lists them.
#[derive(Debug, Clone, Serialize)]
pub struct StateInfo {
    /// Its id, for `setState`.
    pub id: String,
    /// What to show.
    pub label: String,
    /// Counted as productive time.
    pub productive: bool,
    /// The agent may place calls in it.
    #[serde(rename = "mayCallOut")]
    pub may_call_out: bool,
    /// The agent is offered calls in it.
    #[serde(rename = "mayReceive")]
    pub may_receive: bool,
}

impl StateInfo {
    /// The states of `policy` an agent of `group` may use.
    pub fn list(
        policy: &crate::config::states::StatePolicy,
        group: Option<&str>,
    ) -> Vec<StateInfo> {
        policy
            .allowed(group)
            .map(|s| StateInfo {
                id: s.id.clone(),
                label: s.label.clone(),
                productive: s.productive,
                may_call_out: s.may_call_out,
                may_receive: s.may_receive,
            })
            .collect()
    }
}

/// Everything callgate sends to the page.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Event {
    /// The answer to a request.
    Reply {
        /// The request's `id` (`None` for a frame that was not a request).
        id: Option<u64>,
        /// Whether it was done.
        ok: bool,
        /// Why not.
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<ApiError>,
        /// The call the request made or answered.
        #[serde(rename = "callId", skip_serializing_if = "Option::is_none")]
        call_id: Option<String>,
        /// callgate's SDP answer for the page.
        #[serde(skip_serializing_if = "Option::is_none")]
        sdp: Option<String>,
    },
    /// A call's state changed.
    Call {
        /// callgate's call id.
        #[serde(rename = "callId")]
        call_id: String,
        /// The new state.
        state: CallState,
        /// Who placed the call.
        direction: Direction,
        /// The other party.
        peer: String,
        /// The SIP status that ended it, if one did.
        #[serde(skip_serializing_if = "Option::is_none")]
        sip: Option<SipStatus>,
        /// Why it ended (with `ended`).
        #[serde(rename = "endReason", skip_serializing_if = "Option::is_none")]
        end_reason: Option<Ending>,
    },
    /// Progress of a transfer the agent asked for.
    Transfer {
        /// The transferred call.
        #[serde(rename = "callId")]
        call_id: String,
        /// How it goes.
        state: Progress,
        /// The target's status, when the far end reported one.
        #[serde(skip_serializing_if = "Option::is_none")]
        status: Option<u16>,
    },
    /// The far end transfers the agent's call elsewhere (its REFER): whether callgate follows,
    /// then how the call to the new party goes. On `succeeded` the same call goes on with it.
    Referred {
        /// The agent's call.
        #[serde(rename = "callId")]
        call_id: String,
        /// How it goes.
        state: Progress,
        /// The target.
        #[serde(skip_serializing_if = "Option::is_none")]
        to: Option<String>,
        /// The target's status.
        #[serde(skip_serializing_if = "Option::is_none")]
        sip: Option<SipStatus>,
    },
    /// A DTMF digit from the far end.
    Dtmf {
        /// The call.
        #[serde(rename = "callId")]
        call_id: String,
        /// The digit.
        digit: String,
    },
    /// The caller gave up before the agent answered (for a missed-calls list); the call's
    /// `ended` event follows.
    Missed {
        /// The call.
        #[serde(rename = "callId")]
        call_id: String,
        /// The caller.
        from: String,
    },
    /// A call for the agent: answer with `answer {callId, sdp}` or `reject`.
    Incoming {
        /// The call.
        #[serde(rename = "callId")]
        call_id: String,
        /// The caller (P-Asserted-Identity's user when the network asserts one).
        from: String,
        /// The caller's display name.
        #[serde(rename = "displayName", skip_serializing_if = "Option::is_none")]
        display_name: Option<String>,
        /// The call's data (apps.toml `call_data`: e.g. a dialler's `X-Customer-Id` as
        /// `customerId`), for the CRM's screen pop.
        #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
        data: std::collections::BTreeMap<String, String>,
        /// The caller asked for auto-answer (`Call-Info: ...;answer-after=0`) and the app
        /// allows it (`auto_answer`): the page answers without the agent (the SDK does).
        #[serde(rename = "autoAnswer", skip_serializing_if = "std::ops::Not::not")]
        auto_answer: bool,
    },
    /// The agent is logged in.
    Connected {
        /// The agent (`login@domain`).
        agent: String,
        /// The bearer credential for `resume`.
        #[serde(rename = "sessionId")]
        session_id: String,
        /// The page's credential for the HTTP API (its own events, calls, recordings).
        #[serde(rename = "apiToken")]
        api_token: String,
        /// The states the agent may choose from.
        states: Vec<StateInfo>,
    },
    /// The agent's state: at login, at every change, and when a change asked for during a
    /// call is pending.
    AgentState {
        /// The state's id.
        state: String,
        /// Its label.
        label: String,
        /// The agent may place calls.
        #[serde(rename = "mayCallOut")]
        may_call_out: bool,
        /// The agent is offered calls.
        #[serde(rename = "mayReceive")]
        may_receive: bool,
        /// Counted as productive time.
        productive: bool,
        /// Since when (Unix ms).
        since: i64,
        /// Why it was entered (`login`, `requested`, `api`, `call_ended`, `wrap_up`, `wrap_up_over`,
        /// `missed_calls`).
        cause: &'static str,
        /// The state asked for during a call, entered when the agent's last call ends.
        #[serde(skip_serializing_if = "Option::is_none")]
        pending: Option<String>,
        /// When the wrap-up ends (Unix ms), while in wrap-up.
        #[serde(rename = "wrapUpEndsAt", skip_serializing_if = "Option::is_none")]
        wrap_up_ends_at: Option<i64>,
    },
    /// The CRM backend asks the page to call `to` (click-to-call): the page sends `call` with
    /// this `requestId` (the SDK does so by itself).
    Dial {
        /// Echo it in the `call` request.
        #[serde(rename = "requestId")]
        request_id: u64,
        /// Whom to call.
        to: String,
        /// X- headers for the INVITE.
        #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
        headers: std::collections::BTreeMap<String, String>,
    },
    /// Registration with the SIP provider changed.
    Registration {
        /// The new state.
        state: RegistrationState,
        /// Seconds the binding lasts (with `registered`).
        #[serde(skip_serializing_if = "Option::is_none")]
        expires: Option<u32>,
        /// The registrar's refusal (with `failed`).
        #[serde(skip_serializing_if = "Option::is_none")]
        status: Option<u16>,
        /// Its reason phrase.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

impl Event {
    /// Whether CRM subscribers of the agent's channel get this event from the session that
    /// tells its page: not replies, not `connected`, which carries the session's credentials,
    /// and not `agentState`, which the agent's pages share and which is published once, by
    /// the session that changed it.
    pub fn for_crm(&self) -> bool {
        !matches!(
            self,
            Event::Reply { .. }
                | Event::Connected { .. }
                | Event::AgentState { .. }
                | Event::Dial { .. }
        )
    }

    /// The success reply to request `id`.
    pub fn ok(id: u64) -> Event {
        Event::Reply {
            id: Some(id),
            ok: true,
            error: None,
            call_id: None,
            sdp: None,
        }
    }

    /// The success reply to request `id` that made or answered call `call_id`.
    pub fn ok_call(id: u64, call_id: String, sdp: String) -> Event {
        Event::Reply {
            id: Some(id),
            ok: true,
            error: None,
            call_id: Some(call_id),
            sdp: Some(sdp),
        }
    }

    /// The refusal of request `id` (`None`: a frame that was no request).
    pub fn refused(id: Option<u64>, error: ApiError) -> Event {
        Event::Reply {
            id,
            ok: false,
            error: Some(error),
            call_id: None,
            sdp: None,
        }
    }

    /// A registration status as the page sees it.
    pub fn registration(s: &Status) -> Event {
        let (state, expires, status, reason) = match s {
            Status::Idle => (RegistrationState::Idle, None, None, None),
            Status::Registering => (RegistrationState::Registering, None, None, None),
            Status::Registered { expires, .. } => {
                (RegistrationState::Registered, Some(*expires), None, None)
            }
            Status::Failed { status, reason, .. } => (
                RegistrationState::Failed,
                None,
                Some(*status),
                Some(reason.clone()),
            ),
            Status::Unregistered => (RegistrationState::Unregistered, None, None, None),
        };
        Event::Registration {
            state,
            expires,
            status,
            reason,
        }
    }
}
