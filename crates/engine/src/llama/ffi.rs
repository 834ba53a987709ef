//! Owned handles over llama.cpp's C API (through `llama-cpp-sys-2`).
//!
//! The safe `llama-cpp-2` wrapper keeps its raw pointers private, and the batched engine
//! needs what it does not offer: several sequences in one context, batches that mix
//! sequences, image embeddings fed as batches of our own (several streams' frames in one
//! `llama_decode`), KV-cache position edits (`llama_memory_seq_rm` / `_add`) and one vision
//! encode per chunk timed apart from the LLM. So this module owns the pointers itself. Every handle here lives on the engine's one worker
//! thread; none is `Send`, which keeps llama.cpp's single-threaded contexts single-threaded.
//!
//! Every `unsafe` block says why it holds (`clippy::undocumented_unsafe_blocks` is denied
//! here). The common ground: each handle owns a non-null pointer from llama.cpp's
//! constructor, freed once in its `Drop`, and the worker drops handles before what they
//! point into (contexts before their model).
#![deny(clippy::undocumented_unsafe_blocks)]

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

pub type Token = sys::llama_token;

fn c_path(path: &Path) -> Result<CString, String> {
    CString::new(path.to_string_lossy().as_bytes())
        .map_err(|_| format!("path '{}' contains a NUL byte", path.display()))
}

/// Routes llama.cpp's and mtmd's log lines into `tracing` instead of stderr. llama.cpp's INFO
/// level is chatty (every tensor on load), so it becomes `debug`.
pub fn route_logs() {
    unsafe extern "C" fn on_log(level: sys::ggml_log_level, text: *const c_char, _: *mut c_void) {
        if text.is_null() {
            return;
        }
        // SAFETY: `text` is non-null (checked above) and llama.cpp passes a NUL-terminated
        // string that lives for the call.
        let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
        let text = text.trim_end();
        if text.is_empty() || text == "." {
            return;
        }
        match level {
            sys::GGML_LOG_LEVEL_ERROR => tracing::error!(target: "llama.cpp", "{text}"),
            sys::GGML_LOG_LEVEL_WARN => tracing::warn!(target: "llama.cpp", "{text}"),
            sys::GGML_LOG_LEVEL_INFO => tracing::debug!(target: "llama.cpp", "{text}"),
            _ => tracing::trace!(target: "llama.cpp", "{text}"),
        }
    }
    // SAFETY: plain setters of a global callback; `on_log` is a `'static` fn that handles any
    // level and a null text.
    unsafe {
        sys::llama_log_set(Some(on_log), std::ptr::null_mut());
        sys::mtmd_helper_log_set(Some(on_log), std::ptr::null_mut());
    }
}

/// The accelerators llama.cpp can offload to, in its order (`CUDA0 (NVIDIA H200)`, …).
pub fn gpu_devices() -> Vec<String> {
    gpu_handles()
        .into_iter()
        .map(|dev| {
            // SAFETY: `dev` is a device handle from `ggml_backend_dev_get`, valid for the
            // process; both getters return static NUL-terminated strings.
            let (name, desc) = unsafe {
                (
                    CStr::from_ptr(sys::ggml_backend_dev_name(dev)).to_string_lossy(),
                    CStr::from_ptr(sys::ggml_backend_dev_description(dev)).to_string_lossy(),
                )
            };
            format!("{name} ({desc})")
        })
        .collect()
}

fn gpu_handles() -> Vec<sys::ggml_backend_dev_t> {
    // SAFETY: backend initialisation is idempotent; each index is below
    // `ggml_backend_dev_count()`, and the handles it returns live for the process.
    unsafe {
        sys::llama_backend_init();
        (0..sys::ggml_backend_dev_count())
            .map(|i| sys::ggml_backend_dev_get(i))
            .filter(|&dev| sys::ggml_backend_dev_type(dev) == sys::GGML_BACKEND_DEVICE_TYPE_GPU)
            .collect()
    }
}

pub struct Model(NonNull<sys::llama_model>);

