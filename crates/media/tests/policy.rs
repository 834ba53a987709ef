//! The source policy for the HTTP API: what it refuses, what it allows with which FFmpeg
//! whitelists, and that FFmpeg 5.1 really holds an allowed source to them (a playlist inside
//! the media dir cannot reach a file outside it; allowed sources still open and play).
//!
//! Nothing here needs the internet: hosts are literal addresses or `localhost`, and every
//! connection goes to a listener on loopback.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use kibitz_frames::{DisplayBuffer, InferenceWindow, WINDOW_SIZE};
use kibitz_media::{
    Allowed, Error, PolicyError, Restrictions, Source, SourceConfig, SourceContext, SourcePolicy,
    SourceSpec, SourceState,
};

mod fixture;
use fixture::fixture;

/// A scratch directory removed on drop (no tempfile crate: one small struct will do).
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "kibitz-policy-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A media dir holding a real clip, next to an "outside" dir the API must not reach.
struct MediaDir {
    root: Scratch,
    media: PathBuf,
    outside: PathBuf,
}

impl MediaDir {
    fn new() -> Self {
        let root = Scratch::new();
        let media = root.0.join("media");
        let outside = root.0.join("outside");
        std::fs::create_dir_all(&media).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::copy(fixture("short-1s.mp4"), media.join("clip.mp4")).unwrap();
        std::fs::copy(fixture("short-1s.mp4"), outside.join("secret.mp4")).unwrap();
        remux_to_ts(&fixture("short-1s.mp4"), &outside.join("secret.ts"));
        std::os::unix::fs::symlink(outside.join("secret.mp4"), media.join("link.mp4")).unwrap();
        Self {
            root,
            media,
            outside,
        }
    }

    fn policy(&self) -> SourcePolicy {
        SourcePolicy {
            media_dir: Some(self.media.clone()),
        }
    }

    /// A file outside the media dir, as an HLS segment (MPEG-TS).
    fn secret_ts(&self) -> PathBuf {
        self.outside.join("secret.ts")
    }

    fn secret(&self) -> PathBuf {
        self.outside.join("secret.mp4")
    }
}

/// Copies the video of `mp4` into an MPEG-TS file, the segment format HLS plays (FFmpeg's
/// remux example, video only).
fn remux_to_ts(mp4: &Path, ts: &Path) {
    use ffmpeg_next::{codec, encoder, format, media};
    ffmpeg_next::init().unwrap();
    let mut input = format::input(mp4).unwrap();
    let mut output = format::output_as(ts, "mpegts").unwrap();
    let video = input.streams().best(media::Type::Video).unwrap();
    let (index, time_base) = (video.index(), video.time_base());
    let mut out = output.add_stream(encoder::find(codec::Id::None)).unwrap();
    out.set_parameters(video.parameters());
    // SAFETY: the stream's parameters are owned by `output` and alive; a zero tag lets the
    // muxer choose its own.
    unsafe { (*out.parameters().as_mut_ptr()).codec_tag = 0 };
    output.write_header().unwrap();
    let out_time_base = output.stream(0).unwrap().time_base();
    for (stream, mut packet) in input.packets() {
        if stream.index() != index {
            continue;
        }
        packet.rescale_ts(time_base, out_time_base);
        packet.set_position(-1);
        packet.set_stream(0);
        packet.write_interleaved(&mut output).unwrap();
    }
    output.write_trailer().unwrap();
}

fn refused(policy: &SourcePolicy, source: &str) -> PolicyError {
    match policy.check(source) {
        Ok(a) => panic!("'{source}' was allowed as {:?}", a.spec),
        Err(e) => e,
    }
}

fn restrictions(protocols: &str, formats: &str) -> Restrictions {
    Restrictions {
        protocol_whitelist: Some(protocols.into()),
        format_whitelist: Some(formats.into()),
    }
}

