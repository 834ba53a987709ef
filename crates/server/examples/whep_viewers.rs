//! Benchmark: what WHEP viewers of one 720p25 stream cost the server, and how many it keeps
//! at full rate.
//!
//! The server is a child `kibitz serve` process on one real source (Big Buck Bunny, 1280x720,
//! 25 fps; an unreachable OpenAI-compatible engine, so no commentary, no voice): its CPU is
//! its own `/proc/PID/stat`, apart from the viewers. The viewers are str0m peers in this
//! process (one UDP socket and one task each, on a 2-thread runtime): each POSTs a WHEP
//! offer (video, audio and a data channel, like the page), answers ICE, decrypts SRTP and
//! counts the H.264 frames str0m puts together and the UDP bytes it received. They do not
//! decode the picture (a browser would, on its own machine).
//!
//! Viewers are added step by step (`--viewers 0,1,10,50,100,200`); at each step, after a
//! warm-up, every viewer's frame rate and bytes and both processes' CPU are measured over
//! `--seconds`. "Full rate" means every viewer got at least 95 % of 25 fps.
//!
//! ```text
//! cargo build -p kibitz -p kibitz-server --example whep_viewers
//! target/debug/examples/whep_viewers --kibitz target/debug/kibitz \
//!     --source fixtures/bigbuckbunny.mp4 --viewers 0,1,10,50,100,200
//! ```
//! With `--publish`, the server starts with no source and this process publishes the clip
//! over WHIP instead (as stream `s1`, H.264 made once beforehand by the server's own encoder
//! from the ffmpeg CLI's decoded frames, then sent in a loop at 25 fps): the server's CPU is
//! then that of one WHIP ingest (depacketize, decode, display JPEG) plus its viewers.
//!
//! Results and how they were taken: `docs/benchmarks.md` (WebRTC viewers).

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::change::SdpAnswer;
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::net::UdpSocket;

/// IPv4 and UDP headers: what each datagram adds on the wire beyond its payload.
const IP_UDP_HEADERS: u64 = 28;

struct Options {
    kibitz: String,
    source: String,
    viewers: Vec<usize>,
    seconds: f64,
    warmup: f64,
    fps: f64,
    threads: usize,
    publish: bool,
    bitrate_bps: u32,
}

fn options() -> Options {
    let mut o = Options {
        kibitz: "target/debug/kibitz".into(),
        source: "fixtures/bigbuckbunny.mp4".into(),
        viewers: vec![0, 1, 10, 50, 100, 200],
        seconds: 10.0,
        warmup: 4.0,
        fps: 25.0,
        threads: 2,
        publish: false,
        bitrate_bps: 2_000_000,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--kibitz" => o.kibitz = value(),
            "--source" => o.source = value(),
            "--viewers" => {
                o.viewers = value()
                    .split(',')
                    .map(|v| v.parse().expect("--viewers 0,1,10"))
                    .collect()
            }
            "--seconds" => o.seconds = value().parse().expect("--seconds N"),
            "--warmup" => o.warmup = value().parse().expect("--warmup N"),
            "--fps" => o.fps = value().parse().expect("--fps N"),
            "--threads" => o.threads = value().parse().expect("--threads N"),
            "--publish" => o.publish = true,
            "--bitrate" => o.bitrate_bps = value().parse().expect("--bitrate BPS"),
            other => panic!("unknown argument {other}; see the example's doc comment"),
        }
    }
    o
}

/// What one viewer has seen so far; read by the measuring loop.
#[derive(Default)]
struct Counters {
    connected: AtomicBool,
    frames: AtomicU64,
    bytes: AtomicU64,
    datagrams: AtomicU64,
}

fn main() {
    let o = options();
    let (mut server, http) = start_server(&o);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.threads)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(measure(&o, server.id(), http));
    let _ = server.kill();
    let _ = server.wait();
}

/// `kibitz serve` on free ports, with nothing but the picture to do.
fn start_server(o: &Options) -> (Child, SocketAddr) {
    let http = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let state = std::env::temp_dir().join(format!("whep_viewers-{}", std::process::id()));
    let mut command = Command::new(&o.kibitz);
    command.arg("serve");
    if !o.publish {
        command.arg("--source").arg(format!("s1={}", o.source));
    }
    let child = command
        .args(["--bind", &http.to_string(), "--webrtc-port", "0"])
        .args([
            "--max-viewers",
            "100000",
            "--history",
            "off",
            "--voice",
            "off",
        ])
        .args([
            "--engine",
            "openai",
            "--engine-url",
            "http://127.0.0.1:9/v1",
        ])
        .args(["--engine-model", "none", "--log", "warn"])
        .arg("--state-dir")
        .arg(&state)
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", o.kibitz));
    (child, http)
}