impl Model {
    /// `gpu`: put the whole model on that GPU (an index into [`gpu_devices`]) instead of
    /// letting llama.cpp spread it over all of them.
    pub fn load(path: &Path, gpu_layers: i32, gpu: Option<usize>) -> Result<Model, String> {
        let c = c_path(path)?;
        // SAFETY: returns a plain struct by value; no pointers involved.
        let mut params = unsafe { sys::llama_model_default_params() };
        params.n_gpu_layers = gpu_layers;
        if let Some(gpu) = gpu {
            params.split_mode = sys::LLAMA_SPLIT_MODE_NONE;
            params.main_gpu = gpu as i32;
        }
        // SAFETY: `c` is a NUL-terminated path that outlives the call; `params` came from
        // llama.cpp's defaults.
        let ptr = unsafe { sys::llama_model_load_from_file(c.as_ptr(), params) };
        NonNull::new(ptr).map(Model).ok_or_else(|| {
            format!(
                "llama.cpp could not load '{}' (see the log above)",
                path.display()
            )
        })
    }

    fn vocab(&self) -> *const sys::llama_vocab {
        // SAFETY: `self.0` is a live model (freed only in `Drop`); the vocabulary lives as long
        // as it.
        unsafe { sys::llama_model_get_vocab(self.0.as_ptr()) }
    }

