//! One engine, shared fairly by every stream: the queue in front of the engine.
//!
//! Each stream opens a [`Session`]. To ask the engine something it first waits for a
//! [`Turn`] (`Session::turn`), and only then builds its request: it samples its frames
//! after the turn is granted, so a request that waited is made of the newest frames, never
//! of a window that went stale in the queue (late binding). `Turn::submit` hands the request
//! to the engine; the turn's slot comes back to the scheduler when the answer ends (done or
//! failed), when the caller drops the [`Generation`], or at once when the turn is dropped
//! unused.
//!
//! Who goes next is decided in one place, under one lock, whenever a slot frees or a caller
//! arrives:
//! - [`Priority`] first: a user's question before an alert check before commentary;
//! - then the fairness key: the caller whose newest frame (the capture time it passes to
//!   `turn`, from its previous request) is oldest, a caller that never asked before all
//!   others. A stream that was just served has the newest pictures and so waits behind the
//!   others: every stream gets its turn and none starves;
//! - then arrival order.
//!
//! This is the engine's one queue: nothing waits inside an engine. The scheduler sizes
//! itself from the engine: as many requests run at once as [`Engine::parallelism`] says
//! *now* (the stream limit for the in-process llama engine, which advances every running
//! request by one token in one batched step; the caps of the upstreams that are not resting
//! for OpenAI-compatible servers; the healthy replicas' sum for `llama::Replicas`), read again
//! whenever a slot frees or a caller arrives, so callers never choose it.
//!
//! The queue is bounded at the door: a session has at most one caller waiting per
//! priority (its commentary loop, its alert checks, one question), so it never holds more
//! than three callers a stream. A second caller of the same stream and priority is refused
//! at once with [`EngineError::Busy`] instead of queueing behind the first, which would be
//! answered from the same newest frames anyway (TEI's `try_acquire` shape; the server
//! turns it into a 429). A turn's request goes
//! to the engine with the session's [`StreamKey`] and priority, and
//! [`Session::push_frame`] hands the engine each sampled frame as it arrives, so an engine
//! with per-stream state (the llama engine's KV-cache sequence per stream) prepares it
//! before the next request.
//!
//! An engine that is not there yet ([`Engine::is_ready`] false: an
//! [`EngineSlot`](crate::EngineSlot) whose model downloads) has no room: commentary and
//! alert checks wait for it as for a busy engine, a question is told at once why there is
//! no answer, and [`Scheduler::wake`] lets the waiting in when it is filled.
//!
//! Closing a session (`Session::close`, or dropping its last handle) withdraws its waiting
//! turns and cancels its running answer, so a removed stream frees the engine for the others
//! at once. An engine error only ends the answer it belongs to.
//!
//! The lock is a `std::sync::Mutex` held for a few instructions and never across an
//! `.await`; that is what lets `Drop` give slots back without a task. Grants travel through
//! a `oneshot` per waiting caller.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{Engine, EngineError, Frame, Generation, Output, StreamKey};

/// What a request is for; a waiting request of an earlier kind goes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// A user asked something and is waiting for the answer.
    Question,
    /// A check whose answer may raise an alert.
    Alert,
    /// The running commentary.
    Commentary,
}

/// Hands out [`Session`]s on one engine and decides whose turn it is. Cheap to clone; all
/// clones share one queue.
#[derive(Clone)]
pub struct Scheduler {
    shared: Arc<Shared>,
}

/// One stream's access to the engine. Clones share the stream's place: closing one closes
/// them all, and the session closes when the last clone is dropped.
#[derive(Clone)]
pub struct Session {
    inner: Arc<SessionInner>,
}

/// The right to run one request now. Dropping it unused gives the slot back at once.
#[must_use = "a turn holds an engine slot until it is submitted or dropped"]
pub struct Turn {
    slot: Slot,
    stream: Arc<str>,
    key: StreamKey,
    priority: Priority,
    closed: CancellationToken,
}

/// The queue as `/api/status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SchedulerStatus {
    /// Requests that may run at once now (the engine's `parallelism()`).
    pub concurrency: usize,
    /// Slots in use: turns granted and not yet given back.
    pub running: usize,
    pub waiting: Waiting,
    /// Open sessions, oldest first.
    pub sessions: Vec<SessionStatus>,
}

