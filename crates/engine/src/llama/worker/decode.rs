//! The decode steps: one embeddings batch for every sequence's ready image rows, one token
//! batch for the running answers and prompt text, then sampling; each step timed into the
//! step profile.

use std::time::{Duration, Instant};

use tokio::sync::mpsc::error::TrySendError;

use super::super::profile::StepSample;
use super::super::{ms, take_utf8};
use super::sequence::{End, ImageData, Input};
use super::{key, Worker};
use crate::{Output, Priority};

#[derive(Clone, Copy)]
enum BatchKind {
    Rows,
    Tokens,
}

impl Worker {
    /// Streams in the order a step serves them: running answers by priority and age, then
    /// sequences that only take frames.
    pub(super) fn order(&self) -> Vec<u64> {
        let mut order: Vec<(u8, Priority, u64, u64)> = self
            .seqs
            .iter()
            .map(|(&k, s)| match &s.generation {
                Some(g) => (0, g.priority, g.serial, k),
                None => (1, Priority::Commentary, 0, k),
            })
            .collect();
        order.sort();
        order.into_iter().map(|(.., k)| k).collect()
    }

    pub(super) fn step(&mut self) {
        let order = self.order();
        let t = Instant::now();
        self.sample = StepSample::default();
        self.encode(&order);
        let vision = t.elapsed();
        self.sample.vision_ms = ms(vision);
        self.decode_images(&order);
        let images = t.elapsed() - vision;
        self.sample.rows = self.rows.len() as u32;
        self.sample.answers = self
            .seqs
            .values()
            .filter(|s| s.generation.as_ref().is_some_and(|g| g.next.is_some()))
            .count() as u32;
        self.decode_tokens(&order);
        self.sample.tokens = self.tokens.len() as u32;
        self.sample.cells = self.cells_in_use();
        let edits = self.ctx.take_edits();
        self.sample.shifts = edits.shifts;
        self.sample.removes = edits.removes;
        self.sample.copies = edits.copies;
        let now = Instant::now();
        let total = ms(now - t);
        self.profile
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(now, total, self.sample, ms(images));
    }

    /// Cells the sequences hold (evaluated or being evaluated); a system piece copied from
    /// another sequence holds none of its own (its cells are the source's).
    fn cells_in_use(&self) -> u32 {
        let cells: i32 = self
            .seqs
            .values()
            .map(|s| {
                let frames = (s.next_pos - s.frames_from).max(0);
                let system = if s.shared_system {
                    0
                } else {
                    s.next_pos.min(s.sys_len)
                };
                frames + system
            })
            .sum();
        cells.max(0) as u32
    }

    /// One `llama_decode` of `batch`, timed into the step's sample; with `profile_sync`, the
    /// wait for the GPU to finish it is timed apart.
    fn decode(&mut self, which: BatchKind) -> Result<(), String> {
        let batch = match which {
            BatchKind::Rows => &self.rows,
            BatchKind::Tokens => &self.tokens,
        };
        if batch.len() == 0 {
            return Ok(());
        }
        let t = Instant::now();
        let result = self.ctx.decode(batch);
        self.sample.decode_ms += ms(t.elapsed());
        if self.profile_sync {
            let t = Instant::now();
            self.ctx.synchronize();
            self.sample.sync_ms += ms(t.elapsed());
        }
        result
    }

    /// Every sequence's leading encoded images, in one embeddings batch.
    pub(super) fn decode_images(&mut self, order: &[u64]) {
        let built = Instant::now();
        self.rows.clear();
        if self.defer_images() {
            return;
        }
        self.rows_since = None;
        let mut used = Vec::new();
        for &stream in order {
            let seq = self.seqs.get_mut(&stream).unwrap();
            let mut took = false;
            while let Some(Input::Image {
                n_tokens,
                data: ImageData::Encoded(floats),
                ends_frame,
                ..
            }) = seq.queue.front()
            {
                if *n_tokens > self.rows.room() {
                    break;
                }
                for (i, row) in floats.chunks_exact(self.width).enumerate() {
                    self.rows.push_row(row, seq.next_pos + i as i32, seq.id);
                }
                seq.next_pos += *n_tokens as i32;
                if *ends_frame {
                    seq.queued_frames -= 1;
                }
                seq.queue.pop_front();
                took = true;
            }
            if took {
                used.push(stream);
            }
        }
        self.sample.build_ms += ms(built.elapsed());
        if let Err(e) = self.decode(BatchKind::Rows) {
            for stream in used {
                self.fail_seq(stream, e.clone());
            }
        }
    }