    pub fn describe(&self) -> String {
        let mut buf = [0u8; 256];
        let n =
            // SAFETY: `self.0` is a live model; llama.cpp writes at most `buf.len()` bytes into
            // `buf`.
            unsafe { sys::llama_model_desc(self.0.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        String::from_utf8_lossy(&buf[..n.clamp(0, 255) as usize]).into_owned()
    }

    /// Width of the embeddings the LLM takes as input (what the projector must produce).
    pub fn n_embd_inp(&self) -> usize {
        // SAFETY: `self.0` is a live model; a read-only getter.
        unsafe { sys::llama_model_n_embd_inp(self.0.as_ptr()) as usize }
    }

    pub fn n_vocab(&self) -> usize {
        // SAFETY: `self.vocab()` is the live model's vocabulary; a read-only getter.
        unsafe { sys::llama_vocab_n_tokens(self.vocab()) as usize }
    }

    /// Positions the model was trained on.
    pub fn n_ctx_train(&self) -> i32 {
        // SAFETY: `self.0` is a live model; a read-only getter.
        unsafe { sys::llama_model_n_ctx_train(self.0.as_ptr()) }
    }

    pub fn n_layer(&self) -> i32 {
        // SAFETY: `self.0` is a live model; a read-only getter.
        unsafe { sys::llama_model_n_layer(self.0.as_ptr()) }
    }

    /// Text to tokens. `add_special` adds the vocabulary's BOS (none for Qwen3); special
    /// tokens written in the text (`<|im_start|>`) are parsed as such.
    pub fn tokenize(&self, text: &str, add_special: bool) -> Vec<Token> {
        let mut out = vec![0 as Token; text.len() + 8];
        // SAFETY: `text` is valid for `text.len()` bytes and `out` for `out.len()` tokens;
        // llama.cpp writes no more and returns the negative size when `out` is short.
        let mut n = unsafe {
            sys::llama_tokenize(
                self.vocab(),
                text.as_ptr().cast(),
                text.len() as i32,
                out.as_mut_ptr(),
                out.len() as i32,
                add_special,
                true,
            )
        };
        if n < 0 {
            out.resize((-n) as usize, 0);
            // SAFETY: as above, with `out` grown to the size llama.cpp asked for.
            n = unsafe {
                sys::llama_tokenize(
                    self.vocab(),
                    text.as_ptr().cast(),
                    text.len() as i32,
                    out.as_mut_ptr(),
                    out.len() as i32,
                    add_special,
                    true,
                )
            };
        }
        out.truncate(n.max(0) as usize);
        out
    }

    pub fn is_end(&self, token: Token) -> bool {
        // SAFETY: `self.vocab()` is the live model's vocabulary; a read-only lookup.
        unsafe { sys::llama_vocab_is_eog(self.vocab(), token) }
    }

    /// The text of one token. Special tokens (`<|im_end|>` and the like) give no text.
    /// May be part of a UTF-8 character: the caller joins the bytes.
    pub fn piece(&self, token: Token, out: &mut Vec<u8>) {
        let mut buf = [0u8; 128];
        // SAFETY: `buf` is valid for `buf.len()` bytes, which llama.cpp does not exceed (it
        // returns the negative size instead).
        let n = unsafe {
            sys::llama_token_to_piece(
                self.vocab(),
                token,
                buf.as_mut_ptr().cast(),
                buf.len() as i32,
                0,
                false,
            )
        };
        if n >= 0 {
            out.extend_from_slice(&buf[..n as usize]);
        } else {
            let mut big = vec![0u8; (-n) as usize];
            // SAFETY: `big` has the size llama.cpp asked for.
            let n = unsafe {
                sys::llama_token_to_piece(
                    self.vocab(),
                    token,
                    big.as_mut_ptr().cast(),
                    big.len() as i32,
                    0,
                    false,
                )
            };
            out.extend_from_slice(&big[..n.max(0) as usize]);
        }
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: `self.0` came from `llama_model_load_from_file` and is freed once, here;
        // every context built on it is dropped first (`Worker`'s field order).
        unsafe { sys::llama_model_free(self.0.as_ptr()) }
    }
}

pub struct ContextParams {
    pub n_ctx: u32,
    pub n_batch: u32,
    /// Sequences (streams) the context holds at once.
    pub n_seq_max: u32,
    /// One KV buffer shared by every sequence (else each gets `n_ctx / n_seq_max` cells).
    pub kv_unified: bool,
    pub threads: i32,
    pub flash_attn: sys::llama_flash_attn_type,
}

/// KV-cache edits made since they were last taken (for the step profile).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvEdits {
    pub shifts: u32,
    pub removes: u32,
    pub copies: u32,
}

pub struct Context {
    ptr: NonNull<sys::llama_context>,
    edits: KvEdits,
}

impl Context {
    pub fn new(model: &Model, p: &ContextParams) -> Result<Context, String> {
        // SAFETY: returns a plain struct by value; no pointers involved.
        let mut params = unsafe { sys::llama_context_default_params() };
        params.n_ctx = p.n_ctx;
        params.n_batch = p.n_batch;
        params.n_ubatch = p.n_batch.min(512);
        params.n_seq_max = p.n_seq_max.max(1);
        params.kv_unified = p.kv_unified;
        params.n_threads = p.threads;
        params.n_threads_batch = p.threads;
        params.flash_attn_type = p.flash_attn;
        params.no_perf = true;
        // SAFETY: `model` is a live model that outlives the context (`Worker` drops the context
        // first).
        let ptr = unsafe { sys::llama_init_from_model(model.0.as_ptr(), params) };
        NonNull::new(ptr)
            .map(|ptr| Context {
                ptr,
                edits: KvEdits::default(),
            })
            .ok_or_else(|| format!("llama.cpp could not create a context of {} tokens", p.n_ctx))
    }

    pub fn n_ctx(&self) -> u32 {
        // SAFETY: `self.ptr` is a live context (freed only in `Drop`); a read-only getter.
        unsafe { sys::llama_n_ctx(self.ptr.as_ptr()) }
    }

    pub fn n_batch(&self) -> u32 {
        // SAFETY: `self.ptr` is a live context; a read-only getter.
        unsafe { sys::llama_n_batch(self.ptr.as_ptr()) }
    }

    fn memory(&self) -> sys::llama_memory_t {
        // SAFETY: `self.ptr` is a live context; its memory module lives as long as it.
        unsafe { sys::llama_get_memory(self.ptr.as_ptr()) }
    }

    /// Forgets positions `p0..p1` of sequence `seq` (`p1 < 0`: to the end; `p0 < 0`: from
    /// the start). Removing a whole sequence never fails.
    pub fn seq_rm(&mut self, seq: i32, p0: i32, p1: i32) -> bool {
        self.edits.removes += 1;
        // SAFETY: `self.memory()` is the live context's KV memory; llama.cpp checks the
        // sequence id and positions and returns false when it cannot remove.
        unsafe { sys::llama_memory_seq_rm(self.memory(), seq, p0, p1) }
    }