/// Callers waiting for a turn, per priority.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Waiting {
    pub question: usize,
    pub alert: usize,
    pub commentary: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SessionStatus {
    pub stream: String,
    /// This session's callers waiting for a turn.
    pub waiting: usize,
    /// This session's slots in use.
    pub running: usize,
    /// Turns granted since it opened.
    pub turns: u64,
}

struct Shared {
    engine: Arc<dyn Engine>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    running: usize,
    waiting: Vec<Waiter>,
    sessions: BTreeMap<u64, SessionEntry>,
    next_session: u64,
    next_ticket: u64,
}

struct SessionEntry {
    stream: Arc<str>,
    running: usize,
    turns: u64,
}

struct Waiter {
    ticket: u64,
    session: u64,
    priority: Priority,
    newest: Option<Instant>,
    grant: oneshot::Sender<Slot>,
}

impl Waiter {
    /// Smallest goes first. `None` (never asked) sorts before every instant.
    fn key(&self) -> (Priority, Option<Instant>, u64) {
        (self.priority, self.newest, self.ticket)
    }
}

struct SessionInner {
    shared: Arc<Shared>,
    id: u64,
    stream: Arc<str>,
    /// Names this session to the engine (its per-stream state).
    key: StreamKey,
    /// Cancelled on close: running answers of this session stop, turns refuse to submit.
    closed: CancellationToken,
}

/// One engine slot in use. Dropping it gives the slot back and lets the next caller in.
struct Slot {
    shared: Arc<Shared>,
    session: u64,
    /// False for a grant that never reached its caller (already counted back).
    armed: bool,
}

