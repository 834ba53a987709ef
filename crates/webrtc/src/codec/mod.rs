//! H.264 between kibitz's pictures and RTP: the encoder that turns a stream's playout into
//! what WHEP viewers receive, and the decoder that turns a WHIP publisher's video into
//! pictures for the frame sink.
//!
//! Both sit on OpenH264 (`openh264`, built from its bundled source), which every browser can
//! decode as constrained baseline, and which needs no system library. The encoder takes any
//! [`Picture`] a source hands out (planar YUV, packed RGB or a camera's JPEG), so its caller
//! chooses where raw pictures come from; `docs/benchmarks.md` ("H.264 for WebRTC") has the
//! measurements behind that choice. It emits one access unit per picture with no lookahead,
//! so the delay it adds is its own run time.
//!
//! RTP wants a 90 kHz clock; [`rtp_timestamp_90k`] derives it from the capture time alone,
//! so the same frame has the same timestamp for every viewer and the commentary can name the
//! frame its window ends on by that number.

mod decoder;
mod encoder;
mod i420;

use std::time::Duration;

pub use decoder::H264Decoder;
pub use encoder::H264Encoder;
pub use kibitz_media::Picture;

/// What an [`H264Encoder`] makes: the size it starts at (a picture of another size restarts
/// it at that size), the rate it is told frames come at, and the bitrate it aims for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncoderConfig {
    pub width: u32,
    pub height: u32,
    /// Frames a second; rate control spreads `bitrate_bps` over this many frames.
    pub fps: f32,
    /// Target bitrate in bits a second (constant-bitrate rate control, no frame skipping).
    pub bitrate_bps: u32,
}

/// One encoded picture: an H.264 access unit in Annex-B form (start codes), ready for RTP
/// packetization (packetization-mode 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedFrame {
    /// NAL units with start codes; every IDR picture is preceded by its SPS and PPS, so a
    /// viewer can start decoding at any keyframe.
    pub data: Vec<u8>,
    /// An IDR picture: a decoder may start here.
    pub keyframe: bool,
}

/// Why a picture could not be encoded or a bitstream decoded.
#[derive(thiserror::Error, Debug)]
pub enum CodecError {
    #[error("invalid encoder setting: {0}")]
    Config(String),
    #[error("picture of {width}x{height} cannot be encoded: {reason}")]
    Picture {
        width: u32,
        height: u32,
        reason: String,
    },
    #[error("JPEG picture: {0}")]
    Jpeg(#[from] turbojpeg::Error),
    #[error("H.264 encoder: {0}")]
    Encode(String),
    #[error("H.264 decoder: {0}")]
    Decode(String),
}

/// The RTP timestamp (90 kHz clock, RFC 6184) of a frame captured at `capture` since its
/// source's start: a fixed function of capture time, wrapping at 2^32 like RTP does.
pub fn rtp_timestamp_90k(capture: Duration) -> u32 {
    let ticks = capture.as_nanos() * 90_000 / 1_000_000_000;
    // RTP timestamps are modulo 2^32 (RFC 3550 §5.1): the truncation is the wrap.
    ticks as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtp_timestamp_counts_90k_ticks_and_wraps() {
        assert_eq!(rtp_timestamp_90k(Duration::ZERO), 0);
        assert_eq!(rtp_timestamp_90k(Duration::from_millis(40)), 3_600);
        assert_eq!(rtp_timestamp_90k(Duration::from_secs(1)), 90_000);
        // 2^32 ticks at 90 kHz is 47721.858844... s; one second later is 90_000 ticks past 0.
        let wrap = Duration::from_nanos(4_294_967_296 * 1_000_000_000 / 90_000 + 1);
        assert!(rtp_timestamp_90k(wrap) < 2);
        assert_eq!(
            rtp_timestamp_90k(wrap + Duration::from_secs(1)),
            rtp_timestamp_90k(wrap).wrapping_add(90_000)
        );
    }
}