    /// Whether to leave ready image rows for a later step. Each embeddings batch is a
    /// `llama_decode` of its own that every running answer waits for, so while answers run,
    /// pushed frames (needed at the next cycle, not now) are gathered into fewer, fuller
    /// batches: rows go in at once only when a request waits for them, a batch's worth is
    /// ready, or the oldest has waited `ROWS_WAIT`.
    pub(super) fn defer_images(&mut self) -> bool {
        const ROWS_WAIT: Duration = Duration::from_millis(250);
        let decoding = self
            .seqs
            .values()
            .any(|s| s.generation.as_ref().is_some_and(|g| g.next.is_some()));
        if !decoding {
            return false;
        }
        let waiting: Vec<u64> = self.waiting.iter().map(|w| key(&w.job)).collect();
        let mut ready = 0;
        for (stream, seq) in &self.seqs {
            let rows: usize = seq
                .queue
                .iter()
                .map_while(|i| match i {
                    Input::Image {
                        n_tokens,
                        data: ImageData::Encoded(_),
                        ..
                    } => Some(*n_tokens),
                    _ => None,
                })
                .sum();
            let asked = seq.generation.is_some() || waiting.contains(stream);
            if rows > 0 && asked {
                return false;
            }
            ready += rows;
        }
        if ready == 0 {
            return true;
        }
        let since = *self.rows_since.get_or_insert_with(Instant::now);
        ready * 2 < self.rows.room() && since.elapsed() < ROWS_WAIT
    }

    /// Running answers' next tokens and prompt text, in one token batch; then sampling.
    pub(super) fn decode_tokens(&mut self, order: &[u64]) {
        let built = Instant::now();
        self.tokens.clear();
        // (stream, batch index) of each entry whose logits are sampled.
        let mut sampled: Vec<(u64, i32)> = Vec::new();
        let mut used = Vec::new();
        // Answers' tokens by sequence id: with split KV buffers llama.cpp puts consecutive
        // sequences with one token each in one micro-batch, and only those.
        let mut by_seq: Vec<(i32, u64)> = order.iter().map(|&k| (self.seqs[&k].id, k)).collect();
        by_seq.sort();
        for (_, stream) in by_seq {
            let seq = self.seqs.get_mut(&stream).unwrap();
            if let Some(token) = seq.generation.as_mut().and_then(|g| g.next.take()) {
                let i = self.tokens.push(token, seq.next_pos, seq.id, true);
                seq.next_pos += 1;
                sampled.push((stream, i));
                used.push(stream);
            }
        }
        for &stream in order {
            let seq = self.seqs.get_mut(&stream).unwrap();
            let mut took = false;
            while self.tokens.room() > 0 {
                let Some(Input::Text {
                    tokens,
                    logits,
                    ends_frame,
                }) = seq.queue.front_mut()
                else {
                    break;
                };
                let n = tokens.len().min(self.tokens.room());
                let whole = n == tokens.len();
                for (j, &t) in tokens[..n].iter().enumerate() {
                    let last = whole && j + 1 == n;
                    let i = self.tokens.push(t, seq.next_pos, seq.id, last && *logits);
                    if last && *logits {
                        sampled.push((stream, i));
                    }
                    seq.next_pos += 1;
                }
                took = true;
                if whole {
                    if *ends_frame {
                        seq.queued_frames -= 1;
                    }
                    seq.queue.pop_front();
                } else {
                    tokens.drain(..n);
                }
            }
            if took && !used.contains(&stream) {
                used.push(stream);
            }
        }
        self.sample.build_ms += ms(built.elapsed());
        if let Err(e) = self.decode(BatchKind::Tokens) {
            for stream in used {
                self.fail_seq(stream, e.clone());
            }
            return;
        }
        let t = Instant::now();
        for (stream, index) in sampled {
            self.sample(stream, index);
        }
        self.sample.sampling_ms = ms(t.elapsed());
    }

    pub(super) fn sample(&mut self, stream: u64, index: i32) {
        let Some(seq) = self.seqs.get_mut(&stream) else {
            return;
        };
        let Some(g) = seq.generation.as_mut() else {
            return;
        };
        let now = Instant::now();
        if g.decode_started.is_none() {
            g.decode_started = Some(now);
            g.stats.vision_ms = ms(g.vision);
            g.stats.prefill_ms = ms((now - g.started).saturating_sub(g.vision));
        }
        if let Some(probe) = g.probe.take() {
            let _ = probe.send(self.ctx.logits(index, self.model.n_vocab()).to_vec());
            return self.end(stream, End::Done);
        }
        let token = g
            .sampler
            .sample(self.ctx.logits(index, self.model.n_vocab()));
        if self.model.is_end(token) && !g.ignore_eos {
            return self.end(stream, End::Done);
        }
        g.stats.generated_tokens += 1;
        self.model.piece(token, &mut g.bytes);
        let text = take_utf8(&mut g.bytes);
        if !text.is_empty() {
            g.first_token_at.get_or_insert(now);
            g.outbox.push_str(&text);
        }
        if !g.outbox.is_empty() {
            match g
                .tx
                .try_send(Ok(Output::Text(std::mem::take(&mut g.outbox))))
            {
                Ok(()) => {}
                // A slow reader: keep the text for the next token (never block the others).
                Err(TrySendError::Full(Ok(Output::Text(t)))) => g.outbox = t,
                Err(_) => return self.end(stream, End::Cancelled),
            }
        }
        if g.stats.generated_tokens >= g.budget {
            return self.end(stream, End::Done);
        }
        g.next = Some(token);
    }
}
