//! WebRTC both ways, through the standard handshakes: viewers watch a stream over WHEP
//! (H.264 picture, Opus speech and the commentary on a data channel, in one connection),
//! and publishers feed a new stream over WHIP (a browser's camera, OBS, GStreamer).
//!
//! - [`WebRtc`]: the service the server's routes call: [`WebRtc::view`] (WHEP),
//!   [`WebRtc::publish`] (WHIP), [`WebRtc::end`] (`DELETE`). It binds one UDP socket and
//!   runs one task (`driver`) that drives every session; it registers the stream output
//!   that encodes a stream's picture once for all its viewers (`video`).
//! - `sessions`: all sessions as a sans-IO type over str0m (ICE-lite), taking `now`.
//! - `whep`: a viewer as an output of its stream; `whip`: a publisher as a stream's source.
//! - `sdp`: what an offer must hold (a `400` says what is missing).
//! - [`codec`]: the H.264 encoder and decoder (openh264) and the RTP clock.
//!
//! Sessions are ICE-lite: the server only answers; the peer (a browser) does the checks, so
//! no STUN server is needed on the server's side. `ice_servers` are only handed to pages
//! (a viewer behind a strict NAT may need TURN).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use kibitz_stream::{StreamError, StreamHandle, StreamSettings, Streams};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub mod codec;
mod driver;
mod picture;
mod sdp;
mod sessions;
mod video;
mod whep;
mod whip;

pub use sessions::SessionId;
pub use video::{rtp_of_pts, rtp_of_seconds, VIEWER};

use driver::{Command, LocalRoutes};
use sessions::{Publisher, Role, Session, Viewer};
use whip::{Attach, Found, Ingest, Publishers};

/// Commands queued for the driver; more are dropped (media) or waited for (sessions).
const COMMANDS_QUEUED: usize = 4096;

/// How the WebRTC side is set up: `serve`'s `--webrtc-*` flags.
#[derive(Debug, Clone)]
pub struct WebRtcConfig {
    /// The one UDP socket (`--webrtc-port` on all addresses by default).
    pub bind: SocketAddr,
    /// The address peers reach behind a NAT (`--webrtc-public-ip`).
    pub public_ip: Option<IpAddr>,
    /// STUN/TURN URLs handed to pages (`--webrtc-ice-servers`).
    pub ice_servers: Vec<String>,
    /// Viewers per stream (`--max-viewers`); past it a `POST` gets `429`.
    pub max_viewers: usize,
    /// H.264 bitrate (`--webrtc-bitrate`).
    pub bitrate_bps: u32,
    /// How long a WHIP stream waits for its publisher to come back before it is removed
    /// (`--webrtc-publisher-timeout`).
    pub publisher_timeout: Duration,
}

impl Default for WebRtcConfig {
    fn default() -> Self {
        WebRtcConfig {
            bind: SocketAddr::from(([0, 0, 0, 0], 8199)),
            public_ip: None,
            ice_servers: Vec::new(),
            max_viewers: 200,
            bitrate_bps: 2_000_000,
            publisher_timeout: Duration::from_secs(30),
        }
    }
}

/// What a WHEP or WHIP request can fail with; the server maps each to one status.
#[derive(Debug, thiserror::Error)]
pub enum WebRtcError {
    /// The offer is unusable (HTTP 400); the reason says why.
    #[error("{0}")]
    BadOffer(String),
    /// No such stream or session (HTTP 404).
    #[error("{0}")]
    NotFound(String),
    /// `--max-viewers` watch the stream (HTTP 429).
    #[error("{0} viewers watch this stream over WebRTC, the most it takes (--max-viewers)")]
    TooManyViewers(usize),
    /// The stream exists and is fed otherwise, or its publisher is connected (HTTP 409).
    #[error("{0}")]
    Conflict(String),
    /// Creating the stream failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The WebRTC task has stopped (HTTP 503).
    #[error("WebRTC has stopped")]
    Stopped,
    #[error("internal error: {0}")]
    Internal(String),
}

/// A session made from an offer: its id (the last segment of `Location`) and the answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub session: SessionId,
    pub sdp: String,
}

/// The WebRTC service. Cheap to clone.
#[derive(Clone)]
pub struct WebRtc {
    inner: Arc<Inner>,
}

struct Inner {
    config: WebRtcConfig,
    /// The socket's address (its port when bound to port 0).
    local: SocketAddr,
    candidates: Vec<SocketAddr>,
    commands: mpsc::Sender<Command>,
    streams: Streams,
    publishers: Arc<Publishers>,
}

