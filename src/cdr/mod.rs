//! Call history (CDRs) in an embedded SQLite database (`storage.data_dir/calls.sqlite`, WAL).
//!
//! One row per call, written when the call starts (`in_progress`), brought up to date at its
//! answer and recording, and completed when it ends; a call that a crash, a SIGKILL or a power
//! loss cut off is closed as `interrupted`, with its recording, at the next start. Writes go
//! through one writer thread in order ([`writer`]), reads through their own connection, so
//! neither waits on the other (WAL). Reads serve the CRM's HTTP API: a page of calls (newest
//! first, with an opaque cursor), one call, and per-agent statistics. No secret is ever stored.

pub mod disposition;
pub mod schema;
pub mod states;
pub mod webhooks;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::Serialize;

/// Why the call history cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CdrError {
    /// The database file cannot be opened or created.
    #[error(
        "cannot open the call history {path}: {source} (check storage.data_dir and its permissions)"
    )]
    Open {
        /// The file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// Its schema cannot be brought up to date.
    #[error("{source} ({path})")]
    Schema {
        /// The file.
        path: PathBuf,
        /// Why.
        source: schema::MigrateError,
    },
    /// A query failed.
    #[error("call history query failed: {0}")]
    Query(#[from] rusqlite::Error),
    /// The writer's queue is full (the disk is far behind): an update of a call in progress
    /// was dropped; its final row is still written.
    #[error("call history writer is behind: update dropped")]
    Behind,
    /// The blocking task died.
    #[error("call history task failed")]
    Task,
}

/// Now, in Unix milliseconds (the history's unit of time).
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `end_reason` of a call still going on.
pub const IN_PROGRESS: &str = "in_progress";
/// `end_reason` of a call cut off by a crash of callgate (closed at the next start).
pub const INTERRUPTED: &str = "interrupted";

/// One call.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CallRecord {
    /// callgate's call id (`c-...`).
    pub call_id: String,
    /// The SIP Call-ID of the call's (first) dialog.
    pub sip_call_id: String,
    /// The app whose token logged the agent in.
    pub app: String,
    /// The agent (`1001@sip.example.com`).
    pub agent: String,
    /// `inbound` or `outbound`.
    pub direction: String,
    /// Caller: the agent for outbound calls, the far party for inbound ones.
    pub from: String,
    /// Callee.
    pub to: String,
    /// When the call began (INVITE sent or received), Unix milliseconds.
    pub started_at: i64,
    /// When it was answered, if it was.
    pub answered_at: Option<i64>,
    /// When it ended; `None` while it goes on.
    pub ended_at: Option<i64>,
    /// Talk time in milliseconds (answer to end; 0 if unanswered).
    pub duration_ms: i64,
    /// Why it ended (the API's end reason codes).
    pub end_reason: String,
    /// The SIP status that ended it, if one did.
    pub sip_status: Option<u16>,
    /// Its reason phrase.
    pub sip_reason: Option<String>,
    /// Transfers: `transferred` (the agent transferred the far end), or
    /// `referred:<sip URI>` (the far end transferred the agent's call there).
    pub transfer: Option<String>,
    /// RTP packets sent to the SIP side.
    pub packets_sent: u64,
    /// RTP packets forwarded to the browser from the SIP side.
    pub packets_received: u64,
    /// Packets the SIP side sent that never arrived.
    pub packets_lost: u64,
    /// Interarrival jitter of the SIP side's stream, milliseconds.
    pub jitter_ms: f64,
    /// RTP packets callgate received from the page (its current connection).
    pub page_packets_received: u64,
    /// Packets the page sent that never arrived.
    pub page_packets_lost: u64,
    /// Interarrival jitter of the page's stream, milliseconds.
    pub page_jitter_ms: f64,
    /// The recording's name, if the call was recorded.
    pub recording: Option<String>,
    /// Its data fields (apps.toml `call_data`: a dialler's headers); empty if none.
    pub data: std::collections::BTreeMap<String, String>,
    /// What the CRM recorded about it (`code`, `notes`, `fields`, `updatedAt`), if anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disposition: Option<serde_json::Value>,
}

/// A page of calls.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page {
    /// Newest first.
    pub calls: Vec<CallRecord>,
    /// Pass as `cursor` for the next page; absent on the last one.
    #[serde(rename = "nextCursor", skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// Which calls to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only this app's calls.
    pub app: Option<String>,
    /// Only this agent's calls.
    pub agent: Option<String>,
    /// Started at or after (Unix ms).
    pub from: Option<i64>,
    /// Started before (Unix ms).
    pub to: Option<i64>,
}

/// Per-agent figures over a period.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    /// Inbound calls.
    pub calls_in: u64,
    /// Outbound calls.
    pub calls_out: u64,
    /// Calls answered (either direction).
    pub answered: u64,
    /// Inbound calls the caller gave up on before the answer.
    pub missed: u64,
    /// Total talk time, seconds.
    pub talk_time_secs: u64,
    /// Seconds logged in, by agent state (apps.toml `states`).
    pub state_secs: std::collections::BTreeMap<String, u64>,
    /// Seconds in productive states.
    pub productive_secs: u64,
    /// Seconds logged in, in the other states.
    pub unproductive_secs: u64,
}

