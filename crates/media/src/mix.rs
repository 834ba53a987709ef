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

/// The rate of a [`SpeechTrack`]: the mix's own (and Opus's), so the graph takes the speech
/// as it is. Speech at another rate is converted before it comes here, by the voice crate's
/// resampler (`kibitz_voice::Resampler`), the one the live speech stream uses too.
pub const SPEECH_RATE: u32 = 48_000;

/// The spoken commentary as one track: 16-bit mono samples at [`SPEECH_RATE`], sample 0 at
/// media time 0 (the container's start).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpeechTrack {
    pub samples: Vec<i16>,
}

/// The encoded mix: its codec parameters and its packets, timestamps in `time_base` on the
/// copy's timeline (0 at the container's start).
pub(crate) struct Mixed {
    pub parameters: codec::Parameters,
    pub time_base: Rational,
    pub packets: Vec<Packet>,
}

const RATE: i32 = SPEECH_RATE as i32;
/// Samples of speech pushed per frame.
const CHUNK: usize = 1024;

/// Decodes `input`'s best audio stream, mixes `speech` over it with ducking, and encodes the
/// result as AAC (48 kHz stereo). `start` is the container's start time (AV_TIME_BASE
/// units), taken off the original's timestamps.
pub(crate) fn mix(input: &Path, speech: &SpeechTrack, start: i64) -> Result<Mixed, MuxError> {
    let what = input.display().to_string();
    let err = |stage: &str| {
        let what = what.clone();
        let stage = stage.to_owned();
        move |e: ff::Error| failed(&what, &stage, e)
    };
    let mut ictx = ff::format::input(input).map_err(err("open"))?;
    let mut original = original_audio(&ictx).map_err(err("audio decoder"))?;
    let encoder = aac_encoder(&what)?;
    let graph = mix_graph(original.as_ref().map(|o| &o.decoder), &encoder).map_err(err("graph"))?;
    let mut mixer = Mixer {
        graph,
        encoder,
        packets: Vec::new(),
        speech,
        speech_sent: 0,
        out_samples: 0,
    };
    if let Some(original) = original.as_mut() {
        mixer.mix_original(&mut ictx, original, start, &what)?;
    }
    mixer.finish().map_err(err("mix"))?;
    Ok(Mixed {
        parameters: codec::Parameters::from(&mixer.encoder),
        time_base: Rational::new(1, RATE),
        packets: mixer.packets,
    })
}

fn failed(what: &str, stage: &str, e: ff::Error) -> MuxError {
    MuxError::Output {
        what: what.to_owned(),
        reason: format!("mixing the commentary's sound: {stage}: {}", describe(e)),
    }
}

/// The file's best audio stream and its decoder.
struct Original {
    index: usize,
    time_base: Rational,
    decoder: ff::decoder::Audio,
}

/// The decoder of `ictx`'s best audio stream; `None` for a file without sound.
fn original_audio(ictx: &ff::format::context::Input) -> Result<Option<Original>, ff::Error> {
    let Some(stream) = ictx.streams().best(Type::Audio) else {
        return Ok(None);
    };
    let decoder = codec::context::Context::from_parameters(stream.parameters())?
        .decoder()
        .audio()?;
    Ok(Some(Original {
        index: stream.index(),
        time_base: stream.time_base(),
        decoder,
    }))
}

/// AAC, 48 kHz stereo, 128 kb/s, headers kept once in the stream's description.
fn aac_encoder(what: &str) -> Result<ff::encoder::Audio, MuxError> {
    let codec = ff::encoder::find(codec::Id::AAC).ok_or_else(|| MuxError::Output {
        what: what.to_owned(),
        reason: "this FFmpeg has no AAC encoder".into(),
    })?;
    let open = || -> Result<ff::encoder::Audio, ff::Error> {
        let mut enc = codec::context::Context::new_with_codec(codec)
            .encoder()
            .audio()?;
        enc.set_rate(RATE);
        enc.set_channel_layout(ChannelLayout::STEREO);
        enc.set_channels(2);
        enc.set_format(Sample::F32(SampleType::Planar));
        enc.set_bit_rate(128_000);
        enc.set_time_base(Rational::new(1, RATE));
        // MP4 and Matroska both keep codec headers once, in the stream's description.
        enc.set_flags(codec::flag::Flags::GLOBAL_HEADER);
        enc.open_as(codec)
    };
    open().map_err(|e| failed(what, "AAC encoder", e))
}

