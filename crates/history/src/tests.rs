//! The store end to end: the writer thread, real SQLite (in memory or in a temporary folder),
//! and the async reads. Every wait is bounded by [`bounded`].

use std::collections::HashSet;
use std::future::Future;
use std::time::{Duration, Instant};

use super::*;
use crate::vtt::tests::parse as parse_vtt;

const LIMIT: Duration = Duration::from_secs(60);
const DAY_MS: i64 = 86_400_000;
/// 2026-11-30T18:00:00Z.
const T0: i64 = 1_796_061_600_000;

async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f).await.expect("timed out")
}

fn entry(stream: &str, wall_ms: i64, text: &str) -> Entry {
    Entry {
        kind: Kind::Comment,
        stream: stream.into(),
        wall_ms,
        media_start: None,
        media_end: None,
        profile: "sports".into(),
        instruction: "Describe the play.".into(),
        text: text.into(),
        latency_s: None,
        question: None,
    }
}

async fn count(history: &History) -> i64 {
    bounded(
        history
            .read(|conn| Ok(conn.query_row("SELECT count(*) FROM entries", [], |row| row.get(0))?)),
    )
    .await
    .unwrap()
}

async fn search(history: &History, query: Query) -> Page {
    bounded(history.search(query)).await.unwrap()
}

fn texts(page: &Page) -> Vec<&str> {
    page.entries.iter().map(|s| s.entry.text.as_str()).collect()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test]
async fn bundled_sqlite_has_fts5() {
    let history = History::in_memory().unwrap();
    let used: bool = bounded(history.read(|conn| {
        Ok(
            conn.query_row("SELECT sqlite_compileoption_used('ENABLE_FTS5')", [], |r| {
                r.get(0)
            })?,
        )
    }))
    .await
    .unwrap();
    assert!(used);
}

#[tokio::test]
async fn roundtrip() {
    let history = History::in_memory().unwrap();
    let full = Entry {
        kind: Kind::Answer,
        stream: "cam-1".into(),
        wall_ms: T0,
        media_start: Some(12.5),
        media_end: Some(14.25),
        profile: "security".into(),
        instruction: "Watch the gate.".into(),
        text: "A white van is leaving through the gate.".into(),
        latency_s: Some(0.75),
        question: Some("Is the van still there?".into()),
    };
    let bare = Entry {
        kind: Kind::Alert,
        ..entry("cam-2", T0 + 1, "")
    };
    assert!(history.record(full.clone()));
    assert!(history.record(bare.clone()));
    bounded(history.flush()).await.unwrap();

    let page = search(&history, Query::default()).await;
    assert_eq!(page.next, None);
    let got: Vec<&Entry> = page.entries.iter().map(|s| &s.entry).collect();
    assert_eq!(got, [&bare, &full]);
    // Ids are time-ordered: the wall time in ms, then a place within the millisecond.
    assert_eq!(page.entries[1].id, T0 * 1000);
    assert_eq!(page.entries[0].id, (T0 + 1) * 1000);

    let json = serde_json::to_value(&page).unwrap();
    assert_eq!(json["entries"][1]["kind"], "answer");
    assert_eq!(json["entries"][1]["question"], "Is the van still there?");
    assert_eq!(json["entries"][1]["id"], page.entries[1].id);
    assert_eq!(json["next"], serde_json::Value::Null);
    let back: Stored = serde_json::from_value(json["entries"][1].clone()).unwrap();
    assert_eq!(back, page.entries[1]);
    assert_eq!(history.dropped(), 0);
}

