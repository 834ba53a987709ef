//! Reading: a few idle read-only connections, and the queries behind search, last and vtt.
//!
//! Why `entries_fts CROSS JOIN entries`: SQLite then takes the matching rows from the index
//! first and sorts only those; left to choose, it may walk every entry by time and probe the
//! index for each one.

use std::sync::Mutex;

use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, Row};

use crate::schema::Location;
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
    let mut sql = format!("SELECT {COLUMNS} FROM ");
    let mut args: Vec<Value> = Vec::new();
    match query.q.as_deref().and_then(fts::match_expr) {
        Some(expr) => {
            sql.push_str(
                "entries_fts CROSS JOIN entries e ON e.id = entries_fts.rowid \
                 WHERE entries_fts MATCH ?",
            );
            args.push(Value::Text(expr));
        }
        None => sql.push_str("entries e WHERE 1"),
    }
    if let Some(stream) = &query.stream {
        sql.push_str(" AND e.stream = ?");
        args.push(Value::Text(stream.clone()));
    }
    if let Some(since) = query.since_ms {
        sql.push_str(" AND e.wall_ms >= ?");
        args.push(Value::Integer(since));
    }
    if let Some(until) = query.until_ms {
        sql.push_str(" AND e.wall_ms < ?");
        args.push(Value::Integer(until));
    }
    if let Some(before) = query.before {
        sql.push_str(" AND (e.wall_ms, e.id) < (?, ?)");
        args.push(Value::Integer(before.wall_ms));
        args.push(Value::Integer(before.id));
    }
    // One more than asked for tells whether there is a next page.
    sql.push_str(" ORDER BY e.wall_ms DESC, e.id DESC LIMIT ?");
    args.push(Value::Integer(limit as i64 + 1));

    let mut st = conn.prepare_cached(&sql)?;
    let mut entries = st
        .query_map(params_from_iter(args), stored)?
        .collect::<Result<Vec<_>, _>>()?;
    let next = if entries.len() > limit {
        entries.truncate(limit);
        entries.last().map(Cursor::after)
    } else {
        None
    };
    Ok(Page { entries, next })
}

pub(crate) fn last(conn: &Connection, stream: &str, n: usize) -> Result<Vec<Stored>, HistoryError> {
    let mut st = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM entries e WHERE e.stream = ?1 \
         ORDER BY e.wall_ms DESC, e.id DESC LIMIT ?2"
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
    let mut st = conn.prepare_cached(
        "SELECT id, wall_ms, text FROM entries \
         WHERE stream = ?1 AND kind = ?2 AND wall_ms >= ?3 AND wall_ms < ?4 \
         ORDER BY wall_ms, id LIMIT ?5",
    )?;
    let lines = st
        .query_map(
            params![
                stream,
                Kind::Comment.as_str(),
                since_ms.unwrap_or(i64::MIN),
                until_ms.unwrap_or(i64::MAX),
                MAX_CUES as i64
            ],
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