const VIDEO: &str = "mpegts,mov,mp4,matroska,webm,flv,avi,mpjpeg,mjpeg,jpeg_pipe,\
                     h264,hevc,ivf,mpeg,mxf,aac,mp3,ac3,eac3";

#[test]
fn pseudo_protocols_devices_and_other_schemes_are_refused() {
    let policy = SourcePolicy::default();
    let scheme = |s: &str| PolicyError::Scheme { scheme: s.into() };
    for (source, why) in [
        ("concat:/etc/passwd|/etc/hosts", scheme("concat")),
        ("subfile,,start,0,end,100,,:/etc/passwd", scheme("subfile")),
        ("pipe:0", scheme("pipe")),
        ("data:text/plain;base64,aGk=", scheme("data")),
        ("lavfi:testsrc2", scheme("lavfi")),
        ("crypto:/etc/passwd", scheme("crypto")),
        ("crypto+http://127.0.0.1/x", scheme("crypto+http")),
        ("tcp://127.0.0.1:80", scheme("tcp")),
        ("ftp://x", scheme("ftp")),
        ("gopher://x", scheme("gopher")),
        ("rtmp://127.0.0.1/live", scheme("rtmp")),
        ("unix:/run/x.sock", scheme("unix")),
        ("/dev/video0", PolicyError::Device),
        ("/dev/../dev/video0", PolicyError::Device),
        ("0", PolicyError::Device),
        ("/etc/passwd", PolicyError::NoMediaDir),
        ("file:///etc/passwd", PolicyError::NoMediaDir),
        ("clip.mp4", PolicyError::NoMediaDir),
        ("", PolicyError::Empty),
        ("rtsp://127.0.0.1/a\0b", PolicyError::ControlChar),
        ("http://127.0.0.1/a\nb", PolicyError::ControlChar),
        ("http://127.0.0.1/a b", PolicyError::Whitespace),
        (
            "http:///x",
            PolicyError::NoHost {
                scheme: "http".into(),
            },
        ),
        (
            "udp://@:1234",
            PolicyError::NoHost {
                scheme: "udp".into(),
            },
        ),
        (
            "http:127.0.0.1/x",
            PolicyError::NoHost {
                scheme: "http".into(),
            },
        ),
    ] {
        assert_eq!(refused(&policy, source), why, "{source}");
        let message = why.to_string();
        assert!(!message.is_empty() && !message.contains('\n'), "{message}");
    }
    assert!(refused(&policy, "/etc/passwd")
        .to_string()
        .contains("--media-dir"));
}

#[test]
fn link_local_hosts_are_refused_in_every_spelling() {
    let policy = SourcePolicy::default();
    for (source, addr) in [
        ("http://169.254.169.254/latest/meta-data", "169.254.169.254"),
        ("http://[fe80::1]/", "fe80::1"),
        ("http://[::ffff:169.254.169.254]/", "::ffff:169.254.169.254"),
        ("http://2852039166/", "169.254.169.254"),
        ("http://0xa9.0xfe.0xa9.0xfe/", "169.254.169.254"),
        ("http://0251.0376.0251.0376/", "169.254.169.254"),
        ("http://169.254.43518/", "169.254.169.254"),
        ("http://u:p@169.254.169.254:80/", "169.254.169.254"),
        ("http://127.0.0.1:80@169.254.169.254/", "169.254.169.254"),
        ("rtsp://169.254.1.1:554/x", "169.254.1.1"),
        ("srt://169.254.1.1:9000", "169.254.1.1"),
        ("udp://[fe80::2]:1234", "fe80::2"),
        ("HTTPS://169.254.169.254/", "169.254.169.254"),
    ] {
        match refused(&policy, source) {
            PolicyError::LinkLocal { addr: a, .. } => {
                assert_eq!(a, addr.parse::<std::net::IpAddr>().unwrap(), "{source}")
            }
            other => panic!("{source}: {other:?}"),
        }
    }
    let message = refused(&policy, "http://admin:hunter2@169.254.169.254/").to_string();
    assert!(message.contains("169.254.0.0/16"), "{message}");
    assert!(!message.contains("hunter2"), "{message}");
}

