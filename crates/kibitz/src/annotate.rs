//! `kibitz annotate FILE -o OUT`: the live commentary loop run over a recorded video on the
//! video's own time, as fast as the engine answers, into subtitles, JSON or a copy of the
//! video with a subtitle track.
//!
//! **Media time drives the machine.** The [`Commentator`] never reads a clock: every input
//! carries `now`. Here `now` is a made-up instant `base` plus the media time of the newest
//! frame read so far, and a frame's capture instant is `base` plus its own media time, so
//! to the machine the file looks like a live source whose clock only moves when a frame
//! arrives. Frames are read (decoded and scaled to the model's size at `--capture-fps`, as
//! the live path does) as fast as FFmpeg goes, into a plain [`InferenceWindow`] that the
//! machine's `NeedFrames` is answered from; nothing paces them and there is no display
//! buffer.
//!
//! - *The interval is media seconds.* A cycle that ends at media time `t` makes the next one
//!   due at `t + interval`; reading on to that point is what makes it come due.
//! - *"The first frame captured after the interval"* is the first frame read whose media
//!   time is at or past the due time: the machine is ticked on that frame's arrival, and
//!   that frame is the newest of the window it samples, exactly as in the live loop.
//! - *While a cycle is with the engine, media time is held.* No frame is read until its
//!   answer is complete, and its tokens and end are stamped with the same `now` as its start.
//!   The engine's time is not media time: a live stream would go on for as long as the
//!   answer takes, but a recording waits, so a cycle's frames are the same whatever the
//!   engine's speed, and the cycle after it starts `interval` media seconds after this one's
//!   newest frame. (So `latency` in the JSON is 0; the engine's own times are in `stats`.)
//!
//! A comment's cue starts at the media time of the newest frame its window saw, the moment
//! the live page would show it, and lasts until the next cue starts, a readable time
//! ([`readable`]) has passed, or the video ends, whichever comes first. Skipped cycles
//! (the model saw nothing new, or the scene-change gate found nothing changed) leave gaps.
//!
//! With `--voice` (a .mkv or .mp4 output), each comment is spoken after the run and laid on
//! one speech track at its cue's start, or as soon as the clip before it ends (clips never
//! overlap; one that would start more than 1.5 s late is left out, as on the live page);
//! `kibitz_media` mixes that over the original sound, ducked, as an extra audio track.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kibitz_commentator::{Commentator, CommentatorConfig, Event, Input, Output};
use kibitz_engine::{
    EngineError, Generation, Output as EngineOutput, Request, Scheduler, Session, Stats, Turn,
};
use kibitz_frames::{InferenceWindow, Stamp, WINDOW_SIZE};
use kibitz_media::{Captured, Cue, VideoFile, VideoInfo};
use kibitz_stream::StreamDefaults;
use serde::Serialize;

use crate::flags::AnnotateArgs;
use crate::settings;

/// What `-o` writes, by its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Vtt,
    Srt,
    Json,
    /// A copy of the video with a subtitle track (Matroska or MP4).
    Video,
}

impl Format {
    fn of(path: &Path) -> anyhow::Result<Format> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        Ok(match ext.as_deref() {
            Some("vtt") => Format::Vtt,
            Some("srt") => Format::Srt,
            Some("json") => Format::Json,
            Some("mkv" | "mp4") => Format::Video,
            other => bail!(
                "cannot write '{}': {} is not an output kibitz knows\nhint: end the name in .vtt, .srt, .json, .mkv or .mp4",
                path.display(),
                other.map_or("no extension".to_string(), |e| format!("'.{e}'"))
            ),
        })
    }
}

/// One cycle as the JSON output lists it.
#[derive(Debug, Clone, Serialize)]
struct CycleRecord {
    cycle: u64,
    /// Media time (seconds) of each frame sent, oldest first.
    frames: Vec<f64>,
    text: String,
    skipped: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// The engine's account of the request (none when the model was not asked).
    stats: Option<Stats>,
    /// Wall-clock milliseconds the engine took for this cycle.
    wall_ms: f64,
}