    /// Moves positions `p0..` of `seq` by `delta` (the keys are re-rotated, RoPE shift).
    pub fn seq_shift(&mut self, seq: i32, p0: i32, delta: i32) {
        self.edits.shifts += 1;
        // SAFETY: `self.memory()` is the live context's KV memory; llama.cpp ignores cells
        // outside the range.
        unsafe { sys::llama_memory_seq_add(self.memory(), seq, p0, -1, delta) }
    }

    /// Makes `dst` hold `src`'s cells at positions `p0..p1` too. In a unified KV cache this
    /// adds `dst` to the cells' sequence set and copies nothing (see `llama_kv_cache::seq_cp`);
    /// across split buffers llama.cpp would copy whole buffers, so callers share only when
    /// the cache is unified.
    pub fn seq_cp(&mut self, src: i32, dst: i32, p0: i32, p1: i32) {
        self.edits.copies += 1;
        // SAFETY: `self.memory()` is the live context's KV memory; `src` and `dst` are below
        // `n_seq_max` (the worker hands out ids in range), which llama.cpp asserts.
        unsafe { sys::llama_memory_seq_cp(self.memory(), src, dst, p0, p1) }
    }

    /// The KV edits since the last call.
    pub fn take_edits(&mut self) -> KvEdits {
        std::mem::take(&mut self.edits)
    }

    /// Waits until the queued GPU work is done (the step profile's split of host and GPU).
    pub fn synchronize(&mut self) {
        // SAFETY: `self.ptr` is a live context; waiting has no other effect.
        unsafe { sys::llama_synchronize(self.ptr.as_ptr()) }
    }

    /// Largest position `seq` holds, -1 when empty.
    pub fn seq_pos_max(&self, seq: i32) -> i32 {
        // SAFETY: `self.memory()` is the live context's KV memory; a read-only query.
        unsafe { sys::llama_memory_seq_pos_max(self.memory(), seq) }
    }

    /// Smallest position `seq` holds, -1 when empty.
    pub fn seq_pos_min(&self, seq: i32) -> i32 {
        // SAFETY: `self.memory()` is the live context's KV memory; a read-only query.
        unsafe { sys::llama_memory_seq_pos_min(self.memory(), seq) }
    }

    pub fn can_shift(&self) -> bool {
        // SAFETY: `self.memory()` is the live context's KV memory; a read-only query.
        unsafe { sys::llama_memory_can_shift(self.memory()) }
    }

    /// Evaluates a batch (tokens or embeddings). Its logits stay readable by batch index
    /// until the next decode.
    pub fn decode(&mut self, batch: &Batch) -> Result<(), String> {
        if batch.raw.n_tokens == 0 {
            return Ok(());
        }
        // SAFETY: the batch's arrays hold `n_tokens` filled entries (see `Batch::push*`).
        match unsafe { sys::llama_decode(self.ptr.as_ptr(), batch.raw) } {
            0 => Ok(()),
            1 => Err("the KV cache is full (raise --context-size or lower --max-streams)".into()),
            rc => Err(format!("llama_decode failed ({rc})")),
        }
    }

    /// The logits of batch entry `i` of the last decode (`n_vocab` floats).
    pub fn logits(&self, i: i32, n_vocab: usize) -> &[f32] {
        // SAFETY: llama.cpp keeps the logits of every entry flagged for them until the next
        // decode; `i` is such an entry (the caller's bookkeeping), else it returns null.
        unsafe {
            let ptr = sys::llama_get_logits_ith(self.ptr.as_ptr(), i);
            assert!(!ptr.is_null(), "no logits for batch entry {i}");
            std::slice::from_raw_parts(ptr, n_vocab)
        }
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: `self.ptr` came from `llama_init_from_model` and is freed once, here, before
        // its model.
        unsafe { sys::llama_free(self.ptr.as_ptr()) }
    }
}

/// A `llama_batch` of tokens, or (made by [`Batch::embeddings`]) of embedding rows, each
/// entry with its own position and sequence.
pub struct Batch {
    raw: sys::llama_batch,
    capacity: usize,
    /// Floats a row for an embeddings batch, 0 for tokens.
    width: usize,
}

impl Batch {
    pub fn new(capacity: usize) -> Batch {
        Batch {
            // SAFETY: allocates `capacity` entries of each array (and a token array, as `embd`
            // is 0); freed in `Drop`.
            raw: unsafe { sys::llama_batch_init(capacity as i32, 0, 1) },
            capacity,
            width: 0,
        }
    }

