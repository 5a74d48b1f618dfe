//! The agent-state log: one row per stretch of time an agent spent in one state (`ended_at`
//! empty while it lasts), written in order by the history's writer, and the per-agent time in
//! each state that the statistics report.

use std::collections::BTreeMap;

use rusqlite::{Connection, params};

/// A change of an agent's state, as the log records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateEntry {
    /// The agent's app.
    pub app: String,
    /// The agent.
    pub agent: String,
    /// When (Unix ms).
    pub at: i64,
    /// The state entered, or `None` when the agent's last session ended.
    pub entered: Option<Entered>,
}

/// The state an agent entered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entered {
    /// Its id.
    pub state: String,
    /// Whether it counts as productive time.
    pub productive: bool,
    /// Why (`login`, `requested`, `wrap_up`...).
    pub cause: String,
}

/// Time in states over a period, seconds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateTimes {
    /// By state id.
    pub by_state: BTreeMap<String, u64>,
    /// In productive states.
    pub productive: u64,
    /// In the others (logged in all the same).
    pub unproductive: u64,
}

/// One stretch of time an agent spent in one state, as the API lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Stretch {
    /// The agent's app.
    pub app: String,
    /// The state's id.
    pub state: String,
    /// Whether it counts as productive time.
    pub productive: bool,
    /// Why it was entered.
    pub cause: String,
    /// When (Unix ms).
    pub started_at: i64,
    /// Until when; `None` while it lasts.
    pub ended_at: Option<i64>,
}

/// A page of an agent's stretches, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StatePage {
    /// Oldest first.
    pub states: Vec<Stretch>,
    /// Pass as `cursor` for the next page; absent on the last one.
    #[serde(rename = "nextCursor", skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// `agent`'s stretches that overlap [`from`, `to`) (Unix ms; `None`: unbounded; one still
/// going on lasts until `now`), in `app` only (`None`: every app), oldest first: `limit` of
/// them after the row `after` (a cursor of an earlier page).
pub(super) fn list(
    db: &Connection,
    (app, agent): (Option<&str>, &str),
    (from, to): (Option<i64>, Option<i64>),
    (after, limit): (i64, u32),
    now: i64,
) -> rusqlite::Result<StatePage> {
    let mut q = db.prepare_cached(
        "SELECT rowid, app, state, productive, cause, started_at, ended_at FROM agent_states
         WHERE agent = ?1 AND (?4 IS NULL OR app = ?4) AND rowid > ?6
           AND started_at < COALESCE(?3, ?5) AND COALESCE(ended_at, ?5) > COALESCE(?2, 0)
         ORDER BY rowid LIMIT ?7",
    )?;
    let rows = q.query_map(
        params![agent, from, to, app, now, after, i64::from(limit) + 1],
        |r| {
            Ok((
                r.get::<_, i64>(0)?,
                Stretch {
                    app: r.get(1)?,
                    state: r.get(2)?,
                    productive: r.get(3)?,
                    cause: r.get(4)?,
                    started_at: r.get(5)?,
                    ended_at: r.get(6)?,
                },
            ))
        },
    )?;
    let mut states = Vec::new();
    let (mut last, mut more) = (None, false);
    for row in rows {
        let (rowid, s) = row?;
        if states.len() >= usize::try_from(limit).unwrap_or(usize::MAX) {
            more = true;
            break;
        }
        last = Some(rowid);
        states.push(s);
    }
    let next_cursor = last.filter(|_| more).map(|r| r.to_string());
    Ok(StatePage {
        states,
        next_cursor,
    })
}

/// Closes the agent's open row at `e.at` and opens the next one, in one transaction.
pub(super) fn write(db: &mut Connection, e: &StateEntry) -> rusqlite::Result<usize> {
    let tx = db.transaction()?;
    let mut n = tx.execute(
        "UPDATE agent_states SET ended_at = MAX(?3, started_at)
         WHERE app = ?1 AND agent = ?2 AND ended_at IS NULL",
        params![e.app, e.agent, e.at],
    )?;
    if let Some(s) = &e.entered {
        n += tx.execute(
            "INSERT INTO agent_states (app, agent, state, productive, cause, started_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![e.app, e.agent, s.state, s.productive, s.cause, e.at],
        )?;
    }
    tx.commit()?;
    Ok(n)
}

/// At start-up, after the calls a crash cut off were closed: the rows of agents who were
/// logged in end at the last moment known of them (their last call's end, answer or start, or
/// the row's own start).
pub(super) fn close_interrupted(db: &Connection) -> rusqlite::Result<usize> {
    db.execute(
        "UPDATE agent_states SET ended_at = MAX(started_at, COALESCE(
             (SELECT MAX(COALESCE(c.ended_at, c.answered_at, c.started_at)) FROM calls c
              WHERE c.app = agent_states.app AND c.agent = agent_states.agent),
             started_at))
         WHERE ended_at IS NULL",
        [],
    )
}

/// `agent`'s time in each state within [`from`, `to`) (Unix ms; `None`: unbounded), a state
/// still going on counted up to `now`, in `app` only (`None`: every app).
pub(super) fn times(
    db: &Connection,
    app: Option<&str>,
    agent: &str,
    (from, to): (Option<i64>, Option<i64>),
    now: i64,
) -> rusqlite::Result<StateTimes> {
    let mut q = db.prepare_cached(
        "SELECT state, productive,
                SUM(MAX(0, MIN(COALESCE(ended_at, ?5), COALESCE(?3, ?5)) - MAX(started_at, COALESCE(?2, 0))))
         FROM agent_states
         WHERE agent = ?1 AND (?4 IS NULL OR app = ?4)
           AND started_at < COALESCE(?3, ?5) AND COALESCE(ended_at, ?5) > COALESCE(?2, 0)
         GROUP BY state, productive",
    )?;
    let rows = q.query_map(params![agent, from, to, app, now], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, bool>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    let mut ms = StateTimes::default();
    for row in rows {
        let (state, productive, t) = row?;
        let t = u64::try_from(t).unwrap_or(0);
        *ms.by_state.entry(state).or_default() += t;
        if productive {
            ms.productive += t;
        } else {
            ms.unproductive += t;
        }
    }
    // Summed in milliseconds, reported in seconds.
    ms.by_state.values_mut().for_each(|t| *t /= 1000);
    ms.productive /= 1000;
    ms.unproductive /= 1000;
    Ok(ms)
}