pub async fn run(args: AnnotateArgs) -> anyhow::Result<ExitCode> {
    // Everything that can be wrong with the input, the output or the settings is found
    // before the model loads.
    let format = Format::of(&args.output)?;
    let config = commentator_config(&args)?;
    let video = VideoFile::open(&args.file)?;
    if format == Format::Video {
        kibitz_media::check_remux(&args.file, &args.output)?;
    }
    check_writable(&args.file, &args.output)?;
    let voice = voice(&args, format).await?;
    let info = video.info().clone();

    let engine = crate::engine::build(&args.engine).await?;
    let started = Instant::now();
    let run = annotate(video, &args, config, engine.clone()).await?;
    let cues = cues(&run.cycles, run.end);
    match format {
        Format::Vtt => write_file(&args.output, &webvtt(&cues))?,
        Format::Srt => write_file(&args.output, &srt(&cues))?,
        Format::Json => {
            let json = json_report(&args, &info, &engine.info(), &run, &cues, started);
            write_file(&args.output, &(serde_json::to_string_pretty(&json)? + "\n"))?
        }
        Format::Video => write_video(&args, voice, &cues, run.end).await?,
    }
    summarize(&args, &run, cues.len(), started);
    Ok(ExitCode::SUCCESS)
}

/// The `.json` output: the input, the settings, every cycle and every cue.
fn json_report(
    args: &AnnotateArgs,
    info: &VideoInfo,
    engine: &kibitz_engine::EngineInfo,
    run: &Run,
    cues: &[Cue],
    started: Instant,
) -> serde_json::Value {
    let elapsed = started.elapsed().as_secs_f64();
    let end = run.end.as_secs_f64();
    let c = &args.commentary;
    serde_json::json!({
        "input": args.file,
        "duration": end,
        "video": {
            "codec": info.codec,
            "width": info.width,
            "height": info.height,
            "fps": info.fps,
        },
        "settings": {
            "profile": c.profile,
            "instruction": c.instruction,
            "language": args.language,
            "capture_fps": c.capture_fps,
            "frames_per_inference": c.frames_per_inference,
            "frame_stride": c.frame_stride,
            "interval": c.inference_interval,
            "scene_change_threshold": c.scene_change_threshold,
            "max_tokens": args.sampling.max_tokens,
        },
        "engine": engine,
        "cycles": run.cycles,
        "cues": cues.iter().map(|c| serde_json::json!({
            "start": c.start.as_secs_f64(),
            "end": c.end.as_secs_f64(),
            "text": c.text,
        })).collect::<Vec<_>>(),
        "elapsed_s": elapsed,
        "speed": end / elapsed.max(1e-9),
    })
}

/// The `.mkv`/`.mp4` output: the input's streams copied, the cues as subtitles, and the
/// spoken comments as an extra audio track when there is a voice.
async fn write_video(
    args: &AnnotateArgs,
    voice: Option<Arc<dyn kibitz_voice::Voice>>,
    cues: &[Cue],
    end: Duration,
) -> anyhow::Result<()> {
    let (input, output) = (args.file.clone(), args.output.clone());
    let language = iso639_2(&args.language).to_string();
    let cues = cues.to_vec();
    let speech = match voice {
        Some(voice) => Some(speech(voice, &cues, end).await?),
        None => None,
    };
    tokio::task::spawn_blocking(move || {
        kibitz_media::remux_with_subtitles(&input, &output, &cues, &language, speech.as_ref())
    })
    .await
    .context("the muxer stopped")??;
    Ok(())
}

/// The closing line on stdout, and a warning when the video was too short for a cycle.
fn summarize(args: &AnnotateArgs, run: &Run, comments: usize, started: Instant) {
    let elapsed = started.elapsed().as_secs_f64();
    let end = run.end.as_secs_f64();
    let skipped = run.cycles.iter().filter(|c| c.skipped).count();
    let failed = run.cycles.iter().filter(|c| c.error.is_some()).count();
    println!(
        "annotated {end:.1} s of video in {elapsed:.1} s ({:.2}x real time): {} cycles, {comments} comments, {skipped} skipped, {failed} failed -> {}",
        end / elapsed.max(1e-9),
        run.cycles.len(),
        args.output.display()
    );
    if run.cycles.is_empty() {
        let c = &args.commentary;
        let span = (c.frames_per_inference.max(1) - 1) * c.frame_stride.max(1) + 1;
        eprintln!(
            "kibitz: warning: no cycle ran: a cycle needs {span} frames at {} fps ({:.1} s of video)",
            c.capture_fps,
            span as f64 / c.capture_fps
        );
    }
}

