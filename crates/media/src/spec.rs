//! What the user typed after `--source`, sorted into the kinds that behave differently.

use std::fmt;
use std::path::PathBuf;

use crate::Error;

/// A video source. Files are finite and get looped; everything else is live and gets
/// reconnected when it drops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// A video file, played at its native rate, looping.
    File(PathBuf),
    /// A V4L2 camera (`/dev/videoN`; a bare number `N` means the same).
    Webcam(PathBuf),
    /// `rtsp://` or `rtsps://` (read over TCP).
    Rtsp(String),
    /// `http://` or `https://`: MJPEG, MPEG-TS, HLS or anything else FFmpeg reads over HTTP.
    Http(String),
    /// Any other URL FFmpeg understands (`srt://`, `udp://`, `rtmp://`, …), treated as live.
    Url(String),
}

impl SourceSpec {
    /// Sorts `s` into a kind. Only an empty string is refused here; whether the source
    /// exists is found out when it is opened.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let s = s.trim();
        if s.is_empty() {
            return Err(Error::BadSpec(s.to_owned()));
        }
        let lower = s.to_ascii_lowercase();
        let spec = if lower.starts_with("rtsp://") || lower.starts_with("rtsps://") {
            SourceSpec::Rtsp(s.to_owned())
        } else if lower.starts_with("http://") || lower.starts_with("https://") {
            SourceSpec::Http(s.to_owned())
        } else if let Some(path) = s
            .strip_prefix("file://")
            .or_else(|| s.strip_prefix("file:"))
        {
            SourceSpec::File(PathBuf::from(path))
        } else if s.starts_with("/dev/video") {
            SourceSpec::Webcam(PathBuf::from(s))
        } else if !s.is_empty() && s.len() <= 3 && s.bytes().all(|b| b.is_ascii_digit()) {
            SourceSpec::Webcam(PathBuf::from(format!("/dev/video{s}")))
        } else if has_scheme(s) {
            SourceSpec::Url(s.to_owned())
        } else {
            SourceSpec::File(PathBuf::from(s))
        };
        Ok(spec)
    }

    /// Live sources are reconnected when they drop; files are looped.
    pub fn is_live(&self) -> bool {
        !matches!(self, SourceSpec::File(_))
    }

    /// `file`, `webcam`, `rtsp`, `http` or `url`.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceSpec::File(_) => "file",
            SourceSpec::Webcam(_) => "webcam",
            SourceSpec::Rtsp(_) => "rtsp",
            SourceSpec::Http(_) => "http",
            SourceSpec::Url(_) => "url",
        }
    }

    /// What FFmpeg is given to open.
    pub(crate) fn target(&self) -> String {
        match self {
            SourceSpec::File(p) | SourceSpec::Webcam(p) => p.to_string_lossy().into_owned(),
            SourceSpec::Rtsp(u) | SourceSpec::Http(u) | SourceSpec::Url(u) => u.clone(),
        }
    }
}

/// `scheme://…` with a plausible scheme, so `C:/x` or `my:file.mp4` stay paths.
fn has_scheme(s: &str) -> bool {
    match s.split_once("://") {
        Some((scheme, _)) => {
            scheme.len() >= 2
                && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        }
        None => false,
    }
}

/// Shown in status, logs and errors: the URL with any `user:password@` replaced by `***@`
/// and the value of every query parameter that names a secret (`token`, `password`, `key`,
/// `sig`, … see [`is_secret_name`]) replaced by `***`. This is the one place a source is
/// masked; everything that shows or logs a source goes through it.
impl fmt::Display for SourceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let target = self.target();
        if !self.is_live() {
            return f.write_str(&target);
        }
        let Some((scheme, rest)) = target.split_once("://") else {
            return f.write_str(&target);
        };
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        write!(f, "{scheme}://")?;
        match authority.rfind('@') {
            Some(at) => write!(f, "***{}", &authority[at..])?,
            None => f.write_str(authority)?,
        }
        let (before_fragment, fragment) = match tail.find('#') {
            Some(i) => tail.split_at(i),
            None => (tail, ""),
        };
        let Some((path, query)) = before_fragment.split_once('?') else {
            return f.write_str(tail);
        };
        write!(f, "{path}?")?;
        for (i, pair) in query.split('&').enumerate() {
            if i > 0 {
                f.write_str("&")?;
            }
            match pair.split_once('=') {
                Some((name, _)) if is_secret_name(name) => write!(f, "{name}=***")?,
                _ => f.write_str(pair)?,
            }
        }
        f.write_str(fragment)
    }
}

