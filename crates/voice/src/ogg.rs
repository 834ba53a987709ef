//! Ogg/Opus for the continuous speech stream (RFC 7845), sans IO: PCM in, bytes out.
//!
//! Two parts, because one stream has many listeners who join at different times:
//! - [`OpusEncoder`] (one per stream): PCM at any rate, resampled to 48 kHz, or silence,
//!   becomes 20 ms Opus frames ([`OpusFrame`], each decodable by itself once a decoder runs).
//! - [`OggMuxer`] (one per listener, a few bytes of state): [`OggMuxer::headers`] (the
//!   OpusHead and OpusTags pages) first, then [`OggMuxer::page`] for the frames as they come.
//!   Each listener's stream therefore starts at page 0 and granule 0 with contiguous sequence
//!   numbers: a valid stream from its own first byte, whenever it joined. The server keeps
//!   the encoder's frames on a broadcast and each listener wraps them.
//!
//! [`OggOpusWriter`] is the two together for one reader (a file, a test).
//!
//! Why our own Ogg framing: a page is a 27-byte header, lacing values and a CRC (~80 lines
//! here); the `ogg` crate would add a dependency and hide the page boundaries, which are
//! exactly what live streaming needs to control.

use std::time::Duration;

use bytes::Bytes;

use crate::resample::Resampler;
use crate::{Pcm, VoiceError};

/// Opus's rate, and the unit of Ogg/Opus granule positions.
pub const OPUS_RATE: u32 = 48_000;
/// 20 ms at 48 kHz.
const FRAME: usize = 960;
/// Frames per page at most: 1 s, and far under 255 lacing values (a 20 ms frame of speech
/// at 32 kb/s is ~80 bytes, at most 1275 = 6 lacing values).
const FRAMES_PER_PAGE: usize = 40;

/// One 20 ms Opus packet (960 samples at 48 kHz).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpusFrame(pub Bytes);

/// PCM (any rate) and silence in, 20 ms Opus frames out. Mono, 48 kHz, 32 kb/s, VoIP mode.
pub struct OpusEncoder {
    encoder: opus::Encoder,
    resampler: Option<Resampler>,
    /// 48 kHz samples waiting for a whole frame.
    pending: Vec<f32>,
    pre_skip: u16,
    /// 48 kHz samples accepted so far (the stream's length, padding not counted).
    samples: u64,
    packet: Vec<u8>,
}

impl OpusEncoder {
    pub fn new() -> Result<OpusEncoder, VoiceError> {
        let mut encoder =
            opus::Encoder::new(OPUS_RATE, opus::Channels::Mono, opus::Application::Voip)?;
        encoder.set_bitrate(opus::Bitrate::Bits(32_000))?;
        let pre_skip = encoder.get_lookahead()?.clamp(0, u16::MAX as i32) as u16;
        Ok(OpusEncoder {
            encoder,
            resampler: None,
            pending: Vec::new(),
            pre_skip,
            samples: 0,
            packet: vec![0; 1500],
        })
    }

    /// The encoder's delay in 48 kHz samples: a decoder drops this many from the start.
    pub fn pre_skip(&self) -> u16 {
        self.pre_skip
    }

    /// How much audio was pushed, silence included (what the stream lasts once finished).
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.samples as f64 / OPUS_RATE as f64)
    }

    /// Adds `pcm`; returns the frames it completed. Consecutive pushes at one rate join
    /// seamlessly (the resampler holds the last 16 input samples until the next push, silence
    /// or `finish`).
    pub fn push(&mut self, pcm: &Pcm) -> Result<Vec<OpusFrame>, VoiceError> {
        if pcm.sample_rate == 0 {
            return Err(VoiceError::Audio("PCM with a sample rate of 0".into()));
        }
        let input: Vec<f32> = pcm.samples.iter().map(|&s| s as f32 / 32768.0).collect();
        if pcm.sample_rate == OPUS_RATE {
            self.flush_resampler();
            self.add(&input);
        } else {
            if self.resampler.as_ref().map(Resampler::rates) != Some((pcm.sample_rate, OPUS_RATE)) {
                self.flush_resampler();
                self.resampler = Some(Resampler::new(pcm.sample_rate, OPUS_RATE));
            }
            let mut out = Vec::with_capacity(input.len() * 48_000 / pcm.sample_rate as usize + 64);
            if let Some(r) = self.resampler.as_mut() {
                r.process(&input, &mut out);
            }
            self.add(&out);
        }
        self.encode_whole_frames()
    }

    /// Adds `duration` of silence after what was pushed.
    pub fn silence(&mut self, duration: Duration) -> Result<Vec<OpusFrame>, VoiceError> {
        self.flush_resampler();
        let n = (duration.as_secs_f64() * OPUS_RATE as f64).round() as usize;
        self.add(&vec![0.0; n]);
        self.encode_whole_frames()
    }

    /// Ends the stream: everything pushed comes out, through the encoder's delay, padded with
    /// silence to whole frames. The stream's exact length is [`OpusEncoder::duration`].
    pub fn finish(&mut self) -> Result<Vec<OpusFrame>, VoiceError> {
        self.flush_resampler();
        let padding = self.pre_skip as usize
            + (FRAME - (self.pending.len() + self.pre_skip as usize) % FRAME) % FRAME;
        self.pending.extend(std::iter::repeat_n(0.0, padding));
        self.encode_whole_frames()
    }

    fn add(&mut self, samples: &[f32]) {
        self.samples += samples.len() as u64;
        self.pending.extend_from_slice(samples);
    }

    fn flush_resampler(&mut self) {
        if let Some(mut r) = self.resampler.take() {
            let mut out = Vec::new();
            r.flush(&mut out);
            self.add(&out);
        }
    }

    fn encode_whole_frames(&mut self) -> Result<Vec<OpusFrame>, VoiceError> {
        let whole = self.pending.len() / FRAME * FRAME;
        let mut frames = Vec::with_capacity(whole / FRAME);
        for frame in self.pending[..whole].chunks_exact(FRAME) {
            let n = self.encoder.encode_float(frame, &mut self.packet)?;
            frames.push(OpusFrame(Bytes::copy_from_slice(&self.packet[..n])));
        }
        self.pending.drain(..whole);
        Ok(frames)
    }
}

