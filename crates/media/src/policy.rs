//! Which sources an untrusted caller (the HTTP API) may open, and the FFmpeg options that
//! keep an allowed source from reaching anything else.
//!
//! FFmpeg opens far more than video: local files, devices, `pipe:`, `data:`, `concat:`,
//! `subfile:`, `lavfi` graphs, and playlists (HLS, ffconcat) whose entries name further files
//! and URLs. A source given on the command line is the operator's own choice and opens
//! unrestricted; a source sent to the HTTP API is a stranger's, so it passes
//! [`SourcePolicy::check`] first:
//!
//! - only network schemes that carry live video (rtsp, rtsps, http, https, srt, udp, rtp);
//! - no host that resolves to a link-local address (169.254.0.0/16, fe80::/10), where cloud
//!   metadata services answer. The host is split the way FFmpeg's `av_url_split` splits it
//!   and resolved through getaddrinfo, as FFmpeg does, so odd spellings (`2852039166`,
//!   `0xa9.0xfe.0xa9.0xfe`, `::ffff:169.254.169.254`) resolve to what they really are;
//! - local files only inside `--media-dir`, after symlinks and `..` are resolved, and opened
//!   by that resolved path, so what was checked is what FFmpeg opens;
//! - a [`Restrictions`] per scheme: FFmpeg's `protocol_whitelist` and `format_whitelist`,
//!   which FFmpeg applies to everything the input opens in turn (HLS segments and keys,
//!   nested demuxers), so an allowed playlist cannot pull in a local file or another
//!   protocol.
//!
//! Not covered, because FFmpeg gives no hook for it: where an allowed network source leads
//! on its own. An HTTP redirect, an RTSP redirect or an HLS segment URL may name a
//! link-local host (over the same allowed protocols), and a name may resolve differently
//! when FFmpeg connects than when it was checked (DNS rebinding). A host that must never
//! reach cloud metadata also needs an egress rule (e.g. dropping 169.254.0.0/16 for the
//! server's user).

use std::io;
use std::net::{IpAddr, ToSocketAddrs};
use std::path::{Component, Path, PathBuf};

use crate::{SourceConfig, SourceSpec};

/// Which sources an untrusted caller (the HTTP API) may open.
#[derive(Debug, Clone, Default)]
pub struct SourcePolicy {
    /// `--media-dir`: local files are allowed inside it only; `None` allows no local files.
    pub media_dir: Option<PathBuf>,
}

/// A source that passed the policy: what to open, and how to keep it from reaching further.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    pub spec: SourceSpec,
    pub restrictions: Restrictions,
}

/// FFmpeg open options that keep an allowed source from reaching anything else.
///
/// The default restricts nothing (sources from the command line).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Restrictions {
    /// FFmpeg's `protocol_whitelist`: the URL protocols the input and everything it opens
    /// in turn may use.
    pub protocol_whitelist: Option<String>,
    /// FFmpeg's `format_whitelist`: the demuxers that may read the input or anything nested
    /// in it. An entry matches a demuxer with several names by any of them (`mp4` matches
    /// `mov,mp4,m4a,3gp,3g2,mj2`).
    pub format_whitelist: Option<String>,
}

/// Why a source was refused, in one line that also says what is allowed. Credentials in a
/// URL are never repeated.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("the source is empty: give an rtsp, rtsps, http, https, srt, udp or rtp URL, or a file inside --media-dir")]
    Empty,
    #[error("the source contains a control character or NUL: give a plain URL or file name")]
    ControlChar,
    #[error("a URL may not contain whitespace: percent-encode it (a space is %20)")]
    Whitespace,
    #[error("'{scheme}:' sources are not allowed here: use an rtsp, rtsps, http, https, srt, udp or rtp URL, or a file inside --media-dir")]
    Scheme { scheme: String },
    #[error("cameras and devices (/dev/…, a bare number) cannot be opened through the API: give a local camera to kibitz with --source")]
    Device,
    #[error("this {scheme} URL has no host: give {scheme}://host[:port]/…")]
    NoHost { scheme: String },
    #[error("host '{host}' does not resolve ({reason}): give a host name or address this server can reach")]
    Unresolved { host: String, reason: String },
    #[error("host '{host}' is link-local ({addr}), where cloud metadata services answer: link-local addresses (169.254.0.0/16, fe80::/10) are never opened")]
    LinkLocal { host: String, addr: IpAddr },
    #[error(
        "local files are off: start kibitz with --media-dir DIR to allow video files inside DIR"
    )]
    NoMediaDir,
    #[error("'{path}' is not a file inside --media-dir (paths are relative to it; links and .. may not lead out of it)")]
    NotInMediaDir { path: String },
    #[error("'{path}' is not a regular file: give a video file inside --media-dir")]
    NotAFile { path: String },
    #[error("the path of '{path}' is not valid UTF-8: rename the file")]
    NotUtf8 { path: String },
    #[error("--media-dir cannot be used ({reason}): the server's --media-dir must be an existing directory")]
    MediaDir { reason: String },
}

