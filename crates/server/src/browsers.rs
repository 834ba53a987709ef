//! What a web page elsewhere can make the user's browser do here: nothing.
//!
//! A browser on the user's machine reaches kibitz on loopback or the home network, with
//! the session cookie. Any page it visits can send it "simple" cross-site requests
//! (`POST` with `text/plain`, no preflight), open a WebSocket to it, or, by pointing a
//! name of its own at kibitz's address (DNS rebinding), read the answers as its own
//! origin. [`guard`] runs before the token check and every handler, and refuses:
//!
//! - **A foreign `Host`** → `421`. Answered are: any IP literal (a page cannot rebind an
//!   address, only a name; this covers a `0.0.0.0` bind, every interface and a NAT's
//!   public address), `localhost`, and the names given with `--allowed-host`. A request
//!   with no `Host` (HTTP/1.0, tests) is no browser's and passes.
//! - **A foreign `Origin`** on anything but `GET`/`HEAD`, and on WebSocket upgrades (a
//!   `GET` that browsers send cross-site with the cookie) → `403`. The server's own
//!   origin is the request's scheme and `Host`; `--allowed-origin` adds others (a page
//!   served elsewhere that drives kibitz). No `Origin` (curl, scripts) passes: only
//!   browsers send it, and they always send it on these requests.
//! - **A body that is not the route's type** on `POST`/`PUT`/`PATCH`/`DELETE` → `415`.
//!   JSON everywhere but the routes in [`OTHER_BODIES`]; a request with no body needs no
//!   type. A cross-site form can only send `text/plain`, form or multipart bodies, so this
//!   alone stops the forms; the `Origin` check stops `fetch`.
//!
//! It also decides the request's scheme once ([`Scheme`], an extension): `https` when
//! kibitz terminates TLS itself, or when the peer is a `--trusted-proxy` that says
//! `X-Forwarded-Proto: https`. The session cookie is `Secure` then.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, ORIGIN, TRANSFER_ENCODING, UPGRADE};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::listen::Connection;

/// The body type of changing requests unless [`OTHER_BODIES`] says otherwise.
pub const JSON: &str = "application/json";

/// Routes whose body is not JSON, by path (`*` is one segment): the one list of them. A
/// route that takes another type adds its line here.
pub const OTHER_BODIES: &[(&str, &str)] = &[
    ("/api/streams/*/whep", "application/sdp"),
    ("/api/streams/*/whip", "application/sdp"),
    // Trickle ICE (RFC 9725): answered 405, the server being ICE-lite, but with its own type
    // a WHEP client's PATCH learns that rather than a 415.
    ("/api/streams/*/whep/*", "application/trickle-ice-sdpfrag"),
    ("/api/streams/*/whip/*", "application/trickle-ice-sdpfrag"),
];

/// The header a trusted proxy names the client's scheme in.
const FORWARDED_PROTO: &str = "x-forwarded-proto";

/// How the request reached the client's end: decided by [`guard`], read by the cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// Which `Host` names and `Origin`s the server answers besides its own, and which peers
/// may say the scheme. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Origins {
    inner: Arc<Lists>,
}

#[derive(Debug, Default)]
struct Lists {
    /// Lowercase names, no port.
    hosts: Vec<String>,
    /// Lowercase `scheme://host[:port]`, default ports dropped.
    origins: Vec<String>,
    proxies: Vec<IpAddr>,
}

