//! Where should the WebRTC encoder get its raw pictures? Measures both candidates on a real
//! clip, plus what the bitrate setting buys:
//!
//! - `yuv`: the frame sink keeps a copy of the decoder's 4:2:0 planes while an encoder is
//!   attached; per frame that is the copy plus the encode.
//! - `jpeg`: the encoder takes the display JPEG the sink makes anyway and decodes it
//!   (libjpeg-turbo, to planes, range squeezed back to limited) before encoding.
//!
//! Then, for a few target bitrates, the bitrate really sent and the picture quality (luma
//! PSNR against the source, decoded with OpenH264), and the encoder's delay: OpenH264 has no
//! lookahead and returns each picture's access unit from the call that took it, so the
//! delay is the time of that call.
//!
//! nice -n 19 cargo run --release -p kibitz-webrtc --example h264_sources -- \
//!     fixtures/bigbuckbunny.mp4
//!
//! CPU is this thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`), so other load on the machine
//! changes it less than wall time.

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use kibitz_frames::{JpegEncoder, Range, Subsampling, YuvPlanes, JPEG_QUALITY};
use kibitz_webrtc::codec::{EncoderConfig, H264Decoder, H264Encoder, Picture};

/// Passes over the clip for the bitrate runs (Big Buck Bunny's fixture is 5.3 s).
const LOOPS: usize = 3;

fn main() {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fixtures/bigbuckbunny.mp4".into());
    let (width, height, fps) = probe(&path);
    let frames = decode(&path, width, height);
    println!(
        "{path}: {width}x{height} at {fps} fps, {} frames",
        frames.len()
    );
    let mut jpeg_encoder = JpegEncoder::new(JPEG_QUALITY).unwrap();
    let jpegs: Vec<Bytes> = frames
        .iter()
        .map(|f| {
            jpeg_encoder
                .encode_yuv(&planes(f, width, height))
                .unwrap()
                .bytes
        })
        .collect();
    let mjpeg_bps = jpegs.iter().map(|j| j.len()).sum::<usize>() as f64 * 8.0 * f64::from(fps)
        / jpegs.len() as f64;
    println!(
        "MJPEG (quality {JPEG_QUALITY}) of the same frames: {:.1} Mbit/s",
        mjpeg_bps / 1e6
    );

    let config = |bitrate_bps| EncoderConfig {
        width,
        height,
        fps,
        bitrate_bps,
    };
    println!(
        "\nCPU per frame at 2.5 Mbit/s (this thread's CPU time; mean, p95), and the luma \
         PSNR of what a viewer decodes against the source:"
    );
    for source in ["yuv", "jpeg", "yuv", "jpeg"] {
        let mut encoder = H264Encoder::new(config(2_500_000)).unwrap();
        let mut decoder = H264Decoder::new().unwrap();
        let mut copy = Vec::new();
        let mut cpu = Vec::new();
        let mut psnr_sum = 0.0;
        let total = frames.len() * 2;
        for (frame, jpeg) in frames.iter().zip(&jpegs).cycle().take(total) {
            let start = thread_cpu();
            let encoded = if source == "yuv" {
                copy.clear();
                copy.extend_from_slice(frame);
                encoder
                    .encode(&Picture::Yuv(planes(&copy, width, height)), false)
                    .unwrap()
            } else {
                encoder.encode(&Picture::Jpeg(jpeg.clone()), false).unwrap()
            };
            cpu.push(thread_cpu() - start);
            let Some(Picture::Yuv(out)) = decoder.decode(&encoded.data).unwrap() else {
                panic!("a frame did not decode to planes");
            };
            psnr_sum += psnr(&frame[..(width * height) as usize], out.y);
        }
        let (mean, p95, _) = spread(&mut cpu);
        println!(
            "  {source:>4}: {:.2} ms, p95 {:.2} ms, Y-PSNR {:.1} dB",
            ms(mean),
            ms(p95),
            psnr_sum / total as f64
        );
    }
    let mut copy = Vec::new();
    let start = thread_cpu();
    for frame in &frames {
        copy.clear();
        copy.extend_from_slice(frame);
    }
    println!(
        "  of which the sink's copy of the planes: {:.3} ms",
        ms((thread_cpu() - start) / frames.len() as u32)
    );

    println!("\nbitrate setting → sent, quality, delay ({LOOPS} passes over the clip):");
    for bitrate in [1_000_000, 1_500_000, 2_000_000, 2_500_000, 3_000_000] {
        bitrate_run(&frames, config(bitrate), fps);
    }
}

