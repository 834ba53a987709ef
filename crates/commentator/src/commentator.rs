//! The commentary loop as a state machine with no clock and no I/O (the str0m shape).
//!
//! The caller feeds [`Input`]s (time, frames, engine output, user controls) and then
//! drains [`Output`]s until it gets [`Output::Timeout`], the instant to wake it next. All
//! decisions live here: when a cycle may start, which frames and prompt it uses, what its
//! answer means, how late the picture must be shown. The tokio task in `driver` only moves
//! data; tests drive the same machine with fake time.
//!
//! A cycle starts when the interval since the previous cycle's end has passed, the stream
//! has its turn on the engine, the window holds enough frames, and at least one of them is
//! newer than those of the previous cycle (a stalled source must not be asked about the same
//! picture again).
//!
//! Before a cycle asks, the scene-change gate compares its frames with the newest frame of
//! the last answered cycle (see [`crate::scene`] and
//! [`CommentatorConfig::scene_change_threshold`]). When nothing looks different, the cycle
//! still starts and ends, so clients see every `cycle_start` paired with a `cycle_end`, but
//! the end comes at once, skipped with reason `unchanged`: no question, no engine time (the
//! turn goes back unused), no change to the last comment or the sync delay.
//!
//! The engine is shared with other streams, and its scheduler decides whose turn it is
//! (`kibitz_engine::scheduler`). The machine asks for the turn before it looks at the
//! window ([`Output::NeedFrames`]), so a cycle that had to wait is built from the frames of
//! the moment the engine became free, never from a window that went stale in the queue.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use kibitz_engine::{EngineError, Frame, Image, Request, Stats};
use kibitz_frames::{Rgb, Stamp};
use serde::Serialize;

use crate::config::{CommentatorConfig, ConfigError, SCENE_MAX_QUIET};
use crate::event::{Control, CycleEnd, Event};
use crate::profile::{is_skip, Profile, Profiles};
use crate::scene::Thumbnail;
use crate::sync::SyncDelay;

/// What the outside world tells the machine.
#[derive(Debug)]
pub enum Input {
    /// The clock reached (at least) a deadline the machine asked for.
    Tick(Instant),
    /// The turn asked for by [`Output::NeedFrames`] was not free at once: the caller waits
    /// for it (as long as it takes) and then answers with `Frames`.
    Waiting(Instant),
    /// The answer to [`Output::NeedFrames`], once the turn is held: what the window holds
    /// now, oldest first.
    Frames {
        now: Instant,
        frames: Vec<(Stamp, Rgb)>,
    },
    /// A piece of the running cycle's answer.
    Token(String, Instant),
    /// The running cycle's answer is complete.
    Done(Stats, Instant),
    /// The running cycle's request was refused or failed.
    Failed(EngineError, Instant),
    Control(Control),
    /// A frame of the sampled set came into the window (the source tells the caller). A
    /// cycle that is due and waiting for frames looks again at once, so it starts on the
    /// captured frame itself. Once a caller has sent one, the machine stops polling the
    /// window for frames ([`CommentatorConfig::poll`] is for callers that cannot tell).
    Captured(Instant),
}

/// What the machine asks the outside world to do.
#[derive(Debug)]
pub enum Output {
    /// Submit this request with the turn taken for the `NeedFrames` just answered; feed its
    /// output back as `Token`/`Done`/`Failed`.
    Infer { cycle: u64, request: Request },
    /// Drop this cycle's request (it ran past the cycle timeout).
    Cancel { cycle: u64 },
    /// Publish this event.
    Emit(Event),
    /// A cycle is due. Wait for this stream's commentary turn on the engine (`newest`, the
    /// capture time of the newest frame of the last cycle, is the scheduler's fairness key),
    /// saying so with `Input::Waiting` if it is not free at once; then sample the window
    /// (`count` frames, every `stride`-th) and answer with `Input::Frames`. Give the turn
    /// back unless `Output::Infer` follows.
    NeedFrames {
        count: usize,
        stride: usize,
        newest: Option<Instant>,
    },
    /// Nothing more to do now: wake the machine with `Input::Tick` at this instant, or earlier
    /// when something else arrives.
    Timeout(Instant),
}

/// What the loop is doing, for status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Pausing between cycles (`INFERENCE_INTERVAL`).
    #[default]
    Idle,
    /// Due, but the window has too few frames or none newer than the last cycle's.
    WaitingForFrames,
    /// Due, and waiting for the engine's turn (other requests are ahead).
    WaitingForEngine,
    /// A request is with the engine.
    Running,
}

/// Counters and latest values for `/api/status` and metrics.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Snapshot {
    pub phase: Phase,
    /// The cycle now running, if any.
    pub cycle: Option<u64>,
    /// Cycles that got a complete answer, skips included.
    pub cycles_done: u64,
    /// Of `cycles_done`, those answered with "..." (nothing new).
    pub cycles_skipped: u64,
    /// Cycles the scene-change gate ended without asking the model (not in `cycles_done`).
    pub cycles_unchanged: u64,
    /// Cycles that ended with an error or ran past the cycle timeout.
    pub cycles_failed: u64,
    /// Times a due cycle had to wait for the engine (its turn was not free at once).
    pub engine_busy_waits: u64,
    /// Capture of the newest frame to the end of the answer, last completed cycle, seconds.
    pub last_latency: Option<f64>,
    /// Request sent to answer complete, last completed cycle.
    pub last_inference_ms: Option<f64>,
    /// Request sent to first piece of text, last completed cycle.
    pub last_first_token_ms: Option<f64>,
    /// The engine's own account of the last completed cycle.
    pub last_stats: Option<Stats>,
    /// Seconds behind real time the picture should be shown.
    pub target_delay: f64,
    /// False when `STREAM_DELAY_INIT` is 0.
    pub sync: bool,
    pub profile: String,
    pub instruction: String,
    pub last_comment: Option<String>,
    /// The scene-change gate's measure at the last cycle, in grey levels: the largest
    /// difference of its new frames from the newest frame of the last answered cycle. `None`
    /// with the gate off or nothing to compare with yet. What to look at when choosing
    /// `SCENE_CHANGE_THRESHOLD` for a camera.
    pub last_scene_change: Option<f64>,
    /// The pause between cycles now (`INFERENCE_INTERVAL`, changed by `Control::SetInterval`).
    pub interval_s: f64,
    /// Sum of every completed cycle's latency, seconds (with `cycles_done`, a Prometheus
    /// summary).
    pub latency_sum_s: f64,
    /// Sum of every completed cycle's time inside the engine, seconds.
    pub inference_sum_s: f64,
}

struct Cycle {
    id: u64,
    started: Instant,
    deadline: Instant,
    newest_captured: Instant,
    pts: Vec<f64>,
    text: String,
    /// How much of `text` has gone out as token events.
    emitted: usize,
    first_token_at: Option<Instant>,
    /// The newest frame, for later cycles to compare with once this one is answered
    /// (`None` with the scene-change gate off).
    seen: Option<Seen>,
}

