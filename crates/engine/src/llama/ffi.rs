//! Owned handles over llama.cpp's C API (through `llama-cpp-sys-2`).
//!
//! The safe `llama-cpp-2` wrapper keeps its raw pointers private, and the multimodal path
//! needs `mtmd_batch_encode` + `mtmd_helper_decode_image_chunk` on the same contexts to time
//! vision encoding apart from prefill and to encode a cycle's frames in one batch. So this
//! module owns the pointers itself. Every handle here lives on the engine's one worker
//! thread; none is `Send`, which keeps llama.cpp's single-threaded contexts single-threaded.

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
    unsafe {
        sys::llama_log_set(Some(on_log), std::ptr::null_mut());
        sys::mtmd_helper_log_set(Some(on_log), std::ptr::null_mut());
    }
}

/// The accelerator llama.cpp will offload to, if its build has one (`CUDA0`, …).
pub fn gpu_device() -> Option<String> {
    unsafe {
        sys::llama_backend_init();
        for i in 0..sys::ggml_backend_dev_count() {
            let dev = sys::ggml_backend_dev_get(i);
            if sys::ggml_backend_dev_type(dev) == sys::GGML_BACKEND_DEVICE_TYPE_GPU {
                let name = CStr::from_ptr(sys::ggml_backend_dev_name(dev)).to_string_lossy();
                let desc = CStr::from_ptr(sys::ggml_backend_dev_description(dev)).to_string_lossy();
                return Some(format!("{name} ({desc})"));
            }
        }
    }
    None
}

pub struct Model(NonNull<sys::llama_model>);

impl Model {
    pub fn load(path: &Path, gpu_layers: i32) -> Result<Model, String> {
        let c = c_path(path)?;
        let mut params = unsafe { sys::llama_model_default_params() };
        params.n_gpu_layers = gpu_layers;
        let ptr = unsafe { sys::llama_model_load_from_file(c.as_ptr(), params) };
        NonNull::new(ptr).map(Model).ok_or_else(|| {
            format!(
                "llama.cpp could not load '{}' (see the log above)",
                path.display()
            )
        })
    }

    fn vocab(&self) -> *const sys::llama_vocab {
        unsafe { sys::llama_model_get_vocab(self.0.as_ptr()) }
    }

