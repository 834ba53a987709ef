//! The llama engine as a batched scheduler: several streams on one context, each with its own
//! KV-cache sequence, on the tiny random-weight model on the CPU. Streams go through the
//! [`Scheduler`] as in `kibitz serve`: one `Session` each, frames pushed as they arrive.
#![cfg(feature = "llama")]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kibitz_engine::llama::{EngineState, LlamaConfig, LlamaEngine};
use kibitz_engine::models::ModelFiles;
use kibitz_engine::{
    Engine, EngineError, Frame, Generation, Image, Output, Priority, Request, Scheduler, Session,
    Stats,
};
use kibitz_frames::Rgb;
use kibitz_synthetic_model::{write_pair, Quant, Spec};

const LIMIT: Duration = Duration::from_secs(120);

fn tiny() -> &'static ModelFiles {
    static PAIR: OnceLock<(tempfile::TempDir, ModelFiles)> = OnceLock::new();
    &PAIR
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let pair = write_pair(dir.path(), &Spec::tiny()).unwrap();
            (
                dir,
                ModelFiles {
                    llm: pair.llm,
                    mmproj: pair.mmproj,
                },
            )
        })
        .1
}

/// The tiny pair with F32 weights: what is left of a difference is the KV path's own.
fn tiny_f32() -> &'static ModelFiles {
    static PAIR: OnceLock<(tempfile::TempDir, ModelFiles)> = OnceLock::new();
    &PAIR
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let spec = Spec {
                quant: Quant::F32,
                ..Spec::tiny()
            };
            let pair = write_pair(dir.path(), &spec).unwrap();
            (
                dir,
                ModelFiles {
                    llm: pair.llm,
                    mmproj: pair.mmproj,
                },
            )
        })
        .1
}

fn engine(max_streams: u32) -> Arc<LlamaEngine> {
    engine_of(tiny(), max_streams)
}

/// One KV buffer per stream: a stream's cells are laid out the same whatever the others
/// do, so batched answers are bit-identical to serial ones (see `unified` below).
fn engine_of(files: &ModelFiles, max_streams: u32) -> Arc<LlamaEngine> {
    engine_with(files, max_streams, false)
}

fn engine_with(files: &ModelFiles, max_streams: u32, kv_unified: bool) -> Arc<LlamaEngine> {
    engine_configured(files, max_streams, |c| c.kv_unified = kv_unified)
}

fn engine_configured(
    files: &ModelFiles,
    max_streams: u32,
    adjust: impl FnOnce(&mut LlamaConfig),
) -> Arc<LlamaEngine> {
    let mut config = LlamaConfig::new(&files.llm, &files.mmproj);
    config.threads = Some(1);
    config.context_size = 1024;
    config.max_streams = max_streams;
    adjust(&mut config);
    Arc::new(LlamaEngine::load(config).expect("the tiny model loads"))
}

fn scheduler(engine: &Arc<LlamaEngine>) -> Scheduler {
    let dyn_engine: Arc<dyn Engine> = engine.clone();
    Scheduler::new(dyn_engine)
}

/// A small frame; `look` picks the picture (pictures are encoded once and cached by
/// content), `pts_ms` its time.
fn frame(look: u32, pts_ms: u64) -> Frame {
    let (w, h) = (64u32, 48u32);
    let data: Vec<u8> = (0..w * h * 3)
        .map(|i| ((i * (look * 7 + 3)) % 251) as u8)
        .collect();
    Frame {
        image: Image::Rgb(Rgb {
            width: w,
            height: h,
            data: data.into(),
        }),
        pts: Duration::from_millis(pts_ms),
    }
}

fn request(frames: Vec<Frame>, user: &str, max_tokens: u32) -> Request {
    let mut r = Request::new(frames, "You are a live commentator.", user);
    r.max_tokens = max_tokens;
    r.sampling.temperature = 0.0; // greedy: the same prompt gives the same answer
    r
}