/// The network schemes an untrusted source may use: those that carry live video.
const SCHEMES: [&str; 7] = ["rtsp", "rtsps", "http", "https", "srt", "udp", "rtp"];

/// Demuxers for live video and video files. Left out on purpose: `concat` and `image2`
/// (they open further files by name), `lavfi` (a filter graph can read files), `sdp` (it
/// opens the RTP addresses it names), `hls` (added only for http and https, see
/// [`restrictions`]), and devices.
const VIDEO_FORMATS: &str = "mpegts,mov,mp4,matroska,webm,flv,avi,mpjpeg,mjpeg,jpeg_pipe,\
                             h264,hevc,ivf,mpeg,mxf,aac,mp3,ac3,eac3";

/// The FFmpeg whitelists for an allowed scheme (`file` for a local file).
///
/// Names as FFmpeg 5.1 has them: the `rtsp` demuxer opens its control connection over
/// `tcp` (`tls` for rtsps) and UDP transport as `rtp` over `udp`; `rtsp`/`rtsps` are not
/// protocols of their own and are listed for the reader. `https` is `tls` over `tcp`. HLS
/// fetches AES-128 segments through `crypto`, which opens the segment URL under the same
/// whitelist, so it reaches nothing new; without it encrypted HLS fails. `http` is left out
/// of https: a redirect or playlist would otherwise downgrade to plain http, which is also
/// how metadata services answer; an https playlist with http segments fails, and its http
/// URL can be given instead. The aac/mp3/ac3/eac3 demuxers are in [`VIDEO_FORMATS`] for the
/// audio renditions of HLS, which FFmpeg opens with the same format whitelist.
fn restrictions(scheme: &str) -> Restrictions {
    let (protocols, formats) = match scheme {
        "rtsp" => ("rtsp,tcp,udp,rtp", "rtsp".to_owned()),
        "rtsps" => ("rtsps,rtsp,tcp,udp,rtp,tls", "rtsp".to_owned()),
        "http" => ("http,tcp,crypto", format!("hls,{VIDEO_FORMATS}")),
        "https" => ("https,tls,tcp,crypto", format!("hls,{VIDEO_FORMATS}")),
        "srt" => ("srt,udp", VIDEO_FORMATS.to_owned()),
        "udp" => ("udp", VIDEO_FORMATS.to_owned()),
        "rtp" => ("rtp,udp", "rtp".to_owned()),
        // A local file gets no `hls`: a playlist read through `file` could name any file.
        _ => ("file", VIDEO_FORMATS.to_owned()),
    };
    Restrictions {
        protocol_whitelist: Some(protocols.to_owned()),
        format_whitelist: Some(formats),
    }
}

/// Resolves a host the way FFmpeg's `tcp` and `udp` protocols do (getaddrinfo).
type Resolve<'a> = &'a dyn Fn(&str, u16) -> io::Result<Vec<IpAddr>>;

impl SourcePolicy {
    /// Checks `source` (what the user typed) and returns the SourceSpec to open plus the
    /// FFmpeg restrictions to open it with.
    ///
    /// Blocks while a host name resolves: call it off the async runtime.
    pub fn check(&self, source: &str) -> Result<Allowed, PolicyError> {
        self.check_with(source, &|host, port| {
            Ok((host, port).to_socket_addrs()?.map(|a| a.ip()).collect())
        })
    }

