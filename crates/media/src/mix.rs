//! The spoken commentary mixed over a file's own sound, for the extra audio track of
//! `kibitz annotate --voice`: the original audio decoded, the speech (one mono track on the
//! file's media time, silence between clips) laid over it, the original ducked while the
//! voice speaks, and the mix encoded as AAC, all in memory before the output is written.
//!
//! Everything is FFmpeg's own filters, in one graph:
//! `sidechaincompress` keyed by the speech lowers the original under the voice (10 to 15
//! dB, back within half a second), and `amix` adds the voice on top. With no audio in
//! the file, the track is the voice alone.

use std::path::Path;

use ff::codec;
use ff::filter;
use ff::format::{sample::Type as SampleType, Sample};
use ff::media::Type;
use ff::util::channel_layout::ChannelLayout;
use ff::util::error::EAGAIN;
use ff::util::frame::Audio as AudioFrame;
use ff::{Packet, Rational, Rescale};
use ffmpeg_next as ff;

use crate::decode::describe;
use crate::MuxError;

/// The spoken commentary as one track: 16-bit mono samples at `sample_rate`, sample 0 at
/// media time 0 (the container's start).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpeechTrack {
    pub sample_rate: u32,
    pub samples: Vec<i16>,
}

/// The encoded mix: its codec parameters and its packets, timestamps in `time_base` on the
/// copy's timeline (0 at the container's start).
pub(crate) struct Mixed {
    pub parameters: codec::Parameters,
    pub time_base: Rational,
    pub packets: Vec<Packet>,
}

const RATE: i32 = 48_000;
/// Samples of speech pushed per frame.
const CHUNK: usize = 1024;

/// Decodes `input`'s best audio stream, mixes `speech` over it with ducking, and encodes the
/// result as AAC (48 kHz stereo). `start` is the container's start time (AV_TIME_BASE
/// units), taken off the original's timestamps.
pub(crate) fn mix(input: &Path, speech: &SpeechTrack, start: i64) -> Result<Mixed, MuxError> {
    let what = input.display().to_string();
    let err = |stage: &str, e: ff::Error| MuxError::Output {
        what: what.clone(),
        reason: format!("mixing the commentary's sound: {stage}: {}", describe(e)),
    };
    let mut ictx = ff::format::input(input).map_err(|e| err("open", e))?;
    let audio = ictx.streams().best(Type::Audio).map(|s| {
        (
            s.index(),
            s.time_base(),
            codec::context::Context::from_parameters(s.parameters()),
        )
    });
    let mut decoder = match audio {
        Some((index, tb, Ok(ctx))) => Some((
            index,
            tb,
            ctx.decoder().audio().map_err(|e| err("audio decoder", e))?,
        )),
        Some((_, _, Err(e))) => return Err(err("audio decoder", e)),
        None => None,
    };

    let encoder = {
        let codec = ff::encoder::find(codec::Id::AAC).ok_or_else(|| MuxError::Output {
            what: what.clone(),
            reason: "this FFmpeg has no AAC encoder".into(),
        })?;
        let mut enc = codec::context::Context::new_with_codec(codec)
            .encoder()
            .audio()
            .map_err(|e| err("AAC encoder", e))?;
        enc.set_rate(RATE);
        enc.set_channel_layout(ChannelLayout::STEREO);
        enc.set_channels(2);
        enc.set_format(Sample::F32(SampleType::Planar));
        enc.set_bit_rate(128_000);
        enc.set_time_base(Rational::new(1, RATE));
        // MP4 and Matroska both keep codec headers once, in the stream's description.
        enc.set_flags(codec::flag::Flags::GLOBAL_HEADER);
        enc.open_as(codec).map_err(|e| err("AAC encoder", e))?
    };
    let frame_size = encoder.frame_size().max(1);

    let mut graph = filter::Graph::new();
    let speech_rate = speech.sample_rate.max(1);
    graph
        .add(
            &filter::find("abuffer").expect("FFmpeg has abuffer"),
            "speech",
            &format!("time_base=1/{speech_rate}:sample_rate={speech_rate}:sample_fmt=s16:channel_layout=mono"),
        )
        .map_err(|e| err("speech source", e))?;
    let to_stereo = format!("aformat=sample_fmts=fltp:sample_rates={RATE}:channel_layouts=stereo");
    let spec = if let Some((_, _, dec)) = &decoder {
        let layout = match dec.channel_layout().bits() {
            0 => ChannelLayout::default(i32::from(dec.channels())).bits(),
            bits => bits,
        };
        graph
            .add(
                &filter::find("abuffer").expect("FFmpeg has abuffer"),
                "orig",
                &format!(
                    "time_base=1/{}:sample_rate={}:sample_fmt={}:channel_layout=0x{layout:x}",
                    dec.rate(),
                    dec.rate(),
                    dec.format().name()
                ),
            )
            .map_err(|e| err("audio source", e))?;
        format!(
            "[orig]{to_stereo}[o];[speech]{to_stereo},asplit=2[key][voice];\
             [o][key]sidechaincompress=threshold=0.02:ratio=4:attack=20:release=500[ducked];\
             [ducked][voice]amix=inputs=2:duration=first:normalize=0,{to_stereo}[out]"
        )
    } else {
        format!("[speech]{to_stereo}[out]")
    };
    graph
        .add(
            &filter::find("abuffersink").expect("FFmpeg has abuffersink"),
            "out",
            "",
        )
        .map_err(|e| err("sink", e))?;
    let parser = graph.output("speech", 0).map_err(|e| err("graph", e))?;
    let parser = if decoder.is_some() {
        parser.output("orig", 0).map_err(|e| err("graph", e))?
    } else {
        parser
    };
    parser
        .input("out", 0)
        .map_err(|e| err("graph", e))?
        .parse(&spec)
        .map_err(|e| err("graph", e))?;
    graph.validate().map_err(|e| err("graph", e))?;
    graph
        .get("out")
        .expect("added")
        .sink()
        .set_frame_size(frame_size);

    let mut mixer = Mixer {
        graph,
        encoder,
        packets: Vec::new(),
        speech,
        speech_sent: 0,
        out_samples: 0,
    };
    if let Some((index, tb, dec)) = decoder.as_mut() {
        let offset = start.rescale(Rational::new(1, ff::ffi::AV_TIME_BASE), *tb);
        let mut frame = AudioFrame::empty();
        // The next original sample's time, in samples; `None` before the first.
        let mut next: Option<i64> = None;
        let mut feed = |mixer: &mut Mixer, dec: &mut ff::decoder::Audio| -> Result<(), MuxError> {
            while dec.receive_frame(&mut frame).is_ok() {
                let rate = dec.rate().max(1) as i32;
                // The original's first sound on the copy's timeline, then sample by sample,
                // as a gapless track is.
                let pts = *next.get_or_insert_with(|| {
                    let t = frame.timestamp().unwrap_or(offset) - offset;
                    t.max(0).rescale(*tb, Rational::new(1, rate))
                });
                frame.set_pts(Some(pts));
                next = Some(pts + frame.samples() as i64);
                let until = frame.pts().map_or(0.0, |p| p as f64 / f64::from(rate))
                    + frame.samples() as f64 / f64::from(rate);
                mixer
                    .send_speech_until(until + 1.0)
                    .map_err(|e| err("speech", e))?;
                mixer
                    .graph
                    .get("orig")
                    .expect("added")
                    .source()
                    .add(&frame)
                    .map_err(|e| err("audio into the mix", e))?;
                mixer.drain().map_err(|e| err("mix", e))?;
            }
            Ok(())
        };
        for (stream, packet) in ictx.packets() {
            if stream.index() != *index {
                continue;
            }
            if dec.send_packet(&packet).is_err() {
                continue; // a damaged packet: a moment of silence, not a failure
            }
            feed(&mut mixer, dec)?;
        }
        let _ = dec.send_eof();
        feed(&mut mixer, dec)?;
        mixer
            .graph
            .get("orig")
            .expect("added")
            .source()
            .flush()
            .map_err(|e| err("mix", e))?;
    }
    mixer
        .send_speech_until(f64::INFINITY)
        .map_err(|e| err("speech", e))?;
    mixer
        .graph
        .get("speech")
        .expect("added")
        .source()
        .flush()
        .map_err(|e| err("mix", e))?;
    mixer.drain().map_err(|e| err("mix", e))?;
    mixer.encoder.send_eof().map_err(|e| err("AAC", e))?;
    mixer.receive_packets().map_err(|e| err("AAC", e))?;
    Ok(Mixed {
        parameters: codec::Parameters::from(&mixer.encoder),
        time_base: Rational::new(1, RATE),
        packets: mixer.packets,
    })
}

