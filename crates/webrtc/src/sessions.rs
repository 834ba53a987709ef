//! Every WebRTC session of the server, sans-IO: str0m's own shape one level up. The
//! [`Sessions`] hold one `Rtc` per peer (ICE-lite, all on one UDP socket); the driver
//! (`crate::driver`) hands them packets, media and the time, and sends what they return.
//! Nothing here reads a clock or touches a socket, so the tests connect a str0m client to
//! them in memory on fake time.
//!
//! str0m's one contract is kept in one place: every mutation of an `Rtc` (a packet, a
//! timeout, a write) is followed by draining its output to the next timeout
//! ([`Session::drain`]) before the next one.
//!
//! A session is one of two roles:
//! - a **viewer** (WHEP): writes the stream's H.264 access units, its Opus frames and its
//!   commentary (data channel); a new viewer and a keyframe request (PLI/FIR) ask the
//!   stream's encoder for a keyframe; until one is written, the viewer is sent no video (a
//!   decoder cannot start on a delta frame).
//! - a **publisher** (WHIP): whole H.264 frames (str0m depacketizes) go to the stream's
//!   decoder; a PLI is sent when it connects, when frames were lost, and when the decoder
//!   asks (at most one per [`KEYFRAME_REQUEST_GAP`]).
//!
//! A session ends when its peer disconnects (ICE consent lost, DTLS closed), when it is not
//! connected within [`CONNECT_TIMEOUT`], or when ended by `DELETE`; its `ended` token is
//! then cancelled, which ends whatever feeds it, and all its state is dropped.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::change::{SdpAnswer, SdpOffer};
use str0m::channel::ChannelId;
use str0m::format::Codec;
use str0m::media::{Frequency, KeyframeRequestKind, MediaKind, MediaTime, Mid};
use str0m::net::{Receive, Transmit};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};
use tokio_util::sync::CancellationToken;

use crate::video::{AccessUnit, KeyframeWish};
use crate::WebRtcError;

/// A peer that has not connected this long after its answer is dropped.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Keyframe requests sent to a publisher at most this often.
pub(crate) const KEYFRAME_REQUEST_GAP: Duration = Duration::from_millis(500);

/// What a session is called in its `Location`: 16 random bytes, hex.
pub type SessionId = String;

/// One frame a publisher sent, whole (str0m has joined its packets).
#[derive(Debug)]
pub(crate) struct ReceivedFrame {
    /// Annex-B H.264 (str0m's depacketizer writes start codes).
    pub data: Arc<[u8]>,
    /// RTP time at 90 kHz, extended past wrap-around.
    pub rtp: u64,
}

/// Media for a viewer session, from its stream.
#[derive(Debug, Clone)]
pub(crate) enum Media {
    Video(Arc<AccessUnit>),
    /// One 20 ms Opus frame; `rtp` at 48 kHz.
    Audio {
        data: Arc<[u8]>,
        rtp: u64,
    },
    /// One commentary event as JSON, for the data channel.
    Text(Arc<str>),
}

pub(crate) enum Role {
    Viewer(Viewer),
    Publisher(Publisher),
}

/// A WHEP session's side of its stream.
pub(crate) struct Viewer {
    video: Option<Mid>,
    audio: Option<Mid>,
    channel: Option<ChannelId>,
    keyframes: Arc<KeyframeWish>,
    /// A keyframe was written since it connected: delta frames may follow.
    video_started: bool,
}

impl Viewer {
    pub(crate) fn new(keyframes: Arc<KeyframeWish>) -> Viewer {
        Viewer {
            video: None,
            audio: None,
            channel: None,
            keyframes,
            video_started: false,
        }
    }
}

/// A WHIP session's side of its stream.
pub(crate) struct Publisher {
    video: Option<Mid>,
    frames: std::sync::mpsc::SyncSender<ReceivedFrame>,
    last_request: Option<Instant>,
}

impl Publisher {
    pub(crate) fn new(frames: std::sync::mpsc::SyncSender<ReceivedFrame>) -> Publisher {
        Publisher {
            video: None,
            frames,
            last_request: None,
        }
    }
}