impl WebRtc {
    /// Binds the socket, starts the driver (until `stop`), and registers the stream
    /// encoder with `streams` (each stream encodes while it has viewers).
    pub async fn start(
        config: WebRtcConfig,
        streams: Streams,
        stop: CancellationToken,
    ) -> Result<WebRtc, std::io::Error> {
        let socket = UdpSocket::bind(config.bind).await?;
        let local = socket.local_addr()?;
        let candidates = candidates(local, config.public_ip);
        tracing::info!(
            "WebRTC on udp {local}; host candidates {}",
            candidates
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let (commands, queue) = mpsc::channel(COMMANDS_QUEUED);
        let routes = LocalRoutes::new(local, config.public_ip);
        tokio::spawn(driver::run(socket, queue, routes, stop));
        streams.add_output(video::output(config.bitrate_bps));
        Ok(WebRtc {
            inner: Arc::new(Inner {
                config,
                local,
                candidates,
                commands,
                streams,
                publishers: Arc::default(),
            }),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local
    }

    /// The STUN/TURN URLs for pages.
    pub fn ice_servers(&self) -> &[String] {
        &self.inner.config.ice_servers
    }

    pub fn config(&self) -> &WebRtcConfig {
        &self.inner.config
    }

    /// WHEP: a viewer of `stream` from `offer` (SDP). The viewer is counted on the stream
    /// (as [`VIEWER`]) until its session ends.
    pub async fn view(&self, stream: &StreamHandle, offer: &str) -> Result<Answer, WebRtcError> {
        let (offer, sections) = sdp::parse(offer)?;
        sdp::check_viewer(&sections)?;
        let max = self.inner.config.max_viewers;
        if stream.running(VIEWER) >= max as u64 {
            return Err(WebRtcError::TooManyViewers(max));
        }
        let feed = stream.extension::<video::VideoFeed>();
        let role = Role::Viewer(Viewer::new(feed.keyframes.clone()));
        let (session, answer) = self.accept(stream.id().as_str(), offer, role)?;
        let viewer = whep::ViewerOutput {
            session: session.id.clone(),
            commands: self.inner.commands.clone(),
            ended: session.ended.clone(),
            data: sections.data,
        };
        let id = session.id.clone();
        tokio::spawn(stream.attach(viewer, now()));
        self.add(session).await?;
        Ok(Answer {
            session: id,
            sdp: answer,
        })
    }

    /// WHIP: `offer` publishes the stream `id`: a new pushed stream, or the one whose
    /// publisher went away. `settings` (profile, instruction, …) apply to a new stream.
    pub async fn publish(
        &self,
        id: &str,
        offer: &str,
        settings: StreamSettings,
    ) -> Result<Answer, WebRtcError> {
        let (offer, sections) = sdp::parse(offer)?;
        sdp::check_publisher(&sections)?;
        let found = self.inner.publishers.find(id);
        if let Found::Connected = found {
            return Err(WebRtcError::Conflict(format!(
                "stream '{id}' has a publisher connected; DELETE its session first"
            )));
        }
        if let Found::Free = found {
            if self.inner.streams.get(id).is_some() {
                return Err(WebRtcError::Conflict(format!(
                    "stream '{id}' exists and is not fed over WHIP; pick another id"
                )));
            }
        }
        let (frames_in, frames) = std::sync::mpsc::sync_channel(whip::FRAMES_QUEUED);
        let role = Role::Publisher(Publisher::new(frames_in));
        let (session, answer) = self.accept(id, offer, role)?;
        let attach = Attach {
            session: session.id.clone(),
            frames,
        };
        match found {
            Found::Away(door) => door.send(attach).map_err(|_| {
                WebRtcError::Conflict(format!("stream '{id}' is ending; try again"))
            })?,
            Found::Free => self.start_ingest(id, settings, attach).await?,
            Found::Connected => unreachable!("refused above"),
        }
        let session_id = session.id.clone();
        self.add(session).await?;
        Ok(Answer {
            session: session_id,
            sdp: answer,
        })
    }

    /// Ends session `session` of `stream` (`DELETE` on its location). Ending a stream's
    /// publisher removes the stream.
    pub async fn end(&self, stream: &str, session: &str) -> Result<(), WebRtcError> {
        let publisher = self.inner.publishers.is_publisher(stream, session);
        let (done, found) = oneshot::channel();
        self.inner
            .commands
            .send(Command::End {
                stream: stream.to_string(),
                session: session.to_string(),
                done: Some(done),
            })
            .await
            .map_err(|_| WebRtcError::Stopped)?;
        if !found.await.map_err(|_| WebRtcError::Stopped)? {
            return Err(WebRtcError::NotFound(format!(
                "no WebRTC session '{session}' on stream '{stream}'"
            )));
        }
        if publisher {
            self.inner.publishers.forget(stream);
            self.inner.streams.remove(stream).await?;
        }
        Ok(())
    }

    fn accept(
        &self,
        stream: &str,
        offer: str0m::change::SdpOffer,
        role: Role,
    ) -> Result<(Session, String), WebRtcError> {
        let (session, answer) = Session::accept(
            now(),
            session_id()?,
            stream.to_string(),
            offer,
            role,
            &self.inner.candidates,
        )?;
        Ok((session, answer.to_sdp_string()))
    }

    async fn add(&self, session: Session) -> Result<(), WebRtcError> {
        self.inner
            .commands
            .send(Command::Add(session))
            .await
            .map_err(|_| WebRtcError::Stopped)
    }

    async fn start_ingest(
        &self,
        id: &str,
        settings: StreamSettings,
        first: Attach,
    ) -> Result<(), WebRtcError> {
        let settings = StreamSettings {
            id: Some(id.to_string()),
            source: None,
            ..settings
        };
        let (_, sink) = self.inner.streams.add_pushed(settings).await?;
        let ingest = Ingest {
            id: id.to_string(),
            sink,
            first,
            commands: self.inner.commands.clone(),
            streams: self.inner.streams.clone(),
            publishers: self.inner.publishers.clone(),
            away_timeout: self.inner.config.publisher_timeout,
            runtime: tokio::runtime::Handle::current(),
        };
        if let Err(e) = ingest.start() {
            let _ = self.inner.streams.remove(id).await;
            return Err(WebRtcError::Internal(format!(
                "cannot start the ingest thread: {e}"
            )));
        }
        Ok(())
    }
}

/// The host candidates of a socket bound to `local`: the address itself, or every
/// address of the machine of its family when bound to all; behind a NAT, the public
/// address instead of the private ones (loopback stays, for local peers).
fn candidates(local: SocketAddr, public: Option<IpAddr>) -> Vec<SocketAddr> {
    let port = local.port();
    let mut ips: Vec<IpAddr> = if local.ip().is_unspecified() {
        if_addrs::get_if_addrs()
            .unwrap_or_default()
            .into_iter()
            .map(|i| i.ip())
            .filter(|ip| ip.is_ipv4() == local.is_ipv4())
            .filter(|ip| match ip {
                IpAddr::V4(v4) => !v4.is_link_local(),
                IpAddr::V6(v6) => !v6.is_unicast_link_local(),
            })
            .collect()
    } else {
        vec![local.ip()]
    };
    if let Some(public) = public {
        ips.retain(|ip| ip.is_loopback());
        ips.push(public);
    }
    ips.sort();
    ips.dedup();
    ips.into_iter()
        .map(|ip| SocketAddr::new(ip, port))
        .collect()
}

/// A session's name: 16 random bytes, hex (unguessable, as it authorizes `DELETE`).
fn session_id() -> Result<SessionId, WebRtcError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| WebRtcError::Internal(e.to_string()))?;
    Ok(hex::encode(bytes))
}

/// Tokio's clock, like the outputs'.
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_on_one_address_offers_that_address() {
        let local: SocketAddr = "127.0.0.1:8199".parse().unwrap();
        assert_eq!(candidates(local, None), vec![local]);
    }

    #[test]
    fn a_socket_on_all_addresses_offers_each_and_behind_nat_the_public_one() {
        let local: SocketAddr = "0.0.0.0:8199".parse().unwrap();
        let all = candidates(local, None);
        assert!(all.iter().all(|c| c.is_ipv4() && c.port() == 8199));
        assert!(all.iter().any(|c| c.ip().is_loopback()), "{all:?}");
        let public: IpAddr = "203.0.113.7".parse().unwrap();
        let nat = candidates(local, Some(public));
        assert!(nat.contains(&SocketAddr::new(public, 8199)));
        assert!(nat.iter().all(|c| c.ip() == public || c.ip().is_loopback()));
    }

    #[test]
    fn session_ids_are_fresh_hex() {
        let a = session_id().unwrap();
        let b = session_id().unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
