//! The H.264 encoder of one stream. See the module docs of [`crate::codec`].

use openh264::encoder::{
    BitRate, Encoder, EncoderConfig as OpenH264Config, FrameRate, FrameType, Profile,
    RateControlMode, UsageType,
};
use openh264::{OpenH264API, Timestamp};

use super::i420::{even_size, Converter};
use super::{CodecError, EncodedFrame, EncoderConfig, Picture};

/// Encodes the pictures of one stream, one access unit each, in the order given.
///
/// Constrained baseline (no B-frames, so no reordering and no lookahead), one slice a
/// picture, constant bitrate without skipped frames, one thread: a stream is encoded once
/// for all its viewers, so one core's share is what one stream costs. A picture of another
/// size than the last starts a fresh encoder at that size, whose first picture is a
/// keyframe.
pub struct H264Encoder {
    config: EncoderConfig,
    /// The encoder and the (even) size it was made for.
    inner: Option<(Encoder, (u32, u32))>,
    converter: Converter,
    /// Pictures encoded since the encoder was made: the encoder's own clock.
    frames: u64,
}

impl std::fmt::Debug for H264Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H264Encoder")
            .field("config", &self.config)
            .field("size", &self.inner.as_ref().map(|(_, size)| *size))
            .finish_non_exhaustive()
    }
}

impl H264Encoder {
    /// An encoder for pictures of `cfg.width` x `cfg.height` (others are accepted too; see
    /// the type docs).
    pub fn new(cfg: EncoderConfig) -> Result<Self, CodecError> {
        if !(cfg.fps.is_finite() && cfg.fps > 0.0 && cfg.fps <= 240.0) {
            return Err(CodecError::Config(format!(
                "frame rate {} is not in 0..=240",
                cfg.fps
            )));
        }
        if !(10_000..=100_000_000).contains(&cfg.bitrate_bps) {
            return Err(CodecError::Config(format!(
                "bitrate {} bit/s is not in 10 kbit/s..=100 Mbit/s",
                cfg.bitrate_bps
            )));
        }
        let mut encoder = Self {
            config: cfg,
            inner: None,
            converter: Converter::default(),
            frames: 0,
        };
        encoder.inner = Some((open(&cfg)?, even_size(cfg.width, cfg.height)));
        Ok(encoder)
    }

    /// Encodes the next picture of the stream; `force_keyframe` makes it an IDR picture (a
    /// new viewer, or a viewer's PLI/FIR).
    pub fn encode(
        &mut self,
        picture: &Picture<'_>,
        force_keyframe: bool,
    ) -> Result<EncodedFrame, CodecError> {
        let i420 = self.converter.convert(picture)?;
        let size = i420.size();
        let fresh = match &self.inner {
            Some((_, made_for)) => *made_for != size,
            None => true,
        };
        if fresh {
            // Drop the old encoder first: two alive at 4K would hold both sets of buffers.
            self.inner = None;
            self.frames = 0;
            let encoder = open(&self.config)?;
            self.inner = Some((encoder, size));
        }
        let Some((encoder, _)) = &mut self.inner else {
            unreachable!("made just above");
        };
        if force_keyframe {
            encoder.force_intra_frame();
        }
        let millis = (self.frames as f64 * 1000.0 / f64::from(self.config.fps)) as u64;
        let stream = encoder
            .encode_at(&i420, Timestamp::from_millis(millis))
            .map_err(|e| CodecError::Encode(e.to_string()))?;
        self.frames += 1;
        Ok(EncodedFrame {
            keyframe: stream.frame_type() == FrameType::IDR,
            data: stream.to_vec(),
        })
    }
}

fn open(config: &EncoderConfig) -> Result<Encoder, CodecError> {
    let settings = OpenH264Config::new()
        .profile(Profile::Baseline)
        .usage_type(UsageType::CameraVideoRealTime)
        .rate_control_mode(RateControlMode::Bitrate)
        .bitrate(BitRate::from_bps(config.bitrate_bps))
        .max_frame_rate(FrameRate::from_hz(config.fps))
        // A skipped frame would leave a viewer's picture behind the words.
        .skip_frames(false)
        .num_threads(1);
    Encoder::with_api_config(OpenH264API::from_source(), settings)
        .map_err(|e| CodecError::Encode(e.to_string()))
}
