//! A video file copied into a new container with a subtitle track added: the original video
//! and audio packets as they are (no re-encode, timestamps only rescaled to the new
//! streams' time bases), plus one subtitle packet per cue, `mov_text` in MP4 and `subrip`
//! in Matroska (the codecs players read in each), and, given a [`SpeechTrack`], one more
//! audio track: the speech mixed over the original sound (see `mix.rs`).
//!
//! Whether the container can hold the file's codecs is asked of FFmpeg
//! (`avformat_query_codec`) by [`check_remux`] before any work: MP4 refuses many old codecs
//! (msmpeg4v3, say) that Matroska takes, and finding out after an hour of commentary would
//! waste the hour.
//!
//! Subtitle packets are built here rather than by FFmpeg's subtitle encoders: a `subrip`
//! packet in Matroska is the cue's UTF-8 text, a `mov_text` sample is that text behind its
//! 16-bit big-endian length, and the encoders would only add a round trip through ASS
//! markup (where a `{` in a comment means something). `mov_text` needs a sample
//! description in the stream's extradata; [`TX3G_SAMPLE_ENTRY`] is FFmpeg's default one.

use std::ffi::CString;
use std::path::Path;
use std::time::Duration;

use ff::codec;
use ff::media::Type;
use ff::{Dictionary, Packet, Rational, Rescale};
use ffmpeg_next as ff;

use crate::decode::describe;
use crate::mix::{Mixed, SpeechTrack};

/// One subtitle: shown from `start` to `end`, media time (seconds from the file's start).
#[derive(Debug, Clone, PartialEq)]
pub struct Cue {
    pub start: Duration,
    pub end: Duration,
    pub text: String,
}

/// What can go wrong writing a file with subtitles. (A variant of `kibitz_media::Error`
/// would be the crate's one error type; kept apart while `lib.rs` is others' to change.)
#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    #[error("cannot read '{what}': {reason}")]
    Input { what: String, reason: String },
    #[error("'{output}' cannot be written as a video with subtitles: FFmpeg knows no container for its extension (use .mkv or .mp4)")]
    UnknownContainer { output: String },
    #[error("{container} cannot hold the {kind} codec {codec} of '{input}'\nhint: write a .mkv instead, which holds it as it is")]
    Unsupported {
        container: String,
        kind: &'static str,
        codec: String,
        input: String,
    },
    #[error("cannot write '{what}': {reason}")]
    Output { what: String, reason: String },
}

/// The subtitle codec `output`'s container takes, by its extension.
fn subtitle_codec(output: &Path) -> codec::Id {
    match output
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("mp4" | "m4v" | "mov") => codec::Id::MOV_TEXT,
        _ => codec::Id::SUBRIP,
    }
}

/// The streams of `input` that are copied: every video and audio stream but cover art.
fn copied(stream: &ff::format::stream::Stream) -> bool {
    let medium = stream.parameters().medium();
    (medium == Type::Video || medium == Type::Audio)
        && !stream
            .disposition()
            .contains(ff::format::stream::Disposition::ATTACHED_PIC)
}

/// Checks, without writing anything, that `output`'s container (by extension) can hold
/// every video and audio stream of `input` as it is, and a subtitle track.
pub fn check_remux(input: &Path, output: &Path) -> Result<(), MuxError> {
    crate::init();
    let what = input.display().to_string();
    let ictx = ff::format::input(input).map_err(|e| MuxError::Input {
        what: what.clone(),
        reason: describe(e),
    })?;
    let name = CString::new(output.to_string_lossy().as_bytes()).map_err(|_| {
        MuxError::UnknownContainer {
            output: output.display().to_string(),
        }
    })?;
    // SAFETY: `av_guess_format` reads the NUL-terminated name and returns a pointer to a
    // static muxer description (or null); nothing is allocated or kept.
    let format =
        unsafe { ff::ffi::av_guess_format(std::ptr::null(), name.as_ptr(), std::ptr::null()) };
    if format.is_null() {
        return Err(MuxError::UnknownContainer {
            output: output.display().to_string(),
        });
    }
    // SAFETY: `format` is a non-null static muxer description; its long name, when set, is
    // a static NUL-terminated string.
    let container = unsafe {
        let long = (*format).long_name;
        let short = (*format).name;
        let ptr = if long.is_null() { short } else { long };
        std::ffi::CStr::from_ptr(ptr).to_string_lossy().into_owned()
    };
    let query = |id: codec::Id| {
        // SAFETY: a static muxer description and a codec id; the call only reads them.
        unsafe { ff::ffi::avformat_query_codec(format, id.into(), ff::ffi::FF_COMPLIANCE_NORMAL) }
    };
    let subtitles = subtitle_codec(output);
    let wanted = ictx
        .streams()
        .filter(copied)
        .map(|s| {
            let p = s.parameters();
            let kind = if p.medium() == Type::Video {
                "video"
            } else {
                "audio"
            };
            (kind, p.id())
        })
        .chain([("subtitle", subtitles)]);
    for (kind, id) in wanted {
        // 1: it can; 0: it cannot; below 0: the muxer does not say (then try).
        if query(id) == 0 {
            return Err(MuxError::Unsupported {
                container,
                kind,
                codec: id.name().to_owned(),
                input: what,
            });
        }
    }
    Ok(())
}

