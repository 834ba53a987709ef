//! The tokio task around [`Commentator`]: it waits on the engine's turn and answer, user
//! controls, the window's captures, shutdown and the machine's next deadline, and carries
//! data between them and the machine. No decisions are made here.
//!
//! The engine is reached through this stream's [`Session`] on the shared scheduler. When
//! the machine asks for frames, the task first takes the stream's commentary turn and only
//! then samples the window, so a cycle that waited gets the frames of the moment the engine
//! became free (late binding). Controls and shutdown are still served while it waits. A turn
//! the machine does not use (the frames were not fresh, or the scene-change gate found them
//! unchanged) goes straight back to the scheduler for the other streams.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use kibitz_engine::{EngineError, Generation, Output as EngineOutput, Priority, Session, Turn};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::commentator::{Commentator, Input, Output, Snapshot};
use crate::event::{Control, Event};
use crate::window::FrameWindow;

/// Runs the commentary loop until `shutdown` is cancelled or `session` is closed. Events go
/// to `events` (sent even when nobody listens), the status to `snapshot` whenever it
/// changes. A closed `controls` channel only means no more changes. Ending drops the
/// session's handle (closing it if it is the last one), which cancels a running request.
pub async fn run(
    mut commentator: Commentator,
    window: Arc<dyn FrameWindow>,
    session: Session,
    events: broadcast::Sender<Event>,
    mut controls: mpsc::Receiver<Control>,
    snapshot: watch::Sender<Snapshot>,
    shutdown: CancellationToken,
) {
    let mut pending = Pending {
        generation: None,
        turn: None,
        queued: None,
    };
    let mut controls_open = true;
    // Captures wake the machine when the window can tell of them; otherwise it polls.
    let mut captures = window.captures();
    // `None`: the session was closed, and the loop has nothing left to do.
    while let Some(deadline) = drain(
        &mut commentator,
        window.as_ref(),
        &session,
        &events,
        &mut pending,
    ) {
        // Not used by a cycle: back to the scheduler for the other streams.
        pending.turn = None;
        snapshot.send_if_modified(|current| {
            let fresh = commentator.snapshot();
            let changed = *current != fresh;
            *current = fresh;
            changed
        });

        let input = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            item = next_output(&mut pending.generation) => match item {
                Some(Ok(EngineOutput::Text(text))) => Input::Token(text, now()),
                Some(Ok(EngineOutput::Done(stats))) => Input::Done(stats, now()),
                Some(Err(err)) => Input::Failed(err, now()),
                None => Input::Failed(
                    EngineError::Stopped("the answer ended before it was complete".into()),
                    now(),
                ),
            },
            granted = next_turn(&mut pending.queued) => {
                let Some(Queued { count, stride, .. }) = pending.queued.take() else {
                    unreachable!("a turn came without being queued");
                };
                match granted {
                    Ok(granted) => {
                        pending.turn = Some(granted);
                        Input::Frames { now: now(), frames: window.sample(count, stride) }
                    }
                    Err(err) => {
                        stopped(&session, &err);
                        break;
                    }
                }
            },
            control = controls.recv(), if controls_open => match control {
                Some(control) => Input::Control(control),
                None => {
                    controls_open = false;
                    continue;
                }
            },
            told = next_capture(&mut captures) => {
                if !told {
                    // The source is gone: nothing more will be captured.
                    captures = None;
                    continue;
                }
                Input::Captured(now())
            },
            _ = tokio::time::sleep_until(deadline.into()) => Input::Tick(now()),
        };
        if matches!(input, Input::Done(..) | Input::Failed(..)) {
            pending.generation = None;
        }
        commentator.handle_input(input);
    }
}

/// What the task holds for the machine between its outputs and its next input.
struct Pending<'a> {
    /// The running request's answer.
    generation: Option<Generation>,
    /// The turn taken for the frames just handed to the machine: used by the `Infer` that
    /// follows them, or given back.
    turn: Option<Turn>,
    /// A turn being waited for.
    queued: Option<Queued<'a>>,
}

