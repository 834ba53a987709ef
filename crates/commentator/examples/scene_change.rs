//! Measures the scene-change gate's difference on real media, to choose its threshold.
//!
//! Reads packed RGB frames of one size from stdin and prints, for each frame after the
//! first, its difference from the previous one (what the gate scores: the largest of the
//! twelve regions' mean absolute difference, and, for comparison, the whole picture's mean),
//! in grey levels, then a summary. With `--still`, it instead compares the first frame with
//! itself and with copies carrying independent noise of up to ±2 levels per channel. With
//! `--object`, it compares the first frame with copies where an object covering 5% of the
//! picture (a rectangle of its shape, 22.4% of each side) is brighter by 4 to 32 levels,
//! centred where four regions meet (the least sensitive place) or inside one region.
//!
//! ```text
//! ffmpeg -v error -i fixtures/bigbuckbunny.mp4 -vf fps=2,scale=448:252 -f rawvideo \
//!     -pix_fmt rgb24 - | cargo run -p kibitz-commentator --example scene_change -- 448 252
//! ```

use std::io::Read;

use kibitz_commentator::Thumbnail;
use kibitz_frames::Rgb;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let size = |i: usize| -> u32 {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .expect("usage: scene_change WIDTH HEIGHT [--still] < frames.rgb")
    };
    let (width, height) = (size(0), size(1));
    let still = args.iter().any(|a| a == "--still");
    let object = args.iter().any(|a| a == "--object");
    let frame_len = width as usize * height as usize * 3;
    let mut input = Vec::new();
    std::io::stdin()
        .read_to_end(&mut input)
        .expect("read stdin");
    let frames: Vec<Rgb> = input
        .chunks_exact(frame_len)
        .map(|d| Rgb::new(width, height, d.to_vec()).expect("frame"))
        .collect();
    assert!(!frames.is_empty(), "no whole frame on stdin");

    let pairs: Vec<(Rgb, Rgb)> = if object {
        let first = &frames[0];
        let (w, h) = (width as f64, height as f64);
        let (ow, oh) = (w * 0.05f64.sqrt(), h * 0.05f64.sqrt());
        let mut pairs = Vec::new();
        // Centred on the corner shared by four regions, then inside the top-left region.
        for (cx, cy) in [(w / 2.0, h / 3.0), (w / 8.0, h / 6.0)] {
            for contrast in [4u8, 8, 16, 32] {
                let mut data = first.data.to_vec();
                let (x0, y0) = ((cx - ow / 2.0) as usize, (cy - oh / 2.0) as usize);
                for y in y0..y0 + oh as usize {
                    for x in x0..x0 + ow as usize {
                        for c in 0..3 {
                            let v = &mut data[(y * width as usize + x) * 3 + c];
                            *v = v.saturating_add(contrast);
                        }
                    }
                }
                println!("object +{contrast} at ({cx:.0}, {cy:.0})");
                pairs.push((first.clone(), Rgb::new(width, height, data).unwrap()));
            }
        }
        pairs
    } else if still {
        let first = frames[0].clone();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut noisy = || {
            let data: Vec<u8> = first
                .data
                .iter()
                .map(|&v| {
                    // xorshift64*, a noise of -2..=2 levels per channel.
                    seed ^= seed >> 12;
                    seed ^= seed << 25;
                    seed ^= seed >> 27;
                    let r = (seed.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) % 5;
                    (i32::from(v) + r as i32 - 2).clamp(0, 255) as u8
                })
                .collect();
            Rgb::new(width, height, data).unwrap()
        };
        let mut pairs = vec![(first.clone(), first.clone())];
        for _ in 0..20 {
            pairs.push((first.clone(), noisy()));
            pairs.push((noisy(), noisy()));
        }
        pairs
    } else {
        frames
            .windows(2)
            .map(|w| (w[0].clone(), w[1].clone()))
            .collect()
    };

    let started = std::time::Instant::now();
    for frame in &frames {
        std::hint::black_box(Thumbnail::of(frame));
    }
    let per_frame = started.elapsed() / frames.len() as u32;
    let mut regions = Vec::new();
    let mut means = Vec::new();
    for (i, (a, b)) in pairs.iter().enumerate() {
        let (a, b) = (Thumbnail::of(a), Thumbnail::of(b));
        let (region, mean) = (b.difference(&a), b.mean_difference(&a));
        println!("{:>4} {region:>8.3} {mean:>8.3}", i + 1);
        regions.push(region);
        means.push(mean);
    }
    let summary = |name: &str, v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        println!(
            "{name}: n {} min {:.3} median {:.3} max {:.3}",
            v.len(),
            v[0],
            v[v.len() / 2],
            v[v.len() - 1]
        );
    };
    summary("region max", &mut regions);
    summary("whole mean", &mut means);
    println!("thumbnail: {per_frame:?} a {width}x{height} frame");
}