#[test]
fn network_sources_get_their_own_whitelists() {
    let policy = SourcePolicy::default();
    let hls = format!("hls,{VIDEO}");
    for (source, spec, r) in [
        (
            "rtsp://127.0.0.1:8554/x",
            SourceSpec::Rtsp("rtsp://127.0.0.1:8554/x".into()),
            restrictions("rtsp,tcp,udp,rtp", "rtsp"),
        ),
        (
            "RTSPS://user:pw@localhost/x",
            SourceSpec::Rtsp("rtsps://user:pw@localhost/x".into()),
            restrictions("rtsps,rtsp,tcp,udp,rtp,tls", "rtsp"),
        ),
        (
            "http://127.0.0.1:8080/cam.mjpg",
            SourceSpec::Http("http://127.0.0.1:8080/cam.mjpg".into()),
            restrictions("http,tcp,crypto", &hls),
        ),
        (
            "https://localhost/x.m3u8",
            SourceSpec::Http("https://localhost/x.m3u8".into()),
            restrictions("https,tls,tcp,crypto", &hls),
        ),
        (
            "srt://127.0.0.1:9000",
            SourceSpec::Url("srt://127.0.0.1:9000".into()),
            restrictions("srt,udp", VIDEO),
        ),
        (
            "udp://127.0.0.1:1234",
            SourceSpec::Url("udp://127.0.0.1:1234".into()),
            restrictions("udp", VIDEO),
        ),
        (
            "rtp://[::1]:5004",
            SourceSpec::Url("rtp://[::1]:5004".into()),
            restrictions("rtp,udp", "rtp"),
        ),
    ] {
        let allowed = policy
            .check(source)
            .unwrap_or_else(|e| panic!("{source}: {e}"));
        assert_eq!(
            allowed,
            Allowed {
                spec,
                restrictions: r
            },
            "{source}"
        );
    }
    let shown = policy.check("rtsps://user:pw@localhost/x").unwrap().spec;
    assert_eq!(shown.to_string(), "rtsps://***@localhost/x");
}

#[test]
fn local_files_only_inside_the_media_dir() {
    let dir = MediaDir::new();
    let policy = dir.policy();
    let clip = std::fs::canonicalize(dir.media.join("clip.mp4")).unwrap();
    let file_restrictions = restrictions("file", VIDEO);
    let dotted = format!("{}/../media/./clip.mp4", dir.media.display());
    let file_url = format!("file://{}", clip.display());
    for source in ["clip.mp4", "./clip.mp4", dotted.as_str(), file_url.as_str()] {
        let allowed = policy
            .check(source)
            .unwrap_or_else(|e| panic!("{source}: {e}"));
        assert_eq!(allowed.spec, SourceSpec::File(clip.clone()), "{source}");
        assert_eq!(allowed.restrictions, file_restrictions, "{source}");
    }

    let not_in = |p: &str| PolicyError::NotInMediaDir { path: p.into() };
    let secret = dir.secret().display().to_string();
    let escape = format!("{}/../outside/secret.mp4", dir.media.display());
    for source in [
        "/etc/passwd",
        "file:///etc/passwd",
        "../outside/secret.mp4",
        escape.as_str(),
        secret.as_str(),
        "link.mp4",
        "missing.mp4",
    ] {
        assert_eq!(refused(&policy, source), not_in(source), "{source}");
    }
    // Missing and outside read alike: no probing for files that exist elsewhere.
    assert_eq!(
        refused(&policy, "/etc/passwd").to_string(),
        "'/etc/passwd' is not a file inside --media-dir (paths are relative to it; links and .. may not lead out of it)"
    );
    assert_eq!(
        refused(&policy, "."),
        PolicyError::NotAFile { path: ".".into() }
    );
    assert_eq!(refused(&policy, "/dev/null"), PolicyError::Device);

    let gone = SourcePolicy {
        media_dir: Some(dir.root.0.join("no-such-dir")),
    };
    assert!(matches!(
        refused(&gone, "clip.mp4"),
        PolicyError::MediaDir { .. }
    ));
}