/// A frame as the scene-change gate remembers it.
struct Seen {
    captured: Instant,
    thumbnail: Thumbnail,
}

enum State {
    /// Look at the window once the clock reaches `at`.
    Pausing {
        at: Instant,
    },
    /// Asked for the turn and frames at `since`; waiting for `Input::Frames`.
    Looking {
        since: Instant,
    },
    /// The caller is waiting for the engine's turn (since `since`), then sends `Frames`.
    Queued {
        since: Instant,
    },
    Running(Cycle),
}

pub struct Commentator {
    config: CommentatorConfig,
    profile: &'static Profile,
    instruction: String,
    delay: SyncDelay,
    state: State,
    /// Why the last look did not start a cycle (for status).
    waiting: Phase,
    out: VecDeque<Output>,
    next_cycle: u64,
    /// Capture time of the newest frame the last cycle used.
    last_newest: Option<Instant>,
    /// When the last cycle ended, to move `due` when the interval changes.
    last_end: Option<Instant>,
    /// When the next cycle became due (the end of the interval). It starts with a frame
    /// captured after that, so the newest frame is moments old when the engine gets it:
    /// at 2 fps, a frame already waiting would be up to half a second stale, and that age
    /// adds to every comment's latency and to the sync delay.
    due: Instant,
    last_comment: Option<String>,
    /// The newest frame of the last answered cycle: what the scene-change gate compares new
    /// frames with. Not that of the last cycle looked at, so a slow change adds up.
    answered: Option<Seen>,
    /// The caller tells of every capture (`Input::Captured`): a look that found no new
    /// frame waits for the next capture instead of polling.
    told_of_captures: bool,
    snapshot: Snapshot,
}

impl Commentator {
    /// A loop whose first look at the window is due at `now`.
    pub fn new(config: CommentatorConfig, now: Instant) -> Result<Self, ConfigError> {
        config.validate()?;
        let profile = Profiles::get(&config.profile)?;
        let delay = SyncDelay::new(config.delay_init, config.delay_alpha)?;
        let instruction = config.instruction.trim().to_string();
        Ok(Commentator {
            profile,
            instruction,
            delay,
            state: State::Pausing { at: now },
            waiting: Phase::Idle,
            out: VecDeque::new(),
            next_cycle: 1,
            last_newest: None,
            last_end: None,
            due: now,
            last_comment: None,
            answered: None,
            told_of_captures: false,
            snapshot: Snapshot::default(),
            config,
        })
    }

    pub fn config(&self) -> &CommentatorConfig {
        &self.config
    }

    pub fn sync_delay(&self) -> &SyncDelay {
        &self.delay
    }

    pub fn handle_input(&mut self, input: Input) {
        match input {
            Input::Tick(now) => self.tick(now),
            Input::Waiting(now) => self.queued(now),
            Input::Frames { now, frames } => self.look(now, frames),
            Input::Token(text, now) => self.token(text, now),
            Input::Done(stats, now) => self.done(stats, now),
            Input::Failed(err, now) => self.failed(err, now),
            Input::Control(control) => self.control(control),
            Input::Captured(now) => self.captured(now),
        }
    }

    /// The next thing to do; ends with `Output::Timeout` once there is nothing else.
    pub fn poll_output(&mut self) -> Output {
        if let Some(output) = self.out.pop_front() {
            return output;
        }
        Output::Timeout(match &self.state {
            State::Pausing { at } => *at,
            // Only reached when the caller did not answer `NeedFrames`: ask again later.
            State::Looking { since } => *since + self.config.poll,
            // Nothing is due until the turn comes, however long that takes; this only keeps
            // a deadline on the clock.
            State::Queued { since } => *since + self.config.cycle_timeout,
            State::Running(cycle) => cycle.deadline,
        })
    }

    pub fn snapshot(&self) -> Snapshot {
        let (phase, cycle) = match &self.state {
            State::Running(cycle) => (Phase::Running, Some(cycle.id)),
            _ => (self.waiting, None),
        };
        Snapshot {
            phase,
            cycle,
            target_delay: self.delay.value(),
            sync: self.delay.is_enabled(),
            profile: self.profile.name.to_string(),
            instruction: self.instruction.clone(),
            last_comment: self.last_comment.clone(),
            interval_s: self.config.interval.as_secs_f64(),
            ..self.snapshot.clone()
        }
    }

    fn tick(&mut self, now: Instant) {
        match &self.state {
            State::Pausing { at } if now >= *at => self.ask_for_frames(now),
            State::Looking { since } if now >= *since + self.config.poll => {
                self.ask_for_frames(now)
            }
            State::Queued { since } if now >= *since + self.config.cycle_timeout => {
                self.state = State::Queued { since: now };
            }
            State::Running(cycle) if now >= cycle.deadline => {
                let id = cycle.id;
                self.out.push_back(Output::Cancel { cycle: id });
                let message = format!(
                    "cycle {id} got no answer within {:.1} s and was abandoned; the engine may be stuck or overloaded",
                    self.config.cycle_timeout.as_secs_f64()
                );
                self.fail_cycle(id, message, now);
            }
            _ => {}
        }
    }

    fn ask_for_frames(&mut self, now: Instant) {
        self.state = State::Looking { since: now };
        self.out.push_back(Output::NeedFrames {
            count: self.config.frames_per_inference,
            stride: self.config.frame_stride,
            newest: self.last_newest,
        });
    }

    fn captured(&mut self, now: Instant) {
        self.told_of_captures = true;
        let waiting_for_frames = self.waiting == Phase::WaitingForFrames;
        if matches!(self.state, State::Pausing { .. }) && waiting_for_frames && now >= self.due {
            self.ask_for_frames(now);
        }
    }

    fn queued(&mut self, now: Instant) {
        if let State::Looking { .. } = self.state {
            self.state = State::Queued { since: now };
            self.waiting = Phase::WaitingForEngine;
            self.snapshot.engine_busy_waits += 1;
        }
    }

    fn look(&mut self, now: Instant, frames: Vec<(Stamp, Rgb)>) {
        let due = match &self.state {
            State::Looking { .. } | State::Queued { .. } => true,
            State::Pausing { at } => now >= *at,
            State::Running(_) => false,
        };
        if !due {
            return;
        }
        if now < self.due {
            // The interval grew while the turn was on its way.
            self.waiting = Phase::Idle;
            self.state = State::Pausing { at: self.due };
            return;
        }
        let newest = frames.last().map(|(stamp, _)| stamp.captured);
        let fresh = match (newest, self.last_newest) {
            (Some(newest), Some(last)) => newest > last && newest >= self.due,
            (Some(newest), None) => newest >= self.due,
            (None, _) => false,
        };
        if frames.len() < self.config.frames_per_inference || !fresh {
            // The turn goes back (no `Infer` follows); look again on the next capture, or
            // shortly when the caller does not tell of captures. The long wait only keeps a
            // deadline on the clock.
            self.waiting = Phase::WaitingForFrames;
            let again = if self.told_of_captures {
                self.config.cycle_timeout
            } else {
                self.config.poll
            };
            self.state = State::Pausing { at: now + again };
        } else {
            match self.scene_gate(&frames) {
                Gate::Unchanged => self.unchanged(now, frames),
                Gate::Ask(seen) => self.start(now, frames, seen),
            }
        }
    }

