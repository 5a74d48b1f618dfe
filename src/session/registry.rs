//! Live sessions by id: a sender to each session's task and its app, nothing else (the session
//! task owns its state; `resume` re-attaches a page to it through this sender).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{mpsc, watch};

use super::agent_state::{AgentState, Cause, StateDef, StatePolicy};
use super::control::Control;
use crate::cdr::CdrStore;
use crate::cdr::states::{Entered, StateEntry};

/// What the sessions of one agent share: its state, and a signal of its changes (the cause of
/// the last one) for each session to tell its page.
pub(crate) struct AgentShared {
    state: Mutex<AgentState>,
    changed: watch::Sender<Cause>,
    /// Where its changes are recorded (the history's agent-state log), if anywhere.
    log: Option<StateLog>,
}

/// An agent's place in the agent-state log.
struct StateLog {
    cdr: CdrStore,
    app: String,
    agent: String,
}

impl StateLog {
    fn write(&self, entered: Option<Entered>) {
        // An entry dropped because the writer is far behind is counted there; the agent's
        // next change closes the stretch it would have opened.
        let _ = self.cdr.agent_state(StateEntry {
            app: self.app.clone(),
            agent: self.agent.clone(),
            at: crate::cdr::unix_ms(),
            entered,
        });
    }
}

impl Drop for AgentShared {
    /// The agent's last session ended: its time in the state it was in ends too.
    fn drop(&mut self) {
        if let Some(log) = &self.log {
            log.write(None);
        }
    }
}

impl AgentShared {
    /// Runs `f` on the agent's state (a std `Mutex`, never held across an `.await`).
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut AgentState) -> R) -> R {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Tells every session of the agent that its state changed, for `cause`.
    pub(crate) fn changed(&self, cause: Cause) {
        self.changed.send_replace(cause);
    }

    /// A receiver of the changes.
    pub(crate) fn watch(&self) -> watch::Receiver<Cause> {
        self.changed.subscribe()
    }

    /// Records that the agent entered `state` for `cause`.
    pub(crate) fn logged(&self, state: &StateDef, cause: Cause) {
        if let Some(log) = &self.log {
            log.write(Some(Entered {
                state: state.id.clone(),
                productive: state.productive,
                cause: cause.code().to_owned(),
            }));
        }
    }
}

/// A live session, as the registry knows it.
struct Entry {
    app: String,
    agent: String,
    control: mpsc::Sender<Control>,
}

type Agents = Arc<Mutex<HashMap<(String, String), (usize, Arc<AgentShared>)>>>;

/// Live calls: call id -> the id of the session that has it.
type Calls = Arc<Mutex<HashMap<String, String>>>;

/// Session id -> (app, the session's control queue).
///
/// A std `Mutex` around a small map: held only to insert, remove or clone one entry, never
/// across an `.await` (STYLE.md §3's documented exception).
#[derive(Default)]
pub struct Registry {
    map: Mutex<HashMap<String, Entry>>,
    /// Live sessions per (app, agent), kept by their [`AgentSlot`]s, and what they share.
    agents: Agents,
    /// Where agents' state changes are recorded.
    log: Option<CdrStore>,
    /// Which session has each live call (for the backend's call control), kept by the
    /// calls' [`LiveCall`]s.
    calls: Calls,
}

/// A call's entry among the live calls, removed when the session lets go of the call.
pub(crate) struct LiveCall {
    call_id: String,
    calls: Calls,
}

impl Drop for LiveCall {
    fn drop(&mut self) {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.call_id);
    }
}

/// Who has a live call, as the backend's call control needs it.
pub(crate) struct CallOwner {
    pub(crate) app: String,
    pub(crate) agent: String,
    pub(crate) control: mpsc::Sender<Control>,
}

/// A session's place among its agent's sessions (`http.max_sessions_per_agent`), given back
/// when the session ends.
pub(crate) struct AgentSlot {
    key: (String, String),
    agents: Agents,
    shared: Arc<AgentShared>,
}

impl AgentSlot {
    /// What the agent's sessions share.
    pub(crate) fn shared(&self) -> &Arc<AgentShared> {
        &self.shared
    }
}

impl Drop for AgentSlot {
    fn drop(&mut self) {
        let mut agents = self.agents.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((n, _)) = agents.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                agents.remove(&self.key);
            }
        }
    }
}

