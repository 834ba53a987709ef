//! Token protection: with `--token` (`KIBITZ_TOKEN`) set, nobody without the token may
//! change anything; with `--token-for-viewing` too, nobody without it may watch either.
//!
//! Why it is shaped like this:
//!
//! - **One check, before routing's answers.** [`guard`] runs before any handler, so the
//!   `401` for `PATCH /api/streams/nope` is byte for byte the one for an existing stream: a
//!   caller without the token learns nothing about what exists. It decides by method and
//!   path alone ([`Access::needs_token`]); `GET`/`HEAD` read, every other method changes.
//! - **Browsers cannot put headers on `<img>`, `EventSource` or WebSocket.** So the page
//!   asks for the token once, sends it as `Authorization: Bearer` on `fetch`, and
//!   `POST /api/session` trades it for an `HttpOnly`, `SameSite=Strict` cookie that those
//!   requests carry by themselves. The token never goes into a URL (logs, history,
//!   `Referer`) nor into the served page. `SameSite=Strict` also keeps other sites from
//!   riding on the cookie (CSRF, cross-site WebSocket); [`crate::browsers`] backs it up
//!   with `Origin` and `Content-Type` checks that hold for the cookie and for an open
//!   (no-token) server alike.
//! - **Sessions** are 32 random bytes from the system (`getrandom`), hex in the cookie, kept in
//!   memory (a restart signs everyone out) for a fixed [`SESSION_LIFETIME`] from sign-in,
//!   not sliding: the cookie's `Max-Age` then says exactly what the server will honour,
//!   and a stolen cookie cannot be kept alive by use. At most [`MAX_SESSIONS`]; signing
//!   in past that evicts the oldest. Only the bearer token mints a session, never a cookie.
//! - **Constant time.** The token is kept only as its SHA-256 digest; a candidate is
//!   hashed and the two digests compared in constant time (`subtle`), so neither
//!   the length nor a matching prefix shows in the timing. Session ids are looked up by
//!   their digest for the same reason.
//!
//! Wiring (the app router):
//!
//! ```ignore
//! let app = app.merge(auth::routes(access.clone()))
//!     .layer(axum::middleware::from_fn_with_state(access.clone(), auth::guard));
//! ```
//!
//! `/api/session` is never stopped by [`guard`]: `GET` must answer before sign-in, `POST`
//! checks the bearer token itself, `DELETE` only forgets the caller's own session.
//!
//! **WebSocket controls.** The upgrade is a `GET`, so [`guard`] lets it through unless
//! viewing needs the token. The socket handler calls [`Access::is_authorized`] on the
//! upgrade request's headers, before upgrading, and, when not authorized, takes only tiny
//! messages and answers each with a rejection instead of applying it (events still flow).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, CACHE_CONTROL, COOKIE, SET_COOKIE, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::browsers::Scheme;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "kibitz_session";

/// How long a session lasts from sign-in (fixed, not sliding).
pub const SESSION_LIFETIME: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// Sessions kept at once; signing in beyond this evicts the oldest.
pub const MAX_SESSIONS: usize = 4096;

/// Paths a viewer may `GET` even with `--token-for-viewing`. `*` is one non-empty path
/// segment. The page shell (`/`, `/streams/{id}`, its script and style) holds no data: it
/// is what asks for the token, so it must load without one. `/healthz` and `/readyz` are
/// for probes.
/// Every other path, including unknown ones, needs the token: deny unless listed. The
/// `/streams/{id}` handler must serve the same shell for any id (no lookup, no 404), or
/// it would tell a viewer without the token which streams exist.
const OPEN_FOR_VIEWING: &[&str] = &[
    "/",
    "/streams/*",
    "/app.js",
    "/app.css",
    "/healthz",
    "/readyz",
];

/// Always reaches its handler, which does its own checking (see the module doc).
const SESSION_PATH: &str = "/api/session";