impl Scheduler {
    /// The queue in front of `engine`, letting as many requests run at once as the engine's
    /// [`Engine::parallelism`] says (at least 1).
    pub fn new(engine: Arc<dyn Engine>) -> Scheduler {
        Scheduler {
            shared: Arc::new(Shared {
                engine,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// A new session for `stream` (the name is for status and messages; two sessions may
    /// share it).
    pub fn open_session(&self, stream: &str) -> Session {
        let stream: Arc<str> = Arc::from(stream);
        let mut state = self.shared.lock();
        let id = state.next_session;
        state.next_session += 1;
        state.sessions.insert(
            id,
            SessionEntry {
                stream: stream.clone(),
                running: 0,
                turns: 0,
            },
        );
        drop(state);
        Session {
            inner: Arc::new(SessionInner {
                shared: self.shared.clone(),
                id,
                key: StreamKey::new(&stream),
                stream,
                closed: CancellationToken::new(),
            }),
        }
    }

    /// The engine behind, for its info, health and metrics.
    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.shared.engine
    }

    /// The engine has more room than when turns were last granted: it became ready (an
    /// [`EngineSlot`](crate::EngineSlot) filled). Grants waiting callers now rather than at
    /// the next slot given back.
    pub fn wake(&self) {
        let mut state = self.shared.lock();
        self.shared.dispatch(&mut state);
    }

    pub fn status(&self) -> SchedulerStatus {
        let state = self.shared.lock();
        let mut waiting = Waiting::default();
        for waiter in &state.waiting {
            *match waiter.priority {
                Priority::Question => &mut waiting.question,
                Priority::Alert => &mut waiting.alert,
                Priority::Commentary => &mut waiting.commentary,
            } += 1;
        }
        let sessions = state
            .sessions
            .iter()
            .map(|(id, entry)| SessionStatus {
                stream: entry.stream.to_string(),
                waiting: state.waiting.iter().filter(|w| w.session == *id).count(),
                running: entry.running,
                turns: entry.turns,
            })
            .collect();
        SchedulerStatus {
            concurrency: self.shared.concurrency(),
            running: state.running,
            waiting,
            sessions,
        }
    }
}

impl Session {
    pub fn stream(&self) -> &str {
        &self.inner.stream
    }

    /// What names this session to the engine.
    pub fn key(&self) -> &StreamKey {
        &self.inner.key
    }

    /// Waits for this session's turn at `priority`. `newest` is the capture time of the
    /// newest frame this caller sent last time (`None` if it never asked): among waiting
    /// callers of one priority the one with the oldest goes first. Build the request only
    /// once the turn is here, from the newest frames.
    ///
    /// Dropping the future withdraws the caller from the queue. Fails with
    /// [`EngineError::Stopped`] when the session is or gets closed, and at once with
    /// [`EngineError::Busy`] when another caller of this session already waits at
    /// `priority`. A question fails at once with [`EngineError::Unavailable`] while the
    /// engine is not ready (its model still downloading); other callers wait for it.
    pub fn turn(
        &self,
        priority: Priority,
        newest: Option<Instant>,
    ) -> impl Future<Output = Result<Turn, EngineError>> + Send + '_ {
        // Queued now, not at the first poll, so callers queue in the order they asked; the
        // guard withdraws the caller even if the future is dropped before it is polled.
        let queued = self.enqueue(priority, newest).map(|(ticket, grant)| {
            let withdraw = Withdraw {
                shared: &self.inner.shared,
                ticket: Some(ticket),
            };
            (withdraw, grant)
        });
        async move {
            let (mut withdraw, grant) = queued?;
            let slot = grant.await.map_err(|_| self.inner.closed_error())?;
            withdraw.ticket = None;
            Ok(self.inner.turn(slot, priority))
        }
    }

    /// A turn now if a slot is free (then nobody is waiting, so this passes no one), or
    /// [`EngineError::Busy`]. For callers that would rather not wait, and for the
    /// commentary loop to know it is about to wait.
    pub fn try_turn(&self) -> Result<Turn, EngineError> {
        let shared = &self.inner.shared;
        let mut state = shared.lock();
        if self.inner.closed.is_cancelled() {
            return Err(self.inner.closed_error());
        }
        // The engine's room may have grown since the last grant: waiting callers get it
        // first, so a caller that does not wait never passes one that does.
        shared.dispatch(&mut state);
        let concurrency = shared.concurrency();
        if concurrency == 0 {
            return Err(EngineError::Busy(format!(
                "the engine is not ready: {}",
                shared.engine.readiness().message
            )));
        }
        if state.running >= concurrency {
            return Err(EngineError::Busy(format!(
                "all {concurrency} engine slots are in use"
            )));
        }
        let slot = shared.take_slot(&mut state, self.inner.id);
        drop(state);
        Ok(self.inner.turn(slot, Priority::Commentary))
    }

    /// Hands a frame of this stream's sampled set to the engine as soon as it is captured
    /// (in time order), so the engine can prepare it before the next request: the llama
    /// engine vision-encodes it and adds it to the stream's KV-cache sequence, and a request
    /// whose frames are all there only evaluates its question. Ignored after close.
    pub fn push_frame(&self, frame: Frame) {
        if !self.inner.closed.is_cancelled() {
            self.inner.shared.engine.push_frame(&self.inner.key, frame);
        }
    }

    /// Ends the session for every clone: waiting turns fail, turns not yet submitted refuse
    /// to submit, and a running answer stops with [`EngineError::Stopped`] (its engine
    /// request is dropped, which cancels it).
    pub fn close(&self) {
        self.inner.close();
    }

    fn enqueue(
        &self,
        priority: Priority,
        newest: Option<Instant>,
    ) -> Result<(u64, oneshot::Receiver<Slot>), EngineError> {
        let shared = &self.inner.shared;
        let mut state = shared.lock();
        if self.inner.closed.is_cancelled() {
            return Err(self.inner.closed_error());
        }
        if priority == Priority::Question && !shared.engine.is_ready() {
            // Someone waits for this answer: say why now rather than after a download.
            return Err(EngineError::Unavailable(format!(
                "the engine is not ready: {}",
                shared.engine.readiness().message
            )));
        }
        let id = self.inner.id;
        if state
            .waiting
            .iter()
            .any(|w| w.session == id && w.priority == priority)
        {
            // The door: the one already waiting will be answered from the newest frames.
            return Err(EngineError::Busy(format!(
                "stream '{}' already waits for the engine at {} priority",
                self.inner.stream,
                priority.name()
            )));
        }
        let (grant, granted) = oneshot::channel();
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        state.waiting.push(Waiter {
            ticket,
            session: self.inner.id,
            priority,
            newest,
            grant,
        });
        shared.dispatch(&mut state);
        Ok((ticket, granted))
    }
}

impl SessionInner {
    fn turn(&self, slot: Slot, priority: Priority) -> Turn {
        Turn {
            slot,
            stream: self.stream.clone(),
            key: self.key.clone(),
            priority,
            closed: self.closed.clone(),
        }
    }

    fn closed_error(&self) -> EngineError {
        closed_error(&self.stream)
    }

    fn close(&self) {
        if !self.closed.is_cancelled() {
            self.shared.engine.close_stream(&self.key);
        }
        self.closed.cancel();
        let mut state = self.shared.lock();
        state.sessions.remove(&self.id);
        let (withdrawn, kept) = std::mem::take(&mut state.waiting)
            .into_iter()
            .partition(|w| w.session == self.id);
        state.waiting = kept;
        drop(state);
        // Dropping their senders wakes the waiting callers with an error.
        drop::<Vec<Waiter>>(withdrawn);
    }
}

impl Drop for SessionInner {
    fn drop(&mut self) {
        self.close();
    }
}

impl Turn {
    /// Hands `request` to the engine. The slot stays taken until the answer ends or the
    /// returned `Generation` is dropped. Needs a tokio runtime (a task carries the answer
    /// and gives the slot back). Fails with [`EngineError::Stopped`] when the session was
    /// closed since the turn was granted.
    pub fn submit(self, request: crate::Request) -> Result<Generation, EngineError> {
        if self.closed.is_cancelled() {
            return Err(closed_error(&self.stream));
        }
        let upstream = self
            .slot
            .shared
            .engine
            .submit_for(&self.key, self.priority, request)?;
        let (tx, generation) = Generation::channel();
        tokio::spawn(forward(upstream, tx, self));
        Ok(generation)
    }
}

/// Carries one answer from the engine to the caller, and ends it early when the caller
/// drops its `Generation` or the session closes. The slot is given back as soon as the
/// engine is done with the request, before the last message is delivered.
async fn forward(
    mut upstream: Generation,
    tx: mpsc::Sender<Result<Output, EngineError>>,
    turn: Turn,
) {
    let Turn {
        slot,
        stream,
        closed,
        ..
    } = turn;
    loop {
        let item = tokio::select! {
            biased;
            _ = closed.cancelled() => break,
            // The caller dropped the Generation: returning drops ours, which cancels the
            // request, and the slot.
            _ = tx.closed() => return,
            item = upstream.next() => item,
        };
        match item {
            Some(Ok(Output::Text(text))) => tokio::select! {
                biased;
                _ = closed.cancelled() => break,
                sent = tx.send(Ok(Output::Text(text))) => if sent.is_err() {
                    return;
                },
            },
            // Done, an error, or the engine ended the answer: the engine is finished with it.
            last => {
                drop(slot);
                if let Some(item) = last {
                    let _ = tx.send(item).await;
                }
                return;
            }
        }
    }
    // The session closed: cancel the request and free the slot before telling the caller,
    // who may not be listening any more.
    drop(upstream);
    drop(slot);
    let _ = tx.try_send(Err(closed_error(&stream)));
}

fn closed_error(stream: &str) -> EngineError {
    EngineError::Stopped(format!("stream '{stream}' was closed"))
}

impl Priority {
    /// As status and messages spell it.
    pub fn name(self) -> &'static str {
        match self {
            Priority::Question => "question",
            Priority::Alert => "alert",
            Priority::Commentary => "commentary",
        }
    }
}

impl Shared {
    /// What may run at once now: the engine says (it changes while an upstream rests or a
    /// replica is down). Nothing while the engine is not there yet (its model is still
    /// downloading): callers wait as for a busy engine, and [`Scheduler::wake`] lets them in.
    fn concurrency(&self) -> usize {
        if !self.engine.is_ready() {
            return 0;
        }
        self.engine.parallelism().max(1)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic elsewhere (each change is a few plain
        // assignments), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take_slot(self: &Arc<Self>, state: &mut State, session: u64) -> Slot {
        state.running += 1;
        if let Some(entry) = state.sessions.get_mut(&session) {
            entry.running += 1;
            entry.turns += 1;
        }
        Slot {
            shared: self.clone(),
            session,
            armed: true,
        }
    }

    fn give_back(state: &mut State, session: u64) {
        state.running -= 1;
        if let Some(entry) = state.sessions.get_mut(&session) {
            entry.running -= 1;
        }
    }

    /// Grants free slots to the best waiting callers.
    fn dispatch(self: &Arc<Self>, state: &mut State) {
        let concurrency = self.concurrency();
        while state.running < concurrency {
            let Some(best) = (0..state.waiting.len()).min_by_key(|&i| state.waiting[i].key())
            else {
                return;
            };
            let waiter = state.waiting.swap_remove(best);
            let slot = self.take_slot(state, waiter.session);
            if let Err(mut slot) = waiter.grant.send(slot) {
                // The caller is gone. Count the slot back here: letting it drop would take
                // the lock we hold.
                slot.armed = false;
                Self::give_back(state, waiter.session);
                if let Some(entry) = state.sessions.get_mut(&waiter.session) {
                    entry.turns -= 1;
                }
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.armed {
            let mut state = self.shared.lock();
            Shared::give_back(&mut state, self.session);
            self.shared.dispatch(&mut state);
        }
    }
}

/// Takes a caller whose `turn` future was dropped out of the queue. A grant that already
/// arrived is given back when the receiver drops it.
struct Withdraw<'a> {
    shared: &'a Arc<Shared>,
    ticket: Option<u64>,
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket {
            let mut state = self.shared.lock();
            state.waiting.retain(|w| w.ticket != ticket);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::fake::{split_pieces, FakeEngine, Script};
    use crate::Request;

    const LIMIT: Duration = Duration::from_secs(60);

    /// A scheduler in front of `engine`, which says it serves `parallelism` at once.
    fn scheduler(engine: FakeEngine, parallelism: usize) -> Scheduler {
        engine.set_parallelism(parallelism);
        Scheduler::new(Arc::new(engine))
    }

    fn quick() -> FakeEngine {
        FakeEngine::saying(
            "fine",
            Duration::from_millis(100),
            Duration::from_millis(10),
        )
    }

    fn request() -> Request {
        Request::new(vec![], "sys", "user")
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Waits (on fake time, up to a limit) until `done` holds.
    async fn until(what: &str, done: impl Fn() -> bool) {
        tokio::time::timeout(LIMIT, async {
            while !done() {
                tokio::time::sleep(ms(1)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
    }

    /// Queues one caller per entry (in this order) while the only slot is taken, then frees
    /// the slot; returns the names in the order they were served.
    async fn served_order(
        entries: &[(&'static str, Priority, Option<Instant>)],
    ) -> Vec<&'static str> {
        let s = scheduler(quick(), 1);
        let busy = s.open_session("holder").try_turn().unwrap();
        let (served_tx, mut served) = mpsc::unbounded_channel();
        for &(name, priority, newest) in entries {
            let session = s.open_session(name);
            let served_tx = served_tx.clone();
            tokio::spawn(async move {
                let turn = session.turn(priority, newest).await.unwrap();
                served_tx.send(name).unwrap();
                // Held a moment, so the next grant only happens when this one is given back.
                tokio::time::sleep(ms(10)).await;
                drop(turn);
            });
        }
        let queued = entries.len();
        until("everyone queued", || {
            let w = s.status().waiting;
            w.question + w.alert + w.commentary == queued
        })
        .await;
        drop(busy);
        let mut order = Vec::new();
        for _ in entries {
            let name = tokio::time::timeout(LIMIT, served.recv())
                .await
                .unwrap()
                .unwrap();
            order.push(name);
        }
        order
    }

    #[tokio::test(start_paused = true)]
    async fn a_question_goes_before_an_alert_before_commentary() {
        let t0 = Instant::now();
        // Queued in the opposite order, and commentary even has the best fairness key.
        let order = served_order(&[
            ("commentary", Priority::Commentary, None),
            ("alert", Priority::Alert, Some(t0 + Duration::from_secs(1))),
            (
                "question",
                Priority::Question,
                Some(t0 + Duration::from_secs(2)),
            ),
        ])
        .await;
        assert_eq!(order, ["question", "alert", "commentary"]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_oldest_newest_frame_goes_first_then_arrival_order() {
        let t0 = Instant::now();
        let at = |s| Some(t0 + Duration::from_secs(s));
        let order = served_order(&[
            ("newest", Priority::Commentary, at(2)),
            ("older", Priority::Commentary, at(1)),
            ("never asked", Priority::Commentary, None),
            ("older, later", Priority::Commentary, at(1)),
        ])
        .await;
        assert_eq!(order, ["never asked", "older", "older, later", "newest"]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_slot_comes_back_when_the_answer_is_done() {
        let s = scheduler(FakeEngine::saying("a ball rolls", ms(100), ms(10)), 1);
        let (a, b) = (s.open_session("a"), s.open_session("b"));
        let generation = a.try_turn().unwrap().submit(request()).unwrap();
        assert!(matches!(b.try_turn(), Err(EngineError::Busy(_))));
        assert_eq!(s.status().running, 1);
        let (text, _) = tokio::time::timeout(LIMIT, generation.collect())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(text, "a ball rolls");
        // Given back by the time the caller has `Done`.
        assert_eq!(s.status().running, 0);
        assert!(b.try_turn().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_generation_mid_answer_frees_the_slot_and_cancels_the_request() {
        // The whole answer would take 20 s.
        let engine = FakeEngine::saying("one two three", ms(100), Duration::from_secs(10));
        let s = scheduler(engine.clone(), 1);
        let (a, b) = (s.open_session("a"), s.open_session("b"));
        let mut generation = a.try_turn().unwrap().submit(request()).unwrap();
        let first = tokio::time::timeout(LIMIT, generation.next())
            .await
            .unwrap();
        assert_eq!(first, Some(Ok(Output::Text("one".into()))));
        let waiting = b.turn(Priority::Commentary, None);
        drop(generation);
        let started = tokio::time::Instant::now();
        let turn = tokio::time::timeout(LIMIT, waiting).await.unwrap();
        assert!(turn.is_ok());
        assert!(started.elapsed() < ms(1), "waited {:?}", started.elapsed());
        // The engine's request was dropped too: its next piece finds nobody listening and
        // it stops (the fake notices at its next token, 10 s in, instead of running 20 s).
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(engine.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unused_turn_and_an_abandoned_wait_give_everything_back() {
        let s = scheduler(quick(), 1);
        let (a, b) = (s.open_session("a"), s.open_session("b"));
        let turn = a.try_turn().unwrap();
        let waiting = b.turn(Priority::Commentary, None);
        assert_eq!(s.status().waiting.commentary, 1);
        drop(waiting);
        assert_eq!(s.status().waiting.commentary, 0, "withdrawn");
        assert!(matches!(b.try_turn(), Err(EngineError::Busy(_))));
        drop(turn);
        assert_eq!(s.status().running, 0);
        assert!(b.try_turn().is_ok(), "given back at once");
        // A grant that reached a caller who then left is given back too.
        let held = a.try_turn().unwrap();
        let waiting = b.turn(Priority::Commentary, None);
        drop(held);
        assert_eq!(s.status().running, 1, "granted to b, not yet picked up");
        drop(waiting);
        assert_eq!(s.status().running, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn closing_a_session_mid_answer_cancels_it_and_the_next_stream_gets_the_engine() {
        let engine = FakeEngine::saying("slow words here", ms(100), Duration::from_secs(10));
        let s = scheduler(engine.clone(), 1);
        let (a, b) = (s.open_session("a"), s.open_session("b"));
        let mut generation = a.try_turn().unwrap().submit(request()).unwrap();
        let first = tokio::time::timeout(LIMIT, generation.next())
            .await
            .unwrap();
        assert_eq!(first, Some(Ok(Output::Text("slow".into()))));
        let waiting = b.turn(Priority::Commentary, None);
        // The stream is removed while the caller still holds its answer.
        drop(a);
        let next = tokio::time::timeout(LIMIT, generation.next())
            .await
            .unwrap();
        assert_eq!(
            next,
            Some(Err(EngineError::Stopped("stream 'a' was closed".into())))
        );
        assert_eq!(generation.next().await, None);
        let started = tokio::time::Instant::now();
        let turn = tokio::time::timeout(LIMIT, waiting).await.unwrap().unwrap();
        assert!(started.elapsed() < ms(1));
        let streams: Vec<String> = s.status().sessions.into_iter().map(|s| s.stream).collect();
        assert_eq!(streams, ["b"]);
        drop(turn);
    }

    #[tokio::test(start_paused = true)]
    async fn closing_one_handle_ends_waits_and_turns_of_every_clone() {
        let s = scheduler(quick(), 1);
        let busy = s.open_session("holder").try_turn().unwrap();
        let b = s.open_session("b");
        let b_elsewhere = b.clone();
        let waiting = b.turn(Priority::Question, None);
        b_elsewhere.close();
        let closed = Err(EngineError::Stopped("stream 'b' was closed".into()));
        let result = tokio::time::timeout(LIMIT, waiting).await.unwrap();
        assert_eq!(result.map(|_| ()), closed);
        assert_eq!(s.status().waiting.question, 0);
        drop(busy);
        assert_eq!(b.try_turn().map(|_| ()), closed);

        // A turn granted before the close refuses to start a request.
        let c = s.open_session("c");
        let turn = c.try_turn().unwrap();
        c.close();
        assert_eq!(turn.submit(request()).map(|_| ()), Err(closed_error("c")));
        assert_eq!(s.status().running, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_engine_error_ends_only_its_own_answer() {
        let engine = FakeEngine::new(
            vec![
                Script::Fail("out of memory".into()),
                Script::Answer(split_pieces("all good")),
            ],
            ms(100),
            ms(10),
        );
        let s = scheduler(engine, 2);
        let (a, b) = (s.open_session("a"), s.open_session("b"));
        let failing = a.try_turn().unwrap().submit(request()).unwrap();
        let fine = b.try_turn().unwrap().submit(request()).unwrap();
        let (failing, fine) = tokio::time::timeout(LIMIT, async {
            tokio::join!(failing.collect(), fine.collect())
        })
        .await
        .unwrap();
        assert_eq!(failing, Err(EngineError::Failed("out of memory".into())));
        assert_eq!(fine.unwrap().0, "all good");
        assert_eq!(s.status().running, 0);
        // The failed stream goes on.
        let again = a.try_turn().unwrap().submit(request()).unwrap();
        let (text, _) = tokio::time::timeout(LIMIT, again.collect())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(text, "all good");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_two_runs_two_answers_at_once() {
        let s = scheduler(
            FakeEngine::saying("done", Duration::from_secs(1), ms(10)),
            2,
        );
        let sessions: Vec<Session> = ["a", "b", "c"].iter().map(|n| s.open_session(n)).collect();
        let first = sessions[0].try_turn().unwrap().submit(request()).unwrap();
        let second = sessions[1].try_turn().unwrap().submit(request()).unwrap();
        let third = sessions[2].turn(Priority::Commentary, None);
        let status = s.status();
        assert_eq!((status.concurrency, status.running), (2, 2));
        assert_eq!(status.waiting.commentary, 1);
        let running: Vec<(String, usize, usize, u64)> = status
            .sessions
            .into_iter()
            .map(|s| (s.stream, s.waiting, s.running, s.turns))
            .collect();
        assert_eq!(
            running,
            [
                ("a".to_string(), 0, 1, 1),
                ("b".to_string(), 0, 1, 1),
                ("c".to_string(), 1, 0, 0)
            ]
        );
        let started = tokio::time::Instant::now();
        let (first, second) = tokio::time::timeout(LIMIT, async {
            tokio::join!(first.collect(), second.collect())
        })
        .await
        .unwrap();
        assert!(first.is_ok() && second.is_ok());
        // Side by side: both done after one answer's time, not two.
        assert!(
            started.elapsed() < Duration::from_millis(1100),
            "{:?}",
            started.elapsed()
        );
        let third = tokio::time::timeout(LIMIT, third).await.unwrap();
        assert!(third.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_wait_of_one_stream_at_one_priority_is_busy_at_the_door() {
        let s = scheduler(quick(), 1);
        let busy = s.open_session("holder").try_turn().unwrap();
        let cam = s.open_session("cam");
        let commentary = cam.turn(Priority::Commentary, None);
        let again = tokio::time::timeout(LIMIT, cam.turn(Priority::Commentary, None))
            .await
            .unwrap();
        assert_eq!(
            again.map(|_| ()),
            Err(EngineError::Busy(
                "stream 'cam' already waits for the engine at commentary priority".into()
            ))
        );
        // Other priorities of the same stream, and other streams, still queue.
        let question = cam.turn(Priority::Question, None);
        let other = s.open_session("other");
        let other_commentary = other.turn(Priority::Commentary, None);
        let w = s.status().waiting;
        assert_eq!((w.question, w.alert, w.commentary), (1, 0, 2));
        drop(busy);
        let turn = tokio::time::timeout(LIMIT, question)
            .await
            .unwrap()
            .unwrap();
        drop(turn);
        let turn = tokio::time::timeout(LIMIT, commentary)
            .await
            .unwrap()
            .unwrap();
        // Granted, so no longer waiting: the stream may queue its next one.
        let next = cam.turn(Priority::Commentary, None);
        assert_eq!(s.status().waiting.commentary, 2);
        drop(turn);
        let turn = tokio::time::timeout(LIMIT, other_commentary)
            .await
            .unwrap()
            .unwrap();
        drop(turn);
        assert!(tokio::time::timeout(LIMIT, next).await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn the_engine_sets_the_concurrency_and_may_change_it() {
        let engine = FakeEngine::saying("done", Duration::from_secs(1), ms(10));
        let s = scheduler(engine.clone(), 2);
        let sessions: Vec<Session> = ["a", "b", "c"].iter().map(|n| s.open_session(n)).collect();
        let a = sessions[0].try_turn().unwrap();
        let b = sessions[1].try_turn().unwrap();
        assert!(matches!(sessions[2].try_turn(), Err(EngineError::Busy(_))));
        // Its capacity shrinks (an upstream rests): running turns stay, nobody new starts.
        engine.set_parallelism(1);
        let c = sessions[2].turn(Priority::Commentary, None);
        drop(a);
        let status = s.status();
        assert_eq!(
            (
                status.concurrency,
                status.running,
                status.waiting.commentary
            ),
            (1, 1, 1)
        );
        // It grows again: the next caller (or freed slot) lets the waiting one in first.
        engine.set_parallelism(3);
        let a = sessions[0].try_turn().unwrap();
        let c = tokio::time::timeout(LIMIT, c).await.unwrap().unwrap();
        assert_eq!(s.status().running, 3);
        assert!(matches!(sessions[0].try_turn(), Err(EngineError::Busy(_))));
        drop((a, b, c));
        assert_eq!(s.status().running, 0);
    }

    /// Records what reaches the engine's per-stream methods, and answers like `quick()`.
    struct Recording {
        inner: FakeEngine,
        calls: Mutex<Vec<String>>,
    }

    impl Engine for Recording {
        fn submit(&self, request: Request) -> Result<Generation, EngineError> {
            self.calls.lock().unwrap().push("submit".into());
            self.inner.submit(request)
        }
        fn submit_for(
            &self,
            stream: &StreamKey,
            priority: Priority,
            request: Request,
        ) -> Result<Generation, EngineError> {
            let call = format!("submit_for {} {priority:?}", stream.name());
            self.calls.lock().unwrap().push(call);
            self.inner.submit(request)
        }
        fn push_frame(&self, stream: &StreamKey, frame: Frame) {
            let call = format!("push_frame {} {:?}", stream.name(), frame.pts);
            self.calls.lock().unwrap().push(call);
        }
        fn close_stream(&self, stream: &StreamKey) {
            let call = format!("close_stream {}", stream.name());
            self.calls.lock().unwrap().push(call);
        }
        fn info(&self) -> crate::EngineInfo {
            self.inner.info()
        }
        fn in_flight(&self) -> usize {
            self.inner.in_flight()
        }
        fn health(&self) -> futures::future::BoxFuture<'_, bool> {
            self.inner.health()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_names_its_stream_to_the_engine_and_closes_it_once() {
        let engine = Arc::new(Recording {
            inner: quick(),
            calls: Mutex::new(Vec::new()),
        });
        let s = Scheduler::new(engine.clone());
        let cam = s.open_session("cam");
        let other = s.open_session("cam");
        assert_ne!(cam.key(), other.key(), "two sessions, two sequences");
        let frame = Frame {
            image: crate::Image::Rgb(kibitz_frames::Rgb {
                width: 1,
                height: 1,
                data: vec![0, 0, 0].into(),
            }),
            pts: ms(500),
        };
        cam.push_frame(frame.clone());
        let turn = tokio::time::timeout(LIMIT, cam.turn(Priority::Question, None))
            .await
            .unwrap()
            .unwrap();
        let answer = turn.submit(request()).unwrap();
        tokio::time::timeout(LIMIT, answer.collect())
            .await
            .unwrap()
            .unwrap();
        cam.try_turn().unwrap().submit(request()).unwrap();
        let clone = cam.clone();
        cam.close();
        clone.close();
        drop(clone);
        cam.push_frame(frame); // after close: not forwarded
        let calls = engine.calls.lock().unwrap().clone();
        assert_eq!(
            calls,
            [
                "push_frame cam 500ms",
                "submit_for cam Question",
                "submit_for cam Commentary",
                "close_stream cam",
            ]
        );
    }
}
