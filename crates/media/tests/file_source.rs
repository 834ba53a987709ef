//! File sources against the fixtures made by `scripts/fixtures.sh`. Bounds are loose on
//! purpose: these run on a loaded 2-core CI box; speed is measured in the benchmarks.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use kibitz_frames::{model_size, DisplayBuffer, InferenceWindow, Stamp, WINDOW_SIZE};
use kibitz_media::{Error, Source, SourceConfig, SourceContext, SourceSpec, SourceState};

mod fixture;
use fixture::fixture;

struct Running {
    source: Source,
    display: Arc<DisplayBuffer>,
    window: Arc<InferenceWindow>,
    states: mpsc::Receiver<SourceState>,
}

fn start_with(
    name: &str,
    span: Duration,
    tweak: impl FnOnce(&mut SourceConfig),
) -> Result<Running, Error> {
    let spec = SourceSpec::parse(fixture(name).to_str().unwrap()).unwrap();
    let mut config = SourceConfig::new(spec);
    tweak(&mut config);
    let display = Arc::new(DisplayBuffer::new(span));
    let window = Arc::new(InferenceWindow::new(WINDOW_SIZE));
    let (tx, states) = mpsc::channel();
    let cx = SourceContext::new(display.clone(), window.clone()).on_state(move |s| {
        let _ = tx.send(s.clone());
    });
    let source = config.build(cx)?;
    Ok(Running {
        source,
        display,
        window,
        states,
    })
}

fn start(name: &str) -> Running {
    start_with(name, Duration::from_secs(15), |_| {}).unwrap()
}

/// Polls `cond` until it holds; panics with `what` after a generous minute.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_live(r: &Running) {
    wait_for("live", || r.source.status().state == SourceState::Live);
}

#[test]
fn file_plays_at_about_native_rate() {
    let r = start("testsrc2-360p25.mp4");
    wait_live(&r);
    let s0 = r.source.status();
    let first = r.display.latest().unwrap();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let s1 = r.source.status();
    let last = r.display.latest().unwrap();
    let wall = t0.elapsed().as_secs_f64();
    let frames = (s1.frames_decoded - s0.frames_decoded) as f64;
    // 25 fps: never faster than the file's rate; slower only if the box is starved.
    assert!(
        frames <= 25.0 * wall * 1.15 + 3.0,
        "{frames} frames in {wall:.1} s: faster than 25 fps"
    );
    assert!(
        frames >= 25.0 * wall * 0.25,
        "{frames} frames in {wall:.1} s: far too slow"
    );
    // Media time never runs ahead of wall time (both read off the frames themselves; it
    // falls behind only when the box cannot decode in real time).
    let media = (last.stamp.pts - first.stamp.pts).as_secs_f64();
    let shown = (last.stamp.captured - first.stamp.captured).as_secs_f64();
    assert!(
        media <= shown * 1.15 + 0.2,
        "media {media:.2} s shown in {shown:.2} s"
    );
    assert!(media > 0.0);
    assert_eq!(s1.codec.as_deref(), Some("h264"));
    assert_eq!((s1.width, s1.height), (640, 360));
    assert_eq!(s1.source_fps, Some(25.0));
    assert!(!s1.passthrough);
    assert_eq!(s1.kind, "file");
    assert!(
        s1.measured_fps.is_some_and(|f| f > 2.0 && f < 30.0),
        "{:?}",
        s1.measured_fps
    );
    // The display frames are JPEGs of the picture.
    assert_eq!(&last.jpeg.bytes[..2], &[0xFF, 0xD8]);
    assert_eq!((last.jpeg.width, last.jpeg.height), (640, 360));
    // Live was announced once.
    assert_eq!(
        r.states.try_iter().collect::<Vec<_>>(),
        vec![SourceState::Live]
    );
}

#[test]
fn file_loops_with_growing_pts() {
    let r = start("short-1s.mp4");
    wait_live(&r);
    let mut seen: Vec<Stamp> = Vec::new();
    wait_for("two loops", || {
        if let Some(f) = r.display.latest() {
            if seen.last() != Some(&f.stamp) {
                seen.push(f.stamp);
            }
        }
        r.source.status().loops >= 2
    });
    let status = r.source.status();
    assert_eq!(
        status.state,
        SourceState::Live,
        "looping never ends the source"
    );
    assert!(
        seen.windows(2).all(|w| w[0].pts < w[1].pts),
        "pts only grow: {seen:?}"
    );
    assert!(seen.windows(2).all(|w| w[0].captured < w[1].captured));
    // Two loops of a 1 s clip: media time is past 2 s, with no gap at the seams.
    let latest = r.display.latest().unwrap().stamp.pts;
    assert!(latest >= Duration::from_millis(1900), "{latest:?}");
    let max_step = seen.windows(2).map(|w| w[1].pts - w[0].pts).max().unwrap();
    assert!(max_step < Duration::from_millis(500), "{max_step:?}");
}

