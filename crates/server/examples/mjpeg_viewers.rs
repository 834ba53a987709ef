//! Benchmark: how many MJPEG viewers of a 720p25 stream the server keeps at full rate.
//!
//! The server runs one stream of a pattern source showing ~100 KB 1280x720 JPEGs at 25 fps
//! (real stream, registry and playout; a scripted engine); raw TCP
//! viewers read `/api/mjpeg` as fast as they can and count parts. For each number of
//! viewers it warms up, then measures every viewer's frame rate and the CPU time the
//! server's threads used. "Full rate" means every viewer got at least 95 % of 25 fps.
//!
//! ```text
//! # one process, server and viewers sharing the machine (the pessimistic number):
//! cargo run --release -p kibitz-server --example mjpeg_viewers -- both --viewers 50,100,200,300
//! # or two processes, e.g. pinned apart:
//! taskset -c 0,1 mjpeg_viewers serve --bind 127.0.0.1:8299 &
//! taskset -c 2-15 mjpeg_viewers watch --url 127.0.0.1:8299 --server-pid $! --viewers 200,400
//! ```
//! Results and how they were taken: `docs/benchmarks.md` (MJPEG viewers).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kibitz_server::fake::{pattern_jpeg, Harness, Options as HarnessOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLOSING: &[u8] = b"\r\n--kibitzframe\r\n";

struct Options {
    role: String,
    bind: SocketAddr,
    url: Option<SocketAddr>,
    viewers: Vec<usize>,
    seconds: f64,
    warmup: f64,
    fps: f64,
    threads: usize,
    jpeg_bytes: usize,
    server_pid: Option<u32>,
}

fn options() -> Options {
    let mut o = Options {
        role: "both".into(),
        bind: "127.0.0.1:0".parse().unwrap(),
        url: None,
        viewers: vec![50, 100, 200, 300],
        seconds: 10.0,
        warmup: 3.0,
        fps: 25.0,
        threads: 2,
        jpeg_bytes: 100_000,
        server_pid: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "serve" | "watch" | "both" => o.role = arg.clone(),
            "--bind" => o.bind = value().parse().expect("--bind HOST:PORT"),
            "--url" => o.url = Some(value().parse().expect("--url HOST:PORT")),
            "--viewers" => {
                o.viewers = value()
                    .split(',')
                    .map(|v| v.parse().expect("--viewers 50,100"))
                    .collect()
            }
            "--seconds" => o.seconds = value().parse().expect("--seconds N"),
            "--warmup" => o.warmup = value().parse().expect("--warmup N"),
            "--fps" => o.fps = value().parse().expect("--fps N"),
            "--threads" => o.threads = value().parse().expect("--threads N"),
            "--jpeg-bytes" => o.jpeg_bytes = value().parse().expect("--jpeg-bytes N"),
            "--server-pid" => o.server_pid = Some(value().parse().expect("--server-pid PID")),
            other => panic!("unknown argument {other}; see the example's doc comment"),
        }
    }
    o
}

fn main() {
    let o = options();
    match o.role.as_str() {
        "serve" => {
            let addr = start_server(&o);
            eprintln!("serving {addr}; Ctrl-C to stop");
            loop {
                std::thread::park();
            }
        }
        "watch" => watch(
            &o,
            o.url.expect("watch needs --url"),
            o.server_pid.map(Cpu::Process),
        ),
        _ => {
            let addr = start_server(&o);
            watch(&o, addr, Some(Cpu::Threads("kibitz-srv")));
        }
    }
}

/// Starts the server on its own runtime (threads named `kibitz-srv`) and returns its address.
fn start_server(o: &Options) -> SocketAddr {
    let jpegs = jpegs(o.jpeg_bytes);
    eprintln!(
        "pictures: {} JPEGs of 1280x720, {}..{} bytes, at {} fps",
        jpegs.len(),
        jpegs.iter().map(|j| j.bytes.len()).min().unwrap(),
        jpegs.iter().map(|j| j.bytes.len()).max().unwrap(),
        o.fps
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.threads)
        .thread_name("kibitz-srv")
        .enable_all()
        .build()
        .unwrap();
    let fps = o.fps;
    let bind = o.bind;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        runtime.block_on(async move {
            let harness = Harness::with(HarnessOptions {
                fps,
                pictures: Some(jpegs),
                ..HarnessOptions::default()
            })
            .await;
            let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            kibitz_server::serve(listener, harness.state.clone())
                .await
                .unwrap();
        })
    });
    rx.recv().unwrap()
}