/// One peer.
pub(crate) struct Session {
    pub id: SessionId,
    /// The stream it watches or feeds.
    pub stream: String,
    rtc: Rtc,
    role: Role,
    created: Instant,
    connected: bool,
    timeout: Instant,
    /// Cancelled when the session ends, for whoever feeds or reads it.
    pub ended: CancellationToken,
}

/// The ICE-lite `Rtc` every session starts from: H.264 and Opus only, host candidates for
/// the socket's addresses.
fn rtc(now: Instant, candidates: &[SocketAddr]) -> Result<Rtc, WebRtcError> {
    let mut rtc = Rtc::builder()
        .set_ice_lite(true)
        .set_crypto_provider(Arc::new(str0m::crypto::from_feature_flags()))
        .clear_codecs()
        .enable_h264(true)
        .enable_opus(true, false)
        .build(now);
    for addr in candidates {
        let candidate = Candidate::host(*addr, "udp")
            .map_err(|e| WebRtcError::Internal(format!("host candidate {addr}: {e}")))?;
        rtc.add_local_candidate(candidate);
    }
    Ok(rtc)
}

impl Session {
    /// Answers `offer` with a new session of `role`.
    pub(crate) fn accept(
        now: Instant,
        id: SessionId,
        stream: String,
        offer: SdpOffer,
        role: Role,
        candidates: &[SocketAddr],
    ) -> Result<(Session, SdpAnswer), WebRtcError> {
        let mut rtc = rtc(now, candidates)?;
        let answer = rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| WebRtcError::BadOffer(format!("the offer cannot be answered: {e}")))?;
        let session = Session {
            id,
            stream,
            rtc,
            role,
            created: now,
            connected: false,
            timeout: now,
            ended: CancellationToken::new(),
        };
        Ok((session, answer))
    }

    /// Polls the `Rtc` to its next timeout, handling its events and queueing its packets.
    fn drain(&mut self, now: Instant, out: &mut VecDeque<Transmit>) {
        loop {
            if !self.rtc.is_alive() {
                return;
            }
            match self.rtc.poll_output() {
                Ok(Output::Timeout(t)) => {
                    self.timeout = t;
                    return;
                }
                Ok(Output::Transmit(t)) => out.push_back(t),
                Ok(Output::Event(event)) => self.handle_event(now, event),
                Err(e) => {
                    tracing::debug!(session = %self.id, "WebRTC session failed: {e}");
                    self.rtc.disconnect();
                }
            }
        }
    }

    fn handle_event(&mut self, now: Instant, event: Event) {
        match event {
            Event::Connected => {
                self.connected = true;
                tracing::debug!(session = %self.id, stream = %self.stream, "WebRTC peer connected");
                match &mut self.role {
                    Role::Viewer(v) => v.keyframes.want(),
                    Role::Publisher(_) => self.request_keyframe(now),
                }
            }
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                tracing::debug!(session = %self.id, "WebRTC peer gone (ICE)");
                self.rtc.disconnect();
            }
            Event::MediaAdded(added) => match (&mut self.role, added.kind) {
                (Role::Viewer(v), MediaKind::Video) => v.video = Some(added.mid),
                (Role::Viewer(v), MediaKind::Audio) => v.audio = Some(added.mid),
                (Role::Publisher(p), MediaKind::Video) => p.video = Some(added.mid),
                (Role::Publisher(_), MediaKind::Audio) => {}
            },
            Event::ChannelOpen(id, _) => {
                if let Role::Viewer(v) = &mut self.role {
                    v.channel = Some(id);
                }
            }
            Event::ChannelClose(id) => {
                if let Role::Viewer(v) = &mut self.role {
                    v.channel = v.channel.filter(|c| *c != id);
                }
            }
            Event::KeyframeRequest(_) => {
                if let Role::Viewer(v) = &self.role {
                    v.keyframes.want();
                }
            }
            Event::MediaData(data) => self.received(now, data),
            _ => {}
        }
    }

    /// A publisher's frame: to the decoder, and a keyframe request after a gap.
    fn received(&mut self, now: Instant, data: str0m::media::MediaData) {
        let Role::Publisher(p) = &mut self.role else {
            return;
        };
        if Some(data.mid) != p.video || data.params.spec().codec != Codec::H264 {
            return;
        }
        let frame = ReceivedFrame {
            rtp: data.time.rebase(Frequency::NINETY_KHZ).numer(),
            data: data.data,
        };
        // A full queue means the decoder is behind: this frame is lost, like a packet.
        let lost = p.frames.try_send(frame).is_err();
        if lost || !data.contiguous {
            self.request_keyframe(now);
        }
    }

    /// Sends a PLI to a publisher, at most one per [`KEYFRAME_REQUEST_GAP`].
    fn request_keyframe(&mut self, now: Instant) {
        let Role::Publisher(p) = &mut self.role else {
            return;
        };
        let Some(mid) = p.video else { return };
        if p.last_request
            .is_some_and(|t| now < t + KEYFRAME_REQUEST_GAP)
        {
            return;
        }
        if let Some(mut writer) = self.rtc.writer(mid) {
            if writer
                .request_keyframe(None, KeyframeRequestKind::Pli)
                .is_ok()
            {
                p.last_request = Some(now);
            }
        }
    }

    /// Writes one piece of media to a viewer.
    fn write(&mut self, now: Instant, media: &Media) {
        let Role::Viewer(v) = &mut self.role else {
            return;
        };
        match media {
            Media::Video(unit) => {
                let Some(mid) = v.video else { return };
                if !self.connected || (!v.video_started && !unit.keyframe) {
                    return;
                }
                let Some(writer) = self.rtc.writer(mid) else {
                    return;
                };
                let Some(pt) = writer
                    .payload_params()
                    .filter(|p| p.spec().codec == Codec::H264)
                    .max_by_key(|p| {
                        let f = p.spec().format;
                        // Packetization mode 1 and constrained baseline first.
                        (
                            f.packetization_mode == Some(1),
                            f.profile_level_id.is_some_and(|id| id >> 8 == 0x42e0),
                        )
                    })
                    .map(|p| p.pt())
                else {
                    return;
                };
                let time = MediaTime::from_90khz(u64::from(unit.rtp));
                if writer.write(pt, now, time, unit.data.clone()).is_ok() && unit.keyframe {
                    v.video_started = true;
                }
            }
            Media::Audio { data, rtp } => {
                let Some(mid) = v.audio else { return };
                if !self.connected {
                    return;
                }
                let Some(writer) = self.rtc.writer(mid) else {
                    return;
                };
                let Some(pt) = writer
                    .payload_params()
                    .find(|p| p.spec().codec == Codec::Opus)
                    .map(|p| p.pt())
                else {
                    return;
                };
                let time = MediaTime::new(*rtp, Frequency::FORTY_EIGHT_KHZ);
                let _ = writer.write(pt, now, time, data.clone());
            }
            Media::Text(json) => {
                let Some(id) = v.channel else { return };
                if let Some(mut channel) = self.rtc.channel(id) {
                    // `false` when the channel's buffer is full: a slow reader loses words.
                    let _ = channel.write(false, json.as_bytes());
                }
            }
        }
    }

    /// Whether this viewer takes a data channel (its offer had one and it opened).
    #[cfg(test)]
    pub(crate) fn has_channel(&self) -> bool {
        matches!(&self.role, Role::Viewer(v) if v.channel.is_some())
    }
}