const COLUMNS: &str = "call_id, sip_call_id, app, agent, direction, from_party, to_party, \
    started_at, answered_at, ended_at, duration_ms, end_reason, sip_status, sip_reason, transfer, \
    packets_sent, packets_received, packets_lost, jitter_ms, recording, call_data, \
    page_packets_received, page_packets_lost, page_jitter_ms";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CallRecord> {
    let u =
        |i: usize| -> rusqlite::Result<u64> { Ok(u64::try_from(r.get::<_, i64>(i)?).unwrap_or(0)) };
    Ok(CallRecord {
        call_id: r.get(0)?,
        sip_call_id: r.get(1)?,
        app: r.get(2)?,
        agent: r.get(3)?,
        direction: r.get(4)?,
        from: r.get(5)?,
        to: r.get(6)?,
        started_at: r.get(7)?,
        answered_at: r.get(8)?,
        ended_at: r.get(9)?,
        duration_ms: r.get(10)?,
        end_reason: r.get(11)?,
        sip_status: r.get(12)?,
        sip_reason: r.get(13)?,
        transfer: r.get(14)?,
        packets_sent: u(15)?,
        packets_received: u(16)?,
        packets_lost: u(17)?,
        jitter_ms: r.get(18)?,
        recording: r.get(19)?,
        data: r
            .get::<_, Option<String>>(20)?
            .and_then(|j| serde_json::from_str(&j).ok())
            .unwrap_or_default(),
        page_packets_received: u(21)?,
        page_packets_lost: u(22)?,
        page_jitter_ms: r.get(23)?,
        disposition: disposition(r.get(24)?, r.get(25)?),
    })
}

/// The stored disposition JSON with its time, as the API returns it.
fn disposition(json: Option<String>, at: Option<i64>) -> Option<serde_json::Value> {
    let mut v: serde_json::Value = serde_json::from_str(&json?).ok()?;
    if let (Some(o), Some(at)) = (v.as_object_mut(), at) {
        o.insert("updatedAt".into(), at.into());
    }
    Some(v)
}

/// The columns [`row`] reads, from the calls and their dispositions.
fn select() -> String {
    format!(
        "SELECT {COLUMNS}, d.disposition, d.updated_at FROM calls LEFT JOIN dispositions d USING (call_id)"
    )
}

/// A cursor is the last row's (started_at, call_id), hex-encoded so it stays opaque.
fn encode_cursor(started_at: i64, call_id: &str) -> String {
    hex::encode(format!("{started_at}:{call_id}"))
}

fn decode_cursor(c: &str) -> Option<(i64, String)> {
    let text = String::from_utf8(hex::decode(c).ok()?).ok()?;
    let (t, id) = text.split_once(':')?;
    Some((t.parse().ok()?, id.to_owned()))
}

/// The query for a page of [`CdrStore::list`]: only the filter's conditions, so SQLite picks
/// the index that serves them (by app, by agent, or by start), already in the page's order.
fn list_query(
    filter: &Filter,
    after: Option<(i64, String)>,
    limit: u32,
) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value;
    let mut conds = Vec::new();
    let mut args = Vec::new();
    let mut cond = |sql: &str, v: Value| {
        args.push(v);
        conds.push(sql.replace('?', &format!("?{}", args.len())));
    };
    if let Some(app) = &filter.app {
        cond("app = ?", Value::Text(app.clone()));
    }
    if let Some(agent) = &filter.agent {
        cond("agent = ?", Value::Text(agent.clone()));
    }
    if let Some(from) = filter.from {
        cond("started_at >= ?", Value::Integer(from));
    }
    if let Some(to) = filter.to {
        cond("started_at < ?", Value::Integer(to));
    }
    if let Some((t, id)) = after {
        cond("started_at <= ?", Value::Integer(t));
        let n = args.len();
        args.push(Value::Text(id));
        conds.push(format!("(started_at, call_id) < (?{n}, ?{})", n + 1));
    }
    let sql = format!(
        "{} {}{} ORDER BY started_at DESC, call_id DESC LIMIT {}",
        select(),
        if conds.is_empty() { "" } else { " WHERE " },
        conds.join(" AND "),
        i64::from(limit) + 1
    );
    (sql, args)
}

/// The call history.
#[derive(Clone)]
pub struct CdrStore {
    writes: tokio::sync::mpsc::Sender<writer::Job>,
    reader: Arc<Mutex<Connection>>,
    pending: Arc<AtomicUsize>,
    failures: Arc<AtomicU64>,
}