    /// A batch of `capacity` embedding rows of `width` floats.
    pub fn embeddings(capacity: usize, width: usize) -> Batch {
        Batch {
            // SAFETY: allocates `capacity` entries and `capacity * width` floats for `embd`;
            // freed in `Drop`.
            raw: unsafe { sys::llama_batch_init(capacity as i32, width as i32, 1) },
            capacity,
            width,
        }
    }

    pub fn clear(&mut self) {
        self.raw.n_tokens = 0;
    }

    pub fn len(&self) -> usize {
        self.raw.n_tokens as usize
    }

    pub fn room(&self) -> usize {
        self.capacity - self.len()
    }

    /// Adds a token; returns its index in the batch (where its logits are read).
    pub fn push(&mut self, token: Token, pos: i32, seq: i32, logits: bool) -> i32 {
        assert!(self.width == 0, "a token pushed into an embeddings batch");
        let i = self.entry(pos, seq, logits);
        // SAFETY: `entry` checked `i < capacity`; a token batch has a token array.
        unsafe { *self.raw.token.add(i) = token };
        i as i32
    }

    /// Adds one embedding row (`width` floats).
    pub fn push_row(&mut self, row: &[f32], pos: i32, seq: i32) {
        assert!(
            self.width > 0 && row.len() == self.width,
            "bad embedding row"
        );
        let i = self.entry(pos, seq, false);
        // SAFETY: llama_batch_init allocated `capacity * width` floats for `embd`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                row.as_ptr(),
                self.raw.embd.add(i * self.width),
                self.width,
            )
        };
    }

    fn entry(&mut self, pos: i32, seq: i32, logits: bool) -> usize {
        let i = self.raw.n_tokens as usize;
        assert!(i < self.capacity, "batch overflow");
        // SAFETY: llama_batch_init allocated `capacity` entries of each array and one
        // sequence id slot per entry.
        unsafe {
            *self.raw.pos.add(i) = pos;
            *self.raw.n_seq_id.add(i) = 1;
            *(*self.raw.seq_id.add(i)) = seq;
            *self.raw.logits.add(i) = logits as i8;
        }
        self.raw.n_tokens += 1;
        i
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: `self.raw` came from `llama_batch_init` and is freed once, here.
        unsafe { sys::llama_batch_free(self.raw) }
    }
}

pub struct Mtmd(NonNull<sys::mtmd_context>);

impl Mtmd {
    pub fn load(
        path: &Path,
        model: &Model,
        use_gpu: bool,
        threads: i32,
        flash_attn: sys::llama_flash_attn_type,
        gpu: Option<usize>,
    ) -> Result<Mtmd, String> {
        let c = c_path(path)?;
        // SAFETY: returns a plain struct by value; no pointers involved.
        let mut params = unsafe { sys::mtmd_context_params_default() };
        params.use_gpu = use_gpu;
        if let Some(dev) = gpu.and_then(|i| gpu_handles().get(i).copied()) {
            params.device = dev;
        }
        params.n_threads = threads;
        params.print_timings = false;
        params.flash_attn_type = flash_attn;
        // SAFETY: `c` is a NUL-terminated path that outlives the call; `model` is live and
        // outlives the projector (`Worker` drops it first).
        let ptr = unsafe { sys::mtmd_init_from_file(c.as_ptr(), model.0.as_ptr(), params) };
        let mtmd = NonNull::new(ptr).map(Mtmd).ok_or_else(|| {
            format!(
                "llama.cpp could not load the vision projector '{}' (see the log above)",
                path.display()
            )
        })?;
        // SAFETY: `mtmd.0` was just created and is live.
        if !unsafe { sys::mtmd_support_vision(mtmd.0.as_ptr()) } {
            return Err(format!(
                "'{}' is a projector without vision support",
                path.display()
            ));
        }
        Ok(mtmd)
    }

