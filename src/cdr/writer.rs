//! The history's one writer: a thread that owns the writing connection and takes writes in
//! order from a queue, so a call never waits on the disk and a slow read never holds up a
//! write. A failed write is counted and tried again after a pause (the disk full for a moment,
//! a backup holding a lock); one that keeps failing is logged with its call id, and a row left
//! open that way is closed as `interrupted` at the next start.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::{Connection, params};
use tokio::sync::{mpsc, oneshot};

use super::{COLUMNS, CallRecord, CdrError, IN_PROGRESS, INTERRUPTED, Pending};

/// Pauses before the 2nd, 3rd and 4th (last) attempt of a write.
const RETRY_AFTER: [Duration; 3] = [
    Duration::from_millis(250),
    Duration::from_secs(1),
    Duration::from_secs(4),
];

/// Writes waiting at most; past it, updates of calls in progress are dropped (and counted):
/// each call's final row still waits for room.
pub(super) const QUEUE: usize = 4096;

/// One write.
#[derive(Debug)]
pub(super) enum Op {
    /// A call began: its row, `in_progress`.
    Start(Box<CallRecord>),
    /// It was answered.
    Answered { call_id: String, at: i64 },
    /// Its recording began.
    Recording { call_id: String, name: String },
    /// It ended: the whole row.
    Final(Box<CallRecord>),
    /// An agent's state changed.
    State(Box<super::states::StateEntry>),
    /// At start-up: rows of calls that never ended, closed as `interrupted` with their
    /// recordings (found in `recordings` when the row does not name one).
    CloseInterrupted { recordings: Option<PathBuf> },
    /// The CRM's disposition patch (JSON Merge Patch) for a call.
    Dispose {
        call_id: String,
        patch: String,
        at: i64,
    },
    /// An event for an app's webhook, queued.
    WebhookQueued(Box<super::webhooks::WebhookRow>),
    /// That event is delivered or given up.
    WebhookDone { seq: i64 },
    /// Nothing: done once every write queued before it is.
    Barrier,
}

/// A write, whom to tell when it is done (the number of rows it touched), and the shutdown
/// guard it keeps until then.
pub(super) struct Job {
    pub(super) op: Op,
    pub(super) done: oneshot::Sender<Result<usize, CdrError>>,
    pub(super) pending: Option<Pending>,
}

/// Starts the writer on `db`; it stops when every sender is gone.
pub(super) fn spawn(
    mut db: Connection,
    failures: Arc<AtomicU64>,
) -> std::io::Result<mpsc::Sender<Job>> {
    let (tx, mut rx) = mpsc::channel::<Job>(QUEUE);
    std::thread::Builder::new()
        .name("callgate-history".into())
        .spawn(move || {
            while let Some(job) = rx.blocking_recv() {
                let result = write_retrying(&mut db, &job.op, &failures);
                if let Err(e) = &result {
                    tracing::error!(op = ?Kind(&job.op), "call history write given up: {e}");
                }
                // Nobody waiting (an update of a call in progress): nothing to tell.
                let _ = job.done.send(result);
                drop(job.pending);
            }
        })?;
    Ok(tx)
}

/// The op without its data, for logs.
struct Kind<'a>(&'a Op);

impl std::fmt::Debug for Kind<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Op::Start(r) => write!(f, "start of {}", r.call_id),
            Op::Answered { call_id, .. } => write!(f, "answer of {call_id}"),
            Op::Recording { call_id, .. } => write!(f, "recording of {call_id}"),
            Op::Final(r) => write!(f, "end of {}", r.call_id),
            Op::State(e) => write!(f, "state of {}", e.agent),
            Op::CloseInterrupted { .. } => write!(f, "closing interrupted calls"),
            Op::Dispose { call_id, .. } => write!(f, "disposition of {call_id}"),
            Op::WebhookQueued(r) => write!(f, "webhook event {}", r.seq),
            Op::WebhookDone { seq } => write!(f, "webhook event {seq} done"),
            Op::Barrier => write!(f, "barrier"),
        }
    }
}

fn write_retrying(db: &mut Connection, op: &Op, failures: &AtomicU64) -> Result<usize, CdrError> {
    let mut pauses = RETRY_AFTER.iter();
    loop {
        match write(db, op) {
            Ok(n) => return Ok(n),
            Err(e) => {
                failures.fetch_add(1, Ordering::Relaxed);
                match pauses.next() {
                    Some(p) => {
                        tracing::warn!(op = ?Kind(op), "call history write failed, retrying in {p:?}: {e}");
                        std::thread::sleep(*p);
                    }
                    None => return Err(CdrError::Query(e)),
                }
            }
        }
    }
}

