//! One table of bad per-stream settings, sent down every path a setting comes in by:
//! `kibitz serve` flags, a `--streams` file, `POST /api/streams` and `kibitz annotate`
//! flags (and `kibitz bench --live`, which shares the commentary flags). Each path must refuse the value with the same words, naming the field (as its
//! flag on the command line, as its key in the file and the API); the words come from the
//! one owner of the rules, so the test reads them from one path and looks for them in the
//! others.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{json, Value};

mod fixture;
// The served process's helpers; this test reads no streaming body (`read_for`).
#[allow(dead_code)]
mod served;
use fixture::fixture;

/// A bad value of one field, written as each path takes it.
struct Bad {
    field: &'static str,
    /// On the command line (`--capture-fps 0`).
    flag: String,
    /// In the streams file (`capture_fps = 0.0`).
    toml: String,
    /// In a request body; `None` where JSON cannot say it (NaN).
    json: Option<Value>,
    /// Whether `annotate` has the flag (the sync delay is the live page's alone).
    annotate: bool,
    /// Whether `bench --live` has it (the commentary flags, less the language).
    bench: bool,
}

fn bad(field: &'static str, flag: &str, toml: &str, json: Option<Value>) -> Bad {
    Bad {
        field,
        flag: flag.into(),
        toml: toml.into(),
        json,
        annotate: !field.starts_with("stream_delay"),
        bench: !field.starts_with("stream_delay") && field != "language",
    }
}

fn table() -> Vec<Bad> {
    let long = "x".repeat(2001);
    vec![
        bad("capture_fps", "0", "0.0", Some(json!(0.0))),
        bad("capture_fps", "1000", "1000.0", Some(json!(1000.0))),
        bad("capture_fps", "NaN", "nan", None),
        bad("frames_per_inference", "0", "0", Some(json!(0))),
        bad("frames_per_inference", "17", "17", Some(json!(17))),
        bad("frame_stride", "0", "0", Some(json!(0))),
        bad("inference_interval", "-1", "-1.0", Some(json!(-1.0))),
        bad(
            "inference_interval",
            "86400",
            "86400.0",
            Some(json!(86400.0)),
        ),
        bad("stream_delay_init", "1e9", "1e9", Some(json!(1e9))),
        bad("stream_delay_init", "-5", "-5.0", Some(json!(-5.0))),
        bad("stream_delay_ema_alpha", "1.5", "1.5", Some(json!(1.5))),
        bad("scene_change_threshold", "300", "300.0", Some(json!(300.0))),
        bad(
            "instruction",
            &long,
            &format!("\"{long}\""),
            Some(json!(long)),
        ),
        bad("profile", "opera", "\"opera\"", Some(json!("opera"))),
        bad(
            "language",
            "klingon!",
            "\"klingon!\"",
            Some(json!("klingon!")),
        ),
    ]
}

fn kibitz() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kibitz"));
    // WebRTC on a free UDP port: servers of tests side by side would share 8199.
    cmd.env("LOG", "error")
        .env("WEBRTC_PORT", "0")
        .env_remove("MODEL_PATH")
        .env_remove("ENGINE");
    cmd
}

/// The one `kibitz: ` line of a run that must fail before any work.
fn refusal(out: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what}: should fail: {stderr}");
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: one line: {stderr}");
    lines[0]
        .strip_prefix("kibitz: ")
        .unwrap_or_else(|| panic!("{what}: no kibitz: line in {stderr}"))
        .to_string()
}

/// The flag that sets `field`, as the command line names it (`--capture-fps (CAPTURE_FPS)`).
fn flag_name(field: &str) -> String {
    let env = if field == "language" {
        "KIBITZ_LANGUAGE".to_string()
    } else {
        field.to_ascii_uppercase()
    };
    format!("--{} ({env})", field.replace('_', "-"))
}

#[test]
fn one_table_of_bad_settings_is_refused_alike_on_every_path() {
    let dir = tempfile::tempdir().unwrap();
    let server = served::start(&[], "1");
    let video = fixture("short-1s.mp4");
    for bad in table() {
        let what = format!("{} = {:.20}", bad.field, bad.flag);
        let flag = format!("--{}", bad.field.replace('_', "-"));

        // The streams file: `stream 'door': FIELD: MESSAGE`. Its words are the reference.
        let file = dir.path().join("streams.toml");
        std::fs::write(
            &file,
            format!(
                "[door]\nsource = \"rtsp://127.0.0.1:9/cam\"\n{} = {}\n",
                bad.field, bad.toml
            ),
        )
        .unwrap();
        let line = refusal(
            &kibitz()
                .args(["serve", "--bind", "127.0.0.1:0", "--streams"])
                .arg(&file)
                .output()
                .unwrap(),
            &format!("streams file, {what}"),
        );
        let message = line
            .strip_prefix(&format!("stream 'door': {}: ", bad.field))
            .unwrap_or_else(|| panic!("{what}: the file's line names the stream and field: {line}"))
            .to_string();
        assert!(!message.is_empty(), "{what}: a reason");

        // `kibitz serve` flags: `--capture-fps (CAPTURE_FPS): MESSAGE`.
        let line = refusal(
            &kibitz()
                .args(["serve", "--bind", "127.0.0.1:0", "--source", "/no/such.mp4"])
                .args([&flag, &bad.flag])
                .output()
                .unwrap(),
            &format!("serve flags, {what}"),
        );
        assert_eq!(
            line,
            format!("{}: {message}", flag_name(bad.field)),
            "{what}"
        );

        // `kibitz annotate` flags: the same line as `serve`'s.
        if bad.annotate {
            let line = refusal(
                &kibitz()
                    .arg("annotate")
                    .arg(&video)
                    .arg("-o")
                    .arg(dir.path().join("out.vtt"))
                    .args([&flag, &bad.flag])
                    .args(["--model", "/nonexistent/model"])
                    .output()
                    .unwrap(),
                &format!("annotate flags, {what}"),
            );
            assert_eq!(
                line,
                format!("{}: {message}", flag_name(bad.field)),
                "{what}"
            );
        }

        // `kibitz bench --live`, which shares the commentary flags: the same line again.
        if bad.bench {
            let line = refusal(
                &kibitz()
                    .args(["bench", "--live", "1"])
                    .args([&flag, &bad.flag])
                    .args(["--model", "/nonexistent/model"])
                    .output()
                    .unwrap(),
                &format!("bench flags, {what}"),
            );
            assert_eq!(
                line,
                format!("{}: {message}", flag_name(bad.field)),
                "{what}"
            );
        }

        // The API: 422, the field named, the same words.
        if let Some(value) = bad.json {
            let mut body = json!({ "id": "door", "source": "rtsp://127.0.0.1:9/cam" });
            body[bad.field] = value;
            let (status, data) = served::request(
                server.addr,
                "POST",
                "/api/streams",
                &body.to_string(),
                Duration::from_secs(10),
            );
            let text = String::from_utf8_lossy(&data).into_owned();
            assert_eq!(status, 422, "{what}: {text}");
            let answer: Value = serde_json::from_str(&text[text.find("\r\n\r\n").unwrap() + 4..])
                .unwrap_or_else(|e| panic!("{what}: {e}: {text}"));
            assert_eq!(answer["field"], bad.field, "{what}: {answer}");
            assert_eq!(
                answer["error"],
                format!("{}: {message}", bad.field),
                "{what}"
            );
        }
    }
}