/// The voice `--voice` asks for, built and tried before any work (`None` without one).
async fn voice(
    args: &AnnotateArgs,
    format: Format,
) -> anyhow::Result<Option<Arc<dyn kibitz_voice::Voice>>> {
    let spec = match &args.voice {
        None | Some(kibitz_voice::VoiceSpec::Off) => return Ok(None),
        Some(spec) => spec.clone(),
    };
    if format != Format::Video {
        bail!(
            "--voice makes an audio track, which '{}' cannot hold\nhint: write a .mkv or .mp4",
            args.output.display()
        );
    }
    let options = kibitz_voice::VoiceOptions {
        language: args.language.clone(),
        rate_wpm: args.voice_rate,
        ..kibitz_voice::VoiceOptions::default()
    };
    let voice = tokio::task::spawn_blocking(move || kibitz_voice::build(&spec, &options))
        .await
        .context("the voice loader stopped")??;
    Ok(voice)
}

/// Longest a clip may start after its cue (the voice still speaking the one before) before
/// it is left out, as on the live page.
const MOST_LATE: Duration = Duration::from_millis(1500);

/// The comments spoken, each at its cue's start or as soon as the one before has ended
/// (never two at once; one that would start more than [`MOST_LATE`] late is left out), on
/// one track as long as the video. Every clip is converted to [`kibitz_media::SPEECH_RATE`]
/// by the voice crate's resampler (the one the live speech stream uses), whatever rate the
/// voice answers at (an openai server may change it between answers), so none is left out
/// for its rate and the mixer takes the track as it is.
async fn speech(
    voice: Arc<dyn kibitz_voice::Voice>,
    cues: &[Cue],
    end: Duration,
) -> anyhow::Result<kibitz_media::SpeechTrack> {
    let rate = kibitz_media::SPEECH_RATE;
    let at = |d: Duration| (d.as_secs_f64() * f64::from(rate)) as usize;
    let mut samples = vec![0i16; at(end)];
    let mut free = 0usize;
    for cue in cues {
        let mut pcm = kibitz_voice::Pcm::default();
        let mut utterance = kibitz_voice::speak(voice.clone(), &cue.text);
        while let Some(clip) = utterance.next().await {
            pcm.append(&kibitz_voice::Resampler::convert(&clip?.pcm, rate));
        }
        if pcm.samples.is_empty() {
            continue;
        }
        let wanted = at(cue.start);
        let start = wanted.max(free);
        if start - wanted > at(MOST_LATE) {
            continue;
        }
        let stop = start + pcm.samples.len();
        if samples.len() < stop {
            samples.resize(stop, 0);
        }
        samples[start..stop].copy_from_slice(&pcm.samples);
        free = stop;
    }
    Ok(kibitz_media::SpeechTrack { samples })
}

/// The loop's settings from the flags, checked as a stream's are (by `StreamSpec`, the
/// one owner of the per-stream rules, through [`crate::settings`]): the same bad value
/// gets the same words here as from `serve`, a streams file or the API. Every problem is
/// reported at once.
fn commentator_config(args: &AnnotateArgs) -> anyhow::Result<CommentatorConfig> {
    let mut problems = Vec::new();
    let defaults = StreamDefaults {
        // No picture is shown late: there is no one to sync for.
        stream_delay_init: 0.0,
        // The window is made as long as the frames a cycle reaches (see `annotate`).
        window_size: usize::MAX,
        ..settings::commentary_defaults(
            &args.commentary,
            &args.sampling,
            &args.language,
            &mut problems,
        )
    };
    let stream = settings::default_stream(&defaults)
        .map_err(|flag_problems| problems.extend(flag_problems))
        .ok();
    problems.extend(crate::engine::problems(&args.engine));
    match stream {
        Some(stream) if problems.is_empty() => Ok(stream.commentator(&defaults)),
        _ => bail!("{}", problems.join("\nkibitz: ")),
    }
}

