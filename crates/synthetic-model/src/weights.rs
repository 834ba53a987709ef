//! Random tensor data: a small fast PRNG and fillers for each tensor type.
//!
//! The weights are noise, but they must be *tame* noise: llama.cpp runs them through
//! 36 transformer layers and a vision tower, and one overflow turns every logit into NaN.
//! Every tensor therefore gets a target standard deviation (about `1/sqrt(fan_in)`, which
//! keeps activations near unit scale), and quantized blocks get their scales from it: f16
//! `d` values stay in f16's normal range, sub-block scales are small positive integers and
//! Q4_K mins exactly cancel the quants' mean.

use crate::gguf::TensorType;

/// splitmix64: one add, three xor-shift-multiplies per 8 random bytes, and good enough
/// statistics for noise. Seeded per tensor, so each tensor's bytes depend only on the seed
/// and its name.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for one tensor: the model seed mixed with the tensor's name (FNV-1a).
    pub fn for_tensor(seed: u64, name: &str) -> Self {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for b in name.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        Rng(seed ^ h)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn fill_bytes(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let last = self.next_u64().to_le_bytes();
            rest.copy_from_slice(&last[..rest.len()]);
        }
    }

    /// Two uniform values in [-1, 1) from one draw (24 bits each is plenty for noise).
    fn two_uniform(&mut self) -> [f32; 2] {
        let r = self.next_u64();
        let scale = 1.0 / (1u32 << 23) as f32;
        [
            ((r >> 40) as f32) * scale - 1.0,
            (((r >> 8) & 0xff_ffff) as f32) * scale - 1.0,
        ]
    }
}

/// How a tensor's values are chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Zero-mean noise with this standard deviation.
    Random { std: f32 },
    /// Every element the same value (norm weights = 1); F32/F16 only.
    Const(f32),
    /// The output projection: rows (tokens) in `loud_from..loud_to` get noise of `std`, all
    /// others an eighth of it. With the byte and special tokens quiet, a random model's
    /// greedy picks are learned word pieces, so its text reads like words and rarely stops.
    Logits {
        std: f32,
        loud_from: u64,
        loud_to: u64,
    },
}

// Quantized blocks: sub-block scales are drawn from 2..=6 (RMS sqrt(18)), which together with
// the standard deviation of uniform quants gives the block scale `d` for a target std.
const SUB_SCALE_MIN: u8 = 2;
const SUB_SCALE_SPAN: u8 = 5;
const SUB_SCALE_RMS: f32 = 4.242_640_7; // sqrt((4 + 9 + 16 + 25 + 36) / 5)
const Q8_0_STD: f32 = 73.9; // uniform i8: sqrt((256^2 - 1) / 12)
const Q4_STD: f32 = 4.610; // uniform 0..=15: sqrt((16^2 - 1) / 12)
const Q6_STD: f32 = 18.47; // uniform 0..=63: sqrt((64^2 - 1) / 12)

/// Fills `buf` (whole blocks of `ty`, starting `offset` bytes into a tensor whose rows take
/// `row_bytes`) with values drawn as `init` says.
pub fn fill(
    ty: TensorType,
    init: Init,
    rng: &mut Rng,
    offset: u64,
    row_bytes: u64,
    buf: &mut [u8],
) {
    let Init::Logits {
        std,
        loud_from,
        loud_to,
    } = init
    else {
        return fill_same(ty, init, rng, buf);
    };
    let (mut at, mut rest) = (offset, buf);
    while !rest.is_empty() {
        let row = at / row_bytes;
        let n = (((row + 1) * row_bytes - at) as usize).min(rest.len());
        let (head, tail) = rest.split_at_mut(n);
        let std = if (loud_from..loud_to).contains(&row) {
            std
        } else {
            std / 8.0
        };
        fill_same(ty, Init::Random { std }, rng, head);
        at += n as u64;
        rest = tail;
    }
}

