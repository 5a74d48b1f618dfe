//! The history's schema, versioned by SQLite's `user_version`: each migration runs once, in
//! its own transaction with the version it brings, so a crash mid-migration leaves the old
//! schema whole. A database from a newer callgate is refused, never altered.

use rusqlite::Connection;

/// Migration `i` brings the schema to version `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema (a row per finished call). Databases from before versioning hold it
    // already: IF NOT EXISTS leaves them as they are.
    "CREATE TABLE IF NOT EXISTS calls (
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
    CREATE INDEX IF NOT EXISTS calls_by_start ON calls (started_at);",
    // 2: rows written when calls start (`ended_at` empty until they end); history by app.
    "CREATE TABLE calls_v2 (
        call_id TEXT PRIMARY KEY,
        sip_call_id TEXT NOT NULL,
        app TEXT NOT NULL,
        agent TEXT NOT NULL,
        direction TEXT NOT NULL,
        from_party TEXT NOT NULL,
        to_party TEXT NOT NULL,
        started_at INTEGER NOT NULL,
        answered_at INTEGER,
        ended_at INTEGER,
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
    INSERT INTO calls_v2 SELECT * FROM calls;
    DROP TABLE calls;
    ALTER TABLE calls_v2 RENAME TO calls;
    CREATE INDEX calls_by_agent ON calls (agent, started_at, call_id);
    CREATE INDEX calls_by_app ON calls (app, started_at, call_id);
    CREATE INDEX calls_by_start ON calls (started_at, call_id);
    CREATE INDEX calls_open ON calls (call_id) WHERE ended_at IS NULL;",
    // 3: the agent-state log, one row per time an agent spent in a state (`ended_at` empty
    // while it lasts), for the per-agent time in each state.
    "CREATE TABLE agent_states (
        app TEXT NOT NULL,
        agent TEXT NOT NULL,
        state TEXT NOT NULL,
        productive INTEGER NOT NULL,
        cause TEXT NOT NULL,
        started_at INTEGER NOT NULL,
        ended_at INTEGER
    );
    CREATE INDEX agent_states_by_agent ON agent_states (agent, started_at);
    CREATE INDEX agent_states_open ON agent_states (app, agent) WHERE ended_at IS NULL;",
    // 4: each call's data fields (a dialler's headers, apps.toml `call_data`), as a JSON object.
    "ALTER TABLE calls ADD COLUMN call_data TEXT;",
    // 5: what the CRM recorded about each call (`PATCH /api/v1/calls/{callId}`): a JSON
    // object of code, notes and fields, apart from the call's row, which its end rewrites.
    "CREATE TABLE dispositions (
        call_id TEXT PRIMARY KEY,
        disposition TEXT NOT NULL,
        updated_at INTEGER NOT NULL
    );",
    // 6: the webhook queue: events not yet delivered to their app's URL (deleted once
    // delivered or given up), so that a restart loses none.
    "CREATE TABLE webhook_outbox (
        seq INTEGER PRIMARY KEY,
        app TEXT NOT NULL,
        agent TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        body TEXT NOT NULL
    );",
    // 7: the page's leg of each call: what callgate received of the page's audio.
    "ALTER TABLE calls ADD COLUMN page_packets_received INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE calls ADD COLUMN page_packets_lost INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE calls ADD COLUMN page_jitter_ms REAL NOT NULL DEFAULT 0;",
];

/// The schema version this callgate writes.
pub const VERSION: i64 = MIGRATIONS.len() as i64;

/// Why the schema cannot be brought up to date.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Written by a newer callgate.
    #[error(
        "the call history has schema version {found}, newer than this callgate's {VERSION}: run the newer callgate, or restore a backup made before the upgrade"
    )]
    Newer {
        /// Its version.
        found: i64,
    },
    /// SQLite refused.
    #[error("migrating the call history to schema version {to} failed: {source}")]
    Sql {
        /// The version being reached.
        to: i64,
        /// SQLite's error.
        source: rusqlite::Error,
    },
}

/// Brings `db` to [`VERSION`]; returns the version it had.
pub fn migrate(db: &mut Connection) -> Result<i64, MigrateError> {
    let sql = |to| move |source| MigrateError::Sql { to, source };
    let found: i64 = db
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql(0))?;
    if found > VERSION {
        return Err(MigrateError::Newer { found });
    }
    for (to, step) in (found + 1..).zip(MIGRATIONS.iter().skip(usize::try_from(found).unwrap_or(0)))
    {
        let tx = db.transaction().map_err(sql(to))?;
        tx.execute_batch(step).map_err(sql(to))?;
        tx.pragma_update(None, "user_version", to)
            .map_err(sql(to))?;
        tx.commit().map_err(sql(to))?;
    }
    Ok(found)
}
