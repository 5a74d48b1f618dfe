//! What the CRM backend asks of a session over the HTTP API (docs/API.md, "Call control"):
//! click-to-call, which the agent's page carries out (callgate needs the browser's media to
//! place a call), and actions on a live call, which the session does itself as for the page's
//! requests of the same names. The page learns of each from the call's events.

use std::collections::{BTreeMap, HashMap};

use tokio::sync::oneshot;

use super::{MAX_CALLS_PER_SESSION, Session};
use crate::session::control::CallAction;
use crate::session::error::ApiError;
use crate::session::event::Event;

/// Most click-to-call requests waiting for one page.
pub(crate) const MAX_PENDING_DIALS: usize = 4;

/// Click-to-call requests sent to the page and not yet carried out, by request id.
#[derive(Default)]
pub(crate) struct Dials {
    next: u64,
    waiting: HashMap<u64, oneshot::Sender<Result<String, ApiError>>>,
}

impl Dials {
    /// Keeps `reply` for the page's `call` with a new request id, or gives it back when
    /// [`MAX_PENDING_DIALS`] wait already (those whose asker gave up are let go first).
    fn wait(
        &mut self,
        reply: oneshot::Sender<Result<String, ApiError>>,
    ) -> Result<u64, oneshot::Sender<Result<String, ApiError>>> {
        self.waiting.retain(|_, r| !r.is_closed());
        if self.waiting.len() >= MAX_PENDING_DIALS {
            return Err(reply);
        }
        self.next += 1;
        self.waiting.insert(self.next, reply);
        Ok(self.next)
    }

    /// The page's `call` for request `id` got `result` (its reply's call id, or why not).
    pub(crate) fn settle(&mut self, id: u64, result: &Result<Event, ApiError>) {
        let Some(reply) = self.waiting.remove(&id) else {
            return;
        };
        let r = match result {
            Ok(Event::Reply {
                call_id: Some(c), ..
            }) => Ok(c.clone()),
            Ok(_) => Err(ApiError::BadRequest("the page's call made no call")),
            Err(e) => Err(e.clone()),
        };
        let _ = reply.send(r);
    }

    /// The page went away: nothing it was asked will be done.
    pub(crate) fn fail_all(&mut self) {
        for (_, reply) in self.waiting.drain() {
            let _ = reply.send(Err(ApiError::PageDetached));
        }
    }
}

impl Session {
    /// Click-to-call: checks what can be checked here (the page is there, the state calls
    /// out, the headers and the number are allowed) and asks the page to dial; the page's
    /// `call` with the request id settles `reply`.
    pub(super) async fn dial(
        &mut self,
        to: String,
        headers: BTreeMap<String, String>,
        reply: oneshot::Sender<Result<String, ApiError>>,
    ) {
        let refused = self.may_dial(&to, &headers);
        if let Err(e) = refused {
            let _ = reply.send(Err(e));
            return;
        }
        let request_id = match self.dials.wait(reply) {
            Ok(id) => id,
            Err(reply) => {
                let _ = reply.send(Err(ApiError::TooManyCalls));
                return;
            }
        };
        tracing::info!(agent = %self.ident.agent, "click-to-call: the page is asked to dial");
        self.tell(Event::Dial {
            request_id,
            to,
            headers,
        })
        .await;
        if self.page.is_none() {
            self.dials.fail_all();
        }
    }

    fn may_dial(&self, to: &str, headers: &BTreeMap<String, String>) -> Result<(), ApiError> {
        if self.page.is_none() {
            return Err(ApiError::PageDetached);
        }
        if self.ctx.metrics.is_draining() {
            return Err(ApiError::Unavailable);
        }
        if self.calls.len() >= MAX_CALLS_PER_SESSION {
            return Err(ApiError::TooManyCalls);
        }
        self.may_call_with(headers)?;
        self.plan.apply(to)?;
        Ok(())
    }

    /// An action of the backend on call `call_id`, as the page's request would do it.
    pub(super) fn act(&mut self, call_id: &str, action: CallAction) -> Result<(), ApiError> {
        tracing::info!(agent = %self.ident.agent, call = %call_id, ?action, "call control by the backend");
        match action {
            CallAction::Hangup => self.hangup(0, call_id),
            CallAction::Hold(hold) => self.hold(0, call_id, hold),
            CallAction::Dtmf(digits) => self.dtmf(0, call_id, digits),
            CallAction::Transfer(to) => self.transfer(0, call_id, &to),
        }
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dial_is_settled_once_with_the_pages_call_id_or_its_refusal() {
        let mut dials = Dials::default();
        let (tx, mut rx) = oneshot::channel();
        let id = dials.wait(tx).unwrap_or_else(|_| unreachable!());
        dials.settle(id, &Ok(Event::ok_call(7, "c-1".into(), String::new())));
        assert_eq!(rx.try_recv().ok(), Some(Ok("c-1".to_owned())));
        // A second answer with the same id finds nothing waiting.
        dials.settle(id, &Err(ApiError::TooManyCalls));

        let (tx, mut rx) = oneshot::channel();
        let id = dials.wait(tx).unwrap_or_else(|_| unreachable!());
        dials.settle(id, &Err(ApiError::NotRegistered));
        assert_eq!(rx.try_recv().ok(), Some(Err(ApiError::NotRegistered)));
    }

    #[test]
    fn at_most_a_few_dials_wait_and_abandoned_ones_make_room() {
        let mut dials = Dials::default();
        let mut kept = Vec::new();
        for _ in 0..MAX_PENDING_DIALS {
            let (tx, rx) = oneshot::channel();
            assert!(dials.wait(tx).is_ok());
            kept.push(rx);
        }
        let (tx, _rx) = oneshot::channel();
        assert!(dials.wait(tx).is_err());
        // One asker gave up (its HTTP request timed out): its place is free.
        drop(kept.pop());
        let (tx, _rx) = oneshot::channel();
        assert!(dials.wait(tx).is_ok());
        // The page goes away: every waiting asker hears so.
        dials.fail_all();
        for mut rx in kept {
            assert_eq!(rx.try_recv().ok(), Some(Err(ApiError::PageDetached)));
        }
    }
}
