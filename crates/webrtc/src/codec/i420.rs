//! Turning any [`Picture`] into what OpenH264 encodes: 4:2:0 planes of even size in limited
//! ("TV") range, the form H.264 decoders assume when the stream says nothing else.
//!
//! Limited-range 4:2:0 planes (what FFmpeg decodes most video to) go to the encoder as they
//! are, borrowed. Everything else is converted into one buffer the encoder keeps: full-range
//! planes are squeezed into limited range, 4:2:2 and 4:4:4 chroma averaged down, RGB converted
//! (BT.601), and a JPEG decoded to its planes first (libjpeg-turbo) and then treated as planes.
//! An odd last row or column is dropped: 4:2:0 chroma covers pixel pairs.

use kibitz_frames::{Range, Subsampling, YuvPlanes};
use openh264::formats::YUVSource;
use turbojpeg::{Decompressor, PixelFormat, Subsamp, YuvImage};

use super::{CodecError, Picture};

/// The picture size the encoder is given for a `width` x `height` picture.
pub(crate) fn even_size(width: u32, height: u32) -> (u32, u32) {
    (width & !1, height & !1)
}

/// A 4:2:0 limited-range picture ready for the encoder: borrowed from the caller, or
/// converted into the buffers of a [`Converter`].
pub(crate) struct I420<'a> {
    width: u32,
    height: u32,
    planes: [&'a [u8]; 3],
    strides: [usize; 3],
}

impl I420<'_> {
    pub(crate) fn size(&self) -> (u32, u32) {
        (self.width, self.height)
    }
}

impl YUVSource for I420<'_> {
    fn dimensions(&self) -> (usize, usize) {
        (self.width as usize, self.height as usize)
    }

    fn strides(&self) -> (usize, usize, usize) {
        (self.strides[0], self.strides[1], self.strides[2])
    }

    fn y(&self) -> &[u8] {
        self.planes[0]
    }

    fn u(&self) -> &[u8] {
        self.planes[1]
    }

    fn v(&self) -> &[u8] {
        self.planes[2]
    }
}

/// The buffers conversion writes into, kept between frames so a stream allocates them once.
#[derive(Default)]
pub(crate) struct Converter {
    planes: [Vec<u8>; 3],
    /// Made on the first JPEG.
    jpeg: Option<Decompressor>,
    /// Decoded JPEG samples (planes, or RGB for the layouts converted through RGB).
    decoded: Vec<u8>,
}