    pub fn marker() -> String {
        // SAFETY: mtmd's marker is a static NUL-terminated string.
        unsafe { CStr::from_ptr(sys::mtmd_default_marker()) }
            .to_string_lossy()
            .into_owned()
    }

    /// Splits a prompt with one marker per bitmap into text and image chunks.
    pub fn tokenize(&self, prompt: &str, bitmaps: &[Bitmap]) -> Result<Chunks, String> {
        let text = CString::new(prompt).map_err(|_| "prompt contains a NUL byte".to_string())?;
        let input = sys::mtmd_input_text {
            text: text.as_ptr(),
            text_len: text.as_bytes().len(),
            add_special: true,
            parse_special: true,
        };
        let ptrs: Vec<*const sys::mtmd_bitmap> =
            bitmaps.iter().map(|b| b.0.as_ptr() as *const _).collect();
        let chunks = Chunks(
            // SAFETY: allocates an empty chunk list, owned by the returned `Chunks`.
            NonNull::new(unsafe { sys::mtmd_input_chunks_init() })
                .expect("mtmd_input_chunks_init returned null"),
        );
        // SAFETY: `self.0` and `chunks.0` are live; `input.text` points into `text`, which
        // outlives the call; `ptrs` holds `ptrs.len()` live bitmaps that `bitmaps` keeps alive.
        let rc = unsafe {
            sys::mtmd_tokenize(
                self.0.as_ptr(),
                chunks.0.as_ptr(),
                &input,
                ptrs.as_ptr() as *mut _,
                ptrs.len(),
            )
        };
        match rc {
            0 => Ok(chunks),
            1 => Err("the number of frames does not match the media markers in the prompt".into()),
            2 => Err("the vision preprocessor rejected an image".into()),
            rc => Err(format!("mtmd_tokenize failed ({rc})")),
        }
    }

    /// Whether image embeddings can be fed as plain batches of rows, one position each, in
    /// causal attention (true for MiniCPM-V; not for M-RoPE or non-causal projectors).
    pub fn plain_embeddings(&self, chunks: &Chunks, index: usize) -> bool {
        // SAFETY: `self.0` is live and `index < chunks.len()` (callers index chunks they
        // enumerated).
        unsafe {
            !sys::mtmd_decode_use_mrope(self.0.as_ptr())
                && !sys::mtmd_decode_use_non_causal(self.0.as_ptr(), chunks.get(index))
        }
    }

    /// Runs the vision encoder on one image chunk; its embeddings, `width` floats a token.
    /// (MiniCPM-V's projector can't batch images: `clip_graph::support_batch()` is false for
    /// it, so one chunk a call loses nothing.)
    pub fn encode_chunk(
        &mut self,
        chunks: &Chunks,
        index: usize,
        width: usize,
    ) -> Result<Vec<f32>, String> {
        // SAFETY: `self.0` is live and `chunks.get(index)` is a chunk of a live list.
        match unsafe { sys::mtmd_encode_chunk(self.0.as_ptr(), chunks.get(index)) } {
            0 => {}
            rc => return Err(format!("vision encoding failed ({rc})")),
        }
        // SAFETY: `self.0` is live; the pointer is checked for null below.
        let ptr = unsafe { sys::mtmd_get_output_embd(self.0.as_ptr()) };
        if ptr.is_null() {
            return Err(format!("no embeddings for image chunk {index}"));
        }
        let n = chunks.n_tokens(index) * width;
        // SAFETY: after a successful encode the output buffer holds the chunk's tokens x
        // `width` floats, valid until the next encode.
        Ok(unsafe { std::slice::from_raw_parts(ptr, n) }.to_vec())
    }
}

