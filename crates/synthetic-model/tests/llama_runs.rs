//! The synthetic pair is only useful if the real llama.cpp accepts it. These tests load both
//! files through llama.cpp and mtmd, encode two images, and decode greedily, checking that
//! the tokenizer, the projector and every tensor type do what the real model's would.
//!
//! The FFI is raw `llama-cpp-sys-2` on purpose: the engine has its own wrapper, and this
//! crate must not depend on it. Set `KIBITZ_LLAMA_LOG=1` to see llama.cpp's own logging.

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;
use std::ptr;
use std::sync::Once;
use std::time::{Duration, Instant};

use kibitz_synthetic_model::{write_pair, LlmSpec, Pair, Quant, Spec};
use llama_cpp_sys_2 as sys;

/// One thread: with OpenMP, two threads on a loaded two-core machine spin at barriers and
/// a 16-token decode can take seconds instead of milliseconds.
const THREADS: i32 = 1;
const GENERATED: usize = 16;
/// A square frame (one slice) and a wide one (overview plus slices).
const FRAMES: [(u32, u32); 2] = [(448, 448), (640, 360)];

#[test]
fn llama_cpp_runs_the_tiny_pair_on_two_images() {
    let spec = Spec::tiny();
    let dir = tempfile::tempdir().unwrap();
    let pair = write_pair(dir.path(), &spec).unwrap();
    let run = run_pair(&spec, &pair, &FRAMES, GENERATED);
    // The 448x448 frame is one slice; 640x360 is an overview plus slices. Every slice is
    // resampled to exactly `n_query` embeddings.
    assert!(run.image_chunks.len() >= 2, "{:?}", run.image_chunks);
    assert!(
        run.image_chunks
            .iter()
            .all(|&n| n == spec.vision.n_query as usize),
        "{:?}",
        run.image_chunks
    );
    eprintln!(
        "tiny {}: load {:?}, tokenize + 2 images ({} positions) {:?}, {GENERATED} tokens {:?}: {:?}",
        spec.quant.name(),
        run.load,
        run.n_past,
        run.prompt,
        run.decode,
        run.text
    );
}

#[test]
fn k_quant_mix_runs_without_nans() {
    // Width 256 so that every matrix holds whole 256-element K blocks: Q4_K and Q6_K
    // both get exercised, as in the full-size Q4_K_M file.
    let tiny = Spec::tiny();
    let spec = Spec {
        quant: Quant::Q4_K_M,
        llm: LlmSpec {
            n_embd: 256,
            n_head: 4,
            n_ff: 512,
            ..tiny.llm.clone()
        },
        ..tiny
    };
    let dir = tempfile::tempdir().unwrap();
    let pair = write_pair(dir.path(), &spec).unwrap();
    let run = run_pair(&spec, &pair, &FRAMES, GENERATED);
    assert!(run
        .image_chunks
        .iter()
        .all(|&n| n == spec.vision.n_query as usize));
}

/// The full-size Q4_K_M pair through the same path, on CPU: one frame and a few tokens.
/// Minutes on a small machine, hence ignored. It writes 6 GB to a temp dir, or uses the pair
/// already in `$KIBITZ_FULL_PAIR_DIR` (from the `write_pair` example, which runs optimised):
/// `cargo test -p kibitz-synthetic-model --test llama_runs -- --ignored --nocapture`
#[test]
#[ignore = "writes 6 GB and runs an 8B model on CPU"]
fn llama_cpp_runs_the_full_size_pair() {
    let spec = Spec::minicpm_o_4_5(Quant::Q4_K_M);
    let temp = tempfile::tempdir().unwrap();
    let pair = match std::env::var_os("KIBITZ_FULL_PAIR_DIR") {
        Some(dir) => {
            let dir = Path::new(&dir);
            let pair = Pair {
                llm: dir.join(spec.llm_file_name()),
                mmproj: dir.join(spec.mmproj_file_name()),
            };
            assert!(
                pair.llm.exists() && pair.mmproj.exists(),
                "no full-size pair in {}",
                dir.display()
            );
            pair
        }
        None => write_pair(temp.path(), &spec).unwrap(),
    };
    let run = run_pair(&spec, &pair, &FRAMES[..1], 4);
    assert_eq!(run.image_chunks, [spec.vision.n_query as usize]);
    eprintln!(
        "full: load {:?}, tokenize + 1 image ({} positions) {:?}, 4 tokens {:?}: {:?}",
        run.load, run.n_past, run.prompt, run.decode, run.text
    );
}

