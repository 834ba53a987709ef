//! Raw pictures for the H.264 encoder, from the JPEGs the display buffer holds.
//!
//! The encoder reads the delayed picture the way every viewer does, through the stream's
//! playout, and the display buffer keeps JPEGs; so each frame sent is decoded once, for all
//! viewers of the stream (libjpeg-turbo; 4:2:0 straight to planes, which is what the
//! encoder takes; other subsamplings through RGB). A YUV copy kept by the frame sink would
//! save the decode but costs every stream memory and copies whether or not anyone watches
//! over WebRTC; the decode costs only while someone does.

use kibitz_frames::{Range, Subsampling, YuvPlanes};
use kibitz_media::Picture;
use turbojpeg::{Decompressor, Image, PixelFormat, Subsamp, YuvImage};

/// A reusable decoder and the buffer its pictures are borrowed from.
pub(crate) struct JpegPictures {
    decompressor: Decompressor,
    pixels: Vec<u8>,
}

impl JpegPictures {
    pub(crate) fn new() -> Result<JpegPictures, String> {
        Ok(JpegPictures {
            decompressor: Decompressor::new().map_err(|e| e.to_string())?,
            pixels: Vec::new(),
        })
    }

    /// The picture inside `jpeg`, borrowed from this decoder until the next call.
    pub(crate) fn decode(&mut self, jpeg: &[u8]) -> Result<Picture<'_>, String> {
        let header = self
            .decompressor
            .read_header(jpeg)
            .map_err(|e| format!("unreadable JPEG: {e}"))?;
        let (width, height) = (header.width, header.height);
        if header.subsamp == Subsamp::Sub2x2 {
            let len = turbojpeg::yuv_pixels_len(width, 1, height, Subsamp::Sub2x2)
                .map_err(|e| e.to_string())?;
            self.pixels.resize(len, 0);
            let image = YuvImage {
                pixels: self.pixels.as_mut_slice(),
                width,
                align: 1,
                height,
                subsamp: Subsamp::Sub2x2,
            };
            self.decompressor
                .decompress_to_yuv(jpeg, image)
                .map_err(|e| format!("undecodable JPEG: {e}"))?;
            // libjpeg-turbo pads the luma plane to whole 2x2 blocks: an odd width or
            // height has one more column or row there.
            let (cw, ch) = (width.div_ceil(2), height.div_ceil(2));
            let y_stride = cw * 2;
            let (y, chroma) = self.pixels.split_at(y_stride * ch * 2);
            let (u, v) = chroma.split_at(cw * ch);
            return Ok(Picture::Yuv(YuvPlanes {
                width: width as u32,
                height: height as u32,
                y,
                u,
                v,
                y_stride,
                u_stride: cw,
                v_stride: cw,
                subsampling: Subsampling::S420,
                range: Range::Full,
            }));
        }
        let pitch = width * 3;
        self.pixels.resize(pitch * height, 0);
        let image = Image {
            pixels: self.pixels.as_mut_slice(),
            width,
            pitch,
            height,
            format: PixelFormat::RGB,
        };
        self.decompressor
            .decompress(jpeg, image)
            .map_err(|e| format!("undecodable JPEG: {e}"))?;
        Ok(Picture::Rgb {
            width: width as u32,
            height: height as u32,
            pitch,
            data: &self.pixels,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg(width: usize, height: usize, subsamp: Subsamp) -> Vec<u8> {
        let pixels: Vec<u8> = (0..width * height * 3).map(|i| (i % 251) as u8).collect();
        let image = Image {
            pixels: pixels.as_slice(),
            width,
            pitch: width * 3,
            height,
            format: PixelFormat::RGB,
        };
        turbojpeg::compress(image, 90, subsamp).unwrap().to_vec()
    }

    #[test]
    fn a_420_jpeg_becomes_planes_of_its_size() {
        let mut pictures = JpegPictures::new().unwrap();
        match pictures.decode(&jpeg(33, 17, Subsamp::Sub2x2)).unwrap() {
            Picture::Yuv(p) => {
                assert_eq!((p.width, p.height), (33, 17));
                assert!(p.y.len() >= p.y_stride * 17 && p.y_stride >= 33);
                assert_eq!((p.u.len(), p.v.len()), (17 * 9, 17 * 9));
                assert_eq!((p.u_stride, p.v_stride), (17, 17));
            }
            other => panic!("expected planes, got {other:?}"),
        }
    }

    #[test]
    fn other_subsamplings_come_as_rgb() {
        let mut pictures = JpegPictures::new().unwrap();
        match pictures.decode(&jpeg(16, 8, Subsamp::Sub2x1)).unwrap() {
            Picture::Rgb {
                width,
                height,
                pitch,
                data,
            } => {
                assert_eq!((width, height, pitch), (16, 8, 48));
                assert_eq!(data.len(), 48 * 8);
            }
            other => panic!("expected RGB, got {other:?}"),
        }
    }

    #[test]
    fn a_broken_jpeg_is_an_error() {
        let mut pictures = JpegPictures::new().unwrap();
        assert!(pictures.decode(b"not a jpeg").is_err());
    }
}
