//! Reading: a few idle read-only connections, and the queries behind search, last and vtt.
//!
//! Why `entries_fts CROSS JOIN entries ... ORDER BY id DESC`: FTS5 yields matching rowids in
//! descending order by itself, and ids are time-ordered, so SQLite reads matches newest first
//! and stops after the page; the time range goes to FTS5 as a rowid range.

use std::sync::Mutex;

use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, Row};

use crate::schema::{first_id, Location};
use crate::{fts, vtt, Cursor, Entry, HistoryError, Kind, Page, Query, Stored};

/// Idle connections kept for the next read; more are opened when more run at once.
const IDLE: usize = 4;
/// The most cues one WebVTT export holds.
const MAX_CUES: usize = 100_000;

const COLUMNS: &str = "e.id, e.kind, e.stream, e.wall_ms, e.media_start, e.media_end, \
                       e.profile, e.instruction, e.text, e.latency_s, e.question";

pub(crate) struct Readers {
    location: Location,
    idle: Mutex<Vec<Connection>>,
}

impl Readers {
    pub fn new(location: Location) -> Readers {
        Readers {
            location,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Runs `f` on an idle connection, or a new one. Blocks: call from a blocking thread.
    pub fn with<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, HistoryError>,
    ) -> Result<T, HistoryError> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match idle {
            Some(conn) => conn,
            None => self.location.open(false)?,
        };
        let result = f(&conn);
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < IDLE {
            idle.push(conn);
        }
        result
    }
}

pub(crate) fn search(conn: &Connection, query: &Query, limit: usize) -> Result<Page, HistoryError> {
    let (sql, args) = search_sql(query, limit);
    let mut st = conn.prepare_cached(&sql)?;
    let mut entries = st
        .query_map(params_from_iter(args), stored)?
        .collect::<Result<Vec<_>, _>>()?;
    let next = if entries.len() > limit {
        entries.truncate(limit);
        entries.last().map(|s| Cursor { id: s.id })
    } else {
        None
    };
    Ok(Page { entries, next })
}

/// The statement for a search and its arguments.
pub(crate) fn search_sql(query: &Query, limit: usize) -> (String, Vec<Value>) {
    let (low, mut high) = id_range(query.since_ms, query.until_ms);
    if let Some(before) = query.before {
        high = high.min(before.id);
    }
    let mut args = vec![Value::Integer(low), Value::Integer(high)];
    let text = query.q.as_deref().and_then(fts::match_expr);
    let order = if text.is_some() {
        "entries_fts.rowid"
    } else {
        "e.id"
    };
    let mut sql = match text {
        Some(expr) => {
            args.push(Value::Text(expr));
            format!(
                "SELECT {COLUMNS} FROM entries_fts CROSS JOIN entries e ON e.id = entries_fts.rowid \
                 WHERE entries_fts.rowid >= ? AND entries_fts.rowid < ? AND entries_fts MATCH ?"
            )
        }
        None => format!("SELECT {COLUMNS} FROM entries e WHERE e.id >= ? AND e.id < ?"),
    };
    if let Some(stream) = &query.stream {
        sql.push_str(" AND e.stream = ?");
        args.push(Value::Text(stream.clone()));
    }
    // One more than asked for tells whether there is a next page.
    sql.push_str(&format!(" ORDER BY {order} DESC LIMIT ?"));
    args.push(Value::Integer(limit as i64 + 1));
    (sql, args)
}

pub(crate) fn last(conn: &Connection, stream: &str, n: usize) -> Result<Vec<Stored>, HistoryError> {
    let mut st = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM entries e WHERE e.stream = ?1 ORDER BY e.id DESC LIMIT ?2"
    ))?;
    let mut entries = st
        .query_map(params![stream, n as i64], stored)?
        .collect::<Result<Vec<_>, _>>()?;
    entries.reverse();
    Ok(entries)
}

pub(crate) fn vtt(
    conn: &Connection,
    stream: &str,
    since_ms: Option<i64>,
    until_ms: Option<i64>,
) -> Result<String, HistoryError> {
    let (low, high) = id_range(since_ms, until_ms);
    let mut st = conn.prepare_cached(
        "SELECT id, wall_ms, text FROM entries \
         WHERE stream = ?1 AND id >= ?2 AND id < ?3 AND kind = ?4 ORDER BY id LIMIT ?5",
    )?;
    let lines = st
        .query_map(
            params![stream, low, high, Kind::Comment.as_str(), MAX_CUES as i64],
            |row| {
                Ok(vtt::Line {
                    id: row.get(0)?,
                    wall_ms: row.get(1)?,
                    text: row.get(2)?,
                })
            },
        )?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(vtt::render(since_ms, &lines))
}

/// `[since, until)` in wall time as ids, `[low, high)`.
fn id_range(since_ms: Option<i64>, until_ms: Option<i64>) -> (i64, i64) {
    (
        since_ms.map_or(0, first_id),
        until_ms.map_or(i64::MAX, first_id),
    )
}

fn stored(row: &Row<'_>) -> rusqlite::Result<Stored> {
    let kind: String = row.get(1)?;
    let kind = Kind::parse(&kind).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            1,
            rusqlite::types::Type::Text,
            format!("unknown entry kind '{kind}'").into(),
        )
    })?;
    Ok(Stored {
        id: row.get(0)?,
        entry: Entry {
            kind,
            stream: row.get(2)?,
            wall_ms: row.get(3)?,
            media_start: row.get(4)?,
            media_end: row.get(5)?,
            profile: row.get(6)?,
            instruction: row.get(7)?,
            text: row.get(8)?,
            latency_s: row.get(9)?,
            question: row.get(10)?,
        },
    })
}