impl Drop for Mtmd {
    fn drop(&mut self) {
        // SAFETY: `self.0` came from `mtmd_init_from_file` and is freed once, here.
        unsafe { sys::mtmd_free(self.0.as_ptr()) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    Text,
    Image,
    Other,
}

pub struct Chunks(NonNull<sys::mtmd_input_chunks>);

impl Chunks {
    pub fn len(&self) -> usize {
        // SAFETY: `self.0` is a live chunk list; a read-only getter.
        unsafe { sys::mtmd_input_chunks_size(self.0.as_ptr()) }
    }

    fn get(&self, i: usize) -> *const sys::mtmd_input_chunk {
        // SAFETY: `self.0` is a live chunk list; llama.cpp returns null past its end, and
        // callers pass `i < len()`.
        unsafe { sys::mtmd_input_chunks_get(self.0.as_ptr(), i) }
    }

    pub fn kind(&self, i: usize) -> ChunkKind {
        // SAFETY: `self.get(i)` is a chunk of this live list.
        match unsafe { sys::mtmd_input_chunk_get_type(self.get(i)) } {
            sys::MTMD_INPUT_CHUNK_TYPE_TEXT => ChunkKind::Text,
            sys::MTMD_INPUT_CHUNK_TYPE_IMAGE => ChunkKind::Image,
            _ => ChunkKind::Other,
        }
    }

    pub fn text_tokens(&self, i: usize) -> &[Token] {
        let mut n = 0usize;
        // SAFETY: `self.get(i)` is a chunk of this live list; `n` receives the token count.
        let ptr = unsafe { sys::mtmd_input_chunk_get_tokens_text(self.get(i), &mut n) };
        if ptr.is_null() || n == 0 {
            return &[];
        }
        // SAFETY: `ptr` is non-null and points to `n` tokens owned by the chunk, which lives as
        // long as `self` (the borrow of the returned slice).
        unsafe { std::slice::from_raw_parts(ptr, n) }
    }

    pub fn n_tokens(&self, i: usize) -> usize {
        // SAFETY: `self.get(i)` is a chunk of this live list.
        unsafe { sys::mtmd_input_chunk_get_n_tokens(self.get(i)) }
    }

    /// Positions the whole prompt takes in the LLM's context.
    pub fn n_positions(&self) -> i32 {
        // SAFETY: `self.0` is a live chunk list; a read-only helper.
        unsafe { sys::mtmd_helper_get_n_pos(self.0.as_ptr()) }
    }
}

impl Drop for Chunks {
    fn drop(&mut self) {
        // SAFETY: `self.0` came from `mtmd_input_chunks_init` and is freed once, here.
        unsafe { sys::mtmd_input_chunks_free(self.0.as_ptr()) }
    }
}

pub struct Bitmap(NonNull<sys::mtmd_bitmap>);

impl Bitmap {
    pub fn rgb(width: u32, height: u32, data: &[u8]) -> Result<Bitmap, String> {
        if data.len() != width as usize * height as usize * 3 {
            return Err(format!(
                "RGB data of {} bytes does not fit {width}x{height}",
                data.len()
            ));
        }
        // SAFETY: `data` holds `width * height * 3` bytes (checked above); mtmd copies them.
        let ptr = unsafe { sys::mtmd_bitmap_init(width, height, data.as_ptr()) };
        NonNull::new(ptr)
            .map(Bitmap)
            .ok_or_else(|| "mtmd_bitmap_init failed".to_string())
    }
}

impl Bitmap {
    pub fn set_id(&mut self, id: &str) {
        if let Ok(c) = CString::new(id) {
            // SAFETY: `self.0` is a live bitmap and `c` a NUL-terminated string that outlives
            // the call (mtmd copies it).
            unsafe { sys::mtmd_bitmap_set_id(self.0.as_ptr(), c.as_ptr()) }
        }
    }
}

impl Drop for Bitmap {
    fn drop(&mut self) {
        // SAFETY: `self.0` came from `mtmd_bitmap_init` and is freed once, here.
        unsafe { sys::mtmd_bitmap_free(self.0.as_ptr()) }
    }
}
