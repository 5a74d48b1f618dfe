//! An agent's contact-centre state ("available", "paused", "lunch", "wrap_up"...), sans-IO.
//!
//! Each app defines its states ([`StatePolicy`], `states` in apps.toml): whether an agent in it
//! may place calls and be offered incoming ones, and whether time in it is productive. An
//! agent has one state whatever the number of its pages; [`AgentState`] holds it, with time
//! injected: a change asked for during a call waits for the agent's last call to end; an
//! answered call's end enters the wrap-up state (when the app has one) for its time, after
//! which the agent is back where it was. The session shell asks it before calling out and
//! before offering a call, and publishes every [`Change`].

use std::time::Instant;

pub use crate::config::states::{StateDef, StatePolicy};

/// Why a state was entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The agent logged in (the app's default state).
    Login,
    /// The agent asked for it (its page's `setState`).
    Requested,
    /// It was set through the HTTP API (`PUT /api/v1/agents/{agent}/state`: the CRM backend,
    /// or the agent's own apiToken).
    Api,
    /// Asked for during a call, applied when the agent's last call ended.
    CallEnded,
    /// An answered call ended: wrap-up.
    WrapUp,
    /// The wrap-up time ran out.
    WrapUpOver,
    /// The agent let the app's `missed_calls_limit` calls in a row ring out.
    MissedCalls,
}

impl Cause {
    /// The stable code in events and the history.
    pub fn code(self) -> &'static str {
        match self {
            Cause::Login => "login",
            Cause::Requested => "requested",
            Cause::Api => "api",
            Cause::CallEnded => "call_ended",
            Cause::WrapUp => "wrap_up",
            Cause::WrapUpOver => "wrap_up_over",
            Cause::MissedCalls => "missed_calls",
        }
    }
}

/// A state change (or, for a deferred request, a change of what is pending).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The state before.
    pub from: usize,
    /// The state now.
    pub to: usize,
    /// Why.
    pub cause: Cause,
}

/// What a request to change state did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Applied now.
    Changed(Change),
    /// The agent is in a call: applied when its last call ends.
    Pending(usize),
    /// Already in that state (and nothing pending any more).
    Unchanged,
}

/// One agent's state.
#[derive(Debug, Clone)]
pub struct AgentState {
    current: usize,
    since: Instant,
    pending: Option<usize>,
    calls: usize,
    /// In wrap-up: until when, and the state to return to.
    wrap_up: Option<(Instant, usize)>,
    /// Calls offered in a row that the agent let ring out.
    missed: u32,
}

impl AgentState {
    /// An agent that just logged in: the policy's default state.
    pub fn new(policy: &StatePolicy, now: Instant) -> AgentState {
        AgentState {
            current: policy.default,
            since: now,
            pending: None,
            calls: 0,
            wrap_up: None,
            missed: 0,
        }
    }

    /// The current state's index.
    pub fn current(&self) -> usize {
        self.current
    }

    /// Since when the agent is in it.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// The state asked for during a call.
    pub fn pending(&self) -> Option<usize> {
        self.pending
    }

    /// When the wrap-up ends, while in wrap-up.
    pub fn wrap_up_ends(&self) -> Option<Instant> {
        self.wrap_up.map(|(t, _)| t)
    }

    /// Whether the agent may place a call now.
    pub fn may_call_out(&self, policy: &StatePolicy) -> bool {
        policy.get(self.current).may_call_out
    }

    /// Whether the agent is offered incoming calls now.
    pub fn may_receive(&self, policy: &StatePolicy) -> bool {
        policy.get(self.current).may_receive
    }

    fn enter(&mut self, now: Instant, to: usize, cause: Cause) -> Change {
        let from = self.current;
        self.current = to;
        self.since = now;
        Change { from, to, cause }
    }

    /// The agent or the CRM asks for state `to` (an index of `policy`, see
    /// [`StatePolicy::find`]). In a call it waits for the call's end; asking for the current
    /// state then cancels what was pending. Leaving wrap-up early is a request like any other.
    pub fn request(&mut self, now: Instant, to: usize) -> Outcome {
        self.request_by(now, to, Cause::Requested)
    }

    /// [`request`](Self::request) for `cause` (who asked: the agent or the CRM).
    pub fn request_by(&mut self, now: Instant, to: usize, cause: Cause) -> Outcome {
        if self.calls > 0 {
            if to == self.current {
                self.pending = None;
                return Outcome::Unchanged;
            }
            self.pending = Some(to);
            return Outcome::Pending(to);
        }
        self.pending = None;
        self.wrap_up = None;
        if to == self.current {
            return Outcome::Unchanged;
        }
        Outcome::Changed(self.enter(now, to, cause))
    }

    /// One of the agent's calls began (placed, or offered to it).
    pub fn call_began(&mut self) {
        self.calls += 1;
    }