/// The filter graph: sources `speech` (and `orig`, given the original's decoder), sink
/// `out` handing the encoder frames of its frame size. With the original: it is ducked
/// under the speech (`sidechaincompress` keyed by it) and the speech added (`amix`);
/// without, the speech alone. Everything leaves as 48 kHz stereo float.
///
/// The speech comes at [`SPEECH_RATE`] already, so its input changes only sample format and
/// layout. The original's input converts its rate and layout: that is the file's own sound,
/// at whatever rate it was recorded, a different job from the voice's.
fn mix_graph(
    original: Option<&ff::decoder::Audio>,
    encoder: &ff::encoder::Audio,
) -> Result<filter::Graph, ff::Error> {
    let mut graph = filter::Graph::new();
    let abuffer = filter::find("abuffer").expect("FFmpeg has abuffer");
    graph.add(
        &abuffer,
        "speech",
        &format!("time_base=1/{RATE}:sample_rate={RATE}:sample_fmt=s16:channel_layout=mono"),
    )?;
    // The speech needs no rate conversion (annotate resampled it to SPEECH_RATE); the
    // original's sound does, from the file's own rate and layout: FFmpeg's job, not the voice's.
    let speech_to_stereo = "aformat=sample_fmts=fltp:channel_layouts=stereo";
    let to_stereo = format!("aformat=sample_fmts=fltp:sample_rates={RATE}:channel_layouts=stereo");
    let spec = if let Some(dec) = original {
        let layout = match dec.channel_layout().bits() {
            0 => ChannelLayout::default(i32::from(dec.channels())).bits(),
            bits => bits,
        };
        graph.add(
            &abuffer,
            "orig",
            &format!(
                "time_base=1/{}:sample_rate={}:sample_fmt={}:channel_layout=0x{layout:x}",
                dec.rate(),
                dec.rate(),
                dec.format().name()
            ),
        )?;
        format!(
            "[orig]{to_stereo}[o];[speech]{speech_to_stereo},asplit=2[key][voice];\
             [o][key]sidechaincompress=threshold=0.02:ratio=4:attack=20:release=500[ducked];\
             [ducked][voice]amix=inputs=2:duration=first:normalize=0,{to_stereo}[out]"
        )
    } else {
        format!("[speech]{speech_to_stereo}[out]")
    };
    graph.add(
        &filter::find("abuffersink").expect("FFmpeg has abuffersink"),
        "out",
        "",
    )?;
    let parser = graph.output("speech", 0)?;
    let parser = if original.is_some() {
        parser.output("orig", 0)?
    } else {
        parser
    };
    parser.input("out", 0)?.parse(&spec)?;
    graph.validate()?;
    graph
        .get("out")
        .expect("added")
        .sink()
        .set_frame_size(encoder.frame_size().max(1));
    Ok(graph)
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
    /// Decodes the original's packets into the graph, each frame with the speech up to a
    /// second past it (so the ducking key is there before the sound it ducks), then ends the
    /// original's input.
    fn mix_original(
        &mut self,
        ictx: &mut ff::format::context::Input,
        original: &mut Original,
        start: i64,
        what: &str,
    ) -> Result<(), MuxError> {
        let offset = start.rescale(Rational::new(1, ff::ffi::AV_TIME_BASE), original.time_base);
        // The next original sample's time, in samples; `None` before the first.
        let mut next: Option<i64> = None;
        for (stream, packet) in ictx.packets() {
            if stream.index() != original.index {
                continue;
            }
            if original.decoder.send_packet(&packet).is_err() {
                continue; // a damaged packet: a moment of silence, not a failure
            }
            self.feed_decoded(original, offset, &mut next, what)?;
        }
        let _ = original.decoder.send_eof();
        self.feed_decoded(original, offset, &mut next, what)?;
        self.flush("orig").map_err(|e| failed(what, "mix", e))
    }

    /// Moves every frame the decoder has ready into the graph, timed sample by sample from
    /// the original's first sound on the copy's timeline (as a gapless track is).
    fn feed_decoded(
        &mut self,
        original: &mut Original,
        offset: i64,
        next: &mut Option<i64>,
        what: &str,
    ) -> Result<(), MuxError> {
        let mut frame = AudioFrame::empty();
        while original.decoder.receive_frame(&mut frame).is_ok() {
            let rate = original.decoder.rate().max(1) as i32;
            let pts = *next.get_or_insert_with(|| {
                let t = frame.timestamp().unwrap_or(offset) - offset;
                t.max(0).rescale(original.time_base, Rational::new(1, rate))
            });
            frame.set_pts(Some(pts));
            *next = Some(pts + frame.samples() as i64);
            let until = pts as f64 / f64::from(rate) + frame.samples() as f64 / f64::from(rate);
            self.send_speech_until(until + 1.0)
                .map_err(|e| failed(what, "speech", e))?;
            self.add("orig", &frame)
                .map_err(|e| failed(what, "audio into the mix", e))?;
            self.drain().map_err(|e| failed(what, "mix", e))?;
        }
        Ok(())
    }

    /// The rest of the speech, then everything out of the graph and the encoder.
    fn finish(&mut self) -> Result<(), ff::Error> {
        self.send_speech_until(f64::INFINITY)?;
        self.flush("speech")?;
        self.drain()?;
        self.encoder.send_eof()?;
        self.receive_packets()
    }

    /// Adds `frame` to the graph's source `name`.
    fn add(&mut self, name: &str, frame: &AudioFrame) -> Result<(), ff::Error> {
        self.graph.get(name).expect("added").source().add(frame)
    }

    /// Ends the graph's source `name`.
    fn flush(&mut self, name: &str) -> Result<(), ff::Error> {
        self.graph.get(name).expect("added").source().flush()
    }

    /// Pushes the speech up to `seconds` of media time into the graph.
    fn send_speech_until(&mut self, seconds: f64) -> Result<(), ff::Error> {
        let until = if seconds.is_finite() {
            ((seconds * f64::from(SPEECH_RATE)) as usize).min(self.speech.samples.len())
        } else {
            self.speech.samples.len()
        };
        while self.speech_sent < until {
            let n = CHUNK.min(until - self.speech_sent);
            let mut frame =
                AudioFrame::new(Sample::I16(SampleType::Packed), n, ChannelLayout::MONO);
            frame.set_rate(SPEECH_RATE);
            frame.set_channels(1);
            frame.set_pts(Some(self.speech_sent as i64));
            let bytes = frame.data_mut(0);
            for (i, s) in self.speech.samples[self.speech_sent..self.speech_sent + n]
                .iter()
                .enumerate()
            {
                bytes[2 * i..2 * i + 2].copy_from_slice(&s.to_ne_bytes());
            }
            self.add("speech", &frame)?;
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
