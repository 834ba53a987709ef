//! Random-weight GGUF model pairs with MiniCPM-o 4.5's layout.
//!
//! kibitz runs MiniCPM-o 4.5 through llama.cpp as two files: a Qwen3 LLM and a MiniCPM-V
//! vision projector ("mmproj": a SigLIP tower plus a resampler that turns each image slice
//! into 64 LLM embeddings). Tests, `kibitz selftest` and the GPU benchmark need such a pair
//! without downloading 6 GB, so this crate writes one: same architecture keys, tensor names,
//! shapes, quantization types and tokenizer conventions as the real files, with seeded
//! random weights. The output is gibberish, but every code path of the engine runs.
//!
//! ```no_run
//! # fn main() -> Result<(), kibitz_synthetic_model::Error> {
//! use kibitz_synthetic_model::{write_pair, Quant, Spec};
//! let tiny = write_pair(std::path::Path::new("/tmp/model"), &Spec::tiny())?;
//! println!("{} + {}", tiny.llm.display(), tiny.mmproj.display());
//! let full = Spec::minicpm_o_4_5(Quant::Q4_K_M); // ~6 GB on disk, written at disk speed
//! # Ok(()) }
//! ```
//!
//! Everything is pure Rust and streamed: no Python, and the full-size LLM is never in memory.

mod gguf;
mod llm;
mod projector;
mod vocab;
mod weights;

use std::fs::{self, File};
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use gguf::{TensorInfo, Value};
use weights::{Init, Rng};

/// Errors from writing a model pair.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot write synthetic model '{}': {source}; check that the directory is writable and has enough free space", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("invalid synthetic model spec: {0}")]
    Spec(String),
}

/// The two files of a model pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    /// The LLM, e.g. `MiniCPM-o-4_5-tiny-Q8_0.gguf`.
    pub llm: PathBuf,
    /// The vision projector, e.g. `mmproj-MiniCPM-o-4_5-tiny-F16.gguf`.
    pub mmproj: PathBuf,
}

/// The LLM's weight format, as llama.cpp's `general.file_type` names it.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant {
    F32,
    F16,
    /// 8-bit blocks of 32.
    Q8_0,
    /// llama-quantize's Q4_K_M mix: Q4_K, with Q6_K for `output.weight` and for `attn_v` /
    /// `ffn_down` in about half the layers. Rows that are not a multiple of 256 (only in tiny
    /// specs) fall back to Q8_0, as llama-quantize does.
    Q4_K_M,
}

impl Quant {
    /// The name used in file names: `Q4_K_M`, `Q8_0`, `F16`, `F32`.
    pub fn name(self) -> &'static str {
        match self {
            Quant::F32 => "F32",
            Quant::F16 => "F16",
            Quant::Q8_0 => "Q8_0",
            Quant::Q4_K_M => "Q4_K_M",
        }
    }

    /// llama.cpp's `enum llama_ftype` value, stored as `general.file_type`.
    pub fn file_type(self) -> u32 {
        match self {
            Quant::F32 => 0,
            Quant::F16 => 1,
            Quant::Q8_0 => 7,
            Quant::Q4_K_M => 15,
        }
    }
}

impl std::str::FromStr for Quant {
    type Err = Error;

    /// Parses a [`Quant::name`], ignoring case (`q4_k_m` works).
    fn from_str(s: &str) -> Result<Quant, Error> {
        [Quant::F32, Quant::F16, Quant::Q8_0, Quant::Q4_K_M]
            .into_iter()
            .find(|q| q.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                Error::Spec(format!(
                    "unknown quantization '{s}'; use Q4_K_M, Q8_0, F16 or F32"
                ))
            })
    }
}

/// The Qwen3 language model (llama.cpp architecture `qwen3`).
#[derive(Debug, Clone, PartialEq)]
pub struct LlmSpec {
    pub n_vocab: u32,
    /// Hidden size; also the projector's output width. A multiple of 128, because the
    /// resampler's attention has a fixed head size of 128.
    pub n_embd: u32,
    pub n_layer: u32,
    pub n_head: u32,
    pub n_head_kv: u32,
    pub head_dim: u32,
    pub n_ff: u32,
    pub n_ctx_train: u32,
    pub rope_freq_base: f32,
}

