//! From decoded FFmpeg frames to what the stores hold: JPEG for viewers, RGB for the model.
//!
//! Planar YUV frames go to the JPEG encoder as they are (no colour conversion); swscale is
//! used only to shrink (`DISPLAY_MAX_WIDTH`), for unusual pixel formats, and for the model's
//! RGB copy twice a second.

use ffmpeg_next::format::Pixel;
use ffmpeg_next::software::scaling;
use ffmpeg_next::util::color;
use ffmpeg_next::util::frame::Video as VideoFrame;

use kibitz_frames::{Jpeg, JpegEncoder, Range, Rgb, Subsampling, YuvPlanes};

/// A swscale context and its output frame, rebuilt only when the input or output changes.
pub(crate) struct Scaler {
    ctx: Option<scaling::Context>,
    out: VideoFrame,
    flags: scaling::Flags,
}

// SAFETY: an `SwsContext` is plain heap state with no tie to the thread that made it (FFmpeg
// keeps no thread-local state for it); the `Scaler` owns it alone and uses it only through
// `&mut self`, so moving it to another thread never lets two threads touch it at once. This
// is what lets a `FrameSink` go to whichever thread produces the frames.
unsafe impl Send for Scaler {}

impl Scaler {
    pub(crate) fn new(flags: scaling::Flags) -> Self {
        Self {
            ctx: None,
            out: VideoFrame::empty(),
            flags,
        }
    }

    /// `src` converted to `format` at `width` x `height`.
    pub(crate) fn run(
        &mut self,
        src: &VideoFrame,
        format: Pixel,
        width: u32,
        height: u32,
    ) -> Result<&VideoFrame, ffmpeg_next::Error> {
        let same = self.ctx.as_ref().is_some_and(|c| {
            let (i, o) = (c.input(), c.output());
            (i.format, i.width, i.height, o.format, o.width, o.height)
                == (
                    src.format(),
                    src.width(),
                    src.height(),
                    format,
                    width,
                    height,
                )
        });
        if !same {
            let ctx = scaling::Context::get(
                src.format(),
                src.width(),
                src.height(),
                format,
                width,
                height,
                self.flags,
            )?;
            self.ctx = Some(ctx);
            self.out = VideoFrame::new(format, width, height);
        }
        let ctx = self.ctx.as_mut().expect("set above");
        ctx.run(src, &mut self.out)?;
        Ok(&self.out)
    }
}

/// The frame as packed RGB at `width` x `height` (any pixel format; alpha is dropped).
pub(crate) fn to_rgb(
    scaler: &mut Scaler,
    frame: &VideoFrame,
    width: u32,
    height: u32,
) -> Result<Rgb, String> {
    let out = scaler
        .run(frame, Pixel::RGB24, width, height)
        .map_err(|e| e.to_string())?;
    let row = width as usize * 3;
    let stride = out.stride(0);
    let data = out.data(0);
    let mut packed = Vec::with_capacity(row * height as usize);
    for r in 0..height as usize {
        packed.extend_from_slice(&data[r * stride..r * stride + row]);
    }
    Rgb::new(width, height, packed).map_err(|e| e.to_string())
}

/// Encodes frames for viewers, shrinking to `max_width` and to `max_pixels` when asked.
pub(crate) struct DisplayEncoder {
    jpeg: JpegEncoder,
    scaler: Scaler,
    max_width: Option<u32>,
    max_pixels: Option<u64>,
}

impl DisplayEncoder {
    pub(crate) fn new(
        quality: u8,
        max_width: Option<u32>,
        max_pixels: Option<u64>,
    ) -> Result<Self, kibitz_frames::Error> {
        Ok(Self {
            jpeg: JpegEncoder::new(quality)?,
            scaler: Scaler::new(scaling::Flags::BILINEAR),
            max_width: max_width.filter(|w| *w > 0),
            max_pixels: max_pixels.filter(|p| *p > 0),
        })
    }

    /// The size viewers get of a `width` x `height` frame.
    pub(crate) fn size(&self, width: u32, height: u32) -> (u32, u32) {
        let (w, h) = display_size(width, height, self.max_width);
        fit_pixels(w, h, self.max_pixels)
    }

