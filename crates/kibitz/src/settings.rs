//! Validated settings for `serve`: every flag is checked here, together with every stream
//! the command line and the streams file ask for, so a bad start-up names all its problems
//! at once (`kibitz: stream 'door': capture_fps: …`, one per line).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kibitz_commentator::{check_cycle_timeout, check_max_tokens};
use kibitz_stream::topology::{self, StreamInput};
use kibitz_stream::{StreamDefaults, StreamId, StreamSettings, StreamSpec};

use crate::flags::{flag, CommentaryArgs, EngineArgs, SamplingArgs, ServeArgs};

pub struct Settings {
    pub bind: SocketAddr,
    pub streams: Vec<StreamSpec>,
    pub defaults: StreamDefaults,
    pub max_streams: usize,
    pub state_file: PathBuf,
    pub media_dir: Option<PathBuf>,
    pub token: Option<String>,
    pub token_for_viewing: bool,
    pub engine: EngineArgs,
    pub voice: kibitz_voice::VoiceOptions,
    pub webhook: Option<(String, Option<String>)>,
    /// Where the history goes, and for how long; `None` when off.
    pub history: Option<(PathBuf, Duration)>,
    /// Connection limits and TLS; the hosts and origins answered.
    pub serve: kibitz_server::ServeOptions,
    pub origins: kibitz_server::Origins,
}

impl Settings {
    /// Every flag checked, then every stream; all problems at once, a `kibitz:` line each.
    pub fn from_args(args: ServeArgs) -> anyhow::Result<Settings> {
        let mut problems: Vec<String> = Vec::new();
        let bind = check_server(&args, &mut problems);
        let http = check_http(&args.http, &mut problems);
        let history = history(&args, &mut problems);
        problems.extend(crate::engine::problems(&args.engine));
        let voice = crate::say::options(&args.voice)
            .map_err(|e| problems.push(e.to_string()))
            .ok();
        let defaults = serve_defaults(&args, &mut problems);
        // The per-stream flags are checked once as defaults, named as flags; streams that
        // inherit a bad default are then not blamed for it again.
        let defaults_ok = match default_stream(&defaults) {
            Ok(_) => true,
            Err(flag_problems) => {
                problems.extend(flag_problems);
                false
            }
        };
        let inputs = stream_inputs(&args, &mut problems);
        let streams = if defaults_ok {
            topology::plan(&inputs, &defaults).unwrap_or_else(|stream_problems| {
                problems.extend(stream_problems);
                Vec::new()
            })
        } else {
            Vec::new()
        };

        if !problems.is_empty() {
            anyhow::bail!("{}", problems.join("\nkibitz: "));
        }
        let state_dir = args
            .state_dir
            .clone()
            .unwrap_or_else(|| crate::engine::cache_dir(&args.engine.hub));
        let (serve, origins) = http.expect("checked above");
        Ok(Settings {
            serve,
            origins,
            bind: bind.expect("checked above"),
            streams,
            defaults,
            max_streams: args.max_streams,
            state_file: state_dir.join("streams.json"),
            media_dir: args.media_dir,
            token: args.token,
            token_for_viewing: args.token_for_viewing,
            engine: args.engine,
            voice: voice.expect("checked above"),
            webhook: args.webhook.map(|url| (url, args.webhook_secret)),
            history,
        })
    }
}

