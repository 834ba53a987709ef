//! TEMPORARY stand-in with the agreed interface until the `codecs` branch lands; replaced
//! by the merge. Encodes nothing.

use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct EncoderConfig {
    pub width: u32,
    pub height: u32,
    pub fps: f32,
    pub bitrate_bps: u32,
}

#[derive(Debug, Clone)]
pub struct EncodedFrame {
    pub data: Vec<u8>,
    pub keyframe: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CodecError(String);

pub struct H264Encoder;

impl H264Encoder {
    pub fn new(_cfg: EncoderConfig) -> Result<Self, CodecError> {
        Err(CodecError("stand-in".into()))
    }

    pub fn encode(
        &mut self,
        _picture: &kibitz_media::Picture,
        _force_keyframe: bool,
    ) -> Result<EncodedFrame, CodecError> {
        Err(CodecError("stand-in".into()))
    }
}

pub struct H264Decoder;

impl H264Decoder {
    pub fn new() -> Result<Self, CodecError> {
        Err(CodecError("stand-in".into()))
    }

    pub fn decode(
        &mut self,
        _annexb: &[u8],
    ) -> Result<Option<kibitz_media::Picture<'_>>, CodecError> {
        Err(CodecError("stand-in".into()))
    }
}

pub fn rtp_timestamp_90k(capture: Duration) -> u32 {
    (capture.as_micros() * 9 / 100) as u32
}