/// The one answer to a request without the token, whatever it asked for.
const UNAUTHORIZED: &str =
    "this needs the server's token: send `Authorization: Bearer <token>` or sign in on the page";

/// Who may do what, and the signed-in sessions. Cheap to clone.
#[derive(Clone)]
pub struct Access {
    inner: Arc<Inner>,
}

struct Inner {
    /// SHA-256 of the token; `None` when no token is set (everything open).
    token: Option<[u8; 32]>,
    for_viewing: bool,
    sessions: Mutex<Sessions>,
}

impl fmt::Debug for Access {
    /// Never prints the token (not even its digest).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Access")
            .field("token_required", &self.token_required())
            .field("for_viewing", &self.inner.for_viewing)
            .finish_non_exhaustive()
    }
}

impl Access {
    /// `token`: what `--token` gave. An empty token matches nothing (a bearer must be
    /// non-empty), so it locks changes rather than opening them; the binary should refuse
    /// it at startup. `for_viewing` means nothing without a token.
    pub fn new(token: Option<String>, for_viewing: bool) -> Access {
        Access {
            inner: Arc::new(Inner {
                token: token.map(|t| digest(t.as_bytes())),
                for_viewing,
                sessions: Mutex::new(Sessions::new(MAX_SESSIONS)),
            }),
        }
    }

    /// No token: every request is allowed.
    pub fn open() -> Access {
        Access::new(None, false)
    }

    pub fn token_required(&self) -> bool {
        self.inner.token.is_some()
    }

    /// Whether reading (every `GET` but the page shell) needs the token too.
    pub fn viewing_requires_token(&self) -> bool {
        self.token_required() && self.inner.for_viewing
    }

    /// Whether this request's headers carry the token (`Authorization: Bearer`) or a live
    /// session cookie. Always true when no token is set.
    pub fn is_authorized(&self, headers: &HeaderMap) -> bool {
        self.inner.token.is_none() || self.bearer_matches(headers) || self.has_session(headers)
    }

    /// What the request needs, by method and path: whether it must be authorized.
    pub fn needs_token(&self, method: &Method, path: &str) -> bool {
        if !self.token_required() || path == SESSION_PATH {
            return false;
        }
        let reads = method == Method::GET || method == Method::HEAD;
        if !reads {
            return true;
        }
        self.inner.for_viewing && !OPEN_FOR_VIEWING.iter().any(|p| path_matches(p, path))
    }

    /// Whether the `Authorization` header holds the token itself (a cookie does not count).
    fn bearer_matches(&self, headers: &HeaderMap) -> bool {
        let (Some(token), Some(given)) = (&self.inner.token, bearer(headers)) else {
            return false;
        };
        digests_equal(token, &digest(given))
    }

