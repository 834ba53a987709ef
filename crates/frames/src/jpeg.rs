//! JPEG encoding for the display buffer, on libjpeg-turbo.
//!
//! Decoders hand out planar YUV, and JPEG is YUV inside, so the common path compresses the
//! planes as they are: no colour conversion, no copy of the picture. The one wrinkle is
//! range: video is usually "limited" (luma 16..235) while JPEG viewers assume full range
//! (0..255), so limited planes are stretched first; otherwise black would show as grey.

use bytes::Bytes;
use turbojpeg::{Compressor, Image, PixelFormat, Subsamp, YuvPlanesImage};

use crate::{Error, Jpeg, Rgb};

/// How the chroma planes of a [`YuvPlanes`] picture are subsampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subsampling {
    /// 4:2:0, chroma halved both ways (almost all video).
    S420,
    /// 4:2:2, chroma halved horizontally (many webcams' MJPEG).
    S422,
    /// 4:4:4, full chroma.
    S444,
}

impl Subsampling {
    /// Size of one chroma plane for a picture of `width` x `height`.
    pub fn chroma_size(self, width: u32, height: u32) -> (u32, u32) {
        match self {
            Subsampling::S420 => (width.div_ceil(2), height.div_ceil(2)),
            Subsampling::S422 => (width.div_ceil(2), height),
            Subsampling::S444 => (width, height),
        }
    }

    fn turbo(self) -> Subsamp {
        match self {
            Subsampling::S420 => Subsamp::Sub2x2,
            Subsampling::S422 => Subsamp::Sub2x1,
            Subsampling::S444 => Subsamp::None,
        }
    }
}

/// The value range of YUV samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// "TV" range: luma 16..=235, chroma 16..=240. Most video.
    Limited,
    /// "PC"/JPEG range: 0..=255. JPEG sources, some webcams.
    Full,
}

/// Borrowed planar YUV picture, as a decoder hands it out (rows may be padded).
#[derive(Debug, Clone, Copy)]
pub struct YuvPlanes<'a> {
    pub width: u32,
    pub height: u32,
    pub y: &'a [u8],
    pub u: &'a [u8],
    pub v: &'a [u8],
    pub y_stride: usize,
    pub u_stride: usize,
    pub v_stride: usize,
    pub subsampling: Subsampling,
    pub range: Range,
}

/// A reusable JPEG compressor. One per thread: creating the libjpeg-turbo handle and the
/// output buffer once keeps the per-frame cost at the compression itself.
pub struct JpegEncoder {
    compressor: Compressor,
    quality: u8,
    /// Worst-case output buffer, reused for every frame; the result is copied out once.
    out: Vec<u8>,
    /// Range-expanded planes for limited-range input, reused.
    planes: [Vec<u8>; 3],
}

impl std::fmt::Debug for JpegEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JpegEncoder(quality {})", self.quality)
    }
}

impl JpegEncoder {
    /// An encoder at `quality` (1..=100; [`crate::JPEG_QUALITY`] is the default).
    pub fn new(quality: u8) -> Result<Self, Error> {
        if !(1..=100).contains(&quality) {
            return Err(Error::BadQuality(quality));
        }
        let mut compressor = Compressor::new()?;
        compressor.set_quality(i32::from(quality))?;
        Ok(Self {
            compressor,
            quality,
            out: Vec::new(),
            planes: Default::default(),
        })
    }

    pub fn quality(&self) -> u8 {
        self.quality
    }

    /// Encodes a packed RGB picture (4:2:0 chroma, like video).
    pub fn encode_rgb(&mut self, rgb: &Rgb) -> Result<Jpeg, Error> {
        self.encode_rgb_rows(rgb.width, rgb.height, rgb.width as usize * 3, &rgb.data)
    }