struct Running {
    source: Source,
    display: Arc<DisplayBuffer>,
    states: mpsc::Receiver<SourceState>,
}

fn start(config: SourceConfig) -> Result<Running, Error> {
    let display = Arc::new(DisplayBuffer::new(Duration::from_secs(15)));
    let window = Arc::new(InferenceWindow::new(WINDOW_SIZE));
    let (tx, states) = mpsc::channel();
    let cx = SourceContext::new(display.clone(), window).on_state(move |s| {
        let _ = tx.send(s.clone());
    });
    let source = config.build(cx)?;
    Ok(Running {
        source,
        display,
        states,
    })
}

/// Waits a generous minute (a loaded 2-core box) for frames on the display.
fn wait_for_frames(r: &Running, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while r.display.latest().is_none() {
        assert!(
            Instant::now() < deadline,
            "{what}: no frame within a minute ({:?})",
            r.source.status()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The next state change, within a minute.
fn next_state(r: &Running) -> SourceState {
    r.states
        .recv_timeout(Duration::from_secs(60))
        .expect("no state change within a minute")
}

fn open_allowed(policy: &SourcePolicy, source: &str) -> Result<Running, Error> {
    let allowed = policy
        .check(source)
        .unwrap_or_else(|e| panic!("{source}: {e}"));
    start(SourceConfig::from(allowed))
}

#[test]
fn allowed_files_still_open_and_play_with_the_whitelists() {
    let policy = SourcePolicy {
        media_dir: Some(fixture("testsrc2-360p25.mp4").parent().unwrap().into()),
    };
    // mov/mp4, avi and a bare JPEG stream (FFmpeg probes it as jpeg_pipe).
    for name in ["testsrc2-360p25.mp4", "mjpeg.avi", "clip.mjpeg"] {
        let r = open_allowed(&policy, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        wait_for_frames(&r, name);
        assert_eq!(r.source.status().state, SourceState::Live, "{name}");
    }
}

/// Playlists inside the media dir that name a file outside it. Each opens without
/// restrictions (so the escape is real) and fails with the policy's.
#[test]
fn playlists_in_the_media_dir_cannot_reach_files_outside_it() {
    let dir = MediaDir::new();
    let secret = dir.secret_ts();
    let policy = dir.policy();
    let hls = |entry: &str| {
        format!("#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:1.0,\n{entry}\n#EXT-X-ENDLIST\n")
    };
    let playlists = [
        (
            "list.ffconcat",
            "ffconcat version 1.0\nfile link.mp4\n".to_owned(),
        ),
        ("abs.m3u8", hls(&secret.display().to_string())),
        ("fileurl.m3u8", hls(&format!("file:{}", secret.display()))),
        ("up.m3u8", hls("../outside/secret.ts")),
    ];
    for (name, text) in playlists {
        std::fs::write(dir.media.join(name), text).unwrap();
        let allowed = policy.check(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(allowed.restrictions, restrictions("file", VIDEO));

        let open = start(SourceConfig::new(allowed.spec.clone()))
            .unwrap_or_else(|e| panic!("{name} without restrictions: {e}"));
        wait_for_frames(&open, name);
        drop(open);

        match start(SourceConfig::from(allowed)) {
            Ok(r) => panic!(
                "{name} opened with the policy's restrictions: {:?}",
                r.source.status()
            ),
            Err(Error::Open { reason, .. }) => {
                assert!(reason.contains("source policy"), "{name}: {reason}")
            }
            Err(e) => panic!("{name}: {e}"),
        }
    }
}

/// Accepts connections on loopback and reports the first bytes each one sends.
fn first_bytes_server() -> (u16, mpsc::Receiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
            let mut buf = [0u8; 64];
            let n = conn.read(&mut buf).unwrap_or(0);
            if tx.send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    (port, rx)
}

/// The whitelists name FFmpeg 5.1's protocols right: rtsp connects over tcp, rtsps and
/// https speak TLS over tcp, http sends its GET. A whitelist without `tcp` connects nowhere.
#[test]
fn network_whitelists_let_the_real_connection_through() {
    let policy = SourcePolicy::default();
    for (scheme, starts) in [
        ("rtsp", &b"OPTIONS rtsp://"[..]),
        ("rtsps", &[0x16, 0x03][..]),
        ("http", &b"GET /x HTTP/1.1"[..]),
        ("https", &[0x16, 0x03][..]),
    ] {
        let (port, first) = first_bytes_server();
        let r = open_allowed(&policy, &format!("{scheme}://127.0.0.1:{port}/x")).unwrap();
        let bytes = first
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("{scheme}: no connection within a minute"));
        assert!(
            bytes.starts_with(starts),
            "{scheme}: {:?}",
            String::from_utf8_lossy(&bytes)
        );
        drop(r);
    }

    let (port, first) = first_bytes_server();
    let mut config =
        SourceConfig::from(policy.check(&format!("rtsp://127.0.0.1:{port}/x")).unwrap());
    config.restrictions.protocol_whitelist = Some("rtsp,udp".into());
    let r = start(config).unwrap();
    assert!(matches!(next_state(&r), SourceState::Reconnecting { .. }));
    assert!(first.try_recv().is_err(), "connected without tcp allowed");
}

/// Serves `files` over HTTP/1.0 on loopback, one request per connection.
fn http_server(files: Vec<(&'static str, Vec<u8>)>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let _ = serve_one(conn, &files);
        }
    });
    port
}

fn serve_one(mut conn: TcpStream, files: &[(&str, Vec<u8>)]) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&request);
    let path = line.split_whitespace().nth(1).unwrap_or("");
    match files.iter().find(|(name, _)| path == format!("/{name}")) {
        Some((_, body)) => {
            write!(
                conn,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            conn.write_all(body)
        }
        None => conn.write_all(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n"),
    }
}

/// HLS over http plays with the http whitelists; a playlist served over http that names a
/// local file (as `file:` or a bare path) does not get it.
#[test]
fn hls_over_http_plays_but_cannot_reach_local_files() {
    let dir = MediaDir::new();
    let secret = dir.secret_ts();
    let segment = std::fs::read(&secret).unwrap();
    let hls = |entry: &str| {
        format!("#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:1.0,\n{entry}\n#EXT-X-ENDLIST\n")
            .into_bytes()
    };
    let port = http_server(vec![
        ("ok.m3u8", hls("seg.ts")),
        ("seg.ts", segment),
        ("file.m3u8", hls(&format!("file:{}", secret.display()))),
        ("abs.m3u8", hls(&secret.display().to_string())),
    ]);
    let policy = SourcePolicy::default();
    let r = open_allowed(&policy, &format!("http://127.0.0.1:{port}/ok.m3u8")).unwrap();
    wait_for_frames(&r, "ok.m3u8");
    drop(r);

    for name in ["file.m3u8", "abs.m3u8"] {
        let r = open_allowed(&policy, &format!("http://127.0.0.1:{port}/{name}")).unwrap();
        assert!(
            matches!(next_state(&r), SourceState::Reconnecting { .. }),
            "{name}"
        );
        assert!(r.display.is_empty(), "{name} showed a local file");
    }
}

/// `check` never leaves the media dir for a path it was not given: a file inside it keeps
/// its canonical, absolute path.
#[test]
fn allowed_paths_are_canonical() {
    let dir = MediaDir::new();
    let spec = dir.policy().check("./clip.mp4").unwrap().spec;
    let SourceSpec::File(path) = spec else {
        panic!("{spec:?}")
    };
    assert!(path.is_absolute() && path.starts_with(dir.media.canonicalize().unwrap()));
}