impl Registry {
    /// A registry that records agents' states in `cdr`'s agent-state log.
    pub fn logging_to(cdr: CdrStore) -> Registry {
        Registry {
            log: Some(cdr),
            ..Registry::default()
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn insert(&self, id: &str, app: &str, agent: &str, tx: mpsc::Sender<Control>) {
        let entry = Entry {
            app: app.to_owned(),
            agent: agent.to_owned(),
            control: tx,
        };
        self.lock().insert(id.to_owned(), entry);
    }

    pub(crate) fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    /// The app and control queue of session `id`.
    pub(crate) fn get(&self, id: &str) -> Option<(String, mpsc::Sender<Control>)> {
        self.lock()
            .get(id)
            .map(|e| (e.app.clone(), e.control.clone()))
    }

    /// Records that session `session_id` has call `call_id` until the guard drops.
    pub(crate) fn call_began(&self, call_id: &str, session_id: &str) -> LiveCall {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(call_id.to_owned(), session_id.to_owned());
        LiveCall {
            call_id: call_id.to_owned(),
            calls: self.calls.clone(),
        }
    }

    /// The session that has live call `call_id`: its app, agent and control queue.
    pub(crate) fn owner_of_call(&self, call_id: &str) -> Option<CallOwner> {
        let session = self
            .calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(call_id)
            .cloned()?;
        self.lock().get(&session).map(|e| CallOwner {
            app: e.app.clone(),
            agent: e.agent.clone(),
            control: e.control.clone(),
        })
    }

    /// The control queues of every live session of `agent` in `app`.
    pub(crate) fn sessions_of(&self, app: &str, agent: &str) -> Vec<mpsc::Sender<Control>> {
        self.lock()
            .values()
            .filter(|e| e.app == app && e.agent == agent)
            .map(|e| e.control.clone())
            .collect()
    }

    /// The apps `agent` has live sessions in.
    pub(crate) fn apps_of(&self, agent: &str) -> Vec<String> {
        let mut apps: Vec<String> = self
            .lock()
            .values()
            .filter(|e| e.agent == agent)
            .map(|e| e.app.clone())
            .collect();
        apps.sort();
        apps.dedup();
        apps
    }

    /// A place for one more session of `agent` in `app`, or `Err` with the limit when `max`
    /// are live (a leaked token opening sessions without end, a page in a reload loop). The
    /// agent's first session starts it in `policy`'s default state.
    pub(crate) fn claim(
        &self,
        app: &str,
        agent: &str,
        max: usize,
        policy: &StatePolicy,
    ) -> Result<AgentSlot, usize> {
        let key = (app.to_owned(), agent.to_owned());
        let mut agents = self.agents.lock().unwrap_or_else(PoisonError::into_inner);
        let (n, shared) = agents.entry(key.clone()).or_insert_with(|| {
            let shared = AgentShared {
                state: Mutex::new(AgentState::new(policy, std::time::Instant::now())),
                changed: watch::channel(Cause::Login).0,
                log: self.log.clone().map(|cdr| StateLog {
                    cdr,
                    app: app.to_owned(),
                    agent: agent.to_owned(),
                }),
            };
            shared.logged(policy.get(policy.default), Cause::Login);
            (0, Arc::new(shared))
        });
        if *n >= max {
            return Err(max);
        }
        *n += 1;
        Ok(AgentSlot {
            key,
            agents: self.agents.clone(),
            shared: shared.clone(),
        })
    }

    /// Live sessions.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no session lives.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_has_at_most_max_sessions_and_an_ended_one_frees_its_place() {
        let reg = Registry::default();
        let p = StatePolicy::default();
        let a = reg.claim("app", "sip:1@x", 2, &p);
        let b = reg.claim("app", "sip:1@x", 2, &p);
        assert!(a.is_ok() && b.is_ok());
        assert!(
            reg.claim("app", "sip:1@x", 2, &p)
                .is_err_and(|max| max == 2)
        );
        // Another agent, or the same identity in another app, has its own places.
        assert!(reg.claim("app", "sip:2@x", 2, &p).is_ok());
        assert!(reg.claim("other", "sip:1@x", 2, &p).is_ok());
        drop(a);
        assert!(reg.claim("app", "sip:1@x", 2, &p).is_ok());
    }

    #[test]
    fn an_agents_sessions_share_its_state_until_the_last_ends() {
        let reg = Registry::default();
        let mut p = StatePolicy::default();
        let mut paused = p.states[0].clone();
        paused.id = "paused".into();
        p.states.push(paused);
        let now = std::time::Instant::now();
        let a = reg
            .claim("app", "sip:1@x", 2, &p)
            .unwrap_or_else(|_| unreachable!());
        let b = reg
            .claim("app", "sip:1@x", 2, &p)
            .unwrap_or_else(|_| unreachable!());
        assert!(Arc::ptr_eq(a.shared(), b.shared()));
        a.shared().with(|s| s.request(now, 1));
        assert_eq!(b.shared().with(|s| s.current()), 1);
        drop((a, b));
        // The agent's next login starts afresh, in the default state.
        let c = reg
            .claim("app", "sip:1@x", 2, &p)
            .unwrap_or_else(|_| unreachable!());
        assert_eq!(c.shared().with(|s| s.current()), 0);
    }

    #[test]
    fn a_live_call_is_found_by_its_id_until_its_session_lets_go() {
        let reg = Registry::default();
        let (tx, _rx) = mpsc::channel(1);
        reg.insert("s1", "app", "sip:1@x", tx);
        let live = reg.call_began("c1", "s1");
        let owner = reg.owner_of_call("c1");
        assert_eq!(
            owner.map(|o| (o.app, o.agent)),
            Some(("app".to_owned(), "sip:1@x".to_owned()))
        );
        assert!(reg.owner_of_call("c2").is_none());
        drop(live);
        assert!(reg.owner_of_call("c1").is_none());
        // A call of a session that ended meanwhile has no owner either.
        let _live = reg.call_began("c3", "s1");
        reg.remove("s1");
        assert!(reg.owner_of_call("c3").is_none());
    }
}