impl Drop for Session {
    /// Whoever feeds or reads the session stops, however it ended (its peer, `DELETE`, the
    /// server stopping).
    fn drop(&mut self) {
        tracing::debug!(session = %self.id, stream = %self.stream, "WebRTC session ended");
        self.ended.cancel();
    }
}

/// All sessions, and the packets they want sent.
#[derive(Default)]
pub(crate) struct Sessions {
    sessions: Vec<Session>,
    transmit: VecDeque<Transmit>,
}

impl Sessions {
    pub(crate) fn insert(&mut self, now: Instant, mut session: Session) {
        session.drain(now, &mut self.transmit);
        self.sessions.push(session);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Sessions of `stream` in `role`: viewers or publishers.
    #[cfg(test)]
    pub(crate) fn count(&self, stream: &str, viewers: bool) -> usize {
        self.sessions
            .iter()
            .filter(|s| s.stream == stream && matches!(s.role, Role::Viewer(_)) == viewers)
            .count()
    }

    /// A packet from the socket, to the session that accepts it (str0m's `accepts`, as its
    /// chat example routes). `false` when none does (a stray or late packet).
    pub(crate) fn handle_receive(&mut self, now: Instant, receive: Receive<'_>) -> bool {
        let input = Input::Receive(now, receive);
        let Some(session) = self.sessions.iter_mut().find(|s| s.rtc.accepts(&input)) else {
            return false;
        };
        if let Err(e) = session.rtc.handle_input(input) {
            tracing::debug!(session = %session.id, "WebRTC input refused: {e}");
            session.rtc.disconnect();
        }
        session.drain(now, &mut self.transmit);
        true
    }

    /// Media for the viewer `id`; nothing when it has gone.
    pub(crate) fn write(&mut self, now: Instant, id: &str, media: &Media) {
        if let Some(session) = self.sessions.iter_mut().find(|s| s.id == id) {
            session.write(now, media);
            session.drain(now, &mut self.transmit);
        }
    }

    /// The decoder of publisher `id` wants a keyframe.
    pub(crate) fn request_keyframe(&mut self, now: Instant, id: &str) {
        if let Some(session) = self.sessions.iter_mut().find(|s| s.id == id) {
            session.request_keyframe(now);
            session.drain(now, &mut self.transmit);
        }
    }

    /// Ends session `id` of `stream` (`DELETE`); `false` when there is none.
    pub(crate) fn end(&mut self, stream: &str, id: &str) -> bool {
        let Some(session) = self
            .sessions
            .iter_mut()
            .find(|s| s.id == id && s.stream == stream)
        else {
            return false;
        };
        session.rtc.disconnect();
        self.prune();
        true
    }

    /// Time passes: every session whose timeout came is told, a session not connected
    /// within [`CONNECT_TIMEOUT`] is dropped, and the dead are removed.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        for session in &mut self.sessions {
            if !session.connected && now >= session.created + CONNECT_TIMEOUT {
                tracing::debug!(session = %session.id, "WebRTC peer never connected");
                session.rtc.disconnect();
                continue;
            }
            if session.timeout <= now {
                if let Err(e) = session.rtc.handle_input(Input::Timeout(now)) {
                    tracing::debug!(session = %session.id, "WebRTC timeout failed: {e}");
                    session.rtc.disconnect();
                }
                session.drain(now, &mut self.transmit);
            }
        }
        self.prune();
    }

    /// Removes the dead sessions; whoever fed them is told through `ended`.
    fn prune(&mut self) {
        self.sessions.retain(|s| s.rtc.is_alive());
    }

    /// The next packet to send.
    pub(crate) fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmit.pop_front()
    }

    /// When [`Sessions::handle_timeout`] is due next: the earliest session timeout, or
    /// the connect deadline of one still connecting.
    pub(crate) fn timeout(&self) -> Option<Instant> {
        self.sessions
            .iter()
            .map(|s| {
                if s.connected {
                    s.timeout
                } else {
                    s.timeout.min(s.created + CONNECT_TIMEOUT)
                }
            })
            .min()
    }

    #[cfg(test)]
    pub(crate) fn get(&self, id: &str) -> Option<&Session> {
        self.sessions.iter().find(|s| s.id == id)
    }
}