    pub fn describe(&self) -> String {
        let mut buf = [0u8; 256];
        let n =
            unsafe { sys::llama_model_desc(self.0.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        String::from_utf8_lossy(&buf[..n.clamp(0, 255) as usize]).into_owned()
    }

    /// Width of the embeddings the LLM takes as input (what the projector must produce).
    pub fn n_embd_inp(&self) -> usize {
        unsafe { sys::llama_model_n_embd_inp(self.0.as_ptr()) as usize }
    }

    pub fn n_layer(&self) -> i32 {
        unsafe { sys::llama_model_n_layer(self.0.as_ptr()) }
    }

    pub fn is_end(&self, token: Token) -> bool {
        unsafe { sys::llama_vocab_is_eog(self.vocab(), token) }
    }

    /// The text of one token. Special tokens (`<|im_end|>` and the like) give no text.
    /// May be part of a UTF-8 character: the caller joins the bytes.
    pub fn piece(&self, token: Token, out: &mut Vec<u8>) {
        let mut buf = [0u8; 128];
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
        unsafe { sys::llama_model_free(self.0.as_ptr()) }
    }
}

pub struct ContextParams {
    pub n_ctx: u32,
    pub n_batch: u32,
    pub threads: i32,
    pub flash_attn: sys::llama_flash_attn_type,
}

pub struct Context(NonNull<sys::llama_context>);

impl Context {
    pub fn new(model: &Model, p: &ContextParams) -> Result<Context, String> {
        let mut params = unsafe { sys::llama_context_default_params() };
        params.n_ctx = p.n_ctx;
        params.n_batch = p.n_batch;
        params.n_ubatch = p.n_batch.min(512);
        params.n_seq_max = 1;
        params.n_threads = p.threads;
        params.n_threads_batch = p.threads;
        params.flash_attn_type = p.flash_attn;
        params.no_perf = true;
        let ptr = unsafe { sys::llama_init_from_model(model.0.as_ptr(), params) };
        NonNull::new(ptr)
            .map(Context)
            .ok_or_else(|| format!("llama.cpp could not create a context of {} tokens", p.n_ctx))
    }

    pub fn n_ctx(&self) -> u32 {
        unsafe { sys::llama_n_ctx(self.0.as_ptr()) }
    }

    pub fn n_batch(&self) -> u32 {
        unsafe { sys::llama_n_batch(self.0.as_ptr()) }
    }

    /// Forgets positions `from..` of the one sequence.
    pub fn forget_from(&mut self, from: i32) {
        unsafe {
            let mem = sys::llama_get_memory(self.0.as_ptr());
            sys::llama_memory_seq_rm(mem, 0, from, -1);
        }
    }

    /// Evaluates `tokens` at positions `pos..`, in pieces of `n_batch`. Logits only for the
    /// last token, and only if `logits_last`.
    pub fn decode_tokens(
        &mut self,
        batch: &mut Batch,
        tokens: &[Token],
        pos: i32,
        logits_last: bool,
    ) -> Result<(), String> {
        let n_batch = batch.capacity;
        for (i, piece) in tokens.chunks(n_batch).enumerate() {
            batch.clear();
            let base = pos + (i * n_batch) as i32;
            let last_piece = (i + 1) * n_batch >= tokens.len();
            for (j, &t) in piece.iter().enumerate() {
                let logits = logits_last && last_piece && j + 1 == piece.len();
                batch.push(t, base + j as i32, logits);
            }
            let rc = unsafe { sys::llama_decode(self.0.as_ptr(), batch.raw) };
            if rc != 0 {
                return Err(format!("llama_decode failed ({rc}) at position {base}"));
            }
        }
        Ok(())
    }

    pub fn as_ptr(&self) -> *mut sys::llama_context {
        self.0.as_ptr()
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        unsafe { sys::llama_free(self.0.as_ptr()) }
    }
}

pub struct Batch {
    raw: sys::llama_batch,
    capacity: usize,
}

impl Batch {
    pub fn new(capacity: usize) -> Batch {
        Batch {
            raw: unsafe { sys::llama_batch_init(capacity as i32, 0, 1) },
            capacity,
        }
    }

    fn clear(&mut self) {
        self.raw.n_tokens = 0;
    }

    fn push(&mut self, token: Token, pos: i32, logits: bool) {
        let i = self.raw.n_tokens as usize;
        assert!(i < self.capacity, "batch overflow");
        // SAFETY: llama_batch_init allocated `capacity` entries of each array and one
        // sequence id slot per entry.
        unsafe {
            *self.raw.token.add(i) = token;
            *self.raw.pos.add(i) = pos;
            *self.raw.n_seq_id.add(i) = 1;
            *(*self.raw.seq_id.add(i)) = 0;
            *self.raw.logits.add(i) = logits as i8;
        }
        self.raw.n_tokens += 1;
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        unsafe { sys::llama_batch_free(self.raw) }
    }
}

pub struct Sampler(NonNull<sys::llama_sampler>);

impl Sampler {
    /// top-k, then top-p, then temperature, then a seeded draw; greedy at temperature 0.
    pub fn new(temperature: f32, top_p: f32, top_k: u32, seed: u32) -> Sampler {
        unsafe {
            let chain = sys::llama_sampler_chain_init(sys::llama_sampler_chain_default_params());
            if temperature <= 0.0 {
                sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_greedy());
            } else {
                if top_k > 0 {
                    sys::llama_sampler_chain_add(
                        chain,
                        sys::llama_sampler_init_top_k(top_k as i32),
                    );
                }
                if top_p < 1.0 {
                    sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_top_p(top_p, 1));
                }
                sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_temp(temperature));
                sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_dist(seed));
            }
            Sampler(NonNull::new(chain).expect("llama_sampler_chain_init returned null"))
        }
    }

    /// Samples from the logits of the last evaluated token and records the choice.
    pub fn sample(&mut self, ctx: &mut Context) -> Token {
        unsafe {
            let t = sys::llama_sampler_sample(self.0.as_ptr(), ctx.as_ptr(), -1);
            sys::llama_sampler_accept(self.0.as_ptr(), t);
            t
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        unsafe { sys::llama_sampler_free(self.0.as_ptr()) }
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
    ) -> Result<Mtmd, String> {
        let c = c_path(path)?;
        let mut params = unsafe { sys::mtmd_context_params_default() };
        params.use_gpu = use_gpu;
        params.n_threads = threads;
        params.print_timings = false;
        params.flash_attn_type = flash_attn;
        let ptr = unsafe { sys::mtmd_init_from_file(c.as_ptr(), model.0.as_ptr(), params) };
        let mtmd = NonNull::new(ptr).map(Mtmd).ok_or_else(|| {
            format!(
                "llama.cpp could not load the vision projector '{}' (see the log above)",
                path.display()
            )
        })?;
        if !unsafe { sys::mtmd_support_vision(mtmd.0.as_ptr()) } {
            return Err(format!(
                "'{}' is a projector without vision support",
                path.display()
            ));
        }
        Ok(mtmd)
    }

    pub fn marker() -> String {
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
            NonNull::new(unsafe { sys::mtmd_input_chunks_init() })
                .expect("mtmd_input_chunks_init returned null"),
        );
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

    /// Encodes the image chunks `wanted` picks, in as few batches as llama.cpp allows, and
    /// returns each one's embeddings (`width` floats a token) by chunk index.
    pub fn encode_images(
        &mut self,
        chunks: &Chunks,
        width: usize,
        wanted: impl Fn(usize) -> bool,
    ) -> Result<Vec<(usize, Vec<f32>)>, String> {
        let mut out = Vec::new();
        let mut batch: Option<(MtmdBatch, Vec<usize>)> = None;
        for i in (0..chunks.len()).filter(|&i| chunks.kind(i) == ChunkKind::Image && wanted(i)) {
            loop {
                let (b, members) = batch.get_or_insert_with(|| (MtmdBatch::new(self), Vec::new()));
                match unsafe { sys::mtmd_batch_add_chunk(b.ptr.as_ptr(), chunks.get(i)) } {
                    0 => {
                        members.push(i);
                        break;
                    }
                    // Full, or this chunk can't share the batch: encode what we have.
                    2 | 3 if !members.is_empty() => {
                        let (full, members) = batch.take().unwrap();
                        out.extend(full.encode(chunks, &members, width)?);
                    }
                    rc => return Err(format!("mtmd_batch_add_chunk failed ({rc})")),
                }
            }
        }
        if let Some((last, members)) = batch.take() {
            out.extend(last.encode(chunks, &members, width)?);
        }
        Ok(out)
    }

    /// Feeds one image chunk's embeddings to the LLM at `pos`; returns the next position.
    pub fn decode_image(
        &mut self,
        ctx: &mut Context,
        chunks: &Chunks,
        index: usize,
        embeddings: &[f32],
        pos: i32,
    ) -> Result<i32, String> {
        let chunk = chunks.get(index);
        let mut next = pos;
        // llama.cpp reads the embeddings through a mutable pointer but does not write them.
        let rc = unsafe {
            sys::mtmd_helper_decode_image_chunk(
                self.0.as_ptr(),
                ctx.as_ptr(),
                chunk,
                embeddings.as_ptr() as *mut f32,
                pos,
                0,
                ctx.n_batch() as i32,
                &mut next,
                None,
                std::ptr::null_mut(),
            )
        };
        if rc != 0 {
            return Err(format!("decoding image embeddings failed ({rc})"));
        }
        Ok(next)
    }
}

