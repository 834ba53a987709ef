//! `kibitz annotate` as a user runs it: the real engine on the tiny model over the test
//! videos, its outputs read back by parsers written here and by `ffprobe`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

mod fixture;
use fixture::fixture;

fn kibitz() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kibitz"));
    // One llama.cpp thread: tests run side by side on small machines.
    cmd.env("THREADS", "1")
        .env("LOG", "error")
        .env_remove("MODEL_PATH")
        .env_remove("ENGINE");
    cmd
}

/// The tiny random-weight model, written once.
fn tiny_model() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("tiny");
        let out = kibitz()
            .arg("make-test-model")
            .arg(&model)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out).1);
        (dir, model)
    })
    .1
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Settings that make many short cycles: two frames a cycle, every frame asked about.
const QUICK: [&str; 10] = [
    "--frames-per-inference",
    "2",
    "--frame-stride",
    "1",
    "--inference-interval",
    "0.5",
    "--scene-change-threshold",
    "0",
    "--max-tokens",
    "4",
];

/// Media time of the newest frame of the first window QUICK allows: the second frame at
/// 2 fps.
const FIRST_NEWEST: f64 = 0.5;

/// Annotates `video` into `out` (in a fresh folder) and returns the output's path.
fn annotate(video: &str, out: &str, dir: &Path) -> PathBuf {
    annotate_with(video, out, dir, &[])
}

fn annotate_with(video: &str, out: &str, dir: &Path, extra: &[&str]) -> PathBuf {
    let path = dir.join(out);
    let run = kibitz()
        .arg("annotate")
        .arg(fixture(video))
        .arg("-o")
        .arg(&path)
        .args(QUICK)
        .args(extra)
        .arg("--model")
        .arg(tiny_model())
        .output()
        .unwrap();
    let (stdout, stderr) = text(&run);
    assert!(run.status.success(), "{stderr}");
    assert!(stdout.contains("x real time"), "{stdout}");
    path
}

fn probe(path: &Path, entries: &str) -> String {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-count_packets", "-show_entries", entries])
        .args(["-of", "compact=nokey=0"])
        .arg(path)
        .output()
        .expect("ffprobe runs");
    assert!(out.status.success(), "{}", text(&out).1);
    String::from_utf8(out.stdout).unwrap()
}

/// The container's duration in seconds.
fn duration(path: &Path) -> f64 {
    let out = probe(path, "format=duration");
    out.trim()
        .trim_start_matches("format|duration=")
        .parse()
        .unwrap_or_else(|_| panic!("no duration in {out}"))
}

/// Seconds of `hh:mm:ss.mmm` (`,` in SRT).
fn seconds(stamp: &str) -> f64 {
    let stamp = stamp.replace(',', ".");
    let parts: Vec<&str> = stamp.split(':').collect();
    assert_eq!(parts.len(), 3, "bad timestamp {stamp}");
    let h: f64 = parts[0].parse().unwrap();
    let m: f64 = parts[1].parse().unwrap();
    let s: f64 = parts[2].parse().unwrap();
    assert!(
        parts[2].len() == 6 && m < 60.0 && s < 60.0,
        "bad timestamp {stamp}"
    );
    h * 3600.0 + m * 60.0 + s
}

/// The cues of a WebVTT or SRT file: blocks of an index, a timing line and text, parsed
/// strictly (a timing line of the other format fails).
fn parse_cues(body: &str, decimal: char) -> Vec<(f64, f64, String)> {
    let mut cues = Vec::new();
    for (n, block) in body
        .split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .enumerate()
    {
        let mut lines = block.lines();
        assert_eq!(lines.next(), Some((n + 1).to_string().as_str()), "{block}");
        let timing = lines.next().expect("a timing line");
        let (start, end) = timing.split_once(" --> ").expect("start --> end");
        assert!(start.contains(decimal) && end.contains(decimal), "{timing}");
        let text: Vec<&str> = lines.collect();
        assert!(
            !text.is_empty() && text.iter().all(|l| !l.trim().is_empty()),
            "{block}"
        );
        cues.push((seconds(start), seconds(end), text.join("\n")));
    }
    cues
}

/// In order, not overlapping, not empty, inside the video, none before the first window.
fn assert_cues_fit(cues: &[(f64, f64, String)], video: f64) {
    assert!(!cues.is_empty(), "the tiny model said something");
    assert!(cues[0].0 >= FIRST_NEWEST - 1e-9, "{cues:?}");
    for (start, end, _) in cues {
        assert!(start < end, "{cues:?}");
        assert!(*end <= video + 1e-3, "{cues:?} past {video}");
    }
    for pair in cues.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "overlap: {pair:?}");
    }
}

#[test]
fn webvtt_of_testsrc2_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let out = annotate("testsrc2-360p25.mp4", "t.vtt", dir.path());
    let body = std::fs::read_to_string(&out).unwrap();
    let rest = body.strip_prefix("WEBVTT\n\n").expect("WebVTT header");
    let cues = parse_cues(rest, '.');
    assert_cues_fit(&cues, duration(&fixture("testsrc2-360p25.mp4")));
    // A cycle every half second of media time or so, over 10 s.
    assert!(cues.len() >= 5, "{cues:?}");
}

