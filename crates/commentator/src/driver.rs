//! The tokio task around [`Commentator`]: it waits on the engine's answer, user controls,
//! shutdown and the machine's next deadline, and carries data between them and the
//! machine. No decisions are made here.

use std::sync::Arc;

use kibitz_engine::{Engine, EngineError, Generation, Output as EngineOutput};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::commentator::{Commentator, Input, Output, Snapshot};
use crate::event::{Control, Event};
use crate::window::FrameWindow;

/// Runs the commentary loop until `shutdown` is cancelled. Events go to `events` (sent
/// even when nobody listens), the status to `snapshot` whenever it changes. A closed
/// `controls` channel only means no more changes.
pub async fn run(
    mut commentator: Commentator,
    window: Arc<dyn FrameWindow>,
    engine: Arc<dyn Engine>,
    events: broadcast::Sender<Event>,
    mut controls: mpsc::Receiver<Control>,
    snapshot: watch::Sender<Snapshot>,
    shutdown: CancellationToken,
) {
    let mut generation: Option<Generation> = None;
    let mut controls_open = true;
    loop {
        let deadline = loop {
            match commentator.poll_output() {
                Output::Infer { cycle, request } => match engine.submit(request) {
                    Ok(g) => generation = Some(g),
                    Err(err) => {
                        tracing::warn!(cycle, %err, "engine refused the commentary request");
                        commentator.handle_input(Input::Failed(err, now()));
                    }
                },
                Output::Cancel { cycle } => {
                    tracing::warn!(
                        cycle,
                        "abandoning a commentary cycle that ran past its timeout"
                    );
                    generation = None;
                }
                Output::Emit(event) => {
                    let _ = events.send(event);
                }
                Output::NeedFrames { count, stride } => {
                    let frames = window.sample(count, stride);
                    let engine_in_flight = engine.in_flight();
                    commentator.handle_input(Input::Frames {
                        now: now(),
                        frames,
                        engine_in_flight,
                    });
                }
                Output::Timeout(at) => break at,
            }
        };
        snapshot.send_if_modified(|current| {
            let fresh = commentator.snapshot();
            let changed = *current != fresh;
            *current = fresh;
            changed
        });

        let input = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            item = next_output(&mut generation) => match item {
                Some(Ok(EngineOutput::Text(text))) => Input::Token(text, now()),
                Some(Ok(EngineOutput::Done(stats))) => Input::Done(stats, now()),
                Some(Err(err)) => Input::Failed(err, now()),
                None => Input::Failed(
                    EngineError::Stopped("the answer ended before it was complete".into()),
                    now(),
                ),
            },
            control = controls.recv(), if controls_open => match control {
                Some(control) => Input::Control(control),
                None => {
                    controls_open = false;
                    continue;
                }
            },
            _ = tokio::time::sleep_until(deadline.into()) => Input::Tick(now()),
        };
        if matches!(input, Input::Done(..) | Input::Failed(..)) {
            generation = None;
        }
        commentator.handle_input(input);
    }
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

/// The clock the machine runs on: tokio's, so `tokio::time::pause()` drives it in tests.
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kibitz_engine::fake::{split_pieces, FakeEngine, Script};
    use kibitz_engine::Request;

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
    }

    fn start(engine: &FakeEngine, config: CommentatorConfig) -> Running {
        let window = Arc::new(SteadyWindow::new(now(), Duration::from_millis(500)));
        let commentator = Commentator::new(config, now()).unwrap();
        let (events_tx, events) = broadcast::channel(1024);
        let (controls, controls_rx) = mpsc::channel(8);
        let (snapshot_tx, snapshot) = watch::channel(Snapshot::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            commentator,
            window,
            Arc::new(engine.clone()),
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
                Event::Source { .. } => unreachable!("the loop reports no source events"),
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
    async fn waits_for_a_busy_engine_then_asks_with_fresh_frames() {
        // Every answer takes 5 s; another caller's request occupies the engine first.
        let engine = FakeEngine::saying("Busy.", Duration::from_secs(5), Duration::from_millis(10));
        let other = engine
            .submit(Request::new(vec![], "sys", "someone else"))
            .unwrap();
        let mut running = start(&engine, CommentatorConfig::default());
        let events = until_cycles(&mut running, 1).await;
        drop(other);

        let starts: Vec<&Vec<f64>> = events
            .iter()
            .filter_map(|(_, e)| match e {
                Event::CycleStart { frames, .. } => Some(frames),
                _ => None,
            })
            .collect();
        // Enough frames exist from 3 s on, but the engine is busy until 5 s: the cycle
        // waits and then takes the frames of that moment.
        assert!(*starts[0].last().unwrap() >= 5.0, "{:?}", starts[0]);
        assert!(running.snapshot.borrow().engine_busy_waits > 0);
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
}