    pub(crate) fn encode(&mut self, frame: &VideoFrame) -> Result<Jpeg, String> {
        let (w, h) = (frame.width(), frame.height());
        let (tw, th) = self.size(w, h);
        if (tw, th) == (w, h) {
            if let Some((subsampling, range)) = planar_layout(frame) {
                return self
                    .jpeg
                    .encode_yuv(&planes(frame, subsampling, range))
                    .map_err(|e| e.to_string());
            }
        }
        // Shrink or convert to plain 4:2:0 (limited range, which the encoder stretches).
        let out = self
            .scaler
            .run(frame, Pixel::YUV420P, tw, th)
            .map_err(|e| e.to_string())?;
        self.jpeg
            .encode_yuv(&planes(out, Subsampling::S420, Range::Limited))
            .map_err(|e| e.to_string())
    }
}

/// Size for viewers: the frame's own, or narrowed to `max_width` keeping aspect (even sides,
/// which 4:2:0 wants).
pub(crate) fn display_size(width: u32, height: u32, max_width: Option<u32>) -> (u32, u32) {
    match max_width {
        Some(max) if width > max => {
            let h = (u64::from(height) * u64::from(max) / u64::from(width)) as u32;
            let even = |v: u32| (v & !1).max(2);
            (even(max), even(h))
        }
        _ => (width, height),
    }
}

/// `width` x `height` shrunk, keeping aspect, to at most `max_pixels` pixels (even sides,
/// which 4:2:0 wants); as it is when within the cap or there is none.
pub(crate) fn fit_pixels(width: u32, height: u32, max_pixels: Option<u64>) -> (u32, u32) {
    let pixels = u64::from(width) * u64::from(height);
    match max_pixels {
        Some(max) if pixels > max => {
            let scale = (max as f64 / pixels as f64).sqrt();
            let even = |v: f64| ((v.floor() as u32) & !1).max(2);
            (
                even(f64::from(width) * scale),
                even(f64::from(height) * scale),
            )
        }
        _ => (width, height),
    }
}

/// The JPEG layout of a planar 8-bit YUV frame, if it has one.
fn planar_layout(frame: &VideoFrame) -> Option<(Subsampling, Range)> {
    let full = frame.color_range() == color::Range::JPEG;
    let range = |forced_full: bool| {
        if forced_full || full {
            Range::Full
        } else {
            Range::Limited
        }
    };
    match frame.format() {
        Pixel::YUV420P => Some((Subsampling::S420, range(false))),
        Pixel::YUVJ420P => Some((Subsampling::S420, range(true))),
        Pixel::YUV422P => Some((Subsampling::S422, range(false))),
        Pixel::YUVJ422P => Some((Subsampling::S422, range(true))),
        Pixel::YUV444P => Some((Subsampling::S444, range(false))),
        Pixel::YUVJ444P => Some((Subsampling::S444, range(true))),
        _ => None,
    }
}

fn planes(frame: &VideoFrame, subsampling: Subsampling, range: Range) -> YuvPlanes<'_> {
    YuvPlanes {
        width: frame.width(),
        height: frame.height(),
        y: frame.data(0),
        u: frame.data(1),
        v: frame.data(2),
        y_stride: frame.stride(0),
        u_stride: frame.stride(1),
        v_stride: frame.stride(2),
        subsampling,
        range,
    }
}

/// What the passthrough path needs to know about a JPEG from an MJPEG stream: its size, and
/// whether browsers can show it as is. Some cameras (AVI1-style MJPEG) leave out the
/// Huffman tables, relying on the standard ones; those must be re-encoded.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct JpegInfo {
    pub width: u32,
    pub height: u32,
    pub has_tables: bool,
}