/// The output must not be the input (it would be truncated before it is read) and must be
/// writable; checked by opening it, and a file made only for the check is removed again.
fn check_writable(input: &Path, output: &Path) -> anyhow::Result<()> {
    if let (Ok(a), Ok(b)) = (input.canonicalize(), output.canonicalize()) {
        if a == b {
            bail!(
                "cannot write '{}': it is the input\nhint: give another name to -o",
                output.display()
            );
        }
    }
    let existed = output.exists();
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(output)
        .map_err(|e| anyhow::anyhow!("cannot write '{}': {}", output.display(), io_reason(&e)))?;
    if !existed {
        let _ = std::fs::remove_file(output);
    }
    Ok(())
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such folder".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text)
        .map_err(|e| anyhow::anyhow!("cannot write '{}': {}", path.display(), io_reason(&e)))
}

/// What a run produced.
struct Run {
    cycles: Vec<CycleRecord>,
    /// Media time at which the video ends.
    end: Duration,
}

/// Reads the file on a thread of its own and drives the commentary loop on its media time
/// (see the module docs): do what the machine asks; while a cycle is with the engine, wait
/// for its answer; when something is due, tick; else read on.
async fn annotate(
    video: VideoFile,
    args: &AnnotateArgs,
    config: CommentatorConfig,
    engine: Arc<dyn kibitz_engine::Engine>,
) -> anyhow::Result<Run> {
    let info = video.info().clone();
    let (tx, mut frames) = tokio::sync::mpsc::channel::<Captured>(16);
    let (fps, slices) = (args.commentary.capture_fps, args.engine.max_slice_nums);
    let reader = std::thread::Builder::new()
        .name("kibitz-annotate-read".into())
        .spawn(move || video.read(fps, slices, |frame| tx.blocking_send(frame).is_ok()))?;

    let scheduler = Scheduler::new(engine);
    let mut loop_ = MediaTimeLoop::new(config, scheduler.open_session("annotate"))?;
    let bar = progress_bar(&info);
    loop {
        let deadline = loop_.drive().await?;
        if loop_.answer().await {
            continue;
        }
        if deadline <= loop_.now {
            loop_.machine.handle_input(Input::Tick(loop_.now));
            continue;
        }
        // Nothing due before the next frame: read on, which is what moves media time.
        let Some(frame) = frames.recv().await else {
            break;
        };
        let pts = frame.pts;
        loop_.push(frame, deadline);
        bar.set_position(pts.as_millis() as u64);
        bar.set_message(format!(
            "{:.1} s, {} comments",
            pts.as_secs_f64(),
            loop_.comments
        ));
    }
    drop(frames);
    let summary = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the frame reader panicked"))??;
    bar.finish_and_clear();
    loop_.session.close();
    let end = match info.duration {
        // The container's word, unless the frames say the video is shorter.
        Some(d) => Duration::from_secs_f64(d).min(summary.end.max(Duration::from_millis(1))),
        None => summary.end,
    };
    Ok(Run {
        cycles: loop_.cycles,
        end,
    })
}

/// The commentary machine on media time, with its engine turn, the answer in progress and
/// the record of every cycle so far.
struct MediaTimeLoop {
    machine: Commentator,
    session: Session,
    window: InferenceWindow,
    /// A made-up instant for media time 0; `now` is `base` plus the newest frame's time.
    base: Instant,
    now: Instant,
    /// Kept in real time while a cycle is with the engine (media time stands still).
    cycle_timeout: Duration,
    turn: Option<Turn>,
    generation: Option<Generation>,
    infer_started: Instant,
    stats: Option<Stats>,
    wall_ms: f64,
    started_frames: HashMap<u64, Vec<f64>>,
    cycles: Vec<CycleRecord>,
    comments: usize,
}

impl MediaTimeLoop {
    fn new(config: CommentatorConfig, session: Session) -> anyhow::Result<MediaTimeLoop> {
        let span = (config.frames_per_inference - 1) * config.frame_stride + 1;
        let base = Instant::now();
        Ok(MediaTimeLoop {
            window: InferenceWindow::new(span.max(WINDOW_SIZE)),
            cycle_timeout: config.cycle_timeout,
            machine: Commentator::new(config, base)?,
            session,
            base,
            now: base,
            turn: None,
            generation: None,
            infer_started: base,
            stats: None,
            wall_ms: 0.0,
            started_frames: HashMap::new(),
            cycles: Vec::new(),
            comments: 0,
        })
    }

