//! `kibitz healthcheck`: one `GET /healthz` to a running `kibitz serve`, for a container's
//! HEALTHCHECK (slim images have no curl). Exit 0 on a 200 in time; else 1 and one line.
//!
//! Plain HTTP/1.1 over a socket: the server is local and answers a short status line, so
//! no HTTP client is worth its weight here.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::flags::HealthcheckArgs;

pub async fn run(args: HealthcheckArgs) -> anyhow::Result<ExitCode> {
    let url = url(&args)?;
    if !(args.timeout.is_finite() && args.timeout > 0.0 && args.timeout <= 3600.0) {
        bail!(
            "--timeout (HEALTHCHECK_TIMEOUT) {} must be seconds above 0, at most an hour",
            args.timeout
        );
    }
    let timeout = Duration::from_secs_f64(args.timeout);
    let shown = format!("http://{}{}", url.host, url.path);
    let answer = tokio::task::spawn_blocking(move || probe(&url, timeout)).await?;
    match answer {
        Ok(200) => Ok(ExitCode::SUCCESS),
        Ok(code) => {
            eprintln!("kibitz: unhealthy: {shown} answered {code}");
            Ok(ExitCode::FAILURE)
        }
        Err(e) => {
            eprintln!("kibitz: unhealthy: {shown}: {e:#}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Where to ask: `host:port` and the path.
#[derive(Debug, PartialEq)]
struct Target {
    host: String,
    path: String,
}

/// `--url` (`/healthz` added when it names no path), or the `--bind` address, where an
/// address that listens on every interface is asked on loopback.
fn url(args: &HealthcheckArgs) -> anyhow::Result<Target> {
    if let Some(url) = &args.url {
        let rest = url
            .strip_prefix("http://")
            .with_context(|| format!("--url (HEALTHCHECK_URL) '{url}' is not an http:// URL"))?;
        let (host, path) = match rest.find('/') {
            Some(i) if i + 1 < rest.len() => (&rest[..i], &rest[i..]),
            Some(i) => (&rest[..i], "/healthz"),
            None => (rest, "/healthz"),
        };
        if host.is_empty() {
            bail!("--url (HEALTHCHECK_URL) '{url}' names no host");
        }
        let host = if host.contains(':') && !host.ends_with(']') {
            host.to_string()
        } else {
            format!("{host}:80")
        };
        return Ok(Target {
            host,
            path: path.to_string(),
        });
    }
    let mut addr: SocketAddr = args.bind.parse().with_context(|| {
        format!(
            "--bind (BIND) '{}' is not an address like 127.0.0.1:8199",
            args.bind
        )
    })?;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    Ok(Target {
        host: addr.to_string(),
        path: "/healthz".into(),
    })
}

/// The status code of `GET path`, all within `timeout`.
fn probe(target: &Target, timeout: Duration) -> anyhow::Result<u16> {
    let deadline = Instant::now() + timeout;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .context("no answer in time")
    };
    let addr = target
        .host
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {}", target.host))?
        .next()
        .with_context(|| format!("{} has no address", target.host))?;
    let mut stream = TcpStream::connect_timeout(&addr, left()?)?;
    stream.set_write_timeout(Some(left()?))?;
    write!(
        stream,
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nUser-Agent: kibitz-healthcheck\r\n\r\n",
        target.path, target.host
    )?;
    // The status line is all that is needed.
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 4096 {
        stream.set_read_timeout(Some(left()?))?;
        match stream.read(&mut buf)? {
            0 => break,
            n => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or("");
    line.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .filter(|_| line.starts_with("HTTP/"))
        .with_context(|| format!("not an HTTP answer: {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(url: Option<&str>, bind: &str) -> HealthcheckArgs {
        HealthcheckArgs {
            url: url.map(String::from),
            bind: bind.into(),
            timeout: 1.0,
        }
    }

    fn target(host: &str, path: &str) -> Target {
        Target {
            host: host.into(),
            path: path.into(),
        }
    }

    #[test]
    fn the_address_comes_from_the_url_or_from_bind() {
        let url = |u, b| super::url(&args(u, b)).unwrap();
        assert_eq!(
            url(None, "0.0.0.0:8199"),
            target("127.0.0.1:8199", "/healthz")
        );
        assert_eq!(url(None, "[::]:9000"), target("[::1]:9000", "/healthz"));
        assert_eq!(
            url(Some("http://127.0.0.1:8199"), "x"),
            target("127.0.0.1:8199", "/healthz")
        );
        assert_eq!(
            url(Some("http://kibitz:1/readyz"), "x"),
            target("kibitz:1", "/readyz")
        );
        assert_eq!(
            url(Some("http://kibitz/"), "x"),
            target("kibitz:80", "/healthz")
        );
        for bad in [Some("https://x"), Some("http://"), None] {
            assert!(super::url(&args(bad, "nowhere")).is_err(), "{bad:?}");
        }
    }
}
