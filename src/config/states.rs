//! An app's agent states (`states` in apps.toml): what each allows, the default one, wrap-up.
//! The per-agent state machine using them is `session::agent_state`.

use std::time::Duration;

use super::Checker;
use super::raw::RawApp;
use crate::account::check_group;

/// Most states one app defines.
pub const MAX_STATES: usize = 32;

/// Most groups one state names.
pub const MAX_GROUPS: usize = 64;

/// One state an app's agents may be in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDef {
    /// Stable id (`available`, `lunch`), in events, requests and the history.
    pub id: String,
    /// What the page shows.
    pub label: String,
    /// Counted as productive time in the agent's figures.
    pub productive: bool,
    /// The agent may place calls.
    pub may_call_out: bool,
    /// The agent is offered incoming calls.
    pub may_receive: bool,
    /// The agent groups (token `group`) that may use it; empty: every agent.
    pub groups: Vec<String>,
}

impl StateDef {
    /// Whether an agent of `group` (or of none) may use this state.
    pub fn allows(&self, group: Option<&str>) -> bool {
        self.groups.is_empty() || group.is_some_and(|g| self.groups.iter().any(|x| x == g))
    }
}

/// An app's states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatePolicy {
    /// The states, in the order pages list them (never empty).
    pub states: Vec<StateDef>,
    /// Index of the state an agent starts in.
    pub default: usize,
    /// The state entered when an answered call ends, and for how long (`None`: no wrap-up).
    pub wrap_up: Option<(usize, Duration)>,
    /// SIP status refusing a call to an agent whose state does not receive (480 or 486).
    pub refuse_status: u16,
    /// After how many calls in a row the agent lets ring out it is put in which state (the
    /// automatic not-ready); `None`: never.
    pub missed_calls: Option<(u32, usize)>,
}

impl Default for StatePolicy {
    /// One state, `available`, that calls out and receives: an app without `states`.
    fn default() -> Self {
        StatePolicy {
            states: vec![StateDef {
                id: "available".into(),
                label: "Available".into(),
                productive: true,
                may_call_out: true,
                may_receive: true,
                groups: Vec::new(),
            }],
            default: 0,
            wrap_up: None,
            refuse_status: 480,
            missed_calls: None,
        }
    }
}

impl StatePolicy {
    /// The index of state `id`.
    pub fn find(&self, id: &str) -> Option<usize> {
        self.states.iter().position(|s| s.id == id)
    }

    /// The index of state `id` if an agent of `group` may use it.
    pub fn find_for(&self, id: &str, group: Option<&str>) -> Option<usize> {
        self.find(id).filter(|&i| self.get(i).allows(group))
    }

    /// The states an agent of `group` may use, in order.
    pub fn allowed<'a>(&'a self, group: Option<&'a str>) -> impl Iterator<Item = &'a StateDef> {
        self.states.iter().filter(move |s| s.allows(group))
    }

    /// State `i` (the default one for an index a reload made stale).
    pub fn get(&self, i: usize) -> &StateDef {
        self.states
            .get(i)
            .or_else(|| self.states.get(self.default))
            .or_else(|| self.states.first())
            .unwrap_or(&FALLBACK)
    }
}

static FALLBACK: std::sync::LazyLock<StateDef> =
    std::sync::LazyLock::new(|| StatePolicy::default().states.remove(0));