    /// One of the agent's calls ended (`answered`: it was talked on). When it was the last:
    /// what was asked for during the calls applies now; else an answered call enters wrap-up.
    pub fn call_ended(
        &mut self,
        policy: &StatePolicy,
        now: Instant,
        answered: bool,
    ) -> Option<Change> {
        self.calls = self.calls.saturating_sub(1);
        if answered {
            self.missed = 0;
        }
        if self.calls > 0 {
            return None;
        }
        if let Some(to) = self.pending.take() {
            self.wrap_up = None;
            return (to != self.current).then(|| self.enter(now, to, Cause::CallEnded));
        }
        let (wrap, secs) = policy.wrap_up?;
        if !answered || self.current == wrap {
            return None;
        }
        self.wrap_up = Some((now + secs, self.current));
        Some(self.enter(now, wrap, Cause::WrapUp))
    }

    /// A call offered to the agent ended unanswered without the agent refusing it (the caller
    /// gave up, or it rang out), after its [`call_ended`](Self::call_ended). The app's
    /// `missed_calls_limit` of them in a row put the agent in `missed_calls_state`, the
    /// automatic not-ready (at the end of the agent's other calls, if in one).
    pub fn call_missed(&mut self, policy: &StatePolicy, now: Instant) -> Option<Change> {
        let (limit, to) = policy.missed_calls?;
        self.missed = self.missed.saturating_add(1);
        if self.missed < limit || !policy.get(self.current).may_receive {
            return None;
        }
        self.missed = 0;
        if self.calls > 0 {
            self.pending = Some(to);
            return None;
        }
        self.wrap_up = None;
        Some(self.enter(now, to, Cause::MissedCalls))
    }

