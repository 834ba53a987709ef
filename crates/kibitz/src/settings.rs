//! Validated settings for `serve`: every flag is checked here, together, so a bad start-up
//! names all its problems at once (`kibitz: --frame-stride must be at least 1`, one per line).

use std::net::SocketAddr;
use std::time::Duration;

use kibitz_commentator::CommentatorConfig;
use kibitz_media::{SourceConfig, SourceSpec};

use crate::flags::{EngineArgs, ServeArgs};

pub struct Settings {
    pub bind: SocketAddr,
    pub source: SourceConfig,
    pub window_size: usize,
    pub display_span: Duration,
    pub mjpeg_fps: f64,
    pub commentator: CommentatorConfig,
    pub engine: EngineArgs,
}

impl Settings {
    pub fn from_args(args: ServeArgs) -> anyhow::Result<Settings> {
        let mut problems: Vec<String> = Vec::new();
        let mut positive = |name: &str, value: f64| {
            if !(value.is_finite() && value > 0.0) {
                problems.push(format!("{name} must be a positive number, got {value}"));
            }
        };
        positive("--capture-fps (CAPTURE_FPS)", args.capture_fps);
        positive(
            "--display-buffer-seconds (DISPLAY_BUFFER_SECONDS)",
            args.display_buffer_seconds,
        );
        positive("--mjpeg-fps (MJPEG_FPS)", args.mjpeg_fps);
        positive("--cycle-timeout (CYCLE_TIMEOUT)", args.cycle_timeout);
        if !(args.inference_interval.is_finite() && args.inference_interval >= 0.0) {
            problems.push(format!(
                "--inference-interval (INFERENCE_INTERVAL) must be 0 or more, got {}",
                args.inference_interval
            ));
        }
        if !(1..=100).contains(&args.jpeg_quality) {
            problems.push(format!(
                "--jpeg-quality (JPEG_QUALITY) must be between 1 and 100, got {}",
                args.jpeg_quality
            ));
        }
        if args.window_size == 0 {
            problems.push("--window-size (WINDOW_SIZE) must be at least 1".into());
        }
        let reach = args.frames_per_inference.saturating_sub(1) * args.frame_stride + 1;
        if args.window_size > 0 && reach > args.window_size {
            problems.push(format!(
                "{} frames every {} need a window of {reach} frames, but --window-size is {}",
                args.frames_per_inference, args.frame_stride, args.window_size
            ));
        }
        let bind = match args.bind.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                problems.push(format!(
                    "--bind (BIND) '{}' is not an address like 127.0.0.1:8199",
                    args.bind
                ));
                None
            }
        };
        let spec = match SourceSpec::parse(&args.source) {
            Ok(spec) => Some(spec),
            Err(e) => {
                problems.push(e.to_string());
                None
            }
        };
        problems.extend(crate::engine::problems(&args.engine));

        let commentator = CommentatorConfig {
            frames_per_inference: args.frames_per_inference,
            frame_stride: args.frame_stride,
            interval: Duration::from_secs_f64(args.inference_interval.max(0.0)),
            max_tokens: args.sampling.max_tokens,
            sampling: crate::engine::sampling(&args.sampling),
            delay_init: args.stream_delay_init,
            delay_alpha: args.stream_delay_ema_alpha,
            cycle_timeout: Duration::from_secs_f64(if args.cycle_timeout > 0.0 {
                args.cycle_timeout
            } else {
                30.0
            }),
            profile: args.profile.clone(),
            instruction: args.instruction.clone(),
            ..CommentatorConfig::default()
        };
        if let Err(e) = commentator.validate() {
            problems.extend(e.to_string().lines().map(str::to_owned));
        }

        if !problems.is_empty() {
            anyhow::bail!("{}", problems.join("\nkibitz: "));
        }
        let mut source = SourceConfig::new(spec.expect("checked above"));
        source.jpeg_quality = args.jpeg_quality as u8;
        source.display_max_width = (args.display_max_width > 0).then_some(args.display_max_width);
        source.capture_fps = args.capture_fps;
        source.max_slices = args.engine.max_slice_nums;
        Ok(Settings {
            bind: bind.expect("checked above"),
            source,
            window_size: args.window_size,
            display_span: Duration::from_secs_f64(args.display_buffer_seconds),
            mjpeg_fps: args.mjpeg_fps,
            commentator,
            engine: args.engine,
        })
    }
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
            crate::flags::Command::Serve(args) => Settings::from_args(args),
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
        assert_eq!(s.commentator.frames_per_inference, 4);
        assert_eq!(s.commentator.frame_stride, 2);
        assert_eq!(s.window_size, 32);
        assert_eq!(s.source.capture_fps, 2.0);
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
}
