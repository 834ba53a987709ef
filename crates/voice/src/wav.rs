//! WAV in and out: `espeak-ng --stdout` and speech servers answer in WAV, `kibitz say` writes
//! it. Only 16-bit PCM (what all of them use); more channels are mixed down to one.

use std::io::Write;

use crate::{Pcm, VoiceError};

/// Reads a 16-bit PCM WAV. Streamed WAVs (espeak's, many servers') give a size of 0 or
/// 0xFFFFFFFF for their data, so the data runs to the end of the bytes.
pub fn read_wav(bytes: &[u8]) -> Result<Pcm, VoiceError> {
    let bad = |why: &str| VoiceError::Audio(format!("not a 16-bit PCM WAV: {why}"));
    if bytes.len() < 12 || &bytes[..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return Err(bad("no RIFF/WAVE header"));
    }
    let mut at = 12;
    let mut format: Option<(u16, u16, u32, u16)> = None;
    while at + 8 <= bytes.len() {
        let id = &bytes[at..at + 4];
        let size = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        let body = at + 8;
        if id == b"fmt " {
            let f = bytes
                .get(body..body + 16)
                .ok_or_else(|| bad("short fmt chunk"))?;
            let le16 = |i: usize| u16::from_le_bytes([f[i], f[i + 1]]);
            let rate = u32::from_le_bytes(f[4..8].try_into().unwrap());
            format = Some((le16(0), le16(2), rate, le16(14)));
        } else if id == b"data" {
            let (tag, channels, rate, bits) = format.ok_or_else(|| bad("data before fmt"))?;
            // 1 = PCM, 0xFFFE = extensible (whose sub-format we take to be PCM).
            if !(tag == 1 || tag == 0xFFFE) || bits != 16 || channels == 0 || rate == 0 {
                return Err(bad(&format!(
                    "format {tag}, {bits} bits, {channels} channels"
                )));
            }
            let end = body.saturating_add(size).min(bytes.len());
            let data = &bytes[body..end];
            let channels = channels as usize;
            let samples = data
                .chunks_exact(2 * channels)
                .map(|frame| {
                    let sum: i32 = frame
                        .chunks_exact(2)
                        .map(|s| i16::from_le_bytes([s[0], s[1]]) as i32)
                        .sum();
                    (sum / channels as i32) as i16
                })
                .collect();
            return Ok(Pcm {
                samples,
                sample_rate: rate,
            });
        }
        at = body.saturating_add(size + (size & 1));
    }
    Err(bad("no data chunk"))
}

/// Writes `pcm` as a 16-bit mono PCM WAV.
pub fn write_wav(pcm: &Pcm, mut out: impl Write) -> std::io::Result<()> {
    let data_len = (pcm.samples.len() * 2) as u32;
    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"RIFF");
    header.extend_from_slice(&(36 + data_len).to_le_bytes());
    header.extend_from_slice(b"WAVEfmt ");
    header.extend_from_slice(&16u32.to_le_bytes());
    header.extend_from_slice(&1u16.to_le_bytes()); // PCM
    header.extend_from_slice(&1u16.to_le_bytes()); // mono
    header.extend_from_slice(&pcm.sample_rate.to_le_bytes());
    header.extend_from_slice(&(pcm.sample_rate * 2).to_le_bytes());
    header.extend_from_slice(&2u16.to_le_bytes());
    header.extend_from_slice(&16u16.to_le_bytes());
    header.extend_from_slice(b"data");
    header.extend_from_slice(&data_len.to_le_bytes());
    out.write_all(&header)?;
    let mut data = Vec::with_capacity(pcm.samples.len() * 2);
    for s in &pcm.samples {
        data.extend_from_slice(&s.to_le_bytes());
    }
    out.write_all(&data)?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let pcm = Pcm {
            samples: vec![0, 1, -1, i16::MAX, i16::MIN, 1234],
            sample_rate: 22050,
        };
        let mut bytes = Vec::new();
        write_wav(&pcm, &mut bytes).unwrap();
        assert_eq!(bytes.len(), 44 + 12);
        assert_eq!(read_wav(&bytes).unwrap(), pcm);
        // A streamed header (size 0xFFFFFFFF) reads to the end.
        bytes[40..44].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(read_wav(&bytes).unwrap(), pcm);
        assert!(read_wav(b"RIFF....WAVEjunk").is_err());
        assert!(read_wav(b"hello").is_err());
    }
}