    /// Encodes RGB rows that may be padded: `pitch` bytes from one row to the next.
    pub fn encode_rgb_rows(
        &mut self,
        width: u32,
        height: u32,
        pitch: usize,
        pixels: &[u8],
    ) -> Result<Jpeg, Error> {
        check_plane("RGB", pixels, width as usize * 3, height, pitch)?;
        self.compressor.set_subsamp(Subsamp::Sub2x2)?;
        let image = Image {
            pixels,
            width: width as usize,
            pitch,
            height: height as usize,
            format: PixelFormat::RGB,
        };
        self.reserve(width, height, Subsamp::Sub2x2)?;
        let len = self.compressor.compress_to_slice(image, &mut self.out)?;
        Ok(self.finish(width, height, len))
    }

    /// Encodes planar YUV straight from the decoder's planes.
    pub fn encode_yuv(&mut self, p: &YuvPlanes<'_>) -> Result<Jpeg, Error> {
        let (cw, ch) = p.subsampling.chroma_size(p.width, p.height);
        check_plane("Y", p.y, p.width as usize, p.height, p.y_stride)?;
        check_plane("U", p.u, cw as usize, ch, p.u_stride)?;
        check_plane("V", p.v, cw as usize, ch, p.v_stride)?;
        let subsamp = p.subsampling.turbo();
        self.reserve(p.width, p.height, subsamp)?;

        // libjpeg-turbo reads the luma plane in whole chroma blocks, so an odd width or
        // height under 4:2:0 needs one more column or row than the picture has.
        let (yw, yh) = padded_luma(p.width, p.height, p.subsampling);
        let fits =
            p.y.len() >= p.y_stride * (yh as usize - 1) + yw as usize && p.y_stride >= yw as usize;
        let image = if p.range == Range::Full && fits {
            YuvPlanesImage {
                y_plane: p.y,
                u_plane: p.u,
                v_plane: p.v,
                width: p.width as usize,
                height: p.height as usize,
                y_stride: p.y_stride,
                u_stride: p.u_stride,
                v_stride: p.v_stride,
                subsamp,
            }
        } else {
            let [y, u, v] = &mut self.planes;
            // Each call gets its own copy of `copy_plane` with the mapping inlined, so the
            // stretch vectorises (through a function pointer it cost more than the encode).
            if p.range == Range::Limited {
                copy_plane(
                    y,
                    p.y,
                    (p.width, p.height),
                    p.y_stride,
                    (yw, yh),
                    expand_luma,
                );
                copy_plane(u, p.u, (cw, ch), p.u_stride, (cw, ch), expand_chroma);
                copy_plane(v, p.v, (cw, ch), p.v_stride, (cw, ch), expand_chroma);
            } else {
                copy_plane(y, p.y, (p.width, p.height), p.y_stride, (yw, yh), |v| v);
                copy_plane(u, p.u, (cw, ch), p.u_stride, (cw, ch), |v| v);
                copy_plane(v, p.v, (cw, ch), p.v_stride, (cw, ch), |v| v);
            }
            YuvPlanesImage {
                y_plane: &y[..],
                u_plane: &u[..],
                v_plane: &v[..],
                width: p.width as usize,
                height: p.height as usize,
                y_stride: yw as usize,
                u_stride: cw as usize,
                v_stride: cw as usize,
                subsamp,
            }
        };
        let len = self
            .compressor
            .compress_yuv_planes_to_slice(&image, &mut self.out)?;
        Ok(self.finish(p.width, p.height, len))
    }

    fn reserve(&mut self, width: u32, height: u32, subsamp: Subsamp) -> Result<(), Error> {
        let need = turbojpeg::compressed_buf_len(width as usize, height as usize, subsamp)?;
        if self.out.len() < need {
            self.out.resize(need, 0);
        }
        Ok(())
    }

    fn finish(&self, width: u32, height: u32, len: usize) -> Jpeg {
        Jpeg {
            width,
            height,
            bytes: Bytes::copy_from_slice(&self.out[..len]),
        }
    }
}

