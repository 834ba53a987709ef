//! A stream's spoken commentary: which comments are spoken, when, and the continuous
//! Ogg/Opus stream of them.
//!
//! **When.** A comment talks about the newest frame of its cycle; it is spoken when the
//! delayed picture shows that frame: `play_at = captured + target_delay`. Speech never
//! overlaps: a comment whose turn comes while the voice still speaks starts when it ends,
//! and one that would then start more than [`MAX_LATE`] after its picture is shown but not
//! spoken (it would talk about something already gone). The commentary loop is told how long
//! the voice is busy ([`Control::SpeakingUntil`]), so its next answer is ready about when
//! the speech ends instead of piling up, and how long synthesis took to its first audio
//! ([`Control::AddSpeechLatency`]), so the sync delay keeps speech from starting before its
//! picture.
//!
//! **Only while someone listens.** A page with sound on or a reader of the Ogg stream
//! counts ([`OutputKind::Listener`], [`OutputKind::Speech`]); with nobody, nothing is
//! synthesized and the loop runs as if there were no voice ([`Control::SetSpoken`]).
//!
//! **The Ogg stream.** One Opus encoder per stream, running only while someone reads the
//! stream, makes a 20 ms frame every 20 ms of real time: the scheduled clip's samples when
//! one is playing, silence otherwise. Each reader wraps the shared frames in its own Ogg
//! pages ([`kibitz_voice::OggMuxer`]), so whoever joins gets a valid stream from byte 0.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kibitz_commentator::{Control, Event};
use kibitz_voice::{OpusEncoder, OpusFrame, Pcm, Resampler, Voice, OPUS_RATE};
use serde::Serialize;
use tokio::sync::broadcast;

use crate::stream::{OutputKind, StreamHandle};

mod pacer;
mod timeline;

pub use pacer::{FrameAudio, Pacer, Step, FRAME, FRAME_TIME};
pub use timeline::{About, Clip, Placement, SpeechTimeline, DELIVERY, MAX_LATE};

/// Clips kept for the page to fetch (`/api/streams/{id}/speech/clips/{n}`).
const CLIPS_KEPT: usize = 16;
/// Answers' clips are numbered from here, cycles' below.
const ANSWER_CLIPS: u64 = 1 << 40;
/// How often the speaker checks whether anyone listens.
const LISTEN_CHECK: Duration = Duration::from_millis(250);

/// What one stream's speech shares with the outputs.
pub(crate) struct Speech {
    voice: Mutex<Option<Arc<dyn Voice>>>,
    clips: Mutex<VecDeque<(u64, Arc<Pcm>)>>,
    /// Clips to play on the Ogg stream, by start time, at 48 kHz.
    schedule: Mutex<VecDeque<(Instant, Arc<Vec<i16>>)>>,
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
            voice: Mutex::new(voice),
            clips: Mutex::default(),
            schedule: Mutex::default(),
            frames: broadcast::channel(256).0,
            pre_skip,
            status: Mutex::new(SpeechStatus {
                voice: name,
                ..SpeechStatus::default()
            }),
        }
    }

    pub(crate) fn set_voice(&self, voice: Option<Arc<dyn Voice>>, name: String) {
        *lock(&self.voice) = voice;
        lock(&self.status).voice = name;
    }

    pub(crate) fn status(&self, listeners: u64) -> SpeechStatus {
        SpeechStatus {
            listeners,
            ..lock(&self.status).clone()
        }
    }

    pub(crate) fn clip(&self, n: u64) -> Option<Arc<Pcm>> {
        lock(&self.clips)
            .iter()
            .find(|(id, _)| *id == n)
            .map(|(_, pcm)| pcm.clone())
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<OpusFrame> {
        self.frames.subscribe()
    }

    pub(crate) fn pre_skip(&self) -> u16 {
        self.pre_skip
    }
}

