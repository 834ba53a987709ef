//! The commentary loop: which frames to ask about, when, with what prompt, and how late
//! the picture must be shown so the words match it.
//!
//! Sans-IO (see `STYLE.md`, str0m): the state machines take `now` as an argument and never
//! read a clock, so tests drive them with fake time and fake frames; a thin tokio task feeds
//! them real frames, engine output and deadlines.
//!
//! - [`Commentator`]: the loop itself, `handle_input` / `poll_output`.
//! - [`driver::run`]: the tokio task that drives it against a [`FrameWindow`] and the
//!   stream's session on the shared engine (`kibitz_engine::Session`).
//! - [`Profiles`]: the prompt profiles; [`SyncDelay`]: the target delay of the picture.
//! - [`CommentatorConfig`] and [`ConfigError`], the crate's one error type.

mod commentator;
mod config;
pub mod driver;
pub mod event;
mod profile;
pub mod scene;
mod sync;
mod window;

pub use commentator::{Commentator, Input, Output, Phase, Snapshot};
pub use config::{
    check_alpha, check_capture_fps, check_cycle_timeout, check_delay_init, check_frame_stride,
    check_frames_per_inference, check_instruction, check_interval, check_max_tokens,
    check_scene_change_threshold, CommentatorConfig, ConfigError, MAX_CAPTURE_FPS,
    MAX_CYCLE_TIMEOUT_SECS, MAX_DELAY_INIT_SECS, MAX_FRAMES_PER_INFERENCE, MAX_INSTRUCTION_CHARS,
    MAX_INTERVAL_SECS, SCENE_CHANGE_THRESHOLD, SCENE_MAX_QUIET,
};
pub use driver::run;
pub use event::{Control, CycleEnd, Event};
pub use profile::{is_skip, Language, Profile, Profiles, Style, DEFAULT_PROFILE};
pub use scene::Thumbnail;
pub use sync::SyncDelay;
pub use window::{FrameWindow, WatchedWindow};
