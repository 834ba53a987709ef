//! The page: plain HTML, CSS and JavaScript compiled into the binary, so `kibitz serve`
//! needs no files beside it and the page always matches the API it talks to.

use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::IntoResponse;

const INDEX: &str = include_str!("page/index.html");
const SCRIPT: &str = include_str!("page/app.js");
const STYLE: &str = include_str!("page/app.css");

/// Revalidate every load: an upgraded server must not meet a stale script.
const NO_CACHE: &str = "no-cache";

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
    use crate::fake::Harness;

    #[tokio::test]
    async fn page_and_its_assets_are_served() {
        let harness = Harness::new();
        for (path, kind, needle) in [
            ("/", "text/html", r#"src="/app.js""#),
            ("/app.js", "text/javascript", "/api/stream"),
            ("/app.css", "text/css", "body"),
        ] {
            let response = harness
                .router()
                .oneshot(Request::get(path).body(Body::empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            assert!(
                response.headers()[CONTENT_TYPE]
                    .to_str()
                    .unwrap()
                    .starts_with(kind),
                "{path}"
            );
            let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
            assert!(
                String::from_utf8_lossy(&body).contains(needle),
                "{path} lacks {needle}"
            );
        }
    }

    #[tokio::test]
    async fn the_page_uses_every_api_it_needs() {
        for api in [
            "/api/mjpeg",
            "/api/profiles",
            "/api/status",
            "/api/instruction",
            "/api/stream",
        ] {
            assert!(
                SCRIPT.contains(api) || INDEX.contains(api),
                "the page never calls {api}"
            );
        }
    }

    #[tokio::test]
    async fn unknown_paths_are_404() {
        let harness = Harness::new();
        let response = harness
            .router()
            .oneshot(Request::get("/nope").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }
}
