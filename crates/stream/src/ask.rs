//! Questions about what a stream shows now: answered from the stream's newest frames on
//! its own engine session, ahead of the next commentary cycle (the scheduler serves
//! questions first), and streamed both to the asker and to everyone watching as `answer_*`
//! events. The delayed picture is not touched: the answer is about the live frames.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use kibitz_commentator::{Event, Profiles};
use kibitz_engine::{Frame, Image, Output, Priority, Request};
use tokio::sync::mpsc;

use crate::stream::StreamHandle;
use crate::StreamError;

/// Longest question, in characters.
pub const MAX_QUESTION_CHARS: usize = 500;
/// Tokens an answer may take.
const ANSWER_TOKENS: u32 = 120;
/// Recent comments given as context.
const RECENT: usize = 5;

static NEXT_ANSWER: AtomicU64 = AtomicU64::new(1);

/// One piece of an answer as the asker receives it.
#[derive(Debug, Clone, PartialEq)]
pub enum AnswerPiece {
    Text(String),
    Failed(String),
}

impl StreamHandle {
    /// Asks `question` about the stream's newest frames. The answer streams on the returned
    /// channel (closed when it is complete) and as events; dropping the channel does not
    /// stop it, since other viewers see it too.
    pub fn ask(&self, question: &str) -> Result<(u64, mpsc::Receiver<AnswerPiece>), StreamError> {
        let question = question.trim().to_string();
        let chars = question.chars().count();
        if chars == 0 || chars > MAX_QUESTION_CHARS {
            return Err(StreamError::Invalid(crate::Problems(vec![
                crate::FieldError {
                    field: "question",
                    message: format!("must be 1 to {MAX_QUESTION_CHARS} characters, got {chars}"),
                },
            ])));
        }
        if self.is_stopped() {
            return Err(StreamError::Stopped);
        }
        let id = NEXT_ANSWER.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(answer(self.clone(), id, question, tx));
        Ok((id, rx))
    }
}

async fn answer(handle: StreamHandle, id: u64, question: String, tx: mpsc::Sender<AnswerPiece>) {
    let asked = Instant::now();
    handle.emit(Event::AnswerStart {
        answer: id,
        question: question.clone(),
    });
    let stopped = handle.stopped();
    let outcome = tokio::select! {
        _ = stopped.cancelled() => Err("the stream was removed".to_string()),
        outcome = generate(&handle, id, &question, &tx) => outcome,
    };
    let (text, error) = match outcome {
        Ok(text) => (text, None),
        Err(e) => {
            let _ = tx.send(AnswerPiece::Failed(e.clone())).await;
            (String::new(), Some(e))
        }
    };
    handle.emit(Event::AnswerEnd {
        answer: id,
        question,
        text: text.trim().to_string(),
        error,
        latency: asked.elapsed().as_secs_f64(),
    });
}

async fn generate(
    handle: &StreamHandle,
    id: u64,
    question: &str,
    tx: &mpsc::Sender<AnswerPiece>,
) -> Result<String, String> {
    let turn = handle
        .session()
        .turn(Priority::Question, None)
        .await
        .map_err(|e| e.to_string())?;
    let spec = handle.spec();
    let frames = handle.sample_frames(spec.frames_per_inference, spec.frame_stride);
    if frames.is_empty() {
        return Err("no picture yet: the source has not delivered a frame".into());
    }
    let span = match (frames.first(), frames.last()) {
        (Some(first), Some(last)) => last.0.pts.saturating_sub(first.0.pts).as_secs_f64(),
        _ => 0.0,
    };
    let profile = Profiles::get(&spec.profile).map_err(|e| e.to_string())?;
    let span_frames = frames.len();
    let config = spec.commentator(handle.defaults());
    let recent = handle.recent_comments(RECENT);
    let frames = frames
        .into_iter()
        .map(|(stamp, rgb)| Frame {
            image: Image::Rgb(rgb),
            pts: stamp.pts,
        })
        .collect();
    let mut request = Request::new(
        frames,
        profile.system_prompt_in(&config.style),
        profile.question_prompt(span_frames, span, &recent, question),
    );
    request.sampling = config.sampling;
    request.max_tokens = ANSWER_TOKENS;
    let mut generation = turn.submit(request).map_err(|e| e.to_string())?;
    let mut text = String::new();
    while let Some(item) = generation.next().await {
        match item.map_err(|e| e.to_string())? {
            Output::Text(piece) => {
                let piece = if text.is_empty() {
                    piece.trim_start().to_string()
                } else {
                    piece
                };
                text.push_str(&piece);
                handle.emit(Event::AnswerToken {
                    answer: id,
                    text: piece.clone(),
                });
                // The asker may have gone; the others still get the events.
                let _ = tx.send(AnswerPiece::Text(piece)).await;
            }
            Output::Done(_) => return Ok(text),
        }
    }
    Err("the engine ended the answer before it was complete".into())
}
