//! Ogg/Opus for the continuous speech stream (RFC 7845), sans IO: PCM in, bytes out.
//!
//! Two parts, because one stream has many listeners who join at different times:
//! - [`OpusEncoder`] (one per stream): PCM at any rate, resampled to 48 kHz, or silence,
//!   becomes 20 ms Opus frames ([`OpusFrame`], each decodable by itself once a decoder runs).
//! - [`OggMuxer`] (one per listener, a few KB of state): [`OggMuxer::headers`] (the
//!   OpusHead and OpusTags pages) first, then [`OggMuxer::page`] for the frames as they come.
//!   Each listener's stream therefore starts at page 0 and granule 0 with contiguous sequence
//!   numbers: a valid stream from its own first byte, whenever it joined. The server keeps
//!   the encoder's frames on a broadcast and each listener wraps them.
//!
//! [`OggOpusWriter`] is the two together for one reader (a file, a test).
//!
//! The page framing itself is the `ogg` crate's `PacketWriter`, writing into a `Vec` that
//! each call empties: still sans IO, and this module keeps control of where pages end (every
//! call ends its last page), which is what lets a listener join between any two calls.

use std::time::Duration;

use bytes::Bytes;
use ogg::{PacketWriteEndInfo, PacketWriter};

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
/// [`OggMuxer::page`] for the frames as they come. The framing (lacing, CRC, page flags,
/// sequence numbers) is the `ogg` crate's; this type decides where pages end and what
/// granule position each carries, and hands back the bytes of whole pages only.
pub struct OggMuxer {
    /// Writes whole pages into its `Vec`, which each call empties into what it returns.
    pages: PacketWriter<'static, Vec<u8>>,
    serial: u32,
    /// Granule position: the 48 kHz samples in pages so far, which (RFC 7845 §4) counts the
    /// pre-skip the decoder will drop.
    granule: u64,
    pre_skip: u16,
}

impl std::fmt::Debug for OggMuxer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OggMuxer")
            .field("serial", &self.serial)
            .field("granule", &self.granule)
            .field("pre_skip", &self.pre_skip)
            .finish_non_exhaustive()
    }
}

impl OggMuxer {
    /// `pre_skip` is the encoder's ([`OpusEncoder::pre_skip`]); `serial` names the stream.
    pub fn new(serial: u32, pre_skip: u16) -> OggMuxer {
        OggMuxer {
            pages: PacketWriter::new(Vec::new()),
            serial,
            granule: 0,
            pre_skip,
        }
    }

    /// The two header pages (OpusHead, then OpusTags), which must come first, each a page
    /// of its own (RFC 7845 §3).
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
        self.write(head, PacketWriteEndInfo::EndPage, 0);
        self.write(tags, PacketWriteEndInfo::EndPage, 0);
        self.take()
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
        let pages = frames.len().div_ceil(FRAMES_PER_PAGE);
        for (k, chunk) in frames.chunks(FRAMES_PER_PAGE).enumerate() {
            let last_page = end && k + 1 == pages;
            for (i, frame) in chunk.iter().enumerate() {
                self.granule += FRAME as u64;
                // A page ends with its chunk, so every call returns whole pages: a
                // listener's bytes never stop mid-page.
                let info = match (i + 1 == chunk.len(), last_page) {
                    (false, _) => PacketWriteEndInfo::NormalPacket,
                    (true, false) => PacketWriteEndInfo::EndPage,
                    (true, true) => PacketWriteEndInfo::EndStream,
                };
                let granule = match final_granule {
                    Some(g) if info == PacketWriteEndInfo::EndStream => g.min(self.granule),
                    _ => self.granule,
                };
                self.write(frame.0.to_vec(), info, granule);
            }
        }
        self.take()
    }

    fn write(&mut self, packet: Vec<u8>, info: PacketWriteEndInfo, granule: u64) {
        self.pages
            .write_packet(packet, self.serial, info, granule)
            .expect("writing pages into a Vec cannot fail");
    }

    /// The pages written since the last call.
    fn take(&mut self) -> Vec<u8> {
        std::mem::take(self.pages.inner_mut())
    }
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

    /// Reads `bytes` back with the `ogg` crate's reader, which checks every page's CRC.
    fn packets(bytes: &[u8]) -> Vec<ogg::Packet> {
        let mut reader = ogg::PacketReader::new(std::io::Cursor::new(bytes));
        let mut out = Vec::new();
        while let Some(packet) = reader.read_packet().unwrap() {
            out.push(packet);
        }
        out
    }

    /// Each page's (flags, granule, sequence) by walking the headers.
    fn pages(bytes: &[u8]) -> Vec<(u8, u64, u32)> {
        let mut at = 0;
        let mut out = Vec::new();
        while at < bytes.len() {
            assert_eq!(&bytes[at..at + 4], b"OggS");
            let flags = bytes[at + 5];
            let granule = u64::from_le_bytes(bytes[at + 6..at + 14].try_into().unwrap());
            let seq = u32::from_le_bytes(bytes[at + 18..at + 22].try_into().unwrap());
            let n = bytes[at + 26] as usize;
            let body: usize = bytes[at + 27..at + 27 + n]
                .iter()
                .map(|&v| v as usize)
                .sum();
            out.push((flags, granule, seq));
            at += 27 + n + body;
        }
        out
    }

    #[test]
    fn pages_are_framed() {
        let mut writer = OggOpusWriter::new(7).unwrap();
        let mut bytes = writer.silence(Duration::from_millis(50)).unwrap();
        bytes.extend(writer.finish().unwrap());
        let packets = packets(&bytes);
        assert!(packets[0].data.starts_with(b"OpusHead"));
        assert!(packets[1].data.starts_with(b"OpusTags"));
        assert!(packets.len() >= 3);
        assert!(packets.iter().all(|p| p.stream_serial() == 7));
        assert!(packets.last().unwrap().last_in_stream());
        // Head, tags, then audio pages; sequence 0, 1, 2, ...; begin and end flagged.
        let pages = pages(&bytes);
        let seqs: Vec<u32> = pages.iter().map(|p| p.2).collect();
        assert_eq!(seqs, (0..pages.len() as u32).collect::<Vec<_>>());
        assert_eq!(pages[0].0, 0x02);
        assert_eq!(pages.last().unwrap().0, 0x04);
        // The last granule is the length pushed plus the pre-skip, the padding trimmed.
        let pre_skip = u64::from(u16::from_le_bytes(
            packets[0].data[10..12].try_into().unwrap(),
        ));
        assert_eq!(pages.last().unwrap().1, 2400 + pre_skip);
    }

    #[test]
    fn every_call_returns_whole_pages_with_running_granules() {
        let frame = OpusFrame(Bytes::from_static(&[0xf8, 0xff, 0xfe]));
        let mut muxer = OggMuxer::new(3, 312);
        let headers = muxer.headers();
        assert_eq!(pages(&headers).len(), 2);
        // 45 frames: a page of 40 and one of 5, both ended by this call.
        let first = muxer.page(&vec![frame.clone(); 45]);
        let granules: Vec<u64> = pages(&first).iter().map(|p| p.1).collect();
        assert_eq!(granules, [40 * 960, 45 * 960]);
        assert!(muxer.page(&[]).is_empty());
        let second = muxer.page(std::slice::from_ref(&frame));
        assert_eq!(pages(&second), [(0, 46 * 960, 4)]);
        let mut all = headers;
        all.extend(first);
        all.extend(second);
        all.extend(muxer.last(&[frame], None));
        assert_eq!(packets(&all).len(), 2 + 47);
    }
}
