//! Live sources against tiny local servers: a closed port, a server that never answers,
//! and an MJPEG-over-HTTP server that goes away and comes back.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use kibitz_frames::{DisplayBuffer, InferenceWindow};
use kibitz_media::{Source, SourceConfig, SourceContext, SourceSpec, SourceState};

mod fixture;
use fixture::fixture;

fn start(
    url: &str,
    io_timeout: Duration,
) -> (Source, Arc<DisplayBuffer>, mpsc::Receiver<SourceState>) {
    let mut config = SourceConfig::new(SourceSpec::parse(url).unwrap());
    config.io_timeout = io_timeout;
    let display = Arc::new(DisplayBuffer::new(Duration::from_secs(15)));
    let window = Arc::new(InferenceWindow::new(8));
    let (tx, rx) = mpsc::channel();
    let cx = SourceContext::new(display.clone(), window).on_state(move |s| {
        let _ = tx.send(s.clone());
    });
    let source = config.build(cx).expect("a live source always starts");
    (source, display, rx)
}

/// The next state, waiting a generous minute.
fn next_state(rx: &mpsc::Receiver<SourceState>) -> SourceState {
    rx.recv_timeout(Duration::from_secs(60))
        .expect("no state change within a minute")
}

fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[test]
fn closed_port_backs_off_and_stops_cleanly() {
    let url = format!("http://127.0.0.1:{}/x.mjpg", closed_port());
    let (mut source, display, rx) = start(&url, Duration::from_secs(2));
    assert_eq!(
        next_state(&rx),
        SourceState::Reconnecting {
            attempt: 1,
            retry_in: Duration::from_secs(1)
        }
    );
    assert_eq!(
        next_state(&rx),
        SourceState::Reconnecting {
            attempt: 2,
            retry_in: Duration::from_secs(2)
        }
    );
    let status = source.status();
    assert_eq!(status.kind, "http");
    assert!(status.reconnects >= 2);
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("Connection refused")),
        "{status:?}"
    );
    // Stopping in the middle of a 2 s wait returns at once (no test on the time itself).
    source.stop();
    assert!(source.is_finished());
    assert!(display.is_empty());
}

#[test]
fn rtsp_closed_port_reconnects() {
    let url = format!("rtsp://127.0.0.1:{}/stream", closed_port());
    let (source, _display, rx) = start(&url, Duration::from_secs(2));
    assert!(matches!(
        next_state(&rx),
        SourceState::Reconnecting { attempt: 1, .. }
    ));
    assert_eq!(source.status().kind, "rtsp");
    drop(source); // Drop stops and joins.
}

#[test]
fn silent_server_times_out_and_stop_interrupts_a_blocked_read() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Accepts and never answers.
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let held = held.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                held.lock().unwrap().push(conn);
            }
        });
    }
    let (mut source, _display, rx) = start(
        &format!("http://127.0.0.1:{port}/live.mjpg"),
        Duration::from_secs(1),
    );
    // The 1 s I/O timeout turns silence into a reconnect.
    assert!(matches!(
        next_state(&rx),
        SourceState::Reconnecting { attempt: 1, .. }
    ));
    // Now blocked in the next attempt's read (after the 1 s wait): stop cuts it short.
    let deadline = Instant::now() + Duration::from_secs(60);
    while held.lock().unwrap().len() < 2 {
        assert!(Instant::now() < deadline, "no second connection");
        std::thread::sleep(Duration::from_millis(20));
    }
    source.stop();
    assert!(source.is_finished());
}

/// Serves the fixture's JPEGs as `multipart/x-mixed-replace` at 10 fps, `frames` of them
/// per connection, to one connection at a time, until `quit`.
fn mjpeg_server(
    listener: TcpListener,
    jpegs: Arc<Vec<Vec<u8>>>,
    frames: usize,
    quit: Arc<AtomicBool>,
) {
    listener.set_nonblocking(true).unwrap();
    while !quit.load(Ordering::Relaxed) {
        let Ok((mut conn, _)) = listener.accept() else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        conn.set_nonblocking(false).unwrap();
        let _ = serve(&mut conn, &jpegs, frames, &quit);
    }
}

fn serve(
    conn: &mut TcpStream,
    jpegs: &[Vec<u8>],
    frames: usize,
    quit: &AtomicBool,
) -> std::io::Result<()> {
    let mut request = [0u8; 4096];
    let _ = conn.read(&mut request)?;
    conn.write_all(
        b"HTTP/1.0 200 OK\r\nContent-Type: multipart/x-mixed-replace;boundary=frame\r\n\r\n",
    )?;
    for jpeg in jpegs.iter().cycle().take(frames) {
        if quit.load(Ordering::Relaxed) {
            break;
        }
        write!(
            conn,
            "--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n",
            jpeg.len()
        )?;
        conn.write_all(jpeg)?;
        conn.write_all(b"\r\n")?;
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

#[test]
fn mjpeg_over_http_passes_through_and_reconnects() {
    ffmpeg_next::init().unwrap();
    let mut input = ffmpeg_next::format::input(&fixture("mjpeg.avi")).unwrap();
    let jpegs: Vec<Vec<u8>> = input
        .packets()
        .filter_map(|(_, p)| p.data().map(<[u8]>::to_vec))
        .collect();
    let jpegs = Arc::new(jpegs);

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let quit = Arc::new(AtomicBool::new(false));
    let server = {
        let (jpegs, quit) = (jpegs.clone(), quit.clone());
        // 30 frames (3 s) per connection, then the server hangs up.
        std::thread::spawn(move || mjpeg_server(listener, jpegs, 30, quit))
    };

    let (source, display, rx) = start(
        &format!("http://127.0.0.1:{port}/cam.mjpg"),
        Duration::from_secs(2),
    );
    assert_eq!(next_state(&rx), SourceState::Live);
    let status = source.status();
    assert!(status.passthrough, "{status:?}");
    assert_eq!(status.codec.as_deref(), Some("mjpeg"));
    let frame = display.latest().unwrap();
    assert!(
        jpegs.iter().any(|j| j[..] == frame.jpeg.bytes[..]),
        "passthrough bytes match the server's"
    );

    // The server hangs up after 30 frames: reconnect, then live again on the next connection.
    assert!(matches!(
        next_state(&rx),
        SourceState::Reconnecting { attempt: 1, .. }
    ));
    assert_eq!(next_state(&rx), SourceState::Live);
    let status = source.status();
    assert_eq!(status.reconnects, 1);
    assert!(status.frames_decoded >= 10, "{status:?}");
    // Media time kept growing over the reconnect.
    let latest = display.latest().unwrap();
    assert!(
        latest.stamp.pts > Duration::from_secs(1),
        "{:?}",
        latest.stamp.pts
    );

    drop(source);
    quit.store(true, Ordering::Relaxed);
    server.join().unwrap();
}