impl Converter {
    /// `picture` as 4:2:0 limited-range planes of even size, borrowed where it already is.
    pub(crate) fn convert<'a>(
        &'a mut self,
        picture: &'a Picture<'_>,
    ) -> Result<I420<'a>, CodecError> {
        match picture {
            Picture::Yuv(p) => {
                check_planes(p)?;
                if p.subsampling == Subsampling::S420 && p.range == Range::Limited {
                    let (width, height) = even_size(p.width, p.height);
                    check_size(width, height)?;
                    return Ok(I420 {
                        width,
                        height,
                        planes: [p.y, p.u, p.v],
                        strides: [p.y_stride, p.u_stride, p.v_stride],
                    });
                }
                self.convert_planes(p)
            }
            Picture::Rgb {
                width,
                height,
                pitch,
                data,
            } => self.convert_rgb(*width, *height, *pitch, data),
            Picture::Jpeg(bytes) => self.convert_jpeg(bytes),
        }
    }

    /// Sizes the owned planes for an even `width` x `height` picture.
    fn reserve(&mut self, width: u32, height: u32) {
        let (w, h) = (width as usize, height as usize);
        self.planes[0].resize(w * h, 0);
        self.planes[1].resize(w / 2 * (h / 2), 0);
        self.planes[2].resize(w / 2 * (h / 2), 0);
    }

    fn owned(&self, width: u32, height: u32) -> I420<'_> {
        let [y, u, v] = &self.planes;
        I420 {
            width,
            height,
            planes: [y, u, v],
            strides: [width as usize, width as usize / 2, width as usize / 2],
        }
    }

    fn convert_planes(&mut self, p: &YuvPlanes<'_>) -> Result<I420<'_>, CodecError> {
        let (width, height) = even_size(p.width, p.height);
        check_size(width, height)?;
        self.reserve(width, height);
        let (w, h) = (width as usize, height as usize);
        let (luma, chroma) = match p.range {
            Range::Limited => (Levels::IDENTITY, Levels::IDENTITY),
            Range::Full => (Levels::full_to_limited(219), Levels::full_to_limited(224)),
        };
        for row in 0..h {
            let src = &p.y[row * p.y_stride..][..w];
            let dst = &mut self.planes[0][row * w..][..w];
            for (d, s) in dst.iter_mut().zip(src) {
                *d = luma.0[usize::from(*s)];
            }
        }
        // Which source chroma samples make one 4:2:0 sample: (columns, rows) averaged.
        let (cols, rows) = match p.subsampling {
            Subsampling::S420 => (1, 1),
            Subsampling::S422 => (1, 2),
            Subsampling::S444 => (2, 2),
        };
        let (cw, ch) = (w / 2, h / 2);
        for (plane, src, stride) in [(1, p.u, p.u_stride), (2, p.v, p.v_stride)] {
            let dst = &mut self.planes[plane];
            for row in 0..ch {
                for col in 0..cw {
                    let mut sum = 0u32;
                    for dy in 0..rows {
                        let line = &src[(row * rows + dy) * stride..];
                        for dx in 0..cols {
                            sum += u32::from(line[col * cols + dx]);
                        }
                    }
                    let n = (cols * rows) as u32;
                    let avg = ((sum + n / 2) / n) as usize;
                    dst[row * cw + col] = chroma.0[avg];
                }
            }
        }
        Ok(self.owned(width, height))
    }

    /// Packed RGB to BT.601 limited-range 4:2:0 (chroma from the 2x2 average of RGB).
    fn convert_rgb(
        &mut self,
        width: u32,
        height: u32,
        pitch: usize,
        data: &[u8],
    ) -> Result<I420<'_>, CodecError> {
        let bad = |reason: &str| CodecError::Picture {
            width,
            height,
            reason: reason.to_owned(),
        };
        if pitch < width as usize * 3 {
            return Err(bad("RGB rows are shorter than the width"));
        }
        if height > 0 && data.len() < (height as usize - 1) * pitch + width as usize * 3 {
            return Err(bad("RGB data is shorter than its size says"));
        }
        let (ew, eh) = even_size(width, height);
        check_size(ew, eh)?;
        self.reserve(ew, eh);
        let (w, h) = (ew as usize, eh as usize);
        for row in 0..h {
            let src = &data[row * pitch..][..w * 3];
            let dst = &mut self.planes[0][row * w..][..w];
            for (d, px) in dst.iter_mut().zip(src.chunks_exact(3)) {
                *d = luma_601(px[0], px[1], px[2]);
            }
        }
        let cw = w / 2;
        for row in 0..h / 2 {
            let top = &data[2 * row * pitch..];
            let bottom = &data[(2 * row + 1) * pitch..];
            for col in 0..cw {
                let mut rgb = [0i32; 3];
                for line in [top, bottom] {
                    for px in line[col * 6..col * 6 + 6].chunks_exact(3) {
                        for (sum, s) in rgb.iter_mut().zip(px) {
                            *sum += i32::from(*s);
                        }
                    }
                }
                let [r, g, b] = rgb.map(|s| (s + 2) / 4);
                let (u, v) = chroma_601(r, g, b);
                self.planes[1][row * cw + col] = u;
                self.planes[2][row * cw + col] = v;
            }
        }
        Ok(self.owned(ew, eh))
    }

    /// Decodes a JPEG to its planes (no colour conversion) and converts those; layouts
    /// other than 4:2:0, 4:2:2 and 4:4:4 (greyscale, 4:4:0, 4:1:1) go through RGB.
    fn convert_jpeg(&mut self, jpeg: &[u8]) -> Result<I420<'_>, CodecError> {
        let decompressor = match &mut self.jpeg {
            Some(d) => d,
            None => self.jpeg.insert(Decompressor::new()?),
        };
        let header = decompressor.read_header(jpeg)?;
        let (width, height) = (header.width, header.height);
        let subsampling = match header.subsamp {
            Subsamp::Sub2x2 => Some(Subsampling::S420),
            Subsamp::Sub2x1 => Some(Subsampling::S422),
            Subsamp::None => Some(Subsampling::S444),
            _ => None,
        };
        let too_big = |_| CodecError::Picture {
            width: u32::MAX,
            height: u32::MAX,
            reason: "JPEG larger than 4 Gpx a side".into(),
        };
        let (w32, h32) = (
            u32::try_from(width).map_err(too_big)?,
            u32::try_from(height).map_err(too_big)?,
        );
        check_size(even_size(w32, h32).0, even_size(w32, h32).1)?;
        let Some(subsampling) = subsampling else {
            let pitch = width * 3;
            self.decoded.resize(pitch * height, 0);
            let image = turbojpeg::Image {
                pixels: &mut self.decoded[..],
                width,
                pitch,
                height,
                format: PixelFormat::RGB,
            };
            decompressor.decompress(jpeg, image)?;
            let decoded = std::mem::take(&mut self.decoded);
            let result = self
                .convert_rgb(w32, h32, pitch, &decoded)
                .map(|i| i.size());
            self.decoded = decoded;
            let (ew, eh) = result?;
            return Ok(self.owned(ew, eh));
        };
        let len = turbojpeg::yuv_pixels_len(width, 1, height, header.subsamp)?;
        self.decoded.resize(len, 0);
        let image = YuvImage {
            pixels: &mut self.decoded[..],
            width,
            align: 1,
            height,
            subsamp: header.subsamp,
        };
        decompressor.decompress_to_yuv(jpeg, image)?;
        let (cw, ch) = subsampling.chroma_size(w32, h32);
        let (luma_len, chroma_len) = (width * height, cw as usize * ch as usize);
        let decoded = std::mem::take(&mut self.decoded);
        let planes = YuvPlanes {
            width: w32,
            height: h32,
            y: &decoded[..luma_len],
            u: &decoded[luma_len..][..chroma_len],
            v: &decoded[luma_len + chroma_len..][..chroma_len],
            y_stride: width,
            u_stride: cw as usize,
            v_stride: cw as usize,
            subsampling,
            range: Range::Full,
        };
        let result = self.convert_planes(&planes).map(|i| i.size());
        self.decoded = decoded;
        let (ew, eh) = result?;
        Ok(self.owned(ew, eh))
    }
}

