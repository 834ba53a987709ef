//! Command-line flags as clap parses them. Every setting is a flag that also reads the
//! environment variable of the same name (`--capture-fps` / `CAPTURE_FPS`). Values are only
//! parsed here; [`crate::settings`] checks them together and reports every problem at once.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Where `serve` listens, and where `healthcheck` looks, unless BIND says otherwise.
pub const DEFAULT_BIND: &str = "127.0.0.1:8199";

#[derive(Debug, Parser)]
#[command(
    name = "kibitz",
    version,
    about = "Live video commentary by a vision-language model"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log filter, e.g. `info`, `debug`, `kibitz=debug,llama.cpp=info`.
    #[arg(long, env = "LOG", global = true, default_value = "info")]
    pub log: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Watch video streams and serve the live page with commentary (boxed: it has the most
    /// flags by far).
    #[cfg(feature = "media")]
    Serve(Box<ServeArgs>),
    /// Describe image files: streams the answer, then the stats.
    #[cfg(feature = "media")]
    Describe(DescribeArgs),
    /// Check the install: builds a tiny random-weight model and runs the real engine on it.
    Selftest(SelftestArgs),
    /// Time commentary cycles (frames + prompt + a fixed number of generated tokens).
    Bench(BenchArgs),
    /// Write a random-weight model pair of MiniCPM-o 4.5's layout (for tests and benchmarks).
    MakeTestModel(MakeTestModelArgs),
    /// Speak a text with a voice into a WAV file; prints time to first audio and real-time
    /// factor.
    Say(SayArgs),
    /// Comment a video file as fast as the engine goes, into subtitles (.vtt, .srt), every
    /// cycle as JSON (.json), or a copy of the video with a subtitle track (.mkv, .mp4).
    /// Its times are the video's: --capture-fps counts frames a second of the video and
    /// --inference-interval its seconds.
    #[cfg(feature = "media")]
    Annotate(AnnotateArgs),
    /// The model cache: list what is there, download a model (with progress), remove one.
    /// Downloading here is apart from running: `serve` then finds the files in the cache.
    Models(ModelsArgs),
    /// Exit 0 when a running `kibitz serve` answers `/healthz` with 200 in time, else 1 with
    /// one line saying why (for a container's HEALTHCHECK; needs no curl).
    Healthcheck(HealthcheckArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ModelsArgs {
    #[command(subcommand)]
    pub command: ModelsCommand,
    #[command(flatten)]
    pub hub: HubArgs,
}

#[derive(Debug, Clone, Subcommand)]
pub enum ModelsCommand {
    /// The cached models: each repo's folder, size and files (`.part`: not finished).
    List {
        /// One JSON object instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Download a hub repo's LLM of one quantization and its vision projector into the
    /// cache (resuming a broken download), with progress.
    Pull {
        /// The hub repo, owner/name.
        #[arg(default_value = kibitz_engine::models::DEFAULT_MODEL)]
        repo: String,
        /// Quantization of the LLM file to fetch.
        #[arg(long, env = "QUANT", default_value = kibitz_engine::models::DEFAULT_QUANT)]
        quant: String,
    },
    /// Remove a repo from the cache, or with --quant only its LLM files of that
    /// quantization (the projector stays for another).
    Rm {
        /// The hub repo, owner/name.
        repo: String,
        #[arg(long, env = "QUANT")]
        quant: Option<String>,
    },
}

#[derive(Debug, Clone, Args)]
pub struct HealthcheckArgs {
    /// The server's address or its health URL [default: http://ADDRESS/healthz from
    /// --bind, with 127.0.0.1 for an address that listens on all interfaces].
    #[arg(long, env = "HEALTHCHECK_URL")]
    pub url: Option<String>,
    /// The address `kibitz serve` binds, as its --bind (BIND).
    #[arg(long, env = "BIND", default_value = DEFAULT_BIND)]
    pub bind: String,
    /// Seconds to wait for the answer.
    #[arg(long, env = "HEALTHCHECK_TIMEOUT", default_value_t = 5.0)]
    pub timeout: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineKind {
    /// MiniCPM-o 4.5 in process through llama.cpp.
    Llama,
    /// Any OpenAI-compatible server (vLLM, SGLang, llama-server, Ollama).
    Openai,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FlashAttn {
    Auto,
    On,
    Off,
}

/// Which engine and model, shared by every command that asks a model.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    #[arg(long, env = "ENGINE", value_enum, default_value = "llama")]
    pub engine: EngineKind,
    /// A hub repo (owner/name), a folder with the two GGUF files, or the LLM .gguf file.
    #[arg(long, env = "MODEL_PATH", default_value = kibitz_engine::models::DEFAULT_MODEL)]
    pub model: String,
    /// The vision projector .gguf, when it is not beside the model.
    #[arg(long, env = "MMPROJ_PATH")]
    pub mmproj: Option<PathBuf>,
    /// Quantization of the LLM file to pick from a repo or folder.
    #[arg(long, env = "QUANT", default_value = kibitz_engine::models::DEFAULT_QUANT)]
    pub quant: String,
    #[command(flatten)]
    pub hub: HubArgs,
    /// Layers to offload to the GPU [default: all when llama.cpp has a GPU backend].
    #[arg(long, env = "GPU_LAYERS")]
    pub gpu_layers: Option<u32>,
    /// KV positions per stream (system prompt, the window's frames, the question and the
    /// answer); the llama context holds this many for each stream it serves [default:
    /// derived from what a stream's sequence holds, ~1,300 with 4 one-slice frames].
    #[arg(long, env = "CONTEXT_SIZE")]
    pub context_size: Option<u32>,
    /// CPU threads for llama.cpp [default: all cores].
    #[arg(long, env = "THREADS")]
    pub threads: Option<u32>,
    #[arg(long, env = "FLASH_ATTN", value_enum, default_value = "auto")]
    pub flash_attn: FlashAttn,
    /// Most 448x448 slices per frame; 1 = each frame is one 64-token image.
    #[arg(long, env = "MAX_SLICE_NUMS", default_value_t = 1)]
    pub max_slice_nums: u32,
    /// One llama engine replica per GPU: `all`, or llama.cpp's GPU indexes like `0,1`.
    /// Each stream runs on the replica with the fewest streams and stays there; a replica
    /// that fails hands its streams to the others [default: one engine, llama.cpp's
    /// placement].
    #[arg(long, env = "GPUS", value_name = "all|0,1,...")]
    pub gpus: Option<String>,
    /// OpenAI-compatible server base URL; repeat (or comma-separate) for several upstreams.
    #[arg(long, env = "ENGINE_URL", value_delimiter = ',')]
    pub engine_url: Vec<String>,
    /// Model name to ask the OpenAI-compatible server for [default: its first model].
    #[arg(long, env = "ENGINE_MODEL")]
    pub engine_model: Option<String>,
    #[arg(long, env = "ENGINE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Most requests open on one OpenAI-compatible upstream at once; more wait in kibitz's
    /// queue. vLLM and SGLang batch many; for llama-server, its `--parallel`.
    #[arg(long, env = "ENGINE_MAX_INFLIGHT", default_value_t = 4)]
    pub engine_max_inflight: usize,
    /// Seconds to open a connection to an upstream.
    #[arg(
        long,
        env = "ENGINE_CONNECT_TIMEOUT",
        default_value_t = 5.0,
        allow_negative_numbers = true
    )]
    pub engine_connect_timeout: f64,
    /// Seconds from sending a request to its first text.
    #[arg(
        long,
        env = "ENGINE_FIRST_TOKEN_TIMEOUT",
        default_value_t = 30.0,
        allow_negative_numbers = true
    )]
    pub engine_first_token_timeout: f64,
    /// Seconds from a request to the end of its answer.
    #[arg(
        long,
        env = "ENGINE_TOTAL_TIMEOUT",
        default_value_t = 120.0,
        allow_negative_numbers = true
    )]
    pub engine_total_timeout: f64,
    /// Seconds an upstream rests after a failure; doubles on each failure in a row…
    #[arg(
        long,
        env = "ENGINE_COOLDOWN",
        default_value_t = 10.0,
        allow_negative_numbers = true
    )]
    pub engine_cooldown: f64,
    /// …up to this many seconds.
    #[arg(
        long,
        env = "ENGINE_MAX_COOLDOWN",
        default_value_t = 60.0,
        allow_negative_numbers = true
    )]
    pub engine_max_cooldown: f64,
}

