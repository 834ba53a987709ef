//! Nothing kept: a file source opened, played a moment and stopped many times leaves no
//! heap behind. The heap is glibc's own count of bytes handed out (`mallinfo2`), not RSS,
//! so freed-but-kept pages and timing do not blur it. Alone in its binary: no other test's
//! allocations count.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kibitz_frames::{DisplayBuffer, InferenceWindow, WINDOW_SIZE};
use kibitz_media::{SourceConfig, SourceContext, SourceSpec};

mod fixture;
use fixture::fixture;

/// Bytes malloc has handed out and not had back, over every arena and mmapped chunk.
fn heap_in_use() -> usize {
    // SAFETY: `mallinfo2` only reads the allocator's counters (it takes each arena's lock
    // itself) and returns a plain struct by value; it has no preconditions.
    let info = unsafe { libc::mallinfo2() };
    info.uordblks + info.hblkhd
}

/// Opens the file, waits for a few frames, stops it.
fn play_once(name: &str) {
    let spec = SourceSpec::parse(fixture(name).to_str().unwrap()).unwrap();
    let display = Arc::new(DisplayBuffer::new(Duration::from_secs(15)));
    let window = Arc::new(InferenceWindow::new(WINDOW_SIZE));
    let source = SourceConfig::new(spec)
        .build(SourceContext::new(display, window))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while source.status().frames_decoded < 3 {
        assert!(Instant::now() < deadline, "no frames from {name}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_file_source_opened_and_stopped_30_times_keeps_no_memory() {
    const ROUNDS: usize = 30;
    // The first rounds make what FFmpeg makes once (codec tables, the scaler's caches).
    for _ in 0..3 {
        play_once("bigbuckbunny.mp4");
    }
    let before = heap_in_use();
    for _ in 0..ROUNDS {
        play_once("bigbuckbunny.mp4");
    }
    let after = heap_in_use();
    let per_round = after.saturating_sub(before) / ROUNDS;
    // Before the fix each open kept its probe's packets: ~240 KB here.
    assert!(
        per_round < 16 * 1024,
        "{per_round} bytes kept per open ({before} -> {after})"
    );
}