/// Carries out the machine's outputs until it asks to be woken: the deadline, or `None`
/// once the session is closed and the loop has nothing left to do.
fn drain<'a>(
    commentator: &mut Commentator,
    window: &dyn FrameWindow,
    session: &'a Session,
    events: &broadcast::Sender<Event>,
    pending: &mut Pending<'a>,
) -> Option<std::time::Instant> {
    loop {
        match commentator.poll_output() {
            Output::Infer { cycle, request } => {
                let submitted = match pending.turn.take() {
                    Some(turn) => turn.submit(request),
                    // The machine starts a cycle only from frames, and frames come with a turn.
                    None => Err(EngineError::Unavailable(
                        "the commentary loop asked without an engine turn".into(),
                    )),
                };
                match submitted {
                    Ok(g) => pending.generation = Some(g),
                    Err(err) => {
                        tracing::warn!(cycle, %err, "engine refused the commentary request");
                        commentator.handle_input(Input::Failed(err, now()));
                    }
                }
            }
            Output::Cancel { cycle } => {
                tracing::warn!(
                    cycle,
                    "abandoning a commentary cycle that ran past its timeout"
                );
                pending.generation = None;
            }
            Output::Emit(event) => {
                let _ = events.send(event);
            }
            Output::NeedFrames {
                count,
                stride,
                newest,
            } => match session.try_turn() {
                Ok(granted) => {
                    pending.turn = Some(granted);
                    let frames = window.sample(count, stride);
                    commentator.handle_input(Input::Frames { now: now(), frames });
                }
                Err(EngineError::Busy(_)) => {
                    pending.queued = Some(Queued {
                        turn: Box::pin(session.turn(Priority::Commentary, newest)),
                        count,
                        stride,
                    });
                    commentator.handle_input(Input::Waiting(now()));
                }
                Err(err) => {
                    stopped(session, &err);
                    return None;
                }
            },
            Output::Timeout(at) => return Some(at),
        }
    }
}

/// A commentary turn being waited for, and what to sample once it comes.
struct Queued<'a> {
    turn: Pin<Box<dyn Future<Output = Result<Turn, EngineError>> + Send + 'a>>,
    count: usize,
    stride: usize,
}

/// The next item of the running request; never resolves when there is none.
async fn next_output(
    generation: &mut Option<Generation>,
) -> Option<Result<EngineOutput, EngineError>> {
    match generation {
        Some(generation) => generation.next().await,
        None => std::future::pending().await,
    }
}

