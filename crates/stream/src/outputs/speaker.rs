//! The speaker: says the stream's comments and answers while someone listens. An output
//! the stream runs on demand of its listeners ([`crate::speech::LISTENING`]); when the
//! first comes it tells the commentary loop its words are spoken, when the last goes it
//! tells it they are not ([`Control::SetSpoken`]). When each clip plays is the
//! [`crate::speech::SpeechTimeline`]'s decision; this loop only synthesizes, asks, and
//! hands the answer on: to the commentary loop (how long the voice is busy, how much delay
//! speech needs), to the page (a `speech` event naming the clip), and to the continuous
//! stream's encoder while it has readers.

use std::sync::Arc;
use std::time::Duration;

use kibitz_commentator::{Control, Event};
use kibitz_voice::{Pcm, Resampler, Voice, OPUS_RATE};
use tokio::sync::broadcast::error::RecvError;

use crate::output::{Output, OutputContext, StreamOutput, Task};
use crate::speech::{About, Clip, Placement, ANSWER_CLIPS, LISTENING, OPUS_READERS};
use crate::stream::StreamHandle;

/// The speaker, as the registry runs it on every stream.
pub(crate) fn output() -> StreamOutput {
    StreamOutput::new(Speaker).while_attached(LISTENING)
}

#[derive(Clone)]
pub(crate) struct Speaker;

impl Output for Speaker {
    type Running = Task;

    fn name(&self) -> &'static str {
        "speaker"
    }

    fn build(self, cx: OutputContext) -> Task {
        Box::pin(speak(cx))
    }
}

/// One thing to say.
struct Said {
    /// The cycle or the answer it ends.
    id: u64,
    text: String,
    about: About,
}

impl Said {
    /// A comment talks about the newest frame of its cycle, captured `latency` before its
    /// end; an answer is about now.
    fn from_event(event: Event) -> Option<Said> {
        match event {
            Event::CycleEnd(end) if !end.skipped && !end.text.is_empty() => Some(Said {
                id: end.cycle,
                text: end.text,
                about: About::Picture {
                    latency: Duration::from_secs_f64(end.latency.max(0.0)),
                },
            }),
            Event::AnswerEnd {
                answer,
                text,
                error: None,
                ..
            } if !text.is_empty() => Some(Said {
                id: answer,
                text,
                about: About::Now,
            }),
            _ => None,
        }
    }

    /// Answers and cycles count separately; clips are named apart.
    fn clip_number(&self) -> u64 {
        match self.about {
            About::Picture { .. } => self.id,
            About::Now => ANSWER_CLIPS + self.id,
        }
    }
}

/// Runs until its listeners are gone or the stream stops.
async fn speak(mut cx: OutputContext) {
    let handle = cx.handle.clone();
    let mut voice = handle.speech().voice();
    let mut heard = false;
    loop {
        let now_heard = voice.borrow_and_update().is_some();
        if now_heard != heard {
            heard = now_heard;
            let _ = handle.control(Control::SetSpoken(heard));
        }
        let event = tokio::select! {
            _ = cx.stopped.cancelled() => break,
            changed = voice.changed() => match changed {
                Ok(()) => continue,
                Err(_) => break,
            },
            event = cx.events.recv() => event,
        };
        let said = match event {
            Ok(event) => Said::from_event(event),
            Err(RecvError::Lagged(_)) => None,
            Err(RecvError::Closed) => break,
        };
        let speaker = voice.borrow().clone();
        if let (Some(said), Some(speaker)) = (said, speaker) {
            tokio::select! {
                _ = cx.stopped.cancelled() => break,
                () = say(&handle, speaker, said) => {}
            }
        }
    }
    if heard {
        let _ = handle.control(Control::SetSpoken(false));
    }
}

/// Synthesizes one comment, places it on the timeline, and hands it on.
async fn say(handle: &StreamHandle, voice: Arc<dyn Voice>, said: Said) {
    let speech = handle.speech();
    let answered = now();
    let pcm = match synthesize(voice, &said.text).await {
        Ok(Some(pcm)) => pcm,
        Ok(None) => return,
        Err(message) => {
            speech.count(|s| s.failed += 1);
            handle.emit(Event::Error {
                cycle: matches!(said.about, About::Picture { .. }).then_some(said.id),
                message: format!("the voice failed, the comment is shown only: {message}"),
            });
            return;
        }
    };
    let clip = Clip {
        answered,
        ready: now(),
        duration: pcm.duration(),
        about: said.about,
    };
    if let Some(needed) = clip.delay_needed() {
        let _ = handle.control(Control::AddSpeechLatency(needed.as_secs_f64()));
    }
    let (start, until, late) = match speech.place(&clip, handle.target_delay()) {
        Placement::Play { start, until, late } => (start, until, late),
        Placement::TooLate { late } => {
            speech.count(|s| s.too_late += 1);
            tracing::debug!(stream = %handle.id(), cycle = said.id, ?late, "comment too late to speak");
            return;
        }
    };
    let _ = handle.control(Control::SpeakingUntil(until));
    let n = said.clip_number();
    if OPUS_READERS.iter().any(|name| handle.running(name) > 0) {
        let at48 = Resampler::convert(&pcm, OPUS_RATE);
        speech.queue(start, Arc::new(at48.samples));
    }
    speech.keep_clip(n, Arc::new(pcm));
    let first_audio = clip.ready.saturating_duration_since(answered);
    speech.count(|s| {
        s.spoken += 1;
        s.last_first_audio_ms = Some(first_audio.as_secs_f64() * 1e3);
        s.last_late_ms = Some(late.as_secs_f64() * 1e3);
    });
    handle.emit(Event::Speech {
        cycle: n,
        clip: format!("/api/streams/{}/speech/clips/{n}", handle.id()),
        play_at: crate::speech::unix_ms(start),
        duration: clip.duration.as_secs_f64(),
        late: late.as_secs_f64(),
    });
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

fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}