fn write(db: &mut Connection, op: &Op) -> rusqlite::Result<usize> {
    match op {
        Op::Start(c) => insert(db, "INSERT OR IGNORE", c),
        Op::Final(c) => insert(db, "INSERT OR REPLACE", c),
        Op::Answered { call_id, at } => db.execute(
            "UPDATE calls SET answered_at = ?2 WHERE call_id = ?1 AND ended_at IS NULL",
            params![call_id, at],
        ),
        Op::Recording { call_id, name } => db.execute(
            "UPDATE calls SET recording = ?2 WHERE call_id = ?1",
            params![call_id, name],
        ),
        Op::State(e) => super::states::write(db, e),
        Op::Barrier => Ok(0),
        Op::WebhookQueued(row) => super::webhooks::insert(db, row),
        Op::WebhookDone { seq } => super::webhooks::delete(db, *seq),
        Op::Dispose { call_id, patch, at } => db.execute(
            // Merged into what is there (RFC 7396, SQLite's json_patch), unless the result
            // would keep more custom fields than allowed (then nothing changes: 0 rows).
            "INSERT INTO dispositions (call_id, disposition, updated_at)
             SELECT ?1, json_patch('{}', ?2), ?3
             WHERE EXISTS (SELECT 1 FROM calls WHERE call_id = ?1)
               AND (SELECT count(*) FROM json_each(json_patch('{}', ?2), '$.fields')) <= ?4
             ON CONFLICT (call_id) DO UPDATE
               SET disposition = json_patch(disposition, ?2), updated_at = ?3
               WHERE (SELECT count(*) FROM json_each(json_patch(disposition, ?2), '$.fields')) <= ?4",
            params![
                call_id,
                patch,
                at,
                i64::try_from(super::disposition::MAX_FIELDS).unwrap_or(i64::MAX)
            ],
        ),
        Op::CloseInterrupted { recordings } => close_interrupted(db, recordings.as_deref()),
    }
}

fn insert(db: &Connection, verb: &str, c: &CallRecord) -> rusqlite::Result<usize> {
    let big = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    db.prepare_cached(&format!(
        "{verb} INTO calls ({COLUMNS}) VALUES \
         (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, \
         ?22, ?23, ?24)"
    ))?
    .execute(params![
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
        big(c.packets_sent),
        big(c.packets_received),
        big(c.packets_lost),
        c.jitter_ms,
        c.recording,
        (!c.data.is_empty())
            .then(|| serde_json::to_string(&c.data).ok())
            .flatten(),
        big(c.page_packets_received),
        big(c.page_packets_lost),
        c.page_jitter_ms,
    ])
}

/// Closes the rows of calls a crash cut off: ended when their recording was last written, or
/// else at their answer or start (the latest moment known), `interrupted`.
fn close_interrupted(
    db: &mut Connection,
    recordings: Option<&std::path::Path>,
) -> rusqlite::Result<usize> {
    let tx = db.transaction()?;
    let open: Vec<(String, i64, Option<i64>, Option<String>)> = tx
        .prepare(
            "SELECT call_id, started_at, answered_at, recording FROM calls WHERE ended_at IS NULL",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<Result<_, _>>()?;
    for (call_id, started, answered, recording) in &open {
        let recording = recording.clone().or_else(|| {
            let name = crate::media::recorder::file_name(call_id)?;
            recordings?.join(&name).is_file().then_some(name)
        });
        let written = recording
            .as_ref()
            .and_then(|name| {
                std::fs::metadata(recordings?.join(name))
                    .ok()?
                    .modified()
                    .ok()
            })
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .and_then(|d| i64::try_from(d.as_millis()).ok());
        let known = answered.unwrap_or(*started).max(*started);
        let ended = written.map_or(known, |w| w.max(known));
        let duration = answered.map_or(0, |a| ended.saturating_sub(a));
        tx.execute(
            "UPDATE calls SET ended_at = ?2, duration_ms = ?3, end_reason = ?4, recording = ?5
             WHERE call_id = ?1 AND ended_at IS NULL AND end_reason = ?6",
            params![
                call_id,
                ended,
                duration,
                INTERRUPTED,
                recording,
                IN_PROGRESS
            ],
        )?;
    }
    super::states::close_interrupted(&tx)?;
    tx.commit()?;
    Ok(open.len())
}
