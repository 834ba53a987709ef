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
use crate::mix::SpeechTrack;

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
    let in_name = input.display().to_string();
    let out_name = output.display().to_string();
    let out_err = |e: ff::Error| MuxError::Output {
        what: out_name.clone(),
        reason: describe(e),
    };
    let mut ictx = ff::format::input(input).map_err(|e| MuxError::Input {
        what: in_name.clone(),
        reason: describe(e),
    })?;
    let start = // SAFETY: reads one field of the opened input's format context, which it owns.
        match unsafe { (*ictx.as_ptr()).start_time } {
        t if t == ff::ffi::AV_NOPTS_VALUE => 0,
        t => t,
    };
    // The mix is made first, whole: its packets then go in between the copied ones.
    let mixed = match speech {
        Some(speech) => Some(crate::mix::mix(input, speech, start)?),
        None => None,
    };
    let mut octx = ff::format::output(output).map_err(out_err)?;

    // Input stream index -> output stream index.
    let mut map: Vec<Option<usize>> = vec![None; ictx.nb_streams() as usize];
    let mut next = 0;
    for ist in ictx.streams() {
        if !copied(&ist) {
            continue;
        }
        let mut ost = octx
            .add_stream(ff::encoder::find(codec::Id::None))
            .map_err(out_err)?;
        ost.set_parameters(ist.parameters());
        ost.set_time_base(ist.time_base());
        ost.set_metadata(ist.metadata().to_owned());
        // SAFETY: the stream's own codec parameters, owned by `octx`; a tag of the input's
        // container means nothing in another, and 0 lets the muxer choose its own.
        unsafe {
            (*ost.parameters().as_mut_ptr()).codec_tag = 0;
        }
        map[ist.index()] = Some(next);
        next += 1;
    }
    let subtitle_index = next;
    {
        let mut ost = octx
            .add_stream(ff::encoder::find(codec::Id::None))
            .map_err(out_err)?;
        ost.set_time_base(Rational::new(1, 1000));
        let mut metadata = Dictionary::new();
        metadata.set("language", language);
        metadata.set("title", "kibitz commentary");
        ost.set_metadata(metadata);
        let id = subtitle_codec(output);
        // SAFETY: the new stream's codec parameters, owned by `octx`. The extradata buffer
        // is allocated with FFmpeg's allocator and the padding it requires, and from then
        // on belongs to the parameters (freed with them).
        unsafe {
            let par = (*ost.as_mut_ptr()).codecpar;
            (*par).codec_type = ff::ffi::AVMediaType::AVMEDIA_TYPE_SUBTITLE;
            (*par).codec_id = id.into();
            if id == codec::Id::MOV_TEXT {
                let size = TX3G_SAMPLE_ENTRY.len();
                let padding = ff::ffi::AV_INPUT_BUFFER_PADDING_SIZE as usize;
                let buf = ff::ffi::av_mallocz(size + padding) as *mut u8;
                if buf.is_null() {
                    return Err(out_err(ff::Error::Other {
                        errno: ff::util::error::ENOMEM,
                    }));
                }
                std::ptr::copy_nonoverlapping(TX3G_SAMPLE_ENTRY.as_ptr(), buf, size);
                (*par).extradata = buf;
                (*par).extradata_size = size as i32;
            }
        }
    }
    let mixed_index = subtitle_index + 1;
    if let Some(mixed) = &mixed {
        let mut ost = octx
            .add_stream(ff::encoder::find(codec::Id::AAC))
            .map_err(out_err)?;
        ost.set_parameters(mixed.parameters.clone());
        ost.set_time_base(mixed.time_base);
        let mut metadata = Dictionary::new();
        metadata.set("language", language);
        metadata.set("title", "original sound with spoken commentary");
        ost.set_metadata(metadata);
        // SAFETY: as for the copied streams above.
        unsafe {
            (*ost.parameters().as_mut_ptr()).codec_tag = 0;
        }
    }
    octx.set_metadata(ictx.metadata().to_owned());
    octx.write_header().map_err(out_err)?;
    let mut mixed_packets = mixed.map(|m| {
        let tb = octx.stream(mixed_index).expect("added").time_base();
        let from = m.time_base;
        m.packets
            .into_iter()
            .map(move |mut p| {
                p.set_stream(mixed_index);
                p.rescale_ts(from, tb);
                p.set_position(-1);
                (p, tb)
            })
            .peekable()
    });
    let packet_ms = |p: &Packet, tb: Rational| {
        p.dts()
            .or(p.pts())
            .map_or(i64::MIN, |t| t.rescale(tb, Rational::new(1, 1000)))
    };
    let subtitle_tb = octx.stream(subtitle_index).expect("added").time_base();
    let ms = Rational::new(1, 1000);
    let mut pending = cues.iter().peekable();
    let codec = subtitle_codec(output);

    let write_cue = |cue: &Cue, octx: &mut ff::format::context::Output| {
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
        packet.set_stream(subtitle_index);
        packet.rescale_ts(ms, subtitle_tb);
        packet.write_interleaved(octx)
    };

    for (ist, mut packet) in ictx.packets() {
        let Some(out_index) = map[ist.index()] else {
            continue;
        };
        let in_tb = ist.time_base();
        // The container's start time in this stream's ticks, taken off every timestamp.
        let offset = start.rescale(Rational::new(1, ff::ffi::AV_TIME_BASE), in_tb);
        packet.set_pts(packet.pts().map(|t| t - offset));
        packet.set_dts(packet.dts().map(|t| t - offset));
        // Cues due by this packet's time go in first, so the interleaver holds few.
        if let Some(dts) = packet.dts().or(packet.pts()) {
            let at_ms = dts
                .saturating_mul(1000)
                .saturating_mul(i64::from(ist.time_base().numerator()))
                / i64::from(ist.time_base().denominator().max(1));
            while let Some(cue) = pending.next_if(|c| c.start.as_millis() as i64 <= at_ms) {
                write_cue(cue, &mut octx).map_err(out_err)?;
            }
            if let Some(mixed) = mixed_packets.as_mut() {
                while let Some((p, _)) = mixed.next_if(|(p, tb)| packet_ms(p, *tb) <= at_ms) {
                    p.write_interleaved(&mut octx).map_err(out_err)?;
                }
            }
        }
        let out_tb = octx.stream(out_index).expect("added").time_base();
        packet.rescale_ts(in_tb, out_tb);
        packet.set_position(-1);
        packet.set_stream(out_index);
        packet.write_interleaved(&mut octx).map_err(out_err)?;
    }
    for cue in pending {
        write_cue(cue, &mut octx).map_err(out_err)?;
    }
    for (p, _) in mixed_packets.into_iter().flatten() {
        p.write_interleaved(&mut octx).map_err(out_err)?;
    }
    octx.write_trailer().map_err(out_err)?;
    Ok(())
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
