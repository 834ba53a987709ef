//! Piper voices (`.onnx` + `.onnx.json`) in process through ONNX Runtime.
//!
//! Why `ort` with `load-dynamic`: nothing downloads or links at build time; ONNX Runtime's
//! shared library (1.22, e.g. from PyPI `onnxruntime`) is opened at run time from
//! `ORT_DYLIB_PATH`, else from beside the voice file (`scripts/fixtures.sh` puts them side by
//! side), else from the loader's usual folders. The first voice's library serves the whole
//! process. ort panics when the library is not ONNX Runtime 1.22; [`Piper::open`] catches that
//! and returns it as an error (the panic's message is still printed once).
//!
//! The model's input is what Piper itself builds: phonemes ([`crate::phonemize`], one run per
//! phoneme sentence) mapped through the config's `phoneme_id_map` as
//! `^ _ p1 _ p2 _ … pn _ $` (BOS, pad after it and after every phoneme, EOS), with
//! `input_lengths` and `scales = [noise_scale, length_scale, noise_w]` from `inference`; it
//! answers float audio at `audio.sample_rate`.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ort::session::Session;
use ort::value::Tensor;

use crate::espeak::DEFAULT_WPM;
use crate::{Pcm, Voice, VoiceError, VoiceInfo, VoiceOptions};

#[derive(Debug, serde::Deserialize)]
struct Config {
    audio: Audio,
    #[serde(default)]
    espeak: Option<EspeakConfig>,
    #[serde(default)]
    inference: Inference,
    #[serde(default)]
    phoneme_type: Option<String>,
    phoneme_id_map: HashMap<String, Vec<i64>>,
    #[serde(default)]
    num_speakers: Option<u32>,
    #[serde(default)]
    language: Option<Language>,
}

#[derive(Debug, serde::Deserialize)]
struct Audio {
    sample_rate: u32,
}

#[derive(Debug, serde::Deserialize)]
struct EspeakConfig {
    voice: String,
}

#[derive(Debug, serde::Deserialize)]
struct Language {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    family: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
struct Inference {
    #[serde(default = "noise_scale")]
    noise_scale: f32,
    #[serde(default = "one")]
    length_scale: f32,
    #[serde(default = "noise_w")]
    noise_w: f32,
}

impl Default for Inference {
    fn default() -> Self {
        Inference {
            noise_scale: noise_scale(),
            length_scale: one(),
            noise_w: noise_w(),
        }
    }
}

fn noise_scale() -> f32 {
    0.667
}
fn one() -> f32 {
    1.0
}
fn noise_w() -> f32 {
    0.8
}

/// A loaded Piper voice.
pub struct Piper {
    // `Session::run` needs `&mut`; one sentence at a time is also what a 2-core box affords.
    session: Mutex<Session>,
    symbols: Symbols,
    scales: [f32; 3],
    multi_speaker: bool,
    sample_rate: u32,
    espeak_program: PathBuf,
    espeak_voice: String,
    name: String,
    language: String,
}

impl Piper {
    /// Loads `path` (`.onnx`) and its `.onnx.json` beside it, and checks the model runs.
    pub fn open(path: &Path, options: &VoiceOptions) -> Result<Piper, VoiceError> {
        let fail = |reason: String| VoiceError::PiperLoad {
            path: path.to_path_buf(),
            reason,
        };
        if !path.is_file() {
            return Err(fail("no such file".into()));
        }
        let config_path = PathBuf::from(format!("{}.json", path.display()));
        let config = std::fs::read(&config_path)
            .map_err(|e| fail(format!("cannot read {}: {e}", config_path.display())))?;
        let config: Config = serde_json::from_slice(&config).map_err(|e| {
            fail(format!(
                "{} is not a Piper config: {e}",
                config_path.display()
            ))
        })?;
        let symbols = check_config(&config).map_err(fail)?;
        let file_language = config
            .language
            .as_ref()
            .and_then(|l| l.family.clone().or(l.code.clone()))
            .or(config.espeak.as_ref().map(|e| e.voice.clone()))
            .unwrap_or_else(|| options.language.clone());
        if base_language(&file_language) != base_language(&options.language) {
            tracing::warn!(
                "the piper voice {} speaks '{file_language}', not '{}': it will speak {file_language} phonemes",
                path.display(),
                options.language
            );
        }
        let espeak_voice = config
            .espeak
            .as_ref()
            .map(|e| e.voice.clone())
            .unwrap_or_else(|| options.language.clone());
        let rate = DEFAULT_WPM as f32 / options.rate_wpm.clamp(80, 450) as f32;
        let session = load_session(path).map_err(fail)?;
        let piper = Piper {
            session: Mutex::new(session),
            symbols,
            scales: [
                config.inference.noise_scale,
                config.inference.length_scale * rate,
                config.inference.noise_w,
            ],
            multi_speaker: config.num_speakers.unwrap_or(1) > 1,
            sample_rate: config.audio.sample_rate,
            espeak_program: options.espeak_program.clone(),
            espeak_voice,
            name: path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            language: file_language,
        };
        piper.synthesize("ok.").map_err(|e| fail(e.to_string()))?;
        Ok(piper)
    }