impl Drop for Mtmd {
    fn drop(&mut self) {
        unsafe { sys::mtmd_free(self.0.as_ptr()) }
    }
}

struct MtmdBatch {
    ptr: NonNull<sys::mtmd_batch>,
}

impl MtmdBatch {
    fn new(mtmd: &Mtmd) -> MtmdBatch {
        let ptr = NonNull::new(unsafe { sys::mtmd_batch_init(mtmd.0.as_ptr()) })
            .expect("mtmd_batch_init returned null");
        MtmdBatch { ptr }
    }

    /// Runs the vision encoder on the batch and copies each member's embeddings out.
    fn encode(
        self,
        chunks: &Chunks,
        members: &[usize],
        width: usize,
    ) -> Result<Vec<(usize, Vec<f32>)>, String> {
        match unsafe { sys::mtmd_batch_encode(self.ptr.as_ptr()) } {
            0 => {}
            rc => return Err(format!("vision encoding failed ({rc})")),
        }
        members
            .iter()
            .map(|&i| {
                let ptr =
                    unsafe { sys::mtmd_batch_get_output_embd(self.ptr.as_ptr(), chunks.get(i)) };
                if ptr.is_null() {
                    return Err(format!("no embeddings for image chunk {i}"));
                }
                let n = chunks.n_tokens(i) * width;
                Ok((i, unsafe { std::slice::from_raw_parts(ptr, n) }.to_vec()))
            })
            .collect()
    }
}