#[tokio::test]
async fn search_finds_words_newest_first() {
    let history = History::in_memory().unwrap();
    // Recorded out of time order: the order of the results is by time, not by insertion.
    let rows = [
        ("gate", T0 + 3_000, "The van leaves the yard."),
        ("gate", T0 + 1_000, "A van parks by the gate."),
        ("road", T0 + 2_000, "Another van passes on the road."),
        ("gate", T0 + 4_000, "A cyclist crosses; no vehicles."),
        ("gate", T0 + 5_000, "Café owner waves at the VAN driver."),
    ];
    for (stream, wall_ms, text) in rows {
        history.record(entry(stream, wall_ms, text));
    }
    history.record(Entry {
        kind: Kind::Answer,
        question: Some("Where did the forklift go?".into()),
        ..entry("gate", T0 + 6_000, "Behind the shed.")
    });
    bounded(history.flush()).await.unwrap();

    let q = |text: &str| Query {
        q: Some(text.into()),
        ..Query::default()
    };
    let page = search(&history, q("van")).await;
    assert_eq!(
        texts(&page),
        [
            "Café owner waves at the VAN driver.",
            "The van leaves the yard.",
            "Another van passes on the road.",
            "A van parks by the gate.",
        ]
    );
    // All words must match; the last one is a prefix; diacritics fold.
    assert_eq!(
        texts(&search(&history, q("van lea")).await),
        ["The van leaves the yard."]
    );
    assert_eq!(
        texts(&search(&history, q("van lea ")).await),
        Vec::<&str>::new()
    );
    assert_eq!(
        texts(&search(&history, q("cafe")).await),
        ["Café owner waves at the VAN driver."]
    );
    // Questions are searched too.
    assert_eq!(
        texts(&search(&history, q("forklift")).await),
        ["Behind the shed."]
    );
    // Stream and time range narrow it.
    let page = search(
        &history,
        Query {
            stream: Some("gate".into()),
            since_ms: Some(T0 + 1_000),
            until_ms: Some(T0 + 5_000),
            ..q("van")
        },
    )
    .await;
    assert_eq!(
        texts(&page),
        ["The van leaves the yard.", "A van parks by the gate."]
    );
    // No word to search for: a plain listing.
    assert_eq!(search(&history, q(" -- ")).await.entries.len(), 6);
}

#[tokio::test]
async fn hostile_queries_never_error() {
    let history = History::in_memory().unwrap();
    history.record(entry(
        "s",
        T0,
        "NEAR the OR gate, \"quoted\" * stars - and 東京 ünïcode",
    ));
    bounded(history.flush()).await.unwrap();
    let long = "ab\"c*(d) OR NEAR( -x ".repeat(500);
    let ten_kb = "x".repeat(10_240);
    let hostile = [
        "\"",
        "\"\"",
        "*",
        "**",
        "NEAR(",
        "NEAR(a b, 2)",
        "OR",
        "a OR",
        "AND NOT",
        "-",
        "-gate",
        "+gate",
        "^gate",
        "text:gate",
        "question : x",
        "(",
        ")",
        "{text question}: gate",
        "gate*",
        "'",
        "\\",
        "\0",
        "%_",
        "東京",
        "ünïcode",
        "🦊🔥",
        "\u{200b}\u{feff}",
        "e\u{301}",
        long.as_str(),
        ten_kb.as_str(),
    ];
    for text in hostile {
        let result = bounded(history.search(Query {
            q: Some(text.into()),
            ..Query::default()
        }))
        .await;
        assert!(
            result.is_ok(),
            "{:?}: {:?}",
            error::clip(text),
            result.err()
        );
    }
    for text in ["NEAR(", "OR", "\"quoted", "東京", "unicode", "stars -"] {
        let page = search(
            &history,
            Query {
                q: Some(text.into()),
                ..Query::default()
            },
        )
        .await;
        assert_eq!(page.entries.len(), 1, "{text}");
    }
}

#[tokio::test]
async fn cursor_pages_stay_stable_under_inserts() {
    let history = History::in_memory().unwrap();
    // Two entries per millisecond, so pages also break between equal times.
    for i in 0..1000 {
        let word = if i % 3 == 0 { "goal" } else { "pass" };
        history.record(entry("match", T0 + i / 2, &format!("{word} number {i}")));
    }
    bounded(history.flush()).await.unwrap();

    for (round, q) in [None, Some("goal".to_string())].into_iter().enumerate() {
        let late = format!("goal late news {round}");
        let mut seen = Vec::new();
        let mut before = None;
        let mut extra = 0;
        loop {
            let page = search(
                &history,
                Query {
                    q: q.clone(),
                    limit: Some(37),
                    before,
                    ..Query::default()
                },
            )
            .await;
            assert!(page.entries.len() <= 37);
            seen.extend(
                page.entries
                    .iter()
                    .map(|s| (s.entry.wall_ms, s.id, s.entry.text.clone())),
            );
            // Newer entries arrive while the client pages, and one late entry lands behind
            // the cursor: neither may repeat or hide what was there.
            history.record(entry("match", T0 + 10_000 + extra, &late));
            history.record(entry("match", T0 + 100, "goal backfilled"));
            extra += 1;
            bounded(history.flush()).await.unwrap();
            // The cursor goes through its text form, as it would through a URL.
            match page.next {
                Some(next) => before = Some(next.to_string().parse().unwrap()),
                None => break,
            }
        }
        let keys: Vec<(i64, i64)> = seen.iter().map(|(w, id, _)| (*w, *id)).collect();
        assert!(
            keys.windows(2).all(|w| w[0] > w[1]),
            "not strictly newest first"
        );
        let ids: HashSet<i64> = keys.iter().map(|k| k.1).collect();
        assert_eq!(ids.len(), seen.len(), "a row repeated");
        assert!(seen.iter().all(|(_, _, t)| *t != late));
        let originals = seen.iter().filter(|(_, _, t)| t.contains("number")).count();
        assert_eq!(originals, if q.is_some() { 334 } else { 1000 });
    }
}

