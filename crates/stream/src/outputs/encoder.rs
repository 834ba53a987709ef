//! The speech encoder: the continuous Ogg/Opus stream's frames, made while anyone reads it
//! ([`crate::speech::OPUS_READERS`]: the Ogg stream, WebRTC viewers); the stream runs it on that demand, so with no reader no
//! encoder exists. When each frame is due and what it carries is the
//! [`crate::speech::Pacer`]'s decision; this loop only feeds it the queued clips, sleeps
//! until its deadline, encodes, and sends.

use kibitz_voice::{OpusEncoder, Pcm, OPUS_RATE};

use crate::output::{Output, OutputContext, StreamOutput, Task};
use crate::speech::{FrameAudio, Pacer, Step, FRAME_TIME, OPUS_READERS};

/// The encoder, as the registry runs it on every stream.
pub(crate) fn output() -> StreamOutput {
    StreamOutput::new(Encoder).while_attached(OPUS_READERS)
}

#[derive(Clone)]
pub(crate) struct Encoder;

impl Output for Encoder {
    type Running = Task;

    fn name(&self) -> &'static str {
        "speech_encoder"
    }

    fn build(self, cx: OutputContext) -> Task {
        Box::pin(encode(cx))
    }
}

/// Runs until its readers are gone, the stream stops, or the encoder fails.
async fn encode(cx: OutputContext) {
    let speech = cx.handle.speech();
    let Ok(mut encoder) = OpusEncoder::new() else {
        tracing::error!("cannot start the Opus encoder; the speech stream stays silent");
        return;
    };
    let mut pacer = Pacer::new(now());
    loop {
        for (start, samples) in speech.take_queued() {
            pacer.schedule(start, samples);
        }
        let audio = match pacer.poll(now()) {
            Step::Wait(until) => {
                tokio::select! {
                    _ = cx.stopped.cancelled() => return,
                    _ = tokio::time::sleep_until(until.into()) => continue,
                }
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
            Ok(frames) => frames.into_iter().for_each(|f| speech.send_frame(f)),
            Err(e) => {
                tracing::error!("the Opus encoder failed: {e}");
                return;
            }
        }
    }
}

fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}