    /// Does what the machine asks until it only waits for a time, and returns that time.
    async fn drive(&mut self) -> anyhow::Result<Instant> {
        loop {
            match self.machine.poll_output() {
                Output::NeedFrames {
                    count,
                    stride,
                    newest,
                } => {
                    self.turn = Some(match self.session.try_turn() {
                        Ok(turn) => turn,
                        Err(EngineError::Busy(_)) => {
                            self.session
                                .turn(kibitz_engine::Priority::Commentary, newest)
                                .await?
                        }
                        Err(e) => return Err(e.into()),
                    });
                    let frames = self.window.sample(count, stride);
                    self.machine.handle_input(Input::Frames {
                        now: self.now,
                        frames,
                    });
                }
                Output::Infer { cycle, request } => self.infer(cycle, request),
                Output::Cancel { .. } => self.generation = None,
                Output::Emit(event) => self.record(event),
                Output::Timeout(at) => {
                    // A turn the loop did not use goes back.
                    self.turn = None;
                    return Ok(at);
                }
            }
        }
    }

    fn infer(&mut self, cycle: u64, request: Request) {
        self.infer_started = Instant::now();
        self.stats = None;
        let submitted = match self.turn.take() {
            Some(turn) => turn.submit(request),
            None => Err(EngineError::Unavailable(
                "the loop asked without an engine turn".into(),
            )),
        };
        match submitted {
            Ok(g) => self.generation = Some(g),
            Err(e) => {
                tracing::warn!(cycle, %e, "engine refused the request");
                self.machine.handle_input(Input::Failed(e, self.now));
            }
        }
    }

    /// Keeps what the JSON output lists of a cycle.
    fn record(&mut self, event: Event) {
        match event {
            Event::CycleStart { cycle, frames } => {
                self.started_frames.insert(cycle, frames);
            }
            Event::CycleEnd(end) => {
                self.started_frames.remove(&end.cycle);
                if !end.skipped {
                    self.comments += 1;
                }
                let asked = end.reason.is_none();
                self.cycles.push(CycleRecord {
                    cycle: end.cycle,
                    frames: end.frames,
                    text: end.text,
                    skipped: end.skipped,
                    reason: end.reason,
                    error: None,
                    stats: if asked { self.stats.take() } else { None },
                    wall_ms: if asked { self.wall_ms } else { 0.0 },
                });
            }
            Event::Error {
                cycle: Some(cycle),
                message,
            } => {
                tracing::warn!(cycle, %message, "a cycle failed");
                self.cycles.push(CycleRecord {
                    cycle,
                    frames: self.started_frames.remove(&cycle).unwrap_or_default(),
                    text: String::new(),
                    skipped: false,
                    reason: None,
                    error: Some(message),
                    stats: None,
                    wall_ms: ms(self.infer_started.elapsed()),
                });
            }
            _ => {}
        }
    }

    /// The next piece of the answer in progress, handed to the machine at the same `now`
    /// as its cycle started; false when no cycle is with the engine.
    async fn answer(&mut self) -> bool {
        let Some(g) = self.generation.as_mut() else {
            return false;
        };
        // Media time stands still until the cycle is answered, so the machine's own cycle
        // timeout (in media time) cannot fire; it is kept here in real time instead.
        let Ok(next) = tokio::time::timeout(self.cycle_timeout, g.next()).await else {
            self.generation = None;
            let message = format!(
                "no answer within {:.1} s (--cycle-timeout)",
                self.cycle_timeout.as_secs_f64()
            );
            self.machine
                .handle_input(Input::Failed(EngineError::Timeout(message), self.now));
            return true;
        };
        let now = self.now;
        let input = match next {
            Some(Ok(EngineOutput::Text(text))) => Input::Token(text, now),
            Some(Ok(EngineOutput::Done(done))) => {
                self.wall_ms = ms(self.infer_started.elapsed());
                self.stats = Some(done.clone());
                Input::Done(done, now)
            }
            Some(Err(e)) => Input::Failed(e, now),
            None => Input::Failed(
                EngineError::Stopped("the answer ended before it was complete".into()),
                now,
            ),
        };
        if matches!(input, Input::Done(..) | Input::Failed(..)) {
            self.generation = None;
        }
        self.machine.handle_input(input);
        true
    }

    /// A frame read: media time moves to it, and the machine is ticked if it was due.
    fn push(&mut self, Captured { pts, rgb }: Captured, deadline: Instant) {
        self.now = self.base + pts;
        self.window.push(
            Stamp {
                pts,
                captured: self.now,
            },
            rgb,
        );
        if self.now >= deadline {
            self.machine.handle_input(Input::Tick(self.now));
        }
    }
}