    fn has_session(&self, headers: &HeaderMap) -> bool {
        let ids = session_ids(headers);
        if ids.is_empty() {
            return false;
        }
        let now = Instant::now();
        let mut sessions = self.sessions();
        ids.iter().any(|id| sessions.is_live(&digest(id), now))
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn report(&self, headers: &HeaderMap) -> Json<serde_json::Value> {
        Json(serde_json::json!({
            "token_required": self.token_required(),
            "viewing_requires_token": self.viewing_requires_token(),
            "authenticated": self.is_authorized(headers),
        }))
    }
}

/// axum middleware: `router.layer(axum::middleware::from_fn_with_state(access.clone(), auth::guard))`.
/// Answers `401` before the request reaches any handler when it needs the token and
/// carries neither it nor a live session.
pub async fn guard(State(access): State<Access>, request: Request, next: Next) -> Response {
    if access.needs_token(request.method(), request.uri().path())
        && !access.is_authorized(request.headers())
    {
        return unauthorized();
    }
    next.run(request).await
}

/// `/api/session` (`GET`, `POST`, `DELETE`) with `access` applied, to merge into the app
/// router. All three answer `{"token_required", "viewing_requires_token", "authenticated"}`.
pub fn routes(access: Access) -> Router {
    Router::new()
        .route(SESSION_PATH, get(status).post(sign_in).delete(sign_out))
        .with_state(access)
}

/// Always open: tells the page whether to ask for the token.
async fn status(State(access): State<Access>, headers: HeaderMap) -> Response {
    no_store(access.report(&headers).into_response())
}

/// Trades the bearer token for a session cookie. Without a token set there is nothing to
/// trade: it only reports.
async fn sign_in(
    State(access): State<Access>,
    scheme: Option<Extension<Scheme>>,
    headers: HeaderMap,
) -> Response {
    if !access.token_required() {
        return no_store(access.report(&headers).into_response());
    }
    if !access.bearer_matches(&headers) {
        return unauthorized();
    }
    let id = match session_id() {
        Ok(id) => id,
        Err(e) => {
            tracing::error!("cannot get random bytes for a session id: {e}");
            let body = serde_json::json!({
                "error": "internal error; the server log has the details"
            });
            return (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response();
        }
    };
    access
        .sessions()
        .insert(digest(id.as_bytes()), Instant::now());
    let mut response = access.report(&headers).into_response();
    response.headers_mut().insert(
        SET_COOKIE,
        cookie(&id, SESSION_LIFETIME.as_secs(), secure(scheme)),
    );
    no_store(response)
}

/// Forgets the caller's session and clears the cookie. Open to all: it can only end the
/// session the request itself carries.
async fn sign_out(
    State(access): State<Access>,
    scheme: Option<Extension<Scheme>>,
    headers: HeaderMap,
) -> Response {
    {
        let mut sessions = access.sessions();
        for id in session_ids(&headers) {
            sessions.remove(&digest(id));
        }
    }
    let mut response = access.report(&headers).into_response();
    response
        .headers_mut()
        .insert(SET_COOKIE, cookie("", 0, secure(scheme)));
    no_store(response)
}

/// `401`, `WWW-Authenticate: Bearer`, `{"error": ...}`: the same for every path.
fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(WWW_AUTHENTICATE, "Bearer")],
        Json(serde_json::json!({ "error": UNAUTHORIZED })),
    )
        .into_response()
}

/// Session answers carry a cookie or say who is signed in: never cache them.
fn no_store(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The session cookie, `Secure` when the browser reached us over HTTPS (kibitz's own TLS,
/// or a `--trusted-proxy` saying `X-Forwarded-Proto: https`: [`crate::browsers`]
/// decides). Not over plain HTTP: browsers drop a `Secure` cookie set over HTTP
/// (localhost aside), which would make signing in impossible.
fn cookie(value: &str, max_age: u64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    let text = format!(
        "{SESSION_COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}{secure}"
    );
    HeaderValue::from_str(&text).expect("hex ids make a valid header value")
}

fn secure(scheme: Option<Extension<Scheme>>) -> bool {
    scheme.is_some_and(|Extension(s)| s == Scheme::Https)
}

/// The credentials of `Authorization: Bearer <credentials>` (scheme in any case), if
/// non-empty.
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(AUTHORIZATION)?.as_bytes();
    let scheme = value.get(..7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let credentials = value[7..].trim_ascii();
    (!credentials.is_empty()).then_some(credentials)
}

/// Every `kibitz_session` value in the `Cookie` headers (HTTP/2 may split them).
fn session_ids(headers: &HeaderMap) -> Vec<&[u8]> {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b';'))
        .filter_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            let (name, value) = (&pair[..eq], pair[eq + 1..].trim_ascii());
            (name == SESSION_COOKIE.as_bytes() && !value.is_empty()).then_some(value)
        })
        .collect()
}

/// A fresh session id: 32 bytes from the system's random source, as 64 lowercase hex
/// digits.
fn session_id() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(hex::encode(bytes))
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Equal digests, in time that does not depend on where they differ.
fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    bool::from(a.ct_eq(b))
}