/// Fills `buf` where every element follows the same distribution.
fn fill_same(ty: TensorType, init: Init, rng: &mut Rng, buf: &mut [u8]) {
    match (ty, init) {
        (TensorType::F32, Init::Const(v)) => fill_repeated(buf, &v.to_le_bytes()),
        (TensorType::F16, Init::Const(v)) => fill_repeated(buf, &f16_bits(v).to_le_bytes()),
        (TensorType::F32, Init::Random { std }) => {
            let a = std * 3f32.sqrt();
            for pair in buf.chunks_exact_mut(8) {
                let [x, y] = rng.two_uniform();
                pair[..4].copy_from_slice(&(x * a).to_le_bytes());
                pair[4..].copy_from_slice(&(y * a).to_le_bytes());
            }
            if buf.len() % 8 == 4 {
                let n = buf.len();
                buf[n - 4..].copy_from_slice(&(rng.two_uniform()[0] * a).to_le_bytes());
            }
        }
        (TensorType::F16, Init::Random { std }) => {
            let a = std * 3f32.sqrt();
            for pair in buf.chunks_exact_mut(4) {
                let [x, y] = rng.two_uniform();
                pair[..2].copy_from_slice(&f16_bits(x * a).to_le_bytes());
                pair[2..].copy_from_slice(&f16_bits(y * a).to_le_bytes());
            }
            if buf.len() % 4 == 2 {
                let n = buf.len();
                buf[n - 2..].copy_from_slice(&f16_bits(rng.two_uniform()[0] * a).to_le_bytes());
            }
        }
        (TensorType::Q8_0, Init::Random { std }) => {
            // block_q8_0 { f16 d; i8 qs[32] }: random bytes are uniform quants already.
            rng.fill_bytes(buf);
            let d = f16_bits(std / Q8_0_STD).to_le_bytes();
            for block in buf.chunks_exact_mut(34) {
                block[..2].copy_from_slice(&d);
            }
        }
        (TensorType::Q4K, Init::Random { std }) => {
            // block_q4_K { f16 d; f16 dmin; u8 scales[12]; u8 qs[128] }, x = d*sc*q - dmin*m.
            // With m = sc and dmin = 7.5 d, x = d*sc*(q - 7.5): zero-mean.
            rng.fill_bytes(buf);
            let d = std / (Q4_STD * SUB_SCALE_RMS);
            let d_bytes = f16_bits(d).to_le_bytes();
            let dmin_bytes = f16_bits(7.5 * d).to_le_bytes();
            for block in buf.chunks_exact_mut(144) {
                block[..2].copy_from_slice(&d_bytes);
                block[2..4].copy_from_slice(&dmin_bytes);
                let mut sc = [0u8; 8];
                for (j, s) in sc.iter_mut().enumerate() {
                    *s = SUB_SCALE_MIN + block[4 + j] % SUB_SCALE_SPAN;
                }
                // 6-bit packing (ggml get_scale_min_k4). All values are < 16, so the high
                // bits of bytes 0..8 are zero and sub-blocks 4..8 live in bytes 8..12.
                let scales = &mut block[4..16];
                scales[..4].copy_from_slice(&sc[..4]);
                scales[4..8].copy_from_slice(&sc[..4]);
                for j in 0..4 {
                    scales[8 + j] = sc[4 + j] | (sc[4 + j] << 4);
                }
            }
        }
        (TensorType::Q6K, Init::Random { std }) => {
            // block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d }, x = d*sc*(q - 32).
            rng.fill_bytes(buf);
            let d = f16_bits(std / (Q6_STD * SUB_SCALE_RMS)).to_le_bytes();
            for block in buf.chunks_exact_mut(210) {
                for s in &mut block[192..208] {
                    *s = SUB_SCALE_MIN + *s % SUB_SCALE_SPAN;
                }
                block[208..].copy_from_slice(&d);
            }
        }
        (ty, Init::Const(_)) => panic!("constant {ty:?} tensors are not supported"),
        (_, Init::Logits { .. }) => unreachable!("split into rows by fill"),
    }
}

fn fill_repeated(buf: &mut [u8], pattern: &[u8]) {
    for c in buf.chunks_exact_mut(pattern.len()) {
        c.copy_from_slice(pattern);
    }
}