/// The MiniCPM-V projector: SigLIP vision tower plus perceiver resampler (clip
/// projector type `resampler`, `clip.minicpmv_version` 100045 = MiniCPM-o 4.5).
#[derive(Debug, Clone, PartialEq)]
pub struct VisionSpec {
    /// SigLIP width.
    pub n_embd: u32,
    /// Encoder layers in the file, all of which clip runs. SigLIP-400M has 27; MiniCPM-o
    /// drops the last one (`drop_vision_last_layer`), so the real projector runs 26.
    pub n_layer: u32,
    pub n_head: u32,
    pub n_ff: u32,
    /// Slice size: images are cut into slices of at most this many pixels a side.
    pub image_size: u32,
    pub patch_size: u32,
    /// Resampler queries: LLM embeddings per image slice.
    pub n_query: u32,
}

/// Learned SigLIP positions: clip buckets every slice's patches onto a 70 x 70 grid
/// (MiniCPM-V's 980-pixel pretraining size), so `v.position_embd` always has 4900 rows.
pub const VISION_POSITIONS: u64 = 70 * 70;

/// The resampler's attention head size, fixed in llama.cpp's minicpmv graph.
pub const RESAMPLER_HEAD_DIM: u32 = 128;

/// A complete model pair description.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    /// Size label used in the file names: `tiny`, `full`.
    pub size: String,
    pub llm: LlmSpec,
    pub vision: VisionSpec,
    pub quant: Quant,
    /// Same seed, same bytes.
    pub seed: u64,
}

impl Spec {
    /// The smallest pair llama.cpp accepts with MiniCPM-o 4.5's layout: LLM width 128
    /// (one resampler head), 2 layers, 512 tokens; a 64-wide, 2-layer vision tower at the real
    /// 448-pixel slice size. 0.5 MB + 3.6 MB (mostly the 4900-row position tables); on one CPU
    /// thread llama.cpp loads it in tens of milliseconds and encodes an image slice in ~0.1 s.
    pub fn tiny() -> Spec {
        Spec {
            size: "tiny".into(),
            llm: LlmSpec {
                n_vocab: 512,
                n_embd: 128,
                n_layer: 2,
                n_head: 2,
                n_head_kv: 1,
                head_dim: 64,
                n_ff: 256,
                n_ctx_train: 4096,
                rope_freq_base: 1_000_000.0,
            },
            vision: VisionSpec {
                n_embd: 64,
                n_layer: 2,
                n_head: 2,
                n_ff: 128,
                image_size: 448,
                patch_size: 14,
                n_query: 64,
            },
            quant: Quant::Q8_0,
            seed: 0x6b69_6269_747a, // "kibitz"
        }
    }

    /// MiniCPM-o 4.5 at full size: Qwen3-8B (hidden 4096, 36 layers, 32 heads, 8 KV heads,
    /// head dim 128, FFN 12288, vocab 151748) and SigLIP-400M (1152 wide, 26 layers used,
    /// 16 heads, FFN 4304, patch 14) with a 64-query resampler (32 heads of 128).
    pub fn minicpm_o_4_5(quant: Quant) -> Spec {
        Spec {
            size: "full".into(),
            llm: LlmSpec {
                n_vocab: 151_748,
                n_embd: 4096,
                n_layer: 36,
                n_head: 32,
                n_head_kv: 8,
                head_dim: 128,
                n_ff: 12288,
                n_ctx_train: 40960,
                rope_freq_base: 1_000_000.0,
            },
            vision: VisionSpec {
                n_embd: 1152,
                n_layer: 26,
                n_head: 16,
                n_ff: 4304,
                image_size: 448,
                patch_size: 14,
                n_query: 64,
            },
            quant,
            seed: 0x6b69_6269_747a,
        }
    }