/// Writes `output`: `input`'s video and audio streams copied as they are, plus a subtitle
/// track of `cues` (media time: seconds from the container's start). Every timestamp is
/// moved back by the container's start time (an MPEG-TS file starts at 1.4 s, say), as
/// `ffmpeg -c copy` does, so the copy starts at 0 like the cues. `language` is the track's
/// ISO 639-2 code, e.g. `eng`. Call [`check_remux`] first for the clear error.
pub fn remux_with_subtitles(
    input: &Path,
    output: &Path,
    cues: &[Cue],
    language: &str,
    speech: Option<&SpeechTrack>,
) -> Result<(), MuxError> {
    crate::init();
    let out_name = output.display().to_string();
    let out_err = |e: ff::Error| MuxError::Output {
        what: out_name.clone(),
        reason: describe(e),
    };
    let mut ictx = ff::format::input(input).map_err(|e| MuxError::Input {
        what: input.display().to_string(),
        reason: describe(e),
    })?;
    let start = container_start(&ictx);
    // The mix is made first, whole: its packets then go in between the copied ones.
    let mixed = speech
        .map(|speech| crate::mix::mix(input, speech, start))
        .transpose()?;
    let mut octx = ff::format::output(output).map_err(out_err)?;
    let map = add_copied_streams(&ictx, &mut octx).map_err(out_err)?;
    let codec = subtitle_codec(output);
    let subtitle_index = add_subtitle_stream(&mut octx, codec, language).map_err(out_err)?;
    let mixed_index = match &mixed {
        Some(mixed) => Some(add_mixed_stream(&mut octx, mixed, language).map_err(out_err)?),
        None => None,
    };
    octx.set_metadata(ictx.metadata().to_owned());
    octx.write_header().map_err(out_err)?;
    // Time bases are final only once the header is written.
    let mixed_tb = mixed_index.map_or(Rational::new(1, 1000), |i| {
        octx.stream(i).expect("added").time_base()
    });
    let mut added = Added {
        cues: cues.iter().peekable(),
        codec,
        subtitle_index,
        subtitle_tb: octx.stream(subtitle_index).expect("added").time_base(),
        mixed: match (mixed, mixed_index) {
            (Some(mixed), Some(index)) => mixed_packets(mixed, index, &octx),
            _ => Vec::new(),
        }
        .into_iter()
        .peekable(),
        mixed_tb,
    };
    copy_packets(&mut ictx, &mut octx, &map, start, &mut added).map_err(out_err)?;
    added.write_due(None, &mut octx).map_err(out_err)?;
    octx.write_trailer().map_err(out_err)?;
    Ok(())
}

/// The container's start time (AV_TIME_BASE units), 0 when it has none.
fn container_start(ictx: &ff::format::context::Input) -> i64 {
    // SAFETY: `ictx` owns an opened format context for as long as the borrow lasts, and
    // this reads one plain integer field of it.
    match unsafe { (*ictx.as_ptr()).start_time } {
        t if t == ff::ffi::AV_NOPTS_VALUE => 0,
        t => t,
    }
}

