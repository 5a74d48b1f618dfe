//! Live sessions by id: a sender to each session's task and its app, nothing else (the session
//! task owns its state; `resume` re-attaches a page to it through this sender).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::mpsc;

use super::control::Control;

/// Session id -> (app, the session's control queue).
///
/// A std `Mutex` around a small map: held only to insert, remove or clone one entry, never
/// across an `.await` (STYLE.md §3's documented exception).
#[derive(Default)]
pub struct Registry {
    map: Mutex<HashMap<String, (String, mpsc::Sender<Control>)>>,
    /// Live sessions per (app, agent), kept by their [`AgentSlot`]s.
    agents: Arc<Mutex<HashMap<(String, String), usize>>>,
}

/// A session's place among its agent's sessions (`http.max_sessions_per_agent`), given back
/// when the session ends.
pub(crate) struct AgentSlot {
    key: (String, String),
    agents: Arc<Mutex<HashMap<(String, String), usize>>>,
}

impl Drop for AgentSlot {
    fn drop(&mut self) {
        let mut agents = self.agents.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = agents.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                agents.remove(&self.key);
            }
        }
    }
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, (String, mpsc::Sender<Control>)>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn insert(&self, id: &str, app: &str, tx: mpsc::Sender<Control>) {
        self.lock().insert(id.to_owned(), (app.to_owned(), tx));
    }

    pub(crate) fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    /// The app and control queue of session `id`.
    pub(crate) fn get(&self, id: &str) -> Option<(String, mpsc::Sender<Control>)> {
        self.lock().get(id).cloned()
    }

    /// A place for one more session of `agent` in `app`, or `Err` with the limit when `max`
    /// are live (a leaked token opening sessions without end, a page in a reload loop).
    pub(crate) fn claim(&self, app: &str, agent: &str, max: usize) -> Result<AgentSlot, usize> {
        let key = (app.to_owned(), agent.to_owned());
        let mut agents = self.agents.lock().unwrap_or_else(PoisonError::into_inner);
        let n = agents.entry(key.clone()).or_default();
        if *n >= max {
            return Err(max);
        }
        *n += 1;
        Ok(AgentSlot {
            key,
            agents: self.agents.clone(),
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
        let a = reg.claim("app", "sip:1@x", 2);
        let b = reg.claim("app", "sip:1@x", 2);
        assert!(a.is_ok() && b.is_ok());
        assert_eq!(reg.claim("app", "sip:1@x", 2).err(), Some(2));
        // Another agent, or the same identity in another app, has its own places.
        assert!(reg.claim("app", "sip:2@x", 2).is_ok());
        assert!(reg.claim("other", "sip:1@x", 2).is_ok());
        drop(a);
        assert!(reg.claim("app", "sip:1@x", 2).is_ok());
    }
}
