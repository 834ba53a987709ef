//! The page: plain HTML, CSS and JavaScript compiled into the binary, so `kibitz serve`
//! needs no files beside it and the page always matches the API it talks to.

use axum::extract::Request;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
    X_FRAME_OPTIONS,
};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("page/index.html");
const SCRIPT: &str = include_str!("page/app.js");
const STYLE: &str = include_str!("page/app.css");

/// Revalidate every load: an upgraded server must not meet a stale script.
const NO_CACHE: &str = "no-cache";

/// What the page may load, run and be framed by. It has no inline script or style and
/// loads everything from here: thumbnails are `blob:` URLs of fetched JPEGs, the picture
/// is MJPEG from here, speech clips are fetched and played through Web Audio. `'self'`
/// covers `ws:`/`wss:` to this server (CSP 3). No page may frame it (clickjacking).
pub(crate) const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
    img-src 'self' blob: data:; media-src 'self' blob:; connect-src 'self'; \
    object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// axum middleware: the security headers on every answer, page and API alike (an API
/// answer opened as a page gets them too). A handler that set one keeps its own.
pub(crate) async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    for (name, value) in [
        (CONTENT_SECURITY_POLICY, CSP),
        (X_FRAME_OPTIONS, "DENY"),
        (X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (REFERRER_POLICY, "no-referrer"),
    ] {
        headers
            .entry(name)
            .or_insert(HeaderValue::from_static(value));
    }
    response
}

pub(crate) async fn index() -> impl IntoResponse {
    (
        [
            (CONTENT_TYPE, "text/html; charset=utf-8"),
            (CACHE_CONTROL, NO_CACHE),
        ],
        INDEX,
    )
}

pub(crate) async fn script() -> impl IntoResponse {
    (
        [
            (CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (CACHE_CONTROL, NO_CACHE),
        ],
        SCRIPT,
    )
}

pub(crate) async fn style() -> impl IntoResponse {
    (
        [
            (CONTENT_TYPE, "text/css; charset=utf-8"),
            (CACHE_CONTROL, NO_CACHE),
        ],
        STYLE,
    )
}

#[cfg(test)]
mod tests {
    use axum::body::{to_bytes, Body};
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    use super::*;
    use crate::fake::{Harness, Options};

    async fn get(harness: &Harness, path: &str) -> (StatusCode, String, String) {
        let response = harness
            .router()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let kind = response
            .headers()
            .get(CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
        (status, kind, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn page_and_its_assets_are_served() {
        let harness = Harness::new().await;
        for (path, kind, needle) in [
            ("/", "text/html", r#"src="/app.js""#),
            ("/streams/s1", "text/html", r#"src="/app.js""#),
            ("/app.js", "text/javascript", "/api/events"),
            ("/app.css", "text/css", "body"),
        ] {
            let (status, served, body) = get(&harness, path).await;
            assert_eq!(status, StatusCode::OK, "{path}");
            assert!(served.starts_with(kind), "{path}: {served}");
            assert!(body.contains(needle), "{path} lacks {needle}");
        }
    }

    /// The shell is the same for any id (it is what asks for the token, so it must not
    /// tell who may not look which streams exist), and it never carries the token.
    #[tokio::test]
    async fn the_shell_loads_without_the_token_and_never_holds_it() {
        let harness = Harness::with(Options {
            token: Some("s3cret".into()),
            token_for_viewing: true,
            ..Options::default()
        })
        .await;
        let (_, _, known) = get(&harness, "/streams/s1").await;
        for path in ["/", "/streams/nope", "/app.js", "/app.css"] {
            let (status, _, body) = get(&harness, path).await;
            assert_eq!(status, StatusCode::OK, "{path}");
            assert!(!body.contains("s3cret"), "{path} holds the token");
            if path.starts_with("/streams/") {
                assert_eq!(body, known, "{path} differs from a known stream's page");
            }
        }
    }

    #[tokio::test]
    async fn the_page_uses_every_api_it_needs() {
        for api in [
            "/api/session",
            "/api/streams",
            "/api/events",
            "/api/profiles",
            "/mjpeg",
            "/frame",
            "/status",
            "/stream`",
            "/stream?sound=on",
            "/api/clock",
            "/speech`",
            "/ask`",
            "/alerts`",
            "/api/alerts",
            "/api/history?",
            "/history.vtt`",
        ] {
            assert!(
                SCRIPT.contains(api) || INDEX.contains(api),
                "the page never calls {api}"
            );
        }
    }

    /// A token in a URL ends up in logs, history and `Referer`.
    #[tokio::test]
    async fn the_token_goes_only_into_a_header() {
        assert!(SCRIPT.contains("authorization: `Bearer ${token}`"));
        assert!(!SCRIPT.contains("localStorage") && !SCRIPT.contains("sessionStorage"));
        assert!(!SCRIPT.contains("?token") && !SCRIPT.contains("&token"));
    }

    #[tokio::test]
    async fn unknown_paths_are_404_in_json() {
        let harness = Harness::new().await;
        let (status, kind, body) = get(&harness, "/nope").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(kind, "application/json");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(body["error"].as_str().unwrap().contains("/nope"), "{body}");
    }

    /// The page and the API carry the headers that keep other sites from framing,
    /// sniffing or injecting into them.
    #[tokio::test]
    async fn every_answer_carries_the_security_headers() {
        let harness = Harness::new().await;
        for path in ["/", "/app.js", "/api/streams", "/nope"] {
            let response = harness
                .router()
                .oneshot(Request::get(path).body(Body::empty()).unwrap())
                .await
                .unwrap();
            let headers = response.headers();
            let csp = headers[CONTENT_SECURITY_POLICY].to_str().unwrap();
            assert!(csp.contains("frame-ancestors 'none'"), "{path}: {csp}");
            assert!(csp.contains("script-src 'self'"), "{path}: {csp}");
            assert_eq!(headers[X_FRAME_OPTIONS], "DENY", "{path}");
            assert_eq!(headers[X_CONTENT_TYPE_OPTIONS], "nosniff", "{path}");
            assert_eq!(headers[REFERRER_POLICY], "no-referrer", "{path}");
        }
    }

    /// The CSP allows no inline script or style: the page must have none.
    #[test]
    fn the_page_has_no_inline_script_or_style() {
        assert!(!INDEX.contains("<style"), "inline <style> in index.html");
        assert!(!INDEX.contains("style="), "a style attribute in index.html");
        for tag in INDEX.split("<script").skip(1) {
            let open = &tag[..tag.find('>').unwrap()];
            assert!(open.contains("src="), "an inline <script> in index.html");
        }
        for html in [INDEX, SCRIPT] {
            for handler in [
                " onclick=",
                " onload=",
                " onerror=",
                " onsubmit=",
                "javascript:",
            ] {
                assert!(!html.contains(handler), "inline handler {handler}");
            }
        }
        assert!(
            !SCRIPT.contains("style=\""),
            "a style attribute in app.js's HTML"
        );
    }
}
