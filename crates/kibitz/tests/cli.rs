//! The `kibitz` binary as a user runs it: the real engine on the tiny model, real files,
//! real exit codes and messages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

mod fixture;
use fixture::fixture;

fn kibitz() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kibitz"));
    // One llama.cpp thread: tests run side by side on small machines.
    // WebRTC on a free UDP port: servers of tests side by side would share 8199.
    cmd.env("THREADS", "1")
        .env("WEBRTC_PORT", "0")
        .env("LOG", "warn")
        .env_remove("MODEL_PATH")
        .env_remove("ENGINE");
    cmd
}

/// The tiny model, written once by `kibitz selftest --keep` (which is itself a test of it).
fn tiny_model() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let keep = dir.path().join("tiny");
        let out = kibitz()
            .arg("selftest")
            .arg("--keep")
            .arg(&keep)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "selftest failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.lines().any(|l| l == "PASS"), "{stdout}");
        assert!(stdout.contains("backend: CPU"), "{stdout}");
        (dir, keep)
    })
    .1
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn selftest_passes_and_keeps_a_loadable_model() {
    let dir = tiny_model();
    let names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().any(|n| n.contains("mmproj")), "{names:?}");
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn describe_streams_text_and_stats() {
    let out = kibitz()
        .args(["describe", "--max-tokens", "8", "--model"])
        .arg(tiny_model())
        .arg(fixture("photo.jpg"))
        .arg(fixture("gray.png"))
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(!stdout.trim().is_empty(), "some text on stdout");
    assert!(stderr.contains("2 images (128 image tokens)"), "{stderr}");
}

#[test]
fn describe_json_is_one_object_with_text_and_stats() {
    let out = kibitz()
        .args(["describe", "--json", "--max-tokens", "6", "--model"])
        .arg(tiny_model())
        .arg(fixture("wide.png"))
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert!(v["text"].is_string());
    assert_eq!(v["stats"]["images"], 1);
    assert!(v["stats"]["generated_tokens"].as_u64().unwrap() <= 6);
    assert_eq!(v["engine"]["kind"], "llama");
}

/// One `kibitz: …` line on stderr, a failure exit, no panic.
fn assert_clean_failure(out: &Output, needle: &str) {
    let (_, stderr) = text(out);
    assert!(!out.status.success(), "should fail: {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "{stderr}"
    );
    let line = stderr
        .lines()
        .find(|l| l.starts_with("kibitz: "))
        .unwrap_or_else(|| panic!("no kibitz: line in {stderr}"));
    assert!(stderr.contains(needle), "expected {needle:?} in {line}");
}

#[test]
fn bad_models_fail_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("model.gguf");
    std::fs::write(&garbage, b"not a model").unwrap();
    let photo = fixture("photo.jpg");
    let run = |model: &Path| {
        kibitz()
            .args(["describe", "--model"])
            .arg(model)
            .arg(&photo)
            .output()
            .unwrap()
    };
    assert_clean_failure(&run(&dir.path().join("nope.gguf")), "is neither a file");
    assert_clean_failure(&run(dir.path()), "no vision projector");
    let out = kibitz()
        .args(["describe", "--model"])
        .arg(&garbage)
        .arg("--mmproj")
        .arg(&garbage)
        .arg(&photo)
        .output()
        .unwrap();
    assert_clean_failure(&out, "GGUF magic");
    // No network: the hub is unreachable, and the one line says where to put the files and
    // how to fetch them.
    let out = kibitz()
        .args([
            "describe",
            "--model",
            "openbmb/MiniCPM-o-4_5-gguf",
            "--cache-dir",
        ])
        .arg(dir.path())
        .arg(&photo)
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert_clean_failure(
        &out,
        "run `kibitz models pull openbmb/MiniCPM-o-4_5-gguf --quant Q4_K_M`",
    );
    assert_clean_failure(&out, "openbmb--MiniCPM-o-4_5-gguf");
}

#[test]
fn bad_images_and_flags_fail_cleanly() {
    let model = tiny_model();
    let out = kibitz()
        .args(["describe", "--model"])
        .arg(model)
        .arg("/nonexistent.jpg")
        .output()
        .unwrap();
    assert_clean_failure(&out, "/nonexistent.jpg");
    let out = kibitz()
        .args(["describe", "--model"])
        .arg(model)
        .arg(fixture("not-image.png"))
        .output()
        .unwrap();
    assert_clean_failure(&out, "not-image.png");
    let out = kibitz()
        .args(["serve", "--source"])
        .arg(fixture("bigbuckbunny.mp4"))
        .args(["--frame-stride", "0", "--capture-fps", "-2"])
        .output()
        .unwrap();
    assert_clean_failure(&out, "FRAME_STRIDE");
    assert!(
        text(&out).1.contains("--capture-fps"),
        "both problems reported"
    );
    let out = kibitz()
        .args([
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--source",
            "/nonexistent.mp4",
            "--model",
        ])
        .arg(model)
        .output()
        .unwrap();
    assert_clean_failure(&out, "/nonexistent.mp4");
    let out = kibitz()
        .args(["serve", "--bind", "127.0.0.1:0", "--source"])
        .arg(fixture("not-video.mp4"))
        .arg("--model")
        .arg(model)
        .output()
        .unwrap();
    assert_clean_failure(&out, "not-video.mp4");
}

#[test]
fn every_stream_that_cannot_start_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = kibitz()
        .args([
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--engine",
            "openai",
            "--engine-url",
            "http://127.0.0.1:9",
            "--source",
            "door=/nonexistent-door.mp4",
            "--source",
            "gate=/nonexistent-gate.mp4",
            "--state-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_clean_failure(&out, "stream 'door'");
    assert!(text(&out).1.contains("stream 'gate'"), "{}", text(&out).1);

    // Beyond loopback, changes need a token unless the user says otherwise.
    let out = kibitz()
        .args(["serve", "--bind", "0.0.0.0:0", "--source"])
        .arg(fixture("bigbuckbunny.mp4"))
        .output()
        .unwrap();
    assert_clean_failure(&out, "--allow-no-token");
    let out = kibitz()
        .args(["serve", "--token-for-viewing", "--source"])
        .arg(fixture("bigbuckbunny.mp4"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).1.contains("--token"), "{}", text(&out).1);
}

/// The connection and browser flags are checked with the rest, every problem named at
/// once, before any model loads.
#[test]
fn bad_http_flags_fail_with_every_problem_named() {
    let out = kibitz()
        .args(["serve", "--bind", "127.0.0.1:0", "--source"])
        .arg(fixture("bigbuckbunny.mp4"))
        .args([
            "--idle-timeout",
            "0",
            "--max-connections",
            "0",
            "--allowed-origin",
            "panel.example",
            "--allowed-host",
            "evil/x",
            "--tls-cert",
            "/nonexistent-cert.pem",
            "--tls-key",
            "/nonexistent-key.pem",
        ])
        .output()
        .unwrap();
    assert_clean_failure(&out, "--idle-timeout");
    let (_, stderr) = text(&out);
    for needle in [
        "--max-connections",
        "--allowed-origin 'panel.example'",
        "--allowed-host 'evil/x'",
        "/nonexistent-cert.pem",
    ] {
        assert!(stderr.contains(needle), "{needle} missing from {stderr}");
    }
    // One without the other is a usage error.
    let out = kibitz()
        .args(["serve", "--tls-cert", "/x.pem"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).1.contains("--tls-key"), "{}", text(&out).1);
}
