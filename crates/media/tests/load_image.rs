//! `load_image` on the picture fixtures made by `scripts/fixtures.sh`.

use kibitz_media::{load_image, Error};

mod fixture;
use fixture::fixture;

#[test]
fn formats_and_sizes() {
    for (name, w, h) in [
        ("photo.jpg", 640, 360),
        ("gray.png", 320, 240),
        ("gray16.png", 320, 240),
        ("rgba.png", 320, 240),
        ("rgb48.png", 160, 120),
        ("pixel.png", 1, 1),
        ("wide.png", 4000, 100),
        ("wide.jpg", 4000, 100),
    ] {
        let rgb = load_image(fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((rgb.width, rgb.height), (w, h), "{name}");
        assert_eq!(rgb.data.len(), (w * h * 3) as usize, "{name}");
        // Not a blank picture (testsrc2 is colourful; the 1x1 is red).
        let distinct: std::collections::HashSet<_> = rgb.data.chunks(3).take(50_000).collect();
        assert!(
            distinct.len() >= if w * h == 1 { 1 } else { 10 },
            "{name}: {} colours",
            distinct.len()
        );
    }
}

#[test]
fn grey_stays_grey_and_red_stays_red() {
    for name in ["gray.png", "gray16.png"] {
        let rgb = load_image(fixture(name)).unwrap();
        assert!(
            rgb.data.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]),
            "{name}"
        );
    }
    let red = load_image(fixture("pixel.png")).unwrap();
    assert!(
        red.data[0] >= 250 && red.data[1] <= 5 && red.data[2] <= 5,
        "{:?}",
        &red.data[..]
    );
}

#[test]
fn png_and_jpeg_of_the_same_picture_agree() {
    let png = load_image(fixture("wide.png")).unwrap();
    let jpg = load_image(fixture("wide.jpg")).unwrap();
    let diff: u64 = png
        .data
        .iter()
        .zip(jpg.data.iter())
        .map(|(a, b)| u64::from(a.abs_diff(*b)))
        .sum();
    let mean = diff as f64 / png.data.len() as f64;
    assert!(mean < 8.0, "mean difference {mean}");
}

#[test]
fn clear_errors() {
    let missing = fixture("photo.jpg").with_file_name("nope.jpg");
    let err = load_image(&missing).unwrap_err();
    assert!(matches!(err, Error::Open { .. }));
    assert_eq!(
        err.to_string(),
        format!(
            "cannot open '{}': No such file or directory",
            missing.display()
        )
    );

    let err = load_image(fixture("not-image.png")).unwrap_err();
    assert!(
        matches!(err, Error::Open { .. } | Error::Decode { .. }),
        "{err}"
    );

    let err = load_image(fixture("audio-only.m4a")).unwrap_err();
    assert!(matches!(err, Error::NoVideo { .. }), "{err}");

    let dir = fixture("photo.jpg").parent().unwrap().to_path_buf();
    assert!(matches!(load_image(&dir), Err(Error::Open { .. })));
}

#[test]
fn a_video_gives_its_first_frame() {
    let rgb = load_image(fixture("short-1s.mp4")).unwrap();
    assert_eq!((rgb.width, rgb.height), (320, 240));
}
