//! The accept loop: connections in, each served by hyper with limits that `axum::serve`
//! does not have.
//!
//! Why it is its own loop (hyper-util's pieces, as axum's own `serve` uses them):
//!
//! - **A header-read timeout.** A client that opens a connection and sends headers slowly
//!   (or nothing) is dropped after [`Limits::header_read_timeout`]. hyper starts that timer
//!   whenever it waits for a request's head, so it also ends keep-alive connections that
//!   sit between requests.
//! - **An idle timeout.** A connection on which no byte moved either way for
//!   [`Limits::idle_timeout`] is dropped, mid-request or not. MJPEG, SSE (its keep-alive
//!   comments) and WebSocket (its pings) send all the time, so a watched stream is never
//!   idle; a stalled upload or a reader that stopped reading is.
//! - **A connection cap.** At most [`Limits::max_connections`] are served at once, and the
//!   cap is kept under the process's open-file limit. Past it, [`RESERVE`] more are
//!   accepted with a short header timeout and serve one request each: `/healthz` as
//!   usual, anything else `503`. So a probe still gets its answer when idle sockets have
//!   taken every slot; past the reserve too, the loop waits for a slot (the kernel's
//!   backlog holds new ones) instead of spinning on `EMFILE`.
//! - **TLS** (`--tls-cert`/`--tls-key`) through rustls, the handshake inside the
//!   connection's task (bounded by the header timeout) so a slow one never holds the loop.
//!
//! Every request gets [`Connection`] (peer, local address, TLS or not) and axum's
//! `ConnectInfo<SocketAddr>` as extensions.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower_service::Service;

use crate::{ApiError, ServerError};

/// Connections accepted past the cap, each for one request with [`RESERVE_HEADER_TIMEOUT`].
pub const RESERVE: usize = 16;

/// How long a reserve connection gets to send its request: short, so idle sockets that
/// land in the reserve free it again soon.
const RESERVE_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// Open files kept free beyond the connections: the model, the history, sources'
/// sockets, speech, logs.
pub const FILE_RESERVE: u64 = 256;

/// The path a reserve connection still answers.
const HEALTH_PATH: &str = "/healthz";

/// What one connection may cost.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `--header-read-timeout`.
    pub header_read_timeout: Duration,
    /// `--idle-timeout`: no byte either way for this long ends the connection.
    pub idle_timeout: Duration,
    /// `--max-connections`: served at once (plus [`RESERVE`] for `/healthz`).
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            max_connections: 512,
        }
    }
}

/// How to serve: limits and, with a certificate, TLS.
#[derive(Clone, Default)]
pub struct ServeOptions {
    pub limits: Limits,
    pub tls: Option<TlsAcceptor>,
}

/// The connection a request came on, as an extension of every request.
#[derive(Debug, Clone, Copy)]
pub struct Connection {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// Served over TLS by kibitz itself.
    pub tls: bool,
}

/// A TLS acceptor from a PEM certificate chain and a PEM private key (PKCS#8, PKCS#1 or
/// SEC1), speaking HTTP/1.1 (ALPN). Errors name the file and what is wrong with it.
pub fn tls_from_pem(cert: &Path, key: &Path) -> Result<TlsAcceptor, ServerError> {
    let bad = |path: &Path, what: String| ServerError::Tls(format!("{}: {what}", path.display()));
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(bad(cert, "holds no PEM certificate".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| {
            ServerError::Tls(format!(
                "{} and {} do not make a usable pair: {e}",
                cert.display(),
                key.display()
            ))
        })?;
    // WebSocket upgrades are HTTP/1.1; hyper here speaks nothing else.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Raises this process's open-file soft limit to its hard limit (Linux's default soft
/// limit, 1,024, is what a few hundred viewers and idle sockets exhaust). Answers the soft
/// limit now in force; `None` where it cannot be read.
pub fn raise_open_file_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => Some(limit),
        Err(e) => {
            tracing::warn!("cannot raise the open-file limit: {e}");
            rlimit::getrlimit(rlimit::Resource::NOFILE)
                .ok()
                .map(|(soft, _)| soft)
        }
    }
}