/// The commentary flags as every stream's defaults, for `serve` and `annotate` alike. The
/// two settings that are not per stream (the cycle timeout, the answer's tokens) are
/// checked here, by the same rules as the rest; the per-stream ones by
/// [`default_stream`].
pub fn commentary_defaults(
    commentary: &CommentaryArgs,
    sampling: &SamplingArgs,
    language: &str,
    problems: &mut Vec<String>,
) -> StreamDefaults {
    let timeout_ok = check_cycle_timeout(commentary.cycle_timeout);
    for e in [timeout_ok.clone(), check_max_tokens(sampling.max_tokens)]
        .into_iter()
        .filter_map(Result::err)
    {
        problems.push(format!("{}: {e}", flag(e.field())));
    }
    // Taken apart whole, so that a flag added to `CommentaryArgs` does not compile until
    // it reaches the defaults.
    let CommentaryArgs {
        profile,
        instruction,
        capture_fps,
        frames_per_inference,
        frame_stride,
        inference_interval,
        scene_change_threshold,
        cycle_timeout,
    } = commentary.clone();
    StreamDefaults {
        profile,
        instruction,
        capture_fps,
        frames_per_inference,
        frame_stride,
        inference_interval,
        scene_change_threshold,
        language: language.to_string(),
        cycle_timeout: match timeout_ok {
            Ok(()) => Duration::from_secs_f64(cycle_timeout),
            Err(_) => StreamDefaults::default().cycle_timeout, // refused above
        },
        max_tokens: sampling.max_tokens,
        sampling: crate::engine::sampling(sampling),
        ..StreamDefaults::default()
    }
}

/// A stream made of the defaults alone, checked by `StreamSpec` (the one owner of the
/// per-stream rules); its problems are named by the flag that set the value, so
/// `--capture-fps 0` reads `--capture-fps (CAPTURE_FPS): must be above 0 …`, the same words
/// a streams file or the API gets under `capture_fps`.
pub fn default_stream(defaults: &StreamDefaults) -> Result<StreamSpec, Vec<String>> {
    let probe = StreamSettings {
        source: Some("-".into()),
        ..StreamSettings::default()
    };
    StreamSpec::resolve(&probe, Some(StreamId::nth(1)), defaults).map_err(|e| {
        e.0.iter()
            .map(|p| format!("{}: {}", flag(p.field), p.message))
            .collect()
    })
}

/// The server's own flags: address, token, limits, webhook. Returns the address to bind.
fn check_server(args: &ServeArgs, problems: &mut Vec<String>) -> Option<SocketAddr> {
    if args.max_streams == 0 {
        problems.push("--max-streams (MAX_STREAMS) must be at least 1".into());
    }
    let bind = args.bind.parse::<SocketAddr>().ok();
    if bind.is_none() {
        problems.push(format!(
            "--bind (BIND) '{}' is not an address like 127.0.0.1:8199",
            args.bind
        ));
    }
    if let Some(url) = &args.webhook {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            problems.push(format!(
                "--webhook (WEBHOOK) '{url}' is not an http:// or https:// URL"
            ));
        }
    }
    if args.webhook_secret.is_some() && args.webhook.is_none() {
        problems.push("--webhook-secret needs --webhook URL".into());
    }
    if args.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
        problems.push("--token (KIBITZ_TOKEN) is empty: give a long random string".into());
    }
    if let Some(addr) = bind {
        if !addr.ip().is_loopback() && args.token.is_none() && !args.allow_no_token {
            problems.push(format!(
                "--bind {addr} reaches beyond this machine, and without --token anyone who \
                 reaches it can add sources and change streams; set --token (KIBITZ_TOKEN), \
                 or --allow-no-token if you mean it"
            ));
        }
    }
    bind
}

/// The connection limits, TLS, and the hosts, origins and proxies answered.
fn check_http(
    args: &crate::flags::HttpArgs,
    problems: &mut Vec<String>,
) -> Option<(kibitz_server::ServeOptions, kibitz_server::Origins)> {
    let before = problems.len();
    let mut seconds = |value: f64, name: &str| {
        if value.is_finite() && value > 0.0 && value < 1e9 {
            Duration::from_secs_f64(value)
        } else {
            problems.push(format!(
                "--{name} must be a positive number of seconds, not {value}"
            ));
            Duration::ZERO
        }
    };
    let header_read_timeout = seconds(args.header_read_timeout, "header-read-timeout");
    let idle_timeout = seconds(args.idle_timeout, "idle-timeout");
    if args.max_connections == 0 {
        problems.push("--max-connections (MAX_CONNECTIONS) must be at least 1".into());
    }
    let origins = kibitz_server::Origins::new(
        &args.allowed_hosts,
        &args.allowed_origins,
        &args.trusted_proxies,
    )
    .map_err(|e| problems.extend(e))
    .ok();
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => kibitz_server::listen::tls_from_pem(cert, key)
            .map_err(|e| problems.push(format!("--tls-cert/--tls-key: {e}")))
            .ok(),
        _ => None,
    };
    if problems.len() > before {
        return None;
    }
    let limits = kibitz_server::Limits {
        header_read_timeout,
        idle_timeout,
        max_connections: args.max_connections,
    };
    Some((kibitz_server::ServeOptions { limits, tls }, origins?))
}

