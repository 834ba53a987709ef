//! Outputs as plug-ins, in the shape of a Vector sink: an output kind is built from a
//! stream's context and returns its running form, `build(context) -> running output`.
//!
//! - [`Output`]: one kind of output. `name` is what it is counted under in the stream's
//!   status (`outputs`) and in `/metrics` (label `output`); no list of kinds exists
//!   anywhere else. `build` takes the [`OutputContext`] and returns whatever the kind runs
//!   as: a response body for an HTTP viewer (MJPEG, SSE, the Ogg speech stream), a
//!   [`Task`] for an output the stream runs itself (alerts, the speaker, history).
//! - [`StreamHandle::attach`]: builds an output for one client (a connection); it is
//!   counted while its context lives.
//! - [`StreamOutput`]: an output every stream of a registry runs itself, registered with
//!   [`crate::Streams::add_output`]. [`Demand`] says when: from the stream's start to its
//!   end, or only while outputs of some names are attached (the speech encoder runs only
//!   while someone reads the speech stream). Its start and stop follow a `watch` on the
//!   counts, never a poll.
//!
//! Outputs depend on the stream's handle; the stream knows none of them.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use kibitz_commentator::Event;
use kibitz_frames::DisplayFrame;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::counts::Running;
use crate::playout::Playout;
use crate::stream::StreamHandle;

/// A running output that the stream drives: it moves data until its context's `stopped`
/// is cancelled.
pub type Task = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// One kind of output.
pub trait Output: Send + 'static {
    /// What a built output is: a response body, a [`Task`], a session.
    type Running;

    /// The name it is counted under (`mjpeg`, `sse`, `alerts`, …). Outputs of one kind
    /// share a name; two kinds must not.
    fn name(&self) -> &'static str;

    /// Builds the running output. It is counted under [`Output::name`] for as long as it
    /// holds `cx`, so it keeps `cx` for as long as it runs.
    fn build(self, cx: OutputContext) -> Self::Running;
}

/// What every output is built from: the stream, its events, a cursor over its delayed
/// picture, and when to stop. The output is counted until its context drops.
///
/// (The context has a `Drop`, which also keeps an `async move` block that uses only some of
/// its fields from capturing just those and dropping the rest, and with it the count, at
/// once.)
pub struct OutputContext {
    /// The stream: its speech (`speech_frames`, `speech_clip`), settings, status, and the
    /// state outputs keep on it ([`StreamHandle::extension`]).
    pub handle: StreamHandle,
    /// The stream's events from the moment of building.
    pub events: broadcast::Receiver<Event>,
    /// A cursor over the delayed picture; see [`OutputContext::show`].
    pub playout: Playout,
    /// Cancelled when the stream is removed, or when an output run on demand is no longer
    /// wanted.
    pub stopped: CancellationToken,
    name: &'static str,
    sent: Arc<AtomicU64>,
}

impl Drop for OutputContext {
    fn drop(&mut self) {
        self.handle.counts().leave(self.name);
    }
}

impl OutputContext {
    fn new(
        handle: &StreamHandle,
        name: &'static str,
        per_stream: bool,
        now: Instant,
        stopped: CancellationToken,
    ) -> OutputContext {
        let sent = handle.counts().enter(name, per_stream);
        OutputContext {
            handle: handle.clone(),
            events: handle.subscribe(),
            playout: Playout::new(now),
            stopped,
            name,
            sent,
        }
    }

    /// The frame to show at `now`, if a new one is due (see [`Playout::poll`]), counted as
    /// sent under the output's name; when to ask again is [`Playout::wake_at`].
    pub fn show(&mut self, now: Instant) -> Option<DisplayFrame> {
        let frame = self.playout.poll(
            now,
            self.handle.target_delay(),
            self.handle.frame_period(),
            |t| self.handle.frame_at(t),
        );
        if frame.is_some() {
            self.sent.fetch_add(1, Ordering::Relaxed);
        }
        frame
    }
}