/// Eight different pictures with grain chosen so the first is close to `target` bytes.
fn jpegs(target: usize) -> Vec<kibitz_frames::Jpeg> {
    let (mut low, mut high) = (0u8, 255u8);
    while low < high {
        let mid = low + (high - low) / 2;
        if pattern_jpeg(1280, 720, 0, mid).bytes.len() < target {
            low = mid + 1;
        } else {
            high = mid;
        }
    }
    (0..8).map(|i| pattern_jpeg(1280, 720, i, low)).collect()
}

/// Whose CPU time to report.
enum Cpu {
    /// Threads of this process whose name starts with this.
    Threads(&'static str),
    Process(u32),
}

impl Cpu {
    /// User + system seconds so far.
    fn seconds(&self) -> f64 {
        // /proc reports clock ticks of USER_HZ, which Linux fixes at 100.
        let ticks = |stat: &str| -> u64 {
            let after = &stat[stat.rfind(')').unwrap() + 2..];
            let fields: Vec<&str> = after.split(' ').collect();
            fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
        };
        match self {
            Cpu::Process(pid) => {
                ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap()) as f64 / 100.0
            }
            Cpu::Threads(prefix) => {
                let mut total = 0;
                for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
                    let name =
                        std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
                    if name.starts_with(prefix) {
                        total += ticks(
                            &std::fs::read_to_string(task.path().join("stat")).unwrap_or_default(),
                        );
                    }
                }
                total as f64 / 100.0
            }
        }
    }
}

fn watch(o: &Options, addr: SocketAddr, cpu: Option<Cpu>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.threads)
        .thread_name("viewer")
        .enable_all()
        .build()
        .unwrap();
    println!("| viewers | total fps | min fps | median fps | at full rate | server CPU (cores) | viewers' CPU (cores) | Gbit/s | load avg |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for &n in &o.viewers {
        runtime.block_on(async {
            let counts: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
            let bytes = Arc::new(AtomicU64::new(0));
            let tasks: Vec<_> = (0..n)
                .map(|i| tokio::spawn(viewer(addr, counts.clone(), bytes.clone(), i)))
                .collect();
            tokio::time::sleep(Duration::from_secs_f64(o.warmup)).await;
            let before: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
            let bytes_before = bytes.load(Ordering::Relaxed);
            let cpu_before = cpu.as_ref().map(Cpu::seconds);
            let viewers_cpu_before = Cpu::Threads("viewer").seconds();
            let start = Instant::now();
            tokio::time::sleep(Duration::from_secs_f64(o.seconds)).await;
            let elapsed = start.elapsed().as_secs_f64();
            let cpu_used = cpu
                .as_ref()
                .map(|c| (c.seconds() - cpu_before.unwrap()) / elapsed);
            let viewers_cpu = (Cpu::Threads("viewer").seconds() - viewers_cpu_before) / elapsed;
            let mut rates: Vec<f64> = counts
                .iter()
                .zip(&before)
                .map(|(c, b)| (c.load(Ordering::Relaxed) - b) as f64 / elapsed)
                .collect();
            let gbit = (bytes.load(Ordering::Relaxed) - bytes_before) as f64 * 8.0 / elapsed / 1e9;
            for task in tasks {
                task.abort();
            }
            rates.sort_by(f64::total_cmp);
            let full = rates.iter().filter(|r| **r >= 0.95 * o.fps).count();
            // Other work on the machine skews the numbers; the 1-minute load shows how much.
            let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
            println!(
                "| {n} | {:.0} | {:.1} | {:.1} | {full}/{n} | {} | {viewers_cpu:.2} | {gbit:.2} | {} |",
                rates.iter().sum::<f64>(),
                rates[0],
                rates[n / 2],
                cpu_used.map_or("–".to_string(), |c| format!("{c:.2}")),
                load.split(' ').next().unwrap_or("?"),
            );
            // Let the server notice the closed viewers before the next round.
            tokio::time::sleep(Duration::from_millis(500)).await;
        });
    }
}

/// Reads one MJPEG stream as fast as possible, counting parts.
async fn viewer(
    addr: SocketAddr,
    counts: Arc<Vec<AtomicU64>>,
    bytes: Arc<AtomicU64>,
    index: usize,
) {
    let mut socket = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the server");
    socket
        .write_all(b"GET /api/mjpeg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let finder = memchr::memmem::Finder::new(CLOSING);
    let mut buf = vec![0u8; 256 * 1024];
    let mut carry = 0;
    loop {
        let read = match socket.read(&mut buf[carry..]).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        bytes.fetch_add(read as u64, Ordering::Relaxed);
        let filled = carry + read;
        counts[index].fetch_add(
            finder.find_iter(&buf[..filled]).count() as u64,
            Ordering::Relaxed,
        );
        let keep = (CLOSING.len() - 1).min(filled);
        buf.copy_within(filled - keep..filled, 0);
        carry = keep;
    }
}