/// Checks a plane is large enough, so a bad picture is an error and not a panic in FFI.
fn check_plane(name: &str, data: &[u8], row: usize, rows: u32, stride: usize) -> Result<(), Error> {
    if row == 0 || rows == 0 {
        return Err(Error::BadPicture(format!("{name} plane is empty")));
    }
    if stride < row {
        return Err(Error::BadPicture(format!(
            "{name} stride {stride} is shorter than a row ({row})"
        )));
    }
    let need = stride * (rows as usize - 1) + row;
    if data.len() < need {
        return Err(Error::BadPicture(format!(
            "{name} plane has {} bytes, needs {need}",
            data.len()
        )));
    }
    Ok(())
}

/// Luma plane size libjpeg-turbo reads: whole chroma blocks.
fn padded_luma(width: u32, height: u32, s: Subsampling) -> (u32, u32) {
    match s {
        Subsampling::S420 => (width.next_multiple_of(2), height.next_multiple_of(2)),
        Subsampling::S422 => (width.next_multiple_of(2), height),
        Subsampling::S444 => (width, height),
    }
}

/// Copies a `size` plane into `out`, packed at `padded` size (edge pixels repeated into the
/// padding), mapping every sample through `f`.
fn copy_plane(
    out: &mut Vec<u8>,
    src: &[u8],
    size: (u32, u32),
    stride: usize,
    padded: (u32, u32),
    f: impl Fn(u8) -> u8,
) {
    let (w, h) = (size.0 as usize, size.1 as usize);
    let pw = padded.0 as usize;
    out.resize(pw * padded.1 as usize, 0);
    for (r, dst) in out.chunks_exact_mut(pw).enumerate() {
        let row = &src[r.min(h - 1) * stride..][..w];
        for (d, s) in dst.iter_mut().zip(row) {
            *d = f(*s);
        }
        let last = dst[w - 1];
        dst[w..].fill(last);
    }
}

/// 16..=235 -> 0..=255: `d + d * 0.1644` with `d = y - 16` (255/219 = 1.1644). Written as a
/// 16-bit multiply-high so it vectorises on baseline x86-64 (SSE2 has no 32-bit multiply).
#[inline(always)]
fn expand_luma(y: u8) -> u8 {
    let d = u16::from(y.saturating_sub(16));
    let v = d + ((u32::from(d) * 10776) >> 16) as u16;
    v.min(255) as u8
}