    /// The model's input ids for one phoneme sentence, as Piper builds them.
    pub fn phoneme_ids(&self, phonemes: &str) -> Vec<i64> {
        self.symbols.input(phonemes)
    }

    fn run(&self, ids: Vec<i64>) -> Result<Vec<f32>, VoiceError> {
        let err = |e: ort::Error| VoiceError::Piper(e.to_string());
        let n = ids.len();
        let input = Tensor::from_array(([1usize, n], ids)).map_err(err)?;
        let lengths = Tensor::from_array(([1usize], vec![n as i64])).map_err(err)?;
        let scales = Tensor::from_array(([3usize], self.scales.to_vec())).map_err(err)?;
        let mut session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        let outputs = if self.multi_speaker {
            let sid = Tensor::from_array(([1usize], vec![0i64])).map_err(err)?;
            session.run(ort::inputs![
                "input" => input, "input_lengths" => lengths, "scales" => scales, "sid" => sid
            ])
        } else {
            session.run(ort::inputs![
                "input" => input, "input_lengths" => lengths, "scales" => scales
            ])
        }
        .map_err(err)?;
        let (_, audio) = outputs[0].try_extract_tensor::<f32>().map_err(err)?;
        Ok(audio.to_vec())
    }
}

impl Voice for Piper {
    fn info(&self) -> VoiceInfo {
        VoiceInfo {
            engine: "piper",
            name: self.name.clone(),
            language: self.language.clone(),
            sample_rate: self.sample_rate,
        }
    }

    fn synthesize(&self, sentence: &str) -> Result<Pcm, VoiceError> {
        let mut pcm = Pcm {
            samples: Vec::new(),
            sample_rate: self.sample_rate,
        };
        for phonemes in crate::phonemize(&self.espeak_program, &self.espeak_voice, sentence)? {
            let audio = self.run(self.phoneme_ids(&phonemes))?;
            pcm.samples
                .extend(audio.iter().map(|&x| (x.clamp(-1.0, 1.0) * 32767.0) as i16));
        }
        Ok(pcm)
    }
}

/// The ids of a voice's phonemes and of its pad, start and end marks.
struct Symbols {
    pad: Vec<i64>,
    bos: Vec<i64>,
    eos: Vec<i64>,
    ids: HashMap<char, Vec<i64>>,
}

/// Audio rates a voice may have: Piper's voices come at 16 and 22.05 kHz. A rate far off
/// would make the resampler to 48 kHz turn each clip into hours of audio.
const SAMPLE_RATES: std::ops::RangeInclusive<u32> = 8_000..=192_000;

/// Checks what [`Piper::open`] needs of a config besides the model, and takes its symbols.
fn check_config(config: &Config) -> Result<Symbols, String> {
    if !SAMPLE_RATES.contains(&config.audio.sample_rate) {
        return Err(format!(
            "audio.sample_rate {} is not a voice's rate ({} to {} Hz)",
            config.audio.sample_rate,
            SAMPLE_RATES.start(),
            SAMPLE_RATES.end()
        ));
    }
    if let Some(kind) = &config.phoneme_type {
        if kind != "espeak" {
            return Err(format!(
                "phoneme_type '{kind}' (only espeak voices are supported)"
            ));
        }
    }
    let one = |symbol: &str| {
        config
            .phoneme_id_map
            .get(symbol)
            .cloned()
            .ok_or_else(|| format!("phoneme_id_map has no '{symbol}'"))
    };
    let (pad, bos, eos) = (one("_")?, one("^")?, one("$")?);
    let mut ids = HashMap::new();
    for (symbol, id) in &config.phoneme_id_map {
        let mut chars = symbol.chars();
        if let (Some(c), None) = (chars.next(), chars.next()) {
            ids.insert(c, id.clone());
        }
    }
    Ok(Symbols { pad, bos, eos, ids })
}

impl Symbols {
    /// The model's input ids for one phoneme sentence: `^ _ p1 _ p2 _ … pn _ $`.
    fn input(&self, phonemes: &str) -> Vec<i64> {
        let mut out = self.bos.clone();
        out.extend(&self.pad);
        for c in decompose(phonemes) {
            // Piper skips phonemes its map lacks.
            if let Some(id) = self.ids.get(&c) {
                out.extend(id);
                out.extend(&self.pad);
            }
        }
        out.extend(&self.eos);
        out
    }
}

/// A voice's `.onnx.json` read and checked as [`Piper::open`] does, for the fuzz target in
/// `fuzz/` (not an API): the sample rate its audio comes at, and the model input for
/// `phonemes`.
#[doc(hidden)]
pub fn read_config(json: &[u8], phonemes: &str) -> Result<(u32, Vec<i64>), String> {
    let config: Config = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    let symbols = check_config(&config)?;
    Ok((config.audio.sample_rate, symbols.input(phonemes)))
}

/// `en_US`, `en-us`, `en` → `en`.
fn base_language(code: &str) -> String {
    code.split(['_', '-'])
        .next()
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// Piper decomposes its phonemes (Unicode NFD) before the id lookup; of espeak's IPA only a
/// few precomposed letters change, and those are spelled out here.
fn decompose(phonemes: &str) -> impl Iterator<Item = char> + '_ {
    phonemes.chars().flat_map(|c| {
        let (base, mark) = match c {
            'ç' => ('c', Some('\u{327}')),
            'ã' => ('a', Some('\u{303}')),
            'ẽ' => ('e', Some('\u{303}')),
            'ĩ' => ('i', Some('\u{303}')),
            'õ' => ('o', Some('\u{303}')),
            'ũ' => ('u', Some('\u{303}')),
            c => (c, None),
        };
        std::iter::once(base).chain(mark)
    })
}

/// Finds ONNX Runtime, loads it (once per process) and the model. ort panics where the
/// library is missing or of the wrong version; that panic becomes an error here.
fn load_session(model: &Path) -> Result<Session, String> {
    let hint = "hint: set ORT_DYLIB_PATH to ONNX Runtime 1.22's libonnxruntime.so (PyPI onnxruntime==1.22.1 has one; scripts/fixtures.sh fetches it)";
    let dylib = match std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        Some(lib) if !Path::new(&lib).is_file() => {
            return Err(format!(
                "ONNX Runtime not found at {} (ORT_DYLIB_PATH)",
                Path::new(&lib).display()
            ))
        }
        Some(lib) => PathBuf::from(lib),
        None => beside(model)
            .or_else(system_library)
            .ok_or_else(|| format!("ONNX Runtime (libonnxruntime.so) not found\n{hint}"))?,
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load = move || -> Result<Session, String> {
        // The first voice's library serves the whole process; `false` only says an
        // environment existed already (a second voice): fine.
        ort::init_from(dylib.display().to_string())
            .commit()
            .map_err(|e| e.to_string())?;
        // No spinning: ONNX Runtime's workers otherwise busy-wait between runs, burning
        // the cores the decoders, the model and other voices share, and on a busy box a
        // spinning pool starves itself.
        Session::builder()
            .and_then(|b| b.with_intra_threads(threads))
            .and_then(|b| b.with_intra_op_spinning(false))
            .and_then(|b| b.with_inter_op_spinning(false))
            .and_then(|b| b.commit_from_file(model))
            .map_err(|e| e.to_string())
    };
    match std::panic::catch_unwind(AssertUnwindSafe(load)) {
        Ok(result) => result,
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "ONNX Runtime failed to load".into());
            Err(format!("{why}\n{hint}"))
        }
    }
}

