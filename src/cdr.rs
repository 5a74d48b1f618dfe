//! Call history (CDRs) in an embedded SQLite database (`storage.data_dir/calls.sqlite`, WAL).
//!
//! One row per call, written when the call ends, in its own transaction: a crash of callgate
//! loses no finished call. Reads serve the CRM's HTTP API: a page of calls (newest first, with
//! an opaque cursor), one call, and per-agent statistics. No secret is ever stored.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
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
    /// A query failed.
    #[error("call history query failed: {0}")]
    Query(#[from] rusqlite::Error),
    /// The blocking task died.
    #[error("call history task failed")]
    Task,
}

/// One finished call.
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
    /// When it ended.
    pub ended_at: i64,
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
    /// The recording's name, if the call was recorded.
    pub recording: Option<String>,
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
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS calls (
    call_id TEXT PRIMARY KEY,
    sip_call_id TEXT NOT NULL,
    app TEXT NOT NULL,
    agent TEXT NOT NULL,
    direction TEXT NOT NULL,
    from_party TEXT NOT NULL,
    to_party TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    answered_at INTEGER,
    ended_at INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    end_reason TEXT NOT NULL,
    sip_status INTEGER,
    sip_reason TEXT,
    transfer TEXT,
    packets_sent INTEGER NOT NULL,
    packets_received INTEGER NOT NULL,
    packets_lost INTEGER NOT NULL,
    jitter_ms REAL NOT NULL,
    recording TEXT
);
CREATE INDEX IF NOT EXISTS calls_by_agent ON calls (agent, started_at);
CREATE INDEX IF NOT EXISTS calls_by_start ON calls (started_at);
";

const COLUMNS: &str = "call_id, sip_call_id, app, agent, direction, from_party, to_party, \
    started_at, answered_at, ended_at, duration_ms, end_reason, sip_status, sip_reason, transfer, \
    packets_sent, packets_received, packets_lost, jitter_ms, recording";

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
    })
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

/// The call history.
#[derive(Clone)]
pub struct CdrStore {
    db: Arc<Mutex<Connection>>,
    pending: Arc<AtomicUsize>,
}

/// A call whose row is still to be written (see [`CdrStore::track`]).
pub struct Pending(Arc<AtomicUsize>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Most calls in one page.
pub const MAX_PAGE: u32 = 500;

impl CdrStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<CdrStore, CdrError> {
        let open_err = |source| CdrError::Open {
            path: path.to_owned(),
            source,
        };
        let db = Connection::open(path).map_err(open_err)?;
        db.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        // WAL + NORMAL: a committed call survives a crash of callgate (not of the machine's
        // power, which FULL would cover at a cost per call).
        db.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        db.busy_timeout(Duration::from_secs(5)).map_err(open_err)?;
        db.execute_batch(SCHEMA).map_err(open_err)?;
        Ok(CdrStore {
            db: Arc::new(Mutex::new(db)),
            pending: Arc::new(AtomicUsize::new(0)),
        })
    }

    fn lock(db: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
        db.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    ) -> Result<T, CdrError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&CdrStore::lock(&db)))
            .await
            .map_err(|_| CdrError::Task)?
            .map_err(CdrError::Query)
    }

    /// Counts a call in progress until the guard is dropped (after its row is written), so
    /// [`flush`](Self::flush) can wait for it.
    pub fn track(&self) -> Pending {
        self.pending.fetch_add(1, Ordering::Relaxed);
        Pending(self.pending.clone())
    }

    /// Records a finished call (one transaction).
    pub async fn insert(&self, c: CallRecord) -> Result<(), CdrError> {
        self
            .with(move |db| {
                db.execute(
                    &format!(
                        "INSERT OR REPLACE INTO calls ({COLUMNS}) VALUES \
                         (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)"
                    ),
                    params![
                        c.call_id,
                        c.sip_call_id,
                        c.app,
                        c.agent,
                        c.direction,
                        c.from,
                        c.to,
                        c.started_at,
                        c.answered_at,
                        c.ended_at,
                        c.duration_ms,
                        c.end_reason,
                        c.sip_status,
                        c.sip_reason,
                        c.transfer,
                        i64::try_from(c.packets_sent).unwrap_or(i64::MAX),
                        i64::try_from(c.packets_received).unwrap_or(i64::MAX),
                        i64::try_from(c.packets_lost).unwrap_or(i64::MAX),
                        c.jitter_ms,
                        c.recording,
                    ],
                )
                .map(|_| ())
            })
            .await
    }

    /// Waits (up to `limit`) until every tracked call has its row: at shutdown, so no call's
    /// history is lost when the process exits.
    pub async fn flush(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.pending.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The apps with recorded calls of `agent` (the same address may be an agent of several
    /// apps, each seeing only its own calls).
    pub async fn apps_of(&self, agent: &str) -> Result<Vec<String>, CdrError> {
        let agent = agent.to_owned();
        self.with(move |db| {
            let mut q = db.prepare_cached("SELECT DISTINCT app FROM calls WHERE agent = ?1")?;
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
                &format!("SELECT {COLUMNS} FROM calls WHERE call_id = ?1"),
                params![id],
                row,
            )
            .optional()
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
            let (after_t, after_id) = after.unwrap_or((i64::MAX, String::new()));
            let mut stmt = db.prepare(&format!(
                "SELECT {COLUMNS} FROM calls
                 WHERE (?1 IS NULL OR app = ?1) AND (?2 IS NULL OR agent = ?2)
                   AND (?3 IS NULL OR started_at >= ?3) AND (?4 IS NULL OR started_at < ?4)
                   AND (started_at < ?5 OR (started_at = ?5 AND call_id < ?6))
                 ORDER BY started_at DESC, call_id DESC LIMIT ?7"
            ))?;
            let calls = stmt
                .query_map(
                    params![
                        filter.app,
                        filter.agent,
                        filter.from,
                        filter.to,
                        after_t,
                        if after_id.is_empty() {
                            "\u{10ffff}".to_owned()
                        } else {
                            after_id
                        },
                        i64::from(limit) + 1,
                    ],
                    row,
                )?
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
        self.with(move |db| {
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
            ended_at: started_at + 61_000,
            duration_ms: if answered { 60_000 } else { 0 },
            end_reason: reason.into(),
            sip_status: (!answered).then_some(487),
            sip_reason: None,
            transfer: None,
            packets_sent: 3000,
            packets_received: 2990,
            packets_lost: 10,
            jitter_ms: 1.5,
            recording: None,
        }
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
                talk_time_secs: 300
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
}