/// `pattern` from [`OPEN_FOR_VIEWING`] against a request path; `*` is one non-empty segment.
pub(crate) fn path_matches(pattern: &str, path: &str) -> bool {
    let mut want = pattern.split('/');
    let mut have = path.split('/');
    loop {
        match (want.next(), have.next()) {
            (None, None) => return true,
            (Some("*"), Some(segment)) if !segment.is_empty() => {}
            (Some(w), Some(h)) if w == h => {}
            _ => return false,
        }
    }
}

/// Live sessions by the SHA-256 of their id, each with its expiry. Time is passed in.
struct Sessions {
    live: HashMap<[u8; 32], Instant>,
    capacity: usize,
}

impl Sessions {
    fn new(capacity: usize) -> Sessions {
        Sessions {
            live: HashMap::new(),
            capacity,
        }
    }

    fn insert(&mut self, key: [u8; 32], now: Instant) {
        if self.live.len() >= self.capacity {
            self.live.retain(|_, expires| *expires > now);
        }
        if self.live.len() >= self.capacity {
            // Lifetimes are fixed, so the soonest to expire is the oldest.
            if let Some(oldest) = self.live.iter().min_by_key(|(_, e)| **e).map(|(k, _)| *k) {
                self.live.remove(&oldest);
            }
        }
        self.live.insert(key, now + SESSION_LIFETIME);
    }

    /// Whether `key` names a session that has not expired; forgets it once it has.
    fn is_live(&mut self, key: &[u8; 32], now: Instant) -> bool {
        match self.live.get(key) {
            Some(expires) if *expires > now => true,
            Some(_) => {
                self.live.remove(key);
                false
            }
            None => false,
        }
    }

    fn remove(&mut self, key: &[u8; 32]) {
        self.live.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use axum::body::{to_bytes, Body};
    use axum::extract::Path;
    use axum::http::header::CONTENT_TYPE;
    use axum::http::Request;
    use axum::routing::patch;
    use tower::ServiceExt;

    use super::*;

    const TOKEN: &str = "s3cret-token";

    /// Knows one stream, `cam`; an unknown id is 404, as the real handlers answer.
    async fn one_stream(Path(id): Path<String>) -> StatusCode {
        if id == "cam" {
            StatusCode::NO_CONTENT
        } else {
            StatusCode::NOT_FOUND
        }
    }

    /// Dummy routes shaped like the real ones, behind the guard.
    fn app(access: Access) -> Router {
        Router::new()
            .route("/", get(|| async { "page" }))
            .route("/app.js", get(|| async { "script" }))
            .route("/streams/{id}", get(|| async { "page" }))
            .route("/streams/{id}/mjpeg", get(|| async { "picture" }))
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/api/streams",
                get(|| async { "[]" }).post(|| async { StatusCode::CREATED }),
            )
            .route("/api/streams/{id}", patch(one_stream).delete(one_stream))
            .merge(routes(access.clone()))
            .layer(axum::middleware::from_fn_with_state(access, guard))
    }

    fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> Request<Body> {
        let mut builder = Request::builder().method(method).uri(path);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(Body::empty()).unwrap()
    }

    async fn send(app: &Router, request: Request<Body>) -> Response {
        app.clone().oneshot(request).await.unwrap()
    }

    async fn status_of(app: &Router, method: &str, path: &str, headers: &[(&str, &str)]) -> u16 {
        send(app, request(method, path, headers))
            .await
            .status()
            .as_u16()
    }