/// Where the history goes (`--history`, `off` for none) and how long it keeps entries.
fn history(args: &ServeArgs, problems: &mut Vec<String>) -> Option<(PathBuf, Duration)> {
    let days = args.history_days;
    if !(days.is_finite() && days >= 0.0) {
        problems.push(format!(
            "--history-days (HISTORY_DAYS) must be 0 (keep all) or more, got {days}"
        ));
    }
    let path = match args.history.as_deref().map(str::trim) {
        Some("off") => None,
        Some(path) if !path.is_empty() => Some(PathBuf::from(path)),
        _ => kibitz_history::default_path(),
    }?;
    let keep = if days.is_finite() && days > 0.0 {
        Duration::from_secs_f64(days * 86_400.0)
    } else {
        Duration::ZERO
    };
    Some((path, keep))
}

/// Every stream's defaults: the commentary flags, and what only `serve` has (the picture
/// shown, the sync delay, the voice, the alerts).
fn serve_defaults(args: &ServeArgs, problems: &mut Vec<String>) -> StreamDefaults {
    let mut positive = |name: &str, value: f64| {
        if !(value.is_finite() && value > 0.0) {
            problems.push(format!("{name} must be a positive number, got {value}"));
        }
    };
    positive(
        "--display-buffer-seconds (DISPLAY_BUFFER_SECONDS)",
        args.display_buffer_seconds,
    );
    positive("--mjpeg-fps (MJPEG_FPS)", args.mjpeg_fps);
    if !(1..=100).contains(&args.jpeg_quality) {
        problems.push(format!(
            "--jpeg-quality (JPEG_QUALITY) must be between 1 and 100, got {}",
            args.jpeg_quality
        ));
    }
    if args.window_size == 0 {
        problems.push("--window-size (WINDOW_SIZE) must be at least 1".into());
    }
    let commentary = commentary_defaults(
        &args.commentary,
        &args.sampling,
        &args.voice.language,
        problems,
    );
    StreamDefaults {
        stream_delay_init: args.stream_delay_init,
        stream_delay_ema_alpha: args.stream_delay_ema_alpha,
        voice: args.voice.voice.to_string(),
        alerts: args.alerts.clone(),
        window_size: args.window_size.max(1),
        display_span: Duration::from_secs_f64(if args.display_buffer_seconds > 0.0 {
            args.display_buffer_seconds
        } else {
            15.0
        }),
        jpeg_quality: args.jpeg_quality.clamp(1, 100) as u8,
        display_max_width: (args.display_max_width > 0).then_some(args.display_max_width),
        max_slices: args.engine.max_slice_nums,
        mjpeg_fps: args.mjpeg_fps,
        ..commentary
    }
}

/// The streams `--source` and the `--streams` file ask for, in that order.
fn stream_inputs(args: &ServeArgs, problems: &mut Vec<String>) -> Vec<StreamInput> {
    let mut inputs: Vec<StreamInput> = args
        .source
        .iter()
        .map(|s| StreamInput::from_source_flag(s))
        .collect();
    if let Some(path) = &args.streams {
        match streams_file(path) {
            Ok(streams) => inputs.extend(streams),
            Err(problem) => problems.push(problem),
        }
    }
    if inputs.len() > args.max_streams.max(1) {
        problems.push(format!(
            "{} streams asked for, more than --max-streams {}",
            inputs.len(),
            args.max_streams
        ));
    }
    inputs
}

