//! The H.264 codec through its public interface: what goes in comes out decodable, at its
//! size, with keyframes where asked, and bad input is an error.

use bytes::Bytes;
use kibitz_frames::{Range, Subsampling, YuvPlanes};
use kibitz_webrtc::codec::{
    CodecError, EncodedFrame, EncoderConfig, H264Decoder, H264Encoder, Picture,
};

const W: u32 = 96;
const H: u32 = 64;

fn config(width: u32, height: u32) -> EncoderConfig {
    EncoderConfig {
        width,
        height,
        fps: 25.0,
        bitrate_bps: 500_000,
    }
}

/// 4:2:0 limited-range planes of a moving gradient: frame `k` differs from frame `k - 1`.
fn planes(width: u32, height: u32, k: u32) -> [Vec<u8>; 3] {
    let (w, h) = (width as usize, height as usize);
    let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
    let y = (0..w * h)
        .map(|i| (16 + (i % w + i / w + k as usize * 3) % 200) as u8)
        .collect();
    let u = (0..cw * ch).map(|i| (64 + (i % cw) % 128) as u8).collect();
    let v = (0..cw * ch).map(|i| (64 + (i / cw) % 128) as u8).collect();
    [y, u, v]
}

fn yuv(width: u32, height: u32, p: &[Vec<u8>; 3]) -> Picture<'_> {
    let cw = width.div_ceil(2) as usize;
    Picture::Yuv(YuvPlanes {
        width,
        height,
        y: &p[0],
        u: &p[1],
        v: &p[2],
        y_stride: width as usize,
        u_stride: cw,
        v_stride: cw,
        subsampling: Subsampling::S420,
        range: Range::Limited,
    })
}

/// The NAL unit types of an Annex-B access unit, in order.
fn nal_types(data: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    let mut i = 0;
    while i + 3 < data.len() {
        if data[i..i + 3] == [0, 0, 1] {
            types.push(data[i + 3] & 0x1f);
            i += 3;
        } else {
            i += 1;
        }
    }
    types
}

fn decoded_size(decoder: &mut H264Decoder, frame: &EncodedFrame) -> (u32, u32) {
    match decoder.decode(&frame.data).expect("decodes") {
        Some(Picture::Yuv(p)) => (p.width, p.height),
        Some(_) => panic!("the decoder hands out planes"),
        None => panic!("each access unit completes a picture"),
    }
}

#[test]
fn round_trip_keeps_size_and_marks_keyframes() {
    let mut encoder = H264Encoder::new(config(W, H)).unwrap();
    let mut decoder = H264Decoder::new().unwrap();
    let mut keyframes = Vec::new();
    for k in 0..12 {
        let p = planes(W, H, k);
        let frame = encoder.encode(&yuv(W, H, &p), k == 7).unwrap();
        keyframes.push(frame.keyframe);
        let types = nal_types(&frame.data);
        if frame.keyframe {
            // SPS and PPS ride with every IDR picture, so a viewer can join at any of them.
            assert_eq!(&types[..3], &[7, 8, 5], "k={k}: {types:?}");
        } else {
            assert!(types.iter().all(|t| *t == 1), "k={k}: {types:?}");
        }
        assert_eq!(decoded_size(&mut decoder, &frame), (W, H), "k={k}");
    }
    let expected: Vec<bool> = (0..12).map(|k| k == 0 || k == 7).collect();
    assert_eq!(keyframes, expected);
}

#[test]
fn stream_is_constrained_baseline() {
    let mut encoder = H264Encoder::new(config(W, H)).unwrap();
    let p = planes(W, H, 0);
    let frame = encoder.encode(&yuv(W, H, &p), false).unwrap();
    let sps = frame
        .data
        .windows(4)
        .position(|w| w[..3] == [0, 0, 1] && w[3] & 0x1f == 7)
        .map(|i| &frame.data[i + 4..])
        .expect("an SPS");
    assert_eq!(sps[0], 66, "profile_idc baseline");
    // constraint_set1_flag: nothing outside constrained baseline, which browsers decode.
    assert_eq!(sps[1] & 0x40, 0x40, "constraint flags {:#04x}", sps[1]);
}

#[test]
fn a_new_size_restarts_with_a_keyframe_at_that_size() {
    let mut encoder = H264Encoder::new(config(W, H)).unwrap();
    let mut decoder = H264Decoder::new().unwrap();
    for (k, (w, h)) in [(W, H), (W, H), (160, 90), (160, 90), (W, H)]
        .into_iter()
        .enumerate()
    {
        let p = planes(w, h, k as u32);
        let frame = encoder.encode(&yuv(w, h, &p), false).unwrap();
        assert_eq!(frame.keyframe, k != 1 && k != 3, "k={k}");
        assert_eq!(decoded_size(&mut decoder, &frame), (w, h), "k={k}");
    }
}

#[test]
fn odd_sizes_lose_their_last_row_and_column() {
    let (w, h) = (97, 65);
    let mut encoder = H264Encoder::new(config(w, h)).unwrap();
    let mut decoder = H264Decoder::new().unwrap();
    let p = planes(w, h, 0);
    let frame = encoder.encode(&yuv(w, h, &p), false).unwrap();
    assert_eq!(decoded_size(&mut decoder, &frame), (96, 64));
}