#[test]
fn display_buffer_stays_bounded() {
    let r = start_with("testsrc2-360p25.mp4", Duration::from_secs(1), |_| {}).unwrap();
    wait_live(&r);
    wait_for("3 s of frames", || r.source.status().frames_decoded >= 60);
    for _ in 0..20 {
        assert!(
            r.display.duration() <= Duration::from_secs(1),
            "{:?}",
            r.display.duration()
        );
        assert!(
            r.display.len() <= 40,
            "{} frames held for 1 s of 25 fps",
            r.display.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let avg = r.display.bytes() / r.display.len();
    assert!(avg > 1000 && avg < 500_000, "{avg} bytes a 360p frame");
}

#[test]
fn inference_window_at_capture_rate_and_model_size() {
    let r = start_with("testsrc2-360p25.mp4", Duration::from_secs(15), |c| {
        c.max_slices = 1;
        c.capture_fps = 2.0;
    })
    .unwrap();
    wait_live(&r);
    wait_for("6 model frames", || r.window.len() >= 6);
    let frames = r.window.sample(WINDOW_SIZE, 1);
    let (w, h) = model_size(640, 360, 1);
    for (_, rgb) in &frames {
        assert_eq!((rgb.width, rgb.height), (w, h));
        assert_eq!(rgb.data.len(), (w * h * 3) as usize);
    }
    // About 2 a second: never closer than half a period, and 2 a second on average unless
    // the box is too starved to show 2 frames a second at all.
    for pair in frames.windows(2) {
        let shown = pair[1].0.captured - pair[0].0.captured;
        assert!(
            shown >= Duration::from_millis(250),
            "{shown:?} between captures"
        );
        assert!(pair[1].0.pts > pair[0].0.pts);
    }
    let (first, last) = (frames[0].0, frames[frames.len() - 1].0);
    let mean = (last.captured - first.captured).as_secs_f64() / (frames.len() - 1) as f64;
    assert!(
        (0.45..5.0).contains(&mean),
        "{mean:.3} s between captures on average"
    );
    let status = r.source.status();
    assert!(status.frames_captured >= 6);
    assert!(status.frames_captured < status.frames_decoded);
    assert_eq!(r.window.seq(), Some(status.frames_captured - 1));
}

#[test]
fn mjpeg_passes_through_untouched() {
    let path = fixture("mjpeg.avi");
    // The file's own JPEGs, read with FFmpeg directly.
    ffmpeg_next::init().unwrap();
    let mut input = ffmpeg_next::format::input(&path).unwrap();
    let packets: HashSet<Vec<u8>> = input
        .packets()
        .filter_map(|(_, p)| p.data().map(<[u8]>::to_vec))
        .collect();
    assert!(packets.len() >= 30);

    let r = start("mjpeg.avi");
    wait_live(&r);
    let mut seen = HashSet::new();
    wait_for("10 distinct frames", || {
        if let Some(f) = r.display.latest() {
            assert!(
                packets.contains(f.jpeg.bytes.as_ref()),
                "frame {} is not a source packet",
                f.seq
            );
            assert_eq!((f.jpeg.width, f.jpeg.height), (640, 360));
            seen.insert(f.seq);
        }
        seen.len() >= 10
    });
    let status = r.source.status();
    assert!(status.passthrough);
    assert_eq!(status.codec.as_deref(), Some("mjpeg"));
    // The model still gets decoded RGB.
    wait_for("a model frame", || !r.window.is_empty());
    assert_eq!(
        r.window.latest().unwrap().1.width,
        model_size(640, 360, 1).0
    );
}

#[test]
fn raw_mjpeg_file_plays() {
    let r = start("clip.mjpeg");
    wait_live(&r);
    wait_for("frames", || r.source.status().frames_decoded >= 10);
    assert!(r.source.status().passthrough);
}

#[test]
fn missing_and_broken_files_fail_at_start() {
    let display = Arc::new(DisplayBuffer::new(Duration::from_secs(1)));
    let window = Arc::new(InferenceWindow::new(4));
    let build = |path: PathBuf| {
        let spec = SourceSpec::File(path);
        SourceConfig::new(spec).build(SourceContext::new(display.clone(), window.clone()))
    };
    let missing = fixture("short-1s.mp4").with_file_name("no-such-file.mp4");
    let err = build(missing.clone()).unwrap_err();
    assert!(matches!(err, Error::Open { .. }));
    assert_eq!(
        err.to_string(),
        format!(
            "cannot open '{}': No such file or directory",
            missing.display()
        )
    );

    for name in ["truncated.mp4", "not-video.mp4"] {
        let err = build(fixture(name)).unwrap_err();
        assert!(matches!(err, Error::Open { .. }), "{name}: {err}");
        assert!(err.to_string().contains("Invalid data"), "{name}: {err}");
    }
    let err = build(fixture("audio-only.m4a")).unwrap_err();
    assert!(matches!(err, Error::NoVideo { .. }), "{err}");
    assert!(display.is_empty());
}

#[test]
fn damage_mid_file_is_skipped() {
    let r = start("damaged.mp4");
    wait_live(&r);
    // 4 s at 25 fps, damage in the middle: playing on past it and around again.
    wait_for("a full loop", || r.source.status().loops >= 1);
    let status = r.source.status();
    assert_eq!(status.state, SourceState::Live);
    assert!(status.frames_decoded >= 60, "{status:?}");
}

#[test]
fn no_loop_ends() {
    let r = start_with("short-1s.mp4", Duration::from_secs(15), |c| {
        c.looping = false
    })
    .unwrap();
    wait_for("ended", || r.source.status().state == SourceState::Ended);
    wait_for("the thread to end", || r.source.is_finished());
    let states: Vec<_> = r.states.try_iter().collect();
    assert_eq!(states, vec![SourceState::Live, SourceState::Ended]);
    assert_eq!(r.source.status().loops, 0);
}

#[test]
fn display_max_width_shrinks() {
    let r = start_with("testsrc2-720p25.mp4", Duration::from_secs(15), |c| {
        c.display_max_width = Some(640)
    })
    .unwrap();
    wait_live(&r);
    let f = r.display.latest().unwrap();
    assert_eq!((f.jpeg.width, f.jpeg.height), (640, 360));
    let header = jpeg_size(&f.jpeg.bytes);
    assert_eq!(header, (640, 360));
}

#[test]
fn a_source_over_the_pixel_cap_is_decoded_and_shown_downscaled() {
    for name in ["testsrc2-720p25.mp4", "mjpeg.avi"] {
        let r = start_with(name, Duration::from_secs(15), |c| {
            c.max_pixels = Some(320 * 180)
        })
        .unwrap();
        wait_live(&r);
        let f = r.display.latest().unwrap();
        let header = jpeg_size(&f.jpeg.bytes);
        assert!(header.0 * header.1 <= 320 * 180, "{name}: {header:?}");
        let status = r.source.status();
        assert_eq!(status.fitted, Some(header), "{name}");
        assert!(
            !status.passthrough,
            "{name}: an MJPEG over the cap is not passed through"
        );
        assert!(
            status.width * status.height > 320 * 180,
            "the source's own size"
        );
    }
}

/// Width and height from the JPEG's own frame header.
fn jpeg_size(jpeg: &[u8]) -> (u32, u32) {
    let mut at = 2;
    loop {
        let marker = jpeg[at + 1];
        let len = u16::from_be_bytes([jpeg[at + 2], jpeg[at + 3]]) as usize;
        if (0xC0..=0xC2).contains(&marker) {
            let h = u16::from_be_bytes([jpeg[at + 5], jpeg[at + 6]]);
            let w = u16::from_be_bytes([jpeg[at + 7], jpeg[at + 8]]);
            return (u32::from(w), u32::from(h));
        }
        at += 2 + len;
    }
}

#[test]
fn stop_is_prompt_and_idempotent() {
    let mut r = start("testsrc2-360p25.mp4");
    wait_live(&r);
    r.source.stop();
    assert!(r.source.is_finished());
    r.source.stop();
    let n = r.display.len();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(r.display.len(), n, "no frames after stop");
}