/// A lookup table from one sample range to another.
struct Levels([u8; 256]);

impl Levels {
    const IDENTITY: Levels = {
        let mut t = [0u8; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = i as u8;
            i += 1;
        }
        Levels(t)
    };

    /// Full range 0..=255 onto 16..=16+`span` (219 for luma, 224 for chroma).
    fn full_to_limited(span: u32) -> Levels {
        let mut t = [0u8; 256];
        for (i, out) in (0u32..).zip(t.iter_mut()) {
            *out = (16 + (i * span + 127) / 255) as u8;
        }
        Levels(t)
    }
}

/// BT.601 limited-range luma of an RGB pixel (the integer form of the standard).
fn luma_601(r: u8, g: u8, b: u8) -> u8 {
    let (r, g, b) = (i32::from(r), i32::from(g), i32::from(b));
    ((66 * r + 129 * g + 25 * b + 128) >> 8).wrapping_add(16) as u8
}

/// BT.601 limited-range chroma of an RGB pixel.
fn chroma_601(r: i32, g: i32, b: i32) -> (u8, u8) {
    let u = ((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128;
    let v = ((112 * r - 94 * g - 18 * b + 128) >> 8) + 128;
    (u.clamp(0, 255) as u8, v.clamp(0, 255) as u8)
}

/// The smallest picture OpenH264 is given: one macroblock. Its largest is level 5.2's.
fn check_size(width: u32, height: u32) -> Result<(), CodecError> {
    let reason = if width < 16 || height < 16 {
        "smaller than 16x16"
    } else if width.max(height) > 3840 || width.min(height) > 2160 {
        "larger than 3840x2160"
    } else {
        return Ok(());
    };
    Err(CodecError::Picture {
        width,
        height,
        reason: reason.into(),
    })
}

/// The encoder reads rows through raw pointers: every row it reads must be in the slices.
fn check_planes(p: &YuvPlanes<'_>) -> Result<(), CodecError> {
    let (cw, ch) = p.subsampling.chroma_size(p.width, p.height);
    let fits = |plane: &[u8], stride: usize, w: u32, h: u32| {
        h == 0 || (stride >= w as usize && plane.len() >= (h as usize - 1) * stride + w as usize)
    };
    if fits(p.y, p.y_stride, p.width, p.height)
        && fits(p.u, p.u_stride, cw, ch)
        && fits(p.v, p.v_stride, cw, ch)
    {
        Ok(())
    } else {
        Err(CodecError::Picture {
            width: p.width,
            height: p.height,
            reason: "a plane is shorter than its stride and size say".into(),
        })
    }
}