#[test]
fn tokenizer_finds_specials_and_merges() {
    let dir = tempfile::tempdir().unwrap();
    let pair = write_pair(dir.path(), &Spec::tiny()).unwrap();
    init_backend();
    // SAFETY: the backend is initialised; the model pointer is checked non-null by
    // `load_model`, the vocab it owns lives until `llama_model_free` at the end, and every
    // buffer handed to llama.cpp is sized by the length passed with it.
    unsafe {
        let model = load_model(&pair.llm);
        let vocab = sys::llama_model_get_vocab(model);
        let eot = sys::llama_vocab_eot(vocab);
        assert_eq!(
            tokenize(vocab, "<|im_end|>"),
            [eot],
            "<|im_end|> is one special token"
        );
        assert!(sys::llama_vocab_is_eog(vocab, eot));
        assert!(sys::llama_vocab_is_eog(vocab, sys::llama_vocab_eos(vocab)));
        assert_eq!(piece(vocab, sys::llama_vocab_eos(vocab)), b"<|endoftext|>");
        // Learned merges make common words single tokens; anything else still round-trips
        // through the byte tokens.
        assert_eq!(tokenize(vocab, " the").len(), 1);
        let text = "The player runs left.\nCafé, 42 ½ 😀 <think>";
        let tokens = tokenize(vocab, text);
        assert!(
            tokens.len() < text.len(),
            "merges apply: {} tokens",
            tokens.len()
        );
        let back: Vec<u8> = tokens.iter().flat_map(|&t| piece(vocab, t)).collect();
        assert_eq!(String::from_utf8(back).unwrap(), text);
        sys::llama_model_free(model);
    }
}

struct Run {
    load: Duration,
    prompt: Duration,
    decode: Duration,
    image_chunks: Vec<usize>,
    n_past: i32,
    text: String,
}

/// Loads both files, tokenizes a ChatML prompt with one image marker per frame (frames of
/// the given sizes), evaluates it, and decodes `n_generate` tokens greedily, checking every
/// logit is finite.
fn run_pair(spec: &Spec, pair: &Pair, frames: &[(u32, u32)], n_generate: usize) -> Run {
    init_backend();
    // SAFETY: one thread owns the model, context and mtmd handles created here, each checked
    // non-null before use and freed once at the end; batches and token buffers outlive the
    // calls that read them.
    unsafe {
        let start = Instant::now();
        let model = load_model(&pair.llm);
        let mut cparams = sys::llama_context_default_params();
        cparams.n_ctx = 2048;
        cparams.n_batch = 512;
        cparams.n_threads = THREADS;
        cparams.n_threads_batch = THREADS;
        let ctx = sys::llama_init_from_model(model, cparams);
        assert!(!ctx.is_null(), "llama.cpp could not create a context");
        let mut mparams = sys::mtmd_context_params_default();
        mparams.use_gpu = false;
        mparams.n_threads = THREADS;
        mparams.print_timings = false;
        mparams.warmup = false;
        let mmproj = c_path(&pair.mmproj);
        let mtmd = sys::mtmd_init_from_file(mmproj.as_ptr(), model, mparams);
        assert!(!mtmd.is_null(), "mtmd refused {}", pair.mmproj.display());
        assert!(sys::mtmd_support_vision(mtmd));
        let load = start.elapsed();

        let start = Instant::now();
        let marker = CStr::from_ptr(sys::mtmd_default_marker()).to_str().unwrap();
        let prompt = CString::new(format!(
            "<|im_start|>system\nYou comment on live video.<|im_end|>\n<|im_start|>user\n{}What happens?<|im_end|>\n<|im_start|>assistant\n",
            format!("{marker}\n").repeat(frames.len())
        ))
        .unwrap();
        let images: Vec<_> = frames.iter().map(|&(w, h)| gradient(w, h)).collect();
        let bitmaps: Vec<*mut sys::mtmd_bitmap> = images
            .iter()
            .map(|(w, h, rgb)| sys::mtmd_bitmap_init(*w, *h, rgb.as_ptr()))
            .collect();
        assert!(bitmaps.iter().all(|b| !b.is_null()));
        let chunks = sys::mtmd_input_chunks_init();
        let text = sys::mtmd_input_text {
            text: prompt.as_ptr(),
            text_len: prompt.as_bytes().len(),
            add_special: true,
            parse_special: true,
        };
        let rc = sys::mtmd_tokenize(mtmd, chunks, &text, bitmaps.as_ptr().cast(), bitmaps.len());
        assert_eq!(rc, 0, "mtmd_tokenize failed");
        let mut image_chunks = Vec::new();
        let mut n_pos = 0;
        for i in 0..sys::mtmd_input_chunks_size(chunks) {
            let chunk = sys::mtmd_input_chunks_get(chunks, i);
            n_pos += sys::mtmd_input_chunk_get_n_pos(chunk);
            if sys::mtmd_input_chunk_get_type(chunk) == sys::MTMD_INPUT_CHUNK_TYPE_IMAGE {
                image_chunks.push(sys::mtmd_input_chunk_get_n_tokens(chunk));
            }
        }
        let mut n_past = 0;
        let rc = sys::mtmd_helper_eval_chunks(
            mtmd,
            ctx,
            chunks,
            0,
            0,
            cparams.n_batch as i32,
            true,
            &mut n_past,
        );
        assert_eq!(rc, 0, "mtmd_helper_eval_chunks failed");
        assert_eq!(n_past, n_pos, "every chunk was evaluated");
        let prompt_time = start.elapsed();

        let start = Instant::now();
        let vocab = sys::llama_model_get_vocab(model);
        let n_vocab = sys::llama_vocab_n_tokens(vocab) as usize;
        assert_eq!(n_vocab, spec.llm.n_vocab as usize);
        let mut text = Vec::new();
        for step in 0..n_generate {
            let logits = std::slice::from_raw_parts(sys::llama_get_logits_ith(ctx, -1), n_vocab);
            assert!(
                logits.iter().all(|x| x.is_finite()),
                "non-finite logit at step {step}"
            );
            let spread = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
                - logits.iter().fold(f32::INFINITY, |a, &b| a.min(b));
            assert!(spread > 0.0, "logits are not all equal at step {step}");
            let mut token = (0..n_vocab)
                .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
                .unwrap() as sys::llama_token;
            text.extend(piece(vocab, token));
            let rc = sys::llama_decode(ctx, sys::llama_batch_get_one(&mut token, 1));
            assert_eq!(rc, 0, "llama_decode failed at step {step}");
        }
        let decode = start.elapsed();

        sys::mtmd_input_chunks_free(chunks);
        for b in bitmaps {
            sys::mtmd_bitmap_free(b);
        }
        sys::mtmd_free(mtmd);
        sys::llama_free(ctx);
        sys::llama_model_free(model);
        let text = String::from_utf8_lossy(&text).into_owned();
        Run {
            load,
            prompt: prompt_time,
            decode,
            image_chunks,
            n_past,
            text,
        }
    }
}