/// A call whose row is still to be written (see [`CdrStore::track`]).
pub struct Pending(Arc<AtomicUsize>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A write handed to the writer: await [`Queued::done`] to know it is on disk, or drop it.
pub struct Queued(Result<tokio::sync::oneshot::Receiver<Result<usize, CdrError>>, CdrError>);

impl Queued {
    /// Waits until the write is committed; the rows it touched.
    pub async fn done(self) -> Result<usize, CdrError> {
        self.0?.await.map_err(|_| CdrError::Task)?
    }
}

/// Most calls in one page.
pub const MAX_PAGE: u32 = 500;

impl CdrStore {
    /// Opens (creating and migrating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<CdrStore, CdrError> {
        CdrStore::open_with(path, Duration::from_secs(5))
    }

    /// [`open`](Self::open), waiting at most `busy` for another process's lock per attempt.
    pub fn open_with(path: &Path, busy: Duration) -> Result<CdrStore, CdrError> {
        let open_err = |source| CdrError::Open {
            path: path.to_owned(),
            source,
        };
        let mut db = Connection::open(path).map_err(open_err)?;
        db.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        // WAL + NORMAL: a committed row survives a crash of callgate (not of the machine's
        // power, which FULL would cover at a cost per write).
        db.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        db.busy_timeout(busy).map_err(open_err)?;
        schema::migrate(&mut db).map_err(|source| CdrError::Schema {
            path: path.to_owned(),
            source,
        })?;
        let reader = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(open_err)?;
        reader.busy_timeout(busy).map_err(open_err)?;
        let failures = Arc::new(AtomicU64::new(0));
        let writes = writer::spawn(db, failures.clone()).map_err(|_| CdrError::Task)?;
        Ok(CdrStore {
            writes,
            reader: Arc::new(Mutex::new(reader)),
            pending: Arc::new(AtomicUsize::new(0)),
            failures,
        })
    }

    fn lock(db: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
        db.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs a read on the reading connection.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    ) -> Result<T, CdrError> {
        let db = self.reader.clone();
        tokio::task::spawn_blocking(move || f(&CdrStore::lock(&db)))
            .await
            .map_err(|_| CdrError::Task)?
            .map_err(CdrError::Query)
    }

    /// Failed write attempts so far (each retry counts).
    pub fn write_failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Counts a call in progress until the guard is dropped (after its row is written), so
    /// [`flush`](Self::flush) can wait for it.
    pub fn track(&self) -> Pending {
        self.pending.fetch_add(1, Ordering::Relaxed);
        Pending(self.pending.clone())
    }

    /// Queues `op` unless the queue is full (counted as a failed write).
    fn queue(&self, op: writer::Op) -> Queued {
        let (done, rx) = tokio::sync::oneshot::channel();
        let job = writer::Job {
            op,
            done,
            pending: None,
        };
        match self.writes.try_send(job) {
            Ok(()) => Queued(Ok(rx)),
            Err(_) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                Queued(Err(CdrError::Behind))
            }
        }
    }

    /// A call began: its row (`end_reason` [`IN_PROGRESS`], no `ended_at`).
    pub fn started(&self, c: CallRecord) -> Queued {
        self.queue(writer::Op::Start(Box::new(c)))
    }

    /// Call `call_id` was answered at `at` (Unix ms).
    pub fn answered(&self, call_id: &str, at: i64) -> Queued {
        self.queue(writer::Op::Answered {
            call_id: call_id.to_owned(),
            at,
        })
    }

    /// Call `call_id` is being recorded to `name`.
    pub fn recording(&self, call_id: &str, name: &str) -> Queued {
        self.queue(writer::Op::Recording {
            call_id: call_id.to_owned(),
            name: name.to_owned(),
        })
    }

    /// An agent's state changed (or its last session ended): closes its open row in the
    /// agent-state log and opens the next.
    pub fn agent_state(&self, entry: states::StateEntry) -> Queued {
        self.queue(writer::Op::State(Box::new(entry)))
    }

    /// Records a finished call (its whole row, in one transaction), waiting for room in the
    /// queue rather than dropping it; `pending` is released once it is written.
    pub async fn finished(&self, c: CallRecord, pending: Option<Pending>) -> Result<(), CdrError> {
        self.submit(writer::Op::Final(Box::new(c)), pending)
            .await
            .map(|_| ())
    }

    /// Merges the CRM's disposition `patch` (a checked JSON Merge Patch, see
    /// [`disposition::check`]) into call `call_id`'s, at `at` (Unix ms). `false`: nothing was
    /// written (no such call, or the result would keep more than
    /// [`disposition::MAX_FIELDS`] fields).
    pub async fn dispose(&self, call_id: &str, patch: &str, at: i64) -> Result<bool, CdrError> {
        let op = writer::Op::Dispose {
            call_id: call_id.to_owned(),
            patch: patch.to_owned(),
            at,
        };
        self.submit(op, None).await.map(|n| n > 0)
    }

    /// An event for an app's webhook: kept until [`webhook_done`](Self::webhook_done).
    pub fn webhook_queued(&self, row: webhooks::WebhookRow) -> Queued {
        self.queue(writer::Op::WebhookQueued(Box::new(row)))
    }

    /// The webhook event `seq` is delivered or given up.
    pub fn webhook_done(&self, seq: i64) -> Queued {
        self.queue(writer::Op::WebhookDone { seq })
    }

    /// The webhook events still queued, in order (at start-up, to send them).
    pub async fn webhook_pending(&self) -> Result<Vec<webhooks::WebhookRow>, CdrError> {
        self.with(webhooks::pending).await
    }

    /// Records a finished call.
    pub async fn insert(&self, c: CallRecord) -> Result<(), CdrError> {
        self.finished(c, None).await
    }

    /// At start-up: closes the rows of calls that were going on when callgate last stopped
    /// without ending them (a crash, a SIGKILL, a power loss) as [`INTERRUPTED`], each with
    /// its recording if one is in `recordings`, and the agent-state rows of agents then logged
    /// in at the last moment known of them. Returns how many calls.
    pub async fn close_interrupted(&self, recordings: Option<PathBuf>) -> Result<usize, CdrError> {
        self.submit(writer::Op::CloseInterrupted { recordings }, None)
            .await
    }

    /// Queues `op`, waiting for room, and waits until it is written.
    async fn submit(&self, op: writer::Op, pending: Option<Pending>) -> Result<usize, CdrError> {
        let (done, rx) = tokio::sync::oneshot::channel();
        let job = writer::Job { op, done, pending };
        self.writes.send(job).await.map_err(|_| CdrError::Task)?;
        rx.await.map_err(|_| CdrError::Task)?
    }

    /// Waits (up to `limit`) until every tracked call has its row and every write queued so
    /// far is done: at shutdown, so no history is lost when the process exits.
    pub async fn flush(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.pending.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // And what was queued without being tracked (agents' last state changes).
        let _ = tokio::time::timeout_at(deadline, self.submit(writer::Op::Barrier, None)).await;
    }

    /// The apps with recorded calls of `agent` (the same address may be an agent of several
    /// apps, each seeing only its own calls).
    pub async fn apps_of(&self, agent: &str) -> Result<Vec<String>, CdrError> {
        let agent = agent.to_owned();
        self.with(move |db| {
            let mut q = db.prepare_cached(
                "SELECT app FROM calls WHERE agent = ?1
                 UNION SELECT app FROM agent_states WHERE agent = ?1",
            )?;
            let apps = q.query_map(params![agent], |r| r.get(0))?;
            apps.collect()
        })
        .await
    }

    /// One call.
    pub async fn get(&self, call_id: &str) -> Result<Option<CallRecord>, CdrError> {
        let id = call_id.to_owned();
        self.with(move |db| {
            db.query_row(
                &format!("{} WHERE call_id = ?1", select()),
                params![id],
                row,
            )
            .optional()
        })
        .await
    }

    /// `agent`'s agent-state log over [`from`, `to`) in `app` (`None`: every app), oldest
    /// first, `limit` (1 to [`MAX_PAGE`]) after `cursor`; `None` if the cursor is not ours.
    pub async fn state_log(
        &self,
        (app, agent): (Option<&str>, &str),
        (from, to): (Option<i64>, Option<i64>),
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<Option<states::StatePage>, CdrError> {
        let after = match cursor.map(str::parse::<i64>) {
            None => 0,
            Some(Ok(a)) if a >= 0 => a,
            Some(_) => return Ok(None),
        };
        let (app, agent) = (app.map(str::to_owned), agent.to_owned());
        let now = unix_ms();
        self.with(move |db| {
            states::list(
                db,
                (app.as_deref(), &agent),
                (from, to),
                (after, limit),
                now,
            )
            .map(Some)
        })
        .await
    }

    /// Calls matching `filter`, newest first, `limit` (1 to [`MAX_PAGE`]) after `cursor`.
    /// `None` if the cursor is not one of ours.
    pub async fn list(
        &self,
        filter: Filter,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<Option<Page>, CdrError> {
        let after = match cursor {
            Some(c) => match decode_cursor(c) {
                Some(a) => Some(a),
                None => return Ok(None),
            },
            None => None,
        };
        let limit = limit.clamp(1, MAX_PAGE);
        self.with(move |db| {
            let (sql, args) = list_query(&filter, after, limit);
            let calls = db
                .prepare_cached(&sql)?
                .query_map(rusqlite::params_from_iter(args), row)?
                .collect::<Result<Vec<_>, _>>()?;
            let mut calls = calls;
            let more = calls.len() > limit as usize;
            calls.truncate(limit as usize);
            let next_cursor = if more {
                calls
                    .last()
                    .map(|c| encode_cursor(c.started_at, &c.call_id))
            } else {
                None
            };
            Ok(Some(Page { calls, next_cursor }))
        })
        .await
    }

    /// `agent`'s figures for calls started in [`from`, `to`) (Unix ms; `None`: unbounded), in
    /// `app` only (`None`: every app's calls of that address, for an admin).
    pub async fn stats(
        &self,
        app: Option<&str>,
        agent: &str,
        from: Option<i64>,
        to: Option<i64>,
    ) -> Result<Stats, CdrError> {
        let agent = agent.to_owned();
        let app = app.map(str::to_owned);
        let now = unix_ms();
        self.with(move |db| {
            let times = states::times(db, app.as_deref(), &agent, (from, to), now)?;
            db.query_row(
                "SELECT
                    COALESCE(SUM(direction = 'inbound'), 0),
                    COALESCE(SUM(direction = 'outbound'), 0),
                    COALESCE(SUM(answered_at IS NOT NULL), 0),
                    COALESCE(SUM(end_reason = 'missed'), 0),
                    COALESCE(SUM(duration_ms), 0)
                 FROM calls WHERE agent = ?1
                   AND (?2 IS NULL OR started_at >= ?2) AND (?3 IS NULL OR started_at < ?3)
                   AND (?4 IS NULL OR app = ?4)",
                params![agent, from, to, app],
                |r| {
                    let u = |i: usize| -> rusqlite::Result<u64> {
                        Ok(u64::try_from(r.get::<_, i64>(i)?).unwrap_or(0))
                    };
                    Ok(Stats {
                        calls_in: u(0)?,
                        calls_out: u(1)?,
                        answered: u(2)?,
                        missed: u(3)?,
                        talk_time_secs: u(4)? / 1000,
                        state_secs: times.by_state.clone(),
                        productive_secs: times.productive,
                        unproductive_secs: times.unproductive,
                    })
                },
            )
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, agent: &str, started_at: i64, direction: &str, reason: &str) -> CallRecord {
        let answered = reason != "missed" && reason != "failed";
        CallRecord {
            call_id: id.into(),
            sip_call_id: format!("{id}@callgate"),
            app: "crm".into(),
            agent: agent.into(),
            direction: direction.into(),
            from: agent.into(),
            to: "1002".into(),
            started_at,
            answered_at: answered.then_some(started_at + 1000),
            ended_at: Some(started_at + 61_000),
            duration_ms: if answered { 60_000 } else { 0 },
            end_reason: reason.into(),
            sip_status: (!answered).then_some(487),
            sip_reason: None,
            transfer: None,
            packets_sent: 3000,
            packets_received: 2990,
            packets_lost: 10,
            jitter_ms: 1.5,
            page_packets_received: 0,
            page_packets_lost: 0,
            page_jitter_ms: 0.0,
            recording: None,
            data: Default::default(),
            disposition: None,
        }
    }

    /// A disposition is merged patch by patch (null removes), kept apart from the call's row
    /// (its end rewrites the row and keeps it), listed with the call, and refused for an
    /// unknown call or past the field limit.
    #[tokio::test]
    async fn a_disposition_is_merged_kept_across_the_calls_end_and_listed() {
        use serde_json::json;
        let store = CdrStore::open(&temp_db()).unwrap();
        let mut live = record("c-1", "1001@pbx", 100, "inbound", IN_PROGRESS);
        live.ended_at = None;
        store.started(live);
        let patch = |v: serde_json::Value| v.to_string();
        let first =
            json!({"code": "callback", "notes": "Busy, call at 5", "fields": {"orderId": "O-1"}});
        assert!(store.dispose("c-1", &patch(first), 200).await.unwrap());
        let second =
            json!({"code": "sale", "notes": null, "fields": {"plan": "yearly", "orderId": null}});
        assert!(store.dispose("c-1", &patch(second), 300).await.unwrap());
        // The call ends after: its row is written whole again.
        store
            .insert(record("c-1", "1001@pbx", 100, "inbound", "remote_hangup"))
            .await
            .unwrap();
        let want = json!({"code": "sale", "fields": {"plan": "yearly"}, "updatedAt": 300});
        let got = store.get("c-1").await.unwrap().unwrap();
        assert_eq!(got.disposition, Some(want.clone()));
        assert_eq!(got.end_reason, "remote_hangup");
        let page = store
            .list(Filter::default(), 10, None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(page.calls[0].disposition, Some(want));
        // No such call: nothing written.
        assert!(
            !store
                .dispose("c-none", "{\"code\": \"x\"}", 400)
                .await
                .unwrap()
        );
        // More fields than kept, over several patches: refused, the stored one unchanged.
        let many: serde_json::Map<String, serde_json::Value> = (0..disposition::MAX_FIELDS)
            .map(|i| (format!("f{i}"), json!("v")))
            .collect();
        let refused = json!({ "fields": many });
        assert!(!store.dispose("c-1", &patch(refused), 500).await.unwrap());
        let got = store.get("c-1").await.unwrap().unwrap();
        assert_eq!(got.disposition.unwrap()["updatedAt"], 300);
    }

    fn temp_db() -> PathBuf {
        std::env::temp_dir().join(format!(
            "callgate-cdr-{}.sqlite",
            crate::rand::hex::<8>().unwrap()
        ))
    }

    #[tokio::test]
    async fn rows_survive_reopening_and_page_newest_first() {
        let path = temp_db();
        let store = CdrStore::open(&path).unwrap();
        for i in 0..5 {
            store
                .insert(record(
                    &format!("c-{i}"),
                    "1001@pbx",
                    1_000 * i,
                    "outbound",
                    "local_hangup",
                ))
                .await
                .unwrap();
        }
        store
            .insert(record("c-x", "1002@pbx", 2_500, "inbound", "missed"))
            .await
            .unwrap();
        drop(store);
        let store = CdrStore::open(&path).unwrap();
        assert_eq!(
            store.get("c-3").await.unwrap().unwrap(),
            record("c-3", "1001@pbx", 3_000, "outbound", "local_hangup")
        );
        assert_eq!(store.get("c-none").await.unwrap(), None);
        let f = Filter {
            agent: Some("1001@pbx".into()),
            ..Filter::default()
        };
        let p1 = store.list(f.clone(), 2, None).await.unwrap().unwrap();
        let ids: Vec<_> = p1.calls.iter().map(|c| c.call_id.as_str()).collect();
        assert_eq!(ids, ["c-4", "c-3"]);
        let p2 = store
            .list(f.clone(), 2, p1.next_cursor.as_deref())
            .await
            .unwrap()
            .unwrap();
        let p3 = store
            .list(f.clone(), 2, p2.next_cursor.as_deref())
            .await
            .unwrap()
            .unwrap();
        let ids: Vec<_> = p2
            .calls
            .iter()
            .chain(&p3.calls)
            .map(|c| c.call_id.as_str())
            .collect();
        assert_eq!(ids, ["c-2", "c-1", "c-0"]);
        assert_eq!(p3.next_cursor, None);
        assert_eq!(store.list(f, 2, Some("zz")).await.unwrap(), None);
        let window = Filter {
            from: Some(1_000),
            to: Some(3_000),
            ..Filter::default()
        };
        let ids: Vec<_> = store
            .list(window, 50, None)
            .await
            .unwrap()
            .unwrap()
            .calls
            .into_iter()
            .map(|c| c.call_id)
            .collect();
        assert_eq!(ids, ["c-x", "c-2", "c-1"]);
        let s = store.stats(None, "1001@pbx", None, None).await.unwrap();
        assert_eq!(
            s,
            Stats {
                calls_in: 0,
                calls_out: 5,
                answered: 5,
                missed: 0,
                talk_time_secs: 300,
                ..Stats::default()
            }
        );
        let s = store
            .stats(None, "1002@pbx", Some(0), Some(10_000))
            .await
            .unwrap();
        assert_eq!((s.calls_in, s.missed, s.answered), (1, 1, 0));
        // Per app: the same address in another app has none of these calls.
        assert_eq!(store.apps_of("1001@pbx").await.unwrap(), ["crm"]);
        assert!(store.apps_of("nobody@pbx").await.unwrap().is_empty());
        let mine = store
            .stats(Some("crm"), "1001@pbx", None, None)
            .await
            .unwrap();
        assert_eq!(mine.calls_out, 5);
        let theirs = store
            .stats(Some("erp"), "1001@pbx", None, None)
            .await
            .unwrap();
        assert_eq!(theirs, Stats::default());
        for ext in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{ext}", path.display()));
        }
    }

    fn remove_db(path: &Path) {
        for ext in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{ext}", path.display()));
        }
    }

    fn in_progress(id: &str, started_at: i64) -> CallRecord {
        CallRecord {
            answered_at: None,
            ended_at: None,
            duration_ms: 0,
            end_reason: IN_PROGRESS.into(),
            sip_status: None,
            packets_sent: 0,
            packets_received: 0,
            packets_lost: 0,
            jitter_ms: 0.0,
            page_packets_received: 0,
            page_packets_lost: 0,
            page_jitter_ms: 0.0,
            ..record(id, "1001@pbx", started_at, "outbound", "local_hangup")
        }
    }

    /// A call cut off by a crash keeps its row: written at the start, updated at the answer
    /// and the recording, closed as interrupted at the next start with its recording (and the
    /// recording's last write as its end); finished calls are left alone.
    #[tokio::test]
    async fn a_call_cut_off_is_closed_as_interrupted_at_the_next_start() {
        let path = temp_db();
        let recordings =
            std::env::temp_dir().join(format!("callgate-rec-{}", crate::rand::hex::<8>().unwrap()));
        std::fs::create_dir_all(&recordings).unwrap();
        let store = CdrStore::open(&path).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let t0 = now - 60_000;
        for (id, recorded) in [("c-0a", true), ("c-0b", false), ("c-0c", false)] {
            store.started(in_progress(id, t0)).done().await.unwrap();
            store.answered(id, t0 + 2_000).done().await.unwrap();
            if recorded {
                store.recording(id, "c-0a.wav").done().await.unwrap();
            }
        }
        store
            .insert(record("c-done", "1001@pbx", t0, "outbound", "local_hangup"))
            .await
            .unwrap();
        // The recording of c-0a, written until shortly before the crash; c-0c's recording
        // began but its row was not updated before the crash.
        std::fs::write(recordings.join("c-0a.wav"), b"RIFF").unwrap();
        std::fs::write(recordings.join("c-0c.wav"), b"RIFF").unwrap();
        let open = store.get("c-0a").await.unwrap().unwrap();
        assert_eq!(
            (open.end_reason.as_str(), open.ended_at),
            (IN_PROGRESS, None)
        );
        assert_eq!(open.answered_at, Some(t0 + 2_000));
        // The process dies: nothing else is written. At the next start:
        drop(store);
        let store = CdrStore::open(&path).unwrap();
        assert_eq!(
            store
                .close_interrupted(Some(recordings.clone()))
                .await
                .unwrap(),
            3
        );
        let rec = store.get("c-0a").await.unwrap().unwrap();
        assert_eq!(rec.end_reason, INTERRUPTED);
        assert_eq!(rec.recording.as_deref(), Some("c-0a.wav"));
        let ended = rec.ended_at.unwrap();
        assert!(
            ended >= now - 1_000,
            "ended when its recording was last written: {rec:?}"
        );
        assert_eq!(rec.duration_ms, ended - (t0 + 2_000));
        let file = store.get("c-0c").await.unwrap().unwrap();
        assert_eq!(
            file.recording.as_deref(),
            Some("c-0c.wav"),
            "found by its call id"
        );
        let norec = store.get("c-0b").await.unwrap().unwrap();
        assert_eq!(norec.end_reason, INTERRUPTED);
        assert_eq!((norec.ended_at, norec.duration_ms), (Some(t0 + 2_000), 0));
        assert_eq!(norec.recording, None);
        assert_eq!(
            store.get("c-done").await.unwrap().unwrap().end_reason,
            "local_hangup"
        );
        // A second start finds nothing open.
        assert_eq!(
            store
                .close_interrupted(Some(recordings.clone()))
                .await
                .unwrap(),
            0
        );
        // A final row that comes after the start wins over it; a start that comes late is ignored.
        store
            .insert(record("c-late", "1001@pbx", t0, "outbound", "local_hangup"))
            .await
            .unwrap();
        store
            .started(in_progress("c-late", t0))
            .done()
            .await
            .unwrap();
        assert_eq!(
            store.get("c-late").await.unwrap().unwrap().end_reason,
            "local_hangup"
        );
        let _ = std::fs::remove_dir_all(&recordings);
        remove_db(&path);
    }

    /// A history from before schema versioning (ended_at NOT NULL, no app index) is migrated
    /// in place with its rows; one from a newer callgate is refused untouched.
    #[tokio::test]
    async fn an_old_history_is_migrated_and_a_newer_one_refused() {
        let path = temp_db();
        {
            let db = Connection::open(&path).unwrap();
            db.execute_batch(schema_v1_for_tests()).unwrap();
            db.execute(
                &format!(
                    "INSERT INTO calls ({}) VALUES ('c-old', 's', 'crm', '1001@pbx', 'outbound', 'a', 'b', 5, 6, 70, 64, 'local_hangup', NULL, NULL, NULL, 1, 2, 0, 0.5, NULL)",
                    // The first schema's columns.
                    COLUMNS.split(", call_data").next().unwrap()
                ),
                [],
            )
            .unwrap();
        }
        let store = CdrStore::open(&path).unwrap();
        let old = store.get("c-old").await.unwrap().unwrap();
        assert_eq!((old.ended_at, old.duration_ms), (Some(70), 64));
        store
            .started(in_progress("c-new", 100))
            .done()
            .await
            .unwrap();
        assert_eq!(store.get("c-new").await.unwrap().unwrap().ended_at, None);
        drop(store);
        let db = Connection::open(&path).unwrap();
        let v: i64 = db
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, schema::VERSION);
        // The CRM's listing by app uses the (app, start) index, in the page's order.
        let filter = Filter {
            app: Some("crm".into()),
            from: Some(0),
            ..Filter::default()
        };
        let (sql, args) = list_query(&filter, Some((100, "c-new".into())), 50);
        let plan: Vec<String> = db
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap()
            .query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(plan.iter().any(|p| p.contains("calls_by_app")), "{plan:?}");
        assert!(!plan.iter().any(|p| p.contains("TEMP B-TREE")), "{plan:?}");
        db.pragma_update(None, "user_version", schema::VERSION + 1)
            .unwrap();
        drop(db);
        let e = CdrStore::open(&path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("newer than this callgate"), "{e}");
        remove_db(&path);
    }

    fn schema_v1_for_tests() -> &'static str {
        "CREATE TABLE calls (call_id TEXT PRIMARY KEY, sip_call_id TEXT NOT NULL, app TEXT NOT NULL,
            agent TEXT NOT NULL, direction TEXT NOT NULL, from_party TEXT NOT NULL, to_party TEXT NOT NULL,
            started_at INTEGER NOT NULL, answered_at INTEGER, ended_at INTEGER NOT NULL,
            duration_ms INTEGER NOT NULL, end_reason TEXT NOT NULL, sip_status INTEGER, sip_reason TEXT,
            transfer TEXT, packets_sent INTEGER NOT NULL, packets_received INTEGER NOT NULL,
            packets_lost INTEGER NOT NULL, jitter_ms REAL NOT NULL, recording TEXT);
         CREATE INDEX calls_by_agent ON calls (agent, started_at);
         CREATE INDEX calls_by_start ON calls (started_at);"
    }

    /// A write that meets a locked database (a backup, another process) is counted and tried
    /// again, and lands once the lock is gone, instead of being lost after one try.
    #[tokio::test]
    async fn a_failed_write_is_counted_and_retried() {
        let path = temp_db();
        let store = CdrStore::open_with(&path, Duration::from_millis(100)).unwrap();
        let (locked_tx, locked) = std::sync::mpsc::channel();
        let holder = {
            let path = path.clone();
            std::thread::spawn(move || {
                let db = Connection::open(&path).unwrap();
                db.execute_batch("BEGIN EXCLUSIVE").unwrap();
                locked_tx.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(1_000));
                db.execute_batch("COMMIT").unwrap();
            })
        };
        locked.recv().unwrap();
        let row = record("c-retry", "1001@pbx", 1, "outbound", "local_hangup");
        store.insert(row.clone()).await.unwrap();
        holder.join().unwrap();
        assert!(
            store.write_failures() >= 1,
            "the locked attempts are counted"
        );
        assert_eq!(store.get("c-retry").await.unwrap(), Some(row));
        remove_db(&path);
    }

    /// Reads have their own connection: a long read (here, one holding the reader and an open
    /// read transaction) does not hold up the calls' writes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_read_does_not_hold_up_writes() {
        let path = temp_db();
        let store = CdrStore::open(&path).unwrap();
        store
            .insert(record("c-1", "1001@pbx", 1, "outbound", "local_hangup"))
            .await
            .unwrap();
        let reader = store.reader.clone();
        let (held_tx, held) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let long_read = std::thread::spawn(move || {
            let db = CdrStore::lock(&reader);
            db.execute_batch("BEGIN").unwrap();
            let n: i64 = db
                .query_row("SELECT count(*) FROM calls", [], |r| r.get(0))
                .unwrap();
            held_tx.send(n).unwrap();
            let _ = released.recv_timeout(Duration::from_secs(10));
            db.execute_batch("COMMIT").unwrap();
        });
        assert_eq!(held.recv().unwrap(), 1);
        let row = record("c-2", "1001@pbx", 2, "outbound", "local_hangup");
        let written = tokio::time::timeout(Duration::from_secs(3), store.insert(row)).await;
        release.send(()).unwrap();
        long_read.join().unwrap();
        written.expect("the write waited for the read").unwrap();
        assert!(store.get("c-2").await.unwrap().is_some());
        remove_db(&path);
    }

    #[tokio::test]
    async fn time_in_each_state_is_cut_to_the_period_and_closed_after_a_crash() {
        use states::{Entered, StateEntry};
        let path = temp_db();
        let store = CdrStore::open(&path).unwrap();
        let change = |agent: &str, at: i64, state: Option<(&str, bool)>| StateEntry {
            app: "crm".into(),
            agent: agent.into(),
            at,
            entered: state.map(|(s, productive)| Entered {
                state: s.into(),
                productive,
                cause: "requested".into(),
            }),
        };
        // 1001: available 0-60 s, paused 60-90 s, available 90-150 s, logged out at 150 s.
        for e in [
            change("1001@pbx", 0, Some(("available", true))),
            change("1001@pbx", 60_000, Some(("paused", false))),
            change("1001@pbx", 90_000, Some(("available", true))),
            change("1001@pbx", 150_000, None),
            change("1002@pbx", 10_000, Some(("paused", false))),
        ] {
            store.agent_state(e).done().await.unwrap();
        }
        let all = store.stats(None, "1001@pbx", None, None).await.unwrap();
        assert_eq!(
            all.state_secs,
            [("available".to_owned(), 120), ("paused".to_owned(), 30)].into()
        );
        assert_eq!((all.productive_secs, all.unproductive_secs), (120, 30));
        // A period cuts the stretches it overlaps: 50-100 s.
        let part = store
            .stats(Some("crm"), "1001@pbx", Some(50_000), Some(100_000))
            .await
            .unwrap();
        assert_eq!(
            part.state_secs,
            [("available".to_owned(), 20), ("paused".to_owned(), 30)].into()
        );
        // The log itself, oldest first, in pages; a period keeps the stretches it overlaps.
        let page = store
            .state_log((Some("crm"), "1001@pbx"), (None, None), 2, None)
            .await
            .unwrap()
            .unwrap();
        let ids: Vec<(&str, i64, Option<i64>)> = page
            .states
            .iter()
            .map(|s| (s.state.as_str(), s.started_at, s.ended_at))
            .collect();
        assert_eq!(
            ids,
            [
                ("available", 0, Some(60_000)),
                ("paused", 60_000, Some(90_000))
            ]
        );
        let rest = store
            .state_log(
                (None, "1001@pbx"),
                (None, None),
                2,
                page.next_cursor.as_deref(),
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rest.states.len(), 1);
        assert_eq!(rest.states[0].started_at, 90_000);
        assert!(rest.next_cursor.is_none());
        let part = store
            .state_log((None, "1001@pbx"), (Some(61_000), Some(89_000)), 10, None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(part.states.len(), 1);
        assert_eq!(part.states[0].state, "paused");
        assert!(
            store
                .state_log((None, "1001@pbx"), (None, None), 10, Some("not-a-cursor"))
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            store
                .state_log((Some("other"), "1001@pbx"), (None, None), 10, None)
                .await
                .unwrap()
                .unwrap()
                .states
                .is_empty()
        );
        // An agent with state rows and no calls is known to the history.
        assert_eq!(store.apps_of("1002@pbx").await.unwrap(), ["crm"]);
        // Another app's agent of the same address has none of them.
        let other = store
            .stats(Some("other"), "1001@pbx", None, None)
            .await
            .unwrap();
        assert!(other.state_secs.is_empty(), "{other:?}");

        // 1002 is still paused when callgate dies; its last call ended at 70 s. The next
        // start closes the stretch there, not at the start's own time.
        let mut call = record("c-9", "1002@pbx", 20_000, "inbound", "remote_hangup");
        call.ended_at = Some(70_000);
        store.insert(call).await.unwrap();
        drop(store);
        let store = CdrStore::open(&path).unwrap();
        store.close_interrupted(None).await.unwrap();
        let s = store.stats(None, "1002@pbx", None, None).await.unwrap();
        assert_eq!(s.state_secs, [("paused".to_owned(), 60)].into());
        assert_eq!((s.productive_secs, s.unproductive_secs), (0, 60));
        remove_db(&path);
    }
}