/// One output stream per [`copied`] input stream, with its parameters; returns the map from
/// input stream index to output stream index.
fn add_copied_streams(
    ictx: &ff::format::context::Input,
    octx: &mut ff::format::context::Output,
) -> Result<Vec<Option<usize>>, ff::Error> {
    let mut map: Vec<Option<usize>> = vec![None; ictx.nb_streams() as usize];
    let mut next = 0;
    for ist in ictx.streams() {
        if !copied(&ist) {
            continue;
        }
        let mut ost = octx.add_stream(ff::encoder::find(codec::Id::None))?;
        ost.set_parameters(ist.parameters());
        ost.set_time_base(ist.time_base());
        ost.set_metadata(ist.metadata().to_owned());
        // SAFETY: the stream's own codec parameters, owned by `octx`, which the borrow of
        // `ost` keeps alive; a tag of the input's container means nothing in another, and 0
        // lets the muxer choose its own.
        unsafe {
            (*ost.parameters().as_mut_ptr()).codec_tag = 0;
        }
        map[ist.index()] = Some(next);
        next += 1;
    }
    Ok(map)
}

/// The subtitle stream (`codec`, ms time base, `language`); returns its index.
fn add_subtitle_stream(
    octx: &mut ff::format::context::Output,
    codec: codec::Id,
    language: &str,
) -> Result<usize, ff::Error> {
    let mut ost = octx.add_stream(ff::encoder::find(codec::Id::None))?;
    ost.set_time_base(Rational::new(1, 1000));
    let mut metadata = Dictionary::new();
    metadata.set("language", language);
    metadata.set("title", "kibitz commentary");
    ost.set_metadata(metadata);
    // SAFETY: the new stream's codec parameters, owned by `octx` and non-null for every
    // stream `add_stream` made. The extradata buffer is allocated with FFmpeg's allocator
    // and the padding it requires, and from then on belongs to the parameters (freed with
    // them); the copy writes `size` bytes into a buffer of `size + padding`.
    unsafe {
        let par = (*ost.as_mut_ptr()).codecpar;
        (*par).codec_type = ff::ffi::AVMediaType::AVMEDIA_TYPE_SUBTITLE;
        (*par).codec_id = codec.into();
        if codec == codec::Id::MOV_TEXT {
            let size = TX3G_SAMPLE_ENTRY.len();
            let padding = ff::ffi::AV_INPUT_BUFFER_PADDING_SIZE as usize;
            let buf = ff::ffi::av_mallocz(size + padding) as *mut u8;
            if buf.is_null() {
                return Err(ff::Error::Other {
                    errno: ff::util::error::ENOMEM,
                });
            }
            std::ptr::copy_nonoverlapping(TX3G_SAMPLE_ENTRY.as_ptr(), buf, size);
            (*par).extradata = buf;
            (*par).extradata_size = size as i32;
        }
    }
    Ok(ost.index())
}

/// The mixed sound's AAC stream; returns its index.
fn add_mixed_stream(
    octx: &mut ff::format::context::Output,
    mixed: &Mixed,
    language: &str,
) -> Result<usize, ff::Error> {
    let mut ost = octx.add_stream(ff::encoder::find(codec::Id::AAC))?;
    ost.set_parameters(mixed.parameters.clone());
    ost.set_time_base(mixed.time_base);
    let mut metadata = Dictionary::new();
    metadata.set("language", language);
    metadata.set("title", "original sound with spoken commentary");
    ost.set_metadata(metadata);
    // SAFETY: as in `add_copied_streams`: the stream's own parameters, owned by `octx`.
    unsafe {
        (*ost.parameters().as_mut_ptr()).codec_tag = 0;
    }
    Ok(ost.index())
}

/// The mix's packets for output stream `index`, in its (final) time base.
fn mixed_packets(mixed: Mixed, index: usize, octx: &ff::format::context::Output) -> Vec<Packet> {
    let tb = octx.stream(index).expect("added").time_base();
    let from = mixed.time_base;
    mixed
        .packets
        .into_iter()
        .map(|mut p| {
            p.set_stream(index);
            p.rescale_ts(from, tb);
            p.set_position(-1);
            p
        })
        .collect()
}

