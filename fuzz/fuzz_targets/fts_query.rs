//! `GET /api/history` and `…/history.vtt` parameters against a history with a few entries:
//! the search text through the FTS5 query builder, times and the cursor through their
//! parsers. Fields are separated by NUL: q, stream, since, until, before, limit. Besides not
//! panicking: a parameter that parses never makes SQLite fail (every error is the client's,
//! a 422, never a 500), and a time in years 0 to 9999 comes back the same from its text.
#![no_main]

use std::sync::OnceLock;

use kibitz_history::{format_time, parse_time, Entry, History, Kind, Query};
use libfuzzer_sys::fuzz_target;
use tokio::runtime::Runtime;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut fields = text.split('\0');
    let mut next = || fields.next().filter(|f| !f.is_empty());
    let (q, stream, since, until, before, limit) = (next(), next(), next(), next(), next(), next());
    let time = |t: Option<&str>| -> Result<Option<i64>, ()> {
        let Some(t) = t else { return Ok(None) };
        let ms = parse_time(t).map_err(drop)?;
        if (-62_167_219_200_000..253_402_300_800_000).contains(&ms) {
            assert_eq!(parse_time(&format_time(ms)).ok(), Some(ms), "{t:?}");
        }
        Ok(Some(ms))
    };
    let (Ok(since_ms), Ok(until_ms)) = (time(since), time(until)) else {
        return;
    };
    let Ok(before) = before.map(str::parse).transpose() else {
        return;
    };
    let limit = match limit.map(str::parse::<usize>) {
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return,
        None => None,
    };
    let (runtime, history) = history();
    let query = Query {
        q: q.filter(|q| !q.trim().is_empty()).map(str::to_owned),
        stream: stream.map(str::to_owned),
        since_ms,
        until_ms,
        limit,
        before,
    };
    if let Err(e) = runtime.block_on(history.search(query)) {
        assert!(e.is_bad_input(), "search failed: {e}");
    }
    let vtt = history.vtt(stream.unwrap_or("door"), since_ms, until_ms);
    if let Err(e) = runtime.block_on(vtt) {
        assert!(e.is_bad_input(), "vtt failed: {e}");
    }
});

fn history() -> &'static (Runtime, History) {
    static HISTORY: OnceLock<(Runtime, History)> = OnceLock::new();
    HISTORY.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let history = History::in_memory().unwrap();
        for (i, text) in [
            "A van leaves the drive",
            "Ünïcödé 東京 \"quoted\" NEAR(x) -y",
            "the dog barks AND OR NOT",
        ]
        .iter()
        .enumerate()
        {
            history.record(Entry {
                kind: Kind::Comment,
                stream: "door".into(),
                wall_ms: 1_796_061_600_000 + i as i64 * 1000,
                media_start: Some(i as f64),
                media_end: Some(i as f64 + 1.0),
                profile: "security".into(),
                instruction: String::new(),
                text: (*text).into(),
                latency_s: Some(0.5),
                question: None,
            });
        }
        runtime.block_on(history.flush()).unwrap();
        (runtime, history)
    })
}