    /// The scene-change gate: whether any frame captured after the last answered one looks
    /// different from it (or the gate is off, or the quiet has lasted too long).
    fn scene_gate(&mut self, frames: &[(Stamp, Rgb)]) -> Gate {
        let threshold = self.config.scene_change_threshold;
        if threshold == 0.0 {
            self.snapshot.last_scene_change = None;
            return Gate::Ask(None);
        }
        let (stamp, rgb) = frames.last().expect("at least one frame");
        let newest = Seen {
            captured: stamp.captured,
            thumbnail: Thumbnail::of(rgb),
        };
        let Some(answered) = &self.answered else {
            self.snapshot.last_scene_change = None;
            return Gate::Ask(Some(newest));
        };
        let change = frames
            .iter()
            .filter(|(stamp, _)| stamp.captured > answered.captured)
            .map(|(stamp, rgb)| {
                if stamp.captured == newest.captured {
                    newest.thumbnail.difference(&answered.thumbnail)
                } else {
                    Thumbnail::of(rgb).difference(&answered.thumbnail)
                }
            })
            .fold(0.0, f64::max);
        self.snapshot.last_scene_change = Some(change);
        let quiet = newest.captured.saturating_duration_since(answered.captured);
        if change < threshold && quiet < SCENE_MAX_QUIET {
            Gate::Unchanged
        } else {
            Gate::Ask(Some(newest))
        }
    }

    /// A cycle the gate ends at once: it starts and ends with the same frames, and nothing
    /// else changes but the counters and the freshness mark (the next cycle still needs a
    /// newer frame).
    fn unchanged(&mut self, now: Instant, frames: Vec<(Stamp, Rgb)>) {
        let id = self.next_cycle;
        self.next_cycle += 1;
        let newest = frames.last().expect("at least one frame").0;
        self.last_newest = Some(newest.captured);
        let pts = media_times(&frames);
        self.snapshot.cycles_unchanged += 1;
        self.waiting = Phase::Idle;
        self.due = now + self.config.interval;
        self.last_end = Some(now);
        self.state = State::Pausing { at: self.due };
        self.out.push_back(Output::Emit(Event::CycleStart {
            cycle: id,
            frames: pts.clone(),
        }));
        self.out.push_back(Output::Emit(Event::CycleEnd(CycleEnd {
            cycle: id,
            text: String::new(),
            skipped: true,
            reason: Some(UNCHANGED.to_string()),
            frames: pts,
            latency: now.saturating_duration_since(newest.captured).as_secs_f64(),
            inference_ms: 0.0,
            target_delay: self.delay.value(),
            first_token_latency: None,
        })));
    }

    fn start(&mut self, now: Instant, frames: Vec<(Stamp, Rgb)>, seen: Option<Seen>) {
        let id = self.next_cycle;
        self.next_cycle += 1;
        let oldest = frames.first().expect("at least one frame").0;
        let newest = frames.last().expect("at least one frame").0;
        self.last_newest = Some(newest.captured);
        let span = newest.pts.saturating_sub(oldest.pts).as_secs_f64();
        let pts = media_times(&frames);
        let request = Request {
            system: self.profile.system_prompt_in(&self.config.style),
            user: if self.config.short_question {
                self.profile
                    .cue(self.last_comment.as_deref(), &self.instruction)
            } else {
                self.profile.user_prompt(
                    frames.len(),
                    span,
                    self.last_comment.as_deref(),
                    &self.instruction,
                )
            },
            frames: frames
                .into_iter()
                .map(|(stamp, rgb)| Frame {
                    image: Image::Rgb(rgb),
                    pts: stamp.pts,
                })
                .collect(),
            sampling: self.config.sampling,
            max_tokens: self.config.max_tokens,
            ignore_eos: false,
        };
        self.out.push_back(Output::Emit(Event::CycleStart {
            cycle: id,
            frames: pts.clone(),
        }));
        self.out.push_back(Output::Infer { cycle: id, request });
        self.waiting = Phase::Idle;
        self.state = State::Running(Cycle {
            id,
            started: now,
            deadline: now + self.config.cycle_timeout,
            newest_captured: newest.captured,
            pts,
            text: String::new(),
            emitted: 0,
            first_token_at: None,
            seen,
        });
    }

    fn token(&mut self, text: String, now: Instant) {
        let State::Running(cycle) = &mut self.state else {
            return;
        };
        cycle.first_token_at.get_or_insert(now);
        cycle.text.push_str(&text);
        // Hold text back while it could still be a skip, so "..." never flashes on the page.
        if is_skip(&cycle.text) {
            return;
        }
        let mut piece = &cycle.text[cycle.emitted..];
        if cycle.emitted == 0 {
            piece = piece.trim_start();
        }
        let piece = piece.to_string();
        cycle.emitted = cycle.text.len();
        self.out.push_back(Output::Emit(Event::Token {
            cycle: cycle.id,
            text: piece,
        }));
    }

    fn done(&mut self, stats: Stats, now: Instant) {
        let State::Running(cycle) = std::mem::replace(
            &mut self.state,
            State::Pausing {
                at: now + self.config.interval,
            },
        ) else {
            // A late answer to an abandoned cycle: the loop has moved on.
            return;
        };
        self.due = now + self.config.interval;
        self.last_end = Some(now);
        if cycle.seen.is_some() {
            self.answered = cycle.seen;
        }
        let text = cycle.text.trim();
        let skipped = is_skip(text);
        let latency = now.saturating_duration_since(cycle.newest_captured);
        let inference_ms = ms(now.saturating_duration_since(cycle.started));
        if !skipped {
            self.delay.observe(latency);
            self.last_comment = Some(text.to_string());
        }
        let s = &mut self.snapshot;
        s.cycles_done += 1;
        s.cycles_skipped += u64::from(skipped);
        s.last_latency = Some(latency.as_secs_f64());
        s.latency_sum_s += latency.as_secs_f64();
        s.inference_sum_s += inference_ms / 1e3;
        s.last_inference_ms = Some(inference_ms);
        s.last_first_token_ms = cycle
            .first_token_at
            .map(|t| ms(t.saturating_duration_since(cycle.started)));
        s.last_stats = Some(stats);
        self.waiting = Phase::Idle;
        self.out.push_back(Output::Emit(Event::CycleEnd(CycleEnd {
            cycle: cycle.id,
            text: if skipped {
                String::new()
            } else {
                text.to_string()
            },
            skipped,
            reason: None,
            frames: cycle.pts,
            latency: latency.as_secs_f64(),
            inference_ms,
            target_delay: self.delay.value(),
            first_token_latency: cycle.first_token_at.map(|t| {
                t.saturating_duration_since(cycle.newest_captured)
                    .as_secs_f64()
            }),
        })));
    }

