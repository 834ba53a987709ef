//! The H.264 decoder of one published stream (WHIP). See the module docs of [`crate::codec`].

use kibitz_frames::{Range, Subsampling, YuvPlanes};
use openh264::decoder::Decoder;
use openh264::formats::YUVSource;
use openh264::OpenH264API;

use super::{CodecError, Picture};

/// Decodes one H.264 stream, access unit by access unit, into 4:2:0 limited-range pictures.
///
/// The picture is copied out of OpenH264's buffers into the decoder's own (about 1.4 MB at
/// 720p), because OpenH264 reuses its buffers on the next call and the `openh264` crate
/// lends them only for as long as its own frame value lives.
pub struct H264Decoder {
    inner: Decoder,
    width: u32,
    height: u32,
    planes: [Vec<u8>; 3],
}

impl std::fmt::Debug for H264Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "H264Decoder({}x{})", self.width, self.height)
    }
}

impl H264Decoder {
    pub fn new() -> Result<Self, CodecError> {
        let inner = Decoder::with_api_config(
            OpenH264API::from_source(),
            openh264::decoder::DecoderConfig::new(),
        )
        .map_err(|e| CodecError::Decode(e.to_string()))?;
        Ok(Self {
            inner,
            width: 0,
            height: 0,
            planes: Default::default(),
        })
    }

    /// Decodes one access unit (Annex-B NAL units). `None` when it completes no picture yet
    /// (parameter sets alone); an error for a corrupt or undecodable stream, after which the
    /// next keyframe starts afresh.
    pub fn decode(&mut self, annexb: &[u8]) -> Result<Option<Picture<'_>>, CodecError> {
        let decoded = self
            .inner
            .decode(annexb)
            .map_err(|e| CodecError::Decode(e.to_string()))?;
        let Some(yuv) = decoded else {
            return Ok(None);
        };
        let (w, h) = yuv.dimensions();
        let (cw, ch) = yuv.dimensions_uv();
        let (ys, us, vs) = yuv.strides();
        copy_plane(&mut self.planes[0], yuv.y(), ys, w, h);
        copy_plane(&mut self.planes[1], yuv.u(), us, cw, ch);
        copy_plane(&mut self.planes[2], yuv.v(), vs, cw, ch);
        let too_big = |_| CodecError::Decode(format!("picture of {w}x{h}"));
        self.width = u32::try_from(w).map_err(too_big)?;
        self.height = u32::try_from(h).map_err(too_big)?;
        Ok(Some(Picture::Yuv(YuvPlanes {
            width: self.width,
            height: self.height,
            y: &self.planes[0],
            u: &self.planes[1],
            v: &self.planes[2],
            y_stride: w,
            u_stride: cw,
            v_stride: cw,
            subsampling: Subsampling::S420,
            range: Range::Limited,
        })))
    }
}

/// Copies `height` rows of `width` samples out of a strided plane, packed.
fn copy_plane(dst: &mut Vec<u8>, src: &[u8], stride: usize, width: usize, height: usize) {
    dst.clear();
    for row in src.chunks(stride).take(height) {
        dst.extend_from_slice(&row[..width]);
    }
}
