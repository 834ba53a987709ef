//! A `kibitz serve` process for end-to-end tests: the tiny model written for it, its state
//! in a folder of its own, its address read from its first line, killed on drop.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `kibitz serve` on the tiny model, answers of 8 tokens, with these extra arguments.
pub fn start(args: &[String], interval: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let out = Command::new(env!("CARGO_BIN_EXE_kibitz"))
        .args(["make-test-model", "--size", "tiny"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut all: Vec<String> = ["--max-tokens", "8", "--inference-interval", interval]
        .map(String::from)
        .to_vec();
    all.extend_from_slice(args);
    all.push("--model".into());
    all.push(model.display().to_string());
    spawn(dir, &all, &[])
}

/// `kibitz serve --bind 127.0.0.1:0` with `args` and `env`, its state and history in `dir`.
pub fn spawn(dir: tempfile::TempDir, args: &[String], env: &[(&str, String)]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kibitz"))
        .args(["serve", "--bind", "127.0.0.1:0"])
        .args(args)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--history")
        .arg(dir.path().join("history.sqlite"))
        .env("THREADS", "1")
        // WebRTC on a free UDP port: servers of tests side by side would share 8199.
        .env("WEBRTC_PORT", "0")
        .env("LOG", "warn")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = address(&mut child);
    Server {
        child,
        addr,
        _dir: dir,
    }
}

/// The address a `kibitz serve` child announces on its first line of output.
pub fn address(child: &mut Child) -> SocketAddr {
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    line.split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .parse()
        .unwrap()
}

/// One HTTP/1.1 request; the status and every byte read within `how_long` (headers
/// included), for streaming responses too.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    how_long: Duration,
) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let end = Instant::now() + how_long;
    let mut data = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    while Instant::now() < end {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("{path}: {e}"),
        }
    }
    let status = String::from_utf8_lossy(&data[..data.len().min(12)])
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, data)
}

/// A `GET` read for `how_long`.
pub fn read_for(addr: SocketAddr, path: &str, how_long: Duration) -> Vec<u8> {
    request(addr, "GET", path, "", how_long).1
}