    /// Checks the shapes fit together the way llama.cpp needs.
    pub fn validate(&self) -> Result<(), Error> {
        let (l, v) = (&self.llm, &self.vision);
        let fail = |why: String| Err(Error::Spec(why));
        if self.size.is_empty() || self.size.contains(['/', '\\']) {
            return fail(format!(
                "size label {:?} must be a plain file-name part",
                self.size
            ));
        }
        if l.n_embd == 0 || !l.n_embd.is_multiple_of(RESAMPLER_HEAD_DIM) {
            return fail(format!(
                "LLM n_embd {} must be a positive multiple of 128 (the resampler head size)",
                l.n_embd
            ));
        }
        if l.n_layer == 0 || l.n_head == 0 || l.n_head_kv == 0 || l.head_dim == 0 || l.n_ff == 0 {
            return fail("LLM layers, heads, head_dim and n_ff must be positive".into());
        }
        if !l.n_head.is_multiple_of(l.n_head_kv) {
            return fail(format!(
                "LLM n_head {} must be a multiple of n_head_kv {}",
                l.n_head, l.n_head_kv
            ));
        }
        if !l.head_dim.is_multiple_of(2) {
            return fail(format!("LLM head_dim {} must be even for RoPE", l.head_dim));
        }
        if l.n_vocab < vocab::MIN_VOCAB {
            return fail(format!(
                "LLM n_vocab {} must be at least {}",
                l.n_vocab,
                vocab::MIN_VOCAB
            ));
        }
        if v.n_embd == 0 || v.n_head == 0 || !v.n_embd.is_multiple_of(v.n_head) {
            return fail(format!(
                "vision n_embd {} must be a positive multiple of n_head {}",
                v.n_embd, v.n_head
            ));
        }
        if v.n_layer == 0 || v.n_ff == 0 || v.n_query == 0 {
            return fail("vision layers, n_ff and n_query must be positive".into());
        }
        if v.patch_size == 0 || v.image_size == 0 || !v.image_size.is_multiple_of(v.patch_size) {
            return fail(format!(
                "image_size {} must be a multiple of patch_size {}",
                v.image_size, v.patch_size
            ));
        }
        Ok(())
    }

    /// File name of the LLM: `MiniCPM-o-4_5-<size>-<QUANT>.gguf`.
    pub fn llm_file_name(&self) -> String {
        format!("MiniCPM-o-4_5-{}-{}.gguf", self.size, self.quant.name())
    }

    /// File name of the projector: `mmproj-MiniCPM-o-4_5-<size>-F16.gguf`.
    pub fn mmproj_file_name(&self) -> String {
        format!("mmproj-MiniCPM-o-4_5-{}-F16.gguf", self.size)
    }
}

/// Writes the pair into `dir` (created if missing), replacing files of the same names.
pub fn write_pair(dir: &Path, spec: &Spec) -> Result<Pair, Error> {
    write_pair_with_progress(dir, spec, &mut |_, _| {})
}