    fn failed(&mut self, err: EngineError, now: Instant) {
        let State::Running(cycle) = &self.state else {
            return;
        };
        let id = cycle.id;
        let message = format!(
            "cycle {id} failed: {err}; trying again in {:.1} s",
            self.config.interval.as_secs_f64()
        );
        self.fail_cycle(id, message, now);
    }

    fn fail_cycle(&mut self, id: u64, message: String, now: Instant) {
        self.snapshot.cycles_failed += 1;
        self.waiting = Phase::Idle;
        self.due = now + self.config.interval;
        self.last_end = Some(now);
        self.state = State::Pausing { at: self.due };
        self.out.push_back(Output::Emit(Event::Error {
            cycle: Some(id),
            message,
        }));
    }

    /// Applies a change; a bad one (checked by [`Control::validate`], the one place that
    /// checks changes) becomes an error event and changes nothing.
    fn control(&mut self, control: Control) {
        if let Err(err) = control.validate() {
            self.out.push_back(Output::Emit(Event::Error {
                cycle: None,
                message: format!("{}: {err}", err.field()),
            }));
            return;
        }
        match control {
            Control::SetProfile(name) => {
                if let Ok(profile) = Profiles::get(&name) {
                    self.profile = profile;
                }
                // A new question deserves an answer, however still the scene.
                self.answered = None;
            }
            Control::SetInstruction(text) => {
                self.instruction = text.trim().to_string();
                self.answered = None;
            }
            Control::SetInterval(secs) => self.set_interval(Duration::from_secs_f64(secs)),
            Control::SetSpoken(spoken) => self.config.style.spoken = spoken,
            Control::AddSpeechLatency(secs) => {
                self.delay.add_to_last(secs);
            }
            Control::SpeakingUntil(until) => self.hold_until(until),
        }
    }

    /// The next cycle's picture should be on screen when the speech ends: its frames are
    /// captured at `until - target_delay` at the earliest.
    fn hold_until(&mut self, until: Instant) {
        let due = until.checked_sub(self.delay.delay()).unwrap_or(until);
        if due <= self.due {
            return;
        }
        self.due = due;
        if let State::Pausing { at } = &mut self.state {
            *at = (*at).max(due);
        }
    }

    /// A new interval counts from the end of the last cycle: a pause under way is
    /// lengthened or cut short, and a cycle already waiting for the engine or for frames
    /// waits for the new due time too.
    fn set_interval(&mut self, interval: Duration) {
        self.config.interval = interval;
        let Some(end) = self.last_end else {
            // No cycle has ended yet: the first one is due from the start regardless.
            return;
        };
        let due = end + interval;
        if let State::Pausing { at } = &mut self.state {
            *at = if *at == self.due {
                due
            } else {
                // A poll pause (the cycle was already due): not before the new due time.
                (*at).max(due)
            };
        }
        self.due = due;
    }
}

/// `CycleEnd::reason` of a cycle the scene-change gate ended.
const UNCHANGED: &str = "unchanged";

/// The scene-change gate's verdict.
enum Gate {
    /// End the cycle without asking.
    Unchanged,
    /// Ask; remember this newest frame if the cycle is answered.
    Ask(Option<Seen>),
}

