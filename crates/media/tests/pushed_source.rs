//! A pushed source: frames handed over in process (planes or JPEGs, with their capture
//! times) come out as the FFmpeg sources' do: display JPEGs, model copies at the capture
//! rate, sampled-frame notices, counters and states.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kibitz_frames::YuvPlanes;
use kibitz_frames::{DisplayBuffer, InferenceWindow, JpegEncoder, Range, Rgb, Stamp, Subsampling};
use kibitz_media::{Error, Picture, PushedSource, SinkConfig, SourceContext, SourceState, PUSHED};

struct Fed {
    source: PushedSource,
    display: Arc<DisplayBuffer>,
    window: Arc<InferenceWindow>,
    states: Arc<Mutex<Vec<&'static str>>>,
    sampled: Arc<Mutex<Vec<u64>>>,
}

fn pushed(config: SinkConfig) -> Fed {
    let display = Arc::new(DisplayBuffer::new(Duration::from_secs(15)));
    let window = Arc::new(InferenceWindow::new(32));
    let states = Arc::new(Mutex::new(Vec::new()));
    let sampled = Arc::new(Mutex::new(Vec::new()));
    let cx = SourceContext::new(display.clone(), window.clone())
        .on_state({
            let states = states.clone();
            move |s| states.lock().unwrap().push(s.name())
        })
        .on_sampled(2, {
            let sampled = sampled.clone();
            move |seq, _, rgb| {
                assert!(rgb.width > 0);
                sampled.lock().unwrap().push(seq)
            }
        });
    Fed {
        source: PushedSource::new(config, cx).unwrap(),
        display,
        window,
        states,
        sampled,
    }
}

/// A 4:2:0 picture, limited range, with rows padded to `stride`.
struct Planes {
    width: u32,
    height: u32,
    stride: usize,
    y: Vec<u8>,
    uv: Vec<u8>,
}

impl Planes {
    fn new(width: u32, height: u32) -> Planes {
        let stride = width as usize + 16;
        let rows = height as usize;
        let y = (0..stride * rows).map(|i| (16 + i % 200) as u8).collect();
        let uv = vec![128u8; stride * rows.div_ceil(2)];
        Planes {
            width,
            height,
            stride,
            y,
            uv,
        }
    }

    fn picture(&self) -> Picture<'_> {
        Picture::Yuv(YuvPlanes {
            width: self.width,
            height: self.height,
            y: &self.y,
            u: &self.uv,
            v: &self.uv,
            y_stride: self.stride,
            u_stride: self.stride,
            v_stride: self.stride,
            subsampling: Subsampling::S420,
            range: Range::Limited,
        })
    }
}

fn stamp(t0: Instant, k: u32) -> Stamp {
    // 10 frames a second.
    let at = Duration::from_millis(100) * k;
    Stamp {
        pts: at,
        captured: t0 + at,
    }
}

#[test]
fn planes_become_display_jpegs_and_model_copies_at_the_capture_rate() {
    let fed = pushed(SinkConfig {
        display_max_width: Some(320),
        ..SinkConfig::new()
    });
    assert_eq!(fed.source.status().state, SourceState::Connecting);
    assert_eq!(fed.source.status().kind, PUSHED);
    let mut sink = fed.source.publish().unwrap();
    let planes = Planes::new(640, 360);
    let t0 = Instant::now();
    // Three seconds at 10 fps; the model takes 2 a second (the default capture rate).
    for k in 0..30 {
        sink.push(planes.picture(), stamp(t0, k)).unwrap();
    }
    let status = fed.source.status();
    assert_eq!(status.state, SourceState::Live);
    assert_eq!(status.frames_decoded, 30);
    assert_eq!(status.frames_captured, 6);
    assert_eq!(fed.window.len(), 6);
    assert_eq!((status.width, status.height), (640, 360));
    let shown = fed.display.latest().unwrap();
    assert_eq!(
        (shown.jpeg.width, shown.jpeg.height),
        (320, 180),
        "shrunk for viewers"
    );
    assert_eq!(&shown.jpeg.bytes[..2], &[0xFF, 0xD8]);
    assert_eq!(shown.stamp, stamp(t0, 29));
    // The model's copy is model-sized (one 448 slice at most) and taken by capture time.
    let (taken, rgb) = fed.window.latest().unwrap();
    assert_eq!(taken, stamp(t0, 25));
    assert!(rgb.width <= 448 + 28 && rgb.width > rgb.height, "{rgb:?}");
    // Every second capture (stride 2) was announced, as the window numbered it.
    assert_eq!(*fed.sampled.lock().unwrap(), [0, 2, 4]);
    drop(sink);
    assert_eq!(fed.source.status().state, SourceState::Ended);
    assert_eq!(*fed.states.lock().unwrap(), ["live", "ended"]);
}

#[test]
fn jpegs_pass_through_untouched_and_rgb_is_taken_too() {
    let fed = pushed(SinkConfig::new());
    let mut sink = fed.source.publish().unwrap();
    let rgb = Rgb::new(64, 48, vec![90u8; 64 * 48 * 3]).unwrap();
    let jpeg = JpegEncoder::new(80).unwrap().encode_rgb(&rgb).unwrap();
    let t0 = Instant::now();
    sink.push(Picture::Jpeg(jpeg.bytes.clone()), stamp(t0, 0))
        .unwrap();
    let shown = fed.display.latest().unwrap();
    assert_eq!(shown.jpeg.bytes, jpeg.bytes, "passed through as sent");
    assert!(fed.source.status().passthrough);
    assert_eq!(fed.window.len(), 1, "decoded for the model");
    let (_, model) = fed.window.latest().unwrap();
    assert!(model.data.iter().all(|v| v.abs_diff(90) <= 3), "{model:?}");

    let pitch = 64 * 3 + 8;
    let padded = vec![200u8; pitch * 48];
    sink.push(
        Picture::Rgb {
            width: 64,
            height: 48,
            pitch,
            data: &padded,
        },
        stamp(t0, 5),
    )
    .unwrap();
    assert_eq!(fed.display.len(), 2);
    assert_eq!(fed.window.len(), 2);
    let (_, model) = fed.window.latest().unwrap();
    assert!(model.data.iter().all(|v| v.abs_diff(200) <= 2), "{model:?}");
}