/// Whether a query parameter's name says its value is a credential: signed URLs
/// (`sig`, `X-Amz-Signature`, `X-Amz-Credential`), tokens (`token`, `access_token`,
/// `auth`), passwords and keys (`password`, `pwd`, `apikey`, `secret`). Case, `-`, `_` and
/// `.` are ignored, and a name ending in one of these counts (`api_key`, `sessionToken`).
fn is_secret_name(name: &str) -> bool {
    const SECRET: [&str; 14] = [
        "token",
        "password",
        "passwd",
        "pass",
        "pwd",
        "secret",
        "key",
        "sig",
        "signature",
        "credential",
        "auth",
        "authorization",
        "session",
        "sessionid",
    ];
    let name: String = name
        .chars()
        .filter(|c| !"-_.".contains(*c))
        .map(|c| c.to_ascii_lowercase())
        .collect();
    SECRET.iter().any(|s| name.ends_with(s))
}

impl std::str::FromStr for SourceSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> SourceSpec {
        SourceSpec::parse(s).unwrap()
    }

    #[test]
    fn kinds() {
        assert_eq!(p("clip.mp4"), SourceSpec::File("clip.mp4".into()));
        assert_eq!(p(" /tmp/a b.mkv "), SourceSpec::File("/tmp/a b.mkv".into()));
        assert_eq!(
            p("file:///tmp/x.mp4"),
            SourceSpec::File("/tmp/x.mp4".into())
        );
        assert_eq!(p("/dev/video0"), SourceSpec::Webcam("/dev/video0".into()));
        assert_eq!(p("2"), SourceSpec::Webcam("/dev/video2".into()));
        assert_eq!(
            p("rtsp://cam.local:554/stream"),
            SourceSpec::Rtsp("rtsp://cam.local:554/stream".into())
        );
        assert_eq!(p("RTSPS://x/y"), SourceSpec::Rtsp("RTSPS://x/y".into()));
        assert_eq!(
            p("http://h/x.mjpg"),
            SourceSpec::Http("http://h/x.mjpg".into())
        );
        assert_eq!(
            p("https://h/live.m3u8"),
            SourceSpec::Http("https://h/live.m3u8".into())
        );
        assert_eq!(p("srt://h:9000"), SourceSpec::Url("srt://h:9000".into()));
        assert_eq!(p("udp://@:1234"), SourceSpec::Url("udp://@:1234".into()));
        assert_eq!(
            p("weird:name.mp4"),
            SourceSpec::File("weird:name.mp4".into())
        );
    }

    #[test]
    fn live_and_kind_names() {
        assert!(!p("a.mp4").is_live());
        for s in ["/dev/video1", "rtsp://a/b", "http://a/b", "srt://a:1"] {
            assert!(p(s).is_live(), "{s}");
        }
        assert_eq!(p("a.mp4").kind(), "file");
        assert_eq!(p("rtsp://a/b").kind(), "rtsp");
        assert_eq!(p("http://a/b").to_string(), "http://a/b");
        assert_eq!("3".parse::<SourceSpec>().unwrap().kind(), "webcam");
    }

    #[test]
    fn credentials_are_hidden_when_shown() {
        let s = p("rtsp://admin:secret@cam.local:554/live?x=a@b");
        assert_eq!(s.to_string(), "rtsp://***@cam.local:554/live?x=a@b");
        assert_eq!(s.target(), "rtsp://admin:secret@cam.local:554/live?x=a@b");
        assert_eq!(p("http://u@h/x").to_string(), "http://***@h/x");
        assert_eq!(p("http://h/x@y").to_string(), "http://h/x@y");
        assert_eq!(p("/tmp/a@b.mp4").to_string(), "/tmp/a@b.mp4");
    }

    #[test]
    fn query_secrets_are_hidden_when_shown() {
        let s = p("https://h/live.m3u8?token=t0p&password=pw&key=k1&sig=s1&res=720#frag");
        assert_eq!(
            s.to_string(),
            "https://h/live.m3u8?token=***&password=***&key=***&sig=***&res=720#frag"
        );
        assert_eq!(
            p("rtsp://u:p@cam/x?access_token=a&X-Amz-Signature=b&apiKey=c&channel=1").to_string(),
            "rtsp://***@cam/x?access_token=***&X-Amz-Signature=***&apiKey=***&channel=1"
        );
        assert_eq!(
            p("http://h?auth=a&flag&pwd=").to_string(),
            "http://h?auth=***&flag&pwd=***"
        );
        // What FFmpeg opens keeps them.
        assert_eq!(
            s.target(),
            "https://h/live.m3u8?token=t0p&password=pw&key=k1&sig=s1&res=720#frag"
        );
        // Not a secret: left as typed.
        assert_eq!(
            p("http://h/x?keyframes=1&page=2").to_string(),
            "http://h/x?keyframes=1&page=2"
        );
    }

    #[test]
    fn empty_is_refused() {
        assert!(matches!(SourceSpec::parse("  "), Err(Error::BadSpec(_))));
    }
}