#[tokio::test]
async fn bad_input_is_reported_as_such() {
    let history = History::in_memory().unwrap();
    for limit in [0, MAX_LIMIT + 1] {
        let err = bounded(history.search(Query {
            limit: Some(limit),
            ..Query::default()
        }))
        .await
        .unwrap_err();
        assert!(matches!(err, HistoryError::BadLimit { .. }) && err.is_bad_input());
    }
    for text in [
        "",
        "a",
        "-1",
        "+1",
        "1_2",
        " 1",
        "1.5",
        "99999999999999999999",
        "x".repeat(1000).as_str(),
    ] {
        let err = text.parse::<Cursor>().unwrap_err();
        assert!(err.is_bad_input(), "{text}");
        assert!(err.to_string().len() < 200);
    }
    let cursor: Cursor = "1796061600000001".parse().unwrap();
    assert_eq!(
        serde_json::to_string(&cursor).unwrap(),
        "\"1796061600000001\""
    );
    assert_eq!(
        serde_json::from_str::<Cursor>("\"1796061600000001\"").unwrap(),
        cursor
    );
}

#[tokio::test]
async fn last_gives_the_newest_in_order() {
    let history = History::in_memory().unwrap();
    for i in 0..20 {
        history.record(entry(
            if i % 2 == 0 { "a" } else { "b" },
            T0 + i,
            &format!("c{i}"),
        ));
    }
    bounded(history.flush()).await.unwrap();
    let last = bounded(history.last("a", 3)).await.unwrap();
    let got: Vec<&str> = last.iter().map(|s| s.entry.text.as_str()).collect();
    assert_eq!(got, ["c14", "c16", "c18"]);
    assert!(bounded(history.last("nobody", 3)).await.unwrap().is_empty());
}

#[tokio::test]
async fn retention_prunes_old_entries_and_their_index() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("history.sqlite");
    let now = now_ms();
    {
        let history = History::open(&path, Duration::ZERO).unwrap();
        for (age_days, text) in [(40, "ancient zebra"), (31, "old zebra"), (1, "fresh zebra")] {
            history.record(entry("s", now - age_days * DAY_MS, text));
        }
        bounded(history.flush()).await.unwrap();
        assert_eq!(
            bounded(history.prune(now)).await.unwrap(),
            0,
            "zero keeps all"
        );
    }

    // Opening with a retention prunes at once, on the writer thread.
    let history = History::open(&path, Duration::from_secs(30 * 86_400)).unwrap();
    bounded(async {
        while count(&history).await != 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let zebra = Query {
        q: Some("zebra".into()),
        ..Query::default()
    };
    assert_eq!(
        texts(&search(&history, zebra.clone()).await),
        ["fresh zebra"]
    );

    // And on demand, with the caller's clock: 28.5 days on, the 2-day-old entry is past 30.
    history.record(entry("s", now - 2 * DAY_MS, "older zebra"));
    bounded(history.flush()).await.unwrap();
    assert_eq!(
        bounded(history.prune(now + 28 * DAY_MS + DAY_MS / 2))
            .await
            .unwrap(),
        1
    );
    assert_eq!(texts(&search(&history, zebra).await), ["fresh zebra"]);
    // The external-content index agrees with the table after the deletes.
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch("INSERT INTO entries_fts (entries_fts, rank) VALUES ('integrity-check', 1)")
        .unwrap();
}

#[tokio::test]
async fn history_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    // Folders are created as needed.
    let path = dir.path().join("a/b/history.sqlite");
    {
        let history = History::open(&path, Duration::from_secs(86_400)).unwrap();
        history.record(entry("s", now_ms(), "before the restart"));
        bounded(history.flush()).await.unwrap();
    }
    let history = History::open(&path, Duration::from_secs(86_400)).unwrap();
    let last = bounded(history.last("s", 10)).await.unwrap();
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].entry.text, "before the restart");
    let mode: String = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn vtt_export_is_valid_and_only_comments() {
    let history = History::in_memory().unwrap();
    let texts = [
        (0, "Kick-off."),
        (2_500, "A long pass --> <b>wide</b> & out."),
        (2_500, "Same millisecond."),
        (4_000, "Corner."),
        (
            60_000,
            "A minute in, still nil-nil, and the crowd is getting restless in the stands.",
        ),
        (600_000, "Outside the range."),
    ];
    for (offset, text) in texts {
        history.record(entry("m", T0 + offset, text));
    }
    history.record(Entry {
        kind: Kind::Answer,
        ..entry("m", T0 + 3_000, "Not a comment.")
    });
    history.record(entry("other", T0 + 3_000, "Other stream."));
    bounded(history.flush()).await.unwrap();

    let vtt = bounded(history.vtt("m", Some(T0 - 1_000), Some(T0 + 600_000)))
        .await
        .unwrap();
    let cues = parse_vtt(&vtt);
    let starts: Vec<i64> = cues.iter().map(|c| c.start_ms).collect();
    assert_eq!(starts, [1_000, 3_500, 3_501, 5_000, 61_000]);
    assert_eq!(cues[1].end_ms, 3_501);
    assert_eq!(
        cues[1].text,
        "A long pass --&gt; &lt;b&gt;wide&lt;/b&gt; &amp; out."
    );
    assert_eq!(cues[3].end_ms, 5_000 + 1_000 + 7 * 60);
    assert_eq!(cues[4].end_ms, 61_000 + vtt::readable_ms(texts[4].1));
    assert!(cues.iter().all(|c| c.id.parse::<i64>().is_ok()));

    // Without `since`, the first comment is time zero.
    let cues = parse_vtt(&bounded(history.vtt("m", None, None)).await.unwrap());
    assert_eq!(cues.len(), 6);
    assert_eq!(cues[0].start_ms, 0);
    assert_eq!(
        bounded(history.vtt("nobody", None, None)).await.unwrap(),
        "WEBVTT\n"
    );
}