/// Where models come from and are kept: shared by every command that asks a model and by
/// `kibitz models`.
#[derive(Debug, Clone, Args)]
pub struct HubArgs {
    /// Where downloaded models are kept [default: ~/.cache/kibitz].
    #[arg(long, env = "KIBITZ_CACHE")]
    pub cache_dir: Option<PathBuf>,
    /// Hub address for downloads (a mirror, or a local stand-in).
    #[arg(long, env = "HF_ENDPOINT", default_value = "https://huggingface.co")]
    pub hf_endpoint: String,
    /// Hub token for gated or private repos.
    #[arg(long, env = "HF_TOKEN", hide_env_values = true)]
    pub hf_token: Option<String>,
}

/// How the model samples, shared by every command that generates.
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    #[arg(long, env = "TEMPERATURE", default_value_t = 0.7)]
    pub temperature: f32,
    #[arg(long, env = "TOP_P", default_value_t = 0.8)]
    pub top_p: f32,
    #[arg(long, env = "TOP_K", default_value_t = 100)]
    pub top_k: u32,
    #[arg(long, env = "SEED", default_value_t = 42)]
    pub seed: u32,
    #[arg(long, env = "MAX_TOKENS", default_value_t = 64)]
    pub max_tokens: u32,
}

/// The commentary loop's settings, one set for every command that runs the loop: `serve`
/// (every stream's defaults), `annotate` and `bench`. Only parsed here: the rules are
/// `kibitz_commentator`'s, applied to a stream by `StreamSpec` (see [`crate::settings`]).
#[derive(Debug, Clone, Args)]
pub struct CommentaryArgs {
    /// Prompt profile: default, sports, security, nature, descriptive.
    #[arg(long, env = "PROFILE", default_value = "default")]
    pub profile: String,
    /// Extra instruction for the commentator.
    #[arg(long, env = "INSTRUCTION", default_value = "")]
    pub instruction: String,
    /// Frames a second taken from the source for the model.
    #[arg(
        long,
        env = "CAPTURE_FPS",
        default_value_t = 2.0,
        allow_negative_numbers = true
    )]
    pub capture_fps: f64,
    /// Frames sent to the model each cycle.
    #[arg(long, env = "FRAMES_PER_INFERENCE", default_value_t = 4)]
    pub frames_per_inference: usize,
    /// Take every n-th captured frame (1: every one).
    #[arg(long, env = "FRAME_STRIDE", default_value_t = 2)]
    pub frame_stride: usize,
    /// Seconds between the end of one cycle and the start of the next.
    #[arg(
        long,
        env = "INFERENCE_INTERVAL",
        default_value_t = 1.0,
        allow_negative_numbers = true
    )]
    pub inference_interval: f64,
    /// Grey levels (0-255) that some part of the picture must change by since the last
    /// answered cycle for a cycle to ask the model; 0 asks every cycle. See docs/design.md.
    #[arg(
        long,
        env = "SCENE_CHANGE_THRESHOLD",
        default_value_t = kibitz_commentator::SCENE_CHANGE_THRESHOLD,
        allow_negative_numbers = true
    )]
    pub scene_change_threshold: f64,
    /// Seconds (of real time) before a cycle without an answer is abandoned.
    #[arg(
        long,
        env = "CYCLE_TIMEOUT",
        default_value_t = 30.0,
        allow_negative_numbers = true
    )]
    pub cycle_timeout: f64,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// A stream: `[ID=]SOURCE`, where SOURCE is a video file, /dev/videoN, rtsp://…,
    /// http(s)://… or anything FFmpeg opens. Repeat for several streams; ids default to
    /// s1, s2, … in order.
    #[arg(long, env = "SOURCE", value_name = "[ID=]SOURCE")]
    pub source: Vec<String>,
    /// A TOML file with one table per stream (`[door]` then `source = "rtsp://…"` and
    /// any per-stream setting); merged with `--source`.
    #[arg(long, env = "STREAMS", value_name = "FILE")]
    pub streams: Option<PathBuf>,
    /// Most streams running at once; `POST /api/streams` past it gets 429.
    #[arg(long, env = "MAX_STREAMS", default_value_t = 16)]
    pub max_streams: usize,
    /// Where streams added or changed through the API are kept across restarts
    /// [default: the cache folder].
    #[arg(long, env = "STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Local files the API may add as sources must lie under this folder (none by default:
    /// the API takes network sources only). Command-line sources are not limited.
    #[arg(long, env = "MEDIA_DIR")]
    pub media_dir: Option<PathBuf>,
    #[arg(long, env = "BIND", default_value = DEFAULT_BIND)]
    pub bind: String,
    /// An alert rule every stream on the command line starts with, in plain words
    /// ("a person climbs the fence"); repeat for several. Streams-file tables take
    /// `alerts = [...]`; the API adds more.
    #[arg(long = "alert", env = "ALERTS", value_delimiter = '|')]
    pub alerts: Vec<String>,
    /// The history file (SQLite) every comment, answer and alert goes to, or `off`
    /// [default: ~/.local/share/kibitz/history.sqlite].
    #[arg(long, env = "HISTORY")]
    pub history: Option<String>,
    /// Days of history kept (0 keeps everything).
    #[arg(long, env = "HISTORY_DAYS", default_value_t = 30.0)]
    pub history_days: f64,
    /// POST every fired alert here as JSON (stream, rule, comment, time, frame, clip URL).
    #[arg(long, env = "WEBHOOK")]
    pub webhook: Option<String>,
    /// Sign webhook bodies with HMAC-SHA256 of this secret (`X-Kibitz-Signature`).
    #[arg(long, env = "WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// Required for changes (add, change, delete streams; WebSocket controls); the page
    /// asks for it once. Needed to bind beyond loopback.
    #[arg(long, env = "KIBITZ_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Require the token for viewing too (everything but /healthz and the page shell).
    #[arg(long, env = "TOKEN_FOR_VIEWING", requires = "token")]
    pub token_for_viewing: bool,
    /// Serve beyond loopback without a token (anyone who reaches the port can add sources).
    #[arg(long, env = "ALLOW_NO_TOKEN")]
    pub allow_no_token: bool,
    #[arg(long, env = "WINDOW_SIZE", default_value_t = 32)]
    pub window_size: usize,
    /// Seconds the picture starts behind real time; 0 turns sync off.
    #[arg(
        long,
        env = "STREAM_DELAY_INIT",
        default_value_t = 5.0,
        allow_negative_numbers = true
    )]
    pub stream_delay_init: f64,
    #[arg(
        long,
        env = "STREAM_DELAY_EMA_ALPHA",
        default_value_t = 0.2,
        allow_negative_numbers = true
    )]
    pub stream_delay_ema_alpha: f64,
    #[arg(long, env = "JPEG_QUALITY", default_value_t = 80)]
    pub jpeg_quality: i32,
    /// Scale the displayed video down to this width (0 = as decoded).
    #[arg(long, env = "DISPLAY_MAX_WIDTH", default_value_t = 0)]
    pub display_max_width: u32,
    #[arg(
        long,
        env = "DISPLAY_BUFFER_SECONDS",
        default_value_t = 15.0,
        allow_negative_numbers = true
    )]
    pub display_buffer_seconds: f64,
    /// MJPEG rate when the source does not say its own.
    #[arg(
        long,
        env = "MJPEG_FPS",
        default_value_t = 10.0,
        allow_negative_numbers = true
    )]
    pub mjpeg_fps: f64,
    // Every stream's defaults (a streams-file table or an API request may set its own).
    #[command(flatten)]
    pub commentary: CommentaryArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// The voice every stream speaks with unless its own `voice` says otherwise, and the
    /// commentary's language (KIBITZ_LANGUAGE, not LANGUAGE, which the system sets).
    #[command(flatten)]
    pub voice: VoiceArgs,
    #[command(flatten)]
    pub http: HttpArgs,
}

