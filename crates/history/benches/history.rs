//! Insert rate and search latency of the history on a file in a temporary folder.
//!
//! `cargo bench -p kibitz-history` (release); `HISTORY_BENCH_ROWS=1000000` for the issue's
//! million rows. Plain timing rather than Criterion: the write rate is a pipeline through the
//! writer thread, measured as rows per second from the first `record` to the last commit.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kibitz_history::{Entry, History, Kind, Query};

const WORDS: &[&str] = &[
    "the", "a", "player", "ball", "pass", "goal", "keeper", "crowd", "van", "gate", "door",
    "person", "walks", "runs", "leaves", "arrives", "left", "right", "corner", "field", "red",
    "white", "blue", "car", "truck", "bicycle", "dog", "cat", "tree", "light", "rain", "sun",
    "slowly", "quickly", "near", "behind", "in", "front", "of", "towards", "away", "from",
    "camera", "street", "yard", "window", "shadow", "two", "three", "people", "talk", "stand",
    "sits", "bench", "waves", "jumps", "kicks", "throws", "catches", "misses", "scores", "shot",
    "header", "tackle", "foul", "referee", "whistle", "cheers", "quiet", "busy", "empty",
];

/// A small deterministic generator, so every run stores the same text.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as usize
    }
}

fn main() {
    let rows: i64 = std::env::var("HISTORY_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(rows));
}

async fn run(rows: i64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("history.sqlite");
    let history = History::open(&path, Duration::from_secs(3650 * 86_400)).unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // One comment a second, newest now, over four streams.
    let t0 = now - rows * 1000;
    let mut rng = Lcg(7);
    let entries: Vec<Entry> = (0..rows)
        .map(|i| {
            let n = 10 + rng.next() % 15;
            let mut text: Vec<&str> = (0..n).map(|_| WORDS[rng.next() % WORDS.len()]).collect();
            if i % 1000 == 0 {
                text.push("zeppelin");
            }
            Entry {
                kind: Kind::Comment,
                stream: format!("cam-{}", i % 4),
                wall_ms: t0 + i * 1000,
                media_start: Some(i as f64),
                media_end: Some(i as f64 + 2.0),
                profile: "sports".into(),
                instruction: "Describe what happens.".into(),
                text: text.join(" ") + ".",
                latency_s: Some(0.8),
                question: None,
            }
        })
        .collect();

    // Chunks smaller than the queue, each flushed: nothing is dropped, and the time is the
    // writer's (batched transactions with FTS triggers), not the producer's.
    let started = Instant::now();
    for chunk in entries.chunks(2000) {
        for e in chunk {
            assert!(history.record(e.clone()));
        }
        history.flush().await.unwrap();
    }
    let took = started.elapsed();
    assert_eq!(history.dropped(), 0);
    let size = std::fs::metadata(&path).map_or(0, |m| m.len())
        + std::fs::metadata(path.with_extension("sqlite-wal")).map_or(0, |m| m.len());
    println!(
        "write: {rows} rows in {:.2} s = {:.0} rows/s; file {:.1} MB",
        took.as_secs_f64(),
        rows as f64 / took.as_secs_f64(),
        size as f64 / 1e6
    );

    // Write-ahead: what one comment waits before viewers see it (`record_committed`, one
    // at a time, as a stream's relay does): a commit of its own each.
    let mut waits = Vec::new();
    for e in entries.iter().take(300) {
        let started = Instant::now();
        assert!(history.record_committed(e.clone()).await);
        waits.push(started.elapsed());
    }
    waits.sort();
    let at = |p: f64| waits[((waits.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;
    println!(
        "write-ahead (record_committed, one at a time, synchronous=NORMAL): median {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        at(0.5),
        at(0.99),
        at(1.0)
    );

    let q = |text: &str| Query {
        q: Some(text.into()),
        ..Query::default()
    };
    let deep = history
        .search(Query {
            limit: Some(1),
            before: None,
            since_ms: Some(t0 + rows * 500),
            until_ms: Some(t0 + rows * 500 + 1000),
            ..Query::default()
        })
        .await
        .unwrap()
        .entries[0]
        .clone();
    let deep_cursor = deep.id.to_string().parse().unwrap();
    let cases: Vec<(&str, Query)> = vec![
        ("latest 50, no text", Query::default()),
        (
            "latest 50 of one stream",
            Query {
                stream: Some("cam-2".into()),
                ..Query::default()
            },
        ),
        ("rare word (1 in 1000)", q("zeppelin")),
        ("common word", q("ball")),
        ("two common words", q("ball goal")),
        ("prefix 'wal'", q("wal")),
        ("hostile text", q("NEAR(\"ball\" OR -goal*")),
        (
            "common word, one stream, last hour",
            Query {
                stream: Some("cam-1".into()),
                since_ms: Some(now - 3_600_000),
                ..q("ball")
            },
        ),
        (
            "page from the middle (cursor)",
            Query {
                before: Some(deep_cursor),
                ..Query::default()
            },
        ),
        (
            "common word, page from the middle",
            Query {
                before: Some(deep_cursor),
                ..q("ball")
            },
        ),
    ];
    for (name, query) in cases {
        let mut times = Vec::new();
        let mut found = 0;
        for _ in 0..30 {
            let started = Instant::now();
            let page = history.search(query.clone()).await.unwrap();
            times.push(started.elapsed());
            found = page.entries.len();
        }
        report(name, &mut times, found);
    }
    let mut times = Vec::new();
    for _ in 0..30 {
        let started = Instant::now();
        let last = history.last("cam-3", 50).await.unwrap();
        times.push(started.elapsed());
        assert_eq!(last.len(), 50);
    }
    report("last(stream, 50)", &mut times, 50);
    let mut times = Vec::new();
    let mut cues = 0;
    for _ in 0..10 {
        let started = Instant::now();
        let vtt = history
            .vtt("cam-0", Some(now - 3_600_000), Some(now))
            .await
            .unwrap();
        times.push(started.elapsed());
        cues = vtt.matches(" --> ").count();
    }
    report("vtt of the last hour", &mut times, cues);
}

fn report(name: &str, times: &mut [Duration], found: usize) {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "search {name:<36} median {:>7.2} ms  max {:>7.2} ms  ({found} rows)",
        ms(times[times.len() / 2]),
        ms(times[times.len() - 1])
    );
}
