use std::path::PathBuf;

/// Everything that can go wrong in this crate, each with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("cannot create the history folder '{}': {source}", path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the history file '{}': {source}", path.display())]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("the history file '{}' is corrupt or not an SQLite database\nhint: move it aside to start a new history, or pass --history off", path.display())]
    NotADatabase { path: PathBuf },
    #[error("'{}' is an SQLite database of something else, not a kibitz history\nhint: pass another --history path", path.display())]
    Foreign { path: PathBuf },
    #[error("the history file '{}' has schema version {found}, newer than this kibitz knows ({known})\nhint: run a newer kibitz, or pass another --history path", path.display())]
    NewerSchema {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("history database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot start the history writer: {0}")]
    Thread(std::io::Error),
    #[error("cannot prune the history: {0}")]
    Prune(String),
    #[error("the history writer has stopped")]
    Closed,
    #[error("bad time '{0}': use RFC 3339 (2026-11-30T18:00:00Z, 2026-11-30T19:00:00+01:00) or unix seconds")]
    BadTime(String),
    #[error("bad history cursor '{0}': pass back the `next` of a previous page")]
    BadCursor(String),
    #[error("limit must be between 1 and {max}, not {got}")]
    BadLimit { got: usize, max: usize },
}

impl HistoryError {
    /// The caller's input was wrong (an HTTP 422), as opposed to the store failing.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            HistoryError::BadTime(_) | HistoryError::BadCursor(_) | HistoryError::BadLimit { .. }
        )
    }
}

/// User text quoted back in an error, cut to a readable length.
pub(crate) fn clip(text: &str) -> String {
    const MAX: usize = 64;
    match text.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}