/// How `serve` takes connections and which browsers it answers.
#[derive(Debug, Clone, Args)]
pub struct HttpArgs {
    /// Seconds a client gets to send a request's headers (also the keep-alive wait
    /// between requests).
    #[arg(
        long,
        env = "HEADER_READ_TIMEOUT",
        default_value_t = 10.0,
        value_name = "SECONDS"
    )]
    pub header_read_timeout: f64,
    /// Seconds without a byte either way after which a connection is closed (streams
    /// that send are never idle).
    #[arg(
        long,
        env = "IDLE_TIMEOUT",
        default_value_t = 120.0,
        value_name = "SECONDS"
    )]
    pub idle_timeout: f64,
    /// Connections served at once (kept under the open-file limit); past it only
    /// /healthz is answered.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 512)]
    pub max_connections: usize,
    /// A host name the server answers to besides its addresses and localhost (DNS
    /// names pointing here, e.g. behind a proxy); repeat or separate with commas.
    #[arg(
        long = "allowed-host",
        env = "ALLOWED_HOSTS",
        value_delimiter = ',',
        value_name = "NAME"
    )]
    pub allowed_hosts: Vec<String>,
    /// An origin (`https://panel.example`) whose pages may change things here besides
    /// the server's own; repeat or separate with commas.
    #[arg(
        long = "allowed-origin",
        env = "ALLOWED_ORIGINS",
        value_delimiter = ',',
        value_name = "ORIGIN"
    )]
    pub allowed_origins: Vec<String>,
    /// A reverse proxy's address whose `X-Forwarded-Proto: https` is believed (the
    /// session cookie is then `Secure`); repeat or separate with commas.
    #[arg(
        long = "trusted-proxy",
        env = "TRUSTED_PROXIES",
        value_delimiter = ',',
        value_name = "IP"
    )]
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Serve HTTPS with this PEM certificate chain (with --tls-key).
    #[arg(long, env = "TLS_CERT", requires = "tls_key", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "TLS_KEY", requires = "tls_cert", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct DescribeArgs {
    /// Image files (JPEG, PNG), in time order.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    #[arg(
        long,
        default_value = "Describe what you see in these frames, briefly."
    )]
    pub prompt: String,
    #[arg(
        long,
        default_value = "You are a helpful assistant that describes images precisely."
    )]
    pub system: String,
    /// Print one JSON object with the text and the stats.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Debug, Clone, Args)]
