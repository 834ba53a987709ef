//! The voice: `/api/streams/{id}/speech`, one continuous Ogg/Opus stream (48 kHz, silence
//! between comments, delayed like the picture) for VLC, ffplay or an `<audio>` element;
//! and `/api/streams/{id}/speech/clips/{n}`, one spoken comment as WAV for the page, which
//! schedules it itself at the `play_at` of its `speech` event.

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::stream;
use kibitz_stream::{Output, OutputContext};
use kibitz_voice::{OggMuxer, OpusFrame};
use tokio::sync::broadcast::{self, error::RecvError};

use crate::state::Target;
use crate::{ApiError, AppState};

/// Frames per Ogg page: 100 ms, so a player hears a comment within a tenth of a second of
/// its time.
const FRAMES_PER_PAGE: usize = 5;

/// `GET /api/streams/{id}/speech`.
pub(crate) async fn stream(State(state): State<AppState>, Target(handle): Target) -> Response {
    let mut reader = handle.attach(OggSpeech { state }, now());
    let headers = Bytes::from(reader.muxer.headers());
    let pages = stream::unfold(reader, |mut reader| async move {
        let page = reader.next_page().await?;
        Some((Ok::<_, Infallible>(page), reader))
    });
    let body = futures::StreamExt::chain(stream::iter([Ok(headers)]), pages);
    (
        [
            (CONTENT_TYPE, "audio/ogg"),
            (CACHE_CONTROL, "no-cache, no-store"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// The continuous speech stream's output, one per reader; counted as
/// [`kibitz_stream::speech::READER`], which is what keeps the stream's encoder running.
struct OggSpeech {
    state: AppState,
}

impl Output for OggSpeech {
    type Running = Reader;

    fn name(&self) -> &'static str {
        kibitz_stream::speech::READER
    }

    fn build(self, cx: OutputContext) -> Reader {
        let (frames, pre_skip) = cx.handle.speech_frames();
        // Any serial will do for a one-stream file; one per listener keeps players that
        // reconnect from mixing two streams' pages.
        let serial = (kibitz_stream::unix_ms(now()) as u64 & 0xFFFF_FFFF) as u32;
        Reader {
            cx,
            frames,
            muxer: OggMuxer::new(serial, pre_skip),
            state: self.state,
        }
    }
}

struct Reader {
    cx: OutputContext,
    frames: broadcast::Receiver<OpusFrame>,
    muxer: OggMuxer,
    state: AppState,
}

impl Reader {
    /// The next page of frames; a reader that fell behind skips what it missed.
    async fn next_page(&mut self) -> Option<Bytes> {
        let mut batch = Vec::with_capacity(FRAMES_PER_PAGE);
        while batch.len() < FRAMES_PER_PAGE {
            let frame = tokio::select! {
                _ = self.state.shutdown().cancelled() => return None,
                _ = self.cx.stopped.cancelled() => return None,
                frame = self.frames.recv() => frame,
            };
            match frame {
                Ok(frame) => batch.push(frame),
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return None,
            }
        }
        Some(Bytes::from(self.muxer.page(&batch)))
    }
}

/// `GET /api/streams/{id}/speech/clips/{n}`: a spoken comment as WAV.
pub(crate) async fn clip(
    Target(handle): Target,
    Path((_, n)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let n: u64 = n
        .trim_end_matches(".wav")
        .parse()
        .map_err(|_| ApiError::NotFound(format!("no clip '{n}'")))?;
    let pcm = handle.speech_clip(n).ok_or_else(|| {
        ApiError::NotFound(format!("no clip {n}: only the last few comments are kept"))
    })?;
    let mut wav = Vec::with_capacity(pcm.samples.len() * 2 + 44);
    kibitz_voice::write_wav(&pcm, &mut wav).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((
        [(CONTENT_TYPE, "audio/wav"), (CACHE_CONTROL, "max-age=60")],
        wav,
    )
        .into_response())
}

fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}