    pub(crate) fn check_with(
        &self,
        source: &str,
        resolve: Resolve<'_>,
    ) -> Result<Allowed, PolicyError> {
        let source = source.trim();
        if source.is_empty() {
            return Err(PolicyError::Empty);
        }
        if source.chars().any(char::is_control) {
            return Err(PolicyError::ControlChar);
        }
        if source.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PolicyError::Device);
        }
        match scheme(source) {
            Some(s) if s.eq_ignore_ascii_case("file") => {
                let rest = &source[s.len() + 1..];
                // `file:///x` is `/x`; `file:x` is relative, like a bare `x`.
                self.check_file(source, rest.strip_prefix("//").unwrap_or(rest))
            }
            Some(s) => {
                let lower = s.to_ascii_lowercase();
                if !SCHEMES.contains(&lower.as_str()) {
                    return Err(PolicyError::Scheme { scheme: lower });
                }
                check_url(&lower, &source[s.len()..], resolve)
            }
            None => self.check_file(source, source),
        }
    }

    /// A local file: allowed only inside the media dir, and returned by its canonical path.
    fn check_file(&self, typed: &str, path: &str) -> Result<Allowed, PolicyError> {
        if is_device(Path::new(path)) {
            return Err(PolicyError::Device);
        }
        let dir = self.media_dir.as_ref().ok_or(PolicyError::NoMediaDir)?;
        let dir = std::fs::canonicalize(dir).map_err(|e| PolicyError::MediaDir {
            reason: e.to_string(),
        })?;
        // Missing and outside read the same, so a caller cannot probe which files exist.
        let outside = || PolicyError::NotInMediaDir {
            path: typed.to_owned(),
        };
        let canonical = std::fs::canonicalize(dir.join(path)).map_err(|_| outside())?;
        if !canonical.starts_with(&dir) {
            return Err(outside());
        }
        if is_device(&canonical) {
            return Err(PolicyError::Device);
        }
        if !std::fs::metadata(&canonical).is_ok_and(|m| m.is_file()) {
            return Err(PolicyError::NotAFile {
                path: typed.to_owned(),
            });
        }
        // FFmpeg takes a C string: a lossy conversion would name a different file.
        if canonical.to_str().is_none() {
            return Err(PolicyError::NotUtf8 {
                path: typed.to_owned(),
            });
        }
        Ok(Allowed {
            spec: SourceSpec::File(canonical),
            restrictions: restrictions("file"),
        })
    }
}

/// A network URL of an allowed scheme: `rest` is everything after the scheme (`://…`).
fn check_url(scheme: &str, rest: &str, resolve: Resolve<'_>) -> Result<Allowed, PolicyError> {
    if rest.chars().any(char::is_whitespace) {
        return Err(PolicyError::Whitespace);
    }
    let no_host = || PolicyError::NoHost {
        scheme: scheme.to_owned(),
    };
    let after = rest.strip_prefix("://").ok_or_else(no_host)?;
    let (host, port) = host_and_port(after);
    if host.is_empty() {
        return Err(no_host());
    }
    let shown = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let addrs = resolve(host, port.unwrap_or_else(|| default_port(scheme))).map_err(|e| {
        PolicyError::Unresolved {
            host: shown.clone(),
            reason: e.to_string(),
        }
    })?;
    if addrs.is_empty() {
        return Err(PolicyError::Unresolved {
            host: shown,
            reason: "no addresses".into(),
        });
    }
    if let Some(&addr) = addrs.iter().find(|a| is_link_local(**a)) {
        return Err(PolicyError::LinkLocal { host: shown, addr });
    }
    // FFmpeg looks protocols and the rtsp demuxer up by lower-case name only.
    let url = format!("{scheme}{rest}");
    // `parse` refuses only an empty string, which `url` is not.
    let spec = SourceSpec::parse(&url).map_err(|_| PolicyError::Empty)?;
    Ok(Allowed {
        spec,
        restrictions: restrictions(scheme),
    })
}

/// The scheme as FFmpeg finds it (`url_find_protocol`): the leading run of scheme
/// characters, followed by `:`. `subfile,…:` is FFmpeg's one exception.
fn scheme(s: &str) -> Option<&str> {
    if s.starts_with("subfile,") {
        return Some("subfile");
    }
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || "+-.".contains(c)))
        .unwrap_or(s.len());
    (end > 0 && s[end..].starts_with(':')).then(|| &s[..end])
}

/// Host and port of `authority[/path…]` exactly as FFmpeg's `av_url_split` reads them: the
/// authority ends at the first `/`, `?` or `#`, credentials end at its last `@`, and an IPv6
/// host is bracketed. The host is not percent-decoded, as FFmpeg does not decode it.
fn host_and_port(after_scheme: &str) -> (&str, Option<u16>) {
    let end = after_scheme
        .find(['/', '?', '#'])
        .unwrap_or(after_scheme.len());
    let authority = &after_scheme[..end];
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some((host, tail)) = hostport
        .strip_prefix('[')
        .and_then(|inner| inner.split_once(']'))
    {
        return (host, tail.strip_prefix(':').and_then(leading_number));
    }
    match hostport.split_once(':') {
        Some((host, port)) => (host, leading_number(port)),
        None => (hostport, None),
    }
}