/// Ogg pages for one listener of an Opus stream: [`OggMuxer::headers`] once, then
/// [`OggMuxer::page`] for the frames as they come.
#[derive(Debug, Clone)]
pub struct OggMuxer {
    serial: u32,
    sequence: u32,
    /// Granule position: the 48 kHz samples in pages so far, which (RFC 7845 §4) counts the
    /// pre-skip the decoder will drop.
    granule: u64,
    pre_skip: u16,
}

impl OggMuxer {
    /// `pre_skip` is the encoder's ([`OpusEncoder::pre_skip`]); `serial` names the stream.
    pub fn new(serial: u32, pre_skip: u16) -> OggMuxer {
        OggMuxer {
            serial,
            sequence: 0,
            granule: 0,
            pre_skip,
        }
    }

    /// The two header pages (OpusHead, then OpusTags), which must come first.
    pub fn headers(&mut self) -> Vec<u8> {
        let mut head = Vec::with_capacity(19);
        head.extend_from_slice(b"OpusHead");
        head.push(1); // version
        head.push(1); // channels
        head.extend_from_slice(&self.pre_skip.to_le_bytes());
        head.extend_from_slice(&OPUS_RATE.to_le_bytes());
        head.extend_from_slice(&0i16.to_le_bytes()); // output gain
        head.push(0); // mapping family 0: mono or stereo
        let vendor = b"kibitz";
        let mut tags = Vec::new();
        tags.extend_from_slice(b"OpusTags");
        tags.extend_from_slice(&(vendor.len() as u32).to_le_bytes());
        tags.extend_from_slice(vendor);
        tags.extend_from_slice(&0u32.to_le_bytes()); // no comments
        let mut out = self.write_page(&[&head], 0x02, 0);
        out.extend(self.write_page(&[&tags], 0, 0));
        out
    }

    /// Pages holding `frames` (at most one second each); empty for no frames.
    pub fn page(&mut self, frames: &[OpusFrame]) -> Vec<u8> {
        self.pages(frames, false, None)
    }

    /// The last pages: `frames` with the end-of-stream flag. `length` (48 kHz samples, pre-skip
    /// not counted), when given, trims the padding of the last frame.
    pub fn last(&mut self, frames: &[OpusFrame], length: Option<u64>) -> Vec<u8> {
        self.pages(frames, true, length.map(|n| n + self.pre_skip as u64))
    }

    fn pages(&mut self, frames: &[OpusFrame], end: bool, final_granule: Option<u64>) -> Vec<u8> {
        let mut out = Vec::new();
        let chunks: Vec<&[OpusFrame]> = frames.chunks(FRAMES_PER_PAGE).collect();
        for (k, chunk) in chunks.iter().enumerate() {
            let is_last = k + 1 == chunks.len();
            self.granule += (chunk.len() * FRAME) as u64;
            let mut granule = self.granule;
            if end && is_last {
                if let Some(g) = final_granule {
                    granule = g.min(granule);
                }
            }
            let packets: Vec<&[u8]> = chunk.iter().map(|f| &f.0[..]).collect();
            let flags = if end && is_last { 0x04 } else { 0 };
            out.extend(self.write_page(&packets, flags, granule));
        }
        out
    }