/// 16..=240 around 128 -> 0..=255: `c + (c - 128) * 0.1384` (255/224 = 1.1384).
#[inline(always)]
fn expand_chroma(c: u8) -> u8 {
    let d = i16::from(c as i8 ^ i8::MIN); // c - 128
    let v = i16::from(c) + ((i32::from(d) * 9071) >> 16) as i16;
    v.clamp(0, 255) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use turbojpeg::Decompressor;

    fn gradient(width: u32, height: u32) -> Rgb {
        let mut data = Vec::with_capacity((width * height * 3) as usize);
        for y in 0..height {
            for x in 0..width {
                data.extend_from_slice(&[(x * 255 / width) as u8, (y * 255 / height) as u8, 128]);
            }
        }
        Rgb::new(width, height, data).unwrap()
    }

    fn decode(jpeg: &Jpeg) -> turbojpeg::Image<Vec<u8>> {
        turbojpeg::decompress(&jpeg.bytes, PixelFormat::RGB).unwrap()
    }

    fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
        assert_eq!(a.len(), b.len());
        let sum: u64 = a
            .iter()
            .zip(b)
            .map(|(x, y)| u64::from(x.abs_diff(*y)))
            .sum();
        sum as f64 / a.len() as f64
    }

    #[test]
    fn rgb_round_trips_closely() {
        let rgb = gradient(160, 90);
        let mut enc = JpegEncoder::new(80).unwrap();
        let jpeg = enc.encode_rgb(&rgb).unwrap();
        assert_eq!((jpeg.width, jpeg.height), (160, 90));
        assert_eq!(&jpeg.bytes[..2], &[0xFF, 0xD8], "starts with SOI");
        let back = decode(&jpeg);
        assert_eq!((back.width, back.height), (160, 90));
        assert!(mean_abs_diff(&back.pixels, &rgb.data) < 4.0);
        let header = Decompressor::new()
            .unwrap()
            .read_header(&jpeg.bytes)
            .unwrap();
        assert_eq!(header.subsamp, Subsamp::Sub2x2);
    }

    #[test]
    fn encoder_is_reused_across_sizes() {
        let mut enc = JpegEncoder::new(80).unwrap();
        for (w, h) in [(1, 1), (640, 360), (33, 17), (4000, 100)] {
            let jpeg = enc.encode_rgb(&gradient(w, h)).unwrap();
            let back = decode(&jpeg);
            assert_eq!((back.width as u32, back.height as u32), (w, h));
        }
    }

    #[test]
    fn quality_changes_size() {
        let rgb = gradient(320, 240);
        let small = JpegEncoder::new(20).unwrap().encode_rgb(&rgb).unwrap();
        let big = JpegEncoder::new(95).unwrap().encode_rgb(&rgb).unwrap();
        assert!(small.bytes.len() < big.bytes.len());
    }

    #[test]
    fn bad_quality_and_bad_buffers_are_errors() {
        assert!(matches!(JpegEncoder::new(0), Err(Error::BadQuality(0))));
        assert!(matches!(JpegEncoder::new(101), Err(Error::BadQuality(101))));
        let mut enc = JpegEncoder::new(80).unwrap();
        let short = [0u8; 10];
        assert!(matches!(
            enc.encode_rgb_rows(10, 10, 30, &short),
            Err(Error::BadPicture(_))
        ));
        let y = [0u8; 16];
        let planes = YuvPlanes {
            width: 4,
            height: 4,
            y: &y,
            u: &y[..2],
            v: &y[..2],
            y_stride: 4,
            u_stride: 2,
            v_stride: 2,
            subsampling: Subsampling::S420,
            range: Range::Full,
        };
        assert!(matches!(enc.encode_yuv(&planes), Err(Error::BadPicture(_))));
    }

    #[test]
    fn padded_rgb_rows() {
        let rgb = gradient(30, 20);
        let pitch = 30 * 3 + 7;
        let mut padded = vec![0xAA; pitch * 20];
        for (row, src) in padded.chunks_mut(pitch).zip(rgb.data.chunks(90)) {
            row[..90].copy_from_slice(src);
        }
        let mut enc = JpegEncoder::new(90).unwrap();
        let a = enc.encode_rgb(&rgb).unwrap();
        let b = enc.encode_rgb_rows(30, 20, pitch, &padded).unwrap();
        assert_eq!(a.bytes, b.bytes);
    }

    /// A flat YUV picture with padded rows.
    struct Flat {
        y: Vec<u8>,
        u: Vec<u8>,
        v: Vec<u8>,
    }

    fn flat(w: u32, h: u32, s: Subsampling, yuv: [u8; 3], pad: usize) -> (Flat, usize, usize) {
        let (cw, ch) = s.chroma_size(w, h);
        let ys = w as usize + pad;
        let cs = cw as usize + pad;
        let planes = Flat {
            y: vec![yuv[0]; ys * h as usize],
            u: vec![yuv[1]; cs * ch as usize],
            v: vec![yuv[2]; cs * ch as usize],
        };
        (planes, ys, cs)
    }

    fn encode_flat(s: Subsampling, range: Range, yuv: [u8; 3]) -> (Jpeg, Vec<u8>) {
        let (w, h) = (37, 21);
        let (p, ys, cs) = flat(w, h, s, yuv, 11);
        let planes = YuvPlanes {
            width: w,
            height: h,
            y: &p.y,
            u: &p.u,
            v: &p.v,
            y_stride: ys,
            u_stride: cs,
            v_stride: cs,
            subsampling: s,
            range,
        };
        let jpeg = JpegEncoder::new(90).unwrap().encode_yuv(&planes).unwrap();
        let rgb = decode(&jpeg).pixels;
        (jpeg, rgb)
    }

    #[test]
    fn yuv_subsamplings_decode_to_expected_size_and_layout() {
        for (s, t) in [
            (Subsampling::S420, Subsamp::Sub2x2),
            (Subsampling::S422, Subsamp::Sub2x1),
            (Subsampling::S444, Subsamp::None),
        ] {
            let (jpeg, _) = encode_flat(s, Range::Full, [128, 128, 128]);
            let header = Decompressor::new()
                .unwrap()
                .read_header(&jpeg.bytes)
                .unwrap();
            assert_eq!((header.width, header.height), (37, 21));
            assert_eq!(header.subsamp, t);
        }
    }

    #[test]
    fn odd_sizes_with_tight_planes() {
        // A decoder's planes for 37x21 4:2:0 hold exactly 21 luma rows; the encoder must not
        // read past them.
        for range in [Range::Full, Range::Limited] {
            for (w, h) in [(37, 21), (1, 1), (2, 3)] {
                let (cw, ch) = Subsampling::S420.chroma_size(w, h);
                let y = vec![120u8; (w * h) as usize];
                let c = vec![128u8; (cw * ch) as usize];
                let planes = YuvPlanes {
                    width: w,
                    height: h,
                    y: &y,
                    u: &c,
                    v: &c,
                    y_stride: w as usize,
                    u_stride: cw as usize,
                    v_stride: cw as usize,
                    subsampling: Subsampling::S420,
                    range,
                };
                let jpeg = JpegEncoder::new(80).unwrap().encode_yuv(&planes).unwrap();
                let back = decode(&jpeg);
                assert_eq!((back.width as u32, back.height as u32), (w, h));
            }
        }
    }

    #[test]
    fn limited_range_black_and_white_become_full_range() {
        let (_, black) = encode_flat(Subsampling::S420, Range::Limited, [16, 128, 128]);
        let (_, white) = encode_flat(Subsampling::S420, Range::Limited, [235, 128, 128]);
        assert!(black.iter().all(|&c| c <= 2), "limited black decodes to ~0");
        assert!(
            white.iter().all(|&c| c >= 253),
            "limited white decodes to ~255"
        );
        // The same samples taken as full range stay grey-ish: the stretch is what fixes it.
        let (_, grey) = encode_flat(Subsampling::S420, Range::Full, [16, 128, 128]);
        assert!(grey.iter().all(|&c| (14..=18).contains(&c)));
    }

    #[test]
    fn limited_range_colour_matches_rgb_path() {
        // BT.601 limited: pure red is Y=81 U=90 V=240.
        let (_, red) = encode_flat(Subsampling::S444, Range::Limited, [81, 90, 240]);
        let px = &red[..3];
        assert!(px[0] >= 245 && px[1] <= 10 && px[2] <= 10, "got {px:?}");
    }

    #[test]
    fn range_stretch_matches_the_formula() {
        for v in 0..=255u8 {
            let y = (f64::from(v) - 16.0) * 255.0 / 219.0;
            let c = (f64::from(v) - 128.0) * 255.0 / 224.0 + 128.0;
            assert!(
                (f64::from(expand_luma(v)) - y.clamp(0.0, 255.0)).abs() <= 1.0,
                "luma {v}"
            );
            assert!(
                (f64::from(expand_chroma(v)) - c.clamp(0.0, 255.0)).abs() <= 1.0,
                "chroma {v}"
            );
        }
    }

    #[test]
    fn range_stretch_endpoints() {
        assert_eq!(expand_luma(16), 0);
        assert_eq!(expand_luma(235), 255);
        assert_eq!(expand_luma(0), 0);
        assert_eq!(expand_luma(255), 255);
        assert_eq!(expand_chroma(128), 128);
        assert_eq!(expand_chroma(16), 0);
        assert_eq!(expand_chroma(240), 255);
        assert_eq!(expand_chroma(0), 0);
        assert_eq!(expand_chroma(255), 255);
    }
}