/// Whether a frame was captured since the last call (`false` once the window can no longer
/// tell); never resolves without a window that tells.
async fn next_capture(captures: &mut Option<watch::Receiver<u64>>) -> bool {
    match captures {
        Some(captures) => captures.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// The queued turn; never resolves when none is queued.
async fn next_turn(queued: &mut Option<Queued<'_>>) -> Result<Turn, EngineError> {
    match queued {
        Some(queued) => queued.turn.as_mut().await,
        None => std::future::pending().await,
    }
}

/// The session was closed: the stream is being removed, and the loop has nothing left to do.
fn stopped(session: &Session, err: &EngineError) {
    tracing::info!(stream = session.stream(), %err, "commentary loop stops");
}

/// The clock the machine runs on: tokio's, so `tokio::time::pause()` drives it in tests.
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kibitz_engine::fake::{split_pieces, FakeEngine, Script};
    use kibitz_engine::{Request, Scheduler};

    use super::*;
    use crate::config::CommentatorConfig;
    use crate::event::CycleEnd;
    use crate::window::fake::SteadyWindow;

    struct Running {
        events: broadcast::Receiver<Event>,
        controls: mpsc::Sender<Control>,
        snapshot: watch::Receiver<Snapshot>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
        started: tokio::time::Instant,
    }

    /// One loop alone on `engine`.
    fn start(engine: &FakeEngine, config: CommentatorConfig) -> Running {
        let scheduler = Scheduler::new(Arc::new(engine.clone()));
        start_on(scheduler.open_session("only"), Duration::ZERO, config)
    }

    /// A loop on `session` of a shared scheduler, its 2 fps source starting `offset` from
    /// now.
    fn start_on(session: Session, offset: Duration, config: CommentatorConfig) -> Running {
        let window = Arc::new(SteadyWindow::new(
            now() + offset,
            Duration::from_millis(500),
        ));
        let commentator = Commentator::new(config, now()).unwrap();
        let (events_tx, events) = broadcast::channel(1024);
        let (controls, controls_rx) = mpsc::channel(8);
        let (snapshot_tx, snapshot) = watch::channel(Snapshot::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            commentator,
            window,
            session,
            events_tx,
            controls_rx,
            snapshot_tx,
            shutdown.clone(),
        ));
        Running {
            events,
            controls,
            snapshot,
            shutdown,
            task,
            started: tokio::time::Instant::now(),
        }
    }

    /// Collects events (with the fake time they arrived) until `cycles` cycles have ended
    /// one way or the other.
    async fn until_cycles(
        running: &mut Running,
        cycles: usize,
    ) -> Vec<(tokio::time::Instant, Event)> {
        let mut seen = Vec::new();
        let mut ended = 0;
        while ended < cycles {
            let event = tokio::time::timeout(Duration::from_secs(600), running.events.recv())
                .await
                .expect("the loop went quiet")
                .expect("event channel open");
            if matches!(
                event,
                Event::CycleEnd(_) | Event::Error { cycle: Some(_), .. }
            ) {
                ended += 1;
            }
            seen.push((tokio::time::Instant::now(), event));
        }
        seen
    }

    fn answer(text: &str) -> Script {
        Script::Answer(split_pieces(text))
    }

    // One scripted story from start to end (a cycle, a skip, a control, a failure, shutdown)
    // read top to bottom; split, it would lose the order it checks.
    #[tokio::test(start_paused = true)]
    async fn several_cycles_end_to_end() {
        let engine = FakeEngine::new(
            vec![
                answer("A dog runs."),
                answer("..."),
                Script::Fail("boom".into()),
                answer("The dog jumps."),
            ],
            Duration::from_millis(300),
            Duration::from_millis(50),
        );
        let mut running = start(&engine, CommentatorConfig::default());

        let first = until_cycles(&mut running, 1).await;
        running
            .controls
            .send(Control::SetProfile("nature".into()))
            .await
            .unwrap();
        let rest = until_cycles(&mut running, 3).await;
        let events: Vec<_> = first.iter().chain(&rest).collect();

        // Per cycle: a start, then tokens, then one end or error; cycles never overlap.
        let mut current = None;
        let mut text = String::new();
        let mut outcomes = Vec::new();
        for (_, event) in &events {
            match event {
                Event::CycleStart { cycle, frames } => {
                    assert_eq!(
                        current, None,
                        "cycle {cycle} started before the previous ended"
                    );
                    assert_eq!(frames.len(), 4);
                    assert!(
                        frames.windows(2).all(|w| (w[1] - w[0] - 1.0).abs() < 1e-9),
                        "{frames:?}"
                    );
                    current = Some(*cycle);
                    text.clear();
                }
                Event::Token { cycle, text: piece } => {
                    assert_eq!(Some(*cycle), current);
                    text.push_str(piece);
                }
                Event::CycleEnd(end) => {
                    assert_eq!(Some(end.cycle), current.take());
                    assert_eq!(end.text, text);
                    outcomes.push(if end.skipped {
                        "skip".to_string()
                    } else {
                        end.text.clone()
                    });
                }
                Event::Error { cycle, message } => {
                    assert_eq!(*cycle, current.take());
                    assert!(message.contains("boom"), "{message}");
                    outcomes.push("error".into());
                }
                Event::Source { .. }
                | Event::Speech { .. }
                | Event::AnswerStart { .. }
                | Event::AnswerToken { .. }
                | Event::AnswerEnd { .. }
                | Event::Alert { .. } => {
                    unreachable!("the loop reports no source or speech events")
                }
            }
        }
        assert_eq!(outcomes, ["A dog runs.", "skip", "error", "The dog jumps."]);

        // Each cycle starts at least an interval after the previous one ended.
        let mut last_end = None;
        for (at, event) in &events {
            match event {
                Event::CycleStart { .. } => {
                    if let Some(end) = last_end {
                        assert!(*at - end >= Duration::from_secs(1));
                    }
                }
                Event::CycleEnd(_) | Event::Error { .. } => last_end = Some(*at),
                _ => {}
            }
        }

        // The delay moved from 5.0 towards the first cycle's latency and stayed for the skip.
        let ends: Vec<&CycleEnd> = events.iter().filter_map(|(_, e)| cycle_end(e)).collect();
        let expected = 0.2 * ends[0].latency + 0.8 * 5.0;
        assert!((ends[0].target_delay - expected).abs() < 1e-9);
        assert_eq!(ends[1].target_delay, ends[0].target_delay);

        let requests = engine.requests();
        assert_eq!(requests.len(), 4);
        assert_eq!(requests[0].system, system_of("default"));
        assert_eq!(
            requests[1].system,
            system_of("nature"),
            "the control reached the next request"
        );
        assert!(requests[2]
            .user
            .contains("Your last comment was: \"A dog runs.\""));
        assert!(requests[3]
            .user
            .contains("Your last comment was: \"A dog runs.\""));
        let newest = |r: &Request| r.frames.last().unwrap().pts;
        assert!(requests.windows(2).all(|w| newest(&w[1]) > newest(&w[0])));

        let snapshot = running.snapshot.borrow().clone();
        assert_eq!(
            (
                snapshot.cycles_done,
                snapshot.cycles_skipped,
                snapshot.cycles_failed
            ),
            (3, 1, 1)
        );
        assert_eq!(snapshot.profile, "nature");
        assert_eq!(snapshot.last_comment.as_deref(), Some("The dog jumps."));

        running.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), running.task)
            .await
            .expect("stops on shutdown")
            .unwrap();
    }

    fn cycle_end(event: &Event) -> Option<&CycleEnd> {
        match event {
            Event::CycleEnd(end) => Some(end),
            _ => None,
        }
    }

    fn system_of(profile: &str) -> String {
        crate::profile::Profiles::get(profile)
            .unwrap()
            .system_prompt()
    }

    #[tokio::test(start_paused = true)]
    async fn a_cycle_starts_on_the_captured_frame_itself() {
        // A poll this long would show: the cycle would wait up to 10 s for its next look.
        let config = CommentatorConfig {
            poll: Duration::from_secs(10),
            ..CommentatorConfig::default()
        };
        let engine = FakeEngine::saying("Here.", Duration::from_millis(300), Duration::ZERO);
        let scheduler = Scheduler::new(Arc::new(engine));
        let window = Arc::new(kibitz_frames::InferenceWindow::new(32));
        let watched = Arc::new(crate::WatchedWindow::new(window.clone()));
        let start = tokio::time::Instant::now();
        // A 2 fps source out of step with any poll: frame k is captured at 37 ms + k * 0.5 s,
        // and every second one (the sampled set, stride 2) is announced.
        let feeder = tokio::spawn({
            let watched = watched.clone();
            async move {
                for k in 0u64.. {
                    let at = start + Duration::from_millis(37 + 500 * k);
                    tokio::time::sleep_until(at).await;
                    let stamp = kibitz_frames::Stamp {
                        pts: Duration::from_millis(500 * k),
                        captured: at.into_std(),
                    };
                    let seq = window.push(stamp, crate::window::fake::moving(k));
                    if seq.is_multiple_of(2) {
                        watched.captured(seq);
                    }
                }
            }
        });
        let commentator = Commentator::new(config, now()).unwrap();
        let (events_tx, mut events) = broadcast::channel(1024);
        let (_controls, controls_rx) = mpsc::channel(8);
        let (snapshot_tx, _snapshot) = watch::channel(Snapshot::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            commentator,
            watched as Arc<dyn FrameWindow>,
            scheduler.open_session("pushed"),
            events_tx,
            controls_rx,
            snapshot_tx,
            shutdown.clone(),
        ));
        let mut starts = Vec::new();
        while starts.len() < 2 {
            let event = tokio::time::timeout(Duration::from_secs(60), events.recv())
                .await
                .expect("the loop went quiet")
                .unwrap();
            if let Event::CycleStart { frames, .. } = event {
                starts.push((tokio::time::Instant::now() - start, frames));
            }
        }
        // Four sampled frames (seq 0, 2, 4, 6) exist once seq 6 is captured at 3.037 s: the
        // cycle starts then, not at a poll.
        assert_eq!(starts[0].0, Duration::from_millis(3037));
        assert_eq!(starts[0].1, [0.0, 1.0, 2.0, 3.0]);
        // The answer ends at 3.337 s, the next is due a second later; the first sampled frame
        // after that is seq 10 at 5.037 s.
        assert_eq!(starts[1].0, Duration::from_millis(5037));
        assert_eq!(starts[1].1, [2.0, 3.0, 4.0, 5.0]);
        shutdown.cancel();
        task.await.unwrap();
        feeder.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_its_turn_then_asks_with_the_newest_frames() {
        // Every answer takes 5 s; another stream's request occupies the engine first.
        let engine = FakeEngine::saying("Busy.", Duration::from_secs(5), Duration::from_millis(10));
        let scheduler = Scheduler::new(Arc::new(engine.clone()));
        let other = scheduler.open_session("other");
        let answer = other
            .try_turn()
            .unwrap()
            .submit(Request::new(vec![], "sys", "someone else"))
            .unwrap();
        let answer = tokio::spawn(answer.collect());
        let mut running = start_on(
            scheduler.open_session("loop"),
            Duration::ZERO,
            CommentatorConfig::default(),
        );
        let events = until_cycles(&mut running, 1).await;
        assert!(
            answer.await.unwrap().is_ok(),
            "the other request was not disturbed"
        );

        let (started_at, frames) = events
            .iter()
            .find_map(|(at, e)| match e {
                Event::CycleStart { frames, .. } => Some((*at, frames)),
                _ => None,
            })
            .unwrap();
        // Enough frames exist from 3 s on, but the engine is busy until 5 s: the cycle
        // waits for its turn and then takes the frames of that moment.
        assert_eq!(*frames, [2.0, 3.0, 4.0, 5.0]);
        assert_eq!(started_at - running.started, Duration::from_secs(5));
        let snapshot = running.snapshot.borrow().clone();
        assert_eq!(snapshot.engine_busy_waits, 1);
        running.shutdown.cancel();
        running.task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_engine_is_cancelled_and_the_loop_goes_on() {
        let engine =
            FakeEngine::saying("Late.", Duration::from_secs(60), Duration::from_millis(10));
        let config = CommentatorConfig {
            cycle_timeout: Duration::from_secs(10),
            ..CommentatorConfig::default()
        };
        let mut running = start(&engine, config);
        let events = until_cycles(&mut running, 2).await;
        let errors: Vec<Option<u64>> = events
            .iter()
            .filter_map(|(_, e)| match e {
                Event::Error { cycle, .. } => Some(*cycle),
                _ => None,
            })
            .collect();
        assert_eq!(errors, [Some(1), Some(2)]);
        // The cancelled request left the engine (the fake notices at its first token), so
        // the second cycle did not wait on our own abandoned request forever.
        assert_eq!(engine.requests().len(), 2);
        running.shutdown.cancel();
        running.task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn removing_a_stream_mid_cycle_frees_the_engine_for_the_others() {
        let engine = FakeEngine::saying("Slow.", Duration::from_secs(5), Duration::from_millis(10));
        let scheduler = Scheduler::new(Arc::new(engine.clone()));
        let a = start_on(
            scheduler.open_session("a"),
            Duration::ZERO,
            CommentatorConfig::default(),
        );
        let b = start_on(
            scheduler.open_session("b"),
            Duration::ZERO,
            CommentatorConfig::default(),
        );
        // Both are due with enough frames at 3 s: one runs, the other waits for its turn.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let status = scheduler.status();
        let running: Vec<&str> = status
            .sessions
            .iter()
            .filter(|s| s.running == 1)
            .map(|s| s.stream.as_str())
            .collect();
        assert_eq!(running.len(), 1, "{status:?}");
        assert_eq!(status.waiting.commentary, 1, "{status:?}");
        let (removed, mut kept) = if running[0] == "a" { (a, b) } else { (b, a) };

        removed.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), removed.task)
            .await
            .expect("the removed loop stops")
            .unwrap();
        let removed_at = tokio::time::Instant::now();
        let events = until_cycles(&mut kept, 1).await;
        let started_at = events
            .iter()
            .find_map(|(at, e)| matches!(e, Event::CycleStart { .. }).then_some(*at))
            .unwrap();
        // Not after the removed stream's answer would have ended (8 s): at once.
        assert_eq!(started_at, removed_at);
        let streams: Vec<String> = scheduler
            .status()
            .sessions
            .into_iter()
            .map(|s| s.stream)
            .collect();
        assert_eq!(streams.len(), 1);
        assert_ne!(streams[0], running[0]);
        kept.shutdown.cancel();
        kept.task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn closing_the_session_elsewhere_ends_the_loop() {
        let engine = FakeEngine::saying("Slow.", Duration::from_secs(5), Duration::from_millis(10));
        let scheduler = Scheduler::new(Arc::new(engine));
        let session = scheduler.open_session("cam");
        let mut running = start_on(
            session.clone(),
            Duration::ZERO,
            CommentatorConfig::default(),
        );
        // Mid-cycle (started at 3 s, answer due at 8 s), the stream is removed.
        tokio::time::sleep(Duration::from_secs(4)).await;
        session.close();
        let events = until_cycles(&mut running, 1).await;
        assert!(
            matches!(&events.last().unwrap().1, Event::Error { cycle: Some(1), message } if message.contains("stream 'cam' was closed")),
            "{events:?}"
        );
        tokio::time::timeout(Duration::from_secs(5), running.task)
            .await
            .expect("the loop ends when its session closes")
            .unwrap();
        assert!(scheduler.status().sessions.is_empty());
    }

    /// What one stream's events showed over a long run.
    #[derive(Debug, Default)]
    struct Tally {
        cycles: u64,
        errors: u64,
        /// Longest time between two cycle ends.
        longest_gap: Duration,
        /// Longest newest-frame-to-answer latency, seconds.
        worst_latency: f64,
    }

    async fn tally(mut events: broadcast::Receiver<Event>) -> Tally {
        let mut tally = Tally::default();
        let mut last_end: Option<tokio::time::Instant> = None;
        loop {
            match events.recv().await {
                Ok(Event::CycleEnd(end)) => {
                    let at = tokio::time::Instant::now();
                    if let Some(last) = last_end {
                        tally.longest_gap = tally.longest_gap.max(at - last);
                    }
                    last_end = Some(at);
                    tally.cycles += 1;
                    tally.worst_latency = tally.worst_latency.max(end.latency);
                }
                Ok(Event::Error { .. }) => tally.errors += 1,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Closed) => return tally,
                Err(broadcast::error::RecvError::Lagged(n)) => panic!("missed {n} events"),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn three_streams_share_an_overloaded_engine_fairly_for_an_hour() {
        const HOUR: Duration = Duration::from_secs(3600);
        const ANSWER: Duration = Duration::from_millis(700);
        const FRAME: Duration = Duration::from_millis(500);
        let engine = FakeEngine::saying("Moving.", ANSWER, Duration::ZERO);
        let scheduler = Scheduler::new(Arc::new(engine.clone()));
        // Back to back: each stream alone would ask about once a second, three ask for
        // about twice what the engine can answer.
        let config = CommentatorConfig {
            interval: Duration::ZERO,
            ..CommentatorConfig::default()
        };
        let mut shutdowns = Vec::new();
        let mut loops = Vec::new();
        let mut tallies = Vec::new();
        // Sources out of step with each other.
        for (i, offset_ms) in [0, 170, 340].into_iter().enumerate() {
            let running = start_on(
                scheduler.open_session(&format!("s{i}")),
                Duration::from_millis(offset_ms),
                config.clone(),
            );
            tallies.push(tokio::spawn(tally(running.events)));
            shutdowns.push(running.shutdown);
            loops.push(running.task);
        }
        tokio::time::sleep(HOUR).await;
        for shutdown in &shutdowns {
            shutdown.cancel();
        }
        for task in loops {
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("stops on shutdown")
                .unwrap();
        }
        let mut tallied = Vec::new();
        for t in tallies {
            tallied.push(
                tokio::time::timeout(Duration::from_secs(5), t)
                    .await
                    .unwrap()
                    .unwrap(),
            );
        }

        let counts: Vec<u64> = tallied.iter().map(|t| t.cycles).collect();
        let total: u64 = counts.iter().sum();
        let mean = total as f64 / counts.len() as f64;
        for t in &tallied {
            assert!(
                (t.cycles as f64 - mean).abs() <= 0.2 * mean,
                "cycles per stream {counts:?}"
            );
            assert_eq!(t.errors, 0);
            // Nobody starved: each stream came round again after the two others' answers,
            // its own, and at most one frame period for a fresh frame.
            assert!(
                t.longest_gap <= 3 * ANSWER + FRAME,
                "{t:?}, counts {counts:?}"
            );
            // Late binding: a turn waited for ~1.4 s, but the frames were sampled when it
            // came, so the newest was at most a frame period old when the answer began.
            assert!(
                t.worst_latency <= (FRAME + ANSWER).as_secs_f64() + 1e-6,
                "{t:?}"
            );
        }
        // The engine was never left idle while streams waited.
        let capacity = HOUR.as_secs_f64() / ANSWER.as_secs_f64();
        assert!(
            total as f64 >= 0.95 * capacity,
            "{total} cycles of a possible {capacity:.0}"
        );
    }
}