    async fn json(response: Response) -> serde_json::Value {
        let bytes = to_bytes(response.into_body(), 1 << 16).await.unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    fn bearer_header(token: &str) -> (&'static str, String) {
        ("authorization", format!("Bearer {token}"))
    }

    /// Signs in with the token and returns the `Cookie` header value to send back.
    async fn sign_in_cookie(app: &Router) -> String {
        let (name, value) = bearer_header(TOKEN);
        let response = send(app, request("POST", "/api/session", &[(name, &value)])).await;
        assert_eq!(response.status(), StatusCode::OK);
        let set = response.headers()[SET_COOKIE].to_str().unwrap();
        set.split(';').next().unwrap().to_string()
    }

    #[tokio::test]
    async fn without_a_token_everything_is_open() {
        let app = app(Access::open());
        assert_eq!(status_of(&app, "GET", "/api/streams", &[]).await, 200);
        assert_eq!(status_of(&app, "POST", "/api/streams", &[]).await, 201);
        assert_eq!(status_of(&app, "PATCH", "/api/streams/cam", &[]).await, 204);
        assert_eq!(
            status_of(&app, "DELETE", "/api/streams/cam", &[]).await,
            204
        );
        // The dummy does tell streams apart, which the guard must hide below.
        assert_eq!(
            status_of(&app, "DELETE", "/api/streams/nope", &[]).await,
            404
        );
        assert_eq!(status_of(&app, "GET", "/healthz", &[]).await, 200);
    }

    #[tokio::test]
    async fn with_a_token_changes_need_it() {
        let app = app(Access::new(Some(TOKEN.into()), false));
        let (name, good) = bearer_header(TOKEN);
        let (_, wrong) = bearer_header("s3cret-tokeN");
        let good = [(name, good.as_str())];
        let wrong = [(name, wrong.as_str())];
        for (method, path, ok) in [
            ("POST", "/api/streams", 201),
            ("PATCH", "/api/streams/cam", 204),
            ("DELETE", "/api/streams/cam", 204),
        ] {
            assert_eq!(
                status_of(&app, method, path, &[]).await,
                401,
                "{method} {path}"
            );
            assert_eq!(
                status_of(&app, method, path, &wrong).await,
                401,
                "{method} {path}"
            );
            assert_eq!(
                status_of(&app, method, path, &good).await,
                ok,
                "{method} {path}"
            );
        }
        // The scheme is case-insensitive; other schemes and an empty bearer are not the token.
        let lower = format!("bearer {TOKEN}");
        assert_eq!(
            status_of(&app, "POST", "/api/streams", &[(name, &lower)]).await,
            201
        );
        let basic = format!("Basic {TOKEN}");
        assert_eq!(
            status_of(&app, "POST", "/api/streams", &[(name, &basic)]).await,
            401
        );
        assert_eq!(
            status_of(&app, "POST", "/api/streams", &[(name, "Bearer ")]).await,
            401
        );
        // Reading stays open.
        assert_eq!(status_of(&app, "GET", "/api/streams", &[]).await, 200);
        assert_eq!(status_of(&app, "GET", "/streams/cam/mjpeg", &[]).await, 200);
        assert_eq!(status_of(&app, "GET", "/", &[]).await, 200);
    }

    #[tokio::test]
    async fn a_wrong_token_says_nothing_about_what_exists() {
        let app = app(Access::new(Some(TOKEN.into()), false));
        let (name, wrong) = bearer_header("guess");
        let mut answers = Vec::new();
        for (method, path) in [
            ("PATCH", "/api/streams/cam"),
            ("PATCH", "/api/streams/nope"),
            ("DELETE", "/api/streams/cam"),
            ("DELETE", "/api/streams/nope"),
            ("POST", "/api/no-such-route"),
            ("PUT", "/api/streams"),
        ] {
            for headers in [&[][..], &[(name, wrong.as_str())][..]] {
                let response = send(&app, request(method, path, headers)).await;
                assert_eq!(response.status(), 401, "{method} {path}");
                assert_eq!(response.headers()[WWW_AUTHENTICATE], "Bearer");
                assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
                let body = to_bytes(response.into_body(), 1 << 16).await.unwrap();
                answers.push(body);
            }
        }
        assert!(answers.windows(2).all(|w| w[0] == w[1]));
        let body: serde_json::Value = serde_json::from_slice(&answers[0]).unwrap();
        assert!(body["error"].as_str().unwrap().contains("token"));
    }

    #[tokio::test]
    async fn viewing_token_closes_everything_but_the_shell_and_health() {
        let app = app(Access::new(Some(TOKEN.into()), true));
        for path in ["/api/streams", "/streams/cam/mjpeg", "/api/no-such-route"] {
            assert_eq!(status_of(&app, "GET", path, &[]).await, 401, "{path}");
            assert_eq!(status_of(&app, "HEAD", path, &[]).await, 401, "{path}");
        }
        for path in ["/", "/app.js", "/streams/cam", "/healthz", "/api/session"] {
            assert_eq!(status_of(&app, "GET", path, &[]).await, 200, "{path}");
        }
        let (name, good) = bearer_header(TOKEN);
        assert_eq!(
            status_of(&app, "GET", "/api/streams", &[(name, &good)]).await,
            200
        );
        // An encoded slash is one segment to the guard and to the router alike: it reaches
        // the shell, not the picture.
        let response = send(&app, request("GET", "/streams/cam%2Fmjpeg", &[])).await;
        let body = to_bytes(response.into_body(), 1 << 16).await.unwrap();
        assert_eq!(&body[..], b"page");
        for path in [
            "/streams/cam/",
            "//api/streams",
            "/streams/cam/../../api/streams",
        ] {
            assert_eq!(status_of(&app, "GET", path, &[]).await, 401, "{path}");
        }
    }

    #[tokio::test]
    async fn a_session_cookie_stands_in_for_the_token() {
        let app = app(Access::new(Some(TOKEN.into()), true));
        let (name, good) = bearer_header(TOKEN);
        let response = send(&app, request("POST", "/api/session", &[(name, &good)])).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[CACHE_CONTROL], "no-store");
        let set = response.headers()[SET_COOKIE].to_str().unwrap().to_string();
        let attributes: Vec<&str> = set.split("; ").collect();
        for wanted in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=604800"] {
            assert!(attributes.contains(&wanted), "{wanted} missing from {set}");
        }
        assert!(!set.contains("Secure"));
        assert!(!set.contains(TOKEN));
        let id = attributes[0].strip_prefix("kibitz_session=").unwrap();
        assert_eq!(id.len(), 64);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        let body = json(response).await;
        assert_eq!(body["authenticated"], true);