/// Copies every packet of the copied streams, timestamps moved back by `start` and rescaled;
/// before each, what `added` has due by its time, so the interleaver holds few packets.
fn copy_packets(
    ictx: &mut ff::format::context::Input,
    octx: &mut ff::format::context::Output,
    map: &[Option<usize>],
    start: i64,
    added: &mut Added<'_>,
) -> Result<(), ff::Error> {
    for (ist, mut packet) in ictx.packets() {
        let Some(out_index) = map[ist.index()] else {
            continue;
        };
        let in_tb = ist.time_base();
        // The container's start time in this stream's ticks, taken off every timestamp.
        let offset = start.rescale(Rational::new(1, ff::ffi::AV_TIME_BASE), in_tb);
        packet.set_pts(packet.pts().map(|t| t - offset));
        packet.set_dts(packet.dts().map(|t| t - offset));
        if let Some(dts) = packet.dts().or(packet.pts()) {
            let at_ms = dts
                .saturating_mul(1000)
                .saturating_mul(i64::from(in_tb.numerator()))
                / i64::from(in_tb.denominator().max(1));
            added.write_due(Some(at_ms), octx)?;
        }
        let out_tb = octx.stream(out_index).expect("added").time_base();
        packet.rescale_ts(in_tb, out_tb);
        packet.set_position(-1);
        packet.set_stream(out_index);
        packet.write_interleaved(octx)?;
    }
    Ok(())
}

/// What goes in beside the copied packets, each in time order: the cues and the mix.
struct Added<'a> {
    cues: std::iter::Peekable<std::slice::Iter<'a, Cue>>,
    codec: codec::Id,
    subtitle_index: usize,
    subtitle_tb: Rational,
    /// In their output stream's time base, `mixed_tb`.
    mixed: std::iter::Peekable<std::vec::IntoIter<Packet>>,
    mixed_tb: Rational,
}

impl Added<'_> {
    /// Writes the cues and mixed packets due by `at_ms` (media ms), or all that are left.
    fn write_due(
        &mut self,
        at_ms: Option<i64>,
        octx: &mut ff::format::context::Output,
    ) -> Result<(), ff::Error> {
        let due = |ms: i64| at_ms.is_none_or(|at| ms <= at);
        while let Some(cue) = self.cues.next_if(|c| due(c.start.as_millis() as i64)) {
            subtitle_packet(cue, self.codec, self.subtitle_index, self.subtitle_tb)
                .write_interleaved(octx)?;
        }
        let tb = self.mixed_tb;
        let ms = |p: &Packet| {
            p.dts()
                .or(p.pts())
                .map_or(i64::MIN, |t| t.rescale(tb, Rational::new(1, 1000)))
        };
        while let Some(p) = self.mixed.next_if(|p| due(ms(p))) {
            p.write_interleaved(octx)?;
        }
        Ok(())
    }
}

/// One cue as a packet of the subtitle stream: `subrip` is the UTF-8 text, `mov_text` the
/// text behind its 16-bit big-endian length.
fn subtitle_packet(cue: &Cue, codec: codec::Id, index: usize, tb: Rational) -> Packet {
    let text = cue.text.as_bytes();
    let data = if codec == codec::Id::MOV_TEXT {
        let len = text.len().min(u16::MAX as usize);
        let mut data = Vec::with_capacity(len + 2);
        data.extend_from_slice(&(len as u16).to_be_bytes());
        data.extend_from_slice(&text[..len]);
        data
    } else {
        text.to_vec()
    };
    let mut packet = Packet::copy(&data);
    let pts = cue.start.as_millis() as i64;
    packet.set_pts(Some(pts));
    packet.set_dts(Some(pts));
    packet.set_duration(cue.end.saturating_sub(cue.start).as_millis() as i64);
    packet.set_flags(ff::codec::packet::Flags::KEY);
    packet.set_stream(index);
    packet.rescale_ts(Rational::new(1, 1000), tb);
    packet
}

/// The `tx3g` sample description FFmpeg's `mov_text` encoder writes when it has no styles
/// to carry: text centred at the bottom, white, one font.
const TX3G_SAMPLE_ENTRY: [u8; 48] = [
    0x00, 0x00, 0x00, 0x00, // displayFlags
    0x01, // horizontal justification: centre
    0xFF, // vertical justification: bottom
    0x00, 0x00, 0x00, 0x00, // background colour RGBA
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // BoxRecord: top, left, bottom, right
    0x00, 0x00, // StyleRecord: startChar
    0x00, 0x00, // endChar
    0x00, 0x01, // font id
    0x00, // face style flags
    0x12, // font size
    0xFF, 0xFF, 0xFF, 0xFF, // text colour RGBA
    0x00, 0x00, 0x00, 0x12, // FontTableBox: size
    b'f', b't', b'a', b'b', // 'ftab'
    0x00, 0x01, // entry count
    0x00, 0x01, // font id
    0x05, // name length
    b'S', b'e', b'r', b'i', b'f',
];