/// Walks the JPEG markers up to the scan. `None` when it is not a JPEG or has no frame
/// header.
pub(crate) fn jpeg_info(data: &[u8]) -> Option<JpegInfo> {
    if data.get(..2) != Some(&[0xFF, 0xD8]) {
        return None;
    }
    let mut at = 2;
    let mut size = None;
    let mut has_tables = false;
    while at + 4 <= data.len() {
        if data[at] != 0xFF {
            return None;
        }
        let marker = data[at + 1];
        if marker == 0xFF {
            at += 1; // fill byte
            continue;
        }
        let len = usize::from(u16::from_be_bytes([data[at + 2], data[at + 3]]));
        match marker {
            0xC4 => has_tables = true,
            // Start-of-frame markers (not DHT C4, JPG C8, DAC CC).
            0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC) => {
                let h = data.get(at + 5..at + 7)?;
                let w = data.get(at + 7..at + 9)?;
                size = Some((
                    u32::from(u16::from_be_bytes([w[0], w[1]])),
                    u32::from(u16::from_be_bytes([h[0], h[1]])),
                ));
            }
            0xDA => break,
            _ => {}
        }
        at += 2 + len;
    }
    let (width, height) = size?;
    (width > 0 && height > 0).then_some(JpegInfo {
        width,
        height,
        has_tables,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_pixels_keeps_within_the_cap_and_the_aspect() {
        let cap = Some(3840 * 2160);
        assert_eq!(fit_pixels(3840, 2160, cap), (3840, 2160));
        assert_eq!(fit_pixels(1920, 1080, None), (1920, 1080));
        for (w, h) in [(8192, 8192), (7680, 4320), (16384, 100), (4097, 2161)] {
            let (fw, fh) = fit_pixels(w, h, cap);
            assert!(
                u64::from(fw) * u64::from(fh) <= 3840 * 2160,
                "{w}x{h} -> {fw}x{fh}"
            );
            assert!(fw % 2 == 0 && fh % 2 == 0);
            let aspect = |a: u32, b: u32| f64::from(a) / f64::from(b);
            assert!(
                (aspect(fw, fh) - aspect(w, h)).abs() / aspect(w, h) < 0.05,
                "{w}x{h} -> {fw}x{fh}"
            );
        }
        assert_eq!(fit_pixels(8192, 8192, cap), (2880, 2880));
    }

    #[test]
    fn display_size_shrinks_keeping_aspect() {
        assert_eq!(display_size(1280, 720, None), (1280, 720));
        assert_eq!(display_size(1280, 720, Some(1920)), (1280, 720));
        assert_eq!(display_size(1280, 720, Some(640)), (640, 360));
        assert_eq!(display_size(1920, 1080, Some(853)), (852, 478));
        assert_eq!(display_size(4000, 2, Some(100)), (100, 2));
    }

    fn encoded(w: u32, h: u32) -> Vec<u8> {
        let rgb = Rgb::new(w, h, vec![100u8; (w * h * 3) as usize]).unwrap();
        JpegEncoder::new(80)
            .unwrap()
            .encode_rgb(&rgb)
            .unwrap()
            .bytes
            .to_vec()
    }

    #[test]
    fn jpeg_info_reads_size_and_tables() {
        let j = encoded(33, 17);
        assert_eq!(
            jpeg_info(&j),
            Some(JpegInfo {
                width: 33,
                height: 17,
                has_tables: true
            })
        );
    }

    #[test]
    fn jpeg_info_spots_missing_tables_and_garbage() {
        // Drop the DHT segments, as AVI1-style MJPEG does.
        let j = encoded(16, 16);
        let mut out = j[..2].to_vec();
        let mut at = 2;
        while at < j.len() {
            let marker = j[at + 1];
            if marker == 0xDA {
                out.extend_from_slice(&j[at..]);
                break;
            }
            let len = usize::from(u16::from_be_bytes([j[at + 2], j[at + 3]]));
            if marker != 0xC4 {
                out.extend_from_slice(&j[at..at + 2 + len]);
            }
            at += 2 + len;
        }
        assert_eq!(
            jpeg_info(&out),
            Some(JpegInfo {
                width: 16,
                height: 16,
                has_tables: false
            })
        );
        assert_eq!(jpeg_info(b"not a jpeg"), None);
        assert_eq!(jpeg_info(&[0xFF, 0xD8, 0xFF]), None);
        assert_eq!(jpeg_info(&j[..20]), None, "cut before the frame header");
    }
}