    fn write_page(&mut self, packets: &[&[u8]], flags: u8, granule: u64) -> Vec<u8> {
        let mut lacing = Vec::new();
        for p in packets {
            lacing.extend(std::iter::repeat_n(255u8, p.len() / 255));
            lacing.push((p.len() % 255) as u8);
        }
        debug_assert!(lacing.len() <= 255);
        let mut page =
            Vec::with_capacity(27 + lacing.len() + packets.iter().map(|p| p.len()).sum::<usize>());
        page.extend_from_slice(b"OggS");
        page.push(0); // version
        page.push(flags);
        page.extend_from_slice(&granule.to_le_bytes());
        page.extend_from_slice(&self.serial.to_le_bytes());
        page.extend_from_slice(&self.sequence.to_le_bytes());
        page.extend_from_slice(&[0; 4]); // CRC, filled in below
        page.push(lacing.len() as u8);
        page.extend_from_slice(&lacing);
        for p in packets {
            page.extend_from_slice(p);
        }
        let crc = crc32(&page);
        page[22..26].copy_from_slice(&crc.to_le_bytes());
        self.sequence += 1;
        page
    }
}

/// Ogg's CRC-32: polynomial 0x04C11DB7, not reflected, starting at 0, no final xor.
fn crc32(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut r = (i as u32) << 24;
            let mut bit = 0;
            while bit < 8 {
                r = if r & 0x8000_0000 != 0 {
                    (r << 1) ^ 0x04C1_1DB7
                } else {
                    r << 1
                };
                bit += 1;
            }
            table[i] = r;
            i += 1;
        }
        table
    };
    bytes.iter().fold(0u32, |crc, &b| {
        (crc << 8) ^ TABLE[((crc >> 24) as u8 ^ b) as usize]
    })
}

/// An Ogg/Opus stream for one reader: the headers come with the first bytes out.
pub struct OggOpusWriter {
    encoder: OpusEncoder,
    muxer: OggMuxer,
    headers: Option<Vec<u8>>,
}

impl OggOpusWriter {
    pub fn new(serial: u32) -> Result<OggOpusWriter, VoiceError> {
        let encoder = OpusEncoder::new()?;
        let mut muxer = OggMuxer::new(serial, encoder.pre_skip());
        let headers = Some(muxer.headers());
        Ok(OggOpusWriter {
            encoder,
            muxer,
            headers,
        })
    }

    /// Speech (any rate); returns the bytes now ready.
    pub fn push(&mut self, pcm: &Pcm) -> Result<Vec<u8>, VoiceError> {
        let frames = self.encoder.push(pcm)?;
        Ok(self.out(&frames))
    }

    /// `duration` of silence; returns the bytes now ready.
    pub fn silence(&mut self, duration: Duration) -> Result<Vec<u8>, VoiceError> {
        let frames = self.encoder.silence(duration)?;
        Ok(self.out(&frames))
    }

    /// The rest, ending the stream at exactly the length pushed.
    pub fn finish(mut self) -> Result<Vec<u8>, VoiceError> {
        let frames = self.encoder.finish()?;
        let mut out = self.headers.take().unwrap_or_default();
        out.extend(self.muxer.last(&frames, Some(self.encoder.samples)));
        Ok(out)
    }

    fn out(&mut self, frames: &[OpusFrame]) -> Vec<u8> {
        let mut out = self.headers.take().unwrap_or_default();
        out.extend(self.muxer.page(frames));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_ogg() {
        // CRC-32/CKSUM's check value (0x765E7680) without its final xor.
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0x89A1_897F);
    }

    #[test]
    fn pages_are_framed() {
        let mut writer = OggOpusWriter::new(7).unwrap();
        let mut bytes = writer.silence(Duration::from_millis(50)).unwrap();
        bytes.extend(writer.finish().unwrap());
        // Head, tags, then audio pages; each starts with OggS and has sequence 0, 1, 2, ...
        let mut at = 0;
        let mut seq = 0;
        while at < bytes.len() {
            assert_eq!(&bytes[at..at + 4], b"OggS");
            assert_eq!(
                u32::from_le_bytes(bytes[at + 18..at + 22].try_into().unwrap()),
                seq
            );
            let n = bytes[at + 26] as usize;
            let body: usize = bytes[at + 27..at + 27 + n]
                .iter()
                .map(|&v| v as usize)
                .sum();
            let mut page = bytes[at..at + 27 + n + body].to_vec();
            let crc = u32::from_le_bytes(page[22..26].try_into().unwrap());
            page[22..26].copy_from_slice(&[0; 4]);
            assert_eq!(crc32(&page), crc);
            at += 27 + n + body;
            seq += 1;
        }
        assert!(seq >= 3);
    }
}