async fn measure(o: &Options, pid: u32, http: SocketAddr) {
    let client = reqwest::Client::new();
    let base = format!("http://{http}");
    if o.publish {
        let frames = encode_clip(o);
        wait_until(&client, &format!("{base}/healthz")).await;
        let (client, base) = (client.clone(), base.clone());
        let fps = o.fps;
        tokio::spawn(async move {
            if let Err(e) = publish(&client, &base, frames, fps).await {
                eprintln!("the publisher failed: {e}");
            }
        });
    }
    wait_until(&client, &format!("{base}/api/streams/s1")).await;
    println!(
        "{:>7} {:>9} {:>8} {:>8} {:>8} {:>10} {:>10} {:>11} {:>10} {:>10}  load",
        "viewers",
        "connected",
        "min fps",
        "p50 fps",
        "full",
        "Mbit/s p50",
        "+headers",
        "server core",
        "/viewer",
        "client core"
    );
    println!("        (then the 1/5/15-minute load average, and the server's busiest thread)");
    let mut viewers: Vec<Arc<Counters>> = Vec::new();
    let mut tasks = Vec::new();
    let mut previous: Option<(usize, f64)> = None;
    for &n in &o.viewers {
        while viewers.len() < n {
            let counters = Arc::new(Counters::default());
            viewers.push(counters.clone());
            let (client, base) = (client.clone(), base.clone());
            tasks.push(tokio::spawn(async move {
                if let Err(e) = view(&client, &base, &counters).await {
                    eprintln!("a viewer failed: {e}");
                }
            }));
            // A short pause between offers, as page loads come; the sessions all start
            // within the warm-up.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_secs_f64(o.warmup)).await;
        let step = measure_step(o, pid, &viewers).await;
        let per_viewer = previous
            .filter(|&(m, _)| n > m)
            .map(|(m, cores)| (step.server_cores - cores) / (n - m) as f64);
        println!(
            "{n:>7} {:>9} {:>8.1} {:>8.1} {:>8} {:>10.2} {:>10.2} {:>11.3} {:>10} {:>10.3}  {}  {} {:.3}",
            step.connected,
            step.min_fps,
            step.median_fps,
            step.full,
            step.median_mbit,
            step.median_mbit_headers,
            step.server_cores,
            per_viewer.map_or("-".into(), |c| format!("{c:.4}")),
            step.client_cores,
            step.load,
            step.busiest.0,
            step.busiest.1
        );
        previous = Some((n, step.server_cores));
    }
    for task in tasks {
        task.abort();
    }
}

/// Waits (at most a minute) until `url` answers 2xx.
async fn wait_until(client: &reqwest::Client, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = client
            .get(url)
            .send()
            .await
            .map(|r| r.status().is_success());
        if status.unwrap_or(false) {
            return;
        }
        assert!(Instant::now() < deadline, "the server did not come up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Step {
    connected: usize,
    min_fps: f64,
    median_fps: f64,
    /// Viewers at ≥ 95 % of the frame rate.
    full: usize,
    median_mbit: f64,
    median_mbit_headers: f64,
    server_cores: f64,
    client_cores: f64,
    /// The server's busiest thread: its name and cores.
    busiest: (String, f64),
    load: String,
}

async fn measure_step(o: &Options, pid: u32, viewers: &[Arc<Counters>]) -> Step {
    let snapshot = |c: &Counters| {
        (
            c.frames.load(Ordering::Relaxed),
            c.bytes.load(Ordering::Relaxed),
            c.datagrams.load(Ordering::Relaxed),
        )
    };
    let before: Vec<_> = viewers.iter().map(|c| snapshot(c)).collect();
    let threads0 = thread_cpu(pid);
    let (server0, client0, t0) = (
        cpu_seconds(pid),
        cpu_seconds(std::process::id()),
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs_f64(o.seconds)).await;
    let (server1, client1, elapsed) = (
        cpu_seconds(pid),
        cpu_seconds(std::process::id()),
        t0.elapsed().as_secs_f64(),
    );
    let threads1 = thread_cpu(pid);
    let busiest = threads1
        .iter()
        .map(|(tid, (name, cpu))| {
            let before = threads0.get(tid).map_or(0.0, |(_, c)| *c);
            (name.clone(), (cpu - before) / elapsed)
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or_default();
    let mut fps = Vec::new();
    let mut mbit = Vec::new();
    let mut mbit_headers = Vec::new();
    for (c, (frames, bytes, datagrams)) in viewers.iter().zip(before) {
        let (f, b, d) = snapshot(c);
        fps.push((f - frames) as f64 / elapsed);
        mbit.push((b - bytes) as f64 * 8.0 / elapsed / 1e6);
        mbit_headers
            .push((b - bytes + (d - datagrams) * IP_UDP_HEADERS) as f64 * 8.0 / elapsed / 1e6);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    Step {
        connected: viewers
            .iter()
            .filter(|c| c.connected.load(Ordering::Relaxed))
            .count(),
        min_fps: fps.iter().copied().reduce(f64::min).unwrap_or(0.0),
        full: fps.iter().filter(|&&f| f >= 0.95 * o.fps).count(),
        median_fps: median(&mut fps),
        median_mbit: median(&mut mbit),
        median_mbit_headers: median(&mut mbit_headers),
        server_cores: (server1 - server0) / elapsed,
        client_cores: (client1 - client0) / elapsed,
        busiest,
        load: std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default(),
    }
}

/// User + system CPU seconds of process `pid`, all its threads (`/proc/PID/stat`).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the process runs");
    stat_cpu_seconds(&stat)
}

/// Each thread of `pid`: its name and CPU seconds, by thread id.
fn thread_cpu(pid: u32) -> std::collections::HashMap<String, (String, f64)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Default::default();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
            let name = stat[stat.find('(')? + 1..stat.rfind(')')?].to_string();
            let tid = task.file_name().to_string_lossy().into_owned();
            Some((tid, (name, stat_cpu_seconds(&stat))))
        })
        .collect()
}

/// utime + stime of one `/proc/.../stat` line, in seconds.
fn stat_cpu_seconds(stat: &str) -> f64 {
    // The command name (field 2) may hold spaces; the fields after its ')' are plain.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the state (field 3).
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads a constant of the system; no memory is passed.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / per_second
}

/// One WHEP viewer: offers, connects, and counts until the task is aborted.
async fn view(
    client: &reqwest::Client,
    base: &str,
    counters: &Counters,
) -> Result<(), Box<dyn std::error::Error>> {
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    let local = socket.local_addr()?;
    let mut rtc = Rtc::builder()
        .set_crypto_provider(Arc::new(str0m::crypto::from_feature_flags()))
        .clear_codecs()
        .enable_h264(true)
        .enable_opus(true, false)
        .build(Instant::now());
    rtc.add_local_candidate(Candidate::host(local, "udp")?);
    let mut api = rtc.sdp_api();
    api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
    api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
    api.add_channel("kibitz".into());
    let (offer, pending) = api.apply().ok_or("no offer")?;
    let response = client
        .post(format!("{base}/api/streams/s1/whep"))
        .header("content-type", "application/sdp")
        .body(offer.to_sdp_string())
        .send()
        .await?;
    let status = response.status();
    let body = response.text().await?;
    if status.as_u16() != 201 {
        return Err(format!("{status}: {body}").into());
    }
    rtc.sdp_api()
        .accept_answer(pending, SdpAnswer::from_sdp_string(&body)?)?;

    let mut buf = vec![0u8; 2048];
    loop {
        let timeout = loop {
            match rtc.poll_output()? {
                Output::Timeout(t) => break t,
                Output::Transmit(t) => {
                    let _ = socket.send_to(&t.contents, t.destination).await;
                }
                Output::Event(Event::Connected) => {
                    counters.connected.store(true, Ordering::Relaxed)
                }
                Output::Event(Event::MediaData(data))
                    if data.params.spec().codec == Codec::H264 =>
                {
                    counters.frames.fetch_add(1, Ordering::Relaxed);
                }
                Output::Event(_) => {}
            }
        };
        let now = Instant::now();
        let until = timeout.max(now);
        let input = tokio::select! {
            received = socket.recv_from(&mut buf) => Some(received?),
            _ = tokio::time::sleep_until(until.into()) => None,
        };
        let now = Instant::now();
        match input {
            Some((n, source)) => {
                counters.bytes.fetch_add(n as u64, Ordering::Relaxed);
                counters.datagrams.fetch_add(1, Ordering::Relaxed);
                let receive = Receive {
                    proto: Protocol::Udp,
                    source,
                    destination: local,
                    contents: buf[..n].try_into()?,
                };
                rtc.handle_input(Input::Receive(now, receive))?;
            }
            None => rtc.handle_input(Input::Timeout(now))?,
        }
    }
}

/// The clip as H.264 frames (the first a keyframe), encoded once by the server's own encoder
/// from the ffmpeg CLI's RGB frames, so that publishing costs this process little.
fn encode_clip(o: &Options) -> Vec<Vec<u8>> {
    use kibitz_webrtc::codec::{EncoderConfig, H264Encoder};
    use std::io::Read;
    let (width, height) = (1280u32, 720u32);
    let mut ffmpeg = Command::new("ffmpeg")
        .args(["-v", "error", "-i", &o.source, "-vf", "scale=1280:720"])
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("the ffmpeg CLI");
    let mut stdout = ffmpeg.stdout.take().unwrap();
    let mut encoder = H264Encoder::new(EncoderConfig {
        width,
        height,
        fps: o.fps as f32,
        bitrate_bps: o.bitrate_bps,
    })
    .unwrap();
    let mut rgb = vec![0u8; (width * height * 3) as usize];
    let mut frames = Vec::new();
    while stdout.read_exact(&mut rgb).is_ok() {
        let picture = kibitz_media::Picture::Rgb {
            width,
            height,
            pitch: width as usize * 3,
            data: &rgb,
        };
        frames.push(encoder.encode(&picture, frames.is_empty()).unwrap().data);
    }
    let _ = ffmpeg.wait();
    assert!(!frames.is_empty(), "ffmpeg gave no frames of {}", o.source);
    eprintln!(
        "publishing {} frames of {} in a loop",
        frames.len(),
        o.source
    );
    frames
}

/// A WHIP publisher of stream `s1`: sends `frames` in a loop at `fps` until aborted.
async fn publish(
    client: &reqwest::Client,
    base: &str,
    frames: Vec<Vec<u8>>,
    fps: f64,
) -> Result<(), Box<dyn std::error::Error>> {
    use str0m::media::MediaTime;
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    let local = socket.local_addr()?;
    let mut rtc = Rtc::builder()
        .set_crypto_provider(Arc::new(str0m::crypto::from_feature_flags()))
        .clear_codecs()
        .enable_h264(true)
        .build(Instant::now());
    rtc.add_local_candidate(Candidate::host(local, "udp")?);
    let mut api = rtc.sdp_api();
    let mid = api.add_media(MediaKind::Video, Direction::SendOnly, None, None, None);
    let (offer, pending) = api.apply().ok_or("no offer")?;
    let response = client
        .post(format!("{base}/api/streams/s1/whip"))
        .header("content-type", "application/sdp")
        .body(offer.to_sdp_string())
        .send()
        .await?;
    let status = response.status();
    let body = response.text().await?;
    if status.as_u16() != 201 {
        return Err(format!("{status}: {body}").into());
    }
    rtc.sdp_api()
        .accept_answer(pending, SdpAnswer::from_sdp_string(&body)?)?;

    let interval = Duration::from_secs_f64(1.0 / fps);
    let mut next_frame = Instant::now();
    let mut sent: u64 = 0;
    let mut connected = false;
    let mut buf = vec![0u8; 2048];
    loop {
        let timeout = loop {
            match rtc.poll_output()? {
                Output::Timeout(t) => break t,
                Output::Transmit(t) => {
                    let _ = socket.send_to(&t.contents, t.destination).await;
                }
                Output::Event(event) => connected |= matches!(event, Event::Connected),
            }
        };
        let now = Instant::now();
        if now >= next_frame {
            next_frame += interval;
            if connected {
                let writer = rtc.writer(mid).ok_or("no writer")?;
                let pt = writer
                    .payload_params()
                    .find(|p| p.spec().codec == Codec::H264)
                    .ok_or("no H.264")?
                    .pt();
                let frame = frames[(sent % frames.len() as u64) as usize].clone();
                let time = MediaTime::from_90khz((sent as f64 * 90_000.0 / fps) as u64);
                writer.write(pt, now, time, frame)?;
                sent += 1;
            }
            continue;
        }
        let until = timeout.min(next_frame).max(now);
        let input = tokio::select! {
            received = socket.recv_from(&mut buf) => Some(received?),
            _ = tokio::time::sleep_until(until.into()) => None,
        };
        let now = Instant::now();
        match input {
            Some((n, source)) => {
                let receive = Receive {
                    proto: Protocol::Udp,
                    source,
                    destination: local,
                    contents: buf[..n].try_into()?,
                };
                rtc.handle_input(Input::Receive(now, receive))?;
            }
            None => rtc.handle_input(Input::Timeout(now))?,
        }
    }
}