#[cfg(test)]
mod tests {
    use str0m::change::SdpPendingOffer;
    use str0m::media::Direction;

    use super::*;

    const SERVER: &str = "10.0.0.1:8199";
    const CLIENT: &str = "10.0.0.2:40000";

    /// A str0m client peer (full ICE, controlling) with a recvonly video section.
    fn client(now: Instant) -> (Rtc, SdpOffer, SdpPendingOffer) {
        let mut rtc = Rtc::builder()
            .set_crypto_provider(Arc::new(str0m::crypto::from_feature_flags()))
            .clear_codecs()
            .enable_h264(true)
            .enable_opus(true, false)
            .build(now);
        rtc.add_local_candidate(Candidate::host(CLIENT.parse().unwrap(), "udp").unwrap());
        let mut api = rtc.sdp_api();
        api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
        api.add_channel("kibitz".into());
        let (offer, pending) = api.apply().unwrap();
        (rtc, offer, pending)
    }

    /// Moves packets both ways and time forward by `step` until `done` or `limit`.
    fn exchange(
        client: &mut Rtc,
        sessions: &mut Sessions,
        now: &mut Instant,
        limit: Duration,
        mut done: impl FnMut(&Sessions) -> bool,
    ) {
        let end = *now + limit;
        while *now < end && !done(sessions) {
            loop {
                match client.poll_output().unwrap() {
                    Output::Timeout(_) => break,
                    Output::Transmit(t) => {
                        let receive = Receive {
                            proto: t.proto,
                            source: t.source,
                            destination: t.destination,
                            contents: (&t.contents[..]).try_into().unwrap(),
                        };
                        sessions.handle_receive(*now, receive);
                    }
                    Output::Event(_) => {}
                }
            }
            while let Some(t) = sessions.poll_transmit() {
                let receive = Receive {
                    proto: t.proto,
                    source: t.source,
                    destination: t.destination,
                    contents: (&t.contents[..]).try_into().unwrap(),
                };
                client.handle_input(Input::Receive(*now, receive)).unwrap();
            }
            *now += Duration::from_millis(10);
            client.handle_input(Input::Timeout(*now)).unwrap();
            sessions.handle_timeout(*now);
        }
    }

