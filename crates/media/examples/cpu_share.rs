//! CPU share of one source: decode + display JPEG (+ the 2 fps model copy), measured as
//! (user + sys CPU time) / wall time of this process with getrusage, so other load on the
//! machine does not count against it.
//!
//! cargo run --release -p kibitz-media --example cpu_share -- FILE [SECONDS] [--no-capture]
//!     [--max-width W] [--save DIR]

use std::sync::Arc;
use std::time::{Duration, Instant};

use kibitz_frames::{DisplayBuffer, InferenceWindow, DISPLAY_BUFFER_SECONDS, WINDOW_SIZE};
use kibitz_media::{SourceConfig, SourceContext, SourceSpec, SourceState};

fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut file = None;
    let mut seconds = 20.0;
    let mut capture = true;
    let mut max_width = None;
    let mut save = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--no-capture" => capture = false,
            "--max-width" => max_width = args.next().and_then(|w| w.parse().ok()),
            "--save" => save = args.next(),
            _ if file.is_none() => file = Some(arg),
            _ => seconds = arg.parse().expect("SECONDS is a number"),
        }
    }
    let file =
        file.expect("usage: cpu_share FILE [SECONDS] [--no-capture] [--max-width W] [--save DIR]");

    let mut config = SourceConfig::new(SourceSpec::parse(&file).unwrap());
    config.display_max_width = max_width;
    if !capture {
        config.capture_fps = 0.0;
    }
    let display = Arc::new(DisplayBuffer::new(Duration::from_secs_f64(
        DISPLAY_BUFFER_SECONDS,
    )));
    let window = Arc::new(InferenceWindow::new(WINDOW_SIZE));
    let source = config
        .build(SourceContext::new(display.clone(), window.clone()))
        .unwrap_or_else(|e| {
            eprintln!("kibitz: {e}");
            std::process::exit(1)
        });
    while source.status().state != SourceState::Live {
        std::thread::sleep(Duration::from_millis(10));
    }
    // Let the decoder threads and buffers settle before measuring.
    std::thread::sleep(Duration::from_secs(2));

    let (c0, t0, f0) = (cpu_time(), Instant::now(), source.status().frames_decoded);
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let (c1, t1, status) = (cpu_time(), Instant::now(), source.status());
    let cpu = (c1 - c0).as_secs_f64();
    let wall = (t1 - t0).as_secs_f64();
    let frames = status.frames_decoded - f0;
    println!(
        "{file}: {}x{} {} @ {:.2} fps source, {frames} frames in {wall:.1} s = {:.2} fps; \
         CPU {cpu:.2} s = {:.3} cores, {:.2} ms a frame; capture {}; dropped {}; loops {}",
        status.width,
        status.height,
        status.codec.as_deref().unwrap_or("?"),
        status.source_fps.unwrap_or(0.0),
        frames as f64 / wall,
        cpu / wall,
        cpu * 1000.0 / frames.max(1) as f64,
        if capture { "on (2 fps)" } else { "off" },
        status.frames_dropped,
        status.loops,
    );
    if let Some(dir) = save {
        let frame = display.latest().unwrap();
        std::fs::write(format!("{dir}/display.jpg"), &frame.jpeg.bytes).unwrap();
        if let Some((_, rgb)) = window.latest() {
            let header = format!("P6\n{} {}\n255\n", rgb.width, rgb.height);
            std::fs::write(
                format!("{dir}/model.ppm"),
                [header.as_bytes(), &rgb.data].concat(),
            )
            .unwrap();
        }
    }
}