async fn answer(mut g: Generation) -> Result<(String, Stats), EngineError> {
    let mut text = String::new();
    loop {
        match tokio::time::timeout(LIMIT, g.next())
            .await
            .expect("no stall")
        {
            Some(Ok(Output::Text(t))) => text.push_str(&t),
            Some(Ok(Output::Done(stats))) => return Ok((text, stats)),
            Some(Err(e)) => return Err(e),
            None => panic!("the answer ended without Done"),
        }
    }
}

async fn state(engine: &Arc<LlamaEngine>) -> EngineState {
    let engine = engine.clone();
    tokio::task::spawn_blocking(move || engine.state(LIMIT).expect("the worker answers"))
        .await
        .unwrap()
}

/// Stream `i`'s frames: two pictures of its own, alternating, one every 500 ms.
fn stream_frame(i: u32, k: u64) -> Frame {
    frame(10 * i + (k % 2) as u32, 500 * k)
}

/// Three commentary cycles of stream `i`: each pushes two new frames as they "arrive", then
/// asks about the newest four.
async fn three_cycles(session: Session, i: u32) -> Vec<String> {
    let mut answers = Vec::new();
    let mut pushed = 0u64;
    for cycle in 0..3u64 {
        let newest = 4 + 2 * cycle;
        while pushed < newest {
            session.push_frame(stream_frame(i, pushed));
            pushed += 1;
        }
        let frames = (newest - 4..newest).map(|k| stream_frame(i, k)).collect();
        let turn = tokio::time::timeout(LIMIT, session.turn(Priority::Commentary, None))
            .await
            .unwrap()
            .unwrap();
        let user = format!("Stream {i}, cycle {cycle}: what is new?");
        let g = turn.submit(request(frames, &user, 12)).unwrap();
        answers.push(answer(g).await.unwrap().0);
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_streams_at_once_answer_as_four_serial_runs() {
    let serial = {
        let engine = engine(4);
        let s = scheduler(&engine);
        let mut all = Vec::new();
        for i in 0..4 {
            let session = s.open_session(&format!("s{i}"));
            all.push(three_cycles(session.clone(), i).await);
            session.close();
        }
        all
    };
    let engine = engine(4);
    let s = scheduler(&engine);
    let runs: Vec<_> = (0..4)
        .map(|i| tokio::spawn(three_cycles(s.open_session(&format!("s{i}")), i)))
        .collect();
    let mut batched = Vec::new();
    for run in runs {
        batched.push(run.await.unwrap());
    }
    assert_eq!(batched, serial, "batched answers differ from serial ones");
    for (i, answers) in serial.iter().enumerate() {
        for (j, other) in serial.iter().enumerate().skip(i + 1) {
            assert_ne!(answers, other, "streams {i} and {j} answered the same");
        }
    }
    assert_eq!(engine.in_flight(), 0);
}

/// With one KV buffer for all streams (the default), a stream's cells sit wherever they
/// were free, so attention sums the same terms in another order: the same frames and
/// question give logits that differ by rounding only, and greedy answers of the random
/// model may part after a near tie.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_streams_in_one_kv_buffer_differ_from_serial_runs_by_rounding_only() {
    let mut probes = Vec::new();
    for unified in [false, true] {
        let engine = engine_with(tiny_f32(), 4, unified);
        let s = scheduler(&engine);
        let sessions: Vec<Session> = (0..4).map(|i| s.open_session(&format!("s{i}"))).collect();
        let runs: Vec<_> = (0..4)
            .map(|i| tokio::spawn(three_cycles(sessions[i].clone(), i as u32)))
            .collect();
        for run in runs {
            run.await.unwrap();
        }
        probes.push(probe_last_windows(engine, &sessions).await);
    }
    let (agree, worst) = agreement(&probes[0], &probes[1]);
    eprintln!("unified vs split KV: top token agrees for {agree}/4 streams, largest logit difference {worst:.2e}");
    assert_eq!(agree, 4);
    // Measured 5.1e-3 with the largest logit about 3 (CPU, flash attention on the F16 KV
    // cache, whose accumulation follows the cell order).
    assert!(worst < 2e-2, "largest logit difference {worst:.2e}");
}

/// Streams with the same system piece share its cells: one stream evaluates it, the others
/// copy it (`seq_cp`) and start at their frames; their logits are those of streams that
/// evaluate their own, up to rounding (cells lie elsewhere in the one buffer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_of_one_system_piece_share_its_cells() {
    let mut probes = Vec::new();
    for share in [false, true] {
        let engine = engine_configured(tiny_f32(), 4, |c| {
            c.kv_unified = true;
            c.share_system = share;
        });
        let s = scheduler(&engine);
        let sessions: Vec<Session> = (0..4).map(|i| s.open_session(&format!("s{i}"))).collect();
        let runs: Vec<_> = (0..4)
            .map(|i| tokio::spawn(three_cycles(sessions[i].clone(), i as u32)))
            .collect();
        for run in runs {
            assert_eq!(run.await.unwrap().len(), 3);
        }
        let st = state(&engine).await;
        let shared = st.sequences.iter().filter(|q| q.shared_system).count();
        let profile = engine.step_profile();
        if share {
            assert_eq!(shared, 3, "one evaluates, three copy: {st:?}");
            assert!(profile.copies >= 3, "{profile:?}");
        } else {
            assert_eq!(shared, 0, "{st:?}");
            assert_eq!(profile.copies, 0, "{profile:?}");
        }
        // A stream that comes later copies the piece from the template at once.
        let late = s.open_session("late");
        let g = late
            .try_turn()
            .unwrap()
            .submit(request(vec![stream_frame(7, 0)], "Hi?", 2))
            .unwrap();
        let (_, stats) = answer(g).await.unwrap();
        assert_eq!(stats.cached_tokens > 0, share, "{stats:?}");
        probes.push(probe_last_windows(engine, &sessions).await);
    }
    let (agree, worst) = agreement(&probes[0], &probes[1]);
    eprintln!("shared vs own system piece: top token agrees for {agree}/4 streams, largest logit difference {worst:.2e}");
    assert_eq!(agree, 4);
    assert!(worst < 2e-2, "largest logit difference {worst:.2e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_one_stream_mid_batch_leaves_the_others_intact() {
    let engine = engine(4);
    let s = scheduler(&engine);
    let long = |i: u32| {
        let mut r = request(
            (0..2).map(|k| stream_frame(i, k)).collect(),
            &format!("Stream {i}: describe everything."),
            40,
        );
        r.ignore_eos = true;
        r
    };
    // Alone, one after another (fresh sessions each time, so nothing is reused).
    let mut alone = Vec::new();
    for i in 0..3 {
        let session = s.open_session(&format!("alone{i}"));
        let g = session.try_turn().unwrap().submit(long(i)).unwrap();
        alone.push(answer(g).await.unwrap().0);
        session.close();
    }
    let sessions: Vec<Session> = (0..3).map(|i| s.open_session(&format!("s{i}"))).collect();
    let mut gens: Vec<Generation> = (0..3)
        .map(|i| {
            sessions[i]
                .try_turn()
                .unwrap()
                .submit(long(i as u32))
                .unwrap()
        })
        .collect();
    // Stream 1 goes away after its first pieces, while the others are mid-answer.
    let mut seen = 0;
    while seen < 2 {
        match tokio::time::timeout(LIMIT, gens[1].next()).await.unwrap() {
            Some(Ok(Output::Text(_))) => seen += 1,
            other => panic!("expected text, got {other:?}"),
        }
    }
    let cancelled = gens.remove(1);
    drop(cancelled);
    let third = gens.pop().unwrap();
    let first = gens.pop().unwrap();
    let (first, third) = tokio::join!(answer(first), answer(third));
    let (first, first_stats) = first.unwrap();
    assert_eq!(first, alone[0]);
    assert_eq!(third.unwrap().0, alone[2]);
    assert_eq!(first_stats.generated_tokens, 40);
    // The cancelled stream's sequence is back to its frames, ready for its next request.
    let st = state(&engine).await;
    assert_eq!(engine.in_flight(), 0);
    assert!(st.sequences.iter().all(|q| !q.generating), "{st:?}");
    let g = sessions[1].try_turn().unwrap().submit(long(1)).unwrap();
    assert_eq!(answer(g).await.unwrap().0, alone[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_arriving_mid_cycle_goes_in_after_the_answer() {
    let engine = engine(2);
    let s = scheduler(&engine);
    let session = s.open_session("cam");
    let frames: Vec<Frame> = (0..5).map(|k| stream_frame(0, k)).collect();
    for f in &frames[..4] {
        session.push_frame(f.clone());
    }
    let mut r = request(frames[..4].to_vec(), "What is new?", 30);
    r.ignore_eos = true;
    let mut g = session.try_turn().unwrap().submit(r).unwrap();
    match tokio::time::timeout(LIMIT, g.next()).await.unwrap() {
        Some(Ok(Output::Text(_))) => {}
        other => panic!("expected text, got {other:?}"),
    }
    // Captured while the answer runs: held until the question and answer are removed.
    session.push_frame(frames[4].clone());
    let (_, stats) = answer(g).await.unwrap();
    assert_eq!(stats.generated_tokens, 30);
    let st = state(&engine).await;
    let seq = &st.sequences[0];
    assert_eq!((seq.frames, seq.pending), (4, 0), "{st:?}");
    assert_eq!(
        seq.cells, seq.positions,
        "no question or answer left: {st:?}"
    );
    // The next cycle finds all four of its frames in the sequence: only its question is new.
    let r = request(frames[1..].to_vec(), "What is new now?", 4);
    let (_, stats) = answer(session.try_turn().unwrap().submit(r).unwrap())
        .await
        .unwrap();
    assert_eq!(stats.reused_images, 4, "{stats:?}");
    assert_eq!(stats.vision_ms, 0.0, "{stats:?}");
    assert_eq!(
        stats.cached_tokens as i32, seq.held,
        "only the question is evaluated: {stats:?}"
    );
}

/// Largest absolute difference and whether the top token agrees.
/// The question of stream `i`'s last window in `three_cycles` (the frames it holds now).
fn last_window(i: u32) -> Request {
    request(
        (6..10).map(|k| stream_frame(i, k)).collect(),
        &format!("Stream {i}: and now?"),
        4,
    )
}

/// Each stream's logits for the question of its last window, in session order.
async fn probe_last_windows(engine: Arc<LlamaEngine>, sessions: &[Session]) -> Vec<Vec<f32>> {
    let keys: Vec<_> = sessions.iter().map(|s| s.key().clone()).collect();
    tokio::task::spawn_blocking(move || {
        keys.iter()
            .enumerate()
            .map(|(i, key)| {
                engine
                    .probe(Some(key), last_window(i as u32), LIMIT)
                    .unwrap()
            })
            .collect()
    })
    .await
    .unwrap()
}

/// For two probes of the same streams: how many agree on the top token, and the largest
/// logit difference of any.
fn agreement(a: &[Vec<f32>], b: &[Vec<f32>]) -> (u32, f32) {
    a.iter().zip(b).fold((0, 0f32), |(agree, worst), (x, y)| {
        let (diff, same_top) = compare(x, y);
        (agree + same_top as u32, worst.max(diff))
    })
}

fn compare(a: &[f32], b: &[f32]) -> (f32, bool) {
    let top = |v: &[f32]| (0..v.len()).max_by(|&i, &j| v[i].total_cmp(&v[j])).unwrap();
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    (diff, top(a) == top(b))
}

/// What a long run showed.
struct LongRun {
    most_held: i32,
    most_positions: i32,
    most_cached: usize,
    worst: f32,
    spread: f32,
    agree: u32,
    checks: u32,
    shifts: u64,
    removes: u64,
    series: Vec<String>,
}

/// 10,000 frames (83 minutes at 2 fps) pushed into one stream, a cycle every 1,000; after
/// each cycle the incremental sequence is compared with the same cycle built from scratch.
async fn ten_thousand_frames(lazy_shifts: bool) -> LongRun {
    let engine = engine_configured(tiny_f32(), 2, |c| {
        c.kv_unified = false;
        c.lazy_shifts = lazy_shifts;
    });
    let s = scheduler(&engine);
    let session = s.open_session("long");
    let mut run = LongRun {
        most_held: 0,
        most_positions: 0,
        most_cached: 0,
        worst: 0.0,
        spread: 0.0,
        agree: 0,
        checks: 0,
        shifts: 0,
        removes: 0,
        series: Vec::new(),
    };
    let total = 10_000u64;
    let window = |k: u64| -> Vec<Frame> {
        (k - 3..=k)
            .map(|j| frame((j % 4) as u32, 500 * j))
            .collect()
    };
    for k in 0..total {
        session.push_frame(frame((k % 4) as u32, 500 * k));
        // Frames come every 0.5 s and the engine is done with each long before the next;
        // waiting every second frame keeps the test short and still moves every frame.
        if k % 2 == 1 {
            let st = state(&engine).await;
            for q in &st.sequences {
                run.most_positions = run.most_positions.max(q.positions);
            }
        }
        if (k + 1) % 1000 != 0 {
            continue;
        }
        let g = session
            .try_turn()
            .unwrap()
            .submit(request(window(k), "What is new?", 4))
            .unwrap();
        let (_, stats) = answer(g).await.unwrap();
        if k > 1000 {
            assert_eq!(stats.reused_images, 4, "{stats:?}");
        }
        let st = state(&engine).await;
        let seq = st
            .sequences
            .iter()
            .find(|q| q.stream == session.key().id())
            .unwrap();
        assert!(seq.frames <= 4 && seq.pending == 0, "{st:?}");
        assert_eq!(seq.cells, seq.positions, "{st:?}");
        run.most_held = run.most_held.max(seq.held);
        run.most_cached = run.most_cached.max(st.cached_embeddings);

        let (engine2, key) = (engine.clone(), session.key().clone());
        let (incremental, scratch) = tokio::task::spawn_blocking(move || {
            let r = request(window(k), "What is new?", 4);
            let incremental = engine2.probe(Some(&key), r.clone(), LIMIT).unwrap();
            // The shared sequence of requests without a stream holds other frames: these
            // four go in fresh, after the system prompt.
            let scratch = engine2.probe(None, r, LIMIT).unwrap();
            (incremental, scratch)
        })
        .await
        .unwrap();
        let (diff, same_top) = compare(&incremental, &scratch);
        let largest = scratch.iter().fold(0f32, |m, x| m.max(x.abs()));
        run.spread = run.spread.max(largest);
        run.series.push(format!("{diff:.3}/{largest:.3}"));
        run.worst = run.worst.max(diff);
        run.agree += same_top as u32;
        run.checks += 1;
    }
    let profile = engine.step_profile();
    (run.shifts, run.removes) = (profile.shifts, profile.removes);
    eprintln!(
        "drift after {total} frames ({} shifts): top token agrees in {}/{} cycles, largest logit difference {:.2e}; {} shifts and {} removals; per check (difference/largest logit): {}",
        if lazy_shifts { "lazy" } else { "eager" },
        run.agree,
        run.checks,
        run.worst,
        run.shifts,
        run.removes,
        run.series.join(" ")
    );
    run
}

/// The default, lazy shifts: a frame leaving is removed and positions keep their gaps
/// until the sequence nears its position limit; then one shift closes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_frames_keep_a_stream_bounded_and_its_cycles_close_to_scratch() {
    let run = ten_thousand_frames(true).await;
    // [system][4 frames of ~75 positions] whatever the running time...
    assert!(run.most_held < 400, "cells held grew to {}", run.most_held);
    // ...at positions that walk up to the limit (the tiny model's 4,096) and come back.
    assert!(run.most_positions <= 4096, "{}", run.most_positions);
    assert!(
        run.most_positions > 1024,
        "the gaps were used: {}",
        run.most_positions
    );
    assert!(
        run.most_cached <= 4,
        "embeddings cached: {}",
        run.most_cached
    );
    // A removal each time frames leave (two at a time here: the test waits every second
    // frame), and a shift only when the positions near the limit (measured 187 against
    // 4,528 with eager shifts).
    assert!(run.removes >= 4_000, "{} removals", run.removes);
    assert!(run.shifts * 10 < run.removes, "{} shifts", run.shifts);
    // The kept frames were evaluated attending to frames that have left since, which a
    // cycle from scratch never saw: a bounded difference on this random model, the same
    // after 1,000 frames as after 10,000 (docs/design.md, drift).
    assert_eq!(run.agree, run.checks, "{}", run.series.join(" "));
    assert!(run.worst < 0.2 * run.spread, "{}", run.series.join(" "));
}

/// Eager shifts (every leaving frame shifts the rest down at once), for comparison.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_frames_with_eager_shifts_stay_contiguous() {
    let run = ten_thousand_frames(false).await;
    assert!(run.most_held < 400, "cells held grew to {}", run.most_held);
    assert!(run.most_positions < 400, "{}", run.most_positions);
    assert!(run.shifts >= 4_000, "a shift a removal: {}", run.shifts);
    assert_eq!(run.agree, run.checks, "{}", run.series.join(" "));
    assert!(run.worst < 0.2 * run.spread, "{}", run.series.join(" "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_added_and_removed_a_hundred_times_leaks_no_sequence() {
    let engine = engine(3);
    let s = scheduler(&engine);
    let steady = s.open_session("steady");
    steady.push_frame(frame(1, 0));
    let before = state(&engine).await;
    for round in 0..100u64 {
        let session = s.open_session(&format!("visitor{round}"));
        session.push_frame(frame(2, 500 * round));
        if round % 10 == 0 {
            let g = session
                .try_turn()
                .unwrap()
                .submit(request(vec![frame(2, 500 * round)], "Hi?", 2))
                .unwrap();
            answer(g).await.unwrap();
        }
        session.close();
    }
    let after = state(&engine).await;
    assert_eq!(after.sequences.len(), 1, "{after:?}");
    assert_eq!(after.free, before.free, "{after:?}");
    assert_eq!(after.sequences[0].stream, before.sequences[0].stream);
    assert_eq!(engine.in_flight(), 0);
    // More streams than sequences: the one idle longest gives its sequence up.
    let sessions: Vec<Session> = (0..5)
        .map(|i| s.open_session(&format!("many{i}")))
        .collect();
    for (i, session) in sessions.iter().enumerate() {
        let g = session
            .try_turn()
            .unwrap()
            .submit(request(vec![frame(3, i as u64)], "Hi?", 2))
            .unwrap();
        answer(g).await.unwrap();
    }
    let st = state(&engine).await;
    assert_eq!(st.sequences.len() + st.free, 4, "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_put_each_stream_on_the_least_loaded_engine_and_keep_it_there() {
    use kibitz_engine::llama::Replicas;
    let engines: Vec<Arc<dyn Engine>> = vec![engine(2), engine(2)];
    let replicas = Arc::new(Replicas::new(engines));
    let dyn_engine: Arc<dyn Engine> = replicas.clone();
    let s = Scheduler::new(dyn_engine);
    assert_eq!(s.status().concurrency, 4, "two replicas of two streams");
    let sessions: Vec<Session> = (0..3).map(|i| s.open_session(&format!("s{i}"))).collect();
    for (i, session) in sessions.iter().enumerate() {
        session.push_frame(stream_frame(i as u32, 0));
    }
    assert_eq!(replicas.streams(), [2, 1]);
    let placed: Vec<Option<usize>> = sessions
        .iter()
        .map(|s| replicas.replica_of(s.key()))
        .collect();
    assert_eq!(placed, [Some(0), Some(1), Some(0)]);
    for (i, session) in sessions.iter().enumerate() {
        let r = request(vec![stream_frame(i as u32, 0)], "Hi?", 3);
        let g = session.try_turn().unwrap().submit(r).unwrap();
        answer(g).await.unwrap();
        assert_eq!(
            replicas.replica_of(session.key()),
            placed[i],
            "streams stay put"
        );
    }
    sessions[0].close();
    assert_eq!(replicas.streams(), [1, 1]);
    let late = s.open_session("late");
    late.push_frame(stream_frame(9, 0));
    assert_eq!(replicas.streams().iter().sum::<usize>(), 3);
    assert_eq!(replicas.in_flight(), 0);
}

/// A llama engine replica that can be made to fail as one whose worker thread stopped
/// does: every request is refused as unavailable, with the engine's own words, and it says
/// it can take nothing.
struct Stoppable {
    engine: Arc<LlamaEngine>,
    stopped: std::sync::atomic::AtomicBool,
}

impl Stoppable {
    fn is_stopped(&self) -> bool {
        self.stopped.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn refused() -> EngineError {
        EngineError::Unavailable("the llama engine thread has stopped".into())
    }
}

impl Engine for Stoppable {
    fn submit(&self, request: Request) -> Result<Generation, EngineError> {
        if self.is_stopped() {
            return Err(Self::refused());
        }
        self.engine.submit(request)
    }
    fn submit_for(
        &self,
        stream: &kibitz_engine::StreamKey,
        priority: Priority,
        request: Request,
    ) -> Result<Generation, EngineError> {
        if self.is_stopped() {
            return Err(Self::refused());
        }
        self.engine.submit_for(stream, priority, request)
    }
    fn push_frame(&self, stream: &kibitz_engine::StreamKey, frame: Frame) {
        if !self.is_stopped() {
            self.engine.push_frame(stream, frame);
        }
    }
    fn close_stream(&self, stream: &kibitz_engine::StreamKey) {
        self.engine.close_stream(stream);
    }
    fn info(&self) -> kibitz_engine::EngineInfo {
        self.engine.info()
    }
    fn in_flight(&self) -> usize {
        self.engine.in_flight()
    }
    fn health(&self) -> futures::future::BoxFuture<'_, bool> {
        let up = !self.is_stopped();
        Box::pin(async move { up })
    }
    fn parallelism(&self) -> usize {
        if self.is_stopped() {
            0
        } else {
            self.engine.parallelism()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_replica_hands_its_streams_to_the_other_which_prefills_them_anew() {
    use kibitz_engine::llama::Replicas;
    // Room for all three streams on each, as `serve --gpus` sizes them.
    let failing = Arc::new(Stoppable {
        engine: engine(3),
        stopped: false.into(),
    });
    let engines: Vec<Arc<dyn Engine>> = vec![failing.clone(), engine(3)];
    let replicas = Arc::new(Replicas::new(engines));
    let dyn_engine: Arc<dyn Engine> = replicas.clone();
    let s = Scheduler::new(dyn_engine);
    let sessions: Vec<Session> = (0..3).map(|i| s.open_session(&format!("s{i}"))).collect();
    let frames = |i: usize| -> Vec<Frame> { (0..4).map(|k| stream_frame(i as u32, k)).collect() };
    let cycle = |i: usize| {
        let session = sessions[i].clone();
        let r = request(frames(i), "What is new?", 3);
        async move {
            let turn = tokio::time::timeout(LIMIT, session.turn(Priority::Commentary, None))
                .await
                .unwrap()
                .unwrap();
            answer(turn.submit(r).unwrap()).await.unwrap().1
        }
    };
    for (i, session) in sessions.iter().enumerate() {
        for f in frames(i) {
            session.push_frame(f);
        }
    }
    assert_eq!(replicas.streams(), [2, 1]);
    for i in 0..3 {
        cycle(i).await;
    }

    failing
        .stopped
        .store(true, std::sync::atomic::Ordering::SeqCst);
    // Every stream's next cycle is answered; the two of the failed replica moved to the
    // other one, which had none of their frames and so encodes and evaluates them anew.
    for i in [0, 2, 1] {
        let stats = cycle(i).await;
        let moved = i != 1;
        if moved {
            assert_eq!(stats.reused_images, 0, "s{i} re-prefilled: {stats:?}");
            assert!(stats.vision_ms > 0.0, "s{i} re-encoded: {stats:?}");
        } else {
            assert_eq!(stats.reused_images, 4, "s1 kept its sequence: {stats:?}");
        }
    }
    assert_eq!(replicas.streams(), [0, 3]);
    assert_eq!(
        s.status().concurrency,
        3,
        "the scheduler follows the survivor"
    );
    let status = replicas.status();
    assert_eq!(status["replicas"][0]["up"], false, "{status}");
    assert_eq!(
        status["replicas"][1]["streams"],
        serde_json::json!(["s0", "s1", "s2"]),
        "{status}"
    );
    assert!(replicas
        .metrics()
        .contains("kibitz_replica_streams{replica=\"1\"} 3\n"));
    assert!(replicas.health().await);
}

/// Not a check: what the levers of issue 14 change on the CPU, at 16 streams of the tiny
/// model (three cycles each, frames pushed as they arrive). Prints, per setting, the prompt
/// tokens a cycle evaluates (prompt minus cached) and the cells the sequences hold per
/// step. Run with `--ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_levers_at_sixteen_streams() {
    // About the length of a profile's system prompt, and the two question wordings.
    let system = "You are a live commentator watching a video as it happens. ".repeat(24);
    let long = "Here are 4 frames, oldest first, covering the last 3.0 seconds.\nYour last comment was: \"The runner in red takes the lead on the inside lane.\". Do not repeat it; say only what is new.\nWhat is happening now? If nothing meaningful changed, answer exactly: ...";
    let short = "Your last comment was: \"The runner in red takes the lead on the inside lane.\".\nWhat is new now?";
    for (name, share, lazy, user) in [
        (
            "before (own system, eager shifts, long question)",
            false,
            false,
            long,
        ),
        ("short question", false, false, short),
        ("short question + shared system", true, false, short),
        ("all levers (+ lazy shifts)", true, true, short),
    ] {
        let engine = engine_configured(tiny(), 16, |c| {
            c.kv_unified = true;
            c.share_system = share;
            c.lazy_shifts = lazy;
            c.context_size = 0;
        });
        let s = scheduler(&engine);
        let runs: Vec<_> = (0..16u32)
            .map(|i| {
                let session = s.open_session(&format!("s{i}"));
                let (system, user) = (system.clone(), user.to_string());
                tokio::spawn(async move {
                    let mut evaluated = Vec::new();
                    for cycle in 0..4u64 {
                        let newest = 4 + 2 * cycle;
                        for k in newest.saturating_sub(2)..newest {
                            session.push_frame(stream_frame(i, k));
                        }
                        let frames = (newest - 4..newest).map(|k| stream_frame(i, k)).collect();
                        let turn = session.turn(Priority::Commentary, None).await.unwrap();
                        let mut r = Request::new(frames, system.clone(), user.clone());
                        r.max_tokens = 8;
                        r.ignore_eos = true;
                        let (_, stats) = answer(turn.submit(r).unwrap()).await.unwrap();
                        if cycle > 0 {
                            evaluated.push(stats.prompt_tokens - stats.cached_tokens);
                        }
                    }
                    evaluated
                })
            })
            .collect();
        let mut evaluated = Vec::new();
        for run in runs {
            evaluated.extend(run.await.unwrap());
        }
        let mean = evaluated.iter().sum::<u32>() as f64 / evaluated.len() as f64;
        let p = engine.step_profile();
        let b = p.recent.unwrap();
        eprintln!(
            "{name}: prompt tokens evaluated a cycle (after the first) {mean:.0}; cells in use per step p50 {:.0} mean {:.0}; shifts {} removes {} copies {} over {} steps",
            b.cells.p50, b.cells.mean, p.shifts, p.removes, p.copies, p.steps
        );
    }
}