impl Drop for MtmdBatch {
    fn drop(&mut self) {
        unsafe { sys::mtmd_batch_free(self.ptr.as_ptr()) }
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
        unsafe { sys::mtmd_input_chunks_size(self.0.as_ptr()) }
    }

    fn get(&self, i: usize) -> *const sys::mtmd_input_chunk {
        unsafe { sys::mtmd_input_chunks_get(self.0.as_ptr(), i) }
    }

    pub fn kind(&self, i: usize) -> ChunkKind {
        match unsafe { sys::mtmd_input_chunk_get_type(self.get(i)) } {
            sys::MTMD_INPUT_CHUNK_TYPE_TEXT => ChunkKind::Text,
            sys::MTMD_INPUT_CHUNK_TYPE_IMAGE => ChunkKind::Image,
            _ => ChunkKind::Other,
        }
    }

    pub fn text_tokens(&self, i: usize) -> &[Token] {
        let mut n = 0usize;
        let ptr = unsafe { sys::mtmd_input_chunk_get_tokens_text(self.get(i), &mut n) };
        if ptr.is_null() || n == 0 {
            return &[];
        }
        unsafe { std::slice::from_raw_parts(ptr, n) }
    }

    /// The id of the bitmap an image chunk came from (see [`Bitmap::set_id`]).
    pub fn id(&self, i: usize) -> Option<String> {
        let ptr = unsafe { sys::mtmd_input_chunk_get_id(self.get(i)) };
        (!ptr.is_null()).then(|| {
            unsafe { CStr::from_ptr(ptr) }
                .to_string_lossy()
                .into_owned()
        })
    }

    pub fn n_tokens(&self, i: usize) -> usize {
        unsafe { sys::mtmd_input_chunk_get_n_tokens(self.get(i)) }
    }

    /// Positions the whole prompt takes in the LLM's context.
    pub fn n_positions(&self) -> i32 {
        unsafe { sys::mtmd_helper_get_n_pos(self.0.as_ptr()) }
    }
}

impl Drop for Chunks {
    fn drop(&mut self) {
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
        let ptr = unsafe { sys::mtmd_bitmap_init(width, height, data.as_ptr()) };
        NonNull::new(ptr)
            .map(Bitmap)
            .ok_or_else(|| "mtmd_bitmap_init failed".to_string())
    }
}

impl Bitmap {
    pub fn set_id(&mut self, id: &str) {
        if let Ok(c) = CString::new(id) {
            unsafe { sys::mtmd_bitmap_set_id(self.0.as_ptr(), c.as_ptr()) }
        }
    }
}

impl Drop for Bitmap {
    fn drop(&mut self) {
        unsafe { sys::mtmd_bitmap_free(self.0.as_ptr()) }
    }
}