#[tokio::test]
async fn a_file_that_is_not_history_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let retention = Duration::from_secs(86_400);

    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "these are my notes, not a database\n".repeat(200)).unwrap();
    let err = History::open(&text, retention).err().expect("an error");
    assert!(matches!(err, HistoryError::NotADatabase { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("notes.txt") && message.contains("not an SQLite database"));
    assert!(message.contains("hint:"));
    // Untouched.
    assert!(std::fs::read_to_string(&text)
        .unwrap()
        .starts_with("these are my notes"));

    // An SQLite header on garbage pages.
    let corrupt = dir.path().join("corrupt.sqlite");
    let mut bytes = b"SQLite format 3\0".to_vec();
    bytes.extend((0..8192u32).map(|i| (i * 7919 % 251) as u8));
    std::fs::write(&corrupt, bytes).unwrap();
    let err = History::open(&corrupt, retention).err().expect("an error");
    assert!(matches!(err, HistoryError::NotADatabase { .. }), "{err:?}");

    // Someone else's database.
    let foreign = dir.path().join("foreign.sqlite");
    rusqlite::Connection::open(&foreign)
        .unwrap()
        .execute_batch("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
        .unwrap();
    let err = History::open(&foreign, retention).err().expect("an error");
    assert!(matches!(err, HistoryError::Foreign { .. }), "{err:?}");

    // A newer kibitz's history.
    let newer = dir.path().join("newer.sqlite");
    drop(History::open(&newer, retention).unwrap());
    rusqlite::Connection::open(&newer)
        .unwrap()
        .execute_batch("UPDATE schema_version SET version = 99")
        .unwrap();
    let err = History::open(&newer, retention).err().expect("an error");
    assert!(
        matches!(err, HistoryError::NewerSchema { found: 99, .. }),
        "{err:?}"
    );

    // A folder where the file should be.
    let err = History::open(dir.path(), retention)
        .err()
        .expect("an error");
    assert!(matches!(err, HistoryError::Open { .. }), "{err:?}");
}

#[tokio::test]
async fn record_never_blocks_even_when_the_writer_is_stuck() {
    let history = History::in_memory().unwrap();
    let (paused_tx, paused) = std::sync::mpsc::channel();
    let (resume, resume_rx) = std::sync::mpsc::channel();
    history
        .queue()
        .try_send(Msg::Pause {
            paused: paused_tx,
            resume: resume_rx,
        })
        .unwrap();
    paused.recv_timeout(LIMIT).expect("writer paused");

    let extra = 1000;
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut queued = 0;
    for i in 0..QUEUE + extra {
        let one = Instant::now();
        queued += usize::from(history.record(entry("s", T0 + i as i64, "stuck")));
        slowest = slowest.max(one.elapsed());
    }
    let total = started.elapsed();
    assert_eq!(queued, QUEUE);
    assert_eq!(history.dropped(), extra as u64);
    assert!(total < Duration::from_secs(1), "{total:?}");
    assert!(slowest < Duration::from_millis(50), "{slowest:?}");

    resume.send(()).unwrap();
    bounded(history.flush()).await.unwrap();
    assert_eq!(count(&history).await, QUEUE as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_run_beside_a_busy_writer() {
    let dir = tempfile::tempdir().unwrap();
    let history = History::open(dir.path().join("h.sqlite"), Duration::ZERO).unwrap();
    let writer = {
        let history = history.clone();
        tokio::spawn(async move {
            for i in 0..20_000 {
                while !history.record(entry("busy", T0 + i, "the writer is busy")) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                if i % 1000 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            bounded(history.flush()).await.unwrap();
        })
    };
    let mut reads = 0;
    bounded(async {
        while !writer.is_finished() {
            let page = search(
                &history,
                Query {
                    q: Some("busy".into()),
                    limit: Some(10),
                    ..Query::default()
                },
            )
            .await;
            assert!(page.entries.len() <= 10);
            reads += 1;
        }
    })
    .await;
    bounded(writer).await.unwrap();
    assert!(reads > 0);
    assert_eq!(count(&history).await, 20_000);
}

#[tokio::test]
async fn ids_follow_time_even_out_of_order_and_crowded() {
    let history = History::in_memory().unwrap();
    // Late entries, a crowded millisecond (more than the thousand ids it has), times before
    // 1970 and beyond the last exact id.
    history.record(entry("s", T0 + 10, "later"));
    for i in 0..1005 {
        history.record(entry("s", T0, &format!("crowd {i}")));
    }
    history.record(entry("s", T0 + 1, "next ms"));
    history.record(entry("s", T0 - 5, "earlier"));
    history.record(entry("s", -42, "before 1970"));
    history.record(entry("s", i64::MAX, "far future"));
    bounded(history.flush()).await.unwrap();
    assert_eq!(history.dropped(), 0);
    assert_eq!(count(&history).await, 1010);

    let mut all = Vec::new();
    let mut before = None;
    loop {
        let page = search(
            &history,
            Query {
                limit: Some(MAX_LIMIT),
                before,
                ..Query::default()
            },
        )
        .await;
        all.extend(page.entries);
        match page.next {
            Some(next) => before = Some(next),
            None => break,
        }
    }
    assert_eq!(all.len(), 1010);
    assert!(all.windows(2).all(|w| w[0].id > w[1].id));
    let id_of = |text: &str| all.iter().find(|s| s.entry.text == text).unwrap().id;
    assert_eq!(id_of("crowd 0"), T0 * 1000);
    assert_eq!(id_of("crowd 999"), T0 * 1000 + 999);
    // The crowd spills into the next millisecond, ahead of what was recorded there later.
    assert_eq!(id_of("crowd 1000"), (T0 + 1) * 1000);
    assert_eq!(id_of("next ms"), (T0 + 1) * 1000 + 5);
    assert_eq!(id_of("earlier"), (T0 - 5) * 1000);
    assert_eq!(id_of("later"), (T0 + 10) * 1000);
    assert_eq!(id_of("before 1970"), 0);
    assert!(id_of("far future") < 1 << 53);
    // Stored times are kept as given.
    let far = all.iter().find(|s| s.entry.text == "far future").unwrap();
    assert_eq!(far.entry.wall_ms, i64::MAX);
}

#[tokio::test]
async fn searches_stop_at_the_page_instead_of_sorting() {
    let history = History::in_memory().unwrap();
    let queries = [
        Query::default(),
        Query {
            q: Some("ball goal".into()),
            ..Query::default()
        },
        Query {
            q: Some("ball".into()),
            stream: Some("s".into()),
            since_ms: Some(T0),
            until_ms: Some(T0 + 1),
            before: Some("5".parse().unwrap()),
            ..Query::default()
        },
        Query {
            stream: Some("s".into()),
            since_ms: Some(T0),
            ..Query::default()
        },
    ];
    for query in queries {
        let (sql, args) = read::search_sql(&query, 50);
        let plan: Vec<String> = bounded(history.read(move |conn| {
            let mut st = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
            let rows = st.query_map(rusqlite::params_from_iter(args), |row| row.get(3))?;
            Ok(rows.collect::<Result<_, _>>()?)
        }))
        .await
        .unwrap();
        assert!(
            !plan.iter().any(|step| step.contains("TEMP B-TREE")),
            "{query:?}: {plan:?}"
        );
        assert!(
            !plan.iter().any(|step| step == "SCAN e"),
            "{query:?}: {plan:?}"
        );
    }
}
