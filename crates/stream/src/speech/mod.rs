//! A stream's voice and what its speech outputs share: the voice, the last clips for the
//! page, the clips queued for the continuous stream, its Opus frames, and the counts in
//! status. No output lives here (they are in `crate::outputs`), only the shared state and
//! the sans-IO timing types they ask:
//!
//! - [`SpeechTimeline`]: when a clip plays (with its picture, never overlapping, dropped
//!   when too late) and how long the commentary loop is held.
//! - [`Pacer`]: the continuous stream's 20 ms frames on real time.
//!
//! **Only while someone listens.** A page with sound on ([`LISTENER`]) or a reader of the
//! Ogg stream ([`READER`]) counts as a listener; with none, nothing is synthesized and the
//! commentary loop runs as if there were no voice. The speaker and the encoder are outputs
//! the stream runs on demand of these names.
//!
//! **The Ogg stream.** One Opus encoder per stream, running only while someone reads the
//! stream; each reader wraps the shared frames in its own Ogg pages
//! ([`kibitz_voice::OggMuxer`]), so whoever joins gets a valid stream from byte 0.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use kibitz_voice::{OpusEncoder, OpusFrame, Pcm, Voice};
use serde::Serialize;
use tokio::sync::{broadcast, watch};

use crate::counts::OutputCount;

mod pacer;
mod timeline;

pub use pacer::{FrameAudio, Pacer, Step, FRAME, FRAME_TIME};
pub use timeline::{About, Clip, Placement, SpeechTimeline, DELIVERY, MAX_LATE};

/// The output name of a page with its sound on (it fetches and plays the clips itself).
pub const LISTENER: &str = "listener";
/// The output name of a reader of the continuous Ogg/Opus stream.
pub const READER: &str = "speech";
/// The output name of a WebRTC viewer (WHEP), which takes the same Opus frames.
pub const WEBRTC: &str = "webrtc";
/// Whoever takes the continuous stream's Opus frames: the encoder runs while one does.
pub const OPUS_READERS: &[&str] = &[READER, WEBRTC];
/// Who counts as listening.
pub const LISTENING: &[&str] = &[LISTENER, READER, WEBRTC];

/// Clips kept for the page to fetch (`/api/streams/{id}/speech/clips/{n}`).
const CLIPS_KEPT: usize = 16;
/// Answers' clips are numbered from here, cycles' below.
pub(crate) const ANSWER_CLIPS: u64 = 1 << 40;

/// Listeners among `outputs`.
pub(crate) fn listeners(outputs: &BTreeMap<String, OutputCount>) -> u64 {
    LISTENING
        .iter()
        .filter_map(|name| outputs.get(*name))
        .map(|o| o.running)
        .sum()
}

/// What one stream's speech outputs share.
pub(crate) struct Speech {
    /// The voice, `None` when off; the speaker wakes on a change.
    voice: watch::Sender<Option<Arc<dyn Voice>>>,
    clips: Mutex<VecDeque<(u64, Arc<Pcm>)>>,
    /// When the voice is busy: one timeline for the stream, kept across listeners.
    timeline: Mutex<SpeechTimeline>,
    /// Clips for the encoder to play, by start time, at 48 kHz.
    queued: Mutex<VecDeque<(Instant, Arc<Vec<i16>>)>>,
    /// The Opus frames of the continuous stream, as they are made.
    frames: broadcast::Sender<OpusFrame>,
    pre_skip: u16,
    status: Mutex<SpeechStatus>,
}

/// The voice's part of a stream's status.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SpeechStatus {
    /// The voice (`espeak`, `piper:…`, …) or `off`.
    pub voice: String,
    /// Pages with sound on and readers of the speech stream.
    pub listeners: u64,
    /// Comments spoken.
    pub spoken: u64,
    /// Comments shown but not spoken: their turn would have come too late.
    pub too_late: u64,
    /// Synthesis failures (the commentary went on, silent).
    pub failed: u64,
    /// From the end of the answer to its first audio, last spoken comment.
    pub last_first_audio_ms: Option<f64>,
    /// How far after its picture the last comment started (0 when on time).
    pub last_late_ms: Option<f64>,
}

impl Speech {
    pub(crate) fn new(voice: Option<Arc<dyn Voice>>, name: String) -> Speech {
        let pre_skip = OpusEncoder::new().map(|e| e.pre_skip()).unwrap_or(312);
        Speech {
            voice: watch::Sender::new(voice),
            clips: Mutex::default(),
            timeline: Mutex::default(),
            queued: Mutex::default(),
            frames: broadcast::channel(256).0,
            pre_skip,
            status: Mutex::new(SpeechStatus {
                voice: name,
                ..SpeechStatus::default()
            }),
        }
    }

    pub(crate) fn set_voice(&self, voice: Option<Arc<dyn Voice>>, name: String) {
        self.voice.send_replace(voice);
        lock(&self.status).voice = name;
    }

    /// The voice now, and a receiver woken when it changes.
    pub(crate) fn voice(&self) -> watch::Receiver<Option<Arc<dyn Voice>>> {
        self.voice.subscribe()
    }

    pub(crate) fn status(&self, listeners: u64) -> SpeechStatus {
        SpeechStatus {
            listeners,
            ..lock(&self.status).clone()
        }
    }

    /// Places a clip on the stream's one timeline.
    pub(crate) fn place(&self, clip: &Clip, delay: std::time::Duration) -> Placement {
        lock(&self.timeline).place(clip, delay)
    }

    /// Keeps clip `n` for the page to fetch.
    pub(crate) fn keep_clip(&self, n: u64, pcm: Arc<Pcm>) {
        let mut clips = lock(&self.clips);
        if clips.len() == CLIPS_KEPT {
            clips.pop_front();
        }
        clips.push_back((n, pcm));
    }

    pub(crate) fn clip(&self, n: u64) -> Option<Arc<Pcm>> {
        lock(&self.clips)
            .iter()
            .find(|(id, _)| *id == n)
            .map(|(_, pcm)| pcm.clone())
    }

    /// Queues a clip for the continuous stream.
    pub(crate) fn queue(&self, start: Instant, samples: Arc<Vec<i16>>) {
        lock(&self.queued).push_back((start, samples));
    }

    /// The clips queued since the last call, in order.
    pub(crate) fn take_queued(&self) -> Vec<(Instant, Arc<Vec<i16>>)> {
        lock(&self.queued).drain(..).collect()
    }

    /// Sends one frame of the continuous stream to its readers.
    pub(crate) fn send_frame(&self, frame: OpusFrame) {
        let _ = self.frames.send(frame);
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<OpusFrame> {
        self.frames.subscribe()
    }

    pub(crate) fn pre_skip(&self) -> u16 {
        self.pre_skip
    }

    /// Counts in status.
    pub(crate) fn count(&self, update: impl FnOnce(&mut SpeechStatus)) {
        update(&mut lock(&self.status));
    }
}

/// Milliseconds since the unix epoch of `t` on this process's clock.
pub fn unix_ms(t: Instant) -> f64 {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
        * 1e3;
    let now = tokio::time::Instant::now().into_std();
    if t >= now {
        wall + (t - now).as_secs_f64() * 1e3
    } else {
        wall - (now - t).as_secs_f64() * 1e3
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
