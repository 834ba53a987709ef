//! An alert's clip as Motion JPEG that keeps each picture's time.
//!
//! A Motion JPEG file is JPEGs back to back, with no clock: players guess a rate, and a clip
//! of a 4 fps camera or of a source that stalled would replay at the wrong pace. So each
//! picture carries its capture time, in milliseconds from the clip's first picture, in a
//! JPEG comment segment (`FF FE`, text `kibitz-t=<ms>`) right after its start-of-image
//! marker. Decoders skip comments, so the file still plays anywhere (ffplay, VLC) and every
//! picture is still a valid JPEG; the page reads the times and shows each picture when it
//! was captured. Why not pace the download instead: the clip is a file to keep and share,
//! and a paced response would take as long to download as to watch.

use std::time::Duration;

use kibitz_frames::DisplayFrame;

/// What starts the comment's text.
const TAG: &[u8] = b"kibitz-t=";
const SOI: [u8; 2] = [0xff, 0xd8];
const COM: [u8; 2] = [0xff, 0xfe];

/// `frames` (in capture order) as one Motion JPEG, each picture stamped with its time.
pub(crate) fn mjpeg(frames: &[DisplayFrame]) -> Vec<u8> {
    let Some(first) = frames.first() else {
        return Vec::new();
    };
    let size = frames.iter().map(|f| f.jpeg.bytes.len() + 32).sum();
    let mut out = Vec::with_capacity(size);
    for frame in frames {
        let at = frame
            .stamp
            .captured
            .saturating_duration_since(first.stamp.captured);
        stamped(&frame.jpeg.bytes, at, &mut out);
    }
    out
}

/// Appends `jpeg` with a comment segment holding `at` after its SOI marker (a picture
/// without one is appended as it is: nothing to stamp).
fn stamped(jpeg: &[u8], at: Duration, out: &mut Vec<u8>) {
    let Some(rest) = jpeg.strip_prefix(&SOI) else {
        out.extend_from_slice(jpeg);
        return;
    };
    let text = format!("{}", at.as_millis());
    // The segment's length counts its two length bytes and the text, not the marker.
    let length = (2 + TAG.len() + text.len()) as u16;
    out.extend_from_slice(&SOI);
    out.extend_from_slice(&COM);
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(TAG);
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(rest);
}

/// The time of each picture of a clip [`mjpeg`] wrote, in order (`None` for a picture
/// without one): the reader's side, as the page does it.
pub fn clip_times(mjpeg: &[u8]) -> Vec<Option<Duration>> {
    let starts: Vec<usize> = mjpeg
        .windows(3)
        .enumerate()
        .filter(|(_, w)| w[0] == 0xff && w[1] == 0xd8 && w[2] == 0xff)
        .map(|(i, _)| i)
        .collect();
    starts
        .iter()
        .map(|&i| {
            let segment = mjpeg.get(i + 2..)?.strip_prefix(&COM)?;
            let length = usize::from(u16::from_be_bytes([*segment.first()?, *segment.get(1)?]));
            let text = segment.get(2..length)?.strip_prefix(TAG)?;
            let ms = std::str::from_utf8(text).ok()?.parse().ok()?;
            Some(Duration::from_millis(ms))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use kibitz_frames::{Jpeg, Stamp};

    use super::*;

    fn frame(seq: u64, captured: Instant) -> DisplayFrame {
        // The smallest shape of a JPEG this cares about: SOI, a segment, entropy data, EOI.
        let bytes = vec![
            0xff, 0xd8, 0xff, 0xdb, 0x00, 0x03, seq as u8, 0x12, 0xff, 0xd9,
        ];
        DisplayFrame {
            seq,
            stamp: Stamp {
                pts: Duration::ZERO,
                captured,
            },
            jpeg: Jpeg {
                width: 1,
                height: 1,
                bytes: bytes.into(),
            },
        }
    }

    #[test]
    fn each_picture_keeps_its_capture_time() {
        let start = Instant::now();
        // Uneven, as a 4 fps camera that stalls for 1.3 s is.
        let offsets = [0, 250, 500, 1800, 2050];
        let frames: Vec<DisplayFrame> = offsets
            .iter()
            .enumerate()
            .map(|(i, &ms)| frame(i as u64, start + Duration::from_millis(ms)))
            .collect();
        let clip = mjpeg(&frames);
        let times: Vec<Option<Duration>> = offsets
            .iter()
            .map(|&ms| Some(Duration::from_millis(ms)))
            .collect();
        assert_eq!(clip_times(&clip), times);
        // Each picture is the original with one comment segment after SOI, nothing else.
        let mut at = 0;
        for f in &frames {
            let original = &f.jpeg.bytes;
            assert_eq!(&clip[at..at + 4], [0xff, 0xd8, 0xff, 0xfe]);
            let length = usize::from(u16::from_be_bytes([clip[at + 4], clip[at + 5]]));
            let rest = at + 4 + length;
            assert_eq!(&clip[rest..rest + original.len() - 2], &original[2..]);
            at = rest + original.len() - 2;
        }
        assert_eq!(at, clip.len());
    }

    #[test]
    fn an_empty_clip_and_a_picture_without_soi() {
        assert!(mjpeg(&[]).is_empty());
        let mut odd = frame(0, Instant::now());
        odd.jpeg.bytes = b"not a jpeg".to_vec().into();
        assert_eq!(mjpeg(&[odd]), b"not a jpeg");
    }
}
