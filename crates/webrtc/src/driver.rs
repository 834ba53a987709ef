//! The one task that drives every session: it owns the UDP socket and the [`Sessions`],
//! and only moves data: a packet in, a command in (a new session, media, an end), or a
//! deadline passed; then whatever the sessions want sent goes out. A packet the socket
//! cannot take at once is dropped like any lost UDP packet, so a slow network never blocks
//! the loop.
//!
//! **Which local address a packet came to.** ICE matches a request to the host candidate
//! it was sent to, and a socket bound to `0.0.0.0` does not say. [`LocalRoutes`] answers
//! with the address the kernel routes replies to that peer from (found once per peer
//! address by connecting a throwaway socket), or, behind a NAT (`--webrtc-public-ip`), the
//! public address the peer was told.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket as StdUdpSocket};
use std::time::{Duration, Instant};

use str0m::net::{Protocol, Receive};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::sessions::{Media, Session, SessionId, Sessions};

/// Largest datagram read; WebRTC keeps packets under the path MTU.
const DATAGRAM: usize = 2048;

/// With no session, how long the loop sleeps before looking again.
const IDLE: Duration = Duration::from_secs(1);

/// What the handlers and the viewers' tasks ask of the driver.
pub(crate) enum Command {
    Add(Session),
    /// Ends a session (`DELETE`, or its stream was removed); `done` says whether it was
    /// there.
    End {
        stream: String,
        session: SessionId,
        done: Option<oneshot::Sender<bool>>,
    },
    Write {
        session: SessionId,
        media: Media,
    },
    /// A publisher's decoder needs a keyframe.
    RequestKeyframe(SessionId),
}

/// The local address each packet is taken to have arrived at.
pub(crate) struct LocalRoutes {
    bound: SocketAddr,
    public: Option<IpAddr>,
    by_peer: HashMap<IpAddr, IpAddr>,
}

impl LocalRoutes {
    pub(crate) fn new(bound: SocketAddr, public: Option<IpAddr>) -> LocalRoutes {
        LocalRoutes {
            bound,
            public,
            by_peer: HashMap::new(),
        }
    }

    /// Where a packet from `peer` was sent to.
    pub(crate) fn local_for(&mut self, peer: SocketAddr) -> SocketAddr {
        let port = self.bound.port();
        if peer.ip().is_loopback() {
            return SocketAddr::new(peer.ip(), port);
        }
        if let Some(public) = self.public {
            return SocketAddr::new(public, port);
        }
        if !self.bound.ip().is_unspecified() {
            return self.bound;
        }
        let ip = *self
            .by_peer
            .entry(peer.ip())
            .or_insert_with(|| route_to(peer).unwrap_or(self.bound.ip()));
        SocketAddr::new(ip, port)
    }
}

/// The local address the kernel sends to `peer` from (connecting a UDP socket sends
/// nothing).
fn route_to(peer: SocketAddr) -> Option<IpAddr> {
    let any: SocketAddr = match peer {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().ok()?,
        SocketAddr::V6(_) => "[::]:0".parse().ok()?,
    };
    let socket = StdUdpSocket::bind(any).ok()?;
    socket.connect(peer).ok()?;
    socket.local_addr().ok().map(|a| a.ip())
}

/// Runs until `stop` is cancelled or every sender of commands is gone.
pub(crate) async fn run(
    socket: UdpSocket,
    mut commands: mpsc::Receiver<Command>,
    mut routes: LocalRoutes,
    stop: CancellationToken,
) {
    let mut sessions = Sessions::default();
    let mut buf = vec![0u8; DATAGRAM];
    loop {
        while let Some(transmit) = sessions.poll_transmit() {
            if let Err(e) = socket.try_send_to(&transmit.contents, transmit.destination) {
                tracing::trace!(
                    "a WebRTC packet to {} was dropped: {e}",
                    transmit.destination
                );
            }
        }
        let deadline = sessions.timeout().unwrap_or_else(|| now() + IDLE);
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            received = socket.recv_from(&mut buf) => match received {
                Ok((n, source)) => receive(&mut sessions, &mut routes, source, &buf[..n]),
                Err(e) => tracing::debug!("WebRTC socket: {e}"),
            },
            command = commands.recv() => match command {
                Some(command) => handle(&mut sessions, command),
                None => return,
            },
            _ = tokio::time::sleep_until(deadline.into()) => {}
        }
        sessions.handle_timeout(now());
    }
}

fn receive(sessions: &mut Sessions, routes: &mut LocalRoutes, source: SocketAddr, data: &[u8]) {
    let Ok(contents) = data.try_into() else {
        return;
    };
    let receive = Receive {
        proto: Protocol::Udp,
        source,
        destination: routes.local_for(source),
        contents,
    };
    if !sessions.handle_receive(now(), receive) {
        tracing::trace!("a WebRTC packet from {source} belongs to no session");
    }
}

fn handle(sessions: &mut Sessions, command: Command) {
    let now = now();
    match command {
        Command::Add(session) => sessions.insert(now, session),
        Command::End {
            stream,
            session,
            done,
        } => {
            let found = sessions.end(&stream, &session);
            if let Some(done) = done {
                let _ = done.send(found);
            }
        }
        Command::Write { session, media } => sessions.write(now, &session, &media),
        Command::RequestKeyframe(session) => sessions.request_keyframe(now, &session),
    }
}

/// Tokio's clock, like every other output's.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_bound_to_one_address_is_that_address() {
        let bound: SocketAddr = "10.1.2.3:8199".parse().unwrap();
        let mut routes = LocalRoutes::new(bound, None);
        assert_eq!(routes.local_for("10.9.9.9:5000".parse().unwrap()), bound);
    }

    #[test]
    fn loopback_peers_came_to_loopback_and_nat_peers_to_the_public_address() {
        let bound: SocketAddr = "0.0.0.0:8199".parse().unwrap();
        let public: IpAddr = "203.0.113.7".parse().unwrap();
        let mut routes = LocalRoutes::new(bound, Some(public));
        assert_eq!(
            routes.local_for("127.0.0.1:5000".parse().unwrap()),
            "127.0.0.1:8199".parse().unwrap()
        );
        assert_eq!(
            routes.local_for("198.51.100.1:5000".parse().unwrap()),
            SocketAddr::new(public, 8199)
        );
    }
}
