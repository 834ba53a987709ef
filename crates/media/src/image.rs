//! Still pictures for `kibitz describe FILE…`, decoded by FFmpeg so every format and pixel
//! layout it knows (grey, alpha, 16-bit) comes out as plain RGB.

use std::path::Path;

use ff::media::Type;
use ff::util::frame::Video as VideoFrame;
use ff::Dictionary;
use ffmpeg_next as ff;

use kibitz_frames::Rgb;

use crate::convert::{to_rgb, Scaler};
use crate::decode::describe;
use crate::Error;

/// Reads a JPEG, PNG or any other picture FFmpeg decodes into packed 8-bit RGB (alpha is
/// dropped). Given a video, returns its first frame.
pub fn load_image(path: impl AsRef<Path>) -> Result<Rgb, Error> {
    crate::init();
    let path = path.as_ref();
    let what = path.display().to_string();
    let open_error = |reason: String| Error::Open {
        what: what.clone(),
        reason,
    };
    let decode_error = |reason: String| Error::Decode {
        what: what.clone(),
        reason,
    };
    let name = path
        .to_str()
        .ok_or_else(|| open_error("the path is not valid UTF-8".into()))?;
    if name.contains('\0') {
        return Err(open_error("the path contains a NUL byte".into()));
    }
    if path.is_dir() {
        return Err(open_error("it is a directory".into()));
    }
    // `%d` in a file name is a frame-number pattern to FFmpeg's image reader; take names
    // literally.
    let mut options = Dictionary::new();
    options.set("pattern_type", "none");
    let mut input =
        ff::format::input_with_dictionary(&name, options).map_err(|e| open_error(describe(e)))?;
    let stream = input
        .streams()
        .best(Type::Video)
        .ok_or_else(|| Error::NoVideo { what: what.clone() })?;
    let index = stream.index();
    let context = ff::codec::context::Context::from_parameters(stream.parameters())
        .map_err(|e| decode_error(e.to_string()))?;
    let mut decoder = context
        .decoder()
        .video()
        .map_err(|e| decode_error(e.to_string()))?;

    let mut frame = VideoFrame::empty();
    let mut got = false;
    let mut last_error = None;
    for (stream, packet) in input.packets() {
        if stream.index() != index {
            continue;
        }
        if let Err(e) = decoder.send_packet(&packet) {
            last_error = Some(e);
            continue;
        }
        if decoder.receive_frame(&mut frame).is_ok() {
            got = true;
            break;
        }
    }
    if !got {
        let _ = decoder.send_eof();
        got = decoder.receive_frame(&mut frame).is_ok();
    }
    if !got {
        let reason = last_error.map_or_else(|| "it holds no picture".to_owned(), describe);
        return Err(decode_error(reason));
    }
    let mut scaler = Scaler::new(
        ff::software::scaling::Flags::BILINEAR | ff::software::scaling::Flags::ACCURATE_RND,
    );
    to_rgb(&mut scaler, &frame, frame.width(), frame.height()).map_err(decode_error)
}