/// Speaks the stream's comments while someone listens. Runs until the stream stops.
pub(crate) async fn speak_comments(handle: StreamHandle) {
    let speech = handle.speech();
    let mut events = handle.subscribe();
    let stopped = handle.stopped();
    let mut check = tokio::time::interval(LISTEN_CHECK);
    let mut heard = false;
    let mut timeline = SpeechTimeline::default();
    loop {
        let event = tokio::select! {
            _ = stopped.cancelled() => return,
            _ = check.tick() => {
                let now_heard = handle.listeners() > 0 && lock(&speech.voice).is_some();
                if now_heard != heard {
                    heard = now_heard;
                    let _ = handle.control(Control::SetSpoken(heard));
                }
                continue;
            }
            event = events.recv() => event,
        };
        // A comment talks about the newest frame of its cycle, captured `latency` before
        // its end; an answer is about now and is spoken as soon as it can be.
        let (cycle, text, latency) = match event {
            Ok(Event::CycleEnd(end)) if !end.skipped && !end.text.is_empty() => {
                (end.cycle, end.text, Some(end.latency))
            }
            Ok(Event::AnswerEnd {
                answer,
                text,
                error: None,
                ..
            }) if !text.is_empty() => (answer, text, None),
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let voice = lock(&speech.voice).clone();
        let Some(voice) = voice.filter(|_| handle.listeners() > 0) else {
            continue;
        };
        let answered = now();
        let pcm = match synthesize(voice, &text).await {
            Ok(Some(pcm)) => pcm,
            Ok(None) => continue,
            Err(message) => {
                lock(&speech.status).failed += 1;
                handle.emit(Event::Error {
                    cycle: latency.map(|_| cycle),
                    message: format!("the voice failed, the comment is shown only: {message}"),
                });
                continue;
            }
        };
        let ready = now();
        let first_audio = ready.saturating_duration_since(answered);
        let clip = Clip {
            answered,
            ready,
            duration: pcm.duration(),
            about: match latency {
                Some(latency) => About::Picture {
                    latency: Duration::from_secs_f64(latency.max(0.0)),
                },
                None => About::Now,
            },
        };
        if let Some(needed) = clip.delay_needed() {
            let _ = handle.control(Control::AddSpeechLatency(needed.as_secs_f64()));
        }
        let (start, until, late) = match timeline.place(&clip, handle.target_delay()) {
            Placement::Play { start, until, late } => (start, until, late),
            Placement::TooLate { late } => {
                lock(&speech.status).too_late += 1;
                tracing::debug!(stream = %handle.id(), cycle, ?late, "comment too late to speak");
                continue;
            }
        };
        let duration = clip.duration;
        let _ = handle.control(Control::SpeakingUntil(until));
        // Answers and cycles count separately; clips are named apart.
        let n = if latency.is_some() {
            cycle
        } else {
            ANSWER_CLIPS + cycle
        };
        {
            let mut clips = lock(&speech.clips);
            if clips.len() == CLIPS_KEPT {
                clips.pop_front();
            }
            clips.push_back((n, Arc::new(pcm.clone())));
        }
        if handle.speech_readers() > 0 {
            let at48 = Resampler::convert(&pcm, OPUS_RATE);
            lock(&speech.schedule).push_back((start, Arc::new(at48.samples)));
        }
        {
            let mut status = lock(&speech.status);
            status.spoken += 1;
            status.last_first_audio_ms = Some(first_audio.as_secs_f64() * 1e3);
            status.last_late_ms = Some(late.as_secs_f64() * 1e3);
        }
        handle.emit(Event::Speech {
            cycle: n,
            clip: format!("/api/streams/{}/speech/clips/{n}", handle.id()),
            play_at: unix_ms(start),
            duration: duration.as_secs_f64(),
            late: late.as_secs_f64(),
        });
    }
}

/// The whole comment as one clip (sentences joined), synthesized off the runtime.
async fn synthesize(voice: Arc<dyn Voice>, text: &str) -> Result<Option<Pcm>, String> {
    let mut utterance = kibitz_voice::speak(voice, text);
    let mut all = Pcm::default();
    while let Some(clip) = utterance.next().await {
        let clip = clip.map_err(|e| e.to_string())?;
        if !all.samples.is_empty() && all.sample_rate != clip.pcm.sample_rate {
            // A voice does not change its rate mid-comment; if it did, convert.
            all.append(&Resampler::convert(&clip.pcm, all.sample_rate));
        } else {
            all.append(&clip.pcm);
        }
    }
    Ok((!all.samples.is_empty()).then_some(all))
}

/// Makes the continuous stream's Opus frames, 20 ms of audio every 20 ms, while anyone
/// reads it. Runs until the stream stops.
pub(crate) async fn encode_stream(handle: StreamHandle) {
    let speech = handle.speech();
    let stopped = handle.stopped();
    loop {
        // Idle until a reader comes.
        while handle.speech_readers() == 0 {
            tokio::select! {
                _ = stopped.cancelled() => return,
                _ = tokio::time::sleep(LISTEN_CHECK) => {}
            }
        }
        let Ok(mut encoder) = OpusEncoder::new() else {
            tracing::error!("cannot start the Opus encoder; the speech stream stays silent");
            return;
        };
        let mut pacer = Pacer::new(now());
        while handle.speech_readers() > 0 {
            for (start, samples) in lock(&speech.schedule).drain(..) {
                pacer.schedule(start, samples);
            }
            let audio = match pacer.poll(now()) {
                Step::Wait(until) => {
                    tokio::select! {
                        _ = stopped.cancelled() => return,
                        _ = tokio::time::sleep_until(until.into()) => {}
                    }
                    continue;
                }
                Step::Frame(audio) => audio,
            };
            let frames = match audio {
                FrameAudio::Samples(samples) => encoder.push(&Pcm {
                    samples,
                    sample_rate: OPUS_RATE,
                }),
                FrameAudio::Silence => encoder.silence(FRAME_TIME),
            };
            match frames {
                Ok(frames) => {
                    for frame in frames {
                        let _ = speech.frames.send(frame);
                    }
                }
                Err(e) => {
                    tracing::error!("the Opus encoder failed: {e}");
                    return;
                }
            }
        }
    }
}

/// Milliseconds since the unix epoch of `t` on this process's clock.
pub fn unix_ms(t: Instant) -> f64 {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
        * 1e3;
    let now = now();
    if t >= now {
        wall + (t - now).as_secs_f64() * 1e3
    } else {
        wall - (now - t).as_secs_f64() * 1e3
    }
}

impl StreamHandle {
    /// Pages with sound on and readers of the speech stream.
    pub fn listeners(&self) -> u64 {
        self.viewers(OutputKind::Listener) + self.viewers(OutputKind::Speech)
    }

    pub(crate) fn speech_readers(&self) -> u64 {
        self.viewers(OutputKind::Speech)
    }

    /// A spoken comment's audio, while it is among the last few.
    pub fn speech_clip(&self, n: u64) -> Option<Arc<Pcm>> {
        self.speech().clip(n)
    }

    /// The continuous stream's Opus frames from now on, and the encoder's pre-skip for the
    /// Ogg header.
    pub fn speech_frames(&self) -> (broadcast::Receiver<OpusFrame>, u16) {
        let speech = self.speech();
        (speech.subscribe(), speech.pre_skip())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}