struct Mixer<'a> {
    graph: filter::Graph,
    encoder: ff::encoder::Audio,
    packets: Vec<Packet>,
    speech: &'a SpeechTrack,
    /// Speech samples pushed into the graph so far.
    speech_sent: usize,
    /// Mixed samples sent to the encoder so far.
    out_samples: i64,
}

impl Mixer<'_> {
    /// Pushes the speech up to `seconds` of media time into the graph.
    fn send_speech_until(&mut self, seconds: f64) -> Result<(), ff::Error> {
        let rate = self.speech.sample_rate.max(1);
        let until = if seconds.is_finite() {
            ((seconds * f64::from(rate)) as usize).min(self.speech.samples.len())
        } else {
            self.speech.samples.len()
        };
        while self.speech_sent < until {
            let n = CHUNK.min(until - self.speech_sent);
            let mut frame =
                AudioFrame::new(Sample::I16(SampleType::Packed), n, ChannelLayout::MONO);
            frame.set_rate(rate);
            frame.set_channels(1);
            frame.set_pts(Some(self.speech_sent as i64));
            let bytes = frame.data_mut(0);
            for (i, s) in self.speech.samples[self.speech_sent..self.speech_sent + n]
                .iter()
                .enumerate()
            {
                bytes[2 * i..2 * i + 2].copy_from_slice(&s.to_ne_bytes());
            }
            self.graph
                .get("speech")
                .expect("added")
                .source()
                .add(&frame)?;
            self.speech_sent += n;
            self.drain()?;
        }
        Ok(())
    }

    /// Takes every mixed frame the graph has ready to the encoder.
    fn drain(&mut self) -> Result<(), ff::Error> {
        let mut frame = AudioFrame::empty();
        loop {
            match self
                .graph
                .get("out")
                .expect("added")
                .sink()
                .frame(&mut frame)
            {
                Ok(()) => {
                    frame.set_pts(Some(self.out_samples));
                    self.out_samples += frame.samples() as i64;
                    self.encoder.send_frame(&frame)?;
                    self.receive_packets()?;
                }
                Err(ff::Error::Other { errno: EAGAIN }) | Err(ff::Error::Eof) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    fn receive_packets(&mut self) -> Result<(), ff::Error> {
        loop {
            let mut packet = Packet::empty();
            match self.encoder.receive_packet(&mut packet) {
                Ok(()) => self.packets.push(packet),
                Err(ff::Error::Other { errno: EAGAIN }) | Err(ff::Error::Eof) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}