#[test]
fn srt_of_big_buck_bunny_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let out = annotate("bigbuckbunny.mp4", "b.srt", dir.path());
    let body = std::fs::read_to_string(&out).unwrap();
    let cues = parse_cues(&body, ',');
    assert_cues_fit(&cues, duration(&fixture("bigbuckbunny.mp4")));
}

#[test]
fn json_lists_every_cycle_with_its_frames_and_cues_match_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = annotate("bigbuckbunny.mp4", "b.json", dir.path());
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let cycles = json["cycles"].as_array().expect("cycles");
    assert!(cycles.len() >= 3, "{json:#}");
    let mut answered = 0;
    for (i, cycle) in cycles.iter().enumerate() {
        assert_eq!(
            cycle["cycle"],
            i as u64 + 1,
            "one entry per cycle, in order"
        );
        let frames: Vec<f64> = serde_json::from_value(cycle["frames"].clone()).unwrap();
        assert_eq!(frames.len(), 2, "{cycle}");
        // Half a second apart at 2 fps, on the video's own 25 fps frames.
        let gap = frames[1] - frames[0];
        assert!((0.48..=0.56).contains(&gap), "{cycle}");
        assert!(cycle["skipped"].is_boolean() && cycle["text"].is_string());
        if cycle["stats"].is_object() {
            assert_eq!(cycle["stats"]["images"], 2, "{cycle}");
        }
        if cycle["skipped"] == false && cycle.get("error").is_none() {
            answered += 1;
        }
    }
    // Each cycle's newest frame is later than the last one's.
    let newest: Vec<f64> = cycles
        .iter()
        .map(|c| c["frames"][1].as_f64().unwrap())
        .collect();
    assert!(newest.windows(2).all(|w| w[0] < w[1]), "{newest:?}");
    assert_eq!(json["cues"].as_array().unwrap().len(), answered);
    assert!(json["speed"].as_f64().unwrap() > 0.0);
}