/// Validates an app's `states`, `default_state`, `wrap_up_state`, `wrap_up_secs` and
/// `not_ready_status` (`at` makes the dotted key of one). None given: [`StatePolicy::default`].
pub(super) fn check_states(
    c: &mut Checker,
    file: &str,
    at: &dyn Fn(&str) -> String,
    app: &RawApp,
) -> StatePolicy {
    let mut policy = StatePolicy::default();
    if !app.states.is_empty() {
        policy.states.clear();
    }
    if app.states.len() > MAX_STATES {
        c.add(file, at("states"), format!("at most {MAX_STATES} states"));
    }
    for (i, raw) in app.states.iter().take(MAX_STATES).enumerate() {
        let key = format!("{}[{i}]", at("states"));
        let id_ok = (1..=32).contains(&raw.id.len())
            && raw
                .id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !id_ok {
            c.add(
                file,
                format!("{key}.id"),
                "must be 1 to 32 of a-z, 0-9, _ and - (e.g. \"lunch\")",
            );
            continue;
        }
        if policy.find(&raw.id).is_some() {
            c.add(
                file,
                format!("{key}.id"),
                format!("\"{}\" is defined twice", raw.id),
            );
            continue;
        }
        let label = raw.label.clone().unwrap_or_else(|| raw.id.clone());
        if label.is_empty() || label.chars().count() > 64 || label.chars().any(char::is_control) {
            c.add(
                file,
                format!("{key}.label"),
                "must be 1 to 64 characters, none of them control characters",
            );
        }
        if raw.groups.len() > MAX_GROUPS || raw.groups.iter().any(|g| check_group(g).is_err()) {
            c.add(
                file,
                format!("{key}.groups"),
                format!(
                    "at most {MAX_GROUPS} group names, each 1 to 64 letters, digits, '-', '_' or '.'"
                ),
            );
        }
        policy.states.push(StateDef {
            id: raw.id.clone(),
            label,
            productive: raw.productive,
            may_call_out: raw.may_call_out,
            may_receive: raw.may_receive,
            groups: raw.groups.clone(),
        });
    }
    if policy.states.is_empty() {
        policy = StatePolicy::default();
    }
    let mut named = |key: &str, id: Option<&String>| -> Option<usize> {
        let id = id?;
        let found = policy.find(id);
        if found.is_none() {
            c.add(
                file,
                at(key),
                format!("\"{id}\" is not one of the app's states"),
            );
        }
        found
    };
    let default = named("default_state", app.default_state.as_ref()).unwrap_or(0);
    let wrap = named("wrap_up_state", app.wrap_up_state.as_ref());
    let not_ready = named("missed_calls_state", app.missed_calls_state.as_ref());
    policy.default = default;
    let secs = match app.wrap_up_secs {
        None => 30,
        Some(s @ 1..=3600) => s.unsigned_abs(),
        Some(_) => {
            c.add(file, at("wrap_up_secs"), "must be 1 to 3600 seconds");
            30
        }
    };
    if wrap.is_none() && app.wrap_up_secs.is_some() && app.wrap_up_state.is_none() {
        c.add(
            file,
            at("wrap_up_secs"),
            "needs wrap_up_state, the state agents wrap up in",
        );
    }
    for (key, i) in [
        ("default_state", Some(default)),
        ("wrap_up_state", wrap),
        ("missed_calls_state", not_ready),
    ] {
        if let Some(i) = i.filter(|&i| !policy.get(i).groups.is_empty()) {
            c.add(
                file,
                at(key),
                format!(
                    "\"{}\" is limited to some groups, but every agent enters this state",
                    policy.get(i).id
                ),
            );
        }
    }
    if wrap == Some(policy.default) {
        c.add(
            file,
            at("wrap_up_state"),
            "must not be the default state (wrap-up returns to the state before it)",
        );
    }
    policy.wrap_up = wrap.map(|w| (w, Duration::from_secs(secs)));
    policy.missed_calls = match (app.missed_calls_limit, not_ready) {
        (None, None) => None,
        (Some(n @ 1..=100), Some(to)) if !policy.get(to).may_receive => {
            Some((u32::try_from(n).unwrap_or(1), to))
        }
        (Some(1..=100), Some(_)) => {
            c.add(
                file,
                at("missed_calls_state"),
                "must be a state with may_receive = false (the agent is not offered calls in it)",
            );
            None
        }
        (Some(1..=100), None) => {
            c.add(
                file,
                at("missed_calls_limit"),
                "needs missed_calls_state, the state agents are put in",
            );
            None
        }
        (Some(_), _) => {
            c.add(file, at("missed_calls_limit"), "must be 1 to 100 calls");
            None
        }
        (None, Some(_)) => {
            c.add(
                file,
                at("missed_calls_state"),
                "needs missed_calls_limit, after how many missed calls in a row",
            );
            None
        }
    };
    policy.refuse_status = match app.not_ready_status {
        None => 480,
        Some(s @ (480 | 486)) => s as u16,
        Some(_) => {
            c.add(
                file,
                at("not_ready_status"),
                "must be 480 (Temporarily Unavailable) or 486 (Busy Here)",
            );
            480
        }
    };
    policy
}