fn progress_bar(info: &VideoInfo) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let length = info.duration.map_or(0, |d| (d * 1e3) as u64);
    let bar = indicatif::ProgressBar::new(length);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "annotating {bar:30} {percent:>3}% {msg} [{elapsed_precise}, ETA {eta}]",
        )
        .expect("valid template"),
    );
    bar
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// How long a comment of `text` stays up when nothing comes after it: a second plus 60 ms a
/// character (a brisk reading pace), at most 8 s.
fn readable(text: &str) -> Duration {
    let chars = text.chars().count() as u64;
    Duration::from_millis((1000 + 60 * chars).min(8000))
}

/// One cue per comment (skips and failures leave gaps), in whole milliseconds so that
/// rounding can never make two overlap: from the newest frame its cycle saw to the next
/// cue's start, its readable time or the video's `end`, whichever comes first.
fn cues(cycles: &[CycleRecord], end: Duration) -> Vec<Cue> {
    let end_ms = end.as_millis() as u64;
    let comments: Vec<(u64, &str)> = cycles
        .iter()
        .filter(|c| !c.skipped && c.error.is_none() && !c.text.trim().is_empty())
        .filter_map(|c| {
            let start = c.frames.last()?;
            Some(((start * 1e3).round() as u64, c.text.trim()))
        })
        .filter(|(start, _)| *start < end_ms)
        .collect();
    let mut out: Vec<Cue> = Vec::with_capacity(comments.len());
    for (i, (start, text)) in comments.iter().enumerate() {
        if out
            .last()
            .is_some_and(|prev| prev.end.as_millis() as u64 > *start)
        {
            continue; // never two at once (cycles only move forward, so never happens)
        }
        let mut stop = (start + readable(text).as_millis() as u64).min(end_ms);
        if let Some((next, _)) = comments.get(i + 1) {
            stop = stop.min(*next);
        }
        if stop <= *start {
            continue;
        }
        out.push(Cue {
            start: Duration::from_millis(*start),
            end: Duration::from_millis(stop),
            text: text.to_string(),
        });
    }
    out
}