/// A `libonnxruntime.so*` in the voice file's folder.
fn beside(model: &Path) -> Option<PathBuf> {
    find_in(model.parent()?)
}

/// `libonnxruntime.so*` where the dynamic loader looks (LD_LIBRARY_PATH, then the usual
/// folders), so that a missing library is an error here rather than a panic inside ort.
fn system_library() -> Option<PathBuf> {
    let from_env = std::env::var_os("LD_LIBRARY_PATH")
        .map(|v| std::env::split_paths(&v).collect::<Vec<_>>())
        .unwrap_or_default();
    let usual = [
        "/usr/local/lib",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib",
    ];
    from_env
        .into_iter()
        .chain(usual.iter().map(PathBuf::from))
        .find_map(|dir| find_in(&dir))
}

fn find_in(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so"))
        })
        .collect();
    found.sort();
    found.pop()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = r#""phoneme_id_map": {"_": [0], "^": [1], "$": [2], "a": [3]}"#;

    #[test]
    fn a_config_gives_the_model_input() {
        let json = format!(r#"{{"audio": {{"sample_rate": 22050}}, {MAP}}}"#);
        let (rate, ids) = read_config(json.as_bytes(), "ab").unwrap();
        assert_eq!((rate, ids), (22050, vec![1, 0, 3, 0, 2]));
    }

    /// Found writing `fuzz/fuzz_targets/piper_json.rs`, which sends a config's audio rate
    /// through the speech encoder: at 1 Hz every sample became 48,000 at 48 kHz, and 0
    /// reaches the resampler's assertion wherever it is not checked first.
    #[test]
    fn fuzz_sample_rates_far_off_are_refused() {
        for rate in [0, 1, 7_999, 192_001, u32::MAX] {
            let json = format!(r#"{{"audio": {{"sample_rate": {rate}}}, {MAP}}}"#);
            let e = read_config(json.as_bytes(), "a").unwrap_err();
            assert!(e.contains("sample_rate"), "{e}");
        }
    }
}