    /// When [`handle_timeout`](Self::handle_timeout) is due (not during a call: a wrap-up
    /// whose time ran out in a call placed during it ends with the call).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.wrap_up_ends().filter(|_| self.calls == 0)
    }

    /// The wrap-up time ran out: back to the state before it.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<Change> {
        let (until, back) = self.wrap_up?;
        if now < until || self.calls > 0 {
            return None;
        }
        self.wrap_up = None;
        Some(self.enter(now, back, Cause::WrapUpOver))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn state(id: &str, out: bool, receive: bool) -> StateDef {
        StateDef {
            id: id.into(),
            label: id.into(),
            productive: out,
            may_call_out: out,
            may_receive: receive,
            groups: Vec::new(),
        }
    }

    fn policy() -> StatePolicy {
        StatePolicy {
            states: vec![
                state("available", true, true),
                state("paused", false, false),
                state("lunch", false, false),
                state("wrap_up", false, false),
            ],
            default: 0,
            wrap_up: Some((3, Duration::from_secs(30))),
            refuse_status: 480,
            missed_calls: Some((2, 1)),
        }
    }

    #[test]
    fn calls_let_ring_out_in_a_row_make_the_agent_not_ready() {
        let (p, t0) = (policy(), Instant::now());
        let mut a = AgentState::new(&p, t0);
        let offered = |a: &mut AgentState, answered: bool| {
            a.call_began();
            let ended = a.call_ended(&p, t0, answered);
            if answered {
                ended
            } else {
                a.call_missed(&p, t0)
            }
        };
        // Missed, answered (the count starts again), missed, missed: paused.
        assert_eq!(offered(&mut a, false), None);
        assert!(offered(&mut a, true).is_some_and(|c| c.cause == Cause::WrapUp));
        assert!(a.request(t0, 0) != Outcome::Unchanged, "wrap-up left");
        assert_eq!(offered(&mut a, false), None);
        assert_eq!(
            offered(&mut a, false),
            Some(Change {
                from: 0,
                to: 1,
                cause: Cause::MissedCalls
            })
        );
        assert!(!a.may_receive(&p));
        // Back to available: counting starts from zero.
        assert!(matches!(a.request(t0, 0), Outcome::Changed(_)));
        assert_eq!(offered(&mut a, false), None);
        // In another call when the limit is reached: applied when that call ends.
        a.call_began();
        assert_eq!(offered(&mut a, false), None);
        assert_eq!(a.pending(), Some(1));
        assert!(a.call_ended(&p, t0, true).is_some_and(|c| c.to == 1));
        // An app without a limit never does it.
        let mut none = p.clone();
        none.missed_calls = None;
        let mut b = AgentState::new(&none, t0);
        for _ in 0..5 {
            b.call_began();
            b.call_ended(&none, t0, false);
            assert_eq!(b.call_missed(&none, t0), None);
        }
    }

    #[test]
    fn a_change_through_the_api_says_so() {
        let (p, t0) = (policy(), Instant::now());
        let mut a = AgentState::new(&p, t0);
        assert_eq!(
            a.request_by(t0, 1, Cause::Api),
            Outcome::Changed(Change {
                from: 0,
                to: 1,
                cause: Cause::Api
            })
        );
        assert_eq!(Cause::Api.code(), "api");
    }

    #[test]
    fn a_paused_agent_neither_calls_out_nor_receives() {
        let (p, t0) = (policy(), Instant::now());
        let mut a = AgentState::new(&p, t0);
        assert!(a.may_call_out(&p) && a.may_receive(&p));
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(
            a.request(t1, 1),
            Outcome::Changed(Change {
                from: 0,
                to: 1,
                cause: Cause::Requested
            })
        );
        assert!(!a.may_call_out(&p) && !a.may_receive(&p));
        assert_eq!(a.since(), t1);
        assert_eq!(a.request(t1, 1), Outcome::Unchanged);
    }

    #[test]
    fn a_change_asked_for_in_a_call_applies_when_the_last_call_ends() {
        let (p, t0) = (policy(), Instant::now());
        let mut a = AgentState::new(&p, t0);
        a.call_began();
        a.call_began();
        assert_eq!(a.request(t0, 2), Outcome::Pending(2));
        assert_eq!(a.current(), 0);
        assert_eq!(a.call_ended(&p, t0 + Duration::from_secs(1), true), None);
        let end = t0 + Duration::from_secs(9);
        assert_eq!(
            a.call_ended(&p, end, true),
            Some(Change {
                from: 0,
                to: 2,
                cause: Cause::CallEnded
            }),
            "the agent's choice comes before wrap-up"
        );
        assert_eq!(
            (a.pending(), a.poll_timeout(), a.since()),
            (None, None, end)
        );
    }

    #[test]
    fn asking_for_the_current_state_in_a_call_cancels_the_pending_one() {
        let (p, t0) = (policy(), Instant::now());
        let mut a = AgentState::new(&p, t0);
        a.call_began();
        assert_eq!(a.request(t0, 1), Outcome::Pending(1));
        assert_eq!(a.request(t0, 0), Outcome::Unchanged);
        assert_eq!(a.pending(), None);
        // No pending change: the answered call's end enters wrap-up.
        let c = a.call_ended(&p, t0, true).unwrap();
        assert_eq!(c.cause, Cause::WrapUp);
    }

    #[test]
    fn wrap_up_follows_an_answered_call_and_ends_on_time() {
        let (p, t0) = (policy(), Instant::now());
        let mut a = AgentState::new(&p, t0);
        a.call_began();
        assert_eq!(
            a.call_ended(&p, t0, false),
            None,
            "no wrap-up after a missed call"
        );
        a.call_began();
        let end = t0 + Duration::from_secs(60);
        assert_eq!(
            a.call_ended(&p, end, true),
            Some(Change {
                from: 0,
                to: 3,
                cause: Cause::WrapUp
            })
        );
        assert!(!a.may_receive(&p));
        let due = end + Duration::from_secs(30);
        assert_eq!(a.poll_timeout(), Some(due));
        assert_eq!(a.handle_timeout(due - Duration::from_millis(1)), None);
        assert_eq!(
            a.handle_timeout(due),
            Some(Change {
                from: 3,
                to: 0,
                cause: Cause::WrapUpOver
            })
        );
        assert_eq!(a.poll_timeout(), None);
        assert_eq!(a.handle_timeout(due + Duration::from_secs(1)), None, "once");
    }

    #[test]
    fn leaving_wrap_up_early_or_a_call_during_it() {
        let (p, t0) = (policy(), Instant::now());
        let mut a = AgentState::new(&p, t0);
        a.request(t0, 1);
        a.call_began();
        a.call_ended(&p, t0, true);
        assert_eq!(a.current(), 3);
        // The agent is done early: its request ends the wrap-up, no timeout after.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(
            a.request(t1, 0),
            Outcome::Changed(Change {
                from: 3,
                to: 0,
                cause: Cause::Requested
            })
        );
        assert_eq!(a.poll_timeout(), None);
        // Wrap-up returns to the state before it (paused here), and waits for a call placed
        // during wrap-up to end.
        a.request(t1, 1);
        a.call_began();
        a.call_ended(&p, t1, true);
        a.call_began();
        let due = a.wrap_up_ends().unwrap();
        assert_eq!(a.poll_timeout(), None, "not while a call is on");
        assert_eq!(a.handle_timeout(due), None);
        assert_eq!(
            a.call_ended(&p, due + Duration::from_secs(1), true),
            None,
            "already in wrap-up"
        );
        assert_eq!(
            a.handle_timeout(due + Duration::from_secs(1)),
            Some(Change {
                from: 3,
                to: 1,
                cause: Cause::WrapUpOver
            })
        );
    }

    #[test]
    fn without_states_an_agent_is_always_available() {
        let p = StatePolicy::default();
        let mut a = AgentState::new(&p, Instant::now());
        a.call_began();
        assert_eq!(a.call_ended(&p, Instant::now(), true), None);
        assert!(a.may_call_out(&p) && a.may_receive(&p));
        assert_eq!(
            p.get(7).id,
            "available",
            "a stale index reads as the default"
        );
    }
}