/// The digits at the start of `s` as a port, as C's `atoi` reads them (`80abc` is 80).
fn leading_number(s: &str) -> Option<u16> {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    s[..end].parse().ok()
}

/// FFmpeg's default ports; the protocols without one are resolved with port 0 (only the
/// host matters here).
fn default_port(scheme: &str) -> u16 {
    match scheme {
        "rtsp" => 554,
        "rtsps" => 322,
        "http" => 80,
        "https" => 443,
        _ => 0,
    }
}

/// Link-local, where cloud metadata answers (169.254.169.254, fe80::…), also when written
/// as an IPv4-mapped or IPv4-compatible IPv6 address, which reaches the IPv4 host.
fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => {
            v6.is_unicast_link_local() || v6.to_ipv4().is_some_and(|v4| v4.is_link_local())
        }
    }
}

/// Device and kernel trees: never a video file, whatever the media dir.
fn is_device(path: &Path) -> bool {
    let mut parts = path.components();
    parts.next() == Some(Component::RootDir)
        && matches!(parts.next(), Some(Component::Normal(top)) if ["dev", "proc", "sys"].iter().any(|d| top == *d))
}

/// A config that opens the allowed source with its restrictions.
impl From<Allowed> for SourceConfig {
    fn from(allowed: Allowed) -> Self {
        let mut config = SourceConfig::new(allowed.spec);
        config.restrictions = allowed.restrictions;
        config
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::{CStr, CString};
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    /// A resolver that answers from a table and never touches the network.
    fn table(host: &str, _port: u16) -> io::Result<Vec<IpAddr>> {
        match host {
            "cam.local" => Ok(vec![IpAddr::V4(Ipv4Addr::new(192, 168, 1, 20))]),
            "metadata.google.internal" => Ok(vec![
                IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
            ]),
            "empty.example" => Ok(vec![]),
            _ => Err(io::Error::other("Name or service not known")),
        }
    }

    fn check(s: &str) -> Result<Allowed, PolicyError> {
        SourcePolicy::default().check_with(s, &table)
    }

    #[test]
    fn host_and_port_split_like_ffmpeg() {
        assert_eq!(host_and_port("h:8554/x"), ("h", Some(8554)));
        assert_eq!(host_and_port("u:p@h/x"), ("h", None));
        assert_eq!(host_and_port("a@b@h:1/x@y"), ("h", Some(1)));
        assert_eq!(host_and_port("[fe80::1]:80/x"), ("fe80::1", Some(80)));
        assert_eq!(host_and_port("[::1]"), ("::1", None));
        // The authority ends at `?` or `#` too: this one connects to `evil`.
        assert_eq!(host_and_port("evil#@127.0.0.1/"), ("evil", None));
        assert_eq!(host_and_port("evil?@127.0.0.1/"), ("evil", None));
        assert_eq!(host_and_port("h:80abc/"), ("h", Some(80)));
        assert_eq!(host_and_port("@:1234"), ("", Some(1234)));
        assert_eq!(host_and_port(""), ("", None));
    }

    #[test]
    fn schemes_found_like_ffmpeg() {
        assert_eq!(scheme("concat:a|b"), Some("concat"));
        assert_eq!(scheme("crypto+http://h/"), Some("crypto+http"));
        assert_eq!(
            scheme("subfile,,start,0,end,9,,:/etc/passwd"),
            Some("subfile")
        );
        assert_eq!(scheme("clip.mp4"), None);
        assert_eq!(scheme("/tmp/a:b.mp4"), None);
        assert_eq!(scheme(":x"), None);
    }

    #[test]
    fn link_local_in_every_spelling() {
        for ip in [
            "169.254.169.254",
            "169.254.0.1",
            "fe80::1",
            "febf::1",
            "::ffff:169.254.169.254",
            "::169.254.169.254",
        ] {
            assert!(is_link_local(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "127.0.0.1",
            "10.0.0.1",
            "::1",
            "::",
            "fec0::1",
            "2001:db8::1",
        ] {
            assert!(!is_link_local(ip.parse().unwrap()), "{ip}");
        }
        assert!(!is_link_local(IpAddr::V6(Ipv6Addr::LOCALHOST)));
    }

    #[test]
    fn every_resolved_address_is_checked() {
        assert_eq!(
            check("http://metadata.google.internal/computeMetadata/v1/"),
            Err(PolicyError::LinkLocal {
                host: "metadata.google.internal".into(),
                addr: IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
            })
        );
    }

    #[test]
    fn unresolvable_hosts_are_refused_with_the_reason() {
        let e = check("rtsp://nowhere.example/x").unwrap_err();
        assert_eq!(
            e,
            PolicyError::Unresolved {
                host: "nowhere.example".into(),
                reason: "Name or service not known".into()
            }
        );
        assert!(matches!(
            check("http://empty.example/"),
            Err(PolicyError::Unresolved { .. })
        ));
    }

    #[test]
    fn scheme_is_lowered_and_credentials_kept_for_ffmpeg_only() {
        let a = check("RTSP://admin:secret@cam.local:554/live").unwrap();
        assert_eq!(
            a.spec,
            SourceSpec::Rtsp("rtsp://admin:secret@cam.local:554/live".into())
        );
        assert_eq!(a.spec.to_string(), "rtsp://***@cam.local:554/live");
        assert_eq!(a.restrictions, restrictions("rtsp"));
    }

    #[test]
    fn refusals_do_not_repeat_credentials() {
        for s in [
            "rtsp://admin:secret@nowhere.example/x",
            "http://admin:secret@169.254.169.254/",
            "http://admin:secret@/x",
            "ftp://admin:secret@cam.local/",
            "http://admin:secret@cam.local/a b",
        ] {
            let message = check(s).unwrap_err().to_string();
            assert!(!message.contains("secret"), "{s}: {message}");
            assert!(!message.contains('\n'), "{s}: {message}");
        }
    }

    #[test]
    fn only_digits_is_a_camera() {
        assert_eq!(check("0"), Err(PolicyError::Device));
        assert_eq!(check("12"), Err(PolicyError::Device));
    }

    #[test]
    fn device_trees() {
        for p in ["/dev/video0", "/dev", "/proc/self/environ", "/sys/x"] {
            assert!(is_device(Path::new(p)), "{p}");
        }
        for p in ["/devices/x.mp4", "/srv/dev/x.mp4", "dev/x.mp4"] {
            assert!(!is_device(Path::new(p)), "{p}");
        }
    }

    /// Every name in the whitelists is one FFmpeg 5.1 knows, so a typo cannot silently
    /// refuse a kind of source.
    #[test]
    fn whitelists_name_real_protocols_and_demuxers() {
        crate::init();
        let mut protocols = Vec::new();
        let mut opaque = std::ptr::null_mut();
        loop {
            // SAFETY: `avio_enum_protocols` walks a static table through `opaque` and returns
            // static C strings, or null at the end.
            let name = unsafe { ffmpeg_next::ffi::avio_enum_protocols(&mut opaque, 0) };
            if name.is_null() {
                break;
            }
            // SAFETY: non-null names point at static NUL-terminated strings.
            protocols.push(unsafe { CStr::from_ptr(name) }.to_str().unwrap().to_owned());
        }
        for scheme in SCHEMES.iter().copied().chain(["file"]) {
            let r = restrictions(scheme);
            for p in r.protocol_whitelist.as_deref().unwrap().split(',') {
                // rtsp is a demuxer, not a protocol: listed for the reader only.
                assert!(
                    protocols.iter().any(|k| k == p) || p.starts_with("rtsp"),
                    "{scheme}: no protocol {p}"
                );
            }
            for f in r.format_whitelist.as_deref().unwrap().split(',') {
                let name = CString::new(f).unwrap();
                // SAFETY: a valid C string in, a pointer to a static demuxer (or null) out.
                let found = unsafe { ffmpeg_next::ffi::av_find_input_format(name.as_ptr()) };
                assert!(!found.is_null(), "{scheme}: no demuxer {f}");
            }
        }
    }

    #[test]
    fn playlist_formats_stay_out_of_local_files() {
        let file = restrictions("file").format_whitelist.unwrap();
        for f in ["hls", "concat", "image2", "lavfi", "sdp", "dash"] {
            assert!(!file.split(',').any(|x| x == f), "{f}");
        }
        let http = restrictions("http").format_whitelist.unwrap();
        assert!(http.split(',').any(|x| x == "hls"));
    }
}