/// IEEE half-precision bits of `x`, rounded to nearest even (what numpy's astype does).
pub fn f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        // Subnormal: shift the mantissa (with its implicit 1) into place and round.
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = m >> shift;
        let rest = m & ((1 << shift) - 1);
        let mid = 1 << (shift - 1);
        let round = rest > mid || (rest == mid && half & 1 == 1);
        return sign | (half + u32::from(round)) as u16;
    }
    let half = ((e as u32) << 10) | (man >> 13);
    let rest = man & 0x1fff;
    let round = rest > 0x1000 || (rest == 0x1000 && half & 1 == 1);
    // A carry out of the mantissa correctly bumps the exponent (up to infinity).
    sign | (half + u32::from(round)) as u16
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn f16_to_f32(h: u16) -> f32 {
        let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
        let exp = i32::from((h >> 10) & 0x1f);
        let man = f32::from(h & 0x3ff);
        match exp {
            0 => sign * man * 2f32.powi(-24),
            0x1f if man == 0.0 => sign * f32::INFINITY,
            0x1f => f32::NAN,
            _ => sign * (1.0 + man / 1024.0) * 2f32.powi(exp - 15),
        }
    }

    /// Reference dequantisation, after ggml-quants.c, to check the generated blocks.
    pub fn dequantize(ty: TensorType, data: &[u8]) -> Vec<f32> {
        let h = |b: &[u8]| f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
        let mut out = Vec::new();
        match ty {
            TensorType::F32 => out.extend(
                data.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap())),
            ),
            TensorType::F16 => out.extend(data.chunks_exact(2).map(h)),
            TensorType::Q8_0 => {
                for b in data.chunks_exact(34) {
                    let d = h(&b[..2]);
                    out.extend(b[2..].iter().map(|&q| d * f32::from(q as i8)));
                }
            }
            TensorType::Q4K => {
                for b in data.chunks_exact(144) {
                    let (d, dmin) = (h(&b[..2]), h(&b[2..4]));
                    let q = &b[4..16];
                    let scale_min = |j: usize| -> (f32, f32) {
                        if j < 4 {
                            (f32::from(q[j] & 63), f32::from(q[j + 4] & 63))
                        } else {
                            (
                                f32::from((q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4)),
                                f32::from((q[j + 4] >> 4) | ((q[j] >> 6) << 4)),
                            )
                        }
                    };
                    for (i, qs) in b[16..].chunks_exact(32).enumerate() {
                        let (s1, m1) = scale_min(2 * i);
                        let (s2, m2) = scale_min(2 * i + 1);
                        out.extend(qs.iter().map(|&x| d * s1 * f32::from(x & 0xf) - dmin * m1));
                        out.extend(qs.iter().map(|&x| d * s2 * f32::from(x >> 4) - dmin * m2));
                    }
                }
            }
            TensorType::Q6K => {
                for b in data.chunks_exact(210) {
                    let d = h(&b[208..]);
                    let mut y = [0f32; 256];
                    for n in 0..2 {
                        let ql = &b[64 * n..];
                        let qh = &b[128 + 32 * n..];
                        let sc = |i: usize| f32::from(b[192 + 8 * n + i] as i8);
                        for l in 0..32 {
                            let is = l / 16;
                            let q = |lo: u8, shift: u8| {
                                f32::from((lo | (((qh[l] >> shift) & 3) << 4)) as i8 - 32)
                            };
                            y[128 * n + l] = d * sc(is) * q(ql[l] & 0xf, 0);
                            y[128 * n + l + 32] = d * sc(is + 2) * q(ql[l + 32] & 0xf, 2);
                            y[128 * n + l + 64] = d * sc(is + 4) * q(ql[l] >> 4, 4);
                            y[128 * n + l + 96] = d * sc(is + 6) * q(ql[l + 32] >> 4, 6);
                        }
                    }
                    out.extend_from_slice(&y);
                }
            }
        }
        out
    }

    fn mean_std(v: &[f32]) -> (f32, f32) {
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n;
        (mean as f32, var.sqrt() as f32)
    }

    #[test]
    fn f16_conversion_matches_ieee() {
        for (x, bits) in [
            (0.0f32, 0x0000u16),
            (-0.0, 0x8000),
            (1.0, 0x3c00),
            (-2.0, 0xc000),
            (0.5, 0x3800),
            (65504.0, 0x7bff),
            (65520.0, 0x7c00), // rounds up to infinity
            (1e9, 0x7c00),
            (6.103_515_6e-5, 0x0400), // smallest normal
            (5.960_464_5e-8, 0x0001), // smallest subnormal
            (1e-9, 0x0000),
            (1.000_976_6, 0x3c01),
            (1.000_488_3, 0x3c00), // exactly half way, ties to even
            (1.001_464_8, 0x3c02), // half way above odd, ties to even
        ] {
            assert_eq!(f16_bits(x), bits, "{x}");
        }
        assert_eq!(f16_bits(f32::NAN) & 0x7c00, 0x7c00);
        assert_ne!(f16_bits(f32::NAN) & 0x3ff, 0);
        for i in 0..2000 {
            let x = (i as f32 - 1000.0) * 0.0123;
            let back = f16_to_f32(f16_bits(x));
            assert!((back - x).abs() <= x.abs() / 1024.0 + 1e-7, "{x} -> {back}");
        }
    }

    #[test]
    fn same_seed_same_bytes_in_any_8_byte_chunking() {
        let mut a = vec![0u8; 1000];
        let mut b = vec![0u8; 1000];
        Rng::for_tensor(7, "blk.0.attn_q.weight").fill_bytes(&mut a);
        let mut r = Rng::for_tensor(7, "blk.0.attn_q.weight");
        r.fill_bytes(&mut b[..496]);
        r.fill_bytes(&mut b[496..]);
        assert!(a == b);
        let mut c = vec![0u8; 1000];
        Rng::for_tensor(7, "blk.1.attn_q.weight").fill_bytes(&mut c);
        assert!(a != c);
    }

    #[test]
    fn random_blocks_decode_to_finite_values_of_the_target_spread() {
        let std = 0.02;
        for ty in [
            TensorType::F32,
            TensorType::F16,
            TensorType::Q8_0,
            TensorType::Q4K,
            TensorType::Q6K,
        ] {
            let mut buf =
                vec![0u8; ty.block_bytes() as usize * (65536 / ty.block_elems() as usize)];
            fill(
                ty,
                Init::Random { std },
                &mut Rng::for_tensor(1, "t"),
                0,
                buf.len() as u64,
                &mut buf,
            );
            let v = dequantize(ty, &buf);
            assert_eq!(v.len(), 65536);
            assert!(v.iter().all(|x| x.is_finite()), "{ty:?} finite");
            let (mean, got) = mean_std(&v);
            assert!(mean.abs() < 0.1 * std, "{ty:?} mean {mean}");
            assert!(
                (got / std - 1.0).abs() < 0.1,
                "{ty:?} std {got}, wanted {std}"
            );
            if ty != TensorType::F32 && ty != TensorType::F16 {
                // Block scales must be normal f16 numbers, not subnormals or zero.
                let d_at = if ty == TensorType::Q6K { 208 } else { 0 };
                let d = f16_to_f32(u16::from_le_bytes([buf[d_at], buf[d_at + 1]]));
                assert!((6.1e-5..0.1).contains(&d), "{ty:?} d = {d}");
            }
        }
    }

    #[test]
    fn logits_rows_outside_the_loud_range_are_quiet() {
        // 8 rows of 256 Q8_0 values, filled in two chunks that split row 3.
        let ty = TensorType::Q8_0;
        let row_bytes = 8 * 34;
        let mut buf = vec![0u8; 8 * row_bytes];
        let init = Init::Logits {
            std: 0.1,
            loud_from: 2,
            loud_to: 5,
        };
        let mut rng = Rng::for_tensor(3, "t");
        let (a, b) = buf.split_at_mut(3 * row_bytes + 4 * 34);
        fill(ty, init, &mut rng, 0, row_bytes as u64, a);
        fill(ty, init, &mut rng, a.len() as u64, row_bytes as u64, b);
        for (row, data) in buf.chunks_exact(row_bytes).enumerate() {
            let (_, std) = mean_std(&dequantize(ty, data));
            let want = if (2..5).contains(&row) {
                0.1
            } else {
                0.1 / 8.0
            };
            assert!(
                (std / want - 1.0).abs() < 0.25,
                "row {row}: std {std}, wanted {want}"
            );
        }
    }

    #[test]
    fn constants_fill_every_element() {
        let mut buf = vec![0u8; 64];
        fill(
            TensorType::F32,
            Init::Const(1.0),
            &mut Rng::for_tensor(0, "t"),
            0,
            64,
            &mut buf,
        );
        assert!(dequantize(TensorType::F32, &buf).iter().all(|&x| x == 1.0));
        fill(
            TensorType::F16,
            Init::Const(-0.5),
            &mut Rng::for_tensor(0, "t"),
            0,
            64,
            &mut buf,
        );
        assert!(dequantize(TensorType::F16, &buf).iter().all(|&x| x == -0.5));
    }
}
