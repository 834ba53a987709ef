//! The commentary loop: which frames to ask about, when, with what prompt, and how late
//! the picture must be shown so the words match it.
//!
//! Sans-IO (see `STYLE.md`, str0m): the state machines take `now` as an argument and never
//! read a clock, so tests drive them with fake time and fake frames; a thin tokio task feeds
//! them real frames, engine output and deadlines.

pub mod event;

pub use event::{Control, CycleEnd, Event};