/// An RGB test frame: smooth gradients, so every patch differs.
fn gradient(w: u32, h: u32) -> (u32, u32, Vec<u8>) {
    let mut rgb = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            rgb.extend_from_slice(&[
                (x * 255 / w) as u8,
                (y * 255 / h) as u8,
                ((x + y) % 256) as u8,
            ]);
        }
    }
    (w, h, rgb)
}

fn init_backend() {
    static INIT: Once = Once::new();
    // SAFETY: `quiet` is a plain function that ignores its arguments, valid for the whole
    // process; `llama_backend_init` runs once, before any model is loaded.
    INIT.call_once(|| unsafe {
        if std::env::var_os("KIBITZ_LLAMA_LOG").is_none() {
            sys::llama_log_set(Some(quiet), ptr::null_mut());
            sys::mtmd_log_set(Some(quiet), ptr::null_mut());
            sys::mtmd_helper_log_set(Some(quiet), ptr::null_mut());
        }
        sys::llama_backend_init();
    });
}

unsafe extern "C" fn quiet(_level: sys::ggml_log_level, _text: *const c_char, _user: *mut c_void) {}

fn c_path(path: &Path) -> CString {
    CString::new(path.to_str().expect("temp paths are UTF-8")).unwrap()
}

/// # Safety
/// The backend must be initialised ([`init_backend`]); the caller frees the model.
unsafe fn load_model(path: &Path) -> *mut sys::llama_model {
    let mut params = sys::llama_model_default_params();
    params.n_gpu_layers = 0;
    let model = sys::llama_model_load_from_file(c_path(path).as_ptr(), params);
    assert!(!model.is_null(), "llama.cpp refused {}", path.display());
    model
}

/// # Safety
/// `vocab` must belong to a model that is still loaded.
unsafe fn tokenize(vocab: *const sys::llama_vocab, text: &str) -> Vec<sys::llama_token> {
    let mut out = vec![0; text.len() + 8];
    let n = sys::llama_tokenize(
        vocab,
        text.as_ptr().cast(),
        text.len() as i32,
        out.as_mut_ptr(),
        out.len() as i32,
        false,
        true,
    );
    assert!(n >= 0, "llama_tokenize needs {} slots", -n);
    out.truncate(n as usize);
    out
}

/// A token's bytes (a multi-byte character may span several tokens).
///
/// # Safety
/// `vocab` must belong to a model that is still loaded.
unsafe fn piece(vocab: *const sys::llama_vocab, token: sys::llama_token) -> Vec<u8> {
    let mut buf = [0u8; 256];
    let n = sys::llama_token_to_piece(
        vocab,
        token,
        buf.as_mut_ptr().cast(),
        buf.len() as i32,
        0,
        true,
    );
    assert!(n >= 0, "token {token} has a piece longer than 256 bytes");
    buf[..n as usize].to_vec()
}
