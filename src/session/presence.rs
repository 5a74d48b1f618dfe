//! Whether a session's page is there, sans-IO: a page that goes away leaves the session
//! detached for the grace period (`http.resume_secs`), a page that resumes it in time gets the
//! state of each call replayed, then what happened while it was away, and a session not
//! resumed in time ends. What is replayed is kept here: each live call's latest `call` event,
//! each ringing call's `incoming`, and the events of the time away (the latest
//! [`AWAY_EVENTS`]).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::event::Event;

/// Events kept for a page that is away (the oldest go first; the CRM's SSE stream has them
/// all, with `Last-Event-ID`).
pub(crate) const AWAY_EVENTS: usize = 256;

/// A session's page attachment and what a resuming page is told.
#[derive(Debug, Default)]
pub(crate) struct Presence {
    /// When the detached session ends (`None`: a page is attached).
    detached_until: Option<Instant>,
    /// Each live call's latest `call` event.
    last: HashMap<String, Event>,
    /// Each ringing call's `incoming` event.
    ringing: HashMap<String, Event>,
    /// Calls in the order they began (replays keep it).
    order: Vec<String>,
    /// What happened while the page was away.
    away: std::collections::VecDeque<Event>,
}

impl Presence {
    /// Whether the page is away (the session waits for a resume).
    pub(crate) fn is_detached(&self) -> bool {
        self.detached_until.is_some()
    }

    /// A call began (`incoming`: it rings for the agent).
    pub(crate) fn call_began(&mut self, call_id: &str, incoming: Option<Event>) {
        self.order.push(call_id.to_owned());
        if let Some(ev) = incoming {
            self.ringing.insert(call_id.to_owned(), ev);
        }
    }

    /// The agent answered or refused a ringing call.
    pub(crate) fn not_ringing(&mut self, call_id: &str) {
        self.ringing.remove(call_id);
    }

    /// A call's state changed.
    pub(crate) fn call_event(&mut self, call_id: &str, ev: &Event) {
        if self.order.iter().any(|c| c == call_id) {
            self.last.insert(call_id.to_owned(), ev.clone());
        }
    }

    /// An event the page missed (it is away).
    pub(crate) fn missed(&mut self, ev: Event) {
        if self.away.len() >= AWAY_EVENTS {
            self.away.pop_front();
        }
        self.away.push_back(ev);
    }

    /// A call is over: nothing of it is replayed.
    pub(crate) fn call_finished(&mut self, call_id: &str) {
        self.order.retain(|c| c != call_id);
        self.last.remove(call_id);
        self.ringing.remove(call_id);
    }

    /// The page went away at `now`: `true` if the session waits `grace` for a resume (it was
    /// attached, or already waiting: the deadline stands), `false` if it ends now.
    pub(crate) fn detach(&mut self, now: Instant, grace: Option<Duration>) -> bool {
        match (self.detached_until, grace) {
            (Some(_), _) => true,
            (None, Some(g)) => {
                self.detached_until = Some(now + g);
                true
            }
            (None, None) => false,
        }
    }

    /// A page resumed the session: what it is told of the calls (after the login events), then
    /// what happened while it was away. Returns whether the session had been detached, and the
    /// replay.
    pub(crate) fn attach(&mut self) -> (bool, Vec<Event>) {
        let was = self.detached_until.take().is_some();
        let mut out: Vec<Event> = self
            .order
            .iter()
            .filter_map(|c| self.last.get(c).cloned())
            .collect();
        out.extend(
            self.order
                .iter()
                .filter_map(|c| self.ringing.get(c).cloned()),
        );
        out.extend(self.away.drain(..));
        (was, out)
    }

    /// When a detached session ends.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.detached_until
    }

    /// Whether the session is over at `now` (detached past its grace period).
    pub(crate) fn handle_timeout(&mut self, now: Instant) -> bool {
        self.detached_until.is_some_and(|t| now >= t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::event::{CallState, Direction};

    fn call(id: &str, state: CallState) -> Event {
        Event::Call {
            call_id: id.into(),
            state,
            direction: Direction::Outbound,
            peer: "1002".into(),
            sip: None,
            end_reason: None,
        }
    }

    fn incoming(id: &str) -> Event {
        Event::Incoming {
            call_id: id.into(),
            from: "1003".into(),
            display_name: None,
            data: Default::default(),
            auto_answer: false,
        }
    }

    fn ids(evs: &[Event]) -> Vec<(String, &'static str)> {
        evs.iter()
            .map(|e| match e {
                Event::Call { call_id, state, .. } => (call_id.clone(), state.as_str()),
                Event::Incoming { call_id, .. } => (call_id.clone(), "incoming"),
                _ => (String::new(), "?"),
            })
            .collect()
    }

    #[test]
    fn a_reload_within_the_grace_period_gets_each_calls_state_back() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(30);
        let mut p = Presence::default();
        p.call_began("c-1", None);
        p.call_event("c-1", &call("c-1", CallState::Trying));
        p.call_event("c-1", &call("c-1", CallState::Established));
        p.call_began("c-2", Some(incoming("c-2")));
        p.call_event("c-2", &call("c-2", CallState::Ringing));
        assert!(p.detach(t0, Some(grace)));
        assert_eq!(p.poll_timeout(), Some(t0 + grace));
        assert!(!p.handle_timeout(t0 + grace - Duration::from_millis(1)));
        // A second goodbye (the old socket's) does not move the deadline.
        assert!(p.detach(t0 + Duration::from_secs(10), Some(grace)));
        assert_eq!(p.poll_timeout(), Some(t0 + grace));
        let (was, replay) = p.attach();
        assert!(was);
        assert_eq!(
            ids(&replay),
            [
                ("c-1".to_owned(), "established"),
                ("c-2".to_owned(), "ringing"),
                ("c-2".to_owned(), "incoming")
            ]
        );
        assert_eq!(p.poll_timeout(), None);
        assert!(!p.handle_timeout(t0 + grace * 2), "attached: no end");
    }

    #[test]
    fn a_session_not_resumed_in_time_ends_and_without_grace_at_once() {
        let t0 = Instant::now();
        let mut p = Presence::default();
        assert!(p.detach(t0, Some(Duration::from_secs(3))));
        assert!(p.handle_timeout(t0 + Duration::from_secs(3)));
        let mut q = Presence::default();
        assert!(
            !q.detach(t0, None),
            "http.resume_secs = 0: the session ends with its socket"
        );
    }

    #[test]
    fn a_call_that_ends_while_detached_is_not_replayed() {
        let t0 = Instant::now();
        let mut p = Presence::default();
        p.call_began("c-1", None);
        p.call_event("c-1", &call("c-1", CallState::Established));
        p.call_began("c-2", Some(incoming("c-2")));
        assert!(p.detach(t0, Some(Duration::from_secs(30))));
        p.call_event("c-1", &call("c-1", CallState::Ended));
        p.call_finished("c-1");
        p.call_finished("c-2");
        // A late event of a finished call does not bring it back.
        p.call_event("c-1", &call("c-1", CallState::Ended));
        // What the page missed comes after the replay, bounded.
        for _ in 0..AWAY_EVENTS + 5 {
            p.missed(call("c-1", CallState::Ended));
        }
        let (_, replay) = p.attach();
        assert_eq!(replay.len(), AWAY_EVENTS, "only the latest are kept");
        assert!(
            ids(&replay).iter().all(|e| e.1 == "ended"),
            "no replay of a finished call, only what was missed: {replay:?}"
        );
        assert!(p.attach().1.is_empty(), "given once");
    }
}
