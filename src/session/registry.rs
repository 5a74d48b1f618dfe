//! Live sessions by id: a sender to each session's task and its app, nothing else (the session
//! task owns its state; `resume` re-attaches a page to it through this sender).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::mpsc;

use super::control::Control;

/// Session id -> (app, the session's control queue).
///
/// A std `Mutex` around a small map: held only to insert, remove or clone one entry, never
/// across an `.await` (STYLE.md §3's documented exception).
#[derive(Default)]
pub struct Registry {
    map: Mutex<HashMap<String, (String, mpsc::Sender<Control>)>>,
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

    /// Live sessions.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no session lives.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}