/// The connections served at once: what was asked, kept [`FILE_RESERVE`] and the
/// [`RESERVE`] under the open-file limit (each connection is one descriptor), at least 1.
pub fn connection_cap(asked: usize, open_files: Option<u64>) -> usize {
    let Some(limit) = open_files else {
        return asked.max(1);
    };
    let room = limit.saturating_sub(FILE_RESERVE + RESERVE as u64);
    asked
        .min(usize::try_from(room).unwrap_or(usize::MAX))
        .max(1)
}

/// Serves `app` on `listener` until `shutdown` is cancelled; then stops accepting, asks
/// every connection to finish, and returns once they have or after `grace`.
pub(crate) async fn run(
    listener: TcpListener,
    app: Router,
    options: ServeOptions,
    shutdown: CancellationToken,
    grace: Duration,
) -> Result<(), ServerError> {
    let open_files = rlimit::getrlimit(rlimit::Resource::NOFILE)
        .ok()
        .map(|(soft, _)| soft);
    let cap = connection_cap(options.limits.max_connections, open_files);
    if cap < options.limits.max_connections {
        tracing::warn!(
            asked = options.limits.max_connections,
            cap,
            "--max-connections lowered to fit the open-file limit ({open_files:?})"
        );
    }
    let slots = Slots {
        normal: Arc::new(Semaphore::new(cap)),
        reserve: Arc::new(Semaphore::new(RESERVE)),
    };
    let served = Served {
        app,
        options: options.clone(),
        shutdown: shutdown.clone(),
    };
    let mut last_error_log: Option<Instant> = None;
    loop {
        let slot = tokio::select! {
            () = shutdown.cancelled() => break,
            slot = slots.next() => slot,
        };
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(&e, &mut last_error_log).await;
                    continue;
                }
            },
        };
        let served = served.clone();
        tokio::spawn(async move { served.connection(tcp, peer, slot).await });
    }
    drop(listener);
    slots.drained(cap, grace).await;
    Ok(())
}

/// The two pools of connection slots. A connection holds its permit until it ends.
struct Slots {
    normal: Arc<Semaphore>,
    reserve: Arc<Semaphore>,
}

/// A connection's permit, and whether it came from the reserve.
struct Slot {
    _permit: OwnedSemaphorePermit,
    reserve: bool,
}

impl Slot {
    fn normal(permit: OwnedSemaphorePermit) -> Slot {
        Slot {
            _permit: permit,
            reserve: false,
        }
    }

    fn reserve(permit: OwnedSemaphorePermit) -> Slot {
        Slot {
            _permit: permit,
            reserve: true,
        }
    }
}

impl Slots {
    /// A normal slot if one is free, else a reserve one, else the first to free up.
    async fn next(&self) -> Slot {
        if let Ok(p) = self.normal.clone().try_acquire_owned() {
            return Slot::normal(p);
        }
        if let Ok(p) = self.reserve.clone().try_acquire_owned() {
            return Slot::reserve(p);
        }
        tokio::select! {
            biased;
            p = self.normal.clone().acquire_owned() => Slot::normal(p.expect("never closed")),
            p = self.reserve.clone().acquire_owned() => Slot::reserve(p.expect("never closed")),
        }
    }

    /// Waits until every connection has given its slot back, or `grace` has passed.
    async fn drained(&self, cap: usize, grace: Duration) {
        let all = async {
            let _normal = self.normal.acquire_many(cap as u32).await;
            let _reserve = self.reserve.acquire_many(RESERVE as u32).await;
        };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("connections still open {grace:?} after shutdown; leaving them");
        }
    }
}

/// `accept` failed. Out of descriptors (`EMFILE`/`ENFILE`) or memory: wait a little
/// rather than spin, and say so at most once a second. Anything else (a peer that reset
/// before we took it) is the peer's problem.
async fn accept_failed(e: &io::Error, last_log: &mut Option<Instant>) {
    let starved = matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS)
    );
    if !starved {
        tracing::debug!("accept: {e}");
        return;
    }
    if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
        tracing::warn!("accept: {e}; waiting for connections to end");
        *last_log = Some(Instant::now());
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// What every connection task needs.
#[derive(Clone)]
struct Served {
    app: Router,
    options: ServeOptions,
    shutdown: CancellationToken,
}

