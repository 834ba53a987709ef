//! Picking the next token from one sequence's logits, in Rust.
//!
//! The worker samples every running answer after each batched step, one after another on
//! its thread; llama.cpp's sampler chain copies and sorts the whole vocabulary (151k
//! entries for Qwen3) for each, which at 16 answers a step costs about as much as the GPU
//! step itself. This does the same chain (top-k, then top-p on the plain softmax, then
//! temperature, then a seeded draw; greedy at temperature 0) in one pass over the logits
//! with a k-sized heap.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::ffi::Token;
use crate::Sampling;

pub struct Sampler {
    temperature: f32,
    top_p: f32,
    top_k: usize,
    rng: u64,
    /// Kept between calls to spare an allocation a token.
    heap: BinaryHeap<Reverse<Candidate>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Candidate {
    logit: f32,
    token: Token,
}

impl Eq for Candidate {}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Candidate {
    /// By logit; on a tie the lower token id counts as larger (it wins, as in llama.cpp).
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.logit
            .total_cmp(&other.logit)
            .then(other.token.cmp(&self.token))
    }
}

impl Sampler {
    pub fn new(s: &Sampling) -> Sampler {
        Sampler {
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k as usize,
            // SplitMix64's state; any seed, 0 included, gives a good stream.
            rng: u64::from(s.seed) ^ 0x9e37_79b9_7f4a_7c15,
            heap: BinaryHeap::new(),
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> Token {
        if self.temperature <= 0.0 {
            return argmax(logits);
        }
        let k = if self.top_k == 0 {
            logits.len()
        } else {
            self.top_k.min(logits.len())
        };
        self.heap.clear();
        for (token, &logit) in logits.iter().enumerate() {
            let c = Candidate {
                logit,
                token: token as Token,
            };
            if self.heap.len() < k {
                self.heap.push(Reverse(c));
            } else if c > self.heap.peek().unwrap().0 {
                self.heap.pop();
                self.heap.push(Reverse(c));
            }
        }
        // Best first.
        let mut top: Vec<Candidate> = self.heap.drain().map(|Reverse(c)| c).collect();
        top.sort_by(|a, b| b.cmp(a));
        let max = top[0].logit;
        // Top-p on the plain softmax: the smallest prefix whose mass reaches top_p.
        if self.top_p < 1.0 {
            let weights: Vec<f32> = top.iter().map(|c| (c.logit - max).exp()).collect();
            let total: f32 = weights.iter().sum();
            let mut mass = 0.0;
            let mut keep = top.len();
            for (i, w) in weights.iter().enumerate() {
                mass += w / total;
                if mass >= self.top_p {
                    keep = i + 1;
                    break;
                }
            }
            top.truncate(keep.max(1));
        }
        let weights: Vec<f32> = top
            .iter()
            .map(|c| ((c.logit - max) / self.temperature).exp())
            .collect();
        let total: f32 = weights.iter().sum();
        let mut u = self.next_unit() * total;
        for (c, w) in top.iter().zip(&weights) {
            if u < *w {
                return c.token;
            }
            u -= w;
        }
        top.last().unwrap().token
    }

    /// A uniform draw in [0, 1) (SplitMix64).
    fn next_unit(&mut self) -> f32 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }
}

fn argmax(logits: &[f32]) -> Token {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as Token
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(temperature: f32, top_p: f32, top_k: u32, seed: u32) -> Sampling {
        Sampling {
            temperature,
            top_p,
            top_k,
            seed,
        }
    }

    #[test]
    fn greedy_takes_the_first_largest() {
        let mut s = Sampler::new(&sampling(0.0, 1.0, 0, 1));
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0]), 1);
    }

    #[test]
    fn top_k_and_top_p_bound_the_choice_and_a_seed_repeats_it() {
        // Token 7 holds nearly all the mass; 3 and 5 a little; the rest nothing.
        let mut logits = vec![-20.0f32; 1000];
        logits[7] = 5.0;
        logits[3] = 3.0;
        logits[5] = 2.5;
        let draws = |seed| {
            let mut s = Sampler::new(&sampling(1.0, 1.0, 3, seed));
            (0..400).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        let a = draws(42);
        assert_eq!(a, draws(42), "the same seed draws the same tokens");
        assert_ne!(a, draws(43));
        assert!(a.iter().all(|t| [3, 5, 7].contains(t)), "only the top 3");
        let sevens = a.iter().filter(|&&t| t == 7).count();
        assert!(
            (300..=380).contains(&sevens),
            "7 drawn {sevens} times of 400"
        );
        // top_p 0.5: token 7 alone holds more than half of the mass.
        let mut s = Sampler::new(&sampling(1.0, 0.5, 100, 1));
        assert!((0..100).all(|_| s.sample(&logits) == 7));
    }
}
