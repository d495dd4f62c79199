//! The web console: static files built into the binary, served at `/console/`.
//!
//! The console is plain ES modules typed with JSDoc and checked by TypeScript (`console/`,
//! `npm run check`), so the browser loads the source as written and no build step stands
//! between `cargo build` and a working console. It talks to hearth through the public API
//! with the key the user signs in with, so it can do nothing that key could not.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};

/// Every file of the console: its name under `/console/`, its type and its bytes.
const FILES: &[(&str, &str, &str)] = &[
    ("index.html", "text/html; charset=utf-8", include_str!("../../../../console/index.html")),
    ("app.js", "text/javascript; charset=utf-8", include_str!("../../../../console/app.js")),
    ("api.js", "text/javascript; charset=utf-8", include_str!("../../../../console/api.js")),
    ("chat.js", "text/javascript; charset=utf-8", include_str!("../../../../console/chat.js")),
    ("upload.js", "text/javascript; charset=utf-8", include_str!("../../../../console/upload.js")),
    ("plot.js", "text/javascript; charset=utf-8", include_str!("../../../../console/plot.js")),
    ("style.css", "text/css; charset=utf-8", include_str!("../../../../console/style.css")),
];

/// Nothing but hearth itself: no outside scripts, fonts or connections.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

pub(super) async fn root() -> Redirect {
    Redirect::to("/console/")
}

pub(super) async fn index() -> Response {
    file("index.html")
}

pub(super) async fn asset(Path(name): Path<String>) -> Response {
    file(&name)
}

fn file(name: &str) -> Response {
    let Some((_, kind, body)) = FILES.iter().find(|(n, _, _)| *n == name) else {
        return (StatusCode::NOT_FOUND, "no such file in the console").into_response();
    };
    let mut response = (*body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