#[test]
fn jpeg_rgb_and_full_range_pictures_encode() {
    let (w, h) = (W as usize, H as usize);
    let rgb: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect();
    let jpeg = |subsamp| {
        let image = turbojpeg::Image {
            pixels: &rgb[..],
            width: w,
            pitch: w * 3,
            height: h,
            format: turbojpeg::PixelFormat::RGB,
        };
        Bytes::from(turbojpeg::compress(image, 80, subsamp).unwrap().to_vec())
    };
    let p = planes(W, H, 0);
    let mut full = yuv(W, H, &p);
    if let Picture::Yuv(planes) = &mut full {
        planes.range = Range::Full;
    }
    let (cw, ch) = (w / 2, h);
    let chroma422 = vec![128u8; cw * ch];
    let s422 = Picture::Yuv(YuvPlanes {
        width: W,
        height: H,
        y: &p[0],
        u: &chroma422,
        v: &chroma422,
        y_stride: w,
        u_stride: cw,
        v_stride: cw,
        subsampling: Subsampling::S422,
        range: Range::Limited,
    });
    let pictures = [
        Picture::Rgb {
            width: W,
            height: H,
            pitch: w * 3,
            data: &rgb,
        },
        Picture::Jpeg(jpeg(turbojpeg::Subsamp::Sub2x2)),
        Picture::Jpeg(jpeg(turbojpeg::Subsamp::Sub2x1)),
        Picture::Jpeg(jpeg(turbojpeg::Subsamp::None)),
        Picture::Jpeg(jpeg(turbojpeg::Subsamp::Gray)),
        full,
        s422,
    ];
    let mut decoder = H264Decoder::new().unwrap();
    let mut encoder = H264Encoder::new(config(W, H)).unwrap();
    for (i, picture) in pictures.iter().enumerate() {
        let frame = encoder.encode(picture, false).unwrap();
        assert_eq!(frame.keyframe, i == 0, "picture {i}");
        assert_eq!(decoded_size(&mut decoder, &frame), (W, H), "picture {i}");
    }
}

#[test]
fn bad_settings_and_pictures_are_errors() {
    for cfg in [
        EncoderConfig {
            fps: 0.0,
            ..config(W, H)
        },
        EncoderConfig {
            fps: f32::NAN,
            ..config(W, H)
        },
        EncoderConfig {
            bitrate_bps: 0,
            ..config(W, H)
        },
    ] {
        assert!(
            matches!(H264Encoder::new(cfg), Err(CodecError::Config(_))),
            "{cfg:?}"
        );
    }
    let mut encoder = H264Encoder::new(config(W, H)).unwrap();
    let p = planes(W, H, 0);
    let mut short = yuv(W, H, &p);
    if let Picture::Yuv(planes) = &mut short {
        planes.y = &p[0][..100];
    }
    let tiny = planes(8, 8, 0);
    let rgb = [0u8; 30];
    for (i, picture) in [
        short,
        yuv(8, 8, &tiny),
        Picture::Rgb {
            width: W,
            height: H,
            pitch: W as usize * 3,
            data: &rgb,
        },
    ]
    .iter()
    .enumerate()
    {
        let result = encoder.encode(picture, false);
        assert!(
            matches!(result, Err(CodecError::Picture { .. })),
            "{i}: {result:?}"
        );
    }
    let not_jpeg = Picture::Jpeg(Bytes::from_static(b"not a jpeg at all"));
    assert!(matches!(
        encoder.encode(&not_jpeg, false),
        Err(CodecError::Jpeg(_))
    ));
    // The encoder goes on after bad pictures.
    assert!(encoder.encode(&yuv(W, H, &p), false).unwrap().keyframe);
}

#[test]
fn garbage_to_the_decoder_is_an_error_not_a_panic() {
    let mut encoder = H264Encoder::new(config(W, H)).unwrap();
    let p = planes(W, H, 0);
    let good = encoder.encode(&yuv(W, H, &p), false).unwrap();
    let mut noise = 0x2545_f491_u32;
    let mut random = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                noise ^= noise << 13;
                noise ^= noise >> 17;
                noise ^= noise << 5;
                noise as u8
            })
            .collect()
    };
    // An IDR slice with no parameter sets before it, then slices whose bytes are noise.
    let mut orphan_slice = vec![0, 0, 0, 1, 0x65];
    orphan_slice.extend(random(200));
    let mut noisy_sps = vec![0, 0, 0, 1, 0x67];
    noisy_sps.extend(random(40));
    let mut truncated = good.data.clone();
    truncated.truncate(good.data.len() / 2);
    truncated.extend(random(50));
    let mut errors = 0;
    for input in [orphan_slice, noisy_sps, truncated, random(5000)] {
        let mut decoder = H264Decoder::new().unwrap();
        match decoder.decode(&input) {
            Err(CodecError::Decode(_)) => errors += 1,
            Err(e) => panic!("unexpected error kind {e}"),
            Ok(None) => {}
            Ok(Some(_)) => panic!("garbage made a picture"),
        }
        // And the decoder still decodes a good stream afterwards.
        let mut fresh = H264Encoder::new(config(W, H)).unwrap();
        let frame = fresh.encode(&yuv(W, H, &p), true).unwrap();
        assert_eq!(decoded_size(&mut decoder, &frame), (W, H));
    }
    assert!(
        errors >= 2,
        "only {errors} of the garbage inputs were errors"
    );
}

#[test]
fn codec_types_move_between_threads() {
    fn send<T: Send>() {}
    send::<H264Encoder>();
    send::<H264Decoder>();
}