/// Media time (seconds) of each frame.
fn media_times(frames: &[(Stamp, Rgb)]) -> Vec<f64> {
    frames
        .iter()
        .map(|(stamp, _)| stamp.pts.as_secs_f64())
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SCENE_CHANGE_THRESHOLD;
    use crate::window::fake::{object, scene, still, SteadyWindow};

    const PERIOD: Duration = Duration::from_millis(500);

    /// Drives the machine the way the tokio driver does, on a fake clock and a fake window
    /// that captures a frame every 0.5 s (2 fps) from the start.
    struct Sim {
        c: Commentator,
        start: Instant,
        now: Instant,
        window: SteadyWindow,
        /// While set, the engine's turn is not free: `NeedFrames` is answered with
        /// `Waiting`, and the frames follow from `free_engine`.
        engine_busy: bool,
        /// A `NeedFrames` waiting for the turn.
        queued: Option<(usize, usize)>,
        /// The fairness key of every `NeedFrames`.
        keys: Vec<Option<Instant>>,
        events: Vec<(Instant, Event)>,
        requests: Vec<(Instant, u64, Request)>,
        cancels: Vec<u64>,
    }

    impl Sim {
        fn new(config: CommentatorConfig) -> Sim {
            let start = Instant::now();
            Sim {
                c: Commentator::new(config, start).unwrap(),
                start,
                now: start,
                window: SteadyWindow::new(start, PERIOD),
                engine_busy: false,
                queued: None,
                keys: Vec::new(),
                events: Vec::new(),
                requests: Vec::new(),
                cancels: Vec::new(),
            }
        }

        fn at(&self, secs: f64) -> Instant {
            self.start + Duration::from_secs_f64(secs)
        }

        fn since_start(&self, t: Instant) -> f64 {
            t.duration_since(self.start).as_secs_f64()
        }

        /// Handles outputs until the machine asks to be woken; returns when.
        fn drain(&mut self) -> Instant {
            loop {
                match self.c.poll_output() {
                    Output::NeedFrames {
                        count,
                        stride,
                        newest,
                    } => {
                        self.keys.push(newest);
                        if self.engine_busy {
                            self.queued = Some((count, stride));
                            self.c.handle_input(Input::Waiting(self.now));
                        } else {
                            self.look(count, stride);
                        }
                    }
                    Output::Infer { cycle, request } => {
                        self.requests.push((self.now, cycle, request))
                    }
                    Output::Cancel { cycle } => self.cancels.push(cycle),
                    Output::Emit(event) => self.events.push((self.now, event)),
                    Output::Timeout(at) => return at,
                }
            }
        }

        fn look(&mut self, count: usize, stride: usize) {
            let frames = self.window.sample_at(self.now, count, stride);
            self.c.handle_input(Input::Frames {
                now: self.now,
                frames,
            });
        }

        /// The engine's turn comes: a queued `NeedFrames` gets its frames now.
        fn free_engine(&mut self) {
            self.engine_busy = false;
            if let Some((count, stride)) = self.queued.take() {
                self.look(count, stride);
            }
            self.drain();
        }

        fn input(&mut self, input: Input) {
            self.c.handle_input(input);
            self.drain();
        }

        /// Moves the clock to `t`, waking the machine at every deadline on the way.
        fn advance_to(&mut self, t: Instant) {
            for _ in 0..1_000_000 {
                let wake = self.drain();
                if wake > t {
                    self.now = self.now.max(t);
                    return;
                }
                self.now = self.now.max(wake);
                self.c.handle_input(Input::Tick(self.now));
            }
            panic!("the machine keeps asking to be woken without time passing");
        }

        fn advance(&mut self, d: Duration) {
            self.advance_to(self.now + d);
        }

        /// Runs until the next request goes out (at most `limit` seconds); returns its id.
        fn next_request(&mut self, limit: f64) -> u64 {
            let seen = self.requests.len();
            let end = self.now + Duration::from_secs_f64(limit);
            for _ in 0..1_000_000 {
                let wake = self.drain();
                if self.requests.len() > seen {
                    return self.requests.last().unwrap().1;
                }
                assert!(wake <= end, "no request within {limit} s");
                self.now = self.now.max(wake);
                self.c.handle_input(Input::Tick(self.now));
            }
            panic!("the machine keeps asking to be woken without time passing");
        }

        /// Streams `pieces` one `step` apart, then completes the answer one `step` later.
        fn answer(&mut self, pieces: &[&str], step: Duration) {
            for piece in pieces {
                self.advance(step);
                self.input(Input::Token(piece.to_string(), self.now));
            }
            self.advance(step);
            self.input(Input::Done(Stats::default(), self.now));
        }

        /// Answers the running cycle with `text`, finishing exactly `latency` seconds after
        /// its newest frame was captured.
        fn answer_with_latency(&mut self, text: &str, latency: f64) {
            let newest_pts = self.requests.last().unwrap().2.frames.last().unwrap().pts;
            let end = self.start + newest_pts + Duration::from_secs_f64(latency);
            self.advance_to(end);
            self.input(Input::Token(text.to_string(), self.now));
            self.input(Input::Done(Stats::default(), self.now));
        }

        fn last_request(&self) -> &Request {
            &self.requests.last().unwrap().2
        }

        fn cycle_ends(&self) -> Vec<CycleEnd> {
            self.events
                .iter()
                .filter_map(|(_, e)| match e {
                    Event::CycleEnd(end) => Some(end.clone()),
                    _ => None,
                })
                .collect()
        }

        fn event_time(&self, wanted: impl Fn(&Event) -> bool) -> Instant {
            self.events
                .iter()
                .find(|(_, e)| wanted(e))
                .expect("event")
                .0
        }
    }

    fn pixel(frame: &Frame) -> u8 {
        match &frame.image {
            Image::Rgb(rgb) => rgb.data[0],
            Image::Jpeg(_) => panic!("expected RGB"),
        }
    }

    #[test]
    fn first_cycle_sends_four_frames_two_apart_oldest_first() {
        let mut sim = Sim::new(CommentatorConfig::default());
        assert_eq!(sim.next_request(10.0), 1);
        // 4 frames with stride 2 need frames 0..=6 at 2 fps: the 7th arrives at 3.0 s.
        let sent_at = sim.since_start(sim.requests[0].0);
        assert!(
            (3.0..3.0 + 0.1 + 1e-9).contains(&sent_at),
            "sent at {sent_at}"
        );
        let request = sim.last_request();
        let pts: Vec<f64> = request.frames.iter().map(|f| f.pts.as_secs_f64()).collect();
        assert_eq!(pts, [0.0, 1.0, 2.0, 3.0]);
        assert_eq!(
            request.frames.iter().map(pixel).collect::<Vec<_>>(),
            [0, 2, 4, 6]
        );
        assert_eq!(request.max_tokens, 64);
        assert_eq!(
            request.system,
            Profiles::get("default").unwrap().system_prompt()
        );
        assert_eq!(
            request.user, "What is new now?",
            "the first cue: no comment yet"
        );
        assert!(!request.user.contains("last comment"));
        assert!(
            matches!(&sim.events[0].1, Event::CycleStart { cycle: 1, frames } if *frames == pts)
        );
        assert_eq!(sim.c.snapshot().phase, Phase::Running);
    }

    #[test]
    fn a_speaking_voice_holds_the_next_cycle_and_shapes_the_prompt() {
        let mut sim = Sim::new(CommentatorConfig::default());
        sim.input(Input::Control(Control::SetSpoken(true)));
        sim.next_request(10.0);
        assert!(sim.last_request().system.contains("spoken aloud"));
        sim.answer(&["A", " dog", " runs."], Duration::from_millis(100));
        let end = sim.event_time(|e| matches!(e, Event::CycleEnd(_)));
        let delay = sim.c.snapshot().target_delay;
        // The first audio came 0.5 s after the text: the delay counts it.
        sim.input(Input::Control(Control::AddSpeechLatency(0.5)));
        assert!((sim.c.snapshot().target_delay - (delay + 0.2 * 0.5)).abs() < 1e-9);
        // The voice speaks for 8 s from now: the next cycle's newest frame is captured no
        // sooner than the speech end minus the delay, not one interval after the end.
        let delay = sim.c.snapshot().target_delay;
        let speech_end = end + Duration::from_secs(8);
        sim.input(Input::Control(Control::SpeakingUntil(speech_end)));
        sim.next_request(20.0);
        let newest = sim.start + sim.last_request().frames.last().unwrap().pts;
        let earliest = speech_end - Duration::from_secs_f64(delay);
        assert!(newest >= earliest, "{:?} before {:?}", newest, earliest);
        assert!(newest <= earliest + Duration::from_millis(600));
        // Nobody listens any more: plain prompts again.
        sim.input(Input::Control(Control::SetSpoken(false)));
        sim.answer(&["Still."], Duration::from_millis(100));
        sim.next_request(10.0);
        assert!(!sim.last_request().system.contains("spoken aloud"));
    }

    #[test]
    fn next_cycle_starts_an_interval_after_the_previous_end() {
        let mut sim = Sim::new(CommentatorConfig::default());
        sim.next_request(10.0);
        sim.answer(&["A", " dog", " runs."], Duration::from_millis(700));
        let end = sim.event_time(|e| matches!(e, Event::CycleEnd(_)));
        assert_eq!(sim.requests.len(), 1, "no new request while answering");
        sim.next_request(10.0);
        let gap = sim.requests[1].0.duration_since(end);
        assert!(gap >= Duration::from_secs(1), "gap {gap:?}");
        // ...and starts with the first frame captured after that (the fake window has
        // one every 0.5 s), so the newest frame is at most a poll period old.
        assert!(
            gap <= Duration::from_millis(1500) + sim.c.config().poll,
            "gap {gap:?}"
        );
        let newest = sim.requests[1].2.frames.last().unwrap().pts;
        let request_age = sim.requests[1].0.duration_since(sim.start + newest);
        assert!(
            request_age <= sim.c.config().poll,
            "newest frame {request_age:?} old"
        );
        assert!(sim.start + newest >= end + Duration::from_secs(1));
        let ends = sim.cycle_ends();
        assert_eq!(ends[0].text, "A dog runs.");
        assert!(!ends[0].skipped);
        assert!((ends[0].inference_ms - 2800.0).abs() < 1e-6);
        let tokens: String = sim
            .events
            .iter()
            .filter_map(|(_, e)| match e {
                Event::Token { cycle: 1, text } => Some(text.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(tokens, "A dog runs.");
        let s = sim.c.snapshot();
        assert_eq!(
            (s.cycles_done, s.cycles_skipped, s.cycles_failed),
            (1, 0, 0)
        );
        assert!((s.last_first_token_ms.unwrap() - 700.0).abs() < 1e-6);
        assert_eq!(s.last_comment.as_deref(), Some("A dog runs."));
    }

    #[test]
    fn skip_is_not_shown_remembered_or_averaged() {
        let mut sim = Sim::new(CommentatorConfig::default());
        sim.next_request(10.0);
        sim.answer_with_latency("A dog runs.", 2.0);
        sim.next_request(10.0);
        sim.answer(&[" .", "..", " "], Duration::from_millis(300));
        let ends = sim.cycle_ends();
        assert!(ends[1].skipped);
        assert_eq!(ends[1].text, "");
        assert_eq!(
            ends[1].target_delay, ends[0].target_delay,
            "skips leave the delay alone"
        );
        assert!(
            !sim.events
                .iter()
                .any(|(_, e)| matches!(e, Event::Token { cycle: 2, .. })),
            "a skip streams no tokens"
        );
        sim.next_request(10.0);
        assert!(sim
            .last_request()
            .user
            .contains("Your last comment was: \"A dog runs.\""));
        let s = sim.c.snapshot();
        assert_eq!((s.cycles_done, s.cycles_skipped), (2, 1));
    }

    #[test]
    fn dots_then_words_are_streamed_as_one_piece() {
        let mut sim = Sim::new(CommentatorConfig::default());
        sim.next_request(10.0);
        sim.answer(&[" ...", " a cat", " appears"], Duration::from_millis(100));
        let tokens: Vec<&str> = sim
            .events
            .iter()
            .filter_map(|(_, e)| match e {
                Event::Token { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(tokens, ["... a cat", " appears"]);
        assert!(!sim.cycle_ends()[0].skipped);
    }

    #[test]
    fn target_delay_is_the_ema_of_non_skip_latencies() {
        let mut sim = Sim::new(CommentatorConfig::default());
        // Latencies 2.0, (skip at 9.0), 3.0, 1.0; by hand from 5.0 with alpha 0.2:
        // 0.2*2 + 0.8*5 = 4.4; skip keeps 4.4; 0.2*3 + 0.8*4.4 = 4.12; 0.2*1 + 0.8*4.12 = 3.496.
        for (text, latency) in [("One.", 2.0), ("...", 9.0), ("Two.", 3.0), ("Three.", 1.0)] {
            sim.next_request(10.0);
            sim.answer_with_latency(text, latency);
        }
        let ends = sim.cycle_ends();
        let latencies: Vec<f64> = ends.iter().map(|e| e.latency).collect();
        assert_eq!(latencies, [2.0, 9.0, 3.0, 1.0]);
        let expected = [4.4, 4.4, 4.12, 3.496];
        for (end, want) in ends.iter().zip(expected) {
            assert!(
                (end.target_delay - want).abs() < 1e-12,
                "cycle {}: {} != {want}",
                end.cycle,
                end.target_delay
            );
        }
        assert!((sim.c.snapshot().target_delay - 3.496).abs() < 1e-12);
    }

    #[test]
    fn zero_initial_delay_keeps_sync_off() {
        let mut sim = Sim::new(CommentatorConfig {
            delay_init: 0.0,
            ..CommentatorConfig::default()
        });
        for latency in [2.0, 3.0] {
            sim.next_request(10.0);
            sim.answer_with_latency("Something.", latency);
        }
        assert!(sim.cycle_ends().iter().all(|e| e.target_delay == 0.0));
        let s = sim.c.snapshot();
        assert!(!s.sync);
        assert_eq!(s.target_delay, 0.0);
        assert_eq!(s.last_latency, Some(3.0));
    }

    #[test]
    fn an_engine_error_is_reported_and_the_loop_goes_on() {
        let mut sim = Sim::new(CommentatorConfig::default());
        sim.next_request(10.0);
        sim.advance(Duration::from_millis(400));
        sim.input(Input::Failed(
            EngineError::Failed("out of memory".into()),
            sim.now,
        ));
        let failed_at = sim.now;
        let (cycle, message) = sim
            .events
            .iter()
            .find_map(|(_, e)| match e {
                Event::Error { cycle, message } => Some((*cycle, message.clone())),
                _ => None,
            })
            .expect("an error event");
        assert_eq!(cycle, Some(1));
        assert!(message.contains("out of memory"), "{message}");
        assert_eq!(sim.next_request(10.0), 2);
        assert!(sim.requests[1].0.duration_since(failed_at) >= Duration::from_secs(1));
        sim.answer(&["Fine", " again."], Duration::from_millis(100));
        let s = sim.c.snapshot();
        assert_eq!((s.cycles_done, s.cycles_failed), (1, 1));
        assert!(sim.cycle_ends().iter().all(|e| e.cycle == 2));
    }

    #[test]
    fn a_stalled_source_gets_no_new_cycle() {
        let mut sim = Sim::new(CommentatorConfig::default());
        sim.next_request(10.0);
        sim.window.stall_at(sim.now + Duration::from_millis(10));
        sim.answer(&["A", " car."], Duration::from_millis(200));
        sim.advance(Duration::from_secs(20));
        assert_eq!(
            sim.requests.len(),
            1,
            "the same frames must not be asked about again"
        );
        assert_eq!(sim.c.snapshot().phase, Phase::WaitingForFrames);
        // The source comes back: the next cycle uses the new frames.
        let newest_before = sim.last_request().frames.last().unwrap().pts;
        *sim.window.stop.lock().unwrap() = None;
        sim.next_request(1.0);
        assert!(sim.last_request().frames.last().unwrap().pts > newest_before);
    }

    #[test]
    fn a_busy_engine_makes_the_cycle_wait_then_take_the_newest_frames() {
        let mut sim = Sim::new(CommentatorConfig::default());
        sim.engine_busy = true;
        sim.advance_to(sim.at(6.0));
        assert!(sim.requests.is_empty(), "no request without the turn");
        let s = sim.c.snapshot();
        assert_eq!(s.phase, Phase::WaitingForEngine);
        assert_eq!(s.engine_busy_waits, 1, "one due cycle, one wait");
        assert_eq!(
            sim.keys,
            [None],
            "asked once, then waited without asking again"
        );
        sim.free_engine();
        assert_eq!(sim.requests.len(), 1);
        assert_eq!(
            sim.requests[0].0,
            sim.at(6.0),
            "sent the moment the turn came"
        );
        // Frames of the moment the engine became free, not of when the cycle was first due.
        let pts: Vec<f64> = sim
            .last_request()
            .frames
            .iter()
            .map(|f| f.pts.as_secs_f64())
            .collect();
        assert_eq!(pts, [3.0, 4.0, 5.0, 6.0]);
        // The next turn is asked for with this cycle's newest frame, the scheduler's
        // fairness key.
        sim.answer(&["Hi."], Duration::from_millis(100));
        sim.next_request(10.0);
        assert_eq!(sim.keys.last(), Some(&Some(sim.at(6.0))));
        assert_eq!(sim.c.snapshot().engine_busy_waits, 1);
    }

    #[test]
    fn an_interval_change_moves_the_pause_under_way() {
        let mut sim = Sim::new(CommentatorConfig::default());
        let poll = sim.c.config().poll;
        sim.next_request(10.0);
        sim.answer(&["One."], Duration::from_millis(100));
        let end = sim.now;
        sim.input(Input::Control(Control::SetInterval(5.0)));
        assert_eq!(sim.c.snapshot().interval_s, 5.0);
        sim.next_request(10.0);
        // Longer: not before 5 s after the end, then with the first frame after that.
        let gap = sim.requests[1].0.duration_since(end);
        assert!(
            gap >= Duration::from_secs(5) && gap <= Duration::from_millis(5500) + poll,
            "gap {gap:?}"
        );

        sim.answer(&["Two."], Duration::from_millis(100));
        sim.advance(Duration::from_secs(2));
        let changed = sim.now;
        sim.input(Input::Control(Control::SetInterval(0.5)));
        sim.next_request(10.0);
        // Shorter, with the new due time already past: the pause ends at once.
        let gap = sim.requests[2].0.duration_since(changed);
        assert!(gap <= Duration::from_millis(500) + poll, "gap {gap:?}");
    }

    #[test]
    fn profile_and_instruction_changes_reach_the_next_request() {
        let mut sim = Sim::new(CommentatorConfig::default());
        sim.next_request(10.0);
        sim.input(Input::Control(Control::SetProfile("sports".into())));
        sim.input(Input::Control(Control::SetInstruction(
            "  Watch the goalkeeper. ".into(),
        )));
        // The running cycle keeps what it was started with.
        assert_eq!(
            sim.last_request().system,
            Profiles::get("default").unwrap().system_prompt()
        );
        sim.answer(&["Kick-off."], Duration::from_millis(100));
        sim.next_request(10.0);
        let request = sim.last_request();
        assert_eq!(
            request.system,
            Profiles::get("sports").unwrap().system_prompt()
        );
        assert!(
            request
                .user
                .contains("The viewer asks: Watch the goalkeeper."),
            "{}",
            request.user
        );
        assert!(
            request
                .user
                .contains("Your last comment was: \"Kick-off.\""),
            "{}",
            request.user
        );
        let s = sim.c.snapshot();
        assert_eq!(
            (s.profile.as_str(), s.instruction.as_str()),
            ("sports", "Watch the goalkeeper.")
        );

        sim.input(Input::Control(Control::SetInstruction(String::new())));
        sim.answer(&["Goal!"], Duration::from_millis(100));
        sim.next_request(10.0);
        assert!(!sim.last_request().user.contains("The viewer asks"));
    }

    #[test]
    fn a_bad_control_is_an_error_event_and_changes_nothing() {
        let mut sim = Sim::new(CommentatorConfig::default());
        sim.input(Input::Control(Control::SetProfile("opera".into())));
        sim.input(Input::Control(Control::SetInstruction("x".repeat(2001))));
        sim.input(Input::Control(Control::SetInterval(f64::NAN)));
        let messages: Vec<String> = sim
            .events
            .iter()
            .filter_map(|(_, e)| match e {
                Event::Error {
                    cycle: None,
                    message,
                } => Some(message.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(messages.len(), 3);
        assert!(
            messages[0].starts_with("profile: unknown profile 'opera'"),
            "{}",
            messages[0]
        );
        assert!(messages[1].contains("2001 characters"), "{}", messages[1]);
        assert!(
            messages[2].starts_with(
                "inference_interval: must be 0 (back to back) to 3600 seconds, got NaN"
            ),
            "{}",
            messages[2]
        );
        let s = sim.c.snapshot();
        assert_eq!(
            (s.profile.as_str(), s.instruction.as_str(), s.interval_s),
            ("default", "", 1.0)
        );
    }

    #[test]
    fn a_stuck_cycle_times_out_and_the_loop_goes_on() {
        let config = CommentatorConfig {
            cycle_timeout: Duration::from_secs(30),
            ..CommentatorConfig::default()
        };
        let mut sim = Sim::new(config);
        sim.next_request(10.0);
        let started = sim.now;
        sim.input(Input::Token("A".into(), sim.now));
        sim.advance(Duration::from_secs(29));
        assert!(sim.cancels.is_empty());
        sim.advance(Duration::from_millis(1500));
        assert_eq!(sim.cancels, [1]);
        let (at, message) = sim
            .events
            .iter()
            .find_map(|(at, e)| match e {
                Event::Error {
                    cycle: Some(1),
                    message,
                } => Some((*at, message.clone())),
                _ => None,
            })
            .expect("a timeout error");
        assert_eq!(at.duration_since(started), Duration::from_secs(30));
        assert!(message.contains("no answer within 30.0 s"), "{message}");
        // A late answer to the abandoned cycle (before the next one starts) is ignored.
        sim.input(Input::Token(" dog".into(), sim.now));
        sim.input(Input::Done(Stats::default(), sim.now));
        assert!(sim.cycle_ends().is_empty());
        assert_eq!(sim.next_request(5.0), 2);
        assert!(sim.requests[1].0.duration_since(at) >= Duration::from_secs(1));
        assert_eq!(sim.c.snapshot().cycles_failed, 1);
    }

    /// Media time of the newest frame of the last request, seconds.
    fn newest_pts(sim: &Sim) -> f64 {
        sim.last_request().frames.last().unwrap().pts.as_secs_f64()
    }

    /// The frame captured next.
    fn next_frame(sim: &Sim) -> u64 {
        (sim.now.duration_since(sim.start).as_nanos() / PERIOD.as_nanos()) as u64 + 1
    }

    #[test]
    fn a_still_scene_is_asked_about_once_then_gated_until_the_quiet_is_too_long() {
        let mut sim = Sim::new(CommentatorConfig::default());
        sim.window.show(still);
        sim.next_request(10.0);
        let answered_pts = newest_pts(&sim);
        sim.answer(&["A quiet street."], Duration::from_millis(100));
        sim.advance(Duration::from_secs(30));
        assert_eq!(sim.requests.len(), 1, "the same scene is not asked about");

        let ends = sim.cycle_ends();
        let gated = &ends[1..];
        // One look a second (the interval) plus up to a frame period for a fresh frame.
        assert!(gated.len() >= 18, "{} gated cycles", gated.len());
        let poll = sim.c.config().poll.as_secs_f64();
        for end in gated {
            assert!(end.skipped);
            assert_eq!(end.reason.as_deref(), Some("unchanged"));
            assert_eq!(end.text, "");
            assert_eq!(end.frames.len(), 4);
            assert_eq!(end.inference_ms, 0.0);
            assert_eq!(end.first_token_latency, None);
            assert_eq!(end.target_delay, ends[0].target_delay, "the delay stays");
            assert!(
                end.latency <= poll + 1e-9,
                "the newest frame's age {}",
                end.latency
            );
            // Each is started and ended together, with the same frames.
            let at = sim
                .events
                .iter()
                .position(|(_, e)| matches!(e, Event::CycleEnd(e) if e.cycle == end.cycle))
                .unwrap();
            assert!(
                matches!(&sim.events[at - 1].1, Event::CycleStart { cycle, frames } if *cycle == end.cycle && *frames == end.frames),
                "{:?}",
                sim.events[at - 1]
            );
        }
        assert_eq!(ends[0].reason, None, "an answered cycle has no reason");
        // Each gated cycle still waits the interval after the previous end.
        let mut last_end = None;
        for (at, event) in &sim.events {
            match event {
                Event::CycleStart { .. } => {
                    if let Some(end) = last_end {
                        assert!(at.duration_since(end) >= Duration::from_secs(1));
                    }
                }
                Event::CycleEnd(_) => last_end = Some(*at),
                _ => {}
            }
        }
        let s = sim.c.snapshot();
        assert_eq!(s.cycles_unchanged, gated.len() as u64);
        assert_eq!((s.cycles_done, s.cycles_skipped), (1, 0));
        assert_eq!(s.last_comment.as_deref(), Some("A quiet street."));
        assert!(s.last_scene_change.unwrap() < 0.5, "{s:?}");

        // A minute after the answered frame, the model is asked anyway.
        sim.next_request(40.0);
        let quiet = newest_pts(&sim) - answered_pts;
        assert!((60.0..61.5).contains(&quiet), "asked after {quiet} s");
        assert!(sim
            .last_request()
            .user
            .contains("Your last comment was: \"A quiet street.\""));
    }

    #[test]
    fn a_moving_scene_is_never_gated() {
        let mut sim = Sim::new(CommentatorConfig::default());
        // A square a sixth of the picture high, moving right 8 pixels a frame.
        sim.window.show(|k| {
            let left = (k * 8 % 160) as u32;
            scene(k, move |x, y| {
                i32::from((left..left + 15).contains(&x) && (40..55).contains(&y)) * 150
            })
        });
        for _ in 0..10 {
            sim.next_request(10.0);
            sim.answer(&["It moves."], Duration::from_millis(100));
        }
        let s = sim.c.snapshot();
        assert_eq!((s.cycles_done, s.cycles_unchanged), (10, 0));
        assert!(s.last_scene_change.unwrap() > 10.0, "{s:?}");
        assert!(sim.cycle_ends().iter().all(|e| e.reason.is_none()));
    }

    #[test]
    fn a_small_object_appearing_is_not_gated() {
        let mut sim = Sim::new(CommentatorConfig::default());
        assert_eq!(
            sim.c.config().scene_change_threshold,
            SCENE_CHANGE_THRESHOLD
        );
        sim.window.show(still);
        sim.next_request(10.0);
        sim.answer(&["An empty room."], Duration::from_millis(100));
        sim.advance(Duration::from_secs(10));
        assert_eq!(sim.requests.len(), 1);
        assert!(sim.c.snapshot().cycles_unchanged >= 5);
        // 5% of the picture, 12 grey levels brighter, at the hardest place to see it.
        let appears = next_frame(&sim);
        sim.window.show(move |k| {
            if k >= appears {
                scene(k, object(12))
            } else {
                still(k)
            }
        });
        sim.next_request(2.0);
        let change = sim.c.snapshot().last_scene_change.unwrap();
        assert!((1.6..2.1).contains(&change), "{change}");
        assert!(newest_pts(&sim) >= appears as f64 * PERIOD.as_secs_f64());
    }

    #[test]
    fn a_slow_drift_adds_up_until_it_counts() {
        let mut sim = Sim::new(CommentatorConfig::default());
        // One grey level brighter every 5 frames (2.5 s): never 1.5 from one look to the
        // next, but from the answered frame it adds up.
        sim.window
            .show(|k| scene(k, move |_, _| i32::try_from(k / 5).unwrap()));
        sim.next_request(10.0);
        assert_eq!(newest_pts(&sim), 3.0);
        sim.answer(&["Dawn."], Duration::from_millis(100));
        sim.next_request(20.0);
        // Frame 15 (7.5 s) is the first 2 levels brighter than frame 6.
        assert!(
            (7.5..8.5).contains(&newest_pts(&sim)),
            "{}",
            newest_pts(&sim)
        );
        let s = sim.c.snapshot();
        assert!(s.cycles_unchanged >= 2, "{s:?}");
        assert!(s.last_scene_change.unwrap() >= SCENE_CHANGE_THRESHOLD);
    }

    #[test]
    fn threshold_zero_turns_the_gate_off() {
        let mut sim = Sim::new(CommentatorConfig {
            scene_change_threshold: 0.0,
            ..CommentatorConfig::default()
        });
        sim.window.show(still);
        for _ in 0..5 {
            sim.next_request(10.0);
            sim.answer(&["..."], Duration::from_millis(100));
        }
        let s = sim.c.snapshot();
        assert_eq!((s.cycles_done, s.cycles_unchanged), (5, 0));
        assert_eq!(s.last_scene_change, None);
    }

    #[test]
    fn a_new_instruction_is_answered_however_still_the_scene() {
        let mut sim = Sim::new(CommentatorConfig::default());
        sim.window.show(still);
        sim.next_request(10.0);
        sim.answer(&["A parking lot."], Duration::from_millis(100));
        sim.advance(Duration::from_secs(5));
        assert_eq!(sim.requests.len(), 1);
        sim.input(Input::Control(Control::SetInstruction(
            "Count the cars.".into(),
        )));
        sim.next_request(2.0);
        assert!(sim.last_request().user.contains("Count the cars."));
        sim.answer(&["Three cars."], Duration::from_millis(100));
        // Then the gate holds again.
        sim.advance(Duration::from_secs(10));
        assert_eq!(sim.requests.len(), 2);
    }

    #[test]
    fn only_an_answered_cycle_is_compared_with() {
        let mut sim = Sim::new(CommentatorConfig::default());
        sim.window.show(still);
        sim.next_request(10.0);
        sim.input(Input::Failed(EngineError::Failed("boom".into()), sim.now));
        // Nothing was answered yet: the next cycle asks, and its answer counts.
        sim.next_request(5.0);
        sim.answer(&["A wall."], Duration::from_millis(100));
        sim.advance(Duration::from_secs(10));
        assert_eq!(sim.requests.len(), 2);
        let s = sim.c.snapshot();
        assert_eq!((s.cycles_failed, s.cycles_done), (1, 1));
        assert!(s.cycles_unchanged >= 5);
    }
}