        let cookie = attributes[0];
        let headers = [("cookie", cookie)];
        assert_eq!(status_of(&app, "POST", "/api/streams", &headers).await, 201);
        assert_eq!(status_of(&app, "GET", "/api/streams", &headers).await, 200);
        assert_eq!(
            status_of(&app, "GET", "/streams/cam/mjpeg", &headers).await,
            200
        );
        // Among other cookies, and in a second Cookie header.
        let among = format!("theme=dark; {cookie}; lang=en");
        assert_eq!(
            status_of(&app, "POST", "/api/streams", &[("cookie", &among)]).await,
            201
        );
        let split = [("cookie", "theme=dark"), ("cookie", cookie)];
        assert_eq!(status_of(&app, "POST", "/api/streams", &split).await, 201);

        // Each sign-in is its own session.
        assert_ne!(sign_in_cookie(&app).await, cookie);
    }

    #[tokio::test]
    async fn signing_in_needs_the_token_itself() {
        let app = app(Access::new(Some(TOKEN.into()), false));
        let (name, wrong) = bearer_header("guess");
        for headers in [&[][..], &[(name, wrong.as_str())][..]] {
            let response = send(&app, request("POST", "/api/session", headers)).await;
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
            assert_eq!(response.headers()[WWW_AUTHENTICATE], "Bearer");
            assert!(response.headers().get(SET_COOKIE).is_none());
        }
        // A cookie does not mint another session (a stolen one cannot be renewed).
        let cookie = sign_in_cookie(&app).await;
        assert_eq!(
            status_of(&app, "POST", "/api/session", &[("cookie", &cookie)]).await,
            401
        );
    }

    #[tokio::test]
    async fn signing_out_ends_the_session() {
        let app = app(Access::new(Some(TOKEN.into()), false));
        let cookie = sign_in_cookie(&app).await;
        let other = sign_in_cookie(&app).await;
        let headers = [("cookie", cookie.as_str())];
        let response = send(&app, request("DELETE", "/api/session", &headers)).await;
        assert_eq!(response.status(), StatusCode::OK);
        let set = response.headers()[SET_COOKIE].to_str().unwrap();
        assert!(set.starts_with("kibitz_session=;"), "{set}");
        assert!(set.contains("Max-Age=0"));
        assert_eq!(json(response).await["authenticated"], false);
        assert_eq!(status_of(&app, "POST", "/api/streams", &headers).await, 401);
        // Only the caller's own session ends.
        let other = [("cookie", other.as_str())];
        assert_eq!(status_of(&app, "POST", "/api/streams", &other).await, 201);
    }

    #[tokio::test]
    async fn a_made_up_cookie_fails() {
        let app = app(Access::new(Some(TOKEN.into()), true));
        let bogus = format!("kibitz_session={}", "ab".repeat(32));
        for cookie in [bogus.as_str(), "kibitz_session=", "kibitz_session", TOKEN] {
            let headers = [("cookie", cookie)];
            assert_eq!(status_of(&app, "POST", "/api/streams", &headers).await, 401);
            assert_eq!(status_of(&app, "GET", "/api/streams", &headers).await, 401);
        }
        // The token as a cookie value is not a session either.
        let token_cookie = format!("kibitz_session={TOKEN}");
        let headers = [("cookie", token_cookie.as_str())];
        assert_eq!(status_of(&app, "POST", "/api/streams", &headers).await, 401);
    }

    #[tokio::test]
    async fn session_status_reports_the_flags() {
        let cases = [
            (Access::open(), false, false, true),
            (Access::new(Some(TOKEN.into()), false), true, false, false),
            (Access::new(Some(TOKEN.into()), true), true, true, false),
        ];
        for (access, required, viewing, authenticated) in cases {
            let router = app(access);
            let response = send(&router, request("GET", "/api/session", &[])).await;
            assert_eq!(response.status(), StatusCode::OK);
            let body = json(response).await;
            assert_eq!(body["token_required"], required);
            assert_eq!(body["viewing_requires_token"], viewing);
            assert_eq!(body["authenticated"], authenticated);
        }
        // Without a token, signing in only reports.
        let open = app(Access::open());
        let response = send(&open, request("POST", "/api/session", &[])).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.headers().get(SET_COOKIE).is_none());
        assert_eq!(json(response).await["authenticated"], true);

        let app = app(Access::new(Some(TOKEN.into()), true));
        let cookie = sign_in_cookie(&app).await;
        let response = send(&app, request("GET", "/api/session", &[("cookie", &cookie)])).await;
        assert_eq!(json(response).await["authenticated"], true);
    }

    #[test]
    fn needs_token_by_method_and_path() {
        let access = Access::new(Some(TOKEN.into()), false);
        assert!(access.needs_token(&Method::PUT, "/api/streams/cam"));
        assert!(access.needs_token(&Method::OPTIONS, "/api/streams"));
        assert!(!access.needs_token(&Method::GET, "/api/streams"));
        assert!(!access.needs_token(&Method::POST, "/api/session"));
        assert!(!access.needs_token(&Method::DELETE, "/api/session"));
        let viewing = Access::new(Some(TOKEN.into()), true);
        assert!(viewing.needs_token(&Method::GET, "/api/ws"));
        assert!(viewing.needs_token(&Method::GET, "/streams/"));
        assert!(viewing.needs_token(&Method::GET, "/streams/cam/"));
        assert!(viewing.needs_token(&Method::GET, "/healthz/x"));
        assert!(!viewing.needs_token(&Method::GET, "/streams/cam"));
        assert!(!viewing.needs_token(&Method::HEAD, "/"));
        assert!(viewing.needs_token(&Method::POST, "/healthz"));
        assert!(!Access::open().needs_token(&Method::DELETE, "/api/streams/cam"));
    }

    #[test]
    fn is_authorized_without_a_token_is_always_true() {
        assert!(Access::open().is_authorized(&HeaderMap::new()));
        assert!(!Access::new(Some(TOKEN.into()), false).is_authorized(&HeaderMap::new()));
    }

    #[test]
    fn an_empty_token_opens_nothing() {
        let access = Access::new(Some(String::new()), false);
        assert!(access.token_required());
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert!(!access.is_authorized(&headers));
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer"));
        assert!(!access.is_authorized(&headers));
    }

    #[test]
    fn debug_hides_the_token() {
        let access = Access::new(Some(TOKEN.into()), true);
        let text = format!("{access:?}");
        assert!(!text.contains(TOKEN), "{text}");
        assert!(text.contains("token_required: true"));
    }

    #[test]
    fn digests_compare_equal_only_when_equal() {
        let a = digest(b"token");
        assert!(digests_equal(&a, &digest(b"token")));
        assert!(!digests_equal(&a, &digest(b"token ")));
        assert!(!digests_equal(&a, &digest(b"toke")));
        assert!(!digests_equal(&a, &digest(b"")));
        // A difference in any one byte, any one bit, is seen.
        for byte in 0..32 {
            for bit in 0..8 {
                let mut b = a;
                b[byte] ^= 1 << bit;
                assert!(!digests_equal(&a, &b), "byte {byte} bit {bit}");
            }
        }
    }

    #[test]
    fn session_ids_are_fresh_hex() {
        let a = session_id().unwrap();
        let b = session_id().unwrap();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')));
        assert_ne!(a, b);
    }

    #[test]
    fn sessions_expire_after_their_lifetime() {
        let start = Instant::now();
        let mut sessions = Sessions::new(4);
        let key = digest(b"id");
        sessions.insert(key, start);
        assert!(sessions.is_live(&key, start + SESSION_LIFETIME - Duration::from_secs(1)));
        // Fixed, not sliding: use did not extend it.
        assert!(!sessions.is_live(&key, start + SESSION_LIFETIME));
        assert!(sessions.live.is_empty());
    }

    #[test]
    fn a_full_table_evicts_the_oldest() {
        let start = Instant::now();
        let mut sessions = Sessions::new(3);
        let keys: Vec<[u8; 32]> = (0u8..4).map(|i| digest(&[i])).collect();
        for (i, key) in keys.iter().enumerate() {
            sessions.insert(*key, start + Duration::from_secs(i as u64));
        }
        let now = start + Duration::from_secs(10);
        assert_eq!(sessions.live.len(), 3);
        assert!(!sessions.is_live(&keys[0], now));
        assert!(keys[1..].iter().all(|k| sessions.is_live(k, now)));
        // Expired ones go first, before any live one is evicted.
        let later = start + SESSION_LIFETIME + Duration::from_secs(2);
        sessions.insert(keys[0], later);
        assert!(sessions.is_live(&keys[0], later));
        assert!(sessions.is_live(&keys[3], later));
        assert_eq!(sessions.live.len(), 2);
    }

    #[test]
    fn the_open_list_matches_whole_segments() {
        assert!(path_matches("/", "/"));
        assert!(!path_matches("/", "/x"));
        assert!(path_matches("/streams/*", "/streams/cam"));
        assert!(!path_matches("/streams/*", "/streams/cam/mjpeg"));
        assert!(!path_matches("/streams/*", "/streams"));
        assert!(!path_matches("/app.js", "/app.jsx"));
    }
}