impl StreamHandle {
    /// Builds `output` for one client; it is counted under its name until it drops its
    /// context.
    pub fn attach<O: Output>(&self, output: O, now: Instant) -> O::Running {
        let cx = OutputContext::new(self, output.name(), false, now, self.stopped());
        output.build(cx)
    }

    /// Outputs of `name` running now.
    pub fn running(&self, name: &str) -> u64 {
        self.counts().running(name)
    }

    /// Outputs running now, by name; a change wakes the receiver.
    pub fn watch_running(&self) -> tokio::sync::watch::Receiver<Running> {
        self.counts().watch()
    }
}

/// When an output a stream runs itself is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Demand {
    /// From the stream's start to its end.
    Always,
    /// Only while at least one output of these names is attached; built again each time
    /// one comes after none.
    While(&'static [&'static str]),
}

/// An output kind every stream runs itself: registered once with the registry
/// ([`crate::Streams::add_output`]), built on each stream.
#[derive(Clone)]
pub struct StreamOutput {
    name: &'static str,
    demand: Demand,
    build: Arc<dyn Fn(OutputContext) -> Task + Send + Sync>,
}

impl StreamOutput {
    /// An output that runs from the stream's start to its end.
    pub fn new<O>(output: O) -> StreamOutput
    where
        O: Output<Running = Task> + Clone + Sync,
    {
        StreamOutput {
            name: output.name(),
            demand: Demand::Always,
            build: Arc::new(move |cx| output.clone().build(cx)),
        }
    }

    /// Runs it only while outputs of `names` are attached.
    pub fn while_attached(mut self, names: &'static [&'static str]) -> StreamOutput {
        self.demand = Demand::While(names);
        self
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn demand(&self) -> Demand {
        self.demand
    }

    /// Starts it on `handle`'s stream. One that always runs is built before this returns
    /// (what it sets up on the stream is there at once); the task ends with the stream.
    pub(crate) fn start(&self, handle: &StreamHandle) -> JoinHandle<()> {
        match self.demand {
            Demand::Always => tokio::spawn(self.build_on(handle, handle.stopped())),
            Demand::While(names) => tokio::spawn(self.clone().on_demand(handle.clone(), names)),
        }
    }

    fn build_on(&self, handle: &StreamHandle, stopped: CancellationToken) -> Task {
        let cx = OutputContext::new(handle, self.name, true, now(), stopped);
        (self.build)(cx)
    }

    /// Builds and runs the output each time one of `names` is attached after none, and
    /// stops it when none is left. Woken by the counts' watch.
    async fn on_demand(self, handle: StreamHandle, names: &'static [&'static str]) {
        let stopped = handle.stopped();
        let mut counts = handle.watch_running();
        let wanted = move |running: &Running| {
            names
                .iter()
                .any(|name| running.get(name).is_some_and(|&n| n > 0))
        };
        loop {
            let woke = tokio::select! {
                _ = stopped.cancelled() => return,
                woke = counts.wait_for(|r| wanted(r)) => woke.is_ok(),
            };
            if !woke {
                return;
            }
            let run = stopped.child_token();
            let mut task = tokio::spawn(self.build_on(&handle, run.clone()));
            let ended_by_itself = tokio::select! {
                _ = &mut task => true,
                left = counts.wait_for(|r| !wanted(r)) => left.is_err(),
                _ = stopped.cancelled() => false,
            };
            run.cancel();
            // A finished task's handle must not be polled again.
            if !ended_by_itself {
                let _ = task.await;
            }
            if stopped.is_cancelled() {
                return;
            }
            if ended_by_itself {
                // It gave up (a broken encoder): not again until its demand comes anew.
                let gone = tokio::select! {
                    _ = stopped.cancelled() => return,
                    gone = counts.wait_for(|r| !wanted(r)) => gone.is_ok(),
                };
                if !gone {
                    return;
                }
            }
        }
    }
}

/// Tokio's clock, so tests with paused time drive the outputs.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}