impl Served {
    async fn connection(self, tcp: TcpStream, peer: SocketAddr, slot: Slot) {
        tune(&tcp);
        let Ok(local) = tcp.local_addr() else { return };
        let reserve = slot.reserve;
        let header_timeout = if reserve {
            RESERVE_HEADER_TIMEOUT.min(self.options.limits.header_read_timeout)
        } else {
            self.options.limits.header_read_timeout
        };
        let activity = Arc::new(Activity::new());
        let io = Watched {
            inner: tcp,
            activity: activity.clone(),
            _slot: slot,
        };
        let info = Connection {
            peer,
            local,
            tls: self.options.tls.is_some(),
        };
        match &self.options.tls {
            None => {
                self.drive(io, info, reserve, header_timeout, activity)
                    .await
            }
            Some(acceptor) => {
                let handshake = tokio::time::timeout(header_timeout, acceptor.accept(io));
                match handshake.await {
                    Ok(Ok(tls)) => {
                        self.drive(tls, info, reserve, header_timeout, activity)
                            .await
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            }
        }
    }

    /// Serves HTTP/1.1 on `io` until the peer leaves, a timeout ends it, or shutdown.
    async fn drive<IO>(
        self,
        io: IO,
        info: Connection,
        reserve: bool,
        header_timeout: Duration,
        activity: Arc<Activity>,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let app = self.app.clone();
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(info);
            request.extensions_mut().insert(ConnectInfo(info.peer));
            let mut app = app.clone();
            async move {
                if reserve && request.uri().path() != HEALTH_PATH {
                    return Ok::<_, std::convert::Infallible>(over_capacity());
                }
                app.call(request.map(Body::new)).await
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .keep_alive(!reserve);
        let conn = builder.serve_connection(TokioIo::new(io), service);
        let conn = conn.with_upgrades();
        tokio::pin!(conn);
        let idle = self.options.limits.idle_timeout;
        let mut stopping = false;
        loop {
            let quiet = activity.quiet_for();
            let check = tokio::time::sleep(idle.saturating_sub(quiet));
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(peer = %info.peer, "connection ended: {e}");
                    }
                    return;
                }
                () = self.shutdown.cancelled(), if !stopping => {
                    conn.as_mut().graceful_shutdown();
                    stopping = true;
                }
                () = check => {
                    if activity.quiet_for() >= idle {
                        tracing::debug!(peer = %info.peer, "closing a connection idle for {idle:?}");
                        return;
                    }
                }
            }
        }
    }
}

/// The answer on a reserve connection to anything but `/healthz`.
fn over_capacity() -> Response {
    let mut response = ApiError::Unavailable(
        "too many connections; try again shortly (the server's --max-connections)".into(),
    )
    .into_response();
    debug_assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    response.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    response
}

/// Kernel send buffer per connection. Linux grows it up to 4 MB for a client that reads
/// slowly, which is seconds of stale MJPEG queued in front of it, out of sync with the
/// words. Capped, a slow viewer skips frames instead; 512 KiB (the kernel doubles it)
/// still carries 720p25 over a 200 ms round trip.
const SEND_BUFFER: usize = 512 * 1024;

fn tune(tcp: &TcpStream) {
    // Tokens and frame ends are small writes that should leave at once.
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!("cannot set TCP_NODELAY: {e}");
    }
    if let Err(e) = socket2::SockRef::from(tcp).set_send_buffer_size(SEND_BUFFER) {
        tracing::debug!("cannot set SO_SNDBUF: {e}");
    }
}

/// When a byte last moved on a connection, as milliseconds since it opened.
struct Activity {
    opened: tokio::time::Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            opened: tokio::time::Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.opened.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn quiet_for(&self) -> Duration {
        let since_open = self.opened.elapsed();
        since_open.saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// A connection's socket that notes every read and write in [`Activity`], and holds the
/// connection's slot until it is dropped (after an upgrade too: the WebSocket owns it then).
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
    _slot: Slot,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_stays_under_the_open_file_limit() {
        assert_eq!(connection_cap(512, None), 512);
        assert_eq!(connection_cap(512, Some(1 << 20)), 512);
        // The common default of 1,024: room for the reserve and other files.
        assert_eq!(connection_cap(512, Some(1024)), 512);
        let at_1024 = connection_cap(1000, Some(1024));
        assert_eq!(at_1024, 1024 - FILE_RESERVE as usize - RESERVE);
        assert!(at_1024 + RESERVE + (FILE_RESERVE as usize) <= 1024);
        assert_eq!(connection_cap(512, Some(10)), 1);
        assert_eq!(connection_cap(0, None), 1);
    }
}
