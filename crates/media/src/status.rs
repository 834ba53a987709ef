//! What a source is doing, for `/api/status`, the page and the logs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The life of a source. Changes are announced through the callback given in
/// [`crate::SourceContext`]; the current one is in [`SourceStatus::state`].
#[derive(Debug, Clone, PartialEq)]
pub enum SourceState {
    /// Opening (the first time, or again after a wait).
    Connecting,
    /// Frames are coming.
    Live,
    /// The source dropped or refused; the next try is `retry_in` from the change.
    Reconnecting { attempt: u32, retry_in: Duration },
    /// A file reached its end and looping is off.
    Ended,
    /// Gave up (a file that became unreadable, or that holds no decodable picture).
    Failed(String),
}

impl SourceState {
    /// `connecting`, `live`, `reconnecting`, `ended` or `failed`: the `state` of
    /// `Event::Source`.
    pub fn name(&self) -> &'static str {
        match self {
            SourceState::Connecting => "connecting",
            SourceState::Live => "live",
            SourceState::Reconnecting { .. } => "reconnecting",
            SourceState::Ended => "ended",
            SourceState::Failed(_) => "failed",
        }
    }

    /// The `detail` of `Event::Source`: the retry plan or the reason.
    pub fn detail(&self) -> Option<String> {
        match self {
            SourceState::Reconnecting { attempt, retry_in } => Some(format!(
                "attempt {attempt}, retrying in {:.0} s",
                retry_in.as_secs_f64()
            )),
            SourceState::Failed(reason) => Some(reason.clone()),
            _ => None,
        }
    }
}

/// A snapshot of one source, cheap to take at any time.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceStatus {
    /// What was given to `--source`.
    pub source: String,
    /// `file`, `webcam`, `rtsp`, `http` or `url`.
    pub kind: &'static str,
    pub state: SourceState,
    /// FFmpeg's name of the video codec (`h264`, `mjpeg`, …), once opened.
    pub codec: Option<String>,
    pub width: u32,
    pub height: u32,
    /// The frame rate the source declares, if it declares one.
    pub source_fps: Option<f64>,
    /// Frames a second actually pushed to the display buffer, over the last two seconds.
    pub measured_fps: Option<f64>,
    /// An MJPEG source whose JPEGs go to viewers untouched.
    pub passthrough: bool,
    /// Frames pushed to the display buffer.
    pub frames_decoded: u64,
    /// Packets or frames lost to damage or decode errors (the stream goes on).
    pub frames_dropped: u64,
    /// Frames taken for the model.
    pub frames_captured: u64,
    /// Times a live source was reopened.
    pub reconnects: u64,
    /// Times a file started over.
    pub loops: u64,
    /// The last thing that went wrong, kept after recovery for diagnosis.
    pub last_error: Option<String>,
    /// The size viewers get when the source's (`width` x `height`) is over the pixel cap.
    pub fitted: Option<(u32, u32)>,
}

impl SourceStatus {
    pub fn new(source: String, kind: &'static str) -> Self {
        Self {
            source,
            kind,
            state: SourceState::Connecting,
            codec: None,
            width: 0,
            height: 0,
            source_fps: None,
            measured_fps: None,
            passthrough: false,
            frames_decoded: 0,
            frames_dropped: 0,
            frames_captured: 0,
            reconnects: 0,
            loops: 0,
            last_error: None,
            fitted: None,
        }
    }
}

/// The decode thread's side of the status: updates the snapshot and announces state
/// changes.
#[derive(Clone)]
pub(crate) struct StatusCell {
    inner: Arc<Mutex<SourceStatus>>,
    on_state: Arc<dyn Fn(&SourceState) + Send + Sync>,
}

impl StatusCell {
    pub(crate) fn new(
        status: SourceStatus,
        on_state: Arc<dyn Fn(&SourceState) + Send + Sync>,
    ) -> Self {
        Self {
            inner: Arc::new(Mutex::new(status)),
            on_state,
        }
    }

    pub(crate) fn get(&self) -> SourceStatus {
        self.lock().clone()
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut SourceStatus)) {
        f(&mut self.lock());
    }

    /// Sets the state and tells the callback, unless nothing changed.
    pub(crate) fn set_state(&self, state: SourceState) {
        {
            let mut s = self.lock();
            if s.state == state {
                return;
            }
            s.state = state.clone();
        }
        tracing::info!(state = state.name(), detail = state.detail(), "source");
        (self.on_state)(&state);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SourceStatus> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_details() {
        assert_eq!(SourceState::Connecting.name(), "connecting");
        assert_eq!(SourceState::Live.detail(), None);
        let r = SourceState::Reconnecting {
            attempt: 3,
            retry_in: Duration::from_secs(4),
        };
        assert_eq!(r.name(), "reconnecting");
        assert_eq!(r.detail().unwrap(), "attempt 3, retrying in 4 s");
        assert_eq!(SourceState::Failed("gone".into()).detail().unwrap(), "gone");
        assert_eq!(SourceState::Ended.name(), "ended");
    }

    #[test]
    fn set_state_announces_changes_once() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let cell = {
            let seen = Arc::clone(&seen);
            StatusCell::new(
                SourceStatus::new("x".into(), "file"),
                Arc::new(move |s: &SourceState| seen.lock().unwrap().push(s.name())),
            )
        };
        cell.set_state(SourceState::Connecting); // already the state: silent
        cell.set_state(SourceState::Live);
        cell.set_state(SourceState::Live);
        cell.set_state(SourceState::Ended);
        assert_eq!(*seen.lock().unwrap(), vec!["live", "ended"]);
        assert_eq!(cell.get().state, SourceState::Ended);
        cell.update(|s| s.frames_decoded += 2);
        assert_eq!(cell.get().frames_decoded, 2);
    }
}
