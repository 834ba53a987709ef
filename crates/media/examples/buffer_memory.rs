//! Display-buffer memory for a 720p25 stream after 15 s and after 10 minutes, simulated
//! faster than real time: the JPEGs of one loop of the file (encoded by the real source
//! path) are pushed again and again with fake 25 fps stamps, each as its own copy so the
//! process's memory grows as it would with distinct frames.
//!
//! cargo run --release -p kibitz-media --example buffer_memory -- fixtures/bigbuckbunny.mp4

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kibitz_frames::{DisplayBuffer, InferenceWindow, Jpeg, Stamp, DISPLAY_BUFFER_SECONDS};
use kibitz_media::{SourceConfig, SourceContext, SourceSpec};

fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<usize>()
        .unwrap()
        * 1024
}

fn mb(b: usize) -> f64 {
    b as f64 / 1e6
}

fn main() {
    let file = std::env::args().nth(1).expect("usage: buffer_memory FILE");
    // One loop of real display JPEGs from the real source.
    let sample = Arc::new(DisplayBuffer::new(Duration::from_secs(600)));
    let mut source = SourceConfig::new(SourceSpec::parse(&file).unwrap())
        .build(SourceContext::new(
            sample.clone(),
            Arc::new(InferenceWindow::new(1)),
        ))
        .unwrap();
    while source.status().loops < 1 {
        std::thread::sleep(Duration::from_millis(50));
    }
    source.stop();
    let jpegs: Vec<Jpeg> = sample.since(None).into_iter().map(|f| f.jpeg).collect();
    let (w, h) = (jpegs[0].width, jpegs[0].height);
    let mean = jpegs.iter().map(|j| j.bytes.len()).sum::<usize>() / jpegs.len();
    drop(sample);
    println!(
        "{file}: {} JPEGs of {w}x{h}, {:.1} kB on average",
        jpegs.len(),
        mean as f64 / 1e3
    );

    let fps = 25u32;
    let rss0 = rss_bytes();
    let buffer = DisplayBuffer::new(Duration::from_secs_f64(DISPLAY_BUFFER_SECONDS));
    let t0 = Instant::now();
    let mut pushed = 0u32;
    for seconds in [15u32, 600] {
        while pushed < seconds * fps {
            let j = &jpegs[pushed as usize % jpegs.len()];
            let at = Duration::from_secs(1) * pushed / fps;
            let copy = Jpeg {
                width: j.width,
                height: j.height,
                bytes: Bytes::copy_from_slice(&j.bytes),
            };
            buffer.push(
                Stamp {
                    pts: at,
                    captured: t0 + at,
                },
                copy,
            );
            pushed += 1;
        }
        println!(
            "after {seconds:>3} s of {fps} fps: {} frames held ({:.1} s), JPEG bytes {:.1} MB, process RSS grew {:.1} MB",
            buffer.len(),
            buffer.duration().as_secs_f64(),
            mb(buffer.bytes()),
            mb(rss_bytes().saturating_sub(rss0)),
        );
    }
}