pub struct SelftestArgs {
    /// Leave the tiny model in DIR (loadable with `--model DIR`).
    #[arg(long)]
    pub keep: Option<PathBuf>,
    #[arg(long, env = "THREADS")]
    pub threads: Option<u32>,
    #[arg(long, env = "GPU_LAYERS")]
    pub gpu_layers: Option<u32>,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Commentary cycles to time (after the warm-up).
    #[arg(long, default_value_t = 20)]
    pub cycles: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Frames per cycle.
    #[arg(long, default_value_t = 4)]
    pub frames: usize,
    /// New frames a cycle (the rest are the previous cycle's, as in the live loop)
    /// [default: all new].
    #[arg(long)]
    pub new_frames: Option<usize>,
    /// Frame side in pixels (square frames).
    #[arg(long, default_value_t = 448)]
    pub frame_size: u32,
    /// Approximate text tokens in the prompt besides the images.
    #[arg(long, default_value_t = 300)]
    pub prompt_tokens: usize,
    /// Tokens generated per cycle, end-of-sequence ignored.
    #[arg(long, default_value_t = 30)]
    pub generate: u32,
    /// Print the results as JSON too.
    #[arg(long)]
    pub json: bool,
    /// Run the live commentary loop instead, on synthetic 448x252 frames captured at
    /// --capture-fps in real time, with the commentary flags (--profile,
    /// --frames-per-inference, …), for this many cycles: measures newest frame -> first
    /// token.
    #[arg(long, value_name = "CYCLES")]
    pub live: Option<usize>,
    /// Run N live streams at once on one engine (each its own synthetic 2 fps source and
    /// commentary loop, interval 0) for each N of the list, e.g. `1,2,4,8,16`.
    #[arg(long, value_delimiter = ',', value_name = "N,...")]
    pub streams: Vec<usize>,
    /// With --streams: seconds measured for each N, after a warm-up of --warmup seconds.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// With --streams: one request at a time through the scheduler and no frames pushed
    /// ahead (the engine before batching), for comparison.
    #[arg(long)]
    pub serial: bool,
    /// With --streams: one KV buffer per stream instead of one shared (llama engine).
    #[arg(long)]
    pub kv_split: bool,
    /// With --streams: synchronise after each llama decode so the engine's step profile
    /// (in the JSON line under "engine") tells GPU time from host time; costs the overlap.
    #[arg(long)]
    pub profile_sync: bool,
    /// With --streams: each stream evaluates its own system piece instead of sharing one
    /// template's cells (the engine before sharing, for comparison).
    #[arg(long)]
    pub no_share_system: bool,
    /// With --streams: every frame leaving the window shifts the later positions at once
    /// (the engine before lazy shifts, for comparison).
    #[arg(long)]
    pub eager_shifts: bool,
    /// With --streams: the long per-cycle question (frame count, span and the answer rule
    /// again) instead of the short cue, for comparison.
    #[arg(long)]
    pub long_question: bool,
    /// Print, as JSON, the prompt text `--streams` sends each cycle (with --long-question:
    /// the long one), for clients that drive another server with the same words.
    #[arg(long)]
    pub print_prompt: bool,
    // The loop's settings for `--live` (`--streams` runs every stream back to back on
    // each frame: interval 0, stride 1, no scene gate, whatever these say; see `--live`).
    #[command(flatten)]
    pub commentary: CommentaryArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModelSize {
    /// Smallest layout llama.cpp accepts (seconds on a CPU).
    Tiny,
    /// MiniCPM-o 4.5's real shapes (Qwen3-8B + SigLIP2), ~5 GB at Q4_K_M.
    Full,
}

#[derive(Debug, Clone, Args)]
pub struct MakeTestModelArgs {
    pub dir: PathBuf,
    #[arg(long, value_enum, default_value = "tiny")]
    pub size: ModelSize,
    /// LLM weight type: Q4_K_M, Q8_0, F16.
    #[arg(long)]
    pub quant: Option<String>,
}

/// Which voice speaks, and how (shared by every command that speaks).
#[derive(Debug, Clone, Args)]
pub struct VoiceArgs {
    /// `espeak` (the espeak-ng program), `piper:PATH` (a Piper .onnx voice with its
    /// .onnx.json beside; ONNX Runtime 1.22 from ORT_DYLIB_PATH), `openai:URL` (an
    /// OpenAI-compatible /v1/audio/speech) or `off`.
    #[arg(long, env = "VOICE", default_value = "espeak", value_parser = kibitz_voice::VoiceSpec::parse)]
    pub voice: kibitz_voice::VoiceSpec,
    /// Language of the commentary and its voice: `en`, `de`, `fr`, … (espeak's voice unless
    /// --espeak-voice; a piper voice speaks its own and warns if it differs).
    #[arg(long, env = "KIBITZ_LANGUAGE", default_value = "en")]
    pub language: String,
    /// An espeak-ng voice instead of the language's, e.g. `en-us`, `en+f3`.
    #[arg(long, env = "ESPEAK_VOICE")]
    pub espeak_voice: Option<String>,
    /// Speaking rate in words per minute (espeak; piper is scaled to match).
    #[arg(long, env = "VOICE_RATE", default_value_t = 175)]
    pub voice_rate: u32,
    /// openai: the speech model's name.
    #[arg(long, env = "VOICE_MODEL", default_value = "tts-1")]
    pub voice_model: String,
    /// openai: the server's voice name.
    #[arg(long, env = "VOICE_NAME", default_value = "alloy")]
    pub voice_name: String,
    /// openai: seconds a sentence's request may take, answer included.
    #[arg(long, env = "VOICE_TIMEOUT", default_value_t = 10.0)]
    pub voice_timeout: f64,
    /// The espeak-ng program.
    #[arg(long, env = "ESPEAK_PROGRAM", default_value = "espeak-ng", hide = true)]
    pub espeak_program: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct SayArgs {
    /// What to say (cleaned as commentary is: markup and URLs dropped, at most 600 characters).
    pub text: String,
    /// The file to write: `.wav` (16-bit mono PCM at the voice's rate) or `.ogg` (Opus, 48 kHz).
    #[arg(short, long, default_value = "say.wav")]
    pub output: PathBuf,
    #[command(flatten)]
    pub voice: VoiceArgs,
}

#[derive(Debug, Clone, Args)]
pub struct AnnotateArgs {
    /// The video file to comment.
    pub file: PathBuf,
    /// What to write, by extension: `.vtt` or `.srt` (one cue per comment), `.json` (every
    /// cycle), `.mkv` or `.mp4` (the video and audio copied as they are, plus subtitles).
    #[arg(short, long, value_name = "OUT")]
    pub output: PathBuf,
    // In media time: `--capture-fps` counts frames a second of the video, and
    // `--inference-interval` its seconds (said in the command's help).
    #[command(flatten)]
    pub commentary: CommentaryArgs,
    /// Language of the commentary (and of the subtitle track): `en`, `de`, `fr`, …
    #[arg(long, env = "KIBITZ_LANGUAGE", default_value = "en")]
    pub language: String,
    /// With a .mkv or .mp4 output, an extra audio track: the commentary spoken by this
    /// voice (`espeak`, `piper:PATH`, `openai:URL`) at each cue, mixed over the original
    /// sound, which is ducked while it speaks.
    #[arg(long, value_parser = kibitz_voice::VoiceSpec::parse)]
    pub voice: Option<kibitz_voice::VoiceSpec>,
    /// Speaking rate in words per minute (espeak; piper is scaled to match).
    #[arg(long, env = "VOICE_RATE", default_value_t = 175)]
    pub voice_rate: u32,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// A setting by the flag and environment variable that set it: `capture_fps` is
/// `--capture-fps (CAPTURE_FPS)`. The rules name fields as the streams file and the API
/// write them; the command line names them as its flags.
pub fn flag(field: &str) -> String {
    let env = match field {
        // LANGUAGE is the system's own (gettext) variable.
        "language" => "KIBITZ_LANGUAGE".to_string(),
        other => other.to_ascii_uppercase(),
    };
    format!("--{} ({env})", field.replace('_', "-"))
}

#[cfg(all(test, feature = "media"))]
mod tests {
    use clap::{Args, CommandFactory};

    /// `serve`, `annotate` and `bench` take the same commentary flags, each also read from
    /// the environment variable of its name.
    #[test]
    fn commentary_flags_are_shared_and_read_their_env_var() {
        let cli = super::Cli::command();
        let shared = super::CommentaryArgs::augment_args(clap::Command::new("shared"));
        let longs: Vec<&str> = shared
            .get_arguments()
            .filter_map(|a| a.get_long())
            .collect();
        assert!(longs.contains(&"capture-fps"), "{longs:?}");
        for sub in ["serve", "annotate", "bench"] {
            let command = cli.find_subcommand(sub).expect("a subcommand");
            for long in &longs {
                let arg = command
                    .get_arguments()
                    .find(|a| a.get_long() == Some(long))
                    .unwrap_or_else(|| panic!("{sub} has no --{long}"));
                let env = long.replace('-', "_").to_ascii_uppercase();
                assert_eq!(arg.get_env().and_then(|e| e.to_str()), Some(env.as_str()));
            }
        }
    }
}
