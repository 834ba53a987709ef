//! The vision step: frames cut into text and image inputs, and images encoded by the
//! projector (one frame a step while answers run).

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::super::ffi::{self, ChunkKind};
use super::super::{content_key, fit_to_slices, frame_key, frame_piece, to_rgb};
use super::embeddings::EmbeddingCache;
use super::sequence::{ImageData, Input, Prepared};
use super::Worker;
use crate::Frame;

impl Worker {
    pub(super) fn prepare(&mut self, frame: &Frame) -> Result<Prepared, String> {
        prepare(
            &mut self.mtmd,
            &self.embeddings,
            &self.marker,
            self.max_slices,
            frame,
        )
    }

    /// Vision: images sequences wait for, then pushed frames waiting to go in.
    pub(super) fn encode(&mut self, order: &[u64]) {
        let decoding = self
            .seqs
            .values()
            .any(|s| s.generation.as_ref().is_some_and(|g| g.next.is_some()));
        let mut budget = if decoding { 1 } else { usize::MAX };
        for &stream in order {
            let seq = self.seqs.get_mut(&stream).unwrap();
            let inputs = seq
                .queue
                .iter_mut()
                .chain(seq.pending.iter_mut().flat_map(|p| p.inputs.iter_mut()));
            let mut spent = Duration::ZERO;
            let mut failure = None;
            for input in inputs {
                let Input::Image { key, data, .. } = input else {
                    continue;
                };
                let ImageData::Raw(chunks, index) = data else {
                    continue;
                };
                if let Some(e) = self.embeddings.get(key) {
                    *data = ImageData::Encoded(e);
                    continue;
                }
                if budget == 0 {
                    break;
                }
                budget -= 1;
                let t = Instant::now();
                self.sample.images += 1;
                match self.mtmd.encode_chunk(chunks, *index, self.width) {
                    Ok(floats) => {
                        let floats = Arc::new(floats);
                        self.embeddings.insert(key.clone(), floats.clone());
                        *data = ImageData::Encoded(floats);
                    }
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
                spent += t.elapsed();
            }
            if let Some(g) = &mut seq.generation {
                g.vision += spent;
            }
            if let Some(e) = failure {
                self.fail_seq(stream, e);
            }
        }
    }
}

pub(super) fn prepare(
    mtmd: &mut ffi::Mtmd,
    cache: &EmbeddingCache,
    marker: &str,
    max_slices: u32,
    frame: &Frame,
) -> Result<Prepared, String> {
    let content = content_key(&frame.image);
    let key = frame_key(frame.pts, &content);
    let rgb = to_rgb(&frame.image).and_then(|rgb| fit_to_slices(rgb, max_slices))?;
    let mut bitmap = ffi::Bitmap::rgb(rgb.width, rgb.height, &rgb.data)?;
    bitmap.set_id(&key);
    let chunks = Rc::new(mtmd.tokenize(&frame_piece(frame.pts, marker), &[bitmap])?);
    let mut inputs = Vec::new();
    let (mut image_tokens, mut reused, mut slice) = (0, 0, 0);
    for i in 0..chunks.len() {
        match chunks.kind(i) {
            ChunkKind::Text => inputs.push(Input::Text {
                tokens: chunks.text_tokens(i).to_vec(),
                logits: false,
                ends_frame: false,
            }),
            ChunkKind::Image => {
                let chunk_key = (content.clone(), slice);
                slice += 1;
                let n_tokens = chunks.n_tokens(i);
                image_tokens += n_tokens as u32;
                let data = match cache.get(&chunk_key) {
                    Some(e) => {
                        reused += 1;
                        ImageData::Encoded(e)
                    }
                    None => ImageData::Raw(chunks.clone(), i),
                };
                inputs.push(Input::Image {
                    key: chunk_key,
                    n_tokens,
                    data,
                    ends_frame: false,
                });
            }
            ChunkKind::Other => return Err("audio input is not supported".into()),
        }
    }
    match inputs.last_mut() {
        Some(Input::Text { ends_frame, .. }) | Some(Input::Image { ends_frame, .. }) => {
            *ends_frame = true
        }
        None => return Err("the frame gave no input".into()),
    }
    Ok(Prepared {
        key,
        frame: frame.clone(),
        inputs,
        n_pos: chunks.n_positions(),
        image_tokens,
        reused,
    })
}

/// The batched path feeds image embeddings as rows of its own batches, one position each,
/// with causal attention; a projector needing M-RoPE positions or non-causal attention
/// would need llama.cpp's per-image helper instead.
pub(super) fn check_plain_embeddings(mtmd: &mut ffi::Mtmd, marker: &str) -> Result<(), String> {
    let bitmap = ffi::Bitmap::rgb(28, 28, &[128; 28 * 28 * 3])?;
    let chunks = mtmd.tokenize(marker, &[bitmap])?;
    match (0..chunks.len()).find(|&i| chunks.kind(i) == ChunkKind::Image) {
        Some(i) if mtmd.plain_embeddings(&chunks, i) => Ok(()),
        Some(_) => Err(
            "this vision projector needs M-RoPE positions or non-causal image attention, which the batched engine does not feed".into(),
        ),
        None => Err("the vision projector gave no image chunk for a test image".into()),
    }
}

/// Positions one frame takes (its label and image) when cut into at most `max_slices`
/// slices, for a 16:9 picture (the common case; taller ones may take a slice more).
pub(super) fn frame_positions(
    mtmd: &mut ffi::Mtmd,
    marker: &str,
    max_slices: u32,
) -> Result<i32, String> {
    let (w, h) = kibitz_frames::model_size(1920, 1080, max_slices);
    let grey = vec![128u8; w as usize * h as usize * 3];
    let bitmap = ffi::Bitmap::rgb(w, h, &grey)?;
    let piece = frame_piece(std::time::Duration::from_secs(99_999), marker);
    Ok(mtmd.tokenize(&piece, &[bitmap])?.n_positions())
}