/// A cue's text with no empty lines (which end a cue in both formats).
fn cue_lines(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

fn timestamp(d: Duration, separator: char) -> String {
    let ms = d.as_millis();
    format!(
        "{:02}:{:02}:{:02}{separator}{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

fn webvtt(cues: &[Cue]) -> String {
    kibitz_history::webvtt(
        cues.iter()
            .zip(1..)
            .map(|(cue, id)| kibitz_history::WebVttCue {
                id,
                start_ms: cue.start.as_millis() as i64,
                end_ms: cue.end.as_millis() as i64,
                text: &cue.text,
            }),
    )
}

fn srt(cues: &[Cue]) -> String {
    let mut out = String::new();
    for (i, cue) in cues.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!(
            "{}\n{} --> {}\n{}\n",
            i + 1,
            timestamp(cue.start, ','),
            timestamp(cue.end, ','),
            cue_lines(&cue.text).replace("-->", "->")
        ));
    }
    out
}

/// The ISO 639-2 code containers expect for a language's (primary) code; `und` when unknown.
fn iso639_2(code: &str) -> &'static str {
    let primary = code.split(['-', '_']).next().unwrap_or_default();
    match primary.to_ascii_lowercase().as_str() {
        "en" | "eng" => "eng",
        "de" | "ger" | "deu" => "ger",
        "fr" | "fre" | "fra" => "fre",
        "es" | "spa" => "spa",
        "it" | "ita" => "ita",
        "pt" | "por" => "por",
        "nl" | "dut" | "nld" => "dut",
        "ru" | "rus" => "rus",
        "ja" | "jpn" => "jpn",
        "zh" | "chi" | "zho" => "chi",
        "ko" | "kor" => "kor",
        "pl" | "pol" => "pol",
        "sv" | "swe" => "swe",
        _ => "und",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(cycle: u64, newest: f64, text: &str, skipped: bool) -> CycleRecord {
        CycleRecord {
            cycle,
            frames: vec![newest - 1.0, newest],
            text: text.into(),
            skipped,
            reason: None,
            error: None,
            stats: None,
            wall_ms: 0.0,
        }
    }

    #[test]
    fn cues_start_at_the_newest_frame_and_never_overlap() {
        let cycles = [
            record(
                1,
                3.0,
                "A long comment that would stay up for quite a while.",
                false,
            ),
            record(2, 4.5, "", true),
            record(3, 5.0, "Short.", false),
            record(4, 9.5, "Near the end of the video.", false),
        ];
        let cues = cues(&cycles, Duration::from_secs(10));
        let spans: Vec<(u128, u128)> = cues
            .iter()
            .map(|c| (c.start.as_millis(), c.end.as_millis()))
            .collect();
        // Cut by the next cue, a readable time (1 s + 6 × 60 ms), the video's end.
        assert_eq!(spans, [(3000, 5000), (5000, 6360), (9500, 10000)]);
    }

    #[test]
    fn formats_are_what_players_read() {
        let cues = [Cue {
            start: Duration::from_millis(3_500),
            end: Duration::from_millis(3_661_250),
            text: "a <b> & c\n\nd".into(),
        }];
        assert_eq!(
            webvtt(&cues),
            "WEBVTT\n\n1\n00:00:03.500 --> 01:01:01.250\na &lt;b&gt; &amp; c\nd\n"
        );
        assert_eq!(
            srt(&cues),
            "1\n00:00:03,500 --> 01:01:01,250\na <b> & c\nd\n"
        );
    }

    #[test]
    fn unknown_extensions_are_refused_with_the_known_ones() {
        let err = Format::of(Path::new("out.txt")).unwrap_err().to_string();
        assert!(
            err.contains("'.txt'") && err.contains(".vtt, .srt"),
            "{err}"
        );
        assert_eq!(Format::of(Path::new("a.MKV")).unwrap(), Format::Video);
    }

    /// A voice that answers a sentence with "low" in it at 16 kHz and any other at 24 kHz:
    /// half a second of one level, so where each clip lands is plain to see.
    struct TwoRates;

    impl kibitz_voice::Voice for TwoRates {
        fn info(&self) -> kibitz_voice::VoiceInfo {
            kibitz_voice::VoiceInfo {
                engine: "openai",
                name: "two-rates".into(),
                language: "en".into(),
                sample_rate: 24_000,
            }
        }

        fn synthesize(
            &self,
            sentence: &str,
        ) -> Result<kibitz_voice::Pcm, kibitz_voice::VoiceError> {
            let sample_rate = if sentence.contains("low") {
                16_000
            } else {
                24_000
            };
            Ok(kibitz_voice::Pcm {
                samples: vec![1000; sample_rate as usize / 2],
                sample_rate,
            })
        }
    }

    #[tokio::test]
    async fn clips_at_other_rates_are_resampled_not_left_out() {
        let cue = |start: u64, text: &str| Cue {
            start: Duration::from_secs(start),
            end: Duration::from_secs(start + 1),
            text: text.into(),
        };
        // The first clip at 16 kHz, then one utterance at 24 kHz and 16 kHz.
        let cues = [
            cue(1, "Spoken low."),
            cue(3, "Spoken high. Spoken low again."),
        ];
        let track = tokio::time::timeout(
            Duration::from_secs(30),
            speech(Arc::new(TwoRates), &cues, Duration::from_secs(5)),
        )
        .await
        .expect("speaks in time")
        .unwrap();
        let rate = kibitz_media::SPEECH_RATE as usize;
        assert_eq!(track.samples.len(), 5 * rate);
        // Speech exactly where each clip belongs (1–1.5 s, 3–4 s), away from the filter's
        // edges; silence elsewhere.
        let level = |from: f64, to: f64| {
            let (from, to) = ((from * rate as f64) as usize, (to * rate as f64) as usize);
            let part = &track.samples[from..to];
            (*part.iter().min().unwrap(), *part.iter().max().unwrap())
        };
        for (from, to) in [(1.01, 1.49), (3.01, 3.49), (3.51, 3.99)] {
            let (low, high) = level(from, to);
            assert!(low >= 998 && high <= 1002, "{from}–{to} s: {low}..{high}");
        }
        for (from, to) in [(0.0, 0.99), (1.51, 2.99), (4.01, 5.0)] {
            assert_eq!(level(from, to), (0, 0), "{from}–{to} s");
        }
    }
}