#[test]
fn bad_pictures_are_refused_counted_and_the_source_goes_on() {
    let fed = pushed(SinkConfig::new());
    let mut sink = fed.source.publish().unwrap();
    let t0 = Instant::now();
    let short = vec![0u8; 10];
    let refused = sink.push(
        Picture::Rgb {
            width: 64,
            height: 48,
            pitch: 64 * 3,
            data: &short,
        },
        stamp(t0, 0),
    );
    assert!(
        matches!(&refused, Err(Error::Picture(m)) if m.contains("too small")),
        "{refused:?}"
    );
    let garbage = sink.push(
        Picture::Jpeg(Bytes::from_static(b"not a jpeg")),
        stamp(t0, 1),
    );
    assert!(matches!(garbage, Err(Error::Picture(_))), "{garbage:?}");
    let status = fed.source.status();
    assert_eq!(status.frames_dropped, 2);
    assert!(status.last_error.is_some());
    assert_eq!(status.state, SourceState::Connecting, "nothing shown yet");
    sink.push(Planes::new(32, 16).picture(), stamp(t0, 2))
        .unwrap();
    assert_eq!(fed.source.status().state, SourceState::Live);
}

#[test]
fn one_publisher_at_a_time_and_none_after_the_source_is_gone() {
    let fed = pushed(SinkConfig::new());
    let mut first = fed.source.publish().unwrap();
    assert!(matches!(fed.source.publish(), Err(Error::Busy)));
    let t0 = Instant::now();
    first
        .push(Planes::new(32, 16).picture(), stamp(t0, 0))
        .unwrap();
    drop(first);
    // The next publisher takes over: connecting until its first frame, then live again.
    let mut second = fed.source.publish().unwrap();
    assert_eq!(fed.source.status().state, SourceState::Connecting);
    second
        .push(Planes::new(32, 16).picture(), stamp(t0, 1))
        .unwrap();
    assert_eq!(
        *fed.states.lock().unwrap(),
        ["live", "ended", "connecting", "live"]
    );
    // The stream is removed while the publisher still pushes: it is told to stop.
    drop(fed.source);
    let closed = second.push(Planes::new(32, 16).picture(), stamp(t0, 2));
    assert!(matches!(closed, Err(Error::Closed)), "{closed:?}");
}

#[test]
fn pacing_and_time_are_the_callers() {
    let fed = pushed(SinkConfig {
        live: false,
        ..SinkConfig::new()
    });
    let mut sink = fed.source.publish().unwrap();
    let t0 = Instant::now();
    // A burst of frames ready at once is spread at its own rate.
    assert_eq!(sink.due(Duration::ZERO, t0), t0);
    assert_eq!(
        sink.due(Duration::from_millis(40), t0),
        t0 + Duration::from_millis(40)
    );
    sink.restart();
    let later = t0 + Duration::from_secs(3);
    assert_eq!(sink.due(Duration::from_millis(80), later), later);
    assert!(!sink.delivered());
}

#[test]
fn a_source_over_the_pixel_cap_is_shown_downscaled_to_fit() {
    // The default cap is 3840x2160; a small one keeps the test quick, the rule is the same.
    assert_eq!(SinkConfig::new().max_pixels, Some(3840 * 2160));
    let fed = pushed(SinkConfig {
        max_pixels: Some(128 * 64),
        ..SinkConfig::new()
    });
    let mut sink = fed.source.publish().unwrap();
    let t0 = Instant::now();
    sink.push(Planes::new(512, 256).picture(), stamp(t0, 0))
        .unwrap();
    let shown = fed.display.latest().unwrap();
    assert_eq!((shown.jpeg.width, shown.jpeg.height), (128, 64));
    let status = fed.source.status();
    assert_eq!(
        (status.width, status.height),
        (512, 256),
        "the source's own size"
    );
    assert_eq!(status.fitted, Some((128, 64)));

    // A camera's JPEG over the cap is not passed through: decoded and shown smaller.
    let rgb = Rgb::new(400, 200, vec![90u8; 400 * 200 * 3]).unwrap();
    let jpeg = JpegEncoder::new(80).unwrap().encode_rgb(&rgb).unwrap();
    sink.push(Picture::Jpeg(jpeg.bytes.clone()), stamp(t0, 1))
        .unwrap();
    let shown = fed.display.latest().unwrap();
    assert!(
        u64::from(shown.jpeg.width) * u64::from(shown.jpeg.height) <= 128 * 64,
        "{}x{}",
        shown.jpeg.width,
        shown.jpeg.height
    );
    assert!(!fed.source.status().passthrough);

    // Back within the cap: as it is, and the status says so.
    sink.push(Planes::new(64, 32).picture(), stamp(t0, 2))
        .unwrap();
    let shown = fed.display.latest().unwrap();
    assert_eq!((shown.jpeg.width, shown.jpeg.height), (64, 32));
    assert_eq!(fed.source.status().fitted, None);
}