fn streams_file(path: &Path) -> Result<Vec<StreamInput>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--streams {}: cannot read it: {e}", path.display()))?;
    let streams = kibitz_stream::parse_streams_file(&text)
        .map_err(|e| format!("--streams {}: {e}", path.display()))?;
    Ok(streams
        .into_iter()
        .map(|(id, settings)| StreamInput {
            id: Some(id),
            settings,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(extra: &[&str]) -> anyhow::Result<Settings> {
        let mut argv = vec!["kibitz", "serve", "--source", "/dev/null"];
        argv.extend_from_slice(extra);
        let cli = crate::flags::Cli::try_parse_from(argv)?;
        match cli.command {
            crate::flags::Command::Serve(args) => Settings::from_args(*args),
            _ => unreachable!(),
        }
    }

    /// The error of a start-up that must fail (`Settings` has no `Debug`: it holds the API key).
    fn problems(extra: &[&str]) -> String {
        match parse(extra) {
            Ok(_) => panic!("{extra:?} should be refused"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults_are_valid() {
        let s = parse(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.bind.to_string(), "127.0.0.1:8199");
        assert_eq!(s.streams.len(), 1);
        assert_eq!(s.streams[0].id.as_str(), "s1");
        assert_eq!(s.streams[0].frames_per_inference, 4);
        assert_eq!(s.streams[0].frame_stride, 2);
        assert_eq!(s.defaults.window_size, 32);
        assert_eq!(s.streams[0].capture_fps, 2.0);
        assert!(s.state_file.ends_with("streams.json"));
    }

    #[test]
    fn every_bad_value_is_reported_at_once() {
        let err = problems(&[
            "--capture-fps",
            "-1",
            "--frame-stride",
            "0",
            "--stream-delay-ema-alpha",
            "1.5",
            "--profile",
            "opera",
            "--bind",
            "nowhere",
        ]);
        for needle in ["--capture-fps", "stride", "alpha", "opera", "nowhere"] {
            assert!(
                err.to_lowercase().contains(needle),
                "missing {needle} in: {err}"
            );
        }
        assert!(err.lines().count() >= 5, "{err}");
    }

    #[test]
    fn window_must_reach_the_frames_asked_for() {
        let err = problems(&["--window-size", "4"]);
        assert!(err.contains("need a window of 7 frames"), "{err}");
    }

    #[test]
    fn several_sources_with_ids_and_a_streams_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("streams.toml");
        std::fs::write(
            &file,
            "[door]\nsource = \"rtsp://cam/1\"\nprofile = \"security\"\ncapture_fps = 1.0\n",
        )
        .unwrap();
        let s = parse(&[
            "--source",
            "game=g.mp4",
            "--profile",
            "sports",
            "--streams",
            file.to_str().unwrap(),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let ids: Vec<&str> = s.streams.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["s1", "game", "door"]);
        // The global flag is every stream's default; the file's setting wins for its stream.
        assert_eq!(s.streams[1].profile, "sports");
        assert_eq!(s.streams[2].profile, "security");
        assert_eq!(s.streams[2].capture_fps, 1.0);
        assert_eq!(s.streams[1].capture_fps, 2.0);

        let err = problems(&["--source", "x=a.mp4", "--source", "x=b.mp4"]);
        assert!(err.contains("given twice"), "{err}");
    }

    #[test]
    fn a_bad_stream_in_the_file_names_its_stream() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("streams.toml");
        std::fs::write(&file, "[door]\nsource = \"x\"\nframe_stride = 0\n[gate]\nsource = \"y\"\nprofile = \"opera\"\n").unwrap();
        let err = problems(&["--streams", file.to_str().unwrap()]);
        assert!(err.contains("stream 'door': frame_stride"), "{err}");
        assert!(err.contains("stream 'gate': profile"), "{err}");
    }

    #[test]
    fn lan_binding_needs_a_token() {
        let err = problems(&["--bind", "0.0.0.0:8199"]);
        assert!(err.contains("--allow-no-token"), "{err}");
        assert!(parse(&["--bind", "0.0.0.0:8199", "--token", "s3cret-token"]).is_ok());
        assert!(parse(&["--bind", "0.0.0.0:8199", "--allow-no-token"]).is_ok());
        assert!(parse(&["--bind", "[::1]:8199"]).is_ok());
        let err = problems(&["--token", " "]);
        assert!(err.contains("empty"), "{err}");
    }
}
