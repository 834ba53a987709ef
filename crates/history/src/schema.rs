//! Where the database lives, how a connection is opened, and the schema with its version.
//!
//! The version table lets a later kibitz upgrade a file in place and lets this one refuse a
//! file from a newer one, instead of misreading it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, TransactionBehavior};

use crate::HistoryError;

pub(crate) const VERSION: i64 = 1;

/// Ids per millisecond: an entry's id is its `wall_ms × SLOT` plus a sequence number, so id
/// order is time order. That lets the full-text index (which yields rowids in order) stop at
/// the page's end instead of sorting every match, and turns time ranges into id ranges.
pub(crate) const SLOT: i64 = 1000;
/// The last millisecond with ids below 2⁵³, so ids stay exact as JSON numbers (year 2255).
pub(crate) const MAX_WALL_MS: i64 = (1 << 53) / SLOT - 1;

/// The first id of a millisecond; times before 1970 share the first one.
pub(crate) fn first_id(wall_ms: i64) -> i64 {
    wall_ms.clamp(0, MAX_WALL_MS) * SLOT
}

/// How long a connection waits for another's lock before failing.
const BUSY: Duration = Duration::from_secs(5);

const SCHEMA_V1: &str = "
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE entries (
    id          INTEGER PRIMARY KEY,
    kind        TEXT    NOT NULL,
    stream      TEXT    NOT NULL,
    wall_ms     INTEGER NOT NULL,
    media_start REAL,
    media_end   REAL,
    profile     TEXT    NOT NULL,
    instruction TEXT    NOT NULL,
    text        TEXT    NOT NULL,
    latency_s   REAL,
    question    TEXT
);
CREATE INDEX entries_by_stream ON entries (stream, id);
CREATE VIRTUAL TABLE entries_fts USING fts5 (
    text, question,
    content = 'entries', content_rowid = 'id',
    tokenize = 'unicode61 remove_diacritics 2'
);
CREATE TRIGGER entries_insert AFTER INSERT ON entries BEGIN
    INSERT INTO entries_fts (rowid, text, question) VALUES (new.id, new.text, new.question);
END;
CREATE TRIGGER entries_delete AFTER DELETE ON entries BEGIN
    INSERT INTO entries_fts (entries_fts, rowid, text, question)
        VALUES ('delete', old.id, old.text, old.question);
END;
CREATE TRIGGER entries_update AFTER UPDATE ON entries BEGIN
    INSERT INTO entries_fts (entries_fts, rowid, text, question)
        VALUES ('delete', old.id, old.text, old.question);
    INSERT INTO entries_fts (rowid, text, question) VALUES (new.id, new.text, new.question);
END;
";

/// A file, or a named in-memory database that several connections share (SQLite's `memdb`
/// VFS; a plain `:memory:` would give each connection a database of its own).
#[derive(Debug, Clone)]
pub(crate) enum Location {
    File(PathBuf),
    Memory(String),
}

impl Location {
    pub fn memory() -> Location {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Location::Memory(format!(
            "file:/kibitz-history-{}-{n}?vfs=memdb",
            std::process::id()
        ))
    }

    pub fn open(&self, write: bool) -> Result<Connection, HistoryError> {
        let mode = if write {
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE
        } else {
            OpenFlags::SQLITE_OPEN_READ_ONLY
        };
        let flags = mode | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = match self {
            Location::File(path) => Connection::open_with_flags(path, flags),
            Location::Memory(uri) => {
                Connection::open_with_flags(uri, flags | OpenFlags::SQLITE_OPEN_URI)
            }
        }
        .map_err(|e| self.error(e))?;
        conn.busy_timeout(BUSY).map_err(|e| self.error(e))?;
        Ok(conn)
    }

    /// An error met while opening, named for the file; "not a database" and "corrupt" become
    /// the one clear error the user can act on.
    pub fn error(&self, source: rusqlite::Error) -> HistoryError {
        let path = self.path();
        match source.sqlite_error_code() {
            Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => {
                HistoryError::NotADatabase { path }
            }
            _ => HistoryError::Open { path, source },
        }
    }

    fn path(&self) -> PathBuf {
        match self {
            Location::File(path) => path.clone(),
            Location::Memory(uri) => PathBuf::from(uri),
        }
    }
}

/// The writing connection: WAL for a file, the schema created or checked.
pub(crate) fn open_writer(location: &Location) -> Result<Connection, HistoryError> {
    let mut conn = location.open(true)?;
    let setup = |conn: &Connection| -> rusqlite::Result<()> {
        if let Location::File(_) = location {
            // WAL: readers never wait for the writer, and a commit is one append. NORMAL
            // syncs at checkpoints only: a power cut may lose the last commits, a killed
            // process loses nothing committed.
            conn.query_row("PRAGMA journal_mode = WAL", [], |row| {
                row.get::<_, String>(0)
            })?;
            conn.execute_batch("PRAGMA synchronous = NORMAL")?;
        }
        Ok(())
    };
    setup(&conn).map_err(|e| location.error(e))?;
    migrate(&mut conn, location)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection, location: &Location) -> Result<(), HistoryError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| location.error(e))?;
    let tables: Vec<String> = tx
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        .and_then(|mut st| st.query_map([], |row| row.get(0))?.collect())
        .map_err(|e| location.error(e))?;
    if tables.is_empty() {
        tx.execute_batch(SCHEMA_V1)?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES (?1)",
            [VERSION],
        )?;
    } else if !tables.iter().any(|t| t == "schema_version") {
        return Err(HistoryError::Foreign {
            path: location.path(),
        });
    } else {
        let found: i64 = tx.query_row("SELECT max(version) FROM schema_version", [], |row| {
            row.get::<_, Option<i64>>(0).map(|v| v.unwrap_or(0))
        })?;
        if found > VERSION {
            return Err(HistoryError::NewerSchema {
                path: location.path(),
                found,
                known: VERSION,
            });
        }
        // Upgrades from older versions go here, one step each, as the schema grows.
    }
    tx.commit()?;
    Ok(())
}
