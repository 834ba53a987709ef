//! 720p JPEG encode, the per-frame cost of the display buffer: from packed RGB, and from
//! YUV 4:2:0 planes as a decoder hands them out (full range, and limited range, which adds
//! the range stretch).
//!
//! cargo bench -p kibitz-frames --bench jpeg

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kibitz_frames::{JpegEncoder, Range, Rgb, Subsampling, YuvPlanes, JPEG_QUALITY};

const W: u32 = 1280;
const H: u32 = 720;

/// A busy synthetic picture (gradients plus a checkerboard), closer to real video than a
/// flat colour, which would compress unrealistically fast.
fn sample(x: u32, y: u32, k: u32) -> u8 {
    let checker = if (x / 16 + y / 16).is_multiple_of(2) {
        40
    } else {
        0
    };
    ((x * (k + 1) + y * (3 - k) + checker) % 256) as u8
}

fn rgb() -> Rgb {
    let mut data = Vec::with_capacity((W * H * 3) as usize);
    for y in 0..H {
        for x in 0..W {
            data.extend_from_slice(&[sample(x, y, 0), sample(x, y, 1), sample(x, y, 2)]);
        }
    }
    Rgb::new(W, H, data).unwrap()
}

fn planes() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let (cw, ch) = (W / 2, H / 2);
    let y = (0..H)
        .flat_map(|y| (0..W).map(move |x| 16 + sample(x, y, 0) % 220))
        .collect();
    let u = (0..ch)
        .flat_map(|y| (0..cw).map(move |x| 16 + sample(x, y, 1) % 225))
        .collect();
    let v = (0..ch)
        .flat_map(|y| (0..cw).map(move |x| 16 + sample(x, y, 2) % 225))
        .collect();
    (y, u, v)
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("jpeg_720p");
    group.throughput(Throughput::Elements(1));
    let mut enc = JpegEncoder::new(JPEG_QUALITY).unwrap();

    let rgb = rgb();
    group.bench_function("rgb", |b| b.iter(|| enc.encode_rgb(&rgb).unwrap()));

    let (y, u, v) = planes();
    for range in [Range::Full, Range::Limited] {
        let p = YuvPlanes {
            width: W,
            height: H,
            y: &y,
            u: &u,
            v: &v,
            y_stride: W as usize,
            u_stride: W as usize / 2,
            v_stride: W as usize / 2,
            subsampling: Subsampling::S420,
            range,
        };
        let name = match range {
            Range::Full => "yuv420_full_range",
            Range::Limited => "yuv420_limited_range",
        };
        group.bench_function(name, |b| b.iter(|| enc.encode_yuv(&p).unwrap()));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
