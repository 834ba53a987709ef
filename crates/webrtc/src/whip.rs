//! WHIP ingest: a WebRTC publisher (a browser's camera, OBS, GStreamer) as the source of a
//! stream, through the pushed-source kind (`Streams::add_pushed`).
//!
//! `POST /api/streams/{id}/whip` creates the stream `{id}` with a pushed source and hands
//! its sink to an ingest thread; a stream of that id that something else feeds is a
//! conflict. The thread decodes each whole H.264 frame the session receives
//! (`H264Decoder`) and pushes the picture into the sink with its capture time (its arrival)
//! and its media time (from the RTP clock); a frame that does not decode asks the
//! publisher for a keyframe.
//!
//! **A publisher that goes away** (its session ends without `DELETE`: ICE consent lost)
//! leaves the stream `reconnecting`; a new `POST` to the same id within
//! `--webrtc-publisher-timeout` picks it up again (same stream, same commentary), and after
//! that the stream is removed. `DELETE` of the publisher's session removes the stream at
//! once.
//!
//! Decoding is blocking work, so each publisher has its own thread; it waits on plain
//! channels with timeouts and never on the async runtime.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self as std_mpsc, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kibitz_frames::Stamp;
use kibitz_media::{FrameSink, SourceState};
use kibitz_stream::Streams;
use tokio::sync::mpsc;

use crate::codec::H264Decoder;
use crate::driver::Command;
use crate::sessions::{ReceivedFrame, SessionId};

/// Frames waiting for the decoder; more are lost (and a keyframe asked for).
pub(crate) const FRAMES_QUEUED: usize = 8;

/// How often a waiting ingest thread looks whether its session ended.
const POLL: Duration = Duration::from_millis(200);

/// A new session for an ingest whose publisher went away.
pub(crate) struct Attach {
    pub session: SessionId,
    pub frames: std_mpsc::Receiver<ReceivedFrame>,
}

/// The streams fed over WHIP, by id.
#[derive(Default)]
pub(crate) struct Publishers {
    slots: Mutex<HashMap<String, Slot>>,
}

struct Slot {
    /// The ingest thread's door for the next session.
    reattach: std_mpsc::SyncSender<Attach>,
    /// A publisher is connected now.
    connected: Arc<AtomicBool>,
    /// The session feeding it now.
    session: Arc<Mutex<SessionId>>,
}

/// What a `POST` finds for its id.
pub(crate) enum Found {
    /// No WHIP stream of that id.
    Free,
    /// Its publisher is connected.
    Connected,
    /// Its publisher went away: the next session goes through here.
    Away(std_mpsc::SyncSender<Attach>),
}

impl Publishers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn find(&self, id: &str) -> Found {
        match self.lock().get(id) {
            None => Found::Free,
            Some(slot) if slot.connected.load(Ordering::SeqCst) => Found::Connected,
            Some(slot) => Found::Away(slot.reattach.clone()),
        }
    }

    /// Whether `session` is the publisher of stream `id` now.
    pub(crate) fn is_publisher(&self, id: &str, session: &str) -> bool {
        self.lock().get(id).is_some_and(|slot| {
            *slot.session.lock().unwrap_or_else(PoisonError::into_inner) == session
        })
    }

    pub(crate) fn forget(&self, id: &str) {
        self.lock().remove(id);
    }
}

/// Everything one ingest thread needs.
pub(crate) struct Ingest {
    pub id: String,
    pub sink: FrameSink,
    pub first: Attach,
    pub commands: mpsc::Sender<Command>,
    pub streams: Streams,
    pub publishers: Arc<Publishers>,
    pub away_timeout: Duration,
    pub runtime: tokio::runtime::Handle,
}

impl Ingest {
    /// Registers the stream as fed over WHIP and starts its thread.
    pub(crate) fn start(self) -> std::io::Result<()> {
        let (reattach, doors) = std_mpsc::sync_channel(1);
        let connected = Arc::new(AtomicBool::new(true));
        let session = Arc::new(Mutex::new(self.first.session.clone()));
        self.publishers.lock().insert(
            self.id.clone(),
            Slot {
                reattach,
                connected: connected.clone(),
                session: session.clone(),
            },
        );
        let name = format!("whip-{}", self.id);
        std::thread::Builder::new()
            .name(name)
            .spawn(move || self.run(doors, connected, session))
            .map(|_| ())
    }

    fn run(
        mut self,
        doors: std_mpsc::Receiver<Attach>,
        connected: Arc<AtomicBool>,
        current: Arc<Mutex<SessionId>>,
    ) {
        let mut attach = std::mem::replace(
            &mut self.first,
            Attach {
                session: String::new(),
                frames: std_mpsc::sync_channel(0).1,
            },
        );
        let mut attempt = 0;
        loop {
            *current.lock().unwrap_or_else(PoisonError::into_inner) = attach.session.clone();
            connected.store(true, Ordering::SeqCst);
            self.sink.restart();
            if !self.decode(&attach) {
                break; // The stream was removed.
            }
            connected.store(false, Ordering::SeqCst);
            attempt += 1;
            self.sink.set_state(SourceState::Reconnecting {
                attempt,
                retry_in: self.away_timeout,
            });
            tracing::info!(stream = %self.id, "the WHIP publisher went away; waiting {:?} for it", self.away_timeout);
            match doors.recv_timeout(self.away_timeout) {
                Ok(next) => attach = next,
                Err(_) => {
                    tracing::info!(stream = %self.id, "the WHIP publisher did not come back; removing the stream");
                    self.remove_stream();
                    break;
                }
            }
        }
        self.publishers.forget(&self.id);
    }

    /// Decodes one session's frames until it ends. `false` when the stream is gone.
    fn decode(&mut self, attach: &Attach) -> bool {
        let mut decoder = match H264Decoder::new() {
            Ok(decoder) => decoder,
            Err(e) => {
                tracing::error!(stream = %self.id, "cannot start the H.264 decoder: {e}");
                self.sink.set_state(SourceState::Failed(e.to_string()));
                return true;
            }
        };
        let mut first_rtp: Option<u64> = None;
        loop {
            let frame = match attach.frames.recv_timeout(POLL) {
                Ok(frame) => frame,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return true,
            };
            let first = *first_rtp.get_or_insert(frame.rtp);
            let stamp = Stamp {
                pts: Duration::from_micros(frame.rtp.saturating_sub(first) * 1_000 / 90),
                captured: Instant::now(),
            };
            let pushed = match decoder.decode(&frame.data) {
                Ok(Some(picture)) => self.sink.push(picture, stamp),
                Ok(None) => Ok(()),
                Err(e) => {
                    self.sink.dropped(format!("undecodable H.264 frame: {e}"));
                    let _ = self
                        .commands
                        .try_send(Command::RequestKeyframe(attach.session.clone()));
                    Ok(())
                }
            };
            if let Err(kibitz_media::Error::Closed) = pushed {
                return false;
            }
        }
    }

    fn remove_stream(&self) {
        let streams = self.streams.clone();
        let id = self.id.clone();
        self.runtime.spawn(async move {
            if let Err(e) = streams.remove(&id).await {
                tracing::debug!(stream = %id, "removing the WHIP stream: {e}");
            }
        });
    }
}