impl Origins {
    /// From `--allowed-host`, `--allowed-origin` and `--trusted-proxy`. A host may carry a
    /// port (ignored); an origin must be `http(s)://host[:port]` with nothing after. Every
    /// bad value is named, one line each.
    pub fn new(
        hosts: &[String],
        origins: &[String],
        proxies: &[IpAddr],
    ) -> Result<Origins, Vec<String>> {
        let mut problems = Vec::new();
        let mut lists = Lists {
            proxies: proxies.to_vec(),
            ..Lists::default()
        };
        for host in hosts {
            match host_name(host).filter(|n| !n.is_empty()) {
                Some(name) => lists.hosts.push(name),
                None => problems.push(format!("--allowed-host '{host}' is not a host name")),
            }
        }
        for origin in origins {
            match origin_key(origin) {
                Some(key) => lists.origins.push(key),
                None => problems.push(format!(
                    "--allowed-origin '{origin}' is not an origin like https://kibitz.example.com"
                )),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Origins {
            inner: Arc::new(lists),
        })
    }

    /// Whether a `Host` header's name may be answered (see the module doc).
    pub fn answers_host(&self, host: &str) -> bool {
        let Some(name) = host_name(host) else {
            return false;
        };
        name.parse::<IpAddr>().is_ok() || name == "localhost" || self.inner.hosts.contains(&name)
    }

    /// Whether `origin` is the server's own (`scheme://host`) or an allowed one.
    fn allows_origin(&self, origin: &str, scheme: Scheme, host: Option<&str>) -> bool {
        let Some(origin) = origin_key(origin) else {
            return false;
        };
        let own = host.and_then(|h| origin_key(&format!("{}://{h}", scheme.as_str())));
        own.as_deref() == Some(origin.as_str()) || self.inner.origins.contains(&origin)
    }

    fn scheme(&self, connection: Option<&Connection>, headers: &HeaderMap) -> Scheme {
        let Some(connection) = connection else {
            return Scheme::Http;
        };
        if connection.tls {
            return Scheme::Https;
        }
        let forwarded_https = headers
            .get(FORWARDED_PROTO)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"));
        if forwarded_https
            && self
                .inner
                .proxies
                .contains(&connection.peer.ip().to_canonical())
        {
            Scheme::Https
        } else {
            Scheme::Http
        }
    }
}

/// axum middleware: `router.layer(from_fn_with_state(origins, browsers::guard))`.
pub async fn guard(State(origins): State<Origins>, mut request: Request, next: Next) -> Response {
    let headers = request.headers();
    let host = headers.get(HOST).map(|h| h.to_str().unwrap_or("\u{fffd}"));
    if let Some(host) = host {
        if !origins.answers_host(host) {
            let name = host_name(host).unwrap_or_else(|| host.to_string());
            return refuse(
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "this server does not answer to the name '{name}'; \
                     start it with --allowed-host {name} to allow it"
                ),
            );
        }
    }
    let scheme = origins.scheme(request.extensions().get::<Connection>(), headers);
    let changes = !matches!(*request.method(), Method::GET | Method::HEAD);
    if changes || headers.contains_key(UPGRADE) {
        if let Some(origin) = headers.get(ORIGIN) {
            let origin = origin.to_str().unwrap_or("\u{fffd}");
            if !origins.allows_origin(origin, scheme, host) {
                return refuse(
                    StatusCode::FORBIDDEN,
                    format!(
                        "cross-site request refused: '{origin}' is not this server's origin; \
                         start it with --allowed-origin {origin} to allow it"
                    ),
                );
            }
        }
    }
    if changes && request.method() != Method::OPTIONS {
        if let Err(reason) = body_type_fits(request.uri().path(), headers) {
            return refuse(StatusCode::UNSUPPORTED_MEDIA_TYPE, reason);
        }
    }
    request.extensions_mut().insert(scheme);
    next.run(request).await
}

/// The route's body type against the request's `Content-Type`.
fn body_type_fits(path: &str, headers: &HeaderMap) -> Result<(), String> {
    let wanted = OTHER_BODIES
        .iter()
        .find(|(pattern, _)| crate::auth::path_matches(pattern, path))
        .map_or(JSON, |(_, kind)| kind);
    match headers.get(CONTENT_TYPE) {
        Some(given) => {
            let given = given.to_str().unwrap_or("");
            let essence = given.split(';').next().unwrap_or("").trim();
            if essence.eq_ignore_ascii_case(wanted) {
                Ok(())
            } else {
                Err(format!(
                    "this takes a body of Content-Type {wanted}, not '{given}'"
                ))
            }
        }
        None if has_body(headers) => Err(format!(
            "this takes a body of Content-Type {wanted}; the request has a body and no Content-Type"
        )),
        None => Ok(()),
    }
}

fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(TRANSFER_ENCODING)
        || headers
            .get(CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

fn refuse(status: StatusCode, reason: String) -> Response {
    tracing::debug!(%status, "{reason}");
    (status, Json(serde_json::json!({ "error": reason }))).into_response()
}

/// The name in a `Host` value (or `--allowed-host`): lowercase, without port, brackets or
/// a trailing dot. `None` when it is not one.
fn host_name(host: &str) -> Option<String> {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        let end = rest.find(']')?;
        let after = &rest[end + 1..];
        if !(after.is_empty() || after.starts_with(':')) {
            return None;
        }
        &rest[..end]
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            Some(_) => return None,
            None => host,
        }
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    let ok = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':' | b'_'));
    ok.then(|| name.to_ascii_lowercase())
}