    fn viewer_session(now: Instant) -> (Rtc, Sessions, Arc<KeyframeWish>, CancellationToken) {
        let (mut rtc, offer, pending) = client(now);
        let wish = Arc::new(KeyframeWish::default());
        let (session, answer) = Session::accept(
            now,
            "s1".into(),
            "cam".into(),
            offer,
            Role::Viewer(Viewer::new(wish.clone())),
            &[SERVER.parse().unwrap()],
        )
        .unwrap();
        let ended = session.ended.clone();
        rtc.sdp_api().accept_answer(pending, answer).unwrap();
        let mut sessions = Sessions::default();
        sessions.insert(now, session);
        (rtc, sessions, wish, ended)
    }

    #[test]
    fn a_viewer_connects_over_ice_lite_and_asks_for_a_keyframe() {
        let mut now = Instant::now();
        let (mut rtc, mut sessions, wish, ended) = viewer_session(now);
        exchange(
            &mut rtc,
            &mut sessions,
            &mut now,
            Duration::from_secs(10),
            |s| s.get("s1").is_some_and(|s| s.connected && s.has_channel()),
        );
        let session = sessions.get("s1").expect("still there");
        assert!(session.connected, "ICE and DTLS done");
        assert!(session.has_channel(), "the data channel opened");
        assert!(wish.wanted(), "a new viewer wants a keyframe");
        assert!(!ended.is_cancelled());
        assert_eq!(sessions.count("cam", true), 1);
        assert_eq!(sessions.count("cam", false), 0);
    }

    #[test]
    fn a_viewer_that_vanishes_is_dropped_after_the_ice_timeout() {
        let mut now = Instant::now();
        let (mut rtc, mut sessions, _wish, ended) = viewer_session(now);
        exchange(
            &mut rtc,
            &mut sessions,
            &mut now,
            Duration::from_secs(10),
            |s| s.get("s1").is_some_and(|s| s.connected),
        );
        assert_eq!(sessions.len(), 1);
        // The peer is gone: nothing more comes from it. Time passes in steps the driver
        // would take.
        let gone = now;
        while sessions.len() > 0 && now < gone + Duration::from_secs(60) {
            now = sessions
                .timeout()
                .unwrap_or(now)
                .max(now + Duration::from_millis(100));
            sessions.handle_timeout(now);
            while sessions.poll_transmit().is_some() {}
        }
        assert_eq!(sessions.len(), 0, "dropped");
        assert!(ended.is_cancelled(), "whoever fed it is told");
        let after = now - gone;
        assert!(after <= Duration::from_secs(40), "{after:?}");
    }

    #[test]
    fn a_peer_that_never_connects_is_dropped() {
        let now = Instant::now();
        let (_rtc, mut sessions, _wish, ended) = viewer_session(now);
        sessions.handle_timeout(now + CONNECT_TIMEOUT);
        assert_eq!(sessions.len(), 0);
        assert!(ended.is_cancelled());
    }

    #[test]
    fn ending_a_session_needs_its_stream_and_id() {
        let now = Instant::now();
        let (_rtc, mut sessions, _wish, ended) = viewer_session(now);
        assert!(!sessions.end("other", "s1"));
        assert!(!sessions.end("cam", "s2"));
        assert!(sessions.end("cam", "s1"));
        assert_eq!(sessions.len(), 0);
        assert!(ended.is_cancelled());
    }
}
