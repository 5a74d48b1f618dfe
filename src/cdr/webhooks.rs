//! The webhook queue on disk: one row per event not yet delivered, written before the first
//! attempt (in the writer's order, so a delivery's delete never overtakes its insert) and
//! deleted once the event is delivered or given up. What is left at a restart is sent then.

use rusqlite::{Connection, params};

/// One queued event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookRow {
    /// Its place in the queue (lower goes first); unique in the table.
    pub seq: i64,
    /// The app whose webhook it goes to.
    pub app: String,
    /// The agent it is about.
    pub agent: String,
    /// When it was queued (Unix ms).
    pub created_at: i64,
    /// The body POSTed (it holds the delivery id).
    pub body: String,
}

pub(super) fn insert(db: &Connection, row: &WebhookRow) -> rusqlite::Result<usize> {
    db.prepare_cached(
        "INSERT OR IGNORE INTO webhook_outbox (seq, app, agent, created_at, body)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        row.seq,
        row.app,
        row.agent,
        row.created_at,
        row.body
    ])
}

pub(super) fn delete(db: &Connection, seq: i64) -> rusqlite::Result<usize> {
    db.prepare_cached("DELETE FROM webhook_outbox WHERE seq = ?1")?
        .execute(params![seq])
}

/// Every queued event, in queue order.
pub(super) fn pending(db: &Connection) -> rusqlite::Result<Vec<WebhookRow>> {
    db.prepare("SELECT seq, app, agent, created_at, body FROM webhook_outbox ORDER BY seq")?
        .query_map([], |r| {
            Ok(WebhookRow {
                seq: r.get(0)?,
                app: r.get(1)?,
                agent: r.get(2)?,
                created_at: r.get(3)?,
                body: r.get(4)?,
            })
        })?
        .collect()
}