/// `scheme://host[:port]` lowercased with the scheme's default port dropped; `None` for
/// anything else (paths, `null`, other schemes).
fn origin_key(origin: &str) -> Option<String> {
    let (scheme, authority) = origin.trim().split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => ":80",
        "https" => ":443",
        _ => return None,
    };
    let authority = authority.strip_suffix('/').unwrap_or(authority);
    if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
        return None;
    }
    let authority = authority.to_ascii_lowercase();
    let authority = authority.strip_suffix(default_port).unwrap_or(&authority);
    Some(format!("{scheme}://{authority}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_parsed_without_ports() {
        assert_eq!(host_name("Kibitz.Example:8199").unwrap(), "kibitz.example");
        assert_eq!(host_name("[::1]:8199").unwrap(), "::1");
        assert_eq!(host_name("127.0.0.1").unwrap(), "127.0.0.1");
        assert_eq!(host_name("localhost.").unwrap(), "localhost");
        assert!(host_name("evil/x").is_none());
        assert!(host_name("a:b").is_none());
    }

    #[test]
    fn only_addresses_localhost_and_named_hosts_are_answered() {
        let origins = Origins::new(&["cam.home:80".into()], &[], &[]).unwrap();
        for host in [
            "127.0.0.1:8199",
            "[::1]:8199",
            "192.168.1.20:8199",
            "localhost:8199",
            "LOCALHOST",
            "cam.home",
        ] {
            assert!(origins.answers_host(host), "{host}");
        }
        for host in [
            "evil.example:8199",
            "localhost.evil.example",
            "cam.home.evil",
            "",
        ] {
            assert!(!origins.answers_host(host), "{host}");
        }
    }

    #[test]
    fn the_own_origin_follows_scheme_and_host() {
        let origins = Origins::new(&[], &["https://Panel.Example:443".into()], &[]).unwrap();
        let host = Some("127.0.0.1:8199");
        assert!(origins.allows_origin("http://127.0.0.1:8199", Scheme::Http, host));
        assert!(!origins.allows_origin("https://127.0.0.1:8199", Scheme::Http, host));
        assert!(!origins.allows_origin("http://127.0.0.1:8198", Scheme::Http, host));
        assert!(origins.allows_origin("https://localhost", Scheme::Https, Some("localhost:443")));
        assert!(origins.allows_origin("https://panel.example", Scheme::Http, host));
        for bad in ["null", "http://evil.example", "file://", ""] {
            assert!(!origins.allows_origin(bad, Scheme::Http, host), "{bad}");
        }
        assert!(!origins.allows_origin("http://127.0.0.1:8199", Scheme::Http, None));
    }

    #[test]
    fn bad_lists_are_refused() {
        assert!(Origins::new(&["evil/x".into()], &[], &[]).is_err());
        assert!(Origins::new(&[], &["kibitz.example".into()], &[]).is_err());
        assert!(Origins::new(&[], &["https://kibitz.example/page".into()], &[]).is_err());
    }

    #[test]
    fn bodies_must_be_the_routes_type() {
        let mut headers = HeaderMap::new();
        assert!(body_type_fits("/api/streams", &headers).is_ok());
        headers.insert(CONTENT_LENGTH, "10".parse().unwrap());
        assert!(body_type_fits("/api/streams", &headers).is_err());
        headers.insert(
            CONTENT_TYPE,
            "application/json; charset=utf-8".parse().unwrap(),
        );
        assert!(body_type_fits("/api/streams", &headers).is_ok());
        assert!(body_type_fits("/api/streams/cam/whep", &headers).is_err());
        headers.insert(CONTENT_TYPE, "text/plain".parse().unwrap());
        assert!(body_type_fits("/api/streams", &headers).is_err());
        headers.insert(CONTENT_TYPE, "application/sdp".parse().unwrap());
        assert!(body_type_fits("/api/streams/cam/whep", &headers).is_ok());
    }
}