/// `stream` lines of ffprobe for `path`, each `codec_name|codec_type|packets`.
fn streams(path: &Path) -> Vec<String> {
    probe(path, "stream=codec_type,codec_name,nb_read_packets")
        .lines()
        .map(|l| {
            l.trim_start_matches("stream|")
                .split('|')
                .map(|kv| kv.split_once('=').map_or(kv, |(_, v)| v))
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect()
}

#[test]
fn mkv_and_mp4_copy_video_and_audio_and_add_subtitles() {
    let dir = tempfile::tempdir().unwrap();
    let original = streams(&fixture("bigbuckbunny.mp4"));
    assert_eq!(original.len(), 2, "{original:?}");
    for (name, subtitle) in [("b.mkv", "subrip"), ("b.mp4", "mov_text")] {
        let out = annotate("bigbuckbunny.mp4", name, dir.path());
        let copied = streams(&out);
        assert_eq!(copied.len(), 3, "{name}: {copied:?}");
        // Same codecs, same packet counts: copied, not re-encoded.
        assert_eq!(copied[..2], original[..], "{name}");
        let (codec, rest) = copied[2].split_once('|').unwrap();
        assert_eq!(codec, subtitle, "{name}: {copied:?}");
        let (kind, packets) = rest.split_once('|').unwrap();
        assert_eq!(kind, "subtitle", "{name}");
        assert!(packets.parse::<u32>().unwrap() >= 1, "{name}: {copied:?}");
        let length = duration(&out);
        assert!(
            (length - duration(&fixture("bigbuckbunny.mp4"))).abs() < 0.1,
            "{name}: {length}"
        );
    }
}

#[test]
fn voice_adds_the_spoken_commentary_mixed_over_the_original_sound() {
    let dir = tempfile::tempdir().unwrap();
    let out = annotate_with(
        "bigbuckbunny.mp4",
        "v.mkv",
        dir.path(),
        &["--voice", "espeak"],
    );
    let copied = streams(&out);
    assert_eq!(copied.len(), 4, "{copied:?}");
    assert_eq!(copied[..2], streams(&fixture("bigbuckbunny.mp4"))[..]);
    assert!(copied[2].starts_with("subrip|subtitle|"), "{copied:?}");
    assert!(copied[3].starts_with("aac|audio|"), "{copied:?}");
    // As long as the original sound: 48 kHz AAC frames of 1024 samples over 5.3 s.
    let packets: u32 = copied[3].rsplit('|').next().unwrap().parse().unwrap();
    assert!((240..=260).contains(&packets), "{copied:?}");
    let title = probe(&out, "stream_tags=title");
    assert!(title.contains("spoken commentary"), "{title}");
}

/// Mean level in dB of a 3 kHz tone in audio stream `stream` of `path` over `[from, from + 0.3 s]`.
fn tone_level(path: &Path, stream: usize, from: f64) -> f64 {
    let out = Command::new("ffmpeg")
        .args(["-hide_banner", "-ss", &from.to_string(), "-t", "0.3", "-i"])
        .arg(path)
        .args(["-map", &format!("0:{stream}")])
        .args([
            "-af",
            "bandpass=f=3000:w=50,volumedetect",
            "-f",
            "null",
            "-",
        ])
        .output()
        .expect("ffmpeg runs");
    let log = String::from_utf8_lossy(&out.stderr);
    let mean = log
        .split("mean_volume: ")
        .nth(1)
        .and_then(|rest| rest.split(" dB").next())
        .unwrap_or_else(|| panic!("no level in {log}"));
    mean.trim().parse().unwrap()
}

#[test]
fn the_original_sound_is_ducked_while_the_voice_speaks() {
    let dir = tempfile::tempdir().unwrap();
    let tone = dir.path().join("tone.mp4");
    let made = Command::new("ffmpeg")
        .args([
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=160x120:rate=10",
        ])
        .args(["-f", "lavfi", "-i", "sine=frequency=3000:sample_rate=48000"])
        .args(["-t", "4", "-c:v", "mpeg4", "-c:a", "aac", "-shortest"])
        .arg(&tone)
        .status()
        .expect("ffmpeg runs");
    assert!(made.success());
    let out = dir.path().join("tone.mkv");
    let run = kibitz()
        .arg("annotate")
        .arg(&tone)
        .arg("-o")
        .arg(&out)
        .args(["--frames-per-inference", "2", "--frame-stride", "1"])
        .args([
            "--inference-interval",
            "10",
            "--scene-change-threshold",
            "0",
        ])
        .args(["--max-tokens", "4", "--voice", "espeak", "--model"])
        .arg(tiny_model())
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", text(&run).1);
    // One comment, shown and spoken from 0.5 s (the first window's newest frame).
    let before = tone_level(&out, 3, 0.0);
    let during = tone_level(&out, 3, 0.7);
    let original = tone_level(&out, 1, 0.7);
    assert!(
        before > original - 6.0,
        "{before} vs the original's {original}"
    );
    assert!(
        during < before - 6.0,
        "not ducked: {during} vs {before} before"
    );
}

/// One `kibitz: …` line naming the problem (a `hint:` line may follow), a failure exit, no
/// panic, and no model needed to find out.
fn assert_fails_before_work(args: &[&std::ffi::OsStr], needle: &str) -> String {
    let out = kibitz()
        .arg("annotate")
        .args(args)
        .args(["--model", "/nonexistent/model"])
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert!(!out.status.success(), "should fail: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.starts_with("hint: "))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with("kibitz: "), "{stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in {stderr}");
    stderr
}

#[test]
fn bad_input_or_output_fails_with_one_line_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let vtt = dir.path().join("out.vtt");
    let os = |p: &Path| p.as_os_str().to_owned();
    let video = fixture("short-1s.mp4");
    let o = std::ffi::OsString::from("-o");
    let cases: Vec<(Vec<std::ffi::OsString>, &str)> = vec![
        (
            vec![os(&dir.path().join("missing.mp4")), o.clone(), os(&vtt)],
            "no such file",
        ),
        (
            vec![os(&fixture("not-video.mp4")), o.clone(), os(&vtt)],
            "not a video",
        ),
        (
            vec![os(&fixture("audio-only.m4a")), o.clone(), os(&vtt)],
            "no video stream",
        ),
        (
            vec![os(&fixture("photo.jpg")), o.clone(), os(&vtt)],
            "still image",
        ),
        (
            vec![os(&video), o.clone(), os(&dir.path().join("out.txt"))],
            ".vtt, .srt, .json, .mkv or .mp4",
        ),
        (
            vec![
                os(&video),
                o.clone(),
                os(&dir.path().join("no/such/out.vtt")),
            ],
            "cannot write",
        ),
        (vec![os(&video), o.clone(), os(&video)], "it is the input"),
        (
            vec![
                os(&video),
                o.clone(),
                os(&vtt),
                "--voice".into(),
                "espeak".into(),
            ],
            "--voice makes an audio track",
        ),
    ];
    for (args, needle) in cases {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        assert_fails_before_work(&args, needle);
    }
    assert!(!vtt.exists());
}

#[test]
fn a_codec_mp4_cannot_hold_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let avi = dir.path().join("old.avi");
    let made = Command::new("ffmpeg")
        .args([
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=160x120:rate=10",
        ])
        .args(["-t", "1", "-c:v", "msmpeg4v3"])
        .arg(&avi)
        .status()
        .expect("ffmpeg runs");
    assert!(made.success());
    let mp4 = dir.path().join("old.mp4");
    let stderr = assert_fails_before_work(
        &[avi.as_os_str(), "-o".as_ref(), mp4.as_os_str()],
        "cannot hold the video codec msmpeg4v3",
    );
    assert!(stderr.contains("hint: write a .mkv"), "{stderr}");
    assert!(!mp4.exists());
}