/// Encodes the clip LOOPS times at `config`, decodes it back, and prints what went out.
fn bitrate_run(frames: &[Vec<u8>], config: EncoderConfig, fps: f32) {
    let (width, height) = (config.width, config.height);
    let mut encoder = H264Encoder::new(config).unwrap();
    let mut decoder = H264Decoder::new().unwrap();
    let (mut bytes, mut keyframe_bytes, mut psnr_sum) = (0usize, 0usize, 0.0);
    let (mut delays, mut cpu) = (Vec::new(), Vec::new());
    let total = frames.len() * LOOPS;
    for (i, frame) in frames.iter().cycle().take(total).enumerate() {
        let picture = Picture::Yuv(planes(frame, width, height));
        // One keyframe half way, as a new viewer would ask for.
        let forced = i == total / 2;
        let (start, start_cpu) = (std::time::Instant::now(), thread_cpu());
        let encoded = encoder.encode(&picture, forced).unwrap();
        delays.push(start.elapsed());
        cpu.push(thread_cpu() - start_cpu);
        bytes += encoded.data.len();
        if forced {
            keyframe_bytes = encoded.data.len();
        }
        let Some(Picture::Yuv(out)) = decoder.decode(&encoded.data).unwrap() else {
            panic!("frame {i} did not decode to planes");
        };
        psnr_sum += psnr(&frame[..(width * height) as usize], out.y);
    }
    let sent = bytes as f64 * 8.0 * f64::from(fps) / total as f64;
    let (_, p95, max) = spread(&mut delays);
    let (_, cpu_p95, cpu_max) = spread(&mut cpu);
    println!(
        "  {:.1} Mbit/s → {:.2} Mbit/s, Y-PSNR {:.1} dB, forced keyframe {} kB, encode delay \
         (CPU) p95 {:.1} ms max {:.1} ms, (wall) p95 {:.1} ms max {:.1} ms",
        f64::from(config.bitrate_bps) / 1e6,
        sent / 1e6,
        psnr_sum / total as f64,
        keyframe_bytes / 1000,
        ms(cpu_p95),
        ms(cpu_max),
        ms(p95),
        ms(max)
    );
}

fn probe(path: &str) -> (u32, u32, f32) {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0", "-show_entries"])
        .args(["stream=width,height,r_frame_rate", "-of", "csv=p=0", path])
        .output()
        .expect("ffprobe runs");
    let text = String::from_utf8(out.stdout).unwrap();
    let fields: Vec<&str> = text.trim().split(',').collect();
    let (num, den) = fields[2].split_once('/').unwrap();
    let fps = num.parse::<f32>().unwrap() / den.parse::<f32>().unwrap();
    (fields[0].parse().unwrap(), fields[1].parse().unwrap(), fps)
}

/// Every frame as packed 4:2:0 planes (limited range, as the clip is).
fn decode(path: &str, width: u32, height: u32) -> Vec<Vec<u8>> {
    let out = Command::new("ffmpeg")
        .args([
            "-v", "error", "-i", path, "-f", "rawvideo", "-pix_fmt", "yuv420p", "-",
        ])
        .output()
        .expect("ffmpeg runs");
    let size = (width * height * 3 / 2) as usize;
    out.stdout.chunks_exact(size).map(<[u8]>::to_vec).collect()
}

fn planes(frame: &[u8], width: u32, height: u32) -> YuvPlanes<'_> {
    let (w, h) = (width as usize, height as usize);
    let (y, chroma) = frame.split_at(w * h);
    let (u, v) = chroma.split_at(w * h / 4);
    YuvPlanes {
        width,
        height,
        y,
        u,
        v,
        y_stride: w,
        u_stride: w / 2,
        v_stride: w / 2,
        subsampling: Subsampling::S420,
        range: Range::Limited,
    }
}

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    10.0 * (255.0 * 255.0 / mse.max(1e-9)).log10()
}

/// Mean, 95th percentile and maximum.
fn spread(values: &mut [Duration]) -> (Duration, Duration, Duration) {
    values.sort();
    let mean = values.iter().sum::<Duration>() / values.len() as u32;
    (
        mean,
        values[values.len() * 95 / 100],
        values[values.len() - 1],
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn thread_cpu() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0, "clock_gettime");
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}
