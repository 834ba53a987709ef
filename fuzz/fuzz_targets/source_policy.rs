//! A source sent to the HTTP API, through the policy that decides what a stranger may open.
//! Names resolve to a fixed mix of addresses (link-local among them), numbers as
//! getaddrinfo reads them. Besides not panicking: an allowed URL's host, split by FFmpeg's
//! own `av_url_split`, is a host the policy checked and found not link-local; an allowed
//! file lies inside the media dir; the URL as shown, split the same way, has its
//! credentials masked.
#![no_main]

use std::cell::RefCell;
use std::ffi::{CStr, CString};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::OnceLock;

use kibitz_media::fuzzing::check_source;
use kibitz_media::{SourcePolicy, SourceSpec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    let dir = media_dir();
    let policy = SourcePolicy {
        media_dir: Some(dir.clone()),
    };
    let checked: RefCell<Vec<(String, Vec<IpAddr>)>> = RefCell::default();
    let resolve = |host: &str, _port: u16| {
        let addrs = resolve(host)?;
        checked.borrow_mut().push((host.to_owned(), addrs.clone()));
        Ok(addrs)
    };
    let Ok(allowed) = check_source(&policy, source, &resolve) else {
        return;
    };
    let checked = checked.into_inner();
    assert!(allowed.restrictions.protocol_whitelist.is_some());
    assert!(allowed.restrictions.format_whitelist.is_some());
    match &allowed.spec {
        SourceSpec::File(path) => {
            assert!(path.starts_with(dir), "{path:?} is outside the media dir");
            assert!(path.is_file(), "{path:?} is not a file");
            assert!(checked.is_empty());
        }
        SourceSpec::Rtsp(url) | SourceSpec::Http(url) | SourceSpec::Url(url) => {
            let (auth, host) = ffmpeg_split(url);
            let addrs = checked
                .iter()
                .find(|(h, _)| *h == host)
                .map(|(_, a)| a)
                .unwrap_or_else(|| {
                    panic!("FFmpeg opens host {host:?}, the policy checked {checked:?}")
                });
            assert!(
                !addrs.iter().any(|a| link_local(*a)),
                "{host} is link-local"
            );
            if !auth.is_empty() {
                // What status pages and logs show, read back the way FFmpeg reads it.
                let shown = allowed.spec.to_string();
                let (shown_auth, _) = ffmpeg_split(&shown);
                assert_eq!(shown_auth, "***", "{shown} shows credentials");
            }
        }
        SourceSpec::Webcam(p) => panic!("a device was allowed: {p:?}"),
    }
});

/// A media dir with a file, a folder, and links that lead out of it.
fn media_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("kibitz-fuzz-media-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("clip.mp4"), b"x").unwrap();
        std::fs::write(dir.join("sub/a b.mkv"), b"x").unwrap();
        let _ = std::os::unix::fs::symlink("/etc/hostname", dir.join("out.mp4"));
        let _ = std::os::unix::fs::symlink("/dev/null", dir.join("null.mp4"));
        let _ = std::os::unix::fs::symlink("..", dir.join("up"));
        std::fs::canonicalize(dir).unwrap()
    })
}

/// Numbers as getaddrinfo reads them (`2852039166`, `0xa9.0xfe.0xa9.0xfe`, `::ffff:…`);
/// names by their bytes: none, nowhere, link-local, or ordinary addresses.
fn resolve(host: &str) -> io::Result<Vec<IpAddr>> {
    if let Some(addrs) = numeric(host) {
        return Ok(addrs);
    }
    if host.len() > 253 {
        // DNS names are at most 253 characters.
        return Err(io::Error::other("name too long"));
    }
    let sum = host.bytes().fold(0u8, |a, b| a.wrapping_add(b));
    match sum % 4 {
        0 => Err(io::Error::other("no such host")),
        1 => Ok(Vec::new()),
        2 => Ok(vec![
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
        ]),
        _ => Ok(vec![IpAddr::V6(Ipv6Addr::LOCALHOST)]),
    }
}

fn numeric(host: &str) -> Option<Vec<IpAddr>> {
    let c_host = CString::new(host).ok()?;
    let hints = libc::addrinfo {
        ai_flags: libc::AI_NUMERICHOST,
        ai_family: libc::AF_UNSPEC,
        ai_socktype: libc::SOCK_STREAM,
        ai_protocol: 0,
        ai_addrlen: 0,
        ai_addr: std::ptr::null_mut(),
        ai_canonname: std::ptr::null_mut(),
        ai_next: std::ptr::null_mut(),
    };
    let mut list: *mut libc::addrinfo = std::ptr::null_mut();
    // SAFETY: the strings are NUL-terminated and live through the call; `list` is freed below.
    if unsafe { libc::getaddrinfo(c_host.as_ptr(), std::ptr::null(), &hints, &mut list) } != 0 {
        return None;
    }
    let mut addrs = Vec::new();
    let mut at = list;
    while !at.is_null() {
        // SAFETY: `at` is a node of the list getaddrinfo returned, not yet freed.
        let info = unsafe { &*at };
        // SAFETY: ai_addr points at a sockaddr of ai_family's kind.
        unsafe {
            match info.ai_family {
                libc::AF_INET => {
                    let sa = &*(info.ai_addr as *const libc::sockaddr_in);
                    addrs.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr))));
                }
                libc::AF_INET6 => {
                    let sa = &*(info.ai_addr as *const libc::sockaddr_in6);
                    addrs.push(IpAddr::V6(Ipv6Addr::from(sa.sin6_addr.s6_addr)));
                }
                _ => {}
            }
        }
        at = info.ai_next;
    }
    // SAFETY: `list` came from getaddrinfo and is freed once.
    unsafe { libc::freeaddrinfo(list) };
    Some(addrs)
}

fn link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.octets()[..2] == [169, 254],
        IpAddr::V6(v6) => {
            (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6
                    .to_ipv4()
                    .is_some_and(|v4| v4.octets()[..2] == [169, 254])
        }
    }
}

/// (credentials, host) of `url` as FFmpeg's protocols split it.
fn ffmpeg_split(url: &str) -> (String, String) {
    let c_url = CString::new(url).expect("no NUL in an allowed URL");
    let mut proto = [0 as libc::c_char; 64];
    let mut auth = [0 as libc::c_char; 1024];
    let mut host = [0 as libc::c_char; 1024];
    let mut path = [0 as libc::c_char; 4096];
    let mut port: libc::c_int = -1;
    // SAFETY: every buffer is as long as the size given with it; the URL is NUL-terminated.
    unsafe {
        ffmpeg_next::ffi::av_url_split(
            proto.as_mut_ptr(),
            proto.len() as _,
            auth.as_mut_ptr(),
            auth.len() as _,
            host.as_mut_ptr(),
            host.len() as _,
            &mut port,
            path.as_mut_ptr(),
            path.len() as _,
            c_url.as_ptr(),
        );
    }
    // SAFETY: av_url_split NUL-terminates every buffer it is given.
    let text = |b: &[libc::c_char]| {
        unsafe { CStr::from_ptr(b.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    };
    (text(&auth), text(&host))
}