/// [`write_pair`], calling `progress(bytes_written, bytes_total)` over both files as it
/// goes; the full-size pair takes a while.
pub fn write_pair_with_progress(
    dir: &Path,
    spec: &Spec,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Pair, Error> {
    spec.validate()?;
    fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let (llm_kvs, llm_tensors) = llm::plan(spec);
    let (proj_kvs, proj_tensors) = projector::plan(spec);
    let total: u64 = llm_tensors
        .iter()
        .chain(&proj_tensors)
        .map(|(t, _)| t.n_bytes())
        .sum();
    let mut done = 0;
    let mut report = |n: u64| {
        done += n;
        progress(done, total);
    };
    let pair = Pair {
        llm: dir.join(spec.llm_file_name()),
        mmproj: dir.join(spec.mmproj_file_name()),
    };
    write_file(
        &pair.mmproj,
        &proj_kvs,
        proj_tensors,
        spec.seed,
        &mut report,
    )?;
    write_file(&pair.llm, &llm_kvs, llm_tensors, spec.seed, &mut report)?;
    Ok(pair)
}

/// A tensor to write and how to fill it.
type Planned = (TensorInfo, Init);

/// Writes to a temporary name beside `path` and renames on success, so an interrupted write
/// never leaves a truncated file under the real name, and concurrent writers of the same
/// pair (parallel tests) each rename a complete, identical file into place.
fn write_file(
    path: &Path,
    kvs: &[(String, Value)],
    tensors: Vec<Planned>,
    seed: u64,
    report: &mut dyn FnMut(u64),
) -> Result<(), Error> {
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let mut partial = path.as_os_str().to_owned();
    partial.push(format!(
        ".{}-{}.partial",
        std::process::id(),
        WRITES.fetch_add(1, Ordering::Relaxed)
    ));
    let partial = PathBuf::from(partial);
    let io_err = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let result = (|| {
        let file = File::create(&partial)?;
        let inits: Vec<Init> = tensors.iter().map(|(_, init)| *init).collect();
        let infos = tensors.into_iter().map(|(info, _)| info).collect();
        let mut w = gguf::Writer::new(BufWriter::with_capacity(1 << 20, file), kvs, infos)?;
        let mut buf = Vec::new();
        for init in inits {
            let info = w.next_tensor().expect("one init per tensor");
            let (ty, mut rng) = (info.ty, Rng::for_tensor(seed, &info.name));
            let row_bytes = info.n_bytes() / (info.n_elems() / info.dims[0]);
            let n = w.tensor(&mut buf, |at, chunk| {
                weights::fill(ty, init, &mut rng, at, row_bytes, chunk)
            })?;
            report(n);
        }
        let file = w.finish()?.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        fs::rename(&partial, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&partial);
    }
    result.map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_follow_the_convention() {
        let s = Spec::tiny();
        assert_eq!(s.llm_file_name(), "MiniCPM-o-4_5-tiny-Q8_0.gguf");
        assert_eq!(s.mmproj_file_name(), "mmproj-MiniCPM-o-4_5-tiny-F16.gguf");
        let f = Spec::minicpm_o_4_5(Quant::Q4_K_M);
        assert_eq!(f.llm_file_name(), "MiniCPM-o-4_5-full-Q4_K_M.gguf");
        assert!(f.mmproj_file_name().contains("mmproj"));
    }

    #[test]
    fn quant_names_parse_back() {
        for q in [Quant::F32, Quant::F16, Quant::Q8_0, Quant::Q4_K_M] {
            assert_eq!(q.name().parse::<Quant>().unwrap(), q);
        }
        assert_eq!("q4_k_m".parse::<Quant>().unwrap(), Quant::Q4_K_M);
        assert!("Q5_K_M"
            .parse::<Quant>()
            .unwrap_err()
            .to_string()
            .contains("Q4_K_M"));
    }

    #[test]
    fn presets_are_valid_and_bad_specs_are_refused() {
        Spec::tiny().validate().unwrap();
        for q in [Quant::F32, Quant::F16, Quant::Q8_0, Quant::Q4_K_M] {
            Spec::minicpm_o_4_5(q).validate().unwrap();
        }
        let mut s = Spec::tiny();
        s.llm.n_embd = 192;
        assert!(matches!(s.validate(), Err(Error::Spec(m)) if m.contains("128")));
        let mut s = Spec::tiny();
        s.vision.n_head = 3;
        assert!(s.validate().is_err());
        let mut s = Spec::tiny();
        s.llm.n_vocab = 100;
        assert!(s.validate().is_err());
        let mut s = Spec::tiny();
        s.size = "../x".into();
        assert!(s.validate().is_err());
    }

    #[test]
    fn write_pair_reports_progress_and_is_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let mut calls = Vec::new();
        let a = write_pair_with_progress(&dir.path().join("a"), &Spec::tiny(), &mut |d, t| {
            calls.push((d, t))
        })
        .unwrap();
        let (last, total) = *calls.last().unwrap();
        assert_eq!(last, total);
        assert!(calls.windows(2).all(|w| w[0].0 < w[1].0));
        let b = write_pair(&dir.path().join("b"), &Spec::tiny()).unwrap();
        for (x, y) in [(&a.llm, &b.llm), (&a.mmproj, &b.mmproj)] {
            assert_eq!(
                fs::read(x).unwrap(),
                fs::read(y).unwrap(),
                "{}",
                x.display()
            );
        }
        let mut other = Spec::tiny();
        other.seed += 1;
        let c = write_pair(&dir.path().join("c"), &other).unwrap();
        assert_ne!(fs::read(&a.llm).unwrap(), fs::read(&c.llm).unwrap());
        // No leftovers besides the pair itself.
        let names: Vec<_> = fs::read_dir(dir.path().join("a"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn unwritable_directory_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        fs::write(&blocker, b"x").unwrap();
        let err = write_pair(&blocker.join("sub"), &Spec::tiny()).unwrap_err();
        assert!(matches!(err, Error::Io { .. }));
        assert!(err.to_string().contains("writable"), "{err}");
    }
}
